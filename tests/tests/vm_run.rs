//! `banger vm run` through the real CLI and daemon against the fake
//! firecracker and its fake agent, with a stand-in `ssh` first on PATH. The
//! real guest (import, mise, a real sshd) is the e2e suite's job.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;
    use std::time::Duration;

    use banger_api::model::{VmState, VmmKind};
    use banger_api::net::Subnet;
    use banger_capabilities::network::leases::Leases;
    use banger_core::store::Store;
    use test_infra::{BangerEnv, wait_until};

    fn ssh_keygen_present(test: &str) -> bool {
        let ok = Command::new("ssh-keygen").arg("-?").output().is_ok();
        if !ok {
            eprintln!("SKIPPED {test}: ssh-keygen missing (openssh-client)");
        }
        ok
    }

    /// The fake agent's answer for one real ed25519 host key.
    fn host_keys_json(dir: &Path) -> String {
        let file = dir.join("ssh_host_ed25519_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@guest", "-f"])
            .arg(&file)
            .status()
            .unwrap();
        assert!(st.success());
        let line = std::fs::read_to_string(file.with_extension("pub")).unwrap();
        serde_json::json!([{
            "algorithm": "ssh-ed25519",
            "public_key": line.trim(),
            "fingerprint": "SHA256:unused",
        }])
        .to_string()
    }

    /// An env whose fake agent reports `host_keys`, with an image `img` to
    /// run from, a stand-in `ssh` on PATH that records its arguments and
    /// exits with `$FAKE_SSH_EXIT`, and a running daemon.
    fn env_for_run(host_keys: &str, config: &str) -> BangerEnv {
        let mut env = BangerEnv::new();
        env.write_config(config);
        let keys = env.root().join("host-keys.json");
        std::fs::write(&keys, host_keys).unwrap();
        env.set_env("FAKE_FC_AGENT", "1");
        env.set_env("FAKE_FC_HOST_KEYS", &keys.display().to_string());
        let bin = env.root().join("fake-ssh-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = bin.join("ssh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" >> {}\necho END >> {0}\nexit \"${{FAKE_SSH_EXIT:-0}}\"\n",
                env.root().join("ssh-calls").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        env.set_env("PATH", &format!("{}:{path}", bin.display()));
        env.register_boot_files("img");
        env
    }

    /// Every call of the stand-in ssh: its arguments.
    fn ssh_calls(env: &BangerEnv) -> Vec<Vec<String>> {
        let text = std::fs::read_to_string(env.root().join("ssh-calls")).unwrap_or_default();
        let mut calls = vec![];
        let mut cur = vec![];
        for l in text.lines() {
            if l == "END" {
                calls.push(std::mem::take(&mut cur));
            } else {
                cur.push(l.to_string());
            }
        }
        calls
    }

    /// Gives VM `name` an address once `vm run` has created it, as the
    /// network capability would (the tests run without a bridge).
    fn lease_when_created(env: &BangerEnv, name: &str) -> std::thread::JoinHandle<()> {
        let db = env.state_dir().join("banger.db");
        let name = name.to_string();
        std::thread::spawn(move || {
            let store = Arc::new(Store::open(&db).unwrap());
            let mut id = None;
            wait_until(Duration::from_secs(30), "vm run created the VM", || {
                id = store.find_vm(&name).unwrap().map(|vm| vm.id);
                id.is_some()
            });
            let subnet: Subnet = "10.77.0.0/24".parse().unwrap();
            Leases::new(store).acquire(&id.unwrap(), &subnet).unwrap();
        })
    }

    fn run_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "vm",
            "run",
            "--image",
            "img",
            "--name",
            name,
            "--vcpu",
            "1",
            "--memory",
            "512",
            "--disk-size",
            "64M",
            "--cap",
            "vsock-agent:timeout=20",
            // These tests pin the ssh path (a stand-in ssh); the agent
            // path is agent_exec.rs's and the e2e suite's.
            "--via",
            "ssh",
        ];
        args.extend_from_slice(extra);
        args
    }

    #[test]
    fn command_mode_exits_with_the_remote_code_after_printing_the_spec() {
        if !ssh_keygen_present("command_mode_exits_with_the_remote_code") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let mut env = env_for_run(&host_keys_json(keydir.path()), "");
        env.set_env("FAKE_SSH_EXIT", "7");
        let leased = lease_when_created(&env, "cmd");
        let out = env.banger(&run_args("cmd", &["--", "sh", "-c", "git status; exit 7"]));
        leased.join().unwrap();
        assert_eq!(out.code, 7, "{out:?}");
        // The spec comes before any progress.
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(
                "spec: 1 vcpu · 512 MiB · 64M disk · vmm firecracker (config), accel kvm"
            ),
            "{out:?}"
        );
        let calls = ssh_calls(&env);
        assert_eq!(calls.len(), 1, "{calls:?}");
        let call = &calls[0];
        assert!(
            call.contains(&"HostKeyAlias=cmd.vm".to_string()),
            "{call:?}"
        );
        // The words reach the guest's shell as one argv.
        assert_eq!(
            call[call.len() - 4..],
            ["--", "sh", "-c", "'git status; exit 7'"]
        );
        // Without --rm the VM stays, running, as created.
        let vm = env.show("cmd");
        assert_eq!(vm.record.state, VmState::Running);
        assert_eq!((vm.record.spec.vcpus, vm.record.spec.memory_mib), (1, 512));
    }

    #[test]
    fn rm_deletes_the_vm_whatever_the_exit_code() {
        if !ssh_keygen_present("rm_deletes_the_vm_whatever_the_exit_code") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let mut env = env_for_run(&host_keys_json(keydir.path()), "");
        for (name, code, cmd) in [
            ("ok", 0, &["true"][..]),
            ("bad", 3, &["exit", "3"]),
            ("sess", 0, &[]),
        ] {
            env.set_env("FAKE_SSH_EXIT", &code.to_string());
            let leased = lease_when_created(&env, name);
            let mut extra = vec!["--rm"];
            if !cmd.is_empty() {
                extra.push("--");
                extra.extend_from_slice(cmd);
            }
            let out = env.banger(&run_args(name, &extra));
            leased.join().unwrap();
            assert_eq!(out.code, code, "{name}: {out:?}");
            assert!(
                out.stderr.contains(&format!("deleted VM {name}")),
                "{out:?}"
            );
            // Deleted, so no note that it still runs.
            assert!(!out.stderr.contains("still running"), "{out:?}");
            assert!(env.list().is_empty(), "{name} survived --rm");
        }
        assert_eq!(ssh_calls(&env).len(), 3);
    }

    #[test]
    fn an_interactive_session_ending_says_the_vm_still_runs() {
        if !ssh_keygen_present("an_interactive_session_ending_says_the_vm_still_runs") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let env = env_for_run(&host_keys_json(keydir.path()), "");
        let leased = lease_when_created(&env, "stay");
        let out = env.banger(&run_args("stay", &[])).ok();
        leased.join().unwrap();
        assert!(out.stderr.contains("VM stay is still running"), "{out:?}");
        assert!(out.stderr.contains("`banger vm stop stay`"), "{out:?}");
        assert!(out.stderr.contains("`banger vm delete stay`"), "{out:?}");
        // Plain `vm ssh` says the same after its session, not after a command.
        let out = env.banger(&["vm", "ssh", "--via", "ssh", "stay"]).ok();
        assert!(out.stderr.contains("VM stay is still running"), "{out:?}");
        let out = env
            .banger(&["vm", "ssh", "--via", "ssh", "stay", "--", "true"])
            .ok();
        assert!(!out.stderr.contains("still running"), "{out:?}");
    }

    #[test]
    fn detach_waits_for_ssh_then_leaves_the_vm_running_with_a_reconnect_hint() {
        if !ssh_keygen_present("detach_waits_for_ssh_then_leaves_the_vm_running") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let env = env_for_run(&host_keys_json(keydir.path()), "");
        let leased = lease_when_created(&env, "bg");
        let out = env.banger(&run_args("bg", &["-d"])).ok();
        leased.join().unwrap();
        assert!(out.stdout.contains("banger vm ssh bg"), "{out:?}");
        assert_eq!(env.show("bg").record.state, VmState::Running);
        assert!(ssh_calls(&env).is_empty(), "detached runs open no session");
    }

    #[test]
    fn detach_with_rm_or_a_command_is_refused_before_anything_exists() {
        let env = BangerEnv::new();
        for extra in [
            &["-d", "--rm"][..],
            &["-d", "--", "true"],
            &["--detach", "--rm"],
        ] {
            let mut args = vec!["vm", "run"];
            args.extend_from_slice(extra);
            let out = env.banger(&args);
            assert_eq!(out.code, 2, "{extra:?}: {out:?}");
            assert!(out.stderr.contains("cannot be used with"), "{out:?}");
        }
        assert_eq!(
            env.daemon_pid(),
            None,
            "a refused run must not even start the daemon"
        );
        assert!(env.list().is_empty());
    }

    fn git_repo_with(file: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("git")
            .args(["init", "-q"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::write(dir.path().join(file), "node 22\n").unwrap();
        dir
    }

    fn git_present(test: &str) -> bool {
        let ok = Command::new("git").arg("--version").output().is_ok();
        if !ok {
            eprintln!("SKIPPED {test}: git missing");
        }
        ok
    }

    #[test]
    fn a_tool_versions_workspace_without_nat_is_refused_before_any_vm_exists() {
        if !git_present("a_tool_versions_workspace_without_nat_is_refused") {
            return;
        }
        let repo = git_repo_with(".tool-versions");
        let p = repo.path().to_str().unwrap();
        // A short ssh wait: the lifted run below has no agent to answer.
        let env = env_for_run("[]", "ssh_wait_timeout_secs = 1\n");
        let out = env
            .banger(&["vm", "run", p, "--image", "img", "--name", "tools"])
            .failed();
        assert!(out.stderr.contains(".tool-versions"), "{out:?}");
        assert!(out.stderr.contains("--nat"), "{out:?}");
        assert!(out.stderr.contains("--no-bootstrap"), "{out:?}");
        assert!(
            !out.stderr.contains("spec:"),
            "refused before the spec: {out:?}"
        );
        assert!(env.list().is_empty(), "a refused run created a VM");

        // --no-bootstrap lifts the refusal: the VM gets created.
        let out = env.banger(&[
            "vm",
            "run",
            p,
            "--image",
            "img",
            "--name",
            "tools",
            "--disk-size",
            "64M",
            "--no-bootstrap",
        ]);
        assert!(out.stderr.contains("spec:"), "{out:?}");
        let names: Vec<String> = env
            .list()
            .iter()
            .map(|v| v.record.name.to_string())
            .collect();
        assert_eq!(names, ["tools"], "{out:?}");
        assert!(
            !env.show("tools")
                .record
                .caps
                .iter()
                .any(|c| c.name == "mise")
        );
    }

    #[test]
    fn dry_run_prints_the_spec_and_creates_nothing() {
        let env = BangerEnv::new();
        env.write_config("[vm_defaults]\nvcpus = 3\nmemory_mib = 768\ndisk_size = \"3G\"\n");
        let out = env
            .banger(&["vm", "run", "--dry-run", "--name", "dry", "--", "uname"])
            .ok();
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(
            lines[0].starts_with("spec: 3 vcpu · 768 MiB · 3G disk · vmm firecracker (config)"),
            "{out:?}"
        );
        assert!(out.stdout.contains("run `uname`"), "{out:?}");
        let out = env
            .banger(&[
                "vm",
                "run",
                "--dry-run",
                "--vcpu",
                "2",
                "--memory",
                "1G",
                "--disk-size",
                "2G",
            ])
            .ok();
        let first = out.stdout.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("spec: 2 vcpu · 1024 MiB · 2G disk · vmm "),
            "{out:?}"
        );
        assert_eq!(
            env.daemon_pid(),
            None,
            "a dry run must not even start the daemon"
        );
        assert!(env.list().is_empty());
    }

    #[test]
    fn an_ssh_wait_timeout_keeps_the_vm_even_with_rm_and_names_vm_logs() {
        // The agent runs but reports no host keys: sshd never comes up.
        let env = env_for_run("[]", "ssh_wait_timeout_secs = 2\n");
        let leased = lease_when_created(&env, "slow");
        let out = env
            .banger(&run_args("slow", &["--rm", "--", "true"]))
            .failed();
        leased.join().unwrap();
        assert!(out.stderr.contains("banger vm logs slow"), "{out:?}");
        assert!(out.stderr.contains("despite --rm"), "{out:?}");
        assert!(out.stderr.contains("ssh_wait_timeout_secs"), "{out:?}");
        assert!(
            out.stderr.contains("sshd has not started"),
            "the last cause is shown: {out:?}"
        );
        assert_eq!(env.show("slow").record.state, VmState::Running);
        assert!(ssh_calls(&env).is_empty(), "ssh ran without a target");
    }

    /// The backend a `spec:` line names.
    fn spec_vmm(line: &str) -> &str {
        line.split(" · vmm ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_default()
    }

    #[test]
    fn create_prints_the_spec_line_and_the_vm_gets_the_backend_it_names() {
        let env = BangerEnv::new();
        let out = env
            .create("fc", &["--no-start", "--vcpu", "2", "--memory", "512"])
            .ok();
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with(
                "spec: 2 vcpu · 512 MiB · 64M disk · vmm firecracker (config), accel kvm ("
            ),
            "{out:?}"
        );
        assert_eq!(env.show("fc").record.spec.vmm, VmmKind::Firecracker);

        let out = env.create("q", &["--no-start", "--vmm", "qemu"]).ok();
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(first.contains(" · vmm qemu (--vmm), accel "), "{out:?}");
        assert_eq!(env.show("q").record.spec.vmm, VmmKind::Qemu);

        // auto: whichever this host gets, the record says what the line said.
        env.write_config("vmm = \"auto\"\n");
        let out = env.create("auto", &["--no-start"]).ok();
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(first.contains("(auto: "), "{out:?}");
        assert_eq!(
            env.show("auto").record.spec.vmm.as_str(),
            spec_vmm(first),
            "{out:?}"
        );
    }

    #[test]
    fn help_shows_the_defaults_this_host_would_use_and_where_they_come_from() {
        let env = BangerEnv::new();
        env.write_config("[vm_defaults]\nvcpus = 3\n");
        for sub in ["run", "create"] {
            let help = env.banger(&["vm", sub, "--help"]).ok().stdout;
            assert!(help.contains("[default: 3 (config)]"), "{sub}: {help}");
            assert!(help.contains("MiB (host)]"), "{sub}: {help}");
            assert!(help.contains("[default: 8G (built-in)]"), "{sub}: {help}");
            // The env's config says vmm = "firecracker".
            assert!(
                help.contains("VMM backend [default: firecracker (config)]"),
                "{sub}: {help}"
            );
        }
    }
}
