//! Desired-state acceptance: what the agent does with each envelope the broker delivers.

use outpost_proto::text::{MAX_ERROR_TEXT, bounded};
use outpost_proto::{DesiredState, Event, SignedDesired, Verdict};

use crate::{Shared, now_secs};

impl Shared {
    /// Checks a received desired state; returns what the reconciler should work on.
    pub(crate) fn on_desired(&self, payload: &[u8]) -> Option<DesiredState> {
        let accepted = self.store.accepted();
        let verdict = SignedDesired::from_slice(payload).and_then(|envelope| {
            envelope.open(
                &self.fleet.fleet_key,
                &self.fleet.device_id,
                now_secs(),
                accepted,
            )
        });
        match verdict {
            Ok(Verdict::Apply(state)) => {
                if let Err(e) = self.store.accept(&state) {
                    tracing::error!(error = %e, "cannot store the desired state");
                    return None;
                }
                tracing::info!(generation = state.generation, "desired state accepted");
                // The last error belonged to an older generation.
                self.set_retrying(false);
                self.set_last_error(None);
                self.event(Event::DesiredAccepted {
                    generation: state.generation,
                });
                self.reported_changed.notify_one();
                Some(state)
            }
            Ok(Verdict::Duplicate) => self.store.unfinished(),
            Ok(Verdict::Stale { generation }) => {
                let reason = format!(
                    "desired state generation {generation} is older than accepted generation {}",
                    accepted.unwrap_or(0)
                );
                self.refuse(&reason);
                None
            }
            Err(e) => {
                self.refuse(&e.to_string());
                None
            }
        }
    }

    /// Logs, reports and records a refusal. The reason may quote what the broker delivered, so
    /// it is bounded first: whoever can publish on the broker must not be able to make the
    /// device's reported state too large to send.
    fn refuse(&self, reason: &str) {
        let reason = bounded(reason, MAX_ERROR_TEXT - 32);
        tracing::warn!(%reason, "desired state refused");
        self.event(Event::DesiredRefused {
            reason: reason.clone(),
        });
        self.set_last_error(Some(format!("refused desired state: {reason}")));
    }
}
