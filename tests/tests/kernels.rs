//! Local kernels end to end: `pull` from a real HTTP server on loopback
//! (good, corrupt, hostile and interrupted downloads), `import` from real
//! directories, and staging cleanup, all against a real kernels root.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use banger_artifacts::archive::ArchiveError;
    use banger_artifacts::images::PullOptions;
    use banger_artifacts::kernels::{Catalog, KernelError, KernelStore, PullProgress, pull};
    use test_infra::http::{Entry as E, Reply, Server, noise, sha256, tar_zst};

    // ---- bundles -----------------------------------------------------------

    fn good_bundle(kernel: &[u8]) -> Vec<u8> {
        tar_zst(&[
            E::File("vmlinux", kernel),
            E::File("initrd.img", b"initrd bytes"),
            E::File("lib/modules/6.12.7/kernel/virtio.ko", b"module"),
            E::Sym("lib/modules/6.12.7/alias.ko", "kernel/virtio.ko"),
            E::File(
                "manifest.toml",
                b"distro = \"test-distro\"\nversion = \"6.12.7\"\n",
            ),
        ])
    }

    /// One catalog entry for `name`, served at `kernels/<name>.tar.zst`.
    fn entry(name: &str, sha: &str, size: usize) -> String {
        format!(
            "[[kernel]]\nname = {name:?}\narch = \"x86_64\"\ndistro = \"catalog-distro\"\nversion = \"6.12\"\nurl = \"kernels/{name}.tar.zst\"\nsha256 = {sha:?}\nsize = {size}\ndescription = \"test kernel\"\n"
        )
    }

    /// Serves `bundle` for `name` and returns a catalog that lists it with
    /// the bundle's own sha256 and size, pointed at the server.
    fn publish(server: &Server, name: &str, bundle: Vec<u8>) -> Catalog {
        let text = entry(name, &sha256(&bundle), bundle.len());
        server.route(&format!("/kernels/{name}.tar.zst"), Reply::Body(bundle));
        Catalog::parse(&text).unwrap().with_base_url(&server.base)
    }

    // ---- helpers -----------------------------------------------------------

    fn store() -> (tempfile::TempDir, KernelStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = KernelStore::new(dir.path().join("state/kernels"));
        (dir, store)
    }

    /// Everything in the kernels root (a missing root counts as empty).
    fn leftovers(store: &KernelStore) -> Vec<String> {
        match fs::read_dir(store.root()) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    async fn pull_quiet(
        store: &KernelStore,
        catalog: &Catalog,
        name: &str,
        force: bool,
    ) -> Result<banger_artifacts::kernels::LocalKernel, KernelError> {
        pull(store, catalog, name, force, &PullOptions::default(), |_| {}).await
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // ---- pull --------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_installs_kernel_with_manifest_and_normalised_layout() {
        let server = Server::start();
        let (_d, store) = store();
        let kernel = vec![0x7fu8; 3 << 20];
        let catalog = publish(&server, "fc-6.12", good_bundle(&kernel));
        let mut events = Vec::new();
        let local = pull(
            &store,
            &catalog,
            "fc-6.12",
            false,
            &PullOptions::default(),
            |p| events.push(p),
        )
        .await
        .unwrap();

        let m = &local.manifest;
        assert_eq!(m.name, "fc-6.12");
        assert_eq!(
            m.distro, "test-distro",
            "the bundle's manifest wins over the catalog"
        );
        assert_eq!(m.version, "6.12.7");
        assert_eq!(m.arch, "x86_64");
        assert_eq!(m.sha256, sha256(&kernel));
        assert_eq!(
            m.source,
            format!("pull:{}/kernels/fc-6.12.tar.zst", server.base)
        );
        assert!(m.imported_at.ends_with('Z'), "{}", m.imported_at);
        assert_eq!(local.dir, store.root().join("fc-6.12"));
        assert_eq!(fs::read(&local.vmlinux).unwrap(), kernel);
        assert_eq!(
            fs::read(local.initrd.as_ref().unwrap()).unwrap(),
            b"initrd bytes"
        );
        let modules = local.modules.as_ref().unwrap();
        assert_eq!(
            fs::read(modules.join("6.12.7/alias.ko")).unwrap(),
            b"module"
        );
        assert!(
            !local.dir.join("lib").exists(),
            "lib/modules moved to modules/"
        );
        assert_eq!(leftovers(&store), vec!["fc-6.12".to_owned()]);
        assert_eq!(store.get("fc-6.12").unwrap().unwrap(), local);
        assert_eq!(store.list().unwrap(), vec![local.manifest.clone()]);

        assert_eq!(events.last(), Some(&PullProgress::Verified));
        let last_download = events.iter().rev().find_map(|e| match e {
            PullProgress::Downloading { received, total } => Some((*received, *total)),
            PullProgress::Verified => None,
        });
        let total = catalog.entries()[0].sources.size;
        assert_eq!(last_download, Some((total, total)));
    }

    #[test]
    fn pull_future_is_send_so_the_daemon_can_spawn_it() {
        fn assert_send<T: Send>(_: &T) {}
        let (_d, store) = store();
        let catalog = Catalog::parse("").unwrap();
        let (tx, _rx) = std::sync::mpsc::channel();
        let opts = PullOptions::default();
        let fut = pull(&store, &catalog, "k", false, &opts, move |p| {
            let _ = tx.send(p);
        });
        assert_send(&fut);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_refuses_existing_kernel_unless_forced_then_replaces_it() {
        let server = Server::start();
        let (_d, store) = store();
        let v1 = publish(&server, "k", good_bundle(b"kernel v1"));
        pull_quiet(&store, &v1, "k", false).await.unwrap();

        let v2 = publish(&server, "k", good_bundle(b"kernel v2"));
        let err = pull_quiet(&store, &v2, "k", false).await.unwrap_err();
        assert!(
            matches!(&err, KernelError::AlreadyExists(n) if n == "k"),
            "{err}"
        );
        assert!(err.to_string().contains("--force"), "{err}");
        let kept = store.get("k").unwrap().unwrap();
        assert_eq!(fs::read(&kept.vmlinux).unwrap(), b"kernel v1");

        let replaced = pull_quiet(&store, &v2, "k", true).await.unwrap();
        assert_eq!(fs::read(&replaced.vmlinux).unwrap(), b"kernel v2");
        assert_eq!(replaced.manifest.sha256, sha256(b"kernel v2"));
        assert_eq!(
            leftovers(&store),
            vec!["k".to_owned()],
            "old kernel and staging are gone"
        );
    }

    /// Runs a pull expected to fail and checks it left nothing behind.
    async fn pull_fails(store: &KernelStore, catalog: &Catalog, name: &str) -> KernelError {
        let err = pull_quiet(store, catalog, name, false).await.unwrap_err();
        eprintln!("{name}: {}", chain(&err));
        assert_eq!(leftovers(store), Vec::<String>::new(), "after: {err}");
        err
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_rejects_bad_checksum_http_errors_and_truncation_leaving_nothing() {
        let server = Server::start();
        let (_d, store) = store();
        let bundle = good_bundle(b"kernel");

        // A checksum the bundle does not have.
        let wrong = "ab".repeat(32);
        let text = entry("badsha", &wrong, bundle.len());
        server.route("/kernels/badsha.tar.zst", Reply::Body(bundle.clone()));
        let cat = Catalog::parse(&text).unwrap().with_base_url(&server.base);
        let err = pull_fails(&store, &cat, "badsha").await;
        assert!(
            matches!(&err, KernelError::ChecksumMismatch { expected, .. } if *expected == wrong),
            "{err}"
        );
        assert!(err.to_string().contains(&sha256(&bundle)), "{err}");

        // Nothing served at the URL.
        let cat = Catalog::parse(&entry("gone", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&store, &cat, "gone").await;
        assert!(
            matches!(err, KernelError::HttpStatus { status: 404, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("/kernels/gone.tar.zst"), "{err}");

        // The server promises more than it sends, then closes.
        let half = bundle[..bundle.len() / 2].to_vec();
        server.route(
            "/kernels/cut.tar.zst",
            Reply::Truncated {
                body: half,
                claimed: bundle.len(),
            },
        );
        let cat = Catalog::parse(&entry("cut", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        let err = pull_fails(&store, &cat, "cut").await;
        assert!(
            matches!(err, KernelError::Download { .. }),
            "{}",
            chain(&err)
        );

        // A name the catalog does not list.
        let err = pull_fails(&store, &cat, "nope").await;
        assert!(
            matches!(&err, KernelError::NotInCatalog(n) if n == "nope"),
            "{err}"
        );
        assert!(err.to_string().contains("kernel list --available"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_rejects_hostile_tarballs_leaving_nothing() {
        let server = Server::start();
        let (dir, store) = store();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let abs_target = outside.join("abs-evil");
        let abs_name = abs_target.to_str().unwrap().to_owned();
        let outside_str = outside.to_str().unwrap().to_owned();

        // `../evil` from the staging dir would land in the kernels root.
        let cat = publish(
            &server,
            "dotdot",
            tar_zst(&[E::File("vmlinux", b"k"), E::File("../evil", b"x")]),
        );
        let err = pull_fails(&store, &cat, "dotdot").await;
        assert!(
            matches!(&err, KernelError::Extract(_, ArchiveError::ParentComponent { entry }) if entry == "../evil"),
            "{}",
            chain(&err)
        );
        assert!(chain(&err).contains("../evil"));

        let cat = publish(
            &server,
            "absolute",
            tar_zst(&[E::File("vmlinux", b"k"), E::File(&abs_name, b"x")]),
        );
        let err = pull_fails(&store, &cat, "absolute").await;
        assert!(
            matches!(
                &err,
                KernelError::Extract(_, ArchiveError::AbsolutePath { .. })
            ),
            "{}",
            chain(&err)
        );
        assert!(!abs_target.exists());

        // A link to a directory outside, then a file written through it.
        let cat = publish(
            &server,
            "abslink",
            tar_zst(&[
                E::File("vmlinux", b"k"),
                E::Sym("etc", &outside_str),
                E::File("etc/owned", b"x"),
            ]),
        );
        let err = pull_fails(&store, &cat, "abslink").await;
        assert!(
            matches!(&err, KernelError::Extract(_, ArchiveError::SymlinkEscapes { entry, .. }) if entry == "etc"),
            "{}",
            chain(&err)
        );
        assert!(!outside.join("owned").exists());

        // The same with a relative link climbing out.
        let cat = publish(
            &server,
            "rellink",
            tar_zst(&[
                E::File("vmlinux", b"k"),
                E::Sym("up", "../../../outside"),
                E::File("up/owned", b"x"),
            ]),
        );
        let err = pull_fails(&store, &cat, "rellink").await;
        assert!(
            matches!(&err, KernelError::Extract(_, ArchiveError::ThroughSymlink { entry, .. }) if entry == "up/owned"),
            "{}",
            chain(&err)
        );
        assert!(!outside.join("owned").exists());

        // A relative link climbing out, with nothing written through it.
        let cat = publish(
            &server,
            "dangling",
            tar_zst(&[E::File("vmlinux", b"k"), E::Sym("etc", "../../etc")]),
        );
        let err = pull_fails(&store, &cat, "dangling").await;
        assert!(
            matches!(
                &err,
                KernelError::Extract(_, ArchiveError::SymlinkEscapes { .. })
            ),
            "{}",
            chain(&err)
        );

        let cat = publish(&server, "nokernel", tar_zst(&[E::File("initrd", b"i")]));
        let err = pull_fails(&store, &cat, "nokernel").await;
        assert!(matches!(err, KernelError::MissingVmlinux(_)), "{err}");
        assert!(err.to_string().contains("vmlinux"), "{err}");

        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interrupted_pull_leaves_nothing_and_the_next_pull_succeeds() {
        let server = Server::start();
        let (_d, store) = store();
        let kernel = noise(4 << 20);
        let bundle = good_bundle(&kernel);
        let catalog = Catalog::parse(&entry("slow", &sha256(&bundle), bundle.len()))
            .unwrap()
            .with_base_url(&server.base);
        server.route(
            "/kernels/slow.tar.zst",
            Reply::Stall {
                body: bundle[..bundle.len() / 2].to_vec(),
                claimed: bundle.len(),
            },
        );
        let received = Arc::new(AtomicU64::new(0));
        let task = {
            let (store, catalog, received) =
                (store.clone(), catalog.clone(), Arc::clone(&received));
            tokio::spawn(async move {
                pull(
                    &store,
                    &catalog,
                    "slow",
                    false,
                    &PullOptions::default(),
                    |p| {
                        if let PullProgress::Downloading { received: r, .. } = p {
                            received.store(r, Ordering::SeqCst);
                        }
                    },
                )
                .await
            })
        };
        let seen = Arc::clone(&received);
        tokio::task::spawn_blocking(move || {
            wait_until("the download to be under way", || {
                seen.load(Ordering::SeqCst) >= 1 << 20
            })
        })
        .await
        .unwrap();
        assert!(
            leftovers(&store)
                .iter()
                .any(|n| n.starts_with(".staging-slow-"))
        );
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        let st = store.clone();
        tokio::task::spawn_blocking(move || {
            wait_until("the staging dir to go", || leftovers(&st).is_empty())
        })
        .await
        .unwrap();

        server.route("/kernels/slow.tar.zst", Reply::Body(bundle));
        let local = pull_quiet(&store, &catalog, "slow", false).await.unwrap();
        assert_eq!(local.manifest.sha256, sha256(&kernel));
        assert_eq!(leftovers(&store), vec!["slow".to_owned()]);
    }

    // ---- staging cleanup ---------------------------------------------------

    #[test]
    fn cleanup_staging_removes_leftovers_from_a_crash_and_keeps_kernels() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("vmlinux"), b"\x7fELF k").unwrap();
        store.import("kept", src.path(), false).unwrap();
        let leftover = store.root().join(".staging-kept-00000000deadbeef");
        fs::create_dir_all(leftover.join("modules/6.1")).unwrap();
        fs::write(leftover.join("vmlinux"), b"half").unwrap();

        assert_eq!(store.cleanup_staging().unwrap(), 1);
        assert_eq!(leftovers(&store), vec!["kept".to_owned()]);
        assert!(store.get("kept").unwrap().is_some());
        assert_eq!(store.cleanup_staging().unwrap(), 0);
    }

    // ---- import ------------------------------------------------------------

    #[test]
    fn import_discovers_artifacts_by_conventional_names() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::write(s.join("vmlinux-6.1.0-18-amd64"), b"\x7fELF debian kernel").unwrap();
        fs::write(s.join("initrd.img-6.1.0-18-amd64"), b"debian initrd").unwrap();
        fs::create_dir_all(s.join("lib/modules/6.1.0-18-amd64/kernel")).unwrap();
        fs::write(s.join("lib/modules/6.1.0-18-amd64/kernel/a.ko"), b"ko").unwrap();
        std::os::unix::fs::symlink(
            "/usr/src/linux-headers",
            s.join("lib/modules/6.1.0-18-amd64/build"),
        )
        .unwrap();
        fs::write(s.join("config-6.1.0-18-amd64"), b"not a kernel").unwrap();

        let local = store.import("debian-6.1", s, false).unwrap();
        let m = &local.manifest;
        assert_eq!(m.name, "debian-6.1");
        assert_eq!(m.version, "6.1.0-18-amd64");
        assert_eq!(m.sha256, sha256(b"\x7fELF debian kernel"));
        assert_eq!(
            m.source,
            format!("import:{}", fs::canonicalize(s).unwrap().display())
        );
        assert_eq!(fs::read(&local.vmlinux).unwrap(), b"\x7fELF debian kernel");
        assert_eq!(
            fs::read(local.initrd.as_ref().unwrap()).unwrap(),
            b"debian initrd"
        );
        let modules = local.modules.as_ref().unwrap();
        assert_eq!(
            fs::read(modules.join("6.1.0-18-amd64/kernel/a.ko")).unwrap(),
            b"ko"
        );
        assert_eq!(
            fs::read_link(modules.join("6.1.0-18-amd64/build")).unwrap(),
            Path::new("/usr/src/linux-headers"),
            "symlinks are copied, not followed"
        );
        assert_eq!(store.list().unwrap(), vec![local.manifest.clone()]);
        assert_eq!(leftovers(&store), vec!["debian-6.1".to_owned()]);

        let err = store.import("debian-6.1", s, false).unwrap_err();
        assert!(matches!(err, KernelError::AlreadyExists(_)), "{err}");
        fs::write(s.join("vmlinux-6.1.0-18-amd64"), b"\x7fELF rebuilt").unwrap();
        let again = store.import("debian-6.1", s, true).unwrap();
        assert_eq!(fs::read(&again.vmlinux).unwrap(), b"\x7fELF rebuilt");
        assert_eq!(leftovers(&store), vec!["debian-6.1".to_owned()]);
    }

    #[test]
    fn import_follows_a_metadata_file_over_globs() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir(s.join("boot")).unwrap();
        fs::write(s.join("boot/kernel.bin"), b"\x7fELF named kernel").unwrap();
        fs::write(s.join("boot/ramdisk"), b"named initrd").unwrap();
        // Decoys the globs would trip over.
        fs::write(s.join("vmlinux-a"), b"a").unwrap();
        fs::write(s.join("vmlinux-b"), b"b").unwrap();
        fs::write(
            s.join("banger-kernel.toml"),
            "kernel = \"boot/kernel.bin\"\ninitrd = \"boot/ramdisk\"\ndistro = \"debian\"\nversion = \"6.1\"\n",
        )
        .unwrap();

        let local = store.import("named", s, false).unwrap();
        assert_eq!(fs::read(&local.vmlinux).unwrap(), b"\x7fELF named kernel");
        assert_eq!(
            fs::read(local.initrd.as_ref().unwrap()).unwrap(),
            b"named initrd"
        );
        assert_eq!(local.modules, None);
        assert_eq!(local.manifest.distro, "debian");
        assert_eq!(local.manifest.version, "6.1");

        fs::write(
            s.join("banger-kernel.toml"),
            "kernel = \"../../etc/passwd\"\n",
        )
        .unwrap();
        let err = store.import("escape", s, false).unwrap_err();
        assert!(matches!(err, KernelError::Discover { .. }), "{err}");
        assert_eq!(leftovers(&store), vec!["named".to_owned()]);
    }

    #[test]
    fn import_rejects_ambiguous_or_missing_kernels_leaving_nothing() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        let err = store.import("k", s, false).unwrap_err();
        assert!(matches!(err, KernelError::Discover { .. }), "{err}");
        assert!(err.to_string().contains("vmlinux"), "{err}");

        fs::write(s.join("vmlinux-6.1"), b"a").unwrap();
        fs::write(s.join("vmlinux-6.12"), b"b").unwrap();
        let err = store.import("k", s, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("vmlinux-6.1,") && msg.contains("vmlinux-6.12"),
            "{msg}"
        );
        assert_eq!(leftovers(&store), Vec::<String>::new());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_names_are_rejected_everywhere() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("vmlinux"), b"\x7fELF k").unwrap();
        let catalog = Catalog::parse("").unwrap();
        for bad in ["../x", "A", "", "a/b", "x..y"] {
            let e = store.import(bad, src.path(), false).unwrap_err();
            assert!(
                matches!(&e, KernelError::InvalidName(n) if n == bad),
                "{bad}: {e}"
            );
            assert!(
                matches!(store.get(bad), Err(KernelError::InvalidName(_))),
                "{bad}"
            );
            assert!(
                matches!(store.remove(bad), Err(KernelError::InvalidName(_))),
                "{bad}"
            );
            let e = pull_quiet(&store, &catalog, bad, false).await.unwrap_err();
            assert!(matches!(e, KernelError::InvalidName(_)), "{bad}: {e}");
        }
        assert_eq!(leftovers(&store), Vec::<String>::new());
        assert!(!_d.path().join("x").exists());
    }

    #[test]
    fn remove_deletes_a_kernel_and_reports_missing_ones() {
        let (_d, store) = store();
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("vmlinux"), b"\x7fELF k").unwrap();
        store.import("gone", src.path(), false).unwrap();
        store.remove("gone").unwrap();
        assert_eq!(store.get("gone").unwrap(), None);
        assert_eq!(leftovers(&store), Vec::<String>::new());
        let err = store.remove("gone").unwrap_err();
        assert!(
            matches!(&err, KernelError::NotFound(n) if n == "gone"),
            "{err}"
        );
    }
}
