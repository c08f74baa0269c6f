//! Layers → one directory tree → ext4, without root.
//!
//! Layers are applied in order into a staging tree. Every path is resolved
//! inside the tree the way `openat2(RESOLVE_IN_ROOT)` would: a symlink met
//! on the way (absolute or relative) is followed *within* the tree, `..` in
//! a link target stops at the tree's root, and `..` in an entry name is
//! refused. The final component is never followed: an entry replaces what is
//! there. Only this process writes the staging tree, so resolving and then
//! writing is not racy.
//!
//! Ownership, modes (setuid/setgid/sticky) and device nodes cannot be put on
//! disk by an unprivileged process, so they go into a side table keyed by
//! path; files on disk get owner-writable modes. `mkfs.ext4 -d` copies the
//! tree and one `debugfs -w -f` run then applies the table (and creates the
//! device nodes); a sample is read back to verify. Nothing here calls chown.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use super::{ImageError, PullEvent};
use crate::archive::ExtractLimits;
use banger_api::model::ByteSize;

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const MAX_SYMLINKS: u32 = 40;
/// A compressed layer may always expand to this much, whatever its ratio, so
/// small layers of empty files are not refused.
const RATIO_FLOOR: u64 = 16 * MIB;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A cached layer blob to apply.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub(crate) digest: String,
    pub(crate) compression: Compression,
    pub(crate) path: PathBuf,
}

/// The outcome of [`build`].
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub(crate) tree_bytes: u64,
    pub(crate) size: ByteSize,
}

/// Owner, group and full `st_mode` (type bits included) of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    /// Modification time (seconds since the epoch) from the tar header.
    mtime: u64,
    /// Device numbers for char/block nodes, which exist only in the table.
    rdev: Option<(u32, u32)>,
}

/// The staging tree and its side table.
#[derive(Debug)]
struct Tree {
    root: PathBuf,
    meta: BTreeMap<PathBuf, Meta>,
    /// Paths written by the layer being applied (whiteouts hide only lower
    /// layers).
    this_layer: HashSet<PathBuf>,
    /// Bounds on all layers applied to this tree.
    limits: ExtractLimits,
    /// Entries read so far, all layers.
    entries: u64,
    /// Uncompressed (tar stream) bytes read so far, all layers.
    bytes: u64,
}

/// Which bound a layer's decoded stream crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crossed {
    TotalBytes,
    Ratio,
}

/// Counts a layer's decoded bytes and fails the read once they pass `cap`
/// (the pull's remaining byte budget) or `ratio_cap`, recording which.
struct Bounded<R> {
    inner: R,
    read: Rc<Cell<u64>>,
    cap: u64,
    ratio_cap: u64,
    crossed: Rc<Cell<Option<Crossed>>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.read.get().saturating_add(n as u64);
        self.read.set(total);
        let crossed = if total > self.cap {
            Some(Crossed::TotalBytes)
        } else if total > self.ratio_cap {
            Some(Crossed::Ratio)
        } else {
            None
        };
        if let Some(c) = crossed {
            self.crossed.set(Some(c));
            return Err(io::Error::other("layer limit exceeded"));
        }
        Ok(n)
    }
}

/// Applies `layers` into a fresh tree at `tree`, then builds `image`.
pub(crate) fn build(
    tree: &Path,
    layers: &[Layer],
    image: &Path,
    size: Option<ByteSize>,
    limits: &ExtractLimits,
    progress: &mut dyn FnMut(PullEvent),
) -> Result<Built, ImageError> {
    let mut t = Tree::create(tree)?;
    t.limits = *limits;
    for layer in layers {
        progress(PullEvent::Applying {
            digest: layer.digest.clone(),
        });
        t.apply_layer(layer)?;
    }
    let tree_bytes = t.tree_bytes()?;
    let size = choose_size(size, tree_bytes)?;
    progress(PullEvent::BuildingFilesystem { size });
    t.build_ext4(image, size)?;
    Ok(Built { tree_bytes, size })
}

/// Removes a file or directory tree, ignoring absence.
pub(crate) fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn choose_size(given: Option<ByteSize>, tree_bytes: u64) -> Result<ByteSize, ImageError> {
    let round = |b: u64| b.div_ceil(MIB) * MIB;
    let needed = round(tree_bytes + tree_bytes / 10 + 16 * MIB);
    match given {
        Some(s) if s.0 < needed => Err(ImageError::SizeTooSmall {
            given: s,
            tree_bytes,
            needed: ByteSize(needed),
        }),
        Some(s) => Ok(ByteSize(round(s.0))),
        None => Ok(ByteSize(round((tree_bytes + tree_bytes / 4).max(GIB)))),
    }
}

/// Reads a blob while hashing it, so applying a layer also verifies it.
struct HashingReader {
    inner: File,
    hasher: Sha256,
}

impl Read for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// An entry name split into plain components; `..` is refused.
fn clean(p: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("`..` escapes the image root".to_string()),
            Component::Prefix(_) => return Err("unsupported path prefix".to_string()),
        }
    }
    Ok(out)
}

fn join(parts: &[OsString]) -> PathBuf {
    parts.iter().collect()
}

impl Tree {
    fn create(root: &Path) -> Result<Self, ImageError> {
        std::fs::create_dir(root).map_err(|source| ImageError::Write {
            path: root.to_path_buf(),
            source,
        })?;
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
        let mut meta = BTreeMap::new();
        meta.insert(PathBuf::new(), dir_meta(0o755));
        Ok(Tree {
            root: root.to_path_buf(),
            meta,
            this_layer: HashSet::new(),
            limits: ExtractLimits::OCI_PULL,
            entries: 0,
            bytes: 0,
        })
    }

    fn apply_layer(&mut self, layer: &Layer) -> Result<(), ImageError> {
        let read_err = |source| ImageError::ReadLayer {
            digest: layer.digest.clone(),
            source,
        };
        let file = File::open(&layer.path).map_err(read_err)?;
        let compressed = file.metadata().map_err(read_err)?.len();
        let mut hashing = HashingReader {
            inner: file,
            hasher: Sha256::new(),
        };
        self.this_layer.clear();
        let read = Rc::new(Cell::new(0u64));
        let crossed = Rc::new(Cell::new(None));
        let limits = self.limits;
        {
            let decoded: Box<dyn Read + '_> = match layer.compression {
                Compression::None => Box::new(&mut hashing),
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&mut hashing)),
                Compression::Zstd => {
                    Box::new(zstd::stream::read::Decoder::new(&mut hashing).map_err(read_err)?)
                }
            };
            let ratio_cap = match layer.compression {
                Compression::None => u64::MAX,
                _ => compressed.saturating_mul(limits.max_ratio).max(RATIO_FLOOR),
            };
            let bounded = Bounded {
                inner: decoded,
                read: Rc::clone(&read),
                cap: limits.max_total_bytes.saturating_sub(self.bytes),
                ratio_cap,
                crossed: Rc::clone(&crossed),
            };
            let mut archive = tar::Archive::new(bounded);
            let mut run = || -> Result<(), ImageError> {
                for entry in archive.entries().map_err(read_err)? {
                    let mut entry = entry.map_err(read_err)?;
                    self.entries += 1;
                    if self.entries > limits.max_entries {
                        return Err(ImageError::LayerLimit {
                            digest: layer.digest.clone(),
                            what: format!("entries ({} for all layers)", limits.max_entries),
                            key: "image_layer_max_entries",
                        });
                    }
                    self.apply_entry(&layer.digest, &mut entry)?;
                }
                Ok(())
            };
            let res = run();
            let limit = match crossed.get() {
                Some(Crossed::TotalBytes) => Some(ImageError::LayerLimit {
                    digest: layer.digest.clone(),
                    what: format!(
                        "uncompressed bytes ({} for all layers)",
                        ByteSize(limits.max_total_bytes)
                    ),
                    key: "image_layer_max_size",
                }),
                Some(Crossed::Ratio) => Some(ImageError::LayerLimit {
                    digest: layer.digest.clone(),
                    what: format!(
                        "compression ratio ({}:1 of its {compressed} compressed bytes)",
                        limits.max_ratio
                    ),
                    key: "image_layer_max_ratio",
                }),
                None => None,
            };
            if let Some(e) = limit {
                return Err(e);
            }
            res?;
        }
        self.bytes += read.get();
        io::copy(&mut hashing, &mut io::sink()).map_err(read_err)?;
        let actual = format!("sha256:{:x}", hashing.hasher.finalize());
        if actual != layer.digest {
            // A corrupt cache entry must not be trusted again.
            let _ = std::fs::remove_file(&layer.path);
            return Err(ImageError::DigestMismatch {
                digest: layer.digest.clone(),
                actual,
            });
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        digest: &str,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        let raw_path = entry
            .path()
            .map(|p| p.into_owned())
            .map_err(|e| ImageError::BadEntry {
                digest: digest.to_string(),
                entry: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                reason: e.to_string(),
            })?;
        let bad = |reason: String| ImageError::BadEntry {
            digest: digest.to_string(),
            entry: raw_path.display().to_string(),
            reason,
        };
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let comps = clean(&raw_path).map_err(bad)?;
        let header = entry.header();
        let perm = header.mode().map_err(|e| bad(e.to_string()))? & 0o7777;
        let uid = header.uid().map_err(|e| bad(e.to_string()))?;
        let gid = header.gid().map_err(|e| bad(e.to_string()))?;
        let mtime = header.mtime().unwrap_or(0);

        let Some((name, parents)) = comps.split_last() else {
            // The root directory itself (`./`).
            if kind.is_dir() {
                self.meta.insert(
                    PathBuf::new(),
                    Meta {
                        mode: S_IFDIR | perm,
                        uid,
                        gid,
                        mtime,
                        rdev: None,
                    },
                );
            }
            return Ok(());
        };

        let name_bytes = name.as_bytes();
        if name_bytes == b".wh..wh..opq" {
            let dir = self.resolve(parents, true).map_err(bad)?;
            self.this_layer.insert(dir.clone());
            return self
                .prune_lower(&dir)
                .map_err(|source| self.write_err(&dir, source));
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            // `.wh.`, `.wh..` and `.wh...` would name the directory itself
            // or its parent (the staging dir's parent at the top level).
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(bad(format!(
                    "whiteout names no entry ({:?}); the layer is malformed or hostile",
                    String::from_utf8_lossy(hidden)
                )));
            }
            let Ok(dir) = self.resolve(parents, false) else {
                return Ok(()); // nothing below to hide
            };
            let target = dir.join(OsStr::from_bytes(hidden));
            if !self.this_layer.contains(&target) {
                self.remove_path(&target)?;
            }
            return Ok(());
        }

        let dir = self.resolve(parents, true).map_err(bad)?;
        let rel = dir.join(name);
        let full = self.root.join(&rel);
        let mut meta = Meta {
            mode: perm,
            uid,
            gid,
            mtime,
            rdev: None,
        };
        match kind {
            tar::EntryType::Directory => {
                let is_dir = std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir());
                if !is_dir {
                    self.remove_path(&rel)?;
                    std::fs::create_dir(&full).map_err(|e| self.write_err(&rel, e))?;
                }
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| self.write_err(&rel, e))?;
                meta.mode |= S_IFDIR;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.remove_path(&rel)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|e| self.write_err(&rel, e))?;
                io::copy(entry, &mut f).map_err(|e| self.write_err(&rel, e))?;
                meta.mode |= S_IFREG;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad("symlink without a target".to_string()))?
                    .into_owned();
                self.remove_path(&rel)?;
                std::os::unix::fs::symlink(&target, &full).map_err(|e| self.write_err(&rel, e))?;
                meta.mode = S_IFLNK | 0o777;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad("hardlink without a target".to_string()))?
                    .into_owned();
                let tcomps = clean(&target).map_err(bad)?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(bad("hardlink to the root directory".to_string()));
                };
                let tdir = self.resolve(tparents, false).map_err(bad)?;
                let trel = tdir.join(tname);
                if trel == rel {
                    return Ok(());
                }
                let tfull = self.root.join(&trel);
                match std::fs::symlink_metadata(&tfull) {
                    Ok(m) if !m.is_dir() => {}
                    _ => {
                        return Err(bad(format!(
                            "hardlink target {} is missing or a directory",
                            target.display()
                        )));
                    }
                }
                let tmeta = self.meta.get(&trel).copied();
                self.remove_path(&rel)?;
                std::fs::hard_link(&tfull, &full).map_err(|e| self.write_err(&rel, e))?;
                // One inode: its table entry is the target's.
                meta = tmeta.unwrap_or(Meta {
                    mode: S_IFREG | perm,
                    ..meta
                });
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.remove_path(&rel)?;
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                meta.mode |= match kind {
                    tar::EntryType::Char => S_IFCHR,
                    tar::EntryType::Block => S_IFBLK,
                    _ => S_IFIFO,
                };
                meta.rdev = Some((major, minor));
            }
            other => {
                return Err(bad(format!("unsupported tar entry type {other:?}")));
            }
        }
        self.meta.insert(rel.clone(), meta);
        self.this_layer.insert(rel);
        Ok(())
    }

    fn write_err(&self, rel: &Path, source: io::Error) -> ImageError {
        ImageError::Write {
            path: self.root.join(rel),
            source,
        }
    }

    /// Resolves directory components inside the tree, following symlinks
    /// in-root; missing directories are created (root-owned, 0755) when
    /// `create` is set. Returns the tree-relative path of a real directory.
    fn resolve(&mut self, comps: &[OsString], create: bool) -> Result<PathBuf, String> {
        let mut stack: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut links = 0;
        while let Some(c) = queue.pop_front() {
            if c == ".." {
                stack.pop();
                continue;
            }
            if c.is_empty() || c == "." {
                continue;
            }
            let rel = join(&stack).join(&c);
            let full = self.root.join(&rel);
            match std::fs::symlink_metadata(&full) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err("too many levels of symlinks".to_string());
                    }
                    let target = std::fs::read_link(&full).map_err(|e| e.to_string())?;
                    if target.is_absolute() {
                        stack.clear();
                    }
                    let parts: Vec<OsString> = target
                        .components()
                        .filter_map(|tc| match tc {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    for p in parts.into_iter().rev() {
                        queue.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(_) => return Err(format!("{} is not a directory", rel.display())),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    std::fs::create_dir(&full).map_err(|e| e.to_string())?;
                    self.meta.insert(rel.clone(), dir_meta(0o755));
                    self.this_layer.insert(rel);
                    stack.push(c);
                }
                Err(e) => return Err(format!("{}: {e}", rel.display())),
            }
        }
        Ok(join(&stack))
    }

    /// Removes `rel` (never following a final symlink) and its table entries.
    fn remove_path(&mut self, rel: &Path) -> Result<(), ImageError> {
        let full = self.root.join(rel);
        match std::fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&full),
            Ok(_) => std::fs::remove_file(&full),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
        .map_err(|e| self.write_err(rel, e))?;
        let doomed: Vec<PathBuf> = self
            .meta
            .range(rel.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.meta.remove(&k);
        }
        Ok(())
    }

    /// Opaque directory: drops everything below `dir` that lower layers put
    /// there, keeping what this layer already wrote.
    fn prune_lower(&mut self, dir: &Path) -> io::Result<()> {
        let mut children: Vec<PathBuf> = std::fs::read_dir(self.root.join(dir))?
            .map(|e| e.map(|e| dir.join(e.file_name())))
            .collect::<io::Result<_>>()?;
        // Device nodes live only in the table.
        children.extend(
            self.meta
                .range(dir.to_path_buf()..)
                .take_while(|(k, _)| k.starts_with(dir))
                .filter(|(k, m)| k.parent() == Some(dir) && m.rdev.is_some())
                .map(|(k, _)| k.clone()),
        );
        for child in children {
            let full = self.root.join(&child);
            let is_dir = std::fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir());
            if is_dir {
                self.prune_lower(&child)?;
            }
            if self.this_layer.contains(&child) {
                continue;
            }
            let empty = !is_dir || std::fs::read_dir(&full)?.next().is_none();
            if empty {
                self.remove_path(&child).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    /// File bytes rounded to 4 KiB blocks plus one block per directory,
    /// hardlinks counted once.
    fn tree_bytes(&self) -> Result<u64, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let mut seen = HashSet::new();
        let mut total = 0u64;
        for rel in self.meta.keys() {
            let full = self.root.join(rel);
            let Ok(m) = std::fs::symlink_metadata(&full) else {
                continue;
            };
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total += m.len().div_ceil(4096).max(1) * 4096;
        }
        Ok(total)
    }

    fn build_ext4(&self, image: &Path, size: ByteSize) -> Result<(), ImageError> {
        let mkfs = find_tool("mkfs.ext4")?;
        let debugfs = find_tool("debugfs")?;
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(image)
            .map_err(|source| ImageError::Write {
                path: image.to_path_buf(),
                source,
            })?;
        f.set_len(size.0).map_err(|source| ImageError::Write {
            path: image.to_path_buf(),
            source,
        })?;
        drop(f);

        let mut cmd = Command::new(&mkfs);
        cmd.args(["-q", "-F", "-t", "ext4", "-E", "root_owner=0:0", "-d"])
            .arg(&self.root)
            .arg(image);
        run_tool("mkfs.ext4", cmd)?;

        let script = self.debugfs_script()?;
        let script_path = image.with_extension("debugfs");
        std::fs::write(&script_path, script).map_err(|source| ImageError::Write {
            path: script_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(&debugfs);
        cmd.arg("-w").arg("-f").arg(&script_path).arg(image);
        let res = run_tool("debugfs", cmd);
        let _ = std::fs::remove_file(&script_path);
        res?;
        self.verify(&debugfs, image)
    }

    /// One script: create device nodes, then owner, group, mode and mtime of
    /// every path (mkfs copies our own uid and the extraction time, so
    /// everything is set).
    fn debugfs_script(&self) -> Result<String, ImageError> {
        let mut s = String::new();
        for (rel, m) in &self.meta {
            let p = quote(rel)?;
            if let Some((major, minor)) = m.rdev {
                // debugfs mknod links the name into the cwd as given.
                let parent = quote(rel.parent().unwrap_or(Path::new("")))?;
                let name = rel.file_name().unwrap_or_default().to_string_lossy();
                let name = format!("\"{}\"", name.replace('"', "\"\""));
                writeln!(s, "cd {parent}").ok();
                match m.mode & S_IFMT {
                    S_IFIFO => writeln!(s, "mknod {name} p"),
                    S_IFBLK => writeln!(s, "mknod {name} b {major} {minor}"),
                    _ => writeln!(s, "mknod {name} c {major} {minor}"),
                }
                .ok();
                writeln!(s, "cd /").ok();
            }
            writeln!(s, "sif {p} uid {}", m.uid).ok();
            writeln!(s, "sif {p} gid {}", m.gid).ok();
            writeln!(s, "sif {p} mode 0{:o}", m.mode).ok();
            writeln!(s, "sif {p} mtime @{}", m.mtime).ok();
        }
        Ok(s)
    }

    /// Reads back a sample — every special-mode or non-root path (up to 64)
    /// plus the root — and compares with the table.
    fn verify(&self, debugfs: &Path, image: &Path) -> Result<(), ImageError> {
        let mut sample: Vec<(&PathBuf, &Meta)> = self
            .meta
            .iter()
            .filter(|(k, m)| {
                k.as_os_str().is_empty() || m.mode & 0o7000 != 0 || m.uid != 0 || m.gid != 0
            })
            .take(64)
            .collect();
        if sample.len() < 64 {
            sample.extend(self.meta.iter().take(8));
        }
        let mut script = String::new();
        for (rel, _) in &sample {
            writeln!(script, "stat {}", quote(rel)?).ok();
        }
        let script_path = image.with_extension("verify");
        std::fs::write(&script_path, script).map_err(|source| ImageError::Write {
            path: script_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(debugfs);
        cmd.arg("-f").arg(&script_path).arg(image);
        let out = run_tool("debugfs", cmd);
        let _ = std::fs::remove_file(&script_path);
        let out = out?;
        let blocks: Vec<&str> = out.split("debugfs: stat ").skip(1).collect();
        for ((rel, want), block) in sample
            .iter()
            .zip(blocks.iter().chain(std::iter::repeat(&"")))
        {
            let path = format!("/{}", rel.display());
            let got = parse_stat(block).ok_or_else(|| ImageError::Verify {
                path: path.clone(),
                detail: "debugfs could not stat it".to_string(),
            })?;
            if got != (want.mode & 0o7777, want.uid, want.gid) {
                return Err(ImageError::Verify {
                    path,
                    detail: format!(
                        "mode/uid/gid {:o}/{}/{}, want {:o}/{}/{}",
                        got.0,
                        got.1,
                        got.2,
                        want.mode & 0o7777,
                        want.uid,
                        want.gid
                    ),
                });
            }
        }
        Ok(())
    }
}

fn dir_meta(perm: u32) -> Meta {
    Meta {
        mode: S_IFDIR | perm,
        uid: 0,
        gid: 0,
        mtime: 0,
        rdev: None,
    }
}

/// `(permission bits, uid, gid)` from one `debugfs stat` output.
fn parse_stat(block: &str) -> Option<(u32, u64, u64)> {
    let field = |name: &str| -> Option<&str> {
        let at = block.find(name)? + name.len();
        block[at..].split_whitespace().next()
    };
    let mode = u32::from_str_radix(field("Mode:")?, 8).ok()?;
    let uid = field("User:")?.parse().ok()?;
    let gid = field("Group:")?.parse().ok()?;
    Some((mode & 0o7777, uid, gid))
}

/// A tree-relative path as a quoted absolute debugfs argument (`""` is a
/// literal quote inside quotes); newlines cannot be expressed.
fn quote(rel: &Path) -> Result<String, ImageError> {
    let text = rel
        .to_str()
        .filter(|t| !t.contains('\n'))
        .ok_or_else(|| ImageError::BadEntry {
            digest: "-".to_string(),
            entry: rel.display().to_string(),
            reason: "file names with newlines or invalid UTF-8 are not supported".to_string(),
        })?;
    Ok(format!("\"/{}\"", text.replace('"', "\"\"")))
}

fn find_tool(tool: &'static str) -> Result<PathBuf, ImageError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(ImageError::ToolMissing(tool))
}

/// Runs a tool; debugfs reports command errors on stderr with exit 0, so
/// any stderr line besides its version banner is a failure.
fn run_tool(tool: &'static str, mut cmd: Command) -> Result<String, ImageError> {
    let out = cmd
        .output()
        .map_err(|source| ImageError::ToolRun { tool, source })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || (tool == "debugfs" && !complaints.is_empty()) {
        return Err(ImageError::ToolFailed {
            tool,
            stderr: complaints.join("; "),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(path: &[u8], kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        // Raw bytes so tests can write names tar::Header::set_path refuses.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn layer(dir: &Path, name: &str, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        Layer {
            digest: format!("sha256:{:x}", Sha256::digest(&bytes)),
            compression: Compression::None,
            path,
        }
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &[u8], body: &[u8]) {
        let mut h = header(path, tar::EntryType::Regular, 0o644, body.len() as u64);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, path: &[u8], kind: tar::EntryType, target: &str) {
        let mut h = header(path, kind, 0o777, 0);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn rejects_tar_entry_escaping_root_with_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(dir.path(), "l", |b| file(b, b"a/../../escaped", b"x"));
        let mut t = Tree::create(&dir.path().join("tree")).unwrap();
        let err = t.apply_layer(&l).unwrap_err();
        assert!(matches!(err, ImageError::BadEntry { .. }), "{err}");
        assert!(!dir.path().join("escaped").exists());
    }

    #[test]
    fn whiteouts_naming_dot_or_dotdot_are_refused() {
        for name in [
            &b".wh..."[..],
            b".wh..",
            b".wh.",
            b"sub/.wh...",
            b"sub/.wh..",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let staging = dir.path().join("staging");
            std::fs::create_dir(&staging).unwrap();
            let tree = staging.join("tree");
            let lower = layer(dir.path(), "lower", |b| {
                file(b, b"sub/keep", b"k");
                file(b, b"top", b"t");
            });
            let upper = layer(dir.path(), "upper", |b| file(b, name, b""));
            let mut t = Tree::create(&tree).unwrap();
            t.apply_layer(&lower).unwrap();
            let err = t.apply_layer(&upper).unwrap_err();
            let shown = String::from_utf8_lossy(name).into_owned();
            match &err {
                ImageError::BadEntry { digest, entry, .. } => {
                    assert_eq!(digest, &upper.digest, "{err}");
                    assert_eq!(entry, &shown, "{err}");
                }
                other => panic!("{shown}: expected BadEntry, got {other}"),
            }
            assert!(staging.is_dir() && tree.is_dir(), "{shown}: tree removed");
            assert_eq!(
                std::fs::read(tree.join("sub/keep")).unwrap(),
                b"k",
                "{shown}"
            );
            assert_eq!(std::fs::read(tree.join("top")).unwrap(), b"t", "{shown}");
        }
    }

    /// `l` recompressed with gzip, under a new digest.
    fn gzipped(dir: &Path, l: &Layer) -> Layer {
        use std::io::Write as _;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&std::fs::read(&l.path).unwrap()).unwrap();
        let bytes = gz.finish().unwrap();
        let path = dir.join(format!("{}.gz", l.path.display()));
        std::fs::write(&path, &bytes).unwrap();
        Layer {
            digest: format!("sha256:{:x}", Sha256::digest(&bytes)),
            compression: Compression::Gzip,
            path,
        }
    }

    fn limit_key(err: &ImageError) -> &'static str {
        match err {
            ImageError::LayerLimit { key, .. } => key,
            other => panic!("expected a layer limit, got {other}"),
        }
    }

    #[test]
    fn a_zip_bomb_layer_is_refused_by_the_ratio_limit() {
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 24 << 20];
        let plain = layer(dir.path(), "bomb", |b| file(b, b"zeros", &zeros));
        let bomb = gzipped(dir.path(), &plain);
        let compressed = std::fs::metadata(&bomb.path).unwrap().len();
        assert!(compressed * 100 < RATIO_FLOOR, "not a bomb: {compressed}");

        let mut t = Tree::create(&dir.path().join("tree")).unwrap();
        let err = t.apply_layer(&bomb).unwrap_err();
        assert_eq!(limit_key(&err), "image_layer_max_ratio");
        assert!(err.to_string().contains(&bomb.digest), "{err}");

        // The same layer passes when the ratio allows it, and uncompressed.
        let mut t = Tree::create(&dir.path().join("tree2")).unwrap();
        t.limits.max_ratio = 1_000_000;
        t.apply_layer(&bomb).unwrap();
        let mut t = Tree::create(&dir.path().join("tree3")).unwrap();
        t.apply_layer(&plain).unwrap();
    }

    #[test]
    fn entry_and_byte_limits_count_across_layers() {
        let dir = tempfile::tempdir().unwrap();
        let a = layer(dir.path(), "a", |b| {
            file(b, b"one", b"1");
            file(b, b"two", b"2");
        });
        let b2 = layer(dir.path(), "b", |b| file(b, b"three", &[7u8; 8192]));
        let limited = |f: &dyn Fn(&mut ExtractLimits), name: &str| {
            let mut t = Tree::create(&dir.path().join(name)).unwrap();
            f(&mut t.limits);
            t.apply_layer(&a).unwrap();
            t.apply_layer(&b2).map(|_| t.entries)
        };
        assert_eq!(limited(&|_| {}, "t0").unwrap(), 3);
        let err = limited(&|l| l.max_entries = 2, "t1").unwrap_err();
        assert_eq!(limit_key(&err), "image_layer_max_entries");
        assert!(err.to_string().contains(&b2.digest), "{err}");
        // Layer a's tar stream is 3 KiB (two 512-byte entries with their
        // data, two end blocks); b's file alone is 8 KiB.
        assert_eq!(limited(&|l| l.max_total_bytes = 12 << 10, "t2").unwrap(), 3);
        let err = limited(&|l| l.max_total_bytes = 8 << 10, "t3").unwrap_err();
        assert_eq!(limit_key(&err), "image_layer_max_size");
        assert!(err.to_string().contains(&b2.digest), "{err}");
    }

    #[test]
    fn writes_through_symlinks_land_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let outside_abs = outside.to_str().unwrap().to_string();
        let l = layer(dir.path(), "l", |b| {
            link(b, b"abs", tar::EntryType::Symlink, &outside_abs);
            link(b, b"rel", tar::EntryType::Symlink, "../../../../outside");
            file(b, b"abs/owned", b"via absolute");
            file(b, b"rel/owned2", b"via relative");
        });
        let tree = dir.path().join("tree");
        let mut t = Tree::create(&tree).unwrap();
        t.apply_layer(&l).unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "host dir touched"
        );
        let inside = tree.join(outside.strip_prefix("/").unwrap()).join("owned");
        assert_eq!(std::fs::read(inside).unwrap(), b"via absolute");
        assert_eq!(
            std::fs::read(tree.join("outside/owned2")).unwrap(),
            b"via relative"
        );
    }

    #[test]
    fn device_nodes_and_fifos_are_made_by_debugfs() {
        if !Path::new("/usr/sbin/debugfs").exists() {
            eprintln!("SKIPPED device_nodes_and_fifos_are_made_by_debugfs: debugfs not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let l = layer(dir.path(), "l", |b| {
            for (path, kind) in [
                (&b"dev/null"[..], tar::EntryType::Char),
                (b"dev/loop0", tar::EntryType::Block),
                (b"run/fifo", tar::EntryType::Fifo),
                (b"dev/gone", tar::EntryType::Char),
            ] {
                let mut h = header(path, kind, 0o660, 0);
                h.set_device_major(7).unwrap();
                h.set_device_minor(3).unwrap();
                h.set_gid(6);
                h.set_cksum();
                b.append(&h, io::empty()).unwrap();
            }
        });
        let upper = layer(dir.path(), "upper", |b| file(b, b"dev/.wh.gone", b""));
        let image = dir.path().join("img.ext4");
        let built = build(
            &dir.path().join("tree"),
            &[l, upper],
            &image,
            None,
            &ExtractLimits::OCI_PULL,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(built.size, ByteSize(GIB));
        let stat = |p: &str| {
            let out = Command::new("/usr/sbin/debugfs")
                .args(["-R", &format!("stat {p}")])
                .arg(&image)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let null = stat("/dev/null");
        assert!(null.contains("Type: character special"), "{null}");
        assert!(
            null.contains("Mode:  0660") && null.contains("Group:     6"),
            "{null}"
        );
        assert!(null.contains("major/minor number: 07:03"), "{null}");
        assert!(stat("/dev/loop0").contains("Type: block special"));
        assert!(stat("/run/fifo").contains("Type: FIFO"));
        assert!(
            !stat("/dev/gone").contains("Inode:"),
            "whiteout removes a table-only node"
        );
    }

    #[test]
    fn symlink_loops_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(dir.path(), "l", |b| {
            link(b, b"a", tar::EntryType::Symlink, "b");
            link(b, b"b", tar::EntryType::Symlink, "/a");
            file(b, b"a/x", b"x");
        });
        let mut t = Tree::create(&dir.path().join("tree")).unwrap();
        let err = t.apply_layer(&l).unwrap_err();
        assert!(
            err.to_string().contains("too many levels of symlinks"),
            "{err}"
        );
    }

    #[test]
    fn hardlinks_resolve_in_root_and_share_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let l = layer(dir.path(), "l", |b| {
            let mut h = header(b"etc/shadow", tar::EntryType::Regular, 0o640, 2);
            h.set_gid(42);
            h.set_cksum();
            b.append(&h, &b"pw"[..]).unwrap();
            link(b, b"copy", tar::EntryType::Link, "/etc/shadow");
        });
        let tree = dir.path().join("tree");
        let mut t = Tree::create(&tree).unwrap();
        t.apply_layer(&l).unwrap();
        use std::os::unix::fs::MetadataExt;
        let a = std::fs::metadata(tree.join("etc/shadow")).unwrap();
        let b = std::fs::metadata(tree.join("copy")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert_eq!(t.meta[Path::new("copy")].gid, 42);
        assert_eq!(t.meta[Path::new("copy")].mode, S_IFREG | 0o640);
    }

    #[test]
    fn corrupt_layer_is_rejected_and_dropped_from_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = layer(dir.path(), "l", |b| file(b, b"f", b"x"));
        l.digest = format!("sha256:{}", "0".repeat(64));
        let mut t = Tree::create(&dir.path().join("tree")).unwrap();
        let err = t.apply_layer(&l).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!l.path.exists());
    }

    #[test]
    fn default_size_is_at_least_a_gibibyte_and_small_sizes_are_refused() {
        assert_eq!(choose_size(None, 10 * MIB).unwrap(), ByteSize(GIB));
        assert_eq!(choose_size(None, 4 * GIB).unwrap(), ByteSize(5 * GIB));
        let err = choose_size(Some(ByteSize(20 * MIB)), 100 * MIB).unwrap_err();
        assert!(matches!(err, ImageError::SizeTooSmall { .. }), "{err}");
    }

    #[test]
    fn debugfs_quoting_doubles_quotes() {
        assert_eq!(quote(Path::new("a b/\"q\"")).unwrap(), "\"/a b/\"\"q\"\"\"");
        assert!(quote(Path::new("bad\nname")).is_err());
    }

    #[test]
    fn flattening_makes_no_ownership_syscalls() {
        // Ownership goes through debugfs only, so an unprivileged daemon
        // produces the same image as root.
        let src = include_str!("flatten.rs");
        for call in ["ch", "lch", "fch"] {
            let needle = [call, "own("].concat();
            assert!(!src.contains(&needle), "{needle}");
        }
    }
}
