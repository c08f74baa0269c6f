//! Privileged host operations behind one interface. Capabilities never touch
//! the host's network configuration directly: they ask `HostOps`, which runs
//! in-process when the daemon has the rights and (later) through the narrow
//! `banger-helper` RPC when it does not. A recording implementation lets
//! capability code be tested without root.

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use banger_plugin_abi::wire::{self, HostCall, HostReply, WIRE_VERSION};
pub use banger_plugin_abi::wire::{BoundDevice, PciAddress};

pub use crate::error::{HostOpsError, validate_ifname};
pub use crate::net::nft::{Cidr, GuestPort, InvalidCidr};

pub mod dns_sockets;
#[cfg(any(test, feature = "fake-sysfs"))]
pub mod fake_sysfs;
pub mod fd_passing;
pub mod vfio;

pub use dns_sockets::{DNS_PORT, DnsSockets};

/// The privileged operations capabilities may ask for.
pub trait HostOps: Send + Sync + fmt::Debug {
    /// These operations as a handle that outlives the call, for host work
    /// a capability starts in one hook and waits for in a later one (the
    /// network's guard rules, issue 12). `None`, the default, has such work
    /// done in the hook that starts it.
    fn shared(&self) -> Option<Arc<dyn HostOps>> {
        None
    }

    /// Creates a persistent tap device owned by `owner_uid` (idempotent).
    fn create_tap(&self, name: &str, owner_uid: u32) -> Result<(), HostOpsError>;
    /// Deletes a tap device; a missing device is not an error.
    fn delete_tap(&self, name: &str) -> Result<(), HostOpsError>;

    /// Creates bridge `name` if missing, gives it `addr/prefix` if it lacks
    /// it, and brings it up (idempotent).
    fn ensure_bridge(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), HostOpsError> {
        let _ = (addr, prefix);
        Err(unsupported("ensure_bridge", name))
    }

    /// Enslaves `link` (a tap) to `bridge`.
    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), HostOpsError> {
        let _ = bridge;
        Err(unsupported("attach_to_bridge", link))
    }

    /// Brings `link` up.
    fn set_link_up(&self, link: &str) -> Result<(), HostOpsError> {
        Err(unsupported("set_link_up", link))
    }

    /// Deletes any link (bridge, tap, veth); a missing link is not an error.
    fn delete_link(&self, link: &str) -> Result<(), HostOpsError> {
        Err(unsupported("delete_link", link))
    }

    /// Lets the VM at `ip` behind `bridge` reach the outside, masqueraded,
    /// with rules tagged by `vm_id` in the bridge's own nftables tables
    /// (`banger_<bridge>`, see [`crate::net::nft`]), except private,
    /// link-local, loopback, CGNAT and multicast destinations and the host's
    /// other bridges. Replaces that VM's earlier rules, so it is idempotent;
    /// turns `ip_forward` on if it was off.
    fn add_nat(&self, vm_id: &str, bridge: &str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
        let _ = (bridge, ip);
        Err(unsupported("add_nat", vm_id))
    }

    /// [`HostOps::add_nat`], with destinations in `allow` reachable even
    /// where the default refuses them.
    fn add_nat_allowing(
        &self,
        vm_id: &str,
        bridge: &str,
        ip: Ipv4Addr,
        allow: &[Cidr],
    ) -> Result<(), HostOpsError> {
        if allow.is_empty() {
            return self.add_nat(vm_id, bridge, ip);
        }
        Err(unsupported("add_nat_allowing", vm_id))
    }

    /// Removes exactly the NAT rules tagged by `vm_id`; none is not an error.
    /// Turns `ip_forward` back off when banger turned it on and no VM (of
    /// any banger daemon on the host) has NAT left.
    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        Err(unsupported("remove_nat", vm_id))
    }

    /// Lets the guest behind `port.tap` send only from its own MAC and IPv4
    /// (and ARP for them), and, with `port.peers`, reach other guests that
    /// also opted in; every other guest-to-guest frame and everything else
    /// from the bridge's ports is dropped, and guests reach the host only for
    /// DNS (port 53) and replies. Rules tagged by `vm_id` in the bridge's own
    /// tables, replacing that VM's earlier ones (idempotent).
    fn add_guest(&self, vm_id: &str, port: &GuestPort) -> Result<(), HostOpsError> {
        let _ = port;
        Err(unsupported("add_guest", vm_id))
    }

    /// Removes exactly the guard rules tagged by `vm_id`; none is not an error.
    fn remove_guest(&self, vm_id: &str) -> Result<(), HostOpsError> {
        Err(unsupported("remove_guest", vm_id))
    }

    /// The ids of the VMs that have guard or NAT rules in `bridge`'s tables
    /// (to sweep those no running VM owns).
    fn list_guest_rules(&self, bridge: &str) -> Result<Vec<String>, HostOpsError> {
        Err(unsupported("list_guest_rules", bridge))
    }

    /// The names of the links starting with `prefix` (a daemon's tap prefix,
    /// at least 4 characters, to sweep taps no running VM holds).
    fn list_links(&self, prefix: &str) -> Result<Vec<String>, HostOpsError> {
        Err(unsupported("list_links", prefix))
    }

    /// UDP and listening TCP sockets bound on `addr`, port 53 (with
    /// `IP_FREEBIND`: before the bridge exists), for the `.vm` DNS server of
    /// a daemon that may not bind a port below 1024 itself.
    fn bind_dns(&self, addr: Ipv4Addr) -> Result<DnsSockets, HostOpsError> {
        Err(unsupported("bind_dns", &addr.to_string()))
    }

    /// When systemd-resolved runs, sends queries for `domain` (e.g. `vm`) to
    /// `server` through `link`. Returns whether resolved was there to ask.
    fn route_dns_domain(
        &self,
        link: &str,
        server: Ipv4Addr,
        domain: &str,
    ) -> Result<bool, HostOpsError> {
        let _ = (server, domain);
        Err(unsupported("route_dns_domain", link))
    }

    /// Undoes [`HostOps::route_dns_domain`] for `link`; nothing to undo is fine.
    fn unroute_dns(&self, link: &str) -> Result<(), HostOpsError> {
        Err(unsupported("unroute_dns", link))
    }

    /// Binds PCI device `address` and the members of its IOMMU group that
    /// must go with it to `vfio-pci` (refused when another card on a host
    /// driver shares the group); returns each with the driver it had.
    fn bind_vfio(&self, address: &PciAddress) -> Result<Vec<BoundDevice>, HostOpsError> {
        Err(unsupported("bind_vfio", address.as_str()))
    }

    /// Gives PCI device `address` back to `driver`: the one recorded when
    /// [`HostOps::bind_vfio`] took it (`None`: leave it unbound) or
    /// `vfio-pci`; anything else is refused.
    fn rebind_driver(
        &self,
        address: &PciAddress,
        driver: Option<&str>,
    ) -> Result<(), HostOpsError> {
        let _ = driver;
        Err(unsupported("rebind_driver", address.as_str()))
    }
}

/// The default for operations an implementation does not offer.
fn unsupported(op: &'static str, target: &str) -> HostOpsError {
    HostOpsError::Failed {
        op,
        target: target.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "not supported by this host",
        ),
    }
}

/// Host operations performed by this process (needs CAP_NET_ADMIN; root
/// for the PCI operations).
#[derive(Debug, Default, Clone)]
pub struct InProcessHostOps {
    /// Where sysfs and the VFIO binding records are (`/sys`,
    /// `/run/banger/vfio`); tests point it at a fake tree.
    pub pci: vfio::PciHost,
}

// From <linux/if_tun.h>.
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
nix::ioctl_write_int!(tun_set_iff, b'T', 202);
nix::ioctl_write_int!(tun_set_persist, b'T', 203);
nix::ioctl_write_int!(tun_set_owner, b'T', 204);

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_read_bad!(siocgifflags, libc::SIOCGIFFLAGS, IfAddrReq);
nix::ioctl_read_bad!(siocgifaddr, libc::SIOCGIFADDR, IfAddrReq);
nix::ioctl_read_bad!(siocgifnetmask, libc::SIOCGIFNETMASK, IfAddrReq);

/// `struct ifreq` with its union as raw bytes: a `short` of flags, or a
/// `struct sockaddr_in` (family, port, then the address in network order).
#[repr(C)]
struct IfAddrReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// Whether link `name` is up with `addr/prefix` as its (primary) IPv4
/// address: the state [`HostOps::ensure_bridge`] leaves, which every create
/// after the first finds. Three ioctls on a datagram socket of the calling
/// thread's network namespace, instead of netlink round trips on a runtime
/// and thread of their own. Anything else (no such link, down, another
/// address or only a secondary one, an error) is "not known to be ready",
/// and the caller takes the netlink path, which sees everything.
pub fn bridge_ready(name: &str, addr: Ipv4Addr, prefix: u8) -> bool {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || !(1..=32).contains(&prefix) {
        return false;
    }
    let Ok(sock) = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let ask = |call: unsafe fn(i32, *mut IfAddrReq) -> nix::Result<i32>| {
        let mut req = IfAddrReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `sock` is an open socket and `req` a NUL-terminated
        // `struct ifreq` of the kernel's size that outlives the call, which
        // writes into its union only.
        unsafe { call(sock.as_raw_fd(), &mut req) }.ok()?;
        Some(req.data)
    };
    let ipv4 = |d: [u8; 24]| {
        (u16::from_ne_bytes([d[0], d[1]]) == libc::AF_INET as u16)
            .then(|| Ipv4Addr::new(d[4], d[5], d[6], d[7]))
    };
    let up = ask(siocgifflags)
        .is_some_and(|d| i16::from_ne_bytes([d[0], d[1]]) & libc::IFF_UP as i16 != 0);
    let mask = u32::MAX << (32 - u32::from(prefix));
    up && ask(siocgifaddr).and_then(ipv4) == Some(addr)
        && ask(siocgifnetmask).and_then(ipv4) == Some(Ipv4Addr::from(mask))
}

fn tun_open(op: &'static str, name: &str) -> Result<std::fs::File, HostOpsError> {
    use std::os::fd::AsRawFd;
    let fail = |source| HostOpsError::Failed {
        op,
        target: name.to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(fail)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun fd and `req` is a properly sized,
    // NUL-terminated `struct ifreq` that outlives the call.
    unsafe { tun_set_iff(file.as_raw_fd(), &mut req as *mut IfReq as u64) }
        .map_err(|e| fail(std::io::Error::from(e)))?;
    Ok(file)
}

impl HostOps for InProcessHostOps {
    fn shared(&self) -> Option<Arc<dyn HostOps>> {
        Some(Arc::new(self.clone()))
    }

    fn create_tap(&self, name: &str, owner_uid: u32) -> Result<(), HostOpsError> {
        use std::os::fd::AsRawFd;
        validate_ifname("create_tap", name)?;
        let file = tun_open("create_tap", name)?;
        let fail = |e: nix::Error| HostOpsError::Failed {
            op: "create_tap",
            target: name.to_string(),
            source: e.into(),
        };
        // SAFETY: `file` is a tun fd attached to `name`; these ioctls take an
        // integer argument.
        unsafe { tun_set_owner(file.as_raw_fd(), owner_uid as u64) }.map_err(fail)?;
        // SAFETY: as above.
        unsafe { tun_set_persist(file.as_raw_fd(), 1) }.map_err(fail)?;
        Ok(())
    }

    fn delete_tap(&self, name: &str) -> Result<(), HostOpsError> {
        use std::os::fd::AsRawFd;
        validate_ifname("delete_tap", name)?;
        if !std::path::Path::new("/sys/class/net").join(name).exists() {
            return Ok(());
        }
        let file = tun_open("delete_tap", name)?;
        // SAFETY: `file` is a tun fd attached to `name`; clearing persistence
        // makes the device go away when the fd closes.
        unsafe { tun_set_persist(file.as_raw_fd(), 0) }.map_err(|e| HostOpsError::Failed {
            op: "delete_tap",
            target: name.to_string(),
            source: e.into(),
        })?;
        Ok(())
    }

    fn ensure_bridge(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), HostOpsError> {
        validate_ifname("ensure_bridge", name)?;
        validate_prefix("ensure_bridge", prefix)?;
        if bridge_ready(name, addr, prefix) {
            return Ok(());
        }
        crate::net::netlink::ensure_bridge(name, addr, prefix)
    }

    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), HostOpsError> {
        validate_ifname("attach_to_bridge", link)?;
        validate_ifname("attach_to_bridge", bridge)?;
        crate::net::netlink::attach_to_bridge(link, bridge)
    }

    fn set_link_up(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("set_link_up", link)?;
        crate::net::netlink::set_link_up(link)
    }

    fn delete_link(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("delete_link", link)?;
        crate::net::netlink::delete_link(link)
    }

    fn add_nat(&self, vm_id: &str, bridge: &str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
        crate::net::nft::add_nat(vm_id, bridge, ip, &[])
    }

    fn add_nat_allowing(
        &self,
        vm_id: &str,
        bridge: &str,
        ip: Ipv4Addr,
        allow: &[Cidr],
    ) -> Result<(), HostOpsError> {
        crate::net::nft::add_nat(vm_id, bridge, ip, allow)
    }

    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        crate::net::nft::remove_nat(vm_id)
    }

    fn add_guest(&self, vm_id: &str, port: &GuestPort) -> Result<(), HostOpsError> {
        crate::net::nft::add_guest(vm_id, port)
    }

    fn remove_guest(&self, vm_id: &str) -> Result<(), HostOpsError> {
        crate::net::nft::remove_guest(vm_id)
    }

    fn list_guest_rules(&self, bridge: &str) -> Result<Vec<String>, HostOpsError> {
        crate::net::nft::vms_with_rules(bridge)
    }

    fn list_links(&self, prefix: &str) -> Result<Vec<String>, HostOpsError> {
        validate_link_prefix("list_links", prefix)?;
        crate::net::netlink::links_with_prefix(prefix)
    }

    fn bind_dns(&self, addr: Ipv4Addr) -> Result<DnsSockets, HostOpsError> {
        dns_sockets::bind_dns_sockets(addr, DNS_PORT)
    }

    fn route_dns_domain(
        &self,
        link: &str,
        server: Ipv4Addr,
        domain: &str,
    ) -> Result<bool, HostOpsError> {
        validate_ifname("route_dns_domain", link)?;
        validate_domain("route_dns_domain", domain)?;
        crate::net::resolved::route(link, server, domain)
    }

    fn unroute_dns(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("unroute_dns", link)?;
        crate::net::resolved::unroute(link)
    }

    fn bind_vfio(&self, address: &PciAddress) -> Result<Vec<BoundDevice>, HostOpsError> {
        self.pci.bind_vfio(address)
    }

    fn rebind_driver(
        &self,
        address: &PciAddress,
        driver: Option<&str>,
    ) -> Result<(), HostOpsError> {
        self.pci.rebind_driver(address, driver)
    }
}

/// A DNS routing domain: lowercase labels of [a-z0-9-], dot-separated.
fn validate_domain(op: &'static str, domain: &str) -> Result<(), HostOpsError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{domain:?} is not a DNS domain (dot-separated labels of [a-z0-9-])"),
        })
    }
}

/// A link-name prefix narrow enough to name one daemon's links: 4-14 of
/// the characters interface names allow.
fn validate_link_prefix(op: &'static str, prefix: &str) -> Result<(), HostOpsError> {
    if (4..libc::IFNAMSIZ - 1).contains(&prefix.len()) && banger_api::net::is_valid_ifname(prefix) {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{prefix:?} is not a link prefix (4-14 of [A-Za-z0-9._-])"),
        })
    }
}

fn validate_prefix(op: &'static str, prefix: u8) -> Result<(), HostOpsError> {
    if (1..=30).contains(&prefix) {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("prefix length /{prefix} leaves no room for hosts (use /1 to /30)"),
        })
    }
}

/// Records every call and succeeds; for tests of capability code.
#[derive(Debug, Default)]
pub struct RecordingHostOps {
    calls: Mutex<Vec<String>>,
    guest_rules: Vec<String>,
}

impl RecordingHostOps {
    /// Recording ops whose bridge tables hold rules of the VMs `ids`
    /// (what [`HostOps::list_guest_rules`] answers for any bridge).
    pub fn with_guest_rules(ids: &[&str]) -> Self {
        RecordingHostOps {
            calls: Mutex::default(),
            guest_rules: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The calls so far, as `op arg...` lines.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, line: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(line);
        }
    }
}

impl HostOps for RecordingHostOps {
    fn create_tap(&self, name: &str, owner_uid: u32) -> Result<(), HostOpsError> {
        validate_ifname("create_tap", name)?;
        self.record(format!("create_tap {name} {owner_uid}"));
        Ok(())
    }

    fn delete_tap(&self, name: &str) -> Result<(), HostOpsError> {
        validate_ifname("delete_tap", name)?;
        self.record(format!("delete_tap {name}"));
        Ok(())
    }

    fn ensure_bridge(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), HostOpsError> {
        validate_ifname("ensure_bridge", name)?;
        validate_prefix("ensure_bridge", prefix)?;
        self.record(format!("ensure_bridge {name} {addr}/{prefix}"));
        Ok(())
    }

    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), HostOpsError> {
        validate_ifname("attach_to_bridge", link)?;
        validate_ifname("attach_to_bridge", bridge)?;
        self.record(format!("attach_to_bridge {link} {bridge}"));
        Ok(())
    }

    fn set_link_up(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("set_link_up", link)?;
        self.record(format!("set_link_up {link}"));
        Ok(())
    }

    fn delete_link(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("delete_link", link)?;
        self.record(format!("delete_link {link}"));
        Ok(())
    }

    fn add_nat(&self, vm_id: &str, bridge: &str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
        validate_ifname("add_nat", bridge)?;
        self.record(format!("add_nat {vm_id} {bridge} {ip}"));
        Ok(())
    }

    fn add_nat_allowing(
        &self,
        vm_id: &str,
        bridge: &str,
        ip: Ipv4Addr,
        allow: &[Cidr],
    ) -> Result<(), HostOpsError> {
        if allow.is_empty() {
            return self.add_nat(vm_id, bridge, ip);
        }
        validate_ifname("add_nat", bridge)?;
        let allow: Vec<String> = allow.iter().map(Cidr::to_string).collect();
        self.record(format!(
            "add_nat {vm_id} {bridge} {ip} allow={}",
            allow.join(",")
        ));
        Ok(())
    }

    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        self.record(format!("remove_nat {vm_id}"));
        Ok(())
    }

    fn add_guest(&self, vm_id: &str, port: &GuestPort) -> Result<(), HostOpsError> {
        validate_ifname("add_guest", &port.bridge)?;
        validate_ifname("add_guest", &port.tap)?;
        self.record(format!(
            "add_guest {vm_id} {} {} {} {}{}",
            port.bridge,
            port.tap,
            port.ip,
            port.mac,
            if port.peers { " peers" } else { "" }
        ));
        Ok(())
    }

    fn remove_guest(&self, vm_id: &str) -> Result<(), HostOpsError> {
        self.record(format!("remove_guest {vm_id}"));
        Ok(())
    }

    /// Answers the VMs given to [`RecordingHostOps::with_guest_rules`]
    /// (none by default).
    fn list_guest_rules(&self, bridge: &str) -> Result<Vec<String>, HostOpsError> {
        validate_ifname("list_guest_rules", bridge)?;
        Ok(self.guest_rules.clone())
    }

    /// Answers that no link has the prefix.
    fn list_links(&self, prefix: &str) -> Result<Vec<String>, HostOpsError> {
        validate_link_prefix("list_links", prefix)?;
        Ok(Vec::new())
    }

    /// Records the call and answers with sockets on loopback, on a free
    /// port (the address asked for may not be bindable in a test).
    fn bind_dns(&self, addr: Ipv4Addr) -> Result<DnsSockets, HostOpsError> {
        self.record(format!("bind_dns {addr}"));
        dns_sockets::bind_dns_sockets(Ipv4Addr::LOCALHOST, 0)
    }

    fn route_dns_domain(
        &self,
        link: &str,
        server: Ipv4Addr,
        domain: &str,
    ) -> Result<bool, HostOpsError> {
        validate_ifname("route_dns_domain", link)?;
        validate_domain("route_dns_domain", domain)?;
        self.record(format!("route_dns_domain {link} {server} {domain}"));
        Ok(true)
    }

    fn unroute_dns(&self, link: &str) -> Result<(), HostOpsError> {
        validate_ifname("unroute_dns", link)?;
        self.record(format!("unroute_dns {link}"));
        Ok(())
    }

    /// Answers as for a device alone in its group with no driver.
    fn bind_vfio(&self, address: &PciAddress) -> Result<Vec<BoundDevice>, HostOpsError> {
        self.record(format!("bind_vfio {address}"));
        Ok(vec![BoundDevice {
            address: address.clone(),
            previous_driver: None,
        }])
    }

    fn rebind_driver(
        &self,
        address: &PciAddress,
        driver: Option<&str>,
    ) -> Result<(), HostOpsError> {
        self.record(format!("rebind_driver {address} {}", driver.unwrap_or("-")));
        Ok(())
    }
}

pub use banger_api::net::PLUGIN_TAP_PREFIX;

/// A privileged operation a plugin asked for, validated against the
/// allowlist. This is the whole set: anything else is refused. Requests act
/// only on the calling VM (NAT rules are tagged with its id) and on names
/// banger owns (taps with [`PLUGIN_TAP_PREFIX`], banger's bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRequest {
    /// Create a plugin tap owned by the daemon's user.
    CreateTap(String),
    /// Delete a plugin tap.
    DeleteTap(String),
    /// Bind a PCI device to vfio-pci.
    BindVfio(PciAddress),
    /// Give a PCI device back to a driver (`None`: leave it unbound).
    RebindDriver(PciAddress, Option<String>),
    /// Masquerade the calling VM's traffic from this address.
    AddNat(Ipv4Addr),
    /// Remove the calling VM's NAT rules.
    RemoveNat,
}

/// The operation names a plugin may ask for.
pub const ALLOWED_HOST_REQUESTS: &[&str] = &[
    "create_tap",
    "delete_tap",
    "bind_vfio",
    "rebind_driver",
    "add_nat",
    "remove_nat",
];

/// A host request that was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum HostRequestError {
    /// The JSON is not a host request.
    #[error("Malformed host request: {0}")]
    Malformed(String),
    /// The operation is not on the allowlist.
    #[error("Host operation {0:?} is not allowed; plugins may ask for: {allowed}", allowed = ALLOWED_HOST_REQUESTS.join(", "))]
    NotAllowed(String),
    /// An argument is outside what plugins may touch.
    #[error("{op} refused: {why}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// The host could not do it (including "not supported by this host").
    #[error(transparent)]
    Failed(#[from] HostOpsError),
}

/// Where a host request runs: the calling VM and banger's network.
#[derive(Debug, Clone, Copy)]
pub struct RequestScope<'a> {
    /// The calling VM's id (NAT rules are tagged with it).
    pub vm_id: &'a str,
    /// Banger's bridge and subnet.
    pub network: &'a banger_api::config::NetworkConfig,
    /// Who owns created taps (the daemon's user).
    pub owner_uid: u32,
}

impl HostRequest {
    /// Parses and validates a [`wire::HostCall`] JSON message.
    pub fn parse(json: &str) -> Result<Self, HostRequestError> {
        #[derive(serde::Deserialize)]
        struct Op {
            op: Option<String>,
        }
        let op: Op = serde_json::from_str(json)
            .map_err(|e| HostRequestError::Malformed(format!("not a JSON object: {e}")))?;
        let op = op.op.ok_or_else(|| {
            HostRequestError::Malformed("no \"op\" field naming the operation".into())
        })?;
        if !ALLOWED_HOST_REQUESTS.contains(&op.as_str()) {
            return Err(HostRequestError::NotAllowed(op));
        }
        let call: HostCall = wire::decode("host request", json).map_err(|e| {
            let detail = std::error::Error::source(&e).map(|s| format!(": {s}"));
            HostRequestError::Malformed(format!("{e}{}", detail.unwrap_or_default()))
        })?;
        Ok(match call.request {
            wire::HostRequest::CreateTap { name } => {
                HostRequest::CreateTap(plugin_tap("create_tap", name)?)
            }
            wire::HostRequest::DeleteTap { name } => {
                HostRequest::DeleteTap(plugin_tap("delete_tap", name)?)
            }
            wire::HostRequest::BindVfio { address } => HostRequest::BindVfio(address),
            wire::HostRequest::RebindDriver {
                address,
                driver: None,
            } => HostRequest::RebindDriver(address, None),
            wire::HostRequest::RebindDriver {
                address,
                driver: Some(driver),
            } => {
                let ok = !driver.is_empty()
                    && driver.len() <= 32
                    && driver.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                    });
                if !ok {
                    return Err(HostRequestError::Refused {
                        op: "rebind_driver",
                        why: format!("{driver:?} is not a driver name (1-32 of [a-z0-9_-])"),
                    });
                }
                HostRequest::RebindDriver(address, Some(driver))
            }
            wire::HostRequest::AddNat { ip } => HostRequest::AddNat(ip),
            wire::HostRequest::RemoveNat => HostRequest::RemoveNat,
        })
    }

    /// Runs the request through `ops` for the VM in `scope`.
    pub fn run(
        &self,
        ops: &dyn HostOps,
        scope: RequestScope<'_>,
    ) -> Result<HostReply, HostRequestError> {
        let mut reply = HostReply {
            v: WIRE_VERSION,
            previous_driver: None,
            bound: Vec::new(),
        };
        match self {
            HostRequest::CreateTap(name) => ops.create_tap(name, scope.owner_uid)?,
            HostRequest::DeleteTap(name) => ops.delete_tap(name)?,
            HostRequest::BindVfio(address) => {
                reply.bound = ops.bind_vfio(address)?;
                reply.previous_driver = reply
                    .bound
                    .iter()
                    .find(|b| &b.address == address)
                    .and_then(|b| b.previous_driver.clone());
            }
            HostRequest::RebindDriver(address, driver) => {
                ops.rebind_driver(address, driver.as_deref())?
            }
            HostRequest::AddNat(ip) => {
                if !scope.network.subnet.contains_vm_host(*ip) {
                    return Err(HostRequestError::Refused {
                        op: "add_nat",
                        why: format!(
                            "{ip} is not a VM address on banger's subnet {}",
                            scope.network.subnet
                        ),
                    });
                }
                ops.add_nat(scope.vm_id, &scope.network.bridge, *ip)?
            }
            HostRequest::RemoveNat => ops.remove_nat(scope.vm_id)?,
        }
        Ok(reply)
    }
}

/// True for a name plugins may create: [`PLUGIN_TAP_PREFIX`] then 1-12 of `[a-z0-9-]`.
pub fn is_plugin_tap(name: &str) -> bool {
    let rest = name.strip_prefix(PLUGIN_TAP_PREFIX).unwrap_or("");
    !rest.is_empty()
        && name.len() < libc::IFNAMSIZ
        && rest
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn plugin_tap(op: &'static str, name: String) -> Result<String, HostRequestError> {
    if is_plugin_tap(&name) {
        Ok(name)
    } else {
        Err(HostRequestError::Refused {
            op,
            why: format!(
                "{name:?} is not a plugin tap name: use {PLUGIN_TAP_PREFIX} followed by 1-12 of [a-z0-9-]"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use banger_api::config::NetworkConfig;
    use banger_api::error::render_chain;

    fn scope(net: &NetworkConfig) -> RequestScope<'_> {
        RequestScope {
            vm_id: "0123456789abcdef",
            network: net,
            owner_uid: 1000,
        }
    }

    #[test]
    fn host_requests_outside_the_allowlist_are_refused_by_name() {
        for json in [
            r#"{"v":1,"op":"run_command","argv":["rm","-rf","/"]}"#,
            r#"{"v":1,"op":"ensure_bridge","name":"br0"}"#,
        ] {
            let err = HostRequest::parse(json).unwrap_err();
            assert!(matches!(err, HostRequestError::NotAllowed(_)), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains("is not allowed"), "{msg}");
            assert!(msg.contains("create_tap, delete_tap, bind_vfio"), "{msg}");
        }
        let err = HostRequest::parse(r#"{"v":1}"#).unwrap_err();
        assert!(err.to_string().contains("no \"op\""), "{err}");
    }

    #[test]
    fn host_request_arguments_stay_inside_what_banger_owns() {
        for (json, why) in [
            (
                r#"{"v":1,"op":"create_tap","name":"eth0"}"#,
                "not a plugin tap name",
            ),
            (
                r#"{"v":1,"op":"delete_tap","name":"bgtap0"}"#,
                "not a plugin tap name",
            ),
            (
                r#"{"v":1,"op":"create_tap","name":"bgp0123456789abc"}"#,
                "not a plugin tap name",
            ),
            (
                r#"{"v":1,"op":"rebind_driver","address":"0000:01:00.0","driver":"../x"}"#,
                "not a driver name",
            ),
            (
                r#"{"v":1,"op":"bind_vfio","address":"01:00.0"}"#,
                "not a PCI address",
            ),
            (r#"{"v":2,"op":"remove_nat"}"#, "wire version"),
        ] {
            let err = render_chain(&HostRequest::parse(json).unwrap_err());
            assert!(err.contains(why), "{json}: {err}");
        }
        let net = NetworkConfig::default();
        let ops = RecordingHostOps::default();
        let outside = HostRequest::parse(r#"{"v":1,"op":"add_nat","ip":"8.8.8.8"}"#).unwrap();
        let err = outside.run(&ops, scope(&net)).unwrap_err();
        assert!(err.to_string().contains("not a VM address"), "{err}");
        assert!(ops.calls().is_empty());
    }

    #[test]
    fn allowed_host_requests_run_through_hostops_for_the_calling_vm() {
        let net = NetworkConfig::default();
        let ops = RecordingHostOps::default();
        let vm_ip = net.subnet.vm_hosts().next().unwrap();
        for json in [
            r#"{"v":1,"op":"create_tap","name":"bgp-gpu0"}"#.to_string(),
            format!(r#"{{"v":1,"op":"add_nat","ip":"{vm_ip}"}}"#),
            r#"{"v":1,"op":"remove_nat"}"#.to_string(),
            r#"{"v":1,"op":"delete_tap","name":"bgp-gpu0"}"#.to_string(),
        ] {
            let reply = HostRequest::parse(&json)
                .unwrap()
                .run(&ops, scope(&net))
                .unwrap();
            assert_eq!(reply.previous_driver, None);
        }
        assert_eq!(
            ops.calls(),
            [
                "create_tap bgp-gpu0 1000".to_string(),
                format!("add_nat 0123456789abcdef {} {vm_ip}", net.bridge),
                "remove_nat 0123456789abcdef".to_string(),
                "delete_tap bgp-gpu0".to_string(),
            ]
        );
        // The PCI pair: the reply names the driver the device had.
        let bind =
            HostRequest::parse(r#"{"v":1,"op":"bind_vfio","address":"0000:01:00.0"}"#).unwrap();
        let reply = bind.run(&ops, scope(&net)).unwrap();
        assert_eq!(reply.bound.len(), 1);
        assert_eq!(reply.bound[0].address.as_str(), "0000:01:00.0");
        let unbound =
            HostRequest::parse(r#"{"v":1,"op":"rebind_driver","address":"0000:01:00.0"}"#).unwrap();
        assert_eq!(
            unbound,
            HostRequest::RebindDriver("0000:01:00.0".parse().unwrap(), None)
        );
        unbound.run(&ops, scope(&net)).unwrap();
        assert_eq!(
            ops.calls()[4..],
            ["bind_vfio 0000:01:00.0", "rebind_driver 0000:01:00.0 -"]
        );
    }

    use super::*;

    #[test]
    fn rejects_bad_interface_names() {
        for bad in ["", "a/b", "has space", "sixteen-chars-xx", "..", "eth0:1"] {
            assert!(validate_ifname("t", bad).is_err(), "{bad}");
        }
        assert!(validate_ifname("t", "bg-tap0").is_ok());
    }

    #[test]
    fn recording_ops_record_in_order() {
        let r = RecordingHostOps::default();
        r.create_tap("t0", 1000).unwrap();
        r.delete_tap("t0").unwrap();
        assert_eq!(r.calls(), vec!["create_tap t0 1000", "delete_tap t0"]);
    }

    #[test]
    fn network_ops_validate_names_before_recording() {
        let r = RecordingHostOps::default();
        let gw = Ipv4Addr::new(10, 0, 0, 1);
        assert!(r.ensure_bridge("bad name", gw, 24).is_err());
        assert!(r.ensure_bridge("br0", gw, 31).is_err());
        assert!(r.route_dns_domain("br0", gw, "~vm").is_err());
        assert!(r.route_dns_domain("br0", gw, "Vm").is_err());
        r.ensure_bridge("br0", gw, 24).unwrap();
        assert!(r.route_dns_domain("br0", gw, "vm").unwrap());
        assert_eq!(
            r.calls(),
            vec![
                "ensure_bridge br0 10.0.0.1/24",
                "route_dns_domain br0 10.0.0.1 vm"
            ]
        );
    }

    #[test]
    fn creates_and_deletes_a_real_tap_when_root() {
        if !nix::unistd::Uid::effective().is_root()
            || !std::path::Path::new("/dev/net/tun").exists()
        {
            eprintln!(
                "SKIPPED creates_and_deletes_a_real_tap_when_root: needs root and /dev/net/tun"
            );
            return;
        }
        let name = format!("bgt{}", std::process::id() % 100_000);
        let ops = InProcessHostOps::default();
        ops.create_tap(&name, 0).unwrap();
        ops.create_tap(&name, 0).unwrap();
        assert!(std::path::Path::new("/sys/class/net").join(&name).exists());
        ops.delete_tap(&name).unwrap();
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
        ops.delete_tap(&name).unwrap();
    }
}
