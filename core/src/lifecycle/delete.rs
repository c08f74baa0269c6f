//! `delete`: mark the VM deleting, kill the VMM if needed, Teardown(delete)
//! for every enabled capability in reverse order, then remove the VM's
//! directory and row. A teardown failure keeps the VM (in `error`, the mark
//! cleared) so nothing leaks and the delete can be retried; `force` deletes
//! anyway and reports what may have leaked. A daemon killed mid-delete
//! finds the mark on restart and finishes the delete (reconcile).

use crate::capability::TeardownReason;
use crate::lifecycle::stop::StopMode;
use crate::lifecycle::{
    Lifecycle, OpError, Progress, begin_stage, blocking, crash_point, set_failure, timings,
};
use banger_api::model::VmRecord;

impl Lifecycle {
    /// Deletes a VM and everything it owns. Returns the record as it was.
    /// With `force`, teardown failures are logged and the delete goes on.
    pub async fn delete(
        &self,
        name: &str,
        force: bool,
        progress: &Progress,
    ) -> Result<VmRecord, OpError> {
        let (guard, vm) = self.lock_by_name(name).await?;
        let before = vm.clone();
        timings::timed(name, "delete", self.delete_locked(vm, force, progress)).await?;
        drop(guard);
        self.locks.forget(&before.id);
        Ok(before)
    }

    /// The delete sequence; the caller holds the VM's lock.
    pub(crate) async fn delete_locked(
        &self,
        mut vm: VmRecord,
        force: bool,
        progress: &Progress,
    ) -> Result<(), OpError> {
        self.set_deleting(&vm, true).await?;
        crash_point("delete:marked");
        if let Err(e) = self.stop_locked(&mut vm, StopMode::Kill, progress).await {
            // A VMM we could not kill is still running: never forget it.
            if !force || vm.vmm.is_some() {
                self.set_deleting(&vm, false).await?;
                return Err(e);
            }
            tracing::warn!(vm = %vm.name, "forced delete: {}", crate::lifecycle::render_chain(&e));
        }

        // Capabilities keep data across stops (the work disk): every enabled
        // one gets Teardown(delete), whether or not it is prepared now.
        let mut order: Vec<String> = vm.prepared.iter().rev().cloned().collect();
        for c in vm.caps.iter().rev() {
            if !order.contains(&c.name) {
                order.push(c.name.clone());
            }
        }
        let errors = self
            .teardown(&mut vm, order, TeardownReason::Delete, progress)
            .await;
        if force {
            for e in &errors {
                tracing::warn!(vm = %vm.name, "forced delete: {}", crate::lifecycle::render_chain(e));
            }
        } else if let Some(e) = errors.into_iter().next() {
            set_failure(&mut vm, &e);
            self.save(&mut vm).await?;
            self.set_deleting(&vm, false).await?;
            return Err(e);
        }
        crash_point("delete:torn_down");

        begin_stage(progress, "remove", format!("removing {}", vm.name));
        let dir = self.vm_dir(&vm.id);
        let sock = self.paths.vmm_socket(&vm.id);
        let removed = blocking(move || {
            let _ = std::fs::remove_file(&sock);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(OpError::Io(format!("Cannot remove {}", dir.display()), e)),
            }
        })
        .await?;
        removed?;
        crash_point("delete:dir_removed");
        let store = self.store.clone();
        let id = vm.id.clone();
        blocking(move || store.delete_vm(&id)).await??;
        Ok(())
    }

    async fn set_deleting(&self, vm: &VmRecord, deleting: bool) -> Result<(), OpError> {
        let store = self.store.clone();
        let id = vm.id.clone();
        Ok(blocking(move || store.set_deleting(&id, deleting)).await??)
    }
}
