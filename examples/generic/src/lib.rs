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
    let Payload::Tensors(inputs) = request else {
        return Err(Error::invalid_input(
            "this model takes tensors (the Open Inference Protocol endpoints), not a raw payload",
        ));
    };
    let config = config()?;
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
    Ok(Response::tensors(outputs))
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
