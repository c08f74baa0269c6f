//! The stable plugin ABI for banger capabilities.
//!
//! A plugin is a cdylib exporting one [`PluginModule`] root module (an
//! `abi_stable` prefix type, so it can grow). The module hands out a
//! [`PluginCapabilityBox`], a `#[sabi_trait]` object whose hooks exchange
//! versioned JSON ([`wire`]) in `RString`s, which keeps the binary interface
//! tiny while the data model grows. Plugin authors use the [`sdk`] and never
//! touch this layer directly; the daemon's loader lives in
//! `banger_core::plugin_host`.
//!
//! This crate must not depend on `banger-core` (the core depends on it).

// abi_stable 0.11's `#[sabi_trait]` expands to impls inside a const block.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, RResult, RStr, RString};
use abi_stable::{
    RRef, StableAbi, declare_root_module_statics, package_version_strings, sabi_trait,
};

pub mod sdk;
pub mod wire;

/// The banger plugin ABI version this crate speaks: the major of this
/// crate's own version (`2.0.0`), which is independent of banger's. A daemon
/// refuses plugins whose root module reports a different number. Bumped only
/// when the binary interface changes incompatibly; minor revisions add
/// prefix fields and trait methods after the last prefix field, and
/// data-model growth goes through [`wire`]. See `docs/plugins.md`.
pub const ABI_VERSION: u32 = 2;

/// The root module every plugin exports (via [`export_plugin!`]).
///
/// A prefix type: fields after `new_capability` are added by later minor
/// revisions and their accessors return `Option` (`missing_field(option)`),
/// never panic. (abi_stable still refuses to load a plugin whose prefix
/// types have fewer fields than the daemon's; see `docs/plugins.md`.)
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: u32,
    /// Makes the plugin's capability object; an error says why it could not.
    #[sabi(last_prefix_field)]
    pub new_capability: extern "C" fn() -> RResult<PluginCapabilityBox, RString>,
    /// Stands for a field the next minor revision adds (feature
    /// `next-minor-test`, tests only): returns 21.
    #[cfg(feature = "next-minor-test")]
    pub next_minor_probe: extern "C" fn() -> u32,
}

impl std::fmt::Debug for PluginModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginModule")
            .field("abi_version", &self.abi_version)
            .finish_non_exhaustive()
    }
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "banger_plugin";
    const NAME: &'static str = "banger_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// What the host offers a plugin during one hook call: log lines (a cdylib
/// has its own globals, so a plugin cannot use the host's `tracing`
/// subscriber) and the allowlisted privileged host requests.
#[sabi_trait]
pub trait HostCallbacks {
    /// One informational line for the hook's progress stream and the daemon log.
    fn info(&self, msg: RStr<'_>);
    /// A warning the user should see.
    fn warn(&self, msg: RStr<'_>);
    /// One privileged host operation from the allowlist
    /// ([`wire::HostRequest`] as JSON); answers [`wire::HostReply`] JSON or
    /// an error message (refused, not supported by this host, failed).
    /// New methods go below this one, with defaults.
    #[sabi(last_prefix_field)]
    fn host_request(&self, request: RStr<'_>) -> RResult<RString, RString>;
}

/// A borrowed [`HostCallbacks`] trait object, valid for one hook call.
pub type HostCallbacksRef<'a> = HostCallbacks_TO<'a, RRef<'a, ()>>;

/// The capability object crossing the boundary. Every hook takes a
/// [`wire::HookRequest`] as JSON and returns a [`wire::HookResponse`] as JSON
/// or an error message. Implemented by the SDK glue, never by hand.
#[sabi_trait]
pub trait PluginCapability: Send + Sync {
    /// Unique capability name, used with `--cap`.
    fn name(&self) -> RString;
    /// One line for `banger cap list`.
    fn description(&self) -> RString;
    /// The plugin's [`wire::Manifest`] as JSON (requires, after, backends).
    fn manifest(&self) -> RString;
    /// Checks per-VM options given as a JSON object of strings.
    fn validate_options(&self, options_json: RStr<'_>) -> RResult<(), RString>;
    /// The PrepareHost hook.
    fn prepare_host(
        &self,
        request: RStr<'_>,
        host: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString>;
    /// The ConfigureMachine hook.
    fn configure_machine(
        &self,
        request: RStr<'_>,
        host: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString>;
    /// The GuestConfig hook.
    fn guest_config(
        &self,
        request: RStr<'_>,
        host: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString>;
    /// The PostStart hook.
    fn post_start(
        &self,
        request: RStr<'_>,
        host: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString>;
    /// The Teardown hook. New methods go below this one, with defaults.
    #[sabi(last_prefix_field)]
    fn teardown(&self, request: RStr<'_>, host: HostCallbacksRef<'_>) -> RResult<RString, RString>;
}

/// An owned [`PluginCapability`] trait object.
pub type PluginCapabilityBox = PluginCapability_TO<'static, RBox<()>>;
