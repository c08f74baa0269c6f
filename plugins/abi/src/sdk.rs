//! The plugin author's side: implement [`Plugin`] with typed inputs and
//! outputs, then call [`export_plugin!`](crate::export_plugin) once.
//!
//! ```ignore
//! #[derive(Default)]
//! struct Hello;
//! impl banger_plugin_abi::sdk::Plugin for Hello {
//!     fn name(&self) -> &str { "hello" }
//!     fn description(&self) -> &str { "Says hello at boot" }
//!     fn post_start(&self, req: &HookRequest, host: &Host<'_>) -> Result<(), PluginError> {
//!         host.info(&format!("hello, {}", req.vm.name));
//!         Ok(())
//!     }
//! }
//! banger_plugin_abi::export_plugin!(Hello);
//! ```
//!
//! The glue catches panics in every hook and turns them into errors
//! ("plugin NAME panicked in HOOK: msg"): a panic must never unwind across
//! the FFI boundary (it would abort the daemon).

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString};

use crate::wire::{self, HookResponse, HostCall, WIRE_VERSION};
pub use crate::wire::{
    Backend, BadPciAddress, BoundDevice, DriveEdit, FileEdit, GuestEdits, HookName, HookRequest,
    HostReply, HostRequest, MachineEdits, MachineView, Manifest, MountEdit, NicEdit, Options,
    PciAddress, PciDeviceEdit, TeardownReason, VmInfo,
};
use crate::{
    HostCallbacksRef, PluginCapability, PluginCapability_TO, PluginCapabilityBox, PluginModule,
    PluginModuleRef,
};

/// The host's services for the current hook call: log lines and the
/// allowlisted privileged requests.
pub struct Host<'a> {
    host: HostCallbacksRef<'a>,
}

impl fmt::Debug for Host<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Host")
    }
}

impl Host<'_> {
    /// One informational line for the user.
    pub fn info(&self, msg: &str) {
        self.host.info(RStr::from_str(msg));
    }

    /// A warning for the user.
    pub fn warn(&self, msg: &str) {
        self.host.warn(RStr::from_str(msg));
    }

    /// Asks the host for one privileged operation from the allowlist
    /// ([`HostRequest`]). The error says why it was refused or failed.
    pub fn request(&self, request: HostRequest) -> Result<HostReply, PluginError> {
        let op = request.op();
        let call = HostCall {
            v: WIRE_VERSION,
            request,
        };
        let json = wire::encode("host request", &call)?;
        let reply = self
            .request_json(&json)
            .map_err(|e| PluginError::new(format!("host request {op}: {e}")))?;
        Ok(wire::decode("host reply", &reply)?)
    }

    /// The untyped form of [`Host::request`]: sends `json` as it is and
    /// returns the host's JSON answer. For requests newer than this SDK.
    pub fn request_json(&self, json: &str) -> Result<String, PluginError> {
        match self.host.host_request(RStr::from_str(json)) {
            RResult::ROk(reply) => Ok(reply.into_string()),
            RResult::RErr(msg) => Err(PluginError::new(msg.into_string())),
        }
    }
}

/// A hook failure: a message for the user. Converts from any error with `?`
/// (the whole source chain is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError(String);

impl PluginError {
    /// A failure described by `msg`.
    pub fn new(msg: impl Into<String>) -> Self {
        PluginError(msg.into())
    }

    /// A failure while doing `msg`, caused by `err` (rendered with its chain).
    pub fn with(msg: impl fmt::Display, err: &(dyn std::error::Error + 'static)) -> Self {
        PluginError(format!("{msg}: {}", chain(err)))
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error + 'static> From<E> for PluginError {
    fn from(err: E) -> Self {
        PluginError(chain(&err))
    }
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// A banger capability implemented as a plugin. Every hook defaults to a
/// no-op. Hooks should be idempotent where they can be: start after stop
/// runs them again. `Default` builds the instance the daemon uses for every
/// VM, so keep per-VM state in `req.vm.vm_dir`, not in `self`.
pub trait Plugin: Send + Sync + Default + 'static {
    /// Unique capability name (lowercase letters, digits, `-`), used with `--cap`.
    fn name(&self) -> &str;

    /// One line for `banger cap list`.
    fn description(&self) -> &str;

    /// What this capability needs from the others and which backends it
    /// supports; read once when the daemon loads the plugin.
    fn manifest(&self) -> Manifest {
        Manifest::default()
    }

    /// Checks per-VM options at VM creation; say which option is wrong and how to fix it.
    fn validate_options(&self, _options: &Options) -> Result<(), PluginError> {
        Ok(())
    }

    /// Sets up host resources (files under `req.vm.vm_dir`, ...).
    fn prepare_host(&self, _req: &HookRequest, _host: &Host<'_>) -> Result<(), PluginError> {
        Ok(())
    }

    /// Returns edits to the machine: drives, NICs, PCI devices, boot
    /// arguments to add or remove. `req.machine` shows the machine so far.
    fn configure_machine(
        &self,
        _req: &HookRequest,
        _host: &Host<'_>,
    ) -> Result<MachineEdits, PluginError> {
        Ok(MachineEdits::default())
    }

    /// Returns mounts, files, environment and boot commands for the guest.
    fn guest_config(
        &self,
        _req: &HookRequest,
        _host: &Host<'_>,
    ) -> Result<GuestEdits, PluginError> {
        Ok(GuestEdits::default())
    }

    /// Runs once the guest is up.
    fn post_start(&self, _req: &HookRequest, _host: &Host<'_>) -> Result<(), PluginError> {
        Ok(())
    }

    /// Undoes `prepare_host`; must tolerate resources that are already gone.
    fn teardown(
        &self,
        _req: &HookRequest,
        _reason: TeardownReason,
        _host: &Host<'_>,
    ) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Exports `$ty` (a [`Plugin`](crate::sdk::Plugin) + `Default`) as this
/// cdylib's banger root module. Use it exactly once per plugin crate; the
/// crate must also depend on `abi_stable` (the export attribute refers to it).
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        $crate::export_plugin!(@with_abi $ty, $crate::ABI_VERSION);
    };
    // Only for testing the daemon's refusal of foreign ABI versions.
    (@with_abi $ty:ty, $abi:expr) => {
        /// The banger plugin root module.
        #[::abi_stable::export_root_module]
        pub fn banger_plugin_root_module() -> $crate::PluginModuleRef {
            $crate::sdk::__root_module::<$ty>($abi)
        }
    };
    // Only for testing the daemon's refusal of foreign wire versions: the
    // manifest claims wire version `$wire`.
    (@with_wire $ty:ty, $wire:expr) => {
        /// The banger plugin root module.
        #[::abi_stable::export_root_module]
        pub fn banger_plugin_root_module() -> $crate::PluginModuleRef {
            $crate::sdk::__root_module_claiming::<$ty, { $wire }>($crate::ABI_VERSION)
        }
    };
}

#[doc(hidden)]
pub fn __root_module<T: Plugin>(abi_version: u32) -> PluginModuleRef {
    __root_module_claiming::<T, WIRE_VERSION>(abi_version)
}

#[doc(hidden)]
pub fn __root_module_claiming<T: Plugin, const WIRE: u32>(abi_version: u32) -> PluginModuleRef {
    PluginModule {
        abi_version,
        new_capability: new_capability_claiming::<T, WIRE>,
        #[cfg(feature = "next-minor-test")]
        next_minor_probe,
    }
    .leak_into_prefix()
}

#[cfg(feature = "next-minor-test")]
extern "C" fn next_minor_probe() -> u32 {
    21
}

/// Builds the capability object for `T`; what the root module hands out.
/// Public so the glue can be exercised without loading a library.
pub extern "C" fn new_capability<T: Plugin>() -> RResult<PluginCapabilityBox, RString> {
    new_capability_claiming::<T, WIRE_VERSION>()
}

/// [`new_capability`] with a manifest that says the plugin speaks wire
/// version `WIRE` (tests of foreign versions only).
extern "C" fn new_capability_claiming<T: Plugin, const WIRE: u32>()
-> RResult<PluginCapabilityBox, RString> {
    let made = catch_unwind(|| {
        let plugin = T::default();
        let name = plugin.name().to_string();
        let description = plugin.description().to_string();
        let message = wire::ManifestMessage {
            v: Some(WIRE),
            manifest: plugin.manifest(),
        };
        let manifest = wire::encode("manifest", &message);
        manifest.map(|manifest| Glue {
            plugin,
            name,
            description,
            manifest,
        })
    });
    match made {
        Ok(Ok(glue)) => RResult::ROk(PluginCapability_TO::from_value(glue, TD_Opaque)),
        Ok(Err(e)) => RResult::RErr(RString::from(format!(
            "plugin {}: {}",
            std::any::type_name::<T>(),
            chain(&e)
        ))),
        Err(payload) => RResult::RErr(RString::from(format!(
            "plugin {} panicked while starting: {}",
            std::any::type_name::<T>(),
            panic_message(&*payload)
        ))),
    }
}

struct Glue<T> {
    plugin: T,
    name: String,
    description: String,
    /// The manifest as JSON, encoded once.
    manifest: String,
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl<T: Plugin> Glue<T> {
    /// Runs `f` with panics caught and turned into the conventional message.
    fn guarded<R>(&self, hook: &str, f: impl FnOnce() -> Result<R, String>) -> RResult<R, RString> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => RResult::ROk(v),
            Ok(Err(msg)) => RResult::RErr(RString::from(msg)),
            Err(payload) => RResult::RErr(RString::from(format!(
                "plugin {} panicked in {hook}: {}",
                self.name,
                panic_message(&*payload)
            ))),
        }
    }

    fn hook(
        &self,
        expected: HookName,
        request: RStr<'_>,
        log: HostCallbacksRef<'_>,
        run: impl FnOnce(&T, &HookRequest, &Host<'_>) -> Result<HookResponse, PluginError>,
    ) -> RResult<RString, RString> {
        self.guarded(expected.as_str(), || {
            let req: HookRequest =
                wire::decode("hook request", request.as_str()).map_err(|e| chain(&e))?;
            if req.hook != expected {
                return Err(format!(
                    "hook request names {} but was sent to {}",
                    req.hook.as_str(),
                    expected.as_str()
                ));
            }
            let host = Host { host: log };
            let resp = run(&self.plugin, &req, &host).map_err(|e| e.0)?;
            wire::encode("hook response", &resp)
                .map(RString::from)
                .map_err(|e| chain(&e))
        })
    }
}

impl<T: Plugin> PluginCapability for Glue<T> {
    fn name(&self) -> RString {
        RString::from(self.name.as_str())
    }

    fn description(&self) -> RString {
        RString::from(self.description.as_str())
    }

    fn manifest(&self) -> RString {
        RString::from(self.manifest.as_str())
    }

    fn validate_options(&self, options_json: RStr<'_>) -> RResult<(), RString> {
        self.guarded("validate_options", || {
            let options: Options = serde_json::from_str(options_json.as_str())
                .map_err(|e| format!("malformed options JSON: {e}"))?;
            self.plugin.validate_options(&options).map_err(|e| e.0)
        })
    }

    fn prepare_host(
        &self,
        request: RStr<'_>,
        log: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString> {
        self.hook(HookName::PrepareHost, request, log, |p, req, log| {
            p.prepare_host(req, log).map(|()| HookResponse::default())
        })
    }

    fn configure_machine(
        &self,
        request: RStr<'_>,
        log: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString> {
        self.hook(HookName::ConfigureMachine, request, log, |p, req, log| {
            p.configure_machine(req, log).map(|machine| HookResponse {
                machine,
                ..HookResponse::default()
            })
        })
    }

    fn guest_config(
        &self,
        request: RStr<'_>,
        log: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString> {
        self.hook(HookName::GuestConfig, request, log, |p, req, log| {
            p.guest_config(req, log).map(|guest| HookResponse {
                guest,
                ..HookResponse::default()
            })
        })
    }

    fn post_start(
        &self,
        request: RStr<'_>,
        log: HostCallbacksRef<'_>,
    ) -> RResult<RString, RString> {
        self.hook(HookName::PostStart, request, log, |p, req, log| {
            p.post_start(req, log).map(|()| HookResponse::default())
        })
    }

    fn teardown(&self, request: RStr<'_>, log: HostCallbacksRef<'_>) -> RResult<RString, RString> {
        self.hook(HookName::Teardown, request, log, |p, req, log| {
            let reason = req
                .teardown_reason
                .ok_or_else(|| PluginError::new("teardown request has no teardown_reason"))?;
            p.teardown(req, reason, log)
                .map(|()| HookResponse::default())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use abi_stable::std_types::RResult::{RErr, ROk};

    use super::*;
    use crate::wire::{VmInfo, WIRE_VERSION};
    use crate::{HostCallbacks, HostCallbacks_TO};

    #[derive(Default)]
    struct Sample;

    impl Plugin for Sample {
        fn name(&self) -> &str {
            "sample"
        }
        fn description(&self) -> &str {
            "A sample"
        }
        fn manifest(&self) -> Manifest {
            Manifest {
                requires: vec!["network".into()],
                backends: vec![Backend::Qemu],
                ..Manifest::default()
            }
        }
        fn validate_options(&self, options: &Options) -> Result<(), PluginError> {
            if options.contains_key("bad") {
                return Err(PluginError::new("option bad is not allowed"));
            }
            Ok(())
        }
        fn prepare_host(&self, req: &HookRequest, host: &Host<'_>) -> Result<(), PluginError> {
            host.info(&format!("preparing {}", req.vm.name));
            host.warn("careful");
            if let Some(address) = req.options.get("vfio") {
                let reply = host.request(HostRequest::BindVfio {
                    address: address.parse()?,
                })?;
                host.info(&format!("was {:?}", reply.previous_driver));
            }
            if req.options.contains_key("panic") {
                panic!("boom {}", 7);
            }
            if req.options.contains_key("io") {
                std::fs::read("/nonexistent/banger-sdk-test")?;
            }
            Ok(())
        }
        fn configure_machine(
            &self,
            _req: &HookRequest,
            _host: &Host<'_>,
        ) -> Result<MachineEdits, PluginError> {
            Ok(MachineEdits {
                boot_args: vec!["sample=1".into()],
                ..MachineEdits::default()
            })
        }
        fn teardown(
            &self,
            _req: &HookRequest,
            reason: TeardownReason,
            host: &Host<'_>,
        ) -> Result<(), PluginError> {
            host.info(&format!("teardown {}", reason.as_str()));
            Ok(())
        }
    }

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    /// Logs lines; answers bind_vfio for 0000:01:00.0 and refuses the rest.
    impl HostCallbacks for Lines {
        fn info(&self, msg: RStr<'_>) {
            self.0.lock().unwrap().push(format!("info {msg}"));
        }
        fn warn(&self, msg: RStr<'_>) {
            self.0.lock().unwrap().push(format!("warn {msg}"));
        }
        fn host_request(&self, request: RStr<'_>) -> RResult<RString, RString> {
            self.0.lock().unwrap().push(format!("request {request}"));
            let call: HostCall = wire::decode("host call", request.as_str()).unwrap();
            match call.request {
                HostRequest::BindVfio { address } if address.as_str() == "0000:01:00.0" => {
                    ROk(RString::from(r#"{"v":1,"previous_driver":"nvidia"}"#))
                }
                other => RErr(RString::from(format!("{} refused", other.op()))),
            }
        }
    }

    fn request(hook: HookName, options: &[&str]) -> String {
        let req = HookRequest {
            v: WIRE_VERSION,
            hook,
            vm: VmInfo {
                id: "id".into(),
                name: "dev".into(),
                vcpus: 1,
                memory_mib: 256,
                vm_dir: "/tmp/x".into(),
                booted_once: false,
                vmm: None,
            },
            options: options
                .iter()
                .map(|k| (k.to_string(), String::new()))
                .collect(),
            teardown_reason: (hook == HookName::Teardown).then_some(TeardownReason::Delete),
            machine: None,
        };
        serde_json::to_string(&req).unwrap()
    }

    fn cap() -> PluginCapabilityBox {
        match new_capability::<Sample>() {
            ROk(c) => c,
            RErr(e) => panic!("{e}"),
        }
    }

    #[test]
    fn hooks_log_through_the_host_and_return_edits() {
        let cap = cap();
        assert_eq!(cap.name().as_str(), "sample");
        assert_eq!(cap.description().as_str(), "A sample");
        let lines = Lines::default();
        let log = HostCallbacks_TO::from_ptr(&lines, TD_Opaque);
        let out = cap.prepare_host(
            RStr::from_str(&request(HookName::PrepareHost, &[])),
            log.sabi_reborrow(),
        );
        assert!(out.is_ok(), "{out:?}");
        let out = cap
            .configure_machine(
                RStr::from_str(&request(HookName::ConfigureMachine, &[])),
                log.sabi_reborrow(),
            )
            .unwrap();
        let resp: HookResponse = wire::decode("r", out.as_str()).unwrap();
        assert_eq!(resp.machine.boot_args, vec!["sample=1".to_string()]);
        cap.teardown(
            RStr::from_str(&request(HookName::Teardown, &[])),
            log.sabi_reborrow(),
        )
        .unwrap();
        assert_eq!(
            *lines.0.lock().unwrap(),
            vec!["info preparing dev", "warn careful", "info teardown delete"]
        );
    }

    #[test]
    fn manifest_crosses_as_json() {
        let json = cap().manifest();
        let msg: wire::ManifestMessage = serde_json::from_str(json.as_str()).unwrap();
        assert_eq!(msg.v, Some(WIRE_VERSION), "{json}");
        // An older SDK's manifest had no "v": it spoke version 1.
        let old: wire::ManifestMessage = serde_json::from_str(r#"{"requires":["x"]}"#).unwrap();
        assert_eq!(
            (old.wire_version(), old.manifest.requires),
            (1, vec!["x".to_string()])
        );
        let m: Manifest = serde_json::from_str(json.as_str()).unwrap();
        assert_eq!(m.requires, ["network"]);
        assert!(m.after.is_empty());
        assert_eq!(m.backends, [Backend::Qemu]);
    }

    #[test]
    fn host_requests_cross_as_json_and_refusals_come_back_as_errors() {
        let cap = cap();
        let lines = Lines::default();
        let log = HostCallbacks_TO::from_ptr(&lines, TD_Opaque);
        let req = |opts: &[(&str, &str)]| {
            let mut r: HookRequest =
                serde_json::from_str(&request(HookName::PrepareHost, &[])).unwrap();
            r.options = opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            serde_json::to_string(&r).unwrap()
        };
        cap.prepare_host(
            RStr::from_str(&req(&[("vfio", "0000:01:00.0")])),
            log.sabi_reborrow(),
        )
        .unwrap();
        assert_eq!(
            lines.0.lock().unwrap()[2..],
            [
                r#"request {"v":1,"op":"bind_vfio","address":"0000:01:00.0"}"#.to_string(),
                r#"info was Some("nvidia")"#.to_string(),
            ]
        );
        let err = cap
            .prepare_host(
                RStr::from_str(&req(&[("vfio", "0000:02:00.0")])),
                log.sabi_reborrow(),
            )
            .unwrap_err();
        assert_eq!(err.as_str(), "host request bind_vfio: bind_vfio refused");
        let err = cap
            .prepare_host(RStr::from_str(&req(&[("vfio", "02:00.0")])), log)
            .unwrap_err();
        assert!(err.as_str().contains("not a PCI address"), "{err}");
    }

    #[test]
    fn a_panicking_hook_becomes_an_error_naming_plugin_and_hook() {
        let cap = cap();
        let lines = Lines::default();
        let log = HostCallbacks_TO::from_ptr(&lines, TD_Opaque);
        let err = cap
            .prepare_host(
                RStr::from_str(&request(HookName::PrepareHost, &["panic"])),
                log,
            )
            .unwrap_err();
        assert_eq!(
            err.as_str(),
            "plugin sample panicked in prepare_host: boom 7"
        );
    }

    #[test]
    fn errors_keep_their_message_and_chain() {
        let cap = cap();
        let lines = Lines::default();
        let log = HostCallbacks_TO::from_ptr(&lines, TD_Opaque);
        let err = cap
            .prepare_host(
                RStr::from_str(&request(HookName::PrepareHost, &["io"])),
                log.sabi_reborrow(),
            )
            .unwrap_err();
        assert!(err.as_str().contains("No such file"), "{err}");
        let err = cap
            .validate_options(RStr::from_str(r#"{"bad":"1"}"#))
            .unwrap_err();
        assert_eq!(err.as_str(), "option bad is not allowed");
        assert!(cap.validate_options(RStr::from_str("{}")).is_ok());
    }

    #[test]
    fn malformed_or_misrouted_requests_are_errors_not_panics() {
        let cap = cap();
        let lines = Lines::default();
        let log = HostCallbacks_TO::from_ptr(&lines, TD_Opaque);
        let err = cap
            .post_start(RStr::from_str("{nope"), log.sabi_reborrow())
            .unwrap_err();
        assert!(
            err.as_str().starts_with("Malformed hook request JSON"),
            "{err}"
        );
        let err = cap
            .post_start(
                RStr::from_str(&request(HookName::PrepareHost, &[])),
                log.sabi_reborrow(),
            )
            .unwrap_err();
        assert!(err.as_str().contains("sent to post_start"), "{err}");
        assert!(lines.0.lock().unwrap().is_empty());
    }
}
