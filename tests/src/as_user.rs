//! Running a test's banger as an unprivileged user: the user `banger-e2e`
//! (created when missing), `banger system install` for it under a scratch
//! root (the only root step: it starts `banger-helper` as the supervised
//! process), a root-owned `bin/` beside the env with copies of the binaries
//! it runs (the build tree under /root is closed to other users), and
//! [`AsUser::wrap`], which runs a program as that user through setpriv.
//!
//! The guest rig uses it for `e2e.rs` ([`requested`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest_rig::run;

/// The unprivileged user the daemon runs as.
pub const USER: &str = "banger-e2e";

/// Whether a rig runs its daemon as [`USER`]: `BANGER_E2E_AS_USER=1`
/// says yes and `=0` no for every rig; unset, `default` (true for
/// `e2e.rs`, false for the benches and other root-daemon suites).
pub fn requested(default: bool) -> bool {
    match std::env::var("BANGER_E2E_AS_USER").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => default,
    }
}

/// `USER`'s uid and gid, made with useradd first when missing.
pub fn ensure_user() -> (u32, u32) {
    if nix::unistd::User::from_name(USER).unwrap().is_none() {
        let out = run(
            "useradd",
            &[
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ],
        );
        assert!(out.status.success(), "useradd: {out:?}");
    }
    let u = nix::unistd::User::from_name(USER).unwrap().unwrap();
    (u.uid.as_raw(), u.gid.as_raw())
}

pub fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The user's side of an env rooted at `root`: its `bin/` and the helper
/// installed for it. Dropping it uninstalls the helper (stopping it).
#[derive(Debug)]
pub struct AsUser {
    pub uid: u32,
    pub gid: u32,
    root: PathBuf,
    system: tempfile::TempDir,
}

/// Top-level entries of an env the daemon (or its VMs) own with their own
/// modes and owners, never handed over wholesale; `bin/` stays root's.
const KEEP: [&str; 4] = ["bin", "state", "run", "cache"];

impl AsUser {
    /// Makes `root` the user's (mode 0755 so root's `bin/` inside it is
    /// reachable), copies `banger`/`bangerd` into a root-owned `bin/`, and
    /// installs the helper for the daemon whose state dir is `state_dir`
    /// on `bridge`/`subnet`, with `group` for its socket.
    pub fn install(root: &Path, state_dir: &Path, bridge: &str, subnet: &str, group: &str) -> Self {
        let (uid, gid) = ensure_user();
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        chmod(&bin, 0o755);
        let system = tempfile::Builder::new()
            .prefix("bgupsys")
            .tempdir()
            .unwrap();
        chmod(system.path(), 0o755);
        let me = AsUser {
            uid,
            gid,
            root: root.to_path_buf(),
            system,
        };
        for b in ["banger", "bangerd"] {
            me.copy_exe(&crate::workspace_bin(b));
        }
        chmod(root, 0o755);
        me.hand_over();
        let out = Command::new(crate::workspace_bin("banger"))
            .args(["system", "install", "--user", USER, "--group", group])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--bridge", bridge, "--subnet", subnet])
            .env("BANGER_SYSTEM_ROOT", me.system.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "system install: {out:?}");
        me
    }

    /// The helper's socket `system install` made.
    pub fn helper_socket(&self) -> PathBuf {
        self.system.path().join("run/banger-helper/helper.sock")
    }

    /// `from` copied (root-owned, 0755) into `bin/`, where the user can
    /// run it; its path there.
    pub fn copy_exe(&self, from: &Path) -> PathBuf {
        let to = self.bin(from.file_name().unwrap().to_str().unwrap());
        if !to.exists() {
            let staged = to.with_extension("staged");
            std::fs::copy(from, &staged).unwrap();
            chmod(&staged, 0o755);
            std::fs::rename(&staged, &to).unwrap();
        }
        to
    }

    /// `bin/NAME`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.root.join("bin").join(name)
    }

    /// A copy of the directory `from` at `root/NAME`, the user's.
    pub fn copy_dir(&self, from: &Path, name: &str) -> PathBuf {
        let to = self.root.join(name);
        if !to.exists() {
            let out = run("cp", &["-a", from.to_str().unwrap(), to.to_str().unwrap()]);
            assert!(out.status.success(), "cp {}: {out:?}", from.display());
        }
        self.hand_over();
        to
    }

    /// What the test (root) wrote into the env outside [`KEEP`] becomes
    /// the user's, as if the user had written it: the repositories, HOME
    /// files and config a test prepares. Run before every command.
    pub fn hand_over(&self) {
        let Ok(rd) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut stack: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| !KEEP.iter().any(|k| e.file_name() == *k))
            .map(|e| e.path())
            .collect();
        for d in ["", "state", "run", "cache"] {
            // The env's root (the user's, as a home is) and the roots of
            // the daemon's dirs, not what it put inside.
            let p = self.root.join(d);
            if std::fs::symlink_metadata(&p).is_ok_and(|m| m.uid() != self.uid) {
                let _ = std::os::unix::fs::lchown(&p, Some(self.uid), Some(self.gid));
            }
        }
        while let Some(p) = stack.pop() {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.uid() != self.uid {
                let _ = std::os::unix::fs::lchown(&p, Some(self.uid), Some(self.gid));
            }
            if m.is_dir()
                && let Ok(rd) = std::fs::read_dir(&p)
            {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }

    /// `program` run as the user through setpriv (its groups included, as
    /// a login would give them). Callers add the environment.
    pub fn wrap(&self, program: &Path) -> Command {
        self.hand_over();
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={USER}"),
            &format!("--regid={USER}"),
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        let _ = Command::new(crate::workspace_bin("banger"))
            .args(["system", "uninstall"])
            .env("BANGER_SYSTEM_ROOT", self.system.path())
            .output();
    }
}
