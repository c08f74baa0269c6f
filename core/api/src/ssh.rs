//! banger's own SSH identity and the `known_hosts` lines that pin a guest's
//! host keys.
//!
//! The identity is one ed25519 keypair in OpenSSH format, `id_ed25519`
//! (0600) and `id_ed25519.pub`, generated in-process on first use. Its public
//! line goes into every guest's `/root/.ssh/authorized_keys`. Host keys are
//! never trusted on first use: the daemon reads them from the guest agent
//! over vsock and renders them with [`known_hosts`].

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use banger_guest_protocol::api::HostKey;
use nix::fcntl::{Flock, FlockArg};
use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey};

/// File name of the private key inside the identity directory.
const PRIVATE_KEY: &str = "id_ed25519";
/// Serialises creation across processes (daemon and tests sharing a dir).
const LOCK_FILE: &str = ".lock";
/// Comment on the generated key, so it is recognisable in `authorized_keys`.
const COMMENT: &str = "banger";

/// Loading or creating banger's SSH identity failed.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The identity directory could not be created or locked.
    #[error("Cannot prepare the SSH identity directory {}", .0.display())]
    PrepareDir(PathBuf, #[source] io::Error),
    /// A key file could not be read.
    #[error("Cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    /// A key file exists but is not a usable key.
    #[error(
        "{} is not a valid unencrypted OpenSSH ed25519 key ({why}); delete it and banger creates a new identity",
        path.display()
    )]
    Corrupt {
        /// The bad file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Generating or encoding the key failed.
    #[error("Cannot generate an ed25519 key")]
    Generate(#[source] ssh_key::Error),
    /// Writing a key file failed.
    #[error("Cannot write {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
}

/// banger's SSH client identity: an ed25519 keypair on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshIdentity {
    private_key: PathBuf,
    public_line: String,
    fingerprint: String,
}

impl SshIdentity {
    /// Loads the pair in `dir`, creating the directory (0700) and a new pair
    /// when there is no private key. A missing `.pub` is rewritten from the
    /// private key; a corrupt or mismatched file is an error naming it.
    pub fn load_or_create(dir: &Path) -> Result<SshIdentity, SshError> {
        Self::load_or_create_key(&dir.join(PRIVATE_KEY))
    }

    /// [`SshIdentity::load_or_create`] for the private key at `private_path`
    /// (config `ssh_key_path`), its public half at `PATH.pub`.
    pub fn load_or_create_key(private_path: &Path) -> Result<SshIdentity, SshError> {
        let dir = private_path.parent().unwrap_or(Path::new("/"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| SshError::PrepareDir(dir.into(), e))?;
        let _lock = lock(dir)?;
        let private_path = private_path.to_path_buf();
        let mut public_name = private_path.clone().into_os_string();
        public_name.push(".pub");
        let public_path = PathBuf::from(public_name);
        let key = match fs::read_to_string(&private_path) {
            Ok(text) => parse_private(&private_path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(&private_path, &public_path)?,
            Err(e) => return Err(SshError::Read(private_path, e)),
        };
        let public_line = key.public_key().to_openssh().map_err(SshError::Generate)?;
        match fs::read_to_string(&public_path) {
            Ok(text) => check_public(&public_path, &text, &key)?,
            // Only a crash or a user can get here; the private key is the
            // identity, so its public half is derived again.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_staged(&public_path, format!("{public_line}\n").as_bytes(), 0o644)?;
            }
            Err(e) => return Err(SshError::Read(public_path, e)),
        }
        Ok(SshIdentity {
            private_key: private_path,
            fingerprint: key.public_key().fingerprint(HashAlg::Sha256).to_string(),
            public_line,
        })
    }

    /// The `authorized_keys` line: `ssh-ed25519 BASE64 banger`.
    pub fn public_line(&self) -> &str {
        &self.public_line
    }

    /// The private key file, for `ssh -i`.
    pub fn private_key_path(&self) -> &Path {
        &self.private_key
    }

    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// Renders OpenSSH `known_hosts` lines, one per host key:
/// `alias1,alias2 ALGORITHM BASE64`. Keys or aliases that would not make a
/// well-formed line (whitespace, commas, odd characters) are left out: they
/// come from the guest and must never smuggle in other hosts or options.
pub fn known_hosts(aliases: &[String], keys: &[HostKey]) -> String {
    let hosts: Vec<&str> = aliases
        .iter()
        .map(String::as_str)
        .filter(|a| {
            !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:[]".contains(c))
        })
        .collect();
    if hosts.is_empty() {
        return String::new();
    }
    let hosts = hosts.join(",");
    let mut out = String::new();
    for key in keys {
        let mut fields = key.public_key.split_whitespace();
        let (algorithm, blob) = match (fields.next(), fields.next()) {
            (Some(a), Some(b)) => (a, b),
            // A bare base64 blob: the algorithm comes from its own field.
            (Some(b), None) => (key.algorithm.as_str(), b),
            _ => continue,
        };
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-@.".contains(c));
        let blob_ok = !blob.is_empty()
            && blob
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
        if algorithm_ok && blob_ok {
            out.push_str(&format!("{hosts} {algorithm} {blob}\n"));
        }
    }
    out
}

/// Writes `bytes` to a temporary sibling of `path` with `mode`, syncs it and
/// renames it over `path`, so readers see the old file or the whole new one.
pub fn write_staged(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SshError> {
    crate::fsutil::write_atomic(path, bytes, mode).map_err(|e| SshError::Write(path.into(), e))
}

fn lock(dir: &Path) -> Result<Flock<File>, SshError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| SshError::PrepareDir(dir.into(), e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| SshError::PrepareDir(dir.into(), io::Error::from(errno)))
}

fn corrupt(path: &Path, why: impl Into<String>) -> SshError {
    SshError::Corrupt {
        path: path.into(),
        why: why.into(),
    }
}

fn parse_private(path: &Path, text: &str) -> Result<PrivateKey, SshError> {
    let key = PrivateKey::from_openssh(text).map_err(|e| corrupt(path, e.to_string()))?;
    if key.is_encrypted() {
        return Err(corrupt(path, "encrypted"));
    }
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(corrupt(path, format!("algorithm {}", key.algorithm())));
    }
    Ok(key)
}

fn check_public(path: &Path, text: &str, key: &PrivateKey) -> Result<(), SshError> {
    let public =
        ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| corrupt(path, e.to_string()))?;
    if public.key_data() != key.public_key().key_data() {
        return Err(corrupt(path, format!("does not match {PRIVATE_KEY}")));
    }
    Ok(())
}

/// Generates a pair and puts it in place `.pub` first: a crash in between
/// leaves a lone `.pub`, which the next load replaces, never a private key
/// without its public half.
fn create(private_path: &Path, public_path: &Path) -> Result<PrivateKey, SshError> {
    let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(SshError::Generate)?;
    key.set_comment(COMMENT);
    let private = key.to_openssh(LineEnding::LF).map_err(SshError::Generate)?;
    let public = key.public_key().to_openssh().map_err(SshError::Generate)?;
    write_staged(public_path, format!("{public}\n").as_bytes(), 0o644)?;
    write_staged(private_path, private.as_bytes(), 0o600)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    use super::*;

    fn ssh_keygen() -> Option<PathBuf> {
        let ok = Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .map(|_| true)
            .unwrap_or(false);
        ok.then(|| PathBuf::from("ssh-keygen"))
    }

    #[test]
    fn created_key_is_what_ssh_keygen_reads() {
        let Some(keygen) = ssh_keygen() else {
            eprintln!(
                "SKIPPED created_key_is_what_ssh_keygen_reads: ssh-keygen missing (openssh-client)"
            );
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let id = SshIdentity::load_or_create(&dir.path().join("ssh")).unwrap();
        for file in [
            id.private_key_path().to_path_buf(),
            dir.path().join("ssh/id_ed25519.pub"),
        ] {
            let out = Command::new(&keygen)
                .arg("-l")
                .arg("-f")
                .arg(&file)
                .output()
                .unwrap();
            assert!(out.status.success(), "{file:?}: {out:?}");
            let line = String::from_utf8(out.stdout).unwrap();
            // `256 SHA256:... banger (ED25519)`
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields[0], "256", "{line}");
            assert_eq!(fields[1], id.fingerprint(), "{line}");
            assert!(line.trim_end().ends_with("(ED25519)"), "{line}");
        }
        // ssh-keygen derives the same public line from the private key.
        let out = Command::new(&keygen)
            .arg("-y")
            .arg("-f")
            .arg(id.private_key_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let derived = String::from_utf8(out.stdout).unwrap();
        let mut mine = id.public_line().split_whitespace();
        let mut theirs = derived.split_whitespace();
        assert_eq!(mine.next(), Some("ssh-ed25519"));
        assert_eq!(theirs.next(), Some("ssh-ed25519"));
        assert_eq!(mine.next(), theirs.next());
    }

    #[test]
    fn second_load_reuses_the_pair_with_owner_only_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("ssh");
        let first = SshIdentity::load_or_create(&d).unwrap();
        let bytes = fs::read(first.private_key_path()).unwrap();
        let second = SshIdentity::load_or_create(&d).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read(second.private_key_path()).unwrap(), bytes);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(first.private_key_path()), 0o600);
        assert_eq!(mode(&d), 0o700);
        assert!(first.public_line().starts_with("ssh-ed25519 AAAA"));
        assert!(first.public_line().ends_with(" banger"));
        let on_disk = fs::read_to_string(d.join("id_ed25519.pub")).unwrap();
        assert_eq!(on_disk.trim_end(), first.public_line());
        // No staging files are left behind.
        let mut names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".lock", "id_ed25519", "id_ed25519.pub"]);
    }

    #[test]
    fn a_lost_public_key_is_rewritten_from_the_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = SshIdentity::load_or_create(dir.path()).unwrap();
        fs::remove_file(dir.path().join("id_ed25519.pub")).unwrap();
        let again = SshIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(first, again);
        let on_disk = fs::read_to_string(dir.path().join("id_ed25519.pub")).unwrap();
        assert_eq!(on_disk.trim_end(), first.public_line());
    }

    #[test]
    fn corrupt_private_key_is_an_error_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        SshIdentity::load_or_create(dir.path()).unwrap();
        let private = dir.path().join("id_ed25519");
        fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\ngarbage\n").unwrap();
        let err = SshIdentity::load_or_create(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&private.display().to_string()), "{err}");
        assert!(err.contains("delete it"), "{err}");
        // Nothing was overwritten behind the user's back.
        assert!(fs::read_to_string(&private).unwrap().contains("garbage"));
    }

    #[test]
    fn mismatched_public_key_is_an_error_naming_it() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        SshIdentity::load_or_create(a.path()).unwrap();
        SshIdentity::load_or_create(b.path()).unwrap();
        fs::copy(
            b.path().join("id_ed25519.pub"),
            a.path().join("id_ed25519.pub"),
        )
        .unwrap();
        let err = SshIdentity::load_or_create(a.path())
            .unwrap_err()
            .to_string();
        let public = a.path().join("id_ed25519.pub");
        assert!(err.contains(&public.display().to_string()), "{err}");
        assert!(err.contains("does not match"), "{err}");
    }

    fn host_key(public_key: &str) -> HostKey {
        HostKey {
            algorithm: public_key.split(' ').next().unwrap_or("").to_string(),
            public_key: public_key.to_string(),
            fingerprint: String::new(),
        }
    }

    #[test]
    fn known_hosts_lines_are_found_by_ssh_keygen_under_every_alias() {
        let Some(keygen) = ssh_keygen() else {
            eprintln!(
                "SKIPPED known_hosts_lines_are_found_by_ssh_keygen_under_every_alias: ssh-keygen missing (openssh-client)"
            );
            return;
        };
        // A real host key, as the guest's sshd would have it.
        let dir = tempfile::tempdir().unwrap();
        let hk = dir.path().join("ssh_host_ed25519_key");
        let st = Command::new(&keygen)
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@web", "-f"])
            .arg(&hk)
            .status()
            .unwrap();
        assert!(st.success());
        let line = fs::read_to_string(hk.with_extension("pub")).unwrap();
        let text = known_hosts(
            &["web.vm".to_string(), "10.0.0.5".to_string()],
            &[host_key(line.trim())],
        );
        let file = dir.path().join("known_hosts");
        fs::write(&file, &text).unwrap();
        for alias in ["web.vm", "10.0.0.5"] {
            let out = Command::new(&keygen)
                .args(["-F", alias, "-f"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{alias} not found in {text:?}: {out:?}"
            );
            let found = String::from_utf8(out.stdout).unwrap();
            let blob = line.split_whitespace().nth(1).unwrap();
            assert!(found.contains(blob), "{found}");
        }
        let out = Command::new(&keygen)
            .args(["-F", "other.vm", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "an unknown host must not match");
    }

    #[test]
    fn known_hosts_drops_keys_that_would_inject_other_entries() {
        let text = known_hosts(
            &["a.vm".to_string(), "bad alias".to_string()],
            &[
                host_key("ssh-ed25519 AAAAC3Nza comment with spaces"),
                host_key("ssh-ed25519 AAAA\nevil.vm ssh-ed25519 BBBB"),
                host_key("ssh-ed25519 AAAA,evil.vm"),
                host_key(""),
            ],
        );
        // Only the first two fields of a key count, so a newline in a
        // comment cannot start another entry.
        assert_eq!(text, "a.vm ssh-ed25519 AAAAC3Nza\na.vm ssh-ed25519 AAAA\n");
        assert!(!text.contains("evil"), "{text}");
        assert_eq!(known_hosts(&[], &[host_key("ssh-ed25519 AAAA")]), "");
    }
}
