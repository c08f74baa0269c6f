//! Host networking against the real kernel: bridge, taps, addresses and NAT
//! rules, each test inside its own network namespace so the host's is never
//! touched. Needs root (CLONE_NEWNET, CAP_NET_ADMIN), `ip` (iproute2, only to
//! inspect results) and `nft` (nftables).

// Inside a cfg(test) module so the test-only lint allowances cover helpers.
#[cfg(test)]
mod support;

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_host::hostops::{HostOps, InProcessHostOps};

    /// `ip -j ARGS` in the calling thread's namespace, parsed.
    fn ip_json(args: &[&str]) -> serde_json::Value {
        let out = std::process::Command::new("ip")
            .arg("-j")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `ip ARGS`, which must succeed.
    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }

    fn link(name: &str) -> Option<serde_json::Value> {
        ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["ifname"] == name)
            .cloned()
    }

    fn addresses(name: &str) -> Vec<String> {
        ip_json(&["-4", "addr", "show", "dev", name])[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
            .collect()
    }

    fn nft_rules() -> Vec<serde_json::Value> {
        let out = std::process::Command::new("nft")
            .args(["-j", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("rule").cloned())
            .collect()
    }

    fn comments(rules: &[serde_json::Value]) -> Vec<String> {
        rules
            .iter()
            .map(|r| r["comment"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn bridge_is_created_addressed_and_up_idempotently() {
        test_infra::in_netns(
            "bridge_is_created_addressed_and_up_idempotently",
            &["ip"],
            || {
                let ops = InProcessHostOps::default();
                let gw = Ipv4Addr::new(172, 30, 0, 1);
                ops.ensure_bridge("bgtest0", gw, 24).unwrap();
                ops.ensure_bridge("bgtest0", gw, 24).unwrap();
                let l = link("bgtest0").expect("bridge exists");
                assert!(
                    l["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
                    "{l}"
                );
                assert_eq!(addresses("bgtest0"), vec!["172.30.0.1/24"]);
                let detail = ip_json(&["-d", "link", "show", "bgtest0"]);
                assert_eq!(detail[0]["linkinfo"]["info_kind"], "bridge");

                ops.delete_link("bgtest0").unwrap();
                assert!(link("bgtest0").is_none());
                ops.delete_link("bgtest0").unwrap();
            },
        );
    }

    #[test]
    fn a_bridge_is_seen_ready_only_when_up_with_exactly_its_address() {
        test_infra::in_netns(
            "a_bridge_is_seen_ready_only_when_up_with_exactly_its_address",
            &["ip"],
            || {
                use banger_host::hostops::bridge_ready;
                let ops = InProcessHostOps::default();
                let gw = Ipv4Addr::new(172, 31, 0, 1);
                assert!(!bridge_ready("bgready0", gw, 24), "no such link yet");
                ops.ensure_bridge("bgready0", gw, 24).unwrap();
                assert!(bridge_ready("bgready0", gw, 24));
                assert!(!bridge_ready("bgready0", gw, 16), "another prefix");
                assert!(!bridge_ready("bgready0", Ipv4Addr::new(172, 31, 0, 2), 24));

                // Down: not ready, and ensure_bridge (the netlink path)
                // brings it up again.
                ip(&["link", "set", "bgready0", "down"]);
                assert!(!bridge_ready("bgready0", gw, 24));
                ops.ensure_bridge("bgready0", gw, 24).unwrap();
                assert!(bridge_ready("bgready0", gw, 24));

                // Its address gone for another: not ready, and ensure_bridge
                // adds it back (as a second address, which the ioctls do not
                // see: every later check takes the netlink path, still right).
                ip(&["addr", "flush", "dev", "bgready0"]);
                ip(&["addr", "add", "192.0.2.1/24", "dev", "bgready0"]);
                assert!(!bridge_ready("bgready0", gw, 24));
                ops.ensure_bridge("bgready0", gw, 24).unwrap();
                assert_eq!(addresses("bgready0"), vec!["192.0.2.1/24", "172.31.0.1/24"]);
                assert!(!bridge_ready("bgready0", gw, 24));
                ops.delete_link("bgready0").unwrap();
                assert!(!bridge_ready("bgready0", gw, 24));
            },
        );
    }

    #[test]
    fn tap_is_attached_to_the_bridge_and_brought_up() {
        test_infra::in_netns(
            "tap_is_attached_to_the_bridge_and_brought_up",
            &["ip"],
            || {
                let ops = InProcessHostOps::default();
                ops.ensure_bridge("bgtest1", Ipv4Addr::new(10, 9, 0, 1), 24)
                    .unwrap();
                ops.create_tap("bgtap0", 0).unwrap();
                ops.attach_to_bridge("bgtap0", "bgtest1").unwrap();
                ops.set_link_up("bgtap0").unwrap();
                let tap = link("bgtap0").expect("tap exists");
                assert_eq!(tap["master"], "bgtest1", "{tap}");
                assert!(
                    tap["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
                    "{tap}"
                );
                let err = ops.attach_to_bridge("bgtap0", "nosuchbr").unwrap_err();
                assert!(
                    banger_core::lifecycle::render_chain(&err).contains("nosuchbr"),
                    "{err}"
                );
                ops.delete_link("bgtap0").unwrap();
                assert!(link("bgtap0").is_none());
            },
        );
    }

    #[test]
    fn nat_rules_are_tagged_per_vm_and_removed_exactly() {
        test_infra::in_netns(
            "nat_rules_are_tagged_per_vm_and_removed_exactly",
            &["ip", "nft"],
            || {
                let ops = InProcessHostOps::default();
                // Nothing to remove yet (no table at all): not an error.
                ops.remove_nat("aaaa").unwrap();
                let a = Ipv4Addr::new(172, 30, 0, 2);
                let b = Ipv4Addr::new(172, 30, 0, 3);
                ops.add_nat("aaaa", "banger0", a).unwrap();
                ops.add_nat("bbbb", "banger0", b).unwrap();
                // Re-adding replaces rather than duplicates.
                ops.add_nat("aaaa", "banger0", a).unwrap();
                let rules = nft_rules();
                let c = comments(&rules);
                // Two each: the forward accept (outside the deny set) and
                // the masquerade, in the bridge's own table.
                assert_eq!(
                    c.iter().filter(|c| *c == "banger:aaaa:nat").count(),
                    2,
                    "{c:?}"
                );
                assert_eq!(
                    c.iter().filter(|c| *c == "banger:bbbb:nat").count(),
                    2,
                    "{c:?}"
                );
                let masq = rules
                    .iter()
                    .find(|r| r["chain"] == "nat_post" && r["comment"] == "banger:aaaa:nat")
                    .unwrap();
                assert_eq!(masq["table"], "banger_banger0");
                let text = masq.to_string();
                assert!(text.contains("masquerade"), "{text}");
                assert!(text.contains("172.30.0.2"), "{text}");
                assert_eq!(
                    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                        .unwrap()
                        .trim(),
                    "1"
                );

                ops.remove_nat("aaaa").unwrap();
                let c = comments(&nft_rules());
                assert!(!c.iter().any(|c| c.contains("aaaa")), "{c:?}");
                assert_eq!(
                    c.iter().filter(|c| *c == "banger:bbbb:nat").count(),
                    2,
                    "{c:?}"
                );
                ops.remove_nat("aaaa").unwrap();
                ops.remove_nat("bbbb").unwrap();
                // Only the bridge's fixed base rules are left.
                let c = comments(&nft_rules());
                assert!(c.iter().all(|c| c.starts_with("banger:base:")), "{c:?}");
            },
        );
    }

    #[test]
    fn nat_refuses_a_vm_id_that_could_inject_rules() {
        let err = InProcessHostOps::default()
            .add_nat("x\" ; flush ruleset", "banger0", Ipv4Addr::new(10, 0, 0, 2))
            .unwrap_err();
        assert!(err.to_string().contains("Invalid argument"), "{err}");
    }

    use crate::support::{Quiet, vm};

    #[test]
    fn network_and_nat_capabilities_wire_a_vm_and_leave_nothing_after_delete() {
        test_infra::in_netns(
            "network_and_nat_capabilities_wire_a_vm_and_leave_nothing_after_delete",
            &["ip", "nft"],
            || {
                use std::sync::Arc;

                use banger_api::config::NetworkConfig;
                use banger_capabilities::nat::Nat;
                use banger_capabilities::network::HostNetwork;
                use banger_capabilities::network::Network;
                use banger_core::capability::{Capability, HookCtx, TeardownReason};
                use banger_core::store::Store;

                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
                let config = NetworkConfig {
                    bridge: "bgtest2".into(),
                    subnet: "10.77.0.0/24".parse().unwrap(),
                    dns_port: 0,
                    dns_upstream: None,
                };
                let net = Arc::new(HostNetwork::new(config, store, dir.path(), 0));
                let network = Network::with(net.clone());
                let nat = Nat::with(net.clone());
                let host = InProcessHostOps::default();
                let v = vm("web");
                let vm_dir = dir.path().join("vm");
                std::fs::create_dir_all(&vm_dir).unwrap();
                let options = banger_api::model::CapOptions::new();
                let config = banger_api::config::Config::defaults(std::path::Path::new(
                    "/nonexistent/config.toml",
                ));
                let ctx = HookCtx {
                    vm: &v,
                    vm_dir: &vm_dir,
                    options: &options,
                    host: &host,
                    config: &config,
                    log: &Quiet,
                };

                network.prepare_host(&ctx).unwrap();
                nat.prepare_host(&ctx).unwrap();
                // The guard rules, installed beside the hooks after it.
                network.settle(&v.id).unwrap();
                assert_eq!(addresses("bgtest2"), vec!["10.77.0.1/24"]);
                let p = net.taps().prefix().to_string();
                let (t0, t1, t2) = (format!("{p}0"), format!("{p}1"), format!("{p}2"));
                let tap = link(&t0).expect("the VM's tap exists");
                assert_eq!(tap["master"], "bgtest2", "{tap}");
                // Two more kept warm on the bridge.
                for warm in [&t1, &t2] {
                    assert_eq!(link(warm).expect(warm)["master"], "bgtest2");
                }
                let rules = nft_rules();
                let c = comments(&rules);
                let count = |kind: &str| {
                    let tag = format!("banger:{}:{kind}", v.id);
                    c.iter().filter(|c| **c == tag).count()
                };
                assert_eq!((count("guard"), count("nat")), (5, 2), "{c:?}");
                assert!(rules.iter().any(|r| r.to_string().contains("10.77.0.2")));

                nat.teardown(&ctx, TeardownReason::Delete).unwrap();
                network.teardown(&ctx, TeardownReason::Delete).unwrap();
                let c = comments(&nft_rules());
                assert!(c.iter().all(|c| c.starts_with("banger:base:")), "{c:?}");
                assert!(link(&t0).is_none(), "pool was full, tap deleted");
                net.taps().drain(&host).unwrap();
                assert!(link(&t1).is_none() && link(&t2).is_none());
            },
        );
    }

    use test_infra::dns::query;

    #[test]
    fn dns_server_answers_vm_names_from_the_records_file_and_follows_changes() {
        use banger_capabilities::dns::server as dns;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let records = dns::records_path(dir.path());
            dns::set_record(&records, "web", Some(Ipv4Addr::new(172, 30, 0, 2))).unwrap();
            let server = dns::DnsServer::start(
                records.clone(),
                &["127.0.0.1:0".parse().unwrap()],
                dns::Upstream::Servers(vec![]),
            )
            .await
            .unwrap();
            let addr = server.local_addrs()[0];
            assert!(addr.ip().is_loopback() && addr.port() != 0);

            assert_eq!(
                query(addr, "web.vm.", "A").await,
                ("NoError".to_string(), vec![Ipv4Addr::new(172, 30, 0, 2)])
            );
            assert_eq!(
                query(addr, "WEB.vm.", "A").await.1,
                vec![Ipv4Addr::new(172, 30, 0, 2)],
                "names are case-insensitive"
            );
            // Known name, no IPv6: NODATA rather than NXDOMAIN.
            assert_eq!(
                query(addr, "web.vm.", "AAAA").await,
                ("NoError".to_string(), vec![])
            );
            assert_eq!(query(addr, "nope.vm.", "A").await.0, "NXDomain");
            // Outside .vm with nothing to forward to: the server failed.
            assert_eq!(query(addr, "example.com.", "A").await.0, "ServFail");

            // A new VM, then the first one's removal, are seen without a restart.
            dns::set_record(&records, "db", Some(Ipv4Addr::new(172, 30, 0, 3))).unwrap();
            assert_eq!(
                query(addr, "db.vm.", "A").await.1,
                vec![Ipv4Addr::new(172, 30, 0, 3)]
            );
            dns::set_record(&records, "web", None).unwrap();
            assert_eq!(query(addr, "web.vm.", "A").await.0, "NXDomain");

            // A corrupt file keeps the last good answers.
            std::fs::write(&records, b"{not json").unwrap();
            assert_eq!(
                query(addr, "db.vm.", "A").await.1,
                vec![Ipv4Addr::new(172, 30, 0, 3)]
            );
            server.shutdown().await;
        });
    }

    #[test]
    fn daemon_bring_up_warms_taps_and_serves_dns_on_loopback_and_bridge() {
        test_infra::in_netns(
            "daemon_bring_up_warms_taps_and_serves_dns_on_loopback_and_bridge",
            &["ip"],
            || {
                use std::sync::Arc;

                use banger_api::config::NetworkConfig;
                use banger_capabilities::dns::server as dns;
                use banger_capabilities::network::HostNetwork;
                use banger_core::store::Store;

                let host = InProcessHostOps::default();
                // Also callable from async code (the daemon's startup).
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap()
                    .block_on(async { host.set_link_up("lo") })
                    .unwrap();
                let dir = tempfile::tempdir().unwrap();
                let store = Arc::new(Store::open(&dir.path().join("banger.db")).unwrap());
                let config = NetworkConfig {
                    bridge: "bgtest3".into(),
                    subnet: "10.88.0.0/24".parse().unwrap(),
                    dns_port: 5353,
                    dns_upstream: None,
                };
                let net = HostNetwork::new(config, store, dir.path(), 0);
                // Tap 0 belongs to a VM that survived a daemon restart.
                let p = net.taps().prefix().to_string();
                let t0 = format!("{p}0");
                let warm: Vec<String> = (1..=banger_capabilities::network::DEFAULT_WARM)
                    .map(|i| format!("{p}{i}"))
                    .collect();
                net.bring_up(&host, &[&t0]).unwrap();
                assert_eq!(addresses("bgtest3"), vec!["10.88.0.1/24"]);
                assert!(link(&t0).is_none());
                assert_eq!(net.taps().free(), warm);
                for t in &warm {
                    assert_eq!(link(t).expect(t)["master"], "bgtest3");
                }

                dns::set_record(net.dns_records(), "web", Some(Ipv4Addr::new(10, 88, 0, 2)))
                    .unwrap();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let server = banger_capabilities::dns::serve(&net, &host).await.unwrap();
                    let bound: Vec<String> =
                        server.local_addrs().iter().map(|a| a.to_string()).collect();
                    assert_eq!(bound, ["127.0.0.1:5353", "10.88.0.1:53"]);
                    for addr in server.local_addrs() {
                        assert_eq!(
                            query(*addr, "web.vm.", "A").await.1,
                            vec![Ipv4Addr::new(10, 88, 0, 2)],
                            "via {addr}"
                        );
                    }
                    server.shutdown().await;
                });
                net.shut_down(&host);
                assert!(warm.iter().all(|t| link(t).is_none()));
                assert!(link("bgtest3").is_some(), "the bridge outlives the daemon");
            },
        );
    }
}
