//! The Outpost device runtime.
//!
//! A device keeps signed bundles in a sled database, loads the active version of each model —
//! its WebAssembly guest compiled by wasmtime, its ONNX models optimised by tract — and serves
//! them over HTTP (the Open Inference Protocol v2, a raw endpoint, Prometheus metrics, and a
//! token-protected admin API on its own listener).

pub mod agent;
pub mod api;
pub mod config;
pub mod device;
pub mod engine;
mod error;
pub mod metrics;
pub mod oip;
pub mod onnx;
pub mod state;
pub mod tensor;

pub use config::{Config, DEFAULT_CONFIG, FleetConfig, GuestCaps};
pub use device::Device;
pub use error::{HostError, InferError, Result};
