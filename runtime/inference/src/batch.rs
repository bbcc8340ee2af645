//! Dynamic batching: concurrent runs of one model whose inputs differ only in their first
//! dimension become one backend call, and each caller gets its own rows back.
//!
//! [`Batched`] wraps any [`Model`]. A run whose inputs could join a batch waits up to the
//! queue delay for others with the same trailing shapes; the first of them leads: it runs the
//! batch when it is full, when it reaches a preferred size, or when its own delay is up. A run
//! that cannot join (a fixed first dimension, inputs of another shape, more rows than a batch
//! holds) runs alone at once. When a batched call fails, or its outputs cannot be split back
//! by rows, each member runs alone, so no request ever fails for batching's sake.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use outpost_bundle::manifest::DataType;

use crate::{Model, Port, RunError, Tensor, match_inputs};

/// How a [`Batched`] model groups runs.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Most rows in one backend call.
    pub max_batch_size: u64,
    /// Longest the first run of a batch waits for others.
    pub max_queue_delay: Duration,
    /// Sizes at which a batch runs at once: as soon as the rows waiting reach any of them.
    pub preferred_sizes: Vec<u64>,
    /// How many callers could call the model now (the requests running in the guest that
    /// calls it). When every one of them is already in the queue or running, no other call can
    /// join, and a batch runs at once instead of waiting out its delay: one client pays nothing
    /// for batching. `None`: always wait.
    pub callers: Option<Arc<AtomicUsize>>,
}

impl PartialEq for BatchConfig {
    fn eq(&self, other: &Self) -> bool {
        self.max_batch_size == other.max_batch_size
            && self.max_queue_delay == other.max_queue_delay
            && self.preferred_sizes == other.preferred_sizes
            && self.callers.is_some() == other.callers.is_some()
    }
}

/// Upper bounds of the batch-size histogram.
pub const SIZE_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
/// Upper bounds of the queue-time histogram, in seconds.
pub const QUEUE_BUCKETS: [f64; 10] = [
    0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1,
];

/// Counters of one batching model: backend calls by size, and how long runs waited.
#[derive(Debug, Default)]
pub struct BatchStats {
    runs: AtomicU64,
    rows: AtomicU64,
    waits: AtomicU64,
    sizes: [AtomicU64; SIZE_BUCKETS.len()],
    queue: [AtomicU64; QUEUE_BUCKETS.len()],
    queue_nanos: AtomicU64,
}

/// A copy of [`BatchStats`], with cumulative histogram buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSnapshot {
    /// Backend calls.
    pub runs: u64,
    /// Rows over all backend calls.
    pub rows: u64,
    /// Callers' runs (each waited, perhaps not at all, for its batch).
    pub waits: u64,
    /// Backend calls of at most each size.
    pub sizes: Vec<(u64, u64)>,
    /// Runs that waited at most each time, in seconds.
    pub queue: Vec<(f64, u64)>,
    /// Total wait, in seconds.
    pub queue_seconds: f64,
}

impl BatchStats {
    fn record_run(&self, rows: u64) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows, Ordering::Relaxed);
        for (bound, n) in SIZE_BUCKETS.iter().zip(&self.sizes) {
            if rows <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn record_wait(&self, waited: Duration) {
        self.waits.fetch_add(1, Ordering::Relaxed);
        let secs = waited.as_secs_f64();
        for (bound, n) in QUEUE_BUCKETS.iter().zip(&self.queue) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.queue_nanos.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The counters now.
    pub fn snapshot(&self) -> BatchSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BatchSnapshot {
            runs: get(&self.runs),
            rows: get(&self.rows),
            waits: get(&self.waits),
            sizes: SIZE_BUCKETS
                .iter()
                .zip(&self.sizes)
                .map(|(b, n)| (*b, get(n)))
                .collect(),
            queue: QUEUE_BUCKETS
                .iter()
                .zip(&self.queue)
                .map(|(b, n)| (*b, get(n)))
                .collect(),
            queue_seconds: get(&self.queue_nanos) as f64 / 1e9,
        }
    }
}

/// Inputs that may share a backend call: the same element types and trailing dimensions.
type Group = Vec<(DataType, Vec<u64>)>;

struct Pending {
    id: u64,
    group: Group,
    rows: u64,
    inputs: Vec<Tensor>,
    arrived: Instant,
}

#[derive(Default)]
struct Queue {
    next: u64,
    pending: Vec<Pending>,
    /// The run that decides when each group's next batch goes.
    leaders: HashMap<Group, u64>,
    results: HashMap<u64, Result<Vec<Tensor>, RunError>>,
}

/// A model whose concurrent runs are batched (see the module docs).
pub struct Batched {
    inner: Arc<dyn Model>,
    config: BatchConfig,
    queue: Mutex<Queue>,
    wake: Condvar,
    stats: Arc<BatchStats>,
    /// Callers inside `run` now: queued, running a batch, or running alone.
    inside: AtomicUsize,
    /// Whether the model's inputs can be batched at all (see [`Batched::batchable`]).
    batchable: bool,
}

/// One caller counted in [`Batched::inside`].
struct Inside<'a>(&'a AtomicUsize);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Batched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched")
            .field("inner", &self.inner)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Batched {
    /// Wraps `inner`; its counters go to `stats`.
    pub fn new(inner: Arc<dyn Model>, config: BatchConfig, stats: Arc<BatchStats>) -> Self {
        Self {
            batchable: Self::batchable(inner.as_ref()),
            inner,
            config,
            queue: Mutex::default(),
            wake: Condvar::new(),
            stats,
            inside: AtomicUsize::new(0),
        }
    }

    /// Whether the model's inputs can be batched at all: every one has a first dimension the
    /// graph leaves free.
    pub fn batchable(model: &dyn Model) -> bool {
        !model.inputs().is_empty()
            && model
                .inputs()
                .iter()
                .all(|p| p.shape.first().is_some_and(Option::is_none))
    }

    /// The group and row count of ordered inputs, when they can join a batch.
    fn group_of(&self, inputs: &[Tensor]) -> Option<(Group, u64)> {
        let rows = inputs.first()?.shape.first().copied()?;
        if rows == 0 || rows >= self.config.max_batch_size || !self.batchable {
            return None;
        }
        let mut group = Vec::with_capacity(inputs.len());
        for t in inputs {
            if t.shape.first() != Some(&rows) {
                return None;
            }
            group.push((t.datatype, t.shape[1..].to_vec()));
        }
        Some((group, rows))
    }

    fn alone(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError> {
        self.inside.fetch_add(1, Ordering::SeqCst);
        let _inside = Inside(&self.inside);
        let rows = inputs
            .first()
            .and_then(|t| t.shape.first().copied())
            .unwrap_or(1);
        self.stats.record_run(rows);
        self.stats.record_wait(Duration::ZERO);
        self.inner.run(inputs, cap)
    }

    /// Runs the members of one batch, as one call when that works, else one by one; every
    /// member's result goes into `results`.
    fn run_batch(
        &self,
        members: Vec<Pending>,
        cap: u64,
        results: &mut Vec<(u64, Result<Vec<Tensor>, RunError>)>,
    ) {
        let now = Instant::now();
        for m in &members {
            self.stats.record_wait(now.duration_since(m.arrived));
        }
        if members.len() > 1
            && let Some(outputs) = self.run_joined(&members, cap)
        {
            for (m, out) in members.iter().zip(outputs) {
                results.push((m.id, Ok(out)));
            }
            return;
        }
        for m in members {
            self.stats.record_run(m.rows);
            results.push((m.id, self.inner.run(m.inputs, cap)));
        }
    }

    /// One backend call for every member, split back by rows; `None` when the call fails or
    /// its outputs do not split (then each member runs alone).
    fn run_joined(&self, members: &[Pending], cap: u64) -> Option<Vec<Vec<Tensor>>> {
        let total: u64 = members.iter().map(|m| m.rows).sum();
        let ports = self.inner.inputs();
        let mut joined = Vec::with_capacity(ports.len());
        for (i, port) in ports.iter().enumerate() {
            let first = &members[0].inputs[i];
            let mut shape = first.shape.clone();
            shape[0] = total;
            let data: Vec<u8> = members
                .iter()
                .flat_map(|m| m.inputs[i].data.iter().copied())
                .collect();
            joined.push(Tensor {
                name: port.name.clone(),
                datatype: first.datatype,
                shape,
                data,
            });
        }
        // Each member's tensors fit the cap; the batch may hold all of them.
        let batch_cap = cap.saturating_mul(members.len() as u64);
        let outputs = self.inner.run(joined, batch_cap).ok()?;
        let mut split: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); members.len()];
        for out in outputs {
            let parts = split_rows(&out, members.iter().map(|m| m.rows))?;
            for (member, part) in split.iter_mut().zip(parts) {
                if part.data.len() as u64 > cap {
                    return None;
                }
                member.push(part);
            }
        }
        self.stats.record_run(total);
        Some(split)
    }
}

/// The backend's cost per item of `model` at each batch size of `sizes`: the median time of
/// one call on zero inputs with that first dimension (other open dimensions 1), divided by the
/// size, over about `budget` per size. What a user weighs before turning batching on: a model
/// whose cost per item does not fall with the batch gains nothing from it.
pub fn per_item_cost(
    model: &dyn Model,
    sizes: &[u64],
    budget: Duration,
) -> Result<Vec<(u64, Duration)>, RunError> {
    if !Batched::batchable(model) {
        return Err(RunError::Input(
            "the model's first dimension is fixed, so it cannot take batches".into(),
        ));
    }
    let mut costs = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let inputs = || -> Vec<Tensor> {
            model
                .inputs()
                .iter()
                .map(|p| {
                    let shape: Vec<u64> = std::iter::once(size)
                        .chain(p.shape.iter().skip(1).map(|d| d.unwrap_or(1)))
                        .collect();
                    let n: u64 = shape.iter().product();
                    let data = match p.datatype.element_size() {
                        Some(bytes) => vec![0; usize::try_from(n).unwrap_or(0) * bytes],
                        None => (0..n).flat_map(|_| 0u32.to_le_bytes()).collect(),
                    };
                    Tensor {
                        name: p.name.clone(),
                        datatype: p.datatype,
                        shape,
                        data,
                    }
                })
                .collect()
        };
        model.run(inputs(), u64::MAX)?;
        let started = Instant::now();
        let mut times = Vec::new();
        while times.len() < 3 || (started.elapsed() < budget && times.len() < 10_000) {
            let t = Instant::now();
            model.run(inputs(), u64::MAX)?;
            times.push(t.elapsed());
        }
        times.sort();
        let median = times[times.len() / 2];
        costs.push((size, median / u32::try_from(size).unwrap_or(u32::MAX)));
    }
    Ok(costs)
}

/// `t` cut along its first dimension into pieces of `rows` each; `None` when its first
/// dimension is not their sum.
fn split_rows(t: &Tensor, rows: impl Iterator<Item = u64>) -> Option<Vec<Tensor>> {
    let rows: Vec<u64> = rows.collect();
    let total: u64 = rows.iter().sum();
    if t.shape.first() != Some(&total) {
        return None;
    }
    let per_row: u64 = t.shape[1..].iter().product();
    let mut parts = Vec::with_capacity(rows.len());
    let mut at = 0usize;
    for n in rows {
        let mut shape = t.shape.clone();
        shape[0] = n;
        let len = match t.datatype.element_size() {
            Some(size) => usize::try_from(n * per_row).ok()? * size,
            None => bytes_len(t.data.get(at..)?, n * per_row)?,
        };
        parts.push(Tensor {
            name: t.name.clone(),
            datatype: t.datatype,
            shape,
            data: t.data.get(at..at + len)?.to_vec(),
        });
        at += len;
    }
    (at == t.data.len()).then_some(parts)
}

/// Bytes taken by the first `count` length-prefixed `BYTES` elements of `data`.
fn bytes_len(data: &[u8], count: u64) -> Option<usize> {
    let mut at = 0usize;
    for _ in 0..count {
        let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
        at += 4 + len;
    }
    (at <= data.len()).then_some(at)
}

impl Model for Batched {
    fn inputs(&self) -> &[Port] {
        self.inner.inputs()
    }

    fn outputs(&self) -> &[Port] {
        self.inner.outputs()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError> {
        let inputs = match_inputs(self.inner.inputs(), inputs, cap)?;
        let Some((group, rows)) = self.group_of(&inputs) else {
            return self.alone(inputs, cap);
        };
        let Ok(mut queue) = self.queue.lock() else {
            return self.alone(inputs, cap);
        };
        // Counted under the queue's lock, with its entry, so a leader sees both or neither.
        self.inside.fetch_add(1, Ordering::SeqCst);
        let _inside = Inside(&self.inside);
        let id = queue.next;
        queue.next += 1;
        let arrived = Instant::now();
        queue.leaders.entry(group.clone()).or_insert(id);
        queue.pending.push(Pending {
            id,
            group: group.clone(),
            rows,
            inputs,
            arrived,
        });
        self.wake.notify_all();
        loop {
            if let Some(result) = queue.results.remove(&id) {
                return result;
            }
            if queue.leaders.get(&group) != Some(&id) {
                queue = match self.wake.wait(queue) {
                    Ok(q) => q,
                    Err(_) => return Err(RunError::Fault("the batch queue is poisoned".into())),
                };
                continue;
            }
            // This run leads its group: run the batch now, or wait for more to join.
            let waiting: u64 = queue
                .pending
                .iter()
                .filter(|p| p.group == group)
                .map(|p| p.rows)
                .sum();
            let led_since = queue
                .pending
                .iter()
                .find(|p| p.id == id)
                .map_or(arrived, |p| p.arrived);
            let deadline = led_since + self.config.max_queue_delay;
            let now = Instant::now();
            // No one else can come: every caller of the model is here already.
            let alone =
                self.config.callers.as_ref().is_some_and(|c| {
                    c.load(Ordering::SeqCst) <= self.inside.load(Ordering::SeqCst)
                });
            let ready = waiting >= self.config.max_batch_size
                || self.config.preferred_sizes.iter().any(|p| waiting >= *p)
                || now >= deadline
                || alone;
            if !ready {
                queue = match self.wake.wait_timeout(queue, deadline - now) {
                    Ok((q, _)) => q,
                    Err(_) => return Err(RunError::Fault("the batch queue is poisoned".into())),
                };
                continue;
            }
            // Take the group's runs in arrival order, up to a full batch.
            let mut members = Vec::new();
            let mut taken = 0u64;
            let mut rest = Vec::with_capacity(queue.pending.len());
            for p in std::mem::take(&mut queue.pending) {
                if p.group == group && taken + p.rows <= self.config.max_batch_size {
                    taken += p.rows;
                    members.push(p);
                } else {
                    rest.push(p);
                }
            }
            queue.pending = rest;
            match queue.pending.iter().find(|p| p.group == group) {
                Some(next) => {
                    let next = next.id;
                    queue.leaders.insert(group.clone(), next);
                }
                None => {
                    queue.leaders.remove(&group);
                }
            }
            // The next leader starts its own window now, not after this batch.
            self.wake.notify_all();
            drop(queue);
            let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
            let mut results = Vec::with_capacity(members.len());
            // A backend that panics must not leave the batch's other callers waiting forever:
            // each of them gets the fault as its answer.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_batch(members, cap, &mut results);
            }));
            if ran.is_err() {
                results = ids
                    .into_iter()
                    .map(|id| (id, Err(RunError::Fault("the model panicked".into()))))
                    .collect();
            }
            queue = match self.queue.lock() {
                Ok(q) => q,
                Err(_) => return Err(RunError::Fault("the batch queue is poisoned".into())),
            };
            queue.results.extend(results);
            self.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Doubles its input, and counts the calls and their sizes.
    #[derive(Debug)]
    struct Doubler {
        ports: Vec<Port>,
        calls: Mutex<Vec<u64>>,
    }

    impl Doubler {
        fn new(first: Option<u64>) -> Arc<Self> {
            Arc::new(Self {
                ports: vec![Port {
                    name: "x".into(),
                    datatype: DataType::F32,
                    shape: vec![first, Some(2)],
                }],
                calls: Mutex::default(),
            })
        }
    }

    impl Model for Doubler {
        fn inputs(&self) -> &[Port] {
            &self.ports
        }
        fn outputs(&self) -> &[Port] {
            &self.ports
        }
        fn backend(&self) -> &'static str {
            "test"
        }
        fn run(&self, inputs: Vec<Tensor>, cap: u64) -> Result<Vec<Tensor>, RunError> {
            let x = match_inputs(&self.ports, inputs, cap)?.remove(0);
            self.calls.lock().unwrap().push(x.shape[0]);
            std::thread::sleep(Duration::from_millis(5));
            let data = x
                .data
                .chunks(4)
                .flat_map(|c| (f32::from_le_bytes(c.try_into().unwrap()) * 2.0).to_le_bytes())
                .collect();
            Ok(vec![Tensor { data, ..x }])
        }
    }

    fn rows(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            datatype: DataType::F32,
            shape: vec![values.len() as u64 / 2, 2],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }]
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.data
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn batch_config(
        max: u64,
        delay: Duration,
        preferred: Vec<u64>,
        callers: Option<Arc<AtomicUsize>>,
    ) -> BatchConfig {
        BatchConfig {
            max_batch_size: max,
            max_queue_delay: delay,
            preferred_sizes: preferred,
            callers,
        }
    }

    fn batched(inner: Arc<Doubler>, max: u64) -> (Arc<Batched>, Arc<BatchStats>) {
        let stats = Arc::new(BatchStats::default());
        let config = batch_config(max, Duration::from_millis(50), vec![], None);
        (
            Arc::new(Batched::new(inner, config, Arc::clone(&stats))),
            stats,
        )
    }

    #[test]
    fn concurrent_runs_share_one_call_and_each_gets_its_own_rows() {
        let inner = Doubler::new(None);
        let (model, stats) = batched(Arc::clone(&inner), 4);
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let model = Arc::clone(&model);
                std::thread::spawn(move || {
                    let v = i as f32;
                    let out = model.run(rows(&[v, v + 0.5]), 1 << 20).unwrap();
                    assert_eq!(out[0].shape, vec![1, 2]);
                    assert_eq!(values(&out[0]), vec![2.0 * v, 2.0 * v + 1.0]);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            *inner.calls.lock().unwrap(),
            vec![4],
            "one call of four rows"
        );
        let snap = stats.snapshot();
        assert_eq!((snap.runs, snap.rows, snap.waits), (1, 4, 4));
        assert_eq!(snap.sizes[2], (4, 1));
        assert_eq!(snap.sizes[1], (2, 0));
    }

    #[test]
    fn a_run_that_cannot_join_runs_alone_and_never_fails_for_it() {
        let inner = Doubler::new(None);
        let (model, _) = batched(Arc::clone(&inner), 4);
        // More rows than a batch holds: alone, at once.
        let big: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let out = model.run(rows(&big), 1 << 20).unwrap();
        assert_eq!(out[0].shape, vec![6, 2]);
        assert_eq!(values(&out[0])[11], 22.0);
        // A fixed first dimension: never batched.
        let fixed = Doubler::new(Some(1));
        let (model, _) = batched(Arc::clone(&fixed), 4);
        assert!(!Batched::batchable(&*fixed));
        let out = model.run(rows(&[1.0, 2.0]), 1 << 20).unwrap();
        assert_eq!(values(&out[0]), vec![2.0, 4.0]);
        // The caller's own mistakes are still its own errors.
        let wrong = vec![Tensor {
            name: "x".into(),
            datatype: DataType::F32,
            shape: vec![1, 3],
            data: vec![0; 12],
        }];
        let (model, _) = batched(Doubler::new(None), 4);
        assert!(matches!(model.run(wrong, 1 << 20), Err(RunError::Input(_))));
    }

    #[test]
    fn a_lone_run_waits_no_longer_than_the_queue_delay() {
        let (model, stats) = batched(Doubler::new(None), 8);
        let started = Instant::now();
        model.run(rows(&[1.0, 2.0]), 1 << 20).unwrap();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(50), "{took:?}");
        let snap = stats.snapshot();
        assert_eq!((snap.runs, snap.rows, snap.waits), (1, 1, 1));
        assert!(snap.queue_seconds >= 0.05);
    }

    #[test]
    fn per_item_cost_runs_each_size_and_refuses_a_fixed_batch() {
        let inner = Doubler::new(None);
        let costs = per_item_cost(&*inner, &[1, 4], Duration::from_millis(20)).unwrap();
        assert_eq!(costs.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 4]);
        // The doubler sleeps 5 ms a call: a quarter of that per item at 4.
        assert!(costs[1].1 < costs[0].1, "{costs:?}");
        assert!(inner.calls.lock().unwrap().contains(&4));
        assert!(per_item_cost(&*Doubler::new(Some(1)), &[1], Duration::ZERO).is_err());
    }

    #[test]
    fn a_batch_runs_at_once_when_every_caller_is_already_queued() {
        let callers = Arc::new(AtomicUsize::new(1));
        let config = batch_config(
            8,
            Duration::from_secs(5),
            vec![],
            Some(Arc::clone(&callers)),
        );
        let model = Batched::new(Doubler::new(None), config, Arc::default());
        let started = Instant::now();
        model.run(rows(&[1.0, 2.0]), 1 << 20).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "one caller waits for no one"
        );
        // Two callers: the first waits for the second, then both go at once.
        callers.store(2, Ordering::SeqCst);
        let inner = Doubler::new(None);
        let config = batch_config(
            8,
            Duration::from_secs(5),
            vec![],
            Some(Arc::clone(&callers)),
        );
        let model = Arc::new(Batched::new(
            Arc::clone(&inner) as Arc<dyn Model>,
            config,
            Arc::default(),
        ));
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                let model = Arc::clone(&model);
                s.spawn(move || model.run(rows(&[1.0, 2.0]), 1 << 20).unwrap());
            }
        });
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(*inner.calls.lock().unwrap(), vec![2]);
    }

    /// Panics on every call.
    #[derive(Debug)]
    struct Panics(Vec<Port>);

    impl Model for Panics {
        fn inputs(&self) -> &[Port] {
            &self.0
        }
        fn outputs(&self) -> &[Port] {
            &self.0
        }
        fn backend(&self) -> &'static str {
            "test"
        }
        fn run(&self, _: Vec<Tensor>, _: u64) -> Result<Vec<Tensor>, RunError> {
            panic!("the backend fell over");
        }
    }

    #[test]
    fn a_backend_that_panics_answers_every_caller_of_its_batch_with_a_fault() {
        let ports = Doubler::new(None).ports.clone();
        let config = batch_config(8, Duration::from_millis(50), vec![], None);
        let model = Arc::new(Batched::new(
            Arc::new(Panics(ports)),
            config,
            Arc::default(),
        ));
        std::thread::scope(|s| {
            let runs: Vec<_> = (0..3)
                .map(|_| {
                    let model = Arc::clone(&model);
                    s.spawn(move || model.run(rows(&[1.0, 2.0]), 1 << 20))
                })
                .collect();
            for r in runs {
                assert!(matches!(r.join().unwrap(), Err(RunError::Fault(_))));
            }
        });
        // And the queue still works afterwards.
        assert!(model.run(rows(&[1.0, 2.0]), 1 << 20).is_err());
    }

    #[test]
    fn a_batch_runs_at_once_on_reaching_a_preferred_size() {
        let inner = Doubler::new(None);
        let config = batch_config(8, Duration::from_secs(5), vec![2], None);
        let model = Arc::new(Batched::new(
            Arc::clone(&inner) as Arc<dyn Model>,
            config,
            Arc::default(),
        ));
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..2 {
                let model = Arc::clone(&model);
                s.spawn(move || model.run(rows(&[1.0, 2.0]), 1 << 20).unwrap());
            }
        });
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "two rows are a preferred size: no waiting out the 5 s delay"
        );
        assert_eq!(*inner.calls.lock().unwrap(), vec![2]);
    }

    #[test]
    fn outputs_split_back_by_rows_for_every_datatype() {
        let t = Tensor {
            name: "s".into(),
            datatype: DataType::Bytes,
            shape: vec![3],
            data: [&b"a"[..], b"bc", b""]
                .iter()
                .flat_map(|s| {
                    let mut e = (s.len() as u32).to_le_bytes().to_vec();
                    e.extend_from_slice(s);
                    e
                })
                .collect(),
        };
        let parts = split_rows(&t, [2, 1].into_iter()).unwrap();
        assert_eq!(parts[0].data.len(), 4 + 1 + 4 + 2);
        assert_eq!(parts[1].data, 0u32.to_le_bytes());
        assert!(
            split_rows(&t, [1, 1].into_iter()).is_none(),
            "rows must add up"
        );
    }
}
