//! Guest isolation and per-VM NAT in nftables, for
//! [`crate::hostops::InProcessHostOps`].
//!
//! Each bridge gets two tables of its own, both named `banger_<bridge>`
//! (see [`table_for`]); banger never touches any other table:
//!
//! - `bridge banger_<bridge>` sees frames between the bridge's ports. Its
//!   `prerouting` base chain jumps to `guests`, where each VM's tap has rules
//!   accepting only its own MAC with its own IPv4 (and ARP for it) and
//!   dropping everything else the tap sends (spoofed addresses, IPv6, VLAN
//!   tags). Its `forward` base chain (port to port: guest to guest) jumps to
//!   `from_guests`, where each VM's tap drops what it sends to another port,
//!   unless both are peers (`peers_to` then accepts). Its `output` base
//!   chain (what the host sends out of a port) jumps to `to_guests`, which
//!   drops packets carrying a guest's source address: traffic a guest sent
//!   to the gateway's MAC that the host routed back onto the bridge.
//! - `ip banger_<bridge>` filters what guests send to the host (`input`:
//!   only DNS on port 53 and replies to connections the host opened) and
//!   what they send through it (`forward`: only VMs with NAT, only to
//!   addresses outside the `deny` set and the host's other bridges, unless
//!   allowed per VM), and masquerades NAT'ed VMs (`postrouting`).
//!   Bridge-to-same-bridge traffic passes `forward`: with `br_netfilter`
//!   loaded, bridged frames between guests show up there too, already
//!   decided by the bridge table.
//!
//! The base chains' rules are fixed and carry [`BASE_TAG`]; each VM's rules
//! live in regular chains the base chains jump to and carry
//! `banger:<vm_id>:guard` or `banger:<vm_id>:nat`, so removal deletes exactly
//! that VM's rules by handle. Each change is one transaction of `nft`
//! script and the ruleset is read back as `nft -j` prints it, both through
//! libnftables in this process ([`libnftables`]), or an `nft` process where
//! the library is missing.
//!
//! `ip_forward` is turned on by the first NAT rule when it was off; the
//! marker table `ip banger_ipforward` records that banger did it, and the
//! last NAT rule's removal (over every `banger_*` table, so every daemon on
//! the host) turns it off again and deletes the marker.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use banger_api::net::MacAddr;
pub use banger_api::net::{Cidr, InvalidCidr};

use crate::error::{HostOpsError, validate_ifname};

/// Every table banger owns starts with this.
pub const TABLE_PREFIX: &str = "banger_";

/// The tag of the base chains' fixed rules; a table without it (new, or
/// made by an older banger) gets its base chains rebuilt.
pub const BASE_TAG: &str = "banger:base:v3";

/// The marker table meaning "banger turned ip_forward on".
pub const FORWARD_MARKER: &str = "banger_ipforward";

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Destinations NAT refuses unless a VM allows them: "this" network,
/// RFC 1918, CGNAT (RFC 6598), loopback, link-local (with the cloud
/// metadata address 169.254.169.254), IETF protocol assignments,
/// benchmarking, multicast and reserved space.
pub const NAT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

/// Serialises base-chain (re)builds and ip_forward bookkeeping in this
/// process, so two VMs starting at once do not build the base twice.
static BASE_LOCK: Mutex<()> = Mutex::new(());

/// Per bridge whose base chains this process has checked or built: the
/// VMs with guard rules in its table, as read then and kept in step by this
/// process's own changes (only this daemon writes its bridge's tables). A
/// guard then reads nothing for a VM without rules (every create) and only
/// its bridge table otherwise, and queues behind no lock. A table deleted
/// behind our back makes the next guard fail; the bridge is then forgotten,
/// its base rebuilt and the guard retried.
///
/// Keyed by the calling thread's network namespace as well: nft talks to
/// that namespace, and one process may serve several (the tests run each
/// "host" in a namespace of its own, with the same bridge and VM names); a
/// cache entry from one namespace must not skip the deletion of a VM's
/// earlier rules in another.
static GUARDED: Mutex<BTreeMap<(u64, String), BTreeSet<String>>> = Mutex::new(BTreeMap::new());

fn guarded() -> std::sync::MutexGuard<'static, BTreeMap<(u64, String), BTreeSet<String>>> {
    GUARDED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cache key of `bridge` in the calling thread's network namespace
/// (its inode; 0 when /proc cannot say, which only merges namespaces that
/// /proc could not tell apart anyway).
fn guarded_key(bridge: &str) -> (u64, String) {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    (ns, bridge.to_string())
}

/// The tables (both families) of the guests behind `bridge`.
pub fn table_for(bridge: &str) -> String {
    let safe: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{TABLE_PREFIX}{safe}")
}

/// The tag of a VM's anti-spoofing and peer rules.
pub fn guard_tag(vm_id: &str) -> String {
    format!("banger:{vm_id}:guard")
}

/// The tag of a VM's NAT rules.
pub fn nat_tag(vm_id: &str) -> String {
    format!("banger:{vm_id}:nat")
}

/// One guest's port on a bridge, as the anti-spoofing rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPort {
    /// The bridge the tap is a port of.
    pub bridge: String,
    /// The VM's tap.
    pub tap: String,
    /// The only IPv4 source the guest may use.
    pub ip: Ipv4Addr,
    /// The only MAC source the guest may use.
    pub mac: MacAddr,
    /// Whether the guest may talk to other guests that also opted in.
    pub peers: bool,
}

pub(crate) fn validate_vm_id(op: &'static str, vm_id: &str) -> Result<(), HostOpsError> {
    if !vm_id.is_empty()
        && vm_id.len() <= 64
        && vm_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{vm_id:?} is not a valid VM id (1-64 of [A-Za-z0-9_-])"),
        })
    }
}

fn invalid(op: &'static str, why: String) -> HostOpsError {
    HostOpsError::InvalidArgument { op, why }
}

/// A unicast, routable guest address: not 0/8, loopback, link-local,
/// multicast or broadcast.
fn validate_guest_ip(op: &'static str, ip: Ipv4Addr) -> Result<(), HostOpsError> {
    let o = ip.octets();
    if o[0] == 0 || ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || o[0] >= 240 {
        return Err(invalid(
            op,
            format!("{ip} is not a guest address (unicast, not loopback or link-local)"),
        ));
    }
    Ok(())
}

fn failed(op: &'static str, target: &str, source: std::io::Error) -> HostOpsError {
    HostOpsError::Failed {
        op,
        target: target.to_string(),
        source,
    }
}

/// nftables in this process: libnftables, the library the `nft` CLI is a
/// thin front end of, opened at run time (`dlopen`), so a change costs a
/// fraction of a millisecond instead of an `nft` process (2-5 ms of exec,
/// dynamic linking and the library's start, per create: issue 12). The
/// same command text, the same parser, one transaction per call, the same
/// output (`-j` is [`NFT_CTX_OUTPUT_JSON`]), the same error text. No
/// build-time dependency: a host without the library gets `None` and the
/// caller runs the `nft` process instead.
///
/// Each call makes a context of its own (a quarter of a millisecond): its
/// netlink socket then belongs to the calling thread's network namespace,
/// as an `nft` process forked from that thread would, and no state is kept
/// between calls. One call at a time in the process: the library's
/// one-time global setup is not thread-safe.
// The library's C calls (dlopen, its functions), each with its SAFETY note.
#[allow(unsafe_code)]
mod libnftables {
    use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
    use std::sync::{Mutex, OnceLock};

    /// The soname of libnftables since 0.9.1, when `nft_run_cmd_from_buffer`
    /// took its current signature.
    const SONAME: &CStr = c"libnftables.so.1";

    /// `NFT_CTX_OUTPUT_JSON` of `<nftables/libnftables.h>`.
    const NFT_CTX_OUTPUT_JSON: c_uint = 1 << 4;

    type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
    type CtxFree = unsafe extern "C" fn(*mut c_void);
    type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
    type CtxBuffer = unsafe extern "C" fn(*mut c_void) -> *const c_char;
    type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
    type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

    /// The library's entry points this module calls. The library is never
    /// closed, so they stay valid for the process's life.
    struct Lib {
        ctx_new: CtxNew,
        ctx_free: CtxFree,
        buffer_output: CtxInt,
        buffer_error: CtxInt,
        output_buffer: CtxBuffer,
        error_buffer: CtxBuffer,
        set_output_flags: SetFlags,
        run_cmd_from_buffer: RunCmd,
    }

    static LIB: OnceLock<Option<Lib>> = OnceLock::new();

    /// One call at a time (see the module docs).
    static CALL: Mutex<()> = Mutex::new(());

    fn load() -> Option<Lib> {
        // SAFETY: a NUL-terminated constant name; RTLD_LOCAL keeps the
        // library's symbols out of everyone else's lookups.
        let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return None;
        }
        // Each symbol as the function type of its field. SAFETY (of the
        // transmute in each use): the symbol is the libnftables function of
        // that name, whose C prototype (libnftables.h, soname 1) the field's
        // type spells out, and a pointer to a function of this library is a
        // valid function pointer on every platform glibc runs on.
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: `handle` is a live handle from dlopen (never closed);
                // the name is NUL-terminated.
                let p = unsafe { libc::dlsym(handle, $name.as_ptr()) };
                if p.is_null() {
                    return None;
                }
                // SAFETY: see above.
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        Some(Lib {
            ctx_new: sym!(c"nft_ctx_new", CtxNew),
            ctx_free: sym!(c"nft_ctx_free", CtxFree),
            buffer_output: sym!(c"nft_ctx_buffer_output", CtxInt),
            buffer_error: sym!(c"nft_ctx_buffer_error", CtxInt),
            output_buffer: sym!(c"nft_ctx_get_output_buffer", CtxBuffer),
            error_buffer: sym!(c"nft_ctx_get_error_buffer", CtxBuffer),
            set_output_flags: sym!(c"nft_ctx_output_set_flags", SetFlags),
            run_cmd_from_buffer: sym!(c"nft_run_cmd_from_buffer", RunCmd),
        })
    }

    /// Whether this process runs nftables through the library.
    #[cfg(test)]
    pub(super) fn available() -> bool {
        LIB.get_or_init(load).is_some()
    }

    /// Runs `commands` (nft's script syntax, one transaction) in the calling
    /// thread's network namespace, printing JSON with `json`: the output, or
    /// the library's error text. `None` when the library is not there.
    pub(super) fn run(commands: &str, json: bool) -> Option<Result<String, String>> {
        let lib = LIB.get_or_init(load).as_ref()?;
        let Ok(text) = CString::new(commands) else {
            return Some(Err("the commands hold a NUL byte".to_string()));
        };
        // The library exits the process when it cannot open its netlink
        // socket (nft_ctx_new's netlink_init_error): try one first, so a
        // missing nf_tables or no free descriptor is an error here instead.
        if let Err(e) = probe_netlink() {
            return Some(Err(format!(
                "Unable to initialize Netlink socket: {e} (is nf_tables available?)"
            )));
        }
        let _one = CALL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `ctx` comes from nft_ctx_new, is checked for NULL, used only
        // on this thread while `_one` is held and freed exactly once, after the
        // last read of its buffers (which it owns; they are copied first).
        unsafe {
            let ctx = (lib.ctx_new)(0);
            if ctx.is_null() {
                return Some(Err("nft_ctx_new failed".to_string()));
            }
            let result = if (lib.buffer_output)(ctx) != 0 || (lib.buffer_error)(ctx) != 0 {
                Err("cannot buffer nftables output".to_string())
            } else {
                if json {
                    (lib.set_output_flags)(ctx, NFT_CTX_OUTPUT_JSON);
                }
                let rc = (lib.run_cmd_from_buffer)(ctx, text.as_ptr());
                if rc == 0 {
                    Ok(owned((lib.output_buffer)(ctx)))
                } else {
                    Err(owned((lib.error_buffer)(ctx)))
                }
            };
            (lib.ctx_free)(ctx);
            Some(result)
        }
    }

    /// Opens and closes a netfilter netlink socket, as nft_ctx_new will.
    fn probe_netlink() -> std::io::Result<()> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned
        // (and closed) by the OwnedFd at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        Ok(())
    }

    /// A copy of a buffer the context owns (NULL is empty).
    ///
    /// # Safety
    /// `p` is NULL or a NUL-terminated string that lives through the call.
    unsafe fn owned(p: *const c_char) -> String {
        if p.is_null() {
            return String::new();
        }
        // SAFETY: the caller's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Runs `commands` (nft's script syntax, one transaction; `json` prints
/// JSON like `nft -j`) in the calling thread's network namespace: in
/// process through libnftables, or an `nft -f -` process on a host without
/// the library.
fn run_nft(commands: &str, json: bool) -> Result<String, std::io::Error> {
    let what = match commands.trim_end().split_once('\n') {
        None => commands.trim_end(),
        Some(_) => "-f -",
    };
    let result = match libnftables::run(commands, json) {
        Some(r) => r,
        None => nft_process(commands, json)?,
    };
    result.map_err(|e| std::io::Error::other(format!("nft {what}: {}", e.trim())))
}

/// [`run_nft`] through an `nft` process: its stdout, or its stderr.
fn nft_process(commands: &str, json: bool) -> Result<Result<String, String>, std::io::Error> {
    let mut cmd = Command::new("nft");
    if json {
        cmd.arg("-j");
    }
    let mut child = cmd
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(e.kind(), "nft not found; install nftables")
            } else {
                e
            }
        })?;
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(commands.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// A rule of one of our tables, by what deleting it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RuleRef {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub comment: String,
}

/// The rules of every `banger_*` table of `family` (`ip`, `bridge`).
fn our_rules(family: &str) -> Result<Vec<RuleRef>, std::io::Error> {
    let json = run_nft(&format!("list ruleset {family}"), true)?;
    Ok(parse_rules(&json))
}

/// The rules of our table `table` of `family` alone.
fn table_rules(family: &str, table: &str) -> Result<Vec<RuleRef>, std::io::Error> {
    let json = run_nft(&format!("list table {family} {table}"), true)?;
    Ok(parse_rules(&json))
}

/// Parses `nft -j list ...` output into the rules of `banger_*` tables.
pub(crate) fn parse_rules(json: &str) -> Vec<RuleRef> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return vec![];
    };
    let Some(items) = v.get("nftables").and_then(|n| n.as_array()) else {
        return vec![];
    };
    items
        .iter()
        .filter_map(|item| item.get("rule"))
        .filter_map(|r| {
            let table = r.get("table")?.as_str()?;
            if !table.starts_with(TABLE_PREFIX) {
                return None;
            }
            Some(RuleRef {
                family: r.get("family")?.as_str()?.to_string(),
                table: table.to_string(),
                chain: r.get("chain")?.as_str()?.to_string(),
                handle: r.get("handle")?.as_u64()?,
                comment: r
                    .get("comment")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
            })
        })
        .collect()
}

fn delete_lines<'a>(rules: impl IntoIterator<Item = &'a RuleRef>) -> String {
    rules
        .into_iter()
        .map(|r| {
            format!(
                "delete rule {} {} {} handle {}\n",
                r.family, r.table, r.chain, r.handle
            )
        })
        .collect()
}

fn nat_deny_elements() -> String {
    NAT_DENY.join(", ")
}

/// The script that (re)builds both tables' base chains for `bridge`,
/// leaving the VMs' chains alone.
pub(crate) fn base_script(bridge: &str) -> String {
    let t = table_for(bridge);
    let deny = nat_deny_elements();
    format!(
        "table bridge {t} {{
  chain prerouting {{ type filter hook prerouting priority -200; policy accept; }}
  chain forward {{ type filter hook forward priority -200; policy accept; }}
  chain output {{ type filter hook output priority -200; policy accept; }}
  chain guests {{ }}
  chain from_guests {{ }}
  chain peers_to {{ }}
  chain to_guests {{ }}
}}
table ip {t} {{
  set deny {{ type ipv4_addr; flags interval; auto-merge; }}
  set bridges {{ type ipv4_addr; flags interval; auto-merge; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain nat_out {{ }}
  chain nat_post {{ }}
}}
flush chain bridge {t} prerouting
flush chain bridge {t} forward
flush chain bridge {t} output
flush chain ip {t} input
flush chain ip {t} forward
flush chain ip {t} postrouting
flush set ip {t} deny
add element ip {t} deny {{ {deny} }}
add rule bridge {t} prerouting jump guests comment \"{BASE_TAG}\"
add rule bridge {t} forward jump from_guests comment \"{BASE_TAG}\"
add rule bridge {t} output jump to_guests comment \"{BASE_TAG}\"
add rule ip {t} input iifname \"{bridge}\" ct state established,related accept comment \"{BASE_TAG}\"
add rule ip {t} input iifname \"{bridge}\" meta l4proto {{ tcp, udp }} th dport 53 accept comment \"{BASE_TAG}\"
add rule ip {t} input iifname \"{bridge}\" drop comment \"{BASE_TAG}\"
add rule ip {t} forward oifname \"{bridge}\" ct state established,related accept comment \"{BASE_TAG}\"
add rule ip {t} forward iifname \"{bridge}\" oifname \"{bridge}\" accept comment \"{BASE_TAG}\"
add rule ip {t} forward iifname \"{bridge}\" jump nat_out comment \"{BASE_TAG}\"
add rule ip {t} forward iifname \"{bridge}\" drop comment \"{BASE_TAG}\"
add rule ip {t} forward oifname \"{bridge}\" drop comment \"{BASE_TAG}\"
add rule ip {t} postrouting iifname \"{bridge}\" oifname != \"{bridge}\" jump nat_post comment \"{BASE_TAG}\"
"
    )
}

/// Makes sure both tables of `bridge` exist with current base chains;
/// returns the rules of every `banger_*` table (both families) as read
/// before any change, for the caller's own bookkeeping.
fn ensure_base(bridge: &str) -> Result<Vec<RuleRef>, std::io::Error> {
    let _guard = BASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut rules = our_rules("ip")?;
    rules.extend(our_rules("bridge")?);
    let t = table_for(bridge);
    let has_base = |family: &str| {
        rules
            .iter()
            .any(|r| r.family == family && r.table == t && r.comment == BASE_TAG)
    };
    if !(has_base("ip") && has_base("bridge")) {
        run_nft(&base_script(bridge), false)?;
    }
    let vms = rules
        .iter()
        .filter(|r| r.family == "bridge" && r.table == t && r.comment.ends_with(":guard"))
        .filter_map(|r| vm_of_tag(&r.comment))
        .map(String::from)
        .collect();
    guarded().insert(guarded_key(bridge), vms);
    Ok(rules)
}

/// Lets only `port`'s own MAC and IPv4 out of its tap (and, with
/// `port.peers`, frames to other peers' taps). Replaces the VM's earlier
/// guard rules in one transaction, so it is idempotent.
pub(crate) fn add_guest(vm_id: &str, port: &GuestPort) -> Result<(), HostOpsError> {
    const OP: &str = "add_guest";
    validate_vm_id(OP, vm_id)?;
    validate_ifname(OP, &port.bridge)?;
    validate_ifname(OP, &port.tap)?;
    validate_guest_ip(OP, port.ip)?;
    if port.mac.0[0] & 1 == 1 || port.mac.0 == [0; 6] {
        return Err(invalid(
            OP,
            format!("{} is not a unicast MAC address", port.mac),
        ));
    }
    let t = table_for(&port.bridge);
    // The usual case: a base already checked, so nothing is serialised,
    // and a VM this process never guarded has no rules to replace.
    let key = guarded_key(&port.bridge);
    let known = guarded().get(&key).map(|vms| vms.contains(vm_id));
    if let Some(had_rules) = known {
        let rules = if had_rules {
            table_rules("bridge", &t)
        } else {
            Ok(Vec::new())
        };
        let applied = rules.and_then(|rules| run_nft(&guard_script(vm_id, port, &rules), false));
        if applied.is_ok() {
            mark_guarded(&port.bridge, vm_id);
            return Ok(());
        }
        guarded().remove(&key);
    }
    let rules = ensure_base(&port.bridge).map_err(|e| failed(OP, vm_id, e))?;
    run_nft(&guard_script(vm_id, port, &rules), false).map_err(|e| failed(OP, vm_id, e))?;
    mark_guarded(&port.bridge, vm_id);
    Ok(())
}

fn mark_guarded(bridge: &str, vm_id: &str) {
    if let Some(vms) = guarded().get_mut(&guarded_key(bridge)) {
        vms.insert(vm_id.to_string());
    }
}

/// The transaction that replaces `vm_id`'s guard rules among `rules` with
/// those for `port`.
fn guard_script(vm_id: &str, port: &GuestPort, rules: &[RuleRef]) -> String {
    let tag = guard_tag(vm_id);
    let t = table_for(&port.bridge);
    let (tap, ip, mac) = (&port.tap, port.ip, port.mac);
    let mut script = delete_lines(rules.iter().filter(|r| r.comment == tag));
    // One transaction, appended in order: each VM's rules stay adjacent,
    // its accepts before its drop.
    script.push_str(&format!(
        "add rule bridge {t} guests iifname \"{tap}\" ether saddr {mac} ip saddr {ip} accept comment \"{tag}\"
add rule bridge {t} guests iifname \"{tap}\" ether saddr {mac} arp saddr ether {mac} arp saddr ip {ip} accept comment \"{tag}\"
add rule bridge {t} guests iifname \"{tap}\" drop comment \"{tag}\"
"
    ));
    if port.peers {
        script.push_str(&format!(
            "add rule bridge {t} from_guests iifname \"{tap}\" jump peers_to comment \"{tag}\"
add rule bridge {t} peers_to oifname \"{tap}\" accept comment \"{tag}\"
"
        ));
    }
    // What the host itself sends out of a port (bridge output) with this
    // guest's source address was routed back from it: a detour around the
    // guest-to-guest rules.
    script.push_str(&format!(
        "add rule bridge {t} from_guests iifname \"{tap}\" drop comment \"{tag}\"
add rule bridge {t} to_guests ip saddr {ip} drop comment \"{tag}\"
"
    ));
    script
}

/// Deletes every rule tagged `tag` in any `banger_*` table of `family`;
/// none is fine.
fn remove_tagged(
    op: &'static str,
    vm_id: &str,
    family: &str,
    tag: &str,
) -> Result<(), HostOpsError> {
    let rules = our_rules(family).map_err(|e| failed(op, vm_id, e))?;
    let script = delete_lines(rules.iter().filter(|r| r.comment == tag));
    if !script.is_empty() {
        run_nft(&script, false).map_err(|e| failed(op, vm_id, e))?;
    }
    Ok(())
}

/// The ids of the VMs with guard or NAT rules in `bridge`'s tables.
pub(crate) fn vms_with_rules(bridge: &str) -> Result<Vec<String>, HostOpsError> {
    const OP: &str = "list_guest_rules";
    validate_ifname(OP, bridge)?;
    let t = table_for(bridge);
    let mut rules = our_rules("ip").map_err(|e| failed(OP, bridge, e))?;
    rules.extend(our_rules("bridge").map_err(|e| failed(OP, bridge, e))?);
    let mut ids: Vec<String> = rules
        .iter()
        .filter(|r| r.table == t)
        .filter_map(|r| vm_of_tag(&r.comment))
        .map(String::from)
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// The VM id in a `banger:<vm_id>:guard|nat` tag.
pub(crate) fn vm_of_tag(tag: &str) -> Option<&str> {
    let rest = tag.strip_prefix("banger:")?;
    let id = rest
        .strip_suffix(":guard")
        .or_else(|| rest.strip_suffix(":nat"))?;
    validate_vm_id("list_guest_rules", id).ok()?;
    Some(id)
}

/// Deletes the VM's guard rules; none is not an error.
pub(crate) fn remove_guest(vm_id: &str) -> Result<(), HostOpsError> {
    const OP: &str = "remove_guest";
    validate_vm_id(OP, vm_id)?;
    // Guard rules live in the bridge family only ([`guard_script`]).
    remove_tagged(OP, vm_id, "bridge", &guard_tag(vm_id))?;
    let (ns, _) = guarded_key("");
    for ((_, _), vms) in guarded().iter_mut().filter(|((n, _), _)| *n == ns) {
        vms.remove(vm_id);
    }
    Ok(())
}

/// Lets `ip` reach beyond `bridge` with its source masqueraded, except
/// [`NAT_DENY`] and the subnets of the host's other bridges, which only
/// `allow` opens. Replaces earlier NAT rules of `vm_id` in one transaction.
pub(crate) fn add_nat(
    vm_id: &str,
    bridge: &str,
    ip: Ipv4Addr,
    allow: &[Cidr],
) -> Result<(), HostOpsError> {
    const OP: &str = "add_nat";
    validate_vm_id(OP, vm_id)?;
    validate_ifname(OP, bridge)?;
    validate_guest_ip(OP, ip)?;
    let rules = ensure_base(bridge).map_err(|e| failed(OP, vm_id, e))?;
    let others = crate::net::netlink::other_bridge_subnets(bridge)?;
    let tag = nat_tag(vm_id);
    let t = table_for(bridge);
    let mut script = delete_lines(rules.iter().filter(|r| r.comment == tag));
    script.push_str(&format!("flush set ip {t} bridges\n"));
    if !others.is_empty() {
        let list: Vec<String> = others.iter().map(Cidr::to_string).collect();
        script.push_str(&format!(
            "add element ip {t} bridges {{ {} }}\n",
            list.join(", ")
        ));
    }
    if !allow.is_empty() {
        let list: Vec<String> = allow.iter().map(Cidr::to_string).collect();
        script.push_str(&format!(
            "add rule ip {t} nat_out ip saddr {ip} ip daddr {{ {} }} accept comment \"{tag}\"\n",
            list.join(", ")
        ));
    }
    script.push_str(&format!(
        "add rule ip {t} nat_out ip saddr {ip} ip daddr != @deny ip daddr != @bridges accept comment \"{tag}\"
add rule ip {t} nat_post ip saddr {ip} masquerade comment \"{tag}\"
"
    ));
    let _guard = BASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    run_nft(&script, false).map_err(|e| failed(OP, vm_id, e))?;
    // Routing between the bridge and the uplink needs forwarding on.
    let was_on = forwarding_on().map_err(|e| failed(OP, IP_FORWARD, e))?;
    if !was_on {
        // Marker first: a crash in between leaves "restore to off" for a
        // value that is still off, which is harmless.
        run_nft(&format!("add table ip {FORWARD_MARKER}"), false)
            .map_err(|e| failed(OP, FORWARD_MARKER, e))?;
        std::fs::write(IP_FORWARD, b"1").map_err(|e| failed(OP, IP_FORWARD, e))?;
    }
    Ok(())
}

fn forwarding_on() -> Result<bool, std::io::Error> {
    Ok(std::fs::read_to_string(IP_FORWARD)?.trim() != "0")
}

/// Deletes every NAT rule of `vm_id`; none is not an error. When no VM of
/// any banger daemon on this host has NAT left and banger turned
/// `ip_forward` on, turns it off again.
pub(crate) fn remove_nat(vm_id: &str) -> Result<(), HostOpsError> {
    const OP: &str = "remove_nat";
    validate_vm_id(OP, vm_id)?;
    let _guard = BASE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let rules = our_rules("ip").map_err(|e| failed(OP, vm_id, e))?;
    let tag = nat_tag(vm_id);
    let script = delete_lines(rules.iter().filter(|r| r.comment == tag));
    if !script.is_empty() {
        run_nft(&script, false).map_err(|e| failed(OP, vm_id, e))?;
    }
    let others_need_it = rules
        .iter()
        .any(|r| r.chain == "nat_post" && r.comment != tag && r.comment.ends_with(":nat"));
    if !others_need_it {
        restore_forwarding().map_err(|e| failed(OP, IP_FORWARD, e))?;
    }
    Ok(())
}

/// Turns `ip_forward` off if the marker says banger turned it on.
fn restore_forwarding() -> Result<(), std::io::Error> {
    match run_nft(&format!("list table ip {FORWARD_MARKER}"), false) {
        Ok(_) => {}
        Err(e) if e.to_string().contains("No such file or directory") => return Ok(()),
        Err(e) => return Err(e),
    }
    std::fs::write(IP_FORWARD, b"0")?;
    run_nft(&format!("delete table ip {FORWARD_MARKER}"), false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_rules_of_our_tables_with_their_comments() {
        let json = r#"{"nftables":[{"metainfo":{"json_schema_version":1}},
          {"table":{"family":"ip","name":"banger_br0","handle":1}},
          {"rule":{"family":"ip","table":"banger_br0","chain":"nat_out","handle":4,"comment":"banger:abc:nat","expr":[]}},
          {"rule":{"family":"bridge","table":"banger_br0","chain":"guests","handle":7,"comment":"banger:abc:guard","expr":[]}},
          {"rule":{"family":"ip","table":"banger_br0","chain":"input","handle":5,"expr":[]}},
          {"rule":{"family":"ip","table":"filter","chain":"forward","handle":9,"comment":"banger:abc:nat","expr":[]}}]}"#;
        let rules = parse_rules(json);
        let got: Vec<(&str, &str, u64, &str)> = rules
            .iter()
            .map(|r| {
                (
                    r.family.as_str(),
                    r.chain.as_str(),
                    r.handle,
                    r.comment.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("ip", "nat_out", 4, "banger:abc:nat"),
                ("bridge", "guests", 7, "banger:abc:guard"),
                ("ip", "input", 5, ""),
            ]
        );
        assert_eq!(
            delete_lines(&rules[..1]),
            "delete rule ip banger_br0 nat_out handle 4\n"
        );
        assert!(parse_rules("not json").is_empty());
    }

    /// Runs `body` on a thread of its own in a fresh network namespace;
    /// false (after a loud SKIP) when that or nftables is missing.
    fn in_netns(test: &str, body: impl FnOnce() + Send + 'static) -> bool {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED {test}: needs root for a network namespace");
            return false;
        }
        if Command::new("nft").arg("-V").output().is_err() || !libnftables::available() {
            eprintln!("SKIPPED {test}: nft or libnftables missing (apt-get install nftables)");
            return false;
        }
        let t = std::thread::spawn(move || {
            // SAFETY: unshare(2) changes only this thread's namespace.
            #[allow(unsafe_code)]
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(unshared, 0, "{}", std::io::Error::last_os_error());
            body();
        });
        if let Err(panic) = t.join() {
            std::panic::resume_unwind(panic);
        }
        true
    }

    fn nft_cli(args: &[&str]) -> std::process::Output {
        Command::new("nft").args(args).output().unwrap()
    }

    #[test]
    fn the_library_changes_and_reads_what_the_nft_cli_does() {
        in_netns(
            "the_library_changes_and_reads_what_the_nft_cli_does",
            || {
                let port = GuestPort {
                    bridge: "bglib0".to_string(),
                    tap: "bglibt0".to_string(),
                    ip: Ipv4Addr::new(10, 62, 0, 2),
                    mac: "06:00:0a:3e:00:02".parse().unwrap(),
                    peers: true,
                };
                let t = table_for(&port.bridge);
                libnftables::run(&base_script(&port.bridge), false)
                    .unwrap()
                    .unwrap();
                libnftables::run(&guard_script("vma", &port, &[]), false)
                    .unwrap()
                    .unwrap();
                // What the library wrote, as the CLI reads it back.
                let cli = nft_cli(&["-j", "list", "table", "bridge", &t]);
                assert!(cli.status.success(), "{cli:?}");
                let by_cli = parse_rules(&String::from_utf8_lossy(&cli.stdout));
                let tagged = by_cli
                    .iter()
                    .filter(|r| r.comment == "banger:vma:guard")
                    .count();
                assert_eq!(tagged, 7, "{by_cli:#?}");
                // And the library's own reading of it is the CLI's.
                let json = run_nft(&format!("list table bridge {t}"), true).unwrap();
                assert_eq!(parse_rules(&json), by_cli);
                // A failure carries nft's own message, as the CLI prints it.
                let err = run_nft("delete table ip banger_bglib_none", false)
                    .unwrap_err()
                    .to_string();
                let cli = nft_cli(&["delete", "table", "ip", "banger_bglib_none"]);
                let cli_err = String::from_utf8_lossy(&cli.stderr);
                assert!(err.contains("No such file or directory"), "{err}");
                assert!(
                    err.ends_with(cli_err.trim()),
                    "library: {err}\nnft: {cli_err}"
                );
                assert!(
                    err.starts_with("nft delete table ip banger_bglib_none: "),
                    "{err}"
                );
                // Removal through the library leaves the table without them.
                let rules = parse_rules(&json);
                libnftables::run(
                    &delete_lines(rules.iter().filter(|r| r.comment == "banger:vma:guard")),
                    false,
                )
                .unwrap()
                .unwrap();
                let cli = nft_cli(&["-j", "list", "table", "bridge", &t]);
                let left = parse_rules(&String::from_utf8_lossy(&cli.stdout));
                assert!(left.iter().all(|r| r.comment == BASE_TAG), "{left:#?}");
                assert_eq!(left.len(), 3, "{left:#?}");
            },
        );
    }

    #[test]
    fn refuses_vm_ids_that_could_escape_the_comment() {
        for bad in ["", "a\"b", "a b", "x;flush ruleset"] {
            assert!(validate_vm_id("t", bad).is_err(), "{bad}");
        }
        assert!(validate_vm_id("t", "0123abcd").is_ok());
    }

    #[test]
    fn vm_ids_come_only_from_vm_tags() {
        assert_eq!(vm_of_tag("banger:0123abcd:guard"), Some("0123abcd"));
        assert_eq!(vm_of_tag("banger:0123abcd:nat"), Some("0123abcd"));
        for other in [
            "banger:base:v3",
            "banger:x y:nat",
            "banger:abc",
            "",
            "other:abc:nat",
        ] {
            assert_eq!(vm_of_tag(other), None, "{other}");
        }
    }

    #[test]
    fn table_names_keep_only_safe_characters() {
        assert_eq!(table_for("banger0"), "banger_banger0");
        assert_eq!(table_for("bg-e2e.0"), "banger_bg_e2e_0");
    }

    #[test]
    fn cidrs_parse_only_in_canonical_form() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert!(c.contains(Ipv4Addr::new(10, 1, 200, 3)));
        assert!(!c.contains(Ipv4Addr::new(10, 2, 0, 1)));
        assert_eq!(
            "192.0.2.7/32".parse::<Cidr>().unwrap().network(),
            Ipv4Addr::new(192, 0, 2, 7)
        );
        for bad in ["10.1.0.1/16", "10.1.0.0", "10.1.0.0/33", "x/8", "::1/64"] {
            let err = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("CIDR"), "{err}");
        }
        assert_eq!(
            Cidr::containing(Ipv4Addr::new(172, 17, 3, 9), 16).to_string(),
            "172.17.0.0/16"
        );
    }

    #[test]
    fn the_deny_list_covers_private_link_local_metadata_and_cgnat() {
        let deny: Vec<Cidr> = NAT_DENY.iter().map(|c| c.parse().unwrap()).collect();
        for ip in [
            "10.0.0.1",
            "172.16.5.5",
            "192.168.1.1",
            "169.254.169.254",
            "127.0.0.1",
            "100.64.0.1",
            "224.0.0.251",
            "255.255.255.255",
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(deny.iter().any(|c| c.contains(ip)), "{ip}");
        }
        for ip in ["1.1.1.1", "198.51.100.2", "100.128.0.1", "172.32.0.1"] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(!deny.iter().any(|c| c.contains(ip)), "{ip}");
        }
    }

    #[test]
    fn guest_addresses_must_be_unicast_and_routable() {
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(
                validate_guest_ip("t", bad.parse().unwrap()).is_err(),
                "{bad}"
            );
        }
        assert!(validate_guest_ip("t", Ipv4Addr::new(172, 30, 0, 2)).is_ok());
    }
}
