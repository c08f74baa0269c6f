//! A sysfs tree in a temp dir, laid out as the kernel lays it out, for tests
//! without PCI hardware (feature `fake-sysfs`):
//! `bus/pci/devices/ADDR/{driver,iommu_group,driver_override,class}`,
//! `bus/pci/drivers/NAME/{bind,unbind}`, `bus/pci/drivers_probe` and
//! `kernel/iommu_groups/N/devices/ADDR`. Attribute files start empty and
//! keep every line written to them; the kernel's part (moving the `driver`
//! link after a bind) is [`FakeSysfs::bind`], called by the test.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::vfio::PciHost;

/// PCI class codes for [`FakeSysfs::device`].
pub mod class {
    /// A VGA controller.
    pub const GPU: &str = "0x030000";
    /// An HD audio function.
    pub const AUDIO: &str = "0x040300";
    /// A PCI bridge / PCIe port.
    pub const BRIDGE: &str = "0x060400";
    /// An NVMe controller.
    pub const NVME: &str = "0x010802";
}

/// The fake tree; removed on drop.
#[derive(Debug)]
pub struct FakeSysfs {
    dir: tempfile::TempDir,
}

impl FakeSysfs {
    /// An empty PCI bus.
    pub fn new() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("bus/pci/devices"))?;
        fs::write(dir.path().join("bus/pci/drivers_probe"), "")?;
        Ok(FakeSysfs { dir })
    }

    /// The usual passthrough host: a GPU (`0000:01:00.0`, nvidia) and its
    /// audio function (`0000:01:00.1`, snd_hda_intel) behind a root port
    /// (`0000:00:01.0`, pcieport), all in IOMMU group 12.
    pub fn with_gpu() -> io::Result<Self> {
        let f = FakeSysfs::new()?;
        f.device("0000:00:01.0", class::BRIDGE, Some(12), Some("pcieport"))?;
        f.device("0000:01:00.0", class::GPU, Some(12), Some("nvidia"))?;
        f.device(
            "0000:01:00.1",
            class::AUDIO,
            Some(12),
            Some("snd_hda_intel"),
        )?;
        Ok(f)
    }

    /// The tree's root, where sysfs would be mounted.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The PCI host operations on this tree, with their binding records in
    /// `records/` beside it (outside `bus/`, so not in [`FakeSysfs::writes`]).
    pub fn pci_host(&self) -> PciHost {
        PciHost {
            sysfs: self.root().to_path_buf(),
            records: self.root().join("records"),
        }
    }

    fn dev(&self, addr: &str) -> PathBuf {
        self.root().join("bus/pci/devices").join(addr)
    }

    fn driver_dir(&self, name: &str) -> io::Result<PathBuf> {
        let d = self.root().join("bus/pci/drivers").join(name);
        if !d.exists() {
            fs::create_dir_all(&d)?;
            fs::write(d.join("bind"), "")?;
            fs::write(d.join("unbind"), "")?;
        }
        Ok(d)
    }

    /// A device of `class` in IOMMU `group` (`None`: the IOMMU is off),
    /// bound to `driver`.
    pub fn device(
        &self,
        addr: &str,
        class: &str,
        group: Option<u32>,
        driver: Option<&str>,
    ) -> io::Result<()> {
        let dev = self.dev(addr);
        fs::create_dir_all(&dev)?;
        fs::write(dev.join("driver_override"), "")?;
        fs::write(dev.join("class"), format!("{class}\n"))?;
        self.bind(addr, driver)?;
        if let Some(g) = group {
            let group_dir = self.root().join(format!("kernel/iommu_groups/{g}"));
            fs::create_dir_all(group_dir.join("devices"))?;
            symlink(&dev, group_dir.join("devices").join(addr))?;
            symlink(&group_dir, dev.join("iommu_group"))?;
        }
        Ok(())
    }

    /// What the kernel does after a successful (un)bind: points the
    /// device's `driver` link at `driver`, or removes it.
    pub fn bind(&self, addr: &str, driver: Option<&str>) -> io::Result<()> {
        let link = self.dev(addr).join("driver");
        match fs::remove_file(&link) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        match driver {
            Some(d) => symlink(self.driver_dir(d)?, link),
            None => Ok(()),
        }
    }

    /// The contents of the file at `rel` below the root.
    pub fn read(&self, rel: &str) -> io::Result<String> {
        fs::read_to_string(self.root().join(rel))
    }

    /// The contents of each file in `rels`, in order (one assertion checks
    /// several attributes).
    pub fn reads(&self, rels: &[&str]) -> io::Result<Vec<String>> {
        rels.iter().map(|r| self.read(r)).collect()
    }

    /// Every attribute file under `bus/` that has been written, with its
    /// contents, sorted by path.
    pub fn writes(&self) -> io::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root().join("bus")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d)? {
                let p = e?.path();
                let meta = fs::symlink_metadata(&p)?;
                if meta.is_dir() {
                    stack.push(p);
                } else if meta.is_file() && p.file_name().is_some_and(|n| n != "class") {
                    let text = fs::read_to_string(&p)?;
                    if !text.is_empty() {
                        let rel = p.strip_prefix(self.root()).unwrap_or(&p);
                        out.push((rel.display().to_string(), text));
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
