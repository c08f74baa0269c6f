//! PCI passthrough end to end without a GPU: the real `vfio-passthrough`
//! cdylib, loaded through `banger_core::plugin_host`, runs its hooks; its
//! `bind_vfio` / `rebind_driver` host requests go through the allowlist to
//! the daemon's in-process `HostOps`, pointed at a fake sysfs tree. The
//! device it adds makes the QEMU backend render a PCIe machine with
//! `vfio-pci`, and the backend's host check passes once the group is on
//! vfio-pci. (A real boot with emulated PCI devices is in `qemu_backend.rs`.)
//!
//! Needs the plugin built first: `cargo build -p banger-plugin-vfio-passthrough`.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;

    use banger_api::machine::{MachineSpec, PciDevice};
    use banger_api::model::{ByteSize, CapOptions, VmName, VmRecord, VmSpec, VmmKind};
    use banger_core::capability::{CapError, Capability, HookCtx, HookLog, TeardownReason};
    use banger_core::plugin_host::load_plugin;
    use banger_host::hostops::InProcessHostOps;
    use banger_host::hostops::fake_sysfs::FakeSysfs;
    use banger_host::hostops::fake_sysfs::class::NVME;
    use banger_vmm::qemu::{Accel, AgentTransport, VfioHost, check_vfio, render_args};
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
        host: InProcessHostOps,
        config: banger_api::config::Config,
        machine: MachineSpec,
    }

    impl Vm {
        fn new(sysfs: &FakeSysfs, device: &str) -> Self {
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
            let options = [("device".to_string(), device.to_string())]
                .into_iter()
                .collect();
            Vm {
                record,
                dir,
                options,
                host: InProcessHostOps {
                    pci: sysfs.pci_host(),
                },
                config: banger_api::config::Config::defaults(Path::new("/nonexistent/config.toml")),
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
        let mut vm = Vm::new(&f, GPU_ADDR);
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
        // The daemon recorded each original driver before writing.
        let record = fs::read_to_string(vm.host.pci.records.join("0000:01:00.1.json")).unwrap();
        assert!(record.contains("snd_hda_intel"), "{record}");
        // A second PrepareHost (start after a daemon restart) asks nothing.
        cap.prepare_host(&vm.ctx()).unwrap();
        assert_eq!(
            f.read("bus/pci/drivers_probe").unwrap(),
            "0000:01:00.0\n0000:01:00.1\n"
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
        let args: Vec<String> = render_args(
            &vm.machine,
            Path::new("/q"),
            Path::new("/v"),
            Accel::Tcg,
            AgentTransport::Vsock,
        )
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
        let given_back = f.reads(&[
            "bus/pci/drivers/nvidia/bind",
            "bus/pci/drivers/snd_hda_intel/bind",
            "bus/pci/drivers/pcieport/unbind",
        ]);
        assert_eq!(
            given_back.unwrap(),
            ["0000:01:00.0\n", "0000:01:00.1\n", ""]
        );
        // Given back: the daemon's records are gone, and the plugin's too.
        assert_eq!(
            fs::read_dir(&vm.host.pci.records).unwrap().count(),
            0,
            "records left in {}",
            vm.host.pci.records.display()
        );
        assert!(!vm.dir.path().join("vfio-passthrough.json").exists());
    }

    #[test]
    fn vfio_plugin_refusals_name_the_plugin_and_the_cause() {
        let f = FakeSysfs::with_gpu().unwrap();
        f.device("0000:02:00.0", NVME, Some(12), Some("nvme"))
            .unwrap();
        let cap = plugin();

        let vm = Vm::new(&f, "01:00.0");
        let err = message(cap.validate_options(&vm.options).unwrap_err());
        assert!(err.contains("vfio-passthrough"), "{err}");
        assert!(err.contains("\"01:00.0\" is not a PCI address"), "{err}");

        let vm = Vm::new(&f, GPU_ADDR);
        let err = message(cap.prepare_host(&vm.ctx()).unwrap_err());
        assert!(err.contains("vfio-passthrough"), "{err}");
        assert!(err.contains("0000:02:00.0 (driver nvme)"), "{err}");
        assert!(f.writes().unwrap().is_empty(), "{:?}", f.writes());
    }

    #[test]
    fn vfio_plugin_teardown_that_cannot_give_back_keeps_its_record_and_retries() {
        let f = FakeSysfs::with_gpu().unwrap();
        let cap = plugin();
        let vm = Vm::new(&f, GPU_ADDR);
        cap.prepare_host(&vm.ctx()).unwrap();
        f.bind(GPU_ADDR, Some("vfio-pci")).unwrap();
        f.bind("0000:01:00.1", Some("vfio-pci")).unwrap();

        // nvidia's bind file is gone (the module was unloaded meanwhile).
        let nvidia_bind = f.root().join("bus/pci/drivers/nvidia/bind");
        fs::remove_file(&nvidia_bind).unwrap();
        let err = message(cap.teardown(&vm.ctx(), TeardownReason::Stop).unwrap_err());
        assert!(
            err.contains("Cannot give PCI devices back to their drivers: 0000:01:00.0"),
            "{err}"
        );
        assert!(err.contains("nvidia/bind"), "{err}");
        // The audio function went back; the plugin's record stays for a retry.
        assert_eq!(
            f.read("bus/pci/drivers/snd_hda_intel/bind").unwrap(),
            "0000:01:00.1\n"
        );
        let kept = fs::read_to_string(vm.dir.path().join("vfio-passthrough.json")).unwrap();
        assert!(
            kept.contains(GPU_ADDR) && !kept.contains("0000:01:00.1"),
            "{kept}"
        );

        // The module is back: the next teardown gives the GPU back too.
        fs::write(&nvidia_bind, "").unwrap();
        f.bind("0000:01:00.1", Some("snd_hda_intel")).unwrap();
        f.bind(GPU_ADDR, None).unwrap();
        cap.teardown(&vm.ctx(), TeardownReason::Stop).unwrap();
        assert_eq!(
            f.read("bus/pci/drivers/nvidia/bind").unwrap(),
            "0000:01:00.0\n"
        );
        assert!(!vm.dir.path().join("vfio-passthrough.json").exists());
    }
}
