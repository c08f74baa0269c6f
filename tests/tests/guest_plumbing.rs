//! The host side of the guest contract through the real CLI and daemon,
//! against the fake firecracker: the config drive every VM gets, and the
//! `vsock-agent` capability (agent initramfs, vsock device, health wait).

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::time::Duration;

    use banger_api::model::VmState;
    use banger_vmm::config_drive::ConfigDrive;
    use serde_json::Value;
    use test_infra::{BangerEnv, pid_alive, wait_until, workspace_bin};

    fn calls_for(env: &BangerEnv, pid: u32) -> Vec<(String, String, Value)> {
        env.fc_calls()
            .into_iter()
            .filter(|c| c["pid"].as_u64() == Some(u64::from(pid)))
            .map(|c| {
                (
                    c["method"].as_str().unwrap_or_default().to_string(),
                    c["path"].as_str().unwrap_or_default().to_string(),
                    c["body"].clone(),
                )
            })
            .collect()
    }

    fn body_of<'a>(calls: &'a [(String, String, Value)], path: &str) -> &'a Value {
        &calls
            .iter()
            .find(|(m, p, _)| m == "PUT" && p == path)
            .unwrap_or_else(|| panic!("no PUT {path} in {calls:#?}"))
            .2
    }

    /// `/init` from a cpio archive, read by the real cpio tool; `None` (after
    /// printing SKIPPED) when cpio is not installed.
    fn init_of(archive: &Path, test: &str) -> Option<Vec<u8>> {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("SKIPPED {test} (initrd contents): cpio missing (apt-get install cpio)");
            return None;
        }
        let out = Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", "-F"])
            .arg(archive)
            .arg("init")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        Some(out.stdout)
    }

    #[test]
    fn every_vm_gets_a_config_drive_named_on_the_kernel_command_line() {
        let env = BangerEnv::new();
        env.create("cd", &[]).ok();
        let vm = env.show("cd");
        let pid = vm.record.vmm.as_ref().expect("running").pid;
        let calls = calls_for(&env, pid);

        let drive_calls: Vec<&str> = calls
            .iter()
            .filter(|(m, p, _)| m == "PUT" && p.starts_with("/drives/"))
            .map(|(_, p, _)| p.as_str())
            .collect();
        assert_eq!(
            drive_calls,
            ["/drives/root", "/drives/work", "/drives/config"]
        );
        let config = body_of(&calls, "/drives/config");
        assert_eq!(config["is_read_only"], true);
        assert_eq!(config["is_root_device"], false);
        let image = Path::new(config["path_on_host"].as_str().unwrap()).to_path_buf();
        assert!(image.starts_with(&vm.dir), "{}", image.display());

        let drive = ConfigDrive::decode(&std::fs::read(&image).unwrap()).unwrap();
        assert_eq!(drive.drives, ["root", "work", "config"]);
        assert_eq!(drive.guest.hostname, "cd");
        let work = drive
            .guest
            .mounts
            .iter()
            .find(|m| m.mount_point == Path::new("/root"))
            .expect("work disk mount");
        assert_eq!(drive.device_of(&work.drive_id).as_deref(), Some("/dev/vdb"));
        // The record keeps the guest config without file contents.
        let mut recorded = drive.guest.clone();
        for f in &mut recorded.files {
            f.contents.clear();
        }
        assert_eq!(Some(&recorded), vm.record.guest.as_ref());

        let boot_args = body_of(&calls, "/boot-source")["boot_args"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            boot_args.split(' ').any(|a| a == "banger.config=/dev/vdc"),
            "{boot_args}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&image).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o444);

        // Start after stop renders it again over the read-only file.
        env.banger(&["vm", "stop", "cd"]).ok();
        env.banger(&["vm", "start", "cd"]).ok();
        assert_eq!(env.show("cd").record.state, VmState::Running);
        env.banger(&["vm", "delete", "cd"]).ok();
        assert!(!vm.dir.exists());
    }

    #[test]
    fn vsock_agent_boots_with_the_agent_initrd_and_waits_for_healthz() {
        let mut env = BangerEnv::new();
        env.set_env("FAKE_FC_AGENT", "1");
        let out = env.create("ga", &["--cap", "vsock-agent:timeout=20"]).ok();
        assert!(
            out.stderr.contains("agent fake answered"),
            "the health wait should be reported:\n{}",
            out.stderr
        );
        let vm = env.show("ga");
        assert_eq!(vm.record.state, VmState::Running);
        let pid = vm.record.vmm.as_ref().expect("running").pid;
        let calls = calls_for(&env, pid);

        let vsock = body_of(&calls, "/vsock");
        assert_eq!(vsock["guest_cid"], 3);
        assert_eq!(
            vsock["uds_path"],
            vm.dir.join("vsock.sock").display().to_string()
        );
        let initrd = body_of(&calls, "/boot-source")["initrd_path"]
            .as_str()
            .expect("the agent initrd is passed to the VMM")
            .to_string();
        assert!(Path::new(&initrd).starts_with(&vm.dir), "{initrd}");
        // With no option and no agent_bin in config, the daemon uses the
        // banger-agent installed beside it.
        if let Some(init) = init_of(
            Path::new(&initrd),
            "vsock_agent_boots_with_the_agent_initrd",
        ) {
            assert_eq!(init, std::fs::read(workspace_bin("banger-agent")).unwrap());
        }
        let (m, p, b) = calls.last().unwrap();
        assert_eq!(
            (m.as_str(), p.as_str(), b["action_type"].as_str()),
            ("PUT", "/actions", Some("InstanceStart")),
            "nothing may be configured after InstanceStart"
        );

        env.banger(&["vm", "delete", "ga"]).ok();
        assert!(!vm.dir.exists());
    }

    #[test]
    fn vsock_agent_without_an_agent_fails_at_post_start_and_rolls_back() {
        let env = BangerEnv::new();
        // The wait comes from the daemon's config.
        env.write_config("agent_timeout_secs = 1\n");
        // A per-VM agent binary; the fake firecracker serves no agent.
        let agent = env.root().join("my-agent");
        std::fs::write(&agent, b"not really an agent").unwrap();
        let cap = format!("vsock-agent:agent={}", agent.display());
        let out = env.create("na", &["--cap", &cap]).failed();
        assert!(
            out.stderr.contains("post_start:vsock-agent"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("banger vm logs na"), "{}", out.stderr);

        let vm = env.show("na");
        assert_eq!(vm.record.state, VmState::Error);
        let failure = vm.record.last_error.expect("failure recorded");
        assert_eq!(failure.stage, "post_start:vsock-agent");
        assert!(failure.cause.contains("/healthz"), "{}", failure.cause);
        assert!(failure.cause.contains("within 1s"), "{}", failure.cause);
        assert!(vm.record.prepared.is_empty(), "{:?}", vm.record.prepared);
        assert!(vm.record.vmm.is_none());
        assert!(!vm.dir.join("work.ext4").exists());
        for pid in env.fc_calls().iter().filter_map(|c| c["pid"].as_i64()) {
            wait_until(Duration::from_secs(10), "rolled-back VMM exits", || {
                !pid_alive(pid as i32)
            });
        }
        // The initrd that was booted carried the per-VM agent.
        let pid = env.fc_calls()[0]["pid"].as_u64().unwrap() as u32;
        let calls = calls_for(&env, pid);
        let initrd = body_of(&calls, "/boot-source")["initrd_path"]
            .as_str()
            .unwrap()
            .to_string();
        if let Some(init) = init_of(Path::new(&initrd), "vsock_agent_without_an_agent") {
            assert_eq!(init, b"not really an agent");
        }

        env.banger(&["vm", "delete", "na"]).ok();
        assert!(env.list().is_empty());
    }

    #[test]
    fn vsock_agent_options_are_checked_at_create() {
        let env = BangerEnv::new();
        let out = env
            .create("bad", &["--cap", "vsock-agent:timeout=never"])
            .failed();
        assert!(out.stderr.contains("vsock-agent timeout"), "{}", out.stderr);
        assert!(env.fc_calls().is_empty(), "no VMM may have been started");
    }
}
