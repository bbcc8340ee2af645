//! The same cases on every backend this build has: outputs against the reference within
//! tolerance, and the refusals each must make. onnxruntime's cases run when a library is
//! found (`ORT_DYLIB_PATH`, or the `onnxruntime` wheel of `OUTPOST_PYTHON`); `.ci/run` sets
//! `OUTPOST_REQUIRE_ONNXRUNTIME` so that they cannot be skipped there.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use outpost_inference::onnxruntime::{Onnxruntime, OrtOptions};
use outpost_inference::{Backend, RunError, Tensor, Tract};
use serde_json::Value;

fn onnxruntime() -> Option<Onnxruntime> {
    let path = outpost_testkit::onnxruntime_library()?;
    Some(Onnxruntime::load(&path, OrtOptions::default()).unwrap())
}

/// tract, and onnxruntime when there is a library.
fn backends() -> Vec<Arc<dyn Backend>> {
    let mut all: Vec<Arc<dyn Backend>> = vec![Arc::new(Tract)];
    if let Some(ort) = onnxruntime() {
        all.push(Arc::new(ort));
    }
    all
}

fn f32_tensor(name: &str, shape: Vec<u64>, values: &[f32]) -> Tensor {
    Tensor {
        name: name.into(),
        datatype: DataType::F32,
        shape,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.datatype, DataType::F32);
    t.data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn digits_matches_its_reference_on_every_backend() {
    let expected: Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED).unwrap();
    for backend in backends() {
        let model = backend.load(outpost_examples::DIGITS_ONNX, &[]).unwrap();
        assert_eq!(model.backend(), backend.name());
        assert_eq!(model.inputs()[0].name, "input");
        assert_eq!(model.inputs()[0].datatype, DataType::F32);
        assert_eq!(model.inputs()[0].shape[1], Some(64));
        assert_eq!(model.outputs()[0].name, "probabilities");
        for case in expected["cases"].as_array().unwrap() {
            let pixels: Vec<f32> = case["pixels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p.as_f64().unwrap() / 16.0) as f32)
                .collect();
            let out = model
                .run(vec![f32_tensor("input", vec![1, 64], &pixels)], 1 << 20)
                .unwrap();
            assert_eq!(out[0].shape, [1, 10], "{}", backend.name());
            for (got, want) in f32s(&out[0])
                .iter()
                .zip(case["probabilities"].as_array().unwrap())
            {
                let want = want.as_f64().unwrap();
                assert!(
                    (f64::from(*got) - want).abs() < 1e-5,
                    "{}: {got} vs {want}",
                    backend.name()
                );
            }
        }
    }
}

#[test]
fn sensor_and_a_batch_agree_across_backends() {
    let all = backends();
    let mut rng = outpost_testkit::Rng(7);
    let rows = 5u64;
    let values: Vec<f32> = (0..rows * 48).map(|_| rng.next() as f32).collect();
    let mut answers = Vec::new();
    for backend in &all {
        let model = backend.load(outpost_examples::SENSOR_ONNX, &[]).unwrap();
        let name = model.inputs()[0].name.clone();
        let out = model
            .run(vec![f32_tensor(&name, vec![rows, 48], &values)], 1 << 20)
            .unwrap();
        assert_eq!(out[0].shape, [rows, 48], "{}", backend.name());
        answers.push(f32s(&out[0]));
    }
    for (b, answer) in all.iter().zip(&answers).skip(1) {
        for (x, y) in answers[0].iter().zip(answer) {
            assert!((x - y).abs() < 1e-4, "tract {x} vs {} {y}", b.name());
        }
    }
}

#[test]
fn inputs_that_do_not_fit_are_the_callers_fault_on_every_backend() {
    for backend in backends() {
        let model = backend.load(outpost_examples::DIGITS_ONNX, &[]).unwrap();
        let short = model.run(vec![f32_tensor("input", vec![1, 63], &[0.0; 63])], 1 << 20);
        assert!(
            matches!(&short, Err(RunError::Input(m)) if m.contains("shape")),
            "{}: {short:?}",
            backend.name()
        );
        let wrong = model.run(vec![f32_tensor("pixels", vec![1, 64], &[0.0; 64])], 1 << 20);
        assert!(
            matches!(&wrong, Err(RunError::Input(m)) if m.contains("no input `pixels`")),
            "{}: {wrong:?}",
            backend.name()
        );
        let big = model.run(vec![f32_tensor("input", vec![1, 64], &[0.0; 64])], 100);
        assert!(
            matches!(&big, Err(RunError::Input(m)) if m.contains("limit")),
            "{}: {big:?}",
            backend.name()
        );
        assert!(backend.load(b"not an onnx file", &[]).is_err());
    }
}

#[test]
fn a_lookup_past_its_table_is_a_fault_not_a_crash_on_every_backend() {
    let lookup = outpost_examples::graphs::lookup_onnx();
    for backend in backends() {
        let model = backend.load(&lookup, &[]).unwrap();
        let port = model.inputs()[0].clone();
        let ids = |v: &[i64]| Tensor {
            name: port.name.clone(),
            datatype: port.datatype,
            shape: vec![v.len() as u64],
            data: v.iter().flat_map(|i| i.to_le_bytes()).collect(),
        };
        assert!(
            model.run(vec![ids(&[0, 1])], 1 << 20).is_ok(),
            "{}",
            backend.name()
        );
        let past = model.run(vec![ids(&[1_000_000])], 1 << 20);
        assert!(
            matches!(past, Err(RunError::Fault(_))),
            "{}: {past:?}",
            backend.name()
        );
    }
}

/// An `ai.onnx.ml` operator tract does not implement: the reason to have a second backend.
#[test]
fn onnxruntime_runs_an_operator_tract_lacks() {
    let imputer = outpost_examples::graphs::imputer_onnx();
    assert!(Tract.load(&imputer, &[]).is_err(), "tract has no Imputer");
    let Some(ort) = onnxruntime() else { return };
    let model = ort.load(&imputer, &[]).unwrap();
    let out = model
        .run(
            vec![f32_tensor("x", vec![2, 2], &[1.0, 2.5, -3.0, 4.0])],
            1 << 20,
        )
        .unwrap();
    // Its placeholder is 0 (the attribute's default) and no input holds one: all pass through.
    assert_eq!(out[0].shape, [2, 2]);
    assert_eq!(f32s(&out[0]), [1.0, 2.5, -3.0, 4.0]);
}

#[test]
fn a_declared_size_fixes_the_open_dimension_on_onnxruntime() {
    let Some(ort) = onnxruntime() else { return };
    let declared = [TensorSpec {
        name: "input".into(),
        datatype: DataType::F32,
        shape: vec![Dim::Fixed(1), Dim::Fixed(64)],
    }];
    let model = ort.load(outpost_examples::DIGITS_ONNX, &declared).unwrap();
    assert_eq!(model.inputs()[0].shape, [Some(1), Some(64)]);
    let two = model.run(vec![f32_tensor("input", vec![2, 64], &[0.0; 128])], 1 << 20);
    assert!(matches!(two, Err(RunError::Input(_))), "{two:?}");
    assert!(
        model
            .run(vec![f32_tensor("input", vec![1, 64], &[0.0; 64])], 1 << 20)
            .is_ok()
    );
}

#[test]
fn concurrent_runs_share_the_sessions() {
    let Some(ort) = onnxruntime() else { return };
    let model = ort.load(outpost_examples::DIGITS_ONNX, &[]).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || {
                let pixels = vec![i as f32; 64];
                for _ in 0..50 {
                    let out = model
                        .run(vec![f32_tensor("input", vec![1, 64], &pixels)], 1 << 20)
                        .unwrap();
                    let p = f32s(&out[0]);
                    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{p:?}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_library_that_is_not_onnxruntime_is_refused_by_name() {
    let dir = outpost_testkit::TempDir::new("ort-bad");
    let text = dir.path().join("libonnxruntime.so");
    std::fs::write(&text, "not a library, but long enough for a header").unwrap();
    let missing = dir.path().join("absent.so");
    for (path, want) in [
        (text.clone(), "no ELF header"),
        (missing.clone(), "cannot open it"),
    ] {
        let e = Onnxruntime::load(&path, OrtOptions::default()).unwrap_err();
        assert!(e.0.contains(&path.display().to_string()), "{e}");
        assert!(e.0.contains(want), "{e}");
    }
    // An ELF library of this machine that is not onnxruntime: the test binary's own libc.
    if let Some(libc) = [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib/aarch64-linux-gnu/libc.so.6",
    ]
    .iter()
    .find(|p| std::path::Path::new(p).exists())
    {
        let e = Onnxruntime::load(std::path::Path::new(libc), OrtOptions::default()).unwrap_err();
        assert!(e.0.contains("OrtGetApiBase"), "{e}");
    }
    // One for another architecture, when a cross toolchain left one here.
    for other in [
        "/usr/aarch64-linux-gnu/lib/libc.so.6",
        "/usr/x86_64-linux-gnu/lib/libc.so.6",
    ] {
        let path = std::path::Path::new(other);
        if path.exists() && !other.contains(std::env::consts::ARCH) {
            let e = Onnxruntime::load(path, OrtOptions::default()).unwrap_err();
            assert!(e.0.contains("built for"), "{e}");
        }
    }
}
