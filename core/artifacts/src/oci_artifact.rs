//! Kernels and images published as OCI artifacts, pinned by digest.
//!
//! An artifact is an OCI image manifest whose `artifactType` says what it
//! holds, whose config is the OCI empty descriptor, and whose one layer is
//! exactly the `.tar.zst` bundle a catalog URL would serve (see
//! `docs/kernels.md` and `docs/images.md`, "Published artifacts"). A pull
//! names the manifest by digest; the manifest bytes are hashed here against
//! that digest (not left to the library), and the layer is streamed through
//! [`crate::download::extract_stream`] with the layer descriptor's digest
//! and size, so nothing unverified is ever published.
//!
//! Errors keep "cannot reach the registry" ([`ArtifactError::Unreachable`],
//! a reason to fall back to a local build) apart from "the registry served
//! something else" ([`ArtifactError::Integrity`], never a reason to carry on).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::StreamExt;
use oci_client::Reference;
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive::{ArchiveError, ExtractLimits, ExtractReport};
use crate::download::{BundleSource, DownloadError, PullProgress, extract_stream};
use crate::images::{ImageError, PullOptions, auth, oci, reference};

/// The OCI empty descriptor's media type, used as every artifact's config.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty config blob, `{}`.
const EMPTY_CONFIG: &[u8] = b"{}";
/// Blob upload chunk size when pushing.
const PUSH_CHUNK: usize = 4 << 20;

/// Annotation: the artifact's human title.
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// Annotation: the artifact's version.
pub const ANNOTATION_VERSION: &str = "org.opencontainers.image.version";
/// Annotation: when it was built (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Annotation: the banger kernel or image name it publishes.
pub const ANNOTATION_NAME: &str = "dev.banger.name";

/// What an artifact holds: its `artifactType` and its one layer's media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactKind {
    /// The manifest's `artifactType`.
    pub artifact_type: &'static str,
    /// The media type of the one layer.
    pub layer_media_type: &'static str,
}

impl ArtifactKind {
    /// A kernel bundle (the `.tar.zst` `banger kernel pull` extracts).
    pub const KERNEL: ArtifactKind = ArtifactKind {
        artifact_type: "application/vnd.banger.kernel.v1",
        layer_media_type: "application/vnd.banger.kernel.v1.tar+zstd",
    };
    /// An image bundle (`rootfs.ext4` + `manifest.toml` as a `.tar.zst`).
    pub const IMAGE: ArtifactKind = ArtifactKind {
        artifact_type: "application/vnd.banger.image.v1",
        layer_media_type: "application/vnd.banger.image.bundle.v1.tar+zstd",
    };
}

/// What a successful [`pull_artifact`] fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// The manifest digest (`sha256:…`), equal to the pinned one.
    pub manifest_digest: String,
    /// The layer digest (`sha256:…`).
    pub layer_digest: String,
    /// The layer's size in bytes.
    pub layer_size: u64,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
    /// What the extraction wrote.
    pub extracted: ExtractReport,
}

/// One artifact to publish with [`push_artifact`].
#[derive(Debug, Clone)]
pub struct ArtifactPush<'a> {
    /// What it holds.
    pub kind: ArtifactKind,
    /// The `.tar.zst` bundle to upload as its layer.
    pub bundle: &'a Path,
    /// Manifest annotations (see the `ANNOTATION_*` keys).
    pub annotations: BTreeMap<String, String>,
}

/// A failed artifact pull or push.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The reference does not parse.
    #[error("Invalid artifact reference {0:?}: use HOST[:PORT]/REPO@sha256:<64 hex digits>")]
    InvalidReference(String),
    /// A pull reference is not pinned by a sha256 manifest digest.
    #[error(
        "Artifact reference {0:?} is not pinned by digest: catalogs must name artifacts as HOST[:PORT]/REPO@sha256:<64 hex digits>"
    )]
    NotPinned(String),
    /// The registry cannot be reached (DNS, connection, timeout, a 5xx).
    #[error("Cannot reach the registry for {reference}")]
    Unreachable {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Bytes served for the artifact do not match the digest or size that
    /// names them: a tampered or corrupt artifact, refused.
    #[error(
        "The {what} of {reference} does not match what pins it (expected {expected}, got {got}); refused as tampered or corrupt"
    )]
    Integrity {
        /// The reference.
        reference: String,
        /// `manifest` or `layer sha256:…`.
        what: String,
        /// The digest or size expected.
        expected: String,
        /// The digest or size received.
        got: String,
    },
    /// The manifest is well-pinned but not an artifact of the kind asked for.
    #[error("{reference} is not a {expected} artifact ({detail}); check the catalog entry")]
    WrongKind {
        /// The reference.
        reference: String,
        /// The artifact type asked for.
        expected: &'static str,
        /// What the manifest holds instead.
        detail: String,
    },
    /// The registry refused the request or the credentials could not be read.
    #[error("Registry request for {reference} failed")]
    Registry {
        /// The reference.
        reference: String,
        /// Why (not found, unauthorized, plain HTTP, docker config ...).
        #[source]
        source: Box<ImageError>,
    },
    /// The verified layer is not a valid bundle.
    #[error("Cannot extract the layer of {reference}")]
    Extract {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: ArchiveError,
    },
    /// A bundle to push cannot be read.
    #[error("Cannot read bundle {}", path.display())]
    ReadBundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Uploading a blob or the manifest failed.
    #[error("Cannot push {what} to {reference}")]
    Push {
        /// The reference.
        reference: String,
        /// `layer`, `config` or `manifest`.
        what: &'static str,
        /// Why.
        #[source]
        source: OciDistributionError,
    },
}

impl ArtifactError {
    /// Whether the registry could not be reached at all, so a caller may
    /// fall back to building locally. Never true for integrity failures.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ArtifactError::Unreachable { .. })
    }
}

/// An OCI image manifest as banger writes and reads it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

/// Pulls the artifact `reference` (which must be pinned by
/// `@sha256:<hex>`), checks that it is a `kind` artifact, and extracts its
/// layer into the existing, empty staging directory `dest`.
///
/// `hold`, `limits`, `progress` and the state of `dest` on error are as for
/// [`crate::download::fetch_bundle`]: the caller owns `dest` and removes it
/// on failure; `hold` lives until the extractor has stopped writing.
pub async fn pull_artifact<H: Send + 'static>(
    reference: &str,
    kind: ArtifactKind,
    opts: &PullOptions,
    dest: PathBuf,
    limits: ExtractLimits,
    hold: H,
    progress: &mut impl FnMut(PullProgress),
) -> Result<ArtifactInfo, ArtifactError> {
    let (image, pinned) = pinned_reference(reference)?;
    let (client, auth) = session(&image, reference, opts)?;
    let body = match client
        .pull_manifest_raw(&image, &auth, &[OCI_IMAGE_MEDIA_TYPE])
        .await
    {
        Ok((body, _)) => body,
        Err(e) => return Err(registry_error(reference, "manifest", e, &image, opts).await),
    };
    let got = sha256_digest(&body);
    if got != pinned {
        return Err(ArtifactError::Integrity {
            reference: reference.to_owned(),
            what: "manifest".to_owned(),
            expected: pinned,
            got,
        });
    }
    let manifest: Manifest =
        serde_json::from_slice(&body).map_err(|e| wrong_kind(reference, kind, e.to_string()))?;
    let layer = check_manifest(&manifest, kind).map_err(|d| wrong_kind(reference, kind, d))?;
    let layer_hex = oci::sha256_hex(&layer.digest).map_err(|source| ArtifactError::Registry {
        reference: reference.to_owned(),
        source: Box::new(source),
    })?;

    let stream = match client.pull_blob_stream(&image, layer.digest.as_str()).await {
        Ok(s) => s,
        Err(e) => return Err(registry_error(reference, "layer", e, &image, opts).await),
    };
    // oci-client verifies the digest too and reports a mismatch as a final
    // stream error; end the stream there instead, so the pipeline's own hash
    // names the mismatch (an integrity failure, not a transfer one).
    let body = stream.take_while(|item| {
        let digest_failure = matches!(item, Err(e) if e
            .get_ref()
            .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>()));
        std::future::ready(!digest_failure)
    });
    let label = format!("{reference} (layer {})", layer.digest);
    let source = BundleSource {
        url: &label,
        sha256: layer_hex,
        size: layer.size,
    };
    let extracted = extract_stream(source, body, dest, limits, hold, progress)
        .await
        .map_err(|e| download_error(reference, &layer.digest, e))?;
    Ok(ArtifactInfo {
        manifest_digest: pinned,
        layer_digest: layer.digest.clone(),
        layer_size: layer.size,
        annotations: manifest.annotations,
        extracted,
    })
}

/// Pushes `artifact` as the tagged `reference` (`HOST[:PORT]/REPO:TAG`):
/// its bundle as the one layer (skipped when the registry already has it),
/// the empty config, then the manifest. Returns the manifest digest
/// (`sha256:…`), which pins the artifact in a catalog.
pub async fn push_artifact(
    reference: &str,
    artifact: &ArtifactPush<'_>,
    opts: &PullOptions,
) -> Result<String, ArtifactError> {
    let image = reference::parse(reference)
        .map_err(|_| ArtifactError::InvalidReference(reference.to_owned()))?;
    let (client, auth) = session(&image, reference, opts)?;
    let push_err = |what| {
        move |source| ArtifactError::Push {
            reference: reference.to_owned(),
            what,
            source,
        }
    };
    client
        .auth(&image, &auth, oci_client::RegistryOperation::Push)
        .await
        .map_err(push_err("layer"))?;

    let bundle = artifact.bundle.to_path_buf();
    let read_err = |source| ArtifactError::ReadBundle {
        path: artifact.bundle.to_path_buf(),
        source,
    };
    let (layer_digest, layer_size) = tokio::task::spawn_blocking(move || hash_file(&bundle))
        .await
        .map_err(|e| read_err(std::io::Error::other(e.to_string())))?
        .map_err(read_err)?;
    let exists = client
        .blob_exists(&image, &layer_digest)
        .await
        .map_err(push_err("layer"))?;
    if !exists {
        let file = std::fs::File::open(artifact.bundle).map_err(read_err)?;
        client
            .push_blob_stream(&image, file_chunks(file), &layer_digest, Some(layer_size))
            .await
            .map_err(push_err("layer"))?;
    }
    let config_digest = sha256_digest(EMPTY_CONFIG);
    client
        .push_blob(&image, EMPTY_CONFIG, &config_digest)
        .await
        .map_err(push_err("config"))?;

    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        artifact_type: Some(artifact.kind.artifact_type.to_owned()),
        config: Descriptor {
            media_type: EMPTY_MEDIA_TYPE.to_owned(),
            digest: config_digest,
            size: EMPTY_CONFIG.len() as u64,
        },
        layers: vec![Descriptor {
            media_type: artifact.kind.layer_media_type.to_owned(),
            digest: layer_digest,
            size: layer_size,
        }],
        annotations: artifact.annotations.clone(),
    };
    let body = serde_json::to_vec(&manifest).map_err(|e| ArtifactError::Push {
        reference: reference.to_owned(),
        what: "manifest",
        source: OciDistributionError::GenericError(Some(e.to_string())),
    })?;
    let digest = sha256_digest(&body);
    client
        .push_manifest_raw(
            &image,
            body,
            reqwest::header::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .map_err(push_err("manifest"))?;
    Ok(digest)
}

/// Parses `reference` and returns it with its pinned `sha256:<hex>` digest.
fn pinned_reference(reference: &str) -> Result<(Reference, String), ArtifactError> {
    let image = reference::parse(reference)
        .map_err(|_| ArtifactError::InvalidReference(reference.to_owned()))?;
    let digest = image
        .digest()
        .filter(|d| oci::sha256_hex(d).is_ok())
        .map(str::to_owned)
        .ok_or_else(|| ArtifactError::NotPinned(reference.to_owned()))?;
    Ok((image, digest))
}

/// The shared registry client with the credentials for `image`'s registry.
fn session(
    image: &Reference,
    reference: &str,
    opts: &PullOptions,
) -> Result<(oci_client::Client, oci_client::secrets::RegistryAuth), ArtifactError> {
    let creds = auth::for_registry(image.resolve_registry(), opts).map_err(|source| {
        ArtifactError::Registry {
            reference: reference.to_owned(),
            source: Box::new(source),
        }
    })?;
    Ok(oci::session(opts, creds))
}

/// The one layer of a `kind` artifact, or what is wrong with the manifest.
fn check_manifest(manifest: &Manifest, kind: ArtifactKind) -> Result<&Descriptor, String> {
    if manifest.schema_version != 2 {
        return Err(format!("schemaVersion {}", manifest.schema_version));
    }
    if let Some(m) = manifest
        .media_type
        .as_deref()
        .filter(|m| *m != OCI_IMAGE_MEDIA_TYPE)
    {
        return Err(format!("manifest media type {m:?}"));
    }
    match manifest.artifact_type.as_deref() {
        Some(t) if t == kind.artifact_type => {}
        Some(t) => return Err(format!("its artifactType is {t:?}")),
        None => return Err("it has no artifactType".to_owned()),
    }
    match manifest.layers.as_slice() {
        [layer] if layer.media_type == kind.layer_media_type => Ok(layer),
        [layer] => Err(format!("its layer has media type {:?}", layer.media_type)),
        layers => Err(format!("it has {} layers instead of one", layers.len())),
    }
}

fn wrong_kind(reference: &str, kind: ArtifactKind, detail: String) -> ArtifactError {
    ArtifactError::WrongKind {
        reference: reference.to_owned(),
        expected: kind.artifact_type,
        detail,
    }
}

/// Classifies a failed registry request for `what` of `reference`.
async fn registry_error(
    reference: &str,
    what: &str,
    e: OciDistributionError,
    image: &Reference,
    opts: &PullOptions,
) -> ArtifactError {
    if let OciDistributionError::DigestError(d) = &e {
        return ArtifactError::Integrity {
            reference: reference.to_owned(),
            what: what.to_owned(),
            expected: image.digest().unwrap_or_default().to_owned(),
            got: d.to_string(),
        };
    }
    if let OciDistributionError::ServerError { code, .. } = &e
        && *code >= 500
    {
        return ArtifactError::Unreachable {
            reference: reference.to_owned(),
            source: Box::new(e),
        };
    }
    let host = image.resolve_registry().to_owned();
    match oci::manifest_error(e, reference, &host, opts).await {
        ImageError::Manifest {
            source: OciDistributionError::RequestError(r),
            ..
        } if r.is_connect() || r.is_timeout() => ArtifactError::Unreachable {
            reference: reference.to_owned(),
            source: Box::new(r),
        },
        source => ArtifactError::Registry {
            reference: reference.to_owned(),
            source: Box::new(source),
        },
    }
}

/// Classifies a failure of the checked layer pipeline.
fn download_error(reference: &str, layer: &str, e: DownloadError) -> ArtifactError {
    let integrity = |expected: String, got: String| ArtifactError::Integrity {
        reference: reference.to_owned(),
        what: format!("layer {layer}"),
        expected,
        got,
    };
    match e {
        DownloadError::ChecksumMismatch { expected, got, .. } => {
            integrity(format!("sha256:{expected}"), format!("sha256:{got}"))
        }
        DownloadError::SizeMismatch { expected, got, .. } => {
            integrity(format!("{expected} bytes"), format!("{got} bytes"))
        }
        DownloadError::Extract { source, .. } => ArtifactError::Extract {
            reference: reference.to_owned(),
            source,
        },
        e @ (DownloadError::Request { .. } | DownloadError::HttpStatus { .. }) => {
            ArtifactError::Unreachable {
                reference: reference.to_owned(),
                source: Box::new(e),
            }
        }
    }
}

/// `sha256:<hex>` of `bytes`.
fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// `sha256:<hex>` and size of the file at `path`.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{:x}", hasher.finalize()), size))
}

/// `file` as a stream of upload chunks, read on blocking threads.
fn file_chunks(
    file: std::fs::File,
) -> impl futures_util::Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    futures_util::stream::try_unfold(Some(file), |state| async move {
        let Some(mut file) = state else {
            return Ok(None);
        };
        let (file, chunk) = tokio::task::spawn_blocking(move || {
            let mut chunk = Vec::with_capacity(PUSH_CHUNK);
            let read = (&mut file).take(PUSH_CHUNK as u64).read_to_end(&mut chunk);
            read.map(|_| (file, chunk))
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        if chunk.is_empty() {
            return Ok(None);
        }
        Ok(Some((Bytes::from(chunk), Some(file))))
    })
}
