//! The model configuration and statistics endpoints in the form Triton's clients read
//! (`tritonclient`'s `get_model_config` and `get_inference_statistics`): `GET
//! /v2/models/{name}[/versions/{v}]/config` and `GET /v2/models[/{name}[/versions/{v}]]/stats`.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use serde_json::{Value, json};

use crate::api::Ctx;

/// Triton's name for an element type.
fn triton_type(t: DataType) -> &'static str {
    match t {
        DataType::Bool => "TYPE_BOOL",
        DataType::U8 => "TYPE_UINT8",
        DataType::U16 => "TYPE_UINT16",
        DataType::U32 => "TYPE_UINT32",
        DataType::U64 => "TYPE_UINT64",
        DataType::I8 => "TYPE_INT8",
        DataType::I16 => "TYPE_INT16",
        DataType::I32 => "TYPE_INT32",
        DataType::I64 => "TYPE_INT64",
        DataType::F16 => "TYPE_FP16",
        DataType::F32 => "TYPE_FP32",
        DataType::F64 => "TYPE_FP64",
        DataType::Bytes => "TYPE_STRING",
    }
}

fn tensors(specs: &[TensorSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|t| {
            let dims: Vec<i64> = t
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
                    Dim::Symbolic(_) => -1,
                })
                .collect();
            json!({ "name": t.name, "data_type": triton_type(t.datatype), "dims": dims })
        })
        .collect()
}

/// A model path with an optional version.
#[derive(serde::Deserialize)]
pub(crate) struct ModelRef {
    name: String,
    #[serde(default)]
    version: Option<String>,
}

/// `GET /v2/models/{name}/config`.
pub(crate) async fn config(State(ctx): State<Ctx>, Path(m): Path<ModelRef>) -> Response {
    let loaded = match ctx.device.resolve(&m.name, m.version.as_deref()) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let manifest = &loaded.manifest;
    let mut outputs = tensors(&manifest.api.outputs);
    if !manifest.labels.is_empty() {
        for o in &mut outputs {
            o["label_filename"] = json!("labels");
        }
    }
    axum::Json(json!({
        "name": manifest.name,
        "platform": "outpost_wasm",
        "backend": "outpost",
        "version_policy": { "specific": { "versions": [loaded.version()] } },
        // Requests carry their own batch dimension, as the API declares it.
        "max_batch_size": 0,
        "input": tensors(&manifest.api.inputs),
        "output": outputs,
        "parameters": {
            "raw_content_types": { "string_value": manifest.api.raw_content_types.join(",") },
            "security_counter": { "string_value": manifest.security_counter.to_string() },
        },
    }))
    .into_response()
}

/// Triton's `{count, ns}` pair.
fn duration(count: u64, seconds: f64) -> Value {
    json!({ "count": count, "ns": (seconds * 1e9) as u64 })
}

/// `GET /v2/models/stats`: every model version that served a request.
pub(crate) async fn stats_all(State(ctx): State<Ctx>) -> Response {
    stats_of(&ctx, None)
}

/// `GET /v2/models/{name}/stats`, `/v2/models/{name}/versions/{v}/stats`.
pub(crate) async fn stats(State(ctx): State<Ctx>, Path(m): Path<ModelRef>) -> Response {
    stats_of(&ctx, Some(m))
}

fn stats_of(ctx: &Ctx, m: Option<ModelRef>) -> Response {
    if let Some(m) = &m {
        // An unknown model or version is a 404, as for every model endpoint.
        if let Err(e) = ctx.device.resolve(&m.name, m.version.as_deref()) {
            return e.into_response();
        }
    }
    let stats: Vec<Value> = ctx
        .device
        .metrics
        .stats()
        .into_iter()
        .filter(|s| {
            m.as_ref().is_none_or(|m| {
                s.model == m.name && m.version.as_ref().is_none_or(|v| *v == s.version)
            })
        })
        .map(|s| {
            let ok = s.requests - s.failures.min(s.requests);
            let share = |n: u64| {
                if s.requests == 0 {
                    0.0
                } else {
                    s.seconds * n as f64 / s.requests as f64
                }
            };
            json!({
                "name": s.model,
                "version": s.version,
                "last_inference": s.last_ms,
                "inference_count": ok,
                "execution_count": ok,
                "inference_stats": {
                    "success": duration(ok, share(ok)),
                    "fail": duration(s.failures, share(s.failures)),
                    "queue": duration(0, 0.0),
                    "compute_input": duration(0, 0.0),
                    "compute_infer": duration(ok, share(ok)),
                    "compute_output": duration(0, 0.0),
                    "cache_hit": duration(0, 0.0),
                    "cache_miss": duration(0, 0.0),
                },
                "batch_stats": [],
            })
        })
        .collect();
    axum::Json(json!({ "model_stats": stats })).into_response()
}
