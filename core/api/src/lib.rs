//! banger's shared vocabulary: what the CLI, the daemon, the capabilities
//! and the tests all speak, and nothing that only the daemon needs.
//!
//! - the VM [`model`], the [`machine`] spec handed to a VMM backend, the
//!   [`guest`] config the agent applies;
//! - the user's [`config`], where banger keeps things ([`paths`]), which
//!   backend a VM gets ([`backend`]), the kernel and image [`catalog`]s and
//!   the recipes a host can build from;
//! - the daemon's HTTP [`api`] types, its [`client`], the [`progress`]
//!   stream of long operations;
//! - the host side of a workspace import ([`workspace`]: a git plan), the
//!   SSH identity and `known_hosts` files ([`ssh`]).
//!
//! No server, store, registry or netlink code lives here: `cargo tree -p
//! banger-cli` shows what the CLI links. See `docs/architecture.md`.

#![forbid(unsafe_code)]

pub mod api;
pub mod backend;
pub mod catalog;
pub mod cgroups;
pub mod client;
pub mod config;
pub mod counting;
pub mod error;
pub mod fsutil;
pub mod guest;
pub mod helper;
pub mod machine;
pub mod model;
pub mod net;
pub mod paths;
pub mod progress;
pub mod release;
pub mod snapshot;
pub mod ssh;
pub mod workspace;
