//! ONNX models run natively with tract: loaded and optimised once per bundle version, shared
//! by every request.

use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use std::sync::Arc;

use tract_onnx::tract_hir::infer::Factoid;

use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTValue, TDim,
    TValue, TVec, Tensor as TractTensor, TypedRunnableModel, f16,
};

use crate::tensor::Tensor;

/// One input or output of a model.
#[derive(Debug, Clone)]
pub struct Port {
    /// Name in the ONNX graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; `None` for a symbolic one.
    pub shape: Vec<Option<u64>>,
}

/// A loaded, optimised, runnable model. Cheap to share across threads.
#[derive(Debug)]
pub struct OnnxModel {
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

fn datatype(dt: DatumType) -> Option<DataType> {
    Some(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::U8,
        DatumType::U16 => DataType::U16,
        DatumType::U32 => DataType::U32,
        DatumType::U64 => DataType::U64,
        DatumType::I8 => DataType::I8,
        DatumType::I16 => DataType::I16,
        DatumType::I32 => DataType::I32,
        DatumType::I64 => DataType::I64,
        DatumType::F16 => DataType::F16,
        DatumType::F32 => DataType::F32,
        DatumType::F64 => DataType::F64,
        _ => return None,
    })
}

fn dims(shape: impl Iterator<Item = TDim>) -> Vec<Option<u64>> {
    shape
        .map(|d| d.to_i64().ok().and_then(|v| u64::try_from(v).ok()))
        .collect()
}

impl OnnxModel {
    /// Loads, type-checks and optimises a model from its bytes.
    pub fn load(bytes: &[u8]) -> Result<Self, String> {
        let mut model = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true)
            .model_for_read(&mut &bytes[..])
            .map_err(|e| format!("{e:#}"))?;
        // Pin every input's fact: a named or unknown dimension becomes a symbol, so one
        // optimised plan serves any batch size.
        let symbols = model.symbols.clone();
        for i in 0..model.input_outlets().map_err(|e| format!("{e:#}"))?.len() {
            let fact = model.input_fact(i).map_err(|e| format!("{e:#}"))?.clone();
            let dt = fact
                .datum_type
                .concretize()
                .ok_or_else(|| format!("input {i} has no element type"))?;
            if fact.shape.is_open() {
                return Err(format!("input {i} has no fixed rank"));
            }
            let dims: TVec<TDim> = fact
                .shape
                .dims()
                .enumerate()
                .map(|(j, d)| {
                    d.concretize()
                        .unwrap_or_else(|| symbols.sym(&format!("in{i}_{j}")).into())
                })
                .collect();
            model
                .set_input_fact(i, InferenceFact::dt_shape(dt, dims))
                .map_err(|e| format!("{e:#}"))?;
        }
        let typed = model.into_typed().map_err(|e| format!("{e:#}"))?;
        let port = |outlet: tract_onnx::prelude::OutletId, name: String| -> Result<Port, String> {
            let fact = typed.outlet_fact(outlet).map_err(|e| format!("{e:#}"))?;
            Ok(Port {
                datatype: datatype(fact.datum_type).ok_or_else(|| {
                    format!("`{name}` has unsupported type {:?}", fact.datum_type)
                })?,
                shape: dims(fact.shape.iter().cloned()),
                name,
            })
        };
        let mut inputs = Vec::new();
        for &o in typed.input_outlets().map_err(|e| format!("{e:#}"))? {
            inputs.push(port(o, typed.node(o.node).name.clone())?);
        }
        let mut outputs = Vec::new();
        for &o in typed.output_outlets().map_err(|e| format!("{e:#}"))? {
            let name = typed
                .outlet_label(o)
                .map(str::to_owned)
                .unwrap_or_else(|| typed.node(o.node).name.clone());
            outputs.push(port(o, name)?);
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("{e:#}"))?;
        Ok(Self {
            plan,
            inputs,
            outputs,
        })
    }

    /// Checks a declared signature (a bundle spec's) against the graph: the same inputs and
    /// outputs, in order, by name, element type and rank; a dimension the graph fixes must be
    /// declared with that size, and a declared size must fit the graph. An empty list declares
    /// nothing and is not checked.
    pub fn check_signature(
        &self,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<(), String> {
        check_ports("input", &self.inputs, inputs)?;
        check_ports("output", &self.outputs, outputs)
    }

    /// The model's inputs.
    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    /// The model's outputs.
    pub fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    /// Runs the model. Inputs are matched by name, or by position when every name is empty.
    /// Errors are the caller's fault (wrong names, types or shapes) or the model's, as text.
    pub fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, String> {
        if inputs.len() != self.inputs.len() {
            return Err(format!(
                "model takes {} inputs ({}), got {}",
                self.inputs.len(),
                self.inputs
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                inputs.len()
            ));
        }
        let by_position = inputs.iter().all(|t| t.name.is_empty());
        let mut ordered: Vec<Option<Tensor>> = vec![None; self.inputs.len()];
        for (i, t) in inputs.into_iter().enumerate() {
            let slot = if by_position {
                i
            } else {
                self.inputs
                    .iter()
                    .position(|p| p.name == t.name)
                    .ok_or_else(|| format!("model has no input `{}`", t.name))?
            };
            if ordered[slot].is_some() {
                return Err(format!("input `{}` given twice", t.name));
            }
            ordered[slot] = Some(t);
        }
        let mut values: TVec<TValue> = TVec::new();
        for (port, t) in self.inputs.iter().zip(ordered) {
            let t = t.ok_or_else(|| format!("missing input `{}`", port.name))?;
            t.check(cap)?;
            if t.datatype != port.datatype {
                return Err(format!(
                    "input `{}` must be {}, got {}",
                    port.name,
                    port.datatype.oip_name(),
                    t.datatype.oip_name()
                ));
            }
            let fits = t.shape.len() == port.shape.len()
                && t.shape
                    .iter()
                    .zip(&port.shape)
                    .all(|(d, p)| p.is_none_or(|p| p == *d));
            if !fits {
                let want: Vec<String> = port
                    .shape
                    .iter()
                    .map(|d| d.map_or("?".into(), |d| d.to_string()))
                    .collect();
                return Err(format!(
                    "input `{}` must have shape [{}], got {:?}",
                    port.name,
                    want.join(", "),
                    t.shape
                ));
            }
            values.push(to_tract(&t)?.into_tvalue());
        }
        let outputs = self.plan.run(values).map_err(|e| format!("{e:#}"))?;
        let mut result = Vec::with_capacity(outputs.len());
        for (port, value) in self.outputs.iter().zip(outputs) {
            let t = from_tract(&port.name, &value)?;
            if t.data.len() as u64 > cap {
                return Err(format!(
                    "output `{}` is {} bytes, above the limit of {cap}",
                    port.name,
                    t.data.len()
                ));
            }
            result.push(t);
        }
        Ok(result)
    }
}

fn decode<T: Datum + Copy, const N: usize>(
    t: &Tensor,
    from_le: fn([u8; N]) -> T,
) -> Result<TractTensor, String> {
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let values: Vec<T> = t
        .data
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from_le(a)
        })
        .collect();
    TractTensor::from_shape(&shape, &values).map_err(|e| format!("{e:#}"))
}

fn to_tract(t: &Tensor) -> Result<TractTensor, String> {
    match t.datatype {
        DataType::Bool => decode(t, |[b]: [u8; 1]| b != 0),
        DataType::U8 => decode(t, u8::from_le_bytes),
        DataType::U16 => decode(t, u16::from_le_bytes),
        DataType::U32 => decode(t, u32::from_le_bytes),
        DataType::U64 => decode(t, u64::from_le_bytes),
        DataType::I8 => decode(t, i8::from_le_bytes),
        DataType::I16 => decode(t, i16::from_le_bytes),
        DataType::I32 => decode(t, i32::from_le_bytes),
        DataType::I64 => decode(t, i64::from_le_bytes),
        DataType::F16 => decode(t, |b: [u8; 2]| f16::from_bits(u16::from_le_bytes(b))),
        DataType::F32 => decode(t, f32::from_le_bytes),
        DataType::F64 => decode(t, f64::from_le_bytes),
        DataType::Bytes => Err(format!(
            "input `{}`: BYTES tensors cannot feed an ONNX model",
            t.name
        )),
    }
}

fn encode<T: Datum + Copy, const N: usize>(
    t: &TractTensor,
    to_le: fn(T) -> [u8; N],
) -> Result<Vec<u8>, String> {
    let view = t.to_plain_array_view::<T>().map_err(|e| format!("{e:#}"))?;
    Ok(view.iter().flat_map(|&v| to_le(v)).collect())
}

fn from_tract(name: &str, t: &TractTensor) -> Result<Tensor, String> {
    let datatype = datatype(t.datum_type())
        .ok_or_else(|| format!("output `{name}` has unsupported type {:?}", t.datum_type()))?;
    let data = match datatype {
        DataType::Bool => encode(t, |b: bool| [u8::from(b)]),
        DataType::U8 => encode(t, u8::to_le_bytes),
        DataType::U16 => encode(t, u16::to_le_bytes),
        DataType::U32 => encode(t, u32::to_le_bytes),
        DataType::U64 => encode(t, u64::to_le_bytes),
        DataType::I8 => encode(t, i8::to_le_bytes),
        DataType::I16 => encode(t, i16::to_le_bytes),
        DataType::I32 => encode(t, i32::to_le_bytes),
        DataType::I64 => encode(t, i64::to_le_bytes),
        DataType::F16 => encode(t, |v: f16| v.to_bits().to_le_bytes()),
        DataType::F32 => encode(t, f32::to_le_bytes),
        DataType::F64 => encode(t, f64::to_le_bytes),
        DataType::Bytes => Err("BYTES outputs are not supported".into()),
    }?;
    Ok(Tensor {
        name: name.to_owned(),
        datatype,
        shape: t.shape().iter().map(|&d| d as u64).collect(),
        data,
    })
}

fn check_ports(kind: &str, graph: &[Port], declared: &[TensorSpec]) -> Result<(), String> {
    if declared.is_empty() {
        return Ok(());
    }
    let port = |p: &Port| {
        let dims: Vec<String> = p
            .shape
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        format!(
            "`{}` {} [{}]",
            p.name,
            p.datatype.oip_name(),
            dims.join(", ")
        )
    };
    let spec = |t: &TensorSpec| {
        let dims: Vec<String> = t.shape.iter().map(Dim::to_string).collect();
        format!(
            "`{}` {} [{}]",
            t.name,
            t.datatype.oip_name(),
            dims.join(", ")
        )
    };
    let all = || graph.iter().map(port).collect::<Vec<_>>().join(", ");
    if graph.len() != declared.len() {
        return Err(format!(
            "the spec declares {} {kind}s, the model has {}: {}",
            declared.len(),
            graph.len(),
            all()
        ));
    }
    for (g, d) in graph.iter().zip(declared) {
        let dims_fit = g.shape.len() == d.shape.len()
            && g.shape.iter().zip(&d.shape).all(|(g, d)| match (g, d) {
                (Some(g), Dim::Fixed(d)) => g == d,
                (Some(_), Dim::Symbolic(_)) => false,
                (None, _) => true,
            });
        if g.name != d.name || g.datatype != d.datatype || !dims_fit {
            return Err(format!(
                "the spec declares {kind} {}, the model's is {} (the model's {kind}s: {}; \
                 `?` is any size)",
                spec(d),
                port(g),
                all()
            ));
        }
    }
    Ok(())
}
