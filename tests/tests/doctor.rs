//! `banger doctor` through the real binary on a host missing each
//! dependency in turn: PATH is a directory of symlinks to only the tools a
//! test wants present, the config points keys at missing paths, and HOME and
//! the XDG dirs are a fresh temp dir each time.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    use test_infra::guest_artifacts::{cache, on_path};
    use test_infra::{BangerEnv, Run};

    /// Every tool doctor looks for that a test may take away.
    const TOOLS: &[&str] = &[
        "qemu-system-x86_64",
        "vhost-device-vsock",
        "apt-get",
        "apt-cache",
        "dpkg-deb",
        "mmdebstrap",
        "nft",
        "ssh",
    ];

    fn find(tool: &str) -> Option<PathBuf> {
        on_path(tool).or_else(|| {
            let p = cache().join("tools/bin").join(tool);
            p.is_file().then_some(p)
        })
    }

    /// A host whose PATH holds exactly the tools asked for.
    struct Host {
        env: BangerEnv,
        bin: PathBuf,
    }

    impl Host {
        /// `None` (after a loud skip) when this machine lacks one of `tools`.
        fn with(test: &str, tools: &[&str]) -> Option<Host> {
            let mut env = BangerEnv::new();
            let bin = env.root().join("path");
            std::fs::create_dir_all(&bin).unwrap();
            for tool in tools {
                let Some(real) = find(tool) else {
                    eprintln!("SKIP {test}: {tool} is not installed (scripts/test installs it)");
                    return None;
                };
                std::os::unix::fs::symlink(real, bin.join(tool)).unwrap();
            }
            env.set_env("PATH", bin.to_str().unwrap());
            let host = Host { env, bin };
            host.config("");
            Some(host)
        }

        /// Every tool but `without`.
        fn without(test: &str, without: &str) -> Option<Host> {
            let tools: Vec<&str> = TOOLS.iter().copied().filter(|t| *t != without).collect();
            Host::with(test, &tools)
        }

        /// Replaces config.toml (the test env's fake-firecracker default
        /// would otherwise decide the backend).
        fn config(&self, text: &str) {
            std::fs::write(self.config_path(), text).unwrap();
        }

        fn config_path(&self) -> PathBuf {
            self.env.root().join("config/banger/config.toml")
        }

        /// An executable script on this host's PATH.
        fn script(&self, name: &str, body: &str) -> PathBuf {
            let p = self.bin.join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        }

        fn doctor(&self) -> Run {
            self.env.banger(&["doctor"])
        }
    }

    /// The line of check `name`.
    fn line<'a>(out: &'a Run, name: &str) -> &'a str {
        let prefix = format!(" {name}: ");
        out.stdout
            .lines()
            .find(|l| l.get(4..).is_some_and(|rest| rest.starts_with(&prefix)))
            .unwrap_or_else(|| panic!("no {name} check in:\n{}", out.stdout))
    }

    fn fails(out: &Run) {
        assert_eq!(
            out.code, 1,
            "doctor must exit 1 on a FAIL\n{}{}",
            out.stdout, out.stderr
        );
    }

    #[test]
    fn missing_qemu_fails_naming_the_package() {
        let Some(h) = Host::without(
            "missing_qemu_fails_naming_the_package",
            "qemu-system-x86_64",
        ) else {
            return;
        };
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "qemu"),
            "FAIL qemu: qemu-system-x86_64 not found on PATH; fix: sudo apt-get install qemu-system-x86"
        );
        // No firecracker either: the backend check says both are missing.
        assert!(
            line(&out, "firecracker").starts_with(
                "FAIL firecracker: firecracker not found on PATH, and the qemu backend lacks a binary"
            ),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn a_configured_qemu_bin_that_is_missing_fails_naming_the_key() {
        let Some(h) = Host::with(
            "a_configured_qemu_bin_that_is_missing_fails_naming_the_key",
            TOOLS,
        ) else {
            return;
        };
        h.config("vmm = \"qemu\"\nqemu_bin = \"/nonexistent/qemu\"\n");
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "qemu"),
            format!(
                "FAIL qemu: qemu_bin /nonexistent/qemu is not an executable file; \
                 fix: fix qemu_bin in {}, or remove it to search PATH",
                h.config_path().display()
            )
        );
    }

    #[test]
    fn a_bad_vmm_in_config_fails_listing_the_valid_values() {
        let Some(h) = Host::with("a_bad_vmm_in_config_fails_listing_the_valid_values", TOOLS)
        else {
            return;
        };
        h.config("\nvmm = \"xen\"\n");
        let out = h.doctor();
        fails(&out);
        let config = h.config_path().display().to_string();
        assert_eq!(
            line(&out, "config"),
            format!(
                "FAIL config: {config} line 2, column 7: unknown vmm \"xen\"; valid values: auto, \
                 firecracker, qemu; the other checks use the defaults; fix: edit {config} as the \
                 error says"
            )
        );
        // The rest still runs, on the defaults.
        assert!(
            line(&out, "backend").starts_with("PASS backend: vmm qemu (auto: "),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn missing_vhost_device_vsock_fails_with_the_cargo_install_only_under_vsock() {
        let Some(h) = Host::without(
            "missing_vhost_device_vsock_fails_with_the_cargo_install_only_under_vsock",
            "vhost-device-vsock",
        ) else {
            return;
        };
        // The default serial transport bridges the agent itself.
        let out = h.doctor();
        assert_eq!(
            line(&out, "vhost-device-vsock"),
            "PASS vhost-device-vsock: not needed: qemu_agent_transport = \"serial\" bridges the agent with banger-agent"
        );
        h.config("qemu_agent_transport = \"vsock\"\n");
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "vhost-device-vsock"),
            "FAIL vhost-device-vsock: vhost-device-vsock not found on PATH; fix: cargo install \
             vhost-device-vsock --locked, then put its bin/ on PATH or set vhost_device_vsock_bin"
        );
    }

    /// Catalogs whose default image and kernel come from `image_source`
    /// and `kernel_source` (TOML lines), named in config.
    fn catalogs(h: &Host, image_source: &str, kernel_source: &str) {
        let images = h.env.root().join("images.toml");
        std::fs::write(
            &images,
            format!(
                "[[image]]\nname = \"img\"\narch = \"x86_64\"\nkernel = \"kern\"\n\
                 description = \"test\"\ndefault = true\n{image_source}\n"
            ),
        )
        .unwrap();
        let kernels = h.env.root().join("kernels.toml");
        std::fs::write(
            &kernels,
            format!(
                "[[kernel]]\nname = \"kern\"\narch = \"x86_64\"\ndistro = \"debian\"\n\
                 version = \"6.12\"\ndescription = \"test\"\ndefault = true\n{kernel_source}\n"
            ),
        )
        .unwrap();
        h.config(&format!(
            "image_catalog_file = {:?}\nkernel_catalog_file = {:?}\n",
            images.display().to_string(),
            kernels.display().to_string()
        ));
    }

    #[test]
    fn missing_mmdebstrap_means_the_default_image_cannot_be_built() {
        let Some(h) = Host::without(
            "missing_mmdebstrap_means_the_default_image_cannot_be_built",
            "mmdebstrap",
        ) else {
            return;
        };
        catalogs(
            &h,
            "recipe = \"debian-bookworm\"",
            "recipe = \"debian-cloud\"",
        );
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "default image"),
            "FAIL default image: image img with kernel kern: the image is not local, and it \
             cannot be built here: mmdebstrap not found on PATH; fix: sudo apt-get install mmdebstrap"
        );
    }

    #[test]
    fn missing_apt_means_the_default_kernel_cannot_be_built() {
        let Some(h) = Host::without(
            "missing_apt_means_the_default_kernel_cannot_be_built",
            "apt-cache",
        ) else {
            return;
        };
        // The image is published, so only the kernel needs building.
        let digest = "0".repeat(64);
        catalogs(
            &h,
            &format!("oci = \"127.0.0.1:5000/banger/img@sha256:{digest}\""),
            "recipe = \"debian-cloud\"",
        );
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "default image"),
            "FAIL default image: image img with kernel kern: the kernel is not local, and it \
             cannot be built here: apt-cache not found on PATH; fix: sudo apt-get install apt"
        );
    }

    #[test]
    fn an_unreadable_catalog_file_fails_naming_the_key() {
        let Some(h) = Host::with("an_unreadable_catalog_file_fails_naming_the_key", TOOLS) else {
            return;
        };
        h.config("image_catalog_file = \"/nonexistent/images.toml\"\n");
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "default image"),
            format!(
                "FAIL default image: cannot read image_catalog_file /nonexistent/images.toml: \
                 No such file or directory (os error 2); fix: fix image_catalog_file in {}",
                h.config_path().display()
            )
        );
    }

    #[test]
    fn published_defaults_need_no_build_tools() {
        let Some(h) = Host::without("published_defaults_need_no_build_tools", "mmdebstrap") else {
            return;
        };
        let digest = "1".repeat(64);
        catalogs(
            &h,
            &format!("oci = \"127.0.0.1:5000/banger/img@sha256:{digest}\""),
            &format!("oci = \"127.0.0.1:5000/banger/kern@sha256:{digest}\""),
        );
        let out = h.doctor();
        assert_eq!(
            line(&out, "default image"),
            format!(
                "PASS default image: image img: pulled on first use from \
                 127.0.0.1:5000/banger/img@sha256:{digest}; kernel kern: pulled on first use \
                 from 127.0.0.1:5000/banger/kern@sha256:{digest}"
            )
        );
    }

    #[test]
    fn missing_ssh_client_fails() {
        let Some(h) = Host::without("missing_ssh_client_fails", "ssh") else {
            return;
        };
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "ssh client"),
            "FAIL ssh client: ssh not found on PATH: `vm run` and `vm ssh` use it; \
             fix: sudo apt-get install openssh-client"
        );
    }

    #[test]
    fn missing_nft_only_warns() {
        let Some(h) = Host::without("missing_nft_only_warns", "nft") else {
            return;
        };
        let out = h.doctor();
        assert_eq!(
            line(&out, "nft"),
            "WARN nft: nft not found on PATH: VMs with --nat cannot reach outside; \
             fix: sudo apt-get install nftables"
        );
    }

    #[test]
    fn firecracker_named_in_config_must_be_there_and_in_the_window() {
        let Some(h) = Host::with(
            "firecracker_named_in_config_must_be_there_and_in_the_window",
            TOOLS,
        ) else {
            return;
        };
        h.config("vmm = \"firecracker\"\n");
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "firecracker"),
            format!(
                "FAIL firecracker: firecracker not found on PATH, and vmm = \"firecracker\" in \
                 config; fix: install a Firecracker release 1.10-1.x from \
                 https://github.com/firecracker-microvm/firecracker/releases on PATH (or set \
                 firecracker_bin); or set vmm = \"auto\" in {}",
                h.config_path().display()
            )
        );
        let old = h.script("firecracker", "echo 'Firecracker v1.4.1'");
        let out = h.doctor();
        fails(&out);
        assert_eq!(
            line(&out, "firecracker"),
            format!(
                "FAIL firecracker: {} is version 1.4.1, outside the supported 1.10 to 1.x; \
                 fix: install a Firecracker release 1.10-1.x from \
                 https://github.com/firecracker-microvm/firecracker/releases on PATH (or set \
                 firecracker_bin)",
                old.display()
            )
        );
        h.script(
            "firecracker",
            "echo 'Firecracker v1.10.1'; echo; echo 'Supported ...'",
        );
        let out = h.doctor();
        assert!(
            line(&out, "firecracker").contains("Firecracker v1.10.1 at "),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn firecracker_is_optional_when_qemu_is_usable() {
        let Some(h) = Host::with("firecracker_is_optional_when_qemu_is_usable", TOOLS) else {
            return;
        };
        let out = h.doctor();
        assert!(
            line(&out, "firecracker")
                .starts_with("WARN firecracker: firecracker not found on PATH: the qemu backend is used; fix: optional: "),
            "{}",
            out.stdout
        );
        assert!(
            line(&out, "backend").starts_with(
                "PASS backend: vmm qemu (auto: firecracker not found on PATH), accel "
            ),
            "{}",
            out.stdout
        );
    }

    #[test]
    fn json_is_an_array_of_checks_and_no_daemon_is_started() {
        let Some(h) = Host::without(
            "json_is_an_array_of_checks_and_no_daemon_is_started",
            "qemu-system-x86_64",
        ) else {
            return;
        };
        let out = h.env.banger(&["doctor", "--json"]);
        fails(&out);
        let checks: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
        assert!(checks.len() >= 10, "{checks:?}");
        for c in &checks {
            let o = c.as_object().unwrap();
            let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
            keys.sort();
            assert_eq!(keys, ["check", "detail", "fix", "status"], "{c}");
            let status = o["status"].as_str().unwrap();
            assert!(["pass", "warn", "fail"].contains(&status), "{c}");
            if status == "fail" {
                assert!(o["fix"].is_string(), "a FAIL without a fix: {c}");
            }
        }
        let qemu = checks.iter().find(|c| c["check"] == "qemu").unwrap();
        assert_eq!(qemu["status"], "fail");
        assert_eq!(qemu["fix"], "sudo apt-get install qemu-system-x86");
        let daemon = checks.iter().find(|c| c["check"] == "daemon").unwrap();
        assert_eq!(daemon["status"], "warn");
        assert!(
            daemon["detail"]
                .as_str()
                .unwrap()
                .ends_with("; it starts on demand"),
            "{daemon}"
        );
        assert_eq!(h.env.daemon_pid(), None, "doctor started a daemon");
        assert!(!h.env.socket().exists(), "doctor started a daemon");
    }

    #[test]
    fn a_running_daemon_of_this_build_passes() {
        let Some(h) = Host::with("a_running_daemon_of_this_build_passes", TOOLS) else {
            return;
        };
        // The daemon needs no host networking for this.
        h.config("vmm = \"qemu\"\ndefault_caps = [\"work-disk\"]\n");
        h.env.banger(&["daemon", "start"]).ok();
        // What a CLI of another build asks before restarting it.
        let status = h.env.banger(&["daemon", "status", "--json"]).ok();
        let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(status["operations"], 0, "{status}");
        let out = h.doctor();
        // `banger` and `bangerd` built by separate cargo runs carry
        // separate stamps; doctor must then say so instead.
        let v = h.env.banger(&["version", "--json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&v.stdout).unwrap();
        let daemon = line(&out, "daemon");
        if v["client"] == v["daemon"] {
            assert!(
                daemon.starts_with("PASS daemon: running, same build ("),
                "{}",
                out.stdout
            );
        } else {
            eprintln!("note: banger and bangerd come from separate builds here");
            assert!(
                daemon.starts_with("WARN daemon: runs ")
                    && daemon.ends_with(
                        "; fix: banger daemon stop (the next command starts this build)"
                    ),
                "{}",
                out.stdout
            );
        }
    }

    #[test]
    fn a_host_with_every_tool_passes_as_root() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP a_host_with_every_tool_passes_as_root: not root");
            return;
        }
        if !has_debian_source(Path::new("/etc/apt")) {
            eprintln!("SKIP a_host_with_every_tool_passes_as_root: no Debian source in /etc/apt");
            return;
        }
        let Some(h) = Host::with("a_host_with_every_tool_passes_as_root", TOOLS) else {
            return;
        };
        // The default 53053 may be another test daemon's (the dns check
        // fails then, rightly): a port free now.
        let port = test_infra::guest_rig::free_udp_port();
        h.config(&format!("[network]\ndns_port = {port}\n"));
        let out = h.doctor();
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert!(!out.stdout.contains("FAIL"), "{}", out.stdout);
        assert_eq!(
            line(&out, "config"),
            format!("PASS config: {}", h.config_path().display())
        );
    }

    fn has_debian_source(apt: &Path) -> bool {
        let mut files = vec![apt.join("sources.list")];
        if let Ok(rd) = std::fs::read_dir(apt.join("sources.list.d")) {
            files.extend(
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
            );
        }
        files.iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| t.contains("debian") || t.contains("ubuntu"))
        })
    }
}
