//! `vfio-passthrough`: hands a host PCI device (a GPU, say) to a QEMU guest
//! with VFIO.
//!
//! Option `device=DDDD:BB:DD.F` (as `lspci -D` prints it).
//!
//! PrepareHost asks the daemon (the allowlisted `bind_vfio` host request) to
//! bind the device and the rest of its IOMMU group to `vfio-pci` (VFIO passes
//! a group whole); the daemon checks the group and refuses one with another
//! card the host is using. The plugin records what was bound, with each
//! device's original driver, in the VM directory. ConfigureMachine adds the
//! device to the machine, which makes the QEMU backend boot a PCIe machine.
//! Teardown gives every device back to its original driver (`rebind_driver`).
//! The plugin itself never writes to the host; see `docs/pci.md`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use banger_plugin_abi::sdk::{
    Backend, BoundDevice, HookRequest, Host, HostRequest, MachineEdits, Manifest, Options,
    PciAddress, PciDeviceEdit, Plugin, PluginError, TeardownReason,
};
use serde::{Deserialize, Serialize};

/// The record of what PrepareHost bound, inside the VM directory.
pub const STATE_FILE: &str = "vfio-passthrough.json";

/// The driver that hands devices to VFIO.
const VFIO_DRIVER: &str = "vfio-pci";

/// The vfio-passthrough capability.
#[derive(Debug, Default)]
pub struct VfioPassthrough;

/// Parses and checks the per-VM options: the device to pass through.
pub fn device(options: &Options) -> Result<PciAddress, PluginError> {
    if let Some(k) = options.keys().find(|k| *k != "device") {
        return Err(PluginError::new(format!(
            "Unknown option {k:?}: vfio-passthrough takes device=DDDD:BB:DD.F"
        )));
    }
    let device = options.get("device").ok_or_else(|| {
        PluginError::new(
            "Missing option device: use --cap vfio-passthrough:device=DDDD:BB:DD.F (the address lspci -D prints)",
        )
    })?;
    device
        .parse()
        .map_err(|e| PluginError::with("Option device", &e))
}

/// What PrepareHost bound, as the daemon answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    taken: Vec<BoundDevice>,
}

/// PrepareHost: asks the daemon to bind the device's group to vfio-pci and
/// records the answer in `vm_dir`. Already prepared (a record exists):
/// nothing to ask. A bind that fails is given back by the daemon.
fn prepare(
    device: &PciAddress,
    vm_dir: &Path,
    host: &Host<'_>,
) -> Result<Vec<BoundDevice>, PluginError> {
    let state_file = vm_dir.join(STATE_FILE);
    if let Some(state) = read_state(&state_file)? {
        return Ok(state.taken);
    }
    let reply = host.request(HostRequest::BindVfio {
        address: device.clone(),
    })?;
    let state = State { taken: reply.bound };
    if let Err(e) = write_state(&state_file, &state) {
        // Without the record Teardown could not give them back: do it now.
        let undo = give_back(&state.taken, host)
            .err()
            .map(|u| format!(" (and giving the devices back failed too: {})", u.error));
        return Err(PluginError::new(format!("{e}{}", undo.unwrap_or_default())));
    }
    Ok(state.taken)
}

/// Devices [`give_back`] could not give back, and why.
struct NotGivenBack {
    left: Vec<BoundDevice>,
    error: PluginError,
}

/// Gives every device back to its original driver, last first; tries them
/// all and reports the ones that failed. A device that was already on
/// vfio-pci stays there.
fn give_back(taken: &[BoundDevice], host: &Host<'_>) -> Result<(), NotGivenBack> {
    let mut left = Vec::new();
    let mut failed = Vec::new();
    for t in taken.iter().rev() {
        if t.previous_driver.as_deref() == Some(VFIO_DRIVER) {
            continue;
        }
        let request = HostRequest::RebindDriver {
            address: t.address.clone(),
            driver: t.previous_driver.clone(),
        };
        if let Err(e) = host.request(request) {
            failed.push(format!("{}: {e}", t.address));
            left.insert(0, t.clone());
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(NotGivenBack {
        left,
        error: PluginError::new(format!(
            "Cannot give PCI devices back to their drivers: {}",
            failed.join("; ")
        )),
    })
}

/// Teardown: gives the recorded devices back and removes the record. When
/// some could not be given back, the record keeps just those, so the next
/// teardown retries them (the daemon has forgotten the others).
fn teardown(vm_dir: &Path, host: &Host<'_>) -> Result<Vec<BoundDevice>, PluginError> {
    let state_file = vm_dir.join(STATE_FILE);
    let Some(state) = read_state(&state_file)? else {
        return Ok(Vec::new());
    };
    if let Err(u) = give_back(&state.taken, host) {
        let kept = write_state(&state_file, &State { taken: u.left });
        return Err(match kept {
            Ok(()) => u.error,
            Err(e) => PluginError::new(format!("{} ({e})", u.error)),
        });
    }
    match fs::remove_file(&state_file) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PluginError::with(
            format!("Cannot remove {}", state_file.display()),
            &e,
        )),
        _ => Ok(state.taken),
    }
}

fn read_state(path: &Path) -> Result<Option<State>, PluginError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            PluginError::with(
                format!(
                    "{} is corrupt; check which devices are bound to {VFIO_DRIVER} (lspci -k), rebind them and delete it",
                    path.display()
                ),
                &e,
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PluginError::with(
            format!("Cannot read {}", path.display()),
            &e,
        )),
    }
}

/// Stages the record next to its place and renames it in.
fn write_state(path: &Path, state: &State) -> Result<(), PluginError> {
    let staged = PathBuf::from(format!("{}.tmp", path.display()));
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| PluginError::with("Cannot encode the binding record", &e))?;
    fs::write(&staged, json)
        .and_then(|()| fs::rename(&staged, path))
        .map_err(|e| {
            let _ = fs::remove_file(&staged);
            PluginError::with(format!("Cannot write {}", path.display()), &e)
        })
}

fn describe(taken: &[BoundDevice]) -> String {
    taken
        .iter()
        .map(|t| {
            format!(
                "{} (was {})",
                t.address,
                t.previous_driver.as_deref().unwrap_or("unbound")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Plugin for VfioPassthrough {
    fn name(&self) -> &str {
        "vfio-passthrough"
    }

    fn description(&self) -> &str {
        "Pass a host PCI device through to a QEMU guest with VFIO (device=DDDD:BB:DD.F)"
    }

    fn manifest(&self) -> Manifest {
        // Firecracker has no PCI bus: refuse the VM at create time.
        Manifest {
            backends: vec![Backend::Qemu],
            ..Manifest::default()
        }
    }

    fn validate_options(&self, options: &Options) -> Result<(), PluginError> {
        device(options).map(|_| ())
    }

    fn prepare_host(&self, req: &HookRequest, host: &Host<'_>) -> Result<(), PluginError> {
        let device = device(&req.options)?;
        let taken = prepare(&device, &req.vm.vm_dir, host)?;
        host.info(&format!("bound to {VFIO_DRIVER}: {}", describe(&taken)));
        Ok(())
    }

    fn configure_machine(
        &self,
        req: &HookRequest,
        _host: &Host<'_>,
    ) -> Result<MachineEdits, PluginError> {
        Ok(MachineEdits {
            pci_devices: vec![PciDeviceEdit::Vfio {
                address: device(&req.options)?,
            }],
            ..MachineEdits::default()
        })
    }

    fn teardown(
        &self,
        req: &HookRequest,
        _reason: TeardownReason,
        host: &Host<'_>,
    ) -> Result<(), PluginError> {
        // Every reason gives the devices back: the host may need them
        // between runs, and the next start binds them again.
        let taken = teardown(&req.vm.vm_dir, host)?;
        if !taken.is_empty() {
            host.info(&format!("given back: {}", describe(&taken)));
        }
        Ok(())
    }
}

banger_plugin_abi::export_plugin!(VfioPassthrough);

#[cfg(test)]
mod tests {
    use super::*;

    // Binding and giving back run through the daemon's host operations:
    // tested against a fake sysfs tree in `core/src/hostops/vfio.rs`, and
    // end to end through the plugin host in `tests/tests/pci.rs`.

    #[test]
    fn options_name_the_bad_value_and_the_fix() {
        let opts = |pairs: &[(&str, &str)]| -> Options {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p = VfioPassthrough;
        assert!(
            p.validate_options(&opts(&[("device", "0000:01:00.0")]))
                .is_ok()
        );
        for (o, needle) in [
            (opts(&[]), "Missing option device"),
            (opts(&[("device", "01:00.0")]), "is not a PCI address"),
            (
                opts(&[("device", "0000:01:00.0/../x")]),
                "is not a PCI address",
            ),
            (
                opts(&[("device", "0000:01:00.0"), ("sysfs", "/sys")]),
                "Unknown option \"sysfs\"",
            ),
            (
                opts(&[("device", "0000:01:00.0"), ("group", "all")]),
                "Unknown option \"group\"",
            ),
        ] {
            let err = p.validate_options(&o).unwrap_err();
            assert!(err.message().contains(needle), "{o:?}: {err}");
        }
    }
}
