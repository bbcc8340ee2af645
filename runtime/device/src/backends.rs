//! The inference backends a device has, in its order of preference, and the choice of one per
//! ONNX model: the one its bundle requires, else the first that loads it.

use std::sync::Arc;

use outpost_bundle::manifest::{BackendKind, ModelEntry};
use outpost_inference::{Backend, Model};

use crate::config::InferenceConfig;

/// A backend ready to load models, or the reason it cannot.
type Usable = Result<Arc<dyn Backend>, String>;

/// Every backend the configuration names, each usable or with the reason it is not.
#[derive(Debug)]
pub(crate) struct Backends {
    order: Vec<(BackendKind, Usable)>,
}

impl Backends {
    /// The backends of `config`, in its order. A backend that cannot start (no library, the
    /// wrong one) is logged once here with the reason, and models go to the others.
    pub(crate) fn new(config: &InferenceConfig) -> Self {
        let order = config
            .backends
            .iter()
            .map(|&kind| {
                let backend = match kind {
                    BackendKind::Tract => Ok(outpost_inference::default_backend()),
                    BackendKind::Onnxruntime => onnxruntime(config),
                };
                match &backend {
                    Ok(_) => tracing::debug!(backend = %kind, "inference backend ready"),
                    Err(why) if config.onnxruntime_library.is_some() => {
                        tracing::error!(backend = %kind, "inference backend unavailable: {why}")
                    }
                    Err(why) => {
                        tracing::info!(backend = %kind, "inference backend unavailable: {why}")
                    }
                }
                (kind, backend)
            })
            .collect();
        Self { order }
    }

    /// Each configured backend with `None` when usable, else why not: for status and metrics.
    pub(crate) fn availability(&self) -> Vec<(BackendKind, Option<&str>)> {
        self.order
            .iter()
            .map(|(k, b)| (*k, b.as_ref().err().map(String::as_str)))
            .collect()
    }

    /// Loads `entry`'s graph (`bytes`) on the backend its bundle requires, or else on the
    /// first of the device's backends that loads it.
    pub(crate) fn load(&self, entry: &ModelEntry, bytes: &[u8]) -> Result<Arc<dyn Model>, String> {
        if let Some(kind) = entry.backend {
            let backend = match self.order.iter().find(|(k, _)| *k == kind) {
                Some((_, Ok(b))) => b,
                Some((_, Err(why))) => {
                    return Err(format!(
                        "the bundle requires the {kind} backend, which this device cannot use: {why}"
                    ));
                }
                None => {
                    return Err(format!(
                        "the bundle requires the {kind} backend, which this device's \
                         `[inference] backends` leaves out"
                    ));
                }
            };
            return backend
                .load(bytes, &entry.inputs)
                .map_err(|e| format!("{kind}: {e}"));
        }
        let mut refusals = Vec::new();
        for (kind, backend) in &self.order {
            let Ok(backend) = backend else { continue };
            match backend.load(bytes, &entry.inputs) {
                Ok(model) => {
                    if !refusals.is_empty() {
                        tracing::warn!(onnx = %entry.name, backend = %kind, refused = %refusals.join("; "), "loaded on a later backend");
                    }
                    return Ok(model);
                }
                Err(e) => refusals.push(format!("{kind}: {e}")),
            }
        }
        if refusals.is_empty() {
            return Err("no inference backend is usable on this device".into());
        }
        Err(refusals.join("; "))
    }
}

#[cfg(feature = "onnxruntime")]
fn onnxruntime(config: &InferenceConfig) -> Result<Arc<dyn Backend>, String> {
    use outpost_inference::onnxruntime::{Onnxruntime, OrtOptions};
    let path = config
        .onnxruntime_library
        .clone()
        .or_else(|| {
            std::env::var_os("ORT_DYLIB_PATH")
                .filter(|p| !p.is_empty())
                .map(Into::into)
        })
        .ok_or_else(|| {
            "no library given (set `[inference] onnxruntime_library` or ORT_DYLIB_PATH)".to_string()
        })?;
    let defaults = OrtOptions::default();
    let options = OrtOptions {
        threads: config.onnxruntime_threads.unwrap_or(defaults.threads),
        sessions: config.onnxruntime_sessions.unwrap_or(defaults.sessions),
    };
    let ort = Onnxruntime::load(&path, options).map_err(|e| e.0)?;
    tracing::info!(path = %ort.path().display(), version = %ort.version(), threads = options.threads, sessions = options.sessions, "onnxruntime loaded");
    Ok(Arc::new(ort))
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime(_: &InferenceConfig) -> Result<Arc<dyn Backend>, String> {
    Err("this build has no onnxruntime backend (built without the `onnxruntime` feature)".into())
}
