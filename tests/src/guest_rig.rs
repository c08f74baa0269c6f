//! Real guests for the end-to-end tests and benchmarks: an env on its own
//! bridge and subnet with DNS on a free loopback port and the guest recipes'
//! rootfs pulled from a loopback registry ([`rig`]), ssh into guests with
//! banger's key and the agent-reported host keys, a stand-in internet in a
//! network namespace ([`Internet`]), and the check that nothing is left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_guest_protocol::api::Proto;
use banger_vmm::vsock::AgentClient;

use crate::guest_artifacts::{GuestArtifacts, on_path};
use crate::registry::Registry;
use crate::{BangerEnv, Run, wait_until};

pub fn artifacts(test: &str, flavour: &str) -> Option<GuestArtifacts> {
    let skip = |why: &str| {
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    let a = match GuestArtifacts::find_flavour(flavour) {
        Ok(a) => a,
        Err(why) => return skip(&why),
    };
    if on_path("ssh").is_none() || on_path("ip").is_none() || on_path("nft").is_none() {
        return skip("ssh, ip or nft missing (apt-get install openssh-client iproute2 nftables)");
    }
    if !nix::unistd::Uid::effective().is_root() {
        return skip("needs root for the bridge, taps and NAT");
    }
    Some(a)
}

pub fn agent_ports(uds: &Path) -> Vec<(Proto, u16, Option<String>)> {
    AgentClient::new(uds, Duration::from_secs(10))
        .ports()
        .map(|ls| {
            ls.into_iter()
                .map(|l| (l.proto, l.port, l.process))
                .collect()
        })
        .unwrap_or_default()
}

/// The guests' bridge and subnet: not the defaults, so a real banger on
/// the same host is never disturbed.
pub const BRIDGE: &str = "bge2e0";
pub const SUBNET: &str = "10.213.0.0/24";
/// The group `system install` makes for the helper's socket in user mode.
pub const USER_GROUP: &str = "bge2egrp";
/// User mode's own bridge and subnet: a root rig (a bench, another
/// test binary) on the same host never shares addresses with it.
pub const USER_BRIDGE: &str = "bge2eu0";
pub const USER_SUBNET: &str = "10.216.0.0/24";

pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(cmd).args(args).output().unwrap()
}

/// A loopback UDP port free right now (e.g. for a daemon's `dns_port`).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A stand-in for the internet: a network namespace behind a veth pair,
/// with an HTTP server on `SERVER:8080`. It has no route back to the
/// guests' subnet, like the real internet has none to private addresses:
/// only NAT'ed traffic gets an answer.
#[derive(Debug)]
pub struct Internet {
    ns: String,
    host_if: String,
    server: String,
}

pub const GREETING: &str = "hello-from-the-internet";

impl Internet {
    pub fn start(tag: &str, net: u8) -> Internet {
        let pid = std::process::id() % 100_000;
        let ns = format!("bge2e-{pid}-{tag}");
        let host_if = format!("bgi{pid}{tag}");
        let peer = format!("bgo{pid}{tag}");
        let host_ip = format!("198.51.{net}.1/24");
        let server = format!("198.51.{net}.2");
        let ok = |args: &[&str]| {
            let out = run("ip", args);
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ok(&["netns", "add", &ns]);
        let internet = Internet {
            ns: ns.clone(),
            host_if: host_if.clone(),
            server: server.clone(),
        };
        ok(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ]);
        ok(&["link", "set", &peer, "netns", &ns]);
        ok(&["addr", "add", &host_ip, "dev", &host_if]);
        ok(&["link", "set", &host_if, "up"]);
        ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{server}/24"),
            "dev",
            &peer,
        ]);
        ok(&["-n", &ns, "link", "set", &peer, "up"]);
        ok(&["-n", &ns, "link", "set", "lo", "up"]);

        let (tx, rx) = std::sync::mpsc::channel();
        let ns_path = format!("/run/netns/{ns}");
        let addr = format!("{server}:8080");
        std::thread::spawn(move || {
            let f = std::fs::File::open(&ns_path).unwrap();
            // SAFETY: setns only moves this thread, which we own and which
            // only serves the test's HTTP answers, into the namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let listener = std::net::TcpListener::bind(&addr).unwrap();
            tx.send(()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { continue };
                use std::io::{Read, Write};
                let mut buf = [0u8; 2048];
                let _ = c.read(&mut buf);
                let _ = write!(
                    c,
                    "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{GREETING}",
                    GREETING.len()
                );
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        internet
    }

    /// A guest shell command fetching the server's page with bash
    /// alone, giving up after `secs`.
    pub fn fetch_cmd(&self, secs: u32) -> String {
        self.fetch_cmd_to(&self.server, secs)
    }

    /// The same fetch from `host`, a name the guest resolves to the server.
    pub fn fetch_cmd_to(&self, host: &str, secs: u32) -> String {
        format!(
            "timeout {secs} bash -c 'exec 3<>/dev/tcp/{host}/8080; \
             printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'"
        )
    }

    /// The server's address, inside the namespace.
    pub fn server(&self) -> std::net::Ipv4Addr {
        self.server
            .parse()
            .expect("Internet::start makes a dotted quad")
    }

    /// The namespace, for threads that serve more from inside it.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.ns))
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// A banger env set up for real guests on the e2e bridge, with the
/// image pushed to a loopback registry and pulled as `image`.
#[derive(Debug)]
pub struct Rig {
    /// The banger env (CLI, daemon, config) the guests run in.
    pub env: BangerEnv,
    /// Where its `.vm` DNS server listens on loopback.
    pub dns: std::net::SocketAddr,
    /// The guests' bridge and subnet ([`BRIDGE`], or [`USER_BRIDGE`] in
    /// user mode).
    pub bridge: &'static str,
    pub subnet: &'static str,
    _registry: Registry,
}

/// [`rig_as`] with the daemon as root unless `BANGER_E2E_AS_USER=1`.
pub fn rig(test: &str, image: &str, extra_config: &str) -> Option<(Rig, GuestArtifacts)> {
    rig_as(test, image, extra_config, crate::as_user::requested(false))
}

/// The rig, its daemon run as the unprivileged [`crate::as_user::USER`]
/// (with `banger-helper` installed for it) when `as_user`, else as root.
pub fn rig_as(
    test: &str,
    image: &str,
    extra_config: &str,
    as_user: bool,
) -> Option<(Rig, GuestArtifacts)> {
    let flavour = if image == "noinit" {
        "noinit"
    } else {
        "systemd"
    };
    let a = artifacts(test, flavour)?;
    let registry = Registry::start(test)?;
    let reference = registry.push_rootfs_tar(&format!("banger/debian:{image}"), &a.rootfs_tar);

    let mut env = BangerEnv::new();
    let dns_port = free_udp_port();
    std::fs::copy(
        crate::workspace_cdylib("banger-plugin-shared-mount"),
        env.plugins_dir().join("libbanger_plugin_shared_mount.so"),
    )
    .unwrap();
    // As the unprivileged user (BANGER_E2E_AS_USER=1), the daemon runs
    // copies of what it executes: the build tree and cache are root's.
    let (bridge, subnet) = if as_user {
        (USER_BRIDGE, USER_SUBNET)
    } else {
        (BRIDGE, SUBNET)
    };
    let (agent, vhost, kernel) = if as_user {
        let user = env.run_as_user(bridge, subnet, USER_GROUP);
        (
            user.copy_exe(&a.agent),
            user.copy_exe(&a.vhost),
            user.copy_dir(&a.kernel_dir, "kernel"),
        )
    } else {
        (a.agent.clone(), a.vhost.clone(), a.kernel_dir.clone())
    };
    env.write_config(&format!(
        "vmm = \"qemu\"\nqemu_accel = \"tcg\"\nagent_bin = {agent:?}\nagent_timeout_secs = 240\n\
         insecure_registries = [{:?}]\nvhost_device_vsock_bin = {vhost:?}\n\
         default_caps = [\"work-disk\", \"network\", \"dns\", \"file-sync\", \"vsock-agent\"]\n\
         {extra_config}\n\
         [network]\nbridge = {bridge:?}\nsubnet = {subnet:?}\ndns_port = {dns_port}\n",
        registry.host(),
    ));
    env.banger(&["kernel", "import", "fc", "--from", kernel.to_str().unwrap()])
        .ok();
    env.banger(&[
        "image",
        "pull",
        &reference,
        "--name",
        image,
        "--kernel-ref",
        "fc",
        "--size",
        "2G",
    ])
    .ok();
    let rig = Rig {
        env,
        dns: std::net::SocketAddr::from(([127, 0, 0, 1], dns_port)),
        bridge,
        subnet,
        _registry: registry,
    };
    Some((rig, a))
}

impl Rig {
    /// The first three octets of the guests' subnet and a dot ("10.213.0.").
    pub fn subnet_prefix(&self) -> &str {
        let end = self.subnet.rfind('.').map_or(0, |i| i + 1);
        &self.subnet[..end]
    }

    /// `vm create` that must succeed, with the console in the failure.
    pub fn create(&self, name: &str, args: &[&str]) -> banger_api::api::VmView {
        let out = self.try_create(name, args);
        let logs = self.env.banger(&["vm", "logs", name]).stdout;
        assert_eq!(
            out.code, 0,
            "create failed:\n{}\nconsole:\n{logs}",
            out.stderr
        );
        self.env.show(name)
    }

    /// `vm create` with the rig's shape, as [`Rig::create`], for a test
    /// that expects it to fail.
    pub fn try_create(&self, name: &str, args: &[&str]) -> Run {
        let mut all = vec![
            "vm",
            "create",
            "--name",
            name,
            "--memory",
            "1024",
            "--disk-size",
            "256M",
        ];
        all.extend_from_slice(args);
        self.env.banger(&all)
    }

    pub fn resolve(&self, name: &str) -> Vec<std::net::Ipv4Addr> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(crate::dns::query(self.dns, &format!("{name}.vm."), "A"))
            .1
    }

    /// Waits until sshd listens in the guest and its host keys exist;
    /// returns a known_hosts file pinning them for `NAME.vm`.
    pub fn pin_host_keys(&self, vm: &banger_api::api::VmView) -> PathBuf {
        let uds = vm.dir.join("vsock.sock");
        wait_until(
            Duration::from_secs(180),
            "sshd listens on 22 in the guest",
            || {
                agent_ports(&uds).iter().any(|(p, port, proc_)| {
                    *p == Proto::Tcp && *port == 22 && proc_.as_deref() == Some("sshd")
                })
            },
        );
        let keys = AgentClient::new(&uds, Duration::from_secs(10))
            .ssh_host_keys()
            .unwrap();
        assert!(!keys.is_empty(), "the agent reports host keys");
        let name = vm.record.name.as_str();
        let lines: String = keys
            .iter()
            .map(|k| {
                let mut f = k.public_key.split_whitespace();
                format!("{name}.vm {} {}\n", f.next().unwrap(), f.next().unwrap())
            })
            .collect();
        let path = self.env.root().join(format!("known_hosts-{name}"));
        std::fs::write(&path, lines).unwrap();
        path
    }

    /// `ssh` with banger's key to `root@ip`, checking the host key
    /// against `known_hosts` only (no trust on first use).
    pub fn ssh(
        &self,
        name: &str,
        ip: std::net::Ipv4Addr,
        known_hosts: &Path,
        cmd: &str,
    ) -> std::process::Output {
        let key = self.env.state_dir().join("ssh/id_ed25519");
        let args = [
            "-i",
            key.to_str().unwrap(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o",
            &format!("HostKeyAlias={name}.vm"),
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            &format!("root@{ip}"),
            cmd,
        ];
        let mut ssh = self.env.external(Path::new("ssh"));
        ssh.args(args);
        crate::output_within(ssh, crate::command_limit())
            .unwrap_or_else(|hung| panic!("ssh to {name} ({cmd}) {hung}"))
    }

    pub fn ssh_ok(
        &self,
        name: &str,
        ip: std::net::Ipv4Addr,
        known_hosts: &Path,
        cmd: &str,
    ) -> String {
        let out = self.ssh(name, ip, known_hosts, cmd);
        if !out.status.success() {
            let logs = self.env.banger(&["vm", "logs", name]).stdout;
            let tail: Vec<&str> = logs.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "ssh {cmd:?}: {}\nstdout: {}\nstderr: {}\nconsole tail:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail.join("\n")
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Deletes every VM, stops the daemon, and checks that nothing of
    /// them is left on the host: taps, nft rules, DNS records, VM dirs,
    /// processes.
    pub fn delete_all_and_check_clean(&self, vms: &[banger_api::api::VmView]) {
        for vm in vms {
            self.env
                .banger(&["vm", "delete", vm.record.name.as_str()])
                .ok();
        }
        self.env.banger(&["daemon", "stop"]).ok();
        let root = self.env.root().to_string_lossy().into_owned();
        wait_until(
            Duration::from_secs(30),
            "no process of this env is left",
            || own_processes(&root).is_empty(),
        );
        let links =
            String::from_utf8_lossy(&run("ip", &["-o", "link", "show"]).stdout).into_owned();
        // The daemon's taps carry the prefix derived from its state dir.
        let prefix =
            banger_api::net::identity::NetIdentity::for_state_dir(&self.env.state_dir()).tap_prefix;
        assert!(
            !links.lines().any(|l| l.contains(&prefix)),
            "taps {prefix}* left:\n{links}"
        );
        let rules =
            String::from_utf8_lossy(&run("nft", &["-a", "list", "ruleset"]).stdout).into_owned();
        for vm in vms {
            assert!(!vm.dir.exists(), "{} left", vm.dir.display());
            let tag = format!("banger:{}", vm.record.id);
            assert!(!rules.contains(&tag), "nft rules of {tag} left:\n{rules}");
        }
        let records = std::fs::read_to_string(self.env.state_dir().join("dns/records.json"))
            .unwrap_or_default();
        for vm in vms {
            assert!(
                !records.contains(&format!("\"{}\"", vm.record.name)),
                "DNS record left: {records}"
            );
        }
    }
}

impl Drop for Rig {
    /// A failed test still leaves the host clean: its VMs deleted (taps,
    /// rules, records), stray processes killed, and the test's bridge
    /// and its nft tables (which outlive daemons by design) removed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Nothing here may panic again (that would abort the run).
            let listed = self.env.banger(&["vm", "list", "--json"]).stdout;
            let vms: Vec<banger_api::api::VmView> =
                serde_json::from_str(&listed).unwrap_or_default();
            for vm in vms {
                let _ = self
                    .env
                    .banger(&["vm", "delete", "--force", vm.record.name.as_str()]);
            }
            let _ = self.env.banger(&["daemon", "stop"]);
            let root = self.env.root().to_string_lossy().into_owned();
            for pid in own_processes(&root) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        crate::remove_bridge(self.bridge);
    }
}

/// Pids whose command line mentions `root` (this env's paths).
pub fn own_processes(root: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(root))
                .unwrap_or(false)
        })
        .collect()
}
