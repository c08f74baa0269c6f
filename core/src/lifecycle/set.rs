//! `set`: change vCPUs, memory or work disk size of a VM that is not running.

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
            .map(|n| validate_memory_mib_on_host(n, host_memory_mib()))
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
