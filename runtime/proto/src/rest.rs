//! The fleet manager's REST API as types: what `/api/v1/...` accepts and answers. The fleet
//! serves them and `outpost-client` reads them, so neither side spells JSON by hand.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ReportedState, TelemetryRecord};

/// `GET /api/v1/fleet`: the replica answering, and how devices reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetInfo {
    /// This replica's name.
    pub replica: String,
    /// The broker it uses (`mqtt://HOST:PORT`).
    pub broker: String,
    /// The fleet's public key (hex): devices accept desired states it signed.
    pub public_key: String,
    /// That key's id.
    pub key_id: String,
    /// Base URL of the artifact store.
    pub artifacts: String,
    /// Whether the replica is connected to the broker.
    pub broker_connected: bool,
    /// Whether this replica holds the publishing role (one replica on a shared database
    /// does; it takes pushes, deployments and rollouts).
    #[serde(default)]
    pub publishing: bool,
    /// Where it keeps its state (`sled at DIR`, `postgres at HOST:PORT/DB`).
    #[serde(default)]
    pub store: String,
}

/// What the fleet knows about one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Device id.
    pub id: String,
    /// Whether its presence says online.
    pub online: bool,
    /// Unix seconds of the last message from it.
    pub last_seen: Option<u64>,
    /// Its last reported state.
    pub reported: Option<ReportedState>,
    /// Telemetry and event records stored (each once).
    pub records: u64,
    /// Records received more than once (re-sent after a lost acknowledgement) and discarded.
    pub duplicates: u64,
    /// Records that differed from one already stored under the same sequence number: someone
    /// else published as this device. Both are kept (up to four per number).
    #[serde(default)]
    pub conflicts: u64,
    /// Records it dropped (outbox quota, full disk), as it last said.
    pub dropped: u64,
    /// Bytes of its telemetry and events the fleet holds now.
    #[serde(default)]
    pub stored_bytes: u64,
    /// Records the fleet refused because it held its quota of them already.
    #[serde(default)]
    pub over_quota: u64,
    /// The last event it sent.
    pub last_event: Option<serde_json::Value>,
}

impl DeviceRecord {
    /// Whether the device counts as online at `now`: its presence says so and it was heard
    /// from within three telemetry intervals (at least 30 s). The second condition covers a
    /// broker that lost the device's last will.
    pub fn is_online(&self, now: u64) -> bool {
        let interval_s = self
            .reported
            .as_ref()
            .and_then(|r| r.telemetry_interval_ms)
            .map_or(60, |ms| ms.div_ceil(1000));
        let grace = (3 * interval_s).max(30);
        self.online && self.last_seen.is_some_and(|seen| seen + grace >= now)
    }
}

/// `GET /api/v1/devices[/{id}]`: one device with the fleet's desired state for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    /// The registry record.
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// The generation the fleet last signed for it.
    pub desired_generation: Option<u64>,
    /// What the fleet wants on it: model → version.
    pub desired: std::collections::BTreeMap<String, String>,
    /// Whether it reports having applied the fleet's current generation.
    pub in_sync: bool,
    /// Whether it holds credentials from `outpost fleet enroll`.
    #[serde(default)]
    pub enrolled: bool,
}

/// The most devices one page of `GET /api/v1/devices` holds.
pub const MAX_DEVICE_PAGE: usize = 1000;

/// The header of a `GET /api/v1/devices` page that names the device id to pass as `after` for
/// the next page (absent on the last page). A `Link: <...>; rel="next"` header says the same.
pub const NEXT_AFTER_HEADER: &str = "x-next-after";

/// Whether a device counts as online (see [`DeviceRecord::is_online`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// Its presence says online and it was heard from lately.
    Online,
    /// Anything else.
    Offline,
}

/// What `GET /api/v1/devices` selects: a page of devices in id order, filtered. Without
/// `limit` the answer holds every device that matches (what older clients expect); with it,
/// at most `limit` (up to [`MAX_DEVICE_PAGE`]) and the next page's `after` in
/// [`NEXT_AFTER_HEADER`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceQuery {
    /// At most this many devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Only devices whose id sorts after this one (the last id of the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Only devices reporting this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Only online or only offline devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// Only devices reporting this model active (at `version` when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Only devices reporting this version active (of `model` when given, else of any model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Only devices that have (or have not) applied the fleet's current desired state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_sync: Option<bool>,
}

impl DeviceQuery {
    /// Whether `record` passes the filters at `now` (all but `in_sync`, which needs the
    /// desired state).
    pub fn admits(&self, record: &DeviceRecord, now: u64) -> bool {
        if let Some(status) = self.status
            && record.is_online(now) != (status == DeviceStatus::Online)
        {
            return false;
        }
        let reported = record.reported.as_ref();
        if let Some(tag) = &self.tag
            && !reported.is_some_and(|r| r.tags.iter().any(|t| t == tag))
        {
            return false;
        }
        match (&self.model, &self.version) {
            (None, None) => true,
            (Some(model), version) => reported.is_some_and(|r| {
                r.active
                    .get(model)
                    .is_some_and(|v| version.as_ref().is_none_or(|want| v == want))
            }),
            (None, Some(version)) => {
                reported.is_some_and(|r| r.active.values().any(|v| v == version))
            }
        }
    }
}

/// `POST /api/v1/devices/{id}/enrolment`: a device's new broker credentials. The password is
/// shown this once; the fleet keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// The device id.
    pub device: String,
    /// Its broker user name (the device id).
    pub username: String,
    /// Its broker password.
    pub password: String,
    /// The broker URL devices connect to.
    pub broker: String,
    /// The fleet's public key (hex), for the device's `fleet_key`.
    pub fleet_key: String,
    /// Whether it replaced earlier credentials (which no longer work).
    pub replaced: bool,
}

/// `DELETE /api/v1/devices/{id}/enrolment`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The device id.
    pub revoked: String,
    /// What happens next.
    pub note: String,
}

/// `DELETE /api/v1/devices/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forgotten {
    /// The device id.
    pub forgotten: String,
    /// What happens next.
    pub note: String,
}

/// A bundle in the artifact store (`GET`/`POST /api/v1/bundles`, `DELETE` answers it too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the file: its address in the store.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Key id of the signer.
    pub signer: Option<String>,
    /// Security counter.
    pub security_counter: u64,
    /// Unix seconds when it was pushed.
    pub pushed_at: u64,
}

/// One `deploy` the operator asked for (`GET /api/v1/deployments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// Sequential id.
    pub id: u64,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Bundle digest.
    pub digest: String,
    /// Target devices.
    pub devices: Vec<String>,
    /// Unix seconds when it was made.
    pub created_at: u64,
}

/// `POST /api/v1/deployments`: a bundle version to a set of devices.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeployRequest {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Named devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device that reports this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Every known device.
    #[serde(default)]
    pub all: bool,
    /// A traffic policy the version serves under instead of being activated (see
    /// [`crate::Deployment::policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
}

/// The answer to a deploy request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployResponse {
    /// The recorded deployment.
    pub deployment: DeploymentRecord,
    /// The new generation per device.
    pub generations: Vec<(String, u64)>,
}

/// A stored telemetry record or event, with its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    /// Device id.
    pub device: String,
    /// The record as the device sent it.
    #[serde(flatten)]
    pub record: TelemetryRecord,
}

/// `GET /api/v1/telemetry` and `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Records {
    /// In sequence order per device.
    pub records: Vec<StoredRecord>,
}

/// What `GET /api/v1/telemetry` and `/api/v1/events` select.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordQuery {
    /// Only this device.
    pub device: Option<String>,
    /// Only records after this sequence number.
    pub after: Option<u64>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// `POST /api/v1/rollouts`: a version rolled out to a target in stages, each gated on the
/// telemetry of the devices it reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRequest {
    /// Model name.
    pub model: String,
    /// The version rolled out (pushed already).
    pub version: String,
    /// Named devices.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every device that reports this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Every known device.
    #[serde(default)]
    pub all: bool,
    /// The stages, in order; the last should reach the whole target.
    pub stages: Vec<Stage>,
    /// Checks every stage must pass before the next begins.
    #[serde(default)]
    pub gates: Vec<Gate>,
    /// Seconds a stage may take to gather its gates' data after its soak before the rollout
    /// pauses (no data is not a pass).
    #[serde(default = "default_deadline")]
    pub deadline_s: u64,
    /// What a failed gate (or a device's canary rollback) does.
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What a rollout does when a stage fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Abort, and give every device it reached its previous version.
    #[default]
    Rollback,
    /// Pause where it is, for an operator to look (resume checks again; abort rolls back).
    Pause,
}

fn default_deadline() -> u64 {
    600
}

/// One stage of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// How much of the target the rollout has reached at the end of this stage.
    pub reach: Reach,
    /// Seconds to wait after every device of the stage applied the version, before the gates.
    #[serde(default)]
    pub soak_s: u64,
    /// On the stage's new devices, run the version as a canary against the version it
    /// replaces instead of activating it: the device's canary policy without `id` and
    /// `candidate` (the fleet names them), e.g. `{"percent": 10, "max_p95_ratio": 2}`. A
    /// device rolls a failing canary back by itself, which fails the stage; the next stage (or
    /// the rollout's success) activates the version on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<serde_json::Value>,
}

/// A share of a rollout's target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reach {
    /// A number of devices.
    Count(u64),
    /// A percentage of the target (rounded up, at least one device).
    Percent(f64),
}

impl Reach {
    /// How many of `total` devices this reaches.
    pub fn of(self, total: usize) -> usize {
        let n = match self {
            Reach::Count(n) => usize::try_from(n).unwrap_or(usize::MAX),
            Reach::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
        };
        n.clamp(1, total.max(1)).min(total)
    }
}

/// A check on the telemetry of a stage's devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// What is measured over the window, summed over the stage's devices.
    pub metric: GateMetric,
    /// The largest value that passes: absolute, or with `relative` a multiple of the same
    /// metric of the version it replaces, on every device of the target over the window
    /// before the stage deployed.
    pub max: f64,
    /// Whether `max` is a multiple of the replaced version's value.
    #[serde(default)]
    pub relative: bool,
    /// Seconds of telemetry the gate looks at.
    #[serde(default = "default_gate_window")]
    pub window_s: u64,
    /// Requests the version must have served in the window, over the stage's devices.
    #[serde(default = "default_gate_requests")]
    pub min_requests: u64,
    /// Devices of the stage that must have served requests in the window.
    #[serde(default = "one")]
    pub min_devices: u64,
}

fn default_gate_window() -> u64 {
    60
}
fn default_gate_requests() -> u64 {
    100
}
fn one() -> u64 {
    1
}

/// What a gate measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    /// Failed requests the version caused (trap, deadline, memory, internal) per request.
    ErrorRate,
    /// The 95th percentile latency in seconds, from the merged latency histograms (the upper
    /// bound of the bucket it falls in).
    P95Latency,
}

impl std::fmt::Display for GateMetric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GateMetric::ErrorRate => "error_rate",
            GateMetric::P95Latency => "p95_latency",
        })
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RolloutState {
    /// Moving: deploying, waiting for devices to apply, soaking or gating stage `stage`.
    Progressing {
        /// The stage (0-based).
        stage: usize,
    },
    /// Stopped at `stage` by an operator or because a stage could not gather its gates' data
    /// in time; resume carries on.
    Paused {
        /// The stage (0-based).
        stage: usize,
        /// Why.
        reason: String,
    },
    /// Every stage passed.
    Succeeded,
    /// A gate failed or an operator aborted: the devices it reached are being rolled back.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Aborted, and every device it reached was given back its previous version.
    RolledBack {
        /// Why it was aborted.
        reason: String,
    },
}

impl RolloutState {
    /// Whether nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded | RolloutState::RolledBack { .. }
        )
    }
}

/// A rollout as the fleet stores and shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    /// Id.
    pub id: u64,
    /// What was asked.
    pub request: RolloutRequest,
    /// The target devices, in the order stages take them.
    pub targets: Vec<String>,
    /// The version each target ran before (the fallback), when it had one.
    pub fallback: BTreeMap<String, String>,
    /// Where it is.
    pub state: RolloutState,
    /// Devices the rollout has deployed to, in order.
    pub reached: Vec<String>,
    /// Of those, the ones running the version as a canary (activated when the stage passes).
    #[serde(default)]
    pub canaried: Vec<String>,
    /// Of those, the ones given their previous version back by an abort so far.
    #[serde(default)]
    pub restored: Vec<String>,
    /// Unix seconds of the last resume (0: never): failures devices reported before it were
    /// seen by the operator who resumed.
    #[serde(default)]
    pub resumed_at: u64,
    /// Unix seconds when the current stage deployed (0 before).
    pub stage_started: u64,
    /// Unix seconds when every device of the current stage applied the version (0 before).
    pub stage_applied: u64,
    /// What happened, one line per decision, oldest first.
    pub history: Vec<HistoryLine>,
    /// Unix seconds.
    pub created_at: u64,
}

/// One decision of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryLine {
    /// Unix seconds.
    pub time: u64,
    /// What was decided, and why.
    pub text: String,
}

/// What `GET /api/v1/drift` and `GET /api/v1/quality` select.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorQuery {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Only devices reporting this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Only the last this many seconds (default: everything since each device started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Fleet-wide drift of one model version against its bundle's training baseline: the
/// devices' bin counts added up, and the PSI of the sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDrift {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// The bundle's digest.
    pub digest: String,
    /// The tag asked for, if any.
    pub tag: Option<String>,
    /// The window asked for, in seconds (`None`: since each device started).
    pub window_s: Option<u64>,
    /// PSI threshold of moderate drift (from the bundle).
    pub moderate: f64,
    /// PSI threshold of significant drift.
    pub significant: f64,
    /// Devices that counted observations of this version.
    pub devices: u64,
    /// One entry per baseline feature.
    pub features: Vec<FleetFeatureDrift>,
}

/// One feature's fleet-wide drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetFeatureDrift {
    /// Feature name.
    pub feature: String,
    /// Whether it is a model output (prediction drift).
    pub output: bool,
    /// Observations, all devices together.
    pub n: u64,
    /// PSI of the pooled counts (`None` with none).
    pub psi: Option<f64>,
    /// `stable`, `moderate` or `significant`.
    pub level: Option<String>,
    /// Pooled mean.
    pub mean: Option<f64>,
    /// Pooled standard deviation.
    pub std: Option<f64>,
    /// Pooled counts: underflow, the bins, overflow.
    pub counts: Vec<u64>,
    /// The baseline's edges.
    pub edges: Vec<f64>,
    /// The baseline's expected share per slot.
    pub expected: Vec<f64>,
    /// Each device's part.
    pub per_device: Vec<DeviceFeatureDrift>,
}

/// One device's part of a feature's drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFeatureDrift {
    /// Device id.
    pub device: String,
    /// Its observations.
    pub n: u64,
    /// The PSI of its counts alone.
    pub psi: Option<f64>,
}

/// What `GET /api/v1/compare` looks at: one model, optionally a tag and a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareQuery {
    /// Model name.
    pub model: String,
    /// Only devices reporting this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Only the last this many seconds (default: everything since each device started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// Every version of one model that devices served in the window, by its part in their
/// traffic policies (`primary`, `candidate` of an A/B split or a canary, `shadow`), side by
/// side: what an operator reads to judge an A/B test or a shadow before promoting it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetComparison {
    /// Model name.
    pub model: String,
    /// The tag filter, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The window in seconds (`None`: since each device started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
    /// One entry per version and role, primaries first.
    pub versions: Vec<VersionComparison>,
}

/// One version in one role, its devices' counters added up over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionComparison {
    /// Model version.
    pub version: String,
    /// `primary`, `candidate` or `shadow`.
    pub role: String,
    /// Devices that served it in this role in the window.
    pub devices: u64,
    /// Requests it served (a shadow: the copies it ran).
    pub requests: u64,
    /// Failed requests among them (server-side failures, as rollout gates count them).
    pub errors: u64,
    /// `errors / requests`, when there were requests.
    pub error_rate: Option<f64>,
    /// 95th percentile latency in seconds (upper bound of its histogram bucket).
    pub p95_latency_s: Option<f64>,
    /// Accuracy from the labels posted for this version (every role), when any were.
    pub accuracy: Option<f64>,
    /// Mean absolute error from the labels posted (a regression model).
    pub mae: Option<f64>,
    /// Labels joined.
    pub labels: u64,
    /// A shadow's comparisons with the primary's answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowComparison>,
}

/// A shadow's answers compared with the primary's over the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowComparison {
    /// Answers that agreed with the primary's.
    pub agreed: u64,
    /// Answers that did not (a shadow's error included).
    pub disagreed: u64,
    /// Copies dropped because the shadow's queue was full.
    pub dropped: u64,
    /// `agreed / (agreed + disagreed)`, when any were compared.
    pub agreement: Option<f64>,
}

/// Fleet-wide model quality of one version from ground-truth feedback: the devices' labels
/// and correct predictions (or absolute errors) added up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetQuality {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// The tag asked for, if any.
    pub tag: Option<String>,
    /// The window asked for, in seconds (`None`: since each device started).
    pub window_s: Option<u64>,
    /// `classification` or `regression` (`None` before any device reported labels).
    pub task: Option<String>,
    /// Devices that joined labels for this version.
    pub devices: u64,
    /// Labels joined, all devices together.
    pub labels: u64,
    /// Correct predictions among them (classification).
    pub correct: u64,
    /// Accuracy (classification).
    pub accuracy: Option<f64>,
    /// Mean absolute error (regression).
    pub mae: Option<f64>,
    /// Each device's part.
    pub per_device: Vec<DeviceQuality>,
}

/// One device's part of a version's quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceQuality {
    /// Device id.
    pub device: String,
    /// Labels it joined.
    pub labels: u64,
    /// Its accuracy (classification).
    pub accuracy: Option<f64>,
    /// Its mean absolute error (regression).
    pub mae: Option<f64>,
}

/// One firing of a fleet rule: what crossed its threshold, and every delivery attempt of its
/// actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiringRecord {
    /// Increasing id.
    pub id: u64,
    /// The rule's name.
    pub rule: String,
    /// The metric (`feature_psi`, `accuracy`, …).
    pub metric: String,
    /// The value that crossed (the worst device's with per-device aggregation).
    pub value: f64,
    /// `>`, `>=`, `<` or `<=`.
    pub op: String,
    /// The rule's threshold.
    pub threshold: f64,
    /// The window the value was measured over, in seconds.
    pub window_s: u64,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// The version's bundle digest.
    pub digest: String,
    /// The tag the rule is scoped to, if any.
    pub tag: Option<String>,
    /// The devices involved (those that crossed, with per-device aggregation).
    pub devices: Vec<String>,
    /// The features involved (for drift metrics).
    pub features: Vec<String>,
    /// Stable across the firing's retries: a receiver de-duplicates on it.
    pub fingerprint: String,
    /// Unix seconds it fired.
    pub time: u64,
    /// Every attempt at delivering it, in order.
    pub attempts: Vec<DeliveryAttempt>,
    /// Whether an action accepted it (true with no action).
    pub delivered: bool,
}

/// One attempt at delivering a firing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    /// `webhook` or `command`.
    pub action: String,
    /// Unix seconds.
    pub time: u64,
    /// Whether it was accepted (a 2xx answer, an exit status of 0).
    pub ok: bool,
    /// What happened: the HTTP status, the exit status, or the error.
    pub outcome: String,
}

/// A rule and its state per model version, as `GET /api/v1/rules` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleView {
    /// The rule's name.
    pub name: String,
    /// The rule as written (JSON form of its `[[rule]]` table).
    pub spec: serde_json::Value,
    /// Its state per model version evaluated.
    pub versions: Vec<RuleState>,
}

/// A rule's state for one model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleState {
    /// Model version.
    pub version: String,
    /// The last value measured (`None`: not enough data).
    pub value: Option<f64>,
    /// Whether the last value crossed the threshold.
    pub breaching: bool,
    /// Evaluations in a row that crossed.
    pub streak: u32,
    /// Unix seconds of the last evaluation.
    pub evaluated_at: Option<u64>,
    /// Unix seconds of the last firing.
    pub fired_at: Option<u64>,
    /// Why there is no value, or what was measured.
    pub note: String,
}

/// What `GET /api/v1/series` selects: a model version's counters over time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesQuery {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Only devices reporting this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Seconds back from now (default 900, at most 7 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<u64>,
    /// Seconds per point (default: a thirtieth of the span; at most 120 points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
}

/// A model version's traffic, errors, latency and drift over time, all devices together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSeries {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: String,
    /// Seconds per point.
    pub step_s: u64,
    /// Oldest first.
    pub points: Vec<SeriesPoint>,
}

/// One step of a [`FleetSeries`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeriesPoint {
    /// Unix seconds at the end of the step.
    pub time: u64,
    /// Requests served in the step.
    pub requests: u64,
    /// Of those, failures the version caused.
    pub errors: u64,
    /// The 95th percentile latency in seconds (`None` without requests).
    pub p95_latency: Option<f64>,
    /// PSI per baseline feature of the step's observations (absent without any).
    pub psi: BTreeMap<String, f64>,
}
