//! `GET /ssh-host-keys`: the public host keys in `<etc>/ssh` with the
//! fingerprints `ssh-keygen -l` prints, so the host can pin them.

use std::fs;
use std::path::{Path, PathBuf};

use banger_guest_protocol::api::HostKey;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use sha2::{Digest, Sha256};

/// Reading host keys failed.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The ssh directory exists but cannot be listed.
    #[error("Cannot list {0}")]
    ListDir(PathBuf, #[source] std::io::Error),
}

/// Every `ssh_host_*_key.pub` under `ssh_dir`, sorted by file name. A
/// missing directory means no keys; unreadable or malformed files are
/// skipped.
pub fn host_keys(ssh_dir: &Path) -> Result<Vec<HostKey>, HostKeyError> {
    let entries = match fs::read_dir(ssh_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(HostKeyError::ListDir(ssh_dir.to_path_buf(), e)),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key.pub"))
        .collect();
    names.sort();
    Ok(names
        .iter()
        .filter_map(|n| fs::read_to_string(ssh_dir.join(n)).ok())
        .filter_map(|line| parse_public_key(line.trim()))
        .collect())
}

/// Parses `<algorithm> <base64 blob> [comment]`.
fn parse_public_key(line: &str) -> Option<HostKey> {
    let mut parts = line.split_whitespace();
    let algorithm = parts.next()?.to_string();
    let blob = STANDARD.decode(parts.next()?).ok()?;
    Some(HostKey {
        algorithm,
        public_key: line.to_string(),
        fingerprint: fingerprint(&blob),
    })
}

/// OpenSSH's SHA256 fingerprint of a key blob.
fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(blob)))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn fingerprints_match_ssh_keygen() {
        let dir = tempfile::tempdir().unwrap();
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.path().join("ssh_host_ed25519_key"))
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            eprintln!("SKIPPED fingerprints_match_ssh_keygen: ssh-keygen not usable");
            return;
        }
        let out = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(dir.path().join("ssh_host_ed25519_key.pub"))
            .output()
            .unwrap();
        let listed = String::from_utf8(out.stdout).unwrap();
        // "256 SHA256:xxxx comment (ED25519)"
        let expected = listed.split_whitespace().nth(1).unwrap();
        fs::write(dir.path().join("not_a_key.pub"), "ssh-rsa AAAA").unwrap();
        let keys = host_keys(dir.path()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert_eq!(keys[0].fingerprint, expected);
    }

    #[test]
    fn missing_ssh_dir_means_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        assert!(host_keys(&dir.path().join("ssh")).unwrap().is_empty());
    }
}
