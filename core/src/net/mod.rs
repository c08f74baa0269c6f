//! Host networking: the bridge every VM hangs off, stable per-VM leases,
//! the warm tap pool, NAT rules and the `.vm` DNS server.
//!
//! Privileged work goes through [`crate::hostops::HostOps`]; the in-process
//! implementation uses [`netlink`] for links and addresses and [`nft`] for
//! filtering and NAT.

mod addr;
pub(crate) mod netlink;
pub mod nft;

pub use addr::{InvalidMac, InvalidSubnet, MacAddr, Subnet};
mod taps;

pub use taps::{DEFAULT_WARM, TAP_PREFIX, TapPool};
pub mod dns;
mod host;

pub use host::{HostNetwork, NetError, NicState, install, installed};
