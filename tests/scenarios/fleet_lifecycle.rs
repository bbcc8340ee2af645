//! A fleet's life, as real processes on loopback: killed and restarted with its devices
//! serving on, and a decommissioned device forgotten.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;

mod support;
use support::*;

#[test]
fn fleet_killed_and_restarted_keeps_its_state_and_its_devices() {
    let d = bed("restart");
    let dir = &d.0;
    let (api_port, mqtt_port) = (free_port(), free_port());
    let (api, mqtt) = (
        format!("127.0.0.1:{api_port}"),
        format!("127.0.0.1:{mqtt_port}"),
    );
    let start = || Fleet::launch(dir, &["--listen", &api, "--mqtt-listen", &mqtt]);
    let fleet = start();
    let config = device_config(dir, "dev-k", &fleet.broker, &["lab"]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-k"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--tag", "lab", "--wait"],
    );
    let key_before = fs::read(dir.join("fleet-data/fleet.key")).unwrap();
    drop(fleet); // kill -9: the embedded broker goes with it

    eventually(secs(30), "the device noticed its broker gone", || {
        (device.metric("outpost_fleet_connected") == Some(0)).then_some(())
    });
    assert_eq!(
        device.digits(),
        Ok("1.0.0".into()),
        "serving without its fleet"
    );
    let fleet = start();
    assert_eq!(
        fs::read(dir.join("fleet-data/fleet.key")).unwrap(),
        key_before
    );
    // Its registry, bundles and deployments survived; the device comes back by itself.
    let (_, bundles) = get_json(&format!("{}/api/v1/bundles", fleet.api));
    assert_eq!(bundles[0]["version"], "1.0.0");
    let (_, deployments) = get_json(&format!("{}/api/v1/deployments", fleet.api));
    assert_eq!(deployments.as_array().unwrap().len(), 1);
    let before = fleet.records("telemetry", "dev-k").len();
    eventually(secs(60), "the device back online and reporting", || {
        let d = fleet.device("dev-k")?;
        (d["online"] == true && fleet.records("telemetry", "dev-k").len() > before + 5)
            .then_some(())
    });
    // Deploying again after the restart works end to end.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--device",
            "dev-k",
            "--wait",
        ],
    );
    assert!(out.contains("dev-k: applied"), "{out}");
    assert_eq!(device.digits(), Ok("2.0.0".into()));
    let seqs: Vec<u64> = fleet
        .records("telemetry", "dev-k")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len());
}

#[test]
fn a_decommissioned_device_is_forgotten() {
    let d = bed("forget");
    let dir = &d.0;
    let (fleet, mut device) = fleet_with_digits(dir, "dev-f");
    assert!(retained_now(&fleet.broker, "outpost/v1/dev-f/desired").is_some());
    device.proc.kill9();
    let out = fleet.cli(dir, &["fleet", "forget", "dev-f"]);
    assert!(out.contains("forgot dev-f"), "{out}");
    assert!(fleet.device("dev-f").is_none());
    assert!(fleet.devices().is_empty());
    eventually(secs(10), "retained messages cleared", || {
        ["desired", "status", "reported"]
            .iter()
            .all(|leaf| retained_now(&fleet.broker, &format!("outpost/v1/dev-f/{leaf}")).is_none())
            .then_some(())
    });
    // Its last will (the broker publishes it when the connection drops, possibly after the
    // forget) neither registers it again nor stays retained.
    throughout(secs(2), "dev-f forgotten, its status not retained", || {
        retained_now(&fleet.broker, "outpost/v1/dev-f/status").is_none()
            && get_json(&format!("{}/api/v1/devices/dev-f", fleet.api)).0 == 404
    });
    let out = bin()
        .args(["fleet", "forget", "dev-f", "--fleet", &fleet.api])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    // Its history stays until retention removes it.
    assert!(!fleet.records("telemetry", "dev-f").is_empty());
}
