//! Keeping the store true to the host. VMM processes outlive the daemon, so
//! on start the daemon compares every record with what is actually running
//! and finishes what a killed daemon left half done; while it runs, it
//! notices VMMs that exit behind its back.
//!
//! At daemon start, per VM (under its lock):
//! - marked deleting: the delete is finished (VMM killed, Teardown(delete),
//!   directory and row removed);
//! - `running` with its VMM alive: left alone; with it gone: Teardown(stop),
//!   `stopped`;
//! - `stopping`: its VMM (if any) is killed, Teardown(stop), `stopped`;
//! - `starting`: its VMM (recorded right after spawn) is killed, everything
//!   prepared is rolled back, `error`;
//! - `created`, `stopped` or `error` with a live VMM: the VMM is killed (a
//!   second VMM must never boot the same disk);
//! - `created` without its root disk (a create killed before the clone
//!   finished): deleted.
//!
//! Then what no VM owns: VM directories without a row, VMM sockets (and the
//! QEMU backend's side files) of VMs that are not running, and staging files
//! of an interrupted root-disk clone. Image and kernel staging dirs are the
//! artifacts' sweep; taps, rules and DNS records the capabilities'
//! `daemon_start`.

use std::collections::HashSet;
use std::path::Path;

use crate::capability::TeardownReason;
use crate::lifecycle::start::ROOT_DISK;
use crate::lifecycle::{Lifecycle, OpError, Progress, render_chain, set_failure};
use banger_api::model::{VmRecord, VmState, VmmProcess};
use banger_vmm::process_alive;

/// The QEMU backend's record of its vsock backend process, beside the
/// VMM socket (`<id>.sock.vsock-backend.json`).
const QEMU_VSOCK_BACKEND_RECORD: &str = ".vsock-backend.json";

/// What reconciliation did to one VM or leftover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Still running with the same VMM process.
    StillRunning(String),
    /// Its VMM is gone; now stopped and torn down.
    MarkedStopped(String),
    /// It was mid-operation when the daemon stopped; now in error.
    MarkedError(String),
    /// Its stop was interrupted: VMM killed, torn down, now stopped.
    FinishedStop(String),
    /// Its delete was interrupted (or its create never got a root disk):
    /// now gone.
    Deleted(String),
    /// It was not running but a VMM of it was: killed.
    KilledStrayVmm(String),
    /// A directory or socket no VM owns: removed.
    RemovedOrphan(String),
}

impl std::fmt::Display for Reconciled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reconciled::StillRunning(n) => write!(f, "{n}: still running"),
            Reconciled::MarkedStopped(n) => write!(f, "{n}: VMM gone, marked stopped"),
            Reconciled::MarkedError(n) => {
                write!(f, "{n}: caught mid-start, rolled back, marked error")
            }
            Reconciled::FinishedStop(n) => write!(f, "{n}: caught mid-stop, stop finished"),
            Reconciled::Deleted(n) => write!(f, "{n}: caught mid-delete or mid-create, deleted"),
            Reconciled::KilledStrayVmm(n) => write!(f, "{n}: not running, its stray VMM killed"),
            Reconciled::RemovedOrphan(p) => write!(f, "{p}: owned by no VM, removed"),
        }
    }
}

impl Lifecycle {
    /// Reconciles every VM with the host. Called once at daemon start,
    /// before the API serves.
    pub async fn reconcile(&self) -> Result<Vec<Reconciled>, OpError> {
        let mut out = Vec::new();
        for vm in self.list().await? {
            let _guard = self.locks.lock(&vm.id).await;
            let Some(vm) = self.reread(&vm).await? else {
                continue;
            };
            if let Some(r) = self.reconcile_vm(vm).await? {
                out.push(r);
            }
        }
        let vms = self.list().await?;
        let paths = self.paths.clone();
        let orphans = super::blocking(move || remove_orphans(&paths, &vms)).await?;
        out.extend(orphans.into_iter().map(Reconciled::RemovedOrphan));
        Ok(out)
    }

    async fn reconcile_vm(&self, mut vm: VmRecord) -> Result<Option<Reconciled>, OpError> {
        let name = vm.name.to_string();
        let store = self.store.clone();
        let id = vm.id.clone();
        let deleting = super::blocking(move || store.is_deleting(&id)).await??;
        let no_disk =
            vm.state == VmState::Created && !self.vm_dir(&vm.id).join(ROOT_DISK).is_file();
        if deleting || no_disk {
            let id = vm.id.clone();
            return match self.delete_locked(vm, false, &Progress::none()).await {
                Ok(()) => {
                    self.locks.forget(&id);
                    Ok(Some(Reconciled::Deleted(name)))
                }
                Err(e) => {
                    tracing::warn!(vm = %name, "finishing an interrupted delete failed: {}", render_chain(&e));
                    Ok(Some(Reconciled::MarkedError(name)))
                }
            };
        }
        let alive = vm.vmm.as_ref().is_some_and(process_alive);
        Ok(match (vm.state, alive) {
            (VmState::Running, true) => Some(Reconciled::StillRunning(name)),
            (VmState::Running, false) => {
                self.mark_stopped(&mut vm).await?;
                Some(Reconciled::MarkedStopped(name))
            }
            (VmState::Stopping, _) => {
                self.kill_recorded(&mut vm).await?;
                self.mark_stopped(&mut vm).await?;
                Some(Reconciled::FinishedStop(name))
            }
            (VmState::Starting, _) => {
                // We cannot know how far the start got: undo it.
                self.kill_recorded(&mut vm).await?;
                let prepared: Vec<String> = vm.prepared.iter().rev().cloned().collect();
                let _ = self
                    .teardown(
                        &mut vm,
                        prepared,
                        TeardownReason::Rollback,
                        &Progress::none(),
                    )
                    .await;
                let err = OpError::Stage {
                    stage: "daemon_restart".to_string(),
                    source: "bangerd stopped while this VM was starting; start it again".into(),
                };
                set_failure(&mut vm, &err);
                self.save(&mut vm).await?;
                Some(Reconciled::MarkedError(name))
            }
            (VmState::Created | VmState::Stopped | VmState::Error, true) => {
                self.kill_recorded(&mut vm).await?;
                Some(Reconciled::KilledStrayVmm(name))
            }
            (VmState::Created | VmState::Stopped | VmState::Error, false) => {
                // A dead VMM, or none but a QEMU vsock backend left running.
                self.kill_recorded(&mut vm).await?;
                None
            }
        })
    }

    /// Kills the VM's recorded VMM (a no-op if it is gone or its pid was
    /// reused) and forgets it. A VMM that survives SIGKILL stays recorded
    /// and fails reconciliation: it must never be forgotten while alive.
    async fn kill_recorded(&self, vm: &mut VmRecord) -> Result<(), OpError> {
        let socket = self.paths.vmm_socket(&vm.id);
        let mut side = socket.clone().into_os_string();
        side.push(QEMU_VSOCK_BACKEND_RECORD);
        if vm.vmm.is_none() && std::path::Path::new(&side).exists() {
            // A QEMU start killed after its vsock backend was spawned but
            // before QEMU itself was: the backend's own record finds it. No
            // QEMU process is named (pid 0 never passes `process_alive`).
            vm.vmm = Some(VmmProcess {
                pid: 0,
                start_time: u64::MAX,
                api_socket: socket,
            });
        }
        if let Some(p) = vm.vmm.clone() {
            let vmm = self.vmm_for(vm);
            super::blocking(move || vmm.kill(&p))
                .await?
                .map_err(|e| OpError::Stage {
                    stage: "kill_vmm".to_string(),
                    source: Box::new(e),
                })?;
            vm.vmm = None;
            self.save(vm).await?;
        }
        Ok(())
    }

    /// Finds running VMs whose VMM has exited and marks them stopped, or
    /// `error` (stage `vmm_exit`, with its exit status and last log lines)
    /// when the VMM failed. Returns the names it changed.
    pub async fn reap_dead(&self) -> Result<Vec<String>, OpError> {
        let mut changed = Vec::new();
        for vm in self.list().await? {
            if vm.state != VmState::Running || !vmm_gone(&vm) {
                continue;
            }
            let _guard = self.locks.lock(&vm.id).await;
            let Some(mut vm) = self.reread(&vm).await? else {
                continue;
            };
            if vm.state == VmState::Running && vmm_gone(&vm) {
                let failure = self.vmm_failure(&vm);
                tracing::warn!(vm = %vm.name, "VMM exited; marking stopped");
                self.mark_stopped(&mut vm).await?;
                // A teardown failure, if any, stays the recorded one.
                if let Some(err) = failure.filter(|_| vm.state == VmState::Stopped) {
                    tracing::warn!(vm = %vm.name, "{}", render_chain(&err));
                    set_failure(&mut vm, &err);
                    self.save(&mut vm).await?;
                }
                changed.push(vm.name.to_string());
            }
        }
        Ok(changed)
    }

    async fn mark_stopped(&self, vm: &mut VmRecord) -> Result<(), OpError> {
        vm.vmm = None;
        let prepared: Vec<String> = vm.prepared.iter().rev().cloned().collect();
        let errors = self
            .teardown(vm, prepared, TeardownReason::Stop, &Progress::none())
            .await;
        vm.state = VmState::Stopped;
        if let Some(e) = errors.into_iter().next() {
            tracing::warn!(vm = %vm.name, "teardown after VMM exit failed: {}", render_chain(&e));
            set_failure(vm, &e);
        }
        let _ = std::fs::remove_file(self.paths.vmm_socket(&vm.id));
        self.save(vm).await
    }

    async fn reread(&self, vm: &VmRecord) -> Result<Option<VmRecord>, OpError> {
        let store = self.store.clone();
        let id = vm.id.clone();
        Ok(super::blocking(move || store.get_vm(&id)).await??)
    }
}

/// Whether `vm`'s VMM is gone, and (for one this daemon spawned) reaped,
/// so how it ended is known.
fn vmm_gone(vm: &VmRecord) -> bool {
    vm.vmm
        .as_ref()
        .is_none_or(|p| !process_alive(p) && banger_vmm::exit_status(p).is_some())
}

/// Removes what no VM owns: directories under `vms/` without a row, a
/// running VM's staging files of an interrupted clone, and the sockets and
/// side files in the runtime dir of VMs that are not running (or gone).
/// Returns what it removed. Failures are logged: a leftover is not worth
/// refusing to start over.
fn remove_orphans(paths: &banger_api::paths::Paths, vms: &[VmRecord]) -> Vec<String> {
    let mut removed = Vec::new();
    let known: HashSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
    let running: HashSet<&str> = vms
        .iter()
        .filter(|v| v.vmm.is_some())
        .map(|v| v.id.as_str())
        .collect();
    let mut remove = |path: &Path| {
        let r = match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
            Ok(_) => std::fs::remove_file(path),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) => tracing::warn!(path = %path.display(), "cannot remove a leftover: {e}"),
        }
    };
    for entry in read_dir(&paths.vms_dir()) {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !known.contains(name.as_ref()) {
            remove(&path);
            continue;
        }
        // `.rootfs.ext4.staging-PID-RAND`: a clone the daemon was killed in.
        for inner in read_dir(&path) {
            if inner.file_name().to_string_lossy().contains(".staging-") {
                remove(&inner.path());
            }
        }
    }
    let sockets = paths.runtime_dir.join("vms");
    for entry in read_dir(&sockets) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `<id>.sock`, and the QEMU backend's `<id>.sock.vhost` and
        // `<id>.sock.vsock-backend.json`.
        let owner = name.split_once(".sock").map_or(name.as_ref(), |(id, _)| id);
        if !running.contains(owner) {
            remove(&entry.path());
        }
    }
    removed
}

/// The entries of `dir`; none if it is missing or unreadable.
fn read_dir(dir: &Path) -> Vec<std::fs::DirEntry> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}
