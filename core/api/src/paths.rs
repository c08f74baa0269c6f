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
        let runtime_dir = match abs("XDG_RUNTIME_DIR") {
            Some(p) => p.join("banger"),
            None => std::env::temp_dir().join(format!("banger-{uid}")),
        };
        Ok(Paths {
            config_dir: xdg("XDG_CONFIG_HOME", ".config")?,
            state_dir: xdg("XDG_STATE_HOME", ".local/state")?,
            cache_dir: xdg("XDG_CACHE_HOME", ".cache")?,
            runtime_dir,
        })
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

    /// A VM's VMM API socket. Kept in the runtime dir, not the VM dir: Unix
    /// socket paths are limited to 108 bytes.
    pub fn vmm_socket(&self, id: &VmId) -> PathBuf {
        self.runtime_dir.join("vms").join(format!("{id}.sock"))
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
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.runtime_dir.join("vms"))?;
        Ok(())
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
