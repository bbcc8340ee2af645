//! Serving benchmark: prints, from one run, raw in-process tract latency for each example
//! model against end-to-end HTTP latency through the guest (the ratio), the guest call
//! overhead, the time from process start to the first served request, idle RSS, and the size
//! of the `outpost` binary this profile built; and what a shadow candidate ten times slower or
//! more than the primary costs the primary's latency (median and p95, with and without it);
//! and `outpost batch` over 200,000 digits rows on every core against raw tract on the same
//! cores (items per second, at 1 and 32 rows per call, JSON Lines and `.npy` output).
//!
//! Run with: `cargo bench -p outpost-cli --bench serving` (release profile), or add
//! `--profile dev` for the development profile the tests use.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_bundle::manifest::DataType;
use outpost_bundle::{Bundle, SecretKey, TrustStore};
use outpost_device::{Config, Device};
use outpost_engine::Payload;
use outpost_examples::Example;
use outpost_inference::Tensor;
use outpost_inference::{Backend, Tract};

const ITERATIONS: usize = 2000;

/// Median of `n` timed runs of `f`, in microseconds.
fn median_us(n: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    let mut samples: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[n / 2]
}

fn f32_tensor(name: &str, shape: Vec<u64>, value: f32) -> Tensor {
    let n: u64 = shape.iter().product();
    Tensor {
        name: name.into(),
        datatype: DataType::F32,
        shape,
        data: (0..n).flat_map(|_| value.to_le_bytes()).collect(),
    }
}

fn main() {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let dir = std::env::temp_dir().join(format!("outpost-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // Raw tract, in process.
    let digits_model = Tract.load(outpost_examples::DIGITS_ONNX, &[]).unwrap();
    // `cargo bench --bench serving -- backends`: only tract against onnxruntime.
    if std::env::args().skip(1).any(|a| a == "backends") {
        backends_side_by_side(&PathBuf::from(env!("CARGO_BIN_EXE_outpost")), &dir);
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // `cargo bench --bench serving -- batch`: only the batch jobs.
    if std::env::args().skip(1).any(|a| a == "batch") {
        batch_against_raw(
            &PathBuf::from(env!("CARGO_BIN_EXE_outpost")),
            &dir,
            &digits_model,
        );
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let sensor_model = Tract.load(outpost_examples::SENSOR_ONNX, &[]).unwrap();
    let raw_digits = median_us(ITERATIONS, || {
        digits_model
            .run(vec![f32_tensor("input", vec![1, 64], 0.5)], 1 << 20)
            .unwrap();
    });
    let raw_sensor = median_us(ITERATIONS, || {
        sensor_model
            .run(vec![f32_tensor("input", vec![1, 48], 0.1)], 1 << 20)
            .unwrap();
    });

    // A device with the examples, written to disk so a process can start from it.
    let key = SecretKey::from_seed(&[3; 32]);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    std::fs::write(dir.join("trust.toml"), trust.to_toml_string()).unwrap();
    std::fs::write(
        dir.join("device.toml"),
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\ntrust_store = \"trust.toml\"\nmax_concurrent_requests = 4\n",
    )
    .unwrap();
    let config = Config::load(&dir.join("device.toml")).unwrap();
    let mut hostile = Example::Digits.build_input().unwrap();
    hostile.name = "echo".into();
    hostile.guest = outpost_examples::HOSTILE_GUEST.to_vec();
    hostile.api = Default::default();
    hostile.api.raw_content_types = vec!["text/plain".into()];
    hostile.baseline = None;
    {
        let device = Arc::new(Device::with_trust(&config, trust.clone()).unwrap());
        for input in [
            Example::Digits.build_input().unwrap(),
            Example::Sensor.build_input().unwrap(),
            hostile,
        ] {
            let mut b = Bundle::build(input).unwrap();
            b.sign(&key);
            device.install_and_activate(&b.to_bytes()).unwrap();
        }
        // Guest call overhead: a guest that echoes its input, no model, through the device.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let echo = median_us(ITERATIONS, || {
            let payload = Payload::Raw {
                content_type: "text/plain".into(),
                body: b"ping".to_vec(),
            };
            rt.block_on(device.infer("echo", None, payload)).unwrap();
        });
        let through_guest = median_us(ITERATIONS, || {
            let payload = Payload::Tensors(vec![f32_tensor("pixels", vec![1, 64], 8.0)]);
            rt.block_on(device.infer("digits", None, payload)).unwrap();
        });
        // A shadow: the same echo, slowed by its metadata, on every request.
        let mut slow = Example::Digits.build_input().unwrap();
        slow.name = "echo".into();
        slow.version = "2.0.0".parse().unwrap();
        slow.guest = outpost_examples::HOSTILE_GUEST.to_vec();
        slow.api = Default::default();
        slow.api.raw_content_types = vec!["text/plain".into()];
        slow.baseline = None;
        slow.metadata = [("work".to_owned(), serde_json::json!(1_000))].into();
        let mut b = Bundle::build(slow).unwrap();
        b.sign(&key);
        device.install(&b.to_bytes()).unwrap();
        let tensor_echo = |device: &Arc<Device>| {
            let mut samples: Vec<f64> = (0..ITERATIONS)
                .map(|_| {
                    let payload = Payload::Tensors(vec![f32_tensor("x", vec![1, 4], 1.0)]);
                    let t = Instant::now();
                    rt.block_on(device.infer("echo", None, payload)).unwrap();
                    t.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            samples.sort_by(|a, b| a.total_cmp(b));
            (samples[ITERATIONS / 2], samples[ITERATIONS * 95 / 100])
        };
        let (alone, alone_p95) = tensor_echo(&device);
        let shadow: outpost_device::policy::Policy = serde_json::from_value(
            serde_json::json!({"shadow": {"id": "bench", "candidate": "2.0.0", "queue": 64}}),
        )
        .unwrap();
        device.set_policy("echo", shadow).unwrap();
        let (shadowed, shadowed_p95) = tensor_echo(&device);
        std::thread::sleep(Duration::from_secs(2));
        let (agreed, disagreed, dropped) = device.metrics.shadow_counts("echo", "2.0.0");
        device
            .set_policy("echo", outpost_device::policy::Policy::Primary)
            .unwrap();
        println!("profile                              {profile}");
        println!("raw tract, digits MLP                {raw_digits:>9.1} µs");
        println!("raw tract, sensor autoencoder        {raw_sensor:>9.1} µs");
        println!("guest call (instantiate + echo)      {echo:>9.1} µs");
        println!(
            "digits through the guest, in process {through_guest:>9.1} µs  ({:.2}× raw tract)",
            through_guest / raw_digits
        );
        println!("primary alone, tensor echo           {alone:>9.1} µs  (p95 {alone_p95:.1} µs)");
        println!(
            "primary with a slow shadow (queue 64) {shadowed:>8.1} µs  (p95 {shadowed_p95:.1} µs; {:.2}× and {:.2}× alone; shadow ran {}, dropped {dropped})",
            shadowed / alone,
            shadowed_p95 / alone_p95,
            agreed + disagreed
        );
    }

    // A real process: start to first served request, HTTP latency, idle RSS.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_outpost"));
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["device", "run", "--config", "device.toml"])
        .current_dir(&dir)
        .env("OUTPOST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("device exited").unwrap();
        if let Some(i) = line.find("serving addr=") {
            break line[i + 13..].split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let digits_body = serde_json::json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": vec![8.0; 64]}]}).to_string();
    let sensor_body = serde_json::json!({"inputs": [{"name": "readings", "shape": [16, 3], "datatype": "FP32", "data": vec![[43.0, 0.45, 3.5]; 16]}]}).to_string();
    let post = |model: &str, body: &str| {
        let mut r = agent
            .post(&format!("http://{addr}/v2/models/{model}/infer"))
            .header("content-type", "application/json")
            .send(body.as_bytes())
            .unwrap();
        r.body_mut().read_to_vec().unwrap();
    };
    post("digits", &digits_body);
    let first_request = started.elapsed();
    let http_digits = median_us(ITERATIONS, || post("digits", &digits_body));
    let http_sensor = median_us(ITERATIONS, || post("sensor-anomaly", &sensor_body));
    std::thread::sleep(Duration::from_secs(1));
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);

    println!(
        "HTTP end to end, digits              {http_digits:>9.1} µs  ({:.2}× raw tract)",
        http_digits / raw_digits
    );
    println!(
        "HTTP end to end, sensor              {http_sensor:>9.1} µs  ({:.2}× raw tract)",
        http_sensor / raw_sensor
    );
    println!(
        "process start to first served request {:>8.1} ms  (compiled guests cached)",
        first_request.as_secs_f64() * 1e3
    );
    println!(
        "idle RSS after serving, 3 models     {:>9.1} MB",
        rss_kb as f64 / 1024.0
    );
    println!(
        "outpost binary ({profile})              {:>9.1} MB",
        size as f64 / 1e6
    );
    batch_against_raw(&bin, &dir, &digits_model);
    backends_side_by_side(&bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where `models/published/fetch.py` keeps the published models.
fn published_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_PUBLISHED_DIR") {
        return dir.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    cache.join("outpost/published")
}

/// tract against onnxruntime, one thread each, on the digits MLP and the published PP-LCNet
/// CNN (when fetched): raw in process, and through a device (the `--onnx` bundle's generic
/// guest) on each backend, per call, from one run.
fn backends_side_by_side(bin: &std::path::Path, dir: &std::path::Path) {
    use outpost_inference::onnxruntime::{Onnxruntime, OrtOptions};
    let Some(library) = outpost_testkit::onnxruntime_library() else {
        println!("onnxruntime side by side: skipped (no libonnxruntime; set ORT_DYLIB_PATH)");
        return;
    };
    let ort = Onnxruntime::load(
        &library,
        OrtOptions {
            threads: 1,
            sessions: 1,
        },
    )
    .unwrap();
    println!("onnxruntime {} from {}", ort.version(), library.display());
    let key = SecretKey::from_seed(&[3; 32]);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let orientation = published_dir().join("orientation.onnx");
    /// One model of the comparison: its label, file, input, shape, `--input-shape` and runs.
    struct Workload {
        label: &'static str,
        bytes: Vec<u8>,
        input: &'static str,
        shape: Vec<u64>,
        pin: &'static str,
        n: usize,
    }
    let mut workloads = vec![Workload {
        label: "digits MLP",
        bytes: outpost_examples::DIGITS_ONNX.to_vec(),
        input: "input",
        shape: vec![1, 64],
        pin: "input=1,64",
        n: ITERATIONS,
    }];
    match std::fs::read(&orientation) {
        Ok(bytes) => workloads.push(Workload {
            label: "PP-LCNet CNN 224×224",
            bytes,
            input: "x",
            shape: vec![1, 3, 224, 224],
            pin: "x=1,3,224,224",
            n: 60,
        }),
        Err(_) => println!(
            "PP-LCNet: skipped ({} missing; run models/published/fetch.py)",
            orientation.display()
        ),
    }
    for Workload {
        label,
        bytes,
        input,
        shape,
        pin,
        n,
    } in workloads
    {
        let declared = vec![outpost_bundle::manifest::TensorSpec {
            name: input.into(),
            datatype: DataType::F32,
            shape: shape
                .iter()
                .map(|&d| outpost_bundle::manifest::Dim::Fixed(d))
                .collect(),
        }];
        let tensor = || vec![f32_tensor(input, shape.clone(), 0.25)];
        let raw_tract_model = Tract.load(&bytes, &declared).unwrap();
        let raw_tract = median_us(n, || {
            raw_tract_model.run(tensor(), 1 << 30).unwrap();
        });
        let raw_ort_model = ort.load(&bytes, &declared).unwrap();
        let raw_ort = median_us(n, || {
            raw_ort_model.run(tensor(), 1 << 30).unwrap();
        });
        // The same file as a bundle, served by a device on each backend.
        let work = dir.join(format!("backends-{}", input));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::write(work.join("model.onnx"), &bytes).unwrap();
        let out = Command::new(bin)
            .args([
                "bundle",
                "build",
                "--onnx",
                "model.onnx",
                "--name",
                "m",
                "--version",
                "1.0.0",
                "--input-shape",
                pin,
                "--out",
                "m.opb",
            ])
            .current_dir(&work)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut b = Bundle::read(
            &std::fs::read(work.join("m.opb")).unwrap()[..],
            &outpost_bundle::ReadLimits::default(),
        )
        .unwrap();
        b.sign(&key);
        let bundle = b.to_bytes();
        let mut served = Vec::new();
        for (state, backends) in [("tract", "[\"tract\"]"), ("ort", "[\"onnxruntime\"]")] {
            let config = Config::from_toml(
                &format!(
                    "data_dir = \"state-{state}\"\nlisten = \"127.0.0.1:0\"\n\
                     [guest_caps]\nmax_tensor_bytes = 67108864\n\
                     [inference]\nbackends = {backends}\nonnxruntime_library = \"{}\"\n\
                     onnxruntime_threads = 1\nonnxruntime_sessions = 1\n",
                    library.display()
                ),
                &work,
            )
            .unwrap();
            let device = Arc::new(Device::with_trust(&config, trust.clone()).unwrap());
            device.install_and_activate(&bundle).unwrap();
            served.push(median_us(n, || {
                rt.block_on(device.infer("m", None, Payload::Tensors(tensor())))
                    .unwrap();
            }));
        }
        println!(
            "{label:<22} raw tract {raw_tract:>9.1} µs  raw onnxruntime {raw_ort:>9.1} µs  ({:.2}× tract's speed)",
            raw_tract / raw_ort
        );
        println!(
            "{label:<22} device on tract {:>9.1} µs ({:.2}× raw)  device on onnxruntime {:>9.1} µs ({:.2}× raw; {:.2}× the device on tract's speed)",
            served[0],
            raw_tract / served[0],
            served[1],
            raw_ort / served[1],
            served[0] / served[1]
        );
    }
}

/// `outpost batch` on every core against raw tract on the same cores, items per second.
fn batch_against_raw(
    bin: &PathBuf,
    dir: &std::path::Path,
    model: &Arc<dyn outpost_inference::Model>,
) {
    const ROWS: usize = 200_000;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let row = |i: usize| -> Vec<f32> { (0..64).map(|j| ((i * 7 + j * 3) % 17) as f32).collect() };
    outpost_testkit::write_npy_f32(
        &dir.join("rows.npy"),
        &[ROWS as u64, 64],
        (0..ROWS).flat_map(row),
    );
    std::fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    let built = Command::new(bin)
        .args([
            "bundle",
            "build",
            "--onnx",
            "digits.onnx",
            "--name",
            "digits-onnx",
            "--version",
            "1.0.0",
            "--out",
            "digits-onnx.opb",
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    for (batch, output) in [
        (1usize, "answers.jsonl"),
        (32, "answers.jsonl"),
        (32, "answers.npy"),
        (256, "answers.npy"),
    ] {
        // Raw: the same rows, `batch` per run, split over the same threads.
        let started = Instant::now();
        std::thread::scope(|scope| {
            for t in 0..threads {
                scope.spawn(move || {
                    let mut i = t * batch;
                    while i < ROWS {
                        let n = batch.min(ROWS - i);
                        let values: Vec<f32> = (i..i + n).flat_map(row).collect();
                        let input = Tensor {
                            name: "input".into(),
                            datatype: DataType::F32,
                            shape: vec![n as u64, 64],
                            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                        };
                        model.run(vec![input], 1 << 24).unwrap();
                        i += threads * batch;
                    }
                });
            }
        });
        let raw = ROWS as f64 / started.elapsed().as_secs_f64();
        let started = Instant::now();
        let out = Command::new(bin)
            .args([
                "batch",
                "--bundle",
                "digits-onnx.opb",
                "--input",
                "rows.npy",
                "--output",
                output,
                "--overwrite",
                "--batch-size",
            ])
            .arg(batch.to_string())
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let process = ROWS as f64 / started.elapsed().as_secs_f64();
        // The job's own rate, as it reports it: from the first row to the last answer, after
        // the start (loading the bundle, compiling the guest) that a long job pays once.
        let summary = String::from_utf8_lossy(&out.stdout);
        let job: f64 = summary
            .lines()
            .filter_map(|l| {
                l.split(" answers/s")
                    .next()?
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .next_back()
            .unwrap_or(process);
        println!(
            "batch job, {batch:>3} row(s) per call, {threads} threads, {} {job:>9.0} items/s  (raw tract {raw:.0}/s: {:.2}×; {process:.0}/s with the process start: {:.2}×)",
            if output.ends_with(".npy") {
                ".npy out "
            } else {
                "JSON out"
            },
            job / raw,
            process / raw
        );
    }
}
