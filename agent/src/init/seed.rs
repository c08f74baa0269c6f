//! Seeding a new writable disk from the image, and root's home directory
//! permissions.
//!
//! A writable `guest.mounts` disk whose filesystem holds nothing (or only
//! `lost+found`) is new: before anything else writes to it, it gets a copy
//! of what the image has at its mount point, as a container volume does.
//! For the work disk that is the image's `/root` (dotfiles, shell setup).
//! The image's directory is read through a non-recursive bind mount of the
//! root drive, which shows what the new mount now covers.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Where the root drive is bind-mounted (in the initramfs) while seeding.
pub const LOWER: &str = "/banger-lower";

/// Root's home: reset to [`HOME_MODE`] and owned by root at every mount,
/// because sshd's `StrictModes` refuses keys under a group- or
/// world-writable home.
pub const ROOT_HOME: &str = "/root";
/// The mode of `/root` after every mount.
pub const HOME_MODE: u32 = 0o755;

/// Seeding failed; the disk is left as far as the copy got.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The new filesystem's root could not be listed.
    #[error("Cannot list {0}")]
    List(PathBuf, #[source] std::io::Error),
    /// The bind mount of the root drive failed.
    #[error("Cannot bind the root drive at {0} to read the image's files")]
    Bind(PathBuf, #[source] nix::errno::Errno),
    /// One entry could not be copied.
    #[error("Cannot copy {0} to {1}")]
    Copy(PathBuf, PathBuf, #[source] std::io::Error),
    /// chown/chmod of root's home failed.
    #[error("Cannot set {0} to 0755 root:root")]
    Home(PathBuf, #[source] std::io::Error),
}

/// What a copy did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    /// Files, directories and symlinks copied.
    pub entries: usize,
    /// Sockets, FIFOs and devices, which are not copied.
    pub skipped: usize,
}

/// Whether the filesystem mounted at `dir` is new: nothing in it but
/// `lost+found`.
pub fn is_fresh(dir: &Path) -> Result<bool, SeedError> {
    let entries = fs::read_dir(dir).map_err(|e| SeedError::List(dir.into(), e))?;
    for e in entries {
        let e = e.map_err(|e| SeedError::List(dir.into(), e))?;
        if e.file_name() != "lost+found" {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Seeds the disk just mounted at `mount_point` (absolute, in the guest)
/// under `new_root` from the image's directory there, if the disk is new
/// and the image has that directory; the root drive is bind-mounted at
/// `lower` (an unused path outside `new_root`) meanwhile. Returns what was
/// copied, or `None` when there was nothing to do.
pub fn seed_new_mount(
    new_root: &Path,
    mount_point: &Path,
    lower: &Path,
) -> Result<Option<Copied>, SeedError> {
    let rel = mount_point.strip_prefix("/").unwrap_or(mount_point);
    let target = new_root.join(rel);
    if !is_fresh(&target)? {
        return Ok(None);
    }
    fs::create_dir_all(lower).map_err(|e| SeedError::Copy(new_root.into(), lower.into(), e))?;
    // Not MS_REC: the bind shows the root drive alone, so the image's
    // directory under the mount just made.
    mount(
        Some(new_root),
        lower,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| SeedError::Bind(lower.into(), e))?;
    let source = lower.join(rel);
    let result = match fs::symlink_metadata(&source) {
        Ok(meta) if meta.is_dir() => copy_dir_contents(&source, &target).and_then(|copied| {
            copy_owner_and_mode(&meta, &target)
                .map_err(|e| SeedError::Copy(source.clone(), target.clone(), e))?;
            Ok(Some(copied))
        }),
        _ => Ok(None),
    };
    let _ = umount2(lower, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(lower);
    result
}

/// Copies everything in `from` into the existing directory `to`, keeping
/// owners, permission bits (setuid included) and symlinks as they are.
/// Hard links become separate copies; sockets, FIFOs and devices are
/// skipped.
pub fn copy_dir_contents(from: &Path, to: &Path) -> Result<Copied, SeedError> {
    let mut copied = Copied::default();
    let entries = fs::read_dir(from).map_err(|e| SeedError::List(from.into(), e))?;
    for e in entries {
        let e = e.map_err(|e| SeedError::List(from.into(), e))?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        let fail = |err: std::io::Error| SeedError::Copy(src.clone(), dst.clone(), err);
        let meta = fs::symlink_metadata(&src).map_err(fail)?;
        let kind = meta.file_type();
        if kind.is_dir() {
            fs::create_dir(&dst).map_err(fail)?;
            let inner = copy_dir_contents(&src, &dst)?;
            copied.entries += inner.entries;
            copied.skipped += inner.skipped;
            copy_owner_and_mode(&meta, &dst).map_err(fail)?;
        } else if kind.is_symlink() {
            let link = fs::read_link(&src).map_err(fail)?;
            symlink(&link, &dst).map_err(fail)?;
            lchown(&dst, Some(meta.uid()), Some(meta.gid())).map_err(fail)?;
        } else if kind.is_file() {
            fs::copy(&src, &dst).map_err(fail)?;
            copy_owner_and_mode(&meta, &dst).map_err(fail)?;
        } else {
            copied.skipped += 1;
            continue;
        }
        copied.entries += 1;
    }
    Ok(copied)
}

/// Gives `path` the owner and permission bits of `meta`; the mode goes
/// after chown, which clears setuid and setgid.
fn copy_owner_and_mode(meta: &fs::Metadata, path: &Path) -> std::io::Result<()> {
    lchown(path, Some(meta.uid()), Some(meta.gid()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))
}

/// Makes `dir` (root's home) `0755 root:root`.
pub fn normalise_home(dir: &Path) -> Result<(), SeedError> {
    lchown(dir, Some(0), Some(0)).map_err(|e| SeedError::Home(dir.into(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(HOME_MODE))
        .map_err(|e| SeedError::Home(dir.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn only_an_empty_filesystem_or_a_bare_lost_and_found_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        assert!(is_fresh(dir.path()).unwrap());
        fs::create_dir(dir.path().join("lost+found")).unwrap();
        assert!(is_fresh(dir.path()).unwrap());
        fs::write(dir.path().join(".bashrc"), "x").unwrap();
        assert!(!is_fresh(dir.path()).unwrap());
        let err = is_fresh(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn copies_files_dirs_and_links_with_owners_and_modes_and_skips_fifos() {
        let img = tempfile::tempdir().unwrap();
        let disk = tempfile::tempdir().unwrap();
        let p = img.path();
        fs::write(p.join(".bashrc"), "PS1='guest$ '\n").unwrap();
        fs::set_permissions(p.join(".bashrc"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir_all(p.join(".config/tool")).unwrap();
        fs::write(p.join(".config/tool/conf"), "k=v\n").unwrap();
        fs::set_permissions(
            p.join(".config/tool/conf"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        fs::set_permissions(p.join(".config"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(p.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(p.join("run.sh"), fs::Permissions::from_mode(0o4755)).unwrap();
        symlink(".bashrc", p.join(".profile")).unwrap();
        symlink("/nonexistent/target", p.join("dangling")).unwrap();
        nix::unistd::mkfifo(
            &p.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let owner = if is_root() {
            (1234, 2345)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        lchown(p.join(".config/tool/conf"), Some(owner.0), Some(owner.1)).unwrap();

        let copied = copy_dir_contents(p, disk.path()).unwrap();
        assert_eq!(
            copied,
            Copied {
                entries: 7,
                skipped: 1
            }
        );
        let d = disk.path();
        assert_eq!(
            fs::read_to_string(d.join(".bashrc")).unwrap(),
            "PS1='guest$ '\n"
        );
        let mode = |rel: &str| fs::symlink_metadata(d.join(rel)).unwrap().mode() & 0o7777;
        assert_eq!(mode(".bashrc"), 0o644);
        assert_eq!(mode(".config"), 0o700);
        assert_eq!(mode(".config/tool/conf"), 0o600);
        assert_eq!(mode("run.sh"), 0o4755);
        let conf = fs::metadata(d.join(".config/tool/conf")).unwrap();
        assert_eq!((conf.uid(), conf.gid()), owner);
        assert_eq!(
            fs::read_link(d.join(".profile")).unwrap(),
            Path::new(".bashrc")
        );
        assert_eq!(
            fs::read_link(d.join("dangling")).unwrap(),
            Path::new("/nonexistent/target")
        );
        assert!(fs::symlink_metadata(d.join("fifo")).is_err());
    }

    #[test]
    fn a_copy_over_an_existing_name_fails_naming_both_paths() {
        let img = tempfile::tempdir().unwrap();
        let disk = tempfile::tempdir().unwrap();
        fs::create_dir(img.path().join("d")).unwrap();
        fs::write(disk.path().join("d"), "a file in the way").unwrap();
        let err = copy_dir_contents(img.path(), disk.path()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&img.path().join("d").display().to_string())
                && msg.contains(&disk.path().join("d").display().to_string()),
            "{msg}"
        );
    }

    /// The real sequence: a root drive with `/root/.bashrc`, a fresh
    /// filesystem (tmpfs) mounted over its `/root`, then the seed, in a
    /// mount namespace of this test's thread.
    #[test]
    fn a_fresh_mount_gets_the_images_files_and_a_used_one_is_left_alone() {
        use nix::sched::{CloneFlags, unshare};
        if !is_root() {
            eprintln!(
                "SKIP a_fresh_mount_gets_the_images_files_and_a_used_one_is_left_alone: needs root to mount"
            );
            return;
        }
        unshare(CloneFlags::CLONE_NEWNS).unwrap();
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (new_root, lower) = (dir.path().join("newroot"), dir.path().join("lower"));
        fs::create_dir_all(new_root.join("root/.config")).unwrap();
        fs::write(new_root.join("root/.bashrc"), "alias ll='ls -l'\n").unwrap();
        fs::write(new_root.join("root/.config/app"), "x\n").unwrap();
        fs::set_permissions(new_root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
        let work = new_root.join("root");
        mount(
            Some("tmpfs"),
            &work,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0777"),
        )
        .unwrap();
        fs::create_dir(work.join("lost+found")).unwrap();

        let copied = seed_new_mount(&new_root, Path::new("/root"), &lower)
            .unwrap()
            .unwrap();
        assert_eq!(copied.entries, 3);
        assert_eq!(
            fs::read_to_string(work.join(".bashrc")).unwrap(),
            "alias ll='ls -l'\n"
        );
        assert_eq!(fs::read_to_string(work.join(".config/app")).unwrap(), "x\n");
        // The mount point takes the image directory's mode.
        assert_eq!(fs::metadata(&work).unwrap().mode() & 0o7777, 0o700);
        assert!(!lower.exists(), "the bind mount was not cleaned up");

        // Used now: a second boot copies nothing and keeps the user's edit.
        fs::write(work.join(".bashrc"), "mine\n").unwrap();
        assert_eq!(
            seed_new_mount(&new_root, Path::new("/root"), &lower).unwrap(),
            None
        );
        assert_eq!(fs::read_to_string(work.join(".bashrc")).unwrap(), "mine\n");
        umount2(&work, MntFlags::MNT_DETACH).unwrap();
    }

    #[test]
    fn root_home_is_reset_to_0755_root() {
        if !is_root() {
            eprintln!("SKIP root_home_is_reset_to_0755_root: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("root");
        fs::create_dir(&home).unwrap();
        lchown(&home, Some(1000), Some(1000)).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(0o777)).unwrap();
        normalise_home(&home).unwrap();
        let meta = fs::metadata(&home).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o755, 0, 0)
        );
    }
}
