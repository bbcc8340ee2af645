//! The onnxruntime backend on a device, over HTTP: a bundle built with `--onnx` served by
//! onnxruntime with the answers tract gives, the backend named in the model's metadata and in
//! `/metrics`; a bundle that requires onnxruntime refused on a device that cannot load it
//! (the version before keeps serving); a library that is not onnxruntime named at start while
//! the device serves on tract. One test: a process loads one onnxruntime, so the device
//! without it comes first.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_testkit::{TempDir, get, post_json};
use serde_json::{Value, json};

fn outpost(dir: &Path, args: &[&str], ort: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outpost"));
    c.args(args).current_dir(dir).env_remove("ORT_DYLIB_PATH");
    if let Some(ort) = ort {
        c.env("ORT_DYLIB_PATH", ort);
    }
    c.output().unwrap()
}

fn build(dir: &Path, version: &str, backend: Option<&str>, ort: Option<&Path>) -> Vec<u8> {
    let out_name = format!("digits-{version}.opb");
    let mut args = vec![
        "bundle",
        "build",
        "--onnx",
        "digits.onnx",
        "--name",
        "digits",
        "--version",
        version,
        "--scale",
        "input=0.0625",
        "--out",
        &out_name,
    ];
    if let Some(b) = backend {
        args.extend(["--backend", b]);
    }
    let out = outpost(dir, &args, ort);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = SecretKey::from_seed(&[9; 32]);
    let mut b = Bundle::read(
        &fs::read(dir.join(&out_name)).unwrap()[..],
        &ReadLimits::default(),
    )
    .unwrap();
    b.sign(&key);
    b.to_bytes()
}

struct Served {
    url: String,
    device: Arc<Device>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn serve(dir: &TempDir, state: &str, inference: &str) -> Served {
    let key = SecretKey::from_seed(&[9; 32]);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    let config = Config::from_toml(
        &format!("data_dir = \"{state}\"\nlisten = \"127.0.0.1:0\"\n[inference]\n{inference}\n"),
        dir.path(),
    )
    .unwrap();
    let device = Arc::new(Device::with_trust(&config, trust).unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let serving = Arc::clone(&device);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listeners = Listeners::bind(&config).await.unwrap();
            addr_tx.send(listeners.public_addr().unwrap()).unwrap();
            outpost_device::run(serving, &config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    Served {
        url: format!("http://{addr}"),
        device,
        _stop: stop,
    }
}

/// Every case of the digits reference through `url`, within 1e-5.
fn answers_like_the_reference(url: &str) {
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let reply = post_json(
            &format!("{url}/v2/models/digits/infer"),
            &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": case["pixels"]}]}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        for (got, want) in body["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["probabilities"].as_array().unwrap())
        {
            let (got, want) = (got.as_f64().unwrap(), want.as_f64().unwrap());
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
}

fn backend_of(url: &str) -> Value {
    let meta = get(&format!("{url}/v2/models/digits"));
    assert_eq!(meta.status, 200, "{}", meta.text());
    meta.json()["parameters"]["backends"]["model"].clone()
}

#[test]
fn a_device_serves_on_onnxruntime_and_refuses_what_it_cannot_run() {
    let Some(ort) = outpost_testkit::onnxruntime_library() else {
        return;
    };
    let dir = TempDir::new("ort-device");
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    let any = build(dir.path(), "1.0.0", None, None);
    // Requiring onnxruntime, `bundle build` checks the model on it, and says so without one.
    let refused = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "digits.onnx",
            "--name",
            "digits",
            "--version",
            "2.0.0",
            "--backend",
            "onnxruntime",
            "--out",
            "no.opb",
        ],
        None,
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ORT_DYLIB_PATH"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let required = build(dir.path(), "2.0.0", Some("onnxruntime"), Some(&ort));
    let manifest = Bundle::read(&required[..], &ReadLimits::default()).unwrap();
    assert_eq!(
        manifest.manifest().models[0].backend,
        Some(outpost_bundle::manifest::BackendKind::Onnxruntime)
    );

    // A library that is not onnxruntime: the device starts, says why, and serves on tract.
    let bogus = dir.join("libonnxruntime.so");
    fs::write(&bogus, "this is text, not a shared library at all").unwrap();
    let without = serve(
        &dir,
        "state-a",
        &format!("onnxruntime_library = \"{}\"", bogus.display()),
    );
    without.device.install_and_activate(&any).unwrap();
    assert_eq!(backend_of(&without.url), "tract");
    answers_like_the_reference(&without.url);
    let metrics = get(&format!("{}/metrics", without.url)).text();
    assert!(
        metrics.contains("outpost_backend_available{backend=\"onnxruntime\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_backend_available{backend=\"tract\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "outpost_model_backend{model=\"digits\",version=\"1.0.0\",onnx=\"model\",backend=\"tract\"} 1"
        ),
        "{metrics}"
    );
    // A bundle that requires onnxruntime is refused with the reason; 1.0.0 keeps serving.
    let e = without
        .device
        .install_and_activate(&required)
        .unwrap_err()
        .to_string();
    assert!(e.contains("requires the onnxruntime backend"), "{e}");
    assert!(e.contains("no ELF header"), "{e}");
    assert_eq!(
        without.device.status().unwrap()[0].active.as_deref(),
        Some("1.0.0")
    );
    answers_like_the_reference(&without.url);
    drop(without);

    // With the library: onnxruntime first, the same answers, and the required bundle runs.
    let with = serve(
        &dir,
        "state-b",
        &format!("onnxruntime_library = \"{}\"", ort.display()),
    );
    with.device.install_and_activate(&any).unwrap();
    assert_eq!(backend_of(&with.url), "onnxruntime");
    answers_like_the_reference(&with.url);
    with.device.install_and_activate(&required).unwrap();
    assert_eq!(backend_of(&with.url), "onnxruntime");
    answers_like_the_reference(&with.url);
    let metrics = get(&format!("{}/metrics", with.url)).text();
    assert!(
        metrics.contains("outpost_backend_available{backend=\"onnxruntime\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "outpost_model_backend{model=\"digits\",version=\"2.0.0\",onnx=\"model\",backend=\"onnxruntime\"} 1"
        ),
        "{metrics}"
    );
    // A bad request is the client's fault on this backend too.
    let bad = post_json(
        &format!("{}/v2/models/digits/infer", with.url),
        &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 63],
                            "data": vec![0.0; 63]}]}),
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    drop(with);

    // The order of preference is the operator's: tract first keeps it on tract.
    let tract_first = serve(
        &dir,
        "state-c",
        &format!(
            "backends = [\"tract\", \"onnxruntime\"]\nonnxruntime_library = \"{}\"",
            ort.display()
        ),
    );
    tract_first.device.install_and_activate(&any).unwrap();
    assert_eq!(backend_of(&tract_first.url), "tract");
}
