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
//! over a bounded channel (stopping its reads from the broker while the worker is behind), the
//! worker stores whatever has queued up, flushes once, and returns the messages it stored; only
//! then does the loop acknowledge them, in the order they arrived.

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
/// Messages stored per flush, at most.
const INGEST_BATCH: usize = 256;
/// Desired states and cleared messages waiting for room in the MQTT queue, at most.
const BACKLOG: usize = 1024;

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
        let mut done: Vec<Publish> = batch
            .into_iter()
            .filter(|m| fleet.ingest(&m.topic, &m.payload))
            .collect();
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
    // A message the worker had no room for: nothing more is read until it is handed over.
    let mut waiting: Option<Publish> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = stored_rx.recv() => {
                for message in &done {
                    if let Err(e) = mqtt.ack(message) {
                        tracing::warn!(error = %e, "cannot acknowledge");
                    }
                }
            }
            permit = ingest_tx.reserve(), if waiting.is_some() => {
                if let (Ok(permit), Some(message)) = (permit, waiting.take()) {
                    permit.send(message);
                }
            }
            event = mqtt.next(), if waiting.is_none() => match event {
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
                    if !fleet.ingest_only {
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
                    if let Err(e) = mqtt.ack(&message) {
                        tracing::warn!(error = %e, "cannot acknowledge");
                    }
                }
                SessionEvent::Message(message) => {
                    // Acknowledged only once stored: what could not be stored is not
                    // acknowledged, and the broker delivers it again.
                    match ingest_tx.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(message)) => waiting = Some(message),
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            tracing::error!("the store worker stopped");
                            break;
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
                }
            },
            Some(message) = outbound.recv(), if backlog.len() < BACKLOG => {
                backlog.push_back(message);
            }
        }
        // Never block the loop on a full request queue: what does not fit waits here.
        while let Some(message) = backlog.pop_front() {
            if !mqtt.is_connected() {
                backlog.push_front(message);
                break;
            }
            let Outbound {
                topic,
                payload,
                retain,
            } = message;
            if let Err(e) = mqtt.publish(topic.clone(), payload.clone(), retain, None) {
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
