//! A guest to start from: the request's tensors go to the bundle's model `model`, and the
//! answer is the model's first FP32 output as `scores` with the index of the best score of
//! each row as `label`. Put your own steps where the comments say.

use outpost_guest::{DataType, Error, Payload, Request, Response, Tensor};

fn handle(request: Request) -> Result<Response, Error> {
    let Payload::Tensors(inputs) = request else {
        return Err(Error::invalid_input("send tensors, not a raw body"));
    };
    // Pre-processing goes here: scale, normalise, reshape, tokenize. The host has already
    // checked every tensor against the bundle's [api].
    let outputs = outpost_guest::infer("model", inputs)?;
    let scores = outputs
        .into_iter()
        .find(|t| t.datatype == DataType::F32)
        .ok_or_else(|| Error::internal("the model has no FP32 output"))?;
    // Post-processing goes here: thresholds, labels, calibration.
    let values = scores.to_values::<f32>()?;
    let classes = scores.shape.last().copied().unwrap_or(1).max(1) as usize;
    let labels: Vec<i64> = values
        .chunks(classes)
        .map(|row| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 as i64
        })
        .collect();
    // Drift monitoring, once the bundle has a training baseline naming the feature:
    //     outpost_guest::observe("label", labels[0] as f64);
    let rows = labels.len() as u64;
    Ok(Response::tensors(vec![
        Tensor::from_values("label", [rows], &labels),
        Tensor {
            name: "scores".into(),
            ..scores
        },
    ]))
}

outpost_guest::export!(handle);
