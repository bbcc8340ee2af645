//! The tract backend: ONNX models loaded, typed and optimised once per bundle version, run
//! natively and shared by every request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outpost_bundle::manifest::{DataType, Dim, TensorSpec};

use tract_onnx::tract_hir::infer::Factoid;

use tract_onnx::prelude::{
    Datum, DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable,
    IntoTValue, Symbol, TDim, TValue, TVec, Tensor as TractTensor, TypedModel, TypedRunnableModel,
    f16,
};

use crate::{Backend, LoadError, Model, Port, RunError, Tensor, match_inputs};

/// The tract backend (pure Rust; ONNX operators as tract supports them).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tract;

impl Backend for Tract {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn load(&self, bytes: &[u8], declared: &[TensorSpec]) -> Result<Arc<dyn Model>, LoadError> {
        TractModel::load(bytes, declared)
            .map(|m| Arc::new(m) as Arc<dyn Model>)
            .map_err(LoadError)
    }
}

/// Plans kept per concrete input shape, beyond the symbolic one.
const CONCRETE_PLANS: usize = 4;

/// A loaded, optimised, runnable model. Cheap to share across threads.
#[derive(Debug)]
struct TractModel {
    /// The plan for any size of the open dimensions.
    plan: Arc<TypedRunnableModel>,
    /// The typed graph and, for each input dimension, the symbol it is, when some input
    /// dimension is open: a plan optimised for the sizes a request brings runs much faster
    /// than the symbolic one on convolutions (tract picks its kernels by shape).
    concrete: Option<Concrete>,
    inputs: Vec<Port>,
    outputs: Vec<Port>,
}

#[derive(Debug)]
struct Concrete {
    typed: TypedModel,
    symbols: Vec<Vec<Option<Symbol>>>,
    /// Most recently used first: (the symbols' sizes, the plan made for them).
    plans: Mutex<Vec<(Vec<i64>, Arc<TypedRunnableModel>)>>,
}

impl Concrete {
    /// The plan for inputs shaped `shapes`: one made for those sizes (made now on first use,
    /// at most [`CONCRETE_PLANS`] kept), or `fallback` when the graph cannot be made for them.
    fn plan(
        &self,
        shapes: &[&[u64]],
        fallback: &Arc<TypedRunnableModel>,
    ) -> Arc<TypedRunnableModel> {
        let mut subs = HashMap::new();
        let mut key = Vec::new();
        for (dims, syms) in shapes.iter().zip(&self.symbols) {
            for (&d, sym) in dims.iter().zip(syms) {
                if let Some(sym) = sym {
                    let v = d as i64;
                    if let Some(TDim::Val(seen)) = subs.get(sym) {
                        if *seen != v {
                            // One symbol, two sizes: the symbolic plan says what is wrong.
                            return fallback.clone();
                        }
                        continue;
                    }
                    subs.insert(sym.clone(), TDim::Val(v));
                    key.push(v);
                }
            }
        }
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = plans.iter().position(|(k, _)| *k == key) {
            let hit = plans.remove(i);
            let plan = hit.1.clone();
            plans.insert(0, hit);
            return plan;
        }
        let made = quiet_panics(|| {
            self.typed
                .set_symbols(&subs)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
        });
        let plan = match made {
            Ok(Ok(plan)) => plan,
            // Kept as the answer for these sizes, so a graph that cannot be made concrete is
            // tried once per shape, not per request.
            _ => fallback.clone(),
        };
        plans.insert(0, (key, plan.clone()));
        plans.truncate(CONCRETE_PLANS);
        plan
    }
}

pub(crate) fn datatype(dt: DatumType) -> Option<DataType> {
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
        // tract computes ONNX INT64 values (a `Cast` to INT64, shapes) as dimensions.
        DatumType::TDim => DataType::I64,
        _ => return None,
    })
}

fn dims(shape: impl Iterator<Item = TDim>) -> Vec<Option<u64>> {
    shape
        .map(|d| d.to_i64().ok().and_then(|v| u64::try_from(v).ok()))
        .collect()
}

/// Reads an ONNX model and types it with the declared inputs' facts.
fn typed(bytes: &[u8], declared: &[TensorSpec]) -> Result<TypedModel, String> {
    let mut model = read(bytes)?.0;
    // Pin every input's fact. A dimension the graph leaves open takes the declared size, or
    // becomes a symbol (the declared name, so inputs declared with the same name share it),
    // so one optimised plan serves any batch size.
    let symbols = model.symbols.clone();
    let outlets = model
        .input_outlets()
        .map_err(|e| format!("{e:#}"))?
        .to_vec();
    let count = outlets.len();
    // A declaration that does not name the graph's inputs in order pins nothing (the
    // signature check then says what is wrong with it).
    let names_fit = declared.len() == count
        && outlets
            .iter()
            .zip(declared)
            .all(|(o, d)| model.node(o.node).name == d.name);
    let declared = if names_fit { declared } else { &[] };
    for i in 0..count {
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
                // A number in the graph stays; a named or unknown dimension is open.
                let graph = d.concretize().filter(|d| d.to_i64().is_ok());
                graph.unwrap_or_else(
                    || match declared.get(i).and_then(|spec| spec.shape.get(j)) {
                        Some(Dim::Fixed(n)) => TDim::Val(*n as i64),
                        Some(Dim::Symbolic(name)) => symbols.sym(name).into(),
                        None => d
                            .concretize()
                            .unwrap_or_else(|| symbols.sym(&format!("in{i}_{j}")).into()),
                    },
                )
            })
            .collect();
        model
            .set_input_fact(i, InferenceFact::dt_shape(dt, dims))
            .map_err(|e| format!("{e:#}"))?;
    }
    model.into_typed().map_err(|e| format!("{e:#}"))
}

/// Reads an ONNX file as tract's inference model, after the known exporter quirks are
/// repaired ([`repairs`] lists them). Shapes and types the file gives its outputs and
/// intermediate values are ignored: tract infers them, and exporters get them wrong.
fn read(bytes: &[u8]) -> Result<(InferenceModel, Vec<String>), String> {
    let onnx = tract_onnx::onnx()
        .with_ignore_output_shapes(true)
        .with_ignore_value_info(true);
    let mut proto = onnx
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| format!("not an ONNX model: {e:#}"))?;
    let repairs = crate::repair::repair(&mut proto);
    let model = onnx
        .model_for_proto_model(&proto)
        .map_err(|e| format!("{e:#}"))?;
    Ok((model, repairs))
}

/// The exporter quirks the loader repairs in this ONNX file, one line each (empty when there
/// are none). `bundle build` records them in the manifest.
pub fn repairs(bytes: &[u8]) -> Result<Vec<String>, LoadError> {
    read(bytes).map(|(_, r)| r).map_err(LoadError)
}

/// The inputs an ONNX file declares, before any typing: names, element types and shapes (a
/// dimension the file leaves open is symbolic: by its name in the file, else `batch` for the
/// first and `NAME_J` for the others). A
/// caller changes the shapes it wants pinned and passes them to [`signature`] or a load.
pub fn graph_inputs(bytes: &[u8]) -> Result<Vec<TensorSpec>, LoadError> {
    let err = |e: tract_onnx::prelude::TractError| LoadError(format!("{e:#}"));
    let model = read(bytes).map_err(LoadError)?.0;
    let mut inputs = Vec::new();
    for (i, outlet) in model.input_outlets().map_err(err)?.iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let fact = model.input_fact(i).map_err(err)?;
        let datatype = fact
            .datum_type
            .concretize()
            .and_then(datatype)
            .ok_or_else(|| LoadError(format!("input `{name}` has no supported element type")))?;
        if fact.shape.is_open() {
            return Err(LoadError(format!("input `{name}` has no fixed rank")));
        }
        let shape = fact
            .shape
            .dims()
            .enumerate()
            .map(|(j, d)| match d.concretize() {
                Some(TDim::Val(n)) if n >= 0 => Dim::Fixed(n as u64),
                Some(TDim::Sym(s)) => Dim::Symbolic(s.to_string()),
                // An unnamed leading dimension is, by convention, the batch.
                _ if j == 0 => Dim::Symbolic("batch".into()),
                _ => Dim::Symbolic(format!("{name}_{j}")),
            })
            .collect();
        inputs.push(TensorSpec {
            name,
            datatype,
            shape,
        });
    }
    Ok(inputs)
}

/// The signature of an ONNX model as a device would load it with `declared` inputs: each
/// input and output with its element type and shape (a symbolic dimension by its name in the
/// graph, or `NAME_J` when the graph leaves it unnamed).
pub fn signature(
    bytes: &[u8],
    declared: &[TensorSpec],
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), LoadError> {
    let typed = typed(bytes, declared).map_err(LoadError)?;
    let spec =
        |outlet: tract_onnx::prelude::OutletId, name: String| -> Result<TensorSpec, LoadError> {
            let fact = typed
                .outlet_fact(outlet)
                .map_err(|e| LoadError(format!("{e:#}")))?;
            let datatype = datatype(fact.datum_type).ok_or_else(|| {
                LoadError(format!(
                    "`{name}` has unsupported type {:?}",
                    fact.datum_type
                ))
            })?;
            let shape = fact
                .shape
                .iter()
                .enumerate()
                .map(|(j, d)| match d.to_i64() {
                    Ok(n) => Dim::Fixed(u64::try_from(n).unwrap_or(0)),
                    Err(_) => match d {
                        TDim::Sym(s) => Dim::Symbolic(s.to_string()),
                        _ => Dim::Symbolic(format!("{name}_{j}")),
                    },
                })
                .collect();
            Ok(TensorSpec {
                name,
                datatype,
                shape,
            })
        };
    let mut inputs = Vec::new();
    for &o in typed
        .input_outlets()
        .map_err(|e| LoadError(format!("{e:#}")))?
    {
        inputs.push(spec(o, typed.node(o.node).name.clone())?);
    }
    let mut outputs = Vec::new();
    for &o in typed
        .output_outlets()
        .map_err(|e| LoadError(format!("{e:#}")))?
    {
        let name = typed
            .outlet_label(o)
            .map(str::to_owned)
            .unwrap_or_else(|| typed.node(o.node).name.clone());
        outputs.push(spec(o, name)?);
    }
    Ok((inputs, outputs))
}

impl TractModel {
    fn load(bytes: &[u8], declared: &[TensorSpec]) -> Result<Self, String> {
        let typed = typed(bytes, declared)?;
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
        let mut symbols = Vec::new();
        for &o in typed.input_outlets().map_err(|e| format!("{e:#}"))? {
            let fact = typed.outlet_fact(o).map_err(|e| format!("{e:#}"))?;
            symbols.push(
                fact.shape
                    .iter()
                    .map(|d| match d {
                        TDim::Sym(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let open = symbols.iter().flatten().any(Option::is_some);
        let concrete = open.then(|| Concrete {
            typed: typed.clone(),
            symbols,
            plans: Mutex::new(Vec::new()),
        });
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("{e:#}"))?;
        Ok(Self {
            plan,
            concrete,
            inputs,
            outputs,
        })
    }
}

impl Model for TractModel {
    fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    fn backend(&self) -> &'static str {
        "tract"
    }

    fn outputs(&self) -> &[Port] {
        &self.outputs
    }

    fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError> {
        let inputs = match_inputs(&self.inputs, inputs, cap)?;
        let plan = match &self.concrete {
            None => self.plan.clone(),
            Some(c) => {
                let shapes: Vec<&[u64]> = inputs.iter().map(|t| &t.shape[..]).collect();
                c.plan(&shapes, &self.plan)
            }
        };
        let mut values: TVec<TValue> = TVec::new();
        for t in inputs {
            values.push(to_tract(&t).map_err(RunError::Input)?.into_tvalue());
        }
        let fault = RunError::Fault;
        // tract panics on some inputs that fit the graph (a Gather index beyond its table):
        // that is the model failing, and it must not take the serving thread with it. The plan
        // is immutable and each run makes its own state, so nothing is left half-changed.
        let run = quiet_panics(|| plan.run(values));
        let outputs = match run {
            Ok(result) => result.map_err(|e| fault(format!("{e:#}")))?,
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                return Err(fault(format!("the model panicked: {reason}")));
            }
        };
        let mut result = Vec::with_capacity(outputs.len());
        for (port, value) in self.outputs.iter().zip(outputs) {
            let t = from_tract(&port.name, &value).map_err(fault)?;
            result.push(crate::check_output(t, cap)?);
        }
        Ok(result)
    }
}

thread_local! {
    /// Set while this thread runs a model under [`quiet_panics`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic in it without the panic hook's report on stderr (and without
/// the backtrace it symbolises when `RUST_BACKTRACE` is set, which takes long enough to miss
/// a request's deadline): the caller turns the panic into an error the request answers with.
/// Panics elsewhere, on any thread, still reach the hook that was installed before.
fn quiet_panics<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    result
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

/// The tract datum type of a packed fixed-width element type (not BYTES).
fn datum(dt: DataType) -> Option<DatumType> {
    Some(match dt {
        DataType::Bool => DatumType::Bool,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::F16 => DatumType::F16,
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::Bytes => return None,
    })
}

fn to_tract(t: &Tensor) -> Result<TractTensor, String> {
    // On a little-endian machine the packed elements are tract's own bytes: one copy. A bool
    // is any non-zero byte on the wire but must be 0 or 1 in tract, so it is decoded.
    if cfg!(target_endian = "little")
        && t.datatype != DataType::Bool
        && let Some(dt) = datum(t.datatype)
    {
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let mut tensor = TractTensor::zero_dt(dt, &shape).map_err(|e| format!("{e:#}"))?;
        let bytes = tensor.as_bytes_mut();
        if bytes.len() != t.data.len() {
            return Err(format!(
                "input `{}`: shape {:?} needs {} bytes, got {}",
                t.name,
                t.shape,
                bytes.len(),
                t.data.len()
            ));
        }
        bytes.copy_from_slice(&t.data);
        return Ok(tensor);
    }
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
    if t.datum_type() == DatumType::TDim {
        let t = t
            .cast_to::<i64>()
            .map_err(|e| format!("output `{name}`: {e:#}"))?;
        return from_tract(name, &t);
    }
    let datatype = datatype(t.datum_type())
        .ok_or_else(|| format!("output `{name}` has unsupported type {:?}", t.datum_type()))?;
    if cfg!(target_endian = "little") && datatype != DataType::Bytes {
        // Fixed-width elements, tract's bytes already as the wire packs them (a bool is 0 or
        // 1 in both).
        return Ok(Tensor {
            name: name.to_owned(),
            datatype,
            shape: t.shape().iter().map(|&d| d as u64).collect(),
            data: t.as_bytes().to_vec(),
        });
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use outpost_examples::graphs::{lookup_onnx, quirky_classifier_onnx, reshape_onnx};

    use super::*;

    fn floats(name: &str, values: &[f32]) -> Tensor {
        Tensor {
            name: name.into(),
            datatype: DataType::F32,
            shape: vec![values.len() as u64],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn ids(values: &[i64]) -> Tensor {
        Tensor {
            name: "ids".into(),
            datatype: DataType::I64,
            shape: vec![values.len() as u64],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn a_model_failing_on_inputs_that_fit_is_a_fault_not_bad_input() {
        let model = Tract.load(&lookup_onnx(), &[]).unwrap();
        let out = model.run(vec![ids(&[2, 0])], 1 << 20).unwrap();
        let values: Vec<f32> = out[0]
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [30.0, 10.0]);
        let err = model.run(vec![ids(&[7])], 1 << 20).unwrap_err();
        assert!(matches!(err, RunError::Fault(_)), "{err:?}");
        // The caller's mistakes are input errors.
        let mut renamed = ids(&[1]);
        renamed.name = "z".into();
        let err = model.run(vec![renamed], 1 << 20).unwrap_err();
        assert!(matches!(err, RunError::Input(_)), "{err:?}");
        let err = model.run(vec![floats("ids", &[1.0])], 1 << 20).unwrap_err();
        assert!(
            matches!(&err, RunError::Input(m) if m.contains("must be INT64")),
            "{err:?}"
        );
        let err = model.run(vec![ids(&[0; 64])], 16).unwrap_err();
        assert!(matches!(err, RunError::Input(_)), "{err:?}");
    }

    #[test]
    fn a_scikit_learn_scaler_and_an_integer_label_load_and_run() {
        let model = Tract
            .load(&outpost_examples::graphs::scaled_labeler_onnx(), &[])
            .unwrap();
        assert_eq!(model.outputs()[1].datatype, DataType::I64);
        let mut x = floats("x", &[3.0, 2.0, 1.0, 6.0]);
        x.shape = vec![2, 2];
        let out = model.run(vec![x], 1 << 20).unwrap();
        let scaled: Vec<f32> = out[0]
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // (x - offset) * scale, per column.
        assert_eq!(scaled, [4.0, 0.0, 0.0, 2.0]);
        assert_eq!(out[1].datatype, DataType::I64);
        assert_eq!(out[1].shape, vec![2]);
        let labels: Vec<i64> = out[1]
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(labels, [0, 1]);
        assert_eq!(
            repairs(&outpost_examples::graphs::scaled_labeler_onnx()).unwrap(),
            ["rewrote 1 ai.onnx.ml Scaler node(s) as Sub and Mul"]
        );
    }

    #[test]
    fn open_dimensions_get_a_plan_per_size_bounded_and_answering_alike() {
        let model = TractModel::load(outpost_examples::DIGITS_ONNX, &[]).unwrap();
        let concrete = model.concrete.as_ref().expect("the batch is open");
        let row =
            |i: usize| -> Vec<f32> { (0..64).map(|j| ((i + j) % 17) as f32 / 16.0).collect() };
        let run = |rows: usize| {
            let mut t = floats("input", &(0..rows).flat_map(row).collect::<Vec<_>>());
            t.shape = vec![rows as u64, 64];
            model.run(vec![t], 1 << 20).unwrap()[0].data.clone()
        };
        let one: Vec<u8> = (0..6)
            .flat_map(|i| {
                let mut t = floats("input", &row(i));
                t.shape = vec![1, 64];
                model.run(vec![t], 1 << 20).unwrap()[0].data.clone()
            })
            .collect();
        for rows in 1..=6 {
            let got = run(rows);
            let want = &one[..got.len()];
            for (g, w) in got.chunks_exact(4).zip(want.chunks_exact(4)) {
                let (g, w) = (
                    f32::from_le_bytes(g.try_into().unwrap()),
                    f32::from_le_bytes(w.try_into().unwrap()),
                );
                assert!((g - w).abs() < 1e-6, "{rows} rows: {g} vs {w}");
            }
        }
        // Six sizes seen, the last four kept, most recent first.
        let plans = concrete.plans.lock().unwrap();
        let kept: Vec<i64> = plans.iter().map(|(k, _)| k[0]).collect();
        assert_eq!(kept, [6, 5, 4, 3]);
        drop(plans);
        // A graph whose inputs are all fixed has only its one plan.
        let pinned = vec![TensorSpec {
            name: "input".into(),
            datatype: DataType::F32,
            shape: vec![Dim::Fixed(1), Dim::Fixed(64)],
        }];
        assert!(
            TractModel::load(outpost_examples::DIGITS_ONNX, &pinned)
                .unwrap()
                .concrete
                .is_none()
        );
    }

    #[test]
    fn declared_inputs_pin_the_open_dimensions() {
        let err = Tract.load(&reshape_onnx(), &[]).unwrap_err();
        assert!(err.0.contains("Reshape"), "{err}");
        let declared: Vec<TensorSpec> = vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::F32,
            shape: vec![Dim::Fixed(4)],
        }];
        let model = Tract.load(&reshape_onnx(), &declared).unwrap();
        assert_eq!(model.inputs()[0].shape, vec![Some(4)]);
        assert_eq!(model.outputs()[0].shape, vec![Some(2), Some(2)]);
        let out = model.run(vec![floats("x", &[1.0; 4])], 1 << 20).unwrap();
        assert_eq!(out[0].shape, vec![2, 2]);
        let err = model
            .run(vec![floats("x", &[1.0; 6])], 1 << 20)
            .unwrap_err();
        assert!(matches!(err, RunError::Input(_)), "{err:?}");
        // A declaration naming other inputs pins nothing.
        let other = vec![TensorSpec {
            name: "w".into(),
            ..declared[0].clone()
        }];
        assert!(Tract.load(&reshape_onnx(), &other).is_err());
    }

    #[test]
    fn the_signature_keeps_the_graphs_dimension_names_and_takes_pins() {
        let digits = outpost_examples::DIGITS_ONNX;
        let (inputs, outputs) = signature(digits, &[]).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].name, "input");
        assert_eq!(inputs[0].datatype, DataType::F32);
        assert!(matches!(inputs[0].shape[0], Dim::Symbolic(_)), "{inputs:?}");
        assert_eq!(inputs[0].shape[1], Dim::Fixed(64));
        assert_eq!(outputs[0].name, "probabilities");
        assert_eq!(outputs[0].shape[1], Dim::Fixed(10));
        // The batch dimension is the same symbol on both sides.
        assert_eq!(outputs[0].shape[0], inputs[0].shape[0]);

        let pinned = vec![TensorSpec {
            shape: vec![Dim::Fixed(1), Dim::Fixed(64)],
            ..inputs[0].clone()
        }];
        let (inputs, outputs) = signature(digits, &pinned).unwrap();
        assert_eq!(inputs[0].shape, [Dim::Fixed(1), Dim::Fixed(64)]);
        assert_eq!(outputs[0].shape, [Dim::Fixed(1), Dim::Fixed(10)]);
        assert!(signature(b"not onnx", &[]).is_err());
    }

    #[test]
    fn graph_inputs_read_a_model_that_only_types_once_pinned() {
        let bytes = reshape_onnx();
        let mut inputs = graph_inputs(&bytes).unwrap();
        assert_eq!(inputs.len(), 1);
        assert_eq!(inputs[0].name, "x");
        assert_eq!(
            inputs[0].shape,
            [Dim::Symbolic("n".into())],
            "the name in the file"
        );
        assert!(
            signature(&bytes, &inputs).is_err(),
            "open, the Reshape does not type"
        );
        inputs[0].shape = vec![Dim::Fixed(4)];
        let (_, outputs) = signature(&bytes, &inputs).unwrap();
        assert_eq!(outputs[0].shape, [Dim::Fixed(2), Dim::Fixed(2)]);
        assert!(graph_inputs(b"\x08\x07junk").is_err());
    }

    #[test]
    fn exporter_quirks_are_repaired_and_listed() {
        let bytes = quirky_classifier_onnx();
        let made = repairs(&bytes).unwrap();
        assert_eq!(made.len(), 2, "{made:?}");
        assert!(made[0].contains("renamed 2 node(s)"), "{made:?}");
        assert!(made[1].contains("ZipMap after `probabilities`"), "{made:?}");
        let model = Tract.load(&bytes, &[]).unwrap();
        assert_eq!(model.outputs()[0].name, "output_probability");
        assert_eq!(model.outputs()[0].datatype, DataType::F32);
        let x = Tensor {
            name: "x".into(),
            datatype: DataType::F32,
            shape: vec![1, 2],
            data: [1.0f32, 1.0].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let out = model.run(vec![x], 1 << 20).unwrap();
        let p: Vec<f32> = out[0]
            .data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // softmax([2, 3])
        let e = (-1.0f32).exp();
        assert!((p[0] - e / (1.0 + e)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - 1.0 / (1.0 + e)).abs() < 1e-6, "{p:?}");
        // A clean graph needs none.
        assert!(repairs(&reshape_onnx()).unwrap().is_empty());
    }
}
