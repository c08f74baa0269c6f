//! A minimal real guest for snapshot tests and the snapshot bench: a
//! kernel and an initramfs whose init prints `TICK n` on the console every
//! 50 ms, so a console shows whether a guest booted (the kernel banner,
//! `TICK 0`) or went on from a snapshot (the count resumes where it was).

use std::fs;
use std::path::{Path, PathBuf};

use banger_api::machine::{Drive, DriveRole, MachineSpec};
use banger_capabilities::vsock_agent::initrd::build_initrd;
use banger_vmm::LaunchPaths;

/// The init's C source.
const TICK_INIT: &str = r#"
#include <stdio.h>
#include <time.h>
int main(void) {
  struct timespec t = {0, 50 * 1000 * 1000};
  for (unsigned long n = 0;; n++) {
    printf("TICK %lu\n", n); fflush(stdout);
    nanosleep(&t, 0);
  }
}
"#;

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `$BANGER_TEST_KERNEL`, else the newest `~/.cache/banger-ci/kernel/boot/vmlinuz-*`.
pub fn kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let dir = home().join(".cache/banger-ci/kernel/boot");
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains("vmlinuz-"))
        .collect();
    found.sort();
    found.pop()
}

/// vhost-device-vsock on `PATH` or where CI installs it.
pub fn vsock_backend() -> Option<PathBuf> {
    on_path("vhost-device-vsock").or_else(|| {
        let p = home().join(".cache/banger-ci/tools/bin/vhost-device-vsock");
        p.is_file().then_some(p)
    })
}

/// Compiles the ticking init (`cc -static`) and packs it as `dir/initrd`,
/// or says why it cannot.
pub fn tick_initrd(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("init.c");
    fs::write(&src, TICK_INIT).map_err(|e| e.to_string())?;
    let init = dir.join("init");
    let built = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&init)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if !built.status.success() {
        return Err(format!(
            "cc -static failed (install libc6-dev): {}",
            String::from_utf8_lossy(&built.stderr)
        ));
    }
    let out = dir.join("initrd");
    build_initrd(&init, None, &out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The `TICK` numbers on the console log `log`, in order.
pub fn ticks(log: &Path) -> Vec<u64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("TICK ")?.parse().ok())
        .collect()
}

/// One ticking VM's files under `dir/<name>` (its own 1 MiB disk and
/// console; the QMP socket beside, short), 1 vCPU and 128 MiB.
pub fn tick_vm(dir: &Path, name: &str, kernel: &Path, initrd: &Path) -> (MachineSpec, LaunchPaths) {
    let d = dir.join(name);
    let made = fs::create_dir_all(&d).and_then(|()| {
        let disk = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(d.join("root.img"))?;
        if disk.metadata()?.len() == 0 {
            disk.set_len(1 << 20)?;
        }
        Ok(())
    });
    if let Err(e) = made {
        panic!("cannot make {}: {e}", d.display());
    }
    let machine = MachineSpec {
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd.to_path_buf()),
        boot_args: "console=ttyS0".into(),
        vcpus: 1,
        memory_mib: 128,
        drives: vec![Drive {
            id: "root".into(),
            path: d.join("root.img"),
            read_only: false,
            role: DriveRole::Root,
        }],
        nics: vec![],
        vsock: None,
        serial_log: d.join("serial.log"),
        pci_devices: Vec::new(),
    };
    let paths = LaunchPaths {
        vm_dir: d.clone(),
        api_socket: dir.join(format!("{name}.q")),
        vmm_log: d.join("qemu.log"),
    };
    (machine, paths)
}
