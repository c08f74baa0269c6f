//! Registry credentials from docker's `config.json`: inline `auths`,
//! per-registry `credHelpers` and the global `credsStore`, the latter two by
//! running `docker-credential-<helper> get`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

use super::ImageError;

/// A username and secret for one registry.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub(crate) username: String,
    pub(crate) secret: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <secret>)", self.username)
    }
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HelperReply {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub(crate) fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Credentials for `host` from the docker config `opts` names (or the
/// default one), with helpers looked up in `$PATH`.
pub(crate) fn for_registry(
    host: &str,
    opts: &super::PullOptions,
) -> Result<Option<Credentials>, ImageError> {
    let docker_config = opts.docker_config.clone().or_else(default_config_path);
    let path_env = std::env::var_os("PATH");
    lookup(host, docker_config.as_deref(), path_env.as_deref())
}

/// Credentials for `host` from the docker config at `config` (absent file:
/// none). Helpers are looked up in `path_env`.
pub(crate) fn lookup(
    host: &str,
    config: Option<&Path>,
    path_env: Option<&OsStr>,
) -> Result<Option<Credentials>, ImageError> {
    let Some(path) = config else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ImageError::DockerConfig {
                path: path.to_path_buf(),
                source: Box::new(e),
            });
        }
    };
    let cfg: DockerConfig = serde_json::from_str(&text).map_err(|e| ImageError::DockerConfig {
        path: path.to_path_buf(),
        source: Box::new(e),
    })?;
    let bad = |detail: &str| ImageError::DockerConfig {
        path: path.to_path_buf(),
        source: detail.to_string().into(),
    };

    if let Some(helper) = find_for_host(&cfg.cred_helpers, host) {
        return run_helper(helper, host, path_env);
    }
    if let Some(entry) = find_for_host(&cfg.auths, host) {
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("an auths entry is not valid base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("an auths entry is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| bad("an auths entry is not user:password"))?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                secret: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                secret: p.clone(),
            }));
        }
    }
    if let Some(store) = &cfg.creds_store {
        return run_helper(store, host, path_env);
    }
    Ok(None)
}

/// The entry for `host`, accepting docker's key spellings
/// (`https://host/v1/`, `host`); docker.io also matches its legacy index key.
fn find_for_host<'a, T>(map: &'a HashMap<String, T>, host: &str) -> Option<&'a T> {
    let want = normalise(host);
    map.iter()
        .find(|(k, _)| normalise(k) == want)
        .map(|(_, v)| v)
}

fn normalise(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

fn run_helper(
    helper: &str,
    host: &str,
    path_env: Option<&OsStr>,
) -> Result<Option<Credentials>, ImageError> {
    let fail = |detail: String| ImageError::CredentialHelper {
        helper: helper.to_string(),
        host: host.to_string(),
        detail,
    };
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(fail("the helper name is not a plain word".to_string()));
    }
    let program = format!("docker-credential-{helper}");
    let exe = path_env
        .into_iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(&program))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            fail(format!(
                "{program} is not in PATH; install it or fix the docker config"
            ))
        })?;
    let mut cmd = Command::new(&exe);
    cmd.arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let mut child = cmd.spawn().map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // docker's helpers accept the server URL as written in the config;
        // a bare host is what credHelpers keys use.
        let _ = stdin.write_all(host.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(fail(
            format!("{} {}", stdout.trim(), stderr.trim())
                .trim()
                .to_string(),
        ));
    }
    let reply: HelperReply = serde_json::from_str(&stdout)
        .map_err(|e| fail(format!("its reply is not credentials JSON ({e})")))?;
    Ok(Some(Credentials {
        username: reply.username,
        secret: reply.secret,
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_config(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    /// A fake `docker-credential-NAME` that records the host it was asked
    /// for and answers with fixed credentials for `reg.example:5000` only.
    fn fake_helper(dir: &Path, name: &str) -> PathBuf {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let p = bin.join(format!("docker-credential-{name}"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread host\necho \"$host\" >> {log}\n\
                 if [ \"$host\" = reg.example:5000 ]; then\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{name}-user\",\"Secret\":\"s3cret\"}}' \"$host\"\n\
                 else echo 'credentials not found in native keychain'; exit 1; fi\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        bin
    }

    #[test]
    fn reads_inline_auths() {
        let dir = tempfile::tempdir().unwrap();
        // "alice:pa:ss" — the password may itself contain a colon.
        let cfg = write_config(
            dir.path(),
            r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"YWxpY2U6cGE6c3M="}}}"#,
        );
        let c = lookup("reg.example:5000", Some(&cfg), None)
            .unwrap()
            .unwrap();
        assert_eq!((c.username.as_str(), c.secret.as_str()), ("alice", "pa:ss"));
        assert_eq!(lookup("other.example", Some(&cfg), None).unwrap(), None);
    }

    #[test]
    fn missing_config_means_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("nope.json");
        assert_eq!(lookup("reg.example:5000", Some(&cfg), None).unwrap(), None);
    }

    #[test]
    fn runs_the_per_registry_cred_helper() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_helper(dir.path(), "fake");
        let cfg = write_config(
            dir.path(),
            r#"{"auths":{"reg.example:5000":{"auth":"YWxpY2U6cGFzcw=="}},"credHelpers":{"reg.example:5000":"fake"}}"#,
        );
        let c = lookup("reg.example:5000", Some(&cfg), Some(bin.as_os_str()))
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.secret.as_str()),
            ("fake-user", "s3cret")
        );
        let asked = std::fs::read_to_string(dir.path().join("fake.log")).unwrap();
        assert_eq!(asked.trim(), "reg.example:5000");
    }

    #[test]
    fn creds_store_answers_for_any_host_and_not_found_is_anonymous() {
        let dir = tempfile::tempdir().unwrap();
        let bin = fake_helper(dir.path(), "store");
        let cfg = write_config(dir.path(), r#"{"credsStore":"store"}"#);
        let c = lookup("reg.example:5000", Some(&cfg), Some(bin.as_os_str()))
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "store-user");
        assert_eq!(
            lookup("elsewhere.example", Some(&cfg), Some(bin.as_os_str())).unwrap(),
            None
        );
    }

    #[test]
    fn missing_helper_names_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            r#"{"credHelpers":{"reg.example:5000":"absent"}}"#,
        );
        let empty = dir.path().join("empty-bin");
        let err = lookup("reg.example:5000", Some(&cfg), Some(empty.as_os_str())).unwrap_err();
        assert!(
            err.to_string()
                .contains("docker-credential-absent is not in PATH"),
            "{err}"
        );
    }

    #[test]
    fn rejects_helper_names_that_are_paths() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), r#"{"credsStore":"../../bin/sh"}"#);
        let err = lookup("reg.example:5000", Some(&cfg), None).unwrap_err();
        assert!(matches!(err, ImageError::CredentialHelper { .. }), "{err}");
    }
}
