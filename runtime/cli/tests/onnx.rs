//! `outpost bundle build --onnx`: a bundle from an ONNX file alone, served over HTTP with the
//! built-in generic guest, answering as the model does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_device::{Config, Device, Listeners};
use outpost_testkit::{Rng, TempDir, post_json};
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
    let (url, _, stop) = serve_with_admin(dir, bundle);
    (url, stop)
}

/// [`serve`], with the admin API on a second loopback port; returns both URLs.
fn serve_with_admin(
    dir: &TempDir,
    bundle: &[u8],
) -> (String, String, tokio::sync::oneshot::Sender<()>) {
    let key = SecretKey::from_seed(&[9; 32]);
    let mut b = Bundle::read(bundle, &ReadLimits::default()).unwrap();
    b.sign(&key);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    let config = Config::from_toml(
        &format!(
            "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             admin_token = \"{}\"\n",
            outpost_testkit::ADMIN_TOKEN
        ),
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
            let admin = listeners.admin_addr().unwrap().unwrap();
            addr_tx
                .send((listeners.public_addr().unwrap(), admin))
                .unwrap();
            outpost_device::run(device, &config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    let (public, admin) = addr_rx.recv().unwrap();
    (format!("http://{public}"), format!("http://{admin}"), stop)
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
    fs::write(
        dir.join("imputer.onnx"),
        outpost_examples::graphs::imputer_onnx(),
    )
    .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--onnx", "imputer.onnx"],
            "cannot load `imputer.onnx`: it has no Imputer (export the model without it",
        ),
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
        "weights     2 parameters, 8 bytes",
    ] {
        assert!(clf.contains(wanted), "{wanted}\n{clf}");
    }
    assert!(
        !clf.contains("unsupported"),
        "the ZipMap is repaired: {clf}"
    );
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

    // --bench: the cost per item at batch 1, 2, 4 and 8, measured in tract.
    let timed: Value = serde_json::from_str(&text(&[
        "model", "inspect", "clf.onnx", "--bench", "--json",
    ]))
    .unwrap();
    let costs = timed["batch_cost_us"].as_array().unwrap();
    let sizes: Vec<u64> = costs.iter().map(|c| c["batch"].as_u64().unwrap()).collect();
    assert_eq!(sizes, [1, 2, 4, 8]);
    assert!(
        costs
            .iter()
            .all(|c| c["per_item_us"].as_f64().unwrap() > 0.0),
        "{timed}"
    );
    let words = text(&["model", "inspect", "clf.onnx", "--bench"]);
    assert!(words.contains("batch 8"), "{words}");
    assert!(words.contains("[serving.batching]"), "{words}");
    // A first dimension the graph fixes cannot be batched, and says so.
    let fixed = text(&[
        "model",
        "inspect",
        "reshape.onnx",
        "--input-shape",
        "x=4",
        "--bench",
    ]);
    assert!(fixed.contains("cannot time batches"), "{fixed}");
}

/// `n` images `[3, 8, 8]` for the image classifier: each channel at a brightness drawn from
/// 0.2..0.8 (channel 0 `brighter` on top), each pixel within ±0.1 of it.
fn images(n: usize, seed: u64, brighter: f64) -> Vec<[f32; 192]> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| {
            let mut image = [0f32; 192];
            for c in 0..3 {
                let level = 0.2 + 0.6 * rng.next() + if c == 0 { brighter } else { 0.0 };
                for p in &mut image[c * 64..(c + 1) * 64] {
                    *p = (level + 0.2 * (rng.next() - 0.5)) as f32;
                }
            }
            image
        })
        .collect()
}

/// What the generic guest observes of one image: mean and std (population) per channel.
fn image_features(image: &[f32; 192], samples: &mut BTreeMap<String, Vec<f64>>) {
    for c in 0..3 {
        let px: Vec<f64> = image[c * 64..(c + 1) * 64]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let mean = px.iter().sum::<f64>() / 64.0;
        let std = (px.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 64.0).sqrt();
        samples
            .entry(format!("image.mean[{c}]"))
            .or_default()
            .push(mean);
        samples
            .entry(format!("image.std[{c}]"))
            .or_default()
            .push(std);
    }
}

/// `images` as a `.npy` file of FP32 `[n, 3, 8, 8]`.
fn write_npy(path: &Path, images: &[[f32; 192]]) {
    let shape = [images.len() as u64, 3, 8, 8];
    outpost_testkit::write_npy_f32(path, &shape, images.iter().flatten().copied());
}

/// Sends `images` in requests of 10 (a device keeps the predictions of requests of up to 16
/// items for feedback); returns each request's id and predicted classes.
fn classify(url: &str, images: &[[f32; 192]]) -> Vec<(String, Vec<u64>)> {
    images
        .chunks(10)
        .map(|chunk| {
            let data: Vec<f32> = chunk.iter().flatten().copied().collect();
            let reply = post_json(
                &format!("{url}/v2/models/image-onnx/infer"),
                &json!({"inputs": [{"name": "image", "datatype": "FP32",
                                    "shape": [chunk.len(), 3, 8, 8], "data": data}]}),
            );
            assert_eq!(reply.status, 200, "{}", reply.text());
            let body = reply.json();
            let p: Vec<f64> = body["outputs"][0]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let classes = p
                .chunks(4)
                .map(|row| {
                    (0..4).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as u64
                })
                .collect();
            (body["id"].as_str().unwrap().to_owned(), classes)
        })
        .collect()
}

fn drift_of(admin_url: &str) -> Value {
    let r = outpost_testkit::admin("GET", &format!("{admin_url}/admin/drift"), b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["versions"][0].clone()
}

fn psi_of(version: &Value, feature: &str) -> f64 {
    version["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == feature)
        .unwrap_or_else(|| panic!("no feature {feature} in {version}"))["psi"]
        .as_f64()
        .unwrap()
}

#[test]
fn an_onnx_bundle_with_baseline_data_monitors_drift_and_quality_like_numpy() {
    let dir = TempDir::new("onnx-baseline");
    fs::write(
        dir.join("image.onnx"),
        outpost_examples::graphs::image_classifier_onnx(),
    )
    .unwrap();
    let training = images(800, 1, 0.0);
    write_npy(&dir.join("train.npy"), &training);
    let build = |extra: &[&str]| {
        let mut args = vec![
            "bundle",
            "build",
            "--onnx",
            "image.onnx",
            "--name",
            "image-onnx",
            "--version",
            "1.0.0",
            "--softmax",
            "probabilities",
            "--out",
            "image.opb",
        ];
        args.extend_from_slice(extra);
        outpost(dir.path(), &args)
    };

    // A sample that does not fit the model is refused, and nothing is written.
    fs::write(
        dir.join("bad.npy"),
        b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}",
    )
    .unwrap();
    let out = build(&["--baseline-data", "bad.npy"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.npy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.join("image.opb").exists());

    let out = build(&["--baseline-data", "train.npy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let baseline_path = dir.join("image-onnx.baseline.json");
    let baseline: Value = serde_json::from_slice(&fs::read(&baseline_path).unwrap()).unwrap();
    let names = |side: &str| -> Vec<String> {
        baseline[side]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names("features"),
        [
            "image.mean[0]",
            "image.std[0]",
            "image.mean[1]",
            "image.std[1]",
            "image.mean[2]",
            "image.std[2]"
        ]
    );
    assert_eq!(names("outputs"), ["probabilities.class"]);
    assert_eq!(
        baseline["quality"],
        json!({"output": "probabilities.class", "task": "classification"})
    );
    assert!(
        baseline["features"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["count"] == 800)
    );

    // numpy and onnxruntime compute the same baseline from the same sample and spec.
    if let Some(python) = outpost_testkit::python_with("numpy, onnxruntime") {
        let out = Command::new(python)
            .arg(outpost_testkit::models_dir().join("drift.py"))
            .args(["onnx-baseline", "--spec"])
            .arg(dir.join("image-onnx.bundle.toml"))
            .arg("--data")
            .arg(dir.join("train.npy"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
        for side in ["features", "outputs"] {
            let ours = baseline[side].as_array().unwrap();
            let theirs = reference[side].as_array().unwrap();
            assert_eq!(ours.len(), theirs.len());
            for (a, b) in ours.iter().zip(theirs) {
                assert_eq!(a["name"], b["name"]);
                assert_eq!(a["count"], b["count"]);
                for key in ["edges", "proportions"] {
                    let (a, b) = (a[key].as_array().unwrap(), b[key].as_array().unwrap());
                    assert_eq!(a.len(), b.len(), "{key}");
                    for (x, y) in a.iter().zip(b) {
                        let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
                        assert!((x - y).abs() <= 1e-6, "{key}: {x} vs {y}");
                    }
                }
                for key in ["mean", "std", "min", "max"] {
                    let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
                    assert!((x - y).abs() <= 1e-6, "{}: {key} {x} vs {y}", a["name"]);
                }
            }
        }
    }

    // Served: traffic like the training data is stable, a brighter channel 0 drifts, and the
    // device's PSI is the PSI of what was sent.
    let bundle = fs::read(dir.join("image.opb")).unwrap();
    let (url, admin_url, _stop) = serve_with_admin(&dir, &bundle);
    let mut samples = BTreeMap::new();
    let normal = images(1_000, 2, 0.0);
    normal.iter().for_each(|i| image_features(i, &mut samples));
    let answered = classify(&url, &normal);
    let v = drift_of(&admin_url);
    assert_eq!(v["unknown_observations"], 0, "{v}");
    for f in v["features"].as_array().unwrap() {
        let psi = f["psi"].as_f64().unwrap();
        assert!(psi < 0.1, "{}: PSI {psi} on training traffic", f["feature"]);
    }
    outpost_testkit::assert_psi_agrees(dir.path(), &baseline_path, &samples, |f| psi_of(&v, f));

    let bright = images(1_000, 3, 0.4);
    bright.iter().for_each(|i| image_features(i, &mut samples));
    classify(&url, &bright);
    let v = drift_of(&admin_url);
    let shifted = psi_of(&v, "image.mean[0]");
    assert!(shifted > 0.25, "image.mean[0] PSI {shifted}: {v}");
    assert!(psi_of(&v, "image.mean[1]") < 0.1, "{v}");
    assert!(psi_of(&v, "image.std[0]") < 0.1, "{v}");
    assert!(psi_of(&v, "probabilities.class") > 0.1, "{v}");
    outpost_testkit::assert_psi_agrees(dir.path(), &baseline_path, &samples, |f| psi_of(&v, f));

    // Labels join the predictions the guest observed: accuracy is what it is offline.
    let (mut labels, mut correct) = (0u64, 0u64);
    let feedback: Vec<Value> = answered
        .iter()
        .enumerate()
        .map(|(k, (id, classes))| {
            let truth: Vec<u64> = classes
                .iter()
                .enumerate()
                .map(|(i, &c)| if (k + i) % 3 == 0 { (c + 1) % 4 } else { c })
                .collect();
            labels += truth.len() as u64;
            correct += classes.iter().zip(&truth).filter(|(a, b)| a == b).count() as u64;
            json!({"id": id, "truth": truth})
        })
        .collect();
    let r = post_json(
        &format!("{url}/v2/models/image-onnx/feedback"),
        &json!({ "feedback": feedback }),
    );
    assert_eq!(r.json()["accepted"], answered.len(), "{}", r.text());
    let q = outpost_testkit::admin("GET", &format!("{admin_url}/admin/quality"), b"").json();
    assert_eq!(q["versions"][0]["total_labels"], labels, "{q}");
    assert_eq!(q["versions"][0]["total_correct"], correct, "{q}");
}

#[test]
fn a_monitored_feature_the_baseline_lacks_is_refused_at_build() {
    let dir = TempDir::new("onnx-monitor");
    fs::write(
        dir.join("image.onnx"),
        outpost_examples::graphs::image_classifier_onnx(),
    )
    .unwrap();
    write_npy(&dir.join("train.npy"), &images(50, 4, 0.0));
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "image.onnx",
            "--name",
            "image-onnx",
            "--version",
            "1.0.0",
            "--baseline-data",
            "train.npy",
            "--out",
            "image.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The spec declares one more feature than its baseline has.
    let spec_path = dir.join("image-onnx.bundle.toml");
    let spec = fs::read_to_string(&spec_path).unwrap();
    fs::write(
        &spec_path,
        format!(
            "{spec}\n[[metadata.generic.monitor]]\ninput = \"image\"\nname = \"image.max\"\n\
             stat = \"mean\"\n"
        ),
    )
    .unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "image-onnx.bundle.toml",
            "--out",
            "again.opb",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("monitors `image.max`"), "{stderr}");
    assert!(!dir.join("again.opb").exists());
    // Recomputed from the sample, the baseline names it, and the build goes through.
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "image-onnx.bundle.toml",
            "--baseline-data",
            "train.npy",
            "--out",
            "again.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let baseline = fs::read_to_string(dir.join("image-onnx.baseline.json")).unwrap();
    assert!(baseline.contains("\"image.max\""), "{baseline}");
}

#[test]
fn a_jsonl_sample_serves_tabular_models_column_by_column() {
    let dir = TempDir::new("onnx-jsonl");
    fs::write(
        dir.join("quirky.onnx"),
        outpost_examples::graphs::quirky_classifier_onnx(),
    )
    .unwrap();
    let mut rng = Rng(5);
    let lines: Vec<String> = (0..40)
        .map(|_| {
            let data: Vec<f64> = (0..6)
                .map(|_| (rng.next() * 4.0 - 2.0) as f32 as f64)
                .collect();
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 2], "data": data}]})
                .to_string()
        })
        .collect();
    fs::write(dir.join("sample.jsonl"), lines.join("\n")).unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "quirky.onnx",
            "--name",
            "quirky",
            "--version",
            "1.0.0",
            "--baseline-data",
            "sample.jsonl",
            "--out",
            "quirky.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let baseline: Value =
        serde_json::from_slice(&fs::read(dir.join("quirky.baseline.json")).unwrap()).unwrap();
    let features: Vec<&str> = baseline["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(features, ["x[0]", "x[1]"]);
    assert_eq!(baseline["features"][0]["count"], 120);
    // The ZipMap is dropped: the probabilities keep the graph output's name.
    assert_eq!(baseline["outputs"][0]["name"], "output_probability.class");
    assert_eq!(baseline["outputs"][0]["edges"], json!([-0.5, 0.5, 1.5]));

    // A malformed line is named in the error.
    fs::write(
        dir.join("bad.jsonl"),
        format!("{}\n{{\"inputs\": 7}}\n", lines[0]),
    )
    .unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "quirky.onnx",
            "--name",
            "quirky",
            "--version",
            "1.0.0",
            "--baseline-data",
            "bad.jsonl",
            "--out",
            "bad.opb",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
}

/// The image classifier bundle (`--onnx`; its graph ends in a softmax) in `dir` as `image.opb`.
fn image_bundle(dir: &TempDir) {
    fs::write(
        dir.join("image.onnx"),
        outpost_examples::graphs::image_classifier_onnx(),
    )
    .unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "image.onnx",
            "--name",
            "image-onnx",
            "--version",
            "1.0.0",
            "--out",
            "image.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the image classifier answers for `image`, computed here: softmax of the channel
/// means times its weights.
fn expected_probabilities(image: &[f32; 192]) -> Vec<f64> {
    let w = [
        [8.0, -8.0, 0.0, 0.0],
        [0.0, 0.0, 8.0, -8.0],
        [-4.0, 4.0, -4.0, 4.0],
    ];
    let means: Vec<f64> = (0..3)
        .map(|c| {
            image[c * 64..(c + 1) * 64]
                .iter()
                .map(|&x| f64::from(x))
                .sum::<f64>()
                / 64.0
        })
        .collect();
    let scores: Vec<f64> = (0..4)
        .map(|k| (0..3).map(|c| means[c] * w[c][k]).sum())
        .collect();
    let top = scores.iter().copied().fold(f64::MIN, f64::max);
    let exp: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn batch(dir: &TempDir, args: &[&str]) -> String {
    let mut all = vec!["batch", "--bundle", "image.opb"];
    all.extend_from_slice(args);
    let out = outpost(dir.path(), &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probabilities(line: &Value) -> Vec<f64> {
    line["outputs"][0]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no outputs in {line}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn a_batch_job_answers_every_line_in_order_and_an_interrupted_one_carries_on() {
    let dir = TempDir::new("batch-jsonl");
    image_bundle(&dir);
    let all = images(6_000, 11, 0.0);
    let mut lines: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(i, image)| {
            json!({"id": format!("img-{i}"), "inputs": [{"name": "image", "datatype": "FP32",
                   "shape": [1, 3, 8, 8], "data": image.to_vec()}]})
            .to_string()
        })
        .collect();
    // A line that is not JSON and one the bundle's [api] refuses: error lines, the job goes on.
    lines[2] = "{not json".into();
    lines[4] = json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3],
                                  "data": [0.0, 0.0, 0.0]}]})
    .to_string();
    fs::write(dir.join("in.jsonl"), lines.join("\n") + "\n\n").unwrap();

    let summary = batch(&dir, &["--input", "in.jsonl", "--output", "full.jsonl"]);
    assert!(
        summary.contains("6000 answers written (2 errors)"),
        "{summary}"
    );
    let full = fs::read_to_string(dir.join("full.jsonl")).unwrap();
    let answers: Vec<Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 6_000);
    assert_eq!(answers[2]["line"], 3);
    assert!(
        answers[2]["error"]
            .as_str()
            .unwrap()
            .contains("not an inference request")
    );
    assert_eq!(answers[4]["line"], 5);
    assert!(
        answers[4]["error"].as_str().unwrap().contains("image"),
        "{}",
        answers[4]
    );
    for (i, (answer, image)) in answers.iter().zip(&all).enumerate() {
        if i == 2 || i == 4 {
            continue;
        }
        assert_eq!(answer["id"], format!("img-{i}"));
        for (got, want) in probabilities(answer)
            .iter()
            .zip(expected_probabilities(image))
        {
            assert!((got - want).abs() < 1e-5, "line {}: {got} vs {want}", i + 1);
        }
    }

    // Killed mid-job (`kill -9`), then run again: the same output as one uninterrupted run.
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "batch",
            "--bundle",
            "image.opb",
            "--input",
            "in.jsonl",
            "--output",
            "cut.jsonl",
            "--threads",
            "1",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while fs::metadata(dir.join("cut.jsonl")).map_or(0, |m| m.len()) < 200_000
        && started.elapsed() < std::time::Duration::from_secs(60)
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let cut = fs::read_to_string(dir.join("cut.jsonl")).unwrap();
    let done = cut.lines().count();
    assert!(
        done < 6_000,
        "the job finished before it was killed: make the input longer"
    );
    let summary = batch(&dir, &["--input", "in.jsonl", "--output", "cut.jsonl"]);
    assert!(summary.contains("6000 of 6000"), "{summary}");
    assert_eq!(fs::read_to_string(dir.join("cut.jsonl")).unwrap(), full);

    // Two shards together are the whole job, line for line.
    batch(
        &dir,
        &[
            "--input", "in.jsonl", "--output", "s0.jsonl", "--shard", "0/2",
        ],
    );
    batch(
        &dir,
        &[
            "--input", "in.jsonl", "--output", "s1.jsonl", "--shard", "1/2",
        ],
    );
    let s0 = fs::read_to_string(dir.join("s0.jsonl")).unwrap();
    let s1 = fs::read_to_string(dir.join("s1.jsonl")).unwrap();
    let (s0, s1): (Vec<&str>, Vec<&str>) = (s0.lines().collect(), s1.lines().collect());
    assert_eq!((s0.len(), s1.len()), (3_000, 3_000));
    for (i, line) in full.lines().enumerate() {
        let part = if i % 2 == 0 { s0[i / 2] } else { s1[i / 2] };
        assert_eq!(part, line, "line {}", i + 1);
    }
    // An output that is not this job's is refused, not appended to.
    fs::write(dir.join("other.jsonl"), "x\n".repeat(6_001)).unwrap();
    let out = outpost(
        dir.path(),
        &[
            "batch",
            "--bundle",
            "image.opb",
            "--input",
            "in.jsonl",
            "--output",
            "other.jsonl",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
}

#[test]
fn a_batch_job_over_an_array_gives_one_line_per_row_whatever_the_batch_size() {
    let dir = TempDir::new("batch-npy");
    image_bundle(&dir);
    let all = images(300, 12, 0.0);
    write_npy(&dir.join("in.npy"), &all);
    batch(&dir, &["--input", "in.npy", "--output", "one.jsonl"]);
    let summary = batch(
        &dir,
        &[
            "--input",
            "in.npy",
            "--output",
            "many.jsonl",
            "--batch-size",
            "32",
        ],
    );
    assert!(
        summary.contains("300 answers written (0 errors)"),
        "{summary}"
    );
    let one = fs::read_to_string(dir.join("one.jsonl")).unwrap();
    let many = fs::read_to_string(dir.join("many.jsonl")).unwrap();
    assert_eq!(many.lines().count(), 300);
    for ((a, b), image) in one.lines().zip(many.lines()).zip(&all) {
        let (a, b): (Value, Value) = (
            serde_json::from_str(a).unwrap(),
            serde_json::from_str(b).unwrap(),
        );
        assert_eq!(b["outputs"][0]["shape"], json!([1, 4]));
        let want = expected_probabilities(image);
        for ((x, y), w) in probabilities(&a).iter().zip(probabilities(&b)).zip(want) {
            assert!((x - w).abs() < 1e-5 && (y - w).abs() < 1e-5, "{x} {y} {w}");
        }
    }
    // An array of the wrong shape is refused before anything runs.
    write_npy(&dir.join("in.npy"), &all);
    let mut wrong = fs::read(dir.join("in.npy")).unwrap();
    let at = wrong.windows(7).position(|w| w == b"3, 8, 8").unwrap();
    wrong[at..at + 7].copy_from_slice(b"6, 4, 8");
    fs::write(dir.join("wrong.npy"), wrong).unwrap();
    let out = outpost(
        dir.path(),
        &[
            "batch",
            "--bundle",
            "image.opb",
            "--input",
            "wrong.npy",
            "--output",
            "w.jsonl",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("input `image` takes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_batch_job_runs_a_model_installed_on_a_device_stopped_or_running() {
    let dir = TempDir::new("batch-model");
    image_bundle(&dir);
    write_npy(&dir.join("in.npy"), &images(200, 13, 0.0));
    batch(&dir, &["--input", "in.npy", "--output", "ref.jsonl"]);
    let reference = fs::read_to_string(dir.join("ref.jsonl")).unwrap();
    let key = SecretKey::from_seed(&[9; 32]);
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["*"]);
    fs::write(dir.join("trust.toml"), trust.to_toml_string()).unwrap();
    let run = |args: &[&str]| {
        let mut all = vec!["batch", "--input", "in.npy"];
        all.extend_from_slice(args);
        outpost(dir.path(), &all)
    };
    let same_as_reference = |out: Output, file: &str| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fs::read_to_string(dir.join(file)).unwrap(), reference);
    };

    // A stopped device: the bundle comes from its state.
    let stopped = "data_dir = \"stopped\"\ntrust_store = \"trust.toml\"\n";
    fs::write(dir.join("stopped.toml"), stopped).unwrap();
    {
        let config = Config::from_toml(stopped, dir.path()).unwrap();
        let device = Device::with_trust(&config, trust.clone()).unwrap();
        let mut b = Bundle::read(
            &fs::read(dir.join("image.opb")).unwrap()[..],
            &ReadLimits::default(),
        )
        .unwrap();
        b.sign(&key);
        device.install_and_activate(&b.to_bytes()).unwrap();
    }
    let args = [
        "--model",
        "image-onnx",
        "--config",
        "stopped.toml",
        "--output",
    ];
    same_as_reference(run(&[&args[..], &["a.jsonl"]].concat()), "a.jsonl");

    // A running device: from its admin API, verified against its trust store.
    let (_, admin, _stop) = serve_with_admin(&dir, &fs::read(dir.join("image.opb")).unwrap());
    let admin = admin.trim_start_matches("http://");
    fs::write(
        dir.join("running.toml"),
        format!(
            "data_dir = \"state\"\ntrust_store = \"trust.toml\"\nadmin_listen = \"{admin}\"\n\
             admin_token = \"{}\"\n",
            outpost_testkit::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let args = [
        "--model",
        "image-onnx@1.0.0",
        "--config",
        "running.toml",
        "--output",
    ];
    same_as_reference(run(&[&args[..], &["b.jsonl"]].concat()), "b.jsonl");

    // What cannot work says why, and writes nothing.
    let fails = |args: &[&str], wanted: &str| {
        let out = run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(wanted),
            "{args:?}: {stderr}"
        );
    };
    fails(
        &[
            "--model",
            "image-onnx@9.9.9",
            "--config",
            "running.toml",
            "--output",
            "c.jsonl",
        ],
        "not installed",
    );
    fails(
        &[
            "--model",
            "nothing",
            "--config",
            "stopped.toml",
            "--output",
            "c.jsonl",
        ],
        "not installed",
    );
    fs::write(
        dir.join("no-admin.toml"),
        "data_dir = \"state\"\ntrust_store = \"trust.toml\"\n",
    )
    .unwrap();
    fails(
        &[
            "--model",
            "image-onnx",
            "--config",
            "no-admin.toml",
            "--output",
            "c.jsonl",
        ],
        "--bundle",
    );
    let mut other = TrustStore::new();
    other.allow(SecretKey::from_seed(&[1; 32]).public(), ["*"]);
    fs::write(dir.join("other.toml"), other.to_toml_string()).unwrap();
    fails(
        &[
            "--model",
            "image-onnx",
            "--config",
            "stopped.toml",
            "--trust",
            "other.toml",
            "--output",
            "c.jsonl",
        ],
        "failed verification",
    );
    fails(
        &["--model", "image-onnx", "--output", "c.jsonl"],
        "--config",
    );
    assert!(!dir.join("c.jsonl").exists());
}

/// The shape and `f32` values of a `.npy` file NumPy's way: version 1 header, then the data.
fn read_npy_f32(path: &Path) -> (String, Vec<f32>) {
    let bytes = fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8(bytes[10..10 + len].to_vec()).unwrap();
    let values = bytes[10 + len..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (header, values)
}

#[test]
fn a_batch_job_writes_an_array_output_and_carries_it_on_after_a_cut() {
    let dir = TempDir::new("batch-npy-out");
    image_bundle(&dir);
    let all = images(300, 14, 0.0);
    write_npy(&dir.join("in.npy"), &all);
    let summary = batch(
        &dir,
        &[
            "--input",
            "in.npy",
            "--output",
            "out.npy",
            "--batch-size",
            "32",
        ],
    );
    assert!(
        summary.contains("300 answers written (0 errors)"),
        "{summary}"
    );
    let (header, values) = read_npy_f32(&dir.join("out.npy"));
    assert!(
        header.contains("'descr': '<f4'") && header.contains("'shape': (300, 4)"),
        "{header}"
    );
    for (got, image) in values.chunks(4).zip(&all) {
        for (g, w) in got.iter().zip(expected_probabilities(image)) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "{g} {w}");
        }
    }
    assert_eq!(
        fs::read_to_string(dir.join("out.errors.jsonl")).unwrap(),
        ""
    );
    // Cut mid-row, as a kill would: the same command finishes it, byte for byte.
    let whole = fs::read(dir.join("out.npy")).unwrap();
    fs::write(dir.join("out.npy"), &whole[..whole.len() / 2 + 7]).unwrap();
    let summary = batch(&dir, &["--input", "in.npy", "--output", "out.npy"]);
    assert!(summary.contains("300 of 300"), "{summary}");
    assert_eq!(fs::read(dir.join("out.npy")).unwrap(), whole);
    // An array output answers an array input only.
    fs::write(dir.join("r.jsonl"), "{}\n").unwrap();
    let out = outpost(
        dir.path(),
        &[
            "batch",
            "--bundle",
            "image.opb",
            "--input",
            "r.jsonl",
            "--output",
            "o.npy",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON Lines"));
    // Nor may the answers overwrite the inputs.
    let before = fs::read(dir.join("in.npy")).unwrap();
    let out = outpost(
        dir.path(),
        &[
            "batch",
            "--bundle",
            "image.opb",
            "--input",
            "in.npy",
            "--output",
            "./in.npy",
            "--overwrite",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the input file"));
    assert_eq!(fs::read(dir.join("in.npy")).unwrap(), before);
}

/// The probabilities of one answer.
fn first_output(body: &Value) -> Vec<f64> {
    body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn assert_close(got: &[f64], want: &[f64], tolerance: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= tolerance, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn an_image_input_takes_png_and_jpeg_on_the_raw_endpoint() {
    let dir = TempDir::new("onnx-image");
    fs::write(
        dir.join("image.onnx"),
        outpost_examples::graphs::image_classifier_onnx(),
    )
    .unwrap();
    let out = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "image.onnx",
            "--name",
            "vision",
            "--version",
            "1.0.0",
            "--image",
            "image",
            "--image-mean",
            "0.5,0.4,0.3",
            "--image-std",
            "0.25,0.5,0.2",
            "--out",
            "vision.opb",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = fs::read_to_string(dir.join("vision.bundle.toml")).unwrap();
    assert!(spec.contains("image/jpeg"), "{spec}");
    let (url, _stop) = serve(&dir, &fs::read(dir.join("vision.opb")).unwrap());
    let raw = |content_type: &str, body: &[u8]| {
        outpost_testkit::post(&format!("{url}/v2/models/vision/raw"), content_type, body)
    };
    // What the model answers for 8×8 RGB pixels sent as a tensor, normalised by hand.
    let (mean, std) = ([0.5, 0.4, 0.3], [0.25, 0.5, 0.2]);
    let by_tensor = |rgb: &[u8]| {
        let mut nchw = vec![0f64; 192];
        for (i, px) in rgb.chunks(3).enumerate() {
            for c in 0..3 {
                nchw[c * 64 + i] = (f64::from(px[c]) / 255.0 - mean[c]) / std[c];
            }
        }
        let reply = post_json(
            &format!("{url}/v2/models/vision/infer"),
            &json!({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                "data": nchw}]}),
        );
        assert_eq!(reply.status, 200, "{}", reply.text());
        first_output(&reply.json())
    };
    let mut rng = Rng(5);
    let rgb: Vec<u8> = (0..192).map(|_| (rng.next() * 255.0) as u8).collect();
    let want = by_tensor(&rgb);

    // A PNG of the input's size: exactly the tensor.
    let reply = raw("image/png", &outpost_testkit::png_bytes(8, 8, 3, &rgb));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_close(&first_output(&reply.json()), &want, 1e-6, "8×8 PNG");
    // Twice the size in 2×2 blocks: resized to the same pixels.
    let mut big = vec![0u8; 16 * 16 * 3];
    for y in 0..16 {
        for x in 0..16 {
            let from = ((y / 2) * 8 + x / 2) * 3;
            big[(y * 16 + x) * 3..][..3].copy_from_slice(&rgb[from..from + 3]);
        }
    }
    let reply = raw("image/png", &outpost_testkit::png_bytes(16, 16, 3, &big));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_close(&first_output(&reply.json()), &want, 1e-5, "16×16 PNG");
    // Gray: each channel the gray value.
    let gray: Vec<u8> = (0..64).map(|i| (i * 4) as u8).collect();
    let as_rgb: Vec<u8> = gray.iter().flat_map(|&g| [g, g, g]).collect();
    let reply = raw("image/png", &outpost_testkit::png_bytes(8, 8, 1, &gray));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_close(
        &first_output(&reply.json()),
        &by_tensor(&as_rgb),
        1e-6,
        "gray PNG",
    );

    // A JPEG (made and decoded by Pillow, 4:4:4 so that no chroma upsampling differs): the
    // model sees what Pillow decodes, within a decoder's rounding.
    if let Some(python) = outpost_testkit::python_with("numpy, PIL") {
        fs::write(dir.join("rgb.bin"), &rgb).unwrap();
        let made = Command::new(python)
            .current_dir(dir.path())
            .args([
                "-c",
                "import io, numpy as np; from PIL import Image\n\
                 a = np.frombuffer(open('rgb.bin', 'rb').read(), np.uint8).reshape(8, 8, 3)\n\
                 b = io.BytesIO(); Image.fromarray(a).save(b, 'JPEG', quality=95, subsampling=0)\n\
                 open('img.jpg', 'wb').write(b.getvalue())\n\
                 open('decoded.bin', 'wb').write(np.asarray(Image.open('img.jpg').convert('RGB')).tobytes())",
            ])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let decoded = fs::read(dir.join("decoded.bin")).unwrap();
        let reply = raw("image/jpeg", &fs::read(dir.join("img.jpg")).unwrap());
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_close(
            &first_output(&reply.json()),
            &by_tensor(&decoded),
            0.02,
            "JPEG",
        );
    }

    // Bad images are the client's fault, named.
    let reply = raw("image/png", b"\x89PNG\r\n\x1a\nnot really");
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("invalid PNG"), "{}", reply.text());
    let reply = raw("image/jpeg", b"\xff\xd8\xff garbage");
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(reply.text().contains("invalid JPEG"), "{}", reply.text());
    let reply = raw("image/gif", b"GIF89a");
    assert!((400..500).contains(&reply.status), "{}", reply.status);

    // An image input needs a fixed height and width and a channel axis.
    let bad = outpost(
        dir.path(),
        &[
            "bundle",
            "build",
            "--onnx",
            "image.onnx",
            "--name",
            "v",
            "--version",
            "1.0.0",
            "--image",
            "image",
            "--image-mean",
            "0.5",
            "--out",
            "v.opb",
        ],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--image-mean: 1 values for 3 channel(s)"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(!dir.join("v.opb").exists() && !dir.join("v.bundle.toml").exists());
}
