//! Boot to agent-ready, and `vm run --rm -- true` end to end, each against
//! a raw QEMU boot of the same guest, measured in the same run.
//!
//! Setup (untimed): the Debian rootfs from `guest/rootfs/build` is pushed to a
//! loopback `docker-registry`, the kernel from `guest/kernel/build` is
//! imported and the image pulled, exactly as the e2e test does. One VM is
//! created and deleted, untimed, as the raw boots' template (and a warm-up).
//! Then, in alternating rounds (`BANGER_BENCH_BOOTS`, default 3), for each
//! part in `BANGER_BENCH_PARTS` (default `create,run`):
//!
//! - `create` — banger: `banger vm create --cap vsock-agent` (QEMU, TCG)
//!   through the real CLI and daemon, timed from just before the CLI call
//!   until it returns. It returns only after the agent answered `/healthz`.
//!   The VM is deleted afterwards, untimed. Raw: the agent's vsock backend
//!   as banger runs it for the transport measured (`banger-agent bridge`
//!   and a virtio-serial port for the default `serial`,
//!   `vhost-device-vsock` and vhost-user-vsock for `vsock`; pick with
//!   `BANGER_BENCH_TRANSPORT`, which sets banger's config too) +
//!   `qemu-system-x86_64 -M microvm`, started by hand on the same kernel, a
//!   fresh copy of the pulled image's `rootfs.ext4`, a fresh empty work disk
//!   of the same size (made with `banger_artifacts::disk::create_ext4`, as
//!   banger makes it) and copies of the initramfs and config drive banger
//!   built for the template VM, with banger's kernel command line, vCPUs and
//!   memory read from its QEMU's argv. Timed from just before the backend
//!   starts until `/healthz` answers through the hybrid
//!   vsock socket, asked as soon as the agent has announced itself on
//!   `<uds>_1025` (looked for every 10 ms), as banger's daemon does.
//! - `run` — banger: `banger vm run --rm --cap vsock-agent -- true` (no
//!   `--name`), timed from just before the CLI starts until it exits (exit
//!   code 0 checked): create, the command through the agent (`vm run`'s
//!   default for a guest with the agent and no workspace), and whatever of
//!   the `--rm` delete the CLI waits for (for a VM banger named: until the
//!   daemon has begun it); and the same with `--name` (`run-named`: the
//!   CLI waits for the delete to end, so the name is free). Raw: the same machine as above, but the config drive
//!   copy lists `sh -c true` in `guest.commands`, so the guest's init (the
//!   agent, PID 1) starts the command at boot and logs its exit status on
//!   the console; timed until that line shows (console polled every 10 ms).
//!   The teardown (QEMU and the backend killed and reaped, the
//!   boot's directory removed) is timed too and counts when banger's CLI
//!   waited for its delete: the ratio compares like with like.
//!
//! Every round of either side starts with its disks ready: the raw side's
//! copies are made before its clock starts, and banger's waits until the
//! daemon's spare of the image's root disk is there (`rootfs_spares`,
//! docs/images.md), which also keeps the copy the daemon makes behind each
//! create out of the next round's clock (it runs during the create's own
//! boot, and counts there).
//!
//! Both sides boot the same agent, which logs a boot timeline on the
//! console (`banger-agent: timeline STAGE SECONDS-SINCE-BOOT`); the bench
//! prints each guest stage's share for every side, and what is left outside
//! the guest. Banger's host side is split by the daemon's
//! `op=OP stage=S took=Nms` lines in `bangerd.log` (the run's console is
//! read through a descriptor opened while the VM runs: `--rm` removes the
//! file).
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench boot`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use banger_api::api::VmView;
use banger_guest_protocol::drive::ConfigDrive;
use banger_vmm::vsock::AgentClient;
use test_infra::BangerEnv;
use test_infra::guest_artifacts::{GuestArtifacts, bench_transport, bench_transport_config};
use test_infra::registry::Registry;

const DEFAULT_BOOTS: usize = 3;
/// How long one boot may take before the bench gives up (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const MEMORY_MIB: &str = "1024";
const DISK_SIZE: &str = "256M";
/// What `vm run -- true` runs through the agent (`sh -c` of the words), so
/// the raw boot's init runs exactly this.
const COMMAND: [&str; 3] = ["sh", "-c", "true"];
/// How often the host looks for the end of a raw boot (`/healthz`, or the
/// command's line on the console).
const POLL: Duration = Duration::from_millis(10);

/// The two comparisons this bench makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// `vm create` to agent-ready against a raw boot to `/healthz`.
    Create,
    /// `vm run --rm -- true` against a raw boot whose init runs `true`.
    Run,
}

/// What the raw boot copies from banger's template VM.
struct Template {
    /// `-smp`, `-m` and `-append` values of banger's QEMU.
    smp: String,
    mem: String,
    append: String,
    kernel: PathBuf,
    /// Banger's drives in attach order: file name and read-only flag.
    drives: Vec<(String, bool)>,
    /// Directory holding copies of banger's initramfs and config drive, and
    /// under `run/` the config drive with [`COMMAND`] in `guest.commands`.
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

fn parts() -> Vec<Part> {
    let Ok(v) = std::env::var("BANGER_BENCH_PARTS") else {
        return vec![Part::Create, Part::Run];
    };
    v.split(',')
        .map(|p| match p.trim() {
            "create" => Part::Create,
            "run" => Part::Run,
            other => panic!("BANGER_BENCH_PARTS has {other:?}: use create, run or create,run"),
        })
        .collect()
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
    // A jailed QEMU (root daemon) names its disks `/dev/fdset/N`, and the
    // `-add-fd ...,set=N,opaque=PATH` arguments say which file each is.
    let sets: std::collections::HashMap<String, String> = values(&argv, "-add-fd")
        .into_iter()
        .filter_map(|a| {
            let (set, path) = a.split_once(",set=")?.1.split_once(",opaque=")?;
            Some((format!("/dev/fdset/{set}"), path.replace(",,", ",")))
        })
        .collect();
    let drives = values(&argv, "-drive")
        .into_iter()
        .map(|d| {
            let file = d.split_once("file=").expect("-drive has file=").1;
            let read_only = file.contains(",readonly=on");
            let file = file
                .split(",readonly=on")
                .next()
                .unwrap()
                .trim_end_matches(",file.locking=off");
            let path = match sets.get(file) {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(file.replace(",,", ",")),
            };
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
    let bytes = std::fs::read(vm.dir.join(drive)).unwrap();
    std::fs::write(dir.path().join(drive), &bytes).unwrap();
    // The run part's raw boot: the same drive, plus the command for the
    // agent to run at boot (it logs `command [..]: exit status: N`).
    let mut with_command = ConfigDrive::decode(&bytes).unwrap();
    with_command
        .guest
        .commands
        .push(COMMAND.iter().map(|w| w.to_string()).collect());
    std::fs::create_dir(dir.path().join("run")).unwrap();
    std::fs::write(dir.path().join("run").join(drive), with_command.encode()).unwrap();
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

/// One raw boot: the time to its end (`/healthz`, or the command's exit
/// logged on the console), the teardown after it, and its guest timeline.
struct RawBoot {
    took: Duration,
    teardown: Duration,
    timeline: Timeline,
}

/// The agent's console line for [`COMMAND`]'s end: what follows
/// `command ["sh", "-c", "true"]: ` (`exit status: 0`), once it is there.
fn command_status(console: &Path) -> Option<String> {
    let argv: Vec<String> = COMMAND.iter().map(|w| w.to_string()).collect();
    let marker = format!("command {argv:?}: ");
    let text = std::fs::read_to_string(console).ok()?;
    text.lines()
        .find_map(|l| l.split_once(&marker).map(|(_, s)| s.trim().to_string()))
}

/// One raw boot in a fresh directory, until what `part` waits for.
fn raw_boot(a: &GuestArtifacts, t: &Template, round: usize, part: Part) -> RawBoot {
    let dir = tempfile::Builder::new()
        .prefix("rawboot")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let drive_source = match part {
        Part::Create => t.dir.path().to_path_buf(),
        Part::Run => t.dir.path().join("run"),
    };
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
                std::fs::copy(drive_source.join(n), &path).unwrap();
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
    // The agent announces itself on `<uds>_1025` the moment it listens
    // (banger's daemon listens there too): the raw side's floor is that
    // moment plus one `/healthz`, with no polling gap.
    let announce =
        std::os::unix::net::UnixListener::bind(banger_vmm::vsock::ready_socket_path(&uds)).unwrap();
    announce.set_nonblocking(true).unwrap();
    let mut announced = false;
    // No sync before timing: banger's create does not get one either.

    let serial = bench_transport() == "serial";
    let start = Instant::now();
    // The agent's vsock backend, as banger runs it for this transport.
    let backend = if serial {
        let mut c = Command::new(&a.agent);
        c.arg("bridge")
            .arg("--mux")
            .arg(&vhost_sock)
            .arg("--uds")
            .arg(&uds);
        c
    } else {
        let mut c = Command::new(&a.vhost);
        c.arg("--vm").arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_sock.display(),
            uds.display()
        ));
        c
    };
    let vhost = {
        let mut c = backend;
        c.stdin(Stdio::null())
            .stdout(log("vhost.log"))
            .stderr(log("vhost.log"))
            .spawn()
            .unwrap()
    };
    while std::fs::symlink_metadata(&vhost_sock).is_err() {
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "the vsock backend never made its socket:\n{}",
            tail(&d.join("vhost.log"))
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let mem = &t.mem;
    let (machine, agent_device): (&str, Vec<String>) = if serial {
        (
            "microvm,acpi=on",
            vec![
                "-device".into(),
                "virtio-serial-device,max_ports=2".into(),
                "-chardev".into(),
                format!("socket,id=agent,path={}", vhost_sock.display()),
                "-device".into(),
                format!(
                    "virtserialport,chardev=agent,name={}",
                    banger_guest_protocol::api::SERIAL_PORT_NAME
                ),
            ],
        )
    } else {
        (
            "microvm,acpi=on,memory-backend=mem",
            vec![
                "-object".into(),
                format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                "-chardev".into(),
                format!("socket,id=vsock,path={}", vhost_sock.display()),
                "-device".into(),
                "vhost-user-vsock-device,chardev=vsock".into(),
            ],
        )
    };
    let mut qemu = Command::new(&a.qemu)
        .args(["-M", machine])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &t.smp, "-m", mem])
        .arg("-kernel")
        .arg(&t.kernel)
        .arg("-initrd")
        .arg(t.dir.path().join("initramfs.cpio"))
        .args(["-append", &t.append])
        .arg("-chardev")
        .arg(format!("file,id=serial0,path={}", console.display()))
        .args(["-serial", "chardev:serial0"])
        .args(&drive_args)
        .args(&agent_device)
        .stdin(Stdio::null())
        .stdout(log("qemu.log"))
        .stderr(log("qemu.log"))
        .spawn()
        .unwrap();
    let ended = loop {
        announced = announced || announce.accept().is_ok();
        let ended = match part {
            Part::Create if announced => AgentClient::new(&uds, Duration::from_secs(1))
                .healthz()
                .ok()
                .map(|h| h.version),
            Part::Create => None,
            Part::Run => command_status(&console),
        };
        if let Some(e) = ended {
            break e;
        }
        let dead = qemu.try_wait().unwrap();
        if dead.is_some() || start.elapsed() > BOOT_TIMEOUT {
            let qlog = tail(&d.join("qemu.log"));
            let con = tail(&console);
            stop(qemu);
            stop(vhost);
            panic!(
                "raw boot {round} ({part:?}): no end (qemu {dead:?})\nqemu:\n{qlog}\nconsole:\n{con}"
            );
        }
        std::thread::sleep(POLL);
    };
    let took = start.elapsed();
    let timeline = guest_timeline(&std::fs::read_to_string(&console).unwrap_or_default());
    let down = Instant::now();
    stop(qemu);
    stop(vhost);
    drop(dir);
    let teardown = down.elapsed();
    match part {
        Part::Create => assert_eq!(ended, env!("CARGO_PKG_VERSION"), "the agent's version"),
        Part::Run => assert_eq!(ended, "exit status: 0", "`{}` at boot", COMMAND.join(" ")),
    }
    RawBoot {
        took,
        teardown,
        timeline,
    }
}

/// The agent's boot timeline: (stage, seconds since the kernel booted),
/// ordered by time.
type Timeline = Vec<(String, f64)>;

/// The `banger-agent: timeline STAGE SECONDS` lines of a console log.
fn guest_timeline(text: &str) -> Timeline {
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

/// Named segments of one measurement, in order.
type Segments = Vec<(String, f64)>;

/// Each segment's median over the rounds (matched by position and name)
/// and its share of `total`, as one line; segments under 5 ms are left out.
fn medians(rounds: &[Segments], total: f64) -> String {
    let Some(first) = rounds.first() else {
        return "none".to_string();
    };
    first
        .iter()
        .enumerate()
        .filter_map(|(i, (stage, _))| {
            let mut v: Vec<f64> = rounds
                .iter()
                .filter_map(|s| s.get(i).filter(|(n, _)| n == stage).map(|(_, t)| *t))
                .collect();
            v.sort_by(f64::total_cmp);
            let m = v[v.len() / 2];
            (m.abs() >= 0.005).then(|| format!("{stage} {m:.2} s ({:.0} %)", 100.0 * m / total))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `segments` summed by the part of their name before `:` (`create:S`
/// into `create`), in order.
fn grouped(segments: &Segments) -> Segments {
    let mut out: Segments = Vec::new();
    for (name, t) in segments {
        let group = name.split_once(':').map_or(name.as_str(), |g| g.0);
        match out.last_mut() {
            Some((g, sum)) if g == group => *sum += t,
            _ => out.push((group.to_string(), *t)),
        }
    }
    out
}

/// Each guest stage's median time and share of the side's median, up to
/// the guest's `end` stage, then what is left outside the guest.
fn print_timeline(side: &str, end: &str, totals: &[Duration], timelines: &[Timeline]) {
    // Per boot: ("kernel", first mark), then each mark's interval, up to
    // `end`; the rest of the measured time is outside the guest.
    let mut segments: Vec<Segments> = Vec::new();
    for (took, t) in totals.iter().zip(timelines) {
        let Some(end_at) = t.iter().find(|(s, _)| s == end).map(|m| m.1) else {
            continue;
        };
        let mut seg = Vec::new();
        let mut prev = 0.0;
        // `exec-init` is PID 1 going on to the image's init, beside the
        // agent's service: not a step towards `end`, and its place among
        // the others varies from boot to boot.
        let marks = t.iter().filter(|m| m.1 <= end_at && m.0 != "exec-init");
        for (i, (stage, at)) in marks.enumerate() {
            let name = if i == 0 {
                format!("kernel+{stage}")
            } else {
                stage.clone()
            };
            seg.push((name, at - prev));
            prev = *at;
        }
        seg.push((format!("after {end}"), took.as_secs_f64() - end_at));
        segments.push(seg);
    }
    if segments.is_empty() {
        eprintln!(
            "{side} guest timeline: no `banger-agent: timeline` lines up to {end} on the console (an agent older than this bench?)"
        );
        return;
    }
    let total = median(totals.to_vec());
    println!(
        "{side} timeline: {} (medians; shares of the {total:.2} s median)",
        medians(&segments, total)
    );
}

/// `verb` with the VM shape both parts use.
fn vm_args<'a>(verb: &[&'a str]) -> Vec<&'a str> {
    let mut args = verb.to_vec();
    args.extend([
        "--image",
        "debian-bookworm",
        "--cap",
        "vsock-agent",
        "--memory",
        MEMORY_MIB,
        "--disk-size",
        DISK_SIZE,
    ]);
    args
}

/// One `banger vm create`; returns its time and the VM, still running.
fn banger_boot(env: &BangerEnv, name: &str) -> (Duration, VmView) {
    let mut args = vm_args(&["vm", "create"]);
    args.extend(["--name", name]);
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

/// One `banger vm run --rm -- true`.
struct BangerRun {
    took: Duration,
    /// The CLI's start and exit, seconds into the UTC day (the daemon log's
    /// clock).
    started: f64,
    exited: f64,
    timeline: Timeline,
}

fn seconds_of_day(t: SystemTime) -> f64 {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    (since.as_secs() % 86_400) as f64 + f64::from(since.subsec_nanos()) / 1e9
}

/// `vm run --rm -- true`. Without `--name`, as a user runs a throwaway
/// command, banger names the VM and `--rm` waits only until the daemon has
/// begun the delete; with `name` it waits for the delete to end
/// (docs/vm-run.md).
fn banger_run(env: &BangerEnv, name: Option<&str>) -> BangerRun {
    // The console goes with the VM (`--rm`): open it while the VM runs and
    // read it through that descriptor afterwards.
    let vms = env.state_dir().join("vms");
    let names = |d: &Path| -> HashSet<std::ffi::OsString> {
        std::fs::read_dir(d)
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    let before = names(&vms);
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            loop {
                for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
                    if !before.contains(&e.file_name()) {
                        if let Ok(f) = std::fs::File::open(e.path().join("serial.log")) {
                            return Some(f);
                        }
                    }
                }
                if done.load(Ordering::Relaxed) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut args = vm_args(&["vm", "run", "--rm"]);
    if let Some(n) = name {
        args.extend(["--name", n]);
    }
    args.extend(["--", "true"]);
    let started = seconds_of_day(SystemTime::now());
    let start = Instant::now();
    let out = env.banger(&args);
    let took = start.elapsed();
    done.store(true, Ordering::Relaxed);
    let console = watcher.join().unwrap();
    assert_eq!(
        out.code, 0,
        "vm run -- true exited {}:\n{}",
        out.code, out.stderr
    );
    let said = match name {
        None => "deleting VM",
        Some(_) => "deleted VM",
    };
    assert!(
        out.stderr.contains(said),
        "vm run --rm {name:?}: no {said:?}:\n{}",
        out.stderr
    );
    let mut text = String::new();
    if let Some(mut f) = console {
        f.read_to_string(&mut text).unwrap();
    }
    BangerRun {
        took,
        started,
        exited: started + took.as_secs_f64(),
        timeline: guest_timeline(&text),
    }
}

/// One timed-operation line of `bangerd.log`: `vm=V op=OP stage=S
/// took=Nms` when a stage ends, `vm=V op=OP total took=Nms` when the
/// operation does.
#[derive(Debug)]
struct OpLine {
    vm: String,
    op: String,
    /// `None` for the operation's total.
    stage: Option<String>,
    /// When it was logged, seconds into the UTC day.
    at: f64,
    took: f64,
}

/// The timed-operation lines logged since byte `from` of the daemon's log.
fn op_lines(log: &Path, from: usize) -> Vec<OpLine> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let text = text.get(from..).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let line = strip_ansi(line);
            let words: Vec<&str> = line.split_whitespace().collect();
            let field = |k: &str| words.iter().find_map(|w| w.strip_prefix(k));
            // 2026-11-24T06:50:01.123456Z: seconds into the day.
            let clock = words.first()?.split_once('T')?.1.trim_end_matches('Z');
            let hms: Vec<f64> = clock.split(':').filter_map(|p| p.parse().ok()).collect();
            let [h, m, s] = hms[..] else { return None };
            let took: f64 = field("took=")?.strip_suffix("ms")?.parse().ok()?;
            Some(OpLine {
                vm: field("vm=")?.to_string(),
                op: field("op=")?.to_string(),
                stage: field("stage=").map(|s| s.trim_matches('"').to_string()),
                at: h * 3600.0 + m * 60.0 + s,
                took: took / 1000.0,
            })
        })
        .collect()
}

/// Operation `op`'s stages on VM `vm`, in order, and its total line.
fn operation<'a>(lines: &'a [OpLine], vm: &str, op: &str) -> (Segments, Option<&'a OpLine>) {
    let mine = || lines.iter().filter(|l| l.vm == vm && l.op == op);
    let stages = mine()
        .filter_map(|l| Some((l.stage.clone()?, l.took)))
        .collect();
    (stages, mine().find(|l| l.stage.is_none()))
}

/// Waits until the daemon has logged the end of `op` on `vm`.
fn wait_for_op(log: &Path, from: usize, vm: &str, op: &str) -> Vec<OpLine> {
    let start = Instant::now();
    loop {
        let lines = op_lines(log, from);
        if operation(&lines, vm, op).1.is_some() {
            return lines;
        }
        assert!(
            start.elapsed() < BOOT_TIMEOUT,
            "the daemon never logged the end of {op} on {vm} in {}",
            log.display()
        );
        std::thread::sleep(POLL);
    }
}

/// Where a `vm run --rm` went, host side: the CLI before the create, the
/// create's stages, the command (the create's reply to the delete's
/// start: CLI, daemon, agent), the delete's stages, the CLI after it.
fn run_segments(lines: &[OpLine], name: &str, run: &BangerRun) -> Segments {
    let (create, Some(ct)) = operation(lines, name, "create") else {
        panic!("no create total for {name} in the daemon log");
    };
    let (delete, Some(dt)) = operation(lines, name, "delete") else {
        panic!("no delete total for {name} in the daemon log");
    };
    let (create_start, delete_start) = (ct.at - ct.took, dt.at - dt.took);
    let mut seg = vec![("cli-before-create".to_string(), create_start - run.started)];
    let staged: f64 = create.iter().map(|s| s.1).sum();
    seg.push(("create:unstaged".to_string(), ct.took - staged));
    seg.extend(create.into_iter().map(|(s, t)| (format!("create:{s}"), t)));
    seg.push(("exec-true".to_string(), delete_start - ct.at));
    let staged: f64 = delete.iter().map(|s| s.1).sum();
    seg.push(("delete:unstaged".to_string(), dt.took - staged));
    seg.extend(delete.into_iter().map(|(s, t)| (format!("delete:{s}"), t)));
    // Negative when the CLI exits before the delete ends.
    seg.push(("cli-after-delete".to_string(), run.exited - dt.at));
    seg
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
    eprintln!("{what} runs (s): {}", runs.join(" "));
}

/// Every round of one part, both sides.
#[derive(Default)]
struct Sides {
    banger: Vec<Duration>,
    /// Raw boots to their end; for `run` plus the teardown.
    raw: Vec<Duration>,
    /// `run`: the raw boots without their teardown.
    raw_to_end: Vec<Duration>,
    banger_tl: Vec<Timeline>,
    raw_tl: Vec<Timeline>,
    /// Banger's host-side segments per round.
    host: Vec<Segments>,
    /// `run`: whether the CLI exited before the daemon ended the delete.
    detached: Vec<bool>,
}

fn ratio_line(prefix: &str, (bmed, bmin, rmed, rmin): (f64, f64, f64, f64), note: &str) {
    println!(
        "{prefix}/ratio banger:raw {:5.2}x median, {:5.2}x min{note}",
        bmed / rmed,
        bmin / rmin
    );
}

/// Prints every round of one part (to stderr) and returns the medians and
/// minimums: banger's, then raw's.
fn per_round(prefix: &str, s: &Sides) -> (f64, f64, f64, f64) {
    runs(&format!("{prefix}/banger"), &s.banger);
    runs(&format!("{prefix}/raw"), &s.raw);
    for (round, p) in s.host.iter().enumerate() {
        let list: Vec<String> = p.iter().map(|(st, t)| format!("{st} {t:.3}")).collect();
        eprintln!(
            "{prefix}/banger round {round} host stages (s): {}",
            list.join(", ")
        );
    }
    (
        median(s.banger.clone()),
        min(&s.banger),
        median(s.raw.clone()),
        min(&s.raw),
    )
}

fn report_create(s: &Sides, n: usize) {
    let (bmed, bmin, rmed, rmin) = per_round("boot", s);
    println!(
        "boot/banger: {bmed:6.2} s median, {bmin:6.2} s min (vm create --cap vsock-agent until /healthz, {n} boots)"
    );
    println!(
        "boot/raw:    {rmed:6.2} s median, {rmin:6.2} s min ({} backend + qemu -M microvm until /healthz, {n} boots)",
        bench_transport()
    );
    // Where banger's time goes: each daemon stage's median over the rounds,
    // and what is left for the CLI, the API round trip and the daemon
    // outside its stages.
    if s.host.iter().all(|p| !p.is_empty()) {
        println!(
            "boot/banger stages: {} (medians; under 5 ms left out)",
            medians(&s.host, bmed)
        );
        let staged: Vec<Duration> = s
            .host
            .iter()
            .zip(&s.banger)
            .map(|(p, b)| b.saturating_sub(Duration::from_secs_f64(p.iter().map(|x| x.1).sum())))
            .collect();
        println!(
            "boot/banger outside stages: {:.2} s median (CLI, API round trip, daemon before the first stage)",
            median(staged)
        );
    } else {
        eprintln!("boot/banger stages: none found in the daemon log");
    }
    print_timeline("boot/banger", "agent-listening", &s.banger, &s.banger_tl);
    print_timeline("boot/raw", "agent-listening", &s.raw, &s.raw_tl);
    ratio_line("boot", (bmed, bmin, rmed, rmin), "");
}

/// The `run` part's report; `prefix` `run` (no `--name`) prints the raw
/// side too, `run-named` (with `--name`) shares it.
fn report_run(prefix: &str, what: &str, s: &Sides, n: usize) {
    let (bmed, bmin, rmed, rmin) = per_round(prefix, s);
    println!(
        "{prefix}/banger: {bmed:6.2} s median, {bmin:6.2} s min ({what}, CLI start to exit, exit 0, {n} runs)"
    );
    let raw_lines = prefix == "run";
    if raw_lines {
        println!(
            "{prefix}/raw:    {rmed:6.2} s median, {rmin:6.2} s min (qemu whose init runs `sh -c true`: until its exit status is on the console, {:.2} s median, then qemu killed and reaped, {n} boots)",
            median(s.raw_to_end.clone())
        );
    }
    let groups: Vec<Segments> = s.host.iter().map(grouped).collect();
    println!(
        "{prefix}/banger split: {} (medians; shares of the {bmed:.2} s median)",
        medians(&groups, bmed)
    );
    println!(
        "{prefix}/banger host stages: {} (medians; under 5 ms left out)",
        medians(&s.host, bmed)
    );
    print_timeline(
        &format!("{prefix}/banger"),
        "agent-listening",
        &s.banger,
        &s.banger_tl,
    );
    if raw_lines {
        print_timeline(&format!("{prefix}/raw"), "guest-files", &s.raw, &s.raw_tl);
    }
    // Like against like: when banger's CLI exits before the delete ends,
    // the raw side ends at the command's exit too; else both include the
    // teardown.
    let to_end = (median(s.raw_to_end.clone()), min(&s.raw_to_end));
    let (same, other) = match s.detached.iter().all(|d| *d) {
        true => (
            (
                to_end,
                " (raw to the command's exit: banger's CLI exited before the delete ended)",
            ),
            ((rmed, rmin), " (raw with its teardown)"),
        ),
        false => (
            (
                (rmed, rmin),
                " (raw with its teardown: banger's CLI waited for the delete)",
            ),
            (to_end, " (raw to the command's exit)"),
        ),
    };
    ratio_line(prefix, (bmed, bmin, same.0.0, same.0.1), same.1);
    ratio_line(
        &format!("{prefix}/other"),
        (bmed, bmin, other.0.0, other.0.1),
        other.1,
    );
}

/// Waits until the daemon's spare of the image's root disk is ready
/// (`rootfs_spares`, docs/images.md): banger's rounds then start with it
/// as the raw rounds start with their disk copies made, and the copy made
/// behind a create never runs into the next round's clock.
fn wait_for_spare(env: &BangerEnv) {
    let dir = env.state_dir().join("spares");
    test_infra::wait_until(
        Duration::from_secs(120),
        "the image's spare root disk is ready",
        || {
            let names: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names
                .iter()
                .any(|n| n.ends_with(".ext4") && !n.starts_with('.'))
                && !names.iter().any(|n| n.contains(".staging-"))
        },
    );
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
    let parts = parts();
    let Some(registry) = Registry::start("boot") else {
        return;
    };
    eprintln!("boot/artifacts: {}", a.describe());
    eprintln!(
        "boot/transport: the agent over {} on both sides (BANGER_BENCH_TRANSPORT)",
        bench_transport()
    );

    // Setup, untimed: push, import, pull.
    let reference = registry.push_rootfs_tar("banger/debian:bookworm", &a.rootfs_tar);
    let env = BangerEnv::new();
    env.write_config(&format!(
        "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {:?}\nagent_timeout_secs = {}\n\
         insecure_registries = [{:?}]\nvhost_device_vsock_bin = {:?}\nqemu_bin = {:?}\n{}",
        a.agent,
        BOOT_TIMEOUT.as_secs(),
        registry.host(),
        a.vhost,
        a.qemu,
        bench_transport_config()
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
    // The raw boots' template, and a warm-up of the daemon's caches.
    let (_, vm) = banger_boot(&env, "template");
    let tmpl = template(&vm);
    env.banger(&["vm", "delete", "template"]).ok();

    // The daemon and CLI are the binaries of the profile this bench was
    // built with (`./scripts/bench`: release).
    let profile = test_infra::target_dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "boot/binaries: target/{profile} banger and bangerd, {n} boots per side, parts {parts:?}"
    );
    if parts.contains(&Part::Run) {
        // Which path `vm run` picks for this guest, as it reports it.
        let mut args = vm_args(&["vm", "run", "--rm", "--dry-run"]);
        args.extend(["--", "true"]);
        let plan = env.banger(&args).ok().stdout;
        for line in plan.lines().filter(|l| l.starts_with("then:")) {
            println!("run/path: {}", line.trim_start_matches("then:").trim());
        }
    }
    let load_before = load_average();
    let daemon_log = env.state_dir().join("bangerd.log");
    let log_len = || std::fs::metadata(&daemon_log).map_or(0, |m| m.len() as usize);
    let (mut create, mut run, mut named) = (Sides::default(), Sides::default(), Sides::default());
    for round in 0..n {
        if parts.contains(&Part::Create) {
            let name = format!("boot{round}");
            wait_for_spare(&env);
            let from = log_len();
            let (took, vm) = banger_boot(&env, &name);
            create.banger.push(took);
            let (stages, _) = operation(
                &wait_for_op(&daemon_log, from, &name, "create"),
                &name,
                "create",
            );
            create.host.push(stages);
            create.banger_tl.push(guest_timeline(
                &std::fs::read_to_string(vm.dir.join("serial.log")).unwrap_or_default(),
            ));
            env.banger(&["vm", "delete", &name]).ok();
            wait_for_spare(&env);
            let raw = raw_boot(&a, &tmpl, round, Part::Create);
            create.raw.push(raw.took);
            create.raw_tl.push(raw.timeline);
            eprintln!(
                "boot/round {round}: banger {:.2} s, raw {:.2} s",
                took.as_secs_f64(),
                raw.took.as_secs_f64()
            );
        }
        if parts.contains(&Part::Run) {
            let named_vm = format!("named{round}");
            for (sides, name) in [(&mut run, None), (&mut named, Some(named_vm.as_str()))] {
                wait_for_spare(&env);
                let from = log_len();
                let b = banger_run(&env, name);
                // The VM's name, then the delete's end (it may end after
                // the CLI).
                let created = op_lines(&daemon_log, from);
                let vm = created
                    .iter()
                    .find(|l| l.op == "create")
                    .map(|l| l.vm.clone())
                    .expect("vm run's create in the daemon log");
                let lines = wait_for_op(&daemon_log, from, &vm, "delete");
                let segments = run_segments(&lines, &vm, &b);
                sides
                    .detached
                    .push(segments.last().is_some_and(|(_, after)| *after < 0.0));
                sides.host.push(segments);
                sides.banger.push(b.took);
                sides.banger_tl.push(b.timeline);
            }
            wait_for_spare(&env);
            let raw = raw_boot(&a, &tmpl, round, Part::Run);
            run.raw.push(raw.took + raw.teardown);
            run.raw_to_end.push(raw.took);
            run.raw_tl.push(raw.timeline);
            eprintln!(
                "run/round {round}: banger {:.2} s (with --name {:.2} s), raw {:.2} s ({:.2} s to the command's exit + {:.3} s teardown)",
                run.banger[round].as_secs_f64(),
                named.banger[round].as_secs_f64(),
                (raw.took + raw.teardown).as_secs_f64(),
                raw.took.as_secs_f64(),
                raw.teardown.as_secs_f64()
            );
        }
    }
    println!(
        "boot/load average: {load_before} before, {} after",
        load_average()
    );
    if parts.contains(&Part::Create) {
        report_create(&create, n);
    }
    if parts.contains(&Part::Run) {
        report_run("run", "vm run --rm --cap vsock-agent -- true", &run, n);
        named.raw = run.raw.clone();
        named.raw_to_end = run.raw_to_end.clone();
        report_run(
            "run-named",
            "vm run --rm --name NAME --cap vsock-agent -- true",
            &named,
            n,
        );
    }
}
