//! `bundle build … --baseline-data FILE`: the drift baseline of a bundle served by the
//! generic guest, computed by running that guest on a sample of training inputs.
//!
//! Which features are monitored is the `monitor` list of the bundle's `generic` metadata
//! (documented in `examples/generic/src/lib.rs`); `--onnx` writes one from the model's
//! signature. The baseline is computed from what the guest itself observes while the model
//! answers the sample, so a device serving the bundle observes exactly the features the
//! baseline describes, computed the same way.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use outpost_bundle::BuildInput;
use outpost_bundle::drift::{MAX_FEATURES, categorical, histogram, validate};
use outpost_bundle::manifest::{Baseline, DataType, Dim, QualitySpec, Task, TensorSpec};
use outpost_engine::Payload;
use outpost_inference::Tensor;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::samples::{Npy, pack};

/// Most columns of a tabular input monitored one by one; wider rows are summarised by their
/// mean and standard deviation.
const MAX_COLUMNS: u64 = 16;
/// Most channels of an image-like input monitored one by one.
const MAX_CHANNELS: u64 = 4;
/// Most observations one guest call keeps (the engine's cap on events per request).
const MAX_OBSERVATIONS: usize = 1024;
/// Most rows of a `.npy` sample sent in one call.
const MAX_ROWS_PER_CALL: usize = 256;

/// What `bundle build` reads of a `monitor` entry.
#[derive(Debug, Deserialize)]
pub(crate) struct MonitorEntry {
    /// The feature's name.
    pub name: String,
    /// Set when the feature is an output's.
    #[serde(default)]
    pub output: Option<String>,
    /// Set when the feature is a class index.
    #[serde(default)]
    pub classes: Option<u64>,
}

/// The `monitor` list of `metadata`'s `generic` entry (empty when there is none).
pub(crate) fn monitor_of(metadata: &BTreeMap<String, Value>) -> Result<Vec<MonitorEntry>> {
    match metadata.get("generic").and_then(|g| g.get("monitor")) {
        None => Ok(Vec::new()),
        Some(list) => serde_json::from_value(list.clone())
            .context("the `monitor` list of the `generic` metadata is malformed"),
    }
}

/// The features worth monitoring for a model with this signature: each column of a narrow
/// tabular input, mean and std per channel of an image-like input (channels on axis 1, or
/// last), mean and std of anything wider; and the prediction: the class of a probabilities
/// or logits output, else a class-index or value output.
pub(crate) fn monitor_for(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Vec<Value> {
    let fixed = |d: Option<&Dim>| match d {
        Some(Dim::Fixed(n)) => Some(*n),
        _ => None,
    };
    let summary = |name: &str| {
        vec![
            json!({ "name": format!("{name}.mean"), "input": name, "stat": "mean" }),
            json!({ "name": format!("{name}.std"), "input": name, "stat": "std" }),
        ]
    };
    let mut per_input: Vec<(Vec<Value>, Vec<Value>)> = Vec::new();
    for t in inputs.iter().filter(|t| t.datatype != DataType::Bytes) {
        let name = t.name.as_str();
        let rank = t.shape.len();
        let detailed = match rank {
            0 | 1 => vec![json!({ "name": name, "input": name, "stat": "value" })],
            2 => match fixed(t.shape.get(1)) {
                Some(1) => vec![json!({ "name": name, "input": name, "stat": "value" })],
                Some(c) if c <= MAX_COLUMNS => (0..c)
                    .map(|j| {
                        json!({ "name": format!("{name}[{j}]"), "input": name,
                                "stat": "value", "column": j })
                    })
                    .collect(),
                _ => summary(name),
            },
            _ => {
                let axis = [1, rank - 1]
                    .into_iter()
                    .find(|&a| fixed(t.shape.get(a)).is_some_and(|c| c <= MAX_CHANNELS));
                match axis {
                    Some(axis) => {
                        let c = fixed(t.shape.get(axis)).unwrap_or(1);
                        (0..c)
                            .flat_map(|c| {
                                ["mean", "std"].map(|stat| {
                                    json!({ "name": format!("{name}.{stat}[{c}]"), "input": name,
                                            "stat": stat, "channel": c, "axis": axis })
                                })
                            })
                            .collect()
                    }
                    None => summary(name),
                }
            }
        };
        per_input.push((detailed, summary(name)));
    }
    let prediction = outputs
        .iter()
        .find_map(|t| {
            let classes = fixed(t.shape.get(1)).filter(|&k| k >= 2);
            (t.datatype == DataType::F32 && t.shape.len() == 2)
                .then_some(classes)
                .flatten()
                .map(|k| {
                    json!({ "name": format!("{}.class", t.name), "output": t.name,
                            "stat": "argmax", "classes": k })
                })
        })
        .or_else(|| {
            let one_per_item = |t: &TensorSpec| {
                t.shape.len() == 1 || (t.shape.len() == 2 && fixed(t.shape.get(1)) == Some(1))
            };
            outputs
                .iter()
                .find(|t| matches!(t.datatype, DataType::I64 | DataType::I32) && one_per_item(t))
                .map(|t| json!({ "name": t.name, "output": t.name, "stat": "value", "classes": 0 }))
                .or_else(|| {
                    outputs
                        .iter()
                        .find(|t| t.datatype == DataType::F32 && one_per_item(t))
                        .map(|t| json!({ "name": t.name, "output": t.name, "stat": "value" }))
                })
        });
    // Within the cap: per-column detail gives way to summaries, widest input first.
    let room = MAX_FEATURES - usize::from(prediction.is_some());
    let count = |p: &[(Vec<Value>, Vec<Value>)], detail: &[bool]| -> usize {
        p.iter()
            .zip(detail)
            .map(|((d, s), &keep)| if keep { d.len() } else { s.len() })
            .sum()
    };
    let mut detail = vec![true; per_input.len()];
    while count(&per_input, &detail) > room {
        let widest = (0..per_input.len())
            .filter(|&i| detail[i] && per_input[i].0.len() > per_input[i].1.len())
            .max_by_key(|&i| per_input[i].0.len());
        match widest {
            Some(i) => detail[i] = false,
            None => break,
        }
    }
    let mut monitor: Vec<Value> = per_input
        .into_iter()
        .zip(detail)
        .flat_map(|((d, s), keep)| if keep { d } else { s })
        .take(room)
        .collect();
    monitor.extend(prediction);
    monitor
}

/// Runs the generic guest of `build` over every request in `data` and returns the baseline of
/// the features its `monitor` names (edges at the `bins`-quantiles), with the prediction as
/// the quality output.
pub(crate) fn compute(build: &BuildInput, data: &Path, bins: usize) -> Result<Baseline> {
    let monitor = monitor_of(&build.metadata)?;
    if monitor.is_empty() {
        bail!(
            "the bundle's generic guest monitors nothing: list features under `monitor` in the \
             spec's [metadata.generic] (see examples/generic/src/lib.rs), or build with --onnx \
             and --baseline-data to have them chosen from the model"
        );
    }
    let models = build
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.bytes.as_slice(), m.inputs.as_slice()));
    let (engine, guest, context) = crate::samples::load_guest(
        format!("{} {} (baseline)", build.name, build.version),
        &build.guest,
        models,
        build.metadata.clone(),
        build.limits,
    )?;
    let l = build.limits;
    let per_call = (MAX_OBSERVATIONS / monitor.len()).clamp(1, MAX_ROWS_PER_CALL);
    let requests = load_sample(data, &build.api.inputs, per_call, l.max_tensor_bytes)?;
    if requests.is_empty() {
        bail!("`{}` holds no inputs", data.display());
    }
    let mut seen: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (i, (at, tensors)) in requests.into_iter().enumerate() {
        let out = engine
            .call(&guest, &context, Payload::Tensors(tensors))
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("the model refused {at} of `{}`", data.display()))?;
        if out.observations.len() >= MAX_OBSERVATIONS {
            bail!(
                "{at} of `{}` holds too many items to observe in one call (request {}): split it",
                data.display(),
                i + 1
            );
        }
        for (name, value) in out.observations {
            seen.entry(name).or_default().push(value);
        }
    }
    let mut baseline = Baseline::default();
    for m in &monitor {
        let values = seen.get(&m.name).map_or(&[][..], Vec::as_slice);
        let feature = match m.classes {
            Some(0) => {
                let top = values.iter().copied().fold(0.0f64, f64::max);
                categorical(&m.name, values, build.labels.len().max(top as usize + 1))
            }
            Some(k) => categorical(&m.name, values, k as usize),
            None => histogram(&m.name, values, bins),
        };
        let Some(feature) = feature else {
            bail!(
                "the monitored feature `{}` was never observed on `{}`: does its `monitor` \
                 entry fit the model's tensors?",
                m.name,
                data.display()
            );
        };
        if m.output.is_some() {
            if baseline.quality.is_none() {
                baseline.quality = Some(QualitySpec {
                    output: m.name.clone(),
                    task: if m.classes.is_some() {
                        Task::Classification
                    } else {
                        Task::Regression
                    },
                });
            }
            baseline.outputs.push(feature);
        } else {
            baseline.features.push(feature);
        }
    }
    validate(&baseline)
        .map_err(anyhow::Error::msg)
        .context("the computed baseline is not valid")?;
    Ok(baseline)
}

/// The requests in `path`: JSON Lines of Open Inference Protocol requests (`.jsonl`), or one
/// `.npy` array for the model's single input, split along its first axis into requests of at
/// most `per_call` rows (one row when the input's first dimension is fixed at 1). Each
/// request comes with where it was read from, for errors.
fn load_sample(
    path: &Path,
    inputs: &[TensorSpec],
    per_call: usize,
    cap: u64,
) -> Result<Vec<(String, Vec<Tensor>)>> {
    let bytes = crate::util::read(path)?;
    let is = |ext: &str| path.extension().is_some_and(|e| e == ext);
    if is("npy") {
        let [input] = inputs else {
            bail!(
                "a .npy sample fills one input and the model has {}: give JSON Lines of \
                 inference requests instead",
                inputs.len()
            );
        };
        let array = Npy::parse(&bytes).with_context(|| format!("`{}`", path.display()))?;
        let rows = array.shape.first().copied().unwrap_or(1) as usize;
        let rank_ok = array.shape.len() == input.shape.len();
        let fits = rank_ok
            && array.shape[1..]
                .iter()
                .zip(&input.shape[1..])
                .all(|(a, d)| !matches!(d, Dim::Fixed(n) if n != a));
        if !fits {
            let dims: Vec<String> = input.shape.iter().map(Dim::to_string).collect();
            bail!(
                "`{}` has shape {:?}; input `{}` takes [{}] (rows along the first axis)",
                path.display(),
                array.shape,
                input.name,
                dims.join(", ")
            );
        }
        let (chunk, fixed) = match input.shape.first() {
            Some(Dim::Fixed(n)) => (*n as usize, true),
            _ => (per_call, false),
        };
        if chunk == 0 || (fixed && !rows.is_multiple_of(chunk)) {
            bail!(
                "`{}` has {rows} rows; input `{}` takes {chunk} at a time",
                path.display(),
                input.name
            );
        }
        let width: usize = array.shape[1..].iter().map(|&d| d as usize).product();
        let mut out = Vec::new();
        for (k, rows) in array.values.chunks(chunk * width).enumerate() {
            let mut shape = array.shape.clone();
            shape[0] = (rows.len() / width.max(1)) as u64;
            let tensor = pack(&input.name, input.datatype, shape, rows)
                .with_context(|| format!("`{}`", path.display()))?;
            out.push((format!("rows from {}", k * chunk), vec![tensor]));
        }
        Ok(out)
    } else if is("jsonl") || is("ndjson") {
        let text = std::str::from_utf8(&bytes)
            .with_context(|| format!("`{}` is not UTF-8", path.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let request = outpost_oip::decode_request(line.as_bytes(), None, cap)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!(
                        "line {} of `{}` is not an inference request",
                        i + 1,
                        path.display()
                    )
                })?;
            out.push((format!("line {}", i + 1), request.inputs));
        }
        Ok(out)
    } else {
        bail!(
            "`{}`: a baseline sample is a .npy array or JSON Lines of inference requests (.jsonl)",
            path.display()
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(name: &str, dtype: DataType, shape: &[Option<u64>]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: dtype,
            shape: shape
                .iter()
                .map(|d| d.map_or_else(|| Dim::Symbolic("n".into()), Dim::Fixed))
                .collect(),
        }
    }

    fn names(monitor: &[Value]) -> Vec<&str> {
        monitor
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn features_are_chosen_by_the_shape_of_each_tensor() {
        let table = spec("x", DataType::F32, &[None, Some(3)]);
        let probs = spec("probabilities", DataType::F32, &[None, Some(4)]);
        let m = monitor_for(&[table], std::slice::from_ref(&probs));
        assert_eq!(names(&m), ["x[0]", "x[1]", "x[2]", "probabilities.class"]);
        assert_eq!(m[3]["classes"], 4);

        let image = spec(
            "image",
            DataType::F32,
            &[Some(1), Some(3), Some(8), Some(8)],
        );
        let m = monitor_for(&[image], &[spec("score", DataType::F32, &[None])]);
        assert_eq!(
            names(&m),
            [
                "image.mean[0]",
                "image.std[0]",
                "image.mean[1]",
                "image.std[1]",
                "image.mean[2]",
                "image.std[2]",
                "score"
            ]
        );
        assert!(m[6].get("classes").is_none());

        let wide = spec("input", DataType::F32, &[None, Some(64)]);
        let labels = spec("label", DataType::I64, &[None]);
        let m = monitor_for(&[wide], &[labels]);
        assert_eq!(names(&m), ["input.mean", "input.std", "label"]);

        // Over the cap, the widest per-column input is summarised.
        let a = spec("a", DataType::F32, &[None, Some(16)]);
        let b = spec("b", DataType::F32, &[None, Some(16)]);
        let m = monitor_for(&[a, b], &[probs]);
        assert_eq!(m.len(), 16 + 2 + 1);
        assert!(m.len() <= MAX_FEATURES);
    }
}
