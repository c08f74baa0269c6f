//! `kernel pull`: stream a catalog tarball through [`crate::download`] into
//! staging, normalise its layout, then publish by rename.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::import::{hash_file, now_rfc3339, read_metadata};
use super::store::Staging;
use super::{
    Catalog, CatalogEntry, KernelError, KernelManifest, KernelStore, LocalKernel, validate_name,
};
use crate::archive::ExtractLimits;
use crate::download::{BundleSource, DownloadError, PullProgress, fetch_bundle};
use crate::images::PullOptions;
use crate::oci_artifact::{ArtifactKind, pull_artifact};

/// Pulls the catalog kernel `name` into `store`: its OCI artifact when the
/// entry has one (pinned by digest, registry settings from `oci`), else its
/// URL. Refuses to replace a local kernel of the same name unless `force`.
/// On any failure nothing is left in the kernels root.
pub async fn pull(
    store: &KernelStore,
    catalog: &Catalog,
    name: &str,
    force: bool,
    oci: &PullOptions,
    mut progress: impl FnMut(PullProgress),
) -> Result<LocalKernel, KernelError> {
    validate_name(name)?;
    let entry = catalog.find(name)?;
    let url = catalog.url_of(entry)?;
    let source = match (&entry.sources.oci, &url) {
        (Some(reference), _) => reference.clone(),
        (None, Some(url)) => url.clone(),
        (None, None) => return Err(KernelError::NotPublished(name.to_owned())),
    };
    if !force && store.root().join(name).exists() {
        return Err(KernelError::AlreadyExists(name.to_owned()));
    }
    // Shared with the extractor thread, so the directory is removed only
    // once both are done with it, even if this future is dropped midway.
    let staging = Arc::new(store.stage(name)?);
    match (&entry.sources.oci, &url) {
        (Some(reference), _) => {
            let dest = staging.path().to_path_buf();
            pull_artifact(
                reference,
                ArtifactKind::KERNEL,
                oci,
                dest,
                ExtractLimits::default(),
                Arc::clone(&staging),
                &mut progress,
            )
            .await?;
        }
        (None, _) => {
            download_and_extract(entry, &source, Arc::clone(&staging), &mut progress).await?
        }
    }
    let url = source;
    let staging = Arc::try_unwrap(staging).map_err(|_| KernelError::Io {
        op: "publish",
        path: store.root().join(name),
        source: io::Error::other("the extractor still holds the staging dir"),
    })?;
    let manifest = finish_bundle(staging.path(), entry, &url)?;
    staging.write_manifest(&manifest)?;
    progress(PullProgress::Verified);
    store.publish(staging, name, force)
}

async fn download_and_extract(
    entry: &CatalogEntry,
    url: &str,
    staging: Arc<Staging>,
    progress: &mut impl FnMut(PullProgress),
) -> Result<(), KernelError> {
    let source = BundleSource {
        url,
        // Present with every URL: checked when the catalog was parsed.
        sha256: entry.sources.sha256.as_deref().unwrap_or_default(),
        size: entry.sources.size,
    };
    let dest = staging.path().to_path_buf();
    fetch_bundle(source, dest, ExtractLimits::default(), staging, progress)
        .await
        .map(|_report| ())
        .map_err(KernelError::from)
}

impl From<DownloadError> for KernelError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::Request { url, source } => KernelError::Download { url, source },
            DownloadError::HttpStatus { url, status } => KernelError::HttpStatus { url, status },
            DownloadError::SizeMismatch { url, expected, got } => {
                KernelError::SizeMismatch { url, expected, got }
            }
            DownloadError::ChecksumMismatch { url, expected, got } => {
                KernelError::ChecksumMismatch { url, expected, got }
            }
            DownloadError::Extract { url, source } => KernelError::Extract(url, source),
        }
    }
}

/// Normalises an extracted bundle to the local layout (`vmlinux`, `initrd`,
/// `modules/`) and builds its manifest.
fn finish_bundle(
    dir: &Path,
    entry: &CatalogEntry,
    url: &str,
) -> Result<KernelManifest, KernelError> {
    let vmlinux = dir.join("vmlinux");
    // Every symlink in the bundle was checked to stay inside it, so
    // following one here is safe.
    if !vmlinux.is_file() {
        return Err(KernelError::MissingVmlinux(url.to_owned()));
    }
    let meta = read_metadata(dir)?.unwrap_or_default();
    // Move conventional alternatives into place only where nothing of the
    // local name exists yet.
    let initrd = dir.join("initrd");
    let initrd_img = dir.join("initrd.img");
    if !exists(&initrd) && initrd_img.is_file() {
        fs::rename(&initrd_img, &initrd).map_err(KernelError::io("rename", &initrd_img))?;
    }
    let modules = dir.join("modules");
    let lib_modules = dir.join("lib/modules");
    if !exists(&modules) && is_real_dir(&lib_modules) {
        fs::rename(&lib_modules, &modules).map_err(KernelError::io("rename", &lib_modules))?;
        // Only succeeds when `lib/` held nothing else.
        let _ = fs::remove_dir(dir.join("lib"));
    }
    let version = meta.version.unwrap_or_else(|| entry.version.clone());
    // A modular kernel without an initrd boots banger's agent only with its
    // boot modules packed as one.
    if !exists(&initrd) && is_real_dir(&modules) {
        super::modules::write_boot_initrd(dir, &version)?;
    }
    Ok(KernelManifest {
        name: entry.name.clone(),
        distro: meta.distro.unwrap_or_else(|| entry.distro.clone()),
        arch: entry.arch.clone(),
        version,
        sha256: hash_file(&vmlinux)?,
        source: format!("pull:{url}"),
        imported_at: now_rfc3339(),
        has_initrd: initrd.is_file(),
        has_modules: modules.is_dir(),
    })
}

/// Whether anything (even a dangling link) is at `p`.
fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

/// A directory, not a link to one.
fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}
