//! Who holds a local UDP address. The `.vm` DNS server's addresses (the
//! loopback port, the bridge address on port 53) may be taken by another
//! process, most often another banger daemon; the daemon's warning and
//! `banger doctor` name it. Read from `/proc/net/udp` (the caller's network
//! namespace) and `/proc/PID/fd`.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid; `None` when no visible process has the socket open (another
    /// user's process, without the right to read its fds).
    pub pid: Option<u32>,
    /// Its command name (`/proc/PID/comm`).
    pub command: Option<String>,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.command) {
            (Some(pid), Some(c)) => write!(f, "pid {pid} ({c})"),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => f.write_str("a process this user cannot see"),
        }
    }
}

/// The holders of UDP sockets bound to `addr`, or to the wildcard address
/// on its port (which takes it too), in this network namespace. Empty when
/// the address is free (or `/proc` cannot be read).
pub fn udp_holders(addr: SocketAddrV4) -> Vec<Holder> {
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let inodes = inodes_bound_to(&table, addr);
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<(u64, u32)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        for inode in sockets_of(&entry.path()) {
            if inodes.contains(&inode) && !found.iter().any(|&(i, p)| i == inode && p == pid) {
                found.push((inode, pid));
            }
        }
    }
    inodes
        .iter()
        .flat_map(|inode| {
            let pids: Vec<u32> = found
                .iter()
                .filter(|(i, _)| i == inode)
                .map(|&(_, p)| p)
                .collect();
            if pids.is_empty() {
                vec![Holder {
                    pid: None,
                    command: None,
                }]
            } else {
                pids.into_iter()
                    .map(|pid| Holder {
                        pid: Some(pid),
                        command: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .ok()
                            .map(|c| c.trim().to_string()),
                    })
                    .collect()
            }
        })
        .collect()
}

/// The socket inodes in a `/proc/net/udp` table bound to `addr` or to
/// `0.0.0.0` on its port.
fn inodes_bound_to(table: &str, addr: SocketAddrV4) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
            continue;
        };
        let Some((ip, port)) = local.split_once(':') else {
            continue;
        };
        let (Ok(ip), Ok(port), Ok(inode)) = (
            u32::from_str_radix(ip, 16),
            u16::from_str_radix(port, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        // The kernel prints the address as the native-endian value of its
        // network-order bytes.
        let ip = Ipv4Addr::from(ip.to_ne_bytes());
        if port == addr.port() && (ip == *addr.ip() || ip.is_unspecified()) && inode != 0 {
            out.push(inode);
        }
    }
    out
}

/// The socket inodes `/proc/PID` has open.
fn sockets_of(proc_pid: &Path) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(proc_pid.join("fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_process_holding_a_loopback_port_and_nobody_on_a_free_one() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = sock.local_addr().unwrap() else {
            panic!("bound an IPv4 address");
        };
        let holders = udp_holders(addr);
        assert_eq!(
            holders,
            vec![Holder {
                pid: Some(std::process::id()),
                command: std::fs::read_to_string("/proc/self/comm")
                    .ok()
                    .map(|c| c.trim().to_string()),
            }]
        );
        assert!(
            holders[0]
                .to_string()
                .starts_with(&format!("pid {} (", std::process::id()))
        );
        drop(sock);
        assert_eq!(udp_holders(addr), vec![], "free once closed");
    }

    #[test]
    fn a_wildcard_socket_holds_every_address_on_its_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            1: 00000000:CF7D 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 111 2 0\n\
            2: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 222 2 0\n";
        let loopback = Ipv4Addr::LOCALHOST;
        assert_eq!(
            inodes_bound_to(table, SocketAddrV4::new(loopback, 53117)),
            [111]
        );
        assert_eq!(
            inodes_bound_to(table, SocketAddrV4::new(loopback, 53)),
            [222]
        );
        let other = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(
            inodes_bound_to(table, SocketAddrV4::new(other, 53)),
            Vec::<u64>::new()
        );
    }
}
