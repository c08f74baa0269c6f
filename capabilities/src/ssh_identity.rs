//! `ssh-identity` (always on): banger's own SSH key in every guest's
//! `authorized_keys`, through the guest config. The key pair is made once,
//! in banger's ssh directory, at the first start that needs it; `vm ssh`,
//! workspace imports and `vm run` log in with it. It cannot be turned off:
//! a VM without it could not be reached by those commands.
//!
//! It also hardens the image's sshd with a drop-in,
//! [`SSHD_DROP_IN`], whatever the image ships: keys only (no password or
//! keyboard-interactive login), root by key only, and `StrictModes yes`
//! (the agent keeps `/root` at `0755 root:root`, which it needs). When the
//! VM's root disk has no sshd at all it says so, and what to do.

use std::path::{Path, PathBuf};
use std::process::Command;
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

/// Where images keep sshd (`/usr/sbin` is a link to `bin` on merged-bin
/// systems, which debugfs follows).
const SSHD_PATHS: &[&str] = &["/usr/sbin/sshd", "/usr/bin/sshd"];

/// Whether the ext4 image `disk` has an sshd, read with `debugfs` (no
/// mount, no root); `None` when that cannot be told (no debugfs, not ext4).
pub fn image_has_sshd(disk: &Path) -> Option<bool> {
    let debugfs = banger_api::config::find_on_path("debugfs").or_else(|| {
        ["/usr/sbin/debugfs", "/sbin/debugfs"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })?;
    for path in SSHD_PATHS {
        let out = Command::new(&debugfs)
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(disk)
            .output()
            .ok()?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        if stdout.starts_with("Inode:") {
            return Some(true);
        }
        if !stderr.contains("File not found by ext2_lookup") {
            return None;
        }
    }
    Some(false)
}

/// What `vm create` says about an image without sshd.
pub const NO_SSHD_WARNING: &str = "the image has no sshd (/usr/sbin/sshd): `banger vm ssh NAME` and `vm run -- CMD` work through the guest agent instead, but plain `ssh NAME.vm`, scp, rsync and editors (ssh-config) and workspace imports (`vm run PATH`, `vm workspace`) need sshd; install openssh-server in the image (e.g. `RUN apt-get install -y openssh-server` in its Dockerfile) and pull it again";

/// The capability: where the identity lives.
#[derive(Debug)]
pub struct SshIdentity {
    key: PathBuf,
}

impl SshIdentity {
    /// The identity kept in `ssh_dir` (`id_ed25519`, `id_ed25519.pub`).
    pub fn new(ssh_dir: PathBuf) -> Self {
        SshIdentity::with_key(ssh_dir.join("id_ed25519"))
    }

    /// The identity whose private key is `key` (config `ssh_key_path`).
    pub fn with_key(key: PathBuf) -> Self {
        SshIdentity { key }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(SshIdentity::with_key(
        env.config.ssh_key_file(env.paths),
    )))
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
        let identity = Identity::load_or_create_key(&self.key)
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
        // The VM's own root disk (not yet booted now): say so when there
        // is no sshd for the key to log in to.
        let root_disk = ctx.vm_dir.join(banger_core::lifecycle::ROOT_DISK_FILE);
        if image_has_sshd(&root_disk) == Some(false) {
            ctx.log.warn(NO_SSHD_WARNING);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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

    /// An ext4 image made by mkfs.ext4 from `files` (relative paths; a
    /// `->` in a name makes a symlink), or `None` (skipped) without it.
    fn ext4_with(test: &str, dir: &Path, files: &[&str]) -> Option<PathBuf> {
        let tree = dir.join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        for f in files {
            match f.split_once(" -> ") {
                Some((link, target)) => {
                    std::fs::create_dir_all(tree.join(link).parent().unwrap()).unwrap();
                    std::os::unix::fs::symlink(target, tree.join(link)).unwrap();
                }
                None => {
                    std::fs::create_dir_all(tree.join(f).parent().unwrap()).unwrap();
                    std::fs::write(tree.join(f), "#!/bin/sh\n").unwrap();
                }
            }
        }
        let image = dir.join("root.ext4");
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&tree)
            .arg(&image)
            .arg("8M")
            .env("PATH", "/usr/sbin:/sbin:/usr/bin:/bin")
            .status();
        match made {
            Ok(s) if s.success() => Some(image),
            _ => {
                eprintln!("SKIP {test}: no mkfs.ext4 (apt package e2fsprogs)");
                None
            }
        }
    }

    #[test]
    fn sshd_is_found_in_an_ext4_image_through_merged_bin_links_or_reported_missing() {
        let test = "sshd_is_found_in_an_ext4_image_through_merged_bin_links_or_reported_missing";
        for (files, want) in [
            (&["usr/sbin/sshd", "etc/hostname"][..], Some(true)),
            (&["usr/bin/sshd", "usr/sbin -> bin"][..], Some(true)),
            (&["usr/bin/sshd"][..], Some(true)),
            (&["usr/sbin/nginx", "etc/ssh/sshd_config"][..], Some(false)),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let Some(image) = ext4_with(test, dir.path(), files) else {
                return;
            };
            assert_eq!(image_has_sshd(&image), want, "{files:?}");
        }
        // Not ext4 (or unreadable): cannot tell, so nothing is claimed.
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.img");
        std::fs::write(&junk, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(image_has_sshd(&junk), None);
        assert_eq!(image_has_sshd(&dir.path().join("missing.img")), None);
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
