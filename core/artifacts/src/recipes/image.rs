//! The `debian-bookworm` image recipe: `mmdebstrap` of Debian bookworm
//! (minbase plus the packages in `core/recipes/debian-bookworm/packages`,
//! customised by `customize.sh` there) into a tarball, which is then
//! flattened to ext4 exactly like a one-layer OCI image, without root.
//!
//! Packages come from the host's apt sources when they carry the suite (so
//! a host's mirror or proxy is used), else from Debian's own mirror.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use banger_api::catalog::recipes::{self, DEBIAN_BOOKWORM, ImageRecipe};

use super::{BuildEvent, RecipeError, run, scratch};
use banger_api::model::ByteSize;

/// Debian's own mirror, when the host's sources do not carry the suite.
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// The recipe called `name`.
pub fn recipe(name: &str) -> Result<ImageRecipe, RecipeError> {
    recipes::image(name).ok_or_else(|| RecipeError::Unknown {
        kind: "image",
        name: name.to_string(),
        known: super::IMAGE_RECIPES.join(", "),
    })
}

/// What [`build_image`] made.
#[derive(Debug)]
pub struct BuiltImage {
    /// `<staging_dir>/rootfs.ext4`.
    pub rootfs: PathBuf,
    /// Its size.
    pub size: ByteSize,
    /// Where the packages came from (a sources file or mirror URL).
    pub mirror: String,
}

/// Builds `recipe`'s root filesystem as `<staging_dir>/rootfs.ext4`.
/// Scratch space lives under `cache_dir`. Blocking: run it on a blocking
/// thread.
pub fn build_image(
    recipe: &ImageRecipe,
    staging_dir: &Path,
    cache_dir: &Path,
    events: &mut dyn FnMut(BuildEvent),
) -> Result<BuiltImage, RecipeError> {
    super::host_ready(recipe.tools).map_err(RecipeError::HostNotReady)?;
    let work = scratch(cache_dir, "image")?;
    let hook = work.path().join("customize.sh");
    write_executable(&hook, recipe.customize)?;
    let tar = work.path().join("rootfs.tar");
    let mirror = mirror_for(recipe.suite);
    let packages = recipe.package_list().join(",");
    events(BuildEvent::Step {
        step: "mmdebstrap",
        message: format!(
            "installing Debian {} ({packages}) from {mirror}",
            recipe.suite
        ),
        expected: Some(recipe.expected),
    });
    run(
        Command::new("mmdebstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={packages}"))
            .arg(format!("--customize-hook={}", hook.display()))
            .arg(recipe.suite)
            .arg(&tar)
            .arg(&mirror),
        "mmdebstrap",
    )?;
    events(BuildEvent::Step {
        step: "build_rootfs",
        message: format!("building a {} ext4", recipe.size),
        expected: Some(Duration::from_secs(20)),
    });
    let built = crate::images::rootfs_from_tar(&tar, staging_dir, Some(recipe.size))?;
    Ok(BuiltImage {
        rootfs: built.0,
        size: built.1,
        mirror,
    })
}

/// The host's apt source file that carries `suite`, else Debian's mirror.
fn mirror_for(suite: &str) -> String {
    super::apt::host_sources(Path::new("/etc/apt"))
        .into_iter()
        .find(|p| {
            super::apt::source_lines(p)
                .iter()
                .any(|l| l.split_whitespace().any(|w| w == suite))
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| DEBIAN_MIRROR.to_string())
}

fn write_executable(path: &Path, text: &str) -> Result<(), RecipeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .map_err(|e| RecipeError::io("create", path, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .map_err(|e| RecipeError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_list_is_read_without_comments() {
        let list = DEBIAN_BOOKWORM.package_list();
        for must in ["systemd", "openssh-server", "git", "ca-certificates"] {
            assert!(list.contains(&must), "{must} missing from {list:?}");
        }
        assert!(list.iter().all(|p| !p.contains('#') && !p.is_empty()));
    }

    #[test]
    fn recipes_are_found_by_name_and_unknown_ones_listed() {
        assert_eq!(recipe("debian-bookworm").unwrap().suite, "bookworm");
        let err = recipe("arch").unwrap_err().to_string();
        assert!(
            err.contains("\"arch\"") && err.contains("debian-bookworm"),
            "{err}"
        );
    }
}
