//! Shadow and canary on a real device over HTTP: the test guest's versions differ by their
//! bundle's metadata (tests/guests/hostile: `fail_percent`, `flip_percent`, `work`), and the
//! device's fleet link points at a broker that is not there, so everything here happens on
//! the device alone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Server, config, signed, trust};
use outpost_device::Device;
use outpost_examples::Example;
use outpost_testkit::{TempDir, admin, eventually, get, post_json};
use serde_json::{Value, json};

/// The test guest as model `echo` at `version`, shaped by `metadata`.
fn echo_bundle(version: &str, metadata: Value) -> Vec<u8> {
    let mut input = Example::Digits.build_input().unwrap();
    input.name = "echo".into();
    input.version = version.parse().unwrap();
    input.guest = outpost_examples::HOSTILE_GUEST.to_vec();
    input.api = Default::default();
    input.baseline = None;
    input.metadata = serde_json::from_value(metadata).unwrap();
    signed(input)
}

/// A device whose fleet broker is a closed port: the agent never connects.
fn device_offline(tag: &str) -> (TempDir, Server) {
    let dir = TempDir::new(tag);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let fleet_key = outpost_bundle::SecretKey::from_seed(&[9; 32])
        .public()
        .to_hex();
    let config = config(
        &dir,
        &format!(
            "[fleet]\nbroker = \"mqtt://127.0.0.1:{port}\"\nfleet_key = \"{fleet_key}\"\ndevice_id = \"{tag}\"\n"
        ),
    );
    let device = Device::with_trust(&config, trust()).unwrap();
    (dir, Server::start(device, &config))
}

fn install(s: &Server, bundle: &[u8], activate: bool) {
    let url = format!("{}/admin/bundles?activate={activate}", s.admin_url);
    let r = admin("POST", &url, bundle);
    assert_eq!(r.status, 201, "{}", r.text());
}

fn set_policy(s: &Server, policy: &Value) {
    let url = format!("{}/admin/models/echo/policy", s.admin_url);
    let r = admin("PUT", &url, policy.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

/// One keyed request with `n` as the first element; the answering version and the output.
fn ask(s: &Server, n: u32) -> (u16, String, Vec<f64>) {
    let data = [f64::from(n), 0.5, 0.25, 0.125];
    let request = json!({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": data}],
        "parameters": {"route_key": format!("user-{n}")},
    });
    let r = post_json(&format!("{}/v2/models/echo/infer", s.url), &request);
    let body = r.json();
    let out = body["outputs"][0]["data"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let version = body["model_version"].as_str().unwrap_or("").to_owned();
    (r.status, version, out)
}

/// A counter's value in the device's metrics (0 when absent).
fn counter(s: &Server, series: &str) -> u64 {
    let text = get(&format!("{}/metrics", s.url)).text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

fn events(s: &Server) -> Vec<Value> {
    let r = admin("GET", &format!("{}/admin/events", s.admin_url), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["events"].as_array().cloned().unwrap_or_default()
}

fn status_of(s: &Server) -> Value {
    admin("GET", &format!("{}/admin/status", s.admin_url), b"").json()["models"][0].clone()
}

#[test]
fn a_shadow_never_answers_and_its_agreement_is_the_share_it_differs_on() {
    let (_dir, s) = device_offline("shadow");
    install(&s, &echo_bundle("1.0.0", json!({})), true);
    install(
        &s,
        &echo_bundle("2.0.0", json!({"flip_percent": 30})),
        false,
    );
    set_policy(
        &s,
        &json!({"shadow": {"id": "sh-1", "candidate": "2.0.0", "queue": 1024}}),
    );
    // Clients always get the primary's answer: their input, unchanged.
    for n in 1..=300 {
        let (status, version, out) = ask(&s, n);
        assert_eq!((status, version.as_str()), (200, "1.0.0"));
        assert_eq!(out, [f64::from(n), 0.5, 0.25, 0.125], "request {n}");
    }
    // 2.0.0 rotates the answers of n mod 100 below 30: 90 of the 300, a different argmax.
    let agreement = "outpost_shadow_comparisons_total{model=\"echo\",version=\"2.0.0\",result=";
    let (agree, disagree) = eventually(Duration::from_secs(30), "the shadow lane drains", || {
        let agree = counter(&s, &format!("{agreement}\"agree\"}}"));
        let disagree = counter(&s, &format!("{agreement}\"disagree\"}}"));
        (agree + disagree == 300).then_some((agree, disagree))
    });
    assert_eq!((agree, disagree), (210, 90));
    assert_eq!(
        counter(
            &s,
            "outpost_requests_total{model=\"echo\",version=\"2.0.0\",role=\"shadow\"}"
        ),
        300
    );
    assert_eq!(
        counter(
            &s,
            "outpost_requests_total{model=\"echo\",version=\"1.0.0\",role=\"primary\"}"
        ),
        300
    );

    // A slow candidate behind a queue of one: what does not fit is dropped and counted, and
    // the clients' answers do not wait for it.
    install(&s, &echo_bundle("3.0.0", json!({"work": 20_000})), false);
    set_policy(
        &s,
        &json!({"shadow": {"id": "sh-2", "candidate": "3.0.0", "queue": 1, "compare": "exact"}}),
    );
    for n in 1..=50 {
        let (status, version, _) = ask(&s, n);
        assert_eq!((status, version.as_str()), (200, "1.0.0"));
    }
    let shadow3 = "{model=\"echo\",version=\"3.0.0\"";
    let (ran, dropped) = eventually(Duration::from_secs(60), "the slow shadow drains", || {
        let ran = counter(
            &s,
            &format!("outpost_shadow_comparisons_total{shadow3},result=\"agree\"}}"),
        );
        let dropped = counter(&s, &format!("outpost_shadow_dropped_total{shadow3}}}"));
        (ran + dropped == 50).then_some((ran, dropped))
    });
    assert!(dropped > 0 && ran > 0, "ran {ran}, dropped {dropped}");
    eprintln!(
        "shadow: 90/300 disagreements as planted; slow shadow behind a queue of 1: {ran} ran, {dropped} dropped"
    );
}

/// Sends keyed requests until `done` says so (at most `limit`); returns how many went to
/// each version.
fn drive(s: &Server, limit: u32, mut done: impl FnMut(&Server) -> bool) -> (u32, u32) {
    let (mut primary, mut candidate) = (0, 0);
    for n in 1..=limit {
        let (status, version, _) = ask(s, n);
        if version == "1.0.0" {
            assert_eq!(status, 200);
            primary += 1;
        } else {
            candidate += 1;
        }
        if n % 10 == 0 && done(s) {
            break;
        }
    }
    (primary, candidate)
}

fn rolled_back(s: &Server) -> bool {
    events(s).iter().any(|e| e["event"] == "canary_rolled_back")
}

#[test]
fn canaries_that_fail_or_are_slow_are_rolled_back_by_the_device_alone_and_a_good_one_is_promoted() {
    let (dir, s) = device_offline("canary");
    install(&s, &echo_bundle("1.0.0", json!({})), true);

    // A candidate that fails 30% of its requests.
    install(
        &s,
        &echo_bundle("2.0.0", json!({"fail_percent": 30})),
        false,
    );
    set_policy(
        &s,
        &json!({"canary": {"id": "c-err", "candidate": "2.0.0", "percent": 50, "min_requests": 30}}),
    );
    let (p, c) = drive(&s, 2_000, rolled_back);
    assert!(rolled_back(&s), "not rolled back after {p} + {c} requests");
    let e = events(&s).pop().unwrap();
    assert_eq!(
        (&e["model"], &e["policy"], &e["candidate"], &e["primary"]),
        (
            &json!("echo"),
            &json!("c-err"),
            &json!("2.0.0"),
            &json!("1.0.0")
        )
    );
    assert!(e["reason"].as_str().unwrap().contains("error rate"), "{e}");
    assert!(e["candidate_requests"].as_u64().unwrap() >= 30, "{e}");
    // Weight 0, then unloaded: the primary answers everything, the policy says so.
    let m = status_of(&s);
    assert_eq!(m["policy"], "primary", "{m}");
    assert_eq!(m["resident"], json!(["1.0.0"]), "{m}");
    assert!((1..=100).all(|n| ask(&s, n).1 == "1.0.0"));
    // The same canary again is refused: it was rolled back here (a new id tries again).
    let url = format!("{}/admin/models/echo/policy", s.admin_url);
    let again = json!({"canary": {"id": "c-err", "candidate": "2.0.0", "percent": 50}});
    let r = admin("PUT", &url, again.to_string().as_bytes());
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("was rolled back on this device"),
        "{}",
        r.text()
    );

    // A candidate ten times slower or more.
    install(&s, &echo_bundle("3.0.0", json!({"work": 3_000})), false);
    set_policy(
        &s,
        &json!({"canary": {"id": "c-slow", "candidate": "3.0.0", "percent": 50, "min_requests": 30, "max_p95_ratio": 3}}),
    );
    let slow_rolled_back = |s: &Server| events(s).len() == 2;
    drive(&s, 2_000, slow_rolled_back);
    let e = events(&s).pop().unwrap();
    assert_eq!(
        (&e["event"], &e["candidate"]),
        (&json!("canary_rolled_back"), &json!("3.0.0")),
        "{e}"
    );
    assert!(e["reason"].as_str().unwrap().contains("p95 latency"), "{e}");
    assert_eq!(status_of(&s)["policy"], "primary");

    // A candidate as good as its primary: within its bounds for its window, promoted.
    install(&s, &echo_bundle("4.0.0", json!({})), false);
    set_policy(
        &s,
        &json!({"canary": {"id": "c-good", "candidate": "4.0.0", "percent": 50, "min_requests": 30,
                "window_s": 3, "max_p95_ratio": 20, "on_pass": "promote"}}),
    );
    let started = std::time::Instant::now();
    let passed = |s: &Server| events(s).len() == 3;
    let mut rounds = 0;
    while !passed(&s) && started.elapsed() < Duration::from_secs(60) {
        rounds += 1;
        drive(&s, 40, |_| false);
        std::thread::sleep(Duration::from_millis(200));
    }
    let e = events(&s).pop().unwrap();
    assert_eq!(
        (&e["event"], &e["candidate"], &e["promoted"]),
        (&json!("canary_passed"), &json!("4.0.0"), &json!(true)),
        "{e} after {rounds} rounds"
    );
    let m = eventually(Duration::from_secs(10), "4.0.0 active", || {
        let m = status_of(&s);
        (m["active"] == "4.0.0").then_some(m)
    });
    assert_eq!(m["policy"], "primary", "{m}");
    // The version it replaced stays loaded for a rollback.
    assert!(
        m["resident"].as_array().unwrap().contains(&json!("1.0.0")),
        "{m}"
    );

    // All of it without a broker: the three verdicts wait in the fleet agent's durable outbox.
    assert_eq!(counter(&s, "outpost_fleet_connected"), 0);
    assert_eq!(counter(&s, "outpost_fleet_connections_total"), 0);
    let reasons: Vec<String> = events(&s)
        .iter()
        .map(|e| format!("{} {}: {}", e["event"], e["candidate"], e["reason"]))
        .collect();
    drop(s);
    let store = eventually(Duration::from_secs(10), "the agent's store is free", || {
        outpost_agent::Store::open(&dir.join("state/agent"))
            .map_err(|e| eprintln!("{e}"))
            .ok()
    });
    let outbox = store.outbox(64 << 20).unwrap();
    let mut outboxed = Vec::new();
    let mut after = None;
    while let Some(batch) = outbox.batch_after(after, 100, 1 << 20).unwrap() {
        after = batch.records.last().map(|r| r.seq);
        outboxed.extend(
            batch
                .records
                .into_iter()
                .filter_map(|r| r.body["event"].as_str().map(str::to_owned))
                .filter(|e| e.starts_with("canary")),
        );
    }
    assert_eq!(
        outboxed,
        ["canary_rolled_back", "canary_rolled_back", "canary_passed"]
    );
    eprintln!("canary, with no broker: {reasons:#?}");
}

#[test]
fn canary_and_shadow_policies_that_cannot_work_are_refused() {
    let (_dir, s) = device_offline("policy-refusals");
    install(&s, &echo_bundle("1.0.0", json!({})), true);
    install(&s, &echo_bundle("2.0.0", json!({})), false);
    let url = format!("{}/admin/models/echo/policy", s.admin_url);
    for (body, needle) in [
        (
            json!({"canary": {"id": "c", "candidate": "1.0.0", "percent": 10}}),
            "active version",
        ),
        (
            json!({"canary": {"id": "c", "candidate": "2.0.0", "percent": 100}}),
            "percent",
        ),
        (
            json!({"canary": {"id": "c", "candidate": "2.0.0", "percent": 10, "max_p95_ratio": 0.5}}),
            "max_p95_ratio",
        ),
        (
            json!({"shadow": {"id": "s", "candidate": "2.0.0", "queue": 0}}),
            "queue",
        ),
        (
            json!({"shadow": {"id": "s", "candidate": "2.0.0", "sample_percent": 101}}),
            "sample_percent",
        ),
        (
            json!({"shadow": {"id": "s", "candidate": "2.0.0", "compare": {"tolerance": -1}}}),
            "tolerance",
        ),
        (
            json!({"shadow": {"id": "s", "candidate": "9.9.9"}}),
            "9.9.9",
        ),
    ] {
        let r = admin("PUT", &url, body.to_string().as_bytes());
        assert!(
            r.status == 400 || r.status == 404,
            "{body}: {} {}",
            r.status,
            r.text()
        );
        assert!(r.text().contains(needle), "{body}: {}", r.text());
    }
    assert_eq!(admin("GET", &url, b"").json(), json!("primary"));
}
