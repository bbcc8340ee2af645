//! Power loss during install and activation: a device is killed with SIGKILL at a random
//! moment while it receives, verifies, compiles, records and activates a new version; after a
//! restart it must serve exactly the old or the new version, and whatever it lists as
//! installed must activate. Rounds: 10 here, `OUTPOST_CRASH_ROUNDS` (`.ci/soak` runs 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs;
use std::path::Path;
use std::time::Duration;

use outpost_testkit::{ADMIN_TOKEN, admin};
use support::*;

struct Running {
    device: Device,
    admin: String,
}

fn start(dir: &Path) -> Running {
    let (device, admin) = start_admin_device(dir);
    Running { device, admin }
}

/// A small xorshift, seeded from the clock: the moments of the kills.
fn random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn a_kill_9_during_install_and_activation_leaves_the_old_or_the_new_version_serving() {
    let rounds: usize = std::env::var("OUTPOST_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let dir = bed("power-loss");
    admin_device_config(&dir.0);
    let bundles = [
        ("1.0.0", fs::read(dir.0.join("digits-1.0.0.opb")).unwrap()),
        ("2.0.0", fs::read(dir.0.join("digits-2.0.0.opb")).unwrap()),
    ];
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut serving = "1.0.0".to_owned();
    let (mut killed_mid_way, mut completed) = (0, 0);
    for round in 0..rounds {
        let mut running = start(&dir.0);
        assert_eq!(
            running.device.digits(),
            Ok(serving.clone()),
            "round {round}, before"
        );
        let (target, bytes) = bundles
            .iter()
            .find(|(v, _)| *v != serving)
            .cloned()
            .unwrap();
        if installed_digits(&running.admin).contains(&target.to_owned()) {
            let gone = admin(
                "DELETE",
                &format!("{}/admin/models/digits/versions/{target}", running.admin),
                b"",
            );
            assert_eq!(gone.status, 204, "{}", gone.text());
        }
        let url = format!("{}/admin/bundles?activate=true", running.admin);
        // The kill may cut the connection: no status then.
        let upload = std::thread::spawn(move || {
            outpost_testkit::agent()
                .post(&url)
                .header("authorization", &format!("Bearer {ADMIN_TOKEN}"))
                .send(&bytes[..])
                .map_or(0, |r| r.status().as_u16())
        });
        // Install and activation of digits take a few hundred ms: kill somewhere in them.
        std::thread::sleep(Duration::from_millis(random(&mut rng) % 700));
        running.device.proc.kill9();
        let status = upload.join().unwrap();
        if status == 201 {
            completed += 1;
        } else {
            killed_mid_way += 1;
        }

        let running = start(&dir.0);
        let now = running
            .device
            .digits()
            .unwrap_or_else(|code| panic!("round {round}: nothing serves after the kill ({code})"));
        assert!(
            now == serving || now == target,
            "round {round}: serves {now}, neither {serving} nor {target}"
        );
        // An acknowledged activation survived the kill.
        if status == 201 {
            assert_eq!(
                now, target,
                "round {round}: an acknowledged activation was lost"
            );
        }
        // Whatever the device lists as installed is whole: it activates.
        for version in installed_digits(&running.admin) {
            let reply = admin(
                "POST",
                &format!("{}/admin/models/digits/activate", running.admin),
                format!("{{\"version\": \"{version}\"}}").as_bytes(),
            );
            assert_eq!(
                reply.status,
                200,
                "round {round}: {version}: {}",
                reply.text()
            );
        }
        // Leave the round's outcome active for the next round.
        let reply = admin(
            "POST",
            &format!("{}/admin/models/digits/activate", running.admin),
            format!("{{\"version\": \"{now}\"}}").as_bytes(),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        serving = now;
    }
    eprintln!(
        "{rounds} kills: {killed_mid_way} mid-way, {completed} after the activation was \
         acknowledged; every restart served the old or the new version"
    );
}
