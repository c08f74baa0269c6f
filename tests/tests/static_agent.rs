//! The daemon refuses a dynamically linked guest agent before booting
//! anything: such an agent cannot run as the initramfs' `/init` (the guest
//! panics "No working init found" a minute later). Through the real CLI and
//! daemon with the fake firecracker, and the check on (these envs turn it
//! off by default for the fake VMM's sake).

#[cfg(test)]
mod tests {
    use banger_api::config::{ANY_AGENT_ENV, elf_interpreter};
    use test_infra::BangerEnv;

    /// An env that checks the agent, or `None` (skipped) when the host's
    /// /bin/true is not the dynamically linked executable the test needs.
    fn checking_env(test: &str) -> Option<BangerEnv> {
        if !matches!(
            elf_interpreter(std::path::Path::new("/bin/true")),
            Ok(Some(_))
        ) {
            eprintln!("SKIP {test}: /bin/true is not a dynamically linked ELF here");
            return None;
        }
        let mut env = BangerEnv::new();
        env.set_env(ANY_AGENT_ENV, "");
        Some(env)
    }

    fn assert_refused_before_boot(env: &BangerEnv, out: &test_infra::Run, name: &str) {
        assert!(
            out.stderr
                .contains("/bin/true is a dynamically linked banger-agent"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("scripts/build-agent"), "{}", out.stderr);
        // Refused while the machine is put together: no VMM was started.
        assert!(
            out.stderr.contains("configure_machine:vsock-agent"),
            "{}",
            out.stderr
        );
        assert!(
            !env.record_file().exists(),
            "the fake firecracker was started"
        );
        let list = env.banger(&["vm", "list"]).ok().stdout;
        assert!(!list.contains(name) || !list.contains("running"), "{list}");
    }

    #[test]
    fn a_dynamically_linked_agent_bin_fails_create_at_once_naming_build_agent() {
        let test = "a_dynamically_linked_agent_bin_fails_create_at_once_naming_build_agent";
        let Some(env) = checking_env(test) else {
            return;
        };
        env.write_config("agent_bin = \"/bin/true\"\n");
        let out = env.create("dyn", &["--cap", "vsock-agent"]).failed();
        assert_refused_before_boot(&env, &out, "dyn");
    }

    #[test]
    fn a_dynamically_linked_agent_option_is_refused_the_same_way() {
        let test = "a_dynamically_linked_agent_option_is_refused_the_same_way";
        let Some(env) = checking_env(test) else {
            return;
        };
        let out = env
            .create("dynopt", &["--cap", "vsock-agent:agent=/bin/true"])
            .failed();
        assert_refused_before_boot(&env, &out, "dynopt");
    }
}
