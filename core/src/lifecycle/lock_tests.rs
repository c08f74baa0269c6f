//! The one lock table: work outside the lifecycle (workspace, guest jobs)
//! holds a VM's lock through [`Lifecycle::lock_vm`], and a stop of the same
//! VM waits for it.

use std::sync::Arc;
use std::time::Duration;

use banger_api::config::Config;
use banger_api::model::{ByteSize, VmName, VmRecord, VmSpec, VmState, VmmKind};
use banger_api::paths::Paths;
use banger_host::hostops::RecordingHostOps;
use banger_vmm::Backends;
use banger_vmm::firecracker::Firecracker;

use crate::capability::Registry;
use crate::lifecycle::{Lifecycle, Progress};
use crate::store::Store;

fn lifecycle(root: &std::path::Path) -> Lifecycle {
    let paths = Paths::from_lookup(|k| (k == "HOME").then(|| root.to_path_buf()), 0).unwrap();
    std::fs::create_dir_all(paths.vms_dir()).unwrap();
    let config = Config::defaults(&root.join("config.toml"));
    let store = Arc::new(Store::open(&root.join("banger.db")).unwrap());
    let artifacts =
        Arc::new(crate::artifacts::Artifacts::new(&paths, store.clone(), &config).unwrap());
    Lifecycle::new(
        paths,
        config,
        store,
        Registry::new(),
        Arc::new(RecordingHostOps::default()),
        Backends::single(Arc::new(Firecracker::new(root.join("no-firecracker")))),
        artifacts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_for_the_lock_a_workspace_operation_holds() {
    let root = tempfile::tempdir().unwrap();
    let lc = Arc::new(lifecycle(root.path()));
    let mut vm = VmRecord::new(
        VmName::parse("busy").unwrap(),
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
    vm.state = VmState::Stopped;
    lc.store.insert_vm(&vm).unwrap();

    // What `workspace prepare` / `export` / a guest job take first.
    let (guard, held) = lc.lock_vm("busy").await.unwrap();
    assert_eq!(held.id, vm.id);
    let stopping = {
        let lc = lc.clone();
        tokio::spawn(async move { lc.stop("busy", &Progress::none()).await })
    };
    // A stop of a stopped VM with nothing to tear down takes milliseconds:
    // unserialised, it would be done long before this.
    let mut stopping = stopping;
    let waited = tokio::time::timeout(Duration::from_secs(2), &mut stopping).await;
    assert!(
        waited.is_err(),
        "stop finished while the workspace lock was held: {waited:?}"
    );
    drop(guard);
    let stopped = tokio::time::timeout(Duration::from_secs(30), stopping)
        .await
        .expect("stop goes on once the lock is released")
        .unwrap()
        .unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
}
