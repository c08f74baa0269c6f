//! What a daemon hands the built-in factories, built in a temporary
//! directory for tests.

use std::sync::Arc;

use banger_api::config::Config;
use banger_api::paths::Paths;
use banger_core::capability::{CapEnv, SharedState};
use banger_core::store::Store;
use banger_host::hostops::{HostOps, RecordingHostOps};

/// Owns everything a [`CapEnv`] borrows.
pub(crate) struct TestEnv {
    pub dir: tempfile::TempDir,
    pub paths: Paths,
    pub config: Config,
    pub store: Arc<Store>,
    pub recording: Arc<RecordingHostOps>,
    pub host: Arc<dyn HostOps>,
    pub shared: SharedState,
}

impl TestEnv {
    /// Default config, a real store, recorded host operations.
    pub fn new() -> TestEnv {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        let config = Config::defaults(&paths.config_file());
        let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
        let recording = Arc::new(RecordingHostOps::default());
        TestEnv {
            dir,
            paths,
            config,
            store,
            host: recording.clone(),
            recording,
            shared: SharedState::new(),
        }
    }

    /// The environment the factories get.
    pub fn env(&self) -> CapEnv<'_> {
        CapEnv {
            paths: &self.paths,
            config: &self.config,
            store: &self.store,
            host: &self.host,
            shared: &self.shared,
        }
    }
}

/// A one-vCPU Firecracker VM record named `name`, starting, for hooks
/// that only read the record.
pub(crate) fn test_vm(name: &str) -> banger_api::model::VmRecord {
    use banger_api::model::{ByteSize, VmName, VmRecord, VmSpec, VmState, VmmKind};
    let mut vm = VmRecord::new(
        VmName::parse(name).unwrap(),
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            disk_size: ByteSize(1 << 30),
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
