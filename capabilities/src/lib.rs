//! Built-in capabilities. Each module registers itself with
//! `inventory::submit!`; binaries must link this crate
//! (`use banger_capabilities as _;`) for the registrations to exist.

#![forbid(unsafe_code)]

mod deferred;
pub mod dns;
pub mod file_sync;
pub mod mise;
pub mod nat;
pub mod network;
pub mod ports;
pub mod ssh_identity;
pub mod vsock_agent;
pub mod work_disk;

#[cfg(test)]
mod net_tests;
#[cfg(test)]
mod test_env;
#[cfg(test)]
mod tests;
