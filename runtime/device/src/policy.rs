//! A model's traffic policy over its resident versions: the active version answers everything
//! (`primary`, the default), or a split (A/B) sends each request to one of several versions by
//! weight.
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Policy {
    /// The active version answers every request.
    #[default]
    Primary,
    /// Each request goes to one version, in proportion to its weight.
    Split(Split),
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
    pub fn versions(&self) -> impl Iterator<Item = &str> {
        let weights = match self {
            Policy::Primary => None,
            Policy::Split(split) => Some(&split.weights),
        };
        weights
            .into_iter()
            .flat_map(|w| w.keys().map(String::as_str))
    }

    /// Checks the policy's own shape (not whether its versions are installed).
    pub fn validate(&self) -> Result<(), String> {
        let Policy::Split(split) = self else {
            return Ok(());
        };
        if split.id.is_empty()
            || split.id.len() > MAX_POLICY_ID
            || split.id.chars().any(char::is_control)
        {
            return Err(format!(
                "a split needs an id of 1 to {MAX_POLICY_ID} characters, without control characters"
            ));
        }
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
