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

impl<T> Drop for Session<T> {
    fn drop(&mut self) {
        if let Some(attempt) = self.connecting.take() {
            attempt.abort();
        }
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
    /// The event loop, except while a connection attempt owns it.
    eventloop: Option<EventLoop>,
    /// The connection attempt under way: it runs as its own task, so an owner's `select!`
    /// that drops [`Session::next`] does not abandon it. On a link whose round trip is longer
    /// than the owner's shortest timer, an attempt inside the future would never finish.
    connecting: Option<tokio::task::JoinHandle<Attempt>>,
    tracker: Tracker<T>,
    connected: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// What a connection attempt hands back: the event loop and its first event.
type Attempt = (EventLoop, Result<Event, rumqttc::ConnectionError>);

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
            eventloop: Some(eventloop),
            connecting: None,
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

    /// The next event. Cancel-safe: dropping the future loses nothing (a connection attempt
    /// goes on in its own task), so it can sit in a `select!` beside other work. While the broker is away it waits out the backoff first.
    pub async fn next(&mut self) -> SessionEvent<T> {
        loop {
            let event = self.poll().await;
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.connected = true;
                    self.backoff = self.options.min_backoff;
                    // A resumed session sends the previous one's publishes first.
                    let replays = match (&self.eventloop, ack.session_present) {
                        (Some(eventloop), true) => eventloop
                            .pending
                            .iter()
                            .filter(|r| matches!(r, Request::Publish(_)))
                            .count(),
                        _ => 0,
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

    /// The next event of the event loop. Cancel-safe: a connection attempt runs as its own
    /// task and is awaited by reference; once connected, rumqttc's `poll` is cancel-safe.
    async fn poll(&mut self) -> Result<Event, rumqttc::ConnectionError> {
        loop {
            if let Some(attempt) = self.connecting.as_mut() {
                let joined = attempt.await;
                self.connecting = None;
                match joined {
                    Ok((eventloop, event)) => {
                        self.eventloop = Some(eventloop);
                        return event;
                    }
                    Err(e) => {
                        // The task panicked: the event loop went with it. A failure like any
                        // other: the caller backs off before the next attempt.
                        self.renew();
                        return Err(rumqttc::ConnectionError::Io(std::io::Error::other(
                            format!("the connection attempt failed: {e}"),
                        )));
                    }
                }
            }
            let Some(eventloop) = self.eventloop.as_mut() else {
                // Neither connecting nor holding the event loop cannot happen; recover anyway.
                self.renew();
                continue;
            };
            if self.connected {
                return eventloop.poll().await;
            }
            if let Some(mut eventloop) = self.eventloop.take() {
                let retry_at = self.retry_at.take();
                self.connecting = Some(tokio::spawn(async move {
                    if let Some(at) = retry_at {
                        tokio::time::sleep_until(at).await;
                    }
                    let event = eventloop.poll().await;
                    (eventloop, event)
                }));
            }
        }
    }

    /// A new client and event loop (what was queued is gone; nothing is connected).
    fn renew(&mut self) {
        let (client, eventloop) = AsyncClient::new(self.options.mqtt(), self.options.queue.max(1));
        self.client = client;
        self.eventloop = Some(eventloop);
        self.connected = false;
    }

    /// Says goodbye: publishes `farewell` (topic, payload; retained) when connected, then
    /// disconnects cleanly, waiting at most two seconds. The last will is not sent.
    pub async fn close(mut self, farewell: Option<(String, Vec<u8>)>) {
        if !self.connected {
            return;
        }
        let Some(eventloop) = self.eventloop.as_mut() else {
            return;
        };
        if let Some((topic, payload)) = farewell {
            let _ = self
                .client
                .try_publish(topic, QoS::AtLeastOnce, true, payload);
        }
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A broker that answers a CONNECT only after `delay`, as one at the far end of a slow
    /// link does; returns its port.
    async fn slow_broker(delay: Duration) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    if socket.read(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    tokio::time::sleep(delay).await;
                    // CONNACK: no session present, accepted.
                    let _ = socket.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                    // Hold the connection open; ignore whatever follows.
                    while socket.read(&mut buf).await.unwrap_or(0) > 0 {}
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_connection_slower_than_the_owners_timers_still_completes() {
        let port = slow_broker(Duration::from_millis(400)).await;
        let options = SessionOptions::new("slow", "127.0.0.1", port, ("will".into(), vec![]));
        let mut session: Session<()> = Session::new(options);
        let mut timer = tokio::time::interval(Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ticks = 0u32;
        loop {
            assert!(Instant::now() < deadline, "never connected ({ticks} ticks)");
            tokio::select! {
                event = session.next() => match event {
                    SessionEvent::Connected => break,
                    SessionEvent::Disconnected { error, .. } => panic!("{error}"),
                    _ => {}
                },
                // The owner's other work: each tick drops the `next` future.
                _ = timer.tick() => ticks += 1,
            }
        }
        assert!(session.is_connected());
        assert!(ticks >= 4, "the timer fired during the attempt: {ticks}");
    }
}
