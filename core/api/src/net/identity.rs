//! Which links, subnet and nftables tables belong to a daemon: several
//! daemons on one host (two users, or a test run beside a user's) each get
//! their own, derived from the daemon's state directory unless config.toml
//! names them.
//!
//! The daemon id is the first 6 hex digits of the SHA-256 of the state
//! directory's path. From it:
//! - taps are `bg<id>t<N>` (the pool never adopts or deletes a link
//!   without that prefix, so another daemon's taps are safe);
//! - the bridge is `bg<id>br` unless `[network] bridge` is set;
//! - the subnet is `172.30.<X>.0/24`, X from the id, unless
//!   `[network] subnet` is set;
//! - the nftables tables are `banger_<bridge>` (both families,
//!   `banger_host::net::nft::table_for`).
//!
//! The `network` capability and `banger-helper` (`crate::helper`) both
//! derive the names here, so the helper knows a daemon's names from its state directory.
//!
//! `bridge = "banger0"` and `subnet = "172.30.0.0/24"`, the values every
//! daemon had before, mean "not set": they would collide between daemons.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::Subnet;
use crate::config::NetworkConfig;

/// The bridge name that means "derive one" (the old fixed default).
pub const LEGACY_BRIDGE: &str = "banger0";

/// This daemon's network names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetIdentity {
    /// 6 hex digits from the state directory.
    pub id: String,
    /// Every tap of this daemon starts with this.
    pub tap_prefix: String,
}

impl NetIdentity {
    /// The identity of the daemon keeping its state in `state_dir`.
    pub fn for_state_dir(state_dir: &Path) -> Self {
        let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
        let id: String = digest[..3].iter().map(|b| format!("{b:02x}")).collect();
        NetIdentity {
            tap_prefix: format!("bg{id}t"),
            id,
        }
    }

    /// The bridge this daemon uses by default.
    pub fn bridge(&self) -> String {
        format!("bg{}br", self.id)
    }

    /// The subnet this daemon uses by default: `172.30.X.0/24`.
    pub fn subnet(&self) -> Subnet {
        let x = u8::from_str_radix(&self.id[..2], 16).unwrap_or(0);
        // Always a valid /24 network address.
        format!("172.30.{x}.0/24")
            .parse()
            .unwrap_or(Subnet::DEFAULT)
    }

    /// `config` with the unset names filled in from this identity.
    pub fn resolve(&self, config: &NetworkConfig) -> NetworkConfig {
        let mut out = config.clone();
        if out.bridge == LEGACY_BRIDGE {
            out.bridge = self.bridge();
        }
        if out.subnet == Subnet::DEFAULT {
            out.subnet = self.subnet();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_state_dirs_get_different_names_and_one_dir_always_the_same() {
        let a = NetIdentity::for_state_dir(Path::new("/home/alice/.local/state/banger"));
        let b = NetIdentity::for_state_dir(Path::new("/home/bob/.local/state/banger"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            NetIdentity::for_state_dir(Path::new("/home/alice/.local/state/banger"))
        );
        assert_eq!(a.id.len(), 6);
        assert!(a.id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(a.tap_prefix.starts_with("bg") && a.tap_prefix.ends_with('t'));
        // Room for a 5-digit index within IFNAMSIZ - 1.
        assert!(a.tap_prefix.len() + 5 <= 15);
        assert!(crate::net::is_valid_ifname(&a.bridge()));
        assert_ne!(a.bridge(), b.bridge());
        // Neither collides with plugin taps (bgp...) nor old taps (bgtap...).
        assert!(!a.tap_prefix.starts_with("bgp") && !a.tap_prefix.starts_with("bgtap"));
    }

    #[test]
    fn unset_names_are_derived_and_set_ones_kept() {
        let me = NetIdentity::for_state_dir(Path::new("/var/lib/banger"));
        let derived = me.resolve(&NetworkConfig::default());
        assert_eq!(derived.bridge, me.bridge());
        assert_eq!(derived.subnet, me.subnet());
        assert_eq!(derived.subnet.prefix(), 24);
        assert_eq!(derived.subnet.network().octets()[..2], [172, 30]);
        let set = NetworkConfig {
            bridge: "mybr0".into(),
            subnet: "10.77.0.0/24".parse().unwrap(),
            ..NetworkConfig::default()
        };
        assert_eq!(me.resolve(&set), set);
    }
}
