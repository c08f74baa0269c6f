//! `POST /reidentify`: a guest restored from a snapshot wakes up as the VM
//! it was taken of. The host sends it its new identity, authenticated with
//! the secret it had then (`Authorization: Bearer`, as `/exec`); the agent
//! applies it and from then on answers only to the new secret. See
//! `docs/snapshots.md`.

use serde::{Deserialize, Serialize};

use crate::bundle::GuestNetwork;

/// The request path.
pub const PATH: &str = "/reidentify";

/// One SSH host key file to write under `/etc/ssh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyFile {
    /// File name in `/etc/ssh` (`ssh_host_ed25519_key`, `..._key.pub`).
    pub name: String,
    /// Its contents.
    pub contents: String,
}

/// The new identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reidentify {
    /// The new hostname.
    pub hostname: String,
    /// The NIC's new MAC, set on `eth0` before its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The address the guest had in the snapshot, removed from `eth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_address: Option<String>,
    /// The new address, gateway, MTU and resolvers of `eth0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<GuestNetwork>,
    /// New SSH host keys (replacing the snapshot's, which every restore
    /// would otherwise share); sshd, if it runs, is sent SIGHUP.
    #[serde(default)]
    pub ssh_host_keys: Vec<HostKeyFile>,
    /// The new exec secret; the old one stops working once this is applied.
    pub new_secret: String,
}

/// What the agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reidentified {
    /// What was applied, in order (`hostname`, `mac`, `address`,
    /// `ssh-host-keys`, `sshd-reloaded`, `secret`).
    pub applied: Vec<String>,
}
