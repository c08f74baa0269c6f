//! `start`: PrepareHost → ConfigureMachine → GuestConfig → launch VMM →
//! PostStart. Any failure rolls back everything prepared, in reverse.

use crate::capability::{Hook, TeardownReason};
use crate::lifecycle::restore::Restore;
use crate::lifecycle::{
    Lifecycle, OpError, Progress, begin_stage, blocking, crash_point, render_chain, set_failure,
    timings,
};
use banger_api::guest::GuestConfig;
use banger_api::machine::{Drive, DriveRole, MachineSpec};
use banger_api::model::{CapOptions, EnabledCap, VmRecord, VmState, now_unix};
use banger_vmm::LaunchPaths;
use banger_vmm::config_drive;

/// Kernel command line every VM gets before capabilities add to it. The
/// backend adds `pci=off` when the machine has no PCI devices
/// (`MachineSpec::kernel_args`).
pub(crate) const BASE_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

/// File name of a VM's own root disk inside its directory.
pub const ROOT_DISK: &str = "rootfs.ext4";
/// File name of the captured guest console inside a VM's directory.
pub const SERIAL_LOG: &str = "serial.log";
/// File name of the VMM's own log inside a VM's directory.
pub(crate) const VMM_LOG: &str = "vmm.log";

/// Stage name of the config drive step in progress events and failures.
const CONFIG_DRIVE_STAGE: &str = "config_drive";

/// Appends the read-only config drive after every capability's drives, names
/// its device on the kernel command line and renders it into the VM dir.
async fn attach_config_drive(
    machine: &mut MachineSpec,
    guest: &GuestConfig,
    dir: &std::path::Path,
) -> Result<(), OpError> {
    let stage = |e: Box<dyn std::error::Error + Send + Sync>| OpError::Stage {
        stage: CONFIG_DRIVE_STAGE.to_string(),
        source: e,
    };
    machine
        .add_drive(Drive {
            id: config_drive::DRIVE_ID.to_string(),
            path: dir.join(config_drive::FILE_NAME),
            read_only: true,
            role: DriveRole::Config,
        })
        .map_err(|e| stage(Box::new(e)))?;
    let (m, g, path) = (
        machine.clone(),
        guest.clone(),
        dir.join(config_drive::FILE_NAME),
    );
    let drive = blocking(move || config_drive::render(&m, &g, &path))
        .await?
        .map_err(|e| stage(Box::new(e)))?;
    let device = drive
        .device_of(config_drive::DRIVE_ID)
        .ok_or_else(|| {
            stage(
                format!(
                    "The config drive is drive {} of the machine; at most 26 drives (vda-vdz) are supported",
                    machine.drives.len()
                )
                .into(),
            )
        })?;
    machine
        .boot_args
        .push_str(&format!(" {}={device}", config_drive::BOOT_ARG));
    Ok(())
}

impl Lifecycle {
    /// Starts a stopped, created or failed VM.
    pub async fn start(&self, name: &str, progress: &Progress) -> Result<VmRecord, OpError> {
        let (_guard, mut vm) = self.lock_by_name(name).await?;
        match vm.state {
            VmState::Created | VmState::Stopped | VmState::Error => {}
            VmState::Running => return Ok(vm),
            state @ (VmState::Starting | VmState::Stopping) => {
                return Err(OpError::WrongState {
                    name: name.to_string(),
                    state,
                    hint: "wait for the current operation to finish",
                });
            }
        }
        timings::timed(name, "start", self.start_locked(&mut vm, progress)).await?;
        Ok(vm)
    }

    /// The start sequence; the caller holds the VM's lock. Its stages and
    /// their durations are kept in `vm.last_start`, whatever the outcome.
    pub(crate) async fn start_locked(
        &self,
        vm: &mut VmRecord,
        progress: &Progress,
    ) -> Result<(), OpError> {
        self.start_from(vm, progress, None).await
    }

    /// [`Lifecycle::start_locked`], restoring `restore` instead of booting
    /// when given (`restore.rs`).
    pub(super) async fn start_from(
        &self,
        vm: &mut VmRecord,
        progress: &Progress,
        restore: Option<&Restore>,
    ) -> Result<(), OpError> {
        let from = timings::checkpoint();
        // Leftovers from an earlier failure whose teardown itself failed.
        if !vm.prepared.is_empty() {
            let leftovers: Vec<String> = vm.prepared.iter().rev().cloned().collect();
            let errors = self
                .teardown(vm, leftovers, TeardownReason::Rollback, progress)
                .await;
            if let Some(e) = errors.into_iter().next() {
                return Err(e);
            }
        }
        vm.state = VmState::Starting;
        self.save(vm).await?;
        match self.run_start(vm, progress, restore).await {
            Ok(()) => {
                vm.state = VmState::Running;
                vm.booted_once = true;
                vm.last_error = None;
                vm.last_start = Some(timings::since(from, true));
                self.save(vm).await?;
                progress.stage("running", format!("{} is running", vm.name));
                Ok(())
            }
            Err(err) => {
                begin_stage(
                    progress,
                    "rollback",
                    format!("{}; rolling back", render_chain(&err)),
                );
                if let Some(p) = vm.vmm.take() {
                    let vmm = self.vmm_for(vm);
                    let _ = blocking(move || vmm.kill(&p)).await;
                }
                let prepared: Vec<String> = vm.prepared.iter().rev().cloned().collect();
                let _ = self
                    .teardown(vm, prepared, TeardownReason::Rollback, progress)
                    .await;
                set_failure(vm, &err);
                vm.last_start = Some(timings::since(from, false));
                self.save(vm).await?;
                Err(err)
            }
        }
    }

    async fn run_start(
        &self,
        vm: &mut VmRecord,
        progress: &Progress,
        restore: Option<&Restore>,
    ) -> Result<(), OpError> {
        let caps = self.caps_of(vm)?;
        let dir = self.vm_dir(&vm.id);

        for entry in &caps {
            self.run_hook(Hook::PrepareHost, entry, vm, progress, (), |c, ctx, _| {
                c.prepare_host(ctx)
            })
            .await?;
            vm.prepared.push(entry.1.name.clone());
            self.save(vm).await?;
            crash_point("start:prepared");
        }

        let boot_args = match &vm.spec.extra_boot_args {
            Some(extra) if !extra.trim().is_empty() => format!("{BASE_BOOT_ARGS} {}", extra.trim()),
            _ => BASE_BOOT_ARGS.to_string(),
        };
        let mut machine = MachineSpec {
            kernel: vm.spec.kernel.clone(),
            initrd: vm.spec.initrd.clone(),
            boot_args,
            vcpus: vm.spec.vcpus,
            memory_mib: vm.spec.memory_mib,
            drives: vec![Drive {
                id: "root".to_string(),
                path: dir.join(ROOT_DISK),
                read_only: false,
                role: DriveRole::Root,
            }],
            nics: Vec::new(),
            vsock: None,
            serial_log: dir.join(SERIAL_LOG),
            pci_devices: Vec::new(),
        };
        for entry in &caps {
            machine = self
                .run_hook(
                    Hook::ConfigureMachine,
                    entry,
                    vm,
                    progress,
                    machine,
                    |c, ctx, m| c.configure_machine(ctx, m),
                )
                .await?;
        }

        let mut guest = GuestConfig::new(vm.name.as_str());
        // Always-on capabilities (banger's SSH key) add theirs first, unless
        // the VM enables one explicitly and it runs in its place below.
        for cap in self.registry.always_on() {
            if caps.iter().any(|(c, _)| c.name() == cap.name()) {
                continue;
            }
            let entry = (
                cap.clone(),
                EnabledCap {
                    name: cap.name().to_string(),
                    options: CapOptions::new(),
                },
            );
            guest = self
                .run_hook(
                    Hook::GuestConfig,
                    &entry,
                    vm,
                    progress,
                    guest,
                    |c, ctx, g| c.guest_config(ctx, g),
                )
                .await?;
        }
        for entry in &caps {
            guest = self
                .run_hook(
                    Hook::GuestConfig,
                    entry,
                    vm,
                    progress,
                    guest,
                    |c, ctx, g| c.guest_config(ctx, g),
                )
                .await?;
        }
        timings::mark(CONFIG_DRIVE_STAGE);
        attach_config_drive(&mut machine, &guest, &dir).await?;
        vm.machine = Some(machine.clone());
        let network = guest.network.first().cloned();
        vm.guest = Some(without_file_contents(guest));
        self.save(vm).await?;
        if let Some(r) = restore {
            begin_stage(progress, "restore_disks", "copying the snapshot's disks");
            r.place_disks(&machine, &self.artifacts.snapshot_spares)
                .await?;
        }

        begin_stage(
            progress,
            "launch_vmm",
            format!("launching {}", self.vmm_for(vm).name()),
        );
        let paths = LaunchPaths {
            vm_dir: dir.clone(),
            api_socket: self.paths.vmm_socket(&vm.id),
            vmm_log: dir.join(VMM_LOG),
        };
        let vmm = self.vmm_for(vm);
        // The process is recorded before it is configured or booted: a
        // daemon killed from here on leaves a VMM that reconcile can find.
        let store = self.store.clone();
        let mut recorded = vm.clone();
        let snapshot = restore.map(|r| r.dir().to_path_buf());
        let restored_machine = machine.clone();
        let launched = blocking(move || {
            let mut on_spawned = |p: &banger_api::model::VmmProcess| {
                recorded.vmm = Some(p.clone());
                recorded.updated_at = now_unix();
                store.update_vm(&recorded).map_err(|e| {
                    banger_vmm::VmmError::NotReady(format!(
                        "Cannot record VMM pid {} in the state database, so it was killed: {}",
                        p.pid,
                        render_chain(&e)
                    ))
                })?;
                crash_point("start:vmm_spawned");
                Ok(())
            };
            match &snapshot {
                Some(dir) => vmm.restore_recorded(&machine, &paths, dir, &mut on_spawned),
                None => vmm.launch_recorded(&machine, &paths, &mut on_spawned),
            }
        })
        .await?;
        let process = launched.map_err(|e| match e {
            // A backend that cannot restore refuses before starting anything.
            banger_vmm::VmmError::Unsupported(msg) if restore.is_some() => OpError::Invalid(msg),
            e => OpError::Stage {
                stage: "launch_vmm".to_string(),
                source: Box::new(e),
            },
        })?;
        vm.vmm = Some(process);
        self.save(vm).await?;
        crash_point("start:vmm_booted");
        if let Some(r) = restore {
            self.reidentify(vm, r, &restored_machine, network, progress)
                .await?;
        }

        for entry in &caps {
            let stage = format!("{}:{}", Hook::PostStart, entry.1.name);
            let hook = self.run_hook(Hook::PostStart, entry, vm, progress, (), |c, ctx, _| {
                c.post_start(ctx)
            });
            self.unless_vmm_exits(vm, &stage, hook).await?;
        }
        Ok(())
    }
}

/// The guest bundle as the VM record keeps it: files' contents (synced
/// credentials, keys) stay only on the VM's own config drive, never in the
/// database or in `vm show`.
fn without_file_contents(mut guest: GuestConfig) -> GuestConfig {
    for f in &mut guest.files {
        f.contents.clear();
    }
    guest
}
