//! End to end on a real guest: the Debian rootfs built by
//! `guest/rootfs/build` is pushed to a loopback registry, pulled with
//! `banger image pull`, and booted with the kernel built by
//! `guest/kernel/build` under QEMU (TCG) through the real CLI and daemon,
//! with banger's initramfs and agent. Then stop/start/delete.
//!
//! Needs (cached under `~/.cache/banger-ci`, built by the recipes):
//! `kernel-*/vmlinux`, `rootfs-systemd-*.tar`, the static agent from
//! `scripts/build-agent`, qemu-system-x86_64, vhost-device-vsock and
//! docker-registry. Missing pieces skip the test loudly, naming them.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use banger_core::model::VmState;
    use banger_core::vsock::AgentClient;
    use banger_guest_protocol::api::Proto;
    use test_infra::registry::{LayerBlob, Registry, oci_client_for, push_layers};
    use test_infra::{BangerEnv, pid_alive, target_dir, wait_until};

    fn cache() -> PathBuf {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/banger-ci")
    }

    /// The newest cache entry named `prefix*` that holds `inner` (or is a
    /// file when `inner` is empty).
    fn newest(prefix: &str, inner: &str) -> Option<PathBuf> {
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache())
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| e.path())
            .filter(|p| {
                if inner.is_empty() {
                    p.is_file()
                } else {
                    p.join(inner).is_file()
                }
            })
            .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
            .collect();
        found.sort();
        found.pop().map(|(_, p)| p)
    }

    fn on_path(bin: &str) -> Option<PathBuf> {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    }

    struct Artifacts {
        kernel_dir: PathBuf,
        rootfs_tar: PathBuf,
        agent: PathBuf,
        vhost: PathBuf,
    }

    fn artifacts(test: &str) -> Option<Artifacts> {
        let skip = |why: &str| {
            eprintln!("SKIPPED {test}: {why}");
            None
        };
        if on_path("qemu-system-x86_64").is_none() {
            return skip("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)");
        }
        let Some(vhost) = on_path("vhost-device-vsock").or_else(|| {
            let p = cache().join("tools/bin/vhost-device-vsock");
            p.is_file().then_some(p)
        }) else {
            return skip("vhost-device-vsock missing (scripts/test builds it)");
        };
        let Some(kernel_dir) = newest("kernel-", "vmlinux") else {
            return skip(
                "no guest kernel in ~/.cache/banger-ci/kernel-*/ (run guest/kernel/build)",
            );
        };
        let Some(rootfs_tar) = newest("rootfs-systemd-", "") else {
            return skip(
                "no rootfs in ~/.cache/banger-ci/rootfs-systemd-*.tar (run guest/rootfs/build)",
            );
        };
        let agent = target_dir()
            .parent()
            .map(|t| t.join("banger-agent"))
            .unwrap_or_default();
        if !agent.is_file() {
            return skip(&format!(
                "no static agent at {} (run scripts/build-agent)",
                agent.display()
            ));
        }
        Some(Artifacts {
            kernel_dir,
            rootfs_tar,
            agent,
            vhost,
        })
    }

    fn agent_ports(uds: &Path) -> Vec<(Proto, u16, Option<String>)> {
        AgentClient::new(uds, Duration::from_secs(10))
            .ports()
            .map(|ls| {
                ls.into_iter()
                    .map(|l| (l.proto, l.port, l.process))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn pulled_debian_image_boots_with_the_agent_and_survives_stop_start() {
        let test = "pulled_debian_image_boots_with_the_agent_and_survives_stop_start";
        let Some(a) = artifacts(test) else {
            return;
        };
        let Some(registry) = Registry::start(test) else {
            return;
        };
        let tar = std::fs::read(&a.rootfs_tar).unwrap();
        let reference = format!("{}/banger/debian:bookworm", registry.host());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = oci_client_for(&[registry.host()]);
            let r: oci_client::Reference = reference.parse().unwrap();
            push_layers(&client, &r, "amd64", &[LayerBlob::plain(tar)])
                .await
                .unwrap();
        });

        let env = BangerEnv::new();
        env.write_config(&format!(
            "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {:?}\nagent_timeout_secs = 240\n\
             insecure_registries = [{:?}]\nvhost_device_vsock_bin = {:?}\n",
            a.agent,
            registry.host(),
            a.vhost
        ));
        env.banger(&[
            "kernel",
            "import",
            "fc",
            "--from",
            a.kernel_dir.to_str().unwrap(),
        ])
        .ok();
        env.banger(&[
            "image",
            "pull",
            &reference,
            "--kernel-ref",
            "fc",
            "--size",
            "2G",
        ])
        .ok();

        let out = env.banger(&[
            "vm",
            "create",
            "--name",
            "g1",
            "--image",
            "debian-bookworm",
            "--cap",
            "vsock-agent",
            "--memory",
            "1024",
            "--disk-size",
            "256M",
        ]);
        let logs = env.banger(&["vm", "logs", "g1"]).stdout;
        assert_eq!(
            out.code, 0,
            "create failed:\n{}\nconsole:\n{logs}",
            out.stderr
        );
        let vm = env.show("g1");
        assert_eq!(vm.record.state, VmState::Running);
        let qemu_pid = vm.record.vmm.as_ref().unwrap().pid as i32;
        // The agent ran as /init, applied the config drive and handed over
        // to the image's systemd.
        for line in [
            "banger-agent: read config drive",
            "banger-agent: hostname g1",
            "banger-agent: mounted /dev/vdb on /root",
            "banger-agent: switched root",
            "banger-agent: exec /sbin/init",
        ] {
            assert!(logs.contains(line), "console lacks {line:?}:\n{logs}");
        }
        // The agent answers through the vsock and sees the guest's sshd.
        let uds = vm.dir.join("vsock.sock");
        let health = AgentClient::new(&uds, Duration::from_secs(10))
            .healthz()
            .unwrap();
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
        wait_until(
            Duration::from_secs(120),
            "sshd listens on 22 in the guest",
            || {
                agent_ports(&uds).iter().any(|(p, port, proc_)| {
                    *p == Proto::Tcp && *port == 22 && proc_.as_deref() == Some("sshd")
                })
            },
        );

        // `vm ports` shows it as NAME.vm:PORT, once although sshd listens on
        // both 0.0.0.0 and ::.
        let ports = env.banger(&["vm", "ports", "g1"]).ok().stdout;
        let ssh: Vec<&str> = ports.lines().filter(|l| l.contains("g1.vm:22")).collect();
        assert_eq!(ssh.len(), 1, "{ports}");
        assert!(
            ssh[0].starts_with("tcp") && ssh[0].contains("sshd"),
            "{ports}"
        );

        let stats: banger_core::api::StatsView =
            serde_json::from_str(&env.banger(&["vm", "stats", "g1", "--json"]).ok().stdout)
                .unwrap();
        assert_eq!(stats.pid as i32, qemu_pid);
        let total = stats
            .guest_mem_total_kib
            .expect("the agent reports guest memory");
        assert!(
            total > 512 * 1024 && total <= 1024 * 1024,
            "guest sees its 1024 MiB: {total} KiB"
        );

        env.banger(&["vm", "stop", "g1"]).ok();
        let refused = env.banger(&["vm", "ports", "g1"]).failed();
        assert!(refused.stderr.contains("start it first"), "{refused:?}");
        wait_until(Duration::from_secs(30), "qemu exits", || {
            !pid_alive(qemu_pid)
        });
        env.banger(&["vm", "start", "g1"]).ok();
        let again = env.show("g1");
        assert_eq!(again.record.state, VmState::Running);
        assert!(
            AgentClient::new(&uds, Duration::from_secs(10))
                .healthz()
                .is_ok()
        );

        let pid = again.record.vmm.as_ref().unwrap().pid as i32;
        env.banger(&["vm", "delete", "g1"]).ok();
        wait_until(Duration::from_secs(30), "qemu exits", || !pid_alive(pid));
        assert!(!vm.dir.exists(), "the VM dir is gone");
    }
}
