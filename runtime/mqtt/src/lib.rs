//! Outpost's MQTT session, shared by the fleet agent and the fleet manager. Owns: connecting
//! with a last will, backoff while the broker is away, re-subscribing after every connect, the
//! clean goodbye, and matching each PUBACK to the publish it acknowledges. Never imports: the
//! protocol's message types, a store, or either side's logic; it moves topics and bytes.
//!
//! A [`Session`] wraps rumqttc's client and event loop. Its owner drives it with
//! [`Session::next`] inside its own `select!` (the call is cancel-safe) and hears
//! [`SessionEvent`]s: connected, subscribed, a message, a tagged publish acknowledged, or the
//! connection lost (with every tag that will now never be acknowledged).
//!
//! Publishes can carry a tag (the agent tags a telemetry batch with its outbox sequence
//! numbers). rumqttc reports packet ids in queue order and holds a publish back when its
//! packet id collides with one still unacknowledged; [`tracker`] keeps the tags in step with
//! that, so one batch's PUBACK never deletes another batch's records.

mod tracker;

use std::time::Duration;

use rumqttc::{
    AsyncClient, ClientError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    Request, SubscribeFilter,
};
use tokio::time::Instant;

pub use rumqttc::Publish;

use tracker::Tracker;

/// How a [`Session`] connects. Every publish and subscription is QoS 1.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The MQTT client id.
    pub client_id: String,
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// User name and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
    /// Retained message the broker publishes when the connection dies: (topic, payload).
    pub will: (String, Vec<u8>),
    /// Topic filters subscribed after every connect.
    pub subscriptions: Vec<String>,
    /// A clean session (the broker forgets this client between connections) or not.
    pub clean_session: bool,
    /// Messages are acknowledged by the owner ([`Session::ack`]), once handled.
    pub manual_acks: bool,
    /// Largest packet either way.
    pub max_packet: usize,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// First retry delay after a failure; it doubles up to `max_backoff`.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Requests rumqttc queues before [`Session::publish`] reports the queue full.
    pub queue: usize,
    /// TLS to the broker (`mqtts://`), with this client configuration; plain TCP without.
    pub tls: Option<std::sync::Arc<rumqttc::tokio_rustls::rustls::ClientConfig>>,
}

impl SessionOptions {
    /// Options with Outpost's defaults: clean session, automatic acknowledgements, 1 MiB
    /// packets, 15 s keep-alive, backoff from 250 ms to 30 s, a queue of 64.
    pub fn new(
        client_id: impl Into<String>,
        host: impl Into<String>,
        port: u16,
        will: (String, Vec<u8>),
    ) -> Self {
        Self {
            client_id: client_id.into(),
            host: host.into(),
            port,
            credentials: None,
            will,
            subscriptions: Vec::new(),
            clean_session: true,
            manual_acks: false,
            max_packet: 1 << 20,
            keep_alive: Duration::from_secs(15),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            queue: 64,
            tls: None,
        }
    }

    fn mqtt(&self) -> MqttOptions {
        let mut options = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_session(self.clean_session)
            .set_manual_acks(self.manual_acks)
            .set_max_packet_size(self.max_packet, self.max_packet)
            .set_last_will(LastWill::new(
                self.will.0.clone(),
                self.will.1.clone(),
                QoS::AtLeastOnce,
                true,
            ));
        if let Some((user, password)) = &self.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(tls) = &self.tls {
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::clone(tls)),
            ));
        }
        options
    }
}

/// What happened on a [`Session`].
#[derive(Debug)]
pub enum SessionEvent<T> {
    /// The broker accepted the connection; the subscriptions are requested.
    Connected,
    /// The broker acknowledged a subscription request.
    Subscribed,
    /// A message arrived (with manual acknowledgements: acknowledge it with [`Session::ack`]).
    Message(Publish),
    /// The broker acknowledged the publish that carried this tag.
    Acked(T),
    /// The connection failed or was lost; the session retries after a backoff.
    Disconnected {
        /// What went wrong.
        error: String,
        /// Whether the session was connected (false: a connection attempt failed).
        was_connected: bool,
        /// Tags of publishes that will now never be acknowledged.
        unacked: Vec<T>,
    },
}

/// Why a publish was not queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Not connected: nothing is queued while the broker is away.
    #[error("not connected to the broker")]
    NotConnected,
    /// rumqttc's request queue is full; try again after the next event.
    #[error("the MQTT request queue is full")]
    QueueFull,
}

/// One MQTT connection, kept up until [`Session::close`]. `T` tags publishes whose PUBACK the
/// owner wants to hear about.
pub struct Session<T> {
    options: SessionOptions,
    client: AsyncClient,
    eventloop: EventLoop,
    tracker: Tracker<T>,
    connected: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

impl<T> std::fmt::Debug for Session<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("client_id", &self.options.client_id)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl<T> Session<T> {
    /// A session that connects on the first [`Session::next`].
    pub fn new(options: SessionOptions) -> Self {
        let (client, eventloop) = AsyncClient::new(options.mqtt(), options.queue.max(1));
        let backoff = options.min_backoff;
        Self {
            options,
            client,
            eventloop,
            tracker: Tracker::default(),
            connected: false,
            backoff,
            retry_at: None,
        }
    }

    /// Whether the broker has accepted this connection.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Tagged publishes queued or sent and not yet acknowledged.
    pub fn tagged_in_flight(&self) -> usize {
        self.tracker.tagged_in_flight()
    }

    /// Gives up on tagged publishes sent longer than `timeout` ago and unacknowledged, when
    /// there is one: returns all sent tags (to send again), or nothing.
    pub fn expire(&mut self, timeout: Duration) -> Vec<T> {
        if self.tracker.any_expired(timeout) {
            self.tracker.forget_sent()
        } else {
            Vec::new()
        }
    }

    /// Queues a QoS 1 publish. With a tag, [`SessionEvent::Acked`] reports its PUBACK.
    pub fn publish(
        &mut self,
        topic: impl Into<String>,
        payload: Vec<u8>,
        retain: bool,
        tag: Option<T>,
    ) -> Result<(), PublishError> {
        if !self.connected {
            return Err(PublishError::NotConnected);
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                self.tracker.queued(tag);
                Ok(())
            }
            Err(_) => Err(PublishError::QueueFull),
        }
    }

    /// Acknowledges a message (with [`SessionOptions::manual_acks`]).
    pub fn ack(&self, message: &Publish) -> Result<(), PublishError> {
        self.client
            .try_ack(message)
            .map_err(|_: ClientError| PublishError::QueueFull)
    }

    /// The next event. Cancel-safe: dropping the future loses nothing, so it can sit in a
    /// `select!` beside other work. While the broker is away it waits out the backoff first.
    pub async fn next(&mut self) -> SessionEvent<T> {
        loop {
            if let Some(at) = self.retry_at {
                tokio::time::sleep_until(at).await;
                self.retry_at = None;
            }
            let event = self.eventloop.poll().await;
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.connected = true;
                    self.backoff = self.options.min_backoff;
                    // A resumed session sends the previous one's publishes first.
                    let replays = if ack.session_present {
                        self.eventloop
                            .pending
                            .iter()
                            .filter(|r| matches!(r, Request::Publish(_)))
                            .count()
                    } else {
                        0
                    };
                    self.tracker.replaying(replays);
                    if !self.options.subscriptions.is_empty() {
                        let filters = self
                            .options
                            .subscriptions
                            .iter()
                            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        if let Err(e) = self.client.try_subscribe_many(filters) {
                            tracing::warn!(error = %e, "cannot subscribe");
                        }
                    }
                    return SessionEvent::Connected;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => return SessionEvent::Subscribed,
                Ok(Event::Incoming(Packet::Publish(p))) => return SessionEvent::Message(p),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(tag) = self.tracker.acked(ack.pkid) {
                        return SessionEvent::Acked(tag);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => self.tracker.sent(pkid),
                Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => self.tracker.held(pkid),
                Ok(_) => {}
                Err(e) => {
                    let was_connected = std::mem::replace(&mut self.connected, false);
                    let unacked = self.tracker.reset();
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(self.options.max_backoff);
                    return SessionEvent::Disconnected {
                        error: e.to_string(),
                        was_connected,
                        unacked,
                    };
                }
            }
        }
    }

    /// Says goodbye: publishes `farewell` (topic, payload; retained) when connected, then
    /// disconnects cleanly, waiting at most two seconds. The last will is not sent.
    pub async fn close(mut self, farewell: Option<(String, Vec<u8>)>) {
        if !self.connected {
            return;
        }
        if let Some((topic, payload)) = farewell {
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload);
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = self.eventloop.poll().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}
