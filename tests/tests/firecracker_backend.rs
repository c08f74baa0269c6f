//! The Firecracker backend against the fake firecracker binary: the API
//! calls it makes and their order, console capture, graceful and forced
//! stops, and that every failure leaves nothing running behind.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use banger_api::machine::{Drive, DriveRole, MachineSpec, Nic, Vsock};
    use banger_api::model::VmmProcess;
    use banger_vmm::firecracker::{Firecracker, JailSettings, Timeouts};
    use banger_vmm::{LaunchPaths, Vmm, VmmError, process_alive, process_start_time};
    use serde_json::{Value, json};
    use tempfile::TempDir;

    const FAKE: &str = env!("CARGO_BIN_EXE_fake-firecracker");

    /// Held while writing a wrapper script or forking: a child forked while
    /// another thread has a script open for writing would make exec fail with
    /// ETXTBSY.
    static FORK_LOCK: Mutex<()> = Mutex::new(());

    fn fork_lock() -> MutexGuard<'static, ()> {
        FORK_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One test's world: a short temp dir (Unix socket paths are < 108 bytes),
    /// backing files, a machine spec and the launch paths.
    struct World {
        dir: TempDir,
        machine: MachineSpec,
        paths: LaunchPaths,
    }

    impl World {
        fn new() -> Self {
            let dir = tempfile::Builder::new()
                .prefix("fc")
                .tempdir_in("/tmp")
                .unwrap();
            let d = dir.path();
            for f in ["vmlinux", "initrd", "root.ext4", "work.ext4", "config.img"] {
                fs::write(d.join(f), b"x").unwrap();
            }
            let drive = |id: &str, file: &str, read_only, role| Drive {
                id: id.into(),
                path: d.join(file),
                read_only,
                role,
            };
            let machine = MachineSpec {
                kernel: d.join("vmlinux"),
                initrd: Some(d.join("initrd")),
                boot_args: "console=ttyS0 reboot=k panic=1".into(),
                vcpus: 2,
                memory_mib: 512,
                drives: vec![
                    drive("root", "root.ext4", false, DriveRole::Root),
                    drive("work", "work.ext4", false, DriveRole::Work),
                    drive("config", "config.img", true, DriveRole::Config),
                ],
                nics: vec![Nic {
                    id: "eth0".into(),
                    tap: "tap-bg0".into(),
                    mac: "06:00:ac:10:00:02".into(),
                }],
                vsock: Some(Vsock {
                    guest_cid: 7,
                    uds_path: d.join("v.sock"),
                }),
                serial_log: d.join("vm/serial.log"),
                pci_devices: Vec::new(),
            };
            let paths = LaunchPaths {
                vm_dir: d.join("vm"),
                api_socket: d.join("run/fc.sock"),
                vmm_log: d.join("vm/firecracker.log"),
            };
            World {
                dir,
                machine,
                paths,
            }
        }

        /// Where the wrapper script writes the fake's pid.
        fn pid_file(&self) -> PathBuf {
            self.dir.path().join("fc.pid")
        }

        /// The pid of the fake the wrapper started.
        fn fake_pid(&self) -> u32 {
            fs::read_to_string(self.pid_file())
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        }

        fn record(&self) -> PathBuf {
            self.dir.path().join("calls.jsonl")
        }

        /// A wrapper that runs the fake with `env` set (tests run in parallel
        /// threads, so the test process's own environment is off limits).
        fn fake_with_env(&self, env: &[(&str, &str)]) -> PathBuf {
            let mut script = format!(
                "#!/bin/sh\nexport FAKE_FC_RECORD='{}'\n",
                self.record().display()
            );
            for (k, v) in env {
                script.push_str(&format!("export {k}='{v}'\n"));
            }
            // exec keeps the pid, so the file names the fake itself.
            script.push_str(&format!(
                "echo $$ > '{}'\nexec '{FAKE}' \"$@\"\n",
                self.pid_file().display()
            ));
            let p = self.dir.path().join("fc.sh");
            let _guard = fork_lock();
            fs::write(&p, script).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p
        }

        /// `(method, path, body)` of every recorded request except readiness probes.
        fn calls(&self, record: &Path) -> Vec<(String, String, Value)> {
            let text = fs::read_to_string(record).unwrap_or_default();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .filter(|v| !(v["method"] == "GET" && v["path"] == "/"))
                .map(|v| {
                    (
                        v["method"].as_str().unwrap().to_owned(),
                        v["path"].as_str().unwrap().to_owned(),
                        v["body"].clone(),
                    )
                })
                .collect()
        }

        fn serial(&self) -> String {
            fs::read_to_string(&self.machine.serial_log).unwrap_or_default()
        }
    }

    fn backend(bin: PathBuf) -> Firecracker {
        Firecracker::with_timeouts(
            bin,
            Timeouts {
                socket_ready: Duration::from_secs(10),
                request: Duration::from_secs(5),
                exit: Duration::from_secs(5),
            },
        )
    }

    fn launch(fc: &Firecracker, w: &World) -> Result<VmmProcess, VmmError> {
        let _guard = fork_lock();
        fc.launch(&w.machine, &w.paths)
    }

    fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pids the fake recorded (to prove the process is gone after a failure).
    fn recorded_pids(record: &Path) -> Vec<u32> {
        let text = fs::read_to_string(record).unwrap_or_default();
        let mut pids: Vec<u32> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["pid"]
                    .as_u64()
                    .unwrap() as u32
            })
            .collect();
        pids.dedup();
        pids
    }

    /// The process is gone and reaped: no zombie left behind. Kill paths
    /// return once the process is dead; the reaper thread collects it just
    /// after, hence the deadline.
    fn assert_gone(pid: u32) {
        wait_until(
            &format!("pid {pid} to be reaped"),
            Duration::from_secs(5),
            || !Path::new(&format!("/proc/{pid}")).exists(),
        );
    }

    /// A fake jailer: records its argv, then does what the real one leaves
    /// firecracker with (minus the chroot itself, which needs a static
    /// binary): every descriptor above stderr closed, the exec-file run from
    /// `<base>/<exec name>/<id>/root` with the API socket there and every
    /// path the API names taken inside it.
    fn fake_jailer(w: &World) -> (PathBuf, PathBuf) {
        let argv = w.dir.path().join("jailer.argv");
        let script = format!(
            r#"#!/bin/bash
for fd in /proc/$$/fd/*; do n=${{fd##*/}}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done
printf '%s\n' "$@" > '{argv}'
while [ $# -gt 0 ]; do
  case "$1" in
    --id) id=$2; shift 2 ;;
    --exec-file) exe=$2; shift 2 ;;
    --chroot-base-dir) base=$2; shift 2 ;;
    --) shift; break ;;
    *) shift ;;
  esac
done
root="$base/$(basename "$exe")/$id/root"
FAKE_FIRECRACKER_ROOT="$root" exec "$exe" "$1" "$root$2"
"#,
            argv = argv.display()
        );
        let p = w.dir.path().join("jailer");
        let _guard = fork_lock();
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        (p, argv)
    }

    /// A world whose VM dir is named `<prefix><pid>` (the VM name: it
    /// names the cgroup, shared by the host), and a backend launching the
    /// fake through the fake jailer. Returns the world, the VM name, the
    /// fake's wrapper, the file the jailer records its argv in, the backend;
    /// or `None` (skipping `test` loudly) unless root, as the jailer is used
    /// only by a root daemon.
    fn jailed_world(
        test: &str,
        prefix: &str,
    ) -> Option<(World, String, PathBuf, PathBuf, Firecracker)> {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP {test}: the jailer is used only by a root daemon");
            return None;
        }
        let mut w = World::new();
        let id = format!("{prefix}{}", std::process::id());
        w.paths.vm_dir = w.dir.path().join(&id);
        fs::create_dir_all(&w.paths.vm_dir).unwrap();
        let fake = w.fake_with_env(&[]);
        let (jailer, argv_file) = fake_jailer(&w);
        let fc = backend(fake.clone()).with_jail(JailSettings {
            jailer_bin: Some(jailer),
            ..JailSettings::default()
        });
        Some((w, id, fake, argv_file, fc))
    }

    #[test]
    fn launches_through_the_jailer_with_the_vms_uid_chroot_and_cgroup_limits() {
        use std::os::unix::fs::MetadataExt;
        let Some((w, id, fake, argv_file, fc)) =
            jailed_world("launches_through_the_jailer", "fcjail")
        else {
            return;
        };
        // The daemon's listener for the agent's announcement (vsock-agent
        // binds it before the launch).
        let uds = w.machine.vsock.as_ref().unwrap().uds_path.clone();
        let ready =
            std::os::unix::net::UnixListener::bind(banger_vmm::vsock::ready_socket_path(&uds))
                .unwrap();
        let p = launch(&fc, &w).unwrap();
        assert!(process_alive(&p));

        let argv: Vec<String> = fs::read_to_string(&argv_file)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let uid: u32 = argv[5].parse().unwrap();
        assert!(uid >= banger_api::backend::DEFAULT_VMM_UID_BASE, "{argv:?}");
        let base = w.paths.vm_dir.join("jail");
        let mut want: Vec<String> = [
            "--id",
            &id,
            "--exec-file",
            &fake.display().to_string(),
            "--uid",
            &uid.to_string(),
            "--gid",
            &uid.to_string(),
            "--chroot-base-dir",
            &base.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // 2 vCPUs, 512 MiB + 512 MiB overhead, 512 tasks.
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            want.extend(["--cgroup-version", "2", "--parent-cgroup", "banger"].map(String::from));
            for c in [
                "cpu.max=200000 100000",
                "memory.max=1073741824",
                "pids.max=512",
            ] {
                want.extend(["--cgroup".to_string(), c.to_string()]);
            }
        } else {
            want.extend(["--cgroup-version", "1", "--parent-cgroup", "banger"].map(String::from));
            for c in [
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=200000",
                "memory.limit_in_bytes=1073741824",
                "pids.max=512",
            ] {
                want.extend(["--cgroup".to_string(), c.to_string()]);
            }
        }
        want.extend(["--", "--api-sock", "/run/firecracker.socket"].map(String::from));
        assert_eq!(argv, want);

        // The chroot holds the VM's files: writable ones are the VM uid's.
        let root = base.join("fc.sh").join(&id).join("root");
        let d = w.dir.path();
        for (inside, original, owned) in [
            ("kernel", d.join("vmlinux"), false),
            ("initrd", d.join("initrd"), false),
            ("drives/root", d.join("root.ext4"), true),
            ("drives/work", d.join("work.ext4"), true),
            ("drives/config", d.join("config.img"), false),
            ("firecracker.log", w.paths.vmm_log.clone(), true),
        ] {
            let m = fs::metadata(root.join(inside)).unwrap();
            let o = fs::metadata(&original).unwrap();
            assert_eq!(
                (m.dev(), m.ino()),
                (o.dev(), o.ino()),
                "{inside} is a hard link"
            );
            assert_eq!(m.uid() == uid, owned, "{inside} owner {}", m.uid());
        }
        assert_eq!(fs::metadata(root.join("run")).unwrap().uid(), uid);
        assert_eq!(
            fs::read_link(&w.paths.api_socket).unwrap(),
            root.join("run/firecracker.socket")
        );
        // Firecracker is told the paths inside its root.
        let calls = w.calls(&w.record());
        let body = |path: &str| calls.iter().find(|c| c.1 == path).unwrap().2.clone();
        assert_eq!(body("/logger")["log_path"], "/firecracker.log");
        assert_eq!(body("/boot-source")["kernel_image_path"], "/kernel");
        assert_eq!(body("/drives/root")["path_on_host"], "/drives/root");
        assert_eq!(body("/vsock")["uds_path"], "/vsock/v.sock");
        assert_eq!(fs::read_link(&uds).unwrap(), root.join("vsock/v.sock"));
        // Firecracker, in its root, delivers the announcement to
        // /vsock/v.sock_1025: the daemon's listener, as the VM's uid's.
        let inside = root.join("vsock/v.sock_1025");
        let (m, o) = (
            fs::metadata(&inside).unwrap(),
            fs::metadata(banger_vmm::vsock::ready_socket_path(&uds)).unwrap(),
        );
        assert_eq!((m.dev(), m.ino()), (o.dev(), o.ino()), "a hard link");
        assert_eq!(m.uid(), uid);
        std::os::unix::net::UnixStream::connect(&inside).unwrap();
        ready.accept().unwrap();
        // The VMM is in the VM's cgroup; kill empties and removes it and the jail.
        let cgroups = fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        assert!(cgroups.contains(&format!("/banger/{id}\n")), "{cgroups}");
        fc.kill(&p).unwrap();
        assert!(!process_alive(&p));
        assert!(!base.exists(), "the jail is removed");
        assert!(!w.paths.api_socket.exists());
        assert_eq!(
            fs::read(d.join("root.ext4")).unwrap(),
            b"x",
            "originals stay"
        );
    }

    #[test]
    fn launch_configures_every_resource_in_order_then_boots() {
        let w = World::new();
        // The fake itself, not a wrapper: also proves the default record path.
        let fc = backend(FAKE.into());
        let p = launch(&fc, &w).unwrap();
        assert!(process_alive(&p));
        assert_eq!(p.api_socket, w.paths.api_socket);
        assert_eq!(process_start_time(p.pid), Some(p.start_time));

        let record = PathBuf::from(format!("{}.calls.jsonl", w.paths.api_socket.display()));
        let calls = w.calls(&record);
        let d = w.dir.path();
        let expected = vec![
            (
                "/logger",
                json!({"log_path": d.join("vm/firecracker.log"), "level": "Info", "show_level": true, "show_log_origin": false}),
            ),
            // The backend adds pci=off: this machine has no PCI devices.
            (
                "/boot-source",
                json!({"kernel_image_path": d.join("vmlinux"), "initrd_path": d.join("initrd"), "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}),
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 512}),
            ),
            (
                "/drives/root",
                json!({"drive_id": "root", "path_on_host": d.join("root.ext4"), "is_root_device": true, "is_read_only": false}),
            ),
            (
                "/drives/work",
                json!({"drive_id": "work", "path_on_host": d.join("work.ext4"), "is_root_device": false, "is_read_only": false}),
            ),
            (
                "/drives/config",
                json!({"drive_id": "config", "path_on_host": d.join("config.img"), "is_root_device": false, "is_read_only": true}),
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap-bg0", "guest_mac": "06:00:ac:10:00:02"}),
            ),
            (
                "/vsock",
                json!({"guest_cid": 7, "uds_path": d.join("v.sock")}),
            ),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ];
        let got: Vec<(&str, &Value)> = calls
            .iter()
            .map(|(m, path, body)| {
                assert_eq!(m, "PUT", "{path}");
                (path.as_str(), body)
            })
            .collect();
        let want: Vec<(&str, &Value)> = expected.iter().map(|(p, b)| (*p, b)).collect();
        assert_eq!(got, want);
        assert!(w.paths.vmm_log.is_file(), "the VMM log is created");

        wait_until("the console lines", Duration::from_secs(5), || {
            w.serial().contains("fake-firecracker: guest booted")
        });
        fc.kill(&p).unwrap();
        assert!(!process_alive(&p));
        assert!(!w.paths.api_socket.exists());
    }

    #[test]
    fn launch_omits_optional_parts_and_appends_to_the_serial_log() {
        let mut w = World::new();
        w.machine.initrd = None;
        w.machine.vsock = None;
        w.machine.nics.clear();
        fs::create_dir_all(w.machine.serial_log.parent().unwrap()).unwrap();
        fs::write(&w.machine.serial_log, "previous boot\n").unwrap();
        let fc = backend(w.fake_with_env(&[]));
        let p = launch(&fc, &w).unwrap();
        let calls = w.calls(&w.record());
        let paths: Vec<&str> = calls.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/logger",
                "/boot-source",
                "/machine-config",
                "/drives/root",
                "/drives/work",
                "/drives/config",
                "/actions"
            ]
        );
        assert!(calls[1].2.get("initrd_path").is_none(), "{}", calls[1].2);
        wait_until("the console lines", Duration::from_secs(5), || {
            w.serial().contains("guest booted")
        });
        assert!(w.serial().starts_with("previous boot\n"));
        fc.kill(&p).unwrap();
    }

    #[test]
    fn shutdown_sends_ctrl_alt_del_and_the_vmm_exits() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[]));
        let p = launch(&fc, &w).unwrap();
        let grace = Duration::from_secs(20);
        let started = Instant::now();
        fc.shutdown(&p, grace).unwrap();
        assert!(
            started.elapsed() < grace,
            "it exited on its own, not by kill"
        );
        assert!(!process_alive(&p));
        assert!(!w.paths.api_socket.exists());
        let calls = w.calls(&w.record());
        let last = calls.last().unwrap();
        assert_eq!(
            (last.1.as_str(), &last.2),
            ("/actions", &json!({"action_type": "SendCtrlAltDel"}))
        );
        assert!(
            w.serial().contains("Ctrl-Alt-Del, exiting"),
            "{}",
            w.serial()
        );
    }

    #[test]
    fn shutdown_kills_after_grace_when_the_guest_ignores_ctrl_alt_del() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[("FAKE_FC_IGNORE_CTRLALTDEL", "1")]));
        let p = launch(&fc, &w).unwrap();
        let grace = Duration::from_millis(300);
        let started = Instant::now();
        fc.shutdown(&p, grace).unwrap();
        assert!(started.elapsed() >= grace, "waited the grace period first");
        assert!(!process_alive(&p));
        assert_gone(p.pid);
        assert!(!w.paths.api_socket.exists());
        let calls = w.calls(&w.record());
        assert_eq!(calls.last().unwrap().2["action_type"], "SendCtrlAltDel");
        assert!(w.serial().contains("ignoring Ctrl-Alt-Del"));
    }

    #[test]
    fn shutdown_kills_at_once_when_the_api_does_not_answer() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[]));
        let p = launch(&fc, &w).unwrap();
        fs::remove_file(&w.paths.api_socket).unwrap();
        let grace = Duration::from_secs(20);
        let started = Instant::now();
        fc.shutdown(&p, grace).unwrap();
        assert!(started.elapsed() < grace);
        assert!(!process_alive(&p));
        assert!(
            !w.calls(&w.record())
                .iter()
                .any(|c| c.2["action_type"] == "SendCtrlAltDel")
        );
    }

    #[test]
    fn kill_stops_the_vmm_and_removes_its_socket() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[]));
        let p = launch(&fc, &w).unwrap();
        fc.kill(&p).unwrap();
        assert!(!process_alive(&p));
        assert_gone(p.pid);
        assert!(!w.paths.api_socket.exists());
        // Stopping something already gone is not an error.
        fc.kill(&p).unwrap();
        fc.shutdown(&p, Duration::from_millis(10)).unwrap();
    }

    #[test]
    fn injected_api_failure_is_reported_and_leaves_nothing_behind() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[("FAKE_FC_FAIL", "PUT /drives/work")]));
        let err = launch(&fc, &w).unwrap_err();
        match &err {
            VmmError::Api {
                vmm,
                request,
                fault,
            } => {
                assert_eq!(*vmm, "firecracker");
                assert_eq!(request, "PUT /drives/work");
                assert!(
                    fault.contains("Injected failure for PUT /drives/work"),
                    "{fault}"
                );
            }
            other => panic!("expected Api, got {other:?}"),
        }
        assert!(err.to_string().contains("PUT /drives/work"), "{err}");
        assert!(!w.paths.api_socket.exists());
        let pids = recorded_pids(&w.record());
        assert_eq!(pids, [w.fake_pid()]);
        assert_gone(pids[0]);
        let calls = w.calls(&w.record());
        assert_eq!(calls.last().unwrap().1, "/drives/work");
        assert!(!calls.iter().any(|c| c.1 == "/actions"), "never booted");
    }

    #[test]
    fn firecracker_validation_faults_are_surfaced() {
        let mut w = World::new();
        let missing = w.dir.path().join("missing.ext4");
        w.machine.drives[1].path = missing.clone();
        let fc = backend(w.fake_with_env(&[]));
        let err = launch(&fc, &w).unwrap_err();
        let VmmError::Api { request, fault, .. } = &err else {
            panic!("expected Api, got {err:?}");
        };
        assert_eq!(request, "PUT /drives/work");
        assert!(fault.contains(&missing.display().to_string()), "{fault}");
        assert!(!w.paths.api_socket.exists());
        assert_gone(recorded_pids(&w.record())[0]);
    }

    #[test]
    fn early_exit_reports_status_and_log_tail_and_leaves_nothing() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[("FAKE_FC_EXIT_EARLY", "1")]));
        let err = launch(&fc, &w).unwrap_err();
        let VmmError::NotReady(msg) = &err else {
            panic!("expected NotReady, got {err:?}");
        };
        assert!(msg.contains("exit status: 1"), "{msg}");
        assert!(msg.contains("injected early exit"), "{msg}");
        assert!(!w.paths.api_socket.exists());
        assert!(!w.record().exists(), "no request was ever served");
        assert_gone(w.fake_pid());
    }

    #[test]
    fn slow_start_is_waited_for() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[("FAKE_FC_START_DELAY_MS", "300")]));
        let p = launch(&fc, &w).unwrap();
        assert!(process_alive(&p));
        fc.kill(&p).unwrap();
    }

    #[test]
    fn socket_timeout_kills_the_vmm() {
        let w = World::new();
        let fc = Firecracker::with_timeouts(
            w.fake_with_env(&[("FAKE_FC_START_DELAY_MS", "30000")]),
            Timeouts {
                socket_ready: Duration::from_millis(300),
                ..Timeouts::default()
            },
        );
        let started = Instant::now();
        let err = launch(&fc, &w).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "it did not wait for the fake"
        );
        let VmmError::NotReady(msg) = &err else {
            panic!("expected NotReady, got {err:?}");
        };
        assert!(msg.contains("did not answer"), "{msg}");
        assert!(!w.paths.api_socket.exists());
        assert_gone(w.fake_pid());
    }

    #[test]
    fn missing_binary_is_a_spawn_error_naming_the_path() {
        let w = World::new();
        let bin = w.dir.path().join("no-such-firecracker");
        let err = launch(&Firecracker::new(bin.clone()), &w).unwrap_err();
        match &err {
            VmmError::Spawn { bin: b, source } => {
                assert_eq!(b, &bin);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Spawn, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&bin.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn vmm_runs_in_its_own_session_and_process_group() {
        let w = World::new();
        let fc = backend(w.fake_with_env(&[]));
        let p = launch(&fc, &w).unwrap();
        let stat = fs::read_to_string(format!("/proc/{}/stat", p.pid)).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        // After the comm: state, ppid, pgrp, session.
        let (pgrp, session): (u32, u32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        assert_eq!(pgrp, p.pid, "leads its own process group");
        assert_eq!(session, p.pid, "leads its own session");
        let my_sid = nix::unistd::getsid(None).unwrap().as_raw() as u32;
        assert_ne!(session, my_sid);
        fc.kill(&p).unwrap();
    }

    #[test]
    fn stopping_never_signals_a_reused_pid() {
        let mut child = {
            let _guard = fork_lock();
            Command::new("sleep").arg("30").spawn().unwrap()
        };
        let pid = child.id();
        let real = process_start_time(pid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let stale = VmmProcess {
            pid,
            start_time: real + 1,
            api_socket: dir.path().join("gone.sock"),
        };
        let fc = backend(FAKE.into());
        fc.kill(&stale).unwrap();
        fc.shutdown(&stale, Duration::from_millis(10)).unwrap();
        assert!(
            child.try_wait().unwrap().is_none(),
            "the unrelated process survived"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `flock -n PATH true`: whether nobody holds a lock on PATH.
    fn unlocked(path: &Path) -> bool {
        Command::new("flock")
            .arg("-n")
            .arg(path)
            .arg("true")
            .status()
            .unwrap()
            .success()
    }

    #[test]
    fn a_jailed_vmm_keeps_its_disks_locked_though_the_jailer_closes_inherited_files() {
        let Some((w, _, _, _, fc)) = jailed_world("a_jailed_vmm_keeps_its_disks_locked", "fclock")
        else {
            return;
        };
        let p = launch(&fc, &w).unwrap();
        let disks = [
            w.dir.path().join("root.ext4"),
            w.dir.path().join("work.ext4"),
        ];
        // The VMM holds no descriptor of its disks: the jailer closed them.
        let open: Vec<PathBuf> = fs::read_dir(format!("/proc/{}/fd", w.fake_pid()))
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .filter(|t| disks.contains(t))
            .collect();
        assert!(open.is_empty(), "the VMM inherited {open:?}");
        // Still, the disks (the same inodes as the jail's links) are locked
        // while it runs, so no second VMM opens them.
        for d in &disks {
            assert!(!unlocked(d), "{} is not locked", d.display());
        }
        // A second VM of its own on the same disks, unjailed.
        let mut second = w.machine.clone();
        second.vsock = None;
        second.serial_log = w.dir.path().join("vm2/serial.log");
        let second_paths = LaunchPaths {
            vm_dir: w.dir.path().join("vm2"),
            api_socket: w.dir.path().join("run/fc2.sock"),
            vmm_log: w.dir.path().join("vm2/firecracker.log"),
        };
        let err = {
            let _guard = fork_lock();
            backend(PathBuf::from(FAKE)).launch(&second, &second_paths)
        }
        .unwrap_err()
        .to_string();
        assert!(err.contains("is locked by another process"), "{err}");

        fc.kill(&p).unwrap();
        assert!(!process_alive(&p));
        wait_until("the locks go with the VMM", Duration::from_secs(5), || {
            disks.iter().all(|d| unlocked(d))
        });
    }

    /// Snapshots (`docs/snapshots.md`): the documented API calls in order,
    /// on the source and on a restore, which gets its own jail and tap.
    #[test]
    fn snapshot_and_restore_issue_firecrackers_snapshot_calls_in_order() {
        use banger_vmm::firecracker::{MEMORY_FILE, STATE_FILE};
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!(
                "SKIP snapshot_and_restore...: restores need the jailer, used by a root daemon"
            );
            return;
        }
        // Each VM a name of its own (it names the cgroup) and its own jail.
        let jailed = |prefix: &str| {
            let mut w = World::new();
            let id = format!("{prefix}{}", std::process::id());
            w.paths.vm_dir = w.dir.path().join(&id);
            fs::create_dir_all(&w.paths.vm_dir).unwrap();
            let fc = backend(w.fake_with_env(&[])).with_jail(JailSettings {
                jailer_bin: Some(fake_jailer(&w).0),
                ..JailSettings::default()
            });
            (w, fc)
        };
        let (w, fc) = jailed("fcsnap");
        let p = launch(&fc, &w).unwrap();
        let launched = w.calls(&w.record()).len();
        let snap = w.dir.path().join("snap");
        fs::create_dir(&snap).unwrap();
        let mut paused_calls = None;
        fc.snapshot(&p, &snap, &mut || {
            paused_calls = Some(w.calls(&w.record()).len() - launched);
            Ok(())
        })
        .unwrap();
        let calls = w.calls(&w.record());
        let taken: Vec<_> = calls[launched..]
            .iter()
            .map(|(m, p, b)| (m.as_str(), p.as_str(), b.clone()))
            .collect();
        assert_eq!(
            taken,
            [
                ("PATCH", "/vm", json!({"state": "Paused"})),
                (
                    "PUT",
                    "/snapshot/create",
                    json!({"snapshot_type": "Full",
                           "snapshot_path": format!("/snapshot/{STATE_FILE}"),
                           "mem_file_path": format!("/snapshot/{MEMORY_FILE}")})
                ),
                ("PATCH", "/vm", json!({"state": "Resumed"})),
            ]
        );
        assert_eq!(paused_calls, Some(2), "the disks are copied while paused");
        for f in [STATE_FILE, MEMORY_FILE] {
            assert!(snap.join(f).is_file(), "{f} moved out of the jail");
        }

        // A restore: another VM (its own dir, jail and tap).
        let (mut w2, fc2) = jailed("fcrest");
        w2.machine.nics[0].tap = "tap-bg1".into();
        let r = {
            let _guard = fork_lock();
            fc2.restore_recorded(&w2.machine, &w2.paths, &snap, &mut |_| Ok(()))
                .unwrap()
        };
        assert!(process_alive(&r) && process_alive(&p));
        let restored = w2.calls(&w2.record());
        let paths: Vec<_> = restored
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        assert_eq!(paths, ["PUT /logger", "PUT /snapshot/load"]);
        assert_eq!(
            restored[1].2,
            json!({"snapshot_path": format!("/snapshot/{STATE_FILE}"),
                   "mem_backend": {"backend_type": "File",
                                   "backend_path": format!("/snapshot/{MEMORY_FILE}")},
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap-bg1"}],
                   "resume_vm": true})
        );
        fc2.kill(&r).unwrap();
        fc.kill(&p).unwrap();

        // Unjailed, the restored VM would reopen the source's disks: refused.
        let plain = backend(w2.fake_with_env(&[]));
        let err = plain
            .restore_recorded(&w2.machine, &w2.paths, &snap, &mut |_| Ok(()))
            .unwrap_err();
        assert!(err.to_string().contains("vmm_jail"), "{err}");
    }

    /// The owner of tap `name` as `ip -d -j` reports it (sysfs shows the
    /// host's namespace, not the test's): a user name when it has one
    /// ("root"), else the uid.
    fn tap_owner(name: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-d", "-j", "link", "show", name])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip link show {name}: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        match &v[0]["linkinfo"]["info_data"]["user"] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// A jailed firecracker runs as the VM's uid and opens its tap by name:
    /// the tap is handed to that uid before the VMM starts, and the pool
    /// gives it back to the daemon's user when the VM returns it.
    #[test]
    fn a_jailed_vmm_owns_its_tap_while_it_runs_and_the_pool_takes_it_back() {
        use banger_capabilities::network::TapPool;
        use banger_host::hostops::{HostOps, InProcessHostOps};
        test_infra::in_netns("a_jailed_vmm_owns_its_tap", &[], || {
            let Some((mut w, _, _, argv_file, fc)) =
                jailed_world("a_jailed_vmm_owns_its_tap", "fctap")
            else {
                return;
            };
            let host = InProcessHostOps::default();
            host.ensure_bridge("bgtapown0", "10.219.0.1".parse().unwrap(), 24)
                .unwrap();
            let pool = TapPool::new("tapown", "bgtapown0", 0, 1);
            let tap = pool.acquire(&host).unwrap();
            assert_eq!(
                tap_owner(&tap).as_deref(),
                Some("root"),
                "the pool makes it root's"
            );
            w.machine.nics[0].tap = tap.clone();

            let p = launch(&fc, &w).unwrap();
            let argv = fs::read_to_string(&argv_file).unwrap();
            let uid: u64 = argv.lines().nth(5).unwrap().parse().unwrap();
            assert!(uid >= u64::from(banger_api::backend::DEFAULT_VMM_UID_BASE));
            assert_eq!(
                tap_owner(&tap),
                Some(uid.to_string()),
                "the running VM's uid owns {tap}"
            );

            fc.kill(&p).unwrap();
            assert!(!process_alive(&p));
            // Returned to a pool that is short: kept, and root's again.
            pool.drain(&host).unwrap();
            pool.release(&host, &tap).unwrap();
            assert_eq!(pool.free(), std::slice::from_ref(&tap));
            assert_eq!(
                tap_owner(&tap).as_deref(),
                Some("root"),
                "{tap} is root's again"
            );
        });
    }
}
