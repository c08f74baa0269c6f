//! A chrooted QEMU's disks, passed as descriptors (`-add-fd`) instead of
//! paths.
//!
//! QEMU reopens a disk at the end of a migration: read-only when an
//! outgoing one (a snapshot) deactivates it, read-write when an incoming
//! one (a restore) activates it. It reopens by the name it was given, and
//! in the jail's empty chroot a host path names nothing (`bdrv_inactivate_all()
//! failed`). A name of the form `/dev/fdset/N` is looked up in QEMU's own
//! descriptor sets instead: each open dups the set's descriptor whose
//! access mode matches. So every disk gets a set of its own holding a
//! read-only descriptor, and a read-write one when the disk is writable,
//! all opened by the daemon before QEMU starts and inherited by it. Such
//! drives get `file.locking=off` (see `render_args`); the daemon's `flock`
//! on every writable disk still keeps a second VMM off it.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use banger_api::machine::MachineSpec;

use crate::{Detached, VmmError};

/// The prefix QEMU resolves in its descriptor sets.
const FDSET_PREFIX: &str = "/dev/fdset/";

/// Whether `path` names one of QEMU's descriptor sets.
pub(super) fn is_fdset(path: &std::path::Path) -> bool {
    path.starts_with(FDSET_PREFIX)
}

/// Whether a QEMU argument (as `/proc/PID/cmdline` holds it) names one of
/// the descriptor sets, as a `-drive ...,file=/dev/fdset/N` does.
pub(super) fn arg_names_an_fdset(arg: &[u8]) -> bool {
    arg.windows(FDSET_PREFIX.len())
        .any(|w| w == FDSET_PREFIX.as_bytes())
}

/// One disk's descriptors: read-only, and read-write unless the disk is.
#[derive(Debug)]
struct DiskFds {
    /// The disk's host path, for the reader of QEMU's command line.
    path: PathBuf,
    read_only: File,
    read_write: Option<File>,
}

/// The descriptor sets of one launch's disks, set `i + 1` for drive `i`,
/// open until handed to QEMU.
#[derive(Debug)]
pub(super) struct DiskFdSets {
    disks: Vec<DiskFds>,
}

impl DiskFdSets {
    /// Opens every drive of `machine` in the modes QEMU may reopen it in.
    pub(super) fn open(machine: &MachineSpec) -> Result<DiskFdSets, VmmError> {
        let open = |path: &PathBuf, write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .open(path)
                .map_err(|e| {
                    let mode = if write { "read-write" } else { "read-only" };
                    VmmError::Io(
                        format!("opening disk {} {mode} to hand it to QEMU", path.display()),
                        e,
                    )
                })
        };
        let mut disks = Vec::new();
        for d in &machine.drives {
            disks.push(DiskFds {
                path: d.path.clone(),
                read_only: open(&d.path, false)?,
                read_write: if d.read_only {
                    None
                } else {
                    Some(open(&d.path, true)?)
                },
            });
        }
        Ok(DiskFdSets { disks })
    }

    /// `machine` with each drive's path replaced by its set's name.
    pub(super) fn machine(&self, machine: &MachineSpec) -> MachineSpec {
        let mut shown = machine.clone();
        for (i, d) in shown.drives.iter_mut().enumerate() {
            d.path = PathBuf::from(format!("{FDSET_PREFIX}{}", i + 1));
        }
        shown
    }

    /// The `-add-fd` arguments that put the descriptors in their sets.
    /// Each names its disk's host path as the set's `opaque` string, which
    /// QEMU only shows (`query-fdsets`), so that its command line still
    /// says which disk is which.
    pub(super) fn args(&self) -> Vec<OsString> {
        let mut a = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let set = i + 1;
            for f in std::iter::once(&d.read_only).chain(&d.read_write) {
                a.push("-add-fd".into());
                a.push(super::opt_with_path(
                    &format!("fd={},set={set},opaque=", f.as_raw_fd()),
                    &d.path,
                ));
            }
        }
        a
    }

    /// Makes QEMU inherit the descriptors under the numbers [`Self::args`]
    /// names. Drop `self` after spawning.
    pub(super) fn hand_to(&self, what: &mut Detached) {
        for d in &self.disks {
            for f in std::iter::once(&d.read_only).chain(&d.read_write) {
                what.keep(f.as_raw_fd());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::machine::{Drive, DriveRole};

    fn machine(dir: &std::path::Path) -> MachineSpec {
        let drive = |id: &str, read_only| {
            let path = dir.join(format!("{id}.img"));
            std::fs::write(&path, id).unwrap();
            Drive {
                id: id.into(),
                path,
                read_only,
                role: if read_only {
                    DriveRole::Config
                } else {
                    DriveRole::Root
                },
            }
        };
        MachineSpec {
            kernel: dir.join("vmlinux"),
            initrd: None,
            boot_args: String::new(),
            vcpus: 1,
            memory_mib: 128,
            drives: vec![drive("root", false), drive("config", true)],
            nics: Vec::new(),
            vsock: None,
            serial_log: dir.join("serial.log"),
            pci_devices: Vec::new(),
        }
    }

    /// The file and access mode of this process's descriptor `fd`, from
    /// `/proc/self`.
    fn described(fd: &str) -> (PathBuf, i32) {
        let path = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        (path, flags & libc::O_ACCMODE)
    }

    #[test]
    fn each_drive_gets_a_set_with_a_read_write_descriptor_only_when_writable() {
        let dir = tempfile::tempdir().unwrap();
        let m = machine(dir.path());
        let sets = DiskFdSets::open(&m).unwrap();
        let shown = sets.machine(&m);
        let paths: Vec<_> = shown.drives.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            [PathBuf::from("/dev/fdset/1"), PathBuf::from("/dev/fdset/2")]
        );
        // Everything else about the drives is kept.
        assert_eq!(shown.drives[1].read_only, m.drives[1].read_only);
        let args: Vec<String> = sets
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let mut found = Vec::new();
        for pair in args.chunks(2) {
            assert_eq!(pair[0], "-add-fd");
            let (fd, rest) = pair[1]
                .strip_prefix("fd=")
                .and_then(|r| r.split_once(",set="))
                .unwrap();
            let (set, opaque) = rest.split_once(",opaque=").unwrap();
            // Each descriptor is open on its drive's file, in its mode,
            // and the set names that file.
            let (path, mode) = described(fd);
            assert_eq!(PathBuf::from(opaque), path);
            found.push((set.to_string(), path, mode));
        }
        found.sort();
        assert_eq!(
            found,
            [
                ("1".to_string(), m.drives[0].path.clone(), libc::O_RDONLY),
                ("1".to_string(), m.drives[0].path.clone(), libc::O_RDWR),
                ("2".to_string(), m.drives[1].path.clone(), libc::O_RDONLY),
            ]
        );
    }

    #[test]
    fn a_missing_disk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = machine(dir.path());
        m.drives[0].path = dir.path().join("gone.img");
        let err = DiskFdSets::open(&m).unwrap_err().to_string();
        assert!(err.contains("gone.img"), "{err}");
    }
}
