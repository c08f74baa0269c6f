//! An operation's event stream on stderr. On a terminal each stage is a
//! spinner line with its elapsed (and expected) time, byte progress is a bar
//! with rate and ETA, and a finished stage stays as one line with its
//! duration. Anywhere else (CI, pipes, files) it is plain lines: one per
//! stage, and byte progress at most every 10 %, so logs stay readable.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use banger_api::api::{Event, ProgressUnit};
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Every view in the process draws through this one, so views of VMs
/// started in parallel share the screen instead of overwriting each other.
static SCREEN: LazyLock<MultiProgress> =
    LazyLock::new(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));

/// How often spinners redraw, so elapsed time moves between events.
const TICK: Duration = Duration::from_millis(120);

/// Shows one operation's events on stderr; pass it to
/// `Client::stream_events` as the event callback. `prefix` names the VM
/// when several operations run at once.
pub fn show_events(prefix: Option<&str>) -> impl FnMut(&Event) + use<> {
    let mut view = if std::io::stderr().is_terminal() {
        View::Bars(Bars::new(prefix))
    } else {
        View::Plain(Plain::new(prefix))
    };
    move |e| match &mut view {
        View::Plain(p) => {
            if let Some(line) = p.line(e) {
                super::eprint_line(line);
            }
        }
        View::Bars(b) => b.show(e),
    }
}

enum View {
    Plain(Plain),
    Bars(Bars),
}

/// The plain-line rendering: a pure function of the events seen so far.
#[derive(Debug, Default)]
pub(crate) struct Plain {
    prefix: Option<String>,
    /// The last tenth reported per progress label.
    tenths: HashMap<String, u64>,
}

impl Plain {
    pub(crate) fn new(prefix: Option<&str>) -> Self {
        Plain {
            prefix: prefix.map(str::to_string),
            tenths: HashMap::new(),
        }
    }

    /// The line to print for `e`: none for a progress event within the
    /// tenth already reported, nor for the terminal events the caller
    /// reports itself.
    pub(crate) fn line(&mut self, e: &Event) -> Option<String> {
        match e {
            Event::Progress {
                label,
                done,
                total,
                unit,
                ..
            } => {
                let pct = self.new_tenth(label, *done, *total)?;
                let body = format!("    {label}: {pct}% of {}", amount(*total, *unit));
                Some(match &self.prefix {
                    Some(p) => format!("{p}: {body}"),
                    None => body,
                })
            }
            e => {
                if let Event::Stage { .. } = e {
                    // A new stage: its steps report afresh.
                    self.tenths.clear();
                }
                super::event_line(self.prefix.as_deref(), e)
            }
        }
    }

    /// The percentage to report for `done` of `total`, if it starts a new
    /// tenth for `label` (never when the total is unknown).
    fn new_tenth(&mut self, label: &str, done: u64, total: Option<u64>) -> Option<u64> {
        let total = total.filter(|t| *t > 0)?;
        let tenth = done.min(total) * 10 / total;
        let last = self.tenths.insert(label.to_string(), tenth);
        (last != Some(tenth)).then_some(tenth * 10)
    }
}

/// An expected duration as people say it: `~40 s`, `~3 min`.
pub(crate) fn expected(secs: u64) -> String {
    if secs < 90 {
        format!("~{secs} s")
    } else {
        format!("~{} min", secs.div_ceil(60))
    }
}

/// How long a finished stage took: `0.4s`, `12.0s`, `3m 05s`.
pub(crate) fn took(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m {:02}s", secs / 60, secs % 60)
    }
}

/// `total` of `unit` for a plain line: `3.00 MiB`, `7 items`.
fn amount(total: Option<u64>, unit: ProgressUnit) -> String {
    let n = total.unwrap_or(0);
    match unit {
        ProgressUnit::Bytes => HumanBytes(n).to_string(),
        ProgressUnit::Items => format!("{n} items"),
        ProgressUnit::Steps => format!("{n} steps"),
        ProgressUnit::Other => n.to_string(),
    }
}

/// The terminal rendering: a spinner for the running stage, a bar per
/// progress label under it.
struct Bars {
    prefix: String,
    stage: Option<RunningStage>,
}

struct RunningStage {
    /// The stage's line as it stays once finished (`stage: message`).
    text: String,
    line: ProgressBar,
    started: Instant,
    steps: HashMap<String, ProgressBar>,
}

impl Bars {
    fn new(prefix: Option<&str>) -> Self {
        Bars {
            prefix: prefix.map_or_else(String::new, |p| format!("{p}: ")),
            stage: None,
        }
    }

    fn show(&mut self, e: &Event) {
        match e {
            Event::Stage {
                stage,
                message,
                expected_secs,
            } => {
                self.finish(true);
                let text = if message.is_empty() {
                    stage.clone()
                } else {
                    format!("{stage}: {message}")
                };
                let expect = expected_secs
                    .map(|s| format!(", {} expected", expected(s)))
                    .unwrap_or_default();
                let line = SCREEN.add(ProgressBar::new_spinner());
                line.set_style(style(&format!(
                    "{{spinner:.cyan}} {{prefix}}{{msg}} [{{elapsed}}{expect}]"
                )));
                line.set_prefix(self.prefix.clone());
                line.set_message(text.clone());
                line.enable_steady_tick(TICK);
                self.stage = Some(RunningStage {
                    text,
                    line,
                    started: Instant::now(),
                    steps: HashMap::new(),
                });
            }
            Event::Progress {
                label,
                done,
                total,
                unit,
                ..
            } => {
                let Some(stage) = &mut self.stage else {
                    return;
                };
                let after = stage.steps.values().last().unwrap_or(&stage.line).clone();
                let bar = stage.steps.entry(label.clone()).or_insert_with(|| {
                    let bar = SCREEN.insert_after(&after, ProgressBar::no_length());
                    bar.set_style(step_style(*total, *unit));
                    bar.set_message(short_digests(label));
                    bar
                });
                if let Some(t) = total {
                    bar.set_length(*t);
                }
                bar.set_position(*done);
            }
            Event::Log { .. } => {
                if let Some(line) = super::event_line(None, e) {
                    let _ = SCREEN.println(format!("{}{line}", self.prefix));
                }
            }
            Event::Done { .. } => self.finish(true),
            Event::Failed { .. } => self.finish(false),
            Event::Unknown => {}
        }
    }

    /// Turns the running stage into its one finished line.
    fn finish(&mut self, ok: bool) {
        let Some(stage) = self.stage.take() else {
            return;
        };
        for bar in stage.steps.values() {
            bar.finish_and_clear();
            SCREEN.remove(bar);
        }
        stage.line.finish_and_clear();
        SCREEN.remove(&stage.line);
        // Printed above the live lines rather than left in place, so
        // finished stages and log lines stay in the order they happened.
        let _ = SCREEN.println(format!(
            "{} {}{} ({})",
            if ok { "✓" } else { "✗" },
            self.prefix,
            stage.text,
            took(stage.started.elapsed())
        ));
    }
}

impl Drop for Bars {
    /// The stream broke off (daemon gone, Ctrl-C): the stage did not finish.
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// `label` with every `sha256:<64 hex>` cut to 12 hex digits, as `docker`
/// shows them, so a layer's bar fits on one line.
fn short_digests(label: &str) -> String {
    const PREFIX: &str = "sha256:";
    let mut out = String::new();
    let mut rest = label;
    while let Some(at) = rest.find(PREFIX) {
        let (before, from) = rest.split_at(at + PREFIX.len());
        out.push_str(before);
        let hex = from.chars().take_while(char::is_ascii_hexdigit).count();
        let keep = if hex == 64 { 12 } else { hex };
        out.push_str(&from[..keep]);
        rest = &from[hex..];
    }
    out.push_str(rest);
    out
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
        .progress_chars("=> ")
}

/// A byte bar with rate and ETA, or a counter; a spinner when the total is
/// unknown.
fn step_style(total: Option<u64>, unit: ProgressUnit) -> ProgressStyle {
    style(match (unit, total) {
        (ProgressUnit::Bytes, Some(_)) => {
            "    {msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
        }
        (ProgressUnit::Bytes, None) => "    {spinner} {msg} {bytes} {binary_bytes_per_sec}",
        (_, Some(_)) => "    {msg} [{wide_bar}] {pos}/{len}",
        (_, None) => "    {spinner} {msg} {pos}",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(stage: &str, message: &str, expected_secs: Option<u64>) -> Event {
        Event::Stage {
            stage: stage.into(),
            message: message.into(),
            expected_secs,
        }
    }

    fn bytes(label: &str, done: u64, total: Option<u64>) -> Event {
        Event::Progress {
            stage: "pull_kernel".into(),
            label: label.into(),
            done,
            total,
            unit: ProgressUnit::Bytes,
        }
    }

    fn lines(prefix: Option<&str>, events: &[Event]) -> Vec<String> {
        let mut plain = Plain::new(prefix);
        events.iter().filter_map(|e| plain.line(e)).collect()
    }

    #[test]
    fn plain_lines_show_each_stage_and_each_tenth_of_a_download() {
        let mib = 1 << 20;
        let total = 4 * mib;
        // Chunks of a quarter MiB: 17 events from 0 to 4 MiB, crossing every
        // tenth once, with several events inside one tenth.
        let mut events = vec![stage("pull_kernel", "pulling kernel k", None)];
        events.extend((0..=16).map(|i| bytes("kernel k", i * mib / 4, Some(total))));
        events.push(Event::Log {
            level: "info".into(),
            message: "kernel k: checksum verified".into(),
        });
        events.push(Event::Done {
            result: serde_json::Value::Null,
        });
        let mut want = vec!["==> pull_kernel: pulling kernel k".to_string()];
        // 4 MiB in tenths of 409.6 KiB: the quarter-MiB steps land in
        // tenths 0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 6, 7, 8, 8, 9, 10.
        for pct in [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100] {
            want.push(format!("    kernel k: {pct}% of 4.00 MiB"));
        }
        want.push("    kernel k: checksum verified".into());
        assert_eq!(lines(None, &events), want);
    }

    #[test]
    fn plain_lines_state_the_expected_duration_and_the_prefix() {
        let events = [
            stage("build_kernel", "", Some(1200)),
            stage("launch_vmm", "firecracker", Some(40)),
            Event::Progress {
                stage: "build_kernel".into(),
                label: "objects".into(),
                done: 3,
                total: Some(6),
                unit: ProgressUnit::Items,
            },
        ];
        assert_eq!(
            lines(Some("dev"), &events),
            [
                "dev: ==> build_kernel (~20 min expected)",
                "dev: ==> launch_vmm: firecracker (~40 s expected)",
                "dev:     objects: 50% of 6 items",
            ]
        );
    }

    #[test]
    fn plain_lines_skip_unknown_totals_unknown_events_and_the_end() {
        let events = [
            bytes("image x", 100, None),
            Event::Unknown,
            Event::Failed {
                stage: Some("pull_image".into()),
                error: "gone".into(),
            },
        ];
        assert_eq!(lines(None, &events), Vec::<String>::new());
    }

    #[test]
    fn a_label_reports_afresh_in_a_new_stage() {
        let events = [
            stage("a", "", None),
            bytes("upload", 5, Some(10)),
            stage("b", "", None),
            bytes("upload", 5, Some(10)),
        ];
        assert_eq!(
            lines(None, &events),
            [
                "==> a",
                "    upload: 50% of 10 B",
                "==> b",
                "    upload: 50% of 10 B",
            ]
        );
    }

    #[test]
    fn bar_labels_show_digests_short() {
        let hex = "26c2c99d0c49c7dc30e9206d97d6920aee7036f42bd795eb2629889cf2bcf7ba";
        assert_eq!(
            short_digests(&format!("layer sha256:{hex}")),
            format!("layer sha256:{}", &hex[..12])
        );
        assert_eq!(
            short_digests("image sha256:abc and sha256:"),
            "image sha256:abc and sha256:",
            "only whole digests are cut"
        );
        assert_eq!(short_digests("kernel void-6.12"), "kernel void-6.12");
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(expected(40), "~40 s");
        assert_eq!(expected(90), "~2 min");
        assert_eq!(expected(1200), "~20 min");
        assert_eq!(took(Duration::from_millis(400)), "0.4s");
        assert_eq!(took(Duration::from_secs(185)), "3m 05s");
    }
}
