//! The daemon's HTTP API: paths and JSON types shared by `bangerd`, the CLI
//! and anyone scripting it with `curl --unix-socket`.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | /v1/version | | [`VersionInfo`] |
//! | GET | /v1/status | | [`DaemonStatus`] |
//! | POST | /v1/shutdown | | 202, daemon exits gracefully |
//! | GET | /v1/capabilities | | `[CapView]` |
//! | GET | /v1/vms | | `[VmView]` (not the warm pool's) |
//! | GET | /v1/pool | | [`PoolView`] |
//! | POST | /v1/vms | [`CreateVmRequest`] | NDJSON [`Event`]s |
//! | GET | /v1/vms/{name} | | [`VmView`] |
//! | PATCH | /v1/vms/{name} | [`SetVmRequest`] | [`VmView`] |
//! | DELETE | /v1/vms/{name}[?force=true] | | [`VmView`] (as it was) |
//! | POST | /v1/vms/{name}/start | | NDJSON [`Event`]s |
//! | POST | /v1/vms/{name}/restart | | NDJSON [`Event`]s |
//! | POST | /v1/vms/{name}/stop | | [`VmView`] |
//! | POST | /v1/vms/{name}/kill | | [`VmView`] |
//! | GET | /v1/vms/{name}/logs?follow=true | | serial console, `text/plain` stream |
//! | GET | /v1/vms/{name}/ports | | `[PortView]` from the guest agent |
//! | POST | /v1/vms/{name}/ports | [`PortForwardRequest`] | [`VmView`]: forward added (live when running) |
//! | DELETE | /v1/vms/{name}/ports | [`PortForwardRequest`] | [`VmView`]: forward removed |
//! | GET | /v1/vms/{name}/stats | | [`StatsView`] |
//! | GET | /v1/vms/{name}/ssh | | [`SshTarget`], host keys from the guest agent |
//! | POST | /v1/vms/{name}/workspace/prepare | [`WorkspacePrepareRequest`] | NDJSON [`Event`]s, `done` holds a [`WorkspaceView`] |
//! | GET | /v1/vms/{name}/workspace/export[?base=SHA] | | [`WorkspaceExport`] |
//! | POST | /v1/vms/{name}/exec (`Upgrade: banger-exec`) | | 101, then the guest agent's [`exec`] frames both ways |
//!
//! Errors are a non-2xx status with an [`ErrorBody`]. Streams end with exactly
//! one `done` or `failed` event.

use std::fmt;
use std::path::PathBuf;

/// The exec stream's frames and request, as the guest agent defines them:
/// the daemon's exec route passes them through unchanged.
pub use banger_guest_protocol::exec;

use serde::{Deserialize, Serialize};

use crate::model::{ImageRecord, VmRecord};

/// Path prefix of this API version.
pub const PREFIX: &str = "/v1";

/// `vm create` arguments. Numeric fields are signed and sizes are strings so
/// the daemon can reject zero, negative and garbage values with a clear
/// message instead of a deserialisation error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVmRequest {
    /// VM name; generated when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Image to create the VM from (`banger image list`).
    #[serde(default)]
    pub image: Option<String>,
    /// Kernel by name (`banger kernel list`); pulled if missing.
    #[serde(default)]
    pub kernel_ref: Option<String>,
    /// Kernel image path on the host (bring your own).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Optional initrd path, with `kernel`.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Root filesystem image (bring your own); the VM gets its own copy.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// vCPUs; config default when absent.
    #[serde(default)]
    pub vcpus: Option<i64>,
    /// Memory in MiB; config default when absent.
    #[serde(default)]
    pub memory_mib: Option<i64>,
    /// Work disk size (`8G`); config default when absent.
    #[serde(default)]
    pub disk_size: Option<String>,
    /// `--cap` arguments in order (`NAME`, `NAME:k=v,...`, `-NAME`).
    #[serde(default)]
    pub caps: Vec<String>,
    /// Extra kernel command line.
    #[serde(default)]
    pub boot_args: Option<String>,
    /// Create without starting.
    #[serde(default)]
    pub no_start: bool,
    /// VMM backend; config `vmm` when absent.
    #[serde(default)]
    pub vmm: Option<crate::model::VmmKind>,
    /// Accept a `disk_size` above the config default even when it is more
    /// than the state filesystem's free space, and `memory_mib` above the
    /// host's physical memory (`--force-size`).
    #[serde(default)]
    pub force_size: bool,
    /// Restore this snapshot (`banger vm snapshot list`) instead of
    /// booting: the image, shape, capabilities and disks come from it, the
    /// name, address and keys are the new VM's (`docs/snapshots.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
}

/// `vm set` arguments; only allowed while the VM is not running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVmRequest {
    /// New vCPU count.
    #[serde(default)]
    pub vcpus: Option<i64>,
    /// New memory in MiB.
    #[serde(default)]
    pub memory_mib: Option<i64>,
    /// New work disk size; may only grow.
    #[serde(default)]
    pub disk_size: Option<String>,
    /// Accept a growth of the work disk larger than the state filesystem's
    /// free space, and memory above the host's (`--force-size`).
    #[serde(default)]
    pub force_size: bool,
}

/// A VM as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmView {
    /// The stored record.
    #[serde(flatten)]
    pub record: VmRecord,
    /// The VM's directory on the host.
    pub dir: PathBuf,
    /// Its stable guest address, when it has one (the `network` capability
    /// leased it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
}

/// The warm pool (`banger vm pool`, `docs/warm-pool.md`): VMs of the
/// default shape booted ahead of a `vm create`/`vm run` that takes one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// How many it keeps (config `warm_pool`).
    pub size: u32,
    /// Its VMs, oldest first: `running` ones are ready to be taken, others
    /// are still booting.
    pub vms: Vec<VmView>,
    /// Why the last refill failed, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One listening socket in a guest, as `banger vm ports` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortView {
    /// `tcp` or `udp`.
    pub proto: String,
    /// `NAME.vm:PORT`.
    pub endpoint: String,
    /// The address it is bound to in the guest.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Owning process id.
    pub pid: Option<u32>,
    /// Process name.
    pub process: Option<String>,
    /// Command line.
    pub command: Option<String>,
}

/// How to reach a running VM over SSH, as `banger vm ssh` uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTarget {
    /// VM name; `NAME.vm` is the host key alias in `known_hosts`.
    pub name: String,
    /// The guest address to connect to.
    pub address: Option<std::net::Ipv4Addr>,
    /// The user banger's key is authorized for (`root`).
    pub user: String,
    /// banger's private key, for `ssh -i`.
    pub identity_file: PathBuf,
    /// OpenSSH `known_hosts` lines pinning the guest's host keys under
    /// `NAME.vm` and its address, read from the guest agent.
    pub known_hosts: String,
}

/// `vm workspace prepare` arguments. `path` is read by the daemon, which
/// runs on the same host as the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspacePrepareRequest {
    /// A path inside the git repository to import (absolute).
    pub path: PathBuf,
    /// Also copy untracked, non-ignored files.
    #[serde(default)]
    pub include_untracked: bool,
    /// Create this guest-only branch.
    #[serde(default)]
    pub branch: Option<String>,
    /// Start `branch` at this host ref, without the working-tree changes
    /// (requires `branch`).
    #[serde(default)]
    pub from: Option<String>,
    /// Copy the directory as is (`.git` and submodules included).
    #[serde(default)]
    pub full_copy: bool,
}

/// A prepared workspace, as `vm workspace prepare` reports it; the daemon
/// also keeps it in the VM directory so `export` knows its base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceView {
    /// The checkout in the guest (`/root/repo`).
    pub repo: PathBuf,
    /// What was sent (`tracked`, `tracked+untracked`, `clean`, `full-copy`).
    pub mode: String,
    /// The commit the guest checkout started from: the default base of
    /// `export`.
    pub base_commit: String,
    /// The host's HEAD at prepare time.
    pub head_commit: String,
    /// The branch checked out in the guest, if any.
    pub branch: Option<String>,
    /// Paths overlaid (or copied, in full-copy mode).
    pub files: usize,
    /// Untracked files left out because `include_untracked` was not set.
    pub skipped_untracked: usize,
}

/// `POST /v1/vms/{name}/capabilities/{cap}/jobs/{job}`: run a guest job
/// a capability offers (the `mise` capability's `bootstrap`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Run to completion (detached `vm run`) instead of starting it in the
    /// background (interactive `vm run`).
    #[serde(default)]
    pub wait: bool,
}

/// A guest job's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// Its log in the guest.
    pub log: PathBuf,
    /// Whether it ran to completion.
    pub waited: bool,
    /// Its exit status, when it ran to completion.
    pub status: Option<u32>,
    /// Its output, when it ran to completion.
    pub output: String,
}

/// `vm workspace export`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceExport {
    /// The commit the patch is relative to (full id).
    pub base_commit: String,
    /// Where the base came from: `request`, `prepare` or `guest-head`.
    pub base_source: String,
    /// The patch (`git diff --binary`), base64-encoded; `git apply` it on a
    /// checkout of `base_commit`.
    pub patch_base64: String,
    /// The files the patch changes, in path order (`git diff --name-status
    /// --no-renames`); empty from a daemon that predates it.
    #[serde(default)]
    pub files: Vec<ExportedFile>,
}

/// One file a workspace export changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedFile {
    /// `added`, `modified`, `deleted` or `type-changed` (file to symlink, ...).
    pub status: String,
    /// Path relative to the repository root.
    pub path: String,
}

/// Resource use of a running VM, as `banger vm stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsView {
    /// The VMM process.
    pub pid: u32,
    /// CPU time the VMM has used (user + system), in milliseconds.
    pub vmm_cpu_ms: u64,
    /// The VMM's resident memory, in bytes.
    pub vmm_rss_bytes: u64,
    /// Guest memory, from its agent (absent without one).
    pub guest_mem_total_kib: Option<u64>,
    /// Guest memory available, from its agent.
    pub guest_mem_available_kib: Option<u64>,
    /// Seconds since the agent started.
    pub guest_uptime_secs: Option<u64>,
}

/// A capability as `banger cap list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapView {
    /// Name used with `--cap`.
    pub name: String,
    /// One line of description.
    pub description: String,
    /// Built-in or plugin (with its file).
    pub source: CapSource,
    /// Enabled for new VMs by default (config `default_caps`).
    pub default: bool,
}

/// Version of a banger binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Crate version.
    pub version: String,
    /// Git commit it was built from.
    pub commit: String,
    /// Unix time of the commit it was built from (`SOURCE_DATE_EPOCH` when
    /// set): fixed by the source, so two builds of one commit agree.
    pub built_at: u64,
}

/// What a daemon writes to [`crate::paths::Paths::build_file`] once its
/// socket is bound: its pid and build. A client of the same build that
/// finds it true (the pid file names the same pid, the socket accepts)
/// skips asking `GET /v1/version` before each command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonBuild {
    /// The daemon's pid, as in its pid file.
    pub pid: u32,
    /// Its build, as `GET /v1/version` answers.
    pub build: VersionInfo,
}

impl VersionInfo {
    /// The version of the binary this code is linked into.
    pub fn current() -> Self {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            commit: env!("BANGER_GIT_COMMIT").to_string(),
            built_at: env!("BANGER_BUILD_EPOCH").parse().unwrap_or(0),
        }
    }
}

/// What `banger daemon status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's own version.
    pub version: VersionInfo,
    /// Daemon pid.
    pub pid: u32,
    /// Unix time the daemon started.
    pub started_at: u64,
    /// API socket.
    pub socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// Number of VMs by state name.
    pub vms: std::collections::BTreeMap<String, usize>,
    /// Plugins that failed to load, with why.
    pub plugin_errors: Vec<String>,
    /// Operations running now (create, start, stop, pulls, ...); `None`
    /// from a daemon too old to say. A CLI of another build restarts the
    /// daemon only when this is `Some(0)`.
    #[serde(default)]
    pub operations: Option<usize>,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The whole error chain, rendered.
    pub error: String,
}

/// One line of an NDJSON progress stream. Clients ignore event types and
/// fields they do not know, so the daemon can add both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A named stage began (`clone_rootfs`, `prepare_host:work-disk`, `launch_vmm`).
    Stage {
        /// Stage name.
        stage: String,
        /// Human-readable detail.
        message: String,
        /// How long the stage usually takes, when the daemon knows (a local
        /// kernel build), so the client can say "about N minutes".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expected_secs: Option<u64>,
    },
    /// How far a long step of the current stage has come: a download, an
    /// upload, a list of layers. Sent at most ~10 times a second per
    /// label, and always once with `done == total` when the step completes.
    Progress {
        /// The stage the step belongs to.
        stage: String,
        /// What is counted (`kernel void-6.12`, `layer sha256:ab12…`).
        label: String,
        /// Units done so far.
        done: u64,
        /// Units in all, when known.
        #[serde(default)]
        total: Option<u64>,
        /// What `done` and `total` count.
        unit: ProgressUnit,
    },
    /// A log line from a capability or the core.
    Log {
        /// `info` or `warn`.
        level: String,
        /// The line.
        message: String,
    },
    /// The operation succeeded. `result` is what it produced: a
    /// [`VmView`] for VM operations, an image or kernel for pulls.
    Done {
        /// The operation's result.
        result: serde_json::Value,
    },
    /// The operation failed.
    Failed {
        /// The stage that failed, if any.
        stage: Option<String>,
        /// The whole error chain.
        error: String,
    },
    /// An event type this client does not know (sent by a newer daemon).
    /// Clients skip it; the daemon never sends it.
    #[serde(other)]
    Unknown,
}

/// What an [`Event::Progress`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressUnit {
    /// Bytes downloaded, uploaded or written.
    Bytes,
    /// Things of a kind (layers, files).
    Items,
    /// Steps of a fixed plan.
    Steps,
    /// A unit this client does not know (sent by a newer daemon).
    #[serde(other)]
    Other,
}

// Images and kernels.

/// Where a capability comes from, for `banger cap list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "path")]
pub enum CapSource {
    /// Compiled into the daemon.
    Builtin,
    /// Loaded from a plugin library.
    Plugin(PathBuf),
}

impl fmt::Display for CapSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapSource::Builtin => f.write_str("builtin"),
            CapSource::Plugin(p) => write!(f, "plugin {}", p.display()),
        }
    }
}

/// `image pull` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullImageRequest {
    /// An image catalog name or an OCI reference (`debian:bookworm`).
    pub reference: String,
    /// Image name; derived from the reference when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Root filesystem size (`4G`); default max(tree × 1.25, 1 GiB).
    #[serde(default)]
    pub size: Option<String>,
    /// Kernel for VMs made from it; default: the kernel catalog's default.
    #[serde(default)]
    pub kernel_ref: Option<String>,
    /// Or a kernel file (absolute path), imported into the kernel library
    /// as `<image>-kernel` with `initrd` and `modules`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Its initrd (absolute path), with `kernel`.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Its modules (absolute path: `lib/modules/VERSION` or its parent),
    /// with `kernel`.
    #[serde(default)]
    pub modules: Option<PathBuf>,
}

/// `image register` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterImageRequest {
    /// Image name.
    pub name: String,
    /// Existing ext4 root image (absolute path).
    pub rootfs: PathBuf,
    /// A kernel by name (`banger kernel list`).
    #[serde(default)]
    pub kernel_ref: Option<String>,
    /// Or an explicit kernel file.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// With an optional initrd.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// And optional modules (`lib/modules/VERSION` or its parent): the
    /// kernel is then imported into the kernel library as `<image>-kernel`.
    #[serde(default)]
    pub modules: Option<PathBuf>,
}

/// What `image prune` (the OCI blob cache prune) removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PruneReport {
    /// Digests of the blobs removed.
    pub removed: Vec<String>,
    /// Bytes freed.
    pub freed_bytes: u64,
}

/// What banger records about a local kernel (`manifest.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelManifest {
    /// The kernel's name (its directory name).
    pub name: String,
    /// Distribution or build family (`debian`, `firecracker-ci`, `unknown`).
    pub distro: String,
    /// Architecture (`x86_64`).
    pub arch: String,
    /// Kernel version (`6.12`, `6.1.0-18-amd64`, `unknown`).
    pub version: String,
    /// Hex sha256 of `vmlinux`.
    pub sha256: String,
    /// Where it came from: `import:<abs dir>` or `pull:<url>`.
    pub source: String,
    /// When it was imported or pulled (RFC 3339, UTC).
    pub imported_at: String,
    /// Whether an `initrd` file is present.
    #[serde(default)]
    pub has_initrd: bool,
    /// Whether a `modules/` directory is present.
    #[serde(default)]
    pub has_modules: bool,
}

/// A local kernel as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelView {
    /// The manifest.
    #[serde(flatten)]
    pub manifest: KernelManifest,
    /// Its directory.
    pub dir: PathBuf,
    /// The kernel image.
    pub vmlinux: PathBuf,
    /// Its initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Its modules tree, if any.
    pub modules: Option<PathBuf>,
}

/// A kernel catalog entry as `kernel list --available` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogKernelView {
    /// Name to pull.
    pub name: String,
    /// Architecture.
    pub arch: String,
    /// Distribution or build family.
    pub distro: String,
    /// Kernel version.
    pub version: String,
    /// Download size in bytes (0 if unknown).
    pub size: u64,
    /// Where it comes from: `oci`, `url`, `build` (a local recipe), joined
    /// by `+`.
    #[serde(default)]
    pub sources: String,
    /// One line of description.
    pub description: String,
    /// The kernel VMs get when none is named.
    pub default: bool,
    /// Already pulled.
    pub local: bool,
}

/// An image as the API shows it: the record plus the kernel files it boots
/// with right now (`None` while a named kernel has not been pulled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// The stored record.
    #[serde(flatten)]
    pub record: ImageRecord,
    /// The kernel image path.
    pub kernel_path: Option<PathBuf>,
    /// The initrd path, if any.
    pub initrd_path: Option<PathBuf>,
}

/// An image catalog entry as `image list --available` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogImageView {
    /// Name to pull.
    pub name: String,
    /// Architecture.
    pub arch: String,
    /// Kernel it boots with.
    pub kernel: String,
    /// Download size in bytes (0 if unknown).
    pub size: u64,
    /// Where it comes from: `oci`, `url`, `build` (a local recipe), joined
    /// by `+`.
    #[serde(default)]
    pub sources: String,
    /// One line of description.
    pub description: String,
    /// The image VMs get when none is named.
    pub default: bool,
    /// Already pulled.
    pub local: bool,
}

/// `kernel import` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportKernelRequest {
    /// Name for the kernel.
    pub name: String,
    /// Directory holding vmlinux (and optional initrd, modules, metadata).
    pub from: PathBuf,
    /// Replace an existing kernel of that name.
    #[serde(default)]
    pub force: bool,
}

/// `kernel build` / `image build` arguments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// Catalog entry to build; the catalog's default when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Replace a local kernel of the same name (kernels only).
    #[serde(default)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_events_round_trip_through_json() {
        let events = [
            Event::Stage {
                stage: "build_kernel".into(),
                message: "compiling linux 6.12".into(),
                expected_secs: Some(1200),
            },
            Event::Progress {
                stage: "pull_image".into(),
                label: "layer sha256:ab".into(),
                done: 512,
                total: Some(4096),
                unit: ProgressUnit::Bytes,
            },
            Event::Progress {
                stage: "pull_image".into(),
                label: "files".into(),
                done: 3,
                total: None,
                unit: ProgressUnit::Items,
            },
        ];
        for e in events {
            let line = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), e, "{line}");
        }
    }

    #[test]
    fn progress_events_have_the_documented_wire_form() {
        let e = Event::Progress {
            stage: "pull_kernel".into(),
            label: "kernel k".into(),
            done: 1,
            total: Some(2),
            unit: ProgressUnit::Steps,
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type": "progress", "stage": "pull_kernel", "label": "kernel k",
                "done": 1, "total": 2, "unit": "steps"})
        );
        let plain = Event::Stage {
            stage: "s".into(),
            message: String::new(),
            expected_secs: None,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"type": "stage", "stage": "s", "message": ""}),
            "an unknown duration is left out, so old clients see the old event"
        );
    }

    #[test]
    fn unknown_event_types_and_units_parse_as_unknown() {
        let e: Event = serde_json::from_str(r#"{"type":"eta","seconds":3}"#).unwrap();
        assert_eq!(e, Event::Unknown);
        let e: Event = serde_json::from_str(
            r#"{"type":"progress","stage":"s","label":"l","done":1,"unit":"frames"}"#,
        )
        .unwrap();
        assert!(
            matches!(
                e,
                Event::Progress {
                    unit: ProgressUnit::Other,
                    total: None,
                    ..
                }
            ),
            "{e:?}"
        );
    }
}

/// The capability that forwards host ports to a VM (`-p`, `vm port add`).
pub const PORTS_CAP: &str = "ports";
/// Its option holding the forwards, comma-separated
/// (`--cap ports:forward=8080:80,5353:53/udp`).
pub const FORWARD_OPTION: &str = "forward";
/// The host address a forward listens on when the spec names none: the
/// host only, so a sandbox is never on the LAN unless asked (`0.0.0.0:`).
pub const DEFAULT_FORWARD_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::LOCALHOST;

/// The transport of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP (the default).
    Tcp,
    /// UDP (`/udp`).
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One host port forwarded to a guest port:
/// `[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]` (`8080:80`, `0.0.0.0:5353:53/udp`).
/// Shown and stored as `HOST_IP:HOST_PORT:GUEST_PORT/PROTO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortForward {
    /// The host address it listens on.
    pub host_ip: std::net::Ipv4Addr,
    /// The host port it listens on.
    pub host_port: u16,
    /// The guest port it connects to, on the VM's address.
    pub guest_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

/// A port forward spec that does not parse, or a set of forwards that
/// cannot all listen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The spec is malformed.
    #[error(
        "Invalid port forward {spec:?}: {why}; use [HOST_IP:]HOST_PORT:GUEST_PORT[/udp], e.g. 8080:80 or 0.0.0.0:5353:53/udp"
    )]
    Invalid {
        /// What was given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// Two forwards would listen on the same host port.
    #[error(
        "Port forwards {0} and {1} both listen on host port {port}/{proto}; give each its own HOST_PORT",
        port = .0.host_port, proto = .0.proto
    )]
    Duplicate(PortForward, PortForward),
}

impl PortForward {
    /// Whether `self` and `other` would listen on the same host socket (same
    /// port and transport, and the same address or either on all
    /// addresses).
    pub fn clashes(&self, other: &PortForward) -> bool {
        self.host_port == other.host_port
            && self.proto == other.proto
            && (self.host_ip == other.host_ip
                || self.host_ip.is_unspecified()
                || other.host_ip.is_unspecified())
    }

    /// Parses a comma-separated list (the `forward` option), refusing
    /// forwards that clash. Empty pieces are skipped.
    pub fn parse_list(list: &str) -> Result<Vec<PortForward>, ForwardError> {
        let mut out: Vec<PortForward> = Vec::new();
        for piece in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let f: PortForward = piece.parse()?;
            check_no_clash(&out, &f)?;
            out.push(f);
        }
        Ok(out)
    }

    /// The `forward` option value for `forwards`.
    pub fn join_list(forwards: &[PortForward]) -> String {
        let v: Vec<String> = forwards.iter().map(PortForward::to_string).collect();
        v.join(",")
    }
}

/// Refuses `new` when it clashes with one of `existing`.
pub fn check_no_clash(existing: &[PortForward], new: &PortForward) -> Result<(), ForwardError> {
    match existing.iter().find(|e| e.clashes(new)) {
        Some(e) => Err(ForwardError::Duplicate(*e, *new)),
        None => Ok(()),
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}/{}",
            self.host_ip, self.host_port, self.guest_port, self.proto
        )
    }
}

impl std::str::FromStr for PortForward {
    type Err = ForwardError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| ForwardError::Invalid {
            spec: s.to_string(),
            why,
        };
        let (addr, proto) = match s.rsplit_once('/') {
            Some((a, "tcp")) => (a, Proto::Tcp),
            Some((a, "udp")) => (a, Proto::Udp),
            Some((_, p)) => return Err(bad(format!("unknown protocol {p:?} (tcp or udp)"))),
            None => (s, Proto::Tcp),
        };
        let port = |what: &str, p: &str| -> Result<u16, ForwardError> {
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad(format!("{what} {p:?} is not a port from 1 to 65535"))),
                Ok(n) => Ok(n),
            }
        };
        let parts: Vec<&str> = addr.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts[..] {
            [h, g] => (DEFAULT_FORWARD_IP, h, g),
            [ip, h, g] => {
                let ip = ip.parse::<std::net::Ipv4Addr>().map_err(|_| {
                    bad(format!(
                        "HOST_IP {ip:?} is not an IPv4 address (127.0.0.1, 0.0.0.0 for every interface)"
                    ))
                })?;
                (ip, h, g)
            }
            _ => return Err(bad("expected two or three ':'-separated parts".into())),
        };
        Ok(PortForward {
            host_ip,
            host_port: port("HOST_PORT", host_port)?,
            guest_port: port("GUEST_PORT", guest_port)?,
            proto,
        })
    }
}

/// `vm port add` / `vm port rm` (`POST` / `DELETE /v1/vms/{name}/ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForwardRequest {
    /// The forward, `[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]`.
    pub forward: String,
}

/// The forwards `enabled` (a VM's capabilities) hold: the `ports`
/// capability's `forward` option, or none.
pub fn forwards_of(enabled: &[crate::model::EnabledCap]) -> Result<Vec<PortForward>, ForwardError> {
    enabled
        .iter()
        .find(|c| c.name == PORTS_CAP)
        .and_then(|c| c.options.get(FORWARD_OPTION))
        .map_or(Ok(Vec::new()), |list| PortForward::parse_list(list))
}

#[cfg(test)]
mod forward_tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn fwd(ip: [u8; 4], h: u16, g: u16, proto: Proto) -> PortForward {
        PortForward {
            host_ip: Ipv4Addr::from(ip),
            host_port: h,
            guest_port: g,
            proto,
        }
    }

    #[test]
    fn forward_specs_parse_in_every_form() {
        let cases = [
            ("8080:80", fwd([127, 0, 0, 1], 8080, 80, Proto::Tcp)),
            ("8080:80/tcp", fwd([127, 0, 0, 1], 8080, 80, Proto::Tcp)),
            ("5353:53/udp", fwd([127, 0, 0, 1], 5353, 53, Proto::Udp)),
            ("0.0.0.0:2222:22", fwd([0, 0, 0, 0], 2222, 22, Proto::Tcp)),
            (
                "10.1.2.3:1:65535/udp",
                fwd([10, 1, 2, 3], 1, 65535, Proto::Udp),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(spec.parse::<PortForward>(), Ok(want), "{spec}");
        }
        // The canonical form names everything and parses back to itself.
        let f = fwd([127, 0, 0, 1], 5353, 53, Proto::Udp);
        assert_eq!(f.to_string(), "127.0.0.1:5353:53/udp");
        assert_eq!(f.to_string().parse::<PortForward>(), Ok(f));
    }

    #[test]
    fn bad_forward_specs_name_the_spec_and_the_problem() {
        let cases = [
            ("80", "two or three"),
            ("1:2:3:4", "two or three"),
            ("8080:80/sctp", "unknown protocol \"sctp\""),
            ("0:80", "HOST_PORT \"0\""),
            ("8080:0", "GUEST_PORT \"0\""),
            ("65536:80", "HOST_PORT \"65536\""),
            ("x:80", "HOST_PORT \"x\""),
            ("localhost:80:80", "HOST_IP \"localhost\""),
            ("[::1]:80:80", "two or three"),
            ("", "two or three"),
        ];
        for (spec, why) in cases {
            let msg = spec.parse::<PortForward>().unwrap_err().to_string();
            assert!(
                msg.contains(&format!("{spec:?}"))
                    && msg.contains(why)
                    && msg.contains("e.g. 8080:80"),
                "{spec}: {msg}"
            );
        }
    }

    #[test]
    fn a_list_refuses_forwards_on_one_host_port() {
        let ok = PortForward::parse_list("8080:80, 8080:80/udp,127.0.0.2:8080:81").unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(
            PortForward::join_list(&ok),
            "127.0.0.1:8080:80/tcp,127.0.0.1:8080:80/udp,127.0.0.2:8080:81/tcp"
        );
        let dup = PortForward::parse_list("8080:80,127.0.0.1:8080:81").unwrap_err();
        assert!(matches!(dup, ForwardError::Duplicate(..)), "{dup}");
        assert!(dup.to_string().contains("host port 8080/tcp"), "{dup}");
        // All addresses clash with any one address.
        assert!(PortForward::parse_list("0.0.0.0:9000:1,10.0.0.1:9000:2").is_err());
        assert!(PortForward::parse_list("").unwrap().is_empty());
    }
}
