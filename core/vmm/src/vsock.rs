//! The host side of hybrid vsock, as Firecracker and `vhost-device-vsock`
//! expose it: connect to the VM's Unix socket, send `CONNECT <port>\n`, read
//! one `OK <n>\n` line, then the stream reaches the guest's vsock port. On
//! top of that, a minimal HTTP/1.1 `GET` client for the guest agent's API.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_guest_protocol::api::{AGENT_PORT, Health, HostKey, Listener, READY_LINE, READY_PORT};
use serde::de::DeserializeOwned;

/// The VM's exec secret on the host, inside the VM's directory (mode
/// 0600); the guest has the same bytes at
/// `banger_guest_protocol::exec::SECRET_PATH`.
pub const EXEC_SECRET_FILE: &str = "exec.secret";
/// Where the guest agent reads the exec secret, relative to the guest root.
pub use banger_guest_protocol::exec::SECRET_PATH as GUEST_EXEC_SECRET_PATH;
/// The `Upgrade` token of exec requests, to the agent and to the daemon.
pub use banger_guest_protocol::exec::UPGRADE as EXEC_UPGRADE;

/// Largest response body accepted from the agent.
const MAX_BODY: usize = 16 << 20;
/// Longest handshake, status or header line accepted.
const MAX_LINE: usize = 8 << 10;

/// Talking to a guest over hybrid vsock failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The VMM's vsock socket could not be reached.
    #[error("Cannot connect to the vsock socket {}", .0.display())]
    Connect(PathBuf, #[source] io::Error),
    /// Nothing arrived in time.
    #[error("Timed out after {0:?} while {1}")]
    Timeout(Duration, &'static str),
    /// The guest did not answer the `CONNECT` handshake in time.
    #[error("Guest vsock port {port} behind {} did not answer within {after:?}", uds.display())]
    NoAnswer {
        /// The VM's hybrid-vsock socket.
        uds: PathBuf,
        /// The guest port.
        port: u32,
        /// How long it was given.
        after: Duration,
    },
    /// The VMM answered the `CONNECT` with something other than `OK`
    /// (usually: nothing listens on that guest port yet).
    #[error("The VMM refused CONNECT {port}: {reply:?}")]
    Refused {
        /// The guest port.
        port: u32,
        /// What came back instead of `OK <n>`.
        reply: String,
    },
    /// Reading or writing the stream failed.
    #[error("I/O failed while {0}")]
    Io(&'static str, #[source] io::Error),
    /// The peer closed the stream early.
    #[error("The connection closed while {0}")]
    Closed(&'static str),
    /// The HTTP response does not parse.
    #[error("Malformed HTTP response: {0}")]
    BadResponse(String),
    /// The agent answered with a non-2xx status.
    #[error("The agent answered GET {path} with {status}: {body}")]
    Status {
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The body, lossily decoded and shortened.
        body: String,
    },
    /// The body is not the JSON the protocol defines.
    #[error("The agent's answer to GET {0} is not valid JSON for it")]
    Decode(String, #[source] serde_json::Error),
}

/// At most this many handshakes per request: the first and the retries of
/// those the VMM closed before answering. With the backoff that is about
/// 13 s of retries (within the request's own budget): a guest emulated on a
/// loaded host drains a flood of connections slowly (10 attempts, 3 s, lost
/// 8 of 64 simultaneous commands while a full test run shared the CPU), yet
/// a port nobody listens on still fails well before a long timeout.
const CONNECT_ATTEMPTS: u32 = 30;
/// The pause before the first retry, doubled for each next one up to
/// [`MAX_RETRY_GAP`].
const FIRST_RETRY_GAP: Duration = Duration::from_millis(20);
/// The longest pause between two attempts.
const MAX_RETRY_GAP: Duration = Duration::from_millis(500);

/// Where a hybrid-vsock VMM whose socket is `uds` delivers the guest's
/// connections to host port [`READY_PORT`] (the agent's announcement):
/// `<uds>_1025`, the convention Firecracker and vhost-device-vsock share.
pub fn ready_socket_path(uds: &Path) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{READY_PORT}"));
    PathBuf::from(p)
}

/// Announces on the agent's behalf that it is up, to whoever listens on
/// [`ready_socket_path`]`(uds)`: for an agent the daemon has just reached
/// some other way (a guest restored from a snapshot, awake before it is
/// asked, announces nothing). `reason` goes after the line's keyword.
pub fn announce_ready(uds: &Path, reason: &str) -> io::Result<()> {
    let mut s = crate::uds_http::connect(&ready_socket_path(uds), Duration::from_secs(1))?;
    s.write_all(format!("{READY_LINE} {reason}\n").as_bytes())
}

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket
/// `uds`, giving up after `timeout` for the connection and the handshake.
/// The stream keeps `timeout` as its read and write timeout.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
    let mut stream = crate::uds_http::connect(uds, timeout).map_err(|e| {
        if e.kind() == io::ErrorKind::TimedOut {
            VsockError::Timeout(
                timeout,
                "waiting for room in the VMM's vsock socket backlog",
            )
        } else {
            VsockError::Connect(uds.into(), e)
        }
    })?;
    set_timeouts(&stream, timeout).map_err(|e| VsockError::Io("setting timeouts", e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| io_error(e, timeout, "sending CONNECT"))?;
    // Read byte by byte: anything after the newline belongs to the guest.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Err(VsockError::Closed("waiting for OK")),
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_LINE => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match io_error(e, timeout, "waiting for OK") {
                    VsockError::Timeout(after, _) => VsockError::NoAnswer {
                        uds: uds.to_path_buf(),
                        port,
                        after,
                    },
                    other => other,
                });
            }
        }
    }
    let reply = String::from_utf8_lossy(&line).trim_end().to_string();
    // Firecracker answers `OK <host port>`; other VMMs pick other numbers.
    if reply
        .strip_prefix("OK ")
        .is_some_and(|n| !n.trim().is_empty())
    {
        Ok(stream)
    } else {
        Err(VsockError::Refused { port, reply })
    }
}

/// [`connect`], retried while the VMM closes the connection before its
/// `OK`: what it does when the guest resets it, as the guest kernel does to
/// a connection beyond the listener's backlog (the agent's is 16) while
/// many arrive at once. At most [`CONNECT_ATTEMPTS`], backing off, and all
/// of it before `deadline`; any other failure is final at once.
/// Timeouts are reported as `timeout`, the whole budget.
fn connect_retrying(
    uds: &Path,
    port: u32,
    timeout: Duration,
    deadline: Instant,
) -> Result<UnixStream, VsockError> {
    let mut gap = FIRST_RETRY_GAP;
    let mut attempt = 1;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match connect(uds, port, left) {
            Err(VsockError::NoAnswer { uds, port, .. }) => {
                return Err(VsockError::NoAnswer {
                    uds,
                    port,
                    after: timeout,
                });
            }
            Err(VsockError::Timeout(_, what)) => return Err(VsockError::Timeout(timeout, what)),
            Err(e)
                if dropped_before_ok(&e)
                    && attempt < CONNECT_ATTEMPTS
                    && Instant::now() + gap < deadline =>
            {
                // Nothing to wait on: the guest frees backlog room when its
                // agent accepts, which the host cannot see.
                std::thread::sleep(gap);
                gap = (gap * 2).min(MAX_RETRY_GAP);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Whether the VMM closed the connection before answering `CONNECT`.
fn dropped_before_ok(e: &VsockError) -> bool {
    match e {
        VsockError::Closed(_) => true,
        VsockError::Io(_, e) => e.kind() == io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

/// A client for the guest agent's HTTP API behind one VM's vsock socket.
#[derive(Debug, Clone)]
pub struct AgentClient {
    uds: PathBuf,
    timeout: Duration,
}

impl AgentClient {
    /// A client for the agent behind `uds`; `timeout` bounds each request.
    pub fn new(uds: &Path, timeout: Duration) -> Self {
        AgentClient {
            uds: uds.to_path_buf(),
            timeout,
        }
    }

    /// `GET /healthz`.
    pub fn healthz(&self) -> Result<Health, VsockError> {
        self.get_json("/healthz")
    }

    /// `GET /ports`: the guest's listening sockets.
    pub fn ports(&self) -> Result<Vec<Listener>, VsockError> {
        self.get_json("/ports")
    }

    /// `GET /ssh-host-keys`: the guest's SSH host keys and fingerprints.
    pub fn ssh_host_keys(&self) -> Result<Vec<HostKey>, VsockError> {
        self.get_json("/ssh-host-keys")
    }

    /// `GET path`, decoding a 2xx JSON body as `T`.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, VsockError> {
        let body = self.get(path)?;
        serde_json::from_slice(&body).map_err(|e| VsockError::Decode(path.to_string(), e))
    }

    /// `POST /exec` with the VM's exec `secret`: on the agent's
    /// `101 Switching Protocols` the stream, without timeouts, carrying
    /// `banger_guest_protocol::exec` frames; a refusal is
    /// [`VsockError::Status`].
    pub fn open_exec(&self, secret: &str) -> Result<UnixStream, VsockError> {
        const PATH: &str = "/exec";
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect_retrying(&self.uds, AGENT_PORT, self.timeout, deadline)?;
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: banger-agent\r\nAuthorization: Bearer {secret}\r\nConnection: Upgrade\r\nUpgrade: {}\r\nContent-Length: 0\r\n\r\n",
            banger_guest_protocol::exec::UPGRADE
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| io_error(e, self.timeout, "sending the exec request"))?;
        let mut r = BufReader::new(stream);
        let head = read_head(&mut r, deadline, self.timeout)?;
        if head.status != 101 {
            let body = read_body(&mut r, &head, deadline, self.timeout)?;
            return Err(status_error(PATH, head.status, &body));
        }
        // The agent sends nothing before the host's first frame.
        if !r.buffer().is_empty() {
            return Err(VsockError::BadResponse(
                "bytes after the 101 before any request".to_string(),
            ));
        }
        let stream = r.into_inner();
        stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .map_err(|e| VsockError::Io("clearing timeouts", e))?;
        Ok(stream)
    }

    /// `POST /reidentify` with the snapshot's exec `secret`: the restored
    /// guest takes the identity in `req` (`docs/snapshots.md`); afterwards
    /// only `req.new_secret` opens exec. A refusal is [`VsockError::Status`].
    pub fn reidentify(
        &self,
        secret: &str,
        req: &banger_guest_protocol::reidentify::Reidentify,
    ) -> Result<banger_guest_protocol::reidentify::Reidentified, VsockError> {
        use banger_guest_protocol::reidentify::PATH;
        let body = serde_json::to_vec(req).map_err(|e| VsockError::Decode(PATH.to_string(), e))?;
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect_retrying(&self.uds, AGENT_PORT, self.timeout, deadline)?;
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nHost: banger-agent\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(&body))
            .map_err(|e| io_error(e, self.timeout, "sending the reidentify request"))?;
        let mut r = BufReader::new(stream);
        let head = read_head(&mut r, deadline, self.timeout)?;
        let answer = read_body(&mut r, &head, deadline, self.timeout)?;
        if !(200..300).contains(&head.status) {
            return Err(status_error(PATH, head.status, &answer));
        }
        serde_json::from_slice(&answer).map_err(|e| VsockError::Decode(PATH.to_string(), e))
    }

    /// `GET path`; the body of a 2xx answer.
    pub fn get(&self, path: &str) -> Result<Vec<u8>, VsockError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect_retrying(&self.uds, AGENT_PORT, self.timeout, deadline)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: banger-agent\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| io_error(e, self.timeout, "sending the request"))?;
        let mut r = BufReader::new(stream);
        let head = read_head(&mut r, deadline, self.timeout)?;
        let body = read_body(&mut r, &head, deadline, self.timeout)?;
        if (200..300).contains(&head.status) {
            Ok(body)
        } else {
            Err(status_error(path, head.status, &body))
        }
    }
}

/// A non-2xx answer, its body shortened for the message.
fn status_error(path: &str, status: u16, body: &[u8]) -> VsockError {
    let full = String::from_utf8_lossy(body);
    let mut text: String = full.trim().chars().take(200).collect();
    if text.len() < full.trim().len() {
        text.push('…');
    }
    VsockError::Status {
        path: path.to_string(),
        status,
        body: text,
    }
}

fn set_timeouts(s: &UnixStream, t: Duration) -> io::Result<()> {
    // A zero timeout means "block forever" to the OS; keep a floor instead.
    let t = t.max(Duration::from_millis(1));
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))
}

fn io_error(e: io::Error, timeout: Duration, what: &'static str) -> VsockError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => VsockError::Timeout(timeout, what),
        io::ErrorKind::UnexpectedEof => VsockError::Closed(what),
        _ => VsockError::Io(what, e),
    }
}

/// A response's status and body framing.
struct Head {
    status: u16,
    length: Option<usize>,
    chunked: bool,
}

/// Reads a status line and headers.
fn read_head(
    r: &mut BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Head, VsockError> {
    let status_line = read_line(r, deadline, timeout, "reading the status line")?
        .ok_or(VsockError::Closed("reading the status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| VsockError::BadResponse(format!("status line {status_line:?}")))?;

    let mut length: Option<usize> = None;
    let mut chunked = false;
    loop {
        let line = read_line(r, deadline, timeout, "reading headers")?
            .ok_or(VsockError::Closed("reading headers"))?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(VsockError::BadResponse(format!("header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| VsockError::BadResponse(format!("Content-Length {value:?}")))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    Ok(Head {
        status,
        length,
        chunked,
    })
}

/// Reads a body framed by `Content-Length`, chunked encoding, or the end of
/// the stream (we sent `Connection: close`).
fn read_body(
    r: &mut BufReader<UnixStream>,
    head: &Head,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, VsockError> {
    let body = if head.chunked {
        read_chunked(r, deadline, timeout)?
    } else if let Some(n) = head.length {
        if n > MAX_BODY {
            return Err(VsockError::BadResponse(format!(
                "{n}-byte body is too large"
            )));
        }
        let mut body = vec![0; n];
        check_deadline(r, deadline, timeout, "reading the body")?;
        r.read_exact(&mut body)
            .map_err(|e| io_error(e, timeout, "reading the body"))?;
        body
    } else {
        let mut body = Vec::new();
        check_deadline(r, deadline, timeout, "reading the body")?;
        r.by_ref()
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| io_error(e, timeout, "reading the body"))?;
        if body.len() > MAX_BODY {
            return Err(VsockError::BadResponse("body is too large".to_string()));
        }
        body
    };
    Ok(body)
}

fn read_chunked(
    r: &mut BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, VsockError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r, deadline, timeout, "reading a chunk size")?
            .ok_or(VsockError::Closed("reading a chunk size"))?;
        let size = line.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16)
            .map_err(|_| VsockError::BadResponse(format!("chunk size {line:?}")))?;
        if n == 0 {
            // Trailers, if any, end with an empty line.
            while let Some(l) = read_line(r, deadline, timeout, "reading trailers")? {
                if l.is_empty() {
                    break;
                }
            }
            return Ok(body);
        }
        if body.len() + n > MAX_BODY {
            return Err(VsockError::BadResponse("body is too large".to_string()));
        }
        let start = body.len();
        body.resize(start + n, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| io_error(e, timeout, "reading a chunk"))?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)
            .map_err(|e| io_error(e, timeout, "reading a chunk"))?;
    }
}

/// One CRLF- or LF-terminated line without its terminator; `None` at a clean
/// end of stream.
fn read_line(
    r: &mut BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
) -> Result<Option<String>, VsockError> {
    check_deadline(r, deadline, timeout, what)?;
    let mut buf = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .map_err(|e| io_error(e, timeout, what))?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n >= MAX_LINE {
            VsockError::BadResponse("line too long".to_string())
        } else {
            VsockError::Closed(what)
        });
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Shrinks the socket's read timeout to what is left of the request's
/// deadline, so a slow trickle cannot stretch one request indefinitely.
fn check_deadline(
    r: &BufReader<UnixStream>,
    deadline: Instant,
    timeout: Duration,
    what: &'static str,
) -> Result<(), VsockError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(VsockError::Timeout(timeout, what));
    }
    set_timeouts(r.get_ref(), left).map_err(|e| VsockError::Io("setting timeouts", e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    use super::*;

    /// A fake VMM vsock socket: every connection gets `handshake` to its
    /// CONNECT line, then (if it was OK) `response` to whatever request
    /// follows. Returns the CONNECT line and request it saw.
    fn serve_once(
        sock: &Path,
        handshake: &'static str,
        response: &'static [u8],
    ) -> JoinHandle<(String, String)> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut connect = String::new();
            r.read_line(&mut connect).unwrap();
            let mut w = s;
            w.write_all(handshake.as_bytes()).unwrap();
            let mut request = String::new();
            if handshake.starts_with("OK") {
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).unwrap() == 0 || l == "\r\n" {
                        break;
                    }
                    request.push_str(&l);
                }
                // Read a declared body before answering: closing with the
                // client still writing it would fail the client's write.
                let declared = request
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                let mut body = vec![0u8; declared];
                r.read_exact(&mut body).unwrap();
                w.write_all(response).unwrap();
            }
            (connect, request)
        })
    }

    fn client(sock: &Path) -> AgentClient {
        AgentClient::new(sock, Duration::from_secs(5))
    }

    #[test]
    fn healthz_through_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 1073741824\n",
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 37\r\n\r\n{\"version\":\"0.1.0\",\"uptime_secs\":42}\n",
        );
        let h = client(&sock).healthz().unwrap();
        assert_eq!(h.version, "0.1.0");
        assert_eq!(h.uptime_secs, 42);
        assert_eq!(h.mem_total_kib, 0);
        let (connect, request) = server.join().unwrap();
        assert_eq!(connect, format!("CONNECT {AGENT_PORT}\n"));
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
    }

    #[test]
    fn ports_with_a_chunked_body_and_any_ok_number() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 7\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              10\r\n[{\"proto\":\"tcp\",\r\n\
              4d\r\n\"address\":\"0.0.0.0\",\"port\":22,\"pid\":90,\"process\":\"sshd\",\"command\":\"sshd -D\"}]\r\n\
              0\r\n\r\n",
        );
        let ports = client(&sock).ports().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 22);
        assert_eq!(ports[0].process.as_deref(), Some("sshd"));
        server.join().unwrap();
    }

    #[test]
    fn ssh_host_keys_with_a_body_until_close() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 1\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n[{\"algorithm\":\"ssh-ed25519\",\"public_key\":\"ssh-ed25519 AAAA\",\"fingerprint\":\"SHA256:abc\"}]",
        );
        let keys = client(&sock).ssh_host_keys().unwrap();
        assert_eq!(keys[0].fingerprint, "SHA256:abc");
        let (_, request) = server.join().unwrap();
        assert!(request.starts_with("GET /ssh-host-keys "), "{request}");
    }

    #[test]
    fn reidentify_sends_the_old_secret_and_the_identity_and_reads_what_was_applied() {
        use banger_guest_protocol::reidentify::Reidentify;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 33\r\n\r\n{\"applied\":[\"hostname\",\"secret\"]}",
        );
        let req = Reidentify {
            hostname: "r1".into(),
            mac: None,
            previous_address: None,
            network: None,
            ssh_host_keys: vec![],
            new_secret: "new".into(),
        };
        let done = client(&sock).reidentify("old", &req).unwrap();
        assert_eq!(done.applied, ["hostname", "secret"]);
        let (_, request) = server.join().unwrap();
        assert!(
            request.starts_with("POST /reidentify HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("Authorization: Bearer old\r\n"),
            "{request}"
        );
        let body_len = serde_json::to_vec(&req).unwrap().len();
        assert!(
            request.contains(&format!("Content-Length: {body_len}\r\n")),
            "{request}"
        );

        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 38\r\n\r\nexec refused: missing or wrong secret\n",
        );
        let err = client(&sock).reidentify("stale", &req).unwrap_err();
        assert!(
            matches!(err, VsockError::Status { status: 401, .. }),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn exec_sends_the_secret_and_hands_back_the_upgraded_stream() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: banger-exec\r\n\r\n",
        );
        let stream = client(&sock).open_exec("s3cret").unwrap();
        assert_eq!(stream.read_timeout().unwrap(), None);
        let (_, request) = server.join().unwrap();
        assert!(request.starts_with("POST /exec HTTP/1.1\r\n"), "{request}");
        assert!(
            request.contains("Authorization: Bearer s3cret\r\n"),
            "{request}"
        );
        assert!(request.contains("Upgrade: banger-exec\r\n"), "{request}");

        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 40\r\n\r\nexec refused: missing or wrong secret\n\n\n",
        );
        let err = client(&sock).open_exec("nope").unwrap_err();
        assert!(
            matches!(&err, VsockError::Status { status: 401, body, .. } if body.contains("wrong secret")),
            "{err:?}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_refused_connect_names_the_port_and_reply() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(&sock, "FAILURE no listener\n", b"");
        let err = client(&sock).healthz().unwrap_err();
        match &err {
            VsockError::Refused { port, reply } => {
                assert_eq!(*port, AGENT_PORT);
                assert_eq!(reply, "FAILURE no listener");
            }
            other => panic!("{other:?}"),
        }
        server.join().unwrap();
        // "OK" without a number is not a valid reply either.
        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(&sock, "OK\n", b"");
        assert!(matches!(
            client(&sock).healthz(),
            Err(VsockError::Refused { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            // Hold the connection open without answering until the client
            // has given up.
            rx.recv().unwrap();
            drop(s);
        });
        let started = Instant::now();
        let err = AgentClient::new(&sock, Duration::from_millis(300))
            .healthz()
            .unwrap_err();
        assert!(
            matches!(
                &err,
                VsockError::NoAnswer {
                    port: AGENT_PORT,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&sock.display().to_string()), "{text}");
        assert!(text.contains("did not answer within 300ms"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tx.send(()).unwrap();
        server.join().unwrap();
    }

    #[test]
    fn a_full_socket_backlog_is_a_timeout_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let _full = crate::uds_http::tests::full_backlog(&sock);

        let (tx, rx) = std::sync::mpsc::channel();
        let path = sock.clone();
        std::thread::spawn(move || {
            let _ = tx.send(AgentClient::new(&path, Duration::from_millis(300)).healthz());
        });
        let err = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the client hung on a full backlog")
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout(..)), "{err:?}");
        assert!(err.to_string().contains("backlog"), "{err}");
    }

    /// A fake VMM whose guest resets the first `resets` connections (the
    /// host side closed after the CONNECT line), then answers healthz.
    /// Returns how many connections it saw.
    fn resetting_vmm(sock: &Path, resets: usize) -> JoinHandle<usize> {
        let listener = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            for n in 1.. {
                let (s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if n <= resets {
                    continue;
                }
                serve_healthz(s, r);
                return n;
            }
            unreachable!()
        })
    }

    /// Answers `OK`, reads a request head, answers healthz.
    fn serve_healthz(mut w: UnixStream, mut r: BufReader<UnixStream>) {
        w.write_all(b"OK 1\n").unwrap();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap() == 0 || l == "\r\n" {
                break;
            }
        }
        let body = br#"{"version":"0.1.0","uptime_secs":1}"#;
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        w.write_all(body).unwrap();
    }

    #[test]
    fn connections_the_guest_resets_before_ok_are_retried_a_bounded_number_of_times() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = resetting_vmm(&sock, 3);
        client(&sock).healthz().unwrap();
        assert_eq!(server.join().unwrap(), 4);

        // Reset every time: the client stops after CONNECT_ATTEMPTS, well
        // before its timeout, with the reason.
        std::fs::remove_file(&sock).unwrap();
        let server = resetting_vmm(&sock, CONNECT_ATTEMPTS as usize + 1);
        let started = Instant::now();
        let err = AgentClient::new(&sock, Duration::from_secs(60))
            .healthz()
            .unwrap_err();
        assert!(matches!(err, VsockError::Closed(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(20));
        // One more connection lets the server thread finish.
        let _ = client(&sock).healthz();
        assert_eq!(
            server.join().unwrap(),
            CONNECT_ATTEMPTS as usize + 2,
            "attempts made"
        );
    }

    #[test]
    fn sixty_four_at_once_through_a_guest_backlog_of_sixteen_all_answer() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        const BACKLOG: usize = 16;
        const AT_ONCE: usize = 64;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        // The fake guest takes connections up to its backlog, slowly (an
        // agent under emulation), and resets the rest.
        let in_flight = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        {
            let (in_flight, resets) = (in_flight.clone(), resets.clone());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    let Ok(s) = s else { return };
                    let (in_flight, resets) = (in_flight.clone(), resets.clone());
                    std::thread::spawn(move || {
                        let mut r = BufReader::new(s.try_clone().unwrap());
                        let mut line = String::new();
                        let _ = r.read_line(&mut line);
                        if in_flight.fetch_add(1, Ordering::SeqCst) >= BACKLOG {
                            resets.fetch_add(1, Ordering::SeqCst);
                        } else {
                            // Stands in for the agent's slow accept.
                            std::thread::sleep(Duration::from_millis(50));
                            serve_healthz(s, r);
                        }
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            });
        }
        let clients: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    AgentClient::new(&sock, Duration::from_secs(10)).healthz()
                })
            })
            .collect();
        let failed: Vec<String> = clients
            .into_iter()
            .filter_map(|c| c.join().unwrap().err().map(|e| e.to_string()))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(
            resets.load(Ordering::SeqCst) > 0,
            "the fake guest reset nothing: the test proves nothing"
        );
    }

    #[test]
    fn a_peer_closing_early_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        // Closes every connection right after accepting it (each retry too).
        // The client stops at a closed read (retried) or a failed write of
        // CONNECT (final), whichever the race gives, so the server closes
        // connections until told to stop rather than counting them.
        let listener = UnixListener::bind(&sock).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    drop(conn);
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        break;
                    }
                }
            })
        };
        let err = AgentClient::new(&sock, Duration::from_secs(60))
            .healthz()
            .unwrap_err();
        assert!(
            matches!(err, VsockError::Closed(_) | VsockError::Io(_, _)),
            "{err:?}"
        );
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the server's accept so it sees the flag.
        drop(std::os::unix::net::UnixStream::connect(&sock));
        server.join().unwrap();

        // Closes in the middle of a declared body.
        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"version\"",
        );
        let err = client(&sock).healthz().unwrap_err();
        assert!(matches!(err, VsockError::Closed(_)), "{err:?}");
        server.join().unwrap();
    }

    #[test]
    fn errors_statuses_and_bad_json_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("v.sock");
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nno route\n",
        );
        let err = client(&sock).ports().unwrap_err();
        assert!(
            matches!(&err, VsockError::Status { status: 404, body, .. } if body == "no route"),
            "{err:?}"
        );
        server.join().unwrap();

        std::fs::remove_file(&sock).unwrap();
        let server = serve_once(
            &sock,
            "OK 1\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        );
        let err = client(&sock).healthz().unwrap_err();
        assert!(matches!(err, VsockError::Decode(_, _)), "{err:?}");
        server.join().unwrap();

        let missing = dir.path().join("missing.sock");
        let err = client(&missing).healthz().unwrap_err();
        assert!(matches!(err, VsockError::Connect(_, _)), "{err:?}");
        assert!(err.to_string().contains("missing.sock"), "{err}");
    }
}
