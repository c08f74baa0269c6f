//! `nat` (opt-in): outbound internet for one VM. PrepareHost adds a
//! masquerade rule and forward rules for the VM's address, tagged with its
//! id in the bridge's own nftables tables; every Teardown removes exactly
//! those (and turns `ip_forward` back off when banger turned it on and no
//! VM needs it any more).
//!
//! Private (RFC 1918), CGNAT, loopback, link-local (with the cloud metadata
//! address 169.254.169.254) and multicast destinations, and the subnets of
//! the host's other bridges, stay out of reach unless the VM allows them:
//! `--cap nat:allow=10.1.0.0/16,192.168.5.7/32`.

use std::sync::Arc;

use banger_api::model::CapOptions;
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, HookCtx, TeardownReason,
};
use banger_host::hostops::Cidr;

use crate::network::{HostNetwork, host_network};

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

/// The `allow` option: destinations (CIDRs, comma-separated) the VM may
/// reach even where the default refuses them.
pub fn allow_option(options: &CapOptions) -> Result<Vec<Cidr>, CapError> {
    for k in options.keys() {
        if k != "allow" {
            return Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: {NAME} takes allow=CIDR[,CIDR...] (destinations it may reach despite the default refusal of private, link-local and CGNAT ranges)"
            )));
        }
    }
    let Some(list) = options.get("allow") else {
        return Ok(Vec::new());
    };
    list.split(',')
        .map(|c| {
            c.trim()
                .parse::<Cidr>()
                .map_err(|e| CapError::InvalidOptions(format!("{NAME}:allow: {e}")))
        })
        .collect()
}

impl Capability for Nat {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Outbound internet for the VM through masquerading NAT on the host (rules removed when it stops)"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        allow_option(options).map(|_| ())
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let net = &self.net;
        let allow = allow_option(ctx.options)?;
        // Leasing is idempotent, so this works whichever of network/nat runs first.
        let lease = net
            .lease(&ctx.vm.id)
            .map_err(|e| CapError::with("Cannot lease an address", e))?;
        ctx.host
            .add_nat_allowing(ctx.vm.id.as_str(), &net.config().bridge, lease.ip, &allow)
            .map_err(|e| CapError::with("Cannot add NAT rules", e))?;
        if allow.is_empty() {
            ctx.log.info(&format!("outbound NAT for {}", lease.ip));
        } else {
            let list: Vec<String> = allow.iter().map(Cidr::to_string).collect();
            ctx.log.info(&format!(
                "outbound NAT for {}, also to {}",
                lease.ip,
                list.join(", ")
            ));
        }
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
