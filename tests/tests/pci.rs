//! PCI passthrough end to end without a GPU: the real `vfio-passthrough`
//! cdylib, loaded through `banger_core::plugin_host`, runs its hooks against
//! a fake sysfs tree; the device it adds makes the QEMU backend render a
//! PCIe machine with `vfio-pci`, and the backend's host check passes once
//! the group is on vfio-pci. (A real boot with emulated PCI devices is in
//! `qemu_backend.rs`.)
//!
//! Needs the plugin built first: `cargo build -p banger-plugin-vfio-passthrough`.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;

    use banger_core::capability::{CapError, Capability, HookCtx, HookLog, TeardownReason};
    use banger_core::hostops::RecordingHostOps;
    use banger_core::machine::{MachineSpec, PciDevice};
    use banger_core::model::{ByteSize, CapOptions, VmName, VmRecord, VmSpec, VmmKind};
    use banger_core::plugin_host::load_plugin;
    use banger_core::vmm::qemu::{Accel, VfioHost, check_vfio, render_args};
    use banger_plugin_vfio_passthrough::fake_sysfs::FakeSysfs;
    use banger_plugin_vfio_passthrough::fake_sysfs::class::NVME;
    use test_infra::workspace_cdylib;

    const GPU_ADDR: &str = "0000:01:00.0";

    /// Hook log lines are not what these tests look at.
    struct Quiet;
    impl HookLog for Quiet {
        fn info(&self, _: &str) {}
        fn warn(&self, _: &str) {}
    }

    fn plugin() -> Arc<dyn Capability> {
        load_plugin(&workspace_cdylib("banger-plugin-vfio-passthrough")).unwrap()
    }

    /// One VM on the fake host: its record, directory, options and machine.
    struct Vm {
        record: VmRecord,
        dir: tempfile::TempDir,
        options: CapOptions,
        host: RecordingHostOps,
        config: banger_core::config::Config,
        machine: MachineSpec,
    }

    impl Vm {
        fn new(sysfs: &Path, device: &str) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let record = VmRecord::new(
                VmName::parse("gpu").unwrap(),
                VmSpec {
                    vcpus: 2,
                    memory_mib: 1024,
                    disk_size: ByteSize(1 << 30),
                    kernel: "/k/vmlinux".into(),
                    initrd: None,
                    rootfs_source: "/images/root.ext4".into(),
                    extra_boot_args: None,
                    vmm: VmmKind::Qemu,
                },
                vec![],
                0,
            );
            let machine = MachineSpec {
                kernel: "/k/vmlinux".into(),
                initrd: None,
                boot_args: "console=ttyS0".into(),
                vcpus: 2,
                memory_mib: 1024,
                drives: vec![],
                nics: vec![],
                vsock: None,
                serial_log: dir.path().join("serial.log"),
                pci_devices: Vec::new(),
            };
            let options = [
                ("device".to_string(), device.to_string()),
                ("sysfs".to_string(), sysfs.to_str().unwrap().to_string()),
            ]
            .into_iter()
            .collect();
            Vm {
                record,
                dir,
                options,
                host: RecordingHostOps::default(),
                config: banger_core::config::Config::defaults(Path::new(
                    "/nonexistent/config.toml",
                )),
                machine,
            }
        }

        fn ctx(&self) -> HookCtx<'_> {
            HookCtx {
                vm: &self.record,
                vm_dir: self.dir.path(),
                options: &self.options,
                host: &self.host,
                config: &self.config,
                log: &Quiet,
            }
        }
    }

    fn message(err: CapError) -> String {
        let mut out = err.to_string();
        let mut cur = std::error::Error::source(&err);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    #[test]
    fn vfio_plugin_binds_the_group_adds_a_device_qemu_renders_and_gives_it_back() {
        let f = FakeSysfs::with_gpu().unwrap();
        let cap = plugin();
        let mut vm = Vm::new(f.root(), GPU_ADDR);
        cap.validate_options(&vm.options).unwrap();

        cap.prepare_host(&vm.ctx()).unwrap();
        assert_eq!(
            f.read("bus/pci/drivers_probe").unwrap(),
            "0000:01:00.0\n0000:01:00.1\n"
        );
        assert_eq!(
            f.read("bus/pci/drivers/nvidia/unbind").unwrap(),
            "0000:01:00.0\n"
        );

        let mut machine = vm.machine.clone();
        cap.configure_machine(&vm.ctx(), &mut machine).unwrap();
        assert_eq!(
            machine.pci_devices,
            [PciDevice::Vfio {
                address: GPU_ADDR.parse().unwrap()
            }]
        );
        vm.machine = machine;
        let args: Vec<String> =
            render_args(&vm.machine, Path::new("/q"), Path::new("/v"), Accel::Tcg)
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
        assert_eq!(args[1], "microvm,acpi=on,pcie=on");
        assert!(
            args.windows(2)
                .any(|w| w == ["-device", "vfio-pci,host=0000:01:00.0"]),
            "{args:?}"
        );

        // The kernel moves both functions to vfio-pci; the backend's host
        // check then lets the launch go ahead.
        let dev = tempfile::tempdir().unwrap();
        let host = VfioHost {
            sysfs: f.root().to_path_buf(),
            dev_vfio: dev.path().to_path_buf(),
        };
        fs::write(dev.path().join("vfio"), "").unwrap();
        let refused = check_vfio(&vm.machine, &host).unwrap_err().to_string();
        assert!(
            refused.contains("bound to nvidia, not vfio-pci"),
            "{refused}"
        );
        f.bind(GPU_ADDR, Some("vfio-pci")).unwrap();
        f.bind("0000:01:00.1", Some("vfio-pci")).unwrap();
        fs::write(dev.path().join("12"), "").unwrap();
        check_vfio(&vm.machine, &host).unwrap();

        cap.teardown(&vm.ctx(), TeardownReason::Stop).unwrap();
        assert_eq!(
            f.read("bus/pci/drivers/nvidia/bind").unwrap(),
            "0000:01:00.0\n"
        );
        assert_eq!(
            f.read("bus/pci/drivers/snd_hda_intel/bind").unwrap(),
            "0000:01:00.1\n"
        );
        assert!(
            f.read("bus/pci/drivers/pcieport/unbind")
                .unwrap()
                .is_empty()
        );
        assert!(vm.host.calls().is_empty(), "{:?}", vm.host.calls());
    }

    #[test]
    fn vfio_plugin_refusals_name_the_plugin_and_the_cause() {
        let f = FakeSysfs::with_gpu().unwrap();
        f.device("0000:02:00.0", NVME, Some(12), Some("nvme"))
            .unwrap();
        let cap = plugin();

        let vm = Vm::new(f.root(), "01:00.0");
        let err = message(cap.validate_options(&vm.options).unwrap_err());
        assert!(err.contains("vfio-passthrough"), "{err}");
        assert!(err.contains("\"01:00.0\" is not a PCI address"), "{err}");

        let vm = Vm::new(f.root(), GPU_ADDR);
        let err = message(cap.prepare_host(&vm.ctx()).unwrap_err());
        assert!(err.contains("vfio-passthrough"), "{err}");
        assert!(err.contains("0000:02:00.0 (driver nvme)"), "{err}");
        assert!(f.writes().unwrap().is_empty(), "{:?}", f.writes());
    }
}
