//! The service role: a small HTTP/1.1 server over AF_VSOCK (or TCP for
//! host-side tests), one thread per connection, `Connection: close`.

mod exec;
mod health;
mod host_keys;
mod ports;
mod reidentify;

use std::fs::File;
use std::io::{Cursor, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, VsockAddr, accept4, bind, listen, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;
use serde::Serialize;

/// How long a client may take to send its request head.
const READ_TIMEOUT_SECS: i64 = 10;
/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Where the service listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// AF_VSOCK on this port, any CID.
    Vsock(u32),
    /// TCP (tests and debugging).
    Tcp(SocketAddr),
}

/// Serving failed before any request was handled.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The listening socket could not be created.
    #[error("Cannot listen on {0:?}")]
    Listen(Endpoint, #[source] std::io::Error),
    /// Accepting a connection failed.
    #[error("Cannot accept a connection")]
    Accept(#[source] std::io::Error),
}

/// A bound, not yet serving, agent API.
#[derive(Debug)]
pub struct Server {
    socket: Socket,
    root: PathBuf,
    started: Instant,
}

#[derive(Debug)]
enum Socket {
    Vsock(OwnedFd),
    Tcp(TcpListener),
}

impl Server {
    /// Binds `endpoint`; answers about the system whose `/etc` lives under
    /// `root` (`/` in a guest) and whose processes are in `/proc`.
    pub fn bind(endpoint: Endpoint, root: &Path) -> Result<Server, ServeError> {
        let socket = match endpoint {
            Endpoint::Tcp(addr) => {
                Socket::Tcp(TcpListener::bind(addr).map_err(|e| ServeError::Listen(endpoint, e))?)
            }
            Endpoint::Vsock(port) => {
                Socket::Vsock(listen_vsock(port).map_err(|e| ServeError::Listen(endpoint, e))?)
            }
        };
        Ok(Server {
            socket,
            root: root.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// What the server is listening on, for the startup log line.
    pub fn describe(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp {a}"))
                .unwrap_or_else(|_| "tcp".into()),
            Socket::Vsock(_) => "vsock".into(),
        }
    }

    /// Serves until accepting fails.
    pub fn run(self) -> Result<(), ServeError> {
        loop {
            let conn: File = match &self.socket {
                Socket::Tcp(l) => {
                    let (s, _) = l.accept().map_err(ServeError::Accept)?;
                    File::from(OwnedFd::from(s))
                }
                Socket::Vsock(fd) => {
                    let raw = accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
                        .map_err(|e| ServeError::Accept(e.into()))?;
                    // SAFETY: accept4 just returned this descriptor and
                    // nothing else owns it.
                    unsafe { File::from_raw_fd(raw) }
                }
            };
            let root = self.root.clone();
            let started = self.started;
            std::thread::spawn(move || handle(conn, &root, started));
        }
    }
}

/// The device of the agent's virtio-serial port
/// ([`banger_guest_protocol::api::SERIAL_PORT_NAME`]), found by its name under
/// `sys` (`/sys/class/virtio-ports`): there is no udev to make the
/// `/dev/virtio-ports/` link this early.
pub fn serial_port(sys: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys).ok()?;
    entries.filter_map(Result::ok).find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == banger_guest_protocol::api::SERIAL_PORT_NAME)
            .then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// The virtio device id of a console (virtio-serial) device, as
/// `/sys/bus/virtio/devices/*/device` shows it.
const VIRTIO_ID_CONSOLE: &str = "0x0003";

/// The virtio device id of a vsock device.
const VIRTIO_ID_VSOCK: &str = "0x0013";

/// How long the agent waits for its port when the VM has a virtio console
/// device: the driver adds a port when the host announces it, a moment
/// after the device probes (later still when `virtio_console` is a module).
pub const SERIAL_PORT_WAIT: Duration = Duration::from_secs(5);

/// What [`find_serial_port`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum SerialPort {
    /// The agent's port, by its device.
    Found(PathBuf),
    /// No virtio console device: the agent's API goes over vsock.
    NoDevice,
    /// A virtio console device but no port of the agent's name within the
    /// wait: most likely a kernel without `virtio_console`. Whether the VM
    /// has a vsock device to fall back to.
    Missing { vsock: bool },
}

/// The agent's virtio-serial port under `ports` (`/sys/class/virtio-ports`),
/// looked for until `wait` passes while `devices` (`/sys/bus/virtio/devices`)
/// has a console device, and given up at once without one.
pub fn find_serial_port(ports: &Path, devices: &Path, wait: Duration) -> SerialPort {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(port) = serial_port(ports) {
            return SerialPort::Found(port);
        }
        if !has_device(devices, VIRTIO_ID_CONSOLE) {
            return SerialPort::NoDevice;
        }
        if Instant::now() >= deadline {
            return SerialPort::Missing {
                vsock: has_device(devices, VIRTIO_ID_VSOCK),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `devices` (`/sys/bus/virtio/devices`) has a device of this id.
fn has_device(devices: &Path, id: &str) -> bool {
    let Ok(entries) = std::fs::read_dir(devices) else {
        return false;
    };
    entries
        .filter_map(Result::ok)
        .any(|e| std::fs::read_to_string(e.path().join("device")).is_ok_and(|d| d.trim() == id))
}

/// The agent API over a virtio-serial port: the same requests as over
/// vsock, each on a stream of [`crate::mux`].
pub struct SerialServer {
    mux: crate::mux::Mux,
    port: File,
}

impl SerialServer {
    /// Opens `device` and says hello to the host; streams the host opens to
    /// the agent's port are served as vsock connections are.
    pub fn start(device: &Path, root: &Path) -> std::io::Result<SerialServer> {
        let port = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)?;
        let root = root.to_path_buf();
        let started = Instant::now();
        let accept = move |p: u32| -> std::io::Result<std::os::unix::net::UnixStream> {
            if p != banger_guest_protocol::api::AGENT_PORT {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            // Every stream is taken at once, as the vsock listener takes
            // every connection (docs/agent-exec.md: a limit here, with
            // the host retrying refused streams, lost more commands of a
            // burst than it saved).
            let (mine, theirs) = std::os::unix::net::UnixStream::pair()?;
            let root = root.clone();
            std::thread::spawn(move || handle(File::from(OwnedFd::from(mine)), &root, started));
            Ok(theirs)
        };
        let mux =
            crate::mux::Mux::start(crate::mux::Role::Guest, port.try_clone()?, Box::new(accept));
        mux.hello();
        Ok(SerialServer { mux, port })
    }

    /// What announces the service on another thread.
    pub fn announcer(&self) -> SerialAnnouncer {
        SerialAnnouncer(self.mux.clone())
    }

    /// Serves forever. While the host side is not connected (between a
    /// snapshot's source and its restore) a read sees the end of the
    /// stream; the streams are dropped and the port read again.
    pub fn run(self) -> ! {
        let mut last_error = None;
        loop {
            let result = self.mux.read_loop(&self.port);
            self.mux.disconnected();
            // Logged once, not every retry.
            let error = result.err().map(|e| e.to_string());
            if let Some(e) = error.as_ref().filter(|e| last_error.as_ref() != Some(*e)) {
                crate::console::log(&format!("reading the agent's serial port: {e}"));
            }
            last_error = error;
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Announces a [`SerialServer`].
pub struct SerialAnnouncer(crate::mux::Mux);

impl SerialAnnouncer {
    /// [`announce_ready`] over the port, once the host answered hello.
    pub fn announce_ready(&self) -> std::io::Result<()> {
        use banger_guest_protocol::api::{READY_LINE, READY_PORT};
        if !self.0.wait_ready(std::time::Duration::from_secs(10)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the host did not answer hello on the serial port",
            ));
        }
        let mut conn = self.0.open(READY_PORT, std::time::Duration::from_secs(5))?;
        conn.write_all(format!("{READY_LINE} {}\n", env!("CARGO_PKG_VERSION")).as_bytes())
    }
}

/// Tells the host the service is up ([`banger_guest_protocol::api::READY_PORT`]):
/// one connection to the host, one line, closed. Returns why it could not;
/// a host that does not listen is not an error worth more than a log line.
pub fn announce_ready() -> std::io::Result<()> {
    use banger_guest_protocol::api::{READY_LINE, READY_PORT};
    let fd = vsock_socket()?;
    // Never hold up the boot for a host that does not answer.
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(2, 0))?;
    nix::sys::socket::connect(
        fd.as_raw_fd(),
        &VsockAddr::new(libc::VMADDR_CID_HOST, READY_PORT),
    )?;
    let mut conn = File::from(fd);
    conn.write_all(format!("{READY_LINE} {}\n", env!("CARGO_PKG_VERSION")).as_bytes())
}

fn vsock_socket() -> nix::Result<OwnedFd> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

fn listen_vsock(port: u32) -> std::io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    listen(&fd, Backlog::new(16)?)?;
    Ok(fd)
}

/// Answers one request; I/O errors just drop the connection.
fn handle(mut conn: File, root: &Path, started: Instant) {
    // A client that never finishes its request must not pin a thread.
    let _ = setsockopt(
        &conn,
        sockopt::ReceiveTimeout,
        &TimeVal::new(READ_TIMEOUT_SECS, 0),
    );
    let response = match read_head(&mut conn) {
        Some((head, rest)) if is_exec(&head) => {
            return upgrade_to_exec(conn, &head, rest, root);
        }
        Some((head, rest)) if is_post(&head, banger_guest_protocol::reidentify::PATH) => {
            reidentify_request(&mut conn, &head, rest, root)
        }
        Some((head, _)) => route(&head, root, started),
        None => reply(400, "text/plain", b"bad request\n".to_vec()),
    };
    let _ = conn.write_all(&response);
}

fn is_post(head: &str, path: &str) -> bool {
    let mut first = head.lines().next().unwrap_or_default().split(' ');
    first.next() == Some("POST") && first.next() == Some(path)
}

/// `POST /reidentify`: the old secret authorises a new identity (see
/// `reidentify`). The network is applied through netlink only in a real
/// guest (`root` is `/`).
fn reidentify_request(conn: &mut File, head: &str, mut body: Vec<u8>, root: &Path) -> Vec<u8> {
    if let Err(refusal) = exec::authorize(head, &exec::secret_path(root)) {
        let status = match refusal {
            exec::Refusal::NoSecret(_) => 403,
            exec::Refusal::WrongSecret => 401,
        };
        return reply(status, "text/plain", format!("{refusal}\n").into_bytes());
    }
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let Some(len) = len.filter(|l| *l <= reidentify::MAX_BODY) else {
        return reply(
            400,
            "text/plain",
            b"a Content-Length up to 256 KiB is required\n".to_vec(),
        );
    };
    let mut buf = [0u8; 4096];
    while body.len() < len {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return reply(400, "text/plain", b"truncated body\n".to_vec()),
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    body.truncate(len);
    let req: banger_guest_protocol::reidentify::Reidentify = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                400,
                "text/plain",
                format!("bad request body: {e}\n").into_bytes(),
            );
        }
    };
    let real = root == Path::new("/");
    let net = |r: &banger_guest_protocol::reidentify::Reidentify| -> Result<Vec<String>, String> {
        if !real {
            return Ok(Vec::new());
        }
        crate::init::net::reidentify(
            &crate::init::net::interface_name(0),
            r.mac.as_deref(),
            r.previous_address.as_deref(),
            r.network.as_ref(),
        )
        .map_err(|e| {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        })
    };
    match reidentify::apply(&req, root, &net) {
        Ok(done) => json(&done),
        Err(e) => reply(500, "text/plain", format!("{e}\n").into_bytes()),
    }
}

fn is_exec(head: &str) -> bool {
    let mut first = head.lines().next().unwrap_or_default().split(' ');
    first.next() == Some("POST") && first.next() == Some("/exec")
}

/// `POST /exec`: checks the secret, then the connection carries the exec
/// stream (see `banger_guest_protocol::exec`).
fn upgrade_to_exec(mut conn: File, head: &str, rest: Vec<u8>, root: &Path) {
    if let Err(refusal) = exec::authorize(head, &exec::secret_path(root)) {
        let status = match refusal {
            exec::Refusal::NoSecret(_) => 403,
            exec::Refusal::WrongSecret => 401,
        };
        let text = format!("{refusal}\n").into_bytes();
        let _ = conn.write_all(&reply(status, "text/plain", text));
        return;
    }
    let upgraded = format!(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
        banger_guest_protocol::exec::UPGRADE
    );
    let Ok(reader) = conn.try_clone() else { return };
    // The CLI writes its `Start` once the daemon relayed this answer: on a
    // host busy with a burst of CLIs that took more than the head's 10 s.
    let _ = setsockopt(
        &conn,
        sockopt::ReceiveTimeout,
        &TimeVal::new(exec::START_TIMEOUT.as_secs() as _, 0),
    );
    if conn.write_all(upgraded.as_bytes()).is_ok() {
        exec::serve(conn, Cursor::new(rest).chain(reader));
    }
}

/// Reads up to the blank line ending the request head; returns the head
/// and whatever arrived after it.
fn read_head(conn: &mut impl Read) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).ok()?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    };
    let rest = head.split_off(end);
    Some((String::from_utf8(head).ok()?, rest))
}

fn route(head: &str, root: &Path, started: Instant) -> Vec<u8> {
    let mut first = head.lines().next().unwrap_or_default().split(' ');
    let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if !matches!(path, "/healthz" | "/ports" | "/ssh-host-keys") {
        return reply(404, "text/plain", b"not found\n".to_vec());
    }
    if method != "GET" {
        return reply(405, "text/plain", b"method not allowed\n".to_vec());
    }
    let proc = Path::new("/proc");
    match path {
        "/healthz" => json(&health::health(started, &proc.join("meminfo"))),
        "/ports" => match ports::listeners(proc) {
            Ok(l) => json(&l),
            Err(e) => error(&e),
        },
        _ => match host_keys::host_keys(&root.join("etc/ssh")) {
            Ok(k) => json(&k),
            Err(e) => error(&e),
        },
    }
}

fn json(value: &impl Serialize) -> Vec<u8> {
    match serde_json::to_vec(value) {
        Ok(body) => reply(200, "application/json", body),
        Err(e) => error(&e),
    }
}

fn error(e: &dyn std::error::Error) -> Vec<u8> {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    reply(500, "text/plain", format!("{text}\n").into_bytes())
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(response: &[u8]) -> &str {
        std::str::from_utf8(response)
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
    }

    #[test]
    fn routes_known_paths_and_refuses_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let now = Instant::now();
        let get = |p: &str| route(&format!("GET {p} HTTP/1.1\r\n\r\n"), root.path(), now);
        assert_eq!(status_of(&get("/healthz")), "200");
        assert_eq!(status_of(&get("/healthz?verbose=1")), "200");
        assert_eq!(status_of(&get("/ssh-host-keys")), "200");
        assert_eq!(status_of(&get("/")), "404");
        let post = route("POST /ports HTTP/1.1\r\n\r\n", root.path(), now);
        assert_eq!(status_of(&post), "405");
    }

    #[test]
    fn the_serial_port_is_waited_for_only_beside_a_console_device() {
        let sys = tempfile::tempdir().unwrap();
        let (ports, devices) = (sys.path().join("ports"), sys.path().join("devices"));
        let device = |name: &str, id: &str| {
            std::fs::create_dir_all(devices.join(name)).unwrap();
            std::fs::write(devices.join(name).join("device"), format!("{id}\n")).unwrap();
        };
        let port = |dir: &str, name: &str| {
            std::fs::create_dir_all(ports.join(dir)).unwrap();
            std::fs::write(ports.join(dir).join("name"), format!("{name}\n")).unwrap();
        };
        let long = Duration::from_secs(60);
        // Firecracker, or QEMU's vsock transport: block and net, no console.
        device("virtio0", "0x0002");
        device("virtio1", "0x0001");
        assert_eq!(
            find_serial_port(&ports, &devices, long),
            SerialPort::NoDevice
        );
        // A console device whose ports never include the agent's (a kernel
        // without virtio_console has none at all): given up after the wait.
        device("virtio2", "0x0003");
        port("vport0p0", "org.qemu.guest_agent.0");
        let since = Instant::now();
        let wait = Duration::from_millis(50);
        assert_eq!(
            find_serial_port(&ports, &devices, wait),
            SerialPort::Missing { vsock: false }
        );
        assert!(since.elapsed() >= wait, "it waited for the port");
        // With a vsock device beside it, vsock is there to fall back to.
        device("virtio3", "0x0013");
        assert_eq!(
            find_serial_port(&ports, &devices, wait),
            SerialPort::Missing { vsock: true }
        );
        port("vport0p1", banger_guest_protocol::api::SERIAL_PORT_NAME);
        assert_eq!(
            find_serial_port(&ports, &devices, long),
            SerialPort::Found(PathBuf::from("/dev/vport0p1"))
        );
    }

    #[test]
    fn refuses_oversized_or_truncated_request_heads() {
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(read_head(&mut &huge[..]), None);
        assert_eq!(read_head(&mut &b"GET / HTTP/1.1\r\n"[..]), None);
        assert_eq!(
            read_head(&mut &b"GET / HTTP/1.1\r\n\r\nrest"[..]),
            Some(("GET / HTTP/1.1\r\n\r\n".to_string(), b"rest".to_vec()))
        );
    }
}
