//! Port forwarding to a real guest (QEMU/TCG, the no-init image, on the
//! e2e rig's bridge): `vm run -d -p 127.0.0.1:PORT:22` reaches the guest's sshd from
//! the host, and the port is closed once the VM stops. One boot. Needs
//! what `e2e.rs` needs (root, QEMU, the static agent, ssh, ip, nft);
//! missing pieces skip loudly.

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    use banger_api::model::VmState;
    use test_infra::guest_rig::rig;
    use test_infra::wait_until;

    /// The first line the far end of `127.0.0.1:port` sends, if any.
    fn banner(port: u16) -> Option<String> {
        let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        Some(line)
    }

    #[test]
    fn a_forwarded_port_reaches_the_guest_sshd_until_the_vm_stops() {
        let test = "a_forwarded_port_reaches_the_guest_sshd_until_the_vm_stops";
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let spec = format!("127.0.0.1:{port}:22");
        // `vm run -d` returns once the guest's sshd answers.
        let run = rig.env.banger(&[
            "vm",
            "run",
            "-d",
            "--image",
            "noinit",
            "--name",
            "pf",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
            "-p",
            &spec,
        ]);
        let console = rig.env.banger(&["vm", "logs", "pf"]).stdout;
        assert_eq!(run.code, 0, "vm run failed: {run:?}\nconsole:\n{console}");
        let vm = rig.env.show("pf");
        assert_eq!(vm.record.state, VmState::Running);

        // sshd may come up a moment after the agent: the forward is there
        // from the start, the banner once sshd listens.
        let mut got = None;
        wait_until(
            Duration::from_secs(120),
            "sshd's banner through the forward",
            || {
                got = banner(port);
                got.as_deref().is_some_and(|l| l.starts_with("SSH-2.0-"))
            },
        );
        let listed = rig.env.banger(&["vm", "ports", "pf"]).ok().stdout;
        assert!(
            listed
                .lines()
                .any(|l| l.contains("pf.vm:22") && l.contains(&format!("127.0.0.1:{port}"))),
            "{listed}"
        );

        rig.env.banger(&["vm", "stop", "pf"]).ok();
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "the forward still listens after stop"
        );
        rig.delete_all_and_check_clean(&[vm]);
    }
}
