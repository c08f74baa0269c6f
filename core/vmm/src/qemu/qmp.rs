//! A minimal QMP client: connect, negotiate capabilities, run one command.
//! QMP is line-delimited JSON over the monitor socket; asynchronous events
//! may arrive between a command and its answer and are skipped.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// One negotiated QMP session.
#[derive(Debug)]
pub(super) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and leaves capabilities
    /// negotiation mode. `timeout` bounds the connect and every read and
    /// write.
    pub(super) fn connect(socket: &Path, timeout: Duration) -> io::Result<Qmp> {
        let stream = crate::uds_http::connect(socket, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(invalid(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs `command` (no arguments) and returns its `return` value; a QMP
    /// `error` answer becomes an `io::Error` carrying QEMU's description.
    pub(super) fn execute(&mut self, command: &str) -> io::Result<Value> {
        self.execute_with(command, Value::Null)
    }

    /// Hands QEMU the open file `fd` under `name` (QMP `getfd`, the
    /// descriptor passed with SCM_RIGHTS), for a later `fd:NAME` URI.
    pub(super) fn send_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        use std::os::fd::{AsFd, AsRawFd};
        let mut line = json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string();
        line.push('\n');
        let fds = [fd.as_raw_fd()];
        let iov = [io::IoSlice::new(line.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let sent = sendmsg::<()>(
            self.writer.as_fd().as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
        if sent != line.len() {
            self.writer.write_all(&line.as_bytes()[sent..])?;
        }
        self.answer("getfd").map(drop)
    }

    /// Runs `command` with `arguments` (none when `Null`), as [`Qmp::execute`].
    pub(super) fn execute_with(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        self.answer(command)
    }

    /// Reads until the answer to `command`, skipping events.
    fn answer(&mut self, command: &str) -> io::Result<Value> {
        loop {
            let msg = self.read_message()?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(io::Error::other(format!("QMP {command}: {desc}")));
            }
            // Anything else is an event ({"event": ...}); keep reading.
        }
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "QMP socket closed",
            ));
        }
        serde_json::from_str(&line).map_err(|e| invalid(format!("bad QMP message: {e}")))
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A scripted QMP server for tests.
#[cfg(test)]
pub(super) mod fake {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// Greets, then answers each received line with the next reply; joins
    /// to the lines received.
    pub(in crate::qemu) fn serve(
        listener: UnixListener,
        replies: Vec<&'static str>,
    ) -> std::thread::JoinHandle<Vec<String>> {
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut got = Vec::new();
            for reply in replies {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line.trim().to_string());
                w.write_all(reply.as_bytes()).unwrap();
            }
            got
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::fake::serve;
    use super::*;

    #[test]
    fn negotiates_then_skips_events_until_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let server = serve(
            UnixListener::bind(&sock).unwrap(),
            vec![
                "{\"return\": {}}\r\n",
                "{\"event\": \"POWERDOWN\", \"timestamp\": {}}\r\n{\"return\": {}}\r\n",
            ],
        );
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.execute("system_powerdown").unwrap(), json!({}));
        let got = server.join().unwrap();
        assert_eq!(
            got,
            vec![
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"system_powerdown"}"#
            ]
        );
    }

    #[test]
    fn reports_qemus_error_description() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp.sock");
        let _server = serve(
            UnixListener::bind(&sock).unwrap(),
            vec![
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        );
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(5)).unwrap();
        let err = qmp.execute("system_powerdown").unwrap_err();
        assert_eq!(err.to_string(), "QMP system_powerdown: nope");
    }
}
