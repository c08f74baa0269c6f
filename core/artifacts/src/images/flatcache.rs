//! Flattened images kept per manifest digest, so a re-pull (the same image
//! under another name, or again after `image rm`) is a clone of the ext4 the
//! first pull built instead of a new flatten.
//!
//! An entry is `<cache>/flat/<key>.ext4` plus `<key>.json`, its stamp. The
//! key hashes everything the flatten's output depends on: the manifest
//! digest, the requested size, the layer limits and [`FORMAT`]. The ext4 is
//! cloned in under a staging name and renamed into place; the stamp is
//! written (stage + rename) only after that, and records the file's length,
//! device, inode and ctime. A lookup uses an entry only when the file still
//! matches its stamp: any write, truncation or replacement after it was
//! stored changes the ctime (which no tool can set back), so a partial or
//! modified file is removed and the pull flattens again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_api::model::ByteSize;
use serde::{Deserialize, Serialize};

use super::flatten::{self, Built};
use crate::archive::ExtractLimits;
use crate::disk;

/// Bumped whenever the flattener's output for the same inputs changes.
const FORMAT: &str = "banger-flat-v1";

/// The entry's key: a hex sha256 over the flatten's inputs.
pub(crate) fn key(digest: &str, size: Option<ByteSize>, limits: &ExtractLimits) -> String {
    let input = format!(
        "{FORMAT}\n{digest}\nsize={:?}\nlimits={}/{}/{}\n",
        size.map(|s| s.0),
        limits.max_total_bytes,
        limits.max_entries,
        limits.max_ratio
    );
    format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(input.as_bytes())
    )
}

/// What the stamp records about a stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    /// The manifest digest (what prune keeps by).
    digest: String,
    tree_bytes: u64,
    size: u64,
    len: u64,
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    /// sha256 of the first MiB (superblock, group descriptors, the first
    /// inode tables): catches a rewrite inside the ctime's clock tick.
    head: String,
}

impl Stamp {
    fn matches(&self, m: &std::fs::Metadata) -> bool {
        m.is_file()
            && m.len() == self.len
            && m.dev() == self.dev
            && m.ino() == self.ino
            && m.ctime() == self.ctime
            && m.ctime_nsec() == self.ctime_nsec
    }
}

/// sha256 (hex) of the first MiB of `path`.
fn head_hash(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut head = Vec::with_capacity(HEAD);
    std::fs::File::open(path)?
        .take(HEAD as u64)
        .read_to_end(&mut head)?;
    Ok(format!(
        "{:x}",
        <sha2::Sha256 as sha2::Digest>::digest(&head)
    ))
}

const HEAD: usize = 1 << 20;

/// A usable entry.
#[derive(Debug)]
pub(crate) struct Hit {
    pub(crate) path: PathBuf,
    pub(crate) built: Built,
}

fn dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("flat")
}

fn paths(cache_dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    let d = dir(cache_dir);
    (d.join(format!("{key}.ext4")), d.join(format!("{key}.json")))
}

/// The entry for `key` when it exists and still matches its stamp. An entry
/// that does not (no stamp, a stamp for another file, a changed file) is
/// removed.
pub(crate) fn lookup(cache_dir: &Path, key: &str) -> Option<Hit> {
    let (image, stamp_path) = paths(cache_dir, key);
    let stamp: Option<Stamp> = std::fs::read(&stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let meta = std::fs::symlink_metadata(&image).ok();
    match (stamp, meta) {
        (Some(s), Some(m)) if s.matches(&m) && head_hash(&image).is_ok_and(|h| h == s.head) => {
            Some(Hit {
                path: image,
                built: Built {
                    tree_bytes: s.tree_bytes,
                    size: ByteSize(s.size),
                },
            })
        }
        (None, None) => None,
        _ => {
            tracing::warn!(
                "flattened image cache entry {} does not match its stamp; removing it",
                image.display()
            );
            remove(&image, &stamp_path);
            None
        }
    }
}

fn remove(image: &Path, stamp: &Path) {
    // The stamp first: an entry without one is never used.
    flatten::remove_any(stamp);
    flatten::remove_any(image);
}

/// Keeps a copy of `image` (just built for `digest`) under `key`. Failing to
/// store only costs the next pull a flatten, so the error is returned for
/// logging, never fails the pull.
pub(crate) fn store(
    cache_dir: &Path,
    key: &str,
    digest: &str,
    image: &Path,
    built: &Built,
) -> Result<(), String> {
    let d = dir(cache_dir);
    std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    let (dst, stamp_path) = paths(cache_dir, key);
    remove(&dst, &stamp_path);
    disk::clone_file(image, &dst).map_err(|e| e.to_string())?;
    let m = std::fs::symlink_metadata(&dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    let stamp = Stamp {
        digest: digest.to_string(),
        tree_bytes: built.tree_bytes,
        size: built.size.0,
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
        head: head_hash(&dst).map_err(|e| format!("cannot read {}: {e}", dst.display()))?,
    };
    let bytes = serde_json::to_vec(&stamp).map_err(|e| e.to_string())?;
    banger_api::fsutil::write_atomic(&stamp_path, &bytes, 0o600).map_err(|e| {
        flatten::remove_any(&dst);
        format!("cannot write {}: {e}", stamp_path.display())
    })
}

/// Removes every entry whose manifest digest is not in `keep`, entries
/// without a valid stamp and staging leftovers; returns what was removed
/// (`flat:<key>`) and the bytes allocated to it.
pub(crate) fn prune(
    cache_dir: &Path,
    keep: &std::collections::HashSet<String>,
) -> std::io::Result<(Vec<String>, u64)> {
    let d = dir(cache_dir);
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let (mut removed, mut freed) = (Vec::new(), 0);
    for name in names {
        let path = d.join(&name);
        let drop = match name.strip_suffix(".ext4") {
            Some(key) if !name.starts_with('.') => {
                let stamp: Option<Stamp> = std::fs::read(d.join(format!("{key}.json")))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                !stamp.is_some_and(|s| keep.contains(&s.digest))
            }
            // Stamps go with their image below; staging leftovers go.
            _ => name.starts_with('.'),
        };
        if !drop {
            continue;
        }
        freed += disk::allocated_bytes(&path).unwrap_or(0);
        if let Some(key) = name
            .strip_suffix(".ext4")
            .filter(|_| !name.starts_with('.'))
        {
            remove(&path, &d.join(format!("{key}.json")));
            removed.push(format!("flat:{key}"));
        } else {
            flatten::remove_any(&path);
        }
    }
    // Stamps whose image is gone.
    for e in std::fs::read_dir(&d)?.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(".json")
            && !d.join(format!("{key}.ext4")).exists()
        {
            flatten::remove_any(&e.path());
        }
    }
    Ok((removed, freed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn built() -> Built {
        Built {
            tree_bytes: 7,
            size: ByteSize(4096),
        }
    }

    fn stored(cache: &Path, key: &str, digest: &str) -> PathBuf {
        let src = cache.join(format!("src-{key}"));
        std::fs::write(&src, vec![1u8; 4096]).unwrap();
        store(cache, key, digest, &src, &built()).unwrap();
        src
    }

    #[test]
    fn key_changes_with_every_input() {
        let l = ExtractLimits::OCI_PULL;
        let base = key("sha256:a", None, &l);
        assert_eq!(base, key("sha256:a", None, &l));
        assert_ne!(base, key("sha256:b", None, &l));
        assert_ne!(base, key("sha256:a", Some(ByteSize(1 << 30)), &l));
        let tighter = ExtractLimits {
            max_entries: l.max_entries - 1,
            ..l
        };
        assert_ne!(base, key("sha256:a", None, &tighter));
    }

    #[test]
    fn a_stored_entry_is_found_and_a_changed_one_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        stored(tmp.path(), "k1", "sha256:one");
        let hit = lookup(tmp.path(), "k1").unwrap();
        assert_eq!(std::fs::read(&hit.path).unwrap(), vec![1u8; 4096]);
        assert_eq!(hit.built.tree_bytes, 7);

        // Same length, different bytes: the ctime moves, the entry goes.
        std::fs::write(&hit.path, vec![2u8; 4096]).unwrap();
        assert!(lookup(tmp.path(), "k1").is_none());
        assert!(!hit.path.exists());
        assert!(!tmp.path().join("flat/k1.json").exists());
    }

    #[test]
    fn an_image_without_a_stamp_is_never_used() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("flat")).unwrap();
        let partial = tmp.path().join("flat/k2.ext4");
        std::fs::write(&partial, b"half").unwrap();
        assert!(lookup(tmp.path(), "k2").is_none());
        assert!(!partial.exists(), "the unstamped file is removed");
    }

    #[test]
    fn prune_keeps_entries_of_kept_digests_only() {
        let tmp = tempfile::tempdir().unwrap();
        stored(tmp.path(), "keep", "sha256:kept");
        stored(tmp.path(), "gone", "sha256:dropped");
        let leftover = tmp.path().join("flat/.gone.ext4.staging-1-2");
        std::fs::write(&leftover, b"x").unwrap();
        let (removed, _) = prune(tmp.path(), &HashSet::from(["sha256:kept".to_string()])).unwrap();
        assert_eq!(removed, vec!["flat:gone".to_string()]);
        assert!(lookup(tmp.path(), "keep").is_some());
        assert!(!tmp.path().join("flat/gone.ext4").exists());
        assert!(!tmp.path().join("flat/gone.json").exists());
        assert!(!leftover.exists());
    }
}
