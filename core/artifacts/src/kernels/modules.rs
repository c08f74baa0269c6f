//! Boot modules: the few drivers a distribution kernel builds as modules but
//! the agent needs before it can find its drives (virtio-mmio, virtio-blk,
//! virtio-net, vsock, virtio-console for the agent's serial transport, the
//! ACPI power button, evdev).
//!
//! [`boot_modules_archive`] finds them in the kernel's modules tree, follows
//! each module's `depends=` (and `softdep= pre:`) from its `.modinfo`
//! section, and writes a newc cpio holding them *decompressed* (so kernels
//! without `MODULE_DECOMPRESS` load them too) plus `/banger/modules.load`,
//! the load order, dependencies first. The kernel store keeps this archive as
//! the kernel's `initrd`; the agent archive is appended to it at boot and the
//! agent loads the list before it looks for its drives (see
//! `docs/guest-contract.md`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::KernelError;
use crate::cpio::{Newc, S_IFDIR, S_IFREG, publish};

/// The modules banger's guests need, by name. Any of them may be built into
/// the kernel instead (then `modules.builtin` lists it).
pub const DEFAULT_BOOT_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    // The agent's port under QEMU's `serial` transport (docs/snapshots.md).
    "virtio_console",
    "button",
    "evdev",
];

/// Where the load list sits in the archive (and so in the guest, from `/`).
pub const MODULES_LOAD: &str = "banger/modules.load";

/// Module file endings, longest first so `.ko.xz` is not taken for `.ko`.
const ENDINGS: [(&str, Compression); 4] = [
    (".ko.xz", Compression::Xz),
    (".ko.zst", Compression::Zstd),
    (".ko.gz", Compression::Gzip),
    (".ko", Compression::None),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

/// The boot modules of one kernel version, as a ready cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModules {
    /// The kernel version (the `lib/modules/<version>` directory).
    pub version: String,
    /// Module names in load order, dependencies first.
    pub loaded: Vec<String>,
    /// Wanted (or depended-on) modules the kernel has built in.
    pub builtin: Vec<String>,
    /// The newc cpio: the modules, their directories and the load list.
    pub archive: Vec<u8>,
}

impl BootModules {
    /// Writes the archive to `dest` (staged and renamed).
    pub fn write(&self, dest: &Path) -> Result<(), KernelError> {
        publish(dest, &self.archive, 0o644).map_err(|e| match e {
            crate::cpio::CpioError::WriteOutput(path, source) => KernelError::Io {
                op: "write",
                path,
                source,
            },
        })
    }
}

/// Builds the boot modules archive for `version` from `modules_root`, which
/// is either a tree root holding `lib/modules/<version>/` (an unpacked
/// package) or a modules directory holding `<version>/` (a kernel store's
/// `modules/`). `wanted` names modules (`-` and `_` are the same); each is
/// loaded after everything it depends on. A wanted module that is neither in
/// `<version>/kernel/` nor listed in `<version>/modules.builtin` is an error
/// naming it.
pub fn boot_modules_archive(
    modules_root: &Path,
    version: &str,
    wanted: &[&str],
) -> Result<BootModules, KernelError> {
    let version_dir = [
        modules_root.join("lib/modules").join(version),
        modules_root.join(version),
    ]
    .into_iter()
    .find(|d| d.join("kernel").is_dir() || d.join("modules.builtin").is_file())
    .ok_or_else(|| KernelError::ModulesDir {
        root: modules_root.to_path_buf(),
        version: version.to_owned(),
    })?;
    let tree = ModuleTree::scan(&version_dir)?;
    let mut closure = Closure {
        tree: &tree,
        state: BTreeMap::new(),
        order: Vec::new(),
        builtin: Vec::new(),
    };
    for name in wanted {
        closure.visit(&normalise(name), None, true)?;
    }
    let Closure { order, builtin, .. } = closure;
    Ok(BootModules {
        archive: archive(version, &order),
        version: version.to_owned(),
        loaded: order.into_iter().map(|m| m.name).collect(),
        builtin,
    })
}

/// Writes the boot modules archive of a kernel directory (`modules/`
/// holding `<version>/`) as its `initrd`, for [`DEFAULT_BOOT_MODULES`].
/// `version` is the kernel's; when `modules/` has no such directory its only
/// version directory is used. For import, pull and build alike: a modular
/// kernel without an initrd of its own needs this one to boot banger's agent.
pub(super) fn write_boot_initrd(
    kernel_dir: &Path,
    version: &str,
) -> Result<BootModules, KernelError> {
    let modules = kernel_dir.join("modules");
    let version = module_version(&modules, version)?;
    let archive = boot_modules_archive(&modules, &version, DEFAULT_BOOT_MODULES)?;
    archive.write(&kernel_dir.join("initrd"))?;
    Ok(archive)
}

/// `version` when `modules` has that directory, else its only one.
fn module_version(modules: &Path, version: &str) -> Result<String, KernelError> {
    if modules.join(version).is_dir() {
        return Ok(version.to_owned());
    }
    let mut versions = Vec::new();
    for entry in fs::read_dir(modules).map_err(KernelError::io("read", modules))? {
        let entry = entry.map_err(KernelError::io("read", modules))?;
        if entry.path().is_dir() {
            versions.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    versions.sort();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(KernelError::ModuleVersion {
            dir: modules.to_path_buf(),
            version: version.to_owned(),
            found: versions,
        }),
    }
}

/// Module names compare with `-` and `_` alike, as the kernel does.
fn normalise(name: &str) -> String {
    name.replace('-', "_")
}

/// A module file's stem and compression, when `file` ends like a module.
fn split_module(file: &str) -> Option<(&str, Compression)> {
    ENDINGS.iter().find_map(|(ending, c)| {
        file.strip_suffix(ending)
            .filter(|stem| !stem.is_empty())
            .map(|stem| (stem, *c))
    })
}

/// One module file in the tree.
#[derive(Debug)]
struct ModuleFile {
    path: PathBuf,
    /// Path relative to `<version>/`, without the ending (`kernel/drivers/virtio/virtio_mmio`).
    rel: String,
    compression: Compression,
}

/// What `<version>/` offers: module files by name and the built-in names.
#[derive(Debug)]
struct ModuleTree {
    files: BTreeMap<String, ModuleFile>,
    builtin: HashSet<String>,
}

impl ModuleTree {
    fn scan(version_dir: &Path) -> Result<ModuleTree, KernelError> {
        let mut files = BTreeMap::new();
        let kernel = version_dir.join("kernel");
        if kernel.is_dir() {
            walk(&kernel, "kernel", &mut files)?;
        }
        let builtin_list = version_dir.join("modules.builtin");
        let builtin = match fs::read_to_string(&builtin_list) {
            Ok(text) => text
                .lines()
                .filter_map(|l| l.trim().rsplit('/').next())
                .filter_map(|f| split_module(f).map(|(stem, _)| normalise(stem)))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(KernelError::io("read", builtin_list)(e)),
        };
        Ok(ModuleTree { files, builtin })
    }
}

/// Collects module files under `dir` (whose path relative to the version
/// directory is `rel`), in name order; the first file of a name wins.
fn walk(
    dir: &Path,
    rel: &str,
    files: &mut BTreeMap<String, ModuleFile>,
) -> Result<(), KernelError> {
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(KernelError::io("read", dir))? {
        let entry = entry.map_err(KernelError::io("read", dir))?;
        let kind = entry
            .file_type()
            .map_err(KernelError::io("read", entry.path()))?;
        entries.push((entry.file_name().to_string_lossy().into_owned(), kind));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (file, kind) in entries {
        let path = dir.join(&file);
        if kind.is_dir() {
            walk(&path, &format!("{rel}/{file}"), files)?;
        } else if let Some((stem, compression)) = split_module(&file).filter(|_| kind.is_file()) {
            files.entry(normalise(stem)).or_insert(ModuleFile {
                rel: format!("{rel}/{stem}"),
                path,
                compression,
            });
        }
    }
    Ok(())
}

/// A module chosen for the archive.
#[derive(Debug)]
struct Chosen {
    name: String,
    rel: String,
    elf: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

/// The depth-first walk that puts dependencies before their users.
#[derive(Debug)]
struct Closure<'a> {
    tree: &'a ModuleTree,
    state: BTreeMap<String, Visit>,
    order: Vec<Chosen>,
    builtin: Vec<String>,
}

impl Closure<'_> {
    /// Adds `name` and what it needs. `needed_by` names the module that
    /// depends on it, for the error; a soft dependency (`required` false)
    /// that is missing is skipped.
    fn visit(
        &mut self,
        name: &str,
        needed_by: Option<&str>,
        required: bool,
    ) -> Result<(), KernelError> {
        match self.state.get(name) {
            Some(Visit::Done) => return Ok(()),
            Some(Visit::InProgress) => {
                let mut cycle: Vec<String> = self
                    .state
                    .iter()
                    .filter(|(_, v)| **v == Visit::InProgress)
                    .map(|(n, _)| n.clone())
                    .collect();
                cycle.push(name.to_owned());
                return Err(KernelError::ModuleCycle(cycle));
            }
            None => {}
        }
        let Some(file) = self.tree.files.get(name) else {
            if self.tree.builtin.contains(name) {
                self.builtin.push(name.to_owned());
            } else if required {
                return Err(KernelError::ModuleNotFound {
                    name: name.to_owned(),
                    needed_by: needed_by.map(str::to_owned),
                });
            }
            self.state.insert(name.to_owned(), Visit::Done);
            return Ok(());
        };
        self.state.insert(name.to_owned(), Visit::InProgress);
        let elf = read_module(&file.path, file.compression)?;
        let info = modinfo(&elf).map_err(|e| KernelError::Module {
            path: file.path.clone(),
            source: e.into(),
        })?;
        for dep in &info.depends {
            self.visit(dep, Some(name), true)?;
        }
        for dep in &info.softdep_pre {
            self.visit(dep, Some(name), false)?;
        }
        self.state.insert(name.to_owned(), Visit::Done);
        self.order.push(Chosen {
            name: name.to_owned(),
            rel: file.rel.clone(),
            elf,
        });
        Ok(())
    }
}

/// The module's ELF bytes, decompressed.
fn read_module(path: &Path, compression: Compression) -> Result<Vec<u8>, KernelError> {
    let raw = fs::read(path).map_err(KernelError::io("read", path))?;
    let bad = |source: Box<dyn std::error::Error + Send + Sync>| KernelError::Module {
        path: path.to_path_buf(),
        source,
    };
    let elf = match compression {
        Compression::None => raw,
        Compression::Xz => {
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out).map_err(|e| bad(Box::new(e)))?;
            out
        }
        Compression::Zstd => zstd::decode_all(raw.as_slice()).map_err(|e| bad(Box::new(e)))?,
        Compression::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_end(&mut out)
                .map_err(|e| bad(Box::new(e)))?;
            out
        }
    };
    Ok(elf)
}

/// What banger reads from a module's `.modinfo`.
#[derive(Debug, Default, PartialEq, Eq)]
struct ModInfo {
    depends: Vec<String>,
    softdep_pre: Vec<String>,
}

/// Parses the `.modinfo` section: NUL-separated `key=value` strings.
fn modinfo(elf: &[u8]) -> Result<ModInfo, String> {
    let section = elf_section(elf, b".modinfo")?;
    let mut info = ModInfo::default();
    for field in section.split(|b| *b == 0) {
        let field = String::from_utf8_lossy(field);
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalise),
            ),
            // `pre: a b post: c`: only the `pre:` names must load first.
            "softdep" => {
                let mut pre = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => pre = true,
                        "post:" => pre = false,
                        m if pre => info.softdep_pre.push(normalise(m)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// The bytes of the section named `want` in a 64-bit little-endian ELF file.
fn elf_section<'a>(elf: &'a [u8], want: &[u8]) -> Result<&'a [u8], String> {
    let int = |at: usize, len: usize| -> Result<u64, String> {
        let bytes = elf
            .get(at..at.checked_add(len).ok_or("bad offset")?)
            .ok_or_else(|| format!("truncated ELF file (needs byte {})", at + len))?;
        let mut buf = [0u8; 8];
        buf[..len].copy_from_slice(bytes);
        Ok(u64::from_le_bytes(buf))
    };
    let usize_of = |v: u64| usize::try_from(v).map_err(|_| "ELF offset too large".to_string());
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4..6) != Some(&[2, 1]) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = usize_of(int(0x28, 8)?)?;
    let shentsize = usize_of(int(0x3a, 2)?)?;
    let shnum = usize_of(int(0x3c, 2)?)?;
    let shstrndx = usize_of(int(0x3e, 2)?)?;
    if shentsize < 0x28 {
        return Err(format!("bad section header size {shentsize}"));
    }
    let header = |i: usize| -> Result<(u64, &'a [u8]), String> {
        let at = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or("bad section header offset")?;
        let name = int(at, 4)?;
        let offset = usize_of(int(at + 0x18, 8)?)?;
        let size = usize_of(int(at + 0x20, 8)?)?;
        let data = offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| format!("section {i} lies outside the file"))?;
        Ok((name, data))
    };
    let (_, names) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_at, data) = header(i)?;
        let name = names
            .get(usize_of(name_at)?..)
            .and_then(|n| n.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == want {
            return Ok(data);
        }
    }
    Err(format!("no {} section", String::from_utf8_lossy(want)))
}

/// The cpio: every parent directory, each module at
/// `lib/modules/<version>/<rel>.ko`, then the load list.
fn archive(version: &str, order: &[Chosen]) -> Vec<u8> {
    let base = format!("lib/modules/{version}");
    let files: Vec<(String, &[u8])> = order
        .iter()
        .map(|m| (format!("{base}/{}.ko", m.rel), m.elf.as_slice()))
        .collect();
    let mut dirs = BTreeSet::from(["banger".to_owned()]);
    for (path, _) in &files {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut w = Newc::default();
    // Sorted order puts every directory before its children.
    for d in &dirs {
        w.entry(d, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }
    let mut list = String::new();
    for (path, elf) in &files {
        w.entry(path, S_IFREG | 0o644, 1, (0, 0), elf);
        list.push_str(&format!("/{path}\n"));
    }
    w.entry(MODULES_LOAD, S_IFREG | 0o644, 1, (0, 0), list.as_bytes());
    w.finish()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A minimal ELF64 little-endian object whose only contents are a
    /// `.modinfo` section holding `fields` (NUL-separated, as modpost writes).
    fn ko(fields: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for f in fields {
            modinfo.extend_from_slice(f.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let modinfo_at = 64;
        let shstrtab_at = modinfo_at + modinfo.len();
        let shoff = (shstrtab_at + shstrtab.len()).next_multiple_of(8);
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little-endian
        elf[6] = 1;
        elf[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf.extend_from_slice(&modinfo);
        elf.extend_from_slice(&shstrtab);
        elf.resize(shoff, 0);
        let section = |name: u32, kind: u32, at: usize, len: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(at as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(len as u64).to_le_bytes());
            h
        };
        elf.extend(section(0, 0, 0, 0));
        elf.extend(section(1, 1, modinfo_at, modinfo.len())); // PROGBITS
        elf.extend(section(10, 3, shstrtab_at, shstrtab.len())); // STRTAB
        elf
    }

    fn compress(elf: &[u8], c: Compression) -> Vec<u8> {
        match c {
            Compression::None => elf.to_vec(),
            Compression::Xz => {
                let mut out = Vec::new();
                lzma_rs::xz_compress(&mut &elf[..], &mut out).unwrap();
                out
            }
            Compression::Zstd => zstd::encode_all(elf, 3).unwrap(),
            Compression::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(elf).unwrap();
                e.finish().unwrap()
            }
        }
    }

    /// Writes `lib/modules/<version>/<rel>` under `root`.
    fn put(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join("lib/modules/6.12.0-test").join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }

    /// Every entry of a newc archive: (name, mode, data), trailer excluded.
    fn entries(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let hdr = std::str::from_utf8(&archive[at..at + 110]).unwrap();
            assert_eq!(&hdr[..6], "070701", "entry at {at}");
            let field = |i: usize| u32::from_str_radix(&hdr[6 + i * 8..14 + i * 8], 16).unwrap();
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = std::str::from_utf8(&archive[at + 110..at + 110 + namesize - 1])
                .unwrap()
                .to_owned();
            let data_at = (at + 110 + namesize).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, archive[data_at..data_at + size].to_vec()));
            at = (data_at + size).next_multiple_of(4);
        }
    }

    /// A tree where `a` needs `b` and `c`, `b` needs `c`, `a` wants `d`
    /// loaded before it (softdep), and `e` is built in; each module is
    /// compressed differently.
    fn sample_tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let a = ko(&[
            "license=GPL",
            "softdep=pre: d-mod post: zz",
            "depends=b,c",
            "name=a",
        ]);
        put(r, "kernel/drivers/a.ko", &a);
        put(
            r,
            "kernel/drivers/sub/b.ko.xz",
            &compress(&ko(&["depends=c"]), Compression::Xz),
        );
        put(
            r,
            "kernel/net/c.ko.zst",
            &compress(&ko(&["depends="]), Compression::Zstd),
        );
        put(
            r,
            "kernel/lib/d_mod.ko.gz",
            &compress(&ko(&[]), Compression::Gzip),
        );
        put(r, "kernel/unrelated.ko", b"never read");
        put(
            r,
            "modules.builtin",
            b"kernel/drivers/e-drv.ko\nkernel/fs/ext4/ext4.ko\n",
        );
        dir
    }

    #[test]
    fn dependencies_load_first_decompressed_and_builtins_are_skipped() {
        let dir = sample_tree();
        let m = boot_modules_archive(dir.path(), "6.12.0-test", &["a", "e-drv", "c"]).unwrap();
        assert_eq!(m.loaded, ["c", "b", "d_mod", "a"]);
        assert_eq!(m.builtin, ["e_drv"]);
        assert_eq!(m.version, "6.12.0-test");

        let entries = entries(&m.archive);
        let base = "lib/modules/6.12.0-test";
        let files: Vec<(&str, &[u8])> = entries
            .iter()
            .filter(|(_, mode, _)| mode & S_IFREG == S_IFREG)
            .map(|(n, _, d)| (n.as_str(), d.as_slice()))
            .collect();
        let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                format!("{base}/kernel/net/c.ko"),
                format!("{base}/kernel/drivers/sub/b.ko"),
                format!("{base}/kernel/lib/d_mod.ko"),
                format!("{base}/kernel/drivers/a.ko"),
                MODULES_LOAD.to_owned(),
            ]
        );
        // Stored decompressed: each is the ELF file itself.
        assert_eq!(files[0].1, ko(&["depends="]));
        assert_eq!(files[1].1, ko(&["depends=c"]));
        assert_eq!(files[2].1, ko(&[]));
        let list = String::from_utf8(files[4].1.to_vec()).unwrap();
        assert_eq!(
            list,
            format!(
                "/{base}/kernel/net/c.ko\n/{base}/kernel/drivers/sub/b.ko\n/{base}/kernel/lib/d_mod.ko\n/{base}/kernel/drivers/a.ko\n"
            )
        );
        // Every parent directory comes before anything inside it.
        let mut seen = BTreeSet::new();
        for (name, mode, _) in &entries {
            if let Some(parent) = Path::new(name)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                assert!(
                    seen.contains(parent.to_str().unwrap()),
                    "{name} before its directory"
                );
            }
            if mode & S_IFDIR == S_IFDIR {
                seen.insert(name.clone());
            }
        }
        assert!(seen.contains("banger"));
    }

    #[test]
    fn names_match_with_dashes_or_underscores_and_either_layout() {
        let dir = sample_tree();
        // The kernel store keeps `modules/<version>/`, not `lib/modules/`.
        let store_modules = dir.path().join("lib/modules");
        let m =
            boot_modules_archive(&store_modules, "6.12.0-test", &["d-mod", "E_DRV"]).unwrap_err();
        assert!(
            matches!(&m, KernelError::ModuleNotFound { name, needed_by: None } if name == "E_DRV"),
            "names are case-sensitive like the kernel's: {m}"
        );
        let m = boot_modules_archive(&store_modules, "6.12.0-test", &["d-mod", "e_drv"]).unwrap();
        assert_eq!(m.loaded, ["d_mod"]);
        assert_eq!(m.builtin, ["e_drv"]);
    }

    #[test]
    fn a_missing_module_is_named_with_the_module_needing_it() {
        let dir = sample_tree();
        put(dir.path(), "kernel/f.ko", &ko(&["depends=ghost"]));
        let err = boot_modules_archive(dir.path(), "6.12.0-test", &["f"]).unwrap_err();
        assert!(
            matches!(&err, KernelError::ModuleNotFound { name, needed_by: Some(by) } if name == "ghost" && by == "f"),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("\"ghost\" (needed by f)"), "{text}");
        let err = boot_modules_archive(dir.path(), "6.12.0-test", &["virtio_blk"]).unwrap_err();
        assert!(err.to_string().contains("\"virtio_blk\""), "{err}");
    }

    #[test]
    fn a_missing_version_directory_names_where_it_looked() {
        let dir = sample_tree();
        let err = boot_modules_archive(dir.path(), "6.1.0-other", &["a"]).unwrap_err();
        assert!(matches!(err, KernelError::ModulesDir { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("6.1.0-other") && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn corrupt_and_non_elf_modules_name_their_file() {
        let dir = sample_tree();
        put(dir.path(), "kernel/bad.ko.xz", b"\xfd7zXZ\0 truncated");
        put(dir.path(), "kernel/text.ko", b"#!/bin/sh\n");
        for name in ["bad", "text"] {
            let err = boot_modules_archive(dir.path(), "6.12.0-test", &[name]).unwrap_err();
            assert!(matches!(err, KernelError::Module { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&format!("kernel/{name}.ko")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_dependency_cycle_is_refused() {
        let dir = sample_tree();
        put(dir.path(), "kernel/x.ko", &ko(&["depends=y"]));
        put(dir.path(), "kernel/y.ko", &ko(&["depends=x"]));
        let err = boot_modules_archive(dir.path(), "6.12.0-test", &["x"]).unwrap_err();
        assert!(
            matches!(&err, KernelError::ModuleCycle(c) if c.contains(&"y".to_owned())),
            "{err:?}"
        );
    }

    #[test]
    fn reads_the_modinfo_of_real_elf_files_only() {
        assert_eq!(
            modinfo(&ko(&[
                "depends=virtio,virtio-ring",
                "softdep=pre: crc32c crc32 post: x"
            ]))
            .unwrap(),
            ModInfo {
                depends: vec!["virtio".into(), "virtio_ring".into()],
                softdep_pre: vec!["crc32c".into(), "crc32".into()],
            }
        );
        let mut truncated = ko(&["depends=a"]);
        truncated.truncate(100);
        let err = modinfo(&truncated).unwrap_err();
        assert!(err.contains("truncated ELF file"), "{err}");
        let mut be = ko(&[]);
        be[5] = 2;
        assert!(modinfo(&be).unwrap_err().contains("little-endian"));
    }

    #[test]
    fn importing_a_modular_kernel_without_initrd_makes_the_boot_modules_its_initrd() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        // Import checks only that the kernel is an ELF image.
        fs::write(s.join("vmlinux-6.12.0-test"), b"\x7fELF kernel").unwrap();
        let mut builtin = String::new();
        for (i, name) in DEFAULT_BOOT_MODULES.iter().enumerate() {
            if i % 2 == 0 {
                put(
                    s,
                    &format!("kernel/drivers/{name}.ko.xz"),
                    &compress(&ko(&[]), Compression::Xz),
                );
            } else {
                builtin.push_str(&format!("kernel/drivers/{name}.ko\n"));
            }
        }
        put(s, "modules.builtin", builtin.as_bytes());
        let store_dir = tempfile::tempdir().unwrap();
        let store = super::super::KernelStore::new(store_dir.path());
        let local = store.import("modular", s, false).unwrap();
        assert!(local.manifest.has_initrd);
        let initrd = fs::read(local.initrd.as_ref().unwrap()).unwrap();
        let list = entries(&initrd)
            .into_iter()
            .find(|(n, _, _)| n == MODULES_LOAD)
            .map(|(_, _, d)| String::from_utf8(d).unwrap())
            .unwrap();
        let base = "/lib/modules/6.12.0-test/kernel/drivers";
        assert_eq!(
            list,
            format!(
                "{base}/virtio_mmio.ko\n{base}/virtio_net.ko\n{base}/vmw_vsock_virtio_transport.ko\n{base}/button.ko\n"
            )
        );

        // Without the drivers the import fails, naming the first missing one.
        fs::remove_file(s.join("lib/modules/6.12.0-test/modules.builtin")).unwrap();
        let err = store.import("broken", s, false).unwrap_err();
        assert!(err.to_string().contains("\"virtio_blk\""), "{err}");
        assert!(store.get("broken").unwrap().is_none());
    }

    #[test]
    fn kernel_files_take_modules_as_a_version_directory_or_its_parent() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        // No version in the kernel's file name: it comes from the modules.
        fs::write(s.join("kernel-image"), b"\x7fELF kernel").unwrap();
        let builtin: String = DEFAULT_BOOT_MODULES
            .iter()
            .map(|m| format!("kernel/drivers/{m}.ko\n"))
            .collect();
        put(s, "modules.builtin", builtin.as_bytes());
        put(s, "kernel/extra/x.ko", &ko(&[]));
        let store_dir = tempfile::tempdir().unwrap();
        let store = super::super::KernelStore::new(store_dir.path());
        for (name, modules) in [
            ("by-version", s.join("lib/modules/6.12.0-test")),
            ("by-parent", s.join("lib/modules")),
        ] {
            let files = super::super::KernelFiles {
                kernel: s.join("kernel-image"),
                initrd: None,
                modules: Some(modules),
            };
            let local = store.import_files(name, &files).unwrap();
            assert_eq!(local.manifest.version, "6.12.0-test", "{name}");
            assert!(local.manifest.has_modules && local.manifest.has_initrd);
            let copied = local.modules.unwrap().join("6.12.0-test/kernel/extra/x.ko");
            assert_eq!(fs::read(&copied).unwrap(), ko(&[]), "{name}");
            assert_eq!(
                local.manifest.source,
                format!("import:{}", s.join("kernel-image").display())
            );
        }
        // A second import under a taken name is refused, the first kept.
        let files = super::super::KernelFiles {
            kernel: s.join("kernel-image"),
            ..Default::default()
        };
        let err = store.import_files("by-version", &files).unwrap_err();
        assert!(matches!(err, KernelError::AlreadyExists(_)), "{err:?}");
        assert!(
            store
                .get("by-version")
                .unwrap()
                .unwrap()
                .manifest
                .has_modules
        );
    }

    #[test]
    fn kernel_files_that_are_missing_are_named_and_nothing_is_imported() {
        let src = tempfile::tempdir().unwrap();
        let kernel = src.path().join("vmlinux");
        fs::write(&kernel, b"\x7fELF kernel").unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = super::super::KernelStore::new(store_dir.path());
        let ghost = src.path().join("no-initrd");
        for files in [
            super::super::KernelFiles {
                kernel: kernel.clone(),
                initrd: Some(ghost.clone()),
                modules: None,
            },
            super::super::KernelFiles {
                kernel: kernel.clone(),
                initrd: None,
                modules: Some(ghost.clone()),
            },
            super::super::KernelFiles {
                kernel: ghost.clone(),
                ..Default::default()
            },
            // A directory where a file belongs.
            super::super::KernelFiles {
                kernel: src.path().to_path_buf(),
                ..Default::default()
            },
        ] {
            let err = store.import_files("k", &files).unwrap_err();
            let text = banger_api::error::render_chain(&err);
            assert!(
                text.contains(&ghost.display().to_string()) || text.contains("not a regular file"),
                "{text}"
            );
            assert!(store.get("k").unwrap().is_none());
            assert_eq!(
                fs::read_dir(store_dir.path())
                    .map(|d| d.count())
                    .unwrap_or(0),
                0
            );
        }
    }

    #[test]
    fn the_kernel_directory_initrd_uses_the_only_or_the_named_version() {
        // A kernel store directory: `modules/<version>/`.
        let dir = sample_tree();
        let kernel_dir = dir.path().join("kernel-dir");
        fs::create_dir(&kernel_dir).unwrap();
        fs::rename(dir.path().join("lib/modules"), kernel_dir.join("modules")).unwrap();
        let only = kernel_dir.join("modules/6.12.0-test");
        let wanted: String = DEFAULT_BOOT_MODULES
            .iter()
            .map(|n| format!("kernel/{n}.ko\n"))
            .collect();
        fs::write(only.join("modules.builtin"), wanted).unwrap();

        // The version taken from a file name may be "unknown": the only
        // version directory is used.
        let m = write_boot_initrd(&kernel_dir, "unknown").unwrap();
        assert_eq!(m.version, "6.12.0-test");
        assert!(m.loaded.is_empty(), "all built in: {m:?}");
        assert_eq!(fs::read(kernel_dir.join("initrd")).unwrap(), m.archive);

        fs::create_dir(kernel_dir.join("modules/6.1.0-other")).unwrap();
        let err = write_boot_initrd(&kernel_dir, "unknown").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, KernelError::ModuleVersion { .. })
                && text.contains("6.1.0-other, 6.12.0-test"),
            "{text}"
        );
        let m = write_boot_initrd(&kernel_dir, "6.12.0-test").unwrap();
        assert_eq!(m.version, "6.12.0-test");
    }

    /// A distribution kernel's real modules (Debian's `.ko.xz`): the
    /// directory holding `lib/modules/<version>/` from
    /// `$BANGER_TEST_DISTRO_KERNEL` or `~/.cache/banger-ci/kernel`.
    #[test]
    fn real_distribution_modules_close_over_their_dependencies() {
        let root = std::env::var_os("BANGER_TEST_DISTRO_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/banger-ci/kernel")
            });
        let version = fs::read_dir(root.join("lib/modules"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned());
        let Some(version) = version.filter(|v| {
            root.join("lib/modules")
                .join(v)
                .join("modules.builtin")
                .is_file()
        }) else {
            eprintln!(
                "SKIPPED real_distribution_modules_close_over_their_dependencies: no lib/modules/<version>/modules.builtin under {} (set BANGER_TEST_DISTRO_KERNEL to an unpacked linux-image package)",
                root.display()
            );
            return;
        };
        let m = boot_modules_archive(&root, &version, DEFAULT_BOOT_MODULES).unwrap();
        let pos = |n: &str| m.loaded.iter().position(|l| l == n);
        for want in DEFAULT_BOOT_MODULES {
            assert!(
                pos(want).is_some() || m.builtin.iter().any(|b| b == want),
                "{want}: {m:?}"
            );
        }
        // Wherever both are modules, the dependency comes first.
        for (dep, user) in [
            ("vsock", "vmw_vsock_virtio_transport_common"),
            (
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ),
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
        ] {
            if let (Some(d), Some(u)) = (pos(dep), pos(user)) {
                assert!(d < u, "{dep} after {user}: {:?}", m.loaded);
            }
        }
        for (name, _, data) in entries(&m.archive) {
            if name.ends_with(".ko") {
                assert!(data.starts_with(b"\x7fELF"), "{name} stored decompressed");
            }
        }
    }
}
