//! How far one fleet manager goes: `outpost fleet serve` (its embedded broker, or Mosquitto
//! from Debian's package) against `outpost fleet simulate` with thousands of virtual devices,
//! each its own MQTT connection, all real processes on loopback. For each case it prints:
//!
//! - the time until every device is registered and online (from the fleet's `/metrics`);
//! - records stored per second at one record per device per 10 s, and the fleet's CPU and RSS;
//! - the latency of the device list API (a page of 100, the first and one in the middle; a
//!   filter that matches nothing, which reads the whole registry) and of `/metrics`;
//! - the time for a deployment to all devices to be reported applied by every one (signed
//!   desired state delivered, verified by the device, reported back);
//! - then, with 1,000 of them sending 10 batches a second, the highest rate the fleet stores.
//!
//! Run with: `cargo bench -p outpost-cli --bench fleet_scale --profile dev [-- CASE...]`,
//! where a CASE is `embedded:N`, `mosquitto:N` or `postgres:N` (Mosquitto, and the state in
//! PostgreSQL) (default: `embedded:1000 mosquitto:1000
//! mosquitto:10000 postgres:1000 postgres:10000 embedded:10000`). The embedded broker holds three open files per device:
//! a case it cannot hold under this process's open-file limit is run with as many devices as
//! fit, and says so.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, build_and_sign, digits_spec, signer};
use outpost_client::FleetClient;
use outpost_proto::rest::DeployRequest;

/// Kills the child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn open_file_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|hard| hard.parse().ok())
        .unwrap_or(1024)
}

fn metrics(api: &str) -> String {
    ureq::get(&format!("{api}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// (utime + stime in seconds, RSS in bytes) of a process.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, rss_kb * 1024)
}

fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("  gave up waiting for {what} after {limit:?}");
    None
}

/// p50 and p99 in milliseconds of `n` GETs of `url`.
fn latency(url: &str, n: usize) -> (f64, f64) {
    let agent = ureq::Agent::new_with_defaults();
    let mut times: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let mut r = agent.get(url).call().unwrap();
            let _ = r.body_mut().read_to_vec().unwrap();
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    (times[n / 2], times[(n * 99 / 100).min(n - 1)])
}

fn start_mosquitto(dir: &Path) -> (Guard, String) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    // Mosquitto's defaults but for the queue a slow subscriber may build: a fleet that falls
    // behind in a reconnect storm (a presence, a reported state and a batch per device) must
    // not have its messages dropped (docs/benchmarks.md, "Mosquitto for a large fleet").
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 100\n"
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto (Debian's package) on the PATH");
    std::thread::sleep(Duration::from_millis(300));
    (Guard(child), format!("mqtt://127.0.0.1:{port}"))
}

/// Starts `outpost fleet serve`; returns it and its API URL.
fn start_fleet(dir: &Path, broker: Option<&str>, database: Option<&str>) -> (Guard, String) {
    let mut cmd = bin();
    cmd.current_dir(dir).args([
        "fleet",
        "serve",
        "--data-dir",
        "fleet-data",
        "--listen",
        "127.0.0.1:0",
    ]);
    if let Some(url) = database {
        cmd.args(["--database", url]);
    }
    match broker {
        Some(b) => cmd.args(["--broker", b]),
        None => cmd.args(["--mqtt-listen", "127.0.0.1:0"]),
    };
    let mut child = cmd
        .env("OUTPOST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(i) = line.find("fleet ready api=") {
            let api: String = line[i + 16..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    if line.contains("WARN") || line.contains("ERROR") {
                        eprintln!("  fleet: {line}");
                    }
                }
            });
            return (Guard(child), format!("http://{api}"));
        }
    }
    panic!("the fleet never said it was ready");
}

fn simulate(dir: &Path, api: &str, devices: u64, prefix: &str, interval: &str, secs: u64) -> Guard {
    let child = bin()
        .current_dir(dir)
        .args([
            "fleet",
            "simulate",
            "--fleet",
            api,
            "--devices",
            &devices.to_string(),
            "--prefix",
            prefix,
            "--interval",
            interval,
            "--duration",
            &format!("{secs}s"),
            "--tag",
            "bench",
        ])
        .env("OUTPOST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Guard(child)
}

#[derive(Debug, Default)]
struct Row {
    case: String,
    devices: u64,
    registered_s: Option<f64>,
    records_per_s: f64,
    offered_per_s: f64,
    cpu_percent: f64,
    rss_mb: f64,
    page_first: (f64, f64),
    page_middle: (f64, f64),
    scan: (f64, f64),
    metrics: (f64, f64),
    deployed_s: Option<f64>,
    max_records_per_s: f64,
    max_offered_per_s: f64,
    note: String,
}

fn run_case(root: &Path, bundle: &Path, case: &str) -> Row {
    let (kind, n) = case
        .split_once(':')
        .expect("CASE is embedded:N, mosquitto:N or postgres:N");
    let mut devices: u64 = n.parse().expect("N devices");
    let mut row = Row {
        case: kind.to_owned(),
        ..Row::default()
    };
    let fds = open_file_limit();
    if kind == "embedded" {
        // Three per device, 60% of the files for the broker (the gate's own rule), less the
        // simulator's one per device in its own process (not counted here).
        let fit = (fds.saturating_sub(256) as f64 * 0.6 / 3.0) as u64 / 1000 * 1000;
        if devices > fit {
            row.note = format!(
                "{devices} asked; the embedded broker holds {fit} at {fds} open files (3 a device): give it LimitNOFILE >= {}",
                devices * 3 * 10 / 6 + 256
            );
            devices = fit;
        }
    }
    row.devices = devices;
    let dir = root.join(format!("{kind}-{devices}"));
    std::fs::create_dir_all(&dir).unwrap();
    let (_broker, broker_url) = if kind == "mosquitto" || kind == "postgres" {
        let (g, url) = start_mosquitto(&dir);
        (Some(g), Some(url))
    } else {
        (None, None)
    };
    // `postgres:N`: Mosquitto and the state in a throwaway PostgreSQL (fsync off: what is
    // measured is the fleet's work per record, not this machine's disk).
    let database = (kind == "postgres").then(|| {
        let server =
            outpost_testkit::postgres::Postgres::start().expect("PostgreSQL for the postgres case");
        let url = server.database().unwrap();
        (server, url)
    });
    let (fleet, api) = start_fleet(
        &dir,
        broker_url.as_deref(),
        database.as_ref().map(|(_, url)| url.as_str()),
    );
    let pid = fleet.0.id();
    eprintln!("{kind}: {devices} devices");

    // Registration: every device connected and online (its presence and reported state stored).
    let run_for = 120 + devices / 100;
    let _sim = simulate(&dir, &api, devices, "sim", "10s", run_for);
    row.registered_s = wait_until("registration", Duration::from_secs(120), || {
        metric(&metrics(&api), "outpost_fleet_devices_online") >= devices
    })
    .map(|d| d.as_secs_f64());
    eprintln!("  registered in {:?} s", row.registered_s);

    // Steady state: one record per device per 10 s.
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, _) = cpu_and_rss(pid);
    let r0 = metric(&metrics(&api), "outpost_fleet_records_total");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let r1 = metric(&metrics(&api), "outpost_fleet_records_total");
    let (cpu1, rss) = cpu_and_rss(pid);
    let window = t0.elapsed().as_secs_f64();
    row.records_per_s = (r1 - r0) as f64 / window;
    row.offered_per_s = devices as f64 / 10.0;
    row.cpu_percent = (cpu1 - cpu0) / window * 100.0;
    row.rss_mb = rss as f64 / 1e6;

    // The device list and /metrics.
    let middle = format!("sim-{:05}", devices / 2);
    row.page_first = latency(&format!("{api}/api/v1/devices?limit=100"), 30);
    row.page_middle = latency(
        &format!("{api}/api/v1/devices?limit=100&after={middle}"),
        30,
    );
    row.scan = latency(&format!("{api}/api/v1/devices?limit=100&tag=nobody"), 10);
    row.metrics = latency(&format!("{api}/metrics"), 10);

    // A deployment to every device, until all report it applied.
    let client = FleetClient::new(&api, None);
    let bytes = std::fs::read(bundle).unwrap();
    client.push(&bytes[..], bytes.len() as u64).unwrap();
    let started = Instant::now();
    client
        .deploy(&DeployRequest {
            model: "digits".into(),
            version: "1.0.0".into(),
            devices: Vec::new(),
            tag: None,
            all: true,
            policy: None,
        })
        .unwrap();
    row.deployed_s = wait_until("the deployment", Duration::from_secs(120), || {
        metric(&metrics(&api), "outpost_fleet_devices_pending") == 0
    })
    .map(|_| started.elapsed().as_secs_f64());
    eprintln!("  deployed in {:?} s", row.deployed_s);

    // The highest rate it stores: 1,000 more devices at 10 batches a second each.
    let _flood = simulate(&dir, &api, 1000, "flood", "100ms", 60);
    std::thread::sleep(Duration::from_secs(8));
    let r0 = metric(&metrics(&api), "outpost_fleet_records_total");
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let r1 = metric(&metrics(&api), "outpost_fleet_records_total");
    row.max_records_per_s = (r1 - r0) as f64 / t0.elapsed().as_secs_f64();
    row.max_offered_per_s = 10_000.0 + devices as f64 / 10.0;
    row
}

fn main() {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let cases: Vec<String> = if args.is_empty() {
        [
            "embedded:1000",
            "mosquitto:1000",
            "mosquitto:10000",
            "postgres:1000",
            "postgres:10000",
            "embedded:10000",
        ]
        .map(String::from)
        .to_vec()
    } else {
        args
    };
    let root: PathBuf =
        std::env::temp_dir().join(format!("outpost-fleet-scale-{}", std::process::id()));
    std::fs::create_dir_all(&root).unwrap();
    signer(&root);
    digits_spec(&root, "1.0.0");
    build_and_sign(&root, "1.0.0.toml", "digits-1.0.0.opb");
    let bundle = root.join("digits-1.0.0.opb");

    let rows: Vec<Row> = cases.iter().map(|c| run_case(&root, &bundle, c)).collect();
    println!();
    println!(
        "fleet at scale ({profile} profile, {} cores, open-file limit {}): one `fleet serve`, one `fleet simulate`, loopback",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        open_file_limit()
    );
    println!(
        "| broker | devices | registered | records/s stored (offered) | fleet CPU | fleet RSS | list page p50/p99 (first, middle) | filter scan p50 | /metrics p50 | deployment applied on all | most records/s stored (offered) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let secs = |v: Option<f64>| v.map_or("did not".to_owned(), |s| format!("{s:.1} s"));
        println!(
            "| {} | {} | {} | {:.0} ({:.0}) | {:.0}% | {:.0} MB | {:.1}/{:.1} ms, {:.1}/{:.1} ms | {:.0} ms | {:.0} ms | {} | {:.0} ({:.0}) |",
            r.case,
            r.devices,
            secs(r.registered_s),
            r.records_per_s,
            r.offered_per_s,
            r.cpu_percent,
            r.rss_mb,
            r.page_first.0,
            r.page_first.1,
            r.page_middle.0,
            r.page_middle.1,
            r.scan.0,
            r.metrics.0,
            secs(r.deployed_s),
            r.max_records_per_s,
            r.max_offered_per_s,
        );
    }
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!("note ({}): {}", r.case, r.note);
    }
    let _ = std::fs::remove_dir_all(&root);
}
