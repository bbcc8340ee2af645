//! Drift checks that do not use Outpost's own arithmetic: PSI from numpy (`models/drift.py`)
//! and a plain second implementation for machines without numpy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The repository's `models/` directory.
pub fn models_dir() -> PathBuf {
    // Found at run time from the package under test (cargo sets CARGO_MANIFEST_DIR for the
    // test process too) or the working directory: a path fixed at compile time names the
    // checkout that built this crate, and a shared target directory reuses that build for
    // other checkouts (a CI clone that is gone by the next run).
    let start = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::current_dir().ok());
    start
        .iter()
        .flat_map(|dir| dir.ancestors())
        .find(|dir| dir.join("models").is_dir() && dir.join("runtime").is_dir())
        .map(|root| root.join("models"))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// Every feature of a baseline (inputs, then outputs) by name.
pub fn baseline_features(baseline: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for list in ["features", "outputs"] {
        for f in baseline[list].as_array().into_iter().flatten() {
            out.insert(f["name"].as_str().unwrap().to_owned(), f.clone());
        }
    }
    out
}

/// PSI of `values` against one baseline feature (with tails), by a linear scan of the edges.
pub fn reference_psi(feature: &Value, values: &[f64]) -> f64 {
    let edges: Vec<f64> = serde_json::from_value(feature["edges"].clone()).unwrap();
    let expected: Vec<f64> = serde_json::from_value(feature["proportions"].clone()).unwrap();
    let n = edges.len() - 1;
    assert_eq!(
        expected.len(),
        n + 2,
        "the reference knows baselines with tails only"
    );
    let mut counts = vec![0u64; n + 2];
    for &x in values {
        let slot = if x < edges[0] {
            0
        } else if x > edges[n] {
            n + 1
        } else {
            (0..n).find(|&i| x < edges[i + 1]).unwrap_or(n - 1) + 1
        };
        counts[slot] += 1;
    }
    let total = values.len() as f64;
    counts
        .iter()
        .zip(&expected)
        .map(|(&c, &e)| {
            let a = (c as f64 / total).max(1e-4);
            let e = e.max(1e-4);
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// PSI per feature of `samples` against the baseline file at `baseline`, from numpy
/// (`python models/drift.py psi`, the Python in `OUTPOST_PYTHON` or `python3`); `None` when
/// that Python cannot import numpy and `OUTPOST_REQUIRE_PYTHON` is unset (`.ci/run` sets it).
pub fn numpy_psi(
    scratch: &Path,
    baseline: &Path,
    samples: &BTreeMap<String, Vec<f64>>,
) -> Option<BTreeMap<String, f64>> {
    let python = crate::python_with("numpy")?;
    let path = scratch.join("drift-samples.json");
    std::fs::write(&path, serde_json::to_vec(samples).unwrap()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(models_dir().join("drift.py"))
        .args(["psi", "--baseline"])
        .arg(baseline)
        .arg("--samples")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// Asserts that `reported(feature)`, the PSI Outpost reported, equals the PSI of `samples`
/// from the reference (to 1e-9) and from numpy when at hand (to 1e-6).
pub fn assert_psi_agrees(
    scratch: &Path,
    baseline: &Path,
    samples: &BTreeMap<String, Vec<f64>>,
    reported: impl Fn(&str) -> f64,
) {
    let parsed: Value = serde_json::from_slice(&std::fs::read(baseline).unwrap()).unwrap();
    let features = baseline_features(&parsed);
    let numpy = numpy_psi(scratch, baseline, samples);
    for (name, values) in samples {
        let ours = reported(name);
        let reference = reference_psi(&features[name], values);
        let theirs = numpy.as_ref().map(|n| n[name]);
        eprintln!(
            "{name}: {} samples, PSI reported {ours:.6}, reference {reference:.6}, numpy {theirs:?}",
            values.len()
        );
        assert!(
            (ours - reference).abs() < 1e-9,
            "{name}: reported {ours}, reference {reference}"
        );
        if let Some(theirs) = theirs {
            assert!(
                (ours - theirs).abs() < 1e-6,
                "{name}: reported {ours}, numpy {theirs}"
            );
        }
    }
}
