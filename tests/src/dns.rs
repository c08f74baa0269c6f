//! DNS for tests: a tiny client (one real query over UDP or TCP) and a
//! stand-in upstream server.

use std::net::Ipv4Addr;

/// One real DNS query over UDP; returns the response code and A answers.
pub async fn query(
    server: std::net::SocketAddr,
    name: &str,
    qtype: &str,
) -> (String, Vec<Ipv4Addr>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&request(name, qtype), server).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (n, _) = tokio::time::timeout(std::time::Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("DNS server answered within 5s")
        .unwrap();
    outcome(&buf[..n])
}

/// The same query over TCP (two-byte length prefix, RFC 1035 4.2.2).
pub async fn query_tcp(
    server: std::net::SocketAddr,
    name: &str,
    qtype: &str,
) -> (String, Vec<Ipv4Addr>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(server).await.unwrap();
        let req = request(name, qtype);
        let len = u16::try_from(req.len()).unwrap().to_be_bytes();
        conn.write_all(&[&len[..], &req].concat()).await.unwrap();
        let mut len = [0u8; 2];
        conn.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        conn.read_exact(&mut buf).await.unwrap();
        buf
    };
    let buf = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .expect("DNS server answered over TCP within 5s");
    outcome(&buf)
}

fn request(name: &str, qtype: &str) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};

    let rtype = match qtype {
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        other => panic!("{other}"),
    };
    let mut msg = Message::new(0x4242, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    msg.to_vec().unwrap()
}

fn outcome(bytes: &[u8]) -> (String, Vec<Ipv4Addr>) {
    use hickory_proto::op::Message;
    use hickory_proto::rr::RData;

    let resp = Message::from_vec(bytes).unwrap();
    assert_eq!(resp.metadata.id, 0x4242);
    let ips = resp
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    (format!("{:?}", resp.metadata.response_code), ips)
}

/// A stand-in upstream DNS server: hickory-server authoritative for one
/// zone, over UDP and TCP, on its own thread and runtime (optionally inside
/// a network namespace) until dropped.
#[derive(Debug)]
pub struct StandInUpstream {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl StandInUpstream {
    /// Serves `zones` (e.g. `"test."`), each with an SOA and those of
    /// `records` (fully qualified name, A or CNAME target) under it, on
    /// `addr` (port 0 picks one), in the network namespace at `netns` (a
    /// `/run/netns/NAME` path) when given.
    pub fn start(
        addr: std::net::SocketAddr,
        netns: Option<&std::path::Path>,
        zones: &[&str],
        records: &[(&str, Target)],
    ) -> StandInUpstream {
        use std::sync::Arc;

        use hickory_proto::rr::rdata::{A, CNAME, SOA};
        use hickory_proto::rr::{Name, RData, Record};
        use hickory_server::net::runtime::TokioRuntimeProvider;
        use hickory_server::store::in_memory::InMemoryZoneHandler;
        use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

        let mut catalog = Catalog::new();
        for zone in zones {
            let origin = Name::from_ascii(zone).unwrap();
            let mut handler = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
                origin.clone(),
                ZoneType::Primary,
                AxfrPolicy::Deny,
            );
            let soa = SOA::new(
                Name::from_ascii(format!("ns.{zone}")).unwrap(),
                Name::from_ascii(format!("hostmaster.{zone}")).unwrap(),
                1,
                3600,
                600,
                86400,
                30,
            );
            let soa = Record::from_rdata(origin.clone(), 60, RData::SOA(soa));
            assert!(handler.upsert_mut(soa, 1));
            for (name, target) in records {
                let name = Name::from_ascii(name).unwrap();
                if !origin.zone_of(&name) {
                    continue;
                }
                let data = match target {
                    Target::A(ip) => RData::A(A(*ip)),
                    Target::Cname(to) => RData::CNAME(CNAME(Name::from_ascii(to).unwrap())),
                };
                assert!(handler.upsert_mut(Record::from_rdata(name, 60, data), 1));
            }
            catalog.upsert(origin.into(), vec![Arc::new(handler)]);
        }

        let netns = netns.map(|p| p.to_path_buf());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let f = std::fs::File::open(&ns).unwrap();
                // SAFETY: setns only moves this thread, which we own and which
                // only serves the stand-in's answers, into the namespace.
                let rc =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let udp = tokio::net::UdpSocket::bind(addr).await.unwrap();
                let bound = udp.local_addr().unwrap();
                let tcp = tokio::net::TcpListener::bind(bound).await.unwrap();
                let mut server = hickory_server::Server::new(catalog);
                server.register_socket(udp);
                server.register_listener(tcp, std::time::Duration::from_secs(5), 16);
                ready_tx.send(bound).unwrap();
                let _ = stop_rx.await;
                let _ = server.shutdown_gracefully().await;
            });
        });
        let addr = ready_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the stand-in upstream DNS server started");
        StandInUpstream {
            addr,
            stop: Some(stop_tx),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for StandInUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// What a stand-in upstream record points at.
#[derive(Debug, Clone)]
pub enum Target {
    /// An address record.
    A(Ipv4Addr),
    /// An alias to another name.
    Cname(&'static str),
}
