//! API routes for kernels and images. Like the VM routes, they only parse
//! and map errors; the work is in [`crate::artifacts`].

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::server::{ApiError, ApiState, S, stream_task};
use crate::artifacts::{ArtifactError, PullImageRequest};
use crate::library::{LibraryError, RegisterImageRequest};
use crate::lifecycle::render_chain;
use crate::store::StoreError;
pub use banger_api::api::{
    BuildRequest, CatalogImageView, CatalogKernelView, ImageView, ImportKernelRequest, KernelView,
};
use banger_api::model::{ImageKernel, ImageRecord};
use banger_artifacts::images::PruneReport;
use banger_artifacts::kernels::{KernelError, KernelManifest, LocalKernel};

/// A local kernel as the API shows it.
fn kernel_view(k: LocalKernel) -> KernelView {
    KernelView {
        manifest: k.manifest,
        dir: k.dir,
        vmlinux: k.vmlinux,
        initrd: k.initrd,
        modules: k.modules,
    }
}

fn image_view(kernels: &banger_artifacts::kernels::KernelStore, record: ImageRecord) -> ImageView {
    let (kernel_path, initrd_path) = match &record.kernel {
        ImageKernel::Files { kernel, initrd } => (Some(kernel.clone()), initrd.clone()),
        ImageKernel::Named { name } => match kernels.get(name) {
            Ok(Some(k)) => (Some(k.vmlinux), k.initrd),
            _ => (None, None),
        },
    };
    ImageView {
        record,
        kernel_path,
        initrd_path,
    }
}

#[derive(Debug, Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> Self {
        let status = match &e {
            ArtifactError::Invalid(_)
            | ArtifactError::Kernel(KernelError::InvalidName(_) | KernelError::Discover { .. })
            | ArtifactError::Library(LibraryError::Invalid(_)) => StatusCode::BAD_REQUEST,
            ArtifactError::Kernel(KernelError::NotFound(_) | KernelError::NotInCatalog(_))
            | ArtifactError::Library(LibraryError::NotFound(_)) => StatusCode::NOT_FOUND,
            ArtifactError::Kernel(KernelError::AlreadyExists(_))
            | ArtifactError::Library(
                LibraryError::InUse { .. }
                | LibraryError::AlreadyManaged(_)
                | LibraryError::Store(StoreError::ImageNameTaken(_)),
            ) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, render_chain(&e))
    }
}

impl From<LibraryError> for ApiError {
    fn from(e: LibraryError) -> Self {
        ArtifactError::from(e).into()
    }
}

impl From<KernelError> for ApiError {
    fn from(e: KernelError) -> Self {
        ArtifactError::from(e).into()
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArtifactError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Task failed: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

pub(crate) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/kernels", get(list_kernels))
        .route("/v1/kernels/catalog", get(kernel_catalog))
        .route("/v1/kernels/import", post(import_kernel))
        .route("/v1/kernels/{name}", get(show_kernel).delete(delete_kernel))
        .route("/v1/kernels/{name}/pull", post(pull_kernel))
        .route("/v1/kernels/build", post(build_kernel))
        .route("/v1/images", get(list_images))
        .route("/v1/images/catalog", get(image_catalog))
        .route("/v1/images/register", post(register_image))
        .route("/v1/images/pull", post(pull_image))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/cache/prune", post(prune_cache))
        .route("/v1/images/{name}", get(show_image).delete(delete_image))
        .route("/v1/images/{name}/promote", post(promote_image))
}

async fn list_kernels(State(st): S) -> Result<Json<Vec<KernelManifest>>, ApiError> {
    let kernels = st.lifecycle.artifacts().kernels.clone();
    Ok(Json(blocking(move || Ok(kernels.list()?)).await?))
}

async fn kernel_catalog(State(st): S) -> Result<Json<Vec<CatalogKernelView>>, ApiError> {
    let artifacts = st.lifecycle.artifacts().clone();
    Ok(Json(
        blocking(move || {
            let local: Vec<String> = artifacts
                .kernels
                .list()?
                .into_iter()
                .map(|k| k.name)
                .collect();
            Ok(artifacts
                .kernel_catalog()
                .entries()
                .iter()
                .map(|e| CatalogKernelView {
                    name: e.name.clone(),
                    arch: e.arch.clone(),
                    distro: e.distro.clone(),
                    version: e.version.clone(),
                    size: e.sources.size,
                    sources: e.sources.label(),
                    description: e.description.clone(),
                    default: e.default,
                    local: local.contains(&e.name),
                })
                .collect())
        })
        .await?,
    ))
}

async fn show_kernel(State(st): S, Path(name): Path<String>) -> Result<Json<KernelView>, ApiError> {
    let kernels = st.lifecycle.artifacts().kernels.clone();
    let k = blocking(move || {
        kernels
            .get(&name)?
            .ok_or_else(|| KernelError::NotFound(name).into())
    })
    .await?;
    Ok(Json(kernel_view(k)))
}

async fn delete_kernel(
    State(st): S,
    Path(name): Path<String>,
) -> Result<Json<KernelView>, ApiError> {
    let lc = st.lifecycle.clone();
    // The warm pool's VMs do not hold a kernel or an image: they go after
    // the delete (a refill then boots from what is left, or says why not).
    let vms = lc.list_user().await?;
    let kernels = lc.artifacts().kernels.clone();
    let library = lc.artifacts().library.clone();
    let k = blocking(move || {
        let k = kernels
            .get(&name)?
            .ok_or_else(|| KernelError::NotFound(name.clone()))?;
        let users: Vec<String> = vms
            .iter()
            .filter(|vm| vm.spec.kernel.starts_with(&k.dir))
            .map(|vm| vm.name.to_string())
            .collect();
        if !users.is_empty() {
            return Err(ArtifactError::Invalid(format!(
                "Kernel {name} is used by {}; delete those VMs first",
                users.join(", ")
            )));
        }
        // An image that boots this kernel would fail its next `vm create`.
        let images: Vec<String> = library
            .list()?
            .into_iter()
            .filter(|img| match &img.kernel {
                ImageKernel::Named { name: n } => *n == name,
                ImageKernel::Files { kernel, .. } => kernel.starts_with(&k.dir),
            })
            .map(|img| img.name)
            .collect();
        if !images.is_empty() {
            return Err(ArtifactError::Invalid(format!(
                "Kernel {name} is the kernel of image(s) {}; delete them first (`banger image delete {}`), or pull or register them again with another --kernel-ref",
                images.join(", "),
                images.join(" ")
            )));
        }
        kernels.remove(&name)?;
        Ok(k)
    })
    .await?;
    lc.drop_pooled_where(|vm| vm.spec.kernel.starts_with(&k.dir))
        .await;
    Ok(Json(kernel_view(k)))
}

async fn import_kernel(
    State(st): S,
    body: Result<Json<ImportKernelRequest>, JsonRejection>,
) -> Result<Json<KernelView>, ApiError> {
    let Json(req) = body?;
    if !req.from.is_absolute() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("--from {}: path must be absolute", req.from.display()),
        ));
    }
    let kernels = st.lifecycle.artifacts().kernels.clone();
    let k = blocking(move || Ok(kernels.import(&req.name, &req.from, req.force)?)).await?;
    Ok(Json(kernel_view(k)))
}

async fn pull_kernel(
    State(st): S,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> Response {
    let artifacts = st.lifecycle.artifacts().clone();
    stream_task(move |progress| async move {
        artifacts
            .pull_kernel(&name, q.force, &progress)
            .await
            .map(kernel_view)
            .map_err(|e| (Some("pull_kernel".to_string()), render_chain(&e)))
    })
}

async fn list_images(State(st): S) -> Result<Json<Vec<ImageView>>, ApiError> {
    let artifacts = st.lifecycle.artifacts().clone();
    Ok(Json(
        blocking(move || {
            let images = artifacts.library.list()?;
            Ok(images
                .into_iter()
                .map(|i| image_view(&artifacts.kernels, i))
                .collect())
        })
        .await?,
    ))
}

async fn image_catalog(State(st): S) -> Result<Json<Vec<CatalogImageView>>, ApiError> {
    let artifacts = st.lifecycle.artifacts().clone();
    Ok(Json(
        blocking(move || {
            let local: Vec<String> = artifacts
                .library
                .list()?
                .into_iter()
                .map(|i| i.name)
                .collect();
            Ok(artifacts
                .image_catalog()
                .entries()
                .iter()
                .map(|e| CatalogImageView {
                    name: e.name.clone(),
                    arch: e.arch.clone(),
                    kernel: e.kernel.clone(),
                    size: e.sources.size,
                    sources: e.sources.label(),
                    description: e.description.clone(),
                    default: e.default,
                    local: local.contains(&e.name),
                })
                .collect())
        })
        .await?,
    ))
}

async fn show_image(State(st): S, Path(name): Path<String>) -> Result<Json<ImageView>, ApiError> {
    let artifacts = st.lifecycle.artifacts().clone();
    Ok(Json(
        blocking(move || {
            Ok(image_view(
                &artifacts.kernels,
                artifacts.library.get(&name)?,
            ))
        })
        .await?,
    ))
}

async fn delete_image(
    State(st): S,
    Path(name): Path<String>,
) -> Result<Json<ImageRecord>, ApiError> {
    let lc = st.lifecycle.clone();
    // As for kernels: the warm pool's VMs go after the delete.
    let vms = lc.list_user().await?;
    let library = lc.artifacts().library.clone();
    let deleted = blocking(move || Ok(library.delete(&name, &vms)?)).await?;
    lc.drop_pooled_where(|vm| vm.spec.rootfs_source == deleted.rootfs)
        .await;
    lc.artifacts().spares.forget(&deleted.rootfs);
    Ok(Json(deleted))
}

async fn pull_image(
    State(st): S,
    body: Result<Json<PullImageRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let artifacts = st.lifecycle.artifacts().clone();
    Ok(stream_task(move |progress| async move {
        let image = artifacts
            .pull_image(req, &progress)
            .await
            .map_err(|e| (Some("pull_image".to_string()), render_chain(&e)))?;
        // The first VM of a new image should not wait for its copy.
        artifacts.spares.refill(&image.rootfs);
        Ok(image)
    }))
}

async fn build_kernel(
    State(st): S,
    body: Result<Json<BuildRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let artifacts = st.lifecycle.artifacts().clone();
    let name = match req.name {
        Some(n) => n,
        None => artifacts
            .kernel_catalog()
            .default_entry()
            .map(|e| e.name.clone())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    "The kernel catalog has no default; name the kernel to build".into(),
                )
            })?,
    };
    Ok(stream_task(move |progress| async move {
        artifacts
            .build_kernel(&name, req.force, &progress)
            .await
            .map(kernel_view)
            .map_err(|e| (Some("build_kernel".to_string()), render_chain(&e)))
    }))
}

async fn build_image(
    State(st): S,
    body: Result<Json<BuildRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    if req.force {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "--force does not apply to images; delete the image first (`banger image delete NAME`)"
                .into(),
        ));
    }
    let artifacts = st.lifecycle.artifacts().clone();
    let name = match req.name {
        Some(n) => n,
        None => artifacts
            .image_catalog()
            .default_entry()
            .map(|e| e.name.clone())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::BAD_REQUEST,
                    "The image catalog has no default; name the image to build".into(),
                )
            })?,
    };
    Ok(stream_task(move |progress| async move {
        let image = artifacts
            .build_image(&name, &progress)
            .await
            .map_err(|e| (Some("build_image".to_string()), render_chain(&e)))?;
        Ok(image_view(&artifacts.kernels, image))
    }))
}

async fn prune_cache(State(st): S) -> Result<Json<PruneReport>, ApiError> {
    Ok(Json(st.lifecycle.artifacts().prune_cache().await?))
}

async fn register_image(
    State(st): S,
    body: Result<Json<RegisterImageRequest>, JsonRejection>,
) -> Result<Json<ImageRecord>, ApiError> {
    let Json(req) = body?;
    Ok(Json(st.lifecycle.artifacts().register_image(req).await?))
}

async fn promote_image(
    State(st): S,
    Path(name): Path<String>,
) -> Result<Json<ImageRecord>, ApiError> {
    let library = st.lifecycle.artifacts().library.clone();
    Ok(Json(blocking(move || Ok(library.promote(&name)?)).await?))
}
