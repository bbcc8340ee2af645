//! Sensor anomaly detector guest.
//!
//! Takes readings of three channels (temperature, vibration, current) as the tensor `readings`
//! (`[T, 3]`, T ≥ 16) or as JSON `{"readings": [[t, v, c], ...]}` on the raw endpoint. It cuts
//! them into windows of 16 steps, scales each channel with the training mean and standard
//! deviation, reconstructs each window with the autoencoder `autoencoder`, and scores the mean
//! squared reconstruction error against the threshold. Window size, scaler and threshold come
//! from the manifest's metadata, so a retrained model ships them with it.
//!
//! **Streaming.** The bundle `examples/sensor/stream.toml` serves the same model in streaming
//! sessions (`[serving.sessions]`, metadata `streaming = true`): the device keeps one instance
//! of this guest per session key, so the steps left over after the last complete window are
//! kept here and prepended to the next call's readings. A client may then send readings a
//! few steps at a time and get a score for each window as it completes; a call that completes
//! no window answers with zero windows. Without sessions every call starts from nothing.

use std::sync::Mutex;

use outpost_guest::{DataType, Error, Payload, Request, Response, Tensor};

/// Parameters the training script writes into the manifest metadata.
struct Params {
    window: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
    threshold: f32,
    channels: Vec<String>,
    streaming: bool,
}

/// In a streaming session: the readings after the last complete window, row-major, kept
/// between calls (the instance lives as long as the session).
static CARRIED: Mutex<Vec<f32>> = Mutex::new(Vec::new());

fn params() -> Result<Params, Error> {
    let get = |key: &str| -> Result<serde_json::Value, Error> {
        let text = outpost_guest::metadata(key)
            .ok_or_else(|| Error::internal(format!("bundle metadata lacks `{key}`")))?;
        serde_json::from_str(&text).map_err(|e| Error::internal(format!("metadata `{key}`: {e}")))
    };
    let floats = |key: &str| -> Result<Vec<f32>, Error> {
        serde_json::from_value::<Vec<f32>>(get(key)?)
            .map_err(|e| Error::internal(format!("metadata `{key}`: {e}")))
    };
    let window = get("window")?
        .as_u64()
        .filter(|w| (1..=4096).contains(w))
        .ok_or_else(|| Error::internal("metadata `window` must be 1..4096"))?
        as usize;
    let threshold = get("threshold")?
        .as_f64()
        .ok_or_else(|| Error::internal("metadata `threshold` must be a number"))?
        as f32;
    let channels: Vec<String> = serde_json::from_value(get("channels")?)
        .map_err(|e| Error::internal(format!("metadata `channels`: {e}")))?;
    let streaming = outpost_guest::metadata("streaming").is_some_and(|v| v == "true");
    let (mean, std) = (floats("channel_mean")?, floats("channel_std")?);
    if mean.len() != channels.len() || std.len() != channels.len() || std.iter().any(|s| *s <= 0.0)
    {
        return Err(Error::internal(
            "metadata scaler does not match the channels",
        ));
    }
    Ok(Params {
        window,
        mean,
        std,
        threshold,
        channels,
        streaming,
    })
}

fn handle(request: Request) -> Result<Response, Error> {
    let p = params()?;
    let c = p.channels.len();
    match &request {
        Payload::Tensors(_) => {
            let t = request.tensor("readings")?;
            if t.shape.len() != 2 || t.shape[1] != c as u64 {
                return Err(Error::invalid_input(format!(
                    "`readings` must have shape [T, {c}], got {:?}",
                    t.shape
                )));
            }
            let (scores, anomalies) = score(&p, &t.to_f32()?)?;
            let n = scores.len() as u64;
            Ok(Response::tensors(vec![
                Tensor::from_f32("score", [n], &scores),
                Tensor {
                    name: "anomaly".into(),
                    datatype: DataType::Bool,
                    shape: vec![n],
                    data: anomalies.iter().map(|&a| u8::from(a)).collect(),
                },
            ]))
        }
        Payload::Raw { body, .. } => {
            #[derive(serde::Deserialize)]
            struct Body {
                readings: Vec<Vec<f32>>,
            }
            let body: Body = serde_json::from_slice(body).map_err(|e| {
                Error::invalid_input(format!("expected JSON {{\"readings\": [[...], ...]}}: {e}"))
            })?;
            if let Some(row) = body.readings.iter().find(|r| r.len() != c) {
                return Err(Error::invalid_input(format!(
                    "each reading needs {c} values ({}), got {}",
                    p.channels.join(", "),
                    row.len()
                )));
            }
            let flat: Vec<f32> = body.readings.concat();
            let (scores, anomalies) = score(&p, &flat)?;
            let json = serde_json::json!({
                "scores": scores,
                "anomalies": anomalies,
                "threshold": p.threshold,
                "window": p.window,
            });
            Ok(Response::raw("application/json", json.to_string()))
        }
    }
}

/// Scores each complete window of `flat` (row-major `[T, channels]`); when streaming, after
/// the readings carried from the call before, keeping what is left for the next.
fn score(p: &Params, flat: &[f32]) -> Result<(Vec<f32>, Vec<bool>), Error> {
    if flat.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid_input("readings must be finite numbers"));
    }
    if !p.streaming {
        return score_windows(p, flat);
    }
    let mut carried = CARRIED
        .lock()
        .map_err(|_| Error::internal("the carried readings are poisoned"))?;
    let mut all = std::mem::take(&mut *carried);
    all.extend_from_slice(flat);
    let width = p.window * p.channels.len();
    let complete = all.len() / width * width;
    let result = if complete == 0 {
        Ok((Vec::new(), Vec::new()))
    } else {
        score_windows(p, &all[..complete])
    };
    *carried = all.split_off(complete);
    result
}

/// Scores each complete window of `flat`.
fn score_windows(p: &Params, flat: &[f32]) -> Result<(Vec<f32>, Vec<bool>), Error> {
    let c = p.channels.len();
    let steps = flat.len() / c;
    if steps < p.window {
        return Err(Error::invalid_input(format!(
            "need at least {} readings, got {steps}",
            p.window
        )));
    }
    let n = steps / p.window;
    let width = p.window * c;
    // Drift features: each channel's mean over each complete window, the quantity the
    // baseline's histograms were computed on (`models/sensor/train.py`).
    for window in flat[..n * width].chunks(width) {
        for (i, name) in p.channels.iter().enumerate() {
            let mean = window.iter().skip(i).step_by(c).sum::<f32>() / p.window as f32;
            outpost_guest::observe(name, f64::from(mean));
        }
    }
    let scaled: Vec<f32> = flat[..n * width]
        .iter()
        .enumerate()
        .map(|(i, v)| (v - p.mean[i % c]) / p.std[i % c])
        .collect();
    let outputs = outpost_guest::infer(
        "autoencoder",
        vec![Tensor::from_f32("input", [n as u64, width as u64], &scaled)],
    )?;
    let recon = outputs
        .first()
        .ok_or_else(|| Error::internal("autoencoder returned nothing"))?
        .to_f32()?;
    if recon.len() != scaled.len() {
        return Err(Error::internal("autoencoder output has the wrong size"));
    }
    let scores: Vec<f32> = scaled
        .chunks(width)
        .zip(recon.chunks(width))
        .map(|(x, r)| x.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / width as f32)
        .collect();
    // Prediction drift: the distribution of reconstruction errors.
    for s in &scores {
        outpost_guest::observe("score", f64::from(*s));
    }
    let anomalies = scores.iter().map(|s| *s > p.threshold).collect();
    Ok((scores, anomalies))
}

outpost_guest::export!(handle);
