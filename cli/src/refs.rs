//! VM references: wherever a command takes a VM name, a unique prefix of
//! the VM's ID works too. Resolved here, in the CLI, from `GET /v1/vms`:
//! an exact name wins, then a unique ID prefix; an ambiguous prefix is an
//! error listing the matches. A reference that matches nothing is passed
//! on as it is, so the daemon's "No VM named ..." answers it.

use anyhow::Result;
use banger_api::api::VmView;
use banger_api::client::Client;

/// A prefix matched several VMs' IDs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{reference:?} is no VM's name and the prefix of {} VM IDs: {}; give more of the ID or the name",
    matches.len(),
    matches.join(", ")
)]
pub struct Ambiguous {
    /// What was typed.
    pub reference: String,
    /// `NAME (ID)` of each match.
    pub matches: Vec<String>,
}

/// The VM name `reference` stands for among `vms`.
pub fn resolve_in(vms: &[VmView], reference: &str) -> Result<String, Ambiguous> {
    if vms.iter().any(|v| v.record.name.as_str() == reference) {
        return Ok(reference.to_string());
    }
    let hits: Vec<&VmView> = vms
        .iter()
        .filter(|v| v.record.id.as_str().starts_with(reference))
        .collect();
    match hits.as_slice() {
        [] => Ok(reference.to_string()),
        [one] => Ok(one.record.name.to_string()),
        many => Err(Ambiguous {
            reference: reference.to_string(),
            matches: many
                .iter()
                .map(|v| format!("{} ({})", v.record.name, v.record.id))
                .collect(),
        }),
    }
}

/// Every reference resolved, in the order given, each VM once.
pub fn resolve_all_in(vms: &[VmView], references: &[String]) -> Result<Vec<String>, Ambiguous> {
    let mut names: Vec<String> = Vec::with_capacity(references.len());
    for r in references {
        let name = resolve_in(vms, r)?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Ok(names)
}

/// [`resolve_all_in`] against the daemon's VMs.
pub async fn resolve_all(client: &Client, references: &[String]) -> Result<Vec<String>> {
    let vms: Vec<VmView> = client.get("/v1/vms").await?;
    Ok(resolve_all_in(&vms, references)?)
}

/// One reference against the daemon's VMs.
pub async fn resolve(client: &Client, reference: &str) -> Result<String> {
    let vms: Vec<VmView> = client.get("/v1/vms").await?;
    Ok(resolve_in(&vms, reference)?)
}

#[cfg(test)]
mod tests {
    use banger_api::model::VmState;

    use super::*;

    fn vm(name: &str, id: &str) -> VmView {
        crate::vm::tests::vm_view_with_id(name, id, VmState::Running)
    }

    fn vms() -> Vec<VmView> {
        vec![
            vm("web", "ab12000000000001"),
            vm("db", "ab34000000000002"),
            // A name that is also another VM's ID prefix.
            vm("cd", "ef00000000000003"),
            vm("api", "cdcd000000000004"),
        ]
    }

    #[test]
    fn exact_name_then_unique_id_prefix() {
        let v = vms();
        assert_eq!(resolve_in(&v, "web").unwrap(), "web");
        assert_eq!(resolve_in(&v, "ab1").unwrap(), "web");
        assert_eq!(resolve_in(&v, "ab34000000000002").unwrap(), "db");
        // The name wins over api's ID prefix.
        assert_eq!(resolve_in(&v, "cd").unwrap(), "cd");
        assert_eq!(resolve_in(&v, "cdc").unwrap(), "api");
        // Unknown: passed on for the daemon to refuse by name.
        assert_eq!(resolve_in(&v, "ghost").unwrap(), "ghost");
    }

    #[test]
    fn an_ambiguous_prefix_lists_the_matches() {
        let e = resolve_in(&vms(), "ab").unwrap_err();
        assert_eq!(
            e.matches,
            ["web (ab12000000000001)", "db (ab34000000000002)"]
        );
        let msg = e.to_string();
        assert!(msg.contains("\"ab\"") && msg.contains("web (ab12"), "{msg}");
    }

    #[test]
    fn duplicates_go_and_the_order_stays() {
        let refs = ["db", "ab1", "web", "ab34", "ghost", "ghost"].map(String::from);
        assert_eq!(
            resolve_all_in(&vms(), &refs).unwrap(),
            ["db", "web", "ghost"]
        );
    }
}
