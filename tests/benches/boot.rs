//! Boot to agent-ready: `banger vm create` against a raw QEMU boot of the
//! same guest, measured in the same run.
//!
//! Setup (untimed): the Debian rootfs from `guest/rootfs/build` is pushed to a
//! loopback `docker-registry`, the kernel from `guest/kernel/build` is
//! imported and the image pulled, exactly as the e2e test does. Then, in
//! alternating rounds (`BANGER_BENCH_BOOTS`, default 3):
//!
//! - `banger`: `banger vm create --cap vsock-agent` (QEMU, TCG) through the
//!   real CLI and daemon, timed from just before the CLI call until it
//!   returns. It returns only after the agent answered `/healthz`. The VM is
//!   deleted afterwards, untimed.
//! - `raw`: `vhost-device-vsock` + `qemu-system-x86_64 -M microvm`, started
//!   by hand on the same kernel, a fresh copy of the pulled image's
//!   `rootfs.ext4`, a fresh empty work disk of the same size (made with
//!   `banger_artifacts::disk::create_ext4`, as banger makes it) and copies of the
//!   initramfs and config drive banger built for the first VM, with banger's
//!   kernel command line, vCPUs and memory read from its QEMU's argv. Timed
//!   from just before `vhost-device-vsock` starts until `/healthz` answers
//!   through the hybrid vsock socket (polled every 10 ms).
//!
//! Both sides boot the same agent, which logs a boot timeline on the
//! console (`banger-agent: timeline STAGE SECONDS-SINCE-BOOT`); the bench
//! prints each guest stage's share of the boot for both sides, and what is
//! left outside the guest (VMM start-up, host work before it, the
//! `/healthz` round trip after it).
//!
//! The difference is banger's orchestration: CLI and daemon round trips,
//! cloning the root disk, making the work disk, the initramfs and config
//! drive, capability hooks, QMP readiness and its `/healthz` poll interval.
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench boot`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_api::api::VmView;
use banger_vmm::vsock::AgentClient;
use test_infra::BangerEnv;
use test_infra::guest_artifacts::GuestArtifacts;
use test_infra::registry::Registry;

const DEFAULT_BOOTS: usize = 3;
/// How long one boot may take before the bench gives up (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const MEMORY_MIB: &str = "1024";
const DISK_SIZE: &str = "256M";

/// What the raw boot copies from banger's first VM.
struct Template {
    /// `-smp`, `-m` and `-append` values of banger's QEMU.
    smp: String,
    mem: String,
    append: String,
    kernel: PathBuf,
    /// Banger's drives in attach order: file name and read-only flag.
    drives: Vec<(String, bool)>,
    /// Directory holding copies of banger's initramfs and config drive.
    dir: tempfile::TempDir,
    rootfs_source: PathBuf,
    disk_size: banger_api::model::ByteSize,
}

fn boots() -> usize {
    match std::env::var("BANGER_BENCH_BOOTS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("BANGER_BENCH_BOOTS={v:?}: use a whole number of boots, at least 1"),
        },
        Err(_) => DEFAULT_BOOTS,
    }
}

/// The value after each occurrence of `flag` in `argv`.
fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn one<'a>(argv: &'a [String], flag: &str) -> &'a str {
    let v = values(argv, flag);
    assert_eq!(v.len(), 1, "banger's QEMU has {flag} {v:?}: {argv:?}");
    v[0]
}

/// Reads banger's QEMU command line and copies the files the raw boot reuses.
fn template(vm: &VmView) -> Template {
    let pid = vm.record.vmm.as_ref().expect("a running VM has a VMM").pid;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(one(&argv, "-accel"), "tcg", "banger's QEMU runs under TCG");
    let drives = values(&argv, "-drive")
        .into_iter()
        .map(|d| {
            let file = d.split_once("file=").expect("-drive has file=").1;
            let read_only = file.ends_with(",readonly=on");
            let path = PathBuf::from(file.trim_end_matches(",readonly=on").replace(",,", ","));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, read_only)
        })
        .collect();
    let dir = tempfile::Builder::new()
        .prefix("bootbench")
        .tempdir_in("/tmp")
        .unwrap();
    let initrd = PathBuf::from(one(&argv, "-initrd"));
    std::fs::copy(&initrd, dir.path().join("initramfs.cpio")).unwrap();
    let drive = banger_vmm::config_drive::FILE_NAME;
    std::fs::copy(vm.dir.join(drive), dir.path().join(drive)).unwrap();
    Template {
        smp: one(&argv, "-smp").to_string(),
        mem: one(&argv, "-m").to_string(),
        append: one(&argv, "-append").to_string(),
        kernel: PathBuf::from(one(&argv, "-kernel")),
        drives,
        dir,
        rootfs_source: vm.record.spec.rootfs_source.clone(),
        disk_size: vm.record.spec.disk_size,
    }
}

/// Kills and reaps a child this bench started.
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One raw boot in a fresh directory; returns the time to `/healthz`.
fn raw_boot(a: &GuestArtifacts, t: &Template, round: usize) -> (Duration, Timeline) {
    let dir = tempfile::Builder::new()
        .prefix("rawboot")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    // Fresh writable disks, as banger gives each VM (untimed here; banger's
    // copies are part of its measured create).
    let mut drive_args: Vec<String> = Vec::new();
    for (i, (name, read_only)) in t.drives.iter().enumerate() {
        let path = d.join(name);
        match name.as_str() {
            "rootfs.ext4" => {
                banger_artifacts::disk::clone_file(&t.rootfs_source, &path).unwrap();
            }
            "work.ext4" => {
                banger_artifacts::disk::create_ext4(&path, t.disk_size, "banger-work").unwrap();
            }
            n if n == banger_vmm::config_drive::FILE_NAME => {
                std::fs::copy(t.dir.path().join(n), &path).unwrap();
            }
            other => panic!("banger attached a drive the raw boot does not know: {other}"),
        }
        let ro = if *read_only { ",readonly=on" } else { "" };
        drive_args.extend([
            "-drive".to_string(),
            format!("if=none,id=drive{i},format=raw,file={}{ro}", path.display()),
            "-device".to_string(),
            format!("virtio-blk-device,drive=drive{i}"),
        ]);
    }
    let vhost_sock = d.join("vhost.sock");
    let uds = d.join("vsock.sock");
    let console = d.join("console.log");
    let log = |name: &str| std::fs::File::create(d.join(name)).unwrap();
    // No sync before timing: banger's create does not get one either.

    let start = Instant::now();
    let vhost = Command::new(&a.vhost)
        .arg("--vm")
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_sock.display(),
            uds.display()
        ))
        .stdin(Stdio::null())
        .stdout(log("vhost.log"))
        .stderr(log("vhost.log"))
        .spawn()
        .unwrap();
    while std::fs::symlink_metadata(&vhost_sock).is_err() {
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "vhost-device-vsock never made its socket:\n{}",
            tail(&d.join("vhost.log"))
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mem = &t.mem;
    let mut qemu = Command::new(&a.qemu)
        .args(["-M", "microvm,acpi=on,memory-backend=mem"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &t.smp, "-m", mem])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .arg("-kernel")
        .arg(&t.kernel)
        .arg("-initrd")
        .arg(t.dir.path().join("initramfs.cpio"))
        .args(["-append", &t.append])
        .arg("-chardev")
        .arg(format!("file,id=serial0,path={}", console.display()))
        .args(["-serial", "chardev:serial0"])
        .args(&drive_args)
        .arg("-chardev")
        .arg(format!("socket,id=vsock,path={}", vhost_sock.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock"])
        .stdin(Stdio::null())
        .stdout(log("qemu.log"))
        .stderr(log("qemu.log"))
        .spawn()
        .unwrap();
    let health = loop {
        if let Ok(h) = AgentClient::new(&uds, Duration::from_secs(1)).healthz() {
            break h;
        }
        let dead = qemu.try_wait().unwrap();
        if dead.is_some() || start.elapsed() > BOOT_TIMEOUT {
            let qlog = tail(&d.join("qemu.log"));
            let con = tail(&console);
            stop(qemu);
            stop(vhost);
            panic!("raw boot {round}: no /healthz (qemu {dead:?})\nqemu:\n{qlog}\nconsole:\n{con}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    stop(qemu);
    stop(vhost);
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    (took, guest_timeline(&console))
}

/// The agent's boot timeline: (stage, seconds since the kernel booted),
/// ordered by time.
type Timeline = Vec<(String, f64)>;

/// The `banger-agent: timeline STAGE SECONDS` lines of a console log.
fn guest_timeline(console: &Path) -> Timeline {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let mut marks: Timeline = text
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("banger-agent: timeline ")?.1;
            let (stage, secs) = rest.trim().split_once(' ')?;
            Some((stage.to_string(), secs.parse().ok()?))
        })
        .collect();
    marks.sort_by(|a, b| a.1.total_cmp(&b.1));
    marks
}

/// Each guest stage's median time and share of the boot up to the agent
/// listening, then what is left outside the guest, for one side.
fn print_timeline(side: &str, boots: &[Duration], timelines: &[Timeline]) {
    // Per boot: ("kernel", first mark), then each mark's interval, up to
    // `agent-listening`; the rest of the measured time is outside the guest.
    let mut segments: Vec<Vec<(String, f64)>> = Vec::new();
    for (took, t) in boots.iter().zip(timelines) {
        let Some(end) = t.iter().find(|(s, _)| s == "agent-listening").map(|m| m.1) else {
            continue;
        };
        let mut seg = Vec::new();
        let mut prev = 0.0;
        for (i, (stage, at)) in t.iter().filter(|m| m.1 <= end).enumerate() {
            let name = if i == 0 {
                format!("kernel+{stage}")
            } else {
                stage.clone()
            };
            seg.push((name, at - prev));
            prev = *at;
        }
        seg.push(("outside the guest".to_string(), took.as_secs_f64() - end));
        segments.push(seg);
    }
    let Some(first) = segments.first() else {
        eprintln!(
            "boot/{side} guest timeline: no `banger-agent: timeline` lines on the console (an agent older than this bench?)"
        );
        return;
    };
    let total = median(boots.to_vec());
    let parts: Vec<String> = first
        .iter()
        .enumerate()
        .map(|(i, (stage, _))| {
            let mut v: Vec<f64> = segments
                .iter()
                .filter_map(|s| s.get(i).filter(|(n, _)| n == stage).map(|(_, t)| *t))
                .collect();
            v.sort_by(f64::total_cmp);
            let m = v[v.len() / 2];
            format!("{stage} {m:.2} s ({:.0} %)", 100.0 * m / total)
        })
        .collect();
    println!(
        "boot/{side} timeline: {} (medians; shares of the {total:.2} s median)",
        parts.join(", ")
    );
}

/// One `banger vm create`; returns its time and the VM, still running.
fn banger_boot(env: &BangerEnv, name: &str) -> (Duration, VmView) {
    let args = [
        "vm",
        "create",
        "--name",
        name,
        "--image",
        "debian-bookworm",
        "--cap",
        "vsock-agent",
        "--memory",
        MEMORY_MIB,
        "--disk-size",
        DISK_SIZE,
    ];
    let start = Instant::now();
    let out = env.banger(&args);
    let took = start.elapsed();
    if out.code != 0 {
        let logs = env.banger(&["vm", "logs", name]).stdout;
        panic!("vm create {name} failed:\n{}\nconsole:\n{logs}", out.stderr);
    }
    let vm = env.show(name);
    let health = AgentClient::new(&vm.dir.join("vsock.sock"), Duration::from_secs(10))
        .healthz()
        .unwrap();
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    (took, vm)
}

/// The daemon's progress stages logged since byte `from` of its log, as
/// (stage, seconds spent in it), each lasting until the next stage began.
/// Ends at the `running` stage. Timestamps are the tracing ones (UTC).
fn stages(log: &Path, from: usize) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let text = text.get(from..).unwrap_or_default();
    let mut marks: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        let line = strip_ansi(line);
        let Some(stage) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("stage="))
        else {
            continue;
        };
        // 2026-11-24T06:50:01.123456Z: seconds into the day.
        let Some(clock) = line
            .split_whitespace()
            .next()
            .and_then(|t| t.split_once('T'))
        else {
            continue;
        };
        let hms: Vec<f64> = clock
            .1
            .trim_end_matches('Z')
            .split(':')
            .filter_map(|p| p.parse().ok())
            .collect();
        if let [h, m, sec] = hms[..] {
            marks.push((
                stage.trim_matches('"').to_string(),
                h * 3600.0 + m * 60.0 + sec,
            ));
        }
    }
    marks
        .windows(2)
        .map(|w| (w[0].0.clone(), w[1].1 - w[0].1))
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn min(v: &[Duration]) -> f64 {
    v.iter().min().map_or(0.0, Duration::as_secs_f64)
}

fn load_average() -> String {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn runs(what: &str, v: &[Duration]) {
    let runs: Vec<String> = v
        .iter()
        .map(|d| format!("{:.2}", d.as_secs_f64()))
        .collect();
    eprintln!("boot/{what} runs (s): {}", runs.join(" "));
}

fn main() {
    let a = match GuestArtifacts::find() {
        Ok(a) => a,
        Err(why) => {
            eprintln!("SKIPPED boot: {why}");
            return;
        }
    };
    let n = boots();
    let Some(registry) = Registry::start("boot") else {
        return;
    };
    eprintln!("boot/artifacts: {}", a.describe());

    // Setup, untimed: push, import, pull.
    let reference = registry.push_rootfs_tar("banger/debian:bookworm", &a.rootfs_tar);
    let env = BangerEnv::new();
    env.write_config(&format!(
        "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {:?}\nagent_timeout_secs = {}\n\
         insecure_registries = [{:?}]\nvhost_device_vsock_bin = {:?}\nqemu_bin = {:?}\n",
        a.agent,
        BOOT_TIMEOUT.as_secs(),
        registry.host(),
        a.vhost,
        a.qemu
    ));
    let kernel_dir = a.kernel_dir.to_str().unwrap();
    env.banger(&["kernel", "import", "fc", "--from", kernel_dir])
        .ok();
    env.banger(&[
        "image",
        "pull",
        &reference,
        "--kernel-ref",
        "fc",
        "--size",
        "2G",
    ])
    .ok();

    // The daemon and CLI are the binaries of the profile this bench was
    // built with (`./scripts/bench`: release).
    let profile = test_infra::target_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!("boot/binaries: target/{profile} banger and bangerd, {n} boots per side");
    let load_before = load_average();
    let mut banger = Vec::new();
    let mut raw = Vec::new();
    let mut tmpl: Option<Template> = None;
    let daemon_log = env.state_dir().join("bangerd.log");
    let mut phases: Vec<Vec<(String, f64)>> = Vec::new();
    let (mut banger_tl, mut raw_tl) = (Vec::new(), Vec::new());
    for round in 0..n {
        let name = format!("boot{round}");
        let from = std::fs::metadata(&daemon_log).map_or(0, |m| m.len() as usize);
        let (took, vm) = banger_boot(&env, &name);
        banger.push(took);
        phases.push(stages(&daemon_log, from));
        banger_tl.push(guest_timeline(&vm.dir.join("serial.log")));
        if tmpl.is_none() {
            tmpl = Some(template(&vm));
        }
        env.banger(&["vm", "delete", &name]).ok();
        let t = tmpl.as_ref().unwrap();
        let (took, timeline) = raw_boot(&a, t, round);
        raw.push(took);
        raw_tl.push(timeline);
        eprintln!(
            "boot/round {round}: banger {:.2} s, raw {:.2} s",
            banger[round].as_secs_f64(),
            raw[round].as_secs_f64()
        );
    }
    runs("banger", &banger);
    runs("raw", &raw);
    for (round, p) in phases.iter().enumerate() {
        let list: Vec<String> = p.iter().map(|(s, t)| format!("{s} {t:.2}")).collect();
        eprintln!("boot/banger round {round} stages (s): {}", list.join(", "));
    }

    let (bmed, bmin) = (median(banger.clone()), min(&banger));
    let (rmed, rmin) = (median(raw.clone()), min(&raw));
    println!(
        "boot/load average: {load_before} before, {} after",
        load_average()
    );
    println!(
        "boot/banger: {bmed:6.2} s median, {bmin:6.2} s min (vm create --cap vsock-agent until /healthz, {n} boots)"
    );
    println!(
        "boot/raw:    {rmed:6.2} s median, {rmin:6.2} s min (vhost-device-vsock + qemu -M microvm until /healthz, {n} boots)"
    );
    // Where banger's time goes: each daemon stage's median over the rounds,
    // and what is left for the CLI, the API round trip and the daemon
    // outside its stages.
    if let Some(first) = phases.first().filter(|p| !p.is_empty()) {
        let mut parts = Vec::new();
        let mut staged = 0.0;
        for (i, (stage, _)) in first.iter().enumerate() {
            let mut v: Vec<f64> = phases
                .iter()
                .filter_map(|p| p.get(i).filter(|(s, _)| s == stage).map(|(_, t)| *t))
                .collect();
            v.sort_by(f64::total_cmp);
            let m = v[v.len() / 2];
            staged += m;
            if m >= 0.005 {
                parts.push(format!("{stage} {m:.2} s"));
            }
        }
        println!(
            "boot/banger stages: {} (medians; stages under 0.01 s left out)",
            parts.join(", ")
        );
        println!(
            "boot/banger outside stages: {:.2} s (CLI, API round trip, daemon before the first stage)",
            bmed - staged
        );
    } else {
        eprintln!("boot/banger stages: none found in {}", daemon_log.display());
    }
    print_timeline("banger", &banger, &banger_tl);
    print_timeline("raw", &raw, &raw_tl);
    println!(
        "boot/ratio banger:raw {:5.2}x median, {:5.2}x min",
        bmed / rmed,
        bmin / rmin
    );
}
