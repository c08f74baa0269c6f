//! The Firecracker backend: spawns `firecracker --api-sock`, configures the
//! machine through its HTTP API and boots it with `InstanceStart`; stops it
//! with `SendCtrlAltDel`, then SIGKILL after a grace period.
//!
//! The VMM runs in its own session so it outlives the daemon; its stdout and
//! stderr (the guest serial console) are appended to `machine.serial_log`.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cgroup;
use crate::confine::{running_as_root, vm_name, vm_uid};
use crate::disk_lock::DiskLocks;
use crate::jailer;
use crate::{
    LOG_TAIL_LINES, LaunchPaths, OnSpawned, POLL, Spawned, Vmm, VmmError, WhilePaused, error_chain,
    io_err, kill_and_wait, log_tail, process_alive, record_nothing, remove_socket, spawn_detached,
    uds_http, wait_gone,
};
pub use banger_api::backend::{JailSettings, Timeouts};
use banger_api::machine::MachineSpec;
use banger_api::model::VmmProcess;

mod snapshot;
pub use snapshot::{MEMORY_FILE, STATE_FILE};

const NAME: &str = "firecracker";

/// The Firecracker VMM backend.
#[derive(Debug, Clone)]
pub struct Firecracker {
    bin: PathBuf,
    timeouts: Timeouts,
    jail: JailSettings,
    /// Restore the snapshot in this directory instead of booting.
    restore: Option<PathBuf>,
}

impl Firecracker {
    /// A backend running the `firecracker` binary at `bin`, default timeouts.
    pub fn new(bin: PathBuf) -> Self {
        Self::with_timeouts(bin, Timeouts::default())
    }

    /// A backend with explicit timeouts (tests use short ones).
    pub fn with_timeouts(bin: PathBuf, timeouts: Timeouts) -> Self {
        Firecracker {
            bin,
            timeouts,
            jail: JailSettings {
                enabled: false,
                cgroups: false,
                ..JailSettings::default()
            },
            restore: None,
        }
    }

    /// The same backend confined by `jail`: under a root daemon with a
    /// jailer found, firecracker runs under it (see [`crate::jailer`]).
    pub fn with_jail(self, jail: JailSettings) -> Self {
        Firecracker { jail, ..self }
    }

    /// The jailer to launch through, when this launch is jailed.
    fn jailer(&self) -> Option<&Path> {
        let bin = self.jail.jailer_bin.as_deref()?;
        (self.jail.enabled && running_as_root()).then_some(bin)
    }

    /// After the VMM is gone: its cgroup, jail and API socket.
    fn clean_up(&self, api_socket: &Path) -> Result<(), VmmError> {
        cgroup::kill_recorded(api_socket, self.timeouts.exit)?;
        jailer::clear_for(api_socket)?;
        remove_socket(api_socket)
    }
}

impl Vmm for Firecracker {
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
        refuse_pci(machine)?;
        prepare_files(machine, paths)?;
        let serial = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&machine.serial_log)
            .map_err(|e| io_err(format!("opening {}", machine.serial_log.display()), e))?;
        let serial_err = serial
            .try_clone()
            .map_err(|e| io_err("duplicating the serial log handle", e))?;

        let jailed = match self.jailer() {
            Some(_) => {
                let id = vm_name(paths)?;
                let uid = vm_uid(self.jail.uid_base, &id);
                Some(jailer::prepare(
                    &self.bin,
                    uid,
                    &id,
                    machine,
                    paths,
                    self.jail.cgroups,
                )?)
            }
            None => None,
        };
        let (bin, mut cmd) = match (self.jailer(), &jailed) {
            (Some(j), Some(jailed)) => {
                let mut cmd = Command::new(j);
                cmd.args(&jailed.args);
                if let Some(cg) = &jailed.cgroup {
                    cg.join_on_exec(&mut cmd);
                }
                (j.to_path_buf(), cmd)
            }
            _ => {
                let mut cmd = Command::new(&self.bin);
                cmd.arg("--api-sock").arg(&paths.api_socket);
                (self.bin.clone(), cmd)
            }
        };
        // By their host paths: the jailed machine names them inside its root.
        let locks = DiskLocks::take(machine)?;
        let (machine, log) = match &jailed {
            Some(j) => (&j.machine, PathBuf::from(jailer::LOG)),
            None => (machine, paths.vmm_log.clone()),
        };
        cmd.stdin(Stdio::null()).stdout(serial).stderr(serial_err);
        locks.hand_to(&mut cmd);
        let spawned = spawn_detached(cmd, &bin, NAME).inspect_err(|_| {
            let _ = self.clean_up(&paths.api_socket);
        })?;
        let pid = spawned.pid;
        let start_time = spawned.start_time;
        let launched = Launched {
            spawned,
            api_socket: &paths.api_socket,
            exit_timeout: self.timeouts.exit,
            backend: self,
        };
        // The jailer closes what firecracker would inherit: a holder keeps
        // the locks instead.
        if jailed.is_some() {
            if let Err(e) = locks.hold_while(pid) {
                return Err(launched.abort(e));
            }
        }
        drop(locks);
        let Some(start_time) = start_time else {
            return Err(launched.abort(VmmError::NotReady(format!(
                "{NAME} (pid {pid}) vanished right after it was started"
            ))));
        };
        let process = VmmProcess {
            pid,
            start_time,
            api_socket: paths.api_socket.clone(),
        };
        if let Err(e) = on_spawned(&process) {
            return Err(launched.abort(e));
        }
        if let Err(e) = self.wait_ready(&launched, &machine.serial_log) {
            return Err(launched.abort(e));
        }
        let booted = match (&self.restore, &jailed) {
            (Some(dir), Some(j)) => {
                let uid = vm_uid(self.jail.uid_base, &vm_name(paths)?);
                self.load_snapshot(dir, machine, &paths.api_socket, &log, &j.root, uid)
            }
            _ => self.configure_and_start(machine, &paths.api_socket, &log),
        };
        if let Err(e) = booted {
            // A request that failed because firecracker died says little:
            // say how it ended and what it wrote instead.
            let e = match launched.spawned.exit_status() {
                Some(how) => VmmError::NotReady(format!(
                    "{NAME} exited with {how} while being configured ({}); last lines of {}:\n{}\nlast lines of {}:\n{}",
                    error_chain(&e),
                    machine.serial_log.display(),
                    log_tail(&machine.serial_log, LOG_TAIL_LINES),
                    paths.vmm_log.display(),
                    log_tail(&paths.vmm_log, LOG_TAIL_LINES)
                )),
                None => e,
            };
            return Err(launched.abort(e));
        }
        Ok(process)
    }

    fn shutdown(&self, process: &VmmProcess, grace: Duration) -> Result<(), VmmError> {
        if process_alive(process) {
            let asked = self.put(
                &process.api_socket,
                "/actions",
                &json!({"action_type": "SendCtrlAltDel"}),
            );
            match asked {
                Ok(()) => wait_gone(process, grace),
                Err(e) => tracing::warn!(
                    pid = process.pid,
                    error = %error_chain(&e),
                    "Graceful shutdown request failed; killing the VMM"
                ),
            }
            kill_and_wait(process, self.timeouts.exit)?;
        }
        self.clean_up(&process.api_socket)
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
        kill_and_wait(process, self.timeouts.exit)?;
        self.clean_up(&process.api_socket)
    }
}

impl Firecracker {
    /// Polls `GET /` until it answers, the child exits, or the deadline
    /// passes. The pause starts at 1 ms and doubles up to `POLL`: the
    /// socket is usually there within a few ms, and a flat 10 ms pause was
    /// most of a launch.
    fn wait_ready(&self, launched: &Launched<'_>, serial_log: &Path) -> Result<(), VmmError> {
        let deadline = Instant::now() + self.timeouts.socket_ready;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(how) = launched.spawned.exit_status() {
                return Err(VmmError::NotReady(format!(
                    "{NAME} exited with {how} before its API socket was ready; last lines of {}:\n{}",
                    serial_log.display(),
                    log_tail(serial_log, LOG_TAIL_LINES)
                )));
            }
            let probe_timeout = self.timeouts.request.min(Duration::from_secs(1));
            let probe = uds_http::request(launched.api_socket, "GET", "/", None, probe_timeout);
            if probe.is_ok_and(|r| r.is_success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VmmError::NotReady(format!(
                    "{NAME} API socket {} did not answer within {:?}; last lines of {}:\n{}",
                    launched.api_socket.display(),
                    self.timeouts.socket_ready,
                    serial_log.display(),
                    log_tail(serial_log, LOG_TAIL_LINES)
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(POLL);
        }
    }

    /// The configuration calls, in the order Firecracker documents, then boot.
    fn configure_and_start(
        &self,
        m: &MachineSpec,
        sock: &Path,
        log: &Path,
    ) -> Result<(), VmmError> {
        self.put(
            sock,
            "/logger",
            &json!({"log_path": log, "level": "Info", "show_level": true, "show_log_origin": false}),
        )?;
        let mut boot = json!({"kernel_image_path": m.kernel, "boot_args": m.kernel_args()});
        if let Some(initrd) = &m.initrd {
            boot["initrd_path"] = json!(initrd);
        }
        self.put(sock, "/boot-source", &boot)?;
        self.put(
            sock,
            "/machine-config",
            &json!({"vcpu_count": m.vcpus, "mem_size_mib": m.memory_mib}),
        )?;
        for (i, d) in m.drives.iter().enumerate() {
            self.put(
                sock,
                &format!("/drives/{}", d.id),
                &json!({
                    "drive_id": d.id,
                    "path_on_host": d.path,
                    "is_root_device": i == 0,
                    "is_read_only": d.read_only,
                }),
            )?;
        }
        for n in &m.nics {
            self.put(
                sock,
                &format!("/network-interfaces/{}", n.id),
                &json!({"iface_id": n.id, "host_dev_name": n.tap, "guest_mac": n.mac}),
            )?;
        }
        if let Some(v) = &m.vsock {
            self.put(
                sock,
                "/vsock",
                &json!({"guest_cid": v.guest_cid, "uds_path": v.uds_path}),
            )?;
        }
        self.put(sock, "/actions", &json!({"action_type": "InstanceStart"}))
    }

    /// `PUT path` with a JSON body; a non-2xx answer becomes `VmmError::Api`.
    fn put(&self, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        self.send("PUT", sock, path, body)
    }

    fn patch(&self, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        self.send("PATCH", sock, path, body)
    }

    fn send(&self, method: &str, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        let request = format!("{method} {path}");
        let r = uds_http::request(
            sock,
            method,
            path,
            Some(&body.to_string()),
            self.timeouts.request,
        )
        .map_err(|e| io_err(format!("sending {request}"), e))?;
        if r.is_success() {
            return Ok(());
        }
        Err(VmmError::Api {
            vmm: NAME,
            request,
            fault: fault_message(r.status, &r.body),
        })
    }
}

/// A VMM process spawned by this launch, not yet handed to the caller.
struct Launched<'a> {
    spawned: Spawned,
    api_socket: &'a Path,
    exit_timeout: Duration,
    backend: &'a Firecracker,
}

impl Launched<'_> {
    /// Kills the child, removes the socket, and returns `err` for the caller.
    fn abort(self, err: VmmError) -> VmmError {
        self.spawned.abort(self.exit_timeout);
        if let Err(e) = self.backend.clean_up(self.api_socket) {
            tracing::warn!(error = %error_chain(&e), "Failed to remove the VMM socket");
        }
        err
    }
}

/// Removes stale sockets and creates what Firecracker needs before spawn.
/// Firecracker has no PCI bus (and so no VFIO): a machine with PCI devices
/// is refused before anything is started.
fn refuse_pci(machine: &MachineSpec) -> Result<(), VmmError> {
    match machine.pci_devices.first() {
        None => Ok(()),
        Some(d) => Err(VmmError::Unsupported(format!(
            "{NAME} cannot attach the {d}: it has no PCI bus or VFIO; create the VM with vmm = \"qemu\" (--vmm qemu)"
        ))),
    }
}

fn prepare_files(machine: &MachineSpec, paths: &LaunchPaths) -> Result<(), VmmError> {
    remove_socket(&paths.api_socket)?;
    // Firecracker refuses to bind a vsock socket left by a previous run.
    if let Some(v) = &machine.vsock {
        // A symlink is a previous jailed run's link into its chroot.
        if fs::symlink_metadata(&v.uds_path)
            .is_ok_and(|m| m.file_type().is_socket() || m.file_type().is_symlink())
        {
            remove_socket(&v.uds_path)?;
        }
    }
    for file in [&paths.api_socket, &paths.vmm_log, &machine.serial_log] {
        if let Some(dir) = file.parent() {
            fs::create_dir_all(dir)
                .map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        }
    }
    // Firecracker's logger only opens an existing file.
    File::create(&paths.vmm_log)
        .map_err(|e| io_err(format!("creating {}", paths.vmm_log.display()), e))?;
    Ok(())
}

/// Firecracker's `fault_message`, or the raw body when it sent something else.
fn fault_message(status: u16, body: &[u8]) -> String {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    if let Some(msg) = parsed
        .as_ref()
        .and_then(|v| v.get("fault_message"))
        .and_then(Value::as_str)
    {
        return msg.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_api::machine::PciDevice;

    #[test]
    fn refuses_a_machine_with_pci_devices_naming_the_device_and_qemu() {
        let mut m = MachineSpec {
            kernel: "/k".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            drives: vec![],
            nics: vec![],
            vsock: None,
            serial_log: "/nonexistent/banger/serial.log".into(),
            pci_devices: vec![],
        };
        assert!(refuse_pci(&m).is_ok());
        m.pci_devices.push(PciDevice::Vfio {
            address: "0000:01:00.0".parse().unwrap(),
        });
        // Through the trait, so nothing is spawned or created first.
        let fc = Firecracker::new("/nonexistent/banger/firecracker".into());
        let paths = LaunchPaths {
            vm_dir: "/nonexistent/banger/vm".into(),
            api_socket: "/nonexistent/banger/fc.sock".into(),
            vmm_log: "/nonexistent/banger/vm/fc.log".into(),
        };
        let err = fc.launch(&m, &paths).unwrap_err();
        assert!(matches!(err, VmmError::Unsupported(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("VFIO device 0000:01:00.0"), "{msg}");
        assert!(msg.contains(r#"vmm = "qemu""#), "{msg}");
    }

    #[test]
    fn fault_message_prefers_firecrackers_field() {
        assert_eq!(
            fault_message(400, br#"{"fault_message":"Invalid block device path"}"#),
            "Invalid block device path"
        );
        assert_eq!(fault_message(500, b"  oops \n"), "HTTP 500: oops");
        assert_eq!(fault_message(404, b""), "HTTP 404");
        assert_eq!(
            fault_message(400, br#"{"other":1}"#),
            r#"HTTP 400: {"other":1}"#
        );
    }
}
