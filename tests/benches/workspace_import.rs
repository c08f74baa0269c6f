//! Importing a repository into a running guest: `banger vm workspace
//! prepare` against the same job done by hand over plain ssh, measured in the
//! same run on the same guest.
//!
//! Setup (untimed): the e2e rig (`test_infra::guest_rig`) boots the recipes'
//! Debian guest under QEMU/TCG on its own bridge; a git repository of several
//! thousand files is generated on the host, committed, then given modified,
//! deleted and untracked files. Then, in alternating rounds
//! (`BANGER_BENCH_IMPORTS`, default 3), each starting from an empty
//! `/root/repo` in the guest:
//!
//! - `banger`: `banger vm workspace prepare NAME REPO` through the CLI and
//!   daemon (git bundle and clone on the host, the `.git` through the guest
//!   agent's exec stream (sshd without one),
//!   `git checkout-index` in the guest, overlay of the working tree). Round
//!   0 prints the daemon's per-phase line: host git work, transfer+unpack,
//!   checkout, overlay, publish.
//! - `baseline`: `git bundle create` + `scp` of the bundle + `git clone` in
//!   the guest + a `tar` of the changed files piped over `ssh` and unpacked
//!   over the clone + `rm` of the deleted ones, with the system OpenSSH and
//!   the same key and pinned host keys.
//!
//! Both must leave the same tree: the bench checks HEAD and a modified and a
//! deleted file in the guest after every round.
//!
//! `./scripts/bench`, or `cargo bench -p banger-tests --bench workspace_import`.

// A bench is test code: a failed step should stop the run loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use test_infra::guest_rig::{rig, run};

const DEFAULT_IMPORTS: usize = 3;
const FILES: usize = 4000;

fn imports() -> usize {
    std::env::var("BANGER_BENCH_IMPORTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_IMPORTS)
}

fn git(repo: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args([
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@example.com",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A repository of `FILES` files in nested directories (1-8 KiB of
/// printable text each, a few executables and symlinks), committed, then
/// 50 files modified, 10 deleted and 20 untracked ones added.
fn make_repo(dir: &Path) -> String {
    git(dir, &["init", "-q", "-b", "main"]);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..FILES {
        let path = dir.join(format!("src/m{:02}/d{:02}/f{i:05}.txt", i % 37, i % 11));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let len = 1024 + (next() % 7168) as usize;
        let body: String = (0..len)
            .map(|_| char::from(b'a' + (next() % 26) as u8))
            .collect();
        std::fs::write(&path, body).unwrap();
    }
    for i in 0..20 {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(format!("bin/tool{i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "#!/bin/sh\necho tool\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(format!("tool{i}"), dir.join(format!("bin/link{i}"))).unwrap();
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "bench repository"]);
    for i in 0..50 {
        let p = dir.join(format!("src/m{:02}/d{:02}/f{i:05}.txt", i % 37, i % 11));
        std::fs::write(&p, format!("modified {i}\n")).unwrap();
    }
    for i in 100..110 {
        std::fs::remove_file(dir.join(format!("src/m{:02}/d{:02}/f{i:05}.txt", i % 37, i % 11)))
            .unwrap();
    }
    for i in 0..20 {
        std::fs::write(dir.join(format!("untracked{i}.txt")), "new\n").unwrap();
    }
    git(dir, &["rev-parse", "HEAD"])
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn main() {
    let test = "workspace_import";
    let Some((rig, _a)) = rig(
        test,
        "bookworm",
        &test_infra::guest_artifacts::bench_transport_config(),
    ) else {
        return;
    };
    let env = &rig.env;
    let repo_dir = tempfile::tempdir().unwrap();
    let repo = repo_dir.path();
    let head = make_repo(repo);
    let vm = rig.create("w", &["--image", "bookworm"]);
    let ip = vm.address.expect("a networked VM has an address");
    let known = rig.pin_host_keys(&vm);
    let key = env.state_dir().join("ssh/id_ed25519");
    let ssh_opts = [
        "-i".to_string(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", known.display()),
        "-o".into(),
        "HostKeyAlias=w.vm".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ];
    let target = format!("root@{ip}");
    let ssh = |cmd: &str| rig.ssh_ok("w", ip, &known, cmd);

    // The files the overlay must carry: modified (tracked) and deleted.
    let changed = git(repo, &["diff", "--name-only", "HEAD", "--diff-filter=M"]);
    let deleted = git(repo, &["diff", "--name-only", "HEAD", "--diff-filter=D"]);
    let first_changed = changed.lines().next().unwrap().to_string();
    let first_deleted = deleted.lines().next().unwrap().to_string();
    let want_changed = std::fs::read_to_string(repo.join(&first_changed)).unwrap();
    let check = |side: &str| {
        let got = ssh(&format!(
            "git -C /root/repo rev-parse HEAD; cat /root/repo/{first_changed}; \
             test -e /root/repo/{first_deleted} && echo PRESENT || echo gone"
        ));
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines[0], head, "{side}: HEAD");
        assert_eq!(lines[1], want_changed.trim_end(), "{side}: modified file");
        assert_eq!(lines[2], "gone", "{side}: deleted file");
    };

    let n = imports();
    let work = tempfile::tempdir().unwrap();
    let (mut banger, mut baseline) = (Vec::new(), Vec::new());
    for round in 0..n {
        ssh("rm -rf /root/repo /root/repo.bundle");
        let t = Instant::now();
        let out = env.banger(&["vm", "workspace", "prepare", "w", repo.to_str().unwrap()]);
        let took = t.elapsed();
        assert_eq!(out.code, 0, "prepare: {}", out.stderr);
        check("banger");
        if round == 0 {
            // Where banger's time went: the daemon's stage lines.
            let log = std::fs::read_to_string(env.state_dir().join("bangerd.log")).unwrap();
            for line in log.lines().filter(|l| l.contains("workspace")) {
                let plain: String = line
                    .split('\x1b')
                    .map(|p| p.split_once('m').map_or(p, |(_, r)| r))
                    .collect();
                eprintln!("workspace_import/daemon: {plain}");
            }
        }
        banger.push(took);

        ssh("rm -rf /root/repo /root/repo.bundle");
        let bundle = work.path().join("repo.bundle");
        let _ = std::fs::remove_file(&bundle);
        let t = Instant::now();
        git(
            repo,
            &[
                "bundle",
                "create",
                "-q",
                bundle.to_str().unwrap(),
                "HEAD",
                "main",
            ],
        );
        let mut scp = Command::new("scp");
        scp.arg("-q")
            .args(&ssh_opts)
            .arg(&bundle)
            .arg(format!("{target}:/root/repo.bundle"));
        assert!(scp.status().unwrap().success(), "scp");
        ssh("git clone -q -b main /root/repo.bundle /root/repo");
        let list = work.path().join("changed.list");
        std::fs::write(&list, changed.replace('\n', "\0")).unwrap();
        let tar = format!(
            "cd {} && tar -c --null -T {} | ssh {} {target} 'tar -x -C /root/repo'",
            shell_quote(&repo.display().to_string()),
            shell_quote(&list.display().to_string()),
            ssh_opts
                .iter()
                .map(|o| shell_quote(o))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = run("bash", &["-c", &tar]);
        assert!(out.status.success(), "tar overlay: {out:?}");
        let rm: Vec<String> = deleted.lines().map(shell_quote).collect();
        ssh(&format!("cd /root/repo && rm -f {}", rm.join(" ")));
        let took_base = t.elapsed();
        check("baseline");
        baseline.push(took_base);
        eprintln!(
            "workspace_import/round {round}: banger {:.2} s, baseline {:.2} s",
            took.as_secs_f64(),
            took_base.as_secs_f64()
        );
    }
    let (b, s) = (median(banger), median(baseline));
    println!(
        "workspace_import/repo: {FILES} files + 40 bin entries, 50 modified, 10 deleted, 20 untracked (left out); {n} imports per side"
    );
    println!(
        "workspace_import/banger:   {b:6.2} s median (vm workspace prepare, the agent over {})",
        test_infra::guest_artifacts::bench_transport()
    );
    println!(
        "workspace_import/baseline: {s:6.2} s median (git bundle + scp + clone + tar overlay over ssh)"
    );
    println!("workspace_import/ratio baseline:banger {:.2}x", s / b);
    rig.delete_all_and_check_clean(&[env.show("w")]);
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
