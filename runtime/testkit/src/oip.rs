//! The digits example over the Open Inference Protocol, as both suites call it.

use serde_json::{Value, json};

use crate::http::post_json;

/// An inference request for the digits example: one row of 64 pixels.
pub fn digits_request(pixels: &[f64]) -> Value {
    json!({
        "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]
    })
}

/// The digits version answering an inference at `url` (a device's public URL), or the HTTP
/// status when the answer is not 200. Panics if a 200 answer names no version.
pub fn digits_version(url: &str) -> Result<String, u16> {
    let r = post_json(
        &format!("{url}/v2/models/digits/infer"),
        &digits_request(&[1.0; 64]),
    );
    if r.status != 200 {
        return Err(r.status);
    }
    let v = r.json();
    match v["model_version"].as_str() {
        Some(version) => Ok(version.to_owned()),
        None => panic!("no model_version in {v}"),
    }
}

/// The label (class index) in a digits answer: its `label` output's first value.
pub fn digits_label(body: &Value) -> u64 {
    body["outputs"]
        .as_array()
        .and_then(|outputs| outputs.iter().find(|o| o["name"] == "label"))
        .and_then(|o| o["data"][0].as_u64())
        .unwrap_or_else(|| panic!("no label in {body}"))
}
