//! An async HTTP/1.1 client of the daemon's API (see [`crate::api`]) over its
//! Unix socket. One connection per request: requests are rare and the socket
//! is local, so pooling would only add state.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::{ErrorBody, Event};

pub use hyper::Method;

/// Errors from talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket does not answer: the daemon is not running (or not ours).
    #[error(
        "Cannot connect to bangerd at {}: start it with `banger daemon start`",
        socket.display()
    )]
    Connect {
        /// The socket we tried.
        socket: PathBuf,
        /// Why connecting failed.
        #[source]
        source: std::io::Error,
    },
    /// The daemon accepted the connection and closed it without answering:
    /// it is going away (killed or shutting down) and the socket will stop
    /// accepting in a moment.
    #[error("bangerd at {} closed the connection without answering", socket.display())]
    Dropped {
        /// The socket we tried.
        socket: PathBuf,
        /// What the HTTP layer saw.
        #[source]
        source: hyper::Error,
    },
    /// The daemon answered with an error status.
    #[error("{message}")]
    Api {
        /// HTTP status code.
        status: u16,
        /// The daemon's error text ([`ErrorBody::error`]).
        message: String,
    },
    /// The daemon answered something this client does not understand.
    #[error("Unexpected answer from bangerd: {0}")]
    Protocol(String),
    /// A streamed operation ended with a `failed` event. The daemon's
    /// rendering already names the failing stage.
    #[error("{error}")]
    Operation {
        /// The stage that failed, if the daemon named one.
        stage: Option<String>,
        /// The whole error chain as the daemon rendered it.
        error: String,
    },
}

impl ClientError {
    /// True when the daemon is simply not running (no socket, or nobody
    /// listening on it), as opposed to any other failure.
    pub fn daemon_absent(&self) -> bool {
        use std::io::ErrorKind;
        matches!(self, ClientError::Connect { source, .. }
            if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused))
    }

    /// True when a daemon accepted the connection but dropped it unanswered,
    /// which is what a dying daemon does to connections still in its backlog.
    pub fn daemon_dropped(&self) -> bool {
        matches!(self, ClientError::Dropped { .. })
    }
}

/// A client of one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`. Does not connect yet.
    pub fn new(socket: PathBuf) -> Self {
        Client { socket }
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET path`, decoding a JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::GET, path, None).await
    }

    /// Any request with an optional JSON body, decoding a JSON answer. An
    /// empty answer body decodes as JSON `null`, so `()` or `Option<_>` fit
    /// answers without content (e.g. `POST /v1/shutdown`).
    pub async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let resp = self.request(method, path, body).await?;
        let bytes = collect(resp.into_body()).await?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"null"
        } else {
            &bytes
        };
        serde_json::from_slice(bytes)
            .map_err(|e| ClientError::Protocol(format!("invalid JSON answer to {path}: {e}")))
    }

    /// A request answered with an NDJSON [`Event`] stream. Calls `on_event`
    /// for every event as it arrives and returns the result of the `done`
    /// event (a [`VmView`] for VM operations); a `failed` event becomes
    /// [`ClientError::Operation`].
    pub async fn stream_events<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        mut on_event: impl FnMut(&Event),
    ) -> Result<T, ClientError> {
        let mut body_in = self.request(method, path, body).await?.into_body();
        let mut lines = NdjsonLines::default();
        let mut handle = |line: &[u8]| -> Result<Option<Result<T, ClientError>>, ClientError> {
            let event: Event = serde_json::from_slice(line).map_err(|e| {
                ClientError::Protocol(format!(
                    "invalid event {:?}: {e}",
                    String::from_utf8_lossy(line)
                ))
            })?;
            // A newer daemon's event type: nothing to show or to return.
            if event == Event::Unknown {
                return Ok(None);
            }
            on_event(&event);
            Ok(match event {
                Event::Done { result } => Some(T::deserialize(result).map_err(|e| {
                    ClientError::Protocol(format!("unexpected result of {path}: {e}"))
                })),
                Event::Failed { stage, error } => {
                    Some(Err(ClientError::Operation { stage, error }))
                }
                Event::Stage { .. }
                | Event::Log { .. }
                | Event::Progress { .. }
                | Event::Unknown => None,
            })
        };
        while let Some(frame) = body_in.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(format!("reading stream: {e}")))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in lines.push(&data) {
                if let Some(end) = handle(&line)? {
                    return end;
                }
            }
        }
        if let Some(line) = lines.finish()
            && let Some(end) = handle(&line)?
        {
            return end;
        }
        Err(ClientError::Protocol(format!(
            "the event stream of {path} ended without a done or failed event"
        )))
    }

    /// `GET path` answered with a raw byte stream (the serial console);
    /// calls `on_chunk` with each piece as it arrives until the daemon closes
    /// the stream or `on_chunk` breaks (e.g. its reader went away).
    pub async fn stream_raw(
        &self,
        path: &str,
        mut on_chunk: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), ClientError> {
        let mut body = self
            .request::<()>(Method::GET, path, None)
            .await?
            .into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(format!("reading stream: {e}")))?;
            if let Ok(data) = frame.into_data()
                && on_chunk(&data).is_break()
            {
                break;
            }
        }
        Ok(())
    }

    /// `POST path` asking to switch to protocol `token` (the exec stream,
    /// `POST /v1/vms/{name}/exec`): on `101 Switching Protocols` the raw,
    /// blocking connection, which from then on carries that protocol.
    pub async fn upgrade(
        &self,
        path: &str,
        token: &'static str,
    ) -> Result<std::os::unix::net::UnixStream, ClientError> {
        let resp = self
            .exchange::<()>(Method::POST, path, None, Some(token))
            .await?;
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| ClientError::Protocol(format!("switching to {token}: {e}")))?;
        let parts = upgraded.downcast::<TokioIo<UnixStream>>().map_err(|_| {
            ClientError::Protocol(format!("switching to {token}: not a Unix stream"))
        })?;
        // The peer speaks only after our first message.
        if !parts.read_buf.is_empty() {
            return Err(ClientError::Protocol(format!(
                "{} bytes from bangerd before the first {token} message",
                parts.read_buf.len()
            )));
        }
        let stream = parts
            .io
            .into_inner()
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| ClientError::Protocol(format!("switching to {token}: {e}")))?;
        Ok(stream)
    }

    /// Sends one request on a fresh connection; non-2xx answers become
    /// [`ClientError::Api`].
    async fn request<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<Response<Incoming>, ClientError> {
        self.exchange(method, path, body, None).await
    }

    /// [`Client::request`], or with `upgrade` a request to switch to that
    /// protocol, answered by `101`.
    async fn exchange<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        upgrade: Option<&'static str>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(format!("HTTP handshake: {e}")))?;
        // The connection task ends when the response body is done or dropped
        // (or, upgraded, once it has handed the connection over).
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if let Some(token) = upgrade {
            req = req
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, token);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(hyper::header::CONTENT_TYPE, "application/json");
                serde_json::to_vec(b)
                    .map_err(|e| ClientError::Protocol(format!("encoding request: {e}")))?
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(payload)))
            .map_err(|e| ClientError::Protocol(format!("building request for {path}: {e}")))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            if closed_unanswered(&e) {
                ClientError::Dropped {
                    socket: self.socket.clone(),
                    source: e,
                }
            } else {
                ClientError::Protocol(format!("sending {path}: {e}"))
            }
        })?;
        let status = resp.status();
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if (upgrade.is_none() && status.is_success()) || (upgrade.is_some() && switched) {
            return Ok(resp);
        }
        if switched {
            return Err(ClientError::Protocol(format!("{path}: an unasked 101")));
        }
        let bytes = collect(resp.into_body()).await?;
        Err(api_error(status, &bytes))
    }
}

/// True when the peer closed (or reset) the connection before any response.
fn closed_unanswered(e: &hyper::Error) -> bool {
    use std::error::Error as _;
    use std::io::ErrorKind;
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// Maps an error answer to [`ClientError::Api`], preferring the daemon's
/// [`ErrorBody`] and falling back to the raw text or the status reason.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body).trim().to_string();
            if text.is_empty() {
                format!("bangerd answered {status}")
            } else {
                text
            }
        }
    };
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

async fn collect(body: Incoming) -> Result<Bytes, ClientError> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ClientError::Protocol(format!("reading answer: {e}")))
}

/// Splits a byte stream into lines whatever the chunk boundaries are.
#[derive(Debug, Default)]
struct NdjsonLines {
    buf: Vec<u8>,
}

impl NdjsonLines {
    /// Adds bytes; returns every complete non-blank line.
    fn push(&mut self, data: &[u8]) -> Vec<Vec<u8>> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let line = &line[..line.len() - 1];
            if !line.iter().all(u8::is_ascii_whitespace) {
                out.push(line.to_vec());
            }
        }
        out
    }

    /// The unterminated last line, if any.
    fn finish(&mut self) -> Option<Vec<u8>> {
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::api::{VersionInfo, VmView};
    use crate::model::{ByteSize, VmId, VmName, VmRecord, VmSpec, VmState, VmmKind};

    /// What the test server saw.
    #[derive(Debug)]
    struct Seen {
        head: String,
        body: Vec<u8>,
    }

    /// Serves one connection on a real Unix socket: reads one request, then
    /// writes `parts` in order (each a separate write), then closes.
    fn serve_once(dir: &Path, parts: Vec<Vec<u8>>) -> (PathBuf, oneshot::Receiver<Seen>) {
        let sock = dir.join("api.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let head_end = loop {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "client closed before sending a request");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 1024];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_end..head_end + len].to_vec();
            let _ = tx.send(Seen { head, body });
            for p in parts {
                s.write_all(&p).await.unwrap();
                s.flush().await.unwrap();
            }
            s.shutdown().await.unwrap();
        });
        (sock, rx)
    }

    fn response(status: &str, ctype: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// A chunked response whose chunks are exactly `chunks`.
    fn chunked(chunks: &[&str]) -> Vec<Vec<u8>> {
        let mut parts = vec![
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_vec(),
        ];
        for c in chunks {
            parts.push(format!("{:x}\r\n{c}\r\n", c.len()).into_bytes());
        }
        parts.push(b"0\r\n\r\n".to_vec());
        parts
    }

    fn vm_view(name: &str) -> VmView {
        VmView {
            address: None,
            record: VmRecord {
                id: VmId::from_stored("00112233aabbccdd".into()),
                name: VmName::parse(name).unwrap(),
                state: VmState::Running,
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_size: ByteSize(8 << 30),
                    kernel: "/k".into(),
                    initrd: None,
                    rootfs_source: "/r".into(),
                    extra_boot_args: None,
                    vmm: VmmKind::Firecracker,
                },
                caps: vec![],
                prepared: vec![],
                vmm: None,
                last_error: None,
                machine: None,
                guest: None,
                booted_once: true,
                created_at: 1,
                updated_at: 2,
                last_start: None,
            },
            dir: "/state/vms/00112233aabbccdd".into(),
        }
    }

    #[tokio::test]
    async fn get_decodes_json_and_sends_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, seen) = serve_once(
            dir.path(),
            vec![response(
                "200 OK",
                "application/json",
                r#"{"version":"9.9.9","commit":"abc","built_at":42}"#,
            )],
        );
        let v: VersionInfo = Client::new(sock).get("/v1/version").await.unwrap();
        assert_eq!(
            v,
            VersionInfo {
                version: "9.9.9".into(),
                commit: "abc".into(),
                built_at: 42
            }
        );
        let seen = seen.await.unwrap();
        assert!(
            seen.head.starts_with("GET /v1/version HTTP/1.1\r\n"),
            "{}",
            seen.head
        );
    }

    #[tokio::test]
    async fn send_posts_a_json_body_and_accepts_an_empty_answer() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, seen) = serve_once(
            dir.path(),
            vec![response("202 Accepted", "application/json", "")],
        );
        let req = crate::api::SetVmRequest {
            vcpus: Some(4),
            ..Default::default()
        };
        Client::new(sock)
            .send::<_, ()>(Method::PATCH, "/v1/vms/dev", Some(&req))
            .await
            .unwrap();
        let seen = seen.await.unwrap();
        assert!(seen.head.starts_with("PATCH /v1/vms/dev HTTP/1.1\r\n"));
        let sent: crate::api::SetVmRequest = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(sent, req);
    }

    #[tokio::test]
    async fn error_status_maps_the_error_body() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            vec![response(
                "404 Not Found",
                "application/json",
                r#"{"error":"No VM named \"ghost\""}"#,
            )],
        );
        let err = Client::new(sock)
            .get::<VmView>("/v1/vms/ghost")
            .await
            .unwrap_err();
        match err {
            ClientError::Api { status, message } => {
                assert_eq!(status, 404);
                assert_eq!(message, "No VM named \"ghost\"");
            }
            other => panic!("expected Api error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn error_status_without_json_keeps_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            vec![response(
                "500 Internal Server Error",
                "text/plain",
                "boom\n",
            )],
        );
        let err = Client::new(sock).get::<()>("/v1/x").await.unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 500, message } if message == "boom"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn invalid_json_answer_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            vec![response("200 OK", "application/json", "{not json")],
        );
        let err = Client::new(sock)
            .get::<VersionInfo>("/v1/version")
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    }

    #[tokio::test]
    async fn event_stream_split_across_chunks_yields_every_event_and_the_vm() {
        let dir = tempfile::tempdir().unwrap();
        let stage = r#"{"type":"stage","stage":"clone_rootfs","message":"copying"}"#;
        let warn = r#"{"type":"log","level":"warn","message":"slow disk"}"#;
        let done = serde_json::to_string(&Event::Done {
            result: serde_json::to_value(vm_view("dev")).unwrap(),
        })
        .unwrap();
        let all = format!("{stage}\n{warn}\n\n{done}\n");
        // Cut mid-line, at a newline, and mid-word.
        let (a, rest) = all.split_at(20);
        let (b, rest) = rest.split_at(stage.len() + 1 - 20);
        let (c, d) = rest.split_at(30);
        let (sock, seen) = serve_once(dir.path(), chunked(&[a, b, c, d]));
        let mut events = Vec::new();
        let req = crate::api::CreateVmRequest {
            name: Some("dev".into()),
            kernel: Some("/k".into()),
            rootfs: Some("/r".into()),
            ..Default::default()
        };
        let vm: VmView = Client::new(sock)
            .stream_events(Method::POST, "/v1/vms", Some(&req), |e| {
                events.push(e.clone())
            })
            .await
            .unwrap();
        assert_eq!(vm, vm_view("dev"));
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[0],
            Event::Stage {
                stage: "clone_rootfs".into(),
                message: "copying".into(),
                expected_secs: None,
            }
        );
        assert_eq!(
            events[1],
            Event::Log {
                level: "warn".into(),
                message: "slow disk".into()
            }
        );
        let seen = seen.await.unwrap();
        assert!(seen.head.starts_with("POST /v1/vms HTTP/1.1\r\n"));
        let sent: crate::api::CreateVmRequest = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(sent, req);
    }

    #[tokio::test]
    async fn event_types_from_a_newer_daemon_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let newer = r#"{"type":"eta","stage":"pull_image","seconds":30}"#;
        let stage = r#"{"type":"stage","stage":"pull_image","message":"","colour":"blue"}"#;
        let done = r#"{"type":"done","result":null}"#;
        let (sock, _seen) = serve_once(
            dir.path(),
            chunked(&[&format!("{newer}\n{stage}\n{done}\n")]),
        );
        let mut events = Vec::new();
        Client::new(sock)
            .stream_events::<(), ()>(Method::POST, "/v1/images/pull", None, |e| {
                events.push(e.clone())
            })
            .await
            .unwrap();
        assert_eq!(
            events,
            [
                Event::Stage {
                    stage: "pull_image".into(),
                    message: String::new(),
                    expected_secs: None,
                },
                Event::Done {
                    result: serde_json::Value::Null
                }
            ],
            "the unknown type is skipped, the unknown field ignored"
        );
    }

    #[tokio::test]
    async fn failed_event_becomes_an_operation_error() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            chunked(&[
                "{\"type\":\"stage\",\"stage\":\"launch_vmm\",\"message\":\"\"}\n",
                "{\"type\":\"failed\",\"stage\":\"launch_vmm\",\"error\":\"no kvm\"}\n",
            ]),
        );
        let err = Client::new(sock)
            .stream_events::<(), VmView>(Method::POST, "/v1/vms/dev/start", None, |_| {})
            .await
            .unwrap_err();
        match &err {
            ClientError::Operation { stage, error } => {
                assert_eq!(stage.as_deref(), Some("launch_vmm"));
                assert_eq!(error, "no kvm");
            }
            other => panic!("expected Operation, got {other:?}"),
        }
        // The daemon already names the stage in its text; nothing is added.
        assert_eq!(err.to_string(), "no kvm");
    }

    #[tokio::test]
    async fn stream_without_terminal_event_is_a_protocol_error() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            chunked(&["{\"type\":\"stage\",\"stage\":\"boot\",\"message\":\"x\"}\n"]),
        );
        let mut n = 0;
        let err = Client::new(sock)
            .stream_events::<(), VmView>(Method::POST, "/v1/vms/dev/start", None, |_| n += 1)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn stream_error_status_maps_the_error_body() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, _seen) = serve_once(
            dir.path(),
            vec![response(
                "409 Conflict",
                "application/json",
                r#"{"error":"VM dev is running"}"#,
            )],
        );
        let err = Client::new(sock)
            .stream_events::<(), VmView>(Method::POST, "/v1/vms/dev/start", None, |_| {})
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: 409, message } if message == "VM dev is running"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn raw_stream_delivers_all_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, seen) = serve_once(dir.path(), chunked(&["boot line 1\n", "login: "]));
        let mut got = Vec::new();
        Client::new(sock)
            .stream_raw("/v1/vms/dev/logs?follow=true", |c| {
                got.extend_from_slice(c);
                ControlFlow::Continue(())
            })
            .await
            .unwrap();
        assert_eq!(got, b"boot line 1\nlogin: ");
        let seen = seen.await.unwrap();
        assert!(
            seen.head
                .starts_with("GET /v1/vms/dev/logs?follow=true HTTP/1.1\r\n")
        );
    }

    #[tokio::test]
    async fn connect_failure_names_the_socket_and_says_how_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("absent.sock");
        let err = Client::new(sock.clone())
            .get::<VersionInfo>("/v1/version")
            .await
            .unwrap_err();
        assert!(err.daemon_absent(), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&sock.display().to_string()), "{msg}");
        assert!(msg.contains("banger daemon start"), "{msg}");
    }

    #[tokio::test]
    async fn socket_without_listener_counts_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let err = Client::new(sock)
            .get::<()>("/v1/version")
            .await
            .unwrap_err();
        assert!(err.daemon_absent(), "{err:?}");
    }

    #[tokio::test]
    async fn a_connection_closed_unanswered_counts_as_dropped_not_absent() {
        let dir = tempfile::tempdir().unwrap();
        // Reads the request, answers nothing, closes: a daemon going away.
        let (sock, seen) = serve_once(dir.path(), vec![]);
        let err = Client::new(sock.clone())
            .get::<VersionInfo>("/v1/version")
            .await
            .unwrap_err();
        seen.await.unwrap();
        assert!(err.daemon_dropped(), "{err:?}");
        assert!(!err.daemon_absent(), "{err:?}");
        assert!(err.to_string().contains(&sock.display().to_string()));
    }

    #[test]
    fn ndjson_lines_survive_every_split_point() {
        let text = b"{\"a\":1}\n\n{\"b\":2}\n{\"c\":3}";
        for cut in 0..=text.len() {
            let mut l = NdjsonLines::default();
            let mut lines = l.push(&text[..cut]);
            lines.extend(l.push(&text[cut..]));
            lines.extend(l.finish());
            let want: Vec<Vec<u8>> = vec![
                b"{\"a\":1}".to_vec(),
                b"{\"b\":2}".to_vec(),
                b"{\"c\":3}".to_vec(),
            ];
            assert_eq!(lines, want, "cut at {cut}");
        }
    }
}
