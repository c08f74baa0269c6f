//! A warm pool of tap devices (`bg<id>t0`, `bg<id>t1`, ..., the prefix
//! being this daemon's, see [`super::identity`]), already attached to the
//! bridge and up, so starting a VM does not wait for link setup. A VM takes
//! one at PrepareHost and gives it back when it stops.
//!
//! Every index is reserved under the pool's lock before its tap is made,
//! so two VMs (or a VM and the warm-up) never make the same tap, and a
//! failed make only ever deletes the tap it reserved. Names without this
//! daemon's prefix are never adopted, kept or deleted.

use std::collections::BTreeSet;
use std::sync::Mutex;

use banger_host::hostops::{HostOps, HostOpsError};

/// Free taps the pool keeps ready by default.
pub const DEFAULT_WARM: usize = 2;

#[derive(Debug, Default)]
struct Taps {
    /// Ready, attached, up, unused.
    free: BTreeSet<u32>,
    /// Handed to a VM (or being made for one).
    used: BTreeSet<u32>,
    /// Being made for the warm pool.
    pending: BTreeSet<u32>,
}

impl Taps {
    /// Reserves the lowest index nobody has.
    fn reserve(&mut self, for_vm: bool) -> u32 {
        let i = (0..)
            .find(|i| !self.free.contains(i) && !self.used.contains(i) && !self.pending.contains(i))
            .unwrap_or(0);
        if for_vm {
            self.used.insert(i);
        } else {
            self.pending.insert(i);
        }
        i
    }
}

/// The pool. Its bookkeeping is in memory: after a daemon restart, call
/// [`TapPool::mark_in_use`] with the taps of VMs that are still running.
#[derive(Debug)]
pub struct TapPool {
    prefix: String,
    bridge: String,
    owner_uid: u32,
    warm: usize,
    taps: Mutex<Taps>,
}

/// A tap name that is not this daemon's.
#[derive(Debug, thiserror::Error)]
#[error("Tap {name:?} is not this daemon's (its taps are named {prefix}<N>); leaving it alone")]
pub struct ForeignTap {
    /// The name.
    pub name: String,
    /// This daemon's prefix.
    pub prefix: String,
}

impl TapPool {
    /// A pool of taps named `prefix<N>`, owned by `owner_uid` (who runs the
    /// VMM) on `bridge`, keeping `warm` free taps ready.
    pub fn new(prefix: &str, bridge: &str, owner_uid: u32, warm: usize) -> Self {
        TapPool {
            prefix: prefix.to_string(),
            bridge: bridge.to_string(),
            owner_uid,
            warm,
            taps: Mutex::new(Taps::default()),
        }
    }

    /// The prefix of this pool's taps.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn name(&self, i: u32) -> String {
        format!("{}{i}", self.prefix)
    }

    /// The index of `name` if it is one of this pool's.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.prefix)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        digits.parse().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taps> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records taps that running VMs already hold, so they are not handed
    /// out; names that are not this pool's are ignored.
    pub fn mark_in_use<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let indexes: Vec<u32> = names.into_iter().filter_map(|n| self.index_of(n)).collect();
        let mut t = self.lock();
        for i in indexes {
            t.free.remove(&i);
            t.used.insert(i);
        }
    }

    /// Also resets the owner of an existing tap to `owner_uid`: a jailed
    /// Firecracker's tap is the VM uid's while it runs, and one kept by
    /// [`TapPool::release`] or [`TapPool::adopt`]ed is the daemon's again.
    fn make_ready(&self, host: &dyn HostOps, name: &str) -> Result<(), HostOpsError> {
        host.create_tap(name, self.owner_uid)?;
        host.attach_to_bridge(name, &self.bridge)?;
        host.set_link_up(name)
    }

    /// Makes the tap of reserved index `i`; on failure deletes it (it is
    /// ours: nobody else can hold a reserved index).
    fn make_reserved(&self, host: &dyn HostOps, i: u32) -> Result<(), HostOpsError> {
        let name = self.name(i);
        self.make_ready(host, &name).inspect_err(|_| {
            let _ = host.delete_link(&name);
        })
    }

    /// Creates free taps until `warm` are ready (or being made).
    pub fn fill(&self, host: &dyn HostOps) -> Result<(), HostOpsError> {
        loop {
            let i = {
                let mut t = self.lock();
                if t.free.len() + t.pending.len() >= self.warm {
                    return Ok(());
                }
                t.reserve(false)
            };
            let made = self.make_reserved(host, i);
            let mut t = self.lock();
            t.pending.remove(&i);
            made?;
            t.free.insert(i);
        }
    }

    /// Hands out a ready tap, creating one if none is free, then tops the
    /// pool up again (a failure to top up is not the caller's problem).
    pub fn acquire(&self, host: &dyn HostOps) -> Result<String, HostOpsError> {
        let (i, fresh) = {
            let mut t = self.lock();
            match t.free.pop_first() {
                Some(i) => {
                    t.used.insert(i);
                    (i, false)
                }
                None => (t.reserve(true), true),
            }
        };
        if fresh {
            if let Err(e) = self.make_reserved(host, i) {
                self.lock().used.remove(&i);
                return Err(e);
            }
        }
        if let Err(e) = self.fill(host) {
            tracing::warn!("cannot keep the tap pool warm: {e}");
        }
        Ok(self.name(i))
    }

    /// Takes over `name` for a VM that already held it (a start after a
    /// daemon restart), making sure it exists, is attached and up. Refuses
    /// a name that is not this pool's.
    pub fn adopt(&self, host: &dyn HostOps, name: &str) -> Result<(), AdoptError> {
        let i = self.index_of(name).ok_or_else(|| ForeignTap {
            name: name.to_string(),
            prefix: self.prefix.clone(),
        })?;
        {
            let mut t = self.lock();
            t.free.remove(&i);
            t.used.insert(i);
        }
        self.make_ready(host, name).map_err(AdoptError::Host)
    }

    /// Takes a tap back: kept warm if the pool is short, deleted otherwise.
    /// Names the pool does not own are ignored.
    pub fn release(&self, host: &dyn HostOps, name: &str) -> Result<(), HostOpsError> {
        let Some(i) = self.index_of(name) else {
            return Ok(());
        };
        let keep = {
            let mut t = self.lock();
            t.used.remove(&i);
            if t.free.len() + t.pending.len() < self.warm {
                // Reserved while it is re-attached, so nobody takes it half-made.
                t.pending.insert(i);
                true
            } else {
                false
            }
        };
        if keep {
            // Re-attach: the bridge may have been recreated meanwhile.
            let ready = self.make_ready(host, name).is_ok();
            let mut t = self.lock();
            t.pending.remove(&i);
            if ready {
                t.free.insert(i);
                return Ok(());
            }
        }
        host.delete_link(name)
    }

    /// Deletes every free tap (daemon shutdown or tests).
    pub fn drain(&self, host: &dyn HostOps) -> Result<(), HostOpsError> {
        let free: Vec<u32> = std::mem::take(&mut self.lock().free).into_iter().collect();
        for i in free {
            host.delete_link(&self.name(i))?;
        }
        Ok(())
    }

    /// Names of the free taps.
    pub fn free(&self) -> Vec<String> {
        self.lock().free.iter().map(|i| self.name(*i)).collect()
    }

    /// Names of the taps handed to VMs.
    pub fn in_use(&self) -> Vec<String> {
        self.lock().used.iter().map(|i| self.name(*i)).collect()
    }
}

/// [`TapPool::adopt`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The name is another daemon's (or an older banger's).
    #[error(transparent)]
    Foreign(#[from] ForeignTap),
    /// Making it ready failed.
    #[error(transparent)]
    Host(HostOpsError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_host::hostops::RecordingHostOps;

    #[test]
    fn acquire_hands_out_distinct_taps_and_keeps_two_warm() {
        let host = RecordingHostOps::default();
        let pool = TapPool::new("bgabct", "banger0", 1000, 2);
        pool.fill(&host).unwrap();
        assert_eq!(pool.free(), vec!["bgabct0", "bgabct1"]);
        let a = pool.acquire(&host).unwrap();
        let b = pool.acquire(&host).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("bgabct0", "bgabct1"));
        assert_eq!(pool.free(), vec!["bgabct2", "bgabct3"]);
        let calls = host.calls();
        assert!(
            calls.contains(&"create_tap bgabct3 1000".to_string()),
            "{calls:?}"
        );
        assert!(calls.contains(&"attach_to_bridge bgabct3 banger0".to_string()));
        assert!(calls.contains(&"set_link_up bgabct3".to_string()));

        // The pool is full, so a returned tap is deleted, not kept.
        pool.release(&host, &a).unwrap();
        assert_eq!(host.calls().last().unwrap(), "delete_link bgabct0");
        assert_eq!(pool.free(), vec!["bgabct2", "bgabct3"]);
        // Warm taps go first; the freed index is reused for the next new one.
        assert_eq!(pool.acquire(&host).unwrap(), "bgabct2");
        assert_eq!(pool.free(), vec!["bgabct0", "bgabct3"]);
        assert_eq!(pool.acquire(&host).unwrap(), "bgabct0");
    }

    #[test]
    fn a_short_pool_keeps_a_returned_tap_and_skips_taps_in_use() {
        let host = RecordingHostOps::default();
        let pool = TapPool::new("bgabct", "banger0", 0, 1);
        pool.mark_in_use(["bgabct0", "eth0", "bgtap1"]);
        assert_eq!(pool.acquire(&host).unwrap(), "bgabct1");
        pool.drain(&host).unwrap();
        assert!(pool.free().is_empty());
        pool.release(&host, "bgabct1").unwrap();
        assert_eq!(pool.free(), vec!["bgabct1"]);
        pool.release(&host, "eth0").unwrap();
        assert!(!host.calls().iter().any(|c| c.contains("eth0")));
    }

    #[test]
    fn names_of_other_daemons_are_never_adopted_kept_or_deleted() {
        let host = RecordingHostOps::default();
        let pool = TapPool::new("bgabct", "banger0", 0, 2);
        for foreign in [
            "bgdeft0", "bgtap0", "bgabct", "bgabct01", "bgabct1x", "bgp-gpu0",
        ] {
            assert_eq!(pool.index_of(foreign), None, "{foreign}");
            let err = pool.adopt(&host, foreign).unwrap_err().to_string();
            assert!(err.contains(foreign) && err.contains("bgabct<N>"), "{err}");
            pool.release(&host, foreign).unwrap();
        }
        pool.mark_in_use(["bgdeft0"]);
        assert!(pool.in_use().is_empty());
        assert!(host.calls().is_empty(), "{:?}", host.calls());
        pool.adopt(&host, "bgabct7").unwrap();
        assert_eq!(pool.in_use(), ["bgabct7"]);
    }
}
