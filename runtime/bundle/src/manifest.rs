//! The bundle manifest (`manifest.json`), format version 1.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{BundleError, Result};

/// The manifest format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Path of the manifest inside a bundle.
pub const MANIFEST_PATH: &str = "manifest.json";

/// Path of the detached signature inside a bundle.
pub const SIGNATURE_PATH: &str = "manifest.sig";

/// What a bundle holds and promises: identity, files with their hashes, the tensor API, limits.
///
/// Unknown fields are refused, so a manifest written for a newer format never half-loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version; see [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Model name: `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Model version (semver).
    pub version: semver::Version,
    /// Monotonic anti-rollback counter: a device refuses a bundle whose counter is below the
    /// highest it has accepted for this name.
    pub security_counter: u64,
    /// The WebAssembly guest module.
    pub guest: FileEntry,
    /// ONNX models the host runs for the guest, by name.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// The tensor API the device endpoint exposes for this model.
    #[serde(default)]
    pub api: Api,
    /// Resources the guest needs per request.
    #[serde(default)]
    pub limits: ResourceLimits,
    /// Expected distribution of drift features, if the guest reports any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// Class labels, for guests that return them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Free-form metadata (training run, dataset, owner, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// How the device serves the model beyond one call per request: dynamic batching, a
    /// response cache, streaming sessions. All off unless the bundle asks.
    #[serde(default, skip_serializing_if = "Serving::is_off")]
    pub serving: Serving,
}

/// A file inside the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative path inside the archive.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the contents.
    pub sha256: String,
}

/// An ONNX model in the bundle and its tensor signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Name the guest uses to call the model.
    pub name: String,
    /// Relative path inside the archive.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the contents.
    pub sha256: String,
    /// Input tensors.
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    /// Output tensors.
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
    /// Exporter quirks the loader repairs in this file (`bundle build` found them; a device
    /// makes the same repairs when it loads the file as signed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repairs: Vec<String>,
    /// The inference backend this model requires; absent, the device picks by its own order
    /// of preference. A device that predates the field refuses the manifest rather than run
    /// the model on a backend it was not meant for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendKind>,
}

/// An inference backend a bundle may require for one of its models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract: pure Rust, in every build.
    Tract,
    /// onnxruntime, loaded at run time from a library the device is given.
    Onnxruntime,
}

impl BackendKind {
    /// Every backend, in the default order of preference where both are available.
    pub const ALL: [BackendKind; 2] = [BackendKind::Onnxruntime, BackendKind::Tract];

    /// The name used in specs, manifests, configs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Tract => "tract",
            BackendKind::Onnxruntime => "onnxruntime",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "tract" => Ok(BackendKind::Tract),
            "onnxruntime" => Ok(BackendKind::Onnxruntime),
            other => Err(format!(
                "unknown backend `{other}` (known: tract, onnxruntime)"
            )),
        }
    }
}

impl ModelEntry {
    /// The model's file as a [`FileEntry`].
    pub fn file(&self) -> FileEntry {
        FileEntry {
            path: self.path.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
        }
    }
}

/// A named tensor with its element type and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type, named as in the Open Inference Protocol.
    pub datatype: DataType,
    /// Dimensions; a symbolic dimension (a string such as `"batch"`) takes any size.
    pub shape: Vec<Dim>,
}

/// A tensor element type, with the names the Open Inference Protocol uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

impl DataType {
    /// Every element type.
    pub const ALL: [DataType; 13] = [
        DataType::Bool,
        DataType::U8,
        DataType::U16,
        DataType::U32,
        DataType::U64,
        DataType::I8,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::F16,
        DataType::F32,
        DataType::F64,
        DataType::Bytes,
    ];

    /// The element type an Open Inference Protocol name stands for (`FP32`, ...).
    pub fn from_oip_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.oip_name() == name)
    }

    /// Size of one element in bytes (`None` for variable-length `BYTES`).
    pub fn element_size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The Open Inference Protocol name (`FP32`, `INT64`, ...).
    pub fn oip_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }
}

// The manifest, the bundle spec and the Open Inference Protocol all name element types by
// their OIP names: [`DataType::oip_name`] is the one mapping.
impl Serialize for DataType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.oip_name())
    }
}

impl<'de> Deserialize<'de> for DataType {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        DataType::from_oip_name(&name).ok_or_else(|| {
            let names: Vec<&str> = DataType::ALL.iter().map(|t| t.oip_name()).collect();
            serde::de::Error::custom(format!(
                "unknown datatype `{name}`, expected one of {}",
                names.join(", ")
            ))
        })
    }
}

/// One dimension of a tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A named dimension of any size (`"batch"`).
    Symbolic(String),
}

impl std::fmt::Display for TensorSpec {
    /// As messages name a tensor: `` `name` FP32 [batch, 64] ``.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` {} [", self.name, self.datatype.oip_name())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl std::fmt::Display for Dim {
    /// A size as its number, a symbolic dimension as its name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(name) => f.write_str(name),
        }
    }
}

/// The public tensor API of the model's endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Inputs a client sends.
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    /// Outputs the endpoint returns.
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
    /// Content types the raw endpoint accepts (`image/png`, `application/json`, ...);
    /// empty when the guest takes tensors only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_content_types: Vec<String>,
}

/// Resources the guest may use per request. The device may lower them, never raise them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceLimits {
    /// Maximum linear memory of the guest, in bytes.
    pub memory_bytes: u64,
    /// Deadline for one request, in milliseconds.
    pub timeout_ms: u64,
    /// Largest tensor, in bytes, the guest may pass to or ask from the host.
    pub max_tensor_bytes: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            timeout_ms: 1_000,
            max_tensor_bytes: 16 << 20,
        }
    }
}

/// The training baseline: the expected distribution of each drift feature the guest observes
/// (`features`) and of each model output it reports (`outputs`, prediction drift), with the PSI
/// thresholds that grade drift. Documented in `docs/bundle-spec.md`; computed by
/// [`crate::drift`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// One entry per input feature name.
    pub features: Vec<FeatureBaseline>,
    /// One entry per output feature name (prediction drift); observed like the inputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<FeatureBaseline>,
    /// PSI thresholds (defaults 0.1 and 0.25).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<PsiThresholds>,
    /// Seconds of traffic a device's drift window covers (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
    /// Which output is the model's prediction, for ground-truth feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<QualitySpec>,
}

/// The output feature a device keeps per request, to join with the true label or value a
/// client posts later (`POST /v2/models/{name}/feedback`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualitySpec {
    /// One of the baseline's `outputs`: the value the guest observes for each item it answers.
    pub output: String,
    /// `classification` (accuracy: the class index equals the label) or `regression` (mean
    /// absolute error).
    pub task: Task,
}

/// What kind of prediction a model makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// A class index; quality is accuracy.
    Classification,
    /// A value; quality is the mean absolute error.
    Regression,
}

impl Task {
    /// `classification` or `regression`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classification => "classification",
            Self::Regression => "regression",
        }
    }
}

/// PSI at or above `moderate` is moderate drift; at or above `significant`, significant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsiThresholds {
    /// Start of moderate drift (usually 0.1).
    pub moderate: f64,
    /// Start of significant drift (usually 0.25).
    pub significant: f64,
}

impl Default for PsiThresholds {
    fn default() -> Self {
        Self {
            moderate: 0.1,
            significant: 0.25,
        }
    }
}

/// Histogram and summary statistics of one feature on the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureBaseline {
    /// Feature name, as the guest passes it to `observe`.
    pub name: String,
    /// `n + 1` ascending bin edges (training quantiles). Bin `i` holds `edges[i] <= x <
    /// edges[i+1]`; the last bin also holds `x == edges[n]`.
    pub edges: Vec<f64>,
    /// Expected share of each bin, summing to 1: `n + 2` values (underflow, the `n` bins,
    /// overflow), or `n` in the first format, where values outside the edges count in the
    /// first or last bin.
    pub proportions: Vec<f64>,
    /// Training mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
    /// Training standard deviation (population).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
    /// Smallest training value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// Largest training value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Training rows the baseline was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl Baseline {
    /// Every feature, inputs first, each with whether it is an output.
    pub fn all(&self) -> impl Iterator<Item = (&FeatureBaseline, bool)> {
        self.features
            .iter()
            .map(|f| (f, false))
            .chain(self.outputs.iter().map(|f| (f, true)))
    }

    /// The feature called `name`, input or output.
    pub fn feature(&self, name: &str) -> Option<&FeatureBaseline> {
        self.all().map(|(f, _)| f).find(|f| f.name == name)
    }

    /// The thresholds, defaults filled in.
    pub fn thresholds(&self) -> PsiThresholds {
        self.thresholds.unwrap_or_default()
    }

    /// The window length in seconds, default filled in.
    pub fn window_s(&self) -> u64 {
        self.window_s.unwrap_or(crate::drift::DEFAULT_WINDOW_S)
    }
}

/// Whether `name` is a valid model name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_valid_model_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

impl Manifest {
    /// Parses manifest bytes: the format version first (so a newer format gets its own error),
    /// then the whole document with unknown fields refused, then [`Manifest::validate`].
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        #[derive(Deserialize)]
        struct Version {
            format_version: u64,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(BundleError::ManifestSyntax)?;
        if v.format_version != u64::from(FORMAT_VERSION) {
            return Err(BundleError::UnsupportedFormatVersion {
                found: v.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(BundleError::ManifestSyntax)?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Serializes the manifest as the pretty JSON stored in bundles.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Every file the manifest lists: the guest first, then the models in order.
    pub fn files(&self) -> Vec<FileEntry> {
        std::iter::once(self.guest.clone())
            .chain(self.models.iter().map(ModelEntry::file))
            .collect()
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(BundleError::InvalidManifest(msg));
        if self.format_version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedFormatVersion {
                found: u64::from(self.format_version),
                supported: FORMAT_VERSION,
            });
        }
        if !is_valid_model_name(&self.name) {
            return invalid(format!(
                "model name `{}` must match [a-z0-9][a-z0-9-]{{0,62}}",
                self.name
            ));
        }
        let mut paths = BTreeSet::new();
        for file in self.files() {
            crate::tar::validate_path(file.path.as_bytes())?;
            if file.path == MANIFEST_PATH || file.path == SIGNATURE_PATH {
                return invalid(format!("`{}` is a reserved path", file.path));
            }
            if !paths.insert(file.path.clone()) {
                return invalid(format!("`{}` is listed twice", file.path));
            }
            if file.sha256.len() != 64
                || !file
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return invalid(format!(
                    "sha256 of `{}` must be 64 lower-case hex digits",
                    file.path
                ));
            }
        }
        let mut models = BTreeSet::new();
        for model in &self.models {
            if !is_valid_model_name(&model.name) {
                return invalid(format!(
                    "ONNX model name `{}` must match [a-z0-9][a-z0-9-]{{0,62}}",
                    model.name
                ));
            }
            if !models.insert(model.name.as_str()) {
                return invalid(format!("ONNX model `{}` is listed twice", model.name));
            }
            check_tensors(&model.inputs, &format!("inputs of model `{}`", model.name))?;
            check_tensors(
                &model.outputs,
                &format!("outputs of model `{}`", model.name),
            )?;
        }
        check_tensors(&self.api.inputs, "api inputs")?;
        check_tensors(&self.api.outputs, "api outputs")?;
        let l = self.limits;
        if l.memory_bytes == 0 || l.timeout_ms == 0 || l.max_tensor_bytes == 0 {
            return invalid("limits must be positive".into());
        }
        if let Some(baseline) = &self.baseline {
            crate::drift::validate(baseline).or_else(invalid)?;
        }
        self.serving.validate("serving").or_else(invalid)?;
        Ok(())
    }
}

/// How the device serves a model beyond one stateless call per request (`[serving]` in the
/// bundle spec; each part may be overridden in the device configuration). Documented in
/// `docs/bundle-spec.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serving {
    /// Run concurrent calls of one ONNX model whose inputs differ only in the first
    /// dimension as one backend call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batching: Option<Batching>,
    /// Answer a repeated request from memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// Keep a guest instance per session key, so a streaming model keeps its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<SessionSpec>,
}

impl Serving {
    /// Whether nothing is asked for (one stateless call per request).
    pub fn is_off(&self) -> bool {
        self == &Self::default()
    }

    /// Checks the bounds; `what` names where the section came from in the message.
    pub fn validate(&self, what: &str) -> std::result::Result<(), String> {
        if let Some(b) = &self.batching {
            if !(1..=MAX_BATCH).contains(&b.max_batch_size) {
                return Err(format!(
                    "{what}: batching.max_batch_size must be 1 to {MAX_BATCH}"
                ));
            }
            if b.max_queue_delay_us > MAX_QUEUE_DELAY_US {
                return Err(format!(
                    "{what}: batching.max_queue_delay_us must be at most {MAX_QUEUE_DELAY_US}"
                ));
            }
            if let Some(p) = b
                .preferred_sizes
                .iter()
                .find(|p| **p == 0 || **p > b.max_batch_size)
            {
                return Err(format!(
                    "{what}: batching.preferred_sizes must lie in 1 to max_batch_size ({p})"
                ));
            }
        }
        if self.cache.is_some_and(|c| c.max_bytes == 0) {
            return Err(format!("{what}: cache.max_bytes must be positive"));
        }
        if let Some(s) = &self.sessions {
            if s.max_sessions == 0 || s.idle_timeout_s == 0 {
                return Err(format!(
                    "{what}: sessions.max_sessions and sessions.idle_timeout_s must be positive"
                ));
            }
            if self.cache.is_some() {
                return Err(format!(
                    "{what}: a model with sessions keeps state between calls, so its answers \
                     cannot be cached; ask for `sessions` or `cache`, not both"
                ));
            }
        }
        Ok(())
    }
}

/// The largest batch a model may ask for.
pub const MAX_BATCH: u32 = 1024;
/// The longest a request may wait for others to join its batch, in microseconds.
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;

/// Dynamic batching of one bundle's ONNX model calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Most items (rows of the first dimension) in one backend call.
    pub max_batch_size: u32,
    /// Longest a call waits for others to join it, in microseconds.
    #[serde(default = "default_queue_delay_us")]
    pub max_queue_delay_us: u64,
    /// Batch sizes to run at once when reached (the plan sizes a model is fast at); a batch
    /// otherwise runs when it is full or its first call has waited `max_queue_delay_us`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_sizes: Vec<u32>,
}

fn default_queue_delay_us() -> u64 {
    1_000
}

/// A response cache for one model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Bytes of cached answers (their tensors and keys) kept at most; the least recently used
    /// are evicted beyond.
    pub max_bytes: u64,
}

/// Streaming sessions: a guest instance kept per session key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// Live sessions at most; a new session beyond is refused (429).
    #[serde(default = "default_max_sessions")]
    pub max_sessions: u32,
    /// A session unused this long, in seconds, is ended and its memory freed.
    #[serde(default = "default_idle_timeout_s")]
    pub idle_timeout_s: u64,
}

fn default_max_sessions() -> u32 {
    64
}

fn default_idle_timeout_s() -> u64 {
    300
}

fn check_tensors(tensors: &[TensorSpec], what: &str) -> Result<()> {
    let mut names = BTreeSet::new();
    for t in tensors {
        if t.name.is_empty() || !names.insert(t.name.as_str()) {
            return Err(BundleError::InvalidManifest(format!(
                "{what}: tensor names must be non-empty and unique (`{}`)",
                t.name
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_is_off_unless_asked_and_its_bounds_are_held() {
        let off = Serving::default();
        assert!(off.is_off());
        assert_eq!(serde_json::to_string(&off).unwrap(), "{}");
        let parse = |json: &str| serde_json::from_str::<Serving>(json).unwrap();
        let batching = parse(r#"{"batching": {"max_batch_size": 8}}"#);
        assert_eq!(
            batching.batching.as_ref().unwrap().max_queue_delay_us,
            1_000
        );
        assert!(batching.validate("serving").is_ok());
        for bad in [
            r#"{"batching": {"max_batch_size": 0}}"#,
            r#"{"batching": {"max_batch_size": 4, "preferred_sizes": [8]}}"#,
            r#"{"batching": {"max_batch_size": 4, "max_queue_delay_us": 5000000}}"#,
            r#"{"cache": {"max_bytes": 0}}"#,
            r#"{"sessions": {"max_sessions": 0}}"#,
            r#"{"sessions": {}, "cache": {"max_bytes": 10}}"#,
        ] {
            assert!(parse(bad).validate("serving").is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Serving>(r#"{"turbo": {}}"#).is_err());
    }

    #[test]
    fn model_names() {
        for ok in ["digits", "a", "sensor-anomaly-2", "0abc"] {
            assert!(is_valid_model_name(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in ["", "-a", "Digits", "a_b", "a.b", long.as_str()] {
            assert!(!is_valid_model_name(bad), "{bad}");
        }
    }

    #[test]
    fn dims_are_numbers_or_names() {
        let t: TensorSpec =
            serde_json::from_str(r#"{"name":"x","datatype":"FP32","shape":["batch",64]}"#).unwrap();
        assert_eq!(t.shape, vec![Dim::Symbolic("batch".into()), Dim::Fixed(64)]);
        assert_eq!(t.datatype, DataType::F32);
    }

    #[test]
    fn datatypes_travel_by_their_oip_names() {
        for t in DataType::ALL {
            let text = serde_json::to_string(&t).unwrap();
            assert_eq!(text, format!("\"{}\"", t.oip_name()));
            assert_eq!(serde_json::from_str::<DataType>(&text).unwrap(), t);
            assert_eq!(DataType::from_oip_name(t.oip_name()), Some(t));
        }
        let err = serde_json::from_str::<DataType>("\"FP99\"").unwrap_err();
        assert!(err.to_string().contains("unknown datatype `FP99`"), "{err}");
        assert_eq!(DataType::from_oip_name("fp32"), None);
    }
}
