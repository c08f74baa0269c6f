//! Capabilities' guest jobs through the real daemon's API, against the fake
//! firecracker: the requests the daemon refuses before running anything.
//! Running a job in a real guest (the mise bootstrap) is the e2e suite's.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use banger_api::api::{JobRequest, JobView};
    use banger_api::client::{Client, ClientError, Method};
    use test_infra::BangerEnv;

    /// `POST path` with a job request: the daemon's error status and text,
    /// which must be an answer before any stream.
    fn refusal(env: &BangerEnv, path: &str) -> (u16, String) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = Client::new(env.socket());
        let res: Result<JobView, ClientError> = rt.block_on(client.stream_events(
            Method::POST,
            path,
            Some(&JobRequest { wait: true }),
            |_| {},
        ));
        match res {
            Err(ClientError::Api { status, message }) => (status, message),
            other => panic!("{path}: expected an error answer, got {other:?}"),
        }
    }

    #[test]
    fn job_requests_are_refused_naming_the_capability_job_or_vm() {
        let env = BangerEnv::new();
        env.create("plain", &[]).ok();
        assert!(
            !env.show("plain")
                .record
                .caps
                .iter()
                .any(|c| c.name == "mise"),
            "mise is opt-in"
        );

        // A VM without the capability: the fix is to create one with it.
        let (status, msg) = refusal(&env, "/v1/vms/plain/capabilities/mise/jobs/bootstrap");
        assert_eq!(status, 400, "{msg}");
        assert!(
            msg.contains("VM plain") && msg.contains("--cap mise"),
            "{msg}"
        );

        // An unknown capability: the known ones are listed.
        let (status, msg) = refusal(&env, "/v1/vms/plain/capabilities/nope/jobs/bootstrap");
        assert_eq!(status, 400, "{msg}");
        assert!(
            msg.contains("\"nope\"") && msg.contains("mise") && msg.contains("banger cap list"),
            "{msg}"
        );

        // A job the capability does not offer: its jobs are listed.
        let (status, msg) = refusal(&env, "/v1/vms/plain/capabilities/mise/jobs/frobnicate");
        assert_eq!(status, 400, "{msg}");
        assert!(
            msg.contains("\"frobnicate\"") && msg.contains("bootstrap"),
            "{msg}"
        );

        // A capability that offers none says so.
        let (status, msg) = refusal(&env, "/v1/vms/plain/capabilities/work-disk/jobs/bootstrap");
        assert_eq!(status, 400, "{msg}");
        assert!(msg.contains("work-disk offers no guest jobs"), "{msg}");

        // An unknown VM.
        let (status, msg) = refusal(&env, "/v1/vms/ghost/capabilities/mise/jobs/bootstrap");
        assert_eq!(status, 404, "{msg}");
        assert!(msg.contains("ghost"), "{msg}");

        // The route the bootstrap had before it moved into the capability.
        let (status, _) = refusal(&env, "/v1/vms/plain/bootstrap");
        assert_eq!(status, 404);

        // Nothing ran: the VM is as it was.
        assert_eq!(
            env.show("plain").record.state,
            banger_api::model::VmState::Running
        );
    }
}
