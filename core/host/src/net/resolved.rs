//! Routing `.vm` lookups from the host's own resolver to banger's DNS server
//! when systemd-resolved runs: `resolvectl dns LINK SERVER` and
//! `resolvectl domain LINK ~vm` on the bridge, undone with
//! `resolvectl revert LINK`. Without resolved there is nothing to configure;
//! users query the server directly (see docs/networking.md).

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use crate::error::HostOpsError;

/// resolved's varlink socket exists only while it runs.
fn resolved_running() -> bool {
    Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

fn resolvectl(op: &'static str, link: &str, args: &[&str]) -> Result<(), HostOpsError> {
    let fail = |source| HostOpsError::Failed {
        op,
        target: link.to_string(),
        source,
    };
    let out = Command::new("resolvectl")
        .args(args)
        .output()
        .map_err(fail)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(std::io::Error::other(format!(
            "resolvectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))))
    }
}

/// Routes `~domain` on `link` to `server`; `false` when resolved is absent.
pub(crate) fn route(link: &str, server: Ipv4Addr, domain: &str) -> Result<bool, HostOpsError> {
    if !resolved_running() {
        return Ok(false);
    }
    const OP: &str = "route_dns_domain";
    resolvectl(OP, link, &["dns", link, &server.to_string()])?;
    resolvectl(OP, link, &["domain", link, &format!("~{domain}")])?;
    // Only `~domain` goes to banger: it forwards every other name to the
    // host's resolvers, which are resolved's stub, so a default route on the
    // bridge would send queries round in a loop.
    resolvectl(OP, link, &["default-route", link, "false"])?;
    Ok(true)
}

/// Drops banger's per-link resolver settings; nothing to do without resolved.
pub(crate) fn unroute(link: &str) -> Result<(), HostOpsError> {
    if !resolved_running() || !Path::new("/sys/class/net").join(link).exists() {
        return Ok(());
    }
    resolvectl("unroute_dns", link, &["revert", link])
}
