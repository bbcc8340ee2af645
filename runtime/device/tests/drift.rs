//! Drift against the training baseline, end to end: the example guests observe features in
//! real wasmtime, the device bins them against the bundle's baseline, and the PSI it reports
//! over HTTP equals the PSI numpy computes (`models/drift.py`) on the same samples.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use outpost_device::Device;
use outpost_examples::Example;
use outpost_testkit::{Rng, TempDir, admin, get, post_json};
use serde_json::{Value, json};

const WINDOW: usize = 16;
const CHANNELS: [&str; 3] = ["temperature", "vibration", "current"];

/// `n` steps of the motor the sensor model was trained on (`readings` in
/// `models/sensor/train.py`), temperature shifted by `hot` °C, rounded to f32 as sent.
fn readings(n: usize, seed: u64, hot: f64) -> Vec<[f32; 3]> {
    let mut rng = Rng(seed);
    let phase = rng.next() * 2.0 * std::f64::consts::PI;
    (0..n)
        .map(|t| {
            let t = t as f64;
            let load = 0.5 + 0.5 * (2.0 * std::f64::consts::PI * t / 240.0 + phase).sin();
            let temperature = 40.0 + 6.0 * load + rng.normal(0.3) + hot;
            let vibration = 0.4
                + 0.15 * (2.0 * std::f64::consts::PI * t / 8.0).sin()
                + 0.1 * load
                + rng.normal(0.03);
            let current = 2.0 + 3.0 * load + rng.normal(0.08);
            [temperature as f32, vibration as f32, current as f32]
        })
        .collect()
}

/// What the guest observes for each complete window: each channel's f32 mean.
fn window_means(r: &[[f32; 3]]) -> Vec<[f64; 3]> {
    r.chunks_exact(WINDOW)
        .map(|w| {
            std::array::from_fn(|c| {
                f64::from(w.iter().map(|row| row[c]).sum::<f32>() / WINDOW as f32)
            })
        })
        .collect()
}

/// Sends `r` in requests of 64 windows; returns the scores the device answered (as f32).
fn send(url: &str, r: &[[f32; 3]]) -> Vec<f64> {
    let mut scores = Vec::new();
    for chunk in r.chunks(64 * WINDOW) {
        let data: Vec<f32> = chunk.iter().flatten().copied().collect();
        let reply = post_json(
            &format!("{url}/v2/models/sensor-anomaly/infer"),
            &json!({"inputs": [{"name": "readings", "shape": [chunk.len(), 3], "datatype": "FP32", "data": data}]}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        for s in body["outputs"][0]["data"].as_array().unwrap() {
            scores.push(f64::from(s.as_f64().unwrap() as f32));
        }
    }
    scores
}

fn drift_of(admin_url: &str, model: &str) -> Value {
    let r = admin("GET", &format!("{admin_url}/admin/drift"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["model"] == model)
        .unwrap_or_else(|| panic!("no drift for {model}: {}", r.text()))
        .clone()
}

fn psi_of(version: &Value, feature: &str) -> f64 {
    version["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == feature)
        .unwrap_or_else(|| panic!("no feature {feature}"))["psi"]
        .as_f64()
        .unwrap()
}

/// Checks the device's PSI of every feature in `samples` against numpy's and the reference's.
fn agrees(dir: &TempDir, version: &Value, samples: &BTreeMap<String, Vec<f64>>) {
    let baseline = outpost_testkit::models_dir().join("sensor/baseline.json");
    outpost_testkit::assert_psi_agrees(dir.path(), &baseline, samples, |f| psi_of(version, f));
}

#[test]
fn training_traffic_stays_stable_and_a_shift_crosses_the_threshold() {
    let (dir, s) = serve_examples("drift");
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let add = |samples: &mut BTreeMap<String, Vec<f64>>, r: &[[f32; 3]], scores: Vec<f64>| {
        for m in window_means(r) {
            for (c, name) in CHANNELS.iter().enumerate() {
                samples.entry((*name).into()).or_default().push(m[c]);
            }
        }
        samples.entry("score".into()).or_default().extend(scores);
    };

    // 2,048 windows from the training distribution.
    let normal = readings(2_048 * WINDOW, 7, 0.0);
    add(&mut samples, &normal, send(&s.url, &normal));
    let v = drift_of(&s.admin_url, "sensor-anomaly");
    assert_eq!(v["version"], "1.0.0");
    assert_eq!(v["unknown_observations"], 0);
    for f in v["features"].as_array().unwrap() {
        assert_eq!(f["window_n"], 2_048, "{f}");
        let psi = f["psi"].as_f64().unwrap();
        assert!(psi < 0.1, "{}: PSI {psi} on training traffic", f["feature"]);
        assert_eq!(f["level"], "stable");
    }
    agrees(&dir, &v, &samples);

    // As many windows again from a motor running 3 °C hotter.
    let hot = readings(2_048 * WINDOW, 8, 3.0);
    add(&mut samples, &hot, send(&s.url, &hot));
    let v = drift_of(&s.admin_url, "sensor-anomaly");
    let temperature = psi_of(&v, "temperature");
    assert!(temperature > 0.25, "temperature PSI {temperature}");
    assert!(psi_of(&v, "vibration") < 0.1, "{v}");
    assert!(psi_of(&v, "current") < 0.1, "{v}");
    let t = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "temperature")
        .unwrap();
    assert_eq!(t["level"], "significant");
    let mean = t["window_mean"].as_f64().unwrap();
    assert!((mean - 44.5).abs() < 0.5, "window mean {mean}");
    agrees(&dir, &v, &samples);

    // The same numbers in /metrics.
    let metrics = get(&format!("{}/metrics", s.url)).text();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("outpost_feature_psi{model=\"sensor-anomaly\",version=\"1.0.0\",feature=\"temperature\",kind=\"input\"}")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let shown: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((shown - temperature).abs() < 1e-12, "{line}");
    assert!(metrics.contains("outpost_drift_threshold{model=\"sensor-anomaly\",version=\"1.0.0\",level=\"significant\"} 0.25"), "{metrics}");
    assert!(metrics.contains(
        "outpost_feature_window_observations{model=\"sensor-anomaly\",version=\"1.0.0\",feature=\"score\",kind=\"output\"} 4096"
    ));

    // The device's own status page says the same.
    let page = get(&format!("{}/", s.url));
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let page = page.text();
    for needle in [
        "sensor-anomaly",
        "digits",
        "temperature",
        "significant",
        "score (output)",
    ] {
        assert!(
            page.contains(needle),
            "{needle} not on the status page:\n{page}"
        );
    }
}

/// The digits guest's predicted classes are counted against the training predictions; a
/// baseline that does not name a feature the guest observes gets it counted as refused.
#[test]
fn prediction_drift_and_unknown_features() {
    let dir = TempDir::new("drift-unknown");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    device
        .install_and_activate(&example_bundle(Example::Digits, None))
        .unwrap();
    // `digits-inputs`: the same guest with a baseline that names its input feature only.
    let mut input = Example::Digits.build_input().unwrap();
    input.name = "digits-inputs".into();
    let baseline = input.baseline.as_mut().unwrap();
    baseline.outputs.clear();
    baseline.quality = None;
    device.install_and_activate(&signed(input)).unwrap();
    let s = Server::start(device, &config);

    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let mut labels = Vec::new();
    for model in ["digits", "digits-inputs"] {
        for case in cases {
            let pixels: Vec<f64> = serde_json::from_value(case["pixels"].clone()).unwrap();
            let r = post_json(
                &format!("{}/v2/models/{model}/infer", s.url),
                &outpost_testkit::digits_request(&pixels),
            );
            assert_eq!(r.status, 200, "{}", r.text());
            if model == "digits" {
                labels.push(case["label"].as_u64().unwrap() as usize);
            }
        }
    }
    let all = admin("GET", &format!("{}/admin/drift", s.admin_url), b"").json();
    let v = |model: &str| {
        all["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["model"] == model)
            .unwrap()
            .clone()
    };
    let first = v("digits");
    let class = first["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "predicted_class")
        .unwrap();
    assert_eq!(class["output"], true);
    let mut want = vec![0u64; 12];
    for l in &labels {
        want[l + 1] += 1;
    }
    assert_eq!(class["window_counts"], json!(want));
    assert_eq!(first["unknown_observations"], 0);

    let second = v("digits-inputs");
    assert_eq!(second["unknown_observations"], cases.len());
    assert_eq!(second["unknown_features"], json!(["predicted_class"]));
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert!(
        metrics.contains(&format!(
            "outpost_feature_unknown_total{{model=\"digits-inputs\",version=\"1.0.0\"}} {}",
            cases.len()
        )),
        "{metrics}"
    );
}

/// Labels posted as feedback give the accuracy computed offline from the same predictions and
/// labels; posting them again changes nothing; labels for requests the device does not hold
/// are counted, not errors.
#[test]
fn feedback_accuracy_equals_the_offline_accuracy() {
    let (_dir, s) = serve_examples("feedback");
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    // The test digits as they are, faded and thickened: the model gets some of them wrong.
    let mut images: Vec<(Vec<f64>, u64)> = Vec::new();
    for c in expected["cases"].as_array().unwrap() {
        let pixels: Vec<f64> = serde_json::from_value(c["pixels"].clone()).unwrap();
        let truth = c["true_label"].as_u64().unwrap();
        images.push((pixels.iter().map(|v| (v / 3.0).floor()).collect(), truth));
        images.push((pixels.iter().map(|v| (v + 7.0).min(16.0)).collect(), truth));
        images.push((pixels, truth));
    }
    let mut sent: Vec<(String, u64, u64)> = Vec::new();
    for (pixels, truth) in images.iter().cycle().take(60) {
        let r = post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &outpost_testkit::digits_request(pixels),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        let id = body["id"].as_str().unwrap().to_owned();
        assert_eq!(r.header("outpost-request-id"), Some(id.as_str()));
        let label = outpost_testkit::digits_label(&body);
        sent.push((id, label, *truth));
    }
    let ids: std::collections::BTreeSet<&str> = sent.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(ids.len(), sent.len(), "request ids are unique");
    let correct = sent.iter().filter(|(_, p, t)| p == t).count();
    let offline = correct as f64 / sent.len() as f64;
    assert!(0.0 < offline && offline < 1.0, "offline accuracy {offline}");

    let post = |items: &[(String, u64, u64)], extra: &[&str]| {
        let mut feedback: Vec<Value> = items
            .iter()
            .map(|(id, _, truth)| json!({"id": id, "truth": truth}))
            .collect();
        feedback.extend(extra.iter().map(|id| json!({"id": id, "truth": 1})));
        let r = post_json(
            &format!("{}/v2/models/digits/feedback", s.url),
            &json!({ "feedback": feedback }),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    };
    let first = post(&sent[..30], &["never-seen", "nor-this"]);
    assert_eq!(
        first,
        json!({"accepted": 30, "duplicate": 0, "unknown": 2, "invalid": 0})
    );
    // The labels by class name (the bundle's labels) are as good as by index.
    let named: Vec<Value> = sent[30..]
        .iter()
        .map(|(id, _, truth)| json!({"id": id, "truth": truth.to_string()}))
        .collect();
    let r = post_json(
        &format!("{}/v2/models/digits/feedback", s.url),
        &json!({ "feedback": named }),
    );
    assert_eq!(r.json()["accepted"], 30, "{}", r.text());

    let accuracy = |metrics: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("outpost_model_accuracy{model=\"digits\",version=\"1.0.0\"} ")
            })
            .unwrap_or_else(|| panic!("{metrics}"))
            .parse()
            .unwrap()
    };
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert!((accuracy(&metrics) - offline).abs() < 1e-12, "{metrics}");
    assert!(
        metrics.contains("outpost_feedback_labels_total{model=\"digits\",version=\"1.0.0\"} 60")
    );
    eprintln!(
        "accuracy from feedback {}, offline {offline}",
        accuracy(&metrics)
    );

    // The same labels again: duplicates, nothing changes.
    let again = post(&sent[..30], &[]);
    assert_eq!(
        again,
        json!({"accepted": 0, "duplicate": 30, "unknown": 0, "invalid": 0})
    );
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert!((accuracy(&metrics) - offline).abs() < 1e-12);
    assert!(
        metrics
            .contains("outpost_feedback_ignored_total{model=\"digits\",reason=\"duplicate\"} 30")
    );
    assert!(
        metrics.contains("outpost_feedback_ignored_total{model=\"digits\",reason=\"unknown\"} 2")
    );
    let q = admin("GET", &format!("{}/admin/quality", s.admin_url), b"").json();
    assert_eq!(q["versions"][0]["total_labels"], 60);
    assert_eq!(q["versions"][0]["total_correct"], correct);

    // A client's own request id, on the raw endpoint too.
    let reply = outpost_testkit::Reply::from_response(
        outpost_testkit::agent()
            .post(&format!("{}/v2/models/digits/raw", s.url))
            .header("content-type", "image/png")
            .header("outpost-request-id", "camera-7/frame-1")
            .send(outpost_examples::DIGIT_PNG),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("outpost-request-id"), Some("camera-7/frame-1"));
    let r = post_json(
        &format!("{}/v2/models/digits/feedback", s.url),
        &json!({"feedback": [{"id": "camera-7/frame-1", "truth": 0}]}),
    );
    assert_eq!(r.json()["accepted"], 1, "{}", r.text());

    // Bad posts are clear errors.
    let r = post_json(
        &format!("{}/v2/models/digits/feedback", s.url),
        &json!({"labels": []}),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("feedback"), "{}", r.text());
    let r = post_json(
        &format!("{}/v2/models/nope/feedback", s.url),
        &json!({"feedback": []}),
    );
    assert_eq!(r.status, 404);
}
