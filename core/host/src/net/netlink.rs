//! Link and address work over rtnetlink, for [`crate::hostops::InProcessHostOps`].
//!
//! `HostOps` is synchronous (hooks run on blocking threads), so each call
//! opens a netlink socket and drives it on a small current-thread runtime.
//! The socket belongs to the calling thread's network namespace, which is
//! what lets tests run these calls inside an `unshare(CLONE_NEWNET)` thread.

use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::error::HostOpsError;
use banger_api::net::Cidr;

fn io_error(e: rtnetlink::Error) -> std::io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(msg) => match msg.code {
            Some(code) => std::io::Error::from_raw_os_error(-code.get()),
            None => std::io::Error::other(e.to_string()),
        },
        _ => std::io::Error::other(e.to_string()),
    }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.is_some_and(|c| -c.get() == errno))
}

/// Runs `f` with a fresh netlink handle on a private current-thread runtime.
/// Called from inside a tokio runtime (where `block_on` would panic), the
/// work moves to a scoped thread, which inherits this thread's namespace.
fn with_handle<T: Send>(
    op: &'static str,
    target: &str,
    f: impl AsyncFnOnce(Handle) -> Result<T, std::io::Error> + Send,
) -> Result<T, HostOpsError> {
    let fail = |source| HostOpsError::Failed {
        op,
        target: target.to_string(),
        source,
    };
    let run = move || -> Result<T, std::io::Error> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let r = f(handle).await;
            task.abort();
            r
        })
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("netlink worker panicked")))
        })
        .map_err(fail)
    } else {
        run().map_err(fail)
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, std::io::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

async fn require_index(handle: &Handle, name: &str) -> Result<u32, std::io::Error> {
    index_of(handle, name).await?.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no network interface named {name}"),
        )
    })
}

/// Creates bridge `name` unless it exists, adds `addr/prefix` unless present,
/// and brings it up. A bridge already up with the address (every create
/// after the first) costs one link lookup and one address dump.
pub(crate) fn ensure_bridge(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), HostOpsError> {
    with_handle("ensure_bridge", name, async |h: Handle| {
        if let Some((index, true)) = link_state(&h, name).await? {
            if has_address(&h, index, addr, prefix).await? {
                return Ok(());
            }
        }
        let ours = Cidr::containing(addr, prefix);
        if let Some((link, theirs)) = subnet_user(&h, name, ours).await? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "subnet {ours} overlaps {theirs} on {link}; set `subnet` in [network] of config.toml to a free one"
                ),
            ));
        }
        let index = match index_of(&h, name).await? {
            Some(i) => i,
            None => {
                match h.link().add(LinkBridge::new(name).build()).execute().await {
                    Ok(()) => {}
                    // Lost a race with another creator: fine, it exists now.
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    Err(e) => return Err(io_error(e)),
                }
                require_index(&h, name).await?
            }
        };
        if !has_address(&h, index, addr, prefix).await? {
            match h
                .address()
                .add(index, IpAddr::V4(addr), prefix)
                .execute()
                .await
            {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::EEXIST) => {}
                Err(e) => return Err(io_error(e)),
            }
        }
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(io_error)
    })
}

/// The index of link `name` and whether it is up, if it exists.
async fn link_state(handle: &Handle, name: &str) -> Result<Option<(u32, bool)>, std::io::Error> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some((
            msg.header.index,
            msg.header.flags.contains(LinkFlags::Up),
        ))),
        Ok(None) => Ok(None),
        Err(e) if is_errno(&e, libc::ENODEV) => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

/// Whether link `index` has `addr/prefix`.
async fn has_address(
    h: &Handle,
    index: u32,
    addr: Ipv4Addr,
    prefix: u8,
) -> Result<bool, std::io::Error> {
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut present = false;
    while let Some(msg) = addrs.try_next().await.map_err(io_error)? {
        let has = msg
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(v)) if *v == addr));
        present |= has && msg.header.prefix_len == prefix;
    }
    Ok(present)
}

/// A link other than `except` with an IPv4 address overlapping `subnet`.
async fn subnet_user(
    h: &Handle,
    except: &str,
    subnet: Cidr,
) -> Result<Option<(String, Cidr)>, std::io::Error> {
    let mut names = std::collections::HashMap::new();
    let mut links = h.link().get().execute();
    while let Some(msg) = links.try_next().await.map_err(io_error)? {
        for attr in &msg.attributes {
            if let LinkAttribute::IfName(n) = attr {
                names.insert(msg.header.index, n.clone());
            }
        }
    }
    let mut addrs = h.address().get().execute();
    while let Some(msg) = addrs.try_next().await.map_err(io_error)? {
        let link = names.get(&msg.header.index).cloned().unwrap_or_default();
        if link == except {
            continue;
        }
        for attr in &msg.attributes {
            if let AddressAttribute::Address(IpAddr::V4(v)) = attr {
                let theirs = Cidr::containing(*v, msg.header.prefix_len);
                if theirs.contains(subnet.network()) || subnet.contains(theirs.network()) {
                    return Ok(Some((link, theirs)));
                }
            }
        }
    }
    Ok(None)
}

/// Makes `bridge` the controller of `link`.
pub(crate) fn attach_to_bridge(link: &str, bridge: &str) -> Result<(), HostOpsError> {
    with_handle("attach_to_bridge", link, async |h: Handle| {
        let bridge_index = require_index(&h, bridge).await?;
        let index = require_index(&h, link).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .controller(bridge_index)
                    .build(),
            )
            .execute()
            .await
            .map_err(io_error)
    })
}

/// Brings `link` up.
pub(crate) fn set_link_up(link: &str) -> Result<(), HostOpsError> {
    with_handle("set_link_up", link, async |h: Handle| {
        let index = require_index(&h, link).await?;
        h.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(io_error)
    })
}

/// Deletes `link`; a missing link is not an error.
pub(crate) fn delete_link(link: &str) -> Result<(), HostOpsError> {
    with_handle("delete_link", link, async |h: Handle| {
        let Some(index) = index_of(&h, link).await? else {
            return Ok(());
        };
        match h.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    })
}

/// The IPv4 subnets of every bridge but `except` (other banger daemons'
/// bridges, `docker0`, `virbr0`, ...), which NAT keeps guests out of.
pub(crate) fn other_bridge_subnets(except: &str) -> Result<Vec<Cidr>, HostOpsError> {
    with_handle("add_nat", except, async |h: Handle| {
        let mut bridges = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(io_error)? {
            let mut name = None;
            let mut is_bridge = false;
            for attr in &msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::LinkInfo(infos) => {
                        is_bridge |= infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge)));
                    }
                    _ => {}
                }
            }
            if is_bridge && name.as_deref() != Some(except) {
                bridges.push(msg.header.index);
            }
        }
        let mut out = Vec::new();
        for index in bridges {
            let mut addrs = h.address().get().set_link_index_filter(index).execute();
            while let Some(msg) = addrs.try_next().await.map_err(io_error)? {
                for attr in &msg.attributes {
                    if let AddressAttribute::Address(IpAddr::V4(v)) = attr {
                        let c = Cidr::containing(*v, msg.header.prefix_len);
                        if !out.contains(&c) {
                            out.push(c);
                        }
                    }
                }
            }
        }
        Ok(out)
    })
}

/// Names of the links whose name starts with `prefix`.
pub(crate) fn links_with_prefix(prefix: &str) -> Result<Vec<String>, HostOpsError> {
    with_handle("list_links", prefix, async |h: Handle| {
        let mut out = Vec::new();
        let mut links = h.link().get().execute();
        while let Some(msg) = links.try_next().await.map_err(io_error)? {
            for attr in &msg.attributes {
                if let LinkAttribute::IfName(n) = attr {
                    if n.starts_with(prefix) {
                        out.push(n.clone());
                    }
                }
            }
        }
        Ok(out)
    })
}
