//! The MQTT session: connect with a last will, publish presence and the reported state,
//! subscribe to the desired state and the fleet's presence, pump the outbox while a fleet
//! replica is online, and delete a batch's records when its PUBACK arrives. The connection
//! itself (backoff, last will, re-subscribing, matching PUBACKs) is [`outpost_mqtt::Session`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outpost_mqtt::{Session, SessionEvent, SessionOptions};
use outpost_proto::{
    DesiredState, FLEET_PRESENCE_FILTER, PROTOCOL_VERSION, Presence, TelemetryBatch, Topic,
};
use tokio::sync::watch;

use crate::Shared;
use crate::outbox::Kind;

/// Largest MQTT packet either way.
const MAX_PACKET: usize = 1 << 20;
/// Telemetry batches published and not yet acknowledged, at most.
const MAX_INFLIGHT_BATCHES: usize = 4;
/// Records per batch, at most.
const BATCH_RECORDS: usize = 64;
/// Bytes per batch, about.
const BATCH_BYTES: usize = 256 * 1024;
/// A batch not acknowledged after this long is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Connection {
    /// Fleet replicas whose presence says online.
    fleet: BTreeSet<String>,
    /// Highest sequence number handed to the session on this connection.
    cursor: Option<u64>,
    last_reported: Option<Vec<u8>>,
}

type Mqtt = Session<Vec<u64>>;

fn session_options(shared: &Shared) -> SessionOptions {
    let mut options = SessionOptions::new(
        format!("outpost-{}", shared.fleet.device_id),
        shared.fleet.broker.host(),
        shared.fleet.broker.port(),
        (shared.topics.name(Topic::Status), Presence::to_vec(false)),
    );
    options.credentials = shared.fleet.credentials.clone();
    options.tls = shared.fleet.tls.clone();
    options.subscriptions = vec![
        shared.topics.name(Topic::Desired),
        FLEET_PRESENCE_FILTER.to_owned(),
    ];
    options.max_packet = MAX_PACKET;
    options.min_backoff = MIN_BACKOFF;
    options.max_backoff = MAX_BACKOFF;
    options
}

fn publish_reported(shared: &Shared, mqtt: &mut Mqtt, conn: &mut Connection, force: bool) {
    let Ok(payload) = serde_json::to_vec(&shared.reported()) else {
        return;
    };
    if !force && conn.last_reported.as_ref() == Some(&payload) {
        return;
    }
    match mqtt.publish(
        shared.topics.name(Topic::Reported),
        payload.clone(),
        true,
        None,
    ) {
        Ok(()) => conn.last_reported = Some(payload),
        Err(e) => tracing::debug!(error = %e, "reported state deferred"),
    }
}

/// Publishes outbox batches while a fleet replica is online and the window has room.
fn pump(shared: &Shared, mqtt: &mut Mqtt, conn: &mut Connection) {
    if !mqtt.is_connected() || conn.fleet.is_empty() {
        return;
    }
    while mqtt.tagged_in_flight() < MAX_INFLIGHT_BATCHES {
        let batch = match shared
            .outbox
            .batch_after(conn.cursor, BATCH_RECORDS, BATCH_BYTES)
        {
            Ok(Some(b)) => b,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the outbox");
                return;
            }
        };
        let seqs = batch.seqs();
        let topic = match batch.kind {
            Kind::Telemetry => shared.topics.name(Topic::Telemetry),
            Kind::Event => shared.topics.name(Topic::Events),
        };
        let message = TelemetryBatch {
            v: PROTOCOL_VERSION,
            device: shared.fleet.device_id.clone(),
            records: batch.records,
            dropped: shared.outbox.dropped(),
        };
        let Ok(payload) = serde_json::to_vec(&message) else {
            return;
        };
        let last = seqs.last().copied();
        // Only what is on disk may leave: a crash must not hand its numbers to other records.
        if let Err(e) = shared.outbox.make_durable(last.unwrap_or(0)) {
            tracing::error!(error = %e, "cannot make the outbox durable; batch deferred");
            return;
        }
        shared.outbox.set_in_flight(&seqs, true);
        if let Err(e) = mqtt.publish(topic, payload, false, Some(seqs.clone())) {
            tracing::debug!(error = %e, "batch deferred");
            shared.outbox.set_in_flight(&seqs, false);
            return;
        }
        conn.cursor = last;
    }
}

/// Owns the MQTT connection until shutdown.
pub(crate) async fn run(
    shared: Arc<Shared>,
    desired_tx: watch::Sender<Option<DesiredState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut mqtt: Mqtt = Session::new(session_options(&shared));
    let mut conn = Connection::default();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut since_reported = Instant::now();
    let mut last_failure = String::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                mqtt.close(Some((shared.topics.name(Topic::Status), Presence::to_vec(false)))).await;
                shared.connected.store(false, Ordering::Relaxed);
                shared.fleet_online.store(false, Ordering::Relaxed);
                tracing::info!("fleet agent stopped");
                return;
            }
            event = mqtt.next() => match event {
                SessionEvent::Connected => {
                    tracing::info!("connected to the broker");
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    shared.connected.store(true, Ordering::Relaxed);
                    shared.fleet_online.store(false, Ordering::Relaxed);
                    last_failure.clear();
                    shared.outbox.clear_in_flight();
                    conn = Connection::default();
                    if let Err(e) = mqtt.publish(shared.topics.name(Topic::Status), Presence::to_vec(true), true, None) {
                        tracing::warn!(error = %e, "cannot announce presence");
                    }
                    publish_reported(&shared, &mut mqtt, &mut conn, true);
                    since_reported = Instant::now();
                }
                SessionEvent::Subscribed => {}
                SessionEvent::Message(p) => {
                    if p.topic == shared.topics.name(Topic::Desired) && p.payload.is_empty() {
                        // The fleet cleared it (the device was forgotten): nothing to apply.
                        tracing::info!("the fleet cleared this device's desired state");
                    } else if p.topic == shared.topics.name(Topic::Desired) {
                        if let Some(state) = shared.on_desired(&p.payload) {
                            desired_tx.send_replace(Some(state));
                        }
                        publish_reported(&shared, &mut mqtt, &mut conn, false);
                    } else if let Some(replica) = outpost_proto::parse_fleet_presence(&p.topic) {
                        if Presence::is_online(&p.payload) {
                            conn.fleet.insert(replica.to_owned());
                        } else {
                            conn.fleet.remove(replica);
                        }
                        shared.fleet_online.store(!conn.fleet.is_empty(), Ordering::Relaxed);
                        tracing::debug!(replicas = conn.fleet.len(), "fleet presence");
                        pump(&shared, &mut mqtt, &mut conn);
                    }
                }
                SessionEvent::Acked(seqs) => {
                    if let Err(e) = shared.outbox.ack(&seqs) {
                        tracing::error!(error = %e, "cannot delete acknowledged records");
                    }
                    pump(&shared, &mut mqtt, &mut conn);
                }
                SessionEvent::Disconnected { error, was_connected, .. } => {
                    if was_connected {
                        shared.disconnections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%error, "lost the broker; serving on, retrying");
                    } else if error != last_failure {
                        // Once per kind of failure: a refused login needs an operator.
                        tracing::warn!(%error, "cannot reach the broker; serving on, retrying");
                    } else {
                        tracing::debug!(%error, "broker unreachable");
                    }
                    last_failure = error;
                    shared.connected.store(false, Ordering::Relaxed);
                    shared.fleet_online.store(false, Ordering::Relaxed);
                    // Whatever was in flight is sent again on the next connection.
                    shared.outbox.clear_in_flight();
                    conn = Connection::default();
                }
            },
            _ = shared.reported_changed.notified(), if mqtt.is_connected() => {
                publish_reported(&shared, &mut mqtt, &mut conn, false);
                since_reported = Instant::now();
            }
            _ = shared.outbox_changed.notified(), if mqtt.is_connected() => {
                pump(&shared, &mut mqtt, &mut conn);
            }
            _ = tick.tick() => {
                if mqtt.is_connected() {
                    let expired = mqtt.expire(ACK_TIMEOUT).len();
                    if expired > 0 {
                        shared.resent_batches.fetch_add(expired as u64, Ordering::Relaxed);
                        tracing::warn!("telemetry batches unacknowledged; sending them again");
                        conn.cursor = None;
                    }
                    if since_reported.elapsed() > Duration::from_secs(30) {
                        publish_reported(&shared, &mut mqtt, &mut conn, false);
                        since_reported = Instant::now();
                    }
                    pump(&shared, &mut mqtt, &mut conn);
                }
            }
        }
    }
}
