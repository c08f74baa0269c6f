//! Host-side create throughput against the fake firecracker with the default
//! capability set (work-disk, network, dns, file-sync, vsock-agent; the
//! fake answers the agent's `/healthz` on its vsock socket): the same number
//! of `banger vm create`s issued one at a time and 32 at a time, through the
//! real CLI and daemon. Prints creates/s for both, their ratio (the baseline
//! is the sequential run, measured in the same process), and where one
//! create's time goes: each daemon stage from the moment the CLI printed it
//! (`==> STAGE: ...`, streamed as the daemon reaches it) to the next one,
//! and the daemon's own measure of each stage (the `stage=S took=Nms` lines
//! of `bangerd.log`), which leaves out the CLI and the progress stream.
//!
//! All of it runs twice: with its state on `/tmp`, then on a fresh ext4
//! with `mkfs.ext4`'s defaults (a journal) on a loop device, each pass
//! naming its filesystem; without a journal, ext4 makes every new file
//! dearer the more were deleted in the last minutes. Each pass also times
//! creates from an image whose spare root disk is ready, one at a time.
//!
//! The network capability needs root, a bridge and nft rules: as root the
//! bench moves itself into a private network namespace first (the daemon
//! and its VMMs inherit it), so the host's bridge and rules are untouched.
//! Otherwise it runs on the host's network and says so.
//!
//! `cargo build --release --workspace && cargo bench -p banger-tests --bench create_throughput`

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use test_infra::{BangerEnv, workspace_bin};

mod common;
use common::{
    ScratchExt4, default_caps_env_in, describe_fs, load_average, median, private_network,
};

const CREATES: usize = 32;
/// Rounds of each concurrency, interleaved (1, 32, 1, 32, ...) so a change
/// in the machine's load hits both alike; a round is short (about a second
/// or two), and other processes swing one round by a third.
const ROUNDS: usize = 3;

/// One create as the CLI saw it.
struct Timed {
    total: Duration,
    /// CLI start, API round trip and the daemon before its first stage.
    before_first: Duration,
    /// Each stage until the next began (the last until the CLI exited).
    stages: Vec<(String, Duration)>,
}

fn timed_create(env: &BangerEnv, name: &str) -> Timed {
    let (k, r) = env.boot_files();
    let boot = [
        "--kernel".into(),
        k.into_os_string(),
        "--rootfs".into(),
        r.into_os_string(),
    ];
    timed_create_with(env, name, &boot)
}

/// `vm create --name NAME BOOT... --disk-size 64M`, timed.
fn timed_create_with(env: &BangerEnv, name: &str, boot: &[std::ffi::OsString]) -> Timed {
    let start = Instant::now();
    let mut child = env
        .command(&workspace_bin("banger"))
        .args(["vm", "create", "--name", name])
        .args(boot)
        .args(["--disk-size", "64M"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut marks: Vec<(String, Instant)> = Vec::new();
    let mut text = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("==> ") {
            let stage = rest.split_once(": ").map_or(rest, |(s, _)| s);
            marks.push((stage.to_string(), Instant::now()));
        }
        text.push_str(&line);
        text.push('\n');
    }
    let status = child.wait().unwrap();
    let end = Instant::now();
    assert!(status.success(), "vm create {name} failed:\n{text}");
    let stages = marks
        .iter()
        .enumerate()
        .map(|(i, (s, t))| {
            let next = marks.get(i + 1).map_or(end, |m| m.1);
            (s.clone(), next - *t)
        })
        .collect();
    Timed {
        total: end - start,
        before_first: marks.first().map_or(end, |m| m.1) - start,
        stages,
    }
}

/// CPU time so far of the daemon (with the tools it ran and reaped: nft,
/// mkfs.ext4) and of this bench's reaped children (the CLIs), from
/// `/proc/PID/stat` fields 14-17 and `getrusage(RUSAGE_CHILDREN)`.
fn cpu_so_far(env: &BangerEnv) -> (Duration, Duration) {
    let tick = Duration::from_secs(1) / 100; // USER_HZ
    let pid =
        std::fs::read_to_string(env.root().join("run/banger/bangerd.pid")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap_or_default();
    // Fields after the parenthesised command name, which may hold spaces.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u32 = after
        .split_whitespace()
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u32>().ok())
        .sum();
    // SAFETY: getrusage only writes the struct we pass, which lives
    // through the call; all-zero is a valid rusage.
    let cli = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    let cli = tv(cli.ru_utime) + tv(cli.ru_stime);
    (tick * ticks, cli)
}

/// One run: creates/s, each create's timing, and CPU per create (daemon
/// with its tools, CLI).
struct Run {
    rate: f64,
    timed: Vec<Timed>,
    cpu: (Duration, Duration),
}

/// `CREATES` creates, `concurrency` at a time. The VMs are deleted
/// afterwards, untimed.
fn run(env: &BangerEnv, concurrency: usize, round: usize) -> Run {
    let per_thread = CREATES / concurrency;
    let cpu_before = cpu_so_far(env);
    let start = Instant::now();
    let timed: Vec<Timed> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..concurrency)
            .map(|t| {
                s.spawn(move || {
                    (0..per_thread)
                        .map(|i| timed_create(env, &format!("b{round}-{t}-{i}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let cpu_after = cpu_so_far(env);
    let n = CREATES as u32;
    let cpu = (
        (cpu_after.0 - cpu_before.0) / n,
        (cpu_after.1 - cpu_before.1) / n,
    );
    let names: Vec<String> = env
        .list()
        .into_iter()
        .map(|v| v.record.name.to_string())
        .collect();
    let mut args = vec!["vm", "delete"];
    args.extend(names.iter().map(String::as_str));
    env.banger(&args).ok();
    Run {
        rate: CREATES as f64 / secs,
        timed,
        cpu,
    }
}

/// The daemon's own stage times (`vm=V op=O stage=S took=N.NNNms` in
/// `bangerd.log`) of creating the VMs named `b{round}-*` of `rounds`: median
/// per stage, in the order the stages first appear, stages under 0.05 ms
/// left out, then the operation's total.
fn daemon_split(env: &BangerEnv, rounds: &[usize]) -> String {
    let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap_or_default();
    let prefixes: Vec<String> = rounds.iter().map(|r| format!("vm=b{r}-")).collect();
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for line in log.lines() {
        // The untimed deletes log their stages too.
        let Some(at) = prefixes.iter().find_map(|p| line.find(p.as_str())) else {
            continue;
        };
        if line.contains(" op=delete ") {
            continue;
        }
        let mut stage = None;
        let mut took = None;
        for word in line[at..].split_whitespace() {
            if let Some(s) = word.strip_prefix("stage=") {
                stage = Some(s.to_string());
            } else if word == "total" {
                stage = Some("total".to_string());
            } else if let Some(ms) = word
                .strip_prefix("took=")
                .and_then(|w| w.strip_suffix("ms"))
            {
                took = ms.parse::<f64>().ok();
            }
        }
        if let (Some(s), Some(ms)) = (stage, took) {
            if !order.contains(&s) {
                order.push(s.clone());
            }
            by.entry(s)
                .or_default()
                .push(Duration::from_secs_f64(ms / 1e3));
        }
    }
    if order.is_empty() {
        return "none logged (a daemon without stage timings)".to_string();
    }
    order
        .into_iter()
        .filter_map(|s| {
            let m = median(by.remove(&s).unwrap_or_default()) * 1e3;
            (m >= 0.05).then(|| format!("{s} {m:.2} ms"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates from an image, timed, one at a time.
const IMAGE_CREATES: usize = 15;

/// `IMAGE_CREATES` creates from an image registered from the bench's boot
/// files, one at a time, each once the image's spare root disk is ready
/// (made in the background after the create before took the last one):
/// the root disk is then a rename, as for a user's `vm create` or `vm run`
/// from the default image. The VMs are deleted afterwards, untimed.
fn image_creates(env: &BangerEnv) -> Vec<Timed> {
    let (k, r) = env.boot_files();
    let (k, r) = (k.display().to_string(), r.display().to_string());
    env.banger(&[
        "image",
        "register",
        "--name",
        "bench-img",
        "--rootfs",
        &r,
        "--kernel",
        &k,
    ])
    .ok();
    let spares = env.state_dir().join("spares");
    let spare_ready = || {
        std::fs::read_dir(&spares).is_ok_and(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".ext4") && !n.starts_with('.')
            })
        })
    };
    let image = ["--image".into(), "bench-img".into()];
    // The first copies the image itself and queues its first spare.
    timed_create_with(env, "img-first", &image);
    let timed = (0..IMAGE_CREATES)
        .map(|i| {
            test_infra::wait_until(Duration::from_secs(30), "the image's spare", spare_ready);
            timed_create_with(env, &format!("img-{i}"), &image)
        })
        .collect();
    let mut args = vec![
        "vm".to_string(),
        "delete".to_string(),
        "img-first".to_string(),
    ];
    args.extend((0..IMAGE_CREATES).map(|i| format!("img-{i}")));
    env.banger(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .ok();
    env.banger(&["image", "delete", "bench-img"]).ok();
    timed
}

/// Median per stage over `timed`, in the order the stages first appear.
fn split(timed: &[Timed]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for t in timed {
        for (s, d) in &t.stages {
            if !order.contains(s) {
                order.push(s.clone());
            }
            by.entry(s.clone()).or_default().push(*d);
        }
    }
    let mut parts = vec![format!(
        "before first stage {:.1} ms",
        median(timed.iter().map(|t| t.before_first).collect()) * 1e3
    )];
    for s in order {
        let v = by.remove(&s).unwrap_or_default();
        parts.push(format!("{s} {:.1} ms", median(v) * 1e3));
    }
    parts.join(", ")
}

fn main() {
    let where_net = private_network("create_throughput");
    println!(
        "create_throughput/setup: fake firecracker, default caps (work-disk, network, dns, file-sync, vsock-agent), in {where_net}"
    );
    // The same bench twice: on /tmp, this machine's own filesystem, then
    // on a fresh ext4 with mkfs's defaults. The first here is ext4 without
    // a journal, where every file made costs more the more were deleted in
    // the last minutes (see `describe_fs`): figures fall run after run.
    measure(std::path::Path::new("/tmp"));
    match ScratchExt4::new(2048) {
        Ok(scratch) => measure(&scratch.path()),
        Err(why) => println!("create_throughput/skipped: the run on a fresh ext4: {why}"),
    }
}

/// One whole run, its environment under `parent`.
fn measure(parent: &std::path::Path) {
    println!(
        "create_throughput/filesystem: {} ({})",
        describe_fs(parent),
        parent.display()
    );
    let env = default_caps_env_in(parent);
    // Warm-up: the first create pays for page cache, the bridge and rules,
    // and the daemon's kept answers about the image and the agent.
    timed_create(&env, "warmup");
    env.banger(&["vm", "delete", "warmup"]).ok();
    // A real image was registered long before it is used; the daemon does
    // not trust a file's identity within 2 s of its last change (and then
    // reads it again), so the bench's fresh boot files first age past that.
    let (k, r) = env.boot_files();
    let newest = [k, r]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            std::time::UNIX_EPOCH + Duration::new(m.ctime() as u64, m.ctime_nsec() as u32)
        })
        .max()
        .unwrap();
    let settled = newest + Duration::from_millis(2100);
    if let Ok(left) = settled.duration_since(std::time::SystemTime::now()) {
        std::thread::sleep(left);
    }
    timed_create(&env, "warmup2");
    env.banger(&["vm", "delete", "warmup2"]).ok();

    let load_before = load_average();
    let (mut seq, mut con) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        seq.push(run(&env, 1, 2 * round));
        con.push(run(&env, 32, 2 * round + 1));
    }
    let (seq, con) = (Merged::of(seq), Merged::of(con));
    let (sequential, one) = (seq.rate, &seq.timed);
    let (concurrent, many) = (con.rate, &con.timed);
    println!(
        "create_throughput/load average: {load_before} before, {} after",
        load_average()
    );
    for (what, m) in [("1-concurrent: ", &seq), ("32-concurrent:", &con)] {
        let rates: Vec<String> = m.rates.iter().map(|r| format!("{r:.1}")).collect();
        println!(
            "create_throughput/{what} {:8.2} creates/s (median of {ROUNDS} rounds of {CREATES} creates: {})",
            m.rate,
            rates.join(", ")
        );
    }
    println!(
        "create_throughput/ratio 32:1:    {:8.2}x",
        concurrent / sequential
    );
    println!(
        "create_throughput/single create: {:.1} ms median (CLI start to exit, one at a time)",
        median(one.iter().map(|t| t.total).collect()) * 1e3
    );
    let from_image = image_creates(&env);
    println!(
        "create_throughput/single create from an image: {:.1} ms median of {IMAGE_CREATES} (its spare root disk made ahead, as for `vm run`)",
        median(from_image.iter().map(|t| t.total).collect()) * 1e3
    );
    println!(
        "create_throughput/1-concurrent stages (medians): {}",
        split(one)
    );
    println!(
        "create_throughput/32-concurrent stages (medians): {}",
        split(many)
    );
    for (what, r) in [("1", &seq), ("32", &con)] {
        println!(
            "create_throughput/{what}-concurrent CPU per create: daemon and its tools {:.1} ms, CLI {:.1} ms",
            r.cpu.0.as_secs_f64() * 1e3,
            r.cpu.1.as_secs_f64() * 1e3
        );
    }
    let rounds = |first: usize| -> Vec<usize> { (0..ROUNDS).map(|r| 2 * r + first).collect() };
    println!(
        "create_throughput/1-concurrent daemon stages (medians, bangerd.log): {}",
        daemon_split(&env, &rounds(0))
    );
    println!(
        "create_throughput/32-concurrent daemon stages (medians, bangerd.log): {}",
        daemon_split(&env, &rounds(1))
    );
}

/// The rounds of one concurrency together: the median rate, every create's
/// timing, and the mean CPU per create.
struct Merged {
    rate: f64,
    rates: Vec<f64>,
    timed: Vec<Timed>,
    cpu: (Duration, Duration),
}

impl Merged {
    fn of(runs: Vec<Run>) -> Merged {
        let n = runs.len() as u32;
        let mut rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
        let cpu = runs.iter().fold((Duration::ZERO, Duration::ZERO), |a, r| {
            (a.0 + r.cpu.0 / n, a.1 + r.cpu.1 / n)
        });
        let timed = runs.into_iter().flat_map(|r| r.timed).collect();
        let in_order = rates.clone();
        rates.sort_by(f64::total_cmp);
        Merged {
            rate: rates[rates.len() / 2],
            rates: in_order,
            timed,
            cpu,
        }
    }
}
