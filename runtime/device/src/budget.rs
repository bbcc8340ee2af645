//! The device's byte budget: request bodies, the tensors decoded from them, and responses on
//! their way out, bounded in total (`max_inflight_bytes`). A request takes its share before
//! its body is read and gives it back when its response has been sent; what does not fit now
//! is answered 503 at once, what could never fit 413.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::InferError;

/// The budget is counted in KiB so that a semaphore's `u32` permits reach 4 TiB.
const UNIT: u64 = 1024;

/// Bytes in flight, bounded.
#[derive(Debug, Clone)]
pub(crate) struct Budget {
    units: Arc<Semaphore>,
    max_bytes: u64,
    refused: Arc<AtomicU64>,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Budget {
    /// A budget of `max_bytes`.
    pub(crate) fn new(max_bytes: u64) -> Self {
        let units = usize::try_from(max_bytes / UNIT)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            units: Arc::new(Semaphore::new(units)),
            max_bytes,
            refused: Arc::default(),
        }
    }

    /// Bytes not taken now.
    pub(crate) fn available(&self) -> u64 {
        self.units.available_permits() as u64 * UNIT
    }

    /// The budget's gauges and counter in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        let whole = (self.max_bytes / UNIT) * UNIT;
        format!(
            "# HELP outpost_inflight_bytes Bytes of requests and responses in flight.\n\
             # TYPE outpost_inflight_bytes gauge\noutpost_inflight_bytes {}\n\
             # HELP outpost_inflight_budget_bytes The most bytes in flight (max_inflight_bytes).\n\
             # TYPE outpost_inflight_budget_bytes gauge\noutpost_inflight_budget_bytes {}\n\
             # HELP outpost_rejected_budget_total Requests and responses refused because the bytes in flight were at the budget.\n\
             # TYPE outpost_rejected_budget_total counter\noutpost_rejected_budget_total {}\n",
            whole.saturating_sub(self.available()),
            self.max_bytes,
            self.refused.load(Ordering::Relaxed),
        )
    }

    /// Takes `bytes` for `what`, at once or not at all.
    pub(crate) fn take(&self, bytes: u64, what: &str) -> Result<Held, InferError> {
        if bytes > self.max_bytes {
            return Err(InferError::OverBudget {
                what: what.to_owned(),
                bytes,
                budget: self.max_bytes,
            });
        }
        let units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        if units == 0 {
            return Ok(Held { _permit: None });
        }
        match Arc::clone(&self.units).try_acquire_many_owned(units) {
            Ok(permit) => Ok(Held {
                _permit: Some(permit),
            }),
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(InferError::BudgetBusy(self.max_bytes))
            }
        }
    }
}

/// A response body that keeps its share of the budget until it has been sent (or dropped).
pub(crate) fn body(bytes: Vec<u8>, held: Held) -> Body {
    Body::new(Holding {
        data: Some(Bytes::from(bytes)),
        _held: held,
    })
}

struct Holding {
    data: Option<Bytes>,
    _held: Held,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_taken_at_once_or_refused_and_given_back_on_drop() {
        let budget = Budget::new(10 * UNIT);
        let a = budget.take(6 * UNIT, "a").unwrap();
        assert!(matches!(
            budget.take(5 * UNIT, "b"),
            Err(InferError::BudgetBusy(_))
        ));
        assert!(matches!(
            budget.take(11 * UNIT, "c"),
            Err(InferError::OverBudget { .. })
        ));
        let b = budget.take(4 * UNIT, "d").unwrap();
        assert_eq!(budget.available(), 0);
        drop((a, b));
        assert_eq!(budget.available(), 10 * UNIT);
    }
}
