//! The device's memory under hostile load stays under the bound docs/reliability.md states:
//! peak RSS ≤ idle RSS + max_inflight_bytes + max_concurrent_requests × 2 × the guest memory
//! cap + 0.4 MiB per open connection. Driven here at its worst: many large JSON tensor bodies
//! (echoed back as JSON) and large raw outputs at once, far more than the device runs at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::path::Path;

use support::*;

const MIB: u64 = 1 << 20;
const CONCURRENT: u64 = 2;
const GUEST_MEMORY: u64 = 32 * MIB;
const INFLIGHT: u64 = 32 * MIB;
const CLIENTS: usize = 24;

/// A bundle of the hostile guest (it echoes tensors, and answers `attack/huge-output` with
/// 4 MiB), signed and trusted.
fn hostile_bundle(dir: &Path) {
    ok(dir, &["key", "generate", "--out", "signer"]);
    let trust = ok(dir, &["key", "trust", "signer.pub", "--models", "hostile"]);
    fs::write(dir.join("trust.toml"), trust).unwrap();
    fs::write(dir.join("hostile.wasm"), outpost_examples::HOSTILE_GUEST).unwrap();
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    fs::write(
        dir.join("hostile.toml"),
        format!(
            "name = \"hostile\"\nversion = \"1.0.0\"\nsecurity_counter = 1\nguest = \"hostile.wasm\"\n\
             [[model]]\nname = \"classifier\"\npath = \"digits.onnx\"\n\
             [api]\nraw_content_types = [\"text/plain\", \"attack/huge-output\"]\n\
             [limits]\nmemory_bytes = {GUEST_MEMORY}\ntimeout_ms = 20000\nmax_tensor_bytes = {}\n",
            8 * MIB
        ),
    )
    .unwrap();
    build_and_sign(dir, "hostile.toml", "hostile.opb");
}

/// A process's resident set now and at its peak, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn hostile_load_stays_under_the_documented_memory_bound() {
    let dir = Dir::new("memory-bound");
    hostile_bundle(&dir.0);
    fs::write(
        dir.0.join("device.toml"),
        format!(
            "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\
             trust_store = \"trust.toml\"\nmax_concurrent_requests = {CONCURRENT}\n\
             max_request_bytes = {}\nmax_response_bytes = {}\nmax_inflight_bytes = {INFLIGHT}\n\
             [guest_caps]\nmemory_bytes = {GUEST_MEMORY}\nmax_tensor_bytes = {}\n",
            4 * MIB,
            8 * MIB,
            8 * MIB
        ),
    )
    .unwrap();
    ok(
        &dir.0,
        &[
            "device",
            "install",
            "hostile.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    let device = Device::start(&dir.0, "device.toml");
    let pid = device.proc.child.id();

    // 2 MiB of JSON: a million FP32 zeros; echoed back, it is a JSON response of 4 MiB.
    let elements = 1usize << 20;
    let mut json = String::with_capacity(2 * elements + 100);
    json.push_str(r#"{"inputs":[{"name":"x","datatype":"FP32","shape":["#);
    json.push_str(&format!("{elements}],\"data\":["));
    for i in 0..elements {
        json.push_str(if i == 0 { "0" } else { ",0" });
    }
    json.push_str("]}]}");
    let json = std::sync::Arc::new(json.into_bytes());
    let infer = format!("{}/v2/models/hostile/infer", device.url);
    let raw = format!("{}/v2/models/hostile/raw", device.url);

    // Warm: one of each, then the idle figure.
    let first = outpost_testkit::post(&infer, "application/json", &json);
    assert_eq!(first.status, 200, "{}", first.text());
    let echoed = first.json();
    assert_eq!(
        echoed["outputs"][0]["data"].as_array().unwrap().len(),
        elements
    );
    let big = outpost_testkit::post(&raw, "attack/huge-output", b"");
    assert_eq!(big.status, 200, "{}", big.text());
    let (idle, _) = rss(pid);

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (json, infer, raw) = (std::sync::Arc::clone(&json), infer.clone(), raw.clone());
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for _ in 0..4 {
                    let reply = if i % 2 == 0 {
                        outpost_testkit::post(&infer, "application/json", &json)
                    } else {
                        outpost_testkit::post(&raw, "attack/huge-output", b"")
                    };
                    statuses.push(reply.status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    let (_, peak) = rss(pid);

    let served = statuses.iter().filter(|&&s| s == 200).count();
    let busy = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(
        served + busy,
        statuses.len(),
        "only 200 or 503: {statuses:?}"
    );
    assert!(served >= 1 && busy >= 1, "{statuses:?}");
    let connections = CLIENTS as u64;
    let bound = idle + INFLIGHT + CONCURRENT * 2 * GUEST_MEMORY + connections * 410 * 1024;
    eprintln!(
        "idle {} MiB, peak {} MiB, bound {} MiB; {served} served, {busy} busy",
        idle / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB above the bound {} MiB",
        peak / MIB,
        bound / MIB
    );
    // And it serves on.
    let again = outpost_testkit::post(&infer, "application/json", &json);
    assert_eq!(again.status, 200);
}
