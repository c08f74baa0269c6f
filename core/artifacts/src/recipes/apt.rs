//! Packages from the host's own Debian/Ubuntu mirror, fetched with the
//! host's `apt-get` but with a private state directory under banger's
//! cache: the host's sources and keys decide what is trusted (apt checks the
//! signed Release files as always), while banger never touches the host's
//! package lists or needs root to refresh its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

pub use banger_api::catalog::recipes::{debian_source, host_sources, source_lines};

use super::{RecipeError, run};

/// Package lists older than this are refreshed before a lookup.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// apt with its state under `root`.
#[derive(Debug, Clone)]
pub struct Apt {
    root: PathBuf,
}

impl Apt {
    /// apt whose lists and downloads live under `root` (created on use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Apt { root: root.into() }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let state = self.root.join("state");
        cmd.arg("-q")
            .arg("-o")
            .arg(format!("Dir::State={}", state.display()))
            .arg("-o")
            .arg(format!(
                "Dir::State::status={}",
                self.root.join("status").display()
            ))
            .arg("-o")
            .arg(format!("Dir::Cache={}", self.root.join("cache").display()))
            .arg("-o")
            .arg("Debug::NoLocking=true");
        // As root apt downloads as `_apt`, which cannot write into our cache.
        if nix::unistd::geteuid().is_root() {
            cmd.arg("-o").arg("APT::Sandbox::User=root");
        }
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        cmd
    }

    /// Refreshes the private package lists when they are missing or older
    /// than a day.
    pub fn update(&self) -> Result<(), RecipeError> {
        let lists = self.root.join("state/lists");
        let fresh = std::fs::metadata(lists.join("lock"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if fresh {
            return Ok(());
        }
        for dir in [
            lists.join("partial"),
            self.root.join("cache/archives/partial"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| RecipeError::io("create", &dir, e))?;
        }
        let status = self.root.join("status");
        if !status.exists() {
            std::fs::write(&status, b"").map_err(|e| RecipeError::io("write", &status, e))?;
        }
        run(self.command("apt-get").arg("update"), "apt-get update")?;
        std::fs::write(lists.join("lock"), b"").map_err(|e| RecipeError::io("write", &lists, e))
    }

    /// The first of `candidates` the mirror has, followed through a
    /// meta-package's first `linux-image-*`/`Depends` to the real package.
    pub fn resolve(&self, candidates: &[&str]) -> Result<String, RecipeError> {
        for name in candidates {
            let out = self
                .command("apt-cache")
                .args(["depends", "--no-recommends", "--no-suggests"])
                .arg(name)
                .output()
                .map_err(|e| RecipeError::Spawn("apt-cache", e))?;
            if !out.status.success() {
                continue;
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let depends = text.lines().find_map(|l| {
                let dep = l.trim().strip_prefix("Depends: ")?;
                dep.starts_with("linux-image-").then(|| dep.to_string())
            });
            return Ok(depends.unwrap_or_else(|| name.to_string()));
        }
        Err(RecipeError::NoPackage(
            candidates.iter().map(|c| c.to_string()).collect(),
        ))
    }

    /// Downloads `package` into `dir` and returns the `.deb`'s path.
    pub fn download(&self, package: &str, dir: &Path) -> Result<PathBuf, RecipeError> {
        run(
            self.command("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(dir),
            "apt-get download",
        )?;
        let prefix = format!("{package}_");
        std::fs::read_dir(dir)
            .map_err(|e| RecipeError::io("list", dir, e))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
            .ok_or_else(|| RecipeError::NoPackage(vec![package.to_string()]))
    }
}
