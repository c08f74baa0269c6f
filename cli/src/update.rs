//! `banger update [--check] [--version V] [--url URL]`: replaces the
//! installed binaries with a signed release.
//!
//! The manifest and its signature come first; the signature must verify
//! against a trusted key (the project's, embedded in this binary, or a key
//! file under `PREFIX/etc/banger/update-keys/` that passes the same
//! ownership checks as the binaries' own directory). Then every binary for
//! this architecture is downloaded into a staging directory next to the
//! installed ones and checked against the manifest's size and sha256, and
//! only then renamed into place, one by one, rolling back the ones already
//! renamed if a later one fails. A running daemon is restarted on the new
//! `bangerd`. See docs/release.md, "Binary releases and `banger update`".

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use banger_api::paths::Paths;
use banger_api::release::{
    FileEntry, LATEST, MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, PublicKey, SIGNATURE_FILE,
};
use sha2::{Digest, Sha256};

use crate::args::UpdateArgs;
use crate::fetch::{FetchError, Fetcher};

/// Where releases are published unless `update_url` or `--url` says
/// otherwise.
pub const DEFAULT_UPDATE_URL: &str = "https://releases.thaloco.com/banger";
/// Extra trusted release keys (`*.pem`), relative to the install prefix
/// (the directory above the binaries' directory).
pub const KEYS_DIR: &str = "etc/banger/update-keys";

/// Where this banger is installed.
#[derive(Debug, Clone)]
pub struct Install {
    /// The directory holding `banger` (and its siblings).
    pub bin_dir: PathBuf,
    /// The directory above it (`/usr/local`, `~/.local`).
    pub prefix: PathBuf,
}

impl Install {
    /// The running executable's directory. After an update replaced the
    /// file, `/proc/self/exe` reads `PATH (deleted)`; its directory is
    /// still the one wanted.
    pub fn current() -> Result<Install> {
        let exe = std::env::current_exe().context("Cannot find banger's own path")?;
        let bin_dir = exe
            .parent()
            .map(Path::to_path_buf)
            .with_context(|| format!("{} has no parent directory", exe.display()))?;
        let prefix = bin_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| bin_dir.clone());
        Ok(Install { bin_dir, prefix })
    }
}

/// A key banger trusts for releases, and where it came from.
#[derive(Debug)]
struct TrustedKey {
    key: PublicKey,
    source: String,
}

/// The embedded key plus the usable key files under `prefix`; a key file
/// that fails the ownership check or does not parse is named in a warning
/// and skipped.
fn trusted_keys(prefix: &Path) -> Result<Vec<TrustedKey>> {
    let mut keys = vec![TrustedKey {
        key: PublicKey::project().context("The embedded release key is broken")?,
        source: "banger's release key".into(),
    }];
    let dir = prefix.join(KEYS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(keys);
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    files.sort();
    let uid = nix::unistd::geteuid().as_raw();
    for f in files {
        if let Err(e) = banger_api::paths::check_trusted_path("release key", &f, uid) {
            eprintln!("warning: {e}; the key is ignored");
            continue;
        }
        match std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| PublicKey::from_pem(&t).map_err(|e| e.to_string()))
        {
            Ok(key) => keys.push(TrustedKey {
                key,
                source: f.display().to_string(),
            }),
            Err(e) => eprintln!("warning: release key {}: {e}; it is ignored", f.display()),
        }
    }
    Ok(keys)
}

/// The base URL: `--url`, else `update_url`, else the project's.
fn base_url(flag: Option<String>) -> Result<String> {
    if let Some(u) = flag {
        return Ok(u.trim_end_matches('/').to_string());
    }
    let configured = match Paths::from_env() {
        Ok(paths) => banger_api::config::Config::load(&paths.config_file())?.update_url,
        Err(_) => None,
    };
    Ok(configured
        .unwrap_or_else(|| DEFAULT_UPDATE_URL.to_string())
        .trim_end_matches('/')
        .to_string())
}

/// How to update without this command, for every refusal.
fn by_hand(base: &str) -> String {
    format!(
        "to update by hand: `curl -fsSL {base}/install.sh | sh` on a host that can reach it, \
         or from a source checkout `git pull && ./scripts/install` (docs/release.md)"
    )
}

/// Turns a fetch failure of a release file into the user's error.
fn fetch_failed(e: FetchError, base: &str) -> anyhow::Error {
    match e {
        FetchError::Unreachable { .. } => anyhow::anyhow!(
            "{e}\nNo release server answered, so nothing was changed. Check the network, or \
             update_url in config.toml (or --url); {}",
            by_hand(base)
        ),
        other => anyhow::anyhow!("{other}; nothing was changed"),
    }
}

/// A manifest whose signature verified, and the key that signed it.
#[derive(Debug)]
struct Verified {
    manifest: Manifest,
    signer: String,
    url: String,
}

async fn fetch_manifest(fetcher: &Fetcher, base: &str, dir: &str) -> Result<Verified> {
    let url = format!("{base}/{dir}/{MANIFEST_FILE}");
    let sig_url = format!("{base}/{dir}/{SIGNATURE_FILE}");
    let text = fetcher
        .get_bytes(&url, MAX_MANIFEST_BYTES as u64)
        .await
        .map_err(|e| fetch_failed(e, base))?;
    let sig = fetcher
        .get_bytes(&sig_url, 1024)
        .await
        .map_err(|e| fetch_failed(e, base))?;
    let keys = trusted_keys(&Install::current()?.prefix)?;
    let Some(signer) = keys.iter().find(|k| k.key.verifies(&text, &sig)) else {
        let tried: Vec<String> = keys
            .iter()
            .map(|k| format!("{} ({})", k.source, k.key.fingerprint()))
            .collect();
        bail!(
            "Refusing the release at {url}: bad signature: {sig_url} does not sign it with a \
             trusted key (tried {}); nothing was changed. A release signed with another key \
             needs that key in PREFIX/{KEYS_DIR}/ (docs/release.md)",
            tried.join(", ")
        );
    };
    let text = std::str::from_utf8(&text)
        .with_context(|| format!("The signed manifest at {url} is not UTF-8"))?;
    let manifest =
        Manifest::parse(text).with_context(|| format!("Refusing the signed manifest at {url}"))?;
    Ok(Verified {
        manifest,
        signer: format!("{} ({})", signer.source, signer.key.fingerprint()),
        url,
    })
}

/// Runs `banger update`.
pub async fn run(args: UpdateArgs) -> Result<ExitCode> {
    let base = base_url(args.url)?;
    let current = semver::Version::parse(env!("CARGO_PKG_VERSION"))
        .context("This banger's own version is not semver")?;
    let fetcher = Fetcher::new()?;
    let dir = match &args.version {
        Some(v) => {
            semver::Version::parse(v.trim_start_matches('v'))
                .with_context(|| format!("--version {v:?} is not a version like 0.2.0 (semver)"))?;
            v.trim_start_matches('v').to_string()
        }
        None => LATEST.to_string(),
    };
    let verified = fetch_manifest(&fetcher, &base, &dir).await?;
    let release = &verified.manifest;
    if let Some(v) = &args.version
        && release.version.to_string() != v.trim_start_matches('v')
    {
        bail!(
            "Refusing the release at {}: --version {v} was asked for, but its signed manifest is \
             version {}; nothing was changed",
            verified.url,
            release.version
        );
    }
    let newer = release.version > current;
    if args.check {
        if newer {
            println!(
                "banger {current} → {} available at {base} (signed by {}): run `banger update`",
                release.version, verified.signer
            );
        } else {
            println!(
                "banger {current} is up to date (the release at {base} is {})",
                release.version
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.version.is_none() && !newer {
        println!(
            "banger {current} is up to date (the release at {base} is {}); nothing was changed",
            release.version
        );
        return Ok(ExitCode::SUCCESS);
    }
    let arch = std::env::consts::ARCH;
    let files = release.files_for(arch);
    if files.is_empty() {
        bail!(
            "Release {} at {base} has no binaries for {arch} (it has {}); nothing was changed",
            release.version,
            release.arches().join(", ")
        );
    }
    let install = Install::current()?;
    println!(
        "release {} verified (signed by {}); downloading {} file(s) for {arch}",
        release.version,
        verified.signer,
        files.len()
    );
    let staging = Staging::create(&install.bin_dir)?;
    for f in &files {
        download(&fetcher, &base, release, f, &staging.0).await?;
    }
    let daemon = daemon_before_swap().await;
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    swap_in(&install.bin_dir, &staging.0, &names)?;
    drop(staging);
    println!(
        "updated banger {current} → {} in {}: {}",
        release.version,
        install.bin_dir.display(),
        names.join(", ")
    );
    after_swap(daemon, &names).await;
    Ok(ExitCode::SUCCESS)
}

/// A staging directory next to the binaries (same filesystem, so the
/// final renames are atomic), removed on drop.
#[derive(Debug)]
struct Staging(PathBuf);

impl Staging {
    fn create(bin_dir: &Path) -> Result<Staging> {
        match tempfile::Builder::new()
            .prefix(".banger-update-")
            .tempdir_in(bin_dir)
        {
            Ok(d) => Ok(Staging(d.keep())),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "Cannot write to {} ({e}): it belongs to another user; run `sudo banger update`. \
                 Nothing was changed",
                bin_dir.display()
            ),
            Err(e) => Err(e).with_context(|| {
                format!(
                    "Cannot create a staging directory in {}; nothing was changed",
                    bin_dir.display()
                )
            }),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Downloads one binary into `staging` and checks it against the manifest.
async fn download(
    fetcher: &Fetcher,
    base: &str,
    release: &Manifest,
    f: &FileEntry,
    staging: &Path,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let url = format!("{base}/{}/{}/{}", release.version, f.arch, f.name);
    let path = staging.join(&f.name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&path)
        .with_context(|| format!("Cannot create {}", path.display()))?;
    let mut hash = Sha256::new();
    let got = fetcher
        .get_to(&url, f.size, |chunk| {
            hash.update(chunk);
            file.write_all(chunk)
        })
        .await
        .map_err(|e| match e {
            FetchError::TooLarge { .. } => anyhow::anyhow!(
                "Refusing the release {}: {url} is larger than the {} bytes its signed manifest \
                 says; nothing was changed",
                release.version,
                f.size
            ),
            FetchError::Truncated { got, why, .. } => anyhow::anyhow!(
                "Refusing the release {}: truncated download: {url} broke off after {got} of {} \
                 bytes ({why}); nothing was changed",
                release.version,
                f.size
            ),
            other => fetch_failed(other, base),
        })?;
    if got != f.size {
        bail!(
            "Refusing the release {}: truncated download: {url} sent {got} of the {} bytes its \
             signed manifest says; nothing was changed",
            release.version,
            f.size
        );
    }
    let sha = banger_api::release::hex(&hash.finalize());
    if sha != f.sha256 {
        bail!(
            "Refusing the release {}: sha256 mismatch: {url} has sha256 {sha}, its signed \
             manifest says {}; nothing was changed",
            release.version,
            f.sha256
        );
    }
    file.sync_all()
        .with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}

/// Renames each staged file over its installed namesake, keeping a hard
/// link to the old one; if one rename fails, the ones done are put back
/// (or removed, where nothing was installed before).
fn swap_in(bin_dir: &Path, staging: &Path, names: &[&str]) -> Result<()> {
    let backup = |name: &str| staging.join(format!("{name}.old"));
    let mut done: Vec<(&str, bool)> = Vec::new();
    for name in names {
        let target = bin_dir.join(name);
        let step = (|| -> std::io::Result<bool> {
            let had = match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_file() => {
                    if std::fs::hard_link(&target, backup(name)).is_err() {
                        std::fs::copy(&target, backup(name))?;
                    }
                    true
                }
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            };
            std::fs::rename(staging.join(name), &target)?;
            Ok(had)
        })();
        match step {
            Ok(had) => done.push((name, had)),
            Err(e) => {
                let mut unrestored = Vec::new();
                for (n, had) in done.iter().rev() {
                    let t = bin_dir.join(n);
                    let back = if *had {
                        std::fs::rename(backup(n), &t)
                    } else {
                        std::fs::remove_file(&t)
                    };
                    if let Err(e) = back {
                        unrestored.push(format!("{} ({e})", t.display()));
                    }
                }
                if unrestored.is_empty() {
                    bail!(
                        "Cannot replace {} ({e}); the files already replaced were put back, so \
                         banger is unchanged",
                        target.display()
                    );
                }
                bail!(
                    "Cannot replace {} ({e}), and putting back {} failed: reinstall with \
                     install.sh or scripts/install",
                    target.display(),
                    unrestored.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// The daemon as found before the swap.
#[derive(Debug)]
struct DaemonBefore {
    paths: Paths,
    operations: Option<u64>,
}

async fn daemon_before_swap() -> Option<DaemonBefore> {
    let paths = Paths::from_env().ok()?;
    let client = crate::daemon::client(&paths);
    let status = crate::daemon::status(&client).await.ok().flatten()?;
    Some(DaemonBefore {
        paths,
        operations: status.operations.map(|n| n as u64),
    })
}

/// Restarts the daemon on the new build, and says what else needs the
/// new files.
async fn after_swap(daemon: Option<DaemonBefore>, names: &[&str]) {
    if let Some(d) = daemon {
        let client = crate::daemon::client(&d.paths);
        match d.operations {
            Some(0) => {
                let restarted = async {
                    crate::daemon::stop(&client).await?;
                    crate::daemon::start(&d.paths, &client).await
                };
                match restarted.await {
                    Ok(pid) => println!("bangerd: restarted on the new build (pid {pid})"),
                    Err(e) => println!(
                        "warning: restarting bangerd failed: {e:#}; run `banger daemon start`"
                    ),
                }
            }
            _ => println!(
                "bangerd: left running (it has operations in progress, or cannot say); the new \
                 build starts after `banger daemon stop` once they finish"
            ),
        }
    }
    let system_helper = Path::new("/usr/local/libexec/banger/banger-helper");
    if names.contains(&"banger-helper") && system_helper.exists() {
        println!(
            "the root helper runs its own copy ({}): run `sudo banger system install` to update it",
            system_helper.display()
        );
    }
    println!("running VMs get the new guest agent at their next start (`banger vm restart NAME`)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (n, b) in files {
            std::fs::write(d.path().join(n), b).unwrap();
        }
        d
    }

    #[test]
    fn swap_in_replaces_every_file() {
        let bin = dir_with(&[("a", b"old a"), ("b", b"old b")]);
        let staging = dir_with(&[("a", b"new a"), ("b", b"new b"), ("c", b"new c")]);
        swap_in(bin.path(), staging.path(), &["a", "b", "c"]).unwrap();
        for (n, want) in [("a", "new a"), ("b", "new b"), ("c", "new c")] {
            assert_eq!(std::fs::read_to_string(bin.path().join(n)).unwrap(), want);
        }
    }

    #[test]
    fn a_failed_rename_puts_back_the_files_already_replaced() {
        let bin = dir_with(&[("a", b"old a")]);
        // `c` is a non-empty directory: renaming a file over it fails.
        std::fs::create_dir_all(bin.path().join("c/inside")).unwrap();
        let staging = dir_with(&[("a", b"new a"), ("b", b"new b"), ("c", b"new c")]);
        let e = swap_in(bin.path(), staging.path(), &["a", "b", "c"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("put back"), "{e}");
        assert_eq!(
            std::fs::read_to_string(bin.path().join("a")).unwrap(),
            "old a"
        );
        assert!(
            !bin.path().join("b").exists(),
            "b was new and must be gone again"
        );
        assert!(bin.path().join("c/inside").is_dir());
    }
}
