//! Waiting for a file (a VMM's API socket) to appear without polling on a
//! clock: an inotify watch on its directory, made before the process that
//! creates it starts, wakes the waiter the moment the name is created.
//!
//! A doubling poll from 1 ms woke on average a third of the wait late: the
//! fake firecracker binds its socket 3-6 ms after spawn, and a poll at 3
//! then 7 ms lost most of that. Where the directory cannot be watched (it
//! does not exist yet, or the inotify limits are reached) the waiter falls
//! back to sleeping for the pause it was given.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// A watch for one name in one directory.
pub(crate) struct Appear {
    watch: Option<(Inotify, OsString)>,
}

impl Appear {
    /// Starts watching for `path` to be created (or moved in).
    pub(crate) fn watch(path: &Path) -> Appear {
        let watch = (|| {
            let dir = path.parent()?;
            let name = path.file_name()?.to_os_string();
            let ino = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).ok()?;
            ino.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
                .ok()?;
            Some((ino, name))
        })();
        Appear { watch }
    }

    /// Waits until the name appears or `pause` passes, whichever is first.
    /// Returns at once if it appeared since the last call.
    pub(crate) fn wait(&self, pause: Duration) {
        let Some((ino, name)) = &self.watch else {
            std::thread::sleep(pause);
            return;
        };
        let deadline = std::time::Instant::now() + pause;
        loop {
            // Drain what is queued: other names in the directory (other
            // VMs' sockets) wake us too.
            while let Ok(events) = ino.read_events() {
                if events.is_empty() {
                    break;
                }
                if events.iter().any(|e| e.name.as_ref() == Some(name)) {
                    return;
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(ino.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(ms)).is_err() {
                std::thread::sleep(left);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_waiter_wakes_when_the_name_appears_and_not_for_other_names() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("api.sock");
        let a = Appear::watch(&target);
        assert!(a.watch.is_some(), "a watch on an existing directory");

        // Another name only: the whole pause passes.
        std::fs::write(dir.path().join("other.sock"), b"").unwrap();
        let t = Instant::now();
        a.wait(Duration::from_millis(150));
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );

        // Created from another thread while we wait: woken long before
        // the pause ends.
        let creator = {
            let target = target.clone();
            std::thread::spawn(move || {
                let _l = std::os::unix::net::UnixListener::bind(&target).unwrap();
            })
        };
        let t = Instant::now();
        a.wait(Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        creator.join().unwrap();
    }

    #[test]
    fn without_a_directory_to_watch_the_waiter_sleeps_the_pause() {
        let a = Appear::watch(Path::new("/nonexistent/dir/api.sock"));
        assert!(a.watch.is_none());
        let t = Instant::now();
        a.wait(Duration::from_millis(20));
        assert!(t.elapsed() >= Duration::from_millis(20));
    }
}
