//! `banger`: the command-line client of `bangerd`. Exit codes: 0 ok,
//! 1 failure, 2 usage error, 3 `daemon status` when the daemon is not running.

mod args;
mod artifacts;
mod complete;
mod daemon;
mod doctor;
mod exec;
mod fetch;
mod ordered;
mod output;
mod ports;
mod refs;
mod remote;
mod run;
mod snapshot;
mod spec;
mod ssh_config;
mod system;
mod uninstall;
mod update;
mod vm;
mod workspace;

use std::process::ExitCode;

use anyhow::Result;
use banger_api::api::VersionInfo;
use banger_api::paths::Paths;
use clap::CommandFactory;

use crate::args::{CapCommand, Cli, Command, DaemonCommand, PortCommand, VmCommand};
use crate::vm::Verb;

/// `daemon status` exit code when bangerd is not running.
const EXIT_NOT_RUNNING: u8 = 3;

fn main() -> ExitCode {
    // `COMPLETE=SHELL banger ...`: a tab press; answers and exits.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let cli = {
        use clap::FromArgMatches;
        use clap::error::ErrorKind;
        // The resolved defaults (config read, host probed) show only in
        // help, so only a request for help pays for them: every other
        // command parses with the plain definition, which accepts the same
        // arguments.
        let matches = match Cli::command().try_get_matches() {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) =>
            {
                args::command_with_resolved_defaults(Cli::command()).get_matches()
            }
            Err(e) => e.exit(),
        };
        match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(e) => e.exit(),
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: Starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Completion { shell } => {
            complete::registration(shell, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version { json } => version(json).await,
        Command::Doctor { json } => doctor::run(json).await,
        Command::System(args) => system::run(args).await,
        Command::SshConfig(a) => ssh_config::run(a.into()).await,
        Command::Update(a) => update::run(a).await,
        Command::Uninstall(a) => uninstall::run(a).await,
        Command::Daemon(cmd) => daemon_cmd(cmd).await,
        Command::Image(cmd) => {
            let client = daemon::ensure_running(&Paths::from_env()?).await?;
            artifacts::image(&client, cmd).await
        }
        Command::Kernel(cmd) => {
            let client = daemon::ensure_running(&Paths::from_env()?).await?;
            artifacts::kernel(&client, cmd).await
        }
        Command::Cap(CapCommand::List { json }) => {
            let client = daemon::ensure_running(&Paths::from_env()?).await?;
            vm::cap_list(&client, json).await
        }
        // Starts the daemon itself, and not at all for --dry-run.
        Command::Vm(VmCommand::Workspace(cmd)) => workspace::run(cmd).await,
        // Before the daemon is started: a dry run or a refused plan must not
        // even do that.
        Command::Vm(VmCommand::Run(a)) => run::run(*a).await,
        Command::Vm(cmd) => {
            let client = daemon::ensure_running(&Paths::from_env()?).await?;
            match cmd {
                VmCommand::Run(a) => run::run(*a).await,
                VmCommand::Create(a) => vm::create(&client, a).await,
                VmCommand::Start(n) => verb_all(&client, Verb::Start, &n.names).await,
                VmCommand::Stop(n) => verb_all(&client, Verb::Stop, &n.names).await,
                VmCommand::Restart(n) => verb_all(&client, Verb::Restart, &n.names).await,
                VmCommand::Delete(d) => {
                    let verb = Verb::Delete { force: d.force };
                    verb_all(&client, verb, &d.vms.names).await
                }
                VmCommand::Kill(n) => verb_all(&client, Verb::Kill, &n.names).await,
                VmCommand::Set(a) => vm::set(&client, a).await,
                VmCommand::Prune { yes, force } => vm::prune(&client, yes, force).await,
                VmCommand::List { json } => vm::list(&client, json).await,
                VmCommand::Pool { json } => vm::pool(&client, json).await,
                VmCommand::Show { name, json } => {
                    vm::show(&client, &refs::resolve(&client, &name).await?, json).await
                }
                VmCommand::Logs { name, follow } => {
                    vm::logs(&client, &refs::resolve(&client, &name).await?, follow).await
                }
                VmCommand::Ports { name, json } => {
                    ports::list(&client, &refs::resolve(&client, &name).await?, json).await
                }
                VmCommand::Port { cmd } => {
                    let (name, spec, add) = match cmd {
                        PortCommand::Add { name, spec } => (name, spec, true),
                        PortCommand::Rm { name, spec } => (name, spec, false),
                    };
                    ports::change(&client, &refs::resolve(&client, &name).await?, &spec, add).await
                }
                VmCommand::Snapshot(args) => snapshot::run(&client, args).await,
                VmCommand::Stats { name, json } => {
                    vm::stats(&client, &refs::resolve(&client, &name).await?, json).await
                }
                VmCommand::Ssh {
                    name,
                    print,
                    via,
                    command,
                } => {
                    let name = refs::resolve(&client, &name).await?;
                    vm::ssh(&client, &name, print, via, &command).await
                }
                VmCommand::Workspace(cmd) => workspace::run(cmd).await,
            }
        }
    }
}

async fn verb_all(
    client: &banger_api::client::Client,
    verb: Verb,
    refs: &[String],
) -> Result<ExitCode> {
    let names = refs::resolve_all(client, refs).await?;
    vm::lifecycle_all(client, verb, &names, &mut std::io::stdout()).await
}

/// `banger version`: never starts the daemon.
async fn version(json: bool) -> Result<ExitCode> {
    let mine = VersionInfo::current();
    let theirs = match Paths::from_env() {
        Ok(paths) => daemon::probe(&daemon::client(&paths)).await.unwrap_or(None),
        Err(_) => None,
    };
    if json {
        let v = serde_json::json!({ "client": mine, "daemon": theirs });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("banger   {}", output::version_line(&mine));
        match theirs {
            Some(d) => println!("bangerd  {}", output::version_line(&d)),
            None => println!("bangerd  not running"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn daemon_cmd(cmd: DaemonCommand) -> Result<ExitCode> {
    let paths = Paths::from_env()?;
    let client = daemon::client(&paths);
    match cmd {
        DaemonCommand::Start => match daemon::status(&client).await? {
            Some(s) => println!("bangerd: already running (pid {})", s.pid),
            None => {
                let pid = daemon::start(&paths, &client).await?;
                println!("bangerd: started (pid {pid})");
            }
        },
        DaemonCommand::Stop => {
            if daemon::stop(&client).await? {
                println!("bangerd: stopped");
            } else {
                println!("bangerd: not running");
            }
        }
        DaemonCommand::Status { json } => match daemon::status(&client).await? {
            None => {
                println!("bangerd: not running");
                return Ok(ExitCode::from(EXIT_NOT_RUNNING));
            }
            Some(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
            Some(s) => {
                println!("bangerd: running (pid {})", s.pid);
                println!("version:  {}", output::version_line(&s.version));
                println!(
                    "started:  {} ({} ago)",
                    output::timestamp(s.started_at),
                    output::age(s.started_at, banger_api::model::now_unix())
                );
                println!("socket:   {}", s.socket.display());
                println!("state:    {}", s.state_dir.display());
                let counts: Vec<String> = s.vms.iter().map(|(k, n)| format!("{n} {k}")).collect();
                println!(
                    "vms:      {}",
                    if counts.is_empty() {
                        "none".to_string()
                    } else {
                        counts.join(", ")
                    }
                );
                for e in &s.plugin_errors {
                    println!("plugin error: {e}");
                }
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
