//! The bundle spec file (TOML) that `outpost bundle build` reads.
//!
//! ```toml
//! name = "digits"
//! version = "1.0.0"
//! security_counter = 1
//! guest = "target/wasm32-wasip2/release/digits_guest.wasm"
//! labels = ["0", "1"]
//! baseline = "../models/digits/baseline.json"   # or an inline table
//! metadata_file = "../models/sensor/metadata.json"   # merged under [metadata]
//!
//! [[model]]
//! name = "classifier"
//! path = "../models/digits/digits.onnx"
//! inputs = [{ name = "input", datatype = "FP32", shape = ["batch", 64] }]
//! outputs = [{ name = "probabilities", datatype = "FP32", shape = ["batch", 10] }]
//!
//! [api]
//! inputs = [{ name = "pixels", datatype = "FP32", shape = ["batch", 64] }]
//! raw_content_types = ["image/png"]
//!
//! [limits]
//! timeout_ms = 500
//!
//! [serving.cache]          # or [serving.batching], [serving.sessions]
//! max_bytes = 1048576
//! ```
//!
//! Paths are relative to the spec file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::bundle::{BuildInput, ModelInput};
use crate::manifest::{Api, Baseline, ResourceLimits, Serving, TensorSpec};

/// A parsed spec; [`Spec::load`] turns it into a [`BuildInput`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Model name.
    pub name: String,
    /// Model version (semver).
    pub version: semver::Version,
    /// Anti-rollback counter.
    pub security_counter: u64,
    /// Path of the compiled guest; without one, the caller's generic guest (the `outpost`
    /// binary's: the request's tensors through the one model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<PathBuf>,
    /// ONNX models.
    #[serde(default)]
    pub model: Vec<SpecModel>,
    /// Public tensor API.
    #[serde(default)]
    pub api: Api,
    /// Guest resource limits.
    #[serde(default)]
    pub limits: ResourceLimits,
    /// Drift baseline, inline or as the path of a JSON file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineSpec>,
    /// Class labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// A JSON object merged into `metadata` (model-derived values such as thresholds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_file: Option<PathBuf>,
    /// Free metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Batching, caching and sessions.
    #[serde(default, skip_serializing_if = "Serving::is_off")]
    pub serving: Serving,
}

/// A baseline given inline or as a file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BaselineSpec {
    /// Path of a JSON file holding a [`Baseline`].
    File(PathBuf),
    /// The baseline itself.
    Inline(Baseline),
}

/// An ONNX model in a spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecModel {
    /// Name the guest calls it by.
    pub name: String,
    /// Path of the `.onnx` file.
    pub path: PathBuf,
    /// Input tensors.
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
    /// The inference backend the model requires (`"tract"` or `"onnxruntime"`); absent, the
    /// device picks by its own order of preference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<crate::manifest::BackendKind>,
}

/// Why a spec cannot be turned into a bundle.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec names no guest and the caller has no generic one.
    #[error("the bundle spec names no `guest`")]
    NoGuest,
    /// The TOML is malformed or has unknown fields.
    #[error("invalid bundle spec: {0}")]
    Syntax(toml::de::Error),
    /// The spec cannot be written as TOML.
    #[error("cannot write the bundle spec: {0}")]
    Write(toml::ser::Error),
    /// A file the spec names cannot be read.
    #[error("cannot read {what} `{}`", path.display())]
    Read {
        /// What the file is.
        what: String,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file the spec names is malformed.
    #[error("invalid {what} `{}`: {reason}", path.display())]
    Json {
        /// What the file is.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why (part of the message, so not a `#[source]`: a chain would repeat it).
        reason: serde_json::Error,
    },
}

impl Spec {
    /// Parses spec text.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(SpecError::Syntax)
    }

    /// The spec as TOML text that [`Spec::parse`] reads back.
    pub fn to_toml(&self) -> Result<String, SpecError> {
        toml::to_string_pretty(self).map_err(SpecError::Write)
    }

    /// Reads every file the spec names, relative to `dir`, through `read` (the file system, or
    /// embedded bytes), and returns what [`crate::Bundle::build`] takes. A spec without a
    /// `guest` gets `generic_guest`.
    pub fn load(
        self,
        dir: &Path,
        mut read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
        generic_guest: Option<&[u8]>,
    ) -> Result<BuildInput, SpecError> {
        let mut read_file = |what: String, rel: &Path| {
            let path = dir.join(rel);
            read(&path).map_err(|source| SpecError::Read { what, path, source })
        };
        let guest = match (&self.guest, generic_guest) {
            (Some(path), _) => read_file("guest module".into(), path)?,
            (None, Some(generic)) => generic.to_vec(),
            (None, None) => return Err(SpecError::NoGuest),
        };
        let mut models = Vec::new();
        for m in self.model {
            models.push(ModelInput {
                bytes: read_file(format!("ONNX model `{}`", m.name), &m.path)?,
                name: m.name,
                inputs: m.inputs,
                outputs: m.outputs,
                repairs: Vec::new(),
                backend: m.backend,
            });
        }
        let baseline = match self.baseline {
            None => None,
            Some(BaselineSpec::Inline(b)) => Some(b),
            Some(BaselineSpec::File(rel)) => {
                let bytes = read_file("baseline".into(), &rel)?;
                Some(parse_json("baseline", &dir.join(&rel), &bytes)?)
            }
        };
        let mut metadata = BTreeMap::new();
        if let Some(rel) = &self.metadata_file {
            let bytes = read_file("metadata file".into(), rel)?;
            let extra: BTreeMap<String, serde_json::Value> =
                parse_json("metadata file", &dir.join(rel), &bytes)?;
            metadata.extend(extra);
        }
        metadata.extend(self.metadata);
        Ok(BuildInput {
            name: self.name,
            version: self.version,
            security_counter: self.security_counter,
            guest,
            models,
            api: self.api,
            limits: self.limits,
            baseline,
            labels: self.labels,
            metadata,
            serving: self.serving,
        })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
) -> Result<T, SpecError> {
    serde_json::from_slice(bytes).map_err(|reason| SpecError::Json {
        what,
        path: path.to_path_buf(),
        reason,
    })
}
