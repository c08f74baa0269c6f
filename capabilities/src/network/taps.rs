//! A warm pool of tap devices (`bg<id>t0`, `bg<id>t1`, ..., the prefix
//! being this daemon's, see [`super::identity`]), already attached to the
//! bridge and up, so starting a VM does not wait for link setup. A VM takes
//! one at PrepareHost and gives it back when it stops.
//!
//! Every index is reserved under the pool's lock before its tap is made,
//! so two VMs (or a VM and the warm-up) never make the same tap, and a
//! failed make only ever deletes the tap it reserved. Names without this
//! daemon's prefix are never adopted, kept or deleted.
//!
//! In the daemon ([`TapPool::refill_in_background`]) the pool is topped up
//! by a background thread after each acquire, not by the VM that took the
//! tap: a create only makes a tap itself when the pool is empty (a burst
//! larger than [`DEFAULT_WARM`]). Every tap create, attach and link-up
//! takes the kernel's RTNL lock, so one refill thread at a time.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};

use banger_host::hostops::{HostOps, HostOpsError};

/// Free taps the pool keeps ready by default.
pub const DEFAULT_WARM: usize = 8;

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
/// Cloning it gives another handle on the same pool.
#[derive(Debug, Clone)]
pub struct TapPool(Arc<Pool>);

#[derive(Debug)]
struct Pool {
    prefix: String,
    bridge: String,
    owner_uid: u32,
    warm: usize,
    taps: Mutex<Taps>,
    refill: Mutex<Refill>,
    /// Signalled when a background refill ends.
    refilled: Condvar,
}

/// Who tops the pool up after an acquire.
#[derive(Default)]
struct Refill {
    /// The background refill's host operations; `None` refills inline.
    host: Option<Arc<dyn HostOps>>,
    /// A refill thread is running.
    running: bool,
}

impl std::fmt::Debug for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refill")
            .field("background", &self.host.is_some())
            .field("running", &self.running)
            .finish()
    }
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
        TapPool(Arc::new(Pool {
            prefix: prefix.to_string(),
            bridge: bridge.to_string(),
            owner_uid,
            warm,
            taps: Mutex::new(Taps::default()),
            refill: Mutex::new(Refill::default()),
            refilled: Condvar::new(),
        }))
    }

    /// From now on, [`TapPool::acquire`] leaves topping the pool up to a
    /// background thread using `host`.
    pub fn refill_in_background(&self, host: Arc<dyn HostOps>) {
        self.lock_refill().host = Some(host);
    }

    fn lock_refill(&self) -> std::sync::MutexGuard<'_, Refill> {
        self.0.refill.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether fewer than `warm` taps are free or being made.
    fn short(&self) -> bool {
        let t = self.lock();
        t.free.len() + t.pending.len() < self.0.warm
    }

    /// Tops the pool up: inline with `host`, or by waking the background
    /// refill (one thread at a time; a running one checks again before it
    /// ends, so an acquire during its last fill is not missed).
    fn top_up(&self, host: &dyn HostOps) {
        let background = {
            let mut r = self.lock_refill();
            match r.host.clone() {
                Some(_) if r.running => return,
                Some(h) => {
                    r.running = true;
                    Some(h)
                }
                None => None,
            }
        };
        let Some(bg) = background else {
            if let Err(e) = self.fill(host) {
                tracing::warn!("cannot keep the tap pool warm: {e}");
            }
            return;
        };
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("tap-refill".into())
            .spawn(move || {
                loop {
                    let filled = pool.fill(bg.as_ref());
                    if let Err(e) = &filled {
                        tracing::warn!("cannot keep the tap pool warm: {e}");
                    }
                    let mut r = pool.lock_refill();
                    if filled.is_err() || r.host.is_none() || !pool.short() {
                        r.running = false;
                        pool.0.refilled.notify_all();
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the tap refill thread ({e}); refilling inline");
            let mut r = self.lock_refill();
            r.running = false;
            self.0.refilled.notify_all();
            drop(r);
            if let Err(e) = self.fill(host) {
                tracing::warn!("cannot keep the tap pool warm: {e}");
            }
        }
    }

    /// Waits until no background refill is running.
    pub fn wait_refilled(&self) {
        let mut r = self.lock_refill();
        while r.running {
            r = self.0.refilled.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The prefix of this pool's taps.
    pub fn prefix(&self) -> &str {
        &self.0.prefix
    }

    fn name(&self, i: u32) -> String {
        format!("{}{i}", self.0.prefix)
    }

    /// The index of `name` if it is one of this pool's.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        let digits = name.strip_prefix(&self.0.prefix)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if digits.len() > 1 && digits.starts_with('0') {
            return None;
        }
        digits.parse().ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taps> {
        self.0.taps.lock().unwrap_or_else(|e| e.into_inner())
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
        host.create_tap(name, self.0.owner_uid)?;
        host.attach_to_bridge(name, &self.0.bridge)?;
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
                if t.free.len() + t.pending.len() >= self.0.warm {
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
    /// pool up again, in the background when [`TapPool::refill_in_background`]
    /// was called (a failure to top up is not the caller's problem).
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
        self.top_up(host);
        Ok(self.name(i))
    }

    /// Takes over `name` for a VM that already held it (a start after a
    /// daemon restart), making sure it exists, is attached and up. Refuses
    /// a name that is not this pool's.
    pub fn adopt(&self, host: &dyn HostOps, name: &str) -> Result<(), AdoptError> {
        let i = self.index_of(name).ok_or_else(|| ForeignTap {
            name: name.to_string(),
            prefix: self.0.prefix.clone(),
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
            if t.free.len() + t.pending.len() < self.0.warm {
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

    /// Deletes every free tap (daemon shutdown or tests), after stopping
    /// the background refill, which would otherwise make new ones.
    pub fn drain(&self, host: &dyn HostOps) -> Result<(), HostOpsError> {
        let background = self.lock_refill().host.take();
        self.wait_refilled();
        let free: Vec<u32> = std::mem::take(&mut self.lock().free).into_iter().collect();
        let deleted = free
            .into_iter()
            .try_for_each(|i| host.delete_link(&self.name(i)));
        self.lock_refill().host = background;
        deleted
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

    /// The `create_tap` calls recorded by `host`, by tap name.
    fn made(host: &RecordingHostOps) -> Vec<String> {
        host.calls()
            .iter()
            .filter_map(|c| c.strip_prefix("create_tap "))
            .map(|c| c.split(' ').next().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn the_background_refill_makes_the_taps_not_the_vm_that_took_one() {
        let (vm_host, bg_host) = (
            RecordingHostOps::default(),
            Arc::new(RecordingHostOps::default()),
        );
        let pool = TapPool::new("bgabct", "banger0", 0, 3);
        pool.fill(&vm_host).unwrap();
        pool.refill_in_background(bg_host.clone());
        for round in 0..4 {
            let tap = pool.acquire(&vm_host).unwrap();
            pool.wait_refilled();
            assert_eq!(pool.free().len(), 3, "round {round}");
            assert!(!pool.free().contains(&tap));
        }
        // The VM's side made only the first three; the refill the rest.
        assert_eq!(made(&vm_host), ["bgabct0", "bgabct1", "bgabct2"]);
        assert_eq!(made(&bg_host), ["bgabct3", "bgabct4", "bgabct5", "bgabct6"]);
        assert_eq!(pool.in_use(), ["bgabct0", "bgabct1", "bgabct2", "bgabct3"]);
    }

    #[test]
    fn a_burst_gets_distinct_taps_and_each_tap_is_made_once() {
        let bg_host = Arc::new(RecordingHostOps::default());
        let vm_host = Arc::new(RecordingHostOps::default());
        let pool = TapPool::new("bgabct", "banger0", 0, 4);
        pool.refill_in_background(bg_host.clone());
        pool.fill(vm_host.as_ref()).unwrap();
        let got: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|_| s.spawn(|| pool.acquire(vm_host.as_ref()).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        pool.wait_refilled();
        let mut distinct = got.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 16, "{got:?}");
        assert_eq!(pool.free().len(), 4);
        let mut all = made(&vm_host);
        all.extend(made(&bg_host));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "a tap was made twice: {all:?}");
        assert_eq!(n, 16 + 4);
        assert!(
            !vm_host
                .calls()
                .iter()
                .chain(bg_host.calls().iter())
                .any(|c| c.starts_with("delete_link"))
        );
    }

    #[test]
    fn drain_stops_the_refill_first_so_no_tap_is_made_after_it() {
        let host = Arc::new(RecordingHostOps::default());
        let pool = TapPool::new("bgabct", "banger0", 0, 4);
        pool.refill_in_background(host.clone());
        pool.acquire(host.as_ref()).unwrap();
        pool.drain(host.as_ref()).unwrap();
        assert!(pool.free().is_empty());
        let calls = host.calls();
        let last_delete = calls.iter().rposition(|c| c.starts_with("delete_link"));
        let last_create = calls.iter().rposition(|c| c.starts_with("create_tap"));
        assert!(last_delete > last_create, "{calls:?}");
        // Draining keeps the background refill for later acquires.
        pool.acquire(host.as_ref()).unwrap();
        pool.wait_refilled();
        assert_eq!(pool.free().len(), 4);
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
