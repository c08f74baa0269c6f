//! Crash consistency: for every lifecycle operation and every stage inside
//! it, the daemon is killed (SIGKILL, through the `BANGER_TEST_CRASH_AT`
//! hook) at that stage, started again, and the result checked: no VMM
//! process nobody records, no VM directory, socket or staging file no VM
//! owns, and the VM either fully there in a settled state (and able to start
//! and be deleted cleanly) or fully gone. Prints the table of stages and
//! outcomes.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::Duration;

    use banger_api::model::VmState;
    use test_infra::{BangerEnv, pid_alive, wait_until};

    const CRASH_AT: &str = "BANGER_TEST_CRASH_AT";

    /// What must exist before the crashing operation runs.
    #[derive(Clone, Copy, Debug)]
    enum Before {
        Nothing,
        Created,
        Running,
    }

    /// One row: the operation, the crash point, what comes before, and the
    /// settled outcome reconcile must reach (`gone` or a VM state).
    struct Case {
        op: &'static [&'static str],
        point: &'static str,
        before: Before,
        expect: &'static str,
    }

    const CASES: &[Case] = &[
        Case {
            op: &["create"],
            point: "create:recorded",
            before: Before::Nothing,
            expect: "gone",
        },
        Case {
            op: &["create"],
            point: "create:cloned",
            before: Before::Nothing,
            expect: "created",
        },
        Case {
            op: &["create"],
            point: "start:prepared",
            before: Before::Nothing,
            expect: "error",
        },
        Case {
            op: &["create"],
            point: "start:vmm_spawned",
            before: Before::Nothing,
            expect: "error",
        },
        Case {
            op: &["start"],
            point: "start:prepared",
            before: Before::Created,
            expect: "error",
        },
        Case {
            op: &["start"],
            point: "start:vmm_spawned",
            before: Before::Created,
            expect: "error",
        },
        Case {
            op: &["start"],
            point: "start:vmm_booted",
            before: Before::Created,
            expect: "error",
        },
        Case {
            op: &["stop"],
            point: "stop:stopping",
            before: Before::Running,
            expect: "stopped",
        },
        Case {
            op: &["stop"],
            point: "stop:vmm_gone",
            before: Before::Running,
            expect: "stopped",
        },
        Case {
            op: &["restart"],
            point: "restart:stopped",
            before: Before::Running,
            expect: "stopped",
        },
        Case {
            op: &["restart"],
            point: "start:vmm_spawned",
            before: Before::Running,
            expect: "error",
        },
        Case {
            op: &["delete"],
            point: "delete:marked",
            before: Before::Running,
            expect: "gone",
        },
        Case {
            op: &["delete"],
            point: "delete:torn_down",
            before: Before::Running,
            expect: "gone",
        },
        Case {
            op: &["delete"],
            point: "delete:dir_removed",
            before: Before::Running,
            expect: "gone",
        },
    ];

    const VM: &str = "crashy";

    /// Live VMM processes of this env: fake firecrackers whose API socket is
    /// under the env's root.
    fn vmm_processes(env: &BangerEnv) -> BTreeSet<u32> {
        let root = env.root().display().to_string();
        let mut out = BTreeSet::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if comm.trim().starts_with("fake-firecracke")
                && String::from_utf8_lossy(&cmdline).contains(&root)
                && pid_alive(pid as i32)
            {
                out.insert(pid);
            }
        }
        out
    }

    fn names(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everything that must hold of a settled env: returns the VM's outcome
    /// (`gone` or its state) or what leaked.
    fn check_settled(env: &BangerEnv) -> Result<String, String> {
        let vms = env.list();
        let mut problems = Vec::new();
        let mut recorded = BTreeSet::new();
        for vm in &vms {
            let r = &vm.record;
            match (r.state, &r.vmm) {
                (VmState::Running, Some(p)) if pid_alive(p.pid as i32) => {
                    recorded.insert(p.pid);
                }
                (VmState::Created | VmState::Stopped | VmState::Error, None) => {}
                (state, vmm) => problems.push(format!(
                    "VM {} is {state} with VMM {vmm:?} (unsettled)",
                    r.name
                )),
            }
            if !vm.dir.join("rootfs.ext4").is_file() {
                problems.push(format!("VM {} has no root disk", r.name));
            }
            let staging: Vec<String> = names(&vm.dir)
                .into_iter()
                .filter(|n| n.contains(".staging-"))
                .collect();
            if !staging.is_empty() {
                problems.push(format!("VM {} keeps staging files {staging:?}", r.name));
            }
        }
        let orphans: Vec<u32> = vmm_processes(env).difference(&recorded).copied().collect();
        if !orphans.is_empty() {
            problems.push(format!("orphan VMM processes {orphans:?}"));
        }
        let ids: BTreeSet<String> = vms.iter().map(|v| v.record.id.to_string()).collect();
        let dirs = names(&env.state_dir().join("vms"));
        if dirs != ids {
            problems.push(format!("VM dirs {dirs:?} but VMs {ids:?}"));
        }
        let running: BTreeSet<String> = vms
            .iter()
            .filter(|v| v.record.vmm.is_some())
            .map(|v| format!("{}.sock", v.record.id))
            .collect();
        let socks = names(&env.root().join("run/banger/vms"));
        if !socks.is_subset(&running) {
            problems.push(format!(
                "sockets {socks:?}, but running VMs own {running:?}"
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(match vms.iter().find(|v| v.record.name.as_str() == VM) {
            Some(vm) => vm.record.state.to_string(),
            None => "gone".to_string(),
        })
    }

    /// Kills this env's VMMs when dropped, also the orphans a failing case
    /// leaves (which `BangerEnv` cannot know of: they made no API call).
    struct KillsLeftovers(BangerEnv);

    impl Drop for KillsLeftovers {
        fn drop(&mut self) {
            self.0.kill_daemon();
            for pid in vmm_processes(&self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Runs one case; returns (outcome, what the follow-up showed) or panics
    /// with what leaked.
    fn run_case(case: &Case) -> String {
        let mut env = KillsLeftovers(BangerEnv::new());
        let env = &mut env.0;
        match case.before {
            Before::Nothing => {}
            Before::Created => {
                env.create(VM, &["--no-start"]).ok();
            }
            Before::Running => {
                env.create(VM, &[]).ok();
            }
        }
        env.kill_daemon();

        // The next daemon (started on demand by the CLI) dies at the point.
        env.set_env(CRASH_AT, case.point);
        let run = match case.op {
            ["create"] => env.create(VM, &[]),
            [verb] => env.banger(&["vm", verb, VM]),
            other => panic!("unknown op {other:?}"),
        };
        assert_ne!(
            run.code, 0,
            "{}: the daemon was to die at {}, but the command succeeded:\n{}",
            case.op[0], case.point, run.stderr
        );
        // It died there (a daemon never exits by itself).
        let crashed = env.daemon_pid().expect("the crashing daemon wrote its pid");
        wait_until(
            Duration::from_secs(10),
            "the crashing daemon is gone",
            || !pid_alive(crashed),
        );

        // A clean daemon reconciles.
        env.set_env(CRASH_AT, "");
        let outcome =
            check_settled(env).unwrap_or_else(|e| panic!("{} at {}: {e}", case.op[0], case.point));
        assert_eq!(
            outcome, case.expect,
            "{} at {}: unexpected outcome",
            case.op[0], case.point
        );

        // Fully there means usable: it starts and deletes cleanly.
        if outcome != "gone" {
            env.banger(&["vm", "start", VM]).ok();
            assert_eq!(env.show(VM).record.state, VmState::Running);
            env.banger(&["vm", "delete", VM]).ok();
            let after = check_settled(env)
                .unwrap_or_else(|e| panic!("{} at {}, after delete: {e}", case.op[0], case.point));
            assert_eq!(after, "gone");
        }
        outcome
    }

    #[test]
    fn a_daemon_killed_at_any_stage_leaves_nothing_orphaned_and_the_vm_whole_or_gone() {
        let mut table = Vec::new();
        for case in CASES {
            let outcome = run_case(case);
            table.push(format!(
                "{:<8} {:<20} {:<8} {}",
                case.op[0],
                case.point,
                format!("{:?}", case.before).to_lowercase(),
                outcome
            ));
        }
        println!("op       crash point          before   outcome after restart (no leaks)");
        for row in table {
            println!("{row}");
        }
    }

    #[test]
    fn a_vmm_a_record_does_not_know_is_killed_or_keeps_its_disk_locked() {
        let env = KillsLeftovers(BangerEnv::new());
        let env = &env.0;
        env.create(VM, &[]).ok();
        let first = env.show(VM).record.vmm.unwrap().pid;
        let db = env.state_dir().join("banger.db");

        // Stopped on record, but its VMM still runs: reconcile kills it,
        // and the next start boots a new one.
        env.kill_daemon();
        sql(
            &db,
            &format!("UPDATE vms SET state = 'stopped' WHERE name = '{VM}'"),
        );
        env.banger(&["vm", "start", VM]).ok();
        assert!(!pid_alive(first as i32), "the stray VMM survived");
        let second = env.show(VM).record.vmm.unwrap().pid;
        assert_ne!(first, second);
        assert_eq!(vmm_processes(env), BTreeSet::from([second]));

        // A VMM no record names at all (a lost row update): the disk lock
        // it holds refuses a second VMM on the same root disk.
        env.kill_daemon();
        sql(
            &db,
            &format!(
                "UPDATE vms SET state = 'stopped', pid = NULL, pid_start_time = NULL, \
                 api_socket = NULL WHERE name = '{VM}'"
            ),
        );
        let out = env.banger(&["vm", "start", VM]).failed();
        assert!(
            out.stderr
                .contains("rootfs.ext4 is locked by another process"),
            "{}",
            out.stderr
        );
        assert!(pid_alive(second as i32), "the running VMM was disturbed");
        assert_eq!(vmm_processes(env), BTreeSet::from([second]));
        assert_eq!(env.show(VM).record.state, VmState::Error);
    }

    #[test]
    fn a_qemu_vsock_backend_left_by_a_crash_before_qemu_started_is_killed() {
        let env = KillsLeftovers(BangerEnv::new());
        let env = &env.0;
        // Never launched, so no QEMU is needed: only the backend's record.
        env.create(VM, &["--vmm", "qemu", "--no-start"]).ok();
        let vm = env.show(VM);
        env.kill_daemon();

        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut backend = Reaped(
            std::process::Command::new("sleep")
                .arg("300")
                .spawn()
                .unwrap(),
        );
        let pid = backend.0.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let start_time: u64 = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(19)
            .unwrap()
            .parse()
            .unwrap();
        let record = env.root().join(format!(
            "run/banger/vms/{}.sock.vsock-backend.json",
            vm.record.id
        ));
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        std::fs::write(
            &record,
            serde_json::json!({
                "pid": pid,
                "start_time": start_time,
                "uds_path": vm.dir.join("v.sock"),
            })
            .to_string(),
        )
        .unwrap();

        // The next daemon's reconcile kills it (pid and start time match).
        assert_eq!(check_settled(env).unwrap(), "created");
        wait_until(Duration::from_secs(10), "the backend is killed", || {
            backend.0.try_wait().unwrap().is_some()
        });
        assert!(!record.exists(), "its record stays");
    }

    /// A catalog entry for the given sha256 and size.
    type CatalogEntry = fn(&str, usize) -> String;

    /// What a catalog pull of `kind` (`kernel`, `image`) needs: its bundle,
    /// its catalog entry (given sha256 and size) and where it lands.
    fn pull_fixture(kind: &str) -> (Vec<u8>, CatalogEntry, &'static str) {
        use test_infra::http::{Entry, noise, tar_zst};
        if kind == "kernel" {
            let bundle = tar_zst(&[
                Entry::File("vmlinux", &noise(4 << 20)),
                Entry::File("initrd.img", b"initrd bytes"),
                Entry::File(
                    "manifest.toml",
                    b"distro = \"test-distro\"\nversion = \"6.12.7\"\n",
                ),
            ]);
            let entry = |sha: &str, size: usize| {
                format!(
                    "[[kernel]]\nname = \"slow\"\narch = \"x86_64\"\ndistro = \"catalog-distro\"\n\
                     version = \"6.12\"\nurl = \"kernels/slow.tar.zst\"\nsha256 = {sha:?}\n\
                     size = {size}\ndescription = \"test kernel\"\n"
                )
            };
            (bundle, entry, "kernels")
        } else {
            let bundle = tar_zst(&[
                Entry::Dir("./"),
                Entry::File(
                    "manifest.toml",
                    b"kernel = \"fc-6.12\"\ndescription = \"test image\"\n",
                ),
                Entry::File("rootfs.ext4", &noise(4 << 20)),
            ]);
            let entry = |sha: &str, size: usize| {
                format!(
                    "[[image]]\nname = \"slow\"\narch = \"x86_64\"\nurl = \"images/slow.tar.zst\"\n\
                     sha256 = {sha:?}\nsize = {size}\nkernel = \"fc-6.12\"\n\
                     description = \"test image\"\n"
                )
            };
            (bundle, entry, "images")
        }
    }

    /// Kills the daemon while `banger KIND pull slow` is extracting into
    /// staging; the next daemon must sweep the staging and list nothing.
    /// Returns the server (now serving the whole bundle, for a retry) and
    /// where pulls of `kind` land.
    fn crash_mid_pull(
        env: &BangerEnv,
        kind: &str,
    ) -> (test_infra::http::Server, std::path::PathBuf) {
        use test_infra::http::{Reply, Server, sha256};
        let server = Server::start();
        let (bundle, entry, dir) = pull_fixture(kind);
        let catalog = env.root().join(format!("{dir}.toml"));
        std::fs::write(&catalog, entry(&sha256(&bundle), bundle.len())).unwrap();
        env.write_config(&format!(
            "{kind}_catalog_file = {:?}\n{kind}_catalog_url = {:?}\n",
            catalog.display().to_string(),
            server.base
        ));
        // Half the bundle, then nothing: the pull stays mid-extraction.
        let path = format!("/{dir}/slow.tar.zst");
        server.route(
            &path,
            Reply::Stall {
                body: bundle[..bundle.len() / 2].to_vec(),
                claimed: bundle.len(),
            },
        );
        let landing = env.state_dir().join(dir);
        let staging = || {
            names(&landing)
                .into_iter()
                .filter(|n| n.starts_with(".staging-"))
                .collect::<Vec<_>>()
        };
        std::thread::scope(|s| {
            let pull = s.spawn(|| env.banger(&[kind, "pull", "slow"]));
            wait_until(
                Duration::from_secs(30),
                "the pull extracts into staging",
                || !staging().is_empty(),
            );
            env.kill_daemon();
            let out = pull.join().unwrap();
            assert_ne!(out.code, 0, "the {kind} pull outlived its daemon: {out:?}");
        });
        assert!(!staging().is_empty(), "a SIGKILLed daemon cleans nothing");

        let list = env.banger(&[kind, "list"]).ok();
        assert!(staging().is_empty(), "{kind} staging left: {:?}", staging());
        assert!(!list.stdout.contains("slow"), "{}", list.stdout);
        server.route(&path, Reply::Body(bundle));
        (server, landing)
    }

    #[test]
    fn a_daemon_killed_mid_kernel_pull_leaves_no_staging_and_the_pull_works_after() {
        let env = KillsLeftovers(BangerEnv::new());
        let env = &env.0;
        let (_server, kernels) = crash_mid_pull(env, "kernel");
        env.banger(&["kernel", "pull", "slow"]).ok();
        assert_eq!(names(&kernels), BTreeSet::from(["slow".to_string()]));
    }

    #[test]
    fn a_daemon_killed_mid_image_pull_leaves_no_staging_and_no_image() {
        let env = KillsLeftovers(BangerEnv::new());
        let env = &env.0;
        let (_server, images) = crash_mid_pull(env, "image");
        let left: Vec<String> = names(&images)
            .into_iter()
            .filter(|n| n.contains("slow"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// Runs `statement` on the state database with the sqlite3 CLI.
    fn sql(db: &Path, statement: &str) {
        let status = std::process::Command::new("sqlite3")
            .arg(db)
            .arg(statement)
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "sqlite3 (apt package sqlite3) could not run {statement:?}: {status:?}"
        );
    }
}

/// The soak: many create/start/stop/delete cycles against the fake VMM,
/// several VMs at a time, then no leaks and a bounded daemon. Slow (about a
/// minute): `cargo test -p banger-tests --test crash soak -- --ignored --nocapture`.
#[cfg(test)]
mod soak {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use banger_api::model::VmState;
    use test_infra::{BangerEnv, pid_alive};

    const CYCLES: usize = 200;
    const PARALLEL: usize = 4;

    /// (resident set in KiB, open fds) of `pid`.
    fn footprint(pid: i32) -> (u64, usize) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count();
        (rss, fds)
    }

    fn entries(dir: &std::path::Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    #[ignore = "soak: about a minute; run with --ignored"]
    fn two_hundred_cycles_four_at_a_time_leak_nothing_and_keep_the_daemon_bounded() {
        let env = BangerEnv::new();
        // Warm up: the daemon's steady state, not its first allocations.
        env.create("warm", &[]).ok();
        env.banger(&["vm", "delete", "warm"]).ok();
        let daemon = env.daemon_pid().unwrap();
        let (rss0, fds0) = footprint(daemon);
        let started = Instant::now();

        std::thread::scope(|s| {
            for worker in 0..PARALLEL {
                let env = &env;
                s.spawn(move || {
                    for i in (worker..CYCLES).step_by(PARALLEL) {
                        let name = format!("soak-{i}");
                        env.create(&name, &[]).ok();
                        env.banger(&["vm", "stop", &name]).ok();
                        env.banger(&["vm", "start", &name]).ok();
                        assert_eq!(env.show(&name).record.state, VmState::Running);
                        env.banger(&["vm", "delete", &name]).ok();
                    }
                });
            }
        });
        let took = started.elapsed();

        assert_eq!(env.daemon_pid(), Some(daemon), "the daemon restarted");
        assert!(pid_alive(daemon));
        let (rss1, fds1) = footprint(daemon);
        println!(
            "soak: {CYCLES} create/stop/start/delete cycles, {PARALLEL} at a time, in {took:.1?}; \
             daemon RSS {rss0} KiB -> {rss1} KiB, open fds {fds0} -> {fds1}"
        );

        assert!(env.list().is_empty());
        assert!(entries(&env.state_dir().join("vms")).is_empty());
        assert!(entries(&env.root().join("run/banger/vms")).is_empty());
        let root = env.root().display().to_string();
        let stray: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (cmd.contains("fake-firecracker") && cmd.contains(&root) && pid_alive(pid))
                    .then_some(cmd)
            })
            .collect();
        assert!(stray.is_empty(), "VMMs left running: {stray:?}");
        // Descriptors are exact (a leaked disk lock or socket shows up);
        // memory only bounded (allocator arenas grow with concurrency).
        assert!(fds1 <= fds0 + 2, "fds grew {fds0} -> {fds1}");
        assert!(
            rss1 <= rss0 + 64 * 1024,
            "daemon RSS grew {rss0} KiB -> {rss1} KiB over {CYCLES} cycles"
        );
    }
}
