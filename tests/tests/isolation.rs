//! Guest network isolation against the real kernel: anti-spoofing,
//! guest-to-guest, guest-to-host, NAT destinations, `ip_forward`, the tap
//! pool under concurrency and two daemons side by side. Each test runs in
//! its own network namespace (the "host"); guests and the outside world are
//! further namespaces joined by veth pairs, so the host's own network is
//! never touched. A guest is a namespace whose `eth0` is a veth whose host
//! end is a port of the bridge, named like a tap: the rules match the port,
//! not how the VMM made it. Needs root, `ip` (iproute2) and `nft`
//! (nftables).

#[cfg(test)]
mod support;

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::sync::Arc;
    use std::time::Duration;

    use banger_api::config::NetworkConfig;
    use banger_api::guest::GuestConfig;
    use banger_api::net::MacAddr;
    use banger_capabilities::dns::Dns;
    use banger_capabilities::nat::Nat;
    use banger_capabilities::network::{HostNetwork, Network};
    use banger_core::capability::{Capability, HookCtx, TeardownReason};
    use banger_core::store::Store;
    use banger_host::hostops::{
        BoundDevice, Cidr, GuestPort, HostOps, HostOpsError, InProcessHostOps, PciAddress,
    };

    /// How long a connection that should work may take; one that must not
    /// work is given [`REFUSED`] to show it does not.
    const WORKS: Duration = Duration::from_secs(5);
    const REFUSED: Duration = Duration::from_millis(700);

    fn skip(test: &str, needs: &[&str]) -> bool {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIP {test}: needs root for network namespaces");
            return true;
        }
        for tool in needs {
            if std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_err()
            {
                eprintln!("SKIP {test}: {tool} missing (apt-get install iproute2 nftables)");
                return true;
            }
        }
        false
    }

    /// Runs `body` on a thread with a fresh network namespace: the "host".
    fn in_host_ns(test: &str, body: impl FnOnce() + Send + 'static) {
        if skip(test, &["ip", "nft"]) {
            return;
        }
        let handle = std::thread::spawn(move || {
            // SAFETY: unshare only changes this thread's namespaces; the
            // thread is ours and ends with the test body.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
            sh(&["link", "set", "lo", "up"]);
            body();
        });
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// `ip ARGS` in the calling thread's namespace; must succeed.
    fn sh(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn nft(args: &[&str]) -> String {
        let out = std::process::Command::new("nft")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn link_exists(name: &str) -> bool {
        std::process::Command::new("ip")
            .args(["link", "show", name])
            .output()
            .unwrap()
            .status
            .success()
    }

    fn links_with_prefix(prefix: &str) -> Vec<String> {
        let out = std::process::Command::new("ip")
            .args(["-j", "link", "show"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(String::from)
            .collect()
    }

    fn mac_of(link: &str) -> String {
        let out = std::process::Command::new("ip")
            .args(["-j", "link", "show", link])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["address"].as_str().unwrap().to_string()
    }

    fn ifindex(link: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["-j", "link", "show", link])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["ifindex"].as_u64().unwrap()
    }

    /// Comments of every rule in the `banger_*` tables.
    fn rule_tags() -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&nft(&["-j", "list", "ruleset"])).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("rule"))
            .filter(|r| r["table"].as_str().unwrap_or("").starts_with("banger_"))
            .map(|r| r["comment"].as_str().unwrap_or("").to_string())
            .collect()
    }

    fn ip_forward() -> String {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim()
            .to_string()
    }

    /// A named network namespace, deleted on drop.
    struct Ns(String);

    impl Ns {
        fn new(tag: &str) -> Ns {
            // Tests run in parallel in one process: a counter keeps names apart.
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let name = format!("bgiso-{}-{n}-{tag}", std::process::id());
            sh(&["netns", "add", &name]);
            let ns = Ns(name);
            ns.ip(&["link", "set", "lo", "up"]);
            ns
        }

        fn ip(&self, args: &[&str]) {
            let mut all = vec!["-n", self.0.as_str()];
            all.extend_from_slice(args);
            sh(&all);
        }

        /// Runs `f` on a thread inside this namespace.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/run/netns/{}", self.0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&path).unwrap();
                    // SAFETY: setns only moves this scoped thread, which
                    // ends with `f`, into the namespace.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
            })
        }

        /// Starts a TCP server at `addr` in this namespace answering every
        /// connection with `greeting`; runs until the namespace goes.
        fn serve_tcp(&self, addr: SocketAddr, greeting: &'static str) {
            let listener = self.run(|| TcpListener::bind(addr).unwrap());
            std::thread::spawn(move || {
                for mut c in listener.incoming().flatten() {
                    let _ = c.write_all(greeting.as_bytes());
                }
            });
        }
    }

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }

    /// Waits until bridge port `tap` forwards. A new port is `disabled`
    /// until the kernel's link watcher sees its carrier (up to a second,
    /// longer on a loaded machine); a frame sent before then is dropped by
    /// the bridge, not by banger's rules, and a test would blame the rules.
    fn wait_forwarding(tap: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = std::process::Command::new("bridge")
                .args(["-j", "link", "show", "dev", tap])
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if v[0]["state"].as_str() == Some("forwarding") {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bridge port {tap} never reached forwarding: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A guest: a namespace whose eth0 is the peer of port `tap` on `bridge`.
    struct Guest {
        ns: Ns,
        ip: Ipv4Addr,
        mac: MacAddr,
        tap: String,
    }

    fn guest(tag: &str, tap: &str, bridge: &str, ip: Ipv4Addr, gw: Ipv4Addr) -> Guest {
        let ns = Ns::new(tag);
        let mac = MacAddr::for_ip(ip);
        sh(&[
            "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
        ]);
        sh(&["link", "set", tap, "master", bridge, "up"]);
        ns.ip(&["link", "set", "eth0", "address", &mac.to_string(), "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        ns.ip(&["route", "add", "default", "via", &gw.to_string()]);
        wait_forwarding(tap);
        Guest {
            ns,
            ip,
            mac,
            tap: tap.to_string(),
        }
    }

    impl Guest {
        fn port(&self, bridge: &str, peers: bool) -> GuestPort {
            GuestPort {
                bridge: bridge.to_string(),
                tap: self.tap.clone(),
                ip: self.ip,
                mac: self.mac,
                peers,
            }
        }

        /// Sends one UDP datagram from `from` to `to`.
        fn send(&self, from: Ipv4Addr, to: SocketAddr, payload: &str) {
            self.ns.run(|| {
                let s = UdpSocket::bind((from, 0)).unwrap();
                s.send_to(payload.as_bytes(), to).unwrap();
            });
        }

        /// Connects to `to` and reads what it says, within `wait`.
        fn fetch(&self, to: SocketAddr, wait: Duration) -> std::io::Result<String> {
            self.ns.run(|| {
                let mut c = TcpStream::connect_timeout(&to, wait)?;
                c.set_read_timeout(Some(WORKS))?;
                let mut out = String::new();
                c.read_to_string(&mut out)?;
                Ok(out)
            })
        }

        /// A static neighbour entry, so frames leave without ARP.
        fn neighbour(&self, ip: Ipv4Addr, mac: &str) {
            self.ns.ip(&[
                "neigh",
                "replace",
                &ip.to_string(),
                "lladdr",
                mac,
                "dev",
                "eth0",
            ]);
        }
    }

    fn udp_listener(addr: SocketAddr) -> UdpSocket {
        let s = UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(WORKS)).unwrap();
        s
    }

    /// The next datagram's payload.
    fn recv(s: &UdpSocket) -> String {
        let mut buf = [0u8; 256];
        let (n, _) = s.recv_from(&mut buf).expect("a datagram within 5s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Whether a datagram is waiting (without waiting for one).
    fn pending(s: &UdpSocket) -> bool {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        let got = s.recv_from(&mut buf).is_ok();
        s.set_nonblocking(false).unwrap();
        got
    }

    const BRIDGE: &str = "bgiso0";

    fn bridge(ops: &InProcessHostOps, subnet: &str) -> Ipv4Addr {
        let gw: Ipv4Addr = subnet.replace(".0/24", ".1").parse().unwrap();
        ops.ensure_bridge(BRIDGE, gw, 24).unwrap();
        gw
    }

    #[test]
    fn a_guest_sends_only_from_its_own_address_and_reaches_the_host_only_for_dns() {
        in_host_ns(
            "a_guest_sends_only_from_its_own_address_and_reaches_the_host_only_for_dns",
            || {
                let ops = InProcessHostOps::default();
                let gw = bridge(&ops, "10.61.0.0/24");
                let a = guest("a", "bgisot0", BRIDGE, Ipv4Addr::new(10, 61, 0, 2), gw);
                ops.add_guest("vma", &a.port(BRIDGE, false)).unwrap();
                // Again: replaces, does not duplicate.
                ops.add_guest("vma", &a.port(BRIDGE, false)).unwrap();
                let tags = rule_tags();
                assert_eq!(
                    tags.iter().filter(|t| *t == "banger:vma:guard").count(),
                    5,
                    "{tags:?}"
                );

                let dns = udp_listener(SocketAddr::from((gw, 53)));
                a.send(a.ip, SocketAddr::from((gw, 53)), "legit");
                assert_eq!(recv(&dns), "legit");

                // Another source IP on the same port: dropped. The legit
                // datagram sent after it is the next to arrive.
                let spoofed = Ipv4Addr::new(10, 61, 0, 50);
                a.ns.ip(&["addr", "add", &format!("{spoofed}/24"), "dev", "eth0"]);
                a.send(spoofed, SocketAddr::from((gw, 53)), "spoofed-ip");
                a.send(a.ip, SocketAddr::from((gw, 53)), "after-ip");
                assert_eq!(recv(&dns), "after-ip");

                // Another source MAC with its own IP: dropped too.
                let bridge_mac = mac_of(BRIDGE);
                a.ns.ip(&["link", "set", "eth0", "address", "06:00:de:ad:be:ef"]);
                a.neighbour(gw, &bridge_mac);
                a.send(a.ip, SocketAddr::from((gw, 53)), "spoofed-mac");
                a.ns.ip(&["link", "set", "eth0", "address", &a.mac.to_string()]);
                a.neighbour(gw, &bridge_mac);
                a.send(a.ip, SocketAddr::from((gw, 53)), "after-mac");
                assert_eq!(recv(&dns), "after-mac");

                // A host service on the bridge address: out of reach, over
                // TCP and UDP; DNS over TCP works.
                let service = TcpListener::bind((gw, 8080)).unwrap();
                service.set_nonblocking(true).unwrap();
                let err = a.fetch(SocketAddr::from((gw, 8080)), REFUSED).unwrap_err();
                assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
                assert!(service.accept().is_err(), "the service saw a connection");
                let other = udp_listener(SocketAddr::from((gw, 5000)));
                a.send(a.ip, SocketAddr::from((gw, 5000)), "to-a-service");
                a.send(a.ip, SocketAddr::from((gw, 53)), "marker");
                assert_eq!(recv(&dns), "marker");
                assert!(
                    !pending(&other),
                    "a host UDP service got the guest's datagram"
                );
                let dns_tcp = TcpListener::bind((gw, 53)).unwrap();
                std::thread::spawn(move || {
                    for mut c in dns_tcp.incoming().flatten() {
                        let _ = c.write_all(b"dns-over-tcp");
                    }
                });
                assert_eq!(
                    a.fetch(SocketAddr::from((gw, 53)), WORKS).unwrap(),
                    "dns-over-tcp"
                );

                // The host reaching the guest (ssh's direction) works: its
                // replies pass as an established connection.
                a.ns.serve_tcp(SocketAddr::from((a.ip, 22)), "SSH-2.0-guest");
                let mut c =
                    TcpStream::connect_timeout(&SocketAddr::from((a.ip, 22)), WORKS).unwrap();
                let mut banner = String::new();
                c.read_to_string(&mut banner).unwrap();
                assert_eq!(banner, "SSH-2.0-guest");

                // Removing the guard leaves the tap with no way out at all
                // but takes exactly the VM's rules.
                ops.remove_guest("vma").unwrap();
                ops.remove_guest("vma").unwrap();
                let tags = rule_tags();
                assert!(!tags.iter().any(|t| t.contains("vma")), "{tags:?}");
                assert!(tags.iter().all(|t| t == "banger:base:v3"), "{tags:?}");
            },
        );
    }

    /// One process guarding VMs of the same name on bridges of the same
    /// name in two network namespaces (as these tests do, each in its own
    /// "host"): what it remembers about one namespace's rules must not make
    /// it skip replacing the other's. Here the other namespace drops `vma`,
    /// then `vma` is guarded again with peers in the first: its earlier
    /// rules must be replaced, not left in front of the new ones (where the
    /// old drop would still stop its peer traffic).
    #[test]
    fn guards_in_two_namespaces_of_one_process_are_kept_apart() {
        in_host_ns(
            "guards_in_two_namespaces_of_one_process_are_kept_apart",
            || {
                let ops = InProcessHostOps::default();
                let ip = Ipv4Addr::new(10, 64, 0, 2);
                let port = |peers| GuestPort {
                    bridge: BRIDGE.to_string(),
                    tap: "bgisot0".to_string(),
                    ip,
                    mac: MacAddr::for_ip(ip),
                    peers,
                };
                let guards = || {
                    rule_tags()
                        .iter()
                        .filter(|t| *t == "banger:vma:guard")
                        .count()
                };
                bridge(&ops, "10.64.0.0/24");
                ops.add_guest("vma", &port(false)).unwrap();
                assert_eq!(guards(), 5);
                let other = Ns::new("other");
                other.run(|| {
                    bridge(&ops, "10.64.0.0/24");
                    ops.add_guest("vma", &port(false)).unwrap();
                    ops.remove_guest("vma").unwrap();
                    assert_eq!(guards(), 0);
                });
                ops.add_guest("vma", &port(true)).unwrap();
                let tags = rule_tags();
                assert_eq!(guards(), 7, "{tags:?}");
            },
        );
    }

    #[test]
    fn guests_reach_each_other_only_when_both_opt_in() {
        in_host_ns("guests_reach_each_other_only_when_both_opt_in", || {
            let ops = InProcessHostOps::default();
            let gw = bridge(&ops, "10.62.0.0/24");
            let a = guest("a", "bgisot0", BRIDGE, Ipv4Addr::new(10, 62, 0, 2), gw);
            let b = guest("b", "bgisot1", BRIDGE, Ipv4Addr::new(10, 62, 0, 3), gw);
            // Static neighbours: frames leave whether or not ARP gets through.
            a.neighbour(b.ip, &b.mac.to_string());
            b.neighbour(a.ip, &a.mac.to_string());
            let at_b = b.ns.run(|| udp_listener(SocketAddr::from((b.ip, 7000))));
            let to_b = SocketAddr::from((b.ip, 7000));

            let both = |pa: bool, pb: bool| {
                ops.add_guest("vma", &a.port(BRIDGE, pa)).unwrap();
                ops.add_guest("vmb", &b.port(BRIDGE, pb)).unwrap();
            };
            for (pa, pb) in [(false, false), (true, false), (false, true)] {
                both(pa, pb);
                a.send(a.ip, to_b, &format!("blocked {pa} {pb}"));
                both(true, true);
                a.send(a.ip, to_b, "marker");
                assert_eq!(recv(&at_b), "marker", "peers {pa} {pb}");
            }
            // Both in: ARP and TCP work too, either way.
            a.ns.ip(&["neigh", "flush", "dev", "eth0"]);
            b.ns.serve_tcp(SocketAddr::from((b.ip, 80)), "from-b");
            assert_eq!(
                a.fetch(SocketAddr::from((b.ip, 80)), WORKS).unwrap(),
                "from-b"
            );
            // One opts out again: TCP no longer connects.
            both(true, false);
            let err = a.fetch(SocketAddr::from((b.ip, 80)), REFUSED).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
            // And routing through the host does not go around it.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
            sh(&[
                "neigh",
                "replace",
                &b.ip.to_string(),
                "lladdr",
                &b.mac.to_string(),
                "dev",
                BRIDGE,
            ]);
            let gw_mac = mac_of(BRIDGE);
            a.ns.ip(&[
                "route",
                "add",
                &format!("{}/32", b.ip),
                "via",
                &gw.to_string(),
            ]);
            a.neighbour(gw, &gw_mac);
            a.send(a.ip, to_b, "routed");
            both(true, true);
            a.ns.ip(&["route", "del", &format!("{}/32", b.ip)]);
            a.send(a.ip, to_b, "marker2");
            assert_eq!(recv(&at_b), "marker2");
            ops.remove_guest("vma").unwrap();
            ops.remove_guest("vmb").unwrap();
        });
    }

    /// A namespace behind a veth from the host: `host_ip/24` on the host
    /// end (or, with `on_bridge`, the end joins that bridge instead), the
    /// `.2` of the same /24 inside, with a TCP server on port 8080 and no
    /// route back to the guests: only masqueraded traffic gets answers.
    fn outside(
        tag: &str,
        host_ip: &str,
        on_bridge: Option<&str>,
        greeting: &'static str,
    ) -> (Ns, SocketAddr) {
        let ns = Ns::new(tag);
        let host_if = format!("bgiso{tag}");
        sh(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.0,
        ]);
        match on_bridge {
            Some(br) => sh(&["link", "set", &host_if, "master", br, "up"]),
            None => {
                sh(&["addr", "add", &format!("{host_ip}/24"), "dev", &host_if]);
                sh(&["link", "set", &host_if, "up"]);
            }
        }
        let mut octets = host_ip.parse::<Ipv4Addr>().unwrap().octets();
        octets[3] = 2;
        let server = Ipv4Addr::from(octets);
        ns.ip(&["addr", "add", &format!("{server}/24"), "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        let addr = SocketAddr::from((server, 8080));
        ns.serve_tcp(addr, greeting);
        (ns, addr)
    }

    #[test]
    fn nat_reaches_the_internet_but_not_private_ranges_or_other_bridges_unless_allowed() {
        in_host_ns(
            "nat_reaches_the_internet_but_not_private_ranges_or_other_bridges_unless_allowed",
            || {
                let ops = InProcessHostOps::default();
                let gw = bridge(&ops, "10.63.0.0/24");
                let a = guest("a", "bgisot0", BRIDGE, Ipv4Addr::new(10, 63, 0, 2), gw);
                ops.add_guest("vma", &a.port(BRIDGE, false)).unwrap();
                let (_inet, internet) = outside("i", "198.51.100.1", None, "internet");
                let (_lan, lan) = outside("l", "192.168.77.1", None, "lan");
                // Another bridge on the host (docker0, another daemon's...),
                // on addresses that are otherwise public.
                ops.ensure_bridge("bgisoother", Ipv4Addr::new(203, 0, 113, 1), 24)
                    .unwrap();
                let (_br, behind_bridge) =
                    outside("b", "203.0.113.1", Some("bgisoother"), "other-bridge");
                // A new namespace inherits the host's setting: start from off.
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();

                // Without NAT: nothing outside.
                assert!(a.fetch(internet, REFUSED).is_err());

                ops.add_nat("vma", BRIDGE, a.ip).unwrap();
                assert_eq!(ip_forward(), "1");
                assert_eq!(a.fetch(internet, WORKS).unwrap(), "internet");
                for refused in [lan, behind_bridge] {
                    let err = a.fetch(refused, REFUSED).unwrap_err();
                    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{refused}: {err}");
                }
                // The metadata address is refused too (nothing there to
                // answer, so the check is the rule itself).
                let rules = nft(&["list", "set", "ip", "banger_bgiso0", "deny"]);
                assert!(rules.contains("169.254.0.0/16"), "{rules}");

                let allow: Vec<Cidr> = vec![
                    "192.168.77.0/24".parse().unwrap(),
                    "203.0.113.2/32".parse().unwrap(),
                ];
                ops.add_nat_allowing("vma", BRIDGE, a.ip, &allow).unwrap();
                assert_eq!(a.fetch(lan, WORKS).unwrap(), "lan");
                assert_eq!(a.fetch(behind_bridge, WORKS).unwrap(), "other-bridge");
                assert_eq!(a.fetch(internet, WORKS).unwrap(), "internet");
                // Replaced, not added to: 3 rules (allow, default, masquerade).
                let tags = rule_tags();
                assert_eq!(
                    tags.iter().filter(|t| *t == "banger:vma:nat").count(),
                    3,
                    "{tags:?}"
                );

                // Forwarding goes back off with the last NAT'ed VM only.
                ops.add_nat("vmb", BRIDGE, Ipv4Addr::new(10, 63, 0, 3))
                    .unwrap();
                ops.remove_nat("vma").unwrap();
                assert_eq!(ip_forward(), "1", "vmb still needs it");
                assert!(a.fetch(internet, REFUSED).is_err());
                ops.remove_nat("vmb").unwrap();
                assert_eq!(ip_forward(), "0");
                assert!(!nft(&["list", "tables"]).contains("banger_ipforward"));
                ops.remove_nat("vmb").unwrap();

                // Forwarding that was on before banger stays on.
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
                ops.add_nat("vma", BRIDGE, a.ip).unwrap();
                ops.remove_nat("vma").unwrap();
                assert_eq!(ip_forward(), "1");
                ops.remove_guest("vma").unwrap();
                assert!(rule_tags().iter().all(|t| t == "banger:base:v3"));
            },
        );
    }

    use crate::support::{Quiet, vm};

    /// One daemon's networking in `dir` (its state dir), as the built-ins
    /// see it.
    struct Daemon {
        dir: tempfile::TempDir,
        net: Arc<HostNetwork>,
    }

    fn daemon(config: NetworkConfig) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
        let net = Arc::new(HostNetwork::new(config, store, dir.path(), 0));
        Daemon { dir, net }
    }

    impl Daemon {
        /// Runs `f` with a hook context for `vm` (its directory under ours).
        fn hook<R>(
            &self,
            vm: &banger_api::model::VmRecord,
            options: &[(&str, &str)],
            host: &dyn HostOps,
            f: impl FnOnce(&HookCtx<'_>) -> R,
        ) -> R {
            let vm_dir = self.dir.path().join("vms").join(vm.id.as_str());
            std::fs::create_dir_all(&vm_dir).unwrap();
            let options: banger_api::model::CapOptions = options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let config =
                banger_api::config::Config::defaults(std::path::Path::new("/nonexistent/c.toml"));
            f(&HookCtx {
                vm,
                vm_dir: &vm_dir,
                options: &options,
                host,
                config: &config,
                log: &Quiet,
            })
        }

        fn tap_of(&self, vm: &banger_api::model::VmRecord) -> String {
            let dir = self.dir.path().join("vms").join(vm.id.as_str());
            banger_capabilities::network::NicState::load(&dir)
                .unwrap()
                .unwrap()
                .tap
        }
    }

    #[test]
    fn thirty_two_vms_starting_at_once_get_distinct_taps_and_leases_and_leave_nothing() {
        in_host_ns(
            "thirty_two_vms_starting_at_once_get_distinct_taps_and_leases_and_leave_nothing",
            || {
                let d = daemon(NetworkConfig {
                    bridge: "bgiso0".into(),
                    subnet: "10.64.0.0/24".parse().unwrap(),
                    ..NetworkConfig::default()
                });
                let host = InProcessHostOps::default();
                // As in the daemon: the pool is topped up by a thread of its own.
                d.net
                    .taps()
                    .refill_in_background(Arc::new(InProcessHostOps::default()));
                let network = Network::with(d.net.clone());
                let vms: Vec<_> = (0..32).map(|i| vm(&format!("v{i}"))).collect();
                std::thread::scope(|s| {
                    for v in &vms {
                        let (d, host, network) = (&d, &host, &network);
                        s.spawn(move || {
                            d.hook(v, &[], host, |c| network.prepare_host(c)).unwrap();
                            network.settle(&v.id).unwrap();
                        });
                    }
                });
                let taps: std::collections::BTreeSet<String> =
                    vms.iter().map(|v| d.tap_of(v)).collect();
                assert_eq!(taps.len(), 32, "two VMs share a tap: {taps:?}");
                let leases = d.net.leases().list().unwrap();
                let ips: std::collections::BTreeSet<Ipv4Addr> =
                    leases.iter().map(|l| l.ip).collect();
                assert_eq!((leases.len(), ips.len()), (32, 32), "{leases:?}");
                for t in &taps {
                    assert!(link_exists(t), "{t} missing");
                }
                let guards = rule_tags().iter().filter(|t| t.ends_with(":guard")).count();
                assert_eq!(guards, 32 * 5);

                std::thread::scope(|s| {
                    for v in &vms {
                        let (d, host, network) = (&d, &host, &network);
                        s.spawn(move || {
                            d.hook(v, &[], host, |c| {
                                network.teardown(c, TeardownReason::Delete)
                            })
                            .unwrap()
                        });
                    }
                });
                d.net.taps().drain(&host).unwrap();
                let prefix = d.net.taps().prefix().to_string();
                assert_eq!(links_with_prefix(&prefix), Vec::<String>::new());
                assert!(d.net.leases().list().unwrap().is_empty());
                assert!(rule_tags().iter().all(|t| t == "banger:base:v3"));
            },
        );
    }

    /// Host operations that fail the `fail_every`-th `attach_to_bridge`
    /// (or every call of `fail_op`), otherwise do the real thing.
    #[derive(Debug)]
    struct Faulty {
        real: InProcessHostOps,
        fail_op: Option<&'static str>,
        fail_every: usize,
        attaches: std::sync::atomic::AtomicUsize,
        /// Whether the capabilities may use it from a thread of their own
        /// (the network's guard rules then go on beside the later hooks).
        shareable: bool,
    }

    impl Faulty {
        fn op(fail_op: &'static str) -> Self {
            Faulty {
                real: InProcessHostOps::default(),
                fail_op: Some(fail_op),
                fail_every: 0,
                attaches: Default::default(),
                shareable: false,
            }
        }

        fn check(&self, op: &'static str) -> Result<(), HostOpsError> {
            if self.fail_op == Some(op) {
                return Err(HostOpsError::Failed {
                    op,
                    target: "fault injection".into(),
                    source: std::io::Error::other("injected"),
                });
            }
            Ok(())
        }
    }

    impl HostOps for Faulty {
        fn shared(&self) -> Option<Arc<dyn HostOps>> {
            self.shareable.then(|| {
                Arc::new(Faulty {
                    real: self.real.clone(),
                    fail_op: self.fail_op,
                    fail_every: self.fail_every,
                    attaches: Default::default(),
                    shareable: true,
                }) as Arc<dyn HostOps>
            })
        }
        fn create_tap(&self, name: &str, uid: u32) -> Result<(), HostOpsError> {
            self.check("create_tap")?;
            self.real.create_tap(name, uid)
        }
        fn delete_tap(&self, name: &str) -> Result<(), HostOpsError> {
            self.real.delete_tap(name)
        }
        fn ensure_bridge(&self, n: &str, a: Ipv4Addr, p: u8) -> Result<(), HostOpsError> {
            self.check("ensure_bridge")?;
            self.real.ensure_bridge(n, a, p)
        }
        fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), HostOpsError> {
            self.check("attach_to_bridge")?;
            let n = self
                .attaches
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.fail_every > 0 && n % self.fail_every == self.fail_every - 1 {
                return Err(HostOpsError::Failed {
                    op: "attach_to_bridge",
                    target: link.into(),
                    source: std::io::Error::other("injected"),
                });
            }
            self.real.attach_to_bridge(link, bridge)
        }
        fn set_link_up(&self, link: &str) -> Result<(), HostOpsError> {
            self.check("set_link_up")?;
            self.real.set_link_up(link)
        }
        fn delete_link(&self, link: &str) -> Result<(), HostOpsError> {
            self.real.delete_link(link)
        }
        fn add_nat_allowing(
            &self,
            vm_id: &str,
            bridge: &str,
            ip: Ipv4Addr,
            allow: &[Cidr],
        ) -> Result<(), HostOpsError> {
            self.check("add_nat")?;
            self.real.add_nat_allowing(vm_id, bridge, ip, allow)
        }
        fn remove_nat(&self, vm_id: &str) -> Result<(), HostOpsError> {
            self.real.remove_nat(vm_id)
        }
        fn add_guest(&self, vm_id: &str, port: &GuestPort) -> Result<(), HostOpsError> {
            self.check("add_guest")?;
            self.real.add_guest(vm_id, port)
        }
        fn remove_guest(&self, vm_id: &str) -> Result<(), HostOpsError> {
            self.real.remove_guest(vm_id)
        }
        fn route_dns_domain(&self, l: &str, s: Ipv4Addr, d: &str) -> Result<bool, HostOpsError> {
            self.check("route_dns_domain")?;
            self.real.route_dns_domain(l, s, d)
        }
        fn unroute_dns(&self, link: &str) -> Result<(), HostOpsError> {
            self.real.unroute_dns(link)
        }
        fn bind_vfio(&self, a: &PciAddress) -> Result<Vec<BoundDevice>, HostOpsError> {
            self.real.bind_vfio(a)
        }
        fn rebind_driver(&self, a: &PciAddress, d: Option<&str>) -> Result<(), HostOpsError> {
            self.real.rebind_driver(a, d)
        }
    }

    #[test]
    fn a_failed_tap_never_takes_a_winners_tap_with_it() {
        in_host_ns("a_failed_tap_never_takes_a_winners_tap_with_it", || {
            let d = daemon(NetworkConfig {
                bridge: "bgiso0".into(),
                subnet: "10.65.0.0/24".parse().unwrap(),
                ..NetworkConfig::default()
            });
            let host = Faulty {
                fail_every: 3,
                ..Faulty::op("none")
            };
            let network = Network::with(d.net.clone());
            let vms: Vec<_> = (0..32).map(|i| vm(&format!("v{i}"))).collect();
            let results: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = vms
                    .iter()
                    .map(|v| {
                        let (d, host, network) = (&d, &host, &network);
                        s.spawn(move || d.hook(v, &[], host, |c| network.prepare_host(c)).is_ok())
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let started: Vec<_> = vms.iter().zip(&results).filter(|(_, ok)| **ok).collect();
            assert!(!started.is_empty(), "{results:?}");
            assert!(
                host.attaches.load(std::sync::atomic::Ordering::SeqCst) >= 3,
                "no failure was injected"
            );
            let taps: std::collections::BTreeSet<String> =
                started.iter().map(|(v, _)| d.tap_of(v)).collect();
            assert_eq!(taps.len(), started.len(), "two VMs share a tap");
            for t in &taps {
                assert!(link_exists(t), "a failure deleted {t}, a started VM's tap");
            }
            // Nothing of the failed ones is left: every tap of ours is a
            // started VM's or a warm one.
            let prefix = d.net.taps().prefix().to_string();
            let free = d.net.taps().free();
            for l in links_with_prefix(&prefix) {
                assert!(taps.contains(&l) || free.contains(&l), "leaked {l}");
            }
            let guards = rule_tags().iter().filter(|t| t.ends_with(":guard")).count();
            assert_eq!(guards, started.len() * 5);
        });
    }

    #[test]
    fn two_daemons_with_different_state_dirs_work_side_by_side() {
        in_host_ns(
            "two_daemons_with_different_state_dirs_work_side_by_side",
            || {
                let host = InProcessHostOps::default();
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
                // Both with the defaults: every name is derived from the state dir.
                let d1 = daemon(NetworkConfig::default());
                // Derived subnets are 172.30.X.0/24: 1 in 256 pairs of state
                // dirs share X, and the second daemon's bridge is then refused
                // (tested below); here, a pair that does not.
                let d2 = loop {
                    let d = daemon(NetworkConfig::default());
                    if d.net.config().subnet != d1.net.config().subnet {
                        break d;
                    }
                };
                let (n1, n2) = (Network::with(d1.net.clone()), Network::with(d2.net.clone()));
                let (nat1, nat2) = (Nat::with(d1.net.clone()), Nat::with(d2.net.clone()));
                let (c1, c2) = (d1.net.config().clone(), d2.net.config().clone());
                assert_ne!(c1.bridge, c2.bridge);
                assert_ne!(c1.subnet, c2.subnet);
                assert_ne!(d1.net.taps().prefix(), d2.net.taps().prefix());
                let (v1, v2) = (vm("one"), vm("two"));
                for (d, n, nat, v) in [(&d1, &n1, &nat1, &v1), (&d2, &n2, &nat2, &v2)] {
                    d.hook(v, &[], &host, |c| n.prepare_host(c)).unwrap();
                    d.hook(v, &[], &host, |c| nat.prepare_host(c)).unwrap();
                    n.settle(&v.id).unwrap();
                }
                let (t1, t2) = (d1.tap_of(&v1), d2.tap_of(&v2));
                assert_ne!(t1, t2);
                let tables = nft(&["list", "tables"]);
                for b in [&c1.bridge, &c2.bridge] {
                    assert!(tables.contains(&format!("bridge banger_{b}")), "{tables}");
                    assert!(tables.contains(&format!("ip banger_{b}")), "{tables}");
                }
                // Daemon 2 refuses to adopt daemon 1's tap.
                let err = d2.net.taps().adopt(&host, &t1).unwrap_err().to_string();
                assert!(err.contains("not this daemon's"), "{err}");

                // Daemon 1 deletes its VM and shuts down: daemon 2's links,
                // rules and forwarding stay.
                d1.hook(&v1, &[], &host, |c| {
                    nat1.teardown(c, TeardownReason::Delete)
                })
                .unwrap();
                d1.hook(&v1, &[], &host, |c| n1.teardown(c, TeardownReason::Delete))
                    .unwrap();
                d1.net.shut_down(&host);
                d1.net.taps().drain(&host).unwrap();
                assert!(links_with_prefix(d1.net.taps().prefix()).is_empty());
                assert!(link_exists(&t2) && link_exists(&c2.bridge));
                assert!(d2.net.taps().free().iter().all(|t| link_exists(t)));
                let tags = rule_tags();
                assert!(!tags.iter().any(|t| t.contains(v1.id.as_str())), "{tags:?}");
                for kind in ["guard", "nat"] {
                    let tag = format!("banger:{}:{kind}", v2.id);
                    assert!(tags.contains(&tag), "{tag} gone: {tags:?}");
                }
                assert_eq!(ip_forward(), "1", "daemon 2's VM still has NAT");
                // A third daemon configured onto daemon 2's subnet is refused
                // with the setting to change.
                let clash = daemon(NetworkConfig {
                    bridge: "bgisoclash".into(),
                    subnet: c2.subnet,
                    ..NetworkConfig::default()
                });
                let err = banger_core::lifecycle::render_chain(
                    &clash.net.ensure_up(&host, &[]).unwrap_err(),
                );
                assert!(err.contains(&c2.bridge) && err.contains("subnet"), "{err}");
                assert!(!link_exists("bgisoclash"));
                d2.hook(&v2, &[], &host, |c| {
                    nat2.teardown(c, TeardownReason::Delete)
                })
                .unwrap();
                d2.hook(&v2, &[], &host, |c| n2.teardown(c, TeardownReason::Delete))
                    .unwrap();
                d2.net.taps().drain(&host).unwrap();
                assert_eq!(ip_forward(), "0");
            },
        );
    }

    /// Everything of `vm` a daemon could leak: its tap (not a warm one),
    /// its rules, its DNS record.
    fn leaks(d: &Daemon, vm: &banger_api::model::VmRecord, taps_before: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        let free = d.net.taps().free();
        for l in links_with_prefix(d.net.taps().prefix()) {
            if !free.contains(&l) && !taps_before.contains(&l) {
                out.push(format!("tap {l}"));
            }
        }
        for t in rule_tags() {
            if t.contains(vm.id.as_str()) {
                out.push(format!("rule {t}"));
            }
        }
        let records =
            banger_capabilities::dns::server::read_records(d.net.dns_records()).unwrap_or_default();
        if records.contains_key(vm.name.as_str()) {
            out.push(format!("record {}", vm.name));
        }
        out
    }

    #[test]
    fn a_failure_at_any_host_step_of_network_nat_or_dns_leaves_nothing_behind() {
        in_host_ns(
            "a_failure_at_any_host_step_of_network_nat_or_dns_leaves_nothing_behind",
            || {
                let d = daemon(NetworkConfig {
                    bridge: "bgiso0".into(),
                    subnet: "10.66.0.0/24".parse().unwrap(),
                    ..NetworkConfig::default()
                });
                let caps: Vec<Box<dyn Capability>> = vec![
                    Box::new(Network::with(d.net.clone())),
                    Box::new(Dns::with(d.net.clone())),
                    Box::new(Nat::with(d.net.clone())),
                ];
                let mut table = Vec::new();
                let ops = [
                    "ensure_bridge",
                    "create_tap",
                    "attach_to_bridge",
                    "set_link_up",
                    "add_guest",
                    "add_nat",
                ];
                // In the hook that asks for it, and with the guard rules
                // installed beside the later hooks (a shareable host).
                for (op, shareable) in ops.iter().flat_map(|op| [(*op, false), (*op, true)]) {
                    let host = Faulty {
                        shareable,
                        ..Faulty::op(op)
                    };
                    let v = vm(&format!(
                        "f-{}-{}",
                        op.replace('_', "-"),
                        if shareable { "s" } else { "i" }
                    ));
                    // The pool starts empty, so a VM makes its own tap.
                    d.net.taps().drain(&host).unwrap();
                    let before = links_with_prefix(d.net.taps().prefix());
                    // As the lifecycle does: every prepare_host in order,
                    // then every guest_config, then every post_start; on a
                    // failure, roll back the prepared ones (a failed
                    // prepare_host cleans up after itself) in reverse.
                    let mut failed_at = None;
                    for (i, cap) in caps.iter().enumerate() {
                        if let Err(e) = d.hook(&v, &[], &host, |c| cap.prepare_host(c)) {
                            failed_at = Some((i, "prepare_host", e.to_string()));
                            break;
                        }
                    }
                    if failed_at.is_none() {
                        let mut guest = GuestConfig::new(v.name.as_str());
                        for (i, cap) in caps.iter().enumerate() {
                            if let Err(e) =
                                d.hook(&v, &[], &host, |c| cap.guest_config(c, &mut guest))
                            {
                                failed_at = Some((i, "guest_config", e.to_string()));
                                break;
                            }
                        }
                    }
                    if failed_at.is_none() {
                        for (i, cap) in caps.iter().enumerate() {
                            if let Err(e) = d.hook(&v, &[], &host, |c| cap.post_start(c)) {
                                failed_at = Some((i, "post_start", e.to_string()));
                                break;
                            }
                        }
                    }
                    let (i, hook, _) = failed_at.clone().expect("the injected failure surfaced");
                    let prepared = if hook == "prepare_host" {
                        i
                    } else {
                        caps.len()
                    };
                    for cap in caps[..prepared].iter().rev() {
                        d.hook(&v, &[], &host, |c| {
                            cap.teardown(c, TeardownReason::Rollback)
                        })
                        .unwrap();
                    }
                    let left = leaks(&d, &v, &before);
                    table.push(format!(
                        "{op:18} {:9} failed in {hook:12} of {:8} leaks: {left:?}",
                        if shareable { "(thread)" } else { "(inline)" },
                        caps[i].name()
                    ));
                    assert!(left.is_empty(), "{op}: {left:?}");
                    // The guard rules are waited for before the VMM could
                    // use the tap: a failure to install them is the
                    // network's, in guest_config at the latest.
                    if op == "add_guest" {
                        assert_eq!(caps[i].name(), "network");
                        let expected = if shareable {
                            "guest_config"
                        } else {
                            "prepare_host"
                        };
                        assert_eq!(hook, expected);
                    }
                    // The failed VM's address stays its own (a later start
                    // reuses it); delete frees it.
                    d.hook(&v, &[], &host, |c| {
                        caps[0].teardown(c, TeardownReason::Delete)
                    })
                    .unwrap();
                }
                eprintln!("fault injection:\n  {}", table.join("\n  "));
            },
        );
    }

    #[test]
    fn a_restarted_daemon_sweeps_what_no_running_vm_owns_and_keeps_the_rest() {
        in_host_ns(
            "a_restarted_daemon_sweeps_what_no_running_vm_owns_and_keeps_the_rest",
            || {
                use banger_core::capability::{DaemonCtx, RunningVm};

                let host = InProcessHostOps::default();
                let config = NetworkConfig {
                    bridge: "bgiso0".into(),
                    subnet: "10.67.0.0/24".parse().unwrap(),
                    ..NetworkConfig::default()
                };
                let d = daemon(config.clone());
                let (network, nat) = (Network::with(d.net.clone()), Nat::with(d.net.clone()));
                let (alive, dead) = (vm("alive"), vm("dead"));
                for v in [&alive, &dead] {
                    d.hook(v, &[], &host, |c| network.prepare_host(c)).unwrap();
                    d.hook(v, &[], &host, |c| nat.prepare_host(c)).unwrap();
                    network.settle(&v.id).unwrap();
                }
                let t_alive = d.tap_of(&alive);
                let dead_link = (d.tap_of(&dead), ifindex(&d.tap_of(&dead)));
                // Another daemon's tap on the same host must survive the sweep.
                let other = daemon(NetworkConfig {
                    bridge: "bgiso1".into(),
                    subnet: "10.68.0.0/24".parse().unwrap(),
                    ..NetworkConfig::default()
                });
                let o = vm("other");
                let other_network = Network::with(other.net.clone());
                other
                    .hook(&o, &[], &host, |c| other_network.prepare_host(c))
                    .unwrap();
                other_network.settle(&o.id).unwrap();
                let t_other = other.tap_of(&o);

                // The daemon is killed: nothing is torn down. A new one on
                // the same state dir starts with only `alive` running.
                let store = Arc::new(Store::open(&d.dir.path().join("banger.db")).unwrap());
                let restarted = Arc::new(HostNetwork::new(config, store, d.dir.path(), 0));
                let network2 = Network::with(restarted.clone());
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let running = [RunningVm {
                    vm: alive.clone(),
                    vm_dir: d.dir.path().join("vms").join(alive.id.as_str()),
                }];
                network2
                    .daemon_start(&DaemonCtx {
                        host: &host,
                        running: &running,
                        runtime: rt.handle().clone(),
                    })
                    .unwrap();

                // The dead VM's tap went; its name may be back, as a fresh
                // warm tap: every tap of ours is the survivor's or warm.
                let free = restarted.taps().free();
                assert_eq!(free.len(), banger_capabilities::network::DEFAULT_WARM);
                for l in links_with_prefix(restarted.taps().prefix()) {
                    assert!(l == t_alive || free.contains(&l), "{l} left over");
                }
                assert_eq!(restarted.taps().in_use(), std::slice::from_ref(&t_alive));
                if link_exists(&dead_link.0) {
                    assert_ne!(
                        ifindex(&dead_link.0),
                        dead_link.1,
                        "the dead VM's tap was kept"
                    );
                }
                assert!(link_exists(&t_alive) && link_exists(&t_other));
                let tags = rule_tags();
                assert!(
                    !tags.iter().any(|t| t.contains(dead.id.as_str())),
                    "{tags:?}"
                );
                for (v, kind) in [(&alive, "guard"), (&alive, "nat"), (&o, "guard")] {
                    let tag = format!("banger:{}:{kind}", v.id);
                    assert!(tags.contains(&tag), "{tag} swept: {tags:?}");
                }
                // The survivor's tap is not handed out again.
                assert!(!restarted.taps().free().contains(&t_alive));
            },
        );
    }
}
