//! Snapshot restore against a cold boot, measured in the same run, on the
//! QEMU backend under the host's accelerator (TCG here).
//!
//! The guest is `test_infra::tick_guest`: a real kernel and an init that
//! prints `TICK n` every 50 ms. "Ready" is the first `TICK` on a console:
//!
//! - cold: from `Vmm::launch` until the booted guest prints its first tick
//!   (kernel boot, initramfs unpack, init start);
//! - restore: from `Vmm::restore_recorded` (a new QEMU with `-incoming
//!   defer`, the migration stream handed over QMP, `cont`) until the
//!   restored guest prints a tick.
//!
//! One snapshot of a running guest is taken first (its time and size are
//! printed); then `BANGER_BENCH_ROUNDS` (default 3) alternating cold boots
//! and restores, each VM killed after it is measured. This measures the
//! restore path of the backend itself.
//!
//! Then the same through the CLI (`snapshot/cli`), what a user waits for:
//! the default Debian image (`guest/rootfs/build`, with systemd and sshd)
//! pulled from a loopback registry, under `qemu_agent_transport = "serial"`
//! (QEMU 7.2 cannot migrate vhost-user-vsock, `docs/snapshots.md`). One VM
//! is created and snapshotted, then alternating rounds time `vm create` to
//! agent-ready against `vm create --from-snapshot` to agent-ready (the
//! guest re-identified), each VM deleted after; the restore's daemon
//! stages are printed. Skipped, saying why, without the guest artifacts.
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench snapshot`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use banger_vmm::Vmm;
use banger_vmm::qemu::{JailSettings, MIGRATION_FILE, Qemu, QemuAccel, QemuSettings};
use test_infra::BangerEnv;
use test_infra::guest_artifacts::GuestArtifacts;
use test_infra::registry::Registry;
use test_infra::tick_guest::{kernel, on_path, tick_initrd, tick_vm, ticks};

const DEFAULT_ROUNDS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// Polls the console `log` until it shows a tick; the time it took.
fn until_ticking(log: &Path, since: Instant) -> Duration {
    while ticks(log).is_empty() {
        assert!(
            since.elapsed() < READY_TIMEOUT,
            "no tick on {} within {READY_TIMEOUT:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    since.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let (Some(qemu), Some(k)) = (on_path("qemu-system-x86_64"), kernel()) else {
        println!(
            "snapshot: SKIP: needs qemu-system-x86_64 and a kernel (BANGER_TEST_KERNEL or ~/.cache/banger-ci/kernel/boot/vmlinuz-*)"
        );
        return;
    };
    let rounds: usize = std::env::var("BANGER_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_ROUNDS)
        .max(1);
    let dir = tempfile::Builder::new()
        .prefix("snb")
        .tempdir_in("/tmp")
        .unwrap();
    let d = dir.path();
    let initrd = match tick_initrd(d) {
        Ok(p) => p,
        Err(why) => return println!("snapshot: SKIP: {why}"),
    };
    // Unjailed: QEMU cannot migrate a chrooted VM's disks.
    let vmm = Qemu::new(QemuSettings {
        qemu_bin: qemu,
        accel: QemuAccel::Auto,
        jail: JailSettings {
            enabled: false,
            cgroups: false,
            ..JailSettings::default()
        },
        ..QemuSettings::default()
    });
    println!("snapshot: accelerator {:?}, {rounds} rounds", vmm.accel());

    let (source, source_paths) = tick_vm(d, "src", &k, &initrd);
    let p = vmm.launch(&source, &source_paths).unwrap();
    until_ticking(&source.serial_log, Instant::now());
    let snap = d.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let started = Instant::now();
    vmm.snapshot(&p, &snap, &mut || {
        std::fs::copy(&source.drives[0].path, snap.join("root.img"))
            .map(drop)
            .map_err(|e| banger_vmm::VmmError::Io("copying the disk".into(), e))
    })
    .unwrap();
    let took = started.elapsed();
    vmm.kill(&p).unwrap();
    let size = std::fs::metadata(snap.join(MIGRATION_FILE)).unwrap().len();
    println!(
        "snapshot: taking one of a {} MiB guest: {:.0} ms, migration stream {:.1} MiB",
        source.memory_mib,
        took.as_secs_f64() * 1e3,
        size as f64 / f64::from(1 << 20)
    );

    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (m, paths) = tick_vm(d, &format!("c{round}"), &k, &initrd);
        let since = Instant::now();
        let p = vmm.launch(&m, &paths).unwrap();
        cold.push(until_ticking(&m.serial_log, since));
        vmm.kill(&p).unwrap();

        let (m, paths) = tick_vm(d, &format!("r{round}"), &k, &initrd);
        std::fs::copy(snap.join("root.img"), &m.drives[0].path).unwrap();
        let since = Instant::now();
        let p = vmm
            .restore_recorded(&m, &paths, &snap, &mut |_| Ok(()))
            .unwrap();
        restored.push(until_ticking(&m.serial_log, since));
        vmm.kill(&p).unwrap();
        println!(
            "snapshot: round {round}: cold boot {:.0} ms, restore {:.0} ms",
            cold[round].as_secs_f64() * 1e3,
            restored[round].as_secs_f64() * 1e3
        );
    }
    let (c, r) = (median(cold), median(restored));
    println!(
        "snapshot: median cold boot to first tick {:.0} ms, restore to a tick {:.0} ms: restore = {:.1} % of a cold boot (target <= 10 %)",
        c.as_secs_f64() * 1e3,
        r.as_secs_f64() * 1e3,
        100.0 * r.as_secs_f64() / c.as_secs_f64()
    );
    cli_round_trip(rounds);
}

/// `vm create` (or `vm create --from-snapshot SNAP`) of `name`, to
/// agent-ready: the time the CLI took.
fn create(env: &BangerEnv, name: &str, extra: &[&str]) -> Duration {
    let mut args = vec!["vm", "create", "--name", name];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let out = env.banger(&args);
    let took = started.elapsed();
    if out.code != 0 {
        let logs = env.banger(&["vm", "logs", name]).stdout;
        panic!("vm create {name} failed:\n{}\nconsole:\n{logs}", out.stderr);
    }
    took
}

/// The daemon's `stage=S took=Nms` lines of `vm`'s create, in order.
fn stages(env: &BangerEnv, vm: &str) -> Vec<(String, f64)> {
    let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap_or_default();
    let tag = format!(" vm={vm} op=create stage=");
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(&tag)? + tag.len()..];
            let (stage, took) = rest.split_once(" took=")?;
            let ms: f64 = took.trim().strip_suffix("ms")?.parse().ok()?;
            Some((stage.trim_matches('"').to_string(), ms))
        })
        .collect()
}

/// The CLI round trip: cold creates against restores of one snapshot.
fn cli_round_trip(rounds: usize) {
    let a = match GuestArtifacts::find() {
        Ok(a) => a,
        Err(why) => return println!("snapshot/cli: SKIP: {why}"),
    };
    let Some(registry) = Registry::start("snapshot") else {
        return println!("snapshot/cli: SKIP: no registry (docker-registry)");
    };
    let reference = registry.push_rootfs_tar("banger/debian:bookworm", &a.rootfs_tar);
    let env = BangerEnv::new();
    env.write_config(&format!(
        "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nqemu_agent_transport = \"serial\"\nagent_bin = {:?}\n\
         agent_timeout_secs = 240\ninsecure_registries = [{:?}]\nqemu_bin = {:?}\nvmm_jail = false\n\
         default_caps = [\"work-disk\", \"network\", \"dns\", \"vsock-agent\"]\n",
        a.agent,
        registry.host(),
        a.qemu
    ));
    env.banger(&[
        "kernel",
        "import",
        "fc",
        "--from",
        a.kernel_dir.to_str().unwrap(),
    ])
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
    let shape = ["--memory", "1024", "--disk-size", "256M"];
    create(&env, "src", &shape);
    let started = Instant::now();
    env.banger(&["vm", "snapshot", "src", "s1"]).ok();
    println!(
        "snapshot/cli: vm snapshot of a running default-image guest: {:.0} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    env.banger(&["vm", "delete", "src"]).ok();

    let (mut cold, mut restored) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let name = format!("cold{round}");
        cold.push(create(&env, &name, &shape));
        env.banger(&["vm", "delete", &name]).ok();
        let name = format!("warm{round}");
        restored.push(create(&env, &name, &["--from-snapshot", "s1"]));
        let split: Vec<String> = stages(&env, &name)
            .iter()
            .filter(|(_, ms)| *ms >= 1.0)
            .map(|(s, ms)| format!("{s} {ms:.0}"))
            .collect();
        env.banger(&["vm", "delete", &name]).ok();
        println!(
            "snapshot/cli: round {round}: vm create {:.0} ms, vm create --from-snapshot {:.0} ms (stages >= 1 ms: {})",
            cold[round].as_secs_f64() * 1e3,
            restored[round].as_secs_f64() * 1e3,
            split.join(", ")
        );
    }
    let (c, r) = (median(cold), median(restored));
    println!(
        "snapshot/cli: median vm create to agent-ready {:.0} ms, from the snapshot {:.0} ms: restore = {:.1} % of a cold create (target <= 10 %)",
        c.as_secs_f64() * 1e3,
        r.as_secs_f64() * 1e3,
        100.0 * r.as_secs_f64() / c.as_secs_f64()
    );
    env.banger(&["vm", "snapshot", "rm", "s1"]).ok();
    env.banger(&["daemon", "stop"]).ok();
    warm_pool(&env, rounds, &shape);
}

/// The warm pool (`docs/warm-pool.md`) on the same env: `warm_pool = 1`
/// with the pulled image as the default, then alternating rounds of a cold
/// `vm create --name` against a `vm create` that takes the pooled VM, both
/// to agent-ready, and of `vm run --rm -- true` (through the agent) cold
/// against from the pool. Each round starts with the pool refilled (its
/// refill is not timed, and not running while a round is timed).
fn warm_pool(env: &BangerEnv, rounds: usize, shape: &[&str]) {
    let images: Vec<banger_api::model::ImageRecord> =
        serde_json::from_str(&env.banger(&["image", "list", "--json"]).ok().stdout).unwrap();
    let image = &images[0].name;
    let base = std::fs::read_to_string(env.root().join("config/banger/config.toml")).unwrap();
    // `write_config` appends its own keys first: keep only what the CLI
    // part set, then the pool's, then the default shape (a table, last).
    let extra: String = base
        .lines()
        .filter(|l| !l.starts_with("firecracker_bin") && !l.starts_with("stop_timeout_secs"))
        .map(|l| format!("{l}\n"))
        .collect();
    env.write_config(&format!(
        "{extra}warm_pool = 1\ndefault_image_name = {image:?}\n[vm_defaults]\nmemory_mib = 1024\ndisk_size = \"256M\"\n"
    ));
    // `image list` started a daemon on the old config.
    env.banger(&["daemon", "stop"]).ok();
    let ready = || {
        test_infra::wait_until(READY_TIMEOUT, "the warm pool holds a running VM", || {
            let p: banger_api::api::PoolView =
                serde_json::from_str(&env.banger(&["vm", "pool", "--json"]).ok().stdout).unwrap();
            p.vms.len() == 1 && p.vms[0].record.state == banger_api::model::VmState::Running
        })
    };
    let timed = |args: &[&str]| {
        let started = Instant::now();
        let out = env.banger(args);
        let took = started.elapsed();
        assert_eq!(out.code, 0, "banger {args:?}: {out:?}");
        (took, out)
    };
    let mut results: [Vec<Duration>; 4] = Default::default();
    for round in 0..rounds {
        ready();
        let name = format!("pcold{round}");
        let mut cold_args = vec!["vm", "create", "--name", &name];
        cold_args.extend_from_slice(shape);
        results[0].push(timed(&cold_args).0);
        env.banger(&["vm", "delete", &name]).ok();
        let (took, out) = timed(&["vm", "create"]);
        assert!(
            out.stderr.contains("warm pool"),
            "not taken from the pool: {out:?}"
        );
        results[1].push(took);
        let taken = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(|n| n.trim().to_string())
            .unwrap();
        env.banger(&["vm", "delete", &taken]).ok();
        ready();
        let name = format!("rcold{round}");
        results[2].push(timed(&["vm", "run", "--name", &name, "--rm", "--", "true"]).0);
        ready();
        let (took, out) = timed(&["vm", "run", "--rm", "--", "true"]);
        assert!(
            out.stderr.contains("warm pool"),
            "not taken from the pool: {out:?}"
        );
        results[3].push(took);
        let ms = |v: &Vec<Duration>| v[round].as_secs_f64() * 1e3;
        println!(
            "pool/cli: round {round}: vm create {:.0} ms, from the pool {:.0} ms; vm run --rm -- true {:.0} ms, from the pool {:.0} ms",
            ms(&results[0]),
            ms(&results[1]),
            ms(&results[2]),
            ms(&results[3])
        );
    }
    let [c, p, rc, rp] = results.map(median);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "pool/cli: median vm create to agent-ready {:.0} ms, from the warm pool {:.0} ms: {:.1} % of a cold create (target <= 10 %)",
        ms(c),
        ms(p),
        100.0 * p.as_secs_f64() / c.as_secs_f64()
    );
    println!(
        "pool/cli: median vm run --rm -- true {:.0} ms, from the warm pool {:.0} ms: {:.1} %",
        ms(rc),
        ms(rp),
        100.0 * rp.as_secs_f64() / rc.as_secs_f64()
    );
    env.banger(&["daemon", "stop"]).ok();
}
