//! The HTTP API: the public router (Open Inference Protocol v2, raw endpoint, metrics) and the
//! admin router (token-protected, on its own listener).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::device::{Device, Loaded};
use crate::error::{HostError, InferError};

/// Limits the routers enforce before handing a request to the device.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest inference request body.
    pub max_request_bytes: u64,
    /// Largest JSON inference response.
    pub max_response_bytes: u64,
    /// Largest bundle upload.
    pub max_bundle_bytes: u64,
}

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) device: Arc<Device>,
    pub(crate) limits: ApiLimits,
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": msg.to_string() }))).into_response()
}

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = error(status, &self);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn host_error(e: HostError) -> Response {
    let status = match &e {
        HostError::Bundle(_) => StatusCode::BAD_REQUEST,
        HostError::UnknownModel(_) | HostError::UnknownVersion { .. } => StatusCode::NOT_FOUND,
        HostError::Revoked { .. }
        | HostError::RemoveActive { .. }
        | HostError::RemoveRouted { .. } => StatusCode::CONFLICT,
        HostError::Policy(_) => StatusCode::BAD_REQUEST,
        HostError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        HostError::Guest { .. } | HostError::Onnx { .. } | HostError::WarmUp { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "admin request failed");
    }
    error(status, e)
}

type QueryOf<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// The query, or what was wrong with it for a 400 in the API's JSON error shape (axum's own
/// rejection is plain text).
fn query_of<T>(q: QueryOf<T>) -> Result<T, String> {
    q.map(|Query(q)| q)
        .map_err(|e| format!("query: {}", e.body_text()))
}

/// The `Content-Length` a request declares, if it declares one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads a body up to `limit` bytes: a declared length above the limit is refused before any
/// byte is read, and a chunked body is cut off at the limit.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<Vec<u8>, InferError> {
    if declared_length(headers).is_some_and(|n| n > limit) {
        return Err(InferError::TooLarge(limit));
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    axum::body::to_bytes(body, limit_usize)
        .await
        .map(|b| b.to_vec())
        .map_err(|_| InferError::TooLarge(limit))
}

/// The public router: inference, health, metadata, metrics.
pub fn public_router(device: Arc<Device>, limits: ApiLimits) -> Router {
    Router::new()
        .route(
            "/v2/health/live",
            get(|| async { axum::Json(json!({ "live": true })) }),
        )
        .route(
            "/v2/health/ready",
            get(|| async { axum::Json(json!({ "ready": true })) }),
        )
        .route("/", get(crate::status_page::page))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{name}/infer", post(crate::api_infer::infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(crate::api_infer::infer),
        )
        .route("/v2/models/{name}/raw", post(crate::api_infer::raw))
        .route(
            "/v2/models/{name}/feedback",
            post(crate::api_infer::feedback),
        )
        .route(
            "/v2/models/{name}/versions/{version}/raw",
            post(crate::api_infer::raw),
        )
        .route("/v2/models/{name}/config", get(crate::triton::config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(crate::triton::config),
        )
        .route("/v2/models/stats", get(crate::triton::stats_all))
        .route("/v2/models/{name}/stats", get(crate::triton::stats))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(crate::triton::stats),
        )
        .route("/v2/repository/index", post(repository_index))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(Ctx { device, limits })
}

async fn server_metadata() -> impl IntoResponse {
    axum::Json(json!({
        "name": "outpost",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [
            "binary_tensor_data", "classification", "model_repository", "model_configuration",
            "statistics", "outpost_raw",
        ],
    }))
}

fn tensor_specs(specs: &[outpost_bundle::manifest::TensorSpec]) -> Vec<serde_json::Value> {
    specs
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t
                .shape
                .iter()
                .map(|d| match d {
                    outpost_bundle::manifest::Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                    outpost_bundle::manifest::Dim::Symbolic(_) => -1,
                })
                .collect();
            json!({ "name": t.name, "datatype": t.datatype.oip_name(), "shape": shape })
        })
        .collect()
}

fn metadata_of(device: &Device, loaded: &Loaded) -> serde_json::Value {
    let m = &loaded.manifest;
    let versions: Vec<String> = device
        .installed()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.name == m.name)
        .map(|r| r.version)
        .collect();
    json!({
        "name": m.name,
        "versions": versions,
        "platform": "outpost_wasm",
        "inputs": tensor_specs(&m.api.inputs),
        "outputs": tensor_specs(&m.api.outputs),
        "parameters": {
            "version": loaded.version(),
            "raw_content_types": m.api.raw_content_types,
            "labels": m.labels,
            "backends": loaded.backends,
        },
    })
}

/// A model path: `/v2/models/{name}` or `/v2/models/{name}/versions/{version}`.
#[derive(Deserialize)]
pub(crate) struct ModelRef {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) version: Option<String>,
}

async fn model_metadata(State(ctx): State<Ctx>, Path(m): Path<ModelRef>) -> Response {
    match ctx.device.resolve(&m.name, m.version.as_deref()) {
        Ok(l) => axum::Json(metadata_of(&ctx.device, &l)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model_ready(State(ctx): State<Ctx>, Path(m): Path<ModelRef>) -> Response {
    match ctx.device.resolve(&m.name, m.version.as_deref()) {
        Ok(l) => axum::Json(json!({ "name": m.name, "version": l.version(), "ready": true }))
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn repository_index(State(ctx): State<Ctx>) -> Response {
    let installed = match ctx.device.installed() {
        Ok(i) => i,
        Err(e) => return host_error(e),
    };
    let list: Vec<_> = installed
        .into_iter()
        .map(|r| {
            let ready = ctx.device.resolve(&r.name, Some(&r.version)).is_ok();
            json!({
                "name": r.name,
                "version": r.version,
                "state": if ready { "READY" } else { "UNAVAILABLE" },
                "reason": if ready { "" } else { "installed, not loaded (only the active version and the one it replaced are)" },
            })
        })
        .collect();
    axum::Json(list).into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.device.metrics.render() + &ctx.device.budget.render() + &ctx.device.render_backends(),
    )
        .into_response()
}

/// The admin router. Every request needs `Authorization: Bearer TOKEN`.
pub fn admin_router(device: Arc<Device>, limits: ApiLimits, token: String) -> Router {
    let token = Arc::new(token);
    Router::new()
        .route("/admin/status", get(admin_status))
        .route("/admin/bundles", get(admin_bundles).post(admin_install))
        .route("/admin/events", get(admin_events))
        .route("/admin/drift", get(admin_drift))
        .route("/admin/quality", get(admin_quality))
        .route("/admin/models/{name}/activate", post(admin_activate))
        .route("/admin/models/{name}/bundle", get(admin_bundle))
        .route(
            "/admin/models/{name}/policy",
            get(admin_policy)
                .put(admin_set_policy)
                .delete(admin_clear_policy),
        )
        .route(
            "/admin/models/{name}/versions/{version}",
            delete(admin_remove),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let token = Arc::clone(&token);
                async move {
                    let given = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or("");
                    if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                        next.run(req).await
                    } else {
                        error(StatusCode::UNAUTHORIZED, "missing or wrong admin token")
                    }
                }
            },
        ))
        .with_state(Ctx { device, limits })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn admin_status(State(ctx): State<Ctx>) -> Response {
    match ctx.device.status() {
        Ok(models) => axum::Json(json!({
            "runtime_version": env!("CARGO_PKG_VERSION"),
            "architecture": std::env::consts::ARCH,
            "models": models,
            "metrics": ctx.device.metrics.snapshot(),
        }))
        .into_response(),
        Err(e) => host_error(e),
    }
}

async fn admin_bundles(State(ctx): State<Ctx>) -> Response {
    match ctx.device.installed() {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => host_error(e),
    }
}

#[derive(Deserialize)]
struct BundleQuery {
    version: Option<String>,
}

/// `GET /admin/models/{name}/bundle[?version=V]`: the installed bundle (the active version's
/// unless one is named), as it was installed, for `outpost batch --model`.
async fn admin_bundle(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    q: QueryOf<BundleQuery>,
) -> Response {
    let q = match query_of(q) {
        Ok(q) => q,
        Err(refused) => return error(StatusCode::BAD_REQUEST, refused),
    };
    match ctx.device.state().bundle_of(&name, q.version.as_deref()) {
        Ok((record, bytes)) => {
            let version = HeaderValue::from_str(&record.version)
                .unwrap_or(HeaderValue::from_static("unknown"));
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    ),
                    (
                        header::HeaderName::from_static(crate::api_infer::MODEL_VERSION),
                        version,
                    ),
                ],
                bytes.to_vec(),
            )
                .into_response()
        }
        Err(e) => host_error(e),
    }
}

#[derive(Deserialize)]
struct InstallQuery {
    #[serde(default)]
    activate: bool,
}

async fn admin_install(
    State(ctx): State<Ctx>,
    q: QueryOf<InstallQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let q = match query_of(q) {
        Ok(q) => q,
        Err(refused) => return error(StatusCode::BAD_REQUEST, refused),
    };
    let bytes = match read_body(&headers, body, ctx.limits.max_bundle_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let device = Arc::clone(&ctx.device);
    let result = tokio::task::spawn_blocking(move || {
        if q.activate {
            device.install_and_activate(&bytes)
        } else {
            device.install(&bytes)
        }
    })
    .await;
    match result {
        Ok(Ok(record)) => (StatusCode::CREATED, axum::Json(record)).into_response(),
        Ok(Err(e)) => host_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
struct ActivateBody {
    version: String,
}

async fn admin_activate(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let req: ActivateBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("expected {{\"version\": \"...\"}}: {e}"),
            );
        }
    };
    let device = Arc::clone(&ctx.device);
    let version = req.version.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || device.activate(&n, &version)).await {
        Ok(Ok(())) => axum::Json(json!({ "name": name, "active": req.version })).into_response(),
        Ok(Err(e)) => host_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn admin_policy(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    match ctx.device.policy(&name) {
        Ok(policy) => axum::Json(policy).into_response(),
        Err(e) => host_error(e),
    }
}

async fn admin_set_policy(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let policy: crate::policy::Policy = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected \"primary\", {{\"split\": {{\"id\": ..., \"weights\": {{VERSION: WEIGHT, ...}}}}}}, {{\"shadow\": {{\"id\": ..., \"candidate\": VERSION, ...}}}} or {{\"canary\": {{\"id\": ..., \"candidate\": VERSION, \"percent\": P, ...}}}} (docs/decisions.md): {e}"
                ),
            );
        }
    };
    put_policy(ctx, name, policy).await
}

/// `GET /admin/events?limit=N`: what the device decided by itself, oldest first.
async fn admin_events(State(ctx): State<Ctx>, q: QueryOf<EventsQuery>) -> Response {
    let q = match query_of(q) {
        Ok(q) => q,
        Err(refused) => return error(StatusCode::BAD_REQUEST, refused),
    };
    let limit = q.limit.unwrap_or(100).min(crate::state::MAX_EVENTS);
    match ctx.device.events(limit) {
        Ok(events) => axum::Json(json!({ "events": events })).into_response(),
        Err(e) => host_error(e),
    }
}

/// `GET /admin/drift`: every model version's drift against its training baseline (PSI per
/// feature over the window and since start, the window's histogram and moments).
async fn admin_drift(State(ctx): State<Ctx>) -> Response {
    axum::Json(json!({ "versions": ctx.device.metrics.drift.report() })).into_response()
}

/// `GET /admin/quality`: each model version's accuracy or mean absolute error from the labels
/// posted to `/v2/models/{name}/feedback`.
async fn admin_quality(State(ctx): State<Ctx>) -> Response {
    axum::Json(json!({ "versions": ctx.device.metrics.feedback.report() })).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn admin_clear_policy(State(ctx): State<Ctx>, Path(name): Path<String>) -> Response {
    put_policy(ctx, name, crate::policy::Policy::Primary).await
}

async fn put_policy(ctx: Ctx, name: String, policy: crate::policy::Policy) -> Response {
    let device = Arc::clone(&ctx.device);
    let shown = policy.clone();
    match tokio::task::spawn_blocking(move || device.set_policy(&name, policy)).await {
        Ok(Ok(())) => axum::Json(shown).into_response(),
        Ok(Err(e)) => host_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn admin_remove(
    State(ctx): State<Ctx>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    let device = Arc::clone(&ctx.device);
    match tokio::task::spawn_blocking(move || device.remove(&name, &version)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => host_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// How the endpoints' front doors are bounded.
#[derive(Debug, Clone, Copy)]
pub struct Doors {
    /// The inference endpoint's.
    pub public: outpost_http::Limits,
    /// The admin endpoint's.
    pub admin: outpost_http::Limits,
}

/// Serves the public router on `public` (and the admin router on `admin`, if given) until
/// `shutdown` completes, each behind its front door (timeouts and a connection cap, counted in
/// the device's metrics); in-flight requests finish first.
pub async fn serve(
    device: Arc<Device>,
    limits: ApiLimits,
    doors: Doors,
    public: TcpListener,
    admin: Option<(TcpListener, String)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let public_stats = Arc::new(outpost_http::Stats::default());
    let admin_stats = Arc::new(outpost_http::Stats::default());
    let mut listeners = vec![("public".to_owned(), Arc::clone(&public_stats))];
    if admin.is_some() {
        listeners.push(("admin".to_owned(), Arc::clone(&admin_stats)));
    }
    device.metrics.set_http(listeners);
    let public_server = outpost_http::serve(
        public,
        public_router(Arc::clone(&device), limits),
        doors.public,
        public_stats,
        wait(rx.clone()),
    );
    match admin {
        Some((listener, token)) => {
            let admin_server = outpost_http::serve(
                listener,
                admin_router(device, limits, token),
                doors.admin,
                admin_stats,
                wait(rx),
            );
            tokio::join!(public_server, admin_server);
        }
        None => public_server.await,
    }
}
