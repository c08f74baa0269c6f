//! One line per step on the console, prefixed `banger-agent:`, so `banger vm
//! logs` shows how far the boot got.

use std::io::Write;

/// Logs one line.
pub fn log(msg: &str) {
    let _ = writeln!(std::io::stderr(), "banger-agent: {msg}");
}

/// Logs a failed step with its whole error chain.
pub fn error(step: &str, e: &dyn std::error::Error) {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    log(&format!("{step} FAILED: {text}"));
}
