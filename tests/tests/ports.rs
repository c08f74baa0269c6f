//! Port forwarding through the real `banger` and `bangerd` against the fake
//! firecracker. The "guest" is a network namespace holding the VM's leased
//! address on a veth, with TCP and UDP servers in it, so the daemon's proxy
//! really connects to the VM's address (needs root and iproute2; the tests
//! that need no guest run anywhere).

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::process::Command;
    use std::sync::Arc;
    use std::time::Duration;

    use banger_api::api::{PortForward, Proto};
    use banger_api::model::VmState;
    use banger_api::net::Subnet;
    use banger_capabilities::network::leases::Leases;
    use banger_core::store::Store;
    use test_infra::{BangerEnv, pid_alive, wait_until};

    /// Gives VM `name` an address in `subnet`, as the network capability
    /// would (these tests run without a bridge).
    fn lease(env: &BangerEnv, name: &str, subnet: &str) -> Ipv4Addr {
        let store = Arc::new(Store::open(&env.state_dir().join("banger.db")).unwrap());
        let id = store.find_vm(name).unwrap().unwrap().id;
        let subnet: Subnet = subnet.parse().unwrap();
        Leases::new(store).acquire(&id, &subnet).unwrap().ip
    }

    /// A host port nothing listens on now (TCP and UDP).
    fn free_port() -> u16 {
        loop {
            let t = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = t.local_addr().unwrap().port();
            if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }

    /// Whether something holds `port/proto` on 127.0.0.1 (our bind fails).
    fn held(port: u16, proto: Proto) -> bool {
        match proto {
            Proto::Tcp => TcpListener::bind(("127.0.0.1", port)).is_err(),
            Proto::Udp => UdpSocket::bind(("127.0.0.1", port)).is_err(),
        }
    }

    /// Sends `line` through the TCP forward on `port`; the guest's answer.
    fn tcp_round_trip(port: u16, line: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        Ok(answer.trim_end().to_string())
    }

    /// Sends `msg` through the UDP forward on `port`; the guest's answer.
    fn udp_round_trip(port: u16, msg: &str) -> String {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
        let mut buf = [0u8; 1500];
        let (n, _) = s.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The VM's side of the network: a namespace with `addr` on a veth
    /// whose host end has the subnet's first address. Removed on drop.
    struct Guest {
        ns: String,
        host_if: String,
    }

    impl Guest {
        /// None (and a SKIP line) when this host cannot make one.
        fn new(test: &str, addr: Ipv4Addr) -> Option<Guest> {
            if !nix::unistd::Uid::effective().is_root() {
                eprintln!("SKIP {test}: needs root for a network namespace");
                return None;
            }
            if Command::new("ip").arg("-V").output().is_err() {
                eprintln!("SKIP {test}: ip missing (apt-get install iproute2)");
                return None;
            }
            let tag = std::process::id() % 100_000;
            let g = Guest {
                ns: format!("bgports{tag}"),
                host_if: format!("bgph{tag}"),
            };
            let guest_if = format!("bgpg{tag}");
            let [a, b, c, _] = addr.octets();
            ip(&["netns", "add", &g.ns]);
            ip(&[
                "link", "add", &g.host_if, "type", "veth", "peer", "name", &guest_if,
            ]);
            ip(&["link", "set", &guest_if, "netns", &g.ns]);
            ip(&[
                "addr",
                "add",
                &format!("{a}.{b}.{c}.1/24"),
                "dev",
                &g.host_if,
            ]);
            ip(&["link", "set", &g.host_if, "up"]);
            ip(&[
                "-n",
                &g.ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &guest_if,
            ]);
            ip(&["-n", &g.ns, "link", "set", &guest_if, "up"]);
            ip(&["-n", &g.ns, "link", "set", "lo", "up"]);
            Some(g)
        }

        /// Binds TCP and UDP sockets at `addr` inside the namespace (a
        /// socket keeps the namespace it was made in).
        fn bind(&self, tcp: SocketAddr, udp: SocketAddr) -> (TcpListener, UdpSocket) {
            let path = format!("/run/netns/{}", self.ns);
            std::thread::spawn(move || {
                let ns = std::fs::File::open(&path).unwrap();
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                (
                    TcpListener::bind(tcp).unwrap(),
                    UdpSocket::bind(udp).unwrap(),
                )
            })
            .join()
            .unwrap()
        }
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if])
                .status();
        }
    }

    /// Answers each TCP line and each UDP datagram with `guest got: ...`
    /// and the sender's address as the guest sees it.
    fn serve(tcp: TcpListener, udp: UdpSocket) {
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let peer = conn.peer_addr().unwrap();
                    let mut line = String::new();
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    while r.read_line(&mut line).unwrap_or(0) > 0 {
                        let reply = format!("guest got: {} from {}\n", line.trim_end(), peer.ip());
                        if conn.write_all(reply.as_bytes()).is_err() {
                            return;
                        }
                        line.clear();
                    }
                });
            }
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let reply = format!("guest got: {}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from);
            }
        });
    }

    fn stop_daemon(env: &BangerEnv) {
        let daemon = env.daemon_pid().expect("daemon pid file");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(daemon),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        wait_until(Duration::from_secs(10), "bangerd dies", || {
            !pid_alive(daemon)
        });
    }

    #[test]
    fn forwards_carry_tcp_and_udp_both_ways_while_the_vm_runs() {
        let test = "forwards_carry_tcp_and_udp_both_ways_while_the_vm_runs";
        let (tcp, udp, extra) = (free_port(), free_port(), free_port());
        let env = BangerEnv::new();
        env.create(
            "web",
            &[
                "--no-start",
                "-p",
                &format!("{tcp}:7000"),
                "-p",
                &format!("127.0.0.1:{udp}:7001/udp"),
            ],
        )
        .ok();
        // A subnet of its own per test process, on the host's routes only
        // while the test runs.
        let subnet = format!("10.231.{}.0/24", 20 + std::process::id() % 200);
        let addr = lease(&env, "web", &subnet);
        let Some(guest) = Guest::new(test, addr) else {
            return;
        };
        let (l, u) = guest.bind((addr, 7000).into(), (addr, 7001).into());
        serve(l, u);

        // Forwards are stored with the VM and listed before it starts.
        let shown = env.banger(&["vm", "show", "web"]).ok().stdout;
        assert!(
            shown.contains(&format!(
                "forwards:    127.0.0.1:{tcp} -> web.vm:7000 (tcp) (when running)"
            )),
            "{shown}"
        );
        assert!(!held(tcp, Proto::Tcp), "nothing listens before start");

        env.banger(&["vm", "start", "web"]).ok();
        // Both ways: the guest's answer names the line and that it came
        // from the host's side of the veth (the daemon's proxy).
        let host_side = format!("{}", Ipv4Addr::from(u32::from(addr) & !0xff | 1));
        assert_eq!(
            tcp_round_trip(tcp, "ping").unwrap(),
            format!("guest got: ping from {host_side}")
        );
        assert_eq!(udp_round_trip(udp, "hello"), "guest got: hello");

        // vm ports: the forwards (the fake guest has no agent to list its
        // listeners; that is said on stderr).
        let ports = env.banger(&["vm", "ports", "web", "--json"]).ok();
        let json: serde_json::Value = serde_json::from_str(&ports.stdout).unwrap();
        let forwards: Vec<PortForward> = serde_json::from_value(json["forwards"].clone()).unwrap();
        let want: Vec<PortForward> = vec![
            format!("127.0.0.1:{tcp}:7000/tcp").parse().unwrap(),
            format!("127.0.0.1:{udp}:7001/udp").parse().unwrap(),
        ];
        assert_eq!(forwards, want);
        assert!(ports.stderr.contains("guest listeners"), "{ports:?}");
        let table = env.banger(&["vm", "ports", "web"]).ok().stdout;
        assert!(
            table.lines().any(|l| l.starts_with("udp")
                && l.contains("web.vm:7001")
                && l.contains(&format!("127.0.0.1:{udp}"))),
            "{table}"
        );
        let json = env.show("web");
        let ports_cap = json.record.caps.iter().find(|c| c.name == "ports").unwrap();
        assert_eq!(
            ports_cap.options["forward"],
            format!("127.0.0.1:{tcp}:7000/tcp,127.0.0.1:{udp}:7001/udp")
        );

        // Live add and remove; a connection through another forward lives on.
        let mut kept = TcpStream::connect(("127.0.0.1", tcp)).unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut kept_r = BufReader::new(kept.try_clone().unwrap());
        let spec = format!("{extra}:7000");
        let added = env.banger(&["vm", "port", "add", "web", &spec]).ok();
        assert!(
            added
                .stdout
                .contains(&format!("127.0.0.1:{extra} -> web.vm:7000 (tcp)")),
            "{added:?}"
        );
        assert!(
            tcp_round_trip(extra, "two")
                .unwrap()
                .starts_with("guest got: two")
        );
        let again = env.banger(&["vm", "port", "add", "web", &spec]).failed();
        assert!(
            again.stderr.contains("both listen on host port")
                && again.stderr.contains(&extra.to_string()),
            "{again:?}"
        );
        env.banger(&["vm", "port", "rm", "web", &spec]).ok();
        assert!(!held(extra, Proto::Tcp), "removed forward still listens");
        let gone = env.banger(&["vm", "port", "rm", "web", &spec]).failed();
        assert!(gone.stderr.contains("has no port forward"), "{gone:?}");
        assert!(held(tcp, Proto::Tcp), "the others stay");
        kept.write_all(b"still\n").unwrap();
        let mut line = String::new();
        kept_r.read_line(&mut line).unwrap();
        assert!(line.starts_with("guest got: still"), "{line:?}");
        drop((kept, kept_r));

        // Stop closes them; start opens them again.
        env.banger(&["vm", "stop", "web"]).ok();
        assert!(!held(tcp, Proto::Tcp) && !held(udp, Proto::Udp));
        assert!(tcp_round_trip(tcp, "x").is_err());
        env.banger(&["vm", "start", "web"]).ok();
        assert!(
            tcp_round_trip(tcp, "back")
                .unwrap()
                .starts_with("guest got: back")
        );

        // A new daemon (the VM outlived the old one) reopens them.
        stop_daemon(&env);
        assert!(!held(tcp, Proto::Tcp), "the dead daemon's listener is gone");
        assert_eq!(env.show("web").record.state, VmState::Running);
        assert!(
            tcp_round_trip(tcp, "reborn")
                .unwrap()
                .starts_with("guest got: reborn")
        );
        assert_eq!(udp_round_trip(udp, "again"), "guest got: again");

        // Delete closes them.
        env.banger(&["vm", "delete", "web"]).ok();
        assert!(!held(tcp, Proto::Tcp) && !held(udp, Proto::Udp));
        drop(guest);
    }

    #[test]
    fn a_taken_host_port_refuses_the_start_and_leaves_nothing_listening() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().port();
        let free = free_port();
        let env = BangerEnv::new();
        env.create(
            "busy",
            &[
                "--no-start",
                "-p",
                &format!("{free}:80"),
                "-p",
                &format!("{busy}:81"),
            ],
        )
        .ok();
        lease(&env, "busy", "10.214.0.0/24");
        let r = env.banger(&["vm", "start", "busy"]).failed();
        assert!(
            r.stderr
                .contains(&format!("Host port 127.0.0.1:{busy}/tcp is already in use")),
            "{r:?}"
        );
        assert!(!held(free, Proto::Tcp), "the free port was left listening");
        assert_eq!(env.show("busy").record.state, VmState::Error);

        // Freed, the same VM starts; a live add of a taken port is refused
        // with the record unchanged.
        drop(taken);
        env.banger(&["vm", "start", "busy"]).ok();
        assert!(held(free, Proto::Tcp) && held(busy, Proto::Tcp));
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let other_port = other.local_addr().unwrap().port();
        let r = env
            .banger(&["vm", "port", "add", "busy", &format!("{other_port}:82")])
            .failed();
        assert!(
            r.stderr.contains(&format!(
                "Host port 127.0.0.1:{other_port}/tcp is already in use"
            )),
            "{r:?}"
        );
        let forward = env
            .show("busy")
            .record
            .caps
            .iter()
            .find(|c| c.name == "ports")
            .unwrap()
            .options["forward"]
            .clone();
        assert!(!forward.contains(&other_port.to_string()), "{forward}");
        assert!(
            held(free, Proto::Tcp) && held(busy, Proto::Tcp),
            "a refused add closed the forwards that were open"
        );

        // A second VM cannot take a port the first forwards.
        env.create("second", &["--no-start", "-p", &format!("{free}:80")])
            .ok();
        lease(&env, "second", "10.214.0.0/24");
        let r = env.banger(&["vm", "start", "second"]).failed();
        assert!(
            r.stderr
                .contains(&format!("Host port 127.0.0.1:{free}/tcp is already in use")),
            "{r:?}"
        );
        assert!(held(free, Proto::Tcp), "the first VM's forward stays");
    }

    #[test]
    fn bad_forward_specs_are_refused_before_anything_is_created() {
        let env = BangerEnv::new();
        let r = env
            .create("dup", &["-p", "8080:80", "-p", "127.0.0.1:8080:81"])
            .failed();
        assert!(
            r.stderr.contains("both listen on host port 8080/tcp"),
            "{r:?}"
        );
        let r = env.create("bad", &["-p", "8080"]).failed();
        assert!(
            r.stderr.contains("Invalid port forward \"8080\"")
                && r.stderr.contains("[HOST_IP:]HOST_PORT:GUEST_PORT[/udp]"),
            "{r:?}"
        );
        let r = env
            .create("opt", &["--cap", "ports:forward=1:2,3:4/sctp"])
            .failed();
        assert!(r.stderr.contains("unknown protocol \"sctp\""), "{r:?}");
        assert!(env.list().is_empty(), "a refused create left a VM");
        // A VM without an address has nothing to forward to.
        env.create("noaddr", &["-p", &format!("{}:80", free_port())])
            .failed();
        let vm = env.show("noaddr");
        let err = vm.record.last_error.unwrap().cause;
        assert!(err.contains("needs the network capability"), "{err}");
    }
}
