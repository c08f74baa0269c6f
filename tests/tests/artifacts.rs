//! Kernels and images through the real CLI and daemon: import, register,
//! promote, OCI pull from a real loopback registry, booting VMs from them,
//! in-use refusals, cache pruning.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use banger_api::api::VmView;
    use banger_api::model::{ImageRecord, ImageSource};
    use test_infra::registry::{Entry, Registry, TestLayer};
    use test_infra::{BangerEnv, Run};

    fn boot_source(env: &BangerEnv, vm: &VmView) -> serde_json::Value {
        let pid = vm.record.vmm.as_ref().expect("running").pid as u64;
        env.fc_calls()
            .into_iter()
            .find(|c| c["pid"].as_u64() == Some(pid) && c["path"] == "/boot-source")
            .expect("boot-source call")["body"]
            .clone()
    }

    fn root_drive(env: &BangerEnv, vm: &VmView) -> PathBuf {
        let pid = vm.record.vmm.as_ref().expect("running").pid as u64;
        let call = env
            .fc_calls()
            .into_iter()
            .find(|c| c["pid"].as_u64() == Some(pid) && c["path"] == "/drives/root")
            .expect("root drive call");
        PathBuf::from(call["body"]["path_on_host"].as_str().unwrap())
    }

    /// Registers the env's boot files as image `img1`; their paths.
    fn register_img1(env: &BangerEnv) -> (String, String) {
        let (kernel, rootfs) = env.boot_files();
        let (k, r) = (kernel.display().to_string(), rootfs.display().to_string());
        env.banger(&[
            "image", "register", "--name", "img1", "--rootfs", &r, "--kernel", &k,
        ])
        .ok();
        (k, r)
    }

    /// `vm create NAME --image IMAGE` with a 64 MiB work disk; the VM's
    /// root disk.
    fn create_from_image(env: &BangerEnv, name: &str, image: &str) -> PathBuf {
        env.banger(&[
            "vm",
            "create",
            "--name",
            name,
            "--image",
            image,
            "--disk-size",
            "64M",
        ])
        .ok();
        root_drive(env, &env.show(name))
    }

    fn kernel_dir(env: &BangerEnv, with_initrd: bool) -> PathBuf {
        let d = env.root().join("kbuild");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("vmlinux"), b"\x7fELF imported kernel").unwrap();
        if with_initrd {
            std::fs::write(d.join("initrd.img"), b"070701 initrd").unwrap();
        }
        d
    }

    fn both(r: &Run) -> String {
        format!("{}{}", r.stdout, r.stderr)
    }

    #[test]
    fn kernels_import_boot_and_are_kept_while_used() {
        let env = BangerEnv::new();
        let from = kernel_dir(&env, true);
        env.banger(&["kernel", "import", "k1", "--from", from.to_str().unwrap()])
            .ok();
        let again = env
            .banger(&["kernel", "import", "k1", "--from", from.to_str().unwrap()])
            .failed();
        assert!(both(&again).contains("--force"), "{again:?}");
        env.banger(&[
            "kernel",
            "import",
            "../evil",
            "--from",
            from.to_str().unwrap(),
        ])
        .failed();

        let list: Vec<serde_json::Value> =
            serde_json::from_str(&env.banger(&["kernel", "list", "--json"]).ok().stdout).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["name"], "k1");
        let show: serde_json::Value =
            serde_json::from_str(&env.banger(&["kernel", "show", "k1", "--json"]).ok().stdout)
                .unwrap();
        let vmlinux = PathBuf::from(show["vmlinux"].as_str().unwrap());
        let initrd = PathBuf::from(show["initrd"].as_str().unwrap());
        assert_eq!(std::fs::read(&vmlinux).unwrap(), b"\x7fELF imported kernel");
        assert!(
            vmlinux.starts_with(env.state_dir()),
            "imported kernels are copied in"
        );

        let (_, rootfs) = env.boot_files();
        let r = rootfs.display().to_string();
        env.banger(&[
            "vm",
            "create",
            "--name",
            "kv",
            "--rootfs",
            &r,
            "--kernel-ref",
            "k1",
            "--disk-size",
            "64M",
        ])
        .ok();
        let vm = env.show("kv");
        let boot = boot_source(&env, &vm);
        assert_eq!(boot["kernel_image_path"], vmlinux.display().to_string());
        assert_eq!(boot["initrd_path"], initrd.display().to_string());

        let refused = env.banger(&["kernel", "rm", "k1"]).failed();
        assert!(
            both(&refused).contains("kv"),
            "the error must name the VM: {refused:?}"
        );
        env.banger(&["vm", "delete", "kv"]).ok();
        env.banger(&["kernel", "rm", "k1"]).ok();
        assert!(!vmlinux.exists());
        assert_eq!(
            env.banger(&["kernel", "list", "--json"]).ok().stdout.trim(),
            "[]"
        );

        // A kernel that is neither local nor in the catalog: a clear error
        // that says how to see what is available, and no VM.
        let missing = env
            .banger(&[
                "vm",
                "create",
                "--name",
                "nok",
                "--rootfs",
                &r,
                "--kernel-ref",
                "nope",
            ])
            .failed();
        assert!(
            both(&missing).contains("banger kernel list --available"),
            "{missing:?}"
        );
        assert!(env.list().is_empty());
    }

    #[test]
    fn images_register_promote_boot_and_refuse_deletion_while_used() {
        let env = BangerEnv::new();
        let (k, r) = register_img1(&env);
        let rootfs = PathBuf::from(&r);
        let original = std::fs::read(&rootfs).unwrap();
        let dup = env
            .banger(&[
                "image", "register", "--name", "img1", "--rootfs", &r, "--kernel", &k,
            ])
            .failed();
        assert!(both(&dup).contains("img1"), "{dup:?}");

        create_from_image(&env, "v1", "img1");
        let v1 = env.show("v1");
        assert_eq!(boot_source(&env, &v1)["kernel_image_path"], k);
        assert_eq!(v1.record.spec.rootfs_source, rootfs);
        let refused = env.banger(&["image", "delete", "img1"]).failed();
        assert!(
            both(&refused).contains("v1"),
            "the error must name the VM: {refused:?}"
        );

        // Promote: banger copies the files in and owns them from now on.
        env.banger(&["image", "promote", "img1"]).ok();
        let img: ImageRecord =
            serde_json::from_str(&env.banger(&["image", "show", "img1", "--json"]).ok().stdout)
                .unwrap();
        assert!(img.managed);
        assert!(
            img.rootfs.starts_with(env.state_dir().join("images/img1")),
            "{:?}",
            img.rootfs
        );
        assert_eq!(
            img.source,
            ImageSource::Promoted {
                from: rootfs.clone()
            }
        );
        assert_eq!(std::fs::read(&img.rootfs).unwrap(), original);
        assert_eq!(
            std::fs::read(&rootfs).unwrap(),
            original,
            "the registered file is never written"
        );

        create_from_image(&env, "v2", "img1");
        let v2 = env.show("v2");
        assert_eq!(v2.record.spec.rootfs_source, img.rootfs);
        env.banger(&["image", "delete", "img1"]).failed();
        env.banger(&["vm", "delete", "v1", "v2"]).ok();
        env.banger(&["image", "delete", "img1"]).ok();
        assert!(
            !env.state_dir().join("images/img1").exists(),
            "a managed image's files go with it"
        );
        assert!(rootfs.exists(), "the original registered file stays");
        assert_eq!(
            env.banger(&["image", "list", "--json"]).ok().stdout.trim(),
            "[]"
        );
    }

    /// The spare root disks in `env`'s state dir.
    fn spares(env: &BangerEnv) -> Vec<PathBuf> {
        let dir = env.state_dir().join("spares");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().path())
                    .filter(|p| {
                        let n = p.file_name().unwrap().to_string_lossy().into_owned();
                        n.ends_with(".ext4") && !n.starts_with('.')
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn inode(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().ino()
    }

    #[test]
    fn an_images_next_vm_takes_a_root_disk_copied_ahead_and_deleting_the_image_drops_it() {
        let env = BangerEnv::new();
        let (_, r) = register_img1(&env);
        let rootfs = PathBuf::from(&r);
        let original = std::fs::read(&rootfs).unwrap();
        let wait = std::time::Duration::from_secs(30);

        // The first VM copies the image; a spare is made behind it.
        let v1 = create_from_image(&env, "v1", "img1");
        test_infra::wait_until(wait, "a spare of img1 is made", || spares(&env).len() == 1);
        let spare = spares(&env).remove(0);
        assert_eq!(std::fs::read(&spare).unwrap(), original);
        assert_ne!(inode(&v1), inode(&spare));

        // The second takes that very file (moved, not copied) and owns it.
        let spare_ino = inode(&spare);
        let v2 = create_from_image(&env, "v2", "img1");
        assert_eq!(inode(&v2), spare_ino, "v2's root disk is the spare");
        assert_eq!(std::fs::read(&v2).unwrap(), original);
        test_infra::wait_until(wait, "the next spare is made", || {
            spares(&env).first().is_some_and(|p| inode(p) != spare_ino)
        });
        // Writes to a VM's disk never reach the spare or the image.
        std::fs::write(&v2, b"guest wrote this").unwrap();
        assert_eq!(std::fs::read(&spares(&env)[0]).unwrap(), original);
        assert_eq!(std::fs::read(&rootfs).unwrap(), original);

        env.banger(&["vm", "delete", "v1", "v2"]).ok();
        env.banger(&["image", "delete", "img1"]).ok();
        assert!(spares(&env).is_empty(), "the image's spare goes with it");
        assert_eq!(std::fs::read(&rootfs).unwrap(), original);
    }

    #[test]
    fn rootfs_files_are_never_kept_and_rootfs_spares_zero_drops_the_spares() {
        let env = BangerEnv::new();
        let (k, r) = register_img1(&env);
        let rootfs = PathBuf::from(&r);
        // A `--rootfs` file is the user's: copied as it is, never kept.
        let other = env.root().join("other.ext4");
        let mut bytes = std::fs::read(&rootfs).unwrap();
        bytes.extend_from_slice(b"another root filesystem");
        std::fs::write(&other, &bytes).unwrap();
        let o = other.display().to_string();
        env.banger(&[
            "vm",
            "create",
            "--name",
            "v1",
            "--kernel",
            &k,
            "--rootfs",
            &o,
            "--disk-size",
            "64M",
        ])
        .ok();
        // One thread makes spares in order: once img1's is there, one
        // queued before it for other.ext4 would be too.
        create_from_image(&env, "v2", "img1");
        let wait = std::time::Duration::from_secs(30);
        test_infra::wait_until(wait, "a spare of img1 is made", || !spares(&env).is_empty());
        let kept = spares(&env);
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(
            std::fs::read(&kept[0]).unwrap(),
            std::fs::read(&rootfs).unwrap()
        );
        let spare_ino = inode(&kept[0]);
        // Held open, the dropped spare's inode cannot be freed and its
        // number handed to v3's copy, so a differing number proves v3
        // did not take the spare.
        let _held = std::fs::File::open(&kept[0]).unwrap();

        // Turned off: the daemon drops the spares it has and copies.
        env.banger(&["daemon", "stop"]).ok();
        env.write_config("rootfs_spares = 0");
        create_from_image(&env, "v3", "img1");
        assert!(spares(&env).is_empty(), "{:?}", spares(&env));
        assert_ne!(inode(&root_drive(&env, &env.show("v3"))), spare_ino);
        env.banger(&["vm", "delete", "v1", "v2", "v3"]).ok();
    }

    fn small_image() -> Vec<TestLayer> {
        vec![
            TestLayer {
                gzip: true,
                entries: vec![
                    Entry::dir("etc", 0o755),
                    Entry::file("etc/os-release", "ID=bangertest\n"),
                    Entry::file("etc/doomed", "x"),
                ],
            },
            TestLayer {
                gzip: false,
                entries: vec![
                    Entry::whiteout("etc/doomed"),
                    Entry::owned("usr/bin/sudo", "#!sudo\n", 0o4755, 0, 0),
                ],
            },
        ]
    }

    fn debugfs(img: &Path, cmd: &str) -> String {
        let out = std::process::Command::new("debugfs")
            .args(["-R", cmd])
            .arg(img)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn oci_image_pulls_through_the_daemon_boots_and_its_layers_are_pruned_after_delete() {
        let Some(registry) = Registry::start(
            "oci_image_pulls_through_the_daemon_boots_and_its_layers_are_pruned_after_delete",
        ) else {
            return;
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pushed =
            rt.block_on(registry.push("banger-test/debian:bookworm", "amd64", &small_image()));
        let env = BangerEnv::new();
        env.write_config(&format!("insecure_registries = [{:?}]\n", registry.host()));
        let from = kernel_dir(&env, false);
        env.banger(&["kernel", "import", "k1", "--from", from.to_str().unwrap()])
            .ok();

        let reference = format!("{}/banger-test/debian:bookworm", registry.host());
        let pull = env
            .banger(&["image", "pull", &reference, "--kernel-ref", "k1"])
            .ok();
        assert!(
            pull.stderr.contains("pull_image"),
            "pull must show its stages:\n{}",
            pull.stderr
        );
        let images: Vec<ImageRecord> =
            serde_json::from_str(&env.banger(&["image", "list", "--json"]).ok().stdout).unwrap();
        assert_eq!(images.len(), 1);
        let img = &images[0];
        assert_eq!(
            img.name, "debian-bookworm",
            "the default name comes from the reference"
        );
        assert_eq!(img.layers, pushed.layers);
        assert!(matches!(&img.source, ImageSource::Oci { reference: r, .. } if *r == reference));
        assert_eq!(
            debugfs(&img.rootfs, "cat /etc/os-release"),
            "ID=bangertest\n"
        );
        assert!(debugfs(&img.rootfs, "ls /etc").contains("os-release"));
        // show --json gives the rootfs and the kernel paths it boots with.
        let shown: serde_json::Value = serde_json::from_str(
            &env.banger(&["image", "show", "debian-bookworm", "--json"])
                .ok()
                .stdout,
        )
        .unwrap();
        assert_eq!(shown["rootfs"], img.rootfs.display().to_string());
        assert!(
            shown["kernel_path"]
                .as_str()
                .unwrap()
                .ends_with("kernels/k1/vmlinux"),
            "{shown}"
        );
        assert!(
            !debugfs(&img.rootfs, "ls /etc").contains("doomed"),
            "whiteouts apply"
        );
        assert!(
            debugfs(&img.rootfs, "stat /usr/bin/sudo").contains("Mode:  04755"),
            "setuid survives"
        );
        assert!(
            std::fs::read_dir(env.state_dir().join("images"))
                .unwrap()
                .count()
                == 1,
            "no staging dir is left"
        );

        let again = env
            .banger(&["image", "pull", &reference, "--kernel-ref", "k1"])
            .failed();
        assert!(both(&again).contains("already exists"), "{again:?}");

        env.banger(&[
            "vm",
            "create",
            "--name",
            "ov",
            "--image",
            "debian-bookworm",
            "--disk-size",
            "64M",
        ])
        .ok();
        let vm = env.show("ov");
        let root = root_drive(&env, &vm);
        assert!(root.starts_with(&vm.dir), "the VM boots its own copy");
        assert_eq!(debugfs(&root, "cat /etc/os-release"), "ID=bangertest\n");
        assert!(
            boot_source(&env, &vm)["kernel_image_path"]
                .as_str()
                .unwrap()
                .ends_with("kernels/k1/vmlinux")
        );

        // Layers in use are kept; after the image goes, prune frees them.
        let kept = env.banger(&["image", "cache", "prune"]).ok();
        assert!(kept.stdout.contains("in 0 layer"), "{kept:?}");
        env.banger(&["image", "delete", "debian-bookworm"]).failed();
        env.banger(&["vm", "delete", "ov"]).ok();
        env.banger(&["image", "delete", "debian-bookworm"]).ok();
        let pruned = env.banger(&["image", "cache", "prune"]).ok();
        for layer in &pushed.layers {
            assert!(
                pruned.stdout.contains(layer.as_str()),
                "{layer} not pruned:\n{}",
                pruned.stdout
            );
        }
    }

    /// A loopback "release host" serving one kernel and one image bundle,
    /// with catalog files pointing at it, written into `env`'s config.
    struct Catalogs {
        server: test_infra::http::Server,
        image_bundle: Vec<u8>,
    }

    fn serve_catalogs(env: &BangerEnv) -> Catalogs {
        use test_infra::http::{Entry as T, Reply, Server, sha256, tar_zst};
        let server = Server::start();
        let kernel = tar_zst(&[T::File("vmlinux", b"\x7fELF catalog kernel")]);
        let rootfs = test_infra::http::noise(2 << 20);
        let image = tar_zst(&[
            T::File("rootfs.ext4", &rootfs),
            T::File(
                "manifest.toml",
                b"kernel = \"kdef\"\ndescription = \"test image\"\n",
            ),
        ]);
        let evil = tar_zst(&[
            T::File("../evil", b"x"),
            T::File("manifest.toml", b"kernel = \"kdef\"\n"),
        ]);
        server.route("/k/kdef.tar.zst", Reply::Body(kernel.clone()));
        server.route("/i/img.tar.zst", Reply::Body(image.clone()));
        server.route("/i/evil.tar.zst", Reply::Body(evil.clone()));
        let kcat = format!(
            "base_url = {:?}\n[[kernel]]\nname = \"kdef\"\narch = \"x86_64\"\ndistro = \"test\"\nversion = \"6.12\"\nurl = \"k/kdef.tar.zst\"\nsha256 = {:?}\nsize = {}\ndescription = \"test kernel\"\ndefault = true\n",
            server.base,
            sha256(&kernel),
            kernel.len()
        );
        let icat = format!(
            "base_url = {base:?}\n\
             [[image]]\nname = \"img\"\narch = \"x86_64\"\nurl = \"i/img.tar.zst\"\nsha256 = {:?}\nsize = {}\nkernel = \"kdef\"\ndescription = \"test image\"\ndefault = true\n\
             [[image]]\nname = \"evil\"\narch = \"x86_64\"\nurl = \"i/evil.tar.zst\"\nsha256 = {:?}\nsize = {}\nkernel = \"kdef\"\ndescription = \"hostile\"\n",
            sha256(&image),
            image.len(),
            sha256(&evil),
            evil.len(),
            base = server.base,
        );
        let kfile = env.root().join("kernels.toml");
        let ifile = env.root().join("images.toml");
        std::fs::write(&kfile, kcat).unwrap();
        std::fs::write(&ifile, icat).unwrap();
        env.write_config(&format!(
            "kernel_catalog_file = {kfile:?}\nimage_catalog_file = {ifile:?}\n"
        ));
        Catalogs {
            server,
            image_bundle: image,
        }
    }

    #[test]
    fn vm_create_pulls_a_missing_image_and_its_kernel_from_the_catalogs() {
        let env = BangerEnv::new();
        let _catalogs = serve_catalogs(&env);
        let avail = env.banger(&["image", "list", "--available"]).ok().stdout;
        assert!(
            avail
                .lines()
                .any(|l| l.starts_with("img") && l.contains("kdef")),
            "{avail}"
        );

        let out = env
            .banger(&[
                "vm",
                "create",
                "--name",
                "auto",
                "--image",
                "img",
                "--disk-size",
                "64M",
            ])
            .ok();
        assert!(
            out.stderr.contains("pull_image"),
            "the pull is a visible stage:\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("pull_kernel"),
            "so is the kernel's:\n{}",
            out.stderr
        );
        let vm = env.show("auto");
        assert!(
            boot_source(&env, &vm)["kernel_image_path"]
                .as_str()
                .unwrap()
                .ends_with("kernels/kdef/vmlinux")
        );
        let img: ImageRecord =
            serde_json::from_str(&env.banger(&["image", "show", "img", "--json"]).ok().stdout)
                .unwrap();
        assert_eq!(vm.record.spec.rootfs_source, img.rootfs);
        assert!(matches!(img.source, ImageSource::Catalog { .. }));
        assert!(
            !img.rootfs.parent().unwrap().join("manifest.toml").exists(),
            "the manifest is stripped"
        );

        // Naming no image at all means the catalog's default one (here the
        // same image, now local: no second pull).
        let out = env
            .banger(&["vm", "create", "--name", "plain", "--disk-size", "64M"])
            .ok();
        assert!(!out.stderr.contains("pull_image"), "{}", out.stderr);
        assert_eq!(env.show("plain").record.spec.rootfs_source, img.rootfs);

        // A bring-your-own rootfs gets the catalog's default kernel.
        let (_, rootfs) = env.boot_files();
        env.banger(&[
            "vm",
            "create",
            "--name",
            "byo",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--disk-size",
            "64M",
        ])
        .ok();
        assert!(
            boot_source(&env, &env.show("byo"))["kernel_image_path"]
                .as_str()
                .unwrap()
                .ends_with("kdef/vmlinux")
        );

        // Neither local nor in a catalog: says how to list what is available.
        let none = env
            .banger(&["vm", "create", "--name", "x", "--image", "nowhere"])
            .failed();
        assert!(
            both(&none).contains("banger image list --available"),
            "{none:?}"
        );

        // A hostile bundle fails cleanly: no row, no directory.
        let evil = env.banger(&["image", "pull", "evil"]).failed();
        assert!(both(&evil).contains("../evil"), "{evil:?}");
        let names: Vec<String> = std::fs::read_dir(env.state_dir().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["img"]);
        assert_eq!(
            serde_json::from_str::<Vec<ImageRecord>>(
                &env.banger(&["image", "list", "--json"]).ok().stdout
            )
            .unwrap()
            .len(),
            1
        );
    }

    #[test]
    fn a_pull_interrupted_by_a_daemon_crash_leaves_nothing_and_can_be_retried() {
        use test_infra::http::Reply;
        let env = BangerEnv::new();
        let catalogs = serve_catalogs(&env);
        // The image download stalls half-way.
        let half = catalogs.image_bundle[..catalogs.image_bundle.len() / 2].to_vec();
        catalogs.server.route(
            "/i/img.tar.zst",
            Reply::Stall {
                body: half,
                claimed: catalogs.image_bundle.len(),
            },
        );
        env.banger(&["daemon", "start"]).ok();
        let images = env.state_dir().join("images");
        std::thread::scope(|s| {
            let puller = s.spawn(|| env.banger(&["image", "pull", "img"]));
            test_infra::wait_until(
                std::time::Duration::from_secs(20),
                "the pull has a staging dir",
                || {
                    std::fs::read_dir(&images)
                        .map(|rd| rd.count() > 0)
                        .unwrap_or(false)
                },
            );
            let daemon = env.daemon_pid().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            puller.join().unwrap().failed();
        });
        assert!(
            std::fs::read_dir(&images).unwrap().count() > 0,
            "the crash left staging behind"
        );

        // Restart (on demand): the staging dir is gone, and the pull works.
        catalogs
            .server
            .route("/i/img.tar.zst", Reply::Body(catalogs.image_bundle.clone()));
        assert_eq!(
            env.banger(&["image", "list", "--json"]).ok().stdout.trim(),
            "[]"
        );
        let left: Vec<String> = std::fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "staging left after restart: {left:?}");
        env.banger(&["image", "pull", "img"]).ok();
        assert!(images.join("img/rootfs.ext4").exists());
    }

    #[test]
    fn kernel_rm_is_refused_while_an_image_boots_the_kernel_naming_the_images() {
        let env = BangerEnv::new();
        let from = kernel_dir(&env, false);
        env.banger(&["kernel", "import", "k2", "--from", from.to_str().unwrap()])
            .ok();
        let show: serde_json::Value =
            serde_json::from_str(&env.banger(&["kernel", "show", "k2", "--json"]).ok().stdout)
                .unwrap();
        let vmlinux = show["vmlinux"].as_str().unwrap().to_string();
        let (_, rootfs) = env.boot_files();
        let r = rootfs.display().to_string();
        // One image names the kernel, one uses its files directly.
        env.banger(&[
            "image",
            "register",
            "--name",
            "by-ref",
            "--rootfs",
            &r,
            "--kernel-ref",
            "k2",
        ])
        .ok();
        env.banger(&[
            "image", "register", "--name", "by-file", "--rootfs", &r, "--kernel", &vmlinux,
        ])
        .ok();

        let refused = env.banger(&["kernel", "rm", "k2"]).failed();
        let said = both(&refused);
        assert!(
            said.contains("by-ref") && said.contains("by-file"),
            "{refused:?}"
        );
        assert!(said.contains("banger image delete"), "{refused:?}");
        assert!(std::path::Path::new(&vmlinux).is_file(), "nothing removed");

        env.banger(&["image", "delete", "by-ref", "by-file"]).ok();
        env.banger(&["kernel", "rm", "k2"]).ok();
        assert!(!std::path::Path::new(&vmlinux).exists());
    }
}
