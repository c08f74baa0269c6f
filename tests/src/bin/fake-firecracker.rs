//! A fake `firecracker` for tests: serves Firecracker's HTTP API on the
//! `--api-sock` Unix socket, validates requests the way the real one does
//! (as far as banger can tell), records every request, and "boots" by
//! printing console lines on stdout, then runs until killed or until the
//! guest is asked to shut down with `SendCtrlAltDel`.
//!
//! Usage: `fake-firecracker --api-sock PATH [other flags, ignored]`.
//!
//! Environment:
//! - `FAKE_FC_RECORD=FILE`: append every request as one JSON line
//!   `{"pid":..,"sock":"..","method":"PUT","path":"/drives/x","body":{..}}`
//!   to FILE (one `O_APPEND` write per line). Default: `<api-sock>.calls.jsonl`.
//! - `FAKE_FC_FAIL="PUT /drives/work"`: that request (method and path) is
//!   answered 400 with a `fault_message` naming it.
//! - `FAKE_FC_EXIT_EARLY=1`: print an error on stderr and exit 1 before binding.
//! - `FAKE_FC_START_DELAY_MS=N`: wait N ms before binding the socket.
//! - `FAKE_FC_EXIT_AFTER_START=N[:MS]`: MS ms (default 300) after
//!   `InstanceStart`, print an error naming the knob on stderr and exit with
//!   status N, as a Firecracker whose guest cannot run does.
//! - `FAKE_FC_IGNORE_CTRLALTDEL=1`: answer `SendCtrlAltDel` with 204 but keep
//!   running (so callers must kill after their grace period).
//! - `FAKE_FC_AGENT=1`: at `InstanceStart`, bind the vsock `uds_path` and act
//!   as a guest agent behind Firecracker's hybrid vsock: `CONNECT 1024\n` is
//!   answered `OK <n>\n`, then `GET /healthz` (version `fake`), `/ports` and
//!   `/ssh-host-keys` (empty lists) are served; other ports get the
//!   connection closed, as Firecracker does when nothing listens. Once
//!   bound it announces itself as the real agent does, on `<uds>_1025`
//!   (best effort).
//!   `POST /reidentify` is recorded like an API call (`"agent": true`, with
//!   its `authorization` header) and answered as applied.
//! - `FAKE_FC_CONSOLE=TEXT`: at `InstanceStart`, TEXT (when not empty) is
//!   printed after the boot lines as one more console line (a guest
//!   agent's `unreachable:` line, say).
//! - `FAKE_FC_HOST_KEYS=FILE`: the fake agent's `/ssh-host-keys` answer is
//!   the JSON array in FILE instead of `[]`, and (a started sshd) `/ports`
//!   lists sshd on TCP 22.
//!
//! Snapshots (`docs/snapshots.md`): `PATCH /vm {"state": "Paused"|"Resumed"}`
//! on a started guest; `PUT /snapshot/create` needs a paused guest and
//! writes `snapshot_path` (JSON: the drives and vsock socket as configured)
//! and `mem_file_path`; `PUT /snapshot/load` is only accepted before any
//! resource but the logger, needs both files, and with `resume_vm` "boots"
//! from them (the fake agent binds the recorded vsock socket in this
//! process's root).
//!
//! Validation, all answered `400 {"fault_message": ...}` like Firecracker:
//! logger `log_path`, boot-source `kernel_image_path`/`initrd_path` and drive
//! `path_on_host` must exist; `InstanceStart` needs boot-source and
//! machine-config and happens once; pre-boot resources are refused after it;
//! `SendCtrlAltDel` needs a running guest. Success is `204 No Content`;
//! `GET /` answers the instance info.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// A path as the jailed firecracker would see it: under
/// `FAKE_FIRECRACKER_ROOT` (set by the tests' fake jailer) when set.
fn in_root(p: &str) -> PathBuf {
    match std::env::var_os("FAKE_FIRECRACKER_ROOT") {
        Some(root) => PathBuf::from(root).join(p.trim_start_matches('/')),
        None => PathBuf::from(p),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut api_sock: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        if a == "--api-sock" {
            api_sock = args.next().map(PathBuf::from);
        } else if let Some(v) = a.strip_prefix("--api-sock=") {
            api_sock = Some(PathBuf::from(v));
        }
    }
    let Some(api_sock) = api_sock else {
        eprintln!("fake-firecracker: missing --api-sock PATH");
        std::process::exit(2);
    };
    if env_flag("FAKE_FC_EXIT_EARLY") {
        eprintln!("fake-firecracker: error: injected early exit (FAKE_FC_EXIT_EARLY)");
        std::process::exit(1);
    }
    if let Some(ms) = std::env::var("FAKE_FC_START_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let listener = match UnixListener::bind(&api_sock) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "fake-firecracker: error: failed to bind {}: {e}",
                api_sock.display()
            );
            std::process::exit(1);
        }
    };
    let record = std::env::var_os("FAKE_FC_RECORD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let mut p = api_sock.clone().into_os_string();
            p.push(".calls.jsonl");
            PathBuf::from(p)
        });
    let server = Arc::new(Server {
        sock: api_sock,
        record,
        fail: std::env::var("FAKE_FC_FAIL").ok(),
        ignore_ctrl_alt_del: env_flag("FAKE_FC_IGNORE_CTRLALTDEL"),
        fake_agent: env_flag("FAKE_FC_AGENT"),
        state: Mutex::new(State::default()),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = Arc::clone(&server);
        std::thread::spawn(move || server.serve(stream));
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

#[derive(Default)]
struct State {
    started: bool,
    boot_source: bool,
    machine_config: bool,
    /// drive_id -> is_root_device, in the order first seen.
    drives: BTreeMap<String, bool>,
    /// The vsock device's host socket, once configured.
    vsock_uds: Option<PathBuf>,
    /// The vsock `uds_path` as the request named it (saved in snapshots).
    vsock_path: Option<String>,
    /// Paused through `PATCH /vm`.
    paused: bool,
}

struct Server {
    sock: PathBuf,
    record: PathBuf,
    fail: Option<String>,
    ignore_ctrl_alt_del: bool,
    fake_agent: bool,
    state: Mutex<State>,
}

/// What to do after answering.
enum After {
    Nothing,
    /// Print the boot console; start the fake agent on this vsock socket.
    Boot(Option<PathBuf>),
    Exit,
}

struct Reply {
    status: u16,
    body: Option<Value>,
    after: After,
}

impl Reply {
    fn ok() -> Self {
        Reply {
            status: 204,
            body: None,
            after: After::Nothing,
        }
    }
    fn json(v: Value) -> Self {
        Reply {
            status: 200,
            body: Some(v),
            after: After::Nothing,
        }
    }
    fn fault(msg: impl Into<String>) -> Self {
        Reply {
            status: 400,
            body: Some(json!({ "fault_message": msg.into() })),
            after: After::Nothing,
        }
    }
}

impl Server {
    /// Serves requests on one connection until it closes (keep-alive aware).
    fn serve(&self, stream: UnixStream) {
        let Ok(read_half) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(read_half);
        let mut out = stream;
        loop {
            let Some((method, path, headers, body)) = read_request(&mut reader) else {
                return;
            };
            self.record(&method, &path, &body);
            let reply = self.handle(&method, &path, &body);
            let close = headers
                .get("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let wrote = write_reply(&mut out, &reply, close);
            match reply.after {
                After::Nothing => {}
                After::Boot(vsock) => {
                    boot_console();
                    if let Some(uds) = vsock.filter(|_| self.fake_agent) {
                        start_fake_agent(&uds);
                    }
                    exit_after_start();
                }
                After::Exit => {
                    println!("fake-firecracker: guest rebooted on Ctrl-Alt-Del, exiting");
                    let _ = std::io::stdout().flush();
                    let _ = std::fs::remove_file(&self.sock);
                    std::process::exit(0);
                }
            }
            if close || wrote.is_err() {
                return;
            }
        }
    }

    fn record(&self, method: &str, path: &str, body: &[u8]) {
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
        };
        let line = json!({
            "pid": std::process::id(),
            "sock": self.sock,
            "method": method,
            "path": path,
            "body": body,
        });
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.record)
        {
            // One write of the whole line: O_APPEND keeps concurrent writers'
            // lines whole.
            Ok(mut f) => {
                if let Err(e) = f.write_all(&bytes) {
                    eprintln!(
                        "fake-firecracker: cannot record to {}: {e}",
                        self.record.display()
                    );
                }
            }
            Err(e) => eprintln!(
                "fake-firecracker: cannot open {}: {e}",
                self.record.display()
            ),
        }
    }

    fn handle(&self, method: &str, path: &str, raw: &[u8]) -> Reply {
        let request = format!("{method} {path}");
        if self.fail.as_deref() == Some(request.as_str()) {
            return Reply::fault(format!("Injected failure for {request} (FAKE_FC_FAIL)"));
        }
        let Ok(mut st) = self.state.lock() else {
            return Reply::fault("Internal error: state lock poisoned");
        };
        if method == "GET" && path == "/" {
            return Reply::json(json!({
                "id": "anonymous-instance",
                "state": if st.started { "Running" } else { "Not started" },
                "vmm_version": "fake",
                "app_name": "Firecracker",
            }));
        }
        if method == "PATCH" && path == "/vm" {
            if !st.started {
                return Reply::fault(
                    "The requested operation is not supported before starting the microVM.",
                );
            }
            let body: Value = serde_json::from_slice(raw).unwrap_or(Value::Null);
            return match str_field(&body, "state") {
                Some("Paused") => {
                    st.paused = true;
                    Reply::ok()
                }
                Some("Resumed") => {
                    st.paused = false;
                    Reply::ok()
                }
                other => Reply::fault(format!("Invalid VM state {other:?}.")),
            };
        }
        if method != "PUT" {
            return Reply::fault(format!(
                "Invalid request method and/or path: {method} {path}."
            ));
        }
        let body: Value = match serde_json::from_slice(raw) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Reply::fault(
                    "An error occurred when deserializing the json body of a request: expected a JSON object.",
                );
            }
        };
        let resource = path.trim_start_matches('/');
        let (kind, id) = match resource.split_once('/') {
            Some((k, i)) => (k, Some(i)),
            None => (resource, None),
        };
        let pre_boot = matches!(
            kind,
            "logger" | "boot-source" | "machine-config" | "drives" | "network-interfaces" | "vsock"
        );
        if pre_boot && st.started {
            return Reply::fault(format!(
                "The requested operation is not supported after starting the microVM: {request}."
            ));
        }
        match (kind, id) {
            ("logger", None) => {
                let Some(p) = str_field(&body, "log_path") else {
                    return Reply::fault("Missing log_path.");
                };
                if !in_root(p).exists() {
                    return Reply::fault(format!(
                        "Failed to open log file {p}: No such file or directory (os error 2)"
                    ));
                }
                Reply::ok()
            }
            ("boot-source", None) => {
                let Some(k) = str_field(&body, "kernel_image_path") else {
                    return Reply::fault("Missing kernel_image_path.");
                };
                if !in_root(k).is_file() {
                    return Reply::fault(format!(
                        "The kernel file cannot be opened: {k}: No such file or directory (os error 2)"
                    ));
                }
                if let Some(i) = str_field(&body, "initrd_path") {
                    if !in_root(i).is_file() {
                        return Reply::fault(format!(
                            "The initrd file cannot be opened: {i}: No such file or directory (os error 2)"
                        ));
                    }
                }
                st.boot_source = true;
                Reply::ok()
            }
            ("machine-config", None) => {
                let vcpus = body.get("vcpu_count").and_then(Value::as_u64);
                let mem = body.get("mem_size_mib").and_then(Value::as_u64);
                match (vcpus, mem) {
                    (Some(v), Some(m)) if (1..=32).contains(&v) && m > 0 => {
                        st.machine_config = true;
                        Reply::ok()
                    }
                    _ => Reply::fault(
                        "The vCPU number is invalid! The number of vCPUs must be between 1 and 32, and memory must be positive.",
                    ),
                }
            }
            ("drives", Some(id)) => {
                if str_field(&body, "drive_id") != Some(id) {
                    return Reply::fault(
                        "The id from the path does not match the id from the body!",
                    );
                }
                let Some(p) = str_field(&body, "path_on_host") else {
                    return Reply::fault("Missing path_on_host.");
                };
                let Some(root) = body.get("is_root_device").and_then(Value::as_bool) else {
                    return Reply::fault("Missing is_root_device.");
                };
                if !in_root(p).exists() {
                    return Reply::fault(format!(
                        "Unable to create the block device: {p}: No such file or directory (os error 2)"
                    ));
                }
                if root && st.drives.iter().any(|(d, r)| *r && d != id) {
                    return Reply::fault("A root block device already exists!");
                }
                st.drives.insert(id.to_owned(), root);
                Reply::ok()
            }
            ("network-interfaces", Some(id)) => {
                if str_field(&body, "iface_id") != Some(id) {
                    return Reply::fault(
                        "The id from the path does not match the id from the body!",
                    );
                }
                if str_field(&body, "host_dev_name").is_none() {
                    return Reply::fault("Missing host_dev_name.");
                }
                Reply::ok()
            }
            ("vsock", None) => {
                let cid = body.get("guest_cid").and_then(Value::as_u64);
                if cid.is_none_or(|c| c < 3) || str_field(&body, "uds_path").is_none() {
                    return Reply::fault(
                        "Invalid vsock config: guest_cid must be >= 3 and uds_path set.",
                    );
                }
                st.vsock_uds = str_field(&body, "uds_path").map(in_root);
                st.vsock_path = str_field(&body, "uds_path").map(str::to_owned);
                Reply::ok()
            }
            ("snapshot", Some("create")) => snapshot_create(&st, &body),
            ("snapshot", Some("load")) => {
                if st.started || st.boot_source || st.machine_config || !st.drives.is_empty() {
                    return Reply::fault(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    );
                }
                let reply = snapshot_load(&body);
                if reply.status == 204 {
                    st.started = true;
                }
                reply
            }
            ("actions", None) => match str_field(&body, "action_type") {
                Some("InstanceStart") => {
                    if st.started {
                        return Reply::fault("The microVM is already running.");
                    }
                    if !st.boot_source {
                        return Reply::fault("Cannot start microvm without kernel configuration.");
                    }
                    if !st.machine_config {
                        return Reply::fault("Cannot start microvm without machine configuration.");
                    }
                    st.started = true;
                    Reply {
                        after: After::Boot(st.vsock_uds.clone()),
                        ..Reply::ok()
                    }
                }
                Some("SendCtrlAltDel") => {
                    if !st.started {
                        return Reply::fault(
                            "The requested operation is not supported before starting the microVM.",
                        );
                    }
                    if self.ignore_ctrl_alt_del {
                        println!(
                            "fake-firecracker: ignoring Ctrl-Alt-Del (FAKE_FC_IGNORE_CTRLALTDEL)"
                        );
                        let _ = std::io::stdout().flush();
                        return Reply::ok();
                    }
                    Reply {
                        after: After::Exit,
                        ..Reply::ok()
                    }
                }
                Some("FlushMetrics") => Reply::ok(),
                other => Reply::fault(format!("Invalid action_type {other:?}.")),
            },
            _ => Reply::fault(format!(
                "Invalid request method and/or path: {method} {path}."
            )),
        }
    }
}

/// `PUT /snapshot/create` on a paused guest.
fn snapshot_create(st: &State, body: &Value) -> Reply {
    if !st.started || !st.paused {
        return Reply::fault("Cannot create a snapshot: the microVM is not paused.");
    }
    if str_field(body, "snapshot_type") != Some("Full") {
        return Reply::fault("Only Full snapshots are supported by this fake.");
    }
    let (Some(state), Some(mem)) = (
        str_field(body, "snapshot_path"),
        str_field(body, "mem_file_path"),
    ) else {
        return Reply::fault("Missing snapshot_path or mem_file_path.");
    };
    let saved = json!({"drives": st.drives, "vsock": st.vsock_path});
    let written = std::fs::write(in_root(state), saved.to_string())
        .and_then(|()| std::fs::write(in_root(mem), b"fake guest memory"));
    match written {
        Ok(()) => Reply::ok(),
        Err(e) => Reply::fault(format!("Cannot write the snapshot files: {e}")),
    }
}

/// `PUT /snapshot/load` on a fresh process.
fn snapshot_load(body: &Value) -> Reply {
    let Some(state) = str_field(body, "snapshot_path") else {
        return Reply::fault("Missing snapshot_path.");
    };
    let backend = body.get("mem_backend");
    let mem = backend.and_then(|b| str_field(b, "backend_path"));
    if backend.and_then(|b| str_field(b, "backend_type")) != Some("File") || mem.is_none() {
        return Reply::fault("mem_backend must be {backend_type: File, backend_path}.");
    }
    let saved: Option<Value> = std::fs::read(in_root(state))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(saved) = saved else {
        return Reply::fault(format!("Cannot load the microVM state from {state}."));
    };
    if mem.is_some_and(|m| !in_root(m).is_file()) {
        return Reply::fault("Cannot open the memory file.");
    }
    let resume = body.get("resume_vm").and_then(Value::as_bool) == Some(true);
    Reply {
        after: if resume {
            After::Boot(str_field(&saved, "vsock").map(in_root))
        } else {
            After::Nothing
        },
        ..Reply::ok()
    }
}

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

/// Binds `uds` and serves each connection as the guest agent would.
fn start_fake_agent(uds: &Path) {
    let listener = match UnixListener::bind(uds) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "fake-firecracker: cannot bind vsock socket {}: {e}",
                uds.display()
            );
            return;
        }
    };
    let booted = std::time::Instant::now();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || serve_agent(stream, booted));
        }
    });
    // The agent announces itself once it listens: Firecracker hands the
    // guest's connection to host port 1025 to `<uds>_1025`.
    let mut ready = uds.as_os_str().to_owned();
    ready.push("_1025");
    if let Ok(mut s) = UnixStream::connect(&ready) {
        let _ = s.write_all(b"READY fake\n");
    }
}

fn serve_agent(stream: UnixStream, booted: std::time::Instant) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    let mut connect = String::new();
    if reader.read_line(&mut connect).is_err() {
        return;
    }
    if connect.trim_end() != "CONNECT 1024" {
        // Nothing listens on that guest port: Firecracker closes the stream.
        return;
    }
    if out.write_all(b"OK 1073741824\n").is_err() {
        return;
    }
    let Some((method, path, headers, body)) = read_request(&mut reader) else {
        return;
    };
    let reply = match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => Reply::json(json!({
            "version": "fake",
            "uptime_secs": booted.elapsed().as_secs(),
        })),
        ("GET", "/ssh-host-keys") => Reply::json(fake_host_keys()),
        ("GET", "/ports") => Reply::json(fake_listeners()),
        ("POST", "/reidentify") => {
            record_agent_call(&method, &path, headers.get("authorization"), &body);
            Reply::json(json!({"applied": ["hostname", "secret"]}))
        }
        _ => Reply {
            status: 404,
            ..Reply::fault(format!("no route {method} {path}"))
        },
    };
    let _ = write_reply(&mut out, &reply, true);
}

/// Appends an agent request to `FAKE_FC_RECORD`, as [`Server::record`]
/// does for API calls.
fn record_agent_call(method: &str, path: &str, auth: Option<&String>, body: &[u8]) {
    let Some(record) = std::env::var_os("FAKE_FC_RECORD") else {
        return;
    };
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let line = json!({
        "pid": std::process::id(),
        "agent": true,
        "method": method,
        "path": path,
        "authorization": auth,
        "body": body,
    });
    let mut bytes = line.to_string().into_bytes();
    bytes.push(b'\n');
    let written = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record)
        .and_then(|mut f| f.write_all(&bytes));
    if let Err(e) = written {
        eprintln!("fake-firecracker: cannot record the agent call: {e}");
    }
}

/// The agent's host keys: the JSON array in `FAKE_FC_HOST_KEYS`'s file, or
/// none (sshd not started yet).
fn fake_host_keys() -> Value {
    std::env::var_os("FAKE_FC_HOST_KEYS")
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!([]))
}

/// With host keys the fake guest's sshd runs: one listener on 22, as the
/// real agent reports it. Without, nothing listens.
fn fake_listeners() -> Value {
    let keys = fake_host_keys();
    if keys.as_array().is_some_and(|k| !k.is_empty()) {
        json!([{"proto": "tcp", "address": "0.0.0.0", "port": 22, "pid": 200,
                "process": "sshd", "command": "sshd: /usr/sbin/sshd -D"}])
    } else {
        json!([])
    }
}

/// `FAKE_FC_EXIT_AFTER_START=N[:MS]`: exits with N, MS ms from now.
fn exit_after_start() {
    let Ok(v) = std::env::var("FAKE_FC_EXIT_AFTER_START") else {
        return;
    };
    let (code, ms) = v.split_once(':').unwrap_or((v.as_str(), "300"));
    let code: i32 = code.parse().unwrap_or(1);
    let ms: u64 = ms.parse().unwrap_or(300);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(ms));
        eprintln!(
            "fake-firecracker: error: KVM_EXIT_INTERNAL_ERROR, exiting with {code} (FAKE_FC_EXIT_AFTER_START)"
        );
        std::process::exit(code);
    });
}

fn boot_console() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "fake-firecracker: Linux version 6.1.0-fake (banger tests)"
    );
    let _ = writeln!(out, "fake-firecracker: Run /init as init process");
    let _ = writeln!(out, "fake-firecracker: guest booted");
    if let Some(line) = std::env::var("FAKE_FC_CONSOLE")
        .ok()
        .filter(|l| !l.is_empty())
    {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

type Request = (String, String, BTreeMap<String, String>, Vec<u8>);

/// Reads one request; `None` on end of stream or a malformed request.
fn read_request(r: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body).ok()?;
    Some((method, path, headers, body))
}

fn write_reply(out: &mut impl Write, reply: &Reply, close: bool) -> std::io::Result<()> {
    let reason = match reply.status {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let conn = if close { "close" } else { "keep-alive" };
    let mut msg = format!(
        "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: {conn}\r\n",
        reply.status
    );
    match &reply.body {
        Some(b) => {
            let b = b.to_string();
            msg.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        }
        None => msg.push_str("\r\n"),
    }
    out.write_all(msg.as_bytes())?;
    out.flush()
}
