//! Loads third-party capability plugins (cdylibs built on
//! `banger-plugin-abi`) and adapts each into a [`Capability`].
//!
//! Every file is loaded with exactly one `lib_header_from_path` +
//! `init_root_module`: abi_stable's `load_from_file` caches per interface type
//! and would hand back the first plugin for every later path. Libraries are
//! never unloaded (abi_stable leaks them on purpose). A plugin that fails to
//! load is reported and skipped; the daemon keeps the others.
//!
//! Each hook call runs on its own thread, bounded by
//! `plugin_hook_timeout_secs`; the caller's thread keeps the hook context
//! and serves the plugin's log lines and allowlisted host requests
//! ([`HostRequest`]) over a channel. Edits come back as JSON and are applied
//! to a copy of the machine spec or guest bundle, all or nothing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use abi_stable::library::{LibraryError, RootModule, lib_header_from_path};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr, RString};
pub use banger_plugin_abi::ABI_VERSION;
use banger_plugin_abi::wire::{
    self, Backend, HookName, HookRequest, HookResponse, MachineView, VmInfo, WIRE_VERSION,
};
use banger_plugin_abi::{HostCallbacks, HostCallbacks_TO, PluginCapabilityBox, PluginModuleRef};

use crate::capability::{CapError, CapSource, Capability, Hook, HookCtx, Manifest, TeardownReason};
use banger_api::guest::{GuestConfig, GuestFile, GuestMount};
use banger_api::machine::{Drive, DriveRole, MachineSpec, Nic, PciDevice};
use banger_api::model::{CapOptions, VmmKind};
use banger_host::hostops::{HostRequest, RequestScope};

/// The outcome of loading a plugin directory.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Plugins that loaded, in file-name order.
    pub loaded: Vec<Arc<dyn Capability>>,
    /// Files that were refused, with why.
    pub errors: Vec<PluginLoadError>,
}

/// A plugin file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PluginLoadError {
    /// The plugin directory exists but cannot be listed.
    #[error("Cannot read plugin directory {}", dir.display())]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a loadable banger plugin (not a library, no banger
    /// root module, incompatible abi_stable layout).
    #[error("Plugin {} could not be loaded: {detail}", path.display())]
    Open {
        /// The plugin file.
        path: PathBuf,
        /// abi_stable's description of the problem.
        detail: String,
    },
    /// The plugin reports a different banger plugin ABI version.
    #[error(
        "Plugin {} was built for banger plugin ABI {found}, this daemon speaks ABI {ABI_VERSION}: rebuild it against banger-plugin-abi {}",
        path.display(), abi_crate_version()
    )]
    AbiVersion {
        /// The plugin file.
        path: PathBuf,
        /// The ABI version the plugin reports.
        found: u32,
    },
    /// The plugin was built against another major banger-plugin-abi
    /// (another plugin ABI); abi_stable refuses it before reading anything.
    #[error(
        "Plugin {} was built against banger-plugin-abi {found} (plugin ABI {}); this daemon loads plugins built against banger-plugin-abi {ABI_VERSION}.x (plugin ABI {ABI_VERSION}) only: rebuild it against banger-plugin-abi {expected}",
        path.display(), abi_of_crate_version(found)
    )]
    CrateVersion {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's banger-plugin-abi version.
        found: String,
        /// The daemon's banger-plugin-abi version.
        expected: String,
    },
    /// abi_stable found that the types crossing the boundary differ.
    #[error(
        "Plugin {} was built against banger-plugin-abi {found}, whose types differ from this daemon's banger-plugin-abi {}: rebuild it against banger-plugin-abi {}",
        path.display(), abi_crate_version(), abi_crate_version()
    )]
    Layout {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's banger-plugin-abi version.
        found: String,
    },
    /// The plugin speaks another wire version (the JSON inside the ABI).
    #[error(
        "Plugin {} speaks plugin wire version {found}, this daemon speaks version {WIRE_VERSION}: rebuild it against banger-plugin-abi {}",
        path.display(), abi_crate_version()
    )]
    WireVersion {
        /// The plugin file.
        path: PathBuf,
        /// The wire version in its manifest.
        found: u32,
    },
    /// The plugin's constructor failed.
    #[error("Plugin {} failed to start: {msg}", path.display())]
    Init {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's message.
        msg: String,
    },
    /// The plugin's manifest cannot be used.
    #[error("Plugin {} has an unusable manifest: {why}", path.display())]
    InvalidManifest {
        /// The plugin file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The plugin's capability name cannot be used with `--cap`.
    #[error(
        "Plugin {} has an unusable capability name {name:?}: names are 1-64 lowercase letters, digits and '-'",
        path.display()
    )]
    InvalidName {
        /// The plugin file.
        path: PathBuf,
        /// The name it reported.
        name: String,
    },
}

impl PluginLoadError {
    /// The plugin file (or directory) the error is about.
    pub fn path(&self) -> &Path {
        match self {
            PluginLoadError::ReadDir { dir, .. } => dir,
            PluginLoadError::Open { path, .. }
            | PluginLoadError::AbiVersion { path, .. }
            | PluginLoadError::CrateVersion { path, .. }
            | PluginLoadError::Layout { path, .. }
            | PluginLoadError::WireVersion { path, .. }
            | PluginLoadError::Init { path, .. }
            | PluginLoadError::InvalidManifest { path, .. }
            | PluginLoadError::InvalidName { path, .. } => path,
        }
    }
}

/// The daemon's banger-plugin-abi crate version (`2.0.0`).
fn abi_crate_version() -> &'static str {
    PluginModuleRef::VERSION_STRINGS.version.as_str()
}

/// The plugin ABI a banger-plugin-abi version speaks: its major, except that
/// every 0.x release (which followed banger's own version) was ABI 1.
fn abi_of_crate_version(version: &str) -> String {
    match version.split('.').next() {
        Some("0") => "1".to_string(),
        Some(major) => major.to_string(),
        None => "?".to_string(),
    }
}

/// Loads every `*.so` in `dir`, in file-name order. A missing directory is an
/// empty report, not an error. Their host requests are checked against the
/// `[network]` of the config at hook time; the daemon uses
/// [`load_plugins_for`] with the network it actually runs.
pub fn load_plugins(dir: &Path) -> LoadReport {
    load_plugins_with(dir, None)
}

/// [`load_plugins`] for a daemon whose network is `network`: the `[network]`
/// config with the names it derives from its state directory filled in
/// (`NetIdentity::resolve`), so a plugin's `add_nat` names the bridge and
/// subnet the daemon really uses (and `banger-helper` allows).
pub fn load_plugins_for(dir: &Path, network: &banger_api::config::NetworkConfig) -> LoadReport {
    load_plugins_with(dir, Some(network))
}

fn load_plugins_with(
    dir: &Path,
    network: Option<&banger_api::config::NetworkConfig>,
) -> LoadReport {
    let mut report = LoadReport::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return report,
        Err(source) => {
            report.errors.push(PluginLoadError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            });
            return report;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so") && p.is_file())
        .collect();
    paths.sort();
    for path in paths {
        match load_plugin_with(&path, network.cloned()) {
            Ok(cap) => report.loaded.push(cap),
            Err(e) => report.errors.push(e),
        }
    }
    report
}

/// Loads one plugin file and adapts it into a capability.
pub fn load_plugin(path: &Path) -> Result<Arc<dyn Capability>, PluginLoadError> {
    load_plugin_with(path, None)
}

fn load_plugin_with(
    path: &Path,
    network: Option<banger_api::config::NetworkConfig>,
) -> Result<Arc<dyn Capability>, PluginLoadError> {
    let header = lib_header_from_path(path).map_err(|e| library_error(path, e))?;
    let module = header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| match e {
            LibraryError::AbiInstability(_) => PluginLoadError::Layout {
                path: path.to_path_buf(),
                found: header.version_strings().version.to_string(),
            },
            other => library_error(path, other),
        })?;
    let found = module.abi_version();
    if found != ABI_VERSION {
        return Err(PluginLoadError::AbiVersion {
            path: path.to_path_buf(),
            found,
        });
    }
    let object = module.new_capability()()
        .into_result()
        .map_err(|msg| PluginLoadError::Init {
            path: path.to_path_buf(),
            msg: one_line(msg.as_str()),
        })?;
    let name = object.name().into_string();
    if !valid_name(&name) {
        return Err(PluginLoadError::InvalidName {
            path: path.to_path_buf(),
            name,
        });
    }
    let manifest = manifest_of(path, object.manifest().as_str())?;
    Ok(Arc::new(PluginCap {
        path: path.to_path_buf(),
        description: object.description().into_string(),
        name,
        manifest,
        object: Arc::new(object),
        network,
    }))
}

/// Decodes and checks a plugin's manifest JSON.
fn manifest_of(path: &Path, json: &str) -> Result<Manifest, PluginLoadError> {
    let bad = |why: String| PluginLoadError::InvalidManifest {
        path: path.to_path_buf(),
        why,
    };
    let message: wire::ManifestMessage =
        serde_json::from_str(json).map_err(|e| bad(format!("not manifest JSON: {e}")))?;
    if message.wire_version() != WIRE_VERSION {
        return Err(PluginLoadError::WireVersion {
            path: path.to_path_buf(),
            found: message.wire_version(),
        });
    }
    let m = message.manifest;
    if let Some(n) = m.requires.iter().chain(&m.after).find(|n| !valid_name(n)) {
        return Err(bad(format!("{n:?} is not a capability name")));
    }
    let backends: Vec<VmmKind> = m
        .backends
        .iter()
        .filter_map(|b| match b {
            Backend::Firecracker => Some(VmmKind::Firecracker),
            Backend::Qemu => Some(VmmKind::Qemu),
            Backend::Unknown => None,
        })
        .collect();
    if backends.is_empty() && !m.backends.is_empty() {
        return Err(bad(
            "it supports no backend this daemon has (firecracker, qemu)".into(),
        ));
    }
    Ok(Manifest {
        requires: m.requires,
        after: m.after,
        backends,
    })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

fn library_error(path: &Path, err: LibraryError) -> PluginLoadError {
    match err {
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => PluginLoadError::CrateVersion {
            path: path.to_path_buf(),
            found: actual_version.to_string(),
            expected: expected_version.to_string(),
        },
        // The library lacks abi_stable's root module symbol: not a plugin.
        LibraryError::GetSymbolError { symbol, err, .. } => PluginLoadError::Open {
            path: path.to_path_buf(),
            detail: one_line(&format!(
                "it is no banger plugin: it exports no plugin root module (symbol {}: {err}); build plugins with banger_plugin_abi::export_plugin!",
                String::from_utf8_lossy(&symbol)
            )),
        },
        other => PluginLoadError::Open {
            path: path.to_path_buf(),
            detail: one_line(&other.to_string()),
        },
    }
}

/// Text from a plugin or abi_stable made fit for one log line: its lines
/// trimmed and joined with "; ", NULs (abi_stable quotes symbol names with
/// their C terminator) dropped and other control characters shown as
/// `\u{..}` escapes, so nothing it says can end or rewrite a log line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.chars()
                .filter(|c| *c != '\0')
                .map(|c| {
                    if c.is_control() {
                        c.escape_unicode().to_string()
                    } else {
                        c.to_string()
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What a hook's thread sends back to the caller while it runs.
enum FromPlugin {
    Info(String),
    Warn(String),
    /// A host request and where to send the answer.
    Request(String, mpsc::Sender<Result<String, String>>),
    /// The hook returned.
    Done(RResult<RString, RString>),
}

/// The plugin thread's side of [`HostCallbacks`]: everything goes to the
/// caller's thread, which holds the hook context. Once the caller has given
/// up (timeout), sends fail and requests are answered with an error.
struct ChannelHost(mpsc::Sender<FromPlugin>);

impl HostCallbacks for ChannelHost {
    fn info(&self, msg: RStr<'_>) {
        let _ = self.0.send(FromPlugin::Info(msg.to_string()));
    }

    fn warn(&self, msg: RStr<'_>) {
        let _ = self.0.send(FromPlugin::Warn(msg.to_string()));
    }

    fn host_request(&self, request: RStr<'_>) -> RResult<RString, RString> {
        let (tx, rx) = mpsc::channel();
        let gone = || {
            RResult::RErr(RString::from(
                "the hook timed out; the host no longer answers",
            ))
        };
        if self
            .0
            .send(FromPlugin::Request(request.to_string(), tx))
            .is_err()
        {
            return gone();
        }
        match rx.recv() {
            Ok(Ok(reply)) => RResult::ROk(RString::from(reply)),
            Ok(Err(msg)) => RResult::RErr(RString::from(msg)),
            Err(_) => gone(),
        }
    }
}

/// A loaded plugin, seen as a capability.
struct PluginCap {
    path: PathBuf,
    name: String,
    description: String,
    manifest: Manifest,
    object: Arc<PluginCapabilityBox>,
    /// The daemon's network with its derived names; `None`: the config's.
    network: Option<banger_api::config::NetworkConfig>,
}

impl fmt::Debug for PluginCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginCap")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn machine_view(m: &MachineSpec) -> MachineView {
    MachineView {
        kernel: m.kernel.clone(),
        initrd: m.initrd.clone(),
        boot_args: m.boot_args.clone(),
        vcpus: m.vcpus,
        memory_mib: m.memory_mib,
        drives: m
            .drives
            .iter()
            .map(|d| wire::DriveEdit {
                id: d.id.clone(),
                host_path: d.path.clone(),
                read_only: d.read_only,
            })
            .collect(),
        nics: m
            .nics
            .iter()
            .map(|n| wire::NicEdit {
                id: n.id.clone(),
                tap: n.tap.clone(),
                mac: n.mac.clone(),
            })
            .collect(),
        pci_devices: m
            .pci_devices
            .iter()
            .map(|d| match d {
                PciDevice::Vfio { address } => wire::PciDeviceEdit::Vfio {
                    address: address.clone(),
                },
                PciDevice::Emulated { model } => wire::PciDeviceEdit::Emulated {
                    model: model.to_string(),
                },
            })
            .collect(),
    }
}

impl PluginCap {
    /// `plugin NAME: msg`, unless the glue already named the plugin (panics).
    fn failed(&self, msg: &str) -> CapError {
        if msg.starts_with(&format!("plugin {} ", self.name)) {
            CapError::msg(msg)
        } else {
            CapError::msg(format!("plugin {}: {msg}", self.name))
        }
    }

    fn call(
        &self,
        hook: Hook,
        ctx: &HookCtx<'_>,
        reason: Option<TeardownReason>,
        machine: Option<&MachineSpec>,
    ) -> Result<HookResponse, CapError> {
        let request = HookRequest {
            v: WIRE_VERSION,
            hook: match hook {
                Hook::PrepareHost => HookName::PrepareHost,
                Hook::ConfigureMachine => HookName::ConfigureMachine,
                Hook::GuestConfig => HookName::GuestConfig,
                Hook::PostStart => HookName::PostStart,
                Hook::Teardown => HookName::Teardown,
            },
            vm: VmInfo {
                id: ctx.vm.id.to_string(),
                name: ctx.vm.name.to_string(),
                vcpus: ctx.vm.spec.vcpus,
                memory_mib: ctx.vm.spec.memory_mib,
                vm_dir: ctx.vm_dir.to_path_buf(),
                booted_once: ctx.vm.booted_once,
                vmm: Some(match ctx.vm.spec.vmm {
                    VmmKind::Firecracker => Backend::Firecracker,
                    VmmKind::Qemu => Backend::Qemu,
                }),
            },
            options: ctx.options.clone(),
            teardown_reason: reason.map(|r| match r {
                TeardownReason::Stop => wire::TeardownReason::Stop,
                TeardownReason::Delete => wire::TeardownReason::Delete,
                TeardownReason::Rollback => wire::TeardownReason::Rollback,
            }),
            machine: machine.map(machine_view),
        };
        let json = wire::encode("hook request", &request).map_err(|e| {
            CapError::with(
                format!("plugin {}: cannot send the {hook} request", self.name),
                e,
            )
        })?;
        let response = self.run_with_timeout(hook, ctx, json)?;
        let response = match response {
            RResult::ROk(s) => s,
            RResult::RErr(msg) => return Err(self.failed(msg.as_str())),
        };
        let response: HookResponse =
            wire::decode("hook response", response.as_str()).map_err(|e| {
                CapError::with(format!("plugin {}: unusable {hook} response", self.name), e)
            })?;
        let misplaced = match hook {
            Hook::ConfigureMachine => !response.guest.is_empty(),
            Hook::GuestConfig => !response.machine.is_empty(),
            _ => !response.guest.is_empty() || !response.machine.is_empty(),
        };
        if misplaced {
            ctx.log.warn(&format!(
                "plugin {} returned edits that {hook} cannot apply; ignored",
                self.name
            ));
        }
        Ok(response)
    }

    /// Runs the hook on its own thread and serves its log lines and host
    /// requests here, where the context lives, until it returns or
    /// `plugin_hook_timeout_secs` pass. A plugin thread cannot be stopped
    /// in-process: on timeout it is abandoned (it keeps its memory and
    /// whatever it holds) and the hook fails, so the operation rolls back
    /// and the VM's lock is released.
    fn run_with_timeout(
        &self,
        hook: Hook,
        ctx: &HookCtx<'_>,
        request: String,
    ) -> Result<RResult<RString, RString>, CapError> {
        let limit = Duration::from_secs(ctx.config.plugin_hook_timeout_secs);
        let (tx, rx) = mpsc::channel();
        let object = self.object.clone();
        std::thread::Builder::new()
            .name(format!("plugin-{}", self.name))
            .spawn(move || {
                let host = ChannelHost(tx.clone());
                let callbacks = HostCallbacks_TO::from_ptr(&host, TD_Opaque);
                let req = RStr::from_str(&request);
                let out = match hook {
                    Hook::PrepareHost => object.prepare_host(req, callbacks),
                    Hook::ConfigureMachine => object.configure_machine(req, callbacks),
                    Hook::GuestConfig => object.guest_config(req, callbacks),
                    Hook::PostStart => object.post_start(req, callbacks),
                    Hook::Teardown => object.teardown(req, callbacks),
                };
                let _ = tx.send(FromPlugin::Done(out));
            })
            .map_err(|e| {
                CapError::with(
                    format!("plugin {}: cannot start a thread for {hook}", self.name),
                    e,
                )
            })?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(FromPlugin::Info(msg)) => ctx.log.info(&msg),
                Ok(FromPlugin::Warn(msg)) => ctx.log.warn(&msg),
                Ok(FromPlugin::Request(json, reply)) => {
                    let _ = reply.send(self.host_request(ctx, &json));
                }
                Ok(FromPlugin::Done(out)) => return Ok(out),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(CapError::msg(format!(
                        "plugin {}: {hook} did not return within {}s (plugin_hook_timeout_secs); its thread was abandoned. Fix or remove the plugin, or raise plugin_hook_timeout_secs",
                        self.name,
                        limit.as_secs()
                    )));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(CapError::msg(format!(
                        "plugin {}: {hook} ended without an answer",
                        self.name
                    )));
                }
            }
        }
    }

    /// Serves one host request from the plugin: allowlisted, validated, run
    /// through the daemon's `HostOps`. The answer goes back as JSON or an
    /// error message; every request is logged.
    fn host_request(&self, ctx: &HookCtx<'_>, json: &str) -> Result<String, String> {
        let scope = RequestScope {
            vm_id: ctx.vm.id.as_str(),
            network: self.network.as_ref().unwrap_or(&ctx.config.network),
            owner_uid: nix::unistd::getuid().as_raw(),
        };
        let result = HostRequest::parse(json).and_then(|r| {
            let reply = r.run(ctx.host, scope)?;
            Ok((r, reply))
        });
        match result {
            Ok((r, reply)) => {
                tracing::info!(plugin = %self.name, request = ?r, "plugin host request done");
                wire::encode("host reply", &reply).map_err(|e| e.to_string())
            }
            Err(e) => {
                let msg = crate::lifecycle::render_chain(&e);
                ctx.log.warn(&format!("plugin {}: {msg}", self.name));
                Err(msg)
            }
        }
    }
}

impl Capability for PluginCap {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn source(&self) -> CapSource {
        CapSource::Plugin(self.path.clone())
    }

    fn manifest(&self) -> Manifest {
        self.manifest.clone()
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        let json = serde_json::to_string(options)
            .map_err(|e| CapError::with(format!("plugin {}: cannot send options", self.name), e))?;
        match self.object.validate_options(RStr::from_str(&json)) {
            RResult::ROk(()) => Ok(()),
            RResult::RErr(msg) => Err(CapError::InvalidOptions(format!(
                "plugin {}: {}",
                self.name,
                msg.as_str()
            ))),
        }
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        self.call(Hook::PrepareHost, ctx, None, None).map(|_| ())
    }

    fn configure_machine(
        &self,
        ctx: &HookCtx<'_>,
        machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        let edits = self
            .call(Hook::ConfigureMachine, ctx, None, Some(machine))?
            .machine;
        // Apply to a copy so a conflict halfway leaves the spec untouched.
        let mut staged = machine.clone();
        let conflict = |what: &str, e: banger_api::machine::DuplicateDevice| {
            CapError::with(format!("plugin {}: cannot add {what}", self.name), e)
        };
        for d in edits.drives {
            staged
                .add_drive(Drive {
                    id: d.id,
                    path: d.host_path,
                    read_only: d.read_only,
                    role: DriveRole::Extra,
                })
                .map_err(|e| conflict("drive", e))?;
        }
        for n in edits.nics {
            if !banger_host::hostops::is_plugin_tap(&n.tap)
                && !staged.nics.iter().any(|x| x.tap == n.tap)
            {
                return Err(self.failed(&format!(
                    "NIC {} uses tap {:?}: a plugin NIC needs a tap it created with create_tap ({}...)",
                    n.id,
                    n.tap,
                    banger_host::hostops::PLUGIN_TAP_PREFIX
                )));
            }
            if !valid_mac(&n.mac) {
                return Err(self.failed(&format!(
                    "NIC {} has MAC {:?}: write six hex pairs, aa:bb:cc:dd:ee:ff",
                    n.id, n.mac
                )));
            }
            staged
                .add_nic(Nic {
                    id: n.id,
                    tap: n.tap,
                    mac: n.mac.to_ascii_lowercase(),
                })
                .map_err(|e| conflict("NIC", e))?;
        }
        for d in edits.pci_devices {
            let device = match d {
                wire::PciDeviceEdit::Vfio { address } => PciDevice::Vfio { address },
                wire::PciDeviceEdit::Emulated { model } => PciDevice::Emulated {
                    model: model.parse().map_err(|e| {
                        CapError::with(format!("plugin {}: cannot add PCI device", self.name), e)
                    })?,
                },
            };
            staged
                .add_pci_device(device)
                .map_err(|e| conflict("PCI device", e))?;
        }
        staged.boot_args =
            edit_boot_args(&staged.boot_args, &edits.remove_boot_args, &edits.boot_args);
        *machine = staged;
        Ok(())
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let edits = self.call(Hook::GuestConfig, ctx, None, None)?.guest;
        let mut staged = guest.clone();
        for m in edits.mounts {
            staged
                .add_mount(GuestMount {
                    drive_id: m.drive_id,
                    mount_point: m.mount_point,
                    fstype: m.fstype,
                    read_only: m.read_only,
                })
                .map_err(|e| {
                    CapError::with(format!("plugin {}: cannot add mount", self.name), e)
                })?;
        }
        for f in edits.files {
            if !f.path.is_absolute() {
                return Err(self.failed(&format!(
                    "guest file {} is not an absolute path",
                    f.path.display()
                )));
            }
            staged.files.push(GuestFile {
                path: f.path,
                contents: f.contents,
                mode: f.mode,
                uid: f.uid,
                gid: f.gid,
            });
        }
        for (key, value) in edits.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(self.failed(&format!("guest env name {key:?} is not usable")));
            }
            if staged.env.contains_key(&key) {
                return Err(self.failed(&format!(
                    "guest env {key} is already set by another capability"
                )));
            }
            staged.env.insert(key, value);
        }
        for argv in edits.boot_commands {
            if argv.first().is_none_or(|a| a.is_empty()) {
                return Err(self.failed("a boot command has no program (argv[0] is empty)"));
            }
            staged.commands.push(argv);
        }
        *guest = staged;
        Ok(())
    }

    fn post_start(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        self.call(Hook::PostStart, ctx, None, None).map(|_| ())
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        self.call(Hook::Teardown, ctx, Some(reason), None)
            .map(|_| ())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The command line with `remove` taken out, then `add` appended. A removal
/// without `=` takes out that flag and every `flag=...`; with `=` only the
/// exact argument.
fn edit_boot_args(current: &str, remove: &[String], add: &[String]) -> String {
    let removed = |arg: &str| {
        remove.iter().any(|r| {
            arg == r || (!r.contains('=') && arg.split_once('=').is_some_and(|(k, _)| k == r))
        })
    };
    current
        .split_whitespace()
        .filter(|a| !removed(a))
        .chain(add.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_directory_is_an_empty_report() {
        let dir = tempfile::tempdir().unwrap();
        let report = load_plugins(&dir.path().join("absent"));
        assert!(report.loaded.is_empty());
        assert!(report.errors.is_empty());
    }

    #[test]
    fn garbage_and_non_so_files_are_handled_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libjunk.so"), b"not an ELF file").unwrap();
        std::fs::write(dir.path().join("README"), b"ignored").unwrap();
        let report = load_plugins(dir.path());
        assert!(report.loaded.is_empty());
        assert_eq!(report.errors.len(), 1);
        let err = &report.errors[0];
        assert_eq!(err.path(), dir.path().join("libjunk.so"));
        assert!(matches!(err, PluginLoadError::Open { .. }), "{err}");
        assert!(err.to_string().contains("libjunk.so"), "{err}");
    }

    #[test]
    fn loader_and_plugin_text_becomes_one_line_without_nul_or_control_characters() {
        let raw = "Could load symbol:\n\tbanger_root\0\nin library:\n\t/p/lib.so\x1b[2J\r";
        assert_eq!(
            one_line(raw),
            "Could load symbol:; banger_root; in library:; /p/lib.so\\u{1b}[2J"
        );
    }

    #[test]
    fn abi_mismatch_message_names_file_and_both_versions() {
        let err = PluginLoadError::AbiVersion {
            path: "/x/libfoo.so".into(),
            found: ABI_VERSION + 1,
        };
        let msg = err.to_string();
        assert!(msg.contains("/x/libfoo.so"), "{msg}");
        assert!(msg.contains(&format!("ABI {}", ABI_VERSION + 1)), "{msg}");
        assert!(msg.contains(&format!("speaks ABI {ABI_VERSION}")), "{msg}");
    }

    #[test]
    fn boot_arg_removal_takes_flags_with_any_value_or_exact_pairs() {
        let add = ["quiet".to_string()];
        let out = edit_boot_args(
            "console=ttyS0 pci=off reboot=k pci  panic=1",
            &["pci".into(), "reboot=t".into(), "panic=1".into()],
            &add,
        );
        assert_eq!(out, "console=ttyS0 reboot=k quiet");
        assert_eq!(edit_boot_args("", &[], &add), "quiet");
    }

    #[test]
    fn manifests_name_capabilities_and_known_backends() {
        let p = Path::new("/p/libx.so");
        let m = manifest_of(
            p,
            r#"{"requires":["network"],"backends":["qemu","future"]}"#,
        )
        .unwrap();
        assert_eq!(m.requires, ["network"]);
        assert_eq!(m.backends, [VmmKind::Qemu]);
        for (json, why) in [
            (
                r#"{"after":["Bad Name"]}"#,
                "\"Bad Name\" is not a capability name",
            ),
            (r#"{"backends":["future"]}"#, "supports no backend"),
            ("\"x\"", "not manifest JSON"),
        ] {
            let err = manifest_of(p, json).unwrap_err().to_string();
            assert!(err.contains("/p/libx.so") && err.contains(why), "{err}");
        }
    }

    #[test]
    fn capability_names_must_work_with_cap_flag() {
        assert!(valid_name("shared-mount"));
        for bad in ["", "-x", "Shared", "a b", "a:b", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
