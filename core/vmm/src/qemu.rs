//! The QEMU backend: renders a [`MachineSpec`] as a `qemu-system-x86_64 -M
//! microvm` command line (with a PCIe root, `pcie=on`, only when the machine
//! has PCI devices), runs it in its own session, and controls it over
//! QMP. Graceful stop is QMP `system_powerdown` (an ACPI power-button event,
//! hence `acpi=on`), then SIGKILL after the grace period. See `docs/vmm.md`.
//!
//! vsock goes through `vhost-user-vsock-device` and a `vhost-device-vsock`
//! process, started before QEMU and stopped with it. It exposes the same
//! hybrid-vsock Unix socket (`CONNECT <port>` / `OK <n>`) as Firecracker. Its
//! pid is recorded next to the QMP socket, because [`VmmProcess`] names only
//! the QEMU process.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, VmCgroup};
use crate::confine::{abort_cgroup, create_cgroup, running_as_root, vm_name, vm_uid};
use crate::disk_lock::DiskLocks;
use crate::{
    Detached, LOG_TAIL_LINES, LaunchPaths, OnSpawned, Pauses, Spawned, Vmm, VmmError, WhilePaused,
    error_chain, io_err, kill_and_wait, log_tail, process_alive, record_nothing, remove_socket,
    spawn_detached, wait_gone,
};
pub use banger_api::backend::{
    Accel, AgentTransport, HostFacts, JailSettings, QemuAccel, QemuSettings, Timeouts, choose_accel,
};
use banger_api::machine::{MachineSpec, PciDevice, Vsock};
use banger_api::model::VmmProcess;
use banger_guest_protocol::api::SERIAL_PORT_NAME;
use fdset::DiskFdSets;

mod fdset;
mod qmp;
mod snapshot;
pub use snapshot::MIGRATION_FILE;

const NAME: &str = "qemu";
const VSOCK_BACKEND: &str = "vhost-device-vsock";
/// The agent's bridge, the `serial` transport's backend.
const BRIDGE: &str = "banger-agent bridge";

/// The QEMU `microvm` backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    settings: QemuSettings,
    accel: Accel,
    /// Start with `-incoming defer` (a snapshot restore).
    incoming: bool,
}

impl Qemu {
    /// A backend with `settings`; `auto` is resolved now against this host.
    pub fn new(settings: QemuSettings) -> Self {
        let accel = choose_accel(settings.accel, HostFacts::probe());
        Qemu {
            settings,
            accel,
            incoming: false,
        }
    }

    /// The accelerator this backend launches with.
    pub fn accel(&self) -> Accel {
        self.accel
    }
}

/// Files derived from the QMP socket path (all in the runtime dir).
struct SideFiles {
    /// The vhost-user socket between QEMU and vhost-device-vsock.
    vhost_socket: PathBuf,
    /// The vsock backend's identity, so stop/kill find it again.
    backend_record: PathBuf,
}

impl SideFiles {
    fn of(qmp_socket: &Path) -> SideFiles {
        let with = |suffix: &str| {
            let mut s = qmp_socket.as_os_str().to_owned();
            s.push(suffix);
            PathBuf::from(s)
        };
        SideFiles {
            vhost_socket: with(".vhost"),
            backend_record: with(".vsock-backend.json"),
        }
    }
}

/// What is recorded about a running vhost-device-vsock.
#[derive(Debug, Serialize, Deserialize)]
struct BackendRecord {
    pid: u32,
    start_time: u64,
    uds_path: PathBuf,
}

/// TSC frequency given to TCG guests. Under TCG the kernel cannot calibrate
/// its clock against the PIT and microvm has no HPET or PM timer to fall back
/// on, so boot hangs after "Marking TSC unstable" unless it is told.
const TCG_TSC_KHZ: &str = "tsc_early_khz=2000000";

/// How the guest resets. With `-no-reboot` a guest reboot must make QEMU
/// exit (that is how a VM stops from inside), but on `-M microvm` only a
/// triple fault does so reliably: the keyboard-controller (`reboot=k`, what
/// Firecracker wants) and ACPI resets restart the guest about half the time
/// instead (measured under TCG, 6 of 12 boots).
const REBOOT: &str = "reboot=t";

/// The kernel command line for `accel`: any `reboot=` choice is replaced by
/// [`REBOOT`], and under TCG `tsc_early_khz` is added unless the caller set
/// one.
fn boot_args(args: &str, accel: Accel) -> String {
    let mut words: Vec<&str> = args
        .split_whitespace()
        .filter(|a| !a.starts_with("reboot="))
        .collect();
    words.push(REBOOT);
    if accel == Accel::Tcg && !words.iter().any(|a| a.starts_with("tsc_early_khz=")) {
        words.push(TCG_TSC_KHZ);
    }
    words.join(" ")
}

/// The QEMU arguments for `machine` (everything after the binary name).
/// `vhost_socket` is where the vsock backend listens (vhost-device-vsock, or
/// the agent's bridge under the `serial` transport), used only when the
/// machine has a vsock device.
pub fn render_args(
    machine: &MachineSpec,
    qmp_socket: &Path,
    vhost_socket: &Path,
    accel: Accel,
    transport: AgentTransport,
) -> Vec<OsString> {
    let vhost_user = machine.vsock.is_some() && transport == AgentTransport::Vsock;
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&dyn AsRefOs]| {
        for p in parts {
            a.push(p.as_os());
        }
    };
    let mem = format!("{}M", machine.memory_mib);
    let mut machine_opt = "microvm,acpi=on".to_string();
    if !machine.pci_devices.is_empty() {
        // A PCIe root (ECAM, found through ACPI) beside the virtio-mmio
        // devices; without PCI devices the guest gets no bus at all.
        machine_opt.push_str(",pcie=on");
    }
    if vhost_user {
        // vhost-user backends map guest memory: it must be shareable.
        machine_opt.push_str(",memory-backend=mem");
    }
    let (accel_name, cpu) = match accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    push(&[&"-M", &machine_opt]);
    // A guest reboot ends the VMM, as with Firecracker.
    push(&[
        &"-nodefaults",
        &"-no-user-config",
        &"-nographic",
        &"-no-reboot",
    ]);
    push(&[&"-accel", &accel_name, &"-cpu", &cpu]);
    push(&[&"-smp", &machine.vcpus.to_string(), &"-m", &mem]);
    if vhost_user {
        push(&[
            &"-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
    }
    push(&[&"-kernel", &machine.kernel]);
    if let Some(initrd) = &machine.initrd {
        push(&[&"-initrd", initrd]);
    }
    push(&[&"-append", &boot_args(&machine.kernel_args(), accel)]);
    push(&[
        &"-chardev",
        &opt_with_path("file,id=serial0,append=on,path=", &machine.serial_log),
        &"-serial",
        &"chardev:serial0",
    ]);
    push(&[
        &"-chardev",
        &opt_with_path("socket,id=qmp,server=on,wait=off,path=", qmp_socket),
        &"-mon",
        &"chardev=qmp,mode=control",
    ]);
    for (i, d) in machine.drives.iter().enumerate() {
        let mut drive = opt_with_path(&format!("if=none,id=drive{i},format=raw,file="), &d.path);
        if d.read_only {
            drive.push(",readonly=on");
        }
        if fdset::is_fdset(&d.path) {
            // With its own image locks QEMU could not take the write lock
            // back after a snapshot (`cont`: Failed to get "write" lock):
            // they are OFD locks, held by the set's open file
            // descriptions, which outlive each of QEMU's reopens. The disk
            // stays locked by the daemon's flock for the VMM's life.
            drive.push(",file.locking=off");
        }
        push(&[
            &"-drive",
            &drive,
            &"-device",
            &format!("virtio-blk-device,drive=drive{i}"),
        ]);
    }
    for (i, n) in machine.nics.iter().enumerate() {
        push(&[
            &"-netdev",
            &format!(
                "tap,id=net{i},ifname={},script=no,downscript=no",
                escape_opt(&n.tap)
            ),
            &"-device",
            &format!("virtio-net-device,netdev=net{i},mac={}", escape_opt(&n.mac)),
        ]);
    }
    if vhost_user {
        push(&[
            &"-chardev",
            &opt_with_path("socket,id=vsock,path=", vhost_socket),
            &"-device",
            &"vhost-user-vsock-device,chardev=vsock",
        ]);
    } else if machine.vsock.is_some() {
        // The agent's API on a virtio-serial port, which QEMU migrates.
        push(&[
            &"-device",
            &"virtio-serial-device,max_ports=2",
            &"-chardev",
            &opt_with_path("socket,id=agent,path=", vhost_socket),
            &"-device",
            &format!("virtserialport,chardev=agent,name={SERIAL_PORT_NAME}"),
        ]);
    }
    for d in &machine.pci_devices {
        let device = match d {
            PciDevice::Vfio { address } => format!("vfio-pci,host={address}"),
            PciDevice::Emulated { model } => model.to_string(),
        };
        push(&[&"-device", &device]);
    }
    a
}

/// The first device in an IOMMU group's `devices` directory bound to a
/// driver other than `vfio-pci` (PCIe ports may stay on `pcieport`).
fn group_member_on_a_host_driver(group_devices: &Path) -> Option<String> {
    let entries = fs::read_dir(group_devices).ok()?;
    entries.filter_map(Result::ok).find_map(|e| {
        let driver = fs::read_link(e.path().join("driver")).ok()?;
        let driver = driver.file_name()?.to_string_lossy().into_owned();
        (driver != "vfio-pci" && driver != "pcieport")
            .then(|| format!("{} ({driver})", e.file_name().to_string_lossy()))
    })
}

/// Where [`check_vfio`] looks: the real host, or a fake tree in tests.
#[derive(Debug, Clone)]
pub struct VfioHost {
    /// sysfs (`/sys`).
    pub sysfs: PathBuf,
    /// The VFIO device directory (`/dev/vfio`).
    pub dev_vfio: PathBuf,
}

impl Default for VfioHost {
    fn default() -> Self {
        VfioHost {
            sysfs: "/sys".into(),
            dev_vfio: "/dev/vfio".into(),
        }
    }
}

/// Refuses, before anything starts, a machine whose VFIO devices this host
/// cannot pass through: no VFIO driver, a device that does not exist, has no
/// IOMMU group (IOMMU off), or is not bound to `vfio-pci`. Each error names
/// the device and the fix.
pub fn check_vfio(machine: &MachineSpec, host: &VfioHost) -> Result<(), VmmError> {
    let unsupported = |msg: String| Err(VmmError::Unsupported(msg));
    for d in &machine.pci_devices {
        let PciDevice::Vfio { address } = d else {
            continue;
        };
        let container = host.dev_vfio.join("vfio");
        if !container.exists() {
            return unsupported(format!(
                "Cannot pass through PCI device {address}: {} does not exist; load the VFIO driver (modprobe vfio-pci) and check the IOMMU is on",
                container.display()
            ));
        }
        let device = host.sysfs.join("bus/pci/devices").join(address.as_str());
        if !device.exists() {
            return unsupported(format!(
                "Cannot pass through PCI device {address}: the host has no such device ({} is missing); check the address with lspci -D",
                device.display()
            ));
        }
        let Ok(group) = fs::read_link(device.join("iommu_group")) else {
            return unsupported(format!(
                "Cannot pass through PCI device {address}: it has no IOMMU group; enable the IOMMU (VT-d/AMD-Vi in the firmware, intel_iommu=on or amd_iommu=on on the host kernel command line)"
            ));
        };
        let driver = fs::read_link(device.join("driver")).ok();
        let driver = driver
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned());
        match driver.as_deref() {
            Some("vfio-pci") => {}
            Some(other) => {
                return unsupported(format!(
                    "Cannot pass through PCI device {address}: it is bound to {other}, not vfio-pci; enable the vfio-passthrough capability for it (--cap vfio-passthrough:device={address})"
                ));
            }
            // Asked for vfio-pci but nothing took it: the module is missing.
            None => {
                return unsupported(format!(
                    "Cannot pass through PCI device {address}: no driver holds it; load vfio-pci (modprobe vfio-pci) and bind it (the vfio-passthrough capability does: --cap vfio-passthrough:device={address})"
                ));
            }
        }
        if let Some(other) = group_member_on_a_host_driver(&device.join("iommu_group/devices")) {
            return unsupported(format!(
                "Cannot pass through PCI device {address}: {other} shares its IOMMU group and is still bound to a host driver; a group is passed through whole, so bind {other} to vfio-pci too (the vfio-passthrough capability does)"
            ));
        }
        let group_node = group.file_name().map(|g| host.dev_vfio.join(g));
        if !group_node.as_deref().is_some_and(Path::exists) {
            return unsupported(format!(
                "Cannot pass through PCI device {address}: its IOMMU group has no VFIO node in {}; bind every device of the group to vfio-pci",
                host.dev_vfio.display()
            ));
        }
    }
    Ok(())
}

/// Anything that can be one argv entry.
trait AsRefOs {
    fn as_os(&self) -> OsString;
}
impl AsRefOs for &str {
    fn as_os(&self) -> OsString {
        OsString::from(*self)
    }
}
impl AsRefOs for String {
    fn as_os(&self) -> OsString {
        OsString::from(self)
    }
}
impl AsRefOs for OsString {
    fn as_os(&self) -> OsString {
        self.clone()
    }
}
impl AsRefOs for PathBuf {
    fn as_os(&self) -> OsString {
        self.as_os_str().to_owned()
    }
}

/// QEMU option values end at a comma; a literal comma is written twice.
fn escape_opt(s: &str) -> String {
    s.replace(',', ",,")
}

/// `prefix` followed by `path`, escaped, without forcing it through UTF-8.
fn opt_with_path(prefix: &str, path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    OsString::from_vec(bytes)
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn launch(&self, machine: &MachineSpec, paths: &LaunchPaths) -> Result<VmmProcess, VmmError> {
        self.launch_recorded(machine, paths, &mut record_nothing)
    }

    fn launch_recorded(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        check_vfio(machine, &VfioHost::default())?;
        let side = SideFiles::of(&paths.api_socket);
        prepare_files(machine, paths, &side, self.settings.timeouts.exit)?;
        let jail = Jail::prepare(&self.settings.jail, machine, paths)?;
        let started = match &machine.vsock {
            Some(v) => self.start_vsock_backend(v, paths, &side, &jail).map(Some),
            None => Ok(None),
        };
        let launched = started.and_then(|backend| {
            self.start_qemu(machine, paths, &side, &jail, on_spawned)
                .inspect_err(|_| {
                    if let Some(b) = backend {
                        b.abort(self.settings.timeouts.exit);
                    }
                })
        });
        launched.inspect_err(|_| {
            abort_cgroup(&paths.api_socket, self.settings.timeouts.exit);
            let uds = machine.vsock.as_ref().map(|v| v.uds_path.as_path());
            cleanup(&paths.api_socket, &side, uds);
        })
    }

    fn shutdown(&self, process: &VmmProcess, grace: Duration) -> Result<(), VmmError> {
        if process_alive(process) {
            let asked = qmp::Qmp::connect(&process.api_socket, self.settings.timeouts.request)
                .and_then(|mut q| q.execute("system_powerdown"));
            match asked {
                Ok(_) => wait_gone(process, grace),
                Err(e) => tracing::warn!(
                    pid = process.pid,
                    error = %e,
                    "Graceful shutdown request failed; killing the VMM"
                ),
            }
        }
        self.kill(process)
    }

    fn snapshot(
        &self,
        process: &VmmProcess,
        dir: &Path,
        while_paused: &mut WhilePaused<'_>,
    ) -> Result<(), VmmError> {
        self.snapshot_to(process, dir, while_paused)
    }

    fn restore_recorded(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        dir: &Path,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        self.restore_from(machine, paths, dir, on_spawned)
    }

    fn kill(&self, process: &VmmProcess) -> Result<(), VmmError> {
        // The cgroup first: it holds QEMU and its vsock backend, and
        // whatever either started.
        cgroup::kill_recorded(&process.api_socket, self.settings.timeouts.exit)?;
        kill_and_wait(process, self.settings.timeouts.exit)?;
        let side = SideFiles::of(&process.api_socket);
        stop_vsock_backend(&side, self.settings.timeouts.exit)?;
        remove_socket(&process.api_socket)?;
        remove_socket(&side.vhost_socket)
    }
}

/// vhost-device-vsock's command line for `vsock`.
fn vhost_device_vsock(bin: &Path, vsock: &Vsock, side: &SideFiles) -> Result<Command, VmmError> {
    let mut spec = OsString::from(format!("guest-cid={},socket=", vsock.guest_cid));
    for p in [&side.vhost_socket, &vsock.uds_path] {
        // Its option parser has no escaping.
        if p.to_string_lossy().contains([',', '=']) {
            return Err(VmmError::NotReady(format!(
                "{VSOCK_BACKEND} cannot take the path {} (it contains ',' or '='): use a directory without them",
                p.display()
            )));
        }
    }
    spec.push(&side.vhost_socket);
    spec.push(",uds-path=");
    spec.push(&vsock.uds_path);
    let mut cmd = Command::new(bin);
    cmd.arg("--vm").arg(spec);
    Ok(cmd)
}

impl Qemu {
    /// Starts the vsock backend (vhost-device-vsock, or the agent's bridge
    /// under the `serial` transport) and waits for its sockets.
    fn start_vsock_backend(
        &self,
        vsock: &Vsock,
        paths: &LaunchPaths,
        side: &SideFiles,
        jail: &Jail,
    ) -> Result<Spawned, VmmError> {
        let (cmd, bin, what_name) = match self.settings.agent_transport {
            AgentTransport::Vsock => {
                let bin = self.settings.vhost_device_vsock_bin.clone();
                (vhost_device_vsock(&bin, vsock, side)?, bin, VSOCK_BACKEND)
            }
            AgentTransport::Serial => {
                let Some(bin) = self.settings.bridge_bin.clone() else {
                    return Err(VmmError::NotReady(
                        "qemu_agent_transport = \"serial\" needs the banger-agent binary for its bridge, and none was found: set agent_bin in the config, or run scripts/build-agent".into(),
                    ));
                };
                let mut cmd = Command::new(&bin);
                cmd.arg("bridge")
                    .arg("--mux")
                    .arg(&side.vhost_socket)
                    .arg("--uds")
                    .arg(&vsock.uds_path);
                if self.incoming {
                    // A restored guest will not say hello: start the session.
                    cmd.arg("--resync");
                }
                (cmd, bin, BRIDGE)
            }
        };
        let mut what = Detached::new(cmd);
        if let Some(cg) = &jail.cgroup {
            what.join_cgroup(cg);
        }
        let spawned = spawn_detached(what.log_to(&paths.vmm_log)?, &bin, what_name)?;
        let fail = |spawned: Spawned, e: VmmError| {
            spawned.abort(self.settings.timeouts.exit);
            let _ = remove_socket(&side.vhost_socket);
            e
        };
        let Some(start_time) = spawned.start_time else {
            let pid = spawned.pid;
            return Err(fail(
                spawned,
                VmmError::NotReady(format!(
                    "{what_name} (pid {pid}) vanished right after it was started"
                )),
            ));
        };
        let is_socket = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket());
        let serial = self.settings.agent_transport == AgentTransport::Serial;
        let ready = self.wait_until(&spawned, what_name, &paths.vmm_log, || {
            // The bridge binds the hybrid-vsock socket right after its own.
            is_socket(&side.vhost_socket) && (!serial || is_socket(&vsock.uds_path))
        });
        if let Err(e) = ready {
            return Err(fail(spawned, e));
        }
        let record = BackendRecord {
            pid: spawned.pid,
            start_time,
            uds_path: vsock.uds_path.clone(),
        };
        if let Err(e) = write_record(&side.backend_record, &record) {
            return Err(fail(spawned, e));
        }
        Ok(spawned)
    }

    /// Starts QEMU and waits until QMP answers.
    fn start_qemu(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        side: &SideFiles,
        jail: &Jail,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        let bin = &self.settings.qemu_bin;
        let locks = DiskLocks::take(machine)?;
        // Chrooted, QEMU gets its disks as descriptors: it reopens them at
        // the end of a migration, where no host path is visible.
        let fdsets = match jail.drop_to {
            Some(_) => Some(DiskFdSets::open(machine)?),
            None => None,
        };
        let shown = fdsets.as_ref().map(|f| f.machine(machine));
        let mut cmd = Command::new(bin);
        cmd.args(render_args(
            shown.as_ref().unwrap_or(machine),
            &paths.api_socket,
            &side.vhost_socket,
            self.accel,
            self.settings.agent_transport,
        ));
        if let Some(f) = &fdsets {
            cmd.args(f.args());
        }
        cmd.args(jail.args());
        if self.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut what = Detached::new(cmd);
        if let Some(cg) = &jail.cgroup {
            what.join_cgroup(cg);
        }
        locks.hand_to(&mut what);
        if let Some(f) = &fdsets {
            f.hand_to(&mut what);
        }
        let spawned = spawn_detached(what.log_to(&paths.vmm_log)?, bin, NAME)?;
        drop((locks, fdsets));
        let Some(start_time) = spawned.start_time else {
            let pid = spawned.pid;
            spawned.abort(self.settings.timeouts.exit);
            return Err(VmmError::NotReady(format!(
                "{NAME} (pid {pid}) vanished right after it was started"
            )));
        };
        let process = VmmProcess {
            pid: spawned.pid,
            start_time,
            api_socket: paths.api_socket.clone(),
        };
        if let Err(e) = on_spawned(&process) {
            spawned.abort(self.settings.timeouts.exit);
            return Err(e);
        }
        let probe_timeout = self.settings.timeouts.request.min(Duration::from_secs(1));
        let ready = self.wait_until(&spawned, NAME, &paths.vmm_log, || {
            qmp::Qmp::connect(&paths.api_socket, probe_timeout).is_ok()
        });
        if let Err(e) = ready {
            spawned.abort(self.settings.timeouts.exit);
            return Err(e);
        }
        Ok(process)
    }

    /// Polls `ready` until it holds, the process exits, or the deadline
    /// passes, with the pauses of [`Pauses`].
    fn wait_until(
        &self,
        spawned: &Spawned,
        what: &str,
        log: &Path,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), VmmError> {
        let timeout = self.settings.timeouts.socket_ready;
        let deadline = Instant::now() + timeout;
        let mut pauses = Pauses::new();
        loop {
            if let Some(how) = spawned.exit_status() {
                return Err(VmmError::NotReady(format!(
                    "{what} exited with {how} before it was ready; last lines of {}:\n{}",
                    log.display(),
                    log_tail(log, LOG_TAIL_LINES)
                )));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::NotReady(format!(
                    "{what} was not ready within {timeout:?}; last lines of {}:\n{}",
                    log.display(),
                    log_tail(log, LOG_TAIL_LINES)
                )));
            }
            pauses.sleep();
        }
    }
}

/// How one QEMU launch is confined.
#[derive(Debug)]
struct Jail {
    /// `-sandbox` at all (`vmm_jail`).
    sandbox: bool,
    /// The VM's uid and the empty directory QEMU chroots into once it has
    /// opened everything, when the daemon is root.
    drop_to: Option<(u32, PathBuf)>,
    /// The VM's cgroup, which QEMU and its vsock backend join.
    cgroup: Option<VmCgroup>,
}

impl Jail {
    fn prepare(
        settings: &JailSettings,
        machine: &MachineSpec,
        paths: &LaunchPaths,
    ) -> Result<Jail, VmmError> {
        let drop_to = if settings.enabled && running_as_root() {
            let uid = vm_uid(settings.uid_base, &vm_name(paths)?);
            let root = paths.vm_dir.join(CHROOT_DIR);
            make_empty_root(&root)?;
            Some((uid, root))
        } else {
            None
        };
        Ok(Jail {
            sandbox: settings.enabled,
            drop_to,
            cgroup: create_cgroup(settings, machine, paths)?,
        })
    }

    fn args(&self) -> Vec<OsString> {
        jail_args(
            self.sandbox,
            self.drop_to.as_ref().map(|(u, r)| (*u, r.as_path())),
        )
    }
}

/// The directory (in the VM's directory) QEMU chroots into: empty, owned
/// by root, not writable by the VM's uid.
pub const CHROOT_DIR: &str = "qemu-root";

fn make_empty_root(root: &Path) -> Result<(), VmmError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let made = fs::DirBuilder::new().mode(0o555).create(root);
    match made {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left by an earlier start: it must still be an empty root-owned
            // directory nobody else can write.
            let empty = fs::read_dir(root).is_ok_and(|mut d| d.next().is_none());
            fs::set_permissions(root, fs::Permissions::from_mode(0o555))
                .map_err(|e| io_err(format!("setting the mode of {}", root.display()), e))?;
            if empty {
                Ok(())
            } else {
                Err(VmmError::Unsupported(format!(
                    "{} must be empty (QEMU chroots into it): remove what is in it",
                    root.display()
                )))
            }
        }
        Err(e) => Err(io_err(format!("creating {}", root.display()), e)),
    }
}

/// QEMU's confinement arguments. `-sandbox` installs a seccomp filter
/// (no obsolete syscalls, no fork/exec, no scheduler or resource changes).
/// With `drop_to`, QEMU opens every file, socket and device as root, then
/// chroots into the empty directory and becomes the VM's uid/gid before
/// the guest runs. QEMU 7.2 installs the filter before that setuid, so
/// `elevateprivileges` must allow it then; once every uid is the VM's none
/// can be raised again (and no setuid binary can be exec'd: `spawn=deny`).
pub fn jail_args(sandbox: bool, drop_to: Option<(u32, &Path)>) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if sandbox {
        let elevate = if drop_to.is_some() { "allow" } else { "deny" };
        a.push("-sandbox".into());
        a.push(
            format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
                .into(),
        );
    }
    if let Some((uid, root)) = drop_to {
        a.push("-runas".into());
        a.push(format!("{uid}:{uid}").into());
        a.push("-chroot".into());
        a.push(root.as_os_str().to_owned());
    }
    a
}

/// Clears what a previous run may have left and creates parent directories.
fn prepare_files(
    machine: &MachineSpec,
    paths: &LaunchPaths,
    side: &SideFiles,
    exit_timeout: Duration,
) -> Result<(), VmmError> {
    // A record left by a crashed daemon may name a backend still running.
    stop_vsock_backend(side, exit_timeout)?;
    remove_socket(&paths.api_socket)?;
    remove_socket(&side.vhost_socket)?;
    if let Some(v) = &machine.vsock {
        if fs::symlink_metadata(&v.uds_path).is_ok_and(|m| m.file_type().is_socket()) {
            remove_socket(&v.uds_path)?;
        }
    }
    for file in [&paths.api_socket, &paths.vmm_log, &machine.serial_log] {
        if let Some(dir) = file.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        }
    }
    Ok(())
}

/// Best-effort removal after a failed launch.
fn cleanup(qmp_socket: &Path, side: &SideFiles, uds: Option<&Path>) {
    let mut files = vec![qmp_socket, &side.vhost_socket, &side.backend_record];
    files.extend(uds);
    for p in files {
        if let Err(e) = remove_socket(p) {
            tracing::warn!(error = %error_chain(&e), "Failed to clean up after a failed launch");
        }
    }
}

/// Writes the backend record by staging and renaming.
fn write_record(path: &Path, record: &BackendRecord) -> Result<(), VmmError> {
    cgroup::write_json(path, record)
}

/// Kills the recorded vsock backend, if any, and removes its files.
fn stop_vsock_backend(side: &SideFiles, timeout: Duration) -> Result<(), VmmError> {
    let text = match fs::read(&side.backend_record) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io_err(
                format!("reading {}", side.backend_record.display()),
                e,
            ));
        }
    };
    match serde_json::from_slice::<BackendRecord>(&text) {
        Ok(r) => {
            let p = VmmProcess {
                pid: r.pid,
                start_time: r.start_time,
                api_socket: side.vhost_socket.clone(),
            };
            kill_and_wait(&p, timeout)?;
            if fs::symlink_metadata(&r.uds_path).is_ok_and(|m| m.file_type().is_socket()) {
                remove_socket(&r.uds_path)?;
            }
        }
        // Unreadable: nothing can be found from it; dropping it is all we can do.
        Err(e) => tracing::warn!(
            path = %side.backend_record.display(),
            error = %e,
            "Ignoring a corrupt vsock backend record"
        ),
    }
    remove_socket(&side.backend_record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::machine::{Drive, DriveRole, Nic};

    fn facts(kvm_usable: bool, nested_pvm: bool) -> HostFacts {
        HostFacts {
            kvm_usable,
            nested_pvm,
        }
    }

    #[test]
    fn auto_picks_kvm_only_when_usable_and_not_nested_pvm() {
        assert_eq!(
            choose_accel(QemuAccel::Auto, facts(true, false)),
            Accel::Kvm
        );
        assert_eq!(choose_accel(QemuAccel::Auto, facts(true, true)), Accel::Tcg);
        assert_eq!(
            choose_accel(QemuAccel::Auto, facts(false, false)),
            Accel::Tcg
        );
        assert_eq!(
            choose_accel(QemuAccel::Auto, facts(false, true)),
            Accel::Tcg
        );
    }

    #[test]
    fn explicit_accel_wins_over_host_facts() {
        assert_eq!(choose_accel(QemuAccel::Kvm, facts(false, true)), Accel::Kvm);
        assert_eq!(choose_accel(QemuAccel::Tcg, facts(true, false)), Accel::Tcg);
    }

    #[test]
    fn accel_parses_the_three_config_values_only() {
        assert_eq!("auto".parse(), Ok(QemuAccel::Auto));
        assert_eq!("kvm".parse(), Ok(QemuAccel::Kvm));
        assert_eq!("tcg".parse(), Ok(QemuAccel::Tcg));
        let err = "hvf".parse::<QemuAccel>().unwrap_err();
        assert!(err.contains("auto, kvm, tcg"), "{err}");
    }

    fn full_spec() -> MachineSpec {
        MachineSpec {
            kernel: "/k/vmlinux".into(),
            initrd: Some("/k/initrd.cpio".into()),
            boot_args: "console=ttyS0 reboot=k panic=1".into(),
            vcpus: 2,
            memory_mib: 512,
            drives: vec![
                Drive {
                    id: "root".into(),
                    path: "/vm/root.ext4".into(),
                    read_only: false,
                    role: DriveRole::Root,
                },
                Drive {
                    id: "config".into(),
                    path: "/vm/odd,name.img".into(),
                    read_only: true,
                    role: DriveRole::Config,
                },
            ],
            nics: vec![Nic {
                id: "eth0".into(),
                tap: "bg-tap0".into(),
                mac: "06:00:ac:10:00:02".into(),
            }],
            vsock: Some(Vsock {
                guest_cid: 7,
                uds_path: "/vm/v.sock".into(),
            }),
            serial_log: "/vm/serial.log".into(),
            pci_devices: Vec::new(),
        }
    }

    #[test]
    fn renders_a_full_machine_spec() {
        let args = render_args(
            &full_spec(),
            Path::new("/run/q.sock"),
            Path::new("/run/q.sock.vhost"),
            Accel::Tcg,
            AgentTransport::Vsock,
        );
        let got: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let want = [
            "-M",
            "microvm,acpi=on,memory-backend=mem",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "512M",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-kernel",
            "/k/vmlinux",
            "-initrd",
            "/k/initrd.cpio",
            "-append",
            "console=ttyS0 panic=1 pci=off reboot=t tsc_early_khz=2000000",
            "-chardev",
            "file,id=serial0,append=on,path=/vm/serial.log",
            "-serial",
            "chardev:serial0",
            "-chardev",
            "socket,id=qmp,server=on,wait=off,path=/run/q.sock",
            "-mon",
            "chardev=qmp,mode=control",
            "-drive",
            "if=none,id=drive0,format=raw,file=/vm/root.ext4",
            "-device",
            "virtio-blk-device,drive=drive0",
            "-drive",
            "if=none,id=drive1,format=raw,file=/vm/odd,,name.img,readonly=on",
            "-device",
            "virtio-blk-device,drive=drive1",
            "-netdev",
            "tap,id=net0,ifname=bg-tap0,script=no,downscript=no",
            "-device",
            "virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02",
            "-chardev",
            "socket,id=vsock,path=/run/q.sock.vhost",
            "-device",
            "vhost-user-vsock-device,chardev=vsock",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn minimal_spec_under_kvm_has_no_shared_memory_or_optional_devices() {
        let mut m = full_spec();
        m.initrd = None;
        m.vsock = None;
        m.nics.clear();
        m.drives.clear();
        let args: Vec<String> = render_args(
            &m,
            Path::new("/q"),
            Path::new("/v"),
            Accel::Kvm,
            AgentTransport::Vsock,
        )
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
        let joined = args.join(" ");
        assert!(
            joined.starts_with("-M microvm,acpi=on -nodefaults"),
            "{joined}"
        );
        assert!(joined.contains("-accel kvm -cpu host"), "{joined}");
        for absent in ["memory-backend", "-initrd", "-drive", "-netdev", "vsock"] {
            assert!(!joined.contains(absent), "{absent} in {joined}");
        }
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn pci_devices_get_a_pcie_microvm_and_a_pci_enabled_kernel() {
        let mut m = full_spec();
        m.pci_devices = vec![
            PciDevice::Vfio {
                address: "0000:3B:00.1".parse().unwrap(),
            },
            PciDevice::Emulated {
                model: "virtio-rng-pci".parse().unwrap(),
            },
        ];
        let got = strings(&render_args(
            &m,
            Path::new("/q"),
            Path::new("/v"),
            Accel::Kvm,
            AgentTransport::Vsock,
        ));
        assert_eq!(
            got[..2],
            ["-M", "microvm,acpi=on,pcie=on,memory-backend=mem"]
        );
        let append = got.iter().position(|a| a == "-append").unwrap();
        assert_eq!(got[append + 1], "console=ttyS0 panic=1 reboot=t");
        // PCI devices come last, in order, after the virtio-mmio ones.
        let n = got.len();
        assert_eq!(
            got[n - 4..],
            [
                "-device",
                "vfio-pci,host=0000:3b:00.1",
                "-device",
                "virtio-rng-pci"
            ]
        );
        assert_eq!(got.iter().filter(|a| *a == "-device").count(), 6);
    }

    #[test]
    fn machines_without_pci_devices_stay_on_plain_microvm_with_pci_off() {
        let got = strings(&render_args(
            &full_spec(),
            Path::new("/q"),
            Path::new("/v"),
            Accel::Kvm,
            AgentTransport::Vsock,
        ));
        assert_eq!(got[1], "microvm,acpi=on,memory-backend=mem");
        let joined = got.join(" ");
        assert!(joined.contains(" pci=off "), "{joined}");
        for absent in ["pcie", "vfio", "-pci"] {
            assert!(!joined.contains(absent), "{absent} in {joined}");
        }
    }

    #[test]
    fn the_serial_transport_puts_the_agent_on_a_virtio_serial_port_instead_of_vhost_user() {
        let got = strings(&render_args(
            &full_spec(),
            Path::new("/q"),
            Path::new("/run/q.sock.vhost"),
            Accel::Tcg,
            AgentTransport::Serial,
        ));
        let joined = got.join(" ");
        assert!(
            joined.ends_with(
                "-device virtio-serial-device,max_ports=2 -chardev socket,id=agent,path=/run/q.sock.vhost -device virtserialport,chardev=agent,name=banger.agent"
            ),
            "{joined}"
        );
        // No vhost-user device, so no shared memory backend either.
        assert_eq!(got[1], "microvm,acpi=on");
        for absent in ["vhost-user", "memory-backend", "memfd"] {
            assert!(!joined.contains(absent), "{absent} in {joined}");
        }
    }

    /// A fake host: `/sys/bus/pci/devices/ADDR` with `driver` and
    /// `iommu_group` links, `/sys/kernel/iommu_groups/N/devices/ADDR` links
    /// back, and `/dev/vfio/{vfio,N}`.
    struct FakeHost {
        dir: tempfile::TempDir,
    }

    impl FakeHost {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir_all(dir.path().join("dev/vfio")).unwrap();
            fs::write(dir.path().join("dev/vfio/vfio"), "").unwrap();
            FakeHost { dir }
        }
        fn host(&self) -> VfioHost {
            VfioHost {
                sysfs: self.dir.path().join("sys"),
                dev_vfio: self.dir.path().join("dev/vfio"),
            }
        }
        fn device(&self, addr: &str, group: Option<u32>, driver: Option<&str>) {
            use std::os::unix::fs::symlink;
            let sys = self.dir.path().join("sys");
            let dev = sys.join("bus/pci/devices").join(addr);
            fs::create_dir_all(&dev).unwrap();
            if let Some(d) = driver {
                let drv = sys.join("bus/pci/drivers").join(d);
                fs::create_dir_all(&drv).unwrap();
                symlink(&drv, dev.join("driver")).unwrap();
            }
            if let Some(g) = group {
                let gdir = sys.join(format!("kernel/iommu_groups/{g}/devices"));
                fs::create_dir_all(&gdir).unwrap();
                symlink(&dev, gdir.join(addr)).unwrap();
                symlink(gdir.parent().unwrap(), dev.join("iommu_group")).unwrap();
                if driver == Some("vfio-pci") {
                    fs::write(self.dir.path().join(format!("dev/vfio/{g}")), "").unwrap();
                }
            }
        }
    }

    fn vfio_machine(addr: &str) -> MachineSpec {
        let mut m = full_spec();
        m.pci_devices = vec![PciDevice::Vfio {
            address: addr.parse().unwrap(),
        }];
        m
    }

    fn refusal(m: &MachineSpec, host: &VfioHost) -> String {
        match check_vfio(m, host) {
            Err(VmmError::Unsupported(msg)) => msg,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn vfio_devices_bound_to_vfio_pci_with_a_whole_group_pass_the_host_check() {
        let h = FakeHost::new();
        h.device("0000:01:00.0", Some(5), Some("vfio-pci"));
        h.device("0000:01:00.1", Some(5), Some("vfio-pci"));
        h.device("0000:00:01.0", Some(5), Some("pcieport"));
        check_vfio(&vfio_machine("0000:01:00.0"), &h.host()).unwrap();
        // Emulated devices need nothing from the host.
        let mut m = full_spec();
        m.pci_devices = vec![PciDevice::Emulated {
            model: "edu".parse().unwrap(),
        }];
        check_vfio(
            &m,
            &VfioHost {
                sysfs: "/nonexistent".into(),
                dev_vfio: "/nonexistent".into(),
            },
        )
        .unwrap();
    }

    #[test]
    fn vfio_host_check_names_the_device_and_the_fix() {
        let h = FakeHost::new();
        h.device("0000:02:00.0", None, Some("vfio-pci"));
        h.device("0000:03:00.0", Some(7), Some("nvidia"));
        h.device("0000:04:00.0", Some(8), Some("vfio-pci"));
        h.device("0000:04:00.1", Some(8), Some("snd_hda_intel"));
        h.device("0000:05:00.0", Some(9), None);
        h.device("0000:06:00.0", Some(10), Some("vfio-pci"));
        fs::remove_file(h.dir.path().join("dev/vfio/10")).unwrap();
        for (addr, needles) in [
            (
                "0000:09:00.0",
                &["0000:09:00.0", "no such device", "lspci -D"][..],
            ),
            ("0000:02:00.0", &["no IOMMU group", "intel_iommu=on"]),
            (
                "0000:03:00.0",
                &[
                    "bound to nvidia",
                    "--cap vfio-passthrough:device=0000:03:00.0",
                ],
            ),
            (
                "0000:04:00.0",
                &["0000:04:00.1 (snd_hda_intel)", "shares its IOMMU group"],
            ),
            ("0000:05:00.0", &["no driver holds it", "modprobe vfio-pci"]),
            ("0000:06:00.0", &["has no VFIO node in", "dev/vfio"]),
        ] {
            let msg = refusal(&vfio_machine(addr), &h.host());
            for n in needles {
                assert!(msg.contains(n), "{addr}: {n:?} not in {msg}");
            }
        }
        fs::remove_file(h.dir.path().join("dev/vfio/vfio")).unwrap();
        let msg = refusal(&vfio_machine("0000:04:00.0"), &h.host());
        assert!(msg.contains("modprobe vfio-pci"), "{msg}");
    }

    #[test]
    fn jail_args_sandbox_always_and_drop_to_the_vms_uid_in_an_empty_root() {
        assert!(jail_args(false, None).is_empty());
        assert_eq!(
            strings(&jail_args(true, None)),
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ]
        );
        assert_eq!(
            strings(&jail_args(
                true,
                Some((1879048200, Path::new("/s/vms/ab/qemu-root")))
            )),
            [
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny",
                "-runas",
                "1879048200:1879048200",
                "-chroot",
                "/s/vms/ab/qemu-root",
            ]
        );
    }

    #[test]
    fn the_chroot_must_be_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(CHROOT_DIR);
        make_empty_root(&root).unwrap();
        make_empty_root(&root).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o555
        );
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(root.join("planted"), "x").unwrap();
        let err = make_empty_root(&root).unwrap_err().to_string();
        assert!(err.contains("must be empty"), "{err}");
    }

    #[test]
    fn side_files_sit_next_to_the_qmp_socket() {
        let s = SideFiles::of(Path::new("/run/banger/abc.sock"));
        assert_eq!(s.vhost_socket, Path::new("/run/banger/abc.sock.vhost"));
        assert_eq!(
            s.backend_record,
            Path::new("/run/banger/abc.sock.vsock-backend.json")
        );
    }

    #[test]
    fn guests_triple_fault_to_reboot_and_tcg_guests_get_a_tsc_frequency() {
        assert_eq!(
            boot_args("console=ttyS0", Accel::Tcg),
            "console=ttyS0 reboot=t tsc_early_khz=2000000"
        );
        assert_eq!(
            boot_args("tsc_early_khz=1000 quiet", Accel::Tcg),
            "tsc_early_khz=1000 quiet reboot=t"
        );
        assert_eq!(
            boot_args("console=ttyS0 reboot=k", Accel::Kvm),
            "console=ttyS0 reboot=t"
        );
    }
}
