//! `bangerd`: the banger daemon.

// Linking the built-ins is what registers them with `inventory`.
use banger_capabilities as _;

fn main() {}
