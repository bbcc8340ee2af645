//! Request counters, error counters, latency histograms and drift observations per model and
//! version, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use outpost_agent::{Link, LinkStatus};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
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

/// Metrics for every model version that served a request.
#[derive(Debug, Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String), Series>>,
    rejected_busy: Mutex<u64>,
    /// The fleet agent's link, when the device has one.
    link: OnceLock<Link>,
    /// The HTTP front doors' counters, by listener.
    http: OnceLock<Vec<(String, Arc<outpost_http::Stats>)>>,
}

/// A snapshot of one model version's counters (the telemetry form).
pub use outpost_proto::ModelSeries as SeriesSnapshot;

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Records one request that reached a model version.
    pub fn record(
        &self,
        model: &str,
        version: &str,
        elapsed: Duration,
        error: Option<&'static str>,
        observations: &[(String, f64)],
    ) {
        let Ok(mut all) = self.series.lock() else {
            return;
        };
        let s = all
            .entry((model.to_owned(), version.to_owned()))
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
        all.iter()
            .map(|((model, version), s)| VersionStats {
                model: model.clone(),
                version: version.clone(),
                requests: s.requests,
                failures: s.errors.values().sum(),
                seconds: s.sum,
                last_ms: s.last_ms,
            })
            .collect()
    }

    /// Snapshots of every series.
    pub fn snapshot(&self) -> Vec<SeriesSnapshot> {
        let Ok(all) = self.series.lock() else {
            return Vec::new();
        };
        all.iter()
            .map(|((model, version), s)| SeriesSnapshot {
                model: model.clone(),
                version: version.clone(),
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
        for ((m, v), s) in &all {
            let _ = writeln!(
                out,
                "outpost_requests_total{{model=\"{}\",version=\"{}\"}} {}",
                escape(m),
                escape(v),
                s.requests
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_request_errors_total Failed inference requests per model version and kind."
        );
        let _ = writeln!(out, "# TYPE outpost_request_errors_total counter");
        for ((m, v), s) in &all {
            for (kind, n) in &s.errors {
                let _ = writeln!(
                    out,
                    "outpost_request_errors_total{{model=\"{}\",version=\"{}\",kind=\"{kind}\"}} {n}",
                    escape(m),
                    escape(v)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_request_duration_seconds Inference latency per model version."
        );
        let _ = writeln!(out, "# TYPE outpost_request_duration_seconds histogram");
        for ((m, v), s) in &all {
            let labels = format!("model=\"{}\",version=\"{}\"", escape(m), escape(v));
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
        for ((m, v), s) in &all {
            for (f, (n, _)) in &s.observations {
                let _ = writeln!(
                    out,
                    "outpost_feature_observations_total{{model=\"{}\",version=\"{}\",feature=\"{}\"}} {n}",
                    escape(m),
                    escape(v),
                    escape(f)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feature_mean Mean observed value of each drift feature."
        );
        let _ = writeln!(out, "# TYPE outpost_feature_mean gauge");
        for ((m, v), s) in &all {
            for (f, (n, sum)) in &s.observations {
                let _ = writeln!(
                    out,
                    "outpost_feature_mean{{model=\"{}\",version=\"{}\",feature=\"{}\"}} {}",
                    escape(m),
                    escape(v),
                    escape(f),
                    sum / *n as f64
                );
            }
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
