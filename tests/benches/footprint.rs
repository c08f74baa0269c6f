//! The daemon's memory footprint: its resident set idle (started, one API
//! call served, no VM) and with 50 VMs running on the fake firecracker with
//! the default capability set, against the targets of 20 and 40 MiB. Prints
//! VmRSS with its anonymous and file-backed parts and the thread count from
//! `/proc/PID/status`, and the resident set again after the VMs are deleted.
//!
//! As root the bench runs in a private network namespace (see
//! `create_throughput`). `cargo bench -p banger-tests --bench footprint`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used)]

use test_infra::BangerEnv;

mod common;
use common::{default_caps_env, load_average, private_network};

const VMS: usize = 50;
const IDLE_TARGET_MIB: f64 = 20.0;
const LOADED_TARGET_MIB: f64 = 40.0;

/// VmRSS, RssAnon, RssFile (MiB) and Threads of `pid`.
fn status(pid: i32) -> (f64, f64, f64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    (
        mib(field("VmRSS:")),
        mib(field("RssAnon:")),
        mib(field("RssFile:")),
        field("Threads:"),
    )
}

/// Thread names of `pid` with their counts, most first.
fn thread_names(pid: i32) -> String {
    let mut count: std::collections::BTreeMap<String, usize> = Default::default();
    for e in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = std::fs::read_to_string(e.unwrap().path().join("comm")).unwrap_or_default();
        *count.entry(comm.trim().to_string()).or_default() += 1;
    }
    let mut v: Vec<(String, usize)> = count.into_iter().collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v.iter()
        .map(|(n, c)| format!("{n} x{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show(what: &str, pid: i32, target: Option<f64>) -> f64 {
    let (rss, anon, file, threads) = status(pid);
    eprintln!("footprint/{what} threads: {}", thread_names(pid));
    let against = target.map_or(String::new(), |t| {
        format!(", target {t:.0} MiB ({:.2}x)", rss / t)
    });
    println!(
        "footprint/{what}: {rss:6.1} MiB RSS ({anon:.1} anon, {file:.1} file), {threads} threads{against}"
    );
    rss
}

fn main() {
    let where_net = private_network("footprint");
    let env: BangerEnv = default_caps_env();
    env.list();
    let pid = env.daemon_pid().unwrap();
    let profile = test_infra::target_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "footprint/setup: target/{profile} bangerd, fake firecracker, default caps, in {where_net}; load average {}",
        load_average()
    );
    show("idle", pid, Some(IDLE_TARGET_MIB));

    // 50 VMs, eight creates at a time (untimed).
    std::thread::scope(|s| {
        for t in 0..8 {
            let env = &env;
            s.spawn(move || {
                for i in (t..VMS).step_by(8) {
                    env.create(&format!("fp{i}"), &[]).ok();
                }
            });
        }
    });
    assert_eq!(env.list().len(), VMS, "every VM was created");
    show(&format!("{VMS} VMs"), pid, Some(LOADED_TARGET_MIB));

    let names: Vec<String> = (0..VMS).map(|i| format!("fp{i}")).collect();
    let mut args = vec!["vm", "delete"];
    args.extend(names.iter().map(String::as_str));
    env.banger(&args).ok();
    show("after deleting them", pid, None);
}
