//! `images::pull_rootfs` against a real registry on loopback (Debian's
//! `docker-registry`) with images these tests build and push: layering,
//! whiteouts, opaque dirs, links, setuid and non-root ownership, index
//! resolution, plain-HTTP refusal, the layer cache, auth, cleanup after
//! failures and pulling as an unprivileged user. The ext4 is inspected with
//! `debugfs`.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use banger_api::model::ByteSize;
    use banger_artifacts::images::{ImageError, PullEvent, PullOptions, PulledRootfs, pull_rootfs};
    use test_infra::registry::{Entry, Registry, TestLayer};

    const DEBUGFS: &str = "/usr/sbin/debugfs";
    const GIB: u64 = 1 << 30;

    fn tools_present(test: &str) -> bool {
        let ok = Path::new(DEBUGFS).exists() && Path::new("/usr/sbin/mkfs.ext4").exists();
        if !ok {
            eprintln!(
                "SKIPPED {test}: mkfs.ext4/debugfs not installed (apt-get install e2fsprogs)"
            );
        }
        ok
    }

    /// A pull's working dirs: staging, cache and a host dir hostile layers
    /// aim at.
    struct Dirs {
        _tmp: tempfile::TempDir,
        staging: PathBuf,
        cache: PathBuf,
        outside: PathBuf,
    }

    fn dirs() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let d = Dirs {
            staging: tmp.path().join("staging"),
            cache: tmp.path().join("cache"),
            outside: tmp.path().join("outside"),
            _tmp: tmp,
        };
        for p in [&d.staging, &d.cache, &d.outside] {
            std::fs::create_dir(p).unwrap();
        }
        d
    }

    fn opts(reg: &Registry, d: &Dirs) -> PullOptions {
        PullOptions {
            insecure_registries: vec![reg.host().to_string()],
            docker_config: Some(d.cache.join("no-docker-config.json")),
            cache_dir: d.cache.clone(),
            size: None,
            ..PullOptions::default()
        }
    }

    fn layer(gzip: bool, entries: Vec<Entry>) -> TestLayer {
        TestLayer { entries, gzip }
    }

    /// The three-layer image most tests use; `outside` is a host directory
    /// that a hostile symlink points at.
    fn layered_image(outside: &Path) -> Vec<TestLayer> {
        let outside = outside.to_str().unwrap();
        vec![
            layer(
                true,
                vec![
                    Entry::dir("etc", 0o755),
                    Entry::file("etc/hostname", "first\n"),
                    Entry::file("etc/doomed", "delete me\n"),
                    Entry::dir("usr", 0o755),
                    Entry::dir("usr/bin", 0o755),
                    Entry::owned("usr/bin/sudo", "#!sudo\n", 0o4755, 0, 0),
                    Entry::hardlink("usr/bin/sudoedit", "usr/bin/sudo"),
                    Entry::symlink("bin", "usr/bin"),
                    Entry::symlink("etc/abs-hostname", "/etc/hostname"),
                    Entry::dir("home", 0o755),
                    Entry::dir("home/user", 0o750),
                    Entry::owned("home/user/secret", "mine\n", 0o640, 1000, 1000),
                    Entry::dir("tmp", 0o1777),
                    Entry::dir("data", 0o755),
                    Entry::dir("data/opaque", 0o755),
                    Entry::file("data/opaque/old-a", "a"),
                    Entry::dir("data/opaque/old-dir", 0o755),
                    Entry::file("data/opaque/old-dir/nested", "n"),
                ],
            ),
            layer(
                false,
                vec![
                    Entry::whiteout("etc/doomed"),
                    Entry::dir("data/opaque", 0o755),
                    Entry::opaque("data/opaque"),
                    Entry::file("data/opaque/new", "fresh\n"),
                    Entry::symlink("escape", outside),
                    Entry::owned("bin/wall", "#!wall\n", 0o2755, 0, 5),
                ],
            ),
            layer(
                true,
                vec![
                    Entry::file("etc/hostname", "banger\n"),
                    Entry::file("escape/pwned", "should stay inside the image\n"),
                ],
            ),
        ]
    }

    /// Runs `debugfs -R cmd image`, returning stdout and stderr.
    fn debugfs(image: &Path, cmd: &str) -> (String, String) {
        let out = Command::new(DEBUGFS)
            .arg("-R")
            .arg(cmd)
            .arg(image)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn cat(image: &Path, path: &str) -> String {
        debugfs(image, &format!("cat {path}")).0
    }

    /// `(type+mode in octal, uid, gid, inode, links)` from `debugfs stat`.
    fn stat(image: &Path, path: &str) -> (String, u64, u64, u64, u64) {
        let (out, err) = debugfs(image, &format!("stat {path}"));
        assert!(out.contains("Inode:"), "stat {path} failed: {err}");
        let field = |name: &str| -> String {
            let at = out.find(name).unwrap_or_else(|| panic!("{name} in {out}")) + name.len();
            out[at..].split_whitespace().next().unwrap().to_string()
        };
        let kind = field("Type:");
        let type_bits = match kind.as_str() {
            "regular" => "10",
            "directory" => "4",
            "symlink" => "12",
            other => panic!("unexpected type {other}"),
        };
        let mode = format!("{type_bits}{:0>4}", field("Mode:").trim_start_matches('0'));
        (
            mode,
            field("User:").parse().unwrap(),
            field("Group:").parse().unwrap(),
            field("Inode:").parse().unwrap(),
            field("Links:").parse().unwrap(),
        )
    }

    fn exists(image: &Path, path: &str) -> bool {
        let (out, _) = debugfs(image, &format!("stat {path}"));
        out.contains("Inode:")
    }

    fn ls(image: &Path, dir: &str) -> Vec<String> {
        let (out, _) = debugfs(image, &format!("ls -l {dir}"));
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        names
    }

    /// The tools check, a registry and fresh dirs; `None` (after saying why)
    /// when the test must skip.
    fn registry_and_dirs(test: &str) -> Option<(Registry, Dirs)> {
        if !tools_present(test) {
            return None;
        }
        Some((Registry::start(test)?, dirs()))
    }

    fn staging_entries(d: &Dirs) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&d.staging)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Asserts the layered image's contents, ownership and modes in `image`.
    fn assert_layered_rootfs(image: &Path, outside: &Path) {
        assert_eq!(cat(image, "/etc/hostname"), "banger\n", "upper layer wins");
        assert!(!exists(image, "/etc/doomed"), "whiteout deletes");
        assert!(
            !exists(image, "/etc/.wh.doomed"),
            "whiteout markers are not copied"
        );
        assert_eq!(
            ls(image, "/data/opaque"),
            vec!["new".to_string()],
            "opaque dir hides lower content"
        );
        assert_eq!(cat(image, "/data/opaque/new"), "fresh\n");

        let sudo = stat(image, "/usr/bin/sudo");
        assert_eq!(
            (sudo.0.as_str(), sudo.1, sudo.2),
            ("104755", 0, 0),
            "setuid root stays setuid root"
        );
        let sudoedit = stat(image, "/usr/bin/sudoedit");
        assert_eq!(sudoedit.3, sudo.3, "hardlink shares the inode");
        assert_eq!(sudo.4, 2, "two links");
        let wall = stat(image, "/usr/bin/wall");
        assert_eq!(
            (wall.0.as_str(), wall.1, wall.2),
            ("102755", 0, 5),
            "written through the bin symlink, setgid kept"
        );

        let secret = stat(image, "/home/user/secret");
        assert_eq!(
            (secret.0.as_str(), secret.1, secret.2),
            ("100640", 1000, 1000)
        );
        assert_eq!(cat(image, "/home/user/secret"), "mine\n");
        assert_eq!(stat(image, "/home/user").0, "40750");
        assert_eq!(stat(image, "/tmp").0, "41777", "sticky dir");
        let root = stat(image, "/");
        assert_eq!((root.1, root.2), (0, 0), "root dir owned by root");

        let (bin, _) = debugfs(image, "stat /bin");
        assert!(
            bin.contains("Type: symlink") && bin.contains("\"usr/bin\""),
            "{bin}"
        );
        let (abs, _) = debugfs(image, "stat /etc/abs-hostname");
        assert!(abs.contains("\"/etc/hostname\""), "{abs}");

        // The hostile write through an absolute symlink landed inside the
        // image, at the same path, and never on the host.
        assert_eq!(
            std::fs::read_dir(outside).unwrap().count(),
            0,
            "host dir untouched"
        );
        let inside = format!("{}/pwned", outside.display());
        assert_eq!(cat(image, &inside), "should stay inside the image\n");
    }

    async fn pull(
        reference: &str,
        d: &Dirs,
        o: &PullOptions,
    ) -> (Result<PulledRootfs, ImageError>, Vec<PullEvent>) {
        let mut events = Vec::new();
        let r = pull_rootfs(reference, &d.staging, o, |e| events.push(e)).await;
        (r, events)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulls_layered_image_with_whiteouts_links_and_ownership() {
        let test = "pulls_layered_image_with_whiteouts_links_and_ownership";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let pushed = reg
            .push("banger/layered:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/layered:v1", reg.host());
        let (r, events) = pull(&reference, &d, &opts(&reg, &d)).await;
        let p = r.unwrap();

        assert_eq!(p.digest, pushed.digest);
        assert_eq!(p.layers, pushed.layers);
        assert_eq!(p.rootfs, d.staging.join("rootfs.ext4"));
        assert_eq!(p.size, ByteSize(GIB), "small trees get the 1 GiB floor");
        assert_eq!(std::fs::metadata(&p.rootfs).unwrap().len(), GIB);
        assert!(
            p.tree_bytes > 0 && p.tree_bytes < 1 << 20,
            "{}",
            p.tree_bytes
        );
        assert_eq!(
            staging_entries(&d),
            vec!["rootfs.ext4"],
            "scratch tree removed"
        );
        assert!(
            matches!(&events[0], PullEvent::Resolved { layers: 3, .. }),
            "{events:?}"
        );
        let downloaded = events
            .iter()
            .filter(|e| matches!(e, PullEvent::LayerDownloaded { .. }))
            .count();
        assert_eq!(downloaded, 3);
        // Each download reports its bytes as they arrive, ending at the
        // layer's full size just before it is announced as downloaded.
        for pair in events.windows(2) {
            if let [before, PullEvent::LayerDownloaded { digest, bytes }] = pair {
                assert_eq!(
                    before,
                    &PullEvent::LayerProgress {
                        digest: digest.clone(),
                        received: *bytes,
                        total: Some(*bytes),
                    },
                    "{events:?}"
                );
            }
        }

        assert_layered_rootfs(&p.rootfs, &d.outside);
        for l in &pushed.layers {
            let cached = d
                .cache
                .join("blobs/sha256")
                .join(l.trim_start_matches("sha256:"));
            assert!(cached.is_file(), "{} cached", l);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_pull_uses_the_layer_cache() {
        let test = "second_pull_uses_the_layer_cache";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let pushed = reg
            .push("banger/cached:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/cached:v1", reg.host());
        let o = opts(&reg, &d);
        pull(&reference, &d, &o).await.0.unwrap();
        std::fs::remove_file(d.staging.join("rootfs.ext4")).unwrap();
        // Without the kept flattened image, the re-pull flattens again from
        // the cached layers.
        std::fs::remove_dir_all(d.cache.join("flat")).unwrap();
        let (r, events) = pull(&reference, &d, &o).await;
        r.unwrap();
        let cached = events
            .iter()
            .filter(|e| matches!(e, PullEvent::LayerCached { .. }))
            .count();
        assert_eq!(cached, 3, "{events:?}");
        for l in &pushed.layers {
            assert_eq!(reg.blob_gets(l), 1, "layer {l} fetched once over two pulls");
        }
    }

    /// The kept flattened images in the cache: (name, inode, mtime).
    fn flat_files(d: &Dirs) -> Vec<(String, u64, i64)> {
        let mut v: Vec<(String, u64, i64)> = std::fs::read_dir(d.cache.join("flat"))
            .map(|r| {
                r.map(|e| {
                    let e = e.unwrap();
                    let m = e.metadata().unwrap();
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000)
                })
                .filter(|(n, _, _)| n.ends_with(".ext4"))
                .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn count(events: &[PullEvent], what: fn(&PullEvent) -> bool) -> usize {
        events.iter().filter(|e| what(e)).count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repull_clones_the_kept_flattened_image() {
        let test = "repull_clones_the_kept_flattened_image";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let pushed = reg
            .push("banger/flat:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/flat:v1", reg.host());
        let o = opts(&reg, &d);
        let (first, events) = pull(&reference, &d, &o).await;
        let first = first.unwrap();
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::Applying { .. })),
            3
        );
        let kept = flat_files(&d);
        assert_eq!(kept.len(), 1, "one flattened image kept: {kept:?}");
        std::fs::remove_file(&first.rootfs).unwrap();

        // The same manifest by digest (as another image name would pull it).
        let by_digest = format!("{}/banger/flat@{}", reg.host(), pushed.digest);
        let (again, events) = pull(&by_digest, &d, &o).await;
        let again = again.unwrap();
        assert!(
            events.contains(&PullEvent::FlattenedCached {
                digest: pushed.digest.clone(),
                size: first.size,
            }),
            "{events:?}"
        );
        for what in [
            (|e: &PullEvent| matches!(e, PullEvent::Applying { .. })) as fn(&PullEvent) -> bool,
            |e| matches!(e, PullEvent::BuildingFilesystem { .. }),
            |e| matches!(e, PullEvent::LayerDownloaded { .. }),
        ] {
            assert_eq!(count(&events, what), 0, "{events:?}");
        }
        for l in &pushed.layers {
            assert_eq!(reg.blob_gets(l), 1, "layer {l} fetched once over two pulls");
        }
        assert_eq!(flat_files(&d), kept, "the kept file was used, not rebuilt");
        assert_eq!(
            (again.digest, again.size, again.tree_bytes, again.layers),
            (first.digest, first.size, first.tree_bytes, first.layers)
        );
        assert_ne!(
            std::fs::metadata(&again.rootfs).unwrap().ino(),
            kept[0].1,
            "the result is a copy the cache does not share"
        );
        assert_layered_rootfs(&again.rootfs, &d.outside);

        // Another size is another flatten.
        std::fs::remove_file(&again.rootfs).unwrap();
        let bigger = PullOptions {
            size: Some(ByteSize(2 * GIB)),
            ..o.clone()
        };
        let (r, events) = pull(&reference, &d, &bigger).await;
        assert_eq!(r.unwrap().size, ByteSize(2 * GIB));
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::Applying { .. })),
            3
        );
        assert_eq!(flat_files(&d).len(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_or_partial_flattened_image_is_never_used() {
        let test = "a_changed_or_partial_flattened_image_is_never_used";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        reg.push("banger/rotflat:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/rotflat:v1", reg.host());
        let o = opts(&reg, &d);
        let first = pull(&reference, &d, &o).await.0.unwrap();
        std::fs::remove_file(&first.rootfs).unwrap();
        let (name, _, _) = flat_files(&d).pop().unwrap();
        let kept = d.cache.join("flat").join(&name);

        // Same length, its superblock zeroed.
        let f = std::fs::OpenOptions::new().write(true).open(&kept).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 4096], 0).unwrap();
        drop(f);
        let (r, events) = pull(&reference, &d, &o).await;
        let p = r.unwrap();
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::FlattenedCached { .. })),
            0
        );
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::Applying { .. })),
            3
        );
        assert_layered_rootfs(&p.rootfs, &d.outside);
        std::fs::remove_file(&p.rootfs).unwrap();

        // Cut short (a copy that never finished), then without its stamp.
        let f = std::fs::OpenOptions::new().write(true).open(&kept).unwrap();
        f.set_len(GIB / 2).unwrap();
        drop(f);
        let (r, events) = pull(&reference, &d, &o).await;
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::Applying { .. })),
            3
        );
        std::fs::remove_file(r.unwrap().rootfs).unwrap();
        std::fs::remove_file(kept.with_extension("json")).unwrap();
        let (r, events) = pull(&reference, &d, &o).await;
        assert_eq!(
            count(&events, |e| matches!(e, PullEvent::FlattenedCached { .. })),
            0
        );
        assert_layered_rootfs(&r.unwrap().rootfs, &d.outside);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_prune_drops_flattened_images_no_image_uses() {
        let test = "cache_prune_drops_flattened_images_no_image_uses";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let pushed = reg
            .push("banger/pruned:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/pruned:v1", reg.host());
        pull(&reference, &d, &opts(&reg, &d)).await.0.unwrap();
        let mut keep: HashSet<String> = pushed.layers.iter().cloned().collect();
        keep.insert(pushed.digest.clone());
        let r = banger_artifacts::images::cache_prune(&d.cache, &keep).unwrap();
        assert!(r.removed.is_empty(), "{:?}", r.removed);
        assert_eq!(flat_files(&d).len(), 1);
        keep.remove(&pushed.digest);
        let r = banger_artifacts::images::cache_prune(&d.cache, &keep).unwrap();
        assert_eq!(r.removed.len(), 1, "{:?}", r.removed);
        assert!(r.freed_bytes > 0);
        assert!(flat_files(&d).is_empty());
        let left: Vec<_> = std::fs::read_dir(d.cache.join("flat")).unwrap().collect();
        assert!(left.is_empty(), "stamps go with their images: {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn index_resolution_picks_linux_amd64() {
        let test = "index_resolution_picks_linux_amd64";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let arm = vec![layer(true, vec![Entry::file("arch", "arm64\n")])];
        let amd = vec![layer(true, vec![Entry::file("arch", "amd64\n")])];
        // arm64 is listed first: the resolver must pick by platform.
        let pushed = reg
            .push_index("banger/multi:v1", &[("arm64", &arm), ("amd64", &amd)])
            .await;
        let reference = format!("{}/banger/multi:v1", reg.host());
        let p = pull(&reference, &d, &opts(&reg, &d)).await.0.unwrap();
        assert_eq!(cat(&p.rootfs, "/arch"), "amd64\n");
        assert_eq!(p.layers, pushed.layers);
        assert_ne!(
            p.digest, pushed.digest,
            "the digest is the amd64 manifest's, not the index's"
        );

        std::fs::remove_file(&p.rootfs).unwrap();
        reg.push_index("banger/armonly:v1", &[("arm64", &arm)])
            .await;
        let reference = format!("{}/banger/armonly:v1", reg.host());
        let err = pull(&reference, &d, &opts(&reg, &d)).await.0.unwrap_err();
        assert!(matches!(err, ImageError::NoAmd64(_)), "{err}");
        assert!(staging_entries(&d).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_http_is_refused_unless_the_registry_is_listed_insecure() {
        let test = "plain_http_is_refused_unless_the_registry_is_listed_insecure";
        let Some(reg) = Registry::start(test) else {
            return;
        };
        let d = dirs();
        reg.push(
            "banger/http:v1",
            "amd64",
            &[layer(false, vec![Entry::file("f", "x")])],
        )
        .await;
        let reference = format!("{}/banger/http:v1", reg.host());
        let mut o = opts(&reg, &d);
        o.insecure_registries = vec!["127.0.0.1:1".to_string()];
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(
            matches!(&err, ImageError::PlainHttpRegistry(h) if h == reg.host()),
            "{err}"
        );
        assert!(err.to_string().contains("insecure_registries"), "{err}");
        assert!(staging_entries(&d).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_pulls_leave_the_staging_dir_empty() {
        let test = "failed_pulls_leave_the_staging_dir_empty";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let o = opts(&reg, &d);

        let err = pull("Not A Ref!", &d, &o).await.0.unwrap_err();
        assert!(matches!(err, ImageError::InvalidReference(_)), "{err}");
        assert!(staging_entries(&d).is_empty());

        let missing = format!("{}/banger/absent:v1", reg.host());
        let err = pull(&missing, &d, &o).await.0.unwrap_err();
        assert!(matches!(err, ImageError::NotFound(_)), "{err}");
        assert!(staging_entries(&d).is_empty());

        let pushed = reg
            .push(
                "banger/corrupt:v1",
                "amd64",
                &[layer(true, vec![Entry::file("f", "good bytes")])],
            )
            .await;
        let blob = reg.blob_file(&pushed.layers[0]);
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&blob, bytes).unwrap();
        let reference = format!("{}/banger/corrupt:v1", reg.host());
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::DigestMismatch { .. } | ImageError::Download { .. }
            ),
            "{err}"
        );
        assert!(staging_entries(&d).is_empty());
        let cached: Vec<_> = std::fs::read_dir(d.cache.join("blobs/sha256"))
            .unwrap()
            .collect();
        assert!(
            cached.is_empty(),
            "nothing corrupt or partial cached: {cached:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_layers_are_refused_within_their_limits() {
        let test = "hostile_layers_are_refused_within_their_limits";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let o = opts(&reg, &d);
        let cached = |d: &Dirs| -> Vec<String> {
            std::fs::read_dir(d.cache.join("blobs/sha256"))
                .map(|r| {
                    r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };

        // A registry sending more than the descriptor's size: the stored
        // blob grows after the push, so the manifest keeps the old size.
        let pushed = reg
            .push(
                "banger/oversized:v1",
                "amd64",
                &[layer(false, vec![Entry::file("f", "small")])],
            )
            .await;
        let blob = reg.blob_file(&pushed.layers[0]);
        let mut bytes = std::fs::read(&blob).unwrap();
        let stated = bytes.len() as u64;
        bytes.extend(std::iter::repeat_n(0u8, 4 << 20));
        std::fs::write(&blob, bytes).unwrap();
        let reference = format!("{}/banger/oversized:v1", reg.host());
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        match &err {
            ImageError::BlobTooLarge { digest, expected } => {
                assert_eq!(digest, &pushed.layers[0]);
                assert_eq!(*expected, stated);
            }
            other => panic!("expected BlobTooLarge, got {other}"),
        }
        assert!(staging_entries(&d).is_empty());
        assert_eq!(cached(&d), Vec::<String>::new(), "partial blob removed");

        // A gzip layer of 32 MiB of zeros (about 32 KiB compressed).
        let bomb = Entry::File {
            path: "zeros".to_string(),
            content: vec![0u8; 32 << 20],
            mode: 0o644,
            uid: 0,
            gid: 0,
        };
        let pushed = reg
            .push("banger/bomb:v1", "amd64", &[layer(true, vec![bomb])])
            .await;
        let reference = format!("{}/banger/bomb:v1", reg.host());
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(
            matches!(&err, ImageError::LayerLimit { digest, key, .. }
                if digest == &pushed.layers[0] && *key == "image_layer_max_ratio"),
            "{err}"
        );
        assert!(staging_entries(&d).is_empty());
        // Raising the limit, as the error says, pulls it from the cache.
        let mut raised = opts(&reg, &d);
        raised.layer_limits.max_ratio = 100_000;
        let (res, events) = pull(&reference, &d, &raised).await;
        let pulled = res.unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, PullEvent::LayerCached { .. })),
            "{events:?}"
        );
        assert_eq!(pulled.layers, pushed.layers);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_cached_layer_fails_the_pull_and_is_evicted() {
        let test = "corrupt_cached_layer_fails_the_pull_and_is_evicted";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let pushed = reg
            .push(
                "banger/rot:v1",
                "amd64",
                &[layer(false, vec![Entry::file("f", "original")])],
            )
            .await;
        let reference = format!("{}/banger/rot:v1", reg.host());
        let o = opts(&reg, &d);
        pull(&reference, &d, &o).await.0.unwrap();
        std::fs::remove_file(d.staging.join("rootfs.ext4")).unwrap();
        std::fs::remove_dir_all(d.cache.join("flat")).unwrap();
        let cached = d
            .cache
            .join("blobs/sha256")
            .join(pushed.layers[0].trim_start_matches("sha256:"));
        let mut bytes = std::fs::read(&cached).unwrap();
        let pos = bytes.windows(8).position(|w| w == b"original").unwrap();
        bytes[pos..pos + 8].copy_from_slice(b"tampered");
        std::fs::write(&cached, bytes).unwrap();
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(!cached.exists(), "corrupt blob evicted");
        assert!(staging_entries(&d).is_empty());
        pull(&reference, &d, &o).await.0.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn credentialed_registry_uses_docker_config_auths() {
        let test = "credentialed_registry_uses_docker_config_auths";
        if !tools_present(test) {
            return;
        }
        let Some(reg) = Registry::start_with_auth(test, "banger", "hunter2") else {
            return;
        };
        let d = dirs();
        reg.push(
            "banger/private:v1",
            "amd64",
            &[layer(true, vec![Entry::file("who", "private\n")])],
        )
        .await;
        let reference = format!("{}/banger/private:v1", reg.host());
        let mut o = opts(&reg, &d);

        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(matches!(err, ImageError::Unauthorized(_)), "{err}");
        assert!(staging_entries(&d).is_empty());

        let cfg = d.cache.join("docker-config.json");
        // base64("banger:hunter2")
        std::fs::write(
            &cfg,
            format!(
                r#"{{"auths":{{"{}":{{"auth":"YmFuZ2VyOmh1bnRlcjI="}}}}}}"#,
                reg.host()
            ),
        )
        .unwrap();
        o.docker_config = Some(cfg);
        let p = pull(&reference, &d, &o).await.0.unwrap();
        assert_eq!(cat(&p.rootfs, "/who"), "private\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn too_small_a_size_is_a_clear_error() {
        let test = "too_small_a_size_is_a_clear_error";
        let Some((reg, d)) = registry_and_dirs(test) else {
            return;
        };
        let big = "x".repeat(8 << 20);
        reg.push(
            "banger/big:v1",
            "amd64",
            &[layer(true, vec![Entry::file("big", &big)])],
        )
        .await;
        let reference = format!("{}/banger/big:v1", reg.host());
        let mut o = opts(&reg, &d);
        o.size = Some(ByteSize(4 << 20));
        let err = pull(&reference, &d, &o).await.0.unwrap_err();
        assert!(matches!(err, ImageError::SizeTooSmall { .. }), "{err}");
        assert!(err.to_string().contains("pass at least"), "{err}");
        assert!(staging_entries(&d).is_empty());
    }

    const CHILD_ENV: &str = "BANGER_OCI_TEST_CHILD";

    /// Pulls the layered image as uid/gid 65534 by re-running this test
    /// binary under `setpriv`, then checks that ownership and setuid bits
    /// are the image's, not the unprivileged user's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_works_as_an_unprivileged_user() {
        let test = "pull_works_as_an_unprivileged_user";
        if let Ok(spec) = std::env::var(CHILD_ENV) {
            // Child: "<reference>\n<staging>\n<cache>\n<insecure host>".
            let parts: Vec<&str> = spec.split('\n').collect();
            assert_ne!(nix::unistd::geteuid().as_raw(), 0, "child must not be root");
            let o = PullOptions {
                insecure_registries: vec![parts[3].to_string()],
                docker_config: Some(PathBuf::from(parts[2]).join("none.json")),
                cache_dir: PathBuf::from(parts[2]),
                size: None,
                ..PullOptions::default()
            };
            pull_rootfs(parts[0], Path::new(parts[1]), &o, |_| {})
                .await
                .unwrap();
            return;
        }
        if !tools_present(test) {
            return;
        }
        if nix::unistd::geteuid().as_raw() != 0 {
            eprintln!("note {test}: already unprivileged; pulling directly");
        } else if !Path::new("/usr/bin/setpriv").exists() {
            eprintln!("SKIPPED {test}: setpriv not installed (util-linux)");
            return;
        }
        let Some(reg) = Registry::start(test) else {
            return;
        };
        let d = dirs();
        reg.push("banger/unpriv:v1", "amd64", &layered_image(&d.outside))
            .await;
        let reference = format!("{}/banger/unpriv:v1", reg.host());
        if nix::unistd::geteuid().as_raw() != 0 {
            pull(&reference, &d, &opts(&reg, &d)).await.0.unwrap();
        } else {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            let nogroup = Some(nix::unistd::Gid::from_raw(65534));
            for p in [d.staging.parent().unwrap(), &d.staging, &d.cache] {
                nix::unistd::chown(p, nobody, nogroup).unwrap();
            }
            let exe = std::env::current_exe().unwrap();
            let out = Command::new("/usr/bin/setpriv")
                .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(&exe)
                .args([
                    "--exact",
                    "tests::pull_works_as_an_unprivileged_user",
                    "--nocapture",
                ])
                .env(
                    CHILD_ENV,
                    format!(
                        "{reference}\n{}\n{}\n{}",
                        d.staging.display(),
                        d.cache.display(),
                        reg.host()
                    ),
                )
                .env("HOME", d.cache.as_os_str())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success()
                && stderr.contains("Permission denied")
                && !stdout.contains("running 1 test")
            {
                eprintln!(
                    "SKIPPED {test}: the test binary is not executable by uid 65534: {stderr}"
                );
                return;
            }
            assert!(out.status.success(), "child failed\n{stdout}\n{stderr}");
            assert!(stdout.contains("1 passed"), "child ran the test\n{stdout}");
            let image = d.staging.join("rootfs.ext4");
            assert_eq!(
                std::fs::metadata(&image).unwrap().uid(),
                65534,
                "the pull ran unprivileged"
            );
        }
        assert_layered_rootfs(&d.staging.join("rootfs.ext4"), &d.outside);
    }

    #[test]
    fn cache_prune_keeps_referenced_layers() {
        let d = dirs();
        let blobs = d.cache.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let (a, b) = ("1".repeat(64), "2".repeat(64));
        std::fs::write(blobs.join(&a), "aa").unwrap();
        std::fs::write(blobs.join(&b), "bbb").unwrap();
        let keep = HashSet::from([format!("sha256:{a}")]);
        let r = banger_artifacts::images::cache_prune(&d.cache, &keep).unwrap();
        assert_eq!(r.removed, vec![format!("sha256:{b}")]);
        assert_eq!(r.freed_bytes, 3);
        assert!(blobs.join(&a).exists());
    }
}
