//! Commands without sshd: the daemon's half of `POST /v1/vms/{name}/exec`.
//! It opens the guest agent's exec stream with the VM's secret (which only
//! the daemon and the guest hold) and hands the stream to the HTTP layer,
//! which then copies bytes between it and the client. The client and the
//! agent speak `banger_guest_protocol::exec` frames end to end; the daemon
//! reads none of them.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use banger_vmm::vsock::{AgentClient, EXEC_SECRET_FILE, VsockError};

use crate::lifecycle::{Lifecycle, OpError};

/// How long the agent may take to answer the exec request.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

impl Lifecycle {
    /// The guest agent's exec stream of running VM `name`, authorised and
    /// upgraded, ready for the client's `Start` frame.
    pub async fn open_exec(&self, name: &str) -> Result<UnixStream, OpError> {
        let (vm, uds) = self.running_agent(name, "to run commands through").await?;
        let secret_file = self.view(vm).dir.join(EXEC_SECRET_FILE);
        let vm_name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let secret = match std::fs::read_to_string(&secret_file) {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(OpError::Invalid(format!(
                        "VM {vm_name} has no exec secret ({} is missing): it was started before banger ran commands through the agent; restart it (`banger vm restart {vm_name}`) or use --via ssh",
                        secret_file.display()
                    )));
                }
                Err(e) => return Err(OpError::Io(secret_file.display().to_string(), e)),
            };
            AgentClient::new(&uds, OPEN_TIMEOUT)
                .open_exec(secret.trim())
                .map_err(|e| refused(&vm_name, e))
        })
        .await
        .map_err(|e| OpError::Stage {
            stage: "internal".to_string(),
            source: Box::new(e),
        })?
    }
}

/// The agent's refusals say what to do; anything else is a failed stage.
fn refused(name: &str, e: VsockError) -> OpError {
    match &e {
        VsockError::Status { status: 404, .. } => OpError::Invalid(format!(
            "The guest agent in VM {name} is too old to run commands; restart the VM (`banger vm restart {name}`) to boot the current agent, or use --via ssh"
        )),
        VsockError::Status {
            status: 401 | 403,
            body,
            ..
        } => OpError::Invalid(format!(
            "The guest agent in VM {name} refused the exec request ({body}); restart the VM (`banger vm restart {name}`) to deliver a new secret"
        )),
        _ => OpError::Stage {
            stage: "agent_exec".to_string(),
            source: Box::new(e),
        },
    }
}
