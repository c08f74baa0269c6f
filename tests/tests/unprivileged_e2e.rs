//! End to end with an unprivileged daemon: `banger system install` (the only
//! step run as root) installs `banger-helper` under a scratch root and starts
//! it as the supervised process; then the real CLI and `bangerd` run as the
//! user `banger-e2e` (created here if missing) with their own HOME and XDG
//! directories, and boot the Debian image under QEMU (TCG) on a bridge the
//! helper made: ssh, `.vm` DNS from the guest (port 53 on the gateway,
//! bound by the helper and passed over its socket) and from the host,
//! `vm run` of a git workspace, stop, delete. Afterwards no tap, per-VM nft
//! rule or process is left, and nothing under the user's directories is
//! root's.
//!
//! Needs root (useradd, the install), and what `e2e.rs` needs: the kernel
//! and rootfs cached under `~/.cache/banger-ci`, the static agent
//! (`scripts/build-agent`), qemu-system-x86_64,
//! docker-registry, ssh, ip, nft, setpriv, git. Missing pieces skip loudly.

#[cfg(test)]
mod support;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use banger_api::model::VmState;
    use test_infra::as_user::{AsUser, USER, chmod};
    use test_infra::guest_artifacts::{GuestArtifacts, on_path};
    use test_infra::guest_rig::{own_processes, run};
    use test_infra::registry::Registry;
    use test_infra::{wait_until, workspace_bin};

    /// The group `system install` creates for the helper's socket.
    const GROUP: &str = "bgupe2e";
    /// Not the root e2e's bridge and subnet, nor the defaults.
    const BRIDGE: &str = "bgupe2e0";
    const SUBNET: &str = "10.214.0.0/24";

    fn skip(test: &str, why: &str) {
        eprintln!("SKIP {test}: {why}");
    }

    /// The user's installation: HOME and XDG dirs owned by the user, and a
    /// root-owned `bin/` with the binaries it runs (the build tree under
    /// /root is closed to other users).
    struct UserEnv {
        root: PathBuf,
        user: AsUser,
    }

    /// `banger ARGS` run as the user through setpriv (its groups included,
    /// as a login would give them).
    struct Out {
        code: i32,
        stdout: String,
        stderr: String,
    }

    impl UserEnv {
        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn command(&self, program: &Path) -> Command {
            let r = &self.root;
            let mut c = self.user.wrap(program);
            c.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", r.join("home"))
                .env("USER", USER)
                .env("XDG_CONFIG_HOME", r.join("config"))
                .env("XDG_STATE_HOME", r.join("state"))
                .env("XDG_CACHE_HOME", r.join("cache"))
                .env("XDG_RUNTIME_DIR", r.join("run"))
                .env("BANGER_DAEMON_BIN", r.join("bin/bangerd"))
                .env("BANGER_HELPER_SOCKET", self.user.helper_socket())
                .current_dir(r.join("home"))
                .stdin(Stdio::null());
            c
        }

        fn banger(&self, args: &[&str]) -> Out {
            let out = self
                .command(&self.path("bin/banger"))
                .args(args)
                .output()
                .unwrap();
            Out {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }

        fn ok(&self, args: &[&str]) -> String {
            let out = self.banger(args);
            assert_eq!(
                out.code,
                0,
                "banger {args:?} as {USER} failed\nstdout:\n{}\nstderr:\n{}\ndaemon log tail:\n{}",
                out.stdout,
                out.stderr,
                self.log_tail()
            );
            out.stdout
        }

        fn log_tail(&self) -> String {
            let log =
                std::fs::read_to_string(self.path("state/banger/bangerd.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().rev().take(30).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        }

        fn git(&self, repo: &Path, args: &[&str]) {
            let out = self
                .command(&on_path("git").unwrap())
                .arg("-C")
                .arg(repo)
                .args(args)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
        }
    }

    /// Whatever happens, the host is left as it was: the user's processes
    /// of this env killed, its taps and the test bridge deleted with their
    /// nft tables, and the helper uninstalled.
    struct Cleanup {
        env_root: PathBuf,
        tap_prefix: String,
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let root = self.env_root.to_string_lossy().into_owned();
            for pid in own_processes(&root) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let links =
                String::from_utf8_lossy(&run("ip", &["-o", "link", "show"]).stdout).into_owned();
            for l in links.lines() {
                if let Some(name) = l
                    .split(": ")
                    .nth(1)
                    .map(|n| n.split('@').next().unwrap_or(n))
                    && name.starts_with(&self.tap_prefix)
                {
                    let _ = run("ip", &["link", "del", name]);
                }
            }
            let _ = run("ip", &["link", "del", BRIDGE]);
            for family in ["bridge", "ip"] {
                let _ = run(
                    "nft",
                    &["delete", "table", family, &format!("banger_{BRIDGE}")],
                );
            }
        }
    }

    /// Every path under `dir` (itself included) whose owner is not `uid`.
    fn not_owned_by(dir: &Path, uid: u32) -> Vec<String> {
        let mut bad = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(p) = stack.pop() {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.uid() != uid {
                bad.push(format!("{} (uid {})", p.display(), m.uid()));
            }
            if m.is_dir()
                && let Ok(rd) = std::fs::read_dir(&p)
            {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
        bad
    }

    /// `/proc/PID/status`'s real uid.
    fn uid_of(pid: i32) -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("Uid:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    #[test]
    fn an_unprivileged_daemon_boots_reaches_resolves_runs_and_cleans_up_a_real_guest() {
        let test = "an_unprivileged_daemon_boots_reaches_resolves_runs_and_cleans_up_a_real_guest";
        if !nix::unistd::geteuid().is_root() {
            return skip(test, "needs root (useradd, banger system install)");
        }
        let a = match GuestArtifacts::find_flavour("systemd") {
            Ok(a) => a,
            Err(why) => return skip(test, &why),
        };
        for tool in ["ssh", "ip", "nft", "setpriv", "useradd", "git"] {
            if on_path(tool).is_none() {
                return skip(
                    test,
                    &format!(
                        "{tool} missing (apt-get install openssh-client iproute2 nftables util-linux passwd git)"
                    ),
                );
            }
        }
        let Some(registry) = Registry::start(test) else {
            return;
        };
        let reference = registry.push_rootfs_tar("banger/debian:unpriv", &a.rootfs_tar);

        // The user's directories, and root's bin/ beside them.
        let dir = tempfile::Builder::new()
            .prefix("bgup")
            .tempdir_in("/tmp")
            .unwrap();
        let r = dir.path().to_path_buf();
        for d in ["home", "config/banger", "state", "cache", "run", "repo"] {
            std::fs::create_dir_all(r.join(d)).unwrap();
        }
        let state_dir = r.join("state/banger");
        let tap_prefix =
            banger_api::net::identity::NetIdentity::for_state_dir(&state_dir).tap_prefix;
        let _cleanup = Cleanup {
            env_root: r.clone(),
            tap_prefix: tap_prefix.clone(),
        };
        // The one root step: install the helper for the user, under a
        // scratch root the user can traverse to reach the socket.
        let user = AsUser::install(&r, &state_dir, BRIDGE, SUBNET, GROUP);
        let (uid, gid) = (user.uid, user.gid);
        let agent = user.copy_exe(&a.agent);
        let kernel = user.copy_dir(&a.kernel_dir, "kernel");
        let dns_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            r.join("config/banger/config.toml"),
            format!(
                "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {agent:?}\nagent_timeout_secs = 240\n\
                 stop_timeout_secs = 30\ninsecure_registries = [{:?}]\n\
                 default_caps = [\"work-disk\", \"network\", \"dns\", \"file-sync\", \"vsock-agent\"]\n\
                 [network]\nbridge = {BRIDGE:?}\nsubnet = {SUBNET:?}\ndns_port = {dns_port}\n",
                registry.host(),
            ),
        )
        .unwrap();
        std::fs::write(
            r.join("home/.gitconfig"),
            "[user]\n\tname = Unpriv Tester\n\temail = unpriv@banger.test\n",
        )
        .unwrap();
        let env = UserEnv {
            root: r.clone(),
            user,
        };

        // Everything from here runs as the user.
        env.ok(&["kernel", "import", "fc", "--from", kernel.to_str().unwrap()]);
        env.ok(&[
            "image",
            "pull",
            &reference,
            "--name",
            "bookworm",
            "--kernel-ref",
            "fc",
            "--size",
            "2G",
        ]);
        let doctor = env.banger(&["doctor", "--json"]).stdout;
        assert!(doctor.contains("banger-helper"), "doctor: {doctor}");
        let daemon_pid: i32 = std::fs::read_to_string(env.path("run/banger/bangerd.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(uid_of(daemon_pid), Some(uid), "bangerd runs as {USER}");

        let created = env.banger(&[
            "vm",
            "create",
            "--name",
            "u1",
            "--image",
            "bookworm",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
        ]);
        assert_eq!(
            created.code,
            0,
            "create failed:\n{}\nconsole:\n{}\ndaemon log:\n{}",
            created.stderr,
            env.banger(&["vm", "logs", "u1"]).stdout,
            env.log_tail()
        );
        let vm: banger_api::api::VmView =
            serde_json::from_str(&env.ok(&["vm", "show", "u1", "--json"])).unwrap();
        assert_eq!(vm.record.state, VmState::Running);
        let ip = vm.address.expect("a networked VM has an address");
        assert!(ip.to_string().starts_with("10.214.0."), "{ip}");
        let qemu_pid = vm.record.vmm.as_ref().unwrap().pid as i32;
        assert_eq!(uid_of(qemu_pid), Some(uid), "QEMU runs as {USER}");
        // The agent's bridge (the default serial transport) beside it.
        let bridge: Vec<i32> = own_processes(&r.to_string_lossy())
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"bridge"))
            })
            .collect();
        assert_eq!(bridge.len(), 1, "one agent bridge for u1: {bridge:?}");
        assert_eq!(uid_of(bridge[0]), Some(uid), "the bridge runs as {USER}");

        // Reachable: vm ssh (sshd when it listens, else the agent), and the
        // guest resolves its own .vm name through the gateway's port 53,
        // which only the helper could bind for this user.
        let facts = wait_for_ssh(&env, "u1");
        let lines: Vec<&str> = facts.lines().map(str::trim).collect();
        assert_eq!(lines.first().copied(), Some("u1"), "{facts}");
        assert!(
            lines.get(1).is_some_and(|l| l.starts_with(&ip.to_string())),
            "the guest resolves u1.vm through {}:53: {facts}",
            "the gateway"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_, answers) = rt.block_on(test_infra::dns::query(
            std::net::SocketAddr::from(([127, 0, 0, 1], dns_port)),
            "u1.vm.",
            "A",
        ));
        assert_eq!(answers, vec![ip], "u1.vm from the host");
        let gateway: std::net::Ipv4Addr = "10.214.0.1".parse().unwrap();
        let (_, answers) = rt.block_on(test_infra::dns::query(
            std::net::SocketAddr::from((gateway, 53)),
            "u1.vm.",
            "A",
        ));
        assert_eq!(answers, vec![ip], "u1.vm on the gateway's port 53");

        // vm run of a git workspace: the host's uncommitted change arrives.
        let repo = env.path("repo");
        env.git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("a.txt"), "committed\n").unwrap();
        std::os::unix::fs::chown(repo.join("a.txt"), Some(uid), Some(gid)).unwrap();
        env.git(&repo, &["add", "-A"]);
        env.git(&repo, &["commit", "-q", "-m", "base"]);
        std::fs::write(repo.join("a.txt"), "changed on the host\n").unwrap();
        let out = env.banger(&[
            "vm",
            "run",
            repo.to_str().unwrap(),
            "--image",
            "bookworm",
            "--name",
            "r1",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "--no-bootstrap",
            "--rm",
            "--",
            "cat",
            "/root/repo/a.txt",
        ]);
        assert_eq!(
            out.code,
            0,
            "vm run failed\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
            out.stdout,
            out.stderr,
            env.log_tail()
        );
        assert_eq!(out.stdout.trim(), "changed on the host", "{}", out.stderr);

        // Stop, delete, daemon stop: nothing left.
        env.ok(&["vm", "stop", "u1"]);
        env.ok(&["vm", "delete", "u1"]);
        env.ok(&["daemon", "stop"]);
        let root = r.to_string_lossy().into_owned();
        wait_until(
            Duration::from_secs(30),
            "no process of the user's env is left",
            || own_processes(&root).is_empty(),
        );
        let links =
            String::from_utf8_lossy(&run("ip", &["-o", "link", "show"]).stdout).into_owned();
        assert!(
            !links.lines().any(|l| l.contains(&tap_prefix)),
            "taps {tap_prefix}* left:\n{links}"
        );
        let rules = String::from_utf8_lossy(&run("nft", &["list", "ruleset"]).stdout).into_owned();
        assert!(
            !rules.contains(&format!("banger:{}", vm.record.id)),
            "per-VM rules left:\n{rules}"
        );
        let vm_rules: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains("comment \"banger:") && !l.contains("comment \"banger:base:"))
            .collect();
        let ours = format!("banger_{BRIDGE}");
        assert!(
            !rules.contains(&ours) || vm_rules.is_empty(),
            "per-VM rules left:\n{rules}"
        );
        let log = std::fs::read_to_string(env.path("state/banger/bangerd.log")).unwrap();
        for warning in ["cannot sweep", "no .vm DNS on"] {
            assert!(!log.contains(warning), "daemon warned {warning:?}:\n{log}");
        }
        let mut root_owned = Vec::new();
        for d in ["home", "config", "state", "cache", "run", "repo"] {
            root_owned.extend(not_owned_by(&env.path(d), uid));
        }
        assert!(root_owned.is_empty(), "not the user's: {root_owned:#?}");
    }

    /// The real `banger-helper serve` in a private network namespace binds
    /// DNS sockets on exactly the caller's gateway and hands them over its
    /// socket; the read-only listings stay inside the caller's names.
    #[test]
    fn the_helper_binds_dns_sockets_only_on_the_callers_gateway_and_lists_only_its_names() {
        let test = "the_helper_binds_dns_sockets_only_on_the_callers_gateway";
        if !nix::unistd::geteuid().is_root() {
            return skip(test, "needs root (a network namespace, the helper)");
        }
        let handle = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces; the
            // thread is ours and ends with the test body.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            let dir = tempfile::tempdir().unwrap();
            chmod(dir.path(), 0o755);
            let cfg = dir.path().join("helper.toml");
            std::fs::write(
                &cfg,
                "[[users]]\nname = \"root\"\nbridge = \"bgdns0\"\nsubnet = \"10.252.0.0/24\"\ntap_prefix = \"bgdnst\"\n",
            )
            .unwrap();
            let socket = dir.path().join("helper.sock");
            let mut child = Command::new(workspace_bin("banger-helper"))
                .args(["serve", "--config"])
                .arg(&cfg)
                .arg("--socket")
                .arg(&socket)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().unwrap()),
                &mut line,
            )
            .unwrap();
            assert!(line.contains("listening on"), "helper said {line:?}");
            use banger_host::hostops::HostOps;
            let ops = banger_host::helper::HelperHostOps::new(socket);
            let gateway: std::net::Ipv4Addr = "10.252.0.1".parse().unwrap();
            let dns = ops.bind_dns(gateway);
            let refused_vm = ops.bind_dns("10.252.0.2".parse().unwrap());
            let refused_lo = ops.bind_dns(std::net::Ipv4Addr::LOCALHOST);
            let rules = ops.list_guest_rules("bgdns0");
            let foreign_rules = ops.list_guest_rules("docker0");
            let links = ops.list_links("bgdnst");
            let plugin_links = ops.list_links("bgp");
            let _ = child.kill();
            let _ = child.wait();

            let dns = dns.unwrap();
            let at = std::net::SocketAddr::from((gateway, 53));
            assert_eq!(dns.udp.local_addr().unwrap(), at);
            assert_eq!(dns.tcp.local_addr().unwrap(), at);
            for (what, r) in [("a VM address", refused_vm), ("loopback", refused_lo)] {
                let err = banger_api::error::render_chain(&r.unwrap_err());
                assert!(err.contains("bind_dns refused"), "{what}: {err}");
                assert!(err.contains("10.252.0.1"), "{what}: {err}");
            }
            assert_eq!(rules.unwrap(), Vec::<String>::new());
            let err = banger_api::error::render_chain(&foreign_rules.unwrap_err());
            assert!(err.contains("not banger's bridge"), "{err}");
            assert_eq!(links.unwrap(), Vec::<String>::new());
            let err = banger_api::error::render_chain(&plugin_links.unwrap_err());
            assert!(err.contains("tap prefix \"bgdnst\""), "{err}");
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// A plugin's `add_nat` is checked against, and names, the network the
    /// daemon derives from its state dir (what banger-helper allows that
    /// user), not the raw config's `banger0` and default subnet.
    #[test]
    fn plugin_host_requests_use_the_network_the_daemon_derives() {
        use banger_core::capability::HookCtx;
        let dir = tempfile::tempdir().unwrap();
        let so = test_infra::workspace_cdylib("banger-plugin-faulty");
        std::fs::copy(&so, dir.path().join(so.file_name().unwrap())).unwrap();
        let config = banger_api::config::Config::defaults(Path::new("/nonexistent/config.toml"));
        let state = Path::new("/home/someone/.local/state/banger");
        let network =
            banger_api::net::identity::NetIdentity::for_state_dir(state).resolve(&config.network);
        assert_ne!(network.bridge, config.network.bridge);
        assert_ne!(
            network.subnet, config.network.subnet,
            "pick another state dir"
        );
        let o = network.subnet.gateway().octets();
        let ip = std::net::Ipv4Addr::new(o[0], o[1], o[2], 9);
        let options: banger_api::model::CapOptions = [
            ("host_op".to_string(), "add_nat".to_string()),
            ("arg.ip".to_string(), ip.to_string()),
        ]
        .into_iter()
        .collect();
        let vm = crate::support::vm("p1");
        let run = |report: banger_core::plugin_host::LoadReport| {
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let cap = report.loaded.into_iter().next().expect("faulty loaded");
            let host = banger_host::hostops::RecordingHostOps::default();
            let ctx = HookCtx {
                vm: &vm,
                vm_dir: dir.path(),
                options: &options,
                host: &host,
                config: &config,
                log: &crate::support::Quiet,
            };
            let result = cap.prepare_host(&ctx).map_err(|e| e.to_string());
            (result, host.calls())
        };
        let (result, calls) = run(banger_core::plugin_host::load_plugins_for(
            dir.path(),
            &network,
        ));
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(
            calls,
            [format!("add_nat {} {} {ip}", vm.id, network.bridge)]
        );
        // Against the raw config the same address is outside its subnet.
        let (result, calls) = run(banger_core::plugin_host::load_plugins(dir.path()));
        assert!(result.is_err(), "{calls:?}");
        assert!(calls.is_empty(), "{calls:?}");
    }

    /// `vm ssh NAME -- hostname; getent hosts NAME.vm`, retried until the
    /// guest answers (sshd or the agent come up after create returns).
    fn wait_for_ssh(env: &UserEnv, name: &str) -> String {
        let cmd = format!("hostname; getent hosts {name}.vm");
        let mut last = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        while std::time::Instant::now() < deadline {
            let out = env.banger(&["vm", "ssh", name, "--", &cmd]);
            if out.code == 0 && out.stdout.lines().count() >= 2 {
                return out.stdout;
            }
            last = Some((out.code, out.stdout, out.stderr));
            std::thread::sleep(Duration::from_secs(3));
        }
        panic!("vm ssh {name} never answered: {last:?}");
    }
}
