//! The low-level host calls [`crate::hostops::InProcessHostOps`] makes:
//! `netlink` for links and addresses, [`nft`] for the nftables tables,
//! `resolvectl` for systemd-resolved routing. The address types they take
//! and the names a daemon derives from its state directory are
//! `banger_api::net`.
//!
//! Policy lives in the capabilities crate: the `network` capability owns the
//! bridge, the tap pool and the leases; `dns` the `.vm` server; `nat` which
//! rules a VM gets.

pub(crate) mod netlink;
pub mod nft;
pub(crate) mod resolved;
