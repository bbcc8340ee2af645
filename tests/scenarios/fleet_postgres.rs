//! The fleet on PostgreSQL (`fleet serve --database`), as real processes on loopback: a
//! throwaway PostgreSQL from Debian's package (initdb + pg_ctl as an unprivileged user),
//! Mosquitto or the embedded broker, `outpost device run` agents. Replicas on one database
//! each answer the whole API; the database going away mid-run loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::Value;

mod support;
use outpost_testkit::postgres::Postgres;
use support::*;

/// The sequence numbers stored for `device` (telemetry and events share them).
fn seqs(fleet: &Fleet, device: &str) -> BTreeSet<u64> {
    let mut records = fleet.records("telemetry", device);
    records.extend(fleet.records("events", device));
    records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// Every sequence number from the first stored up to `max - slack` is stored.
fn no_gaps(seqs: &BTreeSet<u64>, slack: u64) -> Result<(), String> {
    let (Some(&min), Some(&max)) = (seqs.first(), seqs.last()) else {
        return Err("no records".into());
    };
    match (min..=max.saturating_sub(slack)).find(|s| !seqs.contains(s)) {
        Some(missing) => Err(format!("record {missing} of {min}..={max} is missing")),
        None => Ok(()),
    }
}

#[test]
fn two_replicas_on_one_database_each_answer_the_whole_api() {
    let Some(pg) = Postgres::start_or_skip("two replicas on one database") else {
        return;
    };
    let d = bed("pg-replicas");
    let dir = &d.0;
    let database = pg.database().unwrap();
    let broker = Mosquitto::start(dir);
    let url = broker.url();
    // One data directory (the fleet key and the bundle files), as a shared volume would be.
    let replica = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "--database",
            database.as_str(),
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
    let devices: Vec<Device> = ["dev-a", "dev-b"]
        .iter()
        .map(|id| Device::start(dir, &device_config(dir, id, &url, &["lab"])))
        .collect();
    online(&one, &["dev-a", "dev-b"]);
    online(&two, &["dev-a", "dev-b"]);

    one.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let out = one.cli(
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
    for device in &devices {
        assert_eq!(device.digits(), Ok("1.0.0".into()));
    }

    // The secondary sees what the primary wrote: bundles, deployments, desired states.
    let (status, bundles) = get_json(&format!("{}/api/v1/bundles", two.api));
    assert_eq!(status, 200);
    let digest = bundles[0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(bundles[0]["version"], "1.0.0");
    let (_, deployments) = get_json(&format!("{}/api/v1/deployments", two.api));
    assert_eq!(deployments.as_array().unwrap().len(), 1, "{deployments}");
    eventually(secs(30), "both devices in sync on the secondary", || {
        let (_, list) = get_json(&format!("{}/api/v1/devices?in_sync=true", two.api));
        (list.as_array().map(Vec::len) == Some(2)).then_some(())
    });
    let artifact = outpost_testkit::get(&format!("{}/artifacts/{digest}", two.api));
    assert_eq!(
        artifact.status, 200,
        "the secondary serves the bundle files too"
    );

    // The replicas split the telemetry between them (shared subscriptions) and store it in one
    // database: each answers with all of it.
    let (a, b) = eventually(secs(60), "a run of telemetry on both", || {
        let (a, b) = (seqs(&one, "dev-a"), seqs(&two, "dev-a"));
        (a.len() >= 40 && b.len() >= 40).then_some((a, b))
    });
    no_gaps(&a, 10).unwrap();
    no_gaps(&b, 10).unwrap();
    let common = a.len().min(b.len());
    assert!(
        a.iter().take(common).eq(b.iter().take(common)),
        "the replicas answer with different records"
    );
    // Still refused by the secondary: it does not own deployments (until the role moves).
    let (status, _) = get_json(&format!("{}/api/v1/fleet", two.api));
    assert_eq!(status, 200);
}

#[test]
fn the_database_going_away_mid_run_loses_nothing_and_comes_back_by_itself() {
    let Some(pg) = Postgres::start_or_skip("database outage") else {
        return;
    };
    let d = bed("pg-outage");
    let dir = &d.0;

    // Unreachable at start: a clear error, not a hang.
    let closed = free_port();
    let out = fails(
        dir,
        &[
            "fleet",
            "serve",
            "--database",
            &format!("postgres://outpost@127.0.0.1:{closed}/fleet"),
            "--data-dir",
            "refused-data",
            "--listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        out.contains(&format!(
            "cannot use the postgres at 127.0.0.1:{closed}/fleet"
        )),
        "{out}"
    );

    let database = pg.database().unwrap();
    let fleet = Fleet::launch(dir, &["--database", &database]);
    let _device = Device::start(dir, &device_config(dir, "dev-a", &fleet.broker, &[]));
    online(&fleet, &["dev-a"]);
    eventually(secs(60), "telemetry stored", || {
        (seqs(&fleet, "dev-a").len() >= 10).then_some(())
    });
    let ready = |fleet: &Fleet| get_json(&format!("{}/readyz", fleet.api)).0;
    assert_eq!(ready(&fleet), 200);

    pg.kill().unwrap();
    let (status, body) = get_json(&format!("{}/api/v1/devices", fleet.api));
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("database:"),
        "{body}"
    );
    assert_eq!(ready(&fleet), 503);
    let (status, _) = get_json(&format!("{}/healthz", fleet.api));
    assert_eq!(status, 200, "the process itself is alive");
    // The device goes on sending meanwhile; nothing is acknowledged, so nothing is lost.
    std::thread::sleep(secs(4));
    pg.start_again().unwrap();

    eventually(secs(60), "ready again", || {
        (ready(&fleet) == 200).then_some(())
    });
    let before_outage_and_after = eventually(secs(60), "the backlog stored", || {
        let stored = seqs(&fleet, "dev-a");
        // 100 ms telemetry: the 4 s outage alone is some 40 records.
        (stored.len() >= 70 && no_gaps(&stored, 10).is_ok()).then_some(stored)
    });
    no_gaps(&before_outage_and_after, 10).unwrap();
    // It was the fleet that held the messages, and said so.
    let log = fleet._proc.log.lock().unwrap().join("\n");
    assert!(log.contains("holding messages unacknowledged"), "{log}");
    assert!(log.contains("the store answers again"), "{log}");
    let (status, devices) = get_json(&format!("{}/api/v1/devices", fleet.api));
    assert_eq!(status, 200);
    assert_eq!(devices[0]["id"], "dev-a", "{devices}");
    let _: Value = devices;
}

/// Watches every device's desired topic on `broker`: (device, generation) to each distinct
/// signed payload seen.
type Seen =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<(String, u64), BTreeSet<String>>>>;

fn watch_desired(broker: &str) -> Seen {
    let seen: Seen = Default::default();
    let (client, mut connection) = mqtt_client(broker, "desired-watch");
    client
        .subscribe(
            format!("{}/+/desired", outpost_proto::PREFIX),
            rumqttc::QoS::AtLeastOnce,
        )
        .unwrap();
    let out = seen.clone();
    std::thread::spawn(move || {
        let _client = client;
        for event in connection.iter() {
            let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event else {
                if event.is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                continue;
            };
            let Ok(envelope) = outpost_proto::SignedDesired::from_slice(&p.payload) else {
                continue;
            };
            let state: Value = serde_json::from_str(&envelope.payload).unwrap();
            let key = (
                state["device"].as_str().unwrap().to_owned(),
                state["generation"].as_u64().unwrap(),
            );
            out.lock()
                .unwrap()
                .entry(key)
                .or_default()
                .insert(envelope.payload);
        }
    });
    seen
}

fn publishing(fleet: &Fleet) -> bool {
    get_json(&format!("{}/api/v1/fleet", fleet.api)).1["publishing"] == true
}

#[test]
fn the_publishing_role_moves_when_its_replica_is_killed_mid_deployment() {
    const DEVICES: usize = 200;
    let Some(pg) = Postgres::start_or_skip("publishing role failover") else {
        return;
    };
    let d = bed("pg-failover");
    let dir = &d.0;
    let database = pg.database().unwrap();
    let broker = Mosquitto::start(dir);
    let url = broker.url();
    let replica = |name: &str| {
        Fleet::launch(
            dir,
            &[
                "--database",
                database.as_str(),
                "--broker",
                url.as_str(),
                "--replica",
                name,
            ],
        )
    };
    let mut one = replica("replica-1");
    assert!(
        publishing(&one),
        "a lone replica publishes once it says it is ready"
    );
    let two = replica("replica-2");
    assert!(!publishing(&two), "one replica at a time holds the role");
    let seen = watch_desired(&url);

    let mut sim = bin()
        .current_dir(dir)
        .args([
            "fleet",
            "simulate",
            "--devices",
            &DEVICES.to_string(),
            "--fleet",
            two.api.as_str(),
            "--duration",
            "150s",
            "--interval",
            "2s",
            "--tag",
            "sim",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(secs(60), "every virtual device online on both", || {
        let count = |f: &Fleet| {
            get_json(&format!(
                "{}/api/v1/devices?status=online&limit=1000",
                f.api
            ))
            .1
            .as_array()
            .map_or(0, Vec::len)
        };
        (count(&one) == DEVICES && count(&two) == DEVICES).then_some(())
    });

    one.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    // A write sent to the replica without the role is forwarded to the one with it, and the
    // answer says who served it.
    two.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let (_, bundles) = get_json(&format!("{}/api/v1/bundles", one.api));
    assert_eq!(bundles.as_array().unwrap().len(), 2, "{bundles}");
    let refused = outpost_testkit::post_json(
        &format!("{}/api/v1/deployments", two.api),
        &serde_json::json!({ "model": "nope", "version": "9.9.9", "all": true }),
    );
    assert_eq!(
        refused.header("x-outpost-served-by"),
        Some("replica-1"),
        "{refused:?}"
    );
    assert!(
        refused.text().contains("nope 9.9.9"),
        "the holder's own answer: {}",
        refused.text()
    );

    // A deployment to every virtual device, and the replica that took it killed with -9 while
    // it stores and publishes.
    let mut deploy = bin()
        .current_dir(dir)
        .args([
            "fleet",
            "deploy",
            "digits@1.0.0",
            "--tag",
            "sim",
            "--fleet",
            one.api.as_str(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    one._proc.kill9();
    let killed = std::time::Instant::now();
    let _ = deploy.wait();
    let moved = eventually(secs(30), "the role moved to the other replica", || {
        publishing(&two).then(|| killed.elapsed())
    });
    eprintln!("the publishing role moved {moved:?} after the kill");

    // Recorded and published, or not at all.
    let (_, deployments) = get_json(&format!("{}/api/v1/deployments", two.api));
    let deployments = deployments.as_array().unwrap().clone();
    let (_, views) = get_json(&format!("{}/api/v1/devices?tag=sim&limit=1000", two.api));
    let with_desired = views
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["desired_generation"].is_null())
        .count();
    match deployments.len() {
        0 => assert_eq!(with_desired, 0, "a desired state without its deployment"),
        1 => {
            assert_eq!(
                with_desired, DEVICES,
                "a deployment recorded for some devices only"
            );
            eventually(
                secs(60),
                "the recorded deployment applied on every device",
                || {
                    let (_, behind) = get_json(&format!(
                        "{}/api/v1/devices?tag=sim&in_sync=false&limit=1000",
                        two.api
                    ));
                    (behind.as_array().map(Vec::len) == Some(0)).then_some(())
                },
            );
        }
        n => panic!("{n} deployments from one request"),
    }
    eprintln!(
        "the deployment was {} when its replica was killed",
        if deployments.is_empty() {
            "not recorded"
        } else {
            "recorded"
        }
    );

    // The new holder deploys, and every device applies it.
    let out = two.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--tag",
            "sim",
            "--wait",
            "--timeout",
            "120",
            "--json",
        ],
    );
    let out: Value = serde_json::from_str(&out).unwrap();
    // Each device as [id, state].
    let states = out["devices"].as_array().unwrap();
    assert_eq!(states.len(), DEVICES, "{out}");
    assert!(states.iter().all(|s| s[1] == "applied"), "{out}");

    // Never two different desired states under one generation.
    let seen = seen.lock().unwrap();
    assert!(
        seen.len() >= DEVICES,
        "the watcher saw {} desired states",
        seen.len()
    );
    for ((device, generation), payloads) in seen.iter() {
        assert_eq!(
            payloads.len(),
            1,
            "{device} generation {generation}: {payloads:?}"
        );
    }
    let _ = sim.kill();
    let _ = sim.wait();
}

#[test]
fn tls_to_the_database_is_verified_when_its_url_asks_for_it() {
    let Some(pg) = Postgres::start_or_skip("TLS to the database") else {
        return;
    };
    let d = bed("pg-tls");
    let dir = &d.0;
    let (ca, cert, key) = tls_files(dir, "pg");
    let database = pg.database().unwrap();
    pg.require_tls(&cert, &key).unwrap();
    let serve = |url: &str, data: &str| {
        fails(
            dir,
            &[
                "fleet",
                "serve",
                "--database",
                url,
                "--data-dir",
                data,
                "--listen",
                "127.0.0.1:0",
                "--mqtt-listen",
                "127.0.0.1:0",
            ],
        )
    };

    // Plain, to a server that takes TLS only: its refusal, by name.
    let out = serve(&database, "plain-data");
    assert!(
        out.contains("cannot use the postgres") && out.contains("no encryption"),
        "{out}"
    );
    // TLS to a certificate no system CA signed: refused, saying why.
    let out = serve(&format!("{database}?sslmode=require"), "untrusted-data");
    assert!(out.contains("UnknownIssuer"), "{out}");
    // A CA file that is not there.
    let out = serve(
        &format!("{database}?sslmode=require&sslrootcert=missing.pem"),
        "missing-data",
    );
    assert!(
        out.contains("TLS to the database (sslrootcert missing.pem)"),
        "{out}"
    );

    // With the CA that signed it: the fleet serves, every connection over TLS (the server
    // refuses any other), ingestion included.
    let url = format!("{database}?sslmode=require&sslrootcert={}", ca.display());
    let fleet = Fleet::launch(dir, &["--database", &url]);
    let (status, info) = get_json(&format!("{}/api/v1/fleet", fleet.api));
    assert_eq!(status, 200, "{info}");
    assert!(info["store"].as_str().unwrap().ends_with("(TLS)"), "{info}");
    let _device = Device::start(dir, &device_config(dir, "dev-a", &fleet.broker, &[]));
    online(&fleet, &["dev-a"]);
    eventually(secs(60), "telemetry stored over TLS", || {
        (seqs(&fleet, "dev-a").len() >= 5).then_some(())
    });
    assert!(publishing(&fleet), "the role's own connection is TLS too");
}
