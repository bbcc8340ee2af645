//! Fleet ingestion benchmark: how many telemetry records a fleet manager with its embedded
//! broker stores per second (each one de-duplicated, flushed to sled, then acknowledged), fed
//! by simulated devices over loopback MQTT. Prints the rate and, in the same run, the rate of
//! the same batches published QoS 1 to the broker with nobody storing them (the ratio is the
//! fleet's own cost).
//!
//! Run with: `cargo bench -p outpost-cli --bench fleet` (release profile), or add
//! `--profile dev`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use outpost_fleet::{BrokerChoice, FleetOptions};
use outpost_proto::{DeviceId, TelemetryBatch, TelemetryRecord, Topic, Topics};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

const DEVICES: usize = 20;
const BATCHES: usize = 50;
const RECORDS: usize = 20;

fn record(seq: u64) -> TelemetryRecord {
    TelemetryRecord {
        seq,
        time: 1,
        body: serde_json::json!({
            "uptime_s": seq, "cpu_seconds": 1.5, "rss_bytes": 31_000_000, "disk_bytes": 2_000_000,
            "models": [{"model": "digits", "version": "1.0.0", "requests": seq * 10,
                        "errors": {}, "latency_buckets": [[0.001, 5], [0.01, 9]], "latency_sum": 0.02}],
        }),
    }
}

/// Publishes every batch of one simulated device QoS 1 on `topic_of(device)` and waits for
/// all acknowledgements.
async fn device(port: u16, id: DeviceId, topic: String) {
    let mut options = MqttOptions::new(format!("bench-{id}"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, 64);
    let publisher = tokio::spawn(async move {
        for b in 0..BATCHES {
            let records = (0..RECORDS)
                .map(|r| record((b * RECORDS + r + 1) as u64))
                .collect();
            let batch = TelemetryBatch {
                v: 1,
                device: id.clone(),
                records,
                dropped: 0,
            };
            client
                .publish(
                    topic.clone(),
                    QoS::AtLeastOnce,
                    false,
                    serde_json::to_vec(&batch).unwrap(),
                )
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    while acked < BATCHES {
        match events.poll().await.unwrap() {
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            Event::Outgoing(Outgoing::Disconnect) => break,
            _ => {}
        }
    }
    let _ = publisher.await;
}

async fn stored(api: &str) -> u64 {
    let api = api.to_owned();
    tokio::task::spawn_blocking(move || {
        let text = ureq::get(&format!("{api}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("outpost_fleet_records_total "))
            .unwrap()
            .parse()
            .unwrap()
    })
    .await
    .unwrap()
}

fn main() {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let dir = std::env::temp_dir().join(format!("outpost-fleet-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let options = FleetOptions {
        data_dir: dir.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        broker: BrokerChoice::Embedded("127.0.0.1:0".parse().unwrap(), None),
        public_url: None,
        token: None,
        trust: None,
        desired_ttl: Duration::from_secs(3600),
        replica: Some("bench".into()),
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
    };
    let server = runtime.block_on(async {
        let listeners = outpost_fleet::Listeners::bind(&options).await.unwrap();
        let server = outpost_fleet::Server::start(options, listeners)
            .await
            .unwrap();
        server.subscribed().await;
        server
    });
    let ready = server.ready().clone();
    let api = format!("http://{}", ready.api);
    let port: u16 = ready.broker.rsplit(':').next().unwrap().parse().unwrap();
    let total = (DEVICES * BATCHES * RECORDS) as u64;
    let size = serde_json::to_vec(&record(1)).unwrap().len();

    runtime.block_on(async {
        // `stored`: on each device's telemetry topic; otherwise on a topic nobody stores.
        let run = |stored: bool| {
            let tasks: Vec<_> = (0..DEVICES)
                .map(|d| {
                    let id = DeviceId::new(format!("bench-{stored}-{d}")).unwrap();
                    let topic = if stored {
                        Topics::new(&id).name(Topic::Telemetry)
                    } else {
                        format!("outpost/v1/{id}/unstored")
                    };
                    tokio::spawn(device(port, id, topic))
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.unwrap();
                }
            }
        };
        // Baseline: the same traffic on a topic nobody stores.
        let t = Instant::now();
        run(false).await;
        let broker_only = total as f64 / t.elapsed().as_secs_f64();

        let before = stored(&api).await;
        let t = Instant::now();
        run(true).await;
        while stored(&api).await < before + total {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fleet = total as f64 / t.elapsed().as_secs_f64();
        println!("fleet ingestion ({profile} profile, embedded broker, {DEVICES} devices, batches of {RECORDS} records of {size} bytes):");
        println!("  published and acknowledged, not stored: {broker_only:>9.0} records/s");
        println!("  stored once each by the fleet:          {fleet:>9.0} records/s ({:.2}x the broker alone)", broker_only / fleet);
        server.stop().await.unwrap();
    });
    let _ = std::fs::remove_dir_all(&dir);
}
