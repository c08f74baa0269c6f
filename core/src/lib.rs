//! banger's daemon library.
//!
//! The core owns the VM state machine, persistence, locking and the order of
//! lifecycle hooks; everything host- or guest-integrated lives in
//! capabilities (see [`capability`]). The layers below it are their own
//! crates: `banger_api` (model, config, API types, client), `banger_host`
//! (privileged host operations), `banger_vmm` (backends) and
//! `banger_artifacts` (images and kernels). See `docs/architecture.md`.

#![forbid(unsafe_code)]

pub mod artifacts;
pub mod capability;
pub mod daemon;
pub mod exec;
pub mod guest_ssh;
pub mod library;
pub mod lifecycle;
pub mod plugin_host;
pub mod snapshot;
pub mod store;
pub mod workspace;
