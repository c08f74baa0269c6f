//! `image pull`/`image register` with `--kernel FILE [--initrd FILE]
//! [--modules DIR]` instead of `--kernel-ref`, through the real CLI and
//! daemon: the files become kernel `<image>-kernel` in the kernel library
//! (as `kernel import` makes kernels), the image names it, `kernel rm`
//! refuses it while the image exists, a VM boots it, and every refusal
//! leaves neither image nor kernel behind.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use banger_api::api::{ImageView, KernelView};
    use banger_api::model::ImageKernel;
    use test_infra::kernel_files::{bzimage, fake_elf, modules_tree};
    use test_infra::registry::{Entry, Registry, TestLayer};
    use test_infra::{BangerEnv, Run};

    fn both(r: &Run) -> String {
        format!("{}{}", r.stdout, r.stderr)
    }

    fn image(env: &BangerEnv, name: &str) -> ImageView {
        serde_json::from_str(&env.banger(&["image", "show", name, "--json"]).ok().stdout).unwrap()
    }

    fn kernel(env: &BangerEnv, name: &str) -> KernelView {
        serde_json::from_str(&env.banger(&["kernel", "show", name, "--json"]).ok().stdout).unwrap()
    }

    /// The names `banger KIND list --json` prints (`kernel`, `image`).
    fn names(env: &BangerEnv, kind: &str) -> Vec<String> {
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&env.banger(&[kind, "list", "--json"]).ok().stdout).unwrap();
        list.iter()
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect()
    }

    fn kernel_names(env: &BangerEnv) -> Vec<String> {
        names(env, "kernel")
    }

    fn image_names(env: &BangerEnv) -> Vec<String> {
        names(env, "image")
    }

    /// Entries of a state subdirectory (staging dirs included).
    fn entries(dir: &Path) -> Vec<String> {
        match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A registry holding one small image, and an env that may pull from it.
    fn registry_env(test: &str) -> Option<(Registry, BangerEnv, String)> {
        let registry = Registry::start(test)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let layers = [TestLayer {
            gzip: true,
            entries: vec![
                Entry::dir("etc", 0o755),
                Entry::file("etc/os-release", "ID=kernelfiles\n"),
            ],
        }];
        rt.block_on(registry.push("banger-test/small:1", "amd64", &layers));
        let env = BangerEnv::new();
        env.write_config(&format!("insecure_registries = [{:?}]\n", registry.host()));
        let reference = format!("{}/banger-test/small:1", registry.host());
        Some((registry, env, reference))
    }

    /// `vmlinux`, `initrd.img` and `lib/modules/6.1.0-test/` under `dir`.
    fn kernel_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap();
        let vmlinux = dir.join("vmlinux");
        std::fs::write(&vmlinux, fake_elf(4096)).unwrap();
        let initrd = dir.join("initrd.img");
        std::fs::write(&initrd, b"070701 the user's initrd").unwrap();
        (vmlinux, initrd, modules_tree(dir, "6.1.0-test"))
    }

    #[test]
    fn pull_with_kernel_files_imports_a_kernel_the_image_names_boots_and_keeps() {
        let Some((_registry, env, reference)) =
            registry_env("pull_with_kernel_files_imports_a_kernel_the_image_names_boots_and_keeps")
        else {
            return;
        };
        let (vmlinux, initrd, modules) = kernel_files(&env.root().join("mine"));
        let pull = env
            .banger(&[
                "image",
                "pull",
                &reference,
                "--name",
                "withk",
                "--kernel",
                s(&vmlinux),
                "--initrd",
                s(&initrd),
                "--modules",
                s(&modules),
            ])
            .ok();
        assert!(pull.stderr.contains("import_kernel"), "{}", pull.stderr);

        let img = image(&env, "withk");
        assert_eq!(
            img.record.kernel,
            ImageKernel::Named {
                name: "withk-kernel".into()
            }
        );
        let k = kernel(&env, "withk-kernel");
        assert!(k.dir.starts_with(env.state_dir().join("kernels")), "{k:?}");
        assert_eq!(img.kernel_path.as_ref(), Some(&k.vmlinux));
        assert_eq!(img.initrd_path, k.initrd);
        assert_eq!(
            std::fs::read(&k.vmlinux).unwrap(),
            std::fs::read(&vmlinux).unwrap()
        );
        assert_eq!(
            std::fs::read(k.initrd.as_ref().unwrap()).unwrap(),
            std::fs::read(&initrd).unwrap(),
            "the given initrd is kept as it is, not replaced by the boot modules archive"
        );
        let stored = k.modules.as_ref().unwrap().join("6.1.0-test");
        for rel in ["modules.builtin", "kernel/fs/extra.ko"] {
            assert_eq!(
                std::fs::read(stored.join(rel)).unwrap(),
                std::fs::read(modules.join(rel)).unwrap(),
                "{rel}"
            );
        }
        assert_eq!(k.manifest.version, "6.1.0-test");
        assert!(kernel_names(&env).contains(&"withk-kernel".to_string()));

        // While the image names the kernel, the kernel stays.
        let refused = env.banger(&["kernel", "rm", "withk-kernel"]).failed();
        assert!(both(&refused).contains("withk"), "{refused:?}");
        assert!(k.vmlinux.is_file());

        // A VM made from the image boots that kernel and initrd.
        env.banger(&[
            "vm",
            "create",
            "--name",
            "kv",
            "--image",
            "withk",
            "--disk-size",
            "64M",
        ])
        .ok();
        let vm = env.show("kv");
        let pid = vm.record.vmm.as_ref().expect("running").pid as u64;
        let boot = env
            .fc_calls()
            .into_iter()
            .find(|c| c["pid"].as_u64() == Some(pid) && c["path"] == "/boot-source")
            .expect("boot-source call")["body"]
            .clone();
        assert_eq!(boot["kernel_image_path"], s(&k.vmlinux));
        assert_eq!(boot["initrd_path"], s(k.initrd.as_ref().unwrap()));

        // The kernel is a library kernel like any other: it outlives the
        // image and goes with `kernel rm`.
        env.banger(&["vm", "delete", "kv"]).ok();
        env.banger(&["image", "delete", "withk"]).ok();
        assert!(kernel_names(&env).contains(&"withk-kernel".to_string()));
        env.banger(&["kernel", "rm", "withk-kernel"]).ok();
        assert!(!k.dir.exists());
    }

    #[test]
    fn pull_unpacks_a_compressed_kernel_and_refuses_one_it_cannot_leaving_nothing() {
        let Some((_registry, env, reference)) = registry_env(
            "pull_unpacks_a_compressed_kernel_and_refuses_one_it_cannot_leaving_nothing",
        ) else {
            return;
        };
        let elf = fake_elf(8192);
        let vmlinuz = env.root().join("vmlinuz-6.1.0-9-amd64");
        std::fs::write(&vmlinuz, bzimage(&zstd::encode_all(&elf[..], 3).unwrap())).unwrap();
        env.banger(&[
            "image",
            "pull",
            &reference,
            "--name",
            "bz",
            "--kernel",
            s(&vmlinuz),
        ])
        .ok();
        let k = kernel(&env, "bz-kernel");
        assert!(
            std::fs::read(&k.vmlinux).unwrap() == elf,
            "the stored kernel is not the unpacked ELF"
        );
        assert_eq!(k.manifest.version, "6.1.0-9-amd64");
        assert_eq!(k.initrd, None);

        let bad = env.root().join("vmlinuz-6.3");
        std::fs::write(&bad, b"MZ not a bzImage").unwrap();
        let out = env
            .banger(&[
                "image",
                "pull",
                &reference,
                "--name",
                "bad",
                "--kernel",
                s(&bad),
            ])
            .failed();
        let text = both(&out);
        assert!(
            text.contains("compressed kernel") && text.contains("ELF vmlinux"),
            "{text}"
        );
        assert!(text.contains(s(&bad)), "{text}");
        assert_eq!(image_names(&env), ["bz"]);
        assert_eq!(kernel_names(&env), ["bz-kernel"]);
        let mut kernels = entries(&env.state_dir().join("kernels"));
        kernels.sort();
        assert_eq!(kernels, ["bz-kernel"], "no staging left");
    }

    #[test]
    fn kernel_flags_are_refused_before_anything_is_made() {
        let env = BangerEnv::new();
        let (vmlinux, initrd, _) = kernel_files(&env.root().join("mine"));
        let ghost = env.root().join("no-such-file");
        // Nothing listens there: no refusal below may get as far as a pull.
        let reference = "127.0.0.1:9/nothing:here";
        let refusals: [(&[&str], &str); 5] = [
            (
                &["--kernel-ref", "k", "--kernel", s(&vmlinux)],
                "cannot be used with",
            ),
            (&["--initrd", s(&initrd)], "--kernel"),
            (&["--kernel", s(&ghost)], s(&ghost)),
            (&["--kernel", s(&vmlinux), "--initrd", s(&ghost)], s(&ghost)),
            (
                &["--kernel", s(&vmlinux), "--modules", s(&ghost)],
                "--modules",
            ),
        ];
        for (flags, says) in refusals {
            let mut args = vec!["image", "pull", reference, "--name", "x"];
            args.extend_from_slice(flags);
            let out = env.banger(&args).failed();
            assert!(both(&out).contains(says), "{flags:?}: {out:?}");
            let mut args = vec!["image", "register", "--name", "x", "--rootfs", s(&initrd)];
            args.extend_from_slice(flags);
            let out = env.banger(&args).failed();
            assert!(both(&out).contains(says), "register {flags:?}: {out:?}");
        }
        assert!(image_names(&env).is_empty());
        assert!(kernel_names(&env).is_empty());
        assert!(entries(&env.state_dir().join("kernels")).is_empty());
    }

    #[test]
    fn a_pull_that_fails_after_the_kernel_import_removes_the_kernel_again() {
        let env = BangerEnv::new();
        // Nothing listens on port 9: the pull fails after the import.
        env.write_config("insecure_registries = [\"127.0.0.1:9\"]\n");
        let (vmlinux, initrd, modules) = kernel_files(&env.root().join("mine"));
        let out = env
            .banger(&[
                "image",
                "pull",
                "127.0.0.1:9/nothing:here",
                "--name",
                "gone",
                "--kernel",
                s(&vmlinux),
                "--initrd",
                s(&initrd),
                "--modules",
                s(&modules),
            ])
            .failed();
        assert!(
            out.stderr.contains("import_kernel"),
            "the kernel was imported first: {out:?}"
        );
        assert!(image_names(&env).is_empty());
        assert!(kernel_names(&env).is_empty(), "{out:?}");
        assert!(
            entries(&env.state_dir().join("kernels")).is_empty(),
            "no kernel dir or staging left"
        );
        // The name is free again: the same import works.
        let (_, rootfs) = env.boot_files();
        env.banger(&[
            "image",
            "register",
            "--name",
            "gone",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            s(&vmlinux),
            "--modules",
            s(&modules),
        ])
        .ok();
        assert_eq!(kernel_names(&env), ["gone-kernel"]);
    }

    #[test]
    fn an_existing_kernel_of_that_name_is_refused_and_kept() {
        let env = BangerEnv::new();
        let (vmlinux, _, modules) = kernel_files(&env.root().join("mine"));
        let (_, rootfs) = env.boot_files();
        let args = |name: &'static str| {
            vec![
                "image".to_string(),
                "register".into(),
                "--name".into(),
                name.into(),
                "--rootfs".into(),
                s(&rootfs).into(),
                "--kernel".into(),
                s(&vmlinux).into(),
                "--modules".into(),
                s(&modules).into(),
            ]
        };
        let run = |a: Vec<String>| env.banger(&a.iter().map(String::as_str).collect::<Vec<_>>());
        run(args("one")).ok();
        let first = kernel(&env, "one-kernel");
        env.banger(&["image", "delete", "one"]).ok();
        // The kernel stays after its image; registering the name again
        // does not silently reuse or replace it.
        let out = run(args("one")).failed();
        let text = both(&out);
        assert!(
            text.contains("--kernel-ref one-kernel")
                && text.contains("banger kernel rm one-kernel"),
            "{text}"
        );
        assert!(image_names(&env).is_empty());
        assert_eq!(kernel(&env, "one-kernel").manifest, first.manifest);
        // As the message says: name it instead.
        env.banger(&[
            "image",
            "register",
            "--name",
            "one",
            "--rootfs",
            s(&rootfs),
            "--kernel-ref",
            "one-kernel",
        ])
        .ok();
        assert_eq!(
            image(&env, "one").kernel_path.as_ref(),
            Some(&first.vmlinux)
        );
    }

    #[test]
    fn a_catalog_image_takes_kernel_files_over_its_bundles_kernel() {
        use test_infra::http::{Entry as T, Reply, Server, sha256, tar_zst};
        let env = BangerEnv::new();
        let server = Server::start();
        // The bundle's own kernel is in no catalog: with --kernel it is
        // never looked up.
        let bundle = tar_zst(&[
            T::File("rootfs.ext4", &test_infra::http::noise(1 << 20)),
            T::File("manifest.toml", b"kernel = \"nowhere\"\n"),
        ]);
        server.route("/i/img.tar.zst", Reply::Body(bundle.clone()));
        let catalog = env.root().join("images.toml");
        let entry = |name: &str, sha: &str| {
            format!(
                "[[image]]\nname = {name:?}\narch = \"x86_64\"\nurl = \"i/img.tar.zst\"\nsha256 = {sha:?}\nkernel = \"nowhere\"\ndescription = \"test\"\n"
            )
        };
        let text = format!(
            "base_url = {:?}\n{}{}",
            server.base,
            entry("img", &sha256(&bundle)),
            entry("corrupt", &"0".repeat(64)),
        );
        std::fs::write(&catalog, text).unwrap();
        env.write_config(&format!("image_catalog_file = {catalog:?}\n"));
        let (vmlinux, initrd, _) = kernel_files(&env.root().join("mine"));

        env.banger(&[
            "image",
            "pull",
            "img",
            "--kernel",
            s(&vmlinux),
            "--initrd",
            s(&initrd),
        ])
        .ok();
        let img = image(&env, "img");
        assert_eq!(
            img.record.kernel,
            ImageKernel::Named {
                name: "img-kernel".into()
            }
        );
        assert_eq!(
            std::fs::read(img.kernel_path.unwrap()).unwrap(),
            std::fs::read(&vmlinux).unwrap()
        );

        // A bundle that fails its checksum after the import: no kernel left.
        let out = env
            .banger(&["image", "pull", "corrupt", "--kernel", s(&vmlinux)])
            .failed();
        assert!(both(&out).to_lowercase().contains("checksum"), "{out:?}");
        assert_eq!(image_names(&env), ["img"]);
        assert_eq!(kernel_names(&env), ["img-kernel"]);
    }

    #[test]
    fn register_imports_a_compressed_or_modular_kernel_and_keeps_a_plain_one_in_place() {
        let env = BangerEnv::new();
        let (vmlinux, initrd, _) = kernel_files(&env.root().join("mine"));
        let (_, rootfs) = env.boot_files();
        let elf = fake_elf(2048);
        let vmlinuz = env.root().join("vmlinuz-6.2");
        let gz = {
            use std::io::Write;
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        std::fs::write(&vmlinuz, bzimage(&gz)).unwrap();
        env.banger(&[
            "image",
            "register",
            "--name",
            "zipped",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            s(&vmlinuz),
            "--initrd",
            s(&initrd),
        ])
        .ok();
        let img = image(&env, "zipped");
        assert_eq!(
            img.record.kernel,
            ImageKernel::Named {
                name: "zipped-kernel".into()
            }
        );
        assert_eq!(
            img.record.rootfs, rootfs,
            "the rootfs stays registered in place"
        );
        assert!(std::fs::read(img.kernel_path.unwrap()).unwrap() == elf);

        // A plain ELF without modules: in place, as register always did.
        env.banger(&[
            "image",
            "register",
            "--name",
            "plain",
            "--rootfs",
            s(&rootfs),
            "--kernel",
            s(&vmlinux),
        ])
        .ok();
        assert_eq!(image(&env, "plain").kernel_path, Some(vmlinux.clone()));
        assert_eq!(kernel_names(&env), ["zipped-kernel"]);
    }
}
