//! What watches a candidate version: a canary's sliding window over both versions' recent
//! requests and its verdict, and a shadow's bounded lane and the agreement between two answers.
//!
//! A canary's verdict is taken after every request either version answers: once both have at
//! least `min_requests` requests in the last `window_s` seconds, the candidate is rolled back
//! when its error rate exceeds the active version's by more than `max_error_rate_delta`, or its
//! p95 latency is more than `max_p95_ratio` times the active version's. When it has stayed
//! within them for `window_s` since the canary began, it passes. Without enough requests it
//! neither fails nor passes: no data is not a pass.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use outpost_bundle::manifest::DataType;
use outpost_engine::Payload;
use outpost_inference::Tensor;
use tokio::sync::Semaphore;

use crate::policy::{Canary, Compare, Shadow};

/// The most recent requests a canary keeps per version.
pub const MAX_WINDOW_SAMPLES: usize = 4_096;

/// A version's part in a traffic policy, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Answers the requests the policy gives it: the active version, or any version asked for
    /// by name.
    Primary,
    /// A canary's or a split's other version: answers its share of the requests.
    Candidate,
    /// Runs on a copy of a request and never answers.
    Shadow,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Candidate => "candidate",
            Role::Shadow => "shadow",
        }
    }
}

/// Whether an error kind is the version's fault (a client's bad request or a full device is
/// not a reason to roll a candidate back).
pub fn counts_against(kind: &str) -> bool {
    matches!(kind, "internal" | "deadline" | "memory" | "trap")
}

#[derive(Debug, Default)]
struct Window {
    primary: VecDeque<(Instant, f64, bool)>,
    candidate: VecDeque<(Instant, f64, bool)>,
}

/// One side of a canary's window, summarised.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Side {
    /// Requests in the window.
    pub requests: u64,
    /// Of those, failures the version caused.
    pub errors: u64,
    /// The 95th percentile of their latencies, in seconds.
    pub p95_s: f64,
}

impl Side {
    fn of(samples: &VecDeque<(Instant, f64, bool)>) -> Self {
        let mut latencies: Vec<f64> = samples.iter().map(|s| s.1).collect();
        let p95_s = if latencies.is_empty() {
            0.0
        } else {
            let at = ((latencies.len() as f64) * 0.95).ceil() as usize;
            let at = at.clamp(1, latencies.len()) - 1;
            let (_, p, _) = latencies.select_nth_unstable_by(at, f64::total_cmp);
            *p
        };
        Side {
            requests: samples.len() as u64,
            errors: samples.iter().filter(|s| s.2).count() as u64,
            p95_s,
        }
    }

    /// Failures per request (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// What a canary's window decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough data, or still within its bounds before the window is over.
    Watching,
    /// A bound was crossed: roll the candidate back.
    Fail {
        /// Which bound, with the figures.
        reason: String,
        /// The active version's side of the window.
        primary: Side,
        /// The candidate's side.
        candidate: Side,
    },
    /// Within its bounds for the whole window.
    Pass {
        /// The active version's side of the window.
        primary: Side,
        /// The candidate's side.
        candidate: Side,
    },
}

/// A running canary's window. Lives as long as the policy; a restart begins a new window.
#[derive(Debug)]
pub struct CanaryWatch {
    /// The policy it watches.
    pub canary: Canary,
    /// The version the candidate is compared with (the active one when it began).
    pub primary: String,
    started: Instant,
    window: Mutex<Window>,
    /// Set once a verdict other than watching was acted on.
    decided: AtomicBool,
}

impl CanaryWatch {
    /// A new window for `canary` against `primary`.
    pub fn new(canary: Canary, primary: String) -> Self {
        Self {
            canary,
            primary,
            started: Instant::now(),
            window: Mutex::new(Window::default()),
            decided: AtomicBool::new(false),
        }
    }

    /// Records one request a version of the canary answered, and returns the verdict once, when
    /// it is first other than [`Verdict::Watching`] (a verdict is acted on once).
    pub fn record(&self, role: Role, elapsed: Duration, error: Option<&str>) -> Option<Verdict> {
        self.record_at(Instant::now(), role, elapsed, error)
    }

    fn record_at(
        &self,
        now: Instant,
        role: Role,
        elapsed: Duration,
        error: Option<&str>,
    ) -> Option<Verdict> {
        if self.decided.load(Ordering::Acquire) {
            return None;
        }
        let failed = error.is_some_and(counts_against);
        let verdict = {
            let mut w = self.window.lock().ok()?;
            let side = match role {
                Role::Candidate => &mut w.candidate,
                Role::Primary | Role::Shadow => &mut w.primary,
            };
            side.push_back((now, elapsed.as_secs_f64(), failed));
            if side.len() > MAX_WINDOW_SAMPLES {
                side.pop_front();
            }
            let horizon = now.checked_sub(Duration::from_secs(self.canary.window_s));
            let Window { primary, candidate } = &mut *w;
            for side in [primary, candidate] {
                while side
                    .front()
                    .is_some_and(|s| horizon.is_some_and(|h| s.0 < h))
                {
                    side.pop_front();
                }
            }
            self.judge(now, Side::of(&w.primary), Side::of(&w.candidate))
        };
        if verdict == Verdict::Watching || self.decided.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(verdict)
    }

    fn judge(&self, now: Instant, primary: Side, candidate: Side) -> Verdict {
        let c = &self.canary;
        if primary.requests < c.min_requests || candidate.requests < c.min_requests {
            return Verdict::Watching;
        }
        let delta = candidate.error_rate() - primary.error_rate();
        if delta > c.max_error_rate_delta {
            return Verdict::Fail {
                reason: format!(
                    "error rate {:.1}% against {:.1}% on {} (over the {:.1}-point bound), over {} and {} requests",
                    candidate.error_rate() * 100.0,
                    primary.error_rate() * 100.0,
                    self.primary,
                    c.max_error_rate_delta * 100.0,
                    candidate.requests,
                    primary.requests
                ),
                primary,
                candidate,
            };
        }
        // A floor of 10 µs keeps a ratio of near-zero latencies meaningful.
        let ratio = candidate.p95_s / primary.p95_s.max(1e-5);
        if ratio > c.max_p95_ratio {
            return Verdict::Fail {
                reason: format!(
                    "p95 latency {:.2} ms against {:.2} ms on {} ({ratio:.1}x, over the {:.1}x bound), over {} and {} requests",
                    candidate.p95_s * 1e3,
                    primary.p95_s * 1e3,
                    self.primary,
                    c.max_p95_ratio,
                    candidate.requests,
                    primary.requests
                ),
                primary,
                candidate,
            };
        }
        if now.duration_since(self.started) >= Duration::from_secs(c.window_s) {
            return Verdict::Pass { primary, candidate };
        }
        Verdict::Watching
    }

    /// The window's two sides now.
    pub fn sides(&self) -> (Side, Side) {
        match self.window.lock() {
            Ok(w) => (Side::of(&w.primary), Side::of(&w.candidate)),
            Err(_) => (Side::default(), Side::default()),
        }
    }
}

/// A shadow's lane: at most `queue` shadow requests wait or run, one runs at a time, so a
/// slow candidate costs the primary one core's share at most and its backlog is bounded.
#[derive(Debug)]
pub struct ShadowLane {
    /// The policy.
    pub shadow: Shadow,
    /// Places in the lane.
    pub places: std::sync::Arc<Semaphore>,
    /// One shadow request runs at a time, in arrival order.
    pub running: tokio::sync::Mutex<()>,
}

impl ShadowLane {
    /// A lane for `shadow`.
    pub fn new(shadow: Shadow) -> Self {
        Self {
            places: std::sync::Arc::new(Semaphore::new(shadow.queue)),
            shadow,
            running: tokio::sync::Mutex::new(()),
        }
    }
}

/// Whether two answers to the same request agree under `compare`.
pub fn agree(compare: Compare, a: &Payload, b: &Payload) -> bool {
    match (a, b) {
        (
            Payload::Raw {
                content_type: ta,
                body: ba,
            },
            Payload::Raw {
                content_type: tb,
                body: bb,
            },
        ) => ta == tb && ba == bb,
        (Payload::Tensors(a), Payload::Tensors(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| tensors_agree(compare, a, b))
        }
        _ => false,
    }
}

fn tensors_agree(compare: Compare, a: &Tensor, b: &Tensor) -> bool {
    if a.name != b.name || a.datatype != b.datatype || a.shape != b.shape {
        return false;
    }
    let (Some(x), Some(y)) = (numbers(a), numbers(b)) else {
        return a.data == b.data;
    };
    match compare {
        Compare::Exact => a.data == b.data,
        Compare::Tolerance(t) => x.iter().zip(&y).all(|(x, y)| (x - y).abs() <= t),
        Compare::Argmax => {
            let row = a.shape.last().map_or(1, |&d| d.max(1) as usize);
            x.chunks(row)
                .zip(y.chunks(row))
                .all(|(x, y)| argmax(x) == argmax(y))
        }
    }
}

fn argmax(values: &[f64]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

/// A numeric tensor's elements as `f64` (`None` for other types).
fn numbers(t: &Tensor) -> Option<Vec<f64>> {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f64) -> Vec<f64> {
        data.chunks_exact(N)
            .map(|c| {
                let mut b = [0u8; N];
                b.copy_from_slice(c);
                f(b)
            })
            .collect()
    }
    let d = &t.data;
    Some(match t.datatype {
        DataType::U8 => d.iter().map(|&v| f64::from(v)).collect(),
        DataType::I8 => d.iter().map(|&v| f64::from(v as i8)).collect(),
        DataType::U16 => each(d, |b| f64::from(u16::from_le_bytes(b))),
        DataType::I16 => each(d, |b| f64::from(i16::from_le_bytes(b))),
        DataType::U32 => each(d, |b| f64::from(u32::from_le_bytes(b))),
        DataType::I32 => each(d, |b| f64::from(i32::from_le_bytes(b))),
        DataType::U64 => each(d, |b| u64::from_le_bytes(b) as f64),
        DataType::I64 => each(d, |b| i64::from_le_bytes(b) as f64),
        DataType::F32 => each(d, |b| f64::from(f32::from_le_bytes(b))),
        DataType::F64 => each(d, f64::from_le_bytes),
        DataType::Bool | DataType::F16 | DataType::Bytes => return None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::OnPass;

    fn canary() -> Canary {
        Canary {
            id: "c1".into(),
            candidate: "2.0.0".into(),
            percent: 20.0,
            window_s: 60,
            min_requests: 20,
            max_error_rate_delta: 0.05,
            max_p95_ratio: 2.0,
            on_pass: OnPass::Hold,
        }
    }

    fn feed(
        w: &CanaryWatch,
        t0: Instant,
        n: u32,
        cand_ms: u64,
        cand_fail_every: u32,
    ) -> Vec<Verdict> {
        let mut out = Vec::new();
        for i in 0..n {
            let at = t0 + Duration::from_millis(u64::from(i) * 10);
            let p = w.record_at(at, Role::Primary, Duration::from_millis(2), None);
            let fail = cand_fail_every > 0 && i % cand_fail_every == 0;
            let c = w.record_at(
                at,
                Role::Candidate,
                Duration::from_millis(cand_ms),
                fail.then_some("trap"),
            );
            out.extend(p.into_iter().chain(c));
        }
        out
    }

    #[test]
    fn failures_and_slowness_fail_a_canary_once_and_only_with_enough_data() {
        let t0 = Instant::now();
        let w = CanaryWatch::new(canary(), "1.0.0".into());
        // Every 5th candidate request fails: 20% against 0%.
        let v = feed(&w, t0, 19, 2, 5);
        assert!(v.is_empty(), "decided below min_requests: {v:?}");
        let v = feed(&w, t0 + Duration::from_secs(1), 10, 2, 5);
        assert_eq!(v.len(), 1, "{v:?}");
        let Verdict::Fail { reason, .. } = &v[0] else {
            panic!("{v:?}")
        };
        assert!(reason.contains("error rate"), "{reason}");
        assert!(feed(&w, t0, 50, 2, 5).is_empty(), "a verdict twice");

        let w = CanaryWatch::new(canary(), "1.0.0".into());
        let v = feed(&w, t0, 40, 10, 0);
        let Verdict::Fail { reason, .. } = &v[0] else {
            panic!("{v:?}")
        };
        assert!(reason.contains("5.0x"), "{reason}");
    }

    #[test]
    fn a_good_canary_passes_after_its_window_and_clients_errors_do_not_count() {
        let t0 = Instant::now();
        let w = CanaryWatch::new(canary(), "1.0.0".into());
        let mut v = feed(&w, t0, 100, 3, 0);
        for _ in 0..10 {
            v.extend(w.record_at(
                t0,
                Role::Candidate,
                Duration::from_millis(2),
                Some("invalid_input"),
            ));
        }
        assert!(v.is_empty(), "{v:?}");
        let later = t0 + Duration::from_secs(61);
        let v = w.record_at(later, Role::Primary, Duration::from_millis(2), None);
        // The window slid past every sample: not enough data, still watching.
        assert_eq!(v, None);
        let v = feed(&w, later, 30, 3, 0);
        assert!(matches!(v.as_slice(), [Verdict::Pass { .. }]), "{v:?}");
    }

    #[test]
    fn answers_agree_by_argmax_tolerance_or_bytes() {
        let t = |v: &[f32]| {
            Payload::Tensors(vec![Tensor {
                name: "y".into(),
                datatype: DataType::F32,
                shape: vec![2, 2],
                data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }])
        };
        let a = t(&[0.9, 0.1, 0.2, 0.8]);
        let b = t(&[0.6, 0.4, 0.45, 0.55]);
        let c = t(&[0.6, 0.4, 0.55, 0.45]);
        assert!(agree(Compare::Argmax, &a, &b));
        assert!(!agree(Compare::Argmax, &a, &c));
        assert!(!agree(Compare::Tolerance(0.1), &a, &b));
        assert!(agree(Compare::Tolerance(0.31), &a, &b));
        assert!(agree(Compare::Exact, &a, &a.clone()));
        assert!(!agree(Compare::Exact, &a, &b));
        let raw = |b: &str| Payload::Raw {
            content_type: "text/plain".into(),
            body: b.into(),
        };
        assert!(agree(Compare::Argmax, &raw("cat"), &raw("cat")));
        assert!(!agree(Compare::Argmax, &raw("cat"), &raw("dog")));
        assert!(!agree(Compare::Argmax, &raw("cat"), &a));
    }
}
