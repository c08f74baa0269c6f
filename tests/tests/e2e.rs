//! End to end on a real guest: the Debian rootfs built by
//! `guest/rootfs/build` is pushed to a loopback registry, pulled with
//! `banger image pull`, and booted with the kernel built by
//! `guest/kernel/build` under QEMU (TCG) through the real CLI and daemon,
//! with banger's initramfs and agent, on a real bridge with NAT and DNS,
//! reached over ssh. Then stop/start/delete and a check that nothing is left.
//!
//! Needs (cached under `~/.cache/banger-ci`, built by the recipes):
//! `kernel-*/vmlinux`, `rootfs-systemd-*.tar`, the static agent from
//! `scripts/build-agent`, qemu-system-x86_64, vhost-device-vsock and
//! docker-registry. Missing pieces skip the test loudly, naming them.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use banger_core::model::VmState;
    use banger_core::vsock::AgentClient;
    use test_infra::guest_rig::{GREETING, Internet, rig, run};
    use test_infra::{pid_alive, wait_until};

    /// Real guests under TCG need both cores: one at a time.
    static ONE_GUEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn pulled_debian_image_boots_networked_reachable_by_ssh_and_keeps_its_work_disk() {
        let test = "pulled_debian_image_boots_networked_reachable_by_ssh_and_keeps_its_work_disk";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Host files for file_sync, under the env's HOME: a file with its
        // own mode, a directory with a subdirectory, and a symlink out of it.
        let sync_config = "[[file_sync]]\nhost = \"~/.tool/auth.json\"\nguest = \"~/.tool/auth.json\"\nmode = \"0640\"\n\
             [[file_sync]]\nhost = \"~/.aws\"\nguest = \"~/.aws\"\n";
        let Some((rig, _a)) = rig(test, "bookworm", sync_config) else {
            return;
        };
        let env = &rig.env;
        let home = env.root().join("home");
        let put = |rel: &str, body: &str, mode: u32| {
            use std::os::unix::fs::PermissionsExt;
            let p = home.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        put(".tool/auth.json", "{\"token\":\"t0k\"}", 0o600);
        put(".aws/config", "[default]\n", 0o644);
        put(".aws/sub/creds", "key=1\n", 0o600);
        put("outside/secret", "NOT FOR THE GUEST", 0o600);
        std::os::unix::fs::symlink(home.join("outside/secret"), home.join(".aws/leak")).unwrap();
        let internet = Internet::start("a", 100);
        let share = env.root().join("share");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::write(share.join("hello.txt"), "shared-hello\n").unwrap();

        let vm = rig.create(
            "g1",
            &[
                "--image",
                "bookworm",
                "--nat",
                "--cap",
                &format!("shared-mount:host={},guest=/mnt/share", share.display()),
            ],
        );
        assert_eq!(vm.record.state, VmState::Running);
        let ip = vm.address.expect("a networked VM has an address");
        assert!(ip.to_string().starts_with("10.213.0."), "{ip}");
        let qemu_pid = vm.record.vmm.as_ref().unwrap().pid as i32;
        let logs = env.banger(&["vm", "logs", "g1"]).stdout;
        for line in [
            "banger-agent: read config drive",
            "banger-agent: hostname g1",
            "banger-agent: mounted /dev/vdb on /root",
            "banger-agent: switched root",
            "banger-agent: exec /sbin/init",
        ] {
            assert!(logs.contains(line), "console lacks {line:?}:\n{logs}");
        }
        let uds = vm.dir.join("vsock.sock");
        let health = AgentClient::new(&uds, Duration::from_secs(10))
            .healthz()
            .unwrap();
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));

        // g1.vm resolves to its address through banger's DNS server, and ssh
        // with banger's key works against exactly the host keys the agent
        // reported.
        assert_eq!(rig.resolve("g1"), vec![ip]);
        assert!(rig.resolve("nope").is_empty());
        let known = rig.pin_host_keys(&vm);
        let resolved = rig.resolve("g1")[0];
        let facts = rig.ssh_ok(
            "g1",
            resolved,
            &known,
            "hostname; hostname -I; getent hosts g1.vm; cat /mnt/share/hello.txt",
        );
        let lines: Vec<&str> = facts.lines().map(str::trim).collect();
        assert_eq!(lines[0], "g1", "{facts}");
        assert_eq!(lines[1], ip.to_string(), "{facts}");
        assert!(
            lines[2].starts_with(&ip.to_string()),
            "guest resolves .vm: {facts}"
        );
        assert_eq!(lines[3], "shared-hello", "{facts}");

        // file_sync: modes kept (0640 asked for, a directory's own 0644 and
        // 0600), recursion, and the symlink out of the tree never followed.
        let synced = rig.ssh_ok(
            "g1",
            ip,
            &known,
            "stat -c '%a %U %n' /root/.tool/auth.json /root/.aws/config /root/.aws/sub/creds; \
             cat /root/.tool/auth.json; echo; test -e /root/.aws/leak && echo LEAKED || echo no-leak",
        );
        let lines: Vec<&str> = synced.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "640 root /root/.tool/auth.json",
                "644 root /root/.aws/config",
                "600 root /root/.aws/sub/creds",
                "{\"token\":\"t0k\"}",
                "no-leak"
            ],
            "{synced}"
        );
        // A host key the agent did not report is refused.
        let stranger = env.root().join("stranger");
        assert!(
            run(
                "ssh-keygen",
                &[
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    stranger.to_str().unwrap()
                ]
            )
            .status
            .success()
        );
        let fake = std::fs::read_to_string(stranger.with_extension("pub")).unwrap();
        let mut f = fake.split_whitespace();
        let wrong = env.root().join("known_hosts-wrong");
        std::fs::write(
            &wrong,
            format!("g1.vm {} {}\n", f.next().unwrap(), f.next().unwrap()),
        )
        .unwrap();
        assert!(!rig.ssh("g1", ip, &wrong, "true").status.success());

        // --nat: the guest reaches the "internet".
        let got = rig.ssh_ok("g1", ip, &known, &internet.fetch_cmd(10));
        assert!(got.trim_end().ends_with(GREETING), "{got}");

        // `vm ports`: sshd once (dual stack collapsed), a web server as http.
        rig.ssh_ok("g1", ip, &known, "busybox httpd -p 8080 -h /mnt/share");
        let mut ports = String::new();
        wait_until(
            Duration::from_secs(30),
            "vm ports shows the web server",
            || {
                ports = env.banger(&["vm", "ports", "g1"]).ok().stdout;
                ports.lines().any(|l| l.contains("g1.vm:8080"))
            },
        );
        let web: Vec<&str> = ports.lines().filter(|l| l.contains("g1.vm:8080")).collect();
        assert_eq!(web.len(), 1, "{ports}");
        assert!(
            web[0].starts_with("http ") && web[0].contains("busybox"),
            "{ports}"
        );
        let ssh: Vec<&str> = ports.lines().filter(|l| l.contains("g1.vm:22")).collect();
        assert_eq!(ssh.len(), 1, "{ports}");
        assert!(
            ssh[0].starts_with("tcp") && ssh[0].contains("sshd"),
            "{ports}"
        );

        let stats: banger_core::api::StatsView =
            serde_json::from_str(&env.banger(&["vm", "stats", "g1", "--json"]).ok().stdout)
                .unwrap();
        assert_eq!(stats.pid as i32, qemu_pid);
        let total = stats
            .guest_mem_total_kib
            .expect("the agent reports guest memory");
        assert!(
            total > 512 * 1024 && total <= 1024 * 1024,
            "guest sees its 1024 MiB: {total} KiB"
        );

        // The work disk keeps /root across stop/start; the address stays.
        rig.ssh_ok("g1", ip, &known, "echo keep-me > /root/keep.txt && sync");
        env.banger(&["vm", "stop", "g1"]).ok();
        let refused = env.banger(&["vm", "ports", "g1"]).failed();
        assert!(refused.stderr.contains("start it first"), "{refused:?}");
        wait_until(Duration::from_secs(30), "qemu exits", || {
            !pid_alive(qemu_pid)
        });
        assert!(rig.resolve("g1").is_empty(), "a stopped VM has no record");
        env.banger(&["vm", "start", "g1"]).ok();
        let again = env.show("g1");
        assert_eq!(again.record.state, VmState::Running);
        assert_eq!(again.address, Some(ip));
        let known = rig.pin_host_keys(&again);
        assert_eq!(
            rig.ssh_ok("g1", ip, &known, "cat /root/keep.txt").trim(),
            "keep-me"
        );

        // `banger vm ssh` does the same pinning itself and passes the
        // command's exit code through.
        let via_cli = env.banger(&["vm", "ssh", "g1", "--", "cat", "/root/keep.txt"]);
        assert_eq!(via_cli.code, 0, "{via_cli:?}");
        assert_eq!(via_cli.stdout.trim(), "keep-me");
        assert_eq!(env.banger(&["vm", "ssh", "g1", "--", "exit", "7"]).code, 7);

        rig.delete_all_and_check_clean(&[again]);
    }

    #[test]
    fn no_init_image_boots_with_the_agent_as_pid_1_and_no_nat_means_no_internet() {
        let test = "no_init_image_boots_with_the_agent_as_pid_1_and_no_nat_means_no_internet";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let env = &rig.env;
        let internet = Internet::start("b", 101);
        let vm = rig.create("g2", &["--image", "noinit"]);
        let ip = vm.address.expect("a networked VM has an address");
        let known = rig.pin_host_keys(&vm);
        let logs = env.banger(&["vm", "logs", "g2"]).stdout;
        for line in [
            "no init system: staying PID 1",
            "generating SSH host keys",
            "started sshd",
        ] {
            assert!(logs.contains(line), "console lacks {line:?}:\n{logs}");
        }
        assert_eq!(rig.resolve("g2"), vec![ip]);
        let out = rig.ssh_ok("g2", ip, &known, "cat /proc/1/comm; hostname");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines, ["init", "g2"], "{out}");
        // Without --nat the same server is out of reach.
        let blocked = rig.ssh("g2", ip, &known, &internet.fetch_cmd(5));
        // The fetch itself fails (timeout's 124 or bash's 1), not ssh (255).
        let code = blocked.status.code();
        assert!(
            matches!(code, Some(1) | Some(124)),
            "reached the internet without NAT ({code:?}): {}{}",
            String::from_utf8_lossy(&blocked.stdout),
            String::from_utf8_lossy(&blocked.stderr)
        );
        rig.delete_all_and_check_clean(&[vm]);
    }
}
