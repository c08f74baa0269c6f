//! Just enough of the ext4 superblock to check a pre-made empty filesystem
//! and give a copy of it an identity of its own: a fresh filesystem UUID and
//! directory hash seed, written into every superblock copy with its
//! checksum recomputed.
//!
//! That is only sound with `metadata_csum_seed`: every other metadata
//! checksum (group descriptors, inodes, bitmaps, directory blocks, the
//! journal's) is seeded from `s_checksum_seed` instead of the UUID, so the
//! superblocks' own checksums are the only ones that change. This is what
//! `tune2fs -U` does on such a filesystem, without the process.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Where the primary superblock starts, whatever the block size.
const PRIMARY: u64 = 1024;
/// A superblock's size.
const SB_LEN: usize = 1024;

const MAGIC: u16 = 0xEF53;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const RO_COMPAT_METADATA_CSUM: u32 = 0x0400;
const COMPAT_SPARSE_SUPER2: u32 = 0x0200;
const INCOMPAT_64BIT: u32 = 0x0080;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const CHECKSUM_TYPE_CRC32C: u8 = 1;

// Byte offsets in `struct ext4_super_block`.
const O_BLOCKS_LO: usize = 0x04;
const O_FIRST_DATA_BLOCK: usize = 0x14;
const O_LOG_BLOCK_SIZE: usize = 0x18;
const O_BLOCKS_PER_GROUP: usize = 0x20;
const O_MAGIC: usize = 0x38;
const O_BLOCK_GROUP_NR: usize = 0x5A;
const O_FEATURE_COMPAT: usize = 0x5C;
const O_FEATURE_INCOMPAT: usize = 0x60;
const O_FEATURE_RO_COMPAT: usize = 0x64;
const O_UUID: usize = 0x68;
const O_VOLUME_NAME: usize = 0x78;
const O_HASH_SEED: usize = 0xEC;
const O_BLOCKS_HI: usize = 0x150;
const O_CHECKSUM_TYPE: usize = 0x175;
const O_BACKUP_BGS: usize = 0x24C;
const O_CHECKSUM: usize = 0x3FC;

/// The fields of a primary superblock that [`super::create_ext4_from_template`]
/// needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Geometry {
    /// Filesystem size in bytes (block count times block size).
    pub bytes: u64,
    /// The volume label, NULs trimmed.
    pub label: Vec<u8>,
    /// Byte offsets of every superblock copy, the primary first.
    pub copies: Vec<u64>,
}

fn u16_at(sb: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([sb[o], sb[o + 1]])
}

fn u32_at(sb: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]])
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads the superblock at `off`.
fn read_sb(f: &File, off: u64) -> io::Result<[u8; SB_LEN]> {
    let mut sb = [0u8; SB_LEN];
    f.read_exact_at(&mut sb, off)?;
    Ok(sb)
}

/// Checks that `f` holds an ext4 filesystem whose UUID can be changed by
/// rewriting its superblocks alone (`metadata_csum` with
/// `metadata_csum_seed`, every superblock copy present with a valid
/// checksum) and returns its geometry. Anything else is `InvalidData`.
pub(super) fn inspect(f: &File) -> io::Result<Geometry> {
    let sb = read_sb(f, PRIMARY)?;
    if u16_at(&sb, O_MAGIC) != MAGIC {
        return Err(invalid("no ext4 superblock (bad magic)".into()));
    }
    let incompat = u32_at(&sb, O_FEATURE_INCOMPAT);
    let ro_compat = u32_at(&sb, O_FEATURE_RO_COMPAT);
    if ro_compat & RO_COMPAT_METADATA_CSUM == 0
        || incompat & INCOMPAT_CSUM_SEED == 0
        || sb[O_CHECKSUM_TYPE] != CHECKSUM_TYPE_CRC32C
    {
        return Err(invalid(
            "not made with metadata_csum and metadata_csum_seed".into(),
        ));
    }
    check_sum(&sb, PRIMARY)?;
    let log = u32_at(&sb, O_LOG_BLOCK_SIZE);
    if log > 6 {
        return Err(invalid(format!(
            "block size 2^{} is out of range",
            10 + log
        )));
    }
    let block = 1024u64 << log;
    let mut blocks = u64::from(u32_at(&sb, O_BLOCKS_LO));
    if incompat & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(&sb, O_BLOCKS_HI)) << 32;
    }
    let first = u64::from(u32_at(&sb, O_FIRST_DATA_BLOCK));
    let per_group = u64::from(u32_at(&sb, O_BLOCKS_PER_GROUP));
    if per_group == 0 || first >= blocks {
        return Err(invalid("inconsistent block counts".into()));
    }
    let groups = (blocks - first).div_ceil(per_group);
    let mut copies = vec![PRIMARY];
    for g in backup_groups(&sb, groups) {
        let off = (first + g * per_group) * block;
        let copy = read_sb(f, off)?;
        if u16_at(&copy, O_MAGIC) != MAGIC
            || u64::from(u16_at(&copy, O_BLOCK_GROUP_NR)) != g & 0xFFFF
            || copy[O_UUID..O_UUID + 16] != sb[O_UUID..O_UUID + 16]
        {
            return Err(invalid(format!(
                "the backup superblock of group {g} is missing or differs"
            )));
        }
        check_sum(&copy, off)?;
        copies.push(off);
    }
    let name = &sb[O_VOLUME_NAME..O_VOLUME_NAME + 16];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(Geometry {
        bytes: blocks * block,
        label: name[..len].to_vec(),
        copies,
    })
}

/// The groups after 0 that hold a backup superblock.
fn backup_groups(sb: &[u8], groups: u64) -> Vec<u64> {
    if u32_at(sb, O_FEATURE_COMPAT) & COMPAT_SPARSE_SUPER2 != 0 {
        let mut v: Vec<u64> = [u32_at(sb, O_BACKUP_BGS), u32_at(sb, O_BACKUP_BGS + 4)]
            .into_iter()
            .map(u64::from)
            .filter(|&g| g != 0 && g < groups)
            .collect();
        v.dedup();
        return v;
    }
    if u32_at(sb, O_FEATURE_RO_COMPAT) & RO_COMPAT_SPARSE_SUPER == 0 {
        return (1..groups).collect();
    }
    // sparse_super: group 1 and the powers of 3, 5 and 7.
    let mut v = Vec::new();
    for base in [3u64, 5, 7] {
        let mut g = base;
        while g < groups {
            v.push(g);
            g *= base;
        }
    }
    if groups > 1 {
        v.push(1);
    }
    v.sort_unstable();
    v
}

fn check_sum(sb: &[u8; SB_LEN], off: u64) -> io::Result<()> {
    let want = checksum(sb);
    let got = u32_at(sb, O_CHECKSUM);
    if got != want {
        return Err(invalid(format!(
            "superblock at byte {off} has checksum {got:#010x}, expected {want:#010x}"
        )));
    }
    Ok(())
}

/// The superblock checksum: crc32c over everything before the field,
/// seeded with !0 and not inverted at the end (as ext4 and e2fsprogs do).
fn checksum(sb: &[u8; SB_LEN]) -> u32 {
    crc32c_update(!0, &sb[..O_CHECKSUM])
}

/// Writes `uuid` and `hash_seed` into every superblock copy of `geo` in `f`
/// and recomputes each copy's checksum. Backups first, the primary last, so
/// a failure half-way leaves a primary that still agrees with itself.
pub(super) fn set_identity(
    f: &File,
    geo: &Geometry,
    uuid: [u8; 16],
    hash_seed: [u8; 16],
) -> io::Result<()> {
    for &off in geo.copies.iter().rev() {
        let mut sb = read_sb(f, off)?;
        sb[O_UUID..O_UUID + 16].copy_from_slice(&uuid);
        sb[O_HASH_SEED..O_HASH_SEED + 16].copy_from_slice(&hash_seed);
        let sum = checksum(&sb);
        sb[O_CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        f.write_all_at(&sb, off)?;
    }
    Ok(())
}

/// A random (version 4, RFC 4122 variant) UUID, as mke2fs makes them.
pub(super) fn random_uuid() -> [u8; 16] {
    let mut u: [u8; 16] = rand::random();
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// The UUID in its usual text form.
#[cfg(test)]
pub(super) fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The primary superblock's UUID.
#[cfg(test)]
pub(super) fn uuid_of(f: &File) -> io::Result<[u8; 16]> {
    let sb = read_sb(f, PRIMARY)?;
    let mut u = [0u8; 16];
    u.copy_from_slice(&sb[O_UUID..O_UUID + 16]);
    Ok(u)
}

const CRC32C_POLY: u32 = 0x82F6_3B78;

const fn crc32c_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C: [u32; 256] = crc32c_table();

/// Castagnoli CRC register update (no pre- or post-inversion).
fn crc32c_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = CRC32C[((crc ^ u32::from(b)) & 0xFF) as usize] ^ (crc >> 8);
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The catalogued check value of CRC-32C over "123456789".
        assert_eq!(!crc32c_update(!0, b"123456789"), 0xE306_9283);
        assert_eq!(!crc32c_update(!0, b""), 0);
    }

    #[test]
    fn sparse_super_backups_are_group_1_and_powers_of_3_5_7() {
        let mut sb = [0u8; SB_LEN];
        sb[O_FEATURE_RO_COMPAT..O_FEATURE_RO_COMPAT + 4]
            .copy_from_slice(&RO_COMPAT_SPARSE_SUPER.to_le_bytes());
        assert_eq!(backup_groups(&sb, 1), Vec::<u64>::new());
        assert_eq!(backup_groups(&sb, 8), [1, 3, 5, 7]);
        assert_eq!(backup_groups(&sb, 50), [1, 3, 5, 7, 9, 25, 27, 49]);
        sb[O_FEATURE_RO_COMPAT] = 0;
        assert_eq!(backup_groups(&sb, 4), [1, 2, 3]);
        sb[O_FEATURE_COMPAT..O_FEATURE_COMPAT + 4]
            .copy_from_slice(&COMPAT_SPARSE_SUPER2.to_le_bytes());
        sb[O_BACKUP_BGS..O_BACKUP_BGS + 4].copy_from_slice(&1u32.to_le_bytes());
        sb[O_BACKUP_BGS + 4..O_BACKUP_BGS + 8].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(backup_groups(&sb, 10), [1, 9]);
        assert_eq!(backup_groups(&sb, 5), [1]);
    }

    #[test]
    fn uuid_text_form_and_version_bits() {
        let u = random_uuid();
        let s = uuid_string(&u);
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert!("89ab".contains(&s[19..20]), "{s}");
        assert_ne!(random_uuid(), u);
    }
}
