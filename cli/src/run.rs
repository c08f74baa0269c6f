//! `banger vm run [PATH] [-- CMD...]`: create a VM and use it at once.
//!
//! The CLI resolves everything before anything exists (shape, mode, the
//! mise NAT precondition), prints the `spec:` line, creates the VM, waits
//! until the daemon can hand out an ssh target (sshd up, host keys known),
//! imports the workspace through the daemon, has the daemon run the mise
//! bootstrap (the `mise` capability's guest job), then opens the session or
//! runs the command. `--rm` deletes the VM at the end whatever happened, except when
//! sshd never came up: that VM is kept for `banger vm logs`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use banger_api::api::{
    CreateVmRequest, JobRequest, JobView, SshTarget, VmView, WorkspacePrepareRequest,
};
use banger_api::client::{Client, ClientError, Method};
use banger_api::config::Config;
use banger_api::paths::Paths;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::args::{RunArgs, Via};
use crate::output;
use crate::remote::{remote_command, vm_path};
use crate::spec::Spec;
use crate::vm::{self, exit_code, note_still_running, pinned_ssh_args};

/// Where the workspace lands in the guest.
const GUEST_REPO: &str = "/root/repo";
/// Files that make a workspace ask for the mise bootstrap, in lookup order.
const MISE_FILES: &[&str] = &[".mise.toml", "mise.toml", ".tool-versions"];

/// `vm run`. Nothing is created before the plan is known to be sound, and
/// with `--dry-run` nothing is created (nor the daemon started) at all.
pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let paths = Paths::from_env()?;
    let config = Config::load(&paths.config_file())?;
    let plan = Plan::new(args, &config)?;
    if plan.dry_run {
        print!("{}", plan.describe());
        if let Some(ws) = &plan.workspace {
            // The exact file list, as `vm workspace prepare --dry-run` gives it.
            let q = &ws.request;
            let options = banger_api::workspace::PrepareOptions {
                include_untracked: q.include_untracked,
                branch: q.branch.clone(),
                from: q.from.clone(),
                full_copy: q.full_copy,
            };
            print!(
                "{}",
                banger_api::workspace::plan(&q.path, &options)?.render()
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    crate::output::eprint_line(plan.headline());
    let client = crate::daemon::ensure_running(&paths).await?;
    let vm: VmView = client
        .stream_events(
            Method::POST,
            "/v1/vms",
            Some(&plan.request),
            output::show_events(None),
        )
        .await?;
    let name = vm.record.name.to_string();
    // From here on an interrupt must not kill banger before `--rm` has
    // cleaned up: it stops the wait, and the ssh child gets its own copy.
    let mut interrupt = signal(SignalKind::interrupt()).context("Handling Ctrl-C")?;
    let wait = Duration::from_secs(config.ssh_wait_timeout_secs);
    match use_vm(&client, &plan, &name, wait, &mut interrupt).await {
        Err(Failure::SshWait(e)) => {
            eprintln!(
                "VM {name} is kept{} so `banger vm logs {name}` can show why sshd did not answer; \
                 `banger vm delete {name}` deletes it.",
                if plan.rm { " despite --rm" } else { "" }
            );
            Err(e)
        }
        outcome if plan.rm => {
            let deleted = delete(&client, &name, plan.request.name.is_none()).await;
            match (outcome, deleted) {
                (Ok(code), Ok(())) => Ok(code),
                (Ok(_), Err(e)) => Err(e),
                (Err(Failure::Other(e)), Ok(())) => Err(e),
                (Err(Failure::Other(e)), Err(d)) => {
                    eprintln!("error: {d:#}");
                    Err(e)
                }
                (Err(Failure::SshWait(e)), _) => Err(e),
            }
        }
        Ok(code) => Ok(code),
        Err(Failure::Other(e)) => {
            eprintln!("VM {name} is still running: `banger vm delete {name}` deletes it.");
            Err(e)
        }
    }
}

/// How a run went wrong, which decides whether `--rm` may delete the VM.
#[derive(Debug)]
enum Failure {
    /// sshd never answered: the VM is kept for `vm logs`.
    SshWait(anyhow::Error),
    /// Anything else.
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

/// Everything after create: wait for ssh, import, bootstrap, then the
/// session, the command or the detach hint.
async fn use_vm(
    client: &Client,
    plan: &Plan,
    name: &str,
    wait: Duration,
    interrupt: &mut Signal,
) -> Result<ExitCode, Failure> {
    // The import and the bootstrap go over the daemon's SSH; a command or
    // session through the agent needs no sshd (the agent answered before
    // create returned).
    let target = match plan.via == Via::Ssh || plan.workspace.is_some() {
        true => Some(wait_for_ssh(client, name, wait, interrupt).await?),
        false => None,
    };
    if let Some(ws) = &plan.workspace {
        let view = tokio::select! {
            r = crate::workspace::prepare_view(client, name, &ws.request) => r
                .with_context(|| format!("Importing {} into {name}", ws.root.display()))?,
            _ = interrupt.recv() => {
                return Err(Failure::Other(anyhow!("Interrupted while importing into VM {name}")));
            }
        };
        eprintln!(
            "workspace: {} files ({}) at {}, base {}",
            view.files,
            view.mode,
            view.repo.display(),
            short(&view.base_commit)
        );
    }
    if let Some(file) = plan.bootstrap {
        bootstrap(client, name, file, plan.after == After::Detach).await?;
    }
    match &plan.after {
        After::Detach => {
            println!("VM {name} is ready; connect with `banger vm ssh {name}`");
            Ok(ExitCode::SUCCESS)
        }
        After::Command(words) => {
            let line = match &plan.workspace {
                // The command runs in the imported checkout.
                Some(_) => vec![format!(
                    "cd {GUEST_REPO} && {}",
                    remote_command(words).join(" ")
                )],
                None => words.clone(),
            };
            let code = match &target {
                Some(t) if plan.via == Via::Ssh => vm::run_ssh(t, &pinned_ssh_args(t, &line)?)?,
                _ => crate::exec::run(client, name, crate::exec::Job::Command(line)).await?,
            };
            Ok(exit_code(code))
        }
        After::Session => {
            let code = match &target {
                Some(t) if plan.via == Via::Ssh => {
                    vm::run_ssh(t, &session_args(t, plan.workspace.is_some())?)?
                }
                _ => {
                    let cwd = plan.workspace.as_ref().map(|_| GUEST_REPO.to_string());
                    crate::exec::run(client, name, crate::exec::Job::Session(cwd)).await?
                }
            };
            if !plan.rm {
                note_still_running(client, name).await;
            }
            Ok(exit_code(code))
        }
    }
}

/// The interactive session's ssh arguments: a login shell, in the imported
/// checkout when there is a workspace (a remote command then, so `-t` keeps
/// the terminal).
fn session_args(target: &SshTarget, workspace: bool) -> Result<Vec<String>> {
    if !workspace {
        return pinned_ssh_args(target, &[]);
    }
    let mut args = pinned_ssh_args(target, &[session_command()])?;
    args.insert(0, "-t".to_string());
    Ok(args)
}

/// The remote command of a session in the workspace: the user's login
/// shell, started in [`GUEST_REPO`].
fn session_command() -> String {
    format!("cd {GUEST_REPO} && exec \"${{SHELL:-/bin/sh}}\" -l")
}

/// Polls `GET /v1/vms/NAME/ssh` until the daemon hands out a target (the
/// guest's sshd has host keys and the VM an address) or `wait` passes. A VM
/// that is gone or no longer running ends the wait at once.
async fn wait_for_ssh(
    client: &Client,
    name: &str,
    wait: Duration,
    interrupt: &mut Signal,
) -> Result<SshTarget, Failure> {
    let deadline = Instant::now() + wait;
    let path = format!("{}/ssh", vm_path(name));
    let mut delay = Duration::from_millis(100);
    loop {
        let last = match client.get::<SshTarget>(&path).await {
            Ok(t) => return Ok(t),
            Err(
                e @ ClientError::Api {
                    status: 404 | 409, ..
                },
            ) => {
                return Err(Failure::SshWait(
                    anyhow!(e).context(format!("VM {name} stopped before sshd answered")),
                ));
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(Failure::SshWait(anyhow!(last).context(format!(
                "Waited {}s for sshd in VM {name} (ssh_wait_timeout_secs in config.toml)",
                wait.as_secs()
            ))));
        }
        tokio::select! {
            () = tokio::time::sleep(delay.min(deadline - Instant::now())) => {}
            _ = interrupt.recv() => {
                return Err(Failure::Other(anyhow!("Interrupted while waiting for sshd in VM {name}")));
            }
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The mise bootstrap, the `mise` capability's `bootstrap` job, run by the
/// daemon over its own SSH connection: to completion (output shown, logged
/// in the guest) when detached, else started in the background with its log
/// path printed, so the session opens at once.
async fn bootstrap(client: &Client, name: &str, file: &str, wait: bool) -> Result<()> {
    eprintln!(
        "bootstrap: {file} found; running `mise install` in {GUEST_REPO}{}",
        if wait { "" } else { " in the background" }
    );
    let view: JobView = client
        .stream_events(
            Method::POST,
            &format!("{}/capabilities/mise/jobs/bootstrap", vm_path(name)),
            Some(&JobRequest { wait }),
            output::show_events(None),
        )
        .await
        .with_context(|| format!("Bootstrapping VM {name}"))?;
    eprint!("{}", view.output);
    let log = view.log.display();
    match view.status {
        Some(0) | None => {}
        Some(code) => bail!(
            "The mise bootstrap failed (exit {code}); its log is {log} in the guest \
             (`banger vm ssh {name} -- cat {log}`)"
        ),
    }
    if !wait {
        eprintln!("bootstrap log: {log} (`tail -f {log}` in the guest)");
    }
    Ok(())
}

/// `--rm`: the VM goes, whatever the session's outcome. With `detach` (a
/// VM banger named, so no later command waits for its name) banger returns
/// once the daemon has begun the delete and marked it, and the daemon
/// finishes it; a VM the user named is waited for, so its name is free when
/// banger exits (docs/vm-run.md).
async fn delete(client: &Client, name: &str, detach: bool) -> Result<()> {
    let none: Option<&()> = None;
    let path = match detach {
        true => format!("{}?detach=true", vm_path(name)),
        false => vm_path(name),
    };
    client
        .send::<(), VmView>(Method::DELETE, &path, none)
        .await
        .with_context(|| {
            format!("--rm could not delete VM {name}; retry with `banger vm delete {name}`")
        })?;
    match detach {
        true => eprintln!("deleting VM {name} (--rm; the daemon finishes it)"),
        false => eprintln!("deleted VM {name} (--rm)"),
    }
    Ok(())
}

fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// What happens once the VM is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
enum After {
    /// An interactive ssh session.
    Session,
    /// Run these words and exit with their code.
    Command(Vec<String>),
    /// Print a reconnect hint and exit.
    Detach,
}

/// The workspace part of a run.
#[derive(Debug)]
struct Workspace {
    /// The repository root (or the directory, with --full-copy).
    root: PathBuf,
    request: WorkspacePrepareRequest,
}

/// A `vm run` resolved and checked, before anything exists.
#[derive(Debug)]
struct Plan {
    spec: Spec,
    request: CreateVmRequest,
    workspace: Option<Workspace>,
    /// The file that asks for the mise bootstrap, when it will run.
    bootstrap: Option<&'static str>,
    after: After,
    /// How the command or session reaches the guest.
    via: Via,
    rm: bool,
    dry_run: bool,
}

impl Plan {
    fn new(a: RunArgs, config: &Config) -> Result<Plan> {
        let spec = Spec::resolve(&a.shape, a.vmm, config)?;
        let after = if a.detach {
            After::Detach
        } else if a.command.is_empty() {
            After::Session
        } else {
            After::Command(a.command)
        };
        let workspace = match &a.path {
            Some(p) => Some(Workspace::resolve(
                p,
                WorkspacePrepareRequest {
                    path: PathBuf::new(),
                    include_untracked: a.include_untracked,
                    branch: a.branch,
                    from: a.from,
                    full_copy: a.full_copy,
                },
            )?),
            None => None,
        };
        let mut caps = crate::ports::with_ports(vm::with_nat(a.caps, a.nat), &a.ports);
        // Command mode never bootstraps: it runs and returns; nor does a
        // restore, whose capabilities (and tools) are the snapshot's.
        let bootstrap = match &workspace {
            Some(ws)
                if !a.no_bootstrap
                    && !matches!(after, After::Command(_))
                    && a.from_snapshot.is_none() =>
            {
                mise_file(&ws.root)
            }
            _ => None,
        };
        if let Some(file) = bootstrap {
            if !nat_enabled(&config.default_caps, &caps) {
                bail!(
                    "{} has {file}, so vm run would install its tools with mise, which needs \
                     outbound internet: add --nat, or skip the install with --no-bootstrap",
                    workspace
                        .as_ref()
                        .map_or(Path::new("."), |w| &w.root)
                        .display()
                );
            }
            if !caps.iter().any(|c| cap_name(c) == "mise") {
                caps.push("mise".to_string());
            }
        }
        let request = match a.from_snapshot {
            Some(snap) => vm::restore_request(a.name, a.vmm, snap),
            None => CreateVmRequest {
                name: a.name,
                image: a.image.or_else(|| config.default_image_name.clone()),
                vcpus: Some(i64::from(spec.vcpus)),
                memory_mib: Some(i64::from(spec.memory_mib)),
                disk_size: Some(spec.disk.to_string()),
                caps,
                vmm: Some(spec.backend.vmm),
                force_size: a.shape.force_size,
                ..CreateVmRequest::default()
            },
        };
        Ok(Plan {
            spec,
            request,
            workspace,
            bootstrap,
            after,
            // A workspace needs sshd for its import anyway.
            via: a.via.unwrap_or(match a.path {
                Some(_) => Via::Ssh,
                None => Via::Agent,
            }),
            rm: a.rm,
            dry_run: a.dry_run,
        })
    }

    fn via_words(&self) -> &'static str {
        match self.via {
            Via::Ssh => "over ssh",
            Via::Agent => "through the guest agent (no sshd)",
        }
    }

    /// The first line of a run: the spec it creates, or the snapshot it
    /// restores (whose shape is the snapshot's).
    fn headline(&self) -> String {
        match &self.request.from_snapshot {
            Some(snap) => {
                format!("restoring snapshot {snap} (its image, shape, backend and capabilities)")
            }
            None => self.spec.to_string(),
        }
    }

    /// `--dry-run`'s report: the spec and every step that would happen.
    fn describe(&self) -> String {
        let r = &self.request;
        let mut out = format!("{}\ndry run: nothing is created\n", self.headline());
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<11}{v}\n"));
        let source = match (&r.from_snapshot, &r.image) {
            (Some(snap), _) => format!("snapshot {snap}, restored"),
            (None, Some(i)) => format!("image {i}"),
            (None, None) => "the default image".to_string(),
        };
        line(
            "vm:",
            format!(
                "{} from {source}",
                r.name.as_deref().unwrap_or("(generated name)"),
            ),
        );
        line(
            "caps:",
            if r.from_snapshot.is_some() {
                "the snapshot's".to_string()
            } else if r.caps.is_empty() {
                "config default_caps".to_string()
            } else {
                format!("config default_caps with {}", r.caps.join(" "))
            },
        );
        if let Some(ws) = &self.workspace {
            let q = &ws.request;
            let what = if q.full_copy {
                "the whole directory (full copy)"
            } else if q.include_untracked {
                "tracked and untracked files"
            } else {
                "tracked files"
            };
            let mut v = format!("{} -> {GUEST_REPO}, {what}", ws.root.display());
            if let Some(b) = &q.branch {
                v.push_str(&format!(", branch {b}"));
                if let Some(f) = &q.from {
                    v.push_str(&format!(" from {f}"));
                }
            }
            line("workspace:", v);
        }
        line(
            "bootstrap:",
            match self.bootstrap {
                None => "none".to_string(),
                Some(f) if self.after == After::Detach => {
                    format!("mise install in {GUEST_REPO} ({f}), to completion")
                }
                Some(f) => format!(
                    "mise install in {GUEST_REPO} ({f}), in the background (its guest log is printed)"
                ),
            },
        );
        line(
            "then:",
            match &self.after {
                After::Session => format!("interactive session {}", self.via_words()),
                After::Command(w) => format!(
                    "run `{}` {} and exit with its code",
                    remote_command(w).join(" "),
                    self.via_words()
                ),
                After::Detach => "exit with a reconnect hint (`banger vm ssh NAME`)".to_string(),
            },
        );
        if self.rm {
            line(
                "--rm:",
                "the VM is deleted at the end (kept if sshd never answers)".to_string(),
            );
        }
        out
    }
}

impl Workspace {
    /// Finds the repository around `path` (or takes `path` as is with
    /// --full-copy), so a bad path fails before any VM exists.
    fn resolve(path: &Path, mut request: WorkspacePrepareRequest) -> Result<Workspace> {
        let abs = std::path::absolute(path)
            .with_context(|| format!("Resolving workspace path {}", path.display()))?;
        if !abs.is_dir() {
            bail!(
                "Workspace path {} is not a directory: give a directory inside a git repository",
                path.display()
            );
        }
        request.path = abs.clone();
        if request.full_copy {
            return Ok(Workspace { root: abs, request });
        }
        let out = match std::process::Command::new("git")
            .arg("-C")
            .arg(&abs)
            .args(["rev-parse", "--show-toplevel"])
            .output()
        {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("git is not on PATH; install git to import a workspace")
            }
            Err(e) => return Err(e).context("Running git rev-parse"),
        };
        if !out.status.success() {
            bail!(
                "Workspace path {} is not inside a git work tree: vm run imports a git \
                 repository (or the directory as is with --full-copy)",
                path.display()
            );
        }
        let root = String::from_utf8(out.stdout)
            .context("git printed a repository path that is not UTF-8")?;
        Ok(Workspace {
            root: PathBuf::from(root.trim_end_matches('\n')),
            request,
        })
    }
}

/// The first of [`MISE_FILES`] present in `root`.
fn mise_file(root: &Path) -> Option<&'static str> {
    MISE_FILES
        .iter()
        .copied()
        .find(|f| root.join(f).symlink_metadata().is_ok())
}

fn cap_name(choice: &str) -> &str {
    choice.split(':').next().unwrap_or(choice)
}

/// Whether `nat` ends up enabled: on in the config defaults or added by a
/// `--cap`, and not removed by a later `--cap -nat`.
fn nat_enabled(defaults: &[String], caps: &[String]) -> bool {
    let mut on = defaults.iter().any(|c| cap_name(c) == "nat");
    for c in caps {
        match c.strip_prefix('-') {
            Some(removed) if cap_name(removed) == "nat" => on = false,
            Some(_) => {}
            None if cap_name(c) == "nat" => on = true,
            None => {}
        }
    }
    on
}

#[cfg(test)]
mod tests {
    use banger_api::model::VmmKind;
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command, VmCommand};

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(["banger", "vm", "run"].iter().chain(args))?;
        match cli.command {
            Command::Vm(VmCommand::Run(a)) => Ok(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn config() -> Config {
        Config::parse(
            "vmm = \"qemu\"\nqemu_accel = \"tcg\"\n\
             [vm_defaults]\nvcpus = 2\nmemory_mib = 1024\ndisk_size = \"4G\"\n",
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    fn git_repo(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("git")
            .args(["init", "-q"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        for f in files {
            std::fs::write(dir.path().join(f), "node 22\n").unwrap();
        }
        dir
    }

    #[test]
    fn detach_refuses_rm_and_a_command() {
        for args in [
            &["-d", "--rm"][..],
            &["-d", "--", "true"],
            &["--detach", "--rm"],
        ] {
            let e = run_args(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains("cannot be used with"), "{e}");
        }
        assert!(
            run_args(&["--from", "main"]).is_err(),
            "--from needs --branch"
        );
        assert!(
            run_args(&["--branch", "x"]).is_err(),
            "--branch needs a path"
        );
        let a = run_args(&[".", "--branch", "x", "--from", "main", "--", "ls", "-l"]).unwrap();
        assert_eq!(a.command, ["ls", "-l"]);
        assert_eq!(a.path.as_deref(), Some(Path::new(".")));
    }

    #[test]
    fn spec_comes_from_flags_then_config_and_is_sent_explicitly() {
        let plan = Plan::new(run_args(&[]).unwrap(), &config()).unwrap();
        assert_eq!(
            plan.spec.to_string(),
            "spec: 2 vcpu · 1024 MiB · 4G disk · vmm qemu (config), accel tcg (config qemu_accel)"
        );
        assert_eq!(plan.request.vmm, Some(VmmKind::Qemu));
        let a = run_args(&[
            "--vcpu",
            "4",
            "--memory",
            "8G",
            "--disk-size",
            "8G",
            "--vmm",
            "firecracker",
        ])
        .unwrap();
        let plan = Plan::new(a, &config()).unwrap();
        assert!(
            plan.spec.to_string().starts_with(
                "spec: 4 vcpu · 8192 MiB · 8G disk · vmm firecracker (--vmm), accel kvm ("
            ),
            "{}",
            plan.spec
        );
        assert_eq!(plan.request.vmm, Some(VmmKind::Firecracker));
        assert_eq!(plan.request.vcpus, Some(4));
        assert_eq!(plan.request.memory_mib, Some(8192));
        assert_eq!(plan.request.disk_size.as_deref(), Some("8G"));
        assert_eq!(plan.after, After::Session);
        assert!(plan.workspace.is_none() && plan.bootstrap.is_none());
    }

    #[test]
    fn mise_files_need_nat_unless_the_bootstrap_is_skipped() {
        for file in MISE_FILES {
            let repo = git_repo(&[file]);
            let p = repo.path().to_str().unwrap();
            let msg = Plan::new(run_args(&[p]).unwrap(), &config())
                .unwrap_err()
                .to_string();
            assert!(msg.contains(file) && msg.contains("--nat"), "{msg}");
            assert!(msg.contains("--no-bootstrap"), "{msg}");
            let plan = Plan::new(run_args(&[p, "--nat"]).unwrap(), &config()).unwrap();
            assert_eq!(plan.bootstrap, Some(*file));
            assert_eq!(plan.request.caps, ["nat", "mise"]);
            let plan = Plan::new(run_args(&[p, "--no-bootstrap"]).unwrap(), &config()).unwrap();
            assert_eq!(plan.bootstrap, None);
            assert!(plan.request.caps.is_empty());
            // Command mode never bootstraps, so it needs no NAT.
            let plan = Plan::new(run_args(&[p, "--", "true"]).unwrap(), &config()).unwrap();
            assert_eq!(plan.bootstrap, None);
        }
        // NAT from the config defaults counts; a later --cap -nat undoes it.
        let repo = git_repo(&[".tool-versions"]);
        let p = repo.path().to_str().unwrap();
        let mut cfg = config();
        cfg.default_caps = vec!["work-disk".into(), "nat".into()];
        assert!(Plan::new(run_args(&[p]).unwrap(), &cfg).is_ok());
        assert!(Plan::new(run_args(&[p, "--cap", "-nat"]).unwrap(), &cfg).is_err());
        // A repo without mise files needs nothing.
        let plain = git_repo(&["README"]);
        let plan = Plan::new(
            run_args(&[plain.path().to_str().unwrap()]).unwrap(),
            &config(),
        )
        .unwrap();
        assert_eq!(plan.bootstrap, None);
    }

    #[test]
    fn a_run_from_a_snapshot_asks_for_a_restore_with_nothing_the_snapshot_decides() {
        let repo = git_repo(&[".tool-versions"]);
        let p = repo.path().to_str().unwrap();
        // A mise file needs no NAT here: a restore runs no bootstrap.
        let a = run_args(&["--from-snapshot", "warm", "--name", "w1", p, "--", "make"]).unwrap();
        let plan = Plan::new(a, &config()).unwrap();
        let want = CreateVmRequest {
            name: Some("w1".into()),
            from_snapshot: Some("warm".into()),
            ..CreateVmRequest::default()
        };
        assert_eq!(plan.request, want);
        assert_eq!(plan.bootstrap, None);
        assert!(plan.workspace.is_some());
        let plan = Plan::new(
            run_args(&["--from-snapshot", "warm", p, "--dry-run"]).unwrap(),
            &config(),
        )
        .unwrap();
        assert_eq!(plan.bootstrap, None, "not even in a session");
        let text = plan.describe();
        assert!(text.starts_with("restoring snapshot warm"), "{text}");
        assert!(text.contains("from snapshot warm, restored"), "{text}");
        assert!(text.contains("caps:      the snapshot's"), "{text}");
        assert!(text.contains("bootstrap: none"), "{text}");
        // The backend may be named (a restore checks it); what the snapshot
        // decides may not.
        let a = run_args(&["--from-snapshot", "warm", "--vmm", "qemu"]).unwrap();
        let plan = Plan::new(a, &config()).unwrap();
        assert_eq!(plan.request.vmm, Some(VmmKind::Qemu));
        for flag in [
            &["--image", "x"][..],
            &["--cap", "nat"],
            &["--nat"],
            &["-p", "8080:80"],
            &["--vcpu", "2"],
            &["--memory", "1G"],
            &["--disk-size", "8G"],
            &["--force-size"],
        ] {
            let args: Vec<&str> = ["--from-snapshot", "warm"]
                .iter()
                .chain(flag)
                .copied()
                .collect();
            let e = run_args(&args).unwrap_err();
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{flag:?}"
            );
        }
    }

    #[test]
    fn workspace_is_the_enclosing_repository_and_non_repos_are_refused() {
        let repo = git_repo(&[]);
        let sub = repo.path().join("src/deep");
        std::fs::create_dir_all(&sub).unwrap();
        let a = run_args(&[sub.to_str().unwrap(), "--include-untracked"]).unwrap();
        let plan = Plan::new(a, &config()).unwrap();
        let ws = plan.workspace.unwrap();
        assert_eq!(
            ws.root.canonicalize().unwrap(),
            repo.path().canonicalize().unwrap()
        );
        assert_eq!(ws.request.path, sub);
        assert!(ws.request.include_untracked);

        let plain = tempfile::tempdir().unwrap();
        let p = plain.path().to_str().unwrap();
        let msg = Plan::new(run_args(&[p]).unwrap(), &config())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not inside a git work tree") && msg.contains("--full-copy"));
        let plan = Plan::new(run_args(&[p, "--full-copy"]).unwrap(), &config()).unwrap();
        assert!(plan.workspace.unwrap().request.full_copy);
        let gone = plain.path().join("missing");
        let msg = Plan::new(run_args(&[gone.to_str().unwrap()]).unwrap(), &config())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a directory"), "{msg}");
    }

    #[test]
    fn dry_run_describes_every_step() {
        let repo = git_repo(&[".tool-versions"]);
        let p = repo.path().to_str().unwrap();
        let a = run_args(&[p, "--nat", "--rm", "--name", "box", "--dry-run"]).unwrap();
        let text = Plan::new(a, &config()).unwrap().describe();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "spec: 2 vcpu · 1024 MiB · 4G disk · vmm qemu (config), accel tcg (config qemu_accel)"
        );
        assert!(text.contains("box from the default image"), "{text}");
        assert!(text.contains("with nat mise"), "{text}");
        assert!(text.contains("tracked files"), "{text}");
        assert!(
            text.contains(".tool-versions") && text.contains("in the background"),
            "{text}"
        );
        // A workspace is imported over ssh, so its session is ssh too.
        assert!(text.contains("interactive session over ssh"), "{text}");
        assert!(text.contains("--rm:"), "{text}");

        let a = run_args(&["--dry-run", "--", "sh", "-c", "exit 7"]).unwrap();
        let text = Plan::new(a, &config()).unwrap().describe();
        assert!(
            text.contains("run `sh -c 'exit 7'` through the guest agent (no sshd)"),
            "{text}"
        );
        assert!(!text.contains("workspace:"), "{text}");
        let a = run_args(&["--dry-run", "--via", "ssh"]).unwrap();
        let text = Plan::new(a, &config()).unwrap().describe();
        assert!(text.contains("interactive session over ssh"), "{text}");
    }

    #[test]
    fn nat_is_on_when_the_last_word_says_so() {
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        assert!(!nat_enabled(&s(&["work-disk"]), &s(&["dns"])));
        assert!(nat_enabled(&s(&["work-disk"]), &s(&["nat"])));
        assert!(nat_enabled(&s(&["nat"]), &s(&[])));
        assert!(!nat_enabled(&s(&["nat"]), &s(&["-nat"])));
        assert!(nat_enabled(&s(&["nat"]), &s(&["-nat", "nat"])));
        assert!(!nat_enabled(&s(&[]), &s(&["natty"])));
    }

    #[test]
    fn a_workspace_session_opens_a_login_shell_in_the_checkout() {
        // What ssh sends is run by the guest's shell: run it with sh in a
        // directory that stands for the guest's /root/repo.
        let line = session_command().replace(GUEST_REPO, "/tmp");
        let out = std::process::Command::new("sh")
            .args(["-c", &line.replace("exec \"${SHELL:-/bin/sh}\" -l", "pwd")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "/tmp\n");
        assert!(session_command().starts_with("cd /root/repo && exec "));
        // The shell started is the user's, as a login shell.
        let out = std::process::Command::new("sh")
            .args(["-c", &line])
            .env("SHELL", "/bin/echo")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "-l\n");
    }
}
