//! End to end on a real guest: the Debian rootfs built by
//! `guest/rootfs/build` is pushed to a loopback registry, pulled with
//! `banger image pull`, and booted with the kernel built by
//! `guest/kernel/build` under QEMU (TCG) through the real CLI and daemon,
//! with banger's initramfs and agent, on a real bridge with NAT and DNS,
//! reached over ssh. Then stop/start/delete and a check that nothing is left.
//!
//! Needs (cached under `~/.cache/banger-ci`, built by the recipes):
//! `kernel-*/vmlinux`, `rootfs-systemd-*.tar`, the static agent from
//! `scripts/build-agent`, qemu-system-x86_64, vhost-device-vsock (one test
//! runs the agent on the `vsock` transport) and docker-registry. Missing pieces skip the test loudly, naming them.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use banger_api::model::VmState;
    use banger_vmm::vsock::AgentClient;
    use test_infra::dns::{StandInUpstream, Target};
    use test_infra::guest_artifacts::GuestArtifacts;
    use test_infra::guest_rig::{GREETING, Internet, Rig, rig_as, run};
    use test_infra::{git, pid_alive, wait_until};

    /// The rig with the daemon as the unprivileged user `banger-e2e` and
    /// the helper `banger system install` set up (issue 10);
    /// `BANGER_E2E_AS_USER=0` runs it as root instead.
    fn rig(test: &str, image: &str, extra: &str) -> Option<(Rig, GuestArtifacts)> {
        rig_as(test, image, extra, test_infra::as_user::requested(true))
    }

    /// A name only the stand-in internet's DNS server knows.
    const WEB_NAME: &str = "web.internet.test";

    /// Serves [`WEB_NAME`] (the stand-in internet's web server) and nothing
    /// else of `internet.test` from a DNS server inside its namespace, and
    /// makes that the daemon's only upstream (`[network] dns_upstream`),
    /// restarting the daemon so it reads it.
    fn internet_dns(rig: &Rig, internet: &Internet) -> StandInUpstream {
        let server = internet.server();
        let upstream = StandInUpstream::start(
            (server, 53).into(),
            Some(&internet.netns_path()),
            &["internet.test."],
            &[("web.internet.test.", Target::A(server))],
        );
        let config = rig.env.root().join("config/banger/config.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        assert_eq!(text.matches("[network]\n").count(), 1, "{text}");
        let line = format!("[network]\ndns_upstream = [\"{}\"]\n", upstream.addr());
        std::fs::write(&config, text.replace("[network]\n", &line)).unwrap();
        rig.env.banger(&["daemon", "stop"]).ok();
        upstream
    }

    /// The fetch itself failed (timeout's 124 or bash's 1), not ssh (255).
    fn assert_fetch_failed(out: &std::process::Output, what: &str) {
        let code = out.status.code();
        assert!(
            matches!(code, Some(1) | Some(124)),
            "{what} ({code:?}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `getent hosts NAME` in the guest: the addresses it resolved to
    /// (none when the lookup failed).
    fn guest_lookup(
        rig: &Rig,
        vm: &str,
        ip: std::net::Ipv4Addr,
        known: &std::path::Path,
        name: &str,
    ) -> Vec<String> {
        let out = rig.ssh(vm, ip, known, &format!("getent hosts {name}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }

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
        // The agent on vhost-user-vsock and vhost-device-vsock, the
        // transport that is not the default, so both stay proven on a
        // real guest.
        let sync_config = "qemu_agent_transport = \"vsock\"\n[[file_sync]]\nhost = \"~/.tool/auth.json\"\nguest = \"~/.tool/auth.json\"\nmode = \"0640\"\n\
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
        // The host's git identity, which every guest gets.
        put(
            ".gitconfig",
            "[user]\n\tname = E2E Tester\n\temail = e2e@banger.test\n",
            0o644,
        );
        std::os::unix::fs::symlink(home.join("outside/secret"), home.join(".aws/leak")).unwrap();
        let internet = Internet::start("a", 100);
        let _upstream = internet_dns(&rig, &internet);
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
        assert!(ip.to_string().starts_with(rig.subnet_prefix()), "{ip}");
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
        // file-sync put the host's git identity in root's ~/.gitconfig.
        let git_id = rig.ssh_ok(
            "g1",
            ip,
            &known,
            "git config --global user.name; git config --global user.email",
        );
        let lines: Vec<&str> = git_id.lines().map(str::trim).collect();
        assert_eq!(lines, ["E2E Tester", "e2e@banger.test"], "{git_id}");

        // ssh-identity's sshd drop-in is in place and is what sshd runs
        // with: keys only, root by key only, StrictModes on.
        let sshd = rig.ssh_ok(
            "g1",
            ip,
            &known,
            "cat /etc/ssh/sshd_config.d/banger.conf; /usr/sbin/sshd -T",
        );
        assert!(
            sshd.lines()
                .any(|l| l.trim() == "PasswordAuthentication no"),
            "drop-in missing:\n{sshd}"
        );
        for line in [
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "permitrootlogin without-password",
            "strictmodes yes",
        ] {
            assert!(
                sshd.lines().any(|l| l.trim() == line),
                "sshd -T lacks {line:?}:\n{sshd}"
            );
        }
        // Plain `ssh g1.vm` through `banger ssh-config --install`: banger's
        // key and the host keys the agent reported, no known_hosts file.
        // ssh reads ~/.ssh/config from the passwd home, not $HOME, hence -F;
        // resolving `.vm` is the host resolver's job (resolved's routing,
        // absent here), hence HostName: %n stays `g1.vm` for the host keys.
        env.banger(&["ssh-config", "--install"]).ok();
        let user_config = home.join(".ssh/config");
        let out = env
            .command(std::path::Path::new("ssh"))
            .arg("-F")
            .arg(&user_config)
            .args([
                "-o",
                &format!("HostName={ip}"),
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=30",
                "g1.vm",
                "hostname",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ssh g1.vm through the installed ssh-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "g1");

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
        // ... and finds it by name: the guest asks banger's DNS server on
        // the bridge, which forwards the name to the internet's DNS server.
        assert_eq!(
            guest_lookup(&rig, "g1", ip, &known, WEB_NAME),
            [internet.server().to_string()]
        );
        assert!(
            guest_lookup(&rig, "g1", ip, &known, "nope.internet.test").is_empty(),
            "the upstream's NXDOMAIN is passed on"
        );
        let got = rig.ssh_ok("g1", ip, &known, &internet.fetch_cmd_to(WEB_NAME, 10));
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

        let stats: banger_api::api::StatsView =
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

        // The new work disk was seeded from the image's /root (Debian's
        // dotfiles), and /root is 0755 root:root.
        assert!(
            logs.contains("banger-agent: seeded new disk on /root from the image"),
            "{logs}"
        );
        let home = rig.ssh_ok(
            "g1",
            ip,
            &known,
            "stat -c '%a %U %G' /root; head -c 200 /root/.bashrc | grep -c . ; test -f /root/.profile && echo has-profile",
        );
        let lines: Vec<&str> = home.lines().map(str::trim).collect();
        assert_eq!(lines[0], "755 root root", "{home}");
        assert_ne!(lines[1], "0", "an empty /root/.bashrc: {home}");
        assert_eq!(lines[2], "has-profile", "{home}");

        // The work disk keeps /root across stop/start; the address stays.
        // /root is made group-writable and not root's, which sshd's
        // StrictModes refuses: the next start must reset it.
        rig.ssh_ok(
            "g1",
            ip,
            &known,
            "echo keep-me > /root/keep.txt && chmod 0775 /root && chown 1000:1000 /root && sync",
        );
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
            rig.ssh_ok(
                "g1",
                ip,
                &known,
                "cat /root/keep.txt; stat -c '%a %U %G' /root"
            )
            .lines()
            .map(str::trim)
            .collect::<Vec<_>>(),
            ["keep-me", "755 root root"]
        );
        let logs = env.banger(&["vm", "logs", "g1"]).stdout;
        assert_eq!(
            logs.matches("seeded new disk on /root").count(),
            1,
            "a used work disk is not seeded again:\n{logs}"
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
        let _upstream = internet_dns(&rig, &internet);
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
        assert_fetch_failed(&blocked, "reached the internet without NAT");
        // Names still resolve (the daemon on the host asks upstream), but
        // resolving is not reaching: the fetch by name fails the same way.
        assert_eq!(
            guest_lookup(&rig, "g2", ip, &known, WEB_NAME),
            [internet.server().to_string()]
        );
        let blocked = rig.ssh("g2", ip, &known, &internet.fetch_cmd_to(WEB_NAME, 5));
        assert_fetch_failed(&blocked, "reached the internet by name without NAT");
        rig.delete_all_and_check_clean(&[vm]);
    }

    /// A kernel whose virtio_console never starts (`initcall_blacklist`,
    /// as if built without it) under QEMU's default serial transport: the
    /// agent finds no port and no vsock to fall back to, says so on the
    /// console, and the create fails with its reason at once instead of at
    /// the end of the agent timeout (docs/guest-contract.md,
    /// "Unreachable"). The VM is left in error, its VMM stopped.
    #[test]
    fn a_kernel_without_the_serial_transports_driver_fails_the_create_with_the_agents_reason() {
        let test =
            "a_kernel_without_the_serial_transports_driver_fails_the_create_with_the_agents_reason";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The rig's agent timeout is 240 s.
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let env = &rig.env;
        let started = std::time::Instant::now();
        let out = rig.try_create(
            "mute",
            &[
                "--image",
                "noinit",
                "--boot-args",
                "initcall_blacklist=virtio_console_init",
            ],
        );
        let took = started.elapsed();
        assert_ne!(out.code, 0, "the create succeeded:\n{}", out.stdout);
        for part in [
            "The guest agent says the host cannot reach it",
            "CONFIG_VIRTIO_CONSOLE",
            "qemu_agent_transport = \"vsock\"",
            "banger vm logs mute",
        ] {
            assert!(out.stderr.contains(part), "no {part:?} in:\n{}", out.stderr);
        }
        // The agent waits 5 s for its port on a guest booting in a few:
        // well under a minute, where the rig's agent timeout is 240 s.
        assert!(
            took < Duration::from_secs(60),
            "the create took {took:?}:\n{}",
            out.stderr
        );
        let logs = env.banger(&["vm", "logs", "mute"]).stdout;
        assert!(
            logs.contains(banger_guest_protocol::api::UNREACHABLE_MARK),
            "{logs}"
        );
        let vm = env.show("mute");
        assert_eq!(vm.record.state, VmState::Error);
        assert!(vm.record.vmm.is_none(), "the VMM was stopped");
        rig.delete_all_and_check_clean(&[vm]);
    }

    /// Commands without sshd (docs/agent-exec.md): `vm run` and `vm ssh`
    /// through the guest agent on the no-init image, exit codes, stdout and
    /// stderr apart, stdin, and a pty session driven through `script`.
    #[test]
    fn vm_run_and_vm_ssh_through_the_agent_without_sshd() {
        let test = "vm_run_and_vm_ssh_through_the_agent_without_sshd";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let env = &rig.env;
        let shape = [
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "--image",
            "noinit",
        ];
        let mut args = vec!["vm", "run", "--rm", "--name", "x1", "--via", "agent"];
        args.extend_from_slice(&shape);
        args.extend_from_slice(&["--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
        let out = env.banger(&args);
        assert_eq!(out.code, 7, "{}", out.stderr);
        assert_eq!(out.stdout, "out\n");
        assert!(out.stderr.contains("err\n"), "{}", out.stderr);
        assert!(
            out.stderr.contains("deleted VM x1 (--rm)"),
            "{}",
            out.stderr
        );

        // The default for a command without a workspace is the agent: PID 1
        // is banger's agent (no init system), and no ssh is involved.
        let mut args = vec!["vm", "run", "--name", "x2"];
        args.extend_from_slice(&shape);
        args.extend_from_slice(&["--", "cat /proc/1/comm; hostname"]);
        let out = env.banger(&args).ok();
        assert_eq!(out.stdout, "init\nx2\n", "{}", out.stderr);

        let banger = env.banger_bin();
        let mut c = env.command(&banger);
        c.args([
            "vm",
            "ssh",
            "--via",
            "agent",
            "x2",
            "--",
            "tr a-z A-Z; exit 3",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"through stdin\n").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "THROUGH STDIN\n");

        // An interactive session on a pty: `script` gives banger a terminal
        // and types into it.
        let line = format!("{} vm ssh --via agent x2", banger.display());
        let mut c = env.command(std::path::Path::new("script"));
        c.args(["-qec", &line, "/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"tty; stty size; exit 5\n").unwrap();
            // script ends its session when its stdin ends; keep it open
            // until the guest shell has answered and exited.
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("/dev/pts/"), "{text}");
            assert_eq!(out.status.code(), Some(5), "{text}");
        }
        let vm = env.show("x2");
        rig.delete_all_and_check_clean(&[vm]);
    }

    /// Issue 12's snapshot round trip on a real guest under QEMU/TCG,
    /// through the CLI: on the default `serial` transport (the agent on a
    /// virtio-serial port, which QEMU 7.2 migrates) a VM is snapshotted,
    /// and two VMs restored from the snapshot run side by side with the
    /// source, each with the file written before the snapshot, its own
    /// name and address, and the agent reachable with its own secret.
    /// (Under `qemu_agent_transport = "vsock"` the snapshot is refused:
    /// QEMU 7.2 cannot migrate vhost-user-vsock.)
    #[test]
    fn a_real_guest_snapshot_restores_twice_side_by_side() {
        let test = "a_real_guest_snapshot_restores_twice_side_by_side";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let env = &rig.env;
        let started = std::time::Instant::now();
        let src = rig.create("src", &["--image", "noinit"]);
        let cold = started.elapsed();
        let agent = |name: &str, cmd: &str| {
            env.banger(&["vm", "ssh", "--via", "agent", name, "--", cmd])
                .ok()
                .stdout
        };
        agent("src", "echo written-before-the-snapshot > /root/marker");
        env.banger(&["vm", "snapshot", "src", "s1"]).ok();

        let mut restored = Vec::new();
        for name in ["r1", "r2"] {
            let started = std::time::Instant::now();
            let out = env.banger(&["vm", "create", "--name", name, "--from-snapshot", "s1"]);
            let took = started.elapsed();
            let logs = env.banger(&["vm", "logs", name]).stdout;
            assert_eq!(out.code, 0, "{}\nconsole:\n{logs}", out.stderr);
            eprintln!("{test}: cold create {cold:.2?}, restore of {name} {took:.2?}");
            restored.push(env.show(name));
        }
        let mut addresses = vec![src.address.unwrap()];
        for vm in &restored {
            let name = vm.record.name.as_str();
            assert_eq!(vm.record.state, VmState::Running);
            let address = vm.address.unwrap();
            assert!(!addresses.contains(&address), "{name} got {address} again");
            addresses.push(address);
            // The agent answers with this VM's own secret, the file from
            // before the snapshot is there, and the guest took its name
            // and address (and gave up the source's).
            let out = agent(name, "cat /root/marker; hostname; hostname -I");
            let mut lines = out.lines();
            assert_eq!(lines.next(), Some("written-before-the-snapshot"), "{out}");
            assert_eq!(lines.next(), Some(name), "{out}");
            let ips: Vec<&str> = lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect();
            assert_eq!(ips, [address.to_string()], "{out}");
            // A restore's writes are its own.
            agent(name, &format!("echo {name} > /root/marker"));
        }
        // The source goes on as it was, unaffected by its restores.
        let out = agent("src", "cat /root/marker; hostname");
        assert_eq!(out, "written-before-the-snapshot\nsrc\n");
        // Afterwards a restored VM is an ordinary one: stopped and started,
        // it boots cold from its own disks, through a bridge of its own.
        env.banger(&["vm", "stop", "r1"]).ok();
        env.banger(&["vm", "start", "r1"]).ok();
        assert_eq!(agent("r1", "cat /root/marker; hostname"), "r1\nr1\n");
        let mut all = vec![src];
        all.extend(restored);
        rig.delete_all_and_check_clean(&all);
    }

    /// The warm pool on a real guest (`docs/warm-pool.md`): the daemon
    /// boots one VM of the default shape ahead; `vm run --rm -- CMD` takes
    /// it (no boot) and runs the command in it, under the pooled VM's own
    /// name; the refill boots another, which a daemon stop deletes with
    /// the rest of the pool, leaving no QEMU behind.
    #[test]
    fn a_vm_run_takes_a_real_guest_from_the_warm_pool() {
        let test = "a_vm_run_takes_a_real_guest_from_the_warm_pool";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let pool_config = "warm_pool = 1\ndefault_image_name = \"noinit\"\n\
                           [vm_defaults]\nmemory_mib = 1024\ndisk_size = \"256M\"\n";
        let Some((rig, _a)) = rig(test, "noinit", pool_config) else {
            return;
        };
        let env = &rig.env;
        // The rig's daemon started before its image was pulled.
        env.banger(&["daemon", "stop"]).ok();
        let pool = || -> banger_api::api::PoolView {
            serde_json::from_str(&env.banger(&["vm", "pool", "--json"]).ok().stdout).unwrap()
        };
        let mut pooled = None;
        wait_until(
            Duration::from_secs(240),
            "the warm pool holds a running guest",
            || {
                let p = pool();
                assert_eq!(p.last_error, None, "{p:?}");
                pooled = p
                    .vms
                    .into_iter()
                    .find(|v| v.record.state == VmState::Running);
                pooled.is_some()
            },
        );
        let pooled = pooled.unwrap();
        let name = pooled.record.name.to_string();
        let started = std::time::Instant::now();
        let out = env.banger(&["vm", "run", "--rm", "--", "hostname"]).ok();
        eprintln!(
            "{test}: vm run --rm -- hostname from the pool: {:.2?}",
            started.elapsed()
        );
        assert_eq!(out.stdout.trim(), name, "{out:?}");
        assert!(out.stderr.contains("warm pool"), "{out:?}");
        // The graceful stop waits for the refill under way, then deletes
        // the pool; the taken VM went with --rm.
        env.banger(&["daemon", "stop"]).ok();
        let left = test_infra::processes_in(env.root());
        assert!(
            left.is_empty(),
            "processes left after the daemon stop: {left:?}"
        );
        // Every VM's directory went too (asked without a daemon, which
        // would start filling the pool again).
        let dirs = env.vm_dirs();
        assert!(dirs.is_empty(), "{dirs:?}");
    }

    /// A new repository on `main` at `repo`, with the host's (the env's
    /// HOME's) global git identity set.
    fn init_repo(home: &std::path::Path, repo: &std::path::Path) {
        std::fs::create_dir_all(repo).unwrap();
        git(home, repo, &["init", "-q", "-b", "main"]);
        git(
            home,
            repo,
            &["config", "--global", "user.name", "Host Person"],
        );
        git(
            home,
            repo,
            &["config", "--global", "user.email", "host@example.com"],
        );
    }

    #[test]
    fn workspace_prepare_and_export_round_trip_through_a_real_guest() {
        let test = "workspace_prepare_and_export_round_trip_through_a_real_guest";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((rig, _a)) = rig(test, "bookworm", "") else {
            return;
        };
        let env = &rig.env;
        // The daemon's HOME is the env's: its global git identity is the
        // one the guest must get.
        let home = env.root().join("home");
        let repo = env.root().join("repo");
        init_repo(&home, &repo);
        let write = |rel: &str, body: &[u8]| {
            let p = repo.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        };
        write("a.txt", b"committed\n");
        write("b.txt", b"to be deleted\n");
        write(".gitignore", b"*.log\n");
        write("bin/tool", b"#!/bin/sh\necho tool\n");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                repo.join("bin/tool"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
        }
        std::os::unix::fs::symlink("a.txt", repo.join("link")).unwrap();
        git(&home, &repo, &["add", "-A"]);
        git(&home, &repo, &["commit", "-q", "-m", "base"]);
        let base = git(&home, &repo, &["rev-parse", "HEAD"]);
        write("a.txt", b"changed on the host\n");
        std::fs::remove_file(repo.join("b.txt")).unwrap();
        write("untracked.txt", b"new\n");
        write("noise.log", b"ignored\n");

        let vm = rig.create("ws1", &["--image", "bookworm"]);
        let ip = vm.address.unwrap();
        let known = rig.pin_host_keys(&vm);
        let out = env
            .banger(&["vm", "workspace", "prepare", "ws1", repo.to_str().unwrap()])
            .ok();
        assert!(
            out.stderr.contains("1 untracked file was not copied")
                && out.stderr.contains("--include-untracked"),
            "{}",
            out.stderr
        );
        let probe = "cd /root/repo && git status --porcelain; git rev-parse HEAD; cat a.txt; \
                     stat -c %a bin/tool; readlink link; \
                     for f in b.txt untracked.txt noise.log; do test -e $f && echo has-$f || echo no-$f; done; \
                     git config user.name";
        let got = rig.ssh_ok("ws1", ip, &known, probe);
        let lines: Vec<&str> = got.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "M a.txt",
                "D b.txt",
                base.as_str(),
                "changed on the host",
                "755",
                "a.txt",
                "no-b.txt",
                "no-untracked.txt",
                "no-noise.log",
                "Host Person"
            ],
            "{got}"
        );
        // With the flag the untracked file comes too; ignored never does.
        env.banger(&[
            "vm",
            "workspace",
            "prepare",
            "ws1",
            repo.to_str().unwrap(),
            "--include-untracked",
        ])
        .ok();
        let got = rig.ssh_ok(
            "ws1",
            ip,
            &known,
            "cd /root/repo; cat untracked.txt; test -e noise.log && echo has-noise || echo no-noise",
        );
        assert_eq!(
            got.lines().collect::<Vec<_>>(),
            ["new", "no-noise"],
            "{got}"
        );

        // Work in the guest: a commit, then uncommitted edits, a deletion
        // and a new binary file. The export applied to a clean host checkout
        // of the base gives the guest's tree.
        rig.ssh_ok(
            "ws1",
            ip,
            &known,
            "cd /root/repo && git add -A && git -c user.name=g -c user.email=g@g commit -q -m guest && \
             echo more >> a.txt && rm bin/tool && printf '\\000\\001\\002binary' > blob.bin && \
             mkdir -p deep/er && echo x > deep/er/y.txt",
        );
        let guest_tree = rig
            .ssh_ok(
                "ws1",
                ip,
                &known,
                "cd /root/repo && export GIT_INDEX_FILE=$(mktemp -u) && git add -A && git write-tree; rm -f $GIT_INDEX_FILE",
            )
            .trim()
            .to_string();
        let patch = env.root().join("guest.patch");
        let out = env
            .banger(&[
                "vm",
                "workspace",
                "export",
                "ws1",
                "--output",
                patch.to_str().unwrap(),
            ])
            .ok();
        assert!(
            out.stderr.contains(&base[..12]),
            "the ref used is printed: {}",
            out.stderr
        );
        let clean = env.root().join("clean");
        git(
            &home,
            env.root(),
            &[
                "clone",
                "-q",
                repo.to_str().unwrap(),
                clean.to_str().unwrap(),
            ],
        );
        git(&home, &clean, &["checkout", "-q", &base]);
        git(
            &home,
            &clean,
            &["apply", "--binary", patch.to_str().unwrap()],
        );
        git(&home, &clean, &["add", "-A"]);
        assert_eq!(git(&home, &clean, &["write-tree"]), guest_tree);

        rig.delete_all_and_check_clean(&[vm]);
    }

    #[test]
    fn vm_run_imports_the_workspace_runs_commands_and_bootstraps_detached() {
        let test = "vm_run_imports_the_workspace_runs_commands_and_bootstraps_detached";
        let _turn = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // mise cannot be downloaded here: a stand-in on the guest's PATH
        // (~/.local/bin, where the bootstrap looks first), delivered by
        // file_sync, records that `mise install` ran in the checkout.
        let sync = "[[file_sync]]\nhost = \"~/fake-mise\"\nguest = \"~/.local/bin/mise\"\nmode = \"0755\"\n";
        let Some((rig, _a)) = rig(test, "bookworm", sync) else {
            return;
        };
        let env = &rig.env;
        let home = env.root().join("home");
        std::fs::write(
            home.join("fake-mise"),
            "#!/bin/sh\n[ \"$1\" = install ] && pwd > /root/repo/.mise-ran && cat .tool-versions >> /root/repo/.mise-ran\n",
        )
        .unwrap();
        let repo = env.root().join("repo");
        init_repo(&home, &repo);
        std::fs::write(repo.join("a.txt"), "committed\n").unwrap();
        std::fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(repo.join(".tool-versions"), "nodejs 20.0.0\n").unwrap();
        git(&home, &repo, &["add", "-A"]);
        git(&home, &repo, &["commit", "-q", "-m", "base"]);
        std::fs::write(repo.join("a.txt"), "changed on the host\n").unwrap();
        std::fs::write(repo.join("untracked.txt"), "new\n").unwrap();
        std::fs::write(repo.join("noise.log"), "ignored\n").unwrap();
        let r = repo.to_str().unwrap();

        // A workspace that asks for tools, without --nat: refused before
        // any VM exists.
        let refused = env
            .banger(&["vm", "run", r, "--image", "bookworm"])
            .failed();
        assert!(
            refused.stderr.contains("--nat") && refused.stderr.contains("--no-bootstrap"),
            "{}",
            refused.stderr
        );
        assert!(env.list().is_empty());

        // Command mode with --rm: the host's uncommitted change is there,
        // untracked and ignored files are not, the exit code comes through,
        // and the VM is gone afterwards.
        let cmd = "git -C /root/repo status --porcelain; ls -a /root/repo; exit 7";
        let out = env.banger(&[
            "vm",
            "run",
            r,
            "--image",
            "bookworm",
            "--name",
            "r1",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "--rm",
            "--",
            "sh",
            "-c",
            cmd,
        ]);
        assert_eq!(out.code, 7, "{}\n{}", out.stdout, out.stderr);
        let spec = out
            .stderr
            .lines()
            .find(|l| l.starts_with("spec: "))
            .unwrap_or_default();
        assert!(
            spec.contains("1024 MiB") && spec.contains("256M disk"),
            "{}",
            out.stderr
        );
        let listed: Vec<&str> = out.stdout.lines().map(str::trim).collect();
        assert!(listed.contains(&"M a.txt"), "{}", out.stdout);
        assert!(
            listed.contains(&"a.txt") && listed.contains(&".tool-versions"),
            "{}",
            out.stdout
        );
        assert!(!listed.contains(&"untracked.txt"), "{}", out.stdout);
        assert!(!listed.contains(&"noise.log"), "{}", out.stdout);
        assert!(out.stderr.contains("--include-untracked"), "{}", out.stderr);
        assert!(env.list().is_empty(), "--rm deleted the VM");
        let vms_dir = env.state_dir().join("vms");
        let left: Vec<_> = std::fs::read_dir(&vms_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "VM dirs left: {left:?}");
        assert!(rig.resolve("r1").is_empty(), "no DNS record left");
        let rules = String::from_utf8_lossy(&run("nft", &["list", "ruleset"]).stdout).into_owned();
        // Per-VM rules are gone; the bridge's base chains (`banger:base:*`)
        // stay with the bridge.
        let vm_rules: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains("comment \"banger:") && !l.contains("comment \"banger:base:"))
            .collect();
        assert!(vm_rules.is_empty(), "{rules}");

        // With --include-untracked the untracked file comes too; ignored never.
        let out = env.banger(&[
            "vm",
            "run",
            r,
            "--image",
            "bookworm",
            "--name",
            "r2",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "--rm",
            "--include-untracked",
            "--",
            "ls",
            "-a",
            "/root/repo",
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        let listed: Vec<&str> = out.stdout.lines().map(str::trim).collect();
        assert!(listed.contains(&"untracked.txt"), "{}", out.stdout);
        assert!(!listed.contains(&"noise.log"), "{}", out.stdout);
        assert!(env.list().is_empty());

        // Detached with --nat: returns once the bootstrap has finished, the
        // VM keeps running, and vm ssh passes exit codes without prompts.
        let out = env.banger(&[
            "vm",
            "run",
            r,
            "--image",
            "bookworm",
            "--name",
            "d1",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "--nat",
            "-d",
        ]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains("banger vm ssh d1"), "{}", out.stdout);
        let d1 = env.show("d1");
        assert_eq!(d1.record.state, VmState::Running);
        let ran = env.banger(&["vm", "ssh", "d1", "--", "cat", "/root/repo/.mise-ran"]);
        assert_eq!(ran.code, 0, "{}", ran.stderr);
        assert_eq!(
            ran.stdout.lines().collect::<Vec<_>>(),
            ["/root/repo", "nodejs 20.0.0"],
            "{}",
            ran.stdout
        );
        let three = env.banger(&["vm", "ssh", "d1", "--", "exit", "3"]);
        assert_eq!(three.code, 3, "{}", three.stderr);
        assert!(!three.stderr.contains("yes/no"), "{}", three.stderr);

        rig.delete_all_and_check_clean(&[d1]);
    }
}
