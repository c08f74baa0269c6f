//! The image catalog: images `banger image pull NAME` fetches as a bundle
//! before falling through to OCI. The catalog is embedded in the binary
//! (`core/catalog/images.toml`), with a base URL that config can point at a
//! mirror.
//!
//! A bundle is a `.tar.zst` holding exactly two regular files at its top
//! level: `rootfs.ext4` and `manifest.toml` ([`BundleManifest`]). It is
//! streamed through [`crate::download`] (sha256, size, checked extraction)
//! into the caller's staging directory; the manifest is parsed and removed,
//! so only `rootfs.ext4` is left to publish.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::archive::ExtractLimits;
use crate::download::{BundleSource, DownloadError, PullProgress, fetch_bundle};
use crate::images::PullOptions;
use crate::oci_artifact::{ArtifactKind, pull_artifact};
use banger_api::catalog::CatalogError;
pub use banger_api::catalog::images::{CatalogImage, ImageCatalog};
use banger_api::model::{ImageKernel, ImageRecord, ImageSource, now_unix};

/// File name of an image's root filesystem inside its directory.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

/// File name of a bundle's manifest; removed once parsed.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// Manifests are a few lines; refuse to read anything much larger.
const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// A bundle's `manifest.toml`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleManifest {
    /// The kernel the rootfs boots with, by name (equal to the catalog's).
    pub kernel_ref: String,
    /// Free text about the image.
    pub description: Option<String>,
}

/// `manifest.toml` as written; `kernel` is optional here only so that its
/// absence gets its own error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

/// A pulled bundle, ready to publish from the staging directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// `<staging_dir>/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// The parsed manifest (its file is already removed).
    pub manifest: BundleManifest,
    /// The catalog entry's name.
    pub name: String,
    /// The absolute URL it was downloaded from.
    pub url: String,
}

/// A failed catalog or bundle operation.
#[derive(Debug, thiserror::Error)]
pub enum ImageCatalogError {
    /// The catalog text is invalid.
    #[error("Invalid image catalog: {0}")]
    ParseCatalog(String),
    /// The catalog has no entry of that name.
    #[error("No image named {0:?} in the image catalog")]
    NotInCatalog(String),
    /// Pulling the image's OCI artifact failed.
    #[error(transparent)]
    Artifact(crate::oci_artifact::ArtifactError),
    /// The entry has no published artifact, only a local build recipe.
    #[error(
        "Image {0:?} has no published artifact in the image catalog; build it here with `banger image build {0}`"
    )]
    NotPublished(String),
    /// A catalog entry's URL cannot be resolved.
    #[error(
        "Image {name:?} has the relative URL {url:?} but the image catalog has no base URL; set one in config"
    )]
    NoBaseUrl {
        /// The image.
        name: String,
        /// Its relative URL.
        url: String,
    },
    /// The staging directory is missing or already holds something.
    #[error("Staging directory {0} must exist and be empty")]
    Staging(PathBuf),
    /// Downloading or extracting the bundle failed.
    #[error("Cannot pull image bundle {0:?}")]
    Download(String, #[source] DownloadError),
    /// The bundle holds something besides `rootfs.ext4` and `manifest.toml`.
    #[error(
        "Image bundle {url} holds the unexpected entry {entry:?}; a bundle holds exactly `rootfs.ext4` and `manifest.toml`"
    )]
    UnexpectedEntry {
        /// The bundle URL.
        url: String,
        /// The top-level entry.
        entry: String,
    },
    /// The bundle has no regular file `rootfs.ext4`.
    #[error("Image bundle {0} has no regular file `rootfs.ext4` at its top level")]
    MissingRootfs(String),
    /// The bundle has no regular file `manifest.toml`.
    #[error("Image bundle {0} has no regular file `manifest.toml` at its top level")]
    MissingManifest(String),
    /// The manifest cannot be read or parsed.
    #[error("Cannot read the manifest of image bundle {0}")]
    ReadManifest(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// The manifest names no kernel.
    #[error("The manifest of image bundle {0} names no kernel; it needs `kernel = \"NAME\"`")]
    ManifestNoKernel(String),
    /// The manifest's kernel differs from the catalog's.
    #[error(
        "Image bundle {url} boots kernel {manifest:?} but the catalog says {catalog:?}; the catalog is stale or the bundle wrong"
    )]
    KernelMismatch {
        /// The bundle URL.
        url: String,
        /// The catalog entry's kernel.
        catalog: String,
        /// The manifest's kernel.
        manifest: String,
    },
    /// A filesystem operation in the staging directory failed.
    #[error("Cannot {op} {path}")]
    Io {
        /// The operation (`list`, `remove`, ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl From<CatalogError> for ImageCatalogError {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::Parse { why, .. } => ImageCatalogError::ParseCatalog(why),
            CatalogError::NotInCatalog { name, .. } => ImageCatalogError::NotInCatalog(name),
            CatalogError::NoBaseUrl { name, url, .. } => ImageCatalogError::NoBaseUrl { name, url },
        }
    }
}

impl Bundle {
    /// The library record for this bundle published as image `image_name`
    /// (paths still point into staging; `ImageLibrary::publish` rebases them).
    pub fn record(&self, image_name: &str) -> ImageRecord {
        ImageRecord {
            name: image_name.to_owned(),
            rootfs: self.rootfs.clone(),
            kernel: ImageKernel::Named {
                name: self.manifest.kernel_ref.clone(),
            },
            source: ImageSource::Catalog {
                name: self.name.clone(),
                url: self.url.clone(),
            },
            managed: true,
            size_bytes: fs::metadata(&self.rootfs).map(|m| m.len()).unwrap_or(0),
            layers: Vec::new(),
            created_at: now_unix(),
        }
    }
}

/// Downloads catalog image `name` into the existing, empty `staging_dir`,
/// checks the bundle's layout, parses and removes its manifest.
///
/// Writes only inside `staging_dir`. On error the directory is left empty
/// (the caller's staging guard removes it); if the future is dropped midway,
/// the directory is removed once the extractor thread has stopped writing
/// (see [`crate::download::fetch_bundle`]).
pub async fn pull_bundle(
    catalog: &ImageCatalog,
    name: &str,
    staging_dir: &Path,
    oci: &PullOptions,
    mut progress: impl FnMut(PullProgress),
) -> Result<Bundle, ImageCatalogError> {
    let entry = catalog
        .find(name)
        .ok_or_else(|| ImageCatalogError::NotInCatalog(name.to_owned()))?;
    let url = catalog.url_of(entry)?;
    let empty = fs::read_dir(staging_dir).is_ok_and(|mut rd| rd.next().is_none());
    if !empty {
        return Err(ImageCatalogError::Staging(staging_dir.to_path_buf()));
    }
    // Two files are expected; a little slack for `./` entries before the
    // layout check names what is wrong.
    let limits = ExtractLimits {
        max_entries: 64,
        ..ExtractLimits::default()
    };
    let dest = staging_dir.to_path_buf();
    let (fetched, source) = match (&entry.sources.oci, url) {
        (None, None) => return Err(ImageCatalogError::NotPublished(name.to_owned())),
        (Some(reference), _) => {
            let got = pull_artifact(
                reference,
                ArtifactKind::IMAGE,
                oci,
                dest,
                limits,
                (),
                &mut progress,
            )
            .await
            .map(|_| ())
            .map_err(ImageCatalogError::Artifact);
            (got, reference.clone())
        }
        (None, Some(url)) => {
            let source = BundleSource {
                url: &url,
                // Present with every URL: checked when the catalog was parsed.
                sha256: entry.sources.sha256.as_deref().unwrap_or_default(),
                size: entry.sources.size,
            };
            let got = fetch_bundle(source, dest, limits, (), &mut progress)
                .await
                .map(|_| ())
                .map_err(|e| ImageCatalogError::Download(name.to_owned(), e));
            (got, url)
        }
    };
    let result = fetched.and_then(|()| finish_bundle(staging_dir, entry, &source));
    match result {
        Ok(bundle) => {
            progress(PullProgress::Verified);
            Ok(bundle)
        }
        Err(e) => {
            clear_dir(staging_dir)?;
            Err(e)
        }
    }
}

/// Checks an extracted bundle holds exactly a regular `rootfs.ext4` and
/// `manifest.toml`, parses the manifest and removes it.
fn finish_bundle(dir: &Path, entry: &CatalogImage, url: &str) -> Result<Bundle, ImageCatalogError> {
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let e = e.map_err(io_err("list", dir))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if let Some(extra) = names
        .iter()
        .find(|n| *n != ROOTFS_FILE && *n != MANIFEST_FILE)
    {
        return Err(ImageCatalogError::UnexpectedEntry {
            url: url.to_owned(),
            entry: extra.clone(),
        });
    }
    let is_regular = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file());
    let rootfs = dir.join(ROOTFS_FILE);
    if !is_regular(&rootfs) {
        return Err(ImageCatalogError::MissingRootfs(url.to_owned()));
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    if !is_regular(&manifest_path) {
        return Err(ImageCatalogError::MissingManifest(url.to_owned()));
    }
    let raw = read_manifest(&manifest_path, url)?;
    let Some(kernel) = raw.kernel.filter(|k| !k.is_empty()) else {
        return Err(ImageCatalogError::ManifestNoKernel(url.to_owned()));
    };
    if kernel != entry.kernel {
        return Err(ImageCatalogError::KernelMismatch {
            url: url.to_owned(),
            catalog: entry.kernel.clone(),
            manifest: kernel,
        });
    }
    let manifest = BundleManifest {
        kernel_ref: kernel,
        description: raw.description,
    };
    fs::remove_file(&manifest_path).map_err(io_err("remove", &manifest_path))?;
    Ok(Bundle {
        rootfs,
        manifest,
        name: entry.name.clone(),
        url: url.to_owned(),
    })
}

fn read_manifest(path: &Path, url: &str) -> Result<RawManifest, ImageCatalogError> {
    let bad = |e: Box<dyn std::error::Error + Send + Sync>| {
        ImageCatalogError::ReadManifest(url.to_owned(), e)
    };
    let file = fs::File::open(path).map_err(|e| bad(Box::new(e)))?;
    let mut text = String::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(Box::new(e)))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(bad(format!("larger than {MAX_MANIFEST_BYTES} bytes").into()));
    }
    toml::from_str(&text).map_err(|e| bad(Box::new(e)))
}

/// Removes everything inside `dir` (never following links), keeping `dir`.
fn clear_dir(dir: &Path) -> Result<(), ImageCatalogError> {
    for e in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let path = e.map_err(io_err("list", dir))?.path();
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err("remove", &path))?;
    }
    Ok(())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageCatalogError {
    let path = path.to_path_buf();
    move |source| ImageCatalogError::Io { op, path, source }
}
