//! The agent API served by the real binary over `--tcp` on loopback.

// Inside a cfg(test) module so the workspace's test-only lint allowances
// (unwrap in tests) cover the helpers too.
#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    use banger_guest_protocol::api::{Health, HostKey, Listener, Proto};

    /// The running agent; killed when the test ends, pass or fail.
    struct Agent {
        child: Child,
        addr: String,
    }

    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn start_agent(root: &Path) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
            .args(["serve", "--tcp", "127.0.0.1:0", "--root"])
            .arg(root)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "banger-agent: serving the agent API on tcp 127.0.0.1:PORT"
        let addr = line
            .trim()
            .strip_prefix("banger-agent: serving the agent API on tcp ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Agent { child, addr }
    }

    /// Sends one request; returns (status, body).
    fn request(addr: &str, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "{method} {path} HTTP/1.1\r\nHost: agent\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        (status, body.to_string())
    }

    fn get<T: serde::de::DeserializeOwned>(addr: &str, path: &str) -> T {
        let (status, body) = request(addr, "GET", path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    #[test]
    fn healthz_reports_version_and_memory() {
        let root = tempfile::tempdir().unwrap();
        let agent = start_agent(root.path());
        let health: Health = get(&agent.addr, "/healthz");
        assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let total: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert_eq!(health.mem_total_kib, total);
        assert!(health.mem_available_kib > 0 && health.mem_available_kib <= total);
    }

    #[test]
    fn ports_lists_the_agent_and_other_listeners_with_their_processes() {
        let root = tempfile::tempdir().unwrap();
        let agent = start_agent(root.path());
        let mine = TcpListener::bind("127.0.0.1:0").unwrap();
        let my_port = mine.local_addr().unwrap().port();
        let agent_port: u16 = agent.addr.rsplit(':').next().unwrap().parse().unwrap();
        let listeners: Vec<Listener> = get(&agent.addr, "/ports");
        let find = |port| {
            listeners
                .iter()
                .find(|l| l.proto == Proto::Tcp && l.port == port)
                .unwrap_or_else(|| panic!("port {port} missing from {listeners:?}"))
        };
        let own = find(my_port);
        assert_eq!(own.pid, Some(std::process::id()));
        let served = find(agent_port);
        assert_eq!(served.pid, Some(agent.child.id()));
        assert_eq!(served.process.as_deref(), Some("banger-agent"));
        assert!(served.command.as_deref().unwrap().ends_with(&format!(
            "serve --tcp 127.0.0.1:0 --root {}",
            root.path().display()
        )));
    }

    #[test]
    fn ssh_host_keys_come_from_the_root_etc_ssh() {
        let root = tempfile::tempdir().unwrap();
        let ssh = root.path().join("etc/ssh");
        std::fs::create_dir_all(&ssh).unwrap();
        let agent = start_agent(root.path());
        let none: Vec<HostKey> = get(&agent.addr, "/ssh-host-keys");
        assert!(none.is_empty());
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(ssh.join("ssh_host_ed25519_key"))
            .status();
        if !matches!(made, Ok(s) if s.success()) {
            eprintln!("SKIPPED ssh_host_keys_come_from_the_root_etc_ssh: ssh-keygen not usable");
            return;
        }
        let keys: Vec<HostKey> = get(&agent.addr, "/ssh-host-keys");
        assert_eq!(keys.len(), 1);
        let public = std::fs::read_to_string(ssh.join("ssh_host_ed25519_key.pub")).unwrap();
        assert_eq!(keys[0].public_key, public.trim());
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn unknown_paths_and_methods_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let agent = start_agent(root.path());
        assert_eq!(request(&agent.addr, "GET", "/nope").0, 404);
        assert_eq!(request(&agent.addr, "POST", "/healthz").0, 405);
    }

    /// `POST /reidentify` with `secret` as the bearer token; (status, body).
    fn reidentify(addr: &str, secret: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /reidentify HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {secret}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (
            head.split(' ').nth(1).unwrap().parse().unwrap(),
            body.to_string(),
        )
    }

    #[test]
    fn reidentify_takes_the_old_secret_once_then_only_the_new_one() {
        use banger_guest_protocol::exec::SECRET_PATH;
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join(SECRET_PATH);
        std::fs::create_dir_all(secret.parent().unwrap()).unwrap();
        std::fs::write(&secret, "old-secret\n").unwrap();
        let agent = start_agent(root.path());
        let body = serde_json::json!({
            "hostname": "restored-2",
            "ssh_host_keys": [{"name": "ssh_host_ed25519_key.pub",
                               "contents": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7p1Z4t9B1BlY3fsJ4mMDbWdW9b7Fv2Z5mfsU1T1x8y new\n"}],
            "new_secret": "new-secret",
        })
        .to_string();
        let (status, _) = reidentify(&agent.addr, "wrong", &body);
        assert_eq!(status, 401);
        assert!(
            !root.path().join("etc/hostname").exists(),
            "nothing applied"
        );

        let (status, answer) = reidentify(&agent.addr, "old-secret", &body);
        assert_eq!(status, 200, "{answer}");
        let done: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(
            done["applied"],
            serde_json::json!(["hostname", "ssh-host-keys", "secret"])
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("etc/hostname")).unwrap(),
            "restored-2\n"
        );
        let keys: Vec<HostKey> = get(&agent.addr, "/ssh-host-keys");
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].public_key.ends_with(" new"), "{keys:?}");

        let (status, _) = reidentify(&agent.addr, "old-secret", &body);
        assert_eq!(status, 401, "the snapshot's secret stops working");
        let (status, _) = reidentify(&agent.addr, "new-secret", "{not json");
        assert_eq!(status, 400);
    }
}
