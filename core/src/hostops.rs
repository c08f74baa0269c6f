//! Privileged host operations behind one interface. Capabilities never touch
//! the host's network configuration directly: they ask `HostOps`, which runs
//! in-process when the daemon has the rights and (later) through the narrow
//! `banger-helper` RPC when it does not. A recording implementation lets
//! capability code be tested without root.

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Mutex;

/// A privileged operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostOpsError {
    /// The argument is not acceptable (e.g. a bad interface name).
    #[error("Invalid argument for {op}: {why}")]
    InvalidArgument {
        /// Operation name.
        op: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The operation failed on the host.
    #[error("{op} {target} failed")]
    Failed {
        /// Operation name.
        op: &'static str,
        /// What it acted on.
        target: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The privileged operations capabilities may ask for.
pub trait HostOps: Send + Sync + fmt::Debug {
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
    /// with rules tagged by `vm_id` in the `banger` nftables table. Replaces
    /// that VM's earlier rules, so it is idempotent.
    fn add_nat(&self, vm_id: &str, bridge: &str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
        let _ = (bridge, ip);
        Err(unsupported("add_nat", vm_id))
    }

    /// Removes exactly the NAT rules tagged by `vm_id`; none is not an error.
    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        Err(unsupported("remove_nat", vm_id))
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
}

/// The default for operations an implementation does not offer.
fn unsupported(op: &'static str, target: &str) -> HostOpsError {
    HostOpsError::Failed {
        op,
        target: target.to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "not supported by this HostOps implementation",
        ),
    }
}

/// Linux interface names: 1-15 bytes, no '/', whitespace or ':'.
pub fn validate_ifname(op: &'static str, name: &str) -> Result<(), HostOpsError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{name:?} is not a valid interface name (1-15 of [A-Za-z0-9._-])"),
        })
    }
}

/// Host operations performed by this process (needs CAP_NET_ADMIN).
#[derive(Debug, Default)]
pub struct InProcessHostOps;

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
        crate::net::nft::add_nat(vm_id, bridge, ip)
    }

    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        crate::net::nft::remove_nat(vm_id)
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
}

impl RecordingHostOps {
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

    fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
        self.record(format!("remove_nat {vm_id}"));
        Ok(())
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
}

#[cfg(test)]
mod tests {
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
        let ops = InProcessHostOps;
        ops.create_tap(&name, 0).unwrap();
        ops.create_tap(&name, 0).unwrap();
        assert!(std::path::Path::new("/sys/class/net").join(&name).exists());
        ops.delete_tap(&name).unwrap();
        assert!(!std::path::Path::new("/sys/class/net").join(&name).exists());
        ops.delete_tap(&name).unwrap();
    }
}
