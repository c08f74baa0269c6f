//! Stage timings: how long each stage of a lifecycle operation took. Every
//! stage that ends logs one line (`vm=web op=start stage=launch_vmm
//! took=12.345ms`, to the microsecond), every operation its total, and the
//! stages of a VM's last start are kept in its record (whole milliseconds)
//! for `vm show`.
//!
//! The clock lives in a task-local for the length of one operation, so the
//! places that begin a stage (hooks, the VMM launch) mark it without every
//! helper carrying a timer; outside an operation marking does nothing.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_api::model::{StageTiming, StartTimings, now_unix};

tokio::task_local! {
    static CLOCK: Clock;
}

/// One operation's stages.
#[derive(Debug)]
struct Clock {
    vm: Mutex<String>,
    op: &'static str,
    inner: Mutex<Stages>,
}

#[derive(Debug, Default)]
struct Stages {
    /// The stage running now and when it began.
    current: Option<(String, Instant)>,
    /// Stages that ended, in order.
    done: Vec<StageTiming>,
}

impl Clock {
    fn stages(&self) -> std::sync::MutexGuard<'_, Stages> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm(&self) -> String {
        self.vm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ends the current stage, logging its duration.
    fn end_current(&self, stages: &mut Stages) {
        if let Some((stage, began)) = stages.current.take() {
            let took = began.elapsed();
            tracing::info!(
                "vm={} op={} stage={stage} took={}ms",
                self.vm(),
                self.op,
                fractional_ms(took)
            );
            stages.done.push(StageTiming {
                stage,
                ms: millis(took),
            });
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds to the microsecond, for the log: most stages take well
/// under one, where whole milliseconds would say only 0 or 1.
fn fractional_ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Runs operation `op` on VM `vm` with a clock: its stages are timed and
/// logged, then its total. Inside another timed operation (a create's
/// start, a restart's stop) the stages count for the outer one.
pub(super) async fn timed<F: Future>(vm: &str, op: &'static str, f: F) -> F::Output {
    if CLOCK.try_with(|_| ()).is_ok() {
        return f.await;
    }
    let clock = Clock {
        vm: Mutex::new(vm.to_string()),
        op,
        inner: Mutex::default(),
    };
    let began = Instant::now();
    CLOCK
        .scope(clock, async move {
            let out = f.await;
            let _ = CLOCK.try_with(|c| {
                let mut stages = c.stages();
                c.end_current(&mut stages);
                tracing::info!(
                    "vm={} op={} total took={}ms ({} stages)",
                    c.vm(),
                    c.op,
                    fractional_ms(began.elapsed()),
                    stages.done.len()
                );
            });
            out
        })
        .await
}

/// Names the operation's VM once it is known (a create without `--name`).
pub(super) fn name_vm(vm: &str) {
    let _ = CLOCK.try_with(|c| {
        *c.vm.lock().unwrap_or_else(|p| p.into_inner()) = vm.to_string();
    });
}

/// Stage `stage` begins (the one before it ends).
pub(super) fn mark(stage: &str) {
    let _ = CLOCK.try_with(|c| {
        let mut stages = c.stages();
        c.end_current(&mut stages);
        stages.current = Some((stage.to_string(), Instant::now()));
    });
}

/// Where a start began: its stages are those that begin after this.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checkpoint {
    index: usize,
    at: Instant,
    unix: u64,
}

/// Ends the current stage and remembers where the stages from now on begin.
pub(super) fn checkpoint() -> Checkpoint {
    let index = CLOCK
        .try_with(|c| {
            let mut stages = c.stages();
            c.end_current(&mut stages);
            stages.done.len()
        })
        .unwrap_or(0);
    Checkpoint {
        index,
        at: Instant::now(),
        unix: now_unix(),
    }
}

/// Ends the current stage and returns the stages since `from`, with the
/// time since it as the total.
pub(super) fn since(from: Checkpoint, ok: bool) -> StartTimings {
    let stages = CLOCK
        .try_with(|c| {
            let mut stages = c.stages();
            c.end_current(&mut stages);
            stages.done.get(from.index..).unwrap_or_default().to_vec()
        })
        .unwrap_or_default();
    StartTimings {
        at: from.unix,
        ok,
        total_ms: millis(from.at.elapsed()),
        stages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(t: &StartTimings) -> Vec<&str> {
        t.stages.iter().map(|s| s.stage.as_str()).collect()
    }

    #[tokio::test]
    async fn stages_since_a_checkpoint_are_in_order_and_within_the_total() {
        let t = timed("web", "create", async {
            mark("validate");
            let from = checkpoint();
            mark("prepare_host:network");
            tokio::time::sleep(Duration::from_millis(20)).await;
            mark("launch_vmm");
            // A nested operation's stages count for the outer one.
            timed("web", "start", async { mark("post_start:vsock-agent") }).await;
            since(from, true)
        })
        .await;
        assert_eq!(
            names(&t),
            [
                "prepare_host:network",
                "launch_vmm",
                "post_start:vsock-agent"
            ]
        );
        assert!(t.ok);
        assert!(t.stages[0].ms >= 20, "{t:?}");
        let sum: u64 = t.stages.iter().map(|s| s.ms).sum();
        assert!(sum <= t.total_ms, "{t:?}");
    }

    #[tokio::test]
    async fn marking_outside_an_operation_does_nothing() {
        mark("launch_vmm");
        let t = since(checkpoint(), false);
        assert!(t.stages.is_empty(), "{t:?}");
        assert!(!t.ok);
    }
}
