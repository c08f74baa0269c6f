//! `GET /healthz`: version, uptime and memory.

use std::path::Path;
use std::time::Instant;

use banger_guest_protocol::api::Health;

/// The health report of an agent started at `started`; memory figures are
/// 0 when `meminfo` cannot be read.
pub fn health(started: Instant, meminfo: &Path) -> Health {
    let text = std::fs::read_to_string(meminfo).unwrap_or_default();
    Health {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_secs: started.elapsed().as_secs(),
        mem_total_kib: meminfo_kib(&text, "MemTotal"),
        mem_available_kib: meminfo_kib(&text, "MemAvailable"),
    }
}

/// The value of a `Key:   1234 kB` line, 0 when absent.
fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_total_and_available_memory() {
        let text = "MemTotal:        2048000 kB\nMemFree:  10 kB\nMemAvailable:    1024000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), 2_048_000);
        assert_eq!(meminfo_kib(text, "MemAvailable"), 1_024_000);
        assert_eq!(meminfo_kib(text, "Missing"), 0);
    }
}
