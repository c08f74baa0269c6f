//! A VM's writable disks are locked while its VMM runs, so no second VMM (one
//! a killed daemon lost track of, a second daemon, a retried start) boots
//! the same disk.
//!
//! Before spawning, the backend opens every writable drive and takes an
//! exclusive, non-blocking `flock(2)` on it; a drive already locked refuses
//! the launch. The open file is inherited by the VMM (its close-on-exec flag
//! is cleared in the child only, by the spawn's file actions), so the lock lives
//! exactly as long as the VMM process, with no helper process and nothing
//! to clean up: it goes when the VMM exits or is killed. The daemon closes
//! its own copy right after spawning. QEMU also takes its own image locks
//! (`fcntl` OFD locks); those and `flock` do not interfere.
//!
//! Jailed, the lock is on the same inode: QEMU opens the drives by their
//! host paths before it chroots, and Firecracker's jailer places them in
//! its root as hard links or bind mounts of the originals, and the drives
//! are locked by their host paths. But the jailer closes every descriptor
//! above stderr before it execs firecracker, so there a holder process
//! keeps the locks instead ([`DiskLocks::hold_while`]).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::process::Command;

use banger_api::machine::MachineSpec;

use crate::{Detached, VmmError};

/// The locked writable disks of one launch, until handed to the VMM.
#[derive(Debug)]
pub(crate) struct DiskLocks {
    files: Vec<File>,
}

impl DiskLocks {
    /// Locks every writable drive of `machine`, refusing one that is
    /// already locked (by a live VMM).
    pub(crate) fn take(machine: &MachineSpec) -> Result<DiskLocks, VmmError> {
        let mut files = Vec::new();
        for d in machine.drives.iter().filter(|d| !d.read_only) {
            let file = match OpenOptions::new().read(true).open(&d.path) {
                Ok(f) => f,
                // Nothing to protect; the VMM names the missing disk itself.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(VmmError::Io(
                        format!("opening disk {} to lock it", d.path.display()),
                        e,
                    ));
                }
            };
            match lock_exclusive(&file) {
                Ok(()) => files.push(file),
                Err(nix::errno::Errno::EWOULDBLOCK) => {
                    return Err(VmmError::Unsupported(format!(
                        "Disk {} is locked by another process, most likely a VMM still \
                         running this VM; nothing was started. Stop that VMM first \
                         (`fuser -v {}` names it; `banger vm kill` if it is banger's)",
                        d.path.display(),
                        d.path.display()
                    )));
                }
                Err(e) => {
                    return Err(VmmError::Io(
                        format!("locking disk {}", d.path.display()),
                        e.into(),
                    ));
                }
            }
        }
        Ok(DiskLocks { files })
    }

    /// Makes the process inherit the locked files, so it holds the locks
    /// for its whole life. Drop `self` after spawning.
    pub(crate) fn hand_to(&self, what: &mut Detached) {
        for f in &self.files {
            what.keep(f.as_raw_fd());
        }
    }
}

/// The holder of a jailed VMM's locks: `tail --pid=PID -f /dev/null`
/// (coreutils) waits for PID's end, polling every [`HOLDER_POLL`], and
/// holds nothing but the locked files it inherits.
const HOLDER: &str = "tail";
/// How often the holder checks that the VMM lives (`tail -s`).
const HOLDER_POLL: &str = "0.1";

impl DiskLocks {
    /// Keeps the locks for as long as process `pid` (a VMM that could not
    /// inherit them: the jailer closes them) lives, in a holder process of
    /// their own, in a session of its own so that it outlives the daemon
    /// like the VMM does. The holder exits within [`HOLDER_POLL`] seconds
    /// of the VMM, and the locks go with it. Drop `self` afterwards.
    pub(crate) fn hold_while(&self, pid: u32) -> Result<(), VmmError> {
        if self.files.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new(HOLDER);
        cmd.arg(format!("--pid={pid}"))
            .args(["-s", HOLDER_POLL, "-f", "/dev/null"]);
        let mut what = Detached::new(cmd);
        self.hand_to(&mut what);
        crate::spawn_detached(what, std::path::Path::new(HOLDER), "disk-lock").map(drop)
    }
}

/// How long a lock held by someone else may take to go away before the
/// disk counts as in use: a child the daemon forks for anything else holds
/// a copy of every open file until its exec closes it, so a lock dropped a
/// moment ago can still be held that long.
const LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// `flock(LOCK_EX | LOCK_NB)`, retried for [`LOCK_GRACE`] while another
/// holder may be such a transient copy.
fn lock_exclusive(file: &File) -> Result<(), nix::errno::Errno> {
    let deadline = std::time::Instant::now() + LOCK_GRACE;
    loop {
        // `nix::fcntl::Flock` would unlock on drop, but the lock must
        // outlive the daemon's copy of the file (std's `File::try_lock`
        // is newer than the MSRV).
        #[allow(deprecated)]
        let r = nix::fcntl::flock(
            file.as_raw_fd(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        );
        match r {
            Err(nix::errno::Errno::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::machine::{Drive, DriveRole};
    use std::path::Path;
    use std::time::Duration;

    /// A temp dir holding a root disk, and a machine using it.
    fn machine() -> (tempfile::TempDir, std::path::PathBuf, MachineSpec) {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("rootfs.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let m = MachineSpec {
            kernel: "/k".into(),
            initrd: None,
            boot_args: String::new(),
            vcpus: 1,
            memory_mib: 128,
            drives: vec![
                Drive {
                    id: "root".into(),
                    path: disk.clone(),
                    read_only: false,
                    role: DriveRole::Root,
                },
                Drive {
                    id: "config".into(),
                    path: "/nonexistent/read-only-is-not-locked".into(),
                    read_only: true,
                    role: DriveRole::Config,
                },
            ],
            nics: Vec::new(),
            vsock: None,
            serial_log: "/dev/null".into(),
            pci_devices: Vec::new(),
        };
        (dir, disk, m)
    }

    #[test]
    fn the_lock_lives_as_long_as_the_process_that_inherited_it() {
        let (_dir, disk, m) = machine();

        // Both ways a VMM is started: posix_spawn, and fork for a process
        // that joins a cgroup.
        for forks in [false, true] {
            let locks = DiskLocks::take(&m).unwrap();
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            let mut what = Detached::new(cmd);
            if forks {
                what.force_fork();
            }
            locks.hand_to(&mut what);
            let child = crate::spawn_detached(what, Path::new("sleep"), "test").unwrap();
            drop(locks);

            // The daemon's copy is closed; the child still holds the lock.
            let err = DiskLocks::take(&m).unwrap_err().to_string();
            assert!(
                err.contains("is locked by another process"),
                "{forks}: {err}"
            );
            assert!(err.contains(&disk.display().to_string()), "{err}");

            child.abort(Duration::from_secs(5));
            // Gone with the process.
            DiskLocks::take(&m).unwrap();
        }
    }

    #[test]
    fn a_holder_keeps_the_locks_while_the_process_lives_and_drops_them_after() {
        let (_dir, _, m) = machine();
        // A process that closes every inherited descriptor, as the jailer
        // does: it holds no lock of its own.
        let mut vmm = Command::new("sleep").arg("30").spawn().unwrap();
        let locks = DiskLocks::take(&m).unwrap();
        locks.hold_while(vmm.id()).unwrap();
        drop(locks);

        let err = DiskLocks::take(&m).unwrap_err().to_string();
        assert!(err.contains("is locked by another process"), "{err}");

        vmm.kill().unwrap();
        vmm.wait().unwrap();
        // The holder notices within its poll; take() waits out LOCK_GRACE.
        DiskLocks::take(&m).unwrap();
    }

    #[test]
    fn a_process_not_handed_the_locks_does_not_hold_them() {
        let (_dir, _, m) = machine();
        let locks = DiskLocks::take(&m).unwrap();
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        drop(locks);
        let relocked = DiskLocks::take(&m);
        child.kill().unwrap();
        child.wait().unwrap();
        relocked.unwrap();
    }
}
