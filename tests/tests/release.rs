//! The release pipeline against a real registry on loopback (Debian's
//! `docker-registry`): `banger-release push` packs a small kernel and image,
//! pushes them as OCI artifacts and writes catalogs banger itself parses;
//! `oci_artifact::pull_artifact` brings both back by digest. A tampered
//! blob or manifest, a wrong digest, a wrong artifact kind and an unpinned
//! reference are refused, a tampered artifact never as "unreachable", and a
//! refused pull leaves nothing behind. Through the real CLI, `banger kernel
//! pull` / `image pull` fetch the release via the written catalogs and
//! refuse a tampered one without building it locally instead.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::Arc;

    use banger_artifacts::archive::ExtractLimits;
    use banger_artifacts::imagecat::ImageCatalog;
    use banger_artifacts::images::PullOptions;
    use banger_artifacts::kernels::Catalog;
    use banger_artifacts::oci_artifact::{
        ArtifactError, ArtifactInfo, ArtifactKind, pull_artifact,
    };
    use test_infra::BangerEnv;
    use test_infra::registry::Registry;

    /// The kernel and image names the embedded catalogs use, so the release
    /// copies their recipes through.
    const KERNEL: &str = "debian-cloud-6.12";
    const IMAGE: &str = "debian-bookworm";

    /// A published release: the registry, what was pushed, and the catalogs.
    struct Release {
        reg: Registry,
        tmp: tempfile::TempDir,
        kernel_oci: String,
        image_oci: String,
        vmlinux: Vec<u8>,
        initrd: Vec<u8>,
        rootfs: Vec<u8>,
    }

    /// A staging directory that removes itself once the last holder (the
    /// test or the extractor thread) lets go.
    #[derive(Debug)]
    struct Staging(PathBuf);

    impl Drop for Staging {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn embedded_catalog_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/catalog")
    }

    /// Bytes that differ per call, so no two artifacts share blobs.
    fn noise(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Pushes a synthetic kernel dir and image rootfs with banger-release,
    /// or `None` (skipped loudly) without `docker-registry`.
    fn release(test: &str) -> Option<Release> {
        let reg = Registry::start(test)?;
        let tmp = tempfile::tempdir().unwrap();
        let kdir = tmp.path().join("kernel");
        std::fs::create_dir(&kdir).unwrap();
        let vmlinux = noise(300_000, 1);
        let initrd = noise(50_000, 2);
        std::fs::write(kdir.join("vmlinux"), &vmlinux).unwrap();
        std::fs::write(kdir.join("initrd"), &initrd).unwrap();
        std::fs::write(
            kdir.join("manifest.toml"),
            format!(
                "name = \"{KERNEL}\"\ndistro = \"debian\"\narch = \"x86_64\"\nversion = \"6.12.9\"\n\
                 sha256 = \"00\"\nsource = \"build:debian-cloud\"\nimported_at = \"2026-01-01T00:00:00Z\"\n\
                 has_initrd = true\n"
            ),
        )
        .unwrap();
        // A mostly empty disk image, like an ext4 rootfs: sparse on disk.
        let rootfs_path = tmp.path().join("rootfs.ext4");
        let mut rootfs = noise(4096, 3);
        rootfs.resize(16 << 20, 0);
        rootfs.extend_from_slice(b"tail");
        std::fs::write(&rootfs_path, &rootfs).unwrap();

        let out = tmp.path().join("out");
        let run = Command::new(test_infra::workspace_bin("banger-release"))
            .args(["push", "--insecure", "--zstd-level", "3"])
            .arg("--registry")
            .arg(format!("{}/banger", reg.host()))
            .arg("--kernel-dir")
            .arg(&kdir)
            .args(["--kernel-name", KERNEL, "--image-name", IMAGE])
            .arg("--image-rootfs")
            .arg(&rootfs_path)
            .arg("--catalog-dir")
            .arg(embedded_catalog_dir())
            .arg("--out-dir")
            .arg(&out)
            .env("DOCKER_CONFIG", tmp.path().join("no-docker-config"))
            .output()
            .unwrap();
        let (kernels, images) = written_catalogs("banger-release push", &run, &out);
        let k = kernels.find(KERNEL).unwrap();
        let i = images.find(IMAGE).unwrap();
        // The release pins the artifact and keeps the local build recipe.
        assert_eq!(k.sources.recipe.as_deref(), Some("debian-cloud"));
        assert_eq!(i.sources.recipe.as_deref(), Some(IMAGE));
        assert_eq!(k.version, "6.12.9");
        assert_eq!(i.kernel, KERNEL);
        assert!(k.default && i.default);
        let kernel_oci = k.sources.oci.clone().unwrap();
        let image_oci = i.sources.oci.clone().unwrap();
        let prefix = format!("{}/banger/", reg.host());
        assert!(
            kernel_oci.starts_with(&format!("{prefix}kernel-{KERNEL}@sha256:")),
            "{kernel_oci}"
        );
        assert!(
            image_oci.starts_with(&format!("{prefix}image-{IMAGE}@sha256:")),
            "{image_oci}"
        );
        // No scratch bundles or staged catalogs are left next to the output.
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["images.toml", "kernels.toml"]);
        Some(Release {
            reg,
            tmp,
            kernel_oci,
            image_oci,
            vmlinux,
            initrd,
            rootfs,
        })
    }

    /// The catalogs `what` wrote into `out`, parsed by banger's own
    /// parsers, once `run` is known to have succeeded.
    fn written_catalogs(
        what: &str,
        run: &std::process::Output,
        out: &Path,
    ) -> (Catalog, ImageCatalog) {
        assert!(
            run.status.success(),
            "{what} failed\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let read = |file: &str| std::fs::read_to_string(out.join(file)).unwrap();
        (
            Catalog::parse(&read("kernels.toml")).unwrap(),
            ImageCatalog::parse(&read("images.toml")).unwrap(),
        )
    }

    fn opts(rel: &Release) -> PullOptions {
        PullOptions {
            insecure_registries: vec![rel.reg.host().to_string()],
            docker_config: Some(rel.tmp.path().join("no-docker-config.json")),
            cache_dir: rel.tmp.path().join("cache"),
            size: None,
            ..PullOptions::default()
        }
    }

    /// Pulls `reference` into a fresh staging dir under `parent` and returns
    /// the result with the staging path (removed once the pull lets go, on
    /// error).
    fn pull(
        rel: &Release,
        reference: &str,
        kind: ArtifactKind,
        parent: &Path,
    ) -> (Result<ArtifactInfo, ArtifactError>, PathBuf) {
        pull_with(reference, kind, &opts(rel), parent)
    }

    fn pull_with(
        reference: &str,
        kind: ArtifactKind,
        opts: &PullOptions,
        parent: &Path,
    ) -> (Result<ArtifactInfo, ArtifactError>, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("staging")
            .tempdir_in(parent)
            .unwrap()
            .keep();
        let staging = Arc::new(Staging(dir.clone()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(pull_artifact(
            reference,
            kind,
            opts,
            dir.clone(),
            ExtractLimits::default(),
            Arc::clone(&staging),
            &mut |_| {},
        ));
        if result.is_err() {
            drop(staging);
        } else {
            // Keep the tree for inspection: forget the guard.
            std::mem::forget(staging);
        }
        (result, dir)
    }

    /// The layer digest of `reference`, from a pull that must succeed.
    fn layer_of(rel: &Release, reference: &str, kind: ArtifactKind) -> String {
        let scratch = tempfile::tempdir().unwrap();
        let (good, _) = pull(rel, reference, kind, scratch.path());
        good.unwrap().layer_digest
    }

    fn is_empty(dir: &Path) -> bool {
        std::fs::read_dir(dir).unwrap().next().is_none()
    }

    /// The digest in `reference` replaced by a valid but different one.
    fn with_wrong_digest(reference: &str) -> String {
        let (repo, digest) = reference.split_once("@sha256:").unwrap();
        let flipped: String = digest
            .chars()
            .map(|c| if c == '0' { '1' } else { '0' })
            .collect();
        format!("{repo}@sha256:{flipped}")
    }

    #[test]
    fn released_kernel_and_image_pull_back_by_digest() {
        let Some(rel) = release("released_kernel_and_image_pull_back_by_digest") else {
            return;
        };
        let parent = tempfile::tempdir().unwrap();

        let (kernel, kdir) = pull(&rel, &rel.kernel_oci, ArtifactKind::KERNEL, parent.path());
        let kernel = kernel.unwrap();
        assert_eq!(
            Some(kernel.manifest_digest.as_str()),
            rel.kernel_oci.split_once('@').map(|(_, d)| d)
        );
        assert_eq!(std::fs::read(kdir.join("vmlinux")).unwrap(), rel.vmlinux);
        assert_eq!(std::fs::read(kdir.join("initrd")).unwrap(), rel.initrd);
        let meta = std::fs::read_to_string(kdir.join("banger-kernel.toml")).unwrap();
        assert!(
            meta.contains("distro = \"debian\"") && meta.contains("version = \"6.12.9\""),
            "{meta}"
        );
        assert_eq!(
            kernel
                .annotations
                .get("dev.banger.name")
                .map(String::as_str),
            Some(KERNEL)
        );

        let (image, idir) = pull(&rel, &rel.image_oci, ArtifactKind::IMAGE, parent.path());
        let image = image.unwrap();
        assert_eq!(std::fs::read(idir.join("rootfs.ext4")).unwrap(), rel.rootfs);
        let manifest = std::fs::read_to_string(idir.join("manifest.toml")).unwrap();
        assert!(
            manifest.contains(&format!("kernel = \"{KERNEL}\"")),
            "{manifest}"
        );
        assert_eq!(image.extracted.entries, 2);
        assert!(
            image.layer_size < rel.rootfs.len() as u64 / 10,
            "the empty part of the disk should compress away: {} bytes",
            image.layer_size
        );
    }

    #[test]
    fn tampered_layer_is_refused_as_integrity_and_leaves_nothing() {
        let Some(rel) = release("tampered_layer_is_refused_as_integrity_and_leaves_nothing") else {
            return;
        };
        let parent = tempfile::tempdir().unwrap();
        let layer = layer_of(&rel, &rel.kernel_oci, ArtifactKind::KERNEL);
        // Same size, one byte changed deep inside the blob.
        let blob = rel.reg.blob_file(&layer);
        let mut bytes = std::fs::read(&blob).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&blob, &bytes).unwrap();

        let (bad, _) = pull(&rel, &rel.kernel_oci, ArtifactKind::KERNEL, parent.path());
        let err = bad.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Integrity { what, expected, .. }
                if what.contains(&layer) && *expected == layer),
            "{err:?}"
        );
        assert!(!err.is_unreachable());
        assert!(
            is_empty(parent.path()),
            "a refused pull left {:?}",
            std::fs::read_dir(parent.path())
                .unwrap()
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn truncated_layer_is_refused_as_integrity() {
        let Some(rel) = release("truncated_layer_is_refused_as_integrity") else {
            return;
        };
        let parent = tempfile::tempdir().unwrap();
        let blob = rel
            .reg
            .blob_file(&layer_of(&rel, &rel.image_oci, ArtifactKind::IMAGE));
        let bytes = std::fs::read(&blob).unwrap();
        std::fs::write(&blob, &bytes[..bytes.len() - 100]).unwrap();

        let (bad, _) = pull(&rel, &rel.image_oci, ArtifactKind::IMAGE, parent.path());
        let err = bad.unwrap_err();
        assert!(matches!(err, ArtifactError::Integrity { .. }), "{err:?}");
        assert!(is_empty(parent.path()));
    }

    #[test]
    fn tampered_manifest_is_refused_as_integrity() {
        let Some(rel) = release("tampered_manifest_is_refused_as_integrity") else {
            return;
        };
        let digest = rel.image_oci.split_once('@').unwrap().1.to_string();
        let blob = rel.reg.blob_file(&digest);
        let text = std::fs::read_to_string(&blob).unwrap();
        // Still valid JSON of the same length, pointing at the same layer.
        let tampered = text.replacen("\"dev.banger.name\"", "\"dev.banger.nam3\"", 1);
        assert_ne!(text, tampered, "the manifest carries dev.banger.name");
        std::fs::write(&blob, tampered).unwrap();

        let parent = tempfile::tempdir().unwrap();
        let (bad, _) = pull(&rel, &rel.image_oci, ArtifactKind::IMAGE, parent.path());
        let err = bad.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Integrity { what, .. } if what == "manifest"),
            "{err:?}"
        );
        assert!(!err.is_unreachable());
        assert!(is_empty(parent.path()));
    }

    #[test]
    fn a_digest_the_registry_does_not_have_is_refused() {
        let Some(rel) = release("a_digest_the_registry_does_not_have_is_refused") else {
            return;
        };
        let wrong = with_wrong_digest(&rel.kernel_oci);
        let parent = tempfile::tempdir().unwrap();
        let (res, _) = pull(&rel, &wrong, ArtifactKind::KERNEL, parent.path());
        let err = res.unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactError::Registry { .. } | ArtifactError::Integrity { .. }
            ),
            "{err:?}"
        );
        assert!(!err.is_unreachable());
        assert!(err.to_string().contains(&wrong), "{err}");
        assert!(is_empty(parent.path()));
    }

    #[test]
    fn unpinned_references_and_the_wrong_kind_are_refused() {
        let Some(rel) = release("unpinned_references_and_the_wrong_kind_are_refused") else {
            return;
        };
        let parent = tempfile::tempdir().unwrap();
        let tagged = format!("{}/banger/kernel-{KERNEL}:0.1.0", rel.reg.host());
        for unpinned in [
            tagged.as_str(),
            "127.0.0.1:1/x@sha512:00",
            "not a reference",
        ] {
            let (res, _) = pull(&rel, unpinned, ArtifactKind::KERNEL, parent.path());
            let err = res.unwrap_err();
            assert!(
                matches!(
                    err,
                    ArtifactError::NotPinned(_) | ArtifactError::InvalidReference(_)
                ),
                "{unpinned}: {err:?}"
            );
        }
        let (res, _) = pull(&rel, &rel.kernel_oci, ArtifactKind::IMAGE, parent.path());
        let err = res.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::WrongKind { detail, .. }
                if detail.contains("application/vnd.banger.kernel.v1")),
            "{err:?}"
        );
        assert!(is_empty(parent.path()));
    }

    #[test]
    fn a_registry_nobody_listens_on_is_unreachable() {
        let tmp = tempfile::tempdir().unwrap();
        // Bound then closed: nothing listens on this port.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let host = format!("127.0.0.1:{port}");
        let opts = PullOptions {
            insecure_registries: vec![host.clone()],
            docker_config: Some(tmp.path().join("no-docker-config.json")),
            cache_dir: tmp.path().join("cache"),
            size: None,
            ..PullOptions::default()
        };
        let reference = format!("{host}/banger/kernel-k@sha256:{}", "ab".repeat(32));
        let (res, _) = pull_with(&reference, ArtifactKind::KERNEL, &opts, tmp.path());
        let err = res.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
    }

    /// A banger installation whose catalogs are the release's.
    fn env_for(rel: &Release) -> BangerEnv {
        env_with_catalogs(&rel.tmp.path().join("out"), rel.reg.host())
    }

    /// A banger installation using the catalogs in `out`, with `registry`
    /// reachable over plain HTTP.
    fn env_with_catalogs(out: &Path, registry: &str) -> BangerEnv {
        let env = BangerEnv::new();
        env.write_config(&format!(
            "kernel_catalog_file = {:?}\nimage_catalog_file = {:?}\ninsecure_registries = [{:?}]\n",
            out.join("kernels.toml").display().to_string(),
            out.join("images.toml").display().to_string(),
            registry
        ));
        env
    }

    fn json(run: test_infra::Run) -> serde_json::Value {
        serde_json::from_str(&run.stdout).unwrap()
    }

    #[test]
    fn banger_pulls_the_release_through_the_written_catalogs() {
        let Some(rel) = release("banger_pulls_the_release_through_the_written_catalogs") else {
            return;
        };
        let env = env_for(&rel);
        env.banger(&["kernel", "pull", KERNEL]).ok();
        let k = json(env.banger(&["kernel", "show", KERNEL, "--json"]).ok());
        let vmlinux = k["vmlinux"].as_str().unwrap();
        assert_eq!(std::fs::read(vmlinux).unwrap(), rel.vmlinux);
        let initrd = k["initrd"].as_str().unwrap();
        assert_eq!(std::fs::read(initrd).unwrap(), rel.initrd);

        env.banger(&["image", "pull", IMAGE]).ok();
        let i = json(env.banger(&["image", "show", IMAGE, "--json"]).ok());
        let rootfs = i["rootfs"].as_str().unwrap();
        assert_eq!(std::fs::read(rootfs).unwrap(), rel.rootfs);
        assert_eq!(i["kernel"]["name"].as_str(), Some(KERNEL));
    }

    #[test]
    fn banger_refuses_a_tampered_release_and_builds_nothing_instead() {
        let Some(rel) = release("banger_refuses_a_tampered_release_and_builds_nothing_instead")
        else {
            return;
        };
        let blob = rel
            .reg
            .blob_file(&layer_of(&rel, &rel.kernel_oci, ArtifactKind::KERNEL));
        let mut bytes = std::fs::read(&blob).unwrap();
        bytes[100] ^= 0x01;
        std::fs::write(&blob, &bytes).unwrap();

        let env = env_for(&rel);
        let run = env.banger(&["kernel", "pull", KERNEL]).failed();
        assert!(
            run.stderr.contains("tampered or corrupt"),
            "stderr: {}",
            run.stderr
        );
        assert!(
            !run.stdout.contains("build_kernel") && !run.stderr.contains("build_kernel"),
            "a tampered artifact must not fall back to a local build:\n{}{}",
            run.stdout,
            run.stderr
        );
        env.banger(&["kernel", "show", KERNEL]).failed();
        let kernels = env.state_dir().join("kernels");
        let left: Vec<_> = std::fs::read_dir(&kernels)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", kernels.display());
    }

    /// The whole pipeline as a release runs it: `scripts/release-artifacts`
    /// builds the catalog defaults from their recipes with the real CLI,
    /// pushes them and writes pinned catalogs, which a fresh banger then
    /// pulls from. Slow (a kernel package and an mmdebstrap run from the
    /// host's mirror, about two minutes here).
    #[test]
    fn release_script_publishes_the_defaults_and_banger_pulls_them() {
        let test = "release_script_publishes_the_defaults_and_banger_pulls_them";
        for (tool, package) in [
            ("mmdebstrap", "mmdebstrap"),
            ("dpkg-deb", "dpkg"),
            ("apt-get", "apt"),
            ("python3", "python3"),
        ] {
            if test_infra::guest_artifacts::on_path(tool).is_none() {
                eprintln!("SKIPPED {test}: {tool} not installed (apt-get install {package})");
                return;
            }
        }
        let Some(reg) = Registry::start(test) else {
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/release-artifacts");
        for bin in ["banger", "bangerd", "banger-release"] {
            test_infra::workspace_bin(bin);
        }
        let run = Command::new(script)
            .arg(format!("{}/banger", reg.host()))
            .arg("--insecure")
            .arg("--out-dir")
            .arg(&out)
            .env("BANGER_BIN_DIR", test_infra::target_dir())
            .env("DOCKER_CONFIG", tmp.path().join("docker"))
            .output()
            .unwrap();
        let (kernels, images) = written_catalogs("release-artifacts", &run, &out);
        let kernel = kernels.default_entry().unwrap();
        let image = images.default_entry().unwrap();
        for oci in [&kernel.sources.oci, &image.sources.oci] {
            let oci = oci.as_deref().unwrap();
            assert!(oci.starts_with(&format!("{}/banger/", reg.host())), "{oci}");
        }

        let env = env_with_catalogs(&out, reg.host());
        env.banger(&["image", "pull", &image.name]).ok();
        let i = json(env.banger(&["image", "show", &image.name, "--json"]).ok());
        let rootfs = std::fs::metadata(i["rootfs"].as_str().unwrap()).unwrap();
        assert!(rootfs.len() >= 1 << 30, "rootfs is {} bytes", rootfs.len());
        let k = json(env.banger(&["kernel", "show", &kernel.name, "--json"]).ok());
        assert_eq!(k["distro"].as_str(), Some(kernel.distro.as_str()));
        assert!(
            std::fs::metadata(k["vmlinux"].as_str().unwrap())
                .unwrap()
                .len()
                > 1 << 20
        );
    }
}
