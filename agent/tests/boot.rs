//! The agent as PID 1 of a real kernel under QEMU TCG (`-M microvm`).
//!
//! Needs `qemu-system-x86_64` and a kernel in `BANGER_TEST_KERNEL` that
//! `-M microvm` boots; skipped otherwise. The initramfs holds the test
//! build of the agent plus the shared libraries it links (the static build
//! is `scripts/build-agent`'s job), so this runs in the normal test build.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use banger_guest_protocol::bundle::{GuestConfig, GuestFile};
    use banger_guest_protocol::drive::ConfigDrive;

    /// TCG boots take seconds to tens of seconds on a shared 2-core box.
    const BOOT_DEADLINE: Duration = Duration::from_secs(300);

    /// One TCG guest at a time: two starve each other on a small machine.
    static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn prerequisites(test: &str) -> Option<PathBuf> {
        let Some(kernel) = std::env::var_os("BANGER_TEST_KERNEL").map(PathBuf::from) else {
            eprintln!("SKIPPED {test}: set BANGER_TEST_KERNEL to a kernel qemu -M microvm boots");
            return None;
        };
        if Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("SKIPPED {test}: qemu-system-x86_64 not installed");
            return None;
        }
        Some(kernel)
    }

    /// A cpio newc archive writer, enough for directories and files.
    #[derive(Default)]
    struct Cpio {
        out: Vec<u8>,
        ino: u32,
    }

    impl Cpio {
        fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
            self.ino += 1;
            let fields = [
                self.ino,
                mode,
                0,
                0,
                1,
                0,
                data.len() as u32,
                0,
                0,
                0,
                0,
                name.len() as u32 + 1,
                0,
            ];
            self.out.extend_from_slice(b"070701");
            for f in fields {
                self.out.extend_from_slice(format!("{f:08X}").as_bytes());
            }
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(0);
            self.pad();
            self.out.extend_from_slice(data);
            self.pad();
        }

        fn pad(&mut self) {
            self.out.resize(self.out.len().div_ceil(4) * 4, 0);
        }

        fn dirs_for(&mut self, path: &str) {
            let mut at = String::new();
            for part in path.split('/').filter(|p| !p.is_empty()) {
                if !at.is_empty() {
                    at.push('/');
                }
                at.push_str(part);
                if at != path.trim_start_matches('/') {
                    self.entry(&at, 0o040755, &[]);
                }
            }
        }

        fn finish(mut self) -> Vec<u8> {
            self.entry("TRAILER!!!", 0, &[]);
            self.out
        }
    }

    /// The agent as /init plus every library `ldd` lists, at their paths.
    fn initramfs(dir: &Path) -> PathBuf {
        let agent = env!("CARGO_BIN_EXE_banger-agent");
        let mut cpio = Cpio::default();
        cpio.entry("init", 0o100755, &fs::read(agent).unwrap());
        let ldd = Command::new("ldd").arg(agent).output().unwrap();
        for line in String::from_utf8(ldd.stdout).unwrap().lines() {
            let path = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(str::to_string);
            if let Some(path) = path {
                cpio.dirs_for(&path);
                let real = fs::canonicalize(&path).unwrap();
                cpio.entry(
                    path.trim_start_matches('/'),
                    0o100755,
                    &fs::read(real).unwrap(),
                );
            }
        }
        let out = dir.join("initrd.cpio");
        fs::write(&out, cpio.finish()).unwrap();
        out
    }

    /// A running QEMU, killed when the test ends.
    struct Vm {
        child: Child,
        serial: PathBuf,
    }

    impl Drop for Vm {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Vm {
        fn boot(kernel: &Path, dir: &Path, drives: &[(&str, &Path)]) -> Vm {
            let serial = dir.join("serial.log");
            let mut cmd = Command::new("qemu-system-x86_64");
            // -icount: guest time follows executed instructions, so timer
            // calibration does not stall when the host is loaded.
            cmd.args(["-M", "microvm", "-accel", "tcg", "-icount", "shift=auto"])
                .args(["-m", "256", "-no-reboot"])
                .args(["-display", "none", "-monitor", "none"])
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(initramfs(dir))
                .args(["-append", "console=ttyS0 panic=-1"]);
            for (id, file) in drives {
                cmd.arg("-drive")
                    .arg(format!(
                        "id={id},file={},format=raw,if=none",
                        file.display()
                    ))
                    .args(["-device", &format!("virtio-blk-device,drive={id}")]);
            }
            let child = cmd.stdin(Stdio::null()).spawn().unwrap();
            Vm { child, serial }
        }

        /// Polls the serial log until a line contains `marker`; returns the
        /// log so far.
        fn wait_for(&mut self, marker: &str) -> String {
            let deadline = Instant::now() + BOOT_DEADLINE;
            loop {
                let log = fs::read_to_string(&self.serial).unwrap_or_default();
                if log.contains(marker) {
                    return log;
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("qemu exited ({status}) before {marker:?}:\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "no {marker:?} within {BOOT_DEADLINE:?}:\n{log}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    #[test]
    fn without_drives_stays_pid1_and_says_why_on_the_console() {
        let Some(kernel) = prerequisites("without_drives_stays_pid1_and_says_why_on_the_console")
        else {
            return;
        };
        let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let mut vm = Vm::boot(&kernel, dir.path(), &[]);
        let log = vm.wait_for("banger-agent: no init system: staying PID 1");
        for expected in [
            "banger-agent: read config drive FAILED: No config drive found",
            "banger-agent: mount root /dev/vda FAILED",
            "banger-agent: staying in the initramfs",
        ] {
            assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
        }
    }

    fn debugfs_cat(image: &Path, path: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat {path}")])
            .arg(image)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn applies_the_config_drive_to_an_ext4_root_and_switches_into_it() {
        let test = "applies_the_config_drive_to_an_ext4_root_and_switches_into_it";
        let Some(kernel) = prerequisites(test) else {
            return;
        };
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("SKIPPED {test}: mkfs.ext4 not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        let root = dir.path().join("root.img");
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&root)
            .arg("32M")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(made.success());
        let mut guest = GuestConfig::new("agentvm");
        guest.files.push(GuestFile {
            path: "/etc/banger-test".into(),
            contents: b"written by the agent\n".to_vec(),
            mode: 0o640,
            uid: 1000,
            gid: 1000,
        });
        guest
            .authorized_keys
            .push("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 test".into());
        let config = dir.path().join("config.img");
        let drive = ConfigDrive {
            drives: vec!["root".into(), "config".into()],
            guest,
        };
        fs::write(&config, drive.encode()).unwrap();

        let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
        let mut vm = Vm::boot(&kernel, dir.path(), &[("root", &root), ("config", &config)]);
        let log = vm.wait_for("banger-agent: no init system: staying PID 1");
        // ENOENT: no /dev/vda (virtio-mmio/blk not built in); ENODEV: no
        // ext4. Anything else (a wrong device, say) fails the test.
        if log.contains("mount root /dev/vda FAILED")
            && (log.contains("ENOENT") || log.contains("ENODEV"))
        {
            eprintln!("SKIPPED {test}: the kernel lacks built-in virtio-blk or ext4:\n{log}");
            return;
        }
        for expected in [
            "banger-agent: read config drive /dev/vdb",
            "banger-agent: hostname agentvm",
            "banger-agent: mounted root /dev/vda",
            "banger-agent: switched root",
            "banger-agent: wrote /etc/banger-test",
        ] {
            assert!(log.contains(expected), "missing {expected:?} in:\n{log}");
        }
        drop(vm);
        assert_eq!(debugfs_cat(&root, "/etc/hostname"), "agentvm\n");
        assert_eq!(
            debugfs_cat(&root, "/etc/banger-test"),
            "written by the agent\n"
        );
        assert!(
            debugfs_cat(&root, "/root/.ssh/authorized_keys").contains("AAAAC3NzaC1lZDI1NTE5 test")
        );
        let stat = Command::new("debugfs")
            .args(["-R", "stat /etc/banger-test"])
            .arg(&root)
            .output()
            .unwrap();
        let stat = String::from_utf8_lossy(&stat.stdout);
        assert!(
            stat.contains("User:  1000") && stat.contains("Group:  1000"),
            "{stat}"
        );
        assert!(
            stat.contains("Mode:  0640") || stat.contains("Mode:  00640"),
            "{stat}"
        );
    }
}
