//! Hostile guests, overload, hot swap under load, restarts and rejected bundles.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use outpost_device::Device;
use outpost_examples::Example;
use outpost_testkit::{TempDir, agent, digits_request, eventually, get, post, post_json};

#[test]
fn hostile_guests_fail_only_their_own_request() {
    let dir = TempDir::new("hostile");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    device.install_and_activate(&hostile_bundle(300)).unwrap();
    device
        .install_and_activate(&example_bundle(Example::Digits, None))
        .unwrap();
    let s = Server::start(device, &config);
    let raw = format!("{}/v2/models/hostile/raw", s.url);
    let healthy = || {
        let r = post_json(
            &format!("{}/v2/models/digits/infer", s.url),
            &digits_request(&[0.0; 64]),
        );
        assert_eq!(r.status, 200, "digits broke: {}", r.text());
        let r = post(&raw, "text/plain", b"still here");
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "still here"),
            "hostile echo broke"
        );
    };
    healthy();
    for (attack, status, message) in [
        ("attack/spin", 500, "exceeded its deadline of 300 ms"),
        (
            "attack/grow",
            500,
            "exceeded its memory limit of 16777216 bytes",
        ),
        ("attack/huge-tensor", 400, "limit of 1048576 bytes"),
        ("attack/huge-output", 500, "above the limit of 1048576"),
        // A model failing inside (tract panics on an index beyond a Gather's table) is the
        // model's fault, not the client's.
        (
            "attack/lookup",
            500,
            "model `lookup` failed: the model panicked",
        ),
        ("attack/file", 500, "file access denied"),
        ("attack/socket", 500, "network access denied"),
        ("attack/panic", 500, "model trapped"),
    ] {
        let r = post(&raw, attack, b"");
        assert_eq!(r.status, status, "{attack}: {}", r.text());
        let err = r.json()["error"].as_str().unwrap().to_owned();
        assert!(err.contains(message), "{attack}: {err}");
        healthy();
    }
    let metrics = get(&format!("{}/metrics", s.url)).text();
    for kind in ["deadline", "memory", "trap"] {
        assert!(
            metrics.contains(&format!("outpost_request_errors_total{{model=\"hostile\",version=\"1.0.0\",role=\"primary\",kind=\"{kind}\"}} 1")),
            "{kind}: {metrics}"
        );
    }
    // A device without a fleet shows no fleet-link series.
    assert!(!metrics.contains("outpost_fleet_connected"), "{metrics}");
}

#[test]
fn excess_requests_are_refused_at_once() {
    let dir = TempDir::new("busy");
    let config = config(&dir, "max_concurrent_requests = 1\n");
    let device = Device::with_trust(&config, trust()).unwrap();
    device.install_and_activate(&hostile_bundle(3000)).unwrap();
    let s = Server::start(device, &config);
    let raw = format!("{}/v2/models/hostile/raw", s.url);
    let spinner = {
        let raw = raw.clone();
        // Retried while refused: the probe below may hold the slot at that moment.
        std::thread::spawn(move || {
            loop {
                let status = post(&raw, "attack/spin", b"").status;
                if status != 503 {
                    return status;
                }
            }
        })
    };
    // While the spinning request holds the only slot, another is answered 503 at once.
    let busy = eventually(Duration::from_secs(3), "a request refused as busy", || {
        let r = post(&raw, "text/plain", b"x");
        (r.status == 503).then_some(r)
    });
    assert!(busy.json()["error"].as_str().unwrap().starts_with("busy"));
    assert_eq!(spinner.join().unwrap(), 500);
    assert_eq!(
        post(&raw, "text/plain", b"x").status,
        200,
        "the slot is free again"
    );
    assert!(
        get(&format!("{}/metrics", s.url))
            .text()
            .contains("outpost_rejected_busy_total ")
    );
}

#[test]
fn activations_under_concurrent_load_fail_no_request() {
    let dir = TempDir::new("swap");
    let config = config(&dir, "max_concurrent_requests = 64\n");
    let device = Device::with_trust(&config, trust()).unwrap();
    device
        .install_and_activate(&example_bundle(Example::Digits, Some("1.0.0")))
        .unwrap();
    device
        .install(&example_bundle(Example::Digits, Some("2.0.0")))
        .unwrap();
    let s = Server::start(device, &config);
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let seen_v2 = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, stop, served, seen_v2) = (
                s.url.clone(),
                Arc::clone(&stop),
                Arc::clone(&served),
                Arc::clone(&seen_v2),
            );
            std::thread::spawn(move || {
                let agent = agent();
                let body = digits_request(&[3.0; 64]).to_string();
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let mut r = agent
                        .post(&format!("{url}/v2/models/digits/infer"))
                        .header("content-type", "application/json")
                        .send(body.as_bytes())
                        .unwrap();
                    let status = r.status().as_u16();
                    let text = r.body_mut().read_to_string().unwrap();
                    if status != 200 {
                        failures.push(format!("{status}: {text}"));
                    } else if text.contains("\"model_version\":\"2.0.0\"") {
                        seen_v2.store(true, Ordering::Relaxed);
                    }
                    served.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();
    for i in 0..10 {
        let version = if i % 2 == 0 { "2.0.0" } else { "1.0.0" };
        s.device.activate("digits", version).unwrap();
        // Two requests per client answered after each activation: at least one client then
        // started a request after it, so every version serves, however slow the machine.
        // A client that stopped ends the wait; joining it below says why.
        let after = served.load(Ordering::Relaxed) + 2 * clients.len();
        eventually(
            Duration::from_secs(30),
            "requests answered after an activation",
            || {
                (served.load(Ordering::Relaxed) >= after || clients.iter().any(|c| c.is_finished()))
                    .then_some(())
            },
        );
    }
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        served.load(Ordering::Relaxed) > 20,
        "load was too light to prove anything"
    );
    assert!(
        seen_v2.load(Ordering::Relaxed),
        "the new version never answered"
    );
}

#[test]
fn restart_serves_the_last_active_deployment() {
    let dir = TempDir::new("restart");
    let config = config(&dir, "");
    {
        let device = Device::with_trust(&config, trust()).unwrap();
        device
            .install_and_activate(&example_bundle(Example::Digits, Some("1.0.0")))
            .unwrap();
        device
            .install_and_activate(&example_bundle(Example::Digits, Some("1.2.0")))
            .unwrap();
        device
            .install_and_activate(&example_bundle(Example::Sensor, None))
            .unwrap();
    }
    let device = Device::with_trust(&config, trust()).unwrap();
    let s = Server::start(device, &config);
    let r = post_json(
        &format!("{}/v2/models/digits/infer", s.url),
        &digits_request(&[1.0; 64]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model_version"], "1.2.0");
    assert_eq!(
        get(&format!("{}/v2/models/sensor-anomaly/ready", s.url)).status,
        200
    );
}

#[test]
fn a_key_removed_from_the_trust_store_stops_its_bundles_at_boot() {
    let dir = TempDir::new("distrust");
    let config = config(&dir, "");
    {
        let device = Device::with_trust(&config, trust()).unwrap();
        device
            .install_and_activate(&example_bundle(Example::Digits, None))
            .unwrap();
    }
    let device = Device::with_trust(&config, outpost_bundle::TrustStore::new()).unwrap();
    assert!(
        device.resolve("digits", None).is_err(),
        "an untrusted bundle was loaded"
    );
}

#[test]
fn rejected_bundles_leave_the_device_exactly_as_it_was() {
    let dir = TempDir::new("rejected");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    device
        .install_and_activate(&example_bundle(Example::Digits, None))
        .unwrap();
    let before = (
        device.installed().unwrap(),
        format!("{:?}", device.status().unwrap()),
    );

    let good = example_bundle(Example::Digits, Some("1.5.0"));
    let mut tampered = good.clone();
    let at = tampered.len() / 2;
    tampered[at] ^= 0x40;
    let mut other_key =
        outpost_bundle::Bundle::build(Example::Digits.build_input().unwrap()).unwrap();
    other_key.sign(&outpost_bundle::SecretKey::from_seed(&[99; 32]));
    let mut rollback = Example::Digits.build_input().unwrap();
    rollback.version = "0.9.0".parse().unwrap();
    rollback.security_counter = 0;
    let mut raised = Example::Digits.build_input().unwrap();
    raised.version = "3.0.0".parse().unwrap();
    raised.security_counter = 5;
    let mut bad_onnx = Example::Digits.build_input().unwrap();
    bad_onnx.version = "4.0.0".parse().unwrap();
    bad_onnx.models[0].bytes = b"not onnx".to_vec();

    for (what, bytes) in [
        ("tampered", tampered),
        ("unknown signer", other_key.to_bytes()),
        ("truncated", good[..good.len() / 3].to_vec()),
        ("garbage", b"garbage".to_vec()),
    ] {
        let err = device.install(&bytes).unwrap_err();
        assert!(
            err.to_string().starts_with("bundle rejected"),
            "{what}: {err}"
        );
        assert_eq!(
            (
                device.installed().unwrap(),
                format!("{:?}", device.status().unwrap())
            ),
            before,
            "{what}"
        );
    }
    // A bundle that verifies but could not load is refused at install, not at activation:
    // nothing is recorded and the active version keeps serving.
    let mut bad_guest = Example::Digits.build_input().unwrap();
    bad_guest.version = "4.1.0".parse().unwrap();
    bad_guest.guest = b"\0asm\x01\0\0\0".to_vec();
    let mut no_guest = Example::Digits.build_input().unwrap();
    no_guest.version = "4.2.0".parse().unwrap();
    no_guest.guest = b"not wasm at all".to_vec();
    // A valid component (the empty one: preamble, component layer) exporting nothing.
    let mut no_exports = Example::Digits.build_input().unwrap();
    no_exports.version = "4.3.0".parse().unwrap();
    no_exports.guest = b"\0asm\x0d\x00\x01\x00".to_vec();
    for (what, bytes, expected) in [
        (
            "an ONNX model tract cannot load",
            signed(bad_onnx),
            "cannot be loaded",
        ),
        ("a core module, not a component", signed(bad_guest), "guest"),
        ("not WebAssembly", signed(no_guest), "guest"),
        (
            "a component without the contract's exports",
            signed(no_exports),
            "guest",
        ),
    ] {
        let err = device.install(&bytes).unwrap_err();
        assert!(err.to_string().contains(expected), "{what}: {err}");
        assert_eq!(
            (
                device.installed().unwrap(),
                format!("{:?}", device.status().unwrap())
            ),
            before,
            "{what}"
        );
    }
    assert_eq!(device.resolve("digits", None).unwrap().version(), "1.0.0");

    device.install(&signed(raised)).unwrap();
    let err = device.install(&signed(rollback)).unwrap_err();
    assert!(err.to_string().contains("rollback refused"), "{err}");
    // Versions below the new counter may not be activated again.
    device.activate("digits", "3.0.0").unwrap();
    let err = device.activate("digits", "1.0.0").unwrap_err();
    assert!(err.to_string().contains("may not run again"), "{err}");
}

/// Regression: the bundle's `max_tensor_bytes` holds for tensors entering the guest too, not
/// only for what the guest asks the host for or returns.
#[test]
fn tensors_above_the_bundles_cap_never_reach_the_guest() {
    let dir = TempDir::new("tensor-cap-in");
    let config = config(&dir, "");
    let device = Device::with_trust(&config, trust()).unwrap();
    device.install_and_activate(&hostile_bundle(300)).unwrap();
    let s = Server::start(device, &config);
    let infer = format!("{}/v2/models/hostile/infer", s.url);
    let request = |n: usize| serde_json::json!({"inputs": [{"name": "x", "shape": [n], "datatype": "UINT8", "data": vec![7u8; n]}]});
    // Within the cap (1 MiB) the hostile guest echoes the tensor back.
    let r = post_json(&infer, &request(1000));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["outputs"][0]["shape"], serde_json::json!([1000]));
    // Above it the request is refused as bad input before the guest runs.
    let r = post_json(&infer, &request((1 << 20) + 1));
    assert_eq!(r.status, 400, "{}", r.text());
    let err = r.json()["error"].as_str().unwrap().to_owned();
    assert!(
        err.contains("tensor `x` is 1048577 bytes, above the limit of 1048576"),
        "{err}"
    );
    let metrics = get(&format!("{}/metrics", s.url)).text();
    assert!(
        !metrics.contains("kind=\"internal\""),
        "the guest ran on it: {metrics}"
    );
}

#[test]
fn the_highest_security_counter_survives_a_restart_and_a_rollback_stays_refused() {
    let dir = TempDir::new("rollback-restart");
    let config = config(&dir, "");
    let mut raised = Example::Digits.build_input().unwrap();
    raised.version = "3.0.0".parse().unwrap();
    raised.security_counter = 5;
    let mut old = Example::Digits.build_input().unwrap();
    old.version = "2.0.0".parse().unwrap();
    old.security_counter = 4;
    let old = signed(old);
    {
        let device = Device::with_trust(&config, trust()).unwrap();
        device.install_and_activate(&signed(raised)).unwrap();
    }
    // Power cycle: a new process opens the same state.
    let device = Device::with_trust(&config, trust()).unwrap();
    let err = device.install(&old).unwrap_err();
    assert!(err.to_string().contains("rollback"), "{err}");
    assert_eq!(device.status().unwrap()[0].active.as_deref(), Some("3.0.0"));
    assert_eq!(
        device.status().unwrap()[0].highest_security_counter,
        Some(5)
    );
}
