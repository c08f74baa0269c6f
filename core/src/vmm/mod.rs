//! VMM backends behind one trait. The lifecycle hands a backend a finished
//! [`MachineSpec`]; the backend launches, stops and kills the VMM process.
//!
//! VMM processes outlive the daemon: they run in their own session and are
//! found again by pid + start time (see [`process_alive`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::machine::MachineSpec;
use crate::model::VmmProcess;

pub mod firecracker;
mod uds_http;

/// Host paths a backend may use for one VM.
#[derive(Debug, Clone)]
pub struct LaunchPaths {
    /// The VM's private directory.
    pub vm_dir: PathBuf,
    /// Where the VMM's API socket goes (short path under the runtime dir).
    pub api_socket: PathBuf,
    /// The VMM's own log (not the guest console).
    pub vmm_log: PathBuf,
}

/// A backend failure.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be found or started.
    #[error("Failed to start {bin}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM exited or never answered while we were setting it up.
    #[error("{0}")]
    NotReady(String),
    /// An API call was rejected; `fault` is the VMM's own message.
    #[error("{vmm} rejected {request}: {fault}")]
    Api {
        /// Backend name.
        vmm: &'static str,
        /// e.g. `PUT /boot-source`.
        request: String,
        /// The VMM's fault message.
        fault: String,
    },
    /// Talking to the VMM failed.
    #[error("I/O with the VMM failed while {0}")]
    Io(String, #[source] std::io::Error),
    /// Signalling the VMM process failed.
    #[error("Failed to signal VMM pid {0}")]
    Signal(u32, #[source] nix::Error),
}

/// A VMM backend.
pub trait Vmm: Send + Sync + fmt::Debug {
    /// Backend name for messages (`firecracker`).
    fn name(&self) -> &'static str;

    /// Starts the VMM for `machine` and boots the guest. On error nothing is
    /// left running. The guest console goes to `machine.serial_log`.
    fn launch(&self, machine: &MachineSpec, paths: &LaunchPaths) -> Result<VmmProcess, VmmError>;

    /// Asks the guest to shut down, waits up to `grace`, then kills the VMM.
    /// Returns once the process is gone.
    fn shutdown(&self, process: &VmmProcess, grace: Duration) -> Result<(), VmmError>;

    /// Kills the VMM at once and waits until it is gone.
    fn kill(&self, process: &VmmProcess) -> Result<(), VmmError>;
}

/// The start time (clock ticks since boot) of `pid`, from `/proc/PID/stat`.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with " S ppid ..." (field 3); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if `p` is still the same live process (not a zombie, not a reused pid).
pub fn process_alive(p: &VmmProcess) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let mut fields = stat[close + 1..].split_whitespace();
    let state = fields.next();
    if matches!(state, Some("Z") | Some("X")) {
        return false;
    }
    fields.nth(18).and_then(|s| s.parse::<u64>().ok()) == Some(p.start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_pid_reuse_is_detected() {
        let pid = std::process::id();
        let st = process_start_time(pid).expect("own start time");
        let me = VmmProcess {
            pid,
            start_time: st,
            api_socket: "/x".into(),
        };
        assert!(process_alive(&me));
        let reused = VmmProcess {
            start_time: st + 1,
            ..me.clone()
        };
        assert!(!process_alive(&reused));
        let gone = VmmProcess {
            pid: u32::MAX - 1,
            ..me
        };
        assert!(!process_alive(&gone));
    }
}
