//! Which cgroup hierarchies this host has and where each per-VM limit
//! comes from: on a pure cgroup v2 host one directory carries everything; on
//! a hybrid host (cgroup v1 controllers plus a controller-less v2 `unified`
//! mount) the v2 directory gives membership, `cgroup.kill` and CPU time and
//! the v1 hierarchies the limits. Pure reading of `/proc/self/mounts`, so
//! `banger doctor` and the VMM backends (`banger_vmm::cgroup`, which creates
//! the directories) share one rule. See `docs/security.md`.

use std::fs;
use std::path::{Path, PathBuf};

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
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// 1 or 2.
    pub version: u8,
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
    pub fn from_mounts(mounts: &str, read_controllers: impl Fn(&Path) -> Option<String>) -> Self {
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

    /// This host with only its v2 hierarchy (for a VMM whose limits
    /// something else writes in v1: Firecracker's jailer).
    pub fn v2_only(&self) -> CgroupHost {
        CgroupHost {
            hierarchies: self.v2().cloned().into_iter().collect(),
        }
    }

    fn v2(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.version == 2)
    }

    /// Where each wanted controller is taken from: the v2 hierarchy when
    /// it offers it, else a v1 hierarchy. Controllers found nowhere are
    /// returned second.
    pub fn plan(&self) -> (Vec<(&Hierarchy, Vec<&'static str>)>, Vec<&'static str>) {
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
}
