//! The in-daemon DNS server: `<name>.vm` from banger's records, every other
//! name forwarded to the host's upstream resolvers.
//!
//! Records live in one JSON file, `<state>/dns/records.json`
//! (`{"version":1,"records":{"name":"172.30.0.2"}}`), written atomically by
//! the `dns` capability. The server checks the file's identity (inode, size,
//! mtime) on every query and reloads it when it changed, so a record is
//! answerable as soon as its hook returns, without a signal or a watcher.
//! A name under `.vm` that is not a live VM gets NXDOMAIN and is never
//! forwarded. Other names go through a hickory resolver to the
//! [`Upstream`] servers (by default the host's `/etc/resolv.conf`, re-read
//! when it changes), minus the server's own listen addresses; an upstream
//! that fails or does not answer within [`FORWARD_DEADLINE`] gives SERVFAIL.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as UpstreamError, NetError};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use serde::{Deserialize, Serialize};

/// The zone banger answers for.
pub const ZONE: &str = "vm";

/// TTL of answers: short, because VMs come and go.
const TTL: u32 = 5;

/// The host's resolver configuration, whose nameservers are the default
/// upstream.
pub const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The longest a forwarded query may take before the client gets SERVFAIL:
/// below the 5 s a glibc stub waits for an answer, so it sees the failure
/// rather than a silence.
pub const FORWARD_DEADLINE: Duration = Duration::from_secs(4);

/// How long one attempt at one upstream server may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// A DNS records or server operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The records file could not be read or parsed.
    #[error("Cannot read DNS records {}", path.display())]
    ReadRecords {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The records file could not be written.
    #[error("Cannot write DNS records {}", path.display())]
    WriteRecords {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A listening socket could not be bound.
    #[error("Cannot listen for DNS on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RecordsFile {
    version: u32,
    records: BTreeMap<String, Ipv4Addr>,
}

/// Where names outside `.vm` are forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The nameservers of this resolv.conf-format file, re-read whenever it
    /// changes (a laptop moving between networks).
    ResolvConf(PathBuf),
    /// Exactly these servers (`dns_upstream` in the config); an empty list
    /// forwards nothing.
    Servers(Vec<SocketAddr>),
}

impl Upstream {
    /// `dns_upstream` when the config sets it, else the host's resolv.conf.
    pub fn from_config(dns_upstream: Option<&[SocketAddr]>) -> Upstream {
        match dns_upstream {
            Some(servers) => Upstream::Servers(servers.to_vec()),
            None => Upstream::ResolvConf(PathBuf::from(HOST_RESOLV_CONF)),
        }
    }
}

/// The nameservers a resolv.conf names, each on port 53.
fn resolv_conf_servers(path: &Path) -> Result<Vec<SocketAddr>, String> {
    let text = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(text)
        .map_err(|e| format!("cannot use {}: {e}", path.display()))?;
    Ok(config
        .name_servers
        .iter()
        .map(|ns| SocketAddr::new(ns.ip, 53))
        .collect())
}

/// Whether a query to `upstream` would reach a socket bound at `own`.
fn is_own(upstream: SocketAddr, own: SocketAddr) -> bool {
    upstream.port() == own.port() && (upstream.ip() == own.ip() || own.ip().is_unspecified())
}

/// `<state>/dns/records.json`.
pub fn records_path(state_dir: &Path) -> PathBuf {
    state_dir.join("dns").join("records.json")
}

/// Reads the records; a missing file means none.
pub fn read_records(path: &Path) -> Result<BTreeMap<String, Ipv4Addr>, DnsError> {
    let err = |source| DnsError::ReadRecords {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let f: RecordsFile = serde_json::from_slice(&bytes).map_err(|e| err(e.into()))?;
            Ok(f.records)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(err(e)),
    }
}

/// Serialises read-modify-write cycles of records files in this process
/// (one daemon owns a state dir, enforced by its pid lock).
static WRITE_LOCK: Mutex<()> = Mutex::new(());

/// Record changes waiting for a write (see [`set_record`]).
static QUEUE: Mutex<Vec<Queued>> = Mutex::new(Vec::new());

/// One waiting change and where its result goes.
struct Queued {
    path: PathBuf,
    name: String,
    ip: Option<Ipv4Addr>,
    result: Arc<Mutex<Option<Result<(), DnsError>>>>,
}

/// Sets (`Some`) or removes (`None`) the record for `name`, publishing the
/// new file by rename so the server never sees a half-written one.
///
/// Group commit: the change is queued, and whoever holds the write lock
/// next applies every queued change of a file with one read, one staged
/// write and one rename, so 32 VMs created at once make a handful of
/// writes instead of 32 in a row (issue 12). Each caller gets its own
/// result; when a shared write fails, each change of it is retried alone.
pub fn set_record(path: &Path, name: &str, ip: Option<Ipv4Addr>) -> Result<(), DnsError> {
    let result = Arc::new(Mutex::new(None));
    lock(&QUEUE).push(Queued {
        path: path.to_path_buf(),
        name: name.to_ascii_lowercase(),
        ip,
        result: result.clone(),
    });
    let _writer = lock(&WRITE_LOCK);
    // The writer before us may have applied ours already; if not, ours is
    // still queued and we apply it, with everything queued behind it.
    if let Some(done) = lock(&result).take() {
        return done;
    }
    let batch = std::mem::take(&mut *lock(&QUEUE));
    apply(batch);
    lock(&result).take().unwrap_or(Ok(()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Applies `batch` file by file, in order; callers hold `WRITE_LOCK`.
fn apply(mut batch: Vec<Queued>) {
    while let Some(first) = batch.first() {
        let path = first.path.clone();
        let (mine, rest): (Vec<Queued>, Vec<Queued>) =
            batch.into_iter().partition(|q| q.path == path);
        batch = rest;
        match change_records(&path, &mine) {
            Ok(()) => mine.iter().for_each(|q| *lock(&q.result) = Some(Ok(()))),
            Err(e) if mine.len() == 1 => *lock(&mine[0].result) = Some(Err(e)),
            Err(_) => {
                for q in &mine {
                    *lock(&q.result) = Some(change_records(&path, std::slice::from_ref(q)));
                }
            }
        }
    }
}

/// One read-modify-write of `path` with every change of `changes`.
fn change_records(path: &Path, changes: &[Queued]) -> Result<(), DnsError> {
    let mut records = read_records(path)?;
    let mut changed = false;
    for q in changes {
        changed |= match q.ip {
            Some(ip) => records.insert(q.name.clone(), ip) != Some(ip),
            None => records.remove(&q.name).is_some(),
        };
    }
    if !changed {
        return Ok(());
    }
    write_records(path, records)
}

/// Makes `records` the whole file (the daemon's start: the records of the
/// VMs running then), returning the names it had and loses (a crash
/// between a VM's stop and its teardown leaves one). A file that cannot be
/// read, such as one a power loss cut short, is replaced all the same.
pub fn replace_records(
    path: &Path,
    records: BTreeMap<String, Ipv4Addr>,
) -> Result<Vec<String>, DnsError> {
    let _guard = lock(&WRITE_LOCK);
    let (old, readable) = match read_records(path) {
        Ok(old) => (old, true),
        Err(e) => {
            tracing::warn!("replacing an unreadable records file: {e}");
            (BTreeMap::new(), false)
        }
    };
    let gone: Vec<String> = old
        .keys()
        .filter(|n| !records.contains_key(*n))
        .cloned()
        .collect();
    if old != records || !readable {
        write_records(path, records)?;
    }
    Ok(gone)
}

/// Publishes `records` at `path` by stage-then-rename. Callers hold
/// `WRITE_LOCK`.
///
/// Not synced: a power loss stops every VM, and the daemon's next start
/// rewrites the file from the running VMs (none) before its server reads
/// it ([`replace_records`]), so a sync here, a journal commit on every VM
/// start and stop, would protect nothing.
fn write_records(path: &Path, records: BTreeMap<String, Ipv4Addr>) -> Result<(), DnsError> {
    let err = |source| DnsError::WriteRecords {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(test)]
    tests::count_write(path);
    let body = serde_json::to_vec_pretty(&RecordsFile {
        version: 1,
        records,
    })
    .map_err(|e| err(e.into()))?;
    let mut tmp = tempfile_in(dir).map_err(err)?;
    use std::io::Write;
    tmp.1.write_all(&body).map_err(err)?;
    std::fs::rename(&tmp.0, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp.0);
        err(e)
    })
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let p = dir.join(format!(
        ".records.json.{}.{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&p)?;
    Ok((p, f))
}

/// What identifies one version of the records file.
type Stamp = Option<(u64, u64, std::time::SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()?))
}

/// The forwarding half: a hickory resolver over the upstream servers, built
/// lazily and rebuilt when the resolv.conf or the server's own addresses
/// change.
struct Forwarder {
    upstream: Upstream,
    state: Mutex<ForwardState>,
}

#[derive(Default)]
struct ForwardState {
    /// The server's own listen addresses: never forwarded to.
    own: Vec<SocketAddr>,
    /// The resolver for one version of the upstream list (`None`: nothing
    /// to forward to), with the stamp of the resolv.conf it came from.
    built: Option<(Stamp, Option<Arc<TokioResolver>>)>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// What the upstream said about a forwarded query.
#[derive(Debug)]
enum Forwarded {
    /// Records (CNAME chain included).
    Answer(Vec<Record>),
    /// NXDOMAIN or NODATA, with the authority records (SOA) that let the
    /// client cache the negative answer.
    Negative(ResponseCode, Vec<Record>),
    /// No upstream, an upstream error, or no answer in time.
    Failed,
}

impl Forwarder {
    fn new(upstream: Upstream) -> Self {
        Forwarder {
            upstream,
            state: Mutex::new(ForwardState::default()),
        }
    }

    /// Never forwards to `addr` (one of the server's own listeners).
    fn exclude(&self, addr: SocketAddr) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.own.push(addr);
        state.built = None;
    }

    /// The resolver for the current upstream list.
    fn resolver(&self) -> Option<Arc<TokioResolver>> {
        let stamp = match &self.upstream {
            Upstream::ResolvConf(path) => stamp(path),
            Upstream::Servers(_) => None,
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_for, resolver)) = &state.built
            && *built_for == stamp
        {
            return resolver.clone();
        }
        let resolver = self.build(&state.own).map(Arc::new);
        state.built = Some((stamp, resolver.clone()));
        resolver
    }

    fn build(&self, own: &[SocketAddr]) -> Option<TokioResolver> {
        let listed = match &self.upstream {
            Upstream::Servers(s) => s.clone(),
            Upstream::ResolvConf(path) => match resolv_conf_servers(path) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("not forwarding DNS queries outside .{ZONE}: {e}");
                    return None;
                }
            },
        };
        let (ours, servers): (Vec<SocketAddr>, Vec<SocketAddr>) = listed
            .into_iter()
            .partition(|u| own.iter().any(|o| is_own(*u, *o)));
        if !ours.is_empty() {
            tracing::info!(?ours, "not forwarding DNS queries to this server itself");
        }
        if self.upstream == Upstream::Servers(vec![]) {
            tracing::info!("dns_upstream = []: names outside .{ZONE} get SERVFAIL");
            return None;
        }
        if servers.is_empty() {
            tracing::warn!(
                upstream = ?self.upstream,
                "no upstream DNS server: names outside .{ZONE} get SERVFAIL; set dns_upstream in [network]"
            );
            return None;
        }
        tracing::info!(?servers, "forwarding DNS queries outside .{ZONE}");
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                for c in &mut ns.connections {
                    c.port = s.port();
                }
                ns
            })
            .collect();
        let mut opts = ResolverOpts::default();
        opts.timeout = ATTEMPT_TIMEOUT;
        opts.attempts = 2;
        // The client asked for this exact name: no search list, no host
        // file, and the CNAME chain kept in the answer as a server must.
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.ndots = 0;
        let config = ResolverConfig::from_parts(None, vec![], name_servers);
        match TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
        {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("cannot forward DNS queries outside .{ZONE}: {e}");
                None
            }
        }
    }

    async fn forward(&self, name: &Name, qtype: RecordType) -> Forwarded {
        let Some(resolver) = self.resolver() else {
            return Forwarded::Failed;
        };
        let lookup = tokio::time::timeout(FORWARD_DEADLINE, resolver.lookup(name.clone(), qtype));
        match lookup.await {
            Ok(Ok(found)) => Forwarded::Answer(found.answers().to_vec()),
            Ok(Err(NetError::Dns(UpstreamError::NoRecordsFound(no)))) => {
                let mut authority: Vec<Record> =
                    no.authorities.as_deref().unwrap_or_default().to_vec();
                if authority.is_empty()
                    && let Some(soa) = no.soa
                {
                    authority.push(soa.into_record_of_rdata());
                }
                match no.response_code {
                    code @ (ResponseCode::NXDomain | ResponseCode::NoError) => {
                        Forwarded::Negative(code, authority)
                    }
                    code => {
                        tracing::debug!("upstream answered {name} {qtype} with {code}");
                        Forwarded::Failed
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!("cannot forward {name} {qtype}: {e}");
                Forwarded::Failed
            }
            Err(_) => {
                tracing::debug!(
                    "no upstream answer for {name} {qtype} within {FORWARD_DEADLINE:?}"
                );
                Forwarded::Failed
            }
        }
    }
}

#[derive(Debug)]
struct Handler {
    path: PathBuf,
    cache: Mutex<(Stamp, BTreeMap<String, Ipv4Addr>)>,
    forwarder: Arc<Forwarder>,
}

impl Handler {
    fn lookup(&self, label: &str) -> Option<Ipv4Addr> {
        let now = stamp(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != now {
            match read_records(&self.path) {
                Ok(r) => *cache = (now, r),
                // Keep answering from the last good version.
                Err(e) => tracing::warn!("{}", banger_core::lifecycle::render_chain(&e)),
            }
        }
        cache.1.get(label).copied()
    }

    /// Whether `name` is `vm.` or under it: answered here, never forwarded.
    fn in_zone(name: &Name) -> bool {
        let lower = name.to_lowercase().to_ascii();
        lower == format!("{ZONE}.") || lower.ends_with(&format!(".{ZONE}."))
    }

    /// The VM name in `<name>.vm.`, if the query is for one.
    fn vm_label(name: &Name) -> Option<String> {
        let lower = name.to_lowercase().to_ascii();
        let label = lower.strip_suffix(&format!(".{ZONE}."))?;
        (!label.is_empty() && !label.contains('.')).then(|| label.to_string())
    }

    /// The answer for `qname` inside `.vm`: the VM's address, NODATA for
    /// another type (and the zone apex), NXDOMAIN for anything else.
    fn answer_locally(&self, qname: &Name, qtype: RecordType) -> (ResponseCode, Vec<Record>) {
        if qname.to_lowercase().to_ascii() == format!("{ZONE}.") {
            return (ResponseCode::NoError, vec![]);
        }
        match Self::vm_label(qname).and_then(|l| self.lookup(&l)) {
            Some(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => (
                ResponseCode::NoError,
                vec![Record::from_rdata(qname.clone(), TTL, RData::A(A(ip)))],
            ),
            // The name exists but has no record of this type: NODATA.
            Some(_) => (ResponseCode::NoError, vec![]),
            None => (ResponseCode::NXDomain, vec![]),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response_handle, resp, &request.metadata).await;
            }
        };
        if request.metadata.op_code != OpCode::Query {
            let resp = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return send(&mut response_handle, resp, &request.metadata).await;
        }
        if info.query.query_class() != DNSClass::IN {
            let resp = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return send(&mut response_handle, resp, &request.metadata).await;
        }
        let qname: Name = info.query.name().into();
        let qtype = info.query.query_type();
        let (answers, authority) = if Self::in_zone(&qname) {
            meta.authoritative = true;
            let (code, answers) = self.answer_locally(&qname, qtype);
            meta.response_code = code;
            (answers, vec![])
        } else {
            match self.forwarder.forward(&qname, qtype).await {
                Forwarded::Answer(answers) => (answers, vec![]),
                Forwarded::Negative(code, authority) => {
                    meta.response_code = code;
                    (vec![], authority)
                }
                Forwarded::Failed => {
                    let resp = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                    return send(&mut response_handle, resp, &request.metadata).await;
                }
            }
        };
        let resp = builder.build(meta, answers.iter(), authority.iter(), [], []);
        send(&mut response_handle, resp, &request.metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    resp: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    req: &Metadata,
) -> ResponseInfo {
    match handle.send_response(resp).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!("cannot send DNS response: {e}");
            let mut meta = Metadata::response_from_request(req);
            meta.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_proto::op::Header {
                metadata: meta,
                counts: Default::default(),
            })
        }
    }
}

/// A non-blocking socket of `kind` bound to `addr` with `IP_FREEBIND` set.
fn bind_freebind(
    addr: SocketAddr,
    kind: nix::sys::socket::SockType,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
    }
    if kind == SockType::Stream {
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    Ok(fd)
}

fn udp_freebind(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let fd = bind_freebind(addr, nix::sys::socket::SockType::Datagram)?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

fn tcp_freebind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use nix::sys::socket::{Backlog, listen};
    let fd = bind_freebind(addr, nix::sys::socket::SockType::Stream)?;
    listen(&fd, Backlog::new(64)?)?;
    tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
}

/// A running DNS server. Dropping it stops it (its tasks are aborted).
pub struct DnsServer {
    addrs: Vec<SocketAddr>,
    server: hickory_server::Server<Handler>,
    forwarder: Arc<Forwarder>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addrs", &self.addrs)
            .field("upstream", &self.forwarder.upstream)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Serves `records`, forwarding other names to `upstream`, over UDP and
    /// TCP on every address in `listen` (port 0 picks a free port; see
    /// [`DnsServer::local_addrs`]). Must run inside a tokio runtime.
    pub async fn start(
        records: PathBuf,
        listen: &[SocketAddr],
        upstream: Upstream,
    ) -> Result<DnsServer, DnsError> {
        let forwarder = Arc::new(Forwarder::new(upstream));
        let handler = Handler {
            path: records,
            cache: Mutex::new((None, BTreeMap::new())),
            forwarder: forwarder.clone(),
        };
        let mut server = DnsServer {
            addrs: Vec::new(),
            server: hickory_server::Server::new(handler),
            forwarder,
        };
        for addr in listen {
            let bind = |source| DnsError::Bind {
                addr: *addr,
                source,
            };
            let sock = tokio::net::UdpSocket::bind(addr).await.map_err(bind)?;
            let local = sock.local_addr().map_err(bind)?;
            server.register(sock, local).await;
        }
        Ok(server)
    }

    /// Also serves on `addr`; returns the address actually bound. The
    /// address need not exist yet (`IP_FREEBIND`): the daemon listens on the
    /// bridge's address before the bridge is created on first use.
    pub async fn add_listener(&mut self, addr: SocketAddr) -> Result<SocketAddr, DnsError> {
        let bind = |source| DnsError::Bind { addr, source };
        let sock = udp_freebind(addr).map_err(bind)?;
        let local = sock.local_addr().map_err(bind)?;
        self.register(sock, local).await;
        Ok(local)
    }

    /// Also serves on sockets bound by someone else: `banger-helper` binds
    /// the bridge's port 53 for a daemon that may not. Returns their address.
    pub async fn add_bound(
        &mut self,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<SocketAddr, DnsError> {
        let local = udp.local_addr().map_err(|source| DnsError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let bind = |source| DnsError::Bind {
            addr: local,
            source,
        };
        udp.set_nonblocking(true).map_err(bind)?;
        tcp.set_nonblocking(true).map_err(bind)?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(bind)?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind)?;
        self.forwarder.exclude(local);
        self.server.register_socket(udp);
        self.server.register_listener(tcp, TCP_IDLE, 32);
        self.addrs.push(local);
        Ok(local)
    }

    /// Serves UDP on `sock` (bound at `local`) and TCP on the same address:
    /// answers too large for a UDP packet come back truncated and the client
    /// retries over TCP. A TCP port another process holds is a warning.
    async fn register(&mut self, sock: tokio::net::UdpSocket, local: SocketAddr) {
        self.forwarder.exclude(local);
        self.server.register_socket(sock);
        match tcp_freebind(local) {
            Ok(listener) => self.server.register_listener(listener, TCP_IDLE, 32),
            Err(e) => tracing::warn!("no .{ZONE} DNS over TCP on {local}: {e}"),
        }
        self.addrs.push(local);
    }

    /// The UDP addresses actually bound (TCP listens on the same ones).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stops serving and waits for the listeners to finish.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes of each records file so far, for the group commit's test.
    static WRITES: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

    pub(super) fn count_write(path: &Path) {
        *lock(&WRITES).entry(path.to_path_buf()).or_default() += 1;
    }

    fn writes(path: &Path) -> usize {
        lock(&WRITES).get(path).copied().unwrap_or(0)
    }

    #[test]
    fn changes_queued_behind_a_write_share_one_write_and_get_their_own_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = records_path(dir.path());
        // A file that cannot be: its directory would be a regular file.
        std::fs::write(dir.path().join("blocker"), b"").unwrap();
        let bad = records_path(&dir.path().join("blocker"));
        set_record(&path, "old", Some(Ipv4Addr::new(172, 30, 1, 1))).unwrap();
        let before = writes(&path);
        let n: u8 = 16;
        let threads: Vec<_> = {
            // Another write is in progress: everything meanwhile queues.
            let _writer = lock(&WRITE_LOCK);
            let threads: Vec<_> = (0..=n)
                .map(|i| {
                    let (path, bad) = (path.clone(), bad.clone());
                    std::thread::spawn(move || match i {
                        0 => set_record(&bad, "lost", Some(Ipv4Addr::new(172, 30, 2, 1))),
                        1 => set_record(&path, "old", None),
                        i => {
                            set_record(&path, &format!("vm{i}"), Some(Ipv4Addr::new(172, 30, 0, i)))
                        }
                    })
                })
                .collect();
            let queued = |want: usize| {
                lock(&QUEUE)
                    .iter()
                    .filter(|q| q.path == path || q.path == bad)
                    .count()
                    == want
            };
            while !queued(usize::from(n) + 1) {
                std::thread::yield_now();
            }
            threads
        };
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        // One write for all of the good file's changes, in order.
        assert_eq!(writes(&path) - before, 1);
        let r = read_records(&path).unwrap();
        assert_eq!(r.len(), usize::from(n) - 1, "{r:?}");
        assert!(!r.contains_key("old"), "{r:?}");
        assert_eq!(r.get("vm7"), Some(&Ipv4Addr::new(172, 30, 0, 7)));
        // The bad file's change failed alone, with its own path named.
        let err = results[0].as_ref().unwrap_err().to_string();
        assert!(err.contains("blocker"), "{err}");
        assert!(results[1..].iter().all(Result::is_ok), "{results:?}");
    }

    #[test]
    fn records_are_set_replaced_and_removed_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = records_path(dir.path());
        assert!(read_records(&path).unwrap().is_empty());
        set_record(&path, "Web", Some(Ipv4Addr::new(172, 30, 0, 2))).unwrap();
        set_record(&path, "db", Some(Ipv4Addr::new(172, 30, 0, 3))).unwrap();
        set_record(&path, "web", Some(Ipv4Addr::new(172, 30, 0, 4))).unwrap();
        let r = read_records(&path).unwrap();
        assert_eq!(r.get("web"), Some(&Ipv4Addr::new(172, 30, 0, 4)));
        assert_eq!(r.len(), 2);
        set_record(&path, "web", None).unwrap();
        set_record(&path, "gone", None).unwrap();
        assert_eq!(
            read_records(&path).unwrap().keys().collect::<Vec<_>>(),
            ["db"]
        );
        // No staging files left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["records.json"]);
    }

    #[tokio::test]
    async fn listens_on_an_address_the_host_does_not_have_yet() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = DnsServer::start(records_path(dir.path()), &[], Upstream::Servers(vec![]))
            .await
            .unwrap();
        // TEST-NET-1: on no interface of any host (the bridge before it exists).
        let absent: SocketAddr = "192.0.2.77:0".parse().unwrap();
        let bound = server.add_listener(absent).await.unwrap();
        assert_eq!(bound.ip(), absent.ip());
        assert_ne!(bound.port(), 0);
        server.shutdown().await;
    }

    #[test]
    fn the_host_resolv_conf_gives_its_nameservers_on_port_53() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("resolv.conf");
        std::fs::write(
            &conf,
            "# generated\nsearch lan\nnameserver 127.0.0.53\nnameserver 2001:db8::53\noptions edns0 trust-ad\n",
        )
        .unwrap();
        let got: Vec<String> = resolv_conf_servers(&conf)
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(got, ["127.0.0.53:53", "[2001:db8::53]:53"]);
        let missing = resolv_conf_servers(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("nope"), "{missing}");
    }

    #[tokio::test]
    async fn never_forwards_to_its_own_listeners() {
        let own: SocketAddr = "10.1.2.1:53".parse().unwrap();
        let other: SocketAddr = "10.1.2.9:53".parse().unwrap();
        assert!(is_own(own, own));
        assert!(!is_own(other, own));
        assert!(!is_own("10.1.2.1:5353".parse().unwrap(), own));
        assert!(is_own(other, "0.0.0.0:53".parse().unwrap()));

        // Only itself listed: nothing to forward to.
        let f = Forwarder::new(Upstream::Servers(vec![own]));
        assert!(f.resolver().is_some(), "not yet known as its own address");
        f.exclude(own);
        assert!(f.resolver().is_none());
        let f = Forwarder::new(Upstream::Servers(vec![own, other]));
        f.exclude(own);
        assert!(f.resolver().is_some());
    }

    #[test]
    fn only_single_labels_under_vm_are_vm_names() {
        let l = |s: &str| Handler::vm_label(&Name::from_ascii(s).unwrap());
        assert_eq!(l("Web.VM."), Some("web".to_string()));
        assert_eq!(l("a.b.vm."), None);
        assert_eq!(l("vm."), None);
        assert_eq!(l("web.example."), None);
        let z = |s: &str| Handler::in_zone(&Name::from_ascii(s).unwrap());
        assert!(z("VM.") && z("a.b.vm.") && z("web.vm."));
        assert!(!z("vm.example.") && !z("novm.") && !z("."));
    }
}
