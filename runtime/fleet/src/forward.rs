//! Writes sent to a replica without the publishing role, forwarded to the one with it.
//!
//! Replicas on one database sit behind one load balancer, and every one of them answers the
//! whole API: reads from the shared store, and writes (push, deploy, rollouts, enrolment,
//! forgetting a device) by handing the request as it came to the replica that holds the
//! publishing role, at the address it recorded with the role (`--advertise-url`), and
//! relaying its answer. The forwarded request is marked, and a marked request is always
//! answered where it lands: a role that moved meanwhile gets a 409, never a loop.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::domain::Fleet;
use crate::error::FleetError;
use crate::store::Leader;

/// Set on a forwarded request, naming the replica that forwarded it.
pub const FORWARDED_BY_HEADER: &str = "x-outpost-forwarded-by";
/// Set on the answer to a forwarded write, naming the replica that answered it.
pub const SERVED_BY_HEADER: &str = "x-outpost-served-by";
/// Where the API's routes are nested.
const API_PREFIX: &str = "/api/v1";
/// How long a forwarded write may take: a deployment to many devices signs a desired state
/// for each.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(300);
/// The request headers that travel with a forwarded write.
const FORWARDED_HEADERS: [header::HeaderName; 3] =
    [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT];

/// The middleware: forwards a write when this replica shares a database, does not hold the
/// publishing role, and knows where the holder answers; anything else is answered here.
pub async fn writes_to_the_leader(
    State(fleet): State<Arc<Fleet>>,
    request: Request,
    next: Next,
) -> Response {
    let write = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !write
        || !fleet.store.shared()
        || fleet.leads()
        || request.headers().contains_key(FORWARDED_BY_HEADER)
    {
        return next.run(request).await;
    }
    let lookup = Arc::clone(&fleet);
    let leader = tokio::task::spawn_blocking(move || lookup.store.leader()).await;
    let Ok(Ok(Some(Leader {
        replica,
        api: Some(api),
    }))) = leader
    else {
        // No holder, or one that did not say where it answers: answered here (409).
        return next.run(request).await;
    };
    if replica == fleet.replica {
        // Its own, lost a moment ago: answered here (409).
        return next.run(request).await;
    }
    // Installed on the API's routes, which see their paths without the prefix they are
    // nested under.
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let prefix = if path.starts_with(API_PREFIX) {
        ""
    } else {
        API_PREFIX
    };
    let url = format!("{}{prefix}{path}", api.trim_end_matches('/'));
    let method = request.method().clone();
    let headers = request.headers().clone();
    let limit = usize::try_from(fleet.max_bundle_bytes).unwrap_or(usize::MAX);
    let body = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(body) => body,
        Err(e) => {
            return FleetError::BadRequest(format!("the request body: {e}")).into_response();
        }
    };
    let from = fleet.replica.clone();
    let target = url.clone();
    let answer =
        tokio::task::spawn_blocking(move || forward(&target, &method, &headers, &body, &from))
            .await;
    match answer {
        Ok(Ok((status, content_type, body))) => {
            tracing::debug!(%url, %status, leader = %replica, "forwarded a write to the publishing replica");
            let mut response = (status, Body::from(body)).into_response();
            if let Some(content_type) = content_type {
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, content_type);
            }
            if let Ok(served_by) = HeaderValue::from_str(&replica) {
                response.headers_mut().insert(SERVED_BY_HEADER, served_by);
            }
            response
        }
        Ok(Err(e)) => FleetError::Forward(format!(
            "replica `{replica}` holds the publishing role but did not answer at {api}: {e}"
        ))
        .into_response(),
        Err(e) => FleetError::Corrupt(format!("forwarding task: {e}")).into_response(),
    }
}

/// Sends the write on and reads the whole answer: (status, content type, body).
fn forward(
    url: &str,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
    from: &str,
) -> Result<(StatusCode, Option<HeaderValue>, Vec<u8>), String> {
    let roots = if url.starts_with("https://") {
        outpost_tls::root_certificates(None).map_err(|e| e.to_string())?
    } else {
        Vec::new()
    };
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(FORWARD_TIMEOUT))
        .tls_config(outpost_tls::ureq_tls_config(&roots))
        .build()
        .new_agent();
    let mut request = ureq::http::Request::builder()
        .method(method.clone())
        .uri(url)
        .header(FORWARDED_BY_HEADER, from);
    for name in &FORWARDED_HEADERS {
        if let Some(value) = headers.get(name) {
            request = request.header(name, value);
        }
    }
    let request = request.body(body.to_vec()).map_err(|e| e.to_string())?;
    let mut response = agent.run(request).map_err(|e| e.to_string())?;
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok((status, content_type, body))
}
