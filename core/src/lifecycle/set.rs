//! `set`: change vCPUs, memory or work disk size of a VM that is not running.

use std::path::Path;

use crate::lifecycle::{Lifecycle, OpError};
use banger_api::api::SetVmRequest;
use banger_api::model::{
    ByteSize, VmRecord, VmState, host_memory_mib, validate_memory_mib_on_host, validate_vcpus,
};

impl Lifecycle {
    /// Applies `req`; the work disk grows at the next start (never shrinks).
    pub async fn set(&self, name: &str, req: SetVmRequest) -> Result<VmRecord, OpError> {
        let invalid = |e: &dyn std::fmt::Display| OpError::Invalid(e.to_string());
        let vcpus = req
            .vcpus
            .map(validate_vcpus)
            .transpose()
            .map_err(|e| invalid(&e))?;
        let memory = req
            .memory_mib
            .map(|n| {
                // --force-size takes memory beyond the host's too.
                let host = (!req.force_size).then(host_memory_mib).flatten();
                validate_memory_mib_on_host(n, host)
            })
            .transpose()
            .map_err(|e| invalid(&e))?;
        let disk = req
            .disk_size
            .as_deref()
            .map(str::parse::<ByteSize>)
            .transpose()
            .map_err(|e| invalid(&e))?;
        if vcpus.is_none() && memory.is_none() && disk.is_none() {
            return Err(OpError::Invalid(
                "Nothing to change: pass --vcpu, --memory or --disk-size".to_string(),
            ));
        }
        let (_guard, mut vm) = self.lock_by_name(name).await?;
        if matches!(
            vm.state,
            VmState::Running | VmState::Starting | VmState::Stopping
        ) {
            return Err(OpError::WrongState {
                name: name.to_string(),
                state: vm.state,
                hint: "stop it first (`banger vm stop`)",
            });
        }
        if let Some(d) = disk {
            if d < vm.spec.disk_size {
                return Err(OpError::Invalid(format!(
                    "--disk-size {d} is smaller than the current {}; work disks can only grow",
                    vm.spec.disk_size
                )));
            }
            if !req.force_size {
                check_free_space(
                    &self.paths.vms_dir(),
                    ByteSize(d.0 - vm.spec.disk_size.0),
                    d,
                )?;
            }
            vm.spec.disk_size = d;
        }
        if let Some(v) = vcpus {
            vm.spec.vcpus = v;
        }
        if let Some(m) = memory {
            vm.spec.memory_mib = m;
        }
        self.save(&mut vm).await?;
        Ok(vm)
    }
}

/// Refuses a work disk that needs `need` more bytes than the filesystem
/// holding `dir` has free (the disk is sparse, but a guest that fills it
/// would fill the host). `asked` is the size named in the error. A free
/// space that cannot be read lets the size through.
pub(super) fn check_free_space(dir: &Path, need: ByteSize, asked: ByteSize) -> Result<(), OpError> {
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if need.0 <= free {
        return Ok(());
    }
    Err(OpError::Invalid(format!(
        "--disk-size {asked} needs {need} more on {}, which has {} free; \
         ask for less, free some space, or pass --force-size to take it anyway",
        dir.display(),
        ByteSize(free)
    )))
}

/// Bytes available to this process on the filesystem of `dir` (its nearest
/// existing ancestor when it does not exist yet).
fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_size_is_checked_against_the_free_space_of_the_state_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let free = free_bytes(dir.path()).unwrap();
        assert!(free > 0);
        check_free_space(dir.path(), ByteSize(1 << 20), ByteSize(1 << 20)).unwrap();
        let over = ByteSize(free + (1 << 30));
        let msg = check_free_space(&dir.path().join("vms"), over, over)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&over.to_string()) && msg.contains("--force-size"),
            "{msg}"
        );
    }
}
