//! Which backend and accelerator a new VM gets, and why.
//!
//! `vmm = "auto"` (the default) picks firecracker when its binary is found
//! and KVM can boot a standard guest here, else qemu. The KVM question is
//! asked of [`HostFacts::kvm_blocker`], the same rule `qemu_accel = "auto"`
//! uses, so the two can never disagree. A VM's record keeps the resolved
//! kind, never `auto`. See `docs/vmm.md`.

use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::model::VmmKind;

/// The `vmm` setting: one backend, or `auto` to pick one for this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmmChoice {
    /// firecracker where it is installed and KVM boots a standard guest,
    /// else qemu.
    #[default]
    Auto,
    /// Always this backend.
    Fixed(VmmKind),
}

impl FromStr for VmmChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(VmmChoice::Auto),
            "firecracker" => Ok(VmmChoice::Fixed(VmmKind::Firecracker)),
            "qemu" => Ok(VmmChoice::Fixed(VmmKind::Qemu)),
            _ => Err(format!(
                "unknown vmm {s:?}; valid values: auto, firecracker, qemu"
            )),
        }
    }
}

/// What the backend choice depends on, probed or injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFacts {
    /// The firecracker binary, or why there is none (`not found on PATH`).
    pub firecracker: Result<PathBuf, String>,
    /// KVM's state on this host.
    pub host: HostFacts,
}

/// The backend and accelerator a new VM gets, each with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendPlan {
    /// The backend.
    pub vmm: VmmKind,
    /// Why: `config`, `--vmm`, or `auto: ...`.
    pub vmm_why: String,
    /// The accelerator the backend will use.
    pub accel: Accel,
    /// Why this accelerator.
    pub accel_why: String,
}

impl fmt::Display for BackendPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vmm {} ({}), accel {} ({})",
            self.vmm.as_str(),
            self.vmm_why,
            self.accel.as_str(),
            self.accel_why
        )
    }
}

/// The rule. A `--vmm` flag wins, then an explicit `vmm` in config; `auto`
/// takes firecracker only when it is found and KVM can boot a standard
/// guest. The accelerator is KVM for firecracker (it has no other) and
/// [`choose_accel`] for qemu.
pub fn choose_backend(
    flag: Option<VmmKind>,
    config: VmmChoice,
    qemu_accel: QemuAccel,
    facts: &BackendFacts,
) -> BackendPlan {
    let blocker = facts.host.kvm_blocker();
    let (vmm, vmm_why) = match (flag, config) {
        (Some(kind), _) => (kind, "--vmm".to_string()),
        (None, VmmChoice::Fixed(kind)) => (kind, "config".to_string()),
        (None, VmmChoice::Auto) => match (&facts.firecracker, blocker) {
            (Ok(bin), None) => (
                VmmKind::Firecracker,
                format!(
                    "auto: firecracker found at {} and KVM can boot a standard guest",
                    bin.display()
                ),
            ),
            (Err(why), _) => (VmmKind::Qemu, format!("auto: {why}")),
            (Ok(_), Some(b)) => (
                VmmKind::Qemu,
                format!(
                    "auto: firecracker needs KVM, which cannot boot a standard guest here: {b}"
                ),
            ),
        },
    };
    let (accel, accel_why) = match vmm {
        VmmKind::Firecracker => (
            Accel::Kvm,
            match blocker {
                None => "firecracker always uses KVM".to_string(),
                Some(b) => format!("firecracker always uses KVM, but here: {b}"),
            },
        ),
        VmmKind::Qemu => {
            let accel = choose_accel(qemu_accel, facts.host);
            let why = match (qemu_accel, blocker) {
                (QemuAccel::Kvm | QemuAccel::Tcg, _) => "config qemu_accel".to_string(),
                (QemuAccel::Auto, None) => "auto: KVM can boot a standard guest".to_string(),
                (QemuAccel::Auto, Some(b)) => {
                    format!("auto: KVM cannot boot a standard guest here: {b}")
                }
            };
            (accel, why)
        }
    };
    BackendPlan {
        vmm,
        vmm_why,
        accel,
        accel_why,
    }
}

/// How long the backend waits for the VMM at each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From spawn until the API socket answers `GET /`.
    pub socket_ready: Duration,
    /// Each API request's reads and writes.
    pub request: Duration,
    /// From SIGKILL until the process is gone.
    pub exit: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            socket_ready: Duration::from_secs(5),
            request: Duration::from_secs(10),
            exit: Duration::from_secs(5),
        }
    }
}

/// The `qemu_accel` setting: which accelerator to ask QEMU for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QemuAccel {
    /// KVM when [`choose_accel`] finds it usable, TCG otherwise.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

impl FromStr for QemuAccel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(QemuAccel::Auto),
            "kvm" => Ok(QemuAccel::Kvm),
            "tcg" => Ok(QemuAccel::Tcg),
            _ => Err(format!(
                "unknown qemu_accel {s:?}; valid values: auto, kvm, tcg"
            )),
        }
    }
}

/// How the guest agent's API reaches the host under QEMU (config
/// `qemu_agent_transport`; see `docs/snapshots.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentTransport {
    /// `vhost-user-vsock-device` and a vhost-device-vsock process. QEMU 7.2
    /// cannot migrate it, so such a VM cannot be snapshotted.
    Vsock,
    /// A virtio-serial port and the agent's own bridge (`banger-agent
    /// bridge`), which QEMU migrates: such a VM can be snapshotted. The
    /// default: it needs nothing beyond banger's own binaries.
    #[default]
    Serial,
}

impl FromStr for AgentTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vsock" => Ok(AgentTransport::Vsock),
            "serial" => Ok(AgentTransport::Serial),
            _ => Err(format!(
                "unknown qemu_agent_transport {s:?}; valid values: vsock, serial"
            )),
        }
    }
}

/// The accelerator a launch actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg -cpu max`).
    Tcg,
}

impl Accel {
    /// The name QEMU and the `spec:` line use.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers, as far as choosing an accelerator goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` opens read-write.
    pub kvm_usable: bool,
    /// The host is itself a nested PVM guest (`/sys/module/kvm_pvm` exists),
    /// where KVM is present but cannot boot a standard kernel.
    pub nested_pvm: bool,
}

impl HostFacts {
    /// Probes this host.
    pub fn probe() -> HostFacts {
        HostFacts {
            kvm_usable: OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            nested_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }

    /// Why KVM cannot boot a standard guest here, or `None` when it can.
    /// The one KVM rule: `qemu_accel = "auto"` and `vmm = "auto"` both ask it.
    pub fn kvm_blocker(&self) -> Option<&'static str> {
        if !self.kvm_usable {
            Some("/dev/kvm cannot be opened read-write")
        } else if self.nested_pvm {
            Some("nested PVM (/sys/module/kvm_pvm)")
        } else {
            None
        }
    }
}

/// The rule for `qemu_accel`: an explicit choice wins; `auto` picks KVM only
/// when `/dev/kvm` is usable and the host is not nested PVM.
pub fn choose_accel(requested: QemuAccel, facts: HostFacts) -> Accel {
    match requested {
        QemuAccel::Kvm => Accel::Kvm,
        QemuAccel::Tcg => Accel::Tcg,
        QemuAccel::Auto if facts.kvm_blocker().is_none() => Accel::Kvm,
        QemuAccel::Auto => Accel::Tcg,
    }
}

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct QemuSettings {
    /// `qemu-system-x86_64` (a bare name is searched on `PATH`).
    pub qemu_bin: PathBuf,
    /// `vhost-device-vsock` (a bare name is searched on `PATH`); only run
    /// for machines with a vsock device.
    pub vhost_device_vsock_bin: PathBuf,
    /// Accelerator choice.
    pub accel: QemuAccel,
    /// How the agent's vsock API is carried.
    pub agent_transport: AgentTransport,
    /// `banger-agent`, which runs the host end of the `serial` transport
    /// (`banger-agent bridge`); a VM with vsock cannot start under `serial`
    /// without it.
    pub bridge_bin: Option<PathBuf>,
    /// Step timeouts; `socket_ready` covers both QMP and the vsock backend.
    pub timeouts: Timeouts,
    /// How QEMU is confined.
    pub jail: JailSettings,
}

/// The first of the 65536 uids (and gids) VMM processes run as when the
/// daemon is root: well above login users, subordinate-uid ranges and
/// systemd's dynamic users, below 2^31.
pub const DEFAULT_VMM_UID_BASE: u32 = 0x7000_0000;

/// How VMM processes are confined (config `vmm_jail`, `vmm_uid_base`,
/// `vmm_cgroups`, `jailer_bin`); see `docs/security.md`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSettings {
    /// QEMU runs with `-sandbox on` and, under a root daemon, chrooted as
    /// the VM's own uid; Firecracker runs under its jailer when one is
    /// found.
    pub enabled: bool,
    /// The first uid/gid of the per-VM range.
    pub uid_base: u32,
    /// Each VM's VMM runs in a cgroup of its own with limits from its shape.
    pub cgroups: bool,
    /// Firecracker's `jailer`, when configured or found on `PATH`.
    pub jailer_bin: Option<PathBuf>,
}

impl Default for JailSettings {
    fn default() -> Self {
        JailSettings {
            enabled: true,
            uid_base: DEFAULT_VMM_UID_BASE,
            cgroups: true,
            jailer_bin: None,
        }
    }
}

impl Default for QemuSettings {
    fn default() -> Self {
        QemuSettings {
            qemu_bin: "qemu-system-x86_64".into(),
            vhost_device_vsock_bin: "vhost-device-vsock".into(),
            accel: QemuAccel::Auto,
            agent_transport: AgentTransport::Serial,
            bridge_bin: None,
            timeouts: Timeouts {
                socket_ready: Duration::from_secs(10),
                ..Timeouts::default()
            },
            jail: JailSettings::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(firecracker: bool, kvm_usable: bool, nested_pvm: bool) -> BackendFacts {
        BackendFacts {
            firecracker: if firecracker {
                Ok(PathBuf::from("/usr/bin/firecracker"))
            } else {
                Err("firecracker not found on PATH".to_string())
            },
            host: HostFacts {
                kvm_usable,
                nested_pvm,
            },
        }
    }

    fn auto(f: &BackendFacts) -> BackendPlan {
        choose_backend(None, VmmChoice::Auto, QemuAccel::Auto, f)
    }

    #[test]
    fn auto_takes_firecracker_when_installed_and_kvm_boots_standard_guests() {
        let p = auto(&facts(true, true, false));
        assert_eq!((p.vmm, p.accel), (VmmKind::Firecracker, Accel::Kvm));
        assert_eq!(
            p.to_string(),
            "vmm firecracker (auto: firecracker found at /usr/bin/firecracker and KVM can boot \
             a standard guest), accel kvm (firecracker always uses KVM)"
        );
    }

    #[test]
    fn auto_takes_qemu_when_firecracker_is_missing() {
        let p = auto(&facts(false, true, false));
        assert_eq!((p.vmm, p.accel), (VmmKind::Qemu, Accel::Kvm));
        assert_eq!(
            p.to_string(),
            "vmm qemu (auto: firecracker not found on PATH), \
             accel kvm (auto: KVM can boot a standard guest)"
        );
        let p = auto(&facts(false, false, false));
        assert_eq!((p.vmm, p.accel), (VmmKind::Qemu, Accel::Tcg));
        assert_eq!(
            p.accel_why,
            "auto: KVM cannot boot a standard guest here: /dev/kvm cannot be opened read-write"
        );
    }

    #[test]
    fn auto_takes_qemu_tcg_on_nested_pvm_even_with_firecracker_installed() {
        let p = auto(&facts(true, true, true));
        assert_eq!((p.vmm, p.accel), (VmmKind::Qemu, Accel::Tcg));
        assert_eq!(
            p.to_string(),
            "vmm qemu (auto: firecracker needs KVM, which cannot boot a standard guest here: \
             nested PVM (/sys/module/kvm_pvm)), accel tcg (auto: KVM cannot boot a standard \
             guest here: nested PVM (/sys/module/kvm_pvm))"
        );
        let p = auto(&facts(true, false, false));
        assert_eq!(p.vmm, VmmKind::Qemu);
    }

    #[test]
    fn explicit_config_and_flag_win_over_the_host() {
        let f = facts(false, false, true);
        let p = choose_backend(
            None,
            VmmChoice::Fixed(VmmKind::Firecracker),
            QemuAccel::Auto,
            &f,
        );
        assert_eq!(p.vmm, VmmKind::Firecracker);
        assert_eq!(p.vmm_why, "config");
        assert_eq!(
            p.accel_why,
            "firecracker always uses KVM, but here: /dev/kvm cannot be opened read-write"
        );
        let p = choose_backend(
            Some(VmmKind::Qemu),
            VmmChoice::Fixed(VmmKind::Firecracker),
            QemuAccel::Kvm,
            &f,
        );
        assert_eq!(
            p.to_string(),
            "vmm qemu (--vmm), accel kvm (config qemu_accel)"
        );
    }

    #[test]
    fn parses_the_setting_and_lists_valid_values() {
        assert_eq!("auto".parse(), Ok(VmmChoice::Auto));
        assert_eq!("qemu".parse(), Ok(VmmChoice::Fixed(VmmKind::Qemu)));
        assert_eq!(
            "firecracker".parse(),
            Ok(VmmChoice::Fixed(VmmKind::Firecracker))
        );
        assert_eq!(
            "xen".parse::<VmmChoice>(),
            Err("unknown vmm \"xen\"; valid values: auto, firecracker, qemu".to_string())
        );
    }
}
