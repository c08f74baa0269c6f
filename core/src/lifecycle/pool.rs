//! The warm pool (`docs/warm-pool.md`): with `warm_pool = N` the daemon
//! keeps N VMs of the default shape booted and idle, and a `vm create` (or
//! `vm run`) asking for exactly that shape, without a name, takes one
//! instead of booting. The pooled VMs are the daemon's: not listed, not
//! found by name, until a create takes one; then it is an ordinary VM.
//!
//! ```text
//! daemon start:  delete the pooled VMs an earlier daemon left → fill
//! create:        default shape, no name? → take a running pooled VM → wake the refill
//! refill loop:   delete pooled VMs that are not running → create pooled VMs up to N → sleep
//! daemon stop:   stop the loop after its current create → delete the pooled VMs
//! ```
//!
//! A refill that fails is logged and kept for `banger vm pool`; the next
//! create of the pool's shape wakes the loop to try again, so a broken
//! image does not make the daemon boot in a loop.

use std::sync::Arc;
use std::time::Duration;

use super::{Lifecycle, OpError, Progress, begin_stage, blocking, render_chain, timings};
use banger_api::api::{CreateVmRequest, PoolView};
use banger_api::model::{VmId, VmRecord, VmState};

/// Who a new VM's record belongs to ([`Lifecycle::record_new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Owner {
    /// The user who asked for it.
    User,
    /// The warm pool, for the image of that name (`None`: the default).
    Pool { image: Option<String> },
}

/// The pool's in-memory half (its VMs are rows of the store's `vm_pool`).
#[derive(Debug, Default)]
pub(super) struct PoolState {
    /// Wakes the refill loop: a create the pool could serve came, taken
    /// or not.
    wake: tokio::sync::Notify,
    /// Why the last refill failed, until one succeeds.
    last_error: std::sync::Mutex<Option<String>>,
}

impl PoolState {
    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Whether `req` could be served by the pool: no name, no boot files, no
/// boot arguments, started now, not a restore. Its shape (vCPUs, memory,
/// work disk, capabilities, backend, image) is compared with each pooled
/// VM's by [`same_shape`].
fn pool_shaped(req: &CreateVmRequest) -> bool {
    req.name.is_none()
        && req.kernel_ref.is_none()
        && req.kernel.is_none()
        && req.initrd.is_none()
        && req.rootfs.is_none()
        && req.boot_args.is_none()
        && !req.no_start
        && req.from_snapshot.is_none()
}

/// Whether pooled VM `vm` has the shape `want` resolved to.
fn same_shape(vm: &VmRecord, want: &VmRecord) -> bool {
    let (a, b) = (&vm.spec, &want.spec);
    a.vcpus == b.vcpus
        && a.memory_mib == b.memory_mib
        && a.disk_size == b.disk_size
        && a.vmm == b.vmm
        && a.extra_boot_args == b.extra_boot_args
        && vm.caps == want.caps
}

/// Whether `vm` is running with its VMM alive.
fn running(vm: &VmRecord) -> bool {
    vm.state == VmState::Running && vm.vmm.as_ref().is_some_and(banger_vmm::process_alive)
}

impl Lifecycle {
    /// Takes a running pooled VM for `req` when the pool is on and holds
    /// one of its shape; `None` sends the create down the booting path.
    /// Either way a create the pool could serve wakes the refill.
    pub(super) async fn take_from_pool(
        &self,
        req: &CreateVmRequest,
        progress: &Progress,
    ) -> Result<Option<VmRecord>, OpError> {
        if self.config.warm_pool == 0 || !pool_shaped(req) {
            return Ok(None);
        }
        let taken = self.take_matching(req, progress).await;
        // After the take, so the loop counts the pool without it.
        self.pool.wake.notify_one();
        taken
    }

    async fn take_matching(
        &self,
        req: &CreateVmRequest,
        progress: &Progress,
    ) -> Result<Option<VmRecord>, OpError> {
        // The same checks and defaults as a booting create: a bad request
        // fails here as it would there.
        let want = self.validate_create(req)?;
        let image = req
            .image
            .clone()
            .or_else(|| self.config.default_image_name.clone());
        for (id, made_for) in self.pooled().await? {
            if made_for != image {
                continue;
            }
            // Skip those still booting without waiting on their lock
            // (the refill holds it for the whole start).
            match self.record(&id).await? {
                Some(vm) if vm.state == VmState::Running && same_shape(&vm, &want) => {}
                _ => continue,
            }
            let guard = self.locks.lock(&id).await;
            // Under the lock: it may have been taken, stopped or deleted,
            // or its VMM may have died since the last look for dead ones
            // (the next refill deletes it).
            let Some(mut vm) = self.record(&id).await? else {
                continue;
            };
            if !running(&vm) {
                continue;
            }
            let store = self.store.clone();
            let unpool_id = id.clone();
            if !blocking(move || store.unpool(&unpool_id)).await?? {
                continue;
            }
            timings::name_vm(vm.name.as_str());
            begin_stage(
                progress,
                "take_from_pool",
                format!("taking {} from the warm pool (booted ahead)", vm.name),
            );
            self.save(&mut vm).await?;
            drop(guard);
            tracing::info!(vm = %vm.name, "taken from the warm pool");
            return Ok(Some(vm));
        }
        Ok(None)
    }

    /// The pool's VMs with the image each was made for.
    async fn pooled(&self) -> Result<Vec<(VmId, Option<String>)>, OpError> {
        let store = self.store.clone();
        Ok(blocking(move || store.pooled()).await??)
    }

    async fn record(&self, id: &VmId) -> Result<Option<VmRecord>, OpError> {
        let store = self.store.clone();
        let id = id.clone();
        Ok(blocking(move || store.get_vm(&id)).await??)
    }

    /// The VMs the user sees: every VM but the pool's.
    pub async fn list_user(&self) -> Result<Vec<VmRecord>, OpError> {
        let pooled: Vec<VmId> = self.pooled().await?.into_iter().map(|(id, _)| id).collect();
        let mut vms = self.list().await?;
        vms.retain(|vm| !pooled.contains(&vm.id));
        Ok(vms)
    }

    /// `GET /v1/pool`.
    pub async fn pool_view(&self) -> Result<PoolView, OpError> {
        let mut vms = Vec::new();
        for (id, _) in self.pooled().await? {
            if let Some(vm) = self.record(&id).await? {
                vms.push(self.view(vm));
            }
        }
        Ok(PoolView {
            size: self.config.warm_pool,
            vms,
            last_error: self.pool.error(),
        })
    }

    /// The refill loop, until `stop` turns true (then it ends after the
    /// create under way, if any). First it deletes the pooled VMs an
    /// earlier daemon left: this daemon's config may have changed their
    /// shape, and a pool lives as long as its daemon.
    pub async fn run_pool(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        self.drain_pool().await;
        let size = self.config.warm_pool as usize;
        if size == 0 {
            return;
        }
        loop {
            self.prune_pool().await;
            while !*stop.borrow() {
                match self.pooled().await {
                    Ok(p) if p.len() < size => {}
                    Ok(_) => break,
                    Err(e) => {
                        self.pool.set_error(Some(render_chain(&e)));
                        break;
                    }
                }
                match self.create_pooled().await {
                    Ok(vm) => {
                        tracing::info!(vm = %vm.name, "warm pool: one more VM ready");
                        self.pool.set_error(None);
                    }
                    Err(e) => {
                        let msg = render_chain(&e);
                        tracing::warn!(
                            "warm pool: a refill failed (the next create of its shape retries): {msg}"
                        );
                        self.pool.set_error(Some(msg));
                        self.prune_pool().await;
                        break;
                    }
                }
            }
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = self.pool.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Boots one VM of the default shape into the pool: what the CLI asks
    /// for without options (config `default_image_name`, else the image
    /// catalog's default), from an image and kernel already here.
    async fn create_pooled(&self) -> Result<VmRecord, OpError> {
        let image = self.config.default_image_name.clone();
        self.artifacts
            .boot_is_local(image.as_deref())
            .await
            .map_err(|e| OpError::Stage {
                stage: "resolve_boot".into(),
                source: Box::new(e),
            })?;
        let req = CreateVmRequest {
            image: image.clone(),
            ..CreateVmRequest::default()
        };
        let owner = Owner::Pool { image };
        timings::timed(
            "",
            "create",
            self.create_owned(req, &Progress::none(), owner),
        )
        .await
    }

    /// Deletes the pooled VMs that are not running (a failed refill, a
    /// guest that stopped, a VMM that died and is not yet marked so).
    async fn prune_pool(&self) {
        self.drop_pooled_where(|vm| !running(vm)).await;
    }

    /// Kills the VMM of every pooled VM still starting. A stopping daemon
    /// cuts a refill short this way: a hook waiting on the guest (the
    /// agent's readiness) cannot be interrupted, but returns once the VMM
    /// is gone, and the start then fails and rolls back as when a guest
    /// dies while booting.
    pub async fn kill_starting_pooled(&self) {
        let Ok(pooled) = self.pooled().await else {
            return;
        };
        for (id, _) in pooled {
            let Ok(Some(vm)) = self.record(&id).await else {
                continue;
            };
            if vm.state != VmState::Running
                && let Some(p) = &vm.vmm
                && let Err(e) = self.vmm_for(&vm).kill(p)
            {
                tracing::warn!(vm = %vm.name, "warm pool: cannot kill the refill's VMM: {e}");
            }
        }
    }

    /// Deletes every pooled VM: at the daemon's start and stop.
    pub async fn drain_pool(&self) {
        self.drop_pooled_where(|_| true).await;
    }

    /// Deletes the pooled VMs `which` picks (also those booted from an
    /// image or kernel just deleted).
    pub async fn drop_pooled_where(&self, which: impl Fn(&VmRecord) -> bool) {
        let pooled = match self.pooled().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("warm pool: cannot read it: {}", render_chain(&e));
                return;
            }
        };
        for (id, _) in pooled {
            // Only the picked ones are locked: a refill holds its VM's lock
            // for the whole boot, and an image delete need not wait for it.
            match self.record(&id).await {
                Ok(Some(vm)) if !which(&vm) => continue,
                _ => {}
            }
            let guard = self.locks.lock(&id).await;
            let store = self.store.clone();
            let check = id.clone();
            // Under the lock: a create may have taken it meanwhile.
            let still = blocking(move || {
                Ok::<_, OpError>((store.is_pooled(&check)?, store.get_vm(&check)?))
            })
            .await
            .and_then(|r| r);
            let vm = match still {
                Ok((true, Some(vm))) if which(&vm) => vm,
                Ok((true, None)) => {
                    // A pool row without its VM: only the row is left.
                    let store = self.store.clone();
                    let gone = id.clone();
                    let _ = blocking(move || store.unpool(&gone)).await;
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!("warm pool: cannot read VM {id}: {}", render_chain(&e));
                    continue;
                }
            };
            let name = vm.name.clone();
            match self.delete_locked(vm, true, &Progress::none()).await {
                Ok(()) => tracing::info!(vm = %name, "warm pool: deleted"),
                Err(e) => {
                    tracing::warn!(vm = %name, "warm pool: cannot delete: {}", render_chain(&e))
                }
            }
            drop(guard);
            self.locks.forget(&id);
        }
    }
}

/// How long a stopping daemon waits for the refill under way before it
/// kills the refill's VMM ([`Lifecycle::kill_starting_pooled`]), and
/// again for the start to fail then. With the API's own 10 s for requests
/// in flight, `banger daemon stop`'s 30 s wait covers the usual case.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unnamed_default_boot_can_come_from_the_pool() {
        assert!(pool_shaped(&CreateVmRequest::default()));
        assert!(pool_shaped(&CreateVmRequest {
            vcpus: Some(2),
            image: Some("debian".into()),
            caps: vec!["nat".into()],
            ..CreateVmRequest::default()
        }));
        let not = [
            CreateVmRequest {
                name: Some("web".into()),
                ..CreateVmRequest::default()
            },
            CreateVmRequest {
                kernel_ref: Some("k".into()),
                ..CreateVmRequest::default()
            },
            CreateVmRequest {
                rootfs: Some("/r".into()),
                ..CreateVmRequest::default()
            },
            CreateVmRequest {
                boot_args: Some("quiet".into()),
                ..CreateVmRequest::default()
            },
            CreateVmRequest {
                no_start: true,
                ..CreateVmRequest::default()
            },
            CreateVmRequest {
                from_snapshot: Some("s".into()),
                ..CreateVmRequest::default()
            },
        ];
        for req in not {
            assert!(!pool_shaped(&req), "{req:?}");
        }
    }
}
