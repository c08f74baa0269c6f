//! Keeping the store true to the host. VMM processes outlive the daemon, so
//! on start the daemon compares every record with what is actually running;
//! while it runs, it notices VMMs that exit behind its back.

use crate::capability::TeardownReason;
use crate::lifecycle::{Lifecycle, OpError, Progress, render_chain, set_failure};
use banger_api::model::{VmRecord, VmState};
use banger_vmm::process_alive;

/// What reconciliation did to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconciled {
    /// Still running with the same VMM process.
    StillRunning(String),
    /// Its VMM is gone; now stopped and torn down.
    MarkedStopped(String),
    /// It was mid-operation when the daemon stopped; now in error.
    MarkedError(String),
}

impl std::fmt::Display for Reconciled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reconciled::StillRunning(n) => write!(f, "{n}: still running"),
            Reconciled::MarkedStopped(n) => write!(f, "{n}: VMM gone, marked stopped"),
            Reconciled::MarkedError(n) => {
                write!(f, "{n}: caught mid-start, rolled back, marked error")
            }
        }
    }
}

impl Lifecycle {
    /// Reconciles every VM with the host. Called once at daemon start.
    pub async fn reconcile(&self) -> Result<Vec<Reconciled>, OpError> {
        let mut out = Vec::new();
        for vm in self.list().await? {
            let _guard = self.locks.lock(&vm.id).await;
            let Some(mut vm) = self.reread(&vm).await? else {
                continue;
            };
            let alive = vm.vmm.as_ref().is_some_and(process_alive);
            match (vm.state, alive) {
                (VmState::Running, true) => out.push(Reconciled::StillRunning(vm.name.to_string())),
                (VmState::Running, false) | (VmState::Stopping, _) => {
                    self.mark_stopped(&mut vm).await?;
                    out.push(Reconciled::MarkedStopped(vm.name.to_string()));
                }
                (VmState::Starting, _) => {
                    // We cannot know how far the start got: undo it.
                    if let Some(p) = vm.vmm.take() {
                        let vmm = self.vmm_for(&vm);
                        let _ = super::blocking(move || vmm.kill(&p)).await;
                    }
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
                    out.push(Reconciled::MarkedError(vm.name.to_string()));
                }
                (VmState::Created | VmState::Stopped | VmState::Error, _) => {}
            }
        }
        Ok(out)
    }

    /// Finds running VMs whose VMM has exited and marks them stopped.
    /// Returns the names it changed.
    pub async fn reap_dead(&self) -> Result<Vec<String>, OpError> {
        let mut changed = Vec::new();
        for vm in self.list().await? {
            if vm.state != VmState::Running || vm.vmm.as_ref().is_some_and(process_alive) {
                continue;
            }
            let _guard = self.locks.lock(&vm.id).await;
            let Some(mut vm) = self.reread(&vm).await? else {
                continue;
            };
            if vm.state == VmState::Running && !vm.vmm.as_ref().is_some_and(process_alive) {
                tracing::warn!(vm = %vm.name, "VMM exited; marking stopped");
                self.mark_stopped(&mut vm).await?;
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
