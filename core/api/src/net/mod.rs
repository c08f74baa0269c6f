//! IPv4 subnets and MAC addresses for VM leases, upstream DNS server
//! addresses and interface names: the network vocabulary the config, the
//! store and the host operations share.

pub mod holder;
pub mod identity;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IPv4 subnet the bridge serves, e.g. `172.30.0.0/24`. The gateway (the
/// bridge's own address) is the first host; VMs get the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// A subnet string that does not parse or leaves no room for VMs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid subnet {0:?}: use an IPv4 network in CIDR form with a prefix from /8 to /30, e.g. \"172.30.0.0/24\""
)]
pub struct InvalidSubnet(pub String);

impl Subnet {
    /// `172.30.0.0/24`, the default bridge subnet.
    pub const DEFAULT: Subnet = Subnet {
        network: Ipv4Addr::new(172, 30, 0, 0),
        prefix: 24,
    };

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The bridge's address: the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses VMs may lease: every host but the gateway, in order.
    pub fn vm_hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        // Skip network, gateway and broadcast.
        (base + 2..base + size - 1).map(Ipv4Addr::from)
    }

    /// Whether `ip` is a leasable VM address in this subnet.
    pub fn contains_vm_host(&self, ip: Ipv4Addr) -> bool {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        let v = u32::from(ip);
        v >= base + 2 && v < base + size - 1
    }
}

impl FromStr for Subnet {
    type Err = InvalidSubnet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidSubnet(s.to_string());
        let (ip, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(ip) & !mask != 0 {
            // "172.30.0.5/24" is a host, not a network; say so rather than guess.
            return Err(bad());
        }
        Ok(Subnet {
            network: ip,
            prefix,
        })
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A guest NIC's MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The VM's MAC for `ip`: locally administered, unicast `06:00` followed
    /// by the four address bytes, so it is unique exactly when the IP is and
    /// can be read back into the IP when debugging.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        MacAddr([0x06, 0x00, o[0], o[1], o[2], o[3]])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// A MAC string that is not six colon-separated hex bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid MAC address {0:?}")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(|| InvalidMac(s.to_string()))?;
            if p.len() != 2 {
                return Err(InvalidMac(s.to_string()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| InvalidMac(s.to_string()))?;
        }
        if parts.next().is_some() {
            return Err(InvalidMac(s.to_string()));
        }
        Ok(MacAddr(out))
    }
}

impl From<MacAddr> for String {
    fn from(m: MacAddr) -> String {
        m.to_string()
    }
}

impl TryFrom<String> for MacAddr {
    type Error = InvalidMac;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Parses one upstream server, `IP` or `IP:PORT` (IPv6 as `[IP]:PORT`);
/// the port defaults to 53.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| {
            format!(
                "{s:?} is not an upstream DNS server; write an IP address with an optional port, e.g. \"192.168.1.1\", \"127.0.0.1:5353\" or \"[2001:db8::1]:53\""
            )
        })
}

/// An IPv4 network in CIDR form (`10.1.0.0/16`, `192.0.2.7/32`), as a VM's
/// NAT allow list takes it. Unlike [`Subnet`], any prefix from /0 to /32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

/// A CIDR string that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid network {0:?}: use an IPv4 network in CIDR form with its host bits zero, e.g. \"10.1.0.0/16\" or \"192.0.2.7/32\""
)]
pub struct InvalidCidr(pub String);

impl Cidr {
    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length (0-32).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn mask(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    /// The network `addr/prefix` lies in.
    pub fn containing(addr: Ipv4Addr, prefix: u8) -> Cidr {
        let prefix = prefix.min(32);
        Cidr {
            network: Ipv4Addr::from(u32::from(addr) & Self::mask(prefix)),
            prefix,
        }
    }

    /// Whether `ip` is inside.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix) == u32::from(self.network)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = InvalidCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidCidr(s.to_string());
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let cidr = Cidr::containing(addr, prefix);
        if cidr.network != addr {
            return Err(bad());
        }
        Ok(cidr)
    }
}

/// The prefix of taps plugins may create and delete (a daemon's own tap
/// pool uses its own prefix, so the two never collide).
pub const PLUGIN_TAP_PREFIX: &str = "bgp";

/// Whether `name` is a valid Linux interface name: 1-15 bytes of
/// `[A-Za-z0-9._-]`, and not `.` or `..`.
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_hosts_skip_network_gateway_and_broadcast() {
        let s: Subnet = "10.1.2.0/29".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        let hosts: Vec<String> = s.vm_hosts().map(|h| h.to_string()).collect();
        assert_eq!(
            hosts,
            ["10.1.2.2", "10.1.2.3", "10.1.2.4", "10.1.2.5", "10.1.2.6"]
        );
        assert!(s.contains_vm_host(Ipv4Addr::new(10, 1, 2, 6)));
        assert!(!s.contains_vm_host(Ipv4Addr::new(10, 1, 2, 7)));
        assert!(!s.contains_vm_host(Ipv4Addr::new(10, 1, 2, 1)));
    }

    #[test]
    fn rejects_subnets_that_are_hosts_or_too_small() {
        for bad in [
            "172.30.0.5/24",
            "172.30.0.0",
            "172.30.0.0/31",
            "x/24",
            "10.0.0.0/4",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        assert_eq!(
            "172.30.0.0/24".parse::<Subnet>().unwrap().to_string(),
            "172.30.0.0/24"
        );
    }

    #[test]
    fn mac_round_trips_and_encodes_the_ip() {
        let m = MacAddr::for_ip(Ipv4Addr::new(172, 30, 0, 17));
        assert_eq!(m.to_string(), "06:00:ac:1e:00:11");
        assert_eq!("06:00:ac:1e:00:11".parse::<MacAddr>().unwrap(), m);
        assert!("06:00:ac:1e:00".parse::<MacAddr>().is_err());
        assert!("06:00:ac:1e:00:11:22".parse::<MacAddr>().is_err());
    }

    #[test]
    fn upstreams_parse_with_the_default_port_and_bad_ones_say_how() {
        let p = |s: &str| parse_upstream(s).map(|a| a.to_string());
        assert_eq!(p("192.0.2.1"), Ok("192.0.2.1:53".to_string()));
        assert_eq!(p("127.0.0.1:5353"), Ok("127.0.0.1:5353".to_string()));
        assert_eq!(p("2001:db8::1"), Ok("[2001:db8::1]:53".to_string()));
        assert_eq!(p("[2001:db8::1]:54"), Ok("[2001:db8::1]:54".to_string()));
        let e = p("dns.example:53").unwrap_err();
        assert!(
            e.contains("\"dns.example:53\"") && e.contains("e.g."),
            "{e}"
        );
    }
}
