//! `banger-agent bridge`: the host end of the agent's virtio-serial
//! transport, run by the QEMU backend in place of vhost-device-vsock.
//!
//! It listens on `--mux` for QEMU's chardev (the guest's port) and on
//! `--uds` for the same hybrid-vsock protocol Firecracker and
//! vhost-device-vsock serve: a client connects, sends `CONNECT <port>\n`,
//! gets `OK <n>\n` and then talks to the guest's port. A stream the guest
//! opens to port P is connected to `<uds>_P`. So the daemon reaches the
//! agent the same way over either transport. It exits when QEMU closes the
//! chardev.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mux::{Mux, Role};

/// How long a client may take to send its `CONNECT` line.
const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to accept a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the bridge serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The socket QEMU's chardev connects to.
    pub mux: PathBuf,
    /// The hybrid-vsock socket host clients connect to.
    pub uds: PathBuf,
    /// Start a session at once: the guest was restored from a snapshot and
    /// will not say hello.
    pub resync: bool,
}

/// Serves until QEMU closes its end.
pub fn run(opts: &Options) -> io::Result<()> {
    let mux_listener = bind(&opts.mux)?;
    let uds_listener = bind(&opts.uds)?;
    let (qemu, _) = mux_listener.accept()?;
    drop(mux_listener);
    let _ = std::fs::remove_file(&opts.mux);
    let writer = qemu.try_clone()?;
    let uds = opts.uds.clone();
    let mux = Mux::start(
        Role::Host,
        writer,
        Box::new(move |port| UnixStream::connect(guest_opened(&uds, port))),
    );
    if opts.resync {
        mux.hello();
    }
    let clients = mux.clone();
    std::thread::spawn(move || {
        for conn in uds_listener.incoming().flatten() {
            let mux = clients.clone();
            std::thread::spawn(move || client(&mux, conn));
        }
    });
    let ended = mux.read_loop(qemu);
    let _ = std::fs::remove_file(&opts.uds);
    ended
}

/// Where a stream the guest opens to `port` is connected:
/// `<uds>_<port>`, as Firecracker does.
pub fn guest_opened(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

fn bind(path: &Path) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// One hybrid-vsock client: its `CONNECT` line, then the stream. A client
/// that comes before the session (a guest still booting, or restored and
/// not yet through its hello) waits for it rather than being turned away
/// to retry: answering the moment the guest can is what makes a restore
/// fast. Refused (closed without `OK`) when no session comes within
/// [`OPEN_TIMEOUT`] or the guest does not accept.
fn client(mux: &Mux, mut conn: UnixStream) {
    let Some(port) = connect_line(&mut conn) else {
        return;
    };
    if !mux.wait_ready(OPEN_TIMEOUT) {
        return;
    }
    let Ok(local) = conn.try_clone() else { return };
    let _ = conn.set_read_timeout(None);
    let _ = mux.open_on(port, OPEN_TIMEOUT, local, format!("OK {port}\n").as_bytes());
}

/// Reads `CONNECT <port>\n` a byte at a time (what follows is the stream's).
fn connect_line(conn: &mut UnixStream) -> Option<u32> {
    conn.set_read_timeout(Some(CONNECT_LINE_TIMEOUT)).ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        conn.read_exact(&mut b).ok()?;
        if b[0] == b'\n' {
            let text = String::from_utf8(line).ok()?;
            return text.trim_end().strip_prefix("CONNECT ")?.parse().ok();
        }
        line.push(b[0]);
    }
    let _ = conn.write_all(b"bad CONNECT line\n");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::mpsc;

    /// A guest end over `pipe`: port 1024 echoes upper-cased, others refuse.
    fn guest(pipe: UnixStream) -> Mux {
        let writer = pipe.try_clone().unwrap();
        let mux = Mux::start(
            Role::Guest,
            writer,
            Box::new(|port| {
                if port != 1024 {
                    return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
                }
                let (mine, theirs) = UnixStream::pair()?;
                std::thread::spawn(move || {
                    let mut r = mine.try_clone().unwrap();
                    let mut w = mine;
                    let mut buf = [0u8; 8192];
                    loop {
                        match r.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let up = buf[..n].to_ascii_uppercase();
                                if w.write_all(&up).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Write);
                });
                Ok(theirs)
            }),
        );
        let reader = mux.clone();
        std::thread::spawn(move || {
            let _ = reader.read_loop(pipe);
            reader.disconnected();
        });
        mux
    }

    fn start_bridge(dir: &Path, resync: bool) -> (Options, mpsc::Receiver<io::Result<()>>) {
        let opts = Options {
            mux: dir.join("mux"),
            uds: dir.join("v.sock"),
            resync,
        };
        let (tx, rx) = mpsc::channel();
        let o = opts.clone();
        std::thread::spawn(move || tx.send(run(&o)));
        test_wait(|| opts.mux.exists() && opts.uds.exists());
        (opts, rx)
    }

    /// Polls `cond` for up to 10 s (the bridge binds on its own thread).
    fn test_wait(cond: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `CONNECT port` through the bridge; the `OK` line, or `None` when the
    /// bridge closed the connection instead.
    fn connect(uds: &Path, port: u32) -> (UnixStream, Option<String>) {
        let mut s = UnixStream::connect(uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        writeln!(s, "CONNECT {port}").unwrap();
        let mut line = String::new();
        let mut r = BufReader::new(s.try_clone().unwrap());
        r.read_line(&mut line).unwrap();
        (s, (!line.is_empty()).then_some(line))
    }

    fn echo_round_trip(s: &mut UnixStream, payload: &[u8]) -> Vec<u8> {
        let mut w = s.try_clone().unwrap();
        let data = payload.to_vec();
        let writer = std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        got
    }

    #[test]
    fn streams_go_both_ways_through_the_bridge_and_a_big_one_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (opts, done) = start_bridge(dir.path(), false);
        let qemu = UnixStream::connect(&opts.mux).unwrap();
        let g = guest(qemu.try_clone().unwrap());
        // A client that comes before the session waits for it, and is
        // answered once the guest said hello.
        let mut early = UnixStream::connect(&opts.uds).unwrap();
        early
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        writeln!(early, "CONNECT 1024").unwrap();
        g.hello();
        let mut line = String::new();
        BufReader::new(early).read_line(&mut line).unwrap();
        assert_eq!(line, "OK 1024\n");

        let (mut s, ok) = connect(&opts.uds, 1024);
        assert_eq!(ok.as_deref(), Some("OK 1024\n"));
        // Several windows' worth, so credit has to flow back.
        let big: Vec<u8> = (0..3 * crate::mux::WINDOW as usize + 12345)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let got = echo_round_trip(&mut s, &big);
        assert_eq!(got.len(), big.len());
        assert!(
            got == big.to_ascii_uppercase(),
            "the bytes changed on the way"
        );

        // Nothing listens on 7 in the guest: refused without OK.
        assert_eq!(connect(&opts.uds, 7).1, None);

        // The guest opens a stream to the host: it lands on <uds>_5000.
        let listener = UnixListener::bind(guest_opened(&opts.uds, 5000)).unwrap();
        let mut from_guest = g.open(5000, Duration::from_secs(10)).unwrap();
        from_guest.write_all(b"READY 1\n").unwrap();
        drop(from_guest);
        let (mut accepted, _) = listener.accept().unwrap();
        let mut line = String::new();
        accepted.read_to_string(&mut line).unwrap();
        assert_eq!(line, "READY 1\n");
        // To a port nobody listens on: refused.
        assert!(g.open(5001, Duration::from_secs(10)).is_err());

        // QEMU goes away: the bridge ends and removes its socket.
        qemu.shutdown(std::net::Shutdown::Both).unwrap();
        done.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert!(!opts.uds.exists());
    }

    #[test]
    fn a_restored_guest_gets_a_new_session_from_a_new_bridge_and_drops_old_streams() {
        let dir = tempfile::tempdir().unwrap();
        // The guest's port, relayed so the bridge behind it can change
        // while the guest keeps its state, as across a snapshot restore.
        let (guest_pipe, relay) = UnixStream::pair().unwrap();
        let g = guest(guest_pipe);
        let (first, _done1) = start_bridge(&dir.path().join("1").tap_mkdir(), false);
        let to_first = UnixStream::connect(&first.mux).unwrap();
        let relays = relay_both(&relay, &to_first);
        g.hello();
        let (mut old, ok) = connect(&first.uds, 1024);
        assert!(ok.is_some());
        old.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        old.read_exact(&mut b).unwrap();
        test_wait(|| g.stream_count() == 1);

        // Cut the first bridge off, half a frame into the pipe towards the
        // guest, and put a new one (--resync) behind the same guest port.
        relays.stop();
        let mut half = crate::mux::Frame::Data(1, b"half a frame".to_vec()).encode();
        half.truncate(7);
        (&relay).write_all(&half).unwrap();
        let (second, _done2) = start_bridge(&dir.path().join("2").tap_mkdir(), true);
        let to_second = UnixStream::connect(&second.mux).unwrap();
        let _relays2 = relay_both(&relay, &to_second);

        // The guest dropped the stream it had; the new bridge serves.
        test_wait(|| g.stream_count() == 0);
        let (mut s, ok) = connect(&second.uds, 1024);
        assert!(ok.is_some());
        assert_eq!(echo_round_trip(&mut s, b"after restore"), b"AFTER RESTORE");
    }

    trait TapMkdir {
        fn tap_mkdir(self) -> PathBuf;
    }
    impl TapMkdir for PathBuf {
        fn tap_mkdir(self) -> PathBuf {
            std::fs::create_dir_all(&self).unwrap();
            self
        }
    }

    /// Copies between the guest's pipe `a` and a bridge's `b` both ways
    /// until stopped; `a` lives on.
    struct Relay {
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
        b: UnixStream,
        a_to_b: Option<std::thread::JoinHandle<()>>,
    }

    impl Relay {
        /// Cuts `b` off; returns once nothing reads `a` for it any more.
        fn stop(mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = self.b.shutdown(std::net::Shutdown::Both);
            if let Some(t) = self.a_to_b.take() {
                t.join().unwrap();
            }
        }
    }

    fn relay_both(a: &UnixStream, b: &UnixStream) -> Relay {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The copy from `a` reads with a timeout so it notices the stop.
        let (mut ar, mut bw) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        ar.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let s = stop.clone();
        let a_to_b = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match ar.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if bw.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
        });
        let (mut br, mut aw) = (b.try_clone().unwrap(), a.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = br.read(&mut buf) {
                if n == 0 || aw.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        Relay {
            stop,
            b: b.try_clone().unwrap(),
            a_to_b: Some(a_to_b),
        }
    }
}
