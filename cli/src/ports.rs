//! Port forwarding on the command line: `-p` on `vm create` / `vm run`
//! (the `ports` capability's `forward` option), `vm port add/rm` (live on
//! a running VM) and `vm ports` (the forwards, then the guest's
//! listeners).

use std::process::ExitCode;

use anyhow::Result;
use banger_api::api::{
    FORWARD_OPTION, PORTS_CAP, PortForward, PortForwardRequest, PortView, Proto, VmView,
    forwards_of,
};
use banger_api::client::{Client, Method};
use banger_api::model::{CapChoice, VmState};
use serde::Serialize;

use crate::output;
use crate::remote::vm_path;

/// `-p` values: a [`PortForward`] spec, checked while parsing arguments.
pub(crate) fn parse_forward(s: &str) -> Result<String, String> {
    s.parse::<PortForward>()
        .map(|f| f.to_string())
        .map_err(|e| e.to_string())
}

/// `-p SPEC...` are `--cap ports:forward=SPEC,...`, merged with the
/// forwards of any `--cap ports:...` given (the last such choice replaces
/// earlier ones, as for every capability).
pub(crate) fn with_ports(mut caps: Vec<String>, ports: &[String]) -> Vec<String> {
    if ports.is_empty() {
        return caps;
    }
    let mut forwards: Vec<String> = Vec::new();
    if let Some(i) = caps.iter().rposition(
        |c| matches!(c.parse::<CapChoice>(), Ok(CapChoice::Add(e)) if e.name == PORTS_CAP),
    ) {
        if let Ok(CapChoice::Add(e)) = caps.remove(i).parse::<CapChoice>()
            && let Some(list) = e.options.get(FORWARD_OPTION)
        {
            forwards.push(list.clone());
        }
    }
    forwards.extend(ports.iter().cloned());
    caps.push(format!(
        "{PORTS_CAP}:{FORWARD_OPTION}={}",
        forwards.join(",")
    ));
    caps
}

/// `vm port add` / `vm port rm`.
pub async fn change(client: &Client, name: &str, spec: &str, add: bool) -> Result<ExitCode> {
    let req = PortForwardRequest {
        forward: spec.to_string(),
    };
    let method = if add { Method::POST } else { Method::DELETE };
    let vm: VmView = client
        .send(method, &format!("{}/ports", vm_path(name)), Some(&req))
        .await?;
    let forward: PortForward = spec.parse()?;
    let live = vm.record.state == VmState::Running;
    match (add, live) {
        (true, true) => println!("{}", describe(&vm, &forward)),
        (true, false) => println!(
            "{} (from the next start; {name} is {})",
            describe(&vm, &forward),
            vm.record.state
        ),
        (false, _) => println!("removed {forward}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `HOST:PORT -> NAME.vm:PORT (tcp)`.
fn describe(vm: &VmView, f: &PortForward) -> String {
    format!(
        "{}:{} -> {}.vm:{} ({})",
        f.host_ip, f.host_port, vm.record.name, f.guest_port, f.proto
    )
}

/// `vm ports --json`.
#[derive(Debug, Serialize)]
struct PortsJson<'a> {
    /// The VM's port forwards (live while it runs).
    forwards: &'a [PortForward],
    /// The guest's listening sockets, from its agent.
    listeners: &'a [PortView],
}

/// `vm ports`: the VM's forwards, then the guest's listeners (through its
/// agent). A VM whose agent cannot be asked still shows its forwards, with
/// the agent's error on stderr; with no forwards, that error is the answer.
pub async fn list(client: &Client, name: &str, json: bool) -> Result<ExitCode> {
    let vm: VmView = client.get(&vm_path(name)).await?;
    let forwards = forwards_of(&vm.record.caps)?;
    let listeners: Vec<PortView> = match client.get(&format!("{}/ports", vm_path(name))).await {
        Ok(l) => l,
        Err(e) if !forwards.is_empty() => {
            eprintln!("guest listeners: {e:#}");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        let out = PortsJson {
            forwards: &forwards,
            listeners: &listeners,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&vm, &forwards, &listeners));
    Ok(ExitCode::SUCCESS)
}

/// One table: each guest listener with the host ports forwarded to it,
/// and forwards to ports where nothing listens (yet).
fn table(vm: &VmView, forwards: &[PortForward], listeners: &[PortView]) -> String {
    let same_proto = |f: &PortForward, p: &PortView| match f.proto {
        Proto::Udp => p.proto == "udp",
        Proto::Tcp => p.proto != "udp",
    };
    let hosts = |p: Option<&PortView>, port: u16, proto: Proto| -> String {
        let v: Vec<String> = forwards
            .iter()
            .filter(|f| f.guest_port == port && p.is_none_or(|p| same_proto(f, p)))
            .filter(|f| p.is_some() || f.proto == proto)
            .map(|f| format!("{}:{}", f.host_ip, f.host_port))
            .collect();
        if v.is_empty() {
            "-".into()
        } else {
            v.join(",")
        }
    };
    let mut rows: Vec<Vec<String>> = listeners
        .iter()
        .map(|p| {
            vec![
                p.proto.clone(),
                p.endpoint.clone(),
                hosts(Some(p), p.port, Proto::Tcp),
                p.process.clone().unwrap_or_else(|| "-".into()),
                p.command.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    for f in forwards {
        let served = listeners
            .iter()
            .any(|p| p.port == f.guest_port && same_proto(f, p));
        let row_exists = rows
            .iter()
            .any(|r| r[0] == f.proto.to_string() && r[1].ends_with(&format!(":{}", f.guest_port)));
        if !served && !row_exists {
            rows.push(vec![
                f.proto.to_string(),
                format!("{}.vm:{}", vm.record.name, f.guest_port),
                hosts(None, f.guest_port, f.proto),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    output::table(
        &["PROTO", "ENDPOINT", "FORWARDED FROM", "PROCESS", "COMMAND"],
        &rows,
    )
}

/// The `forwards:` lines of `vm show`, empty without forwards.
pub(crate) fn show_lines(vm: &VmView) -> String {
    let Ok(forwards) = forwards_of(&vm.record.caps) else {
        return String::new();
    };
    let state = if vm.record.state == VmState::Running {
        ""
    } else {
        " (when running)"
    };
    let mut o = String::new();
    for (i, f) in forwards.iter().enumerate() {
        let key = if i == 0 { "forwards:" } else { "" };
        o.push_str(&format!("{key:<12} {}{state}\n", describe(vm, f)));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_become_the_ports_capability_merged_with_its_cap_choice() {
        let caps = vec!["nat".to_string()];
        assert_eq!(with_ports(caps.clone(), &[]), caps);
        let p = vec![
            "127.0.0.1:8080:80/tcp".to_string(),
            "0.0.0.0:53:53/udp".to_string(),
        ];
        assert_eq!(
            with_ports(caps, &p),
            [
                "nat",
                "ports:forward=127.0.0.1:8080:80/tcp,0.0.0.0:53:53/udp"
            ]
        );
        let given = vec!["ports:forward=2222:22".to_string(), "-dns".to_string()];
        assert_eq!(
            with_ports(given, &p[..1]),
            ["-dns", "ports:forward=2222:22,127.0.0.1:8080:80/tcp"]
        );
        assert_eq!(
            parse_forward("8080:80").as_deref(),
            Ok("127.0.0.1:8080:80/tcp")
        );
        assert!(parse_forward("8080").unwrap_err().contains("e.g. 8080:80"));
    }
}
