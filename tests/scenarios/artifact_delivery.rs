//! Bundle delivery across failures, as real processes on loopback: `kill -9` mid-download
//! (resumed with a `Range` request), an artifact server that comes up late (retried until
//! the deployment applies), and a newer deployment arriving mid-download (taking over at once).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::net::TcpListener;
use std::time::Duration;

mod support;
use support::*;

#[test]
fn kill_9_mid_download_resumes_and_completes() {
    let d = bed("resume");
    let dir = &d.0;
    // The fleet's API port is needed for the proxy before the fleet starts: pick it.
    let port = free_port();
    let upstream = format!("http://127.0.0.1:{port}");
    let (proxy, ranges) = slow_proxy(upstream.clone());
    let listen = format!("127.0.0.1:{port}");
    let fleet = Fleet::launch(dir, &["--listen", &listen, "--public-url", &proxy]);
    assert_eq!(fleet.api, upstream);
    let config = device_config(dir, "dev-r", &fleet.broker, &[]);
    let mut device = Device::start(dir, &config);
    online(&fleet, &["dev-r"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let size = fs::metadata(dir.join("digits-1.0.0.opb")).unwrap().len();
    assert!(
        size > 40_000,
        "the bundle is too small to interrupt: {size}"
    );
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", "dev-r"],
    );

    let downloads = dir.join("dev-r-state").join("downloads");
    let partial = eventually(secs(60), "a partial download", || {
        let entry = fs::read_dir(&downloads).ok()?.flatten().next()?;
        let len = entry.metadata().ok()?.len();
        (len >= 8192 && len < size).then_some(len)
    });
    device.proc.kill9();
    let after_kill = fs::read_dir(&downloads)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .metadata()
        .unwrap()
        .len();
    assert!(after_kill >= partial && after_kill < size);

    let device = Device::start(dir, &config);
    let version = eventually(secs(120), "the resumed deployment serving", || {
        device.digits().ok()
    });
    assert_eq!(version, "1.0.0");
    let ranges = ranges.lock().unwrap().clone();
    assert_eq!(
        ranges.first(),
        Some(&None),
        "the first request asks for everything"
    );
    let resumed: Vec<u64> = ranges
        .iter()
        .flatten()
        .map(|r| {
            r.trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        resumed
            .iter()
            .any(|&from| from >= after_kill.min(partial) && from > 0),
        "no resumed request from the partial length {after_kill}: {ranges:?}"
    );
    assert!(
        fs::read_dir(&downloads).unwrap().next().is_none(),
        "the partial file is removed after install"
    );
}

#[test]
fn an_unreachable_artifact_server_is_retried_until_the_deployment_applies() {
    let d = bed("retry");
    let dir = &d.0;
    // Devices are told to download from a port where nothing listens yet.
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let fleet = Fleet::start(dir, None, Some(&public));
    let config = device_config(dir, "dev-t", &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-t"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let deploy = {
        let (dir, api) = (dir.clone(), fleet.api.clone());
        std::thread::spawn(move || {
            ok(
                &dir,
                &[
                    "fleet",
                    "deploy",
                    "digits@1.0.0",
                    "--device",
                    "dev-t",
                    "--wait",
                    "--timeout",
                    "120",
                    "--fleet",
                    &api,
                ],
            )
        })
    };
    eventually(secs(30), "the device retrying", || {
        fleet.reported("dev-t").filter(|r| r["retrying"] == true)
    });
    assert_eq!(device.digits(), Err(404));
    // The artifact server comes up; the next retry succeeds.
    let (_, _) = proxy_on(
        TcpListener::bind(("127.0.0.1", port)).unwrap(),
        fleet.api.clone(),
        Duration::ZERO,
    );
    let out = deploy.join().unwrap();
    assert!(out.contains("dev-t: retrying after"), "{out}");
    assert!(out.contains("dev-t: applied"), "{out}");
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    let reported = fleet.reported("dev-t").unwrap();
    assert_eq!(reported["retrying"], false);
    assert!(reported["last_error"].is_null(), "{reported}");
}

#[test]
fn a_newer_deployment_mid_download_takes_over_and_the_old_one_never_activates() {
    let d = bed("supersede");
    let dir = &d.0;
    let port = free_port();
    // About 10 KB/s: the whole bundle takes half a minute, ample time for a second deploy.
    let (proxy, ranges) = proxy_on(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        format!("http://127.0.0.1:{port}"),
        Duration::from_millis(200),
    );
    let listen = format!("127.0.0.1:{port}");
    let fleet = Fleet::launch(dir, &["--listen", &listen, "--public-url", &proxy]);
    let config = device_config(dir, "dev-s", &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-s"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let size = fs::metadata(dir.join("digits-1.0.0.opb")).unwrap().len();
    assert!(
        size > 100_000,
        "the bundle is too small to interrupt: {size}"
    );
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", "dev-s"],
    );
    // 1.0.0 is on its way when 2.0.0 is deployed.
    let downloads = dir.join("dev-s-state").join("downloads");
    let partial = eventually(secs(60), "a partial download of 1.0.0", || {
        let entry = fs::read_dir(&downloads).ok()?.flatten().next()?;
        let len = entry.metadata().ok()?.len();
        (len >= 8192 && len < size).then_some(len)
    });
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@2.0.0", "--device", "dev-s"],
    );
    eventually(secs(120), "2.0.0 serving, in sync", || {
        let in_sync = fleet.device("dev-s").is_some_and(|d| d["in_sync"] == true);
        (device.digits().as_deref() == Ok("2.0.0") && in_sync).then_some(())
    });
    // Events travel apart from the reported state: wait for 2.0.0's.
    let events = eventually(secs(60), "the activation event of 2.0.0", || {
        let events = fleet.records("events", "dev-s");
        events
            .iter()
            .any(|r| r["body"]["event"] == "activated" && r["body"]["version"] == "2.0.0")
            .then_some(events)
    });
    let activated: Vec<&str> = events
        .iter()
        .filter(|r| r["body"]["event"] == "activated")
        .map(|r| r["body"]["version"].as_str().unwrap())
        .collect();
    assert_eq!(
        activated,
        ["2.0.0"],
        "the superseded 1.0.0 was not installed"
    );
    let failed: Vec<&serde_json::Value> = events
        .iter()
        .filter(|r| r["body"]["event"] == "deployment_failed")
        .collect();
    assert!(
        failed.is_empty(),
        "superseding is not a failure: {failed:?}"
    );
    // The partial 1.0.0 stays for a resume, should it be deployed again.
    let kept: Vec<u64> = fs::read_dir(&downloads)
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .collect();
    assert!(
        kept.iter().any(|&len| len >= partial && len < size),
        "partial download kept: {kept:?}"
    );
    eprintln!(
        "1.0.0 stopped after {partial}+ of {size} bytes at 10 KB/s; 2.0.0 applied; {} artifact \
         requests",
        ranges.lock().unwrap().len()
    );
}
