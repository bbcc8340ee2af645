//! A full disk during install: the device's data directory is a small tmpfs that holds one
//! installed version but not a second. The second install is refused with an error that says
//! the disk is full, nothing half-written is listed, the old version serves on (and after a
//! restart), and once there is room the same install succeeds.
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
