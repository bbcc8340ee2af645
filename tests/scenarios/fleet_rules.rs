//! Retraining triggers, as real processes on loopback: a fleet with a rule file, a device
//! serving digits with its training baseline, drifted traffic, and a webhook receiver that
//! checks the HMAC signature (with `openssl`, not the fleet's code) and fails the first two
//! deliveries. The drift rule fires once for its cooldown however long the drift lasts, its
//! webhook is retried until it is accepted, every attempt is recorded; an accuracy rule fires
//! its command when posted labels say the model is wrong.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

mod support;
use support::*;

const SECRET: &str = "a-webhook-secret-of-32-bytes-len";

/// One request the receiver got: its headers (lower-case names) and body.
type Received = Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>;

/// An HTTP receiver on a free port that answers 500 to the first `failures` requests and 200
/// after; returns its URL and what it received.
fn receiver(failures: usize) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got: Received = Arc::default();
    let log = Arc::clone(&got);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                let (k, v) = l.split_once(':').unwrap();
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let n = {
                let mut log = log.lock().unwrap();
                log.push((headers, body));
                log.len()
            };
            let status = if n <= failures {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

/// HMAC-SHA256 of `body` under [`SECRET`], by `openssl`.
fn openssl_hmac(dir: &std::path::Path, body: &[u8]) -> String {
    let path = dir.join("body.json");
    fs::write(&path, body).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", SECRET])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_owned()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

#[test]
fn a_drift_rule_fires_once_per_cooldown_and_its_webhook_is_retried_until_accepted() {
    let d = bed("rules");
    let dir = &d.0;
    digits_with_baseline(dir, "1.1.0");
    let (url, received) = receiver(2);
    fs::write(dir.join("hook.secret"), format!("{SECRET}\n")).unwrap();
    fs::write(
        dir.join("rules.toml"),
        format!(
            r#"
[[rule]]
name = "digits-drift"
metric = "feature_psi"
model = "digits"
version = "1.1.0"
op = ">"
threshold = 0.25
window_s = 3600
consecutive = 2
every_s = 1
cooldown_s = 3600
min_samples = 20
[rule.webhook]
url = "{url}"
secret_file = "hook.secret"
attempts = 4

[[rule]]
name = "digits-accuracy"
metric = "accuracy"
model = "digits"
op = "<"
threshold = 0.9
window_s = 3600
consecutive = 1
every_s = 1
min_samples = 10
[rule.command]
argv = ["sh", "-c", "cat > accuracy-fired.json"]
"#
        ),
    )
    .unwrap();
    let fleet = Fleet::launch(dir, &["--rules", "rules.toml"]);
    let device = Device::start(dir, &device_config(dir, "dev-r", &fleet.broker, &[]));
    online(&fleet, &["dev-r"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.1.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.1.0",
            "--device",
            "dev-r",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    assert!(out.contains("dev-r: applied"), "{out}");

    // Faded digits, sent all along: the mean intensity drifts far and stays drifted.
    let cases: Vec<(Vec<f64>, u64)> = test_digits()
        .into_iter()
        .map(|(p, truth)| (faded(&p), truth))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let answered: Arc<Mutex<Vec<(String, u64, u64)>>> = Arc::default();
    let traffic = {
        let (stop, answered, url, cases) = (
            Arc::clone(&stop),
            Arc::clone(&answered),
            device.url.clone(),
            cases.clone(),
        );
        std::thread::spawn(move || {
            for (pixels, truth) in cases.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = outpost_testkit::post_json(
                    &format!("{url}/v2/models/digits/infer"),
                    &outpost_testkit::digits_request(pixels),
                );
                assert_eq!(r.status, 200, "{}", r.text());
                let body = r.json();
                let label = outpost_testkit::digits_label(&body);
                answered.lock().unwrap().push((
                    body["id"].as_str().unwrap().to_owned(),
                    label,
                    *truth,
                ));
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Two deliveries refused, the third accepted: all three the same firing, each signed.
    eventually(secs(60), "the webhook accepted", || {
        (received.lock().unwrap().len() >= 3).then_some(())
    });
    let got = received.lock().unwrap().clone();
    let first: Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(first["rule"], "digits-drift");
    assert_eq!(first["model"], "digits");
    assert_eq!(first["version"], "1.1.0");
    assert_eq!(first["metric"], "feature_psi");
    assert_eq!(first["devices"], json!(["dev-r"]));
    assert_eq!(first["features"], json!(["mean_intensity"]));
    assert!(first["value"].as_f64().unwrap() > 0.25, "{first}");
    assert_eq!(first["digest"].as_str().unwrap().len(), 64);
    for (headers, body) in &got {
        assert_eq!(body, &got[0].1, "a retry carries the same firing");
        assert_eq!(
            header(headers, "outpost-fingerprint"),
            first["fingerprint"].as_str().unwrap()
        );
        assert_eq!(
            header(headers, "outpost-signature"),
            format!("sha256={}", openssl_hmac(dir, body)),
            "the signature is HMAC-SHA256 of the body under the secret"
        );
    }

    // The drift goes on; the rule stays quiet for its cooldown.
    throughout(secs(5), "no second firing within the cooldown", || {
        received.lock().unwrap().len() == 3
    });
    let (_, firings) = get_json(&format!("{}/api/v1/firings", fleet.api));
    let drift: Vec<&Value> = firings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["rule"] == "digits-drift")
        .collect();
    assert_eq!(drift.len(), 1, "{firings}");
    let outcomes: Vec<(bool, &str)> = drift[0]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["ok"].as_bool().unwrap(), a["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        outcomes,
        [(false, "HTTP 500"), (false, "HTTP 500"), (true, "HTTP 200")]
    );
    assert_eq!(drift[0]["delivered"], true);
    let metrics = outpost_testkit::get(&format!("{}/metrics", fleet.api)).text();
    assert!(
        metrics.contains("outpost_fleet_rule_firings_total{rule=\"digits-drift\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "outpost_fleet_rule_deliveries_total{rule=\"digits-drift\",result=\"failed\"} 2"
        ),
        "{metrics}"
    );
    let shown = fleet.cli(dir, &["fleet", "rules", "--test", "digits-drift"]);
    assert!(shown.contains("CROSSING"), "{shown}");

    // No labels yet: the accuracy rule has nothing to measure. Then a labelling process says
    // most answers were wrong.
    assert!(!dir.join("accuracy-fired.json").exists());
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    let answered = answered.lock().unwrap().clone();
    let feedback: Vec<Value> = answered
        .iter()
        .enumerate()
        .map(|(i, (id, label, _))| json!({"id": id, "truth": if i % 4 == 0 { *label } else { (label + 1) % 10 }}))
        .collect();
    let r = outpost_testkit::post_json(
        &format!("{}/v2/models/digits/feedback", device.url),
        &json!({ "feedback": feedback }),
    );
    assert_eq!(
        r.json()["accepted"],
        answered.len().min(4096),
        "{}",
        r.text()
    );
    let fired = eventually(secs(30), "the accuracy rule's command ran", || {
        fs::read(dir.join("accuracy-fired.json"))
            .ok()
            .filter(|b| !b.is_empty())
    });
    let fired: Value = serde_json::from_slice(&fired).unwrap();
    assert_eq!(fired["rule"], "digits-accuracy");
    assert_eq!(fired["metric"], "accuracy");
    let value = fired["value"].as_f64().unwrap();
    assert!(
        (0.2..0.3).contains(&value),
        "accuracy {value}: a quarter of the labels agree"
    );
    eventually(secs(30), "the command's exit recorded", || {
        let (_, firings) = get_json(&format!("{}/api/v1/firings", fleet.api));
        firings
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["rule"] == "digits-accuracy" && f["delivered"] == true)
            .then_some(())
    });
    let table = fleet.cli(dir, &["fleet", "firings"]);
    assert!(
        table.contains("digits-accuracy") && table.contains("exit"),
        "{table}"
    );
}
