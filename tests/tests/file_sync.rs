//! `[[file_sync]]` through the real CLI and daemon against the fake
//! firecracker: the files reach the guest bundle on the config drive, with
//! their modes, recursively, without symlinks; they refresh at every start;
//! a bad entry is refused naming it. The real guest writing them is the e2e
//! test's job.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

    use banger_api::guest::GuestFile;
    use banger_vmm::config_drive::{self, ConfigDrive};
    use test_infra::BangerEnv;

    fn write(path: &Path, contents: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// The guest bundle on the VM's config drive, checked against the one
    /// the record shows, which keeps every file but none of their contents.
    fn drive_files(env: &BangerEnv, name: &str) -> Vec<GuestFile> {
        let view = env.show(name);
        let image = view.dir.join(config_drive::FILE_NAME);
        let drive = ConfigDrive::decode(&std::fs::read(&image).unwrap()).unwrap();
        let mut stripped = drive.guest.clone();
        for f in &mut stripped.files {
            f.contents.clear();
        }
        // Equal to the stripped bundle: the record (and so `vm show`) holds
        // no synced secret.
        assert_eq!(Some(&stripped), view.record.guest.as_ref());
        drive.guest.files
    }

    /// (path, contents, mode) of the files under /root, sorted by path.
    fn synced(files: &[GuestFile]) -> Vec<(String, String, u32)> {
        let mut v: Vec<_> = files
            .iter()
            .filter(|f| f.path.starts_with("/root"))
            .map(|f| {
                assert_eq!((f.uid, f.gid), (0, 0), "{}", f.path.display());
                (
                    f.path.display().to_string(),
                    String::from_utf8_lossy(&f.contents).into_owned(),
                    f.mode,
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A home (the daemon's HOME) with a file, a directory tree holding
    /// symlinks out of it, and a secret outside the tree.
    fn populate(env: &BangerEnv) {
        let home = env.root().join("home");
        write(&home.join(".tool/auth.json"), "{\"token\":1}", 0o644);
        write(&home.join("bin/hello"), "#!/bin/sh\necho hi\n", 0o700);
        write(&home.join(".aws/credentials"), "aws-key", 0o600);
        write(&home.join(".aws/sso/cache/t.json"), "sso", 0o640);
        write(&home.join("private/secret"), "NOT FOR THE GUEST", 0o600);
        symlink(home.join("private/secret"), home.join(".aws/leak")).unwrap();
        symlink(home.join("private"), home.join(".aws/leakdir")).unwrap();
        env.write_config(
            r#"
[[file_sync]]
host = "~/.tool/auth.json"
guest = "~/.tool/auth.json"

[[file_sync]]
host = "~/bin/hello"
guest = "/root/bin/hello"
mode = "0755"

[[file_sync]]
host = "~/.aws"
guest = "~/.aws"

[[file_sync]]
host = "~/not-there"
guest = "~/not-there"
"#,
        );
    }

    #[test]
    fn vm_create_with_file_sync_puts_the_files_on_the_config_drive() {
        let env = BangerEnv::new();
        populate(&env);
        let run = env.create("fs", &["--cap", "file-sync"]).ok();
        let files = drive_files(&env, "fs");
        assert_eq!(
            synced(&files),
            [
                ("/root/.aws/credentials".into(), "aws-key".into(), 0o600),
                ("/root/.aws/sso/cache/t.json".into(), "sso".into(), 0o640),
                (
                    "/root/.tool/auth.json".into(),
                    "{\"token\":1}".into(),
                    0o600
                ),
                (
                    "/root/bin/hello".into(),
                    "#!/bin/sh\necho hi\n".into(),
                    0o755
                ),
            ]
        );
        assert!(
            files.iter().all(|f| f.contents != b"NOT FOR THE GUEST"),
            "a symlink was followed out of the synced tree"
        );
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(output.contains("not-there"), "{output}");
        assert!(output.contains("leak"), "{output}");
        assert_eq!(
            env.show("fs").record.state,
            banger_api::model::VmState::Running
        );
    }

    #[test]
    fn synced_files_are_read_again_at_every_start() {
        let env = BangerEnv::new();
        populate(&env);
        env.create("fr", &["--cap", "file-sync"]).ok();
        let auth = env.root().join("home/.tool/auth.json");
        write(&auth, "{\"token\":2}", 0o644);
        std::fs::remove_file(env.root().join("home/bin/hello")).unwrap();
        env.banger(&["vm", "restart", "fr"]).ok();
        let files = synced(&drive_files(&env, "fr"));
        assert!(
            files.contains(&(
                "/root/.tool/auth.json".into(),
                "{\"token\":2}".into(),
                0o600
            )),
            "{files:?}"
        );
        assert!(!files.iter().any(|f| f.0 == "/root/bin/hello"), "{files:?}");
    }

    #[test]
    fn without_the_capability_nothing_is_synced() {
        let env = BangerEnv::new();
        populate(&env);
        env.create("none", &[]).ok();
        assert_eq!(synced(&drive_files(&env, "none")), []);
    }

    #[test]
    fn an_unreadable_entry_fails_the_create_naming_it() {
        let env = BangerEnv::new();
        let plain = env.root().join("home/plain");
        write(&plain, "x", 0o600);
        env.write_config("[[file_sync]]\nhost = \"~/plain/child\"\nguest = \"~/x\"\n");
        let out = env.create("bad", &["--cap", "file-sync"]).failed();
        assert!(out.stderr.contains("file-sync"), "{}", out.stderr);
        assert!(
            out.stderr.contains("file_sync[0]: Cannot read") && out.stderr.contains("plain/child"),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn a_bad_entry_is_refused_naming_its_index_and_field() {
        let env = BangerEnv::new();
        env.write_config(
            "[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\n[[file_sync]]\nhost = \"~/b\"\nguest = \"/etc/b\"\n",
        );
        // The daemon refuses to start on a bad config; the CLI shows its
        // error (with the line) and points at its log, which holds it too.
        let out = env.create("bad", &["--cap", "file-sync"]).failed();
        assert!(out.stderr.contains("bangerd.log"), "{}", out.stderr);
        // Line 10: write_config puts firecracker_bin, stop_timeout_secs,
        // default_caps and vmm before these entries.
        let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
        let want = "line 10, column 9: file_sync[1].guest \"/etc/b\" is not below /root, the guest's work disk; use ~/NAME or /root/NAME";
        assert!(log.contains(want), "{log}");
        assert!(out.stderr.contains(want), "{}", out.stderr);
        // Fixed, the same install works and no VM was left from the refusal.
        env.write_config("[[file_sync]]\nhost = \"~/a\"\nguest = \"~/a\"\n");
        assert!(env.list().is_empty());
    }
}
