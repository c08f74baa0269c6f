//! The QEMU backend against the real `qemu-system-x86_64` under TCG, booting
//! a real kernel: console capture, its own session, kill, shutdown with the
//! kill fallback, the vhost-device-vsock sidecar's lifecycle, and clear
//! errors for missing binaries.
//!
//! Kernel: `$BANGER_TEST_KERNEL`, else `/boot/vmlinuz-*`, else
//! `~/.cache/banger-ci/kernel/boot/vmlinuz-*` (CI extracts Debian's
//! linux-image there). vhost-device-vsock: `$BANGER_VHOST_DEVICE_VSOCK`, else
//! `PATH`, else `~/.cache/banger-ci/tools/bin/`. The guest-userspace test
//! also needs `cc` with a static libc and, for a modular kernel, its modules
//! under `<prefix>/lib/modules/<version>/` beside `<prefix>/boot/vmlinuz-<version>`.
//!
//! The real-agent test boots the static agent (`scripts/build-agent`) on a
//! distribution kernel with banger's boot modules archive: an unpacked
//! linux-image package (`boot/`, `lib/modules/<version>/` with
//! `modules.builtin`, optionally an ELF `vmlinux` at its top) from
//! `$BANGER_TEST_DISTRO_KERNEL`, else `~/.cache/banger-ci/kernel`.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use banger_api::machine::{Drive, DriveRole, MachineSpec, PciDevice, Vsock};
    use banger_api::model::VmmProcess;
    use banger_artifacts::kernels::{BootModules, DEFAULT_BOOT_MODULES, boot_modules_archive};
    use banger_capabilities::vsock_agent::initrd::build_initrd;
    use banger_guest_protocol::bundle::GuestConfig;
    use banger_guest_protocol::drive::ConfigDrive;
    use banger_vmm::qemu::{AgentTransport, Qemu, QemuAccel, QemuSettings};
    use banger_vmm::vsock::AgentClient;
    use banger_vmm::{LaunchPaths, Vmm, VmmError, process_alive};
    use nix::unistd::{Pid, getsid};
    use tempfile::TempDir;
    use test_infra::wait_until;

    /// Booting under TCG on a loaded 2-core host can be slow.
    const BOOT: Duration = Duration::from_secs(180);

    /// TCG guests share 2 cores: two booting at once each take several
    /// times as long, so the tests that boot one take turns. Held by
    /// [`World`], which every test drops last (after its VM is killed).
    static ONE_GUEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn skip(test: &str, why: &str) {
        eprintln!("SKIPPED {test}: {why}");
    }

    fn home() -> PathBuf {
        std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
    }

    fn first_vmlinuz(dir: &Path) -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        found.sort();
        found.pop()
    }

    fn kernel() -> Option<PathBuf> {
        if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
            return Some(PathBuf::from(k));
        }
        first_vmlinuz(Path::new("/boot"))
            .or_else(|| first_vmlinuz(&home().join(".cache/banger-ci/kernel/boot")))
    }

    fn on_path(name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }

    fn qemu_bin() -> Option<PathBuf> {
        on_path("qemu-system-x86_64")
    }

    fn vsock_backend_bin() -> Option<PathBuf> {
        if let Some(b) = std::env::var_os("BANGER_VHOST_DEVICE_VSOCK") {
            return Some(PathBuf::from(b));
        }
        on_path("vhost-device-vsock").or_else(|| {
            let p = home().join(".cache/banger-ci/tools/bin/vhost-device-vsock");
            p.is_file().then_some(p)
        })
    }

    /// Everything a real boot needs, or the reason to skip.
    fn requirements(test: &str) -> Option<(PathBuf, PathBuf)> {
        let Some(q) = qemu_bin() else {
            skip(
                test,
                "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
            );
            return None;
        };
        let Some(k) = kernel() else {
            skip(
                test,
                "no kernel: set BANGER_TEST_KERNEL or extract a Debian linux-image to ~/.cache/banger-ci/kernel",
            );
            return None;
        };
        Some((q, k))
    }

    /// One test's world: a short temp dir (Unix socket paths are < 108
    /// bytes), two small raw drives, the machine and its launch paths.
    struct World {
        dir: TempDir,
        machine: MachineSpec,
        paths: LaunchPaths,
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    impl World {
        fn new(kernel: &Path) -> Self {
            // A test that panicked while holding the lock still released
            // its guest (Guard drops first), so a poisoned lock is fine.
            let turn = ONE_GUEST_AT_A_TIME
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let dir = tempfile::Builder::new()
                .prefix("qm")
                .tempdir_in("/tmp")
                .unwrap();
            let d = dir.path();
            for f in ["root.img", "config.img"] {
                fs::File::create(d.join(f))
                    .unwrap()
                    .set_len(1 << 20)
                    .unwrap();
            }
            let machine = MachineSpec {
                kernel: kernel.to_path_buf(),
                initrd: None,
                // No root device: the kernel prints its banner, then waits
                // (panic=0) without ever handling a power button.
                boot_args: "console=ttyS0".into(),
                vcpus: 1,
                memory_mib: 256,
                drives: vec![
                    Drive {
                        id: "root".into(),
                        path: d.join("root.img"),
                        read_only: false,
                        role: DriveRole::Root,
                    },
                    Drive {
                        id: "config".into(),
                        path: d.join("config.img"),
                        read_only: true,
                        role: DriveRole::Config,
                    },
                ],
                nics: vec![],
                vsock: None,
                serial_log: d.join("vm/serial.log"),
                pci_devices: Vec::new(),
            };
            let paths = LaunchPaths {
                vm_dir: d.join("vm"),
                api_socket: d.join("q.sock"),
                vmm_log: d.join("vm/qemu.log"),
            };
            World {
                dir,
                machine,
                paths,
                _turn: turn,
            }
        }

        fn serial(&self) -> String {
            fs::read_to_string(&self.machine.serial_log).unwrap_or_default()
        }

        fn wait_for_banner(&self) {
            wait_until(BOOT, "the serial log shows the kernel banner", || {
                self.serial().contains("Linux version")
            });
        }

        fn leftovers(&self) -> Vec<String> {
            fs::read_dir(self.dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("sock"))
                .collect()
        }
    }

    fn settings(qemu: PathBuf) -> QemuSettings {
        QemuSettings {
            qemu_bin: qemu,
            accel: QemuAccel::Tcg,
            ..QemuSettings::default()
        }
    }

    /// Kills a launched VM if the test fails before doing so itself.
    struct Guard<'a>(&'a Qemu, Option<VmmProcess>);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if let Some(p) = self.1.take() {
                let _ = self.0.kill(&p);
            }
        }
    }

    /// Pids of live processes whose command line mentions `needle`.
    fn processes_mentioning(needle: &str) -> Vec<i32> {
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                    && test_infra::pid_alive(*pid)
            })
            .collect()
    }

    #[test]
    fn boots_a_real_kernel_in_its_own_session_and_kill_removes_it() {
        let Some((q, k)) =
            requirements("boots_a_real_kernel_in_its_own_session_and_kill_removes_it")
        else {
            return;
        };
        let w = World::new(&k);
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        w.wait_for_banner();
        assert!(process_alive(&p));
        let pid = Pid::from_raw(p.pid as i32);
        assert_eq!(
            getsid(Some(pid)).unwrap(),
            pid,
            "qemu leads its own session"
        );
        assert_ne!(getsid(None).unwrap(), pid);

        vmm.kill(&p).unwrap();
        guard.1 = None;
        assert!(!process_alive(&p));
        assert!(!w.paths.api_socket.exists(), "QMP socket removed");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn shutdown_kills_after_grace_when_the_guest_ignores_the_power_button() {
        let test = "shutdown_kills_after_grace_when_the_guest_ignores_the_power_button";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let w = World::new(&k);
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        w.wait_for_banner();

        let grace = Duration::from_secs(2);
        let started = Instant::now();
        vmm.shutdown(&p, grace).unwrap();
        let took = started.elapsed();
        guard.1 = None;
        assert!(!process_alive(&p));
        // The power-button request was accepted and ignored, so the whole
        // grace period passed before the kill (a failed QMP request would
        // skip straight to the kill).
        assert!(took >= grace, "shutdown returned after {took:?}");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    /// The uid, gid, root directory and cgroup lines of a live process.
    fn confinement_of(pid: u32) -> (Vec<u32>, Vec<u32>, PathBuf, String) {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let ids = |key: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        let root = fs::read_link(format!("/proc/{pid}/root")).unwrap();
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        (ids("Uid:"), ids("Gid:"), root, cgroups)
    }

    #[test]
    fn qemu_runs_as_its_own_uid_in_an_empty_root_and_cgroup_and_cannot_read_another_vms_disk() {
        let test =
            "qemu_runs_as_its_own_uid_in_an_empty_root_and_cgroup_and_cannot_read_another_vms_disk";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        if !nix::unistd::Uid::effective().is_root() {
            return skip(test, "QEMU drops to the VM's uid only under a root daemon");
        }
        let w = World::new(&k);
        // Another VM's disk, as the daemon leaves it: root's, mode 0600.
        let other = tempfile::tempdir().unwrap();
        let other_disk = other.path().join("root.ext4");
        fs::write(&other_disk, "another VM's data").unwrap();
        fs::set_permissions(&other_disk, fs::Permissions::from_mode(0o600)).unwrap();

        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        // The guest still boots after QEMU dropped its privileges.
        w.wait_for_banner();
        let (uids, gids, root, cgroups) = confinement_of(p.pid);
        let uid = uids[0];
        assert!(uids.iter().all(|u| *u == uid) && uid != 0, "uids {uids:?}");
        assert!(
            gids.iter().all(|g| *g == uid),
            "gids {gids:?} for uid {uid}"
        );
        assert!(uid >= banger_api::backend::DEFAULT_VMM_UID_BASE, "{uid}");
        assert_eq!(root, w.paths.vm_dir.join("qemu-root"));
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "the root is empty");
        let seccomp = fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap();
        assert!(
            seccomp.contains("Seccomp:\t2"),
            "no seccomp filter: {seccomp}"
        );
        assert!(cgroups.contains("/banger/vm\n"), "{cgroups}");
        // That uid cannot read another VM's disk even where it can see it.
        let read = std::process::Command::new("head")
            .args(["-c", "1"])
            .arg(&other_disk)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        assert!(
            !read.status.success(),
            "uid {uid} read {}",
            other_disk.display()
        );
        assert!(
            String::from_utf8_lossy(&read.stderr).contains("Permission denied"),
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );

        vmm.kill(&p).unwrap();
        guard.1 = None;
        assert!(!process_alive(&p));
        let cgroup_dirs: Vec<&str> = cgroups
            .lines()
            .filter_map(|l| l.rsplit(':').next())
            .filter(|path| path.ends_with("/banger/vm"))
            .collect();
        assert!(!cgroup_dirs.is_empty());
        for line in cgroups.lines() {
            // hierarchy-id:controllers:path; the directory is gone from
            // every hierarchy it was made in.
            let mut f = line.splitn(3, ':');
            let (_, controllers, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
            if !path.ends_with("/banger/vm") {
                continue;
            }
            let mount = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
                "/sys/fs/cgroup".to_string()
            } else if controllers.is_empty() {
                "/sys/fs/cgroup/unified".to_string()
            } else {
                format!("/sys/fs/cgroup/{controllers}")
            };
            let dir = PathBuf::from(mount).join(path.trim_start_matches('/'));
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn shutdown_of_an_exited_vm_just_cleans_up() {
        let Some((q, k)) = requirements("shutdown_of_an_exited_vm_just_cleans_up") else {
            return;
        };
        let mut w = World::new(&k);
        // The guest panics (no root fs) and panic=-1 reboots it at once;
        // -no-reboot turns that into QEMU exiting on its own.
        w.machine.boot_args = "console=ttyS0 panic=-1 tsc_early_khz=2000000".into();
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        wait_until(BOOT, "the guest reboots and qemu exits", || {
            !process_alive(&p)
        });
        let started = Instant::now();
        vmm.shutdown(&p, Duration::from_secs(30)).unwrap();
        guard.1 = None;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(w.serial().contains("Kernel panic"), "{}", w.serial());
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn vsock_backend_starts_with_the_vm_and_stops_with_it() {
        let test = "vsock_backend_starts_with_the_vm_and_stops_with_it";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let Some(backend) = vsock_backend_bin() else {
            skip(
                test,
                "vhost-device-vsock not installed (cargo install vhost-device-vsock --root ~/.cache/banger-ci/tools)",
            );
            return;
        };
        let mut w = World::new(&k);
        let (vmm, uds) = with_vsock(&mut w, q, backend, 42);
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        // QEMU got through the vhost-user handshake (it refuses to start
        // otherwise) and the guest runs with shared memory.
        w.wait_for_banner();
        let uds_str = uds.to_string_lossy().into_owned();
        let backends = processes_mentioning(&format!("uds-path={uds_str}"));
        assert_eq!(backends.len(), 1, "one vhost-device-vsock for this VM");
        let pid = Pid::from_raw(backends[0]);
        assert_eq!(
            getsid(Some(pid)).unwrap(),
            pid,
            "backend leads its own session"
        );
        wait_until(
            Duration::from_secs(10),
            "the hybrid vsock socket exists",
            || uds.exists(),
        );

        vmm.kill(&p).unwrap();
        guard.1 = None;
        assert!(!process_alive(&p));
        assert!(
            processes_mentioning(&format!("uds-path={uds_str}")).is_empty(),
            "vhost-device-vsock stopped with the VM"
        );
        assert!(!uds.exists(), "hybrid vsock socket removed");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    /// A static /init: loads the modules banger's boot modules archive lists
    /// in /banger/modules.load (virtio, vsock, power button),
    /// prints each virtio disk's size and device, then powers off on
    /// KEY_POWER, so the host can see drive order and a graceful stop. It
    /// also greets every connection on vsock port 1024.
    const PROBE_INIT: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <fcntl.h>
#include <unistd.h>
#include <dirent.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <sys/reboot.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <linux/input.h>
#include <linux/vm_sockets.h>
int main(void) {
  mount("proc", "/proc", "proc", 0, 0);
  mount("sysfs", "/sys", "sysfs", 0, 0);
  mount("dev", "/dev", "devtmpfs", 0, 0);
  FILE *list = fopen("/banger/modules.load", "r"); char line[512];
  while (list && fgets(line, sizeof line, list)) {
    line[strcspn(line, "\n")] = 0;
    int fd = open(line, O_RDONLY);
    if (fd >= 0) { syscall(SYS_finit_module, fd, "", 0); close(fd); }
  }
  for (int t = 0; t < 100 && access("/sys/block/vdc", F_OK) != 0; t++) usleep(100000);
  for (char c = 'a'; c <= 'z'; c++) {
    char p[64]; snprintf(p, sizeof p, "/sys/block/vd%c/size", c);
    FILE *f = fopen(p, "r"); if (!f) continue;
    long s = 0; if (fscanf(f, "%ld", &s) != 1) s = -1; fclose(f);
    printf("DISK vd%c %ld\n", c, s);
  }
  /* A vsock listener on port 1024 greets every connection. */
  int ls = socket(AF_VSOCK, SOCK_STREAM, 0);
  struct sockaddr_vm a = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = 1024};
  if (ls >= 0 && bind(ls, (struct sockaddr *)&a, sizeof a) == 0 && listen(ls, 4) == 0) {
    printf("VSOCK LISTENING\n"); fflush(stdout);
    if (fork() == 0) {
      for (;;) {
        int c = accept(ls, 0, 0);
        if (c >= 0) { write(c, "hello from the guest\n", 21); close(c); }
      }
    }
  }
  int fds[16], n = 0; DIR *d = opendir("/dev/input"); struct dirent *e;
  while (d && (e = readdir(d)) && n < 16) {
    if (strncmp(e->d_name, "event", 5)) continue;
    char p[64]; snprintf(p, sizeof p, "/dev/input/%s", e->d_name);
    int fd = open(p, O_RDONLY); if (fd >= 0) fds[n++] = fd;
  }
  printf("READY inputs=%d\n", n); fflush(stdout);
  for (;;) {
    if (n == 0) { pause(); continue; }
    fd_set s; FD_ZERO(&s); int mx = 0;
    for (int i = 0; i < n; i++) { FD_SET(fds[i], &s); if (fds[i] > mx) mx = fds[i]; }
    if (select(mx + 1, &s, 0, 0, 0) <= 0) continue;
    for (int i = 0; i < n; i++) {
      struct input_event ev;
      if (FD_ISSET(fds[i], &s) && read(fds[i], &ev, sizeof ev) == sizeof ev
          && ev.type == EV_KEY && ev.code == KEY_POWER) {
        printf("POWER KEY\n"); fflush(stdout); sync(); reboot(RB_POWER_OFF);
      }
    }
  }
}
"#;

    /// The modules the probe init needs, by name.
    const PROBE_MODULES: &[&str] = &[
        "virtio_mmio",
        "virtio_blk",
        "button",
        "evdev",
        "vsock",
        "vmw_vsock_virtio_transport",
    ];

    /// The unpacked package and version of `kernel`
    /// (`X/boot/vmlinuz-V` → `X`, `V`) when `X/lib/modules/V` exists.
    fn modules_of(kernel: &Path) -> Option<(PathBuf, String)> {
        let version = kernel.file_name()?.to_str()?.strip_prefix("vmlinuz-")?;
        let prefix = kernel.parent()?.parent()?;
        prefix
            .join("lib/modules")
            .join(version)
            .is_dir()
            .then(|| (prefix.to_path_buf(), version.to_owned()))
    }

    /// `init` as /init on top of banger's boot modules archive of kernel
    /// `version` in `prefix` for `wanted`, built by the same code the kernel
    /// store uses, written to `dir/initrd`.
    fn initrd_with_modules(
        dir: &Path,
        init: &Path,
        (prefix, version): (&Path, &str),
        wanted: &[&str],
    ) -> Result<(PathBuf, BootModules), String> {
        let modules = boot_modules_archive(prefix, version, wanted)
            .map_err(|e| format!("cannot build the boot modules archive: {e}"))?;
        let archive = dir.join("modules.cpio");
        modules.write(&archive).map_err(|e| e.to_string())?;
        let out = dir.join("initrd");
        build_initrd(init, Some(&archive), &out).map_err(|e| e.to_string())?;
        Ok((out, modules))
    }

    /// Gives `w`'s machine a vsock device with `cid` and returns the QEMU
    /// backend that serves it through `backend`, and the hybrid socket.
    fn with_vsock(w: &mut World, q: PathBuf, backend: PathBuf, cid: u32) -> (Qemu, PathBuf) {
        let uds = w.dir.path().join("v.sock");
        w.machine.vsock = Some(Vsock {
            guest_cid: cid,
            uds_path: uds.clone(),
        });
        let vmm = Qemu::new(QemuSettings {
            vhost_device_vsock_bin: backend,
            agent_transport: AgentTransport::Vsock,
            ..settings(q)
        });
        (vmm, uds)
    }

    /// Builds the probe initramfs in `dir`, or says why it cannot.
    fn probe_initramfs(dir: &Path, kernel: &Path) -> Result<PathBuf, String> {
        let (prefix, version) = modules_of(kernel).ok_or_else(|| {
            format!(
                "no modules directory for {} (need virtio_mmio, virtio_blk, button, evdev)",
                kernel.display()
            )
        })?;
        let init = static_init(dir, PROBE_INIT)?;
        initrd_with_modules(dir, &init, (&prefix, &version), PROBE_MODULES).map(|(p, _)| p)
    }

    /// Compiles the C program `source` statically to `dir/init`.
    fn static_init(dir: &Path, source: &str) -> Result<PathBuf, String> {
        let src = dir.join("init.c");
        fs::write(&src, source).unwrap();
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
        Ok(init)
    }

    /// An init that lists the guest's PCI devices from sysfs as
    /// `PCI <address> <vendor>:<device>`, then `PCI-DONE <count>`, and waits.
    /// It needs no modules: PCI enumeration is built into every x86 kernel.
    const PCI_PROBE_INIT: &str = r#"
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
static void id(const char *dev, const char *attr, char *out) {
  char p[256]; snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/%s", dev, attr);
  FILE *f = fopen(p, "r"); out[0] = 0;
  if (f) { if (fscanf(f, "0x%15s", out) != 1) out[0] = 0; fclose(f); }
}
int main(void) {
  mkdir("/sys", 0755);
  mount("sysfs", "/sys", "sysfs", 0, 0);
  int n = 0; DIR *d = opendir("/sys/bus/pci/devices"); struct dirent *e;
  while (d && (e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char v[16], dv[16]; id(e->d_name, "vendor", v); id(e->d_name, "device", dv);
    printf("PCI %s %s:%s\n", e->d_name, v, dv); n++;
  }
  printf("PCI-DONE %d\n", n); fflush(stdout);
  for (;;) pause();
}
"#;

    #[test]
    fn guest_sees_emulated_pci_devices_on_the_pcie_machine_and_none_without_them() {
        let test = "guest_sees_emulated_pci_devices_on_the_pcie_machine_and_none_without_them";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let mut w = World::new(&k);
        let init = match static_init(w.dir.path(), PCI_PROBE_INIT) {
            Ok(p) => p,
            Err(why) => return skip(test, &why),
        };
        let initrd = w.dir.path().join("pci-initrd");
        build_initrd(&init, None, &initrd).unwrap();
        w.machine.initrd = Some(initrd);
        w.machine.drives.clear();
        // The backend decides about `pci=off` (and adds the TCG clock).
        w.machine.boot_args = "console=ttyS0 panic=0".into();
        let vmm = Qemu::new(settings(q));
        let boot = |w: &World| -> Vec<String> {
            let p = vmm.launch(&w.machine, &w.paths).unwrap();
            let _guard = Guard(&vmm, Some(p));
            wait_until(BOOT, "the PCI probe init reports PCI-DONE", || {
                w.serial().contains("PCI-DONE")
            });
            let serial = w.serial();
            serial
                .lines()
                .filter(|l| l.starts_with("PCI"))
                .map(str::to_owned)
                .collect()
        };

        w.machine.pci_devices = vec![
            PciDevice::Emulated {
                model: "virtio-rng-pci".parse().unwrap(),
            },
            PciDevice::Emulated {
                model: "pci-testdev".parse().unwrap(),
            },
        ];
        let seen = boot(&w);
        // Vendor:device ids from the virtio spec (transitional entropy
        // device) and QEMU's docs/specs/pci-ids (pci-testdev, and the
        // PCIe host bridge of microvm's GPEX root).
        for id in ["1af4:1005", "1b36:0005", "1b36:0008"] {
            assert!(
                seen.iter().any(|l| l.ends_with(&format!(" {id}"))),
                "{id} not seen by the guest: {seen:?}"
            );
        }
        assert_eq!(
            seen.last().map(String::as_str),
            Some("PCI-DONE 3"),
            "{seen:?}"
        );

        // Without PCI devices: plain microvm and pci=off, so no bus at all.
        w.machine.pci_devices.clear();
        w.machine.serial_log = w.dir.path().join("vm/serial-no-pci.log");
        assert_eq!(boot(&w), ["PCI-DONE 0"]);
    }

    #[test]
    fn guest_sees_drives_in_attach_order_and_powers_off_on_shutdown() {
        let test = "guest_sees_drives_in_attach_order_and_powers_off_on_shutdown";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let mut w = World::new(&k);
        let initrd = match probe_initramfs(w.dir.path(), &k) {
            Ok(p) => p,
            Err(why) => return skip(test, &why),
        };
        // Sizes tell the drives apart inside the guest: 1, 2 and 3 MiB.
        let d = w.dir.path().to_path_buf();
        let drive = |id: &str, mib: u64, read_only, role| {
            let path = d.join(format!("{id}.img"));
            fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
            Drive {
                id: id.into(),
                path,
                read_only,
                role,
            }
        };
        w.machine.drives = vec![
            drive("root", 1, false, DriveRole::Root),
            drive("work", 2, false, DriveRole::Work),
            drive("config", 3, true, DriveRole::Config),
        ];
        w.machine.initrd = Some(initrd);
        // See docs/vmm.md: a stock kernel needs this under TCG on microvm.
        w.machine.boot_args = "console=ttyS0 tsc_early_khz=2000000".into();
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        wait_until(BOOT, "the probe init reports READY", || {
            w.serial().contains("READY")
        });
        let serial = w.serial();
        let disks: Vec<&str> = serial.lines().filter(|l| l.starts_with("DISK ")).collect();
        assert_eq!(
            disks,
            ["DISK vda 2048", "DISK vdb 4096", "DISK vdc 6144"],
            "{serial}"
        );
        assert!(
            !serial.contains("READY inputs=0"),
            "no power button seen:\n{serial}"
        );

        let grace = Duration::from_secs(60);
        let started = Instant::now();
        vmm.shutdown(&p, grace).unwrap();
        guard.1 = None;
        assert!(
            started.elapsed() < grace / 2,
            "the guest powered off by itself, long before the kill"
        );
        assert!(w.serial().contains("POWER KEY"), "{}", w.serial());
        assert!(!process_alive(&p));
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn host_reaches_a_guest_vsock_listener_through_the_hybrid_socket() {
        let test = "host_reaches_a_guest_vsock_listener_through_the_hybrid_socket";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let Some(backend) = vsock_backend_bin() else {
            return skip(test, "vhost-device-vsock not installed");
        };
        let mut w = World::new(&k);
        match probe_initramfs(w.dir.path(), &k) {
            Ok(p) => w.machine.initrd = Some(p),
            Err(why) => return skip(test, &why),
        }
        w.machine.boot_args = "console=ttyS0 tsc_early_khz=2000000".into();
        let (vmm, uds) = with_vsock(&mut w, q, backend, 3);
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let _guard = Guard(&vmm, Some(p));
        wait_until(BOOT, "the probe init reports READY", || {
            w.serial().contains("READY")
        });
        assert!(w.serial().contains("VSOCK LISTENING"), "{}", w.serial());

        // Firecracker's hybrid vsock protocol: CONNECT <port>, then OK <n>.
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"CONNECT 1024\n").unwrap();
        let mut r = BufReader::new(s);
        let mut ok = String::new();
        r.read_line(&mut ok).unwrap();
        let n = ok.strip_prefix("OK ").map(|n| n.trim().parse::<u32>());
        assert!(matches!(n, Some(Ok(_))), "handshake answer {ok:?}");
        let mut greeting = String::new();
        r.read_line(&mut greeting).unwrap();
        assert_eq!(greeting, "hello from the guest\n");
    }

    /// An unpacked distribution kernel package: its directory, the kernel
    /// to boot (the top-level ELF `vmlinux` when there is one, as banger's
    /// kernel store keeps it, else `boot/vmlinuz-<version>`) and its version.
    fn distro_kernel() -> Result<(PathBuf, PathBuf, String), String> {
        let dir = std::env::var_os("BANGER_TEST_DISTRO_KERNEL")
            .map_or_else(|| home().join(".cache/banger-ci/kernel"), PathBuf::from);
        let vmlinuz = first_vmlinuz(&dir.join("boot")).ok_or_else(|| {
            format!(
                "no boot/vmlinuz-* in {} (set BANGER_TEST_DISTRO_KERNEL to an unpacked linux-image package)",
                dir.display()
            )
        })?;
        let (_, version) = modules_of(&vmlinuz)
            .ok_or_else(|| format!("no lib/modules/<version>/ beside {}", vmlinuz.display()))?;
        // A package unpacked only in part cannot say what is built in.
        let builtin = dir
            .join("lib/modules")
            .join(&version)
            .join("modules.builtin");
        if !builtin.is_file() {
            return Err(format!(
                "no {}: unpack the whole lib/modules/<version>/ of the linux-image package",
                builtin.display()
            ));
        }
        let vmlinux = dir.join("vmlinux");
        let kernel = if vmlinux.is_file() { vmlinux } else { vmlinuz };
        Ok((dir, kernel, version))
    }

    #[test]
    fn real_agent_loads_distribution_kernel_modules_and_answers_healthz() {
        let test = "real_agent_loads_distribution_kernel_modules_and_answers_healthz";
        let Some(q) = qemu_bin() else {
            return skip(
                test,
                "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)",
            );
        };
        let Some(backend) = vsock_backend_bin() else {
            return skip(test, "vhost-device-vsock not installed");
        };
        let (kdir, kernel, version) = match distro_kernel() {
            Ok(k) => k,
            Err(why) => return skip(test, &why),
        };
        let agent = test_infra::target_dir()
            .parent()
            .map(|t| t.join("banger-agent"))
            .unwrap_or_default();
        if !agent.is_file() {
            return skip(
                test,
                &format!(
                    "no static agent at {} (run scripts/build-agent)",
                    agent.display()
                ),
            );
        }
        let mut w = World::new(&kernel);
        let d = w.dir.path().to_path_buf();

        // An empty ext4 root (the agent then stays PID 1 and serves its API)
        // and a real config drive after it.
        let root = d.join("root.img");
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&root)
            .arg("16M")
            .output();
        match mkfs {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => {
                return skip(
                    test,
                    &format!("cannot run mkfs.ext4 (apt-get install e2fsprogs): {e}"),
                );
            }
        }
        let config = ConfigDrive {
            drives: vec!["root".into(), "config".into()],
            guest: GuestConfig::new("modular"),
        };
        fs::write(d.join("config.img"), config.encode()).unwrap();

        let (initrd, modules) =
            initrd_with_modules(&d, &agent, (&kdir, &version), DEFAULT_BOOT_MODULES).unwrap();
        assert!(
            modules.loaded.iter().any(|m| m == "virtio_blk"),
            "this test wants a kernel with virtio_blk as a module: {modules:?}"
        );
        w.machine.initrd = Some(initrd);
        w.machine.kernel = kernel;
        w.machine.boot_args = "console=ttyS0 tsc_early_khz=2000000".into();
        let (vmm, uds) = with_vsock(&mut w, q, backend, 3);
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let _guard = Guard(&vmm, Some(p));
        let client = AgentClient::new(&uds, Duration::from_secs(5));
        wait_until(BOOT, "the agent answers /healthz over vsock", || {
            client.healthz().is_ok()
        });
        let health = client.healthz().unwrap();
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));

        // The console ends lines with CRLF.
        let serial = w.serial();
        let lines: Vec<&str> = serial.lines().map(str::trim_end).collect();
        let agent_lines: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("banger-agent: "))
            .collect();
        let loaded: Vec<&str> = agent_lines
            .iter()
            .filter_map(|l| l.strip_prefix("loaded module "))
            .collect();
        assert_eq!(loaded, modules.loaded, "load order:\n{serial}");
        assert!(
            !agent_lines.iter().any(|l| l.contains("FAILED")),
            "{serial}"
        );
        for line in [
            "read config drive /dev/vdb",
            "hostname modular",
            "mounted root /dev/vda",
            "switched root",
        ] {
            assert!(agent_lines.contains(&line), "missing {line:?}:\n{serial}");
        }
    }

    #[test]
    fn a_failed_qemu_start_stops_the_vsock_backend_too() {
        let test = "a_failed_qemu_start_stops_the_vsock_backend_too";
        let Some((q, _)) = requirements(test) else {
            return;
        };
        let Some(backend) = vsock_backend_bin() else {
            return skip(test, "vhost-device-vsock not installed");
        };
        let dir = tempfile::tempdir().unwrap();
        let mut w = World::new(&dir.path().join("missing-vmlinux"));
        let (vmm, uds) = with_vsock(&mut w, q, backend, 5);
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        assert!(err.to_string().contains("missing-vmlinux"), "{err}");
        let needle = format!("uds-path={}", uds.display());
        assert!(
            processes_mentioning(&needle).is_empty(),
            "backend left running"
        );
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    /// The ELF `vmlinux` inside a bzImage: the compressed payload the setup
    /// header points at (`setup_sects` at 0x1f1, `payload_offset` and
    /// `payload_length` at 0x248), zstd (Debian 12's cloud kernel) or xz
    /// (older Debian kernels).
    fn extract_vmlinux(bz: &Path, out: &Path) -> Result<(), String> {
        let data = fs::read(bz).map_err(|e| e.to_string())?;
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                .ok_or("the kernel image is too short for a setup header")
        };
        let setup_sects = match data.get(0x1f1) {
            Some(0) => 4,
            Some(n) => usize::from(*n),
            None => return Err("the kernel image is too short for a setup header".into()),
        };
        let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
        let payload = data
            .get(start..start + u32_at(0x24c)?)
            .ok_or("the payload lies outside the kernel image")?;
        let elf = if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            // The last 4 bytes are the decompressed size, not zstd data.
            zstd::decode_all(&payload[..payload.len().saturating_sub(4)])
                .map_err(|e| format!("cannot decompress the zstd payload: {e}"))?
        } else if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            let mut child = std::process::Command::new("xz")
                .args(["-dc", "--single-stream"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run xz: {e}"))?;
            let mut stdin = child.stdin.take().unwrap();
            let payload = payload.to_vec();
            // xz stops reading after the stream; a broken pipe there is fine.
            let feeder = std::thread::spawn(move || {
                let _ = stdin.write_all(&payload);
            });
            let done = child.wait_with_output().map_err(|e| e.to_string())?;
            let _ = feeder.join();
            done.stdout
        } else {
            return Err("the payload is neither zstd nor xz".into());
        };
        if !elf.starts_with(b"\x7fELF") {
            return Err("the payload is not an ELF image".into());
        }
        fs::write(out, elf).map_err(|e| e.to_string())
    }

    #[test]
    fn boots_an_elf_vmlinux_through_its_pvh_note() {
        let test = "boots_an_elf_vmlinux_through_its_pvh_note";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        let mut w = World::new(&k);
        let vmlinux = w.dir.path().join("vmlinux");
        if let Err(why) = extract_vmlinux(&k, &vmlinux) {
            return skip(
                test,
                &format!("cannot get an ELF vmlinux from {}: {why}", k.display()),
            );
        }
        w.machine.kernel = vmlinux;
        let vmm = Qemu::new(settings(q));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let _guard = Guard(&vmm, Some(p));
        w.wait_for_banner();
    }

    #[test]
    fn missing_qemu_binary_is_a_clear_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(&dir.path().join("vmlinux"));
        let bin = dir.path().join("no-such-qemu-system-x86_64");
        let vmm = Qemu::new(settings(bin.clone()));
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        assert!(
            matches!(&err, VmmError::Spawn { bin: b, .. } if *b == bin),
            "{err:?}"
        );
        assert!(err.to_string().contains(&*bin.to_string_lossy()), "{err}");
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }

    #[test]
    fn missing_vsock_backend_or_bridge_is_a_clear_error_and_starts_no_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = World::new(&dir.path().join("vmlinux"));
        w.machine.vsock = Some(Vsock {
            guest_cid: 3,
            uds_path: w.dir.path().join("v.sock"),
        });
        let bin = dir.path().join("no-such-vhost-device-vsock");
        // A qemu that would fail loudly if it were ever run.
        let vmm = Qemu::new(QemuSettings {
            vhost_device_vsock_bin: bin.clone(),
            agent_transport: AgentTransport::Vsock,
            ..settings(PathBuf::from("/bin/false"))
        });
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        assert!(
            matches!(&err, VmmError::Spawn { bin: b, .. } if *b == bin),
            "{err:?}"
        );
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());

        // The serial transport's bridge is the agent binary: without one,
        // or with one that is not there, the same.
        let serial = |bridge_bin: Option<PathBuf>| {
            let vmm = Qemu::new(QemuSettings {
                agent_transport: AgentTransport::Serial,
                bridge_bin,
                ..settings(PathBuf::from("/bin/false"))
            });
            let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
            assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
            err
        };
        let err = serial(None).to_string();
        assert!(err.contains("set agent_bin"), "{err}");
        let bin = dir.path().join("no-such-banger-agent");
        let err = serial(Some(bin.clone()));
        assert!(
            matches!(&err, VmmError::Spawn { bin: b, .. } if *b == bin),
            "{err:?}"
        );
    }

    #[test]
    fn qemu_rejecting_its_arguments_is_reported_with_its_own_words() {
        let Some((q, _)) =
            requirements("qemu_rejecting_its_arguments_is_reported_with_its_own_words")
        else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let w = World::new(&dir.path().join("missing-vmlinux"));
        let vmm = Qemu::new(settings(q));
        let err = vmm.launch(&w.machine, &w.paths).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, VmmError::NotReady(_)), "{err:?}");
        assert!(
            msg.contains("missing-vmlinux"),
            "qemu's complaint quoted: {msg}"
        );
        assert!(w.leftovers().is_empty(), "{:?}", w.leftovers());
    }
    #[test]
    fn a_jailed_qemu_holds_its_disk_lock_in_its_root_and_a_second_vmm_is_refused() {
        let test = "a_jailed_qemu_holds_its_disk_lock_in_its_root_and_a_second_vmm_is_refused";
        let Some((q, k)) = requirements(test) else {
            return;
        };
        if !nix::unistd::Uid::effective().is_root() {
            return skip(test, "QEMU is jailed only under a root daemon");
        }
        let w = World::new(&k);
        let vmm = Qemu::new(settings(q.clone()));
        let p = vmm.launch(&w.machine, &w.paths).unwrap();
        let mut guard = Guard(&vmm, Some(p.clone()));
        // Jailed: another uid, chrooted into an empty root.
        let (uids, _, root, _) = confinement_of(p.pid);
        assert!(uids[0] != 0, "{uids:?}");
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        // QEMU holds the lock itself, on the disk's inode (it opened the
        // drive by its host path before the chroot).
        let disk = &w.machine.drives[0].path;
        let locked = fs::read_to_string("/proc/locks").unwrap();
        let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(disk).unwrap());
        assert!(
            locked
                .lines()
                .any(|l| l.contains(" FLOCK ") && l.contains(&format!(":{inode} "))),
            "no flock on {} (inode {inode}):\n{locked}",
            disk.display()
        );
        // A second VMM on the same disk is refused before it starts.
        let mut second = w.machine.clone();
        second.serial_log = w.dir.path().join("vm2/serial.log");
        let second_paths = LaunchPaths {
            vm_dir: w.dir.path().join("vm2"),
            api_socket: w.dir.path().join("q2.sock"),
            vmm_log: w.dir.path().join("vm2/qemu.log"),
        };
        let err = Qemu::new(settings(q))
            .launch(&second, &second_paths)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is locked by another process"), "{err}");
        assert!(processes_mentioning(&second_paths.api_socket.display().to_string()).is_empty());

        vmm.kill(&p).unwrap();
        guard.1 = None;
        let after = fs::read_to_string("/proc/locks").unwrap();
        assert!(
            !after.lines().any(|l| l.contains(&format!(":{inode} "))),
            "the lock outlived QEMU:\n{after}"
        );
    }
}
