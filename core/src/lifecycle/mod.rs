//! The lifecycle: the VM state machine, per-VM locking, persistence and the
//! one place that sequences capability hooks.
//!
//! ```text
//! create:  validate → record → clone root disk → start
//! start:   PrepareHost → ConfigureMachine → GuestConfig → launch VMM → PostStart → running
//! stop:    VMM shutdown → Teardown(stop), reverse order of preparation
//! delete:  kill VMM → Teardown(delete), reverse order → remove dir and row
//! failure: Teardown(rollback) of everything prepared, reverse order → error(stage, cause)
//! ```
//!
//! One file per verb; they share the helpers here.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::capability::{
    CapError, Capability, Hook, HookCtx, HookLog, Registry, TeardownReason, order_by_manifest,
};
use crate::store::{Store, StoreError};
use banger_api::api::{CapSource, VmView};
use banger_api::config::Config;
use banger_api::model::{EnabledCap, VmId, VmRecord, VmState, now_unix};
use banger_api::paths::Paths;
use banger_host::hostops::HostOps;
use banger_vmm::{Backends, Vmm};

mod create;
mod delete;
mod forward;
mod inspect;
#[cfg(test)]
mod lock_tests;
mod pool;
mod reconcile;
mod restore;
mod set;
mod snapshot;
mod ssh;
mod start;
mod stop;
mod timings;
mod vmm_exit;

pub use banger_api::error::render_chain;
pub use banger_api::progress::Progress;
pub use forward::ForwardChange;
pub use pool::STOP_GRACE as POOL_STOP_GRACE;
pub use reconcile::Reconciled;
/// File name of the captured guest console inside a VM's directory.
pub use start::ROOT_DISK as ROOT_DISK_FILE;
pub use start::SERIAL_LOG as SERIAL_LOG_FILE;
pub use vmm_exit::VmmExited;

/// A lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// No VM has that name.
    #[error("No VM named {0:?}; see `banger vm list`")]
    NotFound(String),
    /// The request is invalid; the message names the input and the fix.
    #[error("{0}")]
    Invalid(String),
    /// The VM is in a state where this operation makes no sense.
    #[error("VM {name} is {state}: {hint}")]
    WrongState {
        /// VM name.
        name: String,
        /// Its state.
        state: VmState,
        /// What to do instead.
        hint: &'static str,
    },
    /// The name is taken.
    #[error("A VM named {0:?} already exists; pick another --name or delete it first")]
    NameTaken(String),
    /// A stage of the operation failed.
    #[error("Stage {stage} failed")]
    Stage {
        /// The stage (`prepare_host:work-disk`, `launch_vmm`, ...).
        stage: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store failed.
    #[error("State database error")]
    Store(#[from] StoreError),
    /// Host filesystem work failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// A connection to a guest failed: names the VM and the address that did
/// not answer, the cause below.
#[derive(Debug, thiserror::Error)]
#[error("VM {vm}: no answer from its {what} at {addr}")]
pub struct GuestUnreachable {
    /// The VM's name.
    pub vm: String,
    /// `sshd`, `guest agent`.
    pub what: &'static str,
    /// The address or socket tried.
    pub addr: String,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl OpError {
    /// The failing stage, if the error came from one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            OpError::Stage { stage, .. } => Some(stage),
            _ => None,
        }
    }
}

/// Forwards a capability's log lines to the progress stream and the daemon log.
struct CapLog {
    cap: String,
    vm: String,
    progress: Progress,
}

impl HookLog for CapLog {
    fn info(&self, msg: &str) {
        tracing::info!(vm = %self.vm, cap = %self.cap, "{msg}");
        self.progress.log("info", &format!("{}: {msg}", self.cap));
    }

    fn warn(&self, msg: &str) {
        tracing::warn!(vm = %self.vm, cap = %self.cap, "{msg}");
        self.progress.log("warn", &format!("{}: {msg}", self.cap));
    }
}

/// Per-VM operation locks: same-VM operations are serialised, different VMs
/// proceed in parallel. The map lock is held only to fetch or insert the
/// VM's lock, and the `Arc` is cloned under it, so two callers can never end
/// up holding different locks for one VM.
#[derive(Debug, Default)]
struct VmLocks {
    map: std::sync::Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
}

impl VmLocks {
    async fn lock(&self, id: &VmId) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(id.clone()).or_default().clone()
        };
        m.lock_owned().await
    }

    fn forget(&self, id: &VmId) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

/// Holds one VM's operation lock until dropped ([`Lifecycle::lock_vm`]).
#[derive(Debug)]
pub struct VmGuard {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// A resolved capability with its per-VM options.
type CapEntry = (Arc<dyn Capability>, EnabledCap);

/// The daemon's lifecycle engine. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Lifecycle {
    paths: Paths,
    config: Config,
    store: Arc<Store>,
    registry: Registry,
    host: Arc<dyn HostOps>,
    backends: Backends,
    artifacts: Arc<crate::artifacts::Artifacts>,
    locks: VmLocks,
    /// Serialises name checks with inserts during create.
    create_lock: tokio::sync::Mutex<()>,
    /// The warm pool's refill signal and last failure.
    pool: pool::PoolState,
}

impl Lifecycle {
    /// Assembles the engine.
    pub fn new(
        paths: Paths,
        config: Config,
        store: Arc<Store>,
        registry: Registry,
        host: Arc<dyn HostOps>,
        backends: Backends,
        artifacts: Arc<crate::artifacts::Artifacts>,
    ) -> Self {
        Lifecycle {
            paths,
            config,
            store,
            registry,
            host,
            backends,
            artifacts,
            locks: VmLocks::default(),
            create_lock: tokio::sync::Mutex::new(()),
            pool: pool::PoolState::default(),
        }
    }

    /// The capability registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Images and kernels.
    pub fn artifacts(&self) -> &Arc<crate::artifacts::Artifacts> {
        &self.artifacts
    }

    /// Host paths.
    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    /// The API view of a record.
    pub fn view(&self, vm: VmRecord) -> VmView {
        let dir = self.paths.vm_dir(&vm.id);
        let address = self.guest_address(&vm.id);
        VmView {
            record: vm,
            dir,
            address,
        }
    }

    /// The VM's address, from the first capability that gives it one.
    pub fn guest_address(&self, vm: &VmId) -> Option<std::net::Ipv4Addr> {
        self.registry
            .all()
            .iter()
            .find_map(|cap| cap.guest_address(vm))
    }

    /// Every VM.
    pub async fn list(&self) -> Result<Vec<VmRecord>, OpError> {
        let store = self.store.clone();
        Ok(blocking(move || store.list_vms()).await??)
    }

    /// One VM by name.
    pub async fn get(&self, name: &str) -> Result<VmRecord, OpError> {
        let store = self.store.clone();
        let n = name.to_string();
        blocking(move || store.find_vm(&n))
            .await??
            .ok_or_else(|| OpError::NotFound(name.to_string()))
    }

    /// Takes VM `name`'s operation lock: the one lock every lifecycle
    /// operation takes, so work on a VM outside the lifecycle (workspace
    /// import and export, guest jobs) is serialised with start, stop and
    /// delete and with itself. Returns the record as it is under the lock.
    pub async fn lock_vm(&self, name: &str) -> Result<(VmGuard, VmRecord), OpError> {
        let (guard, vm) = self.lock_by_name(name).await?;
        Ok((VmGuard { _held: guard }, vm))
    }

    /// Looks `name` up, takes its lock, and re-reads the record under the
    /// lock (it may have changed or gone while we waited).
    async fn lock_by_name(
        &self,
        name: &str,
    ) -> Result<(tokio::sync::OwnedMutexGuard<()>, VmRecord), OpError> {
        let vm = self.get(name).await?;
        let guard = self.locks.lock(&vm.id).await;
        let store = self.store.clone();
        let id = vm.id.clone();
        let vm = blocking(move || store.get_vm(&id))
            .await??
            .ok_or_else(|| OpError::NotFound(name.to_string()))?;
        Ok((guard, vm))
    }

    /// Persists `vm`, bumping its update time.
    async fn save(&self, vm: &mut VmRecord) -> Result<(), OpError> {
        vm.updated_at = now_unix();
        let store = self.store.clone();
        let copy = vm.clone();
        blocking(move || store.update_vm(&copy)).await??;
        Ok(())
    }

    /// The capabilities enabled for `vm`, resolved against the registry and
    /// put in hook order (their manifests' `requires`/`after`, otherwise as
    /// enabled); a missing requirement or an unsupported backend is refused.
    fn caps_of(&self, vm: &VmRecord) -> Result<Vec<CapEntry>, OpError> {
        let caps = vm
            .caps
            .iter()
            .map(|c| {
                self.registry
                    .get(&c.name)
                    .map(|cap| (cap, c.clone()))
                    .map_err(|e| OpError::Invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        order_by_manifest(caps, vm.spec.vmm).map_err(|e| OpError::Invalid(e.to_string()))
    }

    /// Runs one hook of one capability as blocking work ([`blocking`]; a
    /// plugin's post-start hook on the blocking pool, [`blocking_task`]).
    /// `payload` is the hook's mutable data (machine spec or guest config)
    /// or `()`.
    async fn run_hook<T: Send + 'static>(
        &self,
        hook: Hook,
        (cap, enabled): &CapEntry,
        vm: &VmRecord,
        progress: &Progress,
        payload: T,
        f: fn(&dyn Capability, &HookCtx<'_>, &mut T) -> Result<(), CapError>,
    ) -> Result<T, OpError> {
        let cap = cap.clone();
        let cap_source = cap.source();
        let stage = format!("{}:{}", hook, cap.name());
        begin_stage(
            progress,
            &stage,
            format!("{} {}", hook_verb(hook), cap.name()),
        );
        let vm = vm.clone();
        let vm_dir = self.paths.vm_dir(&vm.id);
        let host = self.host.clone();
        let config = self.config.clone();
        let options = enabled.options.clone();
        let log = CapLog {
            cap: cap.name().to_string(),
            vm: vm.name.to_string(),
            progress: progress.clone(),
        };
        let job = move || {
            let ctx = HookCtx {
                vm: &vm,
                vm_dir: &vm_dir,
                options: &options,
                host: host.as_ref(),
                config: &config,
                log: &log,
            };
            let mut payload = payload;
            // A panicking built-in must fail only this operation.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f(cap.as_ref(), &ctx, &mut payload)
            }));
            match r {
                Ok(Ok(())) => Ok(payload),
                Ok(Err(e)) => Err(e),
                Err(panic) => Err(CapError::msg(format!(
                    "capability panicked: {}",
                    panic_message(panic.as_ref())
                ))),
            }
        };
        // A post-start hook is raced against its VMM's exit
        // (`unless_vmm_exits`), which only a hook on the pool can lose. The
        // built-in ones return as soon as the VMM is gone (the agent wait
        // checks its exit between attempts; the others do not wait on the
        // guest), so they run in place; a plugin's may wait on anything.
        let raced = hook == Hook::PostStart && !matches!(cap_source, CapSource::Builtin);
        let res = if raced {
            blocking_task(job).await?
        } else {
            blocking(job).await?
        };
        res.map_err(|e| OpError::Stage {
            stage,
            source: Box::new(e),
        })
    }

    /// Tears down `names` (in the order given) with `reason`, removing each
    /// from `vm.prepared` as it succeeds and persisting after each step.
    /// Failures are collected, not fatal: everything that can be undone is.
    async fn teardown(
        &self,
        vm: &mut VmRecord,
        names: Vec<String>,
        reason: TeardownReason,
        progress: &Progress,
    ) -> Vec<OpError> {
        let mut errors = Vec::new();
        for name in names {
            let enabled = vm
                .caps
                .iter()
                .find(|c| c.name == name)
                .cloned()
                .unwrap_or(EnabledCap {
                    name: name.clone(),
                    options: Default::default(),
                });
            let cap = match self.registry.get(&name) {
                Ok(c) => c,
                Err(e) => {
                    progress.log("warn", &format!("cannot tear down {name}: {e}"));
                    // Most often a plugin removed from the plugins directory.
                    let msg = format!(
                        "Capability {name:?} is not loaded (is its plugin gone from the plugins directory?), so it cannot undo what it set up for VM {vm}: put the plugin back and retry, or delete the VM anyway with `banger vm delete {vm} --force` (what {name} set up may be left behind). {e}",
                        vm = vm.name
                    );
                    errors.push(OpError::Invalid(msg));
                    continue;
                }
            };
            let r = self
                .run_hook(
                    Hook::Teardown,
                    &(cap, enabled),
                    vm,
                    progress,
                    reason,
                    |c, ctx, reason| c.teardown(ctx, *reason),
                )
                .await;
            match r {
                Ok(_) => {
                    vm.prepared.retain(|p| p != &name);
                    if let Err(e) = self.save(vm).await {
                        errors.push(e);
                    }
                }
                Err(e) => {
                    progress.log("warn", &render_chain(&e));
                    errors.push(e);
                }
            }
        }
        errors
    }

    /// The backend that runs `vm`.
    fn vmm_for(&self, vm: &VmRecord) -> Arc<dyn Vmm> {
        self.backends.get(vm.spec.vmm)
    }

    /// Graceful stop timeout.
    fn stop_grace(&self) -> Duration {
        Duration::from_secs(self.config.stop_timeout_secs)
    }

    fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.paths.vm_dir(id)
    }
}

/// Stage `stage` of the current operation begins: the client is told, and
/// the operation's clock times it ([`timings`]).
fn begin_stage(progress: &Progress, stage: &str, message: impl Into<String>) {
    timings::mark(stage);
    progress.stage(stage, message);
}

fn hook_verb(h: Hook) -> &'static str {
    match h {
        Hook::PrepareHost => "preparing host for",
        Hook::ConfigureMachine => "configuring machine for",
        Hook::GuestConfig => "adding guest config for",
        Hook::PostStart => "finishing start of",
        Hook::Teardown => "tearing down",
    }
}

/// What a caught panic said (`&str` or `String` payloads; anything else is
/// "unknown panic"). Pass the payload, not its `Box`.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// The environment variable naming the point at which [`crash_point`] kills
/// the daemon.
pub const CRASH_AT_ENV: &str = "BANGER_TEST_CRASH_AT";

/// Test hook: with `BANGER_TEST_CRASH_AT=<point>` the daemon SIGKILLs itself
/// (exactly what `kill -9` does: no destructor, no cleanup) on reaching
/// `point`, so the crash tests can restart it and check what reconcile makes
/// of the leftovers. The points are listed in docs/architecture.md. With
/// `freeze:<point>` it SIGSTOPs itself there instead: a daemon that holds
/// its connections open and sends nothing more, as a guest sees a daemon
/// whose end of a stream was lost. Unset, this does nothing.
pub(crate) fn crash_point(point: &str) {
    use nix::sys::signal::{Signal, raise};
    static AT: std::sync::LazyLock<Option<String>> =
        std::sync::LazyLock::new(|| std::env::var(CRASH_AT_ENV).ok());
    let Some(at) = AT.as_deref() else { return };
    if at == point {
        tracing::warn!(point, "{CRASH_AT_ENV}: killing the daemon here");
        let _ = raise(Signal::SIGKILL);
    } else if at.strip_prefix("freeze:") == Some(point) {
        tracing::warn!(point, "{CRASH_AT_ENV}: stopping the daemon here");
        let _ = raise(Signal::SIGSTOP);
    }
}

/// Runs blocking work (SQLite, hooks, VMM control) in place. On the
/// daemon's multi-thread runtime the worker hands its other tasks to
/// another thread while `f` runs (`block_in_place`) and the operation goes
/// on on the same thread: no hop to the blocking pool and back, which cost
/// about 50 µs each on the 2-core test host and a create makes some 30 of
/// them (issue 12). The caller's future cannot be polled while `f` runs,
/// so work that is raced against something else (a plugin's post-start
/// hook against its VMM's exit, `vmm_exit.rs`) goes through
/// [`blocking_task`] instead, and so does everything on a current-thread
/// runtime (tests).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, OpError> {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        // A panic fails the operation, as a panicked blocking task does,
        // instead of unwinding through it past its rollback.
        return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tokio::task::block_in_place(f)
        }))
        .map_err(|panic| OpError::Stage {
            stage: "internal".to_string(),
            source: Box::new(std::io::Error::other(format!(
                "blocking work panicked: {}",
                panic_message(panic.as_ref())
            ))),
        });
    }
    blocking_task(f).await
}

/// Runs blocking work on the blocking pool: the caller's future stays
/// pollable (and raceable) while `f` runs.
async fn blocking_task<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Stage {
            stage: "internal".to_string(),
            source: Box::new(e),
        })
}

/// Marks `vm` failed at `stage`.
fn set_failure(vm: &mut VmRecord, err: &OpError) {
    vm.state = VmState::Error;
    vm.last_error = Some(banger_api::model::Failure {
        stage: err.stage().unwrap_or("internal").to_string(),
        cause: render_chain(err),
        at: now_unix(),
    });
}

#[cfg(test)]
mod blocking_tests {
    use super::*;

    #[test]
    fn a_panic_message_is_read_through_its_box() {
        let panic = std::panic::catch_unwind(|| panic!("the hook broke")).unwrap_err();
        assert_eq!(panic_message(panic.as_ref()), "the hook broke");
        let panic = std::panic::catch_unwind(|| panic!("{} broke", "it")).unwrap_err();
        assert_eq!(panic_message(panic.as_ref()), "it broke");
    }

    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
    }

    /// The threads a task on a one-worker runtime runs on before and in
    /// its blocking work, in place or on the pool.
    fn threads(pool: bool) -> (std::thread::ThreadId, std::thread::ThreadId) {
        one_worker().block_on(async move {
            tokio::spawn(async move {
                let caller = std::thread::current().id();
                let work = || std::thread::current().id();
                let ran_on = if pool {
                    blocking_task(work).await
                } else {
                    blocking(work).await
                };
                (caller, ran_on.unwrap())
            })
            .await
            .unwrap()
        })
    }

    #[test]
    fn blocking_work_runs_in_place_on_a_multi_thread_runtime() {
        let (caller, ran_on) = threads(false);
        assert_eq!(caller, ran_on);
        // The pool is still a hop to another thread.
        let (caller, ran_on) = threads(true);
        assert_ne!(caller, ran_on);
    }

    #[test]
    fn a_panic_in_blocking_work_fails_the_operation_with_its_message() {
        let err = one_worker()
            .block_on(async {
                tokio::spawn(async { blocking(|| -> u32 { panic!("disk on fire") }).await })
                    .await
                    .unwrap()
            })
            .unwrap_err();
        assert_eq!(err.stage(), Some("internal"));
        assert!(
            render_chain(&err).contains("disk on fire"),
            "{}",
            render_chain(&err)
        );
    }
}
