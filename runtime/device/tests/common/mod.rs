//! A device served on a loopback port chosen by the OS, a signing key, and an HTTP client.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_bundle::{BuildInput, Bundle, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_examples::Example;

pub const TOKEN: &str = "test-admin-token-0123456789";

pub fn key() -> SecretKey {
    SecretKey::from_seed(&[5; 32])
}

pub fn trust() -> TrustStore {
    let mut t = TrustStore::new();
    t.allow(key().public(), ["*"]);
    t
}

/// A unique empty directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir =
            std::env::temp_dir().join(format!("outpost-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn config(dir: &TempDir, extra: &str) -> Config {
    let text = format!(
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{TOKEN}\"\n{extra}"
    );
    Config::from_toml(&text, &dir.0).unwrap()
}

/// A signed bundle of an example, optionally with another version.
pub fn example_bundle(example: Example, version: Option<&str>) -> Vec<u8> {
    let mut input = example.build_input().unwrap();
    if let Some(v) = version {
        input.version = v.parse().unwrap();
    }
    signed(input)
}

pub fn signed(input: BuildInput) -> Vec<u8> {
    let mut b = Bundle::build(input).unwrap();
    b.sign(&key());
    b.to_bytes()
}

/// The hostile guest as a bundle named `hostile`, with tight limits.
pub fn hostile_bundle(timeout_ms: u64) -> Vec<u8> {
    let mut input = Example::Digits.build_input().unwrap();
    input.name = "hostile".into();
    input.guest = outpost_examples::HOSTILE_GUEST.to_vec();
    input.api = Default::default();
    input.api.raw_content_types = vec!["text/plain".into()];
    input.limits.memory_bytes = 16 << 20;
    input.limits.timeout_ms = timeout_ms;
    input.limits.max_tensor_bytes = 1 << 20;
    input.baseline = None;
    input.models.push(outpost_bundle::ModelInput {
        name: "lookup".into(),
        bytes: outpost_examples::graphs::lookup_onnx(),
        inputs: Vec::new(),
        outputs: Vec::new(),
    });
    signed(input)
}

/// A device serving on loopback, stopped when dropped.
pub struct Server {
    pub device: Arc<Device>,
    pub url: String,
    pub admin_url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(device: Device, config: &Config) -> Self {
        let device = Arc::new(device);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let d = Arc::clone(&device);
        let config = config.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // The configuration asks for port 0 on both listeners.
                let listeners = Listeners::bind(&config).await.unwrap();
                addr_tx
                    .send((
                        listeners.public_addr().unwrap(),
                        listeners.admin_addr().unwrap().unwrap(),
                    ))
                    .unwrap();
                outpost_device::run(d, &config, listeners, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let (public, admin) = addr_rx.recv().unwrap();
        Self {
            device,
            url: format!("http://{public}"),
            admin_url: format!("http://{admin}"),
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

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Status and body of a response.
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.unwrap();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Reply {
        status: r.status().as_u16(),
        content_type,
        body: r
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .unwrap(),
    }
}

pub fn get(url: &str) -> Reply {
    reply(agent().get(url).call())
}

pub fn post(url: &str, content_type: &str, body: &[u8]) -> Reply {
    reply(
        agent()
            .post(url)
            .header("content-type", content_type)
            .send(body),
    )
}

pub fn post_json(url: &str, body: &serde_json::Value) -> Reply {
    post(url, "application/json", body.to_string().as_bytes())
}

pub fn admin(method: &str, url: &str, body: &[u8]) -> Reply {
    let a = agent();
    let auth = format!("Bearer {TOKEN}");
    reply(match method {
        "GET" => a.get(url).header("authorization", &auth).call(),
        "DELETE" => a.delete(url).header("authorization", &auth).call(),
        _ => a.post(url).header("authorization", &auth).send(body),
    })
}

/// Waits until `f` returns `Some`, for at most `limit`.
pub fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A digits request for one row of pixels.
pub fn digits_request(pixels: &[f64]) -> serde_json::Value {
    serde_json::json!({
        "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]
    })
}
