//! The device's answers to the calls Triton's clients make beyond inference: model
//! configuration, statistics, and the extensions the server metadata lists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outpost_testkit::{digits_request, get, post_json};
use serde_json::{Value, json};

#[test]
fn model_config_and_statistics_as_triton_clients_read_them() {
    let (_dir, s) = serve_examples("triton");
    let config = get(&format!("{}/v2/models/digits/config", s.url));
    assert_eq!(config.status, 200, "{}", config.text());
    let c = config.json();
    assert_eq!(c["name"], "digits");
    assert_eq!(c["max_batch_size"], 0);
    assert_eq!(
        c["input"],
        json!([{"name": "pixels", "data_type": "TYPE_FP32", "dims": [-1, 64]}])
    );
    assert_eq!(c["output"][0]["data_type"], "TYPE_INT64");
    assert_eq!(c["output"][0]["label_filename"], "labels");
    let versioned = get(&format!("{}/v2/models/digits/versions/1.0.0/config", s.url));
    assert_eq!(versioned.json(), c);
    assert_eq!(get(&format!("{}/v2/models/nope/config", s.url)).status, 404);

    let infer = format!("{}/v2/models/digits/infer", s.url);
    for _ in 0..3 {
        assert_eq!(post_json(&infer, &digits_request(&[1.0; 64])).status, 200);
    }
    assert_eq!(post_json(&infer, &digits_request(&[99.0; 64])).status, 400);
    let stats = get(&format!("{}/v2/models/digits/stats", s.url));
    assert_eq!(stats.status, 200, "{}", stats.text());
    let all = stats.json()["model_stats"].as_array().unwrap().clone();
    assert_eq!(all.len(), 1, "{all:?}");
    let d = &all[0];
    assert_eq!(
        (d["name"].as_str(), d["version"].as_str()),
        (Some("digits"), Some("1.0.0"))
    );
    assert_eq!(d["inference_count"], 3);
    assert_eq!(d["inference_stats"]["success"]["count"], 3);
    assert_eq!(d["inference_stats"]["fail"]["count"], 1);
    assert!(d["inference_stats"]["success"]["ns"].as_u64().unwrap() > 0);
    assert!(d["last_inference"].as_u64().unwrap() > 1_600_000_000_000);
    // Every model, and a version with no requests yet.
    let every = get(&format!("{}/v2/models/stats", s.url)).json();
    assert_eq!(every["model_stats"].as_array().unwrap().len(), 1);
    let sensor = get(&format!("{}/v2/models/sensor-anomaly/stats", s.url)).json();
    assert_eq!(sensor["model_stats"], json!([]));
    assert_eq!(get(&format!("{}/v2/models/nope/stats", s.url)).status, 404);
    // Classification: the top classes as `value:index:label`, largest first.
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let case = &expected["cases"][0];
    let pixels: Vec<f64> = case["pixels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut body = digits_request(&pixels);
    body["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 3}}]);
    let r = post_json(&infer, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let out = &r.json()["outputs"][0];
    assert_eq!(
        (out["datatype"].as_str(), &out["shape"]),
        (Some("BYTES"), &json!([1, 3]))
    );
    let top: Vec<String> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let label = case["label"].as_u64().unwrap();
    let parts: Vec<&str> = top[0].split(':').collect();
    assert_eq!(
        parts[1..],
        [label.to_string(), label.to_string()],
        "{top:?}"
    );
    let p0: f64 = parts[0].parse().unwrap();
    assert!((p0 - case["probabilities"][label as usize].as_f64().unwrap()).abs() < 1e-4);
    body["outputs"] = json!([{"name": "probabilities", "parameters": {"classification": 0}}]);
    assert_eq!(post_json(&infer, &body).status, 400);

    let server = get(&format!("{}/v2", s.url)).json();
    for ext in ["model_configuration", "statistics", "classification"] {
        assert!(
            server["extensions"]
                .as_array()
                .unwrap()
                .contains(&json!(ext)),
            "{ext}"
        );
    }
}
