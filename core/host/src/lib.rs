//! Privileged host operations behind one interface ([`hostops::HostOps`]):
//! bridges and taps, the nftables table, systemd-resolved routing, PCI
//! driver binding for VFIO. The daemon calls the in-process implementation
//! when it runs as root; the same typed requests are what a root helper
//! serves. The low-level calls are in [`net`] (netlink, nft, resolvectl)
//! and `hostops::vfio` (sysfs).
//!
//! The few `unsafe` calls of banger's host side live here (the TUN ioctls),
//! each with its SAFETY note.

#![deny(unsafe_code)]

pub mod error;
pub mod helper;
#[allow(unsafe_code)]
pub mod hostops;
pub mod net;
