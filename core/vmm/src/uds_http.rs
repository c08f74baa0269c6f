//! A tiny blocking HTTP/1.1 client over a Unix socket, enough for a VMM's
//! local API: one request per connection (`Connection: close`), bodies
//! delimited by `Content-Length` or by the end of the stream.
//!
//! Errors are plain `io::Error`s (malformed answers are `InvalidData`): the
//! caller names the request that failed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest response body we accept; VMM API answers are a few hundred bytes.
const MAX_BODY: usize = 1 << 20;
/// Largest status or header line we accept.
const MAX_LINE: usize = 8 << 10;

/// A parsed HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    /// The status code (`204`).
    pub status: u16,
    /// The body, possibly empty.
    pub body: Vec<u8>,
    /// The connection can carry another request: HTTP/1.1, no
    /// `Connection: close`, and the body's end was known without EOF.
    pub reusable: bool,
}

impl Response {
    /// True for 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// `connect(2)` to the Unix socket `socket`, waiting at most `timeout` for
/// room in its listen backlog (then `TimedOut`). A blocking connect to a
/// full backlog waits until the listener accepts, which a stalled VMM never
/// does; for Unix sockets `SO_SNDTIMEO` is what bounds that wait.
pub(crate) fn connect(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, UnixAddr, connect as connect_fd, setsockopt,
        socket as new_socket, sockopt,
    };
    use nix::sys::time::{TimeVal, TimeValLike};
    use std::os::fd::AsRawFd;

    let fd = new_socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Zero would mean "wait forever"; keep a floor instead.
    let micros =
        i64::try_from(timeout.max(Duration::from_millis(1)).as_micros()).unwrap_or(i64::MAX);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::microseconds(micros))?;
    match connect_fd(fd.as_raw_fd(), &UnixAddr::new(socket)?) {
        Ok(()) => Ok(UnixStream::from(fd)),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINPROGRESS) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no room in the listen backlog of {} within {timeout:?}",
                socket.display()
            ),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Sends one request to the HTTP server on `socket` and reads its answer.
/// `timeout` bounds connecting-then-each read and write.
pub(crate) fn request(
    socket: &Path,
    method: &str,
    path: &str,
    json_body: Option<&str>,
    timeout: Duration,
) -> io::Result<Response> {
    let mut stream = connect(socket, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    match json_body {
        Some(body) => {
            req.push_str("Content-Type: application/json\r\nAccept: application/json\r\n");
            req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            req.push_str(body);
        }
        None => req.push_str("Accept: application/json\r\n\r\n"),
    }
    stream.write_all(req.as_bytes())?;
    stream.flush()?;
    read_response(&mut BufReader::new(stream), method == "HEAD")
}

/// Parses one response from `r`. `head` says the request was HEAD (no body).
pub(crate) fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    let status_line =
        read_line(r)?.ok_or_else(|| invalid("connection closed before a status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!(
            "not an HTTP/1.x status line: {status_line:?}"
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| invalid(format!("bad status code in {status_line:?}")))?;

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut reusable = version == "HTTP/1.1";
    loop {
        let line = read_line(r)?.ok_or_else(|| invalid("connection closed inside the headers"))?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("malformed header line {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
            if n > MAX_BODY {
                return Err(invalid(format!("response body of {n} bytes is too large")));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            reusable = false;
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }

    // 1xx, 204 and 304 never carry a body, whatever the headers say.
    if head || status < 200 || status == 204 || status == 304 {
        return Ok(Response {
            status,
            body: Vec::new(),
            reusable,
        });
    }
    if chunked {
        return Err(invalid("chunked responses are not supported"));
    }
    let body = match content_length {
        Some(n) => {
            let mut body = vec![0; n];
            r.read_exact(&mut body).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    invalid(format!("body shorter than its Content-Length {n}"))
                } else {
                    e
                }
            })?;
            body
        }
        None => {
            reusable = false;
            let mut body = Vec::new();
            r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
            if body.len() > MAX_BODY {
                return Err(invalid("response body is too large"));
            }
            body
        }
    };
    Ok(Response {
        status,
        body,
        reusable,
    })
}

/// Reads one CRLF- (or LF-) terminated line; `None` at a clean end of stream.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") {
        return Err(invalid(if n > MAX_LINE {
            "header line too long"
        } else {
            "connection closed inside a line"
        }));
    }
    buf.pop();
    if buf.ends_with(b"\r") {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| invalid("header line is not UTF-8"))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Cursor;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A listener on `path` that never accepts, its backlog (the smallest)
    /// filled: returned with the queued connections, to keep them so.
    pub(crate) fn full_backlog(path: &Path) -> (OwnedFd, Vec<OwnedFd>) {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
        };
        use std::os::fd::AsRawFd;
        let addr = UnixAddr::new(path).unwrap();
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &addr).unwrap();
        listen(&listener, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match connect(s.as_raw_fd(), &addr) {
                Ok(()) => queued.push(s),
                Err(nix::errno::Errno::EAGAIN) => return (listener, queued),
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 1000, "the backlog never filled");
        }
    }

    #[test]
    fn a_full_backlog_is_a_timeout_not_an_endless_connect() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _full = full_backlog(&sock);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = sock.clone();
        std::thread::spawn(move || {
            let _ = tx.send(request(&path, "GET", "/", None, Duration::from_millis(200)));
        });
        let e = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the connect hung on a full backlog")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("backlog"), "{e}");
    }

    fn parse(raw: &str) -> io::Result<Response> {
        read_response(&mut Cursor::new(raw.as_bytes().to_vec()), false)
    }

    #[test]
    fn parses_no_content_without_body() {
        let r = parse("HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n").unwrap();
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
        assert!(r.is_success());
    }

    #[test]
    fn a_connection_is_reusable_only_for_delimited_http_1_1_answers_not_closed() {
        let reusable = |raw: &str| parse(raw).unwrap().reusable;
        assert!(reusable("HTTP/1.1 204 No Content\r\n\r\n"));
        assert!(reusable(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
        ));
        assert!(!reusable(
            "HTTP/1.1 204 No Content\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!reusable("HTTP/1.0 204 No Content\r\n\r\n"));
        assert!(!reusable("HTTP/1.1 200 OK\r\n\r\nto the end"));
    }

    #[test]
    fn parses_error_body_by_content_length_and_ignores_trailing_bytes() {
        let body = r#"{"fault_message":"bad drive"}"#;
        let raw = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-LENGTH: {}\r\nContent-Type: application/json\r\n\r\n{body}GARBAGE",
            body.len()
        );
        let r = parse(&raw).unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, body.as_bytes());
        assert!(!r.is_success());
    }

    #[test]
    fn reads_body_to_end_without_content_length() {
        let r = parse("HTTP/1.0 200 OK\nContent-Type: text/plain\n\nhello\nworld").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"hello\nworld");
    }

    #[test]
    fn ignores_body_headers_on_no_content() {
        let r = parse("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn rejects_truncated_body() {
        let e = parse("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("shorter"), "{e}");
    }

    #[test]
    fn rejects_malformed_status_lines_and_headers() {
        for raw in [
            "",
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 abc OK\r\n\r\n",
            "HTTP/1.1 42 Odd\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Len",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ] {
            let e = parse(raw).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{raw:?}: {e}");
        }
    }

    #[test]
    fn rejects_oversized_bodies() {
        let raw = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(parse(&raw).is_err());
    }

    #[test]
    fn sends_a_well_formed_request_over_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            (&stream)
                .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap();
            (head, String::from_utf8(body).unwrap())
        });
        let r = request(
            &sock,
            "PUT",
            "/actions",
            Some(r#"{"action_type":"InstanceStart"}"#),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 204);
        let (head, body) = server.join().unwrap();
        assert!(head.starts_with("PUT /actions HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains("Content-Type: application/json\r\n"),
            "{head}"
        );
        assert_eq!(body, r#"{"action_type":"InstanceStart"}"#);
    }

    #[test]
    fn times_out_on_a_silent_server() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s");
        let _listener = UnixListener::bind(&sock).unwrap();
        // The kernel completes the connection from the backlog; nobody answers.
        let e = request(&sock, "GET", "/", None, Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "{e:?}"
        );
    }
}
