//! The crates' layering, as `cargo tree` resolves it: the CLI and the API
//! crate link no server, store, registry, netlink or SSH crate, and plugins
//! build against the ABI crate alone. See `docs/architecture.md`.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::process::Command;

    /// What only the daemon links: its HTTP server, its store, the OCI registry
    /// and download clients, netlink, its SSH client, the DNS server, and the
    /// daemon-side banger crates.
    const DAEMON_ONLY: &[&str] = &[
        "axum",
        "rusqlite",
        "oci-client",
        "reqwest",
        "rtnetlink",
        "netlink-proto",
        "russh",
        "hickory-server",
        "hickory-resolver",
        "banger-core",
        "banger-host",
        "banger-vmm",
        "banger-artifacts",
        "banger-capabilities",
    ];

    /// Every crate `package` links at run time (normal dependencies, all
    /// features as the workspace resolves them).
    fn linked(package: &str) -> BTreeSet<String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args([
                "tree", "--locked", "-e", "normal", "--prefix", "none", "-p", package,
            ])
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo tree -p {package} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let crates: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        assert!(
            crates.contains(package),
            "cargo tree -p {package} did not list {package} itself:\n{text}"
        );
        crates
    }

    fn assert_links_none_of(package: &str, forbidden: &[&str]) {
        let crates = linked(package);
        let found: Vec<&&str> = forbidden.iter().filter(|c| crates.contains(**c)).collect();
        assert!(
            found.is_empty(),
            "{package} links {found:?}, which belong to the daemon; see `cargo tree -p {package} -i CRATE`"
        );
    }

    #[test]
    fn the_cli_links_no_server_store_registry_netlink_or_ssh_crate() {
        assert_links_none_of("banger-cli", DAEMON_ONLY);
        // What it does link: the shared vocabulary.
        assert!(linked("banger-cli").contains("banger-api"));
    }

    #[test]
    fn the_api_crate_is_the_bottom_layer() {
        assert_links_none_of("banger-api", DAEMON_ONLY);
    }

    #[test]
    fn the_layers_below_the_daemon_do_not_link_it() {
        for lower in ["banger-host", "banger-vmm", "banger-artifacts"] {
            assert_links_none_of(
                lower,
                &["banger-core", "banger-capabilities", "axum", "rusqlite"],
            );
        }
        // Backends do not reach the network stack or registries either.
        assert_links_none_of("banger-vmm", &["rtnetlink", "oci-client", "banger-host"]);
    }

    #[test]
    fn plugins_build_against_the_abi_crate_alone() {
        let crates = linked("banger-plugin-shared-mount");
        let banger: Vec<&String> = crates.iter().filter(|c| c.starts_with("banger-")).collect();
        assert_eq!(
            banger,
            ["banger-plugin-abi", "banger-plugin-shared-mount"],
            "an out-of-tree plugin must need nothing but banger-plugin-abi"
        );
    }
}
