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

/// The generation in a retained desired-state envelope.
fn generation(envelope: &[u8]) -> Option<u64> {
    let envelope: serde_json::Value = serde_json::from_slice(envelope).ok()?;
    let payload: serde_json::Value = serde_json::from_str(envelope["payload"].as_str()?).ok()?;
    payload["generation"].as_u64()
}

#[test]
fn garbage_over_an_offline_devices_desired_state_does_not_keep_its_deployment_from_it() {
    let d = bed("garbage-desired");
    let dir = &d.0;
    let (fleet, mut device) = fleet_with_digits(dir, "dev-g");
    let topic = "outpost/v1/dev-g/desired";
    let first = generation(&retained(&fleet.broker, topic)).unwrap();
    // The device goes away; a deployment is made for it; then an attacker overwrites the
    // retained desired state it would find on its return.
    device.proc.kill9();
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@2.0.0", "--device", "dev-g"],
    );
    eventually(secs(30), "the new desired state retained", || {
        generation(&retained(&fleet.broker, topic)).filter(|&g| g > first)
    });
    publish_retained(&fleet.broker, topic, b"{\"garbage\": true}".to_vec());
    assert_eq!(
        retained_now(&fleet.broker, topic).as_deref(),
        Some(&b"{\"garbage\": true}"[..])
    );
    // Back, it refuses the garbage, reports itself behind, and the fleet publishes the real
    // one again.
    let device = Device::start(dir, "dev-g.toml");
    let version = eventually(secs(60), "the deployment applied after all", || {
        device.digits().ok().filter(|v| v == "2.0.0")
    });
    assert_eq!(version, "2.0.0");
    assert!(generation(&retained(&fleet.broker, topic)).unwrap() > first);
}

#[test]
fn a_forged_offline_presence_for_the_fleet_does_not_halt_telemetry() {
    let d = bed("forged-presence");
    let dir = &d.0;
    let (fleet, device) = fleet_with_digits(dir, "dev-p");
    let replica = get_json(&format!("{}/api/v1/fleet", fleet.api)).1["replica"]
        .as_str()
        .unwrap()
        .to_owned();
    let presence = format!("outpost/v1/_fleet/{replica}/status");
    // Devices hold telemetry while no replica says online.
    publish_retained(
        &fleet.broker,
        &presence,
        br#"{"v":1,"online":false}"#.to_vec(),
    );
    eventually(secs(30), "the fleet announcing itself again", || {
        let retained = retained_now(&fleet.broker, &presence)?;
        let v: serde_json::Value = serde_json::from_slice(&retained).ok()?;
        (v["online"] == true).then_some(())
    });
    let before = fleet.records("telemetry", "dev-p").len();
    eventually(secs(30), "telemetry flowing on", || {
        (fleet.records("telemetry", "dev-p").len() > before + 10
            && device.metric("outpost_fleet_online") == Some(1))
        .then_some(())
    });
}

#[test]
fn records_forged_ahead_of_a_device_do_not_erase_its_genuine_ones() {
    let d = bed("forged-seqs");
    let dir = &d.0;
    let (fleet, _device) = fleet_with_digits(dir, "dev-s");
    // Events and telemetry share one sequence: a genuine record may be in either stream.
    let seqs = |fleet: &Fleet| -> Vec<(u64, bool)> {
        let mut records = fleet.records("telemetry", "dev-s");
        records.extend(fleet.records("events", "dev-s"));
        let mut seqs: Vec<(u64, bool)> = records
            .iter()
            .map(|r| (r["seq"].as_u64().unwrap(), r["body"]["forged"] == true))
            .collect();
        seqs.sort_unstable();
        seqs
    };
    let last = eventually(secs(30), "telemetry stored", || {
        seqs(&fleet).last().map(|&(s, _)| s)
    });
    // The device's next 40 sequence numbers, a few seconds ahead of it (10 records a second).
    let (from, to) = (last + 20, last + 60);
    let forged = serde_json::json!({
        "v": 1,
        "device": "dev-s",
        "records": (from..to).map(|seq| serde_json::json!({"seq": seq, "time": 1, "body": {"forged": true}})).collect::<Vec<_>>(),
        "dropped": 0,
    });
    let (client, mut connection) = mqtt_client(&fleet.broker, "forger");
    client
        .publish(
            "outpost/v1/dev-s/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            forged.to_string().into_bytes(),
        )
        .unwrap();
    for event in connection.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            break;
        }
        event.unwrap();
    }
    let _ = client.disconnect();
    // The genuine records under those numbers arrive later, and are kept.
    let stored = eventually(secs(60), "genuine records past the forged ones", || {
        let s = seqs(&fleet);
        s.iter()
            .any(|&(seq, forged)| seq > to && !forged)
            .then_some(s)
    });
    let missing: Vec<u64> = (from..to)
        .filter(|seq| !stored.iter().any(|&(s, forged)| s == *seq && !forged))
        .collect();
    assert!(missing.is_empty(), "genuine records lost: {missing:?}");
    // Each genuine telemetry record under a forged number is a conflict, counted.
    let collided = fleet
        .records("telemetry", "dev-s")
        .iter()
        .filter(|r| {
            let seq = r["seq"].as_u64().unwrap();
            (from..to).contains(&seq) && r["body"]["forged"] != true
        })
        .count() as u64;
    assert!(collided > 0);
    let device = fleet.device("dev-s").unwrap();
    assert_eq!(device["conflicts"], collided, "{device}");
    let (_, metrics) = get_json(&format!("{}/metrics", fleet.api));
    assert!(
        metrics.as_str().unwrap().contains(&format!(
            "outpost_fleet_conflicting_records_total {}",
            to - from
        )),
        "{metrics}"
    );
}
