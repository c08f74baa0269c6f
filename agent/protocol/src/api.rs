//! The agent's HTTP API over vsock. The host reaches it through the VMM's
//! hybrid-vsock Unix socket: connect, send `CONNECT <port>\n`, read an
//! `OK <n>\n` line, then speak HTTP/1.1.

use serde::{Deserialize, Serialize};

/// The vsock port the agent's HTTP service listens on.
pub const AGENT_PORT: u32 = 1024;

/// The name of the virtio-serial port that carries the agent's API instead
/// of vsock under QEMU's `serial` transport (`virtserialport,name=`; the
/// guest finds it in `/sys/class/virtio-ports/*/name`).
pub const SERIAL_PORT_NAME: &str = "banger.agent";

/// The host vsock port the agent announces itself on: once it listens on
/// [`AGENT_PORT`], the agent connects once to the host (CID 2) on this port
/// and writes `READY <version>\n`. Hybrid-vsock VMMs (Firecracker,
/// vhost-device-vsock) hand such a connection to the Unix socket
/// `<uds_path>_1025`, so a host listening there learns the moment the agent
/// is up instead of polling. Best effort: nobody listening is fine.
pub const READY_PORT: u32 = 1025;

/// The announcement's line, without its version and newline.
pub const READY_LINE: &str = "READY";

/// What the daemon announces after [`READY_LINE`] for a guest restored from
/// a snapshot, whose agent has just answered its `POST /reidentify`: the
/// agent is up, and PostStart need not ask `/healthz` again.
pub const READY_RESTORED: &str = "restored";

/// What the agent prints on the guest console, followed by the reason on
/// the same line, when no transport the host uses can reach it this boot
/// (QEMU's serial transport under a kernel without `virtio_console`, a
/// port it cannot open, a vsock listener it cannot bind). The daemon
/// watches the console while it waits for the agent, and fails the start
/// with the reason at once rather than at the end of its agent timeout.
pub const UNREACHABLE_MARK: &str = "banger-agent: unreachable: ";

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Agent version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Guest memory from /proc/meminfo, in KiB.
    #[serde(default)]
    pub mem_total_kib: u64,
    /// Available guest memory, in KiB.
    #[serde(default)]
    pub mem_available_kib: u64,
}

/// Transport protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// One listening socket, from `GET /ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    /// Protocol.
    pub proto: Proto,
    /// Local address (`0.0.0.0`, `::`, `127.0.0.1`).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Owning process id, if found.
    pub pid: Option<u32>,
    /// Process name (`comm`).
    pub process: Option<String>,
    /// Command line.
    pub command: Option<String>,
}

/// One SSH host key, from `GET /ssh-host-keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    /// Key type (`ssh-ed25519`).
    pub algorithm: String,
    /// The public key line as in `/etc/ssh/ssh_host_*_key.pub`.
    pub public_key: String,
    /// `SHA256:...` fingerprint, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}
