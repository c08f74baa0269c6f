//! `nat` (opt-in): outbound internet for one VM. PrepareHost adds a
//! masquerade rule and forward rules for the VM's address, tagged with its
//! id in the `banger` nftables table; every Teardown removes exactly those.

use std::sync::Arc;

use banger_api::model::CapOptions;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, HookCtx, TeardownReason,
};

use crate::network::{HostNetwork, host_network, no_options};

/// Name used with `--cap`.
pub const NAME: &str = "nat";

/// The NAT capability, on the `network` capability's host networking.
#[derive(Debug)]
pub struct Nat {
    net: Arc<HostNetwork>,
}

impl Nat {
    /// A capability around `net`.
    pub fn with(net: Arc<HostNetwork>) -> Self {
        Nat { net }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(Nat::with(host_network(env))))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for Nat {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Outbound internet for the VM through masquerading NAT on the host (rules removed when it stops)"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        no_options(NAME, options)
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let net = &self.net;
        // Leasing is idempotent, so this works whichever of network/nat runs first.
        let lease = net
            .lease(&ctx.vm.id)
            .map_err(|e| CapError::with("Cannot lease an address", e))?;
        ctx.host
            .add_nat(ctx.vm.id.as_str(), &net.config().bridge, lease.ip)
            .map_err(|e| CapError::with("Cannot add NAT rules", e))?;
        ctx.log.info(&format!("outbound NAT for {}", lease.ip));
        Ok(())
    }

    fn teardown(&self, ctx: &HookCtx<'_>, reason: TeardownReason) -> Result<(), CapError> {
        let net = &self.net;
        ctx.host
            .remove_nat(ctx.vm.id.as_str())
            .map_err(|e| CapError::with("Cannot remove NAT rules", e))?;
        if reason == TeardownReason::Delete {
            net.release_lease(&ctx.vm.id)
                .map_err(|e| CapError::with("Cannot free the VM's address", e))?;
        }
        Ok(())
    }
}
