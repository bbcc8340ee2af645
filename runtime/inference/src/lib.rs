//! Outpost's native inference: the [`Tensor`] every layer passes around, the [`Backend`] and
//! [`Model`] traits a model runtime implements, and tract behind them (feature `tract`, on by
//! default). Owns: loading, describing and running ONNX models. Never imports: wasmtime, the
//! HTTP or MQTT stack, or the device's state.

pub mod batch;
#[cfg(feature = "tract")]
mod external;
#[cfg(feature = "tract")]
mod inspect;
#[cfg(feature = "onnxruntime")]
pub mod onnxruntime;
#[cfg(feature = "tract")]
mod repair;
mod tensor;
#[cfg(feature = "tract")]
mod tract;

use std::sync::Arc;

use outpost_bundle::manifest::{DataType, TensorSpec};

pub use batch::{BatchConfig, BatchStats, Batched};
#[cfg(feature = "tract")]
pub use external::inline_external_data;
#[cfg(feature = "tract")]
pub use inspect::{Inspection, inspect};
pub use tensor::Tensor;
#[cfg(feature = "tract")]
pub use tract::{Tract, graph_inputs, repairs, signature};

/// One input or output of a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Name in the graph.
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions; `None` for a symbolic one.
    pub shape: Vec<Option<u64>>,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| d.map_or("?".into(), |d| d.to_string()))
            .collect();
        write!(
            f,
            "`{}` {} [{}]",
            self.name,
            self.datatype.oip_name(),
            dims.join(", ")
        )
    }
}

/// Why a model could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// Why one run failed: the caller's inputs, or the model itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The inputs do not fit the model (names, count, element types, shapes, sizes): the
    /// caller's fault, reported to clients as a bad request.
    #[error("{0}")]
    Input(String),
    /// The model failed on inputs that fit its signature, or produced an output it may not
    /// return: reported to clients as a server error.
    #[error("{0}")]
    Fault(String),
}

/// A loaded, optimised, runnable model, shared by every request of a bundle version.
pub trait Model: Send + Sync + std::fmt::Debug {
    /// The model's inputs, in order.
    fn inputs(&self) -> &[Port];

    /// The model's outputs, in order.
    fn outputs(&self) -> &[Port];

    /// The backend that runs it (`tract`, `onnxruntime`), for metadata and metrics.
    fn backend(&self) -> &'static str;

    /// Runs the model once. Inputs are matched by name, or by position when every name is
    /// empty; each is checked against its port and against `cap` bytes before it is used, and
    /// every output must fit in `cap` bytes too.
    fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError>;
}

/// A model runtime: turns a model file into a [`Model`].
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A short name for logs and errors (`tract`).
    fn name(&self) -> &'static str;

    /// Loads, type-checks and optimises a model. `declared` are the inputs the bundle declares
    /// for it: when given, they fix the input facts (a dimension the declaration fixes is
    /// optimised for that size); when empty, the graph's own facts are used.
    fn load(&self, bytes: &[u8], declared: &[TensorSpec]) -> Result<Arc<dyn Model>, LoadError>;
}

/// The default backend of this build: tract.
#[cfg(feature = "tract")]
pub fn default_backend() -> Arc<dyn Backend> {
    Arc::new(Tract)
}

/// Checks a declared signature (a bundle's) against a loaded model: the same inputs and
/// outputs, in order, by name, element type and rank; a dimension the model fixes must be
/// declared with that size, and a declared size must fit the model. An empty list declares
/// nothing and is not checked.
pub fn check_signature(
    model: &dyn Model,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
) -> Result<(), String> {
    check_ports("input", model.inputs(), inputs)?;
    check_ports("output", model.outputs(), outputs)
}

fn check_ports(kind: &str, graph: &[Port], declared: &[TensorSpec]) -> Result<(), String> {
    if declared.is_empty() {
        return Ok(());
    }
    let all = || {
        graph
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if graph.len() != declared.len() {
        return Err(format!(
            "the spec declares {} {kind}s, the model has {}: {}",
            declared.len(),
            graph.len(),
            all()
        ));
    }
    use outpost_bundle::manifest::Dim;
    for (g, d) in graph.iter().zip(declared) {
        let dims_fit = g.shape.len() == d.shape.len()
            && g.shape.iter().zip(&d.shape).all(|(g, d)| match (g, d) {
                (Some(g), Dim::Fixed(d)) => g == d,
                (Some(_), Dim::Symbolic(_)) => false,
                (None, _) => true,
            });
        if g.name != d.name || g.datatype != d.datatype || !dims_fit {
            return Err(format!(
                "the spec declares {kind} {d}, the model's is {g} (the model's {kind}s: {}; \
                 `?` is any size)",
                all()
            ));
        }
    }
    Ok(())
}

/// A backend's output, refused as the model's fault when it is larger than `cap` bytes.
pub(crate) fn check_output(t: Tensor, cap: u64) -> Result<Tensor, RunError> {
    if t.data.len() as u64 > cap {
        return Err(RunError::Fault(format!(
            "output `{}` is {} bytes, above the limit of {cap}",
            t.name,
            t.data.len()
        )));
    }
    Ok(t)
}

/// Puts `inputs` in the order of `ports` (by name, or by position when every name is empty)
/// and checks each against its port and `cap`. Backends call this before they run.
pub fn match_inputs(
    ports: &[Port],
    inputs: Vec<Tensor>,
    cap: u64,
) -> Result<Vec<Tensor>, RunError> {
    let input = |m: String| RunError::Input(m);
    if inputs.len() != ports.len() {
        return Err(input(format!(
            "model takes {} inputs ({}), got {}",
            ports.len(),
            ports
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            inputs.len()
        )));
    }
    let by_position = inputs.iter().all(|t| t.name.is_empty());
    let mut ordered: Vec<Option<Tensor>> = vec![None; ports.len()];
    for (i, t) in inputs.into_iter().enumerate() {
        let slot = if by_position {
            i
        } else {
            ports
                .iter()
                .position(|p| p.name == t.name)
                .ok_or_else(|| input(format!("model has no input `{}`", t.name)))?
        };
        if ordered[slot].is_some() {
            return Err(input(format!("input `{}` given twice", t.name)));
        }
        ordered[slot] = Some(t);
    }
    ports
        .iter()
        .zip(ordered)
        .map(|(port, t)| {
            let t = t.ok_or_else(|| input(format!("missing input `{}`", port.name)))?;
            t.check(cap).map_err(input)?;
            if t.datatype != port.datatype {
                return Err(input(format!(
                    "input `{}` must be {}, got {}",
                    port.name,
                    port.datatype.oip_name(),
                    t.datatype.oip_name()
                )));
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
                return Err(input(format!(
                    "input `{}` must have shape [{}], got {:?}",
                    port.name,
                    want.join(", "),
                    t.shape
                )));
            }
            Ok(t)
        })
        .collect()
}
