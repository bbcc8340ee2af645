//! Known exporter quirks, repaired in an ONNX graph before tract reads it. Each repair is
//! deterministic, so `bundle build` (which records them in the manifest) and a device (which
//! loads the file as signed) make the same graph from the same bytes.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, TensorProto, attribute_proto, tensor_proto,
};

/// Repairs `model` in place; returns one line per repair made, for the manifest and the user.
pub(crate) fn repair(model: &mut ModelProto) -> Vec<String> {
    let mut done = Vec::new();
    let Some(graph) = model.graph.as_mut() else {
        return done;
    };

    // Several nodes with one name (some converters reuse a name for every node they emit):
    // tract needs node names to be unique. Later ones get a numbered suffix.
    let mut taken: HashSet<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut renamed = 0;
    for node in &mut graph.node {
        if node.name.is_empty() {
            continue;
        }
        let count = seen.entry(node.name.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            let mut k = *count;
            let mut name = format!("{}__{k}", node.name);
            while taken.contains(&name) {
                k += 1;
                name = format!("{}__{k}", node.name);
            }
            taken.insert(name.clone());
            node.name = name;
            renamed += 1;
        }
    }
    if renamed > 0 {
        done.push(format!(
            "renamed {renamed} node(s) whose name another node had"
        ));
    }

    // A trailing ZipMap (scikit-learn exports through skl2onnx end with one by default): it
    // turns the probability tensor into a sequence of maps, which tract does not run and an
    // OIP client cannot receive. Dropped; the output keeps its name and is the tensor.
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    while let Some(i) = graph.node.iter().position(|n| {
        n.op_type == "ZipMap"
            && n.input.len() == 1
            && n.output.len() == 1
            && outputs.contains(&n.output[0])
    }) {
        let node = graph.node.remove(i);
        let (from, to) = (node.input[0].clone(), node.output[0].clone());
        for n in &mut graph.node {
            for name in n.input.iter_mut().chain(n.output.iter_mut()) {
                if *name == from {
                    name.clone_from(&to);
                }
            }
        }
        for o in &mut graph.output {
            if o.name == to {
                // Its declared type was the sequence of maps; tract infers the tensor's.
                o.r#type = None;
            }
        }
        graph.value_info.retain(|v| v.name != from && v.name != to);
        done.push(format!(
            "dropped the ZipMap after `{from}`: output `{to}` is the probability tensor"
        ));
    }

    // `ai.onnx.ml` Scaler (skl2onnx's StandardScaler, MinMaxScaler, ...): `y = (x - offset) *
    // scale`, which tract does not implement. Rewritten as the standard Sub and Mul it is.
    let mut scalers = 0;
    let mut i = 0;
    while i < graph.node.len() {
        let node = &graph.node[i];
        if node.op_type != "Scaler" || node.input.len() != 1 || node.output.len() != 1 {
            i += 1;
            continue;
        }
        let floats = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name == name)
                .map(|a| a.floats.clone())
                .unwrap_or_default()
        };
        let (offset, scale) = (floats("offset"), floats("scale"));
        let (input, output) = (node.input[0].clone(), node.output[0].clone());
        let base = format!("{output}__scaler");
        let constant = |suffix: &str, values: Vec<f32>| TensorProto {
            name: format!("{base}_{suffix}"),
            dims: vec![values.len() as i64],
            data_type: tensor_proto::DataType::Float as i32,
            float_data: values,
            ..Default::default()
        };
        let op = |op: &str, inputs: [String; 2], output: String| NodeProto {
            name: format!("{base}_{}", op.to_lowercase()),
            op_type: op.into(),
            input: inputs.into(),
            output: vec![output],
            ..Default::default()
        };
        // Scaler takes integers and doubles too, and always gives floats.
        let cast = NodeProto {
            name: format!("{base}_cast"),
            op_type: "Cast".into(),
            input: vec![input],
            output: vec![format!("{base}_float")],
            attribute: vec![AttributeProto {
                name: "to".into(),
                r#type: attribute_proto::AttributeType::Int as i32,
                i: tensor_proto::DataType::Float as i64,
                ..Default::default()
            }],
            ..Default::default()
        };
        let shifted = format!("{base}_shifted");
        let sub = op(
            "Sub",
            [format!("{base}_float"), format!("{base}_offset")],
            shifted.clone(),
        );
        let mul = op("Mul", [shifted, format!("{base}_scale")], output);
        // An empty attribute means no shift or no scaling.
        let offset = if offset.is_empty() { vec![0.0] } else { offset };
        let scale = if scale.is_empty() { vec![1.0] } else { scale };
        graph.initializer.push(constant("offset", offset));
        graph.initializer.push(constant("scale", scale));
        graph.node.splice(i..=i, [cast, sub, mul]);
        scalers += 1;
        i += 3;
    }
    if scalers > 0 {
        done.push(format!(
            "rewrote {scalers} ai.onnx.ml Scaler node(s) as Sub and Mul"
        ));
    }
    done
}
