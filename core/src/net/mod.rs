//! Host networking: the bridge every VM hangs off, stable per-VM leases,
//! the warm tap pool, NAT rules and the `.vm` DNS server.
//!
//! Privileged work goes through [`crate::hostops::HostOps`]; the in-process
//! implementation uses `netlink` for links and addresses, [`nft`] for
//! filtering and NAT, and `resolvectl` for systemd-resolved routing.
//!
//! The daemon does not wire any of it: the `network` capability makes the
//! [`HostNetwork`] and shares it with `dns` and `nat` through the
//! capability environment; their daemon hooks bring it up and down.

mod addr;
pub mod dns;
mod host;
pub(crate) mod netlink;
pub mod nft;
pub(crate) mod resolved;
mod taps;

pub use addr::{InvalidMac, InvalidSubnet, MacAddr, Subnet};
pub use host::{HostNetwork, NetError, NicState};
pub use taps::{DEFAULT_WARM, TAP_PREFIX, TapPool};
