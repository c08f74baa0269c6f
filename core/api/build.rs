//! Stamps the build with its git commit and that commit's time so
//! `banger version` and the daemon can say exactly what is running.
//!
//! Both stamps depend only on the commit, so this script reruns (and every
//! crate above banger-api recompiles) only when HEAD moves. It used to watch
//! `../.git/HEAD`, which does not exist from `core/api`: cargo reran it on
//! every invocation, and as it stamped the wall clock, `cargo clippy`,
//! `cargo build` and `cargo test` each rebuilt the whole workspace.
use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(&["log", "-1", "--format=%ct", "HEAD"]))
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    println!("cargo:rustc-env=BANGER_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=BANGER_BUILD_EPOCH={built}");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    // HEAD, the branch it names and packed-refs, wherever git keeps them
    // (a worktree's HEAD is in its own git dir, its branches in the common
    // one). Only files that exist: cargo reruns the script every time for
    // a watched path that is missing.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from)
            && path.exists()
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
