//! Tests of the built-ins through the same trait the lifecycle uses.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use banger_api::guest::GuestConfig;
use banger_api::machine::MachineSpec;
use banger_api::model::{ByteSize, CapOptions, VmName, VmRecord, VmSpec, VmState, VmmKind};
use banger_core::capability::{Capability, HookCtx, HookLog, TeardownReason, builtins};
use banger_host::hostops::RecordingHostOps;

use crate::vsock_agent::{self, VsockAgent};
use crate::work_disk::{self, WorkDisk};

#[derive(Default)]
struct Lines(Mutex<Vec<String>>);

impl HookLog for Lines {
    fn info(&self, msg: &str) {
        self.0.lock().unwrap().push(format!("info {msg}"));
    }
    fn warn(&self, msg: &str) {
        self.0.lock().unwrap().push(format!("warn {msg}"));
    }
}

fn vm(disk: u64, booted_once: bool) -> VmRecord {
    let mut vm = VmRecord::new(
        VmName::parse("t1").unwrap(),
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            disk_size: ByteSize(disk),
            kernel: "/k".into(),
            initrd: None,
            rootfs_source: "/r".into(),
            extra_boot_args: None,
            vmm: VmmKind::Firecracker,
        },
        vec![],
        0,
    );
    vm.state = VmState::Starting;
    vm.booted_once = booted_once;
    vm
}

fn with_ctx<R>(vm: &VmRecord, dir: &Path, f: impl FnOnce(&HookCtx<'_>) -> R) -> (R, Vec<String>) {
    with_opts(vm, dir, &CapOptions::new(), f)
}

fn with_opts<R>(
    vm: &VmRecord,
    dir: &Path,
    options: &CapOptions,
    f: impl FnOnce(&HookCtx<'_>) -> R,
) -> (R, Vec<String>) {
    let host = RecordingHostOps::default();
    let log = Lines::default();
    let config = banger_api::config::Config::defaults(Path::new("/nonexistent/config.toml"));
    let ctx = HookCtx {
        vm,
        vm_dir: dir,
        options,
        host: &host,
        config: &config,
        log: &log,
    };
    let r = f(&ctx);
    let lines = log.0.lock().unwrap().clone();
    (r, lines)
}

fn have_e2fsprogs() -> bool {
    std::process::Command::new("mkfs.ext4")
        .arg("-V")
        .output()
        .is_ok()
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
fn exactly_the_expected_builtins_are_registered() {
    let t = crate::test_env::TestEnv::new();
    let (caps, errors) = builtins(&t.env());
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<String> = caps.iter().map(|c| c.name().to_string()).collect();
    assert_eq!(
        names,
        vec![
            "dns",
            "file-sync",
            "mise",
            "nat",
            "network",
            "ports",
            "ssh-identity",
            "vsock-agent",
            "work-disk"
        ]
    );
    let always: Vec<&str> = caps
        .iter()
        .filter(|c| c.always_on())
        .map(|c| c.name())
        .collect();
    assert_eq!(always, ["ssh-identity"]);
}

#[test]
fn ssh_identity_authorizes_one_stable_key_and_names_a_broken_one() {
    use crate::ssh_identity::SshIdentity;
    let dir = tempfile::tempdir().unwrap();
    let ssh = dir.path().join("ssh");
    let cap = SshIdentity::new(ssh.clone());
    let v = vm(64 << 20, false);
    let mut keys = Vec::new();
    for _ in 0..2 {
        let mut g = GuestConfig::new("t1");
        with_ctx(&v, dir.path(), |ctx| cap.guest_config(ctx, &mut g))
            .0
            .unwrap();
        keys.push(g.authorized_keys);
    }
    let public = std::fs::read_to_string(ssh.join("id_ed25519.pub")).unwrap();
    assert_eq!(keys[0], [public.trim_end().to_string()]);
    assert_eq!(keys[0], keys[1]);

    std::fs::write(ssh.join("id_ed25519"), "not a key\n").unwrap();
    let mut g = GuestConfig::new("t1");
    let err = with_ctx(&v, dir.path(), |ctx| cap.guest_config(ctx, &mut g))
        .0
        .unwrap_err();
    let chain = banger_core::lifecycle::render_chain(&err);
    assert!(
        chain.contains(&ssh.join("id_ed25519").display().to_string()),
        "{chain}"
    );
    assert!(g.authorized_keys.is_empty());
}

#[test]
fn mise_refuses_a_vm_without_nat_naming_both_fixes() {
    use banger_api::model::EnabledCap;

    use crate::mise::Mise;
    let dir = tempfile::tempdir().unwrap();
    let mut v = vm(64 << 20, false);
    let cap = |name: &str| EnabledCap {
        name: name.into(),
        options: CapOptions::new(),
    };
    v.caps = vec![cap("work-disk"), cap("mise")];
    let err = with_ctx(&v, dir.path(), |ctx| Mise.prepare_host(ctx))
        .0
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--nat") && err.contains("--no-bootstrap"),
        "{err}"
    );
    v.caps.push(cap("nat"));
    with_ctx(&v, dir.path(), |ctx| Mise.prepare_host(ctx))
        .0
        .unwrap();

    assert!(Mise.validate_options(&CapOptions::new()).is_ok());
    let mut o = CapOptions::new();
    o.insert("version".into(), "1".into());
    let err = Mise.validate_options(&o).unwrap_err().to_string();
    assert!(err.contains("takes no options"), "{err}");
}

#[test]
fn mise_offers_a_bootstrap_job_that_installs_in_the_checkout() {
    use crate::mise::{BOOTSTRAP, Mise};
    let v = vm(64 << 20, true);
    assert_eq!(Mise.guest_jobs(), [BOOTSTRAP]);
    assert!(Mise.guest_job("other", &v).is_none());
    let job = Mise.guest_job(BOOTSTRAP, &v).unwrap();
    let st = std::process::Command::new("sh")
        .args(["-n", "-c", &job.script])
        .status()
        .unwrap();
    assert!(st.success(), "the script does not parse:\n{}", job.script);
    assert!(job.script.contains("cd /root/repo\n"), "{}", job.script);
    assert!(job.script.contains("\nmise install\n"), "{}", job.script);
    assert_eq!(job.log, "/root/.cache/banger/mise-bootstrap.log");
}

#[test]
fn work_disk_rejects_options() {
    let mut o = CapOptions::new();
    o.insert("size".into(), "1G".into());
    let err = WorkDisk::default()
        .validate_options(&o)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--disk-size"), "{err}");
    assert!(
        WorkDisk::default()
            .validate_options(&CapOptions::new())
            .is_ok()
    );
}

#[test]
fn work_disk_is_created_sparse_attached_and_mounted_at_root() {
    if !have_e2fsprogs() {
        eprintln!(
            "SKIPPED work_disk_is_created_sparse_attached_and_mounted_at_root: mkfs.ext4 missing (apt-get install e2fsprogs)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = vm(256 << 20, false);
    let (r, lines) = with_ctx(&v, dir.path(), |ctx| WorkDisk::default().prepare_host(ctx));
    r.unwrap();
    assert!(lines.iter().any(|l| l.contains("creating")), "{lines:?}");
    let img = dir.path().join(work_disk::FILE_NAME);
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 256 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 64 << 20,
        "work disk is not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    assert!(debugfs(&img, "stats").contains("banger-work"));

    let mut m = bare_machine();
    with_ctx(&v, dir.path(), |ctx| {
        WorkDisk::default().configure_machine(ctx, &mut m)
    })
    .0
    .unwrap();
    assert_eq!(m.drives.len(), 1);
    assert_eq!(m.drives[0].id, work_disk::DRIVE_ID);
    assert_eq!(m.drives[0].path, img);
    assert!(!m.drives[0].read_only);

    let mut g = GuestConfig::new("t1");
    with_ctx(&v, dir.path(), |ctx| {
        WorkDisk::default().guest_config(ctx, &mut g)
    })
    .0
    .unwrap();
    assert_eq!(g.mounts.len(), 1);
    assert_eq!(g.mounts[0].mount_point, Path::new("/root"));
    assert_eq!(g.mounts[0].drive_id, work_disk::DRIVE_ID);
}

#[test]
fn a_work_disk_from_a_template_is_synced_by_guest_config_or_a_rollback() {
    let test = "a_work_disk_from_a_template_is_synced_by_guest_config_or_a_rollback";
    if !have_e2fsprogs() {
        eprintln!("SKIPPED {test}: mkfs.ext4 missing (apt-get install e2fsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = WorkDisk::with_templates(dir.path().join("templates"));
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (va, vb) = (vm(64 << 20, false), vm(64 << 20, false));

    // PrepareHost leaves the disk in place and its sync running behind.
    with_ctx(&va, &a, |ctx| cap.prepare_host(ctx)).0.unwrap();
    assert!(debugfs(&a.join(work_disk::FILE_NAME), "stats").contains("banger-work"));
    assert_eq!(cap.syncs_pending(), 1);
    with_ctx(&vb, &b, |ctx| cap.prepare_host(ctx)).0.unwrap();
    assert_eq!(cap.syncs_pending(), 2);

    // ConfigureMachine leaves it running; GuestConfig, the last hook
    // before the VMM starts, waits for this VM's sync, not the other's.
    let mut m = bare_machine();
    with_ctx(&va, &a, |ctx| cap.configure_machine(ctx, &mut m))
        .0
        .unwrap();
    assert_eq!(m.drives.len(), 1);
    assert_eq!(cap.syncs_pending(), 2);
    let mut g = GuestConfig::new("a");
    with_ctx(&va, &a, |ctx| cap.guest_config(ctx, &mut g))
        .0
        .unwrap();
    assert_eq!(cap.syncs_pending(), 1);

    // A start that fails before GuestConfig: the rollback waits for
    // the sync, then removes the disk of a VM that never booted.
    with_ctx(&vb, &b, |ctx| cap.teardown(ctx, TeardownReason::Rollback))
        .0
        .unwrap();
    assert_eq!(cap.syncs_pending(), 0);
    assert!(!b.join(work_disk::FILE_NAME).exists());
    assert!(a.join(work_disk::FILE_NAME).exists());
}

#[test]
fn work_disk_survives_stop_and_booted_rollback_but_not_delete() {
    if !have_e2fsprogs() {
        eprintln!(
            "SKIPPED work_disk_survives_stop_and_booted_rollback_but_not_delete: mkfs.ext4 missing (apt-get install e2fsprogs)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(work_disk::FILE_NAME);
    let booted = vm(64 << 20, true);
    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().prepare_host(ctx)
    })
    .0
    .unwrap();
    // Put user data on it, then prove each teardown keeps or drops it.
    let data = dir.path().join("data.txt");
    std::fs::write(&data, b"precious").unwrap();
    let st = std::process::Command::new("debugfs")
        .args(["-w", "-R", &format!("write {} data.txt", data.display())])
        .arg(&img)
        .output()
        .unwrap();
    assert!(st.status.success());

    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().teardown(ctx, TeardownReason::Stop)
    })
    .0
    .unwrap();
    assert!(img.exists());
    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().teardown(ctx, TeardownReason::Rollback)
    })
    .0
    .unwrap();
    assert!(
        img.exists(),
        "rollback of a VM that has booted must keep its data"
    );
    // Start again: the existing disk is reused, not recreated.
    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().prepare_host(ctx)
    })
    .0
    .unwrap();
    assert_eq!(debugfs(&img, "cat /data.txt"), "precious");

    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().teardown(ctx, TeardownReason::Delete)
    })
    .0
    .unwrap();
    assert!(!img.exists());
    // Idempotent: a second delete teardown is fine.
    with_ctx(&booted, dir.path(), |ctx| {
        WorkDisk::default().teardown(ctx, TeardownReason::Delete)
    })
    .0
    .unwrap();
}

#[test]
fn work_disk_rollback_of_first_start_removes_it() {
    if !have_e2fsprogs() {
        eprintln!(
            "SKIPPED work_disk_rollback_of_first_start_removes_it: mkfs.ext4 missing (apt-get install e2fsprogs)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fresh = vm(64 << 20, false);
    with_ctx(&fresh, dir.path(), |ctx| {
        WorkDisk::default().prepare_host(ctx)
    })
    .0
    .unwrap();
    assert!(dir.path().join(work_disk::FILE_NAME).exists());
    with_ctx(&fresh, dir.path(), |ctx| {
        WorkDisk::default().teardown(ctx, TeardownReason::Rollback)
    })
    .0
    .unwrap();
    assert!(!dir.path().join(work_disk::FILE_NAME).exists());
}

#[test]
fn work_disk_grows_when_the_size_was_raised() {
    if !have_e2fsprogs() {
        eprintln!(
            "SKIPPED work_disk_grows_when_the_size_was_raised: mkfs.ext4 missing (apt-get install e2fsprogs)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    with_ctx(&vm(64 << 20, true), dir.path(), |ctx| {
        WorkDisk::default().prepare_host(ctx)
    })
    .0
    .unwrap();
    let (r, lines) = with_ctx(&vm(128 << 20, true), dir.path(), |ctx| {
        WorkDisk::default().prepare_host(ctx)
    });
    r.unwrap();
    assert!(lines.iter().any(|l| l.contains("growing")), "{lines:?}");
    let img = dir.path().join(work_disk::FILE_NAME);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 << 20);
    let stats = debugfs(&img, "stats");
    let blocks: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap();
    let bsize: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap();
    assert_eq!(blocks * bsize, 128 << 20);
}

#[test]
fn work_disk_copies_one_cached_template_per_size_and_the_copies_grow() {
    let test = "work_disk_copies_one_cached_template_per_size_and_the_copies_grow";
    if !have_e2fsprogs() {
        eprintln!("SKIPPED {test}: mkfs.ext4 missing (apt-get install e2fsprogs)");
        return;
    }
    // The factory's instance: templates under the cache directory.
    let t = crate::test_env::TestEnv::new();
    let (caps, _) = builtins(&t.env());
    let cap = caps.iter().find(|c| c.name() == work_disk::NAME).unwrap();
    let templates = t.paths.cache_dir.join(work_disk::TEMPLATES_DIR);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&a, &b] {
        with_ctx(&vm(64 << 20, false), dir.path(), |ctx| {
            cap.prepare_host(ctx)
        })
        .0
        .unwrap();
        let img = dir.path().join(work_disk::FILE_NAME);
        let fsck = std::process::Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        assert!(fsck.status.success(), "{fsck:?}");
        assert!(debugfs(&img, "stats").contains("banger-work"));
    }
    let made: Vec<_> = std::fs::read_dir(&templates).unwrap().collect();
    if made.is_empty() {
        eprintln!("SKIPPED {test}: mkfs.ext4 cannot make metadata_csum_seed templates");
        return;
    }
    assert_eq!(made.len(), 1, "{made:?}");
    let uuid = |dir: &tempfile::TempDir| {
        let stats = debugfs(&dir.path().join(work_disk::FILE_NAME), "stats");
        stats
            .lines()
            .find_map(|l| l.strip_prefix("Filesystem UUID:"))
            .map(|s| s.trim().to_string())
            .unwrap()
    };
    assert_ne!(uuid(&a), uuid(&b));
    with_ctx(&vm(128 << 20, true), a.path(), |ctx| cap.prepare_host(ctx))
        .0
        .unwrap();
    let img = a.path().join(work_disk::FILE_NAME);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 128 << 20);
    assert!(debugfs(&img, "stats").contains("Block count:              131072"));
}

fn opts(pairs: &[(&str, &str)]) -> CapOptions {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn bare_machine() -> MachineSpec {
    MachineSpec {
        kernel: "/k".into(),
        initrd: None,
        boot_args: String::new(),
        vcpus: 1,
        memory_mib: 256,
        drives: vec![],
        nics: vec![],
        vsock: None,
        serial_log: "/s".into(),
        pci_devices: Vec::new(),
    }
}

#[test]
fn vsock_agent_checks_its_options() {
    assert!(VsockAgent.validate_options(&CapOptions::new()).is_ok());
    assert!(
        VsockAgent
            .validate_options(&opts(&[("timeout", "30"), ("agent", "/opt/banger-agent")]))
            .is_ok()
    );
    for (o, needle) in [
        (opts(&[("timeout", "0")]), "from 1 to 3600"),
        (opts(&[("timeout", "soon")]), "timeout=30"),
        (opts(&[("agent", "banger-agent")]), "absolute path"),
        (opts(&[("port", "1")]), "valid options: timeout, agent"),
    ] {
        let err = VsockAgent.validate_options(&o).unwrap_err().to_string();
        assert!(err.contains(needle), "{o:?}: {err}");
    }
}

#[test]
fn vsock_agent_adds_a_per_vm_socket_and_an_initrd_with_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = fake_agent_bin(dir.path());
    let o = opts(&[("agent", agent.to_str().unwrap())]);
    let v = vm(1 << 20, false);
    let mut m = bare_machine();
    let (r, lines) = with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.configure_machine(ctx, &mut m)
    });
    r.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("built initramfs")),
        "{lines:?}"
    );
    let vs = m.vsock.clone().unwrap();
    assert!(vs.guest_cid >= 3);
    assert_eq!(vs.uds_path, dir.path().join(vsock_agent::SOCKET_FILE));
    let initrd = m.initrd.clone().unwrap();
    assert_eq!(initrd, dir.path().join(vsock_agent::INITRD_FILE));
    let bytes = std::fs::read(&initrd).unwrap();
    assert!(bytes.starts_with(b"070701"));
    assert!(bytes.windows(11).any(|w| w == b"agent bytes"));

    // A second vsock device is refused rather than silently replaced.
    let (r, _) = with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.configure_machine(ctx, &mut m)
    });
    assert!(r.unwrap_err().to_string().contains("already has a vsock"));

    // Delete removes the socket and the initrd; stop keeps the initrd.
    std::fs::write(&vs.uds_path, b"").unwrap();
    with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.teardown(ctx, TeardownReason::Stop)
    })
    .0
    .unwrap();
    assert!(!vs.uds_path.exists() && initrd.exists());
    with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.teardown(ctx, TeardownReason::Delete)
    })
    .0
    .unwrap();
    assert!(!initrd.exists());
}

#[test]
fn vsock_agent_gives_each_start_a_fresh_exec_secret_on_host_and_guest() {
    let dir = tempfile::tempdir().unwrap();
    let v = vm(1 << 20, false);
    let o = CapOptions::new();
    let host = dir.path().join(banger_vmm::vsock::EXEC_SECRET_FILE);
    let mut secrets = Vec::new();
    for _ in 0..2 {
        let mut g = GuestConfig::new("t1");
        with_opts(&v, dir.path(), &o, |ctx| {
            VsockAgent.guest_config(ctx, &mut g)
        })
        .0
        .unwrap();
        let on_host = std::fs::read(&host).unwrap();
        let file = g
            .files
            .iter()
            .find(|f| f.path == Path::new("/run/banger/exec.secret"))
            .unwrap();
        assert_eq!(file.contents, on_host);
        assert_eq!(file.mode, 0o600);
        assert_eq!(on_host.len(), 64);
        assert!(on_host.iter().all(u8::is_ascii_hexdigit));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&host).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        secrets.push(on_host);
    }
    assert_ne!(secrets[0], secrets[1]);
    with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.teardown(ctx, TeardownReason::Stop)
    })
    .0
    .unwrap();
    assert!(!host.exists());
}

#[test]
fn vsock_agent_reports_a_missing_agent_binary() {
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&[("agent", "/nonexistent/banger-agent")]);
    let mut m = bare_machine();
    let (r, _) = with_opts(&vm(1 << 20, false), dir.path(), &o, |ctx| {
        VsockAgent.configure_machine(ctx, &mut m)
    });
    let err = banger_core::lifecycle::render_chain(&r.unwrap_err());
    assert!(err.contains("/nonexistent/banger-agent"), "{err}");
    assert!(m.initrd.is_none() && m.vsock.is_none());
}

/// Serves one hybrid-vsock connection like a VMM fronting a healthy agent.
fn fake_agent(sock: &Path) -> std::thread::JoinHandle<String> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut connect = String::new();
        r.read_line(&mut connect).unwrap();
        let mut w = s;
        w.write_all(b"OK 52\n").unwrap();
        let mut request = String::new();
        r.read_line(&mut request).unwrap();
        let body = br#"{"version":"9.9.9","uptime_secs":1}"#;
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        w.write_all(body).unwrap();
        format!("{connect}{request}")
    })
}

#[test]
fn vsock_agent_post_start_waits_for_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_agent(&dir.path().join(vsock_agent::SOCKET_FILE));
    let (r, lines) = with_opts(
        &vm(1 << 20, false),
        dir.path(),
        &opts(&[("timeout", "10")]),
        |ctx| VsockAgent.post_start(ctx),
    );
    r.unwrap();
    assert!(
        lines.iter().any(|l| l.contains("agent 9.9.9 answered")),
        "{lines:?}"
    );
    let seen = server.join().unwrap();
    assert!(seen.starts_with("CONNECT 1024\nGET /healthz "), "{seen}");
}

/// A static-looking agent binary for configure_machine (an ELF header
/// without program headers, then a marker).
fn fake_agent_bin(dir: &Path) -> PathBuf {
    let agent = dir.join("agent-bin");
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(64, 0);
    elf.extend_from_slice(b"agent bytes");
    std::fs::write(&agent, elf).unwrap();
    agent
}

/// vsock-agent's ConfigureMachine for a VM in `dir` with PostStart's
/// `timeout` (seconds): its options, the VM and its vsock socket.
fn configured_vsock_agent(dir: &Path, timeout: &str) -> (CapOptions, VmRecord, PathBuf) {
    let agent = fake_agent_bin(dir);
    let o = opts(&[("agent", agent.to_str().unwrap()), ("timeout", timeout)]);
    let v = vm(1 << 20, false);
    let mut m = bare_machine();
    with_opts(&v, dir, &o, |ctx| VsockAgent.configure_machine(ctx, &mut m))
        .0
        .unwrap();
    (o, v, m.vsock.unwrap().uds_path)
}

#[test]
fn vsock_agent_post_start_asks_the_agent_once_it_announced_itself() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let (o, v, uds) = configured_vsock_agent(dir.path(), "20");
    let ready_sock = dir
        .path()
        .join(format!("{}_1025", vsock_agent::SOCKET_FILE));
    assert!(ready_sock.exists(), "bound before the VMM starts");
    assert_eq!(banger_vmm::vsock::ready_socket_path(&uds), ready_sock);

    // The guest's agent is up and has announced itself through the VMM
    // before PostStart looks; the first connection to it is the answer.
    let server = fake_agent(&uds);
    UnixStream::connect(&ready_sock)
        .unwrap()
        .write_all(b"READY 9.9.9\n")
        .unwrap();
    let (r, lines) = with_opts(&v, dir.path(), &o, |ctx| VsockAgent.post_start(ctx));
    r.unwrap();
    assert!(
        server
            .join()
            .unwrap()
            .starts_with("CONNECT 1024\nGET /healthz ")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("agent 9.9.9 answered") && l.contains("(announced)")),
        "{lines:?}"
    );

    // Teardown removes the announcement socket with the vsock socket.
    with_opts(&v, dir.path(), &o, |ctx| {
        VsockAgent.teardown(ctx, TeardownReason::Stop)
    })
    .0
    .unwrap();
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(vsock_agent::SOCKET_FILE))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A restored guest's agent answered the daemon's re-identify, which then
/// announces it as `READY restored`: PostStart asks nothing more (no agent
/// listens on the socket here, so a `/healthz` would fail the start).
#[test]
fn vsock_agent_post_start_takes_a_restored_announcement_without_asking() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let (o, v, uds) = configured_vsock_agent(dir.path(), "2");
    banger_vmm::vsock::announce_ready(&uds, banger_guest_protocol::api::READY_RESTORED).unwrap();
    let (r, lines) = with_opts(&v, dir.path(), &o, |ctx| VsockAgent.post_start(ctx));
    r.unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("restored agent answered its re-identify")),
        "{lines:?}"
    );
    // Any other reason is the agent's own announcement: it is asked.
    let dir = tempfile::tempdir().unwrap();
    let (o, v, uds) = configured_vsock_agent(dir.path(), "2");
    UnixStream::connect(banger_vmm::vsock::ready_socket_path(&uds))
        .unwrap()
        .write_all(b"READY 9.9.9\n")
        .unwrap();
    let (r, _) = with_opts(&v, dir.path(), &o, |ctx| VsockAgent.post_start(ctx));
    assert!(r.is_err(), "nobody answers /healthz here");
}

#[test]
fn vsock_agent_post_start_asks_an_agent_that_never_announces_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    // A timeout under the grace: the wait for an announcement ends with it,
    // and the agent is asked all the same (an agent older than the
    // announcement, or a restored guest nobody announced for).
    let (o, v, uds) = configured_vsock_agent(dir.path(), "2");
    let server = fake_agent(&uds);
    let (r, lines) = with_opts(&v, dir.path(), &o, |ctx| VsockAgent.post_start(ctx));
    r.unwrap();
    server.join().unwrap();
    assert!(
        lines.iter().any(|l| l.contains("did not announce itself")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("answered") && !l.contains("(announced)")),
        "{lines:?}"
    );
}

#[test]
fn vsock_agent_post_start_timeout_points_at_vm_logs() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (r, _) = with_opts(
        &vm(1 << 20, false),
        dir.path(),
        &opts(&[("timeout", "1")]),
        |ctx| VsockAgent.post_start(ctx),
    );
    let err = banger_core::lifecycle::render_chain(&r.unwrap_err());
    assert!(err.contains("/healthz"), "{err}");
    assert!(err.contains("within 1s"), "{err}");
    assert!(err.contains("`banger vm logs t1`"), "{err}");
    assert!(err.contains("vsock.sock"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Each built-in's code is in this crate: its module file, and for the ones
/// that own host-wide machinery, the submodules with it.
const BUILTIN_MODULES: &[(&str, &[&str])] = &[
    ("dns", &["src/dns.rs", "src/dns/server.rs"]),
    ("file-sync", &["src/file_sync.rs"]),
    ("mise", &["src/mise.rs"]),
    ("nat", &["src/nat.rs"]),
    (
        "network",
        &[
            "src/network.rs",
            "src/network/host.rs",
            "src/network/leases.rs",
            "src/network/taps.rs",
        ],
    ),
    ("ports", &["src/ports.rs"]),
    ("ssh-identity", &["src/ssh_identity.rs"]),
    (
        "vsock-agent",
        &["src/vsock_agent.rs", "src/vsock_agent/initrd.rs"],
    ),
    ("work-disk", &["src/work_disk.rs"]),
];

/// The low-level network calls `InProcessHostOps` makes (netlink, nft,
/// resolvectl), all that banger's core crates hold of networking besides
/// the address types of `banger_api::net`.
// `identity.rs` is the names a daemon derives from its state dir, which the
// helper (in banger-host) must derive the same way.
const HOST_NET_FILES: &[&str] = &["mod.rs", "netlink.rs", "nft.rs", "resolved.rs"];

/// banger's core crates: the daemon library and the layers under it.
const CORE_CRATES: &[&str] = &[
    "core",
    "core/api",
    "core/host",
    "core/vmm",
    "core/artifacts",
];

#[test]
fn every_builtin_lives_here_and_core_holds_none_of_their_code() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = here.join("..");
    let t = crate::test_env::TestEnv::new();
    let (caps, _) = builtins(&t.env());
    let listed: Vec<&str> = BUILTIN_MODULES.iter().map(|(n, _)| *n).collect();
    let made: Vec<&str> = caps.iter().map(|c| c.name()).collect();
    assert_eq!(made, listed, "list each built-in's modules here");
    for (name, files) in BUILTIN_MODULES {
        for f in *files {
            assert!(here.join(f).is_file(), "{name}: {f} is missing");
        }
    }

    for krate in CORE_CRATES {
        let manifest = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).unwrap();
        let manifest: toml::Table = manifest.parse().unwrap();
        let deps = manifest["dependencies"].as_table().unwrap();
        let dns_crates: Vec<&String> = deps.keys().filter(|k| k.starts_with("hickory")).collect();
        assert!(
            dns_crates.is_empty(),
            "{krate} depends on {dns_crates:?}: DNS belongs to the dns capability"
        );
        if *krate != "core/host" {
            assert!(
                !deps.contains_key("rtnetlink"),
                "{krate} depends on rtnetlink: netlink calls belong to banger-host"
            );
        }
    }

    // The daemon library has no network module at all; banger-host has the
    // low-level calls and nothing else.
    assert!(!root.join("core/src/net").exists());
    let mut net_files: Vec<String> = std::fs::read_dir(root.join("core/host/src/net"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    net_files.sort();
    assert_eq!(net_files, HOST_NET_FILES);

    // Core keeps only the generic cpio writer; the agent's initramfs is
    // vsock-agent's.
    assert!(!root.join("core/src/initramfs.rs").exists());

    // The capabilities' types are not named anywhere in core.
    let mut stack: Vec<_> = CORE_CRATES
        .iter()
        .map(|c| root.join(c).join("src"))
        .collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for ty in [
                "HostNetwork",
                "TapPool",
                "DnsServer",
                "NicState",
                "Lease",
                "build_initrd",
                "agent_archive",
                "mise.run",
                "mise install",
            ] {
                assert!(
                    !text.contains(ty),
                    "{} names {ty}, which belongs to a capability",
                    path.display()
                );
            }
        }
    }
}
