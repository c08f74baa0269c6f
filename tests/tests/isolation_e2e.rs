//! Guest isolation seen from inside real guests (QEMU, the no-init image,
//! on the e2e rig's own bridge): a guest reaches the host only for DNS, not
//! a service on the bridge address or on another host address even with
//! NAT; guests reach each other only when both set `network:peers=true`;
//! a second address the guest gives itself gets nothing through. The
//! namespace-level tests (`isolation.rs`) cover the rules one by one; this
//! checks that real guests still boot, resolve and answer ssh behind them.
//! Needs what `e2e.rs` needs (root, QEMU, the static agent, ssh, ip, nft);
//! missing pieces skip loudly.

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener};
    use std::path::Path;

    use test_infra::guest_rig::{GREETING, Internet, Rig, rig};

    /// A shell command in the guest: connect to `ip:port` with bash alone
    /// and print the first line the far end sends, giving up after 5 s.
    fn first_line(ip: impl std::fmt::Display, port: u16) -> String {
        format!("timeout 5 bash -c 'exec 3<>/dev/tcp/{ip}/{port}; head -1 <&3'")
    }

    /// Serves `greeting` to every connection on `addr` in this (the
    /// host's) namespace, from a thread that lives as long as the test.
    fn host_service(addr: (Ipv4Addr, u16), greeting: &'static str) {
        let listener = TcpListener::bind(addr).unwrap();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let _ = c.write_all(greeting.as_bytes());
            }
        });
    }

    fn out(rig: &Rig, vm: &str, ip: Ipv4Addr, known: &Path, cmd: &str) -> (bool, String) {
        let o = rig.ssh(vm, ip, known, cmd);
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    }

    #[test]
    fn real_guests_reach_only_dns_on_the_host_and_each_other_only_as_peers() {
        let test = "real_guests_reach_only_dns_on_the_host_and_each_other_only_as_peers";
        let Some((rig, _a)) = rig(test, "noinit", "") else {
            return;
        };
        let internet = Internet::start("iso", 102);
        let a = rig.create(
            "iso-a",
            &["--image", "noinit", "--nat", "--cap", "network:peers=true"],
        );
        let ip_a = a.address.expect("a networked VM has an address");
        let known_a = rig.pin_host_keys(&a);
        let gateway = Ipv4Addr::from(u32::from(ip_a) & 0xffff_ff00 | 1);

        // DNS on the bridge address works from the guest.
        let (ok, got) = out(&rig, "iso-a", ip_a, &known_a, "getent hosts iso-a.vm");
        assert!(ok && got.contains(&ip_a.to_string()), "{got}");
        // NAT reaches the stand-in internet...
        let (_, page) = out(&rig, "iso-a", ip_a, &known_a, &internet.fetch_cmd(10));
        assert!(page.contains(GREETING), "{page}");
        // ...but no host service: not on the bridge address, not on the
        // host's address facing the "internet".
        host_service((gateway, 18080), "host-service-on-bridge");
        let uplink: Ipv4Addr = "198.51.102.1".parse().unwrap();
        host_service((uplink, 18081), "host-service-on-uplink");
        for (addr, port) in [(gateway, 18080), (uplink, 18081)] {
            let (ok, got) = out(&rig, "iso-a", ip_a, &known_a, &first_line(addr, port));
            assert!(!ok && !got.contains("host-service"), "{addr}:{port}: {got}");
        }

        // A guest that did not opt in is out of reach, and cannot reach a.
        let b = rig.create("iso-b", &["--image", "noinit"]);
        let ip_b = b.address.expect("a networked VM has an address");
        let known_b = rig.pin_host_keys(&b);
        let (ok, got) = out(&rig, "iso-a", ip_a, &known_a, &first_line(ip_b, 22));
        assert!(!ok && !got.contains("SSH-"), "a reached b: {got}");
        let (ok, got) = out(&rig, "iso-b", ip_b, &known_b, &first_line(ip_a, 22));
        assert!(!ok && !got.contains("SSH-"), "b reached a: {got}");
        rig.env.banger(&["vm", "delete", "--force", "iso-b"]).ok();

        // One that did opt in is reachable both ways.
        let c = rig.create(
            "iso-c",
            &["--image", "noinit", "--cap", "network:peers=true"],
        );
        let ip_c = c.address.expect("a networked VM has an address");
        let known_c = rig.pin_host_keys(&c);
        let (ok, got) = out(&rig, "iso-a", ip_a, &known_a, &first_line(ip_c, 22));
        assert!(
            ok && got.starts_with("SSH-"),
            "a cannot reach its peer c: {got}"
        );
        let (ok, got) = out(&rig, "iso-c", ip_c, &known_c, &first_line(ip_a, 22));
        assert!(
            ok && got.starts_with("SSH-"),
            "c cannot reach its peer a: {got}"
        );

        // An address a gives itself gets nothing through, even to a peer.
        let spoof = Ipv4Addr::from(u32::from(ip_a) & 0xffff_ff00 | 250);
        let (ok, got) = out(
            &rig,
            "iso-a",
            ip_a,
            &known_a,
            &format!(
                "ip addr add {spoof}/24 dev eth0 && \
                 curl -s --max-time 5 --interface {spoof} telnet://{ip_c}:22 </dev/null; \
                 ip addr del {spoof}/24 dev eth0"
            ),
        );
        assert!(
            !got.contains("SSH-"),
            "a spoofed source got through: {ok} {got}"
        );
        // And a is still fine with its own.
        let (ok, got) = out(&rig, "iso-a", ip_a, &known_a, &first_line(ip_c, 22));
        assert!(ok && got.starts_with("SSH-"), "{got}");

        rig.delete_all_and_check_clean(&[a, c]);
    }
}
