//! `outpost bundle build --onnx`: a bundle from an ONNX file alone, served over HTTP with the
//! built-in generic guest, answering as the model does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_testkit::{TempDir, post_json};
use serde_json::{Value, json};

fn outpost(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// Serves `bundle` (signed here) on a loopback port; returns its URL and a stop handle.
fn serve(dir: &TempDir, bundle: &[u8]) -> (String, tokio::sync::oneshot::Sender<()>) {
    let key = SecretKey::from_seed(&[9; 32]);
    let mut b = Bundle::read(bundle, &ReadLimits::default()).unwrap();
    b.sign(&key);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    let config = Config::from_toml(
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\n",
        dir.path(),
    )
    .unwrap();
    let device = Arc::new(Device::with_trust(&config, trust).unwrap());
    device.install_and_activate(&b.to_bytes()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
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
    (format!("http://{}", addr_rx.recv().unwrap()), stop)
}

#[test]
fn an_onnx_file_alone_becomes_a_bundle_that_answers_like_the_model() {
    let dir = TempDir::new("onnx-digits");
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "digits.onnx",
            "--name",
            "digits-onnx",
            "--version",
            "1.2.0",
            "--scale",
            "input=0.0625",
            "--out",
            "digits.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The spec it wrote builds the same bundle again.
    let spec = fs::read_to_string(dir.join("digits-onnx.bundle.toml")).unwrap();
    assert!(spec.contains("path = \"digits.onnx\""), "{spec}");
    let again = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "digits-onnx.bundle.toml",
            "--out",
            "again.opb",
        ],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let bundle = fs::read(dir.join("digits.opb")).unwrap();
    assert_eq!(bundle, fs::read(dir.join("again.opb")).unwrap());

    // The endpoint takes and returns the graph's own tensors.
    let manifest = Bundle::read(&bundle[..], &ReadLimits::default())
        .unwrap()
        .manifest()
        .clone();
    assert_eq!(manifest.api.inputs[0].name, "input");
    assert_eq!(manifest.api.outputs[0].name, "probabilities");

    let (url, _stop) = serve(&dir, &bundle);
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let pixels = case["pixels"].as_array().unwrap();
        let reply = post_json(
            &format!("{url}/v2/models/digits-onnx/infer"),
            &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": pixels}]}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        let output = &body["outputs"][0];
        assert_eq!(output["name"], "probabilities");
        assert_eq!(output["shape"], json!([1, 10]));
        for (got, want) in output["data"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["probabilities"].as_array().unwrap())
        {
            let (got, want) = (got.as_f64().unwrap(), want.as_f64().unwrap());
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }
    // The raw endpoint is not this guest's.
    let raw = outpost_testkit::post(
        &format!("{url}/v2/models/digits-onnx/raw"),
        "image/png",
        outpost_examples::DIGIT_PNG,
    );
    assert!(raw.status >= 400 && raw.status < 500, "{}", raw.status);
}

#[test]
fn a_bad_onnx_build_says_what_is_wrong_and_writes_nothing() {
    let dir = TempDir::new("onnx-bad");
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    fs::write(dir.join("notes.onnx"), b"not a model").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--onnx", "notes.onnx"],
            "cannot read `notes.onnx` as an ONNX model",
        ),
        (
            &["--onnx", "digits.onnx", "--input-shape", "input=1,65"],
            "fixed at 64",
        ),
        (
            &["--onnx", "digits.onnx", "--input-shape", "pixels=1,64"],
            "no input `pixels` (its inputs: input)",
        ),
        (
            &["--onnx", "digits.onnx", "--scale", "input=x"],
            "`x` is not a number",
        ),
        (
            &["--onnx", "digits.onnx", "--softmax", "logits"],
            "no FP32 output `logits`",
        ),
    ];
    for (args, wanted) in cases {
        let mut all = vec![
            "bundle",
            "build",
            "--name",
            "m",
            "--version",
            "1.0.0",
            "--out",
            "m.opb",
        ];
        all.extend_from_slice(args);
        let out = outpost(dir.path(), &all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.contains(wanted), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!dir.join("m.opb").exists(), "{args:?} wrote a bundle");
        assert!(!dir.join("m.bundle.toml").exists(), "{args:?} wrote a spec");
    }
}

#[test]
fn an_export_with_known_quirks_is_repaired_recorded_and_served() {
    let dir = TempDir::new("onnx-quirks");
    fs::write(
        dir.join("clf.onnx"),
        outpost_examples::graphs::quirky_classifier_onnx(),
    )
    .unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "clf.onnx",
            "--name",
            "clf",
            "--version",
            "1.0.0",
            "--out",
            "clf.opb",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("dropped the ZipMap"), "{stdout}");
    let bundle = fs::read(dir.join("clf.opb")).unwrap();
    let manifest = Bundle::read(&bundle[..], &ReadLimits::default())
        .unwrap()
        .manifest()
        .clone();
    assert_eq!(
        manifest.models[0].repairs.len(),
        2,
        "{:?}",
        manifest.models[0]
    );
    let inspect = outpost(dir.path(), &["bundle", "inspect", "clf.opb"]);
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("repaired renamed 2 node(s)"));

    let (url, _stop) = serve(&dir, &bundle);
    let reply = post_json(
        &format!("{url}/v2/models/clf/infer"),
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}]}),
    );
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["outputs"][0]["name"], "output_probability");
    let p: Vec<f64> = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let e = (-1.0f64).exp();
    assert!((p[1] - 1.0 / (1.0 + e)).abs() < 1e-6, "{p:?}");
}

#[test]
fn model_inspect_shows_the_graph_as_tract_sees_it() {
    let dir = TempDir::new("model-inspect");
    fs::write(
        dir.join("clf.onnx"),
        outpost_examples::graphs::quirky_classifier_onnx(),
    )
    .unwrap();
    fs::write(
        dir.join("reshape.onnx"),
        outpost_examples::graphs::reshape_onnx(),
    )
    .unwrap();
    let text = |args: &[&str]| {
        let out = outpost(dir.path(), args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let clf = text(&["model", "inspect", "clf.onnx"]);
    for wanted in [
        "inputs      x FP32[n, 2]",
        "outputs     output_probability FP32[n, 2]",
        "repaired    dropped the ZipMap",
        "ai.onnx.ml.ZipMap×1",
        "unsupported ZipMap (removed by the repairs above)",
        "weights     2 parameters, 8 bytes",
    ] {
        assert!(clf.contains(wanted), "{wanted}\n{clf}");
    }
    // Open, the Reshape does not type; pinned, it does.
    let open = text(&["model", "inspect", "reshape.onnx"]);
    assert!(open.contains("tract cannot type the graph"), "{open}");
    assert!(open.contains("--input-shape"), "{open}");
    let pinned = text(&[
        "model",
        "inspect",
        "reshape.onnx",
        "--input-shape",
        "x=4",
        "--json",
    ]);
    let doc: Value = serde_json::from_str(&pinned).unwrap();
    assert_eq!(doc["outputs"][0]["shape"], json!([2, 2]));
    let bad = outpost(dir.path(), &["model", "inspect", "nothing.onnx"]);
    assert!(!bad.status.success());
}
