//! `dns`: `<name>.vm` resolves to the VM's address while it runs.
//! PrepareHost publishes the record to the daemon's DNS server (through its
//! records file); every Teardown withdraws it. The server itself, which also
//! forwards names outside `.vm` to the host's resolvers, is the daemon's
//! (`banger_core::net::dns`).

use std::sync::Arc;

use banger_core::capability::{BuiltinCapability, CapError, Capability, HookCtx, TeardownReason};
use banger_core::model::CapOptions;
use banger_core::net::{HostNetwork, dns};

use crate::network::{host_network, no_options};

/// Name used with `--cap`.
pub const NAME: &str = "dns";

/// The DNS capability. `None` uses the daemon's installed networking.
#[derive(Debug, Default)]
pub struct Dns {
    net: Option<Arc<HostNetwork>>,
}

impl Dns {
    /// A capability bound to `net` rather than the installed one (tests).
    pub fn with(net: Arc<HostNetwork>) -> Self {
        Dns { net: Some(net) }
    }
}

fn make() -> Arc<dyn Capability> {
    Arc::new(Dns::default())
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
        let net = host_network(&self.net)?;
        let lease = net
            .lease(&ctx.vm.id)
            .map_err(|e| CapError::with("Cannot lease an address", e))?;
        dns::set_record(net.dns_records(), ctx.vm.name.as_str(), Some(lease.ip))
            .map_err(|e| CapError::with("Cannot publish the DNS record", e))?;
        ctx.log
            .info(&format!("{}.{} -> {}", ctx.vm.name, dns::ZONE, lease.ip));
        Ok(())
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        let net = host_network(&self.net)?;
        dns::set_record(net.dns_records(), ctx.vm.name.as_str(), None)
            .map_err(|e| CapError::with("Cannot withdraw the DNS record", e))?;
        if reason == TeardownReason::Delete {
            net.release_lease(&ctx.vm.id)
                .map_err(|e| CapError::with("Cannot free the VM's address", e))?;
        }
        Ok(())
    }
}
