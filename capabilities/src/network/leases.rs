//! The network capability's address leases: each VM's stable IP and MAC on
//! the bridge, kept from its first start until it is deleted. Its own
//! `leases` table in the daemon's database ([`Store::capability_tables`]).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

use banger_api::model::{VmId, now_unix};
use banger_api::net::{MacAddr, Subnet};
use banger_core::store::{Store, StoreError};

/// The owner name of the tables in `cap_schema`.
const OWNER: &str = "network";

/// The capability's migrations. `IF NOT EXISTS`: databases from before
/// capabilities kept their own tables already have this one (core schema
/// step 3), with the same columns and their leases in it.
const MIGRATIONS: &[&str] = &[r"
CREATE TABLE IF NOT EXISTS leases (
    vm_id      TEXT PRIMARY KEY NOT NULL,
    ip         TEXT NOT NULL UNIQUE,
    mac        TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
"];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A lease operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Every address of the bridge subnet is leased.
    #[error(
        "No free address left in subnet {0}; delete unused VMs or widen [network] subnet in the config"
    )]
    SubnetFull(String),
    /// Reading or writing one VM's lease failed.
    #[error("Cannot {op} the network lease of VM {vm_id}")]
    Vm {
        /// What was being done.
        op: &'static str,
        /// The VM.
        vm_id: VmId,
        /// Why.
        #[source]
        source: BoxError,
    },
    /// An operation over every lease failed.
    #[error("Cannot {op} the network leases")]
    All {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The leases table could not be created or a transaction failed.
    #[error("Cannot use the network leases table")]
    Store(#[from] StoreError),
}

/// One VM's address on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The VM holding it.
    pub vm_id: VmId,
    /// Its IPv4 address inside the bridge subnet.
    pub ip: Ipv4Addr,
    /// Its NIC's MAC address.
    pub mac: MacAddr,
}

/// The leases in one database. The table is created on first use.
#[derive(Debug)]
pub struct Leases {
    store: Arc<Store>,
    /// Whether this value made sure the table exists (migrations are
    /// idempotent, so two threads racing to do it is harmless).
    ready: AtomicBool,
}

fn vm_err(op: &'static str, vm_id: &VmId) -> impl FnOnce(rusqlite::Error) -> LeaseError {
    move |e| LeaseError::Vm {
        op,
        vm_id: vm_id.clone(),
        source: Box::new(e),
    }
}

fn decode(vm_id: String, ip: String, mac: String) -> Result<Lease, LeaseError> {
    let id = VmId::from_stored(vm_id);
    let bad = |e: BoxError| LeaseError::Vm {
        op: "decode",
        vm_id: id.clone(),
        source: e,
    };
    let ip = ip.parse().map_err(|e| bad(Box::new(e)))?;
    let mac = mac.parse().map_err(|e| bad(Box::new(e)))?;
    Ok(Lease { vm_id: id, ip, mac })
}

fn get(conn: &Connection, vm_id: &VmId) -> Result<Option<Lease>, LeaseError> {
    let row: Option<(String, String, String)> = conn
        .query_row(
            "SELECT vm_id, ip, mac FROM leases WHERE vm_id = ?1",
            params![vm_id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(vm_err("read", vm_id))?;
    row.map(|(id, ip, mac)| decode(id, ip, mac)).transpose()
}

impl Leases {
    /// The leases kept in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Leases {
            store,
            ready: AtomicBool::new(false),
        }
    }

    fn store(&self) -> Result<&Store, LeaseError> {
        if !self.ready.load(Ordering::Acquire) {
            self.store.capability_tables(OWNER, MIGRATIONS)?;
            self.ready.store(true, Ordering::Release);
        }
        Ok(&self.store)
    }

    /// The VM's lease in `subnet`: the one it has, or the lowest free
    /// address. A lease left over from a different subnet (the config
    /// changed) is replaced. Fails with [`LeaseError::SubnetFull`] when no
    /// address is free.
    pub fn acquire(&self, vm_id: &VmId, subnet: &Subnet) -> Result<Lease, LeaseError> {
        // One IMMEDIATE transaction: two processes cannot pick the same
        // free address.
        self.store()?.with_transaction(|tx| {
            if let Some(lease) = get(tx, vm_id)? {
                if subnet.contains_vm_host(lease.ip) {
                    return Ok(lease);
                }
                tx.execute(
                    "DELETE FROM leases WHERE vm_id = ?1",
                    params![vm_id.as_str()],
                )
                .map_err(vm_err("replace", vm_id))?;
            }
            let taken: HashSet<String> = {
                let mut stmt = tx
                    .prepare("SELECT ip FROM leases")
                    .map_err(vm_err("read", vm_id))?;
                let rows = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(vm_err("read", vm_id))?;
                rows.collect::<Result<_, _>>()
                    .map_err(vm_err("read", vm_id))?
            };
            let ip = subnet
                .vm_hosts()
                .find(|ip| !taken.contains(&ip.to_string()))
                .ok_or_else(|| LeaseError::SubnetFull(subnet.to_string()))?;
            let mac = MacAddr::for_ip(ip);
            tx.execute(
                "INSERT INTO leases (vm_id, ip, mac, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![
                    vm_id.as_str(),
                    ip.to_string(),
                    mac.to_string(),
                    now_unix() as i64
                ],
            )
            .map_err(vm_err("insert", vm_id))?;
            Ok(Lease {
                vm_id: vm_id.clone(),
                ip,
                mac,
            })
        })
    }

    /// The VM's lease, if it has one.
    pub fn get(&self, vm_id: &VmId) -> Result<Option<Lease>, LeaseError> {
        self.store()?.with_connection(|c| get(c, vm_id))
    }

    /// Frees the VM's address for others. Returns whether it had one.
    pub fn release(&self, vm_id: &VmId) -> Result<bool, LeaseError> {
        let n = self
            .store()?
            .with_connection(|c| {
                c.execute(
                    "DELETE FROM leases WHERE vm_id = ?1",
                    params![vm_id.as_str()],
                )
            })
            .map_err(vm_err("release", vm_id))?;
        Ok(n > 0)
    }

    /// Frees leases of VMs that no longer exist (a delete interrupted by a
    /// crash between removing the row and tearing down). Returns how many.
    pub fn prune_orphans(&self) -> Result<usize, LeaseError> {
        self.store()?
            .with_connection(|c| {
                c.execute(
                    "DELETE FROM leases WHERE vm_id NOT IN (SELECT id FROM vms)",
                    [],
                )
            })
            .map_err(|source| LeaseError::All {
                op: "prune",
                source,
            })
    }

    /// Every lease, by address.
    pub fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let all = |source| LeaseError::All { op: "list", source };
        let rows: Vec<(String, String, String)> = self
            .store()?
            .with_connection(|c| {
                let mut stmt = c.prepare("SELECT vm_id, ip, mac FROM leases")?;
                let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                rows.collect::<Result<_, _>>()
            })
            .map_err(all)?;
        let mut out = rows
            .into_iter()
            .map(|(id, ip, mac)| decode(id, ip, mac))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|l| u32::from(l.ip));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(dir: &tempfile::TempDir) -> Leases {
        Leases::new(Arc::new(
            Store::open(&dir.path().join("banger.db")).unwrap(),
        ))
    }

    fn id(s: &str) -> VmId {
        VmId::from_stored(s.to_string())
    }

    #[test]
    fn leases_are_stable_distinct_and_reused_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = leases(&dir);
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        let a = s.acquire(&id("a"), &net).unwrap();
        let b = s.acquire(&id("b"), &net).unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(b.ip, Ipv4Addr::new(172, 30, 0, 3));
        assert_ne!(a.mac, b.mac);
        // Asking again (start after stop) returns the same lease.
        assert_eq!(s.acquire(&id("a"), &net).unwrap(), a);
        // It survives reopening the database.
        drop(s);
        let s = leases(&dir);
        assert_eq!(s.get(&id("a")).unwrap(), Some(a.clone()));
        assert!(s.release(&id("a")).unwrap());
        assert!(!s.release(&id("a")).unwrap());
        assert_eq!(s.get(&id("a")).unwrap(), None);
        // The freed address goes to the next VM.
        assert_eq!(s.acquire(&id("c"), &net).unwrap().ip, a.ip);
        assert_eq!(s.list().unwrap().len(), 2);
    }

    #[test]
    fn pruning_frees_only_leases_of_vms_without_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = leases(&dir);
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        s.store
            .with_connection(|c| {
                c.execute_batch(
                    "INSERT INTO vms (id, name, state, vcpus, memory_mib, disk_size, kernel, \
                     rootfs_source, vmm, booted_once, caps, prepared, created_at, updated_at) \
                     VALUES ('live', 'live', 'stopped', 1, 256, 1, '/k', '/r', 'firecracker', 0, \
                     '[]', '[]', 0, 0)",
                )
            })
            .unwrap();
        s.acquire(&id("live"), &net).unwrap();
        s.acquire(&id("gone"), &net).unwrap();
        assert_eq!(s.prune_orphans().unwrap(), 1);
        let left: Vec<String> = s
            .list()
            .unwrap()
            .into_iter()
            .map(|l| l.vm_id.to_string())
            .collect();
        assert_eq!(left, ["live"]);
    }

    #[test]
    fn a_full_subnet_is_reported_and_a_stale_subnet_lease_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = leases(&dir);
        let tiny: Subnet = "10.0.0.0/30".parse().unwrap(); // one VM address
        s.acquire(&id("a"), &tiny).unwrap();
        let err = s.acquire(&id("b"), &tiny).unwrap_err();
        assert!(matches!(err, LeaseError::SubnetFull(_)), "{err}");
        assert!(err.to_string().contains("10.0.0.0/30"), "{err}");
        // The failed acquire left nothing behind.
        assert_eq!(s.get(&id("b")).unwrap(), None);

        let other: Subnet = "10.9.0.0/24".parse().unwrap();
        let moved = s.acquire(&id("a"), &other).unwrap();
        assert_eq!(moved.ip, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(s.list().unwrap(), vec![moved]);
    }

    #[test]
    fn two_processes_acquiring_at_once_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        // Two connections to one file, as two daemons' (or a daemon's and
        // a test's) would be.
        let start = Arc::new(std::sync::Barrier::new(2));
        let workers: Vec<_> = ["p", "q"]
            .into_iter()
            .map(|who| {
                let s = leases(&dir);
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    (0..100)
                        .map(|i| s.acquire(&id(&format!("{who}{i}")), &net).unwrap().ip)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 200);
        assert_eq!(leases(&dir).list().unwrap().len(), 200);
    }

    /// A database made by the banger before capabilities kept their own
    /// tables: core schema steps 1-3 (the third created `leases`), with a
    /// VM and its lease in it.
    fn previous_schema_database(path: &std::path::Path) {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(
            r"
CREATE TABLE vms (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL,
    vcpus           INTEGER NOT NULL,
    memory_mib      INTEGER NOT NULL,
    disk_size       INTEGER NOT NULL,
    kernel          TEXT NOT NULL,
    initrd          TEXT,
    rootfs_source   TEXT NOT NULL,
    extra_boot_args TEXT,
    vmm             TEXT NOT NULL,
    pid             INTEGER,
    pid_start_time  INTEGER,
    api_socket      TEXT,
    failed_stage    TEXT,
    failure         TEXT,
    failed_at       INTEGER,
    booted_once     INTEGER NOT NULL CHECK (booted_once IN (0, 1)),
    caps            TEXT NOT NULL,
    prepared        TEXT NOT NULL,
    machine         TEXT,
    guest           TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX vms_created ON vms (created_at, name);
CREATE TABLE images (
    name       TEXT PRIMARY KEY NOT NULL,
    rootfs     TEXT NOT NULL,
    record     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE leases (
    vm_id      TEXT PRIMARY KEY NOT NULL,
    ip         TEXT NOT NULL UNIQUE,
    mac        TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
INSERT INTO vms (id, name, state, vcpus, memory_mib, disk_size, kernel, rootfs_source, vmm,
    booted_once, caps, prepared, created_at, updated_at)
    VALUES ('old', 'old', 'stopped', 1, 256, 1, '/k', '/r', 'firecracker', 1, '[]', '[]', 0, 0);
INSERT INTO leases (vm_id, ip, mac, created_at)
    VALUES ('old', '172.30.0.7', '06:00:ac:1e:00:07', 0);
PRAGMA user_version = 3;
",
        )
        .unwrap();
    }

    #[test]
    fn a_database_from_the_previous_schema_keeps_its_leases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("banger.db");
        previous_schema_database(&path);
        let s = Leases::new(Arc::new(Store::open(&path).unwrap()));
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        let kept = Lease {
            vm_id: id("old"),
            ip: Ipv4Addr::new(172, 30, 0, 7),
            mac: "06:00:ac:1e:00:07".parse().unwrap(),
        };
        assert_eq!(s.get(&id("old")).unwrap(), Some(kept.clone()));
        // Its VM keeps the address across a start, nothing is pruned, and
        // a new VM does not get it.
        assert_eq!(s.acquire(&id("old"), &net).unwrap(), kept);
        assert_eq!(s.prune_orphans().unwrap(), 0);
        assert_eq!(
            s.acquire(&id("new"), &net).unwrap().ip,
            Ipv4Addr::new(172, 30, 0, 2)
        );
        assert_eq!(s.list().unwrap().len(), 2);
    }
}
