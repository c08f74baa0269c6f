//! `vfio-passthrough`: hands a host PCI device (a GPU, say) to a QEMU guest
//! with VFIO.
//!
//! Option `device=DDDD:BB:DD.F` (as `lspci -D` prints it); `sysfs=/abs/path`
//! points at another sysfs root (tests use a fake tree; default `/sys`).
//!
//! PrepareHost checks the device's IOMMU group and binds the device and the
//! rest of its group to `vfio-pci` (VFIO passes a group whole), recording
//! each device's original driver in the VM directory. ConfigureMachine adds
//! the device to the machine, which makes the QEMU backend boot a PCIe
//! machine. Teardown gives every device back to its original driver. A group
//! member that belongs to another card the host is using is never taken.
//! Needs root (sysfs writes) and the `vfio-pci` module; see `docs/pci.md`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use banger_plugin_abi::sdk::{
    Backend, HookRequest, Host, MachineEdits, Manifest, Options, PciAddress, PciDeviceEdit, Plugin,
    PluginError, TeardownReason,
};
use serde::{Deserialize, Serialize};

#[cfg(any(test, feature = "fake-sysfs"))]
pub mod fake_sysfs;
pub mod sysfs;

use sysfs::{IommuGroup, Member, PciSysfs, VFIO_DRIVER};

/// The record of what PrepareHost bound, inside the VM directory.
pub const STATE_FILE: &str = "vfio-passthrough.json";

/// The vfio-passthrough capability.
#[derive(Debug, Default)]
pub struct VfioPassthrough;

/// The parsed options.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The device to pass through.
    pub device: PciAddress,
    /// Where sysfs is.
    pub sysfs: PciSysfs,
}

/// Parses and checks the per-VM options.
pub fn settings(options: &Options) -> Result<Settings, PluginError> {
    if let Some(k) = options.keys().find(|k| *k != "device" && *k != "sysfs") {
        return Err(PluginError::new(format!(
            "Unknown option {k:?}: vfio-passthrough takes device=DDDD:BB:DD.F (and sysfs=/abs/path for tests)"
        )));
    }
    let device = options.get("device").ok_or_else(|| {
        PluginError::new(
            "Missing option device: use --cap vfio-passthrough:device=DDDD:BB:DD.F (the address lspci -D prints)",
        )
    })?;
    let device = device
        .parse()
        .map_err(|e| PluginError::with("Option device", &e))?;
    let root = options.get("sysfs").map_or("/sys", String::as_str);
    if !Path::new(root).is_absolute() {
        return Err(PluginError::new(format!(
            "Option sysfs={root:?} must be an absolute path (default /sys)"
        )));
    }
    Ok(Settings {
        device,
        sysfs: PciSysfs::new(root),
    })
}

/// One device PrepareHost took, with the driver to give it back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// The device.
    pub address: PciAddress,
    /// Its driver before; `None` if it had none.
    pub driver: Option<String>,
}

/// What PrepareHost bound, written before the first bind so a crash halfway
/// still knows what to give back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    taken: Vec<Taken>,
}

/// Same domain, bus and device: another function of the same card (a GPU's
/// audio function), which can only go with it.
fn same_slot(a: &PciAddress, b: &PciAddress) -> bool {
    a.as_str().split('.').next() == b.as_str().split('.').next()
}

/// The group members to bind to vfio-pci: the device, the other functions
/// of its card and members no host driver holds. Bridges stay with the
/// host; another card a host driver holds refuses the whole plan.
pub fn plan(device: &PciAddress, group: &IommuGroup) -> Result<Vec<Member>, PluginError> {
    let mut take = Vec::new();
    for m in &group.members {
        let free = m.driver.is_none() || m.driver.as_deref() == Some(VFIO_DRIVER);
        if m.bridge && &m.address != device {
            continue;
        }
        if &m.address == device || free || same_slot(&m.address, device) {
            take.push(m.clone());
            continue;
        }
        return Err(PluginError::new(format!(
            "Cannot pass through {device}: {} (driver {}) shares IOMMU group {} with it and belongs to another device the host is using; banger will not take it. Put the card in a slot with its own IOMMU group, or unbind {} from {} yourself if the host can spare it",
            m.address,
            m.driver.as_deref().unwrap_or("none"),
            group.id,
            m.address,
            m.driver.as_deref().unwrap_or("none"),
        )));
    }
    Ok(take)
}

/// PrepareHost: binds the device's group to vfio-pci, recording the
/// original drivers in `vm_dir`. Already prepared (a record exists): nothing
/// to do. On failure, what was bound is given back.
pub fn prepare(s: &Settings, vm_dir: &Path) -> Result<Vec<Taken>, PluginError> {
    let state_file = vm_dir.join(STATE_FILE);
    if let Some(state) = read_state(&state_file)? {
        return Ok(state.taken);
    }
    let group = s.sysfs.iommu_group(&s.device)?;
    let taken: Vec<Taken> = plan(&s.device, &group)?
        .into_iter()
        .map(|m| Taken {
            address: m.address,
            driver: m.driver,
        })
        .collect();
    write_state(
        &state_file,
        &State {
            taken: taken.clone(),
        },
    )?;
    for (i, t) in taken.iter().enumerate() {
        if t.driver.as_deref() == Some(VFIO_DRIVER) {
            continue;
        }
        if let Err(e) = s.sysfs.bind_vfio(&t.address, t.driver.as_deref()) {
            // Give back this one (it may be half moved) and those before it.
            let undo = give_back(&s.sysfs, &taken[..=i]);
            let _ = fs::remove_file(&state_file);
            let mut msg = format!("Cannot bind {} to {VFIO_DRIVER}", t.address);
            if let Err(u) = undo {
                msg.push_str(&format!(" (and giving devices back failed too: {u})"));
            }
            return Err(PluginError::with(msg, &e));
        }
    }
    Ok(taken)
}

/// Gives every device back to its original driver, last first; tries them
/// all and reports the ones that failed.
fn give_back(sysfs: &PciSysfs, taken: &[Taken]) -> Result<(), PluginError> {
    let mut failed = Vec::new();
    for t in taken.iter().rev() {
        if t.driver.as_deref() == Some(VFIO_DRIVER) {
            continue;
        }
        if let Some(d) = &t.driver {
            if d.is_empty() || d.contains('/') || d == "." || d == ".." {
                failed.push(format!(
                    "{}: recorded driver {d:?} is not a driver name",
                    t.address
                ));
                continue;
            }
        }
        if let Err(e) = sysfs.restore(&t.address, t.driver.as_deref()) {
            failed.push(PluginError::with(t.address.as_str(), &e).to_string());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PluginError::new(format!(
            "Cannot give PCI devices back to their drivers: {}",
            failed.join("; ")
        )))
    }
}

/// Teardown: gives the recorded devices back and removes the record (kept
/// when something failed, so the next teardown tries again).
pub fn teardown(s: &Settings, vm_dir: &Path) -> Result<Vec<Taken>, PluginError> {
    let state_file = vm_dir.join(STATE_FILE);
    let Some(state) = read_state(&state_file)? else {
        return Ok(Vec::new());
    };
    give_back(&s.sysfs, &state.taken)?;
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

fn describe(taken: &[Taken]) -> String {
    taken
        .iter()
        .map(|t| {
            format!(
                "{} (was {})",
                t.address,
                t.driver.as_deref().unwrap_or("unbound")
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
        settings(options).map(|_| ())
    }

    fn prepare_host(&self, req: &HookRequest, host: &Host<'_>) -> Result<(), PluginError> {
        let s = settings(&req.options)?;
        let taken = prepare(&s, &req.vm.vm_dir)?;
        host.info(&format!("bound to {VFIO_DRIVER}: {}", describe(&taken)));
        Ok(())
    }

    fn configure_machine(
        &self,
        req: &HookRequest,
        _host: &Host<'_>,
    ) -> Result<MachineEdits, PluginError> {
        let s = settings(&req.options)?;
        Ok(MachineEdits {
            pci_devices: vec![PciDeviceEdit::Vfio { address: s.device }],
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
        let s = settings(&req.options)?;
        let taken = teardown(&s, &req.vm.vm_dir)?;
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

    use crate::fake_sysfs::FakeSysfs;
    use crate::fake_sysfs::class::{GPU, NVME};

    /// The plugin's settings for `device` on the fake tree.
    fn settings_for(f: &FakeSysfs, device: &str) -> Settings {
        let opts: Options = [
            ("device".to_string(), device.to_string()),
            ("sysfs".to_string(), f.root().to_str().unwrap().to_string()),
        ]
        .into();
        settings(&opts).unwrap()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn binds_the_device_and_its_other_function_to_vfio_and_teardown_rebinds_them() {
        let f = FakeSysfs::with_gpu().unwrap();
        let vm = tempfile::tempdir().unwrap();
        let s = settings_for(&f, "0000:01:00.0");
        let taken = prepare(&s, vm.path()).unwrap();
        assert_eq!(
            describe(&taken),
            "0000:01:00.0 (was nvidia), 0000:01:00.1 (was snd_hda_intel)"
        );
        // The bridge keeps pcieport; nothing else is touched.
        assert_eq!(
            f.writes().unwrap(),
            pairs(&[
                ("bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci\n"),
                ("bus/pci/devices/0000:01:00.1/driver_override", "vfio-pci\n"),
                ("bus/pci/drivers/nvidia/unbind", "0000:01:00.0\n"),
                ("bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1\n"),
                ("bus/pci/drivers_probe", "0000:01:00.0\n0000:01:00.1\n"),
            ])
        );
        assert!(vm.path().join(STATE_FILE).is_file());

        // A second PrepareHost (start after a daemon restart) binds nothing again.
        prepare(&s, vm.path()).unwrap();
        assert_eq!(
            f.read("bus/pci/drivers_probe").unwrap(),
            "0000:01:00.0\n0000:01:00.1\n"
        );

        // The kernel moved both to vfio-pci; now give them back.
        f.bind("0000:01:00.0", Some("vfio-pci")).unwrap();
        f.bind("0000:01:00.1", Some("vfio-pci")).unwrap();
        let back = teardown(&s, vm.path()).unwrap();
        assert_eq!(back, taken);
        assert_eq!(
            f.read("bus/pci/drivers/vfio-pci/unbind").unwrap(),
            "0000:01:00.1\n0000:01:00.0\n"
        );
        assert_eq!(
            f.read("bus/pci/drivers/nvidia/bind").unwrap(),
            "0000:01:00.0\n"
        );
        assert_eq!(
            f.read("bus/pci/drivers/snd_hda_intel/bind").unwrap(),
            "0000:01:00.1\n"
        );
        assert_eq!(
            f.read("bus/pci/devices/0000:01:00.0/driver_override")
                .unwrap(),
            "vfio-pci\n\n",
            "an empty line clears the override"
        );
        assert!(
            f.read("bus/pci/drivers/pcieport/unbind")
                .unwrap()
                .is_empty()
        );
        assert!(!vm.path().join(STATE_FILE).exists());
        // Nothing recorded: nothing to do.
        assert!(teardown(&s, vm.path()).unwrap().is_empty());
    }

    #[test]
    fn a_device_already_on_vfio_or_unbound_is_taken_and_left_that_way() {
        let f = FakeSysfs::new().unwrap();
        f.device("0000:05:00.0", GPU, Some(3), Some("vfio-pci"))
            .unwrap();
        f.device("0000:06:00.0", NVME, Some(3), None).unwrap();
        let vm = tempfile::tempdir().unwrap();
        let s = settings_for(&f, "0000:05:00.0");
        prepare(&s, vm.path()).unwrap();
        assert_eq!(
            f.writes().unwrap(),
            pairs(&[
                ("bus/pci/devices/0000:06:00.0/driver_override", "vfio-pci\n"),
                ("bus/pci/drivers_probe", "0000:06:00.0\n"),
            ])
        );
        f.bind("0000:06:00.0", Some("vfio-pci")).unwrap();
        teardown(&s, vm.path()).unwrap();
        // The unbound one goes back to no driver; the vfio one stays put.
        assert_eq!(
            f.read("bus/pci/drivers/vfio-pci/unbind").unwrap(),
            "0000:06:00.0\n"
        );
        assert!(!f.root().join("bus/pci/drivers/nvme").exists());
    }

    #[test]
    fn refuses_a_group_holding_another_card_the_host_uses_and_writes_nothing() {
        let f = FakeSysfs::with_gpu().unwrap();
        f.device("0000:02:00.0", NVME, Some(12), Some("nvme"))
            .unwrap();
        let vm = tempfile::tempdir().unwrap();
        let err = prepare(&settings_for(&f, "0000:01:00.0"), vm.path()).unwrap_err();
        let msg = err.message();
        for needle in [
            "0000:02:00.0 (driver nvme)",
            "IOMMU group 12",
            "own IOMMU group",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        assert!(f.writes().unwrap().is_empty(), "{:?}", f.writes().unwrap());
        assert!(!vm.path().join(STATE_FILE).exists());
    }

    #[test]
    fn refuses_a_device_without_an_iommu_group_or_that_does_not_exist() {
        let f = FakeSysfs::new().unwrap();
        f.device("0000:01:00.0", GPU, None, Some("nvidia")).unwrap();
        let vm = tempfile::tempdir().unwrap();
        let err = prepare(&settings_for(&f, "0000:01:00.0"), vm.path()).unwrap_err();
        assert!(err.message().contains("has no IOMMU group"), "{err}");
        assert!(err.message().contains("intel_iommu=on"), "{err}");
        let err = prepare(&settings_for(&f, "0000:09:00.0"), vm.path()).unwrap_err();
        assert!(
            err.message().contains("0000:09:00.0 does not exist"),
            "{err}"
        );
        assert!(f.writes().unwrap().is_empty());
    }

    #[test]
    fn a_failed_bind_gives_back_what_it_moved() {
        let f = FakeSysfs::with_gpu().unwrap();
        // drivers_probe cannot be written: the first device is half moved.
        let probe = f.root().join("bus/pci/drivers_probe");
        fs::remove_file(&probe).unwrap();
        fs::create_dir(&probe).unwrap();
        let vm = tempfile::tempdir().unwrap();
        let err = prepare(&settings_for(&f, "0000:01:00.0"), vm.path()).unwrap_err();
        assert!(
            err.message().starts_with(
                "Cannot bind 0000:01:00.0 to vfio-pci: Cannot write \"0000:01:00.0\" to"
            ),
            "{err}"
        );
        assert_eq!(
            f.read("bus/pci/devices/0000:01:00.0/driver_override")
                .unwrap(),
            "vfio-pci\n\n"
        );
        assert_eq!(
            f.read("bus/pci/drivers/nvidia/bind").unwrap(),
            "0000:01:00.0\n"
        );
        assert!(
            f.read("bus/pci/devices/0000:01:00.1/driver_override")
                .unwrap()
                .is_empty()
        );
        assert!(!vm.path().join(STATE_FILE).exists());
    }

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
                opts(&[("device", "0000:01:00.0"), ("sysfs", "sys")]),
                "must be an absolute path",
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
