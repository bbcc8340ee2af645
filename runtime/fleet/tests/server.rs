//! The fleet as a value: started in-process on ports the OS picks, stopped with everything it
//! started (API, MQTT client, embedded broker).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use outpost_fleet::{BrokerChoice, FleetOptions, Listeners, Server};

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

#[test]
fn an_open_embedded_broker_beyond_loopback_is_refused_unless_insecure() {
    let dir = std::env::temp_dir().join("outpost-fleet-open-broker");
    let mut open = options(&dir);
    open.broker = BrokerChoice::Embedded("0.0.0.0:0".parse().unwrap(), None);
    let err = open.validate().unwrap_err().to_string();
    assert!(err.contains("without logins"), "{err}");
    open.insecure = true;
    open.validate().unwrap();
    let mut guarded = options(&dir);
    guarded.broker = BrokerChoice::Embedded(
        "0.0.0.0:0".parse().unwrap(),
        Some(outpost_fleet::Logins::parse("dev-1:pw").unwrap()),
    );
    guarded.validate().unwrap();
}
