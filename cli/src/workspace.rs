//! `banger vm workspace prepare|export`: a host git repository into a VM's
//! `/root/repo`, and the guest's work back as one patch.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use banger_api::api::{ExportedFile, WorkspaceExport, WorkspacePrepareRequest, WorkspaceView};
use banger_api::client::{Client, Method};
use banger_api::paths::Paths;
use banger_api::workspace::{PrepareOptions, plan, skipped_untracked_note};
use base64::Engine as _;

use crate::args::{ExportArgs, PrepareArgs, WorkspaceCommand};
use crate::output;

/// Runs a workspace command; the daemon is started only when needed (never
/// for `--dry-run`).
pub async fn run(cmd: WorkspaceCommand) -> Result<ExitCode> {
    match cmd {
        WorkspaceCommand::Prepare(a) if a.dry_run => dry_run(a),
        WorkspaceCommand::Prepare(a) => {
            let client = crate::daemon::ensure_running(&Paths::from_env()?).await?;
            let name = crate::refs::resolve(&client, &a.name).await?;
            prepare(&client, PrepareArgs { name, ..a }).await
        }
        WorkspaceCommand::Export(a) => {
            let client = crate::daemon::ensure_running(&Paths::from_env()?).await?;
            let name = crate::refs::resolve(&client, &a.name).await?;
            export(&client, ExportArgs { name, ..a }).await
        }
    }
}

fn options(a: &PrepareArgs) -> PrepareOptions {
    PrepareOptions {
        include_untracked: a.include_untracked,
        branch: a.branch.clone(),
        from: a.from.clone(),
        full_copy: a.full_copy,
    }
}

fn dry_run(a: PrepareArgs) -> Result<ExitCode> {
    let plan = plan(&a.path, &options(&a))?;
    print!("{}", plan.render());
    Ok(ExitCode::SUCCESS)
}

/// `vm workspace prepare` against the daemon; prints the result and the
/// skipped-untracked note.
pub async fn prepare(client: &Client, a: PrepareArgs) -> Result<ExitCode> {
    let req = WorkspacePrepareRequest {
        path: std::path::absolute(&a.path)
            .with_context(|| format!("Resolving {}", a.path.display()))?,
        include_untracked: a.include_untracked,
        branch: a.branch,
        from: a.from,
        full_copy: a.full_copy,
    };
    let view = prepare_view(client, &a.name, &req).await?;
    print!("{}", render_view(&view));
    Ok(ExitCode::SUCCESS)
}

/// Sends the prepare request for VM `name` (`req.path` absolute) and
/// returns the daemon's result, printing progress and the
/// skipped-untracked note on stderr. `vm run` uses this too.
pub async fn prepare_view(
    client: &Client,
    name: &str,
    req: &WorkspacePrepareRequest,
) -> Result<WorkspaceView> {
    let view: WorkspaceView = client
        .stream_events(
            Method::POST,
            &format!("/v1/vms/{name}/workspace/prepare"),
            Some(req),
            output::show_events(None),
        )
        .await?;
    if let Some(note) = skipped_untracked_note(view.skipped_untracked) {
        eprintln!("{note}");
    }
    Ok(view)
}

fn render_view(v: &WorkspaceView) -> String {
    let mut out = format!(
        "repo:    {}\nmode:    {}\nbase:    {}\nhead:    {}\n",
        v.repo.display(),
        v.mode,
        v.base_commit,
        v.head_commit
    );
    if let Some(b) = &v.branch {
        out.push_str(&format!("branch:  {b}\n"));
    }
    out.push_str(&format!("files:   {}\n", v.files));
    out
}

/// The changed files, one per line under a count, as export prints them
/// on stderr.
fn render_files(files: &[ExportedFile]) -> String {
    let mut out = format!("files: {} changed\n", files.len());
    for f in files {
        out.push_str(&format!("  {:<12} {}\n", f.status, f.path));
    }
    out
}

async fn export(client: &Client, a: ExportArgs) -> Result<ExitCode> {
    let mut path = format!("/v1/vms/{}/workspace/export", a.name);
    if let Some(b) = &a.base_commit {
        // Validated hex: no escaping needed.
        path.push_str(&format!("?base={b}"));
    }
    let ex: WorkspaceExport = client.get(&path).await?;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(ex.patch_base64.as_bytes())
        .context("The daemon sent a patch that is not valid base64")?;
    let source = match ex.base_source.as_str() {
        "request" => "from --base-commit",
        "prepare" => "recorded at prepare",
        "guest-head" => "the guest's HEAD: no workspace was prepared",
        other => other,
    };
    eprintln!("base: {} ({source})", ex.base_commit);
    eprint!("{}", render_files(&ex.files));
    if a.json {
        println!("{}", serde_json::to_string_pretty(&ex)?);
    }
    match a.output {
        Some(file) => {
            banger_api::ssh::write_staged(&file, &patch, 0o644)?;
            eprintln!("wrote {} bytes to {}", patch.len(), file.display());
        }
        None if a.json => {}
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&patch).context("Writing the patch")?;
            out.flush().context("Writing the patch")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lists_each_changed_file_under_a_count() {
        let f = |s: &str, p: &str| ExportedFile {
            status: s.into(),
            path: p.into(),
        };
        assert_eq!(
            render_files(&[f("modified", "a.txt"), f("added", "src/new.rs")]),
            "files: 2 changed\n  modified     a.txt\n  added        src/new.rs\n"
        );
        assert_eq!(render_files(&[]), "files: 0 changed\n");
    }
}
