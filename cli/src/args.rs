//! The command line: clap definitions and the value parsers that validate
//! user input before anything is sent to the daemon (which validates again).

use std::path::PathBuf;

use banger_api::model::{self, ByteSize, CapChoice, VmName};
use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::ArgValueCandidates;

pub use crate::complete::Shell;

/// banger: disposable Linux microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "banger", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Manage root filesystem images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Manage kernels.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Inspect capabilities.
    #[command(subcommand)]
    Cap(CapCommand),
    /// Control the bangerd daemon.
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Install, inspect, restart or remove banger-helper, the narrow root
    /// helper that lets bangerd run as you (run with sudo).
    System(SystemArgs),
    /// Check this host: backends, KVM, tools, privileges, the default
    /// image and kernel, the SSH identity and the daemon. Never starts the
    /// daemon; exits non-zero when a check fails.
    Doctor {
        /// Print JSON: an array of {check, status, detail, fix}.
        #[arg(long)]
        json: bool,
    },
    /// Write banger's ssh config (`Host *.vm`: banger's key, the pinned host
    /// keys, user root) and print how to include it, so plain `ssh NAME.vm`,
    /// scp and rsync work. `~/.ssh/config` is only touched by --install.
    SshConfig(SshConfigArgs),
    /// Replace banger's binaries with the latest signed release (or
    /// --version V): the manifest's ed25519 signature and every file's
    /// sha256 are checked before anything is replaced; a running daemon is
    /// restarted on the new build. See docs/release.md.
    Update(UpdateArgs),
    /// Stop the daemon, remove the root helper (as root) and the binaries
    /// next to this banger, and list the data left with its size.
    Uninstall(UninstallArgs),
    /// Show the client's version and the running daemon's.
    Version {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the shell code for live completions (VM, image, kernel and
    /// capability names from the running daemon); see docs/completion.md.
    Completion {
        /// The shell.
        shell: Shell,
    },
}

/// `banger update` flags (its `--version` names a release, so the
/// subcommand has no version flag of its own).
#[derive(Debug, Args)]
#[command(disable_version_flag = true)]
pub struct UpdateArgs {
    /// Only say whether a newer release exists (its signature is checked);
    /// change nothing.
    #[arg(long)]
    pub check: bool,
    /// Install this release (e.g. 0.2.0) even when it is not newer: a
    /// reinstall or a downgrade.
    #[arg(long, value_name = "V")]
    pub version: Option<String>,
    /// Release server base URL [default: config `update_url`, else the
    /// project's].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// `banger uninstall` flags.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Do not ask for confirmation (needed without a terminal).
    #[arg(long, short)]
    pub yes: bool,
    /// Go on while VMs are running (they keep running without a daemon).
    #[arg(long)]
    pub force: bool,
    /// Where `banger system install` wrote its files (packaging, tests).
    #[arg(long, env = "BANGER_SYSTEM_ROOT", hide = true)]
    pub system_root: Option<std::path::PathBuf>,
}

/// `banger ssh-config` flags.
#[derive(Debug, Args)]
pub struct SshConfigArgs {
    /// Add one `Include` line for it at the top of ~/.ssh/config (created
    /// 0600 when missing); idempotent.
    #[arg(long, conflicts_with = "uninstall")]
    pub install: bool,
    /// Remove exactly that line from ~/.ssh/config.
    #[arg(long)]
    pub uninstall: bool,
    /// Print the pinned host keys of HOST (ssh's KnownHostsCommand).
    #[arg(long, value_name = "HOST", hide = true, conflicts_with_all = ["install", "uninstall"])]
    pub known_hosts: Option<String>,
}

/// `banger vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM and use it at once: ssh into it, import a git workspace,
    /// or run a command and exit with its code.
    ///
    /// `vm run` alone: a fresh VM and an interactive ssh session.
    /// `vm run PATH`: the same with the git repository around PATH imported
    /// to /root/repo (tracked files; see --include-untracked) and its tools
    /// installed with mise when it has .mise.toml, mise.toml or
    /// .tool-versions (needs --nat; skip with --no-bootstrap).
    /// `vm run [PATH] -- CMD...`: runs CMD in the guest (in /root/repo when
    /// PATH is given; never the bootstrap) and exits with its exit code.
    Run(Box<RunArgs>),
    /// Create a VM from a kernel and a root filesystem image, and start it.
    Create(Box<CreateArgs>),
    /// Start stopped VMs.
    Start(NamesArgs),
    /// Stop running VMs gracefully.
    Stop(NamesArgs),
    /// Stop and start VMs again.
    Restart(NamesArgs),
    /// Delete VMs and their disks.
    Delete(DeleteArgs),
    /// Kill VMs' VMM processes at once.
    Kill(NamesArgs),
    /// Change a stopped VM's shape.
    Set(SetArgs),
    /// Delete every stopped or error VM (listed first; asks on a terminal).
    Prune {
        /// Do not ask.
        #[arg(long, short)]
        yes: bool,
        /// Delete even if a capability's teardown fails (as `vm delete --force`).
        #[arg(long)]
        force: bool,
    },
    /// Snapshot a running VM (`vm snapshot VM SNAP`), or list or remove
    /// snapshots (`vm snapshot list`, `vm snapshot rm SNAP`); see
    /// docs/snapshots.md.
    Snapshot(crate::snapshot::SnapshotArgs),
    /// List VMs.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the warm pool: the VMs of the default shape the daemon keeps
    /// booted for the next `vm create`/`vm run` (config `warm_pool`,
    /// docs/warm-pool.md).
    Pool {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show everything about one VM.
    Show {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a running VM's CPU and memory use.
    Stats {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a port forward (live when the VM runs).
    Port {
        /// What to do.
        #[command(subcommand)]
        cmd: PortCommand,
    },
    /// List the VM's port forwards and the guest's listening ports
    /// (through its agent).
    Ports {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// SSH into a running VM as root with banger's key, or run CMD there.
    ///
    /// The guest's host keys come from its agent and are pinned (no trust on
    /// first use); the VM needs the `vsock-agent` and `network` capabilities.
    Ssh {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// Print the ssh command line (shell-quoted, one line) instead of
        /// running it; its known_hosts file is written either way.
        #[arg(long)]
        print: bool,
        /// How to reach the guest (default: ssh when sshd listens in the
        /// guest, else the agent).
        #[arg(long, value_enum)]
        via: Option<Via>,
        /// Command to run in the guest instead of a login shell (after `--`).
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Import a git workspace into a VM, or export the guest's work as a patch.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Print a VM's serial console log.
    Logs {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
}

/// `vm port` subcommands.
#[derive(Debug, Subcommand)]
pub enum PortCommand {
    /// Forward a host port to the VM: [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]
    /// (host side 127.0.0.1 unless HOST_IP is given). Opened at once when
    /// it runs, kept for every later start.
    Add {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// The forward.
        #[arg(value_name = "SPEC", value_parser = crate::ports::parse_forward)]
        spec: String,
    },
    /// Remove a port forward (closed at once when the VM runs).
    Rm {
        /// VM name.
        #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
        name: String,
        /// The forward, as given to add or as `vm show` lists it.
        #[arg(value_name = "SPEC", value_parser = crate::ports::parse_forward)]
        spec: String,
    },
}

/// `vm create` flags.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image to create the VM from (`banger image list`). Default: the image
    /// catalog's default image, pulled with its kernel when missing.
    #[arg(long, value_name = "NAME", value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::images))]
    pub image: Option<String>,
    /// Root filesystem image to bring instead of an image; the VM gets its own copy.
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub rootfs: Option<PathBuf>,
    /// Kernel by name (`banger kernel list --available`), pulled if missing.
    /// Default: the image's kernel, else the catalog's default kernel.
    #[arg(long, value_name = "NAME", value_parser = parse_artifact_name, conflicts_with = "kernel", add = ArgValueCandidates::new(crate::complete::kernels))]
    pub kernel_ref: Option<String>,
    /// Kernel image to bring (uncompressed vmlinux).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initrd image, with --kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// VM name (generated when absent).
    #[arg(long, value_parser = parse_name, allow_hyphen_values = true)]
    pub name: Option<String>,
    /// Shape flags shared with `vm set`.
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Capability choice: NAME, NAME:key=value,... or -NAME (repeatable).
    #[arg(long = "cap", value_name = "CAP", value_parser = parse_cap, allow_hyphen_values = true, add = ArgValueCandidates::new(crate::complete::caps))]
    pub caps: Vec<String>,
    /// Give the VM outbound internet through the host (same as `--cap nat`).
    #[arg(long)]
    pub nat: bool,
    /// Forward a host port to the guest while the VM runs:
    /// [HOST_IP:]HOST_PORT:GUEST_PORT[/udp] (repeatable). The host side is
    /// 127.0.0.1 unless HOST_IP says otherwise (0.0.0.0: every interface).
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = crate::ports::parse_forward)]
    pub ports: Vec<String>,
    /// Extra kernel command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub boot_args: Option<String>,
    /// Create without starting.
    #[arg(long)]
    pub no_start: bool,
    /// VMM backend (default: config `vmm`, else auto: firecracker where it
    /// is installed and KVM boots a standard guest, else qemu).
    #[arg(long, value_enum)]
    pub vmm: Option<VmmArg>,
    /// Restore this snapshot (`banger vm snapshot list`) instead of booting:
    /// image, shape, capabilities and disks come from it; the name, address,
    /// MAC, SSH host keys and agent secret are the new VM's.
    #[arg(long, value_name = "SNAP", value_parser = parse_name,
          conflicts_with_all = ["image", "rootfs", "kernel_ref", "kernel", "initrd", "caps", "nat", "ports", "boot_args", "no_start", "vcpu", "memory", "disk_size"])]
    pub from_snapshot: Option<String>,
}

/// `vm run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A directory inside the git repository to import to /root/repo.
    #[arg(value_name = "PATH")]
    pub path: Option<PathBuf>,
    /// VM name (generated when absent).
    #[arg(long, value_parser = parse_name, allow_hyphen_values = true)]
    pub name: Option<String>,
    /// Image to create the VM from (default: the catalog's default image,
    /// pulled if missing).
    #[arg(long, value_name = "NAME", value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::images))]
    pub image: Option<String>,
    /// Shape flags shared with `vm create`.
    #[command(flatten)]
    pub shape: ShapeArgs,
    /// Capability choice: NAME, NAME:key=value,... or -NAME (repeatable).
    #[arg(long = "cap", value_name = "CAP", value_parser = parse_cap, allow_hyphen_values = true, add = ArgValueCandidates::new(crate::complete::caps))]
    pub caps: Vec<String>,
    /// Give the VM outbound internet through the host (same as `--cap nat`).
    #[arg(long)]
    pub nat: bool,
    /// Forward a host port to the guest while the VM runs:
    /// [HOST_IP:]HOST_PORT:GUEST_PORT[/udp] (repeatable). The host side is
    /// 127.0.0.1 unless HOST_IP says otherwise (0.0.0.0: every interface).
    #[arg(short = 'p', long = "publish", value_name = "SPEC", value_parser = crate::ports::parse_forward)]
    pub ports: Vec<String>,
    /// VMM backend (default: config `vmm`, else auto: firecracker where it
    /// is installed and KVM boots a standard guest, else qemu).
    #[arg(long, value_enum)]
    pub vmm: Option<VmmArg>,
    /// Delete the VM when the session or command ends, whatever its exit
    /// code (kept when sshd never came up, for `banger vm logs`).
    #[arg(long)]
    pub rm: bool,
    /// Create, import and bootstrap, then exit with a reconnect hint instead
    /// of opening a session.
    #[arg(short = 'd', long, conflicts_with_all = ["rm", "command"])]
    pub detach: bool,
    /// Skip the mise tool install even when the workspace asks for one.
    #[arg(long)]
    pub no_bootstrap: bool,
    /// Also copy untracked, non-ignored files (ignored files never go).
    #[arg(long, requires = "path")]
    pub include_untracked: bool,
    /// Create this guest-only branch in /root/repo.
    #[arg(long, value_name = "BRANCH", requires = "path")]
    pub branch: Option<String>,
    /// Start --branch at this host ref, without the working-tree changes.
    #[arg(long, value_name = "REF", requires = "branch")]
    pub from: Option<String>,
    /// Copy the directory as it is (`.git` and submodules included) instead
    /// of a git import.
    #[arg(long, requires = "path")]
    pub full_copy: bool,
    /// Print the spec and what would happen; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// How the command or session reaches the guest (default: the agent,
    /// which needs no sshd; ssh with PATH, whose import needs sshd anyway).
    #[arg(long, value_enum)]
    pub via: Option<Via>,
    /// Restore this snapshot (`banger vm snapshot list`) instead of booting
    /// a new VM, then import, run or open the session as usual: image,
    /// shape and capabilities come from the snapshot (and no mise
    /// bootstrap runs: its tools are those it was taken with); the name,
    /// address, MAC, SSH host keys and agent secret are the new VM's.
    #[arg(long, value_name = "SNAP", value_parser = parse_name,
          conflicts_with_all = ["image", "caps", "nat", "ports", "vcpu", "memory", "disk_size", "force_size"])]
    pub from_snapshot: Option<String>,
    /// Command to run in the guest instead of a session (after `--`).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `--via` values: how a command or session reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// The guest agent over vsock: no sshd, no network needed.
    Agent,
    /// The system ssh to the guest's sshd.
    Ssh,
}

/// `--vmm` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmmArg {
    /// Firecracker.
    Firecracker,
    /// qemu-system-x86_64 -M microvm.
    Qemu,
}

impl VmmArg {
    /// The backend this flag names.
    pub fn kind(self) -> banger_api::model::VmmKind {
        match self {
            VmmArg::Firecracker => banger_api::model::VmmKind::Firecracker,
            VmmArg::Qemu => banger_api::model::VmmKind::Qemu,
        }
    }
}

/// vCPU, memory and disk flags.
#[derive(Debug, Args)]
pub struct ShapeArgs {
    /// Number of vCPUs.
    #[arg(long, value_name = "N", value_parser = parse_vcpus, allow_hyphen_values = true)]
    pub vcpu: Option<i64>,
    /// Memory: MiB (2048) or a size with suffix (2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_mib, allow_hyphen_values = true)]
    pub memory: Option<i64>,
    /// Work disk size (8G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub disk_size: Option<String>,
    /// Take a --disk-size (above the config default) larger than the free
    /// space of banger's state filesystem, or a --memory above this host's
    /// physical memory; both are refused without it.
    #[arg(long)]
    pub force_size: bool,
}

/// `vm set` flags.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("change").required(true).multiple(true).args(["vcpu", "memory", "disk_size"]))]
pub struct SetArgs {
    /// VM names (or ID prefixes); each is changed in turn.
    #[arg(required = true, value_name = "NAME", value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
    pub names: Vec<String>,
    /// New shape.
    #[command(flatten)]
    pub shape: ShapeArgs,
}

/// One or more VM names.
#[derive(Debug, Args)]
pub struct NamesArgs {
    /// VM names or unique ID prefixes; each is handled concurrently and
    /// reported in this order (a VM named twice is handled once).
    #[arg(required = true, value_name = "NAME", value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
    pub names: Vec<String>,
}

/// `banger image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List local images, or the image catalog with --available.
    List {
        /// Show the catalog instead of local images.
        #[arg(long)]
        available: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one image, with its rootfs and kernel paths.
    Show {
        /// Image name.
        #[arg(value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::images))]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete images (refused while a VM was created from one).
    Delete {
        /// Image names.
        #[arg(required = true, value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::images))]
        names: Vec<String>,
    },
    /// Register an existing root image in place (banger will not own its files).
    #[command(group = clap::ArgGroup::new("kernel_source").required(true).args(["kernel_ref", "kernel"]))]
    Register {
        /// Image name.
        #[arg(long, value_parser = parse_artifact_name)]
        name: String,
        /// The ext4 root filesystem.
        #[arg(long, value_name = "PATH")]
        rootfs: PathBuf,
        /// Kernel by name (`banger kernel list`).
        #[arg(long, value_name = "NAME", value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::kernels))]
        kernel_ref: Option<String>,
        /// Kernel file.
        #[arg(long, value_name = "PATH")]
        kernel: Option<PathBuf>,
        /// Initrd file, with --kernel.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Modules directory (lib/modules/VERSION or its parent), with
        /// --kernel: the kernel is then imported as `NAME-kernel`.
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules: Option<PathBuf>,
    },
    /// Copy a registered image into banger's state so it owns the files.
    Promote {
        /// Image name.
        #[arg(value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::images))]
        name: String,
    },
    /// Build a catalog image on this host from its recipe (mmdebstrap from
    /// the host's package mirror), its kernel too when missing.
    Build {
        /// Catalog name (default: the image catalog's default).
        #[arg(value_parser = parse_artifact_name)]
        name: Option<String>,
    },
    /// Pull an image: an image catalog name, or an OCI reference flattened to ext4.
    Pull {
        /// Catalog name or OCI reference (`debian:bookworm`, `127.0.0.1:5000/x:tag`).
        reference: String,
        /// Image name (default: derived from the reference, `debian:bookworm` -> `debian-bookworm`).
        #[arg(long, value_parser = parse_artifact_name)]
        name: Option<String>,
        /// Root filesystem size (default: max(tree × 1.25, 1G)).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        size: Option<String>,
        /// Kernel for VMs made from it (default: the kernel catalog's default).
        #[arg(long, value_name = "NAME", value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::kernels))]
        kernel_ref: Option<String>,
        /// Or a kernel file (vmlinux, or a vmlinuz that is unpacked),
        /// imported into the kernel library as `NAME-kernel`.
        #[arg(long, value_name = "PATH", conflicts_with = "kernel_ref")]
        kernel: Option<PathBuf>,
        /// Initrd file, with --kernel.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        initrd: Option<PathBuf>,
        /// Modules directory (lib/modules/VERSION or its parent), with --kernel.
        #[arg(long, value_name = "DIR", requires = "kernel")]
        modules: Option<PathBuf>,
    },
    /// Manage the OCI layer cache.
    #[command(subcommand)]
    Cache(ImageCacheCommand),
}

/// `banger image cache ...`
#[derive(Debug, Subcommand)]
pub enum ImageCacheCommand {
    /// Remove cached layers no image refers to; prints what was freed.
    Prune,
}

/// `banger kernel ...`
#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// List local kernels, or the catalog with --available.
    List {
        /// Show the catalog instead of local kernels.
        #[arg(long)]
        available: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one local kernel.
    Show {
        /// Kernel name.
        #[arg(value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::kernels))]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove local kernels (refused while a VM boots from one).
    Rm {
        /// Kernel names.
        #[arg(required = true, value_parser = parse_artifact_name, add = ArgValueCandidates::new(crate::complete::kernels))]
        names: Vec<String>,
    },
    /// Import a kernel from a directory (vmlinux, optional initrd and modules).
    Import {
        /// Name for the kernel.
        #[arg(value_parser = parse_artifact_name)]
        name: String,
        /// Directory holding the kernel artifacts.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Replace a kernel of the same name.
        #[arg(long)]
        force: bool,
    },
    /// Build a catalog kernel on this host from its recipe (the
    /// distribution's kernel package from the host's mirror).
    Build {
        /// Catalog name (default: the kernel catalog's default).
        #[arg(value_parser = parse_artifact_name)]
        name: Option<String>,
        /// Replace a local kernel of the same name.
        #[arg(long)]
        force: bool,
    },
    /// Download a kernel from the catalog.
    Pull {
        /// Catalog name (`banger kernel list --available`).
        #[arg(value_parser = parse_artifact_name)]
        name: String,
        /// Replace a local kernel of the same name.
        #[arg(long)]
        force: bool,
    },
}

/// `vm delete` arguments.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The VMs.
    #[command(flatten)]
    pub vms: NamesArgs,
    /// Delete even if a capability's teardown fails (its leftovers are
    /// reported, not retried).
    #[arg(long)]
    pub force: bool,
}

/// `banger cap ...`
#[derive(Debug, Subcommand)]
pub enum CapCommand {
    /// List built-in and plugin capabilities.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `banger daemon ...`
#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Start bangerd in the background if it is not running.
    Start,
    /// Ask bangerd to exit and wait until it has.
    Stop,
    /// Show whether bangerd runs (exit 3 when it does not).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `banger system ...`
#[derive(Debug, clap::Args)]
pub struct SystemArgs {
    /// Install under this directory instead of / (packaging, tests).
    #[arg(long, env = "BANGER_SYSTEM_ROOT", global = true, hide = true)]
    pub root: Option<std::path::PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: SystemCommand,
}

/// `banger system` subcommands.
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Install banger-helper (binary, /etc/banger/helper.toml, the group,
    /// systemd units) for the invoking user and start it. Idempotent.
    Install(SystemInstallArgs),
    /// Show the helper's and the daemon's state and versions (exit 3 when
    /// the helper is not installed or not answering).
    Status,
    /// Restart banger-helper (re-reads its config).
    Restart,
    /// Stop and remove everything `install` put on the host, and list the
    /// data left.
    Uninstall,
}

/// `banger system install` options.
#[derive(Debug, clap::Args)]
pub struct SystemInstallArgs {
    /// The user whose daemon may use the helper [default: $SUDO_USER].
    #[arg(long)]
    pub user: Option<String>,
    /// The group allowed to reach the helper's socket.
    #[arg(long, default_value = "banger")]
    pub group: String,
    /// That user's state directory, to derive its network names
    /// [default: ~USER/.local/state/banger].
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
    /// The user's bridge, when config.toml sets `[network] bridge`.
    #[arg(long)]
    pub bridge: Option<String>,
    /// The user's subnet, when config.toml sets `[network] subnet`.
    #[arg(long)]
    pub subnet: Option<String>,
    /// The user's tap prefix.
    #[arg(long)]
    pub tap_prefix: Option<String>,
    /// A PCI device (DDDD:BB:DD.F) the user may pass through; repeatable.
    #[arg(long = "vfio-device")]
    pub vfio_devices: Vec<String>,
}

/// `banger vm workspace ...`
#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Import the git repository enclosing PATH into the VM at /root/repo.
    ///
    /// History goes over as a git bundle; the working tree is overlaid on
    /// top: tracked changes (modified and deleted files) by default,
    /// untracked non-ignored files only with --include-untracked, ignored
    /// files never. Symlinks and executable bits survive. Your global git
    /// user.name/email go to the guest's ~/.gitconfig, a repository-local
    /// identity to the checkout. An existing /root/repo is replaced.
    Prepare(PrepareArgs),
    /// Print the guest's work since the prepared base as one binary patch.
    ///
    /// Commits made in the guest and uncommitted changes (untracked files
    /// included) come back in one `git diff --binary`, so
    /// `git apply` on a checkout of the base reproduces the guest's tree.
    /// The base used is printed on stderr.
    Export(ExportArgs),
}

/// `vm workspace prepare` flags.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// VM name.
    #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
    pub name: String,
    /// A path inside the repository.
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// Also copy untracked files that are not ignored.
    #[arg(long)]
    pub include_untracked: bool,
    /// Create this branch in the guest (never on the host).
    #[arg(long, value_name = "BRANCH")]
    pub branch: Option<String>,
    /// Start --branch at this ref, without the working-tree changes.
    #[arg(long, value_name = "REF", requires = "branch")]
    pub from: Option<String>,
    /// Copy the directory as is (.git and submodules included) instead of
    /// bundle + overlay; needed for repositories with submodules.
    #[arg(long, conflicts_with_all = ["include_untracked", "branch", "from"])]
    pub full_copy: bool,
    /// Print the mode and the exact file list, then exit; no daemon, no VM.
    #[arg(long)]
    pub dry_run: bool,
}

/// `vm workspace export` flags.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// VM name.
    #[arg(value_parser = parse_name, add = ArgValueCandidates::new(crate::complete::vms))]
    pub name: String,
    /// Diff against this commit instead of the one recorded at prepare time.
    #[arg(long, value_name = "SHA", value_parser = parse_sha)]
    pub base_commit: Option<String>,
    /// Write the patch to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Print JSON (base, changed files, the patch in base64) instead of the
    /// patch; with --output the patch still goes to FILE.
    #[arg(long)]
    pub json: bool,
}

fn parse_sha(s: &str) -> Result<String, String> {
    banger_api::workspace::check_base_commit(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// An image or kernel name.
pub fn parse_artifact_name(s: &str) -> Result<String, String> {
    model::validate_artifact_name("image or kernel", s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

pub(crate) fn parse_name(s: &str) -> Result<String, String> {
    VmName::parse(s)
        .map(String::from)
        .map_err(|e| e.to_string())
}

fn parse_cap(s: &str) -> Result<String, String> {
    s.parse::<CapChoice>()
        .map(|_| s.to_string())
        .map_err(|e| e.to_string())
}

fn parse_vcpus(s: &str) -> Result<i64, String> {
    let n: i64 = s.trim().parse().map_err(|_| {
        format!(
            "Invalid vCPU count {s:?}: use a whole number from 1 to {}",
            model::MAX_VCPUS
        )
    })?;
    model::validate_vcpus(n)
        .map(i64::from)
        .map_err(|e| e.to_string())
}

fn parse_size(s: &str) -> Result<String, String> {
    s.parse::<ByteSize>()
        .map(|_| s.trim().to_string())
        .map_err(|e| e.to_string())
}

/// `--memory`: a bare number is MiB (`2048`); a suffixed size (`2G`, `512M`)
/// must be a whole number of MiB.
pub fn parse_memory_mib(s: &str) -> Result<i64, String> {
    let t = s.trim();
    let mib: i64 = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().map_err(|_| memory_garbage(s))?
    } else if let Some(n) = t.strip_prefix('-').and_then(|n| n.parse::<i64>().ok()) {
        -n
    } else {
        let size: ByteSize = t.parse().map_err(|_| memory_garbage(s))?;
        if size.0 % (1 << 20) != 0 {
            return Err(format!(
                "Invalid memory {s:?}: use a whole number of MiB (e.g. 2048 or 2G)"
            ));
        }
        i64::try_from(size.mib()).map_err(|_| memory_garbage(s))?
    };
    model::validate_memory_mib(mib)
        .map(i64::from)
        .map_err(|e| e.to_string())
}

fn memory_garbage(s: &str) -> String {
    format!("Invalid memory {s:?}: use MiB (2048) or a size with a suffix (2G, 512M)")
}

/// The CLI with `--vcpu`, `--memory` and `--disk-size` of `vm create` and
/// `vm run` showing what they default to on this host (config
/// `[vm_defaults]`, else derived from the host, else built-in), with where
/// each value comes from. A config that does not load leaves the plain help.
pub fn command_with_resolved_defaults(cmd: clap::Command) -> clap::Command {
    let resolved = banger_api::paths::Paths::from_env()
        .ok()
        .and_then(|p| banger_api::config::Config::load(&p.config_file()).ok())
        .map(|c| (c.resolved_vm_defaults(), c.backend_plan(None)));
    let Some((r, backend)) = resolved else {
        return cmd;
    };
    let vmm = format!(
        "VMM backend [default: {} ({})]",
        backend.vmm.as_str(),
        backend.vmm_why
    );
    let v = r.values;
    let vcpu = format!("Number of vCPUs [default: {} ({})]", v.vcpus, r.vcpus_from);
    let memory = format!(
        "Memory: MiB (2048) or a size with suffix (2G) [default: {} MiB ({})]",
        v.memory_mib, r.memory_from
    );
    let disk = format!(
        "Work disk size [default: {} ({})]",
        v.disk_size, r.disk_from
    );
    let shape = |c: clap::Command| {
        c.mut_arg("vcpu", |a| a.help(vcpu.clone()))
            .mut_arg("memory", |a| a.help(memory.clone()))
            .mut_arg("disk_size", |a| a.help(disk.clone()))
            .mut_arg("vmm", |a| a.help(vmm.clone()))
    };
    cmd.mut_subcommand("vm", |vm| {
        vm.mut_subcommand("create", shape)
            .mut_subcommand("run", shape)
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("banger").chain(args.iter().copied()))
    }

    /// The rendered error for `args`, which must be a usage error (exit 2).
    fn usage_error(args: &[&str]) -> String {
        let e = parse(args).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        e.to_string()
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn create_parses_every_flag() {
        let cli = parse(&[
            "vm",
            "create",
            "--kernel",
            "vmlinux",
            "--initrd",
            "/boot/initrd",
            "--rootfs",
            "root.ext4",
            "--name",
            "dev-1",
            "--vcpu",
            "4",
            "--memory",
            "2G",
            "--disk-size",
            "16G",
            "--cap",
            "nat",
            "--cap",
            "-dns",
            "--cap",
            "shared-mount:host=/src,guest=/mnt",
            "--boot-args",
            "quiet loglevel=3",
            "--no-start",
        ])
        .unwrap();
        let Command::Vm(VmCommand::Create(c)) = cli.command else {
            panic!("expected vm create");
        };
        assert_eq!(c.kernel, Some(PathBuf::from("vmlinux")));
        assert_eq!(c.initrd, Some(PathBuf::from("/boot/initrd")));
        assert_eq!(c.rootfs, Some(PathBuf::from("root.ext4")));
        assert_eq!(c.name.as_deref(), Some("dev-1"));
        assert_eq!(c.shape.vcpu, Some(4));
        assert_eq!(c.shape.memory, Some(2048));
        assert_eq!(c.shape.disk_size.as_deref(), Some("16G"));
        assert_eq!(c.caps, ["nat", "-dns", "shared-mount:host=/src,guest=/mnt"]);
        assert_eq!(c.boot_args.as_deref(), Some("quiet loglevel=3"));
        assert!(c.no_start);
    }

    #[test]
    fn create_takes_at_most_one_root_and_one_kernel_source() {
        // No root named means the catalog's default image (the daemon's call).
        parse(&["vm", "create"]).unwrap();
        // A root from at most one place.
        usage_error(&["vm", "create", "--image", "deb", "--rootfs", "r"]);
        // Kernels: a file or a name, not both; an initrd only with a file.
        usage_error(&[
            "vm",
            "create",
            "--rootfs",
            "r",
            "--kernel",
            "k",
            "--kernel-ref",
            "fc",
        ]);
        usage_error(&["vm", "create", "--rootfs", "r", "--initrd", "i"]);
        usage_error(&["vm", "create", "--image", "../x"]);
        // The kernel may be left to the image or the catalog default.
        parse(&["vm", "create", "--rootfs", "r"]).unwrap();
        parse(&[
            "vm",
            "create",
            "--image",
            "debian-bookworm",
            "--kernel-ref",
            "fc-6.12",
        ])
        .unwrap();
        let cli = parse(&["vm", "create", "--kernel", "k", "--rootfs", "r"]).unwrap();
        let Command::Vm(VmCommand::Create(c)) = cli.command else {
            panic!("expected vm create");
        };
        assert_eq!((c.name, c.shape.vcpu, c.shape.memory), (None, None, None));
        assert!(c.caps.is_empty() && !c.no_start);
    }

    #[test]
    fn bad_values_are_rejected_naming_the_flag() {
        let base = ["vm", "create", "--kernel", "k", "--rootfs", "r"];
        for (flag, value, says) in [
            ("--vcpu", "0", "vCPU"),
            ("--vcpu", "-1", "vCPU"),
            ("--vcpu", "33", "vCPU"),
            ("--vcpu", "two", "vCPU"),
            ("--memory", "-5", "memory"),
            ("--memory", "0", "memory"),
            ("--memory", "64", "memory"),
            ("--memory", "lots", "memory"),
            ("--memory", "1536K", "whole number of MiB"),
            ("--disk-size", "0", "size"),
            ("--disk-size", "-8G", "size"),
            ("--disk-size", "8X", "size"),
            ("--name", "Bad_Name", "VM name"),
            ("--name", "-x", "VM name"),
            ("--cap", "Bad Cap", "capability"),
            ("--cap", "x:novalue", "capability"),
        ] {
            let mut args = base.to_vec();
            args.extend([flag, value]);
            let msg = usage_error(&args);
            assert!(msg.contains(flag), "{flag} {value}: {msg}");
            assert!(msg.contains(says), "{flag} {value}: {msg}");
        }
    }

    #[test]
    fn memory_flag_takes_mib_or_suffixed_sizes() {
        assert_eq!(parse_memory_mib("2048"), Ok(2048));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("512MiB"), Ok(512));
        assert_eq!(parse_memory_mib("1048576K"), Ok(1024));
        for bad in [
            "",
            "0",
            "-5",
            "127",
            "0G",
            "1.5G",
            "G",
            "2X",
            "99999999999999999999",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lifecycle_commands_take_several_names() {
        for verb in ["start", "stop", "restart", "delete", "kill"] {
            let cli = parse(&["vm", verb, "a", "b-2", "c"]).unwrap();
            let Command::Vm(cmd) = cli.command else {
                panic!("expected vm");
            };
            let names = match cmd {
                VmCommand::Start(n)
                | VmCommand::Stop(n)
                | VmCommand::Restart(n)
                | VmCommand::Kill(n) => n.names,
                VmCommand::Delete(d) => d.vms.names,
                other => panic!("{verb} parsed as {other:?}"),
            };
            assert_eq!(names, ["a", "b-2", "c"], "{verb}");
            usage_error(&["vm", verb]);
            assert!(usage_error(&["vm", verb, "ok", "../etc"]).contains("VM name"));
        }
    }

    #[test]
    fn set_needs_at_least_one_change() {
        usage_error(&["vm", "set", "dev"]);
        let cli = parse(&["vm", "set", "dev", "--memory", "4096", "--disk-size", "20G"]).unwrap();
        let Command::Vm(VmCommand::Set(s)) = cli.command else {
            panic!("expected vm set");
        };
        assert_eq!(s.names, ["dev"]);
        assert_eq!(
            (s.shape.vcpu, s.shape.memory, s.shape.disk_size.as_deref()),
            (None, Some(4096), Some("20G"))
        );
        let cli = parse(&["vm", "set", "a", "b", "--vcpu", "2"]).unwrap();
        let Command::Vm(VmCommand::Set(s)) = cli.command else {
            panic!("expected vm set");
        };
        assert_eq!(s.names, ["a", "b"]);
        assert!(usage_error(&["vm", "set", "dev", "--vcpu", "0"]).contains("--vcpu"));
    }

    #[test]
    fn listing_commands_take_json() {
        assert!(matches!(
            parse(&["vm", "list", "--json"]).unwrap().command,
            Command::Vm(VmCommand::List { json: true })
        ));
        assert!(matches!(
            parse(&["vm", "list"]).unwrap().command,
            Command::Vm(VmCommand::List { json: false })
        ));
        assert!(matches!(
            parse(&["vm", "pool", "--json"]).unwrap().command,
            Command::Vm(VmCommand::Pool { json: true })
        ));
        assert!(matches!(
            parse(&["vm", "show", "dev", "--json"]).unwrap().command,
            Command::Vm(VmCommand::Show { json: true, ref name }) if name == "dev"
        ));
        assert!(matches!(
            parse(&["cap", "list", "--json"]).unwrap().command,
            Command::Cap(CapCommand::List { json: true })
        ));
        assert!(matches!(
            parse(&["daemon", "status", "--json"]).unwrap().command,
            Command::Daemon(DaemonCommand::Status { json: true })
        ));
        assert!(matches!(
            parse(&["version", "--json"]).unwrap().command,
            Command::Version { json: true }
        ));
        assert!(matches!(
            parse(&["doctor", "--json"]).unwrap().command,
            Command::Doctor { json: true }
        ));
    }

    #[test]
    fn logs_daemon_and_completion_parse() {
        assert!(matches!(
            parse(&["vm", "logs", "dev", "-f"]).unwrap().command,
            Command::Vm(VmCommand::Logs { follow: true, ref name }) if name == "dev"
        ));
        assert!(matches!(
            parse(&["vm", "logs", "dev"]).unwrap().command,
            Command::Vm(VmCommand::Logs { follow: false, .. })
        ));
        assert!(matches!(
            parse(&["daemon", "start"]).unwrap().command,
            Command::Daemon(DaemonCommand::Start)
        ));
        assert!(matches!(
            parse(&["daemon", "stop"]).unwrap().command,
            Command::Daemon(DaemonCommand::Stop)
        ));
        for (s, want) in [
            ("bash", Shell::Bash),
            ("zsh", Shell::Zsh),
            ("fish", Shell::Fish),
        ] {
            assert!(matches!(
                parse(&["completion", s]).unwrap().command,
                Command::Completion { shell } if shell == want
            ));
        }
        assert!(matches!(
            parse(&["completion", "powershell"]).unwrap().command,
            Command::Completion {
                shell: Shell::Powershell
            }
        ));
        usage_error(&["completion", "tcsh"]);
        usage_error(&["vm", "frobnicate"]);
    }
}
