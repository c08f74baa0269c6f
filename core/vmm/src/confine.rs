//! What both backends do to confine a VMM: the VM's own uid (when the
//! daemon is root) and its cgroup. Backend-specific confinement lives with
//! the backend (QEMU's `-sandbox`, `-runas`, `-chroot`; Firecracker's
//! jailer). See `docs/security.md`, "What each VMM process gets".

use std::fs;
use std::path::Path;
use std::time::Duration;

use banger_api::backend::JailSettings;
use banger_api::machine::MachineSpec;

use crate::cgroup::{self, CgroupHost, Limits, VmCgroup};
use crate::{LaunchPaths, VmmError, error_chain};

/// How many uids (and gids) the per-VM range holds.
const UID_RANGE: u32 = 65536;

/// True when this process may change uids and write cgroups.
pub fn running_as_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The VM's name for its uid and cgroup: its directory's name (the VM id).
pub fn vm_name(paths: &LaunchPaths) -> Result<String, VmmError> {
    paths
        .vm_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            VmmError::Unsupported(format!(
                "VM directory {} has no name to derive its uid and cgroup from",
                paths.vm_dir.display()
            ))
        })
}

/// The uid (and gid) the VM's VMM runs as: `base` plus a hash of the VM's
/// name within a 65536-uid range, moved on past uids that a live process
/// already holds, so two running VMMs never share one.
pub fn vm_uid(base: u32, name: &str) -> u32 {
    let in_use = uids_in_use();
    let start = fnv1a(name) % UID_RANGE;
    (0..UID_RANGE)
        .map(|i| base + (start + i) % UID_RANGE)
        .find(|uid| !in_use.contains(uid))
        .unwrap_or(base + start)
}

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// Every uid (real, effective, saved or filesystem) of a live process.
fn uids_in_use() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut uids = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if let Some(line) = status.lines().find_map(|l| l.strip_prefix("Uid:")) {
            uids.extend(
                line.split_whitespace()
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    uids
}

/// Creates the VM's cgroup and records it next to the API socket, when
/// cgroups are on and the daemon is root. A host where it cannot be made
/// runs the VMM without one, logged once per launch.
pub fn create_cgroup(
    jail: &JailSettings,
    machine: &MachineSpec,
    paths: &LaunchPaths,
) -> Result<Option<VmCgroup>, VmmError> {
    if !jail.cgroups {
        return Ok(None);
    }
    if !running_as_root() {
        tracing::info!("Not root: the VMM runs without a cgroup of its own");
        return Ok(None);
    }
    let name = vm_name(paths)?;
    let limits = Limits::for_shape(machine.vcpus, machine.memory_mib);
    let cg = match cgroup::create(&CgroupHost::probe(), &name, &limits) {
        Ok(cg) => cg,
        // A VMM of this VM still running is a real refusal.
        Err(e @ VmmError::NotReady(_)) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "The VMM runs without a cgroup of its own");
            return Ok(None);
        }
    };
    if !cg.skipped.is_empty() {
        tracing::warn!(
            skipped = %cg.skipped.join(","),
            "No cgroup hierarchy on this host offers these limits; the VMM runs without them"
        );
    }
    if let Err(e) = cg.save(&cgroup::record_path(&paths.api_socket)) {
        cg.remove();
        return Err(e);
    }
    Ok(Some(cg))
}

/// After a failed launch: kills what is left in the cgroup and removes it
/// and its record.
pub fn abort_cgroup(api_socket: &Path, exit_timeout: Duration) {
    if let Err(e) = cgroup::kill_recorded(api_socket, exit_timeout) {
        tracing::warn!(error = %error_chain(&e), "Failed to clean up the VM's cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_uids_are_stable_in_range_and_skip_uids_in_use() {
        let base = 0x7000_0000;
        let a = vm_uid(base, "0123456789abcdef");
        assert_eq!(a, vm_uid(base, "0123456789abcdef"));
        assert!((base..base + UID_RANGE).contains(&a));
        assert_ne!(a, vm_uid(base, "fedcba9876543210"));
        // Our own uid is in use: a range starting there must move past it.
        let me = nix::unistd::Uid::current().as_raw();
        let name = (0..100_000)
            .map(|i| format!("vm{i}"))
            .find(|n| fnv1a(n) % UID_RANGE == 0)
            .unwrap();
        assert_eq!(vm_uid(me, &name), me + 1);
    }
}
