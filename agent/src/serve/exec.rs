//! `POST /exec`: runs a command for the host and streams it both ways as
//! [`Frame`]s (see `banger_guest_protocol::exec`): stdin in, stdout and
//! stderr out, signals to its process group, an optional pty with window
//! size changes, and the exit status last.
//!
//! Threads, like the rest of the service: one reads the host's frames, one
//! per output pipe (or the pty) writes frames, and the connection's thread
//! waits for the command. The command runs in its own process group (its
//! own session with a pty), so a signal reaches everything it started.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use banger_guest_protocol::exec::{
    ALLOWED_SIGNALS, ExecRequest, ExitStatus, Frame, FrameError, SECRET_PATH, WindowSize,
    keepalive_deadline,
};
use nix::sys::signal::{Signal, killpg};
use nix::sys::socket::{Shutdown, setsockopt, shutdown, sockopt};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

/// PATH of commands run through exec.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes read from the command's output per frame.
const CHUNK: usize = 64 * 1024;

/// Why an exec request was refused before it started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// No secret was delivered to this guest (no config drive, or a host
    /// without exec support): exec stays off.
    #[error("exec is disabled: no secret at {0}")]
    NoSecret(PathBuf),
    /// The request carries no `Authorization: Bearer` header, or another
    /// secret.
    #[error("exec refused: missing or wrong secret")]
    WrongSecret,
}

/// The secret file under `root`.
pub fn secret_path(root: &Path) -> PathBuf {
    root.join(SECRET_PATH)
}

/// Checks the request head's bearer token against the secret file. Read
/// per request, so a secret refreshed on disk applies at once.
pub fn authorize(head: &str, secret_file: &Path) -> Result<(), Refusal> {
    let expected = std::fs::read_to_string(secret_file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Refusal::NoSecret(secret_file.to_path_buf()))?;
    let given = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(Refusal::WrongSecret)?;
    if same_secret(given.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(Refusal::WrongSecret)
    }
}

/// Compares without stopping at the first difference, so the time taken
/// says nothing about how much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long the agent waits for the host's `Start` after the upgrade.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one authorised exec stream on `conn`; `input` is what the host
/// sends (the connection, after any bytes already read with the head).
/// Returns when the command has ended and its status was sent, or the
/// stream broke.
pub fn serve(conn: File, mut input: impl Read + Send + 'static) {
    let out = match conn.try_clone() {
        Ok(c) => Arc::new(Mutex::new(c)),
        Err(_) => return,
    };
    let request = match Frame::read_from(&mut input) {
        Ok(Some(Frame::Start(r))) => r,
        Ok(_) => return send(&out, &Frame::Error("the first frame must be Start".into())),
        Err(FrameError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            let secs = START_TIMEOUT.as_secs();
            return send(
                &out,
                &Frame::Error(format!("no Start frame within {secs}s")),
            );
        }
        Err(e) => {
            let e = crate::console::chain(&e);
            return send(&out, &Frame::Error(format!("reading Start: {e}")));
        }
    };
    // The head had a deadline; a command may take as long as it likes,
    // but a host that promised keepalives and sends nothing for their
    // deadline is gone (a read that times out ends `host_frames` as a
    // closed stream does). Only a read waits on it: while the command is
    // slow to take its stdin, nothing is read and nothing expires.
    let wait = request.keepalive_ms.map_or(Duration::ZERO, |ms| {
        keepalive_deadline(Duration::from_millis(u64::from(ms)))
    });
    let wait = TimeVal::new(wait.as_secs() as _, wait.subsec_micros() as _);
    let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &wait);
    let running = match Running::spawn(&request) {
        Ok(r) => r,
        Err(e) => {
            let program = request.argv.first().map_or("", String::as_str);
            return send(&out, &Frame::Error(format!("cannot run {program:?}: {e}")));
        }
    };
    let Running {
        mut child,
        stdin,
        outputs,
        pty,
    } = running;
    let group = Arc::new(Mutex::new(Some(Pid::from_raw(child.id() as i32))));
    let pumps: Vec<JoinHandle<()>> = outputs
        .into_iter()
        .map(|(source, wrap)| {
            let out = out.clone();
            std::thread::spawn(move || pump(source, wrap, &out))
        })
        .collect();
    {
        let group = group.clone();
        std::thread::spawn(move || host_frames(input, stdin, pty, &group));
    }
    let status = child.wait();
    // From here the group may be gone and its id reused: no more signals.
    if let Ok(mut g) = group.lock() {
        *g = None;
    }
    for p in pumps {
        let _ = p.join();
    }
    let last = match status {
        Ok(s) => Frame::Exit(ExitStatus {
            code: s.code(),
            signal: s.signal(),
        }),
        Err(e) => Frame::Error(format!("waiting for the command: {e}")),
    };
    send(&out, &last);
    // Unblocks the reader thread and tells the host nothing more comes.
    let _ = shutdown(conn.as_raw_fd(), Shutdown::Both);
}

fn send(out: &Mutex<File>, frame: &Frame) {
    if let Ok(mut w) = out.lock() {
        let _ = frame.write_to(&mut *w);
    }
}

/// Where the host's stdin bytes go.
enum Stdin {
    Pipe(std::process::ChildStdin),
    Pty(File),
    Closed,
}

/// An output source and the frame its bytes become.
type Output = (File, fn(Vec<u8>) -> Frame);

/// A started command and its ends.
struct Running {
    child: Child,
    stdin: Stdin,
    outputs: Vec<Output>,
    /// The pty master, for window size changes.
    pty: Option<File>,
}

impl Running {
    fn spawn(req: &ExecRequest) -> io::Result<Running> {
        let Some(program) = req.argv.first() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty argv"));
        };
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..]).env_clear();
        for (k, v) in [
            ("PATH", PATH),
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("SHELL", "/bin/sh"),
        ] {
            cmd.env(k, v);
        }
        if req.tty.is_some() {
            cmd.env("TERM", "xterm-256color");
        }
        cmd.envs(&req.env);
        cmd.current_dir(match &req.cwd {
            Some(d) => PathBuf::from(d),
            None if Path::new("/root").is_dir() => PathBuf::from("/root"),
            None => PathBuf::from("/"),
        });
        match req.tty {
            Some(size) => Running::spawn_pty(cmd, size),
            None => Running::spawn_pipes(cmd),
        }
    }

    fn spawn_pipes(mut cmd: Command) -> io::Result<Running> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take().map_or(Stdin::Closed, Stdin::Pipe);
        let mut outputs: Vec<Output> = Vec::new();
        if let Some(o) = child.stdout.take() {
            outputs.push((File::from(OwnedFd::from(o)), Frame::Stdout));
        }
        if let Some(e) = child.stderr.take() {
            outputs.push((File::from(OwnedFd::from(e)), Frame::Stderr));
        }
        Ok(Running {
            child,
            stdin,
            outputs,
            pty: None,
        })
    }

    fn spawn_pty(mut cmd: Command, size: WindowSize) -> io::Result<Running> {
        ensure_devpts();
        let pty = nix::pty::openpty(Some(&winsize(size)), None)
            .map_err(|e| io::Error::other(format!("cannot open a pty: {e}")))?;
        cmd.stdin(Stdio::from(pty.slave.try_clone()?))
            .stdout(Stdio::from(pty.slave.try_clone()?))
            .stderr(Stdio::from(pty.slave));
        // SAFETY: between fork and exec only async-signal-safe calls
        // (setsid, ioctl) on the child's own descriptors.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The pty (stdin by now) becomes the controlling terminal,
                // so Ctrl-C in a session reaches the foreground job.
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // The slave copies are closed when `cmd` is dropped, so the master
        // reads EIO once the session's last process is gone.
        let child = cmd.spawn()?;
        drop(cmd);
        let master = File::from(pty.master);
        Ok(Running {
            child,
            stdin: Stdin::Pty(master.try_clone()?),
            outputs: vec![(master.try_clone()?, Frame::Stdout)],
            pty: Some(master),
        })
    }
}

/// Guests without an init system have no `/dev/pts` (systemd mounts it):
/// mount devpts there, so a pty's slave side exists.
fn ensure_devpts() {
    use nix::mount::{MsFlags, mount};
    let pts = Path::new("/dev/pts");
    if pts.join("ptmx").exists() {
        return;
    }
    let _ = std::fs::create_dir_all(pts);
    let _ = mount(
        Some("devpts"),
        pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=620,ptmxmode=666"),
    );
}

fn winsize(size: WindowSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Copies one output source to the host until it ends (a pty master ends
/// with EIO when the session's last process closed it).
fn pump(mut source: File, wrap: fn(Vec<u8>) -> Frame, out: &Mutex<File>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match source.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let Ok(mut w) = out.lock() else { return };
                if wrap(buf[..n].to_vec()).write_to(&mut *w).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Applies the host's frames until the stream ends. A host that goes away
/// before the command ended (the stream closed, or a keepalive deadline
/// passed in a read) takes the command's process group with it.
fn host_frames(
    mut input: impl Read,
    mut stdin: Stdin,
    pty: Option<File>,
    group: &Mutex<Option<Pid>>,
) {
    let signal = |s: Signal| {
        if let Ok(g) = group.lock()
            && let Some(pid) = *g
        {
            let _ = killpg(pid, s);
        }
    };
    loop {
        match Frame::read_from(&mut input) {
            Ok(Some(Frame::Stdin(data))) => {
                let written = match &mut stdin {
                    Stdin::Pipe(p) => p.write_all(&data),
                    Stdin::Pty(m) => m.write_all(&data),
                    Stdin::Closed => Ok(()),
                };
                // The command closed its stdin: drop the rest, like a pipe.
                if written.is_err() {
                    stdin = Stdin::Closed;
                }
            }
            Ok(Some(Frame::StdinEof)) => {
                // A terminal has no end of file: the line discipline's
                // EOF character is what a shell reads as one.
                if let Stdin::Pty(m) = &mut stdin {
                    let _ = m.write_all(&[4]);
                }
                stdin = Stdin::Closed;
            }
            Ok(Some(Frame::Signal(n))) => {
                if let Some(s) = ALLOWED_SIGNALS
                    .contains(&n)
                    .then(|| Signal::try_from(n).ok())
                    .flatten()
                {
                    signal(s);
                }
            }
            Ok(Some(Frame::Resize(size))) => {
                if let Some(m) = &pty {
                    // SAFETY: TIOCSWINSZ reads one winsize from a pointer
                    // to a live local, on a descriptor we own.
                    unsafe {
                        libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ as _, &winsize(size));
                    }
                }
            }
            // Frames only the agent sends, or a second Start: ignored.
            Ok(Some(_)) => {}
            Ok(None) => {
                signal(Signal::SIGKILL);
                return;
            }
            Err(e) => {
                if let FrameError::Io(io) = &e
                    && matches!(
                        io.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    )
                {
                    crate::console::log(
                        "exec: the host sent nothing within its keepalive deadline; ending its command",
                    );
                }
                signal(Signal::SIGKILL);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stream's reads as the socket's receive timeout makes them.
    struct TimesOut;

    impl Read for TimesOut {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    #[test]
    fn a_host_that_sends_no_start_is_told_so_and_nothing_runs() {
        let (agent, mut host) = std::os::unix::net::UnixStream::pair().unwrap();
        serve(File::from(OwnedFd::from(agent)), TimesOut);
        let answer = Frame::read_from(&mut host).unwrap();
        let want = format!("no Start frame within {}s", START_TIMEOUT.as_secs());
        assert_eq!(answer, Some(Frame::Error(want)));
        // Nothing more: the stream ends without an exit status.
        assert_eq!(Frame::read_from(&mut host).unwrap(), None);
    }

    fn secret_file(contents: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_path(dir.path());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    #[test]
    fn authorizes_only_the_secret_on_disk() {
        let (_dir, path) = secret_file("s3cret\n");
        let head = |auth: &str| format!("POST /exec HTTP/1.1\r\n{auth}\r\n\r\n");
        assert_eq!(
            authorize(&head("Authorization: Bearer s3cret"), &path),
            Ok(())
        );
        assert_eq!(
            authorize(&head("authorization:Bearer s3cret "), &path),
            Ok(())
        );
        assert_eq!(
            authorize(&head("Authorization: Bearer s3creT"), &path),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(
            authorize(&head("Authorization: Bearer s3cret2"), &path),
            Err(Refusal::WrongSecret)
        );
        assert_eq!(authorize(&head("X: y"), &path), Err(Refusal::WrongSecret));
    }

    #[test]
    fn exec_is_off_without_a_secret_even_for_an_empty_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_path(dir.path());
        let head = "POST /exec HTTP/1.1\r\nAuthorization: Bearer \r\n\r\n";
        assert_eq!(authorize(head, &path), Err(Refusal::NoSecret(path.clone())));
        let (_d, empty) = secret_file("\n");
        assert_eq!(
            authorize(head, &empty),
            Err(Refusal::NoSecret(empty.clone()))
        );
    }
}
