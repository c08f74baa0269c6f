//! Live shell completions: clap_complete's dynamic completion
//! (`COMPLETE=SHELL banger -- banger ARGS...`) with VM, image, kernel and
//! capability names asked from the running daemon. The daemon is never
//! started for a tab press, and a daemon that does not answer within
//! [`TIMEOUT`] completes nothing (the shell falls back to nothing, never to
//! a hang).

use std::time::Duration;

use banger_api::api::{CapView, VmView};
use banger_api::client::Client;
use banger_api::paths::Paths;
use clap::ValueEnum;
use clap_complete::engine::CompletionCandidate;
use serde::de::DeserializeOwned;

/// Shells we generate completions for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
    /// PowerShell.
    Powershell,
}

/// How long one tab press may wait for the daemon.
const TIMEOUT: Duration = Duration::from_millis(800);

/// `banger completion SHELL`: the shell code that registers banger's live
/// completions (what `COMPLETE=SHELL banger` prints); it calls this binary
/// back at every tab press.
pub fn registration(shell: Shell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    use clap_complete::env::EnvCompleter;
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &clap_complete::env::Bash,
        Shell::Zsh => &clap_complete::env::Zsh,
        Shell::Fish => &clap_complete::env::Fish,
        Shell::Powershell => &clap_complete::env::Powershell,
    };
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "banger".to_string());
    completer.write_registration("COMPLETE", "banger", "banger", &exe, out)
}

/// `GET path` from the running daemon, or `None` when it is not running,
/// does not answer in time, or answers with an error.
fn ask<T: DeserializeOwned>(path: &str) -> Option<T> {
    let paths = Paths::from_env().ok()?;
    let client = Client::new(paths.socket());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async { tokio::time::timeout(TIMEOUT, client.get::<T>(path)).await })
        .ok()?
        .ok()
}

fn candidates(
    items: impl IntoIterator<Item = (String, Option<String>)>,
) -> Vec<CompletionCandidate> {
    items
        .into_iter()
        .map(|(value, help)| CompletionCandidate::new(value).help(help.map(Into::into)))
        .collect()
}

/// VM names, each with its state as the help.
pub fn vms() -> Vec<CompletionCandidate> {
    let vms: Vec<VmView> = ask("/v1/vms").unwrap_or_default();
    candidates(vms.into_iter().map(|v| {
        (
            v.record.name.to_string(),
            Some(v.record.state.as_str().to_string()),
        )
    }))
}

/// Names from a list endpoint whose items have a `name` field.
fn named(path: &str) -> Vec<CompletionCandidate> {
    let items: Vec<serde_json::Value> = ask(path).unwrap_or_default();
    candidates(items.into_iter().filter_map(|v| {
        v.get("name")
            .and_then(|n| n.as_str())
            .map(|n| (n.to_string(), None))
    }))
}

/// Local image names.
pub fn images() -> Vec<CompletionCandidate> {
    named("/v1/images")
}

/// Local kernel names.
pub fn kernels() -> Vec<CompletionCandidate> {
    named("/v1/kernels")
}

/// Capability names, and `-NAME` to drop a default one.
pub fn caps() -> Vec<CompletionCandidate> {
    let caps: Vec<CapView> = ask("/v1/capabilities").unwrap_or_default();
    let mut out = candidates(caps.iter().map(|c| (c.name.to_string(), None)));
    out.extend(candidates(
        caps.iter()
            .map(|c| (format!("-{}", c.name), Some("leave out".to_string()))),
    ));
    out
}
