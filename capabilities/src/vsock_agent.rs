//! `vsock-agent`: boots the guest with banger's initramfs (the agent as
//! `/init`), gives the machine a vsock device whose host side is a Unix
//! socket in the VM's directory, and after launch waits until the agent
//! answers `/healthz` through it (or its VMM exits, or the agent says on
//! the guest console that the host cannot reach it: no waiting out the
//! timeout for a guest that is gone or unreachable). Every start also draws a fresh exec
//! secret (32 random bytes, hex) for the agent's `POST /exec`: kept in the
//! VM's directory for the daemon, and on the config drive for the guest,
//! which reads it from its `/run` tmpfs; the VM's disk never holds it.
//!
//! Options (`--cap vsock-agent:timeout=30,agent=/path/to/banger-agent`):
//! - `timeout`: seconds to wait for `/healthz`. Without it,
//!   config `agent_timeout_secs` (default 60).
//! - `agent`: the agent binary. Without it, config `agent_bin`, then
//!   `banger-agent` next to the daemon, then `PATH`.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_api::config::Config;
use banger_api::guest::{GuestConfig, GuestFile};
use banger_api::machine::{MachineSpec, Vsock};
use banger_api::model::CapOptions;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, HookCtx, TeardownReason,
};
use banger_guest_protocol::api::{READY_LINE, READY_RESTORED};
use banger_vmm::vsock::{AgentClient, EXEC_SECRET_FILE, GUEST_EXEC_SECRET_PATH, ready_socket_path};

use self::console_watch::ConsoleWatch;
use self::initrd::Built;

mod console_watch;
pub mod initrd;

/// Name used with `--cap`.
pub const NAME: &str = "vsock-agent";
/// The host side of the guest's vsock device, inside the VM's directory.
pub const SOCKET_FILE: &str = "vsock.sock";
/// The initrd built for the VM, inside its directory.
pub const INITRD_FILE: &str = "initramfs.cpio";
/// Guest context id. Each VM has its own socket, so one CID serves all.
pub const GUEST_CID: u32 = 3;

/// Longest Unix socket path the kernel accepts (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Upper bound of a single `/healthz` attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long PostStart waits for the agent's announcement before it polls
/// `/healthz` as well, for an agent that does not announce itself (one
/// older than the announcement): long enough for a loaded TCG boot, whose
/// early connections the guest cannot answer yet (see `post_start`).
const ANNOUNCE_GRACE: Duration = Duration::from_secs(10);

/// The agents' announcement listeners (`READY_PORT`), by vsock socket
/// path, from the `configure_machine` that binds one (before the VMM
/// starts, so no announcement is missed) to the `post_start` that waits on
/// it or the teardown that drops it.
static READY: Mutex<BTreeMap<PathBuf, UnixListener>> = Mutex::new(BTreeMap::new());

fn ready_listeners() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, UnixListener>> {
    READY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The guest consoles of starts in progress, by vsock socket path, from
/// the `configure_machine` that notes where the console ends (before the
/// VMM starts) to the `post_start` that watches it or the teardown.
static CONSOLES: Mutex<BTreeMap<PathBuf, ConsoleWatch>> = Mutex::new(BTreeMap::new());

fn consoles() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, ConsoleWatch>> {
    CONSOLES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Fails when the agent said on the console that the host cannot reach it.
fn check_console(console: &mut Option<ConsoleWatch>, vm: &str) -> Result<(), CapError> {
    match console.as_mut().and_then(ConsoleWatch::unreachable) {
        Some(reason) => Err(CapError::msg(format!(
            "The guest agent says the host cannot reach it: {reason} (the guest console: `banger vm logs {vm}`)"
        ))),
        None => Ok(()),
    }
}

/// Binds the announcement listener for the VM whose vsock socket is `uds`,
/// replacing any earlier one. Best effort: without it (a path too long, a
/// bind error) the agent is found by polling alone.
fn listen_for_announcement(uds: &Path) {
    let path = ready_socket_path(uds);
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return;
    }
    if std::fs::symlink_metadata(&path).is_ok() {
        let _ = std::fs::remove_file(&path);
    }
    match UnixListener::bind(&path).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(listener) => {
            ready_listeners().insert(uds.to_path_buf(), listener);
        }
        Err(e) => tracing::debug!(path = %path.display(), "no announcement listener: {e}"),
    }
}

/// Who announced the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announced {
    /// The agent itself, the moment it listens: ask it `/healthz`.
    Agent,
    /// The daemon, for a restored guest whose agent has just answered its
    /// re-identify ([`READY_RESTORED`]): nothing left to ask.
    Restored,
}

/// The announcement waiting on `listener`, if any: a connection whose
/// first line starts with [`READY_LINE`] (the agent writes it at once).
fn take_announcement(listener: &UnixListener) -> Option<Announced> {
    let (mut conn, _) = listener.accept().ok()?;
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut line = [0u8; 64];
    let n = conn.read(&mut line).unwrap_or(0);
    let line = String::from_utf8_lossy(&line[..n]);
    let reason = line.strip_prefix(READY_LINE)?.trim();
    Some(if reason == READY_RESTORED {
        Announced::Restored
    } else {
        Announced::Agent
    })
}

/// Waits up to `gap` for a connection on `listener`.
fn wait_for_announcement(listener: &UnixListener, gap: Duration) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let ms = u16::try_from(gap.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// The vsock-agent capability.
#[derive(Debug, Default)]
pub struct VsockAgent;

fn make(_env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(VsockAgent))
}

inventory::submit! { BuiltinCapability { make } }

/// The options, checked.
struct Options {
    timeout: Option<Duration>,
    agent: Option<PathBuf>,
}

fn seconds(v: &str) -> Option<Duration> {
    let secs = v.trim().parse::<u64>().ok()?;
    (1..=3600)
        .contains(&secs)
        .then(|| Duration::from_secs(secs))
}

fn options(o: &CapOptions) -> Result<Options, CapError> {
    let mut out = Options {
        timeout: None,
        agent: None,
    };
    for (k, v) in o {
        match k.as_str() {
            "timeout" => {
                let Some(t) = seconds(v) else {
                    return Err(CapError::InvalidOptions(format!(
                        "invalid vsock-agent timeout {v:?}: use a number of seconds from 1 to 3600, e.g. vsock-agent:timeout=30"
                    )));
                };
                out.timeout = Some(t);
            }
            "agent" => {
                let p = PathBuf::from(v);
                if !p.is_absolute() {
                    return Err(CapError::InvalidOptions(format!(
                        "vsock-agent agent={v:?} must be an absolute path to banger-agent"
                    )));
                }
                out.agent = Some(p);
            }
            other => {
                return Err(CapError::InvalidOptions(format!(
                    "unknown vsock-agent option {other:?}; valid options: timeout, agent"
                )));
            }
        }
    }
    Ok(out)
}

/// The health wait for this VM: the option, else config `agent_timeout_secs`.
fn timeout(opts: &Options, config: &Config) -> Duration {
    opts.timeout
        .unwrap_or(Duration::from_secs(config.agent_timeout_secs))
}

/// The agent binary for this VM: the option, else config `agent_bin`, else
/// `banger-agent` next to the daemon, else `PATH`.
fn agent_bin(opts: &Options, config: &Config) -> Result<PathBuf, CapError> {
    match &opts.agent {
        Some(p) => banger_api::config::check_static_agent(p)
            .map(|()| p.clone())
            .map_err(|e| CapError::with("Cannot use the guest agent given with agent=", e)),
        None => config
            .agent_bin()
            .map_err(|e| CapError::with("Cannot find the guest agent (or use --cap vsock-agent:agent=/path/to/banger-agent)", e)),
    }
}

fn socket_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join(SOCKET_FILE)
}

impl Capability for VsockAgent {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Boots the guest with banger-agent as /init and waits for its vsock health check; options timeout=SECS, agent=PATH"
    }

    fn validate_options(&self, o: &CapOptions) -> Result<(), CapError> {
        options(o).map(|_| ())
    }

    fn configure_machine(
        &self,
        ctx: &HookCtx<'_>,
        machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        let opts = options(ctx.options)?;
        if let Some(v) = &machine.vsock {
            return Err(CapError::msg(format!(
                "The machine already has a vsock device ({}); vsock-agent needs its own",
                v.uds_path.display()
            )));
        }
        let uds = socket_path(ctx.vm_dir);
        if uds.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(CapError::msg(format!(
                "The vsock socket path {} is longer than {MAX_SOCKET_PATH} bytes; move banger's state directory somewhere shorter",
                uds.display()
            )));
        }
        let agent = agent_bin(&opts, ctx.config)?;
        let dest = ctx.vm_dir.join(INITRD_FILE);
        let built = initrd::build_initrd(&agent, machine.initrd.as_deref(), &dest)
            .map_err(|e| CapError::with("Cannot build the agent initramfs", e))?;
        if built == Built::Fresh {
            ctx.log
                .info(&format!("built initramfs with {}", agent.display()));
        }
        machine.initrd = Some(dest);
        listen_for_announcement(&uds);
        consoles().insert(uds.clone(), ConsoleWatch::from_end(&machine.serial_log));
        machine.vsock = Some(Vsock {
            guest_cid: GUEST_CID,
            uds_path: uds,
        });
        Ok(())
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let host = ctx.vm_dir.join(EXEC_SECRET_FILE);
        // Valid for this start only: no VM outlives a host restart, and the
        // next start writes another, so it is not synced.
        banger_api::fsutil::write_atomic_unsynced(&host, secret.as_bytes(), 0o600)
            .map_err(|e| CapError::with(format!("Cannot write {}", host.display()), e))?;
        guest.files.push(GuestFile {
            path: Path::new("/").join(GUEST_EXEC_SECRET_PATH),
            contents: secret.into_bytes(),
            mode: 0o600,
            uid: 0,
            gid: 0,
        });
        Ok(())
    }

    fn post_start(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        const MAX_POLL_GAP: Duration = Duration::from_millis(100);
        let wait = timeout(&options(ctx.options)?, ctx.config);
        let uds = socket_path(ctx.vm_dir);
        let started = Instant::now();
        let deadline = started + wait;
        // The agent announces itself the moment it listens (READY_PORT), so
        // the wait ends then, and nothing connects to the guest before:
        // a connection made while the guest's vsock driver is not up yet
        // waits in the VMM, and vhost-device-vsock was seen to stop
        // answering for good after a burst of those (every `/healthz` of a
        // boot then got no answer for 240 s).
        let mut announced = false;
        let mut console = consoles().remove(&uds);
        // Never the whole budget: half of it is left for asking.
        let grace = ANNOUNCE_GRACE.min(wait / 2);
        if let Some(listener) = ready_listeners().remove(&uds) {
            loop {
                match take_announcement(&listener) {
                    Some(Announced::Restored) => {
                        ctx.log.info(&format!(
                            "the restored agent answered its re-identify ({:.2}s)",
                            started.elapsed().as_secs_f64()
                        ));
                        return Ok(());
                    }
                    Some(Announced::Agent) => {
                        announced = true;
                        break;
                    }
                    None => {}
                }
                if let Some(status) = ctx.vm.vmm.as_ref().and_then(banger_vmm::exit_status) {
                    return Err(CapError::msg(format!(
                        "The VMM exited with {status} before the guest agent announced itself"
                    )));
                }
                check_console(&mut console, ctx.vm.name.as_str())?;
                let now = Instant::now();
                if now >= started + grace {
                    ctx.log.info(&format!(
                        "the agent did not announce itself within {:.1}s; asking it",
                        grace.as_secs_f64()
                    ));
                    break;
                }
                wait_for_announcement(&listener, Duration::from_millis(100));
            }
        }
        let mut delay = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left.min(ATTEMPT_TIMEOUT).max(Duration::from_millis(10));
            let err = match AgentClient::new(&uds, attempt).healthz() {
                Ok(h) => {
                    ctx.log.info(&format!(
                        "agent {} answered after {:.2}s{}",
                        h.version,
                        started.elapsed().as_secs_f64(),
                        if announced { " (announced)" } else { "" }
                    ));
                    return Ok(());
                }
                Err(e) => e,
            };
            // A VMM that is gone will never answer: stop at once (the
            // lifecycle quotes how it ended and its logs).
            if let Some(status) = ctx.vm.vmm.as_ref().and_then(banger_vmm::exit_status) {
                return Err(CapError::with(
                    format!(
                        "The VMM exited with {status} before the guest agent answered /healthz"
                    ),
                    err,
                ));
            }
            check_console(&mut console, ctx.vm.name.as_str())?;
            if Instant::now() + delay >= deadline {
                return Err(CapError::with(
                    format!(
                        "The guest agent did not answer /healthz on {} within {}s; see the guest console with `banger vm logs {}`",
                        uds.display(),
                        wait.as_secs(),
                        ctx.vm.name
                    ),
                    err,
                ));
            }
            // Polling a guest that is still booting: nothing to wait on but
            // time. A connect attempt costs microseconds on the host, so keep
            // the gap short: with 500 ms steps a guest ready at 1.5 s was
            // seen at 1.9 s (the boot benchmark's post_start stage).
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_POLL_GAP);
        }
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        // The VMM leaves its socket behind; the initrd is a cache worth
        // keeping until the VM is deleted.
        // The secret too: the next start draws a new one.
        let uds = socket_path(ctx.vm_dir);
        ready_listeners().remove(&uds);
        consoles().remove(&uds);
        for path in [
            ready_socket_path(&uds),
            uds,
            ctx.vm_dir.join(EXEC_SECRET_FILE),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(CapError::with(
                        format!("Cannot remove {}", path.display()),
                        e,
                    ));
                }
            }
        }
        if reason == TeardownReason::Delete {
            initrd::remove_initrd(&ctx.vm_dir.join(INITRD_FILE))
                .map_err(|e| CapError::with("Cannot remove the agent initramfs", e))?;
        }
        Ok(())
    }
}
