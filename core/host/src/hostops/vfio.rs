//! Moving host PCI devices between their drivers and `vfio-pci` through
//! sysfs, for the `bind_vfio` / `rebind_driver` host operations: reading a
//! device's driver and IOMMU group, deciding which group members go with it,
//! and the writes (`driver_override`, `unbind`, `drivers_probe`, `bind`).
//!
//! The sysfs root is a field (`/sys` on a real host) so a fake tree
//! ([`super::fake_sysfs`]) can stand in for the kernel in tests. Every device
//! taken from a driver is recorded (its original driver) in a records
//! directory before the first write, so only that driver, or `vfio-pci`, can
//! be bound to it later, even after a daemon restart.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use banger_plugin_abi::wire::{BoundDevice, PciAddress};
use serde::{Deserialize, Serialize};

use super::HostOpsError;

/// The driver that hands devices to VFIO.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// One device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    address: PciAddress,
    driver: Option<String>,
    /// A PCI bridge or port (class 0x0604): it stays with the host.
    bridge: bool,
}

/// An IOMMU group: its number and every device in it, sorted by address.
#[derive(Debug)]
struct IommuGroup {
    id: String,
    members: Vec<Member>,
}

/// What a records file says: the driver a device had before banger took it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    driver: Option<String>,
}

/// The host's PCI devices as sysfs shows them, and where the original
/// drivers of the devices banger took are recorded.
#[derive(Debug, Clone)]
pub struct PciHost {
    /// sysfs (`/sys`).
    pub sysfs: PathBuf,
    /// One file per taken device (`ADDR.json`); `/run/banger/vfio` by
    /// default, so a host reboot (which resets the bindings) clears it too.
    pub records: PathBuf,
}

impl Default for PciHost {
    fn default() -> Self {
        PciHost {
            sysfs: "/sys".into(),
            records: "/run/banger/vfio".into(),
        }
    }
}

fn refuse(op: &'static str, why: String) -> HostOpsError {
    HostOpsError::InvalidArgument { op, why }
}

/// Same domain, bus and device: another function of the same card (a GPU's
/// audio function), which can only go with it.
fn same_card(a: &PciAddress, b: &PciAddress) -> bool {
    a.as_str().split('.').next() == b.as_str().split('.').next()
}

/// The group members to bind with `device`: the device, the other functions
/// of its card and members no host driver holds. Bridges stay with the host;
/// another card a host driver holds refuses the whole bind.
fn plan(device: &PciAddress, group: &IommuGroup) -> Result<Vec<Member>, HostOpsError> {
    let mut take = Vec::new();
    for m in &group.members {
        let free = m.driver.is_none() || m.driver.as_deref() == Some(VFIO_DRIVER);
        if m.bridge && &m.address != device {
            continue;
        }
        if &m.address == device || free || same_card(&m.address, device) {
            take.push(m.clone());
            continue;
        }
        let driver = m.driver.as_deref().unwrap_or("none");
        return Err(refuse(
            "bind_vfio",
            format!(
                "{} (driver {driver}) shares IOMMU group {} with {device} and belongs to another device the host is using; banger will not take it. Put the card in a slot with its own IOMMU group, or unbind {} from {driver} yourself if the host can spare it",
                m.address, group.id, m.address,
            ),
        ));
    }
    Ok(take)
}

impl PciHost {
    fn device(&self, address: &PciAddress) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(address.as_str())
    }

    /// The device's sysfs directory; refused when it is not on this host.
    fn existing(&self, op: &'static str, address: &PciAddress) -> Result<PathBuf, HostOpsError> {
        let dev = self.device(address);
        if dev.exists() {
            Ok(dev)
        } else {
            Err(refuse(
                op,
                format!(
                    "PCI device {address} does not exist on this host ({} is missing); check the address with lspci -D",
                    dev.display()
                ),
            ))
        }
    }

    /// The driver `address` is bound to, if any.
    fn driver(
        &self,
        op: &'static str,
        address: &PciAddress,
    ) -> Result<Option<String>, HostOpsError> {
        link_name(op, &self.device(address).join("driver"))
    }

    /// The IOMMU group of `address`.
    fn iommu_group(&self, address: &PciAddress) -> Result<IommuGroup, HostOpsError> {
        const OP: &str = "bind_vfio";
        let dev = self.existing(OP, address)?;
        let Some(id) = link_name(OP, &dev.join("iommu_group"))? else {
            return Err(refuse(
                OP,
                format!(
                    "PCI device {address} has no IOMMU group: enable the IOMMU (VT-d/AMD-Vi in the firmware, intel_iommu=on or amd_iommu=on on the host kernel command line)"
                ),
            ));
        };
        let dir = dev.join("iommu_group/devices");
        let read_fail = |source| failed(OP, &dir, source);
        let mut members = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read_fail)? {
            let name = entry
                .map_err(|e| failed(OP, &dir, e))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let member: PciAddress = name.parse().map_err(|_| {
                refuse(
                    OP,
                    format!("unexpected entry {name:?} in {}", dir.display()),
                )
            })?;
            let class_file = self.device(&member).join("class");
            let class = match fs::read_to_string(&class_file) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(failed(OP, &class_file, e)),
            };
            members.push(Member {
                driver: self.driver(OP, &member)?,
                bridge: class.trim().starts_with("0x0604"),
                address: member,
            });
        }
        members.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(IommuGroup { id, members })
    }

    fn record_path(&self, address: &PciAddress) -> PathBuf {
        self.records.join(format!("{address}.json"))
    }

    fn read_record(
        &self,
        op: &'static str,
        address: &PciAddress,
    ) -> Result<Option<Record>, HostOpsError> {
        let path = self.record_path(address);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                failed(
                    op,
                    &path,
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("corrupt ({e}); check the device's driver with lspci -k, rebind it by hand and delete the file"),
                    ),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(failed(op, &path, e)),
        }
    }

    /// Stages the record next to its place and renames it in.
    fn write_record(&self, address: &PciAddress, record: &Record) -> Result<(), HostOpsError> {
        let path = self.record_path(address);
        let staged = self.records.join(format!(".{address}.json.tmp"));
        let json = serde_json::to_vec(record).map_err(io::Error::other);
        fs::create_dir_all(&self.records)
            .and_then(|()| fs::write(&staged, json?))
            .and_then(|()| fs::rename(&staged, &path))
            .map_err(|e| {
                let _ = fs::remove_file(&staged);
                failed("bind_vfio", &path, e)
            })
    }

    fn remove_record(&self, op: &'static str, address: &PciAddress) -> Result<(), HostOpsError> {
        let path = self.record_path(address);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(failed(op, &path, e)),
            _ => Ok(()),
        }
    }

    /// Binds `address` and the members of its IOMMU group that must go with
    /// it to `vfio-pci`, recording each one's driver first. Returns every
    /// member taken with its driver before (one already on `vfio-pci` and not
    /// recorded is reported with `vfio-pci` and not written to). When a write
    /// fails, what this call moved is given back.
    pub fn bind_vfio(&self, address: &PciAddress) -> Result<Vec<BoundDevice>, HostOpsError> {
        let group = self.iommu_group(address)?;
        let mut bound = Vec::new();
        for m in plan(address, &group)? {
            let was_bound = m.driver.is_some();
            let recorded = self.read_record("bind_vfio", &m.address)?;
            if m.driver.as_deref() == Some(VFIO_DRIVER) {
                bound.push(BoundDevice {
                    previous_driver: recorded.map_or(m.driver, |r| r.driver),
                    address: m.address,
                });
                continue;
            }
            // A record left by a bind that stopped halfway keeps the original.
            let original = match recorded {
                Some(r) => r.driver,
                None => {
                    let r = Record { driver: m.driver };
                    self.write_record(&m.address, &r)?;
                    r.driver
                }
            };
            bound.push(BoundDevice {
                address: m.address.clone(),
                previous_driver: original,
            });
            if let Err(e) = self.to_vfio(&m.address, was_bound) {
                return Err(self.undo(e, &bound));
            }
        }
        Ok(bound)
    }

    /// Gives back what a failed bind moved (`bound`, last first), keeping
    /// the first error; a failure to give back is added to it.
    fn undo(&self, err: HostOpsError, bound: &[BoundDevice]) -> HostOpsError {
        let mut failures = Vec::new();
        for b in bound.iter().rev() {
            if b.previous_driver.as_deref() == Some(VFIO_DRIVER) {
                continue;
            }
            if let Err(e) = self.rebind_driver(&b.address, b.previous_driver.as_deref()) {
                failures.push(chain(&e));
            }
        }
        if failures.is_empty() {
            return err;
        }
        match err {
            HostOpsError::Failed { op, target, source } => HostOpsError::Failed {
                op,
                target: format!(
                    "{target} (and giving devices back failed too: {})",
                    failures.join("; ")
                ),
                source,
            },
            other => other,
        }
    }

    /// `driver_override`, unbind from its driver (when bound), `drivers_probe`.
    fn to_vfio(&self, address: &PciAddress, bound: bool) -> Result<(), HostOpsError> {
        let dev = self.device(address);
        write_attr("bind_vfio", &dev.join("driver_override"), VFIO_DRIVER)?;
        if bound {
            write_attr("bind_vfio", &dev.join("driver/unbind"), address.as_str())?;
        }
        write_attr(
            "bind_vfio",
            &self.sysfs.join("bus/pci/drivers_probe"),
            address.as_str(),
        )
    }

    /// Gives `address` to `driver`: `vfio-pci` (bind it there if it is not),
    /// or the driver recorded when banger took it (`None`: it had none and
    /// stays unbound). Clears `driver_override`, unbinds it from whatever
    /// holds it now, binds the original and drops the record. Any other
    /// driver, or a device banger has no record of, is refused.
    pub fn rebind_driver(
        &self,
        address: &PciAddress,
        driver: Option<&str>,
    ) -> Result<(), HostOpsError> {
        const OP: &str = "rebind_driver";
        let dev = self.existing(OP, address)?;
        let current = self.driver(OP, address)?;
        if driver == Some(VFIO_DRIVER) {
            return match current.as_deref() {
                Some(VFIO_DRIVER) => Ok(()),
                _ => self.to_vfio(address, current.is_some()),
            };
        }
        let Some(record) = self.read_record(OP, address)? else {
            return Err(refuse(
                OP,
                format!(
                    "banger did not take PCI device {address} from a driver (no record in {}); it may only be bound to {VFIO_DRIVER}",
                    self.records.display()
                ),
            ));
        };
        if record.driver.as_deref() != driver {
            let name = |d: Option<&str>| d.map_or("no driver".to_string(), |d| format!("{d:?}"));
            return Err(refuse(
                OP,
                format!(
                    "PCI device {address} may only go back to its original driver ({}) or {VFIO_DRIVER}, not {}",
                    name(record.driver.as_deref()),
                    name(driver)
                ),
            ));
        }
        write_attr(OP, &dev.join("driver_override"), "")?;
        if current.is_some() {
            write_attr(OP, &dev.join("driver/unbind"), address.as_str())?;
        }
        if let Some(d) = driver {
            write_attr(
                OP,
                &self.sysfs.join("bus/pci/drivers").join(d).join("bind"),
                address.as_str(),
            )?;
        }
        self.remove_record(OP, address)
    }
}

/// `err` and its sources, `: `-separated.
fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(&format!(": {e}"));
        cur = e.source();
    }
    out
}

fn failed(op: &'static str, path: &Path, source: io::Error) -> HostOpsError {
    HostOpsError::Failed {
        op,
        target: path.display().to_string(),
        source,
    }
}

/// The last component of the symlink at `link`, or `None` when there is none.
fn link_name(op: &'static str, link: &Path) -> Result<Option<String>, HostOpsError> {
    match fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed(op, link, e)),
    }
}

/// Writes one line to a sysfs attribute, as `echo` does. Append mode: the
/// kernel ignores the offset, and a fake tree keeps every write in order.
fn write_attr(op: &'static str, path: &Path, value: &str) -> Result<(), HostOpsError> {
    let line = format!("{value}\n");
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| HostOpsError::Failed {
            op,
            target: format!("writing {value:?} to {}", path.display()),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostops::fake_sysfs::FakeSysfs;
    use crate::hostops::fake_sysfs::class::{GPU, NVME};

    fn addr(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// `ADDR (was DRIVER)` for each bound device.
    fn describe(bound: &[BoundDevice]) -> Vec<String> {
        bound
            .iter()
            .map(|b| {
                let was = b.previous_driver.as_deref().unwrap_or("none");
                format!("{} (was {was})", b.address)
            })
            .collect()
    }

    #[test]
    fn binds_the_device_and_its_other_function_and_rebinds_each_to_its_recorded_driver() {
        let f = FakeSysfs::with_gpu().unwrap();
        let host = f.pci_host();
        let bound = host.bind_vfio(&addr("0000:01:00.0")).unwrap();
        assert_eq!(
            describe(&bound),
            [
                "0000:01:00.0 (was nvidia)",
                "0000:01:00.1 (was snd_hda_intel)"
            ]
        );
        // The bridge keeps pcieport; nothing else is touched.
        assert_eq!(
            f.writes().unwrap(),
            pairs(&[
                ("bus/pci/devices/0000:01:00.0/driver_override", "vfio-pci\n"),
                ("bus/pci/devices/0000:01:00.1/driver_override", "vfio-pci\n"),
                ("bus/pci/drivers/nvidia/unbind", "0000:01:00.0\n"),
                ("bus/pci/drivers/snd_hda_intel/unbind", "0000:01:00.1\n"),
                ("bus/pci/drivers_probe", "0000:01:00.0\n0000:01:00.1\n"),
            ])
        );

        // The kernel moves both to vfio-pci. Asked again (a start after a
        // daemon restart), nothing is written and the originals still come
        // from the records.
        f.bind("0000:01:00.0", Some("vfio-pci")).unwrap();
        f.bind("0000:01:00.1", Some("vfio-pci")).unwrap();
        let again = host.bind_vfio(&addr("0000:01:00.0")).unwrap();
        assert_eq!(again, bound);
        assert_eq!(
            f.read("bus/pci/drivers_probe").unwrap(),
            "0000:01:00.0\n0000:01:00.1\n"
        );

        host.rebind_driver(&addr("0000:01:00.1"), Some("snd_hda_intel"))
            .unwrap();
        host.rebind_driver(&addr("0000:01:00.0"), Some("nvidia"))
            .unwrap();
        let given_back = f.reads(&[
            "bus/pci/drivers/vfio-pci/unbind",
            "bus/pci/drivers/nvidia/bind",
            "bus/pci/drivers/snd_hda_intel/bind",
            // An empty line clears the override.
            "bus/pci/devices/0000:01:00.0/driver_override",
            "bus/pci/drivers/pcieport/unbind",
        ]);
        assert_eq!(
            given_back.unwrap(),
            [
                "0000:01:00.1\n0000:01:00.0\n",
                "0000:01:00.0\n",
                "0000:01:00.1\n",
                "vfio-pci\n\n",
                ""
            ]
        );
        // Given back: the records are gone, so a second rebind is refused.
        let err = host
            .rebind_driver(&addr("0000:01:00.0"), Some("nvidia"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("banger did not take PCI device 0000:01:00.0"),
            "{err}"
        );
    }

    #[test]
    fn a_member_on_vfio_is_left_alone_and_an_unbound_one_goes_back_to_no_driver() {
        let f = FakeSysfs::new().unwrap();
        f.device("0000:05:00.0", GPU, Some(3), Some("vfio-pci"))
            .unwrap();
        f.device("0000:06:00.0", NVME, Some(3), None).unwrap();
        let host = f.pci_host();
        let bound = host.bind_vfio(&addr("0000:05:00.0")).unwrap();
        assert_eq!(
            describe(&bound),
            ["0000:05:00.0 (was vfio-pci)", "0000:06:00.0 (was none)"]
        );
        assert_eq!(
            f.writes().unwrap(),
            pairs(&[
                ("bus/pci/devices/0000:06:00.0/driver_override", "vfio-pci\n"),
                ("bus/pci/drivers_probe", "0000:06:00.0\n"),
            ])
        );
        f.bind("0000:06:00.0", Some("vfio-pci")).unwrap();
        // No driver recorded: asking for one is refused, none is what it gets.
        let err = host
            .rebind_driver(&addr("0000:06:00.0"), Some("nvme"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "only go back to its original driver (no driver) or vfio-pci, not \"nvme\""
            ),
            "{err}"
        );
        host.rebind_driver(&addr("0000:06:00.0"), None).unwrap();
        // vfio-pci is always allowed; on vfio-pci already, nothing to write.
        host.rebind_driver(&addr("0000:05:00.0"), Some("vfio-pci"))
            .unwrap();
        assert_eq!(
            f.read("bus/pci/drivers/vfio-pci/unbind").unwrap(),
            "0000:06:00.0\n"
        );
        assert!(!f.root().join("bus/pci/drivers/nvme").exists());
        assert_eq!(
            f.read("bus/pci/devices/0000:05:00.0/driver_override")
                .unwrap(),
            ""
        );
    }

    #[test]
    fn refuses_a_group_with_another_card_on_a_host_driver_writing_nothing() {
        let f = FakeSysfs::with_gpu().unwrap();
        f.device("0000:02:00.0", NVME, Some(12), Some("nvme"))
            .unwrap();
        let host = f.pci_host();
        let err = host.bind_vfio(&addr("0000:01:00.0")).unwrap_err();
        assert!(
            matches!(err, HostOpsError::InvalidArgument { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        for needle in [
            "0000:02:00.0 (driver nvme)",
            "IOMMU group 12",
            "own IOMMU group",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in {msg}");
        }
        assert!(f.writes().unwrap().is_empty(), "{:?}", f.writes().unwrap());
        assert!(!host.records.exists());
    }

    #[test]
    fn refuses_a_device_without_an_iommu_group_or_that_does_not_exist() {
        let f = FakeSysfs::new().unwrap();
        f.device("0000:01:00.0", GPU, None, Some("nvidia")).unwrap();
        let host = f.pci_host();
        let err = host
            .bind_vfio(&addr("0000:01:00.0"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no IOMMU group"), "{err}");
        assert!(err.contains("intel_iommu=on"), "{err}");
        for err in [
            host.bind_vfio(&addr("0000:09:00.0")).unwrap_err(),
            host.rebind_driver(&addr("0000:09:00.0"), None).unwrap_err(),
        ] {
            assert!(
                err.to_string().contains("0000:09:00.0 does not exist"),
                "{err}"
            );
        }
        assert!(f.writes().unwrap().is_empty());
    }

    #[test]
    fn a_driver_banger_did_not_record_is_refused() {
        let f = FakeSysfs::with_gpu().unwrap();
        let host = f.pci_host();
        host.bind_vfio(&addr("0000:01:00.0")).unwrap();
        let err = host
            .rebind_driver(&addr("0000:01:00.0"), Some("snd_hda_intel"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("original driver (\"nvidia\") or vfio-pci, not \"snd_hda_intel\""),
            "{err}"
        );
        // The bridge was never taken: no record, so only vfio-pci.
        let err = host
            .rebind_driver(&addr("0000:00:01.0"), Some("nvidia"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no record in"), "{err}");
        assert!(
            f.read("bus/pci/drivers/snd_hda_intel/bind")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_failed_bind_gives_back_what_it_moved() {
        let f = FakeSysfs::with_gpu().unwrap();
        // drivers_probe cannot be written: the first device is half moved.
        let probe = f.root().join("bus/pci/drivers_probe");
        fs::remove_file(&probe).unwrap();
        fs::create_dir(&probe).unwrap();
        let host = f.pci_host();
        let err = chain(&host.bind_vfio(&addr("0000:01:00.0")).unwrap_err());
        assert!(
            err.starts_with("bind_vfio writing \"0000:01:00.0\" to "),
            "{err}"
        );
        let given_back = f.reads(&[
            "bus/pci/devices/0000:01:00.0/driver_override",
            "bus/pci/drivers/nvidia/bind",
            "bus/pci/devices/0000:01:00.1/driver_override",
        ]);
        assert_eq!(given_back.unwrap(), ["vfio-pci\n\n", "0000:01:00.0\n", ""]);
        assert!(!host.record_path(&addr("0000:01:00.0")).exists());
    }
}
