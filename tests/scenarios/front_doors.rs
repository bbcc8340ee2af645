//! The front doors under slow clients: a fleet and a device, each held to 1,024 file
//! descriptors, stay reachable for normal clients (HTTP and MQTT) while 2,000 connections each
//! hold half a request head open against the device's and the fleet's HTTP servers, and 2,000
//! more half a CONNECT against the fleet's broker, reconnecting whenever they are closed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::*;

const SLOW: usize = 2_000;
const FD_LIMIT: u64 = 1_024;

/// Raises this test's own file-descriptor limit so it can hold the attack's connections.
fn raise_own_fd_limit(wanted: u64) {
    let _ = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={wanted}:{wanted}"))
        .status();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap();
    assert!(
        soft >= wanted,
        "this test needs {wanted} open files (it has {soft}); raise the hard limit (ulimit -Hn)"
    );
}

/// Half an HTTP request head.
const HTTP: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
/// Half an MQTT CONNECT: its fixed header, announcing 60 bytes that never come.
const MQTT: &[u8] = &[0x10, 60, 0x00, 0x04, b'M', b'Q'];

/// Holds `SLOW` connections that each sent `start` against `addr`, opening a new one whenever
/// one is closed, until `stop`. Counts the connections the server closed.
fn slowloris(
    addr: SocketAddr,
    start: &'static [u8],
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicU64>,
) {
    let open = || -> Option<TcpStream> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.write_all(start).ok()?;
        s.set_nonblocking(true).ok()?;
        Some(s)
    };
    let mut conns: Vec<Option<TcpStream>> = (0..SLOW).map(|_| open()).collect();
    let mut buf = [0u8; 256];
    while !stop.load(Ordering::Relaxed) {
        for c in &mut conns {
            let gone = match c {
                None => true,
                Some(s) => match s.read(&mut buf) {
                    Ok(_) => true,
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                },
            };
            if gone {
                if c.is_some() {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
                *c = open();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn labelled_metric(url: &str, series: &str) -> u64 {
    let text = outpost_testkit::get(&format!("{url}/metrics")).text();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[test]
fn a_fleet_and_a_device_at_1024_fds_serve_normal_clients_under_2000_slow_connections_each() {
    raise_own_fd_limit(4 * SLOW as u64);
    let dir = bed("front-doors");
    let fleet = Fleet::launch_limited(&dir.0, &[], Some(FD_LIMIT));
    let config = device_config(&dir.0, "door-1", &fleet.broker, &[]);
    let device = Device::start_limited(&dir.0, &config, Some(FD_LIMIT));
    online(&fleet, &["door-1"]);
    push_and_deploy_digits(
        |args| fleet.cli(&dir.0, args),
        &["--device", "door-1"],
        &["door-1"],
    );

    let stop = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicU64::new(0));
    let addr = |url: &str| -> SocketAddr { url.split("//").nth(1).unwrap().parse().unwrap() };
    let broker: SocketAddr = fleet.broker.trim_start_matches("mqtt://").parse().unwrap();
    let attackers: Vec<_> = [
        (addr(&device.url), HTTP),
        (addr(&fleet.api), HTTP),
        (broker, MQTT),
    ]
    .into_iter()
    .map(|(target, start)| {
        let (stop, closed) = (Arc::clone(&stop), Arc::clone(&closed));
        std::thread::spawn(move || slowloris(target, start, stop, closed))
    })
    .collect();
    // The attack is in place once the servers are closing connections to make room.
    eventually(secs(60), "the slow connections to fill the doors", || {
        (closed.load(Ordering::Relaxed) >= 2 * SLOW as u64).then_some(())
    });

    for i in 0..10 {
        assert_eq!(
            device.digits(),
            Ok("1.0.0".to_owned()),
            "inference, round {i}"
        );
        let ready = outpost_testkit::get(&format!("{}/v2/health/ready", device.url));
        assert_eq!(ready.status, 200, "device health, round {i}");
        let health = outpost_testkit::get(&format!("{}/healthz", fleet.api));
        assert_eq!(health.status, 200, "fleet health, round {i}");
        assert_eq!(fleet.devices().len(), 1, "fleet API, round {i}");
        let id = format!("door-probe-{i}");
        assert_eq!(
            raw::connack(broker, id.as_bytes(), None),
            Some(0),
            "MQTT, round {i}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The device's own fleet link held through it.
    let reported = fleet.device("door-1").unwrap();
    assert_eq!(reported["online"], true, "{reported}");

    let evicted = |url: &str, prefix: &str, listener: &str| {
        labelled_metric(
            url,
            &format!("{prefix}_connections_evicted_total{{listener=\"{listener}\"}}"),
        )
    };
    // The wait above counts connections closed at all three doors together: each door's own
    // count is awaited, as one door can fill before another.
    eventually(secs(30), "the device's public door to make room", || {
        (evicted(&device.url, "outpost_http", "public") > 0).then_some(())
    });
    eventually(secs(30), "the fleet's API door to make room", || {
        (evicted(&fleet.api, "outpost_fleet_http", "api") > 0).then_some(())
    });
    eventually(secs(30), "the broker's gate to make room", || {
        (labelled_metric(&fleet.api, "outpost_fleet_mqtt_evicted_total") > 0).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    // Once they are gone the doors let go of their connections (the attackers' last ones are
    // closed by the header timeout, 10 s).
    eventually(secs(60), "the device's connections to drain", || {
        let open = labelled_metric(
            &device.url,
            "outpost_http_connections_open{listener=\"public\"}",
        );
        (open <= 2).then_some(())
    });
}
