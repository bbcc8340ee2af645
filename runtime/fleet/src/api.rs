//! The fleet's REST API, artifact downloads (with Range) and `/metrics`.
//!
//! | Method | Path | |
//! |---|---|---|
//! | GET | `/healthz` | liveness |
//! | GET | `/api/v1/fleet` | replica, broker, public key |
//! | GET | `/api/v1/devices`, `/api/v1/devices/{id}` | registry with reported state; the list takes `?limit=&after=&tag=&status=&model=&version=&in_sync=` ([`DeviceQuery`]) |
//! | GET, POST | `/api/v1/bundles` | list; push a signed bundle (body: the `.opb`) |
//! | GET, POST | `/api/v1/deployments` | list; deploy (JSON [`DeployRequest`]) |
//! | GET | `/api/v1/telemetry`, `/api/v1/events` | `?device=&after=&limit=` |
//! | GET, POST | `/api/v1/rollouts` | list; start a staged rollout (JSON `RolloutRequest`) |
//! | GET | `/api/v1/rollouts/{id}` | one rollout: state, devices reached, history |
//! | POST | `/api/v1/rollouts/{id}/{pause,resume,promote,abort}` | operate on it |
//! | GET, HEAD | `/artifacts/{sha256}` | bundle bytes; `Range: bytes=` honoured |
//! | GET | `/metrics` | Prometheus text |

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use outpost_proto::rest::{
    DeviceQuery, FleetInfo, Forgotten, MAX_DEVICE_PAGE, NEXT_AFTER_HEADER, RecordQuery, Records,
    Revoked,
};

use crate::domain::Fleet;
use crate::error::FleetError;
use crate::store::{DesiredRecord, DeviceRecord, Stream, now_secs};
use outpost_proto::rest::DeployRequest;

type Shared = State<Arc<Fleet>>;

impl IntoResponse for FleetError {
    fn into_response(self) -> Response {
        let status = match &self {
            FleetError::Config(_) | FleetError::BadRequest(_) => StatusCode::BAD_REQUEST,
            FleetError::NotFound(_) => StatusCode::NOT_FOUND,
            FleetError::Bundle(_) => StatusCode::UNPROCESSABLE_ENTITY,
            FleetError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
            FleetError::NotPublishing(_) => StatusCode::CONFLICT,
            FleetError::Forward(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// Ready to serve: the store answers (a database gone away makes this 503 until it is back,
/// so a load balancer sends the API's clients to a replica that can answer them). `/healthz`
/// says only that the process runs.
async fn ready(State(fleet): Shared) -> Response {
    match tokio::task::spawn_blocking(move || fleet.store.check()).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => FleetError::Corrupt(format!("readiness task: {e}")).into_response(),
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(serde_json::json!({ "error": "missing or wrong bearer token" })),
    )
        .into_response()
}

fn authorized(fleet: &Fleet, headers: &HeaderMap) -> bool {
    let Some(token) = &fleet.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Constant-time comparison.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The router.
pub fn router(fleet: Arc<Fleet>) -> axum::Router {
    let api = axum::Router::new()
        .route("/fleet", get(fleet_info))
        .route("/devices", get(devices))
        .route("/devices/{id}", get(device).delete(forget))
        .route("/devices/{id}/enrolment", post(enroll).delete(revoke))
        .route("/bundles", get(bundles).post(push))
        .route(
            "/bundles/{name}/{version}",
            axum::routing::delete(remove_bundle),
        )
        .route("/deployments", get(deployments).post(deploy))
        .route("/rollouts", get(rollouts).post(start_rollout))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/{op}", post(rollout_op))
        .route("/telemetry", get(telemetry))
        .route("/events", get(events))
        .route("/drift", get(drift))
        .route("/quality", get(quality))
        .route("/series", get(series))
        .route("/compare", get(compare))
        .route("/rules", get(rules))
        .route("/rules/{name}/test", post(test_rule))
        .route("/firings", get(firings))
        .layer(DefaultBodyLimit::max(
            usize::try_from(fleet.max_bundle_bytes).unwrap_or(usize::MAX),
        ))
        // Inside the token check: only authorised writes travel on.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&fleet),
            crate::forward::writes_to_the_leader,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&fleet),
            |State(fleet): Shared,
             request: axum::extract::Request,
             next: axum::middleware::Next| async move {
                if authorized(&fleet, request.headers()) {
                    next.run(request).await
                } else {
                    unauthorized()
                }
            },
        ));
    axum::Router::new()
        .nest("/api/v1", api)
        .route("/", get(|| dashboard_file("index.html")))
        .route(
            "/dashboard/{file}",
            get(|Path(file): Path<String>| dashboard_file_owned(file)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/artifacts/{digest}", get(artifact).head(artifact))
        .with_state(fleet)
}

async fn fleet_info(State(fleet): Shared) -> Json<FleetInfo> {
    Json(FleetInfo {
        replica: fleet.replica.clone(),
        broker: fleet.public_broker.to_string(),
        public_key: fleet.public_key(),
        key_id: fleet.key_id().to_owned(),
        artifacts: fleet.artifact_base.clone(),
        broker_connected: fleet.metrics.broker_connected.load(Ordering::Relaxed),
        publishing: fleet.leads(),
        store: fleet.store.describe(),
    })
}

pub use outpost_proto::rest::DeviceView;

fn view(fleet: &Fleet, record: DeviceRecord) -> Result<DeviceView, FleetError> {
    let desired = fleet.store.desired(&record.id)?;
    let enrolled = fleet.is_enrolled(&record.id);
    Ok(view_with(record, desired, enrolled))
}

/// A device's view from its record, its desired state and whether it is enrolled.
fn view_with(
    mut record: DeviceRecord,
    desired: Option<DesiredRecord>,
    enrolled: bool,
) -> DeviceView {
    record.online = record.is_online(now_secs());
    let desired_generation = desired.as_ref().map(|d| d.generation);
    let applied = record.reported.as_ref().and_then(|r| r.generation);
    DeviceView {
        in_sync: desired_generation.is_none() || applied == desired_generation,
        desired_generation,
        desired: desired
            .map(|d| {
                d.deployments
                    .into_iter()
                    .map(|x| (x.model, x.version))
                    .collect()
            })
            .unwrap_or_default(),
        enrolled,
        record,
    }
}

async fn devices(
    State(fleet): Shared,
    query: QueryOf<DeviceQuery>,
) -> Result<Response, FleetError> {
    let query = query_of(query, "the device list")?;
    if query.limit == Some(0) || query.limit.is_some_and(|l| l > MAX_DEVICE_PAGE) {
        return Err(FleetError::BadRequest(format!(
            "limit must be 1 to {MAX_DEVICE_PAGE}"
        )));
    }
    // A scan of the registry (bounded by the page, but a filter may read far for few hits)
    // runs off the async threads.
    let scan_fleet = Arc::clone(&fleet);
    let scan_query = query.clone();
    let (page, next) = tokio::task::spawn_blocking(move || device_page(&scan_fleet, &scan_query))
        .await
        .map_err(|e| FleetError::Corrupt(format!("device list task: {e}")))??;
    let mut response = Json(page).into_response();
    if let Some(next) = next {
        let mut link_query = query;
        link_query.after = Some(next.clone());
        let link = serde_urlencoded::to_string(&link_query)
            .map(|q| format!("</api/v1/devices?{q}>; rel=\"next\""))
            .ok()
            .and_then(|l| HeaderValue::from_str(&l).ok());
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&next) {
            headers.insert(NEXT_AFTER_HEADER, value);
        }
        if let Some(link) = link {
            headers.insert(header::LINK, link);
        }
    }
    Ok(response)
}

/// Devices whose desired states and credentials are read at once for a page of the list.
const VIEW_CHUNK: usize = 256;

/// One page of the device list, and the id to continue after when more may follow.
fn device_page(
    fleet: &Fleet,
    query: &DeviceQuery,
) -> Result<(Vec<DeviceView>, Option<String>), FleetError> {
    let now = now_secs();
    let limit = query.limit.unwrap_or(usize::MAX);
    let chunk_size = limit.saturating_add(1).min(VIEW_CHUNK);
    let mut page = Vec::new();
    let mut records = fleet.store.devices_after(query.after.as_deref());
    loop {
        // The next devices the filters admit, a chunk at a time, so that their desired states
        // and credentials come in one read (one round trip on a database), not one a device.
        let mut chunk = Vec::with_capacity(chunk_size);
        for record in records.by_ref() {
            let record = record?;
            if query.admits(&record, now) {
                chunk.push(record);
                if chunk.len() == chunk_size {
                    break;
                }
            }
        }
        if chunk.is_empty() {
            return Ok((page, None));
        }
        let extra = {
            let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
            fleet.store.desired_and_enrolled(&ids)?
        };
        for (record, (desired, enrolled)) in chunk.into_iter().zip(extra) {
            let enrolled = enrolled || fleet.has_login(&record.id);
            let view = view_with(record, desired, enrolled);
            if query.in_sync.is_some_and(|want| view.in_sync != want) {
                continue;
            }
            if page.len() == limit {
                // One more matches: the page is full and another follows.
                let next = page.last().map(|v: &DeviceView| v.record.id.clone());
                return Ok((page, next));
            }
            page.push(view);
        }
    }
}

async fn device(
    State(fleet): Shared,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, FleetError> {
    let record = fleet
        .store
        .device(&id)?
        .ok_or_else(|| FleetError::NotFound(format!("device `{id}`")))?;
    Ok(Json(view(&fleet, record)?))
}

async fn forget(
    State(fleet): Shared,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, FleetError> {
    let record = fleet.store.device(&id)?;
    let online = record.is_some_and(|r| r.is_online(now_secs()));
    fleet.forget(&id)?;
    Ok(Json(Forgotten {
        note: if online {
            "the device is online: it will register again unless it is stopped"
        } else {
            "its telemetry stays until retention removes it"
        }
        .to_owned(),
        forgotten: id,
    }))
}

async fn enroll(
    State(fleet): Shared,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, FleetError> {
    Ok((StatusCode::CREATED, Json(fleet.enroll(&id)?)))
}

async fn revoke(State(fleet): Shared, Path(id): Path<String>) -> Result<Json<Revoked>, FleetError> {
    if !fleet.revoke(&id)? {
        return Err(FleetError::NotFound(format!(
            "credentials of device `{id}`"
        )));
    }
    Ok(Json(Revoked {
        note: if fleet.logins.is_some() {
            "its connection is closed and it cannot log in again; `outpost fleet forget` removes it from the registry (a login from --mqtt-logins comes back at restart unless removed from the file)"
        } else {
            "the fleet no longer hears it; remove its login from the broker too"
        }
        .to_owned(),
        revoked: id,
    }))
}

async fn remove_bundle(
    State(fleet): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Result<impl IntoResponse, FleetError> {
    Ok(Json(fleet.remove_bundle(&name, &version)?))
}

async fn bundles(State(fleet): Shared) -> Result<impl IntoResponse, FleetError> {
    Ok(Json(fleet.store.bundles()?))
}

async fn push(State(fleet): Shared, body: Bytes) -> Result<impl IntoResponse, FleetError> {
    let fleet2 = Arc::clone(&fleet);
    let record = tokio::task::spawn_blocking(move || fleet2.push(&body))
        .await
        .map_err(|e| FleetError::Corrupt(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn deployments(State(fleet): Shared) -> Result<impl IntoResponse, FleetError> {
    Ok(Json(fleet.store.deployments()?))
}

async fn deploy(
    State(fleet): Shared,
    body: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, FleetError> {
    let Json(request) = body.map_err(|e| FleetError::BadRequest(e.body_text()))?;
    fleet.refuse_during_rollout(&request.model)?;
    let response = fleet.deploy(&request)?;
    Ok((StatusCode::CREATED, Json(response)))
}

async fn rollouts(State(fleet): Shared) -> Result<impl IntoResponse, FleetError> {
    Ok(Json(fleet.store.rollouts()?))
}

async fn start_rollout(
    State(fleet): Shared,
    body: Result<
        Json<outpost_proto::rest::RolloutRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<impl IntoResponse, FleetError> {
    let Json(request) = body.map_err(|e| FleetError::BadRequest(e.body_text()))?;
    let record = tokio::task::spawn_blocking(move || fleet.start_rollout(request))
        .await
        .map_err(|e| FleetError::Corrupt(e.to_string()))??;
    Ok((StatusCode::CREATED, Json(record)))
}

async fn rollout(
    State(fleet): Shared,
    Path(id): Path<u64>,
) -> Result<impl IntoResponse, FleetError> {
    Ok(Json(fleet.rollout(id)?))
}

async fn rollout_op(
    State(fleet): Shared,
    Path((id, op)): Path<(u64, String)>,
) -> Result<impl IntoResponse, FleetError> {
    let op = crate::rollout::Op::parse(&op).ok_or_else(|| {
        FleetError::NotFound(format!(
            "rollout operation `{}` (pause, resume, promote or abort)",
            outpost_proto::text::bounded(&op, 40)
        ))
    })?;
    let record = tokio::task::spawn_blocking(move || fleet.rollout_op(id, op))
        .await
        .map_err(|e| FleetError::Corrupt(e.to_string()))??;
    Ok(Json(record))
}

async fn telemetry(
    State(fleet): Shared,
    q: QueryOf<RecordQuery>,
) -> Result<impl IntoResponse, FleetError> {
    records(&fleet, Stream::Telemetry, query_of(q, "telemetry")?)
}

async fn events(
    State(fleet): Shared,
    q: QueryOf<RecordQuery>,
) -> Result<impl IntoResponse, FleetError> {
    records(&fleet, Stream::Events, query_of(q, "events")?)
}

type QueryOf<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// The query, or a 400 in the API's JSON shape that says what was wrong with it (axum's own
/// rejection is plain text).
fn query_of<T>(q: QueryOf<T>, what: &str) -> Result<T, FleetError> {
    q.map(|Query(q)| q)
        .map_err(|e| FleetError::BadRequest(format!("{what}: {}", e.body_text())))
}

/// Runs `answer` on the query off the async threads; a malformed query is a 400 that says
/// what `what` expects.
async fn monitor<Q, T: serde::Serialize + Send + 'static>(
    fleet: Arc<Fleet>,
    q: QueryOf<Q>,
    what: &'static str,
    answer: impl FnOnce(&Fleet, Q) -> Result<T, FleetError> + Send + 'static,
) -> Result<Json<T>, FleetError>
where
    Q: Send + 'static,
{
    let q = query_of(q, what)?;
    let answer = tokio::task::spawn_blocking(move || answer(&fleet, q))
        .await
        .map_err(|e| FleetError::Io(std::io::Error::other(e.to_string())))??;
    Ok(Json(answer))
}

/// `GET /api/v1/drift?model=&version=[&tag=][&window=SECS]`: fleet-wide drift of a model
/// version against its bundle's training baseline.
async fn drift(
    State(fleet): Shared,
    q: QueryOf<outpost_proto::rest::MonitorQuery>,
) -> Result<impl IntoResponse, FleetError> {
    let what = "drift needs ?model=NAME&version=V (optional tag=T, window=SECONDS)";
    monitor(fleet, q, what, |f, q| f.drift(&q)).await
}

/// `GET /api/v1/quality?model=&version=[&tag=][&window=SECS]`: fleet-wide accuracy or mean
/// absolute error of a model version from the labels its devices joined.
async fn quality(
    State(fleet): Shared,
    q: QueryOf<outpost_proto::rest::MonitorQuery>,
) -> Result<impl IntoResponse, FleetError> {
    let what = "quality needs ?model=NAME&version=V (optional tag=T, window=SECONDS)";
    monitor(fleet, q, what, |f, q| f.quality(&q)).await
}

/// `GET /api/v1/series?model=&version=[&tag=][&span=SECS][&step=SECS]`: a model version's
/// requests, errors, p95 latency and PSI per feature over time.
async fn series(
    State(fleet): Shared,
    q: QueryOf<outpost_proto::rest::SeriesQuery>,
) -> Result<impl IntoResponse, FleetError> {
    let what = "series needs ?model=NAME&version=V (optional tag=T, span=SECONDS, step=SECONDS)";
    monitor(fleet, q, what, |f, q| f.series(&q)).await
}

/// `GET /api/v1/compare?model=[&tag=][&window=SECS]`: every version of a model its devices
/// served, by role (primary, A/B or canary candidate, shadow), side by side.
async fn compare(
    State(fleet): Shared,
    q: QueryOf<outpost_proto::rest::CompareQuery>,
) -> Result<impl IntoResponse, FleetError> {
    let what = "compare needs ?model=NAME (optional tag=T, window=SECONDS)";
    monitor(fleet, q, what, |f, q| f.compare(&q)).await
}

/// The dashboard's files, embedded in the binary.
const DASHBOARD: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/dashboard.css"),
    ),
];

/// `GET /` and `GET /dashboard/{file}`: the web dashboard. The page holds no data: it reads
/// `/api/v1` from the browser, with the API's token when the fleet has one.
async fn dashboard_file(name: &str) -> Response {
    match DASHBOARD.iter().find(|(n, _, _)| *n == name) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
                ),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => FleetError::NotFound(format!("dashboard file `{name}`")).into_response(),
    }
}

async fn dashboard_file_owned(name: String) -> Response {
    dashboard_file(&name).await
}

/// `GET /api/v1/rules`: every rule with its state per model version.
async fn rules(State(fleet): Shared) -> Json<Vec<outpost_proto::rest::RuleView>> {
    Json(fleet.rule_views())
}

/// `POST /api/v1/rules/{name}/test`: measures a rule now, without firing it.
async fn test_rule(
    State(fleet): Shared,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, FleetError> {
    let answer = tokio::task::spawn_blocking(move || fleet.test_rule(&name))
        .await
        .map_err(|e| FleetError::Io(std::io::Error::other(e.to_string())))??;
    Ok(Json(answer))
}

#[derive(Debug, serde::Deserialize)]
struct FiringsQuery {
    limit: Option<usize>,
}

/// `GET /api/v1/firings[?limit=N]`: the newest rule firings with their delivery attempts.
async fn firings(
    State(fleet): Shared,
    q: QueryOf<FiringsQuery>,
) -> Result<impl IntoResponse, FleetError> {
    let q = query_of(q, "firings")?;
    Ok(Json(
        fleet.store.firings(q.limit.unwrap_or(100).min(10_000))?,
    ))
}

fn records(fleet: &Fleet, stream: Stream, q: RecordQuery) -> Result<Response, FleetError> {
    let limit = q.limit.unwrap_or(1000).min(100_000);
    let records = fleet
        .store
        .records(stream, q.device.as_deref(), q.after, limit)?;
    Ok(Json(Records { records }).into_response())
}

/// A parsed `Range` header against a file of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// No usable range: send everything.
    Full,
    /// Bytes `start..=end`.
    Part(u64, u64),
    /// Cannot be satisfied.
    Unsatisfiable,
}

fn parse_range(value: Option<&str>, size: u64) -> Range {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        // Several ranges: allowed to answer with the whole file.
        return Range::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(start), None) if b.is_empty() => Some((start, size.saturating_sub(1))),
        (Some(start), Some(end)) if start <= end => Some((start, end.min(size.saturating_sub(1)))),
        (None, Some(suffix)) if a.is_empty() && suffix > 0 => {
            Some((size.saturating_sub(suffix), size.saturating_sub(1)))
        }
        _ => return Range::Full,
    };
    match range {
        Some((start, end)) if start < size && start <= end => Range::Part(start, end),
        _ => Range::Unsatisfiable,
    }
}

async fn artifact(
    State(fleet): Shared,
    method: Method,
    Path(digest): Path<String>,
    headers: HeaderMap,
) -> Result<Response, FleetError> {
    let path = fleet.store.artifact_path(&digest)?;
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FleetError::NotFound(format!("artifact `{digest}`")));
        }
        Err(e) => return Err(e.into()),
    };
    let size = file.metadata().await?.len();
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        size,
    );
    let (status, start, len) = match range {
        Range::Full => (StatusCode::OK, 0, size),
        Range::Part(start, end) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Range::Unsatisfiable => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response());
        }
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/vnd.outpost.bundle")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable");
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    if method == Method::HEAD {
        return builder
            .body(Body::empty())
            .map_err(|e| FleetError::Corrupt(e.to_string()));
    }
    file.seek(std::io::SeekFrom::Start(start)).await?;
    fleet
        .metrics
        .artifact_requests
        .fetch_add(1, Ordering::Relaxed);
    fleet
        .metrics
        .artifact_bytes
        .fetch_add(len, Ordering::Relaxed);
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 64 * 1024);
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| FleetError::Corrupt(e.to_string()))
}

/// What `/metrics` says about the registry as a whole: one pass over it, no series per device.
#[derive(Debug, Default)]
struct Census {
    devices: u64,
    online: u64,
    /// Devices with a desired state that they have not applied.
    pending: u64,
    /// Devices whose last reported state carries an error.
    failing: u64,
    /// Records the devices say they dropped, summed.
    dropped: u64,
    /// Devices by seconds since last heard: at most 60, 300, 3,600, 86,400, and ever.
    heard_within: [u64; 5],
    /// (id, seconds since heard, dropped) per device, only when asked for.
    per_device: Vec<(String, Option<u64>, u64)>,
}

/// The bounds of [`Census::heard_within`], in seconds.
const HEARD_WITHIN: [u64; 4] = [60, 300, 3_600, 86_400];

fn census(fleet: &Fleet) -> Result<Census, FleetError> {
    let now = now_secs();
    let mut c = Census::default();
    let desired = fleet.store.desired_generations()?;
    for record in fleet.store.devices_after(None) {
        let d = record?;
        c.devices += 1;
        c.online += u64::from(d.is_online(now));
        c.dropped += d.dropped;
        let reported = d.reported.as_ref();
        c.failing += u64::from(reported.is_some_and(|r| r.last_error.is_some()));
        if let Some(&generation) = desired.get(&d.id) {
            let applied = reported.and_then(|r| r.generation);
            c.pending += u64::from(applied != Some(generation));
        }
        let age = d.last_seen.map(|seen| now.saturating_sub(seen));
        if let Some(age) = age {
            for (i, bound) in HEARD_WITHIN.iter().enumerate() {
                c.heard_within[i] += u64::from(age <= *bound);
            }
            c.heard_within[4] += 1;
        }
        if fleet.per_device_metrics {
            c.per_device.push((d.id, age, d.dropped));
        }
    }
    Ok(c)
}

async fn metrics(State(fleet): Shared) -> Result<Response, FleetError> {
    let scan = Arc::clone(&fleet);
    let census = tokio::task::spawn_blocking(move || census(&scan))
        .await
        .map_err(|e| FleetError::Corrupt(format!("metrics task: {e}")))??;
    let mut out = String::new();
    let m = &fleet.metrics;
    let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    gauge(
        "outpost_fleet_devices",
        "Devices known to the fleet.",
        "gauge",
        census.devices.to_string(),
    );
    gauge(
        "outpost_fleet_devices_online",
        "Devices whose presence says online.",
        "gauge",
        census.online.to_string(),
    );
    gauge(
        "outpost_fleet_devices_pending",
        "Devices that have not reported applying the desired state the fleet last signed for them.",
        "gauge",
        census.pending.to_string(),
    );
    gauge(
        "outpost_fleet_devices_failing",
        "Devices whose last reported state carries an error.",
        "gauge",
        census.failing.to_string(),
    );
    gauge(
        "outpost_fleet_device_dropped_records_sum",
        "Records the devices say they dropped (outbox quota, full disk), summed over devices.",
        "gauge",
        census.dropped.to_string(),
    );
    gauge(
        "outpost_fleet_malformed_messages_total",
        "Device messages that could not be read, ignored.",
        "counter",
        m.malformed.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_foreign_messages_total",
        "Device messages naming a device other than their topic's (publishing as another device), ignored.",
        "counter",
        m.foreign.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_broker_connected",
        "Whether the fleet is connected to its MQTT broker.",
        "gauge",
        u8::from(m.broker_connected.load(Ordering::Relaxed)).to_string(),
    );
    gauge(
        "outpost_fleet_publishing",
        "Whether this replica holds the publishing role (signs and publishes desired states, takes deployments).",
        "gauge",
        u8::from(fleet.leads()).to_string(),
    );
    gauge(
        "outpost_fleet_records_total",
        "Telemetry and event records stored.",
        "counter",
        m.records.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_conflicting_records_total",
        "Records that differed from one stored under the same device and sequence number (someone else published as that device); kept beside it, up to four per number.",
        "counter",
        m.conflicts.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_over_quota_records_total",
        "Records refused because their device held its quota of stored bytes already.",
        "counter",
        m.over_quota.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_unenrolled_total",
        "Messages from devices not enrolled, ignored (enrolment is required).",
        "counter",
        m.unenrolled.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_duplicate_records_total",
        "Records received again after a lost acknowledgement and discarded.",
        "counter",
        m.duplicates.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_artifact_requests_total",
        "Artifact downloads served.",
        "counter",
        m.artifact_requests.load(Ordering::Relaxed).to_string(),
    );
    gauge(
        "outpost_fleet_artifact_bytes_total",
        "Artifact bytes served.",
        "counter",
        m.artifact_bytes.load(Ordering::Relaxed).to_string(),
    );
    out.push_str("# HELP outpost_fleet_devices_heard_within Devices last heard at most `le` seconds ago (cumulative; +Inf: ever heard).\n# TYPE outpost_fleet_devices_heard_within gauge\n");
    for (i, le) in ["60", "300", "3600", "86400", "+Inf"].iter().enumerate() {
        out.push_str(&format!(
            "outpost_fleet_devices_heard_within{{le=\"{le}\"}} {}\n",
            census.heard_within[i]
        ));
    }
    if fleet.per_device_metrics {
        out.push_str("# HELP outpost_fleet_device_last_seen_seconds Seconds since a device was last heard.\n# TYPE outpost_fleet_device_last_seen_seconds gauge\n");
        for (id, age, _) in &census.per_device {
            if let Some(age) = age {
                out.push_str(&format!(
                    "outpost_fleet_device_last_seen_seconds{{device=\"{id}\"}} {age}\n"
                ));
            }
        }
    }
    if let Some(gate) = m.gate.get() {
        for (name, help, kind, value) in [
            (
                "outpost_fleet_mqtt_connections_open",
                "MQTT connections open at the embedded broker.",
                "gauge",
                &gate.open,
            ),
            (
                "outpost_fleet_mqtt_connections_admitted_total",
                "MQTT connections the embedded broker accepted.",
                "counter",
                &gate.admitted,
            ),
            (
                "outpost_fleet_mqtt_refused_client_ids_total",
                "MQTT CONNECTs refused for their client id (characters the broker's router rejects, too long, control characters).",
                "counter",
                &gate.refused_ids,
            ),
            (
                "outpost_fleet_mqtt_malformed_connections_total",
                "MQTT connections closed for not starting with a well-formed CONNECT in time.",
                "counter",
                &gate.malformed,
            ),
            (
                "outpost_fleet_mqtt_over_capacity_total",
                "MQTT connections closed because the embedded broker was at its connection cap.",
                "counter",
                &gate.over_capacity,
            ),
            (
                "outpost_fleet_mqtt_evicted_total",
                "MQTT connections with no CONNECT yet, closed at the connection cap to make room for a newcomer.",
                "counter",
                &gate.evicted,
            ),
            (
                "outpost_fleet_mqtt_refused_logins_total",
                "MQTT CONNECTs refused for an unknown login or a wrong password.",
                "counter",
                &gate.refused_logins,
            ),
            (
                "outpost_fleet_mqtt_unauthorised_total",
                "MQTT CONNECTs refused for a client id or last will not the login's own.",
                "counter",
                &gate.refused_unauthorised,
            ),
            (
                "outpost_fleet_mqtt_forbidden_total",
                "MQTT connections closed for a PUBLISH or SUBSCRIBE outside the login's own topics.",
                "counter",
                &gate.forbidden,
            ),
            (
                "outpost_fleet_mqtt_throttled_total",
                "Times a device's publishing was held back for going past its rate at the embedded broker.",
                "counter",
                &gate.throttled,
            ),
            (
                "outpost_fleet_mqtt_revoked_total",
                "MQTT connections closed because their login was revoked or replaced.",
                "counter",
                &gate.revoked,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
    }
    out.push_str(&outpost_http::render(
        "outpost_fleet_http",
        &[("api", &m.http)],
    ));
    if fleet.per_device_metrics {
        out.push_str("# HELP outpost_fleet_device_dropped_records Records a device dropped (outbox quota, full disk).\n# TYPE outpost_fleet_device_dropped_records gauge\n");
        for (id, _, dropped) in &census.per_device {
            out.push_str(&format!(
                "outpost_fleet_device_dropped_records{{device=\"{id}\"}} {dropped}\n"
            ));
        }
    }
    out.push_str(&fleet.rules.render());
    let mut response = out.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Range::Full);
        assert_eq!(parse_range(Some("bytes=0-"), 10), Range::Part(0, 9));
        assert_eq!(parse_range(Some("bytes=4-"), 10), Range::Part(4, 9));
        assert_eq!(parse_range(Some("bytes=2-5"), 10), Range::Part(2, 5));
        assert_eq!(parse_range(Some("bytes=2-50"), 10), Range::Part(2, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Range::Part(7, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Range::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Range::Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Range::Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Range::Full);
    }
}
