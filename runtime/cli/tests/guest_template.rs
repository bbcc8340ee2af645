//! `outpost guest new`: the template written as a crate of its own, outside every workspace
//! of this repository, built for wasm32-wasip2 against the guest SDK by path, bundled with the
//! spec it came with and served by a device process, answering as the model does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_testkit::{TempDir, post_json};
use serde_json::{Value, json};

mod common;
use common::{fails, ok, run_device};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `cargo build --release --target wasm32-wasip2` of the crate at `manifest`, with the target
/// directory the example guests are built in (its dependencies are already compiled there).
fn build_guest(manifest: &Path) {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("wasm-guests");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        "build",
        "--release",
        "--offline",
        "--target",
        "wasm32-wasip2",
    ])
    .arg("--manifest-path")
    .arg(manifest)
    .env("CARGO_TARGET_DIR", &target);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the guest crate does not build:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Where the crate's own spec looks for it.
    let built = target.join("wasm32-wasip2/release/digits_own_guest.wasm");
    let own = manifest
        .parent()
        .unwrap()
        .join("target/wasm32-wasip2/release");
    fs::create_dir_all(&own).unwrap();
    fs::copy(built, own.join("digits_own_guest.wasm")).unwrap();
}

#[test]
fn guest_new_writes_a_crate_that_builds_outside_the_workspace_and_serves() {
    let d = TempDir::new("guest-new");
    let dir = d.path();
    fs::write(dir.join("digits.onnx"), outpost_examples::DIGITS_ONNX).unwrap();
    let sdk = repo().join("guest-sdk");
    let said = ok(
        dir,
        &[
            "guest",
            "new",
            "digits-own",
            "--onnx",
            "digits.onnx",
            "--sdk",
            sdk.to_str().unwrap(),
        ],
    );
    assert!(
        said.contains("cargo build --release --target wasm32-wasip2"),
        "{said}"
    );
    let crate_dir = dir.join("digits-own");
    let manifest = fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains("name = \"digits-own-guest\""),
        "{manifest}"
    );
    assert!(
        manifest.contains("[workspace]"),
        "its own workspace: {manifest}"
    );
    let spec = fs::read_to_string(crate_dir.join("bundle.toml")).unwrap();
    assert!(
        spec.contains("name = \"input\""),
        "the graph's input: {spec}"
    );
    // Again is refused: nothing is overwritten.
    let again = fails(
        dir,
        &["guest", "new", "digits-own", "--sdk", sdk.to_str().unwrap()],
    );
    assert!(again.contains("already exists"), "{again}");
    let bad = fails(dir, &["guest", "new", "Digits_Own"]);
    assert!(bad.contains("not a model name"), "{bad}");
    // Without --sdk it depends on the SDK by git.
    ok(dir, &["guest", "new", "by-git"]);
    let by_git = fs::read_to_string(dir.join("by-git/Cargo.toml")).unwrap();
    assert!(
        by_git.contains("outpost-guest = { git = \"https://"),
        "{by_git}"
    );

    // Built with the example guests' locked dependency versions, then bundled by its spec.
    fs::copy(
        repo().join("examples/Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .unwrap();
    build_guest(&crate_dir.join("Cargo.toml"));
    ok(
        &crate_dir,
        &["bundle", "build", "bundle.toml", "--out", "digits-own.opb"],
    );
    ok(&crate_dir, &["key", "generate", "--out", "signer"]);
    let trust = ok(
        &crate_dir,
        &["key", "trust", "signer.pub", "--models", "digits-own"],
    );
    fs::write(crate_dir.join("trust.toml"), trust).unwrap();
    ok(
        &crate_dir,
        &["bundle", "sign", "digits-own.opb", "--key", "signer.key"],
    );
    fs::write(
        crate_dir.join("device.toml"),
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\ntrust_store = \"trust.toml\"\n",
    )
    .unwrap();
    ok(
        &crate_dir,
        &[
            "device",
            "install",
            "digits-own.opb",
            "--config",
            "device.toml",
            "--activate",
        ],
    );
    let (mut device, url) = run_device(&crate_dir, "device.toml");
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    let mut answers = Vec::new();
    for case in expected["cases"].as_array().unwrap() {
        // The model takes pixels scaled to 0-1 (the digits guest scales them; this one
        // passes tensors through).
        let pixels: Vec<f64> = case["pixels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap() / 16.0)
            .collect();
        let reply = post_json(
            &format!("{url}/v2/models/digits-own/infer"),
            &json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                "data": pixels}]}),
        );
        answers.push((reply.status, reply.json(), case.clone()));
    }
    let _ = device.kill();
    let _ = device.wait();
    for (status, body, case) in answers {
        assert_eq!(status, 200, "{body}");
        let outputs = body["outputs"].as_array().unwrap();
        assert_eq!(outputs[0]["name"], "label");
        assert_eq!(outputs[1]["name"], "scores");
        let scores: Vec<f64> = outputs[1]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = case["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for (g, w) in scores.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let best = want
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(outputs[0]["data"][0], best);
    }
}
