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
            println!(
                "            (a dimension left open is often the cause: pin it with \
                 --input-shape INPUT=D1,D2,...)"
            );
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
        let repaired = i.outputs.is_ok();
        println!(
            "unsupported {}{}",
            i.unsupported.join(", "),
            if repaired {
                " (removed by the repairs above)"
            } else {
                " (tract cannot run these)"
            }
        );
    }
    println!(
        "weights     {} parameters, {} bytes",
        i.parameters, i.parameter_bytes
    );
    Ok(())
}
