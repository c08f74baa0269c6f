//! The `spec:` line of `vm create` and `vm run`: a new VM's shape and
//! backend, resolved before anything is created.

use std::fmt;

use anyhow::Result;
use banger_api::backend::BackendPlan;
use banger_api::config::Config;
use banger_api::model::ByteSize;

use crate::args::{ShapeArgs, VmmArg};

/// The VM's shape and backend as it will be created: what the `spec:`
/// line shows (`vm run` and `vm create`), and what the request then asks
/// for explicitly, so the VM is exactly what was printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Spec {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk: ByteSize,
    /// The backend and accelerator, each with why.
    pub backend: BackendPlan,
}

impl Spec {
    /// Flags, else the config's and this host's defaults; `--vmm`, else the
    /// config's `vmm` resolved for this host.
    pub(crate) fn resolve(shape: &ShapeArgs, vmm: Option<VmmArg>, config: &Config) -> Result<Spec> {
        let d = config.resolved_vm_defaults().values;
        Ok(Spec {
            vcpus: shape.vcpu.map_or(Ok(d.vcpus), u32::try_from)?,
            memory_mib: shape.memory.map_or(Ok(d.memory_mib), u32::try_from)?,
            disk: match &shape.disk_size {
                Some(s) => s.parse()?,
                None => d.disk_size,
            },
            backend: config.backend_plan(vmm.map(VmmArg::kind)),
        })
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spec: {} vcpu · {} MiB · {} disk · {}",
            self.vcpus, self.memory_mib, self.disk, self.backend
        )
    }
}
