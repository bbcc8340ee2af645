//! Serving beyond one stateless call per request, end to end over HTTP with real wasmtime and
//! tract: streaming sessions, the response cache and dynamic batching, each with its bad
//! input (too many sessions, a session after a swap or a failed call, a cache over its bound,
//! a batch larger than the model's).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use outpost_device::Device;
use outpost_examples::Example;
use outpost_testkit::{TempDir, get, post_json, post_json_with};
use serde_json::{Value, json};

fn sensor_case() -> Vec<Vec<f64>> {
    let expected: Value = serde_json::from_str(outpost_examples::SENSOR_EXPECTED).unwrap();
    serde_json::from_value(expected["cases"][1]["readings"].clone()).unwrap()
}

fn sensor_scores(expected_case: usize) -> Vec<f64> {
    let expected: Value = serde_json::from_str(outpost_examples::SENSOR_EXPECTED).unwrap();
    serde_json::from_value(expected["cases"][expected_case]["scores"].clone()).unwrap()
}

fn readings(steps: &[Vec<f64>]) -> Value {
    json!({"inputs": [{"name": "readings", "shape": [steps.len(), 3], "datatype": "FP32",
                       "data": steps}]})
}

fn scores(body: &Value) -> Vec<f64> {
    body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// A metric's value in a `/metrics` text, by the series' name and labels.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn serve(tag: &str, extra: &str, bundles: &[Vec<u8>]) -> (TempDir, Server) {
    let dir = TempDir::new(tag);
    let config = config(&dir, extra);
    let device = Device::with_trust(&config, trust()).unwrap();
    for b in bundles {
        device.install_and_activate(b).unwrap();
    }
    let server = Server::start(device, &config);
    (dir, server)
}

#[test]
fn a_streaming_session_keeps_its_state_between_calls_and_ends_clearly() {
    let stream = example_bundle(Example::SensorStream, None);
    let (_dir, s) = serve(
        "sessions",
        "[guest_caps]\nmax_sessions = 2\n",
        &[stream, example_bundle(Example::Sensor, None)],
    );
    let url = format!("{}/v2/models/sensor-stream/infer", s.url);
    let steps = sensor_case();
    assert_eq!(steps.len(), 32, "two windows of 16");
    // The whole clip five steps at a time, in two interleaved sessions, scores as the whole
    // clip at once: each session's guest carried its own unfinished window.
    let mut got = [Vec::new(), Vec::new()];
    for chunk in steps.chunks(5) {
        for (i, key) in ["a", "b"].into_iter().enumerate() {
            let r = post_json_with(&url, &[("outpost-session", key)], &readings(chunk));
            assert_eq!(r.status, 200, "{}", r.text());
            got[i].extend(scores(&r.json()));
        }
    }
    let want = sensor_scores(1);
    for g in &got {
        assert_eq!(g.len(), want.len(), "{g:?}");
        for (g, w) in g.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
    // The OIP parameter names a session as the header does.
    let mut body = readings(&steps[..10]);
    body["parameters"] = json!({"session": "a"});
    let r = post_json(&url, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(scores(&r.json()).is_empty(), "10 steps complete no window");
    // Without a session, each call starts from nothing.
    let r = post_json(&url, &readings(&steps[..10]));
    assert!(scores(&r.json()).is_empty());

    // A third live session is over the device's cap of two: 429, and nothing is lost.
    let r = post_json_with(&url, &[("outpost-session", "c")], &readings(&steps[..5]));
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("2 live sessions"), "{}", r.text());
    // A model that keeps no sessions says so.
    let r = post_json_with(
        &format!("{}/v2/models/sensor-anomaly/infer", s.url),
        &[("outpost-session", "a")],
        &readings(&steps),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("keeps no sessions"), "{}", r.text());
    let r = post_json_with(&url, &[("outpost-session", "")], &readings(&steps));
    assert_eq!(r.status, 400, "an empty key: {}", r.text());

    let metrics = get(&format!("{}/metrics", s.url)).text();
    let series = |name: &str| metric(&metrics, &format!("{name}{{model=\"sensor-stream\"}}"));
    assert_eq!(series("outpost_sessions_live"), Some(2.0));
    assert_eq!(series("outpost_sessions_refused_total"), Some(1.0));
    assert!(
        series("outpost_session_memory_bytes").unwrap() > 0.0,
        "{metrics}"
    );

    // A new version ends both sessions: the next call on each is told so once, and the one
    // after starts a new session on the new version.
    s.device
        .install_and_activate(&example_bundle(Example::SensorStream, Some("1.0.1")))
        .unwrap();
    let r = post_json_with(&url, &[("outpost-session", "a")], &readings(&steps[..16]));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("replaced by 1.0.1") && r.text().contains("state is gone"),
        "{}",
        r.text()
    );
    let r = post_json_with(&url, &[("outpost-session", "a")], &readings(&steps[..16]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("outpost-model-version"), Some("1.0.1"));
    assert_eq!(
        scores(&r.json()).len(),
        1,
        "a fresh session: one window of 16"
    );
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert_eq!(
        metric(
            &metrics,
            "outpost_sessions_ended_total{model=\"sensor-stream\",reason=\"swap\"}"
        ),
        Some(2.0)
    );
}

#[test]
fn a_session_keeps_the_limits_per_call_and_a_failed_call_ends_it() {
    // The hostile guest, in sessions: its spin still meets the deadline per call.
    let mut input = hostile_input(200);
    input.serving.sessions = Some(outpost_bundle::manifest::SessionSpec {
        max_sessions: 4,
        idle_timeout_s: 60,
    });
    let (_dir, s) = serve("session-limits", "", &[signed(input)]);
    let url = format!("{}/v2/models/hostile/raw", s.url);
    let call = |ct: &str, body: &[u8]| {
        outpost_testkit::Reply::from_response(
            outpost_testkit::agent()
                .post(&url)
                .header("content-type", ct)
                .header("outpost-session", "k")
                .send(body),
        )
    };
    let r = call("text/plain", b"hello");
    assert_eq!(r.status, 200, "{}", r.text());
    let started = std::time::Instant::now();
    let r = call("attack/spin", b"");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("deadline of 200 ms"), "{}", r.text());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Its state is gone: the next call is told so, the one after starts afresh.
    let r = call("text/plain", b"hello");
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("a call failed and ended it"),
        "{}",
        r.text()
    );
    let r = call("text/plain", b"hello");
    assert_eq!(r.status, 200, "{}", r.text());

    // One call at a time: a second call while the first spins is refused, not queued.
    std::thread::scope(|scope| {
        let spinning = scope.spawn(|| call("attack/spin", b""));
        std::thread::sleep(std::time::Duration::from_millis(60));
        let r = call("text/plain", b"hello");
        assert_eq!(r.status, 409, "{}", r.text());
        assert!(r.text().contains("one call at a time"), "{}", r.text());
        assert_eq!(spinning.join().unwrap().status, 500);
    });
}

#[test]
fn new_sessions_are_refused_past_the_devices_session_memory() {
    let (_dir, s) = serve(
        "session-memory",
        "[guest_caps]\nsession_memory_bytes = 1\n",
        &[example_bundle(Example::SensorStream, None)],
    );
    let url = format!("{}/v2/models/sensor-stream/infer", s.url);
    let steps = sensor_case();
    let first = post_json_with(&url, &[("outpost-session", "a")], &readings(&steps[..4]));
    assert_eq!(first.status, 200, "{}", first.text());
    // The first session's instance now holds more than the whole bound.
    let second = post_json_with(&url, &[("outpost-session", "b")], &readings(&steps[..4]));
    assert_eq!(second.status, 429, "{}", second.text());
    assert!(
        second.text().contains("session_memory_bytes"),
        "{}",
        second.text()
    );
    // The live one carries on.
    let again = post_json_with(&url, &[("outpost-session", "a")], &readings(&steps[4..16]));
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(scores(&again.json()).len(), 1, "4 + 12 steps: one window");
}

#[test]
fn the_response_cache_answers_repeats_within_its_bound_and_never_across_versions() {
    // Room for about two digits answers, so a third evicts the least recently used.
    let (_dir, s) = serve(
        "cache",
        "[serving.digits]\ncache = { max_bytes = 700 }\n",
        &[example_bundle(Example::Digits, None)],
    );
    let url = format!("{}/v2/models/digits/infer", s.url);
    let request = |v: f64| outpost_testkit::digits_request(&[v; 64]);
    let first = post_json(&url, &request(1.0));
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("outpost-cache"), Some("miss"));
    let again = post_json(&url, &request(1.0));
    assert_eq!(again.header("outpost-cache"), Some("hit"));
    assert_eq!(again.json()["outputs"], first.json()["outputs"]);
    // Another input, or the same one asking for other outputs of the same answer.
    assert_eq!(
        post_json(&url, &request(2.0)).header("outpost-cache"),
        Some("miss")
    );
    let mut only_label = request(1.0);
    only_label["outputs"] = json!([{"name": "label"}]);
    let r = post_json(&url, &only_label);
    assert_eq!(
        r.header("outpost-cache"),
        Some("hit"),
        "the guest's answer is the same"
    );
    assert_eq!(r.json()["outputs"].as_array().unwrap().len(), 1);
    // Over the bound: the oldest goes, counted, and the cache stays within it.
    post_json(&url, &request(3.0));
    post_json(&url, &request(4.0));
    let metrics = get(&format!("{}/metrics", s.url)).text();
    let series = |name: &str| {
        metric(
            &metrics,
            &format!("{name}{{model=\"digits\",version=\"1.0.0\"}}"),
        )
    };
    assert!(
        series("outpost_cache_evictions_total").unwrap() >= 1.0,
        "{metrics}"
    );
    assert!(series("outpost_cache_bytes").unwrap() <= 700.0);
    assert_eq!(
        metric(
            &metrics,
            "outpost_cache_requests_total{model=\"digits\",version=\"1.0.0\",result=\"hit\"}"
        ),
        Some(2.0)
    );
    // Hits are requests the version answered.
    assert_eq!(
        metric(
            &metrics,
            "outpost_requests_total{model=\"digits\",version=\"1.0.0\",role=\"primary\"}"
        ),
        Some(6.0)
    );
    // A new version has its own, empty cache.
    s.device
        .install_and_activate(&example_bundle(Example::Digits, Some("1.0.1")))
        .unwrap();
    let r = post_json(&url, &request(4.0));
    assert_eq!(r.header("outpost-model-version"), Some("1.0.1"));
    assert_eq!(r.header("outpost-cache"), Some("miss"));
    // A model without a cache sends no cache header.
    let (_dir2, plain) = serve("no-cache", "", &[example_bundle(Example::Digits, None)]);
    let r = post_json(
        &format!("{}/v2/models/digits/infer", plain.url),
        &request(1.0),
    );
    assert_eq!(r.header("outpost-cache"), None);
}

#[test]
fn dynamic_batching_joins_concurrent_requests_and_answers_each_its_own() {
    let (_dir, s) = serve(
        "batching",
        "[serving.digits]\nbatching = { max_batch_size = 8, max_queue_delay_us = 20000 }\n",
        &[example_bundle(Example::Digits, None)],
    );
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let cases: Vec<(Vec<f64>, u64)> = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                serde_json::from_value(c["pixels"].clone()).unwrap(),
                c["label"].as_u64().unwrap(),
            )
        })
        .collect();
    let url = format!("{}/v2/models/digits/infer", s.url);
    std::thread::scope(|scope| {
        for t in 0..6 {
            let (url, cases) = (&url, &cases);
            scope.spawn(move || {
                for round in 0..5 {
                    let (pixels, label) = &cases[(t + round) % cases.len()];
                    let r = post_json(url, &outpost_testkit::digits_request(pixels));
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert_eq!(outpost_testkit::digits_label(&r.json()), *label);
                }
            });
        }
    });
    // More rows than a batch holds: run alone, answered whole.
    let rows: Vec<f64> = cases
        .iter()
        .cycle()
        .take(10)
        .flat_map(|c| c.0.clone())
        .collect();
    let r = post_json(
        &url,
        &json!({"inputs": [{"name": "pixels", "shape": [10, 64], "datatype": "FP32", "data": rows}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let labels = r.json()["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "label")
        .unwrap()["data"]
        .clone();
    let want: Vec<u64> = cases.iter().cycle().take(10).map(|c| c.1).collect();
    assert_eq!(labels, json!(want));
    let metrics = get(&format!("{}/metrics", s.url)).text();
    let l = "{model=\"digits\",version=\"1.0.0\",onnx=\"classifier\"}";
    let runs = metric(&metrics, &format!("outpost_batch_size_count{l}")).unwrap();
    let items = metric(&metrics, &format!("outpost_batch_size_sum{l}")).unwrap();
    // The warm-up's row, the clients' 30 and the big request's 10.
    assert_eq!(items, 1.0 + 30.0 + 10.0, "every row ran: {metrics}");
    assert!(
        runs < 32.0,
        "six clients at once shared backend calls: {runs} calls for 32 runs"
    );
    let waits = metric(&metrics, &format!("outpost_batch_queue_seconds_count{l}")).unwrap();
    assert_eq!(waits, 32.0);
}
