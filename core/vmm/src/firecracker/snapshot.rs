//! Firecracker snapshots through its snapshot API. Taking one: `PATCH /vm
//! {state: Paused}`, `PUT /snapshot/create {snapshot_type: Full,
//! snapshot_path, mem_file_path}`, the caller's disk copies, `PATCH /vm
//! {state: Resumed}`. Restoring: a new firecracker (jailed as a launch is),
//! `PUT /logger`, then `PUT /snapshot/load {snapshot_path, mem_backend:
//! {backend_type: File, backend_path}, network_overrides, resume_vm: true}`.
//!
//! Firecracker restores every device with the paths recorded at snapshot
//! time; only the tap can be overridden. Under the jailer every path is
//! inside the VM's own chroot (`/drives/<id>`, `/vsock/v.sock`), so each
//! restore finds its own disks and vsock socket there. Without the jailer
//! the restored VM would reopen the source's disks and vsock socket, so a
//! restore is refused then (`docs/snapshots.md`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::Firecracker;
use crate::jailer;
use crate::{LaunchPaths, OnSpawned, Vmm, VmmError, WhilePaused, io_err};
use banger_api::machine::MachineSpec;
use banger_api::model::VmmProcess;

/// The VM state, in the snapshot directory.
pub const STATE_FILE: &str = "firecracker.vmstate";
/// The guest memory, in the snapshot directory.
pub const MEMORY_FILE: &str = "firecracker.memory";
/// Where a jailed firecracker reads and writes them, inside its root.
const IN_ROOT: &str = "snapshot";

impl Firecracker {
    /// [`crate::Vmm::snapshot`] for Firecracker.
    pub(super) fn snapshot_to(
        &self,
        process: &VmmProcess,
        dir: &Path,
        while_paused: &mut WhilePaused<'_>,
    ) -> Result<(), VmmError> {
        let sock = &process.api_socket;
        // A jailed firecracker's API socket is a symlink into its root
        // (`<root>/run/firecracker.socket`); it writes the files in there.
        let root = fs::read_link(sock)
            .ok()
            .and_then(|t| t.parent()?.parent().map(Path::to_path_buf));
        let (state, memory) = match &root {
            Some(root) => {
                let inside = root.join(IN_ROOT);
                make_owned_dir(&inside, &root.join("run"))?;
                (
                    PathBuf::from("/").join(IN_ROOT).join(STATE_FILE),
                    PathBuf::from("/").join(IN_ROOT).join(MEMORY_FILE),
                )
            }
            None => (dir.join(STATE_FILE), dir.join(MEMORY_FILE)),
        };
        self.patch(sock, "/vm", &json!({"state": "Paused"}))?;
        let taken = self
            .put(
                sock,
                "/snapshot/create",
                &json!({
                    "snapshot_type": "Full",
                    "snapshot_path": state,
                    "mem_file_path": memory,
                }),
            )
            .and_then(|()| match &root {
                Some(root) => move_out(&root.join(IN_ROOT), dir),
                None => Ok(()),
            })
            .and_then(|()| while_paused());
        // Resumed whatever happened: a failed snapshot leaves the VM running.
        let resumed = self.patch(sock, "/vm", &json!({"state": "Resumed"}));
        taken?;
        resumed
    }

    /// [`crate::Vmm::restore_recorded`] for Firecracker.
    pub(super) fn restore_from(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        dir: &Path,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        if self.jailer().is_none() {
            return Err(VmmError::Unsupported(
                "Firecracker restores a snapshot's devices at the paths recorded in it, which outside the jailer are the source VM's disks and vsock socket: turn the jail on (vmm_jail = true, as root) to restore Firecracker snapshots".into(),
            ));
        }
        for f in [STATE_FILE, MEMORY_FILE] {
            let p = dir.join(f);
            if !p.is_file() {
                return Err(VmmError::Unsupported(format!(
                    "{} is missing: the snapshot is incomplete; remove it (banger vm snapshot rm) and take it again",
                    p.display()
                )));
            }
        }
        let restoring = Firecracker {
            restore: Some(dir.to_path_buf()),
            ..self.clone()
        };
        restoring.launch_recorded(machine, paths, on_spawned)
    }

    /// The boot step of a restore: the snapshot files go into the root,
    /// then `PUT /snapshot/load` with the new VM's taps.
    pub(super) fn load_snapshot(
        &self,
        dir: &Path,
        machine: &MachineSpec,
        sock: &Path,
        log: &Path,
        root: &Path,
        uid: u32,
    ) -> Result<(), VmmError> {
        self.put(
            sock,
            "/logger",
            &json!({"log_path": log, "level": "Info", "show_level": true, "show_log_origin": false}),
        )?;
        let inside = root.join(IN_ROOT);
        fs::create_dir_all(&inside)
            .map_err(|e| io_err(format!("creating {}", inside.display()), e))?;
        let state = jailer::place(
            &dir.join(STATE_FILE),
            root,
            &format!("{IN_ROOT}/{STATE_FILE}"),
            uid,
            false,
        )?;
        let memory = jailer::place(
            &dir.join(MEMORY_FILE),
            root,
            &format!("{IN_ROOT}/{MEMORY_FILE}"),
            uid,
            false,
        )?;
        let overrides: Vec<_> = machine
            .nics
            .iter()
            .map(|n| json!({"iface_id": n.id, "host_dev_name": n.tap}))
            .collect();
        self.put(
            sock,
            "/snapshot/load",
            &json!({
                "snapshot_path": state,
                "mem_backend": {"backend_type": "File", "backend_path": memory},
                "network_overrides": overrides,
                "resume_vm": true,
            }),
        )
    }
}

/// Creates `dir` owned like `like` (the VM uid's `run` directory).
fn make_owned_dir(dir: &Path, like: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::MetadataExt;
    fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    let owner = fs::metadata(like).map_err(|e| io_err(format!("reading {}", like.display()), e))?;
    std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid()))
        .map_err(|e| io_err(format!("handing {} to the VM's uid", dir.display()), e))
}

/// Moves the files firecracker wrote in its root to the snapshot directory.
fn move_out(from: &Path, dir: &Path) -> Result<(), VmmError> {
    for f in [STATE_FILE, MEMORY_FILE] {
        let (src, dst) = (from.join(f), dir.join(f));
        if fs::rename(&src, &dst).is_err() {
            fs::copy(&src, &dst)
                .and_then(|_| fs::remove_file(&src))
                .map_err(|e| io_err(format!("moving {} to {}", src.display(), dst.display()), e))?;
        }
    }
    Ok(())
}
