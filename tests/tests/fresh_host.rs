//! The README's two commands on a fresh host, as a newcomer runs them: an
//! empty HOME and XDG directories, no config file, no image or kernel; then
//! `./scripts/install` and `banger vm run . --rm -- CMD` in a git
//! repository. The first run must obtain the default kernel and image (from
//! the catalog, or built here from the host's package mirror), boot a real
//! guest under QEMU and end with the guest's output and the command's exit
//! code; the second run in the same HOME must reuse what the first made.
//! Both elapsed times are printed. `scripts/install` installs the debug
//! binaries the suite has built (`BANGER_INSTALL_PROFILE=debug`), not a
//! release build of its own. Then what the first run built is
//! released to a loopback registry with `banger-release` and booted from
//! there by another fresh HOME: build → push → catalog → pull → boot.
//!
//! Needs root (the daemon configures the bridge), QEMU, mmdebstrap and apt
//! with a reachable mirror: `scripts/test` installs them.

#[cfg(test)]
mod tests {

    use std::path::{Path, PathBuf};
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    /// Runs `cmd`, killing it after `limit`.
    fn run(cmd: &mut Command, limit: Duration) -> Output {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if done_rx.recv_timeout(limit).is_err() {
                // SAFETY: kill(2) on the pid of a child we spawned and have not
                // reaped (wait_with_output below reaps it after this fires).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        let out = child.wait_with_output().unwrap();
        let _ = done_tx.send(());
        watchdog.join().unwrap();
        out
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    /// Why this machine cannot run the test, if it cannot.
    fn missing_requirement() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some("needs root (the daemon configures a bridge and taps)".into());
        }
        for tool in [
            "qemu-system-x86_64",
            "mmdebstrap",
            "apt-get",
            "git",
            "cargo",
        ] {
            if test_infra::guest_artifacts::on_path(tool).is_none() {
                return Some(format!(
                    "{tool} is not installed (scripts/test installs it)"
                ));
            }
        }
        None
    }

    /// What `cargo test` sets for the test binary, which a newcomer's shell
    /// does not have. Left in, they reached the install's own `cargo
    /// build`: ring's build script watches `CARGO_MANIFEST_DIR`, so it
    /// and everything above it (rustls, russh, reqwest, the workspace)
    /// were compiled again, 66 s of every run, and again by the suite's
    /// next build.
    fn set_by_cargo_test(var: &str) -> bool {
        var == "CARGO"
            || var == "CARGO_MANIFEST_DIR"
            || var == "CARGO_MANIFEST_PATH"
            || var == "CARGO_CRATE_NAME"
            || var == "CARGO_PRIMARY_PACKAGE"
            || var == "CARGO_TARGET_TMPDIR"
            || var == "CARGO_RUSTC_CURRENT_DIR"
            || var.starts_with("CARGO_PKG_")
            || var.starts_with("CARGO_BIN_")
    }

    /// A command with a newcomer's environment: HOME at `home`, no XDG
    /// variables, `home/.local/bin` first on PATH; cargo and rustup keep the
    /// real toolchain locations.
    fn newcomer(program: impl AsRef<std::ffi::OsStr>, home: &Path) -> Command {
        let mut cmd = Command::new(program);
        let real_home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
        let path = format!(
            "{}:{}:{}",
            home.join(".local/bin").display(),
            std::env::var("PATH").unwrap_or_default(),
            test_infra::guest_artifacts::cache()
                .join("tools/bin")
                .display()
        );
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("XDG_")
                || k.to_string_lossy().starts_with("BANGER")
                || set_by_cargo_test(&k.to_string_lossy())
            {
                cmd.env_remove(k);
            }
        }
        cmd.env("HOME", home)
            .env("PATH", path)
            .env(
                "CARGO_HOME",
                std::env::var_os("CARGO_HOME").unwrap_or_else(|| real_home.join(".cargo").into()),
            )
            .env(
                "RUSTUP_HOME",
                std::env::var_os("RUSTUP_HOME").unwrap_or_else(|| real_home.join(".rustup").into()),
            );
        if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
            cmd.env("CARGO_TARGET_DIR", t);
        } else {
            cmd.env("CARGO_TARGET_DIR", test_infra::target_dir());
        }
        cmd
    }

    #[test]
    fn readme_commands_reach_a_running_guest_on_a_fresh_host_and_reuse_the_cache() {
        if let Some(why) = missing_requirement() {
            eprintln!("SKIP readme_commands_reach_a_running_guest_on_a_fresh_host: {why}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let repo = tmp.path().join("project");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::create_dir_all(&repo).unwrap();
        let _network = test_infra::DaemonNetwork::of_state_dir(home.join(".local/state/banger"));
        let git = |args: &[&str]| {
            let out = newcomer("git", &home)
                .args([
                    "-c",
                    "user.name=New Comer",
                    "-c",
                    "user.email=new@example.org",
                ])
                .args(args)
                .current_dir(&repo)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {}", text(&out.stderr));
        };
        git(&["init", "-q"]);
        let marker = format!("fresh-host-{}", std::process::id());
        std::fs::write(repo.join("hello.txt"), format!("{marker}\n")).unwrap();
        git(&["add", "hello.txt"]);
        git(&["commit", "-qm", "first"]);

        // Command one: the install, into the newcomer's HOME.
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let t = Instant::now();
        let install = run(
            newcomer(workspace.join("scripts/install"), &home)
                .env("PREFIX", home.join(".local"))
                // The debug binaries this suite has built: the same script
                // and code, without a release build of the workspace (which
                // every commit would redo, minutes of each CI run).
                .env("BANGER_INSTALL_PROFILE", "debug")
                .current_dir(workspace),
            Duration::from_secs(30 * 60),
        );
        assert!(
            install.status.success(),
            "scripts/install failed:\n{}\n{}",
            text(&install.stdout),
            text(&install.stderr)
        );
        eprintln!("fresh host: ./scripts/install took {:.1?}", t.elapsed());
        let banger = home.join(".local/bin/banger");
        assert!(banger.is_file(), "scripts/install did not install banger");

        // Command two, twice: the guest runs the command in the imported
        // workspace and its exit code comes back.
        let vm_run = || {
            let t = Instant::now();
            let out = run(
                newcomer(&banger, &home)
                    .args([
                        "vm",
                        "run",
                        ".",
                        "--rm",
                        "--",
                        "sh",
                        "-c",
                        "cat /root/repo/hello.txt; exit 7",
                    ])
                    .current_dir(&repo),
                Duration::from_secs(20 * 60),
            );
            (out, t.elapsed())
        };
        let (first, first_took) = vm_run();
        let (second, second_took) = vm_run();
        let stop = newcomer(&banger, &home).args(["daemon", "stop"]).output();
        eprintln!(
            "fresh host: first `vm run` {first_took:.1?}, second {second_took:.1?}\n--- first run's stderr ---\n{}",
            text(&first.stderr)
        );
        for (which, out) in [("first", &first), ("second", &second)] {
            assert_eq!(
                out.status.code(),
                Some(7),
                "{which} vm run: the command's exit code\nstdout:\n{}\nstderr:\n{}",
                text(&out.stdout),
                text(&out.stderr)
            );
            assert!(
                text(&out.stdout).contains(&marker),
                "{which} vm run printed the guest's file\nstdout:\n{}",
                text(&out.stdout)
            );
        }
        let first_err = text(&first.stderr);
        let second_err = text(&second.stderr);
        assert!(
            first_err.contains("build_image") || first_err.contains("pull_image"),
            "the first run obtains the default image:\n{first_err}"
        );
        for stage in ["build_kernel", "build_image", "pull_kernel", "pull_image"] {
            assert!(
                !second_err.contains(stage),
                "the second run reuses the cache, but ran {stage}:\n{second_err}"
            );
        }
        assert!(stop.is_ok_and(|o| o.status.success()), "daemon stop");

        released_defaults_boot_from_a_registry(&home, &repo, &marker);
    }

    /// The release pipeline's round trip with what the newcomer's first run
    /// built: `banger-release push` to a loopback registry, catalogs
    /// pinned by digest, then another fresh HOME whose config points at
    /// those catalogs runs `vm run`: it must pull (not build) the kernel and
    /// the image, boot them and return the command's exit code.
    fn released_defaults_boot_from_a_registry(built_home: &Path, repo: &Path, marker: &str) {
        let test = "released_defaults_boot_from_a_registry";
        let Some(reg) = test_infra::registry::Registry::start(test) else {
            return;
        };
        let state = built_home.join(".local/state/banger");
        let out = built_home.join("release");
        let t = Instant::now();
        let push = run(
            Command::new(test_infra::workspace_bin("banger-release"))
                .args(["push", "--insecure", "--zstd-level", "3"])
                .arg("--registry")
                .arg(format!("{}/banger", reg.host()))
                .arg("--kernel-dir")
                .arg(state.join("kernels/debian-cloud-6.12"))
                .args(["--kernel-name", "debian-cloud-6.12"])
                .arg("--image-rootfs")
                .arg(state.join("images/debian-bookworm/rootfs.ext4"))
                .args(["--image-name", "debian-bookworm"])
                .arg("--catalog-dir")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/catalog"))
                .arg("--out-dir")
                .arg(&out)
                .env("DOCKER_CONFIG", built_home.join("no-docker-config")),
            Duration::from_secs(10 * 60),
        );
        assert!(
            push.status.success(),
            "banger-release push: {}",
            text(&push.stderr)
        );
        eprintln!(
            "release: push of the built kernel and image took {:.1?}",
            t.elapsed()
        );

        let home = built_home.with_file_name("home-from-release");
        let _network = test_infra::DaemonNetwork::of_state_dir(home.join(".local/state/banger"));
        let config = home.join(".config/banger");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(
            config.join("config.toml"),
            format!(
                "kernel_catalog_file = {:?}\nimage_catalog_file = {:?}\ninsecure_registries = [{:?}]\n",
                out.join("kernels.toml"),
                out.join("images.toml"),
                reg.host()
            ),
        )
        .unwrap();
        let banger = built_home.join(".local/bin/banger");
        let t = Instant::now();
        let got = run(
            newcomer(&banger, &home)
                .args(["vm", "run", ".", "--rm", "--", "sh", "-c"])
                .arg("cat /root/repo/hello.txt; exit 5")
                .current_dir(repo),
            Duration::from_secs(15 * 60),
        );
        let _ = newcomer(&banger, &home).args(["daemon", "stop"]).output();
        let err = text(&got.stderr);
        eprintln!(
            "release: `vm run` from the registry took {:.1?}",
            t.elapsed()
        );
        assert_eq!(
            got.status.code(),
            Some(5),
            "vm run from the release:\n{err}"
        );
        assert!(text(&got.stdout).contains(marker), "{}", text(&got.stdout));
        for pulled in ["pull_kernel", "pull_image"] {
            assert!(
                err.contains(pulled),
                "{pulled} missing: the release was not pulled\n{err}"
            );
        }
        for built in ["build_kernel", "build_image"] {
            assert!(
                !err.contains(built),
                "{built}: a published release must not be rebuilt\n{err}"
            );
        }
    }
}
