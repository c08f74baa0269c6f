//! banger's daemon library.
//!
//! The core owns the VM state machine, persistence, locking and the order of
//! lifecycle hooks; everything host- or guest-integrated lives in
//! capabilities (see [`capability`]). See `docs/architecture.md` for the map.

pub mod api;
pub mod archive;
pub mod artifacts;
pub mod capability;
pub mod catalog;
pub mod client;
pub mod config;
pub mod config_drive;
pub mod counting;
pub mod cpio;
pub mod daemon;
pub mod disk;
pub mod download;
pub mod fsutil;
pub mod guest;
pub mod guest_ssh;
pub mod hostops;
pub mod imagecat;
pub mod images;
pub mod kernels;
pub mod library;
pub mod lifecycle;
pub mod machine;
pub mod model;
pub mod net;
pub mod oci_artifact;
pub mod paths;
pub mod plugin_host;
pub mod recipes;
pub mod ssh;
pub mod store;
pub mod vmm;
pub mod vsock;
pub mod workspace;
