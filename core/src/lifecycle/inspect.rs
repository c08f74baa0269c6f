//! Looking inside running guests through their agent.

use std::time::Duration;

use crate::api::PortView;
use crate::lifecycle::{Lifecycle, OpError, blocking};
use crate::model::VmState;
use crate::vsock::AgentClient;

impl Lifecycle {
    /// The guest's listening sockets, from its agent, as `name.vm:port`
    /// endpoints. A service listening on both IPv4 and IPv6 is listed once.
    pub async fn ports(&self, name: &str) -> Result<Vec<PortView>, OpError> {
        let vm = self.get(name).await?;
        if vm.state != VmState::Running {
            return Err(OpError::WrongState {
                name: name.to_string(),
                state: vm.state,
                hint: "start it first (`banger vm start`)",
            });
        }
        let Some(uds) = vm
            .machine
            .as_ref()
            .and_then(|m| m.vsock.as_ref())
            .map(|v| v.uds_path.clone())
        else {
            return Err(OpError::Invalid(format!(
                "VM {name} has no guest agent to ask; create VMs with --cap vsock-agent"
            )));
        };
        let listeners = blocking(move || AgentClient::new(&uds, Duration::from_secs(5)).ports())
            .await?
            .map_err(|e| OpError::Stage {
                stage: "agent_ports".to_string(),
                source: Box::new(e),
            })?;
        Ok(collapse(name, listeners))
    }
}

fn collapse(name: &str, listeners: Vec<banger_guest_protocol::api::Listener>) -> Vec<PortView> {
    let mut out: Vec<PortView> = Vec::new();
    for l in listeners {
        let proto = match l.proto {
            banger_guest_protocol::api::Proto::Tcp => "tcp",
            banger_guest_protocol::api::Proto::Udp => "udp",
        };
        // 0.0.0.0 and :: for one process and port are one service.
        if out.iter().any(|p| {
            p.proto == proto && p.port == l.port && p.pid == l.pid && p.address != l.address
        }) {
            continue;
        }
        out.push(PortView {
            proto: proto.to_string(),
            endpoint: format!("{name}.vm:{}", l.port),
            address: l.address,
            port: l.port,
            pid: l.pid,
            process: l.process,
            command: l.command,
        });
    }
    out.sort_by(|a, b| (a.proto.as_str(), a.port).cmp(&(b.proto.as_str(), b.port)));
    out
}

#[cfg(test)]
mod tests {
    use banger_guest_protocol::api::{Listener, Proto};

    use super::collapse;

    fn l(proto: Proto, address: &str, port: u16, pid: u32) -> Listener {
        Listener {
            proto,
            address: address.into(),
            port,
            pid: Some(pid),
            process: Some("p".into()),
            command: None,
        }
    }

    #[test]
    fn dual_stack_listeners_collapse_and_endpoints_use_the_vm_name() {
        let out = collapse(
            "web",
            vec![
                l(Proto::Tcp, "0.0.0.0", 22, 10),
                l(Proto::Tcp, "::", 22, 10),
                l(Proto::Udp, "0.0.0.0", 53, 11),
                l(Proto::Tcp, "127.0.0.1", 8080, 12),
                l(Proto::Tcp, "::", 8080, 13),
            ],
        );
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|p| (p.proto.as_str(), p.endpoint.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("tcp", "web.vm:22"),
                ("tcp", "web.vm:8080"),
                ("tcp", "web.vm:8080"),
                ("udp", "web.vm:53")
            ],
            "different processes on one port stay separate"
        );
    }
}
