//! The test harness shared by Outpost's test suites. Owns: waiting, scratch directories, HTTP
//! helpers for tests. Never imports: any Outpost crate (every suite can use it, none is tested
//! through it), and it is never a dependency outside `[dev-dependencies]`.
//!
//! - [`eventually`]: the one way to wait for a condition (no fixed sleeps before assertions);
//!   [`throughout`]: the way to check that something does not happen for a while.
//! - [`TempDir`]: a unique scratch directory, removed on drop.
//! - HTTP over ureq, with non-2xx statuses returned as a [`Reply`] rather than an error:
//!   [`get`], [`post`], [`post_json`], [`admin`], [`get_json`], and the [`agent`] behind them.
//! - The digits example's request body ([`digits_request`]) and the version answering it
//!   ([`digits_version`]).
//! - Test data: a seeded [`Rng`], `.npy` files ([`npy_bytes`], [`write_npy_f32`]), the Python
//!   reference checks run in ([`python_with`]).
//! - Drift checks independent of Outpost's arithmetic: [`assert_psi_agrees`] against numpy
//!   (`models/drift.py`) and a plain [`reference_psi`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod data;
mod dir;
mod drift;
mod http;
mod oip;
mod poll;
pub mod postgres;

pub use data::{Rng, npy_bytes, onnxruntime_library, png_bytes, python_with, write_npy_f32};
pub use dir::{KEEP_ENV, TempDir};
pub use drift::{assert_psi_agrees, baseline_features, models_dir, numpy_psi, reference_psi};
pub use http::{ADMIN_TOKEN, Reply, admin, agent, get, get_json, post, post_json, post_json_with};
pub use oip::{digits_label, digits_request, digits_version};
pub use poll::{eventually, throughout};
