//! The `.vm` DNS server's sockets on the bridge address, port 53, bound
//! here for a daemon that may not bind a port below 1024 itself
//! ([`HostOps::bind_dns`](super::HostOps::bind_dns)).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::OwnedFd;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::error::HostOpsError;

/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// A bound UDP socket and a listening TCP socket on one address.
#[derive(Debug)]
pub struct DnsSockets {
    /// Bound, for queries over UDP.
    pub udp: UdpSocket,
    /// Bound and listening, for queries over TCP.
    pub tcp: TcpListener,
}

impl DnsSockets {
    /// The two received descriptors, checked to be an IPv4 UDP socket and
    /// a listening TCP socket on the same address.
    pub fn from_fds(udp: OwnedFd, tcp: OwnedFd) -> std::io::Result<Self> {
        let kind = |fd: &OwnedFd| nix::sys::socket::getsockopt(fd, sockopt::SockType);
        if kind(&udp)? != SockType::Datagram || kind(&tcp)? != SockType::Stream {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the descriptors are not a UDP and a TCP socket",
            ));
        }
        let s = DnsSockets {
            udp: UdpSocket::from(udp),
            tcp: TcpListener::from(tcp),
        };
        if s.udp.local_addr()? != s.tcp.local_addr()? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the UDP and TCP sockets are bound to different addresses",
            ));
        }
        Ok(s)
    }
}

/// Binds UDP and TCP on `addr:port` with `IP_FREEBIND` (the bridge may
/// not exist yet), TCP listening. Port 0 takes a free UDP port and the
/// same TCP port (tests).
pub fn bind_dns_sockets(addr: Ipv4Addr, port: u16) -> Result<DnsSockets, HostOpsError> {
    let mut target = SocketAddrV4::new(addr, port);
    let fail = |target: SocketAddrV4| {
        move |source: nix::Error| HostOpsError::Failed {
            op: "bind_dns",
            target: target.to_string(),
            source: source.into(),
        }
    };
    let one = |kind: SockType, target: SocketAddrV4| -> Result<OwnedFd, HostOpsError> {
        let fail = fail(target);
        let fd = socket(AddressFamily::Inet, kind, SockFlag::SOCK_CLOEXEC, None).map_err(fail)?;
        setsockopt(&fd, sockopt::IpFreebind, &true).map_err(fail)?;
        if kind == SockType::Stream {
            setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail)?;
        }
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::from(target),
        )
        .map_err(fail)?;
        Ok(fd)
    };
    let udp = UdpSocket::from(one(SockType::Datagram, target)?);
    if let Ok(SocketAddr::V4(bound)) = udp.local_addr() {
        target = bound;
    }
    let tcp = one(SockType::Stream, target)?;
    listen(&tcp, Backlog::new(64).map_err(fail(target))?).map_err(fail(target))?;
    Ok(DnsSockets {
        udp,
        tcp: TcpListener::from(tcp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_udp_and_a_listening_tcp_socket_on_an_address_the_host_lacks() {
        // TEST-NET-1 is on no interface: IP_FREEBIND lets it bind anyway.
        let addr: Ipv4Addr = "192.0.2.53".parse().unwrap();
        let s = bind_dns_sockets(addr, 0).unwrap();
        let bound = s.udp.local_addr().unwrap();
        assert_eq!(bound.ip(), addr);
        assert_ne!(bound.port(), 0);
        let again = DnsSockets::from_fds(OwnedFd::from(s.udp), OwnedFd::from(s.tcp)).unwrap();
        assert_eq!(again.tcp.local_addr().unwrap(), bound);
    }

    #[test]
    fn a_udp_and_tcp_pair_on_different_ports_is_refused() {
        let a = bind_dns_sockets(Ipv4Addr::LOCALHOST, 0).unwrap();
        let b = bind_dns_sockets(Ipv4Addr::LOCALHOST, 0).unwrap();
        let err = DnsSockets::from_fds(OwnedFd::from(a.udp), OwnedFd::from(b.tcp)).unwrap_err();
        assert!(err.to_string().contains("different addresses"), "{err}");
    }

    #[test]
    fn descriptors_of_the_wrong_kind_are_refused() {
        let tcp = bind_dns_sockets(Ipv4Addr::LOCALHOST, 0).unwrap().tcp;
        let tcp2 = bind_dns_sockets(Ipv4Addr::LOCALHOST, 0).unwrap().tcp;
        let err = DnsSockets::from_fds(OwnedFd::from(tcp), OwnedFd::from(tcp2)).unwrap_err();
        assert!(err.to_string().contains("not a UDP and a TCP"), "{err}");
    }
}
