//! The one way banger replaces a small file: write a uniquely named
//! temporary sibling, sync it (unless the file means nothing after a host
//! restart), rename it over the target. Readers see the old file or the
//! whole new one, and two writers in one process never share a temporary.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` with `mode` by stage-then-rename; on error the
/// temporary is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, true)
}

/// [`write_atomic`] without the sync: readers still see the old file or
/// the whole new one, but after a power loss `path` may hold either, or
/// nothing. Only for a file that means nothing once the host restarts,
/// because every VM start writes it anew (a running VM's exec secret): a
/// sync there costs a journal commit per start and protects nothing.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace(path, bytes, mode, false)
}

fn replace(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if sync {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaces_the_file_whole_with_its_mode_and_leaves_no_temporary() {
        type Writer = fn(&Path, &[u8], u32) -> io::Result<()>;
        let writers: [(&str, Writer); 2] = [
            ("write_atomic", write_atomic),
            ("write_atomic_unsynced", write_atomic_unsynced),
        ];
        for (what, write) in writers {
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("f");
            fs::write(&p, b"old").unwrap();
            write(&p, b"new", 0o600).unwrap();
            assert_eq!(fs::read(&p).unwrap(), b"new", "{what}");
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600,
                "{what}"
            );
            let names: Vec<_> = fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(names, ["f"], "{what}");
            let missing_dir = d.path().join("no/such/f");
            assert!(write(&missing_dir, b"x", 0o644).is_err(), "{what}");
        }
    }
}
