//! `ports`: host ports forwarded to the guest (`-p [HOST_IP:]HOST_PORT:GUEST_PORT[/udp]`),
//! by a userspace proxy in the daemon. The forwards are the capability's
//! `forward` option, stored with the VM. PrepareHost checks that every host
//! port is free (so a taken port refuses the start before the VMM boots),
//! PostStart opens the listeners, Teardown closes them; `daemon_start`
//! reopens them for VMs that outlived the last daemon. PostStart
//! reconciles: it opens what the options list and is not open, and closes
//! what is open and no longer listed, which is how `vm port add/rm` change
//! a running VM.
//!
//! A proxy rather than nftables DNAT: it works the same for a root daemon
//! and an unprivileged one (no helper request), and for 127.0.0.1, which
//! DNAT cannot reach without `route_localnet`.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_api::api::{PortForward, Proto, forwards_of};
use banger_api::model::{CapOptions, EnabledCap, VmId, VmRecord};
use banger_core::capability::{
    BuiltinCapability, CapEnv, CapError, Capability, DaemonCtx, HookCtx, Manifest, TeardownReason,
};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio::task::{JoinHandle, JoinSet};

use crate::network::{HostNetwork, host_network};

use banger_api::api::FORWARD_OPTION;
pub use banger_api::api::PORTS_CAP as NAME;

/// How long a connection to the guest may take before the client is
/// dropped (the guest is down or nothing listens there).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP client's session (its own socket towards the guest) ends after
/// this long without a datagram either way.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Most UDP clients served at once per forward; datagrams from further
/// clients are dropped until a session ends.
const UDP_MAX_SESSIONS: usize = 256;

/// The forwards in a VM's `ports` options.
pub fn forward_option(options: &CapOptions) -> Result<Vec<PortForward>, CapError> {
    if let Some(k) = options.keys().find(|k| *k != FORWARD_OPTION) {
        return Err(CapError::InvalidOptions(format!(
            "unknown option {k:?}: {NAME} takes forward=[HOST_IP:]HOST_PORT:GUEST_PORT[/udp][,...] (or use -p on vm create/run)"
        )));
    }
    let cap = EnabledCap {
        name: NAME.to_string(),
        options: options.clone(),
    };
    forwards_of(&[cap]).map_err(|e| CapError::InvalidOptions(e.to_string()))
}

/// One open forward: its serving task, which owns the listening socket.
#[derive(Debug)]
struct Open {
    forward: PortForward,
    task: JoinHandle<()>,
}

/// The port forwarding capability.
#[derive(Debug)]
pub struct Ports {
    net: Arc<HostNetwork>,
    open: Mutex<HashMap<VmId, Vec<Open>>>,
}

impl Ports {
    /// A capability that forwards to the addresses `net` leases.
    pub fn with(net: Arc<HostNetwork>) -> Self {
        Ports {
            net,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The VM's address, which the forwards connect to.
    fn guest_ip(&self, vm: &VmRecord) -> Result<Ipv4Addr, CapError> {
        let lease = self
            .net
            .leases()
            .get(&vm.id)
            .map_err(|e| CapError::with("Cannot read the VM's address", e))?;
        lease.map(|l| l.ip).ok_or_else(|| {
            CapError::msg(format!(
                "VM {} has no address to forward ports to: port forwarding needs the network capability (add --cap network)",
                vm.name
            ))
        })
    }

    /// Makes the VM's open forwards exactly `want`: binds the new ones
    /// first (all or none: a port in use fails with nothing changed), then
    /// closes the ones no longer wanted and starts serving the new.
    fn reconcile(
        &self,
        rt: &Handle,
        vm: &VmRecord,
        want: &[PortForward],
        log: &dyn Fn(String),
    ) -> Result<(), CapError> {
        let guest = if want.is_empty() {
            Ipv4Addr::UNSPECIFIED
        } else {
            self.guest_ip(vm)?
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let have = open.remove(&vm.id).unwrap_or_default();
        let (keep, close): (Vec<Open>, Vec<Open>) =
            have.into_iter().partition(|o| want.contains(&o.forward));
        let new: Vec<PortForward> = want
            .iter()
            .filter(|f| !keep.iter().any(|o| o.forward == **f))
            .copied()
            .collect();
        // A forward being closed may hold the port a new one wants (rm then
        // add of the same host port): close first in that case.
        let (close_first, close_later): (Vec<Open>, Vec<Open>) = close
            .into_iter()
            .partition(|o| new.iter().any(|f| f.clashes(&o.forward)));
        close_all(rt, close_first);
        let bound = match new
            .iter()
            .map(|f| Bound::bind(f).map(|b| (*f, b)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(b) => b,
            Err(e) => {
                // Nothing new listens; what was open stays open.
                let mut back = keep;
                back.extend(close_later);
                if !back.is_empty() {
                    open.insert(vm.id.clone(), back);
                }
                return Err(e);
            }
        };
        close_all(rt, close_later);
        let mut now = keep;
        for (forward, bound) in bound {
            let to = SocketAddrV4::new(guest, forward.guest_port);
            let task = bound.serve(rt, to)?;
            log(format!(
                "forwarding {}:{}/{} to {to}",
                forward.host_ip, forward.host_port, forward.proto
            ));
            now.push(Open { forward, task });
        }
        if !now.is_empty() {
            open.insert(vm.id.clone(), now);
        }
        Ok(())
    }

    /// Closes every forward of `vm`.
    fn close_vm(&self, rt: Option<&Handle>, vm: &VmId) {
        let gone = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.remove(vm).unwrap_or_default()
        };
        match rt {
            Some(rt) => close_all(rt, gone),
            None => gone.iter().for_each(|o| o.task.abort()),
        }
    }

    /// The host ports `vm` has open now (for tests and diagnostics).
    pub fn open_forwards(&self, vm: &VmId) -> Vec<PortForward> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(vm)
            .map(|v| v.iter().map(|o| o.forward).collect())
            .unwrap_or_default()
    }
}

/// Stops the serving tasks and waits until each has dropped its socket,
/// so the port is closed when this returns.
fn close_all(rt: &Handle, gone: Vec<Open>) {
    for o in &gone {
        o.task.abort();
    }
    for o in gone {
        let _ = rt.block_on(o.task);
    }
}

/// The runtime hooks spawn onto: the daemon runs hooks on its blocking
/// threads, which are inside its runtime.
fn runtime() -> Result<Handle, CapError> {
    Handle::try_current()
        .map_err(|e| CapError::with("Port forwarding needs the daemon's runtime", e))
}

/// A host socket bound for one forward, not yet served.
enum Bound {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl Bound {
    fn bind(f: &PortForward) -> Result<Bound, CapError> {
        let addr = SocketAddrV4::new(f.host_ip, f.host_port);
        let r = match f.proto {
            Proto::Tcp => std::net::TcpListener::bind(addr).map(Bound::Tcp),
            Proto::Udp => std::net::UdpSocket::bind(addr).map(Bound::Udp),
        };
        r.map_err(|e| bind_error(f, e))
    }

    /// Starts serving on `rt`, proxying to `to`.
    fn serve(self, rt: &Handle, to: SocketAddrV4) -> Result<JoinHandle<()>, CapError> {
        let _entered = rt.enter();
        let nonblocking = |e| CapError::with("Cannot make the forward's socket non-blocking", e);
        Ok(match self {
            Bound::Tcp(l) => {
                l.set_nonblocking(true).map_err(nonblocking)?;
                let l = TcpListener::from_std(l).map_err(nonblocking)?;
                rt.spawn(serve_tcp(l, to))
            }
            Bound::Udp(s) => {
                s.set_nonblocking(true).map_err(nonblocking)?;
                let s = UdpSocket::from_std(s).map_err(nonblocking)?;
                rt.spawn(serve_udp(Arc::new(s), to))
            }
        })
    }
}

/// Names the host port and what to do about it.
fn bind_error(f: &PortForward, e: io::Error) -> CapError {
    let at = format!("{}:{}/{}", f.host_ip, f.host_port, f.proto);
    let hint = match e.kind() {
        io::ErrorKind::AddrInUse => format!(
            "Host port {at} is already in use (forward {f}): pick another HOST_PORT, or stop what listens there (`ss -lnp 'sport = :{}'`)",
            f.host_port
        ),
        io::ErrorKind::PermissionDenied => format!(
            "Cannot listen on host port {at} (forward {f}): ports below 1024 need a root daemon; pick a HOST_PORT of 1024 or more"
        ),
        io::ErrorKind::AddrNotAvailable => format!(
            "Cannot listen on host port {at} (forward {f}): {} is not an address of this host; use 127.0.0.1 or 0.0.0.0",
            f.host_ip
        ),
        _ => format!("Cannot listen on host port {at} (forward {f})"),
    };
    CapError::with(hint, e)
}

/// Accepts clients and joins each to a new connection to the guest.
/// Aborting the task drops the listener and every connection it holds.
async fn serve_tcp(listener: TcpListener, to: SocketAddrV4) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    conns.spawn(proxy_tcp(client, to));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!("port forward to {to}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn proxy_tcp(mut client: TcpStream, to: SocketAddrV4) {
    let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to)).await;
    match upstream {
        Ok(Ok(mut guest)) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        }
        Ok(Err(e)) => tracing::debug!("port forward: cannot connect to {to}: {e}"),
        Err(_) => tracing::debug!("port forward: no answer from {to} in {CONNECT_TIMEOUT:?}"),
    }
}

/// One UDP client: its socket towards the guest and when it last spoke.
struct Session {
    upstream: Arc<UdpSocket>,
    last: Arc<Mutex<tokio::time::Instant>>,
}

/// Relays datagrams: each client address gets its own socket towards the
/// guest (so replies find their way back), ended after [`UDP_IDLE`].
async fn serve_udp(host: Arc<UdpSocket>, to: SocketAddrV4) {
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut replies: JoinSet<SocketAddr> = JoinSet::new();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            got = host.recv_from(&mut buf) => {
                let Ok((n, client)) = got else { continue };
                if !sessions.contains_key(&client) {
                    if sessions.len() >= UDP_MAX_SESSIONS {
                        continue;
                    }
                    let Ok(s) = open_session(to).await else { continue };
                    replies.spawn(relay_replies(host.clone(), client, s.upstream.clone(), s.last.clone()));
                    sessions.insert(client, s);
                }
                if let Some(s) = sessions.get(&client) {
                    *s.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                    let _ = s.upstream.send(&buf[..n]).await;
                }
            }
            Some(Ok(client)) = replies.join_next(), if !replies.is_empty() => {
                sessions.remove(&client);
            }
        }
    }
}

async fn open_session(to: SocketAddrV4) -> io::Result<Session> {
    let upstream = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).await?;
    upstream.connect(to).await?;
    Ok(Session {
        upstream: Arc::new(upstream),
        last: Arc::new(Mutex::new(tokio::time::Instant::now())),
    })
}

/// Sends the guest's datagrams back to `client` until the session has
/// been idle for [`UDP_IDLE`]; returns the client to forget.
async fn relay_replies(
    host: Arc<UdpSocket>,
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
    last: Arc<Mutex<tokio::time::Instant>>,
) -> SocketAddr {
    let mut buf = vec![0u8; 65536];
    loop {
        let since = *last.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = since + UDP_IDLE;
        match tokio::time::timeout_at(deadline, upstream.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                *last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
                let _ = host.send_to(&buf[..n], client).await;
            }
            // ICMP port unreachable from the guest surfaces here; the
            // client may try again.
            Ok(Err(_)) => {}
            Err(_) => {
                let idle = *last.lock().unwrap_or_else(|p| p.into_inner()) + UDP_IDLE;
                if idle <= tokio::time::Instant::now() {
                    return client;
                }
            }
        }
    }
}

fn make(env: &CapEnv<'_>) -> Result<Arc<dyn Capability>, CapError> {
    Ok(Arc::new(Ports::with(host_network(env))))
}

inventory::submit! { BuiltinCapability { make } }

impl Capability for Ports {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Host ports forwarded to the VM while it runs (-p [HOST_IP:]HOST_PORT:GUEST_PORT[/udp], host side 127.0.0.1 unless named)"
    }

    fn manifest(&self) -> Manifest {
        // The address it forwards to is the network capability's lease.
        Manifest {
            after: vec![crate::network::NAME.to_string()],
            ..Manifest::default()
        }
    }

    fn validate_options(&self, options: &CapOptions) -> Result<(), CapError> {
        forward_option(options).map(|_| ())
    }

    /// Refuses the start, before the VMM boots, when a host port is taken
    /// (by another program or another VM) or the VM has no address.
    fn prepare_host(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let want = forward_option(ctx.options)?;
        if want.is_empty() {
            return Ok(());
        }
        self.guest_ip(ctx.vm)?;
        let open = self.open_forwards(&ctx.vm.id);
        for f in want.iter().filter(|f| !open.contains(f)) {
            drop(Bound::bind(f)?);
        }
        Ok(())
    }

    fn post_start(&self, ctx: &HookCtx<'_>) -> Result<(), CapError> {
        let want = forward_option(ctx.options)?;
        let rt = runtime()?;
        self.reconcile(&rt, ctx.vm, &want, &|m| ctx.log.info(&m))
    }

    fn teardown(&self, ctx: &HookCtx<'_>, _reason: TeardownReason) -> Result<(), CapError> {
        self.close_vm(runtime().ok().as_ref(), &ctx.vm.id);
        Ok(())
    }

    fn daemon_start(&self, ctx: &DaemonCtx<'_>) -> Result<(), CapError> {
        let mut failed = Vec::new();
        for running in ctx.running {
            let vm = &running.vm;
            let want = match forwards_of(&vm.caps) {
                Ok(w) if w.is_empty() => continue,
                Ok(w) => w,
                Err(e) => {
                    failed.push(format!("{}: {e}", vm.name));
                    continue;
                }
            };
            let log = |m: String| tracing::info!(vm = %vm.name, cap = NAME, "{m}");
            if let Err(e) = self.reconcile(&ctx.runtime, vm, &want, &log) {
                failed.push(format!(
                    "{}: {}",
                    vm.name,
                    banger_core::lifecycle::render_chain(&e)
                ));
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CapError::msg(format!(
                "Cannot reopen the port forwards of running VMs: {}",
                failed.join("; ")
            )))
        }
    }

    fn daemon_stop(&self, ctx: &DaemonCtx<'_>) {
        let vms: Vec<VmId> = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.keys().cloned().collect()
        };
        for vm in vms {
            self.close_vm(Some(&ctx.runtime), &vm);
        }
    }
}
