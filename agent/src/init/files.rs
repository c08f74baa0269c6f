//! Files the agent writes into the guest: `guest.files`, root's
//! authorized_keys, hostname, /etc/hosts and /etc/resolv.conf. Every write
//! is staged next to its target and renamed into place.
//!
//! Nothing is fsynced: every file written here is written again from the
//! config drive at each boot (and by `POST /reidentify` after a restore),
//! so one lost to a crash before the kernel wrote it back is replaced at
//! the next boot, and the rename keeps a reader from ever seeing half of
//! one. A sync per file cost about 10 ms each in a guest under TCG, on the
//! boot's and the restore's critical path.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use banger_guest_protocol::bundle::{GuestConfig, GuestFile};

/// Writing a guest file failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Guest paths must be absolute and free of `..`.
    #[error("Guest path {0} must be absolute without '..'; fix the capability that added it")]
    BadPath(PathBuf),
    /// A parent directory could not be created.
    #[error("Cannot create directory {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    /// The staged copy could not be written, chmod-ed or chown-ed.
    #[error("Cannot stage {0}")]
    Stage(PathBuf, #[source] std::io::Error),
    /// The staged copy could not be renamed over the target.
    #[error("Cannot rename into {0}")]
    Publish(PathBuf, #[source] std::io::Error),
}

/// `path` (absolute, in the guest) as seen from `root`.
pub fn under(root: &Path, path: &Path) -> Result<PathBuf, FileError> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(FileError::BadPath(path.to_path_buf()));
    }
    Ok(root.join(path.strip_prefix("/").unwrap_or(path)))
}

/// Writes one file under `root` with its owner and mode, creating parent
/// directories (0755, root-owned) as needed.
pub fn write_file(root: &Path, file: &GuestFile) -> Result<(), FileError> {
    let target = under(root, &file.path)?;
    write_staged(&target, &file.contents, file.mode, file.uid, file.gid)
}

pub(crate) fn write_staged(
    target: &Path,
    contents: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), FileError> {
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(FileError::BadPath(target.to_path_buf()));
    };
    fs::create_dir_all(dir).map_err(|e| FileError::CreateDir(dir.to_path_buf(), e))?;
    let staged = dir.join(format!(".{}.banger-tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staged)?;
        f.write_all(contents)?;
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        // After chown, which clears setuid/setgid bits.
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&staged);
        return Err(FileError::Stage(target.to_path_buf(), e));
    }
    fs::rename(&staged, target).map_err(|e| {
        let _ = fs::remove_file(&staged);
        FileError::Publish(target.to_path_buf(), e)
    })
}

/// Adds `keys` to `/root/.ssh/authorized_keys` under `root`, keeping the
/// lines already there. `.ssh` is 0700 and the file 0600, owned by root.
pub fn add_authorized_keys(root: &Path, keys: &[String]) -> Result<(), FileError> {
    if keys.is_empty() {
        return Ok(());
    }
    let ssh = root.join("root/.ssh");
    fs::create_dir_all(&ssh).map_err(|e| FileError::CreateDir(ssh.clone(), e))?;
    fs::set_permissions(&ssh, fs::Permissions::from_mode(0o700))
        .map_err(|e| FileError::CreateDir(ssh.clone(), e))?;
    let target = ssh.join("authorized_keys");
    let mut text = fs::read_to_string(&target).unwrap_or_default();
    for key in keys {
        let key = key.trim();
        if !text.lines().any(|l| l.trim() == key) {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(key);
            text.push('\n');
        }
    }
    write_staged(&target, text.as_bytes(), 0o600, 0, 0)
}

/// `/etc/hosts` for this guest: localhost plus the hostname on 127.0.1.1
/// and on each configured address.
pub fn render_hosts(guest: &GuestConfig) -> String {
    let h = &guest.hostname;
    let mut out = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{h}\n"
    );
    for n in &guest.network {
        let ip = n.address.split('/').next().unwrap_or_default();
        out.push_str(&format!("{ip}\t{h}\n"));
    }
    out
}

/// `/etc/resolv.conf` from every interface's nameservers, or `None` when
/// there are none (the image's file is then left alone).
pub fn render_resolv_conf(guest: &GuestConfig) -> Option<String> {
    let mut servers: Vec<&str> = Vec::new();
    for s in guest.network.iter().flat_map(|n| &n.nameservers) {
        if !servers.contains(&s.as_str()) {
            servers.push(s);
        }
    }
    (!servers.is_empty()).then(|| {
        servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect()
    })
}

/// Writes /etc/hostname, /etc/hosts and (when there are nameservers)
/// /etc/resolv.conf under `root`.
pub fn write_identity(root: &Path, guest: &GuestConfig) -> Result<(), FileError> {
    let etc = root.join("etc");
    write_staged(
        &etc.join("hostname"),
        format!("{}\n", guest.hostname).as_bytes(),
        0o644,
        0,
        0,
    )?;
    write_staged(
        &etc.join("hosts"),
        render_hosts(guest).as_bytes(),
        0o644,
        0,
        0,
    )?;
    if let Some(resolv) = render_resolv_conf(guest) {
        write_staged(&etc.join("resolv.conf"), resolv.as_bytes(), 0o644, 0, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use banger_guest_protocol::bundle::GuestNetwork;

    use super::*;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn no_staging_left(dir: &Path) {
        for e in fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.ends_with(".banger-tmp"), "left {name} in {dir:?}");
        }
    }

    #[test]
    fn writes_files_with_owner_and_mode_creating_parents() {
        let root = tempfile::tempdir().unwrap();
        let (uid, gid) = if is_root() {
            (1234, 2345)
        } else {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        };
        let file = GuestFile {
            path: "/opt/app/conf/app.toml".into(),
            contents: b"key = 1\n".to_vec(),
            mode: 0o640,
            uid,
            gid,
        };
        write_file(root.path(), &file).unwrap();
        let written = root.path().join("opt/app/conf/app.toml");
        assert_eq!(fs::read(&written).unwrap(), b"key = 1\n");
        let meta = fs::metadata(&written).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        no_staging_left(written.parent().unwrap());
    }

    #[test]
    fn replaces_existing_file_atomically() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(root.path().join("etc/motd"), "old contents that are longer").unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let file = GuestFile {
            path: "/etc/motd".into(),
            contents: b"new".to_vec(),
            mode: 0o644,
            uid: me,
            gid: nix::unistd::getegid().as_raw(),
        };
        write_file(root.path(), &file).unwrap();
        assert_eq!(fs::read(root.path().join("etc/motd")).unwrap(), b"new");
        no_staging_left(&root.path().join("etc"));
    }

    #[test]
    fn rejects_relative_and_escaping_paths() {
        let root = tempfile::tempdir().unwrap();
        for p in ["etc/x", "/etc/../../x"] {
            let file = GuestFile {
                path: p.into(),
                contents: vec![],
                mode: 0o644,
                uid: 0,
                gid: 0,
            };
            assert!(matches!(
                write_file(root.path(), &file),
                Err(FileError::BadPath(_))
            ));
        }
    }

    #[test]
    fn authorized_keys_keep_existing_lines_and_skip_duplicates() {
        if !is_root() {
            eprintln!(
                "SKIPPED authorized_keys_keep_existing_lines_and_skip_duplicates: needs root to chown"
            );
            return;
        }
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("root/.ssh")).unwrap();
        fs::write(
            root.path().join("root/.ssh/authorized_keys"),
            "ssh-ed25519 AAAAold me",
        )
        .unwrap();
        let keys = vec![
            "ssh-ed25519 AAAAnew you".to_string(),
            "ssh-ed25519 AAAAold me".to_string(),
        ];
        add_authorized_keys(root.path(), &keys).unwrap();
        let text = fs::read_to_string(root.path().join("root/.ssh/authorized_keys")).unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            ["ssh-ed25519 AAAAold me", "ssh-ed25519 AAAAnew you"]
        );
        let dir_mode = fs::metadata(root.path().join("root/.ssh")).unwrap().mode() & 0o777;
        let file_mode = fs::metadata(root.path().join("root/.ssh/authorized_keys"))
            .unwrap()
            .mode()
            & 0o777;
        assert_eq!((dir_mode, file_mode), (0o700, 0o600));
    }

    fn guest() -> GuestConfig {
        let mut g = GuestConfig::new("devbox");
        g.network.push(GuestNetwork {
            nic_id: "eth0".into(),
            address: "172.30.0.5/24".into(),
            gateway: Some("172.30.0.1".into()),
            mtu: None,
            nameservers: vec!["172.30.0.1".into(), "1.1.1.1".into()],
        });
        g
    }

    #[test]
    fn hosts_maps_hostname_to_loopback_and_guest_address() {
        let hosts = render_hosts(&guest());
        let lines: Vec<Vec<&str>> = hosts
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert!(lines.contains(&vec!["127.0.0.1", "localhost"]));
        assert!(lines.contains(&vec!["127.0.1.1", "devbox"]));
        assert!(lines.contains(&vec!["172.30.0.5", "devbox"]));
    }

    #[test]
    fn resolv_conf_lists_each_nameserver_once_or_is_left_alone() {
        let mut g = guest();
        g.network.push(g.network[0].clone());
        assert_eq!(
            render_resolv_conf(&g).unwrap(),
            "nameserver 172.30.0.1\nnameserver 1.1.1.1\n"
        );
        assert_eq!(render_resolv_conf(&GuestConfig::new("x")), None);
    }

    #[test]
    fn identity_files_land_in_etc_of_the_root() {
        if !is_root() {
            eprintln!("SKIPPED identity_files_land_in_etc_of_the_root: needs root to chown");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        write_identity(root.path(), &guest()).unwrap();
        let etc = root.path().join("etc");
        assert_eq!(
            fs::read_to_string(etc.join("hostname")).unwrap(),
            "devbox\n"
        );
        assert!(
            fs::read_to_string(etc.join("hosts"))
                .unwrap()
                .contains("devbox")
        );
        assert!(
            fs::read_to_string(etc.join("resolv.conf"))
                .unwrap()
                .contains("nameserver 1.1.1.1")
        );
        no_staging_left(&etc);
    }
}
