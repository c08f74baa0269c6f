//! Images and kernels as the daemon serves them: the image library, local
//! kernels and the kernel catalog, and how `vm create` turns `--image`,
//! `--kernel-ref`, `--kernel` and `--rootfs` into boot files, pulling what is
//! missing as a visible stage.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::library::{ImageLibrary, LibraryError, RegisterImageRequest};
use crate::store::Store;
use banger_api::api::CreateVmRequest;
use banger_api::config::Config;
use banger_api::model::{ByteSize, ImageKernel, ImageRecord, ImageSource, now_unix};
use banger_api::paths::Paths;
use banger_api::progress::Progress;
use banger_artifacts::disk::spares::Spares;
use banger_artifacts::imagecat::ImageCatalog;
use banger_artifacts::images::{PruneReport, PullEvent, PullOptions, default_image_name};
use banger_artifacts::kernels::{
    Catalog, KernelError, KernelFiles, KernelStore, LocalKernel, PullProgress,
};

/// An image or kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The request is invalid; the message names the input and the fix.
    #[error("{0}")]
    Invalid(String),
    /// A kernel operation failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// An image library operation failed.
    #[error(transparent)]
    Library(#[from] LibraryError),
    /// An image catalog operation failed.
    #[error(transparent)]
    ImageCatalog(#[from] banger_artifacts::imagecat::ImageCatalogError),
    /// An OCI pull failed.
    #[error(transparent)]
    Oci(#[from] banger_artifacts::images::ImageError),
    /// A local build failed.
    #[error(transparent)]
    Recipe(#[from] banger_artifacts::recipes::RecipeError),
    /// A blocking task died.
    #[error("Internal task failed")]
    Join(#[from] tokio::task::JoinError),
}

impl From<banger_api::catalog::CatalogError> for ArtifactError {
    fn from(e: banger_api::catalog::CatalogError) -> Self {
        if e.kind() == "kernel" {
            ArtifactError::Kernel(e.into())
        } else {
            ArtifactError::ImageCatalog(e.into())
        }
    }
}

/// The files a new VM boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFiles {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd, if any.
    pub initrd: Option<PathBuf>,
    /// Root filesystem to clone.
    pub rootfs: PathBuf,
}

pub use banger_api::api::PullImageRequest;

/// The daemon's images and kernels.
#[derive(Debug)]
pub struct Artifacts {
    /// Local images.
    pub library: ImageLibrary,
    /// Local kernels.
    pub kernels: KernelStore,
    kernel_catalog: Catalog,
    image_catalog: ImageCatalog,
    oci: PullOptions,
    /// banger's cache directory: local build scratch and package lists.
    cache_dir: PathBuf,
    /// Serialises pulls so two requests for one artifact do not race.
    pulls: tokio::sync::Mutex<()>,
    /// Root disks copied ahead of time for the images used last.
    pub spares: Spares,
    /// The same for the disks of the snapshots restored last
    /// (`docs/snapshots.md`): two per `rootfs_spares`, a snapshot having a
    /// root and a work disk.
    pub snapshot_spares: Spares,
}

impl Artifacts {
    /// Assembles the artifact stores from the configuration.
    pub fn new(paths: &Paths, store: Arc<Store>, config: &Config) -> Result<Self, ArtifactError> {
        let mut kernel_catalog = match &config.kernel_catalog_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ArtifactError::Invalid(format!(
                        "Cannot read kernel_catalog_file {}: {e}",
                        path.display()
                    ))
                })?;
                Catalog::parse(&text)?
            }
            None => Catalog::embedded()?,
        };
        if let Some(url) = &config.kernel_catalog_url {
            kernel_catalog = kernel_catalog.with_base_url(url.clone());
        }
        let mut image_catalog = match &config.image_catalog_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ArtifactError::Invalid(format!(
                        "Cannot read image_catalog_file {}: {e}",
                        path.display()
                    ))
                })?;
                ImageCatalog::parse(&text)?
            }
            None => ImageCatalog::embedded()?,
        };
        if let Some(url) = &config.image_catalog_url {
            image_catalog = image_catalog.with_base_url(url.clone());
        }
        let spares_dir = paths.state_dir.join("spares");
        let spares = Spares::open(&spares_dir, config.rootfs_spares as usize)
            .map_err(|e| LibraryError::Io(format!("Cannot create {}", spares_dir.display()), e))?;
        let snapshot_spares_dir = paths.state_dir.join("snapshot-spares");
        let snapshot_spares = Spares::open(&snapshot_spares_dir, 2 * config.rootfs_spares as usize)
            .map_err(|e| {
                LibraryError::Io(
                    format!("Cannot create {}", snapshot_spares_dir.display()),
                    e,
                )
            })?;
        Ok(Artifacts {
            library: ImageLibrary::new(paths, store),
            kernels: KernelStore::new(paths.state_dir.join("kernels")),
            kernel_catalog,
            image_catalog,
            oci: PullOptions {
                insecure_registries: config.insecure_registries.clone(),
                docker_config: None,
                cache_dir: paths.cache_dir.join("oci"),
                size: None,
                layer_limits: config.image_layer_limits,
            },
            cache_dir: paths.cache_dir.clone(),
            pulls: tokio::sync::Mutex::new(()),
            spares,
            snapshot_spares,
        })
    }

    /// Removes staging left by a crash mid-pull. Called at daemon start.
    pub fn cleanup_staging(&self) -> usize {
        self.library.cleanup_staging() + self.kernels.cleanup_staging().unwrap_or(0)
    }

    /// The kernel catalog.
    pub fn kernel_catalog(&self) -> &Catalog {
        &self.kernel_catalog
    }

    /// The image catalog.
    pub fn image_catalog(&self) -> &ImageCatalog {
        &self.image_catalog
    }

    /// Pulls a kernel from the catalog.
    pub async fn pull_kernel(
        &self,
        name: &str,
        force: bool,
        progress: &Progress,
    ) -> Result<LocalKernel, ArtifactError> {
        let _one = self.pulls.lock().await;
        let entry = self.kernel_catalog.find(name)?;
        progress.stage(
            "pull_kernel",
            format!(
                "pulling kernel {name} ({} {}) from the catalog",
                entry.distro, entry.version
            ),
        );
        let label = format!("kernel {name}");
        let kernel = banger_artifacts::kernels::pull(
            &self.kernels,
            &self.kernel_catalog,
            name,
            force,
            &self.oci,
            |p| match p {
                PullProgress::Downloading { received, total } => {
                    progress.bytes(&label, received, known_total(total))
                }
                PullProgress::Verified => {
                    progress.log_info(&format!("kernel {name}: checksum verified"))
                }
            },
        )
        .await?;
        Ok(kernel)
    }

    /// Pulls an image: from the image catalog if it names an entry there,
    /// else from an OCI registry, flattened to ext4. Its kernel is resolved
    /// (pulled if needed) first, so the result is bootable.
    pub async fn pull_image(
        &self,
        req: PullImageRequest,
        progress: &Progress,
    ) -> Result<ImageRecord, ArtifactError> {
        if self.image_catalog.find(&req.reference).is_some() {
            return self.pull_bundle(req, progress).await;
        }
        let name = match &req.name {
            Some(n) => n.clone(),
            None => default_image_name(&req.reference)?,
        };
        let size = req
            .size
            .as_deref()
            .map(str::parse::<ByteSize>)
            .transpose()
            .map_err(|e| ArtifactError::Invalid(format!("--size: {e}")))?;
        {
            let library = self.library.clone();
            let n = name.clone();
            tokio::task::spawn_blocking(move || library.check_new_name(&n)).await??;
        }
        let files = kernel_files(&req.kernel_ref, &req.kernel, &req.initrd, &req.modules)?;
        let imported = self.import_image_kernel(&name, files, progress).await?;
        let kernel = match (&imported, &req.kernel_ref) {
            (Some(k), _) => k.name().to_string(),
            (None, Some(k)) => k.clone(),
            (None, None) => self
                .kernel_catalog
                .default_entry()
                .map(|e| e.name.clone())
                .ok_or_else(|| {
                    ArtifactError::Invalid(
                        "Pass --kernel-ref NAME or --kernel PATH (the kernel catalog has no default)"
                            .into(),
                    )
                })?,
        };
        self.ensure_kernel(&kernel, progress).await?;

        let _one = self.pulls.lock().await;
        let staging = self.library.stage(&name)?;
        progress.stage(
            "pull_image",
            format!("pulling {} as image {name}", req.reference),
        );
        let opts = PullOptions {
            size,
            ..self.oci.clone()
        };
        let pulled = banger_artifacts::images::pull_rootfs(
            &req.reference,
            staging.path(),
            &opts,
            |e| match e {
                PullEvent::Resolved { digest, layers } => {
                    progress.log_info(&format!("resolved {digest} ({layers} layers)"))
                }
                PullEvent::LayerCached { digest } => {
                    progress.log_info(&format!("layer {digest}: cached"))
                }
                PullEvent::LayerProgress {
                    digest,
                    received,
                    total,
                } => progress.bytes(&format!("layer {digest}"), received, total),
                PullEvent::LayerDownloaded { digest, bytes } => {
                    progress.log_info(&format!("layer {digest}: downloaded {bytes} bytes"))
                }
                PullEvent::Applying { digest } => progress.log_info(&format!("applying {digest}")),
                PullEvent::BuildingFilesystem { size } => {
                    progress.stage("build_rootfs", format!("building a {size} ext4"))
                }
                PullEvent::FlattenedCached { digest, size } => progress.stage(
                    "clone_rootfs",
                    format!("{digest} was flattened before: cloning its {size} ext4"),
                ),
            },
        )
        .await?;
        let record = ImageRecord {
            name,
            rootfs: pulled.rootfs,
            kernel: ImageKernel::Named { name: kernel },
            source: ImageSource::Oci {
                reference: req.reference,
                digest: pulled.digest,
            },
            managed: true,
            size_bytes: pulled.size.0,
            layers: pulled.layers,
            created_at: now_unix(),
        };
        progress.stage("publish", format!("publishing image {}", record.name));
        let library = self.library.clone();
        let published =
            tokio::task::spawn_blocking(move || library.publish(staging, record)).await??;
        if let Some(k) = imported {
            k.keep();
        }
        Ok(published)
    }

    /// Pulls an image catalog bundle, resolves its kernel and publishes it.
    async fn pull_bundle(
        &self,
        req: PullImageRequest,
        progress: &Progress,
    ) -> Result<ImageRecord, ArtifactError> {
        if req.size.is_some() {
            return Err(ArtifactError::Invalid(format!(
                "--size does not apply to catalog image {}: its root filesystem comes ready-made",
                req.reference
            )));
        }
        let name = req.name.clone().unwrap_or_else(|| req.reference.clone());
        {
            let library = self.library.clone();
            let n = name.clone();
            tokio::task::spawn_blocking(move || library.check_new_name(&n)).await??;
        }
        let files = kernel_files(&req.kernel_ref, &req.kernel, &req.initrd, &req.modules)?;
        let imported = self.import_image_kernel(&name, files, progress).await?;
        let one = self.pulls.lock().await;
        let staging = self.library.stage(&name)?;
        progress.stage(
            "pull_image",
            format!("pulling {} from the image catalog", req.reference),
        );
        let label = format!("image {}", req.reference);
        let bundle = banger_artifacts::imagecat::pull_bundle(
            &self.image_catalog,
            &req.reference,
            staging.path(),
            &self.oci,
            |p| {
                if let PullProgress::Downloading { received, total } = p {
                    progress.bytes(&label, received, known_total(total));
                }
            },
        )
        .await?;
        // The kernel pull below takes the same lock.
        drop(one);
        let kernel = match (&imported, &req.kernel_ref) {
            (Some(k), _) => k.name().to_string(),
            (None, Some(k)) => k.clone(),
            (None, None) => bundle.manifest.kernel_ref.clone(),
        };
        self.ensure_kernel(&kernel, progress).await?;
        let mut record = bundle.record(&name);
        record.kernel = ImageKernel::Named { name: kernel };
        progress.stage("publish", format!("publishing image {name}"));
        let library = self.library.clone();
        let published =
            tokio::task::spawn_blocking(move || library.publish(staging, record)).await??;
        if let Some(k) = imported {
            k.keep();
        }
        Ok(published)
    }

    /// Registers an existing root filesystem in place. A `--kernel` that
    /// banger must derive files from (a compressed kernel to unpack,
    /// `--modules` to make the boot initrd from) is imported into the
    /// kernel library as `<image>-kernel` and the image names it; a plain
    /// ELF kernel (and initrd) stays where it is, like the rootfs.
    pub async fn register_image(
        &self,
        mut req: RegisterImageRequest,
    ) -> Result<ImageRecord, ArtifactError> {
        let files = kernel_files(&req.kernel_ref, &req.kernel, &req.initrd, &req.modules)?;
        let must_import = match &files {
            Some(f) if f.modules.is_none() => {
                let kernel = f.kernel.clone();
                !tokio::task::spawn_blocking(move || {
                    banger_artifacts::kernels::is_elf_kernel(&kernel)
                })
                .await??
            }
            Some(_) => true,
            None => false,
        };
        let imported = if must_import {
            let library = self.library.clone();
            let n = req.name.clone();
            tokio::task::spawn_blocking(move || library.check_new_name(&n)).await??;
            let imported = self
                .import_image_kernel(&req.name, files, &Progress::none())
                .await?;
            if let Some(k) = &imported {
                req.kernel_ref = Some(k.name().to_string());
                (req.kernel, req.initrd, req.modules) = (None, None, None);
            }
            imported
        } else {
            None
        };
        let library = self.library.clone();
        let record = tokio::task::spawn_blocking(move || library.register(req)).await??;
        if let Some(k) = imported {
            k.keep();
        }
        Ok(record)
    }

    /// Imports the kernel files given for image `image` (`--kernel`,
    /// `--initrd`, `--modules`) as kernel `<image>-kernel`, exactly as
    /// `kernel import` would; removed again if the image is not made.
    async fn import_image_kernel(
        &self,
        image: &str,
        files: Option<KernelFiles>,
        progress: &Progress,
    ) -> Result<Option<ImageKernelImport>, ArtifactError> {
        let Some(files) = files else {
            return Ok(None);
        };
        let name = format!("{image}-kernel");
        if banger_artifacts::kernels::validate_name(&name).is_err() {
            return Err(ArtifactError::Invalid(format!(
                "--kernel files are imported as kernel {name:?}, which is longer than a kernel name may be (64); pick a shorter image --name"
            )));
        }
        progress.stage(
            "import_kernel",
            format!(
                "importing --kernel {} as kernel {name}",
                files.kernel.display()
            ),
        );
        let kernels = self.kernels.clone();
        let n = name.clone();
        // The guard is made in the task, so a request cancelled meanwhile
        // drops it with the task's output and the kernel goes again.
        let import = move || {
            kernels.import_files(&n, &files)?;
            Ok(ImageKernelImport {
                store: kernels,
                name: Some(n),
            })
        };
        match tokio::task::spawn_blocking(import).await? {
            Ok(imported) => Ok(Some(imported)),
            Err(KernelError::AlreadyExists(_)) => Err(ArtifactError::Invalid(format!(
                "Kernel {name} already exists: --kernel files are imported as kernel `<image>-kernel` (one made for an earlier image of that name is kept after `image delete`); use it with --kernel-ref {name}, or remove it first (`banger kernel rm {name}`)"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes cached OCI layers no image refers to.
    pub async fn prune_cache(&self) -> Result<PruneReport, ArtifactError> {
        let _one = self.pulls.lock().await;
        let library = self.library.clone();
        let cache = self.oci.cache_dir.clone();
        tokio::task::spawn_blocking(move || {
            // Layers and (for kept flattened images) manifest digests.
            let mut keep = HashSet::new();
            for image in library.list()? {
                if let ImageSource::Oci { digest, .. } = &image.source {
                    keep.insert(digest.clone());
                }
                keep.extend(image.layers);
            }
            Ok(banger_artifacts::images::cache_prune(&cache, &keep)?)
        })
        .await?
    }

    /// A local image, pulled from the image catalog first if it is not local.
    pub async fn ensure_image(
        &self,
        name: &str,
        progress: &Progress,
    ) -> Result<ImageRecord, ArtifactError> {
        let library = self.library.clone();
        let n = name.to_string();
        match tokio::task::spawn_blocking(move || library.get(&n)).await? {
            Ok(image) => return Ok(image),
            Err(LibraryError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(entry) = self.image_catalog.find(name) else {
            return Err(ArtifactError::Invalid(format!(
                "Image {name:?} is neither local nor in the image catalog; see `banger image list --available`, or pull an OCI image with `banger image pull REF --name {name}`"
            )));
        };
        let got = if entry.sources.is_published() {
            let req = PullImageRequest {
                reference: name.to_string(),
                ..Default::default()
            };
            match self.pull_image(req, progress).await {
                Err(e) if entry.sources.recipe.is_some() && unreachable(&e) => {
                    progress.log_warn(&format!(
                        "image {name}: the published artifact cannot be reached ({}); building it here instead",
                        banger_api::error::render_chain(&e)
                    ));
                    self.build_image(name, progress).await
                }
                other => other,
            }
        } else {
            progress.log_info(&format!(
                "image {name} has no published artifact; building it here from recipe {}",
                entry.sources.recipe.as_deref().unwrap_or("?")
            ));
            self.build_image(name, progress).await
        };
        match got {
            // Another request made it while we waited.
            Err(ArtifactError::Library(LibraryError::Store(
                crate::store::StoreError::ImageNameTaken(_),
            ))) => {
                let library = self.library.clone();
                let n = name.to_string();
                Ok(tokio::task::spawn_blocking(move || library.get(&n)).await??)
            }
            other => other,
        }
    }

    /// Whether image `image` (the image catalog's default when `None`) and
    /// its named kernel are here already. Fetches nothing: the warm pool
    /// boots only from what is local, so enabling it on a fresh host does
    /// not start a second build beside the first `vm run`'s.
    pub async fn boot_is_local(&self, image: Option<&str>) -> Result<(), ArtifactError> {
        let name = match image {
            Some(n) => n.to_string(),
            None => match self.image_catalog.default_entry() {
                Some(e) => e.name.clone(),
                None => {
                    return Err(ArtifactError::Invalid(
                        "the image catalog has no default image; set default_image_name".into(),
                    ));
                }
            },
        };
        let (library, kernels) = (self.library.clone(), self.kernels.clone());
        tokio::task::spawn_blocking(move || {
            let not_here = |what: String| {
                ArtifactError::Invalid(format!(
                    "{what} is not here yet; the first `vm create` or `vm run` of the default shape fetches it"
                ))
            };
            let image = match library.get(&name) {
                Ok(i) => i,
                Err(LibraryError::NotFound(_)) => return Err(not_here(format!("image {name}"))),
                Err(e) => return Err(e.into()),
            };
            if let ImageKernel::Named { name: k } = &image.kernel
                && kernels.get(k)?.is_none()
            {
                return Err(not_here(format!("kernel {k} of image {name}")));
            }
            Ok(())
        })
        .await?
    }

    /// A local kernel, pulled from the catalog first if it is not local.
    pub async fn ensure_kernel(
        &self,
        name: &str,
        progress: &Progress,
    ) -> Result<LocalKernel, ArtifactError> {
        let kernels = self.kernels.clone();
        let n = name.to_string();
        if let Some(k) = tokio::task::spawn_blocking(move || kernels.get(&n)).await?? {
            return Ok(k);
        }
        let Ok(entry) = self.kernel_catalog.find(name) else {
            return Err(ArtifactError::Invalid(format!(
                "Kernel {name:?} is neither local nor in the kernel catalog; see `banger kernel list --available`"
            )));
        };
        let got = if entry.sources.is_published() {
            match self.pull_kernel(name, false, progress).await {
                Err(e) if entry.sources.recipe.is_some() && unreachable(&e) => {
                    progress.log_warn(&format!(
                        "kernel {name}: the published artifact cannot be reached ({}); building it here instead",
                        banger_api::error::render_chain(&e)
                    ));
                    self.build_kernel(name, false, progress).await
                }
                other => other,
            }
        } else {
            progress.log_info(&format!(
                "kernel {name} has no published artifact; building it here from recipe {}",
                entry.sources.recipe.as_deref().unwrap_or("?")
            ));
            self.build_kernel(name, false, progress).await
        };
        match got {
            // Another request made it while we waited.
            Err(ArtifactError::Kernel(KernelError::AlreadyExists(_))) => {
                let kernels = self.kernels.clone();
                let n = name.to_string();
                tokio::task::spawn_blocking(move || kernels.get(&n))
                    .await??
                    .ok_or_else(|| KernelError::NotFound(name.to_string()).into())
            }
            other => other,
        }
    }

    /// Builds catalog kernel `name` on this host from its recipe.
    pub async fn build_kernel(
        &self,
        name: &str,
        force: bool,
        progress: &Progress,
    ) -> Result<LocalKernel, ArtifactError> {
        let _one = self.pulls.lock().await;
        let entry = self.kernel_catalog.find(name)?;
        let recipe = recipe_of("kernel", name, &entry.sources)?;
        let recipe = banger_artifacts::recipes::kernel::recipe(recipe)?;
        progress.stage_expecting(
            "build_kernel",
            format!("building kernel {name} here from recipe {}", recipe.name),
            recipe.expected,
        );
        let (kernels, cache, n, p) = (
            self.kernels.clone(),
            self.cache_dir.clone(),
            name.to_string(),
            progress.clone(),
        );
        let built = tokio::task::spawn_blocking(move || {
            banger_artifacts::recipes::build_kernel(
                &recipe,
                &n,
                &kernels,
                &cache,
                force,
                &mut |e| report(&p, "build_kernel", e),
            )
        })
        .await??;
        Ok(built)
    }

    /// Builds catalog image `name` on this host from its recipe (its
    /// kernel first, when that is missing).
    pub async fn build_image(
        &self,
        name: &str,
        progress: &Progress,
    ) -> Result<ImageRecord, ArtifactError> {
        let entry = self.image_catalog.find(name).ok_or_else(|| {
            banger_artifacts::imagecat::ImageCatalogError::NotInCatalog(name.to_string())
        })?;
        let recipe =
            banger_artifacts::recipes::image::recipe(recipe_of("image", name, &entry.sources)?)?;
        {
            let library = self.library.clone();
            let n = name.to_string();
            tokio::task::spawn_blocking(move || library.check_new_name(&n)).await??;
        }
        let kernel = entry.kernel.clone();
        self.ensure_kernel(&kernel, progress).await?;

        let _one = self.pulls.lock().await;
        let staging = self.library.stage(name)?;
        progress.stage_expecting(
            "build_image",
            format!("building image {name} here from recipe {}", recipe.name),
            recipe.expected,
        );
        let (dir, cache, p) = (
            staging.path().to_path_buf(),
            self.cache_dir.clone(),
            progress.clone(),
        );
        let built = tokio::task::spawn_blocking(move || {
            banger_artifacts::recipes::build_image(&recipe, &dir, &cache, &mut |e| {
                report(&p, "build_image", e)
            })
        })
        .await??;
        let record = ImageRecord {
            name: name.to_string(),
            rootfs: built.rootfs,
            kernel: ImageKernel::Named { name: kernel },
            source: ImageSource::Built {
                recipe: recipe.name.to_string(),
                from: format!("Debian {} from {}", recipe.suite, built.mirror),
            },
            managed: true,
            size_bytes: built.size.0,
            layers: Vec::new(),
            created_at: now_unix(),
        };
        progress.stage("publish", format!("publishing image {name}"));
        let library = self.library.clone();
        Ok(tokio::task::spawn_blocking(move || library.publish(staging, record)).await??)
    }

    /// Works out what a new VM boots from: `--rootfs` or `--image` for the
    /// root filesystem; `--kernel`, `--kernel-ref`, the image's kernel or the
    /// catalog's default kernel, in that order, for the kernel.
    pub async fn resolve_boot(
        &self,
        req: &CreateVmRequest,
        progress: &Progress,
    ) -> Result<BootFiles, ArtifactError> {
        if req.kernel.is_some() && req.kernel_ref.is_some() {
            return Err(ArtifactError::Invalid(
                "Pass either --kernel PATH or --kernel-ref NAME, not both".to_string(),
            ));
        }
        if req.initrd.is_some() && req.kernel.is_none() {
            return Err(ArtifactError::Invalid(
                "--initrd goes with --kernel PATH; named kernels bring their own initrd"
                    .to_string(),
            ));
        }
        let (rootfs, image_kernel) = match (&req.rootfs, &req.image) {
            (Some(_), Some(_)) => {
                return Err(ArtifactError::Invalid(
                    "Pass either --image NAME or --rootfs PATH, not both".to_string(),
                ));
            }
            (Some(r), None) => (r.clone(), None),
            (None, Some(name)) => {
                let image = self.ensure_image(name, progress).await?;
                (image.rootfs, Some(image.kernel))
            }
            // No image named: the image catalog's default, pulled (with its
            // kernel) when missing, as `banger vm run` promises.
            (None, None) => {
                let Some(name) = self.image_catalog.default_entry().map(|e| e.name.clone()) else {
                    return Err(ArtifactError::Invalid(
                        "Pass --image NAME (see `banger image list`) or --rootfs PATH; the image catalog has no default".to_string(),
                    ));
                };
                let image = self.ensure_image(&name, progress).await?;
                (image.rootfs, Some(image.kernel))
            }
        };
        let (kernel, initrd) = if let Some(k) = &req.kernel {
            (k.clone(), req.initrd.clone())
        } else {
            let name = match (&req.kernel_ref, image_kernel) {
                (Some(r), _) => r.clone(),
                (None, Some(ImageKernel::Files { kernel, initrd })) => {
                    return Ok(BootFiles { kernel, initrd, rootfs });
                }
                (None, Some(ImageKernel::Named { name })) => name,
                (None, None) => self
                    .kernel_catalog
                    .default_entry()
                    .map(|e| e.name.clone())
                    .ok_or_else(|| {
                        ArtifactError::Invalid("Pass --kernel PATH or --kernel-ref NAME (the kernel catalog has no default)".to_string())
                    })?,
            };
            let k = self.ensure_kernel(&name, progress).await?;
            (k.vmlinux, k.initrd)
        };
        Ok(BootFiles {
            kernel,
            initrd,
            rootfs,
        })
    }
}

/// The recipe of a catalog entry, or an error saying it has none.
fn recipe_of<'a>(
    kind: &str,
    name: &str,
    sources: &'a banger_api::catalog::Sources,
) -> Result<&'a str, ArtifactError> {
    sources.recipe.as_deref().ok_or_else(|| {
        ArtifactError::Invalid(format!(
            "The {kind} catalog has no local build recipe for {name:?}; pull it with `banger {kind} pull {name}`"
        ))
    })
}

/// Forwards a build's events to the progress stream, its steps as
/// sub-stages of `stage` (`build_kernel:download`).
fn report(progress: &Progress, stage: &str, event: banger_artifacts::recipes::BuildEvent) {
    match event {
        banger_artifacts::recipes::BuildEvent::Step {
            step,
            message,
            expected: Some(expected),
        } => progress.stage_expecting(&format!("{stage}:{step}"), message, expected),
        banger_artifacts::recipes::BuildEvent::Step { step, message, .. } => {
            progress.stage(&format!("{stage}:{step}"), message)
        }
        banger_artifacts::recipes::BuildEvent::Info(line) => progress.log_info(&line),
    }
}

/// Whether a pull failed because the published artifact cannot be reached
/// (connection, name resolution, an HTTP error status), so that building
/// it here instead is right. A checksum or digest mismatch is not: a
/// tampered artifact is refused, never silently replaced.
fn unreachable(e: &ArtifactError) -> bool {
    match e {
        ArtifactError::Kernel(KernelError::Download { .. } | KernelError::HttpStatus { .. }) => {
            true
        }
        ArtifactError::Kernel(KernelError::Artifact(a))
        | ArtifactError::ImageCatalog(banger_artifacts::imagecat::ImageCatalogError::Artifact(a)) => {
            a.is_unreachable()
        }
        ArtifactError::ImageCatalog(banger_artifacts::imagecat::ImageCatalogError::Download(
            _,
            d,
        )) => {
            matches!(
                d,
                banger_artifacts::download::DownloadError::Request { .. }
                    | banger_artifacts::download::DownloadError::HttpStatus { .. }
            )
        }
        _ => false,
    }
}

/// A download's total as progress reports it: downloads report 0 when the
/// server sent no length.
fn known_total(total: u64) -> Option<u64> {
    (total > 0).then_some(total)
}

/// A kernel imported for an image being made: removed again when dropped,
/// unless [`ImageKernelImport::keep`] says the image was published.
#[derive(Debug)]
struct ImageKernelImport {
    store: KernelStore,
    name: Option<String>,
}

impl ImageKernelImport {
    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// The image was published: the kernel stays.
    fn keep(mut self) {
        self.name = None;
    }
}

impl Drop for ImageKernelImport {
    fn drop(&mut self) {
        if let Some(name) = self.name.take()
            && let Err(e) = self.store.remove(&name)
        {
            tracing::warn!(kernel = %name, error = %e, "cannot remove the kernel imported for an image that was not made");
        }
    }
}

/// Checks the kernel flags of `image pull`/`image register`: `--kernel-ref`
/// or `--kernel` (with `--initrd`, `--modules`), never both; every path
/// absolute and there. `None` when no kernel files were given.
fn kernel_files(
    kernel_ref: &Option<String>,
    kernel: &Option<PathBuf>,
    initrd: &Option<PathBuf>,
    modules: &Option<PathBuf>,
) -> Result<Option<KernelFiles>, ArtifactError> {
    let Some(kernel) = kernel else {
        if initrd.is_some() || modules.is_some() {
            return Err(ArtifactError::Invalid(
                "--initrd and --modules go with --kernel PATH; a --kernel-ref kernel brings its own"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if kernel_ref.is_some() {
        return Err(ArtifactError::Invalid(
            "Pass either --kernel-ref NAME or --kernel PATH, not both".into(),
        ));
    }
    let invalid = |e: banger_api::paths::InputFileError| ArtifactError::Invalid(e.to_string());
    banger_api::paths::check_input_file("--kernel", kernel, "kernel image (vmlinux or vmlinuz)")
        .map_err(invalid)?;
    if let Some(i) = initrd {
        banger_api::paths::check_input_file("--initrd", i, "initrd image").map_err(invalid)?;
    }
    if let Some(m) = modules
        && !(m.is_absolute() && std::fs::read_dir(m).is_ok())
    {
        return Err(ArtifactError::Invalid(format!(
            "--modules {}: not a readable directory; pass an absolute path to lib/modules/VERSION or the directory holding it",
            m.display()
        )));
    }
    Ok(Some(KernelFiles {
        kernel: kernel.clone(),
        initrd: initrd.clone(),
        modules: modules.clone(),
    }))
}
