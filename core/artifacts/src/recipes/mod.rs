//! Local builds of the catalogs' default kernel and image, from the host's
//! own Debian/Ubuntu package mirror, for when no published artifact can be
//! reached. The recipes are data this binary carries (package names, the
//! image's package list and customisation script under `core/recipes/`),
//! so a fresh host needs nothing from banger's release servers.
//!
//! - kernel `debian-cloud`: the distribution's cloud kernel package
//!   (`apt-get download`), its ELF `vmlinux` taken out of `vmlinuz`
//!   ([`bzimage`]) and the modules a guest needs to boot packed as the
//!   kernel's initrd ([`crate::kernels::boot_modules_archive`]).
//! - image `debian-bookworm`: `mmdebstrap` of Debian bookworm with systemd,
//!   sshd and git into a tarball, flattened to ext4 like an OCI layer.
//!
//! Both take well under a minute here; figures are in `docs/kernels.md`
//! and `docs/images.md`.

pub mod apt;
pub mod bzimage;
pub mod image;
pub mod kernel;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use banger_api::catalog::recipes::{
    IMAGE_RECIPES, KERNEL_RECIPES, Tool, Unready, host_ready, host_ready_with, tools_of,
};
pub use image::{ImageRecipe, build_image};
pub use kernel::{KernelRecipe, build_kernel};

/// What a build reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A step began; `expected` is how long it usually takes here.
    Step {
        /// Short step name (`apt_update`, `download`, `mmdebstrap`, ...).
        step: &'static str,
        /// What is being done, for the user.
        message: String,
        /// Its usual duration, when known.
        expected: Option<Duration>,
    },
    /// A line of detail.
    Info(String),
}

/// A local build that failed.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// No recipe of that name.
    #[error("No {kind} recipe named {name:?}; this build of banger has: {known}")]
    Unknown {
        /// `kernel` or `image`.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The recipes there are.
        known: String,
    },
    /// This host lacks a tool or a package source the recipe needs.
    #[error("This host cannot run the recipe: {}; fix: {}", .0.why, .0.fix)]
    HostNotReady(Unready),
    /// None of the packages exists in the configured mirror.
    #[error(
        "None of these packages is in the host's package mirror: {}; check /etc/apt/sources.list*",
        .0.join(", ")
    )]
    NoPackage(Vec<String>),
    /// A program could not be started.
    #[error("Cannot run {0}")]
    Spawn(&'static str, #[source] std::io::Error),
    /// A program failed.
    #[error("{what} failed ({status}): {tail}")]
    Failed {
        /// The command.
        what: String,
        /// Its exit status.
        status: String,
        /// The end of its error output.
        tail: String,
    },
    /// The unpacked kernel package is not laid out as expected.
    #[error("The kernel package {package} {problem}")]
    KernelPackage {
        /// The `.deb`.
        package: String,
        /// What is wrong.
        problem: String,
    },
    /// The kernel image could not be unpacked.
    #[error("Cannot take the ELF kernel out of {0}")]
    BzImage(PathBuf, #[source] bzimage::BzImageError),
    /// Publishing or boot-module packing failed.
    #[error(transparent)]
    Kernel(#[from] crate::kernels::KernelError),
    /// Building the ext4 failed.
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    /// A file operation failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl RecipeError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        RecipeError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Runs `cmd` to completion; a failure carries the end of its stderr.
fn run(cmd: &mut Command, what: &str) -> Result<(), RecipeError> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RecipeError::Spawn(program_name(cmd), e))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    Err(RecipeError::Failed {
        what: what.to_string(),
        status: out.status.to_string(),
        tail: lines[lines.len().saturating_sub(6)..].join("\n"),
    })
}

/// The program a command runs, as a static label for errors.
fn program_name(cmd: &Command) -> &'static str {
    match cmd.get_program().to_str() {
        Some("apt-get") => "apt-get",
        Some("apt-cache") => "apt-cache",
        Some("dpkg-deb") => "dpkg-deb",
        Some("mmdebstrap") => "mmdebstrap",
        _ => "a build tool",
    }
}

/// A scratch directory for one build under `cache_dir/builds`, on the same
/// filesystem as banger's state so large files are not copied through a
/// small /tmp. Removed when dropped.
fn scratch(cache_dir: &Path, what: &str) -> Result<tempfile::TempDir, RecipeError> {
    let parent = cache_dir.join("builds");
    std::fs::create_dir_all(&parent).map_err(|e| RecipeError::io("create", &parent, e))?;
    tempfile::Builder::new()
        .prefix(&format!("{what}-"))
        .tempdir_in(&parent)
        .map_err(|e| RecipeError::io("create a directory in", &parent, e))
}
