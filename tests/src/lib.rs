//! Shared test infrastructure for banger's cross-crate tests: locating built
//! artifacts, and (later) the daemon harness.

use std::path::PathBuf;

/// The cargo target profile directory the running test binary lives in
/// (`target/debug`), derived from the test executable's own path.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-hash -> target/debug
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A binary built by another workspace package (e.g. `banger`, `bangerd`).
/// Panics with the fix when it has not been built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`), as scripts/test does",
        p.display()
    );
    p
}

/// A plugin cdylib built by the workspace, by crate name
/// (`banger-plugin-shared-mount` -> `libbanger_plugin_shared_mount.so`).
pub fn workspace_cdylib(crate_name: &str) -> PathBuf {
    let file = format!("lib{}.so", crate_name.replace('-', "_"));
    let p = target_dir().join(&file);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`), as scripts/test does",
        p.display()
    );
    p
}
