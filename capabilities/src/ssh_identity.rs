//! `ssh-identity` (always on): banger's own SSH key in every guest's
//! `authorized_keys`, through the guest config. The key pair is made once,
//! in banger's ssh directory, at the first start that needs it; `vm ssh`,
//! workspace imports and `vm run` log in with it. It cannot be turned off:
//! a VM without it could not be reached by those commands.

use std::path::PathBuf;
use std::sync::Arc;

use banger_api::guest::GuestConfig;
use banger_api::model::CapOptions;
use banger_api::ssh::SshIdentity as Identity;
use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, HookCtx};

/// Name used with `--cap` and in stage names (`guest_config:ssh-identity`).
pub const NAME: &str = "ssh-identity";

/// The capability: where the identity lives.
#[derive(Debug)]
pub struct SshIdentity {
    ssh_dir: PathBuf,
}

impl SshIdentity {
    /// The identity kept in `ssh_dir` (`id_ed25519`, `id_ed25519.pub`).
    pub fn new(ssh_dir: PathBuf) -> Self {
        SshIdentity { ssh_dir }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(SshIdentity::new(env.paths.ssh_dir())))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for SshIdentity {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "banger's SSH key in the guest's authorized_keys, for vm ssh, workspaces and vm run (always on)"
    }

    fn always_on(&self) -> bool {
        true
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: ssh-identity takes no options; its key pair is in banger's ssh directory"
            ))),
        }
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let identity = Identity::load_or_create(&self.ssh_dir)
            .map_err(|e| CapError::with("Cannot load banger's SSH identity", e))?;
        guest
            .authorized_keys
            .push(identity.public_line().to_string());
        ctx.log.info("authorized banger's SSH key");
        Ok(())
    }
}
