//! The monitoring loop with no human in it, as real processes on loopback: drifted traffic on
//! two devices → the fleet's drift rule fires → its command (`models/digits/retrain.py`)
//! pushes the retrained bundle and starts a staged rollout whose first stage is a device canary →
//! the canary and the gates pass → both
//! devices serve the new version. The retraining itself uses a pre-built bundle here
//! (`--prebuilt`): training needs scikit-learn, and `models/digits/retrain.py` without it runs
//! the whole pipeline by hand (README, models/README.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

mod support;
use support::*;

const DEVICES: [&str; 2] = ["dev-1", "dev-2"];

fn active(fleet: &Fleet, id: &str) -> Option<String> {
    fleet.reported(id)?["active"]["digits"]
        .as_str()
        .map(str::to_owned)
}

#[test]
fn drift_fires_a_rule_that_retrains_and_rolls_the_new_version_out() {
    let d = bed("loop");
    let dir = &d.0;
    digits_with_baseline(dir, "1.1.0");
    // The "retrained" model: built ahead (the same graph; the pipeline's training step is
    // what `--prebuilt` skips).
    digits_with_baseline(dir, "1.2.0");
    let listen = format!("127.0.0.1:{}", free_port());
    let api = format!("http://{listen}");
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = outpost_testkit::models_dir().join("digits/retrain.py");
    let argv: Vec<String> = [
        python.as_str(),
        script.to_str().unwrap(),
        "--prebuilt",
        "digits-1.2.0.opb",
        "--fleet",
        &api,
        "--tag",
        "lab",
        "--stages",
        "1,100%",
        "--canary",
        // The same graph on a shared machine: latency says nothing here, errors do.
        r#"{"percent": 50, "min_requests": 10, "window_s": 3, "max_p95_ratio": 50}"#,
        "--soak",
        "1s",
        "--gate",
        "error_rate<=0.05",
        "--window",
        "5s",
        "--min-requests",
        "10",
        "--deadline",
        "90s",
        "--outpost",
        env!("CARGO_BIN_EXE_outpost"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    fs::write(
        dir.join("rules.toml"),
        format!(
            r#"
[[rule]]
name = "digits-drift"
metric = "feature_psi"
model = "digits"
version = "1.1.0"
tag = "lab"
op = ">"
threshold = 0.25
window_s = 3600
consecutive = 2
every_s = 1
min_samples = 20
[rule.command]
argv = {}
timeout_s = 60
"#,
            serde_json::to_string(&argv).unwrap()
        ),
    )
    .unwrap();
    let fleet = Fleet::launch(dir, &["--listen", &listen, "--rules", "rules.toml"]);
    let devices: Vec<Device> = DEVICES
        .iter()
        .map(|id| Device::start(dir, &device_config(dir, id, &fleet.broker, &["lab"])))
        .collect();
    online(&fleet, &DEVICES);
    fleet.cli(dir, &["fleet", "push", "digits-1.1.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.1.0",
            "--tag",
            "lab",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    for id in DEVICES {
        assert!(out.contains(&format!("{id}: applied")), "{out}");
    }

    // Faded digits on both devices, all along (the rollout's gates need traffic too).
    let images: Vec<Vec<f64>> = test_digits().iter().map(|(p, _)| faded(p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = devices
        .iter()
        .map(|device| {
            let (stop, url, images) = (Arc::clone(&stop), device.url.clone(), images.clone());
            std::thread::spawn(move || {
                for pixels in images.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = outpost_testkit::post_json(
                        &format!("{url}/v2/models/digits/infer"),
                        &outpost_testkit::digits_request(pixels),
                    );
                    assert_eq!(r.status, 200, "{}", r.text());
                    std::thread::sleep(Duration::from_millis(25));
                }
            })
        })
        .collect();

    // The rule fires and its command starts the rollout; the rollout completes by itself.
    let rollout = eventually(secs(120), "the retraining command's rollout", || {
        let (_, all) = get_json(&format!("{}/api/v1/rollouts", fleet.api));
        all.as_array()?
            .iter()
            .find(|r| r["request"]["version"] == "1.2.0")
            .cloned()
    });
    let id = rollout["id"].as_u64().unwrap();
    let done = eventually(secs(180), "the rollout finished", || {
        let (_, r) = get_json(&format!("{}/api/v1/rollouts/{id}", fleet.api));
        (r["state"]["state"] != "progressing").then_some(r)
    });
    let history: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["text"].as_str().unwrap())
        .collect();
    assert_eq!(done["state"]["state"], "succeeded", "{history:#?}");
    eventually(secs(60), "1.2.0 active on both devices", || {
        DEVICES
            .iter()
            .all(|id| active(&fleet, id).as_deref() == Some("1.2.0"))
            .then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }

    // One firing, its command accepted (exit 0), recorded with the devices that drifted.
    let (_, firings) = get_json(&format!("{}/api/v1/firings", fleet.api));
    let firings = firings.as_array().unwrap();
    assert_eq!(firings.len(), 1, "{firings:?}");
    assert_eq!(firings[0]["delivered"], true, "{}", firings[0]);
    assert_eq!(firings[0]["attempts"][0]["ok"], true);
    let mut involved: Vec<&str> = firings[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    involved.sort_unstable();
    assert_eq!(involved, DEVICES);
    eprintln!("loop: {}", history.join("\n  "));
}
