//! `banger update`, `scripts/install.sh` and `banger uninstall` through the
//! real binaries, against releases laid out and signed by the real
//! `banger-release publish-binaries` and served by a loopback HTTP server.
//!
//! Each test installs a copy of the built `banger` into a temp prefix
//! (`PREFIX/bin`), beside stand-in `bangerd`, `banger-helper` and
//! `banger-agent` files, and trusts the test key through
//! `PREFIX/etc/banger/update-keys/` (the owner-checked key directory; no
//! environment variable or build feature can add a key). A refused update
//! must leave every installed file byte-identical and no staging directory.
//!
//! Build first: `cargo build -p bangerd -p banger-cli -p banger-release`.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use test_infra::http::{Reply, Server};
    use test_infra::{BangerEnv, Run, workspace_bin};

    /// A test-only ed25519 key (made with `openssl genpkey -algorithm
    /// ed25519`); never trusted by a release build unless a key file says so.
    const TEST_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIHlxs4YgzjATx2/R9qlDGAbC/JkpxGJRftpo29wWw1XF
-----END PRIVATE KEY-----
";
    const TEST_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAO36t6zPsg0U3ocEpuUGJNVOdPJmYfX+BLzL/rbjtSC0=
-----END PUBLIC KEY-----
";
    const ARCH: &str = std::env::consts::ARCH;
    /// The version every binary of this workspace reports.
    const CURRENT: &str = env!("CARGO_PKG_VERSION");
    const NEW: &str = "99.0.0";

    /// A temp prefix with banger installed, a release directory and a
    /// server for it.
    struct Fixture {
        env: BangerEnv,
        tmp: tempfile::TempDir,
        server: Server,
    }

    impl Fixture {
        fn new() -> Fixture {
            let env = BangerEnv::new();
            let tmp = tempfile::Builder::new()
                .prefix("upd")
                .tempdir_in("/tmp")
                .unwrap();
            let f = Fixture {
                env,
                tmp,
                server: Server::start(),
            };
            std::fs::create_dir_all(f.bin()).unwrap();
            install_bin("banger", &f.bin());
            for n in ["bangerd", "banger-helper", "banger-agent"] {
                std::fs::write(f.bin().join(n), format!("old {n}\n")).unwrap();
            }
            std::fs::write(f.tmp.path().join("test.key"), TEST_PRIVATE_PEM).unwrap();
            f.trust_test_key();
            f
        }

        fn prefix(&self) -> PathBuf {
            self.tmp.path().join("prefix")
        }

        fn bin(&self) -> PathBuf {
            self.prefix().join("bin")
        }

        fn keys_dir(&self) -> PathBuf {
            self.prefix().join("etc/banger/update-keys")
        }

        fn trust_test_key(&self) {
            std::fs::create_dir_all(self.keys_dir()).unwrap();
            std::fs::write(self.keys_dir().join("test.pem"), TEST_PUBLIC_PEM).unwrap();
        }

        fn out(&self) -> PathBuf {
            self.tmp.path().join("out")
        }

        fn url(&self) -> String {
            format!("{}/rel", self.server.base)
        }

        /// Publishes `version` with `files` (name, content) for this
        /// architecture and serves the whole release directory.
        fn publish(&self, version: &str, files: &[(&str, Vec<u8>)]) {
            let src = self.tmp.path().join(format!("src-{version}"));
            std::fs::create_dir_all(&src).unwrap();
            let mut cmd = Command::new(workspace_bin("banger-release"));
            cmd.args(["publish-binaries", "--version", version, "--key"])
                .arg(self.tmp.path().join("test.key"))
                .arg("--out-dir")
                .arg(self.out());
            for (name, bytes) in files {
                let p = src.join(name);
                std::fs::write(&p, bytes).unwrap();
                cmd.arg("--file").arg(format!("{ARCH}:{}", p.display()));
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "publish-binaries failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.serve();
        }

        /// (Re)serves every file under `out/` at `/rel/...`.
        fn serve(&self) {
            for (rel, bytes) in tree(&self.out()) {
                self.server
                    .route(&format!("/rel/{rel}"), Reply::Body(bytes));
            }
        }

        /// Flips one bit of the published file `rel` (under `out/`, so the
        /// length stays) and serves the result.
        fn flip(&self, rel: &str, at: usize) {
            let p = self.out().join(rel);
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[at] ^= 0x20;
            std::fs::write(&p, bytes).unwrap();
            self.serve();
        }

        fn new_files() -> Vec<(&'static str, Vec<u8>)> {
            ["banger", "bangerd", "banger-helper", "banger-agent"]
                .into_iter()
                .map(|n| (n, format!("new {n} {NEW}\n").into_bytes()))
                .collect()
        }

        fn installed(&self) -> BTreeMap<String, Vec<u8>> {
            tree(&self.prefix())
        }

        /// The installed copy of banger with `args`, in the env's HOME/XDG.
        fn banger(&self, args: &[&str]) -> Run {
            let mut cmd = self.env.command(&self.bin().join("banger"));
            cmd.args(args);
            run(cmd)
        }

        fn update(&self, extra: &[&str]) -> Run {
            let url = self.url();
            let mut args = vec!["update", "--url", &url];
            args.extend_from_slice(extra);
            self.banger(&args)
        }

        /// Runs an update that must be refused with `reason`, and checks
        /// that nothing changed.
        fn refused(&self, reason: &str) -> Run {
            let before = self.installed();
            let r = self.update(&[]).failed();
            assert!(
                r.stderr.contains(reason) && r.stderr.contains("nothing was changed"),
                "expected {reason:?} and `nothing was changed`:\n{}",
                r.stderr
            );
            assert_eq!(
                self.installed(),
                before,
                "a refused update changed the installation"
            );
            r
        }
    }

    /// The built binary `name` in `dir`, as a hard link where possible: a
    /// copy is a file this process had open for writing, and a child forked
    /// meanwhile by another test's thread would hold that open until its
    /// exec, so running the copy could fail with ETXTBSY.
    fn install_bin(name: &str, dir: &Path) {
        let (src, dst) = (workspace_bin(name), dir.join(name));
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }

    fn run(mut cmd: Command) -> Run {
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Every regular file under `root`, by relative path (no staging
    /// directories may hide in there: they show up as extra entries).
    fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(root).unwrap().display().to_string();
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn an_update_replaces_every_binary_and_reports_old_and_new_version() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let r = f.update(&[]).ok();
        assert!(
            r.stdout
                .contains(&format!("updated banger {CURRENT} → {NEW}")),
            "{}",
            r.stdout
        );
        let installed = f.installed();
        for (name, bytes) in Fixture::new_files() {
            assert_eq!(installed[&format!("bin/{name}")], bytes, "{name}");
        }
        // The four binaries and the key; no staging directory left.
        assert_eq!(installed.len(), 5, "{:?}", installed.keys());
    }

    #[test]
    fn check_reports_a_newer_release_and_changes_nothing() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let before = f.installed();
        let r = f.update(&["--check"]).ok();
        assert!(
            r.stdout
                .contains(&format!("banger {CURRENT} → {NEW} available")),
            "{}",
            r.stdout
        );
        assert_eq!(f.installed(), before);
    }

    #[test]
    fn an_older_latest_release_is_not_installed_unless_asked_for_by_version() {
        let f = Fixture::new();
        f.publish("0.0.1", &Fixture::new_files());
        let before = f.installed();
        let r = f.update(&[]).ok();
        assert!(r.stdout.contains("up to date"), "{}", r.stdout);
        assert_eq!(f.installed(), before);
        let r = f.update(&["--check"]).ok();
        assert!(r.stdout.contains("up to date"), "{}", r.stdout);
        // An explicit --version installs it (a downgrade).
        let r = f.update(&["--version", "0.0.1"]).ok();
        assert!(
            r.stdout.contains(&format!("{CURRENT} → 0.0.1")),
            "{}",
            r.stdout
        );
        assert_eq!(f.installed()["bin/bangerd"], b"new bangerd 99.0.0\n");
    }

    #[test]
    fn version_fetches_that_release_and_a_missing_one_is_named() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let before = f.installed();
        let r = f.update(&["--version", "98.0.0"]).failed();
        assert!(
            r.stderr.contains("/98.0.0/manifest answered HTTP 404"),
            "{}",
            r.stderr
        );
        assert_eq!(f.installed(), before);
        f.update(&["--version", NEW]).ok();
        assert_eq!(
            f.installed()["bin/banger"],
            format!("new banger {NEW}\n").as_bytes()
        );
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        f.flip("latest/manifest.sig", 10);
        f.refused("bad signature");
    }

    #[test]
    fn a_tampered_manifest_is_refused_by_its_signature() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        // Point the manifest at other bytes for bangerd: the signature no
        // longer matches.
        let evil = b"evil bangerd\n".to_vec();
        let m = f.out().join("latest/manifest");
        let text = std::fs::read_to_string(&m).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains(" bangerd "))
            .unwrap()
            .to_string();
        let forged = format!(
            "file {ARCH} bangerd {} {}",
            evil.len(),
            test_infra::http::sha256(&evil)
        );
        std::fs::write(&m, text.replace(&line, &forged)).unwrap();
        std::fs::write(f.out().join(format!("{NEW}/{ARCH}/bangerd")), evil).unwrap();
        f.serve();
        f.refused("bad signature");
    }

    #[test]
    fn a_release_signed_by_an_untrusted_key_is_refused() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        std::fs::remove_file(f.keys_dir().join("test.pem")).unwrap();
        let r = f.refused("bad signature");
        assert!(r.stderr.contains("banger's release key"), "{}", r.stderr);
    }

    #[test]
    fn a_key_file_others_can_write_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let key = f.keys_dir().join("test.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o666)).unwrap();
        let r = f.refused("bad signature");
        assert!(
            r.stderr.contains("writable by its group or by everyone")
                && r.stderr.contains("the key is ignored"),
            "{}",
            r.stderr
        );
        // Made private again, the same key is trusted.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        f.update(&[]).ok();
    }

    #[test]
    fn a_tampered_file_is_refused_by_its_sha256() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        // Same length, other bytes: only the hash can tell.
        f.flip(&format!("{NEW}/{ARCH}/banger-helper"), 0);
        f.refused("sha256 mismatch");
    }

    #[test]
    fn a_truncated_download_is_refused() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let full = std::fs::read(f.out().join(format!("{NEW}/{ARCH}/bangerd"))).unwrap();
        f.server.route(
            &format!("/rel/{NEW}/{ARCH}/bangerd"),
            Reply::Truncated {
                body: full[..5].to_vec(),
                claimed: full.len(),
            },
        );
        f.refused("truncated download");
        // A server that sends a shorter file outright (no broken
        // connection) is caught by the manifest's size.
        f.server.route(
            &format!("/rel/{NEW}/{ARCH}/bangerd"),
            Reply::Body(full[..5].to_vec()),
        );
        f.refused("truncated download");
    }

    #[test]
    fn an_unreachable_server_is_named_with_how_to_update_by_hand() {
        let f = Fixture::new();
        // A port nobody listens on: bound, noted, closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/rel");
        let before = f.installed();
        let r = f.banger(&["update", "--url", &url]).failed();
        for needle in [
            format!("Cannot reach {url}/latest/manifest"),
            "nothing was changed".into(),
            "to update by hand".into(),
        ] {
            assert!(r.stderr.contains(&needle), "{needle:?}:\n{}", r.stderr);
        }
        assert_eq!(f.installed(), before);
        // The same through update_url in config.toml.
        f.env.write_config(&format!("update_url = \"{url}\"\n"));
        let r = f.banger(&["update"]).failed();
        assert!(
            r.stderr.contains(&format!("Cannot reach {url}/")),
            "{}",
            r.stderr
        );
    }

    #[test]
    fn a_failed_rename_rolls_back_the_files_already_replaced() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        // banger-helper is a non-empty directory: renaming the new file
        // over it fails after banger and bangerd were replaced.
        std::fs::remove_file(f.bin().join("banger-helper")).unwrap();
        std::fs::create_dir_all(f.bin().join("banger-helper/x")).unwrap();
        std::fs::write(f.bin().join("banger-helper/x/keep"), b"keep").unwrap();
        let before = f.installed();
        let r = f.update(&[]).failed();
        assert!(
            r.stderr.contains("were put back, so banger is unchanged"),
            "{}",
            r.stderr
        );
        assert_eq!(f.installed(), before);
    }

    #[test]
    fn an_update_by_a_user_who_cannot_write_the_binaries_says_sudo() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        refused_as_nobody(
            &f,
            &["update", "--url", &f.url()],
            &[],
            "run `sudo banger update`",
        );
    }

    #[test]
    fn a_running_daemon_is_restarted_on_the_new_build() {
        let mut f = Fixture::new();
        // Real binaries this time: the daemon must start from the new file.
        std::fs::remove_file(f.bin().join("bangerd")).unwrap();
        install_bin("bangerd", &f.bin());
        let real = |n: &str| std::fs::read(workspace_bin(n)).unwrap();
        f.publish(
            NEW,
            &[("banger", real("banger")), ("bangerd", real("bangerd"))],
        );
        // The daemon next to the installed banger, not the workspace's.
        f.env.set_env("BANGER_DAEMON_BIN", "");
        f.banger(&["daemon", "start"]).ok();
        let old_pid = f.env.daemon_pid().unwrap();
        let r = f.update(&[]).ok();
        assert!(
            r.stdout.contains("bangerd: restarted on the new build"),
            "{}",
            r.stdout
        );
        let new_pid = f.env.daemon_pid().unwrap();
        assert_ne!(old_pid, new_pid);
        let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
        assert_eq!(exe, f.bin().join("bangerd"));
        f.banger(&["daemon", "stop"]).ok();
    }

    #[test]
    fn uninstall_stops_the_daemon_removes_the_binaries_and_lists_the_data() {
        let mut f = Fixture::new();
        std::fs::write(f.bin().join("unrelated-tool"), b"mine").unwrap();
        f.env.set_env(
            "BANGER_SYSTEM_ROOT",
            &f.tmp.path().join("sysroot").display().to_string(),
        );
        f.banger(&["daemon", "start"]).ok();
        let pid = f.env.daemon_pid().unwrap();
        let state = f.env.state_dir();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("disk.img"), vec![7u8; 3 << 20]).unwrap();

        // Without a terminal and without --yes: refused, nothing changed.
        let before = f.installed();
        let r = f.banger(&["uninstall"]).failed();
        assert!(r.stderr.contains("pass --yes"), "{}", r.stderr);
        assert_eq!(f.installed(), before);
        assert!(Path::new(&format!("/proc/{pid}")).exists());

        let r = f.banger(&["uninstall", "--yes"]).ok();
        assert!(r.stdout.contains("stopped bangerd"), "{}", r.stdout);
        let left = f.installed();
        assert_eq!(
            left.keys().collect::<Vec<_>>(),
            ["bin/unrelated-tool"],
            "only what banger did not install may stay"
        );
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "bangerd {pid} still runs"
        );
        // The data stays and is listed with its size (3 MiB written).
        assert!(state.join("disk.img").exists());
        let line = r
            .stdout
            .lines()
            .find(|l| l.contains(&state.display().to_string()))
            .unwrap_or_else(|| panic!("state dir not listed:\n{}", r.stdout));
        // 3 MiB of disk image plus the daemon's own files.
        let mib: f64 = line
            .split_whitespace()
            .zip(line.split_whitespace().skip(1))
            .find(|(_, unit)| *unit == "MiB")
            .map(|(n, _)| n.parse().unwrap())
            .unwrap_or_else(|| panic!("no size in MiB: {line}"));
        assert!((3.0..4.0).contains(&mib), "{line}");
        assert!(r.stdout.contains("rm -rf"), "{}", r.stdout);
    }

    #[test]
    fn uninstall_refuses_while_vms_run() {
        let mut f = Fixture::new();
        f.env.set_env(
            "BANGER_SYSTEM_ROOT",
            &f.tmp.path().join("sysroot").display().to_string(),
        );
        f.env.create("keep", &[]).ok();
        let before = f.installed();
        let r = f.banger(&["uninstall", "--yes"]).failed();
        assert!(
            r.stderr.contains("1 VM(s) are running") && r.stderr.contains("--force"),
            "{}",
            r.stderr
        );
        assert_eq!(f.installed(), before);
    }

    /// A root helper "installed" under a temp system root: its record and
    /// the one file it lists.
    fn fake_system_install(f: &Fixture) -> (PathBuf, PathBuf) {
        let sysroot = f.tmp.path().join("sysroot");
        let helper = sysroot.join("usr/local/libexec/banger/banger-helper");
        std::fs::create_dir_all(helper.parent().unwrap()).unwrap();
        std::fs::write(&helper, b"helper").unwrap();
        std::fs::create_dir_all(sysroot.join("etc/banger")).unwrap();
        std::fs::write(
            sysroot.join("etc/banger/install.toml"),
            format!(
                "version = \"{CURRENT}\"\nfiles = [{:?}]\n",
                helper.display().to_string()
            ),
        )
        .unwrap();
        (sysroot, helper)
    }

    #[test]
    fn uninstall_as_root_removes_the_root_helper_too() {
        let mut f = Fixture::new();
        let (sysroot, helper) = fake_system_install(&f);
        f.env
            .set_env("BANGER_SYSTEM_ROOT", &sysroot.display().to_string());
        let r = f.banger(&["uninstall", "--yes"]).ok();
        assert!(
            r.stdout.contains(&format!("removed {}", helper.display())),
            "{}",
            r.stdout
        );
        assert!(!helper.exists());
        assert!(!sysroot.join("etc/banger/install.toml").exists());
        assert!(!f.bin().join("banger").exists());
    }

    #[test]
    fn uninstall_as_a_user_leaves_the_root_helper_to_sudo_and_changes_nothing() {
        let f = Fixture::new();
        let (sysroot, helper) = fake_system_install(&f);
        let env = [("BANGER_SYSTEM_ROOT", sysroot.as_path())];
        refused_as_nobody(
            &f,
            &["uninstall", "--yes"],
            &env,
            "sudo banger system uninstall",
        );
        assert!(helper.exists());
    }

    #[test]
    fn uninstall_by_a_user_who_cannot_write_the_binaries_says_sudo_and_changes_nothing() {
        let f = Fixture::new();
        let sysroot = f.tmp.path().join("sysroot");
        let env = [("BANGER_SYSTEM_ROOT", sysroot.as_path())];
        refused_as_nobody(&f, &["uninstall", "--yes"], &env, "sudo banger uninstall");
    }

    /// The installed banger with `args` as user nobody (setpriv), with
    /// HOME unset to a missing directory and `env` added; None (skipped
    /// loudly) without setpriv.
    fn as_nobody(f: &Fixture, args: &[&str], env: &[(&str, &Path)]) -> Option<Run> {
        use std::os::unix::fs::PermissionsExt;
        if Command::new("setpriv").arg("--version").output().is_err() {
            eprintln!("SKIP running banger as a user: needs setpriv (apt-get install util-linux)");
            return None;
        }
        // Let nobody reach (not write) the installed banger.
        std::fs::set_permissions(f.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(f.bin().join("banger"))
            .args(args)
            .env_clear()
            .env("HOME", "/nonexistent");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Some(run(cmd))
    }

    /// [`as_nobody`] must fail naming `reason` and `Nothing was changed`,
    /// and leave the installation as it was.
    fn refused_as_nobody(f: &Fixture, args: &[&str], env: &[(&str, &Path)], reason: &str) {
        let before = f.installed();
        let Some(r) = as_nobody(f, args, env) else {
            return;
        };
        let r = r.failed();
        assert!(
            r.stderr.contains(reason) && r.stderr.contains("Nothing was changed"),
            "expected {reason:?}:\n{}",
            r.stderr
        );
        assert_eq!(f.installed(), before);
    }

    /// `sh scripts/install.sh` into a temp prefix, or None (skipped loudly)
    /// without openssl 3.
    fn install_sh(f: &Fixture, prefix: &Path, extra: &[&str]) -> Option<Run> {
        let ok = Command::new("openssl")
            .args(["pkeyutl", "-help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).contains("-rawin"))
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP install.sh test: needs openssl 3 (apt-get install openssl)");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh");
        let mut cmd = f.env.command(Path::new("sh"));
        cmd.arg(script)
            .args(["--url", &f.url(), "--prefix"])
            .arg(prefix)
            .args(extra);
        Some(run(cmd))
    }

    #[test]
    fn install_sh_verifies_and_installs_a_release_and_its_key() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let pubkey = f.tmp.path().join("test.pub");
        std::fs::write(&pubkey, TEST_PUBLIC_PEM).unwrap();
        let prefix = f.tmp.path().join("fresh");
        let Some(r) = install_sh(&f, &prefix, &["--pubkey", &pubkey.display().to_string()]) else {
            return;
        };
        let r = r.ok();
        assert!(
            r.stdout.contains(&format!("installed banger {NEW}")),
            "{}",
            r.stdout
        );
        let installed = tree(&prefix);
        for (name, bytes) in Fixture::new_files() {
            assert_eq!(installed[&format!("bin/{name}")], bytes, "{name}");
        }
        assert_eq!(
            installed["etc/banger/update-keys/release.pem"],
            TEST_PUBLIC_PEM.as_bytes()
        );
        assert_eq!(installed.len(), 5, "{:?}", installed.keys());
    }

    #[test]
    fn install_sh_refuses_a_tampered_file_and_a_bad_signature() {
        let f = Fixture::new();
        f.publish(NEW, &Fixture::new_files());
        let pubkey = f.tmp.path().join("test.pub");
        std::fs::write(&pubkey, TEST_PUBLIC_PEM).unwrap();
        let key_arg = pubkey.display().to_string();
        f.flip(&format!("{NEW}/{ARCH}/banger-agent"), 1);
        let prefix = f.tmp.path().join("fresh");
        let Some(r) = install_sh(&f, &prefix, &["--pubkey", &key_arg]) else {
            return;
        };
        let r = r.failed();
        assert!(
            r.stderr.contains("sha256 mismatch: banger-agent")
                && r.stderr.contains("nothing was installed"),
            "{}",
            r.stderr
        );
        assert!(
            !prefix.exists() || tree(&prefix).is_empty(),
            "{:?}",
            tree(&prefix)
        );
        // Without --pubkey only banger's own key is trusted.
        let r = install_sh(&f, &prefix, &[]).unwrap().failed();
        assert!(
            r.stderr.contains("bad signature") && r.stderr.contains("banger's release key"),
            "{}",
            r.stderr
        );
        assert!(!prefix.exists() || tree(&prefix).is_empty());
    }

    #[test]
    fn a_banger_installed_by_install_sh_updates_itself_with_the_key_it_was_given() {
        let f = Fixture::new();
        let real = std::fs::read(workspace_bin("banger")).unwrap();
        let mut first = Fixture::new_files();
        first[0].1 = real;
        f.publish(CURRENT, &first);
        let pubkey = f.tmp.path().join("test.pub");
        std::fs::write(&pubkey, TEST_PUBLIC_PEM).unwrap();
        let prefix = f.tmp.path().join("fresh");
        let Some(r) = install_sh(&f, &prefix, &["--pubkey", &pubkey.display().to_string()]) else {
            return;
        };
        r.ok();
        f.publish(NEW, &Fixture::new_files());
        let mut cmd = f.env.command(&prefix.join("bin/banger"));
        cmd.args(["update", "--url", &f.url()]);
        let r = run(cmd).ok();
        assert!(
            r.stdout.contains(&format!("{CURRENT} → {NEW}"))
                && r.stdout.contains("update-keys/release.pem"),
            "{}",
            r.stdout
        );
        let installed = tree(&prefix);
        for (name, bytes) in Fixture::new_files() {
            assert_eq!(installed[&format!("bin/{name}")], bytes, "{name}");
        }
    }

    #[test]
    fn install_sh_and_banger_trust_the_same_release_key() {
        let script = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/install.sh"),
        )
        .unwrap();
        let start = script.find("release_key='").unwrap() + "release_key='".len();
        let end = start + script[start..].find('\'').unwrap();
        assert_eq!(
            script[start..end].trim(),
            banger_api::release::RELEASE_PUBLIC_KEY_PEM.trim(),
            "scripts/install.sh embeds another key than banger_api::release"
        );
    }
}
