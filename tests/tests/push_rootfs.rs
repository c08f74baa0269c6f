//! The `push-rootfs` bin against a real loopback registry: the image it
//! pushes is a single gzip layer with a linux/amd64 config whose diff_id is
//! the tarball's digest, and banger's own puller turns it into an ext4 with
//! the tarball's files.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;

    use banger_artifacts::images::{PullOptions, pull_rootfs};
    use sha2::{Digest, Sha256};
    use test_infra::registry::{Entry, Registry, oci_client_for, tar_bytes};

    const DEBUGFS: &str = "/usr/sbin/debugfs";

    /// Shaped like mmdebstrap's output: every path starts with `./`.
    fn rootfs_tar() -> Vec<u8> {
        tar_bytes(&[
            Entry::dir("./", 0o755),
            Entry::dir("./etc/", 0o755),
            Entry::file("./etc/os-release", "ID=banger-test\n"),
            Entry::dir("./usr/", 0o755),
            Entry::dir("./usr/sbin/", 0o755),
            Entry::owned("./usr/sbin/sshd", "#!/bin/sh\n", 0o755, 0, 0),
            Entry::dir("./root/", 0o700),
        ])
    }

    fn push_rootfs(args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_push-rootfs"))
            .args(args)
            .output()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pushed_rootfs_is_a_linux_amd64_gzip_layer_banger_can_pull() {
        let test = "pushed_rootfs_is_a_linux_amd64_gzip_layer_banger_can_pull";
        if !Path::new(DEBUGFS).exists() || !Path::new("/usr/sbin/mkfs.ext4").exists() {
            eprintln!(
                "SKIPPED {test}: mkfs.ext4/debugfs not installed (apt-get install e2fsprogs)"
            );
            return;
        }
        let Some(reg) = Registry::start(test) else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let tarball = tmp.path().join("rootfs.tar");
        let tar = rootfs_tar();
        std::fs::write(&tarball, &tar).unwrap();
        let reference = format!("{}/guest/debian:test", reg.host());

        let out = push_rootfs(&[tarball.to_str().unwrap(), &reference]);
        assert!(
            out.status.success(),
            "push-rootfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(digest.starts_with("sha256:"), "{digest}");

        // What the registry holds, read back with a separate client.
        let client = oci_client_for(&[reg.host()]);
        let r: oci_client::Reference = reference.parse().unwrap();
        let (manifest, manifest_digest, config) = client
            .pull_manifest_and_config(&r, &oci_client::secrets::RegistryAuth::Anonymous)
            .await
            .unwrap();
        assert_eq!(manifest_digest, digest);
        assert_eq!(manifest.layers.len(), 1);
        assert_eq!(
            manifest.layers[0].media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        assert_eq!(config["architecture"], "amd64");
        assert_eq!(config["os"], "linux");
        let tar_digest = format!("sha256:{:x}", Sha256::digest(&tar));
        assert_eq!(config["rootfs"]["diff_ids"][0], tar_digest.as_str());

        // banger's puller accepts it and the files arrive intact.
        let staging = tmp.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let opts = PullOptions {
            insecure_registries: vec![reg.host().to_string()],
            docker_config: Some(tmp.path().join("no-docker-config.json")),
            cache_dir: tmp.path().join("cache"),
            size: None,
            ..PullOptions::default()
        };
        let pulled = pull_rootfs(&reference, &staging, &opts, |_| {})
            .await
            .unwrap();
        assert_eq!(pulled.digest, digest);
        let cat = Command::new(DEBUGFS)
            .arg("-R")
            .arg("cat /etc/os-release")
            .arg(&pulled.rootfs)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "ID=banger-test\n");
        let mode = |path: &str| {
            let out = Command::new(DEBUGFS)
                .arg("-R")
                .arg(format!("stat {path}"))
                .arg(&pulled.rootfs)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let sshd = mode("/usr/sbin/sshd");
        assert!(sshd.contains("Mode:  0755"), "{sshd}");
        let root = mode("/root");
        assert!(root.contains("Mode:  0700"), "{root}");
    }

    #[test]
    fn missing_tarball_fails_naming_the_path() {
        let out = push_rootfs(&["/nonexistent/rootfs.tar", "127.0.0.1:1/guest/x:y"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Opening rootfs tarball /nonexistent/rootfs.tar"),
            "{err}"
        );
    }

    #[test]
    fn bad_reference_names_the_input_and_the_fix() {
        let out = push_rootfs(&["/tmp/x.tar", "Not A Reference"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("\"Not A Reference\"") && err.contains("HOST/REPO:TAG"),
            "{err}"
        );
    }
}
