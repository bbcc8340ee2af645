//! One connection's life at the door: its place in the registry (which the cap evicts from),
//! its request phases, and the bodies that report them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

use crate::{Limits, Stats};

/// The open connections, oldest first.
pub(crate) struct Registry {
    limits: Limits,
    stats: Arc<Stats>,
    inner: Arc<Mutex<Open>>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    conns: BTreeMap<u64, Arc<Conn>>,
}

/// What the door knows of one connection.
pub(crate) struct Conn {
    /// Requests under way (from their head to the end of their response).
    in_request: AtomicU32,
    /// Requests whose body has fully arrived and whose response is not yet sent: the work a
    /// connection is not evicted from.
    working: AtomicU32,
    /// When the last request ended (or the connection opened), in ms since `epoch`.
    idle_since_ms: AtomicU64,
    epoch: Instant,
    /// Told to close at once (evicted).
    close: tokio::sync::Notify,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_request.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(self.now_ms().saturating_sub(since)))
    }
}

/// A connection's place in the registry; leaving drops it from there.
pub(crate) struct Slot {
    id: u64,
    conn: Arc<Conn>,
    registry: Arc<Mutex<Open>>,
    limits: Limits,
    stats: Arc<Stats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.lock() {
            open.conns.remove(&self.id);
        }
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Registry {
    pub(crate) fn new(limits: Limits, stats: Arc<Stats>) -> Self {
        Self {
            limits,
            stats,
            inner: Arc::default(),
        }
    }

    /// A place for a new connection, making room at the cap; `None` when every connection is
    /// running a request.
    pub(crate) fn admit(&self) -> Option<Slot> {
        let mut open = self.inner.lock().ok()?;
        if open.conns.len() >= self.limits.max_connections.max(1) {
            // Oldest idle first (ids grow with time), else oldest still waiting for a body.
            let find = |open: &Open, pick: fn(&Conn) -> bool| {
                open.conns
                    .iter()
                    .find(|(_, c)| pick(c))
                    .map(|(id, c)| (*id, Arc::clone(c)))
            };
            let (id, victim) = find(&open, |c| c.in_request.load(Ordering::Acquire) == 0)
                .or_else(|| find(&open, |c| c.working.load(Ordering::Acquire) == 0))?;
            victim.close.notify_one();
            open.conns.remove(&id);
            self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        }
        let id = open.next_id;
        open.next_id += 1;
        let epoch = Instant::now();
        let conn = Arc::new(Conn {
            in_request: AtomicU32::new(0),
            working: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
            epoch,
            close: tokio::sync::Notify::new(),
        });
        open.conns.insert(id, Arc::clone(&conn));
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            id,
            conn,
            registry: Arc::clone(&self.inner),
            limits: self.limits,
            stats: Arc::clone(&self.stats),
        })
    }
}

/// Serves one connection until it ends, is evicted, idles out, or (after `stop`) finishes
/// the request under way.
pub(crate) async fn run<I>(
    io: I,
    router: Router,
    slot: Slot,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (conn, limits, stats) = (Arc::clone(&slot.conn), slot.limits, Arc::clone(&slot.stats));
    let service = {
        let conn = Arc::clone(&conn);
        let stats = Arc::clone(&stats);
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let phase = Phase::begin(Arc::clone(&conn));
            let body_stats = Arc::clone(&stats);
            let request = request.map(|body| {
                Watched::new(body, Arc::clone(&phase), limits.body_timeout, body_stats)
            });
            let mut router = router.clone();
            async move {
                std::future::poll_fn(|cx| {
                    <Router as Service<hyper::Request<Watched>>>::poll_ready(&mut router, cx)
                })
                .await?;
                let response = router.call(request).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(Guarded {
                        body,
                        _phase: phase,
                    })
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let idle_check = match conn.idle_for() {
            Some(idle) if idle >= limits.idle_timeout => {
                stats.idle_closed.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Some(idle) => limits.idle_timeout - idle,
            None => limits.idle_timeout,
        };
        tokio::select! {
            _ = connection.as_mut() => break,
            () = conn.close.notified() => break,
            () = tokio::time::sleep(idle_check) => {}
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                if conn.in_request.load(Ordering::Acquire) == 0 {
                    break;
                }
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    drop(slot);
}

/// One request, from its head to the end of its response (held by its request body and its
/// response body).
struct Phase {
    conn: Arc<Conn>,
    working: AtomicBool,
}

impl Phase {
    fn begin(conn: Arc<Conn>) -> Arc<Self> {
        conn.in_request.fetch_add(1, Ordering::AcqRel);
        Arc::new(Self {
            conn,
            working: AtomicBool::new(false),
        })
    }

    /// The request's body has arrived: from now on the connection is doing work.
    fn body_arrived(&self) {
        if !self.working.swap(true, Ordering::AcqRel) {
            self.conn.working.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if self.working.load(Ordering::Acquire) {
            self.conn.working.fetch_sub(1, Ordering::AcqRel);
        }
        self.conn
            .idle_since_ms
            .store(self.conn.now_ms(), Ordering::Release);
        self.conn.in_request.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request body that may not stall for longer than `timeout`, and reports when it has
/// arrived.
pub(crate) struct Watched {
    body: Incoming,
    phase: Arc<Phase>,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    stats: Arc<Stats>,
}

impl Watched {
    fn new(body: Incoming, phase: Arc<Phase>, timeout: Duration, stats: Arc<Stats>) -> Self {
        if http_body::Body::is_end_stream(&body) {
            phase.body_arrived();
        }
        Self {
            body,
            phase,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            stats,
        }
    }
}

/// A request body that stalled.
#[derive(Debug)]
struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body stalled for longer than the body timeout")
    }
}

impl std::error::Error for BodyTimeout {}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.phase.body_arrived();
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => {
                // It is moving: the stall timer starts again.
                let next = tokio::time::Instant::now() + this.timeout;
                this.deadline.as_mut().reset(next);
                if http_body::Body::is_end_stream(&this.body) {
                    this.phase.body_arrived();
                }
                Poll::Ready(Some(frame.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.stats.body_timeouts.fetch_add(1, Ordering::Relaxed);
                    Poll::Ready(Some(Err(Box::new(BodyTimeout))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request's phase until it is sent (or dropped).
struct Guarded {
    body: Body,
    _phase: Arc<Phase>,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
