//! Kernels and images as files: OCI images pulled and flattened to ext4
//! ([`images`]), kernels imported, pulled and stored ([`kernels`]), the
//! image catalog's bundles ([`imagecat`]), banger's own OCI artifacts
//! ([`oci_artifact`]), catalog downloads ([`download`]), local builds from
//! the host's distribution packages ([`recipes`]), and the safe handling of
//! untrusted archives and disk images ([`archive`], [`cpio`], [`disk`]).
//!
//! What a catalog says is `banger_api::catalog`; which images a daemon
//! holds (its library, in the store) is `banger_core`.

#![deny(unsafe_code)]

pub mod archive;
pub mod cpio;
#[allow(unsafe_code)]
pub mod disk;
pub mod download;
pub mod file_id;
pub mod imagecat;
pub mod images;
pub mod kernels;
pub mod oci_artifact;
pub mod recipes;
