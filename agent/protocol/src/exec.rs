//! Running a command in the guest through the agent, without sshd.
//!
//! The host opens a connection to [`crate::api::AGENT_PORT`] and sends
//!
//! ```text
//! POST /exec HTTP/1.1
//! Authorization: Bearer <the VM's exec secret>
//! Connection: Upgrade
//! Upgrade: banger-exec
//! ```
//!
//! The agent answers `101 Switching Protocols` when the secret matches the
//! one on the config drive ([`SECRET_PATH`]), else `401`. From then on both
//! sides speak [`Frame`]s: one byte of kind, a big-endian `u32` payload
//! length, the payload. The host's first frame is [`Frame::Start`]; the agent
//! ends the stream with exactly one [`Frame::Exit`] or [`Frame::Error`].
//! The daemon's `POST /v1/vms/{name}/exec` opens this connection for a
//! client, checks the agent's answer, and then only copies bytes both ways,
//! so the CLI speaks the same frames.
//!
//! A host that sets [`ExecRequest::keepalive_ms`] sends a frame at least
//! that often for as long as the stream is open ([`KEEPALIVE`] when it has
//! nothing else to send), and the agent ends the command as it does when
//! the host closes the stream once it has waited [`keepalive_deadline`] for
//! a byte. A host that dies does not always close the stream: the vsock
//! backend of QEMU guests (vhost-device-vsock 0.3) can lose the end of a
//! connection whose host side closed, and the command would wait on its
//! stdin for ever.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent reads the exec secret, relative to the guest's root. It
/// lives on the `/run` tmpfs, so it never reaches the guest's disk.
pub const SECRET_PATH: &str = "run/banger/exec.secret";
/// The `Upgrade` token of an exec request.
pub const UPGRADE: &str = "banger-exec";
/// Largest frame payload accepted; output is sent in smaller pieces.
pub const MAX_FRAME: usize = 1 << 20;
/// Signals the host may send to the command's process group.
pub const ALLOWED_SIGNALS: [i32; 5] = [1, 2, 3, 9, 15];
/// What a host sends when it has nothing else to send on a stream with
/// keepalives: signal 0, which (as for `kill(2)`) delivers nothing, and
/// which an agent older than keepalives ignores as a signal it does not
/// allow.
pub const KEEPALIVE: Frame = Frame::Signal(0);
/// How often the host's own streams send a frame.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);

/// How long the agent waits for a byte from a host that promised a frame
/// every `every` before taking it for gone: seven missed keepalives and a
/// half, room for an emulated guest that is slow to be scheduled.
pub fn keepalive_deadline(every: Duration) -> Duration {
    every * 15 / 2
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables added to the base environment (`PATH`, `HOME=/root`,
    /// `USER`, `LOGNAME`, `SHELL`, and `TERM` with a pty).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; `/root` (or `/` without it) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size (stdout and stderr merge).
    #[serde(default)]
    pub tty: Option<WindowSize>,
    /// The host sends a frame at least every this many milliseconds (see
    /// the module's doc); `None` (older hosts) means no deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_ms: Option<u32>,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// The code a shell would report: the exit code, or 128 + the signal.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// One message of the exec stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Host → agent, first: what to run.
    Start(ExecRequest),
    /// Host → agent: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: stdin is finished (the command reads end of file).
    StdinEof,
    /// Host → agent: a signal for the command's process group (one of
    /// [`ALLOWED_SIGNALS`]).
    Signal(i32),
    /// Host → agent: the terminal was resized.
    Resize(WindowSize),
    /// Agent → host: bytes the command wrote to stdout (or to the pty).
    Stdout(Vec<u8>),
    /// Agent → host: bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// Agent → host, last: the command ended.
    Exit(ExitStatus),
    /// Agent → host, last: the command could not be run, or the stream broke.
    Error(String),
}

/// An exec stream that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading or writing the stream failed.
    #[error("Exec stream I/O failed")]
    Io(#[from] io::Error),
    /// An unknown frame kind (a newer peer?).
    #[error("Unknown exec frame kind {0}")]
    Kind(u8),
    /// A payload over [`MAX_FRAME`] bytes.
    #[error("Exec frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// A payload that is not what its kind says.
    #[error("Malformed exec frame of kind {0}: {1}")]
    Payload(u8, String),
}

const START: u8 = 1;
const STDIN: u8 = 2;
const STDIN_EOF: u8 = 3;
const SIGNAL: u8 = 4;
const RESIZE: u8 = 5;
const STDOUT: u8 = 16;
const STDERR: u8 = 17;
const EXIT: u8 = 18;
const ERROR: u8 = 19;

impl Frame {
    /// The frame's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            // Structs of strings and numbers always serialise.
            Frame::Start(r) => (START, serde_json::to_vec(r).unwrap_or_default()),
            Frame::Stdin(d) => (STDIN, d.clone()),
            Frame::StdinEof => (STDIN_EOF, Vec::new()),
            Frame::Signal(s) => (SIGNAL, s.to_be_bytes().to_vec()),
            Frame::Resize(w) => {
                let mut p = w.rows.to_be_bytes().to_vec();
                p.extend_from_slice(&w.cols.to_be_bytes());
                (RESIZE, p)
            }
            Frame::Stdout(d) => (STDOUT, d.clone()),
            Frame::Stderr(d) => (STDERR, d.clone()),
            Frame::Exit(s) => (EXIT, serde_json::to_vec(s).unwrap_or_default()),
            Frame::Error(t) => (ERROR, t.as_bytes().to_vec()),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Writes the frame in one `write_all`.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        w.write_all(&self.encode())?;
        w.flush()
    }

    /// Reads one frame; `None` at a clean end of stream between frames.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Frame>, FrameError> {
        let mut head = [0u8; 5];
        let mut got = 0;
        while got < head.len() {
            match r.read(&mut head[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let kind = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::TooLarge(len));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Frame::decode(kind, payload).map(Some)
    }

    fn decode(kind: u8, p: Vec<u8>) -> Result<Frame, FrameError> {
        let bad = |why: &str| FrameError::Payload(kind, why.to_string());
        Ok(match kind {
            START => Frame::Start(serde_json::from_slice(&p).map_err(|e| bad(&e.to_string()))?),
            STDIN => Frame::Stdin(p),
            STDIN_EOF => Frame::StdinEof,
            SIGNAL => {
                let b: [u8; 4] = p.try_into().map_err(|_| bad("a signal is 4 bytes"))?;
                Frame::Signal(i32::from_be_bytes(b))
            }
            RESIZE => {
                let b: [u8; 4] = p.try_into().map_err(|_| bad("a window size is 4 bytes"))?;
                Frame::Resize(WindowSize {
                    rows: u16::from_be_bytes([b[0], b[1]]),
                    cols: u16::from_be_bytes([b[2], b[3]]),
                })
            }
            STDOUT => Frame::Stdout(p),
            STDERR => Frame::Stderr(p),
            EXIT => Frame::Exit(serde_json::from_slice(&p).map_err(|e| bad(&e.to_string()))?),
            ERROR => Frame::Error(String::from_utf8_lossy(&p).into_owned()),
            other => return Err(FrameError::Kind(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_round_trips() {
        let frames = vec![
            Frame::Start(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "exit 7".into()],
                env: BTreeMap::from([("A".into(), "b".into())]),
                cwd: Some("/tmp".into()),
                tty: Some(WindowSize { rows: 24, cols: 80 }),
                keepalive_ms: Some(2000),
            }),
            Frame::Start(ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            Frame::Stdin(b"hello".to_vec()),
            Frame::StdinEof,
            Frame::Signal(15),
            Frame::Resize(WindowSize {
                rows: 50,
                cols: 132,
            }),
            Frame::Stdout(vec![0, 255, 10]),
            Frame::Stderr(Vec::new()),
            Frame::Exit(ExitStatus {
                code: None,
                signal: Some(9),
            }),
            Frame::Error("no such file".into()),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write_to(&mut wire).unwrap();
        }
        let mut r = &wire[..];
        let mut back = Vec::new();
        while let Some(f) = Frame::read_from(&mut r).unwrap() {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    #[test]
    fn a_start_without_keepalives_reads_as_one_from_an_older_host_and_back() {
        // What a host before keepalives sends, and what an agent before
        // them is sent by a host that does not promise them.
        let old = br#"{"argv":["true"],"env":{},"cwd":null,"tty":null}"#;
        let req: ExecRequest = serde_json::from_slice(old).unwrap();
        assert_eq!(req.keepalive_ms, None);
        let json = serde_json::to_string(&req).unwrap();
        assert!(!json.contains("keepalive"), "{json}");
        // The keepalive frame is a signal no agent applies.
        assert!(matches!(KEEPALIVE, Frame::Signal(n) if !ALLOWED_SIGNALS.contains(&n)));
    }

    #[test]
    fn refuses_oversized_unknown_and_truncated_frames() {
        let mut huge = vec![STDOUT];
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(matches!(
            Frame::read_from(&mut &huge[..]),
            Err(FrameError::TooLarge(_))
        ));
        let unknown = [99u8, 0, 0, 0, 0];
        assert!(matches!(
            Frame::read_from(&mut &unknown[..]),
            Err(FrameError::Kind(99))
        ));
        let cut = Frame::Stdout(b"abc".to_vec()).encode();
        assert!(matches!(
            Frame::read_from(&mut &cut[..cut.len() - 1]),
            Err(FrameError::Io(_))
        ));
        assert!(Frame::read_from(&mut &cut[..0]).unwrap().is_none());
    }

    #[test]
    fn shell_code_is_the_code_or_128_plus_the_signal() {
        let s = |code, signal| ExitStatus { code, signal }.shell_code();
        assert_eq!(s(Some(7), None), 7);
        assert_eq!(s(None, Some(15)), 143);
    }
}
