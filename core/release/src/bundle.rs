//! Packing the two bundle formats a catalog serves, byte for byte what
//! `banger kernel pull` and `banger image pull` extract: a zstd-compressed
//! tar of regular files at the top level.
//!
//! Tar headers are deterministic (fixed mtime, uid/gid 0, normalised
//! modes), so packing the same files twice gives the same blob and a
//! re-release uploads nothing new. Files are stored whole, never as GNU
//! sparse entries: banger's extractor accepts regular files only, and zstd
//! shrinks the empty part of an ext4 image to almost nothing anyway.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;

/// One top-level file of a bundle.
#[derive(Debug)]
pub enum Member<'a> {
    /// Copied from a file on disk.
    File(&'a Path),
    /// Small generated text (a manifest).
    Text(String),
}

/// Writes `members` (name in the archive, content) as a `.tar.zst` at `out`
/// with zstd `level`.
pub fn pack(out: &Path, level: i32, members: &[(&str, Member<'_>)]) -> anyhow::Result<()> {
    let file = File::create(out).with_context(|| format!("Cannot create {}", out.display()))?;
    let encoder = zstd::stream::write::Encoder::new(BufWriter::new(file), level)
        .with_context(|| format!("Cannot start zstd for {}", out.display()))?;
    let mut tar = tar::Builder::new(encoder);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.sparse(false);
    tar.follow_symlinks(true);
    for (name, member) in members {
        match member {
            Member::File(path) => tar
                .append_path_with_name(path, name)
                .with_context(|| format!("Cannot add {} to {}", path.display(), out.display()))?,
            Member::Text(text) => {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(text.len() as u64);
                header.set_mtime(0);
                tar.append_data(&mut header, name, text.as_bytes())
                    .with_context(|| format!("Cannot add {name} to {}", out.display()))?;
            }
        }
    }
    let encoder = tar
        .into_inner()
        .with_context(|| format!("Cannot finish the tar of {}", out.display()))?;
    let mut writer = encoder
        .finish()
        .with_context(|| format!("Cannot finish zstd for {}", out.display()))?;
    writer
        .flush()
        .with_context(|| format!("Cannot write {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Read;

    use super::*;

    fn members_of(path: &Path) -> Vec<(String, tar::EntryType, Vec<u8>)> {
        let decoder = zstd::stream::read::Decoder::new(File::open(path).unwrap()).unwrap();
        let mut archive = tar::Archive::new(decoder);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let kind = e.header().entry_type();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (name, kind, data)
            })
            .collect()
    }

    #[test]
    fn packs_regular_top_level_files_even_for_sparse_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("disk");
        let f = File::create(&sparse).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let out = dir.path().join("b.tar.zst");
        pack(
            &out,
            3,
            &[
                ("rootfs.ext4", Member::File(&sparse)),
                ("manifest.toml", Member::Text("kernel = \"k\"\n".into())),
            ],
        )
        .unwrap();
        let members = members_of(&out);
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0, "rootfs.ext4");
        assert_eq!(members[0].1, tar::EntryType::Regular);
        assert_eq!(members[0].2.len(), 8 << 20);
        assert_eq!(members[1].0, "manifest.toml");
        assert_eq!(members[1].2, b"kernel = \"k\"\n");
    }

    #[test]
    fn packing_twice_gives_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("vmlinux");
        std::fs::write(&input, b"kernel bytes").unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for out in [&a, &b] {
            pack(out, 3, &[("vmlinux", Member::File(&input))]).unwrap();
            // A later mtime must not change the archive.
            File::options()
                .write(true)
                .open(&input)
                .unwrap()
                .set_modified(std::time::SystemTime::now())
                .unwrap();
        }
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    }
}
