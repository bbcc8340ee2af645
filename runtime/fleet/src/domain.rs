//! The fleet's domain operations: push, deploy, forget, re-sign, and ingest what devices send.
//! The HTTP API ([`crate::api`]) and the MQTT adapter ([`crate::mqtt`]) call these; nothing here
//! knows about either transport beyond the [`Outbound`] messages it queues for publishing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_proto::{
    DesiredState, DeviceId, PROTOCOL_VERSION, Presence, ReportedState, SignedDesired,
    TelemetryBatch, Topic, Topics,
};
use tokio::sync::mpsc;

use crate::error::{FleetError, Result};
use crate::store::{BundleRecord, DeploymentRecord, DesiredRecord, Put, Store, Stream, now_secs};
use outpost_proto::rest::{DeployRequest, DeployResponse};

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

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct FleetMetrics {
    /// Whether the MQTT client is connected.
    pub broker_connected: AtomicBool,
    /// Records stored.
    pub records: AtomicU64,
    /// Duplicate records discarded.
    pub duplicates: AtomicU64,
    /// Records that differ from one stored under the same (device, seq).
    pub conflicts: AtomicU64,
    /// Artifact bytes served.
    pub artifact_bytes: AtomicU64,
    /// Artifact requests served.
    pub artifact_requests: AtomicU64,
    /// The embedded broker's gate, when the broker is embedded.
    pub gate: std::sync::OnceLock<std::sync::Arc<crate::gate::GateStats>>,
}

impl FleetMetrics {
    pub(crate) fn record_batch(&self, new: u64, duplicates: u64) {
        self.records.fetch_add(new, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    }
}

/// How far ahead of the fleet's clock a record's time may be; later times are taken as now.
pub const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(300);

/// How often a device behind its desired state gets it published again, at most.
pub const REPUBLISH_EVERY: Duration = Duration::from_secs(10);

/// A running fleet: its store, key and settings. Shared by the API and the MQTT adapter.
#[derive(Debug)]
pub struct Fleet {
    /// State.
    pub store: Store,
    /// The desired-state signing key: used to seal desired states, never handed out.
    key: SecretKey,
    /// This replica's name.
    pub replica: String,
    /// Broker host and port.
    pub broker: (String, u16),
    /// The fleet's own broker login, if the broker wants one.
    pub broker_login: Option<(String, String)>,
    /// Base URL of `/artifacts/`.
    pub artifact_base: String,
    /// Bearer token for `/api/v1`.
    pub token: Option<String>,
    /// Trust store for pushed bundles.
    pub trust: Option<TrustStore>,
    /// Validity of desired states.
    pub desired_ttl: Duration,
    /// Largest bundle.
    pub max_bundle_bytes: u64,
    /// Whether this replica only ingests (see [`FleetOptions::ingest_only`]).
    pub ingest_only: bool,
    /// Counters.
    pub metrics: FleetMetrics,
    outbound: mpsc::UnboundedSender<Outbound>,
    /// When each device's desired state was last published again for it to catch up.
    republished: Mutex<HashMap<String, u64>>,
}

/// What a [`Fleet`] is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This replica's name.
    pub replica: String,
    /// Broker host and port.
    pub broker: (String, u16),
    /// The fleet's own broker login, if the broker wants one.
    pub broker_login: Option<(String, String)>,
    /// Base URL of `/artifacts/`.
    pub artifact_base: String,
    /// Bearer token for `/api/v1`.
    pub token: Option<String>,
    /// Trust store for pushed bundles.
    pub trust: Option<TrustStore>,
    /// Validity of desired states.
    pub desired_ttl: Duration,
    /// Largest bundle.
    pub max_bundle_bytes: u64,
    /// Whether this replica only ingests.
    pub ingest_only: bool,
}

impl Fleet {
    /// A fleet over `store`, signing with `key`, queueing what it publishes on `outbound`.
    pub fn new(
        store: Store,
        key: SecretKey,
        settings: Settings,
        outbound: mpsc::UnboundedSender<Outbound>,
    ) -> Self {
        let Settings {
            replica,
            broker,
            broker_login,
            artifact_base,
            token,
            trust,
            desired_ttl,
            max_bundle_bytes,
            ingest_only,
        } = settings;
        Self {
            store,
            key,
            replica,
            broker,
            broker_login,
            artifact_base,
            token,
            trust,
            desired_ttl,
            max_bundle_bytes,
            ingest_only,
            metrics: FleetMetrics::default(),
            outbound,
            republished: Mutex::new(HashMap::new()),
        }
    }

    /// Re-signs (and publishes again) every desired state past half its validity, so devices
    /// that were offline for a while still accept them. Returns how many.
    pub fn refresh_desired(&self) -> usize {
        let now = now_secs();
        let half = self.desired_ttl.as_secs() / 2;
        let Ok(all) = self.store.all_desired() else {
            return 0;
        };
        let mut refreshed = 0;
        for desired in all {
            if desired.expires_at.saturating_sub(now) < half {
                let deployments = desired.deployments.clone();
                match self.set_desired(&desired.device, |_| deployments) {
                    Ok(_) => refreshed += 1,
                    Err(e) => {
                        tracing::error!(device = %desired.device, error = %e, "cannot refresh a desired state");
                    }
                }
            }
        }
        refreshed
    }

    /// Deletes telemetry and events stored before `cutoff` (seconds), at most `limit` of each
    /// stream; returns how many. Call it again while it returns `limit` or more.
    pub fn prune(&self, cutoff: u64, limit: usize) -> Result<usize> {
        Ok(self.store.prune(Stream::Telemetry, cutoff, limit)?
            + self.store.prune(Stream::Events, cutoff, limit)?)
    }

    /// The desired-state signing key's public half (hex), for device configs.
    pub fn public_key(&self) -> String {
        self.key.public().to_hex()
    }

    /// The desired-state signing key's id.
    pub fn key_id(&self) -> &str {
        self.key.id()
    }

    fn owns_deployments(&self) -> Result<()> {
        if self.ingest_only {
            return Err(FleetError::BadRequest(format!(
                "replica `{}` only ingests telemetry (--ingest-only); push and deploy through the primary replica",
                self.replica
            )));
        }
        Ok(())
    }

    /// Accepts a pushed bundle: checks it (and its signature when a trust store is set) and
    /// adds it to the artifact store.
    pub fn push(&self, bytes: &[u8]) -> Result<BundleRecord> {
        self.owns_deployments()?;
        let limits = ReadLimits {
            max_file_bytes: self.max_bundle_bytes,
            max_total_bytes: self.max_bundle_bytes,
            ..ReadLimits::default()
        };
        let bundle = Bundle::read(bytes, &limits)?;
        let signer = bundle.signature().map(|s| s.key_id.clone());
        let manifest = bundle.manifest().clone();
        if let Some(trust) = &self.trust {
            bundle.verify(trust, None)?;
        } else if signer.is_none() {
            return Err(FleetError::Bundle(outpost_bundle::BundleError::Unsigned));
        }
        let record = BundleRecord {
            name: manifest.name.clone(),
            version: manifest.version.to_string(),
            digest: outpost_bundle::sha256_hex(bytes),
            size: bytes.len() as u64,
            signer,
            security_counter: manifest.security_counter,
            pushed_at: now_secs(),
        };
        if let Some(existing) = self.store.bundle(&record.name, &record.version)? {
            if existing.digest != record.digest {
                return Err(FleetError::BadRequest(format!(
                    "{} {} is already in the store with another digest ({}); bump the version",
                    record.name, record.version, existing.digest
                )));
            }
            return Ok(existing);
        }
        self.store.put_bundle(&record, bytes)?;
        tracing::info!(name = %record.name, version = %record.version, digest = %record.digest, "bundle pushed");
        Ok(record)
    }

    /// The signed desired state that follows `previous` on `device`, its deployments changed
    /// by `change`.
    fn next_desired(
        &self,
        device: &DeviceId,
        previous: Option<&DesiredRecord>,
        change: impl FnOnce(Vec<outpost_proto::Deployment>) -> Vec<outpost_proto::Deployment>,
    ) -> Result<DesiredRecord> {
        // Generations follow the clock (milliseconds) and always increase, so even a fleet
        // rebuilt from an empty data directory issues generations devices accept.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let generation = previous.map_or(now_ms, |p| (p.generation + 1).max(now_ms));
        let deployments = change(previous.map(|p| p.deployments.clone()).unwrap_or_default());
        let expires_at = now_secs() + self.desired_ttl.as_secs().max(1);
        let state = DesiredState {
            v: PROTOCOL_VERSION,
            device: device.clone(),
            generation,
            expires_at,
            deployments: deployments.clone(),
        };
        Ok(DesiredRecord {
            device: device.clone(),
            generation,
            deployments,
            expires_at,
            envelope: SignedDesired::seal(&state, &self.key)?,
        })
    }

    /// Publishes a stored desired state (retained) on its device's topic.
    fn publish_desired(&self, record: &DesiredRecord) -> Result<()> {
        let _ = self.outbound.send(Outbound {
            topic: Topics::new(&record.device).name(Topic::Desired),
            payload: record.envelope.to_vec()?,
            retain: true,
        });
        Ok(())
    }

    /// Makes, stores and publishes a new desired state for `device` from the previous
    /// deployments.
    fn set_desired(
        &self,
        device: &DeviceId,
        change: impl FnOnce(Vec<outpost_proto::Deployment>) -> Vec<outpost_proto::Deployment>,
    ) -> Result<DesiredRecord> {
        let record = self.store.update_desired(device.as_str(), |previous| {
            self.next_desired(device, previous, change)
        })?;
        self.store.flush()?;
        self.publish_desired(&record)?;
        Ok(record)
    }

    /// Publishes `device`'s desired state again when its reported state says it has not
    /// accepted the current generation: something overwrote the retained message (anyone on
    /// the broker can), or the broker lost it. At most once per [`REPUBLISH_EVERY`] a device;
    /// a device that already has it sees a duplicate and does nothing.
    fn catch_up(&self, device: &DeviceId, accepted: Option<u64>, now: u64) {
        if self.ingest_only {
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

    /// Deletes the broker's retained message on `topic` (an empty retained message does that).
    fn clear_retained(&self, topic: &str) {
        let _ = self.outbound.send(Outbound {
            topic: topic.to_owned(),
            payload: Vec::new(),
            retain: true,
        });
    }

    /// Deletes a bundle from the store, unless a device's desired state still names it.
    pub fn remove_bundle(&self, name: &str, version: &str) -> Result<BundleRecord> {
        self.owns_deployments()?;
        let users: Vec<String> = self
            .store
            .all_desired()?
            .into_iter()
            .filter(|d| {
                d.deployments
                    .iter()
                    .any(|x| x.model == name && x.version == version)
            })
            .map(|d| d.device.into())
            .collect();
        if !users.is_empty() {
            return Err(FleetError::BadRequest(format!(
                "{name} {version} is still deployed to {} device(s) ({}); deploy another version first",
                users.len(),
                users.join(", ")
            )));
        }
        let record = self
            .store
            .remove_bundle(name, version)?
            .ok_or_else(|| FleetError::NotFound(format!("bundle {name} {version}")))?;
        tracing::info!(%name, %version, "bundle removed");
        Ok(record)
    }

    /// Forgets a decommissioned device: removes it from the registry, drops its desired state,
    /// and clears its retained messages on the broker. A device still running registers again.
    pub fn forget(&self, device: &str) -> Result<()> {
        self.owns_deployments()?;
        let id = DeviceId::new(device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        if !self.store.remove_device(id.as_str())? {
            return Err(FleetError::NotFound(format!("device `{device}`")));
        }
        let topics = Topics::new(&id);
        for topic in [Topic::Desired, Topic::Status, Topic::Reported] {
            self.clear_retained(&topics.name(topic));
        }
        tracing::info!(%device, "device forgotten");
        Ok(())
    }

    /// Deploys a pushed bundle version to devices by name, tag, or all known devices.
    pub fn deploy(&self, request: &DeployRequest) -> Result<DeployResponse> {
        self.owns_deployments()?;
        let bundle = self
            .store
            .bundle(&request.model, &request.version)?
            .ok_or_else(|| {
                FleetError::NotFound(format!(
                    "bundle {} {} (push it first)",
                    request.model, request.version
                ))
            })?;
        let mut targets: Vec<String> = request.devices.clone();
        if request.tag.is_some() || request.all {
            for device in self.store.devices()? {
                let tagged = request.tag.as_ref().is_some_and(|tag| {
                    device
                        .reported
                        .as_ref()
                        .is_some_and(|r| r.tags.iter().any(|t| t == tag))
                });
                if request.all || tagged {
                    targets.push(device.id);
                }
            }
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return Err(FleetError::BadRequest(
                "no target devices (name devices, a tag some device reports, or all)".into(),
            ));
        }
        let targets: Vec<DeviceId> = targets
            .into_iter()
            .map(DeviceId::new)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| FleetError::BadRequest(e.to_string()))?;
        let deployment = outpost_proto::Deployment {
            model: bundle.name.clone(),
            version: bundle.version.clone(),
            digest: bundle.digest.clone(),
            size: bundle.size,
            url: format!("{}/{}", self.artifact_base, bundle.digest),
        };
        // Every device's desired state and the deployment record are stored together or not
        // at all; only then is anything published.
        let (desired, record) = self.store.record_deployment(
            &targets,
            |device, previous| {
                let d = deployment.clone();
                self.next_desired(device, previous, move |mut deployments| {
                    deployments.retain(|x| x.model != d.model);
                    deployments.push(d);
                    deployments.sort_by(|a, b| a.model.cmp(&b.model));
                    deployments
                })
            },
            DeploymentRecord {
                id: 0,
                model: bundle.name,
                version: bundle.version,
                digest: bundle.digest,
                devices: targets.iter().map(ToString::to_string).collect(),
                created_at: now_secs(),
            },
        )?;
        let mut generations = Vec::with_capacity(desired.len());
        for d in &desired {
            if let Err(e) = self.publish_desired(d) {
                // Stored and re-published at the next reconnect or re-signing.
                tracing::error!(device = %d.device, error = %e, "cannot publish a desired state");
            }
            generations.push((d.device.to_string(), d.generation));
        }
        tracing::info!(id = record.id, model = %record.model, version = %record.version, devices = record.devices.len(), "deployed");
        Ok(DeployResponse {
            deployment: record,
            generations,
        })
    }

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
                    if !known && !fleet.ingest_only {
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
                    tracing::warn!(%device, "reported state names another device; ignored");
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(%device, error = %e, "malformed reported state; ignored");
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
                        tracing::warn!(%device, "batch names another device; ignored");
                        Ok(())
                    }
                    Err(e) => {
                        tracing::warn!(%device, error = %e, "malformed batch; ignored");
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
    for record in &batch.records {
        // A time from the future would exempt the record (and, since pruning stops at a
        // device's first record young enough to keep, every later one) from retention.
        let mut record = record.clone();
        if record.time > now.saturating_add(MAX_CLOCK_AHEAD.as_secs()) {
            tracing::debug!(%device, seq = record.seq, time = record.time, "record time in the future; taken as now");
            record.time = now;
        }
        match fleet.store.put_record(stream, device, &record)? {
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
        d.dropped = batch.dropped;
        d.last_seen = Some(now);
        if last_event.is_some() {
            d.last_event = last_event;
        }
    })?;
    fleet.metrics.record_batch(new, duplicates);
    fleet
        .metrics
        .conflicts
        .fetch_add(conflicts, Ordering::Relaxed);
    Ok(())
}
