//! The fleet's web dashboard in a real browser: headless Chromium (Debian's package) loads it
//! from a running fleet with two devices serving digits under drifted traffic, and the test
//! checks the rendered page: the devices, a latency chart with points, the drift panel of each
//! baseline feature with its PSI and histogram, a shadow's comparison with its primary, the
//! rules. It saves a screenshot.
//!
//! Without Chromium the test says so and passes, unless `OUTPOST_REQUIRE_CHROMIUM` is set
//! (`.ci/run` sets it and installs the package).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

mod support;
use support::*;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OUTPOST_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .map(|name| PathBuf::from("/usr/bin").join(name))
        .find(|p| p.exists())
}

fn headless(browser: &PathBuf, dir: &std::path::Path, extra: &[&str], url: &str) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=20000",
            "--window-size=1280,2400",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.join("chromium-profile").display()
        ))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_renders_devices_charts_and_drift_with_real_data() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_CHROMIUM").is_none(),
            "OUTPOST_REQUIRE_CHROMIUM is set but no chromium is installed"
        );
        eprintln!(
            "note: no chromium (apt-get install chromium, or OUTPOST_CHROMIUM=PATH): dashboard test skipped"
        );
        return;
    };
    let d = bed("dashboard");
    let dir = &d.0;
    digits_with_baseline(dir, "1.1.0");
    fs::write(
        dir.join("rules.toml"),
        "[[rule]]\nname = \"digits-drift\"\nmetric = \"feature_psi\"\nmodel = \"digits\"\nop = \">\"\nthreshold = 0.25\nevery_s = 1\n",
    )
    .unwrap();
    let fleet = Fleet::launch(dir, &["--rules", "rules.toml"]);
    let ids = ["dev-a", "dev-b"];
    let devices: Vec<Device> = ids
        .iter()
        .map(|id| Device::start(dir, &device_config(dir, id, &fleet.broker, &["lab"])))
        .collect();
    online(&fleet, &ids);
    fleet.cli(dir, &["fleet", "push", "digits-1.1.0.opb"]);
    fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.1.0",
            "--all",
            "--wait",
            "--timeout",
            "120",
        ],
    );

    // dev-a runs 1.2.0 as a shadow of 1.1.0 on a copy of every request.
    digits_with_baseline(dir, "1.2.0");
    fleet.cli(dir, &["fleet", "push", "digits-1.2.0.opb"]);
    fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.2.0",
            "--device",
            "dev-a",
            "--policy",
            r#"{"shadow": {"id": "sh-dash", "candidate": "1.2.0", "sample_percent": 100}}"#,
            "--wait",
            "--timeout",
            "120",
        ],
    );

    let images: Vec<Vec<f64>> = test_digits().into_iter().map(|(p, _)| p).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            let (stop, url, images) = (Arc::clone(&stop), device.url.clone(), images.clone());
            std::thread::spawn(move || {
                for pixels in images.iter().cycle() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // The second device sees faded digits: drift.
                    let pixels = if i == 1 {
                        faded(pixels)
                    } else {
                        pixels.clone()
                    };
                    outpost_testkit::post_json(
                        &format!("{url}/v2/models/digits/infer"),
                        &outpost_testkit::digits_request(&pixels),
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    eventually(
        secs(60),
        "traffic and drift in the fleet's telemetry",
        || {
            let (_, drift) = get_json(&format!(
                "{}/api/v1/drift?model=digits&version=1.1.0&window=3600",
                fleet.api
            ));
            let n = drift["features"][0]["n"].as_u64().unwrap_or(0);
            (n > 100).then_some(())
        },
    );
    let comparison = eventually(secs(60), "the shadow's comparisons at the fleet", || {
        let (_, c) = get_json(&format!(
            "{}/api/v1/compare?model=digits&window=900",
            fleet.api
        ));
        let versions = c["versions"].as_array()?;
        let shadow = versions.iter().find(|v| v["role"] == "shadow")?;
        (shadow["shadow"]["agreed"].as_u64()? >= 20).then(|| c.clone())
    });
    let versions = comparison["versions"].as_array().unwrap();
    let primary = &versions[0];
    assert_eq!(
        (&primary["version"], &primary["role"], &primary["devices"]),
        (&"1.1.0".into(), &"primary".into(), &2.into()),
        "{comparison}"
    );
    let shadow = versions.iter().find(|v| v["role"] == "shadow").unwrap();
    assert_eq!(shadow["version"], "1.2.0");
    assert_eq!(shadow["devices"], 1);
    // The same model under another version number agrees with itself.
    assert_eq!(shadow["shadow"]["agreement"], 1.0, "{comparison}");
    let table = fleet.cli(dir, &["fleet", "compare", "digits", "--window", "900"]);
    assert!(
        table.contains("shadow") && table.contains("1.0000"),
        "{table}"
    );
    std::thread::sleep(Duration::from_secs(2));

    let dom = headless(&browser, dir, &["--dump-dom"], &format!("{}/", fleet.api));
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never finished a refresh:\n{dom}"
    );
    for id in ids {
        assert!(
            dom.contains(&format!("data-device=\"{id}\"")),
            "{id} missing:\n{dom}"
        );
    }
    let chart = dom
        .split("data-series=\"latency\" data-points=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no latency chart:\n{dom}"));
    assert!(chart > 0, "the latency chart has no points");
    assert!(dom.contains("<polyline"), "no line drawn");
    for feature in ["mean_intensity", "predicted_class"] {
        let psi = dom
            .split(&format!(
                "class=\"drift-panel\" data-feature=\"{feature}\" data-psi=\""
            ))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no drift panel for {feature}:\n{dom}"));
        assert!(psi > 0.0, "{feature} PSI {psi}");
    }
    assert!(
        dom.contains("class=\"histogram\" data-feature=\"mean_intensity\""),
        "no histogram"
    );
    assert!(
        dom.matches("<rect").count() >= 24,
        "the histogram has no bars"
    );
    assert!(dom.contains("digits-drift"), "no rules table row");
    let agreement = dom
        .split("data-version=\"1.2.0\" data-role=\"shadow\"")
        .nth(1)
        .and_then(|rest| rest.split("data-agreement=\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no shadow row in the comparisons:\n{dom}"));
    assert_eq!(agreement, 1.0);
    assert!(
        dom.contains("data-compare=\"digits\""),
        "no comparison table"
    );

    let shot = dir.join("dashboard.png");
    headless(
        &browser,
        dir,
        &[&format!("--screenshot={}", shot.display())],
        &format!("{}/", fleet.api),
    );
    let png = fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot of {} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("OUTPOST_DASHBOARD_SCREENSHOT") {
        fs::copy(&shot, keep).unwrap();
    }
    eprintln!(
        "dashboard screenshot: {} ({} bytes)",
        shot.display(),
        png.len()
    );

    // A rollout in progress shows its stage and its gates.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "rollout",
            "start",
            "digits@2.0.0",
            "--device",
            "dev-b",
            "--stages",
            "1",
            "--soak",
            "1s",
            "--gate",
            "error_rate<=0.05",
            "--min-requests",
            "100000000",
            "--json",
        ],
    );
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap();
    let dom = headless(&browser, dir, &["--dump-dom"], &format!("{}/", fleet.api));
    let row = dom
        .split(&format!("data-rollout=\"{id}\""))
        .nth(1)
        .and_then(|rest| rest.split("</tr>").next())
        .unwrap_or_else(|| panic!("no row for rollout {id}:\n{dom}"));
    assert!(
        row.contains("progressing") && row.contains("error_rate ≤ 0.05 over 60 s"),
        "{row}"
    );

    stop.store(true, Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }
}

/// Every metric name in `text` (`outpost_…`), histogram suffixes taken off.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("outpost_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let name = &text[start..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        // `outpost_fleet` alone is a job name, not a metric.
        if name.matches('_').count() >= 2 {
            out.insert(name.to_owned());
        }
        i = end;
    }
    out
}

/// The Grafana dashboard imports as is (a Prometheus data-source input, every panel on it,
/// unique ids, queries), and it and the alert rules name only metrics that a running device
/// and fleet export.
#[test]
fn the_grafana_dashboard_and_alert_rules_use_only_metrics_outpost_exports() {
    let root = outpost_testkit::models_dir().join("..");
    let dashboard: Value = serde_json::from_slice(
        &fs::read(root.join("docs/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let inputs = dashboard["__inputs"].as_array().unwrap();
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus")
    );
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut ids = std::collections::BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel ids are unique"
        );
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        for key in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][key].is_u64(), "{}: gridPos.{key}", p["title"]);
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(
            !targets.is_empty()
                && targets
                    .iter()
                    .all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty()))
        );
    }
    let alerts = fs::read_to_string(root.join("docs/monitoring/alerts.yml")).unwrap();
    let used: std::collections::BTreeSet<String> = metric_names(&dashboard.to_string())
        .into_iter()
        .chain(metric_names(&alerts))
        .collect();

    let d = bed("metrics-names");
    let dir = &d.0;
    let fleet = Fleet::start(dir, None, None);
    let device = Device::start(dir, &device_config(dir, "dev-m", &fleet.broker, &[]));
    online(&fleet, &["dev-m"]);
    let exported: String = [
        format!("{}/metrics", device.url),
        format!("{}/metrics", fleet.api),
    ]
    .iter()
    .map(|u| outpost_testkit::get(u).text())
    .collect();
    let declared: std::collections::BTreeSet<&str> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !declared.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\nexported: {declared:?}"
    );
    eprintln!(
        "{} metric names in the dashboard and alerts, all exported",
        used.len()
    );
}
