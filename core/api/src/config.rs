//! `config.toml`: the user's settings, every key optional.
//!
//! The file is walked by hand over toml's spanned document rather than
//! through serde, so every error can say which file, line, table and key is
//! wrong, what was expected and how to fix it. See `docs/config.md`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::backend::{
    AgentTransport, HostFacts as KvmFacts, JailSettings, QemuAccel, QemuSettings,
};
use crate::backend::{BackendFacts, BackendPlan, VmmChoice, choose_backend};
use crate::model::{
    ByteSize, CapChoice, EnabledCap, MAX_VCPUS, MIN_MEMORY_MIB, VmmKind, resolve_caps,
};
use crate::paths::Paths;

/// Errors from loading or using the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("Cannot read {}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key or value is wrong. `message`
    /// names the key and the fix.
    #[error("{} line {line}, column {column}: {message}", path.display())]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column (in characters) of the offending text.
        column: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A `default_caps` entry of a `Config` built in code does not parse.
    #[error("Invalid entry in default_caps of {}: {message}", path.display())]
    DefaultCap {
        /// The config file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// No Firecracker binary is configured and none is on `PATH`.
    #[error("Cannot find firecracker on PATH: install firecracker or set firecracker_bin in {}", path.display())]
    FirecrackerNotFound {
        /// The config file to edit.
        path: PathBuf,
    },
    /// The configured agent binary does not exist.
    #[error(
        "agent_bin {} (set in {}) is not a file: build banger-agent or fix the path",
        bin.display(),
        path.display()
    )]
    AgentNotFound {
        /// The configured binary.
        bin: PathBuf,
        /// The config file.
        path: PathBuf,
    },
    /// No agent binary is configured, installed beside the daemon or on `PATH`.
    #[error(
        "Cannot find banger-agent next to the daemon or on PATH: install it or set agent_bin in {}",
        path.display()
    )]
    AgentNotOnPath {
        /// The config file to edit.
        path: PathBuf,
    },
    /// The agent binary is dynamically linked: as the guest's `/init` it
    /// runs before any shared library exists.
    #[error(
        "{} is a dynamically linked banger-agent (it asks for the loader {interpreter}); as the guest's /init it runs before any library exists and the guest would panic \"No working init found\". Build the static agent with scripts/build-agent and set agent_bin to the file it writes (or install it next to bangerd)",
        bin.display()
    )]
    AgentNotStatic {
        /// The agent binary.
        bin: PathBuf,
        /// Its `PT_INTERP`, the dynamic loader it asks for.
        interpreter: String,
    },
    /// The agent binary is not an ELF executable banger can check.
    #[error(
        "{} is not a banger-agent executable ({reason}); build the static agent with scripts/build-agent and point agent_bin at it",
        bin.display()
    )]
    AgentNotElf {
        /// The agent binary.
        bin: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The configured Firecracker binary is not an executable file.
    #[error(
        "firecracker_bin {} (set in {}) is not an executable file: fix the path or remove the key to search PATH",
        bin.display(),
        path.display()
    )]
    FirecrackerNotExecutable {
        /// The configured binary.
        bin: PathBuf,
        /// The config file.
        path: PathBuf,
    },
}

/// Size and shape of a new VM when `vm create` does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmDefaults {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Work disk size.
    pub disk_size: ByteSize,
}

impl VmDefaults {
    /// The floors used when neither the config nor the host says more.
    pub const BUILTIN: VmDefaults = VmDefaults {
        vcpus: 1,
        memory_mib: 1024,
        disk_size: ByteSize(8 << 30),
    };
}

impl std::fmt::Display for VmDefaults {
    /// `4 vcpu · 8192 MiB · 8G disk`, the `spec:` line's wording.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} vcpu · {} MiB · {} disk",
            self.vcpus, self.memory_mib, self.disk_size
        )
    }
}

/// The `[vm_defaults]` keys the config file set; unset keys are derived from
/// the host by [`resolve_vm_defaults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmDefaultsConfig {
    /// `vcpus`.
    pub vcpus: Option<u32>,
    /// `memory_mib`.
    pub memory_mib: Option<u32>,
    /// `disk_size`.
    pub disk_size: Option<ByteSize>,
}

/// What the host offers, as far as it could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// CPUs this process may run on (affinity and cgroup quota applied).
    pub cpus: Option<u64>,
    /// Total physical memory in bytes.
    pub ram_bytes: Option<u64>,
}

impl HostFacts {
    /// Reads this host's facts; unreadable ones are `None`.
    pub fn probe() -> Self {
        HostFacts {
            cpus: std::thread::available_parallelism()
                .ok()
                .map(|n| n.get() as u64),
            ram_bytes: host_ram_bytes(),
        }
    }
}

/// Where a resolved default came from (shown by `--help` and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultSource {
    /// `[vm_defaults]` in the config file.
    Config,
    /// Derived from the host's CPUs or memory.
    Host,
    /// banger's built-in floor.
    Builtin,
}

impl std::fmt::Display for DefaultSource {
    /// `config`, `host` or `built-in`, for provenance columns.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DefaultSource::Config => "config",
            DefaultSource::Host => "host",
            DefaultSource::Builtin => "built-in",
        })
    }
}

/// The defaults for new VMs with where each value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedVmDefaults {
    /// The values.
    pub values: VmDefaults,
    /// Source of `values.vcpus`.
    pub vcpus_from: DefaultSource,
    /// Source of `values.memory_mib`.
    pub memory_from: DefaultSource,
    /// Source of `values.disk_size`.
    pub disk_from: DefaultSource,
}

/// Largest host-derived vCPU count and memory: a few VMs must fit beside the
/// developer's own work.
const HOST_MAX_VCPUS: u64 = 4;
const HOST_MAX_MEMORY_MIB: u64 = 8192;

/// Each default from `set` (the `[vm_defaults]` keys), else from `host` (a
/// quarter of the CPUs, 1 to 4; an eighth of the RAM, 1 GiB to 8 GiB), else
/// [`VmDefaults::BUILTIN`]. Pure, so tests inject the host.
pub fn resolve_vm_defaults(set: &VmDefaultsConfig, host: &HostFacts) -> ResolvedVmDefaults {
    let floor = VmDefaults::BUILTIN;
    let host_vcpus = host
        .cpus
        .filter(|&n| n > 0)
        .map(|n| (n / 4).clamp(1, HOST_MAX_VCPUS) as u32);
    let host_memory = host.ram_bytes.filter(|&n| n > 0).map(|n| {
        (n / 8 / (1 << 20)).clamp(u64::from(floor.memory_mib), HOST_MAX_MEMORY_MIB) as u32
    });
    let pick =
        |configured: Option<u32>, derived: Option<u32>, builtin: u32| match (configured, derived) {
            (Some(v), _) => (v, DefaultSource::Config),
            (None, Some(v)) => (v, DefaultSource::Host),
            (None, None) => (builtin, DefaultSource::Builtin),
        };
    let (vcpus, vcpus_from) = pick(set.vcpus, host_vcpus, floor.vcpus);
    let (memory_mib, memory_from) = pick(set.memory_mib, host_memory, floor.memory_mib);
    // The host says nothing useful about disk: a work disk is sparse.
    let (disk_size, disk_from) = match set.disk_size {
        Some(d) => (d, DefaultSource::Config),
        None => (floor.disk_size, DefaultSource::Builtin),
    };
    ResolvedVmDefaults {
        values: VmDefaults {
            vcpus,
            memory_mib,
            disk_size,
        },
        vcpus_from,
        memory_from,
        disk_from,
    }
}

/// Total physical memory, if the host reports it.
fn host_ram_bytes() -> Option<u64> {
    use nix::unistd::{SysconfVar, sysconf};
    let pages = sysconf(SysconfVar::_PHYS_PAGES).ok().flatten()?;
    let page_size = sysconf(SysconfVar::PAGE_SIZE).ok().flatten()?;
    if pages <= 0 || page_size <= 0 {
        return None;
    }
    Some((pages as u64).saturating_mul(page_size as u64))
}

/// Where a `[[file_sync]]` entry reads from on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncSource {
    /// An absolute host path.
    Absolute(PathBuf),
    /// A path under the daemon user's home, written `~/REST` (holds `REST`).
    Home(PathBuf),
}

impl SyncSource {
    /// The host path, with `~/` taken from `home`; `None` when the entry
    /// needs a home and there is none.
    pub fn resolve(&self, home: Option<&Path>) -> Option<PathBuf> {
        match self {
            SyncSource::Absolute(p) => Some(p.clone()),
            SyncSource::Home(rest) => home.map(|h| h.join(rest)),
        }
    }
}

impl std::fmt::Display for SyncSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncSource::Absolute(p) => write!(f, "{}", p.display()),
            SyncSource::Home(rest) => write!(f, "~/{}", rest.display()),
        }
    }
}

/// One `[[file_sync]]` entry: a host file or directory the `file-sync`
/// capability copies into the guest at every start; see `docs/file-sync.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSyncEntry {
    /// What to copy.
    pub host: SyncSource,
    /// Where it lands: an absolute guest path strictly below `/root`.
    pub guest: PathBuf,
    /// Mode of a file entry (`None`: 0600); directory entries keep each
    /// file's own mode.
    pub mode: Option<u32>,
}

/// Guest home: the work disk's mount point, the only place files may land.
const GUEST_HOME: &str = "/root";

/// `host` of `[[file_sync]]` entry `index`, or what is wrong with it.
fn parse_sync_host(index: usize, s: &str) -> Result<SyncSource, String> {
    let field = format!("file_sync[{index}].host");
    if s.is_empty() {
        return Err(format!(
            "{field} is empty; name a file or directory on this machine, e.g. \"~/.aws\""
        ));
    }
    let source = if let Some(rest) = s.strip_prefix("~/") {
        if Path::new(rest).components().next().is_none() {
            return Err(format!(
                "{field} {s:?} names your whole home directory; name a file or directory in it, e.g. \"~/.aws\""
            ));
        }
        SyncSource::Home(PathBuf::from(rest))
    } else if s.starts_with('~') {
        return Err(format!(
            "{field} {s:?}: ~user paths are not supported; use ~/... (the daemon user's home) or an absolute path"
        ));
    } else if s.starts_with('/') {
        SyncSource::Absolute(PathBuf::from(s))
    } else {
        return Err(format!(
            "{field} {s:?} is relative; use an absolute path or ~/..."
        ));
    };
    if has_parent_dir(s) {
        return Err(format!(
            "{field} {s:?} contains '..'; write the path without it"
        ));
    }
    Ok(source)
}

/// `guest` of `[[file_sync]]` entry `index` as an absolute path below
/// `/root`, or what is wrong with it.
fn parse_sync_guest(index: usize, s: &str) -> Result<PathBuf, String> {
    let field = format!("file_sync[{index}].guest");
    if s.is_empty() {
        return Err(format!(
            "{field} is empty; name a path under /root, e.g. \"~/.aws\""
        ));
    }
    let path = if s == "~" {
        PathBuf::from(GUEST_HOME)
    } else if let Some(rest) = s.strip_prefix("~/") {
        Path::new(GUEST_HOME).join(rest)
    } else if s.starts_with('~') {
        return Err(format!(
            "{field} {s:?}: ~user paths are not supported; use ~/... (the guest's /root)"
        ));
    } else if s.starts_with('/') {
        PathBuf::from(s)
    } else {
        return Err(format!("{field} {s:?} is relative; use ~/... or /root/..."));
    };
    if has_parent_dir(s) {
        return Err(format!(
            "{field} {s:?} contains '..'; write the path without it"
        ));
    }
    // Components drop "." and doubled or trailing slashes.
    let path: PathBuf = path.components().collect();
    match path.strip_prefix(GUEST_HOME) {
        Ok(rest) if rest.components().next().is_some() => Ok(path),
        _ => Err(format!(
            "{field} {s:?} is not below /root, the guest's work disk; use ~/NAME or /root/NAME"
        )),
    }
}

/// `mode` of `[[file_sync]]` entry `index`: 3 or 4 octal digits.
fn parse_sync_mode(index: usize, s: &str) -> Result<u32, String> {
    let ok = (3..=4).contains(&s.len()) && s.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(s, 8) {
        Ok(mode) if ok => Ok(mode),
        _ => Err(format!(
            "file_sync[{index}].mode {s:?} is not an octal mode; write 3 or 4 octal digits in quotes, e.g. \"0644\" or \"600\""
        )),
    }
}

fn has_parent_dir(s: &str) -> bool {
    Path::new(s)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
}

/// Host networking (`[network]`); see `docs/networking.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The bridge every VM's tap joins.
    pub bridge: String,
    /// The bridge's subnet; the bridge takes the first host address.
    pub subnet: crate::net::Subnet,
    /// Loopback port of the `.vm` DNS server.
    pub dns_port: u16,
    /// Where the DNS server forwards names outside `.vm`; `None` means the
    /// nameservers in the host's `/etc/resolv.conf`.
    pub dns_upstream: Option<Vec<std::net::SocketAddr>>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "banger0".to_string(),
            subnet: crate::net::Subnet::DEFAULT,
            dns_port: 53053,
            dns_upstream: None,
        }
    }
}

/// banger's settings. Every field has a default; see `docs/config.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the settings came from (named in errors; it need not exist).
    pub path: PathBuf,
    /// Firecracker binary; `None` searches `PATH`.
    pub firecracker_bin: Option<PathBuf>,
    /// Plugin directory; `None` means [`Paths::default_plugins_dir`].
    pub plugins_dir: Option<PathBuf>,
    /// Capabilities enabled for new VMs, in `--cap` syntax.
    pub default_caps: Vec<String>,
    /// VMM backend for new VMs; `auto` picks one for this host (see
    /// [`Config::backend_plan`]).
    pub vmm: VmmChoice,
    /// Seconds a graceful stop may take before the VMM is killed.
    pub stop_timeout_secs: u64,
    /// Seconds one plugin hook may run before the VM's operation fails (the
    /// hung plugin thread is abandoned; see `docs/plugins.md`).
    pub plugin_hook_timeout_secs: u64,
    /// The `[vm_defaults]` keys that were set; see
    /// [`Config::resolved_vm_defaults`] for the values new VMs get.
    pub vm_defaults: VmDefaultsConfig,
    /// Overrides the kernel catalog's base URL (mirrors, tests).
    pub kernel_catalog_url: Option<String>,
    /// Replaces the embedded kernel catalog with this file (mirrors carrying
    /// their own builds, air-gapped hosts, tests).
    pub kernel_catalog_file: Option<PathBuf>,
    /// Replaces the embedded image catalog with this file.
    pub image_catalog_file: Option<PathBuf>,
    /// Overrides the image catalog's base URL (mirrors, tests).
    pub image_catalog_url: Option<String>,
    /// Where `banger update` looks for binary releases; `None` means the
    /// project's (`banger_api::release`, docs/release.md).
    pub update_url: Option<String>,
    /// Registries (`host:port`) that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Bounds on an OCI image pull's layers (`image_layer_max_entries`,
    /// `image_layer_max_size`, `image_layer_max_ratio`).
    pub image_layer_limits: ExtractLimits,
    /// The static `banger-agent` put into every guest's initramfs; `None`
    /// looks next to the running daemon, then on `PATH`.
    pub agent_bin: Option<PathBuf>,
    /// Seconds to wait for a booting guest's agent to answer `/healthz`.
    pub agent_timeout_secs: u64,
    /// How long `vm run` waits for the guest's sshd (and its host keys)
    /// after create before giving up and keeping the VM for `vm logs`.
    pub ssh_wait_timeout_secs: u64,
    /// Most bytes the daemon keeps of each output stream (stdout, stderr)
    /// of one command it runs in a guest over SSH (workspace, guest jobs).
    pub ssh_max_output: ByteSize,
    /// QEMU binary for the qemu backend; `None` searches `PATH` for
    /// `qemu-system-x86_64`.
    pub qemu_bin: Option<PathBuf>,
    /// Accelerator for the qemu backend (see `docs/vmm.md`).
    pub qemu_accel: QemuAccel,
    /// vhost-device-vsock binary for the qemu backend; `None` searches `PATH`.
    pub vhost_device_vsock_bin: Option<PathBuf>,
    /// How the agent's API travels under QEMU (`qemu_agent_transport`).
    pub qemu_agent_transport: AgentTransport,
    /// Confine VMM processes (`vmm_jail`, default true; see `docs/security.md`).
    pub vmm_jail: bool,
    /// First uid of the per-VM VMM uids (`vmm_uid_base`).
    pub vmm_uid_base: u32,
    /// One cgroup per VM (`vmm_cgroups`, default true).
    pub vmm_cgroups: bool,
    /// Firecracker's jailer; `None` searches `PATH` for `jailer`.
    pub jailer_bin: Option<PathBuf>,
    /// Host networking.
    pub network: NetworkConfig,
    /// `[[file_sync]]` entries, in file order.
    pub file_sync: Vec<FileSyncEntry>,
    /// The image `vm create` and `vm run` use without `--image` (and
    /// without `--rootfs`); `None` means the image catalog's default.
    pub default_image_name: Option<String>,
    /// banger's SSH private key (created there when missing; `~/` expanded
    /// at load); `None` means [`Paths::ssh_dir`]`/id_ed25519`.
    pub ssh_key_path: Option<PathBuf>,
    /// How many images keep a spare copy of their root disk ready, so a
    /// create takes it with a rename instead of copying (`rootfs_spares`;
    /// 0 turns spares off). See `docs/images.md`.
    pub rootfs_spares: u32,
    /// How many VMs of the default shape the daemon keeps booted ahead, so
    /// a `vm create`/`vm run` asking for that shape takes one instead of
    /// booting (`warm_pool`; 0, the default, keeps none). See
    /// `docs/warm-pool.md`.
    pub warm_pool: u32,
}

const TOP_KEYS: &[&str] = &[
    "firecracker_bin",
    "plugins_dir",
    "default_caps",
    "vmm",
    "stop_timeout_secs",
    "plugin_hook_timeout_secs",
    "vm_defaults",
    "kernel_catalog_url",
    "kernel_catalog_file",
    "image_catalog_url",
    "image_catalog_file",
    "update_url",
    "insecure_registries",
    "image_layer_max_entries",
    "image_layer_max_size",
    "image_layer_max_ratio",
    "agent_bin",
    "agent_timeout_secs",
    "ssh_wait_timeout_secs",
    "ssh_max_output",
    "qemu_bin",
    "qemu_accel",
    "vhost_device_vsock_bin",
    "qemu_agent_transport",
    "vmm_jail",
    "vmm_uid_base",
    "vmm_cgroups",
    "jailer_bin",
    "network",
    "file_sync",
    "default_image_name",
    "ssh_key_path",
    "rootfs_spares",
    "warm_pool",
];
const FILE_SYNC_KEYS: &[&str] = &["host", "guest", "mode"];
const NETWORK_KEYS: &[&str] = &["bridge", "subnet", "dns_port", "dns_upstream"];
const VM_DEFAULTS_KEYS: &[&str] = &["vcpus", "memory_mib", "disk_size"];

/// `ssh_key_path`'s value: absolute, or `~/...` under `home`.
fn expand_home(raw: &str, home: Option<&Path>) -> Result<PathBuf, String> {
    let path = match raw.strip_prefix("~/") {
        Some(rest) if !rest.is_empty() => match home {
            Some(h) if h.is_absolute() => h.join(rest),
            _ => {
                return Err(format!(
                    "ssh_key_path {raw:?} starts with ~/ but HOME is not set"
                ));
            }
        },
        _ => PathBuf::from(raw),
    };
    let plain = path
        .components()
        .all(|c| !matches!(c, std::path::Component::ParentDir));
    if !path.is_absolute() || !plain || raw.ends_with('/') {
        return Err(format!(
            "ssh_key_path must be the key file as an absolute path or ~/..., without `..`, found {raw:?}"
        ));
    }
    Ok(path)
}

impl Config {
    /// banger's SSH private key: `ssh_key_path`, else `<state>/ssh/id_ed25519`.
    pub fn ssh_key_file(&self, paths: &Paths) -> PathBuf {
        self.ssh_key_path
            .clone()
            .unwrap_or_else(|| paths.ssh_dir().join("id_ed25519"))
    }

    /// The built-in defaults, attributed to `path`.
    pub fn defaults(path: &Path) -> Config {
        /// Every VM gets a work disk, an address, a `.vm` name, the
        /// `[[file_sync]]` files (none unless configured) and the agent.
        const DEFAULT_CAPS: &[&str] = &["work-disk", "network", "dns", "file-sync", "vsock-agent"];
        Config {
            path: path.to_path_buf(),
            firecracker_bin: None,
            plugins_dir: None,
            default_caps: DEFAULT_CAPS.iter().map(|c| c.to_string()).collect(),
            vmm: VmmChoice::Auto,
            stop_timeout_secs: 10,
            plugin_hook_timeout_secs: 30,
            kernel_catalog_url: None,
            kernel_catalog_file: None,
            image_catalog_file: None,
            image_catalog_url: None,
            update_url: None,
            insecure_registries: Vec::new(),
            image_layer_limits: ExtractLimits::OCI_PULL,
            agent_bin: None,
            agent_timeout_secs: DEFAULT_AGENT_TIMEOUT_SECS,
            ssh_wait_timeout_secs: DEFAULT_SSH_WAIT_TIMEOUT_SECS,
            ssh_max_output: ByteSize(DEFAULT_SSH_MAX_OUTPUT),
            vm_defaults: VmDefaultsConfig::default(),
            qemu_bin: None,
            qemu_accel: QemuAccel::Auto,
            vhost_device_vsock_bin: None,
            qemu_agent_transport: AgentTransport::Serial,
            vmm_jail: true,
            vmm_uid_base: crate::backend::DEFAULT_VMM_UID_BASE,
            vmm_cgroups: true,
            jailer_bin: None,
            network: NetworkConfig::default(),
            file_sync: Vec::new(),
            default_image_name: None,
            ssh_key_path: None,
            rootfs_spares: DEFAULT_ROOTFS_SPARES,
            warm_pool: 0,
        }
    }

    /// Reads `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::defaults(path)),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parses `text`, attributing errors to `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Parser { text, path }.parse()
    }

    /// The Firecracker binary: the configured one, else the first
    /// `firecracker` on `PATH`.
    pub fn firecracker_bin(&self) -> Result<PathBuf, ConfigError> {
        self.firecracker_bin_in(std::env::var_os("PATH").as_deref())
    }

    fn firecracker_bin_in(
        &self,
        path_var: Option<&std::ffi::OsStr>,
    ) -> Result<PathBuf, ConfigError> {
        match &self.firecracker_bin {
            Some(bin) if is_executable(bin) => Ok(bin.clone()),
            Some(bin) => Err(ConfigError::FirecrackerNotExecutable {
                bin: bin.clone(),
                path: self.path.clone(),
            }),
            None => path_var
                .and_then(|p| find_in_path("firecracker", p))
                .ok_or_else(|| ConfigError::FirecrackerNotFound {
                    path: self.path.clone(),
                }),
        }
    }

    /// The backend and accelerator a new VM gets on this host, and why:
    /// `flag` (`--vmm`) wins, then `vmm`; `auto` probes for firecracker and
    /// asks the KVM rule. See [`choose_backend`].
    pub fn backend_plan(&self, flag: Option<VmmKind>) -> BackendPlan {
        choose_backend(flag, self.vmm, self.qemu_accel, &self.backend_facts())
    }

    /// What [`Config::backend_plan`] decides on, probed from this host.
    pub fn backend_facts(&self) -> BackendFacts {
        let firecracker = self.firecracker_bin().map_err(|e| match e {
            ConfigError::FirecrackerNotExecutable { bin, .. } => format!(
                "firecracker_bin {} is not an executable file",
                bin.display()
            ),
            _ => "firecracker not found on PATH".to_string(),
        });
        BackendFacts {
            firecracker,
            host: KvmFacts::probe(),
        }
    }

    /// The guest agent binary: the configured one, else the one
    /// [`default_agent_bin`] finds; refused unless statically linked
    /// ([`check_static_agent`]).
    pub fn agent_bin(&self) -> Result<PathBuf, ConfigError> {
        let bin = match &self.agent_bin {
            Some(bin) if bin.is_file() => bin.clone(),
            Some(bin) => {
                return Err(ConfigError::AgentNotFound {
                    bin: bin.clone(),
                    path: self.path.clone(),
                });
            }
            None => default_agent_bin().ok_or_else(|| ConfigError::AgentNotOnPath {
                path: self.path.clone(),
            })?,
        };
        check_static_agent(&bin)?;
        Ok(bin)
    }

    /// How the qemu backend runs: configured binaries, else the first on
    /// `PATH`, else the bare name (so a failed start names the binary).
    pub fn qemu_settings(&self) -> QemuSettings {
        self.qemu_settings_in(std::env::var_os("PATH").as_deref())
    }

    fn qemu_settings_in(&self, path_var: Option<&std::ffi::OsStr>) -> QemuSettings {
        let defaults = QemuSettings::default();
        let resolve = |configured: &Option<PathBuf>, default: PathBuf| {
            configured.clone().unwrap_or_else(|| {
                let name = default.to_string_lossy().into_owned();
                path_var
                    .and_then(|p| find_in_path(&name, p))
                    .unwrap_or(default)
            })
        };
        QemuSettings {
            qemu_bin: resolve(&self.qemu_bin, defaults.qemu_bin.clone()),
            vhost_device_vsock_bin: resolve(
                &self.vhost_device_vsock_bin,
                defaults.vhost_device_vsock_bin.clone(),
            ),
            accel: self.qemu_accel,
            agent_transport: self.qemu_agent_transport,
            // The bridge is the agent binary's host role; when none is
            // found, a launch under `serial` says so.
            bridge_bin: match self.qemu_agent_transport {
                AgentTransport::Serial => self.agent_bin().ok(),
                AgentTransport::Vsock => None,
            },
            jail: self.jail_settings_in(path_var),
            ..defaults
        }
    }

    /// How VMM processes are confined; the jailer is the configured one,
    /// else the first `jailer` on `PATH`.
    pub fn jail_settings(&self) -> JailSettings {
        self.jail_settings_in(std::env::var_os("PATH").as_deref())
    }

    fn jail_settings_in(&self, path_var: Option<&std::ffi::OsStr>) -> JailSettings {
        JailSettings {
            enabled: self.vmm_jail,
            uid_base: self.vmm_uid_base,
            cgroups: self.vmm_cgroups,
            jailer_bin: self
                .jailer_bin
                .clone()
                .or_else(|| path_var.and_then(|p| find_in_path("jailer", p))),
        }
    }

    /// The shape of new VMs on this host: `[vm_defaults]`, else derived
    /// from this host's CPUs and memory, else built-in floors. Reads the
    /// host each call; see [`resolve_vm_defaults`] for the rule.
    pub fn resolved_vm_defaults(&self) -> ResolvedVmDefaults {
        resolve_vm_defaults(&self.vm_defaults, &HostFacts::probe())
    }

    /// The plugin directory.
    pub fn plugins_dir(&self, paths: &Paths) -> PathBuf {
        self.plugins_dir
            .clone()
            .unwrap_or_else(|| paths.default_plugins_dir())
    }

    /// `default_caps` parsed. `parse` already validated them, so this fails
    /// only for a `Config` built by hand.
    pub fn default_caps(&self) -> Result<Vec<EnabledCap>, ConfigError> {
        let mut choices = Vec::new();
        for s in &self.default_caps {
            choices.push(
                parse_default_cap(s).map_err(|message| ConfigError::DefaultCap {
                    path: self.path.clone(),
                    message,
                })?,
            );
        }
        Ok(resolve_caps(&[], &choices))
    }
}

/// Default for `ssh_wait_timeout_secs`.
pub const DEFAULT_SSH_WAIT_TIMEOUT_SECS: u64 = 120;
/// Default for `rootfs_spares`: the two images used last keep a spare.
pub const DEFAULT_ROOTFS_SPARES: u32 = 2;

/// Default for `ssh_max_output`: 64 MiB per stream.
pub const DEFAULT_SSH_MAX_OUTPUT: u64 = 64 << 20;
/// Default for `agent_timeout_secs`.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 60;
/// File name of the guest agent binary.
pub const AGENT_BIN_NAME: &str = "banger-agent";

/// Set (non-empty) in the daemon's environment, any file is taken as the
/// agent, linked statically or not: for tests whose fake VMM never boots
/// it. Never needed otherwise.
pub const ANY_AGENT_ENV: &str = "BANGER_TEST_ANY_AGENT";

/// Milliseconds between the keepalives of the host's exec streams
/// (`banger_guest_protocol::exec::KEEPALIVE_EVERY` when unset): for tests
/// that need the agent's deadline within seconds. Never needed otherwise.
pub const EXEC_KEEPALIVE_ENV: &str = "BANGER_TEST_EXEC_KEEPALIVE_MS";

/// How often the host's exec streams send a frame ([`EXEC_KEEPALIVE_ENV`]).
pub fn exec_keepalive_every() -> std::time::Duration {
    std::env::var(EXEC_KEEPALIVE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|ms| *ms > 0)
        .map_or(
            banger_guest_protocol::exec::KEEPALIVE_EVERY,
            std::time::Duration::from_millis,
        )
}

fn any_agent_allowed() -> bool {
    std::env::var_os(ANY_AGENT_ENV).is_some_and(|v| !v.is_empty())
}

/// The `banger-agent` files that may be the agent, in order: next to the
/// running executable (installs put `bangerd` and the agent side by side),
/// one directory up (where `scripts/build-agent` writes the static agent
/// when the daemon runs from `target/<profile>/`), then on `PATH`.
fn agent_candidates() -> Vec<PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let near = exe_dir.iter().flat_map(|d| {
        [
            Some(d.join(AGENT_BIN_NAME)),
            d.parent().map(|up| up.join(AGENT_BIN_NAME)),
        ]
    });
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.is_absolute())
        .map(|d| Some(d.join(AGENT_BIN_NAME)));
    near.chain(on_path)
        .flatten()
        .filter(|p| p.is_file())
        .collect()
}

/// The agent used when `agent_bin` is not set: the first statically linked
/// one of [`agent_candidates`], so a daemon run from the build directory
/// takes `scripts/build-agent`'s agent over cargo's dynamically linked
/// `target/<profile>/banger-agent`; failing that, the first one found
/// (which [`check_static_agent`] then refuses, naming it).
pub fn default_agent_bin() -> Option<PathBuf> {
    let found = agent_candidates();
    if !any_agent_allowed() {
        if let Some(p) = found
            .iter()
            .find(|p| matches!(elf_interpreter(p), Ok(None)))
        {
            return Some(p.clone());
        }
    }
    found.into_iter().next()
}

/// Refuses an agent that is not a statically linked ELF executable (one
/// with a `PT_INTERP` program header asks for a dynamic loader, which an
/// initramfs does not have). [`ANY_AGENT_ENV`] turns the check off.
pub fn check_static_agent(bin: &Path) -> Result<(), ConfigError> {
    if any_agent_allowed() {
        return Ok(());
    }
    match elf_interpreter(bin) {
        Ok(None) => Ok(()),
        Ok(Some(interpreter)) => Err(ConfigError::AgentNotStatic {
            bin: bin.to_path_buf(),
            interpreter,
        }),
        Err(e) => Err(ConfigError::AgentNotElf {
            bin: bin.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// ELF program header type of the dynamic loader's path.
const PT_INTERP: u32 = 3;

/// The dynamic loader an ELF executable asks for (its `PT_INTERP`), or
/// `None` for a static one. Reads the ELF and program headers only.
pub fn elf_interpreter(path: &Path) -> std::io::Result<Option<String>> {
    use std::io::{Error, ErrorKind, Read, Seek, SeekFrom};
    let bad = |what: &str| Error::new(ErrorKind::InvalidData, what.to_string());
    let mut f = std::fs::File::open(path)?;
    let mut ident = [0u8; 64];
    let n = f.read(&mut ident)?;
    if n < 52 || ident[..4] != *b"\x7fELF" {
        return Err(bad("not an ELF file"));
    }
    let wide = match ident[4] {
        1 => false,
        2 => true,
        _ => return Err(bad("unknown ELF class")),
    };
    let le = match ident[5] {
        1 => true,
        2 => false,
        _ => return Err(bad("unknown ELF byte order")),
    };
    let uint = |b: &[u8]| -> u64 {
        let mut v = 0u64;
        for (i, byte) in b.iter().enumerate() {
            let shift = if le { i } else { b.len() - 1 - i };
            v |= u64::from(*byte) << (8 * shift);
        }
        v
    };
    if wide && n < 64 {
        return Err(bad("truncated ELF header"));
    }
    let (phoff, phentsize, phnum) = if wide {
        (
            uint(&ident[0x20..0x28]),
            uint(&ident[0x36..0x38]),
            uint(&ident[0x38..0x3a]),
        )
    } else {
        (
            uint(&ident[0x1c..0x20]),
            uint(&ident[0x2a..0x2c]),
            uint(&ident[0x2c..0x2e]),
        )
    };
    if phnum == 0 {
        return Ok(None);
    }
    // p_offset and p_filesz of a program header.
    let (off_at, size_at) = if wide {
        (8..16, 32..40)
    } else {
        (4..8, 16..20)
    };
    if phentsize < size_at.end as u64 || phnum > 4096 {
        return Err(bad("bad program header table"));
    }
    let mut table = vec![0u8; (phentsize * phnum) as usize];
    f.seek(SeekFrom::Start(phoff))?;
    f.read_exact(&mut table)
        .map_err(|_| bad("truncated program header table"))?;
    for ph in table.chunks_exact(phentsize as usize) {
        if uint(&ph[0..4]) != u64::from(PT_INTERP) {
            continue;
        }
        let (off, size) = (uint(&ph[off_at.clone()]), uint(&ph[size_at.clone()]));
        if size == 0 || size > 4096 {
            return Err(bad("bad PT_INTERP size"));
        }
        let mut interp = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(off))?;
        f.read_exact(&mut interp)
            .map_err(|_| bad("truncated PT_INTERP"))?;
        let text = String::from_utf8_lossy(&interp);
        return Ok(Some(text.trim_end_matches('\0').to_string()));
    }
    Ok(None)
}

/// One `default_caps` entry. Removals (`-NAME`) mean nothing in a default set.
fn parse_default_cap(s: &str) -> Result<CapChoice, String> {
    match s.parse::<CapChoice>() {
        Ok(CapChoice::Remove(name)) => Err(format!(
            "\"-{name}\" removes a capability, which means nothing in the defaults; leave {name:?} out of the list instead"
        )),
        Ok(c) => Ok(c),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `p` is a file with an execute bit.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first executable `name` in the directories of this process's
/// `PATH`, found the way the backends find their binaries.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    find_in_path(name, &std::env::var_os("PATH")?)
}

fn find_in_path(name: &str, path_var: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// Walks the spanned TOML document.
struct Parser<'a> {
    text: &'a str,
    path: &'a Path,
}

type Entries<'t, 'i> = Vec<(
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
)>;

/// `host` or `host:port`, as registries are named in image references.
fn valid_registry_host(h: &str) -> bool {
    !h.is_empty()
        && !h.contains("://")
        && !h.contains('/')
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

impl Parser<'_> {
    fn parse(&self) -> Result<Config, ConfigError> {
        let doc = DeTable::parse(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            // toml's message is multi-line with a source excerpt; keep the gist.
            let gist = e.message().lines().next().unwrap_or("invalid TOML").trim();
            self.error(span, format!("invalid TOML: {gist}"))
        })?;
        let mut cfg = Config::defaults(self.path);
        for (key, value) in sorted(doc.get_ref()) {
            let span = value.span();
            match key.get_ref().as_ref() {
                "firecracker_bin" => {
                    cfg.firecracker_bin = Some(self.absolute_path(key, value)?);
                }
                "plugins_dir" => cfg.plugins_dir = Some(self.absolute_path(key, value)?),
                "default_image_name" => {
                    let name = self.string(key, value)?;
                    crate::model::validate_artifact_name("default_image_name", &name)
                        .map_err(|e| self.error(span, e.to_string()))?;
                    cfg.default_image_name = Some(name);
                }
                "ssh_key_path" => {
                    let raw = self.string(key, value)?;
                    let home = std::env::var_os("HOME").map(PathBuf::from);
                    cfg.ssh_key_path =
                        Some(expand_home(&raw, home.as_deref()).map_err(|m| self.error(span, m))?);
                }
                "qemu_bin" => cfg.qemu_bin = Some(self.absolute_path(key, value)?),
                "vhost_device_vsock_bin" => {
                    cfg.vhost_device_vsock_bin = Some(self.absolute_path(key, value)?)
                }
                "jailer_bin" => cfg.jailer_bin = Some(self.absolute_path(key, value)?),
                "vmm_jail" => cfg.vmm_jail = self.boolean(key, value)?,
                "vmm_cgroups" => cfg.vmm_cgroups = self.boolean(key, value)?,
                "vmm_uid_base" => {
                    cfg.vmm_uid_base = self.integer(
                        key,
                        value,
                        1000,
                        i64::from(u32::MAX) - 65536,
                        "a uid of at least 1000 with 65536 free uids above it, e.g. 1879048192",
                    )? as u32;
                }
                "qemu_accel" => {
                    let s = self.string(key, value)?;
                    cfg.qemu_accel = s.parse().map_err(|m| self.error(span, m))?;
                }
                "qemu_agent_transport" => {
                    let s = self.string(key, value)?;
                    cfg.qemu_agent_transport = s.parse().map_err(|m| self.error(span, m))?;
                }
                "default_caps" => {
                    let DeValue::Array(items) = value.get_ref() else {
                        return Err(self.error(
                            span,
                            "default_caps must be a list of strings, e.g. [\"work-disk\", \"nat\"]"
                                .into(),
                        ));
                    };
                    let mut caps = Vec::new();
                    for item in items.iter() {
                        let DeValue::String(s) = item.get_ref() else {
                            return Err(self.error(
                                item.span(),
                                "default_caps entries must be strings, e.g. \"work-disk\"".into(),
                            ));
                        };
                        parse_default_cap(s).map_err(|m| {
                            self.error(item.span(), format!("invalid entry in default_caps: {m}"))
                        })?;
                        caps.push(s.to_string());
                    }
                    cfg.default_caps = caps;
                }
                "vmm" => {
                    let s = self.string(key, value)?;
                    cfg.vmm = s.parse().map_err(|m| self.error(span, m))?;
                }
                "stop_timeout_secs" => {
                    cfg.stop_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "image_layer_max_entries" => {
                    cfg.image_layer_limits.max_entries = self.integer(
                        key,
                        value,
                        1,
                        1 << 40,
                        "a number of entries of at least 1, e.g. 1000000",
                    )? as u64;
                }
                "image_layer_max_size" => {
                    let s = self.string(key, value)?;
                    let size: ByteSize = s.parse().map_err(|_| {
                        self.error(
                            value.span(),
                            format!(
                                "invalid image_layer_max_size {s:?}; use a positive size with an optional K, M, G or T suffix, e.g. \"64G\""
                            ),
                        )
                    })?;
                    cfg.image_layer_limits.max_total_bytes = size.0;
                }
                "image_layer_max_ratio" => {
                    cfg.image_layer_limits.max_ratio = self.integer(
                        key,
                        value,
                        2,
                        1_000_000,
                        "a ratio from 2 to 1000000, e.g. 100 for 100:1",
                    )? as u64;
                }
                "plugin_hook_timeout_secs" => {
                    cfg.plugin_hook_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "agent_bin" => cfg.agent_bin = Some(self.absolute_path(key, value)?),
                "ssh_wait_timeout_secs" => {
                    cfg.ssh_wait_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "ssh_max_output" => {
                    let s = self.string(key, value)?;
                    cfg.ssh_max_output = match s.parse::<ByteSize>() {
                        Ok(size) if size.0 >= 1 << 10 && size.0 <= 1 << 40 => size,
                        _ => {
                            return Err(self.error(
                                value.span(),
                                format!(
                                    "invalid ssh_max_output {s:?}; use a size from 1K to 1T with an optional K, M, G or T suffix, e.g. \"256M\""
                                ),
                            ));
                        }
                    };
                }
                "rootfs_spares" => {
                    cfg.rootfs_spares =
                        self.integer(key, value, 0, 64, "a number of images from 0 (off) to 64")?
                            as u32;
                }
                "warm_pool" => {
                    cfg.warm_pool =
                        self.integer(key, value, 0, 8, "a number of VMs from 0 (off) to 8")? as u32;
                }
                "agent_timeout_secs" => {
                    cfg.agent_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "kernel_catalog_url" => cfg.kernel_catalog_url = Some(self.url(key, value)?),
                "image_catalog_url" => cfg.image_catalog_url = Some(self.url(key, value)?),
                "update_url" => cfg.update_url = Some(self.url(key, value)?),
                "kernel_catalog_file" => {
                    cfg.kernel_catalog_file = Some(self.absolute_path(key, value)?)
                }
                "image_catalog_file" => {
                    cfg.image_catalog_file = Some(self.absolute_path(key, value)?)
                }
                "insecure_registries" => {
                    let DeValue::Array(items) = value.get_ref() else {
                        return Err(self.error(
                            span,
                            "insecure_registries must be a list of \"host:port\" strings, e.g. [\"127.0.0.1:5000\"]".into(),
                        ));
                    };
                    let mut hosts = Vec::new();
                    for item in items.iter() {
                        match item.get_ref() {
                            DeValue::String(h) if valid_registry_host(h) => {
                                hosts.push(h.to_string())
                            }
                            _ => {
                                return Err(self.error(
                                    item.span(),
                                    "insecure_registries entries must be \"host\" or \"host:port\", without a scheme or path, e.g. \"127.0.0.1:5000\"".into(),
                                ));
                            }
                        }
                    }
                    cfg.insecure_registries = hosts;
                }
                "vm_defaults" => {
                    let DeValue::Table(t) = value.get_ref() else {
                        return Err(self.error(
                            span,
                            "vm_defaults must be a table: write [vm_defaults] on its own line, then its keys".into(),
                        ));
                    };
                    self.vm_defaults(t, &mut cfg.vm_defaults)?;
                }
                "network" => {
                    let DeValue::Table(t) = value.get_ref() else {
                        return Err(self.error(
                            span,
                            "network must be a table: write [network] on its own line, then its keys".into(),
                        ));
                    };
                    self.network(t, &mut cfg.network)?;
                }
                "file_sync" => cfg.file_sync = self.file_sync(value)?,
                other => return Err(self.unknown_key(key.span(), other, None, TOP_KEYS)),
            }
        }
        Ok(cfg)
    }

    fn vm_defaults(
        &self,
        table: &DeTable<'_>,
        out: &mut VmDefaultsConfig,
    ) -> Result<(), ConfigError> {
        for (key, value) in sorted(table) {
            match key.get_ref().as_ref() {
                "vcpus" => {
                    out.vcpus = Some(self.integer(
                        key,
                        value,
                        1,
                        MAX_VCPUS,
                        &format!("a whole number from 1 to {MAX_VCPUS}"),
                    )? as u32);
                }
                "memory_mib" => {
                    out.memory_mib = Some(self.integer(
                        key,
                        value,
                        MIN_MEMORY_MIB,
                        i64::from(u32::MAX),
                        &format!("a number of MiB, at least {MIN_MEMORY_MIB}"),
                    )? as u32);
                }
                "disk_size" => {
                    let s = self.string(key, value)?;
                    out.disk_size = Some(s.parse().map_err(|_| {
                        self.error(
                            value.span(),
                            format!(
                                "invalid disk_size {s:?} in [vm_defaults]; use a positive size with an optional K, M, G or T suffix, e.g. \"8G\""
                            ),
                        )
                    })?);
                }
                other => {
                    return Err(self.unknown_key(
                        key.span(),
                        other,
                        Some("vm_defaults"),
                        VM_DEFAULTS_KEYS,
                    ));
                }
            }
        }
        Ok(())
    }

    fn file_sync(&self, value: &Spanned<DeValue<'_>>) -> Result<Vec<FileSyncEntry>, ConfigError> {
        const SHAPE: &str = "write each entry as [[file_sync]] on its own line, then host = \"~/...\" and guest = \"~/...\"";
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.error(
                value.span(),
                format!("file_sync must be a list of tables: {SHAPE}"),
            ));
        };
        let mut entries = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let DeValue::Table(table) = item.get_ref() else {
                return Err(self.error(
                    item.span(),
                    format!("file_sync[{index}] must be a table: {SHAPE}"),
                ));
            };
            let (mut host, mut guest, mut mode) = (None, None, None);
            for (key, value) in sorted(table) {
                let name = key.get_ref().as_ref();
                let text = |v: &Spanned<DeValue<'_>>| match v.get_ref() {
                    DeValue::String(s) => Ok(s.to_string()),
                    other => Err(self.error(
                        v.span(),
                        format!(
                            "file_sync[{index}].{name} must be a string (in quotes), found {}{}",
                            kind(other),
                            if name == "mode" {
                                ", e.g. mode = \"0644\""
                            } else {
                                ""
                            }
                        ),
                    )),
                };
                let at = |m: String| self.error(value.span(), m);
                match name {
                    "host" => host = Some(parse_sync_host(index, &text(value)?).map_err(at)?),
                    "guest" => guest = Some(parse_sync_guest(index, &text(value)?).map_err(at)?),
                    "mode" => mode = Some(parse_sync_mode(index, &text(value)?).map_err(at)?),
                    other => {
                        return Err(self.error(
                            key.span(),
                            format!(
                                "unknown key {other:?} in file_sync[{index}]; valid keys: {}",
                                FILE_SYNC_KEYS.join(", ")
                            ),
                        ));
                    }
                }
            }
            let missing = |field: &str, example: &str| {
                self.error(
                    item.span(),
                    format!("file_sync[{index}] has no {field}; add {field} = {example:?}"),
                )
            };
            let host = host.ok_or_else(|| missing("host", "~/.aws"))?;
            let guest = guest.ok_or_else(|| missing("guest", "~/.aws"))?;
            entries.push(FileSyncEntry { host, guest, mode });
        }
        Ok(entries)
    }

    fn network(&self, table: &DeTable<'_>, out: &mut NetworkConfig) -> Result<(), ConfigError> {
        for (key, value) in sorted(table) {
            match key.get_ref().as_ref() {
                "bridge" => {
                    let s = self.string(key, value)?;
                    if !crate::net::is_valid_ifname(&s) {
                        return Err(self.error(
                            value.span(),
                            format!(
                                "invalid bridge {s:?} in [network]; use an interface name of 1-15 characters [A-Za-z0-9._-], e.g. \"banger0\""
                            ),
                        ));
                    }
                    out.bridge = s;
                }
                "subnet" => {
                    let s = self.string(key, value)?;
                    out.subnet = s.parse().map_err(|e: crate::net::InvalidSubnet| {
                        self.error(value.span(), format!("{e} (in [network])"))
                    })?;
                }
                "dns_port" => {
                    out.dns_port =
                        self.integer(key, value, 1, 65535, "a port number from 1 to 65535")? as u16;
                }
                "dns_upstream" => {
                    let DeValue::Array(items) = value.get_ref() else {
                        return Err(self.error(
                            value.span(),
                            "dns_upstream in [network] must be a list of \"IP[:PORT]\" strings, e.g. [\"192.168.1.1\", \"127.0.0.1:5353\"]".into(),
                        ));
                    };
                    let mut servers = Vec::new();
                    for item in items.iter() {
                        let DeValue::String(s) = item.get_ref() else {
                            return Err(self.error(
                                item.span(),
                                "dns_upstream entries must be strings, e.g. \"192.168.1.1\"".into(),
                            ));
                        };
                        servers.push(crate::net::parse_upstream(s).map_err(|m| {
                            self.error(item.span(), format!("{m} (in [network] dns_upstream)"))
                        })?);
                    }
                    out.dns_upstream = Some(servers);
                }
                other => {
                    return Err(self.unknown_key(key.span(), other, Some("network"), NETWORK_KEYS));
                }
            }
        }
        Ok(())
    }

    fn string(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<String, ConfigError> {
        match value.get_ref() {
            DeValue::String(s) => Ok(s.to_string()),
            other => Err(self.error(
                value.span(),
                format!(
                    "{} must be a string (in quotes), found {}",
                    key.get_ref(),
                    kind(other)
                ),
            )),
        }
    }

    fn boolean(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<bool, ConfigError> {
        match value.get_ref() {
            DeValue::Boolean(b) => Ok(*b),
            other => Err(self.error(
                value.span(),
                format!(
                    "{} must be true or false (no quotes), found {}",
                    key.get_ref(),
                    kind(other)
                ),
            )),
        }
    }

    fn url(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<String, ConfigError> {
        let s = self.string(key, value)?;
        if (s.starts_with("http://") || s.starts_with("https://"))
            && !s.contains(char::is_whitespace)
        {
            Ok(s.trim_end_matches('/').to_string())
        } else {
            Err(self.error(
                value.span(),
                format!(
                    "{} must be an http:// or https:// URL, e.g. \"https://mirror.example/banger\"",
                    key.get_ref()
                ),
            ))
        }
    }

    fn absolute_path(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<PathBuf, ConfigError> {
        let p = PathBuf::from(self.string(key, value)?);
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(self.error(
                value.span(),
                format!(
                    "{} must be an absolute path (starting with /), found {:?}",
                    key.get_ref(),
                    p
                ),
            ))
        }
    }

    fn integer(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
        min: i64,
        max: i64,
        expected: &str,
    ) -> Result<i64, ConfigError> {
        let n = match value.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(self.error(
                value.span(),
                format!(
                    "invalid {} {}; use {expected}",
                    key.get_ref(),
                    self.text.get(value.span()).unwrap_or("").trim()
                ),
            )),
        }
    }

    fn unknown_key(
        &self,
        span: Range<usize>,
        key: &str,
        table: Option<&str>,
        valid: &[&str],
    ) -> ConfigError {
        let place = match table {
            Some(t) => format!(" in [{t}]"),
            None => String::new(),
        };
        self.error(
            span,
            format!(
                "unknown key {key:?}{place}; valid keys: {}",
                valid.join(", ")
            ),
        )
    }

    fn error(&self, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

/// Entries in the order they appear in the file, so the first mistake is the
/// one reported.
fn sorted<'t, 'i>(table: &'t DeTable<'i>) -> Entries<'t, 'i> {
    let mut v: Entries<'t, 'i> = table.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date",
        DeValue::Array(_) => "a list",
        DeValue::Table(_) => "a table",
    }
}

/// 1-based line and character column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Bounds on what one archive may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Maximum sum of regular file sizes, in bytes.
    pub max_total_bytes: u64,
    /// Maximum number of entries.
    pub max_entries: u64,
    /// Maximum expansion of a compressed stream (uncompressed bytes per
    /// compressed byte). Checked where the compressed size is known: OCI
    /// layers (`banger_artifacts::images`); `extract_tar` gets a decoded stream
    /// and relies on the two limits above.
    pub max_ratio: u64,
}

impl Default for ExtractLimits {
    /// 16 GiB, 1,000,000 entries and 100:1: far above any kernel or image
    /// bundle.
    fn default() -> Self {
        ExtractLimits {
            max_total_bytes: 16 << 30,
            max_entries: 1_000_000,
            max_ratio: 100,
        }
    }
}

impl ExtractLimits {
    /// The defaults for one OCI image pull (all layers together): 64 GiB,
    /// 1,000,000 entries, 100:1. Config keys `image_layer_max_*` override.
    pub const OCI_PULL: ExtractLimits = ExtractLimits {
        max_total_bytes: 64 << 30,
        max_entries: 1_000_000,
        max_ratio: 100,
    };
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/home/u/.config/banger/config.toml"))
    }

    /// The rendered error, which is what users see.
    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn vmm_jail_keys_parse_and_default_to_confined() {
        let d = parse("").unwrap().jail_settings_in(None);
        assert_eq!(
            (d.enabled, d.cgroups, d.uid_base, d.jailer_bin),
            (true, true, 0x7000_0000, None)
        );
        let cfg = parse(
            "vmm_jail = false\nvmm_cgroups = false\nvmm_uid_base = 500000\njailer_bin = \"/opt/fc/jailer\"\n",
        )
        .unwrap();
        let j = cfg.qemu_settings_in(None).jail;
        assert_eq!(
            (j.enabled, j.cgroups, j.uid_base, j.jailer_bin),
            (false, false, 500_000, Some(PathBuf::from("/opt/fc/jailer")))
        );
        let e = err("vmm_jail = \"yes\"\n");
        assert!(e.contains("vmm_jail must be true or false"), "{e}");
        let e = err("vmm_uid_base = 0\n");
        assert!(e.contains("invalid vmm_uid_base 0"), "{e}");
        // A jailer on PATH is found without configuration.
        let dir = tempfile::tempdir().unwrap();
        let jailer = dir.path().join("jailer");
        std::fs::write(&jailer, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).unwrap();
        let found = parse("")
            .unwrap()
            .jail_settings_in(Some(dir.path().as_os_str()));
        assert_eq!(found.jailer_bin, Some(jailer));
    }

    #[test]
    fn a_missing_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.path, path);
        assert_eq!(cfg.firecracker_bin, None);
        assert_eq!(cfg.plugins_dir, None);
        assert_eq!(
            cfg.default_caps,
            ["work-disk", "network", "dns", "file-sync", "vsock-agent"]
        );
        assert_eq!(cfg.vmm, VmmChoice::Auto);
        assert_eq!(cfg.stop_timeout_secs, 10);
        assert_eq!(cfg.vm_defaults, VmDefaultsConfig::default());
        assert!(cfg.file_sync.is_empty());
        let d = cfg.resolved_vm_defaults().values;
        assert_eq!(d.disk_size, ByteSize(8 * GIB));
        assert!((1..=4).contains(&d.vcpus));
        assert!((1024..=8192).contains(&d.memory_mib));
        // An empty file is the same as no file.
        let empty = parse("").unwrap();
        assert_eq!(
            (empty.vm_defaults, empty.default_caps, empty.file_sync),
            (cfg.vm_defaults, cfg.default_caps, cfg.file_sync)
        );
    }

    #[test]
    fn qemu_keys_parse_and_default_to_path_search_and_auto() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.qemu_accel, QemuAccel::Auto);
        let empty = tempfile::tempdir().unwrap();
        let s = cfg.qemu_settings_in(Some(empty.path().as_os_str()));
        assert_eq!(s.qemu_bin, Path::new("qemu-system-x86_64"));
        assert_eq!(s.vhost_device_vsock_bin, Path::new("vhost-device-vsock"));

        let bin = empty.path().join("qemu-system-x86_64");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let s = cfg.qemu_settings_in(Some(empty.path().as_os_str()));
        assert_eq!(s.qemu_bin, bin);

        let cfg = parse(
            "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nqemu_bin = \"/opt/q\"\nvhost_device_vsock_bin = \"/opt/v\"\n",
        )
        .unwrap();
        assert_eq!(cfg.vmm, VmmChoice::Fixed(VmmKind::Qemu));
        let s = cfg.qemu_settings_in(None);
        assert_eq!(
            (s.qemu_bin, s.vhost_device_vsock_bin, s.accel),
            (
                PathBuf::from("/opt/q"),
                PathBuf::from("/opt/v"),
                QemuAccel::Tcg
            )
        );
        assert_eq!(s.agent_transport, AgentTransport::Serial, "the default");

        let cfg = parse("qemu_agent_transport = \"vsock\"\n").unwrap();
        assert_eq!(cfg.qemu_agent_transport, AgentTransport::Vsock);
        let s = cfg.qemu_settings_in(None);
        assert_eq!(s.agent_transport, AgentTransport::Vsock);
        assert_eq!(s.bridge_bin, None, "no bridge for vsock");
        let msg = err("qemu_agent_transport = \"virtio\"\n");
        assert!(msg.contains("valid values: vsock, serial"), "{msg}");
    }

    #[test]
    fn vmm_takes_auto_firecracker_or_qemu() {
        assert_eq!(parse("vmm = \"auto\"").unwrap().vmm, VmmChoice::Auto);
        assert_eq!(
            parse("vmm = \"firecracker\"").unwrap().vmm,
            VmmChoice::Fixed(VmmKind::Firecracker)
        );
        let msg = err("\n\nvmm = \"Auto\"\n");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("unknown vmm \"Auto\""), "{msg}");
        assert!(err("vmm = 1").contains("vmm"));
    }

    #[test]
    fn backend_facts_name_a_bad_firecracker_bin() {
        let mut cfg = parse("").unwrap();
        cfg.firecracker_bin = Some(PathBuf::from("/nonexistent/firecracker"));
        assert_eq!(
            cfg.backend_facts().firecracker,
            Err("firecracker_bin /nonexistent/firecracker is not an executable file".to_string())
        );
        // An explicit choice does not depend on the host.
        cfg.vmm = VmmChoice::Fixed(VmmKind::Firecracker);
        let plan = cfg.backend_plan(None);
        assert_eq!(
            (plan.vmm, plan.vmm_why.as_str()),
            (VmmKind::Firecracker, "config")
        );
        assert_eq!(cfg.backend_plan(Some(VmmKind::Qemu)).vmm_why, "--vmm");
    }

    #[test]
    fn bad_qemu_keys_name_the_valid_values() {
        let msg = err("qemu_accel = \"hvf\"");
        assert!(msg.contains("line 1"), "{msg}");
        assert!(msg.contains("valid values: auto, kvm, tcg"), "{msg}");
        assert!(err("qemu_bin = \"qemu\"").contains("absolute path"));
        assert!(err("vmm = \"xen\"").contains("valid values: auto, firecracker, qemu"));
    }

    fn host(cpus: u64, ram: u64) -> HostFacts {
        HostFacts {
            cpus: Some(cpus),
            ram_bytes: Some(ram),
        }
    }

    #[test]
    fn unset_vm_defaults_scale_with_the_host_within_bounds() {
        let unset = VmDefaultsConfig::default();
        let values = |h: HostFacts| resolve_vm_defaults(&unset, &h).values;
        // A quarter of the CPUs, an eighth of the RAM...
        let mid = values(host(8, 16 * GIB));
        assert_eq!((mid.vcpus, mid.memory_mib), (2, 2048));
        // ...at least 1 vCPU and 1 GiB on a small host...
        let small = values(host(2, 2 * GIB));
        assert_eq!((small.vcpus, small.memory_mib), (1, 1024));
        // ...at most 4 vCPUs and 8 GiB on a big one.
        let big = values(host(64, 256 * GIB));
        assert_eq!((big.vcpus, big.memory_mib), (4, 8192));
        assert_eq!(values(host(16, 32 * GIB)).vcpus, 4);
        // The disk does not depend on the host.
        assert_eq!(big.disk_size, ByteSize(8 * GIB));
        assert_eq!(small.disk_size, ByteSize(8 * GIB));

        let r = resolve_vm_defaults(&unset, &host(8, 16 * GIB));
        assert_eq!(
            (r.vcpus_from, r.memory_from, r.disk_from),
            (
                DefaultSource::Host,
                DefaultSource::Host,
                DefaultSource::Builtin
            )
        );
    }

    #[test]
    fn an_unreadable_host_falls_back_to_builtin_floors() {
        let r = resolve_vm_defaults(&VmDefaultsConfig::default(), &HostFacts::default());
        assert_eq!(r.values, VmDefaults::BUILTIN);
        assert_eq!((r.values.vcpus, r.values.memory_mib), (1, 1024));
        assert_eq!(r.vcpus_from, DefaultSource::Builtin);
        assert_eq!(r.memory_from, DefaultSource::Builtin);
        // A host reporting zero is as good as unreadable.
        let zero = resolve_vm_defaults(&VmDefaultsConfig::default(), &host(0, 0));
        assert_eq!(zero.values, VmDefaults::BUILTIN);
        assert_eq!(zero.memory_from, DefaultSource::Builtin);
    }

    #[test]
    fn configured_vm_defaults_win_over_the_host_key_by_key() {
        let cfg = parse("[vm_defaults]\nmemory_mib = 300\n").unwrap();
        let r = resolve_vm_defaults(&cfg.vm_defaults, &host(64, 256 * GIB));
        assert_eq!(
            r.values,
            VmDefaults {
                vcpus: 4,
                memory_mib: 300,
                disk_size: ByteSize(8 * GIB)
            }
        );
        assert_eq!(
            (r.vcpus_from, r.memory_from, r.disk_from),
            (
                DefaultSource::Host,
                DefaultSource::Config,
                DefaultSource::Builtin
            )
        );
        let cfg = parse("[vm_defaults]\nvcpus = 8\ndisk_size = \"2G\"\n").unwrap();
        let r = resolve_vm_defaults(&cfg.vm_defaults, &HostFacts::default());
        assert_eq!(
            (r.values.vcpus, r.values.memory_mib, r.values.disk_size),
            (8, 1024, ByteSize(2 * GIB))
        );
        assert_eq!(r.disk_from, DefaultSource::Config);
        assert_eq!(r.values.to_string(), "8 vcpu · 1024 MiB · 2G disk");
        let sources = [r.vcpus_from, r.memory_from].map(|s| s.to_string());
        assert_eq!(sources, ["config", "built-in"]);
    }

    #[test]
    fn the_live_host_resolves_within_the_host_bounds() {
        let r = Config::defaults(Path::new("/c.toml")).resolved_vm_defaults();
        assert!((1..=4).contains(&r.values.vcpus), "{r:?}");
        assert!((1024..=8192).contains(&r.values.memory_mib), "{r:?}");
    }

    #[test]
    fn ssh_key_path_is_absolute_or_under_home() {
        let home = Some(Path::new("/home/u"));
        assert_eq!(
            expand_home("~/keys/banger", home).unwrap(),
            PathBuf::from("/home/u/keys/banger")
        );
        assert_eq!(
            expand_home("/srv/k/id", home).unwrap(),
            PathBuf::from("/srv/k/id")
        );
        for bad in ["keys/id", "~", "~/", "~other/id", "/a/../b", "/dir/"] {
            let e = expand_home(bad, home).unwrap_err();
            assert!(e.contains("ssh_key_path"), "{bad}: {e}");
        }
        assert!(expand_home("~/id", None).unwrap_err().contains("HOME"));
        let cfg = parse("ssh_key_path = \"/k/id_banger\"\n").unwrap();
        assert_eq!(cfg.ssh_key_path, Some(PathBuf::from("/k/id_banger")));
        let e = parse("ssh_key_path = \"rel\"\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("absolute"), "{e}");
    }

    #[test]
    fn default_image_name_is_an_image_name() {
        let cfg = parse("default_image_name = \"debian-bookworm\"\n").unwrap();
        assert_eq!(cfg.default_image_name.as_deref(), Some("debian-bookworm"));
        assert_eq!(parse("").unwrap().default_image_name, None);
        let e = parse("default_image_name = \"../x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("default_image_name") && e.contains("line 1"),
            "{e}"
        );
        let e = parse("default_image_name = 3\n").unwrap_err().to_string();
        assert!(e.contains("must be a string"), "{e}");
    }

    #[test]
    fn parses_every_key() {
        let cfg = parse(
            r#"
firecracker_bin = "/opt/fc/firecracker"
plugins_dir = "/srv/banger-plugins"
default_caps = ["work-disk", "shared-mount:host=/src,guest=/mnt/src", "nat"]
vmm = "firecracker"
stop_timeout_secs = 30
plugin_hook_timeout_secs = 5

[vm_defaults]
vcpus = 3
memory_mib = 0x800
disk_size = "20G"
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.firecracker_bin.as_deref(),
            Some(Path::new("/opt/fc/firecracker"))
        );
        assert_eq!(
            cfg.plugins_dir.as_deref(),
            Some(Path::new("/srv/banger-plugins"))
        );
        assert_eq!(cfg.stop_timeout_secs, 30);
        assert_eq!(cfg.plugin_hook_timeout_secs, 5);
        assert_eq!(
            cfg.vm_defaults,
            VmDefaultsConfig {
                vcpus: Some(3),
                memory_mib: Some(2048),
                disk_size: Some(ByteSize(20 * GIB))
            }
        );
        let caps = cfg.default_caps().unwrap();
        let names: Vec<&str> = caps.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["work-disk", "shared-mount", "nat"]);
        assert_eq!(caps[1].options["guest"], "/mnt/src");
        let paths =
            Paths::from_lookup(|k| (k == "HOME").then(|| PathBuf::from("/home/u")), 1000).unwrap();
        assert_eq!(
            cfg.plugins_dir(&paths),
            PathBuf::from("/srv/banger-plugins")
        );
        assert_eq!(
            Config::defaults(Path::new("/c")).plugins_dir(&paths),
            PathBuf::from("/home/u/.config/banger/plugins")
        );
    }

    #[test]
    fn unknown_key_in_a_table_names_file_line_table_and_valid_keys() {
        let msg = err("stop_timeout_secs = 5\n\n[vm_defaults]\nvcpu = 2\n");
        assert!(
            msg.starts_with("/home/u/.config/banger/config.toml line 4, column 1: "),
            "{msg}"
        );
        assert!(
            msg.ends_with(
                "unknown key \"vcpu\" in [vm_defaults]; valid keys: vcpus, memory_mib, disk_size"
            ),
            "{msg}"
        );
    }

    #[test]
    fn unknown_top_level_key_lists_valid_keys() {
        let msg = err("vmm = \"firecracker\"\nfirecracker = \"/bin/fc\"\n");
        assert!(msg.contains("line 2, column 1"), "{msg}");
        assert!(msg.contains("unknown key \"firecracker\";"), "{msg}");
        assert!(
            msg.contains("valid keys: firecracker_bin, plugins_dir"),
            "{msg}"
        );
    }

    #[test]
    fn the_first_mistake_in_the_file_is_reported() {
        let msg = err("zzz = 1\naaa = 2\n");
        assert!(msg.contains("line 1") && msg.contains("\"zzz\""), "{msg}");
    }

    #[test]
    fn rejects_zero_vcpus_naming_the_key_and_range() {
        let msg = err("[vm_defaults]\nvcpus = 0\n");
        assert!(msg.contains("line 2, column 9"), "{msg}");
        assert!(
            msg.contains("invalid vcpus 0; use a whole number from 1 to 32"),
            "{msg}"
        );
        let msg = err("[vm_defaults]\nvcpus = \"2\"\n");
        assert!(msg.contains("invalid vcpus \"2\""), "{msg}");
    }

    #[test]
    fn rejects_too_little_memory() {
        let msg = err("[vm_defaults]\nmemory_mib = 64\n");
        assert!(
            msg.contains("invalid memory_mib 64; use a number of MiB, at least 128"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_a_bad_disk_size_with_an_example() {
        let msg = err("[vm_defaults]\ndisk_size = \"8X\"\n");
        assert!(msg.contains("line 2, column 13"), "{msg}");
        assert!(
            msg.contains("invalid disk_size \"8X\" in [vm_defaults]"),
            "{msg}"
        );
        assert!(msg.contains("e.g. \"8G\""), "{msg}");
        let msg = err("[vm_defaults]\ndisk_size = 8\n");
        assert!(msg.contains("disk_size must be a string"), "{msg}");
    }

    #[test]
    fn rejects_relative_paths() {
        let msg = err("firecracker_bin = \"bin/firecracker\"\n");
        assert!(msg.contains("line 1, column 19"), "{msg}");
        assert!(
            msg.contains("firecracker_bin must be an absolute path"),
            "{msg}"
        );
        let msg = err("plugins_dir = \"~/plugins\"\n");
        assert!(
            msg.contains("plugins_dir must be an absolute path"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_bad_default_caps() {
        let msg = err("default_caps = \"work-disk\"\n");
        assert!(
            msg.contains("default_caps must be a list of strings"),
            "{msg}"
        );
        let msg = err("default_caps = [\"work-disk\", \"-nat\"]\n");
        assert!(msg.contains("line 1, column 30"), "{msg}");
        assert!(msg.contains("leave \"nat\" out of the list"), "{msg}");
        let msg = err("default_caps = [\"Bad Name\"]\n");
        assert!(msg.contains("invalid entry in default_caps"), "{msg}");
        let mut cfg = parse("default_caps = []\n").unwrap();
        assert!(cfg.default_caps().unwrap().is_empty());
        cfg.default_caps = vec!["-nat".into()];
        let msg = cfg.default_caps().unwrap_err().to_string();
        assert!(msg.contains("Invalid entry in default_caps"), "{msg}");
    }

    #[test]
    fn rejects_unknown_vmm_and_bad_timeouts() {
        let msg = err("vmm = \"qemu-kvm\"\n");
        assert!(
            msg.contains("unknown vmm \"qemu-kvm\"; valid values: auto, firecracker, qemu"),
            "{msg}"
        );
        let msg = err("stop_timeout_secs = 0\n");
        assert!(msg.contains("invalid stop_timeout_secs 0"), "{msg}");
        let msg = err("vm_defaults = 3\n");
        assert!(msg.contains("write [vm_defaults] on its own line"), "{msg}");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let msg = err("vmm = \"firecracker\"\nstop_timeout_secs = \n");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("invalid TOML"), "{msg}");
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let err = Config::load(dir.path()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    }

    #[test]
    fn firecracker_is_found_in_config_or_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("firecracker");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let empty = tempfile::tempdir().unwrap();
        let path_var = std::env::join_paths([empty.path(), dir.path()]).unwrap();

        let mut cfg = Config::defaults(Path::new("/etc/banger/config.toml"));
        assert_eq!(cfg.firecracker_bin_in(Some(&path_var)).unwrap(), bin);

        let msg = cfg
            .firecracker_bin_in(Some(empty.path().as_os_str()))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("install firecracker or set firecracker_bin in /etc/banger/config.toml"),
            "{msg}"
        );

        cfg.firecracker_bin = Some(bin.clone());
        assert_eq!(cfg.firecracker_bin_in(None).unwrap(), bin);
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o644)).unwrap();
        let msg = cfg.firecracker_bin_in(None).unwrap_err().to_string();
        assert!(msg.contains("is not an executable file"), "{msg}");
    }

    #[test]
    fn ssh_wait_timeout_defaults_to_two_minutes_and_is_checked() {
        assert_eq!(parse("").unwrap().ssh_wait_timeout_secs, 120);
        let cfg = parse("ssh_wait_timeout_secs = 3\n").unwrap();
        assert_eq!(cfg.ssh_wait_timeout_secs, 3);
        let msg = err("ssh_wait_timeout_secs = 0\n");
        assert!(msg.contains("invalid ssh_wait_timeout_secs 0"), "{msg}");
        assert_eq!(parse("").unwrap().ssh_max_output, ByteSize(64 << 20));
        assert_eq!(parse("").unwrap().rootfs_spares, DEFAULT_ROOTFS_SPARES);
        assert_eq!(parse("rootfs_spares = 0\n").unwrap().rootfs_spares, 0);
        let msg = err("rootfs_spares = 65\n");
        assert!(
            msg.contains("rootfs_spares") && msg.contains("0 (off) to 64"),
            "{msg}"
        );
        assert_eq!(parse("").unwrap().warm_pool, 0);
        assert_eq!(parse("warm_pool = 2\n").unwrap().warm_pool, 2);
        let msg = err("warm_pool = 9\n");
        assert!(
            msg.contains("warm_pool") && msg.contains("0 (off) to 8"),
            "{msg}"
        );
        let cfg = parse("ssh_max_output = \"256M\"\n").unwrap();
        assert_eq!(cfg.ssh_max_output, ByteSize(256 << 20));
        let msg = err("ssh_max_output = \"12\"\n");
        assert!(msg.contains("invalid ssh_max_output \"12\""), "{msg}");
    }

    #[test]
    fn agent_keys_parse_default_and_are_checked() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.agent_timeout_secs, 60);
        assert_eq!(cfg.agent_bin, None);
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("banger-agent");
        std::fs::write(&bin, elf(true, true, None)).unwrap();
        let cfg = parse(&format!(
            "agent_bin = {:?}\nagent_timeout_secs = 5\n",
            bin.display().to_string()
        ))
        .unwrap();
        assert_eq!(cfg.agent_timeout_secs, 5);
        assert_eq!(cfg.agent_bin().unwrap(), bin);
        let missing = parse("agent_bin = \"/nonexistent/banger-agent\"\n").unwrap();
        let msg = missing.agent_bin().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/banger-agent"), "{msg}");
        assert!(msg.contains("fix the path"), "{msg}");
        let msg = err("agent_bin = \"banger-agent\"\n");
        assert!(msg.contains("agent_bin must be an absolute path"), "{msg}");
        let msg = err("agent_timeout_secs = 0\n");
        assert!(msg.contains("invalid agent_timeout_secs 0"), "{msg}");
    }

    /// A minimal ELF executable: 64- or 32-bit, little- or big-endian,
    /// with a `PT_LOAD` program header and, given `interp`, a `PT_INTERP`
    /// one pointing at that loader path.
    fn elf(wide: bool, le: bool, interp: Option<&str>) -> Vec<u8> {
        let put = |out: &mut Vec<u8>, v: u64, size: usize| {
            let bytes = v.to_le_bytes();
            let mut b = bytes[..size].to_vec();
            if !le {
                b.reverse();
            }
            out.extend_from_slice(&b);
        };
        let (ehsize, phentsize) = if wide { (64u64, 56u64) } else { (52, 32) };
        let word = if wide { 8 } else { 4 };
        let phnum = 1 + u64::from(interp.is_some());
        let interp_off = ehsize + phentsize * phnum;
        let mut out = b"\x7fELF".to_vec();
        out.extend_from_slice(&[if wide { 2 } else { 1 }, if le { 1 } else { 2 }, 1]);
        out.resize(16, 0);
        put(&mut out, 2, 2); // e_type EXEC
        put(&mut out, 62, 2); // e_machine
        put(&mut out, 1, 4); // e_version
        put(&mut out, 0x40_1000, word); // e_entry
        put(&mut out, ehsize, word); // e_phoff
        put(&mut out, 0, word); // e_shoff
        put(&mut out, 0, 4); // e_flags
        put(&mut out, ehsize, 2);
        put(&mut out, phentsize, 2);
        put(&mut out, phnum, 2);
        put(&mut out, 0, 2); // e_shentsize
        put(&mut out, 0, 2); // e_shnum
        put(&mut out, 0, 2); // e_shstrndx
        assert_eq!(out.len() as u64, ehsize);
        let ph = |out: &mut Vec<u8>, kind: u64, off: u64, size: u64| {
            put(out, kind, 4);
            if wide {
                put(out, 5, 4); // p_flags
            }
            put(out, off, word); // p_offset
            put(out, 0x40_0000, word); // p_vaddr
            put(out, 0x40_0000, word); // p_paddr
            put(out, size, word); // p_filesz
            put(out, size, word); // p_memsz
            if !wide {
                put(out, 5, 4);
            }
            put(out, 0x1000, word); // p_align
        };
        if let Some(i) = interp {
            ph(&mut out, 3, interp_off, i.len() as u64 + 1);
        }
        ph(&mut out, 1, 0, 0x100);
        if let Some(i) = interp {
            out.extend_from_slice(i.as_bytes());
            out.push(0);
        }
        out
    }

    #[test]
    fn elf_interpreter_reads_pt_interp_in_every_class_and_byte_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bin");
        for wide in [true, false] {
            for le in [true, false] {
                std::fs::write(&f, elf(wide, le, None)).unwrap();
                assert_eq!(elf_interpreter(&f).unwrap(), None, "wide={wide} le={le}");
                std::fs::write(&f, elf(wide, le, Some("/lib/ld-test.so.2"))).unwrap();
                assert_eq!(
                    elf_interpreter(&f).unwrap().as_deref(),
                    Some("/lib/ld-test.so.2"),
                    "wide={wide} le={le}"
                );
            }
        }
        let mut bare = b"\x7fELF\x02\x01\x01".to_vec();
        bare.resize(64, 0);
        std::fs::write(&f, bare).unwrap();
        assert_eq!(elf_interpreter(&f).unwrap(), None, "no program headers");
        std::fs::write(&f, b"#!/bin/sh\nexit 0\n").unwrap();
        let err = elf_interpreter(&f).unwrap_err();
        assert_eq!(err.to_string(), "not an ELF file");
        let mut cut = elf(true, true, Some("/lib/ld-test.so.2"));
        cut.truncate(70);
        std::fs::write(&f, cut).unwrap();
        assert!(elf_interpreter(&f).is_err());
    }

    #[test]
    fn a_dynamically_linked_agent_is_refused_naming_build_agent() {
        // The host's own /bin/true is a dynamically linked executable.
        let bin = Path::new("/bin/true");
        match elf_interpreter(bin) {
            Ok(Some(_)) => {}
            other => {
                eprintln!(
                    "SKIP a_dynamically_linked_agent_is_refused_naming_build_agent: /bin/true is not dynamic here ({other:?})"
                );
                return;
            }
        }
        let cfg = parse("agent_bin = \"/bin/true\"\n").unwrap();
        let msg = cfg.agent_bin().unwrap_err().to_string();
        assert!(
            msg.contains("/bin/true is a dynamically linked banger-agent"),
            "{msg}"
        );
        assert!(msg.contains("scripts/build-agent"), "{msg}");
        assert!(msg.contains("ld-linux"), "names the loader: {msg}");

        // scripts/build-agent's agent, a static-pie (PT_DYNAMIC but no
        // PT_INTERP), when one was built.
        let built = std::env::var_os("CARGO_TARGET_DIR")
            .map(|t| Path::new(&t).join(AGENT_BIN_NAME))
            .filter(|p| p.is_file());
        match built {
            Some(p) => check_static_agent(&p).unwrap(),
            None => {
                eprintln!("no scripts/build-agent output under CARGO_TARGET_DIR; its check skipped")
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("banger-agent");
        std::fs::write(&script, b"#!/bin/sh\n").unwrap();
        let msg = check_static_agent(&script).unwrap_err().to_string();
        assert!(
            msg.contains("not a banger-agent executable (not an ELF file)"),
            "{msg}"
        );
    }

    #[test]
    fn catalog_urls_and_insecure_registries_parse_and_are_checked() {
        let cfg = Config::parse(
            "kernel_catalog_url = \"http://127.0.0.1:8080/k/\"\nimage_catalog_url = \"https://m.example/i\"\ninsecure_registries = [\"127.0.0.1:5000\", \"localhost\"]\n",
            Path::new("/c/config.toml"),
        )
        .unwrap();
        assert_eq!(
            cfg.kernel_catalog_url.as_deref(),
            Some("http://127.0.0.1:8080/k")
        );
        assert_eq!(
            cfg.image_catalog_url.as_deref(),
            Some("https://m.example/i")
        );
        assert_eq!(cfg.insecure_registries, ["127.0.0.1:5000", "localhost"]);

        let msg = err("kernel_catalog_url = \"ftp://x\"\n");
        assert!(
            msg.contains("kernel_catalog_url must be an http:// or https:// URL"),
            "{msg}"
        );
        let msg = err("insecure_registries = [\"http://127.0.0.1:5000\"]\n");
        assert!(msg.contains("without a scheme"), "{msg}");
        let msg = err("insecure_registries = \"127.0.0.1:5000\"\n");
        assert!(msg.contains("must be a list"), "{msg}");
    }

    #[test]
    fn image_layer_limits_default_parse_and_are_checked() {
        let d = Config::defaults(Path::new("/c.toml")).image_layer_limits;
        assert_eq!(
            (d.max_entries, d.max_total_bytes, d.max_ratio),
            (1_000_000, 64 << 30, 100)
        );
        let cfg = parse(
            "image_layer_max_entries = 5\nimage_layer_max_size = \"2G\"\nimage_layer_max_ratio = 1000\n",
        )
        .unwrap();
        let l = cfg.image_layer_limits;
        assert_eq!(
            (l.max_entries, l.max_total_bytes, l.max_ratio),
            (5, 2 << 30, 1000)
        );
        let msg = err("image_layer_max_size = \"lots\"\n");
        assert!(
            msg.contains("invalid image_layer_max_size \"lots\""),
            "{msg}"
        );
        let msg = err("image_layer_max_ratio = 1\n");
        assert!(msg.contains("image_layer_max_ratio"), "{msg}");
        let msg = err("image_layer_max_entries = 0\n");
        assert!(msg.contains("image_layer_max_entries"), "{msg}");
    }

    #[test]
    fn network_table_has_defaults_and_checks_each_key() {
        let d = Config::defaults(Path::new("/c.toml")).network;
        assert_eq!(d.bridge, "banger0");
        assert_eq!(d.subnet.to_string(), "172.30.0.0/24");
        assert_eq!(d.dns_port, 53053);
        let cfg = Config::parse(
            "[network]\nbridge = \"br-test\"\nsubnet = \"10.44.0.0/16\"\ndns_port = 5454\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        assert_eq!(cfg.network.bridge, "br-test");
        assert_eq!(cfg.network.subnet.to_string(), "10.44.0.0/16");
        assert_eq!(cfg.network.dns_port, 5454);
        assert_eq!(
            cfg.network.dns_upstream, None,
            "unset: the host's resolv.conf"
        );
        let cfg = Config::parse(
            "[network]\ndns_upstream = [\"192.0.2.1\", \"127.0.0.1:5353\", \"[2001:db8::1]:54\"]\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        let want: Vec<std::net::SocketAddr> =
            ["192.0.2.1:53", "127.0.0.1:5353", "[2001:db8::1]:54"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        assert_eq!(cfg.network.dns_upstream, Some(want));
        let msg = err("[network]\ndns_upstream = [\"dns.example\"]\n");
        assert!(
            msg.contains("line 2") && msg.contains("\"dns.example\" is not an upstream DNS server"),
            "{msg}"
        );
        let msg = err("[network]\ndns_upstream = \"192.0.2.1\"\n");
        assert!(msg.contains("must be a list"), "{msg}");

        let msg = err("[network]\nsubnet = \"10.44.0.5/16\"\n");
        assert!(msg.contains("line 2") && msg.contains("CIDR"), "{msg}");
        let msg = err("[network]\nbridge = \"a bridge\"\n");
        assert!(msg.contains("invalid bridge"), "{msg}");
        let msg = err("[network]\ndns_port = 0\n");
        assert!(msg.contains("invalid dns_port"), "{msg}");
        let msg = err("[network]\nmtu = 1500\n");
        assert!(
            msg.contains("valid keys: bridge, subnet, dns_port, dns_upstream"),
            "{msg}"
        );
    }

    #[test]
    fn file_sync_entries_parse_with_home_and_guest_mapping() {
        let cfg = parse(
            r#"
[[file_sync]]
host = "~/.local/share/opencode/auth.json"
guest = "~/.local/share/opencode/auth.json"

[[file_sync]]
host = "/etc/aws"
guest = "/root/.aws/"

[[file_sync]]
host = "~/bin/tool"
guest = "~/bin//./tool"
mode = "0755"

[[file_sync]]
host = "/srv/key"
guest = "/root/key"
mode = "600"
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.file_sync,
            [
                FileSyncEntry {
                    host: SyncSource::Home(".local/share/opencode/auth.json".into()),
                    guest: "/root/.local/share/opencode/auth.json".into(),
                    mode: None,
                },
                FileSyncEntry {
                    host: SyncSource::Absolute("/etc/aws".into()),
                    guest: "/root/.aws".into(),
                    mode: None,
                },
                FileSyncEntry {
                    host: SyncSource::Home("bin/tool".into()),
                    guest: "/root/bin/tool".into(),
                    mode: Some(0o755),
                },
                FileSyncEntry {
                    host: SyncSource::Absolute("/srv/key".into()),
                    guest: "/root/key".into(),
                    mode: Some(0o600),
                },
            ]
        );
        let home = cfg.file_sync[0].host.resolve(Some(Path::new("/home/u")));
        assert_eq!(
            home.as_deref(),
            Some(Path::new("/home/u/.local/share/opencode/auth.json"))
        );
        assert_eq!(cfg.file_sync[0].host.resolve(None), None);
        assert_eq!(
            cfg.file_sync[1].host.resolve(None).as_deref(),
            Some(Path::new("/etc/aws"))
        );
        assert_eq!(cfg.file_sync[2].host.to_string(), "~/bin/tool");
    }

    /// A config whose second entry has `line` as its last line.
    fn second_entry(line: &str) -> String {
        format!(
            "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\n\n[[file_sync]]\nhost = \"~/b\"\nguest = \"~/b\"\n{line}\n"
        )
    }

    /// The error for a second entry whose `key` is `value` (a TOML value),
    /// written on line 8.
    fn entry_err(key: &str, value: &str) -> String {
        let text = second_entry("").replace(&format!("{key} = \"~/b\"\n"), "")
            + &format!("{key} = {value}\n");
        err(&text)
    }

    #[test]
    fn file_sync_host_rules_name_the_entry_field_and_fix() {
        let cases: &[(&str, &str)] = &[
            (
                "\"\"",
                "file_sync[1].host is empty; name a file or directory",
            ),
            (
                "\"aws\"",
                "file_sync[1].host \"aws\" is relative; use an absolute path or ~/...",
            ),
            ("\"./aws\"", "is relative"),
            (
                "\"~bob/.aws\"",
                "file_sync[1].host \"~bob/.aws\": ~user paths are not supported; use ~/...",
            ),
            ("\"~\"", "~user paths are not supported"),
            ("\"~/\"", "names your whole home directory"),
            (
                "\"/etc/../root/x\"",
                "file_sync[1].host \"/etc/../root/x\" contains '..'; write the path without it",
            ),
            ("\"~/a/../../etc\"", "contains '..'"),
            (
                "5",
                "file_sync[1].host must be a string (in quotes), found an integer",
            ),
        ];
        for (value, want) in cases {
            let msg = entry_err("host", value);
            assert!(msg.contains(want), "host = {value}: {msg}");
            assert!(msg.contains("line 8"), "host = {value}: {msg}");
        }
    }

    #[test]
    fn file_sync_guest_rules_name_the_entry_field_and_fix() {
        let cases: &[(&str, &str)] = &[
            (
                "\"\"",
                "file_sync[1].guest is empty; name a path under /root",
            ),
            (
                "\".aws\"",
                "file_sync[1].guest \".aws\" is relative; use ~/... or /root/...",
            ),
            (
                "\"/etc/passwd\"",
                "file_sync[1].guest \"/etc/passwd\" is not below /root, the guest's work disk; use ~/NAME or /root/NAME",
            ),
            ("\"/rootkit/x\"", "is not below /root"),
            ("\"/root\"", "is not below /root"),
            ("\"~\"", "is not below /root"),
            ("\"~/\"", "is not below /root"),
            (
                "\"~bob/x\"",
                "file_sync[1].guest \"~bob/x\": ~user paths are not supported",
            ),
            (
                "\"/root/../etc/x\"",
                "file_sync[1].guest \"/root/../etc/x\" contains '..'",
            ),
            ("\"~/x/../../etc\"", "contains '..'"),
            (
                "[\"~/x\"]",
                "file_sync[1].guest must be a string (in quotes), found a list",
            ),
        ];
        for (value, want) in cases {
            let msg = entry_err("guest", value);
            assert!(msg.contains(want), "guest = {value}: {msg}");
        }
    }

    #[test]
    fn file_sync_modes_are_octal_strings() {
        for bad in [
            "\"644x\"",
            "\"0899\"",
            "\"64\"",
            "\"00644\"",
            "\"rw-r--r--\"",
            "\"\"",
        ] {
            let msg = entry_err("mode", bad);
            assert!(
                msg.contains("file_sync[1].mode")
                    && msg.contains("is not an octal mode; write 3 or 4 octal digits in quotes, e.g. \"0644\" or \"600\""),
                "mode = {bad}: {msg}"
            );
        }
        let msg = entry_err("mode", "644");
        assert!(
            msg.contains("file_sync[1].mode must be a string (in quotes), found an integer, e.g. mode = \"0644\""),
            "{msg}"
        );
        let ok = parse(&second_entry("mode = \"4755\"")).unwrap();
        assert_eq!(ok.file_sync[1].mode, Some(0o4755));
    }

    #[test]
    fn file_sync_shape_errors_name_the_entry() {
        let msg = err(&second_entry("owner = \"me\""));
        assert!(msg.contains("line 8, column 1"), "{msg}");
        assert!(
            msg.contains("unknown key \"owner\" in file_sync[1]; valid keys: host, guest, mode"),
            "{msg}"
        );
        let msg = err("[[file_sync]]\nhost = \"~/a\"\n");
        assert!(
            msg.contains("file_sync[0] has no guest; add guest = \"~/.aws\""),
            "{msg}"
        );
        let msg = err("[[file_sync]]\nguest = \"~/a\"\n");
        assert!(
            msg.contains("file_sync[0] has no host; add host ="),
            "{msg}"
        );
        let msg = err("file_sync = \"~/.aws\"\n");
        assert!(
            msg.contains("file_sync must be a list of tables: write each entry as [[file_sync]]"),
            "{msg}"
        );
        let msg = err("file_sync = [\"~/.aws\"]\n");
        assert!(msg.contains("file_sync[0] must be a table"), "{msg}");
        // The inline form is the same list of tables.
        let cfg = parse("file_sync = [{ host = \"/h\", guest = \"~/g\" }]\n").unwrap();
        assert_eq!(cfg.file_sync[0].guest, Path::new("/root/g"));
    }
}
