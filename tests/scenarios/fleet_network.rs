//! A bad network between a device and its broker, as real processes on loopback: every byte
//! 250 ms late each way, and the connection cut again and again (at random moments, also in
//! the middle of batches and of a deployment). Telemetry must arrive whole, the deployment
//! must go through, and the device must count every reconnection.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::*;

/// Cuts here; `OUTPOST_CUTS` (`.ci/soak` makes 100).
fn cuts() -> u64 {
    std::env::var("OUTPOST_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

#[test]
fn a_slow_flapping_link_loses_no_telemetry_and_deployments_go_through() {
    let d = bed("flapping");
    let dir = &d.0;
    let fleet = Fleet::start(dir, None, None);
    let link = FlakyLink::start(&fleet.broker, Duration::from_millis(250));
    let config = device_config(dir, "dev-f", &link.url, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-f"]);
    // A deployment over the slow link.
    push_and_deploy_digits(|a| fleet.cli(dir, a), &["--device", "dev-f"], &["dev-f"]);
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);

    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut random = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let cuts = cuts();
    for cut in 0..cuts {
        eventually(secs(60), "the device connected again", || {
            (device.metric("outpost_fleet_connected") == Some(1)).then_some(())
        });
        if cut == cuts / 2 {
            // A deployment in the middle of the flapping: its desired state, the reported
            // states and their acknowledgements cross cut connections.
            fleet.cli(
                dir,
                &["fleet", "deploy", "digits@2.0.0", "--device", "dev-f"],
            );
        }
        std::thread::sleep(Duration::from_millis(200 + random(1200)));
        assert_eq!(link.cut(), 1, "cut {cut}: the device's one connection");
        // Seen as lost before the next round waits for a connection (reconnecting takes at
        // least the 250 ms backoff and a 500 ms round trip, so 0 is there to be seen).
        eventually(secs(30), "the device noticed the cut", || {
            (device.metric("outpost_fleet_connected") == Some(0)).then_some(())
        });
    }

    // The deployment made during the flapping is applied, and the fleet sees it.
    eventually(secs(90), "2.0.0 serving and reported applied", || {
        let in_sync = fleet.device("dev-f").is_some_and(|d| d["in_sync"] == true);
        (device.digits().as_deref() == Ok("2.0.0") && in_sync).then_some(())
    });
    eventually(secs(60), "the device connected after the last cut", || {
        (device.metric("outpost_fleet_connected") == Some(1)).then_some(())
    });
    // The backlog of the cuts is delivered: what remains is the last second's telemetry (a
    // record every 100 ms, each batch half a second on the way), never empty for long.
    eventually(secs(90), "the outbox's backlog delivered", || {
        device
            .metric("outpost_outbox_records")
            .is_some_and(|n| n <= 10)
            .then_some(())
    });
    let connections = device.metric("outpost_fleet_connections_total").unwrap();
    let lost = device.metric("outpost_fleet_disconnections_total").unwrap();
    let resent = device.metric("outpost_fleet_resent_batches_total").unwrap();
    assert!(
        lost >= cuts,
        "{lost} disconnections counted for {cuts} cuts"
    );
    assert!(
        connections > lost && connections as usize <= link.accepted(),
        "{connections} connections, {lost} lost, {} accepted by the link",
        link.accepted()
    );

    let last = assert_records_each_once(&fleet, "dev-f");
    eprintln!(
        "{cuts} cuts at 250 ms each way: {connections} connections, {lost} lost, {resent} \
         batches resent; {last} records, each once; 2.0.0 deployed mid-way and applied"
    );
}
