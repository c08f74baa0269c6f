//! `banger-helper`: the narrow root helper. It serves the typed requests of
//! `banger_host::helper` on a Unix socket to the users and group its own
//! config allows, and performs them in-process. `banger system install`
//! runs it as a socket-activated systemd service or, without systemd, as
//! `banger-helper run` (a small supervisor that restarts `serve`). See
//! `docs/privileges.md`.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use banger_host::helper::{
    DEFAULT_HELPER_CONFIG, DEFAULT_HELPER_SOCKET, HelperClient, HelperPolicy, serve_connection,
};
use banger_host::hostops::InProcessHostOps;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "banger-helper", version, about = "banger's narrow root helper")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve requests in the foreground (systemd runs this; with socket
    /// activation the socket comes from systemd).
    Serve {
        /// The helper's config.
        #[arg(long, default_value = DEFAULT_HELPER_CONFIG)]
        config: PathBuf,
        /// The socket to bind when not socket-activated.
        #[arg(long, default_value = DEFAULT_HELPER_SOCKET)]
        socket: PathBuf,
    },
    /// Supervise `serve` without systemd: new session, pid file, restart
    /// on crash, SIGTERM stops both, SIGHUP restarts (re-reads the config).
    Run {
        /// The helper's config.
        #[arg(long, default_value = DEFAULT_HELPER_CONFIG)]
        config: PathBuf,
        /// The socket to bind.
        #[arg(long, default_value = DEFAULT_HELPER_SOCKET)]
        socket: PathBuf,
        /// The supervisor's pid file (locked while it runs).
        #[arg(long)]
        pid_file: PathBuf,
    },
    /// Ask a running helper for its version, as the calling user.
    Probe {
        /// The helper's socket.
        #[arg(long, default_value = DEFAULT_HELPER_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, socket } => serve(&config, &socket),
        Command::Run {
            config,
            socket,
            pid_file,
        } => supervise(&config, &socket, &pid_file),
        Command::Probe { socket } => HelperClient::new(socket)
            .ping()
            .map(|v| println!("banger-helper {v}"))
            .map_err(|e| anyhow::anyhow!(banger_api::error::render_chain(&e))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("banger-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: &Path, socket: &Path) -> Result<()> {
    // Started by `run`, it inherits the supervisor's blocked signals: take
    // SIGTERM's default action back.
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&nix::sys::signal::SigSet::empty()),
        None,
    )?;
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "banger-helper serve must run as root (it creates links and nft rules); start it with `sudo banger system install`"
        );
    }
    banger_api::paths::check_trusted_path("the helper config", config, 0)?;
    let policy = Arc::new(HelperPolicy::load(config)?);
    if let Err(e) = open_tun_device(Path::new(TUN_DEVICE)) {
        eprintln!("warning: {e:#}; a user's VMM cannot open its tap");
    }
    let listener = match activated_listener()? {
        Some(l) => l,
        None => bind_socket(socket, policy.group.as_ref().map(|g| g.0))?,
    };
    println!(
        "banger-helper {} listening on {}",
        env!("CARGO_PKG_VERSION"),
        socket.display()
    );
    std::io::stdout().flush()?;
    let ops = Arc::new(InProcessHostOps::default());
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        let (policy, ops) = (policy.clone(), ops.clone());
        std::thread::spawn(
            move || match serve_connection(stream, &policy, ops.as_ref()) {
                Ok((peer, 0)) if !policy.allows_peer(peer.uid, peer.gid) => {
                    eprintln!("denied uid {} pid {}", peer.uid, peer.pid)
                }
                Ok((peer, n)) => {
                    eprintln!("served uid {} pid {}: {n} request(s)", peer.uid, peer.pid)
                }
                Err(e) => eprintln!("connection failed: {e}"),
            },
        );
    }
    Ok(())
}

/// The TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Makes `/dev/net/tun` mode 0666, as udev's default rule does on every
/// distribution (containers often leave it 0600): a user's VMM opens its
/// tap there. Opening it grants nothing by itself: attaching to a tap needs
/// the tap's owner (the helper creates each one owned by its user) or
/// CAP_NET_ADMIN, and creating one needs CAP_NET_ADMIN.
fn open_tun_device(dev: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = match std::fs::symlink_metadata(dev) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{} does not exist (load the tun module: modprobe tun)",
                dev.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("Cannot inspect {}", dev.display())),
    };
    // 10:200 is the TUN clone device; anything else at that path is left alone.
    let is_tun =
        meta.file_type().is_char_device() && meta.rdev() == nix::sys::stat::makedev(10, 200);
    if !is_tun || meta.uid() != 0 {
        bail!(
            "{} is not root's TUN device (char 10:200); left as it is",
            dev.display()
        );
    }
    if meta.mode() & 0o666 != 0o666 {
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o666))
            .with_context(|| format!("Cannot chmod 0666 {}", dev.display()))?;
        eprintln!(
            "made {} mode 0666 (as udev does) so users' VMMs can open their taps",
            dev.display()
        );
    }
    Ok(())
}

/// The socket systemd passed (`LISTEN_FDS`, fd 3), if it passed one to us.
fn activated_listener() -> Result<Option<UnixListener>> {
    use std::os::fd::FromRawFd;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let fds = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !ours || fds < 1 {
        return Ok(None);
    }
    // SAFETY: systemd passed fd 3 to this process (LISTEN_PID is ours) as a
    // listening socket it no longer uses; nothing else in this process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(3) };
    Ok(Some(listener))
}

/// Binds `socket` mode 0660 (0600 without a group), owned by root and the
/// allowed group. A stale socket is replaced; anything else there is refused.
fn bind_socket(socket: &Path, gid: Option<u32>) -> Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("Cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(socket)
            .with_context(|| format!("Cannot remove the stale socket {}", socket.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it if it is not needed",
            socket.display()
        ),
        Err(_) => {}
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("Cannot bind {}", socket.display()))?;
    let mode = if let Some(gid) = gid {
        std::os::unix::fs::chown(socket, Some(0), Some(gid))
            .with_context(|| format!("Cannot chown {}", socket.display()))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("Cannot chmod {}", socket.display()))?;
    Ok(listener)
}

/// Holds the supervisor's pid file: opened without following links, locked.
fn lock_pid_file(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("Cannot open the pid file {}", path.display()))?;
    if !file.metadata()?.file_type().is_file() {
        bail!("{} is not a regular file; remove it", path.display());
    }
    let mut lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
    {
        Ok(l) => l,
        Err((_, e)) => bail!(
            "banger-helper is already running ({} is locked: {e}); `sudo banger system restart` restarts it",
            path.display()
        ),
    };
    lock.set_len(0)?;
    writeln!(&mut *lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The no-systemd service manager: restarts `serve` when it dies (at most
/// 5 times in 30 s), forwards SIGTERM/SIGINT, restarts on SIGHUP.
fn supervise(config: &Path, socket: &Path, pid_file: &Path) -> Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
    // Detach from the installer's session; fails harmlessly if already a leader.
    let _ = nix::unistd::setsid();
    let _lock = lock_pid_file(pid_file)?;
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        set.add(s);
    }
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let exe = std::env::current_exe().context("Cannot find banger-helper's own path")?;
    // The child inherits the blocked set; `serve` unblocks it first thing.
    let spawn = || {
        std::process::Command::new(&exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .spawn()
            .context("Cannot start banger-helper serve")
    };
    let mut child = spawn()?;
    let mut restarts: Vec<Instant> = Vec::new();
    let result = loop {
        let sig = set.wait()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        match sig {
            Signal::SIGTERM | Signal::SIGINT => {
                let _ = kill(pid, Signal::SIGTERM);
                let _ = child.wait();
                break Ok(());
            }
            Signal::SIGHUP => {
                let _ = kill(pid, Signal::SIGTERM);
                let _ = child.wait();
                child = spawn()?;
            }
            _ => {
                let Some(status) = child.try_wait()? else {
                    continue;
                };
                eprintln!("banger-helper serve exited ({status}); restarting");
                restarts.retain(|t| t.elapsed() < Duration::from_secs(30));
                if restarts.len() >= 5 {
                    break Err(anyhow::anyhow!(
                        "banger-helper serve keeps exiting ({status}); see its log and fix the config"
                    ));
                }
                restarts.push(Instant::now());
                child = spawn()?;
            }
        }
    };
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(pid_file);
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A character device node `major:minor` at `path`, mode 0600.
    fn char_device(path: &Path, major: u64, minor: u64) {
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(major, minor)).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn the_tun_device_is_opened_to_users_and_nothing_else_is_touched() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP the_tun_device_is_opened_to_users: needs root for mknod");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let tun = dir.path().join("tun");
        char_device(&tun, 10, 200);
        open_tun_device(&tun).unwrap();
        assert_eq!(mode(&tun), 0o666);
        // Another device, or a file, at that path is left as it is.
        let null = dir.path().join("null");
        char_device(&null, 1, 3);
        let err = open_tun_device(&null).unwrap_err().to_string();
        assert!(err.contains("not root's TUN device"), "{err}");
        assert_eq!(mode(&null), 0o600);
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(open_tun_device(&file).is_err());
        assert_eq!(mode(&file), 0o600);
        let err = open_tun_device(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("modprobe tun"), "{err}");
    }
}
