//! A fleet of virtual devices (`outpost fleet simulate`) against a real `outpost fleet serve`
//! on its embedded broker: registration, the paginated and filtered device list, a deployment
//! every virtual device verifies and reports applied, hostile devices refused and counted,
//! and `/metrics` without a series per device.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Stdio;

use serde_json::Value;

mod support;
use support::*;

const DEVICES: usize = 40;
const HOSTILE: usize = 2;

/// Every page of `/api/v1/devices?QUERY` with `limit`, following the next-page header; checks
/// that the Link header says the same.
fn all_pages(fleet: &Fleet, query: &str, limit: usize) -> (Vec<Value>, usize) {
    let mut after: Option<String> = None;
    let mut all = Vec::new();
    let mut pages = 0;
    loop {
        let mut url = format!("{}/api/v1/devices?limit={limit}{query}", fleet.api);
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let response = http().get(&url).call().unwrap();
        assert_eq!(response.status(), 200, "{url}");
        let next = response
            .headers()
            .get("x-next-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let link = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<Value> =
            serde_json::from_str(&response.into_body().read_to_string().unwrap()).unwrap();
        assert!(
            page.len() <= limit,
            "a page of {} for limit {limit}",
            page.len()
        );
        pages += 1;
        all.extend(page);
        match next {
            Some(n) => {
                let link = link.expect("a Link header beside x-next-after");
                assert!(
                    link.contains(&format!("after={n}")) && link.ends_with("rel=\"next\""),
                    "{link}"
                );
                after = Some(n);
            }
            None => {
                assert!(link.is_none(), "a Link header on the last page");
                return (all, pages);
            }
        }
    }
}

fn ids(views: &[Value]) -> Vec<String> {
    views
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect()
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn virtual_devices_register_page_deploy_and_hostile_ones_are_counted() {
    let dir = &bed("simulate").0;
    let fleet = Fleet::start(dir, None, None);
    let summary = dir.join("summary.json");
    let mut sim = bin()
        .current_dir(dir)
        .args([
            "fleet",
            "simulate",
            "--devices",
            &DEVICES.to_string(),
            "--fleet",
            &fleet.api,
            "--duration",
            "40s",
            "--interval",
            "1s",
            "--hostile",
            &HOSTILE.to_string(),
            "--tag",
            "sim",
            "--summary",
        ])
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Every virtual device registers and is online, and the pages of 7 hold each once, in order.
    let online = eventually(secs(60), "every virtual device online", || {
        let (views, _) = all_pages(&fleet, "&status=online", 7);
        (views.len() == DEVICES).then_some(views)
    });
    let listed = ids(&online);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "pages come in id order");
    assert_eq!(
        listed.iter().collect::<BTreeSet<_>>().len(),
        DEVICES,
        "each device once"
    );
    let (_, pages) = all_pages(&fleet, "", 7);
    assert_eq!(pages, DEVICES.div_ceil(7));
    // Filters: a tag they report, a tag nobody reports, offline (none), and a bad limit.
    assert_eq!(all_pages(&fleet, "&tag=sim", 1000).0.len(), DEVICES);
    assert!(all_pages(&fleet, "&tag=field", 1000).0.is_empty());
    assert!(all_pages(&fleet, "&status=offline", 1000).0.is_empty());
    let (status, body) = get_json(&format!("{}/api/v1/devices?limit=5000", fleet.api));
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");
    // Without a limit, the whole list as before (older clients).
    assert_eq!(fleet.devices().len(), DEVICES);

    // A deployment reaches every virtual device, which checks the fleet's signature and
    // reports it applied; the fleet's aggregate says none is pending.
    push_and_deploy_digits(
        |args| fleet.cli(dir, args),
        &["--tag", "sim"],
        &["sim-00000", "sim-00039"],
    );
    eventually(secs(30), "no device pending", || {
        let (_, m) = get_json(&format!("{}/metrics", fleet.api));
        let m = m.as_str().unwrap().to_owned();
        (metric(&m, "outpost_fleet_devices_pending") == 0).then_some(())
    });
    assert_eq!(
        all_pages(&fleet, "&model=digits&version=1.0.0", 9).0.len(),
        DEVICES
    );
    assert!(all_pages(&fleet, "&in_sync=false", 9).0.is_empty());
    assert!(
        all_pages(&fleet, "&model=digits&version=2.0.0", 9)
            .0
            .is_empty()
    );
    let table = fleet.cli(dir, &["fleet", "status", "--model", "digits@1.0.0"]);
    assert_eq!(
        table.lines().filter(|l| l.starts_with("sim-")).count(),
        DEVICES,
        "{table}"
    );

    // The hostile devices' garbage and forged batches are counted, and nothing was stored as
    // another device: every record a device holds is its own (no conflicting sequence numbers).
    let (_, m) = get_json(&format!("{}/metrics", fleet.api));
    let m = m.as_str().unwrap().to_owned();
    assert!(
        metric(&m, "outpost_fleet_malformed_messages_total") > 0,
        "{m}"
    );
    assert!(
        metric(&m, "outpost_fleet_foreign_messages_total") > 0,
        "{m}"
    );
    assert!(!m.contains("device=\""), "a series per device:\n{m}");
    assert_eq!(metric(&m, "outpost_fleet_devices"), DEVICES as u64);
    for view in fleet.devices() {
        assert_eq!(view["conflicts"], 0, "{view}");
    }
    let victim = fleet.records("telemetry", "sim-00002");
    let seqs: BTreeSet<u64> = victim.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.len(), victim.len(), "one record per sequence number");

    // The simulator ends on its own, every device saying offline first.
    let status = eventually(secs(60), "the simulator to finish", || {
        sim.try_wait().unwrap()
    });
    assert!(status.success());
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(summary["devices"], DEVICES);
    assert!(summary["all_connected_after_s"].is_number(), "{summary}");
    assert!(
        summary["desired_applied"].as_u64().unwrap() >= DEVICES as u64,
        "{summary}"
    );
    assert_eq!(summary["desired_refused"], 0, "{summary}");
    assert!(
        summary["telemetry_batches_acked"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert!(
        summary["hostile_messages_sent"].as_u64().unwrap() > 0,
        "{summary}"
    );
    eventually(secs(30), "every virtual device offline", || {
        all_pages(&fleet, "&status=online", 1000)
            .0
            .is_empty()
            .then_some(())
    });
}

#[test]
fn a_simulator_refuses_bad_arguments_with_a_clear_error() {
    let dir = &Dir::new("simulate-args").0;
    let err = fails(
        dir,
        &[
            "fleet",
            "simulate",
            "--devices",
            "3",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--fleet-key",
            "zz",
        ],
    );
    assert!(err.contains("--fleet-key"), "{err}");
    let err = fails(
        dir,
        &[
            "fleet",
            "simulate",
            "--devices",
            "3",
            "--hostile",
            "4",
            "--broker",
            "mqtt://127.0.0.1:1",
            "--fleet-key",
            "00",
        ],
    );
    assert!(
        err.contains("--hostile 4 is more than --devices 3"),
        "{err}"
    );
    let err = fails(
        dir,
        &[
            "fleet",
            "simulate",
            "--devices",
            "3",
            "--fleet",
            "http://127.0.0.1:1",
        ],
    );
    assert!(err.contains("cannot reach the fleet"), "{err}");
}
