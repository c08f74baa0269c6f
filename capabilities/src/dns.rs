//! `dns`: `<name>.vm` resolves to the VM's address while it runs.
//! PrepareHost publishes the record to the daemon's DNS server (through its
//! records file), on a thread of its own that PostStart waits for; every
//! Teardown withdraws it. The server itself, which also
//! forwards names outside `.vm` to the host's resolvers, is this
//! capability's too: `daemon_start` starts it on `127.0.0.1:dns_port` and
//! on the bridge address (port 53), `daemon_stop` stops it. An address it
//! could not take (another daemon holds it) is a warning in every VM's
//! PrepareHost, naming the holder and the config key that moves this
//! daemon off it: otherwise `.vm` names silently resolve from the other one.

use std::sync::{Arc, Mutex};

use banger_api::model::CapOptions;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, DaemonCtx, HookCtx, TeardownReason,
};

use self::server as dns;
use crate::deferred::Deferred;
use crate::network::{HostNetwork, host_network, no_options};
use banger_host::hostops::HostOps;

pub mod server;

/// Name used with `--cap`.
pub const NAME: &str = "dns";

/// The DNS capability, on the `network` capability's host networking.
#[derive(Debug)]
pub struct Dns {
    net: Arc<HostNetwork>,
    /// Each starting VM's record, published beside the hooks between its
    /// `prepare_host` and its `post_start`, which waits for it: the name
    /// resolves once the VM is started.
    records: Deferred,
    server: Mutex<Option<dns::DnsServer>>,
    /// Why each listen address the server does not serve is not served.
    unserved: Mutex<Vec<String>>,
}

impl Dns {
    /// Waits until `vm`'s record, which `prepare_host` may leave being
    /// published, is in the records file (what `post_start` does).
    pub fn settle(&self, vm: &banger_api::model::VmId) -> Result<(), CapError> {
        self.records.wait(vm)
    }

    /// A capability around `net`.
    pub fn with(net: Arc<HostNetwork>) -> Self {
        Dns {
            net,
            records: Deferred::new("dns"),
            server: Mutex::new(None),
            unserved: Mutex::new(Vec::new()),
        }
    }
}

/// Starts the `.vm` DNS server on `127.0.0.1:dns_port` and on the bridge
/// address, port 53, for guests and systemd-resolved. The bridge address
/// is bound before the bridge exists (`IP_FREEBIND`); a daemon without the
/// right to bind port 53 gets the sockets from `host` (banger-helper,
/// [`bridge_sockets`]). A listener that cannot bind (port taken, no helper)
/// is a warning; only a server with no listener at all is an error.
pub async fn serve(net: &HostNetwork, host: &dyn HostOps) -> Result<dns::DnsServer, dns::DnsError> {
    serve_reporting(net, host).await.0
}

/// [`serve`], also returning a warning for each address not served: what
/// holds it (or why it failed) and the config key that avoids it.
async fn serve_reporting(
    net: &HostNetwork,
    host: &dyn HostOps,
) -> (Result<dns::DnsServer, dns::DnsError>, Vec<String>) {
    let loopback =
        std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, net.config().dns_port));
    let bridge = std::net::SocketAddr::from((net.gateway(), 53));
    let upstream = dns::Upstream::from_config(net.config().dns_upstream.as_deref());
    let mut server =
        match dns::DnsServer::start(net.dns_records().to_path_buf(), &[], upstream).await {
            Ok(s) => s,
            Err(e) => return (Err(e), Vec::new()),
        };
    let mut last = None;
    let mut unserved = Vec::new();
    for addr in [loopback, bridge] {
        let mut added = server.add_listener(addr).await;
        if addr == bridge {
            added = bridge_sockets(&mut server, host, net.gateway(), added).await;
        }
        if let Err(e) = added {
            let warning = not_served(addr, addr == loopback, &e);
            tracing::warn!("{warning}");
            unserved.push(warning);
            last = Some(e);
        }
    }
    match last {
        Some(e) if server.local_addrs().is_empty() => (Err(e), unserved),
        _ => (Ok(server), unserved),
    }
}

/// The warning for listen address `addr` that failed with `e`: who holds
/// it when it is taken, and which setting moves this daemon elsewhere.
fn not_served(addr: std::net::SocketAddr, loopback: bool, e: &dns::DnsError) -> String {
    let in_use = matches!(e, dns::DnsError::Bind { source, .. }
        if source.kind() == std::io::ErrorKind::AddrInUse);
    let holders = match addr {
        std::net::SocketAddr::V4(a) if in_use => banger_api::net::holder::udp_holders(a),
        _ => Vec::new(),
    };
    let why = if holders.is_empty() {
        banger_core::lifecycle::render_chain(e)
    } else {
        let names: Vec<String> = holders.iter().map(ToString::to_string).collect();
        format!(
            "it is held by {} (another banger daemon?), so .{} names may resolve from it",
            names.join(", "),
            dns::ZONE
        )
    };
    let fix = if loopback {
        "set dns_port in [network] of config.toml to a free port"
    } else {
        "set subnet in [network] of config.toml to a free one"
    };
    format!(
        "no .{} DNS on {addr}: {why}; {fix}, then restart the daemon (`banger daemon stop`)",
        dns::ZONE
    )
}

/// After binding the bridge address ourselves ended in `bound`: when
/// that was refused for want of privilege (a user daemon and port 53),
/// asks `host` for the sockets instead; the helper binds exactly this
/// user's gateway. Any other outcome is kept.
async fn bridge_sockets(
    server: &mut dns::DnsServer,
    host: &dyn HostOps,
    gateway: std::net::Ipv4Addr,
    bound: Result<std::net::SocketAddr, dns::DnsError>,
) -> Result<std::net::SocketAddr, dns::DnsError> {
    let denied = matches!(&bound, Err(dns::DnsError::Bind { source, .. })
        if source.kind() == std::io::ErrorKind::PermissionDenied);
    if !denied {
        return bound;
    }
    match host.bind_dns(gateway) {
        Ok(s) => server.add_bound(s.udp, s.tcp).await,
        Err(e) => {
            tracing::warn!(
                "no sockets on {gateway}:53 from the host operations either: {}",
                banger_core::lifecycle::render_chain(&e)
            );
            bound
        }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(Dns::with(host_network(env))))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for Dns {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "<name>.vm resolves to the VM's address (daemon DNS server on loopback and the bridge, which forwards other names upstream)"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        no_options(NAME, options)
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let net = &self.net;
        let lease = net
            .lease(&ctx.vm.id)
            .map_err(|e| CapError::with("Cannot lease an address", e))?;
        let (path, name) = (net.dns_records().to_path_buf(), ctx.vm.name.to_string());
        self.records.start(&ctx.vm.id, move || {
            dns::set_record(&path, &name, Some(lease.ip))
                .map_err(|e| CapError::with("Cannot publish the DNS record", e))
        })?;
        ctx.log
            .info(&format!("{}.{} -> {}", ctx.vm.name, dns::ZONE, lease.ip));
        for warning in self
            .unserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            ctx.log.warn(warning);
        }
        Ok(())
    }

    /// A port another process holds costs only name resolution, so the
    /// daemon logs the failure and serves anyway.
    /// The records file is first rewritten from the running VMs with this
    /// capability and their leases (kept in the store): a stopped or
    /// deleted VM's name stops resolving (a crash before its teardown),
    /// and a file a power loss damaged (writes are not synced) is whole
    /// again before the server reads it.
    fn daemon_start(&self, ctx: &DaemonCtx<'_>) -> Result<(), CapError> {
        let mut records = std::collections::BTreeMap::new();
        for r in ctx.running {
            if !r.vm.caps.iter().any(|c| c.name == NAME) {
                continue;
            }
            match self.net.leases().get(&r.vm.id) {
                Ok(Some(lease)) => {
                    records.insert(r.vm.name.as_str().to_ascii_lowercase(), lease.ip);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(vm = %r.vm.name, "no .{} record: {e}", dns::ZONE),
            }
        }
        match dns::replace_records(self.net.dns_records(), records) {
            Ok(gone) if gone.is_empty() => {}
            Ok(gone) => tracing::info!(
                "removed the .{} records of VMs not running: {}",
                dns::ZONE,
                gone.join(", ")
            ),
            Err(e) => tracing::warn!(
                "cannot sweep .{} records: {}",
                dns::ZONE,
                banger_core::lifecycle::render_chain(&e)
            ),
        }
        let (served, unserved) = ctx.runtime.block_on(serve_reporting(&self.net, ctx.host));
        *self.unserved.lock().unwrap_or_else(|e| e.into_inner()) = unserved;
        let server = served.map_err(|e| CapError::with(format!("No .{} DNS", dns::ZONE), e))?;
        tracing::info!(addrs = ?server.local_addrs(), "serving .{} DNS", dns::ZONE);
        let old = self
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(server);
        if let Some(old) = old {
            ctx.runtime.block_on(old.shutdown());
        }
        Ok(())
    }

    fn daemon_stop(&self, ctx: &DaemonCtx<'_>) {
        let server = self.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            ctx.runtime.block_on(server.shutdown());
        }
    }

    fn post_start(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        self.settle(&ctx.vm.id)
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        let net = &self.net;
        // A start rolled back before post_start may still be publishing
        // the record: it is withdrawn after, whatever became of it.
        let _ = self.records.wait(&ctx.vm.id);
        dns::set_record(net.dns_records(), ctx.vm.name.as_str(), None)
            .map_err(|e| CapError::with("Cannot withdraw the DNS record", e))?;
        if reason == TeardownReason::Delete {
            net.release_lease(&ctx.vm.id)
                .map_err(|e| CapError::with("Cannot free the VM's address", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_host::hostops::RecordingHostOps;

    fn refused(kind: std::io::ErrorKind) -> Result<std::net::SocketAddr, dns::DnsError> {
        Err(dns::DnsError::Bind {
            addr: "10.9.0.1:53".parse().unwrap(),
            source: kind.into(),
        })
    }

    #[tokio::test]
    async fn a_bind_refused_for_privilege_takes_the_sockets_from_the_host_operations() {
        let dir = tempfile::tempdir().unwrap();
        let records = dns::records_path(dir.path());
        let mut server = dns::DnsServer::start(records, &[], dns::Upstream::Servers(vec![]))
            .await
            .unwrap();
        let host = RecordingHostOps::default();
        let gw = "10.9.0.1".parse().unwrap();
        let got = bridge_sockets(
            &mut server,
            &host,
            gw,
            refused(std::io::ErrorKind::PermissionDenied),
        )
        .await
        .unwrap();
        // The recording ops bind loopback: the server now serves there.
        assert!(got.ip().is_loopback(), "{got}");
        assert_eq!(server.local_addrs(), [got]);
        assert_eq!(host.calls(), ["bind_dns 10.9.0.1"]);
        // Any other failure (the port is taken) is kept, and nobody is asked.
        let host = RecordingHostOps::default();
        let kept = bridge_sockets(
            &mut server,
            &host,
            gw,
            refused(std::io::ErrorKind::AddrInUse),
        )
        .await;
        assert!(kept.is_err());
        assert!(host.calls().is_empty());
        assert_eq!(server.local_addrs().len(), 1);
        server.shutdown().await;
    }
}
