//! What several benches share: the default capability set against the fake
//! firecracker in a private network namespace, load averages, medians.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_infra::BangerEnv;

/// The config line for the default capability set.
pub const DEFAULT_CAPS: &str =
    "default_caps = [\"work-disk\", \"network\", \"dns\", \"file-sync\", \"vsock-agent\"]";

/// Moves this process (call it before any thread starts) into a private
/// network namespace with loopback up, so the network capability's bridge,
/// taps and nft rules stay off the host. Returns where the network runs;
/// without root it stays on the host's network and says so.
pub fn private_network(bench: &str) -> &'static str {
    // SAFETY: unshare only changes this process's namespaces; no other
    // thread exists yet, so every later thread and child inherits it.
    let moved = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0
        && std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
    if moved {
        "a private network namespace"
    } else {
        eprintln!(
            "note {bench}: cannot make a network namespace (not root, or no iproute2); the network capability uses the host's bridge"
        );
        "the host's network"
    }
}

/// A daemon against the fake firecracker with the default capabilities; the
/// fake answers the vsock agent's `/healthz`.
pub fn default_caps_env() -> BangerEnv {
    default_caps_env_in(Path::new("/tmp"))
}

/// [`default_caps_env`] with its directory (disks, sockets, database) under
/// `parent`.
pub fn default_caps_env_in(parent: &Path) -> BangerEnv {
    let mut env = BangerEnv::new_in(parent);
    env.write_config(DEFAULT_CAPS);
    env.set_env("FAKE_FC_AGENT", "1");
    env.banger(&["daemon", "start"]).ok();
    env
}

/// The 1/5/15-minute load averages: 2 shared cores make timings noisy.
pub fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The median, in seconds (0 for none).
pub fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, Duration::as_secs_f64)
}

/// The filesystem holding `dir`, as a reader of a figure needs it: type,
/// device, and for ext4 whether it has a journal (`/proc/fs/jbd2/DEV-8`
/// exists only for a mounted ext4 with one). Without a journal, ext4's
/// inode allocator skips every inode freed in the last 5 to 300 s, each
/// checked in the buffer cache, so creating files costs more the more were
/// deleted lately.
pub fn describe_fs(dir: &Path) -> String {
    let Ok(dir) = dir.canonicalize() else {
        return "unknown filesystem".into();
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // Fields: id parent major:minor root mount-point options ... - type source super-options
    let best = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let (fstype, source) = (r.next()?, r.next()?);
            dir.starts_with(point)
                .then(|| (point.len(), fstype.to_string(), source.to_string()))
        })
        .max_by_key(|m| m.0);
    let Some((_, fstype, source)) = best else {
        return "unknown filesystem".into();
    };
    if fstype != "ext4" {
        return format!("{fstype} on {source}");
    }
    let dev = source.rsplit('/').next().unwrap_or(&source);
    let journal = if Path::new(&format!("/proc/fs/jbd2/{dev}-8")).exists() {
        "with a journal"
    } else {
        "without a journal"
    };
    format!("ext4 {journal} on {source}")
}

/// A fresh ext4 with `mkfs.ext4`'s defaults (so with a journal), on a loop
/// device mounted under /tmp: what most hosts keep their home on, for
/// comparing figures taken on this machine's journal-less root. Unmounted
/// and deleted when dropped.
pub struct ScratchExt4 {
    mount: tempfile::TempDir,
    _image: tempfile::TempDir,
}

impl ScratchExt4 {
    /// An error saying why when it cannot be made (not root, no
    /// `mkfs.ext4`, no loop device).
    pub fn new(size_mib: u64) -> Result<ScratchExt4, String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err("mounting a loop device needs root".into());
        }
        let image = tempfile::Builder::new()
            .prefix("bgjimg")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        let file = image.path().join("ext4.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(|e| format!("{}: {e}", file.display()))?;
        let mount = tempfile::Builder::new()
            .prefix("bgj")
            .tempdir_in("/tmp")
            .map_err(|e| e.to_string())?;
        // Inode tables and journal written now: a lazy init would zero
        // them in the background while the bench runs.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&file))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(mount.path()))?;
        Ok(ScratchExt4 {
            mount,
            _image: image,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.mount.path().to_path_buf()
    }
}

impl Drop for ScratchExt4 {
    fn drop(&mut self) {
        // Lazily: a killed daemon's last VMM may still hold a file open.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.mount.path())
            .status();
    }
}

/// Runs `cmd` to its end: an error naming it, with its stderr, unless it
/// succeeded.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
