//! Progress of a long operation, streamed to the client as
//! [`Event`]s: stages, rate-limited byte and item counts, log lines.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;

use crate::api::{Event, ProgressUnit};

/// Where an operation reports progress. Sends never fail the operation: a
/// client that went away just stops listening. Clones share the current
/// stage and the rate limit, so a step reported from another task still
/// belongs to the stage that was announced last.
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<UnboundedSender<Event>>,
    shared: Arc<std::sync::Mutex<Shared>>,
}

/// What clones of one [`Progress`] share.
#[derive(Debug, Default)]
struct Shared {
    stage: String,
    limit: RateLimit,
}

impl Progress {
    /// Progress sent to `tx`.
    pub fn to(tx: UnboundedSender<Event>) -> Self {
        Progress {
            tx: Some(tx),
            shared: Arc::default(),
        }
    }

    /// Progress nobody listens to.
    pub fn none() -> Self {
        Progress {
            tx: None,
            shared: Arc::default(),
        }
    }

    /// A stage began.
    pub fn stage(&self, stage: &str, message: impl Into<String>) {
        self.begin(stage, message.into(), None);
    }

    /// A stage began that usually takes about `expected` (a local build), so
    /// the client can show how long is left.
    pub fn stage_expecting(&self, stage: &str, message: impl Into<String>, expected: Duration) {
        self.begin(stage, message.into(), Some(expected.as_secs()));
    }

    fn begin(&self, stage: &str, message: String, expected_secs: Option<u64>) {
        tracing::info!(stage, expected_secs, "{message}");
        self.shared().stage = stage.to_string();
        self.send(Event::Stage {
            stage: stage.to_string(),
            message,
            expected_secs,
        });
    }

    /// `done` of `total` bytes of step `label` (a download, an upload) are
    /// through. Call as often as convenient: at most ~10 events a second per
    /// label reach the client, and the one with `done == total` always does.
    pub fn bytes(&self, label: &str, done: u64, total: Option<u64>) {
        self.advance(label, done, total, ProgressUnit::Bytes);
    }

    /// `done` of `total` units of step `label` are through; rate-limited
    /// like [`Progress::bytes`].
    pub fn advance(&self, label: &str, done: u64, total: Option<u64>, unit: ProgressUnit) {
        if self.tx.is_none() {
            return;
        }
        let stage = {
            let mut shared = self.shared();
            let last = total.is_some_and(|t| done >= t);
            if !shared.limit.admit(label, std::time::Instant::now(), last) {
                return;
            }
            shared.stage.clone()
        };
        self.send(Event::Progress {
            stage,
            label: label.to_string(),
            done,
            total,
            unit,
        });
    }

    /// An informational line for the user.
    pub fn log_info(&self, message: &str) {
        tracing::info!("{message}");
        self.log("info", message);
    }

    /// A warning line for the user.
    pub fn log_warn(&self, message: &str) {
        tracing::warn!("{message}");
        self.log("warn", message);
    }

    /// A line for the user at `level` (`info`, `warn`), not traced here:
    /// for callers that log it themselves.
    pub fn log(&self, level: &str, message: &str) {
        self.send(Event::Log {
            level: level.to_string(),
            message: message.to_string(),
        });
    }

    fn send(&self, event: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event);
        }
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Lets through at most one progress event per label per
/// [`RateLimit::INTERVAL`], plus every last one, so a download reporting
/// each 64 KiB chunk does not flood the stream.
#[derive(Debug, Default)]
struct RateLimit {
    sent: HashMap<String, std::time::Instant>,
}

impl RateLimit {
    /// The shortest gap between two events of one label (10 a second).
    const INTERVAL: Duration = Duration::from_millis(100);

    /// Whether an event for `label` at `now` goes out; `last` ones (the step
    /// completed) always do.
    fn admit(&mut self, label: &str, now: std::time::Instant, last: bool) -> bool {
        match self.sent.get_mut(label) {
            Some(at) if !last && now.saturating_duration_since(*at) < Self::INTERVAL => false,
            Some(at) => {
                *at = now;
                true
            }
            None => {
                self.sent.insert(label.to_string(), now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn rate_limit_passes_one_event_per_interval_per_label_and_every_last_one() {
        let mut limit = RateLimit::default();
        let t0 = Instant::now();
        let gap = RateLimit::INTERVAL;
        let at = |n: u32| t0 + gap / 4 * n;
        // Events every quarter interval for label a: one in four passes.
        let passed: Vec<u32> = (0..9).filter(|&n| limit.admit("a", at(n), false)).collect();
        assert_eq!(passed, [0, 4, 8]);
        assert!(limit.admit("b", at(1), false), "labels are limited apart");
        assert!(
            limit.admit("a", at(9), true),
            "the last event always passes"
        );
        assert!(
            !limit.admit("a", at(10), false),
            "and restarts the interval"
        );
    }

    #[tokio::test]
    async fn progress_events_name_the_stage_announced_last() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = Progress::to(tx);
        progress.stage_expecting("build", "compiling", Duration::from_secs(90));
        progress.clone().bytes("upload", 10, Some(10));
        progress.advance("files", 1, None, ProgressUnit::Items);
        drop(progress);
        let mut got = Vec::new();
        while let Some(e) = rx.recv().await {
            got.push(e);
        }
        assert_eq!(
            got,
            [
                Event::Stage {
                    stage: "build".into(),
                    message: "compiling".into(),
                    expected_secs: Some(90),
                },
                Event::Progress {
                    stage: "build".into(),
                    label: "upload".into(),
                    done: 10,
                    total: Some(10),
                    unit: ProgressUnit::Bytes,
                },
                Event::Progress {
                    stage: "build".into(),
                    label: "files".into(),
                    done: 1,
                    total: None,
                    unit: ProgressUnit::Items,
                },
            ]
        );
    }
}
