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
}

/// Edits to the guest config bundle, returned by GuestConfig.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestEdits {
    /// Mounts to add, in order.
    pub mounts: Vec<MountEdit>,
    /// Files to write, in order.
    pub files: Vec<FileEdit>,
}

impl MachineEdits {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.drives.is_empty() && self.boot_args.is_empty() && self.pci_devices.is_empty()
    }
}

impl GuestEdits {
    /// True when there is nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.files.is_empty()
    }
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
            },
            options: [("host".to_string(), "/src".to_string())].into(),
            teardown_reason: Some(TeardownReason::Rollback),
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
    fn unknown_or_missing_version_is_refused() {
        for json in [r#"{"v":2}"#, r#"{}"#] {
            let err = decode::<HookResponse>("response", json).unwrap_err();
            assert!(matches!(err, WireError::Version { .. }), "{json}: {err}");
        }
        let err = decode::<HookResponse>("response", "not json").unwrap_err();
        assert!(matches!(err, WireError::Decode { .. }));
    }
}
