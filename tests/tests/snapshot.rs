//! Snapshots at the backend level (`docs/snapshots.md`): the QEMU backend
//! against the real `qemu-system-x86_64` under TCG (a guest whose init
//! counts on the console is snapshotted, keeps counting, and two restores
//! of it go on counting side by side from where it was, without booting);
//! a VM with QEMU 7.2's vhost-user-vsock is refused and keeps running; a
//! chrooted QEMU (a root daemon's jail) snapshots and restores through its
//! disks' descriptor sets, and one with its disks named by paths is
//! refused; and
//! the Firecracker backend's snapshot API calls, in order, against the
//! fake firecracker.
//!
//! QEMU needs what `qemu_backend.rs` needs: `qemu-system-x86_64`, a kernel
//! (`$BANGER_TEST_KERNEL`, else `~/.cache/banger-ci/kernel/boot/vmlinuz-*`),
//! `cc` with a static libc, and vhost-device-vsock for the refusal test.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use banger_api::machine::Vsock;
    use banger_api::model::VmmProcess;
    use banger_vmm::qemu::{
        AgentTransport, JailSettings, MIGRATION_FILE, Qemu, QemuAccel, QemuSettings,
    };
    use banger_vmm::{Vmm, VmmError, process_alive};
    use tempfile::TempDir;
    use test_infra::tick_guest::{kernel, on_path, tick_initrd, tick_vm, ticks, vsock_backend};
    use test_infra::wait_until;

    const BOOT: Duration = Duration::from_secs(180);

    /// TCG guests share 2 cores: these tests take turns.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The QEMU binary and kernel, or a loud skip.
    fn requirements(test: &str) -> Option<(PathBuf, PathBuf)> {
        let found = on_path("qemu-system-x86_64").zip(kernel());
        if found.is_none() {
            eprintln!(
                "SKIP {test}: needs qemu-system-x86_64 (apt-get install qemu-system-x86) and a kernel (BANGER_TEST_KERNEL or ~/.cache/banger-ci/kernel/boot/vmlinuz-*)"
            );
        }
        found
    }

    /// What every QEMU test here starts from: QEMU and the kernel, its turn
    /// at the cores (for as long as the `Setup` lives), a scratch directory
    /// and the tick initramfs in it.
    struct Setup {
        qemu: PathBuf,
        kernel: PathBuf,
        dir: TempDir,
        initrd: PathBuf,
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    /// [`Setup`], or a loud skip saying what is missing.
    fn setup(test: &str) -> Option<Setup> {
        let (qemu, kernel) = requirements(test)?;
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("sn")
            .tempdir_in("/tmp")
            .unwrap();
        let initrd = match tick_initrd(dir.path()) {
            Ok(p) => p,
            Err(why) => {
                eprintln!("SKIP {test}: {why}");
                return None;
            }
        };
        Some(Setup {
            qemu,
            kernel,
            dir,
            initrd,
            _turn: turn,
        })
    }

    /// Kills what a test launched, even when it fails.
    struct Running<'a>(&'a Qemu, Vec<VmmProcess>);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            for p in self.1.drain(..) {
                let _ = self.0.kill(&p);
            }
        }
    }

    /// Unjailed (as a user daemon runs QEMU); the jailed cases set their own.
    fn settings(qemu: PathBuf) -> QemuSettings {
        QemuSettings {
            qemu_bin: qemu,
            accel: QemuAccel::Tcg,
            jail: JailSettings {
                enabled: false,
                cgroups: false,
                ..JailSettings::default()
            },
            ..QemuSettings::default()
        }
    }

    /// QEMU's run state through a raw QMP session.
    fn run_state(qmp: &Path) -> String {
        let s = UnixStream::connect(qmp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        for cmd in ["qmp_capabilities", "query-status"] {
            writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        v["return"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn qemu_snapshot_resumes_the_source_and_two_restores_go_on_from_its_state() {
        let test = "qemu_snapshot_resumes_the_source_and_two_restores_go_on_from_its_state";
        let Some(s) = setup(test) else {
            return;
        };
        let (q, k, initrd, d) = (s.qemu.clone(), &s.kernel, &s.initrd, s.dir.path());
        let vmm = Qemu::new(settings(q));
        let mut running = Running(&vmm, Vec::new());
        let (source, source_paths) = tick_vm(d, "src", k, initrd);
        fs::write(&source.drives[0].path, b"written before the snapshot").unwrap();
        let p = vmm.launch(&source, &source_paths).unwrap();
        running.1.push(p.clone());
        wait_until(BOOT, "the source guest ticks 20 times", || {
            ticks(&source.serial_log).len() > 20
        });

        let snap = d.join("snap");
        fs::create_dir(&snap).unwrap();
        let mut at_snapshot = 0;
        let mut paused_ticks_stable = false;
        vmm.snapshot(&p, &snap, &mut || {
            // Paused: the guest prints nothing while the disk is copied.
            at_snapshot = ticks(&source.serial_log).last().copied().unwrap_or(0);
            fs::copy(&source.drives[0].path, snap.join("root.img")).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            paused_ticks_stable =
                ticks(&source.serial_log).last().copied().unwrap_or(0) == at_snapshot;
            Ok(())
        })
        .unwrap();
        assert!(paused_ticks_stable, "the guest ran while paused");
        assert!(
            fs::metadata(snap.join(MIGRATION_FILE)).unwrap().len() > 1 << 20,
            "the migration stream holds the guest memory"
        );
        wait_until(BOOT, "the source ticks on after the snapshot", || {
            ticks(&source.serial_log).last().copied().unwrap_or(0) > at_snapshot + 5
        });
        assert_eq!(run_state(&p.api_socket), "running");

        let mut restored = Vec::new();
        for name in ["r1", "r2"] {
            let (mut m, paths) = tick_vm(d, name, k, initrd);
            fs::copy(snap.join("root.img"), &m.drives[0].path).unwrap();
            m.serial_log = paths.vm_dir.join("serial.log");
            let rp = vmm
                .restore_recorded(&m, &paths, &snap, &mut |_| Ok(()))
                .unwrap();
            running.1.push(rp.clone());
            restored.push((m, rp));
        }
        for (m, rp) in &restored {
            wait_until(BOOT, "a restored guest ticks", || {
                ticks(&m.serial_log).len() > 5
            });
            let seen = ticks(&m.serial_log);
            assert!(
                seen[0] > at_snapshot.saturating_sub(2) && seen[0] <= at_snapshot + 2,
                "a restore goes on from the snapshot's count {at_snapshot}, not from a boot: {:?}",
                &seen[..5]
            );
            let console = fs::read_to_string(&m.serial_log).unwrap();
            assert!(!console.contains("Linux version"), "it did not boot");
            assert_eq!(
                fs::read(&m.drives[0].path).unwrap()[..27],
                b"written before the snapshot"[..]
            );
            assert_eq!(run_state(&rp.api_socket), "running");
        }
        assert!(process_alive(&p), "the source runs on beside its restores");
    }

    #[test]
    fn qemu_refuses_a_snapshot_of_a_vm_with_vhost_user_vsock_and_keeps_it_running() {
        let test = "qemu_refuses_a_snapshot_of_a_vm_with_vhost_user_vsock_and_keeps_it_running";
        let Some(backend) = vsock_backend() else {
            return eprintln!("SKIP {test}: no vhost-device-vsock (scripts/test installs it)");
        };
        let Some(s) = setup(test) else {
            return;
        };
        let (q, k, initrd, d) = (s.qemu.clone(), &s.kernel, &s.initrd, s.dir.path());
        let (mut m, paths) = tick_vm(d, "v", k, initrd);
        m.vsock = Some(Vsock {
            guest_cid: 9,
            uds_path: d.join("v.sock"),
        });
        let vmm = Qemu::new(QemuSettings {
            vhost_device_vsock_bin: backend,
            agent_transport: AgentTransport::Vsock,
            ..settings(q)
        });
        let p = vmm.launch(&m, &paths).unwrap();
        let _running = Running(&vmm, vec![p.clone()]);
        wait_until(BOOT, "the guest ticks", || ticks(&m.serial_log).len() > 2);
        let snap = d.join("snap");
        fs::create_dir(&snap).unwrap();
        let mut copied = false;
        let err = vmm
            .snapshot(&p, &snap, &mut || {
                copied = true;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, VmmError::Unsupported(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("vhost-user-vsock"), "{msg}");
        assert!(msg.contains("qemu_agent_transport = \"serial\""), "{msg}");
        assert!(msg.contains("docs/snapshots.md"), "{msg}");
        assert!(!copied, "no disk copy for a snapshot that was not taken");
        assert_eq!(run_state(&p.api_socket), "running");
        let before = ticks(&m.serial_log).len();
        wait_until(BOOT, "the guest ticks on", || {
            ticks(&m.serial_log).len() > before + 3
        });
    }

    /// Under a root daemon QEMU chroots into an empty directory as the VM's
    /// uid, and gets its disks as descriptor sets so that it can reopen
    /// them at the end of a migration: a jailed snapshot, a jailed restore
    /// that goes on from it, and a snapshot of that restore.
    #[test]
    fn a_chrooted_qemu_snapshots_and_restores_through_descriptor_sets() {
        let test = "a_chrooted_qemu_snapshots_and_restores_through_descriptor_sets";
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("SKIP {test}: QEMU chroots only under a root daemon");
        }
        let Some(s) = setup(test) else {
            return;
        };
        let (q, k, initrd, d) = (s.qemu.clone(), &s.kernel, &s.initrd, s.dir.path());
        let (m, paths) = tick_vm(d, "j", k, initrd);
        fs::write(&m.drives[0].path, b"written before the snapshot").unwrap();
        let vmm = Qemu::new(QemuSettings {
            jail: JailSettings {
                cgroups: false,
                ..JailSettings::default()
            },
            ..settings(q)
        });
        let p = vmm.launch(&m, &paths).unwrap();
        let mut running = Running(&vmm, vec![p.clone()]);
        let cmdline = fs::read(format!("/proc/{}/cmdline", p.pid)).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("-chroot"), "jailed: {cmdline}");
        assert!(
            cmdline.contains("file=/dev/fdset/1,file.locking=off"),
            "{cmdline}"
        );
        assert!(
            !cmdline.contains(&format!("file={}", m.drives[0].path.display())),
            "no disk by path: {cmdline}"
        );
        assert!(
            cmdline.contains(&format!("set=1,opaque={}", m.drives[0].path.display())),
            "the set names its disk: {cmdline}"
        );
        wait_until(BOOT, "the jailed guest ticks", || {
            ticks(&m.serial_log).len() > 5
        });

        let snap = d.join("snap");
        fs::create_dir(&snap).unwrap();
        let mut at_snapshot = 0;
        vmm.snapshot(&p, &snap, &mut || {
            at_snapshot = ticks(&m.serial_log).last().copied().unwrap_or(0);
            fs::copy(&m.drives[0].path, snap.join("root.img")).unwrap();
            Ok(())
        })
        .unwrap();
        wait_until(BOOT, "the jailed source ticks on", || {
            ticks(&m.serial_log).last().copied().unwrap_or(0) > at_snapshot + 3
        });
        assert_eq!(run_state(&p.api_socket), "running");

        let (r, rpaths) = tick_vm(d, "jr", k, initrd);
        fs::copy(snap.join("root.img"), &r.drives[0].path).unwrap();
        let rp = vmm
            .restore_recorded(&r, &rpaths, &snap, &mut |_| Ok(()))
            .unwrap();
        running.1.push(rp.clone());
        wait_until(BOOT, "the jailed restore ticks", || {
            ticks(&r.serial_log).len() > 3
        });
        let seen = ticks(&r.serial_log);
        assert!(
            seen[0] > at_snapshot.saturating_sub(2) && seen[0] <= at_snapshot + 2,
            "the restore goes on from the snapshot's count {at_snapshot}: {:?}",
            &seen[..3]
        );
        assert_eq!(run_state(&rp.api_socket), "running");
        // Its disks were reopened read-write through the sets; a second
        // snapshot reopens them read-only again.
        let again = d.join("again");
        fs::create_dir(&again).unwrap();
        vmm.snapshot(&rp, &again, &mut || Ok(())).unwrap();
        assert_eq!(run_state(&rp.api_socket), "running");
        assert!(process_alive(&p), "the source runs on beside its restore");
    }

    /// A chrooted QEMU started with its disks named by host paths (as an
    /// older banger started them) cannot finish a migration: its snapshot
    /// is refused, naming the fix, and it keeps running.
    #[test]
    fn a_chrooted_qemu_with_disks_by_path_is_refused_a_snapshot_and_keeps_running() {
        use banger_vmm::qemu::{Accel, jail_args, render_args};
        let test = "a_chrooted_qemu_with_disks_by_path_is_refused_a_snapshot_and_keeps_running";
        if !nix::unistd::geteuid().is_root() {
            return eprintln!("SKIP {test}: QEMU chroots only under a root daemon");
        }
        let Some(s) = setup(test) else {
            return;
        };
        let (q, k, initrd, d) = (s.qemu.clone(), &s.kernel, &s.initrd, s.dir.path());
        let (m, paths) = tick_vm(d, "old", k, initrd);
        let root = d.join("empty-root");
        fs::create_dir(&root).unwrap();
        let child = std::process::Command::new(&q)
            .args(render_args(
                &m,
                &paths.api_socket,
                &d.join("unused.vhost"),
                Accel::Tcg,
                AgentTransport::Vsock,
            ))
            .args(jail_args(true, Some((4_000_000, &root))))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        struct Reap(std::process::Child);
        impl Drop for Reap {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let pid = child.id();
        let _reap = Reap(child);
        wait_until(BOOT, "the path-disk guest ticks", || {
            ticks(&m.serial_log).len() > 2
        });
        let process = VmmProcess {
            pid,
            start_time: banger_vmm::process_start_time(pid).unwrap(),
            api_socket: paths.api_socket.clone(),
        };
        let vmm = Qemu::new(settings(q));
        let snap = d.join("snap");
        fs::create_dir(&snap).unwrap();
        let mut copied = false;
        let err = vmm
            .snapshot(&process, &snap, &mut || {
                copied = true;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, VmmError::Unsupported(_)), "{err:?}");
        assert!(err.to_string().contains("stop and start the VM"), "{err}");
        assert!(!copied, "nothing copied for a snapshot that was refused");
        assert_eq!(run_state(&process.api_socket), "running");
    }

    /// `vm snapshot` through the CLI and daemon against the fake
    /// firecracker: the snapshot calls in order on the running VM, the
    /// files in the store, `list`, a taken name refused, `rm`.
    #[test]
    fn vm_snapshot_takes_lists_and_removes_a_snapshot_of_a_running_vm() {
        use banger_api::snapshot::SnapshotView;
        use test_infra::BangerEnv;
        let env = BangerEnv::new();
        env.create("src", &[]).ok();
        let before = env.fc_calls().len();
        let out = env.banger(&["vm", "snapshot", "src", "s1"]).ok();
        assert!(
            out.stdout.contains("snapshot s1 of src (firecracker"),
            "{}",
            out.stdout
        );
        let calls: Vec<String> = env.fc_calls()[before..]
            .iter()
            .filter(|c| c["path"] != "/")
            .map(|c| {
                let state = c["body"]["state"].as_str().unwrap_or_default().to_owned();
                format!(
                    "{} {} {state}",
                    c["method"].as_str().unwrap(),
                    c["path"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            calls,
            [
                "PATCH /vm Paused",
                "PUT /snapshot/create ",
                "PATCH /vm Resumed"
            ]
        );
        let dir = env.state_dir().join("snapshots/s1");
        let mut files: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert!(files.contains(&"disk-root".to_string()), "{files:?}");
        for f in ["firecracker.memory", "firecracker.vmstate", "manifest.json"] {
            assert!(files.contains(&f.to_string()), "{f} in {files:?}");
        }
        assert!(
            !files.iter().any(|f| f.contains("config")),
            "the config drive is not copied: {files:?}"
        );

        let list = env.banger(&["vm", "snapshot", "list", "--json"]).ok();
        let listed: Vec<SnapshotView> = serde_json::from_str(&list.stdout).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].name.as_str(), listed[0].source_vm.as_str()),
            ("s1", "src")
        );
        assert_eq!(
            listed[0].machine.drives.len(),
            env.show("src").record.machine.unwrap().drives.len()
        );
        let source = env.show("src").record;
        assert_eq!(listed[0].caps, source.caps, "the restore enables the same");
        assert_eq!(
            listed[0].guest.as_ref().map(|g| g.hostname.as_str()),
            Some("src")
        );
        let disk = listed[0]
            .files
            .iter()
            .find(|f| f.name == "disk-root")
            .unwrap();
        assert_eq!(
            disk.size,
            fs::metadata(dir.join("disk-root")).unwrap().len()
        );
        assert_eq!(
            env.show("src").record.state,
            banger_api::model::VmState::Running
        );

        let again = env
            .banger(&["vm", "snapshot", "src", "--name", "s1"])
            .failed();
        assert!(again.stderr.contains("already exists"), "{}", again.stderr);

        env.banger(&["vm", "snapshot", "rm", "s1"]).ok();
        assert!(!dir.exists());
        let list = env.banger(&["vm", "snapshot", "list"]).ok();
        assert!(list.stdout.contains("no snapshots"), "{}", list.stdout);
    }

    /// A fake jailer (as `firecracker_backend.rs`'s): the exec-file run in
    /// `<base>/<exec name>/<id>/root` with every API path taken inside it
    /// (relative, as the VM directories of a test env are too deep for a
    /// socket path there).
    fn fake_jailer(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let script = r#"#!/bin/bash
for fd in /proc/$$/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] && eval "exec $n>&-"; done
while [ $# -gt 0 ]; do
  case "$1" in
    --id) id=$2; shift 2 ;;
    --exec-file) exe=$2; shift 2 ;;
    --chroot-base-dir) base=$2; shift 2 ;;
    --) shift; break ;;
    *) shift ;;
  esac
done
# From inside the root, as the real one: its socket paths stay short.
cd "$base/$(basename "$exe")/$id/root" || exit 1
FAKE_FIRECRACKER_ROOT=. exec "$exe" "$1" ".$2"
"#;
        let p = dir.join("jailer");
        fs::write(&p, script).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// The API calls `vm`'s VMM received among those recorded after the
    /// first `before` (polls of `/` aside), checked to be a restore's: the
    /// logger, the snapshot load and the agent's new identity, no boot.
    fn restored_vmm_calls(
        env: &test_infra::BangerEnv,
        before: usize,
        vm: &banger_api::api::VmView,
    ) -> Vec<serde_json::Value> {
        let pid = i64::from(vm.record.vmm.as_ref().unwrap().pid);
        let calls: Vec<serde_json::Value> = env.fc_calls()[before..]
            .iter()
            .filter(|c| c["pid"] == pid && c["path"] != "/")
            .cloned()
            .collect();
        let api: Vec<String> = calls
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["method"].as_str().unwrap(),
                    c["path"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(
            api,
            ["PUT /logger", "PUT /snapshot/load", "POST /reidentify"],
            "{} restored, not booted",
            vm.record.name
        );
        calls
    }

    /// `vm create --from-snapshot` through the CLI against the fake
    /// firecracker under the fake jailer: two VMs restored from one
    /// snapshot, each with its own name, lease, tap, disks and secret; the
    /// VMM loaded the snapshot (no boot) with the VM's own tap, and the
    /// agent was asked, with the snapshot's secret, to take the new identity.
    /// `vm run --from-snapshot` restores a third the same way.
    #[test]
    fn vm_create_from_snapshot_restores_vms_that_each_take_their_own_identity() {
        const TEST: &str = "vm_create_from_snapshot_restores_vms_that_each_take_their_own_identity";
        test_infra::in_netns(TEST, &[], || {
            use banger_vmm::firecracker::{MEMORY_FILE, STATE_FILE};
            use test_infra::BangerEnv;
            let mut env = BangerEnv::new();
            env.set_env("FAKE_FC_AGENT", "1");
            let jailer = fake_jailer(env.root());
            env.write_config(&format!(
                "default_caps = [\"work-disk\", \"network\", \"dns\", \"vsock-agent\"]\njailer_bin = {:?}\nvmm_cgroups = false\nagent_timeout_secs = 20\n",
                jailer.display().to_string()
            ));
            env.create("src", &[]).ok();
            let src = env.show("src");
            env.banger(&["vm", "snapshot", "src", "s1"]).ok();
            let snap = env.state_dir().join("snapshots/s1");
            let manifest: serde_json::Value =
                serde_json::from_slice(&fs::read(snap.join("manifest.json")).unwrap()).unwrap();
            let old_secret = manifest["agent_secret"].as_str().unwrap().to_owned();
            let old_address = manifest["guest"]["network"][0]["address"]
                .as_str()
                .unwrap()
                .to_owned();
            let before = env.fc_calls().len();

            let mut host_keys = Vec::new();
            for name in ["r1", "r2"] {
                env.banger(&["vm", "create", "--name", name, "--from-snapshot", "s1"])
                    .ok();
                let vm = env.show(name);
                assert_eq!(vm.record.state, banger_api::model::VmState::Running);
                assert_eq!(
                    vm.record.caps, src.record.caps,
                    "the snapshot's capabilities"
                );
                let address = vm.address.unwrap();
                assert_ne!(Some(address), src.address);
                let machine = vm.record.machine.clone().unwrap();
                // Its own copies of the snapshot's disks, in its own directory.
                for d in machine.drives.iter().filter(|d| d.id != "config") {
                    assert!(
                        d.path.starts_with(&vm.dir),
                        "{} in {}",
                        d.path.display(),
                        vm.dir.display()
                    );
                    assert_eq!(
                        fs::read(&d.path).unwrap(),
                        fs::read(snap.join(format!("disk-{}", d.id))).unwrap(),
                        "drive {} is the snapshot's copy",
                        d.id
                    );
                }
                let calls = restored_vmm_calls(&env, before, &vm);
                let nic = &machine.nics[0];
                assert_eq!(
                    calls[1]["body"],
                    serde_json::json!({
                        "snapshot_path": format!("/snapshot/{STATE_FILE}"),
                        "mem_backend": {"backend_type": "File",
                                        "backend_path": format!("/snapshot/{MEMORY_FILE}")},
                        "network_overrides": [{"iface_id": nic.id, "host_dev_name": nic.tap}],
                        "resume_vm": true,
                    })
                );
                let re = &calls[2];
                assert_eq!(re["agent"], true);
                assert_eq!(re["authorization"], format!("Bearer {old_secret}"));
                let body = &re["body"];
                assert_eq!(body["hostname"], name);
                assert_eq!(body["mac"], nic.mac.as_str());
                assert_eq!(body["previous_address"], old_address.as_str());
                let new_address = body["network"]["address"].as_str().unwrap();
                assert!(
                    new_address.starts_with(&format!("{address}/")),
                    "{new_address}"
                );
                let new_secret = fs::read_to_string(vm.dir.join("exec.secret")).unwrap();
                assert_eq!(body["new_secret"], new_secret.trim());
                assert_ne!(new_secret.trim(), old_secret);
                let keys = body["ssh_host_keys"].as_array().unwrap();
                assert!(
                    keys.iter().any(|k| k["name"] == "ssh_host_ed25519_key"
                        && k["contents"]
                            .as_str()
                            .unwrap()
                            .contains("OPENSSH PRIVATE KEY")),
                    "{keys:?}"
                );
                host_keys.push(keys.clone());
            }
            assert_ne!(host_keys[0], host_keys[1], "each restore its own host keys");

            // `vm run` restores the same way (a warm start), then goes on
            // as after any create: here, detached.
            let before = env.fc_calls().len();
            let run = env
                .banger(&["vm", "run", "--from-snapshot", "s1", "--name", "r3", "-d"])
                .ok();
            assert!(run.stderr.starts_with("restoring snapshot s1"), "{run:?}");
            assert!(run.stdout.contains("VM r3 is ready"), "{run:?}");
            let r3 = env.show("r3");
            assert_eq!(r3.record.caps, src.record.caps);
            restored_vmm_calls(&env, before, &r3);
            let (r1, r2) = (env.show("r1"), env.show("r2"));
            assert_ne!(r1.address, r2.address);
            assert_ne!(
                r1.record.machine.unwrap().nics[0].mac,
                r2.record.machine.unwrap().nics[0].mac
            );
            assert_eq!(
                env.show("src").record.state,
                banger_api::model::VmState::Running
            );
        });
    }

    /// A restore moves a copy of the snapshot's disks made ahead of time
    /// into place when one is ready (`snapshot-spares`, refilled in the
    /// background after each restore), and `vm snapshot rm` removes them
    /// with the snapshot.
    #[test]
    fn restores_take_spare_copies_of_the_snapshot_disks_and_rm_removes_them() {
        use test_infra::BangerEnv;
        let mut env = BangerEnv::new();
        env.set_env("FAKE_FC_AGENT", "1");
        let jailer = fake_jailer(env.root());
        env.write_config(&format!(
            "default_caps = [\"work-disk\", \"vsock-agent\"]\njailer_bin = {:?}\nvmm_cgroups = false\nagent_timeout_secs = 20\n",
            jailer.display().to_string()
        ));
        env.create("src", &[]).ok();
        env.banger(&["vm", "snapshot", "src", "s1"]).ok();
        let spares = env.state_dir().join("snapshot-spares");
        let ready = || {
            fs::read_dir(&spares)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0)
        };
        let placed_from_spares = |vm: &banger_api::api::VmView| {
            let log = fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
            log.lines()
                .filter(|l| {
                    l.contains("snapshot disk placed") && l.contains(vm.dir.to_str().unwrap())
                })
                .map(|l| l.contains("kind=Spare"))
                .collect::<Vec<bool>>()
        };
        assert_eq!(ready(), 0, "no spare before the first restore");
        env.banger(&["vm", "create", "--name", "r1", "--from-snapshot", "s1"])
            .ok();
        assert_eq!(placed_from_spares(&env.show("r1")), [false, false]);
        // One spare per writable disk (root and work), made in the background.
        wait_until(Duration::from_secs(60), "spares of s1's two disks", || {
            ready() == 2
        });
        env.banger(&["vm", "create", "--name", "r2", "--from-snapshot", "s1"])
            .ok();
        let r2 = env.show("r2");
        assert_eq!(placed_from_spares(&r2), [true, true]);
        let snap = env.state_dir().join("snapshots/s1");
        for d in r2
            .record
            .machine
            .unwrap()
            .drives
            .iter()
            .filter(|d| d.id != "config")
        {
            assert_eq!(
                fs::read(&d.path).unwrap(),
                fs::read(snap.join(format!("disk-{}", d.id))).unwrap(),
                "drive {} is the snapshot's",
                d.id
            );
        }
        wait_until(Duration::from_secs(60), "the spares made again", || {
            ready() == 2
        });
        env.banger(&["vm", "snapshot", "rm", "s1"]).ok();
        assert_eq!(ready(), 0, "the snapshot's spares went with it");
    }

    /// What `vm create --from-snapshot` refuses, naming the fix, leaving
    /// no VM and no directory behind: an unknown snapshot, another backend,
    /// Firecracker without its jailer, a snapshot of a VM without the agent.
    #[test]
    fn vm_create_from_snapshot_refusals_leave_nothing_behind() {
        use test_infra::BangerEnv;
        let mut env = BangerEnv::new();
        env.set_env("FAKE_FC_AGENT", "1");
        env.create("src", &["--cap", "vsock-agent:timeout=20"]).ok();
        env.banger(&["vm", "snapshot", "src", "s1"]).ok();
        env.create("plain", &[]).ok();
        env.banger(&["vm", "snapshot", "plain", "s2"]).ok();
        let vms = || fs::read_dir(env.state_dir().join("vms")).unwrap().count();
        let dirs = vms();
        for (args, says) in [
            (
                vec!["--from-snapshot", "nope"],
                "No snapshot named \"nope\"",
            ),
            (
                vec!["--from-snapshot", "s1", "--vmm", "qemu"],
                "--vmm firecracker",
            ),
            (vec!["--from-snapshot", "s1"], "vmm_jail"),
            (vec!["--from-snapshot", "s2"], "--cap vsock-agent"),
        ] {
            let mut all = vec!["vm", "create", "--name", "r"];
            all.extend(args.iter().copied());
            let out = env.banger(&all).failed();
            assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
            let names: Vec<String> = env
                .list()
                .iter()
                .map(|v| v.record.name.to_string())
                .collect();
            assert_eq!(names.len(), 2, "{args:?} left a VM: {names:?}");
            assert_eq!(vms(), dirs, "{args:?} left a VM directory");
        }
        let out = env
            .banger(&["vm", "create", "--from-snapshot", "s1", "--image", "x"])
            .failed();
        assert!(out.stderr.contains("--image"), "{}", out.stderr);
    }
}
