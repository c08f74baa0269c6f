//! The `leases` table: each VM's stable IP and MAC on the bridge, kept from
//! its first start until it is deleted.

use std::net::Ipv4Addr;

use rusqlite::{OptionalExtension, TransactionBehavior, params};

use super::{Store, StoreError};
use crate::model::{VmId, now_unix};
use crate::net::{MacAddr, Subnet};

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

fn lease_err(
    op: &'static str,
    vm_id: &VmId,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Lease {
        op,
        vm_id: vm_id.clone(),
        source: Box::new(e),
    }
}

fn decode(vm_id: String, ip: String, mac: String) -> Result<Lease, StoreError> {
    let id = VmId::from_stored(vm_id);
    let ip = ip.parse().map_err(|e| lease_err("decode", &id, e))?;
    let mac = mac.parse().map_err(|e| lease_err("decode", &id, e))?;
    Ok(Lease { vm_id: id, ip, mac })
}

impl Store {
    /// The VM's lease in `subnet`: the one it has, or the lowest free address.
    /// A lease left over from a different subnet (the config changed) is
    /// replaced. Fails with [`StoreError::SubnetFull`] when no address is free.
    pub fn acquire_lease(&self, vm_id: &VmId, subnet: &Subnet) -> Result<Lease, StoreError> {
        let mut conn = self.lock();
        // IMMEDIATE: take the write lock before reading, so two processes
        // cannot pick the same free address.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| lease_err("begin", vm_id, e))?;
        let existing: Option<(String, String, String)> = tx
            .query_row(
                "SELECT vm_id, ip, mac FROM leases WHERE vm_id = ?1",
                params![vm_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| lease_err("read", vm_id, e))?;
        if let Some((id, ip, mac)) = existing {
            let lease = decode(id, ip, mac)?;
            if subnet.contains_vm_host(lease.ip) {
                return Ok(lease);
            }
            tx.execute(
                "DELETE FROM leases WHERE vm_id = ?1",
                params![vm_id.as_str()],
            )
            .map_err(|e| lease_err("replace", vm_id, e))?;
        }
        let taken: std::collections::HashSet<String> = {
            let mut stmt = tx
                .prepare("SELECT ip FROM leases")
                .map_err(|e| lease_err("read", vm_id, e))?;
            let rows = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(|e| lease_err("read", vm_id, e))?;
            rows.collect::<Result<_, _>>()
                .map_err(|e| lease_err("read", vm_id, e))?
        };
        let ip = subnet
            .vm_hosts()
            .find(|ip| !taken.contains(&ip.to_string()))
            .ok_or_else(|| StoreError::SubnetFull(subnet.to_string()))?;
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
        .map_err(|e| lease_err("insert", vm_id, e))?;
        tx.commit().map_err(|e| lease_err("commit", vm_id, e))?;
        Ok(Lease {
            vm_id: vm_id.clone(),
            ip,
            mac,
        })
    }

    /// The VM's lease, if it has one.
    pub fn get_lease(&self, vm_id: &VmId) -> Result<Option<Lease>, StoreError> {
        let row: Option<(String, String, String)> = self
            .lock()
            .query_row(
                "SELECT vm_id, ip, mac FROM leases WHERE vm_id = ?1",
                params![vm_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| lease_err("read", vm_id, e))?;
        row.map(|(id, ip, mac)| decode(id, ip, mac)).transpose()
    }

    /// Frees the VM's address for others. Returns whether it had one.
    pub fn release_lease(&self, vm_id: &VmId) -> Result<bool, StoreError> {
        let n = self
            .lock()
            .execute(
                "DELETE FROM leases WHERE vm_id = ?1",
                params![vm_id.as_str()],
            )
            .map_err(|e| lease_err("release", vm_id, e))?;
        Ok(n > 0)
    }

    /// Frees leases of VMs that no longer exist (a delete interrupted by a
    /// crash between removing the row and tearing down). Returns how many.
    pub fn prune_orphan_leases(&self) -> Result<usize, StoreError> {
        self.lock()
            .execute(
                "DELETE FROM leases WHERE vm_id NOT IN (SELECT id FROM vms)",
                [],
            )
            .map_err(|e| lease_err("prune", &VmId::from_stored(String::new()), e))
    }

    /// Every lease, by address.
    pub fn list_leases(&self) -> Result<Vec<Lease>, StoreError> {
        let conn = self.lock();
        let all = VmId::from_stored(String::new());
        let mut stmt = conn
            .prepare("SELECT vm_id, ip, mac FROM leases")
            .map_err(|e| lease_err("list", &all, e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| lease_err("list", &all, e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, ip, mac) = row.map_err(|e| lease_err("list", &all, e))?;
            out.push(decode(id, ip, mac)?);
        }
        out.sort_by_key(|l| u32::from(l.ip));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("banger.db")).unwrap()
    }

    fn id(s: &str) -> VmId {
        VmId::from_stored(s.to_string())
    }

    #[test]
    fn leases_are_stable_distinct_and_reused_after_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        let a = s.acquire_lease(&id("a"), &net).unwrap();
        let b = s.acquire_lease(&id("b"), &net).unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(b.ip, Ipv4Addr::new(172, 30, 0, 3));
        assert_ne!(a.mac, b.mac);
        // Asking again (start after stop) returns the same lease.
        assert_eq!(s.acquire_lease(&id("a"), &net).unwrap(), a);
        // It survives reopening the database.
        drop(s);
        let s = store(&dir);
        assert_eq!(s.get_lease(&id("a")).unwrap(), Some(a.clone()));
        assert!(s.release_lease(&id("a")).unwrap());
        assert!(!s.release_lease(&id("a")).unwrap());
        assert_eq!(s.get_lease(&id("a")).unwrap(), None);
        // The freed address goes to the next VM.
        assert_eq!(s.acquire_lease(&id("c"), &net).unwrap().ip, a.ip);
        assert_eq!(s.list_leases().unwrap().len(), 2);
    }

    #[test]
    fn pruning_frees_only_leases_of_vms_without_a_row() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let net: Subnet = "172.30.0.0/24".parse().unwrap();
        s.lock()
            .execute_batch(
                "INSERT INTO vms (id, name, state, vcpus, memory_mib, disk_size, kernel, \
                 rootfs_source, vmm, booted_once, caps, prepared, created_at, updated_at) \
                 VALUES ('live', 'live', 'stopped', 1, 256, 1, '/k', '/r', 'firecracker', 0, \
                 '[]', '[]', 0, 0)",
            )
            .unwrap();
        s.acquire_lease(&id("live"), &net).unwrap();
        s.acquire_lease(&id("gone"), &net).unwrap();
        assert_eq!(s.prune_orphan_leases().unwrap(), 1);
        let left: Vec<String> = s
            .list_leases()
            .unwrap()
            .into_iter()
            .map(|l| l.vm_id.to_string())
            .collect();
        assert_eq!(left, ["live"]);
    }

    #[test]
    fn a_full_subnet_is_reported_and_a_stale_subnet_lease_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir);
        let tiny: Subnet = "10.0.0.0/30".parse().unwrap(); // one VM address
        s.acquire_lease(&id("a"), &tiny).unwrap();
        let err = s.acquire_lease(&id("b"), &tiny).unwrap_err();
        assert!(matches!(err, StoreError::SubnetFull(_)), "{err}");
        assert!(err.to_string().contains("10.0.0.0/30"), "{err}");

        let other: Subnet = "10.9.0.0/24".parse().unwrap();
        let moved = s.acquire_lease(&id("a"), &other).unwrap();
        assert_eq!(moved.ip, Ipv4Addr::new(10, 9, 0, 2));
        assert_eq!(s.list_leases().unwrap(), vec![moved]);
    }
}
