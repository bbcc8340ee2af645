//! The Outpost fleet manager.
//!
//! `outpost fleet serve` runs [`serve`]: an embedded MQTT broker (or a connection to an
//! external one), the device registry, the content-addressed artifact store, signed desired
//! states, telemetry and event storage (each record once per device and sequence number), and
//! a REST API with `/metrics`.

pub mod api;
pub mod broker;
mod error;
pub mod mqtt;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_bundle::{Bundle, ReadLimits, SecretKey, TrustStore};
use outpost_proto::{DesiredState, PROTOCOL_VERSION, SignedDesired, Topics};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

pub use error::{FleetError, Result};
use mqtt::Outbound;
use store::{BundleRecord, DeploymentRecord, DesiredRecord, Store, now_secs};

/// Where the fleet's MQTT broker is.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Run rumqttd in this process, listening here; with logins (user name → password), every
    /// client must use one (the fleet gives itself one of its own).
    Embedded(SocketAddr, Option<HashMap<String, String>>),
    /// Use an external broker at this host and port, with these credentials if any.
    External(String, u16, Option<(String, String)>),
}

/// Reads a login file: `user:password` per line; blank lines and `#` comments are skipped.
pub fn read_logins(text: &str) -> Result<HashMap<String, String>> {
    let mut logins = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, password) = line
            .split_once(':')
            .filter(|(u, p)| !u.is_empty() && !p.is_empty())
            .ok_or_else(|| {
                FleetError::Config(format!("login file line {}: expected user:password", n + 1))
            })?;
        logins.insert(user.to_owned(), password.to_owned());
    }
    Ok(logins)
}

/// How to run a fleet manager.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// State directory (sled database, artifacts, fleet key).
    pub data_dir: PathBuf,
    /// REST API and artifact listener.
    pub listen: SocketAddr,
    /// The broker.
    pub broker: BrokerChoice,
    /// Base URL devices download artifacts from (default: the API's own address).
    pub public_url: Option<String>,
    /// Bearer token for `/api/v1`, if any.
    pub token: Option<String>,
    /// When set, pushed bundles must verify against it.
    pub trust: Option<TrustStore>,
    /// How long a signed desired state stays valid.
    pub desired_ttl: Duration,
    /// This replica's name (default: one generated and kept in the data directory).
    pub replica: Option<String>,
    /// Largest bundle accepted by `push`.
    pub max_bundle_bytes: u64,
    /// How long telemetry and events are kept.
    pub retention: Duration,
    /// A secondary replica: it stores telemetry, events and the registry, but neither accepts
    /// pushes and deployments nor publishes desired states (one replica owns those).
    pub ingest_only: bool,
}

impl FleetOptions {
    /// Refuses options a fleet must not run with: a short API token, or an API reachable
    /// beyond this machine without one (anyone could deploy).
    pub fn validate(&self) -> Result<()> {
        if self.token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(FleetError::Config(
                "the API token must be at least 16 characters".into(),
            ));
        }
        if self.token.is_none() && !self.listen.ip().is_loopback() {
            return Err(FleetError::Config(format!(
                "listening on {} without --token-file would let anyone deploy; give a token",
                self.listen
            )));
        }
        Ok(())
    }
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
    /// Artifact bytes served.
    pub artifact_bytes: AtomicU64,
    /// Artifact requests served.
    pub artifact_requests: AtomicU64,
}

impl FleetMetrics {
    fn record_batch(&self, new: u64, duplicates: u64) {
        self.records.fetch_add(new, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
    }
}

/// A running fleet: its store, key and connections. Shared by the API and the MQTT task.
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
}

/// What `serve` reports once it is ready.
#[derive(Debug, Clone, Serialize)]
pub struct Ready {
    /// REST API address.
    pub api: SocketAddr,
    /// Broker URL devices connect to.
    pub broker: String,
    /// The fleet public key (hex), for device configs.
    pub public_key: String,
    /// A file holding the public key.
    pub public_key_file: PathBuf,
}

pub use outpost_proto::rest::{DeployRequest, DeployResponse};

fn load_or_create_key(dir: &Path) -> Result<SecretKey> {
    let path = dir.join("fleet.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_file_str(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate()?;
            write_private(&path, key.to_file_string().as_bytes())?;
            tracing::info!(path = %path.display(), key_id = key.id(), "created the fleet key");
            key
        }
        Err(e) => return Err(e.into()),
    };
    std::fs::write(dir.join("fleet.pub"), key.public().to_file_string())?;
    Ok(key)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn replica_name(store: &Store, given: Option<String>) -> Result<String> {
    if let Some(name) = given {
        if !outpost_proto::is_valid_device_id(&name) {
            return Err(FleetError::Config(format!(
                "replica name `{name}` is not valid"
            )));
        }
        return Ok(name);
    }
    if let Some(name) = store.meta("replica")? {
        return Ok(String::from_utf8_lossy(&name).into_owned());
    }
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|e| FleetError::Config(e.to_string()))?;
    let name = format!("fleet-{}", hex::encode(bytes));
    store.set_meta("replica", name.as_bytes())?;
    Ok(name)
}

/// Runs a fleet manager until `shutdown` completes; `on_ready` hears where it listens.
pub async fn serve(
    options: FleetOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready),
) -> Result<()> {
    options.validate()?;
    let store = Store::open(&options.data_dir)?;
    let key = load_or_create_key(&options.data_dir)?;
    let replica = replica_name(&store, options.replica.clone())?;
    let (broker, broker_login) = match &options.broker {
        BrokerChoice::Embedded(listen, logins) => {
            let mut logins = logins.clone();
            let own = match &mut logins {
                Some(map) => {
                    let mut secret = [0u8; 16];
                    getrandom::fill(&mut secret).map_err(|e| FleetError::Config(e.to_string()))?;
                    let login = (format!("outpost-fleet-{replica}"), hex::encode(secret));
                    map.insert(login.0.clone(), login.1.clone());
                    Some(login)
                }
                None => None,
            };
            let addr = broker::start(*listen, logins)?;
            tracing::info!(%addr, logins = own.is_some(), "embedded MQTT broker listening");
            ((addr.ip().to_string(), addr.port()), own)
        }
        BrokerChoice::External(host, port, login) => ((host.clone(), *port), login.clone()),
    };
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| FleetError::Config(format!("cannot listen on {}: {e}", options.listen)))?;
    let api_addr = listener.local_addr()?;
    let artifact_base = match &options.public_url {
        Some(url) => format!("{}/artifacts", url.trim_end_matches('/')),
        None => {
            let shown = if api_addr.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
            } else {
                api_addr
            };
            format!("http://{shown}/artifacts")
        }
    };
    let (outbound_tx, outbound_rx) = mpsc::unbounded_channel();
    let fleet = Arc::new(Fleet {
        store,
        key,
        replica,
        broker,
        broker_login,
        artifact_base,
        token: options.token.clone(),
        trust: options.trust.clone(),
        desired_ttl: options.desired_ttl,
        max_bundle_bytes: options.max_bundle_bytes,
        ingest_only: options.ingest_only,
        metrics: FleetMetrics::default(),
        outbound: outbound_tx,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mqtt_task = tokio::spawn(mqtt::run(Arc::clone(&fleet), outbound_rx, stop_rx.clone()));
    if !fleet.ingest_only {
        tokio::spawn(refresh_task(Arc::clone(&fleet), stop_rx.clone()));
    }
    tokio::spawn(retention_task(
        Arc::clone(&fleet),
        options.retention,
        stop_rx.clone(),
    ));
    let broker_host = if fleet.broker.0.contains(':') {
        format!("[{}]", fleet.broker.0)
    } else {
        fleet.broker.0.clone()
    };
    let ready = Ready {
        api: api_addr,
        broker: format!("mqtt://{broker_host}:{}", fleet.broker.1),
        public_key: fleet.key.public().to_hex(),
        public_key_file: options.data_dir.join("fleet.pub"),
    };
    tracing::info!(
        api = %ready.api,
        broker = %ready.broker,
        replica = %fleet.replica,
        key_id = fleet.key.id(),
        "fleet ready"
    );
    on_ready(&ready);
    let app = api::router(Arc::clone(&fleet));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(3), mqtt_task).await;
    fleet.store.flush()?;
    result.map_err(FleetError::Io)
}

/// Re-signs desired states before they expire, so devices that were offline for a while still
/// accept them.
async fn refresh_task(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    let period = (fleet.desired_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = now_secs();
        let half = fleet.desired_ttl.as_secs() / 2;
        let Ok(all) = fleet.store.all_desired() else {
            continue;
        };
        for desired in all {
            if desired.expires_at.saturating_sub(now) < half {
                let deployments = desired.deployments.clone();
                if let Err(e) = fleet.set_desired(&desired.device, |_| deployments) {
                    tracing::error!(device = %desired.device, error = %e, "cannot refresh a desired state");
                }
            }
        }
    }
}

/// Deletes telemetry and events older than `retention`, every ten minutes (and at start).
async fn retention_task(fleet: Arc<Fleet>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = now_secs().saturating_sub(retention.as_secs());
        let pruned = tokio::task::spawn_blocking({
            let fleet = Arc::clone(&fleet);
            move || -> Result<usize> {
                Ok(fleet.store.prune(store::Stream::Telemetry, cutoff)?
                    + fleet.store.prune(store::Stream::Events, cutoff)?)
            }
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(records = n, "pruned records past retention"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot prune old records"),
            Err(e) => tracing::error!(error = %e, "pruning failed"),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

impl Fleet {
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
        device: &str,
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
            device: device.to_owned(),
            generation,
            expires_at,
            deployments: deployments.clone(),
        };
        Ok(DesiredRecord {
            device: device.to_owned(),
            generation,
            deployments,
            expires_at,
            envelope: SignedDesired::seal(&state, &self.key)?,
        })
    }

    /// Publishes a stored desired state (retained) on its device's topic.
    fn publish_desired(&self, record: &DesiredRecord) -> Result<()> {
        let topics =
            Topics::new(&record.device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        let _ = self.outbound.send(Outbound {
            topic: topics.desired(),
            payload: record.envelope.to_vec()?,
            retain: true,
        });
        Ok(())
    }

    /// Makes, stores and publishes a new desired state for `device` from the previous
    /// deployments.
    fn set_desired(
        &self,
        device: &str,
        change: impl FnOnce(Vec<outpost_proto::Deployment>) -> Vec<outpost_proto::Deployment>,
    ) -> Result<DesiredRecord> {
        Topics::new(device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        let record = self.store.update_desired(device, |previous| {
            self.next_desired(device, previous, change)
        })?;
        self.store.flush()?;
        self.publish_desired(&record)?;
        Ok(record)
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
            .map(|d| d.device)
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
        let topics = Topics::new(device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        if !self.store.remove_device(device)? {
            return Err(FleetError::NotFound(format!("device `{device}`")));
        }
        for topic in [topics.desired(), topics.status(), topics.reported()] {
            self.clear_retained(&topic);
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
        if let Some(bad) = targets
            .iter()
            .find(|d| !outpost_proto::is_valid_device_id(d))
        {
            return Err(FleetError::BadRequest(format!(
                "`{bad}` is not a valid device id"
            )));
        }
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
                devices: targets.clone(),
                created_at: now_secs(),
            },
        )?;
        let mut generations = Vec::with_capacity(desired.len());
        for d in &desired {
            if let Err(e) = self.publish_desired(d) {
                // Stored and re-published at the next reconnect or re-signing.
                tracing::error!(device = %d.device, error = %e, "cannot publish a desired state");
            }
            generations.push((d.device.clone(), d.generation));
        }
        tracing::info!(id = record.id, model = %record.model, version = %record.version, devices = record.devices.len(), "deployed");
        Ok(DeployResponse {
            deployment: record,
            generations,
        })
    }
}
