//! Staged rollouts with health gates, as real processes on loopback: a fleet and five devices
//! serving traffic all along, a good version rolled out in three stages (the fleet killed with
//! `-9` between two of them), a bad one stopped at its first stage and rolled back, a gate that
//! never gets its data pausing the rollout, and pause, resume and abort by an operator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

mod support;
use support::*;

const DEVICES: [&str; 5] = ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5"];

/// Keyed digits requests to every device, round and round, until `stop`.
fn traffic(urls: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for url in &urls {
                let mut request = outpost_testkit::digits_request(&[1.0; 64]);
                request["parameters"] = serde_json::json!({"route_key": format!("k{sent}")});
                outpost_testkit::post_json(&format!("{url}/v2/models/digits/infer"), &request);
                sent += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        sent
    })
}

fn rollout(fleet: &Fleet, id: u64) -> Value {
    let (status, r) = outpost_testkit::get_json(&format!("{}/api/v1/rollouts/{id}", fleet.api));
    assert_eq!(status, 200, "{r}");
    r
}

fn history(r: &Value) -> Vec<String> {
    r["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["text"].as_str().unwrap().to_owned())
        .collect()
}

fn active(fleet: &Fleet, id: &str) -> Option<String> {
    fleet.reported(id)?["active"]["digits"]
        .as_str()
        .map(str::to_owned)
}

fn start(fleet: &Fleet, dir: &Path, args: &[&str]) -> u64 {
    let mut all = vec!["fleet", "rollout", "start"];
    all.extend(args);
    all.push("--json");
    let out = fleet.cli(dir, &all);
    serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap()
}

fn wait_state(fleet: &Fleet, id: u64, state: &str) -> Value {
    eventually(secs(120), &format!("rollout {id} {state}"), || {
        let r = rollout(fleet, id);
        (r["state"]["state"] == state).then_some(r)
    })
}

#[test]
fn staged_rollouts_complete_stop_at_a_bad_stage_pause_without_data_and_survive_a_kill_9() {
    let d = bed("rollout");
    let dir = &d.0;
    std::fs::write(dir.join("digits-3.0.0.opb"), failing_digits(dir, "3.0.0")).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mqtt = format!("127.0.0.1:{}", free_port());
    let args = ["--listen", listen.as_str(), "--mqtt-listen", mqtt.as_str()];
    let mut fleet = Fleet::launch(dir, &args);
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|id| Device::start(dir, &device_config(dir, id, &fleet.broker, &["lab"])))
        .collect();
    online(&fleet, &DEVICES);
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--tag", "lab"], &DEVICES);
    for v in ["2.0.0", "3.0.0"] {
        fleet.cli(dir, &["fleet", "push", &format!("digits-{v}.opb")]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(
        devices.iter().map(|d| d.url.clone()).collect(),
        Arc::clone(&stop),
    );
    // Telemetry of the version being replaced, for the relative gate's baseline.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let gated = [
        "--tag",
        "lab",
        "--stages",
        "1,40%,100%",
        "--soak",
        "1s",
        "--gate",
        "error_rate<=0.05",
        "--gate",
        "p95_latency<=10x",
        "--window",
        "5s",
        "--min-requests",
        "20",
        "--deadline",
        "60s",
    ];

    // 1. A good version, stage by stage; the fleet killed with -9 once stage 2 is deployed.
    let mut good = vec!["digits@2.0.0"];
    good.extend(gated);
    let id = start(&fleet, dir, &good);
    eventually(secs(120), "stage 2 deployed", || {
        history(&rollout(&fleet, id))
            .iter()
            .any(|h| h.starts_with("stage 2: deployed"))
            .then_some(())
    });
    drop(fleet); // kill -9
    fleet = Fleet::launch(dir, &args);
    let r = wait_state(&fleet, id, "succeeded");
    let h = history(&r);
    for needle in [
        "stage 1: deployed 2.0.0 to dev-1 (1 of 5",
        "stage 2: deployed 2.0.0 to dev-2 (2 of 5",
        "stage 3: deployed 2.0.0 to dev-3, dev-4, dev-5 (5 of 5",
        "gate passed: error_rate",
        "gate passed: p95_latency",
        "(10× the replaced version's",
        "succeeded: 2.0.0 on 5 of 5",
    ] {
        assert!(
            h.iter().any(|l| l.contains(needle)),
            "{needle:?} not in {h:#?}"
        );
    }
    eprintln!("good rollout:\n  {}", h.join("\n  "));
    eventually(secs(60), "2.0.0 active everywhere", || {
        DEVICES
            .iter()
            .all(|id| active(&fleet, id).as_deref() == Some("2.0.0"))
            .then_some(())
    });

    // 2. A bad version: stopped at its first stage by the error-rate gate, dev-1 rolled back,
    //    the other devices never see it.
    let mut bad = vec!["digits@3.0.0"];
    bad.extend(gated);
    let id = start(&fleet, dir, &bad);
    let r = wait_state(&fleet, id, "rolled_back");
    let h = history(&r);
    assert!(
        h.iter()
            .any(|l| l.starts_with("aborted: stage 1: gate error_rate")),
        "{h:#?}"
    );
    assert!(
        h.iter().any(|l| l.contains("rolled back: dev-1 to 2.0.0")),
        "{h:#?}"
    );
    assert_eq!(r["reached"], serde_json::json!(["dev-1"]));
    eprintln!("bad rollout:\n  {}", h.join("\n  "));
    eventually(secs(60), "dev-1 back on 2.0.0", || {
        (active(&fleet, "dev-1").as_deref() == Some("2.0.0")).then_some(())
    });
    for id in &DEVICES[1..] {
        let installed = fleet.reported(id).unwrap()["installed"].clone();
        assert!(
            !installed.to_string().contains("3.0.0"),
            "{id} saw 3.0.0: {installed}"
        );
    }

    // 2b. The same version as a device canary in the first stage: dev-1 routes half of its
    //     keyed traffic to 3.0.0, rolls it back by itself, and that fails the stage.
    let id = start(
        &fleet,
        dir,
        &[
            "digits@3.0.0",
            "--tag",
            "lab",
            "--stages",
            "1,100%",
            "--soak",
            "1s",
            "--canary",
            r#"{"percent": 50, "min_requests": 10, "window_s": 3}"#,
            "--deadline",
            "60s",
        ],
    );
    let r = wait_state(&fleet, id, "rolled_back");
    let h = history(&r);
    eprintln!("canary rollout:\n  {}", h.join("\n  "));
    assert!(
        h.iter()
            .any(|l| l.contains("deployed 3.0.0 as a canary (50% of their traffic) to dev-1")),
        "{h:#?}"
    );
    assert!(
        h.iter().any(|l| l
            .starts_with("aborted: stage 1: dev-1 rolled back its canary of 3.0.0: error rate")),
        "{h:#?}"
    );
    let events = fleet.records("events", "dev-1");
    assert!(
        events
            .iter()
            .any(|e| e["body"]["event"] == "canary_rolled_back"
                && e["body"]["policy"] == format!("rollout-{id}-1").as_str()),
        "no canary event from dev-1"
    );
    assert_eq!(active(&fleet, "dev-1").as_deref(), Some("2.0.0"));
    eventually(secs(60), "dev-1 reports no policy", || {
        fleet.reported("dev-1").unwrap()["policies"]
            .as_object()
            .is_some_and(|p| p.is_empty())
            .then_some(())
    });

    // 2c. With --pause-on-failure the failed stage waits for an operator instead; abort then
    //     rolls it back.
    let mut paused = bad.clone();
    paused.push("--pause-on-failure");
    let id = start(&fleet, dir, &paused);
    let r = wait_state(&fleet, id, "paused");
    let reason = r["state"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("failed: gate error_rate 1.0000"),
        "{reason}"
    );
    assert_eq!(active(&fleet, "dev-1").as_deref(), Some("3.0.0"));
    let out = fleet.cli(dir, &["fleet", "rollout", "abort", &id.to_string()]);
    assert!(out.contains("rolled back: dev-1 to 2.0.0"), "{out}");
    eventually(secs(60), "dev-1 back on 2.0.0 after the abort", || {
        (active(&fleet, "dev-1").as_deref() == Some("2.0.0")).then_some(())
    });

    // 3. A gate that never gets enough data pauses the rollout instead of passing.
    let id = start(
        &fleet,
        dir,
        &[
            "digits@1.0.0",
            "--tag",
            "lab",
            "--stages",
            "1,100%",
            "--soak",
            "1s",
            "--gate",
            "error_rate<=0.05",
            "--min-requests",
            "100000000",
            "--deadline",
            "8s",
        ],
    );
    let r = wait_state(&fleet, id, "paused");
    let reason = r["state"]["reason"].as_str().unwrap();
    assert!(reason.contains("no data is not a pass"), "{reason}");
    assert!(reason.contains("of 100000000 requests"), "{reason}");
    assert_eq!(r["reached"].as_array().unwrap().len(), 1, "{r}");
    // A deploy by hand of the model would be undone by the rollout: refused while it runs.
    let e = fails(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--tag",
            "lab",
            "--fleet",
            &fleet.api,
        ],
    );
    assert!(
        e.contains(&format!("rollout {id} of digits is not finished")),
        "{e}"
    );

    // 4. Resume, pause and abort by an operator: abort rolls back what it reached.
    let out = fleet.cli(dir, &["fleet", "rollout", "resume", &id.to_string()]);
    assert!(out.contains("progressing"), "{out}");
    let out = fleet.cli(dir, &["fleet", "rollout", "pause", &id.to_string()]);
    assert!(out.contains("paused by an operator"), "{out}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(rollout(&fleet, id)["reached"].as_array().unwrap().len(), 1);
    let out = fleet.cli(dir, &["fleet", "rollout", "abort", &id.to_string()]);
    assert!(out.contains("rolled back: dev-1 to 2.0.0"), "{out}");
    let r = rollout(&fleet, id);
    assert_eq!(r["state"]["state"], "rolled_back", "{r}");
    // A finished rollout takes no more operations; an unknown operation is refused.
    let e = fails(
        dir,
        &[
            "fleet",
            "rollout",
            "resume",
            &id.to_string(),
            "--fleet",
            &fleet.api,
        ],
    );
    assert!(
        e.contains("cannot resume it (only a paused rollout resumes)"),
        "{e}"
    );
    eventually(secs(60), "dev-1 back on 2.0.0 again", || {
        (active(&fleet, "dev-1").as_deref() == Some("2.0.0")).then_some(())
    });

    // 5. A good canary stage: gated on the candidate's share, then activated on its device
    //    when the next stage begins.
    let id = start(
        &fleet,
        dir,
        &[
            "digits@1.0.0",
            "--tag",
            "lab",
            "--stages",
            "1,100%",
            "--soak",
            "1s",
            "--canary",
            r#"{"percent": 50, "min_requests": 10, "max_p95_ratio": 20, "window_s": 3}"#,
            "--gate",
            "error_rate<=0.05",
            "--window",
            "5s",
            "--min-requests",
            "10",
            "--deadline",
            "60s",
        ],
    );
    let r = wait_state(&fleet, id, "succeeded");
    let h = history(&r);
    eprintln!("good canary rollout:\n  {}", h.join("\n  "));
    for needle in [
        "stage 1: deployed 1.0.0 as a canary (50% of their traffic) to dev-1",
        "stage 1: gate passed: error_rate 0.0000",
        "stage 2: activated 1.0.0 on its canaries (dev-1)",
        "succeeded: 1.0.0 on 5 of 5",
    ] {
        assert!(
            h.iter().any(|l| l.contains(needle)),
            "{needle:?} not in {h:#?}"
        );
    }
    eventually(secs(60), "1.0.0 active everywhere", || {
        DEVICES
            .iter()
            .all(|id| active(&fleet, id).as_deref() == Some("1.0.0"))
            .then_some(())
    });
    let list = fleet.cli(dir, &["fleet", "rollout", "status"]);
    assert_eq!(list.lines().count(), 6, "{list}");

    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    eprintln!(
        "rollouts: good in 3 stages across a fleet kill -9, bad stopped at stage 1, no-data paused; {sent} requests served meanwhile"
    );
}
