//! The plugin boundary end to end: real cdylibs loaded through
//! `banger_core::plugin_host`, hooks run through the adapter against real
//! temp dirs and real ext4 tools.
//!
//! Needs the plugins built first:
//! `cargo build --workspace` (the test plugins, `banger`, `bangerd`). The
//! minor-revision test builds `plugins/testing/abi-next`, its own
//! workspace, with `cargo build --locked`.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use banger_api::guest::GuestConfig;
    use banger_api::machine::{Drive, DriveRole, MachineSpec};
    use banger_api::machine::{Nic, PciDevice};
    use banger_api::model::{
        ByteSize, CapOptions, VmId, VmName, VmRecord, VmSpec, VmState, VmmKind,
    };
    use banger_core::capability::{
        CapError, CapSource, Capability, HookCtx, HookLog, Manifest, TeardownReason,
    };
    use banger_core::plugin_host::{ABI_VERSION, PluginLoadError, load_plugin, load_plugins};
    use banger_host::hostops::RecordingHostOps;
    use test_infra::{BangerEnv, workspace_cdylib};

    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);

    impl HookLog for Lines {
        fn info(&self, msg: &str) {
            self.0.lock().unwrap().push(format!("info {msg}"));
        }
        fn warn(&self, msg: &str) {
            self.0.lock().unwrap().push(format!("warn {msg}"));
        }
    }

    impl Lines {
        fn all(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    fn record() -> VmRecord {
        let mut vm = VmRecord::new(
            VmName::parse("plug-test").unwrap(),
            VmSpec {
                vcpus: 2,
                memory_mib: 512,
                disk_size: ByteSize(1 << 30),
                kernel: "/k/vmlinux".into(),
                initrd: None,
                rootfs_source: "/images/root.ext4".into(),
                extra_boot_args: None,
                vmm: VmmKind::Firecracker,
            },
            vec![],
            0,
        );
        vm.id = VmId::from_stored("0123456789abcdef".into());
        vm.state = VmState::Starting;
        vm
    }

    fn spec(vm_dir: &Path) -> MachineSpec {
        MachineSpec {
            kernel: "/k/vmlinux".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            vcpus: 2,
            memory_mib: 512,
            drives: vec![Drive {
                id: "root".into(),
                path: vm_dir.join("root.ext4"),
                read_only: false,
                role: DriveRole::Root,
            }],
            nics: vec![],
            vsock: None,
            serial_log: vm_dir.join("serial.log"),
            pci_devices: Vec::new(),
        }
    }

    fn options(pairs: &[(&str, &str)]) -> CapOptions {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Runs `f` with a hook context for `vm_dir` and `opts`.
    struct Harness {
        vm: VmRecord,
        host: RecordingHostOps,
        log: Lines,
        options: CapOptions,
        vm_dir: PathBuf,
        config: banger_api::config::Config,
    }

    impl Harness {
        fn new(vm_dir: &Path, opts: CapOptions) -> Self {
            Harness {
                vm: record(),
                host: RecordingHostOps::default(),
                log: Lines::default(),
                options: opts,
                vm_dir: vm_dir.to_path_buf(),
                config: banger_api::config::Config::defaults(Path::new("/nonexistent/config.toml")),
            }
        }

        fn ctx(&self) -> HookCtx<'_> {
            HookCtx {
                vm: &self.vm,
                vm_dir: &self.vm_dir,
                options: &self.options,
                host: &self.host,
                config: &self.config,
                log: &self.log,
            }
        }
    }

    fn sbin_tool(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    fn debugfs_cat(debugfs: &Path, image: &Path, file: &str) -> String {
        let out = Command::new(debugfs)
            .arg("-R")
            .arg(format!("cat {file}"))
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs cat {file} failed: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn shared_mount() -> (PathBuf, Arc<dyn Capability>) {
        let path = workspace_cdylib("banger-plugin-shared-mount");
        let cap = load_plugin(&path).unwrap();
        (path, cap)
    }

    fn faulty() -> Arc<dyn Capability> {
        load_plugin(&workspace_cdylib("banger-plugin-faulty")).unwrap()
    }

    fn message(err: &CapError) -> String {
        err.to_string()
    }

    #[test]
    fn shared_mount_loads_with_name_description_and_source() {
        let (path, cap) = shared_mount();
        assert_eq!(cap.name(), "shared-mount");
        assert!(!cap.description().is_empty());
        assert_eq!(cap.source(), CapSource::Plugin(path));
    }

    #[test]
    fn shared_mount_builds_attaches_mounts_and_removes_a_read_only_image() {
        let (Some(_mkfs), Some(debugfs)) = (sbin_tool("mkfs.ext4"), sbin_tool("debugfs")) else {
            eprintln!(
                "SKIPPED shared_mount_builds_attaches_mounts_and_removes_a_read_only_image: mkfs.ext4/debugfs not installed"
            );
            return;
        };
        let (_, cap) = shared_mount();
        let tmp = tempfile::tempdir().unwrap();
        let host_dir = tmp.path().join("src");
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir_all(host_dir.join("sub")).unwrap();
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(host_dir.join("file"), "hello from the host\n").unwrap();
        std::fs::write(host_dir.join("sub/inner.txt"), "nested\n").unwrap();

        let opts = options(&[
            ("host", host_dir.to_str().unwrap()),
            ("guest", "/mnt/shared"),
        ]);
        cap.validate_options(&opts).unwrap();
        let h = Harness::new(&vm_dir, opts);

        cap.prepare_host(&h.ctx()).unwrap();
        let image = vm_dir.join("shared-mount.ext4");
        assert!(image.is_file());
        assert_eq!(
            debugfs_cat(&debugfs, &image, "/file"),
            "hello from the host\n"
        );
        assert_eq!(debugfs_cat(&debugfs, &image, "/sub/inner.txt"), "nested\n");
        // Only the published image is left: no staging files.
        let names: Vec<String> = std::fs::read_dir(&vm_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["shared-mount.ext4".to_string()]);
        // The plugin's log lines came through the host callback.
        let lines = h.log.all();
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("info ") && l.contains(host_dir.to_str().unwrap())),
            "{lines:?}"
        );

        let mut machine = spec(&vm_dir);
        cap.configure_machine(&h.ctx(), &mut machine).unwrap();
        assert_eq!(machine.drives.len(), 2);
        assert_eq!(
            machine.drives[1],
            Drive {
                id: "shared-mount".into(),
                path: image.clone(),
                read_only: true,
                role: DriveRole::Extra,
            }
        );
        // A second attach conflicts in the host's add_drive and leaves the spec alone.
        let before = machine.clone();
        let err = cap.configure_machine(&h.ctx(), &mut machine).unwrap_err();
        assert!(message(&err).contains("plugin shared-mount"), "{err}");
        assert_eq!(machine, before);

        let mut guest = GuestConfig::new("plug-test");
        cap.guest_config(&h.ctx(), &mut guest).unwrap();
        assert_eq!(guest.mounts.len(), 1);
        assert_eq!(guest.mounts[0].drive_id, "shared-mount");
        assert_eq!(guest.mounts[0].mount_point, PathBuf::from("/mnt/shared"));
        assert_eq!(guest.mounts[0].fstype, "ext4");
        assert!(guest.mounts[0].read_only);
        // A second mount on the same point is refused by add_mount; bundle untouched.
        let before = guest.clone();
        let err = cap.guest_config(&h.ctx(), &mut guest).unwrap_err();
        assert!(message(&err).contains("plugin shared-mount"), "{err}");
        assert_eq!(guest, before);

        cap.teardown(&h.ctx(), TeardownReason::Delete).unwrap();
        assert!(!image.exists());
        // Teardown tolerates an image that is already gone.
        cap.teardown(&h.ctx(), TeardownReason::Stop).unwrap();
        assert!(h.host.calls().is_empty(), "no privileged host ops needed");
    }

    #[test]
    fn shared_mount_rejects_bad_options_naming_the_plugin() {
        let (_, cap) = shared_mount();
        let err = cap
            .validate_options(&options(&[("host", "relative"), ("guest", "/mnt")]))
            .unwrap_err();
        assert!(matches!(err, CapError::InvalidOptions(_)), "{err:?}");
        let msg = message(&err);
        assert!(msg.starts_with("plugin shared-mount: "), "{msg}");
        assert!(msg.contains("host="), "{msg}");
    }

    #[test]
    fn shared_mount_prepare_fails_cleanly_when_the_host_dir_vanished() {
        let (_, cap) = shared_mount();
        let tmp = tempfile::tempdir().unwrap();
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir_all(&vm_dir).unwrap();
        let h = Harness::new(
            &vm_dir,
            options(&[("host", "/nonexistent/banger-src"), ("guest", "/mnt")]),
        );
        let err = cap.prepare_host(&h.ctx()).unwrap_err();
        assert!(message(&err).contains("plugin shared-mount"), "{err}");
        assert_eq!(std::fs::read_dir(&vm_dir).unwrap().count(), 0);
    }

    #[test]
    fn wrong_abi_plugin_is_refused_naming_the_file_and_both_versions() {
        let path = workspace_cdylib("banger-plugin-wrong-abi");
        let err = load_plugin(&path).unwrap_err();
        assert!(
            matches!(err, PluginLoadError::AbiVersion { found, .. } if found == ABI_VERSION + 1),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains(&format!("ABI {}", ABI_VERSION + 1)), "{msg}");
        assert!(msg.contains(&format!("ABI {ABI_VERSION}")), "{msg}");
    }

    #[test]
    fn faulty_panic_comes_back_as_an_error_and_the_process_survives() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let h = Harness::new(tmp.path(), options(&[("panic", "prepare_host")]));
        cap.validate_options(&h.options).unwrap();

        let err = cap.prepare_host(&h.ctx()).unwrap_err();
        let msg = message(&err);
        assert!(
            msg.contains("plugin faulty panicked in prepare_host"),
            "{msg}"
        );
        assert!(!tmp.path().join("faulty.marker").exists());

        // Still alive, and the same plugin keeps working.
        cap.post_start(&h.ctx()).unwrap();
        cap.teardown(&h.ctx(), TeardownReason::Rollback).unwrap();
        let calls = std::fs::read_to_string(tmp.path().join("faulty.calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["prepare_host", "post_start", "teardown rollback"]
        );
    }

    #[test]
    fn faulty_failure_returns_the_plugins_error_and_leaves_the_spec_alone() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let h = Harness::new(tmp.path(), options(&[("fail", "configure_machine")]));

        cap.prepare_host(&h.ctx()).unwrap();
        assert!(tmp.path().join("faulty.marker").is_file());
        let mut machine = spec(tmp.path());
        let before = machine.clone();
        let err = cap.configure_machine(&h.ctx(), &mut machine).unwrap_err();
        let msg = message(&err);
        assert!(msg.starts_with("plugin faulty: "), "{msg}");
        assert!(msg.contains("fail in configure_machine"), "{msg}");
        assert_eq!(machine, before);

        cap.teardown(&h.ctx(), TeardownReason::Rollback).unwrap();
        assert!(!tmp.path().join("faulty.marker").exists());
        let calls = std::fs::read_to_string(tmp.path().join("faulty.calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["prepare_host", "configure_machine", "teardown rollback"]
        );
        // Each call logged one line through the host callback.
        assert_eq!(h.log.all().len(), 3, "{:?}", h.log.all());
    }

    #[test]
    fn faulty_rejects_unknown_hook_names() {
        let cap = faulty();
        let err = cap
            .validate_options(&options(&[("fail", "reboot")]))
            .unwrap_err();
        assert!(matches!(err, CapError::InvalidOptions(_)), "{err:?}");
        assert!(message(&err).contains("fail=reboot"), "{err}");
    }

    #[test]
    fn load_plugins_loads_the_good_one_and_reports_the_others_by_file() {
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("libbanger_plugin_shared_mount.so");
        let wrong = tmp.path().join("libbanger_plugin_wrong_abi.so");
        let garbage = tmp.path().join("libgarbage.so");
        std::fs::copy(workspace_cdylib("banger-plugin-shared-mount"), &good).unwrap();
        std::fs::copy(workspace_cdylib("banger-plugin-wrong-abi"), &wrong).unwrap();
        std::fs::write(&garbage, b"\x7fELF but not really").unwrap();
        std::fs::write(tmp.path().join("notes.txt"), b"not a plugin").unwrap();

        let report = load_plugins(tmp.path());
        assert_eq!(report.loaded.len(), 1, "{:?}", report.errors);
        assert_eq!(report.loaded[0].name(), "shared-mount");
        assert_eq!(report.loaded[0].source(), CapSource::Plugin(good));

        let paths: Vec<&Path> = report.errors.iter().map(|e| e.path()).collect();
        assert_eq!(paths, [wrong.as_path(), garbage.as_path()]);
        for (err, file) in report
            .errors
            .iter()
            .zip(["libbanger_plugin_wrong_abi.so", "libgarbage.so"])
        {
            assert!(err.to_string().contains(file), "{err}");
        }
    }

    /// A real shared library that is no plugin (this host's libz or libc):
    /// abi_stable's message about the missing root module symbol spans
    /// lines and quotes the symbol as the loader saw it (C terminator
    /// included); the error must be one clean line that says what it is.
    #[test]
    fn a_shared_library_that_is_no_plugin_is_reported_on_one_clean_line() {
        let Some(lib) = [
            "/lib/x86_64-linux-gnu/libz.so.1",
            "/lib/x86_64-linux-gnu/libc.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file()) else {
            eprintln!(
                "SKIP a_shared_library_that_is_no_plugin_...: no libz/libc in /lib/x86_64-linux-gnu"
            );
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let so = tmp.path().join("libnot_a_plugin.so");
        std::fs::copy(lib, &so).unwrap();
        let err = load_plugin(&so).unwrap_err();
        assert!(matches!(err, PluginLoadError::Open { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(so.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains("it is no banger plugin: it exports no plugin root module"),
            "{msg:?}"
        );
        assert!(
            !msg.chars().any(char::is_control),
            "control characters in {msg:?}"
        );
    }

    #[test]
    fn a_plugin_of_another_wire_version_is_refused_at_load() {
        let path = workspace_cdylib("banger-plugin-wrong-wire");
        let err = load_plugin(&path).unwrap_err();
        assert!(
            matches!(err, PluginLoadError::WireVersion { found: 2, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(msg.contains("wire version 2"), "{msg}");
        assert!(msg.contains("speaks version 1"), "{msg}");
        assert!(
            msg.contains("rebuild it against banger-plugin-abi"),
            "{msg}"
        );
    }

    #[test]
    fn deleting_a_vm_whose_plugin_is_gone_says_to_use_force() {
        let env = BangerEnv::new();
        let so = workspace_cdylib("banger-plugin-faulty");
        let installed = env.plugins_dir().join(so.file_name().unwrap());
        std::fs::copy(&so, &installed).unwrap();
        env.create("orphan", &["--cap", "faulty"]).ok();
        env.banger(&["daemon", "stop"]).ok();
        std::fs::remove_file(&installed).unwrap();

        let out = env.banger(&["vm", "delete", "orphan"]).failed();
        // `vm delete` reports per VM ("NAME: error: ...") on stdout.
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(
            said.contains("Capability \"faulty\" is not loaded"),
            "{out:?}"
        );
        assert!(
            said.contains("`banger vm delete orphan --force`"),
            "{out:?}"
        );
        assert_eq!(env.list().len(), 1, "the VM is kept for a retry");
        env.banger(&["vm", "delete", "orphan", "--force"]).ok();
        assert!(env.list().is_empty());
    }

    #[test]
    fn a_v1_plugin_is_refused_naming_the_file_its_version_and_the_supported_one() {
        let path = workspace_cdylib("banger-plugin-v1");
        let err = load_plugin(&path).unwrap_err();
        assert!(
            matches!(&err, PluginLoadError::CrateVersion { found, .. } if found == "0.1.0"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(
            msg.contains("banger-plugin-abi 0.1.0 (plugin ABI 1)"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "banger-plugin-abi {ABI_VERSION}.x (plugin ABI {ABI_VERSION})"
            )),
            "{msg}"
        );
        assert!(
            msg.contains("rebuild it against banger-plugin-abi 2"),
            "{msg}"
        );
    }

    #[test]
    fn a_plugins_manifest_reaches_the_host() {
        assert_eq!(
            faulty().manifest(),
            Manifest {
                after: vec!["work-disk".into()],
                ..Manifest::default()
            }
        );
        let (_, cap) = shared_mount();
        assert_eq!(cap.manifest(), Manifest::default());
    }

    #[test]
    fn a_hung_hook_fails_after_the_timeout_and_the_plugin_keeps_working() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Harness::new(tmp.path(), options(&[("hang", "prepare_host")]));
        h.config.plugin_hook_timeout_secs = 1;
        cap.validate_options(&h.options).unwrap();

        let started = Instant::now();
        let err = cap.prepare_host(&h.ctx()).unwrap_err();
        let took = started.elapsed();
        let msg = message(&err);
        assert!(
            msg.starts_with("plugin faulty: prepare_host did not return within 1s"),
            "{msg}"
        );
        assert!(msg.contains("plugin_hook_timeout_secs"), "{msg}");
        assert!(took >= Duration::from_secs(1), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        // The line it logged before hanging still came through.
        assert!(
            h.log
                .all()
                .contains(&"info faulty: hanging in prepare_host".to_string()),
            "{:?}",
            h.log.all()
        );
        // Other hooks run on their own threads and still answer.
        cap.teardown(&h.ctx(), TeardownReason::Rollback).unwrap();
        let calls = std::fs::read_to_string(tmp.path().join("faulty.calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["prepare_host", "teardown rollback"]
        );
    }

    #[test]
    fn a_disallowed_host_operation_is_refused_and_nothing_runs() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let h = Harness::new(
            tmp.path(),
            options(&[("host_op", "run_command"), ("arg.argv", "reboot")]),
        );
        let err = cap.prepare_host(&h.ctx()).unwrap_err();
        let msg = message(&err);
        assert!(msg.starts_with("plugin faulty: "), "{msg}");
        assert!(
            msg.contains("Host operation \"run_command\" is not allowed; plugins may ask for: create_tap, delete_tap, bind_vfio, rebind_driver, add_nat, remove_nat"),
            "{msg}"
        );
        assert!(h.host.calls().is_empty(), "{:?}", h.host.calls());
        // A tap outside the plugin prefix is refused too.
        let h = Harness::new(
            tmp.path(),
            options(&[("host_op", "delete_tap"), ("arg.name", "bgtap0")]),
        );
        let msg = message(&cap.prepare_host(&h.ctx()).unwrap_err());
        assert!(msg.contains("not a plugin tap name"), "{msg}");
        assert!(h.host.calls().is_empty());
    }

    #[test]
    fn an_allowed_host_operation_runs_through_hostops_for_the_calling_vm() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let h = Harness::new(
            tmp.path(),
            options(&[("host_op", "create_tap"), ("arg.name", "bgp-faulty")]),
        );
        cap.prepare_host(&h.ctx()).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(h.host.calls(), [format!("create_tap bgp-faulty {uid}")]);
        assert!(
            h.log
                .all()
                .contains(&r#"info faulty: host answered {"v":1}"#.to_string()),
            "{:?}",
            h.log.all()
        );
        // The PCI pair reaches HostOps too; the reply lists what was bound
        // (the fake-sysfs run is in pci.rs).
        let h = Harness::new(
            tmp.path(),
            options(&[("host_op", "bind_vfio"), ("arg.address", "0000:01:00.0")]),
        );
        cap.prepare_host(&h.ctx()).unwrap();
        assert_eq!(h.host.calls(), ["bind_vfio 0000:01:00.0"]);
        assert!(
            h.log.all().iter().any(|l| l.starts_with(
                r#"info faulty: host answered {"v":1,"bound":[{"address":"0000:01:00.0""#
            )),
            "{:?}",
            h.log.all()
        );
    }

    #[test]
    fn a_hook_that_hangs_in_a_vm_start_times_out_rolls_back_and_frees_the_vm() {
        let env = BangerEnv::new();
        env.write_config("plugin_hook_timeout_secs = 2\n");
        let so = workspace_cdylib("banger-plugin-faulty");
        std::fs::copy(&so, env.plugins_dir().join(so.file_name().unwrap())).unwrap();

        let out = env
            .create("hung", &["--cap", "faulty:hang=configure_machine"])
            .failed();
        assert!(
            out.stderr.contains("configure_machine:faulty"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("did not return within 2s"),
            "{}",
            out.stderr
        );

        let vm = env.show("hung");
        assert_eq!(vm.record.state, VmState::Error);
        assert!(vm.record.prepared.is_empty(), "{:?}", vm.record.prepared);
        assert!(vm.record.vmm.is_none());
        let calls = std::fs::read_to_string(vm.dir.join("faulty.calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            ["prepare_host", "configure_machine", "teardown rollback"]
        );
        assert!(!vm.dir.join("faulty.marker").exists());
        assert!(!vm.dir.join("work.ext4").exists());
        // The VM's lock was released: delete goes through.
        env.banger(&["vm", "delete", "hung"]).ok();
        assert!(env.list().is_empty());
    }

    /// Built-in hooks run in place on the daemon's runtime; a plugin's
    /// post-start hook may wait on anything, so it runs on the blocking pool
    /// where the lifecycle can race it against the VMM's exit.
    #[test]
    fn a_vmm_that_exits_while_a_plugins_post_start_hangs_fails_the_create_at_once() {
        const HOOK_TIMEOUT_SECS: u64 = 120;
        let mut env = BangerEnv::new();
        env.write_config(&format!(
            "default_caps = [\"work-disk\"]\nplugin_hook_timeout_secs = {HOOK_TIMEOUT_SECS}\n"
        ));
        let so = workspace_cdylib("banger-plugin-faulty");
        std::fs::copy(&so, env.plugins_dir().join(so.file_name().unwrap())).unwrap();
        env.set_env("FAKE_FC_EXIT_AFTER_START", "1:1000");

        let began = Instant::now();
        let out = env
            .create("racer", &["--cap", "faulty:hang=post_start"])
            .failed();
        let took = began.elapsed();
        let text = format!("{}{}", out.stdout, out.stderr);
        // The exit ends it, not the hook's timeout (a failure the exit would
        // explain all the same: only the time tells them apart).
        assert!(
            took < Duration::from_secs(HOOK_TIMEOUT_SECS / 2),
            "the create took {took:?} (hook timeout {HOOK_TIMEOUT_SECS}s):\n{text}"
        );
        assert!(text.contains("post_start:faulty"), "{text}");
        assert!(text.contains("exited with exit status: 1"), "{text}");
        let vm = env.show("racer");
        assert_eq!(vm.record.state, VmState::Error);
        assert!(vm.record.vmm.is_none());
        let calls = std::fs::read_to_string(vm.dir.join("faulty.calls")).unwrap();
        assert!(calls.lines().any(|l| l == "post_start"), "{calls}");
    }

    #[test]
    fn a_plugin_sees_the_machine_and_backend_and_its_edits_are_applied() {
        let cap = faulty();
        let tmp = tempfile::tempdir().unwrap();
        let h = Harness::new(tmp.path(), options(&[("edit", "yes")]));
        cap.validate_options(&h.options).unwrap();
        let mut machine = spec(tmp.path());
        machine.boot_args = "console=ttyS0 reboot=k".into();
        cap.configure_machine(&h.ctx(), &mut machine).unwrap();

        let seen: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("faulty.seen.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(seen["vmm"], "firecracker");
        assert_eq!(seen["machine"]["drives"][0]["id"], "root");
        assert_eq!(seen["machine"]["boot_args"], "console=ttyS0 reboot=k");
        assert_eq!(seen["machine"]["vcpus"], 2);

        assert_eq!(machine.boot_args, "reboot=k faulty=1");
        assert_eq!(
            machine.nics,
            [Nic {
                id: "faulty".into(),
                tap: "bgp-faulty".into(),
                mac: "02:00:00:00:00:fa".into(),
            }]
        );
        assert_eq!(
            machine.pci_devices,
            [PciDevice::Emulated {
                model: "virtio-rng-pci".parse().unwrap(),
            }]
        );
        // The same NIC again conflicts and leaves the spec alone.
        let before = machine.clone();
        let msg = message(&cap.configure_machine(&h.ctx(), &mut machine).unwrap_err());
        assert!(msg.contains("plugin faulty: cannot add NIC"), "{msg}");
        assert_eq!(machine, before);

        let mut guest = GuestConfig::new("plug-test");
        cap.guest_config(&h.ctx(), &mut guest).unwrap();
        assert_eq!(guest.env.get("FAULTY").map(String::as_str), Some("1"));
        assert_eq!(guest.commands, [vec!["true".to_string()]]);
        // A second time the env name is taken.
        let msg = message(&cap.guest_config(&h.ctx(), &mut guest).unwrap_err());
        assert!(msg.contains("guest env FAULTY is already set"), "{msg}");
    }

    /// Builds `plugins/testing/abi-next` (its own workspace: a plugin and a
    /// host one ABI minor revision ahead) and returns its target dir.
    fn build_abi_next() -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let target = test_infra::target_dir().parent().unwrap().join("abi-next");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--locked", "--quiet", "--manifest-path"])
            .arg(root.join("plugins/testing/abi-next/Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building plugins/testing/abi-next failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug")
    }

    #[test]
    fn minor_revisions_a_newer_plugin_loads_and_an_older_one_is_refused_by_a_newer_host() {
        let next = build_abi_next();
        let next_plugin = next.join("libbanger_plugin_next_minor.so");
        // This daemon (2.0) loads a plugin built one minor ahead: it reads
        // the fields it knows and ignores the one it does not.
        let cap = load_plugin(&next_plugin).unwrap();
        assert_eq!(cap.name(), "next-minor");

        // A host one minor ahead reads the new field from that plugin...
        let out = Command::new(next.join("banger-abi-next-host"))
            .arg(&next_plugin)
            .arg(workspace_cdylib("banger-plugin-faulty"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines[0],
            format!("{} name=next-minor probe=21", next_plugin.display()),
            "{stdout}"
        );
        // ...but refuses a plugin of the older minor: abi_stable 0.11 wants a
        // library's prefix types to have at least the loader's fields (see
        // the versioning policy in docs/plugins.md).
        assert!(lines[1].contains("refused"), "{stdout}");
        assert!(stdout.contains("too many fields"), "{stdout}");
        assert!(!out.status.success());
    }

    #[test]
    fn vm_create_refuses_a_plugin_whose_manifest_excludes_the_backend() {
        let env = BangerEnv::new();
        let so = workspace_cdylib("banger-plugin-vfio-passthrough");
        std::fs::copy(&so, env.plugins_dir().join(so.file_name().unwrap())).unwrap();

        let out = env
            .create("gpu", &["--cap", "vfio-passthrough:device=0000:01:00.0"])
            .failed();
        assert!(
            out.stderr.contains(
                "Capability vfio-passthrough does not support the firecracker backend (it supports qemu): create the VM with --vmm qemu"
            ),
            "{}",
            out.stderr
        );
        // Refused before anything was recorded or created.
        assert!(env.list().is_empty());
        assert!(
            std::fs::read_dir(env.state_dir().join("vms"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        );
    }
}
