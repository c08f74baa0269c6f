//! The local build recipes this binary carries, as data: their names,
//! packages and the host tools they run, and whether this host can run
//! them ([`host_ready`], which `banger doctor` also asks). The builds
//! themselves are `banger_artifacts::recipes`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::ByteSize;

/// The tools recipe `name` of `kind` (`kernel`, `image`) runs, if banger
/// has such a recipe.
pub fn tools_of(kind: &str, name: &str) -> Option<&'static [Tool]> {
    match kind {
        "kernel" => kernel(name).map(|r| r.tools),
        "image" => image(name).map(|r| r.tools),
        _ => None,
    }
}

/// Names of the kernel recipes this binary carries.
pub const KERNEL_RECIPES: &[&str] = &[DEBIAN_CLOUD.name];

/// Names of the image recipes this binary carries.
pub const IMAGE_RECIPES: &[&str] = &[DEBIAN_BOOKWORM.name];

/// A kernel recipe.
#[derive(Debug, Clone, Copy)]
pub struct KernelRecipe {
    /// Its name in catalogs (`recipe = "..."`).
    pub name: &'static str,
    /// Packages to look for, best first; a meta-package is followed to the
    /// `linux-image-*` it depends on.
    pub packages: &'static [&'static str],
    /// How long it usually takes on a 2-core machine with a near mirror.
    pub expected: Duration,
    /// The programs it runs.
    pub tools: &'static [Tool],
}

/// Debian's cloud kernel (6.12 where the mirror has it), or Ubuntu's
/// virtual-machine kernel on Ubuntu hosts.
pub const DEBIAN_CLOUD: KernelRecipe = KernelRecipe {
    name: "debian-cloud",
    packages: &[
        "linux-image-6.12-cloud-amd64",
        "linux-image-cloud-amd64",
        "linux-image-kvm",
        "linux-image-virtual",
    ],
    expected: Duration::from_secs(20),
    tools: &[
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
    ],
};

/// The kernel recipe called `name`.
pub fn kernel(name: &str) -> Option<KernelRecipe> {
    [DEBIAN_CLOUD].into_iter().find(|r| r.name == name)
}

/// An image recipe.
#[derive(Debug, Clone, Copy)]
pub struct ImageRecipe {
    /// Its name in catalogs (`recipe = "..."`).
    pub name: &'static str,
    /// The Debian suite.
    pub suite: &'static str,
    /// The package list file's text (`#` comments, one package a line).
    pub packages: &'static str,
    /// The mmdebstrap `--customize-hook` script.
    pub customize: &'static str,
    /// Size of the root filesystem: room for `apt-get install` in a VM
    /// (sparse, so unused space costs nothing).
    pub size: ByteSize,
    /// How long it usually takes on a 2-core machine with a near mirror.
    pub expected: Duration,
    /// The programs it runs.
    pub tools: &'static [Tool],
}

/// Debian 12 with systemd, sshd, git and curl.
pub const DEBIAN_BOOKWORM: ImageRecipe = ImageRecipe {
    name: "debian-bookworm",
    suite: "bookworm",
    packages: include_str!("../../../recipes/debian-bookworm/packages"),
    customize: include_str!("../../../recipes/debian-bookworm/customize.sh"),
    size: ByteSize(2 << 30),
    expected: Duration::from_secs(60),
    tools: &[
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
        ("mmdebstrap", "mmdebstrap"),
    ],
};

/// The image recipe called `name`.
pub fn image(name: &str) -> Option<ImageRecipe> {
    [DEBIAN_BOOKWORM].into_iter().find(|r| r.name == name)
}

impl ImageRecipe {
    /// The package names, in file order.
    pub fn package_list(&self) -> Vec<&'static str> {
        self.packages
            .lines()
            .filter_map(|l| l.split('#').next()?.split_whitespace().next())
            .collect()
    }
}

/// A program a recipe runs, and the Debian/Ubuntu package that has it.
pub type Tool = (&'static str, &'static str);

/// What keeps this host from running a recipe, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unready {
    /// What is missing.
    pub why: String,
    /// What to do about it.
    pub fix: String,
}

/// Whether this host can run a recipe that needs `tools`: each on PATH and
/// a Debian or Ubuntu archive among the apt sources in /etc/apt. Returns
/// the source file naming the archive. Also what `banger doctor` asks.
pub fn host_ready(tools: &[Tool]) -> Result<PathBuf, Unready> {
    host_ready_with(tools, crate::config::find_on_path, Path::new("/etc/apt"))
}

/// [`host_ready`] with the PATH lookup and the apt directory given.
pub fn host_ready_with(
    tools: &[Tool],
    find: impl Fn(&str) -> Option<PathBuf>,
    apt_dir: &Path,
) -> Result<PathBuf, Unready> {
    let missing: Vec<Tool> = tools
        .iter()
        .copied()
        .filter(|(tool, _)| find(tool).is_none())
        .collect();
    if !missing.is_empty() {
        let tools: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
        let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
        packages.dedup();
        return Err(Unready {
            why: format!("{} not found on PATH", tools.join(", ")),
            fix: format!("sudo apt-get install {}", packages.join(" ")),
        });
    }
    debian_source(apt_dir).ok_or_else(|| Unready {
        why: format!(
            "no Debian or Ubuntu package source in {}",
            apt_dir.display()
        ),
        fix: format!(
            "add a Debian mirror to {}/sources.list.d/debian.sources",
            apt_dir.display()
        ),
    })
}

/// The apt source files under `apt_dir` (`sources.list`, then
/// `sources.list.d/*.list` and `*.sources` in name order).
pub fn host_sources(apt_dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![apt_dir.join("sources.list")];
    if let Ok(dir) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut parts: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        parts.sort();
        found.extend(parts);
    }
    found.retain(|p| p.is_file());
    found
}

/// Lines of an apt source file that are not comments.
pub fn source_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The first apt source file under `apt_dir` naming a Debian or Ubuntu
/// archive.
pub fn debian_source(apt_dir: &Path) -> Option<PathBuf> {
    host_sources(apt_dir).into_iter().find(|f| {
        source_lines(f).iter().any(|l| {
            (l.starts_with("deb ") || l.starts_with("URIs:"))
                && (l.contains("debian") || l.contains("ubuntu"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_ready_with_the_tools_and_a_debian_source() {
        let dir = tempfile::tempdir().unwrap();
        let apt = dir.path();
        let all = |_: &str| Some(PathBuf::from("/usr/bin/x"));
        let image = DEBIAN_BOOKWORM.tools;
        let kernel = DEBIAN_CLOUD.tools;
        let err = host_ready_with(image, all, apt).unwrap_err();
        assert!(
            err.why.starts_with("no Debian or Ubuntu package source"),
            "{err:?}"
        );
        assert!(err.fix.contains("sources.list.d/debian.sources"), "{err:?}");

        std::fs::create_dir_all(apt.join("sources.list.d")).unwrap();
        std::fs::write(
            apt.join("sources.list.d/debian.sources.disabled"),
            "URIs: http://deb.debian.org/debian\n",
        )
        .unwrap();
        std::fs::write(
            apt.join("sources.list.d/other.list"),
            "# deb http://deb.debian.org/debian bookworm main\ndeb http://example.com/x y z\n",
        )
        .unwrap();
        assert!(
            host_ready_with(image, all, apt).is_err(),
            "disabled and commented sources do not count"
        );
        let real = apt.join("sources.list.d/debian.sources");
        std::fs::write(
            &real,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(host_ready_with(image, all, apt), Ok(real));

        let no_mmdebstrap = |t: &str| (t != "mmdebstrap").then(|| PathBuf::from("/usr/bin/x"));
        assert_eq!(
            host_ready_with(image, no_mmdebstrap, apt),
            Err(Unready {
                why: "mmdebstrap not found on PATH".to_string(),
                fix: "sudo apt-get install mmdebstrap".to_string()
            })
        );
        assert!(host_ready_with(kernel, no_mmdebstrap, apt).is_ok());
        let no_apt = |t: &str| (!t.starts_with("apt")).then(|| PathBuf::from("/usr/bin/x"));
        assert_eq!(
            host_ready_with(kernel, no_apt, apt),
            Err(Unready {
                why: "apt-get, apt-cache not found on PATH".to_string(),
                fix: "sudo apt-get install apt".to_string()
            })
        );
        assert_eq!(tools_of("kernel", "debian-cloud"), Some(kernel));
        assert_eq!(tools_of("image", "nope"), None);
    }
}
