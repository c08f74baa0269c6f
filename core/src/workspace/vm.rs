//! The daemon's glue: a VM name to an SSH endpoint, and the prepared
//! workspace remembered in the VM directory (so `export` knows its base
//! across daemon restarts).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::{GuestPaths, PrepareOptions, WorkspaceError, check_base_commit, plan};
use crate::guest_ssh::{GuestEndpoint, GuestSsh};
use crate::lifecycle::{GuestUnreachable, Lifecycle, OpError, Progress};
use banger_api::api::{WorkspaceExport, WorkspacePrepareRequest, WorkspaceView};

/// The prepared workspace of a VM, in its directory.
const RECORD: &str = "workspace.json";
/// The port guests run sshd on.
const SSH_PORT: u16 = 22;

/// `POST /v1/vms/{name}/workspace/prepare`: plans the import of
/// `req.path`, carries it into the running VM at `/root/repo`, and records
/// the result in the VM directory.
pub async fn prepare_vm(
    lc: &Lifecycle,
    name: &str,
    req: WorkspacePrepareRequest,
    progress: &Progress,
) -> Result<WorkspaceView, OpError> {
    let opts = PrepareOptions {
        include_untracked: req.include_untracked,
        branch: req.branch,
        from: req.from,
        full_copy: req.full_copy,
    };
    if !req.path.is_absolute() {
        return Err(OpError::Invalid(format!(
            "Workspace path {} is not absolute; the CLI sends absolute paths",
            req.path.display()
        )));
    }
    progress.stage(
        "workspace_plan",
        format!("inspecting {}", req.path.display()),
    );
    let path = req.path.clone();
    let plan = run_blocking(move || plan(&path, &opts))
        .await?
        .map_err(op)?;
    // One operation at a time per VM, lifecycle ones included: two imports
    // would race on the guest's staging directory, an export during an
    // import would read a half-built checkout, a stop would cut either.
    let _guard = lc.lock_vm(name).await?;
    // The bundle is staged in the VM directory: a daemon killed holding it
    // leaves a `.staging-` file the next daemon's startup sweep removes.
    let dir = vm_dir(lc, name).await?;
    let guest = GuestPaths::default();
    // Through the guest agent when it runs commands (no encryption for an
    // emulated guest to undo), else over sshd.
    let view = match lc.open_exec(name).await {
        Ok(stream) => {
            super::prepare_with(super::Carrier::Agent(stream), &plan, &guest, &dir, progress)
                .await
                .map_err(op)
        }
        Err(e) => {
            tracing::info!(
                "workspace: importing over ssh; the guest agent cannot run commands: {}",
                crate::lifecycle::render_chain(&e)
            );
            let ssh = connect(lc, name).await?;
            let view = super::prepare(&ssh, &plan, &guest, &dir, progress)
                .await
                .map_err(op);
            ssh.close().await;
            view
        }
    };
    let view = view?;
    crate::lifecycle::crash_point("workspace:published");
    write_record(&dir, &view)?;
    Ok(view)
}

/// `GET /v1/vms/{name}/workspace/export[?base=SHA]`: the guest's work since
/// `base`, else since the base recorded at prepare time, else since the
/// guest's HEAD.
pub async fn export_vm(
    lc: &Lifecycle,
    name: &str,
    base: Option<String>,
) -> Result<WorkspaceExport, OpError> {
    if let Some(b) = &base {
        check_base_commit(b).map_err(op)?;
    }
    // One operation at a time per VM, lifecycle ones included: two imports
    // would race on the guest's staging directory, an export during an
    // import would read a half-built checkout, a stop would cut either.
    let _guard = lc.lock_vm(name).await?;
    let dir = vm_dir(lc, name).await?;
    let recorded = read_record(&dir)?;
    let (base, source) = match (base, recorded) {
        (Some(b), _) => (Some(b), "request"),
        (None, Some(view)) => (Some(view.base_commit), "prepare"),
        (None, None) => (None, "guest-head"),
    };
    let repo = GuestPaths::default().repo;
    let ssh = connect(lc, name).await?;
    let out = match super::export(&ssh, &repo, base.as_deref()).await {
        Ok((base, patch)) => super::changed_files(&ssh, &repo, &base)
            .await
            .map(|files| (base, patch, files)),
        Err(e) => Err(e),
    }
    .map_err(op);
    ssh.close().await;
    let (base_commit, patch, files) = out?;
    Ok(WorkspaceExport {
        base_commit,
        base_source: source.to_string(),
        patch_base64: base64::engine::general_purpose::STANDARD.encode(patch),
        files,
    })
}

fn op(e: WorkspaceError) -> OpError {
    if e.is_user_error() {
        OpError::Invalid(crate::lifecycle::render_chain(&e))
    } else {
        let stage = match &e {
            WorkspaceError::Guest(step, _) => format!("workspace:{step}"),
            _ => "workspace".to_string(),
        };
        OpError::Stage {
            stage,
            source: Box::new(e),
        }
    }
}

async fn run_blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::Stage {
            stage: "internal".to_string(),
            source: Box::new(e),
        })
}

async fn vm_dir(lc: &Lifecycle, name: &str) -> Result<PathBuf, OpError> {
    Ok(lc.view(lc.get(name).await?).dir)
}

pub(super) async fn connect(lc: &Lifecycle, name: &str) -> Result<GuestSsh, OpError> {
    let target = lc.ssh_target(name).await?;
    let Some(ip) = target.address else {
        return Err(OpError::Invalid(format!(
            "VM {name} has no address to connect to; it needs the network capability (--cap network)"
        )));
    };
    let endpoint = GuestEndpoint {
        addr: SocketAddr::new(ip.into(), SSH_PORT),
        user: target.user,
        identity_file: target.identity_file,
        known_hosts: target.known_hosts,
    };
    GuestSsh::connect(&endpoint)
        .await
        .map(|ssh| ssh.with_max_output(max_output(lc.config())))
        .map_err(|e| OpError::Stage {
            stage: "workspace:connect".to_string(),
            source: Box::new(GuestUnreachable {
                vm: name.to_string(),
                what: "sshd",
                addr: endpoint.addr.to_string(),
                source: Box::new(e),
            }),
        })
}

fn write_record(dir: &Path, view: &WorkspaceView) -> Result<(), OpError> {
    let path = dir.join(RECORD);
    let bytes = serde_json::to_vec_pretty(view)
        .map_err(|e| OpError::Io(format!("Cannot encode {}", path.display()), e.into()))?;
    banger_api::ssh::write_staged(&path, &bytes, 0o600).map_err(|e| OpError::Stage {
        stage: "workspace:record".to_string(),
        source: Box::new(e),
    })
}

fn read_record(dir: &Path) -> Result<Option<WorkspaceView>, OpError> {
    let path = dir.join(RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            OpError::Io(
                format!(
                    "Cannot parse {}; delete it and prepare again",
                    path.display()
                ),
                e.into(),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpError::Io(format!("Cannot read {}", path.display()), e)),
    }
}

/// Config `ssh_max_output` as a byte count (saturating on 32-bit hosts).
fn max_output(config: &banger_api::config::Config) -> usize {
    usize::try_from(config.ssh_max_output.0).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn ssh_max_output_from_config_is_the_cap() {
        let path = std::path::Path::new("/c.toml");
        let config = banger_api::config::Config::parse("ssh_max_output = \"3M\"\n", path).unwrap();
        assert_eq!(super::max_output(&config), 3 << 20);
        let defaults = banger_api::config::Config::defaults(path);
        assert_eq!(super::max_output(&defaults), crate::guest_ssh::MAX_OUTPUT);
    }
}
