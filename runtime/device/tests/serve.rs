//! The device's HTTP API end to end: real wasmtime, tract, sled, HTTP on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};

use common::*;
use outpost_device::Device;
use outpost_examples::Example;
use outpost_testkit::{TempDir, admin, agent, digits_request, get, post, post_json};
use serde_json::{Value, json};

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn digits_match_the_exported_expectations() {
    let (_dir, s) = serve_examples("digits");
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let tol = expected["tolerance"].as_f64().unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let pixels: Vec<f64> = case["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let r = post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &digits_request(&pixels),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(body["model_name"], "digits");
        assert_eq!(body["model_version"], "1.0.0");
        let out = |name: &str| {
            body["outputs"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == name)
                .unwrap()
                .clone()
        };
        assert_eq!(out("label")["data"][0], case["label"]);
        let probs = out("probabilities");
        assert_eq!(probs["shape"], json!([1, 10]));
        for (got, want) in probs["data"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["probabilities"].as_array().unwrap())
        {
            assert!(
                close(got.as_f64().unwrap(), want.as_f64().unwrap(), tol),
                "{got} vs {want}"
            );
        }
    }
}

#[test]
fn digits_batch_and_binary_tensor_extension() {
    let (_dir, s) = serve_examples("binary");
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    let pixels: Vec<f32> = cases
        .iter()
        .flat_map(|c| {
            c["pixels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let n = cases.len();
    let header = json!({
        "id": "batch-1",
        "inputs": [{"name": "pixels", "shape": [n, 64], "datatype": "FP32", "parameters": {"binary_data_size": pixels.len() * 4}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": true}}, {"name": "probabilities"}]
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(pixels.iter().flat_map(|p| p.to_le_bytes()));
    let r = agent()
        .post(&format!("{}/v2/models/digits/infer", s.url))
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", &header.len().to_string())
        .send(&body[..])
        .unwrap();
    assert_eq!(r.status(), 200);
    let json_len: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut r = r;
    let bytes = r.body_mut().read_to_vec().unwrap();
    let doc: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(doc["id"], "batch-1");
    assert_eq!(doc["outputs"][0]["name"], "label");
    assert_eq!(doc["outputs"][0]["parameters"]["binary_data_size"], n * 8);
    let labels: Vec<i64> = bytes[json_len..]
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<i64> = cases.iter().map(|c| c["label"].as_i64().unwrap()).collect();
    assert_eq!(labels, want);
    assert_eq!(doc["outputs"][1]["shape"], json!([n, 10]));
}

#[test]
fn digits_raw_images() {
    let (_dir, s) = serve_examples("raw");
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    for (ct, image) in [
        ("image/x-portable-graymap", outpost_examples::DIGIT_PGM),
        ("image/png", outpost_examples::DIGIT_PNG),
    ] {
        let r = post(&format!("{}/v2/models/digits/raw", s.url), ct, image);
        assert_eq!(r.status, 200, "{ct}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let body = r.json();
        assert_eq!(body["label"], expected["sample_image_label"], "{ct}");
        assert_eq!(body["probabilities"].as_array().unwrap().len(), 10);
    }
    let r = post(
        &format!("{}/v2/models/digits/raw", s.url),
        "image/png",
        b"\x89PNG not really",
    );
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("invalid PNG"),
        "{}",
        r.text()
    );
    let r = post(
        &format!("{}/v2/models/digits/raw", s.url),
        "text/plain",
        b"hello",
    );
    assert_eq!(r.status, 400);
}

#[test]
fn sensor_scores_match_the_exported_expectations() {
    let (_dir, s) = serve_examples("sensor");
    let expected: Value = serde_json::from_str(outpost_examples::SENSOR_EXPECTED).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let readings = &case["readings"];
        let steps = readings.as_array().unwrap().len();
        let r = post_json(
            &format!("{}/v2/models/sensor-anomaly/infer", s.url),
            &json!({"inputs": [{"name": "readings", "shape": [steps, 3], "datatype": "FP32", "data": readings}]}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        let scores = body["outputs"][0]["data"].as_array().unwrap();
        for (got, want) in scores.iter().zip(case["scores"].as_array().unwrap()) {
            assert!(
                close(got.as_f64().unwrap(), want.as_f64().unwrap(), 1e-3),
                "{}: {got} vs {want}",
                case["name"]
            );
        }
        assert_eq!(
            body["outputs"][1]["data"], case["anomalies"],
            "{}",
            case["name"]
        );

        let raw = post_json(
            &format!("{}/v2/models/sensor-anomaly/raw", s.url),
            &json!({"readings": readings}),
        );
        assert_eq!(raw.status, 200, "{}", raw.text());
        assert_eq!(raw.json()["anomalies"], case["anomalies"]);
    }
    let r = post_json(
        &format!("{}/v2/models/sensor-anomaly/raw", s.url),
        &json!({"readings": [[1, 2, 3]]}),
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("at least 16"), "{}", r.text());
}

#[test]
fn metadata_health_repository_and_metrics() {
    let (_dir, s) = serve_examples("meta");
    assert_eq!(get(&format!("{}/v2/health/live", s.url)).status, 200);
    assert_eq!(get(&format!("{}/v2/health/ready", s.url)).status, 200);
    let server = get(&format!("{}/v2", s.url)).json();
    assert_eq!(server["name"], "outpost");
    assert!(
        server["extensions"]
            .as_array()
            .unwrap()
            .contains(&json!("binary_tensor_data"))
    );

    let m = get(&format!("{}/v2/models/digits", s.url)).json();
    assert_eq!(
        m["inputs"][0],
        json!({"name": "pixels", "datatype": "FP32", "shape": [-1, 64]})
    );
    assert_eq!(m["versions"], json!(["1.0.0"]));
    assert_eq!(
        get(&format!("{}/v2/models/digits/versions/1.0.0", s.url)).status,
        200
    );
    assert_eq!(
        get(&format!("{}/v2/models/digits/ready", s.url)).status,
        200
    );
    assert_eq!(
        get(&format!("{}/v2/models/digits/versions/1.0.0/ready", s.url)).status,
        200
    );

    let index = post(
        &format!("{}/v2/repository/index", s.url),
        "application/json",
        b"{}",
    )
    .json();
    let names: Vec<&str> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["digits", "sensor-anomaly"]);
    assert!(
        index
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["state"] == "READY")
    );

    let pixels = vec![0.0; 64];
    assert_eq!(
        post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &digits_request(&pixels)
        )
        .status,
        200
    );
    assert_eq!(
        post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &json!({"inputs": []})
        )
        .status,
        400
    );
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert!(
        metrics.contains(
            "outpost_requests_total{model=\"digits\",version=\"1.0.0\",role=\"primary\"} 2"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("outpost_request_errors_total{model=\"digits\",version=\"1.0.0\",role=\"primary\",kind=\"invalid_input\"} 1"), "{metrics}");
    assert!(
        metrics.contains(
            "outpost_request_duration_seconds_count{model=\"digits\",version=\"1.0.0\",role=\"primary\"} 2"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("outpost_feature_observations_total{model=\"digits\",version=\"1.0.0\",role=\"primary\",feature=\"mean_intensity\"} 1"), "{metrics}");
}

/// The model configuration and statistics endpoints, in the form Triton's clients read.
#[test]
fn oip_error_cases() {
    let (_dir, s) = serve_examples("errors");
    let infer = format!("{}/v2/models/digits/infer", s.url);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "unknown model",
            format!("{}/v2/models/nope/infer", s.url),
            404,
            "not found",
        ),
        (
            "unknown version",
            format!("{}/v2/models/digits/versions/9.9.9/infer", s.url),
            404,
            "not found",
        ),
        ("malformed JSON", infer.clone(), 400, "malformed"),
        (
            "wrong dtype",
            infer.clone(),
            400,
            "input `pixels` is BYTES; this model takes FP32",
        ),
        ("wrong shape", infer.clone(), 400, "takes [batch, 64]"),
        (
            "data does not match shape",
            infer.clone(),
            400,
            "needs 256 bytes",
        ),
        (
            "unknown input",
            infer.clone(),
            400,
            "unknown input `other`; this model takes: pixels",
        ),
        ("out of range", infer.clone(), 400, "between 0 and 16"),
        (
            "FP64 for an FP32 input",
            infer.clone(),
            400,
            "input `pixels` is FP64; this model takes FP32",
        ),
        (
            "an unlisted raw content type",
            format!("{}/v2/models/digits/raw", s.url),
            400,
            "`application/json` is not one this model takes",
        ),
    ];
    let bodies = [
        json!({"inputs": []}).to_string(),
        json!({"inputs": []}).to_string(),
        "{\"inputs\": [".to_owned(),
        json!({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).to_string(),
        json!({"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}).to_string(),
        json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [1, 2, 3]}]}).to_string(),
        json!({"inputs": [{"name": "other", "shape": [1], "datatype": "FP32", "data": [1]}]}).to_string(),
        digits_request(&[99.0; 64]).to_string(),
        json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP64", "data": vec![0.0; 64]}]}).to_string(),
        json!({"pixels": [0.0]}).to_string(),
    ];
    for ((what, url, status, msg), body) in cases.into_iter().zip(bodies) {
        let r = post(&url, "application/json", body.as_bytes());
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let err = r.json()["error"].as_str().unwrap().to_owned();
        assert!(err.contains(msg), "{what}: {err}");
    }
    assert_eq!(get(&format!("{}/v2/models/nope", s.url)).status, 404);
    assert_eq!(get(&format!("{}/v2/models/nope/ready", s.url)).status, 404);
    assert_eq!(get(&format!("{}/nowhere", s.url)).status, 404);
}

#[test]
fn oversized_body_is_refused_before_it_is_read() {
    let (_dir, s) = serve_examples("oversized");
    let addr = s.url.trim_start_matches("http://");
    // Declare 100 MB but send nothing: the answer must come without the body.
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // A chunked body without a length is cut off at the limit too (small enough to be sent
    // whole before the answer is read).
    let big = vec![b' '; 70_000];
    let r = agent()
        .post(&format!("{}/v2/models/digits/raw", s.url))
        .header("content-type", "image/png")
        .header("transfer-encoding", "chunked")
        .send(ureq::SendBody::from_reader(&mut &big[..]))
        .unwrap();
    assert_eq!(r.status(), 413);
    // And the device still serves.
    assert_eq!(
        post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &digits_request(&[0.0; 64])
        )
        .status,
        200
    );
}

#[test]
fn admin_api_install_activate_remove() {
    let dir = TempDir::new("admin");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    let s = Server::start(device, &config);
    let a = &s.admin_url;

    let r = agent().get(&format!("{a}/admin/status")).call().unwrap();
    assert_eq!(r.status(), 401, "no token");
    let r = agent()
        .get(&format!("{a}/admin/status"))
        .header("authorization", "Bearer wrong-token-wrong-token")
        .call()
        .unwrap();
    assert_eq!(r.status(), 401, "wrong token");
    assert_eq!(
        get(&format!("{}/admin/status", s.url)).status,
        404,
        "admin is not on the public listener"
    );

    let v1 = example_bundle(Example::Digits, None);
    let v2 = example_bundle(Example::Digits, Some("1.1.0"));
    let r = admin("POST", &format!("{a}/admin/bundles?activate=true"), &v1);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["version"], "1.0.0");
    let r = admin("POST", &format!("{a}/admin/bundles"), &v2);
    assert_eq!(r.status, 201, "{}", r.text());
    let m = get(&format!("{}/v2/models/digits", s.url)).json();
    assert_eq!(
        m["parameters"]["version"], "1.0.0",
        "installing does not activate"
    );

    let r = admin(
        "POST",
        &format!("{a}/admin/models/digits/activate"),
        br#"{"version":"1.1.0"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        &format!("{}/v2/models/digits/infer", s.url),
        &digits_request(&[0.0; 64]),
    );
    assert_eq!(r.json()["model_version"], "1.1.0");
    // The previous version stays resident and addressable.
    let r = post_json(
        &format!("{}/v2/models/digits/versions/1.0.0/infer", s.url),
        &digits_request(&[0.0; 64]),
    );
    assert_eq!(r.json()["model_version"], "1.0.0");

    let r = admin(
        "DELETE",
        &format!("{a}/admin/models/digits/versions/1.1.0"),
        b"",
    );
    assert_eq!(
        r.status,
        409,
        "the active version cannot be removed: {}",
        r.text()
    );
    let r = admin(
        "DELETE",
        &format!("{a}/admin/models/digits/versions/1.0.0"),
        b"",
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = admin(
        "DELETE",
        &format!("{a}/admin/models/digits/versions/1.0.0"),
        b"",
    );
    assert_eq!(r.status, 404);
    let r = admin(
        "POST",
        &format!("{a}/admin/models/digits/activate"),
        br#"{"version":"7.0.0"}"#,
    );
    assert_eq!(r.status, 404);

    let mut tampered = v1.clone();
    let at = tampered.len() - 2000;
    tampered[at] ^= 1;
    let r = admin(
        "POST",
        &format!("{a}/admin/bundles?activate=true"),
        &tampered,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .starts_with("bundle rejected"),
        "{}",
        r.text()
    );

    let status = admin("GET", &format!("{a}/admin/status"), b"").json();
    assert_eq!(status["models"][0]["name"], "digits");
    assert_eq!(status["models"][0]["active"], "1.1.0");
    assert_eq!(
        status["models"][0]["installed"].as_array().unwrap().len(),
        1
    );
    let bundles = admin("GET", &format!("{a}/admin/bundles"), b"").json();
    assert_eq!(bundles.as_array().unwrap().len(), 1);
}

/// One behaviour before and after a restart: the active version and the one it replaced
/// answer; an older installed version is a 404 either way.
#[test]
fn the_previous_version_stays_addressable_across_a_restart() {
    let dir = TempDir::new("previous-version");
    let config = config(&dir, "");
    let bundle = |v| example_bundle(Example::Digits, Some(v));
    let first = Device::with_trust(&config, trust()).unwrap();
    for v in ["1.0.0", "1.1.0", "1.2.0"] {
        first.install_and_activate(&bundle(v)).unwrap();
    }
    let mut first = Some(first);
    let version_of = |url: &str, v: &str| {
        post_json(
            &format!("{url}/v2/models/digits/versions/{v}/infer"),
            &digits_request(&[0.0; 64]),
        )
    };
    for round in ["before", "after"] {
        let device = match first.take() {
            Some(d) => d,
            None => Device::with_trust(&config, trust()).unwrap(),
        };
        let s = Server::start(device, &config);
        for v in ["1.2.0", "1.1.0"] {
            let r = version_of(&s.url, v);
            assert_eq!(r.status, 200, "{round} restart, {v}: {}", r.text());
            assert_eq!(r.json()["model_version"], v);
        }
        assert_eq!(version_of(&s.url, "1.0.0").status, 404, "{round} restart");
        drop(s);
    }
}

#[test]
fn an_endless_bundle_upload_is_cut_off_at_the_limit_and_nothing_is_installed() {
    let dir = TempDir::new("admin-endless");
    let config = config(&dir, "max_bundle_bytes = 100000\n");
    let device = Device::with_trust(&config, trust()).unwrap();
    let s = Server::start(device, &config);
    let url = format!("{}/admin/bundles?activate=true", s.admin_url);
    let auth = format!("Bearer {}", outpost_testkit::ADMIN_TOKEN);
    // A declared length above the limit: refused before any byte is read.
    let mut stream =
        std::net::TcpStream::connect(s.admin_url.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST /admin/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 1000000000000\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // A chunked upload with no end: cut off at the limit.
    let endless = std::io::repeat(b'x');
    let r = agent()
        .post(&url)
        .header("authorization", &auth)
        .header("transfer-encoding", "chunked")
        .send(ureq::SendBody::from_owned_reader(std::io::Read::take(
            endless,
            50 << 20,
        )));
    // The device answers 413 and may close before the client has sent everything.
    match r {
        Ok(r) => assert_eq!(r.status(), 413),
        Err(e) => assert!(matches!(e, ureq::Error::Io(_)), "{e}"),
    }
    let r = admin("GET", &format!("{}/admin/bundles", s.admin_url), b"");
    assert_eq!(r.json(), json!([]), "nothing installed");
}

/// One keyed digits request: the version that answered, by the response header and the body.
fn routed(url: &str, key: Option<&str>) -> String {
    let mut request = agent()
        .post(&format!("{url}/v2/models/digits/infer"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("outpost-route-key", key);
    }
    let r = outpost_testkit::Reply::from_response(
        request.send(digits_request(&[0.0; 64]).to_string().as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let header = r.headers["outpost-model-version"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(r.json()["model_version"], header.as_str());
    header
}

#[test]
fn a_traffic_split_routes_by_key_holds_after_a_restart_and_refuses_what_it_cannot_serve() {
    let dir = TempDir::new("split");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    let s = Server::start(device, &config);
    let a = &s.admin_url;
    for (bundle, activate) in [
        (example_bundle(Example::Digits, None), true),
        (example_bundle(Example::Digits, Some("1.2.0")), false),
    ] {
        let url = format!("{a}/admin/bundles?activate={activate}");
        assert_eq!(admin("POST", &url, &bundle).status, 201);
    }
    let policy_url = format!("{a}/admin/models/digits/policy");
    assert_eq!(admin("GET", &policy_url, b"").json(), json!("primary"));

    // What cannot be served is refused, and changes nothing.
    for (body, status, needle) in [
        (
            r#"{"split":{"id":"ab","weights":{"1.0.0":80,"9.9.9":20}}}"#,
            404,
            "9.9.9",
        ),
        (
            r#"{"split":{"id":"ab","weights":{"1.0.0":0}}}"#,
            400,
            "above 0",
        ),
        (r#"{"split":{"id":"","weights":{"1.0.0":1}}}"#, 400, "id"),
        (r#"{"split":{"weights":{"1.0.0":1}}}"#, 400, "expected"),
    ] {
        let r = admin("PUT", &policy_url, body.as_bytes());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.text().contains(needle), "{body}: {}", r.text());
    }
    assert_eq!(routed(&s.url, Some("user-1")), "1.0.0");
    let r = admin(
        "PUT",
        &format!("{a}/admin/models/nothing/policy"),
        br#""primary""#,
    );
    assert_eq!(r.status, 404, "{}", r.text());

    // 80/20 over 1.0.0 (active) and 1.2.0 (installed, loaded by the policy).
    let split = br#"{"split":{"id":"ab-1","weights":{"1.0.0":80,"1.2.0":20}}}"#;
    let r = admin("PUT", &policy_url, split);
    assert_eq!(r.status, 200, "{}", r.text());
    let mut by_key = std::collections::HashMap::new();
    let mut to_b = 0;
    for i in 0..2_000 {
        let key = format!("user-{i}");
        let version = routed(&s.url, Some(&key));
        to_b += usize::from(version == "1.2.0");
        by_key.insert(key, version);
    }
    let share = to_b as f64 / 2_000.0;
    assert!((0.17..=0.23).contains(&share), "{to_b} of 2,000 to 1.2.0");
    for (key, version) in by_key.iter().take(200) {
        assert_eq!(&routed(&s.url, Some(key)), version, "{key} moved");
    }
    // The OIP parameter works as the header does; unkeyed requests reach both versions.
    let (key, version) = by_key.iter().next().unwrap();
    let mut request = digits_request(&[0.0; 64]);
    request["parameters"] = json!({ "route_key": key });
    let r = post_json(&format!("{}/v2/models/digits/infer", s.url), &request);
    assert_eq!(&r.json()["model_version"], version.as_str());
    let unkeyed: std::collections::HashSet<String> =
        (0..200).map(|_| routed(&s.url, None)).collect();
    assert_eq!(unkeyed.len(), 2, "{unkeyed:?}");
    // Metadata describes the active version, not a random draw.
    let m = get(&format!("{}/v2/models/digits", s.url)).json();
    assert_eq!(m["parameters"]["version"], "1.0.0");
    // A version asked for by name bypasses the split.
    let r = post_json(
        &format!("{}/v2/models/digits/versions/1.2.0/infer", s.url),
        &digits_request(&[0.0; 64]),
    );
    assert_eq!(r.json()["model_version"], "1.2.0");
    // A routed version cannot be removed; the status shows the policy.
    let r = admin(
        "DELETE",
        &format!("{a}/admin/models/digits/versions/1.2.0"),
        b"",
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("traffic policy"), "{}", r.text());
    let status = admin("GET", &format!("{a}/admin/status"), b"").json();
    assert_eq!(status["models"][0]["policy"]["split"]["id"], "ab-1");

    // After a restart: the same policy, the same keys on the same versions.
    drop(s);
    let device = Device::with_trust(&config, trust()).unwrap();
    let s = Server::start(device, &config);
    let a = &s.admin_url;
    let policy_url = format!("{a}/admin/models/digits/policy");
    assert_eq!(
        admin("GET", &policy_url, b"").json()["split"]["weights"]["1.2.0"],
        20
    );
    for (key, version) in by_key.iter().take(100) {
        assert_eq!(
            &routed(&s.url, Some(key)),
            version,
            "{key} moved after a restart"
        );
    }

    // Back to primary: everything on the active version; 1.2.0 may go.
    let r = admin("DELETE", &policy_url, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!((0..50).all(|i| routed(&s.url, Some(&format!("user-{i}"))) == "1.0.0"));
    let r = admin(
        "DELETE",
        &format!("{a}/admin/models/digits/versions/1.2.0"),
        b"",
    );
    assert_eq!(r.status, 204, "{}", r.text());
    eprintln!(
        "split 80/20 over 2,000 keys: {to_b} to 1.2.0 ({:.1}%)",
        share * 100.0
    );
}
