//! What the gate keeps beside its connections: the waiting room (connections with no CONNECT
//! yet, the oldest closed at the cap to make room) and one publishing rate bucket per device.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// A sustained rate and a burst, in bytes: what one device may publish. Past it the gate stops
/// reading from the device (TCP holds it back), so one client's flood cannot fill the broker's
/// in-memory log and push other clients' messages out of it before the fleet reads them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rate {
    /// Bytes per second, sustained.
    pub per_second: u64,
    /// Bytes at once, after a quiet spell.
    pub burst: u64,
}

/// One token bucket per device identity (kept across its reconnections, so reconnecting does
/// not buy a fresh burst).
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    by_device: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    /// Takes `bytes` from `device`'s bucket; how long to wait before passing them on.
    pub(crate) fn take(&self, device: &str, bytes: usize, rate: Rate) -> Duration {
        let Ok(mut buckets) = self.by_device.lock() else {
            return Duration::ZERO;
        };
        let now = Instant::now();
        let burst = rate.burst as f64;
        let per_second = rate.per_second.max(1) as f64;
        let (tokens, at) = buckets.entry(device.to_owned()).or_insert((burst, now));
        let refilled = (*tokens + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *tokens = refilled - bytes as f64;
        *at = now;
        if *tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-*tokens / per_second)
        }
    }
}

/// Connections not yet admitted (their CONNECT has not passed), oldest first.
#[derive(Debug, Default)]
pub(crate) struct Waiting {
    next: AtomicU64,
    by_age: Mutex<BTreeMap<u64, Arc<Notify>>>,
}

/// A connection's place in the waiting room, left when it is admitted or closed.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    room: Arc<Waiting>,
    /// Told when the connection is to close to make room.
    pub(crate) evicted: Arc<Notify>,
}

impl Waiting {
    /// A place for a new connection.
    pub(crate) fn ticket(self: &Arc<Self>) -> Ticket {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evicted = Arc::new(Notify::new());
        if let Ok(mut by_age) = self.by_age.lock() {
            by_age.insert(id, Arc::clone(&evicted));
        }
        Ticket {
            id,
            room: Arc::clone(self),
            evicted,
        }
    }

    /// Tells the connection that has waited longest to close; `false` when none waits.
    pub(crate) fn evict_oldest(&self) -> bool {
        let Ok(mut by_age) = self.by_age.lock() else {
            return false;
        };
        match by_age.pop_first() {
            Some((_, evicted)) => {
                evicted.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Ticket {
    /// The connection's CONNECT passed: it is no longer evicted to make room.
    pub(crate) fn admitted(&self) {
        if let Ok(mut by_age) = self.room.by_age.lock() {
            by_age.remove(&self.id);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admitted();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_waiting_connection_is_evicted_and_admitted_ones_never() {
        let room = Arc::new(Waiting::default());
        let first = room.ticket();
        let second = room.ticket();
        first.admitted();
        assert!(room.evict_oldest());
        // The second was told; the first, admitted, was not.
        let told = second.evicted.notified();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), told).await })
            .unwrap();
        assert!(!room.evict_oldest());
        drop(second);
        let third = room.ticket();
        drop(third);
        assert!(!room.evict_oldest(), "a closed connection leaves the room");
    }
}
