//! `banger uninstall [--yes] [--force]`: stops the daemon, removes the root
//! helper when it is installed (as root, through `banger system
//! uninstall`), removes the binaries a release installs from the directory
//! this banger runs from, and lists the data left with its size. Data is
//! never removed: the list says how. See docs/release.md.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use banger_api::paths::Paths;

use crate::args::UninstallArgs;
use crate::update::{Install, KEYS_DIR};

/// The binaries a release installs (and install.sh and scripts/install put
/// next to each other); what uninstall removes.
pub const RELEASE_BINARIES: &[&str] = &["banger", "bangerd", "banger-helper", "banger-agent"];

/// Runs `banger uninstall`.
pub async fn run(args: UninstallArgs) -> Result<ExitCode> {
    let install = Install::current()?;
    let system_root = args.system_root.unwrap_or_else(|| PathBuf::from("/"));
    let record = system_root.join("etc/banger/install.toml");
    let helper = record.exists();
    let root = nix::unistd::geteuid().is_root();
    if helper && !root {
        bail!(
            "The root helper is installed ({} exists) and only root can remove it: run \
             `sudo banger system uninstall` first, then `banger uninstall` again. Nothing was \
             changed",
            record.display()
        );
    }
    if nix::unistd::access(&install.bin_dir, nix::unistd::AccessFlags::W_OK).is_err() {
        bail!(
            "Cannot remove the binaries in {}: you cannot write there. Stop your daemon \
             (`banger daemon stop`), then run `sudo banger uninstall`. Nothing was changed",
            install.bin_dir.display()
        );
    }
    let binaries: Vec<PathBuf> = RELEASE_BINARIES
        .iter()
        .map(|n| install.bin_dir.join(n))
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    let keys = install.prefix.join(KEYS_DIR);
    let paths = Paths::from_env().ok();
    let client = paths.as_ref().map(crate::daemon::client);
    let status = match &client {
        Some(c) => crate::daemon::status(c).await.ok().flatten(),
        None => None,
    };
    use banger_api::model::VmState;
    let live: Vec<String> = [VmState::Starting, VmState::Running, VmState::Stopping]
        .iter()
        .map(ToString::to_string)
        .collect();
    let running_vms: usize = status
        .as_ref()
        .map(|s| {
            s.vms
                .iter()
                .filter(|(state, _)| live.contains(state))
                .map(|(_, n)| n)
                .sum()
        })
        .unwrap_or(0);
    if running_vms > 0 && !args.force {
        bail!(
            "{running_vms} VM(s) are running: stop them first (`banger vm list`, `banger vm stop \
             NAME...`), or pass --force to leave them running without a daemon. Nothing was \
             changed"
        );
    }

    println!("banger uninstall will:");
    if let Some(s) = &status {
        println!("  stop bangerd (pid {})", s.pid);
    }
    if helper {
        println!(
            "  remove the root helper (`banger system uninstall`, per {})",
            record.display()
        );
    }
    for b in &binaries {
        println!("  remove {}", b.display());
    }
    if keys.is_dir() {
        println!("  remove {} (extra release keys)", keys.display());
    }
    println!("  and keep your data (listed at the end)");
    if !args.yes && !confirm()? {
        println!("nothing was changed");
        return Ok(ExitCode::FAILURE);
    }

    if let (Some(c), Some(_)) = (&client, &status) {
        crate::daemon::stop(c).await.context(
            "Stopping bangerd failed; nothing else was changed (retry, or `banger daemon stop`)",
        )?;
        println!("stopped bangerd");
    }
    if helper {
        // The helper's own uninstall, from this binary, before it is gone.
        let exe = std::env::current_exe().context("Cannot find banger's own path")?;
        let status = Command::new(&exe)
            .args(["system", "uninstall"])
            .env("BANGER_SYSTEM_ROOT", &system_root)
            .status()
            .with_context(|| format!("Cannot run {} system uninstall", exe.display()))?;
        if !status.success() {
            bail!(
                "`banger system uninstall` failed ({status}); the binaries are still in {}",
                install.bin_dir.display()
            );
        }
    }
    // banger itself last, so a failure before leaves a working CLI.
    let (me, others): (Vec<&PathBuf>, Vec<&PathBuf>) =
        binaries.iter().partition(|p| p.ends_with("banger"));
    for b in others.into_iter().chain(me) {
        std::fs::remove_file(b).with_context(|| format!("Cannot remove {}", b.display()))?;
        println!("removed {}", b.display());
    }
    if keys.is_dir() {
        std::fs::remove_dir_all(&keys)
            .with_context(|| format!("Cannot remove {}", keys.display()))?;
        println!("removed {}", keys.display());
        // etc/banger when that was all it held.
        if let Some(parent) = keys.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
    list_data(paths.as_ref());
    if running_vms > 0 {
        println!(
            "{running_vms} VM(s) keep running without a daemon; their VMM processes end when \
             stopped by hand (see `ps`), their files stay in the state directory"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks on the terminal; without one, refuses (use --yes).
fn confirm() -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("Refusing to uninstall without a terminal to confirm on: pass --yes");
    }
    print!("proceed? [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// Prints banger's data directories that exist, with their size on disk.
fn list_data(paths: Option<&Paths>) {
    let Some(p) = paths else {
        println!("HOME is not set: banger's data directories are unknown");
        return;
    };
    let dirs = [
        (&p.config_dir, "config, plugins"),
        (&p.state_dir, "VMs, disks, database, SSH key, logs"),
        (&p.cache_dir, "images, kernels, downloads"),
    ];
    let left: Vec<_> = dirs.iter().filter(|(d, _)| d.exists()).collect();
    if left.is_empty() {
        println!("no banger data directories are left");
        return;
    }
    println!("left in place (remove with `rm -rf DIR` once you no longer need it):");
    for (d, what) in left {
        println!("  {}  {}  ({what})", d.display(), human(disk_usage(d)));
    }
}

/// Bytes allocated on disk under `path` (like `du -s`: sparse VM disks
/// count what they use), not following symlinks.
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = m.blocks() * 512;
    if m.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for e in entries.flatten() {
            total += disk_usage(&e.path());
        }
    }
    total
}

/// `1.5 GiB`, `12 KiB`, `0 B`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_du() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn disk_usage_counts_allocated_blocks_not_sparse_length() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("dense"), vec![1u8; 64 << 10]).unwrap();
        let sparse = std::fs::File::create(d.path().join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let used = disk_usage(d.path());
        assert!(used >= 64 << 10, "{used}");
        assert!(used < 1 << 20, "a 1 GiB hole counted as data: {used}");
    }
}
