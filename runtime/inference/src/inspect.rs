//! What an ONNX file holds, as tract sees it: for `outpost model inspect`.

use std::collections::BTreeMap;

use outpost_bundle::manifest::TensorSpec;
use tract_onnx::prelude::Framework;

use crate::LoadError;

/// A report on one ONNX file.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The exporter (`producer_name producer_version`).
    pub producer: String,
    /// Operator sets the file imports, as `(domain, version)` (`""` is the default domain).
    pub opsets: Vec<(String, i64)>,
    /// The graph's inputs, with the pins given.
    pub inputs: Vec<TensorSpec>,
    /// The outputs tract types with those inputs, or why it cannot.
    pub outputs: Result<Vec<TensorSpec>, String>,
    /// The exporter quirks the loader repairs.
    pub repairs: Vec<String>,
    /// Each operator of the main graph with its node count.
    pub operators: BTreeMap<String, usize>,
    /// The operators tract has no implementation for, in the graph as the loader repairs it.
    pub unsupported: Vec<String>,
    /// Weights: elements in the graph's initializers.
    pub parameters: u64,
    /// Their size in bytes.
    pub parameter_bytes: u64,
}

/// Bytes per element of an ONNX tensor data type (0 for variable-size ones).
fn element_bytes(data_type: i32) -> u64 {
    match data_type {
        2 | 3 | 9 => 1,       // UINT8, INT8, BOOL
        4 | 5 | 10 | 16 => 2, // UINT16, INT16, FLOAT16, BFLOAT16
        1 | 6 | 12 => 4,      // FLOAT, INT32, UINT32
        7 | 11 | 13 => 8,     // INT64, DOUBLE, UINT64
        _ => 0,
    }
}

/// Inspects `bytes`; `pins` are the inputs to type the graph with (from
/// [`crate::graph_inputs`], with the shapes the caller wants fixed), or empty for the file's.
pub fn inspect(bytes: &[u8], pins: &[TensorSpec]) -> Result<Inspection, LoadError> {
    let onnx = tract_onnx::onnx();
    let proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| LoadError(format!("not an ONNX model: {e:#}")))?;
    let graph = proto.graph.clone().unwrap_or_default();
    let mut operators = BTreeMap::new();
    for node in &graph.node {
        let name = if node.domain.is_empty() || node.domain == "ai.onnx" {
            node.op_type.clone()
        } else {
            format!("{}.{}", node.domain, node.op_type)
        };
        *operators.entry(name).or_insert(0) += 1;
    }
    // What tract lacks once the loader's repairs are made (a ZipMap or Scaler is no obstacle).
    let mut repaired = proto.clone();
    crate::repair::repair(&mut repaired);
    let mut unsupported: Vec<String> = repaired
        .graph
        .unwrap_or_default()
        .node
        .iter()
        .filter(|n| !onnx.op_register.0.contains_key(&n.op_type))
        .map(|n| n.op_type.clone())
        .collect();
    unsupported.sort();
    unsupported.dedup();
    let (mut parameters, mut parameter_bytes) = (0u64, 0u64);
    for t in &graph.initializer {
        let n = t
            .dims
            .iter()
            .map(|&d| u64::try_from(d).unwrap_or(0))
            .product::<u64>();
        parameters += n;
        parameter_bytes += n * element_bytes(t.data_type);
    }
    let repairs = crate::tract::repairs(bytes)?;
    let inputs = if pins.is_empty() {
        crate::tract::graph_inputs(bytes)?
    } else {
        pins.to_vec()
    };
    let outputs = crate::tract::signature(bytes, &inputs)
        .map(|(_, outputs)| outputs)
        .map_err(|e| e.0);
    Ok(Inspection {
        producer: format!("{} {}", proto.producer_name, proto.producer_version)
            .trim()
            .to_owned(),
        opsets: proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone(), o.version))
            .collect(),
        inputs,
        outputs,
        repairs,
        operators,
        unsupported,
        parameters,
        parameter_bytes,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_report_on_the_digits_model() {
        let i = inspect(outpost_examples::DIGITS_ONNX, &[]).unwrap();
        assert_eq!(i.inputs[0].name, "input");
        let outputs = i.outputs.unwrap();
        assert_eq!(outputs[0].name, "probabilities");
        assert!(
            i.operators.contains_key("Gemm") || i.operators.contains_key("MatMul"),
            "{:?}",
            i.operators
        );
        assert!(i.unsupported.is_empty(), "{:?}", i.unsupported);
        // 64×32 + 32 + 32×10 + 10 weights, FP32.
        assert_eq!(i.parameters, 64 * 32 + 32 + 32 * 10 + 10);
        assert_eq!(i.parameter_bytes, 4 * i.parameters);

        let quirky = inspect(&outpost_examples::graphs::quirky_classifier_onnx(), &[]).unwrap();
        assert!(quirky.unsupported.is_empty(), "the ZipMap is repaired away");
        assert_eq!(quirky.repairs.len(), 2);
        assert!(quirky.outputs.is_ok(), "the repairs make it load");
        assert!(inspect(b"junk", &[]).is_err());
    }
}
