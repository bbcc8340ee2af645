//! What the fleet and its devices refuse, as real processes on loopback: forged, replayed and
//! expired desired states and a tampered artifact (reported, while the device keeps serving),
//! and bad pushes, deploys and `Range` requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;

use serde_json::Value;

mod support;
use support::*;

#[test]
fn forged_replayed_expired_and_tampered_are_refused_and_reported() {
    let d = bed("refusals");
    let dir = &d.0;
    let (fleet, device) = fleet_with_digits(dir, "dev-x");
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    let topic = "outpost/v1/dev-x/desired";
    let genuine = retained(&fleet.broker, topic);
    let genuine_generation = {
        let envelope: Value = serde_json::from_slice(&genuine).unwrap();
        let payload: Value = serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
        payload["generation"].as_u64().unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let state = |generation: u64, expires_at: u64| outpost_proto::DesiredState {
        v: 1,
        device: "dev-x".parse().unwrap(),
        generation,
        expires_at,
        deployments: vec![],
    };
    let refusals = |fleet: &Fleet| -> Vec<String> {
        fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_refused")
            .map(|r| r["body"]["reason"].as_str().unwrap().to_owned())
            .collect()
    };
    let expect_refusal = |n: usize, needle: &str| {
        let reasons = eventually(secs(30), needle, || {
            let r = refusals(&fleet);
            (r.len() >= n).then_some(r)
        });
        assert!(reasons[n - 1].contains(needle), "{reasons:?}");
        let reported = eventually(secs(30), "last_error reported", || {
            fleet
                .reported("dev-x")
                .filter(|r| r["last_error"].as_str().is_some_and(|e| e.contains(needle)))
        });
        assert_eq!(reported["active"]["digits"], "1.0.0");
        assert_eq!(device.digits(), Ok("1.0.0".into()), "still serving");
    };

    // 1. Signed by another key (an empty deployment list would remove nothing anyway, but it
    //    must not even be accepted).
    let intruder = outpost_bundle::SecretKey::generate().unwrap();
    let forged =
        outpost_proto::SignedDesired::seal(&state(genuine_generation + 10, now + 3600), &intruder)
            .unwrap();
    publish_retained(&fleet.broker, topic, forged.to_vec().unwrap());
    expect_refusal(1, "unknown key");

    // 2. The genuine envelope replayed after a newer generation was applied.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--device",
            "dev-x",
            "--wait",
        ],
    );
    assert_eq!(device.digits(), Ok("2.0.0".into()));
    let accepted = |fleet: &Fleet| {
        fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_accepted")
            .count()
    };
    let accepted_before = eventually(secs(30), "acceptance of 2.0.0 reported", || {
        let n = accepted(&fleet);
        (n >= 2).then_some(n)
    });
    // The current envelope again (a duplicate: a no-op), then the replayed older one.
    let current = retained(&fleet.broker, topic);
    publish_retained(&fleet.broker, topic, current);
    publish_retained(&fleet.broker, topic, genuine.clone());
    expect_refusal_version(&fleet, &device, 2, "older than accepted", "2.0.0");
    // Events arrive in order, so anything the duplicate caused would be here by now.
    assert_eq!(
        accepted(&fleet),
        accepted_before,
        "the duplicate was applied again"
    );

    // 3. Signed by the fleet key, newest generation, but expired.
    let fleet_key = outpost_bundle::SecretKey::from_file_str(
        &fs::read_to_string(dir.join("fleet-data/fleet.key")).unwrap(),
    )
    .unwrap();
    let expired =
        outpost_proto::SignedDesired::seal(&state(u64::MAX / 2, now - 60), &fleet_key).unwrap();
    publish_retained(&fleet.broker, topic, expired.to_vec().unwrap());
    expect_refusal_version(&fleet, &device, 3, "expired", "2.0.0");

    // 4. A bundle tampered with on the artifact server: the digest check refuses it.
    digits_spec(dir, "3.0.0");
    build_and_sign(dir, "3.0.0.toml", "digits-3.0.0.opb");
    let pushed: Value =
        serde_json::from_str(&fleet.cli(dir, &["fleet", "push", "digits-3.0.0.opb", "--json"]))
            .unwrap();
    let artifact = dir
        .join("fleet-data/artifacts")
        .join(pushed["digest"].as_str().unwrap());
    let mut bytes = fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&artifact, bytes).unwrap();
    let out = bin()
        .args([
            "fleet",
            "deploy",
            "digits@3.0.0",
            "--device",
            "dev-x",
            "--wait",
            "--timeout",
            "60",
            "--fleet",
            &fleet.api,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a tampered deployment must not succeed"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("dev-x: failed") && stdout.contains("digest"),
        "{stdout}"
    );
    let failed = eventually(secs(30), "deployment_failed event", || {
        fleet
            .records("events", "dev-x")
            .into_iter()
            .find(|r| r["body"]["event"] == "deployment_failed" && r["body"]["version"] == "3.0.0")
    });
    assert!(
        failed["body"]["error"].as_str().unwrap().contains("digest"),
        "{failed}"
    );
    assert_eq!(
        device.digits(),
        Ok("2.0.0".into()),
        "still serving the last good version"
    );
    let reported = fleet.reported("dev-x").unwrap();
    assert!(
        !reported["installed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "digits@3.0.0")
    );
}

fn expect_refusal_version(fleet: &Fleet, device: &Device, n: usize, needle: &str, version: &str) {
    let reasons = eventually(secs(30), needle, || {
        let r: Vec<String> = fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_refused")
            .map(|r| r["body"]["reason"].as_str().unwrap().to_owned())
            .collect();
        (r.len() >= n).then_some(r)
    });
    assert!(reasons[n - 1].contains(needle), "{reasons:?}");
    eventually(secs(30), "last_error reported", || {
        fleet
            .reported("dev-x")
            .filter(|r| r["last_error"].as_str().is_some_and(|e| e.contains(needle)))
    });
    assert_eq!(device.digits(), Ok(version.into()), "still serving");
}

#[test]
fn bad_pushes_and_deploys_get_clear_errors_and_artifacts_honour_range() {
    let d = bed("api");
    let dir = &d.0;
    let fleet = Fleet::start(dir, None, None);
    let fail = |args: &[&str]| -> String {
        let out = bin()
            .args(args)
            .args(["--fleet", &fleet.api])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "outpost {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Unsigned and corrupted bundles are refused; nothing is stored.
    ok(
        dir,
        &["bundle", "build", "1.0.0.toml", "--out", "unsigned.opb"],
    );
    assert!(fail(&["fleet", "push", "unsigned.opb"]).contains("not signed"));
    let mut bytes = fs::read(dir.join("digits-1.0.0.opb")).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0x20;
    fs::write(dir.join("corrupt.opb"), bytes).unwrap();
    assert!(fail(&["fleet", "push", "corrupt.opb"]).contains("bundle refused"));
    assert_eq!(
        get_json(&format!("{}/api/v1/bundles", fleet.api)).1,
        serde_json::json!([])
    );
    // Deploying what was never pushed, to nobody, or with a malformed target.
    assert!(fail(&["fleet", "deploy", "digits@1.0.0", "--device", "x"]).contains("push it first"));
    // A malformed query string: a 400 in the API's JSON shape, saying what was wrong.
    for path in [
        "devices?limit=many",
        "telemetry?after=yesterday",
        "firings?limit=-1",
    ] {
        let (status, body) = get_json(&format!("{}/api/v1/{path}", fleet.api));
        assert_eq!(status, 400, "{path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains("invalid digit"), "{path}: {body}");
    }
    // And on a device's admin API.
    admin_device_config(dir);
    let (_device, admin) = start_admin_device(dir);
    let refused = outpost_testkit::admin("GET", &format!("{admin}/admin/events?limit=all"), b"");
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("query: ")),
        "{refused:?}"
    );
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    assert!(fail(&["fleet", "deploy", "digits@1.0.0"]).contains("no target devices"));
    assert!(
        fail(&["fleet", "deploy", "digits@1.0.0", "--device", "a/b"])
            .contains("not a valid device id")
    );
    assert!(fail(&["fleet", "deploy", "digits"]).contains("MODEL@VERSION"));
    let mut r = http()
        .post(&format!("{}/api/v1/deployments", fleet.api))
        .header("content-type", "application/json")
        .send(&b"{\"model\": 1"[..])
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.body_mut().read_to_string().unwrap().contains("error"));

    // The artifact store: whole, ranges, bad ranges, unknown digests.
    let bundle = fs::read(dir.join("digits-1.0.0.opb")).unwrap();
    let digest = outpost_bundle::sha256_hex(&bundle);
    let url = format!("{}/artifacts/{digest}", fleet.api);
    let fetch = |range: Option<&str>| {
        let mut req = http().get(&url);
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let mut r = req.call().unwrap();
        let cr = r
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), cr, r.body_mut().read_to_vec().unwrap())
    };
    assert_eq!(fetch(None), (200, None, bundle.clone()));
    let (status, cr, body) = fetch(Some("bytes=100-"));
    assert_eq!((status, body.as_slice()), (206, &bundle[100..]));
    assert_eq!(
        cr.unwrap(),
        format!("bytes 100-{}/{}", bundle.len() - 1, bundle.len())
    );
    assert_eq!(fetch(Some("bytes=10-19")).2, bundle[10..20].to_vec());
    let (status, cr, _) = fetch(Some(&format!("bytes={}-", bundle.len())));
    assert_eq!(
        (status, cr.unwrap()),
        (416, format!("bytes */{}", bundle.len()))
    );
    assert_eq!(
        get_json(&format!("{}/artifacts/{}", fleet.api, "0".repeat(64))).0,
        404
    );
    assert_eq!(
        get_json(&format!("{}/artifacts/..%2Ffleet.key", fleet.api)).0,
        404
    );

    // Removing a bundle: refused while a device's desired state names it, then gone with its
    // artifact file.
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", "dev-z"],
    );
    assert!(
        fail(&["fleet", "remove-bundle", "digits@1.0.0"])
            .contains("still deployed to 1 device(s) (dev-z)")
    );
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@2.0.0", "--device", "dev-z"],
    );
    let out = fleet.cli(dir, &["fleet", "remove-bundle", "digits@1.0.0"]);
    assert!(out.contains(&digest), "{out}");
    assert_eq!(get_json(&url).0, 404, "the artifact file is gone");
    assert!(!dir.join("fleet-data/artifacts").join(&digest).exists());
    let (_, bundles) = get_json(&format!("{}/api/v1/bundles", fleet.api));
    assert_eq!(bundles.as_array().unwrap().len(), 1);
    assert!(fail(&["fleet", "remove-bundle", "digits@1.0.0"]).contains("not found"));
}

#[test]
fn a_fleet_refuses_to_serve_an_open_api_or_a_short_token() {
    let d = Dir::new("fleet-options");
    let dir = &d.0;
    let open = fails(
        dir,
        &[
            "fleet",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        open.contains("listening on 0.0.0.0:0 without --token-file would let anyone deploy"),
        "{open}"
    );
    fs::write(dir.join("token"), "short\n").unwrap();
    let short = fails(
        dir,
        &[
            "fleet",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--token-file",
            "token",
        ],
    );
    assert!(short.contains("at least 16 characters"), "{short}");
    // Refused before anything was created.
    assert!(!dir.join("fleet-data").exists());
}

/// The expiry of the retained desired state for `device`, read from the broker.
fn desired_expiry(fleet: &Fleet, device: &str) -> u64 {
    let envelope: Value = serde_json::from_slice(&retained(
        &fleet.broker,
        &format!("outpost/v1/{device}/desired"),
    ))
    .unwrap();
    let payload: Value = serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
    payload["expires_at"].as_u64().unwrap()
}

#[test]
fn desired_states_are_re_signed_so_a_device_offline_past_their_validity_still_takes_them() {
    let d = bed("resign");
    let dir = &d.0;
    // A 10 s validity: re-signed whenever less than 5 s is left, checked every 2.5 s, so a
    // retained state always has a second or more left.
    let fleet = Fleet::launch(dir, &["--desired-ttl", "10s"]);
    let config = device_config(dir, "dev-r", &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-r"]);
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--device", "dev-r"], &["dev-r"]);

    // The device goes away; a deployment is made while it is away, and it stays away for
    // two and a half validity periods.
    drop(device);
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@2.0.0", "--device", "dev-r"],
    );
    let signed_at_deploy = desired_expiry(&fleet, "dev-r");
    std::thread::sleep(secs(25));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now > signed_at_deploy, "the first signature has expired");
    let signed_now = desired_expiry(&fleet, "dev-r");
    assert!(
        signed_now > now,
        "re-signed: expires at {signed_now}, now {now}, first {signed_at_deploy}"
    );

    // Back, it takes the re-signed state: no refusal, 2.0.0 serving, the fleet in sync.
    let device = Device::start(dir, &config);
    eventually(secs(60), "2.0.0 serving and reported applied", || {
        let in_sync = fleet.device("dev-r").is_some_and(|d| d["in_sync"] == true);
        (device.digits().as_deref() == Ok("2.0.0") && in_sync).then_some(())
    });
    let refused: Vec<Value> = fleet
        .records("events", "dev-r")
        .into_iter()
        .filter(|r| r["body"]["event"] == "desired_refused")
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}
