//! The HTTP front end. It only parses: requests become calls on
//! [`Lifecycle`], which owns every state rule.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use crate::lifecycle::{ForwardChange, Lifecycle, OpError, Progress, render_chain};
use banger_api::api::{
    CapView, CreateVmRequest, DaemonStatus, ErrorBody, Event, ForwardError, PortForward,
    PortForwardRequest, PortView, SetVmRequest, SshTarget, StatsView, VersionInfo, VmView,
    WorkspaceExport, WorkspacePrepareRequest,
};
use banger_api::model::{VmRecord, VmState};

/// Shared state of the API handlers.
#[derive(Debug)]
pub(crate) struct ApiState {
    pub lifecycle: Arc<Lifecycle>,
    pub started_at: u64,
    pub socket: PathBuf,
    pub plugin_errors: Vec<String>,
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

pub(crate) type S = State<Arc<ApiState>>;

/// Operations running now: streamed operations (create, start, pulls,
/// workspace, guest jobs) and the spawned stop, kill and delete. `/v1/status`
/// reports it, so a CLI of another build restarts this daemon only when
/// nothing would be cut short. One per daemon process, like the process
/// itself.
static OPERATIONS: AtomicUsize = AtomicUsize::new(0);

/// How many operations run now.
pub(crate) fn running_operations() -> usize {
    OPERATIONS.load(Ordering::SeqCst)
}

/// Counts one running operation while it lives.
#[derive(Debug)]
struct Running;

impl Running {
    fn start() -> Running {
        OPERATIONS.fetch_add(1, Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        OPERATIONS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An error answer: status plus `ErrorBody`.
pub(crate) struct ApiError(pub StatusCode, pub String);

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match &e {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::WrongState { .. } | OpError::NameTaken(_) => StatusCode::CONFLICT,
            OpError::Stage { .. } | OpError::Store(_) | OpError::Io(..) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(status, render_chain(&e))
    }
}

/// The largest request body the API reads (every request is a small JSON
/// document); a larger one is refused with 413 before it is buffered whole.
pub(crate) const MAX_BODY: usize = 1 << 20;

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        // axum's own statuses: 413 too large, 415 not JSON, 400 malformed,
        // 422 well-formed but not the request's shape.
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError(
                status,
                format!("Request body is larger than the API's limit of {MAX_BODY} bytes"),
            );
        }
        let status = if status.is_client_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError(status, format!("Invalid request body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// The daemon's own routes and the VMs'.
pub(crate) fn vm_routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/status", get(status))
        .route("/v1/shutdown", post(shutdown))
        .route("/v1/capabilities", get(capabilities))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/pool", get(show_pool))
        .route(
            "/v1/vms/{name}",
            get(show_vm).patch(set_vm).delete(delete_vm),
        )
        .route("/v1/vms/{name}/start", post(start_vm))
        .route("/v1/vms/{name}/restart", post(restart_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/kill", post(kill_vm))
        .route("/v1/vms/{name}/logs", get(vm_logs))
        .route(
            "/v1/vms/{name}/ports",
            get(vm_ports).post(add_forward).delete(remove_forward),
        )
        .route("/v1/vms/{name}/stats", get(vm_stats))
        .route("/v1/vms/{name}/ssh", get(vm_ssh))
        .route("/v1/vms/{name}/workspace/prepare", post(workspace_prepare))
        .route(
            "/v1/vms/{name}/capabilities/{cap}/jobs/{job}",
            post(vm_guest_job),
        )
        .route("/v1/vms/{name}/workspace/export", get(workspace_export))
        .route("/v1/vms/{name}/exec", post(vm_exec))
}

async fn version() -> Json<VersionInfo> {
    Json(VersionInfo::current())
}

async fn status(State(st): S) -> Result<Json<DaemonStatus>, ApiError> {
    let mut vms = std::collections::BTreeMap::new();
    for vm in st.lifecycle.list().await? {
        *vms.entry(vm.state.to_string()).or_insert(0) += 1;
    }
    Ok(Json(DaemonStatus {
        version: VersionInfo::current(),
        pid: std::process::id(),
        started_at: st.started_at,
        socket: st.socket.clone(),
        state_dir: st.lifecycle.paths().state_dir.clone(),
        vms,
        plugin_errors: st.plugin_errors.clone(),
        operations: Some(running_operations()),
    }))
}

async fn shutdown(State(st): S) -> StatusCode {
    let _ = st.shutdown.send(true);
    StatusCode::ACCEPTED
}

async fn capabilities(State(st): S) -> Result<Json<Vec<CapView>>, ApiError> {
    let lc = &st.lifecycle;
    let defaults: Vec<String> = lc
        .config()
        .default_caps()
        .map(|v| v.into_iter().map(|c| c.name).collect())
        .unwrap_or_default();
    Ok(Json(
        lc.registry()
            .all()
            .into_iter()
            .map(|c| CapView {
                name: c.name().to_string(),
                description: c.description().to_string(),
                source: c.source(),
                default: defaults.iter().any(|d| d == c.name()),
            })
            .collect(),
    ))
}

async fn list_vms(State(st): S) -> Result<Json<Vec<VmView>>, ApiError> {
    let lc = &st.lifecycle;
    Ok(Json(
        lc.list_user()
            .await?
            .into_iter()
            .map(|v| lc.view(v))
            .collect(),
    ))
}

async fn show_pool(State(st): S) -> Result<Json<banger_api::api::PoolView>, ApiError> {
    Ok(Json(st.lifecycle.pool_view().await?))
}

async fn show_vm(State(st): S, Path(name): Path<String>) -> Result<Json<VmView>, ApiError> {
    let lc = &st.lifecycle;
    Ok(Json(lc.view(lc.get(&name).await?)))
}

async fn set_vm(
    State(st): S,
    Path(name): Path<String>,
    body: Result<Json<SetVmRequest>, JsonRejection>,
) -> Result<Json<VmView>, ApiError> {
    let Json(req) = body?;
    let lc = &st.lifecycle;
    Ok(Json(lc.view(lc.set(&name, req).await?)))
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
    /// Answer `202` with the VM as it was once the delete has begun (its
    /// mark is in the store, so a restarted daemon finishes it too) rather
    /// than when it ends (`vm run --rm`, docs/vm-run.md).
    #[serde(default)]
    detach: bool,
}

async fn delete_vm(
    State(st): S,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Result<(StatusCode, Json<VmView>), ApiError> {
    let lc = st.lifecycle.clone();
    let before = match q.detach {
        true => Some(lc.get(&name).await?),
        false => None,
    };
    let (tx, mut begun) = mpsc::unbounded_channel::<Event>();
    // The delete's first stage begins after the mark is stored.
    let progress = if q.detach {
        Progress::to(tx)
    } else {
        Progress::none()
    };
    let running = Running::start();
    // Run to completion even if the client goes away mid-delete.
    let mut task = tokio::spawn(async move {
        let _running = running;
        lc.delete(&name, q.force, &progress).await
    });
    if let Some(vm) = before {
        tokio::select! {
            res = &mut task => {
                return Ok((StatusCode::OK, Json(st.lifecycle.view(joined(res)?))));
            }
            Some(_) = begun.recv() => {
                return Ok((StatusCode::ACCEPTED, Json(st.lifecycle.view(vm))));
            }
        }
    }
    let vm = joined(task.await)?;
    Ok((StatusCode::OK, Json(st.lifecycle.view(vm))))
}

async fn stop_vm(State(st): S, Path(name): Path<String>) -> Result<Json<VmView>, ApiError> {
    let lc = st.lifecycle.clone();
    let running = Running::start();
    let res = tokio::spawn(async move {
        let _running = running;
        lc.stop(&name, &Progress::none()).await
    })
    .await;
    Ok(Json(st.lifecycle.view(joined(res)?)))
}

async fn kill_vm(State(st): S, Path(name): Path<String>) -> Result<Json<VmView>, ApiError> {
    let lc = st.lifecycle.clone();
    let running = Running::start();
    let res = tokio::spawn(async move {
        let _running = running;
        lc.kill(&name, &Progress::none()).await
    })
    .await;
    Ok(Json(st.lifecycle.view(joined(res)?)))
}

fn joined(
    res: Result<Result<VmRecord, OpError>, tokio::task::JoinError>,
) -> Result<VmRecord, ApiError> {
    match res {
        Ok(r) => Ok(r?),
        Err(e) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Operation task failed: {e}"),
        )),
    }
}

async fn create_vm(
    State(st): S,
    body: Result<Json<CreateVmRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    Ok(stream_operation(st, move |lc, p| async move {
        lc.create(req, &p).await
    }))
}

async fn start_vm(State(st): S, Path(name): Path<String>) -> Response {
    stream_operation(st, move |lc, p| async move { lc.start(&name, &p).await })
}

async fn restart_vm(State(st): S, Path(name): Path<String>) -> Response {
    stream_operation(st, move |lc, p| async move { lc.restart(&name, &p).await })
}

/// Runs a long operation in its own task (so a client that disconnects does
/// not cancel it half-way) and streams its progress as NDJSON, ending with
/// exactly one `done` or `failed` event.
fn stream_operation<F, Fut>(st: Arc<ApiState>, op: F) -> Response
where
    F: FnOnce(Arc<Lifecycle>, Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<VmRecord, OpError>> + Send + 'static,
{
    let lc = st.lifecycle.clone();
    stream_task(move |progress| async move {
        match op(lc.clone(), progress).await {
            Ok(vm) => Ok(lc.view(vm)),
            Err(e) => Err((e.stage().map(str::to_string), render_chain(&e))),
        }
    })
}

/// Runs `op` in its own task and streams its progress as NDJSON; its result
/// becomes the `done` event, its error (stage, text) the `failed` event.
pub(crate) fn stream_task<T, F, Fut>(op: F) -> Response
where
    T: serde::Serialize,
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, (Option<String>, String)>> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Event>();
    let running = Running::start();
    tokio::spawn(async move {
        let _running = running;
        let result = op(Progress::to(tx.clone())).await;
        let last = match result {
            Ok(v) => match serde_json::to_value(v) {
                Ok(result) => Event::Done { result },
                Err(e) => Event::Failed {
                    stage: None,
                    error: format!("Cannot encode the result: {e}"),
                },
            },
            Err((stage, error)) => Event::Failed { stage, error },
        };
        let _ = tx.send(last);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).unwrap_or_else(|e| {
            format!("{{\"type\":\"failed\",\"stage\":null,\"error\":\"cannot encode event: {e}\"}}")
                .into_bytes()
        });
        line.push(b'\n');
        Some((Ok::<Bytes, Infallible>(Bytes::from(line)), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn vm_stats(State(st): S, Path(name): Path<String>) -> Result<Json<StatsView>, ApiError> {
    Ok(Json(st.lifecycle.stats(&name).await?))
}

async fn vm_ssh(State(st): S, Path(name): Path<String>) -> Result<Json<SshTarget>, ApiError> {
    Ok(Json(st.lifecycle.ssh_target(&name).await?))
}

async fn workspace_prepare(
    State(st): S,
    Path(name): Path<String>,
    body: Result<Json<WorkspacePrepareRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let lc = st.lifecycle.clone();
    Ok(stream_task(move |p| async move {
        crate::workspace::prepare_vm(&lc, &name, req, &p)
            .await
            .map_err(|e| (e.stage().map(str::to_string), render_chain(&e)))
    }))
}

async fn vm_guest_job(
    State(st): S,
    Path((name, cap, job)): Path<(String, String, String)>,
    body: Result<Json<banger_api::api::JobRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let lc = st.lifecycle.clone();
    // Checked before the stream starts, so a wrong request is a 4xx answer.
    let guest_job = crate::workspace::guest_job(&lc, &name, &cap, &job).await?;
    Ok(stream_task(move |p| async move {
        let stage = format!("{cap}:{job}");
        crate::workspace::run_guest_job(&lc, &name, &stage, guest_job, req, &p)
            .await
            .map_err(|e| (e.stage().map(str::to_string), render_chain(&e)))
    }))
}

/// `POST /v1/vms/{name}/exec` with `Upgrade: banger-exec`: opens the
/// guest agent's exec stream (refusals are ordinary 4xx answers), answers
/// `101`, then copies bytes both ways until both sides are done. The
/// frames (see `banger_guest_protocol::exec`) are the client's and the
/// agent's business.
async fn vm_exec(
    State(st): S,
    Path(name): Path<String>,
    mut req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let token = banger_vmm::vsock::EXEC_UPGRADE;
    let asks = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(token.as_bytes()));
    let on_upgrade = req
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
        .filter(|_| asks)
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("exec needs `Connection: Upgrade` and `Upgrade: {token}` (use `banger vm run --via agent` or `banger vm ssh --via agent`)"),
            )
        })?;
    let agent = st.lifecycle.open_exec(&name).await?;
    let agent = agent
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixStream::from_std(agent))
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Cannot use the agent connection of {name}: {e}"),
            )
        })?;
    let running = Running::start();
    tokio::spawn(async move {
        let _running = running;
        let mut agent = agent;
        if let Ok(upgraded) = on_upgrade.await {
            relay_exec(hyper_util::rt::TokioIo::new(upgraded), &mut agent).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, token)
        .body(Body::empty())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Relays an exec stream until the agent's side of it ends. Everything the
/// agent sent reaches the client even when the other direction fails: the
/// agent closes its connection right after the command's exit status, so a
/// late frame from the client (its stdin's end, a resize) can meet a closed
/// socket. `copy_bidirectional` gave up on that write error before copying
/// the exit status still waiting to be read, and the client saw the stream
/// end without one.
async fn relay_exec<C, A>(client: C, agent: A)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut agent_rd, mut agent_wr) = tokio::io::split(agent);
    let down = async {
        let _ = tokio::io::copy(&mut agent_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    };
    let up = async {
        let _ = tokio::io::copy(&mut client_rd, &mut agent_wr).await;
        let _ = agent_wr.shutdown().await;
    };
    tokio::pin!(down);
    tokio::select! {
        () = &mut down => {}
        () = up => down.await,
    }
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    #[serde(default)]
    base: Option<String>,
}

async fn workspace_export(
    State(st): S,
    Path(name): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Json<WorkspaceExport>, ApiError> {
    Ok(Json(
        crate::workspace::export_vm(&st.lifecycle, &name, q.base).await?,
    ))
}

async fn vm_ports(State(st): S, Path(name): Path<String>) -> Result<Json<Vec<PortView>>, ApiError> {
    Ok(Json(st.lifecycle.ports(&name).await?))
}

/// `vm port add`: a new port forward, live when the VM runs.
async fn add_forward(
    State(st): S,
    Path(name): Path<String>,
    body: Result<Json<PortForwardRequest>, JsonRejection>,
) -> Result<Json<VmView>, ApiError> {
    change_forward(&st, &name, body?.0, ForwardChange::Add).await
}

/// `vm port rm`: one port forward fewer, closed at once when the VM runs.
async fn remove_forward(
    State(st): S,
    Path(name): Path<String>,
    body: Result<Json<PortForwardRequest>, JsonRejection>,
) -> Result<Json<VmView>, ApiError> {
    change_forward(&st, &name, body?.0, ForwardChange::Remove).await
}

async fn change_forward(
    st: &Arc<ApiState>,
    name: &str,
    req: PortForwardRequest,
    change: fn(PortForward) -> ForwardChange,
) -> Result<Json<VmView>, ApiError> {
    let forward: PortForward = req
        .forward
        .parse()
        .map_err(|e: ForwardError| OpError::Invalid(e.to_string()))?;
    let lc = st.lifecycle.clone();
    let name = name.to_string();
    let running = Running::start();
    let res = tokio::spawn(async move {
        let _running = running;
        lc.change_forward(&name, change(forward)).await
    })
    .await;
    Ok(Json(st.lifecycle.view(joined(res)?)))
}

/// How much of the console `vm logs` (without follow) returns: its end.
const LOGS_TAIL_BYTES: u64 = 1 << 20;

#[derive(Debug, Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// The last `max` bytes of `f`, from the first line that starts inside them
/// (the whole file when it is smaller), never reading more than `max`.
async fn read_tail(mut f: tokio::fs::File, max: u64) -> std::io::Result<Vec<u8>> {
    let len = f.metadata().await?.len();
    let mut buf = Vec::new();
    if len <= max {
        f.take(max).read_to_end(&mut buf).await?;
        return Ok(buf);
    }
    // One byte before the window: a newline there means the window starts
    // with a whole line.
    f.seek(std::io::SeekFrom::Start(len - max - 1)).await?;
    f.take(max + 1).read_to_end(&mut buf).await?;
    let cut = buf
        .iter()
        .position(|&b| b == b'\n')
        .map_or(buf.len(), |i| i + 1);
    buf.drain(..cut);
    Ok(buf)
}

/// The guest console: its last [`LOGS_TAIL_BYTES`] (from a line start). With
/// `follow`, the whole console, and keeps streaming new output while the VM
/// runs (like `tail -f`), and ends when it stops.
async fn vm_logs(
    State(st): S,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let lc = st.lifecycle.clone();
    let vm = lc.get(&name).await?;
    let path = lc
        .view(vm.clone())
        .dir
        .join(crate::lifecycle::SERIAL_LOG_FILE);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Cannot read {}: {e}", path.display()),
            ));
        }
    };
    if !q.follow {
        let mut buf = Vec::new();
        if let Some(f) = file {
            let read_err = |e: std::io::Error| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Cannot read {}: {e}", path.display()),
                )
            };
            buf = read_tail(f, LOGS_TAIL_BYTES).await.map_err(read_err)?;
        }
        return Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], buf).into_response());
    }
    struct Tail {
        file: Option<tokio::fs::File>,
        path: PathBuf,
        pos: u64,
        lc: Arc<Lifecycle>,
        name: String,
        done: bool,
    }
    let tail = Tail {
        file,
        path,
        pos: 0,
        lc,
        name,
        done: false,
    };
    let stream = futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            if t.file.is_none() {
                t.file = tokio::fs::File::open(&t.path).await.ok();
            }
            if let Some(f) = t.file.as_mut() {
                // The daemon rotated the log (truncated it): start over.
                if f.metadata().await.is_ok_and(|m| m.len() < t.pos) {
                    t.pos = 0;
                }
                let mut buf = vec![0u8; 64 * 1024];
                if f.seek(std::io::SeekFrom::Start(t.pos)).await.is_ok() {
                    if let Ok(n) = f.read(&mut buf).await {
                        if n > 0 {
                            t.pos += n as u64;
                            buf.truncate(n);
                            return Some((Ok::<Bytes, Infallible>(Bytes::from(buf)), t));
                        }
                    }
                }
            }
            // At the end of the file: stop once the VMM is gone (a stopping
            // VM still prints its shutdown), after one last read; else wait
            // for more output.
            let running = matches!(
                t.lc.get(&t.name).await.map(|v| v.state),
                Ok(VmState::Running | VmState::Starting | VmState::Stopping)
            );
            if !running {
                if t.done {
                    return None;
                }
                t.done = true;
                continue;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::relay_exec;

    /// The agent has sent the exit status and closed; the client's late
    /// frame meets the closed socket. The status still arrives.
    #[tokio::test]
    async fn an_exec_relay_delivers_the_agents_last_bytes_when_a_client_write_fails() {
        let (client_side, mut client) = UnixStream::pair().unwrap();
        let (agent_side, mut agent) = UnixStream::pair().unwrap();
        agent.write_all(b"exit-status").await.unwrap();
        drop(agent);
        client.write_all(b"stdin-eof").await.unwrap();
        relay_exec(client_side, agent_side).await;
        let mut got = Vec::new();
        // The relay may close its end with the client's frame still unread
        // in it, which ends the stream with a reset rather than EOF (the
        // client has its exit status by then and reads no further); what
        // the agent sent arrives first either way.
        let _ = client.read_to_end(&mut got).await;
        assert_eq!(got, b"exit-status");
    }

    /// Both ways while both ends live: the client's input reaches the
    /// agent, whose answer and end reach the client.
    #[tokio::test]
    async fn an_exec_relay_carries_both_directions() {
        let (client_side, mut client) = UnixStream::pair().unwrap();
        let (agent_side, mut agent) = UnixStream::pair().unwrap();
        let relay = tokio::spawn(relay_exec(client_side, agent_side));
        client.write_all(b"input").await.unwrap();
        client.shutdown().await.unwrap();
        let mut heard = Vec::new();
        agent.read_to_end(&mut heard).await.unwrap();
        assert_eq!(heard, b"input");
        agent.write_all(b"output").await.unwrap();
        drop(agent);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"output");
        relay.await.unwrap();
    }
}
