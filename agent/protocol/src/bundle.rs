//! `GuestConfig`: the typed bundle capabilities add to in the GuestConfig hook.
//! The guest agent applies it at boot; its rendering into a config drive is
//! versioned by `GuestConfig::VERSION`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A filesystem the guest agent mounts before switching root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// The drive id (from `MachineSpec::drives`) holding the filesystem; the
    /// agent maps it to a device by attach order.
    pub drive_id: String,
    /// Absolute mount point inside the guest.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`).
    pub fstype: String,
    /// Mount read-only.
    pub read_only: bool,
}

/// A file the guest agent writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFile {
    /// Absolute guest path.
    pub path: PathBuf,
    /// File contents.
    pub contents: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

/// Static network configuration for one guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// NIC id from `MachineSpec::nics`.
    pub nic_id: String,
    /// Address with prefix, e.g. `172.30.0.5/24`.
    pub address: String,
    /// Default gateway.
    pub gateway: Option<String>,
    /// Interface MTU.
    pub mtu: Option<u32>,
    /// DNS servers for resolv.conf.
    pub nameservers: Vec<String>,
}

/// Everything the guest needs to know at boot, contributed by capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestConfig {
    /// Format version of this bundle.
    pub version: u32,
    /// Guest hostname.
    pub hostname: String,
    /// Filesystems to mount, in order.
    pub mounts: Vec<GuestMount>,
    /// Files to write, in order.
    pub files: Vec<GuestFile>,
    /// Network interfaces to configure.
    pub network: Vec<GuestNetwork>,
    /// SSH public keys for root's authorized_keys.
    pub authorized_keys: Vec<String>,
    /// Environment for commands the agent runs.
    pub env: BTreeMap<String, String>,
    /// Commands to run at boot, after mounts and files, in order.
    pub commands: Vec<Vec<String>>,
}

impl GuestConfig {
    /// Current bundle format version.
    pub const VERSION: u32 = 1;

    /// An empty bundle for a guest with this hostname.
    pub fn new(hostname: &str) -> Self {
        GuestConfig {
            version: Self::VERSION,
            hostname: hostname.to_string(),
            ..Default::default()
        }
    }

    /// Requests a mount, refusing a second filesystem on the same mount point.
    pub fn add_mount(&mut self, mount: GuestMount) -> Result<(), MountPointTaken> {
        if !mount.mount_point.is_absolute() {
            return Err(MountPointTaken::NotAbsolute(mount.mount_point));
        }
        if self
            .mounts
            .iter()
            .any(|m| m.mount_point == mount.mount_point)
        {
            return Err(MountPointTaken::Taken(mount.mount_point));
        }
        self.mounts.push(mount);
        Ok(())
    }
}

/// A mount request that conflicts with the bundle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountPointTaken {
    /// Another capability already mounts something there.
    #[error("Guest mount point {0} is already requested by another capability")]
    Taken(PathBuf),
    /// Mount points must be absolute guest paths.
    #[error("Guest mount point {0} is not an absolute path")]
    NotAbsolute(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(p: &str) -> GuestMount {
        GuestMount {
            drive_id: "d".into(),
            mount_point: p.into(),
            fstype: "ext4".into(),
            read_only: false,
        }
    }

    #[test]
    fn refuses_conflicting_and_relative_mount_points() {
        let mut g = GuestConfig::new("h");
        g.add_mount(mount("/root")).unwrap();
        assert!(matches!(
            g.add_mount(mount("/root")),
            Err(MountPointTaken::Taken(_))
        ));
        assert!(matches!(
            g.add_mount(mount("rel")),
            Err(MountPointTaken::NotAbsolute(_))
        ));
        assert_eq!(g.mounts.len(), 1);
    }
}
