//! `banger vm snapshot`: take, list and remove snapshots of running VMs
//! (`docs/snapshots.md`).

use std::process::ExitCode;

use anyhow::{Result, bail};
use banger_api::client::{Client, Method};
use banger_api::model::ByteSize;
use banger_api::snapshot::{SnapshotRequest, SnapshotView};
use clap::{Args, Subcommand};
use clap_complete::ArgValueCandidates;

use crate::args::parse_name;
use crate::remote::vm_path;

/// `vm snapshot NAME SNAP` (or `--name SNAP`), `vm snapshot list`,
/// `vm snapshot rm SNAP...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SnapshotArgs {
    /// List or remove snapshots instead.
    #[command(subcommand)]
    pub cmd: Option<SnapshotCommand>,
    /// The running VM to snapshot.
    #[arg(value_parser = parse_name, required = true, add = ArgValueCandidates::new(crate::complete::vms))]
    pub vm: Option<String>,
    /// The snapshot's name (a VM name's rules).
    #[arg(value_parser = parse_name, conflicts_with = "name")]
    pub snap: Option<String>,
    /// The snapshot's name, as an option.
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vm snapshot list|rm`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove snapshots.
    Rm {
        /// Snapshot names.
        #[arg(required = true, value_parser = parse_name)]
        names: Vec<String>,
    },
}

/// Runs `vm snapshot ...`.
pub async fn run(client: &Client, args: SnapshotArgs) -> Result<ExitCode> {
    match args.cmd {
        Some(SnapshotCommand::List { json }) => list(client, json).await,
        Some(SnapshotCommand::Rm { names }) => {
            for n in names {
                client
                    .send::<(), ()>(Method::DELETE, &format!("/v1/snapshots/{n}"), None)
                    .await?;
                println!("removed snapshot {n}");
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let (Some(vm), Some(snap)) = (args.vm, args.snap.or(args.name)) else {
                bail!("Name the snapshot: banger vm snapshot VM SNAP (or --name SNAP)");
            };
            let vm = crate::refs::resolve(client, &vm).await?;
            let req = SnapshotRequest { name: snap };
            let view: SnapshotView = client
                .send(
                    Method::POST,
                    &format!("{}/snapshot", vm_path(&vm)),
                    Some(&req),
                )
                .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                println!(
                    "snapshot {} of {} ({}, {}) in {}",
                    view.name,
                    view.source_vm,
                    view.backend.as_str(),
                    ByteSize(view.total_bytes()),
                    view.dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(client: &Client, json: bool) -> Result<ExitCode> {
    let all: Vec<SnapshotView> = client.get("/v1/snapshots").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(ExitCode::SUCCESS);
    }
    if all.is_empty() {
        println!("no snapshots");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<24} {:<12} {:>10}",
        "NAME", "SOURCE VM", "BACKEND", "SIZE"
    );
    for s in all {
        println!(
            "{:<24} {:<24} {:<12} {:>10}",
            s.name,
            s.source_vm,
            s.backend.as_str(),
            ByteSize(s.total_bytes()).to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}
