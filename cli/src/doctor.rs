//! `banger doctor`: what this host has and lacks for a first sandbox, one
//! line per check (`PASS`/`WARN`/`FAIL`), each FAIL with its fix. It reads
//! the same config and paths as every other command, never starts the
//! daemon, and exits non-zero when any check fails. See `docs/doctor.md`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use banger_api::api::VersionInfo;
use banger_api::backend::BackendPlan;
use banger_api::backend::{AgentTransport, HostFacts, QemuAccel};
use banger_api::catalog::Sources;
use banger_api::catalog::images::ImageCatalog;
use banger_api::catalog::kernels::Catalog as KernelCatalog;
use banger_api::config::{Config, find_on_path, is_executable};
use banger_api::model::VmmKind;
use banger_api::paths::Paths;
use serde::Serialize;

/// Firecracker releases banger supports: from 1.10 up to, not including, 2.0
/// (its API is versioned; a 2.x may change what banger calls).
const FIRECRACKER_MIN: (u64, u64) = (1, 10);
const FIRECRACKER_BELOW: (u64, u64) = (2, 0);
/// How long a `--version` run may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);
/// Unix socket paths hold at most this many bytes.
const MAX_SOCKET_PATH: usize = 107;
/// The vsock-agent's socket in a VM directory (`capabilities/vsock_agent.rs`).
const VSOCK_SOCKET_FILE: &str = "vsock.sock";

const INSTALL_QEMU: &str = "sudo apt-get install qemu-system-x86";
const INSTALL_VHOST: &str = "cargo install vhost-device-vsock --locked, then put its bin/ on \
     PATH or set vhost_device_vsock_bin";
const INSTALL_FIRECRACKER: &str = "install a Firecracker release 1.10-1.x from \
     https://github.com/firecracker-microvm/firecracker/releases on PATH (or set firecracker_bin)";

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, but slower or with less than it could.
    Warn,
    /// Something banger needs is missing or broken.
    Fail,
}

/// One check's outcome, as printed and as `--json` gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short name (`kvm`, `qemu`, ...).
    pub check: &'static str,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it (always set for a FAIL).
    pub fix: Option<String>,
}

impl Check {
    fn pass(check: &'static str, detail: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: Option<String>) -> Check {
        Check {
            check,
            status: Status::Warn,
            detail: detail.into(),
            fix,
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// `FAIL qemu: detail; fix: ...`
    fn line(&self) -> String {
        let status = match self.status {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        match &self.fix {
            Some(fix) => format!("{status} {}: {}; fix: {fix}", self.check, self.detail),
            None => format!("{status} {}: {}", self.check, self.detail),
        }
    }
}

/// `banger doctor [--json]`.
pub async fn run(json: bool) -> Result<ExitCode> {
    let checks = all_checks().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
    }
    Ok(if checks.iter().any(|c| c.status == Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn all_checks() -> Vec<Check> {
    let paths = match Paths::from_env() {
        Ok(p) => p,
        Err(e) => return vec![Check::fail("paths", e.to_string(), "set HOME")],
    };
    let (config, config_check) = load_config(&paths);
    let host = HostFacts::probe();
    let plan = config.backend_plan(None);
    let tools = BackendBins::find(&config);
    let mut out = vec![
        config_check,
        architecture(),
        kvm(&host, &plan, &config),
        Check::pass("backend", plan.to_string()),
    ];
    out.extend(backend_checks(&config, &plan, &host, &tools));
    out.push(vsock(&paths, plan.vmm));
    out.push(nft());
    out.push(privileges(&config));
    out.push(dns_addresses(&paths, &config));
    out.push(vmm_jail(&config));
    out.push(default_artifacts(&config, &paths));
    out.push(ssh_identity(&paths, &config));
    out.push(ssh_client());
    out.push(ssh_config_included(&paths));
    out.push(daemon(&paths).await);
    out
}

fn load_config(paths: &Paths) -> (Config, Check) {
    let file = paths.config_file();
    match Config::load(&file) {
        Ok(c) if file.exists() => (c, Check::pass("config", file.display().to_string())),
        Ok(c) => (
            c,
            Check::pass(
                "config",
                format!("no {}: built-in defaults", file.display()),
            ),
        ),
        Err(e) => (
            Config::defaults(&file),
            Check::fail(
                "config",
                format!("{e}; the other checks use the defaults"),
                format!("edit {} as the error says", file.display()),
            ),
        ),
    }
}

fn architecture() -> Check {
    let machine = nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_else(|_| std::env::consts::ARCH.to_string());
    if machine == "x86_64" {
        Check::pass("architecture", machine)
    } else {
        Check::fail(
            "architecture",
            format!("{machine}: banger's backends, kernels and images are x86_64 only"),
            "run banger on an x86_64 host",
        )
    }
}

fn kvm(host: &HostFacts, plan: &BackendPlan, config: &Config) -> Check {
    let Some(blocker) = host.kvm_blocker() else {
        return Check::pass("kvm", "/dev/kvm usable; standard guests boot under KVM");
    };
    let fix = if host.nested_pvm {
        "none needed for qemu; for KVM speed use a host with hardware virtualisation".to_string()
    } else if Path::new("/dev/kvm").exists() {
        "sudo usermod -aG kvm $USER, then log in again".to_string()
    } else {
        "sudo modprobe kvm_intel (or kvm_amd) if this machine has virtualisation".to_string()
    };
    let needs_kvm = plan.vmm == VmmKind::Firecracker || config.qemu_accel == QemuAccel::Kvm;
    let detail = format!("KVM cannot boot a standard guest here: {blocker}");
    if needs_kvm {
        Check::fail(
            "kvm",
            format!("{detail}, but the configuration asks for KVM"),
            format!("{fix}; or set vmm = \"auto\" and qemu_accel = \"auto\""),
        )
    } else {
        Check::warn(
            "kvm",
            format!("{detail}: qemu with TCG (software emulation, slower) will be used"),
            Some(fix),
        )
    }
}

/// A binary the backends need: where it is, or why it is not usable.
#[derive(Debug)]
enum Tool {
    Found(PathBuf),
    Missing(String),
    /// Set in config but not an executable file.
    Broken(String),
}

impl Tool {
    fn find(key: &str, configured: &Option<PathBuf>, name: &str) -> Tool {
        match configured {
            Some(p) if is_executable(p) => Tool::Found(p.clone()),
            Some(p) => Tool::Broken(format!("{key} {} is not an executable file", p.display())),
            None => match find_on_path(name) {
                Some(p) => Tool::Found(p),
                None => Tool::Missing(format!("{name} not found on PATH")),
            },
        }
    }

    fn found(&self) -> Option<&Path> {
        match self {
            Tool::Found(p) => Some(p),
            _ => None,
        }
    }
}

/// The three backend binaries.
#[derive(Debug)]
struct BackendBins {
    firecracker: Tool,
    qemu: Tool,
    vhost: Tool,
}

impl BackendBins {
    fn find(config: &Config) -> BackendBins {
        BackendBins {
            firecracker: Tool::find("firecracker_bin", &config.firecracker_bin, "firecracker"),
            qemu: Tool::find("qemu_bin", &config.qemu_bin, "qemu-system-x86_64"),
            vhost: Tool::find(
                "vhost_device_vsock_bin",
                &config.vhost_device_vsock_bin,
                "vhost-device-vsock",
            ),
        }
    }
}

fn backend_checks(
    config: &Config,
    plan: &BackendPlan,
    host: &HostFacts,
    tools: &BackendBins,
) -> Vec<Check> {
    let fc_version = tools
        .firecracker
        .found()
        .map(|bin| tool_version(bin).and_then(|v| firecracker_in_window(&v).map(|()| v)));
    let fc_usable = matches!(fc_version, Some(Ok(_))) && host.kvm_blocker().is_none();
    // Under the serial transport the agent binary bridges the vsock API,
    // so QEMU runs without vhost-device-vsock.
    let serial = config.qemu_agent_transport == AgentTransport::Serial;
    let qemu_usable = tools.qemu.found().is_some() && (serial || tools.vhost.found().is_some());
    let cfg = config.path.display().to_string();
    let firecracker = firecracker_check(
        &tools.firecracker,
        fc_version,
        plan,
        host,
        qemu_usable,
        &cfg,
    );
    let qemu_needed = plan.vmm == VmmKind::Qemu || !fc_usable;
    let qemu = needed_tool(
        "qemu",
        &tools.qemu,
        "qemu_bin",
        qemu_needed,
        INSTALL_QEMU,
        &cfg,
    );
    let vhost = match &tools.vhost {
        Tool::Missing(_) if serial => Check::pass(
            "vhost-device-vsock",
            "not needed: qemu_agent_transport = \"serial\" bridges the agent with banger-agent"
                .to_string(),
        ),
        _ => needed_tool(
            "vhost-device-vsock",
            &tools.vhost,
            "vhost_device_vsock_bin",
            qemu_needed,
            INSTALL_VHOST,
            &cfg,
        ),
    };
    vec![firecracker, qemu, vhost]
}

/// firecracker: PASS when usable; absent is a WARN while qemu can run VMs
/// and a FAIL when it is asked for or nothing else can.
fn firecracker_check(
    tool: &Tool,
    version: Option<Result<String, String>>,
    plan: &BackendPlan,
    host: &HostFacts,
    qemu_usable: bool,
    cfg: &str,
) -> Check {
    match (tool, version) {
        (Tool::Found(bin), Some(Ok(v))) => match host.kvm_blocker() {
            None => Check::pass("firecracker", format!("{v} at {}", bin.display())),
            Some(_) => Check::warn(
                "firecracker",
                format!(
                    "{v} at {}, but it needs KVM, which cannot boot a standard guest here",
                    bin.display()
                ),
                None,
            ),
        },
        (Tool::Found(bin), Some(Err(why))) => {
            let detail = format!("{} {why}", bin.display());
            if plan.vmm == VmmKind::Firecracker {
                Check::fail("firecracker", detail, INSTALL_FIRECRACKER)
            } else {
                Check::warn("firecracker", detail, Some(INSTALL_FIRECRACKER.to_string()))
            }
        }
        (Tool::Broken(why), _) => Check::fail(
            "firecracker",
            why.clone(),
            format!("fix firecracker_bin in {cfg}, or remove it to search PATH"),
        ),
        (_, _) if plan.vmm == VmmKind::Firecracker => Check::fail(
            "firecracker",
            "firecracker not found on PATH, and vmm = \"firecracker\" in config",
            format!("{INSTALL_FIRECRACKER}; or set vmm = \"auto\" in {cfg}"),
        ),
        (_, _) if qemu_usable => Check::warn(
            "firecracker",
            "firecracker not found on PATH: the qemu backend is used",
            Some(format!("optional: {INSTALL_FIRECRACKER}")),
        ),
        (_, _) => Check::fail(
            "firecracker",
            "firecracker not found on PATH, and the qemu backend lacks a binary (see qemu and \
             vhost-device-vsock): no backend can run a VM",
            format!(
                "install the qemu backend's binaries as their checks say, or {INSTALL_FIRECRACKER}"
            ),
        ),
    }
}

/// A qemu-backend binary: FAIL when missing and the qemu backend is (or
/// must be) used, WARN when it only removes the fallback.
fn needed_tool(
    check: &'static str,
    tool: &Tool,
    key: &str,
    needed: bool,
    install: &str,
    cfg: &str,
) -> Check {
    match tool {
        Tool::Found(bin) => match tool_version(bin) {
            Ok(v) => Check::pass(check, format!("{v} at {}", bin.display())),
            Err(_) => Check::pass(check, bin.display().to_string()),
        },
        Tool::Broken(why) => Check::fail(
            check,
            why.clone(),
            format!("fix {key} in {cfg}, or remove it to search PATH"),
        ),
        Tool::Missing(why) if needed => Check::fail(check, why.clone(), install),
        Tool::Missing(why) => Check::warn(
            check,
            format!("{why}: no qemu fallback"),
            Some(install.to_string()),
        ),
    }
}

/// The first line of `bin --version`, or why there is none.
fn tool_version(bin: &Path) -> Result<String, String> {
    let mut child = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot be run: {e}"))?;
    let deadline = Instant::now() + VERSION_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "did not answer --version within {}s",
                    VERSION_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    match out.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) if status.success() => Ok(line.to_string()),
        _ => Err(format!("--version failed ({status})")),
    }
}

/// Whether a `firecracker --version` line names a supported release.
fn firecracker_in_window(line: &str) -> Result<(), String> {
    let version = line
        .split_whitespace()
        .find_map(|w| {
            w.strip_prefix('v')
                .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .ok_or_else(|| format!("answers --version with {line:?}, which names no version"))?;
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>());
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        return Err(format!("has version {version:?}, which banger cannot read"));
    };
    if (major, minor) >= FIRECRACKER_MIN && (major, minor) < FIRECRACKER_BELOW {
        Ok(())
    } else {
        Err(format!(
            "is version {version}, outside the supported {}.{} to {}.x",
            FIRECRACKER_MIN.0,
            FIRECRACKER_MIN.1,
            FIRECRACKER_BELOW.0 - 1
        ))
    }
}

/// Hybrid vsock (firecracker, and qemu through vhost-device-vsock) is a
/// Unix socket per VM: nothing to load on the host, but the path must fit.
fn vsock(paths: &Paths, vmm: VmmKind) -> Check {
    let id = "0123456789abcdef"; // VM ids are 16 hex digits
    let mut sockets = vec![paths.state_dir.join("vms").join(id).join(VSOCK_SOCKET_FILE)];
    if vmm == VmmKind::Qemu {
        sockets.push(
            paths
                .runtime_dir
                .join("vms")
                .join(format!("{id}.sock.vhost")),
        );
    }
    let longest = sockets
        .iter()
        .max_by_key(|p| p.as_os_str().len())
        .cloned()
        .unwrap_or_default();
    let len = longest.as_os_str().len();
    let how = match vmm {
        VmmKind::Firecracker => "firecracker's hybrid vsock",
        VmmKind::Qemu => "hybrid vsock through vhost-device-vsock",
    };
    if len <= MAX_SOCKET_PATH {
        Check::pass(
            "vsock",
            format!("{how}; longest socket path {len} of {MAX_SOCKET_PATH} bytes"),
        )
    } else {
        Check::fail(
            "vsock",
            format!(
                "{how}: socket paths such as {} are {len} bytes, over the {MAX_SOCKET_PATH}-byte limit",
                longest.display()
            ),
            "set XDG_STATE_HOME and XDG_RUNTIME_DIR to shorter directories",
        )
    }
}

fn nft() -> Check {
    match find_on_path("nft") {
        Some(p) => Check::pass("nft", format!("{} (for --nat)", p.display())),
        None => Check::warn(
            "nft",
            "nft not found on PATH: VMs with --nat cannot reach outside",
            Some("sudo apt-get install nftables".to_string()),
        ),
    }
}

/// How VMM processes are confined here: uid, sandbox or jailer, and
/// whether this host's cgroups carry every per-VM limit.
fn vmm_jail(config: &Config) -> Check {
    const CHECK: &str = "vmm jail";
    let jail = config.jail_settings();
    if !jail.enabled {
        return Check::warn(
            CHECK,
            "vmm_jail = false: VMM processes run unsandboxed, as the daemon's user, with every file it can reach",
            Some(format!(
                "remove vmm_jail = false from {}",
                config.path.display()
            )),
        );
    }
    let who = if nix::unistd::geteuid().is_root() {
        let firecracker = match &jail.jailer_bin {
            Some(j) => format!("firecracker under {}", j.display()),
            None => "firecracker unjailed (no jailer found; set jailer_bin)".to_string(),
        };
        format!(
            "qemu sandboxed and chrooted as a per-VM uid from {}, {firecracker}",
            jail.uid_base
        )
    } else {
        "not root: qemu sandboxed as the daemon's user, firecracker unjailed".to_string()
    };
    if !jail.cgroups {
        return Check::warn(
            CHECK,
            format!("{who}; vmm_cgroups = false: no per-VM limits, stats and kill go by pid"),
            Some(format!(
                "remove vmm_cgroups = false from {}",
                config.path.display()
            )),
        );
    }
    match banger_api::cgroups::CgroupHost::probe().describe() {
        Ok(used) => Check::pass(CHECK, format!("{who}; one cgroup per VM: {used}")),
        Err(missing) => Check::warn(
            CHECK,
            format!("{who}; {missing}"),
            Some(
                "mount cgroup2 with the cpu, memory and pids controllers enabled (or their v1 hierarchies)"
                    .to_string(),
            ),
        ),
    }
}

fn privileges(config: &Config) -> Check {
    const NETWORKED: &[&str] = &["network", "dns", "nat"];
    let tun = Path::new("/dev/net/tun").exists();
    let caps: Vec<String> = config
        .default_caps()
        .map(|v| v.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    let networked: Vec<&str> = caps
        .iter()
        .map(String::as_str)
        .filter(|c| NETWORKED.contains(c))
        .collect();
    let helper =
        banger_api::helper::HelperClient::new(banger_api::helper::helper_socket_from_env());
    let who = if nix::unistd::geteuid().is_root() {
        Some("running as root: host operations in-process".to_string())
    } else {
        match helper.ping() {
            Ok(v) => Some(format!(
                "banger-helper {v} answers on {}",
                helper.socket().display()
            )),
            Err(_) => None,
        }
    };
    match (who, networked.is_empty()) {
        (_, true) => Check::pass(
            "privileges",
            "default_caps need no host networking (bridge, taps, nft)",
        ),
        (Some(_), false) if !tun => Check::fail(
            "privileges",
            "no /dev/net/tun: the network capability cannot create taps",
            "sudo modprobe tun",
        ),
        (Some(who), false) => Check::pass(
            "privileges",
            format!(
                "{who}: the daemon can manage the bridge, taps and nft rules for {}",
                networked.join(", ")
            ),
        ),
        (None, false) => Check::fail(
            "privileges",
            format!(
                "not root and banger-helper does not answer on {}: the daemon (started as this \
                 user) cannot create the bridge and taps that default_caps' {} need",
                helper.socket().display(),
                networked.join(", ")
            ),
            format!(
                "sudo banger system install (then log in again for the group), or leave {} out \
                 of default_caps in {}",
                networked.join(", "),
                config.path.display()
            ),
        ),
    }
}

/// The image catalog's default image and its kernel: each local, else
/// published in its catalog (pulled on first use), else built here from its
/// recipe when this host can.
fn default_artifacts(config: &Config, paths: &Paths) -> Check {
    const CHECK: &str = "default image";
    let images = load_catalog(
        config,
        "image_catalog_file",
        &config.image_catalog_file,
        ImageCatalog::embedded,
        ImageCatalog::parse,
    );
    let kernels = load_catalog(
        config,
        "kernel_catalog_file",
        &config.kernel_catalog_file,
        KernelCatalog::embedded,
        KernelCatalog::parse,
    );
    let catalogs = images.and_then(|i| Ok((i, kernels?)));
    let (images, kernels) = match catalogs {
        Ok(c) => c,
        Err((why, fix)) => return Check::fail(CHECK, why, fix),
    };
    let Some(entry) = images.default_entry() else {
        return Check::warn(
            CHECK,
            "the image catalog marks no default: `vm run` needs --image",
            None,
        );
    };
    let (image, kernel) = (entry.name.as_str(), entry.kernel.as_str());
    let image_origin = origin(
        "image",
        paths.state_dir.join("images").join(image).is_dir(),
        Some(&entry.sources),
    );
    let kernel_origin = origin(
        "kernel",
        paths
            .state_dir
            .join("kernels")
            .join(kernel)
            .join("manifest.toml")
            .is_file(),
        kernels.find(kernel).ok().map(|k| &k.sources),
    );
    match (image_origin, kernel_origin) {
        (Ok(i), Ok(k)) => Check::pass(CHECK, format!("image {image}: {i}; kernel {kernel}: {k}")),
        (Err((why, fix)), _) => Check::fail(
            CHECK,
            format!("image {image} with kernel {kernel}: the image {why}"),
            fix,
        ),
        (_, Err((why, fix))) => Check::fail(
            CHECK,
            format!("image {image} with kernel {kernel}: the kernel {why}"),
            fix,
        ),
    }
}

/// A catalog: the file config names under `key`, else the embedded one.
fn load_catalog<C, E: std::fmt::Display>(
    config: &Config,
    key: &str,
    file: &Option<PathBuf>,
    embedded: fn() -> Result<C, E>,
    parse: fn(&str) -> Result<C, E>,
) -> Result<C, (String, String)> {
    match file {
        Some(f) => std::fs::read_to_string(f)
            .map_err(|e| format!("cannot read {key} {}: {e}", f.display()))
            .and_then(|t| parse(&t).map_err(|e| e.to_string())),
        None => embedded().map_err(|e| e.to_string()),
    }
    .map_err(|why| (why, format!("fix {key} in {}", config.path.display())))
}

/// Where one artifact will come from, or (what is wrong, the fix).
fn origin(kind: &str, local: bool, sources: Option<&Sources>) -> Result<String, (String, String)> {
    if local {
        return Ok("local".to_string());
    }
    let Some(s) = sources else {
        return Err((
            "is not local and not in the kernel catalog".to_string(),
            "banger kernel import it, or point kernel_catalog_file at a catalog listing it"
                .to_string(),
        ));
    };
    if let Some(published) = s.oci.as_ref().or(s.url.as_ref()) {
        return Ok(format!("pulled on first use from {published}"));
    }
    let Some(recipe) = &s.recipe else {
        return Err((
            "is neither local, published nor buildable".to_string(),
            "fix the catalog entry".to_string(),
        ));
    };
    let Some(tools) = banger_api::catalog::recipes::tools_of(kind, recipe) else {
        return Err((
            format!("names recipe {recipe:?}, which this build of banger does not have"),
            "fix the catalog entry, or update banger".to_string(),
        ));
    };
    banger_api::catalog::recipes::host_ready(tools)
        .map(|source| {
            format!(
                "built on first use from recipe {recipe} and the mirror in {}",
                source.display()
            )
        })
        .map_err(|u| {
            (
                format!("is not local, and it cannot be built here: {}", u.why),
                u.fix,
            )
        })
}

fn ssh_identity(paths: &Paths, config: &Config) -> Check {
    let key = config.ssh_key_file(paths);
    let meta = match std::fs::metadata(&key) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::pass(
                "ssh identity",
                format!(
                    "{} not created yet; the daemon creates it on first use",
                    key.display()
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                "ssh identity",
                format!("cannot read {}: {e}", key.display()),
                format!("make {} readable by this user", key.display()),
            );
        }
    };
    if meta.permissions().mode() & 0o077 != 0 {
        return Check::fail(
            "ssh identity",
            format!(
                "{} has mode {:o}: ssh refuses a private key others can read",
                key.display(),
                meta.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", key.display()),
        );
    }
    let public = paths.ssh_dir().join("id_ed25519.pub");
    match std::fs::read_to_string(&public) {
        Ok(p) if p.starts_with("ssh-ed25519 ") => {
            Check::pass("ssh identity", format!("{} (ed25519)", key.display()))
        }
        _ => Check::fail(
            "ssh identity",
            format!(
                "{} is missing or not an ed25519 public key",
                public.display()
            ),
            format!(
                "remove {} and {}; the daemon creates a new pair",
                key.display(),
                public.display()
            ),
        ),
    }
}

fn ssh_client() -> Check {
    match find_on_path("ssh") {
        Some(p) => Check::pass("ssh client", p.display().to_string()),
        None => Check::fail(
            "ssh client",
            "ssh not found on PATH: `vm run` and `vm ssh` use it",
            "sudo apt-get install openssh-client",
        ),
    }
}

/// WARN when `~/.ssh/config` does not include banger's ssh config: `vm ssh`
/// works either way, plain `ssh NAME.vm` only with it.
fn ssh_config_included(paths: &Paths) -> Check {
    use crate::ssh_config::{Files, is_installed};
    let files = match Files::from_env(paths) {
        Ok(f) => f,
        Err(e) => return Check::warn("ssh config", format!("{e:#}"), None),
    };
    match is_installed(&files) {
        Ok(true) => Check::pass(
            "ssh config",
            format!(
                "{} includes {}",
                files.user_config.display(),
                files.banger_config.display()
            ),
        ),
        Ok(false) => Check::warn(
            "ssh config",
            format!(
                "{} does not include banger's ssh config: plain `ssh NAME.vm` will not use banger's key",
                files.user_config.display()
            ),
            Some("banger ssh-config --install (or keep using `banger vm ssh NAME`)".to_string()),
        ),
        Err(e) => Check::warn("ssh config", format!("{e:#}"), None),
    }
}

/// The `.vm` DNS server's addresses (`127.0.0.1:dns_port`, the bridge
/// address on port 53) must be free or this user's daemon's: held by
/// another process (another daemon), `.vm` names resolve from it.
fn dns_addresses(paths: &Paths, config: &Config) -> Check {
    use banger_api::net::holder::udp_holders;
    use std::net::{Ipv4Addr, SocketAddrV4};
    let net = banger_api::net::identity::NetIdentity::for_state_dir(&paths.state_dir)
        .resolve(&config.network);
    let ours = std::fs::read_to_string(paths.pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    let addrs = [
        (
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, net.dns_port),
            "set dns_port in [network] of config.toml to a free port",
        ),
        (
            SocketAddrV4::new(net.subnet.gateway(), 53),
            "set subnet in [network] of config.toml to a free one",
        ),
    ];
    for (addr, fix) in addrs {
        let others: Vec<String> = udp_holders(addr)
            .into_iter()
            .filter(|h| h.pid.is_none() || h.pid != ours)
            .map(|h| h.to_string())
            .collect();
        if !others.is_empty() {
            return Check::fail(
                "dns",
                format!(
                    "{addr} is held by {} (another banger daemon?): .vm names would resolve from it, not from this daemon",
                    others.join(", ")
                ),
                format!("{fix}, then `banger daemon stop` (the next command starts it there)"),
            );
        }
    }
    let [(lo, _), (gw, _)] = addrs;
    Check::pass(
        "dns",
        format!(".vm DNS on {lo} and {gw}: free or this daemon's"),
    )
}

async fn daemon(paths: &Paths) -> Check {
    let client = crate::daemon::client(paths);
    let mine = VersionInfo::current();
    match crate::daemon::probe(&client).await {
        Ok(None) => Check::warn(
            "daemon",
            format!(
                "not running on {}; it starts on demand",
                client.socket().display()
            ),
            None,
        ),
        Ok(Some(v)) if crate::daemon::same_build(&v, &mine) => Check::pass(
            "daemon",
            format!("running, same build ({})", crate::output::version_line(&v)),
        ),
        Ok(Some(v)) => Check::warn(
            "daemon",
            format!(
                "runs {}, but this banger is {}",
                crate::output::version_line(&v),
                crate::output::version_line(&mine)
            ),
            Some("banger daemon stop (the next command starts this build)".to_string()),
        ),
        Err(e) => Check::fail(
            "daemon",
            format!("{} does not answer: {e:#}", client.socket().display()),
            "banger daemon stop, then retry",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_window_is_1_10_to_1_x() {
        assert_eq!(firecracker_in_window("Firecracker v1.10.1"), Ok(()));
        assert_eq!(firecracker_in_window("Firecracker v1.12.0-dev"), Ok(()));
        assert_eq!(
            firecracker_in_window("Firecracker v1.9.0"),
            Err("is version 1.9.0, outside the supported 1.10 to 1.x".to_string())
        );
        assert!(firecracker_in_window("Firecracker v2.0.0").is_err());
        assert_eq!(
            firecracker_in_window("firecracker"),
            Err("answers --version with \"firecracker\", which names no version".to_string())
        );
    }

    #[test]
    fn lines_carry_the_fix_only_when_there_is_one() {
        assert_eq!(Check::pass("arch", "x86_64").line(), "PASS arch: x86_64");
        assert_eq!(
            Check::fail("qemu", "gone", "install it").line(),
            "FAIL qemu: gone; fix: install it"
        );
        assert_eq!(
            serde_json::to_value(Check::warn("kvm", "slow", None)).unwrap(),
            serde_json::json!({"check": "kvm", "status": "warn", "detail": "slow", "fix": null})
        );
    }
}
