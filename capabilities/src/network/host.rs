//! [`HostNetwork`]: what the `network`, `nat` and `dns` capabilities share in
//! one daemon: settings, the address leases, the tap pool and the DNS records.
//! The `.vm` server itself is the `dns` capability's ([`crate::dns::serve`]).
//!
//! The `network` capability's factory makes it and places it in the
//! daemon's shared capability state, where `dns` and `nat` find it. Tests
//! build capabilities around their own.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use banger_api::config::NetworkConfig;
use banger_api::model::VmId;
use banger_core::lifecycle::render_chain;
use banger_core::store::Store;
use banger_host::hostops::{HostOps, HostOpsError};

use super::TapPool;
use super::identity::NetIdentity;
use super::leases::{Lease, LeaseError, Leases};
use crate::dns::server as dns;

/// A host networking step failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Leasing or releasing an address failed.
    #[error("Cannot manage the VM's address")]
    Lease(#[source] LeaseError),
    /// A privileged link or firewall operation failed.
    #[error("Host network operation failed")]
    Host(#[source] HostOpsError),
    /// The VM's NIC state file could not be read or written.
    #[error("Cannot access {}", path.display())]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The NIC a VM got at PrepareHost, kept in its directory
/// (`network.json`) so later hooks and Teardown see the same tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicState {
    /// Host tap device.
    pub tap: String,
    /// Guest address.
    pub ip: Ipv4Addr,
    /// Guest MAC, `06:00:..`.
    pub mac: String,
}

const NIC_STATE: &str = "network.json";

impl NicState {
    /// Reads the VM's NIC state, if it has one.
    pub fn load(vm_dir: &Path) -> Result<Option<NicState>, NetError> {
        let path = vm_dir.join(NIC_STATE);
        let err = |source| NetError::State {
            path: path.clone(),
            source,
        };
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| err(e.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Writes it by stage-then-rename.
    pub fn save(&self, vm_dir: &Path) -> Result<(), NetError> {
        let path = vm_dir.join(NIC_STATE);
        let tmp = vm_dir.join(format!(".{NIC_STATE}.tmp"));
        let err = |source| NetError::State {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec(self).map_err(|e| err(e.into()))?;
        std::fs::create_dir_all(vm_dir).map_err(err)?;
        std::fs::write(&tmp, body).map_err(err)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e)
        })
    }

    /// Removes it; a missing file is fine.
    pub fn remove(vm_dir: &Path) -> Result<(), NetError> {
        let path = vm_dir.join(NIC_STATE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetError::State { path, source }),
        }
    }
}

/// Host networking shared by every VM of one daemon.
#[derive(Debug)]
pub struct HostNetwork {
    /// `[network]` with the names this daemon derives filled in.
    config: NetworkConfig,
    identity: NetIdentity,
    leases: Leases,
    taps: TapPool,
    dns_records: PathBuf,
    /// Whether [`HostNetwork::ensure_up`] brought the bridge up in this
    /// daemon (guards the one-time work and what shutdown undoes).
    up: Mutex<bool>,
}

impl HostNetwork {
    /// Networking per `config`, leases in `store`, DNS records under
    /// `state_dir`, taps owned by `owner_uid` (the user running the VMM).
    /// Names `config` leaves unset are derived from `state_dir`
    /// ([`NetIdentity`]), so daemons with different state dirs never share
    /// a bridge, tap, subnet or nftables table.
    pub fn new(config: NetworkConfig, store: Arc<Store>, state_dir: &Path, owner_uid: u32) -> Self {
        let identity = NetIdentity::for_state_dir(state_dir);
        let config = identity.resolve(&config);
        let taps = TapPool::new(
            &identity.tap_prefix,
            &config.bridge,
            owner_uid,
            super::DEFAULT_WARM,
        );
        HostNetwork {
            config,
            identity,
            leases: Leases::new(store),
            taps,
            dns_records: dns::records_path(state_dir),
            up: Mutex::new(false),
        }
    }

    /// The settings, with derived names filled in.
    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// This daemon's network identity (tap prefix, derived names).
    pub fn identity(&self) -> &NetIdentity {
        &self.identity
    }

    /// The VMs' addresses.
    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The warm tap pool.
    pub fn taps(&self) -> &TapPool {
        &self.taps
    }

    /// The `.vm` records file the DNS server reads.
    pub fn dns_records(&self) -> &Path {
        &self.dns_records
    }

    /// The bridge's address (the subnet's gateway).
    pub fn gateway(&self) -> Ipv4Addr {
        self.config.subnet.gateway()
    }

    /// Creates the bridge with the gateway address if needed and brings it up.
    pub fn ensure_bridge(&self, host: &dyn HostOps) -> Result<(), NetError> {
        host.ensure_bridge(
            &self.config.bridge,
            self.gateway(),
            self.config.subnet.prefix(),
        )
        .map_err(NetError::Host)
    }

    /// Brings host networking up once per daemon ([`HostNetwork::bring_up`]),
    /// on first use: a daemon whose VMs never ask for networking never
    /// touches the host's links. Later calls only re-check the bridge, and
    /// outside the lock: concurrent creates must not queue behind each
    /// other's netlink round trips.
    pub fn ensure_up(&self, host: &dyn HostOps, running_taps: &[&str]) -> Result<(), NetError> {
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        if *up {
            drop(up);
            self.taps.mark_in_use(running_taps.iter().copied());
            return self.ensure_bridge(host);
        }
        self.bring_up_unlocked(host, running_taps)?;
        *up = true;
        Ok(())
    }

    /// Whether this daemon brought host networking up.
    pub fn is_up(&self) -> bool {
        *self.up.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Daemon startup: the bridge exists with its address and is up, taps
    /// that running VMs hold (`running_taps`) are not handed out again, the
    /// pool is warm, and `.vm` lookups on this host are routed to us when
    /// systemd-resolved runs. Only the bridge is essential; the rest warns.
    pub fn bring_up(&self, host: &dyn HostOps, running_taps: &[&str]) -> Result<(), NetError> {
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        self.bring_up_unlocked(host, running_taps)?;
        *up = true;
        Ok(())
    }

    fn bring_up_unlocked(&self, host: &dyn HostOps, running_taps: &[&str]) -> Result<(), NetError> {
        self.ensure_bridge(host)?;
        self.taps.mark_in_use(running_taps.iter().copied());
        if let Err(e) = self.taps.fill(host) {
            tracing::warn!("cannot pre-create taps: {}", render_chain(&e));
        }
        match host.route_dns_domain(&self.config.bridge, self.gateway(), dns::ZONE) {
            Ok(true) => tracing::info!(
                "systemd-resolved sends .{} lookups to {}",
                dns::ZONE,
                self.gateway()
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                "cannot route .{} through systemd-resolved: {}",
                dns::ZONE,
                render_chain(&e)
            ),
        }
        Ok(())
    }

    /// Daemon shutdown: deletes the warm taps and the resolved routing. The
    /// bridge and VMs' taps stay, because VMs outlive the daemon.
    pub fn shut_down(&self, host: &dyn HostOps) {
        let mut up = self.up.lock().unwrap_or_else(|e| e.into_inner());
        if !*up {
            return;
        }
        *up = false;
        if let Err(e) = self.taps.drain(host) {
            tracing::warn!("cannot delete warm taps: {}", render_chain(&e));
        }
        if let Err(e) = host.unroute_dns(&self.config.bridge) {
            tracing::warn!("cannot undo systemd-resolved routing: {}", render_chain(&e));
        }
    }

    /// The VM's lease: its existing one, or a new one (idempotent).
    pub fn lease(&self, vm: &VmId) -> Result<Lease, NetError> {
        self.leases
            .acquire(vm, &self.config.subnet)
            .map_err(NetError::Lease)
    }

    /// Frees the addresses of VMs that no longer exist (a delete
    /// interrupted by a crash); returns how many.
    pub fn prune_orphan_leases(&self) -> Result<usize, NetError> {
        self.leases.prune_orphans().map_err(NetError::Lease)
    }

    /// Frees the VM's address.
    pub fn release_lease(&self, vm: &VmId) -> Result<(), NetError> {
        self.leases.release(vm).map(|_| ()).map_err(NetError::Lease)
    }
}
