//! `outpost bundle build --from-mlflow DIR`: an MLflow model directory with the `onnx` flavor
//! (`MLmodel`, the ONNX file it names, the external data files beside it) read for a bundle
//! with the generic guest. The signature's tensors become the declared inputs and are checked
//! against the graph; the run id, model uuid and MLflow version go in the manifest's metadata.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use yaml_rust2::{Yaml, YamlLoader};

/// One tensor of an MLflow tensor signature.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SigTensor {
    /// Its name, when the signature gives one (a single unnamed tensor is common).
    pub name: Option<String>,
    /// The element type.
    pub datatype: DataType,
    /// Dimensions, `-1` for any size.
    pub shape: Vec<i64>,
}

impl std::fmt::Display for SigTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        write!(
            f,
            "`{}` {} [{}]",
            self.name.as_deref().unwrap_or("(unnamed)"),
            self.datatype.oip_name(),
            dims.join(", ")
        )
    }
}

/// What an MLflow model directory gives a bundle.
#[derive(Debug)]
pub(crate) struct MlflowModel {
    /// The ONNX model with its external data moved inside.
    pub onnx: Vec<u8>,
    /// The external data files that were read.
    pub data_files: Vec<PathBuf>,
    /// The signature's inputs and outputs, when it is a tensor signature.
    pub inputs: Option<Vec<SigTensor>>,
    /// See `inputs`.
    pub outputs: Option<Vec<SigTensor>>,
    /// `run_id`, `model_uuid` and `mlflow_version`, those the `MLmodel` file has.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Reads the MLflow model in `dir`.
pub(crate) fn read(dir: &Path) -> Result<MlflowModel> {
    let path = dir.join("MLmodel");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "`{}` is not an MLflow model directory: cannot read its MLmodel file",
            dir.display()
        )
    })?;
    let docs = YamlLoader::load_from_str(&text)
        .with_context(|| format!("`{}` is not valid YAML", path.display()))?;
    let Some(doc) = docs.first() else {
        bail!("`{}` is empty", path.display());
    };
    let flavors = &doc["flavors"];
    let onnx = &flavors["onnx"];
    if onnx.is_badvalue() {
        let names: Vec<&str> = flavors
            .as_hash()
            .map(|h| h.keys().filter_map(Yaml::as_str).collect())
            .unwrap_or_default();
        bail!(
            "`{}` has no onnx flavor (its flavors: {}): save the model with \
             mlflow.onnx.save_model or log_model, from an ONNX export of it",
            path.display(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
    }
    let Some(data) = onnx["data"].as_str() else {
        bail!(
            "`{}`: the onnx flavor names no model file (`data`)",
            path.display()
        );
    };
    let model = dir.join(data);
    if !model.is_file() {
        bail!(
            "`{}`: the onnx flavor's model file `{}` is missing",
            path.display(),
            model.display()
        );
    }
    let (onnx, data_files) = outpost_inference::inline_external_data(&model)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read the MLflow model `{}`", model.display()))?;
    let signature = |side: &str| -> Result<Option<Vec<SigTensor>>> {
        match doc["signature"][side].as_str() {
            None => Ok(None),
            Some(json) => parse_signature(json)
                .with_context(|| format!("`{}`: signature {side}", path.display())),
        }
    };
    let (inputs, outputs) = (signature("inputs")?, signature("outputs")?);
    let mut metadata = serde_json::Map::new();
    for key in ["run_id", "model_uuid", "mlflow_version"] {
        if let Some(v) = doc[key].as_str() {
            metadata.insert(key.to_owned(), v.into());
        }
    }
    Ok(MlflowModel {
        onnx,
        data_files,
        inputs,
        outputs,
        metadata,
    })
}

/// A signature's JSON list; `None` for a column-based one (a DataFrame's columns, which do
/// not say a tensor's shape).
fn parse_signature(json: &str) -> Result<Option<Vec<SigTensor>>> {
    let list: Vec<serde_json::Value> = serde_json::from_str(json).context("not a JSON list")?;
    let mut out = Vec::new();
    for t in &list {
        if t["type"] != "tensor" {
            return Ok(None);
        }
        let spec = &t["tensor-spec"];
        let dtype = spec["dtype"].as_str().unwrap_or_default();
        let datatype = match dtype {
            "float32" => DataType::F32,
            "float64" => DataType::F64,
            "float16" => DataType::F16,
            "int8" => DataType::I8,
            "int16" => DataType::I16,
            "int32" => DataType::I32,
            "int64" => DataType::I64,
            "uint8" => DataType::U8,
            "uint16" => DataType::U16,
            "uint32" => DataType::U32,
            "uint64" => DataType::U64,
            "bool" => DataType::Bool,
            "str" | "object" | "bytes" => DataType::Bytes,
            other => bail!("tensor dtype `{other}` has no Open Inference Protocol datatype"),
        };
        let shape = spec["shape"]
            .as_array()
            .context("a tensor without a shape")?
            .iter()
            .map(|d| d.as_i64().context("a dimension that is not an integer"))
            .collect::<Result<Vec<_>>>()?;
        out.push(SigTensor {
            name: t["name"].as_str().map(str::to_owned),
            datatype,
            shape,
        });
    }
    Ok(Some(out))
}

/// The signature's tensor for each of the graph's `ports`: by name where the signature names
/// them, else by position. Checks element types, ranks and every size both fix.
fn matched<'a>(
    side: &str,
    sig: &'a [SigTensor],
    ports: &[TensorSpec],
) -> Result<Vec<(&'a SigTensor, usize)>> {
    let all = || {
        ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let named = sig.iter().all(|t| t.name.is_some());
    if !named && sig.len() != ports.len() {
        bail!(
            "the MLflow signature has {} {side}s, the graph {}: {}",
            sig.len(),
            ports.len(),
            all()
        );
    }
    let mut out = Vec::new();
    for (i, s) in sig.iter().enumerate() {
        let j = match &s.name {
            Some(name) if named => {
                ports
                    .iter()
                    .position(|p| &p.name == name)
                    .with_context(|| {
                        format!(
                            "the MLflow signature's {side} {s} is not in the graph: {}",
                            all()
                        )
                    })?
            }
            _ => i,
        };
        let p = &ports[j];
        let sizes_fit = s.shape.len() == p.shape.len()
            && s.shape.iter().zip(&p.shape).all(|(&s, p)| match p {
                Dim::Fixed(n) => s < 0 || s as u64 == *n,
                Dim::Symbolic(_) => true,
            });
        if s.datatype != p.datatype || !sizes_fit {
            bail!(
                "the MLflow signature's {side} {s} does not fit the graph's `{}`: {}",
                p.name,
                all()
            );
        }
        out.push((s, j));
    }
    Ok(out)
}

/// `--input-shape` arguments pinning the graph's `inputs` to the signature's sizes (a `-1`
/// keeps the graph's dimension), for the inputs `given` does not pin already.
pub(crate) fn pins(
    sig: &[SigTensor],
    inputs: &[TensorSpec],
    given: &[String],
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (s, j) in matched("input", sig, inputs)? {
        let input = &inputs[j];
        if given
            .iter()
            .any(|g| g.split_once('=').is_some_and(|(n, _)| n == input.name))
        {
            continue;
        }
        let dims: Vec<String> = s
            .shape
            .iter()
            .zip(&input.shape)
            .map(|(&s, d)| if s < 0 { d.to_string() } else { s.to_string() })
            .collect();
        out.push(format!("{}={}", input.name, dims.join(",")));
    }
    Ok(out)
}

/// Checks the signature's outputs against the graph's typed `outputs`.
pub(crate) fn check_outputs(sig: &[SigTensor], outputs: &[TensorSpec]) -> Result<()> {
    matched("output", sig, outputs).map(drop)
}

/// A model name from a directory's name (`[a-z0-9][a-z0-9-]*`).
pub(crate) fn name_of(dir: &Path) -> String {
    let raw = std::fs::canonicalize(dir)
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
        .to_lowercase();
    let name: String = raw
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "model".to_owned()
    } else {
        name.to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn input(name: &str, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: DataType::F32,
            shape,
        }
    }

    #[test]
    fn a_tensor_signature_pins_the_inputs_and_must_fit_the_graph() {
        let sig = parse_signature(
            r#"[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]"#,
        )
        .unwrap()
        .unwrap();
        let graph = [input(
            "X",
            vec![Dim::Symbolic("N".into()), Dim::Symbolic("f".into())],
        )];
        assert_eq!(pins(&sig, &graph, &[]).unwrap(), ["X=N,4"]);
        // What the user pins wins.
        assert!(pins(&sig, &graph, &["X=1,4".into()]).unwrap().is_empty());
        let fixed = [input("X", vec![Dim::Symbolic("N".into()), Dim::Fixed(5)])];
        let err = pins(&sig, &fixed, &[]).unwrap_err().to_string();
        assert!(err.contains("does not fit the graph's `X`"), "{err}");
        let named = parse_signature(
            r#"[{"type": "tensor", "name": "image", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}]"#,
        )
        .unwrap()
        .unwrap();
        let err = pins(&named, &graph, &[]).unwrap_err().to_string();
        assert!(
            err.contains("`image` FP32 [-1, 4] is not in the graph"),
            "{err}"
        );
        let ints = parse_signature(
            r#"[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1, 4]}}]"#,
        )
        .unwrap()
        .unwrap();
        assert!(pins(&ints, &graph, &[]).is_err());
        // A DataFrame's columns say no shape: no pins, no check.
        assert_eq!(
            parse_signature(r#"[{"type": "double", "name": "sepal length"}]"#).unwrap(),
            None
        );
        assert!(
            parse_signature(
                r#"[{"type": "tensor", "tensor-spec": {"dtype": "complex64", "shape": [1]}}]"#
            )
            .is_err()
        );
    }

    #[test]
    fn a_directory_name_becomes_a_model_name() {
        let dir = std::env::temp_dir().join("My_Model.v2");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(name_of(&dir), "my-model-v2");
    }
}
