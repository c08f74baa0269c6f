//! The mise bootstrap: after an import, the workspace's tools installed in
//! the guest by the daemon over its own SSH connection.

use std::path::Path;

use crate::api::{BootstrapRequest, BootstrapView};
use crate::guest_ssh::shell_quote;
use crate::lifecycle::{Lifecycle, OpError, Progress};

/// The checkout the bootstrap runs in.
const GUEST_REPO: &str = "/root/repo";
/// Where the bootstrap's output goes in the guest.
pub const MISE_LOG: &str = "/root/.cache/banger/mise-bootstrap.log";

/// Installs mise when the guest lacks it (official script, needs NAT), then
/// the workspace's tools. Config files in the imported checkout are trusted:
/// the user asked for this workspace.
pub fn mise_script() -> String {
    format!(
        r#"set -e
export PATH="$HOME/.local/bin:$PATH" MISE_YES=1 MISE_TRUSTED_CONFIG_PATHS={GUEST_REPO}
cd {GUEST_REPO}
if ! command -v mise >/dev/null 2>&1; then
  echo "mise is not in the guest; installing it from https://mise.run"
  if command -v curl >/dev/null 2>&1; then curl -fsSL https://mise.run | sh
  elif command -v wget >/dev/null 2>&1; then wget -qO- https://mise.run | sh
  else echo "neither curl nor wget is in the guest to fetch mise" >&2; exit 1
  fi
fi
mise install
echo "mise bootstrap: done""#
    )
}

/// The guest command line running `script` with its output in `log`: in
/// the foreground, its output also on stdout, exiting with the script's
/// code (`wait`); else detached from the SSH session so that returns at once.
pub fn guest_line(script: &str, wait: bool, log: &str) -> String {
    let script = shell_quote(script);
    let dir = Path::new(log)
        .parent()
        .map_or_else(|| "/".to_string(), |d| d.display().to_string());
    if wait {
        format!(
            "mkdir -p {dir} && {{ sh -c {script} 2>&1; echo $? > {log}.rc; }} | tee {log}; exit \"$(cat {log}.rc)\""
        )
    } else {
        format!("mkdir -p {dir} && nohup sh -c {script} > {log} 2>&1 < /dev/null &")
    }
}

/// `POST /v1/vms/{name}/bootstrap`: runs the mise bootstrap in the VM's
/// checkout over the daemon's SSH connection.
pub async fn bootstrap_vm(
    lc: &Lifecycle,
    name: &str,
    req: BootstrapRequest,
    progress: &Progress,
) -> Result<BootstrapView, OpError> {
    let _guard = super::vm::lock_vm(name).await;
    let ssh = super::vm::connect(lc, name).await?;
    progress.stage(
        "bootstrap",
        if req.wait {
            "installing the workspace's tools with mise".to_string()
        } else {
            format!("starting mise in the background, logging to {MISE_LOG}")
        },
    );
    let line = guest_line(&mise_script(), req.wait, MISE_LOG);
    let out = ssh.exec(&line, None).await;
    ssh.close().await;
    let out = out.map_err(|e| OpError::Stage {
        stage: "bootstrap".to_string(),
        source: Box::new(e),
    })?;
    Ok(BootstrapView {
        log: MISE_LOG.into(),
        waited: req.wait,
        status: req.wait.then_some(out.status),
        output: if req.wait {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            String::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_bootstrap_wrapper_logs_and_reports_the_scripts_exit_code() {
        // The guest-side wrappers, run by a local sh as the guest would.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/boot.log");
        let log = log.to_str().unwrap();
        let script = "echo \"it's installing\"; exit 5";
        let out = std::process::Command::new("sh")
            .args(["-c", &guest_line(script, true, log)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(5), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's installing\n");
        assert_eq!(std::fs::read_to_string(log).unwrap(), "it's installing\n");

        // In the background the caller returns at once with success and the
        // log fills in later.
        std::fs::remove_file(log).unwrap();
        let script = format!("echo later; touch {log}.done");
        let st = std::process::Command::new("sh")
            .args(["-c", &guest_line(&script, false, log)])
            .status()
            .unwrap();
        assert!(st.success());
        let done = format!("{log}.done");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&done).exists() {
            assert!(Instant::now() < deadline, "the background script never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(log).unwrap(), "later\n");
        // The script itself parses.
        let st = std::process::Command::new("sh")
            .args(["-n", "-c", &mise_script()])
            .status()
            .unwrap();
        assert!(st.success());
    }
}
