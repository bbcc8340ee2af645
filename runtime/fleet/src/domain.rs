//! The fleet's domain operations: push, deploy, forget, re-sign; ingesting what devices send
//! is in `ingest.rs`.
//! The HTTP API ([`crate::api`]) and the MQTT adapter ([`crate::mqtt`]) call these; nothing here
//! knows about either transport beyond the [`Outbound`] messages it queues for publishing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_proto::{DesiredState, DeviceId, PROTOCOL_VERSION, SignedDesired, Topic, Topics};
use tokio::sync::mpsc;

use crate::error::{FleetError, Result};
use crate::store::{BundleRecord, DeploymentRecord, DesiredRecord, Store, Stream, now_secs};
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
    /// Messages from devices not enrolled, when enrolment is required, ignored.
    pub unenrolled: AtomicU64,
    /// Records refused because their device held its quota already.
    pub over_quota: AtomicU64,
    /// Messages from devices that could not be read (malformed JSON, a wrong shape), ignored.
    pub malformed: AtomicU64,
    /// Messages whose body names a device other than the topic's (someone publishing as
    /// another device, or a confused one), ignored.
    pub foreign: AtomicU64,
    /// Artifact bytes served.
    pub artifact_bytes: AtomicU64,
    /// Artifact requests served.
    pub artifact_requests: AtomicU64,
    /// The embedded broker's gate, when the broker is embedded.
    pub gate: std::sync::OnceLock<std::sync::Arc<crate::gate::GateStats>>,
    /// The API's front door.
    pub http: std::sync::Arc<outpost_http::Stats>,
}

impl FleetMetrics {
    pub(crate) fn record_batch(&self, new: u64, duplicates: u64) {
        self.records.fetch_add(new, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    }
}

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
    /// TLS to the broker, when it speaks it.
    pub broker_tls: Option<std::sync::Arc<outpost_tls::rustls::ClientConfig>>,
    /// The broker as devices reach it (shown by the API and in enrolments).
    pub public_broker: outpost_proto::BrokerUrl,
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
    /// Bytes of telemetry and events one device may have stored at once.
    pub device_quota_bytes: u64,
    /// Whether this replica only ingests (see [`FleetOptions::ingest_only`]).
    pub ingest_only: bool,
    /// Whether this replica holds the publishing role now: always for the embedded store
    /// (unless it only ingests), and for the replica holding the role's lock on a shared
    /// database (see [`Fleet::leads`]).
    pub(crate) leading: std::sync::atomic::AtomicBool,
    /// Whether only enrolled devices are registered and heard.
    pub require_enrolment: bool,
    /// The shared-subscription group replicas split telemetry and events in.
    pub share_group: String,
    /// The embedded broker's logins, when it has any (enrolment changes them).
    pub logins: Option<std::sync::Arc<crate::acl::LiveLogins>>,
    /// Whether `/metrics` also has one series per device (see
    /// [`FleetOptions::per_device_metrics`](crate::FleetOptions::per_device_metrics)).
    pub per_device_metrics: bool,
    /// Where the other replicas reach this one's API (recorded with the publishing role).
    pub advertise: Option<String>,
    /// Counters.
    pub metrics: FleetMetrics,
    outbound: mpsc::UnboundedSender<Outbound>,
    /// When each device's desired state was last published again for it to catch up.
    pub(crate) republished: Mutex<HashMap<String, u64>>,
    /// Held across an enrolment's or revocation's store and login-table updates, so two of
    /// them never interleave.
    pub(crate) enrolling: Mutex<()>,
    /// Held across a rollout's decision, so the driver and an operator never interleave.
    pub(crate) rolling: Mutex<()>,
    /// The rules and their state.
    pub rules: crate::rules::RuleBook,
    /// Training baselines of stored bundles, by digest.
    pub(crate) baselines:
        Mutex<HashMap<String, std::sync::Arc<outpost_bundle::manifest::Baseline>>>,
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
    /// TLS to the broker, when it speaks it.
    pub broker_tls: Option<std::sync::Arc<outpost_tls::rustls::ClientConfig>>,
    /// The broker as devices reach it.
    pub public_broker: outpost_proto::BrokerUrl,
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
    /// Bytes of telemetry and events one device may have stored at once.
    pub device_quota_bytes: u64,
    /// Whether this replica only ingests.
    pub ingest_only: bool,
    /// Whether only enrolled devices are registered and heard.
    pub require_enrolment: bool,
    /// The shared-subscription group replicas split telemetry and events in.
    pub share_group: String,
    /// The embedded broker's logins, when it has any.
    pub logins: Option<std::sync::Arc<crate::acl::LiveLogins>>,
    /// Whether `/metrics` also has one series per device.
    pub per_device_metrics: bool,
    /// Where the other replicas reach this one's API.
    pub advertise: Option<String>,
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
            broker_tls,
            public_broker,
            artifact_base,
            token,
            trust,
            desired_ttl,
            max_bundle_bytes,
            device_quota_bytes,
            ingest_only,
            require_enrolment,
            share_group,
            logins,
            per_device_metrics,
            advertise,
        } = settings;
        let leading = !ingest_only && !store.shared();
        Self {
            leading: std::sync::atomic::AtomicBool::new(leading),
            store,
            key,
            replica,
            broker,
            broker_login,
            broker_tls,
            public_broker,
            artifact_base,
            token,
            trust,
            desired_ttl,
            max_bundle_bytes,
            device_quota_bytes,
            ingest_only,
            require_enrolment,
            share_group,
            logins,
            per_device_metrics,
            advertise,
            metrics: FleetMetrics::default(),
            outbound,
            republished: Mutex::new(HashMap::new()),
            enrolling: Mutex::new(()),
            rolling: Mutex::new(()),
            rules: crate::rules::RuleBook::default(),
            baselines: Mutex::new(HashMap::new()),
        }
    }

    /// Re-signs (and publishes again) every desired state past half its validity, so devices
    /// that were offline for a while still accept them. Returns how many.
    pub fn refresh_desired(&self) -> usize {
        if !self.leads() {
            return 0;
        }
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

    /// Whether this replica holds the publishing role: it signs and publishes desired states,
    /// takes pushes and deployments, drives rollouts and evaluates rules. One replica at a
    /// time does.
    pub fn leads(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// On a shared database: takes the publishing role when no replica holds it (and then
    /// publishes every stored desired state again: the replica before may have died between
    /// storing one and publishing it), or gives it up when this replica's hold on it is gone.
    /// Run every [`crate::ROLE_EVERY`].
    pub(crate) fn hold_role(&self) {
        use std::sync::atomic::Ordering;
        if self.leads() {
            if !self.store.still_leading() {
                self.leading.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %self.replica, "lost the publishing role (its database connection ended); stopped publishing");
            }
            return;
        }
        match self
            .store
            .try_lead(&self.replica, self.advertise.as_deref())
        {
            Ok(true) => {
                self.leading.store(true, Ordering::SeqCst);
                let all = self.store.all_desired().unwrap_or_default();
                tracing::info!(replica = %self.replica, desired = all.len(), "took the publishing role; publishing every desired state again");
                for desired in &all {
                    if let Err(e) = self.publish_desired(desired) {
                        tracing::error!(device = %desired.device, error = %e, "cannot publish a desired state");
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "cannot try for the publishing role"),
        }
    }

    pub(crate) fn owns_deployments(&self) -> Result<()> {
        if self.ingest_only {
            return Err(FleetError::BadRequest(format!(
                "replica `{}` only ingests telemetry (--ingest-only); push and deploy through the primary replica",
                self.replica
            )));
        }
        if !self.leads() {
            return Err(FleetError::NotPublishing(
                self.store.leader().ok().flatten().map(|l| l.replica),
            ));
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
        let expires_at = now_secs().saturating_add(self.desired_ttl.as_secs().max(1));
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
    pub(crate) fn publish_desired(&self, record: &DesiredRecord) -> Result<()> {
        let _ = self.outbound.send(Outbound {
            topic: Topics::new(&record.device).name(Topic::Desired),
            payload: record.envelope.to_vec()?,
            retain: true,
        });
        Ok(())
    }

    /// Makes, stores and publishes a new desired state for `device` from the previous
    /// deployments.
    pub(crate) fn set_desired(
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

    /// Deletes the broker's retained message on `topic` (an empty retained message does that).
    pub(crate) fn clear_retained(&self, topic: &str) {
        let _ = self.outbound.send(Outbound {
            topic: topic.to_owned(),
            payload: Vec::new(),
            retain: true,
        });
    }

    /// Deletes a bundle from the store, unless a device's desired state still names it.
    pub fn remove_bundle(&self, name: &str, version: &str) -> Result<BundleRecord> {
        self.owns_deployments()?;
        if let Some(id) = self.is_fallback(name, version)? {
            return Err(FleetError::BadRequest(format!(
                "{name} {version} is what rollout {id} rolls back to; wait for the rollout to finish first"
            )));
        }
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
        // A forgotten device keeps no credentials: it could register itself again with them.
        let enrolled = self.revoke(id.as_str())?;
        if !self.store.remove_device(id.as_str())? && !enrolled {
            return Err(FleetError::NotFound(format!("device `{device}`")));
        }
        let topics = Topics::new(&id);
        for topic in [Topic::Desired, Topic::Status, Topic::Reported] {
            self.clear_retained(&topics.name(topic));
        }
        tracing::info!(%device, "device forgotten");
        Ok(())
    }

    /// The devices named, those reporting `tag`, or (with `all`) every known device; sorted,
    /// each once, at least one.
    pub(crate) fn targets(
        &self,
        devices: &[String],
        tag: Option<&str>,
        all: bool,
    ) -> Result<Vec<DeviceId>> {
        let mut targets: Vec<String> = devices.to_vec();
        if tag.is_some() || all {
            for device in self.store.devices()? {
                let tagged = tag.is_some_and(|tag| {
                    device
                        .reported
                        .as_ref()
                        .is_some_and(|r| r.tags.iter().any(|t| t == tag))
                });
                if all || tagged {
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
        targets
            .into_iter()
            .map(DeviceId::new)
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| FleetError::BadRequest(e.to_string()))
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
        let targets = self.targets(&request.devices, request.tag.as_deref(), request.all)?;
        let deployment = outpost_proto::Deployment {
            model: bundle.name.clone(),
            version: bundle.version.clone(),
            digest: bundle.digest.clone(),
            size: bundle.size,
            url: format!("{}/{}", self.artifact_base, bundle.digest),
            policy: request.policy.clone(),
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
}
