//! The scenario bed: `outpost` processes (fleets, devices) and Mosquitto on loopback ports the
//! OS picks, an artifact proxy, plain MQTT clients. Waiting and HTTP come from
//! `outpost-testkit`; running the CLI and making signed digits bundles from the CLI's own test
//! helpers, shared with its single-process tests.

#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    clippy::unwrap_used,
    clippy::expect_used
)]

#[path = "../../../runtime/cli/tests/common/mod.rs"]
pub mod cli;
/// Raw MQTT 3.1.1 packets, as an attacker sends them.
#[path = "../../../runtime/fleet/tests/raw/mod.rs"]
pub mod raw;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;

pub use cli::{bin, build_and_sign, digits_spec, fails, ok, signer};
/// The scratch directory of a scenario (`Dir::new(tag)`, `.0`).
pub use outpost_testkit::TempDir as Dir;
pub use outpost_testkit::{agent as http, eventually, get_json, throughout};

/// `n` seconds, for [`eventually`] limits.
pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed on drop, with its stderr kept for failure messages.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Starts `outpost ARGS` in `dir`, waiting for a stderr line containing `marker`; returns
    /// the process and the rest of that line after the marker.
    pub fn start(dir: &Path, args: &[&str], marker: &str) -> (Self, String) {
        Self::start_limited(dir, args, marker, None)
    }

    /// [`Proc::start`], with at most `fds` open file descriptors (by `prlimit`) when given.
    pub fn start_limited(
        dir: &Path,
        args: &[&str],
        marker: &str,
        fds: Option<u64>,
    ) -> (Self, String) {
        let mut command = match fds {
            None => bin(),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(bin().get_program());
                c
            }
        };
        let mut child = command
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

    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn kill9(&mut self) {
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

pub fn first_word(s: &str) -> String {
    s.chars().take_while(|c| !c.is_whitespace()).collect()
}

/// A running fleet manager.
pub struct Fleet {
    pub _proc: Proc,
    pub api: String,
    pub broker: String,
}

impl Fleet {
    /// `outpost fleet serve ARGS`, with a fresh data dir and free ports unless ARGS say otherwise.
    pub fn launch(dir: &Path, args: &[&str]) -> Self {
        Self::launch_limited(dir, args, None)
    }

    /// [`Fleet::launch`] with at most `fds` open file descriptors, when given.
    pub fn launch_limited(dir: &Path, args: &[&str], fds: Option<u64>) -> Self {
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
        let (proc, rest) = Proc::start_limited(dir, &all, "fleet ready api=", fds);
        let i = rest.find("broker=").unwrap();
        let scheme = if args.contains(&"--tls-cert") {
            "https"
        } else {
            "http"
        };
        Self {
            _proc: proc,
            api: format!("{scheme}://{}", first_word(&rest)),
            broker: first_word(&rest[i + 7..]),
        }
    }

    pub fn start(dir: &Path, broker: Option<&str>, public_url: Option<&str>) -> Self {
        let mut args = Vec::new();
        if let Some(b) = broker {
            args.extend(["--broker", b]);
        }
        if let Some(u) = public_url {
            args.extend(["--public-url", u]);
        }
        Self::launch(dir, &args)
    }

    pub fn devices(&self) -> Vec<Value> {
        get_json(&format!("{}/api/v1/devices", self.api))
            .1
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn device(&self, id: &str) -> Option<Value> {
        let (status, v) = get_json(&format!("{}/api/v1/devices/{id}", self.api));
        (status == 200).then_some(v)
    }

    pub fn reported(&self, id: &str) -> Option<Value> {
        self.device(id)
            .map(|d| d["reported"].clone())
            .filter(|r| !r.is_null())
    }

    pub fn records(&self, stream: &str, device: &str) -> Vec<Value> {
        get_json(&format!(
            "{}/api/v1/{stream}?device={device}&limit=100000",
            self.api
        ))
        .1["records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn cli(&self, dir: &Path, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--fleet", &self.api]);
        ok(dir, &all)
    }
}

/// A test bed: signer key, trust store, signed digits bundles 1.0.0 and 2.0.0.
pub fn bed(tag: &str) -> Dir {
    let d = Dir::new(&format!("fleet-{tag}"));
    signer(&d.0);
    for v in ["1.0.0", "2.0.0"] {
        digits_spec(&d.0, v);
        build_and_sign(&d.0, &format!("{v}.toml"), &format!("digits-{v}.opb"));
    }
    d
}

/// Builds `digits-{version}.opb` with the training baseline of `models/digits` (drift
/// features, prediction drift, quality from feedback), in a bed made by [`bed`].
pub fn digits_with_baseline(dir: &Path, version: &str) {
    fs::write(
        dir.join("baseline.json"),
        include_bytes!("../../../models/digits/baseline.json"),
    )
    .unwrap();
    let spec = fs::read_to_string(dir.join("1.0.0.toml")).unwrap();
    fs::write(
        dir.join(format!("{version}.toml")),
        spec.replace("version = \"1.0.0\"", &format!("version = \"{version}\""))
            .replace(
                "guest = \"guest.wasm\"",
                "guest = \"guest.wasm\"\nbaseline = \"baseline.json\"",
            ),
    )
    .unwrap();
    build_and_sign(
        dir,
        &format!("{version}.toml"),
        &format!("digits-{version}.opb"),
    );
}

/// The test digits `models/digits/train.py` recorded: their pixels (0–16) and true labels.
pub fn test_digits() -> Vec<(Vec<f64>, u64)> {
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                serde_json::from_value(c["pixels"].clone()).unwrap(),
                c["true_label"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A digit faded to a third of its ink: the drifted traffic of the monitoring tests (and of
/// `models/digits/retrain.py`).
pub fn faded(pixels: &[f64]) -> Vec<f64> {
    pixels.iter().map(|v| (v / 3.0).floor()).collect()
}

/// Writes a device config and returns its file name.
pub fn device_config(dir: &Path, id: &str, broker: &str, tags: &[&str]) -> String {
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
pub struct Device {
    pub proc: Proc,
    pub url: String,
}

impl Device {
    pub fn start(dir: &Path, config: &str) -> Self {
        Self::start_limited(dir, config, None)
    }

    /// [`Device::start`] with at most `fds` open file descriptors, when given.
    pub fn start_limited(dir: &Path, config: &str, fds: Option<u64>) -> Self {
        let (proc, rest) = Proc::start_limited(
            dir,
            &["device", "run", "--config", config],
            "serving addr=",
            fds,
        );
        Self {
            proc,
            url: format!("http://{}", first_word(&rest)),
        }
    }

    /// The digits version answering, or the HTTP status when none does.
    pub fn digits(&self) -> Result<String, u16> {
        digits(&self.url)
    }

    /// The value of an unlabelled series in the device's `/metrics`.
    pub fn metric(&self, name: &str) -> Option<u64> {
        metric(&self.url, name)
    }
}

/// The value of the unlabelled series `name` in the Prometheus text at `url/metrics`.
pub fn metric(url: &str, name: &str) -> Option<u64> {
    let text = outpost_testkit::get(&format!("{url}/metrics")).text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub use outpost_testkit::digits_version as digits;

pub fn online(fleet: &Fleet, ids: &[&str]) {
    eventually(secs(60), "devices online with reported state", || {
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
pub fn fleet_with_digits(dir: &Path, id: &str) -> (Fleet, Device) {
    let fleet = Fleet::start(dir, None, None);
    let config = device_config(dir, id, &fleet.broker, &[]);
    let device = Device::start(dir, &config);
    online(&fleet, &[id]);
    push_and_deploy_digits(|args| fleet.cli(dir, args), &["--device", id], &[id]);
    (fleet, device)
}

/// Pushes digits 1.0.0 through `cli` (a fleet's own CLI, or one with more flags) and deploys it
/// to `target` (`["--device", ID]`, `["--tag", TAG]`) with `--wait`; asserts that every device
/// in `applied` applied it.
pub fn push_and_deploy_digits(cli: impl Fn(&[&str]) -> String, target: &[&str], applied: &[&str]) {
    cli(&["fleet", "push", "digits-1.0.0.opb"]);
    let mut args = vec![
        "fleet",
        "deploy",
        "digits@1.0.0",
        "--wait",
        "--timeout",
        "120",
    ];
    args.extend_from_slice(target);
    let out = cli(&args);
    for id in applied {
        assert!(out.contains(&format!("{id}: applied")), "{out}");
    }
}

/// A Mosquitto broker on a free loopback port (Debian's package), restartable on that port.
pub struct Mosquitto {
    pub port: u16,
    pub conf: PathBuf,
    pub child: Option<Child>,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, "allow_anonymous true\n")
    }

    /// Mosquitto on a free loopback port with `settings` for its listener.
    pub fn start_with(dir: &Path, settings: &str) -> Self {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\npersistence false\n{settings}"),
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

    pub fn restart(&mut self) {
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
        eventually(secs(20), "mosquitto listening", || {
            TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(|_| ())
        });
    }

    /// Makes it read its password and ACL files again (SIGHUP).
    pub fn reload(&self) {
        if let Some(c) = &self.child {
            let status = Command::new("kill")
                .args(["-HUP", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(status.success());
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A slow HTTP proxy in front of the fleet's artifact store, recording each request's Range.
pub fn slow_proxy(upstream: String) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    proxy_on(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        upstream,
        Duration::from_millis(50),
    )
}

/// An HTTP proxy on `listener` to `upstream`, writing 2 KB every `pause`, recording each
/// request's Range header.
pub fn proxy_on(
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

/// A plain MQTT client on `broker` (`mqtt://HOST:PORT`).
pub fn mqtt_client(broker: &str, name: &str) -> (rumqttc::Client, rumqttc::Connection) {
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
pub fn publish_retained(broker: &str, topic: &str, payload: Vec<u8>) {
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
pub fn retained(broker: &str, topic: &str) -> Vec<u8> {
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

/// The retained message on `topic`, if there is one. A broker sends a subscription's retained
/// messages before anything published after the subscription: so the answer is whatever
/// arrives on `topic` before a probe this client publishes once subscribed.
pub fn retained_now(broker: &str, topic: &str) -> Option<Vec<u8>> {
    let (client, mut connection) = mqtt_client(broker, "peek");
    let probe = format!("outpost-test/probe/{}", free_port());
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    client.subscribe(&probe, rumqttc::QoS::AtLeastOnce).unwrap();
    let mut subscribed = 0;
    for event in connection.iter() {
        match event.unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                subscribed += 1;
                if subscribed == 2 {
                    client
                        .publish(&probe, rumqttc::QoS::AtLeastOnce, false, b"probe".to_vec())
                        .unwrap();
                }
            }
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                let _ = client.disconnect();
                return (p.topic == topic).then(|| p.payload.to_vec());
            }
            _ => {}
        }
    }
    panic!("the broker closed the connection while reading {topic}");
}

/// A CA and a server certificate it signed for `127.0.0.1` and `localhost`, made with the
/// `openssl` command in `dir` under `name`: (CA certificate, server certificate, server key).
pub fn tls_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let path = |f: &str| dir.join(format!("{name}-{f}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is not installed (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (ca, ca_key) = (path("ca.pem"), path("ca.key"));
    let (cert, key, csr) = (path("cert.pem"), path("key.pem"), path("cert.csr"));
    let ext = path("ext.cnf");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&ca_key),
        "-out",
        &s(&ca),
        "-days",
        "2",
        "-subj",
        &format!("/CN={name} test CA"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-out",
        &s(&cert),
        "-days",
        "2",
        "-extfile",
        &s(&ext),
    ]);
    // Mosquitto started as root reads its files as the `mosquitto` user.
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    (ca, cert, key)
}

/// The configuration of a device whose `[fleet]` section is what `fleet enroll` printed.
pub fn enrolled_config(dir: &Path, id: &str, fleet_section: &str) -> String {
    let name = format!("{id}.toml");
    let section = fleet_section.replace("[fleet]\n", "[fleet]\ntelemetry_interval_ms = 100\n");
    std::fs::write(
        dir.join(&name),
        format!(
            "data_dir = \"{id}-state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\
             trust_store = \"trust.toml\"\n{section}"
        ),
    )
    .unwrap();
    name
}

/// `outpost fleet enroll ID --tag lab`, the password written to `ID.pw`; the printed section.
pub fn enroll(fleet: &Fleet, dir: &Path, id: &str) -> String {
    let pw = format!("{id}.pw");
    fleet.cli(
        dir,
        &[
            "fleet",
            "enroll",
            id,
            "--tag",
            "lab",
            "--password-out",
            &pw,
            "--device-password-file",
            &pw,
        ],
    )
}

/// A stand-alone device with its admin API (token [`outpost_testkit::ADMIN_TOKEN`]), its data
/// in `dir/state` and digits 1.0.0 installed and active (the bed's bundles).
pub fn admin_device_config(dir: &Path) {
    fs::write(
        dir.join("device.toml"),
        format!(
            "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             admin_token = \"{}\"\ntrust_store = \"trust.toml\"\n",
            outpost_testkit::ADMIN_TOKEN
        ),
    )
    .unwrap();
    ok(
        dir,
        &[
            "device",
            "install",
            "digits-1.0.0.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
}

/// Starts the device of [`admin_device_config`]; returns it and its admin API's URL.
pub fn start_admin_device(dir: &Path) -> (Device, String) {
    let device = Device::start(dir, "device.toml");
    let admin = admin_url(&device);
    (device, admin)
}

/// The URL of a running device's admin API, from its log.
pub fn admin_url(device: &Device) -> String {
    eventually(secs(30), "the admin API to listen", || {
        let logs = device.proc.logs();
        let line = logs.lines().find(|l| l.contains("admin API listening"))?;
        Some(format!(
            "http://{}",
            first_word(line.split("addr=").nth(1)?)
        ))
    })
}

/// `digits` at `version` whose guest fails every request (the test guest with
/// `fail_percent` 100), signed by the bed's signer: the bytes of the bundle.
pub fn failing_digits(dir: &Path, version: &str) -> Vec<u8> {
    let key = outpost_bundle::SecretKey::from_file_str(
        &fs::read_to_string(dir.join("signer.key")).unwrap(),
    )
    .unwrap();
    let mut input = outpost_examples::Example::Digits.build_input().unwrap();
    input.version = version.parse().unwrap();
    input.guest = outpost_examples::HOSTILE_GUEST.to_vec();
    input.api = Default::default();
    input.baseline = None;
    input.metadata = [("fail_percent".to_owned(), serde_json::json!(100))].into();
    let mut bundle = outpost_bundle::Bundle::build(input).unwrap();
    bundle.sign(&key);
    bundle.to_bytes()
}

/// The versions of digits the device at `admin_url` lists as installed.
pub fn installed_digits(admin_url: &str) -> Vec<String> {
    let reply = outpost_testkit::admin("GET", &format!("{admin_url}/admin/bundles"), b"");
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["name"] == "digits")
        .map(|b| b["version"].as_str().unwrap().to_owned())
        .collect()
}

/// A TCP link to an MQTT broker through which every byte arrives `latency` late, and whose
/// connections can all be cut at once: a slow, flapping network between a device and its
/// broker.
pub struct FlakyLink {
    /// `mqtt://127.0.0.1:PORT`, to give the device instead of the broker.
    pub url: String,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// Open connections by number: the client's socket and the broker's.
    open: Arc<Mutex<std::collections::HashMap<usize, [TcpStream; 2]>>>,
}

type OpenLinks = Arc<Mutex<std::collections::HashMap<usize, [TcpStream; 2]>>>;

impl FlakyLink {
    /// Starts the link to `upstream` (`mqtt://HOST:PORT`).
    pub fn start(upstream: &str, latency: Duration) -> Self {
        let upstream = upstream.trim_start_matches("mqtt://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("mqtt://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open: OpenLinks = Arc::default();
        let (count, conns) = (Arc::clone(&accepted), Arc::clone(&open));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let id = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                conns.lock().unwrap().insert(
                    id,
                    [client.try_clone().unwrap(), server.try_clone().unwrap()],
                );
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let conns = Arc::clone(&conns);
                std::thread::spawn(move || {
                    let a = delay_line(up.0, up.1, latency);
                    let b = delay_line(server, client, latency);
                    let _ = (a.join(), b.join());
                    conns.lock().unwrap().remove(&id);
                });
            }
        });
        Self {
            url,
            accepted,
            open,
        }
    }

    /// Cuts every connection open now; returns how many.
    pub fn cut(&self) -> usize {
        let open: Vec<[TcpStream; 2]> = self.open.lock().unwrap().drain().map(|(_, s)| s).collect();
        for s in open.iter().flatten() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        open.len()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies `from` to `to`, each piece `latency` after it was read; closes both at the end.
/// Returns when both directions' threads are done.
fn delay_line(
    mut from: TcpStream,
    mut to: TcpStream,
    latency: Duration,
) -> std::thread::JoinHandle<()> {
    let (tx, rx) = mpsc::channel::<(std::time::Instant, Vec<u8>)>();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((std::time::Instant::now(), buf[..n].to_vec()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        for (read_at, bytes) in rx {
            let due = read_at + latency;
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = reader.join();
    })
}

/// Asserts that the fleet holds every telemetry and event record of `device` once, numbered
/// 1 to the highest with no gap; returns the highest.
pub fn assert_records_each_once(fleet: &Fleet, device: &str) -> u64 {
    let mut by_seq: std::collections::BTreeMap<u64, usize> = Default::default();
    for stream in ["telemetry", "events"] {
        for record in fleet.records(stream, device) {
            *by_seq.entry(record["seq"].as_u64().unwrap()).or_default() += 1;
        }
    }
    let twice: Vec<u64> = by_seq
        .iter()
        .filter(|&(_, &n)| n > 1)
        .map(|(&s, _)| s)
        .collect();
    assert!(twice.is_empty(), "{device}: stored twice: {twice:?}");
    let last = *by_seq.keys().last().unwrap();
    let missing: Vec<u64> = (1..=last).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{device}: lost {missing:?} of 1..={last}"
    );
    last
}

/// Kill rounds of a crash scenario: `OUTPOST_CRASH_ROUNDS` (`.ci/soak` sets 100), else `default`.
pub fn crash_rounds(default: usize) -> usize {
    std::env::var("OUTPOST_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Builds, signs and pushes digits `{prefix}0` to `{prefix}{n-1}`: a new bundle per round.
pub fn push_versions(dir: &Path, fleet: &Fleet, prefix: &str, n: usize) {
    for round in 0..n {
        let version = format!("{prefix}{round}");
        digits_spec(dir, &version);
        build_and_sign(
            dir,
            &format!("{version}.toml"),
            &format!("digits-{version}.opb"),
        );
        fleet.cli(dir, &["fleet", "push", &format!("digits-{version}.opb")]);
    }
}
