//! banger's SSH identity in every guest and `banger vm ssh`, through the
//! real CLI and daemon against the fake firecracker. The full ssh into a real
//! guest is the e2e test's job; here every refusal names its fix.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use banger_core::model::VmState;
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
}
