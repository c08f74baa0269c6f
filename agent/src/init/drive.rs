//! Finding and reading the config drive: the device named by the kernel
//! argument `banger.config=/dev/vdX`, else the first `vd*` device in the
//! device directory that starts with the config drive magic. Drivers loaded
//! as modules probe their devices asynchronously, so the lookup retries
//! until the drive shows up or a deadline passes.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_guest_protocol::drive::{self, ConfigDrive, DriveError, HEADER_LEN, MAX_PAYLOAD};

/// Kernel argument naming the config drive device.
pub const CONFIG_ARG: &str = "banger.config=";

/// The config drive could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// The device directory could not be listed.
    #[error("Cannot list devices in {0}")]
    ListDevices(PathBuf, #[source] std::io::Error),
    /// No device carries the magic.
    #[error("No config drive found among {0}/vd*; is the VM missing its config drive?")]
    NotFound(PathBuf),
    /// The named device could not be read.
    #[error("Cannot read config drive {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The device's contents are not a valid config drive.
    #[error("Cannot decode config drive {0}")]
    Decode(PathBuf, #[source] DriveError),
}

/// How often [`discover_within`] looks again. It waits for the kernel to
/// probe devices, nothing else, so polling is the simple honest way.
const POLL: Duration = Duration::from_millis(50);

/// [`discover`], retried while the drive is not there yet (not found, or
/// the named device cannot be opened) until `wait` has passed. A drive
/// that is there but corrupt fails at once.
pub fn discover_within(
    dev: &Path,
    cmdline: &str,
    wait: Duration,
) -> Result<(PathBuf, ConfigDrive), DiscoverError> {
    let deadline = Instant::now() + wait;
    loop {
        match discover(dev, cmdline) {
            Err(DiscoverError::NotFound(_) | DiscoverError::Read(..))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(POLL);
            }
            done => return done,
        }
    }
}

/// Finds the config drive using the kernel command line `cmdline`, scanning
/// `dev` when it names none.
pub fn discover(dev: &Path, cmdline: &str) -> Result<(PathBuf, ConfigDrive), DiscoverError> {
    if let Some(path) = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix(CONFIG_ARG))
    {
        let path = PathBuf::from(path);
        let drive = read(&path)?;
        return Ok((path, drive));
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir(dev)
        .map_err(|e| DiscoverError::ListDevices(dev.to_path_buf(), e))?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            // Whole disks only: vda, vdb, ... not partitions (vda1).
            name.starts_with("vd") && name[2..].chars().all(|c| c.is_ascii_lowercase())
        })
        .map(|e| e.path())
        .collect();
    candidates.sort();
    for path in candidates {
        match read(&path) {
            Ok(drive) => return Ok((path, drive)),
            Err(DiscoverError::Decode(_, DriveError::BadMagic)) | Err(DiscoverError::Read(..)) => {}
            Err(e) => return Err(e),
        }
    }
    Err(DiscoverError::NotFound(dev.to_path_buf()))
}

/// Reads the header, then exactly the payload it announces.
fn read(path: &Path) -> Result<ConfigDrive, DiscoverError> {
    let read_err = |e| DiscoverError::Read(path.to_path_buf(), e);
    let mut f = File::open(path).map_err(read_err)?;
    let mut bytes = vec![0u8; HEADER_LEN];
    if f.read_exact(&mut bytes).is_err() || &bytes[..8] != drive::MAGIC {
        return Err(DiscoverError::Decode(
            path.to_path_buf(),
            DriveError::BadMagic,
        ));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len).min(MAX_PAYLOAD);
    f.take(len).read_to_end(&mut bytes).map_err(read_err)?;
    ConfigDrive::decode(&bytes).map_err(|e| DiscoverError::Decode(path.to_path_buf(), e))
}

#[cfg(test)]
mod tests {
    use banger_guest_protocol::bundle::GuestConfig;

    use super::*;

    fn config(host: &str) -> ConfigDrive {
        ConfigDrive {
            drives: vec!["root".into(), "config".into()],
            guest: GuestConfig::new(host),
        }
    }

    fn fake_dev() -> tempfile::TempDir {
        let dev = tempfile::tempdir().unwrap();
        // An ext4-looking root disk, a partition, and unrelated devices.
        fs::write(dev.path().join("vda"), vec![0u8; 8192]).unwrap();
        fs::write(dev.path().join("vda1"), config("partition").encode()).unwrap();
        fs::write(dev.path().join("sda"), config("not-virtio").encode()).unwrap();
        fs::write(dev.path().join("vdc"), config("scanned").encode()).unwrap();
        fs::write(dev.path().join("vdb"), b"short").unwrap();
        dev
    }

    #[test]
    fn scans_whole_virtio_disks_for_the_magic() {
        let dev = fake_dev();
        let (path, drive) = discover(dev.path(), "console=ttyS0 quiet").unwrap();
        assert_eq!(path, dev.path().join("vdc"));
        assert_eq!(drive.guest.hostname, "scanned");
    }

    #[test]
    fn kernel_argument_wins_over_scanning() {
        let dev = fake_dev();
        let named = dev.path().join("vdd");
        fs::write(&named, config("named").encode()).unwrap();
        let cmdline = format!("console=ttyS0 {CONFIG_ARG}{}", named.display());
        let (path, drive) = discover(dev.path(), &cmdline).unwrap();
        assert_eq!(path, named);
        assert_eq!(drive.guest.hostname, "named");
    }

    #[test]
    fn waits_for_a_drive_that_appears_late() {
        let dev = tempfile::tempdir().unwrap();
        let path = dev.path().join("vdb");
        let late = path.clone();
        // The drive shows up while the lookup is already polling, as a
        // device does when its driver module probes asynchronously.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            fs::write(late, config("late").encode()).unwrap();
        });
        let (found, drive) = discover_within(dev.path(), "", Duration::from_secs(30)).unwrap();
        writer.join().unwrap();
        assert_eq!(found, path);
        assert_eq!(drive.guest.hostname, "late");
    }

    #[test]
    fn gives_up_after_the_deadline_but_not_on_a_corrupt_drive() {
        let dev = tempfile::tempdir().unwrap();
        let wait = Duration::from_millis(200);
        let started = Instant::now();
        let named = format!("{CONFIG_ARG}{}/vdz", dev.path().display());
        assert!(matches!(
            discover_within(dev.path(), &named, wait),
            Err(DiscoverError::Read(..))
        ));
        assert!(started.elapsed() >= wait);

        let mut bytes = config("x").encode();
        bytes[HEADER_LEN + 1] ^= 1;
        fs::write(dev.path().join("vda"), bytes).unwrap();
        let started = Instant::now();
        assert!(matches!(
            discover_within(dev.path(), "", Duration::from_secs(60)),
            Err(DiscoverError::Decode(_, DriveError::Checksum))
        ));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no waiting on a corrupt drive"
        );
    }

    #[test]
    fn reports_missing_and_corrupt_drives() {
        let dev = tempfile::tempdir().unwrap();
        fs::write(dev.path().join("vda"), vec![0u8; 4096]).unwrap();
        assert!(matches!(
            discover(dev.path(), ""),
            Err(DiscoverError::NotFound(_))
        ));
        let mut bytes = config("x").encode();
        bytes[HEADER_LEN + 1] ^= 1;
        fs::write(dev.path().join("vdb"), bytes).unwrap();
        assert!(matches!(
            discover(dev.path(), ""),
            Err(DiscoverError::Decode(_, DriveError::Checksum))
        ));
    }
}
