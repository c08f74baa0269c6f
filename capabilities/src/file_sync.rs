//! `file-sync`: copies the `[[file_sync]]` host files and directories into
//! the guest at every start, as files in the guest config bundle (so they
//! travel on the config drive and the agent writes them before the image's
//! init runs). See `docs/file-sync.md`.
//!
//! Files keep the entry's mode (default 0600); files found in a synced
//! directory keep their own permission bits. Symlinks inside a directory are
//! skipped with a warning, never followed; a missing host path is a warning.
//! Everything is owned by root in the guest.
//!
//! It also gives every guest the host's git identity (`user.name` and
//! `user.email` from `git config --global`) in root's `~/.gitconfig`,
//! merged into the file by the guest's own git at boot. The identity is
//! read with `git config --global` once and kept until one of the files
//! that command reads changes (see [`KeptIdentity`]).

use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use banger_api::config::FileSyncEntry;
use banger_api::guest::{GuestConfig, GuestFile};
use banger_api::model::CapOptions;
use banger_api::workspace::{GitIdentity, host_global_identity};
use banger_core::capability::{BuiltinCapability, CapEnv, CapError, Capability, HookCtx, HookLog};

use banger_artifacts::file_id::{self, FileState};

/// Name used with `--cap`.
pub const NAME: &str = "file-sync";

/// Most bytes all entries may bring together. The config drive holds at most
/// 64 MiB of JSON and file contents are encoded as decimal byte lists (up to
/// four characters a byte), so a quarter of it, less room for the rest of
/// the bundle.
pub const MAX_TOTAL_BYTES: u64 = 12 << 20;

/// What each file costs beyond its contents in the budget (path, owner,
/// mode and JSON punctuation), so many tiny files are bounded too.
const PER_FILE_OVERHEAD: u64 = 64;

/// A `[[file_sync]]` entry that cannot be copied. Each names the entry.
#[derive(Debug, thiserror::Error)]
pub enum FileSyncError {
    /// A `~/` host path, but the daemon has no home directory.
    #[error(
        "file_sync[{index}]: host {host} is under ~/, but the daemon has no HOME; set HOME for the daemon or use an absolute path"
    )]
    NoHome {
        /// Entry index.
        index: usize,
        /// The host path as configured.
        host: String,
    },
    /// A host file could not be opened, inspected or read.
    #[error("file_sync[{index}]: Cannot read {}", path.display())]
    Read {
        /// Entry index.
        index: usize,
        /// The host file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A host directory could not be listed.
    #[error("file_sync[{index}]: Cannot list {}", path.display())]
    ReadDir {
        /// Entry index.
        index: usize,
        /// The host directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The files would not fit on the config drive.
    #[error(
        "file_sync[{index}]: {} brings the synced files past {} MiB, the most the config drive carries; sync fewer or smaller files (e.g. a subdirectory)",
        path.display(),
        MAX_TOTAL_BYTES >> 20
    )]
    TooLarge {
        /// Entry index.
        index: usize,
        /// The file that crossed the limit.
        path: PathBuf,
    },
}

/// The guest files for `entries`, in entry order (a later entry overwrites
/// an earlier one at the same guest path). `~/` host paths are taken from
/// `home`. Skipped paths are reported through `log` as warnings.
pub fn collect(
    entries: &[FileSyncEntry],
    home: Option<&Path>,
    log: &dyn HookLog,
) -> Result<Vec<GuestFile>, FileSyncError> {
    let mut out = Collected::default();
    for (index, entry) in entries.iter().enumerate() {
        let host = entry
            .host
            .resolve(home)
            .ok_or_else(|| FileSyncError::NoHome {
                index,
                host: entry.host.to_string(),
            })?;
        // The top-level path is followed if it is a symlink: the user named
        // it. Only links found inside a synced directory are refused.
        let meta = match std::fs::metadata(&host) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log.warn(&format!(
                    "file_sync[{index}]: {} does not exist on the host; skipped",
                    host.display()
                ));
                continue;
            }
            Err(source) => {
                return Err(FileSyncError::Read {
                    index,
                    path: host,
                    source,
                });
            }
        };
        if meta.is_dir() {
            if entry.mode.is_some() {
                log.warn(&format!(
                    "file_sync[{index}]: mode applies to files only; the files in {} keep their own modes",
                    host.display()
                ));
            }
            out.directory(index, &host, &entry.guest, log)?;
        } else if meta.is_file() {
            let mode = entry.mode.unwrap_or(0o600);
            let opened = open(index, &host, false)?;
            if let Some((file, meta)) = opened {
                out.file(index, &host, file, &meta, entry.guest.clone(), mode)?;
            }
        } else {
            log.warn(&format!(
                "file_sync[{index}]: {} is not a regular file or directory; skipped",
                host.display()
            ));
        }
    }
    Ok(out.files)
}

#[derive(Default)]
struct Collected {
    files: Vec<GuestFile>,
    bytes: u64,
}

impl Collected {
    /// Copies the tree under `host` to `guest`, without following symlinks.
    fn directory(
        &mut self,
        index: usize,
        host: &Path,
        guest: &Path,
        log: &dyn HookLog,
    ) -> Result<(), FileSyncError> {
        let mut pending = vec![(host.to_path_buf(), guest.to_path_buf())];
        while let Some((dir, guest_dir)) = pending.pop() {
            let list_err = |source| FileSyncError::ReadDir {
                index,
                path: dir.clone(),
                source,
            };
            let mut children = Vec::new();
            for child in std::fs::read_dir(&dir).map_err(list_err)? {
                let child = child.map_err(list_err)?;
                children.push((child.file_name(), child.path(), child.file_type()));
            }
            // Stable order: the bundle is the same for the same tree.
            children.sort_by(|a, b| a.0.cmp(&b.0));
            let mut subdirs = Vec::new();
            for (name, path, kind) in children {
                let kind = kind.map_err(|source| FileSyncError::Read {
                    index,
                    path: path.clone(),
                    source,
                })?;
                let Some(name) = name.to_str() else {
                    // The bundle is JSON: a non-UTF-8 name cannot travel.
                    log.warn(&format!(
                        "file_sync[{index}]: skipped {}: its name is not UTF-8",
                        path.display()
                    ));
                    continue;
                };
                let target = guest_dir.join(name);
                if kind.is_symlink() {
                    log.warn(&format!(
                        "file_sync[{index}]: skipped symlink {} (links inside a synced directory are never followed)",
                        path.display()
                    ));
                } else if kind.is_dir() {
                    subdirs.push((path, target));
                } else if kind.is_file() {
                    match open(index, &path, true)? {
                        Some((file, meta)) => {
                            let mode = meta.permissions().mode() & 0o777;
                            self.file(index, &path, file, &meta, target, mode)?;
                        }
                        None => log.warn(&format!(
                            "file_sync[{index}]: skipped {}: it changed into a symlink or special file while copying",
                            path.display()
                        )),
                    }
                } else {
                    log.warn(&format!(
                        "file_sync[{index}]: skipped {}: not a regular file or directory",
                        path.display()
                    ));
                }
            }
            // Depth-first in name order.
            pending.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// Reads `file` (already open at `host`) into a guest file at `guest`.
    fn file(
        &mut self,
        index: usize,
        host: &Path,
        file: File,
        meta: &Metadata,
        guest: PathBuf,
        mode: u32,
    ) -> Result<(), FileSyncError> {
        let too_large = || FileSyncError::TooLarge {
            index,
            path: host.to_path_buf(),
        };
        let cost = |len: u64| {
            len.saturating_add(PER_FILE_OVERHEAD)
                .saturating_add(guest.as_os_str().len() as u64)
        };
        let budget = MAX_TOTAL_BYTES.saturating_sub(self.bytes);
        if cost(meta.len()) > budget {
            return Err(too_large());
        }
        // Bounded, in case the file grows while it is read.
        let mut contents = Vec::with_capacity(meta.len() as usize);
        file.take(budget.saturating_add(1))
            .read_to_end(&mut contents)
            .map_err(|source| FileSyncError::Read {
                index,
                path: host.to_path_buf(),
                source,
            })?;
        let spent = cost(contents.len() as u64);
        if spent > budget {
            return Err(too_large());
        }
        self.bytes += spent;
        self.files.push(GuestFile {
            path: guest,
            contents,
            mode,
            uid: 0,
            gid: 0,
        });
        Ok(())
    }
}

/// Opens a regular file for reading without blocking on FIFOs; with
/// `no_follow`, a symlink swapped in since the directory was listed is
/// refused. `None` when it is not a regular file (any more).
fn open(
    index: usize,
    path: &Path,
    no_follow: bool,
) -> Result<Option<(File, Metadata)>, FileSyncError> {
    let read_err = |source| FileSyncError::Read {
        index,
        path: path.to_path_buf(),
        source,
    };
    let mut flags = libc::O_NONBLOCK;
    if no_follow {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        // ELOOP is how O_NOFOLLOW reports a symlink.
        Err(e) if no_follow && e.raw_os_error() == Some(libc::ELOOP) => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let meta = file.metadata().map_err(read_err)?;
    Ok(meta.is_file().then_some((file, meta)))
}

/// The file-sync capability.
#[derive(Debug, Default)]
pub struct FileSync {
    identity: KeptIdentity,
}

fn make(_env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(FileSync::default()))
}

/// The host's git identity as `git config --global` last gave it, with
/// the state of the files that command reads. `--global` reads only the
/// user's global config files ([`global_config_files`]) and does not
/// follow their `include`s, so the same files mean the same answer and
/// the `git` process runs only when one of them changed.
#[derive(Debug, Default)]
struct KeptIdentity(Mutex<Option<(Vec<FileState>, GitIdentity)>>);

impl KeptIdentity {
    /// The identity kept for `files` as they are at `now`, or `read()`.
    fn get(
        &self,
        files: &[PathBuf],
        now: SystemTime,
        read: impl FnOnce() -> GitIdentity,
    ) -> GitIdentity {
        let states: Option<Vec<FileState>> =
            files.iter().map(|f| file_id::settled(f, now)).collect();
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(states), Some((kept, id))) = (&states, &*lock()) {
            if states == kept {
                return id.clone();
            }
        }
        let id = read();
        if let Some(states) = states {
            *lock() = Some((states, id.clone()));
        }
        id
    }
}

/// The files `git config --global` reads: `$GIT_CONFIG_GLOBAL` when set,
/// else `$XDG_CONFIG_HOME/git/config` (`~/.config/git/config`) and
/// `~/.gitconfig`.
fn global_config_files() -> Vec<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("GIT_CONFIG_GLOBAL") {
        return vec![p];
    }
    let home = var("HOME");
    let xdg = var("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")));
    xdg.map(|x| x.join("git/config"))
        .into_iter()
        .chain(home.map(|h| h.join(".gitconfig")))
        .collect()
}

inventory::submit! { BuiltinCapability { make } }

/// The daemon user's home, for `~/` host paths.
fn daemon_home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

impl Capability for FileSync {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Copies the [[file_sync]] host files and directories from config.toml into the guest at every start"
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        match options.keys().next() {
            None => Ok(()),
            Some(k) => Err(CapError::InvalidOptions(format!(
                "unknown option {k:?}: file-sync takes no options; list files as [[file_sync]] entries in config.toml"
            ))),
        }
    }

    fn guest_config(&self, ctx: &HookCtx<'_>, guest: &mut GuestConfig) -> Result<(), CapError> {
        let identity = self.identity.get(
            &global_config_files(),
            SystemTime::now(),
            host_global_identity,
        );
        add_to_guest(ctx, guest, &identity)
    }
}

/// Where the guest's git identity goes: root's global git config.
pub const GUEST_GITCONFIG: &str = "/root/.gitconfig";

/// Sets `$2`/`$3` as user.name/user.email in the git config file `$1`
/// (an empty value is left alone) with the guest's git, keeping the rest
/// of the file; without git, writes `$4` (a `[user]` section) if the file
/// does not exist yet, so a git installed later finds it.
const GIT_IDENTITY_SCRIPT: &str = r#"f=$1
if command -v git >/dev/null 2>&1; then
  [ -z "$2" ] || git config --file "$f" user.name "$2" || exit 1
  [ -z "$3" ] || git config --file "$f" user.email "$3" || exit 1
elif [ ! -e "$f" ]; then
  printf '%s' "$4" > "$f"
fi"#;

/// The guest command (run by the agent at boot, after the work disk is
/// mounted) that puts `id` in the git config file `path`, or `None` when
/// the host has no identity.
pub fn git_identity_command(id: &GitIdentity, path: &str) -> Option<Vec<String>> {
    let name = id.name.as_deref().filter(|v| !v.contains('\n'));
    let email = id.email.as_deref().filter(|v| !v.contains('\n'));
    if name.is_none() && email.is_none() {
        return None;
    }
    // A git config value in double quotes: backslash and quote escaped.
    let quoted = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let mut section = "[user]\n".to_string();
    if let Some(n) = name {
        section.push_str(&format!("\tname = {}\n", quoted(n)));
    }
    if let Some(e) = email {
        section.push_str(&format!("\temail = {}\n", quoted(e)));
    }
    Some(
        [
            "sh",
            "-c",
            GIT_IDENTITY_SCRIPT,
            "banger-git-identity",
            path,
            name.unwrap_or_default(),
            email.unwrap_or_default(),
            &section,
        ]
        .map(String::from)
        .to_vec(),
    )
}

/// The hook's work: the host's git `identity` as a boot command, then the
/// `[[file_sync]]` entries as files.
fn add_to_guest(
    ctx: &HookCtx<'_>,
    guest: &mut GuestConfig,
    identity: &GitIdentity,
) -> Result<(), CapError> {
    if let Some(argv) = git_identity_command(identity, GUEST_GITCONFIG) {
        ctx.log.info(&format!(
            "host git identity {} <{}> goes into the guest's ~/.gitconfig",
            identity.name.as_deref().unwrap_or("(no name)"),
            identity.email.as_deref().unwrap_or("no email")
        ));
        guest.commands.push(argv);
    }
    let entries = &ctx.config.file_sync;
    if entries.is_empty() {
        return Ok(());
    }
    let files = collect(entries, daemon_home().as_deref(), ctx.log)
        .map_err(|e| CapError::with("Cannot copy the [[file_sync]] entries", e))?;
    let bytes: usize = files.iter().map(|f| f.contents.len()).sum();
    ctx.log.info(&format!(
        "syncing {} file(s), {bytes} bytes, into the guest",
        files.len()
    ));
    guest.files.extend(files);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;
    use std::sync::Mutex;

    use banger_api::config::{Config, SyncSource};
    use banger_host::hostops::RecordingHostOps;

    use super::*;

    #[derive(Default)]
    struct Warnings(Mutex<Vec<String>>);

    impl HookLog for Warnings {
        fn info(&self, _msg: &str) {}
        fn warn(&self, msg: &str) {
            self.0.lock().unwrap().push(msg.to_string());
        }
    }

    impl Warnings {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    fn entry(host: &Path, guest: &str, mode: Option<u32>) -> FileSyncEntry {
        FileSyncEntry {
            host: SyncSource::Absolute(host.to_path_buf()),
            guest: guest.into(),
            mode,
        }
    }

    fn write(path: &Path, contents: &str, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// (guest path, contents, mode) of each file, in bundle order.
    fn summary(files: &[GuestFile]) -> Vec<(String, String, u32)> {
        files
            .iter()
            .map(|f| {
                assert_eq!((f.uid, f.gid), (0, 0), "{}", f.path.display());
                (
                    f.path.display().to_string(),
                    String::from_utf8(f.contents.clone()).unwrap(),
                    f.mode,
                )
            })
            .collect()
    }

    #[test]
    fn a_file_lands_with_its_mode_and_defaults_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.json"), dir.path().join("tool"));
        write(&a, "{}", 0o644);
        write(&b, "#!/bin/sh\n", 0o700);
        let log = Warnings::default();
        let files = collect(
            &[
                entry(&a, "/root/.config/a.json", None),
                entry(&b, "/root/bin/tool", Some(0o755)),
            ],
            None,
            &log,
        )
        .unwrap();
        assert_eq!(
            summary(&files),
            [
                ("/root/.config/a.json".into(), "{}".into(), 0o600),
                ("/root/bin/tool".into(), "#!/bin/sh\n".into(), 0o755),
            ]
        );
        assert!(log.lines().is_empty(), "{:?}", log.lines());
    }

    #[test]
    fn a_directory_is_copied_recursively_keeping_each_files_mode() {
        let dir = tempfile::tempdir().unwrap();
        let aws = dir.path().join("aws");
        write(&aws.join("credentials"), "secret", 0o600);
        write(&aws.join("config"), "region", 0o644);
        write(&aws.join("sso/cache/token.json"), "tok", 0o640);
        write(&aws.join("bin/helper"), "run", 0o750);
        std::fs::create_dir_all(aws.join("empty")).unwrap();
        let log = Warnings::default();
        let files = collect(&[entry(&aws, "/root/.aws", Some(0o600))], None, &log).unwrap();
        assert_eq!(
            summary(&files),
            [
                ("/root/.aws/config".into(), "region".into(), 0o644),
                ("/root/.aws/credentials".into(), "secret".into(), 0o600),
                ("/root/.aws/bin/helper".into(), "run".into(), 0o750),
                (
                    "/root/.aws/sso/cache/token.json".into(),
                    "tok".into(),
                    0o640
                ),
            ]
        );
        // The entry's mode does not apply to a directory, and it says so.
        let lines = log.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("mode applies to files only"), "{lines:?}");
    }

    #[test]
    fn symlinks_inside_a_directory_are_skipped_with_a_warning_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        write(&outside.join("secret"), "TOP SECRET", 0o600);
        let tree = dir.path().join("tree");
        write(&tree.join("real"), "ok", 0o644);
        symlink(outside.join("secret"), tree.join("file-link")).unwrap();
        symlink(&outside, tree.join("dir-link")).unwrap();
        symlink(tree.join("real"), tree.join("inner-link")).unwrap();
        let log = Warnings::default();
        let files = collect(&[entry(&tree, "/root/tree", None)], None, &log).unwrap();
        assert_eq!(
            summary(&files),
            [("/root/tree/real".into(), "ok".into(), 0o644)]
        );
        assert!(
            files.iter().all(|f| f.contents != b"TOP SECRET"),
            "a symlink was followed out of the tree"
        );
        let lines = log.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        for name in ["dir-link", "file-link", "inner-link"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains("skipped symlink") && l.contains(name)),
                "{name}: {lines:?}"
            );
        }
    }

    #[test]
    fn a_named_symlink_is_followed_because_the_user_chose_it() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("real/f"), "x", 0o644);
        symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let log = Warnings::default();
        let files = collect(
            &[entry(&dir.path().join("link"), "/root/d", None)],
            None,
            &log,
        )
        .unwrap();
        assert_eq!(summary(&files), [("/root/d/f".into(), "x".into(), 0o644)]);
    }

    #[test]
    fn a_missing_host_path_warns_and_skips() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("here"), "1", 0o600);
        let missing = dir.path().join("gone");
        let log = Warnings::default();
        let files = collect(
            &[
                entry(&missing, "/root/gone", None),
                entry(&dir.path().join("here"), "/root/here", None),
            ],
            None,
            &log,
        )
        .unwrap();
        assert_eq!(summary(&files), [("/root/here".into(), "1".into(), 0o600)]);
        let lines = log.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("file_sync[0]: ")
                && lines[0].contains(&missing.display().to_string())
                && lines[0].contains("does not exist on the host; skipped"),
            "{lines:?}"
        );
    }

    #[test]
    fn other_host_errors_fail_naming_the_entry_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        write(&file, "x", 0o600);
        // A path through a regular file fails with ENOTDIR, even as root.
        let bad = file.join("child");
        let err = collect(&[entry(&bad, "/root/x", None)], None, &Warnings::default()).unwrap_err();
        assert!(
            matches!(err, FileSyncError::Read { index: 0, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("file_sync[0]: Cannot read ")
                && msg.contains(&bad.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn home_paths_need_a_home_and_map_guest_tilde_to_root() {
        let home = tempfile::tempdir().unwrap();
        write(&home.path().join(".tool/auth.json"), "tok", 0o600);
        let cfg = Config::parse(
            "[[file_sync]]\nhost = \"~/.tool/auth.json\"\nguest = \"~/.tool/auth.json\"\n",
            Path::new("/c.toml"),
        )
        .unwrap();
        let files = collect(&cfg.file_sync, Some(home.path()), &Warnings::default()).unwrap();
        assert_eq!(
            summary(&files),
            [("/root/.tool/auth.json".into(), "tok".into(), 0o600)]
        );
        let msg = collect(&cfg.file_sync, None, &Warnings::default())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(
                "file_sync[0]: host ~/.tool/auth.json is under ~/, but the daemon has no HOME"
            ),
            "{msg}"
        );
    }

    #[test]
    fn more_than_the_config_drive_carries_is_refused_with_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("small"), "s", 0o600);
        let big = dir.path().join("big.bin");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_TOTAL_BYTES).unwrap();
        let err = collect(
            &[
                entry(&dir.path().join("small"), "/root/small", None),
                entry(&big, "/root/big.bin", None),
            ],
            None,
            &Warnings::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, FileSyncError::TooLarge { index: 1, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("past 12 MiB"), "{msg}");
        assert!(msg.contains("big.bin"), "{msg}");
        // Alone and a little smaller, a big file fits.
        f.set_len(MAX_TOTAL_BYTES - 1024).unwrap();
        let files = collect(
            &[entry(&big, "/root/big.bin", None)],
            None,
            &Warnings::default(),
        )
        .unwrap();
        assert_eq!(files[0].contents.len() as u64, MAX_TOTAL_BYTES - 1024);
    }

    /// Runs the GuestConfig hook as the lifecycle does, with `config`.
    fn guest_config(config: &Config) -> (Result<GuestConfig, CapError>, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let (vm, host, log, options) = (
            crate::test_env::test_vm("fs"),
            RecordingHostOps::default(),
            Warnings::default(),
            CapOptions::new(),
        );
        let ctx = HookCtx {
            vm: &vm,
            vm_dir: dir.path(),
            options: &options,
            host: &host,
            config,
            log: &log,
        };
        let mut guest = GuestConfig::new("fs");
        let r = add_to_guest(&ctx, &mut guest, &GitIdentity::default()).map(|()| guest);
        (r, log.lines())
    }

    #[test]
    fn the_hook_adds_the_files_and_is_a_no_op_without_entries() {
        let empty = Config::defaults(Path::new("/c.toml"));
        let (guest, lines) = guest_config(&empty);
        assert_eq!(guest.unwrap(), GuestConfig::new("fs"));
        assert!(lines.is_empty());

        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("f"), "hello", 0o644);
        let text = format!(
            "[[file_sync]]\nhost = {:?}\nguest = \"~/f\"\nmode = \"0640\"\n[[file_sync]]\nhost = \"/nonexistent/banger-test\"\nguest = \"~/g\"\n",
            dir.path().join("f").display().to_string()
        );
        let cfg = Config::parse(&text, Path::new("/c.toml")).unwrap();
        let (guest, lines) = guest_config(&cfg);
        assert_eq!(
            summary(&guest.unwrap().files),
            [("/root/f".into(), "hello".into(), 0o640)]
        );
        assert!(
            lines.len() == 1 && lines[0].contains("/nonexistent/banger-test"),
            "{lines:?}"
        );

        let text = "[[file_sync]]\nhost = \"/etc/passwd/x\"\nguest = \"~/x\"\n";
        let cfg = Config::parse(text, Path::new("/c.toml")).unwrap();
        let err = guest_config(&cfg).0.unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(
            chain.contains(
                "Cannot copy the [[file_sync]] entries: file_sync[0]: Cannot read /etc/passwd/x"
            ),
            "{chain}"
        );
    }

    /// Runs `argv` (a git identity command) on this host with `path_var`
    /// as PATH.
    fn run_in_sh(argv: &[String], path_var: &str) {
        let status = std::process::Command::new("/bin/sh")
            .args(&argv[1..])
            .env("PATH", path_var)
            .status()
            .unwrap();
        assert!(status.success(), "{argv:?}");
    }

    fn git_get(file: &Path, key: &str) -> String {
        let out = std::process::Command::new("git")
            .args(["config", "--file"])
            .arg(file)
            .args(["--get", key])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    fn tricky_identity() -> GitIdentity {
        GitIdentity {
            name: Some("Ana \"the\" O'Neil \\ $HOME `id`".into()),
            email: Some("ana@example.org".into()),
        }
    }

    #[test]
    fn the_git_identity_is_merged_into_an_existing_gitconfig_by_the_guests_git() {
        let git = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("git").is_file());
        if !git {
            eprintln!("SKIP the_git_identity_is_merged_...: no git (apt package git)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".gitconfig");
        std::fs::write(&file, "[alias]\n\tst = status\n[user]\n\tname = Old\n").unwrap();
        let id = tricky_identity();
        let argv = git_identity_command(&id, file.to_str().unwrap()).unwrap();
        assert_eq!(&argv[..2], ["sh", "-c"]);
        run_in_sh(&argv, &std::env::var("PATH").unwrap());
        assert_eq!(git_get(&file, "user.name"), id.name.clone().unwrap());
        assert_eq!(git_get(&file, "user.email"), "ana@example.org");
        assert_eq!(git_get(&file, "alias.st"), "status");

        // Without git in the guest: a new file with a [user] section git
        // reads back exactly; an existing file is left alone.
        let fresh = dir.path().join("fresh");
        let argv = git_identity_command(&id, fresh.to_str().unwrap()).unwrap();
        run_in_sh(&argv, "/nonexistent");
        assert_eq!(git_get(&fresh, "user.name"), id.name.clone().unwrap());
        assert_eq!(git_get(&fresh, "user.email"), "ana@example.org");
        std::fs::write(&fresh, "# mine\n").unwrap();
        run_in_sh(&argv, "/nonexistent");
        assert_eq!(std::fs::read_to_string(&fresh).unwrap(), "# mine\n");
    }

    #[test]
    fn the_hook_adds_the_git_identity_only_when_the_host_has_one() {
        let cfg = Config::defaults(Path::new("/c.toml"));
        let dir = tempfile::tempdir().unwrap();
        let (vm, host, log, options) = (
            crate::test_env::test_vm("fs"),
            RecordingHostOps::default(),
            Warnings::default(),
            CapOptions::new(),
        );
        let ctx = HookCtx {
            vm: &vm,
            vm_dir: dir.path(),
            options: &options,
            host: &host,
            config: &cfg,
            log: &log,
        };
        let mut guest = GuestConfig::new("fs");
        add_to_guest(&ctx, &mut guest, &tricky_identity()).unwrap();
        assert_eq!(guest.commands.len(), 1);
        assert_eq!(guest.commands[0][4], "/root/.gitconfig");
        assert!(guest.files.is_empty());
        let only_email = GitIdentity {
            name: None,
            email: Some("e@x".into()),
        };
        let argv = git_identity_command(&only_email, "/f").unwrap();
        assert_eq!((argv[5].as_str(), argv[6].as_str()), ("", "e@x"));
        assert_eq!(git_identity_command(&GitIdentity::default(), "/f"), None);
    }

    #[test]
    fn the_git_identity_is_read_again_only_when_a_global_config_file_changed() {
        let git = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("git").is_file());
        if !git {
            eprintln!("SKIP the_git_identity_is_read_again_only_...: no git (apt package git)");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        let (dot, xdg) = (
            home.path().join(".gitconfig"),
            home.path().join(".config/git/config"),
        );
        let files = [xdg.clone(), dot.clone()];
        // The real git, reading this home's global config.
        let reads = std::cell::Cell::new(0);
        let read = || {
            reads.set(reads.get() + 1);
            let get = |key: &str| {
                let out = std::process::Command::new("git")
                    .args(["config", "--global", "--get", key])
                    .env("HOME", home.path())
                    .env_remove("XDG_CONFIG_HOME")
                    .env_remove("GIT_CONFIG_GLOBAL")
                    .output()
                    .unwrap();
                Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
                    .filter(|s| !s.is_empty())
            };
            GitIdentity {
                name: get("user.name"),
                email: get("user.email"),
            }
        };
        let kept = KeptIdentity::default();
        let settled = || SystemTime::now() + file_id::RACY * 2;
        assert_eq!(kept.get(&files, settled(), read), GitIdentity::default());
        std::fs::write(&dot, "[user]\n\tname = Ana\n").unwrap();
        let ana = kept.get(&files, settled(), read);
        assert_eq!(ana.name.as_deref(), Some("Ana"));
        assert_eq!(kept.get(&files, settled(), read), ana);
        assert_eq!(reads.get(), 2, "read again although nothing changed");
        // The XDG file appears: read again (whether git takes it next to
        // ~/.gitconfig depends on its version; the answer is git's).
        std::fs::create_dir_all(xdg.parent().unwrap()).unwrap();
        std::fs::write(&xdg, "[user]\n\temail = ana@example.org\n").unwrap();
        let both = kept.get(&files, settled(), read);
        assert_eq!(reads.get(), 3);
        assert_eq!(both, read());
        assert_eq!(both.name.as_deref(), Some("Ana"));
        std::fs::remove_file(&dot).unwrap();
        let xdg_only = kept.get(&files, settled(), read);
        assert_eq!(xdg_only.email.as_deref(), Some("ana@example.org"));
        assert_eq!(reads.get(), 5);
        // Edited within the racy window: read, not trusted by identity.
        std::fs::write(&dot, "[user]\n\tname = Bo\n").unwrap();
        assert_eq!(
            kept.get(&files, SystemTime::now(), read).name.as_deref(),
            Some("Bo")
        );
        assert_eq!(
            kept.get(&files, settled(), read).name.as_deref(),
            Some("Bo")
        );
        assert_eq!(reads.get(), 7);
        assert_eq!(
            kept.get(&files, settled(), read).name.as_deref(),
            Some("Bo")
        );
        assert_eq!(reads.get(), 7);
    }

    #[test]
    fn options_are_refused_pointing_at_the_config() {
        let mut o = CapOptions::new();
        o.insert("host".into(), "/x".into());
        let msg = FileSync::default()
            .validate_options(&o)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("[[file_sync]] entries in config.toml"),
            "{msg}"
        );
        assert!(
            FileSync::default()
                .validate_options(&CapOptions::new())
                .is_ok()
        );
    }
}
