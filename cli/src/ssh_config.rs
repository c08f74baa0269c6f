//! `banger ssh-config [--install | --uninstall]`: plain `ssh NAME.vm`
//! (and scp, rsync, editors' remote modes) with banger's key and the pinned
//! host keys.
//!
//! banger writes its own file, `$XDG_CONFIG_HOME/banger/ssh_config`, with one
//! `Host *.vm` block. `~/.ssh/config` is never touched unless the user asks:
//! `--install` puts ONE `Include` line at its top (a `Host` block the user
//! left open at the end would otherwise swallow it), `--uninstall` removes
//! exactly that line. The guest's host keys are never trusted on first use:
//! `KnownHostsCommand` asks the running daemon for the keys its agent
//! reported (`banger ssh-config --known-hosts NAME.vm`), and no known_hosts
//! file is read or written.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use banger_api::api::SshTarget;
use banger_api::model::VmName;
use banger_api::paths::Paths;

use crate::remote::vm_path;

/// The host pattern the block matches.
const HOST_SUFFIX: &str = ".vm";
/// The user's own ssh client config, under `$HOME`.
const USER_SSH_CONFIG: &str = ".ssh/config";

/// What `banger ssh-config` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write banger's file and print how to include it.
    Show,
    /// Also add the `Include` line to `~/.ssh/config`.
    Install,
    /// Remove the `Include` line from `~/.ssh/config`.
    Uninstall,
    /// `KnownHostsCommand`: print the pinned host keys of `HOST`.
    KnownHosts(String),
}

impl From<crate::args::SshConfigArgs> for Action {
    fn from(a: crate::args::SshConfigArgs) -> Action {
        match a {
            crate::args::SshConfigArgs {
                known_hosts: Some(host),
                ..
            } => Action::KnownHosts(host),
            crate::args::SshConfigArgs { install: true, .. } => Action::Install,
            crate::args::SshConfigArgs {
                uninstall: true, ..
            } => Action::Uninstall,
            _ => Action::Show,
        }
    }
}

/// Where banger's file goes and what it points at.
#[derive(Debug, Clone)]
pub struct Files {
    /// banger's own `ssh_config`.
    pub banger_config: PathBuf,
    /// The user's `~/.ssh/config`.
    pub user_config: PathBuf,
    /// banger's private key.
    pub identity: PathBuf,
}

impl Files {
    /// The files for this user.
    pub fn from_env(paths: &Paths) -> Result<Files> {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .context("HOME is not set to an absolute path: cannot find ~/.ssh/config")?;
        let config = banger_api::config::Config::load(&paths.config_file())?;
        Ok(Files {
            banger_config: paths.config_dir.join("ssh_config"),
            user_config: home.join(USER_SSH_CONFIG),
            identity: crate::vm::identity_file(paths, &config),
        })
    }

    /// The line `--install` adds.
    pub fn include_line(&self) -> String {
        format!(
            "Include {}",
            ssh_quote(&self.banger_config.display().to_string())
        )
    }
}

/// `banger ssh-config ...`.
pub async fn run(action: Action) -> Result<ExitCode> {
    let paths = Paths::from_env()?;
    if let Action::KnownHosts(host) = &action {
        return known_hosts(&paths, host).await;
    }
    let files = Files::from_env(&paths)?;
    let banger = std::env::current_exe().context("Locating the banger executable")?;
    write_banger_config(&files, &banger)?;
    let include = files.include_line();
    match action {
        Action::Show => {
            println!("banger's ssh config: {}", files.banger_config.display());
            println!("include line:        {include}");
            if is_installed(&files)? {
                println!(
                    "{} includes it: `ssh root@NAME.vm` works (`banger ssh-config --uninstall` removes the line)",
                    files.user_config.display()
                );
            } else {
                println!(
                    "not included in {}: `banger ssh-config --install` adds the line at its top",
                    files.user_config.display()
                );
            }
        }
        Action::Install => {
            if install(&files)? {
                println!("added `{include}` to {}", files.user_config.display());
            } else {
                println!("{} already includes it", files.user_config.display());
            }
        }
        Action::Uninstall => {
            if uninstall(&files)? {
                println!("removed `{include}` from {}", files.user_config.display());
            } else {
                println!("{} did not include it", files.user_config.display());
            }
        }
        Action::KnownHosts(_) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// The text of banger's `ssh_config`.
pub fn render(files: &Files, banger: &Path) -> String {
    let q = |p: &Path| ssh_quote(&p.display().to_string());
    format!(
        "# Written by `banger ssh-config`; it rewrites this file, do not edit.\n\
         # Host keys come from the running daemon (the guest agent's report), never\n\
         # trusted on first use; nothing is written to a known_hosts file.\n\
         Host *{HOST_SUFFIX}\n\
         \x20   User root\n\
         \x20   IdentityFile {}\n\
         \x20   IdentitiesOnly yes\n\
         \x20   StrictHostKeyChecking yes\n\
         \x20   UserKnownHostsFile /dev/null\n\
         \x20   GlobalKnownHostsFile /dev/null\n\
         \x20   KnownHostsCommand {} ssh-config --known-hosts %n\n\
         \x20   LogLevel ERROR\n",
        q(&files.identity),
        q(banger),
    )
}

/// Creates `path`'s directory (0700) when missing.
fn private_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("Creating {}", dir.display())),
        None => Ok(()),
    }
}

fn write_banger_config(files: &Files, banger: &Path) -> Result<()> {
    let path = &files.banger_config;
    private_parent(path)?;
    banger_api::fsutil::write_atomic(path, render(files, banger).as_bytes(), 0o600)
        .with_context(|| format!("Writing {}", path.display()))
}

/// Double-quotes a word for ssh_config when it has blanks or quotes.
fn ssh_quote(word: &str) -> String {
    if word.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        format!("\"{}\"", word.replace('"', "\\\""))
    } else {
        word.to_string()
    }
}

/// Whether `~/.ssh/config` holds the include line (a missing file does not).
pub fn is_installed(files: &Files) -> Result<bool> {
    Ok(read_user_config(files)?
        .is_some_and(|text| text.lines().any(|l| l.trim_end() == files.include_line())))
}

fn read_user_config(files: &Files) -> Result<Option<String>> {
    match std::fs::read_to_string(&files.user_config) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("Reading {}", files.user_config.display())),
    }
}

/// The real file behind `~/.ssh/config` (dotfile managers link it), so the
/// staged write replaces the file and not the link.
fn real_user_config(files: &Files) -> Result<PathBuf> {
    match std::fs::canonicalize(&files.user_config) {
        Ok(p) => Ok(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(files.user_config.clone()),
        Err(e) => Err(e).with_context(|| format!("Resolving {}", files.user_config.display())),
    }
}

/// Adds the include line at the top of `~/.ssh/config` (creating the file
/// 0600, and `~/.ssh` 0700, when missing). False when it was already there.
pub fn install(files: &Files) -> Result<bool> {
    let line = files.include_line();
    let existing = read_user_config(files)?;
    if existing
        .as_deref()
        .is_some_and(|t| t.lines().any(|l| l.trim_end() == line))
    {
        return Ok(false);
    }
    let target = real_user_config(files)?;
    private_parent(&target)?;
    let mode = match std::fs::metadata(&target) {
        Ok(m) => m.permissions().mode() & 0o7777,
        Err(_) => 0o600,
    };
    let text = format!("{line}\n{}", existing.unwrap_or_default());
    banger_api::fsutil::write_atomic(&target, text.as_bytes(), mode)
        .with_context(|| format!("Writing {}", target.display()))?;
    Ok(true)
}

/// Removes exactly the include line (with its newline) from
/// `~/.ssh/config`; nothing else changes. False when it was not there.
pub fn uninstall(files: &Files) -> Result<bool> {
    let line = files.include_line();
    let Some(text) = read_user_config(files)? else {
        return Ok(false);
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|l| l.trim_end() != line)
        .collect();
    if kept.len() == text.len() {
        return Ok(false);
    }
    let target = real_user_config(files)?;
    let mode = std::fs::metadata(&target)
        .with_context(|| format!("Reading {}", target.display()))?
        .permissions()
        .mode()
        & 0o7777;
    banger_api::fsutil::write_atomic(&target, kept.as_bytes(), mode)
        .with_context(|| format!("Writing {}", target.display()))?;
    Ok(true)
}

/// `KnownHostsCommand`: the pinned host keys of `host` (`NAME.vm`) from the
/// running daemon, which is never started for this. Prints nothing for a
/// host that is not a VM, so ssh refuses it.
async fn known_hosts(paths: &Paths, host: &str) -> Result<ExitCode> {
    let Some(name) = host.strip_suffix(HOST_SUFFIX) else {
        return Ok(ExitCode::SUCCESS);
    };
    let name = VmName::parse(name).with_context(|| format!("{host} names no banger VM"))?;
    let client = crate::daemon::client(paths);
    if crate::daemon::probe(&client).await?.is_none() {
        bail!("bangerd is not running, so VM {name} is not either: `banger vm start {name}`");
    }
    let target: SshTarget = client
        .get(&format!("{}/ssh", vm_path(&name.to_string())))
        .await?;
    print!("{}", target.known_hosts);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Files {
        Files {
            banger_config: dir.join("config dir/banger/ssh_config"),
            user_config: dir.join("home/.ssh/config"),
            identity: dir.join("state/banger/ssh/id_ed25519"),
        }
    }

    #[test]
    fn include_line_quotes_a_path_with_blanks() {
        let f = files(Path::new("/h"));
        assert_eq!(
            f.include_line(),
            "Include \"/h/config dir/banger/ssh_config\""
        );
        assert_eq!(ssh_quote("/plain/path"), "/plain/path");
    }

    #[test]
    fn install_goes_on_top_once_and_uninstall_restores_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        std::fs::create_dir_all(f.user_config.parent().unwrap()).unwrap();
        // No trailing newline and a Host block left open at the end.
        let before = "Host example\n    User me\n\nHost other\n    Port 2222";
        std::fs::write(&f.user_config, before).unwrap();
        std::fs::set_permissions(&f.user_config, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(install(&f).unwrap());
        assert!(!install(&f).unwrap());
        let after = std::fs::read_to_string(&f.user_config).unwrap();
        assert_eq!(after.matches("Include").count(), 1, "{after}");
        assert!(after.starts_with("Include \""), "{after}");
        assert!(is_installed(&f).unwrap());
        let mode = std::fs::metadata(&f.user_config)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert!(uninstall(&f).unwrap());
        assert_eq!(std::fs::read_to_string(&f.user_config).unwrap(), before);
        assert!(!uninstall(&f).unwrap());
        assert!(!is_installed(&f).unwrap());
    }

    #[test]
    fn install_creates_a_missing_config_0600_and_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        assert!(install(&f).unwrap());
        let meta = std::fs::metadata(&f.user_config).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let ssh_dir = std::fs::metadata(f.user_config.parent().unwrap()).unwrap();
        assert_eq!(ssh_dir.permissions().mode() & 0o777, 0o700);

        // A dotfile manager's link stays a link; its target gets the line.
        let real = dir.path().join("dotfiles-ssh-config");
        std::fs::write(&real, "Host a\n").unwrap();
        std::fs::remove_file(&f.user_config).unwrap();
        std::os::unix::fs::symlink(&real, &f.user_config).unwrap();
        assert!(install(&f).unwrap());
        assert!(
            std::fs::symlink_metadata(&f.user_config)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::read_to_string(&real)
                .unwrap()
                .starts_with("Include ")
        );
        assert!(uninstall(&f).unwrap());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "Host a\n");
    }

    #[test]
    fn uninstall_of_a_missing_config_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        assert!(!uninstall(&f).unwrap());
        assert!(!f.user_config.exists());
    }
}
