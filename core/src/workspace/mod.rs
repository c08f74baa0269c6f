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
//! The plan (the host side, which the CLI also runs for `--dry-run`) is
//! `banger_api::workspace`; this module is the daemon's guest side.
//!
//! The guest paths are parameters ([`GuestPaths`]) so tests can aim at a
//! temporary directory behind a loopback sshd. See `docs/workspace.md`.

mod jobs;
mod remote;
mod vm;

pub use banger_api::workspace::{
    FileKind, FileType, GitIdentity, Mode, Plan, PlanFile, PrepareOptions, WorkspaceError,
    check_base_commit, plan, skipped_untracked_note,
};
pub use jobs::{guest_job, run_guest_job};
pub use remote::{Carrier, GuestPaths, changed_files, export, prepare, prepare_with};
pub use vm::{export_vm, prepare_vm};
