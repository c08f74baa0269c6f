//! Discovering kernel artifacts in a directory and copying them into staging.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::modules::write_boot_initrd;
use super::{KernelError, KernelManifest};

/// Metadata files looked for first, in this order.
const METADATA_FILES: [&str; 2] = ["banger-kernel.toml", "manifest.toml"];

/// Optional metadata next to kernel artifacts (in an import dir or at the
/// top of a tarball). Unknown keys are ignored, so a kernel dir's own
/// `manifest.toml` reads as metadata too.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Metadata {
    /// The kernel file, relative to the directory.
    pub kernel: Option<PathBuf>,
    /// The initrd file, relative to the directory.
    pub initrd: Option<PathBuf>,
    /// The modules directory (holding `<version>/`), relative to the directory.
    pub modules: Option<PathBuf>,
    pub distro: Option<String>,
    pub version: Option<String>,
    pub arch: Option<String>,
}

/// Artifacts found in an import directory, or given one by one.
#[derive(Debug)]
pub(super) struct Found {
    /// Where they came from, for errors: the import directory (or the
    /// kernel file's).
    dir: PathBuf,
    /// The manifest's `source`.
    source: String,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    modules: Option<PathBuf>,
    /// Set when `modules` is itself `lib/modules/<version>` (its name)
    /// rather than the directory holding `<version>/`.
    modules_version: Option<String>,
    distro: String,
    version: String,
    arch: String,
}

/// Kernel artifacts given as files rather than found in a directory
/// (`banger image pull --kernel F --initrd I --modules D`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFiles {
    /// The kernel: an ELF `vmlinux`, or a compressed `vmlinuz`/bzImage that
    /// is unpacked as `kernel import` does.
    pub kernel: PathBuf,
    /// Its initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Its modules: `lib/modules/<version>` or the directory holding
    /// `<version>/`.
    pub modules: Option<PathBuf>,
}

/// Files a `lib/modules/<version>` directory holds at its top (the
/// directory holding versions has only version directories).
const VERSION_DIR_MARKERS: [&str; 4] =
    ["kernel", "modules.builtin", "modules.dep", "modules.order"];

/// Checks the given files and describes them like a discovered directory.
pub(super) fn from_files(files: &KernelFiles) -> Result<Found, KernelError> {
    let existing = |p: &Path, want_dir: bool| -> Result<PathBuf, KernelError> {
        let full = fs::canonicalize(p).map_err(KernelError::io("open", p))?;
        let meta = fs::metadata(&full).map_err(KernelError::io("open", p))?;
        let ok = if want_dir {
            fs::read_dir(&full).map_err(KernelError::io("read", p))?;
            meta.is_dir()
        } else {
            fs::File::open(&full).map_err(KernelError::io("open", p))?;
            meta.is_file()
        };
        if !ok {
            let what = if want_dir {
                "directory"
            } else {
                "regular file"
            };
            return Err(KernelError::io("open", p)(io::Error::other(format!(
                "not a {what}"
            ))));
        }
        Ok(full)
    };
    let kernel = existing(&files.kernel, false)?;
    let initrd = files
        .initrd
        .as_deref()
        .map(|p| existing(p, false))
        .transpose()?;
    let modules = files
        .modules
        .as_deref()
        .map(|p| existing(p, true))
        .transpose()?;
    let modules_version = modules.as_deref().and_then(|m| {
        VERSION_DIR_MARKERS
            .iter()
            .any(|f| m.join(f).exists())
            .then(|| m.file_name().map(|n| n.to_string_lossy().into_owned()))
            .flatten()
    });
    let named_version = || {
        let file = kernel.file_name()?.to_string_lossy().into_owned();
        (file.starts_with("vmlinux") || file.starts_with("vmlinuz"))
            .then(|| version_from_file_name(&kernel))
    };
    // Else the only `<version>/` under the modules directory.
    let only_version = || {
        let dirs: Vec<String> = fs::read_dir(modules.as_deref()?)
            .ok()?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        match dirs.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        }
    };
    let version = modules_version
        .clone()
        .or_else(named_version)
        .or_else(only_version)
        .unwrap_or_else(|| "unknown".to_owned());
    Ok(Found {
        dir: kernel.parent().unwrap_or(Path::new("/")).to_path_buf(),
        source: format!("import:{}", kernel.display()),
        kernel,
        initrd,
        modules,
        modules_version,
        distro: "unknown".into(),
        version,
        arch: std::env::consts::ARCH.into(),
    })
}

/// What follows `vmlinux-`/`vmlinuz-` in a kernel's file name, else
/// `unknown`.
fn version_from_file_name(kernel: &Path) -> String {
    let file = kernel
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let v = file
        .trim_start_matches("vmlinux")
        .trim_start_matches("vmlinuz")
        .trim_start_matches(['-', '.', '_']);
    if v.is_empty() {
        "unknown".to_owned()
    } else {
        v.to_owned()
    }
}

/// Reads the first metadata file present in `dir`, if any.
pub(super) fn read_metadata(dir: &Path) -> Result<Option<Metadata>, KernelError> {
    for name in METADATA_FILES {
        let path = dir.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => {
                return toml::from_str(&text)
                    .map(Some)
                    .map_err(|e| KernelError::ReadManifest(path, Box::new(e)));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(KernelError::ReadManifest(path, Box::new(e))),
        }
    }
    Ok(None)
}

/// Finds the kernel, initrd and modules in `from`: a metadata file first,
/// then the conventional names.
pub(super) fn discover(from: &Path) -> Result<Found, KernelError> {
    let dir = fs::canonicalize(from).map_err(KernelError::io("open", from))?;
    let fail = |reason: String| KernelError::Discover {
        dir: dir.clone(),
        reason,
    };
    if !dir.is_dir() {
        return Err(fail("not a directory".into()));
    }
    let meta = read_metadata(&dir)?.unwrap_or_default();
    let named = |p: &Path| -> Result<PathBuf, KernelError> {
        let inside = p
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            return Err(fail(format!(
                "the metadata file names {p:?}; use a path relative to the directory, without `..`"
            )));
        }
        let full = dir.join(p);
        if !full.exists() {
            return Err(fail(format!(
                "the metadata file names {p:?}, which does not exist"
            )));
        }
        Ok(full)
    };
    let names = file_names(&dir)?;
    // A distribution's tree keeps them in boot/ (`vmlinuz-VERSION`).
    let boot = dir.join("boot");
    let boot_names = if boot.is_dir() {
        file_names(&boot)?
    } else {
        Vec::new()
    };
    let kernel = match &meta.kernel {
        Some(p) => named(p)?,
        None => [
            (&dir, &names, "vmlinux"),
            (&boot, &boot_names, "vmlinux-"),
            (&dir, &names, "vmlinuz"),
            (&boot, &boot_names, "vmlinuz-"),
        ]
        .into_iter()
        .map(|(d, n, prefix)| one_of(d, n, &[prefix], "kernel"))
        .find_map(|r| r.transpose())
        .transpose()?
        .ok_or_else(|| {
            fail(
                "no `vmlinux*` or `vmlinuz*` file, here or in boot/; add one or a \
                 banger-kernel.toml naming it"
                    .into(),
            )
        })?,
    };
    if !kernel.is_file() {
        return Err(fail(format!(
            "the kernel {} is not a regular file",
            kernel.display()
        )));
    }
    let initrd = match &meta.initrd {
        Some(p) => Some(named(p)?),
        None => match one_of(&dir, &names, &["initrd", "initramfs"], "initrd")? {
            Some(i) => Some(i),
            None => one_of(&boot, &boot_names, &["initrd", "initramfs-"], "initrd")?,
        },
    };
    let modules = match &meta.modules {
        Some(p) => Some(named(p)?),
        None => ["lib/modules", "modules"]
            .iter()
            .map(|m| dir.join(m))
            .find(|p| p.is_dir()),
    };
    let version = meta
        .version
        .clone()
        .unwrap_or_else(|| version_from_file_name(&kernel));
    Ok(Found {
        source: format!("import:{}", dir.display()),
        kernel,
        initrd,
        modules,
        modules_version: None,
        distro: meta.distro.clone().unwrap_or_else(|| "unknown".into()),
        version,
        arch: meta
            .arch
            .clone()
            .unwrap_or_else(|| std::env::consts::ARCH.into()),
        dir,
    })
}

fn file_names(dir: &Path) -> Result<Vec<String>, KernelError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(KernelError::io("read", dir))? {
        let entry = entry.map_err(KernelError::io("read", dir))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// The single regular file whose name starts with one of `prefixes`.
fn one_of(
    dir: &Path,
    names: &[String],
    prefixes: &[&str],
    what: &str,
) -> Result<Option<PathBuf>, KernelError> {
    let hits: Vec<&String> = names
        .iter()
        .filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && dir.join(n).is_file())
        .collect();
    match hits.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(dir.join(one))),
        many => Err(KernelError::Discover {
            dir: dir.to_path_buf(),
            reason: format!(
                "several {what} candidates ({}); keep one or name it in banger-kernel.toml",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// Copies the artifacts into `staging` and returns the manifest to write.
pub(super) fn copy_into(
    found: &Found,
    staging: &Path,
    name: &str,
) -> Result<KernelManifest, KernelError> {
    let sha256 = if is_elf_kernel(&found.kernel)? {
        copy_hashing(&found.kernel, &staging.join("vmlinux"))?
    } else {
        unpack_bzimage(found, &staging.join("vmlinux"))?
    };
    if let Some(initrd) = &found.initrd {
        copy_hashing(initrd, &staging.join("initrd"))?;
    }
    match (&found.modules, &found.modules_version) {
        (Some(modules), None) => copy_tree(modules, &staging.join("modules"))?,
        (Some(modules), Some(version)) => {
            let parent = staging.join("modules");
            fs::create_dir(&parent).map_err(KernelError::io("create", &parent))?;
            copy_tree(modules, &parent.join(version))?;
        }
        (None, _) => {}
    }
    // A modular kernel without an initrd of its own gets banger's boot
    // modules archive as its initrd.
    let made_initrd = found.initrd.is_none() && found.modules.is_some();
    if made_initrd {
        write_boot_initrd(staging, &found.version)?;
    }
    Ok(KernelManifest {
        name: name.to_owned(),
        distro: found.distro.clone(),
        arch: found.arch.clone(),
        version: found.version.clone(),
        sha256,
        source: found.source.clone(),
        imported_at: now_rfc3339(),
        has_initrd: found.initrd.is_some() || made_initrd,
        has_modules: found.modules.is_some(),
    })
}

pub(super) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Lowercase hex of a digest.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `path` starts with the ELF magic (a `vmlinux`, not a bzImage).
pub fn is_elf_kernel(path: &Path) -> Result<bool, KernelError> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).map_err(KernelError::io("open", path))?;
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"\x7fELF"),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(KernelError::io("read", path)(e)),
    }
}

/// Unpacks the ELF `vmlinux` out of a compressed kernel (`vmlinuz`, a
/// bzImage) into `dest`, since the VMMs boot an ELF; returns its sha256.
fn unpack_bzimage(found: &Found, dest: &Path) -> Result<String, KernelError> {
    let src = &found.kernel;
    let image = fs::read(src).map_err(KernelError::io("read", src))?;
    let elf =
        crate::recipes::bzimage::extract_vmlinux(&image).map_err(|e| KernelError::Discover {
            dir: found.dir.clone(),
            reason: format!(
                "{} is a compressed kernel (vmlinuz), and the VMMs need an ELF vmlinux, but it \
                 could not be unpacked ({e}); give an uncompressed vmlinux (the distribution's \
                 debug package, or the Linux tree's scripts/extract-vmlinux)",
                src.display()
            ),
        })?;
    let mut output = new_file(dest)?;
    output
        .write_all(&elf)
        .and_then(|()| output.sync_all())
        .map_err(KernelError::io("write", dest))?;
    Ok(hex(&Sha256::digest(&elf)))
}

/// `dest`, created (0644) where nothing was.
fn new_file(dest: &Path) -> Result<fs::File, KernelError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dest)
        .map_err(KernelError::io("create", dest))
}

/// Copies `src` to the new file `dest`, returning the sha256 of the content.
fn copy_hashing(src: &Path, dest: &Path) -> Result<String, KernelError> {
    let mut input = fs::File::open(src).map_err(KernelError::io("open", src))?;
    let mut output = new_file(dest)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = input.read(&mut buf).map_err(KernelError::io("read", src))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(KernelError::io("write", dest))?;
    }
    output.sync_all().map_err(KernelError::io("write", dest))?;
    Ok(hex(&hasher.finalize()))
}

/// The sha256 of a file's content.
pub(super) fn hash_file(path: &Path) -> Result<String, KernelError> {
    let mut input = fs::File::open(path).map_err(KernelError::io("open", path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut input, &mut hasher).map_err(KernelError::io("read", path))?;
    Ok(hex(&hasher.finalize()))
}

/// Copies a directory tree without following symlinks (they are copied as
/// links); sockets, fifos and devices are refused.
fn copy_tree(src: &Path, dest: &Path) -> Result<(), KernelError> {
    fs::create_dir(dest).map_err(KernelError::io("create", dest))?;
    for entry in fs::read_dir(src).map_err(KernelError::io("read", src))? {
        let entry = entry.map_err(KernelError::io("read", src))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let kind = entry.file_type().map_err(KernelError::io("read", &from))?;
        if kind.is_dir() {
            copy_tree(&from, &to)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(KernelError::io("read", &from))?;
            std::os::unix::fs::symlink(&target, &to).map_err(KernelError::io("create", &to))?;
        } else if kind.is_file() {
            fs::copy(&from, &to).map_err(KernelError::io("copy", &from))?;
        } else {
            return Err(KernelError::Discover {
                dir: src.to_path_buf(),
                reason: format!("{} is not a file, directory or symlink", from.display()),
            });
        }
    }
    Ok(())
}
