//! Daily-use CLI commands through the real `banger` and `bangerd` against
//! the fake firecracker: `ssh-config`, `vm prune`, VM references by ID
//! prefix, live completions, the workspace export's file list.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;
    use std::sync::Arc;

    use banger_api::model::VmState;
    use banger_api::net::Subnet;
    use banger_capabilities::network::leases::Leases;
    use banger_core::store::Store;
    use test_infra::BangerEnv;

    fn tool_present(tool: &str, test: &str) -> bool {
        let ok = Command::new(tool).arg("-V").output().is_ok();
        if !ok {
            eprintln!("SKIP {test}: {tool} missing (openssh-client)");
        }
        ok
    }

    /// The fake agent's answer for one real ed25519 host key, and the key's
    /// public line.
    fn host_keys(dir: &Path) -> (String, String) {
        let file = dir.join("ssh_host_ed25519_key");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@guest", "-f"])
            .arg(&file)
            .status()
            .unwrap();
        assert!(st.success());
        let line = std::fs::read_to_string(file.with_extension("pub")).unwrap();
        let json = serde_json::json!([{
            "algorithm": "ssh-ed25519",
            "public_key": line.trim(),
            "fingerprint": "SHA256:unused",
        }])
        .to_string();
        (json, line.trim().to_string())
    }

    /// An env whose fake agent reports one real host key (its public line
    /// returned too).
    fn agent_env(keydir: &Path) -> (BangerEnv, String) {
        let (json, public) = host_keys(keydir);
        let mut env = BangerEnv::new();
        let keys = env.root().join("host-keys.json");
        std::fs::write(&keys, json).unwrap();
        env.set_env("FAKE_FC_AGENT", "1");
        env.set_env("FAKE_FC_HOST_KEYS", &keys.display().to_string());
        (env, public)
    }

    /// Gives VM `name` an address, as the network capability would (the
    /// tests run without a bridge).
    fn lease(env: &BangerEnv, name: &str) {
        let store = Arc::new(Store::open(&env.state_dir().join("banger.db")).unwrap());
        let id = store.find_vm(name).unwrap().unwrap().id;
        let subnet: Subnet = "10.77.0.0/24".parse().unwrap();
        Leases::new(store).acquire(&id, &subnet).unwrap();
    }

    #[test]
    fn ssh_config_install_is_one_line_and_uninstall_restores_the_file() {
        if !tool_present("ssh", "ssh_config_install_is_one_line") {
            return;
        }
        let env = BangerEnv::new();
        let user_config = env.root().join("home/.ssh/config");
        std::fs::create_dir_all(user_config.parent().unwrap()).unwrap();
        let before = "# mine\nHost build\n    HostName 192.0.2.1\n    User me\n";
        std::fs::write(&user_config, before).unwrap();

        let shown = env.banger(&["ssh-config"]).ok();
        assert!(shown.stdout.contains("not included"), "{shown:?}");
        let doctor = env.banger(&["doctor"]);
        assert!(
            doctor
                .stdout
                .lines()
                .any(|l| l.starts_with("WARN ssh config:") && l.contains("ssh-config --install")),
            "{doctor:?}"
        );

        env.banger(&["ssh-config", "--install"]).ok();
        env.banger(&["ssh-config", "--install"]).ok();
        let text = std::fs::read_to_string(&user_config).unwrap();
        let banger_config = env.root().join("config/banger/ssh_config");
        let include = format!("Include {}", banger_config.display());
        assert_eq!(text, format!("{include}\n{before}"));
        let doctor = env.banger(&["doctor", "--json"]);
        let checks: serde_json::Value = serde_json::from_str(&doctor.stdout).unwrap();
        let check = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "ssh config")
            .unwrap();
        assert_eq!(check["status"], "pass", "{check}");

        // ssh itself reads the file: the block applies to NAME.vm only.
        let g = Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&banger_config)
            .arg("web.vm")
            .output()
            .unwrap();
        assert!(g.status.success(), "{g:?}");
        let g = String::from_utf8(g.stdout).unwrap();
        let key = env.state_dir().join("ssh/id_ed25519");
        for want in [
            "user root".to_string(),
            format!("identityfile {}", key.display()),
            "stricthostkeychecking true".to_string(),
            "identitiesonly yes".to_string(),
            "userknownhostsfile /dev/null".to_string(),
        ] {
            assert!(g.lines().any(|l| l == want), "no {want:?} in\n{g}");
        }
        assert!(
            g.lines().any(|l| l.starts_with("knownhostscommand ")
                && l.ends_with("ssh-config --known-hosts %n")),
            "{g}"
        );
        let other = Command::new("ssh")
            .args(["-G", "-F"])
            .arg(&banger_config)
            .arg("example.com")
            .output()
            .unwrap();
        let other = String::from_utf8(other.stdout).unwrap();
        assert!(
            !other.lines().any(|l| l.starts_with("knownhostscommand")),
            "{other}"
        );

        env.banger(&["ssh-config", "--uninstall"]).ok();
        assert_eq!(std::fs::read_to_string(&user_config).unwrap(), before);
    }

    #[test]
    fn known_hosts_command_prints_the_pinned_keys_of_a_running_vm() {
        if !tool_present("ssh-keygen", "known_hosts_command_prints_the_pinned_keys") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let (env, public) = agent_env(keydir.path());
        env.write_config("default_caps = [\"work-disk\", \"vsock-agent\"]\n");
        env.create("web", &[]).ok();
        lease(&env, "web");

        let out = env.banger(&["ssh-config", "--known-hosts", "web.vm"]).ok();
        let base64 = public.split_whitespace().nth(1).unwrap();
        assert!(
            out.stdout
                .lines()
                .any(|l| l.contains("web.vm") && l.contains("ssh-ed25519") && l.contains(base64)),
            "{out:?}"
        );
        // Not a VM: nothing, so ssh finds no key; an unknown VM: an error.
        let none = env
            .banger(&["ssh-config", "--known-hosts", "example.com"])
            .ok();
        assert_eq!(none.stdout, "");
        let ghost = env
            .banger(&["ssh-config", "--known-hosts", "ghost.vm"])
            .failed();
        assert_eq!(ghost.stdout, "");
    }

    #[test]
    fn prune_deletes_stopped_and_error_vms_only_when_confirmed() {
        let mut env = BangerEnv::new();
        env.create("keep", &[]).ok();
        env.create("old", &[]).ok();
        env.banger(&["vm", "stop", "old"]).ok();
        // A daemon whose VMM refuses the boot source leaves an error VM.
        env.banger(&["daemon", "stop"]).ok();
        env.set_env("FAKE_FC_FAIL", "PUT /boot-source");
        env.create("bad", &[]).failed();
        assert_eq!(env.show("bad").record.state, VmState::Error);

        // Not a terminal and no --yes: listed, refused, nothing deleted.
        let refused = env.banger(&["vm", "prune"]).failed();
        assert!(refused.stderr.contains("--yes"), "{refused:?}");
        assert!(refused.stdout.contains("old") && refused.stdout.contains("bad"));
        assert!(!refused.stdout.contains("keep"), "{refused:?}");
        assert_eq!(env.list().len(), 3);

        let out = env.banger(&["vm", "prune", "--yes"]).ok();
        assert!(out.stdout.contains("old: deleted"), "{out:?}");
        assert!(out.stdout.contains("bad: deleted"), "{out:?}");
        let left: Vec<String> = env
            .list()
            .iter()
            .map(|v| v.record.name.to_string())
            .collect();
        assert_eq!(left, ["keep"]);
        assert_eq!(env.show("keep").record.state, VmState::Running);
        let again = env.banger(&["vm", "prune"]).ok();
        assert!(
            again.stdout.contains("no stopped or error VMs"),
            "{again:?}"
        );
    }

    #[test]
    fn id_prefixes_work_where_names_do_and_ambiguity_lists_the_matches() {
        let env = BangerEnv::new();
        // 17 VMs: two of them share the first hex digit of their ID.
        let names: Vec<String> = (0..17).map(|i| format!("v{i}")).collect();
        for n in &names {
            env.create(n, &["--no-start"]).ok();
        }
        let vms = env.list();
        let id_of = |name: &str| {
            vms.iter()
                .find(|v| v.record.name.as_str() == name)
                .unwrap()
                .record
                .id
                .to_string()
        };
        let v0 = id_of("v0");
        // The shortest prefix of v0's ID no other VM shares.
        let unique = (1..=v0.len())
            .map(|n| &v0[..n])
            .find(|p| {
                vms.iter()
                    .filter(|v| v.record.id.as_str().starts_with(p))
                    .count()
                    == 1
            })
            .unwrap()
            .to_string();
        let shown = env.banger(&["vm", "show", &unique, "--json"]).ok();
        let view: banger_api::api::VmView = serde_json::from_str(&shown.stdout).unwrap();
        assert_eq!(view.record.name.as_str(), "v0");

        // A prefix and the name of the same VM, and the name again: one start.
        let out = env.banger(&["vm", "start", &unique, "v1", "v0", "v1"]).ok();
        assert_eq!(out.stdout, "v0: started\nv1: started\n", "{out:?}");

        // A first digit two IDs share is ambiguous: an error naming them.
        let shared = (0..16u8)
            .map(|d| format!("{d:x}"))
            .find(|d| {
                vms.iter()
                    .filter(|v| v.record.id.as_str().starts_with(d.as_str()))
                    .count()
                    > 1
            })
            .unwrap();
        let matching: Vec<String> = vms
            .iter()
            .filter(|v| v.record.id.as_str().starts_with(shared.as_str()))
            .map(|v| format!("{} ({})", v.record.name, v.record.id))
            .collect();
        let amb = env.banger(&["vm", "stop", &shared]).failed();
        for m in &matching {
            assert!(amb.stderr.contains(m), "{m} not in {amb:?}");
        }
        assert_eq!(amb.stdout, "");

        // vm set takes several VMs, by name or prefix.
        let v2 = id_of("v2");
        env.banger(&["vm", "set", "v3", &v2, "--vcpu", "3"]).ok();
        for n in ["v2", "v3"] {
            assert_eq!(env.show(n).record.spec.vcpus, 3, "{n}");
        }
        assert_ne!(env.show("v4").record.spec.vcpus, 3);
    }

    #[test]
    fn run_dry_run_lists_the_workspace_files_and_create_prints_the_spec() {
        if Command::new("git").arg("--version").output().is_err() {
            eprintln!("SKIP run_dry_run_lists_the_workspace_files: git missing");
            return;
        }
        let repo = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let st = Command::new("git")
                .arg("-C")
                .arg(repo.path())
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "git {args:?}");
        };
        git(&["init", "-q"]);
        std::fs::create_dir(repo.path().join("src")).unwrap();
        std::fs::write(repo.path().join("src/main.c"), "int main;\n").unwrap();
        std::fs::write(repo.path().join("README"), "hi\n").unwrap();
        std::fs::write(repo.path().join("scratch.txt"), "untracked\n").unwrap();
        git(&["add", "src/main.c", "README"]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "init",
        ]);
        // The overlay: the uncommitted change (history goes as a bundle).
        std::fs::write(repo.path().join("src/main.c"), "int main(void);\n").unwrap();

        let env = BangerEnv::new();
        let p = repo.path().to_str().unwrap();
        let run = env.banger(&["vm", "run", p, "--dry-run"]).ok();
        let prepare = env
            .banger(&["vm", "workspace", "prepare", "x", p, "--dry-run"])
            .ok();
        // The workspace part is the same list `workspace prepare` prints.
        assert!(
            run.stdout.ends_with(&prepare.stdout),
            "{run:?}\n{prepare:?}"
        );
        assert!(run.stdout.contains("files:      1\n"), "{run:?}");
        assert!(
            run.stdout.lines().any(|l| l.contains("src/main.c")),
            "{run:?}"
        );
        assert!(!run.stdout.contains("README"), "{run:?}");
        assert!(!run.stdout.contains("scratch.txt"), "{run:?}");
        let with = env
            .banger(&["vm", "run", p, "--dry-run", "--include-untracked"])
            .ok();
        assert!(with.stdout.contains("scratch.txt"), "{with:?}");
        assert_eq!(env.daemon_pid(), None, "a dry run starts no daemon");

        // vm create prints the spec line first, as vm run does.
        env.write_config("[vm_defaults]\nvcpus = 3\nmemory_mib = 768\n");
        let out = env.create("spec", &[]).ok();
        let first = out.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("spec: 3 vcpu · 768 MiB · 64M disk · vmm firecracker (config)"),
            "{out:?}"
        );
    }

    #[test]
    fn default_image_name_is_the_image_of_create_and_run() {
        let env = BangerEnv::new();
        let (k, r) = env.boot_files();
        env.register_boot_files("mine");
        env.write_config("default_image_name = \"mine\"\n");
        let dry = env.banger(&["vm", "run", "--dry-run"]).ok();
        assert!(dry.stdout.contains("from image mine"), "{dry:?}");
        env.banger(&["vm", "create", "--name", "d", "--disk-size", "64M"])
            .ok();
        let vm = env.show("d");
        assert_eq!(vm.record.spec.rootfs_source, r);
        assert_eq!(vm.record.spec.kernel, k);
        // An image that does not exist is refused by name.
        env.write_config("default_image_name = \"nope\"\n");
        let out = env
            .banger(&["vm", "create", "--name", "e", "--disk-size", "64M"])
            .failed();
        assert!(out.stderr.contains("nope"), "{out:?}");
    }

    /// What `banger` completes for the last of `words`, as `shell` asks.
    fn complete(env: &mut BangerEnv, shell: &str, words: &[&str]) -> Vec<String> {
        env.set_env("COMPLETE", shell);
        // bash and zsh pass the cursor's word index; fish and powershell
        // complete the last word.
        env.set_env("_CLAP_COMPLETE_INDEX", &(words.len() - 1).to_string());
        let mut args = vec!["--"];
        args.extend_from_slice(words);
        let out = env.banger(&args).ok();
        // An empty COMPLETE turns completion mode off again.
        env.set_env("COMPLETE", "");
        out.stdout
            .split(['\n', '\u{b}'])
            // fish: `value\thelp`, zsh: `value:help`.
            .map(|l| l.split(['\t', ':']).next().unwrap_or_default().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    #[test]
    fn tab_completes_vm_image_kernel_and_capability_names_from_the_daemon() {
        let mut env = BangerEnv::new();
        env.create("web-1", &["--no-start"]).ok();
        env.create("db-2", &["--no-start"]).ok();
        env.register_boot_files("mine");
        for shell in ["bash", "zsh", "fish", "powershell"] {
            let got = complete(&mut env, shell, &["banger", "vm", "show", ""]);
            for want in ["web-1", "db-2"] {
                assert!(
                    got.iter().any(|g| g == want),
                    "{shell}: {want} not in {got:?}"
                );
            }
            // Several names: every one completes.
            let got = complete(&mut env, shell, &["banger", "vm", "stop", "web-1", "d"]);
            assert_eq!(got, ["db-2"], "{shell}");
        }
        let got = complete(&mut env, "bash", &["banger", "vm", "create", "--image", ""]);
        assert_eq!(got, ["mine"]);
        let got = complete(&mut env, "bash", &["banger", "vm", "run", "--cap", "wor"]);
        assert_eq!(got, ["work-disk"]);

        // No daemon: nothing, at once, and it is not started.
        env.banger(&["daemon", "stop"]).ok();
        let t = std::time::Instant::now();
        let got = complete(&mut env, "bash", &["banger", "vm", "show", ""]);
        assert!(!got.iter().any(|g| g == "web-1"), "{got:?}");
        assert!(t.elapsed() < std::time::Duration::from_secs(3));
        assert_eq!(env.daemon_pid(), None);
    }

    #[test]
    fn kernel_import_finds_boot_vmlinuz_and_unpacks_it() {
        use test_infra::kernel_files::{bzimage, fake_elf};
        let env = BangerEnv::new();
        let elf = fake_elf(8192);
        let distro = env.root().join("distro-tree");
        std::fs::create_dir_all(distro.join("boot")).unwrap();
        let zst = zstd::encode_all(&elf[..], 3).unwrap();
        std::fs::write(distro.join("boot/vmlinuz-6.1.0-9-amd64"), bzimage(&zst)).unwrap();
        std::fs::write(
            distro.join("boot/initrd.img-6.1.0-9-amd64"),
            b"070701 initrd",
        )
        .unwrap();
        std::fs::write(distro.join("boot/config-6.1.0-9-amd64"), b"CONFIG_X=y\n").unwrap();
        let from = distro.to_str().unwrap();
        env.banger(&["kernel", "import", "deb", "--from", from])
            .ok();
        let show: serde_json::Value =
            serde_json::from_str(&env.banger(&["kernel", "show", "deb", "--json"]).ok().stdout)
                .unwrap();
        let vmlinux = std::fs::read(show["vmlinux"].as_str().unwrap()).unwrap();
        assert!(vmlinux == elf, "the stored kernel is not the unpacked ELF");
        assert_eq!(show["version"], "6.1.0-9-amd64", "{show}");
        assert_eq!(show["has_initrd"], true, "{show}");

        // An uncompressed boot/vmlinux-* is taken as it is.
        let plain = env.root().join("plain-tree");
        std::fs::create_dir_all(plain.join("boot")).unwrap();
        std::fs::write(plain.join("boot/vmlinux-6.2"), &elf).unwrap();
        env.banger(&[
            "kernel",
            "import",
            "plain",
            "--from",
            plain.to_str().unwrap(),
        ])
        .ok();

        // A compressed kernel that cannot be unpacked: refused, saying why.
        let bad = env.root().join("bad-tree");
        std::fs::create_dir_all(bad.join("boot")).unwrap();
        std::fs::write(bad.join("boot/vmlinuz-6.3"), b"MZ not a bzImage").unwrap();
        let out = env
            .banger(&["kernel", "import", "bad", "--from", bad.to_str().unwrap()])
            .failed();
        let text = format!("{}{}", out.stdout, out.stderr);
        assert!(
            text.contains("compressed kernel") && text.contains("ELF vmlinux"),
            "{text}"
        );
        assert!(text.contains("vmlinuz-6.3"), "{text}");
    }

    #[test]
    fn kernel_list_available_shows_download_sizes() {
        let env = BangerEnv::new();
        let cat = env.root().join("kernels.toml");
        std::fs::write(
            &cat,
            format!(
                "base_url = \"http://127.0.0.1:9/\"\n\
                 [[kernel]]\nname = \"big\"\narch = \"x86_64\"\ndistro = \"t\"\nversion = \"6.12\"\n\
                 url = \"k/big.tar.zst\"\nsha256 = \"{}\"\nsize = 12400000\ndescription = \"d\"\ndefault = true\n",
                "ab".repeat(32)
            ),
        )
        .unwrap();
        env.write_config(&format!("kernel_catalog_file = {cat:?}\n"));
        let out = env.banger(&["kernel", "list", "--available"]).ok();
        let header = out.stdout.lines().next().unwrap_or_default();
        assert!(header.contains("SIZE"), "{out:?}");
        let row = out.stdout.lines().find(|l| l.starts_with("big")).unwrap();
        assert!(row.contains("11.8 MiB"), "{out:?}");
    }

    #[test]
    fn ssh_key_path_is_the_key_vm_ssh_and_ssh_config_use() {
        if !tool_present("ssh-keygen", "ssh_key_path_is_the_key") {
            return;
        }
        let keydir = tempfile::tempdir().unwrap();
        let (env, _) = agent_env(keydir.path());
        env.write_config(
            "default_caps = [\"work-disk\", \"vsock-agent\", \"ssh-identity\"]\n\
             ssh_key_path = \"~/keys/banger_ed25519\"\n",
        );
        env.create("web", &[]).ok();
        lease(&env, "web");

        let key = env.root().join("home/keys/banger_ed25519");
        let printed = env.banger(&["vm", "ssh", "web", "--print"]).ok();
        assert!(
            printed.stdout.contains(&format!("-i {}", key.display())),
            "{printed:?}"
        );
        // The daemon made the pair there, and nothing in the default place.
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!env.state_dir().join("ssh/id_ed25519").exists());
        // ssh-config names it too.
        let cfg = env.root().join("config/banger/ssh_config");
        env.banger(&["ssh-config"]).ok();
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(
            text.contains(&format!("IdentityFile {}", key.display())),
            "{text}"
        );
    }
}
