//! Container images without sshd: `vm create` says so, and what still works
//! and how to get the rest, through the real CLI and daemon (fake
//! firecracker), with images pulled from a loopback registry.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use test_infra::registry::Registry;
    use test_infra::{BangerEnv, Run};

    /// A rootfs tarball with `files` (and their directories).
    fn rootfs_tar(dir: &Path, name: &str, files: &[&str]) -> PathBuf {
        let path = dir.join(format!("{name}.tar"));
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for f in files {
            let body = b"#!/bin/sh\n";
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_cksum();
            b.append_data(&mut h, f, &body[..]).unwrap();
        }
        b.finish().unwrap();
        path
    }

    fn both(r: &Run) -> String {
        format!("{}{}", r.stdout, r.stderr)
    }

    #[test]
    fn vm_create_from_an_image_without_sshd_says_so_and_what_to_do() {
        let test = "vm_create_from_an_image_without_sshd_says_so_and_what_to_do";
        let Some(registry) = Registry::start(test) else {
            return;
        };
        let env = BangerEnv::new();
        env.write_config(&format!("insecure_registries = [{:?}]\n", registry.host()));
        let kdir = env.root().join("kbuild");
        std::fs::create_dir_all(&kdir).unwrap();
        std::fs::write(kdir.join("vmlinux"), b"\x7fELF kernel").unwrap();
        env.banger(&["kernel", "import", "k1", "--from", kdir.to_str().unwrap()])
            .ok();
        let bare = registry.push_rootfs_tar(
            "tiny/bare:1",
            &rootfs_tar(env.root(), "bare", &["etc/os-release", "usr/bin/app"]),
        );
        let with_sshd = registry.push_rootfs_tar(
            "tiny/sshd:1",
            &rootfs_tar(env.root(), "sshd", &["etc/os-release", "usr/sbin/sshd"]),
        );
        for (reference, name) in [(&bare, "bare"), (&with_sshd, "withsshd")] {
            env.banger(&[
                "image",
                "pull",
                reference,
                "--name",
                name,
                "--kernel-ref",
                "k1",
            ])
            .ok();
        }

        let create = |vm: &str, image: &str| {
            env.banger(&[
                "vm",
                "create",
                "--name",
                vm,
                "--image",
                image,
                "--disk-size",
                "64M",
            ])
            .ok()
        };
        let out = both(&create("nossh", "bare"));
        assert!(
            out.contains("the image has no sshd (/usr/sbin/sshd)"),
            "{out}"
        );
        // What still works, and how to get the rest.
        assert!(out.contains("through the guest agent"), "{out}");
        assert!(out.contains("install openssh-server in the image"), "{out}");

        let out = both(&create("withssh", "withsshd"));
        assert!(!out.contains("has no sshd"), "{out}");
    }
}
