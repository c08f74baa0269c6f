//! The image catalog end to end: `pull_bundle` from a real HTTP server on
//! loopback serving real zstd tarballs (good, corrupt, hostile, malformed and
//! interrupted), into a real staging directory, and published through a real
//! image library backed by a SQLite file.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use banger_api::model::{ImageKernel, ImageSource};
    use banger_api::paths::Paths;
    use banger_artifacts::archive::ArchiveError;
    use banger_artifacts::download::{DownloadError, PullProgress};
    use banger_artifacts::imagecat::{
        Bundle, ImageCatalog, ImageCatalogError, MANIFEST_FILE, pull_bundle,
    };
    use banger_artifacts::images::PullOptions;
    use banger_core::library::ImageLibrary;
    use banger_core::store::Store;

    /// Registry settings for pulls: these catalogs list URLs, not OCI
    /// artifacts, so the defaults are never used.
    static NO_OCI: std::sync::LazyLock<PullOptions> =
        std::sync::LazyLock::new(PullOptions::default);
    use test_infra::http::{Entry as E, Reply, Server, noise, sha256, tar_zst};
    use test_infra::wait_until;

    const KERNEL: &str = "fc-6.12";
    const MANIFEST: &[u8] = b"kernel = \"fc-6.12\"\ndescription = \"test image\"\n";

    // ---- fixtures ----------------------------------------------------------

    /// A temp root holding `staging/` (where bundles go) and `outside/`
    /// (which hostile bundles aim at); nothing else may ever appear in it.
    struct Dirs {
        root: tempfile::TempDir,
    }

    impl Dirs {
        fn new() -> Dirs {
            let root = tempfile::tempdir().unwrap();
            fs::create_dir(root.path().join("staging")).unwrap();
            fs::create_dir(root.path().join("outside")).unwrap();
            Dirs { root }
        }

        fn staging(&self) -> PathBuf {
            self.root.path().join("staging")
        }

        fn outside(&self) -> PathBuf {
            self.root.path().join("outside")
        }

        fn list(dir: &Path) -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }

        /// Staging is empty, `outside/` is empty, and the root holds only
        /// the two of them.
        fn assert_untouched(&self, after: &str) {
            assert_eq!(
                Dirs::list(&self.staging()),
                Vec::<String>::new(),
                "staging after {after}"
            );
            assert_eq!(
                Dirs::list(&self.outside()),
                Vec::<String>::new(),
                "outside after {after}"
            );
            assert_eq!(
                Dirs::list(self.root.path()),
                vec!["outside".to_owned(), "staging".to_owned()],
                "root after {after}"
            );
        }
    }

    /// One catalog entry for `name`, served at `images/<name>.tar.zst`.
    fn entry(name: &str, sha: &str, size: usize) -> String {
        format!(
            "[[image]]\nname = {name:?}\narch = \"x86_64\"\nurl = \"images/{name}.tar.zst\"\nsha256 = {sha:?}\nsize = {size}\nkernel = {KERNEL:?}\ndescription = \"catalog text\"\n"
        )
    }

    /// Serves `bundle` for `name` and returns a catalog that lists it with
    /// the bundle's own sha256 and size, pointed at the server.
    fn publish(server: &Server, name: &str, bundle: Vec<u8>) -> ImageCatalog {
        let text = entry(name, &sha256(&bundle), bundle.len());
        server.route(&format!("/images/{name}.tar.zst"), Reply::Body(bundle));
        ImageCatalog::parse(&text)
            .unwrap()
            .with_base_url(&server.base)
    }

    fn chain(err: &dyn std::error::Error) -> String {
        let mut s = err.to_string();
        let mut src = err.source();
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s
    }

    /// Runs a pull expected to fail and checks it left nothing behind.
    async fn pull_fails(dirs: &Dirs, catalog: &ImageCatalog, name: &str) -> ImageCatalogError {
        let err = pull_bundle(catalog, name, &dirs.staging(), &NO_OCI, |_| {})
            .await
            .unwrap_err();
        eprintln!("{name}: {}", chain(&err));
        dirs.assert_untouched(name);
        err
    }

    /// The archive error under a failed bundle extraction.
    fn archive_error(err: &ImageCatalogError) -> &ArchiveError {
        match err {
            ImageCatalogError::Download(_, DownloadError::Extract { source, .. }) => source,
            other => panic!("expected an extraction error, got: {}", chain(other)),
        }
    }

    // ---- the good path -----------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_stages_rootfs_and_strips_the_manifest() {
        let server = Server::start();
        let dirs = Dirs::new();
        let rootfs = noise(3 << 20);
        let catalog = publish(
            &server,
            "deb",
            tar_zst(&[
                E::Dir("./"),
                E::File("manifest.toml", MANIFEST),
                E::File("rootfs.ext4", &rootfs),
            ]),
        );
        let mut events = Vec::new();
        let bundle = pull_bundle(&catalog, "deb", &dirs.staging(), &NO_OCI, |p| {
            events.push(p)
        })
        .await
        .unwrap();

        assert_eq!(bundle.rootfs, dirs.staging().join("rootfs.ext4"));
        assert!(fs::read(&bundle.rootfs).unwrap() == rootfs, "rootfs bytes");
        assert_eq!(bundle.manifest.kernel_ref, KERNEL);
        assert_eq!(bundle.manifest.description.as_deref(), Some("test image"));
        assert_eq!(bundle.name, "deb");
        assert_eq!(bundle.url, format!("{}/images/deb.tar.zst", server.base));
        assert_eq!(
            Dirs::list(&dirs.staging()),
            vec!["rootfs.ext4".to_owned()],
            "the manifest is stripped"
        );
        assert_eq!(Dirs::list(&dirs.outside()), Vec::<String>::new());

        assert_eq!(events.last(), Some(&PullProgress::Verified));
        let total = catalog.entries()[0].sources.size;
        assert!(total > 3 << 20, "noise does not compress: {total}");
        let downloads: Vec<(u64, u64)> = events
            .iter()
            .filter_map(|e| match e {
                PullProgress::Downloading { received, total } => Some((*received, *total)),
                PullProgress::Verified => None,
            })
            .collect();
        assert!(downloads.len() >= 3, "{downloads:?}");
        assert_eq!(downloads.last(), Some(&(total, total)));
        assert!(downloads.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulled_bundle_publishes_into_the_image_library() {
        let server = Server::start();
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        fs::create_dir_all(&paths.state_dir).unwrap();
        let store = Arc::new(Store::open(&paths.database()).unwrap());
        let library = ImageLibrary::new(&paths, store);
        let catalog = publish(
            &server,
            "deb",
            tar_zst(&[
                E::File("rootfs.ext4", b"ext4 bytes"),
                E::File("manifest.toml", MANIFEST),
            ]),
        );

        library.check_new_name("mine").unwrap();
        let staging = library.stage("mine").unwrap();
        let bundle: Bundle = pull_bundle(&catalog, "deb", staging.path(), &NO_OCI, |_| {})
            .await
            .unwrap();
        let record = library.publish(staging, bundle.record("mine")).unwrap();

        let final_dir = library.dir().join("mine");
        assert_eq!(record.rootfs, final_dir.join("rootfs.ext4"));
        assert_eq!(fs::read(&record.rootfs).unwrap(), b"ext4 bytes");
        assert_eq!(
            record.kernel,
            ImageKernel::Named {
                name: KERNEL.to_owned()
            }
        );
        assert_eq!(
            record.source,
            ImageSource::Catalog {
                name: "deb".to_owned(),
                url: format!("{}/images/deb.tar.zst", server.base),
            }
        );
        assert!(record.managed);
        assert_eq!(record.size_bytes, 10);
        assert_eq!(library.get("mine").unwrap(), record);
        assert_eq!(Dirs::list(&final_dir), vec!["rootfs.ext4".to_owned()]);
        assert_eq!(Dirs::list(library.dir()), vec!["mine".to_owned()]);
    }

    #[test]
    fn pull_future_is_send_so_the_daemon_can_spawn_it() {
        fn assert_send<T: Send>(_: &T) {}
        let catalog = ImageCatalog::parse("").unwrap();
        let (tx, _rx) = std::sync::mpsc::channel();
        let fut = pull_bundle(
            &catalog,
            "x",
            Path::new("/nonexistent"),
            &NO_OCI,
            move |p| {
                let _ = tx.send(p);
            },
        );
        assert_send(&fut);
    }

    // ---- refusals before any download ---------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_names_and_a_non_empty_staging_dir_are_refused() {
        let server = Server::start();
        let dirs = Dirs::new();
        let catalog = publish(
            &server,
            "deb",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", MANIFEST),
            ]),
        );
        assert!(catalog.find("docker.io/library/debian:12").is_none());
        let err = pull_fails(&dirs, &catalog, "docker.io/library/debian:12").await;
        assert!(
            matches!(&err, ImageCatalogError::NotInCatalog(n) if n == "docker.io/library/debian:12"),
            "{err}"
        );

        // Someone else's file in the staging dir is neither overwritten nor
        // removed.
        fs::write(dirs.staging().join("theirs"), b"keep").unwrap();
        let err = pull_bundle(&catalog, "deb", &dirs.staging(), &NO_OCI, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, ImageCatalogError::Staging(_)), "{err}");
        assert_eq!(
            fs::read(dirs.staging().join("theirs")).unwrap(),
            b"keep".to_vec()
        );
    }

    // ---- corrupt downloads ---------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_checksum_http_errors_and_truncation_leave_staging_empty() {
        let server = Server::start();
        let dirs = Dirs::new();
        let bundle = tar_zst(&[
            E::File("rootfs.ext4", &noise(256 << 10)),
            E::File("manifest.toml", MANIFEST),
        ]);

        // A checksum the bundle does not have: extraction ran to the end,
        // and still nothing is kept.
        let wrong = "ab".repeat(32);
        server.route("/images/badsha.tar.zst", Reply::Body(bundle.clone()));
        let cat = ImageCatalog::parse(&entry("badsha", &wrong, bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&dirs, &cat, "badsha").await;
        assert!(
            matches!(&err, ImageCatalogError::Download(n, DownloadError::ChecksumMismatch { expected, got, .. })
                if n == "badsha" && *expected == wrong && *got == sha256(&bundle)),
            "{}",
            chain(&err)
        );

        // Nothing served at the URL.
        let cat = ImageCatalog::parse(&entry("gone", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&dirs, &cat, "gone").await;
        assert!(
            matches!(
                &err,
                ImageCatalogError::Download(_, DownloadError::HttpStatus { status: 404, .. })
            ),
            "{}",
            chain(&err)
        );
        assert!(chain(&err).contains("/images/gone.tar.zst"), "{err}");

        // The server promises more than it sends, then closes.
        server.route(
            "/images/cut.tar.zst",
            Reply::Truncated {
                body: bundle[..bundle.len() / 2].to_vec(),
                claimed: bundle.len(),
            },
        );
        let cat = ImageCatalog::parse(&entry("cut", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&dirs, &cat, "cut").await;
        assert!(
            matches!(
                &err,
                ImageCatalogError::Download(_, DownloadError::Request { .. })
            ),
            "{}",
            chain(&err)
        );

        // The server sends more than the catalog's size.
        let mut longer = bundle.clone();
        longer.extend_from_slice(&[0u8; 4096]);
        server.route("/images/long.tar.zst", Reply::Body(longer));
        let cat = ImageCatalog::parse(&entry("long", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&dirs, &cat, "long").await;
        assert!(
            matches!(&err, ImageCatalogError::Download(_, DownloadError::SizeMismatch { expected, .. })
                if *expected == bundle.len() as u64),
            "{}",
            chain(&err)
        );
    }

    // ---- hostile tarballs ------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_entries_are_rejected_leaving_nothing_anywhere() {
        let server = Server::start();
        let dirs = Dirs::new();
        let outside = dirs.outside();
        let outside_str = outside.to_str().unwrap().to_owned();
        let abs_name = outside.join("abs-evil").to_str().unwrap().to_owned();
        let good = [
            E::File("rootfs.ext4", b"r"),
            E::File("manifest.toml", MANIFEST),
        ];
        let with = |extra: &[E<'_>]| {
            let mut v = good.to_vec();
            v.extend_from_slice(extra);
            tar_zst(&v)
        };

        // `../evil` from staging would land in the temp root.
        let cat = publish(&server, "dotdot", with(&[E::File("../evil", b"x")]));
        let err = pull_fails(&dirs, &cat, "dotdot").await;
        assert!(
            matches!(archive_error(&err), ArchiveError::ParentComponent { entry } if entry == "../evil"),
            "{}",
            chain(&err)
        );

        // An absolute path into `outside/`.
        let cat = publish(&server, "abs", with(&[E::File(&abs_name, b"x")]));
        let err = pull_fails(&dirs, &cat, "abs").await;
        assert!(
            matches!(archive_error(&err), ArchiveError::AbsolutePath { entry } if *entry == abs_name),
            "{}",
            chain(&err)
        );

        // A symlink to `outside/` and a file written through it.
        let cat = publish(
            &server,
            "abslink",
            with(&[E::Sym("etc", &outside_str), E::File("etc/owned", b"x")]),
        );
        let err = pull_fails(&dirs, &cat, "abslink").await;
        assert!(
            matches!(archive_error(&err), ArchiveError::SymlinkEscapes { entry, .. } if entry == "etc"),
            "{}",
            chain(&err)
        );

        // A relative link climbing out, then written through.
        let cat = publish(
            &server,
            "rellink",
            with(&[E::Sym("up", "../outside"), E::File("up/owned", b"x")]),
        );
        let err = pull_fails(&dirs, &cat, "rellink").await;
        assert!(
            matches!(archive_error(&err), ArchiveError::ThroughSymlink { entry, .. } if entry == "up/owned"),
            "{}",
            chain(&err)
        );

        // The rootfs itself as a link out of the bundle.
        let cat = publish(
            &server,
            "rootlink",
            tar_zst(&[
                E::Sym("rootfs.ext4", "../outside/disk"),
                E::File("manifest.toml", MANIFEST),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "rootlink").await;
        assert!(
            matches!(
                archive_error(&err),
                ArchiveError::SymlinkEscapes { entry, .. } if entry == "rootfs.ext4"
            ),
            "{}",
            chain(&err)
        );
    }

    // ---- malformed bundles -------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bundles_without_the_exact_layout_are_rejected_by_name() {
        let server = Server::start();
        let dirs = Dirs::new();

        let cat = publish(
            &server,
            "extra",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", MANIFEST),
                E::File("vmlinux", b"k"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "extra").await;
        assert!(
            matches!(&err, ImageCatalogError::UnexpectedEntry { entry, .. } if entry == "vmlinux"),
            "{err}"
        );
        assert!(err.to_string().contains("rootfs.ext4"), "{err}");

        let cat = publish(
            &server,
            "extradir",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", MANIFEST),
                E::File("boot/vmlinuz", b"k"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "extradir").await;
        assert!(
            matches!(&err, ImageCatalogError::UnexpectedEntry { entry, .. } if entry == "boot"),
            "{err}"
        );

        let cat = publish(
            &server,
            "norootfs",
            tar_zst(&[E::File("manifest.toml", MANIFEST)]),
        );
        let err = pull_fails(&dirs, &cat, "norootfs").await;
        assert!(matches!(err, ImageCatalogError::MissingRootfs(_)), "{err}");
        assert!(err.to_string().contains("rootfs.ext4"), "{err}");

        // A link to the manifest is not a regular rootfs.
        let cat = publish(
            &server,
            "rootisalink",
            tar_zst(&[
                E::File("manifest.toml", MANIFEST),
                E::Sym("rootfs.ext4", "manifest.toml"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "rootisalink").await;
        assert!(matches!(err, ImageCatalogError::MissingRootfs(_)), "{err}");

        let cat = publish(
            &server,
            "nomanifest",
            tar_zst(&[E::File("rootfs.ext4", b"r")]),
        );
        let err = pull_fails(&dirs, &cat, "nomanifest").await;
        assert!(
            matches!(err, ImageCatalogError::MissingManifest(_)),
            "{err}"
        );
        assert!(err.to_string().contains(MANIFEST_FILE), "{err}");

        let cat = publish(
            &server,
            "nokernel",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", b"description = \"no kernel\"\n"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "nokernel").await;
        assert!(
            matches!(err, ImageCatalogError::ManifestNoKernel(_)),
            "{err}"
        );
        assert!(err.to_string().contains("kernel = "), "{err}");

        let cat = publish(
            &server,
            "otherkernel",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", b"kernel = \"debian-6.1\"\n"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "otherkernel").await;
        assert!(
            matches!(&err, ImageCatalogError::KernelMismatch { catalog, manifest, .. }
                if catalog == KERNEL && manifest == "debian-6.1"),
            "{err}"
        );

        let cat = publish(
            &server,
            "badtoml",
            tar_zst(&[
                E::File("rootfs.ext4", b"r"),
                E::File("manifest.toml", b"kernel = [unclosed\n"),
            ]),
        );
        let err = pull_fails(&dirs, &cat, "badtoml").await;
        assert!(matches!(err, ImageCatalogError::ReadManifest(..)), "{err}");
    }

    // ---- interruption --------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn abandoned_pull_removes_its_staging_dir_once_the_extractor_stops() {
        let server = Server::start();
        let dirs = Dirs::new();
        let rootfs = noise(4 << 20);
        let bundle = tar_zst(&[
            E::File("manifest.toml", MANIFEST),
            E::File("rootfs.ext4", &rootfs),
        ]);
        let catalog = ImageCatalog::parse(&entry("slow", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        server.route(
            "/images/slow.tar.zst",
            Reply::Stall {
                body: bundle[..bundle.len() / 2].to_vec(),
                claimed: bundle.len(),
            },
        );
        let received = Arc::new(AtomicU64::new(0));
        let task = {
            let (catalog, received, staging) =
                (catalog.clone(), Arc::clone(&received), dirs.staging());
            tokio::spawn(async move {
                pull_bundle(&catalog, "slow", &staging, &NO_OCI, |p| {
                    if let PullProgress::Downloading { received: r, .. } = p {
                        received.store(r, Ordering::SeqCst);
                    }
                })
                .await
            })
        };
        let seen = Arc::clone(&received);
        let staging = dirs.staging();
        tokio::task::spawn_blocking(move || {
            wait_until(
                Duration::from_secs(20),
                "the rootfs to be half written",
                || {
                    seen.load(Ordering::SeqCst) >= 1 << 20
                        && fs::metadata(staging.join("rootfs.ext4")).is_ok_and(|m| m.len() > 0)
                },
            )
        })
        .await
        .unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let staging = dirs.staging();
        tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(20), "the staging dir to go", || {
                !staging.exists()
            })
        })
        .await
        .unwrap();
        assert_eq!(
            Dirs::list(dirs.root.path()),
            vec!["outside".to_owned()],
            "nothing but the untouched outside dir"
        );

        // The next pull into a fresh staging dir succeeds.
        fs::create_dir(dirs.staging()).unwrap();
        server.route("/images/slow.tar.zst", Reply::Body(bundle));
        let pulled = pull_bundle(&catalog, "slow", &dirs.staging(), &NO_OCI, |_| {})
            .await
            .unwrap();
        assert!(fs::read(&pulled.rootfs).unwrap() == rootfs);
    }
}
