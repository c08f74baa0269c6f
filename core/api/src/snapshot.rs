//! Snapshots of running VMs as the API and the CLI see them
//! (`docs/snapshots.md`): `POST /v1/vms/{name}/snapshot` takes one,
//! `GET /v1/snapshots` lists them, `DELETE /v1/snapshots/{snap}` removes one.

use serde::{Deserialize, Serialize};

use crate::guest::GuestConfig;
use crate::machine::MachineSpec;
use crate::model::{EnabledCap, VmSpec, VmmKind};

/// The snapshot format this banger writes and restores. A snapshot of
/// another format is refused, not guessed at.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// `POST /v1/vms/{name}/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// The snapshot's name (a VM name's rules: `a-z`, `0-9`, `-`).
    pub name: String,
}

/// One file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// File name in the snapshot directory.
    pub name: String,
    /// Size in bytes when the snapshot was taken.
    pub size: u64,
}

/// A snapshot as listed (its manifest without the agent secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Its name.
    pub name: String,
    /// [`SNAPSHOT_FORMAT`] when it was written.
    pub format: u32,
    /// The banger version that wrote it.
    pub banger_version: String,
    /// The backend whose state files it holds; only it can restore them.
    pub backend: VmmKind,
    /// The VM it was taken of.
    pub source_vm: String,
    /// That VM's spec (image, kernel, shape, capabilities' inputs).
    pub spec: VmSpec,
    /// That VM's machine at the time (devices the state files expect).
    pub machine: MachineSpec,
    /// That VM's capabilities: a restore enables the same ones, so its
    /// machine has the devices the state files expect.
    #[serde(default)]
    pub caps: Vec<EnabledCap>,
    /// The guest bundle it booted with (file contents left out): the
    /// identity the restored guest starts with (hostname, address), which a
    /// restore replaces.
    #[serde(default)]
    pub guest: Option<GuestConfig>,
    /// Every file, with its size.
    pub files: Vec<SnapshotFile>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Its directory.
    pub dir: std::path::PathBuf,
}

impl SnapshotView {
    /// The files' total size.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
