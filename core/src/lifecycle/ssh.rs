//! `ssh`: everything a client needs to reach a running guest over SSH with
//! banger's identity and the guest's host keys pinned (no trust on first use).

use std::time::Duration;

use crate::lifecycle::{GuestUnreachable, Lifecycle, OpError, blocking};
use banger_api::api::SshTarget;
use banger_api::ssh::{SshIdentity, known_hosts};
use banger_guest_protocol::api::Proto;
use banger_vmm::vsock::AgentClient;

/// The user banger's key is authorized for in every guest.
const SSH_USER: &str = "root";
/// Where the guest's sshd listens.
const SSH_PORT: u16 = 22;

impl Lifecycle {
    /// The address, user, identity file and `known_hosts` lines (from the
    /// guest agent) for `ssh` into a running VM.
    pub async fn ssh_target(&self, name: &str) -> Result<SshTarget, OpError> {
        let (vm, uds) = self
            .running_agent(name, "to read its SSH host keys from")
            .await?;
        let address = self.view(vm).address;
        let Some(ip) = address else {
            return Err(OpError::Invalid(format!(
                "VM {name} has no address to connect to; it needs the network capability (--cap network)"
            )));
        };
        // Host keys exist a moment before sshd listens (they are generated
        // just before it starts): only a listener on 22 means "ready".
        let agent_addr = uds.display().to_string();
        let (keys, listening) = blocking(move || {
            let agent = AgentClient::new(&uds, Duration::from_secs(5));
            let keys = agent.ssh_host_keys()?;
            let listening = agent
                .ports()?
                .iter()
                .any(|l| l.proto == Proto::Tcp && l.port == SSH_PORT);
            Ok::<_, banger_vmm::vsock::VsockError>((keys, listening))
        })
        .await?
        .map_err(|e| OpError::Stage {
            stage: "agent_ssh_host_keys".to_string(),
            source: Box::new(GuestUnreachable {
                vm: name.to_string(),
                what: "guest agent",
                addr: agent_addr,
                source: Box::new(e),
            }),
        })?;
        if !listening {
            return Err(OpError::Invalid(format!(
                "VM {name}'s sshd has not started: nothing listens on port {SSH_PORT} in the guest yet (is openssh-server in the image?); try again shortly"
            )));
        }
        let known = known_hosts(&[format!("{name}.vm"), ip.to_string()], &keys);
        if known.is_empty() {
            return Err(OpError::Invalid(format!(
                "VM {name} has no SSH host keys yet: sshd has not started in the guest (is openssh-server in the image?); try again shortly"
            )));
        }
        let key = self.config.ssh_key_file(&self.paths);
        let identity = blocking(move || SshIdentity::load_or_create_key(&key))
            .await?
            .map_err(|e| OpError::Stage {
                stage: "ssh_identity".to_string(),
                source: Box::new(e),
            })?;
        Ok(SshTarget {
            name: name.to_string(),
            address,
            user: SSH_USER.to_string(),
            identity_file: identity.private_key_path().to_path_buf(),
            known_hosts: known,
        })
    }
}
