//! `faulty`: a test plugin that fails or panics on request.
//!
//! Options: `fail=<hook>` makes that hook return an error, `panic=<hook>`
//! makes it panic, `hang=<hook>` makes it never return (the host's hook
//! timeout must cut it off). `host_op=<op>` makes PrepareHost send the raw
//! host request `{"v":1,"op":<op>,...}` with every `arg.<key>=<value>`
//! option as a field, and fail with the host's answer if it is refused.
//! `edit=yes` makes ConfigureMachine write what it saw (`vmm`, `machine`) to
//! `<vm_dir>/faulty.seen.json` and return a NIC (tap `bgp-faulty`), an
//! emulated `virtio-rng-pci`, `faulty=1` and the removal of `console`, and
//! GuestConfig return `FAULTY=1` and the boot command `true`.
//! PrepareHost writes `<vm_dir>/faulty.marker`, Teardown removes it, and
//! every hook first appends its name (teardown: `teardown <reason>`) to
//! `<vm_dir>/faulty.calls`, so tests see exactly what ran.

use std::fs::OpenOptions;
use std::io::Write;

use banger_plugin_abi::sdk::{
    GuestEdits, HookName, HookRequest, Host, MachineEdits, Manifest, NicEdit, Options,
    PciDeviceEdit, Plugin, PluginError, TeardownReason,
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
    fn enter(&self, req: &HookRequest, line: &str, log: &Host<'_>) -> Result<(), PluginError> {
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
        if req.options.get("hang").map(String::as_str) == Some(hook) {
            log.info(&format!("faulty: hanging in {hook}"));
            // Never returns; park() may wake spuriously, hence the loop.
            loop {
                std::thread::park();
            }
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
        "Test plugin: fails or panics in the hook named by fail=/panic=/hang="
    }

    /// Runs after the work disk when both are enabled (pins that a plugin's
    /// manifest reaches the host).
    fn manifest(&self) -> Manifest {
        Manifest {
            after: vec!["work-disk".into()],
            ..Manifest::default()
        }
    }

    fn validate_options(&self, options: &Options) -> Result<(), PluginError> {
        for (key, value) in options {
            match key.as_str() {
                "fail" | "panic" | "hang" if HOOKS.contains(&value.as_str()) => {}
                "host_op" | "edit" => {}
                k if k.starts_with("arg.") => {}
                "fail" | "panic" | "hang" => {
                    return Err(PluginError::new(format!(
                        "Option {key}={value} names no hook: use one of {}",
                        HOOKS.join(", ")
                    )));
                }
                _ => {
                    return Err(PluginError::new(format!(
                        "Unknown option {key:?}: faulty takes fail=<hook>, panic=<hook>, hang=<hook>, host_op=<op> and arg.<key>=<value>"
                    )));
                }
            }
        }
        Ok(())
    }

    fn prepare_host(&self, req: &HookRequest, log: &Host<'_>) -> Result<(), PluginError> {
        self.enter(req, HookName::PrepareHost.as_str(), log)?;
        if let Some(op) = req.options.get("host_op") {
            let mut call = serde_json::json!({"v": 1, "op": op});
            for (k, v) in &req.options {
                if let Some(field) = k.strip_prefix("arg.") {
                    call[field] = serde_json::Value::String(v.clone());
                }
            }
            let reply = log.request_json(&call.to_string())?;
            log.info(&format!("faulty: host answered {reply}"));
        }
        let marker = req.vm.vm_dir.join("faulty.marker");
        std::fs::write(&marker, b"prepared\n")
            .map_err(|e| PluginError::with(format!("Cannot write {}", marker.display()), &e))
    }

    fn configure_machine(
        &self,
        req: &HookRequest,
        log: &Host<'_>,
    ) -> Result<MachineEdits, PluginError> {
        self.enter(req, HookName::ConfigureMachine.as_str(), log)?;
        if !req.options.contains_key("edit") {
            return Ok(MachineEdits::default());
        }
        let seen = serde_json::json!({"vmm": req.vm.vmm, "machine": req.machine});
        let path = req.vm.vm_dir.join("faulty.seen.json");
        std::fs::write(&path, seen.to_string())
            .map_err(|e| PluginError::with(format!("Cannot write {}", path.display()), &e))?;
        Ok(MachineEdits {
            boot_args: vec!["faulty=1".into()],
            remove_boot_args: vec!["console".into()],
            nics: vec![NicEdit {
                id: "faulty".into(),
                tap: "bgp-faulty".into(),
                mac: "02:00:00:00:00:FA".into(),
            }],
            pci_devices: vec![PciDeviceEdit::Emulated {
                model: "virtio-rng-pci".into(),
            }],
            ..MachineEdits::default()
        })
    }

    fn guest_config(&self, req: &HookRequest, log: &Host<'_>) -> Result<GuestEdits, PluginError> {
        self.enter(req, HookName::GuestConfig.as_str(), log)?;
        if !req.options.contains_key("edit") {
            return Ok(GuestEdits::default());
        }
        Ok(GuestEdits {
            env: [("FAULTY".to_string(), "1".to_string())].into(),
            boot_commands: vec![vec!["true".into()]],
            ..GuestEdits::default()
        })
    }

    fn post_start(&self, req: &HookRequest, log: &Host<'_>) -> Result<(), PluginError> {
        self.enter(req, HookName::PostStart.as_str(), log)
    }

    fn teardown(
        &self,
        req: &HookRequest,
        reason: TeardownReason,
        log: &Host<'_>,
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
