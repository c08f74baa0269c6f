//! `faulty`: a test plugin that fails or panics on request.
//!
//! Options: `fail=<hook>` makes that hook return an error, `panic=<hook>`
//! makes it panic. PrepareHost writes `<vm_dir>/faulty.marker`, Teardown
//! removes it, and every hook first appends its name (teardown: `teardown
//! <reason>`) to `<vm_dir>/faulty.calls`, so tests see exactly what ran.

use std::fs::OpenOptions;
use std::io::Write;

use banger_plugin_abi::sdk::{
    GuestEdits, HookName, HookRequest, Log, MachineEdits, Options, Plugin, PluginError,
    TeardownReason,
};

const HOOKS: [&str; 5] = [
    "prepare_host",
    "configure_machine",
    "guest_config",
    "post_start",
    "teardown",
];

/// The faulty test capability.
#[derive(Debug, Default)]
pub struct Faulty;

impl Faulty {
    /// Records the call, then fails or panics when the options ask for it.
    fn enter(&self, req: &HookRequest, line: &str, log: &Log<'_>) -> Result<(), PluginError> {
        let calls = req.vm.vm_dir.join("faulty.calls");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&calls)
            .map_err(|e| PluginError::with(format!("Cannot open {}", calls.display()), &e))?;
        writeln!(f, "{line}")
            .map_err(|e| PluginError::with(format!("Cannot write {}", calls.display()), &e))?;
        let hook = req.hook.as_str();
        log.info(&format!("faulty: {hook}"));
        if req.options.get("panic").map(String::as_str) == Some(hook) {
            panic!("asked to panic in {hook}");
        }
        if req.options.get("fail").map(String::as_str) == Some(hook) {
            return Err(PluginError::new(format!("asked to fail in {hook}")));
        }
        Ok(())
    }
}

impl Plugin for Faulty {
    fn name(&self) -> &str {
        "faulty"
    }

    fn description(&self) -> &str {
        "Test plugin: fails or panics in the hook named by fail=/panic="
    }

    fn validate_options(&self, options: &Options) -> Result<(), PluginError> {
        for (key, value) in options {
            match key.as_str() {
                "fail" | "panic" if HOOKS.contains(&value.as_str()) => {}
                "fail" | "panic" => {
                    return Err(PluginError::new(format!(
                        "Option {key}={value} names no hook: use one of {}",
                        HOOKS.join(", ")
                    )));
                }
                _ => {
                    return Err(PluginError::new(format!(
                        "Unknown option {key:?}: faulty takes fail=<hook> and panic=<hook>"
                    )));
                }
            }
        }
        Ok(())
    }

    fn prepare_host(&self, req: &HookRequest, log: &Log<'_>) -> Result<(), PluginError> {
        self.enter(req, HookName::PrepareHost.as_str(), log)?;
        let marker = req.vm.vm_dir.join("faulty.marker");
        std::fs::write(&marker, b"prepared\n")
            .map_err(|e| PluginError::with(format!("Cannot write {}", marker.display()), &e))
    }

    fn configure_machine(
        &self,
        req: &HookRequest,
        log: &Log<'_>,
    ) -> Result<MachineEdits, PluginError> {
        self.enter(req, HookName::ConfigureMachine.as_str(), log)?;
        Ok(MachineEdits::default())
    }

    fn guest_config(&self, req: &HookRequest, log: &Log<'_>) -> Result<GuestEdits, PluginError> {
        self.enter(req, HookName::GuestConfig.as_str(), log)?;
        Ok(GuestEdits::default())
    }

    fn post_start(&self, req: &HookRequest, log: &Log<'_>) -> Result<(), PluginError> {
        self.enter(req, HookName::PostStart.as_str(), log)
    }

    fn teardown(
        &self,
        req: &HookRequest,
        reason: TeardownReason,
        log: &Log<'_>,
    ) -> Result<(), PluginError> {
        self.enter(req, &format!("teardown {}", reason.as_str()), log)?;
        let marker = req.vm.vm_dir.join("faulty.marker");
        match std::fs::remove_file(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PluginError::with(
                format!("Cannot remove {}", marker.display()),
                &e,
            )),
            _ => Ok(()),
        }
    }
}

banger_plugin_abi::export_plugin!(Faulty);
