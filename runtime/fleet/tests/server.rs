//! The fleet as a value: started in-process on ports the OS picks, stopped with everything it
//! started (API, MQTT client, embedded broker).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use std::sync::atomic::Ordering;

use outpost_fleet::{BrokerChoice, FleetOptions, Listeners, Server};

mod raw;
use raw::*;

fn options(dir: &std::path::Path) -> FleetOptions {
    FleetOptions {
        data_dir: dir.to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        broker: BrokerChoice::Embedded("127.0.0.1:0".parse().unwrap(), None),
        public_url: None,
        token: None,
        trust: None,
        desired_ttl: Duration::from_secs(3600),
        replica: Some("in-process".into()),
        max_bundle_bytes: 1 << 20,
        retention: Duration::from_secs(3600),
        ingest_only: false,
        insecure: false,
        require_enrolment: false,
        share_group: None,
        rules: Vec::new(),
        per_device_metrics: false,
        database: None,
        artifacts_dir: None,
        advertise_url: None,
        http: outpost_fleet::default_http_limits(),
        mqtt_tls: None,
        api_tls: None,
        device_quota_bytes: 64 << 20,
    }
}

fn healthz(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

fn broker_addr(url: &str) -> SocketAddr {
    url.trim_start_matches("mqtt://").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_fleet_releases_its_api_and_its_embedded_broker() {
    let dir = std::env::temp_dir().join(format!("outpost-fleet-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = options(&dir);
    let listeners = Listeners::bind(&options).await.unwrap();
    let server = Server::start(options.clone(), listeners).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), server.subscribed())
        .await
        .expect("the fleet subscribes on its own broker");
    let api = server.ready().api;
    let broker = broker_addr(&server.ready().broker);
    let key = server.ready().public_key.clone();
    let reply = tokio::task::spawn_blocking(move || healthz(api))
        .await
        .unwrap()
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(server.fleet().store.devices().unwrap().is_empty());

    server.stop().await.unwrap();
    assert!(
        TcpStream::connect_timeout(&api, Duration::from_secs(1)).is_err(),
        "API still open"
    );
    assert!(
        TcpStream::connect_timeout(&broker, Duration::from_secs(1)).is_err(),
        "embedded broker still listening"
    );

    // The same data directory (and so the same key) serves again at once.
    let listeners = Listeners::bind(&options).await.unwrap();
    let again = Server::start(options, listeners).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), again.subscribed())
        .await
        .expect("the restarted fleet subscribes");
    assert_eq!(again.ready().public_key, key, "the fleet key is kept");
    again.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_dated_in_the_far_future_cannot_escape_retention() {
    let dir = std::env::temp_dir().join(format!("outpost-fleet-future-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = options(&dir);
    let listeners = Listeners::bind(&options).await.unwrap();
    let server = Server::start(options, listeners).await.unwrap();
    let fleet = server.fleet();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A forged first record dated 2^64-1, then genuine ones.
    let batch = |records: Vec<(u64, u64)>| {
        serde_json::json!({
            "v": 1,
            "device": "dev-f",
            "records": records.iter().map(|(seq, time)| serde_json::json!({"seq": seq, "time": time, "body": {}})).collect::<Vec<_>>(),
            "dropped": 0,
        })
        .to_string()
    };
    let topic = "outpost/v1/dev-f/telemetry";
    assert!(fleet.ingest(topic, batch(vec![(1, u64::MAX)]).as_bytes()));
    assert!(fleet.ingest(topic, batch(vec![(2, now), (3, now)]).as_bytes()));
    let stored = fleet
        .store
        .records(
            outpost_fleet::store::Stream::Telemetry,
            Some("dev-f"),
            None,
            10,
        )
        .unwrap();
    assert_eq!(stored.len(), 3);
    assert!(stored[0].record.time <= now + 300, "{:?}", stored[0]);
    // Past the retention of everything stored, everything goes, the forged record first, in
    // steps of at most the limit asked for.
    assert_eq!(fleet.prune(now + 3600, 1).unwrap(), 1);
    assert_eq!(fleet.prune(now + 3600, 1000).unwrap(), 2);
    assert_eq!(fleet.prune(now + 3600, 1000).unwrap(), 0);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a fleet on `options` and waits until it subscribes on its broker.
async fn started(options: &FleetOptions) -> Server {
    let listeners = Listeners::bind(options).await.unwrap();
    let server = Server::start(options.clone(), listeners).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), server.subscribed())
        .await
        .expect("the fleet subscribes on its own broker");
    server
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outpost-fleet-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_beyond_loopback_demands_logins_unless_insecure() {
    let dir = scratch("open-broker");
    let mut options = options(&dir);
    options.broker = BrokerChoice::Embedded("0.0.0.0:0".parse().unwrap(), None);
    let server = started(&options).await;
    let port = broker_addr(&server.ready().broker).port();
    let broker = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(
        connack(broker, b"outpost-dev-1", None),
        Some(BAD_LOGIN),
        "an anonymous client was let in"
    );
    assert!(server.fleet().require_enrolment);
    server.stop().await.unwrap();

    options.insecure = true;
    let server = started(&options).await;
    let port = broker_addr(&server.ready().broker).port();
    let broker = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(connack(broker, b"outpost-dev-1", None), Some(ACCEPTED));
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_issues_a_login_at_once_and_revocation_closes_and_refuses_it() {
    let dir = scratch("enrolment");
    let mut options = options(&dir);
    options.require_enrolment = true;
    let server = started(&options).await;
    let broker = broker_addr(&server.ready().broker);
    let fleet = server.fleet();
    // Not enrolled: no login, and publishing does not register a device.
    assert_eq!(
        connack(broker, b"outpost-dev-1", Some(("dev-1", "guess"))),
        Some(BAD_LOGIN)
    );
    assert_eq!(connack(broker, b"outpost-dev-1", None), Some(BAD_LOGIN));
    assert!(fleet.ingest("outpost/v1/ghost/status", br#"{"v":1,"online":true}"#));
    assert!(
        fleet.store.device("ghost").unwrap().is_none(),
        "a ghost registered"
    );
    assert_eq!(fleet.metrics.unenrolled.load(Ordering::Relaxed), 1);

    let first = fleet.enroll("dev-1").unwrap();
    assert!(!first.replaced);
    assert_eq!(first.username, "dev-1");
    assert_eq!(first.fleet_key, server.ready().public_key);
    assert!(
        fleet.store.device("dev-1").unwrap().is_some(),
        "enrolment registers"
    );
    assert!(fleet.is_enrolled("dev-1"));
    let mut stream = session(broker, "outpost-dev-1", ("dev-1", &first.password));
    assert_eq!(
        subscribe(&mut stream, "outpost/v1/dev-1/desired"),
        Some(SUBACK)
    );
    // Another device's login is not this one's.
    assert_eq!(
        connack(broker, b"outpost-dev-2", Some(("dev-2", &first.password))),
        Some(BAD_LOGIN)
    );
    // Another device enrolled, or revoked, leaves this connection alone.
    fleet.enroll("dev-9").unwrap();
    assert!(fleet.revoke("dev-9").unwrap());
    assert_eq!(
        subscribe(&mut stream, outpost_proto::FLEET_PRESENCE_FILTER),
        Some(SUBACK),
        "another device's enrolment closed this connection"
    );

    // Enrolling again replaces the password: the connection that used the old one is closed.
    let second = fleet.enroll("dev-1").unwrap();
    assert!(second.replaced);
    assert_ne!(second.password, first.password);
    assert!(
        closed(&mut stream),
        "the old login's connection is still open"
    );
    assert_eq!(
        connack(broker, b"outpost-dev-1", Some(("dev-1", &first.password))),
        Some(BAD_LOGIN)
    );
    server.stop().await.unwrap();

    // Kept across a restart, as a hash only.
    let server = started(&options).await;
    let broker = broker_addr(&server.ready().broker);
    let fleet = server.fleet();
    let stored = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .flatten()
        .any(|f| {
            std::fs::read(f.path())
                .is_ok_and(|b| b.windows(64).any(|w| w == second.password.as_bytes()))
        });
    assert!(!stored, "the password is stored in clear");
    let mut stream = session(broker, "outpost-dev-1", ("dev-1", &second.password));
    assert_eq!(
        subscribe(&mut stream, "outpost/v1/dev-1/desired"),
        Some(SUBACK)
    );

    // Revoked: closed at once, refused after; the registry keeps the device, not enrolled.
    assert!(fleet.revoke("dev-1").unwrap());
    assert!(
        closed(&mut stream),
        "a revoked login's connection is still open"
    );
    assert_eq!(
        connack(broker, b"outpost-dev-1", Some(("dev-1", &second.password))),
        Some(BAD_LOGIN)
    );
    assert!(!fleet.is_enrolled("dev-1"));
    assert!(fleet.store.device("dev-1").unwrap().is_some());
    assert!(!fleet.revoke("dev-1").unwrap(), "revoked twice");
    let revoked = fleet
        .metrics
        .gate
        .get()
        .unwrap()
        .revoked
        .load(Ordering::Relaxed);
    assert!(revoked >= 1, "{revoked}");
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_past_its_quota_is_refused_until_retention_frees_room() {
    let dir = scratch("quota");
    let mut options = options(&dir);
    options.device_quota_bytes = 8 * 1024;
    let server = started(&options).await;
    let fleet = server.fleet();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let batch = |device: &str, seqs: std::ops::Range<u64>| {
        let records: Vec<_> = seqs
            .map(|seq| serde_json::json!({"seq": seq, "time": now, "body": {"pad": "x".repeat(200)}}))
            .collect();
        serde_json::json!({"v": 1, "device": device, "records": records, "dropped": 0}).to_string()
    };
    let stored = |device: &str| {
        fleet
            .store
            .records(
                outpost_fleet::store::Stream::Telemetry,
                Some(device),
                None,
                10_000,
            )
            .unwrap()
            .len()
    };
    // A flood from one device fills its own quota only.
    assert!(fleet.ingest(
        "outpost/v1/dev-q/telemetry",
        batch("dev-q", 1..1001).as_bytes()
    ));
    assert!(fleet.ingest(
        "outpost/v1/dev-r/telemetry",
        batch("dev-r", 1..21).as_bytes()
    ));
    let flooder = fleet.store.device("dev-q").unwrap().unwrap();
    let kept = stored("dev-q");
    assert!(kept > 10 && kept < 60, "{kept} records kept");
    assert!(
        flooder.stored_bytes <= 8 * 1024 + 512,
        "{}",
        flooder.stored_bytes
    );
    assert_eq!(flooder.over_quota, 1000 - kept as u64);
    assert_eq!(
        fleet.metrics.over_quota.load(Ordering::Relaxed),
        1000 - kept as u64
    );
    assert_eq!(stored("dev-r"), 20, "another device's records were refused");
    // Retention frees the room (and the count of what is held) again.
    assert!(fleet.prune(now + 3600, 100_000).unwrap() >= kept);
    assert_eq!(
        fleet.store.device("dev-q").unwrap().unwrap().stored_bytes,
        0
    );
    assert!(fleet.ingest(
        "outpost/v1/dev-q/telemetry",
        batch("dev-q", 2000..2005).as_bytes()
    ));
    assert_eq!(stored("dev-q"), 5);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_device_does_not_push_out_another_devices_records() {
    let dir = scratch("flood");
    let mut options = options(&dir);
    options.require_enrolment = true;
    let server = started(&options).await;
    let broker = broker_addr(&server.ready().broker);
    let fleet = server.fleet();
    let flooder = fleet.enroll("dev-flood").unwrap();
    let genuine = fleet.enroll("dev-ok").unwrap();
    let batch = |device: &str, seq: u64, pad: usize| {
        serde_json::json!({"v": 1, "device": device, "dropped": 0, "records": [
            {"seq": seq, "time": 1, "body": {"pad": "x".repeat(pad)}}
        ]})
        .to_string()
    };
    // One device publishes 900 KiB batches at QoS 0 as fast as its socket takes them, for 3 s.
    let flood = {
        let password = flooder.password.clone();
        let batch = batch("dev-flood", 0, 900 * 1024);
        std::thread::spawn(move || {
            let mut stream = session(broker, "outpost-dev-flood", ("dev-flood", &password));
            stream
                .set_write_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let started = std::time::Instant::now();
            let mut sent = 0u64;
            while started.elapsed() < Duration::from_secs(3) {
                let mut body = field(b"outpost/v1/dev-flood/telemetry");
                body.extend(batch.as_bytes());
                if stream.write_all(&packet(0x30, &body)).is_err() {
                    break;
                }
                sent += 1;
            }
            sent
        })
    };
    // Meanwhile another device sends 30 records, each acknowledged by the broker.
    let mut stream = session(broker, "outpost-dev-ok", ("dev-ok", &genuine.password));
    for seq in 1..=30 {
        let payload = batch("dev-ok", seq, 100);
        assert_eq!(
            publish(
                &mut stream,
                "outpost/v1/dev-ok/telemetry",
                payload.as_bytes()
            ),
            Some(PUBACK)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = flood.join().unwrap();
    let stored = || {
        fleet
            .store
            .records(
                outpost_fleet::store::Stream::Telemetry,
                Some("dev-ok"),
                None,
                100,
            )
            .unwrap()
            .len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stored() < 30 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(stored(), 30, "records lost under a flood of {sent} batches");
    let throttled = fleet
        .metrics
        .gate
        .get()
        .unwrap()
        .throttled
        .load(Ordering::Relaxed);
    assert!(
        throttled > 0,
        "the flood was never held back ({sent} batches)"
    );
    drop(stream);
    server.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
