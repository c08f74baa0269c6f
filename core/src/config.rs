//! `config.toml`: the user's settings, every key optional.
//!
//! The file is walked by hand over toml's spanned document rather than
//! through serde, so every error can say which file, line, table and key is
//! wrong, what was expected and how to fix it. See `docs/config.md`.

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::model::{
    ByteSize, CapChoice, EnabledCap, MAX_VCPUS, MIN_MEMORY_MIB, VmmKind, resolve_caps,
};
use crate::paths::Paths;
use crate::vmm::qemu::{QemuAccel, QemuSettings};

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

/// Size and shape of new VMs when `vm create` does not say (`[vm_defaults]`).
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
    /// Defaults sized for a host with `cpus` CPUs and `ram_bytes` of memory:
    /// a quarter of the CPUs (1 to 4) and an eighth of the RAM (512 MiB to
    /// 8 GiB), so a few VMs fit beside the developer's own work.
    pub fn for_host(cpus: u64, ram_bytes: u64) -> Self {
        VmDefaults {
            vcpus: (cpus / 4).clamp(1, 4) as u32,
            memory_mib: (ram_bytes / 8 / (1 << 20)).clamp(512, 8192) as u32,
            disk_size: ByteSize(8 << 30),
        }
    }

    /// Defaults for this host.
    pub fn for_this_host() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Self::for_host(cpus, host_ram_bytes())
    }
}

/// Total physical memory, or 0 (which yields the minimum default) if unknown.
fn host_ram_bytes() -> u64 {
    // SAFETY: sysconf only reads system information and has no memory-safety
    // preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page_size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(page_size as u64)
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
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: "banger0".to_string(),
            subnet: crate::net::Subnet::DEFAULT,
            dns_port: 53053,
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
    /// VMM backend for new VMs.
    pub vmm: VmmKind,
    /// Seconds a graceful stop may take before the VMM is killed.
    pub stop_timeout_secs: u64,
    /// Shape of new VMs.
    pub vm_defaults: VmDefaults,
    /// Overrides the kernel catalog's base URL (mirrors, tests).
    pub kernel_catalog_url: Option<String>,
    /// Replaces the embedded kernel catalog with this file (mirrors carrying
    /// their own builds, air-gapped hosts, tests).
    pub kernel_catalog_file: Option<PathBuf>,
    /// Replaces the embedded image catalog with this file.
    pub image_catalog_file: Option<PathBuf>,
    /// Overrides the image catalog's base URL (mirrors, tests).
    pub image_catalog_url: Option<String>,
    /// Registries (`host:port`) that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// The static `banger-agent` put into every guest's initramfs; `None`
    /// looks next to the running daemon, then on `PATH`.
    pub agent_bin: Option<PathBuf>,
    /// Seconds to wait for a booting guest's agent to answer `/healthz`.
    pub agent_timeout_secs: u64,
    /// How long `vm run` waits for the guest's sshd (and its host keys)
    /// after create before giving up and keeping the VM for `vm logs`.
    pub ssh_wait_timeout_secs: u64,
    /// QEMU binary for the qemu backend; `None` searches `PATH` for
    /// `qemu-system-x86_64`.
    pub qemu_bin: Option<PathBuf>,
    /// Accelerator for the qemu backend (see `docs/vmm.md`).
    pub qemu_accel: QemuAccel,
    /// vhost-device-vsock binary for the qemu backend; `None` searches `PATH`.
    pub vhost_device_vsock_bin: Option<PathBuf>,
    /// Host networking.
    pub network: NetworkConfig,
}

const TOP_KEYS: &[&str] = &[
    "firecracker_bin",
    "plugins_dir",
    "default_caps",
    "vmm",
    "stop_timeout_secs",
    "vm_defaults",
    "kernel_catalog_url",
    "kernel_catalog_file",
    "image_catalog_url",
    "image_catalog_file",
    "insecure_registries",
    "agent_bin",
    "agent_timeout_secs",
    "ssh_wait_timeout_secs",
    "qemu_bin",
    "qemu_accel",
    "vhost_device_vsock_bin",
    "network",
];
const NETWORK_KEYS: &[&str] = &["bridge", "subnet", "dns_port"];
const VM_DEFAULTS_KEYS: &[&str] = &["vcpus", "memory_mib", "disk_size"];

impl Config {
    /// The built-in defaults, attributed to `path`.
    pub fn defaults(path: &Path) -> Config {
        /// Every VM gets a work disk, an address, a `.vm` name and the agent.
        const DEFAULT_CAPS: &[&str] = &["work-disk", "network", "dns", "vsock-agent"];
        Config {
            path: path.to_path_buf(),
            firecracker_bin: None,
            plugins_dir: None,
            default_caps: DEFAULT_CAPS.iter().map(|c| c.to_string()).collect(),
            vmm: VmmKind::default(),
            stop_timeout_secs: 10,
            kernel_catalog_url: None,
            kernel_catalog_file: None,
            image_catalog_file: None,
            image_catalog_url: None,
            insecure_registries: Vec::new(),
            agent_bin: None,
            agent_timeout_secs: DEFAULT_AGENT_TIMEOUT_SECS,
            ssh_wait_timeout_secs: DEFAULT_SSH_WAIT_TIMEOUT_SECS,
            vm_defaults: VmDefaults::for_this_host(),
            qemu_bin: None,
            qemu_accel: QemuAccel::Auto,
            vhost_device_vsock_bin: None,
            network: NetworkConfig::default(),
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

    /// The guest agent binary: the configured one, else `banger-agent` next
    /// to the running executable, else the first on `PATH`.
    pub fn agent_bin(&self) -> Result<PathBuf, ConfigError> {
        match &self.agent_bin {
            Some(bin) if bin.is_file() => Ok(bin.clone()),
            Some(bin) => Err(ConfigError::AgentNotFound {
                bin: bin.clone(),
                path: self.path.clone(),
            }),
            None => default_agent_bin().ok_or_else(|| ConfigError::AgentNotOnPath {
                path: self.path.clone(),
            }),
        }
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
            ..defaults
        }
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
/// Default for `agent_timeout_secs`.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 60;
/// File name of the guest agent binary.
pub const AGENT_BIN_NAME: &str = "banger-agent";

/// `banger-agent` next to the running executable (installs put `bangerd` and
/// the agent side by side), else the first one on `PATH`.
pub fn default_agent_bin() -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(AGENT_BIN_NAME)))
        .filter(|p| p.is_file());
    beside.or_else(|| {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .filter(|d| d.is_absolute())
                .map(|d| d.join(AGENT_BIN_NAME))
                .find(|p| p.is_file())
        })
    })
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

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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
                "qemu_bin" => cfg.qemu_bin = Some(self.absolute_path(key, value)?),
                "vhost_device_vsock_bin" => {
                    cfg.vhost_device_vsock_bin = Some(self.absolute_path(key, value)?)
                }
                "qemu_accel" => {
                    let s = self.string(key, value)?;
                    cfg.qemu_accel = s.parse().map_err(|m| self.error(span, m))?;
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
                    cfg.vmm = serde_json::from_value(serde_json::Value::String(s.clone()))
                        .map_err(|_| {
                            self.error(
                                span,
                                format!("unknown vmm {s:?}; valid values: firecracker, qemu"),
                            )
                        })?;
                }
                "stop_timeout_secs" => {
                    cfg.stop_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "agent_bin" => cfg.agent_bin = Some(self.absolute_path(key, value)?),
                "ssh_wait_timeout_secs" => {
                    cfg.ssh_wait_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "agent_timeout_secs" => {
                    cfg.agent_timeout_secs =
                        self.integer(key, value, 1, 3600, "a number of seconds from 1 to 3600")?
                            as u64;
                }
                "kernel_catalog_url" => cfg.kernel_catalog_url = Some(self.url(key, value)?),
                "image_catalog_url" => cfg.image_catalog_url = Some(self.url(key, value)?),
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
                other => return Err(self.unknown_key(key.span(), other, None, TOP_KEYS)),
            }
        }
        Ok(cfg)
    }

    fn vm_defaults(&self, table: &DeTable<'_>, out: &mut VmDefaults) -> Result<(), ConfigError> {
        for (key, value) in sorted(table) {
            match key.get_ref().as_ref() {
                "vcpus" => {
                    out.vcpus = self.integer(
                        key,
                        value,
                        1,
                        MAX_VCPUS,
                        &format!("a whole number from 1 to {MAX_VCPUS}"),
                    )? as u32;
                }
                "memory_mib" => {
                    out.memory_mib = self.integer(
                        key,
                        value,
                        MIN_MEMORY_MIB,
                        i64::from(u32::MAX),
                        &format!("a number of MiB, at least {MIN_MEMORY_MIB}"),
                    )? as u32;
                }
                "disk_size" => {
                    let s = self.string(key, value)?;
                    out.disk_size = s.parse().map_err(|_| {
                        self.error(
                            value.span(),
                            format!(
                                "invalid disk_size {s:?} in [vm_defaults]; use a positive size with an optional K, M, G or T suffix, e.g. \"8G\""
                            ),
                        )
                    })?;
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

    fn network(&self, table: &DeTable<'_>, out: &mut NetworkConfig) -> Result<(), ConfigError> {
        for (key, value) in sorted(table) {
            match key.get_ref().as_ref() {
                "bridge" => {
                    let s = self.string(key, value)?;
                    crate::hostops::validate_ifname("config", &s).map_err(|_| {
                        self.error(
                            value.span(),
                            format!(
                                "invalid bridge {s:?} in [network]; use an interface name of 1-15 characters [A-Za-z0-9._-], e.g. \"banger0\""
                            ),
                        )
                    })?;
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
    fn a_missing_file_means_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.path, path);
        assert_eq!(cfg.firecracker_bin, None);
        assert_eq!(cfg.plugins_dir, None);
        assert_eq!(
            cfg.default_caps,
            ["work-disk", "network", "dns", "vsock-agent"]
        );
        assert_eq!(cfg.vmm, VmmKind::Firecracker);
        assert_eq!(cfg.stop_timeout_secs, 10);
        assert_eq!(cfg.vm_defaults.disk_size, ByteSize(8 * GIB));
        assert!((1..=4).contains(&cfg.vm_defaults.vcpus));
        assert!((512..=8192).contains(&cfg.vm_defaults.memory_mib));
        // An empty file is the same as no file.
        assert_eq!(parse("").unwrap().vm_defaults, cfg.vm_defaults);
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
        assert_eq!(cfg.vmm, VmmKind::Qemu);
        let s = cfg.qemu_settings_in(None);
        assert_eq!(
            (s.qemu_bin, s.vhost_device_vsock_bin, s.accel),
            (
                PathBuf::from("/opt/q"),
                PathBuf::from("/opt/v"),
                QemuAccel::Tcg
            )
        );
    }

    #[test]
    fn bad_qemu_keys_name_the_valid_values() {
        let msg = err("qemu_accel = \"hvf\"");
        assert!(msg.contains("line 1"), "{msg}");
        assert!(msg.contains("valid values: auto, kvm, tcg"), "{msg}");
        assert!(err("qemu_bin = \"qemu\"").contains("absolute path"));
        assert!(err("vmm = \"xen\"").contains("valid values: firecracker, qemu"));
    }

    #[test]
    fn vm_defaults_scale_with_the_host_within_bounds() {
        let small = VmDefaults::for_host(2, GIB);
        assert_eq!((small.vcpus, small.memory_mib), (1, 512));
        let mid = VmDefaults::for_host(8, 16 * GIB);
        assert_eq!((mid.vcpus, mid.memory_mib), (2, 2048));
        let big = VmDefaults::for_host(64, 256 * GIB);
        assert_eq!((big.vcpus, big.memory_mib), (4, 8192));
        assert_eq!(VmDefaults::for_host(0, 0).vcpus, 1);
        assert_eq!(big.disk_size, ByteSize(8 * GIB));
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
        assert_eq!(
            cfg.vm_defaults,
            VmDefaults {
                vcpus: 3,
                memory_mib: 2048,
                disk_size: ByteSize(20 * GIB)
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
            msg.contains("unknown vmm \"qemu-kvm\"; valid values: firecracker"),
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
    }

    #[test]
    fn agent_keys_parse_default_and_are_checked() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.agent_timeout_secs, 60);
        assert_eq!(cfg.agent_bin, None);
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("banger-agent");
        std::fs::write(&bin, b"agent").unwrap();
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

        let msg = err("[network]\nsubnet = \"10.44.0.5/16\"\n");
        assert!(msg.contains("line 2") && msg.contains("CIDR"), "{msg}");
        let msg = err("[network]\nbridge = \"a bridge\"\n");
        assert!(msg.contains("invalid bridge"), "{msg}");
        let msg = err("[network]\ndns_port = 0\n");
        assert!(msg.contains("invalid dns_port"), "{msg}");
        let msg = err("[network]\nmtu = 1500\n");
        assert!(
            msg.contains("valid keys: bridge, subnet, dns_port"),
            "{msg}"
        );
    }
}
