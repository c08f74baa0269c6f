//! `MachineSpec`: the VMM-neutral description of the machine to boot.
//! Capabilities mutate it in ConfigureMachine; a `Vmm` backend renders it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use banger_plugin_abi::wire::{BadPciAddress, PciAddress};
use serde::{Deserialize, Serialize};

/// What a drive is for. The guest finds devices by what the config drive
/// says, so roles are informative for humans and backends, not for guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriveRole {
    /// `vda`, the VM's writable root.
    Root,
    /// The persistent `/root` work disk.
    Work,
    /// The read-only guest config drive.
    Config,
    /// A drive added by some other capability or plugin.
    Extra,
}

/// One block device, in attach order (`vda`, `vdb`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Unique id within the VM (Firecracker's `drive_id`).
    pub id: String,
    /// Backing file on the host.
    pub path: PathBuf,
    /// Attach read-only.
    pub read_only: bool,
    /// What the drive is for.
    pub role: DriveRole,
}

/// One virtio-net interface backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Unique id within the VM (Firecracker's `iface_id`).
    pub id: String,
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A virtio-vsock device exposed on the host as a hybrid-vsock Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vsock {
    /// Guest context id (>= 3).
    pub guest_cid: u32,
    /// Host-side Unix socket.
    pub uds_path: PathBuf,
}

/// A QEMU device model name for `-device` (`virtio-rng-pci`, `edu`):
/// lowercase letters, digits, `-`, `_` and `.`, so it can never smuggle in
/// extra `,key=value` options.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceModel(String);

/// A string that cannot be a QEMU device model name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a QEMU device model name: use lowercase letters, digits, '-', '_' or '.' (e.g. virtio-rng-pci; list them with qemu-system-x86_64 -device help)"
)]
pub struct BadDeviceModel(pub String);

impl DeviceModel {
    /// The model name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceModel {
    type Err = BadDeviceModel;
    fn from_str(s: &str) -> Result<Self, BadDeviceModel> {
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if ok {
            Ok(DeviceModel(s.to_string()))
        } else {
            Err(BadDeviceModel(s.to_string()))
        }
    }
}

impl TryFrom<String> for DeviceModel {
    type Error = BadDeviceModel;
    fn try_from(s: String) -> Result<Self, BadDeviceModel> {
        s.parse()
    }
}

impl From<DeviceModel> for String {
    fn from(m: DeviceModel) -> String {
        m.0
    }
}

impl fmt::Display for DeviceModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PCI device on the guest's PCI bus. Only the QEMU backend can attach
/// one; see `docs/pci.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PciDevice {
    /// A host device passed through with VFIO. Something (the
    /// `vfio-passthrough` plugin) must have bound it to `vfio-pci` first.
    Vfio {
        /// The host device.
        address: PciAddress,
    },
    /// A device QEMU emulates (tests; plugins wanting e.g. `virtio-rng-pci`).
    Emulated {
        /// The QEMU device model.
        model: DeviceModel,
    },
}

impl fmt::Display for PciDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PciDevice::Vfio { address } => write!(f, "VFIO device {address}"),
            PciDevice::Emulated { model } => write!(f, "emulated PCI device {model}"),
        }
    }
}

/// The machine to boot, independent of which VMM boots it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSpec {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub boot_args: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Block devices in attach order; the first is the root.
    pub drives: Vec<Drive>,
    /// Network interfaces in attach order.
    pub nics: Vec<Nic>,
    /// Optional vsock device.
    pub vsock: Option<Vsock>,
    /// Where the guest serial console is captured.
    pub serial_log: PathBuf,
    /// PCI devices in attach order (QEMU only). Empty means the guest gets
    /// no PCI bus at all (`pci=off`), which boots faster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci_devices: Vec<PciDevice>,
}

impl MachineSpec {
    /// Appends a drive, refusing a duplicate id so two capabilities cannot
    /// silently shadow each other's devices.
    pub fn add_drive(&mut self, drive: Drive) -> Result<(), DuplicateDevice> {
        if self.drives.iter().any(|d| d.id == drive.id) {
            return Err(DuplicateDevice(drive.id));
        }
        self.drives.push(drive);
        Ok(())
    }

    /// Appends a PCI device, refusing a host device that is already attached
    /// (one device cannot be passed through twice).
    pub fn add_pci_device(&mut self, device: PciDevice) -> Result<(), DuplicateDevice> {
        if matches!(device, PciDevice::Vfio { .. }) && self.pci_devices.contains(&device) {
            return Err(DuplicateDevice(device.to_string()));
        }
        self.pci_devices.push(device);
        Ok(())
    }

    /// The kernel command line a backend should boot: `boot_args`, plus
    /// `pci=off` when the machine has no PCI devices (the kernel then skips
    /// probing a bus that is not there) unless the args already choose.
    pub fn kernel_args(&self) -> String {
        let chosen = self
            .boot_args
            .split_whitespace()
            .any(|a| a.starts_with("pci="));
        if self.pci_devices.is_empty() && !chosen {
            let mut args = self.boot_args.trim().to_string();
            if !args.is_empty() {
                args.push(' ');
            }
            args.push_str("pci=off");
            args
        } else {
            self.boot_args.clone()
        }
    }

    /// Appends a NIC, refusing a duplicate id.
    pub fn add_nic(&mut self, nic: Nic) -> Result<(), DuplicateDevice> {
        if self.nics.iter().any(|n| n.id == nic.id) {
            return Err(DuplicateDevice(nic.id));
        }
        self.nics.push(nic);
        Ok(())
    }
}

/// A device id that is already taken in this machine.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Device id {0:?} is already attached")]
pub struct DuplicateDevice(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            kernel: "/k".into(),
            initrd: None,
            boot_args: String::new(),
            vcpus: 1,
            memory_mib: 256,
            drives: vec![],
            nics: vec![],
            vsock: None,
            serial_log: "/s".into(),
            pci_devices: vec![],
        }
    }

    fn vfio(addr: &str) -> PciDevice {
        PciDevice::Vfio {
            address: addr.parse().unwrap(),
        }
    }

    #[test]
    fn refuses_passing_one_host_device_through_twice() {
        let mut m = spec();
        m.add_pci_device(vfio("0000:01:00.0")).unwrap();
        let err = m.add_pci_device(vfio("0000:01:00.0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Device id \"VFIO device 0000:01:00.0\" is already attached"
        );
        m.add_pci_device(vfio("0000:01:00.1")).unwrap();
        let rng = PciDevice::Emulated {
            model: "virtio-rng-pci".parse().unwrap(),
        };
        m.add_pci_device(rng.clone()).unwrap();
        m.add_pci_device(rng).unwrap();
        assert_eq!(m.pci_devices.len(), 4);
    }

    #[test]
    fn pci_is_off_only_for_machines_without_pci_devices() {
        let mut m = spec();
        assert_eq!(m.kernel_args(), "pci=off");
        m.boot_args = "console=ttyS0 ".into();
        assert_eq!(m.kernel_args(), "console=ttyS0 pci=off");
        m.boot_args = "console=ttyS0 pci=noacpi".into();
        assert_eq!(m.kernel_args(), "console=ttyS0 pci=noacpi");
        m.boot_args = "console=ttyS0".into();
        m.pci_devices.push(vfio("0000:01:00.0"));
        assert_eq!(m.kernel_args(), "console=ttyS0");
    }

    #[test]
    fn device_models_cannot_carry_extra_qemu_options() {
        assert_eq!(
            "virtio-rng-pci".parse::<DeviceModel>().unwrap().as_str(),
            "virtio-rng-pci"
        );
        for bad in ["", "edu,romfile=/etc/shadow", "Edu", "a b", "x=1"] {
            let err = bad.parse::<DeviceModel>().unwrap_err();
            assert!(err.to_string().contains("-device help"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn stored_machines_without_pci_devices_still_load() {
        let mut json = serde_json::to_value(spec()).unwrap();
        assert!(json.get("pci_devices").is_none(), "{json}");
        json.as_object_mut().unwrap().remove("pci_devices");
        let back: MachineSpec = serde_json::from_value(json).unwrap();
        assert!(back.pci_devices.is_empty());
        let mut m = spec();
        m.pci_devices = vec![
            vfio("0000:3b:00.0"),
            PciDevice::Emulated {
                model: "edu".parse().unwrap(),
            },
        ];
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#"{"kind":"vfio","address":"0000:3b:00.0"}"#),
            "{json}"
        );
        assert!(
            json.contains(r#"{"kind":"emulated","model":"edu"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<MachineSpec>(&json).unwrap(), m);
    }

    #[test]
    fn refuses_duplicate_drive_ids() {
        let mut m = spec();
        let d = Drive {
            id: "work".into(),
            path: "/w".into(),
            read_only: false,
            role: DriveRole::Work,
        };
        m.add_drive(d.clone()).unwrap();
        assert_eq!(m.add_drive(d), Err(DuplicateDevice("work".into())));
        assert_eq!(m.drives.len(), 1);
    }
}
