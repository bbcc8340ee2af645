//! The WebAssembly side: wasmtime with the component model, WASI granting nothing, and every
//! guest call under a deadline (epoch interruption), a memory cap and a tensor-size cap.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use outpost_bundle::manifest::DataType;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::error::InferError;
use crate::onnx::OnnxModel;
use crate::tensor::Tensor;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../guest-sdk/wit",
        world: "model",
    });
}

pub(crate) use bindings::ModelPre;
use bindings::outpost::model::{bundle, inference, log, telemetry, types};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);
/// Most log lines and observations one request may produce.
const MAX_EVENTS: usize = 1024;

/// A request or response body at the guest boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Named tensors.
    Tensors(Vec<Tensor>),
    /// Bytes with a content type.
    Raw {
        /// MIME type.
        content_type: String,
        /// The bytes.
        body: Vec<u8>,
    },
}

/// What a guest may use per request (the bundle's limits lowered to the device's caps).
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// Linear memory, in bytes.
    pub memory_bytes: u64,
    /// Deadline, in milliseconds.
    pub timeout_ms: u64,
    /// Largest tensor crossing the boundary, in bytes.
    pub max_tensor_bytes: u64,
}

/// What a guest may reach while it runs: its bundle's models and metadata.
#[derive(Debug)]
pub struct GuestContext {
    /// `name version`, for logs.
    pub label: String,
    /// The bundle's ONNX models by name.
    pub models: HashMap<String, OnnxModel>,
    /// The manifest's metadata.
    pub metadata: BTreeMap<String, serde_json::Value>,
    /// Limits for each call.
    pub limits: CallLimits,
}

/// The result of one guest call.
#[derive(Debug)]
pub struct CallOutput {
    /// The guest's answer.
    pub payload: Payload,
    /// Drift observations the guest made.
    pub observations: Vec<(String, f64)>,
}

struct Limiter {
    memory_bytes: usize,
    memory_denied: bool,
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

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    context: Arc<GuestContext>,
    observations: Vec<(String, f64)>,
    events: usize,
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
        let inputs: Vec<Tensor> = inputs.into_iter().map(tensor_from_wit).collect();
        // `run` checks each tensor's shape against its data and the cap before it is used.
        let onnx = self.context.models.get(&model).ok_or_else(|| {
            types::Error::InvalidInput(format!("the bundle has no ONNX model `{model}`"))
        })?;
        let outputs = onnx
            .run(inputs, self.context.limits.max_tensor_bytes)
            .map_err(|e| types::Error::InvalidInput(format!("model `{model}`: {e}")))?;
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

/// The shared engine: compiles guests and runs calls. One per process.
#[derive(Clone)]
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Arc<Linker<HostState>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// A compiled guest, ready to instantiate for each request.
#[derive(Clone)]
pub struct Guest {
    pre: ModelPre<HostState>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").finish_non_exhaustive()
    }
}

impl Engine {
    /// Creates the engine and starts its epoch ticker (which stops when the engine is dropped).
    pub fn new() -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        // Small virtual reservations: many instances may live at once, and qemu-user and small
        // boards dislike 4 GiB reservations per memory.
        config.memory_reservation(1 << 30);
        config.memory_guard_size(32 << 20);
        let engine = wasmtime::Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        bindings::Model::add_to_linker::<_, HasSelf<HostState>>(&mut linker, |s| s)?;
        let weak = engine.weak();
        std::thread::Builder::new()
            .name("outpost-epoch".into())
            .spawn(move || {
                while let Some(engine) = weak.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
        })
    }

    /// Identifies the compiled-code format: artifacts cached under another fingerprint are
    /// never loaded.
    pub fn fingerprint(&self) -> String {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        format!("{:016x}", h.finish())
    }

    /// Compiles a guest; returns it and its serialized form for the cache.
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<(Guest, Vec<u8>)> {
        let component = Component::new(&self.engine, wasm)?;
        let serialized = component.serialize()?;
        Ok((self.prepare(&component)?, serialized))
    }

    /// Loads a guest from an artifact this engine serialized from a verified bundle.
    ///
    /// Callers must pass only bytes that [`Engine::compile`] produced for a bundle that passed
    /// verification, read back from the device's own state database.
    #[allow(unsafe_code)]
    pub fn load_compiled(&self, artifact: &[u8]) -> anyhow::Result<Guest> {
        // SAFETY: wasmtime trusts serialized artifacts; the caller guarantees this one was
        // produced by `compile` from a verified bundle and stored by this device (and wasmtime
        // still checks that the engine configuration and version match).
        let component = unsafe { Component::deserialize(&self.engine, artifact)? };
        self.prepare(&component)
    }

    fn prepare(&self, component: &Component) -> anyhow::Result<Guest> {
        let pre = self.linker.instantiate_pre(component)?;
        Ok(Guest {
            pre: ModelPre::new(pre)?,
        })
    }

    /// Runs one request in a fresh instance under the context's limits.
    pub fn call(
        &self,
        guest: &Guest,
        context: &Arc<GuestContext>,
        payload: Payload,
    ) -> Result<CallOutput, InferError> {
        let limits = context.limits;
        // The cap holds in both directions: nothing larger enters the guest either.
        if let Payload::Tensors(ts) = &payload {
            ts.iter()
                .try_for_each(|t| t.check(limits.max_tensor_bytes))
                .map_err(InferError::BadRequest)?;
        }
        let mut wasi = WasiCtx::builder();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
                memory_denied: false,
            },
            context: Arc::clone(context),
            observations: Vec::new(),
            events: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        let ticks = limits.timeout_ms.div_ceil(TICK.as_millis() as u64) + 1;
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();

        let input = payload_into_wit(payload);
        let result = guest.pre.instantiate(&mut store).and_then(|model| {
            model
                .outpost_model_handler()
                .call_handle(&mut store, &input)
        });
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                return Err(if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
                    InferError::Deadline(limits.timeout_ms)
                } else if store.data().limiter.memory_denied {
                    InferError::Memory(limits.memory_bytes)
                } else {
                    InferError::Trap(trap_message(&e))
                });
            }
        };
        let observations = std::mem::take(&mut store.data_mut().observations);
        match result {
            Ok(payload) => {
                let payload = payload_from_wit(payload);
                check_output(&payload, limits.max_tensor_bytes)?;
                Ok(CallOutput {
                    payload,
                    observations,
                })
            }
            Err(types::Error::InvalidInput(m)) => Err(InferError::InvalidInput(m)),
            Err(types::Error::Internal(m)) => Err(InferError::Internal(m)),
        }
    }
}

fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => e.to_string(),
    }
}

fn check_output(payload: &Payload, cap: u64) -> Result<(), InferError> {
    match payload {
        Payload::Tensors(ts) => ts
            .iter()
            .try_for_each(|t| t.check(cap))
            .map_err(|e| InferError::Internal(format!("guest returned a bad tensor: {e}"))),
        Payload::Raw { body, .. } if body.len() as u64 > cap => Err(InferError::Internal(format!(
            "guest returned {} bytes, above the limit of {cap}",
            body.len()
        ))),
        Payload::Raw { .. } => Ok(()),
    }
}

fn datatype_from_wit(t: types::TensorType) -> DataType {
    use types::TensorType as W;
    match t {
        W::Boolean => DataType::Bool,
        W::Uint8 => DataType::U8,
        W::Uint16 => DataType::U16,
        W::Uint32 => DataType::U32,
        W::Uint64 => DataType::U64,
        W::Int8 => DataType::I8,
        W::Int16 => DataType::I16,
        W::Int32 => DataType::I32,
        W::Int64 => DataType::I64,
        W::Fp16 => DataType::F16,
        W::Fp32 => DataType::F32,
        W::Fp64 => DataType::F64,
        W::Bytes => DataType::Bytes,
    }
}

fn datatype_into_wit(t: DataType) -> types::TensorType {
    use types::TensorType as W;
    match t {
        DataType::Bool => W::Boolean,
        DataType::U8 => W::Uint8,
        DataType::U16 => W::Uint16,
        DataType::U32 => W::Uint32,
        DataType::U64 => W::Uint64,
        DataType::I8 => W::Int8,
        DataType::I16 => W::Int16,
        DataType::I32 => W::Int32,
        DataType::I64 => W::Int64,
        DataType::F16 => W::Fp16,
        DataType::F32 => W::Fp32,
        DataType::F64 => W::Fp64,
        DataType::Bytes => W::Bytes,
    }
}

fn tensor_from_wit(t: types::Tensor) -> Tensor {
    Tensor {
        name: t.name,
        datatype: datatype_from_wit(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}

fn tensor_into_wit(t: Tensor) -> types::Tensor {
    types::Tensor {
        name: t.name,
        datatype: datatype_into_wit(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}

fn payload_into_wit(p: Payload) -> types::Payload {
    match p {
        Payload::Tensors(ts) => {
            types::Payload::Tensors(ts.into_iter().map(tensor_into_wit).collect())
        }
        Payload::Raw { content_type, body } => {
            types::Payload::Raw(types::Raw { content_type, body })
        }
    }
}

fn payload_from_wit(p: types::Payload) -> Payload {
    match p {
        types::Payload::Tensors(ts) => {
            Payload::Tensors(ts.into_iter().map(tensor_from_wit).collect())
        }
        types::Payload::Raw(r) => Payload::Raw {
            content_type: r.content_type,
            body: r.body,
        },
    }
}
