//! banger's DNS server forwarding names outside `.vm`: the real server
//! (`banger_capabilities::dns::server`) in front of a stand-in upstream (hickory-server
//! on loopback), queried over UDP and TCP by a real client.

// Inside a cfg(test) module so the test-only lint allowances cover helpers.
#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::{Duration, Instant};

    use banger_capabilities::dns::server::{self as dns, DnsServer, FORWARD_DEADLINE, Upstream};
    use test_infra::dns::{StandInUpstream, Target, query, query_tcp};

    const EXAMPLE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const TRAP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
    const WEB: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// A stand-in upstream on loopback at `addr` serving `example.test`, an
    /// alias to it, and (as a trap) `nope.vm` and `web.vm`, which banger must
    /// never ask it for.
    fn upstream(addr: &str, example: Ipv4Addr) -> StandInUpstream {
        StandInUpstream::start(
            addr.parse().unwrap(),
            None,
            &["test.", "vm."],
            &[
                ("example.test.", Target::A(example)),
                ("alias.test.", Target::Cname("example.test.")),
                ("nope.vm.", Target::A(TRAP)),
                ("web.vm.", Target::A(TRAP)),
            ],
        )
    }

    /// banger's server with one record (`web.vm`), on a free loopback port.
    async fn banger(dir: &std::path::Path, upstream: Upstream) -> DnsServer {
        let records = dns::records_path(dir);
        dns::set_record(&records, "web", Some(WEB)).unwrap();
        DnsServer::start(records, &["127.0.0.1:0".parse().unwrap()], upstream)
            .await
            .unwrap()
    }

    #[test]
    fn other_names_are_forwarded_and_vm_names_never_are() {
        let up = upstream("127.0.0.1:0", EXAMPLE);
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            // The trap is armed: asked directly, the upstream answers .vm.
            assert_eq!(query(up.addr(), "nope.vm.", "A").await.1, vec![TRAP]);
            let server = banger(dir.path(), Upstream::Servers(vec![up.addr()])).await;
            let addr = server.local_addrs()[0];

            // The stand-in's answer, through banger, over UDP and TCP.
            let want = ("NoError".to_string(), vec![EXAMPLE]);
            assert_eq!(query(addr, "example.test.", "A").await, want);
            assert_eq!(query_tcp(addr, "example.test.", "A").await, want);
            // A CNAME chain comes back whole: the client finds the address.
            assert_eq!(query(addr, "alias.test.", "A").await, want);
            // Upstream's negative answers are passed on as they are.
            assert_eq!(
                query(addr, "missing.test.", "A").await,
                ("NXDomain".to_string(), vec![])
            );
            assert_eq!(
                query(addr, "example.test.", "AAAA").await,
                ("NoError".to_string(), vec![])
            );

            // The upstream refuses a zone it does not serve: SERVFAIL, at once.
            let started = Instant::now();
            assert_eq!(query(addr, "other.example.", "A").await.0, "ServFail");
            assert!(started.elapsed() < FORWARD_DEADLINE / 2);

            // .vm is answered here, even though the upstream has answers.
            assert_eq!(
                query(addr, "web.vm.", "A").await,
                ("NoError".to_string(), vec![WEB])
            );
            assert_eq!(query_tcp(addr, "web.vm.", "A").await.1, vec![WEB]);
            assert_eq!(
                query(addr, "nope.vm.", "A").await,
                ("NXDomain".to_string(), vec![])
            );
            server.shutdown().await;
        });
    }

    /// A UDP socket that takes queries and never answers.
    fn black_hole() -> (std::net::UdpSocket, SocketAddr) {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        (sock, addr)
    }

    #[test]
    fn a_silent_or_refusing_upstream_gives_servfail_in_bounded_time_and_vm_names_still_answer() {
        let (_hole, silent) = black_hole();
        // A port nobody listens on: the kernel refuses at once.
        let refusing = {
            let (sock, addr) = black_hole();
            drop(sock);
            addr
        };
        let dir = tempfile::tempdir().unwrap();
        runtime().block_on(async {
            let server = banger(dir.path(), Upstream::Servers(vec![silent])).await;
            let addr = server.local_addrs()[0];
            let started = Instant::now();
            let slow = tokio::spawn(async move { query(addr, "example.test.", "A").await });
            // While that waits on the silent upstream, .vm answers at once.
            let local = Instant::now();
            assert_eq!(query(addr, "web.vm.", "A").await.1, vec![WEB]);
            assert!(
                local.elapsed() < Duration::from_secs(2),
                "{:?}",
                local.elapsed()
            );
            assert_eq!(slow.await.unwrap(), ("ServFail".to_string(), vec![]));
            let took = started.elapsed();
            assert!(
                took < FORWARD_DEADLINE + Duration::from_secs(1),
                "SERVFAIL after {took:?}"
            );
            server.shutdown().await;

            let server = banger(dir.path(), Upstream::Servers(vec![refusing])).await;
            let addr = server.local_addrs()[0];
            let started = Instant::now();
            assert_eq!(query(addr, "example.test.", "A").await.0, "ServFail");
            assert!(started.elapsed() < FORWARD_DEADLINE + Duration::from_secs(1));
            server.shutdown().await;
        });
    }

    #[test]
    fn an_upstream_list_naming_the_server_itself_is_not_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        // The server's port, picked before it starts so the upstream list
        // can name it.
        let port = black_hole().1.port();
        let own: SocketAddr = ([127, 0, 0, 1], port).into();
        runtime().block_on(async {
            let records = dns::records_path(dir.path());
            let server = DnsServer::start(records, &[own], Upstream::Servers(vec![own]))
                .await
                .unwrap();
            let started = Instant::now();
            assert_eq!(query(own, "example.test.", "A").await.0, "ServFail");
            // Refused without asking anyone, rather than after the deadline
            // of a query bouncing between the server and itself.
            assert!(
                started.elapsed() < FORWARD_DEADLINE / 2,
                "{:?}",
                started.elapsed()
            );
            server.shutdown().await;
        });
    }

    #[test]
    fn the_hosts_resolv_conf_is_followed_when_it_changes() {
        // resolv.conf has no ports: the stand-ins sit on port 53 of two
        // loopback addresses, which needs root.
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!(
                "SKIPPED the_hosts_resolv_conf_is_followed_when_it_changes: needs root to listen on port 53"
            );
            return;
        }
        let first = upstream("127.0.0.77:53", EXAMPLE);
        let second = upstream("127.0.0.78:53", Ipv4Addr::new(198, 51, 100, 8));
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        let write = |ns: SocketAddr| {
            // Staged and renamed, as resolvconf and NetworkManager do.
            let tmp = dir.path().join("resolv.conf.new");
            std::fs::write(&tmp, format!("search lan\nnameserver {}\n", ns.ip())).unwrap();
            std::fs::rename(&tmp, &conf).unwrap();
        };
        write(first.addr());
        runtime().block_on(async {
            let server = banger(dir.path(), Upstream::ResolvConf(conf.clone())).await;
            let addr = server.local_addrs()[0];
            assert_eq!(query(addr, "example.test.", "A").await.1, vec![EXAMPLE]);
            write(second.addr());
            assert_eq!(
                query(addr, "example.test.", "A").await.1,
                vec![Ipv4Addr::new(198, 51, 100, 8)],
                "the new nameserver is asked"
            );
            server.shutdown().await;
        });
    }

    #[test]
    fn the_daemon_forwards_to_the_dns_upstream_of_its_config() {
        let up = upstream("127.0.0.1:0", EXAMPLE);
        let env = test_infra::BangerEnv::new();
        let port = black_hole().1.port();
        // Its own subnet and bridge name: the daemon binds the bridge address
        // (port 53, a warning without root) but never creates the bridge.
        env.write_config(&format!(
            "[network]\nbridge = \"bgdnsfw0\"\nsubnet = \"10.214.0.0/24\"\ndns_port = {port}\n\
             dns_upstream = [\"{}\"]\n",
            up.addr()
        ));
        let mut daemon = env.spawn_daemon();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let got = runtime().block_on(query(addr, "example.test.", "A"));
        assert_eq!(got, ("NoError".to_string(), vec![EXAMPLE]));
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
