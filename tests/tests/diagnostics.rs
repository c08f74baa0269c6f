//! Lifecycle diagnostics through the real CLI and daemon: a VMM that exits
//! while a start waits on its guest fails the start at once, quoting its
//! exit status and its last log lines (the fake firecracker, and a real
//! QEMU whose guest panics); every stage's duration in the daemon log and
//! the last start's in `vm show`, across a daemon restart; a `.vm` DNS
//! address another process holds is a warning on `vm create` and a
//! `doctor` failure.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use banger_api::model::{StartTimings, VmState};
    use test_infra::{BangerEnv, Run, workspace_bin};

    /// The agent wait these tests configure: far above what they allow, so
    /// a start that waits it out fails them.
    const AGENT_TIMEOUT_SECS: u64 = 120;

    fn both(r: &Run) -> String {
        format!("{}{}", r.stdout, r.stderr)
    }

    /// Fake firecracker VMs with the agent (waited for up to
    /// [`AGENT_TIMEOUT_SECS`]) and a work disk.
    fn agent_waiting_env() -> BangerEnv {
        let env = BangerEnv::new();
        env.write_config(&format!(
            "default_caps = [\"work-disk\", \"vsock-agent\"]\nagent_timeout_secs = {AGENT_TIMEOUT_SECS}\n"
        ));
        env
    }

    /// `vm create NAME` must fail well before the agent timeout; its output.
    fn create_fails_at_once(env: &BangerEnv, name: &str) -> String {
        let began = Instant::now();
        let r = env.create(name, &[]).failed();
        let took = began.elapsed();
        let text = both(&r);
        assert!(
            took < Duration::from_secs(10),
            "the create took {took:?} (agent timeout {AGENT_TIMEOUT_SECS}s):\n{text}"
        );
        text
    }

    /// `names` appear in `t`'s stages in this order (others may lie between).
    fn assert_in_order(t: &StartTimings, names: &[&str]) {
        let stages: Vec<&str> = t.stages.iter().map(|s| s.stage.as_str()).collect();
        let mut at = 0;
        for n in names {
            match stages[at..].iter().position(|s| s == n) {
                Some(i) => at += i + 1,
                None => panic!("stage {n} missing or out of order in {stages:?}"),
            }
        }
    }

    fn assert_within_total(t: &StartTimings) {
        let sum: u64 = t.stages.iter().map(|s| s.ms).sum();
        assert!(sum <= t.total_ms, "stages sum to {sum} ms > total: {t:?}");
    }

    #[test]
    fn a_firecracker_exiting_during_the_agent_wait_fails_the_create_at_once() {
        let mut env = agent_waiting_env();
        // No fake agent: only the exit can end the wait early.
        env.set_env("FAKE_FC_EXIT_AFTER_START", "1:1000");
        let text = create_fails_at_once(&env, "doomed");
        assert!(text.contains("exited with exit status: 1"), "{text}");
        assert!(
            text.contains("KVM_EXIT_INTERNAL_ERROR, exiting with 1 (FAKE_FC_EXIT_AFTER_START)"),
            "the message quotes the VMM's own last words:\n{text}"
        );
        assert!(
            !text.contains("did not answer /healthz within"),
            "the agent is not blamed:\n{text}"
        );

        let v = env.show("doomed");
        assert_eq!(v.record.state, VmState::Error);
        let f = v.record.last_error.expect("a failure is recorded");
        assert_eq!(f.stage, "post_start:vsock-agent");
        assert!(f.cause.contains("exit status: 1"), "{}", f.cause);
        assert!(f.cause.contains("FAKE_FC_EXIT_AFTER_START"), "{}", f.cause);
        assert!(
            v.record.prepared.is_empty(),
            "rolled back: {:?}",
            v.record.prepared
        );
        assert!(v.record.vmm.is_none());
        let shown = env.banger(&["vm", "show", "doomed"]).ok();
        assert!(shown.stdout.contains("exit status: 1"), "{}", shown.stdout);

        // The failed start's stages are kept, rollback included.
        let t = v.record.last_start.expect("the failed start's timings");
        assert!(!t.ok);
        assert_in_order(&t, &["launch_vmm", "post_start:vsock-agent", "rollback"]);
        assert_within_total(&t);
    }

    #[test]
    fn an_agent_that_says_it_cannot_be_reached_fails_the_create_at_once_and_not_the_next_start() {
        let mut env = agent_waiting_env();
        // What the agent prints under QEMU's serial transport when the
        // kernel has no virtio_console; no fake agent ever answers.
        let reason = "no virtio-serial port \"banger.agent\" appeared within 5s (fake)";
        env.set_env(
            "FAKE_FC_CONSOLE",
            &format!("{}{reason}", banger_guest_protocol::api::UNREACHABLE_MARK),
        );
        let text = create_fails_at_once(&env, "mute");
        assert!(text.contains(reason), "the guest's own reason:\n{text}");
        assert!(text.contains("banger vm logs mute"), "{text}");
        assert!(!text.contains("did not answer /healthz within"), "{text}");
        let v = env.show("mute");
        assert_eq!(v.record.state, VmState::Error);
        let f = v.record.last_error.expect("a failure is recorded");
        assert_eq!(f.stage, "post_start:vsock-agent");
        assert!(v.record.vmm.is_none(), "the VMM was stopped");

        // The fixed guest starts: the old line in the same console log is
        // not this start's. (The daemon hands its environment to the VMMs:
        // restart it.)
        env.banger(&["daemon", "stop"]).ok();
        env.set_env("FAKE_FC_CONSOLE", "");
        env.set_env("FAKE_FC_AGENT", "1");
        env.banger(&["vm", "start", "mute"]).ok();
        assert_eq!(env.show("mute").record.state, VmState::Running);
        let console = env.banger(&["vm", "logs", "mute"]).ok().stdout;
        assert!(
            console.contains(reason),
            "the old line is still there:\n{console}"
        );
    }

    #[test]
    fn a_vmm_that_fails_after_the_start_leaves_the_vm_in_error_with_its_report() {
        let mut env = BangerEnv::new();
        // Long enough for the create to finish: the VM is running first.
        env.set_env("FAKE_FC_EXIT_AFTER_START", "3:1500");
        env.create("dies", &[]).ok();
        assert_eq!(env.show("dies").record.state, VmState::Running);
        test_infra::wait_until(
            Duration::from_secs(20),
            "the daemon notices the exit",
            || env.show("dies").record.state != VmState::Running,
        );
        let v = env.show("dies");
        assert_eq!(v.record.state, VmState::Error);
        let f = v.record.last_error.expect("the failure is recorded");
        assert_eq!(f.stage, "vmm_exit");
        assert!(f.cause.contains("exit status: 3"), "{}", f.cause);
        assert!(f.cause.contains("while the VM was running"), "{}", f.cause);
        assert!(f.cause.contains("FAKE_FC_EXIT_AFTER_START"), "{}", f.cause);
        assert!(
            v.record.prepared.is_empty(),
            "torn down: {:?}",
            v.record.prepared
        );

        // A guest that shuts itself down (exit 0) is a plain stop. (The
        // daemon hands its environment to the VMMs: restart it.)
        env.banger(&["daemon", "stop"]).ok();
        env.set_env("FAKE_FC_EXIT_AFTER_START", "0:1500");
        env.create("halts", &[]).ok();
        test_infra::wait_until(
            Duration::from_secs(20),
            "the daemon notices the exit",
            || env.show("halts").record.state != VmState::Running,
        );
        let v = env.show("halts");
        assert_eq!(v.record.state, VmState::Stopped);
        assert_eq!(v.record.last_error, None);
    }

    #[test]
    fn a_qemu_whose_guest_panics_fails_the_create_at_once_with_the_console() {
        const TEST: &str = "a_qemu_whose_guest_panics_fails_the_create_at_once";
        let artifacts = test_infra::guest_artifacts::GuestArtifacts::find();
        let (qemu, vhost) = match &artifacts {
            Ok(a) => (a.qemu.clone(), a.vhost.clone()),
            Err(why) => {
                eprintln!("SKIP {TEST}: {why}");
                return;
            }
        };
        let Some(kernel_dir) = test_infra::guest_artifacts::newest("kernel", "vmlinux") else {
            eprintln!("SKIP {TEST}: no guest kernel in ~/.cache/banger-ci");
            return;
        };
        let env = BangerEnv::new();
        env.write_config(&format!(
            "vmm = \"qemu\"\nqemu_bin = {:?}\nvhost_device_vsock_bin = {:?}\n\
             default_caps = [\"work-disk\", \"vsock-agent\"]\nagent_timeout_secs = {AGENT_TIMEOUT_SECS}\n",
            qemu.display().to_string(),
            vhost.display().to_string(),
        ));
        // cargo's dynamically linked agent cannot run as /init: the kernel
        // panics ("No working init found"), and with panic=1 and
        // -no-reboot QEMU exits, as in the issue.
        let agent = format!(
            "vsock-agent:agent={}",
            workspace_bin("banger-agent").display()
        );
        let kernel = kernel_dir.join("vmlinux").display().to_string();
        let began = Instant::now();
        let (_, rootfs) = env.boot_files();
        let rootfs = rootfs.display().to_string();
        let r = env
            .banger(&[
                "vm",
                "create",
                "--name",
                "panics",
                "--kernel",
                &kernel,
                "--rootfs",
                &rootfs,
                "--disk-size",
                "64M",
                "--cap",
                &agent,
            ])
            .failed();
        let took = began.elapsed();
        let text = both(&r);
        assert!(
            took < Duration::from_secs(60),
            "the create took {took:?} (agent timeout {AGENT_TIMEOUT_SECS}s):\n{text}"
        );
        assert!(text.contains("The VMM (qemu, pid"), "{text}");
        assert!(text.contains("exited with exit status: 0"), "{text}");
        assert!(
            text.contains("No working init found"),
            "the console's last lines are quoted:\n{text}"
        );
        let v = env.show("panics");
        assert_eq!(v.record.state, VmState::Error);
        assert_eq!(
            v.record.last_error.map(|f| f.stage).as_deref(),
            Some("post_start:vsock-agent")
        );
        assert!(v.record.vmm.is_none() && v.record.prepared.is_empty());
    }

    #[test]
    fn a_qemu_that_exits_before_it_is_ready_is_quoted_with_its_status() {
        let env = BangerEnv::new();
        let wrapper = env.root().join("qemu-wrapper");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\necho 'wrapper: cannot set up the machine' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        env.write_config(&format!(
            "vmm = \"qemu\"\nqemu_bin = {:?}\n",
            wrapper.display().to_string()
        ));
        let began = Instant::now();
        let r = env.create("wrapped", &[]).failed();
        let text = both(&r);
        assert!(began.elapsed() < Duration::from_secs(10), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(
            text.contains("wrapper: cannot set up the machine"),
            "{text}"
        );
        assert_eq!(env.show("wrapped").record.state, VmState::Error);
    }

    /// A UDP socket on `addr` taken the way banger's DNS server takes the
    /// bridge address: with `IP_FREEBIND`, before the address exists.
    fn squat_freebind(addr: std::net::SocketAddrV4) -> std::net::UdpSocket {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, setsockopt, socket, sockopt,
        };
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, sockopt::IpFreebind, &true).unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::from(addr)).unwrap();
        std::net::UdpSocket::from(fd)
    }

    /// `banger doctor --json`'s `dns` check.
    fn doctor_dns(env: &BangerEnv) -> (i32, serde_json::Value) {
        let r = env.banger(&["doctor", "--json"]);
        let checks: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        let dns = checks
            .into_iter()
            .find(|c| c["check"] == "dns")
            .unwrap_or_else(|| panic!("no dns check in {}", r.stdout));
        (r.code, dns)
    }

    fn networked_config(network: &str) -> String {
        format!("default_caps = [\"work-disk\", \"network\", \"dns\"]\n[network]\n{network}\n")
    }

    #[test]
    fn a_dns_port_another_process_holds_is_a_create_warning_and_a_doctor_failure() {
        const TEST: &str = "a_dns_port_another_process_holds_is_a_create_warning";
        test_infra::in_netns(TEST, &[], || {
            // This test process plays the other daemon.
            let squatter = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = squatter.local_addr().unwrap().port();
            let env = BangerEnv::new();
            env.write_config(&networked_config(&format!("dns_port = {port}")));
            let r = env.create("squatted", &[]).ok();
            let text = both(&r);
            let addr = format!("127.0.0.1:{port}");
            let me = format!("pid {}", std::process::id());
            let warning = text
                .lines()
                .find(|l| l.contains(&format!("no .vm DNS on {addr}")))
                .unwrap_or_else(|| panic!("no warning naming {addr}:\n{text}"));
            assert!(warning.contains(&me), "names the holder: {warning}");
            assert!(warning.contains("dns_port"), "names the fix: {warning}");

            let (code, dns) = doctor_dns(&env);
            assert_ne!(code, 0, "{dns}");
            assert_eq!(dns["status"], "fail", "{dns}");
            let detail = dns["detail"].as_str().unwrap();
            assert!(detail.contains(&addr) && detail.contains(&me), "{detail}");
            assert!(dns["fix"].as_str().unwrap().contains("dns_port"), "{dns}");

            // Once the other holder is gone, a restarted daemon takes it.
            drop(squatter);
            env.banger(&["daemon", "stop"]).ok();
            let r = env.create("served", &[]).ok();
            assert!(!both(&r).contains("no .vm DNS"), "{}", both(&r));
            let (_, dns) = doctor_dns(&env);
            assert_eq!(dns["status"], "pass", "{dns}");
        });
    }

    #[test]
    fn a_bridge_address_another_process_holds_is_a_create_warning_and_a_doctor_failure() {
        const TEST: &str = "a_bridge_address_another_process_holds_is_a_create_warning";
        test_infra::in_netns(TEST, &[], || {
            let gateway = std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(10, 213, 7, 1), 53);
            let squatter = squat_freebind(gateway);
            let env = BangerEnv::new();
            env.write_config(&networked_config(&format!(
                "subnet = \"10.213.7.0/24\"\ndns_port = {}",
                test_infra::guest_rig::free_udp_port()
            )));
            let r = env.create("squatted", &[]).ok();
            let text = both(&r);
            let warning = text
                .lines()
                .find(|l| l.contains("no .vm DNS on 10.213.7.1:53"))
                .unwrap_or_else(|| panic!("no warning naming the bridge address:\n{text}"));
            assert!(
                warning.contains(&format!("pid {}", std::process::id())),
                "{warning}"
            );
            assert!(warning.contains("set subnet"), "{warning}");

            let (code, dns) = doctor_dns(&env);
            assert_ne!(code, 0);
            assert_eq!(dns["status"], "fail", "{dns}");
            assert!(
                dns["detail"].as_str().unwrap().contains("10.213.7.1:53"),
                "{dns}"
            );
            assert!(dns["fix"].as_str().unwrap().contains("subnet"), "{dns}");
            drop(squatter);
        });
    }

    #[test]
    fn every_stage_is_timed_in_the_log_and_the_last_start_survives_a_restart() {
        let env = BangerEnv::new();
        env.create("timed", &[]).ok();
        let v = env.show("timed");
        assert_eq!(v.record.state, VmState::Running);
        let t = v.record.last_start.clone().expect("timings of the start");
        assert!(t.ok);
        assert!(t.at >= v.record.created_at);
        assert_in_order(
            &t,
            &[
                "prepare_host:work-disk",
                "configure_machine:work-disk",
                "guest_config:work-disk",
                "config_drive",
                "launch_vmm",
                "post_start:work-disk",
            ],
        );
        assert_within_total(&t);

        let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
        for stage in [
            "validate",
            "clone_rootfs",
            "launch_vmm",
            "post_start:work-disk",
        ] {
            let line = format!("vm=timed op=create stage={stage} took=");
            assert!(log.contains(&line), "no {line:?} in the daemon log:\n{log}");
        }
        assert!(log.contains("vm=timed op=create total took="), "{log}");
        // A log file, not a terminal: no colour escapes around the fields.
        assert!(!log.contains('\x1b'), "escape codes in bangerd.log:\n{log}");

        // `vm show` prints the block; it survives the daemon.
        let shown = env.banger(&["vm", "show", "timed"]).ok().stdout;
        assert!(shown.contains("last start:"), "{shown}");
        let launch = t.stages.iter().find(|s| s.stage == "launch_vmm").unwrap();
        assert!(
            shown
                .lines()
                .any(|l| l.contains("launch_vmm") && l.contains(&format!("{} ms", launch.ms))),
            "{shown}"
        );
        env.banger(&["daemon", "stop"]).ok();
        let again = env.show("timed");
        assert_eq!(again.record.last_start, Some(t.clone()));

        // A stop logs its stages under its own operation; the next start
        // replaces the kept timings.
        env.banger(&["vm", "stop", "timed"]).ok();
        env.banger(&["vm", "start", "timed"]).ok();
        let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
        assert!(
            log.contains("vm=timed op=stop stage=shutdown took="),
            "{log}"
        );
        assert!(
            log.contains("vm=timed op=start stage=launch_vmm took="),
            "{log}"
        );
        let next = env.show("timed").record.last_start.unwrap();
        assert!(next.ok);
        assert_ne!(next, t, "the second start's timings replace the first's");
    }
}
