//! Telling whether a host file changed since it was last read, by its
//! metadata alone, so an answer derived from it can be kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Path, device, inode, size, mtime and ctime (seconds, nanoseconds): the
/// same identity means the same bytes (a rewrite in place moves the
/// ctime, a replacement is a new inode).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileId {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A stable name for this identity (hex, 32 characters): the same on
    /// every run for the same path, device, inode, size and times, so it
    /// can name files kept across restarts.
    pub fn key(&self) -> String {
        use sha2::Digest;
        use std::os::unix::ffi::OsStrExt;
        let mut h = sha2::Sha256::new();
        h.update(self.path.as_os_str().as_bytes());
        h.update([0u8]);
        for n in [self.dev, self.ino, self.size] {
            h.update(n.to_le_bytes());
        }
        for (s, ns) in [self.mtime, self.ctime] {
            h.update(s.to_le_bytes());
            h.update(ns.to_le_bytes());
        }
        banger_api::release::hex(&h.finalize()[..16])
    }
}

/// A file as [`settled`] found it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FileState {
    /// Not there.
    Missing,
    /// There, with this identity.
    Present(FileId),
}

/// How long after a change a file is trusted by its identity: timestamps
/// tick coarsely, so a rewrite within the same tick could look the same
/// (git's "racy clean" problem).
pub const RACY: Duration = Duration::from_secs(2);

/// `path`'s state, or `None` when it cannot be trusted: changed within
/// [`RACY`] of `now`, or not inspectable (other than missing).
pub fn settled(path: &Path, now: SystemTime) -> Option<FileState> {
    use std::os::unix::fs::MetadataExt;
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(FileState::Missing),
        Err(_) => return None,
    };
    let settled = now
        .checked_sub(RACY)
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())?;
    if m.ctime() >= settled.as_secs() as i64 {
        return None;
    }
    Some(FileState::Present(FileId {
        path: path.to_path_buf(),
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_trusted_only_after_it_settled_and_any_change_shows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let now = SystemTime::now();
        assert_eq!(settled(&p, now), Some(FileState::Missing));
        std::fs::write(&p, b"one").unwrap();
        assert_eq!(settled(&p, SystemTime::now()), None, "just written");
        let later = SystemTime::now() + RACY + Duration::from_secs(1);
        let first = settled(&p, later).unwrap();
        assert!(matches!(first, FileState::Present(_)));
        assert_eq!(settled(&p, later), Some(first.clone()));
        // Rewritten in place. (A same-size rewrite within one timestamp
        // tick would look the same: that is what RACY is for.)
        std::fs::write(&p, b"three").unwrap();
        let later = SystemTime::now() + RACY + Duration::from_secs(1);
        assert_ne!(settled(&p, later), Some(first.clone()));
        // Replaced by another file.
        let q = dir.path().join("g");
        std::fs::write(&q, b"two").unwrap();
        let before = settled(&p, later);
        std::fs::rename(&q, &p).unwrap();
        assert_ne!(settled(&p, later), before);
        assert_ne!(settled(&p, later), Some(first));
    }

    #[test]
    fn keys_are_stable_and_differ_with_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"one").unwrap();
        let later = || SystemTime::now() + RACY + Duration::from_secs(1);
        let id = |p: &Path| match settled(p, later()) {
            Some(FileState::Present(id)) => id,
            other => panic!("{other:?}"),
        };
        let a = id(&p);
        assert_eq!(a.key(), id(&p).key());
        assert_eq!(a.key().len(), 32);
        assert!(a.key().bytes().all(|b| b.is_ascii_hexdigit()));
        std::fs::write(&p, b"two").unwrap();
        assert_ne!(id(&p).key(), a.key(), "rewritten");
        let q = dir.path().join("g");
        std::fs::hard_link(&p, &q).unwrap();
        assert_ne!(id(&q).key(), id(&p).key(), "same inode, another path");
    }
}
