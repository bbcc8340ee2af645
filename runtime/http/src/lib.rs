//! The front door of Outpost's HTTP servers (the device's inference and admin endpoints, the
//! fleet's API).
//!
//! [`serve`] runs an axum [`Router`] over HTTP/1.1 with what `axum::serve` leaves out, so that
//! clients who open connections and never finish with them cannot make a server unreachable:
//!
//! - a **header timeout**: a request's head must arrive within [`Limits::header_timeout`];
//! - a **body timeout**: a request's body may not stall (no bytes arriving) for longer than
//!   [`Limits::body_timeout`] (the handler reading it gets an error, answered as it answers a
//!   broken body); a large upload on a slow link goes through as long as it keeps moving;
//! - an **idle timeout**: a connection with no request under way is closed after
//!   [`Limits::idle_timeout`];
//! - a **cap on open connections** ([`Limits::max_connections`], below the process's file
//!   descriptor limit): at the cap a new connection is let in by closing the connection that has
//!   been idle longest (no request under way), or else the one that has waited longest for a
//!   request body; only when every connection is running a request is the new one answered 503
//!   and closed. A slow client thus holds a connection only until somebody else needs it, and a
//!   health check always finds room.
//!
//! The counters in [`Stats`] say what the door did.

mod conn;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use tokio::io::AsyncWriteExt;

use crate::conn::Registry;

/// How a server bounds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; at the cap an idle one is closed to make room.
    pub max_connections: usize,
    /// Time a client has to send a request's head (request line and headers).
    pub header_timeout: Duration,
    /// Longest time a request's body may go without a byte arriving (from the end of its head,
    /// then from each piece of it).
    pub body_timeout: Duration,
    /// Time a connection may stay open with no request under way.
    pub idle_timeout: Duration,
}

impl Limits {
    /// File descriptors a process keeps for everything but its HTTP connections (stores,
    /// logs, MQTT, downloads, the admin listener's own connections).
    pub const FD_RESERVE: u64 = 256;

    /// Defaults for a server given `share` of the file descriptors this process may open,
    /// after [`Limits::FD_RESERVE`] (at least 32 connections, at most 16,384).
    pub fn for_share_of_fds(share: f64) -> Self {
        let fds = fd_limit().unwrap_or(1024);
        let usable = fds.saturating_sub(Self::FD_RESERVE) as f64 * share.clamp(0.0, 1.0);
        Self {
            max_connections: (usable as usize).clamp(32, 16_384),
            ..Self::default()
        }
    }
}

impl Default for Limits {
    /// 1,024 connections, 10 s for a head, 30 s for a body, 60 s idle.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The soft limit on open file descriptors of this process (`RLIMIT_NOFILE`), read from
/// `/proc/self/limits`; `None` where that cannot be read or there is no limit.
pub fn fd_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What a front door did, as counters (read them with [`Stats::snapshot`]).
#[derive(Debug, Default)]
pub struct Stats {
    open: AtomicU64,
    accepted: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
    body_timeouts: AtomicU64,
}

/// A copy of a [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Connections open now.
    pub open: u64,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Connections closed to make room for a new one at the cap.
    pub evicted: u64,
    /// Connections answered 503 and closed because every open one was running a request.
    pub refused: u64,
    /// Connections closed for being idle past the idle timeout.
    pub idle_closed: u64,
    /// Request bodies that did not arrive within the body timeout.
    pub body_timeouts: u64,
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            open: get(&self.open),
            accepted: get(&self.accepted),
            evicted: get(&self.evicted),
            refused: get(&self.refused),
            idle_closed: get(&self.idle_closed),
            body_timeouts: get(&self.body_timeouts),
        }
    }
}

/// The counters of each listener's [`Stats`] in the Prometheus text format, each family named
/// `{prefix}_…` and labelled `listener="…"`.
pub fn render(prefix: &str, listeners: &[(&str, &Stats)]) -> String {
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&Snapshot) -> u64,
    );
    let families: [Family; 6] = [
        ("connections_open", "gauge", "HTTP connections open.", |s| {
            s.open
        }),
        (
            "connections_accepted_total",
            "counter",
            "HTTP connections accepted.",
            |s| s.accepted,
        ),
        (
            "connections_evicted_total",
            "counter",
            "Idle or stalled HTTP connections closed to make room at the connection cap.",
            |s| s.evicted,
        ),
        (
            "connections_refused_total",
            "counter",
            "HTTP connections answered 503 because every open one was running a request.",
            |s| s.refused,
        ),
        (
            "connections_idle_closed_total",
            "counter",
            "HTTP connections closed after the idle timeout.",
            |s| s.idle_closed,
        ),
        (
            "body_timeouts_total",
            "counter",
            "Request bodies that stalled for longer than the body timeout.",
            |s| s.body_timeouts,
        ),
    ];
    let snapshots: Vec<(&str, Snapshot)> = listeners
        .iter()
        .map(|(name, stats)| (*name, stats.snapshot()))
        .collect();
    let mut out = String::new();
    for (name, kind, help, value) in families {
        out.push_str(&format!(
            "# HELP {prefix}_{name} {help}\n# TYPE {prefix}_{name} {kind}\n"
        ));
        for (listener, snapshot) in &snapshots {
            out.push_str(&format!(
                "{prefix}_{name}{{listener=\"{listener}\"}} {}\n",
                value(snapshot)
            ));
        }
    }
    out
}

/// The answer to a connection that finds every slot running a request.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\
content-type: application/json\r\ncontent-length: 48\r\nconnection: close\r\n\r\n\
{\"error\":\"too many connections; try again soon\"}";

/// Serves `router` on `listener` within `limits` until `shutdown` completes; then stops
/// accepting, closes idle connections, and returns once the requests under way have finished
/// (each still bounded by the timeouts).
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener,
{
    let registry = Registry::new(limits, Arc::clone(&stats));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (alive_tx, mut alive_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let (mut io, _peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = registry.admit() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            // Best effort and bounded: a client that does not read its answer loses it.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), io.write_all(FULL)).await;
            });
            continue;
        };
        let (router, stop, alive) = (router.clone(), stop_rx.clone(), alive_tx.clone());
        tokio::spawn(async move {
            conn::run(io, router, slot, stop).await;
            drop(alive);
        });
    }
    let _ = stop_tx.send(true);
    drop(alive_tx);
    // Every connection task holds a sender: this returns when the last one has ended.
    let _ = alive_rx.recv().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_fd_limit_is_read_from_proc() {
        let limit = fd_limit().unwrap();
        assert!(limit >= 64, "{limit}");
    }

    #[test]
    fn a_share_of_the_fds_leaves_the_reserve_and_has_a_floor() {
        let fds = fd_limit().unwrap();
        let half = Limits::for_share_of_fds(0.5).max_connections as u64;
        assert!(half <= fds.saturating_sub(Limits::FD_RESERVE) / 2 + 1 || half == 32);
        assert!(Limits::for_share_of_fds(0.0).max_connections >= 32);
    }

    #[test]
    fn stats_render_as_prometheus_text() {
        let stats = Stats::default();
        stats.evicted.fetch_add(3, Ordering::Relaxed);
        let text = render(
            "outpost_http",
            &[("public", &stats), ("admin", &Stats::default())],
        );
        assert!(text.contains("outpost_http_connections_evicted_total{listener=\"public\"} 3\n"));
        assert!(text.contains("outpost_http_connections_evicted_total{listener=\"admin\"} 0\n"));
        assert_eq!(
            text.matches("# TYPE outpost_http_connections_open gauge\n")
                .count(),
            1
        );
    }
}
