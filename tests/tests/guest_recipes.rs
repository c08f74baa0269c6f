//! The guest recipes in `guest/`: the kernel config fragment asks for what a
//! banger guest needs, the scripts refuse bad input with a message naming
//! it, and a kernel built by `guest/kernel/build` (when one is cached) boots
//! under `qemu -M microvm` with TCG to the expected root panic.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn guest_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest")
    }

    /// The fragment as option -> value (`y`, or `n` for "is not set").
    fn fragment() -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(guest_dir().join("kernel/microvm.config")).unwrap();
        let mut options = BTreeMap::new();
        for line in text.lines() {
            let (name, value) = if let Some(off) = line
                .strip_prefix("# ")
                .and_then(|l| l.strip_suffix(" is not set"))
            {
                (off.to_string(), "n".to_string())
            } else if line.starts_with("CONFIG_") {
                let (n, v) = line.split_once('=').unwrap();
                (n.to_string(), v.to_string())
            } else {
                continue;
            };
            let previous = options.insert(name.clone(), value);
            assert!(previous.is_none(), "{name} is set twice in the fragment");
        }
        options
    }

    #[test]
    fn kernel_fragment_builds_in_everything_a_guest_boots_with() {
        let f = fragment();
        for option in [
            "CONFIG_64BIT",
            "CONFIG_PVH",
            "CONFIG_VIRTIO_MMIO",
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_VIRTIO_NET",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_EXT4_FS",
            "CONFIG_OVERLAY_FS",
            "CONFIG_DEVTMPFS_MOUNT",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_UNIX",
            "CONFIG_NF_TABLES",
            "CONFIG_IP_NF_IPTABLES",
            "CONFIG_BRIDGE",
            "CONFIG_VETH",
            "CONFIG_CGROUPS",
            "CONFIG_MEMCG",
            "CONFIG_NAMESPACES",
            "CONFIG_USER_NS",
            "CONFIG_NET_NS",
        ] {
            assert_eq!(
                f.get(option).map(String::as_str),
                Some("y"),
                "{option} must be built in (=y)"
            );
        }
        assert_eq!(
            f.get("CONFIG_MODULES").map(String::as_str),
            Some("n"),
            "no modules: a guest image carries no module tree for this kernel"
        );
        let modular: Vec<_> = f.iter().filter(|(_, v)| v.as_str() == "m").collect();
        assert!(modular.is_empty(), "modules are off: {modular:?}");
    }

    fn run(script: &str, args: &[&str]) -> (bool, String) {
        let out = Command::new(guest_dir().join(script))
            .args(args)
            .env(
                "XDG_CACHE_HOME",
                std::env::temp_dir().join("banger-recipes-test"),
            )
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn kernel_build_names_what_is_missing() {
        let (ok, err) = run("kernel/build", &[]);
        assert!(!ok);
        assert!(err.contains("missing --out DIR"), "{err}");

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let (ok, err) = run(
            "kernel/build",
            &[
                "--out",
                out.to_str().unwrap(),
                "--tarball",
                "/nonexistent/linux-6.12.tar.xz",
            ],
        );
        assert!(!ok);
        assert!(
            err.contains("/nonexistent/linux-6.12.tar.xz not found"),
            "{err}"
        );
        assert!(!out.exists(), "nothing is published on failure");
    }

    #[test]
    fn scripts_reject_unknown_arguments() {
        for script in ["kernel/build", "rootfs/build", "kernel/boot-check"] {
            let (ok, err) = run(script, &["--bogus"]);
            assert!(!ok, "{script} accepted --bogus");
            assert!(err.contains("'--bogus'"), "{script}: {err}");
        }
    }

    /// The newest kernel `guest/kernel/build` left in the CI cache.
    fn cached_kernel() -> Option<PathBuf> {
        let home = std::env::var_os("HOME")?;
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(&home).join(".cache"))
            .join("banger-ci");
        std::fs::read_dir(cache)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("kernel-"))
            .map(|e| e.path().join("vmlinux"))
            .filter(|p| p.is_file())
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }

    #[test]
    fn built_kernel_boots_under_qemu_microvm_to_the_root_panic() {
        let test = "built_kernel_boots_under_qemu_microvm_to_the_root_panic";
        let Some(vmlinux) = cached_kernel() else {
            eprintln!("SKIPPED {test}: no kernel in ~/.cache/banger-ci (run guest/kernel/build)");
            return;
        };
        if !Path::new("/usr/bin/qemu-system-x86_64").exists() {
            eprintln!("SKIPPED {test}: qemu not installed (apt-get install qemu-system-x86)");
            return;
        }
        let notes = Command::new("readelf")
            .arg("-n")
            .arg(&vmlinux)
            .output()
            .unwrap();
        let notes = String::from_utf8_lossy(&notes.stdout);
        assert!(
            notes
                .lines()
                .any(|l| l.contains("Xen") && l.contains("0x00000012")),
            "{} has no PVH entry note:\n{notes}",
            vmlinux.display()
        );
        let out = Command::new(guest_dir().join("kernel/boot-check"))
            .arg(&vmlinux)
            .args(["--timeout", "180"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boot-check failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        eprintln!("{test}: root panic after {secs:.1} s");
    }
}
