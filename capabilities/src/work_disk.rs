//! `work-disk`: a persistent ext4 disk mounted at `/root`. Sparse, sized by
//! `--disk-size` (or `[vm_defaults] disk_size`), created at the VM's first
//! start, grown when the size was raised with `vm set`, kept across
//! stop/start and removed with the VM.
//!
//! A new disk is a copy of an empty filesystem of its size kept in the
//! daemon's cache directory (`work-disks/`), with a filesystem UUID of its
//! own: no `mkfs.ext4` process per create (see
//! [`disk::create_ext4_cached`]). Its sync to stable storage runs on a
//! thread of its own while the other capabilities prepare the host and
//! configure the machine, and GuestConfig waits for it: the disk is durable
//! before the VM boots, and a create does not wait for a journal commit in
//! between.

use std::path::PathBuf;
use std::sync::Arc;

use banger_api::guest::{GuestConfig, GuestMount};
use banger_api::machine::{Drive, DriveRole, MachineSpec};
use banger_api::model::CapOptions;
use banger_artifacts::disk;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, HookCtx, TeardownReason,
};

use crate::deferred::Deferred;

/// Name used with `--cap`.
pub const NAME: &str = "work-disk";
/// Drive id in the machine spec; the guest config's mount refers to it.
pub const DRIVE_ID: &str = "work";
/// File name inside the VM's directory.
pub const FILE_NAME: &str = "work.ext4";
/// Its filesystem label.
pub const LABEL: &str = "banger-work";
/// Where the guest mounts it.
pub const MOUNT_POINT: &str = "/root";

/// Where the empty filesystems new disks are copied from are kept, under
/// the daemon's cache directory.
pub const TEMPLATES_DIR: &str = "work-disks";

/// The work-disk capability.
#[derive(Debug)]
pub struct WorkDisk {
    /// The template directory; `None` runs `mkfs.ext4` for every disk.
    templates: Option<PathBuf>,
    /// The syncs of disks PrepareHost made, until GuestConfig (or a
    /// rollback's Teardown) waits for them.
    syncs: Deferred,
}

impl Default for WorkDisk {
    /// Runs `mkfs.ext4` for every disk.
    fn default() -> Self {
        WorkDisk {
            templates: None,
            syncs: Deferred::new("disk-sync"),
        }
    }
}

impl WorkDisk {
    /// Makes new disks as copies of templates kept in `dir`.
    pub fn with_templates(dir: PathBuf) -> WorkDisk {
        WorkDisk {
            templates: Some(dir),
            ..WorkDisk::default()
        }
    }

    /// How many syncs no hook has waited for yet.
    #[cfg(test)]
    pub(crate) fn syncs_pending(&self) -> usize {
        self.syncs.pending()
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(WorkDisk::with_templates(
        env.paths.cache_dir.join(TEMPLATES_DIR),
    )))
}

inventory::submit! { BuiltinCapability { make } }

fn disk_path(ctx: &HookCtx<'_>) -> PathBuf {
    ctx.vm_dir.join(FILE_NAME)
}

impl Capability for WorkDisk {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Persistent ext4 disk mounted at /root; sized by --disk-size, kept across stop/start, removed on delete"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: work-disk takes no options; size it with --disk-size"
            ))),
        }
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let path = disk_path(ctx);
        let want = ctx.vm.spec.disk_size;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() >= want.0 => Ok(()),
            Ok(meta) => {
                ctx.log.info(&format!(
                    "growing work disk from {} to {want}",
                    banger_api::model::ByteSize(meta.len())
                ));
                disk::grow_ext4(&path, want)
                    .map_err(|e| CapError::with("Cannot grow the work disk", e))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ctx.log
                    .info(&format!("creating {want} work disk for /root"));
                let made = match &self.templates {
                    Some(dir) => disk::create_ext4_cached(dir, &path, want, LABEL)
                        .map(|(_, unsynced)| Some(unsynced)),
                    None => disk::create_ext4(&path, want, LABEL).map(|()| None),
                }
                .map_err(|e| CapError::with("Cannot create the work disk", e))?;
                match made {
                    Some(unsynced) => self.syncs.start(&ctx.vm.id, move || {
                        unsynced
                            .sync()
                            .map_err(|e| CapError::with("Cannot sync the work disk", e))
                    }),
                    None => Ok(()),
                }
            }
            Err(e) => Err(CapError::with(
                format!("Cannot inspect {}", path.display()),
                e,
            )),
        }
    }

    fn configure_machine(
        &self,
        ctx: &HookCtx<'_>,
        machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        machine
            .add_drive(Drive {
                id: DRIVE_ID.to_string(),
                path: disk_path(ctx),
                read_only: false,
                role: DriveRole::Work,
            })
            .map_err(|e| CapError::with("Cannot attach the work disk", e))
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        // The last hook before the VMM starts.
        self.syncs.wait(&ctx.vm.id)?;
        guest
            .add_mount(GuestMount {
                drive_id: DRIVE_ID.to_string(),
                mount_point: MOUNT_POINT.into(),
                fstype: "ext4".to_string(),
                read_only: false,
            })
            .map_err(|e| CapError::with("Cannot mount the work disk", e))
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        // A start that failed before GuestConfig: its sync is waited for,
        // never left running; its result matters no more.
        let _ = self.syncs.wait(&ctx.vm.id);
        let remove = match reason {
            TeardownReason::Stop => false,
            TeardownReason::Delete => true,
            // A VM that never booted has nothing of the user's on its disk;
            // one that did keeps its data even when a later start fails.
            TeardownReason::Rollback => !ctx.vm.booted_once,
        };
        if !remove {
            return Ok(());
        }
        let path = disk_path(ctx);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                ctx.log.info("removed work disk");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CapError::with(
                format!("Cannot remove {}", path.display()),
                e,
            )),
        }
    }
}
