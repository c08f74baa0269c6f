//! One line per step on the console, prefixed `banger-agent:`, so `banger vm
//! logs` shows how far the boot got.

use std::io::Write;

/// Logs one line.
pub fn log(msg: &str) {
    let _ = writeln!(std::io::stderr(), "banger-agent: {msg}");
}

/// Logs a failed step with its whole error chain.
pub fn error(step: &str, e: &dyn std::error::Error) {
    log(&format!("{step} FAILED: {}", chain(e)));
}

/// An error with its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Says on the console that the host cannot reach the agent this boot, and
/// why: the daemon fails the start with `reason` when it sees the line
/// (`banger_guest_protocol::api::UNREACHABLE_MARK`).
pub fn unreachable(reason: &str) {
    let mark = banger_guest_protocol::api::UNREACHABLE_MARK;
    let _ = writeln!(std::io::stderr(), "{mark}{reason}");
}
