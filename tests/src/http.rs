//! A loopback HTTP server for catalog pulls (kernels, image bundles), and the
//! `.tar.zst` bundles it serves, including hostile ones: entry names and link
//! targets are written into raw tar headers byte for byte, so names the tar
//! crate's builder would refuse (`../evil`, `/abs`) can be made.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

/// How the server answers one path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this body.
    Body(Vec<u8>),
    /// Promise `claimed` bytes, send `body`, close.
    Truncated {
        /// What is sent.
        body: Vec<u8>,
        /// The Content-Length promised.
        claimed: usize,
    },
    /// Send the headers and `body` (part of `claimed`), then hang until the
    /// client goes away.
    Stall {
        /// What is sent.
        body: Vec<u8>,
        /// The Content-Length promised.
        claimed: usize,
    },
}

/// An HTTP/1.1 server on `127.0.0.1`, one thread per connection, answering
/// 404 for every path without a route. It lives as long as the test process.
#[derive(Debug)]
pub struct Server {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base: String,
    routes: Arc<Mutex<HashMap<String, Reply>>>,
}

impl Server {
    /// Binds a free port and starts serving.
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
        let shared = Arc::clone(&routes);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let routes = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve(conn, &routes);
                });
            }
        });
        Server { base, routes }
    }

    /// Answers `path` (starting with `/`) with `reply` from now on.
    pub fn route(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }
}

fn serve(mut conn: TcpStream, routes: &Mutex<HashMap<String, Reply>>) -> io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&req)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let reply = routes.lock().unwrap().get(&path).cloned();
    let head = |status: &str, len: usize| {
        format!("HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    match reply {
        None => conn.write_all(head("404 Not Found", 0).as_bytes())?,
        Some(Reply::Body(body)) => {
            conn.write_all(head("200 OK", body.len()).as_bytes())?;
            conn.write_all(&body)?;
        }
        Some(Reply::Truncated { body, claimed }) => {
            conn.write_all(head("200 OK", claimed).as_bytes())?;
            conn.write_all(&body)?;
        }
        Some(Reply::Stall { body, claimed }) => {
            conn.write_all(head("200 OK", claimed).as_bytes())?;
            conn.write_all(&body)?;
            conn.flush()?;
            // Returns once the client drops the connection.
            while conn.read(&mut buf)? > 0 {}
        }
    }
    Ok(())
}

/// One tar entry of a test bundle.
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    /// A regular file with this content.
    File(&'a str, &'a [u8]),
    /// A symlink to this target.
    Sym(&'a str, &'a str),
    /// A directory.
    Dir(&'a str),
}

/// A raw header with `name` and `link` written byte for byte.
fn header(name: &str, kind: tar::EntryType, size: u64, link: &str) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
    h.set_cksum();
    h
}

/// A zstd-compressed tarball of `entries`, in order.
pub fn tar_zst(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            Entry::File(n, data) => {
                let h = header(n, tar::EntryType::Regular, data.len() as u64, "");
                b.append(&h, *data).unwrap();
            }
            Entry::Sym(n, t) => {
                let h = header(n, tar::EntryType::Symlink, 0, t);
                b.append(&h, io::empty()).unwrap();
            }
            Entry::Dir(n) => {
                let h = header(n, tar::EntryType::Directory, 0, "");
                b.append(&h, io::empty()).unwrap();
            }
        }
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

/// Lowercase hex sha256 of `data`.
pub fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Incompressible bytes, so a bundle stays as large as its content.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
