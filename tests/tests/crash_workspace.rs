//! Crash consistency of `vm workspace prepare` on a real guest (QEMU/TCG,
//! the cached Debian image, one boot): the daemon is SIGKILLed at each
//! stage of an import (the `BANGER_TEST_CRASH_AT` hook, or the test's own
//! `kill -9` while the guest is cloning), started again, and the result
//! checked: the VM still runs and answers, no host staging file is left,
//! the guest's `/root/repo` is the previous import or the new one (never a
//! mix, never missing), and the next import succeeds and leaves no guest
//! staging directory. Prints the table of stages and outcomes. Exec
//! streams keep alive every 400 ms here, so a guest script whose daemon
//! died is ended within seconds even when the end of its stream is lost.
//!
//! Needs what `e2e.rs` needs (`scripts/build-agent`, the cached kernel and
//! rootfs, QEMU, vhost-device-vsock); skips loudly without them.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use banger_api::model::VmState;
    use test_infra::guest_rig::{Rig, rig};
    use test_infra::{BangerEnv, git, pid_alive, wait_until};

    const CRASH_AT: &str = "BANGER_TEST_CRASH_AT";
    const VM: &str = "wscrash";

    /// Where in the import the daemon dies.
    #[derive(Clone, Copy, Debug)]
    enum Kill {
        /// At this `crash_point` in the daemon.
        Hook(&'static str),
        /// From the test, once the guest has started cloning the bundle
        /// (the upload is over; the guest script runs on alone).
        WhileTheGuestClones,
        /// Stopped (SIGSTOP) at this `crash_point`, its connections open
        /// and silent, as the guest sees a daemon whose end of the stream
        /// the vsock backend lost; killed once the guest's agent has given
        /// up on the stream at its keepalive deadline.
        Freeze(&'static str),
    }

    const STAGES: &[(&str, Kill)] = &[
        (
            "bundle created on the host",
            Kill::Hook("workspace:bundled"),
        ),
        ("half the upload sent", Kill::Hook("workspace:uploading")),
        (
            "half the upload sent, silent",
            Kill::Freeze("workspace:uploading"),
        ),
        ("guest clone/checkout", Kill::WhileTheGuestClones),
        (
            "published, not yet recorded",
            Kill::Hook("workspace:published"),
        ),
    ];

    /// A command in the guest through the agent (`vm ssh --via agent`).
    fn guest(env: &BangerEnv, script: &str) -> test_infra::Run {
        env.banger(&["vm", "ssh", VM, "--via", "agent", "--", "sh", "-c", script])
    }

    /// A repository big enough for an import to take seconds under TCG:
    /// 16 MiB that does not compress and 400 small files, in one commit.
    fn big_repo(home: &Path, repo: &Path) {
        std::fs::create_dir_all(repo.join("src")).unwrap();
        git(home, repo, &["init", "-q", "-b", "main"]);
        git(home, repo, &["config", "user.name", "Host"]);
        git(home, repo, &["config", "user.email", "host@example.com"]);
        std::fs::write(repo.join("blob.bin"), test_infra::http::noise(16 << 20)).unwrap();
        for i in 0..400 {
            std::fs::write(repo.join(format!("src/f{i}.txt")), format!("file {i}\n")).unwrap();
        }
        std::fs::write(repo.join("marker"), "v0\n").unwrap();
        git(home, repo, &["add", "-A"]);
        git(home, repo, &["commit", "-q", "-m", "v0"]);
    }

    /// The guest checkout's state: its HEAD, whether the working tree is
    /// exactly HEAD's (`clean`), and the marker file; or what is wrong.
    fn guest_checkout(env: &BangerEnv) -> Result<(String, String), String> {
        let out = guest(
            env,
            "cd /root/repo || exit 3; git rev-parse HEAD; \
             test -z \"$(git status --porcelain)\" && echo clean || echo dirty; \
             git show HEAD:marker | cmp -s - marker && echo marker-matches || echo marker-differs; \
             cat marker",
        );
        if out.code != 0 {
            return Err(format!("no checkout: {out:?}"));
        }
        let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
        match lines.as_slice() {
            [head, "clean", "marker-matches", marker] => Ok((head.to_string(), marker.to_string())),
            _ => Err(format!("a mixed checkout: {lines:?}")),
        }
    }

    /// Guest staging directories and host staging files of the VM.
    fn leftovers(env: &BangerEnv, vm_dir: &Path) -> (String, Vec<String>) {
        let guest_side = guest(env, "ls -d /root/.repo.staging-* 2>/dev/null; true")
            .ok()
            .stdout
            .trim()
            .to_string();
        let host_side = std::fs::read_dir(vm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".staging-") || n.contains(".bundle"))
            .collect();
        (guest_side, host_side)
    }

    /// How many times the guest agent logged (on the VM's console) that it
    /// gave up on a silent host's exec stream.
    fn gave_up(serial_log: &Path) -> usize {
        std::fs::read_to_string(serial_log)
            .unwrap_or_default()
            .matches("keepalive deadline")
            .count()
    }

    /// Runs the import that is to crash at `kill`; returns once the daemon
    /// that ran it is dead.
    fn crash_prepare(rig: &mut Rig, repo: &Path, serial_log: &Path, kill: Kill) {
        rig.env.kill_daemon();
        let point = match kill {
            Kill::Hook(p) => p.to_string(),
            Kill::Freeze(p) => format!("freeze:{p}"),
            Kill::WhileTheGuestClones => String::new(),
        };
        rig.env.set_env(CRASH_AT, &point);
        let gave_up_before = gave_up(serial_log);
        // The daemon this starts has the hook armed.
        assert_eq!(rig.env.show(VM).record.state, VmState::Running);
        let crashing = rig.env.daemon_pid().unwrap();
        let env = &rig.env;
        std::thread::scope(|s| {
            let run =
                s.spawn(|| env.banger(&["vm", "workspace", "prepare", VM, repo.to_str().unwrap()]));
            if let Kill::WhileTheGuestClones = kill {
                // Another daemon would answer `vm ssh` after the kill, so
                // look from outside: the guest's git checkout-index process.
                wait_until(Duration::from_secs(300), "the guest checks out", || {
                    guest(env, "pgrep -f '[c]heckout-index -a'").code == 0
                });
                env.kill_daemon();
            }
            if let Kill::Freeze(_) = kill {
                // The agent's own word that the stream's silence, not its
                // end, made it give up.
                wait_until(
                    Duration::from_secs(120),
                    "the agent gives up on the stopped daemon's stream",
                    || gave_up(serial_log) > gave_up_before,
                );
                env.kill_daemon();
            }
            let out = run.join().unwrap();
            assert_ne!(out.code, 0, "the prepare outlived its daemon: {out:?}");
        });
        wait_until(
            Duration::from_secs(10),
            "the crashed daemon is gone",
            || !pid_alive(crashing),
        );
        rig.env.set_env(CRASH_AT, "");
    }

    #[test]
    fn a_daemon_killed_at_any_stage_of_a_workspace_prepare_leaves_the_guest_checkout_whole() {
        let test =
            "a_daemon_killed_at_any_stage_of_a_workspace_prepare_leaves_the_guest_checkout_whole";
        let Some((mut rig, _a)) = rig(test, "bookworm", "") else {
            return;
        };
        let home = rig.env.root().join("home");
        let repo = rig.env.root().join("repo");
        big_repo(&home, &repo);
        let vm = rig.create(VM, &["--image", "bookworm"]);
        rig.pin_host_keys(&vm);
        // Exec streams with a keepalive every 400 ms, so the agent takes a
        // host that went silent for gone after 3 s: vhost-device-vsock can
        // lose the end of a connection whose host was killed, and an
        // import's guest script then waits on its stdin, holding the
        // import lock, until that deadline. A command that runs longer than
        // the deadline while the CLI is there is not cut short.
        rig.env
            .set_env(banger_api::config::EXEC_KEEPALIVE_ENV, "400");
        let slow = guest(&rig.env, "sleep 4; echo slept").ok();
        assert_eq!(slow.stdout.trim(), "slept");
        let started = Instant::now();
        rig.env
            .banger(&["vm", "workspace", "prepare", VM, repo.to_str().unwrap()])
            .ok();
        let clean_prepare = started.elapsed();
        let mut current = guest_checkout(&rig.env).unwrap();
        assert_eq!(current.1, "v0");

        let mut table = Vec::new();
        for (i, (stage, kill)) in STAGES.iter().enumerate() {
            // A new commit each round, so "old" and "new" differ.
            let version = format!("v{}", i + 1);
            std::fs::write(repo.join("marker"), format!("{version}\n")).unwrap();
            git(&home, &repo, &["commit", "-q", "-am", &version]);
            let new_head = git(&home, &repo, &["rev-parse", "HEAD"]);

            crash_prepare(&mut rig, &repo, &vm.dir.join("serial.log"), *kill);

            // A clean daemon: the VM runs on and answers.
            let view = rig.env.show(VM);
            assert_eq!(view.record.state, VmState::Running, "{stage}");
            guest(&rig.env, "true").ok();
            // No host staging: the startup sweep took any bundle.
            let (_, host_left) = leftovers(&rig.env, &vm.dir);
            assert!(host_left.is_empty(), "{stage}: host keeps {host_left:?}");
            // The checkout is the old import or the new one. A guest script
            // the dead daemon started may still be running: look again once
            // it is done, through its lock.
            let seen_first = guest_checkout(&rig.env).unwrap_or_else(|e| panic!("{stage}: {e}"));
            guest(&rig.env, "flock /root true").ok();
            let settled = guest_checkout(&rig.env).unwrap_or_else(|e| panic!("{stage}: {e}"));
            for seen in [&seen_first, &settled] {
                assert!(
                    *seen == current || (seen.0 == new_head && seen.1 == version),
                    "{stage}: the checkout is {seen:?}, neither {current:?} nor ({new_head}, {version})"
                );
            }
            let outcome = if settled == current { "old" } else { "new" };

            // The next import succeeds, completely, and sweeps the guest.
            rig.env
                .banger(&["vm", "workspace", "prepare", VM, repo.to_str().unwrap()])
                .ok();
            current = guest_checkout(&rig.env).unwrap();
            assert_eq!(current, (new_head, version.clone()), "{stage}: retry");
            let (guest_left, host_left) = leftovers(&rig.env, &vm.dir);
            assert!(guest_left.is_empty(), "{stage}: guest keeps {guest_left}");
            assert!(host_left.is_empty(), "{stage}: host keeps {host_left:?}");
            table.push(format!(
                "{:<30} {:<26} {:<4} running, no staging, retry ok",
                stage,
                match kill {
                    Kill::Hook(p) => p.to_string(),
                    Kill::Freeze(p) => format!("freeze:{p}"),
                    Kill::WhileTheGuestClones => "(test kill -9)".to_string(),
                },
                outcome
            ));
        }
        println!("an uninterrupted prepare took {clean_prepare:.1?}");
        println!(
            "{:<30} {:<26} {:<4} after restart",
            "stage", "crash point", "repo"
        );
        for row in table {
            println!("{row}");
        }
        rig.delete_all_and_check_clean(&[vm]);
    }
}
