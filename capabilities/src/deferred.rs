//! Host work a hook starts and a later hook of the same VM waits for, so it
//! runs beside the hooks in between instead of before them (issue 12): the
//! work disk's sync and the network's guard rules, waited for before the
//! VMM starts, and the DNS record, waited for before the VM counts as
//! started.
//!
//! A job runs on a thread of its own, which starts in the calling thread's
//! namespaces (a hook run in a test's network namespace keeps it). Every
//! path that follows the starting hook waits: the later hook, or the
//! teardown of a start rolled back before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use banger_api::model::VmId;
use banger_core::capability::CapError;
use banger_core::lifecycle::panic_message;

type Job = Box<dyn FnOnce() -> Result<(), CapError> + Send>;

/// The jobs of one kind, by VM.
#[derive(Debug)]
pub(crate) struct Deferred {
    /// Names the threads (`WHAT-VMID`, cut to the kernel's 15 bytes).
    what: &'static str,
    jobs: Mutex<HashMap<VmId, JoinHandle<Result<(), CapError>>>>,
}

impl Deferred {
    pub(crate) fn new(what: &'static str) -> Self {
        Deferred {
            what,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<VmId, JoinHandle<Result<(), CapError>>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `job` for `vm`. A job of `vm` not waited for yet is waited for
    /// first, and its failure returned instead. When no thread can be
    /// started the job runs here, and so does its failure.
    pub(crate) fn start(
        &self,
        vm: &VmId,
        job: impl FnOnce() -> Result<(), CapError> + Send + 'static,
    ) -> Result<(), CapError> {
        self.wait(vm)?;
        let slot: Arc<Mutex<Option<Job>>> = Arc::new(Mutex::new(Some(Box::new(job))));
        let theirs = slot.clone();
        let mut name = format!("{}-{}", self.what, vm.as_str());
        name.truncate(15);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let job = take(&theirs);
            job.map_or(Ok(()), |job| job())
        });
        match spawned {
            Ok(handle) => {
                self.jobs().insert(vm.clone(), handle);
                Ok(())
            }
            Err(_) => take(&slot).map_or(Ok(()), |job| job()),
        }
    }

    /// Waits for `vm`'s job: its result, or `Ok` when there is none.
    pub(crate) fn wait(&self, vm: &VmId) -> Result<(), CapError> {
        let Some(handle) = self.jobs().remove(vm) else {
            return Ok(());
        };
        handle.join().unwrap_or_else(|panic| {
            Err(CapError::msg(format!(
                "{} panicked: {}",
                self.what,
                panic_message(panic.as_ref())
            )))
        })
    }
}

impl Deferred {
    /// How many jobs no hook has waited for yet.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.jobs().len()
    }
}

fn take(slot: &Mutex<Option<Job>>) -> Option<Job> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn vm(id: &str) -> VmId {
        VmId::from_stored(id.to_string())
    }

    #[test]
    fn a_job_runs_beside_its_caller_until_waited_for() {
        let d = Deferred::new("test");
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        d.start(&vm("aa00000000000001"), move || {
            // Waits for the caller's go, which a start that ran the job
            // itself never gives: the job then fails, and so does start.
            go_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .map_err(|e| CapError::with("no go", e))?;
            done_tx.send(()).map_err(|e| CapError::with("no done", e))
        })
        .unwrap();
        assert!(done_rx.try_recv().is_err());
        go_tx.send(()).unwrap();
        d.wait(&vm("aa00000000000001")).unwrap();
        assert!(done_rx.try_recv().is_ok());
        // Waited for once: nothing is left.
        d.wait(&vm("aa00000000000001")).unwrap();
    }

    #[test]
    fn a_failure_or_panic_comes_back_to_the_waiter_of_that_vm_only() {
        let d = Deferred::new("guard");
        d.start(&vm("aa00000000000001"), || Err(CapError::msg("no rules")))
            .unwrap();
        d.start(&vm("aa00000000000002"), || Ok(())).unwrap();
        d.start(&vm("aa00000000000003"), || panic!("nft broke"))
            .unwrap();
        let failed = d.wait(&vm("aa00000000000001")).unwrap_err();
        assert!(failed.to_string().contains("no rules"), "{failed}");
        d.wait(&vm("aa00000000000002")).unwrap();
        let panicked = d.wait(&vm("aa00000000000003")).unwrap_err();
        assert_eq!(panicked.to_string(), "guard panicked: nft broke");
    }

    #[test]
    fn a_second_start_waits_for_the_first_and_reports_its_failure() {
        let d = Deferred::new("dns");
        d.start(&vm("aa00000000000001"), || Err(CapError::msg("first")))
            .unwrap();
        let err = d.start(&vm("aa00000000000001"), || Ok(())).unwrap_err();
        assert!(err.to_string().contains("first"), "{err}");
        // The second was not started.
        d.wait(&vm("aa00000000000001")).unwrap();
    }
}
