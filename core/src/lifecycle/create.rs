//! `create`: validate everything before anything exists, record the VM,
//! give it its own root disk, then start it.

use std::path::{Path, PathBuf};

use crate::capability::Capability;
use crate::lifecycle::pool::Owner;
use crate::lifecycle::start::ROOT_DISK;
use crate::lifecycle::{Lifecycle, OpError, Progress, begin_stage, blocking, crash_point, timings};
use crate::store::StoreError;
use banger_api::api::CreateVmRequest;
use banger_api::model::{
    ByteSize, CapChoice, VmName, VmRecord, VmSpec, host_memory_mib, now_unix, resolve_caps,
    validate_memory_mib_on_host, validate_vcpus,
};
use banger_artifacts::disk;

impl Lifecycle {
    /// Validates `req`, records the VM, clones its root disk and (unless
    /// `no_start`) starts it. On failure before the start sequence nothing is
    /// left behind; a failed start leaves the VM in `error` for inspection.
    pub async fn create(
        &self,
        req: CreateVmRequest,
        progress: &Progress,
    ) -> Result<VmRecord, OpError> {
        let name = req.name.clone().unwrap_or_default();
        timings::timed(&name, "create", self.create_timed(req, progress)).await
    }

    async fn create_timed(
        &self,
        req: CreateVmRequest,
        progress: &Progress,
    ) -> Result<VmRecord, OpError> {
        if let Some(snap) = req.from_snapshot.clone() {
            return self.create_from_snapshot(req, &snap, progress).await;
        }
        if let Some(vm) = self.take_from_pool(&req, progress).await? {
            return Ok(vm);
        }
        self.create_owned(req, progress, Owner::User).await
    }

    /// The booting create, of a VM for `owner`.
    pub(super) async fn create_owned(
        &self,
        req: CreateVmRequest,
        progress: &Progress,
        owner: Owner,
    ) -> Result<VmRecord, OpError> {
        begin_stage(progress, "validate", "checking the request");
        let mut vm = self.validate_create(&req)?;
        timings::name_vm(vm.name.as_str());
        // Only now, with the request known to be sound, may we pull.
        timings::mark("resolve_boot");
        let boot = self
            .artifacts
            .resolve_boot(&req, progress)
            .await
            .map_err(|e| match e {
                crate::artifacts::ArtifactError::Invalid(m) => OpError::Invalid(m),
                other => OpError::Stage {
                    stage: "resolve_boot".to_string(),
                    source: Box::new(other),
                },
            })?;
        check_file("--kernel", &boot.kernel, "kernel image (vmlinux)")?;
        if let Some(initrd) = &boot.initrd {
            check_file("--initrd", initrd, "initrd image")?;
        }
        check_file("--rootfs", &boot.rootfs, "root filesystem image")?;
        vm.spec.kernel = boot.kernel;
        vm.spec.initrd = boot.initrd;
        vm.spec.rootfs_source = boot.rootfs;

        let guard = self.record_new(&vm, owner).await?;

        let dir = self.vm_dir(&vm.id);
        begin_stage(
            progress,
            "clone_rootfs",
            format!(
                "copying {} for {}",
                vm.spec.rootfs_source.display(),
                vm.name
            ),
        );
        let src = vm.spec.rootfs_source.clone();
        let dst = dir.join(ROOT_DISK);
        let dir2 = dir.clone();
        // An image's root disk may have a copy ready (`rootfs_spares`); a
        // `--rootfs` file is the user's, copied as it is now and not kept.
        let spares = req.rootfs.is_none().then(|| self.artifacts.spares.clone());
        let cloned = blocking(move || -> Result<disk::CloneKind, OpError> {
            std::fs::create_dir_all(&dir2)
                .map_err(|e| OpError::Io(format!("Cannot create {}", dir2.display()), e))?;
            match &spares {
                Some(spares) => spares.take(&src, &dst),
                None => disk::clone_file(&src, &dst),
            }
            .map_err(|e| OpError::Stage {
                stage: "clone_rootfs".to_string(),
                source: Box::new(e),
            })
        })
        .await?;
        match cloned {
            Ok(kind) => {
                tracing::info!(vm = %vm.name, ?kind, "root disk cloned");
                crash_point("create:cloned");
            }
            Err(e) => {
                // Nothing of this VM may survive a failed clone.
                self.discard_new(&vm, guard).await;
                return Err(e);
            }
        }

        if req.no_start {
            return Ok(vm);
        }
        self.start_locked(&mut vm, progress).await?;
        Ok(vm)
    }

    /// Records new VM `vm` for `owner` and takes its lock. Name check and
    /// insert are serialised so two creates cannot race past each other;
    /// the UNIQUE constraint backs this up.
    pub(super) async fn record_new(
        &self,
        vm: &VmRecord,
        owner: Owner,
    ) -> Result<tokio::sync::OwnedMutexGuard<()>, OpError> {
        let guard = self.locks.lock(&vm.id).await;
        {
            let _create = self.create_lock.lock().await;
            let store = self.store.clone();
            let rec = vm.clone();
            let inserted = blocking(move || match owner {
                Owner::User => store.insert_vm(&rec),
                Owner::Pool { image } => store.insert_pooled_vm(&rec, image.as_deref()),
            });
            match inserted.await? {
                Ok(()) => {}
                Err(StoreError::NameTaken(n)) => return Err(OpError::NameTaken(n.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        crash_point("create:recorded");
        Ok(guard)
    }

    /// Removes new VM `vm`'s directory and record and releases its lock:
    /// a create that failed before anything of it ran.
    pub(super) async fn discard_new(&self, vm: &VmRecord, guard: tokio::sync::OwnedMutexGuard<()>) {
        let _ = std::fs::remove_dir_all(self.vm_dir(&vm.id));
        let store = self.store.clone();
        let id = vm.id.clone();
        let _ = blocking(move || store.delete_vm(&id)).await;
        drop(guard);
        self.locks.forget(&vm.id);
    }

    pub(super) fn validate_create(&self, req: &CreateVmRequest) -> Result<VmRecord, OpError> {
        let invalid = |e: &dyn std::fmt::Display| OpError::Invalid(e.to_string());
        let name = match &req.name {
            Some(n) => VmName::parse(n).map_err(|e| invalid(&e))?,
            None => VmName::generate(),
        };
        let d = self.config.resolved_vm_defaults().values;
        let vcpus = match req.vcpus {
            Some(n) => validate_vcpus(n).map_err(|e| invalid(&e))?,
            None => d.vcpus,
        };
        let memory_mib = match req.memory_mib {
            Some(n) => {
                // --force-size takes memory beyond the host's too (overcommit).
                let host = (!req.force_size).then(host_memory_mib).flatten();
                validate_memory_mib_on_host(n, host).map_err(|e| invalid(&e))?
            }
            None => d.memory_mib,
        };
        let disk_size = match &req.disk_size {
            Some(s) => s.parse::<ByteSize>().map_err(|e| invalid(&e))?,
            None => d.disk_size,
        };
        // The config's default is the operator's own choice; a larger ask
        // must fit the state filesystem unless forced.
        if disk_size > d.disk_size && !req.force_size {
            super::set::check_free_space(&self.paths.vms_dir(), disk_size, disk_size)?;
        }
        // Explicit paths are checked before anything is pulled.
        if let Some(k) = &req.kernel {
            check_file("--kernel", k, "kernel image (vmlinux)")?;
        }
        if let Some(initrd) = &req.initrd {
            check_file("--initrd", initrd, "initrd image")?;
        }
        if let Some(r) = &req.rootfs {
            check_file("--rootfs", r, "root filesystem image")?;
        }

        let choices: Vec<CapChoice> = req
            .caps
            .iter()
            .map(|c| c.parse::<CapChoice>().map_err(|e| invalid(&e)))
            .collect::<Result<_, _>>()?;
        let defaults = self.config.default_caps().map_err(|e| invalid(&e))?;
        let caps = resolve_caps(&defaults, &choices);
        let vmm = req
            .vmm
            .unwrap_or_else(|| self.config.backend_plan(None).vmm);
        let mut resolved = Vec::with_capacity(caps.len());
        for c in &caps {
            let cap: std::sync::Arc<dyn Capability> =
                self.registry.get(&c.name).map_err(|e| invalid(&e))?;
            cap.validate_options(&c.options)
                .map_err(|e| OpError::Invalid(format!("--cap {}: {e}", c.name)))?;
            resolved.push((cap, ()));
        }
        // Refuse a set that misses a requirement or a backend now, before
        // anything exists (start checks again and orders the hooks).
        crate::capability::order_by_manifest(resolved, vmm).map_err(|e| invalid(&e))?;

        Ok(VmRecord::new(
            name,
            VmSpec {
                vcpus,
                memory_mib,
                disk_size,
                // Filled in from the resolved boot files.
                kernel: PathBuf::new(),
                initrd: None,
                rootfs_source: PathBuf::new(),
                extra_boot_args: req.boot_args.clone(),
                vmm,
            },
            caps,
            now_unix(),
        ))
    }
}

fn check_file(flag: &'static str, path: &Path, what: &'static str) -> Result<(), OpError> {
    banger_api::paths::check_input_file(flag, path, what)
        .map_err(|e| OpError::Invalid(e.to_string()))
}
