//! OCI images: pull an image from a registry and turn it into a flattened,
//! bootable ext4 root filesystem.
//!
//! The pipeline is: parse the reference (`reference`), find credentials
//! (`auth`), fetch the `linux/amd64` manifest and every layer into a
//! digest-addressed cache (`oci`), apply the layers in order inside a staging
//! tree while recording ownership and modes from the tar headers, and build
//! the ext4 with `mkfs.ext4 -d` plus one `debugfs` pass that applies the
//! recorded ownership (`flatten`). Nothing here needs root. See
//! `docs/images.md`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::archive::ExtractLimits;
use banger_api::model::ByteSize;

pub(crate) mod auth;
mod flatcache;
mod flatten;
pub(crate) mod oci;
pub(crate) mod reference;

pub use reference::default_image_name;

/// What a pull needs besides the reference.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries (`host[:port]`) that speak plain HTTP; all others must use
    /// HTTPS. Meant for loopback test registries.
    pub insecure_registries: Vec<String>,
    /// The docker `config.json` to read credentials from; `None` means
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// The layer cache root; blobs live in `<cache_dir>/blobs/sha256/<hex>`.
    pub cache_dir: PathBuf,
    /// The ext4 size; `None` means max(tree × 1.25, 1 GiB).
    pub size: Option<ByteSize>,
    /// Bounds on the layers of one pull: entries and uncompressed bytes over
    /// all layers, and each compressed layer's expansion ratio.
    pub layer_limits: ExtractLimits,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure_registries: Vec::new(),
            docker_config: None,
            cache_dir: PathBuf::new(),
            size: None,
            layer_limits: ExtractLimits::OCI_PULL,
        }
    }
}

/// The result of a successful pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledRootfs {
    /// The ext4 image, inside the staging directory the caller passed.
    pub rootfs: PathBuf,
    /// The digest of the image manifest that was pulled (`sha256:…`).
    pub digest: String,
    /// Bytes of the flattened tree (file contents rounded to 4 KiB blocks).
    pub tree_bytes: u64,
    /// The size of the ext4 image.
    pub size: ByteSize,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
}

/// Progress of a pull, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest was resolved to this digest with these layers.
    Resolved {
        /// Manifest digest.
        digest: String,
        /// Layer count.
        layers: usize,
    },
    /// A layer is already in the cache and will not be downloaded.
    LayerCached {
        /// Layer digest.
        digest: String,
    },
    /// A layer download is under way.
    LayerProgress {
        /// Layer digest.
        digest: String,
        /// Compressed bytes received so far.
        received: u64,
        /// Compressed bytes in all, as the manifest states.
        total: Option<u64>,
    },
    /// A layer download finished and was verified.
    LayerDownloaded {
        /// Layer digest.
        digest: String,
        /// Compressed bytes.
        bytes: u64,
    },
    /// A layer is being applied to the tree.
    Applying {
        /// Layer digest.
        digest: String,
    },
    /// The ext4 image is being built.
    BuildingFilesystem {
        /// Its size.
        size: ByteSize,
    },
    /// This manifest digest was flattened before with the same size and
    /// limits: the kept ext4 is cloned, no layer is fetched or applied.
    FlattenedCached {
        /// Manifest digest.
        digest: String,
        /// The ext4's size.
        size: ByteSize,
    },
}

pub use banger_api::api::PruneReport;

/// Pulls `reference` (`linux/amd64`) and builds its flattened ext4 as
/// `<staging_dir>/rootfs.ext4`. `staging_dir` must exist; on error everything
/// this function created in it is removed.
pub async fn pull_rootfs(
    reference: &str,
    staging_dir: &Path,
    opts: &PullOptions,
    progress: impl FnMut(PullEvent) + Send,
) -> Result<PulledRootfs, ImageError> {
    let created = Created::default();
    let out = pull_into(reference, staging_dir, opts, progress, &created).await;
    match out {
        Ok(p) => {
            created.remove_scratch();
            Ok(p)
        }
        Err(e) => {
            created.remove_all();
            Err(e)
        }
    }
}

async fn pull_into(
    reference: &str,
    staging_dir: &Path,
    opts: &PullOptions,
    mut progress: impl FnMut(PullEvent) + Send,
    created: &Created,
) -> Result<PulledRootfs, ImageError> {
    let parsed = reference::parse(reference)?;
    if !staging_dir.is_dir() {
        return Err(ImageError::StagingMissing(staging_dir.to_path_buf()));
    }
    let creds = auth::for_registry(parsed.resolve_registry(), opts)?;
    let flat_key = |digest: &str| flatcache::key(digest, opts.size, &opts.layer_limits);
    let mut hit = None;
    let image = oci::fetch(&parsed, reference, opts, creds, &mut progress, |digest| {
        hit = flatcache::lookup(&opts.cache_dir, &flat_key(digest));
        hit.is_some()
    })
    .await?;

    let tree = staging_dir.join(".rootfs-tree");
    let rootfs = staging_dir.join("rootfs.ext4");
    for p in [&tree, &rootfs] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(ImageError::StagingBusy(p.clone()));
        }
    }
    created.track(&tree, true);
    created.track(&rootfs, false);
    let built = match hit {
        Some(hit) => {
            progress(PullEvent::FlattenedCached {
                digest: image.digest.clone(),
                size: hit.built.size,
            });
            let (src, dst) = (hit.path.clone(), rootfs.clone());
            tokio::task::spawn_blocking(move || crate::disk::clone_file(&src, &dst))
                .await
                .map_err(|e| ImageError::Worker(e.to_string()))?
                .map_err(|e| ImageError::Write {
                    path: rootfs.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            hit.built
        }
        None => {
            let built = flatten_layers(&image, &tree, &rootfs, opts, &mut progress).await?;
            let (cache, key, digest) = (
                opts.cache_dir.clone(),
                flat_key(&image.digest),
                image.digest.clone(),
            );
            let (out, b) = (rootfs.clone(), built.clone());
            let stored = tokio::task::spawn_blocking(move || {
                flatcache::store(&cache, &key, &digest, &out, &b)
            })
            .await;
            if let Ok(Err(e)) | Err(e) = stored.map_err(|e| e.to_string()) {
                tracing::warn!(
                    "the flattened image is not cached, a re-pull will flatten again: {e}"
                );
            }
            built
        }
    };
    Ok(PulledRootfs {
        rootfs,
        digest: image.digest,
        tree_bytes: built.tree_bytes,
        size: built.size,
        layers: image.layers.iter().map(|l| l.digest.clone()).collect(),
    })
}

/// Applies the fetched layers in `tree` and builds `rootfs` (blocking I/O,
/// on a worker; its progress streams back over a channel).
async fn flatten_layers(
    image: &oci::Fetched,
    tree: &Path,
    rootfs: &Path,
    opts: &PullOptions,
    progress: &mut (impl FnMut(PullEvent) + Send),
) -> Result<flatten::Built, ImageError> {
    let layers = image.layers.clone();
    let (size, limits) = (opts.size, opts.layer_limits);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let worker = {
        let (tree, rootfs) = (tree.to_path_buf(), rootfs.to_path_buf());
        tokio::task::spawn_blocking(move || {
            flatten::build(&tree, &layers, &rootfs, size, &limits, &mut |e| {
                let _ = tx.send(e);
            })
        })
    };
    while let Some(e) = rx.recv().await {
        progress(e);
    }
    worker
        .await
        .map_err(|e| ImageError::Worker(e.to_string()))?
}

/// Removes every cached blob and kept flattened image whose digest (layer
/// or manifest) is not in `keep_digests`, plus downloads abandoned half-way.
pub fn cache_prune(
    cache_dir: &Path,
    keep_digests: &HashSet<String>,
) -> Result<PruneReport, ImageError> {
    let mut report = oci::prune(cache_dir, keep_digests)?;
    let (removed, freed) =
        flatcache::prune(cache_dir, keep_digests).map_err(|source| ImageError::Cache {
            path: cache_dir.join("flat"),
            source,
        })?;
    report.removed.extend(removed);
    report.freed_bytes += freed;
    Ok(report)
}

/// Paths a pull created in the caller's staging dir, for cleanup; scratch
/// paths are removed on success too.
#[derive(Debug, Default)]
struct Created {
    entries: std::sync::Mutex<Vec<(PathBuf, bool)>>,
}

impl Created {
    fn track(&self, path: &Path, scratch: bool) {
        if let Ok(mut e) = self.entries.lock() {
            e.push((path.to_path_buf(), scratch));
        }
    }

    fn remove_scratch(&self) {
        self.remove(true);
    }

    fn remove_all(&self) {
        self.remove(false);
    }

    fn remove(&self, only_scratch: bool) {
        let Ok(entries) = self.entries.lock() else {
            return;
        };
        for (p, scratch) in entries.iter() {
            if only_scratch && !scratch {
                continue;
            }
            flatten::remove_any(p);
        }
    }
}

/// An image operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error(
        "Invalid image reference {0:?}: use NAME[:TAG], REGISTRY/NAME[:TAG] or NAME@sha256:DIGEST"
    )]
    InvalidReference(String),
    /// The staging directory passed in does not exist.
    #[error("Staging directory {} does not exist", .0.display())]
    StagingMissing(PathBuf),
    /// A previous pull left its output in the staging directory.
    #[error("{} already exists: remove it or use an empty staging directory", .0.display())]
    StagingBusy(PathBuf),
    /// The docker config file could not be read or parsed.
    #[error("Cannot read docker config {}: fix or remove it", path.display())]
    DockerConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A docker credential helper failed.
    #[error("Credential helper docker-credential-{helper} failed for {host}: {detail}")]
    CredentialHelper {
        /// The helper's suffix (`pass`, `secretservice`, …).
        helper: String,
        /// The registry host.
        host: String,
        /// What went wrong.
        detail: String,
    },
    /// The registry answered plain HTTP but is not allowed to.
    #[error(
        "Registry {0} speaks plain HTTP; add it to insecure_registries in config.toml if you trust it"
    )]
    PlainHttpRegistry(String),
    /// The registry refused the credentials (or anonymous access).
    #[error(
        "Registry refused access to {0}: log in with `docker login` or add credentials to ~/.docker/config.json"
    )]
    Unauthorized(String),
    /// The image or tag does not exist.
    #[error("Image {0} not found in its registry: check the name and tag")]
    NotFound(String),
    /// The image index has no `linux/amd64` entry.
    #[error("Image {0} has no linux/amd64 variant; banger guests are x86_64")]
    NoAmd64(String),
    /// Fetching the manifest failed for another reason.
    #[error("Cannot fetch the manifest of {reference}")]
    Manifest {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// The manifest names a digest we cannot use.
    #[error("Unsupported digest {0:?} in the manifest: only sha256 is supported")]
    UnsupportedDigest(String),
    /// A layer has a media type we cannot unpack.
    #[error("Layer {digest} has unsupported media type {media_type:?}")]
    UnsupportedLayer {
        /// Layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// Downloading a layer failed (including a digest mismatch).
    #[error("Cannot download layer {digest} of {reference}")]
    Download {
        /// The reference.
        reference: String,
        /// Layer digest.
        digest: String,
        /// Why.
        #[source]
        source: oci_client::errors::OciDistributionError,
    },
    /// A layer's bytes do not hash to its digest.
    #[error(
        "Layer {digest} is corrupt (its content hashes to {actual}); it was removed from the cache, pull again"
    )]
    DigestMismatch {
        /// Expected digest.
        digest: String,
        /// What the bytes hash to.
        actual: String,
    },
    /// A cache file operation failed.
    #[error("Cannot use the layer cache at {}", path.display())]
    Cache {
        /// The cache path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A layer could not be read or decompressed.
    #[error("Cannot read layer {digest}")]
    ReadLayer {
        /// Layer digest.
        digest: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The layers exceed one of the pull's [`ExtractLimits`].
    #[error(
        "Layer {digest} exceeds the limit on {what}; if the image is trusted, raise {key} in config.toml"
    )]
    LayerLimit {
        /// Layer digest.
        digest: String,
        /// Which limit and its value.
        what: String,
        /// The config key that raises it.
        key: &'static str,
    },
    /// A registry sent more bytes than the manifest states for a blob.
    #[error(
        "The registry sent more than the {expected} bytes the manifest states for blob {digest}; the download was refused and removed"
    )]
    BlobTooLarge {
        /// Blob digest.
        digest: String,
        /// The descriptor's size.
        expected: u64,
    },
    /// A layer entry tries something unsafe or impossible.
    #[error("Layer {digest} has a bad entry {entry:?}: {reason}")]
    BadEntry {
        /// Layer digest.
        digest: String,
        /// The entry path as in the tar.
        entry: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the staging tree or image failed.
    #[error("Cannot write {}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The requested size cannot hold the image.
    #[error(
        "Size {given} is too small for this image ({tree_bytes} bytes of files): pass at least {needed}"
    )]
    SizeTooSmall {
        /// What was asked for.
        given: ByteSize,
        /// The flattened tree.
        tree_bytes: u64,
        /// The smallest size we accept.
        needed: ByteSize,
    },
    /// A required host tool is missing.
    #[error("{0} not found in PATH, /usr/sbin or /sbin: install e2fsprogs")]
    ToolMissing(&'static str),
    /// A host tool could not be run.
    #[error("Cannot run {tool}")]
    ToolRun {
        /// The tool.
        tool: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host tool reported failure.
    #[error("{tool} failed: {stderr}")]
    ToolFailed {
        /// The tool.
        tool: &'static str,
        /// Its stderr.
        stderr: String,
    },
    /// The built filesystem does not carry the recorded ownership or mode.
    #[error("The built filesystem is wrong at {path}: {detail}")]
    Verify {
        /// Path inside the image.
        path: String,
        /// What differs.
        detail: String,
    },
    /// A background worker died.
    #[error("Image worker failed: {0}")]
    Worker(String),
}

/// Builds `<staging_dir>/rootfs.ext4` from one root filesystem tarball on
/// this host (a local image build), flattened exactly like a one-layer
/// image: ownership and modes applied without root. Returns the image and
/// its size. On error everything this created in `staging_dir` is removed.
pub fn rootfs_from_tar(
    tar: &Path,
    staging_dir: &Path,
    size: Option<ByteSize>,
) -> Result<(std::path::PathBuf, ByteSize), ImageError> {
    let read_err = |source| ImageError::ReadLayer {
        digest: tar.display().to_string(),
        source,
    };
    // The flattener verifies every layer against its digest.
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut file = std::fs::File::open(tar).map_err(read_err)?;
    std::io::copy(&mut file, &mut hasher).map_err(read_err)?;
    let layer = flatten::Layer {
        digest: format!("sha256:{:x}", sha2::Digest::finalize(hasher)),
        compression: flatten::Compression::None,
        path: tar.to_path_buf(),
    };
    let tree = staging_dir.join(".rootfs-tree");
    let rootfs = staging_dir.join("rootfs.ext4");
    for p in [&tree, &rootfs] {
        if std::fs::symlink_metadata(p).is_ok() {
            return Err(ImageError::StagingBusy(p.clone()));
        }
    }
    let created = Created::default();
    created.track(&tree, true);
    created.track(&rootfs, false);
    match flatten::build(
        &tree,
        &[layer],
        &rootfs,
        size,
        &ExtractLimits::OCI_PULL,
        &mut |_| {},
    ) {
        Ok(built) => {
            created.remove_scratch();
            Ok((rootfs, built.size))
        }
        Err(e) => {
            created.remove_all();
            Err(e)
        }
    }
}
