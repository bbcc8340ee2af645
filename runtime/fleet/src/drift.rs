//! Fleet-wide drift and model quality: each device's bin counts (and labels joined) for a model version (from its telemetry) added
//! up, and the PSI of the sum against the bundle's training baseline.
//!
//! Devices send their counters since they started. Over a window, a device's part is its last
//! record in the window minus its first; when the device started inside the window (its
//! uptime at the first record is shorter than the window) or restarted in it (uptime going
//! down), the last record counts alone.

use outpost_bundle::drift::Level;
use std::sync::Arc;

use outpost_bundle::manifest::{Baseline, FeatureBaseline};
use outpost_bundle::{Bundle, ReadLimits};
use outpost_proto::rest::{
    DeviceFeatureDrift, DeviceQuality, FleetDrift, FleetFeatureDrift, FleetQuality, FleetSeries,
    MonitorQuery, SeriesPoint, SeriesQuery, StoredRecord,
};
use outpost_proto::{DriftSeries, TelemetrySample};

use crate::rollout::Window;
use crate::store::{Stream, now_secs};
use crate::{Fleet, FleetError, Result};

/// Baselines kept in memory, at most (the cache starts again past it).
const MAX_CACHED_BASELINES: usize = 256;

/// Records read per device for one window, at most.
const MAX_WINDOW_RECORDS: usize = 100_000;

/// A device's pooled counters of one feature.
#[derive(Debug, Clone, Default)]
struct Part {
    counts: Vec<u64>,
    n: u64,
    sum: f64,
    sum_sq: f64,
}

impl Part {
    /// `s` taken around `center` instead of its own.
    fn of(s: &DriftSeries, center: f64) -> Self {
        let shift = s.center - center;
        let n = s.n as f64;
        Self {
            counts: s.counts.clone(),
            n: s.n,
            sum: s.sum + n * shift,
            sum_sq: s.sum_sq + 2.0 * shift * s.sum + n * shift * shift,
        }
    }

    fn minus(mut self, base: &Part) -> Self {
        if base.counts.len() == self.counts.len() {
            for (a, b) in self.counts.iter_mut().zip(&base.counts) {
                *a = a.saturating_sub(*b);
            }
        }
        self.n = self.n.saturating_sub(base.n);
        self.sum -= base.sum;
        self.sum_sq -= base.sum_sq;
        self
    }

    fn add(&mut self, other: &Part) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
    }
}

/// Whether `device` reports `tag` (every device does when there is none).
pub(crate) fn tagged(device: &outpost_proto::rest::DeviceRecord, tag: Option<&str>) -> bool {
    tag.is_none_or(|tag| {
        device
            .reported
            .as_ref()
            .is_some_and(|r| r.tags.iter().any(|t| t == tag))
    })
}

/// `version` of `model`'s counters of feature `f` in one record, when they fit its bins.
fn drift_series<'a>(
    s: &'a TelemetrySample,
    model: &str,
    version: &str,
    f: &FeatureBaseline,
) -> Option<&'a outpost_proto::DriftSeries> {
    s.drift.iter().find(|d| {
        d.model == model
            && d.version == version
            && d.feature == f.name
            && d.counts.len() == f.bins() + 2
    })
}

fn sample(r: &StoredRecord) -> Option<TelemetrySample> {
    serde_json::from_value(r.record.body.clone()).ok()
}

impl Fleet {
    /// The training baseline in the stored bundle of `model` at `version`, and its digest.
    /// Bundles are immutable per digest, so each is read once (rules and the dashboard ask
    /// every few seconds).
    pub fn baseline(&self, model: &str, version: &str) -> Result<(Arc<Baseline>, String)> {
        let record = self
            .store
            .bundle(model, version)?
            .ok_or_else(|| FleetError::NotFound(format!("bundle {model} {version}")))?;
        if let Some(b) = self
            .baselines
            .lock()
            .ok()
            .and_then(|c| c.get(&record.digest).cloned())
        {
            return Ok((b, record.digest));
        }
        let file = std::fs::File::open(self.store.artifact_path(&record.digest)?)?;
        let limits = ReadLimits {
            max_file_bytes: self.max_bundle_bytes,
            max_total_bytes: self.max_bundle_bytes,
            ..ReadLimits::default()
        };
        let bundle = Bundle::read(std::io::BufReader::new(file), &limits)?;
        let baseline = bundle.manifest().baseline.clone().ok_or_else(|| {
            FleetError::BadRequest(format!(
                "bundle {model} {version} has no training baseline; build it with one to \
                 monitor drift"
            ))
        })?;
        let baseline = Arc::new(baseline);
        if let Ok(mut cache) = self.baselines.lock() {
            if cache.len() >= MAX_CACHED_BASELINES {
                cache.clear();
            }
            cache.insert(record.digest.clone(), Arc::clone(&baseline));
        }
        Ok((baseline, record.digest))
    }

    /// Fleet-wide drift of `q.model` at `q.version` on the devices `q` selects.
    pub fn drift(&self, q: &MonitorQuery) -> Result<FleetDrift> {
        if q.window.is_some_and(|w| w == 0) {
            return Err(FleetError::BadRequest("a window is at least 1 s".into()));
        }
        let (baseline, digest) = self.baseline(&q.model, &q.version)?;
        let now = now_secs();
        let features: Vec<_> = baseline.all().collect();
        let centers: Vec<f64> = features
            .iter()
            .map(|(f, _)| {
                f.mean.unwrap_or_else(|| {
                    (f.edges.first().unwrap_or(&0.0) + f.edges.last().unwrap_or(&0.0)) / 2.0
                })
            })
            .collect();
        let mut pooled: Vec<Part> = features
            .iter()
            .map(|(f, _)| Part {
                counts: vec![0; f.bins() + 2],
                ..Part::default()
            })
            .collect();
        let mut per_device: Vec<Vec<DeviceFeatureDrift>> = vec![Vec::new(); features.len()];
        let mut devices = 0;
        for device in self.store.devices()? {
            if !tagged(&device, q.tag.as_deref()) {
                continue;
            }
            let parts = self.device_parts(&device.id, q, now, &features, &centers)?;
            if parts.iter().all(|p| p.n == 0) {
                continue;
            }
            devices += 1;
            for (i, part) in parts.iter().enumerate() {
                pooled[i].add(part);
                if part.n > 0 {
                    per_device[i].push(DeviceFeatureDrift {
                        device: device.id.clone(),
                        n: part.n,
                        psi: features[i].0.psi(&part.counts),
                    });
                }
            }
        }
        let thresholds = baseline.thresholds();
        let features = features
            .iter()
            .zip(pooled)
            .zip(per_device)
            .zip(&centers)
            .map(|((((f, output), p), per_device), center)| {
                let psi = f.psi(&p.counts);
                let (mean, std) = if p.n > 0 {
                    let n = p.n as f64;
                    let m = p.sum / n;
                    (
                        Some(center + m),
                        Some((p.sum_sq / n - m * m).max(0.0).sqrt()),
                    )
                } else {
                    (None, None)
                };
                FleetFeatureDrift {
                    feature: f.name.clone(),
                    output: *output,
                    n: p.n,
                    psi,
                    level: psi.map(|x| Level::of(x, thresholds).as_str().to_owned()),
                    mean,
                    std,
                    counts: p.counts,
                    edges: f.edges.clone(),
                    expected: f.expected(),
                    per_device,
                }
            })
            .collect();
        Ok(FleetDrift {
            model: q.model.clone(),
            version: q.version.clone(),
            digest,
            tag: q.tag.clone(),
            window_s: q.window,
            moderate: thresholds.moderate,
            significant: thresholds.significant,
            devices,
            features,
        })
    }

    /// The telemetry records that bound `device`'s counters over the last `window` seconds
    /// (`None`: since it started): the record to subtract (`None`: nothing, the counters all
    /// fall in the window) and the last one. `None` when the window says nothing about it.
    pub(crate) fn window_of(
        &self,
        device: &str,
        window: Option<u64>,
        now: u64,
    ) -> Result<Option<(Option<TelemetrySample>, TelemetrySample)>> {
        let records = match window {
            None => self.store.recent_records(Stream::Telemetry, device, 0, 1)?,
            Some(w) => self.store.recent_records(
                Stream::Telemetry,
                device,
                now.saturating_sub(w),
                MAX_WINDOW_RECORDS,
            )?,
        };
        let (Some(last), Some(first)) = (
            records.last().and_then(sample),
            records.first().and_then(sample),
        ) else {
            return Ok(None);
        };
        let Some(w) = window else {
            return Ok(Some((None, last)));
        };
        let started_inside = first.uptime_s <= w;
        let restarted = last.uptime_s < first.uptime_s;
        if started_inside || restarted {
            return Ok(Some((None, last)));
        }
        if records.len() < 2 {
            // A lone record of a device up for longer than the window says nothing about it.
            return Ok(None);
        }
        Ok(Some((Some(first), last)))
    }

    /// One device's counters of each feature over the query's window.
    fn device_parts(
        &self,
        device: &str,
        q: &MonitorQuery,
        now: u64,
        features: &[(&outpost_bundle::manifest::FeatureBaseline, bool)],
        centers: &[f64],
    ) -> Result<Vec<Part>> {
        let parts_of = |s: &TelemetrySample| -> Vec<Part> {
            features
                .iter()
                .zip(centers)
                .map(|((f, _), center)| {
                    drift_series(s, &q.model, &q.version, f)
                        .map(|d| Part::of(d, *center))
                        .unwrap_or_default()
                })
                .collect()
        };
        let Some((base, last)) = self.window_of(device, q.window, now)? else {
            return Ok(Vec::new());
        };
        let last_parts = parts_of(&last);
        let Some(base) = base else {
            return Ok(last_parts);
        };
        Ok(last_parts
            .into_iter()
            .zip(parts_of(&base))
            .map(|(l, f)| l.minus(&f))
            .collect())
    }
}

/// A device's labels over a window: (labels, correct, absolute error).
fn quality_of(s: &TelemetrySample, model: &str, version: &str) -> Option<(String, u64, u64, f64)> {
    s.quality
        .iter()
        .find(|q| q.model == model && q.version == version)
        .map(|q| (q.task.clone(), q.labels, q.correct, q.abs_error))
}

fn rates(
    task: Option<&str>,
    labels: u64,
    correct: u64,
    abs_error: f64,
) -> (Option<f64>, Option<f64>) {
    if labels == 0 {
        return (None, None);
    }
    let n = labels as f64;
    match task {
        Some("regression") => (None, Some(abs_error / n)),
        _ => (Some(correct as f64 / n), None),
    }
}

impl Fleet {
    /// Fleet-wide quality of `q.model` at `q.version` from the labels devices joined.
    pub fn quality(&self, q: &MonitorQuery) -> Result<FleetQuality> {
        if q.window.is_some_and(|w| w == 0) {
            return Err(FleetError::BadRequest("a window is at least 1 s".into()));
        }
        if self.store.bundle(&q.model, &q.version)?.is_none() {
            return Err(FleetError::NotFound(format!(
                "bundle {} {}",
                q.model, q.version
            )));
        }
        let now = now_secs();
        let mut out = FleetQuality {
            model: q.model.clone(),
            version: q.version.clone(),
            tag: q.tag.clone(),
            window_s: q.window,
            task: None,
            devices: 0,
            labels: 0,
            correct: 0,
            accuracy: None,
            mae: None,
            per_device: Vec::new(),
        };
        let mut abs_error = 0.0;
        for device in self.store.devices()? {
            if !tagged(&device, q.tag.as_deref()) {
                continue;
            }
            let Some((base, last)) = self.window_of(&device.id, q.window, now)? else {
                continue;
            };
            let Some((task, labels, correct, err)) = quality_of(&last, &q.model, &q.version) else {
                continue;
            };
            let (b_labels, b_correct, b_err) = base
                .as_ref()
                .and_then(|b| quality_of(b, &q.model, &q.version))
                .map_or((0, 0, 0.0), |(_, l, c, e)| (l, c, e));
            let labels = labels.saturating_sub(b_labels);
            if labels == 0 {
                continue;
            }
            let correct = correct.saturating_sub(b_correct);
            let err = err - b_err;
            let (accuracy, mae) = rates(Some(&task), labels, correct, err);
            out.per_device.push(DeviceQuality {
                device: device.id.clone(),
                labels,
                accuracy,
                mae,
            });
            out.task.get_or_insert(task);
            out.devices += 1;
            out.labels += labels;
            out.correct += correct;
            abs_error += err;
        }
        (out.accuracy, out.mae) = rates(out.task.as_deref(), out.labels, out.correct, abs_error);
        Ok(out)
    }
}

/// Most points one series has.
const MAX_POINTS: u64 = 120;

impl Fleet {
    /// A model version's counters over time (`GET /api/v1/series`): per step, the requests,
    /// errors and p95 latency its devices served, and the PSI of each baseline feature.
    pub fn series(&self, q: &SeriesQuery) -> Result<FleetSeries> {
        let span = q.span.unwrap_or(900).clamp(1, 7 * 86_400);
        let step = q
            .step
            .unwrap_or(span / 30)
            .max(span.div_ceil(MAX_POINTS))
            .max(1);
        let baseline = self.baseline(&q.model, &q.version).ok().map(|(b, _)| b);
        let features: Vec<_> = baseline
            .as_ref()
            .map(|b| b.all().map(|(f, _)| f).collect())
            .unwrap_or_default();
        let now = now_secs();
        let points = span / step;
        let start = now.saturating_sub(points * step);
        let bounds: Vec<u64> = (0..=points).map(|k| start + k * step).collect();
        let mut totals: Vec<(Window, Vec<Part>)> = (0..points)
            .map(|_| {
                (
                    Window::default(),
                    features
                        .iter()
                        .map(|f| Part {
                            counts: vec![0; f.bins() + 2],
                            ..Part::default()
                        })
                        .collect(),
                )
            })
            .collect();
        for device in self.store.devices()? {
            if !tagged(&device, q.tag.as_deref()) {
                continue;
            }
            let records = self.store.recent_records(
                Stream::Telemetry,
                &device.id,
                start.saturating_sub(step),
                MAX_WINDOW_RECORDS,
            )?;
            // The device's last record at or before each bound.
            let mut at: Vec<Option<TelemetrySample>> = Vec::with_capacity(bounds.len());
            let mut i = 0;
            let mut last: Option<&StoredRecord> = None;
            for b in &bounds {
                while i < records.len() && records[i].record.time <= *b {
                    last = Some(&records[i]);
                    i += 1;
                }
                at.push(last.and_then(sample));
            }
            for k in 0..points as usize {
                let Some(end) = &at[k + 1] else { continue };
                let base = at[k].as_ref().filter(|b| b.uptime_s <= end.uptime_s);
                let w = crate::rules::serving_window(base, end, &q.model, &q.version);
                let total = &mut totals[k];
                total.0.requests += w.requests;
                total.0.errors += w.errors;
                for (bound, n) in &w.buckets {
                    *total.0.buckets.entry(*bound).or_default() += n;
                }
                for (j, f) in features.iter().enumerate() {
                    let find = |s: &TelemetrySample| {
                        drift_series(s, &q.model, &q.version, f).map(|d| Part::of(d, 0.0))
                    };
                    let Some(e) = find(end) else { continue };
                    let part = match base.and_then(find) {
                        Some(b) if b.n <= e.n => e.minus(&b),
                        _ => e,
                    };
                    total.1[j].add(&part);
                }
            }
        }
        let points = totals
            .into_iter()
            .zip(bounds.iter().skip(1))
            .map(|((w, parts), time)| SeriesPoint {
                time: *time,
                requests: w.requests,
                errors: w.errors,
                p95_latency: (w.requests > 0)
                    .then(|| w.value(outpost_proto::rest::GateMetric::P95Latency)),
                psi: features
                    .iter()
                    .zip(&parts)
                    .filter_map(|(f, p)| f.psi(&p.counts).map(|x| (f.name.clone(), x)))
                    .collect(),
            })
            .collect();
        Ok(FleetSeries {
            model: q.model.clone(),
            version: q.version.clone(),
            step_s: step,
            points,
        })
    }
}
