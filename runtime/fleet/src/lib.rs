//! The Outpost fleet manager. Owns: the [`Server`] (REST API, MQTT link, embedded broker), the
//! fleet's domain ([`domain::Fleet`]) and its store. Never imports: wasmtime, tract, or the
//! device crates (it speaks to devices only through `outpost-proto` messages).
//!
//! `outpost fleet serve` runs a [`Server`]: an embedded MQTT broker (or a connection to an
//! external one), the device registry, the content-addressed artifact store, signed desired
//! states, telemetry and event storage (each record once per device and sequence number), and
//! a REST API with `/metrics`.

pub mod acl;
pub mod api;
pub mod broker;
mod compare;
pub mod domain;
mod drift;
mod enrol;
mod error;
pub mod forward;
pub mod gate;
mod gate_room;
mod ingest;
pub mod mqtt;
pub mod rollout;
pub mod rules;
pub mod store;
pub mod store_pg;
mod store_pg_tls;
mod tls_listener;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_bundle::{SecretKey, TrustStore};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

pub use acl::{Identity, LiveLogins, Logins};
pub use domain::{Fleet, FleetMetrics};
pub use error::{FleetError, Result};
use store::{SledStore, Store, now_secs};

/// Where the fleet's MQTT broker is.
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// Run rumqttd in this process, listening here; with logins, every client must use one
    /// (from this table or from enrolment) and each is confined to its own topics (the fleet
    /// gives itself a login of its own). Logins are on, with enrolled devices only, when none
    /// are given but enrolment is required or the broker listens beyond loopback (unless
    /// [`FleetOptions::insecure`]).
    Embedded(SocketAddr, Option<Logins>),
    /// Use an external broker at this host and port, with these credentials if any, over TLS
    /// with this client configuration when given (`mqtts://`).
    External(
        String,
        u16,
        Option<(String, String)>,
        Option<Arc<outpost_tls::rustls::ClientConfig>>,
    ),
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
    /// Bytes of telemetry and events one device may have stored at once; past it its records
    /// are refused (counted per device and in `/metrics`) until retention frees room.
    pub device_quota_bytes: u64,
    /// A secondary replica: it stores telemetry, events and the registry, but neither accepts
    /// pushes and deployments nor publishes desired states (one replica owns those).
    pub ingest_only: bool,
    /// Let the embedded broker listen beyond loopback without logins (anyone who reaches it
    /// can read every device's messages and write their topics).
    pub insecure: bool,
    /// Register and hear only enrolled devices (`outpost fleet enroll`). Always so when the
    /// embedded broker has logins.
    pub require_enrolment: bool,
    /// The embedded broker speaks TLS (`mqtts://`) with this server configuration.
    pub mqtt_tls: Option<Arc<outpost_tls::rustls::ServerConfig>>,
    /// The API and artifact server speak HTTPS with this server configuration.
    pub api_tls: Option<Arc<outpost_tls::rustls::ServerConfig>>,
    /// The shared-subscription group the replicas split telemetry and events in (default
    /// `outpost-fleet`). On an external broker whose ACLs do not check subscriptions
    /// (Mosquitto's), a device that joins the group takes a share of every device's records,
    /// which then never reach the fleet: give every replica the same name nobody can guess.
    pub share_group: Option<String>,
    /// The API's connection cap and timeouts (default: a quarter of the file descriptors,
    /// leaving the embedded broker its share).
    pub http: outpost_http::Limits,
    /// Retraining triggers and alerts (`fleet serve --rules FILE`), evaluated by the replica
    /// that owns deployments.
    pub rules: Vec<rules::Rule>,
    /// `/metrics` also carries one series per device (seconds since last heard, records
    /// dropped). Off by default: 10,000 devices would be 20,000 series, which is what
    /// Prometheus operators are told to avoid; the device list API has the same detail.
    pub per_device_metrics: bool,
    /// Keep the state in this PostgreSQL database (a `postgres://` URL) instead of sled in
    /// the data directory: replicas on one database each answer the whole API. The data
    /// directory still holds the fleet key and, unless [`FleetOptions::artifacts_dir`] says
    /// otherwise, the bundle files.
    pub database: Option<String>,
    /// Where bundle files are kept (default `<data-dir>/artifacts`): storage every replica on
    /// one database shares.
    pub artifacts_dir: Option<PathBuf>,
    /// Where the other replicas on one database reach this one's API (`http://10.0.0.7:7878`):
    /// recorded with the publishing role, so that a replica without the role forwards the
    /// writes it is sent (push, deploy, rollouts, enrolment) to the one that has it. Default:
    /// the listen address unless it is unspecified (0.0.0.0), when writes to a replica
    /// without the role are refused with 409 and the name of the one that has it.
    pub advertise_url: Option<String>,
}

/// The API's front door on its defaults: timeouts of [`outpost_http::Limits::default`] and a
/// quarter of the process's file descriptors (after the reserve) for connections.
pub fn default_http_limits() -> outpost_http::Limits {
    outpost_http::Limits::for_share_of_fds(0.25)
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
        if let Some(group) = &self.share_group
            && (group.is_empty()
                || group.len() > 64
                || group.chars().any(|c| "/+#$".contains(c) || c.is_control()))
        {
            return Err(FleetError::Config(
                "the share group must be 1 to 64 characters, without / + # $".into(),
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

    /// The embedded broker's logins, if it has any: those given, or (none given) an empty
    /// table to be filled by enrolment when enrolment is required or the broker listens beyond
    /// loopback without `insecure`.
    fn embedded_logins(&self) -> Option<Logins> {
        match &self.broker {
            BrokerChoice::Embedded(_, Some(logins)) => Some(logins.clone()),
            BrokerChoice::Embedded(listen, None)
                if self.require_enrolment || (!listen.ip().is_loopback() && !self.insecure) =>
            {
                Some(Logins::default())
            }
            _ => None,
        }
    }
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
            match write_private(&path, key.to_file_string().as_bytes()) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), key_id = key.id(), "created the fleet key");
                    key
                }
                // Another replica on a shared data volume made it first: use that one, once
                // it is whole.
                Err(FleetError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    read_key_made_elsewhere(&path)?
                }
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e.into()),
    };
    std::fs::write(dir.join("fleet.pub"), key.public().to_file_string())?;
    Ok(key)
}

fn read_key_made_elsewhere(path: &Path) -> Result<SecretKey> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match SecretKey::from_file_str(&std::fs::read_to_string(path)?) {
            Ok(key) => return Ok(key),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
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

/// This replica's name: the one given, else the one kept from an earlier start (in the
/// store when it is this replica's own, in the data directory when replicas share the store),
/// else a new one.
fn replica_name(store: &Store, dir: &Path, given: Option<String>) -> Result<String> {
    if let Some(name) = given {
        if !outpost_proto::is_valid_device_id(&name) {
            return Err(FleetError::Config(format!(
                "replica name `{name}` is not valid"
            )));
        }
        return Ok(name);
    }
    let file = dir.join("replica");
    let kept = if store.shared() {
        match std::fs::read_to_string(&file) {
            Ok(name) => Some(name.trim().to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        store
            .meta("replica")?
            .map(|name| String::from_utf8_lossy(&name).into_owned())
    };
    if let Some(name) = kept.filter(|n| outpost_proto::is_valid_device_id(n)) {
        return Ok(name);
    }
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|e| FleetError::Config(e.to_string()))?;
    let name = format!("fleet-{}", hex::encode(bytes));
    if store.shared() {
        std::fs::write(&file, &name)?;
    } else {
        store.set_meta("replica", name.as_bytes())?;
    }
    Ok(name)
}

/// Opens the store `options` name: PostgreSQL when given a database, else sled in the data
/// directory.
async fn open_store(options: &FleetOptions) -> Result<Store> {
    std::fs::create_dir_all(&options.data_dir)?;
    let Some(url) = options.database.clone() else {
        return Ok(Box::new(SledStore::open(&options.data_dir)?));
    };
    let artifacts = options
        .artifacts_dir
        .clone()
        .unwrap_or_else(|| options.data_dir.join("artifacts"));
    let store = tokio::task::spawn_blocking(move || store_pg::PgStore::connect(&url, &artifacts))
        .await
        .map_err(|e| FleetError::Config(format!("opening the database: {e}")))??;
    Ok(Box::new(store))
}

/// Replicas on one database must sign with one key: devices trust one. The first replica
/// records its public key; a replica with another key is refused by name.
fn check_shared_key(store: &Store, key: &SecretKey) -> Result<()> {
    if !store.shared() {
        return Ok(());
    }
    let ours = key.public().to_file_string();
    match store.meta("fleet_public_key")? {
        None => store.set_meta("fleet_public_key", ours.as_bytes()),
        Some(theirs) if theirs == ours.as_bytes() => Ok(()),
        Some(_) => Err(FleetError::Config(format!(
            "the fleet key in this data directory (id {}) is not the one the other replicas on \
             the {} sign with: give every replica the same fleet.key",
            key.id(),
            store.describe()
        ))),
    }
}

/// The sockets a fleet serves its API on, bound before it starts (port 0: the OS picks).
#[derive(Debug)]
pub struct Listeners {
    api: tokio::net::TcpListener,
}

impl Listeners {
    /// Binds the API listener that `options` names.
    pub async fn bind(options: &FleetOptions) -> Result<Self> {
        let api = tokio::net::TcpListener::bind(options.listen)
            .await
            .map_err(|e| FleetError::Config(format!("cannot listen on {}: {e}", options.listen)))?;
        Ok(Self { api })
    }

    /// Takes an API listener bound elsewhere (it must be non-blocking).
    pub fn from_std(api: std::net::TcpListener) -> Result<Self> {
        Ok(Self {
            api: tokio::net::TcpListener::from_std(api)?,
        })
    }

    /// The API's address.
    pub fn api_addr(&self) -> Result<SocketAddr> {
        Ok(self.api.local_addr()?)
    }
}

/// A running fleet manager: its API, MQTT client, background tasks and (when embedded) broker.
/// Stop it with [`Server::stop`]; dropping it stops the broker but not the async tasks.
#[derive(Debug)]
pub struct Server {
    ready: Ready,
    fleet: Arc<Fleet>,
    stop: watch::Sender<bool>,
    api: tokio::task::JoinHandle<()>,
    mqtt: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    subscribed: watch::Receiver<bool>,
    broker: Option<broker::EmbeddedBroker>,
    /// Turns true when the embedded broker stopped answering.
    broker_lost: Option<watch::Receiver<bool>>,
}

impl Server {
    /// Opens the state, starts the broker (when embedded), the MQTT client, the background
    /// tasks and the API on `listeners`, and returns once the API accepts connections.
    pub async fn start(options: FleetOptions, listeners: Listeners) -> Result<Self> {
        options.validate()?;
        let store = open_store(&options).await?;
        let key = load_or_create_key(&options.data_dir)?;
        check_shared_key(&store, &key)?;
        let replica = replica_name(&store, &options.data_dir, options.replica.clone())?;
        tracing::info!(store = %store.describe(), %replica, "state store open");
        let live_logins = options
            .embedded_logins()
            .map(|l| Arc::new(LiveLogins::new(l)));
        let enrolled = match &live_logins {
            Some(logins) => enrol::load_enrolled(&store, logins)?,
            None => store.credentials()?.len(),
        };
        let require_enrolment = options.require_enrolment || live_logins.is_some();
        let (broker_addr, broker_login, embedded) = match &options.broker {
            BrokerChoice::Embedded(listen, _) => {
                let own = match &live_logins {
                    Some(logins) => {
                        let mut secret = [0u8; 16];
                        getrandom::fill(&mut secret)
                            .map_err(|e| FleetError::Config(e.to_string()))?;
                        let login = (
                            format!("{}{replica}", acl::FLEET_USER_PREFIX),
                            hex::encode(secret),
                        );
                        logins.insert(&login.0, &login.1)?;
                        Some(login)
                    }
                    None => None,
                };
                let (listen, logins_for_broker) = (*listen, live_logins.clone());
                let tls = options.mqtt_tls.clone();
                let embedded = tokio::task::spawn_blocking(move || {
                    broker::EmbeddedBroker::start_tls(listen, logins_for_broker, tls)
                })
                .await
                .map_err(|e| FleetError::Config(format!("the embedded broker: {e}")))??;
                let addr = embedded.addr();
                tracing::info!(%addr, logins = own.is_some(), tls = embedded.tls(), "embedded MQTT broker listening");
                // Over TLS the fleet's own client reaches rumqttd on loopback, behind the gate
                // (a fleet's connection passes the gate untouched anyway).
                let own_addr = if embedded.tls() {
                    embedded.inner_addr()
                } else {
                    addr
                };
                (
                    (own_addr.ip().to_string(), own_addr.port()),
                    own,
                    Some(embedded),
                )
            }
            BrokerChoice::External(host, port, login, _) => {
                ((host.clone(), *port), login.clone(), None)
            }
        };
        let broker_tls = match &options.broker {
            BrokerChoice::External(_, _, _, tls) => tls.clone(),
            BrokerChoice::Embedded(..) => None,
        };
        let public_broker = match &embedded {
            Some(embedded) => {
                let addr = embedded.addr();
                outpost_proto::BrokerUrl::new(addr.ip().to_string(), addr.port())
                    .with_tls(embedded.tls())
            }
            None => outpost_proto::BrokerUrl::new(broker_addr.0.clone(), broker_addr.1)
                .with_tls(broker_tls.is_some()),
        };
        let api_addr = listeners.api_addr()?;
        if options.public_url.is_none() && api_addr.ip().is_unspecified() {
            tracing::warn!(
                listen = %api_addr,
                "no --public-url: devices are told to download artifacts from 127.0.0.1, which works only on this machine"
            );
        }
        let scheme = if options.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let artifact_base = match &options.public_url {
            Some(url) => format!("{}/artifacts", url.trim_end_matches('/')),
            None => {
                let shown = if api_addr.ip().is_unspecified() {
                    SocketAddr::from(([127, 0, 0, 1], api_addr.port()))
                } else {
                    api_addr
                };
                format!("{scheme}://{shown}/artifacts")
            }
        };
        let advertise = options.advertise_url.clone().or_else(|| {
            (!api_addr.ip().is_unspecified()).then(|| format!("{scheme}://{api_addr}"))
        });
        let (outbound_tx, outbound_rx) = mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet::new(
            store,
            key,
            domain::Settings {
                replica,
                broker: broker_addr,
                broker_login,
                broker_tls,
                public_broker,
                artifact_base,
                token: options.token.clone(),
                trust: options.trust.clone(),
                desired_ttl: options.desired_ttl,
                max_bundle_bytes: options.max_bundle_bytes,
                device_quota_bytes: options.device_quota_bytes,
                ingest_only: options.ingest_only,
                require_enrolment,
                share_group: options
                    .share_group
                    .clone()
                    .unwrap_or_else(|| outpost_proto::FLEET_GROUP.to_owned()),
                logins: live_logins,
                per_device_metrics: options.per_device_metrics,
                advertise,
            },
            outbound_tx,
        ));
        if require_enrolment {
            tracing::info!(
                enrolled,
                "only enrolled devices are heard (outpost fleet enroll)"
            );
        }
        if let Some(broker) = &embedded {
            let _ = fleet.metrics.gate.set(broker.gate_stats());
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let mqtt = tokio::spawn(mqtt::run(
            Arc::clone(&fleet),
            outbound_rx,
            subscribed_tx,
            stop_rx.clone(),
        ));
        let mut tasks = Vec::new();
        if !fleet.ingest_only && fleet.store.shared() {
            // Tried once before saying ready, so a lone replica takes deployments as soon as
            // it says it is ready; then every ROLE_EVERY.
            let first = Arc::clone(&fleet);
            tokio::task::spawn_blocking(move || first.hold_role())
                .await
                .map_err(|e| FleetError::Config(format!("the publishing role: {e}")))?;
            tasks.push(tokio::spawn(role_task(Arc::clone(&fleet), stop_rx.clone())));
        }
        if !fleet.ingest_only {
            tasks.push(tokio::spawn(refresh_task(
                Arc::clone(&fleet),
                stop_rx.clone(),
            )));
            tasks.push(tokio::spawn(rollout_task(
                Arc::clone(&fleet),
                stop_rx.clone(),
            )));
            fleet
                .rules
                .load(options.rules.clone(), &fleet.store.firings(10_000)?);
            tasks.push(tokio::spawn(rules_task(
                Arc::clone(&fleet),
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(retention_task(
            Arc::clone(&fleet),
            options.retention,
            stop_rx.clone(),
        )));
        let ready = Ready {
            api: api_addr,
            broker: fleet.public_broker.to_string(),
            public_key: fleet.public_key(),
            public_key_file: options.data_dir.join("fleet.pub"),
        };
        let app = api::router(Arc::clone(&fleet));
        let mut api_stop = stop_rx;
        let stopped = async move {
            let _ = api_stop.wait_for(|stop| *stop).await;
        };
        let (limits, stats) = (options.http, Arc::clone(&fleet.metrics.http));
        let api = match &options.api_tls {
            None => tokio::spawn(outpost_http::serve(
                listeners.api,
                app,
                limits,
                stats,
                stopped,
            )),
            Some(tls) => {
                let listener = tls_listener::TlsListener::new(listeners.api, Arc::clone(tls))?;
                tokio::spawn(outpost_http::serve(listener, app, limits, stats, stopped))
            }
        };
        tracing::info!(
            api = %ready.api,
            tls = options.api_tls.is_some(),
            broker = %ready.broker,
            replica = %fleet.replica,
            key_id = fleet.key_id(),
            "fleet ready"
        );
        let broker_lost = match &embedded {
            Some(broker) => {
                let (lost_tx, lost_rx) = watch::channel(false);
                tasks.push(tokio::spawn(broker_watch(
                    broker.prober(),
                    BROKER_CHECK_EVERY,
                    lost_tx,
                )));
                Some(lost_rx)
            }
            None => None,
        };
        Ok(Self {
            ready,
            fleet,
            stop: stop_tx,
            api,
            mqtt,
            tasks,
            subscribed: subscribed_rx,
            broker: embedded,
            broker_lost,
        })
    }

    /// Where it serves.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// The fleet's domain operations and state.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Waits until the broker has acknowledged the fleet's subscriptions (from then on no
    /// device message is missed) and the fleet has announced itself online.
    pub async fn subscribed(&self) {
        let mut subscribed = self.subscribed.clone();
        let _ = subscribed.wait_for(|s| *s).await;
    }

    /// Runs until `shutdown` completes (or the API's task fails), then stops.
    /// Runs until `shutdown` completes (or the API's task fails, or the embedded broker stops
    /// answering), then stops.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut lost = self.broker_lost.clone();
        let broker_lost = async {
            match lost.as_mut() {
                Some(lost) => {
                    let _ = lost.wait_for(|l| *l).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let failed = tokio::select! {
            _ = shutdown => None,
            result = &mut self.api => Some(result.map_err(|e| FleetError::Io(std::io::Error::other(e.to_string())))),
            _ = broker_lost => Some(Err(FleetError::Config(format!(
                "the embedded MQTT broker stopped answering ({} checks {} s apart failed): stopping, for the service manager to start the fleet again",
                BROKER_CHECKS, BROKER_CHECK_EVERY.as_secs()
            )))),
        };
        let stopped = self.stop().await;
        match failed {
            Some(Err(e)) => Err(e),
            _ => stopped,
        }
    }

    /// Stops it: the API finishes the requests in progress, the MQTT client says goodbye
    /// (offline, retained) and disconnects, the background tasks end, the embedded broker
    /// closes every connection, and the store is flushed.
    pub async fn stop(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        if !self.api.is_finished()
            && tokio::time::timeout(Duration::from_secs(5), &mut self.api)
                .await
                .is_err()
        {
            self.api.abort();
            let _ = (&mut self.api).await;
        }
        if tokio::time::timeout(Duration::from_secs(3), &mut self.mqtt)
            .await
            .is_err()
        {
            self.mqtt.abort();
            let _ = (&mut self.mqtt).await;
        }
        // An aborted task lets go of the fleet only once it has been dropped: wait for that.
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        if let Some(broker) = self.broker.take() {
            let _ = tokio::task::spawn_blocking(move || broker.stop()).await;
        }
        self.fleet.store.flush()?;
        // The store's lock goes with the last reference to the fleet; a connection the API is
        // still dropping may hold one for a moment. The same directory must open again at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.fleet) > 1 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Arc::strong_count(&self.fleet) > 1 {
            tracing::warn!("something still holds the fleet; its data directory stays locked");
        }
        tracing::info!("fleet stopped");
        Ok(())
    }
}

/// How often the fleet checks that its embedded broker answers.
const BROKER_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Checks in a row that must fail before the broker counts as gone.
const BROKER_CHECKS: u32 = 3;

/// Checks the embedded broker `every` so often; says so on `lost` after [`BROKER_CHECKS`]
/// failures in a row.
async fn broker_watch(
    probe: impl Fn() -> bool + Send + Sync + 'static,
    every: Duration,
    lost: watch::Sender<bool>,
) {
    let probe = Arc::new(probe);
    let mut failures = 0;
    loop {
        tokio::time::sleep(every).await;
        let check = Arc::clone(&probe);
        let answered = tokio::task::spawn_blocking(move || check())
            .await
            .unwrap_or(false);
        if answered {
            failures = 0;
            continue;
        }
        failures += 1;
        tracing::warn!(failures, "the embedded MQTT broker did not answer a check");
        if failures >= BROKER_CHECKS {
            tracing::error!("the embedded MQTT broker is gone");
            lost.send_replace(true);
            return;
        }
    }
}

/// Runs a fleet manager on `listeners` until `shutdown` completes; `on_ready` hears where it
/// listens.
pub async fn serve(
    options: FleetOptions,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&Ready),
) -> Result<()> {
    let server = Server::start(options, listeners).await?;
    on_ready(server.ready());
    server.run_until(shutdown).await
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
        let fleet = Arc::clone(&fleet);
        if let Err(e) = tokio::task::spawn_blocking(move || fleet.refresh_desired()).await {
            tracing::error!(error = %e, "re-signing failed");
        }
    }
}

/// Drives the rollouts: one decision per unfinished rollout every second (see [`rollout`]).
async fn rollout_task(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let fleet = Arc::clone(&fleet);
        if let Err(e) = tokio::task::spawn_blocking(move || fleet.tick_rollouts()).await {
            tracing::error!(error = %e, "the rollout driver failed");
        }
    }
}

/// How often a replica on a shared database tries for the publishing role, and checks it
/// still holds the one it took: the role moves within about this (plus the time PostgreSQL
/// takes to see the holder's connection end, at once for a process that died).
pub const ROLE_EVERY: Duration = Duration::from_secs(1);

/// Takes and keeps the publishing role on a shared database (see [`Fleet::hold_role`]).
async fn role_task(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    loop {
        let held = Arc::clone(&fleet);
        if let Err(e) = tokio::task::spawn_blocking(move || held.hold_role()).await {
            tracing::error!(error = %e, "the publishing role task failed");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(ROLE_EVERY) => {}
        }
    }
}

/// Evaluates the rules whose turn has come, every second (see [`rules`]).
async fn rules_task(fleet: Arc<Fleet>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let fleet = Arc::clone(&fleet);
        if let Err(e) = tokio::task::spawn_blocking(move || fleet.tick_rules()).await {
            tracing::error!(error = %e, "the rule evaluator failed");
        }
    }
}

/// Records deleted per step of pruning: one step takes well under a second, and shutdown waits
/// for at most one.
const PRUNE_STEP: usize = 10_000;

/// Deletes telemetry and events older than `retention`, every ten minutes (and at start), in
/// steps of [`PRUNE_STEP`] records, stopping between steps when the fleet stops.
async fn retention_task(fleet: Arc<Fleet>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let cutoff = now_secs().saturating_sub(retention.as_secs());
        let mut total = 0;
        loop {
            let pruned = tokio::task::spawn_blocking({
                let fleet = Arc::clone(&fleet);
                move || fleet.prune(cutoff, PRUNE_STEP)
            })
            .await;
            match pruned {
                Ok(Ok(n)) => {
                    total += n;
                    if n < PRUNE_STEP {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cannot prune old records");
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "pruning failed");
                    break;
                }
            }
            if *stop.borrow() {
                return;
            }
        }
        if total > 0 {
            tracing::info!(records = total, "pruned records past retention");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(Duration::from_secs(600)) => {}
        }
    }
}

#[cfg(test)]
mod watch_tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_broker_that_stops_answering_is_reported_after_three_checks_and_not_before() {
        // Answers twice, then fails once, answers again, then never.
        let calls = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&calls);
        let probe = move || {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            n < 2 || n == 3
        };
        let (tx, mut rx) = watch::channel(false);
        let watcher = tokio::spawn(broker_watch(probe, Duration::from_millis(5), tx));
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l))
            .await
            .expect("reported")
            .expect("sender alive until it reports");
        // Checks 0, 1 and 3 answered; 2 failed alone (no report); 4, 5 and 6 failed in a row.
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        watcher
            .await
            .expect("the watcher ends once it has reported");
    }

    #[tokio::test]
    async fn a_live_embedded_broker_answers_its_check() {
        let broker = broker::EmbeddedBroker::start("127.0.0.1:0".parse().expect("addr"), None)
            .expect("broker");
        let probe = broker.prober();
        assert!(tokio::task::spawn_blocking(probe).await.expect("probe"));
        let probe = broker.prober();
        broker.stop();
        assert!(!tokio::task::spawn_blocking(probe).await.expect("probe"));
    }
}
