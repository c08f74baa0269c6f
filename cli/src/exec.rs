//! Commands and sessions through the guest agent, without sshd
//! (`--via agent`, docs/agent-exec.md): `POST /v1/vms/NAME/exec` upgraded
//! to the agent's frame stream, stdin sent as it is read, stdout and stderr
//! written as they arrive, the local SIGINT/SIGTERM/SIGHUP forwarded to the
//! command, and for a session a pty: the local terminal in raw mode and its
//! size sent on every SIGWINCH.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use banger_api::api::exec::{ExecRequest, Frame, KEEPALIVE, UPGRADE, WindowSize};
use banger_api::client::Client;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{SignalKind, signal};

use crate::remote::{remote_command, vm_path};

/// An interactive login shell: bash when the image has it.
const LOGIN_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";

/// What to run through the agent.
#[derive(Debug, Clone)]
pub enum Job {
    /// An interactive login shell on a pty, in this directory (else
    /// `/root`).
    Session(Option<String>),
    /// Command words, read as `vm ssh` reads them (one word is a shell
    /// line, several an argv), run by `sh -c` with no pty.
    Command(Vec<String>),
}

/// Runs `job` in VM `name` through its agent; the command's exit code (128
/// + the signal when one killed it).
pub async fn run(client: &Client, name: &str, job: Job) -> Result<i32> {
    let tty = matches!(job, Job::Session(_)) && std::io::stdin().is_terminal();
    let every = banger_api::config::exec_keepalive_every();
    let (argv, cwd) = match job {
        Job::Session(cwd) => (LOGIN_SHELL.to_string(), cwd),
        Job::Command(words) => (remote_command(&words).join(" "), None),
    };
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), argv],
        cwd,
        tty: tty.then(|| local_size().unwrap_or(WindowSize { rows: 24, cols: 80 })),
        keepalive_ms: Some(every.as_millis() as u32),
        ..Default::default()
    };
    let stream = client
        .upgrade(&format!("{}/exec", vm_path(name)), UPGRADE)
        .await
        .with_context(|| format!("Running a command in VM {name} through its agent"))?;
    let writer = Arc::new(Mutex::new(
        stream.try_clone().context("Cloning the exec connection")?,
    ));
    send(&writer, &Frame::Start(request))?;
    let _raw = if tty { RawMode::enter() } else { None };
    {
        let writer = writer.clone();
        std::thread::spawn(move || pump_stdin(&writer));
    }
    let forwarder = tokio::spawn(forward_signals(writer.clone(), tty));
    let (stop_keepalives, stopped) = std::sync::mpsc::channel::<()>();
    {
        let writer = writer.clone();
        std::thread::spawn(move || keep_alive(&writer, every, &stopped));
    }
    let outcome = tokio::task::spawn_blocking(move || read_output(stream))
        .await
        .context("The exec reader failed")?;
    forwarder.abort();
    drop(stop_keepalives);
    outcome.with_context(|| format!("Running a command in VM {name} through its agent"))
}

fn send(writer: &Mutex<UnixStream>, frame: &Frame) -> Result<()> {
    let mut w = writer
        .lock()
        .map_err(|_| anyhow!("The exec connection is poisoned"))?;
    frame
        .write_to(&mut *w)
        .context("Sending to the guest agent")
}

/// Local stdin to the command, then its end of file.
fn pump_stdin(writer: &Mutex<UnixStream>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let frame = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => Frame::StdinEof,
            Ok(n) => Frame::Stdin(buf[..n].to_vec()),
        };
        let last = frame == Frame::StdinEof;
        if send(writer, &frame).is_err() || last {
            return;
        }
    }
}

/// A keepalive `every` until `stopped` is dropped (or a write fails): what
/// the request promised, so that the agent can tell a silent CLI from one
/// that is gone (docs/agent-exec.md).
fn keep_alive(
    writer: &Mutex<UnixStream>,
    every: std::time::Duration,
    stopped: &std::sync::mpsc::Receiver<()>,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
        if send(writer, &KEEPALIVE).is_err() {
            return;
        }
    }
}

/// Signals to banger become signals to the command; with a pty, a resized
/// terminal becomes a window size change. (In raw mode Ctrl-C is a byte
/// the guest's terminal turns into SIGINT, not a local signal.)
async fn forward_signals(writer: Arc<Mutex<UnixStream>>, tty: bool) -> Result<()> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut winch = signal(SignalKind::window_change())?;
    loop {
        let frame = tokio::select! {
            _ = int.recv() => Frame::Signal(libc_signal::INT),
            _ = term.recv() => Frame::Signal(libc_signal::TERM),
            _ = hup.recv() => Frame::Signal(libc_signal::HUP),
            _ = winch.recv() => match local_size() {
                Some(size) if tty => Frame::Resize(size),
                _ => continue,
            },
        };
        send(&writer, &frame)?;
    }
}

/// Signal numbers as the protocol carries them (Linux's).
mod libc_signal {
    pub const HUP: i32 = 1;
    pub const INT: i32 = 2;
    pub const TERM: i32 = 15;
}

/// Writes the command's output until its exit status arrives.
fn read_output(mut stream: UnixStream) -> Result<i32> {
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        match Frame::read_from(&mut stream).context("Reading from the guest agent")? {
            Some(Frame::Stdout(d)) => {
                let _ = stdout.write_all(&d).and_then(|()| stdout.flush());
            }
            Some(Frame::Stderr(d)) => {
                let _ = stderr.write_all(&d).and_then(|()| stderr.flush());
            }
            Some(Frame::Exit(status)) => return Ok(status.shell_code()),
            Some(Frame::Error(e)) => return Err(anyhow!("The guest agent: {e}")),
            Some(_) => {}
            None => {
                return Err(anyhow!(
                    "The guest agent closed the stream before the command ended (did the VM stop?)"
                ));
            }
        }
    }
}

/// The local terminal's size, when stdout is one.
fn local_size() -> Option<WindowSize> {
    let ws = nix::pty::Winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let fd = std::io::stdout();
    let size = termios_size(fd.as_fd(), ws)?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(WindowSize {
        rows: size.ws_row,
        cols: size.ws_col,
    })
}

nix::ioctl_read_bad!(tiocgwinsz, nix::libc::TIOCGWINSZ, nix::pty::Winsize);

fn termios_size(
    fd: std::os::fd::BorrowedFd<'_>,
    mut ws: nix::pty::Winsize,
) -> Option<nix::pty::Winsize> {
    use std::os::fd::AsRawFd;
    // SAFETY: TIOCGWINSZ writes one winsize into a live local.
    unsafe { tiocgwinsz(fd.as_raw_fd(), &mut ws) }.ok()?;
    Some(ws)
}

/// The local terminal in raw mode while it lives: keys go to the guest's
/// pty as typed, and the guest's terminal does the echoing.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}

impl std::fmt::Debug for RawMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RawMode")
    }
}
