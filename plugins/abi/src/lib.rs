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

/// The banger plugin ABI version this crate speaks. A daemon refuses plugins
/// whose root module reports a different number. Bumped only when the
/// binary interface changes incompatibly; data-model growth goes through
/// [`wire`] instead.
pub const ABI_VERSION: u32 = 1;

/// The root module every plugin exports (via [`export_plugin!`]).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The [`ABI_VERSION`] the plugin was built against.
    pub abi_version: u32,
    /// Makes the plugin's capability object; an error says why it could not.
    #[sabi(last_prefix_field)]
    pub new_capability: extern "C" fn() -> RResult<PluginCapabilityBox, RString>,
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

/// The host's logger, passed to every hook call. Lines end up in the hook's
/// progress stream and the daemon log. (A cdylib has its own globals, so a
/// plugin cannot use the host's `tracing` subscriber.)
#[sabi_trait]
pub trait HostLogger {
    /// One informational line.
    fn info(&self, msg: RStr<'_>);
    /// A warning the user should see.
    #[sabi(last_prefix_field)]
    fn warn(&self, msg: RStr<'_>);
}

/// A borrowed [`HostLogger`] trait object, valid for one hook call.
pub type HostLoggerRef<'a> = HostLogger_TO<'a, RRef<'a, ()>>;

/// The capability object crossing the boundary. Every hook takes a
/// [`wire::HookRequest`] as JSON and returns a [`wire::HookResponse`] as JSON
/// or an error message. Implemented by the SDK glue, never by hand.
#[sabi_trait]
pub trait PluginCapability: Send + Sync {
    /// Unique capability name, used with `--cap`.
    fn name(&self) -> RString;
    /// One line for `banger cap list`.
    fn description(&self) -> RString;
    /// Checks per-VM options given as a JSON object of strings.
    fn validate_options(&self, options_json: RStr<'_>) -> RResult<(), RString>;
    /// The PrepareHost hook.
    fn prepare_host(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// The ConfigureMachine hook.
    fn configure_machine(
        &self,
        request: RStr<'_>,
        log: HostLoggerRef<'_>,
    ) -> RResult<RString, RString>;
    /// The GuestConfig hook.
    fn guest_config(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// The PostStart hook.
    fn post_start(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// The Teardown hook. New methods go below this one, with defaults.
    #[sabi(last_prefix_field)]
    fn teardown(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
}

/// An owned [`PluginCapability`] trait object.
pub type PluginCapabilityBox = PluginCapability_TO<'static, RBox<()>>;
