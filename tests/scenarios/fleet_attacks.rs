//! A hostile MQTT client on the fleet's broker, against a fleet and its devices running as real
//! processes on loopback: what it can no longer do.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::*;

/// The bound on a device's `last_error` (`outpost_proto::text::MAX_ERROR_TEXT`).
const MAX_ERROR_TEXT: usize = 1024;

#[test]
fn a_refusal_quoting_a_megabyte_cannot_cut_a_device_off() {
    let d = bed("huge-refusal");
    let dir = &d.0;
    let (fleet, device) = fleet_with_digits(dir, "dev-h");
    // An envelope whose key id is nearly 1 MiB: refused, and the refusal used to quote it whole
    // into the device's persisted last_error, making its reported state larger than a publish
    // may be, so the device could report nothing again and reconnected in a loop.
    let envelope = serde_json::json!({
        "payload": "{}",
        "key_id": "k".repeat(1_000_000),
        "signature": "00",
    });
    publish_retained(
        &fleet.broker,
        "outpost/v1/dev-h/desired",
        envelope.to_string().into_bytes(),
    );
    let reported = eventually(secs(30), "the refusal reported", || {
        fleet.reported("dev-h").filter(|r| {
            r["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("refused desired state"))
        })
    });
    let error = reported["last_error"].as_str().unwrap();
    assert!(error.len() <= MAX_ERROR_TEXT, "{} bytes", error.len());
    assert!(
        error.contains("unknown") || error.contains("key"),
        "{error}"
    );
    assert_eq!(device.digits(), Ok("1.0.0".into()), "still serving");
    // The event's reason is bounded too.
    let reasons: Vec<String> = fleet
        .records("events", "dev-h")
        .iter()
        .filter(|r| r["body"]["event"] == "desired_refused")
        .map(|r| r["body"]["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !reasons.is_empty() && reasons.iter().all(|r| r.len() <= MAX_ERROR_TEXT),
        "{:?}",
        reasons.iter().map(String::len).collect::<Vec<_>>()
    );
    // The link is intact: a deployment reaches the device and clears the error.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--device",
            "dev-h",
            "--wait",
        ],
    );
    assert!(out.contains("dev-h: applied"), "{out}");
    assert_eq!(device.digits(), Ok("2.0.0".into()));
    eventually(secs(30), "the error cleared", || {
        fleet
            .reported("dev-h")
            .filter(|r| r["last_error"].is_null())
    });
}
