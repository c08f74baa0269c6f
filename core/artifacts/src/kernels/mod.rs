//! Local kernels: one directory per kernel under the kernels root
//! (`<state_dir>/kernels/<name>/`) holding `manifest.toml`, `vmlinux`, and
//! optionally `initrd` and `modules/`.
//!
//! Every kernel is assembled in `<root>/.staging-<name>-<random>/` on the same
//! filesystem and published with one `rename`; replacing (`--force`) swaps the
//! two directories atomically, so a crash leaves the old kernel or the new one,
//! never neither. Leftover staging dirs are removed by
//! [`KernelStore::cleanup_staging`], which the daemon calls at start.

mod import;
mod modules;
mod pull;
mod store;

use std::io;
use std::path::PathBuf;

pub use banger_api::catalog::CatalogError;
pub use banger_api::catalog::kernels::{Catalog, CatalogEntry};
pub use modules::{BootModules, DEFAULT_BOOT_MODULES, MODULES_LOAD, boot_modules_archive};
pub use pull::pull;

pub use crate::download::PullProgress;

pub use import::{KernelFiles, is_elf_kernel};
pub use store::{KernelStore, validate_name};

use crate::archive::ArchiveError;

pub use banger_api::api::KernelManifest;

/// A local kernel: its manifest and the absolute paths of its artifacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalKernel {
    /// The manifest.
    pub manifest: KernelManifest,
    /// The kernel's directory.
    pub dir: PathBuf,
    /// The uncompressed kernel image.
    pub vmlinux: PathBuf,
    /// The kernel's own initrd, if it has one.
    pub initrd: Option<PathBuf>,
    /// The modules tree (`modules/<version>/...`), if it has one.
    pub modules: Option<PathBuf>,
}

/// A failed kernel operation.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The name is not a valid kernel name.
    #[error(
        "Invalid kernel name {0:?}: use 1-64 characters from a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit, without `..`"
    )]
    InvalidName(String),
    /// No local kernel has that name.
    #[error("No local kernel named {0:?}; see `banger kernel list`")]
    NotFound(String),
    /// A local kernel of that name exists and `force` was not given.
    #[error("Kernel {0:?} already exists; pass --force to replace it")]
    AlreadyExists(String),
    /// The catalog has no entry of that name.
    #[error("No kernel named {0:?} in the catalog; see `banger kernel list --available`")]
    NotInCatalog(String),
    /// The entry has no published artifact, only a local build recipe.
    #[error(
        "Kernel {0:?} has no published artifact in the catalog; build it here with `banger kernel build {0}`"
    )]
    NotPublished(String),
    /// Pulling the kernel's OCI artifact failed.
    #[error(transparent)]
    Artifact(#[from] crate::oci_artifact::ArtifactError),
    /// The catalog text is invalid.
    #[error("Invalid kernel catalog: {0}")]
    ParseCatalog(String),
    /// A catalog entry's URL cannot be resolved.
    #[error(
        "Kernel {name:?} has the relative URL {url:?} but the catalog has no base URL; set one in config"
    )]
    NoBaseUrl {
        /// The kernel.
        name: String,
        /// Its relative URL.
        url: String,
    },
    /// The import directory or metadata file does not name usable artifacts.
    #[error("Cannot import from {dir}: {reason}")]
    Discover {
        /// The directory.
        dir: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A downloaded or imported bundle has no `vmlinux`.
    #[error("Kernel bundle {0} has no `vmlinux` file at its top level")]
    MissingVmlinux(String),
    /// The download failed (connection, HTTP status, truncated body).
    #[error("Cannot download {url}")]
    Download {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server answered with an error status.
    #[error("Cannot download {url}: the server answered HTTP {status}")]
    HttpStatus {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
    },
    /// The download's size differs from the catalog's.
    #[error(
        "Download of {url} is {got} bytes but the catalog says {expected}; the mirror may be stale or the download truncated"
    )]
    SizeMismatch {
        /// The URL.
        url: String,
        /// Bytes the catalog promises.
        expected: u64,
        /// Bytes received (so far, if more than expected).
        got: u64,
    },
    /// The download's sha256 differs from the catalog's.
    #[error(
        "Checksum mismatch for {url}: expected sha256 {expected}, got {got}; the download is corrupt or the catalog is stale"
    )]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The catalog's sha256.
        expected: String,
        /// The download's sha256.
        got: String,
    },
    /// The tarball could not be decompressed or was rejected as unsafe.
    #[error("Cannot extract kernel bundle {0}")]
    Extract(String, #[source] ArchiveError),
    /// A manifest could not be read or parsed.
    #[error("Cannot read kernel manifest {0}")]
    ReadManifest(PathBuf, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// The modules tree has no directory for the kernel version.
    #[error(
        "No modules for kernel {version} under {}: expected lib/modules/{version}/ or {version}/ holding kernel/ or modules.builtin",
        root.display()
    )]
    ModulesDir {
        /// Where they were looked for.
        root: PathBuf,
        /// The kernel version.
        version: String,
    },
    /// The modules directory holds several kernel versions, none the kernel's.
    #[error(
        "Cannot tell which kernel's modules to use in {}: it holds {} and none is {version:?}; set the kernel's version (`version = \"...\"` in banger-kernel.toml, or in a bundle's manifest.toml)",
        dir.display(),
        if found.is_empty() { "no version directory".to_owned() } else { found.join(", ") }
    )]
    ModuleVersion {
        /// The modules directory.
        dir: PathBuf,
        /// The kernel's version.
        version: String,
        /// The version directories found.
        found: Vec<String>,
    },
    /// A boot module is neither a module file nor built into the kernel.
    #[error(
        "Kernel module {name:?}{} is neither under kernel/ nor listed in modules.builtin; banger's guests need it: use a kernel that has it (as a module or built in)",
        needed_by.as_ref().map(|m| format!(" (needed by {m})")).unwrap_or_default()
    )]
    ModuleNotFound {
        /// The module.
        name: String,
        /// The module that depends on it, if it was not asked for directly.
        needed_by: Option<String>,
    },
    /// A module file could not be decompressed or is not a kernel module.
    #[error("Cannot read kernel module {}", path.display())]
    Module {
        /// The module file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Modules depend on each other in a circle (a broken modules tree).
    #[error("Kernel modules depend on each other in a cycle among {}", .0.join(", "))]
    ModuleCycle(Vec<String>),
    /// A filesystem operation in the kernels root failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// The operation (`create`, `copy`, `rename`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<CatalogError> for KernelError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Parse { why, .. } => KernelError::ParseCatalog(why),
            CatalogError::NotInCatalog { name, .. } => KernelError::NotInCatalog(name),
            CatalogError::NoBaseUrl { name, url, .. } => KernelError::NoBaseUrl { name, url },
        }
    }
}

impl KernelError {
    fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| KernelError::Io { op, path, source }
    }
}
