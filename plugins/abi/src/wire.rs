//! The JSON exchanged with a plugin's hooks.
//!
//! Every message carries `"v"`, the wire format version ([`WIRE_VERSION`]).
//! Additive changes (new optional fields) keep the version; readers ignore
//! fields they do not know and fill missing ones with defaults. `v` changes
//! only when a field changes meaning, and a reader refuses versions it does
//! not know. A response carries *edits* (things to append), never a whole
//! machine spec, so the host can check every edit for conflicts.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The wire format version this crate writes and reads.
pub const WIRE_VERSION: u32 = 1;

/// Per-VM capability options, from `--cap NAME:key=value,...`.
pub type Options = BTreeMap<String, String>;

/// Which hook is being called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookName {
    /// Set up host resources.
    PrepareHost,
    /// Add devices or boot arguments.
    ConfigureMachine,
    /// Add guest mounts or files.
    GuestConfig,
    /// The guest is up.
    PostStart,
    /// Undo PrepareHost.
    Teardown,
}

impl HookName {
    /// The hook's snake_case name (`prepare_host`).
    pub fn as_str(self) -> &'static str {
        match self {
            HookName::PrepareHost => "prepare_host",
            HookName::ConfigureMachine => "configure_machine",
            HookName::GuestConfig => "guest_config",
            HookName::PostStart => "post_start",
            HookName::Teardown => "teardown",
        }
    }
}

/// Why Teardown runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeardownReason {
    /// The VM stopped; keep persistent data.
    Stop,
    /// The VM is being deleted; remove everything.
    Delete,
    /// A later hook failed; undo this start attempt.
    Rollback,
}

impl TeardownReason {
    /// The reason's snake_case name (`stop`).
    pub fn as_str(self) -> &'static str {
        match self {
            TeardownReason::Stop => "stop",
            TeardownReason::Delete => "delete",
            TeardownReason::Rollback => "rollback",
        }
    }
}

/// What a plugin may know about the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Stable VM id.
    pub id: String,
    /// User-facing VM name (also its hostname).
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The VM's private directory; plugins keep their files here.
    pub vm_dir: PathBuf,
    /// True once the VM has been running; a VM that never ran has no user data.
    #[serde(default)]
    pub booted_once: bool,
    /// The VMM backend that runs the VM (always sent by ABI 2 hosts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<Backend>,
}

/// A VMM backend kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Firecracker.
    Firecracker,
    /// QEMU.
    Qemu,
    /// A backend newer than this crate; plugins should treat it as unsupported.
    #[serde(other)]
    Unknown,
}

impl Backend {
    /// The backend's name as users write it (`qemu`).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Firecracker => "firecracker",
            Backend::Qemu => "qemu",
            Backend::Unknown => "unknown",
        }
    }
}

/// A read-only view of the machine as built so far (sent to
/// ConfigureMachine: the spec before this plugin's edits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineView {
    /// Kernel image on the host.
    pub kernel: PathBuf,
    /// Initrd on the host, if any.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line, space-separated.
    #[serde(default)]
    pub boot_args: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Drives in attach order; the first is the root.
    #[serde(default)]
    pub drives: Vec<DriveEdit>,
    /// NICs in attach order.
    #[serde(default)]
    pub nics: Vec<NicEdit>,
    /// PCI devices.
    #[serde(default)]
    pub pci_devices: Vec<PciDeviceEdit>,
}

/// The input of every hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRequest {
    /// Wire format version.
    pub v: u32,
    /// The hook being called.
    pub hook: HookName,
    /// The VM.
    pub vm: VmInfo,
    /// This capability's per-VM options.
    #[serde(default)]
    pub options: Options,
    /// Set for Teardown only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown_reason: Option<TeardownReason>,
    /// The machine so far; set for ConfigureMachine only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineView>,
}

/// A block device to append to the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriveEdit {
    /// Unique drive id within the VM.
    pub id: String,
    /// Backing file on the host.
    pub host_path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A filesystem for the guest agent to mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountEdit {
    /// The drive (by id) holding the filesystem.
    pub drive_id: String,
    /// Absolute mount point inside the guest.
    pub mount_point: PathBuf,
    /// Filesystem type (`ext4`).
    pub fstype: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A file for the guest agent to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEdit {
    /// Absolute guest path.
    pub path: PathBuf,
    /// File contents (a JSON array of bytes).
    pub contents: Vec<u8>,
    /// Permission bits.
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// Owner uid.
    #[serde(default)]
    pub uid: u32,
    /// Owner gid.
    #[serde(default)]
    pub gid: u32,
}

fn default_mode() -> u32 {
    0o644
}

/// A PCI address as sysfs and `lspci -D` name host devices:
/// `DDDD:BB:DD.F` (domain, bus, device, function) in hex, kept lowercase.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddress(String);

/// A string that is not a `DDDD:BB:DD.F` PCI address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a PCI address: write DDDD:BB:DD.F in hex (domain:bus:device.function, device <= 1f, function <= 7), e.g. 0000:01:00.0 as `lspci -D` shows it"
)]
pub struct BadPciAddress(pub String);

impl PciAddress {
    /// The address text (`0000:01:00.0`).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for PciAddress {
    type Err = BadPciAddress;
    fn from_str(s: &str) -> Result<Self, BadPciAddress> {
        let bad = || BadPciAddress(s.to_string());
        let hex = |part: &str, len: usize, max: u32| {
            (part.len() == len && part.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(part, 16).ok())
                .flatten()
                .filter(|v| *v <= max)
        };
        let (domain, rest) = s.split_once(':').ok_or_else(bad)?;
        let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
        let (device, function) = rest.split_once('.').ok_or_else(bad)?;
        hex(domain, 4, 0xffff).ok_or_else(bad)?;
        hex(bus, 2, 0xff).ok_or_else(bad)?;
        hex(device, 2, 0x1f).ok_or_else(bad)?;
        hex(function, 1, 7).ok_or_else(bad)?;
        Ok(PciAddress(s.to_ascii_lowercase()))
    }
}

impl TryFrom<String> for PciAddress {
    type Error = BadPciAddress;
    fn try_from(s: String) -> Result<Self, BadPciAddress> {
        s.parse()
    }
}

impl From<PciAddress> for String {
    fn from(a: PciAddress) -> String {
        a.0
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PCI device to add to the machine (QEMU backend only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PciDeviceEdit {
    /// A host device the plugin has bound to `vfio-pci`, passed through.
    Vfio {
        /// Host PCI address.
        address: PciAddress,
    },
    /// A device QEMU emulates, by its `-device` model name (`virtio-rng-pci`).
    Emulated {
        /// QEMU device model name.
        model: String,
    },
}

/// A network interface to append to the machine. The tap must exist on the
/// host (create it at PrepareHost with [`HostRequest::CreateTap`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicEdit {
    /// Unique NIC id within the VM.
    pub id: String,
    /// Host tap device name.
    pub tap: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// Edits to the machine spec, returned by ConfigureMachine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MachineEdits {
    /// Drives to append, in order.
    pub drives: Vec<DriveEdit>,
    /// Kernel command-line arguments to append, in order.
    pub boot_args: Vec<String>,
    /// PCI devices to add, in order (a host without them ignores nothing:
    /// it applies them or fails the hook).
    pub pci_devices: Vec<PciDeviceEdit>,
    /// Kernel command-line arguments to remove, applied before `boot_args`
    /// are appended: `quiet` removes `quiet`; `pci` (no `=`) removes `pci`
    /// and every `pci=...`; `pci=off` removes exactly `pci=off`.
    pub remove_boot_args: Vec<String>,
    /// NICs to append, in order.
    pub nics: Vec<NicEdit>,
}

/// Edits to the guest config bundle, returned by GuestConfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestEdits {
    /// Mounts to add, in order.
    pub mounts: Vec<MountEdit>,
    /// Files to write, in order.
    pub files: Vec<FileEdit>,
    /// Environment for the commands the guest agent runs; a name another
    /// capability already set is refused.
    pub env: BTreeMap<String, String>,
    /// Commands (argv) the guest agent runs at boot, after mounts and
    /// files, in order.
    pub boot_commands: Vec<Vec<String>>,
}

impl MachineEdits {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self == &MachineEdits::default()
    }
}

impl GuestEdits {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self == &GuestEdits::default()
    }
}

/// What a plugin declares about itself, read once at load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Manifest {
    /// Capabilities that must also be enabled on a VM that enables this one
    /// (their hooks also run before this one's).
    pub requires: Vec<String>,
    /// Capabilities whose hooks run before this one's when they are enabled
    /// too (ordering only).
    pub after: Vec<String>,
    /// The VMM backends this plugin supports; empty means all.
    pub backends: Vec<Backend>,
}

/// The manifest as it crosses at load: [`Manifest`] plus `"v"`, the wire
/// version the plugin speaks, so a daemon refuses a plugin of another wire
/// version when it loads it rather than at its first hook. SDKs before
/// this field sent the manifest alone; they spoke version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestMessage {
    /// The plugin's wire version; `None` from an SDK that predates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    /// The manifest itself.
    #[serde(flatten)]
    pub manifest: Manifest,
}

impl ManifestMessage {
    /// The wire version the plugin speaks (1 when it does not say).
    pub fn wire_version(&self) -> u32 {
        self.v.unwrap_or(1)
    }
}

/// A privileged host operation a plugin may ask for, through
/// `Host::request` in the SDK. This is the whole allowlist: the host
/// validates every argument and refuses any other `op`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostRequest {
    /// Create a tap device owned by the daemon's user. The name must start
    /// with `bgp` (plugin taps; banger's own pool uses `bgtap`).
    CreateTap {
        /// Interface name: `bgp` then 1-12 of `[a-z0-9-]`.
        name: String,
    },
    /// Delete a tap made with `CreateTap`; a missing one is fine.
    DeleteTap {
        /// Interface name.
        name: String,
    },
    /// Bind a PCI device and the members of its IOMMU group that must go
    /// with it to `vfio-pci`; the reply names the driver each one had.
    BindVfio {
        /// The device.
        address: PciAddress,
    },
    /// Give a PCI device back to `driver`: the driver `BindVfio` replied it
    /// had (`None`: it had none, leave it unbound), or `vfio-pci`.
    RebindDriver {
        /// The device.
        address: PciAddress,
        /// Driver name, 1-32 of `[a-z0-9_-]`; absent: leave it unbound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        driver: Option<String>,
    },
    /// Masquerade this VM's traffic from `ip` on banger's bridge (nft rules
    /// tagged with the VM's id in banger's table).
    AddNat {
        /// The VM's IPv4 address on banger's subnet.
        ip: std::net::Ipv4Addr,
    },
    /// Remove this VM's NAT rules.
    RemoveNat,
}

impl HostRequest {
    /// The request's `op` name (`create_tap`).
    pub fn op(&self) -> &'static str {
        match self {
            HostRequest::CreateTap { .. } => "create_tap",
            HostRequest::DeleteTap { .. } => "delete_tap",
            HostRequest::BindVfio { .. } => "bind_vfio",
            HostRequest::RebindDriver { .. } => "rebind_driver",
            HostRequest::AddNat { .. } => "add_nat",
            HostRequest::RemoveNat => "remove_nat",
        }
    }
}

/// A host request on the wire: the version plus the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCall {
    /// Wire format version.
    pub v: u32,
    /// The request.
    #[serde(flatten)]
    pub request: HostRequest,
}

/// The host's answer to a request that succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReply {
    /// Wire format version.
    pub v: u32,
    /// For `BindVfio`: the driver the device had before (`None` if unbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_driver: Option<String>,
    /// For `BindVfio`: every device it bound (the named one and the members
    /// of its IOMMU group that went with it), each with its driver before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound: Vec<BoundDevice>,
}

/// A device `BindVfio` bound to `vfio-pci`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundDevice {
    /// The device.
    pub address: PciAddress,
    /// Its driver before (`None`: it had none); give it back with
    /// `RebindDriver` at Teardown.
    #[serde(default)]
    pub previous_driver: Option<String>,
}

/// The output of every hook: edits for the host to apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookResponse {
    /// Wire format version.
    pub v: u32,
    /// Machine edits (ConfigureMachine only).
    #[serde(default)]
    pub machine: MachineEdits,
    /// Guest edits (GuestConfig only).
    #[serde(default)]
    pub guest: GuestEdits,
}

impl Default for HookResponse {
    fn default() -> Self {
        HookResponse {
            v: WIRE_VERSION,
            machine: MachineEdits::default(),
            guest: GuestEdits::default(),
        }
    }
}

/// A wire message that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The JSON does not match the expected shape.
    #[error("Malformed {what} JSON")]
    Decode {
        /// Which message.
        what: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be serialised.
    #[error("Cannot encode {what} as JSON")]
    Encode {
        /// Which message.
        what: &'static str,
        /// The serialisation error.
        #[source]
        source: serde_json::Error,
    },
    /// The peer speaks a wire version this side does not know.
    #[error("Unsupported {what} wire version {found}; this side speaks version {WIRE_VERSION}")]
    Version {
        /// Which message.
        what: &'static str,
        /// The version found.
        found: u32,
    },
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<u32>,
}

/// Decodes a wire message, refusing unknown versions first so the error says
/// "wrong version" instead of some missing field.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    json: &str,
) -> Result<T, WireError> {
    let probe: VersionProbe =
        serde_json::from_str(json).map_err(|source| WireError::Decode { what, source })?;
    match probe.v {
        Some(WIRE_VERSION) => {}
        found => {
            return Err(WireError::Version {
                what,
                found: found.unwrap_or(0),
            });
        }
    }
    serde_json::from_str(json).map_err(|source| WireError::Decode { what, source })
}

/// Encodes a wire message.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<String, WireError> {
    serde_json::to_string(value).map_err(|source| WireError::Encode { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> HookRequest {
        HookRequest {
            v: WIRE_VERSION,
            hook: HookName::Teardown,
            vm: VmInfo {
                id: "0123456789abcdef".into(),
                name: "dev".into(),
                vcpus: 2,
                memory_mib: 1024,
                vm_dir: "/state/vms/0123456789abcdef".into(),
                booted_once: true,
                vmm: Some(Backend::Qemu),
            },
            options: [("host".to_string(), "/src".to_string())].into(),
            teardown_reason: Some(TeardownReason::Rollback),
            machine: None,
        }
    }

    #[test]
    fn request_round_trips_and_carries_version() {
        let json = encode("request", &request()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["v"], 1);
        assert_eq!(value["hook"], "teardown");
        assert_eq!(value["teardown_reason"], "rollback");
        assert_eq!(value["options"]["host"], "/src");
        assert_eq!(value["vm"]["vmm"], "qemu");
        let back: HookRequest = decode("request", &json).unwrap();
        assert_eq!(back, request());
    }

    #[test]
    fn response_round_trips_and_carries_version() {
        let resp = HookResponse {
            machine: MachineEdits {
                drives: vec![DriveEdit {
                    id: "d".into(),
                    host_path: "/img".into(),
                    read_only: true,
                }],
                boot_args: vec!["quiet".into()],
                pci_devices: vec![
                    PciDeviceEdit::Vfio {
                        address: "0000:01:00.0".parse().unwrap(),
                    },
                    PciDeviceEdit::Emulated {
                        model: "virtio-rng-pci".into(),
                    },
                ],
                remove_boot_args: vec!["pci".into()],
                nics: vec![NicEdit {
                    id: "n".into(),
                    tap: "bgp-n".into(),
                    mac: "02:00:00:00:00:01".into(),
                }],
            },
            guest: GuestEdits {
                mounts: vec![],
                files: vec![FileEdit {
                    path: "/etc/x".into(),
                    contents: b"\0bin\xff".to_vec(),
                    mode: 0o600,
                    uid: 1,
                    gid: 2,
                }],
                env: [("K".to_string(), "v".to_string())].into(),
                boot_commands: vec![vec!["true".into()]],
            },
            ..HookResponse::default()
        };
        let json = encode("response", &resp).unwrap();
        assert!(json.contains("\"v\":1"), "{json}");
        let back: HookResponse = decode("response", &json).unwrap();
        assert_eq!(back, resp);
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_ones_defaulted() {
        let json = r#"{"v":1,"hook":"prepare_host","future":{"x":1},
            "vm":{"id":"i","name":"n","vcpus":1,"memory_mib":256,"vm_dir":"/d","gpu":true}}"#;
        let req: HookRequest = decode("request", json).unwrap();
        assert_eq!(req.hook, HookName::PrepareHost);
        assert!(req.options.is_empty());
        assert!(!req.vm.booted_once);
        assert_eq!(req.teardown_reason, None);

        let json = r#"{"v":1,"machine":{"drives":[{"id":"a","host_path":"/a","cache":"none"}],"nics":[]},"later":[]}"#;
        let resp: HookResponse = decode("response", json).unwrap();
        assert_eq!(resp.machine.drives[0].id, "a");
        assert!(!resp.machine.drives[0].read_only);
        assert!(resp.guest.is_empty());
    }

    #[test]
    fn pci_addresses_are_domain_bus_device_function_in_hex() {
        let a: PciAddress = "0000:3B:1f.7".parse().unwrap();
        assert_eq!(a.as_str(), "0000:3b:1f.7");
        for bad in [
            "",
            "01:00.0",
            "0000:01:00",
            "0000:01:20.0",
            "0000:01:00.8",
            "000:01:00.0",
            "0000:1:00.0",
            "0000:01:00.0 ",
            "0000:0g:00.0",
            "0000:01:00.0.1",
            "+000:01:00.0",
        ] {
            let err = bad.parse::<PciAddress>().unwrap_err();
            assert!(err.to_string().contains("DDDD:BB:DD.F"), "{bad:?}: {err}");
        }
        let json = r#"{"v":1,"machine":{"pci_devices":[{"kind":"vfio","address":"0000:01:00"}]}}"#;
        let err = decode::<HookResponse>("response", json).unwrap_err();
        assert!(format!("{err:?}").contains("not a PCI address"), "{err:?}");
    }

    #[test]
    fn a_version_1_request_without_the_v2_fields_still_decodes() {
        // What an ABI 1 host sent: no vmm, no machine view.
        let json = r#"{"v":1,"hook":"configure_machine",
            "vm":{"id":"i","name":"n","vcpus":1,"memory_mib":256,"vm_dir":"/d"}}"#;
        let req: HookRequest = decode("request", json).unwrap();
        assert_eq!(req.vm.vmm, None);
        assert_eq!(req.machine, None);
        let json = r#"{"v":1,"hook":"prepare_host",
            "vm":{"id":"i","name":"n","vcpus":1,"memory_mib":256,"vm_dir":"/d","vmm":"cloud-hypervisor"}}"#;
        let req: HookRequest = decode("request", json).unwrap();
        assert_eq!(req.vm.vmm, Some(Backend::Unknown));
    }

    #[test]
    fn host_calls_are_tagged_by_op_and_manifests_default_to_empty() {
        let call = HostCall {
            v: WIRE_VERSION,
            request: HostRequest::RebindDriver {
                address: "0000:01:00.0".parse().unwrap(),
                driver: Some("nvidia".into()),
            },
        };
        let json = encode("host call", &call).unwrap();
        assert_eq!(
            json,
            r#"{"v":1,"op":"rebind_driver","address":"0000:01:00.0","driver":"nvidia"}"#
        );
        assert_eq!(decode::<HostCall>("host call", &json).unwrap(), call);
        let json = r#"{"v":1,"op":"remove_nat"}"#;
        let call: HostCall = decode("host call", json).unwrap();
        assert_eq!(call.request.op(), "remove_nat");
        // No driver: the device stays unbound.
        let json = r#"{"v":1,"op":"rebind_driver","address":"0000:01:00.1"}"#;
        let call: HostCall = decode("host call", json).unwrap();
        assert!(
            matches!(call.request, HostRequest::RebindDriver { driver: None, .. }),
            "{call:?}"
        );

        let m: Manifest = serde_json::from_str("{}").unwrap();
        assert_eq!(m, Manifest::default());
        let m: Manifest =
            serde_json::from_str(r#"{"requires":["network"],"backends":["qemu"]}"#).unwrap();
        assert_eq!(m.requires, ["network"]);
        assert_eq!(m.backends, [Backend::Qemu]);
    }

    #[test]
    fn unknown_or_missing_version_is_refused() {
        for json in [r#"{"v":2}"#, r#"{}"#] {
            let err = decode::<HookResponse>("response", json).unwrap_err();
            assert!(matches!(err, WireError::Version { .. }), "{json}: {err}");
        }
        let err = decode::<HookResponse>("response", "not json").unwrap_err();
        assert!(matches!(err, WireError::Decode { .. }));
    }
}
