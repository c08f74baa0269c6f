//! A VM's anti-spoofing rules against real nftables, in a private network
//! namespace: after the first VM the daemon no longer reads the whole
//! ruleset before each guard (create throughput, issue 12), so these pin
//! what that shortcut must keep: a re-guard replaces the VM's rules, and a
//! table deleted behind the daemon's back is rebuilt at the next guard.

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use banger_host::hostops::{GuestPort, HostOps, InProcessHostOps};
    use test_infra::guest_rig::run;

    const BRIDGE: &str = "bgguard0";
    const TABLE: &str = "banger_bgguard0";

    fn nft(args: &[&str]) -> String {
        let out = run("nft", args);
        assert!(
            out.status.success(),
            "nft {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The bridge table's rules as `nft list` prints them, one a line.
    fn rules() -> Vec<String> {
        nft(&["list", "table", "bridge", TABLE])
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("comment \"banger:"))
            .map(String::from)
            .collect()
    }

    fn tagged<'a>(rules: &'a [String], tag: &str) -> Vec<&'a String> {
        let needle = format!("comment \"{tag}\"");
        rules.iter().filter(|r| r.ends_with(&needle)).collect()
    }

    fn port(tap: &str, last: u8) -> GuestPort {
        GuestPort {
            bridge: BRIDGE.to_string(),
            tap: tap.to_string(),
            ip: Ipv4Addr::new(10, 61, 0, last),
            mac: format!("06:00:0a:3d:00:{last:02x}").parse().unwrap(),
            peers: false,
        }
    }

    #[test]
    fn a_guard_replaces_the_vms_rules_and_survives_a_table_deleted_behind_its_back() {
        test_infra::in_netns(
            "a_guard_replaces_the_vms_rules_and_survives_a_table_deleted_behind_its_back",
            &["nft"],
            || {
                let host = InProcessHostOps::default();
                host.add_guest("vma", &port("bgguardt0", 2)).unwrap();
                host.add_guest("vmb", &port("bgguardt1", 3)).unwrap();
                let r = rules();
                assert_eq!(tagged(&r, "banger:vma:guard").len(), 5, "{r:#?}");
                assert_eq!(tagged(&r, "banger:vmb:guard").len(), 5, "{r:#?}");

                // A second guard of one VM (a restart on another tap and
                // address) replaces its rules and leaves the other's.
                host.add_guest("vmb", &port("bgguardt2", 4)).unwrap();
                let r = rules();
                let b = tagged(&r, "banger:vmb:guard");
                assert_eq!(b.len(), 5, "{r:#?}");
                assert!(
                    b.iter()
                        .all(|l| !l.contains("bgguardt1") && !l.contains("10.61.0.3")),
                    "{b:#?}"
                );
                assert!(b.iter().any(|l| l.contains("10.61.0.4")), "{b:#?}");
                assert_eq!(tagged(&r, "banger:vma:guard").len(), 5, "{r:#?}");

                // Someone deletes the table: the next guard rebuilds the
                // base chains (with their jumps) before adding its rules.
                nft(&["delete", "table", "bridge", TABLE]);
                host.add_guest("vmc", &port("bgguardt3", 5)).unwrap();
                let r = rules();
                assert!(
                    tagged(&r, "banger:base:v3")
                        .iter()
                        .any(|l| l.contains("jump guests")),
                    "{r:#?}"
                );
                assert_eq!(tagged(&r, "banger:vmc:guard").len(), 5, "{r:#?}");
                // The VMs guarded before are known again from the new table.
                host.add_guest("vma", &port("bgguardt0", 2)).unwrap();
                host.add_guest("vma", &port("bgguardt0", 2)).unwrap();
                assert_eq!(tagged(&rules(), "banger:vma:guard").len(), 5);

                // Removal takes exactly one VM's rules.
                host.remove_guest("vmc").unwrap();
                assert!(tagged(&rules(), "banger:vmc:guard").is_empty());
                host.remove_guest("vmc").unwrap();
            },
        );
    }
}
