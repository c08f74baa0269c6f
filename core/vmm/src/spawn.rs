//! Starting the processes that outlive the daemon (VMMs, the vsock
//! backend, the disk-lock holder): each in a session of its own, reaped by
//! a thread of the daemon while it lives.
//!
//! Without a cgroup to join they are started with `posix_spawn(3)`, which
//! glibc implements with `CLONE_VM | CLONE_VFORK`: the daemon's page tables
//! are not copied. A fork of the daemon (what `std::process::Command` does
//! as soon as it has a `pre_exec` hook, and the session and the disk locks
//! each needed one) cost 3-9 % of the daemon's CPU in the create bench, and
//! more the more VMs it holds. `posix_spawn` gives the rest by itself:
//! `POSIX_SPAWN_SETSID` for the session, and an `adddup2(fd, fd)` file
//! action, which clears close-on-exec in the child only (POSIX issue 8,
//! glibc 2.29), for the descriptors it must inherit.
//!
//! Joining a cgroup before exec needs code in the child, which
//! `posix_spawn` cannot run here (glibc 2.36 has no `CLONE_INTO_CGROUP`
//! attribute): [`Detached::join_cgroup`] keeps std's fork for those.

#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;

use nix::sys::signal::{Signal, kill};

use crate::{VmmError, exits, io_err, pid_of, process_start_time};

/// A process to start with [`spawn_detached`]. The [`Command`] gives the
/// program, its arguments and environment changes (its stdio settings are
/// not used); stdio and inherited descriptors are given here.
#[derive(Debug)]
pub(crate) struct Detached {
    cmd: Command,
    /// `None`: `/dev/null`.
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Descriptors the process inherits under the same numbers.
    keep: Vec<RawFd>,
    /// `cmd` has a hook to run in the child: start it with fork.
    forks: bool,
}

impl Detached {
    /// `cmd` with stdio on `/dev/null`.
    pub(crate) fn new(cmd: Command) -> Detached {
        Detached {
            cmd,
            stdin: None,
            stdout: None,
            stderr: None,
            keep: Vec::new(),
            forks: false,
        }
    }

    /// Standard input from `fd`.
    #[cfg(test)]
    pub(crate) fn stdin(mut self, fd: impl Into<OwnedFd>) -> Detached {
        self.stdin = Some(fd.into());
        self
    }

    /// Standard output and error appended to `log` (created if missing).
    pub(crate) fn log_to(self, log: &Path) -> Result<Detached, VmmError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| io_err(format!("opening {}", log.display()), e))?;
        self.output(out)
    }

    /// Standard output and error to `out`.
    pub(crate) fn output(mut self, out: File) -> Result<Detached, VmmError> {
        let err = out
            .try_clone()
            .map_err(|e| io_err("duplicating the output handle", e))?;
        self.stdout = Some(out.into());
        self.stderr = Some(err.into());
        Ok(self)
    }

    /// The process inherits `fd` (open in the daemon until the spawn
    /// returns) under the same number; no other child does.
    pub(crate) fn keep(&mut self, fd: RawFd) {
        self.keep.push(fd);
    }

    /// Starts the process with fork, as for a cgroup, without one.
    #[cfg(test)]
    pub(crate) fn force_fork(&mut self) {
        self.forks = true;
    }

    /// The process joins `cg` before it execs.
    pub(crate) fn join_cgroup(&mut self, cg: &crate::cgroup::VmCgroup) {
        cg.join_on_exec(&mut self.cmd);
        self.forks = true;
    }
}

/// A process spawned in its own session, reaped by a thread.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    /// `None` if the process vanished before its start time could be read.
    pub(crate) start_time: Option<u64>,
    /// Receives the exit status once the reaper has reaped it.
    exited: mpsc::Receiver<io::Result<ExitStatus>>,
}

/// Spawns `what` in a session of its own (so it outlives the daemon and
/// ignores its terminal) and reaps it from a detached thread so no zombie
/// lingers while the daemon lives.
pub(crate) fn spawn_detached(what: Detached, bin: &Path, label: &str) -> Result<Spawned, VmmError> {
    let started = if what.forks {
        fork_exec(what)
    } else {
        posix_spawn(&what)
    };
    let pid = started.map_err(|source| VmmError::Spawn {
        bin: bin.to_path_buf(),
        source,
    })?;
    // Read before the reaper can reap: the pid cannot be reused until then.
    let start_time = process_start_time(pid);
    exits::spawned(pid, start_time);
    let (exited_tx, exited) = mpsc::channel::<io::Result<ExitStatus>>();
    std::thread::Builder::new()
        .name(format!("reap-{label}-{pid}"))
        .spawn(move || {
            let status = wait(pid);
            exits::reaped(pid, &status);
            let _ = exited_tx.send(status);
        })
        .map_err(|e| {
            // The child went down with the closure, unreaped: kill it at least.
            let _ = kill(pid_of(pid), Signal::SIGKILL);
            io_err("starting the VMM reaper thread", e)
        })?;
    Ok(Spawned {
        pid,
        start_time,
        exited,
    })
}

/// `waitpid` until `pid` ended.
fn wait(pid: u32) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into the int we pass.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        if r >= 0 {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// std's fork and exec, for a [`Detached`] with a hook of its own.
fn fork_exec(what: Detached) -> io::Result<u32> {
    let Detached {
        mut cmd,
        stdin,
        stdout,
        stderr,
        keep,
        ..
    } = what;
    let stdio = |fd: Option<OwnedFd>| fd.map_or_else(Stdio::null, Stdio::from);
    cmd.stdin(stdio(stdin))
        .stdout(stdio(stdout))
        .stderr(stdio(stderr));
    // SAFETY: runs in the forked child before exec; setsid(2) and fcntl(2)
    // are async-signal-safe and nothing here allocates. The kept fds are
    // open: the caller holds them until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            for &fd in &keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // The reaper waits by pid; dropping the handle neither waits nor kills.
    cmd.spawn().map(|child| child.id())
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

/// A zero return, or the error it is.
fn check(r: libc::c_int) -> io::Result<()> {
    match r {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// The file actions of one spawn, destroyed with it.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        // SAFETY: init fills the zeroed struct before any other use.
        unsafe {
            let mut fa = FileActions(std::mem::zeroed());
            check(libc::posix_spawn_file_actions_init(&mut fa.0))?;
            Ok(fa)
        }
    }

    /// `fd` as `target` in the child (`fd == target` clears close-on-exec).
    fn dup2(&mut self, fd: RawFd, target: RawFd) -> io::Result<()> {
        // SAFETY: the struct was initialised; glibc copies the arguments.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, fd, target) })
    }

    /// `/dev/null` as `target` in the child.
    fn null(&mut self, target: RawFd, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: as above; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(
                &mut self.0,
                target,
                c"/dev/null".as_ptr(),
                flags,
                0,
            )
        })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: as above; glibc copies the path.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in new and destroyed once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// The attributes of one spawn, destroyed with it.
struct Attrs(libc::posix_spawnattr_t);

impl Attrs {
    /// A session of its own, no signal blocked, every signal's default
    /// action (SIGPIPE, which Rust ignores, included).
    fn detached() -> io::Result<Attrs> {
        // SAFETY: init fills the zeroed struct before any other use; the
        // sigsets are initialised by sigemptyset/sigfillset before use.
        unsafe {
            let mut a = Attrs(std::mem::zeroed());
            check(libc::posix_spawnattr_init(&mut a.0))?;
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            check(libc::posix_spawnattr_setsigmask(&mut a.0, &none))?;
            let mut all: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            check(libc::posix_spawnattr_setsigdefault(&mut a.0, &all))?;
            // The flags are small constants; glibc takes them as a short.
            let flags = (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF)
                as libc::c_short
                | libc::POSIX_SPAWN_SETSID;
            check(libc::posix_spawnattr_setflags(&mut a.0, flags))?;
            Ok(a)
        }
    }
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: initialised in detached and destroyed once, here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// `posix_spawn(3)` of `what` (searched in PATH when the program has no
/// slash, as std does), with the daemon's environment plus the command's
/// changes.
fn posix_spawn(what: &Detached) -> io::Result<u32> {
    let cmd = &what.cmd;
    let program = cstring(cmd.get_program())?;
    let mut args = vec![program.clone()];
    for a in cmd.get_args() {
        args.push(cstring(a)?);
    }
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_os_string(), v.to_os_string()),
            None => env.remove(k),
        };
    }
    let mut envs = Vec::with_capacity(env.len());
    for (k, v) in &env {
        let mut kv = k.clone();
        kv.push("=");
        kv.push(v);
        envs.push(cstring(&kv)?);
    }
    let ptrs = |v: &[CString]| -> Vec<*mut libc::c_char> {
        v.iter()
            .map(|s| s.as_ptr().cast_mut())
            .chain(std::iter::once(std::ptr::null_mut()))
            .collect()
    };
    let (argv, envp) = (ptrs(&args), ptrs(&envs));

    let mut fa = FileActions::new()?;
    let stdio = [
        (&what.stdin, 0, libc::O_RDONLY),
        (&what.stdout, 1, libc::O_WRONLY),
        (&what.stderr, 2, libc::O_WRONLY),
    ];
    for (fd, target, flags) in stdio {
        match fd {
            Some(fd) => fa.dup2(fd.as_raw_fd(), target)?,
            None => fa.null(target, flags)?,
        }
    }
    for &fd in &what.keep {
        fa.dup2(fd, fd)?;
    }
    if let Some(dir) = cmd.get_current_dir() {
        fa.chdir(&cstring(dir.as_os_str())?)?;
    }
    let attrs = Attrs::detached()?;

    let mut pid: libc::pid_t = 0;
    let search = !program.as_bytes().contains(&b'/');
    // SAFETY: every pointer is to a NUL-terminated string or array that
    // lives until the call returns; the file actions and attributes were
    // initialised above. glibc reports a failed exec as the return value.
    let r = unsafe {
        let spawn = if search {
            libc::posix_spawnp
        } else {
            libc::posix_spawn
        };
        spawn(
            &mut pid,
            program.as_ptr(),
            &fa.0,
            &attrs.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    check(r)?;
    u32::try_from(pid).map_err(|_| io::Error::other(format!("posix_spawn returned pid {pid}")))
}

impl Spawned {
    /// The exit status, if the process has already exited.
    pub(crate) fn exit_status(&self) -> Option<String> {
        self.exited.try_recv().ok().map(|status| match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("an unknown status ({e})"),
        })
    }

    /// Kills the process (still ours: the reaper has not reported it gone,
    /// so the pid cannot have been reused) and waits for the reaper.
    pub(crate) fn abort(self, exit_timeout: std::time::Duration) {
        let gone = match self.exited.try_recv() {
            Ok(_) | Err(mpsc::TryRecvError::Disconnected) => true,
            Err(mpsc::TryRecvError::Empty) => {
                if let Err(e) = kill(pid_of(self.pid), Signal::SIGKILL) {
                    tracing::warn!(pid = self.pid, error = %e, "Failed to kill the VMM");
                }
                self.exited.recv_timeout(exit_timeout).is_ok()
            }
        };
        if !gone {
            tracing::warn!(pid = self.pid, "The VMM did not exit after SIGKILL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// What a live process's `/proc` entry says: its session, ignored
    /// signals, environment and open files.
    fn proc_view(pid: u32) -> (u32, u64, Vec<String>, Vec<std::path::PathBuf>) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let session = after.split_whitespace().nth(3).unwrap().parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let ignored = status
            .lines()
            .find_map(|l| l.strip_prefix("SigIgn:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = environ
            .split(|b| *b == 0)
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect();
        (session, ignored, env, fds)
    }

    #[test]
    fn a_spawned_process_has_its_session_default_signals_its_env_and_only_the_kept_files() {
        let dir = tempfile::tempdir().unwrap();
        let (kept_path, other_path, log) = (
            dir.path().join("kept"),
            dir.path().join("other"),
            dir.path().join("log"),
        );
        let kept = File::create(&kept_path).unwrap();
        let _other = File::create(&other_path).unwrap();
        let home_set = std::env::var_os("HOME").is_some();
        for forks in [false, true] {
            let mut cmd = Command::new("sleep");
            cmd.arg("30")
                .env("BANGER_SPAWN_TEST", "set")
                .env_remove("HOME");
            let mut what = Detached::new(cmd).log_to(&log).unwrap();
            what.keep(kept.as_raw_fd());
            if forks {
                what.force_fork();
            }
            let s = spawn_detached(what, Path::new("sleep"), "test").unwrap();
            let pid = s.pid;
            let (session, ignored, env, fds) = proc_view(pid);
            s.abort(Duration::from_secs(5));

            assert_eq!(session, pid, "forks={forks}: a session of its own");
            // Signals 1-31 (SIGPIPE is 13); glibc's spawn leaves its own
            // real-time signals 32 and 33 ignored, which glibc programs
            // handle again at start.
            let classic = ignored & ((1 << 31) - 1);
            assert_eq!(classic, 0, "forks={forks}: no signal ignored: {ignored:#x}");
            assert!(
                env.contains(&"BANGER_SPAWN_TEST=set".to_string()),
                "{env:?}"
            );
            if home_set {
                assert!(!env.iter().any(|e| e.starts_with("HOME=")), "{env:?}");
            }
            assert!(fds.contains(&kept_path), "forks={forks}: {fds:?}");
            assert!(fds.contains(&log), "forks={forks}: stdout/stderr {fds:?}");
            assert!(
                fds.contains(&std::path::PathBuf::from("/dev/null")),
                "{fds:?}"
            );
            assert!(!fds.contains(&other_path), "forks={forks}: {fds:?}");
        }
    }

    #[test]
    fn a_program_that_cannot_start_is_an_error_not_a_child() {
        for program in ["/nonexistent/vmm", "banger-no-such-program"] {
            let Err(VmmError::Spawn { source, .. }) = spawn_detached(
                Detached::new(Command::new(program)),
                Path::new(program),
                "test",
            ) else {
                panic!("{program} started");
            };
            assert_eq!(
                source.kind(),
                io::ErrorKind::NotFound,
                "{program}: {source}"
            );
        }
    }
}
