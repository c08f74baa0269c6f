//! Registry access and the digest-addressed layer cache.
//!
//! Blobs live in `<cache>/blobs/sha256/<hex>`. A download goes to a temp name
//! in the same directory while oci-client hashes it, and is renamed into
//! place only when the digest matches. A cached blob is trusted by its name
//! and size for skipping the download, and is hashed again while it is
//! applied (see `flatten`), so a corrupt cache entry fails the pull and is
//! deleted rather than producing a wrong image.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWrite;

use super::auth::Credentials;
use super::flatten::{Compression, Layer};
use super::{ImageError, PruneReport, PullEvent, PullOptions};

/// A resolved image with every layer in the cache.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) digest: String,
    pub(crate) layers: Vec<Layer>,
}

/// Resolves `image` to its `linux/amd64` manifest and makes sure every layer
/// is in the cache.
pub(crate) async fn fetch(
    image: &Reference,
    shown: &str,
    opts: &PullOptions,
    creds: Option<Credentials>,
    progress: &mut (impl FnMut(PullEvent) + Send),
    have_flattened: impl FnOnce(&str) -> bool,
) -> Result<Fetched, ImageError> {
    let host = image.resolve_registry().to_string();
    let (client, auth) = session(opts, creds);
    let (manifest, digest) = match client.pull_image_manifest(image, &auth).await {
        Ok(m) => m,
        Err(e) => return Err(manifest_error(e, shown, &host, opts).await),
    };
    progress(PullEvent::Resolved {
        digest: digest.clone(),
        layers: manifest.layers.len(),
    });
    // A flattened image of this digest is kept: its layers are not needed.
    let skip_layers = have_flattened(&digest);

    let dir = blob_dir(&opts.cache_dir);
    std::fs::create_dir_all(&dir).map_err(|source| ImageError::Cache {
        path: dir.clone(),
        source,
    })?;
    let mut layers = Vec::new();
    for desc in &manifest.layers {
        let hex = sha256_hex(&desc.digest)?;
        let compression =
            compression(&desc.media_type).ok_or_else(|| ImageError::UnsupportedLayer {
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
            })?;
        let path = dir.join(hex);
        if skip_layers {
            layers.push(Layer {
                digest: desc.digest.clone(),
                compression,
                path,
            });
            continue;
        }
        let cached = std::fs::metadata(&path)
            .is_ok_and(|m| m.is_file() && i64::try_from(m.len()).ok() == Some(desc.size));
        if cached {
            progress(PullEvent::LayerCached {
                digest: desc.digest.clone(),
            });
        } else {
            let total = u64::try_from(desc.size).ok();
            let mut report = |received| {
                progress(PullEvent::LayerProgress {
                    digest: desc.digest.clone(),
                    received,
                    total,
                })
            };
            let bytes = download(&client, image, shown, desc, &path, &mut report).await?;
            progress(PullEvent::LayerDownloaded {
                digest: desc.digest.clone(),
                bytes,
            });
        }
        layers.push(Layer {
            digest: desc.digest.clone(),
            compression,
            path,
        });
    }
    Ok(Fetched { digest, layers })
}

/// The registry client and credentials every registry operation uses
/// (image pulls here, artifacts in [`crate::oci_artifact`]): plain HTTP only
/// for `opts.insecure_registries`, a 30 s connect timeout, `linux/amd64`
/// from an index, and `creds` (from [`super::auth::lookup`]) or anonymous.
pub(crate) fn session(opts: &PullOptions, creds: Option<Credentials>) -> (Client, RegistryAuth) {
    install_crypto_provider();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(opts.insecure_registries.clone()),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    let auth = match creds {
        Some(c) => RegistryAuth::Basic(c.username, c.secret),
        None => RegistryAuth::Anonymous,
    };
    (client, auth)
}

async fn download(
    client: &Client,
    image: &Reference,
    shown: &str,
    desc: &oci_client::manifest::OciDescriptor,
    dst: &Path,
    report: &mut (impl FnMut(u64) + Send),
) -> Result<u64, ImageError> {
    let tmp = dst.with_extension(format!(
        "partial-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let cache_err = |source| ImageError::Cache {
        path: tmp.clone(),
        source,
    };
    let file = tokio::fs::File::create(&tmp).await.map_err(cache_err)?;
    // A registry may not send more than the manifest says the blob holds.
    let expected = u64::try_from(desc.size).unwrap_or(0);
    let over = Arc::new(AtomicBool::new(false));
    let file = Capped {
        inner: file,
        left: expected,
        over: Arc::clone(&over),
    };
    let file = banger_api::counting::Counting::new(file, report);
    let res = client.pull_blob(image, desc, file).await;
    if over.load(Ordering::SeqCst) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::BlobTooLarge {
            digest: desc.digest.clone(),
            expected,
        });
    }
    if let Err(source) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(match source {
            OciDistributionError::DigestError(_) => ImageError::DigestMismatch {
                digest: desc.digest.clone(),
                actual: "something else".to_string(),
            },
            source => ImageError::Download {
                reference: shown.to_string(),
                digest: desc.digest.clone(),
                source,
            },
        });
    }
    let len = std::fs::metadata(&tmp).map_err(cache_err)?.len();
    std::fs::rename(&tmp, dst).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        ImageError::Cache {
            path: dst.to_path_buf(),
            source,
        }
    })?;
    Ok(len)
}

/// A blob file that refuses a write past `left` bytes, setting `over`.
struct Capped<W> {
    inner: W,
    left: u64,
    over: Arc<AtomicBool>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Capped<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            self.over.store(true, Ordering::SeqCst);
            return Poll::Ready(Err(std::io::Error::other(
                "the registry sent more bytes than the blob's descriptor states",
            )));
        }
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.left -= n as u64;
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Names a failed manifest fetch: not found, unauthorized, a plain-HTTP
/// registry not listed as insecure, or the library's error.
pub(crate) async fn manifest_error(
    e: OciDistributionError,
    shown: &str,
    host: &str,
    opts: &PullOptions,
) -> ImageError {
    match &e {
        OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::UnauthorizedError { .. } => {
            return ImageError::Unauthorized(shown.to_string());
        }
        OciDistributionError::ImageManifestNotFoundError(msg) if msg.contains("image index") => {
            return ImageError::NoAmd64(shown.to_string());
        }
        OciDistributionError::ImageManifestNotFoundError(_) => {
            return ImageError::NotFound(shown.to_string());
        }
        OciDistributionError::RegistryError { envelope, .. }
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    oci_client::errors::OciErrorCode::ManifestUnknown
                        | oci_client::errors::OciErrorCode::NameUnknown
                        | oci_client::errors::OciErrorCode::NotFound
                )
            }) =>
        {
            return ImageError::NotFound(shown.to_string());
        }
        OciDistributionError::ServerError { code: 404, .. } => {
            return ImageError::NotFound(shown.to_string());
        }
        OciDistributionError::ServerError { code: 401, .. } => {
            return ImageError::Unauthorized(shown.to_string());
        }
        OciDistributionError::RequestError(_)
            if !opts.insecure_registries.iter().any(|h| h == host) =>
        {
            let probe_host = host.to_string();
            let plain = tokio::task::spawn_blocking(move || speaks_plain_http(&probe_host))
                .await
                .unwrap_or(false);
            if plain {
                return ImageError::PlainHttpRegistry(host.to_string());
            }
        }
        _ => {}
    }
    ImageError::Manifest {
        reference: shown.to_string(),
        source: e,
    }
}

/// Whether `host` answers a plain-HTTP request, which tells a "this is an
/// HTTP registry" failure apart from other TLS or network errors.
fn speaks_plain_http(host: &str) -> bool {
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:443")
    };
    let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(&addr) else {
        return false;
    };
    for a in addrs {
        let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(3)) else {
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
        if s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .is_err()
        {
            continue;
        }
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).is_ok() && &buf == b"HTTP/" {
            return true;
        }
    }
    false
}

/// reqwest is built without a default TLS provider; install ring once.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

fn compression(media_type: &str) -> Option<Compression> {
    let m = media_type.trim();
    if m.ends_with("+gzip") || m.ends_with(".tar.gzip") || m.ends_with("tar.gzip") {
        Some(Compression::Gzip)
    } else if m.ends_with("+zstd") {
        Some(Compression::Zstd)
    } else if m.ends_with(".tar") {
        Some(Compression::None)
    } else {
        None
    }
}

/// The hex part of a `sha256:` digest; anything else is refused (it becomes
/// a file name in the cache).
pub(crate) fn sha256_hex(digest: &str) -> Result<&str, ImageError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .ok_or_else(|| ImageError::UnsupportedDigest(digest.to_string()))
}

fn blob_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("blobs").join("sha256")
}

/// See [`super::cache_prune`].
pub(crate) fn prune(cache_dir: &Path, keep: &HashSet<String>) -> Result<PruneReport, ImageError> {
    let dir = blob_dir(cache_dir);
    let cache_err = |path: &Path, source| ImageError::Cache {
        path: path.to_path_buf(),
        source,
    };
    let mut report = PruneReport::default();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(cache_err(&dir, e)),
    };
    let mut names: Vec<(String, PathBuf, u64)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| cache_err(&dir, e))?;
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        names.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
            len,
        ));
    }
    names.sort();
    for (name, path, len) in names {
        let digest = format!("sha256:{name}");
        if keep.contains(&digest) {
            continue;
        }
        std::fs::remove_file(&path).map_err(|e| cache_err(&path, e))?;
        report.freed_bytes += len;
        report.removed.push(digest);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_media_types_map_to_decompressors() {
        let cases = [
            (
                "application/vnd.oci.image.layer.v1.tar",
                Some(Compression::None),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+zstd",
                Some(Compression::Zstd),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                Some(Compression::Gzip),
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                Some(Compression::None),
            ),
            ("application/vnd.wasm.content.layer.v1+wasm", None),
        ];
        for (m, want) in cases {
            assert_eq!(compression(m), want, "{m}");
        }
    }

    #[test]
    fn digests_that_are_not_sha256_hex_are_refused() {
        assert!(sha256_hex(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in ["sha256:../../etc", "sha512:00", "sha256:ABCD", ""] {
            assert!(sha256_hex(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prune_keeps_only_listed_digests() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = blob_dir(dir.path());
        std::fs::create_dir_all(&blobs).unwrap();
        let keep = "a".repeat(64);
        let drop = "b".repeat(64);
        std::fs::write(blobs.join(&keep), b"keep").unwrap();
        std::fs::write(blobs.join(&drop), b"drop!").unwrap();
        std::fs::write(blobs.join(format!("{drop}.partial-1-2")), b"half").unwrap();
        let report = prune(dir.path(), &HashSet::from([format!("sha256:{keep}")])).unwrap();
        assert_eq!(report.removed.len(), 2);
        assert_eq!(report.freed_bytes, 9);
        assert!(blobs.join(&keep).exists());
        assert!(!blobs.join(&drop).exists());
    }
}
