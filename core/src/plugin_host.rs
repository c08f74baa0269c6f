//! Loads third-party capability plugins (cdylibs built on
//! `banger-plugin-abi`) and adapts each into a [`Capability`].
//!
//! Every file is loaded with exactly one `lib_header_from_path` +
//! `init_root_module`: abi_stable's `load_from_file` caches per interface type
//! and would hand back the first plugin for every later path. Libraries are
//! never unloaded (abi_stable leaks them on purpose). A plugin that fails to
//! load is reported and skipped; the daemon keeps the others.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abi_stable::library::{LibraryError, RootModule, lib_header_from_path};
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RStr};
pub use banger_plugin_abi::ABI_VERSION;
use banger_plugin_abi::wire::{self, HookName, HookRequest, HookResponse, VmInfo, WIRE_VERSION};
use banger_plugin_abi::{HostLogger, HostLogger_TO, PluginCapabilityBox, PluginModuleRef};

use crate::capability::{CapError, CapSource, Capability, Hook, HookCtx, HookLog, TeardownReason};
use crate::guest::{GuestConfig, GuestFile, GuestMount};
use crate::machine::{Drive, DriveRole, MachineSpec};
use crate::model::CapOptions;

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
    /// abi_stable refused the plugin's banger-plugin-abi crate version.
    #[error(
        "Plugin {} was built against banger-plugin-abi {found}, this daemon uses {expected}: rebuild it against banger-plugin-abi {expected}",
        path.display()
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
    /// The plugin's constructor failed.
    #[error("Plugin {} failed to start: {msg}", path.display())]
    Init {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's message.
        msg: String,
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
            | PluginLoadError::Init { path, .. }
            | PluginLoadError::InvalidName { path, .. } => path,
        }
    }
}

/// The daemon's banger-plugin-abi crate version (`0.1.0`).
fn abi_crate_version() -> &'static str {
    PluginModuleRef::VERSION_STRINGS.version.as_str()
}

/// Loads every `*.so` in `dir`, in file-name order. A missing directory is an
/// empty report, not an error.
pub fn load_plugins(dir: &Path) -> LoadReport {
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
        match load_plugin(&path) {
            Ok(cap) => report.loaded.push(cap),
            Err(e) => report.errors.push(e),
        }
    }
    report
}

/// Loads one plugin file and adapts it into a capability.
pub fn load_plugin(path: &Path) -> Result<Arc<dyn Capability>, PluginLoadError> {
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
            msg: msg.into_string(),
        })?;
    let name = object.name().into_string();
    if !valid_name(&name) {
        return Err(PluginLoadError::InvalidName {
            path: path.to_path_buf(),
            name,
        });
    }
    Ok(Arc::new(PluginCap {
        path: path.to_path_buf(),
        description: object.description().into_string(),
        name,
        object,
    }))
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
        other => PluginLoadError::Open {
            path: path.to_path_buf(),
            // abi_stable's messages span lines; keep one line per error.
            detail: other
                .to_string()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        },
    }
}

/// Routes a plugin's log lines to the hook's [`HookLog`].
struct LogBridge<'a>(&'a dyn HookLog);

impl HostLogger for LogBridge<'_> {
    fn info(&self, msg: RStr<'_>) {
        // A panicking host logger must not unwind into the plugin's frames.
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.info(msg.as_str())));
    }

    fn warn(&self, msg: RStr<'_>) {
        let _ = catch_unwind(AssertUnwindSafe(|| self.0.warn(msg.as_str())));
    }
}

/// A loaded plugin, seen as a capability.
struct PluginCap {
    path: PathBuf,
    name: String,
    description: String,
    object: PluginCapabilityBox,
}

impl fmt::Debug for PluginCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginCap")
            .field("name", &self.name)
            .field("path", &self.path)
            .finish_non_exhaustive()
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
            },
            options: ctx.options.clone(),
            teardown_reason: reason.map(|r| match r {
                TeardownReason::Stop => wire::TeardownReason::Stop,
                TeardownReason::Delete => wire::TeardownReason::Delete,
                TeardownReason::Rollback => wire::TeardownReason::Rollback,
            }),
        };
        let json = wire::encode("hook request", &request).map_err(|e| {
            CapError::with(
                format!("plugin {}: cannot send the {hook} request", self.name),
                e,
            )
        })?;
        let bridge = LogBridge(ctx.log);
        let log = HostLogger_TO::from_ptr(&bridge, TD_Opaque);
        let req = RStr::from_str(&json);
        let out = match hook {
            Hook::PrepareHost => self.object.prepare_host(req, log),
            Hook::ConfigureMachine => self.object.configure_machine(req, log),
            Hook::GuestConfig => self.object.guest_config(req, log),
            Hook::PostStart => self.object.post_start(req, log),
            Hook::Teardown => self.object.teardown(req, log),
        };
        let response = match out {
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
        self.call(Hook::PrepareHost, ctx, None).map(|_| ())
    }

    fn configure_machine(
        &self,
        ctx: &HookCtx<'_>,
        machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        let edits = self.call(Hook::ConfigureMachine, ctx, None)?.machine;
        // Apply to a copy so a conflict halfway leaves the spec untouched.
        let mut staged = machine.clone();
        for d in edits.drives {
            staged
                .add_drive(Drive {
                    id: d.id,
                    path: d.host_path,
                    read_only: d.read_only,
                    role: DriveRole::Extra,
                })
                .map_err(|e| {
                    CapError::with(format!("plugin {}: cannot add drive", self.name), e)
                })?;
        }
        for arg in edits.boot_args {
            if !staged.boot_args.is_empty() {
                staged.boot_args.push(' ');
            }
            staged.boot_args.push_str(&arg);
        }
        *machine = staged;
        Ok(())
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let edits = self.call(Hook::GuestConfig, ctx, None)?.guest;
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
        *guest = staged;
        Ok(())
    }

    fn post_start(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        self.call(Hook::PostStart, ctx, None).map(|_| ())
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        self.call(Hook::Teardown, ctx, Some(reason)).map(|_| ())
    }
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
    fn capability_names_must_work_with_cap_flag() {
        assert!(valid_name("shared-mount"));
        for bad in ["", "-x", "Shared", "a b", "a:b", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
