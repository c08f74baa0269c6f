//! The QEMU backend against the real `qemu-system-x86_64` under TCG, booting
//! a real kernel: console capture, its own session, kill, shutdown with the
//! kill fallback, the vhost-device-vsock sidecar's lifecycle, and clear
//! errors for missing binaries.
//!
//! Kernel: `$BANGER_TEST_KERNEL`, else `/boot/vmlinuz-*`, else
//! `~/.cache/banger-ci/kernel/boot/vmlinuz-*` (CI extracts Debian's
//! linux-image there). vhost-device-vsock: `$BANGER_VHOST_DEVICE_VSOCK`, else
//! `PATH`, else `~/.cache/banger-ci/tools/bin/`.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use banger_core::machine::{Drive, DriveRole, MachineSpec, Vsock};
    use banger_core::model::VmmProcess;
    use banger_core::vmm::qemu::{Qemu, QemuAccel, QemuSettings};
    use banger_core::vmm::{LaunchPaths, Vmm, VmmError, process_alive};
    use nix::unistd::{Pid, getsid};
    use tempfile::TempDir;
    use test_infra::wait_until;

    /// Booting under TCG on a loaded 2-core host can be slow.
    const BOOT: Duration = Duration::from_secs(90);

    fn skip(test: &str, why: &str) {
        eprintln!("SKIPPED {test}: {why}");
    }

    fn home() -> PathBuf {
        std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
    }

    fn first_vmlinuz(dir: &Path) -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        found.pop()
    }

    fn kernel() -> Option<PathBuf> {
        if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
            return Some(PathBuf::from(k));
        }
        first_vmlinuz(Path::new("/boot"))
            .or_else(|| first_vmlinuz(&home().join(".cache/banger-ci/kernel/boot")))
    }

    fn on_path(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    fn qemu_bin() -> Option<PathBuf> {
        on_path("qemu-system-x86_64")
    }

    fn vsock_backend_bin() -> Option<PathBuf> {
        if let Some(b) = std::env::var_os("BANGER_VHOST_DEVICE_VSOCK") {
            return Some(PathBuf::from(b));
        }
        on_path("vhost-device-vsock").or_else(|| {
            let p = home().join(".cache/banger-ci/tools/bin/vhost-device-vsock");
            p.is_file().then_some(p)
        })
    }

    /// Everything a real boot needs, or the reason to skip.
    fn requirements(test: &str) -> Option<(PathBuf, PathBuf)> {
        let Some(q) = qemu_bin() else {
            skip(
                test,
                "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
            );
            return None;
        };
        let Some(k) = kernel() else {
            skip(
                test,
                "no kernel: set BANGER_TEST_KERNEL or extract a Debian linux-image to ~/.cache/banger-ci/kernel",
            );
            return None;
        };
        Some((q, k))
    }

    /// One test's world: a short temp dir (Unix socket paths are < 108
    /// bytes), two small raw drives, the machine and its launch paths.
    struct World {
        dir: TempDir,
        machine: MachineSpec,
        paths: LaunchPaths,
    }

    impl World {
        fn new(kernel: &Path) -> Self {
            let dir = tempfile::Builder::new()
                .prefix("qm")
                .tempdir_in("/tmp")
                .unwrap();
            let d = dir.path();
            for f in ["root.img", "config.img"] {
                fs::File::create(d.join(f))
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap();
            }
            let machine = MachineSpec {
                kernel: kernel.to_path_buf(),
                initrd: None,
                // No root device: the kernel prints its banner, then waits
                // (panic=0) without ever handling a power button.
                boot_args: "console=ttyS0".into(),
                vcpus: 1,
                memory_mib: 256,
                drives: vec![
                    Drive {
                        id: "root".into(),
                        path: d.join("root.img"),
                        read_only: false,
                        role: DriveRole::Root,
                    },
                    Drive {
                        id: "config".into(),
                        path: d.join("config.img"),
                        read_only: true,
                        role: DriveRole::Config,
                    },
                ],
                nics: vec![],
                vsock: None,
                serial_log: d.join("vm/serial.log"),
            };
            let paths = LaunchPaths {
                vm_dir: d.join("vm"),
                api_socket: d.join("q.sock"),
                vmm_log: d.join("vm/qemu.log"),
            };
            World {
                dir,
                machine,
                paths,
            }
        }

        fn serial(&self) -> String {
            fs::read_to_string(&self.machine.serial_log).unwrap_or_default()
        }

        fn wait_for_banner(&self) {
            wait_until(BOOT, "the serial log shows the kernel banner", || {
                self.serial().contains("Linux version")
            });
        }

        fn leftovers(&self) -> Vec<String> {
            fs::read_dir(self.dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("sock"))
                .collect()
        }
    }

    fn settings(qemu: PathBuf) -> QemuSettings {
        QemuSettings {
            qemu_bin: qemu,
            accel: QemuAccel::Tcg,
            ..QemuSettings::default()
        }
    }

    /// Kills a launched VM if the test fails before doing so itself.
    struct Guard<'a>(&'a Qemu, Option<VmmProcess>);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if let Some(p) = self.1.take() {
                let _ = self.0.kill(&p);
            }
        }
    }

    /// Pids of live processes whose command line mentions `needle`.
    fn processes_mentioning(needle: &str) -> Vec<i32> {
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                    && test_infra::pid_alive(*pid)
            })
            .collect()
    }

    #[test]
    fn boots_a_real_kernel_in_its_own_session_and_kill_removes_it() {
        let Some((q, k)) =
            requirements("boots_a_real_kernel_in_its_own_session_and_kill_removes_it")
        else {
            return;
        };
        let w = World::new(&k);
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        w.wait_for_banner();
        assert!(process_alive(&p));
        let pid = Pid::from_raw(p.pid as i32);
        assert_eq!(
            getsid(Some(pid)).unwrap(),
            pid,
            "qemu leads its own session"
        );
        assert_ne!(getsid(None).unwrap(), pid);

        vmm.kill(&p).unwrap();
        guard.1 = None;
        assert!(!process_alive(&p));
        assert!(!w.paths.api_socket.exists(), "QMP socket removed");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn shutdown_kills_after_grace_when_the_guest_ignores_the_power_button() {
        let test = "shutdown_kills_after_grace_when_the_guest_ignores_the_power_button";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let w = World::new(&k);
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        w.wait_for_banner();

        let grace = Duration::from_secs(2);
        let started = Instant::now();
        vmm.shutdown(&p, grace).unwrap();
        let took = started.elapsed();
        guard.1 = None;
        assert!(!process_alive(&p));
        // The power-button request was accepted and ignored, so the whole
        // grace period passed before the kill (a failed QMP request would
        // skip straight to the kill).
        assert!(took >= grace, "shutdown returned after {took:?}");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn shutdown_of_an_exited_vm_just_cleans_up() {
        let Some((q, k)) = requirements("shutdown_of_an_exited_vm_just_cleans_up") else {
            return;
        };
        let mut w = World::new(&k);
        // The guest panics (no root fs) and panic=-1 reboots it at once;
        // -no-reboot turns that into QEMU exiting on its own.
        w.machine.boot_args = "console=ttyS0 panic=-1 tsc_early_khz=2000000".into();
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        wait_until(BOOT, "the guest reboots and qemu exits", || {
            !process_alive(&p)
        });
        let started = Instant::now();
        vmm.shutdown(&p, Duration::from_secs(30)).unwrap();
        guard.1 = None;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(w.serial().contains("Kernel panic"), "{}", w.serial());
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn vsock_backend_starts_with_the_vm_and_stops_with_it() {
        let test = "vsock_backend_starts_with_the_vm_and_stops_with_it";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let Some(backend) = vsock_backend_bin() else {
            skip(
                test,
                "vhost-device-vsock not installed (cargo install vhost-device-vsock --root ~/.cache/banger-ci/tools)",
            );
            return;
        };
        let mut w = World::new(&k);
        let uds = w.dir.path().join("v.sock");
        w.machine.vsock = Some(Vsock {
            guest_cid: 42,
            uds_path: uds.clone(),
        });
        let vmm = Qemu::new(QemuSettings {
            vhost_device_vsock_bin: backend,
            ..settings(q)
        });
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        // QEMU got through the vhost-user handshake (it refuses to start
        // otherwise) and the guest runs with shared memory.
        w.wait_for_banner();
        let uds_str = uds.to_string_lossy().into_owned();
        let backends = processes_mentioning(&format!("uds-path={uds_str}"));
        assert_eq!(backends.len(), 1, "one vhost-device-vsock for this VM");
        let pid = Pid::from_raw(backends[0]);
        assert_eq!(
            getsid(Some(pid)).unwrap(),
            pid,
            "backend leads its own session"
        );
        wait_until(
            Duration::from_secs(10),
            "the hybrid vsock socket exists",
            || uds.exists(),
        );

        vmm.kill(&p).unwrap();
        guard.1 = None;
        assert!(!process_alive(&p));
        assert!(
            processes_mentioning(&format!("uds-path={uds_str}")).is_empty(),
            "vhost-device-vsock stopped with the VM"
        );
        assert!(!uds.exists(), "hybrid vsock socket removed");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn missing_qemu_binary_is_a_clear_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(&dir.path().join("vmlinux"));
        let bin = dir.path().join("no-such-qemu-system-x86_64");
        let vmm = Qemu::new(settings(bin.clone()));
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        assert!(
            matches!(&err, VmmError::Spawn { bin: b, .. } if *b == bin),
            "{err:?}"
        );
        assert!(err.to_string().contains(&*bin.to_string_lossy()), "{err}");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn missing_vsock_backend_is_a_clear_error_and_starts_no_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = World::new(&dir.path().join("vmlinux"));
        w.machine.vsock = Some(Vsock {
            guest_cid: 3,
            uds_path: w.dir.path().join("v.sock"),
        });
        let bin = dir.path().join("no-such-vhost-device-vsock");
        // A qemu that would fail loudly if it were ever run.
        let vmm = Qemu::new(QemuSettings {
            vhost_device_vsock_bin: bin.clone(),
            ..settings(PathBuf::from("/bin/false"))
        });
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        assert!(
            matches!(&err, VmmError::Spawn { bin: b, .. } if *b == bin),
            "{err:?}"
        );
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn qemu_rejecting_its_arguments_is_reported_with_its_own_words() {
        let Some((q, _)) =
            requirements("qemu_rejecting_its_arguments_is_reported_with_its_own_words")
        else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(&dir.path().join("missing-vmlinux"));
        let vmm = Qemu::new(settings(q));
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VmmError::NotReady(_)), "{err:?}");
        assert!(
            msg.contains("missing-vmlinux"),
            "qemu's complaint quoted: {msg}"
        );
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }
}
