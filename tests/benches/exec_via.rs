//! A command through the guest agent against the same command over ssh, on
//! the same guest image, in the same run (docs/agent-exec.md).
//!
//! Setup (untimed): the e2e rig (`test_infra::guest_rig`) with the recipes'
//! Debian systemd image (it has sshd, so both paths can run). Then, in
//! alternating rounds (`BANGER_BENCH_ROUNDS`, default 3):
//!
//! - `vm run --rm --via agent -- true` and `vm run --rm --via ssh -- true`:
//!   create, wait for the path (the agent answered before create returns;
//!   ssh waits for sshd), the command, the delete, end to end;
//! - on one running VM, `vm ssh --via agent NAME -- true` and
//!   `vm ssh --via ssh NAME -- true`: the command alone.
//!
//! Every command must exit 0. Prints each round, the medians and the ratios.
//! `cargo bench -p banger-tests --bench exec_via`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use test_infra::guest_rig::rig;

const DEFAULT_ROUNDS: usize = 3;

fn rounds() -> usize {
    std::env::var("BANGER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_ROUNDS)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let Some((rig, _a)) = rig(
        "bench_exec_via",
        "bookworm",
        &test_infra::guest_artifacts::bench_transport_config(),
    ) else {
        return;
    };
    let env = &rig.env;
    let timed = |args: &[&str]| {
        let started = Instant::now();
        let out = env.banger(args);
        let took = started.elapsed();
        assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
        took
    };
    let shape = [
        "--memory",
        "1024",
        "--disk-size",
        "256M",
        "--image",
        "bookworm",
    ];
    let run_rm = |via: &str| {
        let mut args = vec!["vm", "run", "--rm", "--via", via];
        args.extend_from_slice(&shape);
        args.extend_from_slice(&["--", "true"]);
        timed(&args)
    };
    let (mut run_agent, mut run_ssh) = (Vec::new(), Vec::new());
    for round in 1..=rounds() {
        let a = run_rm("agent");
        let s = run_rm("ssh");
        println!(
            "round {round}: vm run --rm -- true  agent {:.2}s  ssh {:.2}s",
            a.as_secs_f64(),
            s.as_secs_f64()
        );
        run_agent.push(a);
        run_ssh.push(s);
    }

    // The command alone, on one running VM (sshd up: the first ssh waits).
    let mut args = vec!["vm", "run", "-d", "--name", "warm", "--via", "ssh"];
    args.extend_from_slice(&shape);
    timed(&args);
    let (mut cmd_agent, mut cmd_ssh) = (Vec::new(), Vec::new());
    for round in 1..=rounds() {
        let a = timed(&["vm", "ssh", "--via", "agent", "warm", "--", "true"]);
        let s = timed(&["vm", "ssh", "--via", "ssh", "warm", "--", "true"]);
        println!(
            "round {round}: vm ssh NAME -- true   agent {:.3}s  ssh {:.3}s",
            a.as_secs_f64(),
            s.as_secs_f64()
        );
        cmd_agent.push(a);
        cmd_ssh.push(s);
    }
    timed(&["vm", "delete", "warm"]);

    println!(
        "exec_via: the agent over {} (BANGER_BENCH_TRANSPORT)",
        test_infra::guest_artifacts::bench_transport()
    );
    let (ra, rs) = (median(run_agent), median(run_ssh));
    let (ca, cs) = (median(cmd_agent), median(cmd_ssh));
    println!(
        "median vm run --rm -- true: agent {:.2}s, ssh {:.2}s: agent takes {:.2}x the ssh time",
        ra.as_secs_f64(),
        rs.as_secs_f64(),
        ra.as_secs_f64() / rs.as_secs_f64()
    );
    println!(
        "median vm ssh NAME -- true: agent {:.3}s, ssh {:.3}s: agent takes {:.2}x the ssh time",
        ca.as_secs_f64(),
        cs.as_secs_f64(),
        ca.as_secs_f64() / cs.as_secs_f64()
    );
}
