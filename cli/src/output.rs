//! Human output: aligned tables, VM summaries, progress events.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use banger_api::api::{CapView, Event, VersionInfo, VmView};
use banger_api::model::{ByteSize, now_unix};

mod progress;

pub use progress::show_events;

/// Prints `line` and a newline on stderr in one write: `eprintln!` writes
/// each formatted piece and the newline separately (stderr is unbuffered),
/// so a progress line would cost a reader of the pipe several wakeups.
pub fn eprint_line(mut line: String) {
    line.push('\n');
    eprint!("{line}");
}

/// Left-aligned columns separated by two spaces, no trailing blanks.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths.get(i).copied().unwrap_or(0);
            let _ = write!(line, "{cell:<pad$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Memory in MiB as a size (`2G`, `1536M`).
pub fn mib(m: u32) -> String {
    ByteSize(u64::from(m) << 20).to_string()
}

/// How long ago `unix` was, coarsened to at most two units (`3h 12m`).
pub fn age(unix: u64, now: u64) -> String {
    let secs = now.saturating_sub(unix);
    let coarse = match secs {
        s if s < 60 => s,
        s if s < 3600 => s / 60 * 60,
        s if s < 86_400 => s / 60 * 60,
        s => s / 3600 * 3600,
    };
    let text = humantime::format_duration(Duration::from_secs(coarse)).to_string();
    // humantime prints every unit; keep the two largest.
    text.split(' ').take(2).collect::<Vec<_>>().join(" ")
}

/// An RFC 3339 time for a Unix timestamp.
pub fn timestamp(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// The `vm list` table.
pub fn vm_table(vms: &[VmView]) -> String {
    let now = now_unix();
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            let r = &v.record;
            let caps: Vec<&str> = r.caps.iter().map(|c| c.name.as_str()).collect();
            vec![
                r.name.to_string(),
                r.state.to_string(),
                r.spec.vcpus.to_string(),
                mib(r.spec.memory_mib),
                r.spec.disk_size.to_string(),
                if caps.is_empty() {
                    "-".into()
                } else {
                    caps.join(",")
                },
                r.vmm
                    .as_ref()
                    .map_or_else(|| "-".into(), |p| p.pid.to_string()),
                age(r.created_at, now),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "STATE", "VCPU", "MEMORY", "DISK", "CAPS", "PID", "AGE",
        ],
        &rows,
    )
}

/// Everything about one VM, as `vm show` prints it.
pub fn vm_details(v: &VmView) -> String {
    let r = &v.record;
    let s = &r.spec;
    let mut o = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "{:<12} {v}", format!("{k}:"));
    };
    kv("name", r.name.to_string());
    kv("id", r.id.to_string());
    kv("dir", v.dir.display().to_string());
    kv("state", r.state.to_string());
    if let Some(ip) = v.address {
        kv("address", format!("{ip} ({}.vm)", r.name));
    }
    kv("vcpus", s.vcpus.to_string());
    kv("memory", mib(s.memory_mib));
    kv("disk size", s.disk_size.to_string());
    kv("kernel", s.kernel.display().to_string());
    kv(
        "initrd",
        s.initrd
            .as_ref()
            .map_or_else(|| "-".into(), |p| p.display().to_string()),
    );
    kv("rootfs", s.rootfs_source.display().to_string());
    kv(
        "boot args",
        s.extra_boot_args.clone().unwrap_or_else(|| "-".into()),
    );
    kv("vmm", s.vmm.as_str().to_string());
    kv(
        "pid",
        r.vmm
            .as_ref()
            .map_or_else(|| "-".into(), |p| p.pid.to_string()),
    );
    kv(
        "created",
        format!(
            "{} ({} ago)",
            timestamp(r.created_at),
            age(r.created_at, now_unix())
        ),
    );
    if let Some(f) = &r.last_error {
        kv(
            "error stage",
            format!("{} (at {})", f.stage, timestamp(f.at)),
        );
        kv("error", f.cause.clone());
    }
    if r.caps.is_empty() {
        kv("caps", "-".into());
    } else {
        let _ = writeln!(o, "caps:");
        let rows: Vec<Vec<String>> = r
            .caps
            .iter()
            .map(|c| {
                let opts: Vec<String> = c.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vec![String::new(), c.name.clone(), opts.join(",")]
            })
            .collect();
        o.push_str(&table_body(&rows));
    }
    o.push_str(&crate::ports::show_lines(v));
    if let Some(m) = &r.machine {
        let _ = writeln!(o, "{:<12} {}", "cmdline:", m.boot_args);
        if let Some(v) = &m.vsock {
            let _ = writeln!(
                o,
                "{:<12} cid {} at {}",
                "vsock:",
                v.guest_cid,
                v.uds_path.display()
            );
        }
        for n in &m.nics {
            let _ = writeln!(o, "{:<12} {} tap {} mac {}", "nic:", n.id, n.tap, n.mac);
        }
        let _ = writeln!(o, "drives:");
        let rows: Vec<Vec<String>> = m
            .drives
            .iter()
            .map(|d| {
                vec![
                    String::new(),
                    d.id.clone(),
                    format!("{:?}", d.role).to_lowercase(),
                    if d.read_only { "ro" } else { "rw" }.into(),
                    d.path.display().to_string(),
                ]
            })
            .collect();
        o.push_str(&table_body(&rows));
    }
    if let Some(g) = &r.guest
        && !g.mounts.is_empty()
    {
        let _ = writeln!(o, "mounts:");
        let rows: Vec<Vec<String>> = g
            .mounts
            .iter()
            .map(|m| {
                vec![
                    String::new(),
                    m.mount_point.display().to_string(),
                    m.drive_id.clone(),
                    m.fstype.clone(),
                    if m.read_only { "ro" } else { "rw" }.into(),
                ]
            })
            .collect();
        o.push_str(&table_body(&rows));
    }
    if let Some(t) = &r.last_start {
        o.push_str(&last_start(t));
    }
    o
}

/// The `last start:` block of `vm show`: when, the outcome and total, then
/// one line per stage with its duration.
fn last_start(t: &banger_api::model::StartTimings) -> String {
    let outcome = if t.ok { "running" } else { "failed" };
    let mut o = format!(
        "{:<12} {} ({outcome}), {} ms in all\n",
        "last start:",
        timestamp(t.at),
        t.total_ms
    );
    let rows: Vec<Vec<String>> = t
        .stages
        .iter()
        .map(|s| vec![String::new(), s.stage.clone(), format!("{} ms", s.ms)])
        .collect();
    o.push_str(&table_body(&rows));
    o
}

/// An aligned table without a header line (rows start with an empty cell to
/// indent them).
fn table_body(rows: &[Vec<String>]) -> String {
    let headers: Vec<&str> = rows
        .first()
        .map_or(vec![], |r| r.iter().map(|_| "").collect());
    let t = table(&headers, rows);
    t.split_once('\n')
        .map_or(t.clone(), |(_, rest)| rest.to_string())
}

/// The `cap list` table.
pub fn cap_table(caps: &[CapView]) -> String {
    let rows: Vec<Vec<String>> = caps
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.source.to_string(),
                if c.default { "yes" } else { "no" }.into(),
                c.description.clone(),
            ]
        })
        .collect();
    table(&["NAME", "SOURCE", "DEFAULT", "DESCRIPTION"], &rows)
}

/// One version line (`0.1.0 (commit abc, built ...)`).
pub fn version_line(v: &VersionInfo) -> String {
    format!(
        "{} (commit {}, built {})",
        v.version,
        v.commit,
        timestamp(v.built_at)
    )
}

/// A progress event as a stderr line, or `None` for the terminal events the
/// caller reports itself. `prefix` names the VM when several run at once.
pub fn event_line(prefix: Option<&str>, e: &Event) -> Option<String> {
    let body = match e {
        Event::Stage {
            stage,
            message,
            expected_secs,
        } => {
            let mut line = format!("==> {stage}");
            if !message.is_empty() {
                line.push_str(&format!(": {message}"));
            }
            if let Some(secs) = expected_secs {
                line.push_str(&format!(" ({} expected)", progress::expected(*secs)));
            }
            line
        }
        Event::Log { level, message } if level == "info" => format!("    {message}"),
        Event::Log { level, message } if level == "warn" => format!("warning: {message}"),
        Event::Log { level, message } => format!("{level}: {message}"),
        Event::Done { .. } | Event::Failed { .. } | Event::Progress { .. } | Event::Unknown => {
            return None;
        }
    };
    Some(match prefix {
        Some(p) => format!("{p}: {body}"),
        None => body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_trims_trailing_blanks() {
        let t = table(
            &["NAME", "STATE", "X"],
            &[
                vec!["a".into(), "running".into(), "".into()],
                vec!["long-name".into(), "s".into(), "1".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME       STATE    X\na          running\nlong-name  s        1\n"
        );
    }

    #[test]
    fn ages_keep_two_units() {
        assert_eq!(age(100, 100), "0s");
        assert_eq!(age(0, 59), "59s");
        assert_eq!(age(0, 5 * 60 + 7), "5m");
        assert_eq!(age(0, 3 * 3600 + 12 * 60 + 9), "3h 12m");
        assert_eq!(age(0, 2 * 86_400 + 5 * 3600 + 59), "2days 5h");
        assert_eq!(age(200, 100), "0s");
    }

    #[test]
    fn memory_uses_largest_exact_unit() {
        assert_eq!(mib(2048), "2G");
        assert_eq!(mib(1536), "1536M");
    }

    #[test]
    fn events_render_stages_warnings_and_prefix() {
        let stage = Event::Stage {
            stage: "launch_vmm".into(),
            message: "firecracker".into(),
            expected_secs: None,
        };
        assert_eq!(
            event_line(None, &stage).unwrap(),
            "==> launch_vmm: firecracker"
        );
        assert_eq!(
            event_line(Some("dev"), &stage).unwrap(),
            "dev: ==> launch_vmm: firecracker"
        );
        let warn = Event::Log {
            level: "warn".into(),
            message: "slow".into(),
        };
        assert_eq!(event_line(None, &warn).unwrap(), "warning: slow");
        let failed = Event::Failed {
            stage: None,
            error: "x".into(),
        };
        assert_eq!(event_line(None, &failed), None);
    }

    #[test]
    fn vm_details_show_caps_error_drives_and_mounts() {
        use banger_api::guest::{GuestConfig, GuestMount};
        use banger_api::machine::{Drive, DriveRole, MachineSpec};
        use banger_api::model::{
            CapOptions, EnabledCap, Failure, VmId, VmName, VmRecord, VmSpec, VmState, VmmKind,
            VmmProcess,
        };
        let mut guest = GuestConfig::new("dev");
        guest.mounts.push(GuestMount {
            drive_id: "work".into(),
            mount_point: "/root".into(),
            fstype: "ext4".into(),
            read_only: false,
        });
        let vm = VmView {
            address: None,
            record: VmRecord {
                id: VmId::from_stored("00000000deadbeef".into()),
                name: VmName::parse("dev").unwrap(),
                state: VmState::Error,
                spec: VmSpec {
                    vcpus: 2,
                    memory_mib: 1536,
                    disk_size: ByteSize(8 << 30),
                    kernel: "/k/vmlinux".into(),
                    initrd: None,
                    rootfs_source: "/img/root.ext4".into(),
                    extra_boot_args: Some("quiet".into()),
                    vmm: VmmKind::Firecracker,
                },
                caps: vec![
                    EnabledCap {
                        name: "work-disk".into(),
                        options: CapOptions::new(),
                    },
                    EnabledCap {
                        name: "shared-mount".into(),
                        options: [("guest", "/mnt"), ("host", "/src")]
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .into(),
                    },
                ],
                prepared: vec![],
                vmm: Some(VmmProcess {
                    pid: 4242,
                    start_time: 1,
                    api_socket: "/run/x.sock".into(),
                }),
                last_error: Some(Failure {
                    stage: "prepare_host:work-disk".into(),
                    cause: "mkfs.ext4 failed: exit 1".into(),
                    at: 0,
                }),
                machine: Some(MachineSpec {
                    kernel: "/k/vmlinux".into(),
                    initrd: None,
                    boot_args: "console=ttyS0 quiet".into(),
                    vcpus: 2,
                    memory_mib: 1536,
                    drives: vec![Drive {
                        id: "rootfs".into(),
                        path: "/vms/dev/root.ext4".into(),
                        read_only: true,
                        role: DriveRole::Root,
                    }],
                    nics: vec![],
                    vsock: None,
                    serial_log: "/vms/dev/serial.log".into(),
                    pci_devices: Vec::new(),
                }),
                guest: Some(guest),
                booted_once: false,
                created_at: 0,
                updated_at: 0,
                last_start: None,
            },
            dir: "/vms/00000000deadbeef".into(),
        };
        let text = vm_details(&vm);
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l.trim_end() == line),
                "missing line {line:?} in:\n{text}"
            )
        };
        has("name:        dev");
        has("id:          00000000deadbeef");
        has("dir:         /vms/00000000deadbeef");
        has("state:       error");
        has("memory:      1536M");
        has("disk size:   8G");
        has("initrd:      -");
        has("pid:         4242");
        has("error stage: prepare_host:work-disk (at 1970-01-01T00:00:00Z)");
        has("error:       mkfs.ext4 failed: exit 1");
        has("cmdline:     console=ttyS0 quiet");
        has("  work-disk");
        has("  shared-mount  guest=/mnt,host=/src");
        has("  rootfs  root  ro  /vms/dev/root.ext4");
        has("  /root  work  ext4  rw");
    }
}
