//! Workspace import and export: a host git repository into a guest's
//! `/root/repo`, and the guest's work back as one binary-safe patch.
//!
//! ```text
//! plan     host: git rev-parse / diff / ls-files → Plan (pure read, --dry-run)
//! prepare  host: git bundle create → guest (russh): clone the bundle into a
//!          staging dir, check out, overlay (rm deleted, untar the rest),
//!          git identity → rename over /root/repo
//! export   guest: git add -A into a temporary index, git diff --binary BASE TREE
//! ```
//!
//! The guest paths are parameters ([`GuestPaths`]) so tests can aim at a
//! temporary directory behind a loopback sshd. See `docs/workspace.md`.

use std::path::PathBuf;

use crate::guest_ssh::GuestSshError;

mod jobs;
mod plan;
mod remote;
mod vm;

pub use jobs::{guest_job, run_guest_job};
pub use plan::{
    FileKind, FileType, GitIdentity, Mode, Plan, PlanFile, PrepareOptions, plan,
    skipped_untracked_note,
};
pub use remote::{GuestPaths, export, prepare};
pub use vm::{export_vm, prepare_vm};

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
    Guest(&'static str, #[source] Box<GuestSshError>),
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
