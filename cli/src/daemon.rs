//! Finding, starting and stopping `bangerd`.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use banger_api::api::{DaemonBuild, DaemonStatus, VersionInfo};
use banger_api::client::{Client, Method};
use banger_api::paths::Paths;
use tokio::time::Instant;

/// How long a freshly spawned daemon may take to answer.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a stopping daemon may take to go away.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// After the spawned process exits, how long another daemon (one that won
/// the pid-file race) may take to answer before we give up.
const EXITED_GRACE: Duration = Duration::from_secs(2);
/// How long a daemon that drops connections unanswered may take to die.
const DYING_DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

/// The installation's paths and a client of its socket.
pub fn client(paths: &Paths) -> Client {
    Client::new(paths.socket())
}

/// The daemon's version, or `None` when it is not running. Never starts it.
///
/// A daemon that was just killed can still accept a connection into its
/// backlog and then drop it unanswered; that is a daemon going away, so we
/// ask again until the socket answers or refuses.
pub async fn probe(client: &Client) -> Result<Option<VersionInfo>> {
    let deadline = Instant::now() + DYING_DEADLINE;
    loop {
        match client.get::<VersionInfo>("/v1/version").await {
            Ok(v) => return Ok(Some(v)),
            Err(e) if e.daemon_absent() => return Ok(None),
            Err(e) if e.daemon_dropped() && Instant::now() < deadline => {
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A client of a running daemon, starting one first when none answers. A
/// daemon of another build (an upgrade since it started) is restarted when
/// it runs no operation, else left alone with a warning saying how.
pub async fn ensure_running(paths: &Paths) -> Result<Client> {
    let client = client(paths);
    let mine = VersionInfo::current();
    if listening_as(paths, &mine) {
        return Ok(client);
    }
    let bin = daemon_bin();
    let note = ensure_current(&bin, &paths.daemon_log(), &client, &mine).await?;
    if let Some(line) = note {
        eprintln!("{line}");
    }
    Ok(client)
}

/// Whether a daemon of build `mine` listens, by what it wrote and the
/// socket alone, without a request: its build file names `mine` and the
/// pid its pid file names (a daemon of an older build writes none, and a
/// file left by a crashed one names a pid no longer in the pid file once
/// another daemon started), and the socket accepts a connection (a daemon
/// killed since leaves none listening). Each command used to ask
/// `GET /v1/version` first, a round trip of half a millisecond. False sends
/// the caller the long way, which asks, starts or restarts.
fn listening_as(paths: &Paths, mine: &VersionInfo) -> bool {
    let Ok(text) = std::fs::read(paths.build_file()) else {
        return false;
    };
    let Ok(theirs) = serde_json::from_slice::<DaemonBuild>(&text) else {
        return false;
    };
    let pid = std::fs::read_to_string(paths.pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    same_build(&theirs.build, mine)
        && pid == Some(theirs.pid)
        && std::os::unix::net::UnixStream::connect(paths.socket()).is_ok()
}

/// Whether two binaries come from the same build: version, git commit and
/// its time all equal.
pub fn same_build(a: &VersionInfo, b: &VersionInfo) -> bool {
    a == b
}

/// Whether starting `bin` would run another executable file than the one
/// daemon `pid` runs (`/proc/PID/exe`, which still names the old file after
/// an upgrade replaced it). When it would not, a restart cannot change the
/// build, whatever the two report (only `banger` was upgraded, say).
/// Unknown (no such process, not ours to read, `bin` not found) counts as
/// another file.
fn runs_other_binary(pid: u32, bin: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let running = std::fs::metadata(format!("/proc/{pid}/exe"));
    let next = if bin.components().count() > 1 {
        std::fs::metadata(bin)
    } else {
        banger_api::config::find_on_path(&bin.to_string_lossy()).map_or_else(
            || Err(std::io::ErrorKind::NotFound.into()),
            std::fs::metadata,
        )
    };
    match (running, next) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => true,
    }
}

/// Starts the daemon when none answers; restarts one of another build than
/// `mine` when it reports no running operation. Returns the line to tell
/// the user, if any.
async fn ensure_current(
    bin: &Path,
    log: &Path,
    client: &Client,
    mine: &VersionInfo,
) -> Result<Option<String>> {
    let theirs = match probe(client).await? {
        None => {
            start_bin(bin, log, client).await?;
            return Ok(None);
        }
        Some(v) if same_build(&v, mine) => return Ok(None),
        Some(v) => v,
    };
    let builds = format!(
        "bangerd runs {} but this banger is {}",
        crate::output::version_line(&theirs),
        crate::output::version_line(mine)
    );
    // A daemon that cannot answer /v1/status cannot say what it runs.
    let status = status(client).await.ok().flatten();
    if status
        .as_ref()
        .is_some_and(|s| !runs_other_binary(s.pid, bin))
    {
        // The same bangerd would start again: nothing to gain, and every
        // command would restart it. `banger doctor` shows the mismatch.
        return Ok(None);
    }
    match status.and_then(|s| s.operations) {
        Some(0) => {
            stop(client)
                .await
                .with_context(|| format!("{builds}; stopping it to start this build failed"))?;
            let pid = start_bin(bin, log, client).await?;
            Ok(Some(format!(
                "bangerd: restarted as this build (pid {pid}); it ran {}",
                crate::output::version_line(&theirs)
            )))
        }
        Some(n) => Ok(Some(format!(
            "warning: {builds}; it has {n} operation(s) running, so it is left as it is: \
             run `banger daemon stop` when they finish (the next command starts this build)"
        ))),
        None => Ok(Some(format!(
            "warning: {builds}; it cannot say whether operations are running, so it is left \
             as it is: run `banger daemon stop` when none are (the next command starts this build)"
        ))),
    }
}

/// Spawns `bangerd` detached and waits until it answers. Returns its pid.
pub async fn start(paths: &Paths, client: &Client) -> Result<u32> {
    start_bin(&daemon_bin(), &paths.daemon_log(), client).await
}

async fn start_bin(bin: &Path, log: &Path, client: &Client) -> Result<u32> {
    let mut child = spawn_detached(bin, log)?;
    let pid = child.id();
    let deadline = Instant::now() + START_DEADLINE;
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    loop {
        if probe(client).await?.is_some() {
            return Ok(pid);
        }
        if exited.is_none()
            && let Some(status) = child.try_wait().context("Checking the started bangerd")?
        {
            exited = Some((status, Instant::now()));
        }
        let now = Instant::now();
        if let Some((status, at)) = exited
            && now >= at + EXITED_GRACE
        {
            let why = last_fatal_line(log)
                .map(|l| format!(": {l}"))
                .unwrap_or_default();
            bail!(
                "bangerd ({}) exited with {status} before answering{why}\nsee {}",
                bin.display(),
                log.display()
            );
        }
        if now >= deadline {
            bail!(
                "bangerd ({}) did not answer on {} within {}s; see {}",
                bin.display(),
                client.socket().display(),
                START_DEADLINE.as_secs(),
                log.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The last `bangerd: ...` line the daemon printed to its log before
/// exiting (its fatal error, e.g. a config mistake with line and column).
fn last_fatal_line(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("bangerd: "))
        .map(str::to_string)
}

/// Asks the daemon to exit and waits until its socket stops answering.
/// Returns false when it was not running.
pub async fn stop(client: &Client) -> Result<bool> {
    // Its pid, to wait for the exit itself: the socket stops answering
    // before the daemon has finished shutting down (warm taps, DNS).
    let pid = match status(client).await {
        Ok(Some(s)) => Some(s.pid),
        Ok(None) => return Ok(false),
        Err(_) => None,
    };
    match client
        .send::<(), serde::de::IgnoredAny>(Method::POST, "/v1/shutdown", None)
        .await
    {
        Ok(_) => {}
        Err(e) if e.daemon_absent() => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        // Mid-shutdown the daemon may still answer, or accept and drop
        // connections; only "nobody listens" means it is gone.
        if let Err(e) = client.get::<VersionInfo>("/v1/version").await
            && e.daemon_absent()
            && !pid.is_some_and(alive)
        {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            bail!(
                "bangerd (pid {}) still runs on {} {}s after being asked to stop",
                pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                client.socket().display(),
                STOP_DEADLINE.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether process `pid` still exists (a zombie counts as gone: it has
/// finished everything it will ever do).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// The daemon's status, or `None` when it is not running.
pub async fn status(client: &Client) -> Result<Option<DaemonStatus>> {
    match client.get::<DaemonStatus>("/v1/status").await {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.daemon_absent() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `BANGER_DAEMON_BIN`, else `bangerd` next to this executable, else `bangerd`
/// from `PATH`.
fn daemon_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BANGER_DAEMON_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("bangerd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("bangerd"))
}

/// Starts `bin` in its own session with stdin from /dev/null and output
/// appended to `log`, so it outlives this process and its terminal.
fn spawn_detached(bin: &Path, log: &Path) -> Result<Child> {
    if let Some(dir) = log.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("Creating {}", dir.display()))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("Opening the daemon log {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("Opening the daemon log {}", log.display()))?;
    let mut cmd = Command::new(bin);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // glibc gives each thread that contends an arena of its own (up to 8 per
    // core) and keeps what they freed: with the daemon's blocking pool that
    // tripled its resident set under 50 VMs (tests/benches/footprint.rs).
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        cmd.env("MALLOC_ARENA_MAX", "2");
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().with_context(|| {
        format!(
            "Starting {} (set BANGER_DAEMON_BIN to its path)",
            bin.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_bin(name: &str) -> Option<PathBuf> {
        ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    }

    #[test]
    fn a_daemon_of_this_build_is_known_listening_only_by_its_files_and_socket() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        std::fs::create_dir_all(&paths.runtime_dir).unwrap();
        let mine = VersionInfo::current();
        let write_build = |pid: u32, build: &VersionInfo| {
            let b = DaemonBuild {
                pid,
                build: build.clone(),
            };
            std::fs::write(paths.build_file(), serde_json::to_vec(&b).unwrap()).unwrap();
        };
        // Nothing there.
        assert!(!listening_as(&paths, &mine));
        std::fs::write(paths.pid_file(), "4242\n").unwrap();
        write_build(4242, &mine);
        // Files of a daemon that is gone: nobody listens on the socket.
        assert!(!listening_as(&paths, &mine));
        let _listener = std::os::unix::net::UnixListener::bind(paths.socket()).unwrap();
        assert!(listening_as(&paths, &mine));
        // Another build, another daemon's pid, or a damaged file: ask.
        let other = VersionInfo {
            commit: format!("{}-other", mine.commit),
            ..mine.clone()
        };
        write_build(4242, &other);
        assert!(!listening_as(&paths, &mine));
        write_build(4343, &mine);
        assert!(!listening_as(&paths, &mine));
        std::fs::write(paths.build_file(), b"{\"pid\": 42").unwrap();
        assert!(!listening_as(&paths, &mine));
    }

    #[tokio::test]
    async fn absent_daemon_is_not_running_for_probe_status_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let c = Client::new(dir.path().join("none.sock"));
        assert_eq!(probe(&c).await.unwrap(), None);
        assert!(status(&c).await.unwrap().is_none());
        assert!(!stop(&c).await.unwrap());
    }

    #[tokio::test]
    async fn daemon_that_exits_early_is_an_error_naming_the_log() {
        let Some(bin) = system_bin("false") else {
            eprintln!("SKIPPED daemon_that_exits_early_is_an_error_naming_the_log: no `false`");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("state/bangerd.log");
        let c = Client::new(dir.path().join("bangerd.sock"));
        let err = start_bin(&bin, &log, &c).await.unwrap_err().to_string();
        assert!(err.contains(&log.display().to_string()), "{err}");
        assert!(err.contains("exited"), "{err}");
        assert!(log.is_file(), "the log file was not created");
    }

    #[test]
    fn spawned_daemon_gets_its_own_session_and_the_log() {
        if system_bin("sh").is_none() {
            eprintln!("SKIPPED spawned_daemon_gets_its_own_session_and_the_log: no `sh`");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("bangerd.log");
        std::fs::write(&log, "earlier\n").unwrap();
        // `sh` with stdin at /dev/null reads EOF and exits; it prints its
        // session id to the log first.
        let mut child = {
            let script = dir.path().join("fake-bangerd");
            std::fs::write(
                &script,
                "#!/bin/sh\nread -r line || echo \"stdin-eof\"\nread -r _pid _comm _state _ppid _pgrp sid _rest < /proc/$$/stat\necho \"$sid\"\necho \"pid $$\"\n",
            )
            .unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            spawn_detached(&script, &log).unwrap()
        };
        let pid = child.id();
        assert!(child.wait().unwrap().success());
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert_eq!(lines[0], "earlier", "log was truncated: {text}");
        assert_eq!(lines[1], "stdin-eof", "{text}");
        assert_eq!(lines[2], pid.to_string(), "not a session leader: {text}");
        assert_eq!(lines[3], format!("pid {pid}"), "{text}");
    }

    const FAKE_DAEMON: &str = r#"#!/usr/bin/env python3
import os, socket, sys
path = sys.argv[0] + ".sock"
# The build this daemon reports is fixed when it starts, like a real one's.
BUILD = sys.argv[0] + ".commit"
COMMIT = open(BUILD).read().strip() if os.path.exists(BUILD) else "fake"
VERSION = '{"version":"0.0.1","commit":"%s","built_at":1}' % COMMIT
# Running operations, read per request.
OPS = sys.argv[0] + ".ops"
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(8)
print("fake bangerd listening", flush=True)
while True:
    c, _ = s.accept()
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(1024)
        if not d:
            break
        data += d
    line = data.split(b"\r\n")[0].decode()
    stop = line.startswith("POST /v1/shutdown ")
    if line.startswith("GET /v1/version "):
        status, body = "200 OK", VERSION.encode()
    elif line.startswith("GET /v1/status "):
        ops = open(OPS).read().strip() if os.path.exists(OPS) else "0"
        status = "200 OK"
        body = ('{"version":%s,"pid":%d,"started_at":1,"socket":"%s","state_dir":"/",'
                '"vms":{},"plugin_errors":[],"operations":%s}' % (VERSION, os.getpid(), path, ops)).encode()
    elif stop:
        status, body = "202 Accepted", b""
    else:
        status, body = "404 Not Found", b'{"error":"no route"}'
    head = "HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (status, len(body))
    c.sendall(head.encode() + body)
    c.close()
    if stop:
        s.close()
        os.unlink(path)
        sys.exit(0)
"#;

    /// Kills a process this test started if the test fails midway.
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The fake daemon script in `dir`, its log and a client of its socket.
    fn fake_daemon(dir: &Path) -> (PathBuf, PathBuf, Client) {
        let script = dir.join("fake-bangerd");
        std::fs::write(&script, FAKE_DAEMON).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        (
            script,
            dir.join("bangerd.log"),
            Client::new(dir.join("fake-bangerd.sock")),
        )
    }

    fn build(commit: &str) -> VersionInfo {
        VersionInfo {
            version: "0.0.1".into(),
            commit: commit.into(),
            built_at: 1,
        }
    }

    #[test]
    fn a_build_is_its_version_commit_and_time() {
        assert!(same_build(&build("abc"), &build("abc")));
        let mut other_time = build("abc");
        other_time.built_at = 2;
        assert!(!same_build(&build("abc"), &other_time));
        assert!(!same_build(&build("abc"), &build("def")));
        let mut other_version = build("abc");
        other_version.version = "0.0.2".into();
        assert!(!same_build(&build("abc"), &other_version));
    }

    #[test]
    fn a_restart_only_counts_when_it_would_start_another_file() {
        let (Some(sleep), Some(truth)) = (system_bin("sleep"), system_bin("true")) else {
            eprintln!(
                "SKIPPED a_restart_only_counts_when_it_would_start_another_file: no sleep/true"
            );
            return;
        };
        let mut child = Command::new(&sleep).arg("30").spawn().unwrap();
        let _guard = KillOnDrop(child.id());
        let pid = child.id();
        assert!(!runs_other_binary(pid, &sleep), "the file it runs");
        assert!(runs_other_binary(pid, &truth), "another file");
        assert!(runs_other_binary(pid, Path::new("/nonexistent/bangerd")));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(runs_other_binary(pid, &sleep), "a gone process is unknown");
    }

    #[tokio::test]
    async fn a_daemon_too_old_to_count_operations_is_left_running_with_a_warning() {
        if system_bin("python3").is_none() {
            eprintln!(
                "SKIPPED a_daemon_too_old_to_count_operations_is_left_running_with_a_warning: \
                 no python3"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (script, log, client) = fake_daemon(dir.path());
        std::fs::write(dir.path().join("fake-bangerd.commit"), "old").unwrap();
        std::fs::write(dir.path().join("fake-bangerd.ops"), "null").unwrap();
        let pid = start_bin(&script, &log, &client).await.unwrap();
        let _guard = KillOnDrop(pid);
        let note = ensure_current(&script, &log, &client, &build("new"))
            .await
            .unwrap()
            .expect("a warning");
        assert!(
            note.contains("it cannot say whether operations are running")
                && note.contains("run `banger daemon stop` when none are"),
            "{note}"
        );
        assert_eq!(status(&client).await.unwrap().unwrap().pid, pid);
        assert!(stop(&client).await.unwrap());
    }

    #[tokio::test]
    async fn a_daemon_of_another_build_running_the_same_file_is_left_alone() {
        if system_bin("python3").is_none() {
            eprintln!(
                "SKIPPED a_daemon_of_another_build_running_the_same_file_is_left_alone: no python3"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (script, log, client) = fake_daemon(dir.path());
        std::fs::write(dir.path().join("fake-bangerd.commit"), "old").unwrap();
        let pid = start_bin(&script, &log, &client).await.unwrap();
        let _guard = KillOnDrop(pid);
        // A script runs as its interpreter: starting the interpreter again
        // would start the same file.
        let python = std::fs::canonicalize(format!("/proc/{pid}/exe")).unwrap();
        let note = ensure_current(&python, &log, &client, &build("new"))
            .await
            .unwrap();
        assert_eq!(note, None);
        assert_eq!(status(&client).await.unwrap().unwrap().pid, pid);
        assert!(stop(&client).await.unwrap());
    }

    #[tokio::test]
    async fn a_daemon_of_another_build_is_restarted_when_idle() {
        if system_bin("python3").is_none() {
            eprintln!("SKIPPED a_daemon_of_another_build_is_restarted_when_idle: no python3");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (script, log, client) = fake_daemon(dir.path());
        std::fs::write(dir.path().join("fake-bangerd.commit"), "old").unwrap();
        let old_pid = start_bin(&script, &log, &client).await.unwrap();
        let _old = KillOnDrop(old_pid);
        // The upgrade: binaries started from now on are build "new".
        std::fs::write(dir.path().join("fake-bangerd.commit"), "new").unwrap();
        let note = ensure_current(&script, &log, &client, &build("new"))
            .await
            .unwrap()
            .expect("a restart is reported");
        let new = status(&client).await.unwrap().expect("a daemon answers");
        let _new = KillOnDrop(new.pid);
        assert_eq!(new.version.commit, "new");
        assert_ne!(new.pid, old_pid);
        assert!(!alive(old_pid), "the old daemon still runs");
        assert!(
            note.starts_with(&format!(
                "bangerd: restarted as this build (pid {})",
                new.pid
            )),
            "{note}"
        );
        assert!(note.contains("commit old"), "{note}");
        // Same build now: nothing to do or say.
        assert_eq!(
            ensure_current(&script, &log, &client, &build("new"))
                .await
                .unwrap(),
            None
        );
        assert_eq!(status(&client).await.unwrap().unwrap().pid, new.pid);
        assert!(stop(&client).await.unwrap());
    }

    #[tokio::test]
    async fn a_busy_daemon_of_another_build_is_left_running_with_a_warning() {
        if system_bin("python3").is_none() {
            eprintln!(
                "SKIPPED a_busy_daemon_of_another_build_is_left_running_with_a_warning: no python3"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (script, log, client) = fake_daemon(dir.path());
        std::fs::write(dir.path().join("fake-bangerd.commit"), "old").unwrap();
        std::fs::write(dir.path().join("fake-bangerd.ops"), "2").unwrap();
        let pid = start_bin(&script, &log, &client).await.unwrap();
        let _guard = KillOnDrop(pid);
        let note = ensure_current(&script, &log, &client, &build("new"))
            .await
            .unwrap()
            .expect("a warning");
        assert!(
            note.starts_with("warning: bangerd runs 0.0.1 (commit old"),
            "{note}"
        );
        assert!(
            note.contains("it has 2 operation(s) running")
                && note.contains("run `banger daemon stop` when they finish"),
            "{note}"
        );
        let s = status(&client).await.unwrap().expect("still running");
        assert_eq!((s.pid, s.version.commit.as_str()), (pid, "old"));
        assert!(stop(&client).await.unwrap());
    }

    #[tokio::test]
    async fn start_waits_until_the_daemon_answers_and_stop_until_it_is_gone() {
        if system_bin("python3").is_none() {
            eprintln!(
                "SKIPPED start_waits_until_the_daemon_answers_and_stop_until_it_is_gone: no python3"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (script, log, client) = fake_daemon(dir.path());
        assert_eq!(probe(&client).await.unwrap(), None);
        let pid = start_bin(&script, &log, &client).await.unwrap();
        let _guard = KillOnDrop(pid);
        let v = probe(&client)
            .await
            .unwrap()
            .expect("daemon answers after start");
        assert_eq!(v.commit, "fake");
        assert!(stop(&client).await.unwrap(), "stop should find it running");
        assert_eq!(probe(&client).await.unwrap(), None);
        assert!(!client.socket().exists());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains("fake bangerd listening"), "{text}");
    }
}
