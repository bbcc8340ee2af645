//! Dynamic batching benchmark: what batching buys or costs, per workload, from one run.
//!
//! For each example model: the backend's cost per item at batch 1, 2, 4 and 8 (raw tract, in
//! process: what `outpost model inspect --bench` prints), then the device end to end over HTTP
//! on loopback at 1, 4 and 16 concurrent clients, batching off and on: requests per second,
//! p50 and p99, and the ratio on/off, each cell measured for the same wall-clock time.
//!
//! Run with: `cargo bench -p outpost-cli --bench batching` (release profile), or add
//! `--profile dev` for the development profile the tests use. `OUTPOST_BENCH_SECONDS` sets the
//! time per cell (default 3).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_bundle::{Bundle, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_examples::Example;
use outpost_inference::{Backend, Tract};
use serde_json::{Value, json};

/// Queue delay of the batching configuration, in microseconds.
const DELAY_US: u64 = 2_000;

struct Workload {
    name: &'static str,
    example: Example,
    model: &'static str,
    onnx: &'static [u8],
    request: Value,
}

/// A device on loopback serving `bundle` with `extra` configuration; stops when dropped.
struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(dir: &std::path::Path, bundle: &[u8], trust: &TrustStore, extra: &str) -> Self {
        let text = format!(
            "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\
             max_concurrent_requests = 32\n{extra}"
        );
        let config = Config::from_toml(&text, dir).unwrap();
        let device = Arc::new(Device::with_trust(&config, trust.clone()).unwrap());
        device.install_and_activate(bundle).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listeners = Listeners::bind(&config).await.unwrap();
                addr_tx.send(listeners.public_addr().unwrap()).unwrap();
                outpost_device::run(device, &config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `clients` threads posting `body` to `url` for `time`: requests per second, p50 and p99 in
/// milliseconds.
fn load(url: &str, body: &Value, clients: usize, time: Duration) -> (f64, f64, f64) {
    let body = body.to_string();
    let started = Instant::now();
    let mut samples: Vec<f64> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let body = body.as_str();
                scope.spawn(move || {
                    let agent = outpost_testkit::agent();
                    let mut mine = Vec::new();
                    while started.elapsed() < time {
                        let t = Instant::now();
                        let r = agent
                            .post(url)
                            .header("content-type", "application/json")
                            .send(body.as_bytes());
                        let mut r = r.expect("the device answers");
                        let _ = r.body_mut().read_to_vec();
                        assert_eq!(r.status(), 200);
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    mine
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (samples.len() as f64 / elapsed, at(0.5), at(0.99))
}

fn main() {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let seconds: f64 = std::env::var("OUTPOST_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let time = Duration::from_secs_f64(seconds);
    let root = std::env::temp_dir().join(format!("outpost-batching-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let key = SecretKey::from_seed(&[3; 32]);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    let sensor_steps: Vec<Vec<f64>> = (0..16)
        .map(|i| vec![60.0 + f64::from(i) * 0.1, 0.5, 10.0])
        .collect();
    let workloads = [
        Workload {
            name: "digits MLP",
            example: Example::Digits,
            model: "digits",
            onnx: outpost_examples::DIGITS_ONNX,
            request: outpost_testkit::digits_request(&[8.0; 64]),
        },
        Workload {
            name: "sensor autoencoder",
            example: Example::Sensor,
            model: "sensor-anomaly",
            onnx: outpost_examples::SENSOR_ONNX,
            request: json!({"inputs": [{"name": "readings", "shape": [16, 3], "datatype": "FP32",
                                        "data": sensor_steps}]}),
        },
    ];
    println!("profile {profile}, {seconds} s per cell, batching: max 8, queue delay {DELAY_US} µs");
    for w in &workloads {
        let model = Tract.load(w.onnx, &[]).unwrap();
        let costs = outpost_inference::batch::per_item_cost(
            model.as_ref(),
            &[1, 2, 4, 8],
            Duration::from_millis(500),
        )
        .unwrap();
        let base = costs[0].1.as_secs_f64();
        let line: Vec<String> = costs
            .iter()
            .map(|(n, c)| {
                format!(
                    "{n}: {:.1} µs ({:.2}×)",
                    c.as_secs_f64() * 1e6,
                    c.as_secs_f64() / base
                )
            })
            .collect();
        println!(
            "\n{}: raw tract per item at batch {}",
            w.name,
            line.join(", ")
        );
        println!(
            "clients | off req/s | off p50 | off p99 | on req/s | on p50 | on p99 | throughput on/off | p50 on−off"
        );
        let mut bundle = Bundle::build(w.example.build_input().unwrap()).unwrap();
        bundle.sign(&key);
        let bundle = bundle.to_bytes();
        let off_dir = root.join(format!("{}-off", w.model));
        let on_dir = root.join(format!("{}-on", w.model));
        std::fs::create_dir_all(&off_dir).unwrap();
        std::fs::create_dir_all(&on_dir).unwrap();
        let off = Server::start(&off_dir, &bundle, &trust, "");
        let on = Server::start(
            &on_dir,
            &bundle,
            &trust,
            &format!(
                "[serving.{}]\nbatching = {{ max_batch_size = 8, max_queue_delay_us = {DELAY_US} }}\n",
                w.model
            ),
        );
        let path = format!("/v2/models/{}/infer", w.model);
        for clients in [1, 4, 16] {
            let (off_rps, off_p50, off_p99) =
                load(&format!("{}{path}", off.url), &w.request, clients, time);
            let (on_rps, on_p50, on_p99) =
                load(&format!("{}{path}", on.url), &w.request, clients, time);
            println!(
                "{clients:>7} | {off_rps:>9.0} | {off_p50:>5.2} ms | {off_p99:>5.2} ms | {on_rps:>8.0} | {on_p50:>4.2} ms | {on_p99:>4.2} ms | {:>17.2}× | {:+.2} ms",
                on_rps / off_rps,
                on_p50 - off_p50
            );
        }
    }
    beside_a_device(&root, &trust, &key, time);
    let _ = std::fs::remove_dir_all(&root);
}

/// A batch job on the same cores as a serving device: the endpoint's latency with one client
/// alone, beside a job at normal priority, and beside a job at its default `--nice 10`.
fn beside_a_device(root: &std::path::Path, trust: &TrustStore, key: &SecretKey, time: Duration) {
    let bin = env!("CARGO_BIN_EXE_outpost");
    let dir = root.join("beside");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    let built = std::process::Command::new(bin)
        .args([
            "bundle",
            "build",
            "--onnx",
            "digits.onnx",
            "--name",
            "job",
            "--version",
            "1.0.0",
        ])
        .args(["--out", "job.opb"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    outpost_testkit::write_npy_f32(
        &dir.join("rows.npy"),
        &[200_000, 64],
        (0..200_000 * 64).map(|i| (i % 17) as f32),
    );
    let mut bundle = Bundle::build(Example::Digits.build_input().unwrap()).unwrap();
    bundle.sign(key);
    let server = Server::start(&dir, &bundle.to_bytes(), trust, "");
    let url = format!("{}/v2/models/digits/infer", server.url);
    let request = outpost_testkit::digits_request(&[8.0; 64]);
    println!(
        "\na batch job beside the device (digits, one client; the job: digits rows on every core)"
    );
    println!("job         | req/s | p50     | p99     | job rows/s");
    let (rps, p50, p99) = load(&url, &request, 1, time);
    println!("none        | {rps:>5.0} | {p50:.2} ms | {p99:.2} ms |");
    for nice in ["0", "10"] {
        let started = Instant::now();
        let mut job = std::process::Command::new(bin)
            .args([
                "batch", "--bundle", "job.opb", "--input", "rows.npy", "--output",
            ])
            .args(["answers.jsonl", "--overwrite", "--nice", nice])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let (rps, p50, p99) = load(&url, &request, 1, time);
        let _ = job.kill();
        let _ = job.wait();
        let secs = started.elapsed().as_secs_f64();
        let rows = std::fs::read_to_string(dir.join("answers.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        println!(
            "--nice {nice:<4} | {rps:>5.0} | {p50:.2} ms | {p99:.2} ms | {:.0}",
            rows as f64 / secs
        );
    }
}
