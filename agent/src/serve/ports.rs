//! `GET /ports`: listening sockets from `/proc/net/{tcp,tcp6,udp,udp6}`,
//! mapped to processes through the socket inodes in `/proc/<pid>/fd`.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use banger_guest_protocol::api::{Listener, Proto};

/// TCP state `LISTEN` in /proc/net/tcp.
const TCP_LISTEN: u8 = 0x0A;

/// Listing sockets failed.
#[derive(Debug, thiserror::Error)]
pub enum PortsError {
    /// A /proc/net table could not be read.
    #[error("Cannot read {0}")]
    ReadTable(PathBuf, #[source] std::io::Error),
}

/// One socket row of a /proc/net table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Socket {
    address: IpAddr,
    port: u16,
    state: u8,
    inode: u64,
}

/// Every TCP listener and bound UDP socket, with its owning process when
/// one is visible under `proc`.
pub fn listeners(proc: &Path) -> Result<Vec<Listener>, PortsError> {
    let mut found = Vec::new();
    for (table, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        let path = proc.join("net").join(table);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6/udp6.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(PortsError::ReadTable(path, e)),
        };
        for s in parse_table(&text) {
            let wanted = match proto {
                Proto::Tcp => s.state == TCP_LISTEN,
                Proto::Udp => s.port != 0,
            };
            if wanted {
                found.push((proto, s));
            }
        }
    }
    let owners = socket_owners(proc);
    let mut out: Vec<Listener> = found
        .into_iter()
        .map(|(proto, s)| {
            let owner = owners.get(&s.inode);
            Listener {
                proto,
                address: s.address.to_string(),
                port: s.port,
                pid: owner.map(|o| o.0),
                process: owner.and_then(|o| o.1.clone()),
                command: owner.and_then(|o| o.2.clone()),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.port, &a.address).cmp(&(b.port, &b.address)));
    out.dedup();
    Ok(out)
}

/// Parses the rows of one /proc/net/{tcp,udp}[6] table; malformed rows are
/// skipped.
fn parse_table(text: &str) -> Vec<Socket> {
    text.lines().skip(1).filter_map(parse_row).collect()
}

fn parse_row(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local rem st queues tr retrnsmt uid timeout inode
    let (addr, port) = fields.get(1)?.split_once(':')?;
    let state = u8::from_str_radix(fields.get(3)?, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    Some(Socket {
        address: parse_addr(addr)?,
        port: u16::from_str_radix(port, 16).ok()?,
        state,
        inode,
    })
}

/// The kernel prints each 32-bit word of the address as a host-order
/// integer, so the bytes are the word's native-endian bytes.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
            Some(w.to_ne_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&bytes);
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Socket inode -> (pid, comm, cmdline), lowest pid first. Processes that
/// vanish or hide their fds are skipped.
fn socket_owners(proc: &Path) -> HashMap<u64, (u32, Option<String>, Option<String>)> {
    let mut pids: Vec<u32> = fs::read_dir(proc)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let mut owners = HashMap::new();
    for pid in pids {
        let dir = proc.join(pid.to_string());
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut process = None;
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let (comm, cmd) = process.get_or_insert_with(|| describe(&dir)).clone();
            owners.entry(inode).or_insert((pid, comm, cmd));
        }
    }
    owners
}

/// `comm` and the NUL-separated `cmdline` joined by spaces.
fn describe(dir: &Path) -> (Option<String>, Option<String>) {
    let comm = fs::read_to_string(dir.join("comm"))
        .ok()
        .map(|c| c.trim_end().to_string());
    let cmd = fs::read(dir.join("cmdline")).ok().and_then(|raw| {
        let parts: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    });
    (comm, cmd)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn finds_own_tcp_and_udp_listeners_in_real_proc() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp_port = tcp.local_addr().unwrap().port();
        let udp_port = udp.local_addr().unwrap().port();
        let all = listeners(Path::new("/proc")).unwrap();
        let me = std::process::id();
        let own_comm = fs::read_to_string("/proc/self/comm").unwrap();
        let exe = std::env::args().next().unwrap();
        for (proto, port) in [(Proto::Tcp, tcp_port), (Proto::Udp, udp_port)] {
            let l = all
                .iter()
                .find(|l| l.proto == proto && l.port == port)
                .unwrap_or_else(|| panic!("{proto:?} port {port} not listed in {all:?}"));
            assert_eq!(l.address, "127.0.0.1");
            assert_eq!(l.pid, Some(me));
            assert_eq!(l.process.as_deref(), Some(own_comm.trim_end()));
            assert!(l.command.as_deref().unwrap().starts_with(&exe));
        }
    }

    #[test]
    fn skips_tcp_sockets_that_are_not_listening() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let all = listeners(Path::new("/proc")).unwrap();
        assert!(!all.iter().any(|l| l.port == client_port));
    }

    #[test]
    fn parses_ipv6_rows() {
        let text = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0\n";
        let rows = parse_table(text);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].port, 22);
        assert_eq!(rows[0].inode, 4242);
        if cfg!(target_endian = "little") {
            assert_eq!(rows[0].address, "::1".parse::<IpAddr>().unwrap());
        }
    }
}
