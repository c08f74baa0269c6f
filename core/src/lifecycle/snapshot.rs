//! `vm snapshot`: a running VM's state and disks into the snapshot store
//! (`crate::snapshot`, `docs/snapshots.md`). The VM stays running; its lock
//! is held throughout, so no stop, workspace import or guest job runs while
//! the guest is paused.

use std::path::PathBuf;

use super::{Lifecycle, OpError};
use crate::snapshot::{Manifest, SNAPSHOT_FORMAT, SnapshotStore, SnapshotView};
use banger_api::machine::DriveRole;
use banger_api::model::VmState;
use banger_api::model::now_unix;
use banger_vmm::VmmError;
use banger_vmm::vsock::EXEC_SECRET_FILE;

impl Lifecycle {
    /// The snapshot store.
    pub fn snapshot_store(&self) -> SnapshotStore {
        SnapshotStore::new(&self.paths.state_dir)
    }

    /// Removes snapshot `name` and the spare copies of its disks.
    pub fn remove_snapshot(&self, name: &str) -> Result<(), OpError> {
        let store = self.snapshot_store();
        let disks: Vec<_> = store
            .manifest(name)?
            .view
            .machine
            .drives
            .iter()
            .map(|d| store.dir(name).join(format!("disk-{}", d.id)))
            .collect();
        store.remove(name)?;
        for disk in &disks {
            self.artifacts.snapshot_spares.forget(disk);
        }
        Ok(())
    }

    /// Snapshots running VM `vm_name` as `snap`: the backend pauses the
    /// guest and writes its state, every writable disk is copied (reflinked
    /// where the filesystem can) while it is paused, the guest resumes.
    pub async fn snapshot(&self, vm_name: &str, snap: &str) -> Result<SnapshotView, OpError> {
        let store = self.snapshot_store();
        let (_guard, vm) = self.lock_by_name(vm_name).await?;
        if vm.state != VmState::Running {
            return Err(OpError::WrongState {
                name: vm.name.to_string(),
                state: vm.state,
                hint: "start it first: a snapshot holds a running guest",
            });
        }
        let (Some(process), Some(machine)) = (vm.vmm.clone(), vm.machine.clone()) else {
            return Err(OpError::Invalid(format!(
                "VM {vm_name} is running but has no recorded VMM or machine; restart it (banger vm restart {vm_name})"
            )));
        };
        let staging = store.begin(snap)?;
        let dir = staging.path().to_path_buf();
        let disks: Vec<(PathBuf, PathBuf)> = machine
            .drives
            .iter()
            .filter(|d| !d.read_only && d.role != DriveRole::Config)
            .map(|d| (d.path.clone(), dir.join(format!("disk-{}", d.id))))
            .collect();
        let vmm = self.vmm_for(&vm);
        let taken = tokio::task::spawn_blocking(move || {
            vmm.snapshot(&process, &dir, &mut || {
                for (src, dst) in &disks {
                    banger_artifacts::disk::clone_file(src, dst).map_err(|e| {
                        VmmError::Io(
                            format!("copying {} into the snapshot", src.display()),
                            std::io::Error::other(e.to_string()),
                        )
                    })?;
                }
                Ok(())
            })
        })
        .await
        .map_err(|e| OpError::Stage {
            stage: "internal".into(),
            source: Box::new(e),
        })?;
        taken.map_err(|e| match e {
            VmmError::Unsupported(msg) => OpError::Invalid(msg),
            e => OpError::Stage {
                stage: "snapshot".into(),
                source: Box::new(e),
            },
        })?;
        let secret = std::fs::read_to_string(self.vm_dir(&vm.id).join(EXEC_SECRET_FILE))
            .ok()
            .map(|s| s.trim().to_owned());
        staging.commit(Manifest {
            view: SnapshotView {
                name: snap.to_owned(),
                format: SNAPSHOT_FORMAT,
                banger_version: env!("CARGO_PKG_VERSION").to_owned(),
                backend: vm.spec.vmm,
                source_vm: vm.name.to_string(),
                spec: vm.spec.clone(),
                machine,
                caps: vm.caps.clone(),
                guest: vm.guest.clone(),
                files: Vec::new(),
                created_at: now_unix(),
                dir: PathBuf::new(),
            },
            agent_secret: secret,
        })
    }
}
