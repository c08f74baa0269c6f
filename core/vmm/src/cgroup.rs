//! One cgroup per VM: the VMM (and QEMU's vsock backend) run in
//! `<hierarchy>/banger/<vm-id>` with limits from the VM's shape, so `vm
//! stats` reads the VM's whole usage and kill leaves nothing behind.
//!
//! Hosts differ: on a pure cgroup v2 host one directory carries everything;
//! on a hybrid host (cgroup v1 controllers plus a controller-less v2
//! `unified` mount, as here) the v2 directory gives membership, `cgroup.kill`
//! and CPU time, and the v1 `cpu`, `cpuacct`, `memory` and `pids`
//! hierarchies give the limits. A limit whose controller exists nowhere is
//! skipped and named in [`VmCgroup::skipped`]. See `docs/security.md`.
//!
//! What was created is recorded in a small JSON file next to the VMM's API
//! socket ([`record_path`]), so stop, kill and stats find it again after a
//! daemon restart.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use serde::{Deserialize, Serialize};

use crate::{POLL, VmmError, io_err, pid_of};

/// The directory under each hierarchy's root that holds the VMs' cgroups.
pub const PARENT: &str = "banger";

/// Memory the VMM may use beyond the guest's RAM (device emulation, QEMU's
/// TCG translation cache, page cache of the disk images).
pub const MEMORY_OVERHEAD_MIB: u64 = 512;

/// Tasks (processes and threads) one VM's cgroup may hold: QEMU runs a
/// thread per vCPU plus a few dozen I/O and RCU threads.
pub const PIDS_MAX: u64 = 512;

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// The limits a VM's cgroup gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per [`CPU_PERIOD_US`]: one period per vCPU.
    pub cpu_quota_us: u64,
    /// Memory: the guest's RAM plus [`MEMORY_OVERHEAD_MIB`].
    pub memory_bytes: u64,
    /// [`PIDS_MAX`].
    pub pids: u64,
}

impl Limits {
    /// The limits for a machine of `vcpus` and `memory_mib`.
    pub fn for_shape(vcpus: u32, memory_mib: u32) -> Limits {
        Limits {
            cpu_quota_us: u64::from(vcpus.max(1)) * CPU_PERIOD_US,
            memory_bytes: (u64::from(memory_mib) + MEMORY_OVERHEAD_MIB) << 20,
            pids: PIDS_MAX,
        }
    }

    /// The cgroup v2 files and values (`cpu.max`, `memory.max`, `pids.max`).
    pub fn v2_files(&self) -> [(&'static str, &'static str, String); 3] {
        [
            (
                "cpu",
                "cpu.max",
                format!("{} {CPU_PERIOD_US}", self.cpu_quota_us),
            ),
            ("memory", "memory.max", self.memory_bytes.to_string()),
            ("pids", "pids.max", self.pids.to_string()),
        ]
    }

    /// The cgroup v1 files and values, in the order they must be written
    /// (the period before the quota).
    pub fn v1_files(&self) -> [(&'static str, &'static str, String); 4] {
        [
            ("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
            ("cpu", "cpu.cfs_quota_us", self.cpu_quota_us.to_string()),
            (
                "memory",
                "memory.limit_in_bytes",
                self.memory_bytes.to_string(),
            ),
            ("pids", "pids.max", self.pids.to_string()),
        ]
    }
}

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    /// 1 or 2.
    version: u8,
    /// The controllers it offers (v1: its mount options; v2: the root's
    /// `cgroup.controllers`).
    controllers: Vec<String>,
}

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupHost {
    hierarchies: Vec<Hierarchy>,
}

/// Controllers a VM's cgroup uses: the three limits and CPU accounting.
const WANTED: [&str; 4] = ["cpu", "cpuacct", "memory", "pids"];

impl CgroupHost {
    /// This host, from `/proc/self/mounts`.
    pub fn probe() -> CgroupHost {
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        CgroupHost::from_mounts(&mounts, |dir| {
            fs::read_to_string(dir.join("cgroup.controllers")).ok()
        })
    }

    /// The hierarchies in `mounts` (the `/proc/mounts` format); the v2
    /// controllers come from `read_controllers(mount)`.
    fn from_mounts(mounts: &str, read_controllers: impl Fn(&Path) -> Option<String>) -> Self {
        let mut hierarchies = Vec::new();
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, mount, fstype, options, ..] = f[..] else {
                continue;
            };
            let mount = PathBuf::from(mount);
            let (version, controllers): (u8, Vec<String>) = match fstype {
                "cgroup2" => (
                    2,
                    read_controllers(&mount)
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect(),
                ),
                "cgroup" => (
                    1,
                    options
                        .split(',')
                        .filter(|o| WANTED.contains(o))
                        .map(str::to_owned)
                        .collect(),
                ),
                _ => continue,
            };
            if version == 1 && controllers.is_empty() {
                continue;
            }
            hierarchies.push(Hierarchy {
                mount,
                version,
                controllers,
            });
        }
        CgroupHost { hierarchies }
    }

    fn v2(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.version == 2)
    }

    /// Where each wanted controller is taken from: the v2 hierarchy when
    /// it offers it, else a v1 hierarchy. Controllers found nowhere are
    /// returned second.
    fn plan(&self) -> (Vec<(&Hierarchy, Vec<&'static str>)>, Vec<&'static str>) {
        let mut plan: Vec<(&Hierarchy, Vec<&'static str>)> = Vec::new();
        // The v2 hierarchy is always used when mounted: membership,
        // cgroup.kill and cpu.stat work there without any controller.
        if let Some(v2) = self.v2() {
            plan.push((v2, Vec::new()));
        }
        let mut missing = Vec::new();
        for c in WANTED {
            // cpuacct is a v1 name: where v2 is mounted, its cpu.stat
            // counts the CPU time.
            if c == "cpuacct" && self.v2().is_some() {
                continue;
            }
            let from_v2 = self.v2().filter(|h| h.controllers.iter().any(|x| x == c));
            let found = from_v2.or_else(|| {
                self.hierarchies
                    .iter()
                    .find(|h| h.version == 1 && h.controllers.iter().any(|x| x == c))
            });
            match found {
                Some(h) => match plan.iter_mut().find(|(p, _)| p.mount == h.mount) {
                    Some((_, cs)) => cs.push(c),
                    None => plan.push((h, vec![c])),
                },
                None if c != "cpuacct" => missing.push(c),
                None => {}
            }
        }
        (plan, missing)
    }

    /// One line saying where the limits come from, or what is missing
    /// (`banger doctor` prints it).
    pub fn describe(&self) -> Result<String, String> {
        let (plan, missing) = self.plan();
        if plan.is_empty() {
            return Err("no cgroup hierarchy is mounted: VMMs run without limits and kill falls back to the VMM's pid".to_string());
        }
        let used: Vec<String> = plan
            .iter()
            .map(|(h, cs)| {
                let what = if cs.is_empty() {
                    "membership, kill, cpu.stat".to_string()
                } else {
                    cs.join(",")
                };
                format!("v{} {} ({what})", h.version, h.mount.display())
            })
            .collect();
        if missing.is_empty() {
            Ok(used.join("; "))
        } else {
            Err(format!(
                "no cgroup hierarchy offers {}: VMMs run without that limit (using {})",
                missing.join(", "),
                used.join("; ")
            ))
        }
    }

    /// Which cgroup version and limit files Firecracker's jailer should
    /// write: v2 when this host's v2 hierarchy offers every limit, else v1.
    pub fn jailer_files(&self, limits: &Limits) -> (u8, Vec<(String, String)>) {
        let v2_has_all = self.v2().is_some_and(|h| {
            ["cpu", "memory", "pids"]
                .iter()
                .all(|c| h.controllers.iter().any(|x| x == c))
        });
        if v2_has_all {
            let files = limits
                .v2_files()
                .into_iter()
                .map(|(_, f, v)| (f.to_string(), v))
                .collect();
            return (2, files);
        }
        let files = limits
            .v1_files()
            .into_iter()
            .filter(|(c, _, _)| {
                self.hierarchies
                    .iter()
                    .any(|h| h.version == 1 && h.controllers.iter().any(|x| x == c))
            })
            .map(|(_, f, v)| (f.to_string(), v))
            .collect();
        (1, files)
    }

    /// The hierarchies (and their controllers) the jailer writes `files`
    /// in, for cgroup `version`.
    pub fn mounts_for(
        &self,
        version: u8,
        files: &[(String, String)],
    ) -> Vec<(PathBuf, Vec<String>)> {
        let mut out: Vec<(PathBuf, Vec<String>)> = Vec::new();
        for (file, _) in files {
            let controller = file.split('.').next().unwrap_or_default().to_string();
            let found = self
                .hierarchies
                .iter()
                .find(|h| h.version == version && h.controllers.contains(&controller));
            let Some(h) = found else { continue };
            match out.iter_mut().find(|(m, _)| *m == h.mount) {
                Some((_, cs)) if !cs.contains(&controller) => cs.push(controller),
                Some(_) => {}
                None => out.push((h.mount.clone(), vec![controller])),
            }
        }
        out
    }

    /// Creates only the v2 directory (membership, `cgroup.kill`,
    /// `cpu.stat`) for `name`, for a VMM whose limits something else
    /// writes in the v1 hierarchies (Firecracker's jailer).
    pub fn create_membership(&self, name: &str) -> Result<VmCgroup, VmmError> {
        let v2_only = CgroupHost {
            hierarchies: self.v2().cloned().into_iter().collect(),
        };
        let mut cg = v2_only.create(name, &Limits::for_shape(1, 0))?;
        for d in &mut cg.dirs {
            d.controllers.clear();
        }
        cg.skipped.clear();
        Ok(cg)
    }

    /// Creates `<hierarchy>/banger/<name>` in every hierarchy of the plan
    /// and writes `limits` there. A leftover cgroup of the same name with
    /// live processes in it is refused (the VM is still running).
    pub fn create(&self, name: &str, limits: &Limits) -> Result<VmCgroup, VmmError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(VmmError::Unsupported(format!(
                "{name:?} cannot name a cgroup: use letters, digits, '-' and '_'"
            )));
        }
        let (plan, missing) = self.plan();
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            skipped: missing.iter().map(|s| s.to_string()).collect(),
        };
        for (h, controllers) in plan {
            let parent = h.mount.join(PARENT);
            let dir = parent.join(name);
            if h.version == 2 {
                enable_controllers(&h.mount, &parent, &controllers)?;
            } else {
                mkdir(&parent)?;
            }
            mkdir(&dir)?;
            let d = CgroupDir {
                path: dir,
                version: h.version,
                controllers: controllers.iter().map(|c| c.to_string()).collect(),
            };
            cg.dirs.push(d);
        }
        if let Some(pid) = cg.procs().first() {
            return Err(VmmError::NotReady(format!(
                "cgroup {} still holds pid {pid}: the VM's previous VMM is running; stop it with `banger vm kill`",
                cg.dirs[0].path.display()
            )));
        }
        if let Err(e) = cg.write_limits(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }
}

/// Turns on `controllers` for children of the v2 root and of `parent`.
fn enable_controllers(root: &Path, parent: &Path, controllers: &[&str]) -> Result<(), VmmError> {
    mkdir(parent)?;
    let v2: Vec<&&str> = controllers.iter().filter(|c| **c != "cpuacct").collect();
    if v2.is_empty() {
        return Ok(());
    }
    let line: String = v2.iter().map(|c| format!("+{c} ")).collect();
    for dir in [root, parent] {
        write(&dir.join("cgroup.subtree_control"), line.trim_end())?;
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<(), VmmError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err(format!("creating cgroup {}", dir.display()), e)),
    }
}

fn write(file: &Path, value: &str) -> Result<(), VmmError> {
    fs::write(file, value)
        .map_err(|e| io_err(format!("writing {value:?} to {}", file.display()), e))
}

/// One directory of a VM's cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    /// `<mount>/banger/<vm-id>`.
    pub path: PathBuf,
    /// 1 or 2.
    pub version: u8,
    /// The controllers used from this hierarchy.
    pub controllers: Vec<String>,
}

/// A VM's cgroup: one directory per hierarchy used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCgroup {
    /// The directories, the v2 one first when there is one.
    pub dirs: Vec<CgroupDir>,
    /// Limits no hierarchy could enforce (`memory`, ...).
    pub skipped: Vec<String>,
}

/// What a VM's cgroup has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// CPU time of every process in it, in microseconds.
    pub cpu_usec: Option<u64>,
    /// Memory charged to it, in bytes.
    pub memory_bytes: Option<u64>,
}

/// Where the cgroup record of the VMM with API socket `api_socket` lives.
pub fn record_path(api_socket: &Path) -> PathBuf {
    let mut s = api_socket.as_os_str().to_owned();
    s.push(".cgroup.json");
    PathBuf::from(s)
}

impl VmCgroup {
    fn dir_with(&self, controller: &str) -> Option<&CgroupDir> {
        self.dirs
            .iter()
            .find(|d| d.controllers.iter().any(|c| c == controller))
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), VmmError> {
        for d in &self.dirs {
            if d.version == 2 {
                for (c, file, value) in limits.v2_files() {
                    if d.controllers.iter().any(|x| x == c) {
                        write(&d.path.join(file), &value)?;
                    }
                }
            } else {
                for (c, file, value) in limits.v1_files() {
                    if d.controllers.iter().any(|x| x == c) {
                        write(&d.path.join(file), &value)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes the command's process join every directory before it execs
    /// (writing `0` to `cgroup.procs` moves the writer), so nothing it
    /// starts runs outside. Registered before any uid change. Directories
    /// that do not exist yet are left out.
    pub fn join_on_exec(&self, cmd: &mut Command) {
        let files: Vec<CString> = self
            .dirs
            .iter()
            // Directories the jailer makes later are its to join.
            .map(|d| d.path.join("cgroup.procs"))
            .filter(|f| f.exists())
            .filter_map(|f| CString::new(f.as_os_str().as_bytes()).ok())
            .collect();
        // SAFETY: the closure runs in the forked child before exec and only
        // makes open(2), write(2) and close(2) calls on paths built before
        // the fork; it allocates nothing.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                use nix::fcntl::{OFlag, open};
                use nix::sys::stat::Mode;
                for f in &files {
                    let fd = open(
                        f.as_c_str(),
                        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io::Error::from)?;
                    nix::unistd::write(&fd, b"0").map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
    }

    /// The pids in the cgroup (from its first directory, which every member
    /// joined).
    pub fn procs(&self) -> Vec<u32> {
        let Some(d) = self.dirs.first() else {
            return Vec::new();
        };
        fs::read_to_string(d.path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// CPU time and memory of the whole cgroup.
    pub fn usage(&self) -> Usage {
        let read = |p: PathBuf| fs::read_to_string(p).ok();
        let v2 = self.dirs.iter().find(|d| d.version == 2);
        let cpu_usec = v2
            .and_then(|d| read(d.path.join("cpu.stat")))
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .or_else(|| {
                let d = self.dir_with("cpuacct")?;
                let ns: u64 = read(d.path.join("cpuacct.usage"))?.trim().parse().ok()?;
                Some(ns / 1000)
            });
        let memory_bytes = self.dir_with("memory").and_then(|d| {
            let file = if d.version == 2 {
                "memory.current"
            } else {
                "memory.usage_in_bytes"
            };
            read(d.path.join(file))?.trim().parse().ok()
        });
        Usage {
            cpu_usec,
            memory_bytes,
        }
    }

    /// Kills every process in the cgroup (`cgroup.kill` where the kernel
    /// has it, else SIGKILL to each member until none is left) and waits
    /// until it is empty.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), VmmError> {
        let killer = self
            .dirs
            .iter()
            .find(|d| d.version == 2)
            .map(|d| d.path.join("cgroup.kill"))
            .filter(|f| f.exists());
        let deadline = Instant::now() + timeout;
        let mut first = true;
        loop {
            let procs = self.procs();
            if procs.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io_err(
                    format!("emptying cgroup {}", self.dirs[0].path.display()),
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("pids {procs:?} still alive after {timeout:?}"),
                    ),
                ));
            }
            match &killer {
                Some(f) if first => write(f, "1")?,
                Some(_) => {}
                // A member may fork while we kill: go round until empty.
                None => {
                    for pid in procs {
                        let _ = kill(pid_of(pid), Signal::SIGKILL);
                    }
                }
            }
            first = false;
            std::thread::sleep(POLL);
        }
    }

    /// Removes the cgroup's directories (empty ones only; the kernel
    /// refuses the rest). Logs what it could not remove.
    pub fn remove(&self) {
        for d in &self.dirs {
            // Right after the last member exits the kernel may still count
            // it for a moment.
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                match fs::remove_dir(&d.path) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if Instant::now() < deadline && e.raw_os_error() == Some(libc_ebusy()) =>
                    {
                        std::thread::sleep(POLL);
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %d.path.display(), error = %e, "Failed to remove a VM's cgroup");
                        break;
                    }
                }
            }
        }
    }

    /// Saves the record at `path` (staged, then renamed).
    pub fn save(&self, path: &Path) -> Result<(), VmmError> {
        write_json(path, self)
    }

    /// The record at `path`, `None` when there is none or it is unreadable.
    pub fn load(path: &Path) -> Option<VmCgroup> {
        let text = fs::read(path).ok()?;
        match serde_json::from_slice(&text) {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Ignoring a corrupt cgroup record");
                None
            }
        }
    }
}

/// Writes `value` as JSON to `path` by staging and renaming.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), VmmError> {
    use std::io::Write as _;
    let mut staged = path.as_os_str().to_owned();
    staged.push(".tmp");
    let staged = PathBuf::from(staged);
    let write = || -> io::Result<()> {
        let mut f = fs::File::create(&staged)?;
        f.write_all(&serde_json::to_vec(value).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&staged, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&staged);
        io_err(format!("writing {}", path.display()), e)
    })
}

fn libc_ebusy() -> i32 {
    nix::errno::Errno::EBUSY as i32
}

/// The usage of the cgroup recorded for the VMM with API socket
/// `api_socket`, when it has one.
pub fn usage_of(api_socket: &Path) -> Option<Usage> {
    VmCgroup::load(&record_path(api_socket)).map(|cg| cg.usage())
}

/// Kills and removes the cgroup recorded for the VMM with API socket
/// `api_socket`, if any, and its record.
pub fn kill_recorded(api_socket: &Path, timeout: Duration) -> Result<(), VmmError> {
    let record = record_path(api_socket);
    if let Some(cg) = VmCgroup::load(&record) {
        cg.kill_all(timeout)?;
        cg.remove();
    }
    crate::remove_socket(&record)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    fn hybrid() -> CgroupHost {
        CgroupHost::from_mounts(HYBRID, |_| Some("hugetlb\n".into()))
    }

    #[test]
    fn limits_follow_the_machine_shape() {
        let l = Limits::for_shape(2, 1024);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.memory_bytes, (1024 + 512) * 1024 * 1024);
        let v2: Vec<(&str, String)> = l.v2_files().into_iter().map(|(_, f, v)| (f, v)).collect();
        assert_eq!(
            v2,
            [
                ("cpu.max", "200000 100000".to_string()),
                ("memory.max", "1610612736".to_string()),
                ("pids.max", "512".to_string()),
            ]
        );
    }

    #[test]
    fn a_hybrid_host_takes_membership_from_v2_and_limits_from_v1() {
        let h = hybrid();
        let (plan, missing) = h.plan();
        let got: Vec<(String, Vec<&str>)> = plan
            .iter()
            .map(|(h, cs)| (h.mount.display().to_string(), cs.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("/sys/fs/cgroup/unified".to_string(), vec![]),
                ("/sys/fs/cgroup/cpu".to_string(), vec!["cpu"]),
                ("/sys/fs/cgroup/memory".to_string(), vec!["memory"]),
                ("/sys/fs/cgroup/pids".to_string(), vec!["pids"]),
            ]
        );
        assert!(missing.is_empty());
        let (version, files) = h.jailer_files(&Limits::for_shape(1, 128));
        assert_eq!(version, 1);
        assert_eq!(files[0], ("cpu.cfs_period_us".into(), "100000".into()));
        assert_eq!(files[1], ("cpu.cfs_quota_us".into(), "100000".into()));
    }

    #[test]
    fn a_pure_v2_host_uses_one_directory_and_the_jailer_gets_v2() {
        let h = CgroupHost::from_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", |_| {
            Some("cpuset cpu io memory pids\n".into())
        });
        let (plan, missing) = h.plan();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].1, ["cpu", "memory", "pids"]);
        assert!(missing.is_empty());
        assert_eq!(h.jailer_files(&Limits::for_shape(1, 128)).0, 2);
        assert!(h.describe().is_ok());
    }

    #[test]
    fn a_host_without_memory_controller_says_which_limit_is_skipped() {
        let h = CgroupHost::from_mounts("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n", |_| {
            Some("cpu pids\n".into())
        });
        let (_, missing) = h.plan();
        assert_eq!(missing, ["memory"]);
        let msg = h.describe().unwrap_err();
        assert!(msg.contains("no cgroup hierarchy offers memory"), "{msg}");
        assert!(CgroupHost::default().describe().is_err());
    }

    #[test]
    fn refuses_names_that_would_leave_the_parent() {
        let err = hybrid()
            .create("../x", &Limits::for_shape(1, 1))
            .unwrap_err();
        assert!(err.to_string().contains("cannot name a cgroup"), "{err}");
    }

    /// A real cgroup on this host: limits written, a child placed before
    /// exec, usage read, everything killed and the directories removed.
    #[test]
    fn a_real_cgroup_holds_limits_members_and_kills_them_all() {
        let host = CgroupHost::probe();
        if host.plan().0.is_empty() || !nix::unistd::Uid::effective().is_root() {
            eprintln!(
                "SKIP a_real_cgroup_holds_limits_members_and_kills_them_all: needs root and a cgroup mount"
            );
            return;
        }
        let name = format!("test-{}", std::process::id());
        let limits = Limits::for_shape(1, 64);
        let cg = host.create(&name, &limits).unwrap();
        let mut cmd = Command::new("sh");
        // The shell forks a child: both must be killed.
        cmd.args(["-c", "sleep 600 & exec sleep 600"]);
        cg.join_on_exec(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while cg.procs().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        assert_eq!(cg.procs().len(), 2, "{:?}", cg.procs());
        assert!(cg.procs().contains(&child.id()));
        for d in &cg.dirs {
            if d.controllers.iter().any(|c| c == "memory") {
                let file = if d.version == 2 {
                    "memory.max"
                } else {
                    "memory.limit_in_bytes"
                };
                let v = fs::read_to_string(d.path.join(file)).unwrap();
                assert_eq!(v.trim(), limits.memory_bytes.to_string());
            }
            if d.controllers.iter().any(|c| c == "pids") {
                let v = fs::read_to_string(d.path.join("pids.max")).unwrap();
                assert_eq!(v.trim(), "512");
            }
        }
        let usage = cg.usage();
        assert!(usage.cpu_usec.is_some(), "{usage:?}");
        // A second VMM for the same VM is refused while the first runs.
        let again = host.create(&name, &limits).unwrap_err();
        assert!(again.to_string().contains("still holds pid"), "{again}");

        let record = tempfile::tempdir().unwrap();
        let sock = record.path().join("vm.sock");
        cg.save(&record_path(&sock)).unwrap();
        kill_recorded(&sock, Duration::from_secs(5)).unwrap();
        assert!(!child.wait().unwrap().success());
        assert!(cg.procs().is_empty());
        for d in &cg.dirs {
            assert!(!d.path.exists(), "{} left behind", d.path.display());
        }
        assert!(!record_path(&sock).exists());
    }
}
