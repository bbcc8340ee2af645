//! Retraining triggers: rules over the fleet's telemetry (drift, quality from feedback, errors,
//! latency, shadow agreement, traffic), evaluated on a schedule, that fire actions — a webhook
//! signed with HMAC-SHA256, or a local command with the same JSON on stdin — with retries, and
//! record every firing and attempt in the store.
//!
//! A rule fires when its condition held for `consecutive` evaluations in a row, then not again
//! for `cooldown_s`: one spike does not fire it, sustained drift fires it once per cooldown.
//! The rule file (`fleet serve --rules FILE`) is TOML; `docs/rules.md` documents it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_proto::TelemetrySample;
use outpost_proto::rest::{
    DeliveryAttempt, FiringRecord, GateMetric, MonitorQuery, RuleState, RuleView,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rollout::{Window, counters};
use crate::store::now_secs;
use crate::{Fleet, FleetError, Result};

/// Most rules one file may hold.
pub const MAX_RULES: usize = 256;
/// The signature header on a webhook request: `sha256=` and the hex HMAC-SHA256 of the body
/// under the rule's secret.
pub const SIGNATURE_HEADER: &str = "outpost-signature";
/// The header carrying the firing's fingerprint.
pub const FINGERPRINT_HEADER: &str = "outpost-fingerprint";

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// PSI of an input feature (the largest over the baseline's inputs, or `feature`).
    FeaturePsi,
    /// PSI of an output feature (prediction drift).
    PredictionPsi,
    /// Accuracy from ground-truth feedback.
    Accuracy,
    /// Mean absolute error from ground-truth feedback.
    Mae,
    /// Failed requests the version caused, per request.
    ErrorRate,
    /// The 95th percentile latency in seconds.
    P95Latency,
    /// A shadow's answers that agreed with the primary's, per comparison.
    ShadowAgreement,
    /// Requests served in the window.
    Requests,
}

impl Metric {
    fn as_str(self) -> &'static str {
        match self {
            Self::FeaturePsi => "feature_psi",
            Self::PredictionPsi => "prediction_psi",
            Self::Accuracy => "accuracy",
            Self::Mae => "mae",
            Self::ErrorRate => "error_rate",
            Self::P95Latency => "p95_latency",
            Self::ShadowAgreement => "shadow_agreement",
            Self::Requests => "requests",
        }
    }
}

/// How a value is compared with the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Above.
    #[serde(rename = ">")]
    Above,
    /// At or above.
    #[serde(rename = ">=")]
    AtLeast,
    /// Below.
    #[serde(rename = "<")]
    Below,
    /// At or below.
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    /// Whether `value` crosses `threshold`.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Self::Above => value > threshold,
            Self::AtLeast => value >= threshold,
            Self::Below => value < threshold,
            Self::AtMost => value <= threshold,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Above => ">",
            Self::AtLeast => ">=",
            Self::Below => "<",
            Self::AtMost => "<=",
        }
    }

    /// Whether a larger value is worse.
    fn upward(self) -> bool {
        matches!(self, Self::Above | Self::AtLeast)
    }
}

/// A webhook action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSpec {
    /// `http://` or `https://` URL the firing is POSTed to.
    pub url: String,
    /// A file holding the HMAC secret (relative to the rule file); without it, the request
    /// is not signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Attempts before giving up (default 5), backing off from 1 s, doubling, up to 60 s.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Per-attempt timeout in milliseconds (default 10,000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// A local command action: the firing's JSON on its stdin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments (no shell), run in the rule file's directory.
    pub argv: Vec<String>,
    /// Attempts before giving up (default 3), with the webhook's backoff.
    #[serde(default = "default_command_attempts")]
    pub attempts: u32,
    /// Seconds one run may take before it is killed (default 600).
    #[serde(default = "default_command_timeout_s")]
    pub timeout_s: u64,
}

fn default_attempts() -> u32 {
    5
}
fn default_command_attempts() -> u32 {
    3
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_command_timeout_s() -> u64 {
    600
}
fn default_one() -> u64 {
    1
}
fn default_consecutive() -> u32 {
    3
}
fn default_window_s() -> u64 {
    600
}
fn default_every_s() -> u64 {
    30
}
fn default_cooldown_s() -> u64 {
    3600
}

/// One `[[rule]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique name, `[a-z0-9_-]`, 1 to 64 bytes.
    pub name: String,
    /// What it measures.
    pub metric: Metric,
    /// The model.
    pub model: String,
    /// The version (default: every version of the model in the artifact store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Only devices reporting this tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// For the PSI metrics: one feature (default: the worst of the baseline's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// Compare each device's own value (true) or the fleet-wide one (false, the default).
    #[serde(default)]
    pub per_device: bool,
    /// With `per_device`: how many devices must cross (default 1).
    #[serde(default = "default_one")]
    pub min_devices: u64,
    /// Observations, labels, requests or comparisons a value needs before it counts (default
    /// 1).
    #[serde(default = "default_one")]
    pub min_samples: u64,
    /// The comparison.
    pub op: Op,
    /// The threshold.
    pub threshold: f64,
    /// Seconds of telemetry a value is measured over (default 600).
    #[serde(default = "default_window_s")]
    pub window_s: u64,
    /// Evaluations in a row that must cross before it fires (default 3).
    #[serde(default = "default_consecutive")]
    pub consecutive: u32,
    /// Seconds between evaluations (default 30).
    #[serde(default = "default_every_s")]
    pub every_s: u64,
    /// Seconds after a firing during which it does not fire again (default 3600).
    #[serde(default = "default_cooldown_s")]
    pub cooldown_s: u64,
    /// POST the firing here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
    /// Run this with the firing on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandSpec>,
}

/// A rule file: `[[rule]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rules.
    #[serde(default)]
    pub rule: Vec<RuleSpec>,
}

/// A loaded rule: its spec, its directory (for commands and secrets) and its secret.
#[derive(Debug, Clone)]
pub struct Rule {
    /// As written.
    pub spec: RuleSpec,
    dir: PathBuf,
    secret: Option<Vec<u8>>,
}

impl RuleFile {
    /// Parses and checks a rule file; `dir` is where its relative paths start.
    pub fn load(text: &str, dir: &Path) -> Result<Vec<Rule>> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let file: RuleFile =
            toml::from_str(text).map_err(|e| FleetError::Config(format!("rules: {e}")))?;
        if file.rule.len() > MAX_RULES {
            return Err(FleetError::Config(format!(
                "rules: at most {MAX_RULES} rules"
            )));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut rules = Vec::new();
        for spec in file.rule {
            let bad = |m: String| FleetError::Config(format!("rule `{}`: {m}", spec.name));
            let valid_name = !spec.name.is_empty()
                && spec.name.len() <= 64
                && spec.name.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_'
                });
            if !valid_name {
                return Err(bad("names are 1 to 64 of a-z 0-9 - _".into()));
            }
            if !names.insert(spec.name.clone()) {
                return Err(bad("listed twice".into()));
            }
            if !spec.threshold.is_finite() {
                return Err(bad("threshold must be a finite number".into()));
            }
            if spec.every_s == 0 || spec.window_s == 0 || spec.consecutive == 0 {
                return Err(bad(
                    "every_s, window_s and consecutive must be positive".into()
                ));
            }
            if spec.feature.is_some()
                && !matches!(spec.metric, Metric::FeaturePsi | Metric::PredictionPsi)
            {
                return Err(bad(
                    "`feature` goes with feature_psi or prediction_psi".into()
                ));
            }
            if let Some(w) = &spec.webhook
                && !(w.url.starts_with("http://") || w.url.starts_with("https://"))
            {
                return Err(bad(format!("webhook url `{}` is not http(s)://", w.url)));
            }
            if spec.command.as_ref().is_some_and(|c| c.argv.is_empty()) {
                return Err(bad("command.argv names a program".into()));
            }
            let secret = match spec.webhook.as_ref().and_then(|w| w.secret_file.as_ref()) {
                Some(f) => {
                    let path = dir.join(f);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| bad(format!("secret_file `{}`: {e}", path.display())))?;
                    let secret = text.trim().as_bytes().to_vec();
                    if secret.len() < 16 {
                        return Err(bad("a webhook secret has at least 16 bytes".into()));
                    }
                    Some(secret)
                }
                None => None,
            };
            rules.push(Rule {
                spec,
                dir: dir.to_owned(),
                secret,
            });
        }
        Ok(rules)
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A rule's evaluation state for one version: consecutive crossings and the last firing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Streak {
    /// Evaluations in a row that crossed.
    pub crossed: u32,
    /// Unix seconds of the last firing.
    pub fired_at: Option<u64>,
}

impl Streak {
    /// Takes one evaluation's result at `now`; whether the rule fires.
    pub fn step(&mut self, crossing: bool, now: u64, consecutive: u32, cooldown_s: u64) -> bool {
        if !crossing {
            self.crossed = 0;
            return false;
        }
        self.crossed = self.crossed.saturating_add(1);
        let cooled = self
            .fired_at
            .is_none_or(|t| now.saturating_sub(t) >= cooldown_s);
        if self.crossed >= consecutive && cooled {
            self.fired_at = Some(now);
            self.crossed = 0;
            return true;
        }
        false
    }
}

/// What one evaluation measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Measure {
    /// The value compared (`None`: not enough data).
    pub value: Option<f64>,
    /// Whether it crossed.
    pub crossing: bool,
    /// Devices involved.
    pub devices: Vec<String>,
    /// Features involved.
    pub features: Vec<String>,
    /// What was measured, for people.
    pub note: String,
}

#[derive(Debug, Clone, Default)]
struct VersionState {
    streak: Streak,
    last: Option<Measure>,
    evaluated_at: Option<u64>,
}

/// The fleet's rules and their state.
#[derive(Debug, Default)]
pub struct RuleBook {
    rules: Mutex<Vec<Arc<Rule>>>,
    state: Mutex<BTreeMap<(String, String), VersionState>>,
    /// Firings and delivery attempts by rule, for `/metrics`.
    counts: Mutex<BTreeMap<String, (u64, u64, u64)>>,
}

impl RuleBook {
    /// Puts `rules` in place, picking up when each last fired from `firings`.
    pub fn load(&self, rules: Vec<Rule>, firings: &[FiringRecord]) {
        if let Ok(mut state) = self.state.lock() {
            for f in firings {
                let s = state
                    .entry((f.rule.clone(), f.version.clone()))
                    .or_default();
                s.streak.fired_at = Some(s.streak.fired_at.unwrap_or(0).max(f.time));
            }
        }
        if let Ok(mut r) = self.rules.lock() {
            *r = rules.into_iter().map(Arc::new).collect();
        }
    }

    fn rules(&self) -> Vec<Arc<Rule>> {
        self.rules.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn count(&self, rule: &str, f: impl FnOnce(&mut (u64, u64, u64))) {
        if let Ok(mut c) = self.counts.lock() {
            f(c.entry(rule.to_owned()).or_default());
        }
    }

    /// The Prometheus lines: firings and delivery attempts per rule, the last value per rule
    /// and version.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counts = self.counts.lock().map(|c| c.clone()).unwrap_or_default();
        out.push_str("# HELP outpost_fleet_rule_firings_total Times each rule fired.\n# TYPE outpost_fleet_rule_firings_total counter\n");
        for rule in self.rules() {
            let n = counts.get(&rule.spec.name).map_or(0, |c| c.0);
            out.push_str(&format!(
                "outpost_fleet_rule_firings_total{{rule=\"{}\"}} {n}\n",
                rule.spec.name
            ));
        }
        out.push_str("# HELP outpost_fleet_rule_deliveries_total Delivery attempts of rule firings, by result.\n# TYPE outpost_fleet_rule_deliveries_total counter\n");
        for (rule, (_, ok, failed)) in &counts {
            out.push_str(&format!(
                "outpost_fleet_rule_deliveries_total{{rule=\"{rule}\",result=\"ok\"}} {ok}\n\
                 outpost_fleet_rule_deliveries_total{{rule=\"{rule}\",result=\"failed\"}} {failed}\n"
            ));
        }
        out.push_str("# HELP outpost_fleet_rule_value The value each rule last measured, per model version.\n# TYPE outpost_fleet_rule_value gauge\n");
        if let Ok(state) = self.state.lock() {
            for ((rule, version), s) in state.iter() {
                if let Some(v) = s.last.as_ref().and_then(|m| m.value) {
                    out.push_str(&format!(
                        "outpost_fleet_rule_value{{rule=\"{rule}\",version=\"{}\"}} {v}\n",
                        version.replace('"', "")
                    ));
                }
            }
        }
        out
    }
}

impl Fleet {
    /// The versions a rule covers: its own, or every version of its model in the store.
    fn rule_versions(&self, spec: &RuleSpec) -> Result<Vec<String>> {
        Ok(match &spec.version {
            Some(v) => vec![v.clone()],
            None => self
                .store
                .bundles()?
                .into_iter()
                .filter(|b| b.name == spec.model)
                .map(|b| b.version)
                .collect(),
        })
    }

    /// Measures `spec` on `version` now.
    pub fn measure(&self, spec: &RuleSpec, version: &str) -> Result<Measure> {
        let q = MonitorQuery {
            model: spec.model.clone(),
            version: version.to_owned(),
            tag: spec.tag.clone(),
            window: Some(spec.window_s),
        };
        // Per device (or the fleet as one): (device, value, samples, features).
        let mut parts: Vec<(String, Option<f64>, u64, Vec<String>)> = Vec::new();
        let mut pooled: (Option<f64>, u64, Vec<String>) = (None, 0, Vec::new());
        let mut devices = Vec::new();
        match spec.metric {
            Metric::FeaturePsi | Metric::PredictionPsi => {
                let output = spec.metric == Metric::PredictionPsi;
                let d = self.drift(&q)?;
                let chosen: Vec<_> = d
                    .features
                    .iter()
                    .filter(|f| f.output == output)
                    .filter(|f| spec.feature.as_ref().is_none_or(|n| *n == f.feature))
                    .collect();
                if chosen.is_empty() {
                    return Ok(Measure {
                        note: "the baseline has no such feature".into(),
                        ..Measure::default()
                    });
                }
                let worst = |list: &mut dyn Iterator<Item = (String, Option<f64>, u64)>| {
                    list.filter(|(_, v, n)| v.is_some() && *n >= spec.min_samples)
                        .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
                };
                if let Some((name, v, n)) =
                    worst(&mut chosen.iter().map(|f| (f.feature.clone(), f.psi, f.n)))
                {
                    pooled = (v, n, vec![name]);
                }
                let mut ids: Vec<&str> = chosen
                    .iter()
                    .flat_map(|f| f.per_device.iter().map(|p| p.device.as_str()))
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    let mut each = chosen.iter().filter_map(|f| {
                        f.per_device
                            .iter()
                            .find(|p| p.device == id)
                            .map(|p| (f.feature.clone(), p.psi, p.n))
                    });
                    if let Some((name, v, n)) = worst(&mut each) {
                        parts.push((id.to_owned(), v, n, vec![name]));
                    }
                    devices.push(id.to_owned());
                }
            }
            Metric::Accuracy | Metric::Mae => {
                let quality = self.quality(&q)?;
                let pick = |a: Option<f64>, m: Option<f64>| {
                    if spec.metric == Metric::Accuracy {
                        a
                    } else {
                        m
                    }
                };
                pooled = (
                    pick(quality.accuracy, quality.mae),
                    quality.labels,
                    Vec::new(),
                );
                for d in &quality.per_device {
                    parts.push((
                        d.device.clone(),
                        pick(d.accuracy, d.mae),
                        d.labels,
                        Vec::new(),
                    ));
                    devices.push(d.device.clone());
                }
            }
            Metric::ErrorRate | Metric::P95Latency | Metric::Requests | Metric::ShadowAgreement => {
                let now = now_secs();
                let mut total = Window::default();
                let mut shadow_total = (0u64, 0u64);
                for device in self.store.devices()? {
                    if !crate::drift::tagged(&device, spec.tag.as_deref()) {
                        continue;
                    }
                    let Some((base, last)) =
                        self.window_of(&device.id, Some(spec.window_s), now)?
                    else {
                        continue;
                    };
                    let (value, samples) = if spec.metric == Metric::ShadowAgreement {
                        let s = shadow_counts(&last, &spec.model, version);
                        let b = base
                            .as_ref()
                            .map_or((0, 0), |b| shadow_counts(b, &spec.model, version));
                        let (agreed, compared) = (s.0.saturating_sub(b.0), s.1.saturating_sub(b.1));
                        shadow_total.0 += agreed;
                        shadow_total.1 += compared;
                        (
                            (compared > 0).then(|| agreed as f64 / compared as f64),
                            compared,
                        )
                    } else {
                        let w = serving_window(base.as_ref(), &last, &spec.model, version);
                        total.requests += w.requests;
                        total.errors += w.errors;
                        for (bound, n) in &w.buckets {
                            *total.buckets.entry(*bound).or_default() += n;
                        }
                        (serving_value(spec.metric, &w), w.requests)
                    };
                    if samples > 0 {
                        parts.push((device.id.clone(), value, samples, Vec::new()));
                        devices.push(device.id.clone());
                    }
                }
                pooled = if spec.metric == Metric::ShadowAgreement {
                    (
                        (shadow_total.1 > 0).then(|| shadow_total.0 as f64 / shadow_total.1 as f64),
                        shadow_total.1,
                        Vec::new(),
                    )
                } else {
                    (
                        serving_value(spec.metric, &total),
                        total.requests,
                        Vec::new(),
                    )
                };
            }
        }
        let samples_ok = |n: u64| n >= spec.min_samples;
        if !spec.per_device {
            let (value, n, features) = pooled;
            let value = value.filter(|_| samples_ok(n));
            return Ok(Measure {
                crossing: value.is_some_and(|v| spec.op.holds(v, spec.threshold)),
                value,
                devices,
                features,
                note: format!("{n} samples from {} device(s)", parts.len()),
            });
        }
        let mut crossing: Vec<&(String, Option<f64>, u64, Vec<String>)> = parts
            .iter()
            .filter(|(_, v, n, _)| {
                samples_ok(*n) && v.is_some_and(|v| spec.op.holds(v, spec.threshold))
            })
            .collect();
        crossing.sort_by(|a, b| {
            let (a, b) = (a.1.unwrap_or(0.0), b.1.unwrap_or(0.0));
            let o = a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal);
            if spec.op.upward() { o.reverse() } else { o }
        });
        let measured = parts
            .iter()
            .filter(|p| samples_ok(p.2) && p.1.is_some())
            .count();
        let worst = crossing.first().and_then(|p| p.1).or_else(|| {
            let values = parts.iter().filter(|p| samples_ok(p.2)).filter_map(|p| p.1);
            if spec.op.upward() {
                values.reduce(f64::max)
            } else {
                values.reduce(f64::min)
            }
        });
        let mut features: Vec<String> = crossing.iter().flat_map(|p| p.3.clone()).collect();
        features.sort();
        features.dedup();
        Ok(Measure {
            value: worst,
            crossing: crossing.len() as u64 >= spec.min_devices,
            devices: crossing.iter().map(|p| p.0.clone()).collect(),
            features,
            note: format!(
                "{} of {measured} device(s) cross (at least {} needed)",
                crossing.len(),
                spec.min_devices
            ),
        })
    }

    /// Evaluates every rule whose turn has come; fires those whose condition held long
    /// enough. Called every second by the fleet's rule task.
    pub fn tick_rules(self: &Arc<Self>) {
        if !self.leads() {
            return;
        }
        let now = now_secs();
        for rule in self.rules.rules() {
            let spec = &rule.spec;
            let versions = match self.rule_versions(spec) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(rule = %spec.name, error = %e, "rule skipped");
                    continue;
                }
            };
            for version in versions {
                let key = (spec.name.clone(), version.clone());
                let due = self.rules.state.lock().is_ok_and(|s| {
                    s.get(&key)
                        .and_then(|v| v.evaluated_at)
                        .is_none_or(|t| now.saturating_sub(t) >= spec.every_s)
                });
                if !due {
                    continue;
                }
                let measure = match self.measure(spec, &version) {
                    Ok(m) => m,
                    Err(FleetError::NotFound(_) | FleetError::BadRequest(_)) => Measure::default(),
                    Err(e) => {
                        tracing::warn!(rule = %spec.name, error = %e, "rule evaluation failed");
                        continue;
                    }
                };
                let fires = {
                    let Ok(mut state) = self.rules.state.lock() else {
                        return;
                    };
                    let s = state.entry(key).or_default();
                    s.evaluated_at = Some(now);
                    let fires =
                        s.streak
                            .step(measure.crossing, now, spec.consecutive, spec.cooldown_s);
                    s.last = Some(measure.clone());
                    fires
                };
                if fires && let Err(e) = self.fire(&rule, &version, &measure, now) {
                    tracing::error!(rule = %spec.name, error = %e, "a rule fired but could not be recorded");
                }
            }
        }
    }

    /// Records a firing and delivers it in the background.
    fn fire(
        self: &Arc<Self>,
        rule: &Arc<Rule>,
        version: &str,
        m: &Measure,
        now: u64,
    ) -> Result<()> {
        let spec = &rule.spec;
        let digest = self
            .store
            .bundle(&spec.model, version)?
            .map(|b| b.digest)
            .unwrap_or_default();
        let id = self.store.next_firing_id()?;
        let fingerprint = hex::encode(
            &Sha256::digest(
                format!("{}\n{}\n{version}\n{now}\n{id}", spec.name, spec.model).as_bytes(),
            )[..16],
        );
        let firing = FiringRecord {
            id,
            rule: spec.name.clone(),
            metric: spec.metric.as_str().to_owned(),
            value: m.value.unwrap_or(f64::NAN),
            op: spec.op.as_str().to_owned(),
            threshold: spec.threshold,
            window_s: spec.window_s,
            model: spec.model.clone(),
            version: version.to_owned(),
            digest,
            tag: spec.tag.clone(),
            devices: m.devices.clone(),
            features: m.features.clone(),
            fingerprint,
            time: now,
            attempts: Vec::new(),
            delivered: spec.webhook.is_none() && spec.command.is_none(),
        };
        self.store.put_firing(&firing)?;
        self.rules.count(&spec.name, |c| c.0 += 1);
        tracing::info!(rule = %spec.name, model = %spec.model, version, value = ?m.value, "rule fired");
        if firing.delivered {
            return Ok(());
        }
        let fleet = Arc::clone(self);
        let rule = Arc::clone(rule);
        std::thread::Builder::new()
            .name(format!("rule-{}", spec.name))
            .spawn(move || fleet.deliver(&rule, firing))
            .map_err(FleetError::Io)?;
        Ok(())
    }

    /// Runs the firing's actions with retries, storing every attempt.
    fn deliver(&self, rule: &Rule, mut firing: FiringRecord) {
        let body = match serde_json::to_vec(&firing_body(&firing)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "a firing could not be encoded");
                return;
            }
        };
        let mut actions: Vec<(&str, u32)> = Vec::new();
        if let Some(w) = &rule.spec.webhook {
            actions.push(("webhook", w.attempts.max(1)));
        }
        if let Some(c) = &rule.spec.command {
            actions.push(("command", c.attempts.max(1)));
        }
        for (action, attempts) in actions {
            let mut backoff = Duration::from_secs(1);
            for attempt in 1..=attempts {
                let (ok, outcome) = match action {
                    "webhook" => post_webhook(rule, &firing, &body),
                    _ => run_command(rule, &body),
                };
                firing.attempts.push(DeliveryAttempt {
                    action: action.to_owned(),
                    time: now_secs(),
                    ok,
                    outcome,
                });
                firing.delivered |= ok;
                self.rules
                    .count(&rule.spec.name, |c| if ok { c.1 += 1 } else { c.2 += 1 });
                if let Err(e) = self.store.put_firing(&firing) {
                    tracing::warn!(error = %e, "a delivery attempt could not be recorded");
                }
                if ok {
                    break;
                }
                if attempt < attempts {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    /// Every rule with its state per version.
    pub fn rule_views(&self) -> Vec<RuleView> {
        let state = self
            .rules
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        self.rules
            .rules()
            .iter()
            .map(|r| RuleView {
                name: r.spec.name.clone(),
                spec: serde_json::to_value(&r.spec).unwrap_or_default(),
                versions: state
                    .iter()
                    .filter(|((name, _), _)| *name == r.spec.name)
                    .map(|((_, version), s)| RuleState {
                        version: version.clone(),
                        value: s.last.as_ref().and_then(|m| m.value),
                        breaching: s.last.as_ref().is_some_and(|m| m.crossing),
                        streak: s.streak.crossed,
                        evaluated_at: s.evaluated_at,
                        fired_at: s.streak.fired_at,
                        note: s.last.as_ref().map(|m| m.note.clone()).unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Measures rule `name` now on each of its versions, without changing its state or firing.
    pub fn test_rule(&self, name: &str) -> Result<Vec<RuleState>> {
        let rule = self
            .rules
            .rules()
            .into_iter()
            .find(|r| r.spec.name == name)
            .ok_or_else(|| FleetError::NotFound(format!("rule `{name}`")))?;
        let now = now_secs();
        self.rule_versions(&rule.spec)?
            .into_iter()
            .map(|version| {
                let m = self.measure(&rule.spec, &version)?;
                Ok(RuleState {
                    version,
                    value: m.value,
                    breaching: m.crossing,
                    streak: 0,
                    evaluated_at: Some(now),
                    fired_at: None,
                    note: m.note,
                })
            })
            .collect()
    }
}

/// The JSON a webhook receives and a command reads on stdin.
fn firing_body(f: &FiringRecord) -> serde_json::Value {
    serde_json::json!({
        "rule": f.rule,
        "metric": f.metric,
        "value": f.value,
        "op": f.op,
        "threshold": f.threshold,
        "window_s": f.window_s,
        "model": f.model,
        "version": f.version,
        "digest": f.digest,
        "tag": f.tag,
        "devices": f.devices,
        "features": f.features,
        "fingerprint": f.fingerprint,
        "fired_at": f.time,
        "firing_id": f.id,
    })
}

fn post_webhook(rule: &Rule, firing: &FiringRecord, body: &[u8]) -> (bool, String) {
    let Some(w) = &rule.spec.webhook else {
        return (false, "no webhook".into());
    };
    let roots = if w.url.starts_with("https://") {
        outpost_tls::root_certificates(None).unwrap_or_default()
    } else {
        Vec::new()
    };
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(w.timeout_ms.max(1))))
        .tls_config(outpost_tls::ureq_tls_config(&roots))
        .build()
        .new_agent();
    let mut request = agent
        .post(&w.url)
        .header("content-type", "application/json")
        .header(FINGERPRINT_HEADER, &firing.fingerprint);
    if let Some(secret) = &rule.secret {
        request = request.header(
            SIGNATURE_HEADER,
            format!("sha256={}", hex::encode(hmac_sha256(secret, body))),
        );
    }
    match request.send(body) {
        Ok(r) => {
            let status = r.status().as_u16();
            ((200..300).contains(&status), format!("HTTP {status}"))
        }
        Err(e) => (false, e.to_string()),
    }
}

fn run_command(rule: &Rule, body: &[u8]) -> (bool, String) {
    let Some(c) = &rule.spec.command else {
        return (false, "no command".into());
    };
    let Some((program, args)) = c.argv.split_first() else {
        return (false, "no program".into());
    };
    let child = std::process::Command::new(program)
        .args(args)
        .current_dir(&rule.dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("{program}: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(c.timeout_s.max(1));
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (status.success(), format!("exit {status}")),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return (false, format!("killed after {} s", c.timeout_s));
            }
            Err(e) => return (false, e.to_string()),
        }
    }
}

/// A shadow's (agreed, compared) counts for `version` of `model` in one record.
fn shadow_counts(s: &TelemetrySample, model: &str, version: &str) -> (u64, u64) {
    s.shadows
        .iter()
        .filter(|x| x.model == model && x.version == version)
        .fold((0, 0), |(a, c), x| {
            (a + x.agreed, c + x.agreed + x.disagreed)
        })
}

/// `version`'s serving counters between `base` and `last` (roles summed, a shadow's left out).
pub(crate) fn serving_window(
    base: Option<&TelemetrySample>,
    last: &TelemetrySample,
    model: &str,
    version: &str,
) -> Window {
    let sum = |s: &TelemetrySample| {
        let mut w = Window::default();
        for series in s
            .models
            .iter()
            .filter(|x| x.model == model && x.version == version && x.role != "shadow")
        {
            let (requests, errors, buckets) = counters(series);
            w.requests += requests;
            w.errors += errors;
            for (bound, n) in buckets {
                *w.buckets.entry(bound.to_bits()).or_default() += n;
            }
        }
        w
    };
    let mut w = sum(last);
    if let Some(b) = base.map(sum)
        && b.requests <= w.requests
    {
        w.requests -= b.requests;
        w.errors = w.errors.saturating_sub(b.errors);
        for (bound, n) in w.buckets.iter_mut() {
            *n = n.saturating_sub(b.buckets.get(bound).copied().unwrap_or(0));
        }
    }
    w
}

fn serving_value(metric: Metric, w: &Window) -> Option<f64> {
    match metric {
        Metric::Requests => Some(w.requests as f64),
        _ if w.requests == 0 => None,
        Metric::ErrorRate => Some(w.value(GateMetric::ErrorRate)),
        Metric::P95Latency => Some(w.value(GateMetric::P95Latency)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        let mac = hmac_sha256(
            &[0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn a_spike_does_not_fire_and_sustained_crossing_fires_once_per_cooldown() {
        let mut s = Streak::default();
        // One evaluation over the threshold between normal ones: nothing.
        let spike = [false, true, false, false, true, false];
        assert!(
            spike
                .iter()
                .enumerate()
                .all(|(t, &c)| !s.step(c, t as u64, 3, 100))
        );
        // Sustained from t=10: fires at the third crossing, then not again within 100 s.
        let fired: Vec<u64> = (10..300).filter(|&t| s.step(true, t, 3, 100)).collect();
        assert_eq!(fired, [12, 112, 212]);
        // A streak broken just before the cooldown ends starts again.
        let mut s = Streak {
            crossed: 0,
            fired_at: Some(0),
        };
        assert!(!s.step(true, 99, 2, 100));
        assert!(s.step(true, 100, 2, 100));
    }

    #[test]
    fn a_restarted_fleet_keeps_the_cooldown_of_the_last_firing() {
        let firing = FiringRecord {
            id: 1,
            rule: "r".into(),
            metric: "accuracy".into(),
            value: 0.5,
            op: "<".into(),
            threshold: 0.9,
            window_s: 600,
            model: "m".into(),
            version: "1.0.0".into(),
            digest: String::new(),
            tag: None,
            devices: Vec::new(),
            features: Vec::new(),
            fingerprint: String::new(),
            time: 1_000,
            attempts: Vec::new(),
            delivered: true,
        };
        let book = RuleBook::default();
        book.load(Vec::new(), &[firing]);
        let mut streak = book.state.lock().unwrap()[&("r".to_owned(), "1.0.0".to_owned())].streak;
        assert_eq!(streak.fired_at, Some(1_000));
        // Still crossing after the restart: quiet until the cooldown from the stored firing ends.
        assert!(!streak.step(true, 1_100, 1, 3600));
        assert!(streak.step(true, 4_600, 1, 3600));
    }

    #[test]
    fn rule_files_are_checked() {
        let dir = std::env::temp_dir();
        let ok = r#"
            [[rule]]
            name = "digits-drift"
            metric = "feature_psi"
            model = "digits"
            op = ">"
            threshold = 0.25
            [rule.command]
            argv = ["true"]
        "#;
        let rules = RuleFile::load(ok, &dir).unwrap();
        assert_eq!(rules[0].spec.consecutive, 3);
        assert_eq!(rules[0].spec.cooldown_s, 3600);
        for (text, why) in [
            (ok.replace("feature_psi", "psi"), "unknown variant"),
            (
                ok.replace("\"digits-drift\"", "\"Digits Drift\""),
                "names are",
            ),
            (
                format!(
                    "{ok}\n[[rule]]\nname = \"digits-drift\"\nmetric = \"accuracy\"\nmodel = \"d\"\nop = \"<\"\nthreshold = 0.9\n"
                ),
                "listed twice",
            ),
            (
                ok.replace("argv = [\"true\"]", "argv = []"),
                "names a program",
            ),
            (
                ok.replace(
                    "threshold = 0.25",
                    "threshold = 0.25\nfeature = \"x\"\nmetric2 = 1",
                ),
                "unknown field",
            ),
            (
                ok.replace(
                    "[rule.command]\n            argv = [\"true\"]",
                    "[rule.webhook]\nurl = \"ftp://x\"",
                ),
                "not http",
            ),
        ] {
            let err = RuleFile::load(&text, &dir).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
