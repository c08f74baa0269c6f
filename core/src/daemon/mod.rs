//! `bangerd`: assembles the store, registry, plugins, host operations and
//! VMM backend, reconciles with the host, and serves the API on a Unix
//! socket (mode 0600) until told to stop. VMs keep running across daemon
//! restarts.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::Artifacts;
use crate::capability::{CapEnv, DaemonCtx, Registry, RunningVm, SharedState};
use crate::lifecycle::{Lifecycle, render_chain};
use crate::store::Store;
use banger_api::config::Config;
use banger_api::machine::MachineSpec;
use banger_api::model::{VmmProcess, now_unix};
use banger_api::paths::Paths;
use banger_host::helper::{HelperHostOps, NoPrivilegeHostOps, helper_socket_from_env};
use banger_host::hostops::{HostOps, InProcessHostOps};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::Qemu;
use banger_vmm::{Backends, LaunchPaths, Vmm, VmmError};

mod artifacts_api;
mod server;
mod snapshot_api;

pub use artifacts_api::{
    BuildRequest, CatalogImageView, CatalogKernelView, ImageView, ImportKernelRequest, KernelView,
};

/// The daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No usable home/XDG directories.
    #[error(transparent)]
    Paths(#[from] banger_api::paths::NoHome),
    /// Creating banger's directories failed.
    #[error("Cannot create banger's directories under {0}")]
    CreateDirs(PathBuf, #[source] std::io::Error),
    /// The runtime directory is not safely ours.
    #[error(transparent)]
    RuntimeDir(#[from] banger_api::paths::UnsafeRuntimeDir),
    /// Another daemon holds the pid file lock.
    #[error("bangerd is already running (pid {pid}); stop it with `banger daemon stop`")]
    AlreadyRunning {
        /// Its pid, as written in the pid file.
        pid: String,
    },
    /// The pid file could not be created or locked.
    #[error("Cannot lock {0}")]
    PidFile(PathBuf, #[source] std::io::Error),
    /// config.toml is invalid.
    #[error(transparent)]
    Config(#[from] banger_api::config::ConfigError),
    /// The database could not be opened.
    #[error("Cannot open the state database")]
    Store(#[from] crate::store::StoreError),
    /// The image or kernel stores could not be set up.
    #[error("Cannot set up images and kernels")]
    Artifacts(#[source] crate::artifacts::ArtifactError),
    /// Reconciliation with running VMMs failed.
    #[error("Cannot reconcile VMs with the host")]
    Reconcile(#[source] crate::lifecycle::OpError),
    /// Binding or serving the socket failed.
    #[error("Cannot serve the API on {0}")]
    Serve(PathBuf, #[source] std::io::Error),
}

/// Stands in for a backend whose binary is not available, so the daemon still
/// serves everything else and creates fail with the configuration hint.
#[derive(Debug)]
struct UnavailableVmm {
    name: &'static str,
    reason: String,
}

impl Vmm for UnavailableVmm {
    fn name(&self) -> &'static str {
        self.name
    }

    fn launch(&self, _machine: &MachineSpec, _paths: &LaunchPaths) -> Result<VmmProcess, VmmError> {
        Err(VmmError::NotReady(self.reason.clone()))
    }

    fn shutdown(&self, process: &VmmProcess, _grace: Duration) -> Result<(), VmmError> {
        self.kill(process)
    }

    fn kill(&self, process: &VmmProcess) -> Result<(), VmmError> {
        // A VMM started by an earlier daemon may still run; kill only if it is
        // the same process.
        if banger_vmm::process_alive(process) {
            let pid = nix::unistd::Pid::from_raw(process.pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
                .map_err(|e| VmmError::Signal(process.pid, e))?;
        }
        Ok(())
    }
}

/// Holds the pid file lock for the daemon's lifetime.
#[derive(Debug)]
struct PidLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
    path: PathBuf,
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The daemon's build file ([`Paths::build_file`]), removed when dropped.
#[derive(Debug)]
struct BuildFile(PathBuf);

impl BuildFile {
    /// Writes this daemon's pid and build to `path`. A failure only costs
    /// clients their shortcut (they ask the socket instead), so it is
    /// logged, not fatal.
    fn write(path: PathBuf) -> BuildFile {
        let build = banger_api::api::DaemonBuild {
            pid: std::process::id(),
            build: banger_api::api::VersionInfo::current(),
        };
        let written = serde_json::to_vec(&build)
            .map_err(std::io::Error::other)
            // In the runtime dir (a tmpfs), and true only while this
            // process lives: nothing to sync.
            .and_then(|bytes| banger_api::fsutil::write_atomic_unsynced(&path, &bytes, 0o600));
        if let Err(e) = written {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
        BuildFile(path)
    }
}

impl Drop for BuildFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens and locks the pid file without following a symlink (a planted
/// link must not make the daemon truncate another file) and only if it is
/// a regular file.
fn lock_pid_file(path: PathBuf) -> Result<PidLock, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| DaemonError::PidFile(path.clone(), e))?;
    let regular = file.metadata().is_ok_and(|m| m.file_type().is_file());
    if !regular {
        let e = std::io::Error::other("it is not a regular file; remove it");
        return Err(DaemonError::PidFile(path, e));
    }
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_string();
            return Err(DaemonError::AlreadyRunning { pid });
        }
        Err((_, e)) => return Err(DaemonError::PidFile(path, e.into())),
    };
    lock.set_len(0)
        .map_err(|e| DaemonError::PidFile(path.clone(), e))?;
    writeln!(&mut *lock, "{}", std::process::id())
        .map_err(|e| DaemonError::PidFile(path.clone(), e))?;
    Ok(PidLock { _lock: lock, path })
}

/// Runs the daemon until SIGTERM, SIGINT or `POST /v1/shutdown`.
pub async fn run() -> Result<(), DaemonError> {
    let paths = Paths::from_env()?;
    paths
        .create_all()
        .map_err(|e| DaemonError::CreateDirs(paths.state_dir.clone(), e))?;
    let uid = nix::unistd::geteuid().as_raw();
    paths.check_runtime_dir(uid)?;
    paths
        .create_runtime_vms_dir()
        .map_err(|e| DaemonError::CreateDirs(paths.runtime_dir.clone(), e))?;
    let _pid = lock_pid_file(paths.pid_file())?;
    let config = Config::load(&paths.config_file())?;
    let store = Arc::new(Store::open(&paths.database())?);

    // Built-ins are made once, here, with everything host-wide they keep;
    // the ones that share state (network, dns, nat) find it in `shared`.
    let host = choose_host_ops();
    let shared = SharedState::new();
    let env = CapEnv {
        paths: &paths,
        config: &config,
        store: &store,
        host: &host,
        shared: &shared,
    };
    let (mut registry, builtin_errors) = Registry::with_builtins(&env);
    let mut plugin_errors = Vec::new();
    for e in builtin_errors {
        let msg = render_chain(&e);
        tracing::error!("{msg}");
        plugin_errors.push(msg);
    }
    let plugins_dir = config.plugins_dir(&paths);
    let report = match trusted_plugins_dir(&plugins_dir, uid) {
        Ok(()) => crate::plugin_host::load_plugins_for(
            &plugins_dir,
            &banger_api::net::identity::NetIdentity::for_state_dir(&paths.state_dir)
                .resolve(&config.network),
        ),
        Err(e) => {
            let msg = format!("{e} (no plugin was loaded)");
            tracing::error!("{msg}");
            plugin_errors.push(msg);
            crate::plugin_host::LoadReport::default()
        }
    };
    for cap in report.loaded {
        tracing::info!(name = cap.name(), source = %cap.source(), "plugin loaded");
        if let Err(e) = registry.add(cap) {
            tracing::error!("{e}");
            plugin_errors.push(e.to_string());
        }
    }
    for e in report.errors {
        let msg = render_chain(&e);
        tracing::error!("{msg}");
        plugin_errors.push(msg);
    }

    let backends = backends(&config, uid);
    let artifacts =
        Arc::new(Artifacts::new(&paths, store.clone(), &config).map_err(DaemonError::Artifacts)?);
    let cleaned = artifacts.cleanup_staging();
    if cleaned > 0 {
        tracing::info!("removed {cleaned} staging dir(s) left by an interrupted pull");
    }
    let hooks = registry.clone();
    let lifecycle = Arc::new(Lifecycle::new(
        paths.clone(),
        config,
        store,
        registry,
        host.clone(),
        backends,
        artifacts,
    ));
    for r in lifecycle
        .reconcile()
        .await
        .map_err(DaemonError::Reconcile)?
    {
        tracing::info!("reconciled {r}");
    }

    // Capabilities' daemon-wide work (the DNS server, adopting the taps of
    // VMs that outlived the last daemon).
    let running = running_vms(&lifecycle).await;
    run_daemon_hooks(&hooks, &host, running, true).await;

    let socket = paths.socket();
    let listener = bind_private(&socket)?;
    let _build = BuildFile::write(paths.build_file());
    let (shutdown_tx, mut shutdown_rx) = tokio::sync::watch::channel(false);
    let state = Arc::new(server::ApiState {
        lifecycle: lifecycle.clone(),
        started_at: now_unix(),
        socket: socket.clone(),
        plugin_errors,
        shutdown: shutdown_tx,
    });

    // The warm pool's refill loop (it first deletes the pooled VMs an
    // earlier daemon left, with `warm_pool = 0` too).
    let (pool_stop, pool_stopped) = tokio::sync::watch::channel(false);
    let pool = tokio::spawn(lifecycle.clone().run_pool(pool_stopped));

    let monitor_lc = lifecycle.clone();
    let monitor = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Err(e) = monitor_lc.reap_dead().await {
                tracing::warn!("checking VMM processes failed: {}", render_chain(&e));
            }
            rotate_console_logs(&monitor_lc).await;
        }
    });

    tracing::info!(socket = %socket.display(), pid = std::process::id(), "bangerd serving");
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_signal = async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = shutdown_rx.wait_for(|v| *v) => {}
        }
        tracing::info!("shutting down; VMs keep running (not the warm pool's)");
        let _ = signalled_tx.send(());
    };
    let serve = axum::serve(listener, router(state)).with_graceful_shutdown(stop_signal);
    // Long streams (`vm logs -f`) would hold a graceful shutdown forever: give
    // in-flight requests a bounded time after the signal.
    let deadline = async {
        if signalled_rx.await.is_ok() {
            tokio::time::sleep(Duration::from_secs(10)).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    // Then the operations no client waits for any more (a detached delete,
    // `vm run --rm`) end too, within the same bound.
    let drained = async {
        serve.await?;
        while server::running_operations() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<(), std::io::Error>(())
    };
    let result = tokio::select! {
        r = drained => r.map_err(|e| DaemonError::Serve(socket.clone(), e)),
        _ = deadline => Ok(()),
    };
    monitor.abort();
    let _ = std::fs::remove_file(&socket);
    // The pool lives as long as its daemon: the refill under way ends (cut
    // short after a grace by killing its VMM, then deleted like the rest),
    // then its VMs go.
    let _ = pool_stop.send(true);
    let grace = crate::lifecycle::POOL_STOP_GRACE;
    let mut pool = pool;
    if tokio::time::timeout(grace, &mut pool).await.is_err() {
        tracing::warn!("the warm pool's refill did not end in time; killing its VMM");
        lifecycle.kill_starting_pooled().await;
        if tokio::time::timeout(grace, &mut pool).await.is_err() {
            pool.abort();
        }
    }
    lifecycle.drain_pool().await;
    run_daemon_hooks(&hooks, &host, Vec::new(), false).await;
    result
}

/// In-process host operations as root; otherwise `banger-helper` when its
/// socket answers; otherwise operations that fail with the fix.
fn choose_host_ops() -> Arc<dyn HostOps> {
    if nix::unistd::geteuid().is_root() {
        tracing::info!("host operations: in-process (running as root)");
        return Arc::new(InProcessHostOps::default());
    }
    let helper = HelperHostOps::new(helper_socket_from_env());
    match helper.client().ping() {
        Ok(version) => {
            tracing::info!(socket = %helper.client().socket().display(), version, "host operations: banger-helper");
            Arc::new(helper)
        }
        Err(e) => {
            let why = render_chain(&e);
            tracing::warn!("no host operations: not root and {why}");
            Arc::new(NoPrivilegeHostOps { why })
        }
    }
}

/// StrictModes for the plugins directory (a missing one loads nothing).
fn trusted_plugins_dir(
    dir: &std::path::Path,
    uid: u32,
) -> Result<(), banger_api::paths::UntrustedPath> {
    if !dir.exists() {
        return Ok(());
    }
    banger_api::paths::check_trusted_path("the plugins directory", dir, uid)
}

/// The VMM confinement settings; a jailer that fails StrictModes is not
/// used (root would run it), and firecracker then runs without it.
fn jail_settings(config: &Config, uid: u32) -> banger_vmm::qemu::JailSettings {
    let mut jail = config.jail_settings();
    if let Some(j) = &jail.jailer_bin
        && let Err(e) = banger_api::paths::check_trusted_path("jailer_bin", j, uid)
    {
        tracing::warn!("{e}; firecracker runs without its jailer");
        jail.jailer_bin = None;
    }
    jail
}

/// The VMM backends; one whose binary is missing or fails StrictModes
/// stands in as unavailable, so creates on it fail with the reason.
fn backends(config: &Config, uid: u32) -> Backends {
    use banger_api::paths::check_trusted_path;
    let unavailable = |name: &'static str, reason: String| -> Arc<dyn Vmm> {
        tracing::warn!("{reason}");
        Arc::new(UnavailableVmm { name, reason })
    };
    let firecracker = match config.firecracker_bin() {
        Ok(bin) => match check_trusted_path("firecracker_bin", &bin, uid) {
            Ok(()) => Arc::new(Firecracker::new(bin).with_jail(jail_settings(config, uid)))
                as Arc<dyn Vmm>,
            Err(e) => unavailable("firecracker", e.to_string()),
        },
        Err(e) => unavailable("firecracker", render_chain(&e)),
    };
    let settings = config.qemu_settings();
    // A bare name not found on PATH fails at launch with its own message.
    let untrusted = [
        ("qemu_bin", &settings.qemu_bin),
        ("vhost_device_vsock_bin", &settings.vhost_device_vsock_bin),
    ]
    .into_iter()
    // Under the serial transport the daemon runs the agent as its bridge.
    .chain(settings.bridge_bin.iter().map(|b| ("agent_bin", b)))
    .filter(|(_, bin)| bin.is_absolute() && bin.exists())
    .find_map(|(what, bin)| check_trusted_path(what, bin, uid).err());
    let qemu = match untrusted {
        None => Arc::new(Qemu::new(settings)) as Arc<dyn Vmm>,
        Some(e) => unavailable("qemu", e.to_string()),
    };
    Backends::new(firecracker, qemu)
}

/// Runs every capability's `daemon_start` (`start`) or `daemon_stop` on a
/// blocking thread; they may block on the runtime to start servers.
async fn run_daemon_hooks(
    registry: &Registry,
    host: &Arc<dyn HostOps>,
    running: Vec<RunningVm>,
    start: bool,
) {
    let registry = registry.clone();
    let host = host.clone();
    let runtime = tokio::runtime::Handle::current();
    let done = tokio::task::spawn_blocking(move || {
        let ctx = DaemonCtx {
            host: host.as_ref(),
            running: &running,
            runtime,
        };
        if !start {
            registry.daemon_stop(&ctx);
            return;
        }
        for (name, e) in registry.daemon_start(&ctx) {
            tracing::warn!("capability {name}: {}", render_chain(&e));
        }
    })
    .await;
    if let Err(e) = done {
        tracing::warn!("capability daemon hooks: {e}");
    }
}

/// The VMs running now (they may have outlived an earlier daemon).
async fn running_vms(lifecycle: &Lifecycle) -> Vec<RunningVm> {
    let vms = match lifecycle.list().await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("cannot list VMs: {}", render_chain(&e));
            return Vec::new();
        }
    };
    vms.into_iter()
        .filter(|vm| vm.state == banger_api::model::VmState::Running)
        .map(|vm| RunningVm {
            vm_dir: lifecycle.paths().vm_dir(&vm.id),
            vm,
        })
        .collect()
}

/// Binds the API socket so that only the owner can ever connect: the umask
/// makes the socket 0600 at creation (no window), and we check it after.
fn bind_private(socket: &std::path::Path) -> Result<tokio::net::UnixListener, DaemonError> {
    let err = |e| DaemonError::Serve(socket.to_path_buf(), e);
    // We hold the pid lock, so any socket file here is stale.
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.map_err(err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Keeps every VM's console log under [`banger_vmm::SERIAL_LOG_MAX_BYTES`]
/// (see [`banger_vmm::rotate_console_log`]).
async fn rotate_console_logs(lc: &Lifecycle) {
    let Ok(vms) = lc.list().await else {
        return;
    };
    let logs: Vec<PathBuf> = vms
        .into_iter()
        .map(|vm| lc.view(vm).dir.join(crate::lifecycle::SERIAL_LOG_FILE))
        .collect();
    let _ = tokio::task::spawn_blocking(move || {
        for log in logs {
            if let Err(e) = banger_vmm::rotate_console_log(&log, banger_vmm::SERIAL_LOG_MAX_BYTES) {
                tracing::warn!("rotating {} failed: {e}", log.display());
            }
        }
    })
    .await;
}

/// The router for API version 1: the daemon's and VMs' routes, the images'
/// and kernels', and one error for every unknown path.
fn router(state: Arc<server::ApiState>) -> axum::Router {
    artifacts_api::routes()
        .merge(server::vm_routes())
        .merge(snapshot_api::routes())
        .fallback(|| async {
            server::ApiError(
                axum::http::StatusCode::NOT_FOUND,
                "No such API path; see docs/api.md".to_string(),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(server::MAX_BODY))
        .with_state(state)
}
