//! What a guest instance holds while it runs, and the host functions it may call: inference on
//! its bundle's models, logging, drift observations and bundle metadata.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::GuestContext;
use crate::bindings::outpost::model::{bundle, inference, log, telemetry, types};
use crate::wit::{tensor_from_wit, tensor_into_wit};

/// Most log lines and observations one request may produce.
const MAX_EVENTS: usize = 1024;

pub(crate) struct Limiter {
    pub(crate) memory_bytes: usize,
    pub(crate) memory_denied: bool,
    /// The largest size any memory of the instance has grown to.
    pub(crate) memory_in_use: usize,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_denied = true;
            return Err(wasmtime::format_err!("memory limit exceeded"));
        }
        self.memory_in_use = self.memory_in_use.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _: usize,
        desired: usize,
        _: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// One guest instance's host-side state.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    context: Arc<GuestContext>,
    pub(crate) observations: Vec<(String, f64)>,
    /// Log lines and observations in the current call.
    pub(crate) events: usize,
}

impl HostState {
    pub(crate) fn new(context: Arc<GuestContext>, memory_bytes: u64) -> Self {
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        Self {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: usize::try_from(memory_bytes).unwrap_or(usize::MAX),
                memory_denied: false,
                memory_in_use: 0,
            },
            context,
            observations: Vec::new(),
            events: 0,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl inference::Host for HostState {
    fn infer(
        &mut self,
        model: String,
        inputs: Vec<types::Tensor>,
    ) -> Result<Vec<types::Tensor>, types::Error> {
        let onnx = self.context.models.get(&model).ok_or_else(|| {
            types::Error::InvalidInput(format!("the bundle has no ONNX model `{model}`"))
        })?;
        // `run` checks each tensor's shape against its data and the cap before it is used. A
        // model that fails on inputs that fit it is a fault, not the caller's mistake.
        let inputs = inputs.into_iter().map(tensor_from_wit).collect();
        let outputs = onnx
            .run(inputs, self.context.limits.max_tensor_bytes)
            .map_err(|e| match e {
                outpost_inference::RunError::Input(m) => {
                    types::Error::InvalidInput(format!("model `{model}`: {m}"))
                }
                outpost_inference::RunError::Fault(m) => {
                    types::Error::Internal(format!("model `{model}` failed: {m}"))
                }
            })?;
        Ok(outputs.into_iter().map(tensor_into_wit).collect())
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        self.events += 1;
        if self.events > MAX_EVENTS {
            return;
        }
        let message: String = message.chars().take(4096).collect();
        let guest = self.context.label.as_str();
        match level {
            log::Level::Trace | log::Level::Debug => tracing::debug!(guest, "{message}"),
            log::Level::Info => tracing::info!(guest, "{message}"),
            log::Level::Warn => tracing::warn!(guest, "{message}"),
            log::Level::Error => tracing::error!(guest, "{message}"),
        }
    }
}

impl telemetry::Host for HostState {
    fn observe(&mut self, feature: String, value: f64) {
        self.events += 1;
        if self.events <= MAX_EVENTS && value.is_finite() && feature.len() <= 128 {
            self.observations.push((feature, value));
        }
    }
}

impl bundle::Host for HostState {
    fn metadata(&mut self, key: String) -> Option<String> {
        self.context.metadata.get(&key).map(|v| v.to_string())
    }
}
