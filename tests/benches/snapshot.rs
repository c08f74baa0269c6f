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
//! and restores, each VM killed after it is measured. Why this guest and
//! not a banger VM with its agent: QEMU 7.2 cannot migrate the agent's
//! vhost-user-vsock device (`docs/snapshots.md`), so this measures the
//! restore path itself.
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench snapshot`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use banger_vmm::Vmm;
use banger_vmm::qemu::{JailSettings, MIGRATION_FILE, Qemu, QemuAccel, QemuSettings};
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
}
