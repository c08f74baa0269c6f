//! A VMM that exits while a start waits on its guest (the agent's health
//! check, any capability's PostStart) fails the start at once, quoting how
//! it ended and the last lines of its log and of the guest console, instead
//! of the wait running out and blaming the guest. A running VM's VMM that
//! fails later (a non-zero exit or a signal) leaves the VM in `error` with
//! the same report (see [`Lifecycle::reap_dead`]).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::lifecycle::start::{SERIAL_LOG, VMM_LOG};
use crate::lifecycle::{Lifecycle, OpError};
use banger_api::model::{VmRecord, VmmProcess};
use banger_vmm::{LOG_TAIL_LINES, exit_status, is_failure, log_tail};

/// The stage a running VM's failed VMM is recorded under.
const VMM_EXIT_STAGE: &str = "vmm_exit";

/// How often a wait checks whether the VMM is still there.
const EXIT_POLL: Duration = Duration::from_millis(50);

/// The VMM exited during a stage of the start.
#[derive(Debug, thiserror::Error)]
#[error(
    "The VMM ({vmm}, pid {pid}) exited with {status} {during}; see `banger vm logs {vm}`\n\
     last lines of {vmm_log}:\n{vmm_tail}\n\
     last lines of the guest console {serial_log}:\n{serial_tail}"
)]
pub struct VmmExited {
    /// Backend name.
    pub vmm: &'static str,
    /// Its pid.
    pub pid: u32,
    /// How it ended (`exit status: 1`).
    pub status: String,
    /// When: `during post_start:vsock-agent`, `while the VM was running`.
    pub during: String,
    /// The VM's name.
    pub vm: String,
    /// The VMM's own log.
    pub vmm_log: String,
    /// Its last lines.
    pub vmm_tail: String,
    /// The guest console.
    pub serial_log: String,
    /// Its last lines.
    pub serial_tail: String,
}

impl VmmExited {
    fn new(
        vmm: &'static str,
        p: &VmmProcess,
        status: String,
        during: String,
        vm: &VmRecord,
        dir: &Path,
    ) -> Self {
        let (vmm_log, serial_log) = (dir.join(VMM_LOG), dir.join(SERIAL_LOG));
        VmmExited {
            vmm,
            pid: p.pid,
            status,
            during,
            vm: vm.name.to_string(),
            vmm_tail: log_tail(&vmm_log, LOG_TAIL_LINES),
            vmm_log: vmm_log.display().to_string(),
            serial_tail: log_tail(&serial_log, LOG_TAIL_LINES),
            serial_log: serial_log.display().to_string(),
        }
    }
}

/// Resolves once `p` has exited, with how it ended.
async fn exited(p: VmmProcess) -> String {
    loop {
        if let Some(status) = exit_status(&p) {
            return status;
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
}

impl Lifecycle {
    /// For running VM `vm` whose VMM is gone: the failure to record when
    /// the VMM failed (a non-zero exit or a signal; stage `vmm_exit`), or
    /// `None` when it ended cleanly (the guest shut down) or how is not
    /// known (a VMM of an earlier daemon).
    pub(super) fn vmm_failure(&self, vm: &VmRecord) -> Option<OpError> {
        let p = vm.vmm.as_ref()?;
        let status = exit_status(p).filter(|s| is_failure(s))?;
        Some(OpError::Stage {
            stage: VMM_EXIT_STAGE.to_string(),
            source: Box::new(VmmExited::new(
                self.vmm_for(vm).name(),
                p,
                status,
                "while the VM was running".to_string(),
                vm,
                &self.vm_dir(&vm.id),
            )),
        })
    }

    /// Runs `wait`, a stage of `vm`'s start that needs its VMM alive,
    /// racing it against the VMM's exit: an exit fails the stage at once
    /// with [`VmmExited`], and so does a failure of `wait` that the exit
    /// explains (an agent that stopped answering because its VM is gone).
    pub(super) async fn unless_vmm_exits<T>(
        &self,
        vm: &VmRecord,
        stage: &str,
        wait: impl Future<Output = Result<T, OpError>>,
    ) -> Result<T, OpError> {
        let Some(p) = vm.vmm.clone() else {
            return wait.await;
        };
        let fail = |status: String| OpError::Stage {
            stage: stage.to_string(),
            source: Box::new(VmmExited::new(
                self.vmm_for(vm).name(),
                &p,
                status,
                format!("during {stage}"),
                vm,
                &self.vm_dir(&vm.id),
            )),
        };
        tokio::select! {
            r = wait => match r {
                Ok(v) => Ok(v),
                // The hook may have noticed first; the exit is the cause.
                Err(e) => match exit_status(&p) {
                    Some(status) => Err(fail(status)),
                    None => Err(e),
                },
            },
            status = exited(p.clone()) => Err(fail(status)),
        }
    }
}
