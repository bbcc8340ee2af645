//! Ingestion: what devices send (presence, reported state, telemetry, events) applied to the
//! store, and the desired state published again for a device that reports itself behind it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_proto::{DeviceId, Presence, ReportedState, TelemetryBatch, Topic, Topics};

use crate::domain::Fleet;
use crate::error::Result;
use crate::store::{Put, Stream, now_secs};

/// How far ahead of the fleet's clock a record's time may be; later times are taken as now.
pub(crate) const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(300);

/// How often a device behind its desired state gets it published again, at most.
pub(crate) const REPUBLISH_EVERY: Duration = Duration::from_secs(10);

impl Fleet {
    /// Applies one message from a device to the store; false when it could not be stored.
    /// (Malformed messages count as handled: delivering them again would not help.) The
    /// caller flushes the store ([`Store::flush`]) before acknowledging what returned true.
    pub fn ingest(&self, topic: &str, payload: &[u8]) -> bool {
        let fleet = self;
        let Some((id, leaf)) = Topics::parse(topic) else {
            return true;
        };
        let device = id.as_str();
        if payload.is_empty() {
            // A cleared retained message (a forgotten device): nothing to record.
            return true;
        }
        if !fleet.admits(&id) {
            // Registration is by enrolment: publishing does not make a device.
            return true;
        }
        let now = now_secs();
        let result = match leaf {
            Topic::Status if Presence::is_online(payload) => fleet
                .store
                .update_device(device, |d| {
                    d.online = true;
                    d.last_seen = Some(now);
                })
                .map(|_| ()),
            // Offline never registers a device: a forgotten device's last will can arrive after
            // it was forgotten. Its retained "offline" is cleared instead of kept.
            Topic::Status => fleet
                .store
                .update_known_device(device, |d| {
                    d.online = false;
                    d.last_seen = Some(now);
                })
                .map(|known| {
                    if !known && fleet.leads() {
                        fleet.clear_retained(topic);
                    }
                }),
            Topic::Reported => match serde_json::from_slice::<ReportedState>(payload) {
                Ok(state) if state.device == id => {
                    let behind = state.accepted_generation;
                    let stored = fleet.store.update_device(device, |d| {
                        d.reported = Some(state);
                        d.last_seen = Some(now);
                    });
                    if stored.is_ok() {
                        fleet.catch_up(&id, behind, now);
                    }
                    stored.map(|_| ())
                }
                Ok(_) => {
                    fleet.refused(device, Refusal::Foreign, "reported state");
                    Ok(())
                }
                Err(e) => {
                    fleet.refused(device, Refusal::Malformed(&e), "reported state");
                    Ok(())
                }
            },
            Topic::Telemetry | Topic::Events => {
                let stream = if leaf == Topic::Events {
                    Stream::Events
                } else {
                    Stream::Telemetry
                };
                match serde_json::from_slice::<TelemetryBatch>(payload) {
                    Ok(batch) if batch.device == id => {
                        store_batch(fleet, stream, device, &batch, now)
                    }
                    Ok(_) => {
                        fleet.refused(device, Refusal::Foreign, "batch");
                        Ok(())
                    }
                    Err(e) => {
                        fleet.refused(device, Refusal::Malformed(&e), "batch");
                        Ok(())
                    }
                }
            }
            Topic::Desired => Ok(()),
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(%device, error = %e, "cannot store a device message");
                false
            }
        }
    }

    /// Counts a message that is not stored. Logged at debug level only: a hostile client can
    /// send them as fast as the broker lets it, and each would otherwise be a log line.
    fn refused(&self, device: &str, why: Refusal<'_>, what: &str) {
        match why {
            Refusal::Foreign => {
                self.metrics.foreign.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%device, "{what} names another device; ignored");
            }
            Refusal::Malformed(e) => {
                self.metrics.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%device, error = %e, "malformed {what}; ignored");
            }
        }
    }

    /// Publishes `device`'s desired state again when its reported state says it has not
    /// accepted the current generation: something overwrote the retained message (anyone on
    /// the broker can), or the broker lost it. At most once per [`REPUBLISH_EVERY`] a device;
    /// a device that already has it sees a duplicate and does nothing.
    fn catch_up(&self, device: &DeviceId, accepted: Option<u64>, now: u64) {
        if !self.leads() {
            return;
        }
        let Ok(Some(record)) = self.store.desired(device.as_str()) else {
            return;
        };
        if accepted.is_some_and(|g| g >= record.generation) || record.expires_at <= now {
            return;
        }
        {
            let Ok(mut last) = self.republished.lock() else {
                return;
            };
            if last
                .get(device.as_str())
                .is_some_and(|&t| now < t + REPUBLISH_EVERY.as_secs())
            {
                return;
            }
            last.insert(device.as_str().to_owned(), now);
        }
        tracing::info!(%device, generation = record.generation, "device behind its desired state; publishing it again");
        if let Err(e) = self.publish_desired(&record) {
            tracing::error!(%device, error = %e, "cannot publish a desired state again");
        }
    }
}

/// Why a device message was not stored.
enum Refusal<'a> {
    /// It names another device.
    Foreign,
    /// It could not be read.
    Malformed(&'a serde_json::Error),
}

fn store_batch(
    fleet: &Fleet,
    stream: Stream,
    device: &str,
    batch: &TelemetryBatch,
    now: u64,
) -> Result<()> {
    let mut new = 0u64;
    let mut duplicates = 0u64;
    let mut conflicts = 0u64;
    let mut over_quota = 0u64;
    // What one device may have stored at once: a flood from one device (or from someone
    // publishing as it) fills its own quota, not the fleet's disk and memory.
    let held = fleet.store.device(device)?.map_or(0, |d| d.stored_bytes);
    let mut added = 0u64;
    for record in &batch.records {
        if held + added >= fleet.device_quota_bytes {
            over_quota += 1;
            continue;
        }
        // A time from the future would exempt the record (and, since pruning stops at a
        // device's first record young enough to keep, every later one) from retention.
        let mut record = record.clone();
        if record.time > now.saturating_add(MAX_CLOCK_AHEAD.as_secs()) {
            tracing::debug!(%device, seq = record.seq, time = record.time, "record time in the future; taken as now");
            record.time = now;
        }
        let (put, size) = fleet.store.put_record_sized(stream, device, &record)?;
        added += size;
        match put {
            Put::New => new += 1,
            Put::Duplicate => duplicates += 1,
            Put::Conflict => {
                new += 1;
                conflicts += 1;
                tracing::debug!(%device, seq = record.seq, "a record differs from the one stored under its sequence number (one is forged); both kept");
            }
            Put::ConflictDropped => {
                conflicts += 1;
                tracing::debug!(%device, seq = record.seq, "too many different records under one sequence number; dropped");
            }
        }
    }
    let last_event = (stream == Stream::Events)
        .then(|| batch.records.last().map(|r| r.body.clone()))
        .flatten();
    fleet.store.update_device(device, |d| {
        d.records += new;
        d.duplicates += duplicates;
        d.conflicts += conflicts;
        d.stored_bytes += added;
        d.over_quota += over_quota;
        d.dropped = batch.dropped;
        d.last_seen = Some(now);
        // Telemetry comes only over a live connection (it is never retained): the device is
        // online even when its presence message was lost (a broker that dropped messages for
        // a fleet that fell behind). Its last will still says offline when it goes.
        d.online = true;
        if last_event.is_some() {
            d.last_event = last_event;
        }
    })?;
    fleet.metrics.record_batch(new, duplicates);
    fleet
        .metrics
        .conflicts
        .fetch_add(conflicts, Ordering::Relaxed);
    if over_quota > 0 {
        fleet
            .metrics
            .over_quota
            .fetch_add(over_quota, Ordering::Relaxed);
        tracing::debug!(%device, over_quota, "records refused: the device's quota is full");
    }
    Ok(())
}
