//! The `banger-helper` contract as the daemon, the CLI and the helper share
//! it: the typed, versioned requests and responses (one JSON object a line
//! on a Unix socket), the helper's config file and the network names a user
//! may touch, and a client. The checks the helper applies and the server
//! are `banger_host::helper`; the rules in prose are `docs/privileges.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::Subnet;
use crate::net::identity::NetIdentity;
use banger_plugin_abi::wire::{BoundDevice, PciAddress};

/// The protocol version; a request with another `v` is refused. 2 added
/// `list_guest_rules`, `list_links` and `bind_dns` (whose sockets come back
/// as `SCM_RIGHTS` file descriptors with the response line).
pub const HELPER_PROTOCOL_VERSION: u32 = 2;
/// Where the installed helper listens. Not under `/run/banger`: that is a
/// root daemon's own `0700` runtime directory, which users cannot enter.
pub const DEFAULT_HELPER_SOCKET: &str = "/run/banger-helper/helper.sock";
/// The helper's config, written by `banger system install`.
pub const DEFAULT_HELPER_CONFIG: &str = "/etc/banger/helper.toml";
/// Overrides [`DEFAULT_HELPER_SOCKET`] for the daemon (and tests).
pub const HELPER_SOCKET_ENV: &str = "BANGER_HELPER_SOCKET";
/// The longest request line the helper reads.
pub const MAX_LINE: u64 = 64 * 1024;

/// The socket the daemon should ask: `$BANGER_HELPER_SOCKET` or the default.
pub fn helper_socket_from_env() -> PathBuf {
    std::env::var_os(HELPER_SOCKET_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_HELPER_SOCKET))
}

/// One operation the helper performs. This enum is the whole allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum HelperOp {
    /// Is the helper there, and which version; changes nothing.
    Ping,
    /// See [`HostOps::create_tap`]; the owner must be the caller.
    CreateTap {
        /// Tap name, with one of the configured prefixes.
        name: String,
        /// Who may open it (must be the peer's uid).
        owner_uid: u32,
    },
    /// See [`HostOps::delete_tap`].
    DeleteTap {
        /// Tap name, with one of the configured prefixes.
        name: String,
    },
    /// See [`HostOps::ensure_bridge`]; only our bridge at our gateway.
    EnsureBridge {
        /// The configured bridge.
        name: String,
        /// The configured subnet's gateway.
        addr: Ipv4Addr,
        /// The configured subnet's prefix length.
        prefix: u8,
    },
    /// See [`HostOps::attach_to_bridge`].
    AttachToBridge {
        /// One of our taps.
        link: String,
        /// Our bridge.
        bridge: String,
    },
    /// See [`HostOps::set_link_up`]: our bridge or one of our taps.
    SetLinkUp {
        /// The link.
        link: String,
    },
    /// See [`HostOps::delete_link`]: our bridge or one of our taps.
    DeleteLink {
        /// The link.
        link: String,
    },
    /// See [`HostOps::add_nat`]: our bridge, an address inside our subnet.
    AddNat {
        /// The VM whose rules these are.
        vm_id: String,
        /// Our bridge.
        bridge: String,
        /// A VM address inside the subnet.
        ip: Ipv4Addr,
        /// Destinations opened despite the default refusals
        /// ([`HostOps::add_nat_allowing`]), as CIDRs.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        allow: Vec<String>,
    },
    /// See [`HostOps::add_guest`]: our bridge, one of our taps, an
    /// address inside our subnet.
    AddGuest {
        /// The VM whose rules these are.
        vm_id: String,
        /// Our bridge.
        bridge: String,
        /// The VM's tap.
        tap: String,
        /// Its only source address.
        ip: Ipv4Addr,
        /// Its only source MAC.
        mac: crate::net::MacAddr,
        /// Whether it may reach other opted-in guests.
        peers: bool,
    },
    /// See [`HostOps::remove_guest`].
    RemoveGuest {
        /// The VM whose rules go.
        vm_id: String,
    },
    /// See [`HostOps::remove_nat`].
    RemoveNat {
        /// The VM whose rules go.
        vm_id: String,
    },
    /// See [`HostOps::route_dns_domain`]: our bridge and gateway only.
    RouteDnsDomain {
        /// Our bridge.
        link: String,
        /// Our gateway.
        server: Ipv4Addr,
        /// The domain (`vm`).
        domain: String,
    },
    /// See [`HostOps::unroute_dns`]: our bridge only.
    UnrouteDns {
        /// Our bridge.
        link: String,
    },
    /// See [`HostOps::list_guest_rules`]: our bridge's tables only.
    ListGuestRules {
        /// Our bridge.
        bridge: String,
    },
    /// See [`HostOps::list_links`]: a prefix inside our own tap prefix.
    ListLinks {
        /// Starts with our tap prefix (never the shared plugin prefix).
        prefix: String,
    },
    /// See [`HostOps::bind_dns`]: UDP and TCP sockets on our gateway's port
    /// 53, handed back as file descriptors (`SCM_RIGHTS`, UDP then TCP).
    BindDns {
        /// Our gateway.
        addr: Ipv4Addr,
    },
    /// See [`HostOps::bind_vfio`]: an allowlisted device only.
    BindVfio {
        /// The device.
        address: PciAddress,
    },
    /// See [`HostOps::rebind_driver`]: an allowlisted device only.
    RebindDriver {
        /// The device.
        address: PciAddress,
        /// The driver to give it back to (`None`: leave it unbound).
        driver: Option<String>,
    },
}

impl HelperOp {
    /// The operation's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            HelperOp::Ping => "ping",
            HelperOp::CreateTap { .. } => "create_tap",
            HelperOp::DeleteTap { .. } => "delete_tap",
            HelperOp::EnsureBridge { .. } => "ensure_bridge",
            HelperOp::AttachToBridge { .. } => "attach_to_bridge",
            HelperOp::SetLinkUp { .. } => "set_link_up",
            HelperOp::DeleteLink { .. } => "delete_link",
            HelperOp::AddNat { .. } => "add_nat",
            HelperOp::RemoveNat { .. } => "remove_nat",
            HelperOp::AddGuest { .. } => "add_guest",
            HelperOp::RemoveGuest { .. } => "remove_guest",
            HelperOp::RouteDnsDomain { .. } => "route_dns_domain",
            HelperOp::UnrouteDns { .. } => "unroute_dns",
            HelperOp::ListGuestRules { .. } => "list_guest_rules",
            HelperOp::ListLinks { .. } => "list_links",
            HelperOp::BindDns { .. } => "bind_dns",
            HelperOp::BindVfio { .. } => "bind_vfio",
            HelperOp::RebindDriver { .. } => "rebind_driver",
        }
    }
}

/// A request line: `{"v":2,"op":"create_tap","name":"bgtap0","owner_uid":1000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperRequest {
    /// [`HELPER_PROTOCOL_VERSION`].
    pub v: u32,
    /// The operation and its arguments.
    #[serde(flatten)]
    pub op: HelperOp,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Ok,
    /// The caller is not allowed to use the helper at all.
    Denied,
    /// The request is outside the allowlist or its arguments outside what
    /// the helper's config allows; nothing was done.
    Refused,
    /// Allowed, but the host operation failed.
    Failed,
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperResponse {
    /// [`HELPER_PROTOCOL_VERSION`].
    pub v: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, when not [`Outcome::Ok`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `ping`: the helper's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `route_dns_domain`: whether resolved was there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routed: Option<bool>,
    /// `bind_vfio`: the devices bound and their previous drivers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound: Vec<BoundDevice>,
    /// `list_guest_rules`: VM ids; `list_links`: link names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// How many file descriptors came with this line (`SCM_RIGHTS`):
    /// `bind_dns` sends 2, the UDP socket then the TCP listener.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fds: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl HelperResponse {
    /// A success with nothing to report.
    pub fn ok() -> Self {
        HelperResponse {
            v: HELPER_PROTOCOL_VERSION,
            outcome: Outcome::Ok,
            error: None,
            version: None,
            routed: None,
            bound: Vec::new(),
            names: Vec::new(),
            fds: 0,
        }
    }

    /// A refusal or failure saying why.
    pub fn err(outcome: Outcome, error: String) -> Self {
        HelperResponse {
            outcome,
            error: Some(error),
            ..Self::ok()
        }
    }
}

/// The helper's config file: `/etc/banger/helper.toml`. Written by
/// `banger system install`, which adds an entry for the invoking user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HelperConfigFile {
    /// Members of this group may connect; their network is derived from
    /// their home (as for a `[[users]]` entry without names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// PCI devices any allowed user may bind to vfio-pci and rebind.
    #[serde(default)]
    pub vfio_devices: Vec<String>,
    /// The users who may connect, each with the network names it may touch.
    #[serde(default)]
    pub users: Vec<UserEntry>,
}

/// One allowed user and its daemon's network. Unset names are derived from
/// the user's default state directory (`~/.local/state/banger`) the way
/// the daemon derives them ([`derived_network`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// User name or numeric uid.
    pub name: String,
    /// The daemon's bridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// The daemon's subnet (CIDR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// Every tap of that daemon starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_prefix: Option<String>,
}

/// The names one daemon's requests may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Its bridge.
    pub bridge: String,
    /// Its subnet.
    pub subnet: Subnet,
    /// Its taps' prefix, and the plugin taps' (`bgp`).
    pub tap_prefixes: Vec<String>,
}

/// The network names a daemon keeping its state in `state_dir` uses when
/// config.toml sets none: `bg<id>br`, `172.30.<X>.0/24`, taps `bg<id>t<N>`,
/// from the same [`NetIdentity`] the network capability uses, plus the
/// plugin tap prefix.
pub fn derived_network(state_dir: &Path) -> Network {
    let id = NetIdentity::for_state_dir(state_dir);
    Network {
        bridge: id.bridge(),
        subnet: id.subnet(),
        tap_prefixes: vec![id.tap_prefix, crate::net::PLUGIN_TAP_PREFIX.to_string()],
    }
}

impl Network {
    /// `Ok` when `name` is one of this network's taps, else why not.
    pub fn our_tap(&self, name: &str) -> Result<(), String> {
        let prefixed = self
            .tap_prefixes
            .iter()
            .any(|p| name.len() > p.len() && name.starts_with(p.as_str()));
        if prefixed && crate::net::is_valid_ifname(name) {
            Ok(())
        } else {
            Err(format!(
                "{name:?} is not one of banger's taps (names starting with {})",
                self.tap_prefixes.join(" or ")
            ))
        }
    }

    /// `Ok` when every link starting with `prefix` is one of this network's
    /// own taps: `prefix` starts with its tap prefix (the plugin prefix is
    /// shared by every user, so it is not listable).
    pub fn our_tap_prefix(&self, prefix: &str) -> Result<(), String> {
        match self.tap_prefixes.first() {
            Some(own)
                if prefix.starts_with(own.as_str()) && crate::net::is_valid_ifname(prefix) =>
            {
                Ok(())
            }
            own => Err(format!(
                "{prefix:?} does not start with this user's tap prefix {:?}",
                own.map(String::as_str).unwrap_or_default()
            )),
        }
    }

    /// `Ok` when `name` is this network's bridge, else why not.
    pub fn our_bridge(&self, name: &str) -> Result<(), String> {
        if name == self.bridge {
            Ok(())
        } else {
            Err(format!(
                "{name:?} is not banger's bridge {:?} (the helper config's [[users]] entry for this user names its bridge)",
                self.bridge
            ))
        }
    }
}

/// The helper's config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HelperConfigError {
    /// Unreadable.
    #[error("Cannot read the helper config {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// Not valid TOML of the expected shape.
    #[error("Invalid helper config {0}: {1}")]
    Parse(PathBuf, String),
    /// A value is unusable.
    #[error("Invalid helper config {path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
}

impl HelperConfigFile {
    /// Parses config text (`path` is for messages).
    pub fn parse(path: &Path, text: &str) -> Result<Self, HelperConfigError> {
        toml::from_str(text)
            .map_err(|e| HelperConfigError::Parse(path.to_path_buf(), e.to_string()))
    }

    /// The file's text.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(self).unwrap_or_default();
        format!(
            "# banger-helper's config: who may use it and what they may touch. See docs/privileges.md.\n{body}"
        )
    }
}

/// A client of `banger-helper` on its socket: the daemon's host operations
/// (through `banger_host::helper::HelperHostOps`), `banger system status`
/// and `banger doctor` ask through it.
#[derive(Debug, Clone)]
pub struct HelperClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Why the helper could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HelperClientError {
    /// Could not connect, send or read.
    #[error(
        "Cannot reach banger-helper at {0}; install and start it with `sudo banger system install`"
    )]
    Io(PathBuf, #[source] std::io::Error),
    /// The answer was not a response.
    #[error("banger-helper at {0} answered with something that is not a response: {1}")]
    BadReply(PathBuf, String),
    /// The helper said no or failed.
    #[error("banger-helper: {0}")]
    Answer(String),
}

impl HelperClient {
    /// A client of the helper listening on `socket`.
    pub fn new(socket: PathBuf) -> Self {
        HelperClient {
            socket,
            timeout: Duration::from_secs(60),
        }
    }

    /// The socket it asks.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and reads its response (any outcome).
    pub fn call(&self, op: HelperOp) -> Result<HelperResponse, HelperClientError> {
        let io = |e| HelperClientError::Io(self.socket.clone(), e);
        let stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let request = HelperRequest {
            v: HELPER_PROTOCOL_VERSION,
            op,
        };
        let mut line = serde_json::to_string(&request)
            .map_err(|e| HelperClientError::BadReply(self.socket.clone(), e.to_string()))?;
        line.push('\n');
        // A helper that denies us answers and closes before reading, so a
        // failed write may still have a reply waiting: read it first.
        let sent = (&stream).write_all(line.as_bytes());
        let mut reply = String::new();
        let read = BufReader::new(&stream).take(MAX_LINE).read_line(&mut reply);
        if reply.is_empty() {
            sent.map_err(io)?;
            read.map_err(io)?;
        }
        serde_json::from_str(reply.trim_end()).map_err(|e| {
            HelperClientError::BadReply(self.socket.clone(), format!("{e}: {reply:?}"))
        })
    }

    /// Asks for the helper's version; `Err` when it is not there or refuses us.
    pub fn ping(&self) -> Result<String, HelperClientError> {
        let r = self.call(HelperOp::Ping)?;
        match r.outcome {
            Outcome::Ok => Ok(r.version.unwrap_or_default()),
            _ => Err(HelperClientError::Answer(r.error.unwrap_or_default())),
        }
    }
}
