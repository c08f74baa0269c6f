//! `v1-plugin`: what a plugin built against banger-plugin-abi 0.1.0 (plugin
//! ABI 1) exports, from a frozen copy of that crate's root module and
//! capability trait. The daemon's policy is to refuse it with a message
//! naming the file, its version and the supported one (see
//! `docs/plugins.md`); `tests/tests/plugins.rs` pins that.
//!
//! Do not update this file when the ABI changes: it is the old layout.

// abi_stable 0.11's `#[sabi_trait]` expands to impls inside a const block.
#![allow(non_local_definitions)]

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RBox, RResult, RStr, RString};
use abi_stable::{RRef, StableAbi, declare_root_module_statics, sabi_trait};

/// ABI 1's version constant.
pub const ABI_VERSION: u32 = 1;

/// ABI 1's root module, as it was.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The ABI version.
    pub abi_version: u32,
    /// Makes the capability object.
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
    // banger-plugin-abi's version when ABI 1 was current (it followed the
    // workspace version then).
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("0.1.0");
}

/// ABI 1's host logger.
#[sabi_trait]
pub trait HostLogger {
    /// One informational line.
    fn info(&self, msg: RStr<'_>);
    /// A warning.
    #[sabi(last_prefix_field)]
    fn warn(&self, msg: RStr<'_>);
}

/// A borrowed ABI 1 logger.
pub type HostLoggerRef<'a> = HostLogger_TO<'a, RRef<'a, ()>>;

/// ABI 1's capability object.
#[sabi_trait]
pub trait PluginCapability: Send + Sync {
    /// Name.
    fn name(&self) -> RString;
    /// Description.
    fn description(&self) -> RString;
    /// Options check.
    fn validate_options(&self, options_json: RStr<'_>) -> RResult<(), RString>;
    /// PrepareHost.
    fn prepare_host(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// ConfigureMachine.
    fn configure_machine(
        &self,
        request: RStr<'_>,
        log: HostLoggerRef<'_>,
    ) -> RResult<RString, RString>;
    /// GuestConfig.
    fn guest_config(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// PostStart.
    fn post_start(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
    /// Teardown.
    #[sabi(last_prefix_field)]
    fn teardown(&self, request: RStr<'_>, log: HostLoggerRef<'_>) -> RResult<RString, RString>;
}

/// An owned ABI 1 capability object.
pub type PluginCapabilityBox = PluginCapability_TO<'static, RBox<()>>;

/// A capability that answers every hook with an empty response.
#[derive(Debug)]
struct Old;

const EMPTY: &str = r#"{"v":1}"#;

impl PluginCapability for Old {
    fn name(&self) -> RString {
        RString::from("old-timer")
    }
    fn description(&self) -> RString {
        RString::from("Test plugin built for plugin ABI 1")
    }
    fn validate_options(&self, _options_json: RStr<'_>) -> RResult<(), RString> {
        RResult::ROk(())
    }
    fn prepare_host(&self, _: RStr<'_>, _: HostLoggerRef<'_>) -> RResult<RString, RString> {
        RResult::ROk(RString::from(EMPTY))
    }
    fn configure_machine(&self, _: RStr<'_>, _: HostLoggerRef<'_>) -> RResult<RString, RString> {
        RResult::ROk(RString::from(EMPTY))
    }
    fn guest_config(&self, _: RStr<'_>, _: HostLoggerRef<'_>) -> RResult<RString, RString> {
        RResult::ROk(RString::from(EMPTY))
    }
    fn post_start(&self, _: RStr<'_>, _: HostLoggerRef<'_>) -> RResult<RString, RString> {
        RResult::ROk(RString::from(EMPTY))
    }
    fn teardown(&self, _: RStr<'_>, _: HostLoggerRef<'_>) -> RResult<RString, RString> {
        RResult::ROk(RString::from(EMPTY))
    }
}

extern "C" fn new_capability() -> RResult<PluginCapabilityBox, RString> {
    RResult::ROk(PluginCapability_TO::from_value(Old, TD_Opaque))
}

/// The ABI 1 root module.
#[abi_stable::export_root_module]
pub fn banger_plugin_root_module() -> PluginModuleRef {
    PluginModule {
        abi_version: ABI_VERSION,
        new_capability,
    }
    .leak_into_prefix()
}
