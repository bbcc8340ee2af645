//! Request counters, error counters, latency histograms and drift observations per model,
//! version and role (primary, candidate, shadow: see [`Role`]), and a shadow's agreement and
//! drops, rendered in the Prometheus text format. The latency buckets are fixed, so a fleet can
//! merge histograms from any number of devices.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use outpost_agent::{Link, LinkStatus};

use crate::watch::Role;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default, Clone)]
struct Series {
    requests: u64,
    errors: BTreeMap<&'static str, u64>,
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    /// Unix milliseconds of the last request.
    last_ms: u64,
    observations: BTreeMap<String, (u64, f64)>,
}

/// One model version's request counts, for the statistics endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionStats {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Requests that reached the version.
    pub requests: u64,
    /// Of those, the ones that failed.
    pub failures: u64,
    /// Total time spent on them, in seconds.
    pub seconds: f64,
    /// Unix milliseconds of the last one.
    pub last_ms: u64,
}

/// A shadow candidate's comparisons with the primary.
#[derive(Debug, Default, Clone, Copy)]
struct ShadowCounts {
    agreed: u64,
    disagreed: u64,
    dropped: u64,
}

/// Metrics for every model version that served a request.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String, Role), Series>>,
    shadows: Mutex<BTreeMap<(String, String), ShadowCounts>>,
    rejected_busy: Mutex<u64>,
    /// The fleet agent's link, when the device has one.
    link: OnceLock<Link>,
    /// The HTTP front doors' counters, by listener.
    http: OnceLock<Vec<(String, Arc<outpost_http::Stats>)>>,
    /// Drift against each version's training baseline.
    pub drift: crate::drift::Drift,
    /// Kept predictions and the quality posted labels give them.
    pub feedback: crate::feedback::Feedback,
    /// Response caches, streaming sessions and batchers.
    pub serving: Arc<crate::serving::ServingMetrics>,
}

/// A snapshot of one model version's counters (the telemetry form).
pub use outpost_proto::ModelSeries as SeriesSnapshot;

/// The labels of one series.
fn labels(model: &str, version: &str, role: Role) -> String {
    format!(
        "model=\"{}\",version=\"{}\",role=\"{}\"",
        escape(model),
        escape(version),
        role.as_str()
    )
}

pub(crate) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records one request that reached a model version in `role`.
    pub fn record(
        &self,
        model: &str,
        version: &str,
        role: Role,
        elapsed: Duration,
        error: Option<&'static str>,
        observations: &[(String, f64)],
    ) {
        let Ok(mut all) = self.series.lock() else {
            return;
        };
        let s = all
            .entry((model.to_owned(), version.to_owned(), role))
            .or_default();
        s.requests += 1;
        s.last_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(kind) = error {
            *s.errors.entry(kind).or_default() += 1;
        }
        let secs = elapsed.as_secs_f64();
        s.sum += secs;
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                s.buckets[i] += 1;
            }
        }
        for (feature, value) in observations {
            if s.observations.len() < 64 || s.observations.contains_key(feature) {
                let o = s.observations.entry(feature.clone()).or_default();
                o.0 += 1;
                o.1 += value;
            }
        }
    }

    /// Records whether a shadow candidate's answer agreed with the primary's (`None`: the
    /// shadow request was dropped because its lane was full).
    pub fn record_shadow(&self, model: &str, candidate: &str, agreed: Option<bool>) {
        let Ok(mut all) = self.shadows.lock() else {
            return;
        };
        let c = all
            .entry((model.to_owned(), candidate.to_owned()))
            .or_default();
        match agreed {
            Some(true) => c.agreed += 1,
            Some(false) => c.disagreed += 1,
            None => c.dropped += 1,
        }
    }

    /// Every shadow candidate's counters (the telemetry form).
    pub fn shadow_snapshot(&self) -> Vec<outpost_proto::ShadowSeries> {
        let Ok(all) = self.shadows.lock() else {
            return Vec::new();
        };
        all.iter()
            .map(|((model, version), c)| outpost_proto::ShadowSeries {
                model: model.clone(),
                version: version.clone(),
                agreed: c.agreed,
                disagreed: c.disagreed,
                dropped: c.dropped,
            })
            .collect()
    }

    /// A shadow candidate's (agreed, disagreed, dropped) counts.
    pub fn shadow_counts(&self, model: &str, candidate: &str) -> (u64, u64, u64) {
        self.shadows
            .lock()
            .ok()
            .and_then(|all| {
                all.get(&(model.to_owned(), candidate.to_owned()))
                    .map(|c| (c.agreed, c.disagreed, c.dropped))
            })
            .unwrap_or_default()
    }

    /// Counts a request refused because the device was busy.
    pub fn record_busy(&self) {
        if let Ok(mut n) = self.rejected_busy.lock() {
            *n += 1;
        }
    }

    /// Request counts of every version that served a request.
    pub fn stats(&self) -> Vec<VersionStats> {
        let Ok(all) = self.series.lock() else {
            return Vec::new();
        };
        // The requests a version answered, whatever its role; a shadow answers nobody.
        let mut out: Vec<VersionStats> = Vec::new();
        for ((model, version, _), s) in all.iter().filter(|(k, _)| k.2 != Role::Shadow) {
            let failures: u64 = s.errors.values().sum();
            match out.last_mut() {
                Some(v) if v.model == *model && v.version == *version => {
                    v.requests += s.requests;
                    v.failures += failures;
                    v.seconds += s.sum;
                    v.last_ms = v.last_ms.max(s.last_ms);
                }
                _ => out.push(VersionStats {
                    model: model.clone(),
                    version: version.clone(),
                    requests: s.requests,
                    failures,
                    seconds: s.sum,
                    last_ms: s.last_ms,
                }),
            }
        }
        out
    }

    /// Snapshots of every series.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let Ok(all) = self.series.lock() else {
            return Vec::new();
        };
        all.iter()
            .map(|((model, version, role), s)| SeriesSnapshot {
                model: model.clone(),
                version: version.clone(),
                role: role.as_str().to_owned(),
                requests: s.requests,
                errors: s
                    .errors
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), *v))
                    .collect(),
                latency_buckets: BUCKETS
                    .iter()
                    .copied()
                    .zip(s.buckets.iter().copied())
                    .collect(),
                latency_sum: s.sum,
            })
            .collect()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let all = match self.series.lock() {
            Ok(all) => all.clone(),
            Err(_) => BTreeMap::new(),
        };
        let _ = writeln!(
            out,
            "# HELP outpost_requests_total Inference requests per model version."
        );
        let _ = writeln!(out, "# TYPE outpost_requests_total counter");
        for ((m, v, r), s) in &all {
            let _ = writeln!(
                out,
                "outpost_requests_total{{{}}} {}",
                labels(m, v, *r),
                s.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_request_errors_total Failed inference requests per model version and kind."
        );
        let _ = writeln!(out, "# TYPE outpost_request_errors_total counter");
        for ((m, v, r), s) in &all {
            for (kind, n) in &s.errors {
                let _ = writeln!(
                    out,
                    "outpost_request_errors_total{{{},kind=\"{kind}\"}} {n}",
                    labels(m, v, *r)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_request_duration_seconds Inference latency per model version."
        );
        let _ = writeln!(out, "# TYPE outpost_request_duration_seconds histogram");
        for ((m, v, r), s) in &all {
            let labels = labels(m, v, *r);
            for (bound, n) in BUCKETS.iter().zip(s.buckets) {
                let _ = writeln!(
                    out,
                    "outpost_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "outpost_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.requests
            );
            let _ = writeln!(
                out,
                "outpost_request_duration_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "outpost_request_duration_seconds_count{{{labels}}} {}",
                s.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feature_observations_total Drift feature observations per model version."
        );
        let _ = writeln!(out, "# TYPE outpost_feature_observations_total counter");
        for ((m, v, r), s) in &all {
            for (f, (n, _)) in &s.observations {
                let _ = writeln!(
                    out,
                    "outpost_feature_observations_total{{{},feature=\"{}\"}} {n}",
                    labels(m, v, *r),
                    escape(f)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feature_mean Mean observed value of each drift feature."
        );
        let _ = writeln!(out, "# TYPE outpost_feature_mean gauge");
        for ((m, v, r), s) in &all {
            for (f, (n, sum)) in &s.observations {
                let _ = writeln!(
                    out,
                    "outpost_feature_mean{{{},feature=\"{}\"}} {}",
                    labels(m, v, *r),
                    escape(f),
                    sum / *n as f64
                );
            }
        }
        self.drift.render(&mut out);
        self.feedback.render(&mut out);
        self.serving.render(&mut out);
        let shadows = match self.shadows.lock() {
            Ok(all) => all.clone(),
            Err(_) => BTreeMap::new(),
        };
        let _ = writeln!(
            out,
            "# HELP outpost_shadow_comparisons_total A shadow candidate's answers compared with the primary's, by result."
        );
        let _ = writeln!(out, "# TYPE outpost_shadow_comparisons_total counter");
        for ((m, v), c) in &shadows {
            for (result, n) in [("agree", c.agreed), ("disagree", c.disagreed)] {
                let _ = writeln!(
                    out,
                    "outpost_shadow_comparisons_total{{model=\"{}\",version=\"{}\",result=\"{result}\"}} {n}",
                    escape(m),
                    escape(v)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_shadow_dropped_total Shadow requests dropped because the shadow's queue was full."
        );
        let _ = writeln!(out, "# TYPE outpost_shadow_dropped_total counter");
        for ((m, v), c) in &shadows {
            let _ = writeln!(
                out,
                "outpost_shadow_dropped_total{{model=\"{}\",version=\"{}\"}} {}",
                escape(m),
                escape(v),
                c.dropped
            );
        }
        let busy = self.rejected_busy.lock().map_or(0, |n| *n);
        let _ = writeln!(
            out,
            "# HELP outpost_rejected_busy_total Requests refused because the device was at its concurrency limit."
        );
        let _ = writeln!(out, "# TYPE outpost_rejected_busy_total counter");
        let _ = writeln!(out, "outpost_rejected_busy_total {busy}");
        if let Some(link) = self.link.get() {
            render_link(&mut out, link.status());
        }
        if let Some(http) = self.http.get() {
            let listeners: Vec<(&str, &outpost_http::Stats)> =
                http.iter().map(|(name, s)| (name.as_str(), &**s)).collect();
            out.push_str(&outpost_http::render("outpost_http", &listeners));
        }
        out
    }

    /// Shows the HTTP front doors' counters in [`Metrics::render`] from now on (the first call
    /// wins).
    pub fn set_http(&self, listeners: Vec<(String, Arc<outpost_http::Stats>)>) {
        let _ = self.http.set(listeners);
    }

    /// Shows the fleet agent's link in [`Metrics::render`] from now on (the first call wins).
    pub fn set_link(&self, link: Link) {
        let _ = self.link.set(link);
    }

    /// The fleet agent's link, once the device has one.
    pub fn link(&self) -> Option<&Link> {
        self.link.get()
    }
}

/// The fleet link's gauges and counters.
fn render_link(out: &mut String, link: LinkStatus) {
    let lines: [(&str, &str, &str, u64); 8] = [
        (
            "outpost_fleet_connected",
            "gauge",
            "1 while the fleet agent is connected to its MQTT broker.",
            u64::from(link.connected),
        ),
        (
            "outpost_fleet_online",
            "gauge",
            "1 while a fleet replica says it is online (telemetry flows).",
            u64::from(link.fleet_online),
        ),
        (
            "outpost_outbox_records",
            "gauge",
            "Telemetry records and events waiting for the broker's acknowledgement.",
            link.outbox_records,
        ),
        (
            "outpost_outbox_bytes",
            "gauge",
            "Bytes the telemetry outbox holds on disk.",
            link.outbox_bytes,
        ),
        (
            "outpost_outbox_dropped_records_total",
            "counter",
            "Records dropped: the outbox quota's oldest first, and those a full disk refused.",
            link.dropped_records,
        ),
        (
            "outpost_fleet_connections_total",
            "counter",
            "Connections the fleet agent made to its MQTT broker.",
            link.connections,
        ),
        (
            "outpost_fleet_disconnections_total",
            "counter",
            "Established broker connections the fleet agent lost.",
            link.disconnections,
        ),
        (
            "outpost_fleet_resent_batches_total",
            "counter",
            "Telemetry batches sent again because the broker did not acknowledge them in time.",
            link.resent_batches,
        ),
    ];
    for (name, kind, help, value) in lines {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name} {value}");
    }
}
