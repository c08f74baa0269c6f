//! Guest networking over raw rtnetlink (no iproute2 in the guest, no async
//! runtime in the agent): link up with MTU, address with prefix, default
//! route. Requests carry `NLM_F_REPLACE` so applying twice is harmless.

use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};

use banger_guest_protocol::bundle::GuestNetwork;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

/// Configuring an interface failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address is not `IP/PREFIX`.
    #[error("Network address {0:?} is not IP/PREFIX (like 172.30.0.5/24)")]
    BadAddress(String),
    /// The gateway is not an IP address of the same family.
    #[error("Gateway {0:?} is not an IP address of the interface's family")]
    BadGateway(String),
    /// No such interface in the guest.
    #[error("No network interface {0} in the guest")]
    NoInterface(String, #[source] Errno),
    /// The netlink socket could not be opened.
    #[error("Cannot open a netlink socket")]
    Socket(#[source] Errno),
    /// The kernel refused a request.
    #[error("Cannot {0} on {1}")]
    Request(&'static str, String, #[source] Errno),
}

/// The guest interface name of the `index`-th `guest.network` entry: NICs
/// are attached in that order and the kernel names them eth0, eth1, ...
pub fn interface_name(index: usize) -> String {
    format!("eth{index}")
}

/// Brings `lo` up.
pub fn loopback_up() -> Result<(), NetError> {
    let nl = Netlink::open()?;
    let index = index_of("lo")?;
    nl.request(&link_up(index, None))
        .map_err(|e| NetError::Request("bring the link up", "lo".into(), e))
}

/// Applies `net` to interface `ifname`: MTU and up, address, default route.
pub fn configure(ifname: &str, net: &GuestNetwork) -> Result<(), NetError> {
    let (ip, prefix) = parse_cidr(&net.address)?;
    let gateway = match &net.gateway {
        Some(g) => match g.parse::<IpAddr>() {
            Ok(gw) if gw.is_ipv4() == ip.is_ipv4() => Some(gw),
            _ => return Err(NetError::BadGateway(g.clone())),
        },
        None => None,
    };
    let index = index_of(ifname)?;
    let nl = Netlink::open()?;
    let fail = |op| move |e| NetError::Request(op, ifname.to_string(), e);
    nl.request(&link_up(index, net.mtu))
        .map_err(fail("set MTU and bring the link up"))?;
    nl.request(&add_address(index, ip, prefix))
        .map_err(fail("add the address"))?;
    if let Some(gw) = gateway {
        nl.request(&default_route(index, gw))
            .map_err(fail("add the default route"))?;
    }
    Ok(())
}

/// A restored guest's new network identity on `ifname`: the MAC set, the
/// snapshot's address removed, then [`configure`] with the new one.
/// Returns what was done, for the answer.
pub fn reidentify(
    ifname: &str,
    mac: Option<&str>,
    previous: Option<&str>,
    net: Option<&GuestNetwork>,
) -> Result<Vec<String>, NetError> {
    let mut done = Vec::new();
    let index = index_of(ifname)?;
    let nl = Netlink::open()?;
    let fail = |op| move |e| NetError::Request(op, ifname.to_string(), e);
    if let Some(mac) = mac {
        let bytes = parse_mac(mac).ok_or_else(|| NetError::BadAddress(mac.to_string()))?;
        nl.request(&set_mac(index, &bytes))
            .map_err(fail("set the MAC address"))?;
        done.push("mac".to_string());
    }
    if let Some(prev) = previous {
        let (ip, prefix) = parse_cidr(prev)?;
        match nl.request(&del_address(index, ip, prefix)) {
            // Already gone is what we wanted.
            Ok(()) | Err(Errno::EADDRNOTAVAIL) => {}
            Err(e) => return Err(fail("remove the previous address")(e)),
        }
    }
    if let Some(net) = net {
        configure(ifname, net)?;
        done.push("address".to_string());
    }
    Ok(done)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn set_mac(index: u32, mac: &[u8; 6]) -> Message {
    let mut h = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    h.extend_from_slice(&index.to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    Message::new(libc::RTM_NEWLINK, 0, &h).attr(libc::IFLA_ADDRESS, mac)
}

fn del_address(index: u32, ip: IpAddr, prefix: u8) -> Message {
    let mut h = vec![family(ip), prefix, 0, libc::RT_SCOPE_UNIVERSE];
    h.extend_from_slice(&index.to_ne_bytes());
    Message::new(libc::RTM_DELADDR, 0, &h).attr(libc::IFA_LOCAL, &octets(ip))
}

fn parse_cidr(s: &str) -> Result<(IpAddr, u8), NetError> {
    let bad = || NetError::BadAddress(s.to_string());
    let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(bad());
    }
    Ok((ip, prefix))
}

fn index_of(ifname: &str) -> Result<u32, NetError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|e| NetError::NoInterface(ifname.into(), e))
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One netlink request: message type, flags, fixed header, attributes.
struct Message {
    kind: u16,
    flags: u16,
    body: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: i32, header: &[u8]) -> Message {
        Message {
            kind,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK | flags) as u16,
            body: header.to_vec(),
        }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Message {
        let len = 4 + data.len();
        self.body.extend_from_slice(&(len as u16).to_ne_bytes());
        self.body.extend_from_slice(&kind.to_ne_bytes());
        self.body.extend_from_slice(data);
        self.body.resize(self.body.len().div_ceil(4) * 4, 0);
        self
    }

    fn encode(&self, seq: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.body.len());
        out.extend_from_slice(&((16 + self.body.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&self.kind.to_ne_bytes());
        out.extend_from_slice(&self.flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

fn link_up(index: u32, mtu: Option<u32>) -> Message {
    // struct ifinfomsg: family, pad, type, index, flags, change.
    let mut h = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
    h.extend_from_slice(&index.to_ne_bytes());
    h.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    h.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    let m = Message::new(libc::RTM_NEWLINK, 0, &h);
    match mtu {
        Some(mtu) => m.attr(libc::IFLA_MTU, &mtu.to_ne_bytes()),
        None => m,
    }
}

fn add_address(index: u32, ip: IpAddr, prefix: u8) -> Message {
    // struct ifaddrmsg: family, prefixlen, flags, scope, index.
    let mut h = vec![family(ip), prefix, 0, libc::RT_SCOPE_UNIVERSE];
    h.extend_from_slice(&index.to_ne_bytes());
    Message::new(
        libc::RTM_NEWADDR,
        libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
        &h,
    )
    .attr(libc::IFA_LOCAL, &octets(ip))
    .attr(libc::IFA_ADDRESS, &octets(ip))
}

fn default_route(index: u32, gateway: IpAddr) -> Message {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags.
    let mut h = vec![
        family(gateway),
        0,
        0,
        0,
        libc::RT_TABLE_MAIN,
        libc::RTPROT_BOOT,
        libc::RT_SCOPE_UNIVERSE,
        libc::RTN_UNICAST,
    ];
    h.extend_from_slice(&0u32.to_ne_bytes());
    Message::new(
        libc::RTM_NEWROUTE,
        libc::NLM_F_CREATE | libc::NLM_F_REPLACE,
        &h,
    )
    .attr(libc::RTA_GATEWAY, &octets(gateway))
    .attr(libc::RTA_OIF, &index.to_ne_bytes())
}

/// A NETLINK_ROUTE socket talking to the kernel.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> Result<Netlink, NetError> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(NetError::Socket)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(NetError::Socket)?;
        Ok(Netlink { fd })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&self, msg: &Message) -> Result<(), Errno> {
        const SEQ: u32 = 1;
        send(self.fd.as_raw_fd(), &msg.encode(SEQ), MsgFlags::empty())?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut at = 0;
            while at + 16 <= n {
                let u32_at =
                    |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
                let len = u32_at(at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < 16 || at + len > n {
                    return Err(Errno::EBADMSG);
                }
                if kind == libc::NLMSG_ERROR as u16 && u32_at(at + 8) == SEQ && len >= 20 {
                    let code = u32_at(at + 16) as i32;
                    return if code == 0 {
                        Ok(())
                    } else {
                        Err(Errno::from_raw(-code))
                    };
                }
                at += len.div_ceil(4) * 4;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nix::sched::{CloneFlags, unshare};

    use super::*;

    #[test]
    fn rejects_malformed_addresses_and_gateways() {
        for a in ["172.30.0.5", "172.30.0.5/33", "nope/24", "::1/129"] {
            assert!(matches!(parse_cidr(a), Err(NetError::BadAddress(_))), "{a}");
        }
        assert_eq!(
            parse_cidr("10.0.0.2/8").unwrap(),
            ("10.0.0.2".parse().unwrap(), 8)
        );
        let net = GuestNetwork {
            nic_id: "n".into(),
            address: "10.0.0.2/8".into(),
            gateway: Some("fe80::1".into()),
            mtu: None,
            nameservers: vec![],
        };
        assert!(matches!(
            configure("lo", &net),
            Err(NetError::BadGateway(_))
        ));
    }

    fn ip_json(args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip").arg("-j").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    #[test]
    fn applies_address_mtu_and_default_route_in_a_fresh_netns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED applies_address_mtu_and_default_route_in_a_fresh_netns: needs root");
            return;
        }
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIPPED applies_address_mtu_and_default_route_in_a_fresh_netns: no ip");
            return;
        }
        // The namespace belongs to this thread only; it dies with it.
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            // veth, not dummy: the dummy module is often absent. The peer
            // is brought up so eth7 has carrier.
            for setup in [
                &[
                    "link", "add", "eth7", "type", "veth", "peer", "name", "peer7",
                ][..],
                &["link", "set", "peer7", "up"],
            ] {
                assert!(Command::new("ip").args(setup).status().unwrap().success());
            }
            let net = GuestNetwork {
                nic_id: "net0".into(),
                address: "172.30.0.5/24".into(),
                gateway: Some("172.30.0.1".into()),
                mtu: Some(1400),
                nameservers: vec![],
            };
            loopback_up().unwrap();
            configure("eth7", &net).unwrap();
            // Twice: boot retries must not fail on existing state.
            configure("eth7", &net).unwrap();

            let link = &ip_json(&["addr", "show", "dev", "eth7"])[0];
            assert_eq!(link["mtu"], 1400);
            assert!(link["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
            let addrs: Vec<(String, u64)> = link["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["family"] == "inet")
                .map(|a| {
                    (
                        a["local"].as_str().unwrap().to_string(),
                        a["prefixlen"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(addrs, [("172.30.0.5".to_string(), 24)]);
            let routes = ip_json(&["route", "show", "default"]);
            assert_eq!(routes[0]["gateway"], "172.30.0.1");
            assert_eq!(routes[0]["dev"], "eth7");
            let lo = &ip_json(&["link", "show", "dev", "lo"])[0];
            assert!(lo["flags"].as_array().unwrap().iter().any(|f| f == "UP"));
            assert!(matches!(
                configure("eth9", &net),
                Err(NetError::NoInterface(..))
            ));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn reidentify_swaps_mac_and_address_in_a_fresh_netns() {
        if !nix::unistd::geteuid().is_root() || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIP reidentify_swaps_mac_and_address_in_a_fresh_netns: needs root and ip");
            return;
        }
        std::thread::spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET).unwrap();
            for setup in [
                &["link", "add", "p5", "type", "veth", "peer", "name", "eth5"][..],
                &["link", "set", "p5", "up"],
            ] {
                assert!(Command::new("ip").args(setup).status().unwrap().success());
            }
            let net = |address: &str| GuestNetwork {
                nic_id: "n".into(),
                address: address.into(),
                gateway: Some("172.30.0.1".into()),
                mtu: None,
                nameservers: vec![],
            };
            // The snapshot's identity, as the boot applied it.
            configure("eth5", &net("172.30.0.5/24")).unwrap();
            let done = reidentify(
                "eth5",
                Some("06:00:ac:1e:00:09"),
                Some("172.30.0.5/24"),
                Some(&net("172.30.0.9/24")),
            )
            .unwrap();
            assert_eq!(done, ["mac", "address"]);
            let link = &ip_json(&["addr", "show", "dev", "eth5"])[0];
            assert_eq!(link["address"], "06:00:ac:1e:00:09");
            let addrs: Vec<&str> = link["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["family"] == "inet")
                .map(|a| a["local"].as_str().unwrap())
                .collect();
            assert_eq!(addrs, ["172.30.0.9"], "the old address is gone");
            let routes = ip_json(&["route", "show", "default"]);
            assert_eq!(routes[0]["gateway"], "172.30.0.1");
            // Twice is harmless: the old address is already gone.
            reidentify("eth5", None, Some("172.30.0.5/24"), None).unwrap();
            assert!(matches!(
                reidentify("eth5", Some("zz:00"), None, None),
                Err(NetError::BadAddress(_))
            ));
        })
        .join()
        .unwrap();
    }
}
