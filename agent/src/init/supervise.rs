//! After the switch: exec the image's init, or, on images without one, stay
//! PID 1 — reap every child, keep sshd and the agent service running, and
//! shut down cleanly on Ctrl-Alt-Del / SIGTERM.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::console;

/// Init systems tried in order, relative to the root.
pub const INIT_CANDIDATES: &[&str] = &[
    "sbin/init",
    "lib/systemd/systemd",
    "usr/lib/systemd/systemd",
    "usr/sbin/init",
    "bin/init",
];

/// Where the PID 1 fallback looks for sshd, relative to the root.
pub const SSHD: &str = "usr/sbin/sshd";

/// The first init candidate that exists under `root` (symlinks followed).
pub fn find_init(root: &Path) -> Option<PathBuf> {
    INIT_CANDIDATES
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_file())
}

/// Replaces this process with `init` (a path in the current root); returns
/// only on failure.
pub fn exec_init(init: &Path) -> Errno {
    let Ok(path) = CString::new(init.as_os_str().as_encoded_bytes()) else {
        return Errno::EINVAL;
    };
    match nix::unistd::execv(&path, &[&path]) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

/// Whether sshd under `root` still needs `ssh-keygen -A` (no private host
/// key in `etc/ssh`).
pub fn needs_host_keys(root: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(root.join("etc/ssh")) else {
        return true;
    };
    !entries.flatten().any(|e| {
        let n = e.file_name();
        let n = n.to_string_lossy();
        n.starts_with("ssh_host_") && n.ends_with("_key")
    })
}

/// Runs `commands` in order with `env` added, stdio inherited (the
/// console); returns each exit status, or why it could not start.
pub fn run_commands(
    commands: &[Vec<String>],
    env: &BTreeMap<String, String>,
) -> Vec<Result<ExitStatus, String>> {
    commands
        .iter()
        .map(|argv| {
            let (program, args) = argv.split_first().ok_or("empty command")?;
            Command::new(program)
                .args(args)
                .envs(env)
                .status()
                .map_err(|e| format!("cannot start {program}: {e}"))
        })
        .collect()
}

/// A supervised child and when it may be restarted.
#[derive(Debug, Default)]
struct Supervised {
    pid: Option<Pid>,
    backoff: Backoff,
    restart_at: Option<Instant>,
}

impl Supervised {
    /// Records that `pid` exited if it is this child; schedules a restart.
    fn exited(&mut self, pid: Option<Pid>, what: &str, status: &WaitStatus) {
        if pid.is_some() && pid == self.pid {
            let wait = self.backoff.next();
            console::log(&format!(
                "{what} exited ({status:?}); restarting in {wait:?}"
            ));
            self.pid = None;
            self.restart_at = Some(Instant::now() + wait);
        }
    }

    /// Restarts the child with `start` if its time has come.
    fn restart_due(&mut self, start: impl FnOnce() -> Option<Pid>) {
        if self.restart_at.is_some_and(|t| t <= Instant::now()) {
            self.restart_at = None;
            self.pid = start();
        }
    }
}

/// PID 1 without an init system: supervises sshd (if present) and the
/// agent service (`spawn_service` forks a new one), reaps everything, and
/// reboots the VM (which ends it) when asked to stop.
///
/// Signals arrive through a signalfd (SIGCHLD, SIGINT, SIGTERM blocked), so
/// none is lost between reaping and waiting, and restarts are timers rather
/// than sleeps, so a stop request is handled at once.
pub fn supervise(service: Option<Pid>, spawn_service: impl Fn() -> Option<Pid>) -> ! {
    // Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an instant reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let mut mask = SigSet::empty();
    for sig in [Signal::SIGCHLD, Signal::SIGINT, Signal::SIGTERM] {
        mask.add(sig);
    }
    let signals = match mask.thread_block().and_then(|()| SignalFd::new(&mask)) {
        Ok(fd) => Some(fd),
        Err(e) => {
            console::error("set up signal handling (polling instead)", &e);
            None
        }
    };
    let root = Path::new("/");
    let mut sshd = Supervised {
        pid: start_sshd(root),
        ..Default::default()
    };
    let mut service = Supervised {
        pid: service,
        ..Default::default()
    };
    console::log("no init system: staying PID 1 (reaping children, supervising sshd)");
    loop {
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    sshd.exited(status.pid(), "sshd", &status);
                    service.exited(status.pid(), "agent service", &status);
                }
            }
        }
        sshd.restart_due(|| start_sshd(root));
        service.restart_due(&spawn_service);
        let next = [sshd.restart_at, service.restart_at]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()));
        let Some(fd) = &signals else {
            let nap = Duration::from_millis(500);
            std::thread::sleep(next.map_or(nap, |n| n.min(nap)));
            continue;
        };
        let timeout = next
            .and_then(|d| PollTimeout::try_from(d + Duration::from_millis(1)).ok())
            .unwrap_or(PollTimeout::NONE);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if matches!(poll(&mut fds, timeout), Ok(n) if n > 0) {
            if let Ok(Some(info)) = fd.read_signal() {
                let signo = i32::try_from(info.ssi_signo).unwrap_or(0);
                if signo == libc::SIGINT || signo == libc::SIGTERM {
                    shutdown();
                }
            }
        }
    }
}

/// Undoes the supervisor's signal mask in a forked child.
pub fn reset_signal_mask() {
    let _ = SigSet::empty().thread_set_mask();
}

/// Restart delays: 1s doubling to 64s for a child that keeps dying
/// quickly (vsock missing from the kernel, broken sshd config), back to 1s
/// once it has run for a minute.
#[derive(Debug)]
struct Backoff {
    delay: Duration,
    last: Instant,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            delay: Duration::from_secs(1),
            last: Instant::now(),
        }
    }
}

impl Backoff {
    const MAX: Duration = Duration::from_secs(64);
    const STABLE: Duration = Duration::from_secs(60);

    fn next(&mut self) -> Duration {
        if self.last.elapsed() > Self::STABLE + self.delay {
            self.delay = Duration::from_secs(1);
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        self.last = Instant::now();
        wait
    }
}

fn start_sshd(root: &Path) -> Option<Pid> {
    let sshd = root.join(SSHD);
    if !sshd.is_file() {
        console::log("no /usr/sbin/sshd in the image; not starting sshd");
        return None;
    }
    if needs_host_keys(root) {
        console::log("generating SSH host keys (ssh-keygen -A)");
        match Command::new("ssh-keygen").arg("-A").status() {
            Ok(s) if s.success() => {}
            Ok(s) => console::log(&format!("ssh-keygen -A FAILED: {s}")),
            Err(e) => console::log(&format!("ssh-keygen -A FAILED: {e}")),
        }
    }
    // Debian's sshd insists on its privilege separation directory.
    let _ = std::fs::create_dir_all(root.join("run/sshd"));
    match Command::new(&sshd).args(["-D", "-e"]).spawn() {
        Ok(child) => {
            console::log(&format!("started sshd (pid {})", child.id()));
            // We reap it ourselves with waitpid; Child's drop does nothing.
            i32::try_from(child.id()).ok().map(Pid::from_raw)
        }
        Err(e) => {
            console::log(&format!("starting sshd FAILED: {e}"));
            None
        }
    }
}

/// Stops every process, syncs and reboots, which ends a microVM.
fn shutdown() -> ! {
    console::log("stopping: sending SIGTERM to all processes");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => break,
            Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(50)),
            _ => {}
        }
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    console::log("rebooting (the VMM exits)");
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; there is nothing left to do.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn restart_delay_doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..9).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn finds_first_existing_init_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(find_init(root.path()), None);
        fs::create_dir_all(root.path().join("lib/systemd")).unwrap();
        fs::create_dir_all(root.path().join("sbin")).unwrap();
        fs::write(root.path().join("lib/systemd/systemd"), "").unwrap();
        assert_eq!(
            find_init(root.path()),
            Some(root.path().join("lib/systemd/systemd"))
        );
        std::os::unix::fs::symlink("../lib/systemd/systemd", root.path().join("sbin/init"))
            .unwrap();
        assert_eq!(find_init(root.path()), Some(root.path().join("sbin/init")));
        // A dangling symlink is no init.
        fs::remove_file(root.path().join("lib/systemd/systemd")).unwrap();
        assert_eq!(find_init(root.path()), None);
    }

    #[test]
    fn host_keys_are_generated_only_when_no_private_key_exists() {
        let root = tempfile::tempdir().unwrap();
        assert!(needs_host_keys(root.path()));
        fs::create_dir_all(root.path().join("etc/ssh")).unwrap();
        fs::write(root.path().join("etc/ssh/ssh_host_ed25519_key.pub"), "").unwrap();
        assert!(needs_host_keys(root.path()));
        fs::write(root.path().join("etc/ssh/ssh_host_ed25519_key"), "").unwrap();
        assert!(!needs_host_keys(root.path()));
    }

    #[test]
    fn commands_run_in_order_with_env_and_report_status() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let sh = |s: String| vec!["sh".to_string(), "-c".to_string(), s];
        let commands = vec![
            sh(format!("echo first-$GREETING >> {}", out.display())),
            sh(format!("echo second >> {}; exit 3", out.display())),
            vec![],
            vec!["/nonexistent/binary".to_string()],
        ];
        let env = BTreeMap::from([("GREETING".to_string(), "hello".to_string())]);
        let results = run_commands(&commands, &env);
        assert!(results[0].as_ref().unwrap().success());
        assert_eq!(results[1].as_ref().unwrap().code(), Some(3));
        assert!(results[2].is_err());
        assert!(
            results[3]
                .as_ref()
                .unwrap_err()
                .contains("/nonexistent/binary")
        );
        assert_eq!(fs::read_to_string(&out).unwrap(), "first-hello\nsecond\n");
    }
}
