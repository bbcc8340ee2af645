//! The fleet end to end, as real processes on loopback: `outpost fleet serve` (embedded broker
//! or Mosquitto), `outpost device run` agents, `outpost fleet push|deploy|status`, and the
//! failure cases: broker outage under traffic, `kill -9` mid-download, forged, replayed and
//! expired desired states, and a tampered artifact.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Dir, bin, build_and_sign, digits_spec, ok, signer};

/// Waits for `f` to return `Some`, panicking with `what` after `secs`.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into()
}

fn get_json(url: &str) -> (u16, Value) {
    let mut r = http().get(url).call().unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A child process killed on drop, with its stderr kept for failure messages.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `outpost ARGS` in `dir`, waiting for a stderr line containing `marker`; returns
    /// the process and the rest of that line after the marker.
    fn start(dir: &Path, args: &[&str], marker: &str) -> (Self, String) {
        let mut child = bin()
            .args(args)
            .current_dir(dir)
            .env("OUTPOST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let wanted = marker.to_owned();
        let log2 = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find(&wanted) {
                    let _ = tx.send(line[i + wanted.len()..].to_owned());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let mut p = Self { child, log };
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(rest) => (p, rest),
            Err(_) => {
                let _ = p.child.kill();
                panic!("`outpost {args:?}` never logged {marker:?}:\n{}", p.logs());
            }
        }
    }

    fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- process log ---\n{}", self.logs());
        }
    }
}

fn first_word(s: &str) -> String {
    s.chars().take_while(|c| !c.is_whitespace()).collect()
}

/// A running fleet manager.
struct Fleet {
    _proc: Proc,
    api: String,
    broker: String,
}

impl Fleet {
    /// `outpost fleet serve ARGS`, with a fresh data dir and free ports unless ARGS say otherwise.
    fn launch(dir: &Path, args: &[&str]) -> Self {
        let mut all = vec!["fleet", "serve"];
        all.extend(args);
        for (flag, default) in [("--data-dir", "fleet-data"), ("--listen", "127.0.0.1:0")] {
            if !args.contains(&flag) {
                all.extend([flag, default]);
            }
        }
        if !args.contains(&"--mqtt-listen") && !args.contains(&"--broker") {
            all.extend(["--mqtt-listen", "127.0.0.1:0"]);
        }
        let (proc, rest) = Proc::start(dir, &all, "fleet ready api=");
        let i = rest.find("broker=").unwrap();
        Self {
            _proc: proc,
            api: format!("http://{}", first_word(&rest)),
            broker: first_word(&rest[i + 7..]),
        }
    }

    fn start(dir: &Path, broker: Option<&str>, public_url: Option<&str>) -> Self {
        let mut args = Vec::new();
        if let Some(b) = broker {
            args.extend(["--broker", b]);
        }
        if let Some(u) = public_url {
            args.extend(["--public-url", u]);
        }
        Self::launch(dir, &args)
    }

    fn devices(&self) -> Vec<Value> {
        get_json(&format!("{}/api/v1/devices", self.api))
            .1
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn device(&self, id: &str) -> Option<Value> {
        let (status, v) = get_json(&format!("{}/api/v1/devices/{id}", self.api));
        (status == 200).then_some(v)
    }

    fn reported(&self, id: &str) -> Option<Value> {
        self.device(id)
            .map(|d| d["reported"].clone())
            .filter(|r| !r.is_null())
    }

    fn records(&self, stream: &str, device: &str) -> Vec<Value> {
        get_json(&format!(
            "{}/api/v1/{stream}?device={device}&limit=100000",
            self.api
        ))
        .1["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn cli(&self, dir: &Path, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--fleet", &self.api]);
        ok(dir, &all)
    }
}

/// A test bed: signer key, trust store, signed digits bundles 1.0.0 and 2.0.0.
fn bed(tag: &str) -> Dir {
    let d = Dir::new(&format!("fleet-{tag}"));
    signer(&d.0);
    for v in ["1.0.0", "2.0.0"] {
        digits_spec(&d.0, v);
        build_and_sign(&d.0, &format!("{v}.toml"), &format!("digits-{v}.opb"));
    }
    d
}

/// Writes a device config and returns its file name.
fn device_config(dir: &Path, id: &str, broker: &str, tags: &[&str]) -> String {
    let name = format!("{id}.toml");
    let tags: Vec<String> = tags.iter().map(|t| format!("{t:?}")).collect();
    fs::write(
        dir.join(&name),
        format!(
            "data_dir = \"{id}-state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\
             trust_store = \"trust.toml\"\n\
             [fleet]\nbroker = \"{broker}\"\nfleet_key_file = \"fleet-data/fleet.pub\"\n\
             device_id = \"{id}\"\ntags = [{}]\ntelemetry_interval_ms = 100\n",
            tags.join(", ")
        ),
    )
    .unwrap();
    name
}

/// A running device and the URL it serves on.
struct Device {
    proc: Proc,
    url: String,
}

impl Device {
    fn start(dir: &Path, config: &str) -> Self {
        let (proc, rest) =
            Proc::start(dir, &["device", "run", "--config", config], "serving addr=");
        Self {
            proc,
            url: format!("http://{}", first_word(&rest)),
        }
    }

    /// The digits version answering, or the HTTP status when none does.
    fn digits(&self) -> Result<String, u16> {
        digits(&self.url)
    }
}

/// The digits version answering at `url`, or the HTTP status when none does.
fn digits(url: &str) -> Result<String, u16> {
    {
        let body = serde_json::json!({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": vec![1.0; 64]}]});
        let mut r = http()
            .post(&format!("{url}/v2/models/digits/infer"))
            .header("content-type", "application/json")
            .send(body.to_string().as_bytes())
            .unwrap();
        if r.status() != 200 {
            return Err(r.status().as_u16());
        }
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        Ok(v["model_version"].as_str().unwrap().to_owned())
    }
}

fn online(fleet: &Fleet, ids: &[&str]) {
    eventually(60, "devices online with reported state", || {
        ids.iter()
            .all(|id| {
                fleet
                    .device(id)
                    .is_some_and(|d| d["online"] == true && !d["reported"].is_null())
            })
            .then_some(())
    });
}

/// A fleet (embedded broker) and one device `id` running digits 1.0.0 deployed through it.
fn fleet_with_digits(dir: &Path, id: &str) -> (Fleet, Device) {
    let fleet = Fleet::start(dir, None, None);
    let config = device_config(dir, id, &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &[id]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let out = fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", id, "--wait"],
    );
    assert!(out.contains(&format!("{id}: applied")), "{out}");
    (fleet, device)
}

/// Push, deploy to two of three devices, check who serves what and what the fleet says.
fn deploy_to_two_of_three(dir: &Path, fleet: &Fleet) {
    let devices: Vec<Device> = [
        ("dev-a", &["lab"][..]),
        ("dev-b", &["lab"]),
        ("dev-c", &["field"]),
    ]
    .iter()
    .map(|(id, tags)| Device::start(dir, &device_config(dir, id, &fleet.broker, tags)))
    .collect();
    online(fleet, &["dev-a", "dev-b", "dev-c"]);
    for d in &devices {
        assert_eq!(d.digits(), Err(404), "nothing is installed yet");
    }

    let pushed = fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb", "--json"]);
    let pushed: Value = serde_json::from_str(&pushed).unwrap();
    assert_eq!(pushed["name"], "digits");
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@1.0.0",
            "--tag",
            "lab",
            "--wait",
            "--timeout",
            "120",
        ],
    );
    assert!(
        out.contains("dev-a: applied") && out.contains("dev-b: applied"),
        "{out}"
    );
    assert!(!out.contains("dev-c"), "{out}");

    assert_eq!(devices[0].digits(), Ok("1.0.0".into()));
    assert_eq!(devices[1].digits(), Ok("1.0.0".into()));
    assert_eq!(devices[2].digits(), Err(404), "dev-c was not a target");

    let status: Value =
        serde_json::from_str(&fleet.cli(dir, &["fleet", "status", "--json"])).unwrap();
    let by_id = |id: &str| {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
            .unwrap()
    };
    for id in ["dev-a", "dev-b"] {
        let d = by_id(id);
        assert_eq!(d["reported"]["active"]["digits"], "1.0.0", "{d}");
        assert_eq!(d["in_sync"], true, "{d}");
        assert_eq!(d["online"], true);
        assert_eq!(d["reported"]["arch"], std::env::consts::ARCH);
        assert!(d["reported"]["last_error"].is_null(), "{d}");
    }
    let c = by_id("dev-c");
    assert!(
        c["reported"]["active"].as_object().unwrap().is_empty(),
        "{c}"
    );
    assert!(c["desired_generation"].is_null(), "{c}");
    // The human table says the same.
    let table = fleet.cli(dir, &["fleet", "status"]);
    let line = |id: &str| {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_owned()
    };
    assert!(line("dev-a").contains("digits@1.0.0"), "{table}");
    assert!(!line("dev-c").contains("digits@"), "{table}");

    // Events arrived: each target reported its activation.
    eventually(30, "activation events", || {
        ["dev-a", "dev-b"]
            .iter()
            .all(|id| {
                fleet
                    .records("events", id)
                    .iter()
                    .any(|r| r["body"]["event"] == "activated" && r["body"]["version"] == "1.0.0")
            })
            .then_some(())
    });
    // And telemetry, with per-model counters once a request was served.
    eventually(30, "telemetry with model counters", || {
        fleet
            .records("telemetry", "dev-a")
            .iter()
            .rev()
            .find_map(|r| {
                let models = r["body"]["models"].as_array()?;
                models
                    .iter()
                    .any(|m| m["model"] == "digits" && m["requests"].as_u64() >= Some(1))
                    .then_some(())
            })
    });
    // Offline when stopped: the last will, or the goodbye.
    drop(devices);
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        last = fleet.devices();
        if last.iter().all(|d| d["online"] == false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("devices still online: {last:?}");
}

#[test]
fn embedded_broker_push_and_deploy_to_two_of_three() {
    let d = bed("embedded");
    let fleet = Fleet::start(&d.0, None, None);
    let info = eventually(30, "the fleet connected to its broker", || {
        let (status, info) = get_json(&format!("{}/api/v1/fleet", fleet.api));
        (status == 200 && info["broker_connected"] == true).then_some(info)
    });
    assert_eq!(info["broker"], fleet.broker);
    deploy_to_two_of_three(&d.0, &fleet);
    let (_, metrics) = get_json(&format!("{}/metrics", fleet.api));
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(metrics.contains("outpost_fleet_devices 3"), "{metrics}");
    drop(fleet);
}

/// A Mosquitto broker on a free loopback port (Debian's package), restartable on that port.
struct Mosquitto {
    port: u16,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .unwrap();
        let mut m = Self {
            port,
            conf,
            child: None,
        };
        m.restart();
        m
    }

    fn restart(&mut self) {
        // Debian installs it in /usr/sbin, which is not on every user's PATH.
        let program = ["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("mosquitto");
        let child = Command::new(program)
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is not installed (apt-get install mosquitto)");
        self.child = Some(child);
        eventually(20, "mosquitto listening", || {
            TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(|_| ())
        });
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn mosquitto_push_and_deploy_to_two_of_three() {
    let d = bed("mosquitto");
    let broker = Mosquitto::start(&d.0);
    let fleet = Fleet::start(&d.0, Some(&broker.url()), None);
    assert_eq!(fleet.broker, broker.url());
    deploy_to_two_of_three(&d.0, &fleet);
}

#[test]
fn broker_outage_under_traffic_loses_and_duplicates_no_telemetry() {
    let d = bed("outage");
    let dir = &d.0;
    let mut broker = Mosquitto::start(dir);
    let fleet = Fleet::start(dir, Some(&broker.url()), None);
    let config = device_config(dir, "dev-o", &broker.url(), &[]);
    ok(
        dir,
        &[
            "device",
            "install",
            "digits-1.0.0.opb",
            "--config",
            &config,
            "--activate",
        ],
    );
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-o"]);

    // Steady traffic for the whole test; every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let url = device.url.clone();
    let stop2 = Arc::clone(&stop);
    let traffic = std::thread::spawn(move || {
        let mut served = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            assert_eq!(digits(&url), Ok("1.0.0".into()));
            served += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        served
    });

    let seqs = |fleet: &Fleet| -> Vec<u64> {
        fleet
            .records("telemetry", "dev-o")
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    };
    let before = eventually(30, "telemetry before the outage", || {
        let s = seqs(&fleet);
        (s.len() >= 5).then(|| *s.last().unwrap())
    });
    broker.stop();
    std::thread::sleep(Duration::from_secs(3));
    // The device went on producing (and serving) during the outage.
    broker.restart();
    // At 10 records a second, 3 s of outage is about 30 records past `before`.
    let last = eventually(90, "telemetry from the outage delivered", || {
        let s = seqs(&fleet);
        s.last().copied().filter(|&l| l >= before + 40)
    });
    stop.store(true, Ordering::Relaxed);
    let served = traffic.join().unwrap();
    assert!(served > 50, "only {served} requests were served");

    let all = seqs(&fleet);
    let unique: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a record was stored twice");
    // Events and telemetry share one sequence; every number is in exactly one stream.
    let events: BTreeSet<u64> = fleet
        .records("events", "dev-o")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(unique.is_disjoint(&events));
    let stored: BTreeSet<u64> = unique.union(&events).copied().collect();
    let expected: BTreeSet<u64> = (1..=*unique.last().unwrap()).collect();
    let missing: Vec<u64> = expected.difference(&stored).copied().collect();
    assert!(
        missing.is_empty(),
        "lost records: {missing:?} (last {last})"
    );
    drop(device);
}

/// A slow HTTP proxy in front of the fleet's artifact store, recording each request's Range.
fn slow_proxy(upstream: String) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    proxy_on(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        upstream,
        Duration::from_millis(50),
    )
}

/// An HTTP proxy on `listener` to `upstream`, writing 2 KB every `pause`, recording each
/// request's Range header.
fn proxy_on(
    listener: TcpListener,
    upstream: String,
    pause: Duration,
) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    let addr = listener.local_addr().unwrap();
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&ranges);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let upstream = upstream.clone();
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap().to_owned();
                let range = head
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                    .map(|l| l[6..].trim().to_owned());
                seen.lock().unwrap().push(range.clone());
                let mut request = http().get(&format!("{upstream}{path}"));
                if let Some(r) = &range {
                    request = request.header("Range", r);
                }
                let mut response = request.call().unwrap();
                let status = response.status().as_u16();
                let content_range = response
                    .headers()
                    .get("content-range")
                    .map(|v| v.to_str().unwrap().to_owned());
                let body = response.body_mut().read_to_vec().unwrap();
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                if let Some(cr) = content_range {
                    out.push_str(&format!("Content-Range: {cr}\r\n"));
                }
                out.push_str("\r\n");
                if stream.write_all(out.as_bytes()).is_err() {
                    return;
                }
                // About 40 KB/s.
                for chunk in body.chunks(2048) {
                    if stream.write_all(chunk).is_err() {
                        return;
                    }
                    std::thread::sleep(pause);
                }
            });
        }
    });
    (format!("http://{addr}"), ranges)
}

#[test]
fn kill_9_mid_download_resumes_and_completes() {
    let d = bed("resume");
    let dir = &d.0;
    // The fleet's API port is needed for the proxy before the fleet starts: pick it.
    let port = free_port();
    let upstream = format!("http://127.0.0.1:{port}");
    let (proxy, ranges) = slow_proxy(upstream.clone());
    let listen = format!("127.0.0.1:{port}");
    let fleet = Fleet::launch(dir, &["--listen", &listen, "--public-url", &proxy]);
    assert_eq!(fleet.api, upstream);
    let config = device_config(dir, "dev-r", &fleet.broker, &[]);
    let mut device = Device::start(dir, &config);
    online(&fleet, &["dev-r"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let size = fs::metadata(dir.join("digits-1.0.0.opb")).unwrap().len();
    assert!(
        size > 40_000,
        "the bundle is too small to interrupt: {size}"
    );
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", "dev-r"],
    );

    let downloads = dir.join("dev-r-state").join("downloads");
    let partial = eventually(60, "a partial download", || {
        let entry = fs::read_dir(&downloads).ok()?.flatten().next()?;
        let len = entry.metadata().ok()?.len();
        (len >= 8192 && len < size).then_some(len)
    });
    device.proc.kill9();
    let after_kill = fs::read_dir(&downloads)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .metadata()
        .unwrap()
        .len();
    assert!(after_kill >= partial && after_kill < size);

    let device = Device::start(dir, &config);
    let version = eventually(120, "the resumed deployment serving", || {
        device.digits().ok()
    });
    assert_eq!(version, "1.0.0");
    let ranges = ranges.lock().unwrap().clone();
    assert_eq!(
        ranges.first(),
        Some(&None),
        "the first request asks for everything"
    );
    let resumed: Vec<u64> = ranges
        .iter()
        .flatten()
        .map(|r| {
            r.trim_start_matches("bytes=")
                .trim_end_matches('-')
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        resumed
            .iter()
            .any(|&from| from >= after_kill.min(partial) && from > 0),
        "no resumed request from the partial length {after_kill}: {ranges:?}"
    );
    assert!(
        fs::read_dir(&downloads).unwrap().next().is_none(),
        "the partial file is removed after install"
    );
}

/// A plain MQTT client on `broker` (`mqtt://HOST:PORT`).
fn mqtt_client(broker: &str, name: &str) -> (rumqttc::Client, rumqttc::Connection) {
    let addr = broker.trim_start_matches("mqtt://");
    let (host, port) = addr.rsplit_once(':').unwrap();
    let mut options = rumqttc::MqttOptions::new(
        format!("{name}-{}", free_port()),
        host,
        port.parse().unwrap(),
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    rumqttc::Client::new(options, 10)
}

/// Publishes a retained message with a plain MQTT client, as an attacker on the broker could.
fn publish_retained(broker: &str, topic: &str, payload: Vec<u8>) {
    let (client, mut connection) = mqtt_client(broker, "intruder");
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload)
        .unwrap();
    for event in connection.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
            break;
        }
        event.unwrap();
    }
    let _ = client.disconnect();
}

/// Reads the retained desired-state envelope of a device.
fn retained(broker: &str, topic: &str) -> Vec<u8> {
    let (client, mut connection) = mqtt_client(broker, "reader");
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    for event in connection.iter() {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event {
            let _ = client.disconnect();
            return p.payload.to_vec();
        }
        event.unwrap();
    }
    panic!("no retained message on {topic}");
}

#[test]
fn forged_replayed_expired_and_tampered_are_refused_and_reported() {
    let d = bed("refusals");
    let dir = &d.0;
    let (fleet, device) = fleet_with_digits(dir, "dev-x");
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    let topic = "outpost/v1/dev-x/desired";
    let genuine = retained(&fleet.broker, topic);
    let genuine_generation = {
        let envelope: Value = serde_json::from_slice(&genuine).unwrap();
        let payload: Value = serde_json::from_str(envelope["payload"].as_str().unwrap()).unwrap();
        payload["generation"].as_u64().unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let state = |generation: u64, expires_at: u64| outpost_proto::DesiredState {
        v: 1,
        device: "dev-x".into(),
        generation,
        expires_at,
        deployments: vec![],
    };
    let refusals = |fleet: &Fleet| -> Vec<String> {
        fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_refused")
            .map(|r| r["body"]["reason"].as_str().unwrap().to_owned())
            .collect()
    };
    let expect_refusal = |n: usize, needle: &str| {
        let reasons = eventually(30, needle, || {
            let r = refusals(&fleet);
            (r.len() >= n).then_some(r)
        });
        assert!(reasons[n - 1].contains(needle), "{reasons:?}");
        let reported = eventually(30, "last_error reported", || {
            fleet
                .reported("dev-x")
                .filter(|r| r["last_error"].as_str().is_some_and(|e| e.contains(needle)))
        });
        assert_eq!(reported["active"]["digits"], "1.0.0");
        assert_eq!(device.digits(), Ok("1.0.0".into()), "still serving");
    };

    // 1. Signed by another key (an empty deployment list would remove nothing anyway, but it
    //    must not even be accepted).
    let intruder = outpost_bundle::SecretKey::generate().unwrap();
    let forged =
        outpost_proto::SignedDesired::seal(&state(genuine_generation + 10, now + 3600), &intruder)
            .unwrap();
    publish_retained(&fleet.broker, topic, forged.to_vec().unwrap());
    expect_refusal(1, "unknown key");

    // 2. The genuine envelope replayed after a newer generation was applied.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--device",
            "dev-x",
            "--wait",
        ],
    );
    assert_eq!(device.digits(), Ok("2.0.0".into()));
    let accepted = |fleet: &Fleet| {
        fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_accepted")
            .count()
    };
    let accepted_before = eventually(30, "acceptance of 2.0.0 reported", || {
        let n = accepted(&fleet);
        (n >= 2).then_some(n)
    });
    // The current envelope again (a duplicate: a no-op), then the replayed older one.
    let current = retained(&fleet.broker, topic);
    publish_retained(&fleet.broker, topic, current);
    publish_retained(&fleet.broker, topic, genuine.clone());
    expect_refusal_version(&fleet, &device, 2, "older than accepted", "2.0.0");
    // Events arrive in order, so anything the duplicate caused would be here by now.
    assert_eq!(
        accepted(&fleet),
        accepted_before,
        "the duplicate was applied again"
    );

    // 3. Signed by the fleet key, newest generation, but expired.
    let fleet_key = outpost_bundle::SecretKey::from_file_str(
        &fs::read_to_string(dir.join("fleet-data/fleet.key")).unwrap(),
    )
    .unwrap();
    let expired =
        outpost_proto::SignedDesired::seal(&state(u64::MAX / 2, now - 60), &fleet_key).unwrap();
    publish_retained(&fleet.broker, topic, expired.to_vec().unwrap());
    expect_refusal_version(&fleet, &device, 3, "expired", "2.0.0");

    // 4. A bundle tampered with on the artifact server: the digest check refuses it.
    digits_spec(dir, "3.0.0");
    build_and_sign(dir, "3.0.0.toml", "digits-3.0.0.opb");
    let pushed: Value =
        serde_json::from_str(&fleet.cli(dir, &["fleet", "push", "digits-3.0.0.opb", "--json"]))
            .unwrap();
    let artifact = dir
        .join("fleet-data/artifacts")
        .join(pushed["digest"].as_str().unwrap());
    let mut bytes = fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    fs::write(&artifact, bytes).unwrap();
    let out = bin()
        .args([
            "fleet",
            "deploy",
            "digits@3.0.0",
            "--device",
            "dev-x",
            "--wait",
            "--timeout",
            "60",
            "--fleet",
            &fleet.api,
        ])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a tampered deployment must not succeed"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("dev-x: failed") && stdout.contains("digest"),
        "{stdout}"
    );
    let failed = eventually(30, "deployment_failed event", || {
        fleet
            .records("events", "dev-x")
            .into_iter()
            .find(|r| r["body"]["event"] == "deployment_failed" && r["body"]["version"] == "3.0.0")
    });
    assert!(
        failed["body"]["error"].as_str().unwrap().contains("digest"),
        "{failed}"
    );
    assert_eq!(
        device.digits(),
        Ok("2.0.0".into()),
        "still serving the last good version"
    );
    let reported = fleet.reported("dev-x").unwrap();
    assert!(
        !reported["installed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "digits@3.0.0")
    );
}

fn expect_refusal_version(fleet: &Fleet, device: &Device, n: usize, needle: &str, version: &str) {
    let reasons = eventually(30, needle, || {
        let r: Vec<String> = fleet
            .records("events", "dev-x")
            .iter()
            .filter(|r| r["body"]["event"] == "desired_refused")
            .map(|r| r["body"]["reason"].as_str().unwrap().to_owned())
            .collect();
        (r.len() >= n).then_some(r)
    });
    assert!(reasons[n - 1].contains(needle), "{reasons:?}");
    eventually(30, "last_error reported", || {
        fleet
            .reported("dev-x")
            .filter(|r| r["last_error"].as_str().is_some_and(|e| e.contains(needle)))
    });
    assert_eq!(device.digits(), Ok(version.into()), "still serving");
}

#[test]
fn bad_pushes_and_deploys_get_clear_errors_and_artifacts_honour_range() {
    let d = bed("api");
    let dir = &d.0;
    let fleet = Fleet::start(dir, None, None);
    let fail = |args: &[&str]| -> String {
        let out = bin()
            .args(args)
            .args(["--fleet", &fleet.api])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(!out.status.success(), "outpost {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Unsigned and corrupted bundles are refused; nothing is stored.
    ok(
        dir,
        &["bundle", "build", "1.0.0.toml", "--out", "unsigned.opb"],
    );
    assert!(fail(&["fleet", "push", "unsigned.opb"]).contains("not signed"));
    let mut bytes = fs::read(dir.join("digits-1.0.0.opb")).unwrap();
    let n = bytes.len();
    bytes[n / 3] ^= 0x20;
    fs::write(dir.join("corrupt.opb"), bytes).unwrap();
    assert!(fail(&["fleet", "push", "corrupt.opb"]).contains("bundle refused"));
    assert_eq!(
        get_json(&format!("{}/api/v1/bundles", fleet.api)).1,
        serde_json::json!([])
    );
    // Deploying what was never pushed, to nobody, or with a malformed target.
    assert!(fail(&["fleet", "deploy", "digits@1.0.0", "--device", "x"]).contains("push it first"));
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    assert!(fail(&["fleet", "deploy", "digits@1.0.0"]).contains("no target devices"));
    assert!(
        fail(&["fleet", "deploy", "digits@1.0.0", "--device", "a/b"])
            .contains("not a valid device id")
    );
    assert!(fail(&["fleet", "deploy", "digits"]).contains("MODEL@VERSION"));
    let mut r = http()
        .post(&format!("{}/api/v1/deployments", fleet.api))
        .header("content-type", "application/json")
        .send(&b"{\"model\": 1"[..])
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.body_mut().read_to_string().unwrap().contains("error"));

    // The artifact store: whole, ranges, bad ranges, unknown digests.
    let bundle = fs::read(dir.join("digits-1.0.0.opb")).unwrap();
    let digest = outpost_bundle::sha256_hex(&bundle);
    let url = format!("{}/artifacts/{digest}", fleet.api);
    let fetch = |range: Option<&str>| {
        let mut req = http().get(&url);
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let mut r = req.call().unwrap();
        let cr = r
            .headers()
            .get("content-range")
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), cr, r.body_mut().read_to_vec().unwrap())
    };
    assert_eq!(fetch(None), (200, None, bundle.clone()));
    let (status, cr, body) = fetch(Some("bytes=100-"));
    assert_eq!((status, body.as_slice()), (206, &bundle[100..]));
    assert_eq!(
        cr.unwrap(),
        format!("bytes 100-{}/{}", bundle.len() - 1, bundle.len())
    );
    assert_eq!(fetch(Some("bytes=10-19")).2, bundle[10..20].to_vec());
    let (status, cr, _) = fetch(Some(&format!("bytes={}-", bundle.len())));
    assert_eq!(
        (status, cr.unwrap()),
        (416, format!("bytes */{}", bundle.len()))
    );
    assert_eq!(
        get_json(&format!("{}/artifacts/{}", fleet.api, "0".repeat(64))).0,
        404
    );
    assert_eq!(
        get_json(&format!("{}/artifacts/..%2Ffleet.key", fleet.api)).0,
        404
    );

    // Removing a bundle: refused while a device's desired state names it, then gone with its
    // artifact file.
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--device", "dev-z"],
    );
    assert!(
        fail(&["fleet", "remove-bundle", "digits@1.0.0"])
            .contains("still deployed to 1 device(s) (dev-z)")
    );
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@2.0.0", "--device", "dev-z"],
    );
    let out = fleet.cli(dir, &["fleet", "remove-bundle", "digits@1.0.0"]);
    assert!(out.contains(&digest), "{out}");
    assert_eq!(get_json(&url).0, 404, "the artifact file is gone");
    assert!(!dir.join("fleet-data/artifacts").join(&digest).exists());
    let (_, bundles) = get_json(&format!("{}/api/v1/bundles", fleet.api));
    assert_eq!(bundles.as_array().unwrap().len(), 1);
    assert!(fail(&["fleet", "remove-bundle", "digits@1.0.0"]).contains("not found"));
}

#[test]
fn two_fleet_replicas_on_mosquitto_split_telemetry_through_shared_subscriptions() {
    let d = bed("replicas");
    let dir = &d.0;
    let broker = Mosquitto::start(dir);
    let replica = |name: &str, extra: &[&str]| -> Fleet {
        let data = format!("{name}-data");
        let url = broker.url();
        let mut args = vec![
            "--data-dir",
            &data,
            "--broker",
            url.as_str(),
            "--replica",
            name,
        ];
        args.extend(extra);
        Fleet::launch(dir, &args)
    };
    let one = replica("replica-1", &[]);
    let two = replica("replica-2", &["--ingest-only"]);
    // The device trusts the first replica's key; telemetry does not depend on it.
    fs::create_dir_all(dir.join("fleet-data")).unwrap();
    fs::copy(
        dir.join("replica-1-data/fleet.pub"),
        dir.join("fleet-data/fleet.pub"),
    )
    .unwrap();
    let config = device_config(dir, "dev-s", &broker.url(), &[]);
    let _device = Device::start(dir, &config);
    // Both replicas keep the whole registry (plain subscriptions)...
    online(&one, &["dev-s"]);
    online(&two, &["dev-s"]);
    // ...and split the telemetry (shared subscriptions): each record lands in exactly one.
    let seqs = |fleet: &Fleet| -> BTreeSet<u64> {
        let mut records = fleet.records("telemetry", "dev-s");
        records.extend(fleet.records("events", "dev-s"));
        records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
    };
    let (a, b) = eventually(60, "both replicas storing telemetry", || {
        let (a, b) = (seqs(&one), seqs(&two));
        (a.len() >= 5 && b.len() >= 5 && a.len() + b.len() >= 40).then_some((a, b))
    });
    assert!(a.is_disjoint(&b), "a record reached both replicas");
    let max = *a.iter().chain(b.iter()).max().unwrap();
    let lowest_missing = (1..=max).find(|s| !a.contains(s) && !b.contains(s));
    // The newest records may still be in flight to one replica; everything before is there.
    assert!(
        lowest_missing.is_none_or(|s| s + 8 > max),
        "record {lowest_missing:?} of {max} reached neither replica"
    );
    // The secondary leaves bundles and deployments to the primary.
    let out = bin()
        .args(["fleet", "push", "digits-1.0.0.opb", "--fleet", &two.api])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only ingests"));
    one.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
}

#[test]
fn embedded_broker_logins_admit_known_devices_only() {
    let d = bed("logins");
    let dir = &d.0;
    fs::write(
        dir.join("logins.txt"),
        "# device logins\ndev-ok:right-password\n",
    )
    .unwrap();
    let fleet = Fleet::launch(dir, &["--mqtt-logins", "logins.txt"]);
    // The fleet logged itself in with a login of its own.
    eventually(30, "fleet connected", || {
        (get_json(&format!("{}/api/v1/fleet", fleet.api)).1["broker_connected"] == true)
            .then_some(())
    });
    fs::write(dir.join("right"), "right-password\n").unwrap();
    fs::write(dir.join("wrong"), "guess\n").unwrap();
    for (id, file) in [("dev-ok", "right"), ("dev-bad", "wrong")] {
        let config = device_config(dir, id, &fleet.broker, &[]);
        let mut text = fs::read_to_string(dir.join(&config)).unwrap();
        text.push_str(&format!(
            "username = \"dev-ok\"\npassword_file = \"{file}\"\n"
        ));
        fs::write(dir.join(&config), text).unwrap();
    }
    let ok_device = Device::start(dir, "dev-ok.toml");
    let bad_device = Device::start(dir, "dev-bad.toml");
    online(&fleet, &["dev-ok"]);
    eventually(30, "the refused login logged", || {
        bad_device
            .proc
            .logs()
            .contains("cannot reach the broker")
            .then_some(())
    });
    assert!(
        fleet.device("dev-bad").is_none(),
        "a refused device reached the fleet"
    );
    // Refused by the broker, it still serves locally.
    assert_eq!(
        get_json(&format!("{}/v2/health/live", bad_device.url)).0,
        200
    );
    assert_eq!(ok_device.digits(), Err(404));
}

#[test]
fn a_full_outbox_drops_oldest_telemetry_and_the_fleet_hears_how_many() {
    let d = bed("quota");
    let dir = &d.0;
    // The broker is not there yet: the device keeps serving and fills its small outbox.
    let mut broker = Mosquitto::start(dir);
    broker.stop();
    let config = device_config(dir, "dev-q", &broker.url(), &[]);
    let mut text = fs::read_to_string(dir.join(&config)).unwrap();
    text = text.replace("telemetry_interval_ms = 100", "telemetry_interval_ms = 20");
    text.push_str("outbox_quota_bytes = 20000\n");
    fs::write(dir.join(&config), text).unwrap();
    let fleet_key = outpost_bundle::SecretKey::generate().unwrap();
    fs::create_dir_all(dir.join("fleet-data")).unwrap();
    fs::write(dir.join("fleet-data/fleet.key"), fleet_key.to_file_string()).unwrap();
    fs::write(
        dir.join("fleet-data/fleet.pub"),
        fleet_key.public().to_file_string(),
    )
    .unwrap();
    let device = Device::start(dir, &config);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(get_json(&format!("{}/v2/health/live", device.url)).0, 200);

    broker.restart();
    let fleet = Fleet::start(dir, Some(&broker.url()), None);
    // Records are stored in order and sent ones are never dropped, so below the highest stored
    // sequence number every gap is a counted drop, and every counted drop is a gap.
    eventually(60, "backlog delivered with a drop count", || {
        let dropped = fleet.device("dev-q")?["dropped"].as_u64()?;
        (dropped > 0 && fleet.records("telemetry", "dev-q").len() > 100).then_some(())
    });
    // Drops stop once the backlog is out. Read the count first, then the records: anything
    // stored after the count was read is newer than every gap it counts.
    std::thread::sleep(Duration::from_secs(2));
    let dropped = fleet.device("dev-q").unwrap()["dropped"].as_u64().unwrap();
    let mut stored: Vec<u64> = fleet
        .records("telemetry", "dev-q")
        .iter()
        .chain(fleet.records("events", "dev-q").iter())
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    stored.sort_unstable();
    let max = *stored.last().unwrap();
    let present: BTreeSet<u64> = stored.iter().copied().collect();
    assert_eq!(present.len(), stored.len(), "stored twice");
    let missing = (1..=max).filter(|s| !present.contains(s)).count() as u64;
    assert_eq!(
        missing, dropped,
        "gaps and the device's drop count disagree (max {max})"
    );
    let reported = fleet.reported("dev-q").unwrap();
    // The retained reported state says so too (as of its last publication).
    assert!(
        reported["outbox_dropped"].as_u64().unwrap() > 0,
        "{reported}"
    );
    let (_, metrics) = get_json(&format!("{}/metrics", fleet.api));
    assert!(
        metrics.as_str().unwrap().contains(&format!(
            "outpost_fleet_device_dropped_records{{device=\"dev-q\"}} {dropped}"
        )),
        "{metrics}"
    );
}

#[test]
fn fleet_killed_and_restarted_keeps_its_state_and_its_devices() {
    let d = bed("restart");
    let dir = &d.0;
    let (api_port, mqtt_port) = (free_port(), free_port());
    let (api, mqtt) = (
        format!("127.0.0.1:{api_port}"),
        format!("127.0.0.1:{mqtt_port}"),
    );
    let start = || Fleet::launch(dir, &["--listen", &api, "--mqtt-listen", &mqtt]);
    let fleet = start();
    let config = device_config(dir, "dev-k", &fleet.broker, &["lab"]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-k"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    fleet.cli(
        dir,
        &["fleet", "deploy", "digits@1.0.0", "--tag", "lab", "--wait"],
    );
    let key_before = fs::read(dir.join("fleet-data/fleet.key")).unwrap();
    drop(fleet); // kill -9: the embedded broker goes with it

    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        device.digits(),
        Ok("1.0.0".into()),
        "serving without its fleet"
    );
    let fleet = start();
    assert_eq!(
        fs::read(dir.join("fleet-data/fleet.key")).unwrap(),
        key_before
    );
    // Its registry, bundles and deployments survived; the device comes back by itself.
    let (_, bundles) = get_json(&format!("{}/api/v1/bundles", fleet.api));
    assert_eq!(bundles[0]["version"], "1.0.0");
    let (_, deployments) = get_json(&format!("{}/api/v1/deployments", fleet.api));
    assert_eq!(deployments.as_array().unwrap().len(), 1);
    let before = fleet.records("telemetry", "dev-k").len();
    eventually(60, "the device back online and reporting", || {
        let d = fleet.device("dev-k")?;
        (d["online"] == true && fleet.records("telemetry", "dev-k").len() > before + 5)
            .then_some(())
    });
    // Deploying again after the restart works end to end.
    fleet.cli(dir, &["fleet", "push", "digits-2.0.0.opb"]);
    let out = fleet.cli(
        dir,
        &[
            "fleet",
            "deploy",
            "digits@2.0.0",
            "--device",
            "dev-k",
            "--wait",
        ],
    );
    assert!(out.contains("dev-k: applied"), "{out}");
    assert_eq!(device.digits(), Ok("2.0.0".into()));
    let seqs: Vec<u64> = fleet
        .records("telemetry", "dev-k")
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len());
}

/// The retained message on `topic`, if any arrives within a second.
fn retained_now(broker: &str, topic: &str) -> Option<Vec<u8>> {
    let (client, mut connection) = mqtt_client(broker, "peek");
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if let Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) =
            connection.recv_timeout(Duration::from_millis(100))
        {
            return Some(p.payload.to_vec());
        }
    }
    None
}

#[test]
fn a_decommissioned_device_is_forgotten() {
    let d = bed("forget");
    let dir = &d.0;
    let (fleet, mut device) = fleet_with_digits(dir, "dev-f");
    assert!(retained_now(&fleet.broker, "outpost/v1/dev-f/desired").is_some());
    device.proc.kill9();
    let out = fleet.cli(dir, &["fleet", "forget", "dev-f"]);
    assert!(out.contains("forgot dev-f"), "{out}");
    assert!(fleet.device("dev-f").is_none());
    assert!(fleet.devices().is_empty());
    eventually(10, "retained messages cleared", || {
        ["desired", "status", "reported"]
            .iter()
            .all(|leaf| retained_now(&fleet.broker, &format!("outpost/v1/dev-f/{leaf}")).is_none())
            .then_some(())
    });
    // Its last will (the broker publishes it when the connection drops, possibly after the
    // forget) neither registers it again nor stays retained.
    std::thread::sleep(Duration::from_secs(1));
    assert!(retained_now(&fleet.broker, "outpost/v1/dev-f/status").is_none());
    let (status, _) = get_json(&format!("{}/api/v1/devices/dev-f", fleet.api));
    assert_eq!(status, 404);
    let out = bin()
        .args(["fleet", "forget", "dev-f", "--fleet", &fleet.api])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    // Its history stays until retention removes it.
    assert!(!fleet.records("telemetry", "dev-f").is_empty());
}

#[test]
fn an_unreachable_artifact_server_is_retried_until_the_deployment_applies() {
    let d = bed("retry");
    let dir = &d.0;
    // Devices are told to download from a port where nothing listens yet.
    let port = free_port();
    let public = format!("http://127.0.0.1:{port}");
    let fleet = Fleet::start(dir, None, Some(&public));
    let config = device_config(dir, "dev-t", &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &["dev-t"]);
    fleet.cli(dir, &["fleet", "push", "digits-1.0.0.opb"]);
    let deploy = {
        let (dir, api) = (dir.clone(), fleet.api.clone());
        std::thread::spawn(move || {
            ok(
                &dir,
                &[
                    "fleet",
                    "deploy",
                    "digits@1.0.0",
                    "--device",
                    "dev-t",
                    "--wait",
                    "--timeout",
                    "120",
                    "--fleet",
                    &api,
                ],
            )
        })
    };
    eventually(30, "the device retrying", || {
        fleet.reported("dev-t").filter(|r| r["retrying"] == true)
    });
    assert_eq!(device.digits(), Err(404));
    // The artifact server comes up; the next retry succeeds.
    let (_, _) = proxy_on(
        TcpListener::bind(("127.0.0.1", port)).unwrap(),
        fleet.api.clone(),
        Duration::ZERO,
    );
    let out = deploy.join().unwrap();
    assert!(out.contains("dev-t: retrying after"), "{out}");
    assert!(out.contains("dev-t: applied"), "{out}");
    assert_eq!(device.digits(), Ok("1.0.0".into()));
    let reported = fleet.reported("dev-t").unwrap();
    assert_eq!(reported["retrying"], false);
    assert!(reported["last_error"].is_null(), "{reported}");
}
