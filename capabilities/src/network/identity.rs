//! This daemon's network names: [`banger_api::net::identity`], where the
//! derivation lives so `banger-helper` makes the same names from a state
//! directory.

pub use banger_api::net::identity::{LEGACY_BRIDGE, NetIdentity};
