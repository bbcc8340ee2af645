//! The fleet agent: keeps a device in sync with its fleet over MQTT while it serves locally.
//!
//! - One task owns the MQTT connection. It connects with a last will (offline, retained),
//!   publishes presence and the reported state on every connect, subscribes to the device's
//!   desired state and to the fleet's presence (again after every reconnect: sessions are clean),
//!   and backs off while the broker is unreachable.
//! - Desired states are checked against the fleet key ([`SignedDesired::open`]): a newer
//!   generation is stored and handed to the reconciler, a duplicate is a no-op, an older, expired,
//!   unsigned or wrongly signed one is refused and reported as an event.
//! - The reconciler downloads (resumable, size-capped, hash-checked), verifies, installs and
//!   activates what the desired state names, retrying transient failures with backoff.
//! - Telemetry and events go to the durable [`outbox::Outbox`] first; batches are published
//!   QoS 1 while a fleet replica is online, and records are deleted only when the broker
//!   acknowledges their batch. Anything unacknowledged is sent again after a reconnect, and the
//!   fleet de-duplicates on (device, sequence number).

pub mod download;
pub mod outbox;
mod tracker;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::{
    DesiredState, FLEET_PRESENCE_FILTER, PROTOCOL_VERSION, Presence, ReportedState, SignedDesired,
    TelemetryBatch, Topics, Verdict,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde_json::json;
use tokio::sync::{Notify, watch};

use crate::config::FleetConfig;
use crate::device::Device;
use crate::error::{HostError, Result};
use download::{Artifact, DownloadError};
use outbox::{Kind, Outbox};
use tracker::{Tracked, Tracker};

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

const ACCEPTED_KEY: &[u8] = b"desired.accepted";
const RECONCILED_KEY: &[u8] = b"desired.reconciled";
const DESIRED_KEY: &[u8] = b"desired.state";
const LAST_ERROR_KEY: &[u8] = b"last_error";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn get_u64(tree: &sled::Tree, key: &[u8]) -> Option<u64> {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

/// A running agent; dropping it does not stop it (the shutdown signal does).
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    mqtt: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    device: Arc<Device>,
    fleet: FleetConfig,
    topics: Topics,
    outbox: Outbox,
    meta: sled::Tree,
    last_error: Mutex<Option<String>>,
    /// A transient failure is being retried.
    retrying: std::sync::atomic::AtomicBool,
    reported_changed: Notify,
    outbox_changed: Notify,
    started: Instant,
    downloads: PathBuf,
    max_bundle_bytes: u64,
}

/// A failed reconcile and whether retrying can help.
#[derive(Debug)]
struct Failure {
    message: String,
    transient: bool,
}

impl Agent {
    /// Starts the agent's tasks on the current tokio runtime. They run until `shutdown`
    /// becomes `true`, and then say offline and disconnect.
    pub fn start(
        device: Arc<Device>,
        fleet: FleetConfig,
        downloads: PathBuf,
        max_bundle_bytes: u64,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        let topics =
            Topics::new(&fleet.device_id).map_err(|e| HostError::Config(format!("fleet: {e}")))?;
        let meta = device.state().tree("agent")?;
        let outbox = Outbox::open(
            device.state().tree("outbox")?,
            meta.clone(),
            fleet.outbox_quota_bytes,
        )?;
        let last_error = meta
            .get(LAST_ERROR_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        let shared = Arc::new(Shared {
            device,
            fleet,
            topics,
            outbox,
            meta,
            last_error: Mutex::new(last_error),
            retrying: std::sync::atomic::AtomicBool::new(false),
            reported_changed: Notify::new(),
            outbox_changed: Notify::new(),
            started: Instant::now(),
            downloads,
            max_bundle_bytes,
        });
        // A desired state accepted before a restart and not finished is picked up at once,
        // with or without a broker.
        let pending = shared.unfinished_desired();
        let (desired_tx, desired_rx) = watch::channel(pending);
        let mqtt = tokio::spawn(mqtt_task(Arc::clone(&shared), desired_tx, shutdown.clone()));
        tokio::spawn(reconcile_task(
            Arc::clone(&shared),
            desired_rx,
            shutdown.clone(),
        ));
        tokio::spawn(telemetry_task(Arc::clone(&shared), shutdown));
        tracing::info!(
            device = %shared.fleet.device_id,
            broker = %format!("{}:{}", shared.fleet.broker_host, shared.fleet.broker_port),
            "fleet agent started"
        );
        Ok(Self { shared, mqtt })
    }

    /// Waits (up to a few seconds) for the MQTT task to say offline after shutdown.
    pub async fn stopped(self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.mqtt).await;
        let _ = self.shared.device.state().tree("agent").map(|t| t.flush());
    }
}

impl Shared {
    fn unfinished_desired(&self) -> Option<DesiredState> {
        let accepted = get_u64(&self.meta, ACCEPTED_KEY)?;
        if get_u64(&self.meta, RECONCILED_KEY) >= Some(accepted) {
            return None;
        }
        let bytes = self.meta.get(DESIRED_KEY).ok().flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = error.clone();
        }
        let _ = match error {
            Some(e) => self.meta.insert(LAST_ERROR_KEY, e.as_bytes()).map(|_| ()),
            None => self.meta.remove(LAST_ERROR_KEY).map(|_| ()),
        };
        self.reported_changed.notify_one();
    }

    fn set_retrying(&self, retrying: bool) {
        self.retrying
            .store(retrying, std::sync::atomic::Ordering::Relaxed);
    }

    fn event(&self, body: serde_json::Value) {
        match self.outbox.push(Kind::Event, body) {
            Ok(_) => self.outbox_changed.notify_one(),
            Err(e) => tracing::error!(error = %e, "cannot write an event to the outbox"),
        }
    }

    fn reported(&self) -> ReportedState {
        let mut active = std::collections::BTreeMap::new();
        if let Ok(status) = self.device.status() {
            for model in status {
                if let Some(version) = model.active {
                    active.insert(model.name, version);
                }
            }
        }
        let installed = self
            .device
            .installed()
            .map(|records| {
                records
                    .into_iter()
                    .map(|r| format!("{}@{}", r.name, r.version))
                    .collect()
            })
            .unwrap_or_default();
        ReportedState {
            v: PROTOCOL_VERSION,
            device: self.fleet.device_id.clone(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            generation: get_u64(&self.meta, RECONCILED_KEY),
            accepted_generation: get_u64(&self.meta, ACCEPTED_KEY),
            active,
            installed,
            tags: self.fleet.tags.clone(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            retrying: self.retrying.load(std::sync::atomic::Ordering::Relaxed),
            outbox_pending: self.outbox.pending(),
            outbox_dropped: self.outbox.dropped(),
            telemetry_interval_ms: Some(self.fleet.telemetry_interval.as_millis() as u64),
        }
    }

    /// Checks a received desired state; returns what the reconciler should work on.
    fn on_desired(&self, payload: &[u8]) -> Option<DesiredState> {
        let accepted = get_u64(&self.meta, ACCEPTED_KEY);
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
                let stored = serde_json::to_vec(&state)
                    .map_err(|e| HostError::Corrupt(e.to_string()))
                    .and_then(|bytes| {
                        self.meta.insert(DESIRED_KEY, bytes)?;
                        self.meta
                            .insert(ACCEPTED_KEY, &state.generation.to_be_bytes())?;
                        self.meta.flush()?;
                        Ok(())
                    });
                if let Err(e) = stored {
                    tracing::error!(error = %e, "cannot store the desired state");
                    return None;
                }
                tracing::info!(generation = state.generation, "desired state accepted");
                // The last error belonged to an older generation.
                self.set_retrying(false);
                self.set_last_error(None);
                self.event(json!({
                    "event": "desired_accepted",
                    "generation": state.generation,
                }));
                self.reported_changed.notify_one();
                Some(state)
            }
            Ok(Verdict::Duplicate) => self.unfinished_desired(),
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

    fn refuse(&self, reason: &str) {
        tracing::warn!(%reason, "desired state refused");
        self.event(json!({ "event": "desired_refused", "reason": reason }));
        self.set_last_error(Some(format!("refused desired state: {reason}")));
    }

    /// Brings the device to `state`. Blocking (downloads, installs).
    fn reconcile(&self, state: &DesiredState) -> std::result::Result<(), Failure> {
        let mut first_failure = None;
        for deployment in &state.deployments {
            if let Err(failure) = self.apply_one(state.generation, deployment) {
                tracing::warn!(
                    model = %deployment.model,
                    version = %deployment.version,
                    error = %failure.message,
                    "deployment failed"
                );
                self.event(json!({
                    "event": "deployment_failed",
                    "generation": state.generation,
                    "model": deployment.model,
                    "version": deployment.version,
                    "error": failure.message,
                    "will_retry": failure.transient,
                }));
                first_failure.get_or_insert(failure);
            }
        }
        if let Some(failure) = first_failure {
            self.set_retrying(failure.transient);
            self.set_last_error(Some(failure.message.clone()));
            return Err(failure);
        }
        self.set_retrying(false);
        if get_u64(&self.meta, RECONCILED_KEY) < Some(state.generation) {
            if let Err(e) = self
                .meta
                .insert(RECONCILED_KEY, &state.generation.to_be_bytes())
                .and_then(|_| self.meta.flush().map(|_| ()))
            {
                tracing::error!(error = %e, "cannot record the reconciled generation");
            }
            self.event(json!({ "event": "reconciled", "generation": state.generation }));
        }
        self.set_last_error(None);
        Ok(())
    }

    fn apply_one(
        &self,
        generation: u64,
        d: &outpost_proto::Deployment,
    ) -> std::result::Result<(), Failure> {
        let permanent = |message: String| Failure {
            message,
            transient: false,
        };
        let host = |e: HostError| permanent(format!("{} {}: {e}", d.model, d.version));
        let active = self
            .device
            .status()
            .map_err(host)?
            .into_iter()
            .find(|m| m.name == d.model)
            .and_then(|m| m.active);
        if let Some(record) = self
            .device
            .state()
            .record(&d.model, &d.version)
            .map_err(host)?
        {
            if record.digest != d.digest {
                return Err(permanent(format!(
                    "{} {} is installed with digest {}, the desired state names {}",
                    d.model, d.version, record.digest, d.digest
                )));
            }
            if active.as_deref() == Some(d.version.as_str()) {
                return Ok(());
            }
            self.device.activate(&d.model, &d.version).map_err(host)?;
        } else {
            tracing::info!(model = %d.model, version = %d.version, url = %d.url, size = d.size, "downloading");
            self.event(json!({
                "event": "downloading",
                "generation": generation,
                "model": d.model,
                "version": d.version,
                "size": d.size,
            }));
            let artifact = Artifact {
                url: &d.url,
                digest: &d.digest,
                size: d.size,
            };
            let agent = download::agent();
            let path = download::fetch(&agent, &artifact, self.max_bundle_bytes, &self.downloads)
                .map_err(|e: DownloadError| Failure {
                transient: e.is_transient(),
                message: format!("{} {}: {e}", d.model, d.version),
            })?;
            let bytes = std::fs::read(&path).map_err(|e| Failure {
                message: format!("cannot read the download: {e}"),
                transient: true,
            })?;
            let installed = self.device.install_and_activate(&bytes);
            let _ = std::fs::remove_file(&path);
            installed.map_err(host)?;
        }
        tracing::info!(model = %d.model, version = %d.version, generation, "activated");
        self.event(json!({
            "event": "activated",
            "generation": generation,
            "model": d.model,
            "version": d.version,
            "digest": d.digest,
        }));
        self.reported_changed.notify_one();
        Ok(())
    }

    fn telemetry_record(&self) -> serde_json::Value {
        let (cpu_seconds, rss_bytes) = process_usage();
        json!({
            "uptime_s": self.started.elapsed().as_secs(),
            "runtime_version": env!("CARGO_PKG_VERSION"),
            "cpu_seconds": cpu_seconds,
            "rss_bytes": rss_bytes,
            "disk_bytes": self.device.state().size_on_disk(),
            "models": self.device.metrics.snapshot(),
        })
    }
}

/// CPU seconds used and resident memory of this process, from `/proc` (zeros elsewhere).
fn process_usage() -> (f64, u64) {
    // Field 14 and 15 of /proc/self/stat: user and system time in USER_HZ ticks (100 on Linux).
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

async fn telemetry_task(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.fleet.telemetry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {
                let record = shared.telemetry_record();
                match shared.outbox.push(Kind::Telemetry, record) {
                    Ok(_) => shared.outbox_changed.notify_one(),
                    Err(e) => tracing::error!(error = %e, "cannot write telemetry to the outbox"),
                }
            }
        }
    }
}

async fn reconcile_task(
    shared: Arc<Shared>,
    mut desired: watch::Receiver<Option<DesiredState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    'next: loop {
        let state = desired.borrow_and_update().clone();
        if let Some(state) = state {
            let mut backoff = Duration::from_secs(1);
            loop {
                let worker = Arc::clone(&shared);
                let job = state.clone();
                let result = tokio::task::spawn_blocking(move || worker.reconcile(&job)).await;
                match result {
                    Ok(Ok(())) => break,
                    Ok(Err(failure)) if failure.transient => {
                        tracing::info!(retry_in = ?backoff, "reconcile will be retried");
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            changed = desired.changed() => {
                                if changed.is_err() { return; }
                                continue 'next;
                            }
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                    Ok(Err(_)) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reconcile task failed");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = desired.changed() => if changed.is_err() { return },
        }
    }
}

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
        shared.fleet.broker_host.clone(),
        shared.fleet.broker_port,
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

async fn mqtt_task(
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
