//! `outpost model`: ONNX files as tract sees them, before they go into a bundle.

use std::path::PathBuf;

use anyhow::{Context, Result};
use outpost_bundle::manifest::TensorSpec;

use crate::util;

/// Model subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ModelCommand {
    /// Show an ONNX file's inputs and outputs as tract types them, its operators (and any
    /// tract lacks), the exporter quirks the loader repairs, and its weights.
    Inspect {
        /// The `.onnx` file.
        file: PathBuf,
        /// Pin an input's shape, e.g. `image=1,3,224,224` (as `bundle build --onnx` takes it).
        #[arg(long = "input-shape", value_name = "INPUT=DIMS")]
        input_shapes: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also time the model in tract at batch 1, 2, 4 and 8 and print the cost per item:
        /// whether `[serving.batching]` can pay for this model.
        #[arg(long)]
        bench: bool,
    },
}

fn tensors(ts: &[TensorSpec]) -> String {
    ts.iter()
        .map(|t| {
            let dims: Vec<String> = t.shape.iter().map(ToString::to_string).collect();
            format!("{} {}[{}]", t.name, t.datatype.oip_name(), dims.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn run(cmd: ModelCommand) -> Result<()> {
    let ModelCommand::Inspect {
        file,
        input_shapes,
        json,
        bench,
    } = cmd;
    let bytes = util::read(&file)?;
    let cannot = || format!("cannot read `{}` as an ONNX model", file.display());
    let pins = if input_shapes.is_empty() {
        Vec::new()
    } else {
        let inputs = outpost_inference::graph_inputs(&bytes)
            .map_err(anyhow::Error::msg)
            .with_context(cannot)?;
        crate::onnx_spec::pin(inputs, &input_shapes)?
    };
    let i = outpost_inference::inspect(&bytes, &pins)
        .map_err(anyhow::Error::msg)
        .with_context(cannot)?;
    let costs = if bench {
        Some(batch_costs(&bytes, &pins))
    } else {
        None
    };
    if json {
        let doc = serde_json::json!({
            "producer": i.producer,
            "opsets": i.opsets,
            "inputs": i.inputs,
            "outputs": i.outputs.as_ref().ok(),
            "load_error": i.outputs.as_ref().err(),
            "repairs": i.repairs,
            "operators": i.operators,
            "unsupported": i.unsupported,
            "parameters": i.parameters,
            "parameter_bytes": i.parameter_bytes,
            "batch_cost_us": costs.as_ref().map(|c| match c {
                Ok(c) => serde_json::json!(c
                    .iter()
                    .map(|(n, d)| serde_json::json!({"batch": n, "per_item_us": d.as_secs_f64() * 1e6}))
                    .collect::<Vec<_>>()),
                Err(e) => serde_json::json!({"error": e}),
            }),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("file        {} ({} bytes)", file.display(), bytes.len());
    if !i.producer.is_empty() {
        println!("producer    {}", i.producer);
    }
    let opsets: Vec<String> = i
        .opsets
        .iter()
        .map(|(d, v)| {
            format!("{}{v}", if d.is_empty() { "ai.onnx " } else { d }).replace(".ml", ".ml ")
        })
        .collect();
    println!("opsets      {}", opsets.join(", "));
    println!("inputs      {}", tensors(&i.inputs));
    match &i.outputs {
        Ok(outputs) => println!("outputs     {}", tensors(outputs)),
        Err(e) => {
            println!("outputs     tract cannot type the graph with these inputs:");
            println!("              {e}");
            if i.unsupported.is_empty() {
                println!(
                    "            (a dimension left open is often the cause: pin it with \
                     --input-shape INPUT=D1,D2,...)"
                );
            } else {
                println!(
                    "            (tract has no {}: export the model without it, e.g. with \
                     another converter option or opset, or keep that step in a guest)",
                    i.unsupported.join(", ")
                );
            }
        }
    }
    for r in &i.repairs {
        println!("repaired    {r}");
    }
    let ops: Vec<String> = i
        .operators
        .iter()
        .map(|(op, n)| format!("{op}×{n}"))
        .collect();
    println!("operators   {}", ops.join(" "));
    if !i.unsupported.is_empty() {
        println!(
            "unsupported {} (tract cannot run these)",
            i.unsupported.join(", ")
        );
    }
    println!(
        "weights     {} parameters, {} bytes",
        i.parameters, i.parameter_bytes
    );
    match &costs {
        None => {}
        Some(Err(e)) => println!("batching    cannot time batches: {e}"),
        Some(Ok(costs)) => {
            let base = costs.first().map_or(1.0, |c| c.1.as_secs_f64());
            println!("batching    tract, one thread, cost per item (× batch 1):");
            for (n, cost) in costs {
                println!(
                    "              batch {n:<2} {:>10.1} µs  {:.2}×",
                    cost.as_secs_f64() * 1e6,
                    cost.as_secs_f64() / base
                );
            }
            let best = costs
                .iter()
                .map(|c| c.1.as_secs_f64() / base)
                .fold(f64::INFINITY, f64::min);
            println!(
                "            {}",
                if best < 0.8 {
                    "batching lowers the backend's cost per item: [serving.batching] can pay \
                     under concurrent load"
                } else {
                    "batching does not lower the backend's cost per item: leave \
                     [serving.batching] off (concurrent batch-1 runs use the cores)"
                }
            );
        }
    }
    Ok(())
}

/// The model's cost per item at batch 1, 2, 4 and 8, loaded with `pins` (the first dimension
/// left open); why not, when it cannot be timed.
fn batch_costs(
    bytes: &[u8],
    pins: &[TensorSpec],
) -> std::result::Result<Vec<(u64, std::time::Duration)>, String> {
    use outpost_bundle::manifest::Dim;
    // A pinned first dimension is opened again: the batch is what is being varied.
    let open: Vec<TensorSpec> = pins
        .iter()
        .cloned()
        .map(|mut t| {
            if let Some(first) = t.shape.first_mut() {
                *first = Dim::Symbolic("batch".into());
            }
            t
        })
        .collect();
    let model = outpost_inference::default_backend()
        .load(bytes, &open)
        .map_err(|e| e.to_string())?;
    outpost_inference::batch::per_item_cost(
        model.as_ref(),
        &[1, 2, 4, 8],
        std::time::Duration::from_millis(500),
    )
    .map_err(|e| e.to_string())
}
