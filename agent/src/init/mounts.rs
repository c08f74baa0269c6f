//! Mounting: the kernel filesystems, the root drive, `guest.mounts`, and
//! the switch into the new root (what busybox `switch_root` does).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use banger_guest_protocol::bundle::GuestMount;
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

use super::files;

/// Filesystems tried, in order, for the root drive.
const ROOT_FSTYPES: &[&str] = &["ext4", "xfs", "btrfs"];

/// A mount step failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The mount point could not be created.
    #[error("Cannot create mount point {0}")]
    CreateMountPoint(PathBuf, #[source] std::io::Error),
    /// The mount point path is unusable.
    #[error("Bad mount point")]
    MountPoint(#[source] files::FileError),
    /// mount(2) failed.
    #[error("Cannot mount {0} ({1}) on {2}")]
    Mount(String, String, PathBuf, #[source] Errno),
    /// Moving a mount failed.
    #[error("Cannot move mount {0} to {1}")]
    Move(PathBuf, PathBuf, #[source] Errno),
    /// Entering the new root failed.
    #[error("Cannot switch root to {0}")]
    SwitchRoot(PathBuf, #[source] std::io::Error),
}

/// The kernel filesystems every step after needs, under `root`.
pub const KERNEL_FS: &[(&str, &str, &str)] = &[
    ("proc", "proc", "proc"),
    ("sysfs", "sys", "sysfs"),
    ("devtmpfs", "dev", "devtmpfs"),
    ("tmpfs", "run", "tmpfs"),
];

/// Mounts /proc, /sys, /dev and /run under `root`; ones already mounted
/// (EBUSY) count as done.
pub fn mount_kernel_fs(root: &Path) -> Vec<MountError> {
    let mut errors = Vec::new();
    for (source, dir, fstype) in KERNEL_FS {
        let target = root.join(dir);
        if let Err(e) = do_mount(source, &target, fstype, MsFlags::MS_NOSUID, None) {
            if !matches!(e, MountError::Mount(.., Errno::EBUSY)) {
                errors.push(e);
            }
        }
    }
    errors
}

/// Mounts the root drive `device` at `target`, trying common filesystems.
/// On failure reports the first (ext4) error: the later ones mostly say the
/// kernel lacks that filesystem, which hides the real cause.
pub fn mount_root(device: &str, target: &Path) -> Result<(), MountError> {
    let mut first = None;
    for fstype in ROOT_FSTYPES {
        match do_mount(device, target, fstype, MsFlags::empty(), None) {
            Ok(()) => return Ok(()),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(first.unwrap_or_else(|| {
        MountError::Mount(device.into(), "?".into(), target.into(), Errno::EINVAL)
    }))
}

/// Mounts one `guest.mounts` entry from `device` under `root`.
pub fn mount_guest(root: &Path, device: &str, m: &GuestMount) -> Result<(), MountError> {
    let target = files::under(root, &m.mount_point).map_err(MountError::MountPoint)?;
    let flags = if m.read_only {
        MsFlags::MS_RDONLY
    } else {
        MsFlags::empty()
    };
    do_mount(device, &target, &m.fstype, flags, None)
}

fn do_mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), MountError> {
    fs::create_dir_all(target).map_err(|e| MountError::CreateMountPoint(target.into(), e))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| MountError::Mount(source.into(), fstype.into(), target.into(), e))
}

/// Moves the kernel filesystems into `new_root`, deletes the initramfs
/// contents (files on the same device as `/`, skipping `new_root`), makes
/// `new_root` the root and chroots into it.
pub fn switch_root(new_root: &Path) -> Result<(), MountError> {
    for (_, dir, _) in KERNEL_FS {
        let from = Path::new("/").join(dir);
        let to = new_root.join(dir);
        fs::create_dir_all(&to).map_err(|e| MountError::CreateMountPoint(to.clone(), e))?;
        mount(
            Some(&from),
            &to,
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| MountError::Move(from.clone(), to.clone(), e))?;
    }
    // Only ever on the initramfs itself: never delete a real root.
    if std::process::id() == 1 && on_initramfs() {
        if let Ok(meta) = fs::metadata("/") {
            delete_same_device(Path::new("/"), meta.dev(), new_root);
        }
    }
    std::env::set_current_dir(new_root).map_err(|e| MountError::SwitchRoot(new_root.into(), e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| MountError::Move(new_root.into(), "/".into(), e))?;
    std::os::unix::fs::chroot(".").map_err(|e| MountError::SwitchRoot(new_root.into(), e))?;
    std::env::set_current_dir("/").map_err(|e| MountError::SwitchRoot(new_root.into(), e))
}

/// Whether `/` is the initramfs (ramfs or tmpfs).
fn on_initramfs() -> bool {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    // nix has no constant for ramfs.
    let ramfs = FsType(0x8584_58f6);
    statfs("/").is_ok_and(|s| {
        let t = s.filesystem_type();
        t == ramfs || t == TMPFS_MAGIC
    })
}

/// Frees the initramfs memory: removes everything under `dir` that lives on
/// device `dev`, never crossing into other mounts or `keep`. Best effort.
fn delete_same_device(dir: &Path, dev: u64, keep: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if path == keep || meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            delete_same_device(&path, dev, keep);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}
