//! The VM domain model: identifiers, validated inputs, the state machine and
//! the record the store persists.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::guest::GuestConfig;
use crate::machine::MachineSpec;

/// Errors from validating user-supplied model values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// A VM name that is empty, too long or has characters we do not allow.
    #[error(
        "Invalid VM name {0:?}: use 1-63 characters a-z, 0-9 and '-', starting with a letter or digit"
    )]
    InvalidName(String),
    /// A size string that does not parse or is zero.
    #[error(
        "Invalid size {0:?}: use a positive number with an optional K, M, G or T suffix (e.g. 8G)"
    )]
    InvalidSize(String),
    /// A vCPU count outside the supported range.
    #[error("Invalid vCPU count {0}: use a whole number from 1 to {max}", max = MAX_VCPUS)]
    InvalidVcpus(i64),
    /// A memory size outside the supported range.
    #[error("Invalid memory {0} MiB: use at least {min} MiB", min = MIN_MEMORY_MIB)]
    InvalidMemory(i64),
    /// More memory than the host has.
    #[error(
        "Invalid memory {mib} MiB: this host has {host_mib} MiB of physical memory (MemTotal in /proc/meminfo); ask for at most that, or pass --force-size to overcommit"
    )]
    MemoryOverHost {
        /// What was asked for.
        mib: i64,
        /// The host's total.
        host_mib: u64,
    },
    /// An unknown VM state string (store corruption or version skew).
    #[error("Unknown VM state {0:?}")]
    UnknownState(String),
    /// A capability choice that does not parse.
    #[error(
        "Invalid capability choice {0:?}: use NAME, NAME:key=value,... or -NAME (capability names are lowercase letters, digits and '-')"
    )]
    InvalidCapChoice(String),
}

/// Largest vCPU count Firecracker accepts.
pub const MAX_VCPUS: i64 = 32;
/// Smallest memory size a Linux guest can sensibly boot with.
pub const MIN_MEMORY_MIB: i64 = 128;

/// A VM's stable identifier: 16 lowercase hex characters, short enough to keep
/// Unix socket paths under the 108-byte limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(String);

impl VmId {
    /// A fresh random id.
    pub fn generate() -> Self {
        VmId(format!("{:016x}", rand::random::<u64>()))
    }

    /// Wraps an id read back from the store.
    pub fn from_stored(s: String) -> Self {
        VmId(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated VM name: it becomes a DNS label (`<name>.vm`) and a hostname,
/// so it follows RFC 1123 label rules, lowercase only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

impl VmName {
    /// Validates `s` as a VM name.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(VmName(s.to_string()))
        } else {
            Err(ModelError::InvalidName(s.to_string()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A friendly random name (`adjective-noun-NNNN`) for VMs created without one.
    pub fn generate() -> Self {
        const ADJ: &[&str] = &[
            "brisk", "calm", "eager", "fuzzy", "gentle", "happy", "jolly", "keen", "lucky",
            "mellow", "nimble", "quiet", "rapid", "sunny", "tidy", "witty",
        ];
        const NOUN: &[&str] = &[
            "otter", "falcon", "badger", "heron", "lynx", "marmot", "newt", "osprey", "puffin",
            "quokka", "raven", "stoat", "tapir", "vole", "wombat", "yak",
        ];
        let r: u64 = rand::random();
        let a = ADJ[(r % ADJ.len() as u64) as usize];
        let n = NOUN[((r >> 8) % NOUN.len() as u64) as usize];
        VmName(format!("{a}-{n}-{:04}", (r >> 16) % 10_000))
    }
}

impl TryFrom<String> for VmName {
    type Error = ModelError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        VmName::parse(&s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes that users write as `512M`, `8G`, `1073741824`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Mebibytes, rounded down.
    pub fn mib(self) -> u64 {
        self.0 / (1024 * 1024)
    }
}

impl FromStr for ByteSize {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::InvalidSize(s.to_string());
        let t = s.trim();
        let t = t
            .strip_suffix("iB")
            .or_else(|| t.strip_suffix('B'))
            .unwrap_or(t);
        let (digits, mult) = match t.chars().last() {
            Some(c) if c.is_ascii_alphabetic() => {
                let mult: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => return Err(bad()),
                };
                (&t[..t.len() - 1], mult)
            }
            _ => (t, 1),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let bytes = n.checked_mul(mult).ok_or_else(bad)?;
        if bytes == 0 {
            return Err(bad());
        }
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: &[(u64, &str)] = &[
            (1 << 40, "T"),
            (1 << 30, "G"),
            (1 << 20, "M"),
            (1 << 10, "K"),
        ];
        for (m, u) in UNITS {
            if self.0 >= *m && self.0 % m == 0 {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Validates a vCPU count from user input.
pub fn validate_vcpus(n: i64) -> Result<u32, ModelError> {
    if (1..=MAX_VCPUS).contains(&n) {
        Ok(n as u32)
    } else {
        Err(ModelError::InvalidVcpus(n))
    }
}

/// Validates a memory size in MiB from user input.
pub fn validate_memory_mib(n: i64) -> Result<u32, ModelError> {
    if n >= MIN_MEMORY_MIB && n <= u32::MAX as i64 {
        Ok(n as u32)
    } else {
        Err(ModelError::InvalidMemory(n))
    }
}

/// Validates a memory size in MiB for a VM on this host: the range of
/// [`validate_memory_mib`], and at most `host_mib` (see [`host_memory_mib`];
/// `None`, an unreadable `/proc/meminfo`, skips that check).
pub fn validate_memory_mib_on_host(n: i64, host_mib: Option<u64>) -> Result<u32, ModelError> {
    let mib = validate_memory_mib(n)?;
    match host_mib {
        Some(host_mib) if u64::from(mib) > host_mib => {
            Err(ModelError::MemoryOverHost { mib: n, host_mib })
        }
        _ => Ok(mib),
    }
}

/// This host's physical memory in MiB: `MemTotal` from `/proc/meminfo`.
pub fn host_memory_mib() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(kib / 1024)
}

/// Where a VM is in its life. Transitions are decided in `lifecycle`, never by
/// callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Recorded, never started.
    Created,
    /// Hooks and VMM launch in progress.
    Starting,
    /// VMM running and PostStart done.
    Running,
    /// Graceful stop in progress.
    Stopping,
    /// Not running; resources torn down; disks kept.
    Stopped,
    /// An operation failed; `VmRecord::last_error` says where and why.
    Error,
}

impl VmState {
    /// The stored/displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Error => "error",
        }
    }
}

impl FromStr for VmState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "created" => VmState::Created,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "stopping" => VmState::Stopping,
            "stopped" => VmState::Stopped,
            "error" => VmState::Error,
            other => return Err(ModelError::UnknownState(other.to_string())),
        })
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which VMM backend runs a VM. A VM's record always names one; the
/// `vmm = "auto"` setting is resolved before a VM exists
/// (`vmm::choice::VmmChoice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// Firecracker.
    Firecracker,
    /// QEMU's `microvm` machine (KVM or TCG); see `docs/vmm.md`.
    Qemu,
}

impl VmmKind {
    /// The stored/displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Firecracker => "firecracker",
            VmmKind::Qemu => "qemu",
        }
    }
}

/// Per-VM options for one capability, as `key=value` pairs in the order given.
pub type CapOptions = std::collections::BTreeMap<String, String>;

/// One enabled capability with its per-VM options.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnabledCap {
    /// Capability name (`work-disk`, `shared-mount`, ...).
    pub name: String,
    /// Per-VM options from `--cap NAME:key=value,...`.
    #[serde(default)]
    pub options: CapOptions,
}

/// One `--cap` argument: add (with options) or remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapChoice {
    /// `NAME` or `NAME:k=v,...`
    Add(EnabledCap),
    /// `-NAME`
    Remove(String),
}

fn valid_cap_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

impl FromStr for CapChoice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ModelError::InvalidCapChoice(s.to_string());
        if let Some(name) = s.strip_prefix('-') {
            return if valid_cap_name(name) {
                Ok(CapChoice::Remove(name.to_string()))
            } else {
                Err(bad())
            };
        }
        let (name, opts) = match s.split_once(':') {
            Some((n, o)) => (n, Some(o)),
            None => (s, None),
        };
        if !valid_cap_name(name) {
            return Err(bad());
        }
        let mut options = CapOptions::new();
        if let Some(opts) = opts {
            let mut last: Option<String> = None;
            for kv in opts.split(',') {
                let Some((k, v)) = kv.split_once('=') else {
                    // `k=a,b`: a piece without `=` continues the last value.
                    let k = last.as_ref().ok_or_else(bad)?;
                    let v = options.get_mut(k).ok_or_else(bad)?;
                    v.push(',');
                    v.push_str(kv);
                    continue;
                };
                if k.is_empty() {
                    return Err(bad());
                }
                options.insert(k.to_string(), v.to_string());
                last = Some(k.to_string());
            }
        }
        Ok(CapChoice::Add(EnabledCap {
            name: name.to_string(),
            options,
        }))
    }
}

/// Applies `--cap` choices, in order, to a default set. Adding a capability
/// that is already present replaces its options; removing one that is absent
/// is not an error (the user's intent, "not enabled", holds).
pub fn resolve_caps(defaults: &[EnabledCap], choices: &[CapChoice]) -> Vec<EnabledCap> {
    let mut out: Vec<EnabledCap> = defaults.to_vec();
    for c in choices {
        match c {
            CapChoice::Add(cap) => match out.iter_mut().find(|e| e.name == cap.name) {
                Some(existing) => existing.options = cap.options.clone(),
                None => out.push(cap.clone()),
            },
            CapChoice::Remove(name) => out.retain(|e| &e.name != name),
        }
    }
    out
}

/// What the user asked for when creating the VM; fixed unless changed with `vm set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Size of the work disk (`/root`).
    pub disk_size: ByteSize,
    /// Kernel image (uncompressed ELF `vmlinux` for Firecracker).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// The root image the VM's own root disk was cloned from (never written).
    pub rootfs_source: PathBuf,
    /// Extra kernel command line, appended to the backend's defaults.
    #[serde(default)]
    pub extra_boot_args: Option<String>,
    /// VMM backend.
    pub vmm: VmmKind,
}

/// The live VMM process of a running VM. `start_time` (clock ticks since boot,
/// from `/proc/PID/stat`) guards against pid reuse when we reattach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmProcess {
    /// Process id.
    pub pid: u32,
    /// Start time of the process in clock ticks since host boot.
    pub start_time: u64,
    /// The VMM's API socket.
    pub api_socket: PathBuf,
}

/// Why the last operation on a VM failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The stage that failed (`prepare_host:work-disk`, `launch_vmm`, ...).
    pub stage: String,
    /// The whole error chain, rendered.
    pub cause: String,
    /// Unix time of the failure.
    pub at: u64,
}

/// How long one stage of an operation took (`prepare_host:network`, 12).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTiming {
    /// The stage, as progress and failures name it.
    pub stage: String,
    /// Its duration in milliseconds.
    pub ms: u64,
}

/// The stages of a VM's last start (rollback included when it failed), in
/// order, with how long each took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartTimings {
    /// Unix time the start began.
    pub at: u64,
    /// Whether the VM reached `running`.
    pub ok: bool,
    /// The whole start in milliseconds: at least the sum of the stages.
    pub total_ms: u64,
    /// Every stage, in order.
    pub stages: Vec<StageTiming>,
}

/// Everything the daemon knows about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// Stable id; names the VM's directory.
    pub id: VmId,
    /// Unique, user-facing name.
    pub name: VmName,
    /// Current state.
    pub state: VmState,
    /// Requested shape.
    pub spec: VmSpec,
    /// Enabled capabilities, in hook order.
    pub caps: Vec<EnabledCap>,
    /// Capabilities whose PrepareHost ran and whose Teardown has not, in the
    /// order they were prepared. Persisted so a restarted daemon tears down
    /// exactly what was set up.
    pub prepared: Vec<String>,
    /// The VMM process while running.
    pub vmm: Option<VmmProcess>,
    /// The last failure, cleared by the next successful start.
    pub last_error: Option<Failure>,
    /// The machine spec of the last start, for inspection.
    pub machine: Option<MachineSpec>,
    /// The guest config bundle of the last start, for inspection.
    pub guest: Option<GuestConfig>,
    /// True once the VM has reached `running`; a VM that never ran has no user
    /// data, so rolling back its first start may delete its disks.
    pub booted_once: bool,
    /// Unix time of creation.
    pub created_at: u64,
    /// Unix time of the last change.
    pub updated_at: u64,
    /// The stage timings of the last start, once it has been started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_start: Option<StartTimings>,
}

impl VmRecord {
    /// A VM just created at `now`: a new id, state `created`, nothing
    /// prepared, never run.
    pub fn new(name: VmName, spec: VmSpec, caps: Vec<EnabledCap>, now: u64) -> VmRecord {
        VmRecord {
            id: VmId::generate(),
            name,
            state: VmState::Created,
            spec,
            caps,
            prepared: Vec::new(),
            vmm: None,
            last_error: None,
            machine: None,
            guest: None,
            booted_once: false,
            created_at: now,
            updated_at: now,
            last_start: None,
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_label_rules() {
        for ok in ["a", "dev-1", "x9", &"a".repeat(63)] {
            assert!(VmName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "../x",
            &"a".repeat(64),
            "a b",
        ] {
            assert_eq!(
                VmName::parse(bad),
                Err(ModelError::InvalidName(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn generated_names_are_valid() {
        for _ in 0..100 {
            let n = VmName::generate();
            assert!(VmName::parse(n.as_str()).is_ok(), "{n}");
        }
    }

    #[test]
    fn sizes_parse_with_suffixes_and_reject_garbage() {
        assert_eq!("8G".parse::<ByteSize>().unwrap().0, 8 << 30);
        assert_eq!("512M".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("2k".parse::<ByteSize>().unwrap().0, 2048);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        for bad in [
            "",
            "0",
            "0G",
            "-1G",
            "G",
            "1.5G",
            "8X",
            "abc",
            "99999999999999T",
        ] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_display_in_largest_exact_unit() {
        assert_eq!(ByteSize(8 << 30).to_string(), "8G");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn vcpu_and_memory_bounds() {
        assert!(validate_vcpus(0).is_err());
        assert!(validate_vcpus(-2).is_err());
        assert!(validate_vcpus(33).is_err());
        assert_eq!(validate_vcpus(4), Ok(4));
        assert!(validate_memory_mib(0).is_err());
        assert!(validate_memory_mib(127).is_err());
        assert_eq!(validate_memory_mib(1024), Ok(1024));
        assert_eq!(validate_memory_mib_on_host(1024, Some(1024)), Ok(1024));
        assert_eq!(validate_memory_mib_on_host(1 << 30, None), Ok(1 << 30));
        let err = validate_memory_mib_on_host(1025, Some(1024)).unwrap_err();
        assert_eq!(
            err,
            ModelError::MemoryOverHost {
                mib: 1025,
                host_mib: 1024
            }
        );
        assert!(err.to_string().contains("1025 MiB") && err.to_string().contains("1024 MiB"));
        assert!(validate_memory_mib_on_host(127, Some(1 << 20)).is_err());
        let meminfo = "MemTotal:       16318480 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(15936));
        assert_eq!(parse_mem_total("MemFree: 5 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: 5 MB\n"), None);
        let host = host_memory_mib().unwrap();
        assert!(host >= 128, "{host}");
    }

    #[test]
    fn cap_choices_parse() {
        assert_eq!(
            "work-disk".parse::<CapChoice>().unwrap(),
            CapChoice::Add(EnabledCap {
                name: "work-disk".into(),
                options: CapOptions::new()
            })
        );
        let CapChoice::Add(c) = "shared-mount:host=/src,guest=/mnt/src"
            .parse::<CapChoice>()
            .unwrap()
        else {
            panic!("expected add");
        };
        assert_eq!(c.options["host"], "/src");
        assert_eq!(c.options["guest"], "/mnt/src");
        let CapChoice::Add(c) = "nat:allow=10.1.0.0/16,192.0.2.7/32,x=1"
            .parse::<CapChoice>()
            .unwrap()
        else {
            panic!("expected add");
        };
        assert_eq!(c.options["allow"], "10.1.0.0/16,192.0.2.7/32");
        assert_eq!(c.options["x"], "1");
        assert_eq!(
            "-nat".parse::<CapChoice>().unwrap(),
            CapChoice::Remove("nat".into())
        );
        for bad in ["", "-", "Cap", "x:novalue", "x:=v", "../x", "-../x"] {
            assert!(bad.parse::<CapChoice>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cap_resolution_adds_replaces_and_removes_in_order() {
        let defaults = vec![EnabledCap {
            name: "work-disk".into(),
            options: CapOptions::new(),
        }];
        let choices: Vec<CapChoice> = [
            "shared-mount:host=/a",
            "-work-disk",
            "shared-mount:host=/b",
            "-absent",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let out = resolve_caps(&defaults, &choices);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "shared-mount");
        assert_eq!(out[0].options["host"], "/b");
    }
}

/// How a VM created from an image finds its kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageKernel {
    /// A local kernel by name (pulled from the kernel catalog on demand).
    Named {
        /// Kernel name (`banger kernel list`).
        name: String,
    },
    /// Explicit files (registered images).
    Files {
        /// Kernel image.
        kernel: PathBuf,
        /// Optional initrd.
        initrd: Option<PathBuf>,
    },
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageSource {
    /// Pulled from an OCI registry and flattened.
    Oci {
        /// The reference pulled.
        reference: String,
        /// The manifest digest.
        digest: String,
    },
    /// Downloaded as a bundle from the image catalog.
    Catalog {
        /// The catalog entry.
        name: String,
        /// The bundle URL.
        url: String,
    },
    /// Built on this host from one of banger's recipes.
    Built {
        /// The recipe (`debian-bookworm`).
        recipe: String,
        /// What it was built from (suite, mirror).
        from: String,
    },
    /// Registered in place: banger points at files it does not own.
    Registered,
    /// Copied into banger's state from an unmanaged image.
    Promoted {
        /// The file it was copied from.
        from: PathBuf,
    },
}

/// A root filesystem image VMs can be created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Unique name (`debian-bookworm`).
    pub name: String,
    /// The ext4 root image.
    pub rootfs: PathBuf,
    /// Its kernel.
    pub kernel: ImageKernel,
    /// Where it came from.
    pub source: ImageSource,
    /// True if banger owns the files (they live in its state dir and are
    /// removed with the image); false for registered images.
    pub managed: bool,
    /// Size of the rootfs file in bytes.
    pub size_bytes: u64,
    /// OCI layer digests it was built from (keeps them from being pruned).
    #[serde(default)]
    pub layers: Vec<String>,
    /// Unix time it was added.
    pub created_at: u64,
}

/// Validates the name of an image or kernel: 1-64 of `[a-z0-9._-]`,
/// starting with a letter or digit, so it is safe as a directory name.
pub fn validate_artifact_name(kind: &'static str, s: &str) -> Result<(), ArtifactNameError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        })
        && !s.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ArtifactNameError {
            kind,
            name: s.to_string(),
        })
    }
}

/// An image or kernel name that is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Invalid {kind} name {name:?}: use 1-64 characters a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
)]
pub struct ArtifactNameError {
    /// `image` or `kernel`.
    pub kind: &'static str,
    /// The name given.
    pub name: String,
}

#[cfg(test)]
mod artifact_tests {
    use super::*;

    #[test]
    fn artifact_names_are_safe_directory_names() {
        for ok in ["debian-bookworm", "fc-6.12_x86", "a"] {
            assert!(validate_artifact_name("image", ok).is_ok(), "{ok}");
        }
        for bad in ["", "../x", "a/b", "A", ".hidden", "a..b", &"a".repeat(65)] {
            assert!(validate_artifact_name("image", bad).is_err(), "{bad}");
        }
    }
}
