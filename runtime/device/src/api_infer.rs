//! The inference handlers (OIP `infer` and the raw endpoint), within the device's byte
//! budget: a request takes its share before its body is read, more for its decoded tensors,
//! and its response keeps a share until it has been sent.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::api::{Ctx, ModelRef, declared_length, read_body};
use crate::budget::{self, Held};
use crate::device::{Answer, RequestOptions};
use crate::error::InferError;
use crate::serving::{CACHE_STATUS, MAX_SESSION_KEY_BYTES, SESSION_KEY};
use outpost_engine::Payload;
use outpost_oip::{self as oip, Encoding};

/// Reads an inference body after taking its share of the budget: its declared length, or the
/// largest allowed when it is chunked.
async fn read_within(
    ctx: &Ctx,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Vec<u8>, Held), InferError> {
    let limit = ctx.limits.max_request_bytes;
    let declared = declared_length(headers);
    if declared.is_some_and(|n| n > limit) {
        return Err(InferError::TooLarge(limit));
    }
    let share = ctx
        .device
        .budget
        .take(declared.unwrap_or(limit), "the request body")?;
    let bytes = read_body(headers, body, limit).await?;
    Ok((bytes, share))
}

fn json_header_length(headers: &HeaderMap) -> Result<Option<usize>, InferError> {
    headers
        .get(oip::HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| {
                    InferError::BadRequest(
                        "Inference-Header-Content-Length must be a number".into(),
                    )
                })
        })
        .transpose()
}

/// The header naming a request's routing key (for a model with a traffic split).
pub(crate) const ROUTE_KEY: &str = "outpost-route-key";
/// The response header naming the version that answered.
pub(crate) const MODEL_VERSION: &str = "outpost-model-version";

/// The header carrying a request's id, in the request (the client's own, to post feedback
/// under) and in every answer.
pub(crate) const REQUEST_ID: &str = "outpost-request-id";

/// A request's id: the header, else the OIP `id`, else a fresh one from the device.
fn request_id(
    ctx: &Ctx,
    headers: &HeaderMap,
    oip_id: Option<String>,
) -> Result<String, InferError> {
    match headers.get(REQUEST_ID) {
        Some(v) => v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= crate::feedback::MAX_ID_BYTES)
            .map(str::to_owned)
            .ok_or_else(|| {
                InferError::BadRequest(format!(
                    "{REQUEST_ID} must be 1 to {} visible ASCII characters",
                    crate::feedback::MAX_ID_BYTES
                ))
            }),
        None => Ok(oip_id.unwrap_or_else(|| ctx.device.metrics.feedback.new_id())),
    }
}

/// Names the request in the answer.
fn with_id(mut response: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

/// The routing key of a request: the header, else the OIP request parameter `route_key`.
fn route_key(headers: &HeaderMap, parameter: Option<String>) -> Result<Option<String>, InferError> {
    match headers.get(ROUTE_KEY) {
        Some(v) => v
            .to_str()
            .map(|k| Some(k.to_owned()))
            .map_err(|_| InferError::BadRequest(format!("{ROUTE_KEY} must be visible ASCII"))),
        None => Ok(parameter),
    }
}

/// The session key of a request: the header, else the OIP request parameter `session`.
fn session_key(
    headers: &HeaderMap,
    parameter: Option<String>,
) -> Result<Option<String>, InferError> {
    let key =
        match headers.get(SESSION_KEY) {
            Some(v) => Some(v.to_str().map(str::to_owned).map_err(|_| {
                InferError::BadRequest(format!("{SESSION_KEY} must be visible ASCII"))
            })?),
            None => parameter,
        };
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_SESSION_KEY_BYTES => Err(InferError::BadRequest(
            format!("a session key is 1 to {MAX_SESSION_KEY_BYTES} bytes"),
        )),
        key => Ok(key),
    }
}

/// Says whether the answer came from the response cache, for a model that has one.
fn with_cache_status(mut response: Response, cached: Option<bool>) -> Response {
    if let Some(hit) = cached {
        let v = HeaderValue::from_static(if hit { "hit" } else { "miss" });
        response.headers_mut().insert(CACHE_STATUS, v);
    }
    response
}

/// Names the version that answered, so a client can pin itself to it.
fn with_version(mut response: Response, version: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(version) {
        response.headers_mut().insert(MODEL_VERSION, v);
    }
    response
}

/// `POST /v2/models/{name}[/versions/{version}]/infer`.
pub(crate) async fn infer(
    State(ctx): State<Ctx>,
    Path(ModelRef { name, version }): Path<ModelRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        // Resolve first so an unknown model is a 404 whatever the body.
        ctx.device.resolve(&name, version.as_deref())?;
        let (bytes, body_share) = read_within(&ctx, &headers, body).await?;
        let json_len = json_header_length(&headers)?;
        let (request, tensor_share) =
            oip::decode_request_within(&bytes, json_len, ctx.limits.max_request_bytes, |n| {
                ctx.device.budget.take(n, "the request's tensors")
            })?;
        drop((bytes, body_share));
        let key = route_key(&headers, request.route_key)?;
        let session = session_key(&headers, request.session)?;
        let id = request_id(&ctx, &headers, request.id)?;
        let options = RequestOptions {
            route_key: key.as_deref(),
            session: session.as_deref(),
        };
        let Answer {
            loaded,
            output: out,
            cached,
        } = ctx
            .device
            .infer_with(
                &name,
                version.as_deref(),
                options,
                Payload::Tensors(request.inputs),
            )
            .await?;
        drop(tensor_share);
        ctx.device.metrics.feedback.remember(
            &id,
            &name,
            loaded.version(),
            loaded.manifest.baseline.as_ref(),
            &out.observations,
        );
        Ok::<_, InferError>((
            loaded,
            out.payload,
            id,
            request.outputs,
            request.binary_output,
            cached,
        ))
    }
    .await;
    let (loaded, payload, id, requested, binary_output, cached) = match result {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let outputs = match payload {
        Payload::Tensors(outputs) => outputs,
        Payload::Raw { content_type, body } => {
            let response = raw_response(&ctx, content_type, body);
            return with_id(
                with_version(with_cache_status(response, cached), loaded.version()),
                &id,
            );
        }
    };
    let how = Encoding {
        requested: &requested,
        binary_output,
        labels: &loaded.manifest.labels,
        max_json_bytes: ctx.limits.max_response_bytes,
    };
    let encoded = oip::encode_response(&name, loaded.version(), Some(&id), &outputs, how, |n| {
        ctx.device.budget.take(n, "the response")
    });
    drop(outputs);
    let response = match encoded {
        Ok((json, binary, share)) if binary.is_empty() => (
            [(header::CONTENT_TYPE, "application/json")],
            budget::body(json, share),
        )
            .into_response(),
        Ok((json, binary, share)) => {
            let len = json.len().to_string();
            let mut body = json;
            body.extend_from_slice(&binary);
            drop(binary);
            (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (header::HeaderName::from_static(oip::HEADER_LENGTH), len),
                ],
                budget::body(body, share),
            )
                .into_response()
        }
        Err(e) => return e.into_response(),
    };
    with_id(
        with_version(with_cache_status(response, cached), loaded.version()),
        &id,
    )
}

/// A raw response, keeping its share of the budget until it has been sent.
fn raw_response(ctx: &Ctx, content_type: String, body: Vec<u8>) -> Response {
    let share = match ctx.device.budget.take(body.len() as u64, "the response") {
        Ok(share) => share,
        Err(e) => return e.into_response(),
    };
    let ct = HeaderValue::from_str(&content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, ct)], budget::body(body, share)).into_response()
}

/// `POST /v2/models/{name}[/versions/{version}]/raw`.
pub(crate) async fn raw(
    State(ctx): State<Ctx>,
    Path(ModelRef { name, version }): Path<ModelRef>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        ctx.device.resolve(&name, version.as_deref())?;
        let (bytes, share) = read_within(&ctx, &headers, body).await?;
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let payload = Payload::Raw {
            content_type,
            body: bytes,
        };
        let key = route_key(&headers, None)?;
        let session = session_key(&headers, None)?;
        let id = request_id(&ctx, &headers, None)?;
        let options = RequestOptions {
            route_key: key.as_deref(),
            session: session.as_deref(),
        };
        let out = ctx
            .device
            .infer_with(&name, version.as_deref(), options, payload)
            .await;
        drop(share);
        let Answer {
            loaded,
            output: out,
            cached,
        } = out?;
        ctx.device.metrics.feedback.remember(
            &id,
            &name,
            loaded.version(),
            loaded.manifest.baseline.as_ref(),
            &out.observations,
        );
        Ok::<_, InferError>((loaded, out, id, cached))
    }
    .await;
    let (loaded, out, id, cached) = match result {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let version = loaded.version().to_owned();
    let response = match out.payload {
        Payload::Raw { content_type, body } => raw_response(&ctx, content_type, body),
        Payload::Tensors(outputs) => {
            let how = Encoding {
                requested: &[],
                binary_output: false,
                labels: &loaded.manifest.labels,
                max_json_bytes: ctx.limits.max_response_bytes,
            };
            match oip::encode_response(&name, loaded.version(), Some(&id), &outputs, how, |n| {
                ctx.device.budget.take(n, "the response")
            }) {
                Ok((json, _, share)) => (
                    [(header::CONTENT_TYPE, "application/json")],
                    budget::body(json, share),
                )
                    .into_response(),
                Err(e) => e.into_response(),
            }
        }
    };
    with_id(
        with_version(with_cache_status(response, cached), &version),
        &id,
    )
}

/// `POST /v2/models/{name}/feedback`: the true labels or values of earlier requests, by
/// request id (`{"feedback": [{"id": "…", "truth": 3}, …]}`); idempotent per id.
pub(crate) async fn feedback(
    State(ctx): State<Ctx>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let loaded = ctx.device.resolve(&name, None)?;
        let (bytes, _share) = read_within(&ctx, &headers, body).await?;
        let post: crate::feedback::FeedbackPost = serde_json::from_slice(&bytes).map_err(|e| {
            InferError::BadRequest(format!(
                "feedback is {{\"feedback\": [{{\"id\": \"…\", \"truth\": LABEL}}, …]}}: {e}"
            ))
        })?;
        if post.feedback.len() > crate::feedback::MAX_FEEDBACK_ITEMS {
            return Err(InferError::BadRequest(format!(
                "at most {} feedback items per post",
                crate::feedback::MAX_FEEDBACK_ITEMS
            )));
        }
        Ok(ctx
            .device
            .metrics
            .feedback
            .post(&name, &post.feedback, &loaded.manifest.labels))
    }
    .await;
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.into_response(),
    }
}
