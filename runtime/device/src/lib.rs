//! The Outpost device runtime. Owns: installed bundles and their state (sled), activation with
//! warm-up and atomic swap, the HTTP endpoints (Open Inference Protocol v2, raw, metrics,
//! admin), traffic policies over resident versions ([`policy`]) and what watches their
//! candidates ([`watch`]: canary windows, shadow lanes), the configuration, and [`run`], which
//! wires them and the fleet agent together.
//! Never imports: wasmtime or tract directly (through `outpost-engine` and
//! `outpost-inference`), rumqttc, or the fleet server.

pub mod api;
mod api_infer;
mod backends;
mod budget;
pub mod config;
pub mod contract;
pub mod device;
pub mod drift;
mod error;
pub mod feedback;
mod fleet_link;
pub mod metrics;
pub mod policy;
mod run;
pub mod serving;
pub mod state;
mod status_page;
mod triton;
pub mod watch;

pub use config::{Config, DEFAULT_CONFIG, GuestCaps};
pub use device::Device;
pub use error::{HostError, InferError, Result};
pub use outpost_agent::FleetConfig;
/// The OIP codec the HTTP API uses.
pub use outpost_oip as oip;
pub use run::{Listeners, run};
