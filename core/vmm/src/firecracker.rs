//! The Firecracker backend: spawns `firecracker --api-sock`, configures the
//! machine through its HTTP API and boots it with `InstanceStart`; stops it
//! with `SendCtrlAltDel`, then SIGKILL after a grace period.
//!
//! The VMM runs in its own session so it outlives the daemon; its stdout and
//! stderr (the guest serial console) are appended to `machine.serial_log`.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cgroup;
use crate::confine::{running_as_root, vm_name, vm_uid};
use crate::disk_lock::DiskLocks;
use crate::jailer;
use crate::{
    Detached, LOG_TAIL_LINES, LaunchPaths, OnSpawned, Pauses, Spawned, Vmm, VmmError, WhilePaused,
    error_chain, io_err, kill_and_wait, log_tail, process_alive, record_nothing, remove_socket,
    spawn_detached, uds_http, wait_gone,
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
        let (bin, what) = match (self.jailer(), &jailed) {
            (Some(j), Some(jailed)) => {
                let mut cmd = Command::new(j);
                cmd.args(&jailed.args);
                let mut what = Detached::new(cmd);
                if let Some(cg) = &jailed.cgroup {
                    what.join_cgroup(cg);
                }
                (j.to_path_buf(), what)
            }
            _ => {
                let mut cmd = Command::new(&self.bin);
                cmd.arg("--api-sock").arg(&paths.api_socket);
                (self.bin.clone(), Detached::new(cmd))
            }
        };
        // By their host paths: the jailed machine names them inside its root.
        let locks = DiskLocks::take(machine)?;
        let (machine, log) = match &jailed {
            Some(j) => (&j.machine, PathBuf::from(jailer::LOG)),
            None => (machine, paths.vmm_log.clone()),
        };
        let mut what = what.output(serial)?;
        locks.hand_to(&mut what);
        let spawned = spawn_detached(what, &bin, NAME).inspect_err(|_| {
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
        let mut api = ApiSession::new(&paths.api_socket);
        if let Err(e) = self.wait_ready(&launched, &machine.serial_log, &mut api) {
            return Err(launched.abort(e));
        }
        let booted = match (&self.restore, &jailed) {
            (Some(dir), Some(j)) => {
                let uid = vm_uid(self.jail.uid_base, &vm_name(paths)?);
                self.load_snapshot(dir, machine, &paths.api_socket, &log, &j.root, uid)
            }
            _ => self.configure_and_start(machine, &mut api, &log),
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
    /// passes, with the pauses of [`Pauses`]: the socket is usually there
    /// within a few ms, and a flat 10 ms pause was most of a launch.
    /// The connection that answered is kept in `api` for what follows.
    fn wait_ready(
        &self,
        launched: &Launched<'_>,
        serial_log: &Path,
        api: &mut ApiSession<'_>,
    ) -> Result<(), VmmError> {
        let deadline = Instant::now() + self.timeouts.socket_ready;
        let mut pauses = Pauses::new();
        loop {
            if let Some(how) = launched.spawned.exit_status() {
                return Err(VmmError::NotReady(format!(
                    "{NAME} exited with {how} before its API socket was ready; last lines of {}:\n{}",
                    serial_log.display(),
                    log_tail(serial_log, LOG_TAIL_LINES)
                )));
            }
            let probe_timeout = self.timeouts.request.min(Duration::from_secs(1));
            let probe = api.call("GET", "/", None, probe_timeout);
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
            pauses.sleep();
        }
    }

    /// The configuration calls, in the order Firecracker documents, then
    /// boot, on one connection.
    fn configure_and_start(
        &self,
        m: &MachineSpec,
        api: &mut ApiSession<'_>,
        log: &Path,
    ) -> Result<(), VmmError> {
        self.put_on(
            api,
            "/logger",
            &json!({"log_path": log, "level": "Info", "show_level": true, "show_log_origin": false}),
        )?;
        let mut boot = json!({"kernel_image_path": m.kernel, "boot_args": m.kernel_args()});
        if let Some(initrd) = &m.initrd {
            boot["initrd_path"] = json!(initrd);
        }
        self.put_on(api, "/boot-source", &boot)?;
        self.put_on(
            api,
            "/machine-config",
            &json!({"vcpu_count": m.vcpus, "mem_size_mib": m.memory_mib}),
        )?;
        for (i, d) in m.drives.iter().enumerate() {
            self.put_on(
                api,
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
            self.put_on(
                api,
                &format!("/network-interfaces/{}", n.id),
                &json!({"iface_id": n.id, "host_dev_name": n.tap, "guest_mac": n.mac}),
            )?;
        }
        if let Some(v) = &m.vsock {
            self.put_on(
                api,
                "/vsock",
                &json!({"guest_cid": v.guest_cid, "uds_path": v.uds_path}),
            )?;
        }
        self.put_on(api, "/actions", &json!({"action_type": "InstanceStart"}))
    }

    /// `PUT path` with a JSON body; a non-2xx answer becomes `VmmError::Api`.
    fn put(&self, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        self.send("PUT", sock, path, body)
    }

    fn patch(&self, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        self.send("PATCH", sock, path, body)
    }

    fn send(&self, method: &str, sock: &Path, path: &str, body: &Value) -> Result<(), VmmError> {
        let r = uds_http::request(
            sock,
            method,
            path,
            Some(&body.to_string()),
            self.timeouts.request,
        );
        answered(format!("{method} {path}"), r)
    }

    /// `PUT path` on the session's connection.
    fn put_on(&self, api: &mut ApiSession<'_>, path: &str, body: &Value) -> Result<(), VmmError> {
        let r = api.call("PUT", path, Some(&body.to_string()), self.timeouts.request);
        answered(format!("PUT {path}"), r)
    }
}

/// `request`'s answer as a result: a non-2xx answer becomes `VmmError::Api`.
fn answered(request: String, r: std::io::Result<uds_http::Response>) -> Result<(), VmmError> {
    let r = r.map_err(|e| io_err(format!("sending {request}"), e))?;
    if r.is_success() {
        return Ok(());
    }
    Err(VmmError::Api {
        vmm: NAME,
        request,
        fault: fault_message(r.status, &r.body),
    })
}

/// One HTTP/1.1 keep-alive connection to the API socket for a launch's
/// sequence of requests (readiness probe, configuration, boot), instead
/// of a connection per request. A connection the server said it closes
/// (`Connection: close`, HTTP/1.0, a body up to EOF), closed, or that holds
/// bytes nobody asked for is replaced before the next request.
struct ApiSession<'a> {
    sock: &'a Path,
    conn: Option<BufReader<UnixStream>>,
}

impl<'a> ApiSession<'a> {
    fn new(sock: &'a Path) -> Self {
        ApiSession { sock, conn: None }
    }

    /// Sends one request and reads its answer; `timeout` bounds connecting
    /// and each read and write.
    fn call(
        &mut self,
        method: &str,
        path: &str,
        json_body: Option<&str>,
        timeout: Duration,
    ) -> std::io::Result<uds_http::Response> {
        let mut conn = match self.conn.take().filter(still_open) {
            Some(c) => c,
            None => BufReader::new(uds_http::connect(self.sock, timeout)?),
        };
        let stream = conn.get_mut();
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(body) = json_body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        stream.write_all(req.as_bytes())?;
        let answer = uds_http::read_response(&mut conn, method == "HEAD")?;
        if answer.reusable {
            self.conn = Some(conn);
        }
        Ok(answer)
    }
}

/// Whether a kept connection can take another request: nothing unread,
/// and the peer has not closed it (a non-blocking peek finds no data).
fn still_open(conn: &BufReader<UnixStream>) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    if !conn.buffer().is_empty() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(
        recv(
            conn.get_ref().as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(nix::errno::Errno::EAGAIN)
    )
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

    /// A minimal HTTP API server on a real Unix socket: records
    /// (connection number, request line) and answers 204, or 400 with a
    /// fault for `fail_path`; `close` ends every connection after one answer.
    fn api_server(
        sock: &Path,
        close: bool,
        fail_path: Option<&'static str>,
    ) -> std::sync::Arc<std::sync::Mutex<Vec<(usize, String)>>> {
        use std::io::{BufRead, Read};
        let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let request = line.trim().to_string();
                    log.lock().unwrap().push((n, request.clone()));
                    let failing = fail_path.is_some_and(|p| request.contains(&format!(" {p} ")));
                    let conn = if close { "close" } else { "keep-alive" };
                    let reply = if failing {
                        let b = r#"{"fault_message":"Invalid block device path"}"#;
                        format!(
                            "HTTP/1.1 400 Bad Request\r\nConnection: {conn}\r\nContent-Length: {}\r\n\r\n{b}",
                            b.len()
                        )
                    } else {
                        format!("HTTP/1.1 204 No Content\r\nConnection: {conn}\r\n\r\n")
                    };
                    out.write_all(reply.as_bytes()).unwrap();
                    if close {
                        break;
                    }
                }
            }
        });
        seen
    }

    fn machine_with_a_drive_and_a_nic() -> MachineSpec {
        MachineSpec {
            kernel: "/k".into(),
            initrd: None,
            boot_args: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            drives: vec![banger_api::machine::Drive {
                id: "root".into(),
                path: "/r".into(),
                read_only: false,
                role: banger_api::machine::DriveRole::Root,
            }],
            nics: vec![],
            vsock: None,
            serial_log: "/nonexistent/banger/serial.log".into(),
            pci_devices: vec![],
        }
    }

    #[test]
    fn the_configuration_goes_over_one_connection_and_survives_a_server_that_closes() {
        let fc = Firecracker::new("/nonexistent/banger/firecracker".into());
        let m = machine_with_a_drive_and_a_nic();
        let want = [
            "GET / HTTP/1.1",
            "PUT /logger HTTP/1.1",
            "PUT /boot-source HTTP/1.1",
            "PUT /machine-config HTTP/1.1",
            "PUT /drives/root HTTP/1.1",
            "PUT /actions HTTP/1.1",
        ];
        for close in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("api.sock");
            let seen = api_server(&sock, close, None);
            let mut api = ApiSession::new(&sock);
            let probe = api.call("GET", "/", None, Duration::from_secs(5)).unwrap();
            assert_eq!(probe.status, 204);
            fc.configure_and_start(&m, &mut api, Path::new("/l"))
                .unwrap();
            let seen = seen.lock().unwrap().clone();
            let lines: Vec<&str> = seen.iter().map(|(_, l)| l.as_str()).collect();
            assert_eq!(lines, want, "close={close}");
            let conns: std::collections::BTreeSet<usize> = seen.iter().map(|(n, _)| *n).collect();
            let expected = if close { want.len() } else { 1 };
            assert_eq!(conns.len(), expected, "close={close}: {seen:?}");
        }
    }

    #[test]
    fn a_refused_request_on_the_kept_connection_names_the_request_and_the_fault() {
        let fc = Firecracker::new("/nonexistent/banger/firecracker".into());
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let seen = api_server(&sock, false, Some("/drives/root"));
        let mut api = ApiSession::new(&sock);
        let err = fc
            .configure_and_start(&machine_with_a_drive_and_a_nic(), &mut api, Path::new("/l"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("PUT /drives/root"), "{msg}");
        assert!(msg.contains("Invalid block device path"), "{msg}");
        // Nothing after the refused request.
        assert_eq!(
            seen.lock().unwrap().last().unwrap().1,
            "PUT /drives/root HTTP/1.1"
        );
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
