//! Per-VM NAT rules in nftables, for [`crate::hostops::InProcessHostOps`].
//!
//! Everything lives in one table, `ip banger`, with a `postrouting` nat chain
//! and a `forward` filter chain. Each VM's rules carry the comment
//! `banger:<vm_id>`, so removal deletes exactly that VM's rules by handle and
//! never touches anything else. Changes go through `nft -f -` as one
//! transaction; the ruleset is read back with `nft -j`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::error::HostOpsError;

/// The nftables table banger owns.
pub const TABLE: &str = "banger";

const SKELETON: &str = "table ip banger {
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; }
  chain forward { type filter hook forward priority filter; policy accept; }
}
";

/// The comment that tags a VM's rules.
pub fn comment_for(vm_id: &str) -> String {
    format!("banger:{vm_id}")
}

fn validate_vm_id(op: &'static str, vm_id: &str) -> Result<(), HostOpsError> {
    if !vm_id.is_empty()
        && vm_id.len() <= 64
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{vm_id:?} is not a valid VM id (1-64 of [A-Za-z0-9_-])"),
        })
    }
}

fn failed(op: &'static str, target: &str, source: std::io::Error) -> HostOpsError {
    HostOpsError::Failed {
        op,
        target: target.to_string(),
        source,
    }
}

fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<String, std::io::Error> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(e.kind(), "nft not found; install nftables")
            } else {
                e
            }
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(std::io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// `(chain, handle)` of every rule in our table tagged with `comment`.
fn tagged_rules(comment: &str) -> Result<Vec<(String, u64)>, std::io::Error> {
    let json = match run_nft(&["-j", "list", "table", "ip", TABLE], None) {
        Ok(j) => j,
        // No table yet means no rules.
        Err(e) if e.to_string().contains("No such file or directory") => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    Ok(rules_with_comment(&json, comment))
}

/// Parses `nft -j list ...` output for rules carrying exactly `comment`.
pub(crate) fn rules_with_comment(json: &str, comment: &str) -> Vec<(String, u64)> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return vec![];
    };
    let Some(items) = v.get("nftables").and_then(|n| n.as_array()) else {
        return vec![];
    };
    items
        .iter()
        .filter_map(|item| item.get("rule"))
        .filter(|r| r.get("table").and_then(|t| t.as_str()) == Some(TABLE))
        .filter(|r| r.get("comment").and_then(|c| c.as_str()) == Some(comment))
        .filter_map(|r| {
            Some((
                r.get("chain")?.as_str()?.to_string(),
                r.get("handle")?.as_u64()?,
            ))
        })
        .collect()
}

fn delete_lines(rules: &[(String, u64)]) -> String {
    rules
        .iter()
        .map(|(chain, handle)| format!("delete rule ip {TABLE} {chain} handle {handle}\n"))
        .collect()
}

/// Lets `ip` reach beyond `bridge` with its source masqueraded, and lets
/// replies back in. Replaces any earlier rules of `vm_id` in one transaction.
pub(crate) fn add_nat(vm_id: &str, bridge: &str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
    const OP: &str = "add_nat";
    validate_vm_id(OP, vm_id)?;
    crate::error::validate_ifname(OP, bridge)?;
    let tag = comment_for(vm_id);
    let old = tagged_rules(&tag).map_err(|e| failed(OP, vm_id, e))?;
    let script = format!(
        "{SKELETON}{deletes}\
add rule ip {TABLE} postrouting ip saddr {ip} oifname != \"{bridge}\" masquerade comment \"{tag}\"
add rule ip {TABLE} forward iifname \"{bridge}\" ip saddr {ip} oifname != \"{bridge}\" accept comment \"{tag}\"
add rule ip {TABLE} forward oifname \"{bridge}\" ip daddr {ip} ct state established,related accept comment \"{tag}\"
",
        deletes = delete_lines(&old)
    );
    run_nft(&["-f", "-"], Some(&script)).map_err(|e| failed(OP, vm_id, e))?;
    // Routing between the bridge and the uplink needs forwarding on.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", b"1")
        .map_err(|e| failed(OP, "/proc/sys/net/ipv4/ip_forward", e))?;
    Ok(())
}

/// Deletes every rule tagged with `vm_id`; none is not an error.
pub(crate) fn remove_nat(vm_id: &str) -> Result<(), HostOpsError> {
    const OP: &str = "remove_nat";
    validate_vm_id(OP, vm_id)?;
    let old = tagged_rules(&comment_for(vm_id)).map_err(|e| failed(OP, vm_id, e))?;
    if old.is_empty() {
        return Ok(());
    }
    run_nft(&["-f", "-"], Some(&delete_lines(&old))).map_err(|e| failed(OP, vm_id, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_rules_with_the_exact_comment_in_our_table() {
        let json = r#"{"nftables":[{"metainfo":{"json_schema_version":1}},
          {"table":{"family":"ip","name":"banger","handle":1}},
          {"rule":{"family":"ip","table":"banger","chain":"forward","handle":4,"comment":"banger:abc","expr":[]}},
          {"rule":{"family":"ip","table":"banger","chain":"postrouting","handle":7,"comment":"banger:abc","expr":[]}},
          {"rule":{"family":"ip","table":"banger","chain":"forward","handle":5,"comment":"banger:abcd","expr":[]}},
          {"rule":{"family":"ip","table":"other","chain":"forward","handle":9,"comment":"banger:abc","expr":[]}}]}"#;
        assert_eq!(
            rules_with_comment(json, "banger:abc"),
            vec![("forward".to_string(), 4), ("postrouting".to_string(), 7)]
        );
        assert!(rules_with_comment("not json", "banger:abc").is_empty());
    }

    #[test]
    fn refuses_vm_ids_that_could_escape_the_comment() {
        for bad in ["", "a\"b", "a b", "x;flush ruleset"] {
            assert!(validate_vm_id("t", bad).is_err(), "{bad}");
        }
        assert!(validate_vm_id("t", "0123abcd").is_ok());
    }
}
