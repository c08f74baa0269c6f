//! Many agent connections at once on a real guest (QEMU/TCG, the cached
//! Debian image), on QEMU's default `serial` transport: every stream the
//! host opens reaches the agent's multiplexer at once, 64 streams share one
//! virtio-serial port, and each must come back with its own command's
//! output and exit status. 64 simultaneous `vm ssh --via agent` to one VM
//! must all succeed, or fail with an error naming the VM, and none may
//! hang. (The `vsock` transport's backlog and the daemon's retry of
//! connections the guest kernel resets are unit-tested in
//! `core/vmm/src/vsock.rs`; this test ran on `vsock` until the serial
//! path held such a burst, see docs/agent-exec.md.)
//!
//! Needs what `e2e.rs` needs; skips loudly without it.

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use test_infra::guest_rig::rig;

    const VM: &str = "flood";
    const AT_ONCE: usize = 64;
    /// Far beyond what one command takes, even under TCG: reaching it is a
    /// hang.
    const HANG: Duration = Duration::from_secs(120);

    #[test]
    fn sixty_four_agent_commands_at_once_all_answer_or_name_the_vm_and_none_hangs() {
        let test = "sixty_four_agent_commands_at_once_all_answer_or_name_the_vm_and_none_hangs";
        let Some((rig, _a)) = rig(test, "bookworm", "") else {
            return;
        };
        let vm = rig.create(VM, &["--image", "bookworm"]);
        let env = &rig.env;
        // Warm: the agent answers one command.
        env.banger(&["vm", "ssh", VM, "--via", "agent", "--", "true"])
            .ok();

        let started = Instant::now();
        let mut running: Vec<(usize, std::process::Child)> = (0..AT_ONCE)
            .map(|i| {
                let child = env
                    .command(&test_infra::workspace_bin("banger"))
                    .args(["vm", "ssh", VM, "--via", "agent", "--", "echo"])
                    .arg(format!("n{i}"))
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                (i, child)
            })
            .collect();
        let mut failures = Vec::new();
        let mut slowest = Duration::ZERO;
        // Polling child processes: nothing to block on for several at once.
        while !running.is_empty() {
            if started.elapsed() > HANG {
                for (_, c) in &mut running {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!(
                    "{} agent commands hung for more than {HANG:?}",
                    running.len()
                );
            }
            let mut still = Vec::new();
            for (i, mut c) in running {
                if c.try_wait().unwrap().is_none() {
                    still.push((i, c));
                    continue;
                }
                slowest = started.elapsed();
                let out = c.wait_with_output().unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                if out.status.success() {
                    assert_eq!(stdout.trim(), format!("n{i}"), "{stderr}");
                } else {
                    assert!(
                        stderr.contains(VM),
                        "a failure that does not name the VM: {stderr}"
                    );
                    failures.push(stderr);
                }
            }
            running = still;
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "{AT_ONCE} agent commands at once: {} ok, {} failed, the last done after {slowest:.1?}",
            AT_ONCE - failures.len(),
            failures.len(),
        );
        if !failures.is_empty() {
            // What the guest and the daemon were doing, for the reader.
            let console = env.banger(&["vm", "logs", VM]).stdout;
            let tail: Vec<&str> = console.lines().rev().take(60).collect();
            let log = std::fs::read_to_string(env.state_dir().join("bangerd.log"));
            eprintln!(
                "console tail:\n{}\ndaemon log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                log.unwrap_or_default()
            );
        }
        assert!(failures.is_empty(), "{failures:#?}");
        rig.delete_all_and_check_clean(&[vm]);
    }
}
