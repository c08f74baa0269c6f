//! What the banger host and the guest agent agree on, and nothing else: the
//! guest config bundle capabilities build ([`bundle`]), how it is written to
//! the config drive ([`drive`]), the agent's vsock API ([`api`]) and its command stream ([`exec`]).
//!
//! The agent depends only on this crate; the daemon re-exports the bundle as
//! `banger_api::guest`.

#![forbid(unsafe_code)]

pub mod api;
pub mod bundle;
pub mod drive;
pub mod exec;
pub mod reidentify;
