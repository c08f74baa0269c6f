//! `vm create --from-snapshot SNAP` (`docs/snapshots.md`): a new VM whose
//! spec and capabilities come from the snapshot's manifest. It goes through
//! the normal start sequence (its own lease, tap, MAC, DNS record, config
//! drive and agent secret) with three differences, each a branch in
//! `start.rs`: its disks are copies of the snapshot's, the VMM is started
//! by [`banger_vmm::Vmm::restore_recorded`] instead of a boot, and before
//! PostStart the restored agent, reached with the snapshot's secret, is
//! given the VM's identity (`POST /reidentify`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Lifecycle, OpError, Progress, begin_stage, blocking, timings};
use crate::snapshot::Manifest;
use banger_api::api::CreateVmRequest;
use banger_api::guest::GuestNetwork;
use banger_api::machine::{DriveRole, MachineSpec};
use banger_api::model::{VmName, VmRecord, now_unix};
use banger_artifacts::disk::spares::Spares;
use banger_guest_protocol::reidentify::{HostKeyFile, Reidentify};
use banger_vmm::vsock::{AgentClient, EXEC_SECRET_FILE, VsockError};

/// The snapshot a start restores from.
#[derive(Debug)]
pub(crate) struct Restore {
    /// Its name.
    name: String,
    /// Its manifest; `view.dir` is the snapshot's directory.
    manifest: Manifest,
    /// The exec secret the restored guest wakes up with.
    secret: String,
}

impl Restore {
    /// The snapshot's directory (the backend's state files).
    pub(crate) fn dir(&self) -> &Path {
        &self.manifest.view.dir
    }

    /// The writable drives the snapshot holds copies of (`disk-<id>`).
    fn disks(&self) -> impl Iterator<Item = &banger_api::machine::Drive> {
        self.manifest
            .view
            .machine
            .drives
            .iter()
            .filter(|d| !d.read_only && d.role != DriveRole::Config)
    }

    /// Refuses a machine whose devices differ from the snapshot's (the
    /// state files name them), then copies each snapshot disk over the
    /// machine's drive of the same id, staged and renamed: a copy made
    /// ahead of time by `spares` when one is ready (then another is made in
    /// the background for the next restore), else one made now.
    pub(crate) async fn place_disks(
        &self,
        machine: &MachineSpec,
        spares: &Spares,
    ) -> Result<(), OpError> {
        let ids = |m: &MachineSpec| {
            let mut d: Vec<String> = m.drives.iter().map(|d| d.id.clone()).collect();
            d.extend(m.nics.iter().map(|n| format!("nic {}", n.id)));
            d.extend(m.vsock.iter().map(|_| "vsock".to_string()));
            d.sort();
            d
        };
        let (want, have) = (ids(&self.manifest.view.machine), ids(machine));
        if want != have {
            return Err(OpError::Invalid(format!(
                "Snapshot {:?} holds a machine with {want:?}, but its capabilities now give {have:?}; a restore needs the same devices: take the snapshot again with this banger",
                self.name
            )));
        }
        let mut copies = Vec::new();
        for d in self.disks() {
            let Some(target) = machine.drives.iter().find(|t| t.id == d.id) else {
                continue;
            };
            copies.push((
                self.dir().join(format!("disk-{}", d.id)),
                target.path.clone(),
            ));
        }
        let spares = spares.clone();
        blocking(move || {
            copies
                .iter()
                .try_for_each(|(src, dst)| place(&spares, src, dst))
        })
        .await?
    }
}

/// Copies `src` to `dst` through `dst.restoring` (a spare moved there, or
/// reflinked where the filesystem can, or copied), renamed over `dst`.
fn place(spares: &Spares, src: &Path, dst: &Path) -> Result<(), OpError> {
    let mut staged = dst.as_os_str().to_owned();
    staged.push(".restoring");
    let staged = PathBuf::from(staged);
    let _ = std::fs::remove_file(&staged);
    let kind = spares.take(src, &staged).map_err(|e| OpError::Stage {
        stage: "restore_disks".into(),
        source: Box::new(e),
    })?;
    tracing::info!(disk = %dst.display(), ?kind, "snapshot disk placed");
    std::fs::rename(&staged, dst).map_err(|e| {
        let _ = std::fs::remove_file(&staged);
        OpError::Io(
            format!("renaming {} to {}", staged.display(), dst.display()),
            e,
        )
    })
}

/// A fresh ed25519 host key pair as the files sshd reads.
fn fresh_host_keys() -> Result<Vec<HostKeyFile>, OpError> {
    use ssh_key::rand_core::OsRng;
    use ssh_key::{Algorithm, LineEnding, PrivateKey};
    let fail = |e: ssh_key::Error| OpError::Stage {
        stage: "reidentify".into(),
        source: Box::new(e),
    };
    let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(fail)?;
    let private = key.to_openssh(LineEnding::LF).map_err(fail)?;
    let public = key.public_key().to_openssh().map_err(fail)?;
    Ok(vec![
        HostKeyFile {
            name: "ssh_host_ed25519_key".into(),
            contents: private.to_string(),
        },
        HostKeyFile {
            name: "ssh_host_ed25519_key.pub".into(),
            contents: format!("{public} root@restored\n"),
        },
    ])
}

impl Lifecycle {
    /// `vm create --from-snapshot`: checks the snapshot, records the VM with
    /// its spec and capabilities, and starts it from the snapshot. A
    /// refusal (an unusable snapshot, a backend that cannot restore it)
    /// leaves nothing behind; a later failure leaves the VM in `error`, as
    /// a create's start does.
    pub(super) async fn create_from_snapshot(
        &self,
        req: CreateVmRequest,
        snap: &str,
        progress: &Progress,
    ) -> Result<VmRecord, OpError> {
        begin_stage(progress, "validate", format!("checking snapshot {snap}"));
        let restore = self.restore_of(&req, snap)?;
        let name = match &req.name {
            Some(n) => VmName::parse(n).map_err(|e| OpError::Invalid(e.to_string()))?,
            None => VmName::generate(),
        };
        timings::name_vm(name.as_str());
        let view = &restore.manifest.view;
        let mut spec = view.spec.clone();
        spec.vmm = view.backend;
        let mut vm = VmRecord::new(name, spec, view.caps.clone(), now_unix());
        let guard = self.record_new(&vm, super::pool::Owner::User).await?;
        let dir = self.vm_dir(&vm.id);
        let made = std::fs::create_dir_all(&dir)
            .map_err(|e| OpError::Io(format!("Cannot create {}", dir.display()), e));
        let started = match made {
            Ok(()) => self.start_from(&mut vm, progress, Some(&restore)).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(()) => Ok(vm),
            Err(e @ (OpError::Invalid(_) | OpError::Io(..))) => {
                // The start rolled its hooks back; the record and the
                // directory go too.
                self.discard_new(&vm, guard).await;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Snapshot `snap` checked for a restore by `req`: the flags a snapshot
    /// decides are refused, the backend must be the snapshot's, and the
    /// guest must have had the agent (the identity refresh goes through it).
    fn restore_of(&self, req: &CreateVmRequest, snap: &str) -> Result<Restore, OpError> {
        let decided = [
            ("--image", req.image.is_some()),
            ("--kernel-ref", req.kernel_ref.is_some()),
            ("--kernel", req.kernel.is_some()),
            ("--initrd", req.initrd.is_some()),
            ("--rootfs", req.rootfs.is_some()),
            ("--vcpu", req.vcpus.is_some()),
            ("--memory", req.memory_mib.is_some()),
            ("--disk-size", req.disk_size.is_some()),
            ("--cap", !req.caps.is_empty()),
            ("--boot-args", req.boot_args.is_some()),
            ("--no-start", req.no_start),
        ];
        if let Some((flag, _)) = decided.iter().find(|(_, set)| *set) {
            return Err(OpError::Invalid(format!(
                "{flag} cannot go with --from-snapshot: the snapshot decides the VM's image, shape and capabilities; drop {flag}"
            )));
        }
        let store = self.snapshot_store();
        let manifest = store.manifest(snap)?;
        let backend = req.vmm.unwrap_or(manifest.view.backend);
        let manifest = store.restorable(snap, backend)?;
        let Some(secret) = manifest.agent_secret.clone() else {
            return Err(OpError::Invalid(format!(
                "Snapshot {snap:?} is of a VM without the vsock-agent capability: a restored guest gets its new name, address and keys through the agent; snapshot a VM created with --cap vsock-agent"
            )));
        };
        Ok(Restore {
            name: snap.to_owned(),
            manifest,
            secret,
        })
    }

    /// Gives the restored guest `vm`'s identity through its agent, which
    /// still answers to the snapshot's secret: its name, the NIC's MAC and
    /// address (the snapshot's removed), fresh SSH host keys and the
    /// secret this start drew.
    pub(super) async fn reidentify(
        &self,
        vm: &VmRecord,
        restore: &Restore,
        machine: &MachineSpec,
        network: Option<GuestNetwork>,
        progress: &Progress,
    ) -> Result<(), OpError> {
        begin_stage(
            progress,
            "reidentify",
            format!("giving the restored guest the identity of {}", vm.name),
        );
        let Some(vsock) = &machine.vsock else {
            return Err(OpError::Invalid(format!(
                "VM {} has no vsock device to reach the restored guest's agent through",
                vm.name
            )));
        };
        let secret_file = self.vm_dir(&vm.id).join(EXEC_SECRET_FILE);
        let new_secret = std::fs::read_to_string(&secret_file)
            .map_err(|e| OpError::Io(format!("reading {}", secret_file.display()), e))?;
        let old = restore.manifest.view.guest.as_ref();
        let req = Reidentify {
            hostname: vm.name.to_string(),
            mac: machine.nics.first().map(|n| n.mac.clone()),
            previous_address: old
                .and_then(|g| g.network.first())
                .map(|n| n.address.clone()),
            network,
            ssh_host_keys: fresh_host_keys()?,
            new_secret: new_secret.trim().to_owned(),
        };
        let (uds, old_secret) = (vsock.uds_path.clone(), restore.secret.clone());
        let timeout = Duration::from_secs(self.config.agent_timeout_secs);
        let done = blocking(move || {
            // The VMM may bind the agent's socket a moment after it
            // resumed the guest: only a failed connect is retried (nothing
            // was sent then).
            let deadline = std::time::Instant::now() + timeout;
            let mut pause = Duration::from_millis(1);
            loop {
                match AgentClient::new(&uds, timeout).reidentify(&old_secret, &req) {
                    Err(VsockError::Connect(..))
                        if std::time::Instant::now() + pause < deadline =>
                    {
                        std::thread::sleep(pause);
                        pause = (pause * 2).min(Duration::from_millis(50));
                    }
                    done => return done,
                }
            }
        })
        .await?
        .map_err(|e| OpError::Stage {
            stage: "reidentify".into(),
            source: Box::new(e),
        })?;
        tracing::info!(vm = %vm.name, applied = ?done.applied, "restored guest re-identified");
        // A restored agent was listening before its snapshot and announces
        // nothing; it just answered, so say so for it (PostStart waits for
        // the announcement before it asks). Without a listener (another
        // capability set) there is nobody to tell.
        if let Err(e) = banger_vmm::vsock::announce_ready(
            &vsock.uds_path,
            banger_guest_protocol::api::READY_RESTORED,
        ) {
            tracing::debug!(vm = %vm.name, "no announcement listener for the restored agent: {e}");
        }
        Ok(())
    }
}
