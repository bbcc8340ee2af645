//! `outpost device` as a real process: offline installs, `kill -9` in the middle of one, and
//! serving the last active deployment after a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::{bin, build_and_sign, digits_spec, ok, run_device, signer};
use outpost_testkit::{TempDir, digits_version};

/// A device directory: key, trust store, config, and two signed digits bundles.
fn setup(tag: &str) -> TempDir {
    let d = TempDir::new(&format!("device-{tag}"));
    let dir = d.path();
    signer(dir);
    for v in ["1.0.0", "2.0.0"] {
        digits_spec(dir, v);
        build_and_sign(dir, &format!("{v}.toml"), &format!("{v}.opb"));
    }
    fs::write(
        dir.join("device.toml"),
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\ntrust_store = \"trust.toml\"\n",
    )
    .unwrap();
    d
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(dir, &["device", "status", "--config", "device.toml"])).unwrap()
}

#[test]
fn kill_9_during_install_leaves_a_consistent_device_and_the_install_can_be_retried() {
    let d = setup("kill9");
    let dir = d.path();
    ok(
        dir,
        &[
            "device",
            "install",
            "1.0.0.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    let mut outcomes = Vec::new();
    for delay_ms in [0u64, 10, 30, 60, 100, 150, 250, 400] {
        let mut child = bin()
            .args([
                "device",
                "install",
                "2.0.0.opb",
                "--config",
                "device.toml",
                "--activate",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Not a wait for a condition: when the kill lands in the install is what this loop
        // varies, so this delay is kept.
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The state opens, loads its active version, and says which one it is.
        let s = status(dir);
        let model = &s[0];
        let active = model["active"].as_str().unwrap().to_owned();
        let installed: Vec<&str> = model["installed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["version"].as_str().unwrap())
            .collect();
        assert!(installed.contains(&"1.0.0"), "{s}");
        assert!(
            installed.contains(&active.as_str()),
            "active {active} is not installed: {s}"
        );
        outcomes.push(format!(
            "{delay_ms}ms: active {active}, installed {installed:?}"
        ));
        if active == "2.0.0" {
            break;
        }
    }
    eprintln!("{}", outcomes.join("\n"));
    // Retrying completes the install, whatever the kill left.
    ok(
        dir,
        &[
            "device",
            "install",
            "2.0.0.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    assert_eq!(status(dir)[0]["active"], "2.0.0");

    let (mut device, url) = run_device(dir, "device.toml");
    assert_eq!(digits_version(&url), Ok("2.0.0".into()));
    device.kill().unwrap();
    device.wait().unwrap();
}

#[test]
fn device_run_serves_the_last_active_deployment_and_refuses_a_second_process() {
    let d = setup("run");
    let dir = d.path();
    ok(
        dir,
        &[
            "device",
            "install",
            "1.0.0.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    ok(
        dir,
        &["device", "install", "2.0.0.opb", "--config", "device.toml"],
    );
    let (mut device, url) = run_device(dir, "device.toml");
    assert_eq!(
        digits_version(&url),
        Ok("1.0.0".into()),
        "installing alone does not activate"
    );
    let out = bin()
        .args(["device", "status", "--config", "device.toml"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another outpost process"), "{err}");
    device.kill().unwrap();
    device.wait().unwrap();

    let out = bin()
        .args([
            "device",
            "install",
            "tampered.opb",
            "--config",
            "device.toml",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let cfg = bin().args(["device", "default-config"]).output().unwrap();
    assert!(String::from_utf8_lossy(&cfg.stdout).contains("max_concurrent_requests = 8"));
}

#[test]
fn demo_serves_the_examples_and_stops_cleanly_on_ctrl_c() {
    let mut child = bin()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--fleet-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
        ])
        .env("OUTPOST_LOG", "warn")
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (url, state) = loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo exited before serving");
        };
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("Outpost demo device: serving on ") {
            let (url, state) = rest.split_once(" (state in ").unwrap();
            break (url.to_owned(), PathBuf::from(state.trim_end_matches(')')));
        }
    };
    assert!(state.exists());
    assert_eq!(digits_version(&url), Ok("1.0.0".into()));
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!state.exists(), "the temporary state was left behind");
}
