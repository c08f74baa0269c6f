//! The lifecycle through the real CLI and daemon, against the fake
//! firecracker: API call order, stop/start/delete, validation, rollback at
//! every hook, daemon restarts, plugins, multi-VM commands.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use banger_api::model::VmState;
    use test_infra::{BangerEnv, pid_alive, wait_until, workspace_cdylib};

    fn calls_for(env: &BangerEnv, pid: u32) -> Vec<(String, String, serde_json::Value)> {
        env.fc_calls()
            .into_iter()
            .filter(|c| c["pid"].as_u64() == Some(pid as u64))
            .map(|c| {
                (
                    c["method"].as_str().unwrap_or_default().to_string(),
                    c["path"].as_str().unwrap_or_default().to_string(),
                    c["body"].clone(),
                )
            })
            .collect()
    }

    fn position(calls: &[(String, String, serde_json::Value)], method: &str, path: &str) -> usize {
        calls
            .iter()
            .position(|(m, p, _)| m == method && p == path)
            .unwrap_or_else(|| panic!("no {method} {path} in {calls:#?}"))
    }

    fn debugfs(img: &Path, cmd: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn vm_dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn install_plugin(env: &BangerEnv, crate_name: &str) -> PathBuf {
        let src = workspace_cdylib(crate_name);
        let dst = env.plugins_dir().join(src.file_name().unwrap());
        std::fs::copy(&src, &dst).unwrap();
        dst
    }

    #[test]
    fn create_configures_firecracker_in_a_valid_order() {
        let env = BangerEnv::new();
        let out = env.create("web", &["--vcpu", "2", "--memory", "512"]).ok();
        assert!(
            out.stderr.contains("launch_vmm"),
            "create must print live stages:\n{}",
            out.stderr
        );
        let vm = env.show("web");
        assert_eq!(vm.record.state, VmState::Running);
        let pid = vm.record.vmm.as_ref().expect("running VM has a VMM").pid;
        assert!(pid_alive(pid as i32));

        let calls = calls_for(&env, pid);
        let boot = position(&calls, "PUT", "/boot-source");
        let mc = position(&calls, "PUT", "/machine-config");
        let root = position(&calls, "PUT", "/drives/root");
        let work = position(&calls, "PUT", "/drives/work");
        let start = calls
            .iter()
            .position(|(m, p, b)| {
                m == "PUT" && p == "/actions" && b["action_type"] == "InstanceStart"
            })
            .expect("InstanceStart");
        assert!(boot < start && mc < start && root < start && work < start);
        assert!(root < work, "the root drive must be attached first");
        assert_eq!(
            start,
            calls.len() - 1,
            "nothing may be configured after InstanceStart"
        );

        let (k, _) = env.boot_files();
        assert_eq!(calls[boot].2["kernel_image_path"], k.display().to_string());
        assert_eq!(calls[mc].2["vcpu_count"], 2);
        assert_eq!(calls[mc].2["mem_size_mib"], 512);
        assert_eq!(calls[root].2["is_root_device"], true);
        assert_eq!(
            calls[root].2["path_on_host"],
            vm.dir.join("rootfs.ext4").display().to_string()
        );
        assert_eq!(calls[work].2["is_root_device"], false);
        assert_eq!(
            calls[work].2["path_on_host"],
            vm.dir.join("work.ext4").display().to_string()
        );

        // The VM's root disk is its own copy; the given file is untouched.
        let (_, rootfs) = env.boot_files();
        assert_eq!(
            std::fs::read(vm.dir.join("rootfs.ext4")).unwrap(),
            std::fs::read(rootfs).unwrap()
        );
        // The guest config bundle is built and inspectable.
        let guest = vm.record.guest.expect("guest config recorded");
        assert_eq!(guest.hostname, "web");
        assert!(
            guest
                .mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/root"))
        );
        // The serial console is captured for `vm logs`.
        wait_until(Duration::from_secs(10), "console output appears", || {
            !env.banger(&["vm", "logs", "web"]).ok().stdout.is_empty()
        });
    }

    #[test]
    fn stop_start_keeps_the_work_disk_and_delete_removes_everything() {
        let env = BangerEnv::new();
        env.create("keep", &[]).ok();
        let vm = env.show("keep");
        let first_pid = vm.record.vmm.unwrap().pid;
        let work = vm.dir.join("work.ext4");

        env.banger(&["vm", "stop", "keep"]).ok();
        let stopped = env.show("keep");
        assert_eq!(stopped.record.state, VmState::Stopped);
        assert!(stopped.record.vmm.is_none());
        wait_until(Duration::from_secs(10), "the VMM exits", || {
            !pid_alive(first_pid as i32)
        });
        let ctrl_alt_del = calls_for(&env, first_pid)
            .iter()
            .any(|(_, p, b)| p == "/actions" && b["action_type"] == "SendCtrlAltDel");
        assert!(ctrl_alt_del, "stop must ask the guest to shut down first");

        // Write into the work disk while stopped, as the guest would have.
        let data = env.root().join("note.txt");
        std::fs::write(&data, b"kept across restarts").unwrap();
        let st = std::process::Command::new("debugfs")
            .args(["-w", "-R", &format!("write {} note.txt", data.display())])
            .arg(&work)
            .output()
            .unwrap();
        assert!(st.status.success());

        env.banger(&["vm", "start", "keep"]).ok();
        let running = env.show("keep");
        assert_eq!(running.record.state, VmState::Running);
        assert_ne!(running.record.vmm.as_ref().unwrap().pid, first_pid);
        assert_eq!(debugfs(&work, "cat /note.txt"), "kept across restarts");

        let second_pid = running.record.vmm.unwrap().pid;
        env.banger(&["vm", "delete", "keep"]).ok();
        assert!(!running.dir.exists(), "VM dir must be gone");
        assert!(env.list().is_empty(), "row must be gone");
        wait_until(Duration::from_secs(10), "the VMM exits", || {
            !pid_alive(second_pid as i32)
        });
        let r = env.banger(&["vm", "show", "keep"]).failed();
        assert!(r.stderr.contains("keep"), "{}", r.stderr);
    }

    #[test]
    fn invalid_inputs_are_rejected_before_anything_is_created() {
        let env = BangerEnv::new();
        let (k, r) = env.boot_files();
        let (k, r) = (k.display().to_string(), r.display().to_string());
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["--name", "Bad_Name"], "Bad_Name"),
            (vec!["--name", "ok1", "--vcpu", "0"], "vcpu"),
            (vec!["--name", "ok2", "--vcpu", "-3"], "vcpu"),
            (vec!["--name", "ok3", "--memory", "0"], "memory"),
            (vec!["--name", "ok4", "--memory", "lots"], "memory"),
            (vec!["--name", "ok5", "--disk-size", "0"], "0"),
            (vec!["--name", "ok6", "--disk-size", "8X"], "8X"),
            (vec!["--name", "ok7", "--cap", "no-such-cap"], "no-such-cap"),
            (
                vec!["--name", "ok8", "--cap", "work-disk:size=1G"],
                "--disk-size",
            ),
        ];
        for (extra, needle) in cases {
            let mut args = vec!["vm", "create", "--kernel", &k, "--rootfs", &r];
            args.extend(extra.iter());
            let out = env.banger(&args).failed();
            assert!(
                out.stderr.contains(needle),
                "{args:?}: error should mention {needle:?}:\n{}",
                out.stderr
            );
        }
        let missing = env
            .banger(&[
                "vm",
                "create",
                "--name",
                "nok",
                "--kernel",
                "/nonexistent/vmlinux",
                "--rootfs",
                &r,
            ])
            .failed();
        assert!(
            missing.stderr.contains("/nonexistent/vmlinux"),
            "{}",
            missing.stderr
        );

        if env.socket().exists() {
            assert!(env.list().is_empty(), "no VM may have been recorded");
        }
        assert!(
            vm_dir_entries(&env.state_dir().join("vms")).is_empty(),
            "no VM dir may exist"
        );
        assert!(env.fc_calls().is_empty(), "no VMM may have been started");
    }

    #[test]
    fn a_failure_at_each_hook_rolls_back_and_names_the_stage() {
        let env = BangerEnv::new();
        install_plugin(&env, "banger-plugin-faulty");
        for hook in [
            "prepare_host",
            "configure_machine",
            "guest_config",
            "post_start",
        ] {
            let name = format!("f-{}", hook.replace('_', "-"));
            let cap = format!("faulty:fail={hook}");
            let out = env.create(&name, &["--cap", &cap]).failed();
            let stage = format!("{hook}:faulty");
            assert!(
                out.stderr.contains(&stage),
                "{hook}: error must name {stage}:\n{}",
                out.stderr
            );

            let vm = env.show(&name);
            assert_eq!(vm.record.state, VmState::Error, "{hook}");
            let failure = vm.record.last_error.expect("failure recorded");
            assert_eq!(failure.stage, stage);
            assert!(
                vm.record.prepared.is_empty(),
                "{hook}: still prepared: {:?}",
                vm.record.prepared
            );
            assert!(vm.record.vmm.is_none());
            // Everything the hooks prepared is gone: the work disk (work-disk is
            // prepared before faulty) and faulty's marker.
            let left = vm_dir_entries(&vm.dir);
            assert!(!left.contains(&"work.ext4".to_string()), "{hook}: {left:?}");
            assert!(
                !left.contains(&"faulty.marker".to_string()),
                "{hook}: {left:?}"
            );
            let calls = std::fs::read_to_string(vm.dir.join("faulty.calls")).unwrap_or_default();
            assert!(
                calls.contains("teardown rollback") || hook == "prepare_host",
                "{hook}: {calls}"
            );
            assert!(
                !calls.contains("teardown rollback") || hook != "prepare_host",
                "a hook that failed to prepare is not torn down: {calls}"
            );
        }
        // post_start fails after launch: that VMM must be gone.
        for pid in env.fc_calls().iter().filter_map(|c| c["pid"].as_i64()) {
            wait_until(Duration::from_secs(10), "rolled-back VMM exits", || {
                !pid_alive(pid as i32)
            });
        }
        // Deleting failed VMs leaves nothing at all.
        for hook in [
            "prepare-host",
            "configure-machine",
            "guest-config",
            "post-start",
        ] {
            env.banger(&["vm", "delete", &format!("f-{hook}")]).ok();
        }
        assert!(env.list().is_empty());
        assert!(vm_dir_entries(&env.state_dir().join("vms")).is_empty());
    }

    #[test]
    fn a_failing_teardown_keeps_the_vm_until_a_forced_delete() {
        let env = BangerEnv::new();
        install_plugin(&env, "banger-plugin-faulty");
        env.create("tf", &["--cap", "faulty:fail=teardown"]).ok();
        let vm = env.show("tf");
        let pid = vm.record.vmm.as_ref().unwrap().pid;

        let out = env.banger(&["vm", "stop", "tf"]).failed();
        assert!(
            out.stdout.contains("teardown:faulty") || out.stderr.contains("teardown:faulty"),
            "{out:?}"
        );
        let stopped = env.show("tf");
        assert_eq!(stopped.record.state, VmState::Error);
        assert_eq!(stopped.record.last_error.unwrap().stage, "teardown:faulty");
        assert!(stopped.record.vmm.is_none());
        wait_until(Duration::from_secs(10), "the VMM exits", || {
            !pid_alive(pid as i32)
        });
        assert_eq!(
            stopped.record.prepared,
            vec!["faulty".to_string()],
            "faulty is still prepared"
        );

        // A plain delete refuses to forget resources it could not release.
        env.banger(&["vm", "delete", "tf"]).failed();
        assert!(vm.dir.exists());
        assert_eq!(env.list().len(), 1);
        // --force deletes anyway.
        env.banger(&["vm", "delete", "--force", "tf"]).ok();
        assert!(!vm.dir.exists());
        assert!(env.list().is_empty());
    }

    #[test]
    fn logs_follow_streams_the_console_and_ends_when_the_vm_stops() {
        let env = BangerEnv::new();
        env.create("tail", &[]).ok();
        wait_until(Duration::from_secs(10), "console output appears", || {
            !env.banger(&["vm", "logs", "tail"]).ok().stdout.is_empty()
        });
        std::thread::scope(|s| {
            let follower = s.spawn(|| env.banger(&["vm", "logs", "tail", "-f"]));
            // Stopping makes the fake print its shutdown line, then exit; the
            // follower must deliver it and return on its own.
            env.banger(&["vm", "stop", "tail"]).ok();
            let out = follower.join().unwrap().ok();
            let whole = std::fs::read_to_string(env.show("tail").dir.join("serial.log")).unwrap();
            assert_eq!(
                out.stdout, whole,
                "follow must print the whole console, in order"
            );
            assert!(!whole.is_empty());
        });
    }

    #[test]
    fn logs_without_follow_return_only_the_last_mebibyte_from_a_line_start() {
        let env = BangerEnv::new();
        env.create("big", &["--no-start"]).ok();
        let log = env.show("big").dir.join("serial.log");
        let whole: String = (0..314_573).map(|i| format!("{i:09}\n")).collect();
        std::fs::write(&log, &whole).unwrap();
        let out = env.banger(&["vm", "logs", "big"]).ok().stdout;
        // Every line that starts inside the last MiB, nothing before.
        let window = whole.len() - (1 << 20);
        let first = whole[window - 1..].find('\n').unwrap() + window;
        assert_eq!(out.len(), whole.len() - first);
        assert!(out == whole[first..], "not the file's tail");
        assert!(out.starts_with("000209716\n"), "{}", &out[..20]);

        // A console under the cap comes back whole.
        std::fs::write(&log, "short\nconsole\n").unwrap();
        assert_eq!(
            env.banger(&["vm", "logs", "big"]).ok().stdout,
            "short\nconsole\n"
        );
    }

    #[test]
    fn a_flooded_console_is_rotated_and_logs_keep_working() {
        use std::io::Write as _;
        let env = BangerEnv::new();
        env.create("flood", &[]).ok();
        let dir = env.show("flood").dir;
        let log = dir.join("serial.log");
        let cap = 64u64 << 20;
        {
            let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
            f.write_all(&vec![b'x'; cap as usize]).unwrap();
            f.write_all(b"\nlast flooded line\n").unwrap();
        }
        let old = dir.join("serial.log.1");
        wait_until(
            Duration::from_secs(10),
            "the daemon rotates serial.log",
            || old.exists(),
        );
        let old_len = std::fs::metadata(&old).unwrap().len();
        assert!(old_len > cap, "{old_len}");
        assert!(std::fs::metadata(&log).unwrap().len() < cap);
        // The VMM goes on appending at the new end, and logs still work.
        env.banger(&["vm", "stop", "flood"]).ok();
        let now = std::fs::read_to_string(&log).unwrap();
        assert!(!now.contains("xxx"), "the flood moved to serial.log.1");
        assert!(
            !now.is_empty() && !now.contains('\0'),
            "the shutdown line lands at the new end: {now:?}"
        );
        assert_eq!(env.banger(&["vm", "logs", "flood"]).ok().stdout, now);
    }

    #[test]
    fn stats_show_the_vmm_process_and_need_a_running_vm() {
        let env = BangerEnv::new();
        env.create("st", &[]).ok();
        let pid = env.show("st").record.vmm.unwrap().pid;
        let out = env.banger(&["vm", "stats", "st", "--json"]).ok();
        let s: banger_api::api::StatsView = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(s.pid, pid);
        assert!(s.vmm_rss_bytes > 0);
        assert_eq!(s.guest_mem_total_kib, None, "no agent, no guest view");
        assert!(
            env.banger(&["vm", "stats", "st"])
                .ok()
                .stdout
                .contains("no agent")
        );
        env.banger(&["vm", "stop", "st"]).ok();
        let refused = env.banger(&["vm", "stats", "st"]).failed();
        assert!(refused.stderr.contains("start it first"), "{refused:?}");
    }

    #[test]
    fn a_vmm_api_failure_rolls_back_with_firecrackers_message() {
        let mut env = BangerEnv::new();
        env.set_env("FAKE_FC_FAIL", "PUT /drives/work");
        let out = env.create("fcfail", &[]).failed();
        assert!(out.stderr.contains("launch_vmm"), "{}", out.stderr);
        assert!(
            out.stderr.contains("/drives/work"),
            "Firecracker's fault message must surface:\n{}",
            out.stderr
        );
        let vm = env.show("fcfail");
        assert_eq!(vm.record.state, VmState::Error);
        assert_eq!(vm.record.last_error.unwrap().stage, "launch_vmm");
        assert!(!vm.dir.join("work.ext4").exists());
        for pid in env.fc_calls().iter().filter_map(|c| c["pid"].as_i64()) {
            wait_until(Duration::from_secs(10), "failed VMM exits", || {
                !pid_alive(pid as i32)
            });
        }
    }

    #[test]
    fn daemon_restart_keeps_running_vms_and_notices_dead_ones() {
        let env = BangerEnv::new();
        env.create("one", &[]).ok();
        env.create("two", &[]).ok();
        let pid1 = env.show("one").record.vmm.unwrap().pid;
        let pid2 = env.show("two").record.vmm.unwrap().pid;

        let daemon = env.daemon_pid().expect("daemon pid file");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(Duration::from_secs(10), "bangerd dies", || {
            !pid_alive(daemon)
        });
        assert!(
            pid_alive(pid1 as i32) && pid_alive(pid2 as i32),
            "VMMs must outlive the daemon"
        );
        // Its build file names this build and its pid: the next command
        // must not take it for a daemon listening (nobody is).
        assert!(
            env.root().join("run/banger/bangerd.build").exists(),
            "a killed daemon leaves its build file"
        );

        // Restart via the CLI (on demand): both still running with the same pids.
        let vms = env.list();
        assert_ne!(env.daemon_pid(), Some(daemon));
        for (name, pid) in [("one", pid1), ("two", pid2)] {
            let vm = vms.iter().find(|v| v.record.name.as_str() == name).unwrap();
            assert_eq!(vm.record.state, VmState::Running, "{name}");
            assert_eq!(vm.record.vmm.as_ref().unwrap().pid, pid, "{name}");
        }

        // Kill the daemon again, and one VM behind its back while it is down.
        let daemon = env.daemon_pid().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(Duration::from_secs(10), "bangerd dies", || {
            !pid_alive(daemon)
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid2 as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(Duration::from_secs(10), "VM two dies", || {
            !pid_alive(pid2 as i32)
        });

        assert_eq!(env.show("one").record.state, VmState::Running);
        // Reconciliation at daemon start (not the periodic monitor) found it.
        let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
        assert!(
            log.contains("reconciled two: VMM gone, marked stopped"),
            "{log}"
        );
        assert!(log.contains("reconciled one: still running"), "{log}");
        let two = env.show("two");
        assert_eq!(two.record.state, VmState::Stopped);
        assert!(two.record.vmm.is_none());

        // And while the daemon runs, a VMM that exits is noticed too.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid1 as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(
            Duration::from_secs(15),
            "the daemon marks one stopped",
            || env.show("one").record.state == VmState::Stopped,
        );
        // A stopped VM starts again with its work disk.
        env.banger(&["vm", "start", "two"]).ok();
        assert_eq!(env.show("two").record.state, VmState::Running);
    }

    #[test]
    fn shared_mount_plugin_loads_lists_and_attaches_its_drive() {
        let env = BangerEnv::new();
        let so = install_plugin(&env, "banger-plugin-shared-mount");
        let caps = env.banger(&["cap", "list"]).ok().stdout;
        let line = caps
            .lines()
            .find(|l| l.starts_with("shared-mount"))
            .unwrap_or_else(|| panic!("{caps}"));
        assert!(
            line.contains(&so.display().to_string()) || line.contains("plugin"),
            "{line}"
        );
        assert!(
            caps.lines()
                .any(|l| l.starts_with("work-disk") && l.contains("builtin")),
            "{caps}"
        );

        let share = env.root().join("share");
        std::fs::create_dir_all(share.join("sub")).unwrap();
        std::fs::write(share.join("sub/hello.txt"), b"hello from the host").unwrap();
        let cap = format!("shared-mount:host={},guest=/mnt/share", share.display());
        env.create("sm", &["--cap", &cap]).ok();
        let vm = env.show("sm");
        let pid = vm.record.vmm.as_ref().unwrap().pid;
        let calls = calls_for(&env, pid);
        let drive = position(&calls, "PUT", "/drives/shared-mount");
        assert_eq!(calls[drive].2["is_read_only"], true);
        let img = PathBuf::from(calls[drive].2["path_on_host"].as_str().unwrap());
        assert_eq!(debugfs(&img, "cat /sub/hello.txt"), "hello from the host");
        assert!(
            vm.record
                .guest
                .unwrap()
                .mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/mnt/share") && m.read_only)
        );
        let shown = env.banger(&["vm", "show", "sm"]).ok().stdout;
        assert!(
            shown.contains("shared-mount"),
            "vm show must list the capability:\n{shown}"
        );

        env.banger(&["vm", "stop", "sm"]).ok();
        assert!(!img.exists(), "teardown removes the image");
    }

    #[test]
    fn bad_plugins_are_refused_and_a_panicking_hook_fails_only_its_vm() {
        let env = BangerEnv::new();
        let wrong = install_plugin(&env, "banger-plugin-wrong-abi");
        install_plugin(&env, "banger-plugin-faulty");
        std::fs::write(env.plugins_dir().join("libgarbage.so"), b"not a library").unwrap();

        env.banger(&["daemon", "start"]).ok();
        let status = env.banger(&["daemon", "status", "--json"]).ok();
        let st: banger_api::api::DaemonStatus = serde_json::from_str(&status.stdout).unwrap();
        let wrong_err = st
            .plugin_errors
            .iter()
            .find(|e| e.contains(&wrong.display().to_string()))
            .unwrap_or_else(|| panic!("wrong-abi not reported: {:?}", st.plugin_errors));
        let abi = banger_plugin_abi_version();
        assert!(
            wrong_err.contains(&abi.to_string()) && wrong_err.contains(&(abi + 1).to_string()),
            "{wrong_err}"
        );
        assert!(
            st.plugin_errors.iter().any(|e| e.contains("libgarbage.so")),
            "{:?}",
            st.plugin_errors
        );
        let caps = env.banger(&["cap", "list"]).ok().stdout;
        assert!(
            caps.contains("faulty"),
            "the good plugin still loads:\n{caps}"
        );

        env.create("calm", &[]).ok();
        let out = env
            .create("boom", &["--cap", "faulty:panic=configure_machine"])
            .failed();
        assert!(out.stderr.contains("faulty"), "{}", out.stderr);
        assert!(out.stderr.contains("panick"), "{}", out.stderr);
        assert_eq!(env.show("boom").record.state, VmState::Error);
        // The daemon survived and the other VM is untouched.
        assert_eq!(env.show("calm").record.state, VmState::Running);
        assert_eq!(env.daemon_pid(), Some(st.pid as i32));
    }

    fn banger_plugin_abi_version() -> u32 {
        // The version this workspace's host speaks.
        banger_plugin_abi::ABI_VERSION
    }

    #[test]
    fn multi_vm_commands_run_all_and_report_in_order() {
        let env = BangerEnv::new();
        env.create("m1", &["--no-start"]).ok();
        env.create("m2", &["--no-start"]).ok();
        let out = env.banger(&["vm", "start", "m2", "ghost", "m1"]).failed();
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let pos = |n: &str| {
            lines
                .iter()
                .position(|l| l.starts_with(n))
                .unwrap_or_else(|| panic!("{n} missing: {lines:?}"))
        };
        assert!(
            pos("m2") < pos("ghost") && pos("ghost") < pos("m1"),
            "{lines:?}"
        );
        assert!(out.stdout.contains("ghost") || out.stderr.contains("ghost"));
        assert_eq!(env.show("m1").record.state, VmState::Running);
        assert_eq!(env.show("m2").record.state, VmState::Running);
        env.banger(&["vm", "delete", "m1", "m2"]).ok();
        assert!(env.list().is_empty());
    }

    #[test]
    fn concurrent_starts_of_one_vm_launch_it_once() {
        let env = BangerEnv::new();
        env.create("solo", &["--no-start"]).ok();
        std::thread::scope(|s| {
            let a = s.spawn(|| env.banger(&["vm", "start", "solo"]));
            let b = s.spawn(|| env.banger(&["vm", "start", "solo"]));
            a.join().unwrap().ok();
            b.join().unwrap().ok();
        });
        let starts = env
            .fc_calls()
            .iter()
            .filter(|c| c["body"]["action_type"] == "InstanceStart")
            .count();
        assert_eq!(starts, 1, "same-VM operations must be serialised");
    }

    #[test]
    fn concurrent_creates_of_one_name_make_one_vm_and_leak_nothing() {
        let env = BangerEnv::new();
        // The daemon is up before the race, so both requests meet in it.
        assert!(env.list().is_empty());
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| env.create("twin", &[]));
            let b = s.spawn(|| env.create("twin", &[]));
            (a.join().unwrap(), b.join().unwrap())
        });
        let (won, lost) = match (a.code, b.code) {
            (0, c) if c != 0 => (a, b),
            (c, 0) if c != 0 => (b, a),
            _ => panic!("exactly one create must succeed:\n{a:?}\n{b:?}"),
        };
        assert!(
            lost.stderr.contains("\"twin\" already exists"),
            "the loser should be told the name is taken: {}",
            lost.stderr
        );
        assert!(won.stdout.contains("twin"), "{won:?}");
        let vms = env.list();
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert_eq!(env.show("twin").record.state, VmState::Running);
        let dirs = std::fs::read_dir(env.state_dir().join("vms"))
            .unwrap()
            .count();
        assert_eq!(dirs, 1, "one VM dir, the winner's");
        let booted: std::collections::BTreeSet<u64> = env
            .fc_calls()
            .iter()
            .filter(|c| c["body"]["action_type"] == "InstanceStart")
            .filter_map(|c| c["pid"].as_u64())
            .collect();
        assert_eq!(booted.len(), 1, "one VMM booted: {booted:?}");
        env.banger(&["vm", "delete", "twin"]).ok();
        assert!(env.list().is_empty());
        let dirs = std::fs::read_dir(env.state_dir().join("vms"))
            .unwrap()
            .count();
        assert_eq!(dirs, 0);
    }

    #[test]
    fn disk_beyond_the_free_space_is_refused_by_create_and_set_unless_forced() {
        // 1 PiB: more than any test host's free space, and never written
        // (the VMs are not started).
        let huge = "1024T";
        let env = BangerEnv::new();
        let (k, rootfs) = env.boot_files();
        let (k, rootfs) = (k.display().to_string(), rootfs.display().to_string());
        let create = |force: &[&str]| {
            let mut args = vec![
                "vm",
                "create",
                "--name",
                "big",
                "--kernel",
                &k,
                "--rootfs",
                &rootfs,
                "--no-start",
                "--disk-size",
                huge,
            ];
            args.extend_from_slice(force);
            env.banger(&args)
        };
        let r = create(&[]).failed();
        assert!(
            r.stderr.contains("--disk-size") && r.stderr.contains("free"),
            "should name the size and the free space: {}",
            r.stderr
        );
        assert!(r.stderr.contains("--force-size"), "{}", r.stderr);
        assert!(env.list().is_empty(), "nothing created");
        create(&["--force-size"]).ok();
        assert_eq!(env.show("big").record.spec.disk_size.0, 1 << 50);

        env.create("small", &["--no-start"]).ok();
        let r = env
            .banger(&["vm", "set", "small", "--disk-size", huge])
            .failed();
        assert!(r.stderr.contains("--force-size"), "{}", r.stderr);
        assert_eq!(env.show("small").record.spec.disk_size.0, 64 << 20);
        env.banger(&["vm", "set", "small", "--disk-size", huge, "--force-size"])
            .ok();
        assert_eq!(env.show("small").record.spec.disk_size.0, 1 << 50);
        env.banger(&["vm", "delete", "big", "small"]).ok();
    }

    #[test]
    fn memory_beyond_the_host_is_refused_by_create_and_set() {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let host_mib = kib / 1024;
        let too_much = (host_mib + 1).to_string();
        let env = BangerEnv::new();
        for r in [
            env.create("big", &["--no-start", "--memory", &too_much])
                .failed(),
            {
                env.create("small", &["--no-start", "--memory", "256"]).ok();
                env.banger(&["vm", "set", "small", "--memory", &too_much])
                    .failed()
            },
        ] {
            assert!(
                r.stderr.contains(&format!("{too_much} MiB"))
                    && r.stderr.contains(&format!("{host_mib} MiB"))
                    && r.stderr.contains("--force-size"),
                "should name the value, the host's total and the override: {}",
                r.stderr
            );
        }
        assert_eq!(env.list().len(), 1, "only `small` was created");
        assert_eq!(env.show("small").record.spec.memory_mib, 256);

        // --force-size overcommits, on create and on set.
        let over: u32 = (host_mib + 1).try_into().unwrap();
        env.create(
            "big",
            &["--no-start", "--memory", &too_much, "--force-size"],
        )
        .ok();
        assert_eq!(env.show("big").record.spec.memory_mib, over);
        env.banger(&["vm", "set", "small", "--memory", &too_much, "--force-size"])
            .ok();
        assert_eq!(env.show("small").record.spec.memory_mib, over);
    }

    #[test]
    fn set_changes_shape_only_when_stopped_and_grows_the_disk() {
        let env = BangerEnv::new();
        env.create("shape", &[]).ok();
        let r = env.banger(&["vm", "set", "shape", "--vcpu", "3"]).failed();
        assert!(r.stderr.contains("stop"), "{}", r.stderr);
        env.banger(&["vm", "stop", "shape"]).ok();
        env.banger(&["vm", "set", "shape", "--vcpu", "0"]).failed();
        env.banger(&["vm", "set", "shape", "--disk-size", "32M"])
            .failed();
        env.banger(&[
            "vm",
            "set",
            "shape",
            "--vcpu",
            "3",
            "--memory",
            "768",
            "--disk-size",
            "128M",
        ])
        .ok();
        env.banger(&["vm", "start", "shape"]).ok();
        let vm = env.show("shape");
        let pid = vm.record.vmm.unwrap().pid;
        let calls = calls_for(&env, pid);
        let mc = position(&calls, "PUT", "/machine-config");
        assert_eq!(calls[mc].2["vcpu_count"], 3);
        assert_eq!(calls[mc].2["mem_size_mib"], 768);
        assert_eq!(
            std::fs::metadata(vm.dir.join("work.ext4")).unwrap().len(),
            128 << 20
        );
    }

    #[test]
    fn daemon_socket_is_private_and_daemon_commands_work() {
        use std::os::unix::fs::PermissionsExt;
        let env = BangerEnv::new();
        let st = env.banger(&["daemon", "status"]);
        assert_eq!(st.code, 3, "status of a stopped daemon: {st:?}");
        env.banger(&["daemon", "start"]).ok();
        let mode = std::fs::metadata(env.socket())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let v = env.banger(&["version", "--json"]).ok();
        let j: serde_json::Value = serde_json::from_str(&v.stdout).unwrap();
        assert!(j.to_string().contains(env!("CARGO_PKG_VERSION")), "{j}");
        // Beside the pid file, what lets a CLI of the same build skip
        // asking for the version: the pid and the build the socket serves.
        let build_file = env.root().join("run/banger/bangerd.build");
        let build: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&build_file).unwrap()).unwrap();
        assert_eq!(
            build["pid"].as_i64(),
            env.daemon_pid().map(i64::from),
            "{build}"
        );
        let (status, served) = raw_request(
            &env,
            "GET /v1/version HTTP/1.1\r\nHost: banger\r\nConnection: close\r\n\r\n",
            b"",
        );
        assert_eq!(status, 200, "{served}");
        let served: serde_json::Value = serde_json::from_str(&served).unwrap();
        assert_eq!(build["build"], served, "{build}");
        assert_eq!(
            std::fs::metadata(&build_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        env.banger(&["daemon", "stop"]).ok();
        wait_until(Duration::from_secs(10), "socket is removed", || {
            !env.socket().exists()
        });
        wait_until(Duration::from_secs(10), "the build file is removed", || {
            !build_file.exists()
        });
        assert_eq!(env.banger(&["daemon", "status"]).code, 3);
    }

    /// One raw HTTP/1.1 request over the daemon's socket: (status, body).
    /// The body is written in pieces so a refused one cannot wedge the writer.
    fn raw_request(env: &BangerEnv, head: &str, body: &[u8]) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        for chunk in body.chunks(64 << 10) {
            // The server may answer and close before reading it all.
            if s.write_all(chunk).is_err() {
                break;
            }
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    }

    fn post(env: &BangerEnv, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: banger\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        raw_request(env, &head, body)
    }

    #[test]
    fn oversized_and_malformed_bodies_are_refused_with_4xx_and_the_daemon_stays_up() {
        let env = BangerEnv::new();
        env.banger(&["daemon", "start"]).ok();
        let daemon = env.daemon_pid().unwrap();
        let json = "application/json";

        // 8 MiB of valid-looking JSON: refused by size, not parsed.
        let mut big = br#"{"name":"x","boot_args":""#.to_vec();
        big.resize(8 << 20, b'a');
        big.extend_from_slice(br#""}"#);
        let (status, body) = post(&env, "/v1/vms", json, &big);
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("limit of 1048576 bytes"), "{body}");

        // Malformed ones, each with its status.
        let cases: [(&str, &[u8], u16, &str); 4] = [
            (json, b"{not json", 400, "Invalid request body"),
            (json, br#"{"vcpus":"many"}"#, 422, "Invalid request body"),
            (
                "text/plain",
                br#"{"name":"x"}"#,
                415,
                "Invalid request body",
            ),
            (json, &[0xff, 0xfe, 0x00, 0x01], 400, "Invalid request body"),
        ];
        for (ctype, body, want, says) in cases {
            let (status, text) = post(&env, "/v1/vms", ctype, body);
            assert_eq!(status, want, "{ctype} {body:?}: {text}");
            assert!(text.contains(says), "{text}");
        }
        // A chunked body announcing 4 GiB, abandoned after 2 MiB.
        let head = "POST /v1/vms HTTP/1.1\r\nHost: banger\r\nContent-Type: application/json\r\n\
                    Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nffffffff\r\n";
        {
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&vec![b'{'; 2 << 20]).ok();
        }

        // Still serving, same process, nothing created.
        assert!(pid_alive(daemon));
        assert_eq!(env.daemon_pid(), Some(daemon));
        env.banger(&["version"]).ok();
        assert!(env.list().is_empty());
    }

    #[test]
    fn a_bad_config_key_is_named_with_the_fix() {
        let env = BangerEnv::new();
        env.write_config("[vm_defaults]\nvcpu = 2\n");
        let r = env.banger(&["vm", "list"]).failed();
        let all = format!(
            "{}{}",
            r.stderr,
            std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap_or_default()
        );
        assert!(all.contains("vcpu"), "{all}");
        assert!(
            all.contains("vcpus"),
            "the error should name the valid key:\n{all}"
        );
    }
}
