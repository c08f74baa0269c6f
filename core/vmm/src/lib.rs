//! VMM backends behind one trait. The lifecycle hands a backend a finished
//! [`MachineSpec`]; the backend launches, stops and kills the VMM process.
//!
//! VMM processes outlive the daemon: they run in their own session and are
//! found again by pid + start time (see [`process_alive`]).
//!
//! Also here: what the backends hand the guest besides the machine, the
//! [`config_drive`], and the host side of the guest agent's hybrid vsock
//! ([`vsock`]). Which backend a VM gets is decided in
//! `banger_api::backend`, which the CLI shares.

#![deny(unsafe_code)]

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use banger_api::machine::MachineSpec;
use banger_api::model::{VmmKind, VmmProcess};

pub mod cgroup;
pub mod config_drive;
mod confine;
mod disk_lock;
mod exits;
pub mod firecracker;
pub mod jailer;
pub mod qemu;
mod spawn;
mod uds_http;
pub mod vsock;

pub use exits::{exit_status, is_failure};
use spawn::{Detached, Spawned, spawn_detached};

/// Host paths a backend may use for one VM.
#[derive(Debug, Clone)]
pub struct LaunchPaths {
    /// The VM's private directory.
    pub vm_dir: PathBuf,
    /// Where the VMM's API socket goes (short path under the runtime dir).
    pub api_socket: PathBuf,
    /// The VMM's own log (not the guest console).
    pub vmm_log: PathBuf,
}

/// A backend failure.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be found or started.
    #[error("Failed to start {bin} (`banger doctor` checks this host's backends)")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited or never answered while we were setting it up.
    #[error("{0}")]
    NotReady(String),
    /// This backend or host cannot run the machine as specified (the
    /// message names what and the fix); nothing was started.
    #[error("{0}")]
    Unsupported(String),
    /// An API call was rejected; `fault` is the VMM's own message.
    #[error("{vmm} rejected {request}: {fault}")]
    Api {
        /// Backend name.
        vmm: &'static str,
        /// e.g. `PUT /boot-source`.
        request: String,
        /// The VMM's fault message.
        fault: String,
    },
    /// Talking to the VMM failed.
    #[error("I/O with the VMM failed while {0}")]
    Io(String, #[source] std::io::Error),
    /// Signalling the VMM process failed.
    #[error("Failed to signal VMM pid {0}")]
    Signal(u32, #[source] nix::Error),
}

/// A VMM backend.
pub trait Vmm: Send + Sync + fmt::Debug {
    /// Backend name for messages (`firecracker`).
    fn name(&self) -> &'static str;

    /// Starts the VMM for `machine` and boots the guest. On error nothing is
    /// left running. The guest console goes to `machine.serial_log`.
    fn launch(&self, machine: &MachineSpec, paths: &LaunchPaths) -> Result<VmmProcess, VmmError>;

    /// [`Vmm::launch`], handing the VMM process to `on_spawned` as soon as it
    /// exists, before it is configured or booted, so the caller can persist
    /// it: a daemon that dies in that window still knows which process to
    /// kill. An error from `on_spawned` aborts the launch (the VMM is killed).
    /// Backends that start nothing long-lived may keep this default, which
    /// reports the process after the launch.
    fn launch_recorded(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        let process = self.launch(machine, paths)?;
        if let Err(e) = on_spawned(&process) {
            let _ = self.kill(&process);
            return Err(e);
        }
        Ok(process)
    }

    /// Asks the guest to shut down, waits up to `grace`, then kills the VMM.
    /// Returns once the process is gone.
    fn shutdown(&self, process: &VmmProcess, grace: Duration) -> Result<(), VmmError>;

    /// Kills the VMM at once and waits until it is gone.
    fn kill(&self, process: &VmmProcess) -> Result<(), VmmError>;

    /// Snapshots the running VM into `dir` (an empty directory the caller
    /// stages): pauses the guest, writes the backend's state files there,
    /// calls `while_paused` (the caller copies the disks: the guest cannot
    /// write them then), and resumes the guest whatever happened. An error
    /// leaves the VM running. See `docs/snapshots.md`.
    fn snapshot(
        &self,
        process: &VmmProcess,
        dir: &Path,
        while_paused: &mut WhilePaused<'_>,
    ) -> Result<(), VmmError> {
        let _ = (process, dir, while_paused);
        Err(VmmError::Unsupported(format!(
            "The {} backend cannot take snapshots",
            self.name()
        )))
    }

    /// Starts a new VMM for `machine` (its own disks, tap, vsock socket and
    /// console) from the snapshot in `dir` instead of booting it, reporting
    /// the process to `on_spawned` as [`Vmm::launch_recorded`] does. On error
    /// nothing is left running.
    fn restore_recorded(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        dir: &Path,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        let _ = (machine, paths, dir, on_spawned);
        Err(VmmError::Unsupported(format!(
            "The {} backend cannot restore snapshots",
            self.name()
        )))
    }
}

/// What [`Vmm::snapshot`] runs while the guest is paused.
pub type WhilePaused<'a> = dyn FnMut() -> Result<(), VmmError> + 'a;

/// What [`Vmm::launch_recorded`] calls with a just-spawned VMM process.
pub type OnSpawned<'a> = dyn FnMut(&VmmProcess) -> Result<(), VmmError> + 'a;

/// For backends' `launch`: records nothing.
fn record_nothing(_: &VmmProcess) -> Result<(), VmmError> {
    Ok(())
}

/// One backend per [`VmmKind`]; each VM uses the one its spec names.
#[derive(Debug, Clone)]
pub struct Backends {
    firecracker: Arc<dyn Vmm>,
    qemu: Arc<dyn Vmm>,
}

impl Backends {
    /// The daemon's backends.
    pub fn new(firecracker: Arc<dyn Vmm>, qemu: Arc<dyn Vmm>) -> Self {
        Backends { firecracker, qemu }
    }

    /// The same backend for every kind (tests).
    pub fn single(vmm: Arc<dyn Vmm>) -> Self {
        Backends {
            firecracker: vmm.clone(),
            qemu: vmm,
        }
    }

    /// The backend for `kind`.
    pub fn get(&self, kind: VmmKind) -> Arc<dyn Vmm> {
        match kind {
            VmmKind::Firecracker => self.firecracker.clone(),
            VmmKind::Qemu => self.qemu.clone(),
        }
    }
}

/// The size at which the daemon rotates a VM's `serial.log`.
pub const SERIAL_LOG_MAX_BYTES: u64 = 64 << 20;

/// Keeps a console log under `max` bytes: past it, the log is copied to
/// `<log>.1` (staged, then renamed over the previous one) and truncated.
/// The VMMs write it with `O_APPEND`, so they go on at the new end; output
/// written between the copy and the truncation is lost. Returns whether it
/// rotated.
pub fn rotate_console_log(log: &Path, max: u64) -> io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut old = log.as_os_str().to_owned();
    old.push(".1");
    let old = PathBuf::from(old);
    let mut staged = old.as_os_str().to_owned();
    staged.push(".tmp");
    let staged = PathBuf::from(staged);
    let copied = std::fs::copy(log, &staged).and_then(|_| std::fs::rename(&staged, &old));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// The start time (clock ticks since boot) of `pid`, from `/proc/PID/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with " S ppid ..." (field 3); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if `p` is still the same live process (not a zombie, not a reused pid).
pub fn process_alive(p: &VmmProcess) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next();
    if matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(p.start_time)
}

/// How often backends poll readiness and exit.
const POLL: Duration = Duration::from_millis(10);
/// The pause of a readiness poll for its first [`FLAT`] ms, doubled up to
/// [`POLL`] after: a VMM's socket is usually there within a few ms (the
/// fake firecracker binds its API socket about 1.1 ms after the spawn). A
/// pause that starts at 1 ms woke on average a third of the wait late, and
/// one that doubles from the start still woke at 1.75 ms for a socket there
/// at 1.1 ms; a flat quarter millisecond wakes an eighth of one late on
/// average, for a failed connect (about 10 us) per pause. An inotify watch
/// on the socket's directory was tried instead and dropped: closing an
/// inotify instance can wait for an SRCU grace period in the kernel
/// (median 0.05 ms, but 20 ms for one close in fifty on this host).
const FIRST_PAUSE: Duration = Duration::from_micros(250);
/// How long a readiness poll keeps [`FIRST_PAUSE`] before it backs off.
const FLAT: Duration = Duration::from_millis(5);

/// The pauses of one readiness poll ([`FIRST_PAUSE`], [`FLAT`], [`POLL`]).
#[derive(Debug)]
struct Pauses {
    started: Instant,
    next: Duration,
}

impl Pauses {
    fn new() -> Pauses {
        Pauses {
            started: Instant::now(),
            next: FIRST_PAUSE,
        }
    }

    /// The pause due after `elapsed` of polling.
    fn after(&mut self, elapsed: Duration) -> Duration {
        if elapsed < FLAT {
            return FIRST_PAUSE;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(POLL);
        pause
    }

    /// Sleeps for the next pause.
    fn sleep(&mut self) {
        let pause = self.after(self.started.elapsed());
        std::thread::sleep(pause);
    }
}
/// How many log lines an early-exit error quotes.
pub const LOG_TAIL_LINES: usize = 20;

/// SIGKILLs `p` if it is still the same process, then waits until it is gone.
fn kill_and_wait(p: &VmmProcess, timeout: Duration) -> Result<(), VmmError> {
    // process_alive compares the start time, so a reused pid is left alone.
    if !process_alive(p) {
        return Ok(());
    }
    match kill(pid_of(p.pid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(VmmError::Signal(p.pid, e)),
    }
    let deadline = Instant::now() + timeout;
    while process_alive(p) {
        if Instant::now() >= deadline {
            return Err(io_err(
                format!("waiting for pid {} to exit after SIGKILL", p.pid),
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("still alive after {timeout:?}"),
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Waits up to `grace` for `p` to exit on its own.
fn wait_gone(p: &VmmProcess, grace: Duration) {
    let deadline = Instant::now() + grace;
    while process_alive(p) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

/// Removes a socket or state file; a missing one is fine.
fn remove_socket(path: &Path) -> Result<(), VmmError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// The last `n` lines of `path` (at most its last 8 KiB), for error messages.
pub fn log_tail(path: &Path, n: usize) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(8 << 10)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(n)..].join("\n");
            if tail.trim().is_empty() {
                "(empty)".to_owned()
            } else {
                tail
            }
        }
        Err(e) => format!("(unreadable: {e})"),
    }
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(pid as i32)
}

fn io_err(what: impl Into<String>, e: io::Error) -> VmmError {
    VmmError::Io(what.into(), e)
}

/// The whole error chain on one line, for logs.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn readiness_pauses_stay_short_for_the_first_ms_then_back_off_to_the_poll() {
        let mut p = super::Pauses::new();
        let ms = Duration::from_millis;
        // However many polls the first few ms take, each waits a quarter ms.
        for elapsed in [ms(0), ms(1), ms(4)] {
            assert_eq!(p.after(elapsed), super::FIRST_PAUSE, "{elapsed:?}");
        }
        let later: Vec<Duration> = (0..8).map(|_| p.after(ms(6))).collect();
        assert_eq!(
            later,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000].map(Duration::from_micros)
        );
        assert_eq!(super::POLL, ms(10));
    }

    #[test]
    fn console_log_rotates_past_its_cap_and_keeps_appending() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        assert!(!super::rotate_console_log(&log, 10).unwrap(), "no log yet");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writer.write_all(b"0123456789").unwrap();
        assert!(!super::rotate_console_log(&log, 10).unwrap());
        writer.write_all(b"abc").unwrap();
        assert!(super::rotate_console_log(&log, 10).unwrap());
        let old = dir.path().join("serial.log.1");
        assert_eq!(std::fs::read(&old).unwrap(), b"0123456789abc");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        writer.write_all(b"next").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next", "append goes on at 0");
        assert!(!dir.path().join("serial.log.1.tmp").exists());
    }

    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("serial.log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        let tail = log_tail(&p, 3);
        assert_eq!(tail, "line 28\nline 29\nline 30");
        assert!(log_tail(&dir.path().join("nope"), 3).starts_with("(unreadable"));
        std::fs::write(&p, "").unwrap();
        assert_eq!(log_tail(&p, 3), "(empty)");
    }

    #[test]
    fn a_missing_vmm_binary_names_it_and_points_at_doctor() {
        let bin = Path::new("/nonexistent/qemu-system-x86_64");
        let Err(e) = spawn_detached(Detached::new(std::process::Command::new(bin)), bin, "test")
        else {
            panic!("a missing binary started");
        };
        assert_eq!(
            error_chain(&e),
            "Failed to start /nonexistent/qemu-system-x86_64 (`banger doctor` checks this \
             host's backends): No such file or directory (os error 2)"
        );
    }

    #[test]
    fn own_process_is_alive_and_pid_reuse_is_detected() {
        let pid = std::process::id();
        let st = process_start_time(pid).expect("own start time");
        let me = VmmProcess {
            pid,
            start_time: st,
            api_socket: "/x".into(),
        };
        assert!(process_alive(&me));
        let reused = VmmProcess {
            start_time: st + 1,
            ..me.clone()
        };
        assert!(!process_alive(&reused));
        let gone = VmmProcess {
            pid: u32::MAX - 1,
            ..me
        };
        assert!(!process_alive(&gone));
    }
}
