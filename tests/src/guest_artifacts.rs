//! Finding what a real guest boot needs: the kernel and rootfs the recipes
//! cache under `~/.cache/banger-ci` (`banger kernel build` run by scripts/test,
//! `guest/rootfs/build`), the static agent from `scripts/build-agent`, QEMU
//! and `vhost-device-vsock`. Shared by tests and benches that boot a guest
//! under QEMU/TCG.

use std::path::{Path, PathBuf};

/// The recipes' cache directory, `~/.cache/banger-ci`.
pub fn cache() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/banger-ci")
}

/// The newest cache entry named `prefix*` that holds `inner` (or is a file
/// when `inner` is empty).
pub fn newest(prefix: &str, inner: &str) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache())
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| {
            if inner.is_empty() {
                p.is_file()
            } else {
                p.join(inner).is_file()
            }
        })
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// `bin` found on `PATH`.
pub fn on_path(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Everything a QEMU/TCG guest boot with banger's agent needs.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    /// A kernel directory (`vmlinux` inside) for `banger kernel import`.
    pub kernel_dir: PathBuf,
    /// The Debian systemd rootfs as a plain tar.
    pub rootfs_tar: PathBuf,
    /// The static `banger-agent`.
    pub agent: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost: PathBuf,
}

impl GuestArtifacts {
    /// Finds every artifact, or says which one is missing and how to get it.
    /// The agent is looked up next to the target dir (`target/banger-agent`)
    /// of the running test binary, where `scripts/build-agent` puts it.
    pub fn find() -> Result<GuestArtifacts, String> {
        Self::find_flavour("systemd")
    }

    /// Like [`GuestArtifacts::find`], with the rootfs of `flavour`
    /// (`systemd` or `noinit`, as `guest/rootfs/build` names them).
    pub fn find_flavour(flavour: &str) -> Result<GuestArtifacts, String> {
        let qemu = on_path("qemu-system-x86_64")
            .ok_or("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")?;
        let vhost = on_path("vhost-device-vsock")
            .or_else(|| {
                let p = cache().join("tools/bin/vhost-device-vsock");
                p.is_file().then_some(p)
            })
            .ok_or("vhost-device-vsock missing (scripts/test builds it)")?;
        let kernel_dir = newest("kernel-", "vmlinux")
            .ok_or("no guest kernel in ~/.cache/banger-ci/kernel-*/ (scripts/test builds it with `banger kernel build`)")?;
        let rootfs_tar = newest(&format!("rootfs-{flavour}-"), "").ok_or_else(|| {
            format!(
                "no rootfs in ~/.cache/banger-ci/rootfs-{flavour}-*.tar (run guest/rootfs/build)"
            )
        })?;
        let agent = crate::target_dir()
            .parent()
            .map(|t| t.join("banger-agent"))
            .unwrap_or_default();
        if !agent.is_file() {
            return Err(format!(
                "no static agent at {} (run scripts/build-agent)",
                agent.display()
            ));
        }
        Ok(GuestArtifacts {
            kernel_dir,
            rootfs_tar,
            agent,
            qemu,
            vhost,
        })
    }

    /// The kernel, rootfs and agent paths, for a report line.
    pub fn describe(&self) -> String {
        let name = |p: &Path| p.display().to_string();
        format!(
            "kernel {}, rootfs {}, agent {}",
            name(&self.kernel_dir.join("vmlinux")),
            name(&self.rootfs_tar),
            name(&self.agent)
        )
    }
}

/// The agent transport a bench measures under QEMU:
/// `BANGER_BENCH_TRANSPORT` (`serial` or `vsock`), else banger's default,
/// `serial`. Benches write it into the daemon's config and make their raw
/// baselines use the same one, so both sides carry the agent the same way.
pub fn bench_transport() -> &'static str {
    match std::env::var("BANGER_BENCH_TRANSPORT").as_deref() {
        Ok("vsock") => "vsock",
        Ok("serial") | Err(_) => "serial",
        Ok(other) => panic!("BANGER_BENCH_TRANSPORT={other:?}: use serial or vsock"),
    }
}

/// The daemon config line for [`bench_transport`].
pub fn bench_transport_config() -> String {
    format!("qemu_agent_transport = {:?}\n", bench_transport())
}
