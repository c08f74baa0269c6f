//! `network`: every VM's link to the host. PrepareHost leases the VM's
//! stable IP and MAC and takes a warm tap on the bridge; ConfigureMachine
//! adds the NIC; GuestConfig tells the agent its address, gateway, MTU and
//! nameserver (the bridge, where the `.vm` DNS server listens). Stop returns
//! the tap; delete also frees the address.
//!
//! Every guest is fenced in (see `docs/networking.md`): PrepareHost installs
//! anti-spoofing rules for its tap (only its own MAC and IPv4 leave it; on a
//! thread of its own that GuestConfig waits for, so before the VMM starts), and
//! the bridge's base rules drop guest-to-guest traffic and everything a
//! guest sends to the host except DNS. `--cap network:peers=true` on two
//! VMs lets those two talk to each other.
//!
//! It owns host networking ([`HostNetwork`]: bridge, tap pool, leases). Its
//! factory makes it and places it in the daemon's shared state (`CapEnv::shared`), where
//! `dns` and `nat` find the same value ([`host_network`]). At daemon start
//! it frees the leases of VMs that no longer exist and brings networking up
//! around the taps of VMs that kept running; otherwise the bridge is made
//! on the first VM that needs it. At daemon stop it deletes the warm taps.

use std::net::Ipv4Addr;
use std::sync::Arc;

use banger_api::guest::{GuestConfig, GuestNetwork};
use banger_api::machine::{MachineSpec, Nic};
use banger_api::model::{CapOptions, VmId, VmRecord};
use banger_api::net::MacAddr;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, DaemonCtx, HookCtx, TeardownReason,
};
use banger_host::hostops::{GuestPort, HostOps};

use crate::deferred::Deferred;

mod host;
pub mod identity;
pub mod leases;
mod taps;

pub use host::{HostNetwork, NetError, NicState};
pub use identity::NetIdentity;
pub use taps::{AdoptError, DEFAULT_WARM, ForeignTap, TapPool};

/// Name used with `--cap`.
pub const NAME: &str = "network";
/// NIC id in the machine spec and the guest config.
pub const NIC_ID: &str = "eth0";
/// Guest interface MTU (the bridge's, untagged Ethernet).
pub const MTU: u32 = 1500;

/// The network capability.
#[derive(Debug)]
pub struct Network {
    net: Arc<HostNetwork>,
    /// Each starting VM's guard rules, installed beside the hooks between
    /// its `prepare_host` and its `guest_config`, which waits for them:
    /// the VMM, launched after every `guest_config`, never sees its tap
    /// unguarded.
    guards: Deferred,
}

impl Network {
    /// A capability around `net`.
    pub fn with(net: Arc<HostNetwork>) -> Self {
        Network {
            net,
            guards: Deferred::new("guard"),
        }
    }

    /// Waits until `vm`'s guard rules, which `prepare_host` may leave being
    /// installed, are in place (what `guest_config` does first).
    pub fn settle(&self, vm: &VmId) -> Result<(), CapError> {
        self.guards.wait(vm)
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(Network::with(host_network(env))))
}

inventory::submit! { BuiltinCapability { make } }

/// The daemon's host networking, from `env`'s shared state: made from
/// `[network]` of config.toml by whichever of network/dns/nat asks first.
/// Taps are owned by the user running the daemon (and the VMMs); the tap
/// pool is topped up in the background.
pub fn host_network(env: &CapEnv<'_>) -> Arc<HostNetwork> {
    env.shared.get_or_insert_with(|| {
        let net = HostNetwork::new(
            env.config.network.clone(),
            env.store.clone(),
            &env.paths.state_dir,
            nix::unistd::getuid().as_raw(),
        );
        net.taps().refill_in_background(env.host.clone());
        net
    })
}

pub(crate) fn no_options(name: &str, options: &CapOptions) -> Result<(), CapError> {
    match options.keys().next() {
        None => Ok(()),
        Some(k) => Err(CapError::InvalidOptions(format!(
            "unknown option {k:?}: {name} takes no options; configure it in [network] of config.toml"
        ))),
    }
}

/// The `peers` option: `true` lets this VM talk to other VMs that also
/// set it; the default (`false`) keeps it alone on the bridge.
pub fn peers_option(options: &CapOptions) -> Result<bool, CapError> {
    for k in options.keys() {
        if k != "peers" {
            return Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: {NAME} takes peers=true|false; configure the rest in [network] of config.toml"
            )));
        }
    }
    match options.get("peers").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(CapError::InvalidOptions(format!(
            "peers={v:?}: use peers=true (talk to other VMs with peers=true) or peers=false"
        ))),
    }
}

/// The network options `vm` was created with (none if it has no network).
fn vm_peers(vm: &VmRecord) -> bool {
    vm.caps
        .iter()
        .find(|c| c.name == NAME)
        .map(|c| peers_option(&c.options).unwrap_or(false))
        .unwrap_or(false)
}

/// Installs the VM's anti-spoofing (and peer) rules for `state`.
fn guard(
    bridge: &str,
    host: &dyn HostOps,
    vm: &VmId,
    state: &NicState,
    peers: bool,
) -> Result<(), CapError> {
    let mac: MacAddr = state
        .mac
        .parse()
        .map_err(|e| CapError::with("The VM's network state has a bad MAC", e))?;
    host.add_guest(
        vm.as_str(),
        &GuestPort {
            bridge: bridge.to_string(),
            tap: state.tap.clone(),
            ip: state.ip,
            mac,
            peers,
        },
    )
    .map_err(|e| CapError::with("Cannot install the VM's network isolation rules", e))
}

fn nic_state(ctx: &HookCtx<'_>) -> Result<NicState, CapError> {
    NicState::load(ctx.vm_dir)
        .map_err(|e| CapError::with("Cannot read the VM's network state", e))?
        .ok_or_else(|| CapError::msg("The VM has no tap: network's prepare_host did not run"))
}

impl Network {
    /// Daemon startup: removes what a crash left behind and no running VM
    /// owns: guard and NAT rules in this daemon's tables, and taps with this
    /// daemon's prefix (warm ones included: the pool is refilled on use).
    /// Only ever this daemon's names; failures are warnings.
    fn sweep(&self, ctx: &DaemonCtx<'_>, running: &[(&VmRecord, NicState)]) {
        let bridge = &self.net.config().bridge;
        let alive: std::collections::HashSet<&str> =
            ctx.running.iter().map(|r| r.vm.id.as_str()).collect();
        let warn = |what: &str, e: &(dyn std::error::Error + 'static)| {
            tracing::warn!(
                "cannot sweep {what}: {}",
                banger_core::lifecycle::render_chain(e)
            )
        };
        match ctx.host.list_guest_rules(bridge) {
            Ok(ids) => {
                for id in ids.iter().filter(|id| !alive.contains(id.as_str())) {
                    tracing::info!("removing the network rules of VM {id}, which is not running");
                    if let Err(e) = ctx.host.remove_guest(id) {
                        warn("guard rules", &e);
                    }
                    if let Err(e) = ctx.host.remove_nat(id) {
                        warn("NAT rules", &e);
                    }
                }
            }
            Err(e) => warn("network rules", &e),
        }
        let taps = self.net.taps();
        match ctx.host.list_links(taps.prefix()) {
            Ok(links) => {
                let held: std::collections::HashSet<&str> =
                    running.iter().map(|(_, s)| s.tap.as_str()).collect();
                for link in links
                    .iter()
                    .filter(|l| taps.index_of(l).is_some() && !held.contains(l.as_str()))
                {
                    tracing::info!("deleting tap {link}, which no running VM holds");
                    if let Err(e) = ctx.host.delete_link(link) {
                        warn("taps", &e);
                    }
                }
            }
            Err(e) => warn("taps", &e),
        }
    }
}

impl Capability for Network {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Bridge networking: a stable IP and MAC per VM, a tap on the bridge, address and resolver in the guest"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        peers_option(options).map(|_| ())
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let net = &self.net;
        let peers = peers_option(ctx.options)?;
        net.ensure_up(ctx.host, &[])
            .map_err(|e| CapError::with("Cannot set up the bridge", e))?;
        let lease = net
            .lease(&ctx.vm.id)
            .map_err(|e| CapError::with("Cannot lease an address", e))?;
        let previous = NicState::load(ctx.vm_dir)
            .map_err(|e| CapError::with("Cannot read the VM's network state", e))?;
        let reused = match previous {
            // A start after an unclean stop: keep the same tap, if it is
            // this daemon's (an older banger's tap is left alone).
            Some(s) => match net.taps().adopt(ctx.host, &s.tap) {
                Ok(()) => Some(s.tap),
                Err(AdoptError::Foreign(e)) => {
                    ctx.log.warn(&e.to_string());
                    None
                }
                Err(AdoptError::Host(e)) => {
                    return Err(CapError::with("Cannot reuse the VM's tap", e));
                }
            },
            None => None,
        };
        let tap = match reused {
            Some(t) => t,
            None => net
                .taps()
                .acquire(ctx.host)
                .map_err(|e| CapError::with("Cannot get a tap device", e))?,
        };
        let state = NicState {
            tap: tap.clone(),
            ip: lease.ip,
            mac: lease.mac.to_string(),
        };
        if let Err(e) = state.save(ctx.vm_dir) {
            let _ = net.taps().release(ctx.host, &tap);
            return Err(CapError::with("Cannot record the VM's tap", e));
        }
        // The rules go on before the VMM can send anything through the tap:
        // beside the hooks up to this VM's guest_config, which waits for
        // them, when the host operations can be shared with a thread.
        let bridge = net.config().bridge.clone();
        let guarded = match ctx.host.shared() {
            Some(host) => {
                let (vm, state) = (ctx.vm.id.clone(), state.clone());
                self.guards.start(&ctx.vm.id, move || {
                    guard(&bridge, host.as_ref(), &vm, &state, peers)
                })
            }
            None => guard(&bridge, ctx.host, &ctx.vm.id, &state, peers),
        };
        if let Err(e) = guarded {
            let _ = ctx.host.remove_guest(ctx.vm.id.as_str());
            let _ = net.taps().release(ctx.host, &tap);
            let _ = NicState::remove(ctx.vm_dir);
            return Err(e);
        }
        ctx.log.info(&format!("address {} on {tap}", lease.ip));
        Ok(())
    }

    fn configure_machine(
        &self,
        ctx: &HookCtx<'_>,
        machine: &mut MachineSpec,
    ) -> Result<(), CapError> {
        let state = nic_state(ctx)?;
        machine
            .add_nic(Nic {
                id: NIC_ID.to_string(),
                tap: state.tap,
                mac: state.mac,
            })
            .map_err(|e| CapError::with("Cannot attach the network interface", e))
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let net = &self.net;
        self.settle(&ctx.vm.id)?;
        let state = nic_state(ctx)?;
        if guest.network.iter().any(|n| n.nic_id == NIC_ID) {
            return Err(CapError::msg(format!(
                "Another capability already configures {NIC_ID}"
            )));
        }
        let gateway = net.gateway().to_string();
        guest.network.push(GuestNetwork {
            nic_id: NIC_ID.to_string(),
            address: format!("{}/{}", state.ip, net.config().subnet.prefix()),
            gateway: Some(gateway.clone()),
            mtu: Some(MTU),
            nameservers: vec![gateway],
        });
        Ok(())
    }

    fn guest_address(&self, vm: &VmId) -> Option<Ipv4Addr> {
        match self.net.leases().get(vm) {
            Ok(lease) => lease.map(|l| l.ip),
            Err(e) => {
                tracing::debug!(
                    "cannot read the address of VM {vm}: {}",
                    banger_core::lifecycle::render_chain(&e)
                );
                None
            }
        }
    }

    fn daemon_start(&self, ctx: &DaemonCtx<'_>) -> Result<(), CapError> {
        match self.net.prune_orphan_leases() {
            Ok(0) => {}
            Ok(n) => tracing::info!("freed {n} address(es) of VMs that no longer exist"),
            Err(e) => tracing::warn!(
                "cannot prune leases: {}",
                banger_core::lifecycle::render_chain(&e)
            ),
        }
        // VMs that kept running while no daemon ran hold taps: bring
        // networking up around them so their taps are not handed out again,
        // and make sure their isolation rules are there (a host reboot of
        // nftables, or VMs started by a banger without them).
        let running: Vec<(&VmRecord, NicState)> = ctx
            .running
            .iter()
            .filter_map(|r| Some((&r.vm, NicState::load(&r.vm_dir).ok().flatten()?)))
            .collect();
        self.sweep(ctx, &running);
        if running.is_empty() {
            return Ok(());
        }
        let refs: Vec<&str> = running.iter().map(|(_, s)| s.tap.as_str()).collect();
        self.net
            .ensure_up(ctx.host, &refs)
            .map_err(|e| CapError::with("Cannot bring host networking up", e))?;
        for (vm, state) in &running {
            let bridge = &self.net.config().bridge;
            if let Err(e) = guard(bridge, ctx.host, &vm.id, state, vm_peers(vm)) {
                tracing::warn!(
                    "VM {}: {}",
                    vm.name,
                    banger_core::lifecycle::render_chain(&e)
                );
            }
        }
        Ok(())
    }

    fn daemon_stop(&self, ctx: &DaemonCtx<'_>) {
        self.net.shut_down(ctx.host);
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        let net = &self.net;
        // A start rolled back before guest_config may still be installing
        // the rules: they are removed after, whatever became of them.
        let _ = self.guards.wait(&ctx.vm.id);
        // Rules first, whether or not the VM got a tap (a rollback).
        ctx.host
            .remove_guest(ctx.vm.id.as_str())
            .map_err(|e| CapError::with("Cannot remove the VM's network isolation rules", e))?;
        if let Some(state) = NicState::load(ctx.vm_dir)
            .map_err(|e| CapError::with("Cannot read the VM's network state", e))?
        {
            net.taps()
                .release(ctx.host, &state.tap)
                .map_err(|e| CapError::with(format!("Cannot return tap {}", state.tap), e))?;
            NicState::remove(ctx.vm_dir)
                .map_err(|e| CapError::with("Cannot clear the VM's network state", e))?;
        }
        // The address stays the VM's across stop/start (and a failed start);
        // only deletion frees it.
        if reason == TeardownReason::Delete {
            net.release_lease(&ctx.vm.id)
                .map_err(|e| CapError::with("Cannot free the VM's address", e))?;
        }
        Ok(())
    }
}
