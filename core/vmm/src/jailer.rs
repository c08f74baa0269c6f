//! Firecracker under its jailer: the jailer chroots into
//! `<vm-dir>/jail/firecracker/<vm-id>/root`, puts the VMM in the VM's
//! cgroup with limits from its shape, and execs firecracker as the VM's own
//! uid/gid. Everything firecracker opens is placed in that root first:
//! hard links (the VM directory and the root are on one filesystem), a copy
//! for shared read-only files others cannot read, or a bind mount for a
//! writable drive on another filesystem. The host reaches the API and vsock
//! sockets inside the root through symlinks at the usual paths, which keeps
//! the paths the daemon connects to short (Unix socket paths are < 108
//! bytes). See `docs/security.md`.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use banger_api::machine::MachineSpec;

use crate::cgroup::{CgroupDir, CgroupHost, Limits, PARENT, VmCgroup, record_path};
use crate::{LaunchPaths, VmmError, io_err, remove_socket};

/// The API socket, inside the root.
pub const API_SOCKET: &str = "/run/firecracker.socket";
/// Firecracker's log, inside the root (a hard link of the VM's log).
pub const LOG: &str = "/firecracker.log";
/// The vsock socket, inside the root.
pub const VSOCK: &str = "/vsock/v.sock";

/// One jailed launch, ready to spawn.
#[derive(Debug)]
pub struct Jailed {
    /// The jailer's arguments.
    pub args: Vec<OsString>,
    /// The machine with every path as firecracker sees it in its root.
    pub machine: MachineSpec,
    /// The chroot.
    pub root: PathBuf,
    /// The VM's cgroup as recorded (the jailer creates the limit
    /// directories; a v2 membership directory, if any, is ours to join).
    pub cgroup: Option<VmCgroup>,
}

/// Where the jailer builds the VM's chroots.
pub fn chroot_base(paths: &LaunchPaths) -> PathBuf {
    paths.vm_dir.join("jail")
}

/// The jailer's arguments: no `--netns` (the tap lives in the host's
/// namespace, on the bridge), no `--daemonize` (the backend puts it in its
/// own session and keeps its stdout for the serial console).
pub fn args(
    id: &str,
    firecracker: &Path,
    uid: u32,
    chroot_base: &Path,
    cgroup_version: u8,
    cgroup_files: &[(String, String)],
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |k: &str, v: OsString| {
        a.push(k.into());
        a.push(v);
    };
    push("--id", id.into());
    push("--exec-file", firecracker.into());
    push("--uid", uid.to_string().into());
    push("--gid", uid.to_string().into());
    push("--chroot-base-dir", chroot_base.into());
    push("--cgroup-version", cgroup_version.to_string().into());
    push("--parent-cgroup", PARENT.into());
    for (file, value) in cgroup_files {
        push("--cgroup", format!("{file}={value}").into());
    }
    a.push("--".into());
    a.push("--api-sock".into());
    a.push(API_SOCKET.into());
    a
}

/// Builds the chroot for `machine`, places its files, links the host-side
/// sockets and records the cgroup; returns what to spawn.
pub fn prepare(
    firecracker: &Path,
    uid: u32,
    id: &str,
    machine: &MachineSpec,
    paths: &LaunchPaths,
    cgroups: bool,
) -> Result<Jailed, VmmError> {
    let exec_name = firecracker
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".to_string());
    let base = chroot_base(paths);
    let root = base.join(&exec_name).join(id).join("root");
    clear(&base)?;
    for (dir, owner) in [
        (root.clone(), None),
        (root.join("drives"), None),
        (root.join("run"), Some(uid)),
        (root.join("vsock"), Some(uid)),
    ] {
        fs::create_dir_all(&dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
        if let Some(uid) = owner {
            chown(&dir, uid)?;
        }
    }
    for nic in &machine.nics {
        hand_tap(&nic.tap, uid)?;
    }
    let mut jailed = machine.clone();
    jailed.kernel = place(&machine.kernel, &root, "kernel", uid, false)?;
    if let Some(initrd) = &machine.initrd {
        jailed.initrd = Some(place(initrd, &root, "initrd", uid, false)?);
    }
    for (d, j) in machine.drives.iter().zip(jailed.drives.iter_mut()) {
        j.path = place(
            &d.path,
            &root,
            &format!("drives/{}", d.id),
            uid,
            !d.read_only,
        )?;
    }
    place(
        &paths.vmm_log,
        &root,
        LOG.trim_start_matches('/'),
        uid,
        true,
    )?;
    link_socket(&paths.api_socket, &inside(&root, API_SOCKET))?;
    if let (Some(v), Some(j)) = (&machine.vsock, jailed.vsock.as_mut()) {
        link_socket(&v.uds_path, &inside(&root, VSOCK))?;
        j.uds_path = VSOCK.into();
        // The guest agent's announcement reaches `<uds>_1025` as Firecracker
        // sees it, inside the root: the daemon's listener goes there too,
        // owned by the VM's uid so Firecracker may connect to it.
        let ready = crate::vsock::ready_socket_path(&v.uds_path);
        if fs::symlink_metadata(&ready).is_ok_and(|m| m.file_type().is_socket()) {
            let name = crate::vsock::ready_socket_path(Path::new(VSOCK));
            let name = name.to_string_lossy();
            place(&ready, &root, name.trim_start_matches('/'), uid, true)?;
        }
    }
    let limits = Limits::for_shape(machine.vcpus, machine.memory_mib);
    let host = CgroupHost::probe();
    let (version, files) = host.jailer_files(&limits);
    let cgroup = if cgroups {
        Some(record_cgroup(&host, id, version, &files, paths)?)
    } else {
        None
    };
    let files = if cgroups { files } else { Vec::new() };
    Ok(Jailed {
        args: args(id, firecracker, uid, &base, version, &files),
        machine: jailed,
        root,
        cgroup,
    })
}

/// The cgroup record for a jailed VM: the jailer makes
/// `<mount>/banger/<id>` in the hierarchies whose files it writes; on a
/// hybrid host we add (and join) the v2 directory for `cgroup.kill`.
fn record_cgroup(
    host: &CgroupHost,
    id: &str,
    version: u8,
    files: &[(String, String)],
    paths: &LaunchPaths,
) -> Result<VmCgroup, VmmError> {
    let mut cg = if version == 1 {
        crate::cgroup::create_membership(host, id)?
    } else {
        VmCgroup {
            dirs: Vec::new(),
            skipped: Vec::new(),
        }
    };
    for (mount, controllers) in host.mounts_for(version, files) {
        cg.dirs.push(CgroupDir {
            path: mount.join(PARENT).join(id),
            version,
            controllers,
        });
    }
    cg.save(&record_path(&paths.api_socket))?;
    Ok(cg)
}

/// `path` (absolute, as firecracker sees it) on the host.
fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Puts `src` at `<root>/<name>` and returns its path inside the root.
/// Writable files become the VM uid's; a read-only file is linked when
/// anyone may read it, else copied for the VM uid alone.
pub(crate) fn place(
    src: &Path,
    root: &Path,
    name: &str,
    uid: u32,
    writable: bool,
) -> Result<PathBuf, VmmError> {
    let dst = root.join(name);
    let meta = fs::metadata(src).map_err(|e| io_err(format!("reading {}", src.display()), e))?;
    let world_readable = meta.permissions().mode() & 0o004 != 0;
    if writable || world_readable {
        match fs::hard_link(src, &dst) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices && writable => bind(src, &dst)?,
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => copy(src, &dst)?,
            Err(e) => {
                return Err(io_err(
                    format!("linking {} into {}", src.display(), root.display()),
                    e,
                ));
            }
        }
    } else {
        copy(src, &dst)?;
    }
    if writable || !world_readable {
        chown(&dst, uid)?;
    }
    Ok(PathBuf::from("/").join(name))
}

fn copy(src: &Path, dst: &Path) -> Result<(), VmmError> {
    fs::copy(src, dst)
        .map(drop)
        .map_err(|e| io_err(format!("copying {} to {}", src.display(), dst.display()), e))
}

fn bind(src: &Path, dst: &Path) -> Result<(), VmmError> {
    use nix::mount::{MsFlags, mount};
    fs::File::create(dst).map_err(|e| io_err(format!("creating {}", dst.display()), e))?;
    mount(Some(src), dst, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| {
        io_err(
            format!("bind-mounting {} on {}", src.display(), dst.display()),
            io::Error::from(e),
        )
    })
}

fn chown(path: &Path, uid: u32) -> Result<(), VmmError> {
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .map_err(|e| io_err(format!("handing {} to uid {uid}", path.display()), e))
}

nix::ioctl_write_int!(tun_set_iff, b'T', 202);
nix::ioctl_write_int!(tun_set_owner, b'T', 204);

/// `struct ifreq` as `TUNSETIFF` reads it.
#[repr(C)]
struct IfReq {
    name: [u8; nix::libc::IFNAMSIZ],
    flags: nix::libc::c_short,
    _pad: [u8; 22],
}

/// Makes the persistent tap `name` the VM uid's (`TUNSETOWNER`), so the
/// jailed firecracker, running as that uid, may open it by name. Root
/// attaches to the existing tap with the flags the network capability
/// created it with (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and re-sets its
/// owner; the tap stays persistent when the descriptor closes. A tap that
/// does not exist is left to firecracker, whose `PUT /network-interfaces`
/// names it. The pool gives the tap back to the daemon's user when the VM
/// returns it (see `capabilities/src/network/taps.rs`). The same ioctls
/// as `banger_host`'s `create_tap`, which this crate may not link.
#[allow(unsafe_code)]
pub fn hand_tap(name: &str, uid: u32) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    const IFF_TAP: nix::libc::c_short = 0x0002;
    const IFF_NO_PI: nix::libc::c_short = 0x1000;
    const IFF_VNET_HDR: nix::libc::c_short = 0x4000;
    if name.is_empty() || name.len() >= nix::libc::IFNAMSIZ || name.contains(['/', '\0']) {
        return Err(io_err(
            format!("handing tap {name:?} to uid {uid}"),
            io::Error::new(io::ErrorKind::InvalidInput, "not a valid interface name"),
        ));
    }
    // By index, not /sys/class/net, which shows the namespace sysfs was
    // mounted in rather than ours.
    if nix::net::if_::if_nametoindex(name).is_err() {
        tracing::warn!("tap {name} does not exist; firecracker will fail to open it");
        return Ok(());
    }
    let what = || format!("handing tap {name} to uid {uid} (TUNSETOWNER)");
    let tun = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| io_err(what(), e))?;
    let mut req = IfReq {
        name: [0; nix::libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `req` a
    // NUL-terminated `struct ifreq` that outlives the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &mut req as *mut IfReq as u64) }
        .map_err(|e| io_err(what(), io::Error::from(e)))?;
    // SAFETY: `tun` is attached to the tap; the ioctl takes an integer.
    unsafe { tun_set_owner(tun.as_raw_fd(), u64::from(uid)) }
        .map_err(|e| io_err(what(), io::Error::from(e)))?;
    Ok(())
}

/// Replaces whatever is at `host` with a symlink to `target`.
fn link_socket(host: &Path, target: &Path) -> Result<(), VmmError> {
    remove_socket(host)?;
    if let Some(dir) = host.parent() {
        fs::create_dir_all(dir).map_err(|e| io_err(format!("creating {}", dir.display()), e))?;
    }
    symlink(target, host).map_err(|e| io_err(format!("linking {}", host.display()), e))
}

/// Removes a jail tree left by an earlier run, unmounting any bind mount
/// in it first so nothing outside is removed through it.
pub fn clear(base: &Path) -> Result<(), VmmError> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if Path::new(m).starts_with(base) {
            nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| io_err(format!("unmounting {m}"), io::Error::from(e)))?;
        }
    }
    // A hard link is removed, never what it points at; bind mounts are
    // gone by now, and remove_dir_all does not follow symlinks.
    match fs::remove_dir_all(base) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", base.display()), e))
        }
        _ => Ok(()),
    }
}

/// After the VMM is gone: the jail of the VMM whose API socket is
/// `api_socket`, found through its symlink, is removed.
pub fn clear_for(api_socket: &Path) -> Result<(), VmmError> {
    let Ok(target) = fs::read_link(api_socket) else {
        return Ok(());
    };
    // <vm-dir>/jail/<exec>/<id>/root/run/firecracker.socket
    let base = target.ancestors().nth(5).filter(|b| b.ends_with("jail"));
    match base {
        Some(b) => clear(b),
        None => Ok(()),
    }
}

/// Whether a file is owned by `uid` (tests and doctor).
pub fn owned_by(path: &Path, uid: u32) -> bool {
    fs::metadata(path).is_ok_and(|m| m.uid() == uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jailer_argv_names_the_vm_its_uid_chroot_and_limits() {
        let got: Vec<String> = args(
            "0123456789abcdef",
            Path::new("/usr/bin/firecracker"),
            1879048300,
            Path::new("/s/vms/0123456789abcdef/jail"),
            1,
            &[("cpu.cfs_quota_us".into(), "100000".into())],
        )
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
        assert_eq!(
            got,
            [
                "--id",
                "0123456789abcdef",
                "--exec-file",
                "/usr/bin/firecracker",
                "--uid",
                "1879048300",
                "--gid",
                "1879048300",
                "--chroot-base-dir",
                "/s/vms/0123456789abcdef/jail",
                "--cgroup-version",
                "1",
                "--parent-cgroup",
                "banger",
                "--cgroup",
                "cpu.cfs_quota_us=100000",
                "--",
                "--api-sock",
                "/run/firecracker.socket",
            ]
        );
    }

    #[test]
    fn clear_for_finds_the_jail_from_the_socket_link_and_keeps_the_originals() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm");
        let root = vm.join("jail/firecracker/abc/root");
        fs::create_dir_all(root.join("run")).unwrap();
        fs::write(vm.join("root.ext4"), "disk").unwrap();
        fs::hard_link(vm.join("root.ext4"), root.join("root.ext4")).unwrap();
        let sock = dir.path().join("abc.sock");
        symlink(root.join("run/firecracker.socket"), &sock).unwrap();
        clear_for(&sock).unwrap();
        assert!(!vm.join("jail").exists());
        assert_eq!(fs::read_to_string(vm.join("root.ext4")).unwrap(), "disk");
    }
}
