//! Streams multiplexed over one byte pipe: how the agent's API travels over
//! a virtio-serial port, which QEMU can migrate where it cannot migrate
//! vhost-user-vsock (`docs/snapshots.md`).
//!
//! A port is one long byte stream, not a connection per request, so both
//! ends cut it into frames: each COBS-encoded and ended by a zero byte, so a
//! reader that starts (or restarts) mid-stream finds the next frame at the
//! next zero. A frame is `[kind][stream id, u32 BE][payload length, u32
//! BE][payload]`; the length makes a frame cut short anywhere fail to parse. Streams open
//! in either direction (`Open`/`OpenOk`, or `Rst` when nothing listens on the
//! port), carry `Data` within a window the receiver grants with `Credit` (so
//! one slow stream never stalls the pipe), and end with `Shut` (no more data
//! this way: the peer reads end of file) or `Rst` (gone both ways; data
//! sent before it is still delivered, so a side whose local socket closed
//! may reset right after its last bytes). A side whose local socket stops
//! taking data drops what still arrives but resets only once its own data
//! is all sent: a command's exit status must not be lost to a keepalive
//! that crossed it.
//!
//! Sessions. The guest says `GuestHello` when its service starts; the host
//! answers `Hello(epoch)`; the guest drops every stream it had and answers
//! `HelloAck(epoch)`. Until the host sees the ack of its latest epoch it
//! ignores everything else and refuses new connections. After a snapshot
//! restore the guest does not restart, so the restored VM's new bridge
//! says `Hello` first (`--resync`): streams that were open in the snapshot
//! are dropped on both sides, as Firecracker drops vsock connections.
//!
//! Each end hands a stream to its own side as a Unix socket: the guest
//! serves it like a vsock connection, the host bridge splices it to a
//! hybrid-vsock client (`CONNECT <port>`), see `bridge`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Most payload bytes in one `Data` frame: an encoded frame stays well under
/// the 32 KiB a virtio-serial write takes in one piece.
pub const MAX_DATA: usize = 16 * 1024;
/// Bytes a stream may have in flight towards its receiver.
pub const WINDOW: u32 = 256 * 1024;
/// Longest encoded frame a reader buffers before it gives the frame up.
const MAX_ENCODED: usize = MAX_DATA + MAX_DATA / 254 + 64;
/// Stream ids the guest allocates have this bit set; the host's do not.
const GUEST_ID: u32 = 1 << 31;

/// One frame's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Guest → host: the guest's service (re)started; start a session.
    GuestHello,
    /// Host → guest: a new session; drop every stream.
    Hello(u64),
    /// Guest → host: the session `epoch` is in place.
    HelloAck(u64),
    /// Open stream `id` to `port` on the other side.
    Open { id: u32, port: u32 },
    /// The stream is open.
    OpenOk(u32),
    /// Bytes on a stream.
    Data(u32, Vec<u8>),
    /// The receiver consumed this many bytes: the sender may send as many more.
    Credit(u32, u32),
    /// The sender sends nothing more on this stream.
    Shut(u32),
    /// The stream is gone (or never existed).
    Rst(u32),
}

impl Frame {
    /// The frame, COBS-encoded and ended by its zero byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = Vec::with_capacity(16);
        let (kind, id): (u8, u32) = match self {
            Frame::GuestHello => (0, 0),
            Frame::Hello(_) => (1, 0),
            Frame::HelloAck(_) => (2, 0),
            Frame::Open { id, .. } => (3, *id),
            Frame::OpenOk(id) => (4, *id),
            Frame::Data(id, _) => (5, *id),
            Frame::Credit(id, _) => (6, *id),
            Frame::Shut(id) => (7, *id),
            Frame::Rst(id) => (8, *id),
        };
        raw.push(kind);
        raw.extend_from_slice(&id.to_be_bytes());
        raw.extend_from_slice(&[0; 4]);
        match self {
            Frame::Hello(e) | Frame::HelloAck(e) => raw.extend_from_slice(&e.to_be_bytes()),
            Frame::Open { port, .. } => raw.extend_from_slice(&port.to_be_bytes()),
            Frame::Credit(_, n) => raw.extend_from_slice(&n.to_be_bytes()),
            Frame::Data(_, bytes) => raw.extend_from_slice(bytes),
            _ => {}
        }
        let len = (raw.len() - 9) as u32;
        raw[5..9].copy_from_slice(&len.to_be_bytes());
        cobs_encode(&raw)
    }

    /// Parses one decoded frame (without its zero byte); `None` for anything
    /// malformed, which the reader drops.
    fn parse(raw: &[u8]) -> Option<Frame> {
        let (&kind, rest) = raw.split_first()?;
        let id = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        let len = u32::from_be_bytes(rest.get(4..8)?.try_into().ok()?);
        let body = &rest[8..];
        if usize::try_from(len).ok()? != body.len() {
            return None;
        }
        let u32_body = || Some(u32::from_be_bytes(body.try_into().ok()?));
        let u64_body = || Some(u64::from_be_bytes(body.try_into().ok()?));
        let empty = || body.is_empty().then_some(());
        Some(match kind {
            0 => empty().map(|()| Frame::GuestHello)?,
            1 => Frame::Hello(u64_body()?),
            2 => Frame::HelloAck(u64_body()?),
            3 => Frame::Open {
                id,
                port: u32_body()?,
            },
            4 => empty().map(|()| Frame::OpenOk(id))?,
            5 if !body.is_empty() && body.len() <= MAX_DATA => Frame::Data(id, body.to_vec()),
            6 => Frame::Credit(id, u32_body()?),
            7 => empty().map(|()| Frame::Shut(id))?,
            8 => empty().map(|()| Frame::Rst(id))?,
            _ => return None,
        })
    }
}

/// COBS: the bytes with every zero removed, each run prefixed by its length
/// plus one; then the terminating zero.
fn cobs_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 254 + 2);
    let mut code_at = 0;
    out.push(0);
    let mut code = 1u8;
    for &b in raw {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
            continue;
        }
        out.push(b);
        code += 1;
        if code == 0xff {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        }
    }
    out[code_at] = code;
    out.push(0);
    out
}

/// The inverse of [`cobs_encode`] for one frame without its zero byte.
fn cobs_decode(enc: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(enc.len());
    let mut i = 0;
    while i < enc.len() {
        let code = usize::from(enc[i]);
        let end = i + code;
        if code == 0 || end > enc.len() {
            return None;
        }
        out.extend_from_slice(&enc[i + 1..end]);
        i = end;
        if code < 0xff && i < enc.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Cuts a byte stream into frames at its zero bytes.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// An overlong frame is being skipped up to its zero byte.
    skipping: bool,
}

impl Decoder {
    /// Feeds `bytes`; calls `each` with every complete, well-formed frame.
    /// Malformed or overlong frames are dropped: the next zero byte starts
    /// afresh.
    pub fn feed(&mut self, bytes: &[u8], mut each: impl FnMut(Frame)) {
        for &b in bytes {
            if b != 0 {
                if self.skipping {
                    continue;
                }
                if self.buf.len() == MAX_ENCODED {
                    self.buf.clear();
                    self.skipping = true;
                    continue;
                }
                self.buf.push(b);
                continue;
            }
            if !std::mem::take(&mut self.skipping) && !self.buf.is_empty() {
                if let Some(f) = cobs_decode(&self.buf).and_then(|raw| Frame::parse(&raw)) {
                    each(f);
                }
            }
            self.buf.clear();
        }
    }
}

/// Which end of the pipe this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The guest agent, on its virtio-serial port.
    Guest,
    /// The host bridge, on QEMU's chardev socket.
    Host,
}

/// Gives a stream the other side opened to `port` a local socket, or says
/// why it cannot (the opener is told `Rst`).
pub type Accept = dyn Fn(u32) -> io::Result<UnixStream> + Send + Sync;

/// Where a stream's incoming data goes.
enum Inbound {
    Data(Vec<u8>),
    Shut,
    /// The peer reset the stream: what came before is still delivered,
    /// then the local socket is shut both ways.
    Reset,
}

struct Stream {
    /// To the thread writing into the local socket.
    inbound: Sender<Inbound>,
    /// Bytes received and not yet credited back: a peer that sends beyond
    /// [`WINDOW`] ignores the protocol (a guest is not trusted), and its
    /// stream is reset rather than buffered without bound.
    unacked: Arc<AtomicU32>,
    /// Bytes the peer lets this side send, and whether the stream is gone.
    credit: Arc<(Mutex<(u32, bool)>, Condvar)>,
    /// The local socket, to shut it down on `Rst`.
    local: UnixStream,
}

/// Session state. The host waits for the ack of the epoch it sent; the
/// guest is `Ready` from the host's `Hello` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Session {
    /// No session yet, or (host) waiting for the ack of this epoch.
    Waiting(Option<u64>),
    Ready,
}

struct Inner {
    role: Role,
    out: Sender<Vec<u8>>,
    streams: Mutex<HashMap<u32, Stream>>,
    /// Streams this side opened, waiting for `OpenOk` (true) or `Rst`.
    opening: Mutex<HashMap<u32, Sender<bool>>>,
    session: Mutex<Session>,
    ready: Condvar,
    next_id: AtomicU32,
    accept: Box<Accept>,
}

/// One end of a multiplexed pipe.
#[derive(Clone)]
pub struct Mux {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A number no earlier run is likely to have used: epochs and first ids.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
    }
    u64::from_be_bytes(b)
}

impl Mux {
    /// Runs `role`'s end over `reader`/`writer` (the two halves of one
    /// pipe); returns once the writer thread runs, while [`Mux::read_loop`]
    /// is the caller's to run. `accept` gives streams the peer opens a local
    /// socket.
    pub fn start(role: Role, writer: impl Write + Send + 'static, accept: Box<Accept>) -> Mux {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || write_loop(writer, rx));
        let first = (random_u64() as u32) & !GUEST_ID;
        Mux {
            inner: Arc::new(Inner {
                role,
                out: tx,
                streams: Mutex::new(HashMap::new()),
                opening: Mutex::new(HashMap::new()),
                session: Mutex::new(Session::Waiting(None)),
                ready: Condvar::new(),
                next_id: AtomicU32::new(first),
                accept,
            }),
        }
    }

    fn send(&self, f: &Frame) {
        // The writer thread is gone only when the pipe is: nothing to do.
        let _ = self.inner.out.send(f.encode());
    }

    /// Host: starts a session now (after a restore, when the guest will not
    /// say hello). Guest: announces its (re)start. Both begin with a bare
    /// zero byte, so a frame the peer had half read ends there.
    pub fn hello(&self) {
        let _ = self.inner.out.send(vec![0]);
        match self.inner.role {
            Role::Guest => {
                *lock(&self.inner.session) = Session::Waiting(None);
                self.send(&Frame::GuestHello)
            }
            Role::Host => self.new_session(),
        }
    }

    fn new_session(&self) {
        self.reset_streams();
        let epoch = random_u64();
        *lock(&self.inner.session) = Session::Waiting(Some(epoch));
        self.send(&Frame::Hello(epoch));
    }

    /// Drops every stream (their local sockets see the end) and every
    /// pending open.
    fn reset_streams(&self) {
        let streams: Vec<Stream> = lock(&self.inner.streams).drain().map(|(_, s)| s).collect();
        for s in streams {
            close(&s);
        }
        lock(&self.inner.opening).clear();
    }

    /// Whether a session is in place.
    pub fn is_ready(&self) -> bool {
        *lock(&self.inner.session) == Session::Ready
    }

    /// Waits up to `timeout` for a session.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        let guard = lock(&self.inner.session);
        let (guard, _) = self
            .inner
            .ready
            .wait_timeout_while(guard, timeout, |s| *s != Session::Ready)
            .unwrap_or_else(|p| p.into_inner());
        *guard == Session::Ready
    }

    /// Reads frames from `reader` until it ends or fails; returns why.
    pub fn read_loop(&self, mut reader: impl Read) -> io::Result<()> {
        let mut decoder = Decoder::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            decoder.feed(&buf[..n], |f| self.on_frame(f));
        }
    }

    /// The pipe ended: every stream with it.
    pub fn disconnected(&self) {
        self.reset_streams();
        if self.inner.role == Role::Host {
            *lock(&self.inner.session) = Session::Waiting(None);
        }
    }

    fn on_frame(&self, f: Frame) {
        let inner = &self.inner;
        match (inner.role, f) {
            (Role::Host, Frame::GuestHello) => self.new_session(),
            (Role::Host, Frame::HelloAck(e)) => {
                let mut s = lock(&inner.session);
                if *s == Session::Waiting(Some(e)) {
                    *s = Session::Ready;
                    inner.ready.notify_all();
                }
            }
            (Role::Guest, Frame::Hello(e)) => {
                self.reset_streams();
                self.send(&Frame::HelloAck(e));
                *lock(&inner.session) = Session::Ready;
                inner.ready.notify_all();
            }
            // Nothing but the handshake counts before a session.
            (_, _) if !self.is_ready() => {}
            // The host's accept connects to a Unix socket, which can block
            // on a full backlog: off the reader thread, so other streams
            // flow meanwhile. The peer sends nothing on the stream before
            // `OpenOk`, which follows its registration.
            (Role::Host, Frame::Open { id, port }) => {
                let me = self.clone();
                std::thread::spawn(move || me.on_open(id, port));
            }
            (Role::Guest, Frame::Open { id, port }) => self.on_open(id, port),
            (_, Frame::OpenOk(id)) => {
                if let Some(tx) = lock(&inner.opening).remove(&id) {
                    let _ = tx.send(true);
                }
            }
            (_, Frame::Data(id, bytes)) => {
                let len = bytes.len() as u32;
                let accepted = lock(&inner.streams).get(&id).map(|s| {
                    let before = s.unacked.fetch_add(len, Ordering::AcqRel);
                    before.saturating_add(len) <= WINDOW
                        && s.inbound.send(Inbound::Data(bytes)).is_ok()
                });
                match accepted {
                    Some(true) => {}
                    // Over the window, or its writer gone: the stream ends.
                    Some(false) => self.drop_stream(id),
                    None => self.send(&Frame::Rst(id)),
                }
            }
            (_, Frame::Credit(id, n)) => {
                if let Some(s) = lock(&inner.streams).get(&id) {
                    let (m, cv) = &*s.credit;
                    let mut c = lock(m);
                    c.0 = c.0.saturating_add(n);
                    cv.notify_all();
                }
            }
            (_, Frame::Shut(id)) => {
                if let Some(s) = lock(&inner.streams).get(&id) {
                    let _ = s.inbound.send(Inbound::Shut);
                }
            }
            (_, Frame::Rst(id)) => {
                if let Some(tx) = lock(&inner.opening).remove(&id) {
                    let _ = tx.send(false);
                }
                if let Some(s) = lock(&inner.streams).remove(&id) {
                    reset(&s);
                }
            }
            // Handshake frames for the other role.
            (_, Frame::GuestHello | Frame::Hello(_) | Frame::HelloAck(_)) => {}
        }
    }

    fn on_open(&self, id: u32, port: u32) {
        // The peer's ids carry its own marker: anything else is bogus.
        let from_guest = id & GUEST_ID != 0;
        if from_guest != (self.inner.role == Role::Host)
            || lock(&self.inner.streams).contains_key(&id)
        {
            self.send(&Frame::Rst(id));
            return;
        }
        match (self.inner.accept)(port).and_then(|local| self.register(id, local)) {
            Ok(pumps) => {
                self.send(&Frame::OpenOk(id));
                pumps.start();
            }
            Err(_) => self.send(&Frame::Rst(id)),
        }
    }

    /// Opens a stream to `port` on the other side; `Err` when the peer
    /// refused it, there is no session, or no answer came in `timeout`.
    /// The returned socket is this side's end of the stream.
    pub fn open(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let (mine, theirs) = UnixStream::pair()?;
        self.open_on(port, timeout, theirs, &[])?;
        Ok(mine)
    }

    /// [`Mux::open`] onto a socket the caller has: once the peer accepted,
    /// `greeting` is written to `local`, then the stream flows.
    pub fn open_on(
        &self,
        port: u32,
        timeout: Duration,
        mut local: UnixStream,
        greeting: &[u8],
    ) -> io::Result<()> {
        if !self.is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no session with the other side of the port yet",
            ));
        }
        let marker = if self.inner.role == Role::Guest {
            GUEST_ID
        } else {
            0
        };
        let id = (self.inner.next_id.fetch_add(1, Ordering::Relaxed) & !GUEST_ID) | marker;
        let (tx, rx) = mpsc::channel();
        // Registered before the peer can answer: data it sends right after
        // accepting waits in the stream's queue.
        let pumps = self.register(id, local.try_clone()?)?;
        lock(&self.inner.opening).insert(id, tx);
        self.send(&Frame::Open { id, port });
        let answer = rx.recv_timeout(timeout);
        let refused = |kind, text: String| {
            lock(&self.inner.opening).remove(&id);
            lock(&self.inner.streams).remove(&id);
            self.send(&Frame::Rst(id));
            Err(io::Error::new(kind, text))
        };
        match answer {
            Ok(true) => {
                if let Err(e) = local.write_all(greeting) {
                    return refused(e.kind(), e.to_string());
                }
                pumps.start();
                Ok(())
            }
            Ok(false) => refused(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on port {port} on the other side"),
            ),
            Err(_) => refused(
                io::ErrorKind::TimedOut,
                format!("no answer to opening port {port}"),
            ),
        }
    }

    /// Registers stream `id` on `local`; its pumps start with
    /// [`Pumps::start`].
    fn register(&self, id: u32, local: UnixStream) -> io::Result<Pumps> {
        let (reader, writer) = (local.try_clone()?, local.try_clone()?);
        let (tx, rx) = mpsc::channel();
        let credit = Arc::new((Mutex::new((WINDOW, false)), Condvar::new()));
        let unacked = Arc::new(AtomicU32::new(0));
        lock(&self.inner.streams).insert(
            id,
            Stream {
                inbound: tx,
                unacked: unacked.clone(),
                credit: credit.clone(),
                local,
            },
        );
        Ok(Pumps {
            mux: self.clone(),
            id,
            reader,
            writer,
            inbound: rx,
            unacked,
            credit,
        })
    }

    /// Local socket → `Data` frames, within the peer's credit.
    fn pump_out(
        &self,
        id: u32,
        mut local: UnixStream,
        credit: &(Mutex<(u32, bool)>, Condvar),
        halves: &Halves,
    ) {
        let mut buf = vec![0u8; MAX_DATA];
        loop {
            let allowed = {
                let (m, cv) = credit;
                let c = cv
                    .wait_while(lock(m), |c| c.0 == 0 && !c.1)
                    .unwrap_or_else(|p| p.into_inner());
                if c.1 {
                    return;
                }
                (c.0 as usize).min(MAX_DATA)
            };
            match local.read(&mut buf[..allowed]) {
                // The peer reset the stream (and shut the local socket's
                // reading side): nothing more goes to it, not even `Shut`.
                Ok(_) if lock(&credit.0).1 => return,
                Ok(0) => {
                    self.send(&Frame::Shut(id));
                    let before = halves.fetch_or(OUT_DONE, Ordering::AcqRel);
                    if before & IN_DONE != 0 {
                        lock(&self.inner.streams).remove(&id);
                    } else if before & IN_DEAD != 0 {
                        // Nobody here reads what the peer still sends.
                        self.drop_stream(id);
                    }
                    return;
                }
                Ok(n) => {
                    lock(&credit.0).0 -= n as u32;
                    self.send(&Frame::Data(id, buf[..n].to_vec()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_stream(id);
                    return;
                }
            }
        }
    }

    /// Incoming data → local socket, crediting the peer for each piece.
    ///
    /// Once the local socket stops taking data (its owner closed it), what
    /// the peer sends is credited and dropped, but the stream is not reset
    /// while this side may still have data for the peer: a command's exit
    /// status written just before its stream closed, followed by a
    /// keepalive from the host, must still reach the host. The reset waits
    /// for the outbound direction to end (`pump_out`).
    fn pump_in(&self, id: u32, mut local: UnixStream, inbound: &Incoming, halves: &Halves) {
        let (rx, unacked) = inbound;
        let mut dead = false;
        while let Ok(msg) = rx.recv() {
            match msg {
                Inbound::Data(bytes) => {
                    if !dead && local.write_all(&bytes).is_err() {
                        dead = true;
                        let before = halves.fetch_or(IN_DEAD, Ordering::AcqRel);
                        if before & OUT_DONE != 0 {
                            self.drop_stream(id);
                            return;
                        }
                    }
                    let n = bytes.len() as u32;
                    unacked.fetch_sub(n, Ordering::AcqRel);
                    self.send(&Frame::Credit(id, n));
                }
                Inbound::Shut => {
                    let _ = local.shutdown(Shutdown::Write);
                    if halves.fetch_or(IN_DONE, Ordering::AcqRel) & OUT_DONE != 0 {
                        lock(&self.inner.streams).remove(&id);
                    }
                    return;
                }
                Inbound::Reset => {
                    let _ = local.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// This side gives stream `id` up: the peer is told, the local socket
    /// closed.
    fn drop_stream(&self, id: u32) {
        if let Some(s) = lock(&self.inner.streams).remove(&id) {
            close(&s);
            self.send(&Frame::Rst(id));
        }
    }

    /// Streams currently open.
    #[cfg(test)]
    pub fn stream_count(&self) -> usize {
        lock(&self.inner.streams).len()
    }
}

/// A registered stream's two pumps, not yet running.
struct Pumps {
    mux: Mux,
    id: u32,
    reader: UnixStream,
    writer: UnixStream,
    inbound: Receiver<Inbound>,
    unacked: Arc<AtomicU32>,
    credit: Arc<(Mutex<(u32, bool)>, Condvar)>,
}

/// A stream's incoming queue and its count of bytes not yet credited.
type Incoming = (Receiver<Inbound>, Arc<AtomicU32>);

/// How a stream's two directions stand: [`OUT_DONE`], [`IN_DONE`],
/// [`IN_DEAD`]. With both directions done the stream is forgotten (its
/// local socket closes with the last descriptor).
type Halves = Arc<AtomicU8>;
/// The local socket ended and the peer was told `Shut`.
const OUT_DONE: u8 = 1;
/// The peer's `Shut` arrived and the local socket was shut for writing.
const IN_DONE: u8 = 2;
/// The local socket takes no more data: the peer's is dropped.
const IN_DEAD: u8 = 4;

impl Pumps {
    fn start(self) {
        let Pumps {
            mux,
            id,
            reader,
            writer,
            inbound,
            unacked,
            credit,
        } = self;
        let halves = Halves::default();
        let (out, out_halves) = (mux.clone(), halves.clone());
        std::thread::spawn(move || out.pump_out(id, reader, &credit, &out_halves));
        std::thread::spawn(move || mux.pump_in(id, writer, &(inbound, unacked), &halves));
    }
}

/// Ends a stream locally at once: both pumps stop and the local socket's
/// owner sees the end.
fn close(s: &Stream) {
    stop_sending(s);
    let _ = s.local.shutdown(Shutdown::Both);
}

/// The peer reset the stream: nothing more goes to it, but what it sent
/// before the reset is still written to the local socket, as a peer that
/// resets right after its last data (because nobody on its side reads any
/// more) expects.
fn reset(s: &Stream) {
    stop_sending(s);
    // Wakes `pump_out` in its read, which then stops without a `Shut`.
    let _ = s.local.shutdown(Shutdown::Read);
    if s.inbound.send(Inbound::Reset).is_err() {
        // `pump_in` is gone (it saw a `Shut`): nothing queued.
        let _ = s.local.shutdown(Shutdown::Both);
    }
}

/// `pump_out` stops: at once if it waits for credit, or at its next read.
fn stop_sending(s: &Stream) {
    let (m, cv) = &*s.credit;
    lock(m).1 = true;
    cv.notify_all();
}

/// Writes encoded frames to the pipe, each in one `write` where the pipe
/// takes it whole (a virtio-serial port does up to 32 KiB).
fn write_loop(mut writer: impl Write, rx: Receiver<Vec<u8>>) {
    while let Ok(frame) = rx.recv() {
        if writer.write_all(&frame).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut out = Vec::new();
        Decoder::default().feed(bytes, |f| out.push(f));
        out
    }

    #[test]
    fn frames_survive_encoding_whatever_bytes_they_carry() {
        let mut long = vec![0u8; MAX_DATA];
        for (i, b) in long.iter_mut().enumerate() {
            *b = (i % 7) as u8; // zeros and long non-zero runs alike
        }
        let runs: Vec<u8> = (1..=255u8).cycle().take(1000).collect();
        let all = [
            Frame::GuestHello,
            Frame::Hello(u64::MAX),
            Frame::HelloAck(0),
            Frame::Open { id: 0, port: 1024 },
            Frame::OpenOk(GUEST_ID | 7),
            Frame::Data(1, vec![0]),
            Frame::Data(2, long),
            Frame::Data(3, runs),
            Frame::Credit(4, WINDOW),
            Frame::Shut(5),
            Frame::Rst(u32::MAX),
        ];
        let mut stream = Vec::new();
        for f in &all {
            let enc = f.encode();
            assert_eq!(enc.iter().filter(|b| **b == 0).count(), 1, "{f:?}");
            assert!(enc.len() < 32 * 1024);
            stream.extend(enc);
        }
        assert_eq!(frames(&stream), all);
        // Fed a byte at a time, the same frames.
        let mut d = Decoder::default();
        let mut one_by_one = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b), |f| one_by_one.push(f));
        }
        assert_eq!(one_by_one, all);
    }

    /// A guest end whose peer is the test, writing and reading raw frames
    /// on the returned socket, in a session. The first stream the host
    /// opens to port 1 gets `local`; anything else is refused.
    fn guest_with_raw_host(local: UnixStream) -> (Mux, UnixStream) {
        let (guest_end, mut host) = UnixStream::pair().unwrap();
        let local = Mutex::new(Some(local));
        let g = Mux::start(
            Role::Guest,
            guest_end.try_clone().unwrap(),
            Box::new(move |port| {
                lock(&local)
                    .take()
                    .filter(|_| port == 1)
                    .ok_or_else(|| io::ErrorKind::ConnectionRefused.into())
            }),
        );
        let reader = g.clone();
        std::thread::spawn(move || reader.read_loop(guest_end));
        host.write_all(&Frame::Hello(1).encode()).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        (g, host)
    }

    /// Frames from the guest up to and including the first `until`.
    fn read_until(host: &mut UnixStream, until: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        let mut d = Decoder::default();
        while !seen.iter().any(&until) {
            let n = host.read(&mut buf).unwrap();
            assert!(n > 0, "the guest closed the pipe; saw {seen:?}");
            d.feed(&buf[..n], |f| seen.push(f));
        }
        seen
    }

    #[test]
    fn a_peer_that_sends_beyond_its_window_gets_the_stream_reset() {
        // The guest's side of stream 5 is a socket nobody reads.
        let (keep, unread) = UnixStream::pair().unwrap();
        let (g, mut host) = guest_with_raw_host(unread);
        host.write_all(&Frame::Open { id: 5, port: 1 }.encode())
            .unwrap();
        // Far more than the window and any socket buffer, credit ignored.
        let mut writer = host.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            for _ in 0..(16 * WINDOW as usize / MAX_DATA) {
                if writer
                    .write_all(&Frame::Data(5, vec![7; MAX_DATA]).encode())
                    .is_err()
                {
                    break;
                }
            }
        });
        let seen = read_until(&mut host, |f| *f == Frame::Rst(5));
        assert!(seen.contains(&Frame::OpenOk(5)), "{seen:?}");
        flood.join().unwrap();
        assert_eq!(g.stream_count(), 0);
        drop(keep);
    }

    #[test]
    fn data_sent_before_a_reset_still_reaches_the_local_socket() {
        // The local socket takes little at a time, so most of the data is
        // still queued in the mux when the reset arrives.
        let (mut app, local) = UnixStream::pair().unwrap();
        nix::sys::socket::setsockopt(&local, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
        let (_g, mut host) = guest_with_raw_host(local);
        let sent: Vec<u8> = (0..WINDOW).map(|i| (i % 251) as u8).collect();
        let mut frames = vec![Frame::Open { id: 5, port: 1 }];
        frames.extend(sent.chunks(MAX_DATA).map(|c| Frame::Data(5, c.to_vec())));
        // The reset, then an open the guest refuses: its answer says the
        // reset was taken in, as frames are handled in order.
        frames.extend([Frame::Rst(5), Frame::Open { id: 6, port: 2 }]);
        let mut writer = host.try_clone().unwrap();
        std::thread::spawn(move || {
            for f in frames {
                writer.write_all(&f.encode()).unwrap();
            }
        });
        read_until(&mut host, |f| *f == Frame::Rst(6));
        let mut got = Vec::new();
        app.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        app.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), sent.len(), "bytes delivered before the end");
        assert!(got == sent);
        // The reset shut the local socket both ways.
        assert!(app.write_all(b"late").is_err());
    }

    #[test]
    fn a_local_socket_that_stops_reading_still_sends_its_last_data_before_the_reset() {
        let (mut app, local) = UnixStream::pair().unwrap();
        let (g, mut host) = guest_with_raw_host(local);
        host.write_all(&Frame::Open { id: 5, port: 1 }.encode())
            .unwrap();
        read_until(&mut host, |f| *f == Frame::OpenOk(5));
        // The local side reads no more (as a command's stream does once it
        // ended), then the host sends something anyway: a keepalive.
        app.shutdown(Shutdown::Read).unwrap();
        host.write_all(&Frame::Data(5, b"keepalive".to_vec()).encode())
            .unwrap();
        // Taken and dropped: credited, the stream kept.
        let seen = read_until(&mut host, |f| {
            matches!(f, Frame::Credit(5, _) | Frame::Rst(5))
        });
        assert_eq!(seen.last(), Some(&Frame::Credit(5, 9)), "{seen:?}");
        // What the local side still says reaches the host, then the end.
        app.write_all(b"exit status").unwrap();
        drop(app);
        let seen = read_until(&mut host, |f| *f == Frame::Rst(5));
        let for_five: Vec<&Frame> = seen
            .iter()
            .filter(|f| matches!(f, Frame::Data(5, _) | Frame::Shut(5) | Frame::Rst(5)))
            .collect();
        assert_eq!(
            for_five,
            [
                &Frame::Data(5, b"exit status".to_vec()),
                &Frame::Shut(5),
                &Frame::Rst(5)
            ]
        );
        assert_eq!(g.stream_count(), 0);
    }

    #[test]
    fn a_reader_that_starts_mid_frame_finds_the_next_whole_one() {
        let first = Frame::Data(9, b"lost half".to_vec()).encode();
        let mut stream = first[first.len() / 2..].to_vec();
        // What a new peer sends first: a bare zero, then its frames.
        stream.push(0);
        stream.extend(Frame::Hello(42).encode());
        assert_eq!(frames(&stream), vec![Frame::Hello(42)]);
        // A frame cut short anywhere and followed by another frame's zero
        // is dropped, never taken as a shorter frame of the same kind.
        let whole = Frame::Data(1, b"a\0b\0\0cdef".to_vec()).encode();
        for keep in 1..whole.len() - 1 {
            let mut cut = whole[..keep].to_vec();
            cut.push(0);
            cut.extend(Frame::Shut(2).encode());
            assert_eq!(frames(&cut), vec![Frame::Shut(2)], "cut after {keep} bytes");
        }
        // Overlong garbage is skipped to its end.
        let mut junk = vec![1u8; MAX_ENCODED + 10];
        junk.push(0);
        junk.extend(Frame::Rst(3).encode());
        assert_eq!(frames(&junk), vec![Frame::Rst(3)]);
    }
}
