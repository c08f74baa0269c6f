//! `DELETE /v1/vms/NAME?detach=true`, what `vm run --rm` sends for a VM
//! banger named (docs/vm-run.md): the daemon answers `202` once the delete
//! has begun and finishes it on its own; a delete that fails keeps the VM
//! with its error, as a waited-for delete does. Real CLI and daemon, fake
//! firecracker.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use banger_api::model::VmState;
    use banger_core::store::Store;
    use test_infra::{BangerEnv, pid_alive, wait_until, workspace_cdylib};

    /// `DELETE path` on the daemon's socket: the status line and the time
    /// the answer took.
    fn delete(env: &BangerEnv, path: &str) -> (String, Duration) {
        let started = Instant::now();
        let mut s = UnixStream::connect(env.socket()).unwrap();
        write!(
            s,
            "DELETE {path} HTTP/1.1\r\nHost: bangerd\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let took = started.elapsed();
        let status = answer.lines().next().unwrap_or_default().to_string();
        (status, took)
    }

    #[test]
    fn a_detached_delete_is_accepted_and_the_daemon_finishes_it() {
        let env = BangerEnv::new();
        env.create("gone", &[]).ok();
        let dir = env.show("gone").dir;
        let (status, _) = delete(&env, "/v1/vms/gone?detach=true");
        assert!(status.starts_with("HTTP/1.1 202"), "{status}");
        wait_until(
            Duration::from_secs(30),
            "the daemon finishes the delete",
            || env.list().is_empty(),
        );
        assert!(!dir.exists(), "{} survived the delete", dir.display());

        // Without detach the answer is the finished delete.
        env.create("waited", &[]).ok();
        let dir = env.show("waited").dir;
        let (status, _) = delete(&env, "/v1/vms/waited");
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert!(env.list().is_empty());
        assert!(!dir.exists());
        // An unknown VM is refused at once, as without detach.
        let (status, _) = delete(&env, "/v1/vms/nosuch?detach=true");
        assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    }

    /// An env whose VM `hung` never returns from its teardown hook (until
    /// the hook timeout, `secs`).
    fn hung_teardown(secs: u64) -> BangerEnv {
        let env = BangerEnv::new();
        env.write_config(&format!("plugin_hook_timeout_secs = {secs}\n"));
        let so = workspace_cdylib("banger-plugin-faulty");
        std::fs::copy(&so, env.plugins_dir().join(so.file_name().unwrap())).unwrap();
        env.create("hung", &["--cap", "faulty:hang=teardown"]).ok();
        env
    }

    #[test]
    fn a_detached_delete_does_not_wait_for_a_hung_teardown_whose_failure_keeps_the_vm() {
        let env = hung_teardown(3);

        let (status, took) = delete(&env, "/v1/vms/hung?detach=true");
        assert!(status.starts_with("HTTP/1.1 202"), "{status}");
        assert!(
            took < Duration::from_secs(3),
            "the answer took {took:?}: it waited for the hung teardown"
        );
        // The hook timeout fails the teardown: the VM stays, in error, with
        // the failed stage, for `vm show` and a forced delete.
        wait_until(Duration::from_secs(30), "the teardown times out", || {
            env.show("hung").record.state == VmState::Error
        });
        let vm = env.show("hung");
        let stage = vm.record.last_error.map(|e| e.stage).unwrap_or_default();
        assert_eq!(stage, "teardown:faulty");
        env.banger(&["vm", "delete", "--force", "hung"]).ok();
        assert!(env.list().is_empty());
    }

    #[test]
    fn a_daemon_stop_lets_a_detached_delete_end_first() {
        let env = hung_teardown(2);
        let (status, _) = delete(&env, "/v1/vms/hung?detach=true");
        assert!(status.starts_with("HTTP/1.1 202"), "{status}");
        let pid = env.daemon_pid().unwrap();
        env.banger(&["daemon", "stop"]).ok();
        wait_until(Duration::from_secs(20), "the daemon exits", || {
            !pid_alive(pid)
        });
        // The delete ran to its end before the daemon exited: the hook
        // timeout failed the teardown, so the VM is kept in error and no
        // longer marked as being deleted (cut short, the mark would stay).
        let store = Store::open(&env.state_dir().join("banger.db")).unwrap();
        let vm = store.find_vm("hung").unwrap().unwrap();
        assert!(
            !store.is_deleting(&vm.id).unwrap(),
            "the delete was cut short"
        );
        assert_eq!(vm.state, VmState::Error);
    }
}
