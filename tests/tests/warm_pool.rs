//! The warm pool (`docs/warm-pool.md`) through the real CLI and daemon,
//! against the fake firecracker: a create of the default shape takes the
//! pooled VM without booting, the pool refills, other shapes boot, the
//! pool is the daemon's (not listed, not found by name) and lives as long
//! as its daemon. The real-guest speed is `cargo bench --bench snapshot`.

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use banger_api::api::{PoolView, VmView};
    use banger_api::model::VmState;
    use test_infra::{BangerEnv, pid_alive, wait_until};

    /// The default shape of these tests: the env's boot files registered
    /// as image `mine`, a 64M work disk.
    const SHAPE: &str = "default_image_name = \"mine\"\n[vm_defaults]\ndisk_size = \"64M\"\n";

    /// An env with the pool on, its daemon started on that config, and
    /// the pooled VM once it runs.
    fn pooled_env() -> (BangerEnv, VmView) {
        let env = BangerEnv::new();
        env.register_boot_files("mine");
        env.write_config(&format!("warm_pool = 1\n{SHAPE}"));
        // `image register` started the daemon on the config before.
        env.banger(&["daemon", "stop"]).ok();
        let vm = ready(&env, 1).vms.remove(0);
        (env, vm)
    }

    fn pool(env: &BangerEnv) -> PoolView {
        let out = env.banger(&["vm", "pool", "--json"]).ok();
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// Waits until the pool holds `n` running VMs; returns it.
    fn ready(env: &BangerEnv, n: usize) -> PoolView {
        let mut last = None;
        wait_until(
            Duration::from_secs(60),
            &format!("the warm pool holds {n} running VM(s)"),
            || {
                let p = pool(env);
                let running = p
                    .vms
                    .iter()
                    .filter(|v| v.record.state == VmState::Running)
                    .count();
                let done = running == n && p.vms.len() == n;
                last = Some(p);
                done
            },
        );
        last.unwrap()
    }

    /// `vm create` with `args`; the VM it printed, by `vm show`.
    fn create(env: &BangerEnv, args: &[&str]) -> (VmView, String) {
        let mut all = vec!["vm", "create"];
        all.extend_from_slice(args);
        let out = env.banger(&all).ok();
        let name = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| panic!("no name in {out:?}"));
        (env.show(&name), out.stderr)
    }

    #[test]
    fn a_create_of_the_default_shape_takes_the_pooled_vm_and_the_pool_refills() {
        let (env, first) = pooled_env();
        let pooled_pid = first.record.vmm.as_ref().unwrap().pid;
        // The pool's VM is the daemon's: not listed, not found by name.
        assert!(env.list().is_empty(), "{:?}", env.list());
        let shown = env
            .banger(&["vm", "show", first.record.name.as_str()])
            .failed();
        assert!(shown.stderr.contains("No VM named"), "{shown:?}");
        let human = env.banger(&["vm", "pool"]).ok();
        assert!(
            human.stdout.contains("1 of 1 ready")
                && human.stdout.contains(first.record.name.as_str()),
            "{human:?}"
        );

        // A create of the default shape takes it, VMM and all.
        let (taken, stderr) = create(&env, &[]);
        assert_eq!(taken.record.id, first.record.id, "{stderr}");
        assert_eq!(taken.record.state, VmState::Running);
        assert_eq!(taken.record.vmm.as_ref().unwrap().pid, pooled_pid);
        assert!(stderr.contains("warm pool"), "{stderr}");
        assert!(
            !stderr.contains("launch_vmm"),
            "a taken VM boots nothing: {stderr}"
        );
        let listed: Vec<_> = env.list().into_iter().map(|v| v.record.id).collect();
        assert_eq!(listed, vec![first.record.id.clone()]);

        // The pool refills with a new VM.
        let second = ready(&env, 1).vms.remove(0);
        assert_ne!(second.record.id, first.record.id);

        // A name, or another shape, boots as ever and leaves the pool be.
        let (named, stderr) = create(&env, &["--name", "web"]);
        assert_ne!(named.record.id, second.record.id);
        assert!(stderr.contains("launch_vmm"), "{stderr}");
        let (bigger, stderr) = create(&env, &["--vcpu", "3"]);
        assert_eq!(bigger.record.spec.vcpus, 3);
        assert!(stderr.contains("launch_vmm"), "{stderr}");
        let p = pool(&env);
        assert_eq!(p.vms.len(), 1);
        assert_eq!(p.vms[0].record.id, second.record.id);

        // The pool lives as long as its daemon; the user's VMs outlive it.
        let second_pid = second.record.vmm.as_ref().unwrap().pid as i32;
        let second_dir = second.dir.clone();
        env.banger(&["daemon", "stop"]).ok();
        assert!(!pid_alive(second_pid), "the pooled VM's VMM still runs");
        assert!(!second_dir.exists(), "{} is left", second_dir.display());
        for vm in [&taken, &named, &bigger] {
            assert!(pid_alive(vm.record.vmm.as_ref().unwrap().pid as i32));
        }
        let names: Vec<String> = env
            .list()
            .into_iter()
            .map(|v| v.record.name.to_string())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
    }

    /// A refill whose guest never answers (a fake firecracker without an
    /// agent, behind `vsock-agent` with a long timeout) is cut short by a
    /// graceful stop, within `daemon stop`'s own wait, and what it had made
    /// is deleted.
    #[test]
    fn a_daemon_stop_cuts_a_hanging_refill_short_and_leaves_nothing() {
        let env = BangerEnv::new();
        env.register_boot_files("mine");
        env.write_config(&format!(
            "default_caps = [\"work-disk\", \"vsock-agent\"]\nagent_timeout_secs = 300\n\
             warm_pool = 1\n{SHAPE}"
        ));
        env.banger(&["daemon", "stop"]).ok();
        wait_until(Duration::from_secs(30), "a refill is under way", || {
            let p = pool(&env);
            p.vms.len() == 1 && p.vms[0].record.vmm.is_some()
        });
        let began = std::time::Instant::now();
        env.banger(&["daemon", "stop"]).ok();
        let took = began.elapsed();
        assert!(took < Duration::from_secs(30), "daemon stop took {took:?}");
        let left = test_infra::processes_in(env.root());
        assert!(left.is_empty(), "processes left: {left:?}");
        let dirs = env.vm_dirs();
        assert!(dirs.is_empty(), "{dirs:?}");
    }

    #[test]
    fn a_pool_left_by_a_killed_daemon_is_deleted_by_the_next() {
        let (env, left) = pooled_env();
        env.kill_daemon();
        let pid = left.record.vmm.as_ref().unwrap().pid as i32;
        assert!(pid_alive(pid));

        // The next daemon, with the pool off, deletes it.
        env.write_config(SHAPE);
        let p = pool(&env);
        assert_eq!(p.size, 0);
        wait_until(
            Duration::from_secs(30),
            "the old pooled VM is deleted",
            || pool(&env).vms.is_empty() && !pid_alive(pid) && !left.dir.exists(),
        );
        assert!(env.list().is_empty());
        let human = env.banger(&["vm", "pool"]).ok();
        assert!(human.stdout.contains("warm pool: off"), "{human:?}");
    }

    #[test]
    fn a_pooled_vm_whose_vmm_died_is_not_taken_but_replaced() {
        let (env, dead) = pooled_env();
        let pid = dead.record.vmm.as_ref().unwrap().pid as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(Duration::from_secs(10), "the pooled VMM dies", || {
            !pid_alive(pid)
        });
        let (vm, stderr) = create(&env, &[]);
        assert_ne!(vm.record.id, dead.record.id);
        assert!(stderr.contains("launch_vmm"), "{stderr}");
        // The refill this create woke deletes the dead one and boots anew.
        wait_until(
            Duration::from_secs(60),
            "a new pooled VM replaces the dead one",
            || {
                let p = pool(&env);
                p.vms.len() == 1
                    && p.vms[0].record.id != dead.record.id
                    && p.vms[0].record.state == VmState::Running
            },
        );
        assert!(!dead.dir.exists(), "{} is left", dead.dir.display());
    }

    #[test]
    fn deleting_the_pools_image_deletes_its_vms_instead_of_refusing() {
        let (env, pooled) = pooled_env();
        let pid = pooled.record.vmm.as_ref().unwrap().pid as i32;
        // A VM of the user's still holds the image.
        let (mine, _) = create(&env, &["--name", "kept"]);
        let refused = env.banger(&["image", "delete", "mine"]).failed();
        let said = format!("{}{}", refused.stdout, refused.stderr);
        assert!(
            said.contains("used by kept") && !said.contains(pooled.record.name.as_str()),
            "{refused:?}"
        );
        assert!(pid_alive(pid));
        env.banger(&["vm", "delete", mine.record.name.as_str()])
            .ok();
        env.banger(&["image", "delete", "mine"]).ok();
        assert!(
            !pid_alive(pid),
            "the pooled VM of a deleted image still runs"
        );
        assert!(pool(&env).vms.is_empty());
    }

    /// The pool boots only from what is here: on a fresh host it waits
    /// for the first run to fetch the catalog's default image, rather than
    /// building it a second time beside that run.
    #[test]
    fn a_refill_fetches_nothing() {
        let env = BangerEnv::new();
        env.write_config("warm_pool = 1\n[vm_defaults]\ndisk_size = \"64M\"\n");
        let mut why = String::new();
        wait_until(Duration::from_secs(30), "the first refill fails", || {
            why = pool(&env).last_error.unwrap_or_default();
            !why.is_empty()
        });
        assert!(why.contains("is not here yet"), "{why}");
        let builds = env.root().join("cache/banger/builds");
        let started: Vec<_> = std::fs::read_dir(&builds)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(started.is_empty(), "the pool started a build: {started:?}");
    }

    #[test]
    fn a_refill_that_fails_says_why_and_the_next_create_of_its_shape_retries() {
        let env = BangerEnv::new();
        // The default image does not exist yet when the daemon starts.
        env.write_config(&format!("warm_pool = 1\n{SHAPE}"));
        let mut last = None;
        wait_until(Duration::from_secs(30), "the first refill fails", || {
            let p = pool(&env);
            let failed = p.last_error.is_some();
            last = Some(p);
            failed
        });
        let p = last.unwrap();
        let why = p.last_error.as_deref().unwrap_or_default();
        assert!(why.contains("image mine is not here yet"), "{why}");
        assert!(p.vms.is_empty(), "a failed refill leaves no VM: {p:?}");
        let human = env.banger(&["vm", "pool"]).ok();
        assert!(
            human.stdout.contains("0 of 1 ready") && human.stdout.contains("last refill failed"),
            "{human:?}"
        );

        // With the image there, a create of the pool's shape boots (the
        // pool is empty) and wakes the refill, which now succeeds.
        env.register_boot_files("mine");
        let (vm, stderr) = create(&env, &[]);
        assert!(stderr.contains("launch_vmm"), "{stderr}");
        let p = ready(&env, 1);
        assert_ne!(p.vms[0].record.id, vm.record.id);
        assert_eq!(p.last_error, None);
    }
}
