//! The host's PCI devices as sysfs shows them: a device's driver, its IOMMU
//! group, and moving a device between drivers (`driver_override`, `unbind`,
//! `drivers_probe`, `bind`). The only place this plugin writes to the host,
//! so it can move behind the daemon's allowlisted host requests in one step.
//!
//! The root is a parameter (`/sys` on a real host) so a fake tree in a temp
//! dir can stand in for the kernel in tests.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use banger_plugin_abi::sdk::PciAddress;

/// The driver that hands devices to VFIO.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// A sysfs read or write that failed.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// The device is not on this host.
    #[error("PCI device {address} does not exist on this host ({} is missing); check the address with lspci -D", path.display())]
    NoDevice {
        /// The device.
        address: PciAddress,
        /// Its sysfs directory.
        path: PathBuf,
    },
    /// The device has no IOMMU group: the IOMMU is off.
    #[error(
        "PCI device {0} has no IOMMU group: enable the IOMMU (VT-d/AMD-Vi in the firmware, intel_iommu=on or amd_iommu=on on the host kernel command line)"
    )]
    NoIommuGroup(PciAddress),
    /// A group member's name is not a PCI address.
    #[error("Unexpected entry {0:?} in an IOMMU group's devices directory")]
    OddGroupEntry(String),
    /// Reading sysfs failed.
    #[error("Cannot read {}", .0.display())]
    Read(PathBuf, #[source] io::Error),
    /// Writing sysfs failed.
    #[error("Cannot write {:?} to {}", .1.trim_end(), .0.display())]
    Write(PathBuf, String, #[source] io::Error),
}

/// One device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its address.
    pub address: PciAddress,
    /// The driver it is bound to, if any.
    pub driver: Option<String>,
    /// A PCI bridge or port (class 0x0604): it stays with the host.
    pub bridge: bool,
}

/// An IOMMU group: its number and every device in it, sorted by address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuGroup {
    /// The group number (`/sys/kernel/iommu_groups/N`).
    pub id: String,
    /// Its devices.
    pub members: Vec<Member>,
}

/// The PCI part of a sysfs tree.
#[derive(Debug, Clone)]
pub struct PciSysfs {
    root: PathBuf,
}

impl PciSysfs {
    /// sysfs mounted at `root` (`/sys`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PciSysfs { root: root.into() }
    }

    fn device(&self, address: &PciAddress) -> PathBuf {
        self.root.join("bus/pci/devices").join(address.as_str())
    }

    /// The driver `address` is bound to, if any.
    pub fn driver(&self, address: &PciAddress) -> Result<Option<String>, SysfsError> {
        link_name(&self.device(address).join("driver"))
    }

    /// The IOMMU group of `address`.
    pub fn iommu_group(&self, address: &PciAddress) -> Result<IommuGroup, SysfsError> {
        let dev = self.device(address);
        if !dev.exists() {
            return Err(SysfsError::NoDevice {
                address: address.clone(),
                path: dev,
            });
        }
        let Some(id) = link_name(&dev.join("iommu_group"))? else {
            return Err(SysfsError::NoIommuGroup(address.clone()));
        };
        let dir = dev.join("iommu_group/devices");
        let entries = fs::read_dir(&dir).map_err(|e| SysfsError::Read(dir.clone(), e))?;
        let mut members = Vec::new();
        for entry in entries {
            let name = entry
                .map_err(|e| SysfsError::Read(dir.clone(), e))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let member: PciAddress = name
                .parse()
                .map_err(|_| SysfsError::OddGroupEntry(name.clone()))?;
            let class_file = self.device(&member).join("class");
            let class = match fs::read_to_string(&class_file) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(SysfsError::Read(class_file, e)),
            };
            members.push(Member {
                driver: self.driver(&member)?,
                bridge: class.trim().starts_with("0x0604"),
                address: member,
            });
        }
        members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(IommuGroup { id, members })
    }

    /// Hands `address` to vfio-pci: `driver_override`, unbind from its
    /// current driver (when it has one), then `drivers_probe`.
    pub fn bind_vfio(&self, address: &PciAddress, current: Option<&str>) -> Result<(), SysfsError> {
        let dev = self.device(address);
        write_attr(&dev.join("driver_override"), VFIO_DRIVER)?;
        if current.is_some() {
            write_attr(&dev.join("driver/unbind"), address.as_str())?;
        }
        write_attr(&self.root.join("bus/pci/drivers_probe"), address.as_str())
    }

    /// Gives `address` back: clear `driver_override`, unbind from whatever
    /// holds it now, and bind `original` (a device that had no driver stays
    /// unbound).
    pub fn restore(&self, address: &PciAddress, original: Option<&str>) -> Result<(), SysfsError> {
        let dev = self.device(address);
        write_attr(&dev.join("driver_override"), "")?;
        if self.driver(address)?.is_some() {
            write_attr(&dev.join("driver/unbind"), address.as_str())?;
        }
        match original {
            Some(driver) => write_attr(
                &self.root.join("bus/pci/drivers").join(driver).join("bind"),
                address.as_str(),
            ),
            None => Ok(()),
        }
    }
}

/// The last component of the symlink at `link`, or `None` when there is none.
fn link_name(link: &Path) -> Result<Option<String>, SysfsError> {
    match fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SysfsError::Read(link.to_path_buf(), e)),
    }
}

/// Writes one line to a sysfs attribute, as `echo` does. Append mode: the
/// kernel ignores the offset, and a fake tree keeps every write in order.
fn write_attr(path: &Path, value: &str) -> Result<(), SysfsError> {
    let line = format!("{value}\n");
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| SysfsError::Write(path.to_path_buf(), line, e))
}
