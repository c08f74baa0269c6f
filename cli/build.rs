//! Links the unwinder into `banger` statically (libgcc_eh, what
//! `gcc -static-libgcc` uses) on glibc Linux, so libgcc_s.so.1 is no longer
//! needed: the dynamic loader stops mapping and relocating it at every
//! start, and its constructor stops probing the CPU with cpuid (a trap to
//! the hypervisor in a VM). About 0.1 ms of the 1.4 ms `banger --version`
//! costs (docs/testing.md, "CLI start"); panics unwind as before.
//!
//! Nothing changes where that does not apply: another OS or libc, a static
//! C runtime (std then links libgcc_eh itself), a cross build, or a C
//! compiler that does not know libgcc_eh.a.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let glibc_linux = var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let static_crt = var("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|f| f == "crt-static");
    if !glibc_linux || static_crt || var("TARGET") != var("HOST") {
        return;
    }
    let Some(dir) = libgcc_eh_dir() else {
        println!(
            "cargo:warning=libgcc_eh.a not found by the C compiler; banger links libgcc_s.so.1"
        );
        return;
    };
    println!("cargo:rustc-link-search=native={}", dir.display());
    // Whole archive: std's _Unwind_* references come after this library
    // on the link line, so only members taken now satisfy them; with every
    // symbol defined here, --as-needed drops libgcc_s.
    println!("cargo:rustc-link-lib=static:+whole-archive=gcc_eh");
}

/// The directory of the C compiler's libgcc_eh.a (`cc` unless `CC` says).
fn libgcc_eh_dir() -> Option<PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let out = Command::new(cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    // An unknown file is printed back as its bare name.
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    if !path.is_absolute() || !path.is_file() {
        return None;
    }
    path.parent().map(PathBuf::from)
}
