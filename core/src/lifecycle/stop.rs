//! `stop`, `kill` and `restart`: end the VMM, then Teardown(stop) in reverse
//! order of preparation. Disks survive.

use crate::capability::TeardownReason;
use crate::lifecycle::{
    Lifecycle, OpError, Progress, begin_stage, blocking, crash_point, render_chain, timings,
};
use banger_api::model::{VmRecord, VmState};

/// How the VMM is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopMode {
    /// Ask the guest to shut down, kill after the grace period.
    Graceful,
    /// Kill at once.
    Kill,
}

impl Lifecycle {
    /// Gracefully stops a VM. Stopping a VM that is not running only tears
    /// down leftovers.
    pub async fn stop(&self, name: &str, progress: &Progress) -> Result<VmRecord, OpError> {
        let (_guard, mut vm) = self.lock_by_name(name).await?;
        let stop = self.stop_locked(&mut vm, StopMode::Graceful, progress);
        timings::timed(name, "stop", stop).await?;
        Ok(vm)
    }

    /// Kills a VM's VMM at once, then tears down like `stop`.
    pub async fn kill(&self, name: &str, progress: &Progress) -> Result<VmRecord, OpError> {
        let (_guard, mut vm) = self.lock_by_name(name).await?;
        let kill = self.stop_locked(&mut vm, StopMode::Kill, progress);
        timings::timed(name, "kill", kill).await?;
        Ok(vm)
    }

    /// Stops (if running) and starts a VM, under one lock.
    pub async fn restart(&self, name: &str, progress: &Progress) -> Result<VmRecord, OpError> {
        let (_guard, mut vm) = self.lock_by_name(name).await?;
        let restart = async {
            self.stop_locked(&mut vm, StopMode::Graceful, progress)
                .await?;
            crash_point("restart:stopped");
            self.start_locked(&mut vm, progress).await
        };
        timings::timed(name, "restart", restart).await?;
        Ok(vm)
    }

    pub(crate) async fn stop_locked(
        &self,
        vm: &mut VmRecord,
        mode: StopMode,
        progress: &Progress,
    ) -> Result<(), OpError> {
        let was = vm.state;
        if let Some(process) = vm.vmm.clone() {
            vm.state = VmState::Stopping;
            self.save(vm).await?;
            crash_point("stop:stopping");
            let vmm = self.vmm_for(vm);
            let grace = self.stop_grace();
            let result = match mode {
                StopMode::Graceful => {
                    begin_stage(
                        progress,
                        "shutdown",
                        format!("asking {} to shut down", vm.name),
                    );
                    blocking(move || vmm.shutdown(&process, grace)).await?
                }
                StopMode::Kill => {
                    begin_stage(progress, "kill", format!("killing {}", vm.name));
                    blocking(move || vmm.kill(&process)).await?
                }
            };
            if let Err(e) = result {
                let err = OpError::Stage {
                    stage: "stop_vmm".to_string(),
                    source: Box::new(e),
                };
                // The VMM may still be there: keep the record pointing at it.
                vm.state = was;
                self.save(vm).await?;
                return Err(err);
            }
            vm.vmm = None;
            self.save(vm).await?;
            crash_point("stop:vmm_gone");
        }
        let prepared: Vec<String> = vm.prepared.iter().rev().cloned().collect();
        let errors = self
            .teardown(vm, prepared, TeardownReason::Stop, progress)
            .await;
        if let Some(e) = errors.into_iter().next() {
            let stage = e.stage().unwrap_or("teardown").to_string();
            vm.state = VmState::Error;
            vm.last_error = Some(banger_api::model::Failure {
                stage,
                cause: render_chain(&e),
                at: banger_api::model::now_unix(),
            });
            self.save(vm).await?;
            return Err(e);
        }
        if matches!(
            was,
            VmState::Running | VmState::Starting | VmState::Stopping
        ) {
            vm.state = VmState::Stopped;
            self.save(vm).await?;
            progress.stage("stopped", format!("{} stopped", vm.name));
        }
        Ok(())
    }
}
