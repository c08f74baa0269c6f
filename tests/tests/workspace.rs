//! Workspace import/export against a REAL sshd on loopback standing in for
//! the guest (the daemon's russh client, the git bundle, the overlay tar and
//! the export patch are all real), and the `vm workspace` CLI's dry run and
//! flag errors. The real-guest check lives in the e2e suite.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use banger_api::ssh::SshIdentity;
    use banger_core::guest_ssh::{GuestEndpoint, GuestSsh, GuestSshError};
    use banger_core::lifecycle::Progress;
    use banger_core::workspace::{self, GitIdentity, GuestPaths, PrepareOptions};
    use test_infra::{BangerEnv, wait_until};

    const SSHD: &str = "/usr/sbin/sshd";

    /// Why a real sshd cannot run here, if it cannot.
    fn sshd_missing() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("needs root to run sshd and log in as root".into());
        }
        if !Path::new(SSHD).exists() {
            return Some(format!("{SSHD} missing (install openssh-server)"));
        }
        if Command::new("ssh-keygen").arg("-?").output().is_err() {
            return Some("ssh-keygen missing (install openssh-client)".into());
        }
        git_missing()
    }

    fn git_missing() -> Option<String> {
        Command::new("git")
            .arg("--version")
            .output()
            .is_err()
            .then(|| "git missing".to_string())
    }

    /// A throwaway sshd on 127.0.0.1 accepting banger's identity for root.
    struct Sshd {
        child: Child,
        dir: tempfile::TempDir,
        addr: SocketAddr,
        host_key_line: String,
        identity: SshIdentity,
    }

    impl Drop for Sshd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Sshd {
        fn start() -> Sshd {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let identity = SshIdentity::load_or_create(&d.join("client")).unwrap();
            let hk = d.join("host_ed25519");
            keygen(&hk);
            fs::write(
                d.join("authorized_keys"),
                format!("{}\n", identity.public_line()),
            )
            .unwrap();
            // sshd's privilege separation directory.
            fs::create_dir_all("/run/sshd").unwrap();
            let port = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let cfg = d.join("sshd_config");
            fs::write(
                &cfg,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\n\
                     AuthorizedKeysFile {ak}\nPidFile {pid}\nUsePAM no\nStrictModes no\n\
                     PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n",
                    hk = hk.display(),
                    ak = d.join("authorized_keys").display(),
                    pid = d.join("sshd.pid").display(),
                ),
            )
            .unwrap();
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(fs::File::create(d.join("sshd.log")).unwrap())
                .spawn()
                .unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            wait_until(Duration::from_secs(10), "sshd listens", || {
                TcpStream::connect(addr).is_ok()
            });
            let host_key_line = fs::read_to_string(hk.with_extension("pub")).unwrap();
            Sshd {
                child,
                dir,
                addr,
                host_key_line: host_key_line.trim().to_string(),
                identity,
            }
        }

        fn endpoint(&self) -> GuestEndpoint {
            GuestEndpoint {
                addr: self.addr,
                user: "root".into(),
                identity_file: self.identity.private_key_path().to_path_buf(),
                known_hosts: format!("127.0.0.1 {}\n", self.host_key_line),
            }
        }

        fn log(&self) -> String {
            fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
        }
    }

    fn keygen(path: &Path) {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// git with a fixed identity and no user/system config.
    fn g(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.com"])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The tree id of `dir`'s working state (what `git add -A` would stage),
    /// without touching its index.
    fn worktree_id(dir: &Path) -> String {
        let idx = dir.join(".git/test-index");
        let _ = fs::remove_file(&idx);
        let run = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .env("GIT_INDEX_FILE", &idx)
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        run(&["add", "-A"]);
        let id = run(&["write-tree"]).trim().to_string();
        fs::remove_file(&idx).unwrap();
        id
    }

    /// The host repository: committed a.txt, gone.txt, run.sh (0755),
    /// logo.bin (binary), link -> a.txt, .gitignore (*.log); then a.txt
    /// modified, gone.txt deleted, new.txt untracked, debug.log ignored.
    fn host_repo(root: &Path) -> PathBuf {
        let r = root.join("host");
        fs::create_dir(&r).unwrap();
        g(&r, &["init", "-q", "-b", "main"]);
        g(&r, &["config", "user.name", "Repo Local"]);
        g(&r, &["config", "user.email", "local@example.com"]);
        fs::write(r.join("a.txt"), "a\n").unwrap();
        fs::write(r.join("gone.txt"), "g\n").unwrap();
        fs::write(r.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
        fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(r.join("logo.bin"), [0u8, 1, 2, 255, 0, 10, 13, 0]).unwrap();
        symlink("a.txt", r.join("link")).unwrap();
        fs::write(r.join(".gitignore"), "*.log\n").unwrap();
        g(&r, &["add", "."]);
        g(&r, &["commit", "-q", "-m", "init"]);
        fs::write(r.join("a.txt"), "a\nhost change\n").unwrap();
        fs::remove_file(r.join("gone.txt")).unwrap();
        fs::write(r.join("new.txt"), "untracked\n").unwrap();
        fs::write(r.join("debug.log"), "ignored\n").unwrap();
        // An uncommitted new symlink and executable, tracked via the index.
        symlink("run.sh", r.join("run-link")).unwrap();
        fs::write(r.join("tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(r.join("tool"), fs::Permissions::from_mode(0o750)).unwrap();
        g(&r, &["add", "run-link", "tool"]);
        r
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn guest_ssh_captures_status_and_output_and_streams_stdin() {
        if let Some(why) = sshd_missing() {
            eprintln!("SKIPPED guest_ssh_captures_status_and_output_and_streams_stdin: {why}");
            return;
        }
        let sshd = Sshd::start();
        let ssh = GuestSsh::connect(&sshd.endpoint())
            .await
            .unwrap_or_else(|e| panic!("{e:?}\nsshd log:\n{}", sshd.log()));
        let out = ssh
            .exec("echo out; echo err >&2; exit 3", None)
            .await
            .unwrap();
        assert_eq!(out.status, 3);
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        // Bigger than any channel window, binary, through stdin and back.
        let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let back = ssh
            .run("cat", Some(&mut std::io::Cursor::new(input.clone())))
            .await
            .unwrap();
        assert_eq!(back.len(), input.len());
        assert!(back == input);
        // A failing command through `run` names its status and stderr.
        let err = ssh.run("echo nope >&2; exit 5", None).await.unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, GuestSshError::Failed { status: 5, .. }),
            "{text}"
        );
        assert!(text.contains("nope"), "{text}");
        // Output past the limit fails the command instead of filling the
        // daemon's memory; output up to it is kept whole.
        let ssh = ssh.with_max_output(100_000);
        let out = ssh.run("head -c 100000 /dev/zero", None).await.unwrap();
        assert_eq!(out.len(), 100_000);
        let err = ssh
            .run("head -c 3000000 /dev/zero", None)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                GuestSshError::OutputTooLarge {
                    stream: "stdout",
                    limit: 100_000,
                    ..
                }
            ),
            "{err}"
        );
        ssh.close().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn guest_ssh_refuses_a_host_key_the_agent_did_not_report() {
        if let Some(why) = sshd_missing() {
            eprintln!("SKIPPED guest_ssh_refuses_a_host_key_the_agent_did_not_report: {why}");
            return;
        }
        let sshd = Sshd::start();
        let other = sshd.dir.path().join("other_key");
        keygen(&other);
        let other_line = fs::read_to_string(other.with_extension("pub")).unwrap();
        let mut endpoint = sshd.endpoint();
        endpoint.known_hosts = format!("127.0.0.1 {}", other_line.trim());
        let err = GuestSsh::connect(&endpoint).await.unwrap_err();
        assert!(matches!(err, GuestSshError::HostKeyMismatch(_)), "{err:?}");
        endpoint.known_hosts = String::new();
        let err = GuestSsh::connect(&endpoint).await.unwrap_err();
        assert!(matches!(err, GuestSshError::NoHostKeys), "{err:?}");
        // A key the guest does not authorize is refused at login.
        let stranger = SshIdentity::load_or_create(&sshd.dir.path().join("stranger")).unwrap();
        let mut endpoint = sshd.endpoint();
        endpoint.identity_file = stranger.private_key_path().to_path_buf();
        let err = GuestSsh::connect(&endpoint).await.unwrap_err();
        assert!(matches!(err, GuestSshError::Auth(_)), "{err:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn prepare_then_export_round_trips_through_git_apply() {
        if let Some(why) = sshd_missing() {
            eprintln!("SKIPPED prepare_then_export_round_trips_through_git_apply: {why}");
            return;
        }
        let sshd = Sshd::start();
        let tmp = tempfile::tempdir().unwrap();
        let host = host_repo(tmp.path());
        let guest_root = tmp.path().join("guest-root");
        fs::create_dir(&guest_root).unwrap();
        let guest = GuestPaths {
            repo: guest_root.join("repo"),
            gitconfig: guest_root.join(".gitconfig"),
        };
        let scratch = tmp.path().join("scratch");
        fs::create_dir(&scratch).unwrap();

        let mut plan = workspace::plan(&host, &PrepareOptions::default()).unwrap();
        // The host's real global identity is whatever this machine has; pin
        // one so the guest's ~/.gitconfig is checkable.
        plan.global_identity = GitIdentity {
            name: Some("Global Person".into()),
            email: Some("global@example.com".into()),
        };
        assert_eq!(plan.local_identity.name.as_deref(), Some("Repo Local"));
        let ssh = GuestSsh::connect(&sshd.endpoint()).await.unwrap();
        let view = workspace::prepare(&ssh, &plan, &guest, &scratch, &Progress::none())
            .await
            .unwrap_or_else(|e| panic!("{}", banger_core::lifecycle::render_chain(&e)));
        assert_eq!(view.repo, guest.repo);
        assert_eq!(view.base_commit, plan.head_commit);
        assert_eq!(view.branch.as_deref(), Some("main"));
        assert_eq!(view.skipped_untracked, 1);
        assert_eq!(view.mode, "tracked");

        let r = &guest.repo;
        assert_eq!(
            fs::read_to_string(r.join("a.txt")).unwrap(),
            "a\nhost change\n"
        );
        assert!(
            !r.join("gone.txt").exists(),
            "deleted tracked file came back"
        );
        assert!(!r.join("new.txt").exists(), "untracked copied by default");
        assert!(!r.join("debug.log").exists(), "ignored file copied");
        assert_eq!(fs::read_link(r.join("link")).unwrap(), Path::new("a.txt"));
        assert_eq!(
            fs::read_link(r.join("run-link")).unwrap(),
            Path::new("run.sh")
        );
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&r.join("run.sh")) & 0o111, 0o111);
        assert_eq!(mode(&r.join("tool")), 0o750);
        assert_eq!(
            fs::read(r.join("logo.bin")).unwrap(),
            [0u8, 1, 2, 255, 0, 10, 13, 0]
        );
        // The guest tree is exactly the host's working state (tracked).
        let guest_head = g(r, &["rev-parse", "HEAD"]);
        assert_eq!(guest_head.trim(), plan.head_commit);
        assert_eq!(g(r, &["symbolic-ref", "--short", "HEAD"]).trim(), "main");
        let status = g(r, &["status", "--porcelain"]);
        assert!(status.contains(" M a.txt"), "{status}");
        assert!(status.contains(" D gone.txt"), "{status}");
        assert!(!status.contains("new.txt"), "{status}");
        // Identities: global into the given gitconfig, local into the checkout.
        let global = fs::read_to_string(&guest.gitconfig).unwrap();
        assert!(global.contains("Global Person"), "{global}");
        assert!(global.contains("global@example.com"), "{global}");
        let local = g(r, &["config", "--local", "user.name"]);
        assert_eq!(local.trim(), "Repo Local");
        // No staging leftovers next to the checkout.
        let names: Vec<String> = fs::read_dir(&guest_root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(fs::read_dir(&scratch).unwrap().next().is_none());

        // Preparing again with untracked files replaces the checkout.
        let opts = PrepareOptions {
            include_untracked: true,
            branch: Some("guest-work".into()),
            ..Default::default()
        };
        let plan2 = workspace::plan(&host, &opts).unwrap();
        let view2 = workspace::prepare(&ssh, &plan2, &guest, &scratch, &Progress::none())
            .await
            .unwrap();
        assert_eq!(view2.branch.as_deref(), Some("guest-work"));
        assert_eq!(view2.skipped_untracked, 0);
        assert_eq!(
            fs::read_to_string(r.join("new.txt")).unwrap(),
            "untracked\n"
        );
        assert!(!r.join("debug.log").exists(), "ignored file copied");
        assert_eq!(
            g(r, &["symbolic-ref", "--short", "HEAD"]).trim(),
            "guest-work"
        );
        assert_eq!(
            worktree_id(r),
            worktree_id(&host),
            "guest differs from host"
        );

        // Work in the guest: a commit, then uncommitted edits, a deletion,
        // a new untracked binary file and an ignored file.
        g(r, &["add", "-A"]);
        g(r, &["commit", "-q", "-m", "guest commit"]);
        fs::write(r.join("a.txt"), "a\nguest edit\n").unwrap();
        fs::remove_file(r.join("run.sh")).unwrap();
        fs::write(r.join("blob.bin"), [9u8, 0, 0, 200, 13, 10, 0, 1]).unwrap();
        fs::write(r.join("guest.log"), "ignored in the guest too\n").unwrap();
        let index_before = fs::read(r.join(".git/index")).unwrap();

        let (base, patch) = workspace::export(&ssh, r, Some(&plan2.base_commit))
            .await
            .unwrap();
        assert_eq!(base, plan2.base_commit);
        // The export's file list: what the patch changes, nothing ignored.
        let files: Vec<(String, String)> = workspace::changed_files(&ssh, r, &base)
            .await
            .unwrap()
            .into_iter()
            .map(|f| (f.path, f.status))
            .collect();
        for (path, status) in [
            ("a.txt", "modified"),
            ("run.sh", "deleted"),
            ("blob.bin", "added"),
        ] {
            assert!(
                files.contains(&(path.to_string(), status.to_string())),
                "{path} {status} not in {files:?}"
            );
        }
        assert!(!files.iter().any(|(p, _)| p == "guest.log"), "{files:?}");
        assert_eq!(
            fs::read(r.join(".git/index")).unwrap(),
            index_before,
            "export touched the guest's index"
        );
        assert!(
            String::from_utf8_lossy(&patch).contains("GIT binary patch"),
            "not a binary patch"
        );

        // A clean host checkout of the base + git apply = the guest's tree.
        let clean = tmp.path().join("clean");
        let out = Command::new("git")
            .args(["clone", "-q"])
            .arg(&host)
            .arg(&clean)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        g(&clean, &["checkout", "-q", &base]);
        let patch_file = tmp.path().join("guest.patch");
        fs::write(&patch_file, &patch).unwrap();
        g(&clean, &["apply", patch_file.to_str().unwrap()]);
        assert_eq!(worktree_id(&clean), worktree_id(r));
        assert_eq!(
            fs::read(clean.join("blob.bin")).unwrap(),
            [9u8, 0, 0, 200, 13, 10, 0, 1]
        );
        assert!(!clean.join("guest.log").exists());

        // Without a base, the guest's HEAD is used: only uncommitted work.
        let (head_base, head_patch) = workspace::export(&ssh, r, None).await.unwrap();
        assert_eq!(head_base, g(r, &["rev-parse", "HEAD"]).trim());
        let text = String::from_utf8_lossy(&head_patch);
        assert!(text.contains("guest edit"), "{text}");
        assert!(!text.contains("new.txt"), "committed in the guest: {text}");

        // A base that is not a commit id never reaches the shell.
        let err = workspace::export(&ssh, r, Some("HEAD; rm -rf /"))
            .await
            .unwrap_err();
        assert!(err.is_user_error(), "{err}");
        ssh.close().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn full_copy_carries_submodules_and_git_dir_as_is() {
        if let Some(why) = sshd_missing() {
            eprintln!("SKIPPED full_copy_carries_submodules_and_git_dir_as_is: {why}");
            return;
        }
        let sshd = Sshd::start();
        let tmp = tempfile::tempdir().unwrap();
        let host = host_repo(tmp.path());
        let head = g(&host, &["rev-parse", "HEAD"]);
        let gitlink = format!("160000,{},vendor/lib", head.trim());
        g(&host, &["update-index", "--add", "--cacheinfo", &gitlink]);
        let err = workspace::plan(&host, &PrepareOptions::default()).unwrap_err();
        assert!(err.to_string().contains("--full-copy"), "{err}");
        let opts = PrepareOptions {
            full_copy: true,
            ..Default::default()
        };
        let plan = workspace::plan(&host, &opts).unwrap();
        let guest = GuestPaths {
            repo: tmp.path().join("guest/repo"),
            gitconfig: tmp.path().join("guest/.gitconfig"),
        };
        fs::create_dir(tmp.path().join("guest")).unwrap();
        let ssh = GuestSsh::connect(&sshd.endpoint()).await.unwrap();
        let view = workspace::prepare(&ssh, &plan, &guest, tmp.path(), &Progress::none())
            .await
            .unwrap();
        ssh.close().await;
        assert_eq!(view.mode, "full-copy");
        let r = &guest.repo;
        // Everything, ignored and untracked included, and the index as is.
        for f in ["debug.log", "new.txt", "a.txt", ".git/HEAD"] {
            assert_eq!(
                fs::read(r.join(f)).unwrap(),
                fs::read(host.join(f)).unwrap(),
                "{f}"
            );
        }
        assert_eq!(fs::read_link(r.join("link")).unwrap(), Path::new("a.txt"));
        let staged = g(r, &["ls-files", "--stage", "vendor/lib"]);
        assert!(staged.starts_with("160000 "), "{staged}");
    }

    #[test]
    fn dry_run_prints_the_exact_file_list_without_a_daemon() {
        if let Some(why) = git_missing() {
            eprintln!("SKIPPED dry_run_prints_the_exact_file_list_without_a_daemon: {why}");
            return;
        }
        let env = BangerEnv::new();
        let tmp = tempfile::tempdir().unwrap();
        let host = host_repo(tmp.path());
        let host_s = host.to_str().unwrap();
        let head = g(&host, &["rev-parse", "HEAD"]);
        let run = env
            .banger(&["vm", "workspace", "prepare", "w", host_s, "--dry-run"])
            .ok();
        let root = host.canonicalize().unwrap();
        let expected = format!(
            "repository: {}\n\
             mode:       tracked files (history + uncommitted tracked changes)\n\
             head:       {h}\n\
             base:       {h}\n\
             files:      4\n\
             \x20 modified  a.txt\n\
             \x20 deleted   gone.txt\n\
             \x20 modified  run-link (symlink)\n\
             \x20 modified  tool (executable)\n\
             note: 1 untracked file was not copied; pass --include-untracked to copy them\n",
            root.display(),
            h = head.trim()
        );
        assert_eq!(run.stdout, expected);
        assert!(!env.socket().exists(), "dry run started the daemon");

        let run = env
            .banger(&[
                "vm",
                "workspace",
                "prepare",
                "w",
                host_s,
                "--dry-run",
                "--include-untracked",
            ])
            .ok();
        assert!(
            run.stdout.contains("  untracked new.txt\n"),
            "{}",
            run.stdout
        );
        assert!(!run.stdout.contains("debug.log"), "{}", run.stdout);
        assert!(!run.stdout.contains("note:"), "{}", run.stdout);
        assert!(!env.socket().exists(), "dry run started the daemon");
    }

    #[test]
    fn bad_workspace_flags_are_refused_before_anything_runs() {
        if let Some(why) = git_missing() {
            eprintln!("SKIPPED bad_workspace_flags_are_refused_before_anything_runs: {why}");
            return;
        }
        let env = BangerEnv::new();
        let tmp = tempfile::tempdir().unwrap();
        let host = host_repo(tmp.path());
        let h = host.to_str().unwrap();
        let usage = [
            vec!["prepare", "w", h, "--from", "HEAD", "--dry-run"],
            vec![
                "prepare",
                "w",
                h,
                "--full-copy",
                "--branch",
                "b",
                "--dry-run",
            ],
            vec!["prepare", "w", h, "--full-copy", "--include-untracked"],
            vec!["prepare", "NOT A NAME", h, "--dry-run"],
            vec!["export", "w", "--base-commit", "HEAD~1"],
        ];
        for args in usage {
            let mut all = vec!["vm", "workspace"];
            all.extend(args.iter());
            let run = env.banger(&all);
            assert_eq!(run.code, 2, "{all:?}: {run:?}");
        }
        let bare = tmp.path().join("bare.git");
        fs::create_dir(&bare).unwrap();
        g(&bare, &["init", "-q", "--bare"]);
        let cases = [
            (bare.to_str().unwrap().to_string(), vec![], "bare"),
            (
                tmp.path().to_str().unwrap().to_string(),
                vec![],
                "not inside a git repository",
            ),
            (
                h.to_string(),
                vec!["--branch", "a..b"],
                "not a valid git branch",
            ),
            (
                h.to_string(),
                vec!["--branch", "b", "--from", "no-such-ref"],
                "does not name a commit",
            ),
        ];
        for (path, extra, want) in cases {
            let mut all = vec!["vm", "workspace", "prepare", "w", &path, "--dry-run"];
            all.extend(extra.iter());
            let run = env.banger(&all).failed();
            assert_eq!(run.code, 1, "{all:?}: {run:?}");
            assert!(run.stderr.contains(want), "{all:?}: {}", run.stderr);
        }
        assert!(
            !env.socket().exists(),
            "a refused command started the daemon"
        );
    }

    #[test]
    fn daemon_routes_name_what_is_missing_for_a_vm_without_an_agent() {
        if let Some(why) = git_missing() {
            eprintln!(
                "SKIPPED daemon_routes_name_what_is_missing_for_a_vm_without_an_agent: {why}"
            );
            return;
        }
        let env = BangerEnv::new();
        let tmp = tempfile::tempdir().unwrap();
        let host = host_repo(tmp.path());
        let h = host.to_str().unwrap();
        let run = env
            .banger(&["vm", "workspace", "export", "nosuch"])
            .failed();
        assert!(
            run.stderr.contains("No VM named \"nosuch\""),
            "{}",
            run.stderr
        );
        // Test envs default to the work-disk capability only: no agent to
        // read host keys from, so no SSH.
        env.create("w", &[]).ok();
        let run = env.banger(&["vm", "workspace", "prepare", "w", h]).failed();
        assert!(run.stderr.contains("--cap vsock-agent"), "{}", run.stderr);
        let run = env.banger(&["vm", "workspace", "export", "w"]).failed();
        assert!(run.stderr.contains("--cap vsock-agent"), "{}", run.stderr);
        // The plan is checked before the guest is: input errors come first.
        let run = env
            .banger(&[
                "vm",
                "workspace",
                "prepare",
                "w",
                tmp.path().to_str().unwrap(),
            ])
            .failed();
        assert!(
            run.stderr.contains("not inside a git repository"),
            "{}",
            run.stderr
        );
        assert!(!env.show("w").dir.join("workspace.json").exists());
    }
}
