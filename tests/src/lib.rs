//! Shared test infrastructure for banger's cross-crate tests: locating built
//! artifacts, an isolated banger installation per test, and polling helpers.
//!
//! This is test code: a panic here is a test failure with a message, which is
//! what we want, so unwrapping is allowed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

pub mod as_user;
pub mod dns;
pub mod guest_artifacts;
pub mod guest_rig;
pub mod http;
pub mod kernel_files;
pub mod registry;
pub mod tick_guest;

/// The cargo target profile directory the running test binary lives in
/// (`target/debug`), derived from the test executable's own path.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/test-hash -> target/debug
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A binary built by another workspace package (e.g. `banger`, `bangerd`).
/// Panics with the fix when it has not been built.
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`), as scripts/test does",
        p.display()
    );
    p
}

/// A plugin cdylib built by the workspace, by crate name
/// (`banger-plugin-shared-mount` -> `libbanger_plugin_shared_mount.so`).
pub fn workspace_cdylib(crate_name: &str) -> PathBuf {
    let file = format!("lib{}.so", crate_name.replace('-', "_"));
    let p = target_dir().join(&file);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`), as scripts/test does",
        p.display()
    );
    p
}

/// How long one command a test runs may take before it is killed as hung:
/// `BANGER_TEST_COMMAND_LIMIT` seconds, else 10 minutes (the longest
/// command the suite runs, an image build under load, takes about two).
pub fn command_limit() -> std::time::Duration {
    let secs = std::env::var("BANGER_TEST_COMMAND_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    std::time::Duration::from_secs(secs)
}

/// A command that did not end in time, with what it printed until killed.
#[derive(Debug)]
pub struct Hung {
    limit: std::time::Duration,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Hung {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "did not end within {:?} and was killed\nstdout so far:\n{}\nstderr so far:\n{}",
            self.limit, self.stdout, self.stderr
        )
    }
}

/// `cmd.output()`, except that a command still running after `limit` is
/// SIGKILLed and returned as [`Hung`] with what it had printed. A
/// descendant that kept the output pipes open gets a few seconds to let go
/// before the output is taken as it stands.
pub fn output_within(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
) -> Result<std::process::Output, Hung> {
    use std::io::Read;
    use std::process::Stdio;
    use std::sync::mpsc;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let reader = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
        rx
    };
    let stdout = reader(Box::new(child.stdout.take().unwrap()));
    let stderr = reader(Box::new(child.stderr.take().unwrap()));
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    match done.recv_timeout(limit) {
        Ok(status) => Ok(std::process::Output {
            status: status.unwrap(),
            stdout: stdout.recv().unwrap_or_default(),
            stderr: stderr.recv().unwrap_or_default(),
        }),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let grace = std::time::Duration::from_secs(5);
            let text = |rx: mpsc::Receiver<Vec<u8>>| {
                String::from_utf8_lossy(&rx.recv_timeout(grace).unwrap_or_default()).into_owned()
            };
            Err(Hung {
                limit,
                stdout: text(stdout),
                stderr: text(stderr),
            })
        }
    }
}

/// An isolated banger installation for one test: its own HOME and XDG
/// directories in a temp dir, the fake firecracker as `firecracker_bin`, and a
/// record file of every Firecracker API call. Dropping it stops the daemon and
/// kills every VMM it started.
#[derive(Debug)]
pub struct BangerEnv {
    dir: tempfile::TempDir,
    extra_env: Vec<(String, String)>,
    /// Set by [`BangerEnv::run_as_user`]: every command runs as that user.
    user: Option<as_user::AsUser>,
}

/// The outcome of one CLI run.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Panics with both streams unless the command succeeded.
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "command failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the command failed.
    pub fn failed(self) -> Self {
        assert_ne!(
            self.code, 0,
            "command unexpectedly succeeded\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl BangerEnv {
    /// A fresh environment with the default config (fake firecracker, plugins
    /// dir inside the env).
    pub fn new() -> Self {
        Self::new_in(std::path::Path::new("/tmp"))
    }

    /// [`BangerEnv::new`] with its directory under `parent` (a short path:
    /// the daemon's sockets live inside it), e.g. on another filesystem.
    pub fn new_in(parent: &std::path::Path) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bg")
            .tempdir_in(parent)
            .unwrap();
        let env = BangerEnv {
            dir,
            extra_env: Vec::new(),
            user: None,
        };
        for d in ["home", "config/banger/plugins", "state", "cache", "run"] {
            std::fs::create_dir_all(env.root().join(d)).unwrap();
        }
        env.write_config("");
        env
    }

    /// Adds an environment variable for every process this env starts
    /// (e.g. the fake firecracker's fault injection knobs).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.retain(|(k, _)| k != key);
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    /// The env's root directory.
    pub fn root(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The plugins directory the daemon loads from.
    pub fn plugins_dir(&self) -> PathBuf {
        self.root().join("config/banger/plugins")
    }

    /// banger's state dir (`$XDG_STATE_HOME/banger`).
    pub fn state_dir(&self) -> PathBuf {
        self.root().join("state/banger")
    }

    /// The daemon socket.
    pub fn socket(&self) -> PathBuf {
        self.root().join("run/banger/bangerd.sock")
    }

    /// Writes config.toml: `firecracker_bin` pointing at the fake (and
    /// `vmm = "firecracker"` unless `extra` sets `vmm`) plus `extra`.
    pub fn write_config(&self, extra: &str) {
        let fake = fake_firecracker();
        // The fake firecracker boots no guest (no agent) and parallel tests
        // must not share the host's bridge: only the work disk by default.
        let caps = if extra.contains("default_caps") {
            ""
        } else {
            "default_caps = [\"work-disk\"]\n"
        };
        // `vmm = "auto"` would take qemu on a host where KVM cannot boot a
        // standard guest; these envs mean the fake firecracker.
        let vmm = if extra.contains("vmm =") {
            ""
        } else {
            "vmm = \"firecracker\"\n"
        };
        let text = format!(
            "firecracker_bin = {:?}\nstop_timeout_secs = 3\n{caps}{vmm}{extra}\n",
            fake.display().to_string()
        );
        std::fs::write(self.root().join("config/banger/config.toml"), text).unwrap();
    }

    /// Where the fake firecracker records API calls.
    pub fn record_file(&self) -> PathBuf {
        self.root().join("fc-calls.jsonl")
    }

    /// From now on every command of this env runs as [`as_user::USER`],
    /// with `banger-helper` installed for it on `bridge`/`subnet` (see
    /// [`as_user::AsUser::install`]).
    pub fn run_as_user(&mut self, bridge: &str, subnet: &str, group: &str) -> &as_user::AsUser {
        let user = as_user::AsUser::install(self.root(), &self.state_dir(), bridge, subnet, group);
        self.user.insert(user)
    }

    /// The user this env runs as, when [`BangerEnv::run_as_user`] was called.
    pub fn user(&self) -> Option<&as_user::AsUser> {
        self.user.as_ref()
    }

    /// The `banger` binary this env's commands run (the user's copy in
    /// user mode).
    pub fn banger_bin(&self) -> PathBuf {
        match &self.user {
            Some(u) => u.copy_exe(&workspace_bin("banger")),
            None => workspace_bin("banger"),
        }
    }

    /// `program` as this env runs it, without its environment: as the
    /// user in user mode (a copy of a build-tree binary), else as is.
    pub fn external(&self, program: &std::path::Path) -> std::process::Command {
        match &self.user {
            Some(u) if program.starts_with(target_dir()) => u.wrap(&u.copy_exe(program)),
            Some(u) => u.wrap(program),
            None => std::process::Command::new(program),
        }
    }

    /// `program` with this env's HOME, XDG dirs and extra variables (what
    /// [`BangerEnv::banger`] runs), for callers that stream its output.
    pub fn command(&self, program: &std::path::Path) -> std::process::Command {
        let mut c = self.external(program);
        let r = self.root();
        let daemon = match &self.user {
            Some(u) => u.bin("bangerd"),
            None => workspace_bin("bangerd"),
        };
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", r.join("home"))
            .env("XDG_CONFIG_HOME", r.join("config"))
            .env("XDG_STATE_HOME", r.join("state"))
            .env("XDG_CACHE_HOME", r.join("cache"))
            .env("XDG_RUNTIME_DIR", r.join("run"))
            .env("BANGER_DAEMON_BIN", daemon)
            .env("FAKE_FC_RECORD", self.record_file())
            // The fake firecracker boots nothing: cargo's dynamically linked
            // agent is fine there (a test may unset this with set_env).
            .env(banger_api::config::ANY_AGENT_ENV, "1")
            .stdin(std::process::Stdio::null());
        if let Some(u) = &self.user {
            c.env("USER", as_user::USER)
                .env("BANGER_HELPER_SOCKET", u.helper_socket())
                .current_dir(r.join("home"));
        }
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        c
    }

    /// Runs the real `banger` CLI with `args`. One that has not ended
    /// after [`command_limit`] is killed and fails the test with what it
    /// printed and the end of the daemon's log, rather than hanging the
    /// suite until CI's own limit.
    pub fn banger(&self, args: &[&str]) -> Run {
        let mut cmd = self.command(&self.banger_bin());
        cmd.args(args);
        match output_within(cmd, command_limit()) {
            Ok(out) => Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            },
            Err(hung) => {
                let log = std::fs::read_to_string(self.state_dir().join("bangerd.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                let procs: Vec<String> = self
                    .daemon_pid()
                    .into_iter()
                    .chain(processes_in(self.root()))
                    .map(|pid| {
                        let read = |f: &str| {
                            std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default()
                        };
                        format!(
                            "{pid} {} waiting in {:?}",
                            read("comm").trim(),
                            read("wchan")
                        )
                    })
                    .collect();
                panic!(
                    "`banger {}` {hung}\nits processes: {procs:#?}\nthe daemon's log ends:\n{}",
                    args.join(" "),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    /// Starts `bangerd` directly (not through the CLI) and waits until its
    /// socket answers.
    pub fn spawn_daemon(&self) -> std::process::Child {
        let log = std::fs::File::create(self.root().join("bangerd-direct.log")).unwrap();
        let child = self
            .command(&workspace_bin("bangerd"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let sock = self.socket();
        wait_until(
            std::time::Duration::from_secs(20),
            "bangerd socket answers",
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
        );
        child
    }

    /// The daemon pid from its pid file, if any.
    pub fn daemon_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.root().join("run/banger/bangerd.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs the daemon (if one runs) and waits until it is gone: what
    /// the crash tests do to it. The next CLI command starts a new one.
    pub fn kill_daemon(&self) {
        if let Some(pid) = self.daemon_pid().filter(|p| pid_alive(*p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            wait_until(std::time::Duration::from_secs(10), "bangerd dies", || {
                !pid_alive(pid)
            });
        }
    }

    /// Every recorded Firecracker API call, in order.
    pub fn fc_calls(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.record_file())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `vm show NAME --json`, parsed.
    pub fn show(&self, name: &str) -> banger_api::api::VmView {
        let r = self.banger(&["vm", "show", name, "--json"]).ok();
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// `vm list --json`, parsed.
    pub fn list(&self) -> Vec<banger_api::api::VmView> {
        let r = self.banger(&["vm", "list", "--json"]).ok();
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// A fake kernel and a small root image to boot (the fake firecracker
    /// only checks that they exist).
    pub fn boot_files(&self) -> (PathBuf, PathBuf) {
        let k = self.root().join("vmlinux");
        let r = self.root().join("rootfs.ext4");
        if !k.exists() {
            std::fs::write(&k, b"\x7fELF fake kernel").unwrap();
            let f = std::fs::File::create(&r).unwrap();
            f.set_len(32 << 20).unwrap();
            use std::io::{Seek, Write};
            let mut f = f;
            f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
            f.write_all(b"root image payload").unwrap();
        }
        (k, r)
    }

    /// The VM directories under the state dir, read without asking the
    /// daemon (which a test may have stopped).
    pub fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.state_dir().join("vms"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// `image register --name NAME` of the env's boot files
    /// ([`BangerEnv::boot_files`]), which must succeed.
    pub fn register_boot_files(&self, name: &str) {
        let (k, r) = self.boot_files();
        self.banger(&[
            "image",
            "register",
            "--name",
            name,
            "--rootfs",
            r.to_str().unwrap(),
            "--kernel",
            k.to_str().unwrap(),
        ])
        .ok();
    }

    /// `vm create` with the env's boot files plus `extra` args.
    pub fn create(&self, name: &str, extra: &[&str]) -> Run {
        let (k, r) = self.boot_files();
        let (k, r) = (k.display().to_string(), r.display().to_string());
        let mut args = vec![
            "vm",
            "create",
            "--name",
            name,
            "--kernel",
            &k,
            "--rootfs",
            &r,
            "--disk-size",
            "64M",
        ];
        args.extend_from_slice(extra);
        self.banger(&args)
    }
}

impl Default for BangerEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BangerEnv {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Some(pid) = self.daemon_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Its VMMs and their helpers (fake firecrackers, jailed ones too,
        // QEMU guests of a test that failed before deleting them, vsock
        // backends): every process that works in this env's tree.
        for pid in processes_in(self.root()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // The killed daemon's warm taps (and a derived bridge) on the host's
        // network, when it had the rights to make them.
        if nix::unistd::Uid::effective().is_root() {
            drop(DaemonNetwork::of_state_dir(self.state_dir()));
        }
    }
}

/// The processes (other than this one) that work in `root`: their command
/// line names a path inside it, or their working directory is inside it (a
/// jailed VMM, started with paths relative to its chroot).
pub fn processes_in(root: &std::path::Path) -> Vec<i32> {
    let mut needle = root.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle))
                || std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d.starts_with(root))
        })
        .collect()
}

/// Deletes, when dropped, the bridge, taps and nftables tables that a
/// daemon keeping its state in `state_dir` derives for itself
/// ([`banger_api::net::identity`]). A user's daemon keeps its bridge for
/// its next start, which also sweeps the taps a killed daemon left; a
/// test's daemon in a throwaway HOME on the host's network has no next
/// start and would leave them on the host for good, more every run.
#[derive(Debug)]
pub struct DaemonNetwork(PathBuf);

impl DaemonNetwork {
    pub fn of_state_dir(state_dir: impl Into<PathBuf>) -> Self {
        DaemonNetwork(state_dir.into())
    }
}

impl Drop for DaemonNetwork {
    fn drop(&mut self) {
        let id = banger_api::net::identity::NetIdentity::for_state_dir(&self.0);
        for tap in link_names()
            .into_iter()
            .filter(|n| n.starts_with(&id.tap_prefix))
        {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", &tap])
                .output();
        }
        remove_bridge(&id.bridge());
    }
}

/// The names of the links in the calling thread's network namespace.
pub fn link_names() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    // `N: NAME: <...>` or `N: NAME@PEER: <...>`.
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect()
}

/// Deletes `bridge` and its nftables tables (both families), whichever
/// exist.
pub fn remove_bridge(bridge: &str) {
    let _ = std::process::Command::new("ip")
        .args(["link", "del", bridge])
        .output();
    let table = banger_host::net::nft::table_for(bridge);
    for family in ["bridge", "ip"] {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", family, &table])
            .output();
    }
}

/// The fake firecracker built by this package.
pub fn fake_firecracker() -> PathBuf {
    workspace_bin("fake-firecracker")
}

/// Polls `cond` until it holds or `timeout` passes (then panics naming
/// `what`). For waiting on other processes, never as a fixed sleep.
pub fn wait_until(timeout: std::time::Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    let mut delay = std::time::Duration::from_millis(5);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(200));
    }
}

/// `git -C repo ARGS` with HOME set to `home` (so `--global` is the
/// test's own) and no system config; its trimmed stdout, or a panic with
/// git's words.
pub fn git(home: &std::path::Path, repo: &std::path::Path, args: &[&str]) -> String {
    // In user mode the env (and so the repository) is the test user's:
    // git runs as the owner of the nearest existing directory, as that
    // user would, instead of root tripping over "dubious ownership".
    let owner = repo
        .ancestors()
        .find_map(|d| std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d).ok()?).into())
        .filter(|uid| *uid != 0 && nix::unistd::geteuid().is_root());
    let mut c = match owner {
        Some(uid) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={uid}"),
                &format!("--regid={}", owner_gid(uid)),
                "--init-groups",
                "--",
                "git",
            ]);
            c
        }
        None => std::process::Command::new("git"),
    };
    let out = c
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The primary group of the user `uid` (its own uid when it has no
/// passwd entry).
fn owner_gid(uid: u32) -> u32 {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or(uid, |u| u.gid.as_raw())
}

/// True if `pid` is a live process: any of its threads is not yet a
/// zombie. The leader alone is not enough: a killed multi-threaded process
/// shows its leader as a zombie while other threads are still exiting, and
/// its files (listening sockets, locks) close only when the last one has.
pub fn pid_alive(pid: i32) -> bool {
    let live = |stat: &str| {
        !matches!(
            stat.rsplit(')')
                .next()
                .map(|r| r.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        )
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|task| std::fs::read_to_string(task.path().join("stat")).is_ok_and(|s| live(&s)))
}

/// Runs `body` on a thread of its own inside a fresh network namespace (with
/// `lo` up), so a test's bridges, taps and rules never touch the host's.
/// Returns false after a loud SKIP when that is impossible here: not root,
/// or `ip` or one of `tools` (run as `TOOL --version`) missing. A panic in
/// `body` is the test's.
pub fn in_netns(test: &str, tools: &[&str], body: impl FnOnce() + Send + 'static) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: needs root for a network namespace");
        return false;
    }
    for tool in std::iter::once(&"ip").chain(tools) {
        if std::process::Command::new(tool).arg("-V").output().is_err() {
            let package = match *tool {
                "ip" => "iproute2",
                "nft" => "nftables",
                other => other,
            };
            eprintln!("SKIPPED {test}: {tool} missing (apt-get install {package})");
            return false;
        }
    }
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success(), "ip link set lo up: {up}");
        body();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_network_removes_exactly_the_state_dirs_derived_links() {
        in_netns(
            "daemon_network_removes_exactly_the_state_dirs_derived_links",
            &["ip"],
            || {
                let state = PathBuf::from("/tmp/no-such-home/.local/state/banger");
                let id = banger_api::net::identity::NetIdentity::for_state_dir(&state);
                let other = banger_api::net::identity::NetIdentity::for_state_dir(
                    std::path::Path::new("/tmp/another/state"),
                );
                let ours = [
                    id.bridge(),
                    format!("{}1", id.tap_prefix),
                    format!("{}8", id.tap_prefix),
                ];
                let theirs = format!("{}1", other.tap_prefix);
                // Bridges stand in for taps: a link is a link to `ip link del`.
                let add = |name: &str| {
                    let out = std::process::Command::new("ip")
                        .args(["link", "add", name, "type", "bridge"])
                        .output()
                        .unwrap();
                    assert!(out.status.success(), "{out:?}");
                };
                add(&ours[0]);
                add(&ours[1]);
                add(&ours[2]);
                add(&theirs);
                drop(DaemonNetwork::of_state_dir(&state));
                let left = link_names();
                for name in &ours {
                    assert!(!left.contains(name), "{name} left: {left:?}");
                }
                assert!(
                    left.contains(&theirs),
                    "another daemon's link went: {left:?}"
                );
            },
        );
    }

    #[test]
    fn a_command_past_its_limit_is_killed_with_what_it_printed() {
        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", "echo started; echo oops >&2; exec sleep 600"]);
        let started = std::time::Instant::now();
        let hung = output_within(sh, std::time::Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        assert_eq!(
            (hung.stdout.as_str(), hung.stderr.as_str()),
            ("started\n", "oops\n")
        );

        let mut sh = std::process::Command::new("sh");
        sh.args(["-c", "echo done; exit 3"]);
        let out = output_within(sh, std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(
            (out.status.code(), out.stdout.as_slice()),
            (Some(3), &b"done\n"[..])
        );
    }

    #[test]
    fn an_envs_processes_are_killed_when_it_is_dropped() {
        let env = BangerEnv::new();
        let dir = env.root().join("run");
        std::fs::create_dir_all(&dir).unwrap();
        // Shells waiting on a line that never comes: one with the path as
        // its argument, one working in the tree with none. Each first says
        // it runs (the kernel fills in a command line only part way through
        // the exec that spawn waits for).
        let shell = |arg: Option<&std::path::Path>, cwd: &std::path::Path| {
            let mut c = std::process::Command::new("sh");
            c.args(["-c", "echo running; read -r line", "sh"]);
            c.args(arg)
                .current_dir(cwd)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            let mut child = c.spawn().unwrap();
            let mut first = String::new();
            use std::io::BufRead;
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut first)
                .unwrap();
            assert_eq!(first, "running\n");
            child
        };
        let mut children = [
            shell(Some(&dir), std::path::Path::new("/")),
            shell(None, &dir),
        ];
        let mut pids: Vec<i32> = children.iter().map(|c| c.id() as i32).collect();
        pids.sort();
        let mut found = processes_in(env.root());
        found.sort();
        assert_eq!(found, pids);
        drop(env);
        for child in &mut children {
            let status = child.wait().unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(status.signal(), Some(9), "{status:?}");
        }
    }
}
