//! The generic guest: the one `outpost bundle build --onnx` puts in a bundle, and the smallest
//! complete guest to start from.
//!
//! It hands the request's tensors to the bundle's one ONNX model (`model`) and returns the
//! model's outputs, so the endpoint's inputs and outputs are the graph's own. What little
//! processing is common enough not to need code comes from the bundle's metadata entry
//! `generic` (written by `bundle build --onnx` from its flags, editable in the spec it writes):
//!
//! ```json
//! { "inputs":  { "image": { "scale": 0.00392156, "offset": 0.0 } },
//!   "outputs": { "logits": { "softmax": true } } }
//! ```
//!
//! `scale`/`offset` map each element `x` of an FP32 input to `x * scale + offset`; `softmax`
//! turns an FP32 output into probabilities over its last axis.
//!
//! `image` lets the raw endpoint take a PNG or JPEG for an image input: decoded, resized
//! (bilinear) to the input's height and width, each channel mapped to `(pixel / 255 - mean) /
//! std`, laid out channels first (`NCHW`) or last (`NHWC`), as one item:
//!
//! ```json
//! { "image": { "input": "image", "layout": "NCHW", "height": 224, "width": 224,
//!              "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225] } }
//! ```
//!
//! (`bgr: true` for models trained on OpenCV's channel order; `channels: 1` for gray.)
//!
//! `monitor` lists the drift features the guest observes for each item (each row along the
//! first axis) of every request, named as the bundle's baseline names them (`bundle build
//! --onnx … --baseline-data FILE` writes both):
//!
//! ```json
//! { "monitor": [
//!     { "name": "x[0]", "input": "x", "stat": "value", "column": 0 },
//!     { "name": "image.mean[0]", "input": "image", "stat": "mean", "channel": 0, "axis": 1 },
//!     { "name": "image.std", "input": "image", "stat": "std" },
//!     { "name": "probabilities.class", "output": "probabilities", "stat": "argmax", "classes": 10 }
//! ] }
//! ```
//!
//! `value` is the item's element `column` (of the item flattened); `mean` and `std`
//! (population) are taken over the item, or over its elements at index `channel` along tensor
//! axis `axis`; `argmax` is the index of the item's largest element. Inputs are observed as the
//! client sent them (before `scale`), outputs as the client receives them. `classes` says a
//! feature is a class index (`0 .. classes-1`; `0`: as many as the bundle's labels, or one past
//! the largest seen) for the baseline `bundle build --baseline-data` computes; the guest does
//! not need it.

mod image;

use std::collections::BTreeMap;

use outpost_guest::{DataType, Error, Payload, Request, Response, Tensor};
use serde::Deserialize;

/// The model's name in bundles made by `bundle build --onnx`.
const MODEL: &str = "model";

/// The `generic` metadata entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    inputs: BTreeMap<String, InputStep>,
    #[serde(default)]
    outputs: BTreeMap<String, OutputStep>,
    #[serde(default)]
    monitor: Vec<Monitor>,
    /// The raw endpoint's image step, when the model takes an image.
    #[serde(default)]
    image: Option<image::ImageStep>,
}

/// One drift feature observed for each item.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Monitor {
    name: String,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    output: Option<String>,
    stat: Stat,
    #[serde(default)]
    column: usize,
    #[serde(default)]
    channel: Option<u64>,
    #[serde(default = "first_axis")]
    axis: usize,
    // Read by `bundle build`, not here.
    #[serde(default)]
    #[allow(dead_code)]
    classes: Option<u64>,
}

fn first_axis() -> usize {
    1
}

/// What one feature is of an item.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Stat {
    Value,
    Mean,
    Std,
    Argmax,
}

/// What to do to an input before the model sees it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputStep {
    #[serde(default = "one")]
    scale: f32,
    #[serde(default)]
    offset: f32,
}

fn one() -> f32 {
    1.0
}

/// What to do to an output before the client sees it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputStep {
    #[serde(default)]
    softmax: bool,
}

fn config() -> Result<Config, Error> {
    match outpost_guest::metadata("generic") {
        None => Ok(Config::default()),
        Some(text) => serde_json::from_str(&text)
            .map_err(|e| Error::internal(format!("the bundle's `generic` metadata: {e}"))),
    }
}

fn handle(request: Request) -> Result<Response, Error> {
    let config = config()?;
    let inputs = match (request, &config.image) {
        (Payload::Tensors(inputs), _) => inputs,
        (Payload::Raw { content_type, body }, Some(step)) => {
            vec![image::tensor(step, &content_type, &body)?]
        }
        (Payload::Raw { .. }, None) => {
            return Err(Error::invalid_input(
                "this model takes tensors (the Open Inference Protocol endpoints), not a raw \
                 payload",
            ));
        }
    };
    observe(&config.monitor, &inputs, |m| m.input.as_deref());
    let inputs = inputs
        .into_iter()
        .map(|t| match config.inputs.get(&t.name) {
            Some(step) => scale(t, step),
            None => Ok(t),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outputs = outpost_guest::infer(MODEL, inputs)?;
    let outputs = outputs
        .into_iter()
        .map(|t| match config.outputs.get(&t.name) {
            Some(step) if step.softmax => softmax(t),
            _ => Ok(t),
        })
        .collect::<Result<Vec<_>, _>>()?;
    observe(&config.monitor, &outputs, |m| m.output.as_deref());
    Ok(Response::tensors(outputs))
}

/// Observes, item by item, each feature `tensor_of` ties to one of `tensors`. A feature that
/// does not fit the tensor (a column beyond the item, a non-numeric tensor) is not observed:
/// monitoring never fails a request, and the device counts what the baseline expects.
fn observe(monitor: &[Monitor], tensors: &[Tensor], tensor_of: impl Fn(&Monitor) -> Option<&str>) {
    for t in tensors {
        let features: Vec<&Monitor> = monitor
            .iter()
            .filter(|m| tensor_of(m) == Some(t.name.as_str()))
            .collect();
        if features.is_empty() {
            continue;
        }
        let Ok(values) = t.to_f32() else { continue };
        let items = t.shape.first().map_or(1, |&n| n as usize);
        if items == 0 {
            continue;
        }
        let width = values.len() / items;
        for item in values.chunks_exact(width.max(1)).take(items) {
            for m in &features {
                if let Some(v) = feature(m, &t.shape, item) {
                    outpost_guest::observe(&m.name, v);
                }
            }
        }
    }
}

/// Feature `m` of one item of a tensor shaped `shape`.
fn feature(m: &Monitor, shape: &[u64], item: &[f32]) -> Option<f64> {
    let selected: Vec<f64> = match m.channel {
        None => item.iter().map(|&x| f64::from(x)).collect(),
        Some(c) => {
            let dim = *shape.get(m.axis).filter(|_| m.axis >= 1)?;
            let inner: u64 = shape.get(m.axis + 1..)?.iter().product();
            item.iter()
                .enumerate()
                .filter(|(i, _)| (*i as u64 / inner.max(1)) % dim.max(1) == c)
                .map(|(_, &x)| f64::from(x))
                .collect()
        }
    };
    if selected.is_empty() {
        return None;
    }
    let n = selected.len() as f64;
    let mean = || selected.iter().sum::<f64>() / n;
    match m.stat {
        Stat::Value => item.get(m.column).map(|&x| f64::from(x)),
        Stat::Mean => Some(mean()),
        Stat::Std => {
            let mu = mean();
            Some((selected.iter().map(|x| (x - mu) * (x - mu)).sum::<f64>() / n).sqrt())
        }
        Stat::Argmax => {
            let (best, _) =
                selected
                    .iter()
                    .enumerate()
                    .fold((0, f64::NEG_INFINITY), |(bi, bv), (i, &x)| {
                        if x > bv { (i, x) } else { (bi, bv) }
                    });
            Some(best as f64)
        }
    }
}

fn scale(t: Tensor, step: &InputStep) -> Result<Tensor, Error> {
    if t.datatype != DataType::F32 {
        return Err(Error::invalid_input(format!(
            "input `{}` must be FP32 to be scaled",
            t.name
        )));
    }
    let values: Vec<f32> = t
        .to_f32()?
        .into_iter()
        .map(|x| x * step.scale + step.offset)
        .collect();
    Ok(Tensor::from_f32(t.name, t.shape, &values))
}

fn softmax(t: Tensor) -> Result<Tensor, Error> {
    if t.datatype != DataType::F32 {
        return Err(Error::internal(format!(
            "output `{}` is {:?}; softmax takes FP32",
            t.name, t.datatype
        )));
    }
    let values = t.to_f32()?;
    let width = t.shape.last().copied().unwrap_or(1).max(1) as usize;
    let mut out = Vec::with_capacity(values.len());
    for row in values.chunks(width) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        out.extend(exp.iter().map(|e| e / sum));
    }
    Ok(Tensor::from_f32(t.name, t.shape, &out))
}

outpost_guest::export!(handle);
