//! `MachineSpec`: the VMM-neutral description of the machine to boot.
//! Capabilities mutate it in ConfigureMachine; a `Vmm` backend renders it.

use std::path::PathBuf;

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
        }
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
