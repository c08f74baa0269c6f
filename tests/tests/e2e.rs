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
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use banger_core::model::VmState;
    use banger_core::vsock::AgentClient;
    use banger_guest_protocol::api::Proto;
    use test_infra::guest_artifacts::{GuestArtifacts, on_path};
    use test_infra::registry::Registry;
    use test_infra::{BangerEnv, pid_alive, wait_until};

    fn artifacts(test: &str) -> Option<GuestArtifacts> {
        let skip = |why: &str| {
            eprintln!("SKIPPED {test}: {why}");
            None
        };
        let flavour = if test.contains("no_init") {
            "noinit"
        } else {
            "systemd"
        };
        let a = match GuestArtifacts::find_flavour(flavour) {
            Ok(a) => a,
            Err(why) => return skip(&why),
        };
        if on_path("ssh").is_none() || on_path("ip").is_none() || on_path("nft").is_none() {
            return skip(
                "ssh, ip or nft missing (apt-get install openssh-client iproute2 nftables)",
            );
        }
        if !nix::unistd::Uid::effective().is_root() {
            return skip("needs root for the bridge, taps and NAT");
        }
        Some(a)
    }

    fn agent_ports(uds: &Path) -> Vec<(Proto, u16, Option<String>)> {
        AgentClient::new(uds, Duration::from_secs(10))
            .ports()
            .map(|ls| {
                ls.into_iter()
                    .map(|l| (l.proto, l.port, l.process))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Real guests under TCG need both cores: one at a time.
    static ONE_GUEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The guests' bridge and subnet: not the defaults, so a real banger on
    /// the same host is never disturbed.
    const BRIDGE: &str = "bge2e0";
    const SUBNET: &str = "10.213.0.0/24";

    fn run(cmd: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new(cmd).args(args).output().unwrap()
    }

    fn free_udp_port() -> u16 {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A stand-in for the internet: a network namespace behind a veth pair,
    /// with an HTTP server on `SERVER:8080`. It has no route back to the
    /// guests' subnet, like the real internet has none to private addresses:
    /// only NAT'ed traffic gets an answer.
    struct Internet {
        ns: String,
        host_if: String,
        server: String,
    }

    const GREETING: &str = "hello-from-the-internet";

    impl Internet {
        fn start(tag: &str, net: u8) -> Internet {
            let pid = std::process::id() % 100_000;
            let ns = format!("bge2e-{pid}-{tag}");
            let host_if = format!("bgi{pid}{tag}");
            let peer = format!("bgo{pid}{tag}");
            let host_ip = format!("198.51.{net}.1/24");
            let server = format!("198.51.{net}.2");
            let ok = |args: &[&str]| {
                let out = run("ip", args);
                assert!(out.status.success(), "ip {args:?}: {out:?}");
            };
            ok(&["netns", "add", &ns]);
            let internet = Internet {
                ns: ns.clone(),
                host_if: host_if.clone(),
                server: server.clone(),
            };
            ok(&[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
            ]);
            ok(&["link", "set", &peer, "netns", &ns]);
            ok(&["addr", "add", &host_ip, "dev", &host_if]);
            ok(&["link", "set", &host_if, "up"]);
            ok(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{server}/24"),
                "dev",
                &peer,
            ]);
            ok(&["-n", &ns, "link", "set", &peer, "up"]);
            ok(&["-n", &ns, "link", "set", "lo", "up"]);

            let (tx, rx) = std::sync::mpsc::channel();
            let ns_path = format!("/run/netns/{ns}");
            let addr = format!("{server}:8080");
            std::thread::spawn(move || {
                let f = std::fs::File::open(&ns_path).unwrap();
                // SAFETY: setns only moves this thread, which we own and which
                // only serves the test's HTTP answers, into the namespace.
                let rc =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let listener = std::net::TcpListener::bind(&addr).unwrap();
                tx.send(()).unwrap();
                for conn in listener.incoming() {
                    let Ok(mut c) = conn else { continue };
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 2048];
                    let _ = c.read(&mut buf);
                    let _ = write!(
                        c,
                        "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{GREETING}",
                        GREETING.len()
                    );
                }
            });
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
            internet
        }

        /// A guest shell command fetching the server's page with bash
        /// alone, giving up after `secs`.
        fn fetch_cmd(&self, secs: u32) -> String {
            format!(
                "timeout {secs} bash -c 'exec 3<>/dev/tcp/{}/8080; \
                 printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'",
                self.server
            )
        }
    }

    impl Drop for Internet {
        fn drop(&mut self) {
            let _ = run("ip", &["link", "del", &self.host_if]);
            let _ = run("ip", &["netns", "del", &self.ns]);
        }
    }

    /// A banger env set up for real guests on the e2e bridge, with the
    /// image pushed to a loopback registry and pulled as `image`.
    struct Rig {
        env: BangerEnv,
        dns: std::net::SocketAddr,
        _registry: Registry,
    }

    fn rig(test: &str, image: &str, extra_config: &str) -> Option<(Rig, GuestArtifacts)> {
        let a = artifacts(test)?;
        let registry = Registry::start(test)?;
        let reference = registry.push_rootfs_tar(&format!("banger/debian:{image}"), &a.rootfs_tar);

        let env = BangerEnv::new();
        let dns_port = free_udp_port();
        std::fs::copy(
            test_infra::workspace_cdylib("banger-plugin-shared-mount"),
            env.plugins_dir().join("libbanger_plugin_shared_mount.so"),
        )
        .unwrap();
        env.write_config(&format!(
            "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {:?}\nagent_timeout_secs = 240\n\
             insecure_registries = [{:?}]\nvhost_device_vsock_bin = {:?}\n\
             default_caps = [\"work-disk\", \"network\", \"dns\", \"file-sync\", \"vsock-agent\"]\n\
             {extra_config}\n\
             [network]\nbridge = {BRIDGE:?}\nsubnet = {SUBNET:?}\ndns_port = {dns_port}\n",
            a.agent,
            registry.host(),
            a.vhost
        ));
        env.banger(&[
            "kernel",
            "import",
            "fc",
            "--from",
            a.kernel_dir.to_str().unwrap(),
        ])
        .ok();
        env.banger(&[
            "image",
            "pull",
            &reference,
            "--name",
            image,
            "--kernel-ref",
            "fc",
            "--size",
            "2G",
        ])
        .ok();
        let rig = Rig {
            env,
            dns: std::net::SocketAddr::from(([127, 0, 0, 1], dns_port)),
            _registry: registry,
        };
        Some((rig, a))
    }

    impl Rig {
        /// `vm create` that must succeed, with the console in the failure.
        fn create(&self, name: &str, args: &[&str]) -> banger_core::api::VmView {
            let mut all = vec![
                "vm",
                "create",
                "--name",
                name,
                "--memory",
                "1024",
                "--disk-size",
                "256M",
            ];
            all.extend_from_slice(args);
            let out = self.env.banger(&all);
            let logs = self.env.banger(&["vm", "logs", name]).stdout;
            assert_eq!(
                out.code, 0,
                "create failed:\n{}\nconsole:\n{logs}",
                out.stderr
            );
            self.env.show(name)
        }

        fn resolve(&self, name: &str) -> Vec<std::net::Ipv4Addr> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(test_infra::dns::query(
                self.dns,
                &format!("{name}.vm."),
                "A",
            ))
            .1
        }

        /// Waits until sshd listens in the guest and its host keys exist;
        /// returns a known_hosts file pinning them for `NAME.vm`.
        fn pin_host_keys(&self, vm: &banger_core::api::VmView) -> PathBuf {
            let uds = vm.dir.join("vsock.sock");
            wait_until(
                Duration::from_secs(180),
                "sshd listens on 22 in the guest",
                || {
                    agent_ports(&uds).iter().any(|(p, port, proc_)| {
                        *p == Proto::Tcp && *port == 22 && proc_.as_deref() == Some("sshd")
                    })
                },
            );
            let keys = AgentClient::new(&uds, Duration::from_secs(10))
                .ssh_host_keys()
                .unwrap();
            assert!(!keys.is_empty(), "the agent reports host keys");
            let name = vm.record.name.as_str();
            let lines: String = keys
                .iter()
                .map(|k| {
                    let mut f = k.public_key.split_whitespace();
                    format!("{name}.vm {} {}\n", f.next().unwrap(), f.next().unwrap())
                })
                .collect();
            let path = self.env.root().join(format!("known_hosts-{name}"));
            std::fs::write(&path, lines).unwrap();
            path
        }

        /// `ssh` with banger's key to `root@ip`, checking the host key
        /// against `known_hosts` only (no trust on first use).
        fn ssh(
            &self,
            name: &str,
            ip: std::net::Ipv4Addr,
            known_hosts: &Path,
            cmd: &str,
        ) -> std::process::Output {
            let key = self.env.state_dir().join("ssh/id_ed25519");
            run(
                "ssh",
                &[
                    "-i",
                    key.to_str().unwrap(),
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-o",
                    &format!("UserKnownHostsFile={}", known_hosts.display()),
                    "-o",
                    &format!("HostKeyAlias={name}.vm"),
                    "-o",
                    "ConnectTimeout=20",
                    "-o",
                    "LogLevel=ERROR",
                    &format!("root@{ip}"),
                    cmd,
                ],
            )
        }

        fn ssh_ok(
            &self,
            name: &str,
            ip: std::net::Ipv4Addr,
            known_hosts: &Path,
            cmd: &str,
        ) -> String {
            let out = self.ssh(name, ip, known_hosts, cmd);
            if !out.status.success() {
                let logs = self.env.banger(&["vm", "logs", name]).stdout;
                let tail: Vec<&str> = logs.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "ssh {cmd:?}: {}\nstdout: {}\nstderr: {}\nconsole tail:\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    tail.join("\n")
                );
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// Deletes every VM, stops the daemon, and checks that nothing of
        /// them is left on the host: taps, nft rules, DNS records, VM dirs,
        /// processes.
        fn delete_all_and_check_clean(&self, vms: &[banger_core::api::VmView]) {
            for vm in vms {
                self.env
                    .banger(&["vm", "delete", vm.record.name.as_str()])
                    .ok();
            }
            self.env.banger(&["daemon", "stop"]).ok();
            let root = self.env.root().to_string_lossy().into_owned();
            wait_until(
                Duration::from_secs(30),
                "no process of this env is left",
                || own_processes(&root).is_empty(),
            );
            let links =
                String::from_utf8_lossy(&run("ip", &["-o", "link", "show"]).stdout).into_owned();
            assert!(
                !links.lines().any(|l| l.contains("bgtap")),
                "taps left:\n{links}"
            );
            let rules = String::from_utf8_lossy(&run("nft", &["-a", "list", "ruleset"]).stdout)
                .into_owned();
            for vm in vms {
                assert!(!vm.dir.exists(), "{} left", vm.dir.display());
                let tag = format!("banger:{}", vm.record.id);
                assert!(!rules.contains(&tag), "nft rules of {tag} left:\n{rules}");
            }
            let records = std::fs::read_to_string(self.env.state_dir().join("dns/records.json"))
                .unwrap_or_default();
            for vm in vms {
                assert!(
                    !records.contains(&format!("\"{}\"", vm.record.name)),
                    "DNS record left: {records}"
                );
            }
        }
    }

    impl Drop for Rig {
        /// A failed test still leaves the host clean: its VMs deleted (taps,
        /// rules, records), stray processes killed, and the test's bridge
        /// (which outlives daemons by design) removed.
        fn drop(&mut self) {
            if std::thread::panicking() {
                // Nothing here may panic again (that would abort the run).
                let listed = self.env.banger(&["vm", "list", "--json"]).stdout;
                let vms: Vec<banger_core::api::VmView> =
                    serde_json::from_str(&listed).unwrap_or_default();
                for vm in vms {
                    let _ = self
                        .env
                        .banger(&["vm", "delete", "--force", vm.record.name.as_str()]);
                }
                let _ = self.env.banger(&["daemon", "stop"]);
                let root = self.env.root().to_string_lossy().into_owned();
                for pid in own_processes(&root) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = run("ip", &["link", "del", BRIDGE]);
        }
    }

    /// Pids whose command line mentions `root` (this env's paths).
    fn own_processes(root: &str) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(root))
                    .unwrap_or(false)
            })
            .collect()
    }

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
