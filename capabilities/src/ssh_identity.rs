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
//! VM's root disk has no sshd at all it says so, and what to do. That
//! answer is kept per image file (path, inode, size, times): a VM that has
//! not booted yet has an untouched copy of its image, so its image is
//! asked, once; a VM that has booted is asked about its own disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use banger_api::guest::{GuestConfig, GuestFile};
use banger_api::model::CapOptions;
use banger_api::ssh::SshIdentity as Identity;
use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, HookCtx};

use banger_artifacts::file_id::{self, FileId, FileState};

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
    sshd_in(&debugfs()?, disk)
}

/// The host's debugfs.
fn debugfs() -> Option<PathBuf> {
    banger_api::config::find_on_path("debugfs").or_else(|| {
        ["/usr/sbin/debugfs", "/sbin/debugfs"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// [`image_has_sshd`] with `debugfs`.
fn sshd_in(debugfs: &Path, disk: &Path) -> Option<bool> {
    for path in SSHD_PATHS {
        let out = Command::new(debugfs)
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
    sshd: SshdAnswers,
}

/// [`image_has_sshd`]'s answers by disk identity, "cannot tell" (not
/// ext4) included. Kept small: every booted VM's own disk is a new
/// identity at each start.
#[derive(Debug, Default)]
struct SshdAnswers(Mutex<HashMap<FileId, Option<bool>>>);

/// How many answers are kept before they are all dropped.
const SSHD_ANSWERS_KEPT: usize = 256;

impl SshdAnswers {
    /// `ask(disk)`, or the answer it gave for the same file before (`now`
    /// tells whether the file has settled).
    fn get(
        &self,
        disk: &Path,
        now: std::time::SystemTime,
        ask: impl FnOnce(&Path) -> Option<bool>,
    ) -> Option<bool> {
        let id = match file_id::settled(disk, now) {
            Some(FileState::Present(id)) => Some(id),
            _ => None,
        };
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = id.as_ref().and_then(|id| lock().get(id).copied()) {
            return known;
        }
        let answer = ask(disk);
        if let Some(id) = id {
            let mut kept = lock();
            if kept.len() >= SSHD_ANSWERS_KEPT {
                kept.clear();
            }
            kept.insert(id, answer);
        }
        answer
    }
}

/// The disk to look for sshd in: the image itself while the VM's root disk
/// is still the untouched copy of it (never booted, same length), else the
/// VM's own root disk.
fn sshd_disk(ctx: &HookCtx<'_>) -> PathBuf {
    let own = ctx.vm_dir.join(banger_core::lifecycle::ROOT_DISK_FILE);
    let image = &ctx.vm.spec.rootfs_source;
    let len = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    };
    if !ctx.vm.booted_once && len(image).is_some() && len(image) == len(&own) {
        image.clone()
    } else {
        own
    }
}

impl SshIdentity {
    /// The identity kept in `ssh_dir` (`id_ed25519`, `id_ed25519.pub`).
    pub fn new(ssh_dir: PathBuf) -> Self {
        SshIdentity::with_key(ssh_dir.join("id_ed25519"))
    }

    /// The identity whose private key is `key` (config `ssh_key_path`).
    pub fn with_key(key: PathBuf) -> Self {
        SshIdentity {
            key,
            sshd: SshdAnswers::default(),
        }
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
        // Say so when there is no sshd for the key to log in to. Without
        // debugfs nothing can be told (and nothing is kept: it may be
        // installed later).
        let has_sshd = debugfs().and_then(|bin| {
            self.sshd
                .get(&sshd_disk(ctx), std::time::SystemTime::now(), |disk| {
                    sshd_in(&bin, disk)
                })
        });
        if has_sshd == Some(false) {
            ctx.log.warn(NO_SSHD_WARNING);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use banger_api::config::Config;
    use banger_api::model::VmRecord;
    use banger_core::capability::HookLog;
    use banger_host::hostops::RecordingHostOps;

    use super::*;

    struct Quiet;
    impl HookLog for Quiet {
        fn info(&self, _msg: &str) {}
        fn warn(&self, _msg: &str) {}
    }

    /// `f` with a hook context for `vm` in `vm_dir`.
    fn with_ctx<R>(vm: &VmRecord, vm_dir: &Path, f: impl FnOnce(&HookCtx<'_>) -> R) -> R {
        let (host, options) = (RecordingHostOps::default(), CapOptions::new());
        let config = Config::defaults(Path::new("/nonexistent/config.toml"));
        f(&HookCtx {
            vm,
            vm_dir,
            options: &options,
            host: &host,
            config: &config,
            log: &Quiet,
        })
    }

    fn guest_config(ssh_dir: &Path) -> GuestConfig {
        let vm = crate::test_env::test_vm("sshd");
        let mut guest = GuestConfig::new("sshd");
        with_ctx(&vm, ssh_dir, |ctx| {
            SshIdentity::new(ssh_dir.join("ssh"))
                .guest_config(ctx, &mut guest)
                .unwrap()
        });
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

    #[test]
    fn the_sshd_answer_is_kept_per_image_file_until_the_file_changes() {
        let test = "the_sshd_answer_is_kept_per_image_file_until_the_file_changes";
        let (with, without) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (Some(with), Some(without)) = (
            ext4_with(test, with.path(), &["usr/sbin/sshd"]),
            ext4_with(test, without.path(), &["usr/sbin/nginx"]),
        ) else {
            return;
        };
        let answers = SshdAnswers::default();
        let asked = std::cell::Cell::new(0);
        let ask = |p: &Path| {
            asked.set(asked.get() + 1);
            image_has_sshd(p)
        };
        let settled = || std::time::SystemTime::now() + file_id::RACY * 2;
        assert_eq!(answers.get(&with, settled(), ask), Some(true));
        assert_eq!(answers.get(&with, settled(), ask), Some(true));
        assert_eq!(asked.get(), 1, "the second call read the image again");
        // Just changed: not trusted by its identity, asked again.
        assert_eq!(
            answers.get(&with, std::time::SystemTime::now(), ask),
            Some(true)
        );
        assert_eq!(asked.get(), 2);
        // Another image at the same path.
        std::fs::rename(&without, &with).unwrap();
        assert_eq!(answers.get(&with, settled(), ask), Some(false));
        assert_eq!(answers.get(&with, settled(), ask), Some(false));
        assert_eq!(asked.get(), 3);
        // "Cannot tell" (not ext4) is an answer about the file too.
        let junk = with.with_file_name("junk.img");
        std::fs::write(&junk, vec![0u8; 1 << 16]).unwrap();
        assert_eq!(answers.get(&junk, settled(), ask), None);
        assert_eq!(answers.get(&junk, settled(), ask), None);
        assert_eq!(asked.get(), 4);
    }

    #[test]
    fn a_vm_that_never_booted_is_asked_about_its_image_one_that_did_about_its_disk() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.ext4");
        let own = dir.path().join(banger_core::lifecycle::ROOT_DISK_FILE);
        std::fs::write(&image, vec![1u8; 4096]).unwrap();
        std::fs::write(&own, vec![1u8; 4096]).unwrap();
        let disk_of = |booted_once: bool| {
            let mut vm = crate::test_env::test_vm("sshd");
            vm.spec.rootfs_source = image.clone();
            vm.booted_once = booted_once;
            with_ctx(&vm, dir.path(), sshd_disk)
        };
        assert_eq!(disk_of(false), image);
        assert_eq!(disk_of(true), own);
        // Not a copy of the image (another length): its own disk.
        std::fs::write(&own, vec![1u8; 8192]).unwrap();
        assert_eq!(disk_of(false), own);
        std::fs::remove_file(&image).unwrap();
        assert_eq!(disk_of(false), own);
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
        // sshd checks its privilege separation directory even for -T; on a
        // host whose ssh service never ran (a fresh CI machine, a
        // container) nothing made it.
        if nix::unistd::geteuid().is_root() {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
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
