//! `banger vm ...` and `banger cap list`: thin calls of the daemon API.

use crate::remote::{remote_command, shell_quote, vm_path};
use std::io::Write;
use std::ops::ControlFlow;
use std::os::unix::fs::DirBuilderExt;
use std::process::ExitCode;

use anyhow::{Context, Result};
use banger_api::api::{CapView, CreateVmRequest, PortView, SetVmRequest, SshTarget, VmView};
use banger_api::client::{Client, ClientError, Method};

use banger_api::paths::Paths;

use crate::args::{CreateArgs, SetArgs, Via};
use crate::ordered::run_in_order;
use crate::output;

/// A lifecycle verb that takes several VM names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `POST .../start`, streamed.
    Start,
    /// `POST .../stop`.
    Stop,
    /// `POST .../restart`, streamed.
    Restart,
    /// `DELETE /v1/vms/{name}[?force=true]`.
    Delete {
        /// Go on when a teardown fails.
        force: bool,
    },
    /// `POST .../kill`.
    Kill,
}

impl Verb {
    /// What the report says after success.
    fn done(self) -> &'static str {
        match self {
            Verb::Start => "started",
            Verb::Stop => "stopped",
            Verb::Restart => "restarted",
            Verb::Delete { .. } => "deleted",
            Verb::Kill => "killed",
        }
    }
}

/// `ssh`'s exit code when ssh itself (not the remote command) failed.
const SSH_OWN_FAILURE: i32 = 255;

/// How long the system `ssh` may take to connect and exchange banners with
/// a guest (`-o ConnectTimeout`), as the daemon's own SSH connections: a
/// guest that lost its network fails in seconds instead of hanging.
pub(crate) const SSH_CONNECT_TIMEOUT_SECS: u64 = 30;

/// `vm ssh`: asks the daemon for the target, pins the guest's host keys in
/// `<state>/ssh/known_hosts.d/NAME`, then runs (or with `print`, prints) the
/// system `ssh` and exits with its code. Through the guest agent instead
/// with `--via agent`, or by default when nothing listens on port 22 in
/// the guest.
pub async fn ssh(
    client: &Client,
    name: &str,
    print: bool,
    via: Option<Via>,
    command: &[String],
) -> Result<ExitCode> {
    let via = match via {
        Some(v) => v,
        None if print => Via::Ssh,
        None => default_via(client, name).await,
    };
    if via == Via::Agent {
        if print {
            anyhow::bail!(
                "--print shows an ssh command line; --via agent has none (drop one of them)"
            );
        }
        let job = if command.is_empty() {
            crate::exec::Job::Session(None)
        } else {
            crate::exec::Job::Command(command.to_vec())
        };
        let code = crate::exec::run(client, name, job).await?;
        if command.is_empty() {
            note_still_running(client, name).await;
        }
        return Ok(exit_code(code));
    }
    let target: SshTarget = client.get(&format!("{}/ssh", vm_path(name))).await?;
    let args = pinned_ssh_args(&target, command)?;
    if print {
        let words: Vec<String> = std::iter::once("ssh".to_string())
            .chain(args.iter().map(|a| shell_quote(a)))
            .collect();
        println!("{}", words.join(" "));
        return Ok(ExitCode::SUCCESS);
    }
    let code = run_ssh(&target, &args)?;
    if command.is_empty() {
        note_still_running(client, name).await;
    }
    Ok(exit_code(code))
}

/// `vm ssh`'s default: ssh when the guest's agent reports a TCP listener on
/// port 22, else the agent (images without sshd). When the ports cannot be
/// read, ssh, whose own error then says what is wrong.
async fn default_via(client: &Client, name: &str) -> Via {
    match client
        .get::<Vec<PortView>>(&format!("{}/ports", vm_path(name)))
        .await
    {
        Ok(ports) if !ports.iter().any(|p| p.proto == "tcp" && p.port == 22) => {
            eprintln!(
                "note: no sshd listens in {name}; using the guest agent (--via ssh to insist)"
            );
            Via::Agent
        }
        _ => Via::Ssh,
    }
}

/// banger's private key, as the daemon's ssh-identity capability keeps it
/// (config `ssh_key_path`).
pub(crate) fn identity_file(
    paths: &Paths,
    config: &banger_api::config::Config,
) -> std::path::PathBuf {
    config.ssh_key_file(paths)
}

/// Writes `target`'s host keys to `<state>/ssh/known_hosts.d/NAME` and
/// returns the arguments for the system `ssh` (see [`ssh_args`]).
pub(crate) fn pinned_ssh_args(target: &SshTarget, command: &[String]) -> Result<Vec<String>> {
    let name = &target.name;
    let address = target.address.with_context(|| {
        format!("VM {name} has no address; it needs the network capability (--cap network)")
    })?;
    let dir = Paths::from_env()?.ssh_dir().join("known_hosts.d");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("Creating {}", dir.display()))?;
    let known_hosts = dir.join(name);
    banger_api::ssh::write_staged(&known_hosts, target.known_hosts.as_bytes(), 0o600)?;
    Ok(ssh_args(
        target,
        address,
        &known_hosts,
        SSH_CONNECT_TIMEOUT_SECS,
        command,
    ))
}

/// Runs the system `ssh` with `args` (from [`pinned_ssh_args`]) and returns
/// its exit code, naming the VM and address when ssh itself failed.
pub(crate) fn run_ssh(target: &SshTarget, args: &[String]) -> Result<i32> {
    let status = match std::process::Command::new("ssh").args(args).status() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("ssh is not on PATH; install the openssh-client package")
        }
        Err(e) => return Err(e).context("Running ssh"),
    };
    let code = match status.code() {
        Some(c) => c,
        // Killed by a signal: report it the way shells do.
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0),
    };
    if code == SSH_OWN_FAILURE {
        eprintln!("{}", ssh_failure_hint(target));
    }
    Ok(code)
}

/// What `ssh`'s own failure (exit 255) is followed by: which VM and address
/// did not answer, and where to look.
fn ssh_failure_hint(target: &SshTarget) -> String {
    let name = &target.name;
    let at = target
        .address
        .map(|a| format!(" at {a}"))
        .unwrap_or_default();
    format!(
        "hint: ssh to VM {name}{at} failed (exit 255): it refused, or did not answer within \
         {SSH_CONNECT_TIMEOUT_SECS} s. Is sshd running in the guest? `banger vm ports {name}` \
         lists its listeners, `banger vm logs {name}` shows its console."
    )
}

/// An exit code as the process's own (codes outside 0..=255 become 1).
pub(crate) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// After an interactive session: one line saying the VM still runs (it
/// costs memory until stopped) and how to stop or delete it. Silent when
/// the VM is no longer running or the daemon cannot say.
pub(crate) async fn note_still_running(client: &Client, name: &str) {
    if let Ok(vm) = client.get::<VmView>(&vm_path(name)).await
        && vm.record.state == banger_api::model::VmState::Running
    {
        eprintln!(
            "VM {name} is still running: `banger vm stop {name}` stops it, \
             `banger vm delete {name}` deletes it."
        );
    }
}

/// The arguments after `ssh`: banger's identity only, the pinned host keys
/// only, and the host key looked up as `NAME.vm` whatever the address.
fn ssh_args(
    target: &SshTarget,
    address: std::net::Ipv4Addr,
    known_hosts: &std::path::Path,
    connect_timeout_secs: u64,
    command: &[String],
) -> Vec<String> {
    let mut args = vec![
        "-i".to_string(),
        target.identity_file.display().to_string(),
        "-o".to_string(),
        "IdentitiesOnly=yes".to_string(),
        "-o".to_string(),
        format!("UserKnownHostsFile={}", known_hosts.display()),
        "-o".to_string(),
        "StrictHostKeyChecking=yes".to_string(),
        "-o".to_string(),
        format!("HostKeyAlias={}.vm", target.name),
        "-o".to_string(),
        "LogLevel=ERROR".to_string(),
        "-o".to_string(),
        format!("ConnectTimeout={connect_timeout_secs}"),
        format!("{}@{address}", target.user),
    ];
    if !command.is_empty() {
        // Keeps a command starting with `-` from being read as ssh options.
        args.push("--".to_string());
        args.extend(remote_command(command));
    }
    args
}

/// `vm stats`: VMM CPU and RSS, and guest memory from its agent.
pub async fn stats(client: &Client, name: &str, json: bool) -> Result<ExitCode> {
    let s: banger_api::api::StatsView = client.get(&format!("{}/stats", vm_path(name))).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let kib = |k: Option<u64>| {
        k.map(|k| banger_api::model::ByteSize(k * 1024).to_string())
            .unwrap_or_else(|| "- (no agent)".into())
    };
    println!("vmm pid:       {}", s.pid);
    println!("vmm cpu:       {:.2}s", s.vmm_cpu_ms as f64 / 1000.0);
    println!(
        "vmm rss:       {:.1} MiB",
        s.vmm_rss_bytes as f64 / (1024.0 * 1024.0)
    );
    println!("guest memory:  {}", kib(s.guest_mem_total_kib));
    println!("guest free:    {}", kib(s.guest_mem_available_kib));
    if let Some(u) = s.guest_uptime_secs {
        println!("agent uptime:  {u}s");
    }
    Ok(ExitCode::SUCCESS)
}

/// `--nat` is `--cap nat`.
pub(crate) fn with_nat(mut caps: Vec<String>, nat: bool) -> Vec<String> {
    if nat && !caps.iter().any(|c| c == "nat" || c.starts_with("nat:")) {
        caps.push("nat".to_string());
    }
    caps
}

/// `vm create`: prints the `spec:` line and streams progress to stderr,
/// prints the VM on stdout. The shape and backend printed are sent
/// explicitly, so the VM is exactly what the line said.
pub async fn create(client: &Client, a: Box<CreateArgs>) -> Result<ExitCode> {
    let abs = |p: &std::path::Path| {
        std::path::absolute(p).with_context(|| format!("Resolving {}", p.display()))
    };
    let config = banger_api::config::Config::load(&Paths::from_env()?.config_file())?;
    if let Some(snap) = a.from_snapshot {
        return create_with(client, &restore_request(a.name, a.vmm, snap)).await;
    }
    let spec = crate::spec::Spec::resolve(&a.shape, a.vmm, &config)?;
    output::eprint_line(spec.to_string());
    let req = CreateVmRequest {
        name: a.name,
        // Config `default_image_name`, unless a root file is brought.
        image: a.image.or_else(|| {
            config
                .default_image_name
                .clone()
                .filter(|_| a.rootfs.is_none())
        }),
        kernel_ref: a.kernel_ref,
        kernel: a.kernel.as_deref().map(abs).transpose()?,
        initrd: a.initrd.as_deref().map(abs).transpose()?,
        rootfs: a.rootfs.as_deref().map(abs).transpose()?,
        vcpus: Some(i64::from(spec.vcpus)),
        memory_mib: Some(i64::from(spec.memory_mib)),
        disk_size: Some(spec.disk.to_string()),
        caps: crate::ports::with_ports(with_nat(a.caps, a.nat), &a.ports),
        boot_args: a.boot_args,
        no_start: a.no_start,
        vmm: Some(spec.backend.vmm),
        force_size: a.shape.force_size,
        from_snapshot: None,
    };
    create_with(client, &req).await
}

/// The request of a VM restored from `snap` (`vm create` and `vm run
/// --from-snapshot`): the snapshot decides the shape, image and
/// capabilities; `vmm`, when given, is checked against its backend.
pub(crate) fn restore_request(
    name: Option<String>,
    vmm: Option<crate::args::VmmArg>,
    snap: String,
) -> CreateVmRequest {
    CreateVmRequest {
        name,
        vmm: vmm.map(|v| v.kind()),
        from_snapshot: Some(snap),
        ..CreateVmRequest::default()
    }
}

/// Sends `req`, streaming progress to stderr; prints the VM on stdout.
async fn create_with(client: &Client, req: &CreateVmRequest) -> Result<ExitCode> {
    let vm: VmView = client
        .stream_events(
            Method::POST,
            "/v1/vms",
            Some(req),
            output::show_events(None),
        )
        .await?;
    print!("{}", output::vm_details(&vm));
    Ok(ExitCode::SUCCESS)
}

/// One lifecycle request for one VM.
async fn lifecycle(
    client: &Client,
    verb: Verb,
    name: &str,
    prefix: bool,
) -> Result<VmView, ClientError> {
    let path = vm_path(name);
    let prefix = prefix.then_some(name);
    let none: Option<&()> = None;
    match verb {
        Verb::Start => {
            client
                .stream_events(
                    Method::POST,
                    &format!("{path}/start"),
                    none,
                    output::show_events(prefix),
                )
                .await
        }
        Verb::Restart => {
            client
                .stream_events(
                    Method::POST,
                    &format!("{path}/restart"),
                    none,
                    output::show_events(prefix),
                )
                .await
        }
        Verb::Stop => {
            client
                .send(Method::POST, &format!("{path}/stop"), none)
                .await
        }
        Verb::Kill => {
            client
                .send(Method::POST, &format!("{path}/kill"), none)
                .await
        }
        Verb::Delete { force: false } => client.send(Method::DELETE, &path, none).await,
        Verb::Delete { force: true } => {
            client
                .send(Method::DELETE, &format!("{path}?force=true"), none)
                .await
        }
    }
}

/// `vm start|stop|restart|delete|kill NAME...`: one request per name, all at
/// once; one result line per name on `out`, in the order given; exit 1 if any
/// failed.
pub async fn lifecycle_all(
    client: &Client,
    verb: Verb,
    names: &[String],
    out: &mut dyn Write,
) -> Result<ExitCode> {
    let several = names.len() > 1;
    let mut write_err = None;
    let failed = run_in_order(
        names,
        |name| async move { lifecycle(client, verb, &name, several).await },
        |name, result| {
            let line = match result {
                Ok(_) => format!("{name}: {}", verb.done()),
                Err(e) => format!("{name}: error: {}", error_chain(&e)),
            };
            if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
                write_err.get_or_insert(e);
            }
        },
    )
    .await;
    if let Some(e) = write_err {
        return Err(e).context("Writing results to stdout");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `vm prune`: deletes every stopped or failed (`error`) VM, after listing
/// them and, on a terminal, asking; `yes` skips the question, and without a
/// terminal it is required.
pub async fn prune(client: &Client, yes: bool, force: bool) -> Result<ExitCode> {
    use banger_api::model::VmState;
    let vms: Vec<VmView> = client.get("/v1/vms").await?;
    let doomed: Vec<VmView> = vms
        .into_iter()
        .filter(|v| matches!(v.record.state, VmState::Stopped | VmState::Error))
        .collect();
    if doomed.is_empty() {
        println!("no stopped or error VMs to prune");
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", output::vm_table(&doomed));
    let names: Vec<String> = doomed.iter().map(|v| v.record.name.to_string()).collect();
    if !yes {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            anyhow::bail!(
                "vm prune would delete {} VM(s) ({}); stdin is not a terminal to confirm on: \
                 pass --yes",
                names.len(),
                names.join(", ")
            );
        }
        eprint!("Delete these {} VM(s) and their disks? [y/N] ", names.len());
        std::io::stderr().flush().context("Writing the question")?;
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("Reading the answer")?;
        if !confirmed(&answer) {
            println!("nothing deleted");
            return Ok(ExitCode::FAILURE);
        }
    }
    lifecycle_all(
        client,
        Verb::Delete { force },
        &names,
        &mut std::io::stdout(),
    )
    .await
}

/// `y` or `yes`, any case.
fn confirmed(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `vm set NAME...`: the same change to each VM in turn, each one's
/// details printed; a VM that refuses is reported and the rest still go.
pub async fn set(client: &Client, a: SetArgs) -> Result<ExitCode> {
    let req = SetVmRequest {
        vcpus: a.shape.vcpu,
        memory_mib: a.shape.memory,
        disk_size: a.shape.disk_size,
        force_size: a.shape.force_size,
    };
    let names = crate::refs::resolve_all(client, &a.names).await?;
    let mut failed = 0;
    for name in &names {
        match client
            .send::<_, VmView>(Method::PATCH, &vm_path(name), Some(&req))
            .await
        {
            Ok(vm) => print!("{}", output::vm_details(&vm)),
            Err(e) => {
                failed += 1;
                eprintln!("{name}: error: {}", error_chain(&e));
            }
        }
    }
    if failed == 0 {
        Ok(ExitCode::SUCCESS)
    } else if names.len() == 1 {
        anyhow::bail!("Changing VM {} failed", names[0])
    } else {
        anyhow::bail!("{failed} of {} VMs were not changed", names.len())
    }
}

/// `vm list`.
pub async fn list(client: &Client, json: bool) -> Result<ExitCode> {
    let vms: Vec<VmView> = client.get("/v1/vms").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
    } else {
        print!("{}", output::vm_table(&vms));
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm pool`: the warm pool's size, its VMs and its last refill failure.
pub async fn pool(client: &Client, json: bool) -> Result<ExitCode> {
    let pool: banger_api::api::PoolView = client.get("/v1/pool").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pool)?);
        return Ok(ExitCode::SUCCESS);
    }
    if pool.size == 0 {
        println!("warm pool: off (set warm_pool = N in config.toml; see docs/warm-pool.md)");
    } else {
        let ready = pool
            .vms
            .iter()
            .filter(|v| v.record.state == banger_api::model::VmState::Running)
            .count();
        println!(
            "warm pool: {ready} of {} ready for the next vm create/vm run of the default shape",
            pool.size
        );
    }
    if !pool.vms.is_empty() {
        print!("{}", output::vm_table(&pool.vms));
    }
    if let Some(e) = &pool.last_error {
        println!("last refill failed: {e}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm show`.
pub async fn show(client: &Client, name: &str, json: bool) -> Result<ExitCode> {
    let vm: VmView = client.get(&vm_path(name)).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&vm)?);
    } else {
        print!("{}", output::vm_details(&vm));
    }
    Ok(ExitCode::SUCCESS)
}

/// `vm logs [-f]`: the serial console, raw, to stdout.
pub async fn logs(client: &Client, name: &str, follow: bool) -> Result<ExitCode> {
    let mut path = format!("{}/logs", vm_path(name));
    if follow {
        path.push_str("?follow=true");
    }
    let mut out = std::io::stdout().lock();
    let mut write_err = None;
    client
        .stream_raw(&path, |chunk| {
            match out.write_all(chunk).and_then(|()| out.flush()) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    write_err = Some(e);
                    ControlFlow::Break(())
                }
            }
        })
        .await?;
    match write_err {
        // The reader went away (`| head`): that is a normal end.
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Some(e) => Err(e).context("Writing the log to stdout"),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// `cap list`.
pub async fn cap_list(client: &Client, json: bool) -> Result<ExitCode> {
    let caps: Vec<CapView> = client.get("/v1/capabilities").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&caps)?);
    } else {
        print!("{}", output::cap_table(&caps));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    #[test]
    fn only_y_or_yes_confirms() {
        for yes in ["y\n", "Y", " yes \n", "YES"] {
            assert!(super::confirmed(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "yep", "y es"] {
            assert!(!super::confirmed(no), "{no:?}");
        }
    }

    #[test]
    fn nat_flag_adds_the_nat_cap_once() {
        assert_eq!(with_nat(vec!["dns".into()], true), ["dns", "nat"]);
        assert_eq!(with_nat(vec!["nat".into()], true), ["nat"]);
        assert_eq!(with_nat(vec!["dns".into()], false), ["dns"]);
    }
    use std::time::Duration;

    use banger_api::model::{ByteSize, VmId, VmName, VmRecord, VmSpec, VmState, VmmKind};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixListener;
    use tokio::sync::Notify;

    use super::*;

    fn vm_view(name: &str, state: VmState) -> VmView {
        vm_view_with_id(name, "0011223344556677", state)
    }

    /// A VM as the API shows it, for the CLI's unit tests.
    pub(crate) fn vm_view_with_id(name: &str, id: &str, state: VmState) -> VmView {
        VmView {
            address: None,
            record: VmRecord {
                id: VmId::from_stored(id.into()),
                name: VmName::parse(name).unwrap(),
                state,
                spec: VmSpec {
                    vcpus: 1,
                    memory_mib: 512,
                    disk_size: ByteSize(1 << 30),
                    kernel: "/k".into(),
                    initrd: None,
                    rootfs_source: "/r".into(),
                    extra_boot_args: None,
                    vmm: VmmKind::Firecracker,
                },
                caps: vec![],
                prepared: vec![],
                vmm: None,
                last_error: None,
                machine: None,
                guest: None,
                booted_once: true,
                created_at: 0,
                updated_at: 0,
                last_start: None,
            },
            dir: "/d".into(),
        }
    }

    /// A fake daemon on a real Unix socket: every connection gets its own
    /// task; `route(method, path)` decides the answer. Returns the socket and
    /// the log of request lines.
    fn fake_daemon<F, Fut>(dir: &Path, route: F) -> (PathBuf, Arc<Mutex<Vec<String>>>)
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (u16, String)> + Send,
    {
        let sock = dir.join("bangerd.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (route, log) = (Arc::new(route), seen.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let (route, log) = (route.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut chunk = [0u8; 512];
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0);
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let line = text.lines().next().unwrap().to_string();
                    let req = line.rsplit_once(' ').unwrap().0.to_string();
                    log.lock().unwrap().push(req.clone());
                    let (status, body) = route(req).await;
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    s.write_all(resp.as_bytes()).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });
        (sock, seen)
    }

    #[tokio::test]
    async fn multi_vm_stop_reports_in_order_and_survives_unknown_names() {
        let dir = tempfile::tempdir().unwrap();
        // `a` answers only after `c` was asked: sequential requests would
        // hang (caught by the timeout), and `a` still must be reported first.
        let c_asked = Arc::new(Notify::new());
        let notify = c_asked.clone();
        let (sock, seen) = fake_daemon(dir.path(), move |req| {
            let notify = notify.clone();
            async move {
                match req.as_str() {
                    "POST /v1/vms/a/stop" => {
                        notify.notified().await;
                        let vm = vm_view("a", VmState::Stopped);
                        (200, serde_json::to_string(&vm).unwrap())
                    }
                    "POST /v1/vms/c/stop" => {
                        notify.notify_one();
                        let vm = vm_view("c", VmState::Stopped);
                        (200, serde_json::to_string(&vm).unwrap())
                    }
                    _ => (404, r#"{"error":"No VM named \"ghost\""}"#.to_string()),
                }
            }
        });
        let names = ["a", "ghost", "c"].map(String::from);
        let mut out = Vec::new();
        let code = tokio::time::timeout(
            Duration::from_secs(10),
            lifecycle_all(&Client::new(sock), Verb::Stop, &names, &mut out),
        )
        .await
        .expect("requests were not concurrent")
        .unwrap();
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a: stopped\nghost: error: No VM named \"ghost\"\nc: stopped\n"
        );
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            [
                "POST /v1/vms/a/stop",
                "POST /v1/vms/c/stop",
                "POST /v1/vms/ghost/stop"
            ]
        );
    }

    #[tokio::test]
    async fn every_verb_uses_its_endpoint_and_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, seen) = fake_daemon(dir.path(), |req| async move {
            let vm = vm_view("dev", VmState::Running);
            if req.ends_with("/start") || req.ends_with("/restart") {
                let done = banger_api::api::Event::Done {
                    result: serde_json::to_value(vm).unwrap(),
                };
                (200, serde_json::to_string(&done).unwrap() + "\n")
            } else {
                (200, serde_json::to_string(&vm).unwrap())
            }
        });
        let client = Client::new(sock);
        let names = ["dev".to_string()];
        for (verb, line) in [
            (Verb::Start, "dev: started\n"),
            (Verb::Stop, "dev: stopped\n"),
            (Verb::Restart, "dev: restarted\n"),
            (Verb::Kill, "dev: killed\n"),
            (Verb::Delete { force: false }, "dev: deleted\n"),
        ] {
            let mut out = Vec::new();
            let code = lifecycle_all(&client, verb, &names, &mut out)
                .await
                .unwrap();
            assert_eq!(code, ExitCode::SUCCESS, "{verb:?}");
            assert_eq!(String::from_utf8(out).unwrap(), line);
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "POST /v1/vms/dev/start",
                "POST /v1/vms/dev/stop",
                "POST /v1/vms/dev/restart",
                "POST /v1/vms/dev/kill",
                "DELETE /v1/vms/dev",
            ]
        );
    }

    fn target() -> SshTarget {
        SshTarget {
            name: "web".into(),
            address: Some("10.0.0.7".parse().unwrap()),
            user: "root".into(),
            identity_file: PathBuf::from("/s/banger/ssh/id_ed25519"),
            known_hosts: String::new(),
        }
    }

    #[test]
    fn ssh_args_pin_the_identity_and_host_keys_and_guard_the_command() {
        let t = target();
        let kh = Path::new("/s/banger/ssh/known_hosts.d/web");
        let ip = t.address.unwrap();
        let args = super::ssh_args(&t, ip, kh, 30, &[]);
        assert_eq!(
            args.join(" "),
            "-i /s/banger/ssh/id_ed25519 -o IdentitiesOnly=yes \
             -o UserKnownHostsFile=/s/banger/ssh/known_hosts.d/web \
             -o StrictHostKeyChecking=yes -o HostKeyAlias=web.vm -o LogLevel=ERROR \
             -o ConnectTimeout=30 root@10.0.0.7"
        );
        let cmd = ["-x".to_string(), "uname".to_string()];
        let args = super::ssh_args(&t, ip, kh, 30, &cmd);
        assert_eq!(
            args[args.len() - 4..],
            ["root@10.0.0.7", "--", "-x", "uname"]
        );
    }

    #[test]
    fn ssh_to_a_guest_that_never_answers_gives_up_after_the_connect_timeout() {
        if std::process::Command::new("ssh")
            .arg("-V")
            .output()
            .is_err()
        {
            eprintln!("SKIP: no ssh client (openssh-client)");
            return;
        }
        // Accepts the connection and never sends a banner: a guest whose
        // sshd hangs. ssh's ConnectTimeout covers the banner exchange too.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let t = target();
        let mut args = super::ssh_args(
            &t,
            std::net::Ipv4Addr::LOCALHOST,
            &dir.path().join("kh"),
            1,
            &["true".to_string()],
        );
        args.splice(
            0..0,
            [
                "-p".to_string(),
                port.to_string(),
                "-F".into(),
                "none".into(),
            ],
        );
        let started = std::time::Instant::now();
        let code = super::run_ssh(&t, &args).unwrap();
        let took = started.elapsed();
        drop(silent);
        assert_eq!(code, super::SSH_OWN_FAILURE);
        assert!(took < std::time::Duration::from_secs(20), "{took:?}");
        let hint = super::ssh_failure_hint(&t);
        assert!(hint.contains("VM web at 10.0.0.7"), "{hint}");
    }

    #[test]
    fn several_command_words_reach_the_guest_shell_as_an_argv() {
        // What ssh sends is the words joined by spaces; a shell reads it.
        let sent = |words: &[&str]| {
            let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
            let line = super::remote_command(&words).join(" ");
            let out = std::process::Command::new("sh")
                .args(["-c", &line])
                .output()
                .unwrap();
            (out.status.code(), String::from_utf8(out.stdout).unwrap())
        };
        assert_eq!(
            sent(&["sh", "-c", "echo one; echo two; exit 7"]),
            (Some(7), "one\ntwo\n".to_string())
        );
        assert_eq!(
            sent(&["printf", "%s|", "a b", "it's"]),
            (Some(0), "a b|it's|".into())
        );
        // One word is a command line for the guest's shell.
        assert_eq!(sent(&["echo x | tr x y; exit 3"]), (Some(3), "y\n".into()));
    }

    #[test]
    fn shell_quoting_round_trips_through_sh() {
        let words = [
            "plain/path_1.0",
            "two words",
            "it's",
            "",
            "$HOME `x` \\ \"q\" *",
            "UserKnownHostsFile=/a b/c",
        ];
        let line: Vec<String> = words.iter().map(|w| super::shell_quote(w)).collect();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {}", line.join(" ")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let got = String::from_utf8(out.stdout).unwrap();
        let got: Vec<&str> = got.lines().collect();
        assert_eq!(got, words);
        assert_eq!(super::shell_quote("plain/path_1.0"), "plain/path_1.0");
    }
}
