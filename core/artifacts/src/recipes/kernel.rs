//! The `debian-cloud` kernel recipe: the host distribution's cloud kernel
//! package, unpacked without installing it.
//!
//! Why a distribution kernel and not a compiled one (measured on the
//! 2-core test machines, docs/kernels.md): obtaining it takes seconds
//! (a 34 MB download) against 13–28 minutes to compile `linux-source-6.12`,
//! and under QEMU TCG it reaches its root mount in about 2.4 s against 1 s.
//! Its ELF image has a PVH entry, so QEMU's microvm and Firecracker both
//! boot it; the drivers it builds as modules (virtio-mmio, virtio-blk,
//! virtio-net, vsock) travel in its initrd and banger's agent loads them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use banger_api::catalog::recipes::{self, DEBIAN_CLOUD, KernelRecipe};

use super::apt::Apt;
use super::{BuildEvent, RecipeError, run, scratch};
use crate::kernels::{DEFAULT_BOOT_MODULES, KernelStore, LocalKernel, boot_modules_archive};

/// The recipe called `name`.
pub fn recipe(name: &str) -> Result<KernelRecipe, RecipeError> {
    recipes::kernel(name).ok_or_else(|| RecipeError::Unknown {
        kind: "kernel",
        name: name.to_string(),
        known: super::KERNEL_RECIPES.join(", "),
    })
}

/// Builds kernel `name` from `recipe` into `store` (replacing a local one
/// only with `force`). Scratch space lives under `cache_dir`; the package
/// lists in `cache_dir/apt`. Blocking: run it on a blocking thread.
pub fn build_kernel(
    recipe: &KernelRecipe,
    name: &str,
    store: &KernelStore,
    cache_dir: &Path,
    force: bool,
    events: &mut dyn FnMut(BuildEvent),
) -> Result<LocalKernel, RecipeError> {
    crate::kernels::validate_name(name)?;
    if !force && store.root().join(name).exists() {
        return Err(crate::kernels::KernelError::AlreadyExists(name.to_owned()).into());
    }
    super::host_ready(recipe.tools).map_err(RecipeError::HostNotReady)?;
    let apt = Apt::new(cache_dir.join("apt"));
    events(BuildEvent::Step {
        step: "apt_update",
        message: "reading the host's package mirror".into(),
        expected: Some(Duration::from_secs(5)),
    });
    apt.update()?;
    let package = apt.resolve(recipe.packages)?;
    let work = scratch(cache_dir, "kernel")?;
    events(BuildEvent::Step {
        step: "download",
        message: format!("downloading {package}"),
        expected: Some(Duration::from_secs(5)),
    });
    let deb = apt.download(&package, work.path())?;
    let deb_name = file_name(&deb);

    events(BuildEvent::Step {
        step: "unpack",
        message: format!("unpacking {deb_name}"),
        expected: Some(Duration::from_secs(5)),
    });
    let root = work.path().join("root");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root),
        "dpkg-deb -x",
    )?;
    let (vmlinuz, version) = find_vmlinuz(&root, &deb_name)?;
    let out = work.path().join("out");
    std::fs::create_dir_all(&out).map_err(|e| RecipeError::io("create", &out, e))?;
    let image = std::fs::read(&vmlinuz).map_err(|e| RecipeError::io("read", &vmlinuz, e))?;
    let elf = super::bzimage::extract_vmlinux(&image)
        .map_err(|e| RecipeError::BzImage(vmlinuz.clone(), e))?;
    let vmlinux = out.join("vmlinux");
    std::fs::write(&vmlinux, &elf).map_err(|e| RecipeError::io("write", &vmlinux, e))?;
    events(BuildEvent::Info(format!(
        "kernel {version}: {} MiB ELF from {} MiB vmlinuz",
        elf.len() >> 20,
        image.len() >> 20
    )));

    // Merged-/usr packages put modules under usr/lib/modules.
    let modules_root = [root.clone(), root.join("usr")]
        .into_iter()
        .find(|r| r.join("lib/modules").join(&version).is_dir())
        .ok_or_else(|| RecipeError::KernelPackage {
            package: deb_name.clone(),
            problem: format!("has no lib/modules/{version} directory"),
        })?;
    let modules = boot_modules_archive(&modules_root, &version, DEFAULT_BOOT_MODULES)?;
    modules.write(&out.join("initrd"))?;
    events(BuildEvent::Info(format!(
        "boot modules: {} (built in: {})",
        modules.loaded.join(" "),
        if modules.builtin.is_empty() {
            "none".to_string()
        } else {
            modules.builtin.join(" ")
        }
    )));

    let distro = host_distro();
    let metadata = out.join("banger-kernel.toml");
    let text = format!(
        "# Written by banger's {recipe} kernel recipe from {deb_name}.\nkernel = \"vmlinux\"\ninitrd = \"initrd\"\ndistro = {distro:?}\nversion = {version:?}\narch = \"x86_64\"\n",
        recipe = recipe.name
    );
    std::fs::write(&metadata, text).map_err(|e| RecipeError::io("write", &metadata, e))?;
    events(BuildEvent::Step {
        step: "publish",
        message: format!("publishing kernel {name}"),
        expected: None,
    });
    Ok(store.import_as(
        name,
        &out,
        force,
        Some(format!("build:{} ({deb_name})", recipe.name)),
    )?)
}

/// `boot/vmlinuz-<version>` in an unpacked kernel package, and its version.
fn find_vmlinuz(root: &Path, deb: &str) -> Result<(PathBuf, String), RecipeError> {
    let boot = root.join("boot");
    let found: Vec<(PathBuf, String)> = std::fs::read_dir(&boot)
        .map_err(|e| RecipeError::io("list", &boot, e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_string();
            Some((e.path(), version))
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(RecipeError::KernelPackage {
            package: deb.to_string(),
            problem: "has no boot/vmlinuz-*".into(),
        }),
        many => Err(RecipeError::KernelPackage {
            package: deb.to_string(),
            problem: format!("has {} kernels in boot/", many.len()),
        }),
    }
}

/// `ID` from /etc/os-release (`debian`, `ubuntu`), else `unknown`.
fn host_distro() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("ID=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_are_found_by_name_and_unknown_ones_listed() {
        assert_eq!(recipe("debian-cloud").unwrap().name, "debian-cloud");
        let err = recipe("gentoo").unwrap_err().to_string();
        assert!(
            err.contains("\"gentoo\"") && err.contains("debian-cloud"),
            "{err}"
        );
    }

    #[test]
    fn finds_the_one_vmlinuz_and_its_version() {
        let d = tempfile::tempdir().unwrap();
        let boot = d.path().join("boot");
        std::fs::create_dir_all(&boot).unwrap();
        let err = find_vmlinuz(d.path(), "k.deb").unwrap_err().to_string();
        assert!(err.contains("k.deb has no boot/vmlinuz-*"), "{err}");
        std::fs::write(boot.join("vmlinuz-6.12.1-cloud-amd64"), b"x").unwrap();
        std::fs::write(boot.join("config-6.12.1-cloud-amd64"), b"x").unwrap();
        let (path, version) = find_vmlinuz(d.path(), "k.deb").unwrap();
        assert_eq!(version, "6.12.1-cloud-amd64");
        assert_eq!(path, boot.join("vmlinuz-6.12.1-cloud-amd64"));
        std::fs::write(boot.join("vmlinuz-6.1.0"), b"x").unwrap();
        assert!(
            find_vmlinuz(d.path(), "k.deb")
                .unwrap_err()
                .to_string()
                .contains("has 2 kernels")
        );
    }
}
