//! Disk image helpers: cheap clones of root images, ext4 work disks, growing
//! them.
//!
//! Every function that creates a file builds it under a staging name next to
//! the destination and publishes it with a rename that refuses to replace an
//! existing file, so a crash or error never leaves a half-written image at
//! the destination, and an existing image is never clobbered.

use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use banger_api::model::ByteSize;
use sha2::Digest;

mod ext4_super;
pub mod spares;

/// A disk operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The destination already exists; we never overwrite an image.
    #[error("{} already exists; delete it first or choose another path", .0.display())]
    DestinationExists(PathBuf),
    /// The source image could not be opened or inspected.
    #[error("Cannot open {}", path.display())]
    OpenSource {
        /// The source.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The staging file could not be created or written.
    #[error("Cannot write {}", path.display())]
    Write {
        /// The staging file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The finished file could not be moved into place.
    #[error("Cannot move {} to {}", staging.display(), dst.display())]
    Publish {
        /// The staging file.
        staging: PathBuf,
        /// The destination.
        dst: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A filesystem label ext4 cannot hold.
    #[error("Invalid filesystem label {0:?}: use at most 16 bytes and no NUL")]
    InvalidLabel(String),
    /// A required host tool is not installed.
    #[error("{tool} not found in PATH, /usr/sbin or /sbin: install the {package} package")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian/Fedora package that provides it.
        package: &'static str,
    },
    /// A host tool could not be started.
    #[error("Cannot run {}", tool.display())]
    ToolRun {
        /// The program.
        tool: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A host tool ran and reported failure.
    #[error("{tool} failed on {} ({status}): {stderr}", path.display())]
    ToolFailed {
        /// The program's name.
        tool: &'static str,
        /// The image it worked on.
        path: PathBuf,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
    /// The image could not be inspected or resized.
    #[error("Cannot resize {}", path.display())]
    Resize {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A grow request smaller than the image.
    #[error(
        "Refusing to shrink {} from {current} to {requested}: disks can only grow; pass a size of at least {current}",
        path.display()
    )]
    Shrink {
        /// The image.
        path: PathBuf,
        /// Its current size.
        current: ByteSize,
        /// The size asked for.
        requested: ByteSize,
    },
}

/// How [`clone_file`] made the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    /// Shared extents (btrfs, XFS with reflink): instant, no extra space until written.
    Reflink,
    /// Data copied, holes and all-zero blocks left unallocated.
    Sparse,
    /// A copy made ahead of time ([`spares`]), moved into place.
    Spare,
}

/// Copies `src` to a new file `dst`, by reflink where the filesystem supports
/// it, else as a sparse copy. `src` is only read. Fails if `dst` exists; on
/// failure nothing is left at `dst` or the staging name.
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneKind, DiskError> {
    let open_err = |source| DiskError::OpenSource {
        path: src.to_path_buf(),
        source,
    };
    let source = File::open(src).map_err(open_err)?;
    let meta = source.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let len = meta.len();
    refuse_existing(dst)?;
    let staged = Staged::create(dst)?;
    let write_err = |source| DiskError::Write {
        path: staged.path.clone(),
        source,
    };
    let kind = if reflink(&source, &staged.file) {
        CloneKind::Reflink
    } else {
        // A failed clone may have left partial state; start from empty.
        staged.file.set_len(0).map_err(write_err)?;
        sparse_copy(&source, &staged.file, len).map_err(write_err)?;
        CloneKind::Sparse
    };
    staged.publish(dst)?;
    Ok(kind)
}

/// Creates a new sparse file `path` of `size` holding an empty ext4
/// filesystem labelled `label`, with `/` owned by root.
pub fn create_ext4(path: &Path, size: ByteSize, label: &str) -> Result<(), DiskError> {
    create_ext4_with(&Tools::system(), path, size, label)
}

/// How [`create_ext4_cached`] made a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext4Origin {
    /// Copied from the kept empty filesystem, with a UUID of its own.
    Template(CloneKind),
    /// `mkfs.ext4` on the disk itself: this e2fsprogs cannot make a template
    /// whose copies can be given new UUIDs (it lacks `metadata_csum_seed`),
    /// or the template directory is unusable.
    Formatted,
}

/// The same disk as [`create_ext4`], made without a process: a copy (reflink
/// or sparse) of an empty filesystem of that size and label kept in
/// `templates` (made once with `mkfs.ext4`, checked before every use and
/// remade when it is not what it should be), given its own filesystem UUID
/// and directory hash seed. Falls back to [`create_ext4`] when no template
/// can be made, so the result is the same either way.
///
/// The sync is the caller's: the disk is at `path` when this returns, but
/// durable only once the [`Unsynced`] is synced, which the caller may do on
/// another thread while it goes on (the work disk's sync runs beside the
/// hooks after it). Until then a power loss may leave any contents there.
pub fn create_ext4_cached(
    templates: &Path,
    path: &Path,
    size: ByteSize,
    label: &str,
) -> Result<(Ext4Origin, Unsynced), DiskError> {
    let tools = Tools::system();
    check_label(label)?;
    refuse_existing(path)?;
    let (origin, file) = match template(&tools, templates, size, label) {
        Some((template, geo)) => {
            let (kind, copy) = clone_ext4(&template, &geo, path)?;
            (Ext4Origin::Template(kind), Some(copy))
        }
        // Formatted disks are published synced.
        None => {
            create_ext4_with(&tools, path, size, label)?;
            (Ext4Origin::Formatted, None)
        }
    };
    let unsynced = Unsynced {
        path: path.to_path_buf(),
        file,
    };
    Ok((origin, unsynced))
}

/// A disk in place whose contents may not be on stable storage yet
/// ([`create_ext4_cached`]).
#[derive(Debug)]
#[must_use = "the disk is not durable until synced"]
pub struct Unsynced {
    path: PathBuf,
    file: Option<File>,
}

impl Unsynced {
    /// Flushes the disk to stable storage.
    pub fn sync(self) -> Result<(), DiskError> {
        match self.file {
            Some(f) => f.sync_all().map_err(|source| DiskError::Write {
                path: self.path,
                source,
            }),
            None => Ok(()),
        }
    }
}

/// The mkfs.ext4 options of a template, most wanted first:
/// `metadata_csum_seed` is what lets a copy change its UUID by rewriting
/// the superblocks alone; `assume_storage_prezeroed` (e2fsprogs 1.47) skips
/// writing zeros a new sparse file already reads as.
const TEMPLATE_MKFS: [&[&str]; 2] = [
    &[
        "-O",
        "metadata_csum_seed",
        "-E",
        "root_owner=0:0,assume_storage_prezeroed=1",
    ],
    &["-O", "metadata_csum_seed", "-E", "root_owner=0:0"],
];

/// Serialises making and checking templates in this process; holds the
/// templates that could not be made, which are not tried again.
static TEMPLATES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// The template for (`size`, `label`, [`TEMPLATE_MKFS`]): opened, checked,
/// made or remade if needed. `None` (after a warning) when it cannot be
/// made; the caller formats the disk itself.
fn template(
    tools: &Tools,
    dir: &Path,
    size: ByteSize,
    label: &str,
) -> Option<(File, ext4_super::Geometry)> {
    let mut key = sha2::Sha256::new();
    key.update(format!("{}\0{label}\0{TEMPLATE_MKFS:?}", size.0));
    let hex: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = dir.join(format!("ext4-{}-{hex}.img", size.0));
    let mut failed = TEMPLATES.lock().unwrap_or_else(|e| e.into_inner());
    if failed.contains(&path) {
        return None;
    }
    if let Some(found) = open_template(&path, size, label) {
        return Some(found);
    }
    let made = std::fs::create_dir_all(dir)
        .map_err(|source| DiskError::Write {
            path: dir.to_path_buf(),
            source,
        })
        .and_then(|()| make_template(tools, &path, size, label));
    match made.map(|()| open_template(&path, size, label)) {
        Ok(Some(found)) => Some(found),
        Ok(None) => {
            tracing::warn!(template = %path.display(), "a freshly made ext4 template fails its own check; formatting each disk instead");
            failed.push(path);
            None
        }
        Err(e) => {
            tracing::warn!(template = %path.display(), error = %e, "cannot make an ext4 template; formatting each disk instead");
            failed.push(path);
            None
        }
    }
}

/// `path` opened and checked against (`size`, `label`); a file that fails
/// the check is removed.
fn open_template(path: &Path, size: ByteSize, label: &str) -> Option<(File, ext4_super::Geometry)> {
    let file = File::open(path).ok()?;
    let checked = file.metadata().and_then(|m| {
        let geo = ext4_super::inspect(&file)?;
        if m.len() == size.0 && geo.bytes == size.0 && geo.label == label.as_bytes() {
            Ok(geo)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} bytes holding a {}-byte filesystem labelled {:?}",
                    m.len(),
                    geo.bytes,
                    String::from_utf8_lossy(&geo.label)
                ),
            ))
        }
    });
    match checked {
        Ok(geo) => Some((file, geo)),
        Err(e) => {
            tracing::warn!(template = %path.display(), error = %e, "ext4 template is not usable; making it again");
            let _ = std::fs::remove_file(path);
            None
        }
    }
}

/// Runs mkfs.ext4 with the first of [`TEMPLATE_MKFS`] it accepts on a
/// staged file and publishes it at `path`. Another process publishing the
/// same template first is success.
fn make_template(tools: &Tools, path: &Path, size: ByteSize, label: &str) -> Result<(), DiskError> {
    let mkfs = tools.find("mkfs.ext4", E2FSPROGS)?;
    let mut last = None;
    for options in TEMPLATE_MKFS {
        match mkfs_staged(&mkfs, path, size, label, options) {
            Ok(staged) => {
                return match staged.publish(path) {
                    Err(DiskError::DestinationExists(_)) => Ok(()),
                    other => other,
                };
            }
            Err(e @ DiskError::ToolFailed { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(DiskError::ToolMissing {
        tool: "mkfs.ext4",
        package: E2FSPROGS,
    }))
}

/// Copies the checked `template` to a new file `dst` and gives the copy a
/// fresh filesystem UUID and directory hash seed.
/// Copies the template to `dst` with identities of its own, published
/// unsynced; returns how it was copied and the open copy, to sync.
fn clone_ext4(
    template: &File,
    geo: &ext4_super::Geometry,
    dst: &Path,
) -> Result<(CloneKind, File), DiskError> {
    let staged = Staged::create(dst)?;
    let write_err = |source| DiskError::Write {
        path: staged.path.clone(),
        source,
    };
    let kind = if reflink(template, &staged.file) {
        CloneKind::Reflink
    } else {
        staged.file.set_len(0).map_err(write_err)?;
        sparse_copy(template, &staged.file, geo.bytes).map_err(write_err)?;
        CloneKind::Sparse
    };
    ext4_super::set_identity(
        &staged.file,
        geo,
        ext4_super::random_uuid(),
        ext4_super::random_uuid(),
    )
    .map_err(write_err)?;
    let file = staged.publish_unsynced(dst)?;
    Ok((kind, file))
}

/// Grows the ext4 image at `path` to `new_size` and its filesystem with it.
/// Shrinking is refused. The image must not be in use.
pub fn grow_ext4(path: &Path, new_size: ByteSize) -> Result<(), DiskError> {
    grow_ext4_with(&Tools::system(), path, new_size)
}

/// Bytes actually allocated on disk for `path` (`st_blocks * 512`), which is
/// far below its length for a sparse file.
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

const E2FSPROGS: &str = "e2fsprogs";

fn create_ext4_with(
    tools: &Tools,
    path: &Path,
    size: ByteSize,
    label: &str,
) -> Result<(), DiskError> {
    check_label(label)?;
    let mkfs = tools.find("mkfs.ext4", E2FSPROGS)?;
    refuse_existing(path)?;
    mkfs_staged(&mkfs, path, size, label, &["-E", "root_owner=0:0"])?.publish(path)
}

/// A sparse staged file for `dst` of `size` formatted by `mkfs` with
/// `label` and `options`.
fn mkfs_staged(
    mkfs: &Path,
    dst: &Path,
    size: ByteSize,
    label: &str,
    options: &[&str],
) -> Result<Staged, DiskError> {
    let staged = Staged::create(dst)?;
    staged
        .file
        .set_len(size.0)
        .map_err(|source| DiskError::Write {
            path: staged.path.clone(),
            source,
        })?;
    let mut cmd = Command::new(mkfs);
    cmd.args(["-q", "-F", "-L", label])
        .args(options)
        .arg(&staged.path);
    run(cmd, "mkfs.ext4", mkfs, dst)?;
    Ok(staged)
}

fn check_label(label: &str) -> Result<(), DiskError> {
    if label.len() > 16 || label.contains('\0') {
        return Err(DiskError::InvalidLabel(label.to_string()));
    }
    Ok(())
}

fn grow_ext4_with(tools: &Tools, path: &Path, new_size: ByteSize) -> Result<(), DiskError> {
    let resize_err = |source| DiskError::Resize {
        path: path.to_path_buf(),
        source,
    };
    let current = std::fs::metadata(path).map_err(resize_err)?.len();
    if new_size.0 < current {
        return Err(DiskError::Shrink {
            path: path.to_path_buf(),
            current: ByteSize(current),
            requested: new_size,
        });
    }
    if new_size.0 == current {
        return Ok(());
    }
    let e2fsck = tools.find("e2fsck", E2FSPROGS)?;
    let resize2fs = tools.find("resize2fs", E2FSPROGS)?;

    // resize2fs insists on a freshly checked filesystem. e2fsck exit codes 1
    // and 2 mean "errors corrected", which is fine for an offline image.
    let mut fsck = Command::new(&e2fsck);
    fsck.arg("-fy").arg(path);
    let out = output(fsck, &e2fsck)?;
    if out.status.code().is_none_or(|c| c & !0b11 != 0) {
        return Err(tool_failed("e2fsck", path, &out));
    }

    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(new_size.0))
        .map_err(resize_err)?;
    // If resize2fs fails the file stays longer than its filesystem, which is
    // harmless (ext4 ignores the tail) and a retry completes it; truncating
    // back could cut off blocks a partial resize already used.
    let mut resize = Command::new(&resize2fs);
    resize.arg(path);
    run(resize, "resize2fs", &resize2fs, path)
}

/// Where host tools are looked up: `PATH`, then the sbin directories that a
/// non-root user's `PATH` often lacks.
#[derive(Debug)]
struct Tools {
    dirs: Vec<PathBuf>,
}

impl Tools {
    fn system() -> Self {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
        Tools { dirs }
    }

    fn find(&self, tool: &'static str, package: &'static str) -> Result<PathBuf, DiskError> {
        self.dirs
            .iter()
            .filter(|d| d.is_absolute())
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
            .ok_or(DiskError::ToolMissing { tool, package })
    }
}

fn output(mut cmd: Command, program: &Path) -> Result<std::process::Output, DiskError> {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| DiskError::ToolRun {
            tool: program.to_path_buf(),
            source,
        })
}

fn run(cmd: Command, tool: &'static str, program: &Path, image: &Path) -> Result<(), DiskError> {
    let out = output(cmd, program)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(tool_failed(tool, image, &out))
    }
}

fn tool_failed(tool: &'static str, image: &Path, out: &std::process::Output) -> DiskError {
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.is_empty() {
        stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    DiskError::ToolFailed {
        tool,
        path: image.to_path_buf(),
        status: out.status,
        stderr,
    }
}

fn refuse_existing(dst: &Path) -> Result<(), DiskError> {
    if std::fs::symlink_metadata(dst).is_ok() {
        return Err(DiskError::DestinationExists(dst.to_path_buf()));
    }
    Ok(())
}

/// A file being built next to its destination; removed on drop unless
/// published.
#[derive(Debug)]
struct Staged {
    path: PathBuf,
    file: File,
    published: bool,
}

impl Staged {
    fn create(dst: &Path) -> Result<Staged, DiskError> {
        let name = dst.file_name().unwrap_or(dst.as_os_str());
        let mut staged_name = OsString::from(".");
        staged_name.push(name);
        staged_name.push(format!(
            ".staging-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let path = dst.with_file_name(staged_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| DiskError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(Staged {
            path,
            file,
            published: false,
        })
    }

    /// Flushes the file and renames it to `dst`, refusing to replace an
    /// existing file.
    fn publish(self, dst: &Path) -> Result<(), DiskError> {
        self.file.sync_all().map_err(|source| DiskError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.rename_to(dst)
    }

    /// Renames the file to `dst` as [`Staged::publish`] does, without the
    /// flush, and returns it open, for the caller to sync.
    fn publish_unsynced(self, dst: &Path) -> Result<File, DiskError> {
        let file = self.file.try_clone().map_err(|source| DiskError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.rename_to(dst)?;
        Ok(file)
    }

    fn rename_to(mut self, dst: &Path) -> Result<(), DiskError> {
        match rename_noreplace(&self.path, dst) {
            Ok(()) => {
                self.published = true;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(DiskError::DestinationExists(dst.to_path_buf()))
            }
            Err(source) => Err(DiskError::Publish {
                staging: self.path.clone(),
                dst: dst.to_path_buf(),
                source,
            }),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let (cfrom, cto) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the
    // call; AT_FDCWD makes the relative-path semantics those of rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cfrom.as_ptr(),
            libc::AT_FDCWD,
            cto.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: check, then rename. The
        // window is tiny and only our own daemon writes these paths.
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
        _ => Err(err),
    }
}

/// Shares `src`'s extents with `dst` (FICLONE). False when the filesystem
/// cannot (ext4, tmpfs, across filesystems).
fn reflink(src: &File, dst: &File) -> bool {
    // SAFETY: both fds are open files owned by the caller for the duration of
    // the call; FICLONE takes the source fd as its integer argument and does
    // not touch our memory.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    rc == 0
}

/// Block size for zero detection: the page/filesystem block size, so every
/// skipped block is one the filesystem can leave unallocated.
const BLOCK: usize = 4096;
/// Read size for copying.
const CHUNK: usize = 1 << 20;

/// Copies `len` bytes, writing only data blocks: holes are skipped via
/// `SEEK_DATA`/`SEEK_HOLE` and all-zero blocks inside data are skipped too,
/// then the length is set so trailing holes exist.
fn sparse_copy(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let Some((data, hole)) = next_data(src, pos, len)? else {
            break;
        };
        let mut off = data;
        while off < hole {
            let n = (hole - off).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, off)?;
            write_nonzero_blocks(dst, chunk, off)?;
            off += n as u64;
        }
        pos = hole;
    }
    dst.set_len(len)
}

/// The next `[data, hole)` range at or after `pos`, or `None` when only a
/// hole remains. Filesystems without SEEK_DATA report everything as data.
fn next_data(f: &File, pos: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let off = i64::try_from(off).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: lseek on an fd we own; it only moves the file offset, which
        // nothing else in this process relies on (we use positional I/O).
        let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    };
    let data = match seek(pos, libc::SEEK_DATA) {
        Ok(Some(d)) => d,
        Ok(None) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((pos, len))),
        Err(e) => return Err(e),
    };
    let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
    Ok(Some((data.min(len), hole)))
}

/// Writes the runs of non-zero `BLOCK`s of `chunk` (which starts at file
/// offset `off`).
fn write_nonzero_blocks(dst: &File, chunk: &[u8], off: u64) -> io::Result<()> {
    let mut run_start: Option<usize> = None;
    let mut i = 0;
    while i < chunk.len() {
        let end = (i + BLOCK).min(chunk.len());
        let zero = chunk[i..end].iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i),
            (true, Some(s)) => {
                dst.write_all_at(&chunk[s..i], off + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run_start {
        dst.write_all_at(&chunk[s..], off + s as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const MIB: u64 = 1 << 20;

    /// [`create_ext4_cached`], synced before it returns.
    fn cached(
        templates: &Path,
        path: &Path,
        size: ByteSize,
        label: &str,
    ) -> Result<Ext4Origin, DiskError> {
        let (origin, unsynced) = create_ext4_cached(templates, path, size, label)?;
        unsynced.sync()?;
        Ok(origin)
    }

    /// Deterministic non-zero test data.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Builds a sparse file of `len` with `writes` (offset, bytes) applied.
    fn sparse_file(path: &Path, len: u64, writes: &[(u64, Vec<u8>)]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for (off, data) in writes {
            f.write_all_at(data, *off).unwrap();
        }
        f.sync_all().unwrap();
    }

    /// Asserts `path` is exactly `len` bytes of zeros except for `writes`,
    /// comparing chunk by chunk against a model built from the writes.
    fn assert_content(path: &Path, len: u64, writes: &[(u64, Vec<u8>)]) {
        assert_eq!(std::fs::metadata(path).unwrap().len(), len);
        let f = File::open(path).unwrap();
        let mut got = vec![0u8; 8 * MIB as usize];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(got.len() as u64) as usize;
            f.read_exact_at(&mut got[..n], off).unwrap();
            let mut want = vec![0u8; n];
            for (w_off, data) in writes {
                let (start, end) = (*w_off, *w_off + data.len() as u64);
                let (lo, hi) = (start.max(off), end.min(off + n as u64));
                if lo < hi {
                    want[(lo - off) as usize..(hi - off) as usize]
                        .copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
                }
            }
            assert!(
                got[..n] == want[..],
                "content differs in [{off}, {})",
                off + n as u64
            );
            off += n as u64;
        }
    }

    pub(super) fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Runs debugfs, or reports the test as skipped when it is absent.
    fn debugfs(test: &str, args: &[&str], image: &Path) -> Option<String> {
        let Ok(bin) = Tools::system().find("debugfs", E2FSPROGS) else {
            eprintln!("SKIPPED {test}: debugfs (e2fsprogs) is not installed");
            return None;
        };
        let out = Command::new(bin).args(args).arg(image).output().unwrap();
        assert!(out.status.success(), "debugfs {args:?}: {out:?}");
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn have_e2fsprogs(test: &str) -> bool {
        let t = Tools::system();
        for tool in ["mkfs.ext4", "e2fsck", "resize2fs", "debugfs"] {
            if t.find(tool, E2FSPROGS).is_err() {
                eprintln!("SKIPPED {test}: {tool} (e2fsprogs) is not installed");
                return false;
            }
        }
        true
    }

    /// `Filesystem volume name`, and block count times block size, from `stats`.
    fn label_and_size(stats: &str) -> (String, u64) {
        let field = |name: &str| {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {stats}"))
                .trim()
                .to_string()
        };
        let count: u64 = field("Block count:").parse().unwrap();
        let size: u64 = field("Block size:").parse().unwrap();
        (field("Filesystem volume name:"), count * size)
    }

    #[test]
    fn clone_keeps_content_byte_for_byte_and_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("root.ext4"), dir.path().join("vm.ext4"));
        let len = 1 << 30;
        let writes = vec![
            (0, pattern(512, 1)),
            (300 * MIB + 17, pattern(MIB as usize, 2)),
            (len - 4096, pattern(4096, 3)),
        ];
        sparse_file(&src, len, &writes);

        let kind = clone_file(&src, &dst).unwrap();
        assert_content(&dst, len, &writes);
        assert_content(&src, len, &writes);
        if kind == CloneKind::Sparse {
            let used = allocated_bytes(&dst).unwrap();
            assert!(used < 16 * MIB, "clone allocates {used} bytes");
        }
        assert_eq!(dir_entries(dir.path()), ["root.ext4", "vm.ext4"]);
    }

    #[test]
    fn sparse_copy_skips_zero_blocks_inside_data() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let writes = vec![(4 * MIB, pattern(4096, 9))];
        // 4 MiB of written (allocated) zeros, then data.
        let mut f = File::create(&src).unwrap();
        f.write_all(&vec![0u8; 4 * MIB as usize]).unwrap();
        f.write_all(&writes[0].1).unwrap();
        f.sync_all().unwrap();
        assert!(allocated_bytes(&src).unwrap() >= 4 * MIB);

        let (s, d) = (File::open(&src).unwrap(), File::create(&dst).unwrap());
        sparse_copy(&s, &d, 4 * MIB + 4096).unwrap();
        assert_content(&dst, 4 * MIB + 4096, &writes);
        let used = allocated_bytes(&dst).unwrap();
        assert!(used < MIB, "copy allocates {used} bytes");
    }

    #[test]
    fn clone_into_a_missing_directory_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        sparse_file(&src, MIB, &[(0, pattern(100, 4))]);
        let dst = dir.path().join("missing").join("dst");
        let err = clone_file(&src, &dst).unwrap_err();
        assert!(matches!(err, DiskError::Write { .. }), "{err:?}");
        assert!(!dst.exists());
        assert_eq!(dir_entries(dir.path()), ["src"]);
        assert_content(&src, MIB, &[(0, pattern(100, 4))]);
    }

    #[test]
    fn clone_never_overwrites_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        sparse_file(&src, MIB, &[(0, pattern(100, 5))]);
        std::fs::write(&dst, b"user data").unwrap();
        let err = clone_file(&src, &dst).unwrap_err();
        assert!(matches!(err, DiskError::DestinationExists(_)), "{err:?}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"user data");
        assert_eq!(dir_entries(dir.path()), ["dst", "src"]);
    }

    #[test]
    fn rename_noreplace_refuses_to_replace() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        std::fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(dir_entries(dir.path()), ["b"]);
    }

    #[test]
    fn create_ext4_makes_a_labelled_sparse_filesystem_owned_by_root() {
        let test = "create_ext4_makes_a_labelled_sparse_filesystem_owned_by_root";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("work.ext4");
        let size = 256 * MIB;
        create_ext4(&img, ByteSize(size), "work").unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), size);
        let used = allocated_bytes(&img).unwrap();
        assert!(used < size / 2, "fresh filesystem allocates {used} bytes");

        let stats = debugfs(test, &["-R", "stats"], &img).unwrap();
        assert_eq!(label_and_size(&stats), ("work".to_string(), size));
        let root = debugfs(test, &["-R", "stat /"], &img).unwrap();
        assert!(
            root.contains("User:     0   Group:     0"),
            "root not owned by 0:0: {root}"
        );
        assert_eq!(dir_entries(dir.path()), ["work.ext4"]);
    }

    #[test]
    fn create_ext4_refuses_bad_labels_and_existing_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("x.ext4");
        let err = create_ext4(&img, ByteSize(64 * MIB), "a-label-longer-than-16").unwrap_err();
        assert!(matches!(err, DiskError::InvalidLabel(_)), "{err:?}");
        std::fs::write(&img, b"keep").unwrap();
        if have_e2fsprogs("create_ext4_refuses_bad_labels_and_existing_files") {
            let err = create_ext4(&img, ByteSize(64 * MIB), "x").unwrap_err();
            assert!(matches!(err, DiskError::DestinationExists(_)), "{err:?}");
        }
        assert_eq!(std::fs::read(&img).unwrap(), b"keep");
    }

    #[test]
    fn missing_mkfs_names_the_package_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let tools = Tools {
            dirs: vec![empty.path().to_path_buf()],
        };
        let img = dir.path().join("work.ext4");
        let err = create_ext4_with(&tools, &img, ByteSize(64 * MIB), "work").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("mkfs.ext4 not found"), "{msg}");
        assert!(msg.contains("install the e2fsprogs package"), "{msg}");
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn mkfs_failure_leaves_nothing() {
        let test = "mkfs_failure_leaves_nothing";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("tiny.ext4");
        // Far too small for any ext4 filesystem.
        let err = create_ext4(&img, ByteSize(4096), "tiny").unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::ToolFailed {
                    tool: "mkfs.ext4",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(dir_entries(dir.path()).is_empty());
    }

    #[test]
    fn grow_keeps_files_and_the_new_size_is_visible() {
        let test = "grow_keeps_files_and_the_new_size_is_visible";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("work.ext4");
        create_ext4(&img, ByteSize(64 * MIB), "work").unwrap();
        let host_file = dir.path().join("hello.txt");
        let content = pattern(10_000, 7);
        std::fs::write(&host_file, &content).unwrap();
        let write_cmd = format!("write {} hello.txt", host_file.display());
        debugfs(test, &["-w", "-R", &write_cmd], &img).unwrap();

        grow_ext4(&img, ByteSize(128 * MIB)).unwrap();

        assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 * MIB);
        let stats = debugfs(test, &["-R", "stats"], &img).unwrap();
        assert_eq!(label_and_size(&stats), ("work".to_string(), 128 * MIB));
        let dumped = dir.path().join("out.txt");
        let dump_cmd = format!("dump /hello.txt {}", dumped.display());
        debugfs(test, &["-R", &dump_cmd], &img).unwrap();
        assert_eq!(std::fs::read(&dumped).unwrap(), content);
    }

    /// Runs an e2fsprogs/util-linux tool, its stdout and stderr joined;
    /// `None` (after a SKIP line) when it is not installed.
    fn tool(test: &str, name: &'static str, args: &[&str], image: &Path) -> Option<(bool, String)> {
        let Ok(bin) = Tools::system().find(name, E2FSPROGS) else {
            eprintln!(
                "SKIPPED {test}: {name} is not installed (apt-get install e2fsprogs util-linux)"
            );
            return None;
        };
        let out = Command::new(bin).args(args).arg(image).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some((out.status.success(), text))
    }

    /// The one file in `dir` (the template).
    fn only_file(dir: &Path) -> PathBuf {
        let names = dir_entries(dir);
        assert_eq!(names.len(), 1, "{names:?}");
        dir.join(&names[0])
    }

    /// `Filesystem UUID:` from `dumpe2fs -h`.
    fn dumpe2fs_uuid(test: &str, img: &Path) -> Option<String> {
        let (ok, text) = tool(test, "dumpe2fs", &["-h"], img)?;
        assert!(ok, "{text}");
        Some(
            text.lines()
                .find_map(|l| l.strip_prefix("Filesystem UUID:"))
                .unwrap_or_else(|| panic!("no UUID in {text}"))
                .trim()
                .to_string(),
        )
    }

    #[test]
    fn cached_disks_are_clean_sparse_labelled_and_each_has_its_own_uuid() {
        let test = "cached_disks_are_clean_sparse_labelled_and_each_has_its_own_uuid";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        let vms = dir.path().join("vms");
        std::fs::create_dir(&vms).unwrap();
        // 1 KiB blocks and four backup superblocks (64M), and 4 KiB blocks
        // with eight groups (1G).
        for size in [64 * MIB, 1 << 30] {
            let (a, b) = (vms.join(format!("a-{size}")), vms.join(format!("b-{size}")));
            let made = cached(&templates, &a, ByteSize(size), "work").unwrap();
            if matches!(made, Ext4Origin::Formatted) {
                eprintln!(
                    "SKIPPED {test}: this mkfs.ext4 cannot make metadata_csum_seed templates"
                );
                return;
            }
            assert!(matches!(
                cached(&templates, &b, ByteSize(size), "work").unwrap(),
                Ext4Origin::Template(_)
            ));
            let mut uuids = Vec::new();
            for img in [&a, &b] {
                assert_eq!(std::fs::metadata(img).unwrap().len(), size);
                let used = allocated_bytes(img).unwrap();
                assert!(used < 8 * MIB, "{} allocates {used} bytes", img.display());
                let Some((clean, text)) = tool(test, "e2fsck", &["-fn"], img) else {
                    return;
                };
                assert!(clean, "e2fsck -fn {}: {text}", img.display());
                let stats = debugfs(test, &["-R", "stats"], img).unwrap();
                assert_eq!(label_and_size(&stats), ("work".to_string(), size));
                let root = debugfs(test, &["-R", "stat /"], img).unwrap();
                assert!(root.contains("User:     0   Group:     0"), "{root}");
                // What the copy wrote, as three readers see it.
                let f = File::open(img).unwrap();
                let written = ext4_super::uuid_string(&ext4_super::uuid_of(&f).unwrap());
                let dumped = dumpe2fs_uuid(test, img).unwrap();
                assert_eq!(dumped, written);
                if size == 64 * MIB {
                    // A backup superblock (group 1 of 1 KiB blocks) says the same.
                    let (ok, text) = tool(
                        test,
                        "dumpe2fs",
                        &["-h", "-o", "superblock=8193", "-o", "blocksize=1024"],
                        img,
                    )
                    .unwrap();
                    assert!(ok, "{text}");
                    assert!(
                        text.contains(&format!("Filesystem UUID:          {written}")),
                        "{text}"
                    );
                }
                if let Some((ok, blkid)) =
                    tool(test, "blkid", &["-p", "-o", "value", "-s", "UUID"], img)
                {
                    assert!(ok, "{blkid}");
                    assert_eq!(blkid.trim(), written);
                }
                uuids.push(written);
            }
            let template = dumpe2fs_uuid(test, &only_template(&templates, size)).unwrap();
            assert_ne!(uuids[0], uuids[1]);
            assert!(!uuids.contains(&template), "{uuids:?} {template}");
        }
    }

    /// The template of `size` in `dir`.
    fn only_template(dir: &Path, size: u64) -> PathBuf {
        let prefix = format!("ext4-{size}-");
        let names: Vec<String> = dir_entries(dir)
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        dir.join(&names[0])
    }

    #[test]
    fn a_damaged_or_wrong_template_is_made_again_not_copied() {
        let test = "a_damaged_or_wrong_template_is_made_again_not_copied";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        let size = ByteSize(64 * MIB);
        let first = dir.path().join("first");
        if cached(&templates, &first, size, "work").unwrap() == Ext4Origin::Formatted {
            eprintln!("SKIPPED {test}: this mkfs.ext4 cannot make metadata_csum_seed templates");
            return;
        }
        let template = only_file(&templates);
        // Each damage makes the template unusable; the next disk must be a
        // clean filesystem all the same, from a template made again.
        type Damage = (&'static str, fn(&Path));
        let damages: [Damage; 4] = [
            ("a flipped byte in the primary superblock's label", |p| {
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(b"X", 1024 + 0x78).unwrap();
            }),
            ("a zeroed magic", |p| {
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&[0, 0], 1024 + 0x38).unwrap();
            }),
            ("a backup superblock overwritten", |p| {
                // 1 KiB blocks, 8192 per group: group 1's copy at block 8193.
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.write_all_at(&[0xAA; 64], 8193 * 1024).unwrap();
            }),
            ("a wrong length", |p| {
                let f = OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(32 * MIB).unwrap();
            }),
        ];
        for (i, (what, damage)) in damages.iter().enumerate() {
            let uuid = |p: &Path| ext4_super::uuid_of(&File::open(p).unwrap()).unwrap();
            let before = uuid(&template);
            damage(&template);
            let disk = dir.path().join(format!("disk-{i}"));
            let made = cached(&templates, &disk, size, "work").unwrap();
            assert!(matches!(made, Ext4Origin::Template(_)), "{what}: {made:?}");
            let Some((clean, text)) = tool(test, "e2fsck", &["-fn"], &disk) else {
                return;
            };
            assert!(clean, "after {what}: e2fsck -fn: {text}");
            assert_eq!(std::fs::metadata(&disk).unwrap().len(), size.0, "{what}");
            // The template was made again (mkfs gave it a new UUID), clean.
            assert_eq!(only_file(&templates), template);
            assert_ne!(uuid(&template), before, "{what}");
            let (clean, text) = tool(test, "e2fsck", &["-fn"], &template).unwrap();
            assert!(clean, "template after {what}: {text}");
        }
    }

    #[test]
    fn a_template_of_another_label_or_size_is_kept_apart() {
        let test = "a_template_of_another_label_or_size_is_kept_apart";
        if !have_e2fsprogs(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("t");
        for (i, (size, label)) in [(64 * MIB, "a"), (64 * MIB, "b"), (128 * MIB, "a")]
            .iter()
            .enumerate()
        {
            let disk = dir.path().join(format!("d{i}"));
            cached(&templates, &disk, ByteSize(*size), label).unwrap();
            let stats = debugfs(test, &["-R", "stats"], &disk).unwrap();
            assert_eq!(label_and_size(&stats), (label.to_string(), *size));
        }
        if dir_entries(&templates).len() != 3 {
            eprintln!("SKIPPED {test}: no templates made (mkfs.ext4 without metadata_csum_seed)");
            assert!(dir_entries(&templates).is_empty());
        }
    }

    #[test]
    fn grow_refuses_to_shrink_and_same_size_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("work.ext4");
        sparse_file(&img, 64 * MIB, &[(1024, pattern(100, 8))]);
        let err = grow_ext4(&img, ByteSize(32 * MIB)).unwrap_err();
        assert!(matches!(err, DiskError::Shrink { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("from 64M to 32M"), "{msg}");
        assert!(msg.contains("at least 64M"), "{msg}");
        grow_ext4(&img, ByteSize(64 * MIB)).unwrap();
        assert_content(&img, 64 * MIB, &[(1024, pattern(100, 8))]);
    }
}
