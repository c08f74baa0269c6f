//! A warm pool of tap devices (`bgtap0`, `bgtap1`, ...), already attached to
//! the bridge and up, so starting a VM does not wait for link setup. A VM
//! takes one at PrepareHost and gives it back when it stops.

use std::collections::BTreeSet;
use std::sync::Mutex;

use banger_host::hostops::{HostOps, HostOpsError};

/// Tap names start with this; the pool owns every link with the prefix.
pub const TAP_PREFIX: &str = "bgtap";

/// Free taps the pool keeps ready by default.
pub const DEFAULT_WARM: usize = 2;

#[derive(Debug, Default)]
struct Taps {
    /// Ready, attached, up, unused.
    free: BTreeSet<u32>,
    /// Handed to a VM.
    used: BTreeSet<u32>,
}

impl Taps {
    fn next_index(&self) -> u32 {
        (0..)
            .find(|i| !self.free.contains(i) && !self.used.contains(i))
            .unwrap_or(0)
    }
}

/// The pool. Its bookkeeping is in memory: after a daemon restart, call
/// [`TapPool::mark_in_use`] with the taps of VMs that are still running.
#[derive(Debug)]
pub struct TapPool {
    bridge: String,
    owner_uid: u32,
    warm: usize,
    taps: Mutex<Taps>,
}

fn tap_name(i: u32) -> String {
    format!("{TAP_PREFIX}{i}")
}

fn tap_index(name: &str) -> Option<u32> {
    name.strip_prefix(TAP_PREFIX)?.parse().ok()
}

impl TapPool {
    /// A pool of taps owned by `owner_uid` (who runs the VMM) on `bridge`,
    /// keeping `warm` free taps ready.
    pub fn new(bridge: &str, owner_uid: u32, warm: usize) -> Self {
        TapPool {
            bridge: bridge.to_string(),
            owner_uid,
            warm,
            taps: Mutex::new(Taps::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taps> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records taps that running VMs already hold, so they are not handed out.
    pub fn mark_in_use<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let mut t = self.lock();
        for i in names.into_iter().filter_map(tap_index) {
            t.free.remove(&i);
            t.used.insert(i);
        }
    }

    fn make_ready(&self, host: &dyn HostOps, name: &str) -> Result<(), HostOpsError> {
        host.create_tap(name, self.owner_uid)?;
        host.attach_to_bridge(name, &self.bridge)?;
        host.set_link_up(name)
    }

    /// Creates free taps until `warm` are ready.
    pub fn fill(&self, host: &dyn HostOps) -> Result<(), HostOpsError> {
        loop {
            let i = {
                let t = self.lock();
                if t.free.len() >= self.warm {
                    return Ok(());
                }
                t.next_index()
            };
            let name = tap_name(i);
            if let Err(e) = self.make_ready(host, &name) {
                let _ = host.delete_link(&name);
                return Err(e);
            }
            self.lock().free.insert(i);
        }
    }

    /// Hands out a ready tap, creating one if none is free, then tops the
    /// pool up again (a failure to top up is not the caller's problem).
    pub fn acquire(&self, host: &dyn HostOps) -> Result<String, HostOpsError> {
        let picked = {
            let mut t = self.lock();
            let first = t.free.iter().next().copied();
            match first {
                Some(i) => {
                    t.free.remove(&i);
                    t.used.insert(i);
                    Some(i)
                }
                None => None,
            }
        };
        let i = match picked {
            Some(i) => i,
            None => {
                let i = {
                    let mut t = self.lock();
                    let i = t.next_index();
                    t.used.insert(i);
                    i
                };
                if let Err(e) = self.make_ready(host, &tap_name(i)) {
                    let _ = host.delete_link(&tap_name(i));
                    self.lock().used.remove(&i);
                    return Err(e);
                }
                i
            }
        };
        if let Err(e) = self.fill(host) {
            tracing::warn!("cannot keep the tap pool warm: {e}");
        }
        Ok(tap_name(i))
    }

    /// Takes over `name` for a VM that already held it (a start after a
    /// daemon restart), making sure it exists, is attached and up.
    pub fn adopt(&self, host: &dyn HostOps, name: &str) -> Result<(), HostOpsError> {
        if let Some(i) = tap_index(name) {
            let mut t = self.lock();
            t.free.remove(&i);
            t.used.insert(i);
        }
        self.make_ready(host, name)
    }

    /// Takes a tap back: kept warm if the pool is short, deleted otherwise.
    /// Names the pool does not own are ignored.
    pub fn release(&self, host: &dyn HostOps, name: &str) -> Result<(), HostOpsError> {
        let Some(i) = tap_index(name) else {
            return Ok(());
        };
        let keep = {
            let mut t = self.lock();
            t.used.remove(&i);
            if t.free.len() < self.warm {
                t.free.insert(i);
                true
            } else {
                false
            }
        };
        if keep {
            // Re-attach: the bridge may have been recreated meanwhile.
            if self.make_ready(host, name).is_ok() {
                return Ok(());
            }
            self.lock().free.remove(&i);
        }
        host.delete_link(name)
    }

    /// Deletes every free tap (daemon shutdown or tests).
    pub fn drain(&self, host: &dyn HostOps) -> Result<(), HostOpsError> {
        let free: Vec<u32> = std::mem::take(&mut self.lock().free).into_iter().collect();
        for i in free {
            host.delete_link(&tap_name(i))?;
        }
        Ok(())
    }

    /// Names of the free taps.
    pub fn free(&self) -> Vec<String> {
        self.lock().free.iter().map(|i| tap_name(*i)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_host::hostops::RecordingHostOps;

    #[test]
    fn acquire_hands_out_distinct_taps_and_keeps_two_warm() {
        let host = RecordingHostOps::default();
        let pool = TapPool::new("banger0", 1000, 2);
        pool.fill(&host).unwrap();
        assert_eq!(pool.free(), vec!["bgtap0", "bgtap1"]);
        let a = pool.acquire(&host).unwrap();
        let b = pool.acquire(&host).unwrap();
        assert_eq!((a.as_str(), b.as_str()), ("bgtap0", "bgtap1"));
        assert_eq!(pool.free(), vec!["bgtap2", "bgtap3"]);
        let calls = host.calls();
        assert!(
            calls.contains(&"create_tap bgtap3 1000".to_string()),
            "{calls:?}"
        );
        assert!(calls.contains(&"attach_to_bridge bgtap3 banger0".to_string()));
        assert!(calls.contains(&"set_link_up bgtap3".to_string()));

        // The pool is full, so a returned tap is deleted, not kept.
        pool.release(&host, &a).unwrap();
        assert_eq!(host.calls().last().unwrap(), "delete_link bgtap0");
        assert_eq!(pool.free(), vec!["bgtap2", "bgtap3"]);
        // Warm taps go first; the freed index is reused for the next new one.
        assert_eq!(pool.acquire(&host).unwrap(), "bgtap2");
        assert_eq!(pool.free(), vec!["bgtap0", "bgtap3"]);
        assert_eq!(pool.acquire(&host).unwrap(), "bgtap0");
    }

    #[test]
    fn a_short_pool_keeps_a_returned_tap_and_skips_taps_in_use() {
        let host = RecordingHostOps::default();
        let pool = TapPool::new("banger0", 0, 1);
        pool.mark_in_use(["bgtap0", "eth0"]);
        assert_eq!(pool.acquire(&host).unwrap(), "bgtap1");
        pool.drain(&host).unwrap();
        assert!(pool.free().is_empty());
        pool.release(&host, "bgtap1").unwrap();
        assert_eq!(pool.free(), vec!["bgtap1"]);
        pool.release(&host, "eth0").unwrap();
        assert!(!host.calls().iter().any(|c| c.contains("eth0")));
    }
}
