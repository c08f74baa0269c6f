//! Binary releases: the signed manifest `banger update` and
//! `scripts/install.sh` trust, and the release public key.
//!
//! A release is a text manifest (its version and, per architecture, each
//! binary's size and sha256) plus `manifest.sig`, a raw 64-byte ed25519
//! signature of the manifest's exact bytes. The format is plain lines so a
//! POSIX shell reads it with `sed` and checks the signature with
//! `openssl pkeyutl -verify -rawin`. See docs/release.md, "Binary releases
//! and `banger update`".
//!
//! ```text
//! # banger release manifest; manifest.sig is its ed25519 signature.
//! format 1
//! version 0.2.0
//! file x86_64 banger 4815162 <sha256 hex>
//! ```

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// The project's release key (SubjectPublicKeyInfo PEM, as `openssl pkey
/// -pubout` writes it). `scripts/install.sh` embeds the same text; a test
/// keeps the two equal.
pub const RELEASE_PUBLIC_KEY_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAhv832wPSsqnQayq9w5sXQSasRS9PMXQ8VQWZXEVE4aU=
-----END PUBLIC KEY-----
";

/// The manifest format this code reads and writes.
pub const MANIFEST_FORMAT: u32 = 1;
/// Largest manifest accepted (a few hundred bytes per binary).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Where a release lives under the base URL: `BASE/latest/` or
/// `BASE/VERSION/` hold `manifest` and `manifest.sig`; binaries are at
/// `BASE/VERSION/ARCH/NAME`.
pub const MANIFEST_FILE: &str = "manifest";
/// The signature next to [`MANIFEST_FILE`].
pub const SIGNATURE_FILE: &str = "manifest.sig";
/// The directory of the newest release's manifest.
pub const LATEST: &str = "latest";

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key
/// bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an ed25519 PKCS#8 private key (`openssl genpkey
/// -algorithm ed25519`); the 32-byte seed follows.
pub const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A manifest or key that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    /// The manifest text is malformed.
    #[error("Malformed release manifest, line {line}: {why}")]
    Manifest {
        /// 1-based line number (0: the whole file).
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// A PEM key file is not an ed25519 key of the expected kind.
    #[error("Not an ed25519 {kind} key in PEM form: {why}")]
    Key {
        /// `public` or `private`.
        kind: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// One binary of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// The architecture it runs on (`std::env::consts::ARCH`: `x86_64`).
    pub arch: String,
    /// Its file name (`banger`, `bangerd`, ...).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of its bytes.
    pub sha256: String,
}

/// A release manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The release version (semver: `0.2.0`, `0.3.0-rc.1`).
    pub version: semver::Version,
    /// The git commit it was built from, when recorded.
    pub commit: Option<String>,
    /// Its binaries, for every architecture it ships.
    pub files: Vec<FileEntry>,
}

impl Manifest {
    /// Parses a manifest. Lines with keys this version does not know are
    /// skipped (additions keep the format number); a different `format` is
    /// refused.
    pub fn parse(text: &str) -> Result<Manifest, ReleaseError> {
        let bad = |line: usize, why: String| ReleaseError::Manifest { line, why };
        let mut format = None;
        let mut version = None;
        let mut commit = None;
        let mut files: Vec<FileEntry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_ascii_whitespace().collect();
            match words.as_slice() {
                ["format", f] => {
                    let f: u32 = f
                        .parse()
                        .map_err(|_| bad(n, format!("format {f:?} is not a number")))?;
                    if f != MANIFEST_FORMAT {
                        return Err(bad(
                            n,
                            format!(
                                "format {f}; this banger reads format {MANIFEST_FORMAT}: update by hand (docs/release.md)"
                            ),
                        ));
                    }
                    format = Some(f);
                }
                ["version", v] => {
                    let parsed = semver::Version::parse(v)
                        .map_err(|e| bad(n, format!("version {v:?} is not semver ({e})")))?;
                    version = Some(parsed);
                }
                ["commit", c] => {
                    if !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad(n, format!("commit {c:?} is not hex")));
                    }
                    commit = Some((*c).to_string());
                }
                ["file", arch, name, size, sha] => {
                    let entry = FileEntry {
                        arch: checked_word(arch, "architecture", |b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
                        })
                        .map_err(|why| bad(n, why))?,
                        name: checked_name(name).map_err(|why| bad(n, why))?,
                        size: size
                            .parse()
                            .map_err(|_| bad(n, format!("size {size:?} is not a number")))?,
                        sha256: checked_sha256(sha).map_err(|why| bad(n, why))?,
                    };
                    if files
                        .iter()
                        .any(|f| f.arch == entry.arch && f.name == entry.name)
                    {
                        return Err(bad(
                            n,
                            format!("{} {} is listed twice", entry.arch, entry.name),
                        ));
                    }
                    files.push(entry);
                }
                ["format" | "version" | "commit" | "file", ..] => {
                    return Err(bad(n, format!("wrong number of fields in {line:?}")));
                }
                _ => {}
            }
        }
        if format.is_none() {
            return Err(bad(0, "no `format` line".into()));
        }
        let version = version.ok_or_else(|| bad(0, "no `version` line".into()))?;
        if files.is_empty() {
            return Err(bad(0, "no `file` lines".into()));
        }
        Ok(Manifest {
            version,
            commit,
            files,
        })
    }

    /// The manifest's text, as [`Manifest::parse`] reads it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "# banger release manifest; manifest.sig is its ed25519 signature.\n\
             # See docs/release.md.\nformat {MANIFEST_FORMAT}\nversion {}\n",
            self.version
        );
        if let Some(c) = &self.commit {
            out.push_str(&format!("commit {c}\n"));
        }
        for f in &self.files {
            out.push_str(&format!(
                "file {} {} {} {}\n",
                f.arch, f.name, f.size, f.sha256
            ));
        }
        out
    }

    /// The binaries for `arch`, in manifest order.
    pub fn files_for(&self, arch: &str) -> Vec<&FileEntry> {
        self.files.iter().filter(|f| f.arch == arch).collect()
    }

    /// The architectures the release ships.
    pub fn arches(&self) -> Vec<&str> {
        let mut a: Vec<&str> = self.files.iter().map(|f| f.arch.as_str()).collect();
        a.sort_unstable();
        a.dedup();
        a
    }
}

fn checked_word(s: &str, what: &str, ok: impl Fn(u8) -> bool) -> Result<String, String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(ok) {
        return Err(format!("{what} {s:?} has characters outside [a-z0-9_-.]"));
    }
    Ok(s.to_string())
}

/// A binary's file name: `[a-z0-9][a-z0-9._-]*`, so it can never name a
/// path outside the directory it is installed into.
pub fn checked_name(s: &str) -> Result<String, String> {
    let name = checked_word(s, "file name", |b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
    })?;
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!("file name {s:?} must start with a letter or digit"));
    }
    Ok(name)
}

fn checked_sha256(s: &str) -> Result<String, String> {
    if s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("sha256 {s:?} is not 64 lowercase hex digits"));
    }
    Ok(s.to_string())
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An ed25519 public key trusted to sign releases.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl PublicKey {
    /// The project's key ([`RELEASE_PUBLIC_KEY_PEM`]).
    pub fn project() -> Result<PublicKey, ReleaseError> {
        PublicKey::from_pem(RELEASE_PUBLIC_KEY_PEM)
    }

    /// Parses a `-----BEGIN PUBLIC KEY-----` PEM block holding an ed25519
    /// SubjectPublicKeyInfo.
    pub fn from_pem(text: &str) -> Result<PublicKey, ReleaseError> {
        let bad = |why: String| ReleaseError::Key {
            kind: "public",
            why,
        };
        let der = pem_body(text, "PUBLIC KEY").map_err(bad)?;
        let key = der
            .strip_prefix(&SPKI_PREFIX[..])
            .filter(|k| k.len() == 32)
            .ok_or_else(|| bad("the key is not an ed25519 SubjectPublicKeyInfo".into()))?;
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(key);
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|e| bad(format!("invalid ed25519 point ({e})")))
    }

    /// From the 32 raw key bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, ReleaseError> {
        VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|e| ReleaseError::Key {
                kind: "public",
                why: format!("invalid ed25519 point ({e})"),
            })
    }

    /// The PEM text `openssl` reads (`-pubin -inkey`).
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.0.as_bytes());
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            BASE64.encode(der)
        )
    }

    /// Short name for messages: the first 16 hex digits of the sha256 of
    /// the key bytes.
    pub fn fingerprint(&self) -> String {
        let mut h = sha256_hex(self.0.as_bytes());
        h.truncate(16);
        h
    }

    /// Whether `signature` (64 raw bytes) signs `message` with this key.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = Signature::from_slice(signature) else {
            return false;
        };
        self.0.verify_strict(message, &sig).is_ok()
    }
}

/// The bytes of the one `-----BEGIN {label}-----` block in `text`.
pub fn pem_body(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut lines = text.lines().map(str::trim);
    if !lines.any(|l| l == begin) {
        return Err(format!("no `{begin}` line"));
    }
    let mut b64 = String::new();
    for l in lines.by_ref() {
        if l == end {
            return BASE64
                .decode(b64.as_bytes())
                .map_err(|e| format!("bad base64 ({e})"));
        }
        b64.push_str(l);
    }
    Err(format!("no `{end}` line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn manifest() -> Manifest {
        Manifest {
            version: semver::Version::new(1, 2, 3),
            commit: Some("abc123".into()),
            files: vec![
                FileEntry {
                    arch: "x86_64".into(),
                    name: "banger".into(),
                    size: 10,
                    sha256: SHA.into(),
                },
                FileEntry {
                    arch: "aarch64".into(),
                    name: "banger".into(),
                    size: 11,
                    sha256: SHA.into(),
                },
            ],
        }
    }

    #[test]
    fn a_rendered_manifest_parses_back() {
        let m = manifest();
        let text = m.render();
        assert!(text.contains(&format!("file x86_64 banger 10 {SHA}\n")));
        assert_eq!(Manifest::parse(&text).unwrap(), m);
        assert_eq!(m.files_for("aarch64").len(), 1);
        assert_eq!(m.arches(), ["aarch64", "x86_64"]);
    }

    #[test]
    fn unknown_lines_are_skipped_but_known_keys_are_strict() {
        let text = format!("format 1\nversion 2.0.0\nnotes anything\nfile x86_64 b 1 {SHA}\n");
        assert_eq!(
            Manifest::parse(&text).unwrap().version,
            semver::Version::new(2, 0, 0)
        );
        for (bad, needle) in [
            (
                format!("format 2\nversion 2.0.0\nfile x86_64 b 1 {SHA}\n"),
                "format 2",
            ),
            (format!("format 1\nfile x86_64 b 1 {SHA}\n"), "no `version`"),
            ("format 1\nversion 1.0.0\n".to_string(), "no `file`"),
            (
                format!("format 1\nversion one\nfile x86_64 b 1 {SHA}\n"),
                "not semver",
            ),
            (
                format!("format 1\nversion 1.0.0\nfile x86_64 ../b 1 {SHA}\n"),
                "file name",
            ),
            (
                format!("format 1\nversion 1.0.0\nfile x86_64 .b 1 {SHA}\n"),
                "must start",
            ),
            (
                "format 1\nversion 1.0.0\nfile x86_64 b 1 ABC\n".to_string(),
                "sha256",
            ),
            (
                format!("format 1\nversion 1.0.0\nfile x86_64 b 1 {SHA}\nfile x86_64 b 2 {SHA}\n"),
                "twice",
            ),
            (
                format!("format 1\nversion 1.0.0\nfile x86_64 b {SHA}\n"),
                "number of fields",
            ),
        ] {
            let e = Manifest::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_project_key_parses_and_round_trips_through_pem() {
        let k = PublicKey::project().unwrap();
        assert_eq!(k.to_pem(), RELEASE_PUBLIC_KEY_PEM);
        assert_eq!(PublicKey::from_pem(&k.to_pem()).unwrap(), k);
        assert_eq!(k.fingerprint().len(), 16);
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let public = PublicKey::from_bytes(signing.verifying_key().as_bytes()).unwrap();
        use ed25519_dalek::Signer;
        let sig = signing.sign(b"manifest").to_bytes();
        assert!(public.verifies(b"manifest", &sig));
        assert!(!public.verifies(b"manifest!", &sig));
        assert!(!public.verifies(b"manifest", &sig[..63]));
        assert!(!PublicKey::project().unwrap().verifies(b"manifest", &sig));
    }

    #[test]
    fn keys_of_other_kinds_are_refused() {
        let e = PublicKey::from_pem("hello").unwrap_err().to_string();
        assert!(e.contains("BEGIN PUBLIC KEY"), "{e}");
        // An RSA-sized body under the right label.
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            BASE64.encode([0u8; 40])
        );
        let e = PublicKey::from_pem(&pem).unwrap_err().to_string();
        assert!(e.contains("not an ed25519"), "{e}");
    }
}
