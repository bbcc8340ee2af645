//! Power loss on a fleet-managed device: the device is killed with SIGKILL at a random moment
//! while its agent receives a desired state, downloads the bundle, installs and activates it,
//! and all along writes telemetry to its outbox and publishes it. After each restart it must
//! serve exactly the old or the new version and go on to the desired one; at the end the
//! fleet must hold every sequence number once, with no gap and no two different records under
//! one number (a record the fleet has seen is never lost to a crash, nor its number reused).
//! Rounds: 10 here, `OUTPOST_CRASH_ROUNDS` (`.ci/soak` runs 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

/// A small xorshift, seeded from the clock: the moments of the kills.
fn random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn a_kill_9_during_agent_deploys_and_telemetry_loses_no_version_and_no_record() {
    let rounds = crash_rounds(10);
    let d = bed("fleet-power-loss");
    let dir = &d.0;
    let fleet = Fleet::start(dir, None, None);
    let config = device_config(dir, "dev-p", &fleet.broker, &[]);
    let mut device = Device::start(dir, &config);
    online(&fleet, &["dev-p"]);
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--device", "dev-p"], &["dev-p"]);
    // A new version each round, so every deployment downloads, verifies, compiles and
    // records a bundle (a version already installed would only be switched to).
    push_versions(dir, &fleet, "3.0.", rounds);

    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut serving = "1.0.0".to_owned();
    let (mut before_switch, mut after_switch) = (0, 0);
    for round in 0..rounds {
        let target = format!("3.0.{round}");
        let target = target.as_str();
        fleet.cli(
            dir,
            &[
                "fleet",
                "deploy",
                &format!("digits@{target}"),
                "--device",
                "dev-p",
            ],
        );
        // Delivery, download, install and activation take about half a second on this
        // machine: kill somewhere in them (or just after).
        let delay = random(&mut rng) % 800;
        std::thread::sleep(Duration::from_millis(delay));
        device.proc.kill9();
        drop(device);

        device = Device::start(dir, &config);
        let now = device
            .digits()
            .unwrap_or_else(|code| panic!("round {round}: nothing serves after the kill ({code})"));
        assert!(
            now == serving || now == target,
            "round {round}: serves {now}, neither {serving} nor {target}"
        );
        eprintln!("round {round}: killed after {delay} ms, serving {now}");
        if now == target {
            after_switch += 1;
        } else {
            before_switch += 1;
        }
        // The agent finishes the deployment after the restart.
        eventually(secs(60), "the desired version after the restart", || {
            (device.digits().as_deref() == Ok(target)).then_some(())
        });
        serving = target.to_owned();
    }

    // Everything the device wrote reaches the fleet.
    eventually(secs(60), "the outbox drained", || {
        (device.metric("outpost_outbox_records") == Some(0)).then_some(())
    });
    let last = assert_records_each_once(&fleet, "dev-p");
    assert_eq!(
        metric(&fleet.api, "outpost_fleet_conflicting_records_total"),
        Some(0),
        "two different records under one number"
    );
    eprintln!(
        "{rounds} kills during agent deploys: {before_switch} before the switch, \
         {after_switch} after; {last} records, each once, none missing"
    );
}

/// The fleet manager killed with SIGKILL at a random moment of a deployment (the API call,
/// signing, storing, publishing) or just after the API acknowledged it: after its restart a
/// deployment it acknowledged is never lost, the device ends on the version last acknowledged,
/// and it never refuses a desired state. Rounds: 6 here, `OUTPOST_CRASH_ROUNDS` (`.ci/soak` runs 100).
#[test]
fn a_kill_9_of_the_fleet_mid_deploy_loses_no_acknowledged_deployment() {
    let rounds = crash_rounds(6);
    let d = bed("fleet-kill");
    let dir = &d.0;
    // The broker outlives the fleet; the API keeps its port (devices download from it).
    let broker = Mosquitto::start(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--broker", &broker.url(), "--listen", &listen];
    let mut fleet = Fleet::launch(dir, &args);
    let config = device_config(dir, "dev-k", &broker.url(), &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-k"]);
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--device", "dev-k"], &["dev-k"]);
    push_versions(dir, &fleet, "4.0.", rounds);

    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut acknowledged_version = "1.0.0".to_owned();
    let (mut acked, mut cut_off) = (0, 0);
    for round in 0..rounds {
        let target = format!("4.0.{round}");
        let api = fleet.api.clone();
        let deploy = {
            let (dir, target) = (dir.to_path_buf(), target.clone());
            std::thread::spawn(move || {
                bin()
                    .args(["fleet", "deploy", &format!("digits@{target}")])
                    .args(["--device", "dev-k", "--fleet", &api])
                    .current_dir(dir)
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
        };
        // Even rounds: killed just after the API acknowledged (the case that must never
        // lose anything). Odd rounds: at a random moment of the call, which takes some tens of
        // milliseconds (before, during or after it).
        let delay = random(&mut rng) % 80;
        let ok = if round % 2 == 0 {
            let ok = deploy.join().unwrap();
            std::thread::sleep(Duration::from_millis(delay / 8));
            drop(fleet);
            ok
        } else {
            std::thread::sleep(Duration::from_millis(delay));
            drop(fleet);
            deploy.join().unwrap()
        };
        assert!(ok || round % 2 == 1, "round {round}: the deploy failed");
        fleet = Fleet::launch(dir, &args);
        if ok {
            acked += 1;
            acknowledged_version = target.clone();
        } else {
            cut_off += 1;
        }
        eprintln!("round {round}: fleet killed, deploy acknowledged: {ok}");
        // What the fleet wants now: the acknowledged version, or (cut off) possibly the new
        // one, which it may have stored before it died.
        let wanted = eventually(secs(60), "the fleet's view of dev-k", || {
            fleet.device("dev-k")
        });
        let desired = wanted["desired"]["digits"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            desired == acknowledged_version || (!ok && desired == target),
            "round {round}: the fleet wants {desired:?}; acknowledged {acknowledged_version}"
        );
        acknowledged_version = desired.clone();
        eventually(
            secs(90),
            "the device on the fleet's version, in sync",
            || {
                let in_sync = fleet.device("dev-k").is_some_and(|d| d["in_sync"] == true);
                (device.digits().as_deref() == Ok(desired.as_str()) && in_sync).then_some(())
            },
        );
    }
    eventually(secs(60), "the outbox drained", || {
        (device.metric("outpost_outbox_records") == Some(0)).then_some(())
    });
    let refused: Vec<serde_json::Value> = fleet
        .records("events", "dev-k")
        .into_iter()
        .filter(|r| r["body"]["event"] == "desired_refused")
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    eprintln!(
        "{rounds} fleet kills mid-deploy: {acked} acknowledged before the kill, {cut_off} cut \
         off; every acknowledged deployment applied, none refused"
    );
}

/// A canary set on a device of the fleet fails while the fleet is down: the device rolls it back
/// by itself at once, and the verdict reaches the fleet's events when the fleet is back.
#[test]
fn a_canary_rolled_back_while_the_fleet_is_down_reaches_the_fleet_when_it_returns() {
    let d = bed("canary-offline");
    let dir = &d.0;
    let broker = Mosquitto::start(dir);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = ["--broker", &broker.url(), "--listen", &listen];
    let fleet = Fleet::launch(dir, &args);
    let config = device_config(dir, "dev-y", &broker.url(), &[]);
    let text = std::fs::read_to_string(dir.join(&config)).unwrap().replace(
        "admin_listen = \"\"",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\nadmin_token = \"{}\"",
            outpost_testkit::ADMIN_TOKEN
        ),
    );
    std::fs::write(dir.join(&config), text).unwrap();
    let device = Device::start(dir, &config);
    let admin = admin_url(&device);
    online(&fleet, &["dev-y"]);
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--device", "dev-y"], &["dev-y"]);

    // A candidate `digits` 3.0.0 whose guest fails every request, installed beside 1.0.0.
    let r = outpost_testkit::admin(
        "POST",
        &format!("{admin}/admin/bundles"),
        &failing_digits(dir, "3.0.0"),
    );
    assert_eq!(r.status, 201, "{}", r.text());

    drop(fleet); // kill -9
    let policy = serde_json::json!({"canary": {"id": "c-off", "candidate": "3.0.0",
        "percent": 50, "min_requests": 20}});
    let r = outpost_testkit::admin(
        "PUT",
        &format!("{admin}/admin/models/digits/policy"),
        policy.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let events = || {
        outpost_testkit::admin("GET", &format!("{admin}/admin/events"), b"").json()["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let mut sent = 0;
    while events().is_empty() && sent < 1_000 {
        for _ in 0..10 {
            sent += 1;
            let mut request = outpost_testkit::digits_request(&[1.0; 64]);
            request["parameters"] = serde_json::json!({"route_key": format!("user-{sent}")});
            outpost_testkit::post_json(&format!("{}/v2/models/digits/infer", device.url), &request);
        }
    }
    let local = events();
    assert_eq!(local.len(), 1, "{local:?} after {sent} requests");
    assert_eq!(local[0]["event"], "canary_rolled_back");
    assert!((0..20).all(|_| device.digits() == Ok("1.0.0".into())));

    let fleet = Fleet::launch(dir, &args);
    let at_fleet = eventually(secs(60), "the verdict at the fleet", || {
        fleet
            .records("events", "dev-y")
            .into_iter()
            .find(|r| r["body"]["event"] == "canary_rolled_back")
    });
    assert_eq!(at_fleet["body"]["policy"], "c-off");
    assert_eq!(at_fleet["body"]["reason"], local[0]["reason"]);
    eprintln!(
        "canary rolled back with the fleet down after {sent} requests; at the fleet on its return: {}",
        at_fleet["body"]["reason"]
    );
}
