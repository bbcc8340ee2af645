//! A/B and shadow comparisons (`GET /api/v1/compare`): every version of a model that devices
//! served over a window, by role, with its requests, error rate, p95 latency, accuracy from
//! feedback and, for a shadow, its agreement with the primary — each device's counters over
//! the window (its last record minus its first, as for drift) added up.

use std::collections::BTreeMap;

use outpost_proto::TelemetrySample;
use outpost_proto::rest::{
    CompareQuery, FleetComparison, GateMetric, MonitorQuery, ShadowComparison, VersionComparison,
};

use crate::rollout::{Window, counters};
use crate::store::now_secs;
use crate::{Fleet, FleetError, Result};

/// One (version, role)'s counters in one record.
#[derive(Debug, Default, Clone)]
struct Counts {
    serving: Window,
    shadow: (u64, u64, u64),
}

impl Counts {
    fn minus(mut self, base: &Counts) -> Counts {
        if base.serving.requests <= self.serving.requests {
            self.serving.requests -= base.serving.requests;
            self.serving.errors = self.serving.errors.saturating_sub(base.serving.errors);
            for (bound, n) in self.serving.buckets.iter_mut() {
                *n = n.saturating_sub(base.serving.buckets.get(bound).copied().unwrap_or(0));
            }
        }
        let (a, d, x) = base.shadow;
        if a + d <= self.shadow.0 + self.shadow.1 {
            self.shadow = (
                self.shadow.0.saturating_sub(a),
                self.shadow.1.saturating_sub(d),
                self.shadow.2.saturating_sub(x),
            );
        }
        self
    }
}

/// Each (version, role) of `model` in one record.
fn counts_of(s: &TelemetrySample, model: &str) -> BTreeMap<(String, String), Counts> {
    let mut out: BTreeMap<(String, String), Counts> = BTreeMap::new();
    for series in s.models.iter().filter(|x| x.model == model) {
        let c = out
            .entry((series.version.clone(), series.role.clone()))
            .or_default();
        let (requests, errors, buckets) = counters(series);
        c.serving.requests += requests;
        c.serving.errors += errors;
        for (bound, n) in buckets {
            *c.serving.buckets.entry(bound.to_bits()).or_default() += n;
        }
    }
    for x in s.shadows.iter().filter(|x| x.model == model) {
        let c = out
            .entry((x.version.clone(), "shadow".to_owned()))
            .or_default();
        c.shadow.0 += x.agreed;
        c.shadow.1 += x.disagreed;
        c.shadow.2 += x.dropped;
    }
    out
}

fn role_rank(role: &str) -> u8 {
    match role {
        "primary" => 0,
        "candidate" => 1,
        "shadow" => 2,
        _ => 3,
    }
}

impl Fleet {
    /// Every version of a model its devices served over the window, by role, side by side.
    pub fn compare(&self, q: &CompareQuery) -> Result<FleetComparison> {
        if q.window.is_some_and(|w| w == 0) {
            return Err(FleetError::BadRequest("a window is at least 1 s".into()));
        }
        let now = now_secs();
        let mut total: BTreeMap<(String, String), (Counts, u64)> = BTreeMap::new();
        for device in self.store.devices()? {
            if !crate::drift::tagged(&device, q.tag.as_deref()) {
                continue;
            }
            let Some((base, last)) = self.window_of(&device.id, q.window, now)? else {
                continue;
            };
            let base = base.map(|b| counts_of(&b, &q.model)).unwrap_or_default();
            for (key, c) in counts_of(&last, &q.model) {
                let c = match base.get(&key) {
                    Some(b) => c.minus(b),
                    None => c,
                };
                let (sum, devices) = total.entry(key).or_default();
                let active = c.serving.requests + c.shadow.0 + c.shadow.1 + c.shadow.2 > 0;
                if !active {
                    continue;
                }
                *devices += 1;
                sum.serving.requests += c.serving.requests;
                sum.serving.errors += c.serving.errors;
                for (bound, n) in &c.serving.buckets {
                    *sum.serving.buckets.entry(*bound).or_default() += n;
                }
                sum.shadow.0 += c.shadow.0;
                sum.shadow.1 += c.shadow.1;
                sum.shadow.2 += c.shadow.2;
            }
        }
        let mut versions = Vec::new();
        let mut quality = BTreeMap::new();
        for ((version, role), (c, devices)) in total {
            if devices == 0 {
                continue;
            }
            let q = match quality.get(&version) {
                Some(found) => *found,
                None => {
                    let found = self
                        .quality(&MonitorQuery {
                            model: q.model.clone(),
                            version: version.clone(),
                            tag: q.tag.clone(),
                            window: q.window,
                        })
                        .ok()
                        .map(|x| (x.accuracy, x.mae, x.labels));
                    quality.insert(version.clone(), found);
                    found
                }
            };
            let (accuracy, mae, labels) = q.unwrap_or((None, None, 0));
            let w = &c.serving;
            let served = w.requests > 0;
            let (agreed, disagreed, dropped) = c.shadow;
            versions.push(VersionComparison {
                shadow: (role == "shadow").then(|| ShadowComparison {
                    agreed,
                    disagreed,
                    dropped,
                    agreement: (agreed + disagreed > 0)
                        .then(|| agreed as f64 / (agreed + disagreed) as f64),
                }),
                version,
                role,
                devices,
                requests: w.requests,
                errors: w.errors,
                error_rate: served.then(|| w.value(GateMetric::ErrorRate)),
                p95_latency_s: served.then(|| w.value(GateMetric::P95Latency)),
                accuracy,
                mae,
                labels,
            });
        }
        versions.sort_by(|a, b| {
            (role_rank(&a.role), &a.version).cmp(&(role_rank(&b.role), &b.version))
        });
        Ok(FleetComparison {
            model: q.model.clone(),
            tag: q.tag.clone(),
            window_s: q.window,
            versions,
        })
    }
}

#[cfg(test)]
mod tests {
    use outpost_proto::{ModelSeries, ShadowSeries};

    use super::*;

    fn record(primary: u64, errors: u64, shadow: (u64, u64, u64)) -> TelemetrySample {
        let series = |version: &str, role: &str, requests: u64, errors: u64| ModelSeries {
            model: "m".into(),
            version: version.into(),
            role: role.into(),
            requests,
            errors: [("internal".to_owned(), errors), ("input".to_owned(), 5)]
                .into_iter()
                .collect(),
            latency_buckets: vec![(0.005, requests / 2), (0.05, requests)],
            latency_sum: 0.0,
        };
        TelemetrySample {
            models: vec![
                series("1.0.0", "primary", primary, errors),
                series("1.1.0", "shadow", shadow.0 + shadow.1, 0),
                ModelSeries {
                    model: "other".into(),
                    ..series("9.0.0", "primary", 7, 7)
                },
            ],
            shadows: vec![ShadowSeries {
                model: "m".into(),
                version: "1.1.0".into(),
                agreed: shadow.0,
                disagreed: shadow.1,
                dropped: shadow.2,
            }],
            ..TelemetrySample::default()
        }
    }

    #[test]
    fn a_window_is_the_last_record_minus_the_first_per_version_and_role() {
        let base = counts_of(&record(100, 2, (40, 2, 1)), "m");
        let last = counts_of(&record(300, 12, (130, 4, 3)), "m");
        assert_eq!(last.len(), 2, "{last:?}");
        let key = |v: &str, r: &str| (v.to_owned(), r.to_owned());
        let primary = last[&key("1.0.0", "primary")]
            .clone()
            .minus(&base[&key("1.0.0", "primary")]);
        // Client errors (`input`) are not the version's fault.
        assert_eq!(
            (primary.serving.requests, primary.serving.errors),
            (200, 10)
        );
        assert!((primary.serving.value(GateMetric::ErrorRate) - 0.05).abs() < 1e-12);
        assert_eq!(primary.serving.value(GateMetric::P95Latency), 0.05);
        let shadow = last[&key("1.1.0", "shadow")]
            .clone()
            .minus(&base[&key("1.1.0", "shadow")]);
        assert_eq!(shadow.shadow, (90, 2, 2));
        // A restarted device's counters went down: the last record counts alone.
        let restarted = counts_of(&record(50, 0, (10, 0, 0)), "m");
        let after = restarted[&key("1.1.0", "shadow")]
            .clone()
            .minus(&base[&key("1.1.0", "shadow")]);
        assert_eq!(after.shadow, (10, 0, 0));
        assert!(role_rank("primary") < role_rank("candidate"));
        assert!(role_rank("candidate") < role_rank("shadow"));
    }
}
