//! banger's SSH identity in every guest and `banger vm ssh`, through the
//! real CLI and daemon against the fake firecracker. The full ssh into a real
//! guest is the e2e test's job; here every refusal names its fix.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;

    use banger_api::model::VmState;
    use banger_api::net::Subnet;
    use banger_capabilities::network::leases::Leases;
    use banger_core::store::Store;
    use test_infra::BangerEnv;

    #[test]
    fn every_started_vm_authorizes_bangers_own_key() {
        let env = BangerEnv::new();
        env.create("k", &[]).ok();
        let ssh = env.state_dir().join("ssh");
        let public = std::fs::read_to_string(ssh.join("id_ed25519.pub")).unwrap();
        let public = public.trim_end();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        let mode = std::fs::metadata(ssh.join("id_ed25519"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let guest = env.show("k").record.guest.expect("guest config recorded");
        assert_eq!(guest.authorized_keys, [public.to_string()]);

        // A restart and a second VM reuse the same identity, once each.
        env.banger(&["vm", "restart", "k"]).ok();
        env.create("k2", &[]).ok();
        for name in ["k", "k2"] {
            let guest = env.show(name).record.guest.unwrap();
            assert_eq!(guest.authorized_keys, [public.to_string()], "{name}");
        }
        let again = std::fs::read_to_string(ssh.join("id_ed25519.pub")).unwrap();
        assert_eq!(again.trim_end(), public);
    }

    #[test]
    fn a_corrupt_identity_fails_the_start_at_the_guest_config_stage() {
        let env = BangerEnv::new();
        let ssh = env.state_dir().join("ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        let private = ssh.join("id_ed25519");
        std::fs::write(&private, "not a key\n").unwrap();
        let out = env.create("bad", &[]).failed();
        assert!(
            out.stderr.contains("guest_config:ssh-identity"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&private.display().to_string()),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("delete it"), "{}", out.stderr);
        let vm = env.show("bad");
        assert_eq!(vm.record.state, VmState::Error);
        assert!(vm.record.vmm.is_none(), "no VMM may run without the key");
        assert!(vm.record.prepared.is_empty(), "{:?}", vm.record.prepared);

        // The fix the message names works.
        std::fs::remove_file(&private).unwrap();
        std::fs::remove_file(ssh.join("id_ed25519.pub")).ok();
        env.banger(&["vm", "start", "bad"]).ok();
        assert_eq!(env.show("bad").record.state, VmState::Running);
    }

    #[test]
    fn vm_ssh_refuses_a_stopped_vm() {
        let env = BangerEnv::new();
        env.create("off", &["--no-start"]).ok();
        for args in [&["vm", "ssh", "off"][..], &["vm", "ssh", "off", "--print"]] {
            let out = env.banger(args).failed();
            assert!(out.stderr.contains("start it first"), "{out:?}");
        }
    }

    #[test]
    fn vm_ssh_print_without_an_agent_names_the_vsock_agent_capability() {
        let env = BangerEnv::new();
        env.create("noagent", &[]).ok();
        let out = env
            .banger(&["vm", "ssh", "noagent", "--print", "--", "true"])
            .failed();
        assert!(out.stderr.contains("--cap vsock-agent"), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
    }

    #[test]
    fn vm_ssh_without_an_address_names_the_network_capability() {
        let mut env = BangerEnv::new();
        env.set_env("FAKE_FC_AGENT", "1");
        env.create("nonet", &["--cap", "vsock-agent:timeout=20"])
            .ok();
        let out = env.banger(&["vm", "ssh", "nonet", "--print"]).failed();
        assert!(out.stderr.contains("network capability"), "{out:?}");
    }

    fn ssh_keygen_present(test: &str) -> bool {
        let ok = Command::new("ssh-keygen").arg("-?").output().is_ok();
        if !ok {
            eprintln!("SKIPPED {test}: ssh-keygen missing (openssh-client)");
        }
        ok
    }

    /// An env whose fake agent reports `host_keys` (a JSON array), with a
    /// running VM `name` that has the agent and a leased address, as the
    /// network capability would give it.
    fn env_with_vm(name: &str, host_keys: &str) -> (BangerEnv, Ipv4Addr) {
        let mut env = BangerEnv::new();
        let keys = env.root().join("host-keys.json");
        std::fs::write(&keys, host_keys).unwrap();
        env.set_env("FAKE_FC_AGENT", "1");
        env.set_env("FAKE_FC_HOST_KEYS", &keys.display().to_string());
        env.create(name, &["--cap", "vsock-agent:timeout=20"]).ok();
        let id = env.show(name).record.id;
        let store = Arc::new(Store::open(&env.state_dir().join("banger.db")).unwrap());
        let subnet: Subnet = "10.77.0.0/24".parse().unwrap();
        let lease = Leases::new(store).acquire(&id, &subnet).unwrap();
        assert_eq!(env.show(name).address, Some(lease.ip));
        (env, lease.ip)
    }

    /// A real ed25519 host key as the guest's sshd has it: (public line,
    /// the agent's JSON for it).
    fn host_key(dir: &Path) -> (String, String) {
        let file = dir.join("ssh_host_ed25519_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@guest", "-f"])
            .arg(&file)
            .status()
            .unwrap();
        assert!(st.success());
        let line = std::fs::read_to_string(file.with_extension("pub")).unwrap();
        let line = line.trim().to_string();
        let json = serde_json::json!([{
            "algorithm": "ssh-ed25519",
            "public_key": line,
            "fingerprint": "SHA256:unused",
        }]);
        (line, json.to_string())
    }

    #[test]
    fn vm_ssh_print_pins_the_agents_host_keys_and_prints_the_exact_command() {
        if !ssh_keygen_present("vm_ssh_print_pins_the_agents_host_keys") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let (line, json) = host_key(keydir.path());
        let (env, ip) = env_with_vm("sshy", &json);
        let out = env
            .banger(&["vm", "ssh", "sshy", "--print", "--", "uname", "-a"])
            .ok();
        let ssh = env.state_dir().join("ssh");
        let known = ssh.join("known_hosts.d/sshy");
        assert_eq!(
            out.stdout,
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o UserKnownHostsFile={} \
                 -o StrictHostKeyChecking=yes -o HostKeyAlias=sshy.vm -o LogLevel=ERROR \
                 -o ConnectTimeout=30 root@{ip} -- uname -a\n",
                ssh.join("id_ed25519").display(),
                known.display()
            )
        );
        let mode = std::fs::metadata(&known).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // ssh finds the guest's key under the alias it is told to use and
        // under the address, and under nothing else.
        let blob = line.split_whitespace().nth(1).unwrap();
        for host in ["sshy.vm".to_string(), ip.to_string()] {
            let found = Command::new("ssh-keygen")
                .args(["-F", &host, "-f"])
                .arg(&known)
                .output()
                .unwrap();
            assert!(found.status.success(), "{host}: {found:?}");
            assert!(String::from_utf8_lossy(&found.stdout).contains(blob));
        }
        let other = Command::new("ssh-keygen")
            .args(["-F", "other.vm", "-f"])
            .arg(&known)
            .output()
            .unwrap();
        assert!(!other.status.success());
    }

    #[test]
    fn vm_ssh_says_when_sshd_has_not_started() {
        let (env, _) = env_with_vm("early", "[]");
        let out = env.banger(&["vm", "ssh", "early", "--print"]).failed();
        assert!(out.stderr.contains("sshd has not started"), "{out:?}");
    }

    #[test]
    fn vm_ssh_runs_the_system_ssh_and_exits_with_its_code() {
        if !ssh_keygen_present("vm_ssh_runs_the_system_ssh") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let (_, json) = host_key(keydir.path());
        let (mut env, ip) = env_with_vm("run", &json);
        let printed = env
            .banger(&[
                "vm", "ssh", "run", "--via", "ssh", "--print", "--", "exit", "7",
            ])
            .ok()
            .stdout;

        // A stand-in `ssh` first on PATH records its arguments.
        let bin = env.root().join("fake-ssh-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let record = env.root().join("ssh-args");
        let script = bin.join("ssh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nprintf '%s\\n' ssh \"$@\" > {}\nexit \"$FAKE_SSH_EXIT\"\n",
                record.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::var("PATH").unwrap_or_default();
        env.set_env("PATH", &format!("{}:{path}", bin.display()));

        env.set_env("FAKE_SSH_EXIT", "7");
        // The fake VMM's guest has no sshd, so the default would be the agent.
        let out = env.banger(&["vm", "ssh", "run", "--via", "ssh", "--", "exit", "7"]);
        assert_eq!(out.code, 7, "{out:?}");
        let args = std::fs::read_to_string(&record).unwrap();
        let args: Vec<&str> = args.lines().collect();
        let words: Vec<&str> = printed.split_whitespace().collect();
        assert_eq!(args, words, "--print must show exactly what runs");

        env.set_env("FAKE_SSH_EXIT", "255");
        let out = env.banger(&["vm", "ssh", "run", "--via", "ssh"]);
        assert_eq!(out.code, 255, "{out:?}");
        // ssh's own failure names the VM and the address that did not answer.
        assert!(
            out.stderr
                .contains(&format!("ssh to VM run at {ip} failed (exit 255)")),
            "{out:?}"
        );

        // No ssh at all.
        let empty = env.root().join("empty-bin");
        std::fs::create_dir_all(&empty).unwrap();
        env.set_env("PATH", &empty.display().to_string());
        let out = env.banger(&["vm", "ssh", "run", "--via", "ssh"]).failed();
        assert!(out.stderr.contains("openssh-client"), "{out:?}");
    }
}
