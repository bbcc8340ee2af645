//! The MQTT session: connect with a last will, publish presence and the reported state,
//! subscribe to the desired state and the fleet's presence, pump the outbox while a fleet
//! replica is online, and match PUBACKs to batches.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_proto::{
    DesiredState, FLEET_PRESENCE_FILTER, PROTOCOL_VERSION, Presence, TelemetryBatch,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;

use crate::Shared;
use crate::outbox::{Kind, Outbox};
use crate::tracker::{Tracked, Tracker};

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
    connected: bool,
    /// Fleet replicas whose presence says online.
    fleet: BTreeSet<String>,
    /// Publishes handed to rumqttc and the batches awaiting PUBACK.
    tracker: Tracker,
    /// Highest sequence number handed to rumqttc on this connection.
    cursor: Option<u64>,
    last_reported: Option<Vec<u8>>,
}

impl Connection {
    fn reset(&mut self, outbox: &Outbox) {
        outbox.clear_in_flight();
        *self = Self::default();
    }
}

fn mqtt_options(shared: &Shared) -> MqttOptions {
    let mut options = MqttOptions::new(
        format!("outpost-{}", shared.fleet.device_id),
        shared.fleet.broker.host(),
        shared.fleet.broker.port(),
    );
    options
        .set_keep_alive(Duration::from_secs(15))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET)
        .set_last_will(LastWill::new(
            shared.topics.status(),
            Presence::to_vec(false),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some((user, password)) = &shared.fleet.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    options
}

fn publish(
    client: &AsyncClient,
    conn: &mut Connection,
    topic: String,
    retain: bool,
    payload: Vec<u8>,
    tracked: Tracked,
) -> bool {
    match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
        Ok(()) => {
            conn.tracker.queued(tracked);
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "publish deferred");
            false
        }
    }
}

fn publish_reported(shared: &Shared, client: &AsyncClient, conn: &mut Connection, force: bool) {
    let Ok(payload) = serde_json::to_vec(&shared.reported()) else {
        return;
    };
    if !force && conn.last_reported.as_ref() == Some(&payload) {
        return;
    }
    if publish(
        client,
        conn,
        shared.topics.reported(),
        true,
        payload.clone(),
        Tracked::Other,
    ) {
        conn.last_reported = Some(payload);
    }
}

/// Publishes outbox batches while a fleet replica is online and the window has room.
fn pump(shared: &Shared, client: &AsyncClient, conn: &mut Connection) {
    if !conn.connected || conn.fleet.is_empty() {
        return;
    }
    while conn.tracker.batches_in_flight() < MAX_INFLIGHT_BATCHES {
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
            Kind::Telemetry => shared.topics.telemetry(),
            Kind::Event => shared.topics.events(),
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
        shared.outbox.set_in_flight(&seqs, true);
        if !publish(
            client,
            conn,
            topic,
            false,
            payload,
            Tracked::Batch(seqs.clone()),
        ) {
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
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&shared), 64);
    let mut conn = Connection::default();
    let mut backoff = MIN_BACKOFF;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut since_reported = Instant::now();
    let mut last_failure = String::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if conn.connected {
                    let _ = client.try_publish(shared.topics.status(), QoS::AtLeastOnce, true, Presence::to_vec(false));
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(ev) = eventloop.poll().await {
                            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) { break; }
                        }
                    }).await;
                }
                tracing::info!("fleet agent stopped");
                return;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!("connected to the broker");
                    last_failure.clear();
                    conn.reset(&shared.outbox);
                    conn.connected = true;
                    backoff = MIN_BACKOFF;
                    publish(&client, &mut conn, shared.topics.status(), true, Presence::to_vec(true), Tracked::Other);
                    publish_reported(&shared, &client, &mut conn, true);
                    since_reported = Instant::now();
                    let subscribed = client.try_subscribe_many([
                        rumqttc::SubscribeFilter::new(shared.topics.desired(), QoS::AtLeastOnce),
                        rumqttc::SubscribeFilter::new(FLEET_PRESENCE_FILTER.to_owned(), QoS::AtLeastOnce),
                    ]);
                    if let Err(e) = subscribed {
                        tracing::warn!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if p.topic == shared.topics.desired() && p.payload.is_empty() {
                        // The fleet cleared it (the device was forgotten): nothing to apply.
                        tracing::info!("the fleet cleared this device's desired state");
                    } else if p.topic == shared.topics.desired() {
                        if let Some(state) = shared.on_desired(&p.payload) {
                            desired_tx.send_replace(Some(state));
                        }
                        publish_reported(&shared, &client, &mut conn, false);
                    } else if let Some(replica) = outpost_proto::parse_fleet_presence(&p.topic) {
                        if Presence::is_online(&p.payload) {
                            conn.fleet.insert(replica.to_owned());
                        } else {
                            conn.fleet.remove(replica);
                        }
                        tracing::debug!(replicas = conn.fleet.len(), "fleet presence");
                        pump(&shared, &client, &mut conn);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(seqs) = conn.tracker.acked(ack.pkid)
                        && let Err(e) = shared.outbox.ack(&seqs)
                    {
                        tracing::error!(error = %e, "cannot delete acknowledged records");
                    }
                    pump(&shared, &client, &mut conn);
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => conn.tracker.sent(pkid),
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => conn.tracker.held(pkid),
                Ok(_) => {}
                Err(e) => {
                    let failure = e.to_string();
                    if conn.connected {
                        tracing::warn!(error = %e, "lost the broker; serving on, retrying");
                    } else if failure != last_failure {
                        // Once per kind of failure: a refused login needs an operator.
                        tracing::warn!(error = %e, "cannot reach the broker; serving on, retrying");
                    } else {
                        tracing::debug!(error = %e, retry_in = ?backoff, "broker unreachable");
                    }
                    last_failure = failure;
                    conn.reset(&shared.outbox);
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
            _ = shared.reported_changed.notified(), if conn.connected => {
                publish_reported(&shared, &client, &mut conn, false);
                since_reported = Instant::now();
            }
            _ = shared.outbox_changed.notified(), if conn.connected => {
                pump(&shared, &client, &mut conn);
            }
            _ = tick.tick() => {
                if conn.connected {
                    if conn.tracker.any_expired(ACK_TIMEOUT) {
                        tracing::warn!("telemetry batches unacknowledged; sending them again");
                        conn.tracker.forget_sent();
                        conn.cursor = None;
                    }
                    if since_reported.elapsed() > Duration::from_secs(30) {
                        publish_reported(&shared, &client, &mut conn, false);
                        since_reported = Instant::now();
                    }
                    pump(&shared, &client, &mut conn);
                }
            }
        }
    }
}
