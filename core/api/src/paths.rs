//! Where banger keeps things on the host. A user daemon follows the XDG base
//! directory spec and honours `XDG_CONFIG_HOME`, `XDG_STATE_HOME`,
//! `XDG_CACHE_HOME` and `XDG_RUNTIME_DIR`, so tests relocate everything by
//! setting those variables.

use std::path::{Path, PathBuf};

use crate::model::VmId;

/// The host paths of one banger installation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// `$XDG_CONFIG_HOME/banger`: `config.toml`, `plugins/`.
    pub config_dir: PathBuf,
    /// `$XDG_STATE_HOME/banger`: the database, VM directories, images, kernels.
    pub state_dir: PathBuf,
    /// `$XDG_CACHE_HOME/banger`: downloads and layers that can be re-fetched.
    pub cache_dir: PathBuf,
    /// `$XDG_RUNTIME_DIR/banger`: sockets and the pid file.
    pub runtime_dir: PathBuf,
}

/// A root daemon's runtime directory when `XDG_RUNTIME_DIR` is not set.
pub const ROOT_RUNTIME_DIR: &str = "/run/banger";

/// The runtime directory is not safe to put the pid file and sockets in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Refusing the runtime directory {path}: {why}. It must be a directory owned by uid {uid} with mode 0700 \
     (as ssh-agent requires); remove it (`rm -r {path}`) so banger recreates it, or set XDG_RUNTIME_DIR to a directory only you own"
)]
pub struct UnsafeRuntimeDir {
    /// The directory.
    pub path: String,
    /// What is wrong with it.
    pub why: String,
    /// The daemon's uid.
    pub uid: u32,
}

/// A file a root (or the daemon's) process would execute or load can be
/// changed by someone else.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Refusing {what} {path}: {why}; {fix}")]
pub struct UntrustedPath {
    /// What the path is for (`firecracker_bin`, `the plugins directory`).
    pub what: String,
    /// The path as given.
    pub path: String,
    /// Which file or directory is wrong and how.
    pub why: String,
    /// The command that fixes it.
    pub fix: String,
}

/// sshd's StrictModes for a path a privileged process executes or loads:
/// the file and every directory above it (as given and after resolving
/// symlinks) must be owned by root or `owner_uid` and not group- or
/// world-writable. A root-owned sticky directory such as `/tmp` may be
/// world-writable: its sticky bit stops others replacing our entries.
pub fn check_trusted_path(what: &str, path: &Path, owner_uid: u32) -> Result<(), UntrustedPath> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String, fix: String| UntrustedPath {
        what: what.to_string(),
        path: path.display().to_string(),
        why,
        fix,
    };
    let real = std::fs::canonicalize(path).map_err(|e| {
        refuse(
            format!("cannot resolve it ({e})"),
            "give an existing path".into(),
        )
    })?;
    let mut chain: Vec<&Path> = path.ancestors().collect();
    chain.extend(real.ancestors());
    for p in chain.into_iter().filter(|p| !p.as_os_str().is_empty()) {
        let m = std::fs::metadata(p).map_err(|e| {
            refuse(
                format!("cannot inspect {} ({e})", p.display()),
                "give an existing path".into(),
            )
        })?;
        let shown = p.display();
        if m.uid() != 0 && m.uid() != owner_uid {
            return Err(refuse(
                format!(
                    "{shown} is owned by uid {}, not root or uid {owner_uid}",
                    m.uid()
                ),
                format!(
                    "run `sudo chown root {shown}` or move it somewhere only you and root can write"
                ),
            ));
        }
        let sticky_tmp = m.is_dir() && m.uid() == 0 && m.mode() & 0o1000 != 0;
        let writable = if sticky_tmp { 0 } else { m.mode() & 0o022 };
        if writable != 0 {
            return Err(refuse(
                format!(
                    "{shown} is writable by its group or by everyone (mode {:04o})",
                    m.mode() & 0o7777
                ),
                format!("run `chmod go-w {shown}`"),
            ));
        }
    }
    Ok(())
}

/// The environment had no usable home to derive paths from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Cannot locate banger's directories: set HOME (or XDG_CONFIG_HOME, XDG_STATE_HOME and XDG_CACHE_HOME)"
)]
pub struct NoHome;

impl Paths {
    /// Paths for the current user, from the process environment.
    pub fn from_env() -> Result<Self, NoHome> {
        Self::from_lookup(
            |k| std::env::var_os(k).map(PathBuf::from),
            nix::unistd::getuid().as_raw(),
        )
    }

    /// Paths from an arbitrary variable lookup (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<PathBuf>, uid: u32) -> Result<Self, NoHome> {
        // The spec says relative values are invalid and must be ignored.
        let abs = |k: &str| get(k).filter(|p| p.is_absolute());
        let home = abs("HOME");
        let xdg = |var: &str, fallback: &str| -> Result<PathBuf, NoHome> {
            match abs(var) {
                Some(p) => Ok(p.join("banger")),
                None => home
                    .as_ref()
                    .map(|h| h.join(fallback).join("banger"))
                    .ok_or(NoHome),
            }
        };
        // As root, like Docker's socket, under /run; a user without
        // XDG_RUNTIME_DIR gets /tmp/banger-<uid>, which
        // [`Paths::check_runtime_dir`] refuses unless it is theirs and 0700.
        let runtime_dir = match abs("XDG_RUNTIME_DIR") {
            Some(p) => p.join("banger"),
            None if uid == 0 => PathBuf::from(ROOT_RUNTIME_DIR),
            None => std::env::temp_dir().join(format!("banger-{uid}")),
        };
        Ok(Paths {
            config_dir: xdg("XDG_CONFIG_HOME", ".config")?,
            state_dir: xdg("XDG_STATE_HOME", ".local/state")?,
            cache_dir: xdg("XDG_CACHE_HOME", ".cache")?,
            runtime_dir,
        })
    }

    /// Every directory under `root` (`config`, `state`, `cache`, `run`),
    /// none created: a test's own tree.
    pub fn under(root: &Path) -> Self {
        Paths {
            config_dir: root.join("config"),
            state_dir: root.join("state"),
            cache_dir: root.join("cache"),
            runtime_dir: root.join("run"),
        }
    }

    /// `config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }

    /// Default plugin directory (config key `plugins_dir` overrides it).
    pub fn default_plugins_dir(&self) -> PathBuf {
        self.config_dir.join("plugins")
    }

    /// The SQLite database.
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }

    /// Parent of every VM directory.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir.join("vms")
    }

    /// One VM's directory.
    pub fn vm_dir(&self, id: &VmId) -> PathBuf {
        self.vms_dir().join(id.as_str())
    }

    /// banger's SSH identity and pinned guest host keys.
    pub fn ssh_dir(&self) -> PathBuf {
        self.state_dir.join("ssh")
    }

    /// The daemon's log when started on demand by the CLI.
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }

    /// The daemon's API socket.
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }

    /// The daemon's pid/lock file.
    pub fn pid_file(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.pid")
    }

    /// The listening daemon's pid and build
    /// ([`crate::api::DaemonBuild`]), written once its socket is bound.
    pub fn build_file(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.build")
    }

    /// A VM's VMM API socket. Kept in the runtime dir, not the VM dir: Unix
    /// socket paths are limited to 108 bytes.
    pub fn vmm_socket(&self, id: &VmId) -> PathBuf {
        self.runtime_dir.join("vms").join(format!("{id}.sock"))
    }

    /// Refuses a runtime directory that is not a real directory owned by
    /// `uid` with mode 0700, so nobody else can have planted a symlink for
    /// the pid file or swapped a socket in it.
    pub fn check_runtime_dir(&self, uid: u32) -> Result<(), UnsafeRuntimeDir> {
        use std::os::unix::fs::MetadataExt;
        let refuse = |why: String| UnsafeRuntimeDir {
            path: self.runtime_dir.display().to_string(),
            why,
            uid,
        };
        let m = std::fs::symlink_metadata(&self.runtime_dir)
            .map_err(|e| refuse(format!("cannot inspect it ({e})")))?;
        if m.file_type().is_symlink() {
            return Err(refuse("it is a symbolic link".into()));
        }
        if !m.is_dir() {
            return Err(refuse("it is not a directory".into()));
        }
        if m.uid() != uid {
            return Err(refuse(format!("it is owned by uid {}", m.uid())));
        }
        if m.mode() & 0o7777 != 0o700 {
            return Err(refuse(format!("its mode is {:04o}", m.mode() & 0o7777)));
        }
        Ok(())
    }

    /// Creates every directory with owner-only permissions where it matters.
    pub fn create_all(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        for (dir, mode) in [
            (&self.config_dir, 0o755),
            (&self.state_dir, 0o700),
            (&self.cache_dir, 0o755),
            (&self.runtime_dir, 0o700),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.vms_dir())?;
        Ok(())
    }

    /// Creates `vms/` in the runtime directory, after
    /// [`Paths::check_runtime_dir`] passed (never through a planted link).
    pub fn create_runtime_vms_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = self.runtime_dir.join("vms");
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory; remove it", dir.display()),
                ));
            }
            Err(_) => {}
        }
        std::fs::DirBuilder::new().mode(0o700).create(dir)
    }
}

/// A path argument the user gave that does not name a usable file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputFileError {
    /// Relative paths mean nothing to the daemon (it has its own cwd).
    #[error("{flag} {path}: path must be absolute")]
    Relative {
        /// The flag (`--kernel`).
        flag: &'static str,
        /// The path given.
        path: String,
    },
    /// Missing, not a regular file, or unreadable.
    #[error("{flag} {path}: not a readable file; pass an existing {what}")]
    Missing {
        /// The flag.
        flag: &'static str,
        /// The path given.
        path: String,
        /// What the file should be.
        what: &'static str,
    },
}

/// Checks that `path`, given with `flag`, is an absolute path to a readable
/// regular file (a `what`).
pub fn check_input_file(
    flag: &'static str,
    path: &Path,
    what: &'static str,
) -> Result<(), InputFileError> {
    let shown = || path.display().to_string();
    if !path.is_absolute() {
        return Err(InputFileError::Relative {
            flag,
            path: shown(),
        });
    }
    let readable =
        std::fs::metadata(path).is_ok_and(|m| m.is_file()) && std::fs::File::open(path).is_ok();
    if readable {
        Ok(())
    } else {
        Err(InputFileError::Missing {
            flag,
            path: shown(),
            what,
        })
    }
}

/// Whether `p` is under `root` after lexical normalisation (no `..` escapes).
pub fn is_within(root: &Path, p: &Path) -> bool {
    use std::path::Component;
    let mut depth: usize = 0;
    let rel = match p.strip_prefix(root) {
        Ok(r) => r,
        Err(_) => return false,
    };
    for c in rel.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return false;
                }
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<PathBuf> {
        let m: HashMap<String, PathBuf> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), PathBuf::from(v)))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn honours_every_xdg_variable() {
        let p = Paths::from_lookup(
            lookup(&[
                ("HOME", "/home/u"),
                ("XDG_CONFIG_HOME", "/c"),
                ("XDG_STATE_HOME", "/s"),
                ("XDG_CACHE_HOME", "/k"),
                ("XDG_RUNTIME_DIR", "/r"),
            ]),
            1000,
        )
        .unwrap();
        assert_eq!(p.config_dir, PathBuf::from("/c/banger"));
        assert_eq!(p.state_dir, PathBuf::from("/s/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/k/banger"));
        assert_eq!(p.socket(), PathBuf::from("/r/banger/bangerd.sock"));
    }

    #[test]
    fn falls_back_to_home_and_ignores_relative_values() {
        let p = Paths::from_lookup(
            lookup(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "rel")]),
            1000,
        )
        .unwrap();
        assert_eq!(p.config_dir, PathBuf::from("/home/u/.config/banger"));
        assert_eq!(p.state_dir, PathBuf::from("/home/u/.local/state/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/home/u/.cache/banger"));
        assert!(p.runtime_dir.ends_with("banger-1000"));
    }

    #[test]
    fn root_without_xdg_runtime_dir_uses_run_banger() {
        let p = Paths::from_lookup(lookup(&[("HOME", "/root")]), 0).unwrap();
        assert_eq!(p.runtime_dir, PathBuf::from("/run/banger"));
        let p =
            Paths::from_lookup(lookup(&[("HOME", "/root"), ("XDG_RUNTIME_DIR", "/r")]), 0).unwrap();
        assert_eq!(p.runtime_dir, PathBuf::from("/r/banger"));
    }

    fn paths_with_runtime(runtime_dir: PathBuf) -> Paths {
        Paths {
            config_dir: "/c".into(),
            state_dir: "/s".into(),
            cache_dir: "/k".into(),
            runtime_dir,
        }
    }

    #[test]
    fn runtime_dir_must_be_ours_a_real_dir_and_0700() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let rt = dir.path().join("banger");
        std::fs::create_dir(&rt).unwrap();
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o700)).unwrap();
        let p = paths_with_runtime(rt.clone());
        assert_eq!(p.check_runtime_dir(me), Ok(()));

        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = p.check_runtime_dir(me).unwrap_err().to_string();
        assert!(err.contains("its mode is 0755"), "{err}");
        assert!(err.contains("XDG_RUNTIME_DIR"), "{err}");

        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = p.check_runtime_dir(me + 1).unwrap_err().to_string();
        assert!(err.contains(&format!("owned by uid {me}")), "{err}");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&rt, &link).unwrap();
        let err = paths_with_runtime(link).check_runtime_dir(me).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn strict_modes_refuse_group_or_world_writable_files_and_dirs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let bin = dir.path().join("qemu");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The temp dir sits in /tmp: root-owned and sticky, so allowed.
        check_trusted_path("qemu_bin", &bin, me).unwrap();

        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_trusted_path("qemu_bin", &bin, me)
            .unwrap_err()
            .to_string();
        assert!(err.contains("Refusing qemu_bin"), "{err}");
        assert!(err.contains("mode 0777"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");

        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = check_trusted_path("qemu_bin", &bin, me)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(err.contains("writable by its group"), "{err}");

        // A link is judged by where it points too.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let target = open.path().join("real");
        std::fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = check_trusted_path("firecracker_bin", &link, me)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("writable by its group or by everyone"),
            "{err}"
        );

        let missing = check_trusted_path("qemu_bin", &dir.path().join("nope"), me);
        assert!(missing.is_err());
    }

    #[test]
    fn strict_modes_refuse_a_file_owned_by_someone_else() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP strict_modes_refuse_a_file_owned_by_someone_else: needs root to chown");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("helper.toml");
        std::fs::write(&f, b"").unwrap();
        std::os::unix::fs::chown(&f, Some(65534), None).unwrap();
        let err = check_trusted_path("the helper config", &f, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert!(err.contains("sudo chown root"), "{err}");
        check_trusted_path("the helper config", &f, 65534).unwrap();
    }

    #[test]
    fn no_home_is_a_clear_error() {
        assert_eq!(Paths::from_lookup(lookup(&[]), 0), Err(NoHome));
    }

    #[test]
    fn is_within_rejects_escapes() {
        let root = Path::new("/a/b");
        assert!(is_within(root, Path::new("/a/b/c/d")));
        assert!(is_within(root, Path::new("/a/b/c/../d")));
        assert!(!is_within(root, Path::new("/a/b/../c")));
        assert!(!is_within(root, Path::new("/a/c")));
    }

    #[test]
    fn input_files_must_be_absolute_existing_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vmlinux");
        std::fs::write(&f, b"k").unwrap();
        assert_eq!(check_input_file("--kernel", &f, "kernel"), Ok(()));
        let rel = check_input_file("--kernel", Path::new("vmlinux"), "kernel").unwrap_err();
        assert!(
            rel.to_string()
                .contains("--kernel vmlinux: path must be absolute"),
            "{rel}"
        );
        let missing =
            check_input_file("--rootfs", &dir.path().join("nope"), "root image").unwrap_err();
        assert!(
            missing.to_string().contains("pass an existing root image"),
            "{missing}"
        );
        assert!(
            check_input_file("--rootfs", dir.path(), "root image").is_err(),
            "a directory is not a file"
        );
    }
}
