//! `outpost bundle build --from-mlflow DIR`: an MLflow model directory as `mlflow` writes it
//! (`models/published/mlflow_model.py`: scikit-learn's digits MLP exported by skl2onnx with
//! its defaults, saved by `mlflow.onnx.save_model` with its weights in an external data file)
//! becomes a bundle that answers as onnxruntime does, with the run recorded in its manifest;
//! a directory without the onnx flavor, with a data file missing or with a signature the
//! graph contradicts is refused and leaves nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_bundle::{Bundle, ReadLimits};
use outpost_testkit::{TempDir, post_json};
use serde_json::{Value, json};

mod common;
use common::{fails, ok, run_device};

/// Copies the files of directory `from` into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// `key: value` of the MLmodel file's top level.
fn mlmodel_field(dir: &Path, key: &str) -> String {
    let text = fs::read_to_string(dir.join("MLmodel")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn an_mlflow_onnx_model_becomes_a_bundle_that_answers_like_onnxruntime() {
    let Some(python) =
        outpost_testkit::python_with("numpy, onnxruntime, sklearn, skl2onnx, mlflow.onnx")
    else {
        return;
    };
    let d = TempDir::new("mlflow");
    let dir = d.path();
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/published/mlflow_model.py");
    let made = Command::new(&python).arg(script).arg(dir).output().unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let model = dir.join("model");
    let data: Vec<PathBuf> = fs::read_dir(&model)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    assert_eq!(data.len(), 1, "the weights are in an external data file");

    let built = ok(
        dir,
        &[
            "bundle",
            "build",
            "--from-mlflow",
            "model",
            "--name",
            "digits-mlflow",
            "--version",
            "1.0.0",
            "--out",
            "digits.opb",
        ],
    );
    assert!(built.contains("read external data"), "{built}");
    assert!(built.contains("dropped the ZipMap"), "{built}");
    let bundle = fs::read(dir.join("digits.opb")).unwrap();
    let manifest = Bundle::read(&bundle[..], &ReadLimits::default())
        .unwrap()
        .manifest()
        .clone();
    let recorded = &manifest.metadata["mlflow"];
    for key in ["run_id", "model_uuid", "mlflow_version"] {
        assert_eq!(
            recorded[key],
            mlmodel_field(&model, key),
            "{key}: {recorded}"
        );
    }
    assert_eq!(manifest.api.inputs[0].name, "X");
    assert_eq!(
        manifest.api.inputs[0].shape[1],
        outpost_bundle::manifest::Dim::Fixed(64)
    );
    // The spec it wrote names the model with its data inside, and builds the same bundle.
    ok(
        dir,
        &[
            "bundle",
            "build",
            "digits-mlflow.bundle.toml",
            "--out",
            "again.opb",
        ],
    );
    assert_eq!(bundle, fs::read(dir.join("again.opb")).unwrap());

    // Served by a device process, it answers as onnxruntime did on the same digits.
    ok(dir, &["key", "generate", "--out", "signer"]);
    let trust = ok(
        dir,
        &["key", "trust", "signer.pub", "--models", "digits-mlflow"],
    );
    fs::write(dir.join("trust.toml"), trust).unwrap();
    fs::write(
        dir.join("device.toml"),
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\ntrust_store = \"trust.toml\"\n",
    )
    .unwrap();
    ok(
        dir,
        &["bundle", "sign", "digits.opb", "--key", "signer.key"],
    );
    ok(
        dir,
        &[
            "device",
            "install",
            "digits.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    let (mut device, url) = run_device(dir, "device.toml");
    let expected: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let inputs = expected["inputs"].as_array().unwrap();
    let flat: Vec<f64> = inputs
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let reply = post_json(
        &format!("{url}/v2/models/digits-mlflow/infer"),
        &json!({"inputs": [{"name": "X", "datatype": "FP32", "shape": [inputs.len(), 64],
                            "data": flat}]}),
    );
    let _ = device.kill();
    let _ = device.wait();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    let output = |name: &str| -> Vec<f64> {
        body["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .unwrap()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    let labels: Vec<f64> = expected["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(output("output_label"), labels);
    let want: Vec<f64> = expected["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    let got = output("output_probability");
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "max difference from onnxruntime {worst}");

    // Refused, naming what is wrong, and nothing written.
    let mlmodel = fs::read_to_string(model.join("MLmodel")).unwrap();
    let refused = |tag: &str, edit: &dyn Fn(&Path), wanted: &str| {
        let bad = dir.join(tag);
        copy_dir(&model, &bad);
        edit(&bad);
        let out = format!("{tag}.opb");
        let err = fails(
            dir,
            &[
                "bundle",
                "build",
                "--from-mlflow",
                tag,
                "--version",
                "1.0.0",
                "--out",
                &out,
            ],
        );
        assert!(err.contains(wanted), "{tag}: {err}");
        for left in [out, format!("{tag}.bundle.toml"), format!("{tag}.onnx")] {
            assert!(!dir.join(&left).exists(), "{tag} left {left}");
        }
    };
    refused(
        "sklearn-only",
        &|bad| {
            let start = mlmodel.find("  onnx:").unwrap();
            let end = mlmodel.find("  python_function:").unwrap();
            let text = format!("{}{}", &mlmodel[..start], &mlmodel[end..]);
            fs::write(bad.join("MLmodel"), text).unwrap();
        },
        "has no onnx flavor (its flavors: python_function)",
    );
    let data_name = data[0].file_name().unwrap().to_str().unwrap().to_owned();
    refused(
        "no-data",
        &|bad| fs::remove_file(bad.join(&data_name)).unwrap(),
        &data_name,
    );
    refused(
        "wrong-signature",
        &|bad| {
            let text = mlmodel.replace("\"shape\": [-1, 64]", "\"shape\": [-1, 63]");
            assert_ne!(text, mlmodel);
            fs::write(bad.join("MLmodel"), text).unwrap();
        },
        "the MLflow signature's input `(unnamed)` FP32 [-1, 63] does not fit the graph's `X`",
    );
    refused(
        "no-mlmodel",
        &|bad| fs::remove_file(bad.join("MLmodel")).unwrap(),
        "is not an MLflow model directory",
    );
}
