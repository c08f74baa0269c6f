//! `ssh-identity` (always on): banger's own SSH key in every guest's
//! `authorized_keys`, through the guest config. The key pair is made once,
//! in banger's ssh directory, at the first start that needs it; `vm ssh`,
//! workspace imports and `vm run` log in with it. It cannot be turned off:
//! a VM without it could not be reached by those commands.
//!
//! It also hardens the image's sshd with a drop-in,
//! [`SSHD_DROP_IN`], whatever the image ships: keys only (no password or
//! keyboard-interactive login), root by key only, and `StrictModes yes`
//! (the agent keeps `/root` at `0755 root:root`, which it needs).

use std::path::PathBuf;
use std::sync::Arc;

use banger_api::guest::{GuestConfig, GuestFile};
use banger_api::model::CapOptions;
use banger_api::ssh::SshIdentity as Identity;
use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, HookCtx};

/// Name used with `--cap` and in stage names (`guest_config:ssh-identity`).
pub const NAME: &str = "ssh-identity";

/// The sshd drop-in written into every guest. sshd reads
/// `/etc/ssh/sshd_config.d/*.conf` through the `Include` at the top of the
/// stock `sshd_config` of Debian, Ubuntu, Fedora, Arch and Alpine.
pub const SSHD_DROP_IN: &str = "/etc/ssh/sshd_config.d/banger.conf";

/// The drop-in's contents. sshd keeps the first value it reads for a
/// keyword, so these hold unless an earlier file sets the same keyword.
pub const SSHD_HARDENING: &str = "\
# Written by banger at every start (ssh-identity capability); edits are lost.
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes yes
";

/// The capability: where the identity lives.
#[derive(Debug)]
pub struct SshIdentity {
    ssh_dir: PathBuf,
}

impl SshIdentity {
    /// The identity kept in `ssh_dir` (`id_ed25519`, `id_ed25519.pub`).
    pub fn new(ssh_dir: PathBuf) -> Self {
        SshIdentity { ssh_dir }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(SshIdentity::new(env.paths.ssh_dir())))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for SshIdentity {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "banger's SSH key in the guest's authorized_keys, for vm ssh, workspaces and vm run (always on)"
    }

    fn always_on(&self) -> bool {
        true
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: ssh-identity takes no options; its key pair is in banger's ssh directory"
            ))),
        }
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let identity = Identity::load_or_create(&self.ssh_dir)
            .map_err(|e| CapError::with("Cannot load banger's SSH identity", e))?;
        guest
            .authorized_keys
            .push(identity.public_line().to_string());
        guest.files.push(GuestFile {
            path: SSHD_DROP_IN.into(),
            contents: SSHD_HARDENING.as_bytes().to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        });
        ctx.log
            .info("authorized banger's SSH key; sshd takes keys only");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use banger_api::config::Config;
    use banger_core::capability::HookLog;
    use banger_host::hostops::RecordingHostOps;

    use super::*;

    struct Quiet;
    impl HookLog for Quiet {
        fn info(&self, _msg: &str) {}
        fn warn(&self, _msg: &str) {}
    }

    fn guest_config(ssh_dir: &Path) -> GuestConfig {
        let vm = crate::test_env::test_vm("sshd");
        let (host, options) = (RecordingHostOps::default(), CapOptions::new());
        let config = Config::defaults(Path::new("/nonexistent/config.toml"));
        let ctx = HookCtx {
            vm: &vm,
            vm_dir: ssh_dir,
            options: &options,
            host: &host,
            config: &config,
            log: &Quiet,
        };
        let mut guest = GuestConfig::new("sshd");
        SshIdentity::new(ssh_dir.join("ssh"))
            .guest_config(&ctx, &mut guest)
            .unwrap();
        guest
    }

    #[test]
    fn every_guest_gets_the_sshd_drop_in_root_owned_and_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let guest = guest_config(dir.path());
        let drop_in: Vec<&GuestFile> = guest
            .files
            .iter()
            .filter(|f| f.path == Path::new("/etc/ssh/sshd_config.d/banger.conf"))
            .collect();
        assert_eq!(drop_in.len(), 1, "{:?}", guest.files);
        let f = drop_in[0];
        assert_eq!((f.mode, f.uid, f.gid), (0o644, 0, 0));
        let text = String::from_utf8(f.contents.clone()).unwrap();
        for line in [
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes yes",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
    }

    /// The drop-in as the host's real sshd reads it, included the way
    /// Debian's `sshd_config` does, before an image's own looser settings.
    #[test]
    fn sshd_takes_the_drop_in_over_the_images_own_settings() {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.is_file() {
            eprintln!(
                "SKIP sshd_takes_the_drop_in_over_the_images_own_settings: no /usr/sbin/sshd (apt package openssh-server)"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let guest = guest_config(dir.path());
        let d = dir.path().join("sshd_config.d");
        std::fs::create_dir(&d).unwrap();
        let f = guest
            .files
            .iter()
            .find(|f| f.path == Path::new(SSHD_DROP_IN))
            .unwrap();
        std::fs::write(d.join("banger.conf"), &f.contents).unwrap();
        let main = dir.path().join("sshd_config");
        std::fs::write(
            &main,
            format!(
                "Include {}/*.conf\nPasswordAuthentication yes\nPermitRootLogin yes\nStrictModes no\nKbdInteractiveAuthentication yes\n",
                d.display()
            ),
        )
        .unwrap();
        let key = dir.path().join("host_key");
        let keygen = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(&key)
            .status()
            .unwrap();
        assert!(keygen.success());
        let out = Command::new(sshd)
            .arg("-T")
            .arg("-f")
            .arg(&main)
            .arg("-h")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let effective = String::from_utf8_lossy(&out.stdout);
        for line in [
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            // sshd -T spells prohibit-password by its old name.
            "permitrootlogin without-password",
            "strictmodes yes",
        ] {
            assert!(
                effective.lines().any(|l| l == line),
                "{line:?} not in sshd -T:\n{effective}"
            );
        }
    }
}
