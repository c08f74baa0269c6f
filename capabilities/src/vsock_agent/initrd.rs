//! The tiny initramfs banger boots every VM with: an uncompressed cpio
//! "newc" archive holding the static `banger-agent` as `/init` and the
//! directories it mounts onto (`dev proc sys run newroot`).
//!
//! A kernel that ships its own initrd gets our archive appended to it: the
//! kernel unpacks concatenated archives (compressed or not) in order, so the
//! agent's `/init` wins. The result is stamped with the sha256 of its inputs,
//! so starting a VM again does not rebuild it. The stamp is an extended
//! attribute of the archive's inode (`user.banger.initrd-sha256`), so every
//! VM's hard link to one archive shares it and a create writes no stamp
//! file of its own (each new file cost a create 0.3-0.4 ms of CPU in the
//! create bench). Where the filesystem has no user xattrs, the stamp is a
//! `<dest>.sha256` file beside it, as archives built before were.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use banger_artifacts::cpio::{CpioError, Newc, S_IFCHR, S_IFDIR, S_IFREG, sibling};
use sha2::{Digest, Sha256};

use banger_artifacts::file_id::{FileId, FileState, settled};

/// Bumped when the archive layout changes, so cached initrds are rebuilt.
const LAYOUT_VERSION: &[u8] = b"banger-initramfs-1";

/// Directories the agent needs before it can mount anything.
const DIRS: &[&str] = &["dev", "proc", "sys", "run", "newroot"];

/// An initrd that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading the agent binary or the kernel's initrd failed.
    #[error("Cannot read {}", .0.display())]
    ReadInput(PathBuf, #[source] io::Error),
    /// Writing or publishing the result failed.
    #[error("Cannot write {}", .0.display())]
    WriteOutput(PathBuf, #[source] io::Error),
}

impl From<CpioError> for InitramfsError {
    fn from(e: CpioError) -> Self {
        match e {
            CpioError::WriteOutput(p, e) => InitramfsError::WriteOutput(p, e),
        }
    }
}

/// Writes `bytes` to `dest` by stage-then-rename.
fn publish(dest: &Path, bytes: &[u8], mode: u32) -> Result<(), InitramfsError> {
    Ok(banger_artifacts::cpio::publish(dest, bytes, mode)?)
}

/// Whether [`build_initrd`] had to write the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// `dest` was (re)written.
    Fresh,
    /// `dest` already held the archive for these exact inputs.
    Cached,
}

/// Writes the initrd for `agent` (optionally appended to `kernel_initrd`) to
/// `dest`, staged and renamed. Skips the work when `dest` was built from the
/// same inputs before (its stamp, see the module docs).
pub fn build_initrd(
    agent: &Path,
    kernel_initrd: Option<&Path>,
    dest: &Path,
) -> Result<Built, InitramfsError> {
    build_initrd_at(agent, kernel_initrd, dest, std::time::SystemTime::now())
}

/// [`build_initrd`] at time `now` (inputs changed within [`banger_artifacts::file_id::RACY`] of it are
/// not trusted by their identity).
fn build_initrd_at(
    agent: &Path,
    kernel_initrd: Option<&Path>,
    dest: &Path,
    now: std::time::SystemTime,
) -> Result<Built, InitramfsError> {
    // Every VM's initrd is the same archive while the agent and kernel
    // initrd stay the same files: link the last one built instead of
    // reading, hashing and writing megabytes per create (measured by
    // tests/benches/create_throughput.rs).
    let inputs = Inputs::of(agent, kernel_initrd, now);
    if let Some(built) = inputs.as_ref().and_then(|i| reuse_last(i, dest)) {
        return Ok(built);
    }
    let built = build_fresh(agent, kernel_initrd, dest)?;
    if let (Some(i), Some(key)) = (inputs, stamp_of(dest)) {
        if let Ok(mut last) = LAST.lock() {
            *last = Some(Last {
                inputs: i,
                key,
                path: dest.to_path_buf(),
            });
        }
    }
    Ok(built)
}

/// The extended attribute holding an archive's stamp.
const STAMP_XATTR: &str = "user.banger.initrd-sha256";

/// The stamp of the archive at `p`: its extended attribute, else the
/// `.sha256` file beside it.
fn stamp_of(p: &Path) -> Option<String> {
    if let Ok(Some(v)) = xattr::get(p, STAMP_XATTR) {
        return String::from_utf8(v).ok();
    }
    fs::read_to_string(sibling(p, ".sha256"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Stamps the archive just published at `dest` with `key`: on its inode
/// where the filesystem allows, else in `<dest>.sha256`.
fn stamp(dest: &Path, key: &str) -> Result<(), InitramfsError> {
    match xattr::set(dest, STAMP_XATTR, key.as_bytes()) {
        Ok(()) => Ok(()),
        Err(_) => publish(
            &sibling(dest, ".sha256"),
            format!("{key}\n").as_bytes(),
            0o644,
        ),
    }
}

/// The identity of the files an initrd is built from ([`banger_artifacts::file_id`]):
/// the same identities mean the same bytes (a rebuilt agent is a new inode
/// or a new ctime). A file changed within [`banger_artifacts::file_id::RACY`], or
/// missing, has none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inputs(Vec<FileId>);

impl Inputs {
    fn of(
        agent: &Path,
        kernel_initrd: Option<&Path>,
        now: std::time::SystemTime,
    ) -> Option<Inputs> {
        let one = |p: &Path| match settled(p, now)? {
            FileState::Present(id) => Some(id),
            FileState::Missing => None,
        };
        let mut v = vec![one(agent)?];
        if let Some(k) = kernel_initrd {
            v.push(one(k)?);
        }
        Some(Inputs(v))
    }
}

/// The last initrd this process built: its inputs, their hash and where.
struct Last {
    inputs: Inputs,
    key: String,
    path: PathBuf,
}

static LAST: std::sync::Mutex<Option<Last>> = std::sync::Mutex::new(None);

/// `dest` as the last initrd built from the same `inputs`: already there
/// (its stamp matches), or hard-linked from the last one. `None` means
/// build it.
fn reuse_last(inputs: &Inputs, dest: &Path) -> Option<Built> {
    use std::os::unix::fs::MetadataExt;
    let (key, src) = {
        let last = LAST.lock().ok()?;
        let l = last.as_ref().filter(|l| l.inputs == *inputs)?;
        (l.key.clone(), l.path.clone())
    };
    if dest.is_file() && stamp_of(dest).is_some_and(|s| s == key) {
        return Some(Built::Cached);
    }
    // The source must still be that archive: stat, stamp, link, and the
    // link must be the inode that was stamped.
    let before = fs::metadata(&src).ok()?;
    if stamp_of(&src)? != key {
        return None;
    }
    let _ = fs::remove_file(sibling(dest, ".sha256"));
    let staged = sibling(dest, &format!(".link-{}", std::process::id()));
    let _ = fs::remove_file(&staged);
    fs::hard_link(&src, &staged).ok()?;
    let same =
        fs::metadata(&staged).is_ok_and(|m| m.ino() == before.ino() && m.dev() == before.dev());
    if !same || fs::rename(&staged, dest).is_err() {
        let _ = fs::remove_file(&staged);
        return None;
    }
    // A stamp on the inode came with the link; a stamp file did not.
    if stamp_of(dest).is_none_or(|s| s != key) {
        stamp(dest, &key).ok()?;
    }
    Some(Built::Fresh)
}

fn build_fresh(
    agent: &Path,
    kernel_initrd: Option<&Path>,
    dest: &Path,
) -> Result<Built, InitramfsError> {
    let agent_bytes = fs::read(agent).map_err(|e| InitramfsError::ReadInput(agent.into(), e))?;
    let kernel_bytes = match kernel_initrd {
        Some(p) => Some(fs::read(p).map_err(|e| InitramfsError::ReadInput(p.into(), e))?),
        None => None,
    };
    let key = input_hash(&agent_bytes, kernel_bytes.as_deref());
    if dest.is_file() && stamp_of(dest).is_some_and(|s| s == key) {
        return Ok(Built::Cached);
    }

    let mut out = kernel_bytes.unwrap_or_default();
    // Each archive must start 4-byte aligned; the kernel skips zero padding.
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(&agent_archive(&agent_bytes));

    // A stamp file is removed before the archive is replaced, and a stamp
    // goes on only after, so a crash in between can never pair a stale
    // archive with a fresh stamp (an xattr is on the new inode anyway).
    let _ = fs::remove_file(sibling(dest, ".sha256"));
    publish(dest, &out, 0o644)?;
    stamp(dest, &key)?;
    Ok(Built::Fresh)
}

/// Removes an initrd written by [`build_initrd`] and its cache stamp;
/// missing files are fine.
pub fn remove_initrd(dest: &Path) -> Result<(), InitramfsError> {
    for p in [sibling(dest, ".sha256"), dest.to_path_buf()] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(InitramfsError::WriteOutput(p, e)),
        }
    }
    Ok(())
}

/// The agent archive alone: directories, `dev/console`, `/init` and the
/// trailer.
pub fn agent_archive(agent: &[u8]) -> Vec<u8> {
    let mut w = Newc::default();
    for d in DIRS {
        w.entry(d, S_IFDIR | 0o755, 2, (0, 0), &[]);
    }
    // The kernel opens /dev/console for init's stdio; most kernels create it
    // from their built-in archive, but ours must not depend on that.
    w.entry("dev/console", S_IFCHR | 0o600, 1, (5, 1), &[]);
    w.entry("init", S_IFREG | 0o755, 1, (0, 0), agent);
    w.finish()
}

fn input_hash(agent: &[u8], kernel_initrd: Option<&[u8]>) -> String {
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update((agent.len() as u64).to_le_bytes());
    h.update(agent);
    match kernel_initrd {
        Some(k) => {
            h.update([1]);
            h.update(k);
        }
        None => h.update([0]),
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    use super::*;

    fn have_cpio() -> bool {
        Command::new("cpio").arg("--version").output().is_ok()
    }

    /// `cpio -t -v` listing of `archive` (names with their ls-style modes).
    fn cpio_list(archive: &Path) -> String {
        let out = Command::new("cpio")
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(archive)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn extract(archive: &Path, into: &Path) {
        let st = Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(archive)
            .current_dir(into)
            .stderr(Stdio::inherit())
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn mode_of(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn headers_are_110_bytes_and_everything_is_4_aligned() {
        let a = agent_archive(b"abc");
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // First entry "dev": 110 header + 4 name bytes = 114 -> padded to 116.
        assert_eq!(&a[110..114], b"dev\0");
        assert_eq!(&a[116..122], b"070701");
        let tail = b"TRAILER!!!\0";
        assert!(a.windows(tail.len()).any(|w| w == tail));
    }

    #[test]
    fn real_cpio_reads_dirs_init_and_modes() {
        if !have_cpio() {
            eprintln!(
                "SKIPPED real_cpio_reads_dirs_init_and_modes: cpio missing (apt-get install cpio)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"#!agent binary\x00\x01\x02 of odd length").unwrap();
        let dest = dir.path().join("initramfs.cpio");
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Fresh);

        let listing = cpio_list(&dest);
        let names: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(
            names,
            [
                "dev",
                "proc",
                "sys",
                "run",
                "newroot",
                "dev/console",
                "init"
            ]
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")),
            "{listing}"
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("crw-------") && l.ends_with(" dev/console")),
            "{listing}"
        );

        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        if nix::unistd::geteuid().is_root() {
            extract(&dest, &root);
            assert_eq!(
                fs::read(root.join("init")).unwrap(),
                fs::read(&agent).unwrap()
            );
            assert_eq!(mode_of(&root.join("init")), 0o755);
            for d in DIRS {
                assert!(root.join(d).is_dir(), "{d}");
                assert_eq!(mode_of(&root.join(d)), 0o755, "{d}");
            }
        } else {
            eprintln!(
                "SKIPPED real_cpio_reads_dirs_init_and_modes (extraction part): dev/console needs root to mknod"
            );
        }
    }

    #[test]
    fn appends_to_a_kernel_initrd_and_the_agent_init_comes_last() {
        if !have_cpio() {
            eprintln!(
                "SKIPPED appends_to_a_kernel_initrd_and_the_agent_init_comes_last: cpio missing (apt-get install cpio)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // A "kernel initrd" made by the real cpio, with its own /init and a
        // module directory, so we can see both archives are unpacked.
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("lib/modules")).unwrap();
        fs::write(src.join("init"), b"distro init").unwrap();
        fs::write(src.join("lib/modules/virtio.ko"), b"module").unwrap();
        let kernel_initrd = dir.path().join("distro.cpio");
        let mut child = Command::new("cpio")
            .args(["-o", "-H", "newc", "--quiet", "-F"])
            .arg(&kernel_initrd)
            .current_dir(&src)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"init\nlib\nlib/modules\nlib/modules/virtio.ko\n")
            .unwrap();
        assert!(child.wait().unwrap().success());

        let agent = dir.path().join("agent");
        fs::write(&agent, b"the banger agent").unwrap();
        let dest = dir.path().join("initramfs.cpio");
        build_initrd(&agent, Some(&kernel_initrd), &dest).unwrap();
        let bytes = fs::read(&dest).unwrap();
        let distro = fs::read(&kernel_initrd).unwrap();
        assert_eq!(&bytes[..distro.len()], &distro[..], "kernel initrd first");

        // GNU cpio reads one archive per invocation: the first is the distro's,
        // and what follows its end (after zero padding) is ours.
        let first = cpio_list(&dest);
        assert!(first.contains("lib/modules/virtio.ko"), "{first}");
        let ours = dir.path().join("ours.cpio");
        let start = distro.len().next_multiple_of(4);
        assert!(bytes[distro.len()..start].iter().all(|b| *b == 0));
        fs::write(&ours, &bytes[start..]).unwrap();
        let out = Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", "-F"])
            .arg(&ours)
            .arg("init")
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"the banger agent");
    }

    #[test]
    fn an_archive_stamped_by_a_file_beside_it_is_still_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"agent v1").unwrap();
        let dest = dir.path().join("initramfs.cpio");
        build_initrd(&agent, None, &dest).unwrap();
        let key = stamp_of(&dest).unwrap();
        // As an older banger, or a filesystem without user xattrs, left it.
        xattr::remove(&dest, STAMP_XATTR).unwrap();
        fs::write(sibling(&dest, ".sha256"), format!("{key}\n")).unwrap();
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Cached);
        // A stamp that does not match is rebuilt, and the new archive
        // carries its own stamp.
        fs::write(sibling(&dest, ".sha256"), "stale\n").unwrap();
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Fresh);
        assert_eq!(stamp_of(&dest), Some(key));
        assert!(!sibling(&dest, ".sha256").exists());
        remove_initrd(&dest).unwrap();
        assert!(!dest.exists());
    }

    #[test]
    fn a_second_vm_links_the_last_archive_built_from_the_same_inputs() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"agent v1").unwrap();
        // As if the agent had been installed a while ago.
        let later = std::time::SystemTime::now() + 2 * banger_artifacts::file_id::RACY;
        let (a, b, c) = (
            dir.path().join("a.cpio"),
            dir.path().join("b.cpio"),
            dir.path().join("c.cpio"),
        );
        assert_eq!(
            build_initrd_at(&agent, None, &a, later).unwrap(),
            Built::Fresh
        );
        assert_eq!(
            build_initrd_at(&agent, None, &b, later).unwrap(),
            Built::Fresh
        );
        let (ma, mb) = (fs::metadata(&a).unwrap(), fs::metadata(&b).unwrap());
        assert_eq!(ma.ino(), mb.ino(), "b is a link to a");
        assert!(
            stamp_of(&a).is_some_and(|k| k.len() == 64),
            "{:?}",
            stamp_of(&a)
        );
        assert_eq!(stamp_of(&b), stamp_of(&a));
        for p in [&a, &b] {
            assert!(
                !sibling(p, ".sha256").exists(),
                "the stamp is on the inode, not a file per VM"
            );
        }
        assert_eq!(
            build_initrd_at(&agent, None, &b, later).unwrap(),
            Built::Cached
        );

        // The last archive replaced by another one: not linked, rebuilt.
        fs::remove_file(&b).unwrap();
        fs::write(sibling(&b, ".sha256"), "0\n").unwrap();
        let other = dir.path().join("other");
        fs::write(&other, b"x").unwrap();
        fs::remove_file(&a).unwrap();
        fs::hard_link(&other, &a).unwrap();
        fs::write(sibling(&a, ".sha256"), "stale\n").unwrap();
        assert_eq!(
            build_initrd_at(&agent, None, &c, later).unwrap(),
            Built::Fresh
        );
        assert_ne!(
            fs::metadata(&c).unwrap().ino(),
            fs::metadata(&a).unwrap().ino()
        );
        let bytes = fs::read(&c).unwrap();
        assert!(bytes.windows(8).any(|w| w == b"agent v1"));

        // A just-changed agent is never trusted by its identity.
        assert!(Inputs::of(&agent, None, std::time::SystemTime::now()).is_none());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".link-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn rebuilds_only_when_an_input_changes() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        fs::write(&agent, b"v1").unwrap();
        let dest = dir.path().join("initramfs.cpio");
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Fresh);
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Cached);
        fs::write(&agent, b"v2").unwrap();
        assert_eq!(build_initrd(&agent, None, &dest).unwrap(), Built::Fresh);
        let kernel = dir.path().join("k.cpio");
        fs::write(&kernel, b"07070").unwrap();
        assert_eq!(
            build_initrd(&agent, Some(&kernel), &dest).unwrap(),
            Built::Fresh
        );
        // A stamp without its archive does not count.
        fs::remove_file(&dest).unwrap();
        assert_eq!(
            build_initrd(&agent, Some(&kernel), &dest).unwrap(),
            Built::Fresh
        );
        remove_initrd(&dest).unwrap();
        remove_initrd(&dest).unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            2,
            "only the inputs remain"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_missing_agent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            build_initrd(&dir.path().join("nope"), None, &dir.path().join("out.cpio")).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(!dir.path().join("out.cpio").exists());
    }
}
