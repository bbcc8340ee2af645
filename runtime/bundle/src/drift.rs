//! Drift arithmetic shared by devices and the fleet: which bin a value falls in, and the
//! population stability index (PSI) of observed bin counts against a [`FeatureBaseline`].
//!
//! Counts always have `n + 2` entries (underflow, the `n` bins, overflow), whichever form the
//! baseline's proportions take, so counts from any number of devices add up bin by bin.
//! `models/drift.py` computes the same numbers with numpy; the tests hold the two together.

use std::collections::BTreeSet;

use crate::manifest::{Baseline, FeatureBaseline, PsiThresholds};

/// Smallest share a bin counts with in PSI, observed or expected, so an empty bin weighs a
/// lot but not infinitely.
pub const EPSILON: f64 = 1e-4;
/// Most bins one feature may have.
pub const MAX_BINS: usize = 64;
/// Most features (inputs and outputs together) one baseline may name.
pub const MAX_FEATURES: usize = 32;
/// A device's drift window when the baseline does not set one.
pub const DEFAULT_WINDOW_S: u64 = 3600;

impl FeatureBaseline {
    /// Number of bins between the edges (`n`).
    pub fn bins(&self) -> usize {
        self.edges.len().saturating_sub(1)
    }

    /// Whether the proportions include the underflow and overflow bins.
    pub fn has_tails(&self) -> bool {
        self.proportions.len() == self.edges.len() + 1
    }

    /// The index in an `n + 2` count vector that `x` falls in: 0 below the first edge, `n + 1`
    /// above the last; `x` equal to the last edge counts in the last bin. With proportions in
    /// the first format (no tails), values outside count in the first or last bin.
    pub fn slot(&self, x: f64) -> usize {
        let n = self.bins();
        let mut i = self.edges.partition_point(|e| *e <= x);
        if i == n + 1 && self.edges.last() == Some(&x) {
            i = n;
        }
        if !self.has_tails() {
            i = i.clamp(1, n);
        }
        i
    }

    /// The expected share of each of the `n + 2` slots.
    pub fn expected(&self) -> Vec<f64> {
        if self.has_tails() {
            self.proportions.clone()
        } else {
            let mut e = Vec::with_capacity(self.proportions.len() + 2);
            e.push(0.0);
            e.extend_from_slice(&self.proportions);
            e.push(0.0);
            e
        }
    }

    /// PSI of `counts` (`n + 2` slots) against this baseline, `None` when nothing was counted.
    ///
    /// `PSI = Σ (a − e) · ln(a / e)` over the slots, with `a` the observed share and `e` the
    /// expected one, both raised to [`EPSILON`]. Slots a tail-less baseline cannot fill are
    /// left out.
    pub fn psi(&self, counts: &[u64]) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 || counts.len() != self.bins() + 2 {
            return None;
        }
        let expected = self.expected();
        let tails = self.has_tails();
        let mut psi = 0.0;
        for (i, (&c, &e)) in counts.iter().zip(&expected).enumerate() {
            if !tails && (i == 0 || i == counts.len() - 1) {
                continue;
            }
            let a = (c as f64 / total as f64).max(EPSILON);
            let e = e.max(EPSILON);
            psi += (a - e) * (a / e).ln();
        }
        Some(psi)
    }
}

/// `x` rounded to six decimals, half to even (numpy's `round(x, 6)`).
fn round6(x: f64) -> f64 {
    (x * 1e6).round_ties_even() / 1e6
}

/// The `q`-quantile of sorted `v` by linear interpolation (numpy's default method).
fn quantile(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let lo = (pos.floor() as usize).min(v.len() - 1);
    let hi = (lo + 1).min(v.len() - 1);
    let (a, b, t) = (v[lo], v[hi], pos - lo as f64);
    // numpy's `_lerp`: exact at both ends.
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// Counts as shares rounded to six decimals, the rounding residue moved into the largest share
/// so they still sum to 1 (`models/common.py`'s `shares`).
fn shares(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    let mut p: Vec<f64> = counts
        .iter()
        .map(|&c| round6(c as f64 / total as f64))
        .collect();
    let largest = p
        .iter()
        .enumerate()
        .fold(0, |best, (i, &x)| if x > p[best] { i } else { best });
    let residue = round6(1.0 - p.iter().sum::<f64>());
    p[largest] = round6(p[largest] + residue);
    p
}

/// A feature baseline over `edges`: the share of `values` in each of the `n + 2` slots and the
/// values' statistics.
fn summarise(name: &str, edges: Vec<f64>, values: &[f64]) -> FeatureBaseline {
    let mut f = FeatureBaseline {
        name: name.to_owned(),
        edges,
        proportions: Vec::new(),
        mean: None,
        std: None,
        min: None,
        max: None,
        count: Some(values.len() as u64),
    };
    let mut counts = vec![0u64; f.bins() + 2];
    for &x in values {
        counts[f.slot(x)] += 1;
    }
    f.proportions = shares(&counts);
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    f.mean = Some(round6(mean));
    f.std = Some(round6(var.sqrt()));
    f.min = Some(round6(values.iter().copied().fold(f64::INFINITY, f64::min)));
    f.max = Some(round6(
        values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    ));
    f
}

/// The baseline of a continuous feature from its training values, as `models/common.py`'s
/// `histogram` computes it: edges at the `bins`-quantiles rounded to six decimals (duplicates
/// merged, the outer edges widened by a rounding step so every training value falls inside),
/// the share of underflow, each bin and overflow, and the statistics. `None` without a finite
/// value; non-finite values are left out.
pub fn histogram(name: &str, values: &[f64], bins: usize) -> Option<FeatureBaseline> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let bins = bins.clamp(1, MAX_BINS);
    let step = 1.0 / bins as f64;
    let mut edges: Vec<f64> = (0..=bins)
        .map(|i| {
            let q = if i == bins { 1.0 } else { i as f64 * step };
            round6(quantile(&v, q))
        })
        .collect();
    edges.dedup();
    if edges.len() < 2 {
        edges.push(edges[0] + 1.0);
    }
    let (lo, hi) = (v[0], v[v.len() - 1]);
    edges[0] = edges[0].min((lo * 1e6).floor() / 1e6);
    let last = edges.len() - 1;
    edges[last] = edges[last].max((hi * 1e6).ceil() / 1e6);
    Some(summarise(name, edges, &v))
}

/// The baseline of a class-valued feature (`0 .. classes - 1`): one unit-wide bin per class
/// (`models/common.py`'s `categorical`). `None` without a finite value or a class.
pub fn categorical(name: &str, values: &[f64], classes: usize) -> Option<FeatureBaseline> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() || classes == 0 || classes > MAX_BINS {
        return None;
    }
    let edges = (0..=classes).map(|i| i as f64 - 0.5).collect();
    Some(summarise(name, edges, &v))
}

/// How far a PSI value says a feature drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below the moderate threshold.
    Stable,
    /// Between the thresholds.
    Moderate,
    /// At or above the significant threshold.
    Significant,
}

impl Level {
    /// Grades `psi` by `t`.
    pub fn of(psi: f64, t: PsiThresholds) -> Self {
        if psi >= t.significant {
            Self::Significant
        } else if psi >= t.moderate {
            Self::Moderate
        } else {
            Self::Stable
        }
    }

    /// `stable`, `moderate` or `significant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stable => "stable",
            Self::Moderate => "moderate",
            Self::Significant => "significant",
        }
    }
}

/// Checks a baseline: unique names, ascending finite edges, proportions of the right length
/// summing to 1, sane statistics, thresholds and window, and the size caps.
pub fn validate(b: &Baseline) -> std::result::Result<(), String> {
    let total = b.features.len() + b.outputs.len();
    if total > MAX_FEATURES {
        return Err(format!(
            "a baseline names at most {MAX_FEATURES} features, not {total}"
        ));
    }
    let mut names = BTreeSet::new();
    for (f, _) in b.all() {
        if f.name.is_empty() || f.name.len() > 128 {
            return Err("baseline feature names have 1 to 128 bytes".into());
        }
        if !names.insert(f.name.as_str()) {
            return Err(format!("baseline feature `{}` is listed twice", f.name));
        }
        let n = f.bins();
        let ascending = f.edges.windows(2).all(|w| w[0] < w[1]);
        let finite = f.edges.iter().chain(&f.proportions).all(|x| x.is_finite());
        let sum: f64 = f.proportions.iter().sum();
        let lengths = f.proportions.len() == n || f.proportions.len() == n + 2;
        if f.edges.len() < 2
            || n > MAX_BINS
            || !lengths
            || !ascending
            || !finite
            || f.proportions.iter().any(|&p| p < 0.0)
            || (sum - 1.0).abs() > 1e-3
        {
            return Err(format!(
                "baseline feature `{}` needs 2 to {} ascending finite edges and, for n bins, \
                 n or n+2 non-negative proportions summing to 1",
                f.name,
                MAX_BINS + 1
            ));
        }
        let stats = [f.mean, f.std, f.min, f.max];
        if stats.iter().flatten().any(|x| !x.is_finite()) || f.std.is_some_and(|s| s < 0.0) {
            return Err(format!(
                "baseline feature `{}`: mean, std, min and max must be finite, std not negative",
                f.name
            ));
        }
        if let (Some(lo), Some(hi)) = (f.min, f.max)
            && lo > hi
        {
            return Err(format!("baseline feature `{}`: min above max", f.name));
        }
    }
    if let Some(t) = b.thresholds
        && !(t.moderate.is_finite() && t.moderate > 0.0 && t.significant >= t.moderate)
    {
        return Err("baseline thresholds need 0 < moderate <= significant".into());
    }
    if let Some(q) = &b.quality
        && !b.outputs.iter().any(|o| o.name == q.output)
    {
        return Err(format!(
            "the baseline's quality output `{}` is not one of its outputs",
            q.output
        ));
    }
    if b.window_s.is_some_and(|w| !(60..=7 * 86_400).contains(&w)) {
        return Err("a baseline's window_s is 60 s to 7 days".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn feature(proportions: Vec<f64>) -> FeatureBaseline {
        FeatureBaseline {
            name: "x".into(),
            edges: vec![0.0, 1.0, 2.0, 3.0],
            proportions,
            mean: None,
            std: None,
            min: None,
            max: None,
            count: None,
        }
    }

    #[test]
    fn slots_follow_the_edges_with_tails() {
        let f = feature(vec![0.0, 0.3, 0.4, 0.3, 0.0]);
        let slots: Vec<usize> = [-1.0, 0.0, 0.5, 1.0, 2.999, 3.0, 3.0001, f64::INFINITY]
            .iter()
            .map(|&x| f.slot(x))
            .collect();
        assert_eq!(slots, [0, 1, 1, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn the_first_format_clamps_into_the_end_bins() {
        let f = feature(vec![0.3, 0.4, 0.3]);
        assert_eq!(f.slot(-5.0), 1);
        assert_eq!(f.slot(9.0), 3);
        // Same expected shares, so the same PSI for counts in the bins.
        let t = feature(vec![0.0, 0.3, 0.4, 0.3, 0.0]);
        let counts = [0, 10, 50, 40, 0];
        assert!((f.psi(&counts).unwrap() - t.psi(&counts).unwrap()).abs() < 0.01);
    }

    #[test]
    fn psi_is_zero_on_the_expected_shares_and_grows_with_the_shift() {
        let f = feature(vec![0.1, 0.2, 0.4, 0.2, 0.1]);
        assert!(f.psi(&[10, 20, 40, 20, 10]).unwrap().abs() < 1e-12);
        let a = f.psi(&[5, 15, 40, 25, 15]).unwrap();
        let b = f.psi(&[0, 5, 20, 35, 40]).unwrap();
        assert!(0.0 < a && a < b, "{a} {b}");
        // By hand: the epsilon stands in for the empty bin.
        let by_hand: f64 = [
            (0.0f64, 0.1f64),
            (0.05, 0.2),
            (0.2, 0.4),
            (0.35, 0.2),
            (0.4, 0.1),
        ]
        .iter()
        .map(|&(a, e)| {
            let a = a.max(EPSILON);
            (a - e) * (a / e).ln()
        })
        .sum();
        assert!((b - by_hand).abs() < 1e-12);
        assert_eq!(f.psi(&[0; 5]), None);
        assert_eq!(f.psi(&[1; 4]), None);
    }

    #[test]
    fn levels_follow_the_thresholds() {
        let t = PsiThresholds::default();
        assert_eq!(Level::of(0.05, t), Level::Stable);
        assert_eq!(Level::of(0.1, t), Level::Moderate);
        assert_eq!(Level::of(0.3, t), Level::Significant);
    }

    #[test]
    fn bad_baselines_are_refused_with_the_reason() {
        let mut b = Baseline {
            features: vec![feature(vec![0.3, 0.4, 0.3])],
            ..Baseline::default()
        };
        assert!(validate(&b).is_ok());
        b.outputs = vec![feature(vec![0.3, 0.4, 0.3])];
        assert!(validate(&b).unwrap_err().contains("listed twice"));
        b.outputs[0].name = "y".into();
        b.outputs[0].proportions = vec![0.5, 0.5];
        assert!(validate(&b).unwrap_err().contains("n or n+2"));
        b.outputs[0].proportions = vec![0.0, 0.3, 0.4, 0.3, 0.0];
        assert!(validate(&b).is_ok());
        b.thresholds = Some(PsiThresholds {
            moderate: 0.3,
            significant: 0.2,
        });
        assert!(validate(&b).unwrap_err().contains("thresholds"));
        b.thresholds = None;
        b.window_s = Some(1);
        assert!(validate(&b).unwrap_err().contains("window_s"));
        b.window_s = None;
        b.quality = Some(crate::manifest::QualitySpec {
            output: "x".into(),
            task: crate::manifest::Task::Classification,
        });
        assert!(validate(&b).unwrap_err().contains("not one of its outputs"));
        b.quality.as_mut().unwrap().output = "y".into();
        assert!(validate(&b).is_ok());
        b.features[0].min = Some(2.0);
        b.features[0].max = Some(1.0);
        assert!(validate(&b).unwrap_err().contains("min above max"));
    }

    #[test]
    fn histograms_put_the_edges_at_the_quantiles_and_every_training_value_inside() {
        let values: Vec<f64> = (0..1000).map(|i| f64::from(i) / 999.0).collect();
        let f = histogram("x", &values, 10).unwrap();
        assert_eq!(f.edges.len(), 11);
        assert_eq!(f.edges[0], 0.0);
        assert_eq!(f.edges[10], 1.0);
        assert!((f.edges[5] - 0.5).abs() < 1e-6, "{:?}", f.edges);
        assert_eq!(f.proportions.len(), 12);
        assert_eq!((f.proportions[0], f.proportions[11]), (0.0, 0.0));
        assert!((f.proportions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(f.proportions[1..11].iter().all(|p| (p - 0.1).abs() < 0.002));
        assert_eq!(f.count, Some(1000));
        assert!((f.mean.unwrap() - 0.5).abs() < 1e-6);
        assert!(
            validate(&Baseline {
                features: vec![f.clone()],
                ..Baseline::default()
            })
            .is_ok()
        );
        // The training data itself scores zero.
        let mut counts = vec![0u64; f.bins() + 2];
        values.iter().for_each(|&x| counts[f.slot(x)] += 1);
        assert!(f.psi(&counts).unwrap() < 1e-6);
        // A constant still has two edges; nothing but NaN has no baseline.
        let c = histogram("c", &[2.0; 5], 10).unwrap();
        assert_eq!(c.edges, [2.0, 3.0]);
        assert_eq!(c.proportions, [0.0, 1.0, 0.0]);
        assert!(histogram("n", &[f64::NAN], 10).is_none());
    }

    #[test]
    fn categorical_baselines_have_one_bin_per_class() {
        let f = categorical("class", &[0.0, 1.0, 1.0, 3.0], 4).unwrap();
        assert_eq!(f.edges, [-0.5, 0.5, 1.5, 2.5, 3.5]);
        assert_eq!(f.proportions, [0.0, 0.25, 0.5, 0.0, 0.25, 0.0]);
        assert!(categorical("class", &[1.0], 0).is_none());
    }
}
