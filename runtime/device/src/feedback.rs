//! Model quality from ground truth: the device keeps the prediction of each recent request
//! (a bounded window, in fixed memory), a client posts the true label or value for a request
//! id later, and the device keeps accuracy (classification) or mean absolute error
//! (regression) per model version, over a window and since start.
//!
//! Feedback is idempotent per request id: the second label for a request is a duplicate and
//! changes nothing. A label for a request the window no longer holds (or never held) is
//! counted as unknown, not an error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use outpost_bundle::manifest::{Baseline, Task};
use outpost_proto::QualitySeries;
use serde::{Deserialize, Serialize};

/// Requests whose predictions are kept, at most (the oldest are forgotten first).
pub const MAX_PREDICTIONS: usize = 4096;
/// Items of one request kept, at most (a batch's first ones).
pub const MAX_ITEMS: usize = 16;
/// Longest request id accepted from a client, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Feedback items one post may carry.
pub const MAX_FEEDBACK_ITEMS: usize = 10_000;
/// Time slots a quality window is made of.
const SLOTS: usize = 12;

#[derive(Debug)]
struct Prediction {
    model: String,
    version: String,
    task: Task,
    values: Vec<f64>,
    labelled: bool,
}

/// Labels joined with predictions, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Tally {
    labels: u64,
    correct: u64,
    abs_error: f64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.labels += o.labels;
        self.correct += o.correct;
        self.abs_error += o.abs_error;
    }
}

#[derive(Debug)]
struct VersionQuality {
    task: Task,
    slot_s: u64,
    total: Tally,
    epochs: [u64; SLOTS],
    window: [Tally; SLOTS],
}

impl VersionQuality {
    fn window(&self, epoch: u64) -> Tally {
        let mut t = Tally::default();
        for (e, w) in self.epochs.iter().zip(&self.window) {
            if *e != u64::MAX && *e <= epoch && epoch - *e < SLOTS as u64 {
                t.add(*w);
            }
        }
        t
    }
}

#[derive(Debug, Default)]
struct Inner {
    predictions: HashMap<String, Prediction>,
    order: VecDeque<String>,
    versions: BTreeMap<(String, String), VersionQuality>,
    /// Per model: (duplicates, unknown).
    refused: BTreeMap<String, (u64, u64)>,
}

/// Kept predictions and the quality they give once labelled.
#[derive(Debug)]
pub struct Feedback {
    inner: Mutex<Inner>,
    /// Request ids the device makes: a prefix from its start time, then a counter.
    prefix: u64,
    next: AtomicU64,
    capacity: usize,
}

impl Default for Feedback {
    fn default() -> Self {
        Self::with_capacity(MAX_PREDICTIONS)
    }
}

/// The true label (class index, or class name from the bundle's labels) or value of one
/// request; a list for a batch, in item order.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Truth {
    /// One number.
    One(f64),
    /// One class name.
    Name(String),
    /// One per item.
    Many(Vec<TruthItem>),
}

/// One item's truth in a batch.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TruthItem {
    /// A number.
    Number(f64),
    /// A class name.
    Name(String),
}

/// One feedback item: a request id and its truth.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackItem {
    /// The id the response carried (`id`, or the `outpost-request-id` header).
    pub id: String,
    /// The true label or value.
    pub truth: Truth,
}

/// The body of `POST /v2/models/{name}/feedback`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackPost {
    /// The items, at most [`MAX_FEEDBACK_ITEMS`].
    pub feedback: Vec<FeedbackItem>,
}

/// What a feedback post did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FeedbackAnswer {
    /// Items joined with their prediction.
    pub accepted: u64,
    /// Items for a request already labelled (ignored).
    pub duplicate: u64,
    /// Items for a request the device does not hold (evicted, never seen, another model).
    pub unknown: u64,
    /// Items whose truth does not fit the prediction (count, or a class name not in the
    /// bundle's labels).
    pub invalid: u64,
}

/// One model version's quality, as `GET /admin/quality` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualityReport {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// `classification` or `regression`.
    pub task: &'static str,
    /// Labels in the window.
    pub window_labels: u64,
    /// Accuracy over the window (classification).
    pub window_accuracy: Option<f64>,
    /// Mean absolute error over the window (regression).
    pub window_mae: Option<f64>,
    /// Labels since start.
    pub total_labels: u64,
    /// Of those, correct (classification).
    pub total_correct: u64,
    /// Their summed absolute error (regression).
    pub total_abs_error: f64,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Feedback {
    /// Keeps at most `capacity` requests' predictions.
    pub fn with_capacity(capacity: usize) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            inner: Mutex::new(Inner::default()),
            prefix: nanos & 0xff_ffff_ffff,
            next: AtomicU64::new(1),
            capacity: capacity.max(1),
        }
    }

    /// A fresh request id, unique on this device across restarts (in practice).
    pub fn new_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:010x}-{n}", self.prefix)
    }

    /// Keeps the prediction of request `id` (the values the guest observed for the
    /// baseline's quality output), when the version's baseline names one.
    pub fn remember(
        &self,
        id: &str,
        model: &str,
        version: &str,
        baseline: Option<&Baseline>,
        observations: &[(String, f64)],
    ) {
        let Some(spec) = baseline.and_then(|b| b.quality.as_ref()) else {
            return;
        };
        let values: Vec<f64> = observations
            .iter()
            .filter(|(f, _)| *f == spec.output)
            .map(|(_, v)| *v)
            .take(MAX_ITEMS)
            .collect();
        if values.is_empty() || id.len() > MAX_ID_BYTES {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let slot_s = (baseline.map_or(outpost_bundle::drift::DEFAULT_WINDOW_S, Baseline::window_s)
            / SLOTS as u64)
            .max(1);
        inner
            .versions
            .entry((model.to_owned(), version.to_owned()))
            .or_insert_with(|| VersionQuality {
                task: spec.task,
                slot_s,
                total: Tally::default(),
                epochs: [u64::MAX; SLOTS],
                window: [Tally::default(); SLOTS],
            });
        let prediction = Prediction {
            model: model.to_owned(),
            version: version.to_owned(),
            task: spec.task,
            values,
            labelled: false,
        };
        // A client reusing an id replaces its prediction.
        if inner
            .predictions
            .insert(id.to_owned(), prediction)
            .is_none()
        {
            inner.order.push_back(id.to_owned());
        }
        while inner.order.len() > self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.predictions.remove(&old);
            }
        }
    }

    /// Joins `items` for `model` with the kept predictions; `labels` are the bundle's class
    /// names (for a truth given by name).
    pub fn post(&self, model: &str, items: &[FeedbackItem], labels: &[String]) -> FeedbackAnswer {
        self.post_at(now_s(), model, items, labels)
    }

    fn post_at(
        &self,
        now: u64,
        model: &str,
        items: &[FeedbackItem],
        labels: &[String],
    ) -> FeedbackAnswer {
        let mut answer = FeedbackAnswer::default();
        let Ok(mut inner) = self.inner.lock() else {
            return answer;
        };
        let Inner {
            predictions,
            versions,
            refused,
            ..
        } = &mut *inner;
        let index = |name: &str| labels.iter().position(|l| l == name).map(|i| i as f64);
        for item in items {
            let Some(p) = predictions.get_mut(&item.id).filter(|p| p.model == model) else {
                answer.unknown += 1;
                refused.entry(model.to_owned()).or_default().1 += 1;
                continue;
            };
            if p.labelled {
                answer.duplicate += 1;
                refused.entry(model.to_owned()).or_default().0 += 1;
                continue;
            }
            let truth: Option<Vec<f64>> = match &item.truth {
                Truth::One(x) => Some(vec![*x]),
                Truth::Name(n) => index(n).map(|x| vec![x]),
                Truth::Many(list) => list
                    .iter()
                    .map(|t| match t {
                        TruthItem::Number(x) => Some(*x),
                        TruthItem::Name(n) => index(n),
                    })
                    .collect(),
            };
            let Some(truth) =
                truth.filter(|t| t.len() == p.values.len() && t.iter().all(|x| x.is_finite()))
            else {
                answer.invalid += 1;
                continue;
            };
            let mut t = Tally::default();
            for (predicted, truth) in p.values.iter().zip(&truth) {
                t.labels += 1;
                match p.task {
                    Task::Classification => {
                        t.correct += u64::from(predicted.round() == truth.round());
                    }
                    Task::Regression => t.abs_error += (predicted - truth).abs(),
                }
            }
            p.labelled = true;
            answer.accepted += 1;
            if let Some(v) = versions.get_mut(&(p.model.clone(), p.version.clone())) {
                v.total.add(t);
                let epoch = now / v.slot_s;
                let i = (epoch % SLOTS as u64) as usize;
                if v.epochs[i] != epoch {
                    v.epochs[i] = epoch;
                    v.window[i] = Tally::default();
                }
                v.window[i].add(t);
            }
        }
        answer
    }

    /// Every labelled version's quality now.
    pub fn report(&self) -> Vec<QualityReport> {
        self.report_at(now_s())
    }

    fn report_at(&self, now: u64) -> Vec<QualityReport> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .versions
            .iter()
            .map(|((model, version), v)| {
                let w = v.window(now / v.slot_s);
                let n = w.labels as f64;
                let (accuracy, mae) = match (v.task, w.labels) {
                    (_, 0) => (None, None),
                    (Task::Classification, _) => (Some(w.correct as f64 / n), None),
                    (Task::Regression, _) => (None, Some(w.abs_error / n)),
                };
                QualityReport {
                    model: model.clone(),
                    version: version.clone(),
                    task: v.task.as_str(),
                    window_labels: w.labels,
                    window_accuracy: accuracy,
                    window_mae: mae,
                    total_labels: v.total.labels,
                    total_correct: v.total.correct,
                    total_abs_error: v.total.abs_error,
                }
            })
            .collect()
    }

    /// Totals since start per version (the telemetry form).
    pub fn snapshot(&self) -> Vec<QualitySeries> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .versions
            .iter()
            .map(|((model, version), v)| QualitySeries {
                model: model.clone(),
                version: version.clone(),
                task: v.task.as_str().to_owned(),
                labels: v.total.labels,
                correct: v.total.correct,
                abs_error: v.total.abs_error,
            })
            .collect()
    }

    /// The Prometheus text exposition of the quality gauges and feedback counters.
    pub fn render(&self, out: &mut String) {
        let reports = self.report();
        let refused = self
            .inner
            .lock()
            .map(|i| i.refused.clone())
            .unwrap_or_default();
        let esc = crate::metrics::escape;
        let _ = writeln!(
            out,
            "# HELP outpost_model_accuracy Accuracy over the quality window, from posted labels."
        );
        let _ = writeln!(out, "# TYPE outpost_model_accuracy gauge");
        for r in &reports {
            if let Some(a) = r.window_accuracy {
                let _ = writeln!(
                    out,
                    "outpost_model_accuracy{{model=\"{}\",version=\"{}\"}} {a}",
                    esc(&r.model),
                    esc(&r.version)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_model_mae Mean absolute error over the quality window, from posted values."
        );
        let _ = writeln!(out, "# TYPE outpost_model_mae gauge");
        for r in &reports {
            if let Some(m) = r.window_mae {
                let _ = writeln!(
                    out,
                    "outpost_model_mae{{model=\"{}\",version=\"{}\"}} {m}",
                    esc(&r.model),
                    esc(&r.version)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feedback_labels_total Labels joined with a kept prediction."
        );
        let _ = writeln!(out, "# TYPE outpost_feedback_labels_total counter");
        for r in &reports {
            let _ = writeln!(
                out,
                "outpost_feedback_labels_total{{model=\"{}\",version=\"{}\"}} {}",
                esc(&r.model),
                esc(&r.version),
                r.total_labels
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_feedback_ignored_total Feedback items ignored: a request already labelled (duplicate) or not held (unknown: evicted, late or never seen)."
        );
        let _ = writeln!(out, "# TYPE outpost_feedback_ignored_total counter");
        for (model, (duplicate, unknown)) in &refused {
            for (reason, n) in [("duplicate", duplicate), ("unknown", unknown)] {
                let _ = writeln!(
                    out,
                    "outpost_feedback_ignored_total{{model=\"{}\",reason=\"{reason}\"}} {n}",
                    esc(model)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use outpost_bundle::manifest::{FeatureBaseline, QualitySpec};

    fn baseline(task: Task) -> Baseline {
        Baseline {
            outputs: vec![FeatureBaseline {
                name: "class".into(),
                edges: vec![-0.5, 0.5, 1.5],
                proportions: vec![0.0, 0.5, 0.5, 0.0],
                mean: None,
                std: None,
                min: None,
                max: None,
                count: None,
            }],
            quality: Some(QualitySpec {
                output: "class".into(),
                task,
            }),
            ..Baseline::default()
        }
    }

    fn item(id: &str, truth: Truth) -> FeedbackItem {
        FeedbackItem {
            id: id.into(),
            truth,
        }
    }

    #[test]
    fn labels_join_once_and_late_ones_are_counted() {
        let f = Feedback::with_capacity(2);
        let b = baseline(Task::Classification);
        for (id, class) in [("a", 1.0), ("b", 0.0), ("c", 1.0)] {
            f.remember(id, "m", "1", Some(&b), &[("class".into(), class)]);
        }
        // `a` was evicted by `c`.
        let labels = ["zero".to_owned(), "one".to_owned()];
        let answer = f.post_at(
            0,
            "m",
            &[
                item("a", Truth::One(1.0)),
                item("b", Truth::One(1.0)),
                item("c", Truth::Name("one".into())),
                item("c", Truth::One(0.0)),
                item("zz", Truth::One(0.0)),
            ],
            &labels,
        );
        assert_eq!(
            answer,
            FeedbackAnswer {
                accepted: 2,
                duplicate: 1,
                unknown: 2,
                invalid: 0
            }
        );
        let r = &f.report_at(0)[0];
        assert_eq!((r.total_labels, r.total_correct), (2, 1));
        assert_eq!(r.window_accuracy, Some(0.5));
        // Another model's request id is unknown to this one.
        let other = f.post_at(0, "n", &[item("b", Truth::One(0.0))], &[]);
        assert_eq!(other.unknown, 1);
    }

    #[test]
    fn batches_and_regression() {
        let f = Feedback::default();
        let b = baseline(Task::Regression);
        f.remember(
            "r",
            "m",
            "1",
            Some(&b),
            &[
                ("class".into(), 1.0),
                ("other".into(), 9.0),
                ("class".into(), 3.0),
            ],
        );
        let bad = f.post_at(0, "m", &[item("r", Truth::One(1.0))], &[]);
        assert_eq!(bad.invalid, 1);
        let good = f.post_at(
            0,
            "m",
            &[item(
                "r",
                Truth::Many(vec![TruthItem::Number(2.0), TruthItem::Number(2.0)]),
            )],
            &[],
        );
        assert_eq!(good.accepted, 1);
        assert_eq!(f.report_at(0)[0].window_mae, Some(1.0));
        assert_eq!(f.snapshot()[0].labels, 2);
    }

    #[test]
    fn ids_are_unique() {
        let f = Feedback::default();
        assert_ne!(f.new_id(), f.new_id());
    }
}
