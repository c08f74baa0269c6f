//! `mise` (opt-in): installs a workspace's tools with mise. The install
//! needs the imported checkout, which only exists after create, so it is a
//! guest job (`bootstrap`) that `banger vm run` asks the daemon for after
//! the import (`POST /v1/vms/{name}/capabilities/mise/jobs/bootstrap`). At
//! start this capability only records the intent with the VM and refuses to
//! prepare a VM that could not reach the internet to fetch the tools.

use std::sync::Arc;

use banger_api::model::{CapOptions, VmRecord};
use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, GuestJob, HookCtx};

/// Name used with `--cap`.
pub const NAME: &str = "mise";

/// The one guest job: `mise install` in the checkout.
pub const BOOTSTRAP: &str = "bootstrap";
/// The checkout the bootstrap runs in.
const GUEST_REPO: &str = "/root/repo";
/// Where the bootstrap's output goes in the guest.
const LOG: &str = "/root/.cache/banger/mise-bootstrap.log";

/// Installs mise when the guest lacks it (official script, needs NAT), then
/// the workspace's tools. Config files in the imported checkout are trusted:
/// the user asked for this workspace.
fn bootstrap_script() -> String {
    format!(
        r#"set -e
export PATH="$HOME/.local/bin:$PATH" MISE_YES=1 MISE_TRUSTED_CONFIG_PATHS={GUEST_REPO}
cd {GUEST_REPO}
if ! command -v mise >/dev/null 2>&1; then
  echo "mise is not in the guest; installing it from https://mise.run"
  if command -v curl >/dev/null 2>&1; then curl -fsSL https://mise.run | sh
  elif command -v wget >/dev/null 2>&1; then wget -qO- https://mise.run | sh
  else echo "neither curl nor wget is in the guest to fetch mise" >&2; exit 1
  fi
fi
mise install
echo "mise bootstrap: done""#
    )
}

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

    fn guest_jobs(&self) -> Vec<String> {
        vec![BOOTSTRAP.to_string()]
    }

    fn guest_job(&self, job: &str, _vm: &VmRecord) -> Option<GuestJob> {
        (job == BOOTSTRAP).then(|| GuestJob {
            script: bootstrap_script(),
            log: LOG.to_string(),
            summary: format!("installing the workspace's tools with mise in {GUEST_REPO}"),
        })
    }
}
