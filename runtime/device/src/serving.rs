//! Serving beyond one stateless call per request, as a bundle's `[serving]` asks: the
//! response cache ([`ResponseCache`]) and streaming sessions ([`Sessions`]), with their
//! metrics. Dynamic batching lives below the engine, in `outpost_inference::batch`; its
//! counters are rendered here too.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_bundle::manifest::SessionSpec;
use outpost_engine::{CallOutput, Payload, Session};
use outpost_inference::BatchStats;
use sha2::{Digest, Sha256};

use crate::error::InferError;
use crate::metrics::escape;

/// The header naming a streaming session.
pub(crate) const SESSION_KEY: &str = "outpost-session";
/// The response header saying whether the answer came from the cache (`hit`, `miss`).
pub(crate) const CACHE_STATUS: &str = "outpost-cache";

/// Longest session key, in bytes.
pub const MAX_SESSION_KEY_BYTES: usize = 128;

/// What one cached answer costs beyond its tensors: the key, the map and the order entries.
const ENTRY_OVERHEAD: u64 = 128;

/// A cache key: sha256 over the bundle digest and the whole request as the guest sees it.
pub(crate) type Key = [u8; 32];

/// A cached answer: the guest's payload and the drift observations it made, replayed on a hit
/// so the input distribution a device reports does not depend on its cache.
#[derive(Debug, Clone)]
pub(crate) struct Cached {
    pub(crate) payload: Payload,
    pub(crate) observations: Vec<(String, f64)>,
}

/// Hits, misses and evictions of one model version's cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
}

impl CacheStats {
    /// Hits, misses, evictions, bytes held and entries held.
    pub fn counts(&self) -> (u64, u64, u64, u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (
            get(&self.hits),
            get(&self.misses),
            get(&self.evictions),
            get(&self.bytes),
            get(&self.entries),
        )
    }
}

#[derive(Debug, Default)]
struct Lru {
    map: HashMap<Key, (Arc<Cached>, u64, u64)>,
    /// Entries by last use: tick to key.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: u64,
}

/// One model version's response cache: an LRU bounded in bytes, keyed by the bundle digest
/// and the exact request. Never shared across versions (each loaded version owns one).
#[derive(Debug)]
pub(crate) struct ResponseCache {
    digest: String,
    max_bytes: u64,
    lru: Mutex<Lru>,
    stats: Arc<CacheStats>,
}

impl ResponseCache {
    pub(crate) fn new(digest: &str, max_bytes: u64, stats: Arc<CacheStats>) -> Self {
        Self {
            digest: digest.to_owned(),
            max_bytes,
            lru: Mutex::new(Lru::default()),
            stats,
        }
    }

    /// The key of `payload` for this version: every name, datatype, shape, content type and
    /// byte the guest would see, length-prefixed so no two requests share an encoding.
    pub(crate) fn key(&self, payload: &Payload) -> Key {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(b"outpost-cache/1");
        field(self.digest.as_bytes());
        match payload {
            Payload::Tensors(ts) => {
                field(b"tensors");
                for t in ts {
                    field(t.name.as_bytes());
                    field(t.datatype.oip_name().as_bytes());
                    let dims: Vec<u8> = t.shape.iter().flat_map(|d| d.to_le_bytes()).collect();
                    field(&dims);
                    field(&t.data);
                }
            }
            Payload::Raw { content_type, body } => {
                field(b"raw");
                field(content_type.as_bytes());
                field(body);
            }
        }
        h.finalize().into()
    }

    /// The answer cached under `key`, counted as a hit or a miss.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        let Ok(mut lru) = self.lru.lock() else {
            return None;
        };
        let lru = &mut *lru;
        lru.tick += 1;
        let tick = lru.tick;
        let Some((cached, _, last)) = lru.map.get_mut(key) else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        lru.order.remove(last);
        *last = tick;
        lru.order.insert(tick, *key);
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(Arc::clone(cached))
    }

    /// Keeps a successful answer, evicting the least recently used beyond the bound. An answer
    /// larger than the whole bound is not kept.
    pub(crate) fn put(&self, key: Key, out: &CallOutput) {
        let size = ENTRY_OVERHEAD + payload_bytes(&out.payload) + observation_bytes(out);
        if size > self.max_bytes {
            return;
        }
        let Ok(mut lru) = self.lru.lock() else {
            return;
        };
        let lru = &mut *lru;
        lru.tick += 1;
        let tick = lru.tick;
        let cached = Arc::new(Cached {
            payload: out.payload.clone(),
            observations: out.observations.clone(),
        });
        if let Some((_, old_size, old_tick)) = lru.map.insert(key, (cached, size, tick)) {
            lru.order.remove(&old_tick);
            lru.bytes -= old_size;
        }
        lru.order.insert(tick, key);
        lru.bytes += size;
        while lru.bytes > self.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else {
                break;
            };
            if let Some((_, old_size, _)) = lru.map.remove(&oldest) {
                lru.bytes -= old_size;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.stats.bytes.store(lru.bytes, Ordering::Relaxed);
        self.stats
            .entries
            .store(lru.map.len() as u64, Ordering::Relaxed);
    }
}

fn payload_bytes(p: &Payload) -> u64 {
    match p {
        Payload::Tensors(ts) => ts
            .iter()
            .map(|t| (t.data.len() + t.name.len() + 8 * t.shape.len()) as u64)
            .sum(),
        Payload::Raw { content_type, body } => (content_type.len() + body.len()) as u64,
    }
}

fn observation_bytes(out: &CallOutput) -> u64 {
    out.observations
        .iter()
        .map(|(name, _)| name.len() as u64 + 8)
        .sum()
}

/// A session's guest instance, as its calls find it.
#[derive(Debug, Default)]
pub(crate) enum SlotState {
    /// Not started: the first call instantiates the guest.
    #[default]
    Fresh,
    /// The instance, with the state its calls left in it.
    Live(Session),
    /// A call failed and took the state with it.
    Ended(String),
}

/// A session's guest instance behind the lock its calls take one at a time.
pub(crate) type SessionSlot = Arc<tokio::sync::Mutex<SlotState>>;

/// Longest reason kept for an ended session.
const MAX_REASON_CHARS: usize = 300;

#[derive(Debug)]
enum Entry {
    Live {
        version: String,
        slot: SessionSlot,
        last_used: Instant,
        idle: Duration,
    },
    /// Ended by a version swap or a failed call: the next request with the key is told so,
    /// once.
    Ended {
        reason: String,
        at: Instant,
        idle: Duration,
    },
}

impl Entry {
    fn ended(reason: String, idle: Duration) -> Self {
        Entry::Ended {
            reason: reason.chars().take(MAX_REASON_CHARS).collect(),
            at: Instant::now(),
            idle,
        }
    }
}

/// Started and ended sessions of one model, and how many are live.
#[derive(Debug, Default)]
pub struct SessionStats {
    started: AtomicU64,
    refused: AtomicU64,
    live: AtomicU64,
    ended: Mutex<BTreeMap<&'static str, u64>>,
    memory: Mutex<HashMap<String, u64>>,
}

impl SessionStats {
    fn end(&self, why: &'static str) {
        if let Ok(mut ended) = self.ended.lock() {
            *ended.entry(why).or_default() += 1;
        }
    }

    /// Sessions started, refused (at the cap or the memory bound), and live now.
    pub fn counts(&self) -> (u64, u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (get(&self.started), get(&self.refused), get(&self.live))
    }

    /// Sessions ended, by why: `idle`, `swap`, `failed`.
    pub fn ended(&self) -> BTreeMap<&'static str, u64> {
        self.ended.lock().map(|e| e.clone()).unwrap_or_default()
    }

    fn memory(&self) -> u64 {
        self.memory.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    fn set_memory(&self, key: &str, bytes: Option<u64>) {
        if let Ok(mut m) = self.memory.lock() {
            match bytes {
                Some(b) => m.insert(key.to_owned(), b),
                None => m.remove(key),
            };
        }
    }
}

fn live_count(sessions: &HashMap<String, Entry>) -> u64 {
    sessions
        .values()
        .filter(|e| matches!(e, Entry::Live { .. }))
        .count() as u64
}

/// Every model's streaming sessions, by model and session key.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    models: Mutex<HashMap<String, HashMap<String, Entry>>>,
    stats: Arc<ServingMetrics>,
    /// Guest memory all sessions of the device may hold; a new session beyond is refused.
    memory_cap: u64,
}

impl Sessions {
    pub(crate) fn new(stats: Arc<ServingMetrics>, memory_cap: u64) -> Self {
        Self {
            models: Mutex::default(),
            stats,
            memory_cap,
        }
    }

    /// Ends the sessions idle past their timeout, and forgets the ended ones told long enough,
    /// in every model (on every request that names a session, and periodically).
    pub(crate) fn expire(&self) {
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        self.expire_locked(&mut models);
    }

    fn expire_locked(&self, models: &mut HashMap<String, HashMap<String, Entry>>) {
        let now = Instant::now();
        for (model, sessions) in models.iter_mut() {
            let stats = self.stats.sessions(model);
            sessions.retain(|k, e| match e {
                Entry::Live {
                    last_used, idle, ..
                } if now.duration_since(*last_used) > *idle => {
                    stats.end("idle");
                    stats.set_memory(k, None);
                    false
                }
                Entry::Ended { at, idle, .. } => now.duration_since(*at) <= *idle,
                Entry::Live { .. } => true,
            });
            stats.live.store(live_count(sessions), Ordering::Relaxed);
        }
        models.retain(|_, sessions| !sessions.is_empty());
    }

    /// The session `key` of `model` on `version`: the live one, or a new one under the caps.
    /// A key whose session ended (a swap, a failed call) is refused once with the reason, and
    /// starts a new session on the request after. A request `pinned` to a version other than
    /// its session's is refused and leaves the session as it is.
    pub(crate) fn open(
        &self,
        model: &str,
        version: &str,
        key: &str,
        spec: SessionSpec,
        pinned: bool,
    ) -> Result<SessionSlot, InferError> {
        let stats = self.stats.sessions(model);
        let mut models = self
            .models
            .lock()
            .map_err(|_| InferError::Internal("the session table is poisoned".into()))?;
        self.expire_locked(&mut models);
        let memory: u64 = models.keys().map(|m| self.stats.sessions(m).memory()).sum();
        let sessions = models.entry(model.to_owned()).or_default();
        let now = Instant::now();
        let idle = Duration::from_secs(spec.idle_timeout_s);
        let live_now = live_count(sessions);
        let answer = match sessions.get_mut(key) {
            Some(Entry::Live {
                version: v,
                slot,
                last_used,
                ..
            }) if v == version => {
                *last_used = now;
                Ok(Arc::clone(slot))
            }
            Some(Entry::Live { version: v, .. }) if pinned => {
                Err(InferError::SessionEnded(format!(
                    "session `{key}` runs on version {v} of `{model}`, not {version}: send its \
                     requests to that version, or unversioned"
                )))
            }
            Some(Entry::Live { version: v, .. }) => {
                let reason = format!(
                    "session `{key}` ran on version {v} of `{model}`, which no longer serves it \
                     (version {version} does); its state is gone. Send the request again to \
                     start a new session"
                );
                sessions.remove(key);
                stats.end("swap");
                stats.set_memory(key, None);
                Err(InferError::SessionEnded(reason))
            }
            Some(Entry::Ended { reason, .. }) => {
                let reason = format!(
                    "session `{key}` of `{model}` ended: {reason}; its state is gone. Send the \
                     request again to start a new session"
                );
                sessions.remove(key);
                Err(InferError::SessionEnded(reason))
            }
            None if live_now >= u64::from(spec.max_sessions) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(InferError::TooManySessions {
                    model: model.to_owned(),
                    max: spec.max_sessions,
                    idle_timeout_s: spec.idle_timeout_s,
                })
            }
            None if memory >= self.memory_cap => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(InferError::SessionMemory {
                    bytes: memory,
                    cap: self.memory_cap,
                })
            }
            None => {
                let slot = SessionSlot::default();
                sessions.insert(
                    key.to_owned(),
                    Entry::Live {
                        version: version.to_owned(),
                        slot: Arc::clone(&slot),
                        last_used: now,
                        idle,
                    },
                );
                stats.started.fetch_add(1, Ordering::Relaxed);
                Ok(slot)
            }
        };
        stats.live.store(live_count(sessions), Ordering::Relaxed);
        answer
    }

    /// After a call on session `key` (its `slot`): records the instance's memory, or ends the
    /// session when the call ended it. Nothing happens when the key now names another session
    /// (this one ended meanwhile).
    pub(crate) fn after_call(
        &self,
        model: &str,
        key: &str,
        slot: &SessionSlot,
        memory: u64,
        ended: Option<String>,
    ) {
        let stats = self.stats.sessions(model);
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        let Some(sessions) = models.get_mut(model) else {
            return;
        };
        let idle = match sessions.get(key) {
            Some(Entry::Live { slot: s, idle, .. }) if Arc::ptr_eq(s, slot) => *idle,
            _ => return,
        };
        match ended {
            None => stats.set_memory(key, Some(memory)),
            Some(reason) => {
                sessions.insert(key.to_owned(), Entry::ended(reason, idle));
                stats.end("failed");
                stats.set_memory(key, None);
                cap_tombstones(sessions);
            }
        }
        stats.live.store(live_count(sessions), Ordering::Relaxed);
    }

    /// Ends every session of `model` not on a version of `keep` (the versions that still
    /// answer: the active one and those its traffic policy names), freeing their instances;
    /// each key is told why on its next request.
    pub(crate) fn swapped(&self, model: &str, keep: &[&str]) {
        let stats = self.stats.sessions(model);
        let Ok(mut models) = self.models.lock() else {
            return;
        };
        let Some(sessions) = models.get_mut(model) else {
            return;
        };
        let active = keep.first().copied().unwrap_or("none");
        for (key, entry) in sessions.iter_mut() {
            if let Entry::Live {
                version: v, idle, ..
            } = entry
                && !keep.contains(&v.as_str())
            {
                *entry = Entry::ended(format!("version {v} was replaced by {active}"), *idle);
                stats.end("swap");
                stats.set_memory(key, None);
            }
        }
        cap_tombstones(sessions);
        stats.live.store(live_count(sessions), Ordering::Relaxed);
    }
}

/// At most as many ended sessions as live ones may be (and 64 more), the oldest forgotten
/// first: a client cycling through keys cannot grow the table.
fn cap_tombstones(sessions: &mut HashMap<String, Entry>) {
    let limit = live_count(sessions) as usize + 64;
    let mut ended: Vec<(Instant, String)> = sessions
        .iter()
        .filter_map(|(k, e)| match e {
            Entry::Ended { at, .. } => Some((*at, k.clone())),
            Entry::Live { .. } => None,
        })
        .collect();
    if ended.len() > limit {
        let excess = ended.len() - limit;
        ended.sort();
        for (_, k) in ended.into_iter().take(excess) {
            sessions.remove(&k);
        }
    }
}

/// A metric family drawn from one value of each series: name, type, help, the value.
type Family<T> = (&'static str, &'static str, &'static str, fn(&T) -> u64);

/// The counters of every cache, session table and batcher, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServingMetrics {
    caches: Mutex<BTreeMap<(String, String), Arc<CacheStats>>>,
    sessions: Mutex<BTreeMap<String, Arc<SessionStats>>>,
    batches: Mutex<BTreeMap<(String, String, String), Arc<BatchStats>>>,
}

impl ServingMetrics {
    /// The cache counters of one model version (made on first use).
    pub fn cache(&self, model: &str, version: &str) -> Arc<CacheStats> {
        match self.caches.lock() {
            Ok(mut all) => Arc::clone(
                all.entry((model.to_owned(), version.to_owned()))
                    .or_default(),
            ),
            Err(_) => Arc::default(),
        }
    }

    /// The session counters of one model (made on first use).
    pub fn sessions(&self, model: &str) -> Arc<SessionStats> {
        match self.sessions.lock() {
            Ok(mut all) => Arc::clone(all.entry(model.to_owned()).or_default()),
            Err(_) => Arc::default(),
        }
    }

    /// The batcher counters of one ONNX model of a model version (made on first use).
    pub fn batches(&self, model: &str, version: &str, onnx: &str) -> Arc<BatchStats> {
        match self.batches.lock() {
            Ok(mut all) => Arc::clone(
                all.entry((model.to_owned(), version.to_owned(), onnx.to_owned()))
                    .or_default(),
            ),
            Err(_) => Arc::default(),
        }
    }

    /// Appends the Prometheus text of every cache, session table and batcher.
    pub(crate) fn render(&self, out: &mut String) {
        let caches = self.caches.lock().map(|c| c.clone()).unwrap_or_default();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
        };
        let mv = |m: &str, v: &str| format!("model=\"{}\",version=\"{}\"", escape(m), escape(v));
        family(
            out,
            "outpost_cache_requests_total",
            "counter",
            "Requests looked up in a model version's response cache, by result.",
        );
        for ((m, v), s) in &caches {
            let (hits, misses, ..) = s.counts();
            let l = mv(m, v);
            let _ = writeln!(
                out,
                "outpost_cache_requests_total{{{l},result=\"hit\"}} {hits}"
            );
            let _ = writeln!(
                out,
                "outpost_cache_requests_total{{{l},result=\"miss\"}} {misses}"
            );
        }
        family(
            out,
            "outpost_cache_evictions_total",
            "counter",
            "Answers evicted from a response cache to stay within its byte bound.",
        );
        for ((m, v), s) in &caches {
            let _ = writeln!(
                out,
                "outpost_cache_evictions_total{{{}}} {}",
                mv(m, v),
                s.counts().2
            );
        }
        family(
            out,
            "outpost_cache_bytes",
            "gauge",
            "Bytes a response cache holds.",
        );
        for ((m, v), s) in &caches {
            let _ = writeln!(out, "outpost_cache_bytes{{{}}} {}", mv(m, v), s.counts().3);
        }
        let sessions = self.sessions.lock().map(|c| c.clone()).unwrap_or_default();
        let per_model: [Family<SessionStats>; 4] = [
            (
                "outpost_sessions_live",
                "gauge",
                "Streaming sessions holding a guest instance.",
                |s| s.counts().2,
            ),
            (
                "outpost_session_memory_bytes",
                "gauge",
                "Guest memory the live streaming sessions of a model hold.",
                SessionStats::memory,
            ),
            (
                "outpost_sessions_started_total",
                "counter",
                "Streaming sessions started.",
                |s| s.counts().0,
            ),
            (
                "outpost_sessions_refused_total",
                "counter",
                "New streaming sessions refused at the cap on live sessions.",
                |s| s.counts().1,
            ),
        ];
        for (name, kind, help, value) in per_model {
            family(out, name, kind, help);
            for (m, s) in &sessions {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", escape(m), value(s));
            }
        }
        family(
            out,
            "outpost_sessions_ended_total",
            "counter",
            "Streaming sessions ended, by why (idle, swap, failed).",
        );
        for (m, s) in &sessions {
            for (why, n) in s.ended() {
                let _ = writeln!(
                    out,
                    "outpost_sessions_ended_total{{model=\"{}\",reason=\"{why}\"}} {n}",
                    escape(m)
                );
            }
        }
        let batches = self.batches.lock().map(|c| c.clone()).unwrap_or_default();
        family(
            out,
            "outpost_batch_size",
            "histogram",
            "Items per backend call of a batching ONNX model.",
        );
        for ((m, v, o), s) in &batches {
            let l = format!("{},onnx=\"{}\"", mv(m, v), escape(o));
            let snap = s.snapshot();
            for (bound, n) in &snap.sizes {
                let _ = writeln!(out, "outpost_batch_size_bucket{{{l},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "outpost_batch_size_bucket{{{l},le=\"+Inf\"}} {}",
                snap.runs
            );
            let _ = writeln!(out, "outpost_batch_size_sum{{{l}}} {}", snap.rows);
            let _ = writeln!(out, "outpost_batch_size_count{{{l}}} {}", snap.runs);
        }
        family(
            out,
            "outpost_batch_queue_seconds",
            "histogram",
            "Time a call of a batching ONNX model waited for its batch to run.",
        );
        for ((m, v, o), s) in &batches {
            let l = format!("{},onnx=\"{}\"", mv(m, v), escape(o));
            let snap = s.snapshot();
            for (bound, n) in &snap.queue {
                let _ = writeln!(
                    out,
                    "outpost_batch_queue_seconds_bucket{{{l},le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "outpost_batch_queue_seconds_bucket{{{l},le=\"+Inf\"}} {}",
                snap.waits
            );
            let _ = writeln!(
                out,
                "outpost_batch_queue_seconds_sum{{{l}}} {}",
                snap.queue_seconds
            );
            let _ = writeln!(
                out,
                "outpost_batch_queue_seconds_count{{{l}}} {}",
                snap.waits
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_bundle::manifest::DataType;
    use outpost_inference::Tensor;

    fn tensor(data: Vec<u8>) -> Payload {
        Payload::Tensors(vec![Tensor {
            name: "x".into(),
            datatype: DataType::U8,
            shape: vec![data.len() as u64],
            data,
        }])
    }

    fn answer(bytes: usize) -> CallOutput {
        CallOutput {
            payload: tensor(vec![7; bytes]),
            observations: vec![("f".into(), 1.0)],
        }
    }

    #[test]
    fn keys_differ_by_version_and_by_every_part_of_the_request() {
        let a = ResponseCache::new("aa", 1 << 20, Arc::default());
        let b = ResponseCache::new("bb", 1 << 20, Arc::default());
        let p = tensor(vec![1, 2, 3]);
        assert_eq!(a.key(&p), a.key(&p.clone()));
        assert_ne!(a.key(&p), b.key(&p), "never shared across versions");
        assert_ne!(a.key(&p), a.key(&tensor(vec![1, 2, 4])));
        let mut reshaped = p.clone();
        if let Payload::Tensors(ts) = &mut reshaped {
            ts[0].shape = vec![3, 1];
        }
        assert_ne!(a.key(&p), a.key(&reshaped));
        let mut retyped = p.clone();
        if let Payload::Tensors(ts) = &mut retyped {
            ts[0].datatype = DataType::I8;
        }
        assert_ne!(a.key(&p), a.key(&retyped));
        let raw = |ct: &str| Payload::Raw {
            content_type: ct.into(),
            body: vec![1, 2, 3],
        };
        assert_ne!(a.key(&raw("a/b")), a.key(&raw("a/c")));
    }

    #[test]
    fn the_cache_evicts_the_least_recently_used_beyond_its_bound_and_counts_it() {
        let stats = Arc::new(CacheStats::default());
        // Room for two answers of 1,000 bytes, not three.
        let cache = ResponseCache::new("d", 2 * (1_000 + 200), Arc::clone(&stats));
        let keys: Vec<Key> = (0..3u8).map(|i| cache.key(&tensor(vec![i]))).collect();
        cache.put(keys[0], &answer(1_000));
        cache.put(keys[1], &answer(1_000));
        assert!(cache.get(&keys[0]).is_some(), "0 is now the most recent");
        cache.put(keys[2], &answer(1_000));
        assert!(
            cache.get(&keys[1]).is_none(),
            "1 was the least recently used"
        );
        assert!(cache.get(&keys[0]).is_some());
        assert!(cache.get(&keys[2]).is_some());
        let (hits, misses, evictions, bytes, entries) = stats.counts();
        assert_eq!((hits, misses, evictions, entries), (3, 1, 1, 2));
        assert!(bytes <= 2 * 1_200, "{bytes} bytes held");
        // An answer larger than the whole bound is not kept, and evicts nothing.
        let big = cache.key(&tensor(vec![9]));
        cache.put(big, &answer(10_000));
        assert!(cache.get(&big).is_none());
        assert_eq!(stats.counts().2, 1);
    }

    #[test]
    fn sessions_are_capped_end_on_a_swap_and_say_so_once() {
        let metrics = Arc::new(ServingMetrics::default());
        let sessions = Sessions::new(Arc::clone(&metrics), u64::MAX);
        let spec = SessionSpec {
            max_sessions: 2,
            idle_timeout_s: 60,
        };
        let a = sessions.open("m", "1.0.0", "a", spec, false).unwrap();
        let again = sessions.open("m", "1.0.0", "a", spec, false).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "the same key finds its session");
        sessions.open("m", "1.0.0", "b", spec, false).unwrap();
        let full = sessions.open("m", "1.0.0", "c", spec, false).unwrap_err();
        assert_eq!(full.status(), 429, "{full}");
        assert!(full.to_string().contains("2 live sessions"), "{full}");
        sessions.swapped("m", &["2.0.0"]);
        let ended = sessions.open("m", "2.0.0", "a", spec, false).unwrap_err();
        assert_eq!(ended.status(), 409);
        assert!(ended.to_string().contains("replaced by 2.0.0"), "{ended}");
        let fresh = sessions.open("m", "2.0.0", "a", spec, false).unwrap();
        assert!(
            !Arc::ptr_eq(&a, &fresh),
            "the next request starts a new session"
        );
        let s = metrics.sessions("m");
        assert_eq!(s.counts(), (3, 1, 1));
        assert_eq!(s.ended().get("swap"), Some(&2));
    }

    #[test]
    fn a_request_pinned_to_another_version_leaves_the_session_alone() {
        let sessions = Sessions::new(Arc::default(), u64::MAX);
        let spec = SessionSpec {
            max_sessions: 4,
            idle_timeout_s: 60,
        };
        let a = sessions.open("m", "1", "a", spec, false).unwrap();
        let pinned = sessions.open("m", "2", "a", spec, true).unwrap_err();
        assert_eq!(pinned.status(), 409);
        assert!(pinned.to_string().contains("runs on version 1"), "{pinned}");
        let again = sessions.open("m", "1", "a", spec, false).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
    }

    #[test]
    fn ended_sessions_are_bounded_and_a_stale_call_changes_nothing() {
        let stats = Arc::new(ServingMetrics::default());
        let sessions = Sessions::new(Arc::clone(&stats), u64::MAX);
        let spec = SessionSpec {
            max_sessions: 1_000,
            idle_timeout_s: 600,
        };
        for i in 0..500 {
            let key = format!("k{i}");
            let slot = sessions.open("m", "1", &key, spec, false).unwrap();
            sessions.after_call("m", &key, &slot, 10, Some("trapped".into()));
        }
        let held = sessions.models.lock().unwrap()["m"].len();
        assert!(held <= 64, "{held} entries for 500 ended sessions");
        // A call that finishes after its session was replaced records nothing.
        let old = sessions.open("m", "1", "x", spec, false).unwrap();
        sessions.swapped("m", &["2"]);
        let _ = sessions.open("m", "2", "x", spec, false);
        let new = sessions.open("m", "2", "x", spec, false).unwrap();
        sessions.after_call("m", "x", &old, 1 << 30, Some("late".into()));
        sessions.after_call("m", "x", &new, 77, None);
        assert_eq!(stats.sessions("m").memory(), 77);
    }

    #[test]
    fn an_idle_session_ends_and_frees_its_place() {
        let sessions = Sessions::new(Arc::default(), u64::MAX);
        let spec = SessionSpec {
            max_sessions: 1,
            idle_timeout_s: 1,
        };
        sessions.open("m", "1", "a", spec, false).unwrap();
        assert!(sessions.open("m", "1", "b", spec, false).is_err());
        std::thread::sleep(Duration::from_millis(1_100));
        sessions
            .open("m", "1", "b", spec, false)
            .expect("the idle session made room");
    }
}
