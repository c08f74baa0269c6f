//! Renders a VM's config drive: the guest config bundle plus the drive
//! order, in the format of `banger_guest_protocol::drive` (documented in
//! docs/guest-contract.md). The lifecycle attaches it as the drive with id
//! [`DRIVE_ID`] after every capability has configured the machine.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub use banger_guest_protocol::drive::ConfigDrive;

use banger_api::guest::GuestConfig;
use banger_api::machine::MachineSpec;

/// Drive id of the config drive in every machine spec.
pub const DRIVE_ID: &str = "config";
/// File name of the config drive inside a VM's directory.
pub const FILE_NAME: &str = "config-drive.img";
/// Kernel command line key naming the config drive's device.
pub const BOOT_ARG: &str = "banger.config";

/// A config drive that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    /// The machine has no drive with id [`DRIVE_ID`] to describe.
    #[error("The machine has no {DRIVE_ID:?} drive to render")]
    NotAttached,
    /// Writing or publishing the image failed.
    #[error("Cannot write the config drive {}", .0.display())]
    Write(PathBuf, #[source] io::Error),
}

/// Writes the config drive for `machine` and `guest` to `path` (staged,
/// renamed, mode 0444) and returns what was written. The drive list is the
/// machine's, in attach order, including the config drive itself.
pub fn render(
    machine: &MachineSpec,
    guest: &GuestConfig,
    path: &Path,
) -> Result<ConfigDrive, ConfigDriveError> {
    if !machine.drives.iter().any(|d| d.id == DRIVE_ID) {
        return Err(ConfigDriveError::NotAttached);
    }
    let drive = ConfigDrive {
        drives: machine.drives.iter().map(|d| d.id.clone()).collect(),
        guest: guest.clone(),
    };
    let bytes = drive.encode();
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        // A leftover from a crashed attempt is read-only; replace it.
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        // Not synced: every start renders it anew before the VMM opens it,
        // and no VM outlives a host restart, so a power loss can cost only
        // a file the next start replaces.
        fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ConfigDriveError::Write(path.into(), e)
    })?;
    Ok(drive)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use banger_api::guest::GuestFile;
    use banger_api::machine::{Drive, DriveRole};

    fn machine(ids: &[&str]) -> MachineSpec {
        MachineSpec {
            kernel: "/k".into(),
            initrd: None,
            boot_args: String::new(),
            vcpus: 1,
            memory_mib: 256,
            drives: ids
                .iter()
                .map(|id| Drive {
                    id: id.to_string(),
                    path: format!("/d/{id}").into(),
                    read_only: *id == DRIVE_ID,
                    role: DriveRole::Extra,
                })
                .collect(),
            nics: vec![],
            vsock: None,
            serial_log: "/s".into(),
            pci_devices: Vec::new(),
        }
    }

    #[test]
    fn writes_a_read_only_image_listing_drives_in_machine_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut guest = GuestConfig::new("web");
        guest.files.push(GuestFile {
            path: "/etc/motd".into(),
            contents: b"hi".to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        let m = machine(&["root", "work", "config", "plugin"]);
        render(&m, &guest, &path).unwrap();
        // Rendering again replaces the read-only file (start after stop).
        let written = render(&m, &guest, &path).unwrap();

        let decoded = ConfigDrive::decode(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(decoded, written);
        assert_eq!(decoded.drives, ["root", "work", "config", "plugin"]);
        assert_eq!(decoded.guest, guest);
        assert_eq!(decoded.device_of("config").as_deref(), Some("/dev/vdc"));
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    #[test]
    fn refuses_a_machine_without_the_config_drive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let err = render(&machine(&["root"]), &GuestConfig::new("x"), &path).unwrap_err();
        assert!(matches!(err, ConfigDriveError::NotAttached), "{err}");
        assert!(!path.exists());
    }
}
