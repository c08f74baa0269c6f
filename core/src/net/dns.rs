//! The in-daemon DNS server answering `<name>.vm` with the VM's address.
//!
//! Records live in one JSON file, `<state>/dns/records.json`
//! (`{"version":1,"records":{"name":"172.30.0.2"}}`), written atomically by
//! the `dns` capability. The server checks the file's identity (inode, size,
//! mtime) on every query and reloads it when it changed, so a record is
//! answerable as soon as its hook returns, without a signal or a watcher.
//! Anything that is not a live `<name>.vm` gets NXDOMAIN.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use serde::{Deserialize, Serialize};

/// The zone banger answers for.
pub const ZONE: &str = "vm";

/// TTL of answers: short, because VMs come and go.
const TTL: u32 = 5;

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

/// Sets (`Some`) or removes (`None`) the record for `name`, publishing the
/// new file by rename so the server never sees a half-written one.
pub fn set_record(path: &Path, name: &str, ip: Option<Ipv4Addr>) -> Result<(), DnsError> {
    let _guard = WRITE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut records = read_records(path)?;
    let name = name.to_ascii_lowercase();
    let changed = match ip {
        Some(ip) => records.insert(name, ip) != Some(ip),
        None => records.remove(&name).is_some(),
    };
    if !changed {
        return Ok(());
    }
    let err = |source| DnsError::WriteRecords {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let body = serde_json::to_vec_pretty(&RecordsFile {
        version: 1,
        records,
    })
    .map_err(|e| err(e.into()))?;
    let mut tmp = tempfile_in(dir).map_err(err)?;
    use std::io::Write;
    tmp.1.write_all(&body).map_err(err)?;
    tmp.1.sync_all().map_err(err)?;
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

#[derive(Debug)]
struct Handler {
    path: PathBuf,
    cache: Mutex<(Stamp, BTreeMap<String, Ipv4Addr>)>,
}

impl Handler {
    fn lookup(&self, label: &str) -> Option<Ipv4Addr> {
        let now = stamp(&self.path);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.0 != now {
            match read_records(&self.path) {
                Ok(r) => *cache = (now, r),
                // Keep answering from the last good version.
                Err(e) => tracing::warn!("{}", crate::lifecycle::render_chain(&e)),
            }
        }
        cache.1.get(label).copied()
    }

    /// The VM name in `<name>.vm.`, if the query is for one.
    fn vm_label(name: &Name) -> Option<String> {
        let lower = name.to_lowercase().to_ascii();
        let label = lower.strip_suffix(&format!(".{ZONE}."))?;
        (!label.is_empty() && !label.contains('.')).then(|| label.to_string())
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
        meta.authoritative = true;
        meta.recursion_available = false;
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                let resp = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response_handle, resp, &request.metadata).await;
            }
        };
        let qname: Name = info.query.name().into();
        let qtype = info.query.query_type();
        let found = Self::vm_label(&qname).and_then(|l| self.lookup(&l));
        let answers: Vec<Record> = match found {
            Some(ip) if matches!(qtype, RecordType::A | RecordType::ANY) => {
                vec![Record::from_rdata(qname.clone(), TTL, RData::A(A(ip)))]
            }
            // The name exists but has no record of this type: NODATA.
            Some(_) => vec![],
            None => {
                meta.response_code = ResponseCode::NXDomain;
                vec![]
            }
        };
        let resp = builder.build(meta, answers.iter(), [], [], []);
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

/// A non-blocking UDP socket bound to `addr` with `IP_FREEBIND` set.
fn bind_freebind(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

/// A running DNS server. Dropping it stops it (its tasks are aborted).
pub struct DnsServer {
    addrs: Vec<SocketAddr>,
    server: hickory_server::Server<Handler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addrs", &self.addrs)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Serves `records` over UDP on every address in `listen` (port 0 picks
    /// a free port; see [`DnsServer::local_addrs`]). Must run inside a tokio
    /// runtime.
    pub async fn start(records: PathBuf, listen: &[SocketAddr]) -> Result<DnsServer, DnsError> {
        let handler = Handler {
            path: records,
            cache: Mutex::new((None, BTreeMap::new())),
        };
        let mut server = hickory_server::Server::new(handler);
        let mut addrs = Vec::new();
        for addr in listen {
            let bind = |source| DnsError::Bind {
                addr: *addr,
                source,
            };
            let sock = tokio::net::UdpSocket::bind(addr).await.map_err(bind)?;
            addrs.push(sock.local_addr().map_err(bind)?);
            server.register_socket(sock);
        }
        Ok(DnsServer { addrs, server })
    }

    /// Also serves on `addr`; returns the address actually bound. The
    /// address need not exist yet (`IP_FREEBIND`): the daemon listens on the
    /// bridge's address before the bridge is created on first use.
    pub async fn add_listener(&mut self, addr: SocketAddr) -> Result<SocketAddr, DnsError> {
        let bind = |source| DnsError::Bind { addr, source };
        let sock = bind_freebind(addr).map_err(bind)?;
        let local = sock.local_addr().map_err(bind)?;
        self.server.register_socket(sock);
        self.addrs.push(local);
        Ok(local)
    }

    /// The addresses actually bound.
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
        let mut server = DnsServer::start(records_path(dir.path()), &[])
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
    fn only_single_labels_under_vm_are_vm_names() {
        let l = |s: &str| Handler::vm_label(&Name::from_ascii(s).unwrap());
        assert_eq!(l("Web.VM."), Some("web".to_string()));
        assert_eq!(l("a.b.vm."), None);
        assert_eq!(l("vm."), None);
        assert_eq!(l("web.example."), None);
    }
}
