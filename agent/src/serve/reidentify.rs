//! `POST /reidentify` (see `banger_guest_protocol::reidentify`): applies a
//! restored guest's new identity. Every file is staged and renamed; the
//! secret is swapped last, so a request that fails half way can be retried
//! with the same (old) secret.

use std::fs;
use std::path::Path;

use banger_guest_protocol::bundle::GuestConfig;
use banger_guest_protocol::reidentify::{Reidentified, Reidentify};

use crate::init::files;

use super::exec::secret_path;

/// Largest request body accepted.
pub const MAX_BODY: usize = 256 * 1024;

/// How the network part is applied: the guest's netlink, or nothing in
/// host-side tests.
pub type ApplyNet<'a> = dyn Fn(&Reidentify) -> Result<Vec<String>, String> + 'a;

/// Applies `req` to the system rooted at `root`. The hostname syscall is
/// made only when `root` is `/` (a real guest).
pub fn apply(req: &Reidentify, root: &Path, net: &ApplyNet<'_>) -> Result<Reidentified, String> {
    let mut applied = Vec::new();
    let name = req.hostname.trim();
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(format!("Invalid hostname {:?}", req.hostname));
    }
    if req.new_secret.trim().is_empty() {
        return Err("The new secret is empty".into());
    }
    // /etc/hostname, /etc/hosts and (with nameservers) resolv.conf, as
    // the boot writes them.
    let guest = GuestConfig {
        hostname: name.to_string(),
        network: req.network.iter().cloned().collect(),
        ..GuestConfig::default()
    };
    let etc = root.join("etc");
    write_staged(&etc.join("hostname"), format!("{name}\n").as_bytes(), 0o644)?;
    write_staged(
        &etc.join("hosts"),
        files::render_hosts(&guest).as_bytes(),
        0o644,
    )?;
    if let Some(resolv) = files::render_resolv_conf(&guest) {
        write_staged(&etc.join("resolv.conf"), resolv.as_bytes(), 0o644)?;
    }
    if root == Path::new("/") {
        nix::unistd::sethostname(name).map_err(|e| format!("sethostname: {e}"))?;
    }
    applied.push("hostname".to_string());
    applied.extend(net(req)?);
    if !req.ssh_host_keys.is_empty() {
        let dir = root.join("etc/ssh");
        for k in &req.ssh_host_keys {
            let plain = !k.name.is_empty()
                && k.name.starts_with("ssh_host_")
                && !k.name.contains('/')
                && !k.name.contains("..");
            if !plain {
                return Err(format!("Invalid host key file name {:?}", k.name));
            }
            let mode = if k.name.ends_with(".pub") {
                0o644
            } else {
                0o600
            };
            write_staged(&dir.join(&k.name), k.contents.as_bytes(), mode)?;
        }
        applied.push("ssh-host-keys".to_string());
        if remove_other_host_keys(&dir, req)? {
            applied.push("old-host-keys-removed".to_string());
        }
        if root == Path::new("/") && reload_sshd(root) {
            applied.push("sshd-reloaded".to_string());
        }
    }
    write_staged(
        &secret_path(root),
        format!("{}\n", req.new_secret.trim()).as_bytes(),
        0o600,
    )?;
    applied.push("secret".to_string());
    Ok(Reidentified { applied })
}

/// Removes the host keys (`ssh_host_*_key`, their `.pub` and `-cert.pub`)
/// in `dir` that `req` did not send: the image's or the snapshot's RSA or
/// ECDSA keys would otherwise stay shared by every VM restored from it, and
/// sshd would still offer them. Returns whether any was removed.
fn remove_other_host_keys(dir: &Path, req: &Reidentify) -> Result<bool, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return Err(format!("reading {}: {e}", dir.display())),
    };
    let mut removed = false;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let host_key = name.starts_with("ssh_host_")
            && (name.ends_with("_key")
                || name.ends_with("_key.pub")
                || name.ends_with("_key-cert.pub"));
        if !host_key || req.ssh_host_keys.iter().any(|k| k.name == name) {
            continue;
        }
        fs::remove_file(entry.path())
            .map_err(|e| format!("removing the old host key {}: {e}", entry.path().display()))?;
        removed = true;
    }
    Ok(removed)
}

/// Writes `path` through a staged file renamed over it, owned by the
/// agent's own uid (root in a guest).
fn write_staged(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    files::write_staged(path, bytes, mode, uid.as_raw(), gid.as_raw()).map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })
}

/// Where Debian's (and OpenSSH's default) listening sshd writes its pid.
const SSHD_PID_FILE: &str = "run/sshd.pid";

/// Sends SIGHUP to the listening sshd, which re-reads its host keys.
fn reload_sshd(root: &Path) -> bool {
    let mut any = false;
    for pid in sshd_pids(root) {
        let sent = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        );
        any |= sent.is_ok();
    }
    any
}

/// The listening sshd under `root`: the pid in its pid file when that
/// process is an sshd; else every process named `sshd` (an image whose
/// sshd writes no pid file). The pid file spares a walk of `/proc`, which
/// costs tens of milliseconds in a restored guest under TCG, and it names
/// only the listener, not the per-connection processes of sessions.
fn sshd_pids(root: &Path) -> Vec<i32> {
    let proc = root.join("proc");
    let is_sshd = |pid: i32| {
        fs::read_to_string(proc.join(pid.to_string()).join("comm"))
            .is_ok_and(|c| c.trim() == "sshd")
    };
    let listed = fs::read_to_string(root.join(SSHD_PID_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|pid| *pid > 1 && is_sshd(*pid));
    if let Some(pid) = listed {
        return vec![pid];
    }
    let Ok(entries) = fs::read_dir(&proc) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| is_sshd(*pid))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use banger_guest_protocol::bundle::GuestNetwork;
    use banger_guest_protocol::reidentify::HostKeyFile;

    fn request() -> Reidentify {
        Reidentify {
            hostname: "restored-1".into(),
            mac: None,
            previous_address: None,
            network: Some(GuestNetwork {
                nic_id: "eth0".into(),
                address: "172.30.0.9/24".into(),
                gateway: Some("172.30.0.1".into()),
                mtu: None,
                nameservers: vec!["172.30.0.1".into()],
            }),
            ssh_host_keys: vec![
                HostKeyFile {
                    name: "ssh_host_ed25519_key".into(),
                    contents: "PRIVATE\n".into(),
                },
                HostKeyFile {
                    name: "ssh_host_ed25519_key.pub".into(),
                    contents: "ssh-ed25519 AAAA new\n".into(),
                },
            ],
            new_secret: "new-secret".into(),
        }
    }

    #[test]
    fn applies_hostname_keys_and_secret_last_with_private_modes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc/ssh")).unwrap();
        fs::write(r.join("etc/ssh/ssh_host_ed25519_key"), "OLD").unwrap();
        // Key types the request does not renew: removed. Not keys: kept.
        for old in [
            "ssh_host_rsa_key",
            "ssh_host_rsa_key.pub",
            "ssh_host_ecdsa_key-cert.pub",
            "sshd_config",
            "ssh_host_notes.txt",
        ] {
            fs::write(r.join("etc/ssh").join(old), "OLD").unwrap();
        }
        let net_seen = std::cell::Cell::new(false);
        let done = apply(&request(), r, &|_| {
            net_seen.set(true);
            Ok(vec!["address".into()])
        })
        .unwrap();
        assert_eq!(
            done.applied,
            [
                "hostname",
                "address",
                "ssh-host-keys",
                "old-host-keys-removed",
                "secret"
            ]
        );
        let mut left: Vec<String> = fs::read_dir(r.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
                "ssh_host_notes.txt",
                "sshd_config"
            ]
        );
        assert!(net_seen.get());
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "restored-1\n"
        );
        let hosts = fs::read_to_string(r.join("etc/hosts")).unwrap();
        assert!(hosts.contains("172.30.0.9\trestored-1\n"), "{hosts}");
        assert_eq!(
            fs::read_to_string(r.join("etc/resolv.conf")).unwrap(),
            "nameserver 172.30.0.1\n"
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/ssh/ssh_host_ed25519_key")).unwrap(),
            "PRIVATE\n"
        );
        let mode = |p: &str| fs::metadata(r.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("etc/ssh/ssh_host_ed25519_key"), 0o600);
        assert_eq!(mode("etc/ssh/ssh_host_ed25519_key.pub"), 0o644);
        assert_eq!(
            fs::read_to_string(secret_path(r)).unwrap().trim(),
            "new-secret"
        );
        assert_eq!(mode(banger_guest_protocol::exec::SECRET_PATH), 0o600);
        let leftovers: Vec<_> = fs::read_dir(r.join("etc/ssh"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".banger-tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn a_failed_network_step_keeps_the_old_secret_and_bad_input_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        write_staged(&secret_path(r), b"old\n", 0o600).unwrap();
        let err = apply(&request(), r, &|_| Err("no eth0".into())).unwrap_err();
        assert_eq!(err, "no eth0");
        assert_eq!(fs::read_to_string(secret_path(r)).unwrap(), "old\n");

        let mut bad = request();
        bad.hostname = "evil/../x".into();
        assert!(
            apply(&bad, r, &|_| Ok(vec![]))
                .unwrap_err()
                .contains("hostname")
        );
        let mut bad = request();
        bad.ssh_host_keys[0].name = "../../etc/shadow".into();
        assert!(
            apply(&bad, r, &|_| Ok(vec![]))
                .unwrap_err()
                .contains("host key")
        );
        assert_eq!(fs::read_to_string(secret_path(r)).unwrap(), "old\n");
    }

    #[test]
    fn sshd_is_found_by_its_pid_file_else_by_name() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let proc = |pid: &str, comm: &str| {
            fs::create_dir_all(r.join("proc").join(pid)).unwrap();
            fs::write(r.join("proc").join(pid).join("comm"), format!("{comm}\n")).unwrap();
        };
        proc("1", "systemd");
        proc("200", "sshd");
        proc("300", "sshd");
        proc("400", "bash");
        fs::create_dir_all(r.join("run")).unwrap();
        fs::write(r.join("run/sshd.pid"), "300\n").unwrap();
        assert_eq!(sshd_pids(r), [300], "the pid file's listener only");
        // A stale pid file (the pid is another program now): by name.
        fs::write(r.join("run/sshd.pid"), "400\n").unwrap();
        let mut found = sshd_pids(r);
        found.sort();
        assert_eq!(found, [200, 300]);
        fs::remove_file(r.join("run/sshd.pid")).unwrap();
        let mut found = sshd_pids(r);
        found.sort();
        assert_eq!(found, [200, 300]);
        fs::remove_dir_all(r.join("proc")).unwrap();
        assert!(sshd_pids(r).is_empty());
    }
}
