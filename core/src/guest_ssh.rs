//! `guest_ssh`: the daemon's own SSH client for guests (russh), used for
//! workspace import/export and tool bootstrap.
//!
//! It logs in with banger's identity ([`banger_api::ssh::SshIdentity`]) and
//! accepts only the host keys the guest agent reported (the `known_hosts`
//! text of [`banger_api::api::SshTarget`]): there is no trust on first use. One
//! connection runs any number of commands, each on its own channel, with its
//! exit status and both output streams captured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, Handle};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::io::AsyncRead;

/// Talking to a guest over SSH failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestSshError {
    /// The `known_hosts` text held no usable host key.
    #[error("No usable SSH host key for the guest; is sshd running in it?")]
    NoHostKeys,
    /// banger's private key could not be loaded.
    #[error("Cannot load the SSH identity {}", .0.display())]
    LoadIdentity(PathBuf, #[source] russh::keys::Error),
    /// The TCP connection or SSH handshake failed (a host key that is not
    /// pinned ends up here too).
    #[error("Cannot connect to the guest's sshd at {0}")]
    Connect(SocketAddr, #[source] russh::Error),
    /// Connecting took too long.
    #[error("The guest's sshd at {0} did not answer within {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
    /// A command wrote more than the daemon keeps in memory.
    #[error(
        "{command:?} in the guest wrote more than {limit} bytes to {stream}; the daemon keeps at most that much of a command's output (write big output to a file in the guest instead)"
    )]
    OutputTooLarge {
        /// The command.
        command: String,
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// The server presented a host key that is not the pinned one.
    #[error(
        "The guest at {0} presented an SSH host key its agent did not report; refusing to connect"
    )]
    HostKeyMismatch(SocketAddr),
    /// The guest refused banger's key.
    #[error("The guest refused banger's SSH key for user {0}")]
    Auth(String),
    /// Authentication could not be attempted.
    #[error("SSH authentication as {0} failed")]
    AuthRequest(String, #[source] russh::Error),
    /// Opening a channel, sending the command or streaming stdin failed.
    #[error("Running {0:?} in the guest failed")]
    Exec(String, #[source] russh::Error),
    /// The command ended without an exit status (killed by a signal, or the
    /// connection dropped).
    #[error("{command:?} in the guest ended without an exit status{}", signal_note(.signal))]
    NoExitStatus {
        /// The command.
        command: String,
        /// The signal that killed it, when the server said.
        signal: Option<String>,
    },
    /// The command exited non-zero (from [`GuestSsh::run`]).
    #[error("{command:?} in the guest exited with status {status}: {stderr}")]
    Failed {
        /// The command.
        command: String,
        /// Its exit status.
        status: u32,
        /// Its standard error, trimmed.
        stderr: String,
    },
}

fn signal_note(signal: &Option<String>) -> String {
    signal
        .as_ref()
        .map(|s| format!(" (signal {s})"))
        .unwrap_or_default()
}

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its exit status.
    pub status: u32,
    /// Everything it wrote to standard output.
    pub stdout: Vec<u8>,
    /// Everything it wrote to standard error.
    pub stderr: Vec<u8>,
}

/// Where and how to reach a guest's sshd.
#[derive(Debug, Clone)]
pub struct GuestEndpoint {
    /// `address:22` for a VM.
    pub addr: SocketAddr,
    /// The login user (`root`).
    pub user: String,
    /// banger's private key.
    pub identity_file: PathBuf,
    /// OpenSSH `known_hosts` lines pinning the guest's host keys (aliases
    /// are ignored: the lines came from the guest's own agent).
    pub known_hosts: String,
}

/// A logged-in SSH connection to one guest.
pub struct GuestSsh {
    handle: Handle<Pinned>,
    addr: SocketAddr,
    max_output: usize,
}

impl std::fmt::Debug for GuestSsh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestSsh")
            .field("addr", &self.addr)
            .finish()
    }
}

/// How long connecting and logging in may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of one stream of one command's output the daemon keeps unless
/// told otherwise (config `ssh_max_output`, through
/// [`GuestSsh::with_max_output`]).
pub const MAX_OUTPUT: usize = banger_api::config::DEFAULT_SSH_MAX_OUTPUT as usize;

impl GuestSsh {
    /// Connects to `endpoint`, checks its host key against the pinned ones
    /// and logs in with banger's key, within [`CONNECT_TIMEOUT`].
    pub async fn connect(endpoint: &GuestEndpoint) -> Result<GuestSsh, GuestSshError> {
        Self::connect_within(endpoint, CONNECT_TIMEOUT).await
    }

    /// [`GuestSsh::connect`], giving up after `timeout` (TCP connect,
    /// handshake and login together).
    pub async fn connect_within(
        endpoint: &GuestEndpoint,
        timeout: Duration,
    ) -> Result<GuestSsh, GuestSshError> {
        let keys = parse_known_hosts(&endpoint.known_hosts);
        if keys.is_empty() {
            return Err(GuestSshError::NoHostKeys);
        }
        let key = russh::keys::load_secret_key(&endpoint.identity_file, None)
            .map_err(|e| GuestSshError::LoadIdentity(endpoint.identity_file.clone(), e))?;
        let addr = endpoint.addr;
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let handler = Pinned { keys };
        let connecting = async {
            let mut handle = match client::connect(config, addr, handler).await {
                Ok(h) => h,
                Err(PinnedError::Mismatch) => return Err(GuestSshError::HostKeyMismatch(addr)),
                Err(PinnedError::Ssh(e)) => return Err(GuestSshError::Connect(addr, e)),
            };
            let user = endpoint.user.clone();
            let auth = handle
                .authenticate_publickey(
                    user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::new(key), None),
                )
                .await
                .map_err(|e| GuestSshError::AuthRequest(user.clone(), e))?;
            if !auth.success() {
                return Err(GuestSshError::Auth(user));
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| GuestSshError::ConnectTimeout(addr, timeout))??;
        Ok(GuestSsh {
            handle,
            addr,
            max_output: MAX_OUTPUT,
        })
    }

    /// Keeps at most `bytes` of each output stream of a command (default
    /// [`MAX_OUTPUT`]); past it the command fails with
    /// [`GuestSshError::OutputTooLarge`].
    pub fn with_max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// Runs `command` through the guest user's shell, feeding it `stdin`
    /// (then end-of-file) when given, and returns its status and output
    /// whatever the status.
    pub async fn exec(
        &self,
        command: &str,
        stdin: Option<&mut (dyn AsyncRead + Unpin + Send)>,
    ) -> Result<Output, GuestSshError> {
        let exec_err = |e| GuestSshError::Exec(command.to_string(), e);
        let mut channel = self.handle.channel_open_session().await.map_err(exec_err)?;
        channel.exec(true, command).await.map_err(exec_err)?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut status = None;
        let mut signal = None;
        if let Some(input) = stdin {
            // Output is only read after stdin is sent: a command that writes
            // more than the channel window before reading all of its input
            // would stall. The commands used here (cat, tar -x, git) read
            // everything first.
            channel.data(input).await.map_err(exec_err)?;
        }
        channel.eof().await.map_err(exec_err)?;
        let too_large = |stream| GuestSshError::OutputTooLarge {
            command: command.to_string(),
            stream,
            limit: self.max_output,
        };
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if stdout.len() + data.len() > self.max_output {
                        return Err(too_large("stdout"));
                    }
                    stdout.extend_from_slice(&data);
                }
                ChannelMsg::ExtendedData { data, ext: 1 } => {
                    if stderr.len() + data.len() > self.max_output {
                        return Err(too_large("stderr"));
                    }
                    stderr.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => {
                    signal = Some(format!("{signal_name:?}"));
                }
                _ => {}
            }
        }
        match status {
            Some(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            None => Err(GuestSshError::NoExitStatus {
                command: command.to_string(),
                signal,
            }),
        }
    }

    /// [`GuestSsh::exec`], with a non-zero status turned into
    /// [`GuestSshError::Failed`]; returns standard output.
    pub async fn run(
        &self,
        command: &str,
        stdin: Option<&mut (dyn AsyncRead + Unpin + Send)>,
    ) -> Result<Vec<u8>, GuestSshError> {
        let out = self.exec(command, stdin).await?;
        if out.status != 0 {
            return Err(GuestSshError::Failed {
                command: command.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(out.stdout)
    }

    /// Says goodbye to the server. Dropping the connection also closes it.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// The public keys in `known_hosts` text (`hosts ALGORITHM BASE64 ...`);
/// lines that do not parse are skipped.
fn parse_known_hosts(text: &str) -> Vec<PublicKey> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let first = fields.next()?;
            if first.starts_with('#') {
                return None;
            }
            let _algorithm = fields.next()?;
            let blob = fields.next()?;
            russh::keys::parse_public_key_base64(blob).ok()
        })
        .collect()
}

/// The client handler: accepts exactly the pinned host keys.
struct Pinned {
    keys: Vec<PublicKey>,
}

/// The handler's error: a russh error, or a host key we do not know.
#[derive(Debug)]
enum PinnedError {
    Ssh(russh::Error),
    Mismatch,
}

impl From<russh::Error> for PinnedError {
    fn from(e: russh::Error) -> Self {
        PinnedError::Ssh(e)
    }
}

impl client::Handler for Pinned {
    type Error = PinnedError;

    async fn check_server_key(
        &mut self,
        server: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = match server {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.keys.iter().any(|k| k.key_data() == key.key_data())
            }
            // Guests present plain host keys; certificates are not pinned.
            PublicKeyOrCertificate::Certificate(_) => false,
        };
        if !ok {
            return Err(PinnedError::Mismatch);
        }
        Ok(true)
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// [`shell_quote`] for a path.
pub fn shell_quote_path(p: &Path) -> String {
    shell_quote(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes_and_spaces() {
        assert_eq!(shell_quote("/root/repo"), "/root/repo");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(x)"), "'$(x)'");
    }

    #[tokio::test]
    async fn a_guest_that_never_speaks_ssh_times_out_naming_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let identity = banger_api::ssh::SshIdentity::load_or_create(dir.path()).unwrap();
        // Accepts the TCP connection, then says nothing (a hung guest).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move { listener.accept().await.map(|(s, _)| s) });
        let endpoint = GuestEndpoint {
            addr,
            user: "root".into(),
            identity_file: identity.private_key_path().to_path_buf(),
            known_hosts: "web.vm ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n".into(),
        };
        let started = std::time::Instant::now();
        let err = GuestSsh::connect_within(&endpoint, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            matches!(err, GuestSshError::ConnectTimeout(a, _) if a == addr),
            "{err:?}"
        );
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        drop(held);
    }

    #[test]
    fn known_hosts_parsing_skips_garbage() {
        let text = "# comment\nweb.vm ssh-ed25519 notbase64!\n\nweb.vm,10.0.0.2 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n";
        let keys = parse_known_hosts(text);
        assert_eq!(keys.len(), 1);
    }
}
