//! What several benches share: the default capability set against the fake
//! firecracker in a private network namespace, load averages, medians.

#![allow(dead_code)]

use std::time::Duration;

use test_infra::BangerEnv;

/// The config line for the default capability set.
pub const DEFAULT_CAPS: &str =
    "default_caps = [\"work-disk\", \"network\", \"dns\", \"file-sync\", \"vsock-agent\"]";

/// Moves this process (call it before any thread starts) into a private
/// network namespace with loopback up, so the network capability's bridge,
/// taps and nft rules stay off the host. Returns where the network runs;
/// without root it stays on the host's network and says so.
pub fn private_network(bench: &str) -> &'static str {
    // SAFETY: unshare only changes this process's namespaces; no other
    // thread exists yet, so every later thread and child inherits it.
    let moved = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0
        && std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
    if moved {
        "a private network namespace"
    } else {
        eprintln!(
            "note {bench}: cannot make a network namespace (not root, or no iproute2); the network capability uses the host's bridge"
        );
        "the host's network"
    }
}

/// A daemon against the fake firecracker with the default capabilities; the
/// fake answers the vsock agent's `/healthz`.
pub fn default_caps_env() -> BangerEnv {
    let mut env = BangerEnv::new();
    env.write_config(DEFAULT_CAPS);
    env.set_env("FAKE_FC_AGENT", "1");
    env.banger(&["daemon", "start"]).ok();
    env
}

/// The 1/5/15-minute load averages: 2 shared cores make timings noisy.
pub fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The median, in seconds (0 for none).
pub fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, Duration::as_secs_f64)
}
