//! The capability interface: everything host- or guest-integrated is a
//! capability with five lifecycle hooks. The core only sequences them.
//!
//! Built-ins register a [`BuiltinCapability`] factory with
//! `inventory::submit!`; the daemon calls each factory once with a
//! [`CapEnv`] (store, paths, config, host operations and the host-wide
//! [`SharedState`]). Plugins are adapted into the same trait by
//! `plugin_host`. Besides the per-VM hooks, a capability may own
//! daemon-wide work through [`Capability::daemon_start`] and
//! [`Capability::daemon_stop`] (the `dns` capability runs the DNS server).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::Store;
use banger_api::guest::GuestConfig;
use banger_api::machine::MachineSpec;
use banger_api::model::{CapOptions, VmId, VmRecord, VmmKind};
use banger_api::paths::Paths;
use banger_host::hostops::HostOps;

/// The fixed hook points of a VM's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// Host resources: disks, taps, DNS records, firewall rules.
    PrepareHost,
    /// Mutate the VMM-neutral machine spec.
    ConfigureMachine,
    /// Add to the guest config bundle.
    GuestConfig,
    /// Work that needs a live guest.
    PostStart,
    /// Undo PrepareHost (stop, delete, rollback).
    Teardown,
}

impl Hook {
    /// Stage name used in progress events and failures (`prepare_host`).
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::PrepareHost => "prepare_host",
            Hook::ConfigureMachine => "configure_machine",
            Hook::GuestConfig => "guest_config",
            Hook::PostStart => "post_start",
            Hook::Teardown => "teardown",
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why Teardown runs. Capabilities keep persistent data on `Stop`, delete it on
/// `Delete`, and on `Rollback` delete only what this attempt created for a VM
/// that never booted (see [`VmRecord::booted_once`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeardownReason {
    /// The VM stopped (or its VMM died); it may start again.
    Stop,
    /// The VM is being deleted.
    Delete,
    /// A later hook failed; undo this start attempt.
    Rollback,
}

pub use banger_api::api::CapSource;

/// A hook failure. The lifecycle wraps it with the stage and capability name.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// The per-VM options are wrong; the message says which and how to fix it.
    #[error("{0}")]
    InvalidOptions(String),
    /// Anything else, with its cause.
    #[error("{msg}")]
    Failed {
        /// What was being done.
        msg: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl CapError {
    /// A failure without an underlying error.
    pub fn msg(msg: impl Into<String>) -> Self {
        CapError::Failed {
            msg: msg.into(),
            source: None,
        }
    }

    /// A failure caused by `source` while doing `msg`.
    pub fn with(
        msg: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        CapError::Failed {
            msg: msg.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// Receives a capability's log lines; the lifecycle forwards them to the
/// operation's progress stream and to the daemon log.
pub trait HookLog: Send + Sync {
    /// One human-readable line.
    fn info(&self, msg: &str);
    /// A warning the user should see.
    fn warn(&self, msg: &str);
}

/// What a hook can see and use. Hook-specific data (machine spec, guest
/// config) is passed as a separate argument to the hooks that own it.
pub struct HookCtx<'a> {
    /// The VM being operated on.
    pub vm: &'a VmRecord,
    /// The VM's private directory; capabilities keep their files here.
    pub vm_dir: &'a Path,
    /// This capability's per-VM options.
    pub options: &'a CapOptions,
    /// Privileged host operations.
    pub host: &'a dyn HostOps,
    /// The daemon's configuration.
    pub config: &'a banger_api::config::Config,
    /// Progress and diagnostics.
    pub log: &'a dyn HookLog,
}

impl fmt::Debug for HookCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HookCtx")
            .field("vm", &self.vm.name)
            .field("vm_dir", &self.vm_dir)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A capability. Hooks are synchronous and run on a thread where blocking is
/// fine (in place on the daemon's runtime, or its blocking pool: see
/// docs/architecture.md); they should be idempotent where they can be,
/// because start after stop runs them again. Every hook has a no-op default.
pub trait Capability: Send + Sync + fmt::Debug {
    /// Unique name, used with `--cap`.
    fn name(&self) -> &str;

    /// One line for `banger cap list`.
    fn description(&self) -> &str;

    /// Where it comes from.
    fn source(&self) -> CapSource {
        CapSource::Builtin
    }

    /// What it needs from the others and which backends it supports.
    fn manifest(&self) -> Manifest {
        Manifest::default()
    }

    /// Whether every VM gets this capability whatever its enabled set. Such
    /// a capability owns no host resources: only its `guest_config` runs,
    /// before the enabled capabilities' (built-ins only; `ssh-identity`,
    /// which `vm ssh`, workspaces and `vm run` log in with).
    fn always_on(&self) -> bool {
        false
    }

    /// Checks per-VM options when the VM is created, before anything exists.
    fn validate_options(&self, _options: &CapOptions) -> Result<(), CapError> {
        Ok(())
    }

    /// Sets up host resources.
    fn prepare_host(&self, _ctx: &HookCtx<'_>) -> Result<(), CapError> {
        Ok(())
    }

    /// Adds devices or boot arguments to the machine.
    fn configure_machine(
        &self,
        _ctx: &HookCtx<'_>,
        _machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        Ok(())
    }

    /// Adds mounts, files, network or commands for the guest.
    fn guest_config(&self, _ctx: &HookCtx<'_>, _guest: &mut GuestConfig) -> Result<(), CapError> {
        Ok(())
    }

    /// Runs once the VMM is up.
    fn post_start(&self, _ctx: &HookCtx<'_>) -> Result<(), CapError> {
        Ok(())
    }

    /// The VM's address on the host's network, if this capability gives it
    /// one (`network`: its stable address). Views, `vm ssh` and `vm ports`
    /// use the first capability that answers; an error only hides it.
    fn guest_address(&self, _vm: &VmId) -> Option<Ipv4Addr> {
        None
    }

    /// Undoes `prepare_host`. Must tolerate resources that are already gone.
    fn teardown(&self, _ctx: &HookCtx<'_>, _reason: TeardownReason) -> Result<(), CapError> {
        Ok(())
    }

    /// Daemon startup, after reconciliation and before the API serves:
    /// host-wide work (a server, adopting what running VMs hold). A failure
    /// is logged and the daemon serves anyway.
    fn daemon_start(&self, _ctx: &DaemonCtx<'_>) -> Result<(), CapError> {
        Ok(())
    }

    /// Daemon shutdown: undo `daemon_start`. VMs keep running, so anything
    /// they use stays.
    fn daemon_stop(&self, _ctx: &DaemonCtx<'_>) {}

    /// The names of the [`GuestJob`]s it offers; none by default.
    fn guest_jobs(&self) -> Vec<String> {
        Vec::new()
    }

    /// Its job `job` for `vm` (one of [`Capability::guest_jobs`]), or `None`
    /// when it offers no such job.
    fn guest_job(&self, _job: &str, _vm: &VmRecord) -> Option<GuestJob> {
        None
    }
}

/// Guest work a capability offers on demand, after start, when what it
/// needs only exists later (the `mise` install needs the imported
/// workspace). The daemon runs it on request (`POST
/// /v1/vms/{name}/capabilities/{cap}/jobs/{job}`) over its own SSH
/// connection as `sh -c SCRIPT`, to completion or in the background, with
/// its output in `log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestJob {
    /// The shell script, run by `sh` as the guest's login user.
    pub script: String,
    /// Where its output goes in the guest (absolute; the directory is made).
    pub log: String,
    /// What it does, for progress (`installing the workspace's tools`).
    pub summary: String,
}

/// Host-wide state the built-ins share within one daemon, one value per
/// type. A capability that owns state (the `network` capability's host
/// networking) publishes it under its own type; the capabilities that use
/// it (`dns`, `nat`) ask for the same type and get the same value, whichever
/// factory runs first.
#[derive(Default)]
pub struct SharedState {
    values: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl fmt::Debug for SharedState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.values.lock().map(|v| v.len()).unwrap_or(0);
        f.debug_struct("SharedState").field("values", &n).finish()
    }
}

impl SharedState {
    /// An empty map.
    pub fn new() -> Self {
        SharedState::default()
    }

    /// The `T` in the map, made by `make` and stored if there is none.
    pub fn get_or_insert_with<T: Any + Send + Sync>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let key = TypeId::of::<T>();
        if let Some(v) = values
            .get(&key)
            .and_then(|v| v.clone().downcast::<T>().ok())
        {
            return v;
        }
        let v = Arc::new(make());
        values.insert(key, v.clone());
        v
    }
}

/// What a built-in's factory gets: everything host-wide it may keep.
#[derive(Clone)]
pub struct CapEnv<'a> {
    /// banger's directories.
    pub paths: &'a Paths,
    /// The daemon's configuration; a capability reads its own section
    /// (`network` reads `[network]`).
    pub config: &'a banger_api::config::Config,
    /// The state database.
    pub store: &'a Arc<Store>,
    /// Privileged host operations.
    pub host: &'a Arc<dyn HostOps>,
    /// Host-wide state shared between built-ins.
    pub shared: &'a SharedState,
}

impl fmt::Debug for CapEnv<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CapEnv")
            .field("paths", &self.paths)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}

/// A VM that was running when the daemon started.
#[derive(Debug, Clone)]
pub struct RunningVm {
    /// Its record.
    pub vm: VmRecord,
    /// Its private directory.
    pub vm_dir: PathBuf,
}

/// What the daemon-level hooks see.
pub struct DaemonCtx<'a> {
    /// Privileged host operations.
    pub host: &'a dyn HostOps,
    /// VMs running at daemon start (empty at stop).
    pub running: &'a [RunningVm],
    /// The daemon's async runtime; hooks run on a blocking thread and may
    /// `block_on` it to start or stop servers.
    pub runtime: tokio::runtime::Handle,
}

impl fmt::Debug for DaemonCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DaemonCtx")
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

/// What a capability declares about the others and the backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    /// Capabilities that must be enabled too; their hooks run first.
    pub requires: Vec<String>,
    /// Capabilities whose hooks run first when they are enabled too.
    pub after: Vec<String>,
    /// The VMM backends it works with; empty means all.
    pub backends: Vec<VmmKind>,
}

/// An enabled set that cannot run as declared.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// A required capability is not enabled.
    #[error(
        "Capability {cap} requires {requires}, which is not enabled for this VM: add --cap {requires}"
    )]
    Missing {
        /// Who needs it.
        cap: String,
        /// What is missing.
        requires: String,
    },
    /// The VM's backend is not one the capability supports.
    #[error(
        "Capability {cap} does not support the {vmm} backend (it supports {supported}): create the VM with --vmm {first}"
    )]
    Backend {
        /// The capability.
        cap: String,
        /// The VM's backend.
        vmm: &'static str,
        /// Comma-separated supported backends.
        supported: String,
        /// The first supported backend, for the hint.
        first: &'static str,
    },
    /// `requires`/`after` form a cycle.
    #[error(
        "Capabilities {0} must each run after another (requires/after form a cycle); drop one of them"
    )]
    Cycle(String),
}

/// A capability with the caller's data for it (its per-VM options, ...).
pub type WithData<T> = (Arc<dyn Capability>, T);

/// Checks `caps` (enabled, in the order given) against their manifests for
/// a VM on `vmm`, and orders them so every capability runs after what it
/// requires or lists in `after`. Otherwise the order given is kept (a
/// stable topological sort).
pub fn order_by_manifest<T>(
    caps: Vec<WithData<T>>,
    vmm: VmmKind,
) -> Result<Vec<WithData<T>>, ManifestError> {
    let manifests: Vec<Manifest> = caps.iter().map(|(c, _)| c.manifest()).collect();
    let index = |name: &str| caps.iter().position(|(c, _)| c.name() == name);
    // before[i]: the indices that must run before i.
    let mut before: Vec<Vec<usize>> = vec![Vec::new(); caps.len()];
    for (i, ((cap, _), m)) in caps.iter().zip(&manifests).enumerate() {
        if let Some(first) = m.backends.first()
            && !m.backends.contains(&vmm)
        {
            return Err(ManifestError::Backend {
                cap: cap.name().to_string(),
                vmm: vmm.as_str(),
                supported: m
                    .backends
                    .iter()
                    .map(|b| b.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                first: first.as_str(),
            });
        }
        for r in &m.requires {
            let j = index(r).ok_or_else(|| ManifestError::Missing {
                cap: cap.name().to_string(),
                requires: r.clone(),
            })?;
            before[i].push(j);
        }
        before[i].extend(m.after.iter().filter_map(|a| index(a)));
    }
    let mut done = vec![false; caps.len()];
    let mut order = Vec::with_capacity(caps.len());
    while order.len() < caps.len() {
        // The first not-yet-placed capability whose predecessors are placed.
        let next =
            (0..caps.len()).find(|&i| !done[i] && before[i].iter().all(|&j| done[j] || j == i));
        let Some(i) = next else {
            let stuck: Vec<&str> = (0..caps.len())
                .filter(|&i| !done[i])
                .map(|i| caps[i].0.name())
                .collect();
            return Err(ManifestError::Cycle(stuck.join(", ")));
        };
        done[i] = true;
        order.push(i);
    }
    let mut slots: Vec<Option<WithData<T>>> = caps.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
}

/// Makes a built-in capability from the daemon's environment.
pub type CapFactory = fn(&CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError>;

/// Registration record for a built-in capability. `inventory::submit!` needs
/// a const expression, so we register a factory, not an instance.
#[derive(Debug)]
pub struct BuiltinCapability {
    /// Makes the capability.
    pub make: CapFactory,
}

inventory::collect!(BuiltinCapability);

/// Every built-in capability linked into this binary, made with `env`,
/// sorted by name, and the factories that failed.
///
/// A crate nobody references is not linked and its registrations vanish, so
/// binaries must `use banger_capabilities as _;`.
pub fn builtins(env: &CapEnv<'_>) -> (Vec<Arc<dyn Capability>>, Vec<CapError>) {
    let mut caps = Vec::new();
    let mut errors = Vec::new();
    for b in inventory::iter::<BuiltinCapability> {
        match (b.make)(env) {
            Ok(c) => caps.push(c),
            Err(e) => errors.push(e),
        }
    }
    caps.sort_by(|a, b| a.name().cmp(b.name()));
    (caps, errors)
}

/// The capabilities this daemon knows: built-ins plus loaded plugins.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    caps: Vec<Arc<dyn Capability>>,
}

/// A registry lookup or composition failure.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// Nothing with that name is registered.
    #[error("Unknown capability {name:?}; available: {available}. See `banger cap list`")]
    Unknown {
        /// The name asked for.
        name: String,
        /// Comma-separated known names.
        available: String,
    },
    /// Two capabilities claim one name (e.g. a plugin shadowing a built-in).
    #[error("Capability {name:?} from {second} is already provided by {first}; it was not loaded")]
    Duplicate {
        /// The contested name.
        name: String,
        /// Who has it.
        first: String,
        /// Who was refused.
        second: String,
    },
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry { caps: Vec::new() }
    }

    /// A registry with every linked built-in made with `env`, and the
    /// factories that failed (those built-ins are missing).
    pub fn with_builtins(env: &CapEnv<'_>) -> (Self, Vec<CapError>) {
        let mut r = Registry::new();
        let (caps, errors) = builtins(env);
        for c in caps {
            // Built-in names are unique by construction (a test pins the set).
            let _ = r.add(c);
        }
        (r, errors)
    }

    /// The capabilities every VM gets ([`Capability::always_on`]), by name.
    pub fn always_on(&self) -> Vec<Arc<dyn Capability>> {
        self.all().into_iter().filter(|c| c.always_on()).collect()
    }

    /// Runs every capability's [`Capability::daemon_start`], in name order;
    /// returns the failures as `(name, error)`.
    pub fn daemon_start(&self, ctx: &DaemonCtx<'_>) -> Vec<(String, CapError)> {
        self.all()
            .iter()
            .filter_map(|c| c.daemon_start(ctx).err().map(|e| (c.name().to_string(), e)))
            .collect()
    }

    /// Runs every capability's [`Capability::daemon_stop`], in reverse name
    /// order.
    pub fn daemon_stop(&self, ctx: &DaemonCtx<'_>) {
        for c in self.all().iter().rev() {
            c.daemon_stop(ctx);
        }
    }

    /// Adds a capability unless its name is taken.
    pub fn add(&mut self, cap: Arc<dyn Capability>) -> Result<(), RegistryError> {
        if let Some(existing) = self.caps.iter().find(|c| c.name() == cap.name()) {
            return Err(RegistryError::Duplicate {
                name: cap.name().to_string(),
                first: existing.source().to_string(),
                second: cap.source().to_string(),
            });
        }
        self.caps.push(cap);
        Ok(())
    }

    /// Looks a capability up by name.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Capability>, RegistryError> {
        self.caps
            .iter()
            .find(|c| c.name() == name)
            .cloned()
            .ok_or_else(|| RegistryError::Unknown {
                name: name.to_string(),
                available: self.names().join(", "),
            })
    }

    /// All names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.caps.iter().map(|c| c.name().to_string()).collect();
        v.sort();
        v
    }

    /// All capabilities, sorted by name.
    pub fn all(&self) -> Vec<Arc<dyn Capability>> {
        let mut v = self.caps.clone();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake(&'static str, Manifest);

    impl Capability for Fake {
        fn name(&self) -> &str {
            self.0
        }
        fn description(&self) -> &str {
            "fake"
        }
        fn manifest(&self) -> Manifest {
            self.1.clone()
        }
    }

    fn cap(name: &'static str, requires: &[&str], after: &[&str]) -> (Arc<dyn Capability>, ()) {
        let m = Manifest {
            requires: requires.iter().map(|s| s.to_string()).collect(),
            after: after.iter().map(|s| s.to_string()).collect(),
            backends: vec![],
        };
        (Arc::new(Fake(name, m)), ())
    }

    fn names(caps: &[(Arc<dyn Capability>, ())]) -> Vec<&str> {
        caps.iter().map(|(c, _)| c.name()).collect()
    }

    #[test]
    fn manifest_order_puts_requirements_first_and_keeps_the_rest_stable() {
        let caps = vec![
            cap("gpu", &["network"], &["dns"]),
            cap("work-disk", &[], &[]),
            cap("dns", &[], &[]),
            cap("network", &[], &[]),
            cap("late", &[], &["absent"]),
        ];
        let ordered = order_by_manifest(caps, VmmKind::Qemu).unwrap();
        assert_eq!(
            names(&ordered),
            ["work-disk", "dns", "network", "gpu", "late"]
        );
        let plain = vec![cap("b", &[], &[]), cap("a", &[], &[])];
        let ordered = order_by_manifest(plain, VmmKind::Qemu).unwrap();
        assert_eq!(names(&ordered), ["b", "a"]);
    }

    #[test]
    fn manifest_refuses_missing_requirements_cycles_and_backends() {
        let err =
            order_by_manifest(vec![cap("gpu", &["network"], &[])], VmmKind::Qemu).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Capability gpu requires network, which is not enabled for this VM: add --cap network"
        );
        let err = order_by_manifest(
            vec![
                cap("a", &[], &["b"]),
                cap("b", &["a"], &[]),
                cap("c", &[], &[]),
            ],
            VmmKind::Qemu,
        )
        .unwrap_err();
        assert_eq!(err, ManifestError::Cycle("a, b".into()));
        let mut qemu_only = cap("vfio", &[], &[]);
        qemu_only.0 = Arc::new(Fake(
            "vfio",
            Manifest {
                backends: vec![VmmKind::Qemu],
                ..Manifest::default()
            },
        ));
        let err = order_by_manifest(vec![qemu_only.clone()], VmmKind::Firecracker).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Capability vfio does not support the firecracker backend (it supports qemu): create the VM with --vmm qemu"
        );
        assert!(order_by_manifest(vec![qemu_only], VmmKind::Qemu).is_ok());
    }
}
