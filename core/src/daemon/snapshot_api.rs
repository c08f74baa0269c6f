//! API routes for snapshots (`docs/snapshots.md`); the work is in
//! `crate::lifecycle` (taking one) and `crate::snapshot` (the store).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};

use super::server::{ApiError, ApiState, S};
use banger_api::snapshot::{SnapshotRequest, SnapshotView};

/// The snapshot routes.
pub(crate) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/vms/{name}/snapshot", post(take))
        .route("/v1/snapshots", get(list))
        .route("/v1/snapshots/{snap}", delete(remove))
}

async fn take(
    State(st): S,
    Path(name): Path<String>,
    body: Result<Json<SnapshotRequest>, JsonRejection>,
) -> Result<Json<SnapshotView>, ApiError> {
    let Json(req) = body?;
    let lc = st.lifecycle.clone();
    // Its own task: a client that goes away does not leave a guest paused.
    let res = tokio::spawn(async move { lc.snapshot(&name, &req.name).await }).await;
    match res {
        Ok(r) => Ok(Json(r?)),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Snapshot task failed: {e}"),
        )),
    }
}

async fn list(State(st): S) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    Ok(Json(st.lifecycle.snapshot_store().list()?))
}

async fn remove(State(st): S, Path(snap): Path<String>) -> Result<StatusCode, ApiError> {
    st.lifecycle.remove_snapshot(&snap)?;
    Ok(StatusCode::NO_CONTENT)
}
