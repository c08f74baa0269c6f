//! QEMU snapshots: the VM's state is a migration stream written to a file
//! the daemon opens and hands QEMU over QMP (`getfd`, then `migrate
//! fd:NAME`), so neither `-sandbox spawn=deny` (no `exec:`) nor the chroot
//! (no paths) gets in the way. A restore is the same command line with
//! `-incoming defer`, the file handed over the same way to
//! `migrate-incoming`. QEMU refuses to migrate a VM with a device that has
//! no migration support; QEMU 7.2's `vhost-user-vsock-device` is one, so
//! a VM with the agent's vsock is refused there (`docs/snapshots.md`).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Qemu;
use super::qmp::Qmp;
use crate::{LaunchPaths, OnSpawned, POLL, Vmm, VmmError, WhilePaused, error_chain, io_err};
use banger_api::machine::MachineSpec;
use banger_api::model::VmmProcess;

/// The migration stream, in the snapshot directory.
pub const MIGRATION_FILE: &str = "qemu.migration";
/// The name the stream's descriptor gets in QEMU's monitor.
const FD_NAME: &str = "banger-snapshot";
/// How long writing or reading the stream may take (it is the guest's
/// whole memory, written at disk speed).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

impl Qemu {
    /// [`Vmm::snapshot`] for QEMU.
    pub(super) fn snapshot_to(
        &self,
        process: &VmmProcess,
        dir: &Path,
        while_paused: &mut WhilePaused<'_>,
    ) -> Result<(), VmmError> {
        refuse_path_disks_in_a_chroot(process)?;
        let timeout = self.settings.timeouts.request;
        let mut q = Qmp::connect(&process.api_socket, timeout).map_err(|e| {
            io_err(
                format!("connecting to QMP at {}", process.api_socket.display()),
                e,
            )
        })?;
        qmp(&mut q, "stop", Value::Null)?;
        let saved = save(&mut q, dir).and_then(|()| while_paused());
        // Resumed whatever happened: a failed snapshot leaves the VM running.
        match (saved, qmp(&mut q, "cont", Value::Null)) {
            (saved, Ok(_)) => saved,
            // Still paused: say so, or the VM looks hung while it runs.
            (saved, Err(e)) => {
                let e = error_chain(&e);
                let pid = process.pid;
                let what = match saved {
                    Ok(()) => format!(
                        "QEMU (pid {pid}) saved the VM's state but could not resume it ({e})"
                    ),
                    Err(why) => format!(
                        "The snapshot failed ({}), and QEMU (pid {pid}) could not resume the VM ({e})",
                        error_chain(&why)
                    ),
                };
                Err(VmmError::NotReady(format!(
                    "{what}: the VM is paused. Kill it (`banger vm kill`) and start it again; it boots from its disks"
                )))
            }
        }
    }

    /// [`Vmm::restore_recorded`] for QEMU.
    pub(super) fn restore_from(
        &self,
        machine: &MachineSpec,
        paths: &LaunchPaths,
        dir: &Path,
        on_spawned: &mut OnSpawned<'_>,
    ) -> Result<VmmProcess, VmmError> {
        let stream = dir.join(MIGRATION_FILE);
        let file = File::open(&stream).map_err(|e| {
            io_err(
                format!(
                    "opening {} (a QEMU snapshot's state; `banger vm snapshot list` shows the snapshots)",
                    stream.display()
                ),
                e,
            )
        })?;
        let incoming = Qemu {
            incoming: true,
            ..self.clone()
        };
        let process = incoming.launch_recorded(machine, paths, on_spawned)?;
        let loaded = Qmp::connect(&process.api_socket, self.settings.timeouts.request)
            .map_err(|e| io_err("connecting to the restoring QEMU's QMP", e))
            .and_then(|mut q| {
                q.send_fd(FD_NAME, file.as_fd())
                    .map_err(|e| io_err("handing QEMU the snapshot's state", e))?;
                qmp(
                    &mut q,
                    "migrate-incoming",
                    json!({ "uri": format!("fd:{FD_NAME}") }),
                )?;
                wait_for(&mut q, "query-migrate", "completed", MIGRATION_TIMEOUT)?;
                // The stream records the source as stopped (it was, for the
                // snapshot), so the restored VM stays paused until told.
                qmp(&mut q, "cont", Value::Null)?;
                wait_for(&mut q, "query-status", "running", MIGRATION_TIMEOUT)
            });
        if let Err(e) = loaded {
            let _ = self.kill(&process);
            return Err(e);
        }
        Ok(process)
    }
}

/// QEMU ends an outgoing migration by reopening every disk read-only. A
/// chrooted QEMU reopens them through its descriptor sets (`fdset.rs`);
/// one started by an older banger named its disks by host paths, which
/// its chroot hides, and the migration would fail half way
/// (`bdrv_inactivate_all() failed`). That one is refused before the guest
/// is touched. The command line is read from `/proc`; a process whose
/// command line cannot be read is let through, and QEMU names the failure
/// itself.
fn refuse_path_disks_in_a_chroot(process: &VmmProcess) -> Result<(), VmmError> {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", process.pid)) else {
        return Ok(());
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let chrooted = args.iter().any(|a| *a == b"-chroot");
    let by_fdset = args.iter().any(|a| super::fdset::arg_names_an_fdset(a));
    if chrooted && !by_fdset {
        return Err(VmmError::Unsupported(
            "QEMU cannot snapshot this VM: it runs chrooted and was started with its disks named by host paths, which it must reopen at the end of the migration; stop and start the VM (`banger vm stop`, `banger vm start`) so it gets its disks as descriptors, then snapshot it (docs/snapshots.md)".into(),
        ));
    }
    Ok(())
}

/// Writes the migration stream of the stopped VM to `dir`.
fn save(q: &mut Qmp, dir: &Path) -> Result<(), VmmError> {
    let path = dir.join(MIGRATION_FILE);
    let file =
        File::create(&path).map_err(|e| io_err(format!("creating {}", path.display()), e))?;
    q.send_fd(FD_NAME, file.as_fd())
        .map_err(|e| io_err("handing QEMU the snapshot file", e))?;
    let started = q.execute_with("migrate", json!({ "uri": format!("fd:{FD_NAME}") }));
    if let Err(e) = started {
        let msg = e.to_string();
        // Nothing was written; the monitor keeps the descriptor otherwise.
        let _ = q.execute_with("closefd", json!({ "fdname": FD_NAME }));
        if msg.contains("non-migratable device") {
            return Err(VmmError::Unsupported(format!(
                "QEMU cannot snapshot this VM: {msg}. This QEMU cannot migrate a vhost-user-vsock device (the guest agent's vsock): set qemu_agent_transport = \"serial\" in the daemon's config and create the VM again (its agent then uses a virtio-serial port, which migrates), or snapshot it under Firecracker (--vmm firecracker); see docs/snapshots.md"
            )));
        }
        return Err(io_err("starting the migration to the snapshot file", e));
    }
    wait_for(q, "query-migrate", "completed", MIGRATION_TIMEOUT)?;
    file.sync_all()
        .map_err(|e| io_err(format!("syncing {}", path.display()), e))
}

/// Runs one QMP command, naming it on failure.
fn qmp(q: &mut Qmp, command: &str, arguments: Value) -> Result<Value, VmmError> {
    q.execute_with(command, arguments)
        .map_err(|e| io_err(format!("running QMP {command}"), e))
}

/// Polls `query` (`query-migrate` or `query-status`) until its `status` is
/// `want`; a failed migration is an error with QEMU's reason.
fn wait_for(q: &mut Qmp, query: &str, want: &str, timeout: Duration) -> Result<(), VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = qmp(q, query, Value::Null)?;
        let status = answer.get("status").and_then(Value::as_str).unwrap_or("");
        if status == want {
            return Ok(());
        }
        if matches!(
            status,
            "failed" | "cancelled" | "internal-error" | "shutdown"
        ) {
            let why = answer
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("QEMU gave no reason");
            return Err(VmmError::NotReady(format!(
                "The QEMU migration {status}: {why}; see the VM's vmm.log"
            )));
        }
        if Instant::now() >= deadline {
            return Err(VmmError::NotReady(format!(
                "{query} still said {status:?} after {timeout:?}, not {want:?}; see the VM's vmm.log"
            )));
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::qemu::QemuSettings;
    use crate::qemu::qmp::fake::serve;

    const OK: &str = "{\"return\": {}}\n";
    /// A snapshot's QMP answers up to `cont`, which fails as it did with
    /// QEMU's own locks on fd-set disks.
    const CONT_FAILS: [&str; 6] = [
        OK,
        OK,
        OK,
        OK,
        "{\"return\": {\"status\": \"completed\"}}\n",
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Failed to get \\\"write\\\" lock\"}}\n",
    ];

    /// The commands a scripted server received, by name.
    fn commands(lines: Vec<String>) -> Vec<String> {
        lines
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["execute"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }

    /// A snapshot whose `cont` fails leaves the VM paused: the error says
    /// so and how to get it back, whether the snapshot itself was taken or
    /// not.
    #[test]
    fn a_vm_left_paused_after_a_snapshot_is_named_with_the_way_back() {
        let dir = tempfile::tempdir().unwrap();
        let process = VmmProcess {
            pid: std::process::id(),
            start_time: 0,
            api_socket: dir.path().join("qmp.sock"),
        };
        let vmm = Qemu::new(QemuSettings::default());
        let server = serve(
            UnixListener::bind(&process.api_socket).unwrap(),
            CONT_FAILS.to_vec(),
        );
        let err = vmm
            .snapshot_to(&process, dir.path(), &mut || Ok(()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            commands(server.join().unwrap()),
            [
                "qmp_capabilities",
                "stop",
                "getfd",
                "migrate",
                "query-migrate",
                "cont"
            ]
        );
        assert!(
            err.contains("saved the VM's state but could not resume it"),
            "{err}"
        );
        assert!(err.contains("the VM is paused"), "{err}");
        assert!(err.contains("banger vm kill"), "{err}");
        assert!(err.contains("write"), "QEMU's reason: {err}");

        // A failed copy while paused, and then no resume either: both said.
        std::fs::remove_file(&process.api_socket).unwrap();
        let server = serve(
            UnixListener::bind(&process.api_socket).unwrap(),
            CONT_FAILS.to_vec(),
        );
        let err = vmm
            .snapshot_to(&process, dir.path(), &mut || {
                Err(VmmError::NotReady("the disk copy failed".into()))
            })
            .unwrap_err()
            .to_string();
        server.join().unwrap();
        assert!(err.contains("the disk copy failed"), "{err}");
        assert!(err.contains("the VM is paused"), "{err}");
    }
}
