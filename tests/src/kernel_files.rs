//! Kernel files for tests that hand banger a kernel: a fake x86-64 ELF
//! `vmlinux`, a minimal bzImage around a compressed one, and a modules tree
//! whose boot modules are all built in.

use std::path::Path;

/// A fake x86-64 ELF `vmlinux` (what `bzimage::extract_vmlinux` checks:
/// magic, 64-bit, little endian, e_machine 62), `filler` bytes long after
/// the header.
pub fn fake_elf(filler: usize) -> Vec<u8> {
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(18, 0);
    elf.extend_from_slice(&62u16.to_le_bytes());
    elf.extend(std::iter::repeat_n(0x5a, filler));
    elf
}

/// A minimal bzImage around `payload` (boot protocol 2.15 header:
/// `setup_sects`, `HdrS`, `payload_offset`, `payload_length`), followed by
/// the 4-byte size word a kernel build appends.
pub fn bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
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

/// Writes `<root>/lib/modules/<version>/` with every boot module listed in
/// `modules.builtin` (so no module file is parsed) and one extra module
/// file, `kernel/fs/extra.ko`; returns the version directory.
pub fn modules_tree(root: &Path, version: &str) -> std::path::PathBuf {
    let dir = root.join("lib/modules").join(version);
    std::fs::create_dir_all(dir.join("kernel/fs")).unwrap();
    let builtin: String = banger_artifacts::kernels::DEFAULT_BOOT_MODULES
        .iter()
        .map(|m| format!("kernel/drivers/{m}.ko\n"))
        .collect();
    std::fs::write(dir.join("modules.builtin"), builtin).unwrap();
    std::fs::write(dir.join("kernel/fs/extra.ko"), b"not loaded at boot").unwrap();
    dir
}
