//! Deploying through the fleet, as real processes on loopback: `outpost fleet serve` (embedded
//! broker or Mosquitto) and `outpost device run` agents: push and deploy to some devices,
//! replicas on a shared broker, broker logins.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use serde_json::Value;

mod support;
use support::*;

/// Push, deploy to two of three devices, check who serves what and what the fleet says.
fn deploy_to_two_of_three(dir: &Path, fleet: &Fleet) {
    let devices: Vec<Device> = [
        ("dev-a", &["lab"][..]),
        ("dev-b", &["lab"]),
        ("dev-c", &["field"]),
    ]
    .iter()
    .map(|(id, tags)| Device::start(dir, &device_config(dir, id, &fleet.broker, tags)))
    .collect();
    online(fleet, &["dev-a", "dev-b", "dev-c"]);
    for d in &devices {
        assert_eq!(d.digits(), Err(404), "nothing is installed yet");
        // The device's metrics show the link: connected, a replica online, nothing queued up.
        eventually(secs(30), "the link in the device's metrics", || {
            (d.metric("outpost_fleet_connected") == Some(1)
                && d.metric("outpost_fleet_online") == Some(1))
            .then_some(())
        });
        assert_eq!(d.metric("outpost_outbox_dropped_records_total"), Some(0));
    }

    let pushed = fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb", "--json"]);
    let pushed: Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["name"], "digits");
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.0.0",
            "--tag",
            "lab",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    assert!(
        out.contains("dev-a: applied") && out.contains("dev-b: applied"),
        "{out}"
    );
    assert!(!out.contains("dev-c"), "{out}");

    assert_eq!(devices[0].digits(), Ok("1.0.0".into()));
    assert_eq!(devices[1].digits(), Ok("1.0.0".into()));
    assert_eq!(devices[2].digits(), Err(404), "dev-c was not a target");

    let status: Value =
        serde_json::from_str(&fleet.cli(dir, &["fleet", "status", "--json"])).unwrap();
    let by_id = |id: &str| {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap()
    };
    for id in ["dev-a", "dev-b"] {
        let d = by_id(id);
        assert_eq!(d["reported"]["active"]["digits"], "1.0.0", "{d}");
        assert_eq!(d["in_sync"], true, "{d}");
        assert_eq!(d["online"], true);
        assert_eq!(d["reported"]["arch"], std::env::consts::ARCH);
        assert!(d["reported"]["last_error"].is_null(), "{d}");
    }
    let c = by_id("dev-c");
    assert!(
        c["reported"]["active"].as_object().unwrap().is_empty(),
        "{c}"
    );
    assert!(c["desired_generation"].is_null(), "{c}");
    // The human table says the same.
    let table = fleet.cli(dir, &["fleet", "status"]);
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_owned()
    };
    assert!(line("dev-a").contains("digits@1.0.0"), "{table}");
    assert!(!line("dev-c").contains("digits@"), "{table}");

    // Events arrived: each target reported its activation.
    eventually(secs(30), "activation events", || {
        ["dev-a", "dev-b"]
            .iter()
            .all(|id| {
                fleet
                    .records("events", id)
                    .iter()
                    .any(|r| r["body"]["event"] == "activated" && r["body"]["version"] == "1.0.0")
            })
            .then_some(())
    });
    // And telemetry, with per-model counters once a request was served.
    eventually(secs(30), "telemetry with model counters", || {
        fleet
            .records("telemetry", "dev-a")
            .iter()
            .rev()
            .find_map(|r| {
                let models = r["body"]["models"].as_array()?;
                models
                    .iter()
                    .any(|m| m["model"] == "digits" && m["requests"].as_u64() >= Some(1))
                    .then_some(())
            })
    });
    // Offline when stopped: the last will, or the goodbye.
    drop(devices);
    eventually(secs(60), "every device offline", || {
        fleet
            .devices()
            .iter()
            .all(|d| d["online"] == false)
            .then_some(())
    });
}

#[test]
fn embedded_broker_push_and_deploy_to_two_of_three() {
    let d = bed("embedded");
    let fleet = Fleet::start(&d.0, None, None);
    let info = eventually(secs(30), "the fleet connected to its broker", || {
        let (status, info) = get_json(&format!("{}/api/v1/fleet", fleet.api));
        (status == 200 && info["broker_connected"] == true).then_some(info)
    });
    assert_eq!(info["broker"], fleet.broker);
    deploy_to_two_of_three(&d.0, &fleet);
    let (_, metrics) = get_json(&format!("{}/metrics", fleet.api));
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(metrics.contains("outpost_fleet_devices 3"), "{metrics}");
    drop(fleet);
}

#[test]
fn mosquitto_push_and_deploy_to_two_of_three() {
    let d = bed("mosquitto");
    let broker = Mosquitto::start(&d.0);
    let fleet = Fleet::start(&d.0, Some(&broker.url()), None);
    assert_eq!(fleet.broker, broker.url());
    deploy_to_two_of_three(&d.0, &fleet);
}

#[test]
fn two_fleet_replicas_on_mosquitto_split_telemetry_through_shared_subscriptions() {
    let d = bed("replicas");
    let dir = &d.0;
    let broker = Mosquitto::start(dir);
    let replica = |name: &str, extra: &[&str]| -> Fleet {
        let data = format!("{name}-data");
        let url = broker.url();
        let mut args = vec![
            "--data-dir",
            &data,
            "--broker",
            url.as_str(),
            "--replica",
            name,
        ];
        args.extend(extra);
        Fleet::launch(dir, &args)
    };
    let one = replica("replica-1", &[]);
    let two = replica("replica-2", &["--ingest-only"]);
    // The device trusts the first replica's key; telemetry does not depend on it.
    fs::create_dir_all(dir.join("fleet-data")).unwrap();
    fs::copy(
        dir.join("replica-1-data/fleet.pub"),
        dir.join("fleet-data/fleet.pub"),
    )
    .unwrap();
    let config = device_config(dir, "dev-s", &broker.url(), &[]);
    let _device = Device::start(dir, &config);
    // Both replicas keep the whole registry (plain subscriptions)...
    online(&one, &["dev-s"]);
    online(&two, &["dev-s"]);
    // ...and split the telemetry (shared subscriptions): each record lands in exactly one.
    let seqs = |fleet: &Fleet| -> BTreeSet<u64> {
        let mut records = fleet.records("telemetry", "dev-s");
        records.extend(fleet.records("events", "dev-s"));
        records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
    };
    let (a, b) = eventually(secs(60), "both replicas storing telemetry", || {
        let (a, b) = (seqs(&one), seqs(&two));
        (a.len() >= 5 && b.len() >= 5 && a.len() + b.len() >= 40).then_some((a, b))
    });
    assert!(a.is_disjoint(&b), "a record reached both replicas");
    let max = *a.iter().chain(b.iter()).max().unwrap();
    let lowest_missing = (1..=max).find(|s| !a.contains(s) && !b.contains(s));
    // The newest records may still be in flight to one replica; everything before is there.
    assert!(
        lowest_missing.is_none_or(|s| s + 8 > max),
        "record {lowest_missing:?} of {max} reached neither replica"
    );
    // The secondary leaves bundles and deployments to the primary.
    let out = bin()
        .args(["fleet", "push", "digits-1.0.0.opb", "--fleet", &two.api])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only ingests"));
    one.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
}

#[test]
fn embedded_broker_logins_admit_known_devices_only() {
    let d = bed("logins");
    let dir = &d.0;
    fs::write(
        dir.join("logins.txt"),
        "# device logins\ndev-ok:right-password\n",
    )
    .unwrap();
    let fleet = Fleet::launch(dir, &["--mqtt-logins", "logins.txt"]);
    // The fleet logged itself in with a login of its own.
    eventually(secs(30), "fleet connected", || {
        (get_json(&format!("{}/api/v1/fleet", fleet.api)).1["broker_connected"] == true)
            .then_some(())
    });
    fs::write(dir.join("right"), "right-password\n").unwrap();
    fs::write(dir.join("wrong"), "guess\n").unwrap();
    for (id, file) in [("dev-ok", "right"), ("dev-bad", "wrong")] {
        let config = device_config(dir, id, &fleet.broker, &[]);
        let mut text = fs::read_to_string(dir.join(&config)).unwrap();
        text.push_str(&format!(
            "username = \"dev-ok\"\npassword_file = \"{file}\"\n"
        ));
        fs::write(dir.join(&config), text).unwrap();
    }
    let ok_device = Device::start(dir, "dev-ok.toml");
    let bad_device = Device::start(dir, "dev-bad.toml");
    online(&fleet, &["dev-ok"]);
    eventually(secs(30), "the refused login logged", || {
        bad_device
            .proc
            .logs()
            .contains("cannot reach the broker")
            .then_some(())
    });
    assert!(
        fleet.device("dev-bad").is_none(),
        "a refused device reached the fleet"
    );
    // Refused by the broker, it still serves locally.
    assert_eq!(
        get_json(&format!("{}/v2/health/live", bad_device.url)).0,
        200
    );
    assert_eq!(ok_device.digits(), Err(404));
}

#[test]
fn two_deploys_at_once_end_on_the_newest_generation_everywhere() {
    let dir = bed("deploys-at-once");
    let (fleet, device) = fleet_with_digits(&dir.0, "dq-1");
    fleet.cli(&dir.0, &["fleet", "push", "digits-2.0.0.opb"]);
    // Two operators deploy at the same moment, each a different version.
    let deploys: Vec<_> = ["digits@2.0.0", "digits@1.0.0"]
        .into_iter()
        .map(|what| {
            let (dir, api) = (dir.0.clone(), fleet.api.clone());
            std::thread::spawn(move || {
                ok(
                    &dir,
                    &["fleet", "deploy", what, "--device", "dq-1", "--fleet", &api],
                )
            })
        })
        .collect();
    for d in deploys {
        d.join().unwrap();
    }
    // Both got a generation; the fleet's desired state is the newer one's, and the device ends
    // on it: accepted, applied, serving its version, in sync.
    let view = fleet.device("dq-1").unwrap();
    let newest = view["desired_generation"].as_u64().unwrap();
    let version = view["desired"]["digits"].as_str().unwrap().to_owned();
    eventually(secs(60), "the device on the newest generation", || {
        let v = fleet.device("dq-1")?;
        (v["reported"]["generation"].as_u64() == Some(newest) && v["in_sync"] == true).then_some(())
    });
    assert_eq!(device.digits(), Ok(version));
}
