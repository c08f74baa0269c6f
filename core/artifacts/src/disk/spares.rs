//! Spare root disks: a copy of an image's root filesystem made ahead of
//! time, so a create takes it with a rename instead of copying the image
//! while the user waits.
//!
//! A spare is `DIR/<path key>-<identity key>.ext4`: the identity
//! ([`crate::file_id`]) of the source when it was copied is in the name, so
//! a source rewritten or replaced since is never served from an old copy.
//! Each source keeps at most one spare, and only the sources of the last
//! `images` spares made keep theirs (older ones are removed). A spare is
//! made by [`clone_file`] (staged, renamed into place), by one background
//! thread that runs only on idle CPU time (`SCHED_IDLE`), after a create
//! took one or copied the source itself.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use super::{CloneKind, DiskError, clone_file, rename_noreplace};
use crate::file_id::{FileState, RACY, settled};
use banger_api::release::hex;

/// The nice value of the thread that makes spares where it cannot be
/// made `SCHED_IDLE`.
const FILL_NICE: libc::c_int = 19;

/// The spare root disks of one daemon.
#[derive(Debug, Clone)]
pub struct Spares {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    images: usize,
    state: Mutex<State>,
    /// Signalled when the filling thread ends.
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Sources waiting for a spare, oldest first.
    queue: VecDeque<PathBuf>,
    /// Whether the filling thread is running.
    filling: bool,
}

impl Spares {
    /// The spares kept in `dir` (created 0700 when missing) for the last
    /// `images` sources; 0 keeps none. Leftovers of an interrupted fill are
    /// removed: one daemon owns `dir`.
    pub fn open(dir: &Path, images: usize) -> std::io::Result<Spares> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let spare = name.ends_with(".ext4") && !name.starts_with('.');
            if !spare || images == 0 {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Spares {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                images,
                state: Mutex::new(State::default()),
                done: Condvar::new(),
            }),
        })
    }

    /// Makes `dst` (which must not exist) a copy of `src`: a spare of
    /// `src`'s current contents moved there when one is ready, else a copy
    /// made now. Either way a new spare of `src` is then made in the
    /// background. Fails as [`clone_file`] does, leaving nothing at `dst`.
    pub fn take(&self, src: &Path, dst: &Path) -> Result<CloneKind, DiskError> {
        if self.inner.images > 0 {
            if let Some(spare) = self.ready(src) {
                match rename_noreplace(&spare, dst) {
                    Ok(()) => {
                        self.refill(src);
                        return Ok(CloneKind::Spare);
                    }
                    // Taken by a concurrent create, or never made.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!(
                        spare = %spare.display(),
                        dst = %dst.display(),
                        "cannot move the spare root disk into place, copying instead: {e}"
                    ),
                }
            }
        }
        let kind = clone_file(src, dst)?;
        self.refill(src);
        Ok(kind)
    }

    /// Queues a spare of `src` to be made in the background, unless spares
    /// are off. Safe to call for a source that already has one.
    pub fn refill(&self, src: &Path) {
        if self.inner.images == 0 {
            return;
        }
        let start = {
            let mut st = lock(&self.inner.state);
            if !st.queue.iter().any(|q| q == src) {
                st.queue.push_back(src.to_path_buf());
            }
            !std::mem::replace(&mut st.filling, true)
        };
        if start {
            let inner = self.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("rootfs-spares".into())
                .spawn(move || inner.fill_queue());
            if let Err(e) = spawned {
                tracing::warn!("cannot start the spare root disk thread: {e}");
                let mut st = lock(&self.inner.state);
                st.filling = false;
                st.queue.clear();
                self.inner.done.notify_all();
            }
        }
    }

    /// Removes `src`'s spare (its image is being removed).
    pub fn forget(&self, src: &Path) {
        lock(&self.inner.state).queue.retain(|q| q != src);
        self.inner.remove_spares_of(src, None);
    }

    /// The spare of `src`'s current contents, if `src` can be identified
    /// (see [`settled`]); the file may not exist.
    fn ready(&self, src: &Path) -> Option<PathBuf> {
        match settled(src, SystemTime::now())? {
            FileState::Present(id) => Some(self.inner.dir.join(spare_name(src, &id.key()))),
            FileState::Missing => None,
        }
    }

    /// Whether a spare of `src`'s current contents is ready.
    #[cfg(test)]
    fn has_spare(&self, src: &Path) -> bool {
        self.ready(src).is_some_and(|p| p.is_file())
    }

    /// Waits up to `timeout` until no spare is queued or being made;
    /// returns whether that happened.
    #[cfg(test)]
    fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let st = lock(&self.inner.state);
        let (st, _) = self
            .inner
            .done
            .wait_timeout_while(st, timeout, |st| st.filling || !st.queue.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        !st.filling && st.queue.is_empty()
    }
}

impl Inner {
    /// The filling thread: makes a spare for every queued source, then
    /// ends.
    fn fill_queue(&self) {
        // Only idle CPU time: the copy must not slow the guest that just
        // took the last spare, nor anything else the host runs. If no CPU
        // is idle the spare waits, and the next create copies for itself.
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (0) with a valid
        // sched_param; no other memory is involved.
        let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
        let niced = || {
            // SAFETY: setpriority on the caller, which Linux takes as the
            // calling thread (nice values are per thread); no memory involved.
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, FILL_NICE) };
            rc == 0
        };
        if !idle && !niced() {
            tracing::debug!(
                "cannot lower the spare thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
        loop {
            let next = {
                let mut st = lock(&self.state);
                match st.queue.pop_front() {
                    Some(src) => src,
                    None => {
                        st.filling = false;
                        self.done.notify_all();
                        return;
                    }
                }
            };
            self.fill(&next);
        }
    }

    /// Makes the spare of `src` unless it exists, then removes what is
    /// beyond the kept count.
    fn fill(&self, src: &Path) {
        let mut state = settled(src, SystemTime::now());
        // Changed within RACY (compared in whole seconds, so up to a second
        // more): a copy now could not be told from one of the next
        // version. Wait that out.
        for _ in 0..RACY.as_secs() + 2 {
            if state.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            state = settled(src, SystemTime::now());
        }
        let id = match state {
            Some(FileState::Present(id)) => id,
            Some(FileState::Missing) => {
                self.remove_spares_of(src, None);
                return;
            }
            None => {
                tracing::debug!(src = %src.display(), "source keeps changing: no spare made");
                return;
            }
        };
        let name = spare_name(src, &id.key());
        let spare = self.dir.join(&name);
        self.remove_spares_of(src, Some(&name));
        if !spare.is_file() {
            if let Err(e) = clone_file(src, &spare) {
                tracing::warn!(src = %src.display(), "cannot make a spare root disk: {e}");
                return;
            }
            // Changed while it was copied: the copy may be torn.
            if settled(src, SystemTime::now()) != Some(FileState::Present(id)) {
                let _ = std::fs::remove_file(&spare);
                return;
            }
            tracing::debug!(src = %src.display(), spare = %spare.display(), "spare root disk ready");
        }
        self.evict();
    }

    /// Removes `src`'s spares other than `keep`.
    fn remove_spares_of(&self, src: &Path, keep: Option<&str>) {
        let prefix = format!("{}-", path_key(src));
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) && Some(name.as_ref()) != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Keeps the `images` newest spares and removes the rest.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut spares: Vec<(SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".ext4") && !n.starts_with('.')
            })
            .filter_map(|e| {
                let made = e.metadata().ok()?.modified().ok()?;
                Some((made, e.path()))
            })
            .collect();
        spares.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (_, old) in spares.iter().skip(self.images) {
            let _ = std::fs::remove_file(old);
        }
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 16 hex characters naming a source path.
fn path_key(src: &Path) -> String {
    use sha2::Digest;
    use std::os::unix::ffi::OsStrExt;
    hex(&sha2::Sha256::digest(src.as_os_str().as_bytes())[..8])
}

fn spare_name(src: &Path, id_key: &str) -> String {
    format!("{}-{id_key}.ext4", path_key(src))
}

#[cfg(test)]
mod tests {
    use super::super::tests::dir_entries;
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A sparse source of 8 MiB with `tag` written at 1 MiB.
    fn source(path: &Path, tag: &[u8]) {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(8 * MIB).unwrap();
        f.write_all_at(tag, MIB).unwrap();
    }

    /// Overwrites the bytes at 1 MiB of an existing file with `tag`.
    fn write_tag(path: &Path, tag: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(tag, MIB)
            .unwrap();
    }

    fn read_tag(path: &Path, len: usize) -> Vec<u8> {
        let f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, MIB).unwrap();
        buf
    }

    fn wait_idle(s: &Spares) {
        let limit = std::time::Duration::from_secs(30);
        assert!(
            s.wait_idle(limit),
            "the spare thread did not finish within 30 s"
        );
    }

    /// A source is identified (so can have a spare) only RACY after its
    /// last change, compared in whole seconds, which is a property of time,
    /// not a race: sleep it out.
    fn settle() {
        std::thread::sleep(RACY + std::time::Duration::from_millis(1050));
    }

    /// A settled one-image source ("version-1") in a temp dir and spares
    /// for `images`, with the source's spare made when `filled`.
    fn fixture(images: usize, filled: bool) -> (tempfile::TempDir, PathBuf, PathBuf, Spares) {
        let tmp = tempfile::tempdir().unwrap();
        let (img, spares_dir) = (tmp.path().join("rootfs.ext4"), tmp.path().join("spares"));
        source(&img, b"version-1");
        settle();
        let s = Spares::open(&spares_dir, images).unwrap();
        if filled {
            s.refill(&img);
            wait_idle(&s);
            assert!(s.has_spare(&img));
        }
        (tmp, img, spares_dir, s)
    }

    #[test]
    fn a_create_takes_the_spare_and_a_new_one_is_made_behind_it() {
        let (tmp, img, spares_dir, s) = fixture(2, false);
        assert!(!s.has_spare(&img));

        // No spare yet: copied now, and one is made.
        let a = tmp.path().join("a.ext4");
        assert_ne!(s.take(&img, &a).unwrap(), CloneKind::Spare);
        wait_idle(&s);
        assert!(s.has_spare(&img));
        assert_eq!(read_tag(&a, 9), b"version-1");

        // The next create takes it by rename, and another is made.
        let b = tmp.path().join("b.ext4");
        assert_eq!(s.take(&img, &b).unwrap(), CloneKind::Spare);
        assert_eq!(read_tag(&b, 9), b"version-1");
        assert_eq!(std::fs::metadata(&b).unwrap().len(), 8 * MIB);
        wait_idle(&s);
        assert!(s.has_spare(&img));
        assert_eq!(dir_entries(&spares_dir).len(), 1, "one spare per source");

        // A VM's disk is its own: writing it leaves the spare alone.
        write_tag(&b, b"VM-WRITES");
        let c = tmp.path().join("c.ext4");
        assert_eq!(s.take(&img, &c).unwrap(), CloneKind::Spare);
        assert_eq!(read_tag(&c, 9), b"version-1");
        wait_idle(&s);
    }

    #[test]
    fn a_changed_source_is_never_served_from_an_old_spare() {
        let (tmp, img, spares_dir, s) = fixture(2, true);

        // Rewritten in place (same size, same inode).
        write_tag(&img, b"version-2");
        // Within RACY the source cannot be identified: copied.
        let a = tmp.path().join("a.ext4");
        assert_ne!(s.take(&img, &a).unwrap(), CloneKind::Spare);
        assert_eq!(read_tag(&a, 9), b"version-2");
        settle();
        let b = tmp.path().join("b.ext4");
        let kind = s.take(&img, &b).unwrap();
        assert_eq!(read_tag(&b, 9), b"version-2", "{kind:?}");
        wait_idle(&s);
        // The old version's spare is gone; only the new one is kept.
        assert_eq!(dir_entries(&spares_dir).len(), 1);
        let c = tmp.path().join("c.ext4");
        assert_eq!(s.take(&img, &c).unwrap(), CloneKind::Spare);
        assert_eq!(read_tag(&c, 9), b"version-2");
        wait_idle(&s);
    }

    #[test]
    fn only_the_last_sources_keep_spares_and_forget_removes_one() {
        let tmp = tempfile::tempdir().unwrap();
        let spares_dir = tmp.path().join("spares");
        let imgs: Vec<PathBuf> = (0..3)
            .map(|i| tmp.path().join(format!("img{i}.ext4")))
            .collect();
        for (i, img) in imgs.iter().enumerate() {
            source(img, format!("image-{i}").as_bytes());
        }
        settle();
        let s = Spares::open(&spares_dir, 2).unwrap();
        for img in &imgs {
            s.refill(img);
            wait_idle(&s);
            // Distinct modification times order the spares.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!s.has_spare(&imgs[0]), "the oldest was evicted");
        assert!(s.has_spare(&imgs[1]) && s.has_spare(&imgs[2]));
        s.forget(&imgs[2]);
        assert!(!s.has_spare(&imgs[2]));
        assert!(s.has_spare(&imgs[1]));
        assert_eq!(dir_entries(&spares_dir).len(), 1);
    }

    #[test]
    fn open_sweeps_interrupted_fills_and_zero_keeps_nothing() {
        let (tmp, img, spares_dir, s) = fixture(1, true);
        let kept = dir_entries(&spares_dir);
        assert_eq!(kept.len(), 1);
        std::fs::write(spares_dir.join(".x.ext4.staging-1-00000000"), b"torn").unwrap();
        drop(s);
        let s = Spares::open(&spares_dir, 1).unwrap();
        assert_eq!(dir_entries(&spares_dir), kept, "staging swept, spare kept");
        assert!(s.has_spare(&img));
        drop(s);

        let s = Spares::open(&spares_dir, 0).unwrap();
        assert!(dir_entries(&spares_dir).is_empty(), "spares off: none kept");
        let a = tmp.path().join("a.ext4");
        assert_ne!(s.take(&img, &a).unwrap(), CloneKind::Spare);
        assert!(s.wait_idle(std::time::Duration::ZERO), "nothing queued");
        assert!(dir_entries(&spares_dir).is_empty());
    }

    #[test]
    fn a_taken_destination_is_refused_and_the_spare_stays() {
        let (tmp, img, _, s) = fixture(1, true);
        let dst = tmp.path().join("user-data");
        std::fs::write(&dst, b"keep me").unwrap();
        assert!(matches!(
            s.take(&img, &dst),
            Err(DiskError::DestinationExists(_))
        ));
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
        wait_idle(&s);
        assert!(s.has_spare(&img));
    }
}
