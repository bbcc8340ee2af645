//! Outpost's WebAssembly engine: wasmtime with the component model and the WIT contract in
//! `guest-sdk/wit`, WASI granting nothing, every guest call under a deadline (epoch
//! interruption), a memory cap and a tensor-size cap, and the compiled-guest cache format.
//! Owns: compiling, caching and calling guests. Never imports: the HTTP or MQTT stack, the
//! device's state, or a model backend (it sees models only as `outpost_inference::Model`).

mod host;
mod wit;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use outpost_inference::{Model, Tensor};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Store, Trap};

use host::HostState;
use wit::{payload_from_wit, payload_into_wit};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../guest-sdk/wit",
        world: "model",
    });
}

use bindings::ModelPre;
use bindings::outpost::model::types;

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);
/// Bytes of the engine fingerprint at the start of every cached artifact.
const FINGERPRINT_LEN: usize = 16;

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
    pub models: HashMap<String, Arc<dyn Model>>,
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

/// Why one guest call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// A request tensor is malformed or above the cap; the guest never saw it.
    #[error("{0}")]
    BadRequest(String),
    /// The guest refused the input.
    #[error("{0}")]
    InvalidInput(String),
    /// The guest reported an error, or returned something it may not.
    #[error("model error: {0}")]
    Internal(String),
    /// The guest exceeded its deadline, in milliseconds.
    #[error("model exceeded its deadline of {0} ms")]
    Deadline(u64),
    /// The guest exceeded its memory limit, in bytes.
    #[error("model exceeded its memory limit of {0} bytes")]
    Memory(u64),
    /// The guest trapped.
    #[error("model trapped: {0}")]
    Trap(String),
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

    /// Identifies the compiled-code format (wasmtime's compatibility hash and this crate's
    /// version): a cached artifact made under another fingerprint is never loaded.
    fn fingerprint(&self) -> [u8; FINGERPRINT_LEN] {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        let mut out = [0u8; FINGERPRINT_LEN];
        out.copy_from_slice(format!("{:016x}", h.finish()).as_bytes());
        out
    }

    /// Compiles a guest; returns it and the artifact to cache (the engine fingerprint, then
    /// wasmtime's serialized component).
    pub fn compile(&self, wasm: &[u8]) -> anyhow::Result<(Guest, Vec<u8>)> {
        let component = Component::new(&self.engine, wasm)?;
        let mut artifact = self.fingerprint().to_vec();
        artifact.extend_from_slice(&component.serialize()?);
        Ok((self.prepare(&component)?, artifact))
    }

    /// Loads a guest from an artifact [`Engine::compile`] made; `None` when it was made by
    /// another engine build (compile again then).
    ///
    /// Callers must pass only artifacts that [`Engine::compile`] produced for a bundle that
    /// passed verification, read back from the device's own state database.
    #[allow(unsafe_code)]
    pub fn load_compiled(&self, artifact: &[u8]) -> anyhow::Result<Option<Guest>> {
        let Some((fingerprint, serialized)) = artifact.split_at_checked(FINGERPRINT_LEN) else {
            return Ok(None);
        };
        if fingerprint != self.fingerprint() {
            return Ok(None);
        }
        // SAFETY: wasmtime trusts serialized artifacts; the caller guarantees this one was
        // produced by `compile` from a verified bundle and stored by this device (and wasmtime
        // still checks that the engine configuration and version match).
        let component = unsafe { Component::deserialize(&self.engine, serialized)? };
        self.prepare(&component).map(Some)
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
    ) -> Result<CallOutput, CallError> {
        check_input(&payload, context.limits)?;
        let mut session = self.session(guest, context)?;
        session.run(payload)
    }

    /// Instantiates a guest to keep between calls: a streaming session, whose guest keeps its
    /// state (its globals and memory) from one call to the next. Each call still runs under
    /// the deadline and the tensor cap; the memory limit holds for the instance as a whole.
    pub fn session(
        &self,
        guest: &Guest,
        context: &Arc<GuestContext>,
    ) -> Result<Session, CallError> {
        let limits = context.limits;
        let state = HostState::new(Arc::clone(context), limits.memory_bytes);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(deadline_ticks(limits));
        store.epoch_deadline_trap();
        match guest.pre.instantiate(&mut store) {
            Ok(model) => Ok(Session {
                store,
                model,
                limits,
                ended: false,
            }),
            Err(e) => Err(classify(&e, &store, limits)),
        }
    }
}

/// A guest instance kept between calls (see [`Engine::session`]). A call that traps, runs
/// past its deadline or exceeds the memory limit ends the session: its state is gone, and
/// every later call is refused.
pub struct Session {
    store: Store<HostState>,
    model: bindings::Model,
    limits: CallLimits,
    ended: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ended", &self.ended)
            .field("memory_bytes", &self.memory_bytes())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Runs one call in the session's instance.
    pub fn call(&mut self, payload: Payload) -> Result<CallOutput, CallError> {
        if self.ended {
            return Err(CallError::Internal(
                "the session ended when an earlier call failed".into(),
            ));
        }
        check_input(&payload, self.limits)?;
        self.store.set_epoch_deadline(deadline_ticks(self.limits));
        self.store.data_mut().events = 0;
        self.run(payload)
    }

    /// Whether a failed call ended the session.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// Bytes of linear memory the instance holds.
    pub fn memory_bytes(&self) -> u64 {
        self.store.data().limiter.memory_in_use as u64
    }

    fn run(&mut self, payload: Payload) -> Result<CallOutput, CallError> {
        let limits = self.limits;
        let input = payload_into_wit(payload);
        let result = match self
            .model
            .outpost_model_handler()
            .call_handle(&mut self.store, &input)
        {
            Ok(r) => r,
            Err(e) => {
                self.ended = true;
                return Err(classify(&e, &self.store, limits));
            }
        };
        let observations = std::mem::take(&mut self.store.data_mut().observations);
        match result {
            Ok(payload) => {
                let payload = payload_from_wit(payload);
                check_output(&payload, limits.max_tensor_bytes)?;
                Ok(CallOutput {
                    payload,
                    observations,
                })
            }
            Err(types::Error::InvalidInput(m)) => Err(CallError::InvalidInput(m)),
            Err(types::Error::Internal(m)) => Err(CallError::Internal(m)),
        }
    }
}

/// The cap holds in both directions: nothing larger enters the guest either.
fn check_input(payload: &Payload, limits: CallLimits) -> Result<(), CallError> {
    if let Payload::Tensors(ts) = payload {
        ts.iter()
            .try_for_each(|t| t.check(limits.max_tensor_bytes))
            .map_err(CallError::BadRequest)?;
    }
    Ok(())
}

fn deadline_ticks(limits: CallLimits) -> u64 {
    limits.timeout_ms.div_ceil(TICK.as_millis() as u64) + 1
}

/// What a failed instantiation or call means for the caller.
fn classify(e: &wasmtime::Error, store: &Store<HostState>, limits: CallLimits) -> CallError {
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        CallError::Deadline(limits.timeout_ms)
    } else if store.data().limiter.memory_denied {
        CallError::Memory(limits.memory_bytes)
    } else {
        CallError::Trap(trap_message(e))
    }
}

fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => e.to_string(),
    }
}

fn check_output(payload: &Payload, cap: u64) -> Result<(), CallError> {
    match payload {
        Payload::Tensors(ts) => ts
            .iter()
            .try_for_each(|t| t.check(cap))
            .map_err(|e| CallError::Internal(format!("guest returned a bad tensor: {e}"))),
        Payload::Raw { body, .. } if body.len() as u64 > cap => Err(CallError::Internal(format!(
            "guest returned {} bytes, above the limit of {cap}",
            body.len()
        ))),
        Payload::Raw { .. } => Ok(()),
    }
}
