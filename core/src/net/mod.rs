//! Address types the config and the store share ([`Subnet`], [`MacAddr`],
//! upstream DNS server addresses), and the low-level host calls
//! [`crate::hostops::InProcessHostOps`] makes: `netlink` for links and
//! addresses, [`nft`] for the nftables table, `resolvectl` for
//! systemd-resolved routing.
//!
//! Policy lives in the capabilities crate: the `network` capability owns the
//! bridge, the tap pool and the leases; `dns` the `.vm` server; `nat` which
//! rules a VM gets.

mod addr;
pub(crate) mod netlink;
pub mod nft;
pub(crate) mod resolved;

pub use addr::{InvalidMac, InvalidSubnet, MacAddr, Subnet, parse_upstream};
