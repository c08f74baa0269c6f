//! How the VMM processes this daemon spawned ended. Each spawned process's
//! reaper thread records its exit status here, so a caller waiting on the
//! guest (the agent's health check, sshd) can notice at once that the VMM
//! is gone and say how it ended, instead of waiting out its timeout and
//! blaming the guest.

use std::collections::HashMap;
use std::io;
use std::process::ExitStatus;
use std::sync::{LazyLock, Mutex, MutexGuard};

use banger_api::model::VmmProcess;

use crate::process_alive;

/// Exit statuses kept once reaped; older ones are dropped first (a VM's
/// start only asks about its own VMM, seconds after it was spawned).
const KEEP_EXITED: usize = 256;

/// One spawned process: its start time (the pid alone may be reused) and,
/// once reaped, how it ended.
#[derive(Debug)]
struct Slot {
    start_time: Option<u64>,
    status: Option<String>,
    /// Order of reaping, to drop the oldest first.
    reaped_seq: u64,
}

#[derive(Debug, Default)]
struct Exits {
    slots: HashMap<u32, Slot>,
    seq: u64,
}

static EXITS: LazyLock<Mutex<Exits>> = LazyLock::new(Mutex::default);

fn exits() -> MutexGuard<'static, Exits> {
    // The map stays consistent whatever a panicking holder did: every
    // update is a single insert or field write.
    EXITS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a just-spawned process (before its reaper can reap it).
pub(crate) fn spawned(pid: u32, start_time: Option<u64>) {
    exits().slots.insert(
        pid,
        Slot {
            start_time,
            status: None,
            reaped_seq: 0,
        },
    );
}

/// Records how process `pid` ended; called by its reaper.
pub(crate) fn reaped(pid: u32, status: &io::Result<ExitStatus>) {
    let text = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("an unknown status ({e})"),
    };
    let mut exits = exits();
    exits.seq += 1;
    let seq = exits.seq;
    if let Some(slot) = exits.slots.get_mut(&pid) {
        slot.status = Some(text);
        slot.reaped_seq = seq;
    }
    let reaped = exits.slots.values().filter(|s| s.status.is_some()).count();
    if reaped > KEEP_EXITED {
        let oldest = exits
            .slots
            .iter()
            .filter(|(_, s)| s.status.is_some())
            .min_by_key(|(_, s)| s.reaped_seq)
            .map(|(pid, _)| *pid);
        if let Some(pid) = oldest {
            exits.slots.remove(&pid);
        }
    }
}

/// How VMM process `p` ended (`exit status: 1`, `signal: 9 (SIGKILL)`),
/// or `None` while it runs. A process this daemon did not spawn (started
/// by an earlier daemon) is only known to be gone, not how.
pub fn exit_status(p: &VmmProcess) -> Option<String> {
    {
        let exits = exits();
        if let Some(slot) = exits.slots.get(&p.pid) {
            if slot.start_time == Some(p.start_time) {
                // Between death and reaping the status is not known yet:
                // the reaper is about to record it.
                return slot.status.clone();
            }
        }
    }
    (!process_alive(p)).then(|| "an unknown status (not started by this daemon)".to_owned())
}

/// Whether `status` (from [`exit_status`]) says the process failed: a
/// non-zero exit or a signal. A clean exit (a guest that shut down) and an
/// unknown status are not failures.
pub fn is_failure(status: &str) -> bool {
    (status.starts_with("exit status: ") && status != "exit status: 0")
        || status.starts_with("signal: ")
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    /// Polls until `p` has an exit status (the reaper runs on its own thread).
    fn wait_for_exit(p: &VmmProcess) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = exit_status(p) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no exit status for pid {}",
                p.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn spawn(script: &str) -> VmmProcess {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        let s = crate::spawn_detached(
            crate::Detached::new(cmd),
            std::path::Path::new("/bin/sh"),
            "test",
        )
        .unwrap();
        VmmProcess {
            pid: s.pid,
            start_time: s.start_time.expect("start time of a live child"),
            api_socket: "/nonexistent".into(),
        }
    }

    #[test]
    fn a_spawned_process_reports_its_exit_code_once_it_ends() {
        let (read, write) = std::io::pipe().unwrap();
        // The child blocks on the pipe until the test closes its end.
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "read _ ; exit 7"]);
        let what = crate::Detached::new(cmd).stdin(read);
        let s = crate::spawn_detached(what, std::path::Path::new("/bin/sh"), "test").unwrap();
        let p = VmmProcess {
            pid: s.pid,
            start_time: s.start_time.unwrap(),
            api_socket: "/nonexistent".into(),
        };
        assert_eq!(exit_status(&p), None, "still running");
        drop(write);
        assert_eq!(wait_for_exit(&p), "exit status: 7");
        assert!(is_failure("exit status: 7"));
        assert!(!is_failure(&wait_for_exit(&spawn("exit 0"))));
    }

    #[test]
    fn a_killed_process_reports_its_signal() {
        let p = spawn("kill -9 $$");
        assert_eq!(wait_for_exit(&p), "signal: 9 (SIGKILL)");
        assert!(is_failure("signal: 9 (SIGKILL)"));
    }

    #[test]
    fn a_process_of_another_daemon_is_only_known_to_be_gone() {
        let gone = VmmProcess {
            pid: u32::MAX - 2,
            start_time: 1,
            api_socket: "/nonexistent".into(),
        };
        let status = exit_status(&gone);
        assert_eq!(
            status.as_deref(),
            Some("an unknown status (not started by this daemon)")
        );
        assert!(!is_failure(&status.unwrap_or_default()));
        let me = VmmProcess {
            pid: std::process::id(),
            start_time: crate::process_start_time(std::process::id()).unwrap(),
            api_socket: "/nonexistent".into(),
        };
        assert_eq!(exit_status(&me), None, "a live process has not exited");
    }
}
