//! The messages devices send: the reported state, presence, telemetry batches, and the events
//! inside them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;

/// What a device reports about itself (retained on `reported`).
///
/// Unknown fields are ignored and new fields default, so a fleet and its devices can be upgraded
/// one after the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedState {
    /// Protocol version.
    pub v: u32,
    /// The device id.
    pub device: crate::DeviceId,
    /// Runtime version (`outpost --version`).
    pub runtime_version: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Last desired-state generation applied completely.
    pub generation: Option<u64>,
    /// Highest desired-state generation accepted (applied or being applied).
    #[serde(default)]
    pub accepted_generation: Option<u64>,
    /// Active version per model.
    pub active: BTreeMap<String, String>,
    /// Installed bundles as `model@version`.
    #[serde(default)]
    pub installed: Vec<String>,
    /// The id of each model's traffic policy, for models with one other than `primary`.
    #[serde(default)]
    pub policies: BTreeMap<String, String>,
    /// Groups this device belongs to, from its configuration.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The last error, if the last reconcile failed.
    pub last_error: Option<String>,
    /// Whether that failure looked transient and a retry is scheduled.
    #[serde(default)]
    pub retrying: bool,
    /// Records waiting in the telemetry outbox.
    #[serde(default)]
    pub outbox_pending: u64,
    /// Records dropped since the device was set up: the outbox quota's oldest, and those a
    /// full disk refused.
    #[serde(default)]
    pub outbox_dropped: u64,
    /// How often the device sends telemetry (the fleet counts a device silent for several
    /// intervals as offline, even when a broker lost its last will).
    #[serde(default)]
    pub telemetry_interval_ms: Option<u64>,
}

/// Online/offline, retained on `status` (the last will carries the offline one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Protocol version.
    pub v: u32,
    /// Whether the sender is connected.
    pub online: bool,
}

impl Presence {
    /// The JSON bytes of an online or offline presence message.
    pub fn to_vec(online: bool) -> Vec<u8> {
        serde_json::to_vec(&Presence {
            v: PROTOCOL_VERSION,
            online,
        })
        .unwrap_or_default()
    }

    /// Whether a presence payload says online (anything unreadable counts as offline).
    pub fn is_online(payload: &[u8]) -> bool {
        serde_json::from_slice::<Presence>(payload).is_ok_and(|p| p.online)
    }
}

/// One record of the store-and-forward telemetry stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Per-device sequence number: the fleet de-duplicates on (device, seq).
    pub seq: u64,
    /// Unix seconds when it was taken.
    pub time: u64,
    /// What it measures and its values.
    pub body: serde_json::Value,
}

/// A batch of telemetry records (QoS 1 on `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Protocol version.
    pub v: u32,
    /// The device id.
    pub device: crate::DeviceId,
    /// Records in sequence order.
    pub records: Vec<TelemetryRecord>,
    /// Records dropped on this device so far, by the outbox quota or a full disk (never silent).
    pub dropped: u64,
}

/// What happened on a device, as it tells its fleet (the body of a record on `events`).
///
/// A fleet stores event bodies as they come, so a newer device's events (new kinds, new
/// fields) are kept even by a fleet that cannot name them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A newer desired state was accepted and stored.
    DesiredAccepted {
        /// Its generation.
        generation: u64,
    },
    /// A desired state was refused (unsigned, wrongly signed, for another device, expired,
    /// older than the accepted one).
    DesiredRefused {
        /// Why.
        reason: String,
    },
    /// A bundle is being downloaded.
    Downloading {
        /// The desired-state generation.
        generation: u64,
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// Bundle size in bytes.
        size: u64,
    },
    /// A version was activated.
    Activated {
        /// The desired-state generation.
        generation: u64,
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// Bundle digest.
        digest: String,
    },
    /// A deployment of the desired state failed.
    DeploymentFailed {
        /// The desired-state generation.
        generation: u64,
        /// Model name.
        model: String,
        /// Model version.
        version: String,
        /// What failed.
        error: String,
        /// Whether the device retries it.
        will_retry: bool,
    },
    /// Every deployment of the desired state is in place.
    Reconciled {
        /// Its generation.
        generation: u64,
    },
    /// A canary crossed a bound of its policy and the device rolled it back by itself: the
    /// candidate gets no more traffic and is unloaded.
    CanaryRolledBack {
        /// Model name.
        model: String,
        /// The canary policy's id.
        policy: String,
        /// The version rolled back.
        candidate: String,
        /// The version it was compared with, which answers everything again.
        primary: String,
        /// The bound crossed, with the figures.
        reason: String,
        /// The candidate's requests in the window.
        candidate_requests: u64,
        /// The primary's requests in the window.
        primary_requests: u64,
    },
    /// A canary stayed within its bounds for its whole window.
    CanaryPassed {
        /// Model name.
        model: String,
        /// The canary policy's id.
        policy: String,
        /// The version that passed.
        candidate: String,
        /// The version it was compared with.
        primary: String,
        /// Whether the device activated the candidate (otherwise it holds the canary for the
        /// fleet to decide).
        promoted: bool,
        /// The candidate's requests in the window.
        candidate_requests: u64,
        /// The primary's requests in the window.
        primary_requests: u64,
    },
}

/// One model version's request counters, as telemetry carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSeries {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// The version's part in its model's traffic policy: `primary`, `candidate` or `shadow`
    /// (a device before traffic policies sends none: `primary`).
    #[serde(default = "primary_role")]
    pub role: String,
    /// Requests served (successful or not).
    pub requests: u64,
    /// Failed requests by kind.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Latency histogram: counts per bucket (cumulative), with the bucket bounds in seconds.
    #[serde(default)]
    pub latency_buckets: Vec<(f64, u64)>,
    /// Sum of latencies in seconds.
    #[serde(default)]
    pub latency_sum: f64,
}

fn primary_role() -> String {
    "primary".into()
}

/// A periodic telemetry record's body (on `telemetry`). Unknown fields are ignored and missing
/// ones default, so fleets and devices can be upgraded one after the other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TelemetrySample {
    /// Seconds since the runtime started.
    pub uptime_s: u64,
    /// Runtime version.
    pub runtime_version: String,
    /// CPU seconds the process used.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub rss_bytes: u64,
    /// Bytes the device's databases occupy.
    pub disk_bytes: u64,
    /// Request counters per model version.
    pub models: Vec<ModelSeries>,
    /// Each shadow candidate's comparisons with its primary.
    pub shadows: Vec<ShadowSeries>,
    /// Drift counters per model version and baseline feature (since the device started).
    pub drift: Vec<DriftSeries>,
    /// Ground-truth feedback per model version (since the device started).
    pub quality: Vec<QualitySeries>,
}

/// One model version's labels joined with its predictions, as telemetry carries them:
/// cumulative since the device started, so a fleet subtracts two records and adds devices up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QualitySeries {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// `classification` or `regression`.
    pub task: String,
    /// Labels joined.
    pub labels: u64,
    /// Of those, predicted correctly (classification).
    pub correct: u64,
    /// Summed absolute error (regression).
    pub abs_error: f64,
}

/// One drift feature's counters for one model version, as telemetry carries them: cumulative
/// since the device started, so a fleet subtracts two records for a window and adds devices
/// up bin by bin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DriftSeries {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Feature name, as the bundle's baseline names it.
    pub feature: String,
    /// Whether the feature is a model output (prediction drift).
    pub output: bool,
    /// Observations per slot: underflow, the baseline's bins, overflow.
    pub counts: Vec<u64>,
    /// Observations counted.
    pub n: u64,
    /// The value the sums are taken around (the baseline's mean, fixed per bundle).
    pub center: f64,
    /// Σ (x − center).
    pub sum: f64,
    /// Σ (x − center)².
    pub sum_sq: f64,
}

/// A shadow candidate's counters, as telemetry carries them (since the device started).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShadowSeries {
    /// Model name.
    pub model: String,
    /// The shadow's version.
    pub version: String,
    /// Answers that agreed with the primary's.
    pub agreed: u64,
    /// Answers that did not (a shadow's error included).
    pub disagreed: u64,
    /// Copies dropped because the shadow's queue was full.
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn events_are_tagged_and_tolerate_new_fields() {
        let e = Event::Reconciled { generation: 3 };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event": "reconciled", "generation": 3})
        );
        let newer = serde_json::json!({"event": "reconciled", "generation": 3, "took_ms": 9});
        assert_eq!(serde_json::from_value::<Event>(newer).unwrap(), e);
        let sample: TelemetrySample =
            serde_json::from_value(serde_json::json!({"uptime_s": 5, "gpu": 1})).unwrap();
        assert_eq!(sample.uptime_s, 5);
    }
}
