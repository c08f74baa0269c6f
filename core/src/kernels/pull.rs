//! `kernel pull`: stream a catalog tarball through sha256 and a zstd-decoded,
//! checked tar extraction into staging, then publish by rename.

use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::import::{hash_file, hex, now_rfc3339, read_metadata};
use super::store::Staging;
use super::{
    Catalog, CatalogEntry, KernelError, KernelManifest, KernelStore, LocalKernel, validate_name,
};
use crate::archive::{ArchiveError, ExtractLimits, extract_tar};

/// Progress of one pull, for streaming to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullProgress {
    /// Bytes received so far; `total` is the catalog size (0 if unknown).
    Downloading {
        /// Bytes received.
        received: u64,
        /// Bytes expected.
        total: u64,
    },
    /// The download matched its sha256 and was extracted; publishing.
    Verified,
}

/// Report download progress at most once per this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// Pulls the catalog kernel `name` into `store`. Refuses to replace a local
/// kernel of the same name unless `force`. On any failure nothing is left in
/// the kernels root.
pub async fn pull(
    store: &KernelStore,
    catalog: &Catalog,
    name: &str,
    force: bool,
    mut progress: impl FnMut(PullProgress),
) -> Result<LocalKernel, KernelError> {
    validate_name(name)?;
    let entry = catalog.find(name)?;
    let url = catalog.url_of(entry)?;
    if !force && store.root().join(name).exists() {
        return Err(KernelError::AlreadyExists(name.to_owned()));
    }
    // Shared with the extractor thread, so the directory is removed only
    // once both are done with it, even if this future is dropped midway.
    let staging = Arc::new(store.stage(name)?);
    download_and_extract(entry, &url, Arc::clone(&staging), &mut progress).await?;
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
    let download = |source: reqwest::Error| KernelError::Download {
        url: url.to_owned(),
        source: Box::new(source),
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(download)?;
    let response = client.get(url).send().await.map_err(download)?;
    if !response.status().is_success() {
        return Err(KernelError::HttpStatus {
            url: url.to_owned(),
            status: response.status().as_u16(),
        });
    }

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let extractor = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            chunk: Bytes::new(),
        };
        let decoder = zstd::stream::read::Decoder::new(reader).map_err(ArchiveError::Read)?;
        extract_tar(decoder, staging.path(), &ExtractLimits::default())
    });

    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut reported = 0u64;
    let mut failed = None;
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let bytes = match chunk {
            Ok(b) => b,
            Err(e) => {
                failed = Some(download(e));
                break;
            }
        };
        received += bytes.len() as u64;
        if entry.size > 0 && received > entry.size {
            failed = Some(KernelError::SizeMismatch {
                url: url.to_owned(),
                expected: entry.size,
                got: received,
            });
            break;
        }
        hasher.update(&bytes);
        // The extractor may already have stopped (end of archive or a
        // rejected entry); keep hashing the rest regardless.
        let _ = tx.send(Ok(bytes)).await;
        if received - reported >= PROGRESS_STEP {
            reported = received;
            progress(PullProgress::Downloading {
                received,
                total: entry.size,
            });
        }
    }
    if failed.is_some() {
        let _ = tx.send(Err(io::Error::other("download failed"))).await;
    }
    drop(tx);
    let extracted = extractor.await;
    if let Some(e) = failed {
        return Err(e);
    }
    progress(PullProgress::Downloading {
        received,
        total: entry.size,
    });
    if entry.size > 0 && received != entry.size {
        return Err(KernelError::SizeMismatch {
            url: url.to_owned(),
            expected: entry.size,
            got: received,
        });
    }
    let got = hex(&hasher.finalize());
    if got != entry.sha256 {
        return Err(KernelError::ChecksumMismatch {
            url: url.to_owned(),
            expected: entry.sha256.clone(),
            got,
        });
    }
    match extracted {
        Ok(Ok(_report)) => Ok(()),
        Ok(Err(e)) => Err(KernelError::Extract(url.to_owned(), e)),
        Err(join) => Err(KernelError::Extract(
            url.to_owned(),
            ArchiveError::Read(io::Error::other(join.to_string())),
        )),
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
    Ok(KernelManifest {
        name: entry.name.clone(),
        distro: meta.distro.unwrap_or_else(|| entry.distro.clone()),
        arch: entry.arch.clone(),
        version: meta.version.unwrap_or_else(|| entry.version.clone()),
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

/// A blocking `Read` over chunks sent from the async download loop. An
/// `Err` chunk fails the read; a closed channel is end of stream.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}
