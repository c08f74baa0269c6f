//! Host networking: the bridge every VM hangs off, stable per-VM leases,
//! the warm tap pool, NAT rules and the `.vm` DNS server.
//!
//! Privileged work goes through [`crate::hostops::HostOps`]; the in-process
//! implementation uses `netlink` for links and addresses, [`nft`] for
//! filtering and NAT, and `resolvectl` for systemd-resolved routing.
//!
//! Daemon wiring: build a [`HostNetwork`], call [`HostNetwork::bring_up`]
//! and [`HostNetwork::serve_dns`] at startup, [`install`] it for the
//! built-in capabilities, and [`HostNetwork::shut_down`] on exit.

mod addr;
pub mod dns;
mod host;
pub(crate) mod netlink;
pub mod nft;
pub(crate) mod resolved;
mod taps;

pub use addr::{InvalidMac, InvalidSubnet, MacAddr, Subnet};
pub use host::{HostNetwork, NetError, NicState, install, installed};
pub use taps::{DEFAULT_WARM, TAP_PREFIX, TapPool};
