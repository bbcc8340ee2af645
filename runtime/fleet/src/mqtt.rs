//! The fleet's MQTT adapter: hands what devices send to [`Fleet::ingest`] and publishes what
//! the fleet queues (signed desired states, retained; cleared retained messages).
//!
//! Presence and reported state are plain subscriptions (every replica keeps the whole
//! registry); telemetry and events are shared subscriptions, so replicas split that load. The
//! fleet announces its own presence (retained, with an offline last will) only after its
//! subscriptions are acknowledged: devices hold telemetry until they see it, so a restarted
//! broker never swallows records published before the fleet subscribed again.
//!
//! The store is written on a blocking worker, never on the MQTT loop: the loop hands messages
//! over a bounded channel (holding, in order, what does not fit while the worker is behind,
//! and still serving the connection: pings, acknowledgements, publishes), the worker stores
//! whatever has queued up (the whole batch one unit of the store: on a database, one
//! transaction that does not wait for the disk; one message at a time if that fails),
//! flushes once (one wait for the disk), and returns the messages it stored; only then does
//! the loop acknowledge them, in the order they arrived. The broker's window of
//! unacknowledged messages, and a bound in bytes past it, bound what the loop holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_mqtt::{Publish, Session, SessionEvent, SessionOptions};
use outpost_proto::{Presence, Topic, Topics, fleet_presence_topic};
use tokio::sync::{mpsc, watch};

use crate::domain::{Fleet, Outbound};

/// Messages handed to the store worker and not yet stored, at most.
const INGEST_QUEUE: usize = 1024;
/// Bytes of messages received and not yet handed to the store worker, at most, before the
/// loop stops reading from the broker. Generous: a loop that stops reading stops seeing the
/// broker's answers to its pings too, and loses the connection after one keepalive; and a
/// broker does send past its window (Mosquitto resends every retained presence and reported
/// state when the fleet subscribes again: two messages a device).
const WAITING_MAX_BYTES: usize = 64 << 20;
/// Messages stored per flush, at most.
const INGEST_BATCH: usize = 256;
/// Desired states and cleared messages waiting for room in the MQTT queue, at most.
const BACKLOG: usize = 1024;
/// Publishes sent and not yet acknowledged by the broker, at most: well under rumqttc's window
/// (100), so that acknowledgements of what the fleet receives always get through.
const MAX_PUBLISHES_IN_FLIGHT: usize = 32;

fn session_options(fleet: &Fleet) -> SessionOptions {
    let mut options = SessionOptions::new(
        format!("outpost-fleet-{}", fleet.replica),
        fleet.broker.0.clone(),
        fleet.broker.1,
        (
            fleet_presence_topic(&fleet.replica),
            Presence::to_vec(false),
        ),
    );
    options.credentials = fleet.broker_login.clone();
    options.tls = fleet.broker_tls.clone();
    // A persistent session: a broker with persistence queues QoS 1 messages for the fleet
    // while it is away. Messages are acknowledged once stored.
    options.clean_session = false;
    options.manual_acks = true;
    options.max_backoff = Duration::from_secs(10);
    options.queue = 1024;
    options.subscriptions = vec![
        format!("{}/+/status", outpost_proto::PREFIX),
        format!("{}/+/reported", outpost_proto::PREFIX),
        Topic::Telemetry.fleet_subscription_in(&fleet.share_group),
        Topic::Events.fleet_subscription_in(&fleet.share_group),
        // Its own presence, to put it right when something else overwrites it.
        fleet_presence_topic(&fleet.replica),
    ];
    options
}

/// Stores messages from the loop until the loop hangs up; sends back those stored.
fn ingest_worker(
    fleet: Arc<Fleet>,
    mut messages: mpsc::Receiver<Publish>,
    stored: mpsc::UnboundedSender<Vec<Publish>>,
) {
    while let Some(first) = messages.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < INGEST_BATCH {
            match messages.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let Some(mut done) = store_batch(&fleet, batch, &stored) else {
            return;
        };
        // Stored before the broker hears the acknowledgement.
        if let Err(e) = fleet.store.flush() {
            tracing::error!(error = %e, "cannot flush the store; not acknowledging");
            done.clear();
        }
        if stored.send(done).is_err() {
            return;
        }
    }
}

/// Stores `batch` in order; returns what was stored (the rest is left unacknowledged), or
/// `None` when the loop hung up meanwhile. While the store does not answer (a database gone
/// away) nothing is given up: the message that failed is tried again, with a growing pause,
/// until it is stored, so the broker's unacknowledged window holds the backlog and delivery
/// resumes by itself when the store is back. A message that fails with the store answering
/// is left unacknowledged, as before.
fn store_batch(
    fleet: &Fleet,
    batch: Vec<Publish>,
    stored: &mpsc::UnboundedSender<Vec<Publish>>,
) -> Option<Vec<Publish>> {
    // The whole batch as one unit where the store has them (a database: one transaction, a
    // round trip or two a message); else, or when that fails, one message at a time.
    let mut ids: Vec<String> = batch
        .iter()
        .filter_map(|m| Topics::parse(&m.topic).map(|(id, _)| id.as_str().to_owned()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let devices: Vec<&str> = ids.iter().map(String::as_str).collect();
    let all = fleet
        .store
        .unit_of_many(&devices, batch.len(), &mut |i| {
            fleet.ingest(&batch[i].topic, &batch[i].payload)
        })
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, "a batch's unit failed; storing its messages one at a time");
            false
        });
    if all {
        return Some(batch);
    }
    let mut done = Vec::with_capacity(batch.len());
    let mut pending: VecDeque<Publish> = batch.into();
    let mut pause = STORE_RETRY_FIRST;
    let mut outage: Option<std::time::Instant> = None;
    while let Some(message) = pending.front() {
        // One unit a message: on a database one transaction, none of it kept unless all of
        // it was, and no wait for the disk until the flush of the whole batch.
        let kept = fleet
            .store
            .unit(&mut || fleet.ingest(&message.topic, &message.payload))
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "a device message's unit failed");
                false
            });
        if kept {
            done.extend(pending.pop_front());
            if let Some(since) = outage.take() {
                tracing::info!(after = ?since.elapsed(), "the store answers again; storing and acknowledging");
            }
            pause = STORE_RETRY_FIRST;
            continue;
        }
        if let Err(e) = fleet.store.check() {
            if outage.is_none() {
                tracing::error!(error = %e, "the store does not answer; holding messages unacknowledged until it does");
                outage = Some(std::time::Instant::now());
            }
            if stored.is_closed() {
                return None;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(STORE_RETRY_MAX);
            continue;
        }
        pending.pop_front();
    }
    Some(done)
}

/// The first pause before storing again while the store does not answer...
const STORE_RETRY_FIRST: Duration = Duration::from_millis(100);
/// ...doubling up to this.
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// Runs the fleet's MQTT client until `shutdown`; `subscribed` turns true once the broker has
/// acknowledged the subscriptions.
pub async fn run(
    fleet: Arc<Fleet>,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    subscribed: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut mqtt: Session<()> = Session::new(session_options(&fleet));
    let (ingest_tx, ingest_rx) = mpsc::channel::<Publish>(INGEST_QUEUE);
    let (stored_tx, mut stored_rx) = mpsc::unbounded_channel();
    let worker = tokio::task::spawn_blocking({
        let fleet = Arc::clone(&fleet);
        move || ingest_worker(fleet, ingest_rx, stored_tx)
    });
    let mut backlog: VecDeque<Outbound> = VecDeque::new();
    // Messages stored and not yet acknowledged (the request queue was full).
    let mut acks: VecDeque<Publish> = VecDeque::new();
    // Messages the worker had no room for yet, in arrival order. The broker sends new
    // messages within its window of unacknowledged ones (the fleet acknowledges only what it
    // stored), but not the retained ones it sends on a subscription; the connection is still
    // served meanwhile (pings, acknowledgements, publishes), so a slow store never looks like
    // a dead fleet to the broker. Past WAITING_MAX_BYTES nothing more is read.
    let mut waiting: VecDeque<Publish> = VecDeque::new();
    let mut waiting_bytes = 0usize;
    let size = |m: &Publish| m.topic.len() + m.payload.len();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = stored_rx.recv() => {
                acks.extend(done);
            }
            permit = ingest_tx.reserve(), if !waiting.is_empty() => {
                if let (Ok(permit), Some(message)) = (permit, waiting.pop_front()) {
                    waiting_bytes = waiting_bytes.saturating_sub(size(&message));
                    permit.send(message);
                }
            }
            event = mqtt.next(), if waiting_bytes < WAITING_MAX_BYTES => match event {
                SessionEvent::Connected => {
                    tracing::info!("fleet connected to the broker");
                    fleet.metrics.broker_connected.store(true, Ordering::Relaxed);
                }
                SessionEvent::Subscribed => {
                    // Subscribed: say so, and (re)publish every desired state in case the
                    // broker lost its retained messages.
                    if let Err(e) = mqtt.publish(fleet_presence_topic(&fleet.replica), Presence::to_vec(true), true, None) {
                        tracing::warn!(error = %e, "cannot announce the fleet's presence");
                    }
                    subscribed.send_replace(true);
                    if fleet.leads() {
                        match fleet.store.all_desired() {
                            Ok(all) => backlog.extend(all.into_iter().filter_map(|desired| {
                                match desired.envelope.to_vec() {
                                    Ok(payload) => Some(Outbound { topic: Topics::new(&desired.device).name(Topic::Desired), payload, retain: true }),
                                    Err(e) => {
                                        tracing::error!(device = %desired.device, error = %e, "cannot republish a desired state");
                                        None
                                    }
                                }
                            })),
                            Err(e) => tracing::error!(error = %e, "cannot read desired states"),
                        }
                    }
                }
                SessionEvent::Message(message) if message.topic == fleet_presence_topic(&fleet.replica) => {
                    // Devices hold their telemetry while no replica says online: anyone on the
                    // broker could halt it with one retained "offline" here.
                    if !Presence::is_online(&message.payload) && *subscribed.borrow() {
                        tracing::warn!("the fleet's presence was overwritten; announcing it again");
                        if let Err(e) = mqtt.publish(fleet_presence_topic(&fleet.replica), Presence::to_vec(true), true, None) {
                            tracing::warn!(error = %e, "cannot announce the fleet's presence");
                        }
                    }
                    acks.push_back(message);
                }
                SessionEvent::Message(message) => {
                    // Acknowledged only once stored: what could not be stored is not
                    // acknowledged, and the broker delivers it again.
                    if !waiting.is_empty() {
                        // Behind others: order is kept.
                        waiting_bytes += size(&message);
                        waiting.push_back(message);
                    } else {
                        match ingest_tx.try_send(message) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(message)) => {
                                waiting_bytes += size(&message);
                                waiting.push_back(message);
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => {
                                tracing::error!("the store worker stopped");
                                break;
                            }
                        }
                    }
                }
                SessionEvent::Acked(()) => {}
                SessionEvent::Disconnected { error, was_connected, .. } => {
                    if was_connected {
                        tracing::warn!(%error, "fleet lost the broker; retrying");
                    } else {
                        tracing::debug!(%error, "broker unreachable");
                    }
                    fleet.metrics.broker_connected.store(false, Ordering::Relaxed);
                    subscribed.send_replace(false);
                    // The broker delivers what was not acknowledged again, on the next
                    // connection; acknowledging these there would name other messages.
                    waiting.clear();
                    waiting_bytes = 0;
                    acks.clear();
                }
            },
            Some(message) = outbound.recv(), if backlog.len() < BACKLOG => {
                backlog.push_back(message);
            }
            // Room in the request queue comes as the event loop sends: try again shortly even
            // when nothing arrives.
            _ = tokio::time::sleep(Duration::from_millis(20)), if mqtt.is_connected() && (!acks.is_empty() || !backlog.is_empty()) => {}
        }
        // Acknowledgements first, and none lost: one dropped for a full request queue would
        // hold a slot of the broker's in-flight window for the rest of the connection (with
        // Mosquitto's 20 by default, 20 of them stop delivery to the fleet altogether).
        while let Some(message) = acks.front() {
            if !mqtt.is_connected() {
                // Unacknowledged on a lost connection: the broker delivers them again.
                acks.clear();
                break;
            }
            if mqtt.ack(message).is_err() {
                break;
            }
            acks.pop_front();
        }
        // Never block the loop on a full request queue: what does not fit waits here. And
        // never fill the client's window of unacknowledged publishes: rumqttc stops taking
        // requests when it is full, acknowledgements included, and a broker that holds its
        // PUBACKs while the fleet owes it acknowledgements (rumqttd does) then waits forever
        // (a deployment to 1,000 devices on the embedded broker did, until this bound).
        while let Some(message) = backlog.pop_front() {
            if !mqtt.is_connected() || mqtt.tagged_in_flight() >= MAX_PUBLISHES_IN_FLIGHT {
                backlog.push_front(message);
                break;
            }
            let Outbound {
                topic,
                payload,
                retain,
            } = message;
            if let Err(e) = mqtt.publish(topic.clone(), payload.clone(), retain, Some(())) {
                tracing::debug!(error = %e, "publish queue full; retrying");
                backlog.push_front(Outbound {
                    topic,
                    payload,
                    retain,
                });
                break;
            }
        }
    }
    drop(ingest_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), worker).await;
    mqtt.close(Some((
        fleet_presence_topic(&fleet.replica),
        Presence::to_vec(false),
    )))
    .await;
}
