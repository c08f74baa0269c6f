//! The one download pipeline for catalog bundles (kernels, images): a byte
//! stream (an HTTP body here, an OCI blob in [`crate::oci_artifact`])
//! streamed through sha256 and, at the same time, through zstd into the
//! checked tar extractor ([`crate::archive::extract_tar`]), so a bundle is
//! never held in memory or on disk twice.
//!
//! The sha256 and size are checked over the whole body; extraction errors
//! are reported only after a mismatch is ruled out, so a corrupt download is
//! named as such rather than as whatever garbage it decoded to. Extraction
//! runs into a staging directory while the body is hashed; on any failure
//! (a digest or size mismatch above all: a tampered tarball) everything
//! extracted is removed from it once the extractor has stopped, so nothing
//! unverified survives, and the caller discards the staging directory.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::archive::{ArchiveError, ExtractLimits, ExtractReport, extract_tar};

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

/// What to fetch and what it must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleSource<'a> {
    /// Absolute URL of the `.tar.zst` for [`fetch_bundle`]; for
    /// [`extract_stream`] whatever names the stream's origin in errors.
    pub url: &'a str,
    /// Expected hex sha256 of the compressed body.
    pub sha256: &'a str,
    /// Expected size in bytes of the compressed body; 0 if unknown.
    pub size: u64,
}

/// A failed download or extraction.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The request failed (connection, TLS, truncated body).
    #[error("Cannot download {url}")]
    Request {
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
    /// The body's size differs from the expected one.
    #[error("Download of {url} is {got} bytes but {expected} were expected")]
    SizeMismatch {
        /// The URL.
        url: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes received (so far, if more than expected).
        got: u64,
    },
    /// The body's sha256 differs from the expected one.
    #[error("Checksum mismatch for {url}: expected sha256 {expected}, got {got}")]
    ChecksumMismatch {
        /// The URL.
        url: String,
        /// The expected sha256.
        expected: String,
        /// The body's sha256.
        got: String,
    },
    /// The body could not be decompressed or was rejected as unsafe.
    #[error("Cannot extract {url}")]
    Extract {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: ArchiveError,
    },
}

/// Report download progress at most once per this many bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// Downloads `source` and extracts it into the existing directory `dest`.
///
/// `dest` must be a staging directory the pull owns. Extraction runs on a
/// blocking thread that owns `hold` until it is done, so a caller can keep
/// `dest` alive (e.g. an `Arc` of its staging guard). If this future is
/// dropped midway, the extractor fails at its next read and then removes
/// `dest` itself: only it knows when writing has stopped, so a caller's
/// cleanup racing a still-running extractor cannot leave files behind.
pub async fn fetch_bundle<H: Send + 'static>(
    source: BundleSource<'_>,
    dest: PathBuf,
    limits: ExtractLimits,
    hold: H,
    progress: &mut impl FnMut(PullProgress),
) -> Result<ExtractReport, DownloadError> {
    let url = source.url;
    let request = |e: reqwest::Error| DownloadError::Request {
        url: url.to_owned(),
        source: Box::new(e),
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .build()
        .map_err(request)?;
    let response = client.get(url).send().await.map_err(request)?;
    if !response.status().is_success() {
        return Err(DownloadError::HttpStatus {
            url: url.to_owned(),
            status: response.status().as_u16(),
        });
    }

    extract_stream(
        source,
        response.bytes_stream(),
        dest,
        limits,
        hold,
        progress,
    )
    .await
}

/// The checked half of [`fetch_bundle`] for any byte stream: hashes and
/// counts `body` against `source.sha256` and `source.size` while extracting
/// it (zstd, then tar) into the existing directory `dest`, with the same
/// staging, `hold` and abandonment rules. A stream error is reported as
/// [`DownloadError::Request`] naming `source.url`.
pub async fn extract_stream<S, E, H>(
    source: BundleSource<'_>,
    body: S,
    dest: PathBuf,
    limits: ExtractLimits,
    hold: H,
    progress: &mut impl FnMut(PullProgress),
) -> Result<ExtractReport, DownloadError>
where
    S: Stream<Item = Result<Bytes, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    H: Send + 'static,
{
    let url = source.url;
    let dest_copy = dest.clone();
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
    let complete = Arc::new(AtomicBool::new(false));
    let abandoned = Arc::new(AtomicBool::new(false));
    let reader = ChannelReader {
        rx,
        chunk: Bytes::new(),
        complete: Arc::clone(&complete),
        abandoned: Arc::clone(&abandoned),
    };
    let extractor = tokio::task::spawn_blocking(move || {
        let extracted = zstd::stream::read::Decoder::new(reader)
            .map_err(ArchiveError::Read)
            .and_then(|decoder| extract_tar(decoder, &dest, &limits));
        if abandoned.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&dest);
        }
        drop(hold);
        extracted
    });

    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut reported = 0u64;
    let mut failed = None;
    let mut stream = std::pin::pin!(body);
    while let Some(chunk) = stream.next().await {
        let bytes = match chunk {
            Ok(b) => b,
            Err(e) => {
                failed = Some(DownloadError::Request {
                    url: url.to_owned(),
                    source: e.into(),
                });
                break;
            }
        };
        received += bytes.len() as u64;
        if source.size > 0 && received > source.size {
            failed = Some(DownloadError::SizeMismatch {
                url: url.to_owned(),
                expected: source.size,
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
                total: source.size,
            });
        }
    }
    if failed.is_some() {
        let _ = tx.send(Err(io::Error::other("download failed"))).await;
    } else {
        complete.store(true, Ordering::SeqCst);
    }
    drop(tx);
    let extracted = extractor.await;
    let result = check_download(source, received, failed, hasher, extracted, progress);
    if result.is_err() {
        // The extractor has stopped writing: nothing unverified stays.
        empty_dir(&dest_copy);
    }
    result
}

/// The outcome of a finished download: a stream error, then size, then
/// digest, and only then the extractor's own result.
fn check_download(
    source: BundleSource<'_>,
    received: u64,
    failed: Option<DownloadError>,
    hasher: Sha256,
    extracted: Result<Result<ExtractReport, ArchiveError>, tokio::task::JoinError>,
    progress: &mut impl FnMut(PullProgress),
) -> Result<ExtractReport, DownloadError> {
    let url = source.url;
    if let Some(e) = failed {
        return Err(e);
    }
    progress(PullProgress::Downloading {
        received,
        total: source.size,
    });
    if source.size > 0 && received != source.size {
        return Err(DownloadError::SizeMismatch {
            url: url.to_owned(),
            expected: source.size,
            got: received,
        });
    }
    let got = hex(&hasher.finalize());
    if got != source.sha256 {
        return Err(DownloadError::ChecksumMismatch {
            url: url.to_owned(),
            expected: source.sha256.to_owned(),
            got,
        });
    }
    let extract = |source| DownloadError::Extract {
        url: url.to_owned(),
        source,
    };
    match extracted {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(e)) => Err(extract(e)),
        Err(join) => Err(extract(ArchiveError::Read(io::Error::other(
            join.to_string(),
        )))),
    }
}

/// Removes everything inside `dir`, keeping `dir` (the caller's staging).
fn empty_dir(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let removed = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p),
            _ => std::fs::remove_file(&p),
        };
        if let Err(err) = removed {
            tracing::warn!(path = %p.display(), "cannot remove an unverified extracted file: {err}");
        }
    }
}

/// Lowercase hex of a digest.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A blocking `Read` over chunks sent from the async download loop. An
/// `Err` chunk fails the read; a closed channel is end of stream only if the
/// download completed, otherwise the download future was dropped: the read
/// fails and `abandoned` is set.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
    complete: Arc<AtomicBool>,
    abandoned: Arc<AtomicBool>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => return Err(e),
                None if self.complete.load(Ordering::SeqCst) => return Ok(0),
                None => {
                    self.abandoned.store(true, Ordering::SeqCst);
                    return Err(io::Error::other("download abandoned"));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A `.tar.zst` holding one file `name` with `content`.
    fn bundle(name: &str, content: &[u8]) -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        tar.append_data(&mut h, name, content).unwrap();
        zstd::encode_all(tar.into_inner().unwrap().as_slice(), 3).unwrap()
    }

    fn sha(bytes: &[u8]) -> String {
        hex(&Sha256::digest(bytes))
    }

    /// `bytes` as a stream of 7-byte chunks, then `tail`.
    fn chunks(
        bytes: &[u8],
        tail: Option<io::Error>,
    ) -> impl Stream<Item = Result<Bytes, io::Error>> + use<> {
        let mut items: Vec<Result<Bytes, io::Error>> = bytes
            .chunks(7)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        items.extend(tail.map(Err));
        futures_util::stream::iter(items)
    }

    async fn extract(
        body: impl Stream<Item = Result<Bytes, io::Error>>,
        sha256: &str,
        size: u64,
        dest: &std::path::Path,
    ) -> Result<ExtractReport, DownloadError> {
        let source = BundleSource {
            url: "test-stream",
            sha256,
            size,
        };
        let limits = ExtractLimits::default();
        extract_stream(source, body, dest.to_path_buf(), limits, (), &mut |_| {}).await
    }

    #[tokio::test]
    async fn a_stream_matching_its_digest_is_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle("vmlinux", b"kernel");
        let report = extract(chunks(&b, None), &sha(&b), b.len() as u64, dir.path())
            .await
            .unwrap();
        assert_eq!(report.bytes, 6);
        assert_eq!(
            std::fs::read(dir.path().join("vmlinux")).unwrap(),
            b"kernel"
        );
    }

    #[tokio::test]
    async fn a_digest_mismatch_is_named_before_any_extraction_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle("vmlinux", b"kernel");
        let want = sha(&b);
        // Corrupt the zstd frame too: the checksum, not garbage, is reported.
        let last = b.len() - 1;
        b[last] ^= 0xff;
        b[4] ^= 0xff;
        let err = extract(chunks(&b, None), &want, b.len() as u64, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DownloadError::ChecksumMismatch { expected, got, .. }
                if *expected == want && *got == sha(&b)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_tampered_tarball_is_refused_and_nothing_it_held_stays_in_staging() {
        let dir = tempfile::tempdir().unwrap();
        let genuine = bundle("vmlinux", b"kernel");
        // A well-formed bundle of the same size with other contents: it
        // extracts fine, only the digest tells.
        let mut tampered = bundle("evil-bin", b"kernel");
        tampered.resize(genuine.len().max(tampered.len()), 0);
        let size = tampered.len() as u64;
        let err = extract(chunks(&tampered, None), &sha(&genuine), size, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DownloadError::ChecksumMismatch { expected, .. } if *expected == sha(&genuine)),
            "{err:?}"
        );
        assert!(dir.path().is_dir(), "the caller's staging dir stays");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "unverified files left: {left:?}");
    }

    #[tokio::test]
    async fn a_longer_stream_than_expected_is_a_size_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle("vmlinux", b"kernel");
        let err = extract(chunks(&b, None), &sha(&b), 10, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(err, DownloadError::SizeMismatch { expected: 10, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_error_is_a_request_error_naming_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle("vmlinux", b"kernel");
        let cut = chunks(&b[..10], Some(io::Error::other("connection reset")));
        let err = extract(cut, &sha(&b), b.len() as u64, dir.path())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DownloadError::Request { url, .. } if url == "test-stream"),
            "{err:?}"
        );
    }
}
