//! A device served on a loopback port chosen by the OS, a signing key and trust store, and
//! signed example bundles. The generic helpers (temporary directories, `eventually`, HTTP) are
//! in `outpost-testkit`.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use outpost_bundle::{BuildInput, Bundle, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_examples::Example;
use outpost_testkit::{ADMIN_TOKEN, TempDir};

pub fn key() -> SecretKey {
    SecretKey::from_seed(&[5; 32])
}

pub fn trust() -> TrustStore {
    let mut t = TrustStore::new();
    t.allow(key().public(), ["*"]);
    t
}

pub fn config(dir: &TempDir, extra: &str) -> Config {
    let text = format!(
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN_TOKEN}\"\n{extra}"
    );
    Config::from_toml(&text, dir.path()).unwrap()
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
    signed(hostile_input(timeout_ms))
}

/// The build input of [`hostile_bundle`].
pub fn hostile_input(timeout_ms: u64) -> BuildInput {
    let mut input = Example::Digits.build_input().unwrap();
    input.name = "hostile".into();
    input.guest = outpost_examples::HOSTILE_GUEST.to_vec();
    input.api = Default::default();
    // Its echo, and each attack it knows (tests/guests/hostile); the host refuses the rest.
    input.api.raw_content_types = [
        "text/plain",
        "attack/spin",
        "attack/grow",
        "attack/huge-tensor",
        "attack/huge-output",
        "attack/lookup",
        "attack/file",
        "attack/socket",
        "attack/panic",
    ]
    .map(String::from)
    .to_vec();
    input.limits.memory_bytes = 16 << 20;
    input.limits.timeout_ms = timeout_ms;
    input.limits.max_tensor_bytes = 1 << 20;
    input.baseline = None;
    input.models.push(outpost_bundle::ModelInput {
        name: "lookup".into(),
        bytes: outpost_examples::graphs::lookup_onnx(),
        inputs: Vec::new(),
        outputs: Vec::new(),
        repairs: Vec::new(),
        backend: None,
    });
    input
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

/// A device serving every example, with a 64 KiB request limit.
pub fn serve_examples(tag: &str) -> (TempDir, Server) {
    let dir = TempDir::new(tag);
    let config = config(&dir, "max_request_bytes = 65536\n");
    let device = Device::with_trust(&config, trust()).unwrap();
    for e in Example::ALL {
        device
            .install_and_activate(&example_bundle(e, None))
            .unwrap();
    }
    let server = Server::start(device, &config);
    (dir, server)
}
