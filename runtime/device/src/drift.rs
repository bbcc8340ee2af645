//! Drift against the training baseline, per model version and feature, in fixed memory: bin
//! counts over a sliding window (twelve time slots, so a window moves in twelfths) and since
//! the device started, with running sums for the mean and spread. No sample is kept.
//!
//! A feature the guest observes that its bundle's baseline does not name is refused: counted
//! in `outpost_feature_unknown_total`, never binned (the WIT contract says features are named
//! in the baseline).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_bundle::drift::Level;
use outpost_bundle::manifest::{Baseline, FeatureBaseline};
use outpost_proto::DriftSeries;
use serde::Serialize;

/// Time slots a window is made of.
const SLOTS: usize = 12;
/// Model versions tracked at once; the one idle longest is forgotten first.
const MAX_VERSIONS: usize = 64;
/// Unknown feature names remembered per version (for the admin view; all are counted).
const MAX_UNKNOWN_NAMES: usize = 16;

/// Counts and sums around a fixed center, which add and subtract exactly bin by bin.
#[derive(Debug, Clone, Default, PartialEq)]
struct Tally {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    sum_sq: f64,
}

impl Tally {
    fn new(slots: usize) -> Self {
        Self {
            counts: vec![0; slots],
            ..Self::default()
        }
    }

    fn add(&mut self, slot: usize, d: f64) {
        if let Some(c) = self.counts.get_mut(slot) {
            *c += 1;
        }
        self.n += 1;
        self.sum += d;
        self.sum_sq += d * d;
    }

    fn merge(&mut self, other: &Tally) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }
}

/// Mean and population standard deviation of values summed around `center`.
pub fn moments(n: u64, center: f64, sum: f64, sum_sq: f64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let m = sum / n;
    Some((center + m, (sum_sq / n - m * m).max(0.0).sqrt()))
}

#[derive(Debug)]
struct FeatureDrift {
    baseline: FeatureBaseline,
    output: bool,
    center: f64,
    total: Tally,
    /// Slot `i` holds epoch `epochs[i]` (`now / slot length`).
    epochs: [u64; SLOTS],
    window: [Tally; SLOTS],
    min: f64,
    max: f64,
}

impl FeatureDrift {
    fn new(baseline: &FeatureBaseline, output: bool) -> Self {
        let slots = baseline.bins() + 2;
        let center = baseline.mean.unwrap_or_else(|| {
            let first = baseline.edges.first().copied().unwrap_or(0.0);
            let last = baseline.edges.last().copied().unwrap_or(0.0);
            (first + last) / 2.0
        });
        Self {
            baseline: baseline.clone(),
            output,
            center,
            total: Tally::new(slots),
            epochs: [u64::MAX; SLOTS],
            window: std::array::from_fn(|_| Tally::new(slots)),
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn add(&mut self, epoch: u64, x: f64) {
        let slot = self.baseline.slot(x);
        let d = x - self.center;
        self.total.add(slot, d);
        let i = (epoch % SLOTS as u64) as usize;
        if self.epochs[i] != epoch {
            self.epochs[i] = epoch;
            self.window[i] = Tally::new(self.total.counts.len());
        }
        self.window[i].add(slot, d);
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    fn window(&self, epoch: u64) -> Tally {
        let mut t = Tally::new(self.total.counts.len());
        for (e, w) in self.epochs.iter().zip(&self.window) {
            if *e != u64::MAX && *e <= epoch && epoch - *e < SLOTS as u64 {
                t.merge(w);
            }
        }
        t
    }
}

#[derive(Debug)]
struct VersionDrift {
    thresholds: outpost_bundle::manifest::PsiThresholds,
    window_s: u64,
    features: Vec<FeatureDrift>,
    unknown: u64,
    unknown_names: BTreeSet<String>,
    last_used: u64,
}

impl VersionDrift {
    fn new(baseline: Option<&Baseline>) -> Self {
        let features = baseline
            .map(|b| b.all().map(|(f, out)| FeatureDrift::new(f, out)).collect())
            .unwrap_or_default();
        Self {
            thresholds: baseline.map(Baseline::thresholds).unwrap_or_default(),
            window_s: baseline.map_or(outpost_bundle::drift::DEFAULT_WINDOW_S, Baseline::window_s),
            features,
            unknown: 0,
            unknown_names: BTreeSet::new(),
            last_used: 0,
        }
    }

    /// Seconds per slot (at least one).
    fn slot_s(&self) -> u64 {
        (self.window_s / SLOTS as u64).max(1)
    }
}

/// Reads one gauge's value off a feature's report.
type Gauge = fn(&FeatureReport) -> Option<f64>;

/// Drift state of every model version that served a request.
#[derive(Debug, Default)]
pub struct Drift {
    versions: Mutex<BTreeMap<(String, String), VersionDrift>>,
}

/// One feature's drift, as `GET /admin/drift` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FeatureReport {
    /// Feature name.
    pub feature: String,
    /// Whether it is a model output.
    pub output: bool,
    /// PSI over the window (`None`: nothing observed in it).
    pub psi: Option<f64>,
    /// `stable`, `moderate` or `significant` (`None` with no PSI).
    pub level: Option<&'static str>,
    /// Observations in the window.
    pub window_n: u64,
    /// Mean in the window.
    pub window_mean: Option<f64>,
    /// Standard deviation in the window.
    pub window_std: Option<f64>,
    /// Counts per slot in the window (underflow, bins, overflow).
    pub window_counts: Vec<u64>,
    /// Observations since the device started.
    pub total_n: u64,
    /// PSI of everything since the device started.
    pub total_psi: Option<f64>,
    /// Smallest and largest value seen since the device started.
    pub seen: Option<(f64, f64)>,
    /// The baseline's edges.
    pub edges: Vec<f64>,
    /// The baseline's expected share per slot (underflow, bins, overflow).
    pub expected: Vec<f64>,
    /// The baseline's mean and standard deviation, when it has them.
    pub baseline_mean: Option<f64>,
    /// The baseline's standard deviation.
    pub baseline_std: Option<f64>,
}

/// One model version's drift, as `GET /admin/drift` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VersionReport {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Seconds the window covers.
    pub window_s: u64,
    /// PSI thresholds from the bundle.
    pub moderate: f64,
    /// PSI threshold for significant drift.
    pub significant: f64,
    /// Observations of features the baseline does not name.
    pub unknown_observations: u64,
    /// Some of their names.
    pub unknown_features: Vec<String>,
    /// Every baseline feature.
    pub features: Vec<FeatureReport>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Drift {
    /// Counts a request's observations for `model` at `version`, against `baseline`.
    pub fn observe(
        &self,
        model: &str,
        version: &str,
        baseline: Option<&Baseline>,
        observations: &[(String, f64)],
    ) {
        self.observe_at(now_s(), model, version, baseline, observations);
    }

    fn observe_at(
        &self,
        now: u64,
        model: &str,
        version: &str,
        baseline: Option<&Baseline>,
        observations: &[(String, f64)],
    ) {
        if observations.is_empty() {
            return;
        }
        let Ok(mut all) = self.versions.lock() else {
            return;
        };
        let key = (model.to_owned(), version.to_owned());
        if !all.contains_key(&key) && all.len() >= MAX_VERSIONS {
            let idle = all
                .iter()
                .min_by_key(|(_, v)| v.last_used)
                .map(|(k, _)| k.clone());
            if let Some(idle) = idle {
                all.remove(&idle);
            }
        }
        let v = all
            .entry(key)
            .or_insert_with(|| VersionDrift::new(baseline));
        v.last_used = now;
        let epoch = now / v.slot_s();
        for (name, x) in observations {
            match v.features.iter_mut().find(|f| f.baseline.name == *name) {
                Some(f) if x.is_finite() => f.add(epoch, *x),
                Some(_) => {}
                None => {
                    v.unknown += 1;
                    if v.unknown_names.len() < MAX_UNKNOWN_NAMES {
                        v.unknown_names.insert(name.clone());
                    }
                }
            }
        }
    }

    /// Every version's drift now.
    pub fn report(&self) -> Vec<VersionReport> {
        self.report_at(now_s())
    }

    fn report_at(&self, now: u64) -> Vec<VersionReport> {
        let Ok(all) = self.versions.lock() else {
            return Vec::new();
        };
        all.iter()
            .map(|((model, version), v)| {
                let epoch = now / v.slot_s();
                let features = v
                    .features
                    .iter()
                    .map(|f| {
                        let w = f.window(epoch);
                        let psi = f.baseline.psi(&w.counts);
                        let m = moments(w.n, f.center, w.sum, w.sum_sq);
                        FeatureReport {
                            feature: f.baseline.name.clone(),
                            output: f.output,
                            psi,
                            level: psi.map(|p| Level::of(p, v.thresholds).as_str()),
                            window_n: w.n,
                            window_mean: m.map(|m| m.0),
                            window_std: m.map(|m| m.1),
                            window_counts: w.counts,
                            total_n: f.total.n,
                            total_psi: f.baseline.psi(&f.total.counts),
                            seen: (f.total.n > 0).then_some((f.min, f.max)),
                            edges: f.baseline.edges.clone(),
                            expected: f.baseline.expected(),
                            baseline_mean: f.baseline.mean,
                            baseline_std: f.baseline.std,
                        }
                    })
                    .collect();
                VersionReport {
                    model: model.clone(),
                    version: version.clone(),
                    window_s: v.window_s,
                    moderate: v.thresholds.moderate,
                    significant: v.thresholds.significant,
                    unknown_observations: v.unknown,
                    unknown_features: v.unknown_names.iter().cloned().collect(),
                    features,
                }
            })
            .collect()
    }

    /// The counters since start of every version and feature (the telemetry form).
    pub fn snapshot(&self) -> Vec<DriftSeries> {
        let Ok(all) = self.versions.lock() else {
            return Vec::new();
        };
        all.iter()
            .flat_map(|((model, version), v)| {
                v.features.iter().map(move |f| DriftSeries {
                    model: model.clone(),
                    version: version.clone(),
                    feature: f.baseline.name.clone(),
                    output: f.output,
                    counts: f.total.counts.clone(),
                    n: f.total.n,
                    center: f.center,
                    sum: f.total.sum,
                    sum_sq: f.total.sum_sq,
                })
            })
            .collect()
    }

    /// The Prometheus text exposition of the drift gauges.
    pub fn render(&self, out: &mut String) {
        let reports = self.report();
        let label = |r: &VersionReport| {
            format!(
                "model=\"{}\",version=\"{}\"",
                crate::metrics::escape(&r.model),
                crate::metrics::escape(&r.version)
            )
        };
        let gauges: [(&str, &str, Gauge); 4] = [
            (
                "outpost_feature_psi",
                "PSI of each baseline feature over the drift window (kind: input or output).",
                |f| f.psi,
            ),
            (
                "outpost_feature_window_observations",
                "Observations of each baseline feature in the drift window.",
                |f| Some(f.window_n as f64),
            ),
            (
                "outpost_feature_window_mean",
                "Mean of each baseline feature over the drift window.",
                |f| f.window_mean,
            ),
            (
                "outpost_feature_window_stddev",
                "Standard deviation of each baseline feature over the drift window.",
                |f| f.window_std,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for r in &reports {
                for f in &r.features {
                    if let Some(x) = value(f) {
                        let _ = writeln!(
                            out,
                            "{name}{{{},feature=\"{}\",kind=\"{}\"}} {x}",
                            label(r),
                            crate::metrics::escape(&f.feature),
                            if f.output { "output" } else { "input" }
                        );
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_drift_threshold The bundle's PSI thresholds, by level."
        );
        let _ = writeln!(out, "# TYPE outpost_drift_threshold gauge");
        for r in &reports {
            for (level, x) in [("moderate", r.moderate), ("significant", r.significant)] {
                let _ = writeln!(
                    out,
                    "outpost_drift_threshold{{{},level=\"{level}\"}} {x}",
                    label(r)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feature_unknown_total Observations of features the bundle's baseline does not name (refused)."
        );
        let _ = writeln!(out, "# TYPE outpost_feature_unknown_total counter");
        for r in &reports {
            let _ = writeln!(
                out,
                "outpost_feature_unknown_total{{{}}} {}",
                label(r),
                r.unknown_observations
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn baseline() -> Baseline {
        Baseline {
            features: vec![FeatureBaseline {
                name: "x".into(),
                edges: vec![0.0, 1.0, 2.0],
                proportions: vec![0.0, 0.5, 0.5, 0.0],
                mean: Some(1.0),
                std: Some(0.5),
                min: None,
                max: None,
                count: None,
            }],
            window_s: Some(120),
            ..Baseline::default()
        }
    }

    fn obs(xs: &[f64]) -> Vec<(String, f64)> {
        xs.iter().map(|&x| ("x".to_owned(), x)).collect()
    }

    #[test]
    fn the_window_forgets_what_slid_out_and_the_total_does_not() {
        let d = Drift::default();
        let b = baseline();
        d.observe_at(1_000, "m", "1", Some(&b), &obs(&[0.5, 0.5, 1.5, 1.5]));
        let r = &d.report_at(1_000)[0].features[0];
        assert_eq!(r.window_counts, [0, 2, 2, 0]);
        assert!(r.psi.unwrap().abs() < 1e-12);
        assert_eq!(r.window_mean, Some(1.0));
        assert!((r.window_std.unwrap() - 0.5).abs() < 1e-12);
        // 110 s later: still in the 120 s window; 130 s later, gone from it but not the total.
        d.observe_at(1_110, "m", "1", Some(&b), &obs(&[5.0]));
        assert_eq!(d.report_at(1_110)[0].features[0].window_n, 5);
        let later = &d.report_at(1_135)[0].features[0];
        assert_eq!(later.window_counts, [0, 0, 0, 1]);
        assert_eq!(later.total_n, 5);
        assert_eq!(d.snapshot()[0].counts, [0, 2, 2, 1]);
    }

    #[test]
    fn unknown_features_are_counted_not_binned() {
        let d = Drift::default();
        d.observe_at(
            0,
            "m",
            "1",
            Some(&baseline()),
            &[("y".into(), 1.0), ("x".into(), 1.0)],
        );
        d.observe_at(0, "m", "2", None, &[("x".into(), 1.0)]);
        let r = d.report_at(0);
        assert_eq!(r[0].unknown_observations, 1);
        assert_eq!(r[0].unknown_features, ["y"]);
        assert_eq!(r[0].features[0].total_n, 1);
        assert_eq!(r[1].unknown_observations, 1);
        let mut text = String::new();
        d.render(&mut text);
        assert!(text.contains("outpost_feature_unknown_total{model=\"m\",version=\"2\"} 1"));
    }
}
