//! `mise` (opt-in): marks a VM whose workspace tools are installed with
//! mise. The install itself is a guest command that `banger vm run` runs
//! over ssh after the workspace import (the daemon has no workspace until
//! then); this capability records the intent with the VM and refuses to
//! prepare a VM that could not reach the internet to fetch the tools.

use std::sync::Arc;

use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, HookCtx};
use banger_core::model::CapOptions;

/// Name used with `--cap`.
pub const NAME: &str = "mise";

/// The mise bootstrap capability.
#[derive(Debug, Default)]
pub struct Mise;

fn make(_env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(Mise))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for Mise {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Tool bootstrap for workspaces: `vm run` runs `mise install` in /root/repo after the import (needs nat)"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: mise takes no options; the workspace's .mise.toml, mise.toml or .tool-versions says what to install"
            ))),
        }
    }

    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        if !ctx.vm.caps.iter().any(|c| c.name == crate::nat::NAME) {
            return Err(CapError::msg(
                "mise installs tools from the internet, which needs outbound NAT: add --nat (or --cap nat), or drop mise with --cap -mise (`vm run --no-bootstrap`)",
            ));
        }
        Ok(())
    }
}
