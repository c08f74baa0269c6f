//! Safe extraction of untrusted tar archives (kernel tarballs, image bundles).
//!
//! Every entry is checked before anything is written: absolute paths, `..`
//! components, device and fifo entries, hard links to anything but an
//! already-extracted regular file, and writes through an already-extracted
//! symlink are refused. Symlinks are created verbatim, then resolved against
//! the finished tree (following links inside it) once the archive is done, so
//! no ordering of entries can smuggle out a link that ends outside `dest`.
//! Files are opened with `O_NOFOLLOW | O_CREAT | O_EXCL`, so nothing is ever
//! written through a link.
//!
//! On error `dest` may hold a partial tree: callers extract into a staging
//! directory and remove it on failure.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

pub use banger_api::config::ExtractLimits;

/// What an extraction wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractReport {
    /// Entries written (files, directories, links).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// A failed extraction. Entry names are shown as stored in the archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The archive stream could not be read (corrupt, truncated, I/O).
    #[error("Cannot read the archive")]
    Read(#[source] io::Error),
    /// An entry path is absolute.
    #[error("Archive entry {entry:?} has an absolute path")]
    AbsolutePath {
        /// The entry.
        entry: String,
    },
    /// An entry path contains `..`.
    #[error("Archive entry {entry:?} contains a `..` component")]
    ParentComponent {
        /// The entry.
        entry: String,
    },
    /// An entry would be written through a symlink the archive created.
    #[error("Archive entry {entry:?} goes through the symlink {link:?}")]
    ThroughSymlink {
        /// The entry.
        entry: String,
        /// The symlink on its path, relative to the destination.
        link: PathBuf,
    },
    /// A symlink resolves outside the destination.
    #[error("Archive symlink {entry:?} points outside the archive (to {target:?})")]
    SymlinkEscapes {
        /// The symlink entry.
        entry: String,
        /// Its target as stored.
        target: PathBuf,
    },
    /// A hard link names something other than an extracted regular file.
    #[error(
        "Archive hard link {entry:?} must name a regular file extracted earlier, not {target:?}"
    )]
    HardlinkInvalid {
        /// The link entry.
        entry: String,
        /// Its target as stored.
        target: PathBuf,
    },
    /// The entry type (device, fifo, sparse, ...) is not allowed.
    #[error("Archive entry {entry:?} has unsupported type {kind}")]
    UnsupportedType {
        /// The entry.
        entry: String,
        /// The tar entry type.
        kind: String,
    },
    /// A path component that must be a directory is something else.
    #[error("Archive entry {entry:?} conflicts with an earlier entry")]
    Conflict {
        /// The entry.
        entry: String,
    },
    /// The archive holds more than [`ExtractLimits::max_entries`].
    #[error("Archive has more than {0} entries")]
    TooManyEntries(u64),
    /// The archive expands beyond [`ExtractLimits::max_total_bytes`].
    #[error("Archive expands to more than {0} bytes")]
    TooLarge(u64),
    /// Writing an entry failed.
    #[error("Cannot write archive entry {entry:?}")]
    Write {
        /// The entry.
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Extracts the tar stream `reader` into the existing directory `dest`.
pub fn extract_tar<R: Read>(
    reader: R,
    dest: &Path,
    limits: &ExtractLimits,
) -> Result<ExtractReport, ArchiveError> {
    let mut archive = tar::Archive::new(reader);
    let mut report = ExtractReport::default();
    let mut symlinks: Vec<(String, Vec<OsString>, PathBuf)> = Vec::new();
    for entry in archive.entries().map_err(ArchiveError::Read)? {
        let mut entry = entry.map_err(ArchiveError::Read)?;
        report.entries += 1;
        if report.entries > limits.max_entries {
            return Err(ArchiveError::TooManyEntries(limits.max_entries));
        }
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = relative_components(
            Path::new(&*entry.path().map_err(ArchiveError::Read)?),
            &name,
        )?;
        let kind = entry.header().entry_type();
        let write_err = |source| ArchiveError::Write {
            entry: name.clone(),
            source,
        };
        if rel.is_empty() {
            // "./" itself: the destination already exists.
            if kind.is_dir() {
                continue;
            }
            return Err(ArchiveError::Conflict { entry: name });
        }
        let (leaf, parents) = rel.split_last().ok_or(ArchiveError::Conflict {
            entry: name.clone(),
        })?;
        let parent = ensure_parents(dest, parents, &name)?;
        let path = parent.join(leaf);
        match kind {
            tar::EntryType::Directory => match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(ArchiveError::Conflict { entry: name }),
                Err(_) => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .map_err(write_err)?,
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size().map_err(ArchiveError::Read)?;
                report.bytes = report.bytes.saturating_add(size);
                if report.bytes > limits.max_total_bytes {
                    return Err(ArchiveError::TooLarge(limits.max_total_bytes));
                }
                remove_non_dir(&path, &name)?;
                // Keep rwx bits only: no setuid/setgid/sticky from an archive.
                let mode = entry.header().mode().map_err(ArchiveError::Read)? & 0o777;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode | 0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(write_err)?;
                copy_entry(&mut entry, &mut file).map_err(|e| match e {
                    CopyError::Read(e) => ArchiveError::Read(e),
                    CopyError::Write(source) => ArchiveError::Write {
                        entry: name.clone(),
                        source,
                    },
                })?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_absolute() || target.as_os_str().is_empty() {
                    return Err(ArchiveError::SymlinkEscapes {
                        entry: name,
                        target,
                    });
                }
                remove_non_dir(&path, &name)?;
                std::os::unix::fs::symlink(&target, &path).map_err(write_err)?;
                symlinks.push((name, parents.to_vec(), target));
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ArchiveError::Read)?
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let invalid = || ArchiveError::HardlinkInvalid {
                    entry: name.clone(),
                    target: target.clone(),
                };
                let target_rel = relative_components(&target, &name).map_err(|_| invalid())?;
                let (t_leaf, t_parents) = target_rel.split_last().ok_or_else(invalid)?;
                let t_path = ensure_existing_parents(dest, t_parents)
                    .ok_or_else(invalid)?
                    .join(t_leaf);
                match fs::symlink_metadata(&t_path) {
                    Ok(m) if m.is_file() => {}
                    _ => return Err(invalid()),
                }
                remove_non_dir(&path, &name)?;
                fs::hard_link(&t_path, &path).map_err(write_err)?;
            }
            // Headers the tar crate already folded into the next entry.
            tar::EntryType::XGlobalHeader => {}
            other => {
                return Err(ArchiveError::UnsupportedType {
                    entry: name,
                    kind: format!("{other:?}"),
                });
            }
        }
    }
    for (entry, parents, target) in symlinks {
        if resolves_outside(dest, parents, &target) {
            return Err(ArchiveError::SymlinkEscapes { entry, target });
        }
    }
    Ok(report)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy`, but telling a bad archive from a full disk.
fn copy_entry(from: &mut impl Read, to: &mut impl Write) -> Result<(), CopyError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
}

/// The normal components of an entry path, refusing absolute paths and `..`.
fn relative_components(path: &Path, name: &str) -> Result<Vec<OsString>, ArchiveError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(ArchiveError::ParentComponent {
                    entry: name.to_owned(),
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(ArchiveError::AbsolutePath {
                    entry: name.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// Creates the parent directories of an entry one component at a time,
/// refusing to pass through a symlink or a file.
fn ensure_parents(dest: &Path, parents: &[OsString], name: &str) -> Result<PathBuf, ArchiveError> {
    let mut dir = dest.to_path_buf();
    for (i, c) in parents.iter().enumerate() {
        dir.push(c);
        match fs::symlink_metadata(&dir) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(ArchiveError::ThroughSymlink {
                    entry: name.to_owned(),
                    link: parents[..=i].iter().collect(),
                });
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ArchiveError::Conflict {
                    entry: name.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&dir)
                    .map_err(|source| ArchiveError::Write {
                        entry: name.to_owned(),
                        source,
                    })?;
            }
            Err(source) => {
                return Err(ArchiveError::Write {
                    entry: name.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(dir)
}

/// The directory `parents` under `dest` if every component is a real directory.
fn ensure_existing_parents(dest: &Path, parents: &[OsString]) -> Option<PathBuf> {
    let mut dir = dest.to_path_buf();
    for c in parents {
        dir.push(c);
        let m = fs::symlink_metadata(&dir).ok()?;
        if !m.is_dir() {
            return None;
        }
    }
    Some(dir)
}

/// Removes an earlier entry at `path` (later tar entries win), unless it is a
/// directory, which a non-directory entry may not replace.
fn remove_non_dir(path: &Path, name: &str) -> Result<(), ArchiveError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(ArchiveError::Conflict {
            entry: name.to_owned(),
        }),
        Ok(_) => fs::remove_file(path).map_err(|source| ArchiveError::Write {
            entry: name.to_owned(),
            source,
        }),
        Err(_) => Ok(()),
    }
}

/// Whether a symlink in directory `parents` (relative to `dest`) with
/// `target` ends outside `dest`, following links inside the finished tree
/// the way the kernel would. Loops count as escaping.
fn resolves_outside(dest: &Path, parents: Vec<OsString>, target: &Path) -> bool {
    const MAX_LINKS: u32 = 40;
    let mut at = parents;
    let mut followed = 0;
    // Owned components, so a followed link's target can be spliced in front.
    let Some(mut pending) = link_components(target) else {
        return true;
    };
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            if at.pop().is_none() {
                return true;
            }
            continue;
        }
        at.push(c);
        let here: PathBuf = dest.join(at.iter().collect::<PathBuf>());
        let Ok(m) = fs::symlink_metadata(&here) else {
            continue;
        };
        if !m.file_type().is_symlink() {
            continue;
        }
        followed += 1;
        if followed > MAX_LINKS {
            return true;
        }
        let Ok(next) = fs::read_link(&here) else {
            return true;
        };
        at.pop();
        let Some(mut spliced) = link_components(&next) else {
            return true;
        };
        spliced.extend(pending);
        pending = spliced;
    }
    false
}

/// A link target as owned components (`..` kept), or `None` if absolute.
fn link_components(target: &Path) -> Option<VecDeque<OsString>> {
    let mut out = VecDeque::new();
    for c in target.components() {
        match c {
            Component::Normal(n) => out.push_back(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => out.push_back(OsString::from("..")),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw tar header with `name` written byte for byte, bypassing the
    /// tar crate's own path checks so hostile archives can be built.
    fn header(name: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            let l = &mut h.as_old_mut().linkname;
            l[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        h
    }

    enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Sym(&'a str, &'a str),
        Hard(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn tarball(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                E::File(n, data) => {
                    let h = header(n, tar::EntryType::Regular, data.len() as u64, None);
                    b.append(&h, *data).unwrap();
                }
                E::Dir(n) => {
                    let h = header(n, tar::EntryType::Directory, 0, None);
                    b.append(&h, io::empty()).unwrap();
                }
                E::Sym(n, t) => {
                    let h = header(n, tar::EntryType::Symlink, 0, Some(t));
                    b.append(&h, io::empty()).unwrap();
                }
                E::Hard(n, t) => {
                    let h = header(n, tar::EntryType::Link, 0, Some(t));
                    b.append(&h, io::empty()).unwrap();
                }
                E::Fifo(n) => {
                    let h = header(n, tar::EntryType::Fifo, 0, None);
                    b.append(&h, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn extract(entries: &[E<'_>]) -> (tempfile::TempDir, Result<ExtractReport, ArchiveError>) {
        let outer = tempfile::tempdir().unwrap();
        let dest = outer.path().join("dest");
        fs::create_dir(&dest).unwrap();
        let r = extract_tar(&tarball(entries)[..], &dest, &ExtractLimits::default());
        (outer, r)
    }

    #[test]
    fn extracts_files_dirs_and_inner_links() {
        let (dir, r) = extract(&[
            E::Dir("./"),
            E::File("./vmlinux", b"kernel"),
            E::Dir("lib/modules/6.1"),
            E::File("lib/modules/6.1/a.ko", b"mod"),
            E::Sym("lib/modules/6.1/alias", "a.ko"),
            E::Sym("lib/up", "../vmlinux"),
            E::Hard("copy", "vmlinux"),
        ]);
        let report = r.unwrap();
        assert_eq!(report.bytes, 9);
        let d = dir.path().join("dest");
        assert_eq!(fs::read(d.join("vmlinux")).unwrap(), b"kernel");
        assert_eq!(fs::read(d.join("lib/modules/6.1/alias")).unwrap(), b"mod");
        assert_eq!(fs::read(d.join("lib/up")).unwrap(), b"kernel");
        assert_eq!(fs::read(d.join("copy")).unwrap(), b"kernel");
    }

    #[test]
    fn rejects_tar_entry_escaping_root() {
        let (dir, r) = extract(&[E::File("../evil", b"x")]);
        assert!(
            matches!(&r, Err(ArchiveError::ParentComponent { entry }) if entry == "../evil"),
            "{r:?}"
        );
        assert!(!dir.path().join("evil").exists());
        let (_d, r) = extract(&[E::File("a/../../evil", b"x")]);
        assert!(
            matches!(r, Err(ArchiveError::ParentComponent { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn rejects_absolute_entry_path() {
        let (_d, r) = extract(&[E::File("/tmp/banger-evil", b"x")]);
        assert!(
            matches!(&r, Err(ArchiveError::AbsolutePath { entry }) if entry == "/tmp/banger-evil"),
            "{r:?}"
        );
        assert!(!Path::new("/tmp/banger-evil").exists());
    }

    #[test]
    fn rejects_symlink_pointing_outside() {
        let (_d, r) = extract(&[E::Sym("etc", "/etc")]);
        assert!(
            matches!(r, Err(ArchiveError::SymlinkEscapes { .. })),
            "{r:?}"
        );
        let (_d, r) = extract(&[E::Sym("a/up", "../../outside")]);
        assert!(
            matches!(&r, Err(ArchiveError::SymlinkEscapes { entry, .. }) if entry == "a/up"),
            "{r:?}"
        );
    }

    #[test]
    fn rejects_symlink_escaping_through_another_link_in_any_order() {
        // `e -> d/..` looks harmless until `d -> .` makes it the parent of dest.
        let (_d, r) = extract(&[E::Sym("e", "d/.."), E::Sym("d", ".")]);
        assert!(
            matches!(&r, Err(ArchiveError::SymlinkEscapes { entry, .. }) if entry == "e"),
            "{r:?}"
        );
    }

    #[test]
    fn rejects_symlink_loops() {
        let (_d, r) = extract(&[E::Sym("a", "b"), E::Sym("b", "a")]);
        assert!(
            matches!(r, Err(ArchiveError::SymlinkEscapes { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn rejects_entry_through_extracted_symlink() {
        let outer = tempfile::tempdir().unwrap();
        let (_d, r) = extract(&[
            E::Sym("link", outer.path().to_str().unwrap()),
            E::File("link/owned", b"x"),
        ]);
        // The absolute link is refused before anything goes through it.
        assert!(
            matches!(r, Err(ArchiveError::SymlinkEscapes { .. })),
            "{r:?}"
        );
        let (_d, r) = extract(&[
            E::Dir("real"),
            E::Sym("link", "real"),
            E::File("link/f", b"x"),
        ]);
        assert!(
            matches!(&r, Err(ArchiveError::ThroughSymlink { entry, link }) if entry == "link/f" && link == Path::new("link")),
            "{r:?}"
        );
    }

    #[test]
    fn never_writes_through_a_symlink_leaf() {
        let outer = tempfile::tempdir().unwrap();
        let victim = outer.path().join("victim");
        fs::write(&victim, b"safe").unwrap();
        let dest = outer.path().join("dest");
        fs::create_dir(&dest).unwrap();
        std::os::unix::fs::symlink(&victim, dest.join("f")).unwrap();
        let data = tarball(&[E::File("f", b"owned")]);
        extract_tar(&data[..], &dest, &ExtractLimits::default()).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"safe");
        assert_eq!(fs::read(dest.join("f")).unwrap(), b"owned");
    }

    #[test]
    fn rejects_hardlink_outside_or_to_missing_file() {
        let (_d, r) = extract(&[E::Hard("h", "/etc/passwd")]);
        assert!(
            matches!(r, Err(ArchiveError::HardlinkInvalid { .. })),
            "{r:?}"
        );
        let (_d, r) = extract(&[E::Hard("h", "../x")]);
        assert!(
            matches!(r, Err(ArchiveError::HardlinkInvalid { .. })),
            "{r:?}"
        );
        let (_d, r) = extract(&[E::Hard("h", "missing")]);
        assert!(
            matches!(r, Err(ArchiveError::HardlinkInvalid { .. })),
            "{r:?}"
        );
    }

    #[test]
    fn rejects_device_and_fifo_entries() {
        let (d, r) = extract(&[E::Fifo("pipe")]);
        assert!(
            matches!(&r, Err(ArchiveError::UnsupportedType { entry, .. }) if entry == "pipe"),
            "{r:?}"
        );
        assert!(!d.path().join("dest/pipe").exists());
    }

    #[test]
    fn enforces_size_and_entry_limits() {
        let dir = tempfile::tempdir().unwrap();
        let data = tarball(&[E::File("a", b"12345"), E::File("b", b"12345")]);
        let small = ExtractLimits {
            max_total_bytes: 8,
            max_entries: 100,
            ..ExtractLimits::default()
        };
        let r = extract_tar(&data[..], dir.path(), &small);
        assert!(matches!(r, Err(ArchiveError::TooLarge(8))), "{r:?}");
        let few = ExtractLimits {
            max_total_bytes: 100,
            max_entries: 1,
            ..ExtractLimits::default()
        };
        let r = extract_tar(&data[..], dir.path(), &few);
        assert!(matches!(r, Err(ArchiveError::TooManyEntries(1))), "{r:?}");
    }

    #[test]
    fn rejects_truncated_archive() {
        let data = tarball(&[E::File("a", &[7u8; 4000])]);
        let dir = tempfile::tempdir().unwrap();
        let r = extract_tar(&data[..1500], dir.path(), &ExtractLimits::default());
        assert!(matches!(r, Err(ArchiveError::Read(_))), "{r:?}");
    }
}
