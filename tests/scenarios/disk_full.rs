//! A full disk during install: the device's data directory is a small tmpfs that holds one
//! installed version but not a second. The second install is refused with an error that says
//! the disk is full, nothing half-written is listed, the old version serves on (and after a
//! restart), and once there is room the same install succeeds. And a full disk under the
//! fleet agent's outbox, during a broker outage: records are refused and counted, the device
//! serves on, and once there is room everything stored reaches the fleet, with the count.
//!
//! Needs root (or password-less sudo) to mount the tmpfs; `.ci/run` runs as either.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_testkit::admin;
use support::*;

/// A tmpfs mounted at a path, unmounted on drop.
struct Tmpfs(PathBuf);

fn mount(args: &[&str]) -> bool {
    let root = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    let status = if root {
        Command::new("mount").args(args).status()
    } else {
        Command::new("sudo")
            .arg("-n")
            .arg("mount")
            .args(args)
            .status()
    };
    status.is_ok_and(|s| s.success())
}

impl Tmpfs {
    fn new(path: &Path, size_kib: u64) -> Self {
        fs::create_dir_all(path).unwrap();
        let size = format!("size={size_kib}k");
        let target = path.to_str().unwrap();
        assert!(
            mount(&["-t", "tmpfs", "-o", &size, "tmpfs", target]),
            "this test mounts a tmpfs: run it as root or with password-less sudo"
        );
        Self(path.to_owned())
    }

    fn resize(&self, size_kib: u64) {
        let opts = format!("remount,size={size_kib}k");
        assert!(mount(&["-o", &opts, self.0.to_str().unwrap()]));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = self.0.to_str().unwrap();
        if Command::new("umount").arg(target).status().is_err() {
            let _ = Command::new("sudo").args(["-n", "umount", target]).status();
        }
    }
}

#[test]
fn a_full_disk_refuses_an_install_clearly_and_loses_nothing() {
    let dir = bed("disk-full");
    // One installed digits takes about 1.2 MB (the bundle and its compiled guest), and the
    // device keeps 4 MiB free beyond what an install writes: 6 MiB hold one install, not two.
    let disk = Tmpfs::new(&dir.0.join("state"), 6 * 1024);
    admin_device_config(&dir.0);
    let (device, admin_url) = start_admin_device(&dir.0);
    assert_eq!(device.digits(), Ok("1.0.0".to_owned()));

    let v2 = fs::read(dir.0.join("digits-2.0.0.opb")).unwrap();
    let url = format!("{admin_url}/admin/bundles?activate=true");
    let refused = admin("POST", &url, &v2);
    assert_eq!(refused.status, 507, "{}", refused.text());
    let message = refused.text();
    assert!(
        message.contains("the disk is full") && message.contains("free some space"),
        "the error does not say the disk is full: {message}"
    );
    assert_eq!(
        installed_digits(&admin_url),
        ["1.0.0"],
        "nothing half-written is listed"
    );
    assert_eq!(device.digits(), Ok("1.0.0".to_owned()));

    drop(device);
    let (device, admin_url) = start_admin_device(&dir.0);
    assert_eq!(device.digits(), Ok("1.0.0".to_owned()), "after a restart");
    assert_eq!(installed_digits(&admin_url), ["1.0.0"]);

    // Room again: the same install goes through.
    disk.resize(16 * 1024);
    let url = format!("{admin_url}/admin/bundles?activate=true");
    let installed_now = admin("POST", &url, &v2);
    assert_eq!(installed_now.status, 201, "{}", installed_now.text());
    assert_eq!(device.digits(), Ok("2.0.0".to_owned()));
}

/// Bytes free on the file system of `path`.
fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_full_disk_under_the_outbox_drops_and_counts_records_and_corrupts_nothing() {
    let d = bed("outbox-full");
    let dir = &d.0;
    let mut broker = Mosquitto::start(dir);
    let fleet = Fleet::start(dir, Some(&broker.url()), None);
    let config = device_config(dir, "dev-d", &broker.url(), &[]);
    let state = dir.join("dev-d-state");
    let _disk = Tmpfs::new(&state, 12 * 1024);
    ok(
        dir,
        &[
            "device",
            "install",
            "digits-1.0.0.opb",
            "--config",
            &config,
            "--activate",
        ],
    );
    let mut device = Device::start(dir, &config);
    online(&fleet, &["dev-d"]);
    eventually(secs(60), "telemetry at the fleet", || {
        (fleet.records("telemetry", "dev-d").len() >= 10).then_some(())
    });

    // The broker goes away, so the outbox holds everything; then the disk fills up to just
    // under the room the device keeps (4 MiB beyond a record).
    broker.stop();
    std::thread::sleep(secs(1));
    let before = device
        .metric("outpost_outbox_dropped_records_total")
        .unwrap();
    let filler = state.join("filler");
    let fill = free_bytes(&state).saturating_sub((4 << 20) + (16 << 10));
    fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    let dropped = eventually(secs(30), "records refused and counted", || {
        let now = device.metric("outpost_outbox_dropped_records_total")?;
        (now >= before + 10).then_some(now)
    });
    assert_eq!(
        device.digits(),
        Ok("1.0.0".to_owned()),
        "serving on a full disk"
    );
    let logs = device.proc.logs();
    assert_eq!(
        logs.matches("cannot write telemetry to the outbox").count(),
        1,
        "said once, not per record: {logs}"
    );
    assert!(logs.contains("the disk is full"), "{logs}");

    // Room again, and the broker back: every stored record arrives once, with no gap (a
    // refused record never took a number), and the fleet hears how many were dropped.
    fs::remove_file(&filler).unwrap();
    broker.restart();
    eventually(secs(60), "the outbox drained", || {
        (device.metric("outpost_outbox_records") == Some(0)).then_some(())
    });
    let seqs = |fleet: &Fleet| -> Vec<u64> {
        let mut seqs: Vec<u64> = ["telemetry", "events"]
            .iter()
            .flat_map(|s| fleet.records(s, "dev-d"))
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        seqs.sort_unstable();
        seqs
    };
    let last = assert_records_each_once(&fleet, "dev-d");
    let counted = device
        .metric("outpost_outbox_dropped_records_total")
        .unwrap();
    assert!(counted >= dropped);
    eventually(secs(60), "the fleet hears the drop count", || {
        let heard = fleet.device("dev-d")?["dropped"].as_u64()?;
        (heard >= dropped).then_some(())
    });
    assert!(
        device
            .proc
            .logs()
            .contains("telemetry is written to the outbox again"),
        "recovery said"
    );

    // Nothing was corrupted: after a kill -9 the device serves, and its outbox goes on
    // numbering where it stopped.
    device.proc.kill9();
    drop(device);
    let device = Device::start(dir, &config);
    assert_eq!(device.digits(), Ok("1.0.0".to_owned()));
    eventually(secs(60), "new records after the restart", || {
        (seqs(&fleet).last() > Some(&last)).then_some(())
    });
    let after = seqs(&fleet);
    let top = *after.last().unwrap();
    let unique: std::collections::BTreeSet<u64> = after.iter().copied().collect();
    assert_eq!(unique.len(), after.len(), "stored twice after the restart");
    eprintln!(
        "outbox on a full disk: {} records refused and counted, {last} stored records each \
         once; {top} after a kill -9 and restart",
        dropped - before
    );
}
