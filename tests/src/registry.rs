//! A real OCI registry on loopback for tests: Debian's `docker-registry`
//! with a temp config and storage, plus helpers that build image layers from
//! a small description and push images (optionally behind an index) with
//! oci-client.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// A running `docker-registry` on 127.0.0.1; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    host: String,
    auth: Option<(String, String)>,
}

/// One entry of a test layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path in the image.
        path: String,
        /// Permission bits (may include sticky/setgid).
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path in the image.
        path: String,
        /// Contents.
        content: Vec<u8>,
        /// Permission bits (may include setuid/setgid).
        mode: u32,
        /// Owner.
        uid: u64,
        /// Group.
        gid: u64,
    },
    /// A symlink.
    Symlink {
        /// Path in the image.
        path: String,
        /// Link target as stored.
        target: String,
    },
    /// A hardlink to an earlier entry.
    Hardlink {
        /// Path in the image.
        path: String,
        /// The linked entry's path.
        target: String,
    },
}

impl Entry {
    /// A root-owned directory.
    pub fn dir(path: &str, mode: u32) -> Self {
        Entry::Dir {
            path: path.to_string(),
            mode,
        }
    }

    /// A root-owned 0644 file.
    pub fn file(path: &str, content: &str) -> Self {
        Self::owned(path, content, 0o644, 0, 0)
    }

    /// A file with explicit mode and ownership.
    pub fn owned(path: &str, content: &str, mode: u32, uid: u64, gid: u64) -> Self {
        Entry::File {
            path: path.to_string(),
            content: content.as_bytes().to_vec(),
            mode,
            uid,
            gid,
        }
    }

    /// A symlink.
    pub fn symlink(path: &str, target: &str) -> Self {
        Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    /// A hardlink.
    pub fn hardlink(path: &str, target: &str) -> Self {
        Entry::Hardlink {
            path: path.to_string(),
            target: target.to_string(),
        }
    }

    /// A whiteout hiding `path` from lower layers.
    pub fn whiteout(path: &str) -> Self {
        let p = Path::new(path);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let wh = p.with_file_name(format!(".wh.{name}"));
        Self::file(wh.to_str().unwrap(), "")
    }

    /// Marks directory `dir` opaque.
    pub fn opaque(dir: &str) -> Self {
        Self::file(&format!("{}/.wh..wh..opq", dir.trim_end_matches('/')), "")
    }
}

/// A layer: entries in order, gzip-compressed or plain tar.
#[derive(Debug, Clone)]
pub struct TestLayer {
    /// Entries in tar order.
    pub entries: Vec<Entry>,
    /// Compress with gzip (else a plain tar layer).
    pub gzip: bool,
}

/// What a push produced.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest digest (the index digest when pushed as an index).
    pub digest: String,
    /// Layer blob digests, bottom first (of the amd64 image for an index).
    pub layers: Vec<String>,
}

/// The uncompressed tar for `entries`.
pub fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, path, std::io::empty()).unwrap();
            }
            Entry::File {
                path,
                content,
                mode,
                uid,
                gid,
            } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*gid);
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, content.as_slice()).unwrap();
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
            Entry::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One image layer ready to push: the blob as stored in the registry, its
/// media type, and the digest of its uncompressed tar (the config's
/// `diff_id`).
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The blob bytes (gzip-compressed or plain tar).
    pub blob: Vec<u8>,
    /// `application/vnd.oci.image.layer.v1.tar+gzip` or `…tar`.
    pub media_type: &'static str,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
}

impl LayerBlob {
    /// A gzip layer at `level` from an uncompressed tar read from `tar`,
    /// hashed and compressed in one pass (a rootfs tarball is never held in
    /// memory uncompressed).
    pub fn gzip_from(mut tar: impl Read, level: flate2::Compression) -> std::io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = tar.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            gz.write_all(&buf[..n])?;
        }
        Ok(LayerBlob {
            blob: gz.finish()?,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            diff_id: format!("sha256:{:x}", hasher.finalize()),
        })
    }

    /// A gzip layer from an uncompressed tar in memory.
    pub fn gzip(tar: &[u8]) -> std::io::Result<Self> {
        Self::gzip_from(tar, flate2::Compression::default())
    }

    /// A plain (uncompressed) tar layer.
    pub fn plain(tar: Vec<u8>) -> Self {
        LayerBlob {
            diff_id: sha256(&tar),
            blob: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// An oci-client that talks plain HTTP to `plain_http_hosts` (loopback test
/// registries) and HTTPS to everything else.
pub fn oci_client_for(plain_http_hosts: &[&str]) -> Client {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(
            plain_http_hosts.iter().map(|h| h.to_string()).collect(),
        ),
        ..Default::default()
    })
}

/// Pushes a single-platform image (`os: linux`, `architecture: arch`) made of
/// `layers`, bottom first, as `reference`, with an already authenticated
/// `client`. Returns the manifest digest with the layer digests, and the
/// manifest's size in bytes.
pub async fn push_layers(
    client: &Client,
    reference: &Reference,
    arch: &str,
    layers: &[LayerBlob],
) -> anyhow::Result<(Pushed, usize)> {
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    let mut digests = Vec::new();
    for layer in layers {
        let digest = sha256(&layer.blob);
        client
            .push_blob(reference, layer.blob.clone(), &digest)
            .await
            .with_context(|| format!("Pushing layer {digest}"))?;
        descs.push(serde_json::json!({
            "mediaType": layer.media_type, "digest": digest, "size": layer.blob.len()
        }));
        diff_ids.push(layer.diff_id.clone());
        digests.push(digest);
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": arch, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {}
    }))?;
    let config_digest = sha256(&config);
    client
        .push_blob(reference, config.clone(), &config_digest)
        .await
        .context("Pushing the image config")?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    let digest = sha256(&manifest);
    client
        .push_manifest_raw(reference, manifest.clone(), OCI_MANIFEST.parse()?)
        .await
        .with_context(|| format!("Pushing the manifest as {reference}"))?;
    Ok((
        Pushed {
            digest,
            layers: digests,
        },
        manifest.len(),
    ))
}

impl Registry {
    /// Starts an anonymous registry, or prints `SKIPPED <test>: …` and
    /// returns `None` when `docker-registry` is not installed.
    pub fn start(test: &str) -> Option<Self> {
        Self::launch(test, None)
    }

    /// Starts a registry that requires HTTP basic auth for `user`/`pass`, or
    /// skips loudly when `docker-registry` or `htpasswd` is missing.
    pub fn start_with_auth(test: &str, user: &str, pass: &str) -> Option<Self> {
        Self::launch(test, Some((user.to_string(), pass.to_string())))
    }

    fn launch(test: &str, auth: Option<(String, String)>) -> Option<Self> {
        if !Path::new(REGISTRY_BIN).exists() {
            eprintln!(
                "SKIPPED {test}: docker-registry not installed (apt-get install docker-registry)"
            );
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("registry")
            .tempdir()
            .unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let mut auth_yaml = String::new();
        if let Some((user, pass)) = &auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbc"])
                .arg(&htpasswd)
                .args([user, pass])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                _ => {
                    eprintln!(
                        "SKIPPED {test}: htpasswd not installed (apt-get install apache2-utils)"
                    );
                    return None;
                }
            }
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: {host}\n{auth_yaml}",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let reg = Registry {
            child,
            dir,
            host,
            auth,
        };
        crate::wait_until(Duration::from_secs(20), "the registry answers /v2/", || {
            reg.v2_status().is_some()
        });
        Some(reg)
    }

    /// The status line's code for `GET /v2/`, if the registry answers.
    fn v2_status(&self) -> Option<u16> {
        let mut s = TcpStream::connect(&self.host).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.host).as_bytes())
            .ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).ok()?;
        std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Pushes the root filesystem tarball `tar` as a one-layer amd64 image
    /// `HOST/repo_tag` and returns that reference (what the guest recipes'
    /// rootfs becomes for `banger image pull`).
    pub fn push_rootfs_tar(&self, repo_tag: &str, tar: &std::path::Path) -> String {
        let blob = std::fs::read(tar).unwrap();
        let reference = format!("{}/{repo_tag}", self.host);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = oci_client_for(&[self.host()]);
            let r: Reference = reference.parse().unwrap();
            push_layers(&client, &r, "amd64", &[LayerBlob::plain(blob)])
                .await
                .unwrap();
        });
        reference
    }

    /// The registry's storage root (blobs under
    /// `docker/registry/v2/blobs/sha256/<xx>/<hex>/data`).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The on-disk data file of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// How many `GET …/blobs/<digest>` requests the registry has logged.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        let needle = format!("/blobs/{digest} ");
        log.lines()
            .filter(|l| l.contains("\"GET ") && l.contains(&needle))
            .count()
    }

    fn client(&self) -> (Client, RegistryAuth) {
        let client = oci_client_for(&[self.host.as_str()]);
        let auth = match &self.auth {
            Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
            None => RegistryAuth::Anonymous,
        };
        (client, auth)
    }

    /// Pushes a single-platform (linux/`arch`) image as `repo:tag` and
    /// returns its manifest digest and layer digests.
    pub async fn push(&self, repo_tag: &str, arch: &str, layers: &[TestLayer]) -> Pushed {
        let (client, auth) = self.client();
        let reference: Reference = format!("{}/{repo_tag}", self.host).parse().unwrap();
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .unwrap();
        let (digest, size, layer_digests) =
            self.push_image(&client, &reference, arch, layers).await;
        let _ = size;
        Pushed {
            digest,
            layers: layer_digests,
        }
    }

    async fn push_image(
        &self,
        client: &Client,
        reference: &Reference,
        arch: &str,
        layers: &[TestLayer],
    ) -> (String, usize, Vec<String>) {
        let blobs: Vec<LayerBlob> = layers
            .iter()
            .map(|layer| {
                let tar = tar_bytes(&layer.entries);
                if layer.gzip {
                    LayerBlob::gzip(&tar).unwrap()
                } else {
                    LayerBlob::plain(tar)
                }
            })
            .collect();
        let (pushed, size) = push_layers(client, reference, arch, &blobs).await.unwrap();
        (pushed.digest, size, pushed.layers)
    }

    /// Pushes an index as `repo:tag` listing one linux image per
    /// `(architecture, layers)`, in the order given; returns the index digest
    /// and the amd64 image's layers (empty if there is none).
    pub async fn push_index(&self, repo_tag: &str, platforms: &[(&str, &[TestLayer])]) -> Pushed {
        let (client, auth) = self.client();
        let reference: Reference = format!("{}/{repo_tag}", self.host).parse().unwrap();
        client
            .auth(&reference, &auth, oci_client::RegistryOperation::Push)
            .await
            .unwrap();
        let mut entries = Vec::new();
        let mut amd64_layers = Vec::new();
        for (arch, layers) in platforms {
            let r: Reference = format!("{}/{repo_tag}-{arch}", self.host).parse().unwrap();
            let (digest, size, layer_digests) = self.push_image(&client, &r, arch, layers).await;
            if *arch == "amd64" {
                amd64_layers = layer_digests;
            }
            entries.push(serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                "platform": {"architecture": arch, "os": "linux"}
            }));
        }
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        }))
        .unwrap();
        let digest = sha256(&index);
        client
            .push_manifest_raw(&reference, index, OCI_INDEX.parse().unwrap())
            .await
            .unwrap();
        Pushed {
            digest,
            layers: amd64_layers,
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
