//! Handwritten-digit classifier guest.
//!
//! Takes the 64 pixel values of an 8×8 digit (0–16, as in scikit-learn's digits data set) as
//! the tensor `pixels` (`[N, 64]`), or a grayscale image of any size as raw PGM or PNG bytes;
//! normalises, runs the ONNX model `classifier`, and returns the label and the ten class
//! probabilities. It reports the mean ink intensity as the drift feature `mean_intensity`.

use outpost_guest::{Error, Payload, Request, Response, Tensor};

mod image;

/// Pixels per digit.
const PIXELS: usize = 64;
/// Largest pixel value in the training data.
const MAX_VALUE: f32 = 16.0;

fn handle(request: Request) -> Result<Response, Error> {
    match &request {
        Payload::Tensors(_) => {
            let pixels = request.tensor("pixels")?.to_f32()?;
            let (labels, probabilities) = classify(&pixels)?;
            let n = labels.len() as u64;
            Ok(Response::tensors(vec![
                Tensor::from_i64("label", [n], &labels),
                Tensor::from_f32("probabilities", [n, 10], &probabilities),
            ]))
        }
        Payload::Raw { content_type, body } => {
            let gray = image::decode(content_type, body)?;
            let pixels = image::to_digit_grid(&gray);
            let (labels, probabilities) = classify(&pixels)?;
            let json = serde_json::json!({
                "label": labels[0],
                "probabilities": probabilities,
                "pixels": pixels,
            });
            Ok(Response::raw("application/json", json.to_string()))
        }
    }
}

/// Classifies `N × 64` pixel values; returns N labels and N × 10 probabilities.
fn classify(pixels: &[f32]) -> Result<(Vec<i64>, Vec<f32>), Error> {
    if pixels.is_empty() || !pixels.len().is_multiple_of(PIXELS) {
        return Err(Error::invalid_input(format!(
            "`pixels` must hold N × 64 values, got {}",
            pixels.len()
        )));
    }
    if let Some(bad) = pixels.iter().find(|p| !(0.0..=MAX_VALUE).contains(*p)) {
        return Err(Error::invalid_input(format!(
            "pixel values must be between 0 and 16, got {bad}"
        )));
    }
    let n = pixels.len() / PIXELS;
    let scaled: Vec<f32> = pixels.iter().map(|p| p / MAX_VALUE).collect();
    for row in scaled.chunks(PIXELS) {
        outpost_guest::observe(
            "mean_intensity",
            f64::from(row.iter().sum::<f32>() / PIXELS as f32),
        );
    }
    let outputs = outpost_guest::infer(
        "classifier",
        vec![Tensor::from_f32(
            "input",
            [n as u64, PIXELS as u64],
            &scaled,
        )],
    )?;
    let probs = outputs
        .iter()
        .find(|t| t.name == "probabilities")
        .ok_or_else(|| Error::internal("model returned no `probabilities`"))?
        .to_f32()?;
    if probs.len() != n * 10 {
        return Err(Error::internal(format!(
            "model returned {} probabilities for {n} digits",
            probs.len()
        )));
    }
    let labels = probs
        .chunks(10)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |best, (i, &p)| if p > best.1 { (i, p) } else { best },
                )
                .0 as i64
        })
        .collect::<Vec<i64>>();
    // Prediction drift: the class distribution against the training predictions'.
    for label in &labels {
        outpost_guest::observe("predicted_class", *label as f64);
    }
    Ok((labels, probs))
}

outpost_guest::export!(handle);
