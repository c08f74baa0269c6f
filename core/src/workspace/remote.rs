//! The guest side: carrying a [`Plan`] into a guest over SSH, and reading
//! the guest's work back as a patch.

use std::fs;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};

use crate::guest_ssh::{GuestSsh, shell_quote_path};
use crate::lifecycle::{Progress, crash_point};
use banger_api::api::{ExportedFile, WorkspaceView};
use banger_api::counting::Counting;

use super::{WorkspaceError, check_base_commit};
use banger_api::workspace::{FileKind, FileType, GitIdentity, Plan};

/// Where a workspace lives in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPaths {
    /// The checkout (`/root/repo`).
    pub repo: PathBuf,
    /// The guest user's global git config (`/root/.gitconfig`).
    pub gitconfig: PathBuf,
}

impl Default for GuestPaths {
    fn default() -> Self {
        GuestPaths {
            repo: PathBuf::from("/root/repo"),
            gitconfig: PathBuf::from("/root/.gitconfig"),
        }
    }
}

impl GuestPaths {
    /// `<parent>/.<name><suffix>`: a hidden sibling of the checkout.
    fn sibling(&self, suffix: &str) -> PathBuf {
        let name = self
            .repo
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "repo".to_string());
        self.repo.with_file_name(format!(".{name}{suffix}"))
    }

    /// What the directories an import is staged in start with
    /// (`/root/.repo.staging-`): each import makes its own (`mktemp -d`),
    /// so a script a killed daemon left running in the guest never shares
    /// one with the next import.
    fn staging_prefix(&self) -> PathBuf {
        self.sibling(".staging-")
    }

    /// What imports lock (`flock`) in the guest: the checkout's parent
    /// directory (no file to leave behind). An import a killed daemon left
    /// running finishes (or fails) before the next one starts or sweeps
    /// its staging directory.
    fn lock_dir(&self) -> PathBuf {
        self.repo
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
    }
}

/// The host-side bundle of a running import, in `scratch` (the VM
/// directory): the `.staging-` in the name is what the daemon's startup
/// sweep removes when a daemon was killed holding one.
fn bundle_path(scratch: &Path) -> PathBuf {
    scratch.join(format!(".workspace.bundle.staging-{}", std::process::id()))
}

/// Imports `plan` into the guest behind `ssh`: bundle + clone + checkout +
/// overlay (or, in full-copy mode, one archive of the tree) in a staging
/// directory of its own, the git identity, then renames over `guest.repo`,
/// so a failed or killed import leaves the previous checkout untouched.
/// Imports in one guest run one at a time (a guest-side `flock`), also
/// one a killed daemon left running. `scratch` is a host directory for the
/// bundle (removed afterwards).
pub async fn prepare(
    ssh: &GuestSsh,
    plan: &Plan,
    guest: &GuestPaths,
    scratch: &Path,
    progress: &Progress,
) -> Result<WorkspaceView, WorkspaceError> {
    prepare_with(Carrier::Ssh(ssh), plan, guest, scratch, progress).await
}

/// What carries the import's one exec into the guest.
pub enum Carrier<'a> {
    /// A session on the guest's sshd.
    Ssh(&'a GuestSsh),
    /// The guest agent's exec stream (`Lifecycle::open_exec`), authorised
    /// and upgraded: no encryption for the emulated guest to undo, which
    /// was most of an import's time under TCG.
    Agent(std::os::unix::net::UnixStream),
}

impl std::fmt::Debug for Carrier<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Carrier::Ssh(_) => "Carrier::Ssh",
            Carrier::Agent(_) => "Carrier::Agent",
        })
    }
}

/// [`prepare`] through either carrier.
pub async fn prepare_with(
    carrier: Carrier<'_>,
    plan: &Plan,
    guest: &GuestPaths,
    scratch: &Path,
    progress: &Progress,
) -> Result<WorkspaceView, WorkspaceError> {
    let prefix = shell_quote_path(&guest.staging_prefix());
    let q_repo = shell_quote_path(&guest.repo);

    // Everything travels as one tar on one exec's stdin and one guest
    // script does the rest: each exec costs a process start in the guest,
    // which is what dominates under emulation (and over slow links).
    let started = std::time::Instant::now();
    let mut parcel = tar::Builder::new(Vec::new());
    let mut script = vec![
        "set -e".to_string(),
        format!("exec 9<{}", shell_quote_path(&guest.lock_dir())),
        "if command -v flock >/dev/null 2>&1; then flock 9; fi".to_string(),
        // Under the lock, no other import runs: what is staged is a
        // killed import's leftover.
        format!("rm -rf -- {prefix}*"),
        format!("stage=$(mktemp -d {prefix}XXXXXX)"),
        "cd \"$stage\"".to_string(),
        phase("start"),
        "tar -x --no-same-owner -f -".to_string(),
    ];
    if plan.mode == super::Mode::FullCopy {
        progress.stage(
            "workspace_copy",
            format!(
                "copying {} entries of {}",
                plan.files.len(),
                plan.root.display()
            ),
        );
        let tar = blocking({
            let plan = plan.clone();
            move || overlay_tar(&plan)
        })
        .await??;
        add_file(&mut parcel, "tree.tar", &tar, &plan.root)?;
        script.push("mkdir \"$stage/repo\"".to_string());
        script.push("tar -x -f tree.tar -C \"$stage/repo\"".to_string());
    } else {
        progress.stage(
            "workspace_bundle",
            "bundling the repository history and indexing it on the host",
        );
        // The git work that needs no working tree (indexing the pack,
        // refs, the index) is done here by native git; the emulated guest
        // only writes the files. A `.staging-` name: the daemon's startup
        // sweep removes what a killed daemon left.
        let bundle = bundle_path(scratch);
        let git_dir = scratch.join(format!(".workspace.repo.staging-{}", std::process::id()));
        let _ = fs::remove_dir_all(&git_dir);
        let made = blocking({
            let plan = plan.clone();
            let (bundle, git_dir) = (bundle.clone(), git_dir.clone());
            move || plan.write_git_dir(&bundle, &git_dir)
        })
        .await?;
        let _ = fs::remove_file(&bundle);
        crash_point("workspace:bundled");
        let added = made.and_then(|()| {
            parcel.follow_symlinks(false);
            parcel
                .append_dir_all("repo/.git", git_dir.join(".git"))
                .map_err(|e| WorkspaceError::Archive(git_dir.clone(), e))
        });
        let _ = fs::remove_dir_all(&git_dir);
        added?;

        script.push(phase("unpack"));
        script.push("cd \"$stage/repo\"".to_string());
        script.push("git checkout-index -a -f -u".to_string());
        script.push(phase("checkout"));

        if !plan.files.is_empty() {
            let mut deleted = Vec::new();
            for f in plan.files.iter().filter(|f| f.kind == FileKind::Deleted) {
                use std::os::unix::ffi::OsStrExt;
                deleted.extend_from_slice(f.path.as_os_str().as_bytes());
                deleted.push(0);
            }
            let tar = blocking({
                let plan = plan.clone();
                move || overlay_tar(&plan)
            })
            .await??;
            add_file(&mut parcel, "deleted", &deleted, &plan.root)?;
            add_file(&mut parcel, "overlay.tar", &tar, &plan.root)?;
            script.push("xargs -0 -r rm -f -- < \"$stage/deleted\"".to_string());
            script.push("tar -x -f \"$stage/overlay.tar\"".to_string());
            script.push(phase("overlay"));
        }
        progress.stage(
            "workspace_clone",
            format!(
                "checking out in the guest and applying {} changed paths",
                plan.files.len()
            ),
        );
    }

    push_identity(&mut script, &plan.global_identity, |key, value| {
        format!(
            "git config --file {} {key} {}",
            shell_quote_path(&guest.gitconfig),
            q(value)
        )
    });
    push_identity(&mut script, &plan.local_identity, |key, value| {
        format!("git -C \"$stage/repo\" config {key} {}", q(value))
    });
    // Publish by two renames, never by deleting first: at every moment
    // the checkout is the previous one or the new one, whatever kills
    // this script.
    script.push("cd /".to_string());
    script.push(format!(
        "if [ -e {q_repo} ] || [ -L {q_repo} ]; then mv -T {q_repo} \"$stage/old\"; fi"
    ));
    script.push(format!("mv -T \"$stage/repo\" {q_repo}"));
    script.push(phase("publish"));
    script.push("rm -rf \"$stage\"".to_string());

    let parcel = parcel
        .into_inner()
        .map_err(|e| WorkspaceError::Archive(plan.root.clone(), e))?;
    let bytes = parcel.len();
    let host_secs = started.elapsed().as_secs_f64();
    let sending = std::time::Instant::now();
    let total = Some(bytes as u64);
    let mut upload = Counting::new(Cursor::new(parcel), |sent| {
        if sent.saturating_mul(2) >= bytes as u64 {
            crash_point("workspace:uploading");
        }
        progress.bytes("workspace upload", sent, total)
    });
    let (via, out) = match carrier {
        Carrier::Ssh(ssh) => (
            "ssh",
            ssh.run(&script.join("\n"), Some(&mut upload))
                .await
                .map_err(|e| WorkspaceError::Guest("import", Box::new(e)))?,
        ),
        Carrier::Agent(stream) => (
            "agent",
            agent_run(
                stream,
                &script.join("\n"),
                &mut upload,
                banger_api::config::exec_keepalive_every(),
            )
            .await?,
        ),
    };
    tracing::info!(
        "workspace: host git work and parcel {:.2}s; {bytes} bytes sent (via {via}) and unpacked, checked out and published in the guest in {:.2}s ({})",
        host_secs,
        sending.elapsed().as_secs_f64(),
        guest_phases(&out)
    );

    Ok(WorkspaceView {
        repo: guest.repo.clone(),
        mode: plan.mode.as_str().to_string(),
        base_commit: plan.base_commit.clone(),
        head_commit: plan.head_commit.clone(),
        branch: plan.branch.clone().or_else(|| plan.head_branch.clone()),
        files: plan.files.len(),
        skipped_untracked: plan.skipped_untracked,
    })
}

/// The guest's work since `base` (a commit id; `None` = the guest's HEAD)
/// as one `git diff --binary` patch covering commits, staged, unstaged and
/// untracked (non-ignored) changes. The guest's real index is untouched:
/// `git add -A` goes to a temporary copy. Returns the full base id and the
/// patch.
pub async fn export(
    ssh: &GuestSsh,
    repo: &Path,
    base: Option<&str>,
) -> Result<(String, Vec<u8>), WorkspaceError> {
    if let Some(b) = base {
        check_base_commit(b)?;
    }
    let q_repo = shell_quote_path(repo);
    let rev = base.unwrap_or("HEAD");
    let resolved = ssh
        .run(
            &format!("git -C {q_repo} rev-parse --verify --quiet '{rev}^{{commit}}'"),
            None,
        )
        .await
        .map_err(|e| WorkspaceError::Guest("resolve_base", Box::new(e)))?;
    let resolved = String::from_utf8_lossy(&resolved).trim().to_string();
    check_base_commit(&resolved)?;
    let script = format!(
        "{} git diff --binary --full-index --no-color --no-ext-diff --no-textconv {resolved} \"$tree\"",
        worktree_tree(&q_repo)
    );
    let patch = ssh
        .run(&script, None)
        .await
        .map_err(|e| WorkspaceError::Guest("diff", Box::new(e)))?;
    Ok((resolved, patch))
}

/// Shell that leaves in `$tree` the guest's working tree as a git tree
/// (untracked non-ignored files included), through a temporary copy of the
/// index so the real one is untouched.
fn worktree_tree(q_repo: &str) -> String {
    format!(
        "set -e; cd {q_repo}; idx=$(mktemp); trap 'rm -f \"$idx\"' EXIT; \
         real=$(git rev-parse --git-path index); \
         if [ -f \"$real\" ]; then cp \"$real\" \"$idx\"; else rm -f \"$idx\"; fi; \
         GIT_INDEX_FILE=$idx git add -A; tree=$(GIT_INDEX_FILE=$idx git write-tree);"
    )
}

/// The files [`export`] against `base` (a full commit id, as it returns)
/// changes: `git diff --name-status --no-renames` over the same tree.
pub async fn changed_files(
    ssh: &GuestSsh,
    repo: &Path,
    base: &str,
) -> Result<Vec<ExportedFile>, WorkspaceError> {
    check_base_commit(base)?;
    let script = format!(
        "{} git diff --name-status -z --no-renames --no-color {base} \"$tree\"",
        worktree_tree(&shell_quote_path(repo))
    );
    let out = ssh
        .run(&script, None)
        .await
        .map_err(|e| WorkspaceError::Guest("diff_names", Box::new(e)))?;
    Ok(parse_name_status(&out))
}

/// `git diff --name-status -z` output (`M\0path\0D\0path\0...`) as files.
fn parse_name_status(out: &[u8]) -> Vec<ExportedFile> {
    let mut fields = out.split(|&b| b == 0).filter(|f| !f.is_empty());
    let mut files = Vec::new();
    while let (Some(status), Some(path)) = (fields.next(), fields.next()) {
        let status = match status.first() {
            Some(b'A') => "added",
            Some(b'D') => "deleted",
            Some(b'T') => "type-changed",
            _ => "modified",
        };
        files.push(ExportedFile {
            status: status.to_string(),
            path: String::from_utf8_lossy(path).into_owned(),
        });
    }
    files
}

/// Runs `script` through the guest agent's exec stream with `stdin` as
/// its input and returns its stdout; a non-zero exit is an error with its
/// stderr. The script runs under `setsid -w`, outside the process group
/// the agent kills when the daemon goes away; it then stops at its next
/// phase mark (an `echo` into the closed stream), and no mark lies between
/// the two publishing renames, so the checkout stays whole.
async fn agent_run(
    stream: std::os::unix::net::UnixStream,
    script: &str,
    stdin: &mut (dyn tokio::io::AsyncRead + Unpin + Send),
    every: std::time::Duration,
) -> Result<Vec<u8>, WorkspaceError> {
    use banger_guest_protocol::exec::{ExecRequest, Frame, KEEPALIVE};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let guest = |e: io::Error| WorkspaceError::Guest("import", Box::new(e));
    stream.set_nonblocking(true).map_err(guest)?;
    let stream = tokio::net::UnixStream::from_std(stream).map_err(guest)?;
    let (mut from_agent, mut to_agent) = stream.into_split();
    let start = Frame::Start(ExecRequest {
        argv: ["setsid", "-w", "sh", "-c", script]
            .map(String::from)
            .to_vec(),
        keepalive_ms: Some(every.as_millis() as u32),
        ..Default::default()
    });
    // Stdin, then a keepalive every `every` until the agent ends
    // the stream: a daemon killed mid-import leaves the agent waiting on a
    // stream whose end vhost-device-vsock can lose, and the keepalives'
    // deadline is how the agent finds out. Only a failed write ends this.
    let send = async {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut buf = vec![0u8; 256 << 10];
        let mut stdin_open = true;
        let mut write = async |frame: Frame| to_agent.write_all(&frame.encode()).await;
        if let Err(e) = write(start).await {
            return e;
        }
        loop {
            let frame = tokio::select! {
                n = stdin.read(&mut buf), if stdin_open => match n {
                    Ok(0) => {
                        stdin_open = false;
                        Frame::StdinEof
                    }
                    Ok(n) => Frame::Stdin(buf[..n].to_vec()),
                    Err(e) => return e,
                },
                _ = tick.tick() => KEEPALIVE,
            };
            if let Err(e) = write(frame).await {
                return e;
            }
        }
    };
    // A script that fails early stops reading and the agent closes the
    // stream: the write error is then less telling than its stderr.
    let mut answer = Vec::new();
    let (read, sent) = {
        let read = from_agent.read_to_end(&mut answer);
        tokio::pin!(read);
        tokio::select! {
            r = &mut read => (r, None),
            e = send => (read.await, Some(e)),
        }
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut frames = Cursor::new(answer);
    let mut ended = None;
    while let Ok(Some(frame)) = Frame::read_from(&mut frames) {
        match frame {
            Frame::Stdout(d) => out.extend_from_slice(&d),
            Frame::Stderr(d) => err.extend_from_slice(&d),
            Frame::Exit(status) => ended = Some(Ok(status.shell_code())),
            Frame::Error(text) => ended = Some(Err(text)),
            _ => {}
        }
    }
    let failed = |what: String| {
        WorkspaceError::Guest(
            "import",
            format!("{what}: {}", String::from_utf8_lossy(&err).trim()).into(),
        )
    };
    match ended {
        Some(Ok(0)) => Ok(out),
        Some(Ok(code)) => Err(failed(format!("the guest script exited with {code}"))),
        Some(Err(text)) => Err(failed(format!("the guest agent: {text}"))),
        None => Err(failed(format!(
            "the guest agent's stream ended without an exit status (sending: {:?}, reading: {:?})",
            sent,
            read.err()
        ))),
    }
}

/// A script line printing `phase NAME SECONDS` (the guest's clock) on
/// stdout, for the per-phase split in the daemon's log.
fn phase(name: &str) -> String {
    format!("echo \"phase {name} $(date +%s.%N)\"")
}

/// `phase NAME T` lines as `unpack 0.41s, checkout 2.10s, ...`: each
/// phase's time since the previous mark (the first mark, `start`, is when
/// the script got its lock; the transfer is in `unpack`).
fn guest_phases(out: &[u8]) -> String {
    let text = String::from_utf8_lossy(out);
    let marks: Vec<(&str, f64)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.strip_prefix("phase ")?.split(' ');
            Some((it.next()?, it.next()?.parse().ok()?))
        })
        .collect();
    marks
        .windows(2)
        .map(|w| format!("{} {:.2}s", w[1].0, w[1].1 - w[0].1))
        .collect::<Vec<_>>()
        .join(", ")
}

fn q(s: &str) -> String {
    crate::guest_ssh::shell_quote(s)
}

fn push_identity(out: &mut Vec<String>, id: &GitIdentity, line: impl Fn(&str, &str) -> String) {
    if let Some(n) = &id.name {
        out.push(line("user.name", n));
    }
    if let Some(e) = &id.email {
        out.push(line("user.email", e));
    }
}

/// Adds `data` as the regular file `name` (0600) to the parcel.
fn add_file(
    parcel: &mut tar::Builder<Vec<u8>>,
    name: &str,
    data: &[u8],
    root: &Path,
) -> Result<(), WorkspaceError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_entry_type(tar::EntryType::Regular);
    parcel
        .append_data(&mut h, name, data)
        .map_err(|e| WorkspaceError::Archive(root.to_path_buf(), e))
}

/// A tar of every present path of the plan, relative to the repository
/// root, owned by root, with the host's modes; symlinks stay links.
fn overlay_tar(plan: &Plan) -> Result<Vec<u8>, WorkspaceError> {
    let mut builder = tar::Builder::new(Vec::new());
    for f in &plan.files {
        let Some(t) = f.file_type else { continue };
        let abs = plan.root.join(&f.path);
        let err = |e| WorkspaceError::Archive(abs.clone(), e);
        let meta = fs::symlink_metadata(&abs).map_err(err)?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        h.set_uid(0);
        h.set_gid(0);
        let _ = h.set_username("root");
        let _ = h.set_groupname("root");
        match t {
            FileType::Symlink => {
                let target = fs::read_link(&abs).map_err(err)?;
                h.set_size(0);
                builder.append_link(&mut h, &f.path, &target).map_err(err)?;
            }
            FileType::Directory => {
                h.set_size(0);
                builder
                    .append_data(&mut h, &f.path, io::empty())
                    .map_err(err)?;
            }
            FileType::Regular | FileType::Executable => {
                let file = fs::File::open(&abs).map_err(err)?;
                // The size in the header must match what is read; a file
                // growing meanwhile is cut at its size when listed.
                h.set_size(meta.len());
                builder
                    .append_data(&mut h, &f.path, io::Read::take(file, meta.len()))
                    .map_err(err)?;
            }
        }
    }
    builder
        .into_inner()
        .map_err(|e| WorkspaceError::Archive(plan.root.clone(), e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WorkspaceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkspaceError::Task(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_phases_are_the_gaps_between_marks() {
        let out = b"phase start 100.00\nphase unpack 101.25\nnoise\nphase checkout 103.75\nphase publish 103.80\n";
        assert_eq!(
            guest_phases(out),
            "unpack 1.25s, checkout 2.50s, publish 0.05s"
        );
        assert_eq!(guest_phases(b"phase start 1.0\n"), "");
    }

    #[test]
    fn name_status_lists_each_file_with_its_change() {
        let out = b"M\0a.txt\0D\0run.sh\0A\0dir/new file\0T\0link\0A\0odd\nname\0";
        let files: Vec<(String, String)> = parse_name_status(out)
            .into_iter()
            .map(|f| (f.status, f.path))
            .collect();
        let want = [
            ("modified", "a.txt"),
            ("deleted", "run.sh"),
            ("added", "dir/new file"),
            ("type-changed", "link"),
            ("added", "odd\nname"),
        ]
        .map(|(s, p)| (s.to_string(), p.to_string()));
        assert_eq!(files, want);
        assert!(parse_name_status(b"").is_empty());
    }

    /// The daemon's side of an import stream against a stand-in agent on a
    /// socket pair: the Start promises keepalives, the parcel arrives, and
    /// once stdin has ended the keepalives keep coming (the stand-in only
    /// answers after three of them; it gives up after 20 s without one).
    #[tokio::test]
    async fn an_import_stream_sends_keepalives_until_the_agent_answers() {
        use banger_guest_protocol::exec::{ExitStatus, Frame, KEEPALIVE};
        let (host, agent) = std::os::unix::net::UnixStream::pair().unwrap();
        let stand_in = std::thread::spawn(move || {
            let mut conn = agent;
            conn.set_read_timeout(Some(std::time::Duration::from_secs(20)))
                .unwrap();
            let promised = match Frame::read_from(&mut conn) {
                Ok(Some(Frame::Start(req))) => req.keepalive_ms,
                other => return Err(format!("first frame {other:?}")),
            };
            let (mut stdin, mut ended, mut beats) = (Vec::new(), false, 0);
            while beats < 3 {
                match Frame::read_from(&mut conn) {
                    Ok(Some(Frame::Stdin(d))) if !ended => stdin.extend_from_slice(&d),
                    Ok(Some(Frame::StdinEof)) => ended = true,
                    Ok(Some(f)) if f == KEEPALIVE => beats += u32::from(ended),
                    other => return Err(format!("after {beats} keepalives: {other:?}")),
                }
            }
            Frame::Stdout(b"done".to_vec()).write_to(&mut conn).unwrap();
            let exit = ExitStatus {
                code: Some(0),
                signal: None,
            };
            Frame::Exit(exit).write_to(&mut conn).unwrap();
            Ok((promised, stdin))
        });
        let mut parcel: &[u8] = b"the parcel";
        let every = std::time::Duration::from_millis(20);
        let out = agent_run(host, "true", &mut parcel, every).await.unwrap();
        assert_eq!(out, b"done");
        let (promised, stdin) = stand_in.join().unwrap().unwrap();
        assert_eq!((promised, stdin.as_slice()), (Some(20), &b"the parcel"[..]));
    }
}
