//! `banger-release publish-binaries`: lays out a binary release for
//! `banger update` and `install.sh` to fetch from a static file server:
//!
//! ```text
//! OUT/VERSION/ARCH/NAME           each binary, as given
//! OUT/VERSION/manifest            version, and per file arch, name, size, sha256
//! OUT/VERSION/manifest.sig        ed25519 signature of the manifest (64 raw bytes)
//! OUT/latest/manifest(.sig)       the same two files (unless --no-latest)
//! ```
//!
//! Upload `OUT/` to the release base URL (`update_url`). See
//! docs/release.md, "Binary releases and `banger update`".

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use banger_api::fsutil::write_atomic;
use banger_api::release::{
    FileEntry, LATEST, MANIFEST_FILE, Manifest, PKCS8_PREFIX, PublicKey, SIGNATURE_FILE,
};
use ed25519_dalek::{Signer, SigningKey};

/// `publish-binaries` arguments.
#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The ed25519 private key (PKCS#8 PEM, as `openssl genpkey -algorithm
    /// ed25519` writes it). Keep it off shared machines.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The release version (semver).
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// The git commit the binaries were built from (recorded in the
    /// manifest).
    #[arg(long)]
    commit: Option<String>,
    /// A binary to publish, `[ARCH:]PATH` (ARCH defaults to this host's,
    /// the name is the file name); repeat for each. The usual set is
    /// banger, bangerd, banger-helper and the static banger-agent.
    #[arg(long = "file", value_name = "[ARCH:]PATH", required = true)]
    files: Vec<String>,
    /// Where to lay out the release.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Do not point `latest/` at this release (a pre-release, an old
    /// branch).
    #[arg(long)]
    no_latest: bool,
}

/// Reads an ed25519 PKCS#8 PEM private key.
pub fn signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read the signing key {}", path.display()))?;
    let der = banger_api::release::pem_body(&text, "PRIVATE KEY").map_err(|why| {
        anyhow::anyhow!(
            "{} is not a PEM private key ({why}); make one with `openssl genpkey -algorithm ed25519 -out {}`",
            path.display(),
            path.display()
        )
    })?;
    let seed = der
        .strip_prefix(&PKCS8_PREFIX[..])
        .filter(|s| s.len() == 32)
        .with_context(|| {
            format!(
                "{} is not an ed25519 key (PKCS#8); make one with `openssl genpkey -algorithm ed25519`",
                path.display()
            )
        })?;
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(seed);
    Ok(SigningKey::from_bytes(&bytes))
}

/// Lays out and signs the release; prints what it wrote.
pub fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let key = signing_key(&args.key)?;
    let public = PublicKey::from_bytes(key.verifying_key().as_bytes())?;
    let version = semver::Version::parse(args.version.trim_start_matches('v'))
        .with_context(|| format!("--version {:?} is not semver (e.g. 0.2.0)", args.version))?;
    let mut inputs: Vec<(FileEntry, PathBuf)> = Vec::new();
    for spec in &args.files {
        let (arch, path) = match spec.split_once(':') {
            Some((a, p)) if !a.contains('/') => (a.to_string(), PathBuf::from(p)),
            _ => (std::env::consts::ARCH.to_string(), PathBuf::from(spec)),
        };
        let bytes =
            std::fs::read(&path).with_context(|| format!("Cannot read {}", path.display()))?;
        let raw_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = banger_api::release::checked_name(&raw_name)
            .map_err(|why| anyhow::anyhow!("--file {spec}: {why}"))?;
        if name == "banger-agent"
            && let Ok(Some(interp)) = banger_api::config::elf_interpreter(&path)
        {
            bail!(
                "{} is dynamically linked (asks for {interp}); guests need the static agent: \
                 build it with `scripts/build-agent`",
                path.display()
            );
        }
        if inputs.iter().any(|(e, _)| e.arch == arch && e.name == name) {
            bail!("--file {spec}: {arch} {name} is given twice");
        }
        inputs.push((
            FileEntry {
                arch,
                name,
                size: bytes.len() as u64,
                sha256: banger_api::release::sha256_hex(&bytes),
            },
            path,
        ));
    }
    let manifest = Manifest {
        version: version.clone(),
        commit: args.commit.clone(),
        files: inputs.iter().map(|(e, _)| e.clone()).collect(),
    };
    let text = manifest.render();
    // What `banger update` will parse must be what was meant.
    if Manifest::parse(&text)? != manifest {
        bail!("The manifest does not read back as written (--commit must be hex)");
    }
    let sig = key.sign(text.as_bytes()).to_bytes();

    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("Cannot create {}", args.out_dir.display()))?;
    let final_dir = args.out_dir.join(version.to_string());
    if final_dir.exists() {
        bail!(
            "{} exists: a published release is never changed; publish a new version",
            final_dir.display()
        );
    }
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(&args.out_dir)
        .with_context(|| format!("Cannot stage in {}", args.out_dir.display()))?;
    for (e, src) in &inputs {
        let dir = staging.path().join(&e.arch);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(src, dir.join(&e.name))
            .with_context(|| format!("Cannot copy {}", src.display()))?;
    }
    std::fs::write(staging.path().join(MANIFEST_FILE), &text)?;
    std::fs::write(staging.path().join(SIGNATURE_FILE), sig)?;
    std::fs::rename(staging.keep(), &final_dir)
        .with_context(|| format!("Cannot move the release into {}", final_dir.display()))?;
    if !args.no_latest {
        let latest = args.out_dir.join(LATEST);
        std::fs::create_dir_all(&latest)?;
        // The signature first: a reader between the two renames gets a
        // mismatch (refused), never an unsigned manifest.
        write_atomic(&latest.join(SIGNATURE_FILE), &sig, 0o644)?;
        write_atomic(&latest.join(MANIFEST_FILE), text.as_bytes(), 0o644)?;
    }
    if public != PublicKey::project()? {
        eprintln!(
            "warning: {} is not banger's release key ({}): banger trusts this release only with \
             its public key in PREFIX/etc/banger/update-keys/ (install.sh --pubkey)",
            args.key.display(),
            public.fingerprint()
        );
    }
    println!(
        "release {version} in {} ({} file(s), signed by {})",
        final_dir.display(),
        inputs.len(),
        public.fingerprint()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use base64::Engine;

    use super::*;

    fn key_file(dir: &Path) -> PathBuf {
        let mut der = PKCS8_PREFIX.to_vec();
        der.extend_from_slice(&[9u8; 32]);
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        );
        let p = dir.join("k.pem");
        std::fs::write(&p, pem).unwrap();
        p
    }

    #[test]
    fn a_published_release_verifies_and_its_files_match_the_manifest() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("banger");
        std::fs::write(&bin, b"new banger").unwrap();
        let out = d.path().join("out");
        publish(PublishArgs {
            key: key_file(d.path()),
            version: "9.8.7".into(),
            commit: Some("abc".into()),
            files: vec![format!("x86_64:{}", bin.display())],
            out_dir: out.clone(),
            no_latest: false,
        })
        .unwrap();
        let text = std::fs::read(out.join("9.8.7/manifest")).unwrap();
        let sig = std::fs::read(out.join("9.8.7/manifest.sig")).unwrap();
        let public = PublicKey::from_bytes(
            SigningKey::from_bytes(&[9u8; 32])
                .verifying_key()
                .as_bytes(),
        )
        .unwrap();
        assert!(public.verifies(&text, &sig));
        assert_eq!(std::fs::read(out.join("latest/manifest")).unwrap(), text);
        let m = Manifest::parse(std::str::from_utf8(&text).unwrap()).unwrap();
        assert_eq!(m.files[0].size, 10);
        assert_eq!(
            std::fs::read(out.join("9.8.7/x86_64/banger")).unwrap(),
            b"new banger"
        );
        // Releases are immutable.
        let again = publish(PublishArgs {
            key: key_file(d.path()),
            version: "9.8.7".into(),
            commit: None,
            files: vec![bin.display().to_string()],
            out_dir: out.clone(),
            no_latest: false,
        })
        .unwrap_err()
        .to_string();
        assert!(again.contains("never changed"), "{again}");
    }

    #[test]
    fn a_key_of_another_kind_is_refused_with_the_command_that_makes_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.pem");
        std::fs::write(&p, "not a key").unwrap();
        let e = signing_key(&p).unwrap_err().to_string();
        assert!(e.contains("openssl genpkey -algorithm ed25519"), "{e}");
    }
}
