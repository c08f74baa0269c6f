//! The uncompressed ELF kernel inside a distribution's `vmlinuz` (an x86
//! bzImage). Firecracker boots only an ELF `vmlinux`, and QEMU's microvm
//! boots one through its PVH entry without decompressing anything, so a
//! distribution kernel is stored as the ELF it carries.
//!
//! Layout (Documentation/arch/x86/boot.rst): `setup_sects` at 0x1f1, the
//! `HdrS` magic at 0x202, `payload_offset`/`payload_length` at 0x248/0x24c
//! (boot protocol 2.08+), counted from the protected-mode code that starts
//! at `(setup_sects + 1) * 512`. The payload is the compressed `vmlinux`;
//! its format is told by its magic.

use std::io::Read;

/// Refuse to inflate a kernel beyond this (a real one is 30–120 MiB).
const MAX_VMLINUX: u64 = 512 << 20;

/// A bzImage whose ELF kernel could not be taken out.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// Not a bzImage, or too old to say where its payload is.
    #[error("Not a bzImage with boot protocol 2.08 or later: {0}")]
    NotBzImage(&'static str),
    /// The payload's compression is one banger does not decode.
    #[error(
        "The kernel payload is compressed with {0}, which banger cannot unpack; use a kernel compressed with zstd, gzip or xz, or import an ELF vmlinux"
    )]
    Unsupported(&'static str),
    /// Decompressing failed.
    #[error("Cannot decompress the kernel payload ({0})")]
    Decompress(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// The result is not an x86-64 ELF file.
    #[error("The kernel payload is not a 64-bit ELF image")]
    NotElf,
    /// The result is larger than any kernel should be.
    #[error("The kernel payload inflates beyond {} MiB", MAX_VMLINUX >> 20)]
    TooLarge,
}

/// The ELF `vmlinux` inside the bzImage `image`.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let payload = payload(image)?;
    let elf = match payload {
        // One frame: the kernel's build appends a size word after it.
        [0x28, 0xb5, 0x2f, 0xfd, ..] => inflate(
            "zstd",
            zstd::stream::read::Decoder::new(payload).map(|d| d.single_frame()),
        ),
        [0x1f, 0x8b, ..] => inflate("gzip", Ok(flate2::read::GzDecoder::new(payload))),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            // The xz decoder refuses trailing data: drop the size word.
            let stream = &payload[..payload.len().saturating_sub(4)];
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut std::io::BufReader::new(stream), &mut out)
                .map_err(|e| BzImageError::Decompress("xz", Box::new(e)))?;
            Ok(out)
        }
        [0x02, 0x21, 0x4c, 0x18, ..] => Err(BzImageError::Unsupported("lz4")),
        [b'B', b'Z', b'h', ..] => Err(BzImageError::Unsupported("bzip2")),
        [0x89, b'L', b'Z', b'O', ..] => Err(BzImageError::Unsupported("lzo")),
        [0x5d, 0, 0, ..] => Err(BzImageError::Unsupported("lzma")),
        _ => Err(BzImageError::Unsupported("an unknown format")),
    }?;
    // ELF magic, 64-bit class, little endian, e_machine x86-64 (62).
    let is_elf = elf.len() > 20
        && elf[..4] == *b"\x7fELF"
        && elf[4] == 2
        && elf[5] == 1
        && u16::from_le_bytes([elf[18], elf[19]]) == 62;
    if !is_elf {
        return Err(BzImageError::NotElf);
    }
    Ok(elf)
}

/// The compressed payload of a bzImage.
fn payload(image: &[u8]) -> Result<&[u8], BzImageError> {
    let u32_at = |off: usize| {
        image
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(BzImageError::NotBzImage("no HdrS magic at 0x202"));
    }
    let version = image
        .get(0x206..0x208)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if version < 0x0208 {
        return Err(BzImageError::NotBzImage("boot protocol older than 2.08"));
    }
    let setup_sects = match image.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Err(BzImageError::NotBzImage("truncated setup header"));
    };
    let start = (setup_sects + 1) * 512 + offset;
    image
        .get(start..start.saturating_add(length))
        .ok_or(BzImageError::NotBzImage("payload lies outside the file"))
}

/// Reads a decoder to its end (trailing bytes after the stream, such as
/// the kernel's appended size word, are ignored by the decoders), bounded.
fn inflate<R: Read>(
    what: &'static str,
    decoder: std::io::Result<R>,
) -> Result<Vec<u8>, BzImageError> {
    let err = |e: std::io::Error| BzImageError::Decompress(what, Box::new(e));
    let mut out = Vec::new();
    decoder
        .map_err(err)?
        .take(MAX_VMLINUX + 1)
        .read_to_end(&mut out)
        .map_err(err)?;
    if out.len() as u64 > MAX_VMLINUX {
        return Err(BzImageError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A minimal bzImage: `setup_sects` sectors of setup after the boot
    /// sector, then `payload` at `payload_offset` 16 in the protected-mode part,
    /// followed by a 4-byte size word as the kernel's build appends.
    fn bzimage(payload: &[u8], setup_sects: u8) -> Vec<u8> {
        let pm = (usize::from(setup_sects) + 1) * 512;
        let mut img = vec![0u8; pm + 16];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&1234u32.to_le_bytes());
        img
    }

    fn fake_elf() -> Vec<u8> {
        let mut e = b"\x7fELF\x02\x01\x01".to_vec();
        e.resize(18, 0);
        e.extend_from_slice(&62u16.to_le_bytes());
        e.extend(std::iter::repeat_n(0xab, 4096));
        e
    }

    #[test]
    fn unpacks_zstd_gzip_and_xz_payloads() {
        let elf = fake_elf();
        let zst = zstd::encode_all(&elf[..], 3).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &elf[..], &mut xz).unwrap();
        for (what, payload) in [("zstd", zst), ("gzip", gz), ("xz", xz)] {
            let got = extract_vmlinux(&bzimage(&payload, 27)).unwrap();
            assert_eq!(got, elf, "{what}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_unpack_naming_why() {
        let lz4 = bzimage(&[0x02, 0x21, 0x4c, 0x18, 9, 9], 4);
        assert!(
            extract_vmlinux(&lz4)
                .unwrap_err()
                .to_string()
                .contains("compressed with lz4")
        );
        let not_elf = bzimage(&zstd::encode_all(&b"plain text"[..], 1).unwrap(), 4);
        assert!(matches!(
            extract_vmlinux(&not_elf),
            Err(BzImageError::NotElf)
        ));
        let mut no_magic = bzimage(&[1, 2, 3], 4);
        no_magic[0x202] = b'X';
        assert!(matches!(
            extract_vmlinux(&no_magic),
            Err(BzImageError::NotBzImage(_))
        ));
        let mut truncated = bzimage(&zstd::encode_all(&fake_elf()[..], 1).unwrap(), 4);
        truncated.truncate(600);
        assert!(matches!(
            extract_vmlinux(&truncated),
            Err(BzImageError::NotBzImage(_))
        ));
    }
}
