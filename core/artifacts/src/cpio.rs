//! The one cpio "newc" writer in banger, and staged publishing of what it
//! writes: the `vsock-agent` capability's initramfs and the kernel boot
//! modules archive (`kernels::modules`) both use it.

use std::io;
use std::path::{Path, PathBuf};

/// Publishing an archive failed.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// Writing or renaming the file failed.
    #[error("Cannot write {}", .0.display())]
    WriteOutput(PathBuf, #[source] io::Error),
}

pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFCHR: u32 = 0o020000;

/// A cpio "newc" (SVR4, no CRC) writer: 110-byte ASCII headers, name and
/// data each padded to 4 bytes, ended by `TRAILER!!!`. The one cpio writer
/// in banger.
#[derive(Debug, Default)]
pub struct Newc {
    out: Vec<u8>,
    next_ino: u32,
}

impl Newc {
    /// Appends one entry; `name` is relative (no leading `/`).
    pub fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        let n = self.out.len().next_multiple_of(4);
        self.out.resize(n, 0);
    }

    /// Ends the archive with its trailer and returns the bytes.
    pub fn finish(mut self) -> Vec<u8> {
        // The trailer's inode must not collide with a real entry's.
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.out
    }
}

/// `path` with `suffix` appended to its file name.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `bytes` to `dest` by stage-then-rename ([`banger_api::fsutil::write_atomic`]).
pub fn publish(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), CpioError> {
    banger_api::fsutil::write_atomic(dest, bytes, mode)
        .map_err(|e| CpioError::WriteOutput(dest.into(), e))
}
