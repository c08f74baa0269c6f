//! Capabilities' guest jobs ([`GuestJob`]): guest work a capability offers
//! on demand, run by the daemon over its own SSH connection once the VM is
//! up, e.g. the `mise` capability's `bootstrap` after the workspace import.
//! The core knows no job by name: it checks the request against the
//! registry and the VM's enabled set, then runs the script it is given.

use std::path::Path;

use crate::capability::GuestJob;
use crate::guest_ssh::shell_quote;
use crate::lifecycle::{Lifecycle, OpError, Progress, render_chain};
use banger_api::api::{JobRequest, JobView};

/// Capability `cap`'s job `job` for VM `name`, checked before anything
/// runs: the capability exists and offers that job, the VM exists and has
/// the capability enabled.
pub async fn guest_job(
    lc: &Lifecycle,
    name: &str,
    cap: &str,
    job: &str,
) -> Result<GuestJob, OpError> {
    let capability = lc
        .registry()
        .get(cap)
        .map_err(|e| OpError::Invalid(render_chain(&e)))?;
    let jobs = capability.guest_jobs();
    let unknown = || {
        OpError::Invalid(if jobs.is_empty() {
            format!("Capability {cap} offers no guest jobs (asked for {job:?})")
        } else {
            format!(
                "Capability {cap} offers no job {job:?}; its jobs: {}",
                jobs.join(", ")
            )
        })
    };
    if !jobs.iter().any(|j| j == job) {
        return Err(unknown());
    }
    let vm = lc.get(name).await?;
    if !vm.caps.iter().any(|c| c.name == cap) {
        return Err(OpError::Invalid(format!(
            "VM {name} does not have the {cap} capability, so its {job} job cannot run; \
             create the VM with --cap {cap}"
        )));
    }
    capability.guest_job(job, &vm).ok_or_else(unknown)
}

/// `POST /v1/vms/{name}/capabilities/{cap}/jobs/{job}`: runs `job` (from
/// [`guest_job`]) in VM `name` under its operation lock, to completion when
/// `req.wait`, else started in the background.
pub async fn run_guest_job(
    lc: &Lifecycle,
    name: &str,
    stage: &str,
    job: GuestJob,
    req: JobRequest,
    progress: &Progress,
) -> Result<JobView, OpError> {
    let _guard = lc.lock_vm(name).await?;
    let ssh = super::vm::connect(lc, name).await?;
    progress.stage(
        stage,
        if req.wait {
            job.summary.clone()
        } else {
            format!("{} in the background, logging to {}", job.summary, job.log)
        },
    );
    let line = guest_line(&job.script, req.wait, &job.log);
    let out = ssh.exec(&line, None).await;
    ssh.close().await;
    let out = out.map_err(|e| OpError::Stage {
        stage: stage.to_string(),
        source: Box::new(e),
    })?;
    Ok(JobView {
        log: job.log.into(),
        waited: req.wait,
        status: req.wait.then_some(out.status),
        output: if req.wait {
            String::from_utf8_lossy(&out.stdout).into_owned()
        } else {
            String::new()
        },
    })
}

/// The guest command line running `script` with its output in `log`: in
/// the foreground, its output also on stdout, exiting with the script's
/// code (`wait`); else detached from the SSH session so that returns at once.
fn guest_line(script: &str, wait: bool, log: &str) -> String {
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn the_job_wrapper_logs_and_reports_the_scripts_exit_code() {
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
    }
}
