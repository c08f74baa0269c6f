//! `banger system install | status | restart | uninstall`: the root helper
//! (`banger-helper`) as a system service, its config, the group that may
//! reach its socket, and the user daemon's unit. Run with sudo from the
//! user's own shell. With systemd as PID 1 the helper is a socket-activated
//! unit; without it (containers, CI) the units are still written, and the
//! helper runs as `banger-helper run`, a supervised root process with its
//! pid file in its runtime directory. `--root` (or `BANGER_SYSTEM_ROOT`)
//! installs under another directory, for tests and packaging.
//! See docs/privileges.md.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use banger_api::fsutil::write_atomic;
use banger_api::helper::{HelperClient, HelperConfigFile, UserEntry};
use serde::{Deserialize, Serialize};

use crate::args::{SystemArgs, SystemCommand, SystemInstallArgs};

/// Where everything goes, under `root` (`/` normally).
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
}

impl Layout {
    fn at(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }
    fn helper_bin(&self) -> PathBuf {
        self.at("/usr/local/libexec/banger/banger-helper")
    }
    fn config(&self) -> PathBuf {
        self.at("/etc/banger/helper.toml")
    }
    fn record(&self) -> PathBuf {
        self.at("/etc/banger/install.toml")
    }
    fn socket(&self) -> PathBuf {
        self.at("/run/banger-helper/helper.sock")
    }
    fn pid_file(&self) -> PathBuf {
        self.at("/run/banger-helper/helper.pid")
    }
    fn log(&self) -> PathBuf {
        self.at("/var/log/banger-helper.log")
    }
    fn unit(&self, name: &str) -> PathBuf {
        self.at("/etc/systemd/system").join(name)
    }
    fn user_unit(&self) -> PathBuf {
        self.at("/etc/systemd/user/bangerd.service")
    }
}

/// What `install` put on the host, so `uninstall` removes exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
struct InstallRecord {
    version: String,
    files: Vec<PathBuf>,
    created_group: Option<String>,
}

const SOCKET_UNIT: &str = "banger-helper.socket";
const SERVICE_UNIT: &str = "banger-helper.service";

/// Runs a `banger system` command.
pub async fn run(args: SystemArgs) -> Result<ExitCode> {
    let layout = Layout {
        root: args.root.unwrap_or_else(|| PathBuf::from("/")),
    };
    match args.command {
        SystemCommand::Install(a) => install(&layout, a),
        SystemCommand::Status => status(&layout).await,
        SystemCommand::Restart => {
            need_root("restart")?;
            restart(&layout)?;
            println!("banger-helper restarted");
            Ok(ExitCode::SUCCESS)
        }
        SystemCommand::Uninstall => uninstall(&layout),
    }
}

fn need_root(verb: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("`banger system {verb}` changes system files: run it as `sudo banger system {verb}`");
    }
    Ok(())
}

/// Whether systemd manages this machine (PID 1 is systemd).
fn systemd_running() -> Option<bool> {
    let comm = std::fs::read_to_string("/proc/1/comm").ok()?;
    Some(comm.trim() == "systemd")
}

fn pid1() -> String {
    std::fs::read_to_string("/proc/1/comm")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn install(layout: &Layout, a: SystemInstallArgs) -> Result<ExitCode> {
    need_root("install")?;
    let user = match a.user.or_else(|| std::env::var("SUDO_USER").ok()) {
        Some(u) if !u.is_empty() => u,
        _ => bail!(
            "Which user's daemon may use the helper? Run `sudo banger system install` from that user's shell, or pass --user NAME"
        ),
    };
    let account = nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .with_context(|| format!("user {user:?} does not exist"))?;
    let mut record = read_record(layout).unwrap_or_default();
    record.version = env!("CARGO_PKG_VERSION").to_string();

    // The group whose members may reach the socket.
    if nix::unistd::Group::from_name(&a.group)?.is_none() {
        run_tool("groupadd", &["--system", &a.group])?;
        record.created_group = Some(a.group.clone());
        println!("created group {}", a.group);
    }
    run_tool("usermod", &["-aG", &a.group, &user])?;

    // The helper binary: a copy of the one next to this banger.
    let src = sibling("banger-helper")?;
    let bin = layout.helper_bin();
    copy_executable(&src, &bin)?;
    record.files.push(bin.clone());

    // Its config: this user's entry added or replaced, others kept.
    let mut config = match std::fs::read_to_string(layout.config()) {
        Ok(text) => HelperConfigFile::parse(&layout.config(), &text)?,
        Err(_) => HelperConfigFile::default(),
    };
    config.group = Some(a.group.clone());
    for d in &a.vfio_devices {
        let d: banger_api::machine::PciAddress = d.parse()?;
        if !config.vfio_devices.contains(&d.to_string()) {
            config.vfio_devices.push(d.to_string());
        }
    }
    let entry = user_entry(
        &user,
        &account,
        a.state_dir,
        a.bridge,
        a.subnet,
        a.tap_prefix,
    );
    config.users.retain(|u| u.name != user);
    config.users.push(entry.clone());
    write_root_file(&layout.config(), config.to_toml().as_bytes(), 0o644)?;
    record.files.push(layout.config());

    // The units, written (and checked by tests) even without systemd.
    let bangerd = sibling("bangerd")?;
    for (path, text) in [
        (layout.unit(SOCKET_UNIT), socket_unit(layout, &a.group)),
        (layout.unit(SERVICE_UNIT), service_unit(layout)),
        (layout.user_unit(), user_unit(&bangerd)),
    ] {
        write_root_file(&path, text.as_bytes(), 0o644)?;
        record.files.push(path);
    }
    record.files.sort();
    record.files.dedup();
    write_record(layout, &record)?;

    start_helper(layout)?;
    println!(
        "banger-helper {} installed for {user} (bridge {}, subnet {}, taps {}*)",
        record.version,
        entry.bridge.as_deref().unwrap_or("?"),
        entry.subnet.as_deref().unwrap_or("?"),
        entry.tap_prefix.as_deref().unwrap_or("?"),
    );
    println!(
        "{user} was added to group {}: log in again (or `newgrp {}`) so the daemon can reach {}",
        a.group,
        a.group,
        layout.socket().display()
    );
    println!(
        "then restart your daemon as {user}: `banger daemon stop` (the next command starts it)"
    );
    Ok(ExitCode::SUCCESS)
}

/// The `[[users]]` entry: names given, else derived from the user's state
/// directory as the daemon derives them.
fn user_entry(
    user: &str,
    account: &nix::unistd::User,
    state_dir: Option<PathBuf>,
    bridge: Option<String>,
    subnet: Option<String>,
    tap_prefix: Option<String>,
) -> UserEntry {
    let state_dir = state_dir.unwrap_or_else(|| account.dir.join(".local/state/banger"));
    let derived = banger_api::helper::derived_network(&state_dir);
    UserEntry {
        name: user.to_string(),
        bridge: Some(bridge.unwrap_or(derived.bridge)),
        subnet: Some(subnet.unwrap_or_else(|| derived.subnet.to_string())),
        tap_prefix: Some(tap_prefix.unwrap_or_else(|| derived.tap_prefixes[0].clone())),
    }
}

/// Starts (or restarts, to pick up a new binary and config) the helper.
fn start_helper(layout: &Layout) -> Result<()> {
    if systemd_running() == Some(true) && layout.root == Path::new("/") {
        run_tool("systemctl", &["daemon-reload"])?;
        run_tool("systemctl", &["enable", "--now", SOCKET_UNIT])?;
        run_tool("systemctl", &["restart", SERVICE_UNIT])?;
        return Ok(());
    }
    println!(
        "systemd is not running (PID 1 is {}): starting banger-helper as a supervised root process (pid file {})",
        pid1(),
        layout.pid_file().display()
    );
    restart(layout)
}

/// Stops the supervised helper if it runs and starts it again, then waits
/// until its socket answers.
fn restart(layout: &Layout) -> Result<()> {
    if systemd_running() == Some(true) && layout.root == Path::new("/") {
        run_tool("systemctl", &["restart", SOCKET_UNIT, SERVICE_UNIT])?;
        return Ok(());
    }
    stop_supervised(layout)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ensure_parent(&layout.log())?)
        .with_context(|| format!("Cannot open {}", layout.log().display()))?;
    Command::new(layout.helper_bin())
        .arg("run")
        .arg("--config")
        .arg(layout.config())
        .arg("--socket")
        .arg(layout.socket())
        .arg("--pid-file")
        .arg(ensure_parent(&layout.pid_file())?)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("Cannot start {}", layout.helper_bin().display()))?;
    let client = HelperClient::new(layout.socket());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.ping() {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "banger-helper did not answer on {} within 10 s ({}); see {}",
                    layout.socket().display(),
                    banger_api::error::render_chain(&e),
                    layout.log().display()
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The supervisor's pid, if its pid file names a live process.
fn supervised_pid(layout: &Layout) -> Option<nix::unistd::Pid> {
    let text = std::fs::read_to_string(layout.pid_file()).ok()?;
    let pid = nix::unistd::Pid::from_raw(text.trim().parse().ok()?);
    alive(pid).then_some(pid)
}

/// Running and not a zombie (where PID 1 does not reap, an exited
/// supervisor stays one).
fn alive(pid: nix::unistd::Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last ')'.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !state.is_some_and(|s| s.starts_with('Z'))
}

fn stop_supervised(layout: &Layout) -> Result<()> {
    let Some(pid) = supervised_pid(layout) else {
        return Ok(());
    };
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("Cannot stop banger-helper (pid {pid})"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("banger-helper (pid {pid}) did not exit within 10 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

async fn status(layout: &Layout) -> Result<ExitCode> {
    let installed = layout.helper_bin().exists();
    let bin_version = Command::new(layout.helper_bin())
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    println!(
        "helper binary:  {}",
        match (&bin_version, installed) {
            (Some(v), true) => format!("{} ({v})", layout.helper_bin().display()),
            _ => "not installed (sudo banger system install)".to_string(),
        }
    );
    let manager = match systemd_running() {
        Some(true) => "systemd".to_string(),
        _ => format!("supervised process (PID 1 is {})", pid1()),
    };
    println!("service:        {manager}");
    let helper = HelperClient::new(layout.socket());
    let running = match helper.ping() {
        Ok(v) => {
            println!(
                "helper:         running, banger-helper {v}, on {}",
                layout.socket().display()
            );
            true
        }
        Err(e) => {
            println!(
                "helper:         not answering: {}",
                banger_api::error::render_chain(&e)
            );
            false
        }
    };
    if let Some(pid) = supervised_pid(layout) {
        println!("supervisor pid: {pid}");
    }
    let paths = banger_api::paths::Paths::from_env()?;
    let client = crate::daemon::client(&paths);
    match crate::daemon::probe(&client).await.ok().flatten() {
        Some(v) => println!(
            "daemon:         running, bangerd {} ({}), on {}",
            v.version,
            v.commit,
            paths.socket().display()
        ),
        None => println!(
            "daemon:         not running on {} (any banger command starts it)",
            paths.socket().display()
        ),
    }
    Ok(if installed && running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn uninstall(layout: &Layout) -> Result<ExitCode> {
    need_root("uninstall")?;
    let Some(record) = read_record(layout) else {
        println!(
            "nothing to uninstall: {} does not exist",
            layout.record().display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    let config = std::fs::read_to_string(layout.config())
        .ok()
        .and_then(|t| HelperConfigFile::parse(&layout.config(), &t).ok());
    if systemd_running() == Some(true) && layout.root == Path::new("/") {
        let _ = run_tool(
            "systemctl",
            &["disable", "--now", SOCKET_UNIT, SERVICE_UNIT],
        );
    }
    stop_supervised(layout)?;
    for f in record.files.iter().chain([&layout.record()]) {
        match std::fs::remove_file(f) {
            Ok(()) => println!("removed {}", f.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("Cannot remove {}", f.display())),
        }
    }
    for dir in [
        "/usr/local/libexec/banger",
        "/etc/banger",
        "/run/banger-helper",
    ] {
        let _ = std::fs::remove_dir(layout.at(dir));
    }
    if systemd_running() == Some(true) && layout.root == Path::new("/") {
        let _ = run_tool("systemctl", &["daemon-reload"]);
    }
    if let Some(group) = &record.created_group {
        run_tool("groupdel", &[group])?;
        println!("removed group {group}");
    }
    println!("left in place (remove by hand if you no longer need them):");
    println!("  {} (the helper's log)", layout.log().display());
    for entry in config.map(|c| c.users).unwrap_or_default() {
        let Some(account) = nix::unistd::User::from_name(&entry.name).ok().flatten() else {
            continue;
        };
        for sub in [".local/state/banger", ".config/banger", ".cache/banger"] {
            let p = account.dir.join(sub);
            if p.exists() {
                println!(
                    "  {} ({}'s VMs, images and settings)",
                    p.display(),
                    entry.name
                );
            }
        }
        for link in [entry.bridge.as_deref()].into_iter().flatten() {
            if Path::new("/sys/class/net").join(link).exists() {
                println!("  network link {link} (`sudo ip link del {link}` once its VMs are gone)");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A program installed next to the running `banger`.
fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("Cannot find banger's own path")?;
    let p = me.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} not found next to {}: install banger's binaries together (scripts/install)",
            p.display(),
            me.display()
        );
    }
    Ok(p)
}

fn ensure_parent(path: &Path) -> Result<PathBuf> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    Ok(path.to_path_buf())
}

/// Writes a root-owned file (staged, then renamed) with `mode`.
fn write_root_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    ensure_parent(path)?;
    write_atomic(path, bytes, mode).with_context(|| format!("Cannot write {}", path.display()))
}

fn copy_executable(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).with_context(|| format!("Cannot read {}", src.display()))?;
    write_root_file(dst, &bytes, 0o755)
}

fn read_record(layout: &Layout) -> Option<InstallRecord> {
    toml::from_str(&std::fs::read_to_string(layout.record()).ok()?).ok()
}

fn write_record(layout: &Layout, record: &InstallRecord) -> Result<()> {
    let text = toml::to_string(record).context("Cannot encode the install record")?;
    write_root_file(&layout.record(), text.as_bytes(), 0o644)
}

fn run_tool(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("Cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn socket_unit(layout: &Layout, group: &str) -> String {
    format!(
        "# Written by `banger system install`; see docs/privileges.md.
[Unit]
Description=banger root helper socket

[Socket]
ListenStream={socket}
SocketUser=root
SocketGroup={group}
SocketMode=0660
DirectoryMode=0755
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
",
        socket = layout.socket().display()
    )
}

fn service_unit(layout: &Layout) -> String {
    format!(
        "# Written by `banger system install`; see docs/privileges.md.
[Unit]
Description=banger root helper: bridge, taps, nftables, resolved routing, VFIO binding
Requires={SOCKET_UNIT}
After={SOCKET_UNIT}

[Service]
Type=simple
ExecStart={bin} serve --config {config} --socket {socket}
NoNewPrivileges=yes
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_DAC_OVERRIDE CAP_FOWNER CAP_CHOWN CAP_NET_BIND_SERVICE
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw
RuntimeDirectory=banger
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
",
        bin = layout.helper_bin().display(),
        config = layout.config().display(),
        socket = layout.socket().display(),
    )
}

fn user_unit(bangerd: &Path) -> String {
    format!(
        "# Written by `banger system install`; enable with `systemctl --user enable --now bangerd`.
[Unit]
Description=banger daemon (runs as you; root work goes through banger-helper)

[Service]
Type=simple
ExecStart={}
Restart=on-failure

[Install]
WantedBy=default.target
",
        bangerd.display()
    )
}
