//! Published models as their packages ship them (`models/published/catalog.json`): each ONNX
//! file becomes a bundle with `outpost bundle build --onnx` alone (shapes pinned in the spec,
//! never in the file), one `outpost device` process serves them all, and Triton's own Python
//! client (`tritonclient.http`, JSON and binary tensors) must get onnxruntime's answers within
//! the catalog's tolerance. The models are fetched into the cache directory by
//! `models/published/fetch.py`; without a registry the test says "skipped: registry
//! unreachable" (and fails instead when `OUTPOST_REQUIRE_PUBLISHED` is set, as `.ci/run` does).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use outpost_bundle::{Bundle, ReadLimits};
use outpost_testkit::TempDir;
use serde_json::Value;

mod common;
use common::{ok, outpost, run_device};

/// Where fetch.py keeps the models (`OUTPOST_PUBLISHED_DIR`, else the user's cache).
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_PUBLISHED_DIR") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    base.join("outpost/published")
}

#[test]
fn published_models_build_from_the_onnx_file_alone_and_answer_like_onnxruntime() {
    let Some(python) =
        outpost_testkit::python_with("numpy, onnxruntime, sklearn, skl2onnx, tritonclient.http")
    else {
        return;
    };
    let published = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/published");
    let cache = cache_dir();
    let fetch = Command::new(&python)
        .arg(published.join("fetch.py"))
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let fetch_err = String::from_utf8_lossy(&fetch.stderr);
    match fetch.status.code() {
        Some(0) => {}
        Some(3) if std::env::var_os("OUTPOST_REQUIRE_PUBLISHED").is_none() => {
            eprintln!("skipped: registry unreachable ({})", fetch_err.trim());
            return;
        }
        _ => panic!("fetch.py failed: {fetch_err}"),
    }
    let catalog: Value =
        serde_json::from_str(&fs::read_to_string(published.join("catalog.json")).unwrap()).unwrap();

    let d = TempDir::new("published");
    let dir = d.path();
    ok(dir, &["key", "generate", "--out", "signer"]);
    let trust = ok(dir, &["key", "trust", "signer.pub", "--models", "*"]);
    fs::write(dir.join("trust.toml"), trust).unwrap();
    fs::write(
        dir.join("device.toml"),
        "data_dir = \"state\"\nlisten = \"127.0.0.1:0\"\ntrust_store = \"trust.toml\"\n",
    )
    .unwrap();
    let mut served = Vec::new();
    for m in catalog["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let onnx = cache.join(format!("{name}.onnx"));
        let labels = cache.join(format!("{name}.labels"));
        let out = format!("{name}.opb");
        let spec = format!("{name}.bundle.toml");
        let mut args: Vec<String> = [
            "bundle",
            "build",
            "--onnx",
            onnx.to_str().unwrap(),
            "--name",
            name,
            "--version",
            "1.0.0",
            "--out",
            &out,
            "--spec-out",
            &spec,
        ]
        .map(String::from)
        .into();
        for pin in m["input_shape"].as_array().unwrap() {
            args.extend(["--input-shape".into(), pin.as_str().unwrap().into()]);
        }
        if labels.exists() {
            args.extend(["--labels".into(), labels.to_str().unwrap().into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Some(node) = m["refused"].as_str() {
            // What tract cannot load is refused at build, naming the node, and leaves nothing.
            let run = outpost(dir, &args);
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert!(!run.status.success(), "{name} built");
            assert!(stderr.contains(node), "{name}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(!dir.join(&out).exists() && !dir.join(&spec).exists());
            continue;
        }
        ok(dir, &args);
        ok(dir, &["bundle", "sign", &out, "--key", "signer.key"]);
        ok(
            dir,
            &[
                "device",
                "install",
                &out,
                "--config",
                "device.toml",
                "--activate",
            ],
        );
        let manifest = Bundle::read(
            &fs::read(dir.join(&out)).unwrap()[..],
            &ReadLimits::default(),
        )
        .unwrap()
        .manifest()
        .clone();
        served.push((m.clone(), manifest));
    }
    assert!(served.len() >= 5, "at least five published models serve");

    let (mut device, url) = run_device(dir, "device.toml");
    let compare = Command::new(&python)
        .arg(published.join("compare.py"))
        .arg("--url")
        .arg(&url)
        .arg("--cache")
        .arg(&cache)
        .output()
        .unwrap();
    let _ = device.kill();
    let _ = device.wait();
    let stdout = String::from_utf8_lossy(&compare.stdout);
    let reports: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        compare.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&compare.stderr)
    );

    eprintln!("| model | max |difference| from onnxruntime (JSON / binary) |");
    for (m, manifest) in &served {
        let name = m["name"].as_str().unwrap();
        let r = reports
            .iter()
            .find(|r| r["model"] == name)
            .unwrap_or_else(|| panic!("no report on {name}: {stdout}"));
        let tolerance = m["tolerance"].as_f64().unwrap();
        let mut worst = [0.0f64; 2];
        for (i, mode) in ["json", "binary"].iter().enumerate() {
            let diffs = r["max_abs_diff"][mode].as_object().unwrap();
            assert_eq!(
                diffs.len(),
                manifest.api.outputs.len(),
                "{name} {mode}: every output compared: {r}"
            );
            for (output, d) in diffs {
                let d = d.as_f64().unwrap();
                assert!(
                    d <= tolerance,
                    "{name} {mode}: `{output}` differs by {d} (tolerance {tolerance})"
                );
                worst[i] = worst[i].max(d);
            }
        }
        // Triton's configuration and statistics calls describe what the bundle serves.
        let inputs: Vec<&str> = manifest
            .api
            .inputs
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        let outputs: Vec<&str> = manifest
            .api
            .outputs
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(r["config"]["name"], name, "{r}");
        assert_eq!(r["config"]["inputs"], serde_json::json!(inputs), "{r}");
        assert_eq!(r["config"]["outputs"], serde_json::json!(outputs), "{r}");
        let steps = r["steps"].as_u64().unwrap();
        assert!(
            r["inference_count"].as_u64().unwrap() >= 2 * steps,
            "{name}: statistics count its requests: {r}"
        );
        // With labels, the classification extension's best class is onnxruntime's arg max.
        if !manifest.labels.is_empty() {
            assert_eq!(r["classification"]["agrees"], true, "{r}");
        }
        eprintln!("| {name} | {:.1e} / {:.1e} |", worst[0], worst[1]);
    }
}
