//! Fixtures the host-networking tests (`net.rs`, `isolation.rs`) share.

use banger_api::model::{ByteSize, VmName, VmRecord, VmSpec, VmState, VmmKind};

/// A hook log that drops everything.
pub struct Quiet;

impl banger_core::capability::HookLog for Quiet {
    fn info(&self, _: &str) {}
    fn warn(&self, _: &str) {}
}

/// A VM record named `name`, starting, with no capabilities.
pub fn vm(name: &str) -> VmRecord {
    let mut vm = VmRecord::new(
        VmName::parse(name).unwrap(),
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            disk_size: ByteSize(1 << 20),
            kernel: "/k".into(),
            initrd: None,
            rootfs_source: "/r".into(),
            extra_boot_args: None,
            vmm: VmmKind::Firecracker,
        },
        vec![],
        0,
    );
    vm.state = VmState::Starting;
    vm
}
