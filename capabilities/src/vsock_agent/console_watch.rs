//! The guest console as it grows during a start, watched for the agent's
//! own word that the host cannot reach it this boot
//! ([`UNREACHABLE_MARK`]): a start then fails at once with the guest's
//! reason instead of at the end of the agent timeout.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use banger_guest_protocol::api::UNREACHABLE_MARK;

/// Most bytes read from the console in one look: a guest that floods its
/// console cannot make one look slow (the rest is read at the next).
const MAX_READ: u64 = 1 << 20;

/// A console log read from where a start began.
#[derive(Debug)]
pub struct ConsoleWatch {
    path: PathBuf,
    /// Bytes of the file already looked at.
    offset: u64,
    /// The last line read, still without its newline.
    partial: Vec<u8>,
}

impl ConsoleWatch {
    /// Watches `path` from its current end (the start of a file not yet
    /// there): what earlier boots wrote is not this start's.
    pub fn from_end(path: &Path) -> ConsoleWatch {
        let offset = std::fs::metadata(path).map_or(0, |m| m.len());
        ConsoleWatch {
            path: path.to_path_buf(),
            offset,
            partial: Vec::new(),
        }
    }

    /// The reason of the first [`UNREACHABLE_MARK`] line written since the
    /// last look, if any. A console that cannot be read says nothing.
    pub fn unreachable(&mut self) -> Option<String> {
        let mut file = File::open(&self.path).ok()?;
        let len = file.metadata().ok()?.len();
        if len < self.offset {
            // Rotated (the daemon keeps consoles under a cap): the new
            // file is all this start's.
            self.offset = 0;
            self.partial.clear();
        }
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut fresh = Vec::new();
        let n = file.take(MAX_READ).read_to_end(&mut fresh).ok()?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        let complete = self.partial.iter().rposition(|b| *b == b'\n')?;
        let lines: Vec<u8> = self.partial.drain(..=complete).collect();
        String::from_utf8_lossy(&lines).lines().find_map(|line| {
            let at = line.find(UNREACHABLE_MARK)?;
            Some(line[at + UNREACHABLE_MARK.len()..].trim().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn only_this_starts_whole_lines_count_and_each_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        // A boot before this start gave up: not this start's.
        append(&log, &format!("{UNREACHABLE_MARK}an old reason\n"));
        let mut watch = ConsoleWatch::from_end(&log);
        assert_eq!(watch.unreachable(), None);
        append(
            &log,
            "[    0.1] Linux version 6.1\nbanger-agent: mounts ok\n",
        );
        assert_eq!(watch.unreachable(), None);
        // Half a line: nothing until its end. The serial console may
        // prefix the agent's line (a kernel message cut into it).
        append(&log, &format!("[    5.2] x {UNREACHABLE_MARK}no port "));
        assert_eq!(watch.unreachable(), None);
        append(&log, "banger.agent\r\nmore\n");
        assert_eq!(watch.unreachable().as_deref(), Some("no port banger.agent"));
        assert_eq!(watch.unreachable(), None, "a line is reported once");
    }

    #[test]
    fn a_console_rotated_or_not_there_yet_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut watch = ConsoleWatch::from_end(&log);
        assert_eq!(watch.unreachable(), None, "no console yet");
        append(&log, &format!("{UNREACHABLE_MARK}first\n"));
        assert_eq!(watch.unreachable().as_deref(), Some("first"));

        append(&log, &"x".repeat(100));
        let mut watch = ConsoleWatch::from_end(&log);
        std::fs::write(&log, format!("{UNREACHABLE_MARK}after rotation\n")).unwrap();
        assert_eq!(watch.unreachable().as_deref(), Some("after rotation"));
    }
}
