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

pub use banger_api::cgroups::{CgroupHost, Limits, MEMORY_OVERHEAD_MIB, PARENT, PIDS_MAX};

use crate::{POLL, VmmError, io_err, pid_of};

/// Creates only the v2 directory (membership, `cgroup.kill`,
/// `cpu.stat`) for `name`, for a VMM whose limits something else
/// writes in the v1 hierarchies (Firecracker's jailer).
pub fn create_membership(host: &CgroupHost, name: &str) -> Result<VmCgroup, VmmError> {
    let mut cg = create(&host.v2_only(), name, &Limits::for_shape(1, 0))?;
    for d in &mut cg.dirs {
        d.controllers.clear();
    }
    cg.skipped.clear();
    Ok(cg)
}

/// Creates `<hierarchy>/banger/<name>` in every hierarchy of the plan
/// and writes `limits` there. A leftover cgroup of the same name with
/// live processes in it is refused (the VM is still running).
pub fn create(host: &CgroupHost, name: &str, limits: &Limits) -> Result<VmCgroup, VmmError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(VmmError::Unsupported(format!(
            "{name:?} cannot name a cgroup: use letters, digits, '-' and '_'"
        )));
    }
    let (plan, missing) = host.plan();
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

    #[test]
    fn refuses_names_that_would_leave_the_parent() {
        let err = create(&CgroupHost::default(), "../x", &Limits::for_shape(1, 1)).unwrap_err();
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
        let cg = create(&host, &name, &limits).unwrap();
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
        let again = create(&host, &name, &limits).unwrap_err();
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
