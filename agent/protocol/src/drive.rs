//! The config drive: a small read-only block device holding one
//! [`ConfigDrive`] (the guest config bundle plus the drive order), so the
//! agent needs no filesystem driver to read it and no guessing to find
//! devices.
//!
//! Layout (version 1), all integers little-endian:
//!
//! ```text
//! offset 0    magic     8 bytes  "BANGRCFG"
//! offset 8    version   u32      1
//! offset 12   reserved  u32      0
//! offset 16   length    u64      payload bytes
//! offset 24   sha256    32 bytes of the payload
//! offset 56   zero padding to 512
//! offset 512  payload   JSON of ConfigDrive
//!             zero padding to a multiple of 4096 (block devices)
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::GuestConfig;

/// First bytes of every config drive.
pub const MAGIC: &[u8; 8] = b"BANGRCFG";
/// Format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Size of the header block.
pub const HEADER_LEN: usize = 512;
/// Largest payload accepted (the bundle carries files, so be generous).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Everything on the config drive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDrive {
    /// Drive ids in attach order: index 0 is `/dev/vda`, 1 is `/dev/vdb`, ...
    pub drives: Vec<String>,
    /// The guest config bundle.
    pub guest: GuestConfig,
}

/// A config drive that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveError {
    /// Not a banger config drive.
    #[error("Not a banger config drive (bad magic)")]
    BadMagic,
    /// Written by a newer banger.
    #[error(
        "Config drive format version {0} is not supported by this agent (it reads version {VERSION}); update the agent"
    )]
    Version(u32),
    /// Truncated or oversized.
    #[error("Config drive payload of {0} bytes is truncated or too large")]
    Length(u64),
    /// The payload does not match its checksum.
    #[error("Config drive payload checksum mismatch (corrupt drive)")]
    Checksum,
    /// The payload is not valid JSON for this version.
    #[error("Config drive payload is invalid: {0}")]
    Payload(String),
}

impl ConfigDrive {
    /// The bytes of the drive image.
    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings, vectors and maps always serialises.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + 4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&Sha256::digest(&payload));
        out.resize(HEADER_LEN, 0);
        out.extend_from_slice(&payload);
        let padded = out.len().div_ceil(4096) * 4096;
        out.resize(padded, 0);
        out
    }

    /// Reads a drive image (or the start of the block device).
    pub fn decode(bytes: &[u8]) -> Result<ConfigDrive, DriveError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(DriveError::BadMagic);
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(DriveError::Version(version));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[16..24]);
        let len = u64::from_le_bytes(len_bytes);
        if len > MAX_PAYLOAD || (bytes.len() as u64) < HEADER_LEN as u64 + len {
            return Err(DriveError::Length(len));
        }
        let payload = &bytes[HEADER_LEN..HEADER_LEN + len as usize];
        if Sha256::digest(payload).as_slice() != &bytes[24..56] {
            return Err(DriveError::Checksum);
        }
        serde_json::from_slice(payload).map_err(|e| DriveError::Payload(e.to_string()))
    }

    /// The block device holding drive `id`, by attach order (`/dev/vdb`).
    pub fn device_of(&self, id: &str) -> Option<String> {
        let i = self.drives.iter().position(|d| d == id)?;
        let letter = char::from(b'a' + u8::try_from(i).ok().filter(|i| *i < 26)?);
        Some(format!("/dev/vd{letter}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::GuestMount;

    fn sample() -> ConfigDrive {
        let mut guest = GuestConfig::new("dev");
        guest
            .add_mount(GuestMount {
                drive_id: "work".into(),
                mount_point: "/root".into(),
                fstype: "ext4".into(),
                read_only: false,
            })
            .unwrap();
        ConfigDrive {
            drives: vec!["root".into(), "work".into(), "config".into()],
            guest,
        }
    }

    #[test]
    fn round_trips_and_is_block_aligned() {
        let d = sample();
        let bytes = d.encode();
        assert_eq!(bytes.len() % 4096, 0);
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(ConfigDrive::decode(&bytes).unwrap(), d);
    }

    #[test]
    fn maps_drive_ids_to_devices_by_attach_order() {
        let d = sample();
        assert_eq!(d.device_of("root").as_deref(), Some("/dev/vda"));
        assert_eq!(d.device_of("work").as_deref(), Some("/dev/vdb"));
        assert_eq!(d.device_of("nope"), None);
    }

    #[test]
    fn rejects_corruption_truncation_and_other_versions() {
        let good = sample().encode();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(ConfigDrive::decode(&bad), Err(DriveError::BadMagic));
        let mut newer = good.clone();
        newer[8] = 2;
        assert_eq!(ConfigDrive::decode(&newer), Err(DriveError::Version(2)));
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 3] ^= 1;
        assert_eq!(ConfigDrive::decode(&flipped), Err(DriveError::Checksum));
        let len = u64::from_le_bytes(good[16..24].try_into().unwrap()) as usize;
        assert!(matches!(
            ConfigDrive::decode(&good[..HEADER_LEN + len - 1]),
            Err(DriveError::Length(_))
        ));
    }
}
