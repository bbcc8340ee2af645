//! The fleet's MQTT client: keeps the device registry, stores telemetry and events once each,
//! and publishes signed desired states (retained).
//!
//! Presence and reported state are plain subscriptions (every replica keeps the whole
//! registry); telemetry and events are shared subscriptions, so replicas split that load. The
//! fleet announces its own presence (retained, with an offline last will) only after its
//! subscriptions are acknowledged: devices hold telemetry until they see it, so a restarted
//! broker never swallows records published before the fleet subscribed again.

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::{Presence, ReportedState, TelemetryBatch, Topics, fleet_presence_topic};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use crate::Fleet;
use crate::store::{Stream, now_secs};

/// A message for the MQTT task to publish.
#[derive(Debug)]
pub struct Outbound {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Retained or not.
    pub retain: bool,
}

fn options(fleet: &Fleet) -> MqttOptions {
    let mut options = MqttOptions::new(
        format!("outpost-fleet-{}", fleet.replica),
        fleet.broker.0.clone(),
        fleet.broker.1,
    );
    options
        .set_keep_alive(Duration::from_secs(15))
        // A persistent session: a broker with persistence queues QoS 1 messages for the fleet
        // while it is away.
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_last_will(LastWill::new(
            fleet_presence_topic(&fleet.replica),
            Presence::to_vec(false),
            QoS::AtLeastOnce,
            true,
        ));
    if let Some((user, password)) = &fleet.broker_login {
        options.set_credentials(user.clone(), password.clone());
    }
    options
}

fn subscriptions() -> Vec<SubscribeFilter> {
    vec![
        SubscribeFilter::new(
            format!("{}/+/status", outpost_proto::PREFIX),
            QoS::AtLeastOnce,
        ),
        SubscribeFilter::new(
            format!("{}/+/reported", outpost_proto::PREFIX),
            QoS::AtLeastOnce,
        ),
        SubscribeFilter::new(Topics::fleet_subscription("telemetry"), QoS::AtLeastOnce),
        SubscribeFilter::new(Topics::fleet_subscription("events"), QoS::AtLeastOnce),
    ]
}

/// Runs the fleet's MQTT client until `shutdown`.
pub async fn run(
    fleet: Arc<Fleet>,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (client, mut eventloop) = AsyncClient::new(options(&fleet), 1024);
    let mut connected = false;
    let mut backlog = std::collections::VecDeque::new();
    let mut backoff = Duration::from_millis(250);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                if connected {
                    let _ = client.try_publish(fleet_presence_topic(&fleet.replica), QoS::AtLeastOnce, true, Presence::to_vec(false));
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(ev) = eventloop.poll().await {
                            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) { break; }
                        }
                    }).await;
                }
                return;
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!("fleet connected to the broker");
                    connected = true;
                    backoff = Duration::from_millis(250);
                    fleet.metrics.broker_connected.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = client.try_subscribe_many(subscriptions()) {
                        tracing::error!(error = %e, "cannot subscribe");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    // Subscribed: say so, and (re)publish every desired state in case the
                    // broker lost its retained messages.
                    let _ = client.try_publish(fleet_presence_topic(&fleet.replica), QoS::AtLeastOnce, true, Presence::to_vec(true));
                    let desired = if fleet.ingest_only { Ok(Vec::new()) } else { fleet.store.all_desired() };
                    match desired {
                        Ok(all) => {
                            // From a task of its own: the event loop must keep turning while
                            // thousands of these queue up.
                            let client = client.clone();
                            tokio::spawn(async move {
                                for desired in all {
                                    let encoded = Topics::new(&desired.device)
                                        .and_then(|topics| Ok((topics, desired.envelope.to_vec()?)));
                                    match encoded {
                                        Ok((topics, payload)) => {
                                            let _ = client.publish(topics.desired(), QoS::AtLeastOnce, true, payload).await;
                                        }
                                        Err(e) => tracing::error!(device = %desired.device, error = %e, "cannot republish a desired state"),
                                    }
                                }
                            });
                        }
                        Err(e) => tracing::error!(error = %e, "cannot read desired states"),
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // Acknowledged only once stored: what could not be stored is not
                    // acknowledged, and the broker delivers it again.
                    if handle(&fleet, &p.topic, &p.payload)
                        && let Err(e) = client.try_ack(&p)
                    {
                        tracing::warn!(error = %e, "cannot acknowledge");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected {
                        tracing::warn!(error = %e, "fleet lost the broker; retrying");
                    } else {
                        tracing::debug!(error = %e, "broker unreachable");
                    }
                    connected = false;
                    fleet.metrics.broker_connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            },
            Some(message) = outbound.recv(), if connected && backlog.len() < 1024 => {
                backlog.push_back(message);
            }
        }
        // Never block the event loop on a full request queue: what does not fit waits here.
        while let Some(message) = backlog.pop_front().filter(|_| connected) {
            if let Err(e) = client.try_publish(
                message.topic.clone(),
                QoS::AtLeastOnce,
                message.retain,
                message.payload.clone(),
            ) {
                tracing::debug!(error = %e, "publish queue full; retrying");
                backlog.push_front(message);
                break;
            }
        }
    }
}

/// Applies one message from a device to the store; false when it could not be stored.
/// (Malformed messages count as handled: delivering them again would not help.)
pub(crate) fn handle(fleet: &Fleet, topic: &str, payload: &[u8]) -> bool {
    let Some((device, leaf)) = Topics::parse(topic) else {
        return true;
    };
    if payload.is_empty() {
        // A cleared retained message (a forgotten device): nothing to record.
        return true;
    }
    let now = now_secs();
    let result = match leaf {
        "status" if Presence::is_online(payload) => fleet
            .store
            .update_device(device, |d| {
                d.online = true;
                d.last_seen = Some(now);
            })
            .map(|_| ()),
        // Offline never registers a device: a forgotten device's last will can arrive after
        // it was forgotten. Its retained "offline" is cleared instead of kept.
        "status" => fleet
            .store
            .update_known_device(device, |d| {
                d.online = false;
                d.last_seen = Some(now);
            })
            .map(|known| {
                if !known && !fleet.ingest_only {
                    fleet.clear_retained(topic);
                }
            }),
        "reported" => match serde_json::from_slice::<ReportedState>(payload) {
            Ok(state) if state.device == device => fleet
                .store
                .update_device(device, |d| {
                    d.reported = Some(state);
                    d.last_seen = Some(now);
                })
                .map(|_| ()),
            Ok(_) => {
                tracing::warn!(%device, "reported state names another device; ignored");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%device, error = %e, "malformed reported state; ignored");
                Ok(())
            }
        },
        "telemetry" | "events" => {
            let stream = if leaf == "events" {
                Stream::Events
            } else {
                Stream::Telemetry
            };
            match serde_json::from_slice::<TelemetryBatch>(payload) {
                Ok(batch) if batch.device == device => {
                    store_batch(fleet, stream, device, &batch, now)
                }
                Ok(_) => {
                    tracing::warn!(%device, "batch names another device; ignored");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(%device, error = %e, "malformed batch; ignored");
                    Ok(())
                }
            }
        }
        _ => Ok(()),
    };
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(%device, error = %e, "cannot store a device message");
            false
        }
    }
}

fn store_batch(
    fleet: &Fleet,
    stream: Stream,
    device: &str,
    batch: &TelemetryBatch,
    now: u64,
) -> crate::Result<()> {
    let mut new = 0u64;
    let mut duplicates = 0u64;
    for record in &batch.records {
        if fleet.store.put_record(stream, device, record)? {
            new += 1;
        } else {
            duplicates += 1;
        }
    }
    // Stored before the broker hears the acknowledgement.
    fleet.store.flush()?;
    let last_event = (stream == Stream::Events)
        .then(|| batch.records.last().map(|r| r.body.clone()))
        .flatten();
    fleet.store.update_device(device, |d| {
        d.records += new;
        d.duplicates += duplicates;
        d.dropped = batch.dropped;
        d.last_seen = Some(now);
        if last_event.is_some() {
            d.last_event = last_event;
        }
    })?;
    fleet.metrics.record_batch(new, duplicates);
    Ok(())
}
