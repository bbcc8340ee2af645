//! The test harness shared by Outpost's test suites.
//!
//! - [`eventually`]: the one way to wait for a condition (no fixed sleeps before assertions).
//! - [`TempDir`]: a unique scratch directory, removed on drop.
//! - HTTP over ureq, with non-2xx statuses returned as a [`Reply`] rather than an error:
//!   [`get`], [`post`], [`post_json`], [`admin`], [`get_json`], and the [`agent`] behind them.
//! - The digits example's request body ([`digits_request`]) and the version answering it
//!   ([`digits_version`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod dir;
mod http;
mod oip;
mod poll;

pub use dir::{KEEP_ENV, TempDir};
pub use http::{ADMIN_TOKEN, Reply, admin, agent, get, get_json, post, post_json};
pub use oip::{digits_request, digits_version};
pub use poll::eventually;
