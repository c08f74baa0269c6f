//! The privilege split against real processes: `banger-helper` serving a
//! real socket (peer credentials checked by the kernel's SO_PEERCRED,
//! clients spawned as other uids), its refusals changing nothing inside a
//! network namespace, the daemon's runtime-directory and pid-file checks,
//! StrictModes, and `banger system install | status | uninstall` under a
//! scratch root with its systemd units checked by `systemd-analyze verify`.
//! Needs root; `ip` (iproute2) for the namespace tests.

#[cfg(test)]
mod support;

// Inside a cfg(test) module so the test-only lint allowances cover helpers.
#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};

    use banger_host::helper::{HelperHostOps, derived_network};
    use banger_host::hostops::HostOps;
    use test_infra::workspace_bin;

    /// uid/gid of `nobody`, outside every helper config here.
    const NOBODY: u32 = 65534;
    /// uid of `daemon` (Debian's uid 1): an allowed non-root peer.
    const DAEMON_UID: u32 = 1;

    fn root_or_skip(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            true
        } else {
            eprintln!("SKIP {test}: needs root");
            false
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A running `banger-helper serve`, killed on drop.
    struct Helper {
        child: Child,
        socket: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Drop for Helper {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The config every helper here gets: root and `daemon` each with a
    /// network of their own.
    const CONFIG: &str = r#"
vfio_devices = ["0000:01:00.0"]

[[users]]
name = "root"
bridge = "bgtestbr"
subnet = "10.250.0.0/24"
tap_prefix = "bgtestt"

[[users]]
name = "1"
bridge = "bgdmnbr"
subnet = "10.251.0.0/24"
tap_prefix = "bgdmnt"
"#;

    /// Starts `banger-helper serve` (in the calling thread's network
    /// namespace) and waits for its "listening" line.
    fn start_helper(config: &str) -> Helper {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let cfg = dir.path().join("helper.toml");
        std::fs::write(&cfg, config).unwrap();
        let socket = dir.path().join("run/helper.sock");
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
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening on"), "helper said {line:?}");
        Helper {
            child,
            socket,
            _dir: dir,
        }
    }

    /// `banger-helper probe` as `uid`/`gid`: (success, stdout + stderr).
    /// Runs a copy next to the socket: the build tree under /root is not
    /// reachable for other users.
    fn probe_as(socket: &Path, uid: u32, gid: u32) -> (bool, String) {
        let bin = socket.parent().unwrap().join("banger-helper-probe");
        if !bin.exists() {
            std::fs::copy(workspace_bin("banger-helper"), &bin).unwrap();
            chmod(&bin, 0o755);
        }
        let out = Command::new(&bin)
            .arg("probe")
            .arg("--socket")
            .arg(socket)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    #[test]
    fn the_helper_refuses_a_peer_outside_its_users_and_group_by_peer_credentials() {
        if !root_or_skip("the_helper_refuses_a_peer_outside_its_users_and_group") {
            return;
        }
        let helper = start_helper(CONFIG);
        // Its own mode is 0600 without a group: open it up so only
        // SO_PEERCRED stands between nobody and the helper.
        let mode = std::fs::metadata(&helper.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "no group configured: owner only");
        chmod(helper.socket.parent().unwrap(), 0o755);
        chmod(&helper.socket, 0o666);

        let (ok, text) = probe_as(&helper.socket, NOBODY, NOBODY);
        assert!(!ok, "nobody was served: {text}");
        assert!(text.contains("uid 65534"), "{text}");
        assert!(text.contains("may not use banger-helper"), "{text}");
        assert!(text.contains("sudo banger system install"), "{text}");

        let (ok, text) = probe_as(&helper.socket, DAEMON_UID, DAEMON_UID);
        assert!(ok, "an allowed user was refused: {text}");
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    }

    #[test]
    fn the_helper_binds_its_socket_0660_to_the_allowed_group() {
        if !root_or_skip("the_helper_binds_its_socket_0660_to_the_allowed_group") {
            return;
        }
        use std::os::unix::fs::MetadataExt;
        let gid = nix::unistd::Group::from_name("nogroup")
            .unwrap()
            .map(|g| g.gid.as_raw());
        let Some(gid) = gid else {
            eprintln!("SKIP the_helper_binds_its_socket_0660: no group nogroup");
            return;
        };
        let helper = start_helper(&format!("group = \"nogroup\"\n{CONFIG}"));
        let m = std::fs::metadata(&helper.socket).unwrap();
        assert_eq!(m.mode() & 0o777, 0o660);
        assert_eq!((m.uid(), m.gid()), (0, gid));
        // A member of the group (by primary gid) is let in.
        chmod(helper.socket.parent().unwrap(), 0o755);
        let (ok, text) = probe_as(&helper.socket, NOBODY, gid);
        assert!(ok, "a group member was refused: {text}");
    }

    /// The links in this namespace.
    fn links() -> Vec<String> {
        let out = Command::new("ip")
            .args(["-j", "link", "show"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    fn addresses(name: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-j", "-4", "addr", "show", "dev", name])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    #[test]
    fn requests_outside_the_callers_network_are_refused_and_change_nothing() {
        test_infra::in_netns(
            "requests_outside_the_callers_network_are_refused",
            &[],
            || {
                let helper = start_helper(CONFIG);
                let client = HelperHostOps::new(helper.socket.clone());
                let before = links();
                let gw = "10.250.0.1".parse().unwrap();
                let vm: std::net::Ipv4Addr = "10.250.0.7".parse().unwrap();
                let refusals: Vec<(&str, Result<(), _>)> = vec![
                    ("foreign tap name", client.create_tap("eth9", 0)),
                    ("another user's tap prefix", client.create_tap("bgdmnt0", 0)),
                    (
                        "tap owned by someone else",
                        client.create_tap("bgtestt0", 1000),
                    ),
                    ("foreign bridge", client.ensure_bridge("docker0", gw, 24)),
                    (
                        "another user's bridge",
                        client.ensure_bridge("bgdmnbr", "10.251.0.1".parse().unwrap(), 24),
                    ),
                    (
                        "our bridge, foreign address",
                        client.ensure_bridge("bgtestbr", "192.168.7.1".parse().unwrap(), 24),
                    ),
                    ("delete a foreign link", client.delete_link("lo")),
                    (
                        "NAT outside the subnet",
                        client.add_nat("ab12", "bgtestbr", "192.168.7.9".parse().unwrap()),
                    ),
                    (
                        "NAT on a foreign bridge",
                        client.add_nat("ab12", "eth0", vm),
                    ),
                    (
                        "PCI device not allowlisted",
                        client.bind_vfio(&"0000:02:00.0".parse().unwrap()).map(drop),
                    ),
                ];
                for (what, result) in refusals {
                    let err = result.expect_err(what).to_string();
                    assert!(err.contains("refused"), "{what}: {err}");
                }
                assert_eq!(links(), before, "a refused request changed links");

                // The allowed path works for real in this namespace.
                client.ensure_bridge("bgtestbr", gw, 24).unwrap();
                client.create_tap("bgtestt0", 0).unwrap();
                client.attach_to_bridge("bgtestt0", "bgtestbr").unwrap();
                client.set_link_up("bgtestt0").unwrap();
                assert!(links().contains(&"bgtestbr".to_string()));
                assert!(links().contains(&"bgtestt0".to_string()));
                assert_eq!(addresses("bgtestbr"), ["10.250.0.1/24"]);
                // delete_tap looks in /sys/class/net, which shows the host's
                // namespace here: delete the tap as a link.
                client.delete_link("bgtestt0").unwrap();
                client.delete_link("bgtestbr").unwrap();
                assert_eq!(links(), before);
            },
        );
    }

    #[test]
    fn network_and_nat_capabilities_wire_a_vm_through_the_helper() {
        test_infra::in_netns(
            "network_and_nat_capabilities_wire_a_vm_through_the_helper",
            &[],
            || {
                use std::sync::Arc;

                use banger_api::config::NetworkConfig;
                use banger_capabilities::nat::Nat;
                use banger_capabilities::network::{HostNetwork, Network};
                use banger_core::capability::{Capability, HookCtx, TeardownReason};
                use banger_core::store::Store;

                if Command::new("nft").arg("--version").output().is_err() {
                    eprintln!(
                        "SKIP network_and_nat_capabilities_wire_a_vm_through_the_helper: nft missing (apt-get install nftables)"
                    );
                    return;
                }
                let dir = tempfile::tempdir().unwrap();
                // The helper knows this daemon by the names its state dir derives.
                let prefix = derived_network(dir.path()).tap_prefixes[0].clone();
                let helper = start_helper(&format!(
                    "[[users]]\nname = \"root\"\nbridge = \"bghelp0\"\nsubnet = \"10.78.0.0/24\"\ntap_prefix = \"{prefix}\"\n"
                ));
                let host = HelperHostOps::new(helper.socket.clone());
                let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
                let config = NetworkConfig {
                    bridge: "bghelp0".into(),
                    subnet: "10.78.0.0/24".parse().unwrap(),
                    dns_port: 0,
                    dns_upstream: None,
                };
                let net = Arc::new(HostNetwork::new(config, store, dir.path(), 0));
                assert_eq!(net.taps().prefix(), prefix);
                let (network, nat) = (Network::with(net.clone()), Nat::with(net.clone()));
                let v = crate::support::vm("web");
                let vm_dir = dir.path().join("vm");
                std::fs::create_dir_all(&vm_dir).unwrap();
                let options = banger_api::model::CapOptions::new();
                let config =
                    banger_api::config::Config::defaults(Path::new("/nonexistent/config.toml"));
                let ctx = HookCtx {
                    vm: &v,
                    vm_dir: &vm_dir,
                    options: &options,
                    host: &host,
                    config: &config,
                    log: &crate::support::Quiet,
                };
                network.prepare_host(&ctx).unwrap();
                nat.prepare_host(&ctx).unwrap();
                // The guard rules, installed beside the hooks after it.
                network.settle(&v.id).unwrap();
                assert_eq!(addresses("bghelp0"), ["10.78.0.1/24"]);
                let tap = format!("{prefix}0");
                assert!(links().contains(&tap), "{:?}", links());
                let ruleset = Command::new("nft")
                    .args(["list", "ruleset"])
                    .output()
                    .unwrap();
                let ruleset = String::from_utf8_lossy(&ruleset.stdout);
                assert!(
                    ruleset.contains(&format!("banger:{}:guard", v.id)),
                    "{ruleset}"
                );
                assert!(
                    ruleset.contains(&format!("banger:{}:nat", v.id)),
                    "{ruleset}"
                );

                nat.teardown(&ctx, TeardownReason::Delete).unwrap();
                network.teardown(&ctx, TeardownReason::Delete).unwrap();
                let ruleset = Command::new("nft")
                    .args(["list", "ruleset"])
                    .output()
                    .unwrap();
                let ruleset = String::from_utf8_lossy(&ruleset.stdout);
                assert!(!ruleset.contains(v.id.as_str()), "{ruleset}");
            },
        );
    }

    /// `banger doctor --json`'s `privileges` entry, run as `uid` with the
    /// helper socket `socket`.
    fn doctor_privileges_as(uid: u32, socket: &Path) -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        chmod(dir.path(), 0o755);
        let bin = dir.path().join("banger");
        std::fs::copy(workspace_bin("banger"), &bin).unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        let out = Command::new(&bin)
            .args(["doctor", "--json"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", &home)
            .env("BANGER_HELPER_SOCKET", socket)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "privileges")
            .cloned()
            .unwrap()
    }

    #[test]
    fn doctor_reports_the_helper_for_an_unprivileged_user_or_the_fix_without_it() {
        if !root_or_skip("doctor_reports_the_helper_for_an_unprivileged_user") {
            return;
        }
        let helper = start_helper(CONFIG);
        chmod(helper.socket.parent().unwrap(), 0o755);
        chmod(&helper.socket, 0o666);
        let with = doctor_privileges_as(DAEMON_UID, &helper.socket);
        assert_eq!(with["status"], "pass", "{with}");
        assert!(
            with["detail"].as_str().unwrap().contains("banger-helper"),
            "{with}"
        );

        let without = doctor_privileges_as(DAEMON_UID, Path::new("/nonexistent/helper.sock"));
        assert_eq!(without["status"], "fail", "{without}");
        assert!(
            without["fix"]
                .as_str()
                .unwrap()
                .contains("sudo banger system install"),
            "{without}"
        );
    }

    /// A banger installation run as `DAEMON_UID`: a [`test_infra::BangerEnv`]
    /// chowned to it, with copies of the binaries it can reach (the build
    /// tree under /root is closed to other users).
    struct UserEnv {
        env: test_infra::BangerEnv,
        helper_socket: PathBuf,
    }

    impl UserEnv {
        fn new(network: &str) -> UserEnv {
            let env = test_infra::BangerEnv::new();
            let r = env.root().to_path_buf();
            let bin = r.join("bin");
            std::fs::create_dir(&bin).unwrap();
            for b in ["banger", "bangerd", "fake-firecracker"] {
                std::fs::copy(workspace_bin(b), bin.join(b)).unwrap();
                chmod(&bin.join(b), 0o755);
            }
            std::fs::write(
                r.join("config/banger/config.toml"),
                format!(
                    "firecracker_bin = {:?}\nvmm = \"firecracker\"\nstop_timeout_secs = 3\n\
                     default_caps = [\"work-disk\", \"network\"]\n{network}\n",
                    bin.join("fake-firecracker").display().to_string()
                ),
            )
            .unwrap();
            env.boot_files();
            let out = Command::new("chown")
                .args(["-R", &format!("{DAEMON_UID}:{DAEMON_UID}")])
                .arg(&r)
                .output()
                .unwrap();
            assert!(out.status.success());
            std::os::unix::fs::chown(&bin, Some(0), Some(0)).unwrap();
            UserEnv {
                env,
                helper_socket: PathBuf::from("/nonexistent/helper.sock"),
            }
        }

        /// `banger ARGS` as the unprivileged user: (exit code, stdout+stderr).
        fn banger(&self, args: &[&str]) -> (i32, String) {
            let r = self.env.root();
            let out = Command::new(r.join("bin/banger"))
                .args(args)
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", r.join("home"))
                .env("XDG_CONFIG_HOME", r.join("config"))
                .env("XDG_STATE_HOME", r.join("state"))
                .env("XDG_CACHE_HOME", r.join("cache"))
                .env("XDG_RUNTIME_DIR", r.join("run"))
                .env("BANGER_DAEMON_BIN", r.join("bin/bangerd"))
                .env("FAKE_FC_RECORD", r.join("fc-calls.jsonl"))
                .env("BANGER_HELPER_SOCKET", &self.helper_socket)
                .stdin(Stdio::null())
                .uid(DAEMON_UID)
                .gid(DAEMON_UID)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.code().unwrap_or(-1), text)
        }

        fn create(&self, name: &str) -> (i32, String) {
            let (k, r) = self.env.boot_files();
            let (k, r) = (k.display().to_string(), r.display().to_string());
            self.banger(&[
                "vm",
                "create",
                "--name",
                name,
                "--kernel",
                &k,
                "--rootfs",
                &r,
                "--disk-size",
                "64M",
            ])
        }
    }

    /// A tap's owner, from `ip -d` (a user name, or the uid as a number).
    fn tap_owner(tap: &str) -> Option<String> {
        let out = Command::new("ip")
            .args(["-d", "-j", "link", "show", "dev", tap])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let user = &v[0]["linkinfo"]["info_data"]["user"];
        user.as_str()
            .map(str::to_string)
            .or_else(|| user.as_u64().map(|u| u.to_string()))
    }

    #[test]
    fn an_unprivileged_daemon_runs_networked_vms_only_through_the_helper() {
        test_infra::in_netns(
            "an_unprivileged_daemon_runs_networked_vms_only_through_the_helper",
            &[],
            || {
                let network = "[network]\nbridge = \"bgunpr0\"\nsubnet = \"10.79.0.0/24\"";
                let mut user = UserEnv::new(network);
                // No helper: the VM fails at the network step, with the fix.
                let (code, text) = user.create("web");
                assert_ne!(code, 0, "{text}");
                assert!(text.contains("prepare_host"), "{text}");
                assert!(text.contains("sudo banger system install"), "{text}");
                assert!(!links().contains(&"bgunpr0".to_string()));
                let (code, text) = user.banger(&["daemon", "stop"]);
                assert_eq!(code, 0, "{text}");

                // With the helper granting this user its names, the same works.
                let state = user.env.root().join("state/banger");
                let prefix = derived_network(&state).tap_prefixes[0].clone();
                let helper = start_helper(&format!(
                    "[[users]]\nname = \"{DAEMON_UID}\"\nbridge = \"bgunpr0\"\nsubnet = \"10.79.0.0/24\"\ntap_prefix = \"{prefix}\"\n"
                ));
                chmod(helper.socket.parent().unwrap(), 0o755);
                chmod(&helper.socket, 0o666);
                user.helper_socket = helper.socket.clone();
                let (code, text) = user.create("web2");
                assert_eq!(code, 0, "{text}");
                let pid = std::fs::read_to_string(user.env.root().join("run/banger/bangerd.pid"))
                    .unwrap();
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
                let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
                assert!(
                    uid_line.split_whitespace().nth(1) == Some(&DAEMON_UID.to_string()),
                    "the daemon is not unprivileged: {uid_line}"
                );
                assert_eq!(addresses("bgunpr0"), ["10.79.0.1/24"]);
                let tap = format!("{prefix}0");
                assert!(links().contains(&tap), "{:?}", links());
                let daemon_user = nix::unistd::User::from_uid(DAEMON_UID.into())
                    .unwrap()
                    .map_or(DAEMON_UID.to_string(), |u| u.name);
                let owner = tap_owner(&tap);
                assert_eq!(owner, Some(daemon_user), "the VM's tap is the user's");
                let (code, text) = user.banger(&["vm", "delete", "web2"]);
                assert_eq!(code, 0, "{text}");
                let (code, text) = user.banger(&["daemon", "stop"]);
                assert_eq!(code, 0, "{text}");
            },
        );
    }

    /// A `bangerd` environment in a temp dir: HOME and XDG dirs.
    fn bangerd(root: &Path) -> Command {
        let mut c = Command::new(workspace_bin("bangerd"));
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", root.join("home"))
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_STATE_HOME", root.join("state"))
            .env("XDG_CACHE_HOME", root.join("cache"))
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .stdin(Stdio::null());
        c
    }

    /// A scratch root whose `run/banger` runtime directory has `mode`.
    fn runtime_dir(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let rt = root.path().join("run/banger");
        std::fs::create_dir_all(&rt).unwrap();
        chmod(&rt, mode);
        (root, rt)
    }

    /// Runs bangerd expecting it to refuse to start; returns its stderr.
    fn bangerd_refuses(root: &Path) -> String {
        let out = bangerd(root).output().unwrap();
        assert!(!out.status.success(), "bangerd started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn the_daemon_refuses_an_open_or_foreign_runtime_dir() {
        if !root_or_skip("the_daemon_refuses_an_open_or_foreign_runtime_dir") {
            return;
        }
        let (root, rt) = runtime_dir(0o755);
        let err = bangerd_refuses(root.path());
        assert!(err.contains("Refusing the runtime directory"), "{err}");
        assert!(err.contains("its mode is 0755"), "{err}");
        assert!(!rt.join("bangerd.pid").exists(), "wrote into it anyway");

        chmod(&rt, 0o700);
        std::os::unix::fs::chown(&rt, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = bangerd_refuses(root.path());
        assert!(err.contains("owned by uid 65534"), "{err}");

        // Someone else's directory through a symlink is refused as a link.
        std::fs::remove_dir(&rt).unwrap();
        let theirs = root.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        chmod(&theirs, 0o700);
        std::os::unix::fs::symlink(&theirs, &rt).unwrap();
        let err = bangerd_refuses(root.path());
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(&theirs).unwrap().count(), 0);
    }

    #[test]
    fn a_planted_pid_file_symlink_is_not_followed_and_nothing_is_truncated() {
        if !root_or_skip("a_planted_pid_file_symlink_is_not_followed") {
            return;
        }
        let (root, rt) = runtime_dir(0o700);
        let victim = root.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        std::os::unix::fs::symlink(&victim, rt.join("bangerd.pid")).unwrap();
        let err = bangerd_refuses(root.path());
        assert!(err.contains("bangerd.pid"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    }

    #[test]
    fn strict_modes_refuse_a_writable_helper_config_and_vmm_binary() {
        if !root_or_skip("strict_modes_refuse_a_writable_helper_config") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("helper.toml");
        std::fs::write(&cfg, CONFIG).unwrap();
        chmod(&cfg, 0o666);
        let out = Command::new(workspace_bin("banger-helper"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(dir.path().join("h.sock"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("Refusing the helper config"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
        assert!(!dir.path().join("h.sock").exists());

        // A world-writable firecracker_bin: the daemon serves, VMs on that
        // backend are refused with the path and the fix.
        let env = test_infra::BangerEnv::new();
        let fc = env.root().join("bin/firecracker");
        std::fs::create_dir_all(fc.parent().unwrap()).unwrap();
        std::fs::copy(test_infra::fake_firecracker(), &fc).unwrap();
        chmod(&fc, 0o777);
        env.write_config(&format!("firecracker_bin = {:?}", fc.display().to_string()));
        let text = std::fs::read_to_string(env.root().join("config/banger/config.toml")).unwrap();
        // write_config names the fake first; ours must win, so keep only ours.
        let ours: String = text
            .lines()
            .filter(|l| !l.starts_with("firecracker_bin") || l.contains("bin/firecracker"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(env.root().join("config/banger/config.toml"), ours).unwrap();
        let run = env.create("sm", &[]).failed();
        assert!(
            run.stderr.contains("Refusing firecracker_bin"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains("chmod go-w"), "{}", run.stderr);
    }

    #[test]
    fn derived_network_names_match_the_network_capability() {
        for dir in [
            "/home/alice/.local/state/banger",
            "/var/lib/x",
            "/root/.local/state/banger",
        ] {
            let ours = derived_network(Path::new(dir));
            let theirs = banger_capabilities::network::NetIdentity::for_state_dir(Path::new(dir));
            assert_eq!(ours.bridge, theirs.bridge(), "{dir}");
            assert_eq!(ours.subnet, theirs.subnet(), "{dir}");
            assert_eq!(ours.tap_prefixes[0], theirs.tap_prefix, "{dir}");
        }
    }

    fn banger_system(root: &Path, args: &[&str]) -> (i32, String) {
        let out = Command::new(workspace_bin("banger"))
            .arg("system")
            .args(args)
            .env("BANGER_SYSTEM_ROOT", root)
            .env("XDG_RUNTIME_DIR", root.join("xdg-run"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Running and not a zombie (this machine's PID 1 may not reap).
    fn pid_alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().to_string()))
            .is_some_and(|state| !state.starts_with('Z'))
    }

    #[test]
    fn system_install_status_and_uninstall_without_systemd() {
        if !root_or_skip("system_install_status_and_uninstall_without_systemd") {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let group = format!("bgtest{}", std::process::id() % 100_000);
        let args = ["install", "--user", "root", "--group", &group];
        let (code, text) = banger_system(r, &args);
        assert_eq!(code, 0, "{text}");
        assert!(
            text.contains("starting banger-helper as a supervised root process"),
            "{text}"
        );
        let pid_file = r.join("run/banger-helper/helper.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pid_alive(pid));
        let socket = r.join("run/banger-helper/helper.sock");
        let version = HelperHostOps::new(socket.clone()).client().ping().unwrap();
        assert_eq!(version, env!("CARGO_PKG_VERSION"));

        let (code, status) = banger_system(r, &["status"]);
        assert_eq!(code, 0, "{status}");
        assert!(
            status.contains(&format!("running, banger-helper {version}")),
            "{status}"
        );

        // Idempotent: a second install keeps one entry and restarts.
        let (code, text) = banger_system(r, &args);
        assert_eq!(code, 0, "{text}");
        let config = std::fs::read_to_string(r.join("etc/banger/helper.toml")).unwrap();
        assert_eq!(config.matches("[[users]]").count(), 1, "{config}");
        let derived = derived_network(Path::new("/root/.local/state/banger"));
        assert!(config.contains(&derived.bridge), "{config}");
        let pid2: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!pid_alive(pid), "the old helper still runs");
        assert!(pid_alive(pid2));

        check_units(r);

        let (code, text) = banger_system(r, &["uninstall"]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("left in place"), "{text}");
        assert!(!pid_alive(pid2), "the helper survived uninstall");
        for f in [
            "usr/local/libexec/banger/banger-helper",
            "etc/banger/helper.toml",
            "etc/banger/install.toml",
            "etc/systemd/system/banger-helper.service",
            "etc/systemd/system/banger-helper.socket",
            "etc/systemd/user/bangerd.service",
        ] {
            assert!(!r.join(f).exists(), "{f} left behind");
        }
        assert!(nix::unistd::Group::from_name(&group).unwrap().is_none());
        let (code, _) = banger_system(r, &["status"]);
        assert_eq!(code, 3);
    }

    /// `systemd-analyze verify` on the written units.
    fn check_units(r: &Path) {
        let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
            eprintln!(
                "SKIP systemd unit verification: systemd-analyze missing (apt-get install systemd)"
            );
            return;
        };
        assert!(v.status.success());
        let units = r.join("etc/systemd/system");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(units.join("banger-helper.socket"))
            .arg(units.join("banger-helper.service"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // Only complaints about our units count (the host's own may be odd).
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("banger")).collect();
        assert!(out.status.success() && ours.is_empty(), "verify: {err}");
        let user = r.join("etc/systemd/user/bangerd.service");
        let out = Command::new("systemd-analyze")
            .args(["verify"])
            .arg(&user)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("bangerd")).collect();
        assert!(ours.is_empty(), "verify user unit: {err}");
    }
}
