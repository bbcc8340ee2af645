//! A model's traffic policy over its resident versions: the active version answers everything
//! (`primary`, the default); a split (A/B) sends each request to one of several versions by
//! weight; a shadow runs a candidate on a sampled copy of the traffic after the active version
//! has answered, and records whether the two agree; a canary sends a share of the traffic to a
//! candidate and watches it against the active version, rolling it back on its own when a bound
//! is crossed (see [`crate::watch`]).
//!
//! Routing is deterministic for a keyed request: the SHA-256 of the policy id, a zero byte and
//! the key, its first eight bytes as a big-endian number mod 10,000, is a point in [0, 10,000);
//! the versions, in their order in the policy, take consecutive shares of that range in
//! proportion to their weights. The same key with the same policy id always reaches the same
//! version, on every device; a new policy id reshuffles. A request without a key draws its
//! point at random.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The most versions one split may name.
pub const MAX_SPLIT_VERSIONS: usize = 8;
/// The longest policy id.
pub const MAX_POLICY_ID: usize = 64;

/// How a model's unversioned requests are routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Policy {
    /// The active version answers every request.
    #[default]
    Primary,
    /// Each request goes to one version, in proportion to its weight.
    Split(Split),
    /// The active version answers; a candidate runs on a sampled copy, never answering.
    Shadow(Shadow),
    /// A share of the traffic goes to a candidate, which is watched against the active version.
    Canary(Canary),
}

/// The most shadow requests waiting or running at once, whatever a policy asks.
pub const MAX_SHADOW_QUEUE: usize = 1_024;

/// A shadow: the candidate sees a copy of a sample of the requests the active version answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// Names the shadow in metrics and events.
    pub id: String,
    /// The version that runs in the shadow.
    pub candidate: String,
    /// Percentage of the requests copied to the candidate (0 to 100).
    #[serde(default = "hundred")]
    pub sample_percent: f64,
    /// Shadow requests waiting or running at most; beyond that one is dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// When the candidate's answer agrees with the active version's.
    #[serde(default)]
    pub compare: Compare,
}

/// How two answers to the same request are compared.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Compare {
    /// Classifier outputs: the same index of the largest value along the last axis of each
    /// numeric output, row by row; other outputs byte for byte.
    #[default]
    Argmax,
    /// Every numeric element within this absolute difference; other outputs byte for byte.
    Tolerance(f64),
    /// Byte for byte.
    Exact,
}

/// A canary: a share of the traffic on a candidate, watched against the active version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    /// Names the canary in the routing hash, metrics and events.
    pub id: String,
    /// The version under watch.
    pub candidate: String,
    /// Percentage of the traffic the candidate answers (above 0, below 100).
    pub percent: f64,
    /// How long the candidate must stay within its bounds to pass, in seconds; the bounds are
    /// checked over the requests of the last this many seconds.
    #[serde(default = "default_window")]
    pub window_s: u64,
    /// Requests each of the candidate and the active version must have in the window before
    /// the bounds are checked (no data is not a pass).
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// The candidate's error rate may exceed the active version's by at most this (0 to 1).
    #[serde(default = "default_error_delta")]
    pub max_error_rate_delta: f64,
    /// The candidate's p95 latency may be at most this multiple of the active version's.
    #[serde(default = "default_p95_ratio")]
    pub max_p95_ratio: f64,
    /// What the device does when the candidate passed.
    #[serde(default)]
    pub on_pass: OnPass,
}

/// What a device does with a canary that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnPass {
    /// Keep the canary as it is and report the pass, for the fleet to decide.
    #[default]
    Hold,
    /// Activate the candidate (the version it replaces stays loaded for a rollback).
    Promote,
}

fn hundred() -> f64 {
    100.0
}
fn default_queue() -> usize {
    64
}
fn default_window() -> u64 {
    600
}
fn default_min_requests() -> u64 {
    100
}
fn default_error_delta() -> f64 {
    0.05
}
fn default_p95_ratio() -> f64 {
    2.0
}

/// An A/B split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Names the split in the routing hash: changing it reshuffles which keys go where.
    pub id: String,
    /// Weight per version (any non-negative whole numbers, not all zero).
    pub weights: BTreeMap<String, u32>,
}

impl Policy {
    /// The versions this policy sends traffic to (none for `primary`: the active one).
    pub fn versions(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Policy::Primary => Box::new(std::iter::empty()),
            Policy::Split(split) => Box::new(split.weights.keys().map(String::as_str)),
            Policy::Shadow(shadow) => Box::new(std::iter::once(shadow.candidate.as_str())),
            Policy::Canary(canary) => Box::new(std::iter::once(canary.candidate.as_str())),
        }
    }

    /// The policy's id, if it has one.
    pub fn id(&self) -> Option<&str> {
        match self {
            Policy::Primary => None,
            Policy::Split(s) => Some(&s.id),
            Policy::Shadow(s) => Some(&s.id),
            Policy::Canary(c) => Some(&c.id),
        }
    }

    /// Checks the policy's own shape (not whether its versions are installed).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(id) = self.id()
            && (id.is_empty() || id.len() > MAX_POLICY_ID || id.chars().any(char::is_control))
        {
            return Err(format!(
                "a policy needs an id of 1 to {MAX_POLICY_ID} characters, without control characters"
            ));
        }
        let split = match self {
            Policy::Primary => return Ok(()),
            Policy::Split(split) => split,
            Policy::Shadow(shadow) => return shadow.validate(),
            Policy::Canary(canary) => return canary.validate(),
        };
        if split.weights.is_empty() || split.weights.len() > MAX_SPLIT_VERSIONS {
            return Err(format!(
                "a split names 1 to {MAX_SPLIT_VERSIONS} versions, not {}",
                split.weights.len()
            ));
        }
        if split.weights.values().all(|&w| w == 0) {
            return Err("a split needs at least one version with a weight above 0".into());
        }
        Ok(())
    }
}

impl Shadow {
    fn validate(&self) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return Err(format!(
                "a shadow's sample_percent is 0 to 100, not {}",
                self.sample_percent
            ));
        }
        if self.queue == 0 || self.queue > MAX_SHADOW_QUEUE {
            return Err(format!(
                "a shadow's queue holds 1 to {MAX_SHADOW_QUEUE} requests, not {}",
                self.queue
            ));
        }
        if let Compare::Tolerance(t) = self.compare
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!(
                "a tolerance is a finite number of at least 0, not {t}"
            ));
        }
        Ok(())
    }

    /// Whether this request is copied to the candidate (a random draw).
    pub fn samples(&self) -> bool {
        (random_point() as f64) < self.sample_percent * 100.0
    }
}

impl Canary {
    fn validate(&self) -> Result<(), String> {
        if !(self.percent > 0.0 && self.percent < 100.0) {
            return Err(format!(
                "a canary's percent is above 0 and below 100, not {}",
                self.percent
            ));
        }
        if self.window_s == 0 || self.window_s > 7 * 86_400 {
            return Err(format!(
                "a canary's window_s is 1 to 604800 seconds, not {}",
                self.window_s
            ));
        }
        let most = crate::watch::MAX_WINDOW_SAMPLES as u64;
        if self.min_requests == 0 || self.min_requests > most {
            return Err(format!(
                "a canary's min_requests is 1 to {most} (the requests its window keeps per version), not {}",
                self.min_requests
            ));
        }
        if !(0.0..=1.0).contains(&self.max_error_rate_delta) {
            return Err(format!(
                "a canary's max_error_rate_delta is 0 to 1, not {}",
                self.max_error_rate_delta
            ));
        }
        if !(self.max_p95_ratio.is_finite() && self.max_p95_ratio >= 1.0) {
            return Err(format!(
                "a canary's max_p95_ratio is a finite number of at least 1, not {}",
                self.max_p95_ratio
            ));
        }
        Ok(())
    }

    /// Whether the request with `key` (or, without one, a random draw) goes to the candidate:
    /// the canary routes as a split of `100 - percent` to the active version and `percent` to
    /// the candidate, under its id.
    pub fn to_candidate(&self, key: Option<&str>) -> bool {
        let point = match key {
            Some(key) => keyed_point(&self.id, key),
            None => random_point(),
        };
        // The active version's share comes first, as in a split listing it first.
        (point as f64) >= (100.0 - self.percent) * 100.0
    }
}

impl Split {
    /// The version that answers a request with this `key` (or, without one, a random draw).
    pub fn route(&self, key: Option<&str>) -> &str {
        let point = match key {
            Some(key) => keyed_point(&self.id, key),
            None => random_point(),
        };
        self.pick(point)
    }

    /// The version whose share of [0, 10,000) holds `point`.
    fn pick(&self, point: u64) -> &str {
        let total: u64 = self.weights.values().map(|&w| u64::from(w)).sum();
        let mut upto = 0u64;
        let mut last = "";
        for (version, &weight) in &self.weights {
            if weight == 0 {
                continue;
            }
            upto += u64::from(weight);
            last = version;
            if point * total < upto * 10_000 {
                return version;
            }
        }
        last
    }
}

/// The routing point of `key` under the split `id`.
pub fn keyed_point(id: &str, key: &str) -> u64 {
    let mut bytes = Vec::with_capacity(id.len() + 1 + key.len());
    bytes.extend_from_slice(id.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(key.as_bytes());
    let hex = outpost_bundle::sha256_hex(&bytes);
    u64::from_str_radix(hex.get(..16).unwrap_or("0"), 16).unwrap_or(0) % 10_000
}

/// A point drawn at random (splitmix64 over a counter seeded from the clock).
fn random_point() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = STATE.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % 10_000
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn split(weights: &[(&str, u32)]) -> Split {
        Split {
            id: "ab-1".into(),
            weights: weights.iter().map(|&(v, w)| (v.to_owned(), w)).collect(),
        }
    }

    #[test]
    fn shares_follow_the_weights_and_keys_stick() {
        let s = split(&[("1.0.0", 80), ("2.0.0", 20)]);
        assert_eq!(s.pick(0), "1.0.0");
        assert_eq!(s.pick(7_999), "1.0.0");
        assert_eq!(s.pick(8_000), "2.0.0");
        assert_eq!(s.pick(9_999), "2.0.0");
        let to_b = (0..10_000)
            .filter(|i| s.route(Some(&format!("user-{i}"))) == "2.0.0")
            .count();
        assert!((1_800..=2_200).contains(&to_b), "{to_b} of 10,000 to 2.0.0");
        for i in 0..100 {
            let key = format!("user-{i}");
            assert_eq!(s.route(Some(&key)), s.route(Some(&key)));
        }
        let unkeyed = (0..10_000).filter(|_| s.route(None) == "2.0.0").count();
        assert!(
            (1_700..=2_300).contains(&unkeyed),
            "{unkeyed} unkeyed to 2.0.0"
        );
    }

    #[test]
    fn a_zero_weight_gets_nothing_and_the_hash_is_fixed() {
        let s = split(&[("1.0.0", 0), ("2.0.0", 3)]);
        assert!((0..10_000).all(|p| s.pick(p) == "2.0.0"));
        // The routing hash is part of the contract: devices and the fleet must agree on it.
        assert_eq!(keyed_point("ab-1", "user-1"), keyed_point("ab-1", "user-1"));
        assert_ne!(keyed_point("ab-1", "user-1"), keyed_point("ab-2", "user-1"));
    }

    #[test]
    fn bad_policies_say_why() {
        assert!(Policy::Primary.validate().is_ok());
        let bad = |p: Policy| p.validate().unwrap_err();
        assert!(bad(Policy::Split(split(&[]))).contains("1 to 8"));
        assert!(bad(Policy::Split(split(&[("1.0.0", 0)]))).contains("above 0"));
        let mut s = split(&[("1.0.0", 1)]);
        s.id = String::new();
        assert!(bad(Policy::Split(s)).contains("id"));
        let policy: Policy =
            serde_json::from_str(r#"{"split":{"id":"x","weights":{"1.0.0":1}}}"#).unwrap();
        assert_eq!(policy.versions().collect::<Vec<_>>(), ["1.0.0"]);
        assert!(serde_json::from_str::<Policy>(r#"{"split":{"id":"x"}}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Policy>(r#""primary""#).unwrap(),
            Policy::Primary
        );
    }
}
