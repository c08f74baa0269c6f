//! `shared-mount`: a host directory, snapshotted into a read-only ext4 image
//! at every start and mounted read-only in the guest.
//!
//! Options: `host=/abs/dir` (an existing host directory) and
//! `guest=/abs/mount/point`. Runs as the daemon's user; needs `mkfs.ext4`
//! from e2fsprogs >= 1.43 (for `-d`), but no root.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use banger_plugin_abi::sdk::{
    DriveEdit, GuestEdits, HookRequest, Host, MachineEdits, MountEdit, Options, Plugin,
    PluginError, TeardownReason,
};

/// The drive id the image is attached under.
pub const DRIVE_ID: &str = "shared-mount";
/// The image's file name inside the VM directory.
pub const IMAGE_NAME: &str = "shared-mount.ext4";

const MIN_IMAGE_BYTES: u64 = 16 << 20;
const SLACK_BYTES: u64 = 4 << 20;
/// Per-entry allowance for inodes, directory blocks and partial last blocks.
const PER_ENTRY_BYTES: u64 = 8 << 10;

/// The shared-mount capability.
#[derive(Debug, Default)]
pub struct SharedMount;

struct Settings {
    host: PathBuf,
    guest: PathBuf,
}

fn clean_absolute(key: &str, value: &str) -> Result<PathBuf, PluginError> {
    let p = PathBuf::from(value);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(PluginError::new(format!(
            "Option {key}={value:?} must be an absolute path without '..' (e.g. {key}=/srv/data)"
        )));
    }
    Ok(p)
}

fn settings(options: &Options) -> Result<Settings, PluginError> {
    if let Some(k) = options.keys().find(|k| *k != "host" && *k != "guest") {
        return Err(PluginError::new(format!(
            "Unknown option {k:?}: shared-mount takes host=/abs/dir,guest=/abs/mount/point"
        )));
    }
    let get = |key: &str| {
        options.get(key).ok_or_else(|| {
            PluginError::new(format!(
                "Missing option {key}: use --cap shared-mount:host=/abs/dir,guest=/abs/mount/point"
            ))
        })
    };
    let host = clean_absolute("host", get("host")?)?;
    let guest = clean_absolute("guest", get("guest")?)?;
    if guest.parent().is_none() {
        return Err(PluginError::new(
            "Option guest=/ would hide the guest's root: pick a directory such as /mnt/shared",
        ));
    }
    if !host.is_dir() {
        return Err(PluginError::new(format!(
            "Option host={} is not an existing directory on the host",
            host.display()
        )));
    }
    Ok(Settings { host, guest })
}

/// Total bytes of regular files plus an allowance per entry, not following
/// symlinks (mkfs copies them as links).
fn tree_size(dir: &Path) -> io::Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut entries = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            entries += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                bytes = bytes.saturating_add(meta.len());
            }
        }
    }
    Ok((bytes, entries))
}

/// Image size for a tree: contents × 1.25 plus metadata and slack, at least 16 MiB.
fn image_size(bytes: u64, entries: u64) -> u64 {
    let raw = bytes
        .saturating_add(bytes / 4)
        .saturating_add(entries.saturating_mul(PER_ENTRY_BYTES))
        .saturating_add(SLACK_BYTES);
    raw.max(MIN_IMAGE_BYTES).div_ceil(1 << 20) << 20
}

/// `mkfs.ext4` lives in sbin, which a user's PATH often lacks.
fn mkfs_ext4() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d: PathBuf| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

fn build_image(host: &Path, vm_dir: &Path, log: &Host<'_>) -> Result<PathBuf, PluginError> {
    let (bytes, entries) = tree_size(host)
        .map_err(|e| PluginError::with(format!("Cannot measure {}", host.display()), &e))?;
    let size = image_size(bytes, entries);
    let image = vm_dir.join(IMAGE_NAME);
    let staging = vm_dir.join(format!(".{IMAGE_NAME}.tmp-{}", std::process::id()));
    log.info(&format!(
        "copying {} ({} files, {} KiB) into a {} MiB read-only image",
        host.display(),
        entries,
        bytes.div_ceil(1024),
        size >> 20
    ));
    let result = (|| {
        let f = fs::File::create(&staging)
            .map_err(|e| PluginError::with(format!("Cannot create {}", staging.display()), &e))?;
        f.set_len(size)
            .map_err(|e| PluginError::with(format!("Cannot size {}", staging.display()), &e))?;
        drop(f);
        let mkfs = mkfs_ext4();
        let out = Command::new(&mkfs)
            .args(["-q", "-F", "-d"])
            .arg(host)
            .args(["-L", "shared"])
            .arg(&staging)
            .arg(format!("{}k", size / 1024))
            .output()
            .map_err(|e| PluginError::with(format!("Cannot run {}", mkfs.display()), &e))?;
        if !out.status.success() {
            return Err(PluginError::new(format!(
                "mkfs.ext4 -d {} failed ({}): {}",
                host.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        fs::rename(&staging, &image)
            .map_err(|e| PluginError::with(format!("Cannot publish {}", image.display()), &e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result.map(|()| image)
}

impl Plugin for SharedMount {
    fn name(&self) -> &str {
        "shared-mount"
    }

    fn description(&self) -> &str {
        "A host directory, copied at start, mounted read-only in the guest (host=,guest=)"
    }

    fn validate_options(&self, options: &Options) -> Result<(), PluginError> {
        settings(options).map(|_| ())
    }

    fn prepare_host(&self, req: &HookRequest, log: &Host<'_>) -> Result<(), PluginError> {
        let s = settings(&req.options)?;
        let image = build_image(&s.host, &req.vm.vm_dir, log)?;
        log.info(&format!(
            "{} will appear read-only at {} in the guest",
            image.display(),
            s.guest.display()
        ));
        Ok(())
    }

    fn configure_machine(
        &self,
        req: &HookRequest,
        _log: &Host<'_>,
    ) -> Result<MachineEdits, PluginError> {
        Ok(MachineEdits {
            drives: vec![DriveEdit {
                id: DRIVE_ID.to_string(),
                host_path: req.vm.vm_dir.join(IMAGE_NAME),
                read_only: true,
            }],
            ..MachineEdits::default()
        })
    }

    fn guest_config(&self, req: &HookRequest, _log: &Host<'_>) -> Result<GuestEdits, PluginError> {
        let s = settings(&req.options)?;
        Ok(GuestEdits {
            mounts: vec![MountEdit {
                drive_id: DRIVE_ID.to_string(),
                mount_point: s.guest,
                fstype: "ext4".to_string(),
                read_only: true,
            }],
            ..GuestEdits::default()
        })
    }

    fn teardown(
        &self,
        req: &HookRequest,
        _reason: TeardownReason,
        _log: &Host<'_>,
    ) -> Result<(), PluginError> {
        // The image is a snapshot rebuilt at every start, so every reason removes it.
        let image = req.vm.vm_dir.join(IMAGE_NAME);
        match fs::remove_file(&image) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(PluginError::with(
                format!("Cannot remove {}", image.display()),
                &e,
            )),
            _ => Ok(()),
        }
    }
}

banger_plugin_abi::export_plugin!(SharedMount);

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Options {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn validates_paths_and_names_the_bad_option() {
        let dir = std::env::temp_dir();
        let host = dir.to_str().unwrap();
        let p = SharedMount;
        assert!(
            p.validate_options(&opts(&[("host", host), ("guest", "/mnt/s")]))
                .is_ok()
        );
        for (o, needle) in [
            (opts(&[("guest", "/mnt/s")]), "Missing option host"),
            (opts(&[("host", host)]), "Missing option guest"),
            (opts(&[("host", "rel"), ("guest", "/m")]), "host=\"rel\""),
            (opts(&[("host", host), ("guest", "/m/../etc")]), "guest="),
            (opts(&[("host", host), ("guest", "/")]), "guest=/"),
            (
                opts(&[("host", "/nonexistent/banger"), ("guest", "/m")]),
                "not an existing directory",
            ),
            (
                opts(&[("host", host), ("guest", "/m"), ("ro", "1")]),
                "Unknown option \"ro\"",
            ),
        ] {
            let err = p.validate_options(&o).unwrap_err();
            assert!(err.message().contains(needle), "{o:?}: {err}");
        }
    }

    #[test]
    fn image_size_has_a_floor_and_headroom() {
        assert_eq!(image_size(0, 0), MIN_IMAGE_BYTES);
        let big = image_size(100 << 20, 10);
        assert!(big >= (125 << 20), "{big}");
        assert_eq!(big % (1 << 20), 0);
    }
}
