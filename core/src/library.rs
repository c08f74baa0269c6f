//! The image library: the images VMs are created from. Managed images live
//! in `<state>/images/<name>/` (rootfs and, for promoted ones, their kernel
//! files); registered images point at files banger does not own.
//!
//! Every image that banger writes is built in a staging directory next to its
//! final place and published by rename, with the row inserted last; a failure
//! removes the staging directory, and leftovers of a crash are removed at
//! daemon start ([`ImageLibrary::cleanup_staging`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::store::{Store, StoreError};
use banger_api::model::{
    ImageKernel, ImageRecord, ImageSource, VmRecord, now_unix, validate_artifact_name,
};
use banger_api::paths::Paths;
use banger_artifacts::disk;

pub use banger_artifacts::imagecat::ROOTFS_FILE;
const STAGING_PREFIX: &str = ".staging-";

pub use banger_api::api::RegisterImageRequest;

/// An image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The request is invalid; the message names the input and the fix.
    #[error("{0}")]
    Invalid(String),
    /// No image has that name.
    #[error("No image named {0:?}; see `banger image list`")]
    NotFound(String),
    /// VMs were created from the image.
    #[error("Image {name} is used by {vms}; delete those VMs first")]
    InUse {
        /// The image.
        name: String,
        /// Comma-separated VM names.
        vms: String,
    },
    /// The image is already managed by banger.
    #[error("Image {0} is already managed by banger; nothing to promote")]
    AlreadyManaged(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Copying image files failed.
    #[error("Cannot copy {0}")]
    Copy(PathBuf, #[source] disk::DiskError),
    /// Filesystem work failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
}

/// The image library.
#[derive(Debug, Clone)]
pub struct ImageLibrary {
    dir: PathBuf,
    store: Arc<Store>,
}

/// A staging directory that removes itself unless published.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    published: bool,
}

impl Staging {
    /// The directory to build the image in.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> LibraryError {
    move |e| LibraryError::Io(what, e)
}

fn check_file(flag: &'static str, p: &Path, what: &'static str) -> Result<(), LibraryError> {
    banger_api::paths::check_input_file(flag, p, what)
        .map_err(|e| LibraryError::Invalid(e.to_string()))
}

impl ImageLibrary {
    /// The library under `paths`' state dir.
    pub fn new(paths: &Paths, store: Arc<Store>) -> Self {
        ImageLibrary {
            dir: paths.state_dir.join("images"),
            store,
        }
    }

    /// Where managed images live.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes staging directories a crash left behind. Returns how many.
    pub fn cleanup_staging(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let mut n = 0;
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(STAGING_PREFIX)
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// Checks `name` is valid and free before any work is done for it.
    pub fn check_new_name(&self, name: &str) -> Result<(), LibraryError> {
        validate_artifact_name("image", name).map_err(|e| LibraryError::Invalid(e.to_string()))?;
        if self.store.get_image(name)?.is_some() {
            return Err(StoreError::ImageNameTaken(name.to_string()).into());
        }
        Ok(())
    }

    /// A fresh staging directory for image `name`.
    pub fn stage(&self, name: &str) -> Result<Staging, LibraryError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io(format!("Cannot create {}", self.dir.display())))?;
        let dir = self.dir.join(format!(
            "{STAGING_PREFIX}{name}-{:08x}",
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).map_err(io(format!("Cannot create {}", dir.display())))?;
        Ok(Staging {
            dir,
            published: false,
        })
    }

    /// Publishes a staged image directory as `record.name`: the directory is
    /// renamed into place, then the row is inserted; if the insert fails the
    /// directory is removed again. `record`'s paths must point into the
    /// staging dir; they are rewritten to the final place.
    pub fn publish(
        &self,
        mut staging: Staging,
        mut record: ImageRecord,
    ) -> Result<ImageRecord, LibraryError> {
        let final_dir = self.dir.join(&record.name);
        let rebase = |p: &Path| -> PathBuf {
            p.strip_prefix(&staging.dir)
                .map(|rel| final_dir.join(rel))
                .unwrap_or_else(|_| p.to_path_buf())
        };
        record.rootfs = rebase(&record.rootfs);
        if let ImageKernel::Files { kernel, initrd } = &mut record.kernel {
            *kernel = rebase(kernel);
            if let Some(i) = initrd {
                *i = rebase(i);
            }
        }
        if final_dir.exists() {
            return Err(LibraryError::Invalid(format!(
                "{} already exists but no image {} is recorded; remove it or pick another --name",
                final_dir.display(),
                record.name
            )));
        }
        std::fs::rename(&staging.dir, &final_dir)
            .map_err(io(format!("Cannot publish {}", final_dir.display())))?;
        staging.published = true;
        if let Err(e) = self.store.insert_image(&record) {
            let _ = std::fs::remove_dir_all(&final_dir);
            return Err(e.into());
        }
        Ok(record)
    }

    /// Registers an existing rootfs in place (banger will not own or delete it).
    pub fn register(&self, req: RegisterImageRequest) -> Result<ImageRecord, LibraryError> {
        self.check_new_name(&req.name)?;
        check_file("--rootfs", &req.rootfs, "root filesystem image")?;
        let kernel = match (&req.kernel_ref, &req.kernel) {
            (Some(r), None) => {
                if req.initrd.is_some() {
                    return Err(LibraryError::Invalid(
                        "--initrd goes with --kernel; a --kernel-ref kernel brings its own"
                            .to_string(),
                    ));
                }
                validate_artifact_name("kernel", r)
                    .map_err(|e| LibraryError::Invalid(e.to_string()))?;
                ImageKernel::Named { name: r.clone() }
            }
            (None, Some(_)) if req.modules.is_some() => {
                return Err(LibraryError::Invalid(
                    "--modules needs the kernel imported first (Artifacts::register_image)"
                        .to_string(),
                ));
            }
            (None, Some(k)) => {
                check_file("--kernel", k, "kernel image (vmlinux)")?;
                if let Some(i) = &req.initrd {
                    check_file("--initrd", i, "initrd image")?;
                }
                ImageKernel::Files {
                    kernel: k.clone(),
                    initrd: req.initrd.clone(),
                }
            }
            _ => {
                return Err(LibraryError::Invalid(
                    "Pass exactly one of --kernel-ref NAME or --kernel PATH".to_string(),
                ));
            }
        };
        let size_bytes = std::fs::metadata(&req.rootfs).map(|m| m.len()).unwrap_or(0);
        let record = ImageRecord {
            name: req.name,
            rootfs: req.rootfs,
            kernel,
            source: ImageSource::Registered,
            managed: false,
            size_bytes,
            layers: Vec::new(),
            created_at: now_unix(),
        };
        self.store.insert_image(&record)?;
        Ok(record)
    }

    /// Copies a registered image's files into banger's state so it no longer
    /// depends on them.
    pub fn promote(&self, name: &str) -> Result<ImageRecord, LibraryError> {
        let old = self.get(name)?;
        if old.managed {
            return Err(LibraryError::AlreadyManaged(name.to_string()));
        }
        let staging = self.stage(name)?;
        let rootfs = staging.path().join(ROOTFS_FILE);
        disk::clone_file(&old.rootfs, &rootfs)
            .map_err(|e| LibraryError::Copy(old.rootfs.clone(), e))?;
        let kernel = match &old.kernel {
            ImageKernel::Named { .. } => old.kernel.clone(),
            ImageKernel::Files { kernel, initrd } => {
                let k = staging.path().join("vmlinux");
                disk::clone_file(kernel, &k).map_err(|e| LibraryError::Copy(kernel.clone(), e))?;
                let i = match initrd {
                    Some(i) => {
                        let dst = staging.path().join("initrd");
                        disk::clone_file(i, &dst).map_err(|e| LibraryError::Copy(i.clone(), e))?;
                        Some(dst)
                    }
                    None => None,
                };
                ImageKernel::Files {
                    kernel: k,
                    initrd: i,
                }
            }
        };
        let record = ImageRecord {
            rootfs,
            kernel,
            source: ImageSource::Promoted {
                from: old.rootfs.clone(),
            },
            managed: true,
            ..old.clone()
        };
        // Swap the row: delete the registration, publish the managed copy; if
        // publishing fails, put the registration back.
        self.store.delete_image(name)?;
        match self.publish(staging, record) {
            Ok(r) => Ok(r),
            Err(e) => {
                let _ = self.store.insert_image(&old);
                Err(e)
            }
        }
    }

    /// Every image.
    pub fn list(&self) -> Result<Vec<ImageRecord>, LibraryError> {
        Ok(self.store.list_images()?)
    }

    /// One image.
    pub fn get(&self, name: &str) -> Result<ImageRecord, LibraryError> {
        self.store
            .get_image(name)?
            .ok_or_else(|| LibraryError::NotFound(name.to_string()))
    }

    /// Deletes an image unless a VM in `vms` was created from it; a managed
    /// image's files go with it, a registered image's files are left alone.
    pub fn delete(&self, name: &str, vms: &[VmRecord]) -> Result<ImageRecord, LibraryError> {
        let image = self.get(name)?;
        let users: Vec<&str> = vms
            .iter()
            .filter(|vm| vm.spec.rootfs_source == image.rootfs)
            .map(|vm| vm.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(LibraryError::InUse {
                name: name.to_string(),
                vms: users.join(", "),
            });
        }
        self.store.delete_image(name)?;
        if image.managed {
            let dir = self.dir.join(name);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(LibraryError::Io(
                        format!("Cannot remove {}", dir.display()),
                        e,
                    ));
                }
            }
        }
        Ok(image)
    }
}
