//! Looking inside running guests through their agent.

use std::time::Duration;

use crate::lifecycle::{Lifecycle, OpError, blocking};
use banger_api::api::{PortView, StatsView};
use banger_api::model::VmState;
use banger_vmm::vsock::AgentClient;

impl Lifecycle {
    /// The guest's listening sockets, from its agent, as `name.vm:port`
    /// endpoints. A service listening on both IPv4 and IPv6 is listed once.
    pub async fn ports(&self, name: &str) -> Result<Vec<PortView>, OpError> {
        let (vm, uds) = self.running_agent(name, "to ask").await?;
        let listeners = blocking(move || AgentClient::new(&uds, Duration::from_secs(5)).ports())
            .await?
            .map_err(|e| OpError::Stage {
                stage: "agent_ports".to_string(),
                source: Box::new(e),
            })?;
        let mut ports = collapse(name, listeners);
        if let Some(ip) = self.guest_address(&vm.id) {
            label_web_services(ip, &mut ports).await;
        }
        Ok(ports)
    }
}

/// How long one probe of one port may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Marks TCP listeners reachable on the guest's address that speak HTTPS or
/// HTTP, probed in parallel from the host: HTTPS first (a TLS server
/// answers a plain request with garbage or a 400, never the other way
/// round).
async fn label_web_services(ip: std::net::Ipv4Addr, ports: &mut [PortView]) {
    let probes = ports.iter().map(|p| {
        let reachable = p.proto == "tcp" && !is_loopback(&p.address);
        let port = p.port;
        async move {
            if reachable {
                probe_web(std::net::SocketAddr::from((ip, port))).await
            } else {
                None
            }
        }
    });
    let found = futures_util::future::join_all(probes).await;
    for (p, kind) in ports.iter_mut().zip(found) {
        if let Some(kind) = kind {
            p.proto = kind.to_string();
        }
    }
}

fn is_loopback(address: &str) -> bool {
    address
        .parse::<std::net::IpAddr>()
        .map(|a| a.is_loopback())
        .unwrap_or(false)
}

/// `"https"` or `"http"` when the server at `addr` answers an HTTP request
/// that way (any status counts), else `None`.
pub(crate) async fn probe_web(addr: std::net::SocketAddr) -> Option<&'static str> {
    let client = reqwest::Client::builder()
        // We ask what the service speaks, not whether to trust it.
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT)
        .build()
        .ok()?;
    for scheme in ["https", "http"] {
        let url = format!("{scheme}://{addr}/");
        if client.get(&url).send().await.is_ok() {
            return Some(scheme);
        }
    }
    None
}

impl Lifecycle {
    /// A running VM and its agent's vsock socket, or the error that says
    /// which of the two is missing and what to do. `why` completes "has no
    /// guest agent …" in that error.
    pub(crate) async fn running_agent(
        &self,
        name: &str,
        why: &str,
    ) -> Result<(banger_api::model::VmRecord, std::path::PathBuf), OpError> {
        let vm = self.get(name).await?;
        if vm.state != VmState::Running {
            return Err(OpError::WrongState {
                name: name.to_string(),
                state: vm.state,
                hint: "start it first (`banger vm start`)",
            });
        }
        let Some(uds) = vm
            .machine
            .as_ref()
            .and_then(|m| m.vsock.as_ref())
            .map(|v| v.uds_path.clone())
        else {
            return Err(OpError::Invalid(format!(
                "VM {name} has no guest agent {why}; create VMs with --cap vsock-agent"
            )));
        };
        Ok((vm, uds))
    }

    /// CPU and memory of a running VM's VMM: from the VM's cgroup when it
    /// has one (every process of the VM: QEMU and its vsock backend), else
    /// the VMM process's `/proc`; and the guest's memory from its agent
    /// when it has one.
    pub async fn stats(&self, name: &str) -> Result<StatsView, OpError> {
        let vm = self.get(name).await?;
        let Some(process) = vm.vmm.clone().filter(|_| vm.state == VmState::Running) else {
            return Err(OpError::WrongState {
                name: name.to_string(),
                state: vm.state,
                hint: "start it first (`banger vm start`)",
            });
        };
        let pid = process.pid;
        let api_socket = process.api_socket.clone();
        let (cpu, rss) = blocking(move || vmm_usage(pid, &api_socket))
            .await?
            .ok_or_else(|| OpError::Invalid(format!("VMM process {pid} of {name} is gone")))?;
        let uds = vm
            .machine
            .as_ref()
            .and_then(|m| m.vsock.as_ref())
            .map(|v| v.uds_path.clone());
        let health = match uds {
            Some(uds) => {
                blocking(move || {
                    AgentClient::new(&uds, Duration::from_secs(5))
                        .healthz()
                        .ok()
                })
                .await?
            }
            None => None,
        };
        Ok(StatsView {
            pid,
            vmm_cpu_ms: cpu,
            vmm_rss_bytes: rss,
            guest_mem_total_kib: health.as_ref().map(|h| h.mem_total_kib),
            guest_mem_available_kib: health.as_ref().map(|h| h.mem_available_kib),
            guest_uptime_secs: health.map(|h| h.uptime_secs),
        })
    }
}

/// (CPU milliseconds, memory bytes) of the VM's VMM: the cgroup's figures
/// where it has them, `/proc/<pid>` for the rest. `None` once the VMM is
/// gone.
fn vmm_usage(pid: u32, api_socket: &std::path::Path) -> Option<(u64, u64)> {
    let (proc_cpu, proc_rss) = proc_usage(pid)?;
    let cg = banger_vmm::cgroup::usage_of(api_socket).unwrap_or_default();
    Some((
        cg.cpu_usec.map_or(proc_cpu, |us| us / 1000),
        cg.memory_bytes.unwrap_or(proc_rss),
    ))
}

/// (CPU milliseconds, RSS bytes) of `pid` from `/proc`.
fn proc_usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(((utime + stime) * 1000 / ticks.max(1), rss_kib * 1024))
}

fn collapse(name: &str, listeners: Vec<banger_guest_protocol::api::Listener>) -> Vec<PortView> {
    let mut out: Vec<PortView> = Vec::new();
    for l in listeners {
        let proto = match l.proto {
            banger_guest_protocol::api::Proto::Tcp => "tcp",
            banger_guest_protocol::api::Proto::Udp => "udp",
        };
        // 0.0.0.0 and :: for one process and port are one service.
        if out.iter().any(|p| {
            p.proto == proto && p.port == l.port && p.pid == l.pid && p.address != l.address
        }) {
            continue;
        }
        out.push(PortView {
            proto: proto.to_string(),
            endpoint: format!("{name}.vm:{}", l.port),
            address: l.address,
            port: l.port,
            pid: l.pid,
            process: l.process,
            command: l.command,
        });
    }
    out.sort_by(|a, b| (a.proto.as_str(), a.port).cmp(&(b.proto.as_str(), b.port)));
    out
}

#[cfg(test)]
mod tests {
    use banger_guest_protocol::api::{Listener, Proto};

    use super::{collapse, probe_web, proc_usage, vmm_usage};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Answers every connection on a loopback port with `reply` (after
    /// reading what the client sent first, unless `banner`).
    async fn serve(reply: &'static [u8], banner: bool) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    if !banner {
                        let _ = s.read(&mut buf).await;
                    }
                    let _ = s.write_all(reply).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        addr
    }

    /// A real TLS server (self-signed) that answers HTTP inside the tunnel.
    async fn serve_https() -> std::net::SocketAddr {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let mut buf = [0u8; 4096];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }

    #[test]
    fn stats_come_from_the_vms_cgroup_when_it_has_one() {
        use banger_vmm::cgroup::{CgroupDir, VmCgroup, record_path};
        let dir = tempfile::tempdir().unwrap();
        let (v2, v1) = (dir.path().join("unified"), dir.path().join("memory"));
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v2.join("cpu.stat"), "usage_usec 5000000\nuser_usec 1\n").unwrap();
        std::fs::write(v1.join("memory.usage_in_bytes"), "12345\n").unwrap();
        let sock = dir.path().join("vm.sock");
        let me = std::process::id();
        // No record: the VMM process's own /proc figures (its RSS).
        let (_, rss) = vmm_usage(me, &sock).unwrap();
        assert!(rss > 0 && rss != 12345, "{rss}");
        VmCgroup {
            dirs: vec![
                CgroupDir {
                    path: v2,
                    version: 2,
                    controllers: vec![],
                },
                CgroupDir {
                    path: v1,
                    version: 1,
                    controllers: vec!["memory".into()],
                },
            ],
            skipped: vec![],
        }
        .save(&record_path(&sock))
        .unwrap();
        assert_eq!(vmm_usage(me, &sock), Some((5000, 12345)));
        // A VMM that is gone has no stats, cgroup or not.
        assert_eq!(vmm_usage(u32::MAX - 1, &sock), None);
    }

    #[tokio::test]
    async fn probing_tells_https_http_and_other_services_apart() {
        let http = serve(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi", false).await;
        let ssh = serve(b"SSH-2.0-OpenSSH_9.2\r\n", true).await;
        let https = serve_https().await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(probe_web(https).await, Some("https"));
        assert_eq!(probe_web(http).await, Some("http"));
        assert_eq!(probe_web(ssh).await, None);
        assert_eq!(probe_web(closed).await, None);
    }

    #[test]
    fn proc_usage_reads_our_own_process() {
        // Burn a little CPU so the counters are not trivially zero.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let (cpu_ms, rss) = proc_usage(std::process::id()).unwrap();
        assert!(rss > 1 << 20, "rss {rss}");
        assert!(cpu_ms > 0, "cpu {cpu_ms}");
        assert_eq!(proc_usage(u32::MAX - 1), None);
    }

    fn l(proto: Proto, address: &str, port: u16, pid: u32) -> Listener {
        Listener {
            proto,
            address: address.into(),
            port,
            pid: Some(pid),
            process: Some("p".into()),
            command: None,
        }
    }

    #[test]
    fn dual_stack_listeners_collapse_and_endpoints_use_the_vm_name() {
        let out = collapse(
            "web",
            vec![
                l(Proto::Tcp, "0.0.0.0", 22, 10),
                l(Proto::Tcp, "::", 22, 10),
                l(Proto::Udp, "0.0.0.0", 53, 11),
                l(Proto::Tcp, "127.0.0.1", 8080, 12),
                l(Proto::Tcp, "::", 8080, 13),
            ],
        );
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|p| (p.proto.as_str(), p.endpoint.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("tcp", "web.vm:22"),
                ("tcp", "web.vm:8080"),
                ("tcp", "web.vm:8080"),
                ("udp", "web.vm:53")
            ],
            "different processes on one port stay separate"
        );
    }
}
