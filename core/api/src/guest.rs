//! The guest config bundle capabilities add to in the GuestConfig hook. It is
//! defined in the guest protocol crate, which the agent shares.

pub use banger_guest_protocol::bundle::*;
