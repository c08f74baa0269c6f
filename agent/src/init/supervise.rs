//! After the switch: exec the image's init, or, on images without one, stay
//! PID 1 — reap every child, keep sshd and the agent service running, and
//! shut down cleanly on Ctrl-Alt-Del / SIGTERM.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, kill, sigaction};
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

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// PID 1 without an init system: supervises sshd (if present) and the
/// agent service (`spawn_service` forks a new one), reaps everything, and
/// reboots the VM (which ends it) when asked to stop.
pub fn supervise(mut service: Option<Pid>, spawn_service: impl Fn() -> Option<Pid>) -> ! {
    // Ctrl-Alt-Del becomes SIGINT to PID 1 instead of an instant reboot.
    let _ = nix::sys::reboot::set_cad_enabled(false);
    let action = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        if let Err(e) = unsafe { sigaction(sig, &action) } {
            console::log(&format!("cannot handle {sig}: {e}"));
        }
    }
    let root = Path::new("/");
    let mut sshd = start_sshd(root);
    let (mut sshd_backoff, mut service_backoff) = (Backoff::default(), Backoff::default());
    console::log("no init system: staying PID 1 (reaping children, supervising sshd)");
    loop {
        if STOP.load(Ordering::SeqCst) {
            shutdown();
        }
        match waitpid(None::<Pid>, None) {
            Ok(status) => {
                let pid = status.pid();
                if pid.is_some() && pid == sshd {
                    let wait = sshd_backoff.next();
                    console::log(&format!("sshd exited ({status:?}); restarting in {wait:?}"));
                    std::thread::sleep(wait);
                    sshd = start_sshd(root);
                } else if pid.is_some() && pid == service {
                    let wait = service_backoff.next();
                    console::log(&format!(
                        "agent service exited ({status:?}); restarting in {wait:?}"
                    ));
                    std::thread::sleep(wait);
                    service = spawn_service();
                }
            }
            Err(Errno::EINTR) => {}
            // Nothing to reap right now; wait for a signal or an orphan.
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
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
