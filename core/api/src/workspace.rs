//! Workspace import, the host side: what an import would send, read from the
//! repository with the `git` CLI (never libgit2, so the user's git config,
//! attributes and ignore rules apply exactly as they do in their shell).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How `prepare` is asked to import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareOptions {
    /// Also copy untracked, non-ignored files.
    pub include_untracked: bool,
    /// Create this guest-only branch.
    pub branch: Option<String>,
    /// Start `branch` at this host ref instead of the working state
    /// (requires `branch`).
    pub from: Option<String>,
    /// Copy the repository directory as is (`.git` and submodules included)
    /// instead of bundle + overlay.
    pub full_copy: bool,
}

/// What lands in the guest besides the committed history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// History from a bundle plus tracked working-tree changes.
    Tracked,
    /// History plus tracked changes plus untracked, non-ignored files.
    TrackedAndUntracked,
    /// History only: the guest branch starts clean at `--from`.
    Clean,
    /// The directory tree copied as is.
    FullCopy,
}

impl Mode {
    /// The short name used in the API (`tracked`, `tracked+untracked`,
    /// `clean`, `full-copy`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tracked => "tracked",
            Mode::TrackedAndUntracked => "tracked+untracked",
            Mode::Clean => "clean",
            Mode::FullCopy => "full-copy",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Tracked => "tracked files (history + uncommitted tracked changes)",
            Mode::TrackedAndUntracked => {
                "tracked + untracked files (history + uncommitted changes + untracked, non-ignored files)"
            }
            Mode::Clean => "history only (the branch starts clean at --from)",
            Mode::FullCopy => "full copy (the directory as is, .git included)",
        })
    }
}

/// Why a path is in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Tracked and different from HEAD (modified, added to the index, type
    /// changed).
    Modified,
    /// Tracked in HEAD and gone from the working tree.
    Deleted,
    /// Not tracked, not ignored (only with `include_untracked`).
    Untracked,
    /// Part of a full copy.
    Copied,
}

impl FileKind {
    fn label(self) -> &'static str {
        match self {
            FileKind::Modified => "modified",
            FileKind::Deleted => "deleted",
            FileKind::Untracked => "untracked",
            FileKind::Copied => "copy",
        }
    }
}

/// What a present file is on the host; it is recreated as such.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileType {
    /// A regular file without execute bits.
    Regular,
    /// A regular file with an execute bit.
    Executable,
    /// A symbolic link (copied as a link, never followed).
    Symlink,
    /// A directory (full copy only, so empty ones survive).
    Directory,
}

/// One path of the overlay, relative to the repository root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanFile {
    /// Relative path.
    pub path: PathBuf,
    /// Why it is sent.
    pub kind: FileKind,
    /// What it is, for paths that exist (`None` for deletions).
    pub file_type: Option<FileType>,
}

/// A git `user.name` / `user.email` pair; either may be unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitIdentity {
    /// `user.name`.
    pub name: Option<String>,
    /// `user.email`.
    pub email: Option<String>,
}

/// Everything an import would do, read from the host repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The repository's top level.
    pub root: PathBuf,
    /// What is sent.
    pub mode: Mode,
    /// The host's HEAD commit.
    pub head_commit: String,
    /// The commit the guest checkout starts from, and the default base of
    /// `export` (HEAD, or `--from`).
    pub base_commit: String,
    /// The host's current branch, when HEAD is not detached.
    pub head_branch: Option<String>,
    /// The guest-only branch to create.
    pub branch: Option<String>,
    /// The overlay (or, in full-copy mode, every path copied), sorted.
    pub files: Vec<PlanFile>,
    /// Untracked, non-ignored files left out because untracked files were
    /// not asked for.
    pub skipped_untracked: usize,
    /// `git config --global` identity, for the guest's `~/.gitconfig`.
    pub global_identity: GitIdentity,
    /// Repository-local identity, for the imported checkout.
    pub local_identity: GitIdentity,
}

/// Inspects the repository enclosing `path` and decides what an import
/// sends. Reads only; runs `git`.
pub fn plan(path: &Path, opts: &PrepareOptions) -> Result<Plan, WorkspaceError> {
    if opts.from.is_some() && opts.branch.is_none() {
        return Err(WorkspaceError::FromWithoutBranch);
    }
    let meta = fs::metadata(path).map_err(|e| WorkspaceError::ReadPath(path.into(), e))?;
    if !meta.is_dir() {
        return Err(WorkspaceError::NotADirectory(path.into()));
    }
    let probe = git(path)
        .args(["rev-parse", "--is-bare-repository", "--is-inside-git-dir"])
        .output()
        .map_err(WorkspaceError::RunGit)?;
    if !probe.status.success() {
        return Err(WorkspaceError::NotARepository(path.into()));
    }
    let flags = String::from_utf8_lossy(&probe.stdout);
    let mut flags = flags.lines();
    if flags.next() == Some("true") {
        return Err(WorkspaceError::BareRepository(path.into()));
    }
    if flags.next() == Some("true") {
        return Err(WorkspaceError::InsideGitDir(path.into()));
    }
    let root = PathBuf::from(git_line(path, &["rev-parse", "--show-toplevel"])?);
    let head_commit = git_stdout(
        &root,
        &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
    )
    .ok()
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
    .ok_or_else(|| WorkspaceError::NoCommits(root.clone()))?;
    let head_branch = git_stdout(&root, &["symbolic-ref", "--quiet", "--short", "HEAD"])
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(b) = &opts.branch {
        check_branch_name(&root, b)?;
    }
    let from_commit = match &opts.from {
        Some(r) => Some(resolve_commit(&root, r)?),
        None => None,
    };
    if !opts.full_copy {
        let subs = submodules(&root)?;
        if !subs.is_empty() {
            return Err(WorkspaceError::Submodules(root, subs));
        }
    }
    let (mode, files, skipped_untracked) = if opts.full_copy {
        let mut files = Vec::new();
        walk(&root, Path::new(""), &mut files)?;
        (Mode::FullCopy, files, 0)
    } else if from_commit.is_some() {
        (Mode::Clean, Vec::new(), 0)
    } else {
        let mut files = tracked_changes(&root)?;
        let untracked = untracked(&root)?;
        let skipped = if opts.include_untracked {
            for p in untracked {
                let file_type = file_type(&root.join(&p))?;
                if let Some(t) = file_type {
                    files.push(PlanFile {
                        path: p,
                        kind: FileKind::Untracked,
                        file_type: Some(t),
                    });
                }
            }
            0
        } else {
            untracked.len()
        };
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mode = if opts.include_untracked {
            Mode::TrackedAndUntracked
        } else {
            Mode::Tracked
        };
        (mode, files, skipped)
    };
    Ok(Plan {
        base_commit: from_commit.unwrap_or_else(|| head_commit.clone()),
        head_commit,
        head_branch,
        branch: opts.branch.clone(),
        mode,
        files,
        skipped_untracked,
        global_identity: identity(&root, "--global"),
        local_identity: identity(&root, "--local"),
        root,
    })
}

impl Plan {
    /// The dry-run report: repository, mode, commits, branch, then one line
    /// per path (`modified  src/main.rs`), then the skipped-untracked note.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "repository: {}", self.root.display());
        let _ = writeln!(out, "mode:       {}", self.mode);
        let _ = writeln!(out, "head:       {}", self.head_commit);
        let _ = writeln!(out, "base:       {}", self.base_commit);
        if let Some(b) = &self.branch {
            let _ = writeln!(out, "branch:     {b} (guest only)");
        }
        let _ = writeln!(out, "files:      {}", self.files.len());
        for f in &self.files {
            let suffix = match f.file_type {
                Some(FileType::Executable) => " (executable)",
                Some(FileType::Symlink) => " (symlink)",
                Some(FileType::Directory) => "/",
                _ => "",
            };
            let _ = writeln!(out, "  {:<9} {}{suffix}", f.kind.label(), f.path.display());
        }
        if let Some(note) = self.skipped_note() {
            let _ = writeln!(out, "{note}");
        }
        out
    }

    /// The one line telling the user untracked files were left out, when
    /// they were.
    pub fn skipped_note(&self) -> Option<String> {
        skipped_untracked_note(self.skipped_untracked)
    }

    /// Writes a git bundle holding HEAD, the current branch and `--from`
    /// (everything the guest checkout needs) to `out`.
    pub fn write_bundle(&self, out: &Path) -> Result<(), WorkspaceError> {
        let mut cmd = git(&self.root);
        cmd.arg("bundle").arg("create").arg("--quiet").arg(out);
        cmd.arg("HEAD");
        if let Some(b) = &self.head_branch {
            cmd.arg(format!("refs/heads/{b}"));
        }
        if self.base_commit != self.head_commit {
            // A bare commit gets no ref in the bundle, but its objects are
            // in the pack, and cloning keeps the whole pack.
            cmd.arg(&self.base_commit);
        }
        run_checked(cmd, "bundle create")
    }

    /// Builds in `repo` (a new directory) the `.git` the guest checkout
    /// gets, with native git on the host, so the emulated guest neither
    /// indexes a pack nor resolves refs: the history of [`write_bundle`]
    /// (`bundle`, written first) cloned without a checkout, `origin`
    /// removed, HEAD at the branch (or detached commit) the guest starts
    /// on, and an index of that commit's tree. What is left to the guest
    /// is writing the files (`git checkout-index -a -f -u`).
    ///
    /// These commands run with no global or system git config: only the
    /// user's repository history is carried, never their settings (a
    /// `init.defaultRefFormat = reftable` the guest's git cannot read).
    ///
    /// [`write_bundle`]: Plan::write_bundle
    pub fn write_git_dir(&self, bundle: &Path, repo: &Path) -> Result<(), WorkspaceError> {
        self.write_bundle(bundle)?;
        let here = repo.parent().unwrap_or(Path::new("/"));
        let neutral = |dir: &Path| {
            let mut cmd = git(dir);
            cmd.env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1");
            cmd
        };
        let mut clone = neutral(here);
        clone
            .args(["clone", "--quiet", "--no-checkout"])
            .arg(bundle)
            .arg(repo);
        run_checked(clone, "clone of the bundle")?;
        let step = |args: &[&str], what: &str| {
            let mut cmd = neutral(repo);
            cmd.args(args);
            run_checked(cmd, what)
        };
        step(&["remote", "remove", "origin"], "remote remove origin")?;
        // What `git checkout -b B BASE`, `-B H HEAD` or `--detach HEAD`
        // would leave, without writing a working tree.
        let commit = match (&self.branch, &self.head_branch) {
            (Some(b), _) => {
                step(&["branch", "--", b, &self.base_commit], "branch")?;
                step(
                    &["symbolic-ref", "HEAD", &format!("refs/heads/{b}")],
                    "symbolic-ref",
                )?;
                &self.base_commit
            }
            (None, Some(h)) => {
                let r = format!("refs/heads/{h}");
                step(&["update-ref", &r, &self.head_commit], "update-ref")?;
                step(&["symbolic-ref", "HEAD", &r], "symbolic-ref")?;
                &self.head_commit
            }
            (None, None) => {
                step(
                    &["update-ref", "--no-deref", "HEAD", &self.head_commit],
                    "update-ref",
                )?;
                &self.head_commit
            }
        };
        step(&["read-tree", commit], "read-tree")
    }
}

/// "N untracked files were not copied; pass --include-untracked to copy them".
pub fn skipped_untracked_note(n: usize) -> Option<String> {
    (n > 0).then(|| {
        let files = if n == 1 { "file was" } else { "files were" };
        format!("note: {n} untracked {files} not copied; pass --include-untracked to copy them")
    })
}

/// `git -C dir`, with an environment that cannot redirect it elsewhere.
pub(super) fn git(dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir);
    for var in [
        "GIT_DIR",
        "GIT_WORK_TREE",
        "GIT_INDEX_FILE",
        "GIT_OBJECT_DIRECTORY",
        "GIT_COMMON_DIR",
        "GIT_CEILING_DIRECTORIES",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("LC_ALL", "C").stdin(Stdio::null());
    cmd
}

fn run_checked(mut cmd: Command, what: &str) -> Result<(), WorkspaceError> {
    let out = cmd.output().map_err(WorkspaceError::RunGit)?;
    if !out.status.success() {
        return Err(WorkspaceError::Git {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn git_stdout(dir: &Path, args: &[&str]) -> Result<String, WorkspaceError> {
    let out = git(dir)
        .args(args)
        .output()
        .map_err(WorkspaceError::RunGit)?;
    if !out.status.success() {
        return Err(WorkspaceError::Git {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn git_line(dir: &Path, args: &[&str]) -> Result<String, WorkspaceError> {
    Ok(git_stdout(dir, args)?.trim_end_matches('\n').to_string())
}

fn git_z(dir: &Path, args: &[&str]) -> Result<Vec<Vec<u8>>, WorkspaceError> {
    let out = git(dir)
        .args(args)
        .output()
        .map_err(WorkspaceError::RunGit)?;
    if !out.status.success() {
        return Err(WorkspaceError::Git {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out
        .stdout
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

fn os_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    PathBuf::from(OsStr::from_bytes(bytes))
}

fn check_branch_name(root: &Path, branch: &str) -> Result<(), WorkspaceError> {
    let ok = !branch.starts_with('-')
        && git(root)
            .args(["check-ref-format", "--branch", branch])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(WorkspaceError::RunGit)?
            .success();
    if ok {
        Ok(())
    } else {
        Err(WorkspaceError::BadBranch(branch.to_string()))
    }
}

fn resolve_commit(root: &Path, rev: &str) -> Result<String, WorkspaceError> {
    let out = git(root)
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .map_err(WorkspaceError::RunGit)?;
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || sha.is_empty() || rev.starts_with('-') {
        return Err(WorkspaceError::UnknownRef(rev.to_string()));
    }
    Ok(sha)
}

/// Paths of gitlinks (mode 160000) in the index.
fn submodules(root: &Path) -> Result<Vec<String>, WorkspaceError> {
    let entries = git_z(root, &["ls-files", "--stage", "-z"])?;
    Ok(entries
        .iter()
        .filter(|e| e.starts_with(b"160000 "))
        .filter_map(|e| e.iter().position(|b| *b == b'\t').map(|i| &e[i + 1..]))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

/// Tracked paths that differ between HEAD and the working tree.
fn tracked_changes(root: &Path) -> Result<Vec<PlanFile>, WorkspaceError> {
    let fields = git_z(
        root,
        &["diff", "--name-status", "-z", "--no-renames", "HEAD", "--"],
    )?;
    let mut files = Vec::new();
    for pair in fields.chunks(2) {
        let [status, path] = pair else { continue };
        let path = os_path(path);
        let abs = root.join(&path);
        let file_type = file_type(&abs)?;
        // `D` is gone from the working tree; anything else that has no file
        // left (an unmerged deletion) is a deletion too.
        let kind = if status.first() == Some(&b'D') || file_type.is_none() {
            FileKind::Deleted
        } else {
            FileKind::Modified
        };
        files.push(PlanFile {
            path,
            kind,
            file_type: if kind == FileKind::Deleted {
                None
            } else {
                file_type
            },
        });
    }
    Ok(files)
}

/// Untracked, non-ignored files. Nested repositories (listed as `dir/`)
/// are not files of this one and are left out.
fn untracked(root: &Path) -> Result<Vec<PathBuf>, WorkspaceError> {
    Ok(git_z(
        root,
        &["ls-files", "-z", "--others", "--exclude-standard", "--"],
    )?
    .into_iter()
    .filter(|p| !p.ends_with(b"/"))
    .map(|p| os_path(&p))
    .collect())
}

/// What `path` is, without following a symlink; `None` when it is missing
/// or something that cannot be copied (socket, fifo, device).
fn file_type(path: &Path) -> Result<Option<FileType>, WorkspaceError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(WorkspaceError::ReadPath(path.into(), e)),
    };
    let ft = meta.file_type();
    Ok(if ft.is_symlink() {
        Some(FileType::Symlink)
    } else if ft.is_dir() {
        Some(FileType::Directory)
    } else if ft.is_file() {
        if meta.permissions().mode() & 0o111 != 0 {
            Some(FileType::Executable)
        } else {
            Some(FileType::Regular)
        }
    } else {
        None
    })
}

/// Every entry under `root/rel`, directories before their contents.
fn walk(root: &Path, rel: &Path, out: &mut Vec<PlanFile>) -> Result<(), WorkspaceError> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| WorkspaceError::ReadPath(dir.clone(), e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| WorkspaceError::ReadPath(dir.clone(), e))?;
    entries.sort();
    for name in entries {
        let path = rel.join(&name);
        let Some(t) = file_type(&root.join(&path))? else {
            continue;
        };
        out.push(PlanFile {
            path: path.clone(),
            kind: FileKind::Copied,
            file_type: Some(t),
        });
        if t == FileType::Directory {
            walk(root, &path, out)?;
        }
    }
    Ok(())
}

/// The host user's `git config --global` identity (what an import puts in
/// the guest's `~/.gitconfig`); unset parts, or no git, give `None`s.
pub fn host_global_identity() -> GitIdentity {
    identity(Path::new("/"), "--global")
}

fn identity(root: &Path, scope: &str) -> GitIdentity {
    let get = |key: &str| {
        git_stdout(root, &["config", scope, "--get", key])
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    GitIdentity {
        name: get("user.name"),
        email: get("user.email"),
    }
}

/// A workspace operation failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// `--from` was given without `--branch`.
    #[error("--from needs --branch: it names where the new guest branch starts")]
    FromWithoutBranch,
    /// The path could not be read.
    #[error("Cannot read {}", .0.display())]
    ReadPath(PathBuf, #[source] std::io::Error),
    /// The path is not a directory.
    #[error("{} is not a directory; pass the repository's directory", .0.display())]
    NotADirectory(PathBuf),
    /// The path is not inside a git working tree.
    #[error("{} is not inside a git repository; pass a path in one (or run `git init` there)", .0.display())]
    NotARepository(PathBuf),
    /// The repository has no working tree.
    #[error("{} is a bare repository; pass a clone with a working tree", .0.display())]
    BareRepository(PathBuf),
    /// The path is inside `.git`.
    #[error("{} is inside a .git directory; pass the working tree instead", .0.display())]
    InsideGitDir(PathBuf),
    /// HEAD does not point at a commit.
    #[error("The repository {} has no commits yet; commit something first", .0.display())]
    NoCommits(PathBuf),
    /// The repository has submodules and full copy was not asked for.
    #[error(
        "The repository {} has submodules ({}), which a git bundle cannot carry; pass --full-copy to copy the directory as is",
        .0.display(), .1.join(", ")
    )]
    Submodules(PathBuf, Vec<String>),
    /// `--branch` is not a valid branch name.
    #[error("--branch {0:?} is not a valid git branch name")]
    BadBranch(String),
    /// `--from` does not name a commit.
    #[error("--from {0:?} does not name a commit in the repository")]
    UnknownRef(String),
    /// `--base-commit` is not a commit id.
    #[error("--base-commit {0:?} is not a commit id (4 to 64 hex digits)")]
    BadBaseCommit(String),
    /// `git` could not be run.
    #[error("Cannot run git; install it")]
    RunGit(#[source] std::io::Error),
    /// A git command failed on the host.
    #[error("git {what} failed: {stderr}")]
    Git {
        /// The subcommand.
        what: String,
        /// Its standard error.
        stderr: String,
    },
    /// Building the overlay archive failed.
    #[error("Cannot archive {}", .0.display())]
    Archive(PathBuf, #[source] std::io::Error),
    /// Writing or removing a host file failed.
    #[error("Cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// A step in the guest failed.
    #[error("Workspace step {0} in the guest failed")]
    Guest(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// Background work panicked or was cancelled.
    #[error("Workspace task failed: {0}")]
    Task(String),
}

impl WorkspaceError {
    /// True when the error is the caller's input (bad path, flags, repo
    /// shape) rather than a failure of the machinery.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            WorkspaceError::FromWithoutBranch
                | WorkspaceError::ReadPath(..)
                | WorkspaceError::NotADirectory(_)
                | WorkspaceError::NotARepository(_)
                | WorkspaceError::BareRepository(_)
                | WorkspaceError::InsideGitDir(_)
                | WorkspaceError::NoCommits(_)
                | WorkspaceError::Submodules(..)
                | WorkspaceError::BadBranch(_)
                | WorkspaceError::UnknownRef(_)
                | WorkspaceError::BadBaseCommit(_)
        )
    }
}

/// Checks that `base` is a plain commit id (it reaches a guest shell).
pub fn check_base_commit(base: &str) -> Result<(), WorkspaceError> {
    let ok = (4..=64).contains(&base.len()) && base.chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(WorkspaceError::BadBaseCommit(base.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn have_git() -> bool {
        Command::new("git").arg("--version").output().is_ok()
    }

    /// Runs git in `dir` with a fixed identity and no user/system config.
    fn g(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=T", "-c", "user.email=t@example.com"])
            .args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// A repo with a.txt, gone.txt, run.sh (0755), .gitignore (*.log),
    /// committed; then a.txt modified, gone.txt deleted, new.txt untracked,
    /// debug.log ignored.
    fn repo() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        g(r, &["init", "-q", "-b", "main"]);
        fs::write(r.join("a.txt"), "a\n").unwrap();
        fs::write(r.join("gone.txt"), "g\n").unwrap();
        fs::write(r.join("run.sh"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(r.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(r.join(".gitignore"), "*.log\n").unwrap();
        g(r, &["add", "."]);
        g(r, &["commit", "-q", "-m", "init"]);
        fs::write(r.join("a.txt"), "a\nchanged\n").unwrap();
        fs::remove_file(r.join("gone.txt")).unwrap();
        fs::write(r.join("new.txt"), "new\n").unwrap();
        fs::write(r.join("debug.log"), "noise\n").unwrap();
        d
    }

    fn listing(p: &Plan) -> Vec<(String, FileKind, Option<FileType>)> {
        p.files
            .iter()
            .map(|f| (f.path.display().to_string(), f.kind, f.file_type))
            .collect()
    }

    macro_rules! need_git {
        ($name:literal) => {
            if !have_git() {
                eprintln!("SKIPPED {}: git missing", $name);
                return;
            }
        };
    }

    /// The `.git` built on the host, checked out as the guest does
    /// (`checkout-index -a -f -u` in an empty directory): HEAD on the
    /// right branch or commit, a clean status, the committed content.
    #[test]
    fn git_dir_checks_out_to_the_planned_branch_and_commit() {
        need_git!("git_dir_checks_out_to_the_planned_branch_and_commit");
        let d = repo();
        let first = g(d.path(), &["rev-parse", "HEAD"]).trim().to_string();
        fs::write(d.path().join("b.txt"), "b\n").unwrap();
        g(d.path(), &["add", "b.txt"]);
        g(d.path(), &["commit", "-q", "-m", "second"]);
        let second = g(d.path(), &["rev-parse", "HEAD"]).trim().to_string();
        let cases = [
            (PrepareOptions::default(), "refs/heads/main", &second),
            (
                PrepareOptions {
                    branch: Some("topic".into()),
                    from: Some(first.clone()),
                    ..PrepareOptions::default()
                },
                "refs/heads/topic",
                &first,
            ),
        ];
        for (opts, want_ref, want_commit) in cases {
            let p = plan(d.path(), &opts).unwrap();
            let scratch = tempfile::tempdir().unwrap();
            let repo = scratch.path().join("repo");
            p.write_git_dir(&scratch.path().join("b.bundle"), &repo)
                .unwrap();
            // The guest side: only the .git, then the files.
            let guest = scratch.path().join("guest");
            fs::create_dir(&guest).unwrap();
            fs::rename(repo.join(".git"), guest.join(".git")).unwrap();
            g(&guest, &["checkout-index", "-a", "-f", "-u"]);
            assert_eq!(g(&guest, &["symbolic-ref", "HEAD"]).trim(), want_ref);
            assert_eq!(
                g(&guest, &["rev-parse", "HEAD"]).trim(),
                want_commit.as_str()
            );
            assert_eq!(g(&guest, &["status", "--porcelain"]), "", "{opts:?}");
            assert_eq!(g(&guest, &["remote"]), "", "origin is removed");
            assert_eq!(fs::read_to_string(guest.join("gone.txt")).unwrap(), "g\n");
            assert_eq!(
                guest.join("b.txt").exists(),
                want_commit == &second,
                "{opts:?}"
            );
            let mode = fs::metadata(guest.join("run.sh"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "run.sh keeps its executable bit");
        }
    }

    #[test]
    fn tracked_changes_only_by_default_and_untracked_are_counted() {
        need_git!("tracked_changes_only_by_default_and_untracked_are_counted");
        let d = repo();
        let p = plan(d.path(), &PrepareOptions::default()).unwrap();
        assert_eq!(p.mode, Mode::Tracked);
        assert_eq!(
            listing(&p),
            [
                ("a.txt".into(), FileKind::Modified, Some(FileType::Regular)),
                ("gone.txt".into(), FileKind::Deleted, None),
            ]
        );
        assert_eq!(p.skipped_untracked, 1, "new.txt; debug.log is ignored");
        assert_eq!(p.root, d.path().canonicalize().unwrap());
        let head = g(d.path(), &["rev-parse", "HEAD"]);
        assert_eq!(p.head_commit, head.trim());
        assert_eq!(p.base_commit, p.head_commit);
        assert_eq!(p.head_branch.as_deref(), Some("main"));
        let note = p.skipped_note().unwrap();
        assert!(note.contains("--include-untracked"), "{note}");
        assert!(
            p.render().contains("  deleted   gone.txt\n"),
            "{}",
            p.render()
        );
    }

    #[test]
    fn include_untracked_adds_untracked_but_never_ignored_files() {
        need_git!("include_untracked_adds_untracked_but_never_ignored_files");
        let d = repo();
        let opts = PrepareOptions {
            include_untracked: true,
            ..Default::default()
        };
        let p = plan(d.path(), &opts).unwrap();
        assert_eq!(p.mode, Mode::TrackedAndUntracked);
        let paths: Vec<String> = listing(&p).into_iter().map(|f| f.0).collect();
        assert_eq!(paths, ["a.txt", "gone.txt", "new.txt"]);
        assert_eq!(p.files[2].kind, FileKind::Untracked);
        assert_eq!(p.skipped_untracked, 0);
        assert!(p.skipped_note().is_none());
    }

    #[test]
    fn symlinks_and_executable_bits_are_recorded() {
        need_git!("symlinks_and_executable_bits_are_recorded");
        let d = repo();
        let r = d.path();
        fs::write(r.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        symlink("a.txt", r.join("link")).unwrap();
        fs::write(r.join("tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(r.join("tool"), fs::Permissions::from_mode(0o700)).unwrap();
        let opts = PrepareOptions {
            include_untracked: true,
            ..Default::default()
        };
        let p = plan(r, &opts).unwrap();
        let l = listing(&p);
        assert!(
            l.contains(&(
                "run.sh".into(),
                FileKind::Modified,
                Some(FileType::Executable)
            )),
            "{l:?}"
        );
        assert!(
            l.contains(&("link".into(), FileKind::Untracked, Some(FileType::Symlink))),
            "{l:?}"
        );
        assert!(
            l.contains(&(
                "tool".into(),
                FileKind::Untracked,
                Some(FileType::Executable)
            )),
            "{l:?}"
        );
    }

    #[test]
    fn a_subdirectory_resolves_to_the_enclosing_repository() {
        need_git!("a_subdirectory_resolves_to_the_enclosing_repository");
        let d = repo();
        fs::create_dir(d.path().join("sub")).unwrap();
        let p = plan(&d.path().join("sub"), &PrepareOptions::default()).unwrap();
        assert_eq!(p.root, d.path().canonicalize().unwrap());
        assert_eq!(p.files.len(), 2);
    }

    #[test]
    fn bare_repositories_are_rejected() {
        need_git!("bare_repositories_are_rejected");
        let d = tempfile::tempdir().unwrap();
        g(d.path(), &["init", "-q", "--bare"]);
        let err = plan(d.path(), &PrepareOptions::default()).unwrap_err();
        assert!(matches!(err, WorkspaceError::BareRepository(_)), "{err}");
        assert!(err.to_string().contains("bare"), "{err}");
    }

    #[test]
    fn non_repositories_and_empty_repositories_are_rejected() {
        need_git!("non_repositories_and_empty_repositories_are_rejected");
        let d = tempfile::tempdir().unwrap();
        let err = plan(d.path(), &PrepareOptions::default()).unwrap_err();
        assert!(matches!(err, WorkspaceError::NotARepository(_)), "{err}");
        g(d.path(), &["init", "-q"]);
        let err = plan(d.path(), &PrepareOptions::default()).unwrap_err();
        assert!(matches!(err, WorkspaceError::NoCommits(_)), "{err}");
    }

    #[test]
    fn submodules_are_rejected_unless_full_copy() {
        need_git!("submodules_are_rejected_unless_full_copy");
        let d = repo();
        let r = d.path();
        let head = g(r, &["rev-parse", "HEAD"]);
        // A gitlink entry is what `git submodule add` puts in the index.
        g(
            r,
            &[
                "update-index",
                "--add",
                "--cacheinfo",
                &format!("160000,{},vendor/lib", head.trim()),
            ],
        );
        let err = plan(r, &PrepareOptions::default()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, WorkspaceError::Submodules(..)), "{text}");
        assert!(text.contains("vendor/lib"), "{text}");
        assert!(text.contains("--full-copy"), "{text}");

        let opts = PrepareOptions {
            full_copy: true,
            ..Default::default()
        };
        let p = plan(r, &opts).unwrap();
        assert_eq!(p.mode, Mode::FullCopy);
        let l = listing(&p);
        for want in [".git", ".git/HEAD", "a.txt", "debug.log", "new.txt"] {
            assert!(l.iter().any(|f| f.0 == want), "{want} in {l:?}");
        }
        assert!(l.iter().all(|f| f.1 == FileKind::Copied));
        assert!(!l.iter().any(|f| f.0 == "gone.txt"));
    }

    #[test]
    fn from_needs_branch_and_starts_clean() {
        need_git!("from_needs_branch_and_starts_clean");
        let d = repo();
        let r = d.path();
        let err = plan(
            r,
            &PrepareOptions {
                from: Some("HEAD".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, WorkspaceError::FromWithoutBranch), "{err}");

        let first = g(r, &["rev-parse", "HEAD"]);
        g(r, &["commit", "-q", "-a", "-m", "second"]);
        let p = plan(
            r,
            &PrepareOptions {
                branch: Some("try".into()),
                from: Some("HEAD~1".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Clean);
        assert_eq!(p.base_commit, first.trim());
        assert_ne!(p.head_commit, p.base_commit);
        assert!(p.files.is_empty());

        for (branch, from) in [("bad..name", None), ("-x", None), ("ok", Some("nope"))] {
            let err = plan(
                r,
                &PrepareOptions {
                    branch: Some(branch.into()),
                    from: from.map(String::from),
                    ..Default::default()
                },
            )
            .unwrap_err();
            assert!(err.is_user_error(), "{err}");
        }
    }
}
