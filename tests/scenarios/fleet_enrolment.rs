//! Registration by enrolment, as an operator does it: `outpost fleet enroll` issues a device
//! its broker login and prints its configuration, `revoke` cuts it off; on the embedded broker
//! and on Mosquitto with the ACL file the docs give (`docs/mosquitto/outpost.acl`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use support::raw::*;
use support::*;

fn fleet_metric(fleet: &Fleet, name: &str) -> u64 {
    metric(&fleet.api, name).unwrap_or(0)
}

#[test]
fn only_enrolled_devices_join_and_a_revoked_one_is_cut_off_at_once() {
    let d = bed("enrolment");
    let dir = &d.0;
    let fleet = Fleet::launch(dir, &["--require-enrolment"]);
    // A password file that cannot be written is found out before the fleet issues anything.
    let err = fails(
        dir,
        &[
            "fleet",
            "enroll",
            "dev-z",
            "--password-out",
            "no-such-dir/dev-z.pw",
            "--fleet",
            &fleet.api,
        ],
    );
    assert!(err.contains("cannot write"), "{err}");
    assert!(
        fleet.device("dev-z").is_none(),
        "enrolled without its password kept"
    );
    let section = enroll(&fleet, dir, "dev-e");
    assert!(section.contains("username = \"dev-e\""), "{section}");
    let password = std::fs::read_to_string(dir.join("dev-e.pw")).unwrap();
    assert_eq!(password.trim().len(), 64, "{password}");
    assert!(
        !section.contains(password.trim()),
        "the password is printed into the configuration"
    );
    let enrolled = Device::start(dir, &enrolled_config(dir, "dev-e", &section));
    // A device that was never enrolled, tagged like the enrolled one: it cannot log in, is
    // never registered, and so cannot make a deployment to the tag fail.
    let ghost = Device::start(dir, &device_config(dir, "dev-x", &fleet.broker, &["lab"]));
    online(&fleet, &["dev-e"]);
    push_and_deploy_digits(|args| fleet.cli(dir, args), &["--tag", "lab"], &["dev-e"]);
    assert_eq!(enrolled.digits(), Ok("1.0.0".into()));
    assert!(
        fleet.device("dev-x").is_none(),
        "a device registered without enrolment"
    );
    assert_eq!(ghost.digits(), Err(404));
    eventually(secs(30), "the ghost's logins refused", || {
        (fleet_metric(&fleet, "outpost_fleet_mqtt_refused_logins_total") > 0).then_some(())
    });
    let listed = fleet.cli(dir, &["fleet", "devices", "--json"]);
    assert!(listed.contains("\"enrolled\": true") || listed.contains("\"enrolled\":true"));

    // Revoked: the connection is closed at once, the device shown offline, and it cannot come
    // back; it goes on serving what it has.
    let out = fleet.cli(dir, &["fleet", "revoke", "dev-e"]);
    assert!(out.contains("revoked dev-e"), "{out}");
    eventually(secs(10), "the revoked device's connection closed", || {
        (fleet_metric(&fleet, "outpost_fleet_mqtt_revoked_total") >= 1).then_some(())
    });
    let device = fleet.device("dev-e").unwrap();
    assert_eq!(device["online"], false, "{device}");
    assert_eq!(device["enrolled"], false, "{device}");
    let refused = fleet_metric(&fleet, "outpost_fleet_mqtt_refused_logins_total");
    eventually(
        secs(30),
        "the revoked device refused when it reconnects",
        || {
            (fleet_metric(&fleet, "outpost_fleet_mqtt_refused_logins_total") > refused)
                .then_some(())
        },
    );
    assert_eq!(enrolled.digits(), Ok("1.0.0".into()));

    // Enrolled again: a new password, and the device, restarted with it, is back.
    drop(enrolled);
    let section = enroll(&fleet, dir, "dev-e");
    let back = Device::start(dir, &enrolled_config(dir, "dev-e", &section));
    online(&fleet, &["dev-e"]);
    assert_eq!(back.digits(), Ok("1.0.0".into()));
}

/// Runs `mosquitto_passwd ARGS`.
fn mosquitto_passwd(args: &[&str]) {
    let status = Command::new("mosquitto_passwd")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "mosquitto_passwd {args:?}");
}

#[test]
fn mosquitto_with_the_documented_acl_confines_each_device_to_its_own_topics() {
    let d = bed("mosquitto-acl");
    let dir = &d.0;
    let passwords = dir.join("outpost.passwd");
    let passwords = passwords.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", passwords, "fleet/primary", "pw-fleet"]);
    for (user, pw) in [("dev-1", "pw-1"), ("dev-2", "pw-2"), ("dev-x", "pw-x")] {
        mosquitto_passwd(&["-b", passwords, user, pw]);
    }
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/mosquitto/outpost.acl");
    let broker = Mosquitto::start_with(
        dir,
        &format!(
            "allow_anonymous false\npassword_file {passwords}\nacl_file {}\n\
             use_username_as_clientid true\n",
            acl.display()
        ),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], broker.port));
    assert_ne!(connack(addr, b"anyone", None), Some(ACCEPTED));
    assert_ne!(
        connack(addr, b"outpost-dev-1", Some(("dev-1", "wrong"))),
        Some(ACCEPTED)
    );

    // What one device's login may not do, tried with raw packets.
    let mut watcher = session(addr, "outpost-fleet-watch", ("fleet/primary", "pw-fleet"));
    assert_eq!(suback_code(&mut watcher, "outpost/v1/#"), Some(1));
    // Mosquitto grants any subscription but delivers only what the login may read; and it
    // drops what a login may not write.
    let mut dev1 = session(addr, "outpost-dev-1", ("dev-1", "pw-1"));
    for filter in [
        "#",
        "outpost/v1/+/telemetry",
        "outpost/v1/dev-2/desired",
        "outpost/v1/dev-1/desired",
    ] {
        assert!(suback_code(&mut dev1, filter).is_some(), "{filter}");
    }
    let mut dev2 = session(addr, "outpost-dev-2", ("dev-2", "pw-2"));
    for topic in [
        "outpost/v1/dev-2/telemetry",
        "outpost/v1/dev-1/desired",
        "outpost/v1/_fleet/primary/status",
    ] {
        publish(&mut dev1, topic, b"forged");
    }
    publish(&mut dev1, "outpost/v1/dev-1/telemetry", b"genuine");
    let (topic, payload) = next_publish(&mut watcher).unwrap();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("outpost/v1/dev-1/telemetry", &b"genuine"[..]),
        "a forged message got through"
    );
    // dev-1 received dev-2's telemetry through none of its subscriptions: the first message
    // it gets is its own desired state, published by the fleet.
    publish(&mut watcher, "outpost/v1/dev-1/desired", b"for dev-1");
    let (topic, _) = next_publish(&mut dev1).unwrap();
    assert_eq!(
        topic, "outpost/v1/dev-1/desired",
        "a device read another's topic"
    );
    // Another device's client id does not take over its session.
    let _thief = session(addr, "outpost-dev-2", ("dev-1", "pw-1"));
    assert_eq!(suback_code(&mut dev2, "outpost/v1/dev-2/desired"), Some(1));
    drop((dev1, dev2, watcher));

    // The fleet on that broker, with enrolment: an enrolled device joins once its password is
    // in Mosquitto's file; one with a broker login but no enrolment is not registered.
    std::fs::write(dir.join("fleet.pw"), "pw-fleet\n").unwrap();
    let fleet = Fleet::launch(
        dir,
        &[
            "--broker",
            &broker.url(),
            "--broker-username",
            "fleet/primary",
            "--broker-password-file",
            "fleet.pw",
            "--require-enrolment",
            "--mqtt-share-group",
            "g-7f3a9c1e5b",
        ],
    );
    // A device login in the fleet's default shared groups: Mosquitto's ACL does not check
    // subscriptions, so there it would take a share of every device's records (which its read
    // ACL then drops); the fleet's own group name keeps it out.
    let mut thief = session(addr, "outpost-dev-2", ("dev-2", "pw-2"));
    for leaf in ["telemetry", "events"] {
        let filter = format!("$share/outpost-fleet-{leaf}/outpost/v1/+/{leaf}");
        assert!(suback_code(&mut thief, &filter).is_some());
    }
    let section = enroll(&fleet, dir, "dev-1");
    let password = std::fs::read_to_string(dir.join("dev-1.pw")).unwrap();
    mosquitto_passwd(&["-b", passwords, "dev-1", password.trim()]);
    broker.reload();
    let device = Device::start(dir, &enrolled_config(dir, "dev-1", &section));
    let stray = dir.join("dev-x.pw");
    std::fs::write(&stray, "pw-x\n").unwrap();
    let config = device_config(dir, "dev-x", &broker.url(), &["lab"]);
    let mut text = std::fs::read_to_string(dir.join(&config)).unwrap();
    text.push_str("username = \"dev-x\"\npassword_file = \"dev-x.pw\"\n");
    std::fs::write(dir.join(&config), text).unwrap();
    let _stray = Device::start(dir, &config);
    online(&fleet, &["dev-1"]);
    push_and_deploy_digits(|args| fleet.cli(dir, args), &["--tag", "lab"], &["dev-1"]);
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    eventually(secs(30), "the stray device's messages ignored", || {
        (fleet_metric(&fleet, "outpost_fleet_unenrolled_total") > 0).then_some(())
    });
    assert!(
        fleet.device("dev-x").is_none(),
        "registered without enrolment"
    );
    // Every record dev-1 sent reached the fleet: sequence numbers (one series over telemetry
    // and events) without a gap.
    let records = eventually(secs(30), "dev-1's telemetry stored", || {
        let records = fleet.records("telemetry", "dev-1");
        (records.len() >= 20).then_some(records)
    });
    let events = fleet.records("events", "dev-1");
    let last = records
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let mut seqs: Vec<u64> = records
        .iter()
        .chain(&events)
        .map(|r| r["seq"].as_u64().unwrap())
        .filter(|&s| s <= last)
        .collect();
    seqs.sort_unstable();
    let first = seqs[0];
    assert!(
        seqs.iter().enumerate().all(|(i, &s)| s == first + i as u64),
        "records lost: {seqs:?}"
    );
    drop(thief);
}
