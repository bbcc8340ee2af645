//! Outpost's fleet agent: keeps a device in sync with its fleet over MQTT while it serves
//! locally. Owns: the agent's own store, desired-state acceptance, the reconciler, telemetry and
//! the outbox, artifact downloads. Never imports: the device crate, wasmtime or a model backend
//! (it sees the device only through [`DeviceControl`]), or the fleet server.
//!
//! - [`session`] owns the MQTT connection. It connects with a last will (offline, retained),
//!   publishes presence and the reported state on every connect, subscribes to the device's
//!   desired state and to the fleet's presence (again after every reconnect: sessions are clean),
//!   and backs off while the broker is unreachable.
//! - [`desired`] checks desired states against the fleet key ([`SignedDesired::open`]): a newer
//!   generation is stored and handed to the reconciler, a duplicate is a no-op, an older,
//!   expired, unsigned or wrongly signed one is refused and reported as an event.
//! - [`reconcile`] downloads (resumable, size-capped, hash-checked), verifies, installs and
//!   activates what the desired state names, retrying transient failures with backoff.
//! - [`telemetry`] samples the process and the device; records and events go to the durable
//!   [`outbox::Outbox`] first; batches are published QoS 1 while a fleet replica is online, and
//!   records are deleted only when the broker acknowledges their batch. Anything
//!   unacknowledged is sent again after a reconnect, and the fleet de-duplicates on (device,
//!   sequence number).
//!
//! [`SignedDesired::open`]: outpost_proto::SignedDesired::open

mod config;
mod desired;
pub mod download;
mod error;
pub mod outbox;
mod reconcile;
mod room;
mod session;
mod store;
mod telemetry;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_proto::text::{MAX_ERROR_TEXT, bounded};
use outpost_proto::{Event, Topics};
use tokio::sync::{Notify, watch};

pub use config::{FleetConfig, FleetSection};
pub use error::{AgentError, Result};
pub use store::Store;

use outbox::{Kind, Outbox};

/// An error from the device, shown to the fleet as its message.
pub type DeviceError = Box<dyn std::error::Error + Send + Sync>;

/// One installed bundle, as the agent needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the bundle file.
    pub digest: String,
}

/// What the agent needs from the device it keeps in sync. Calls may block (installs compile
/// guests); the agent makes them off the async threads.
pub trait DeviceControl: Send + Sync + 'static {
    /// The active version of each model.
    fn active(&self) -> Result<BTreeMap<String, String>, DeviceError>;

    /// Every installed bundle.
    fn installed(&self) -> Result<Vec<Installed>, DeviceError>;

    /// Makes an installed version the active one.
    fn activate(&self, model: &str, version: &str) -> Result<(), DeviceError>;

    /// Verifies, installs and activates a bundle.
    fn install_and_activate(&self, bundle: &[u8]) -> Result<Installed, DeviceError>;

    /// Verifies and installs a bundle without activating it.
    fn install(&self, bundle: &[u8]) -> Result<Installed, DeviceError>;

    /// Puts the traffic policy a desired state names for `model` in place (the device's JSON
    /// form), or, with `None`, ends a shadow or canary in place. Returns whether anything
    /// changed. A policy the device cannot take (a canary it rolled back before, say) is an
    /// error that retrying does not mend.
    fn settle_policy(
        &self,
        model: &str,
        policy: Option<&serde_json::Value>,
    ) -> Result<bool, DeviceError>;

    /// The id of each model's traffic policy, for models with one other than `primary`.
    fn policies(&self) -> Result<BTreeMap<String, String>, DeviceError>;

    /// The device's part of a telemetry record.
    fn telemetry(&self) -> DeviceTelemetry;
}

/// What the device adds to each telemetry record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceTelemetry {
    /// Bytes the device's state occupies on disk.
    pub disk_bytes: u64,
    /// Request counters per model version.
    pub models: Vec<outpost_proto::ModelSeries>,
    /// Shadow candidates' comparisons.
    pub shadows: Vec<outpost_proto::ShadowSeries>,
    /// Drift counters per model version and feature.
    pub drift: Vec<outpost_proto::DriftSeries>,
    /// Ground-truth feedback per model version.
    pub quality: Vec<outpost_proto::QualitySeries>,
}

/// Where the agent keeps its files, and how large a bundle it may download.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The agent's database directory.
    pub store: PathBuf,
    /// Partial downloads (resumed after a restart).
    pub downloads: PathBuf,
    /// Largest bundle downloaded, in bytes.
    pub max_bundle_bytes: u64,
}

/// The fleet link as the device's `/metrics` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The MQTT session is connected to the broker.
    pub connected: bool,
    /// A fleet replica says it is online, so telemetry flows.
    pub fleet_online: bool,
    /// Records in the outbox, waiting for the broker's acknowledgement.
    pub outbox_records: u64,
    /// Bytes the outbox holds.
    pub outbox_bytes: u64,
    /// Records dropped, ever: the outbox quota's oldest, and those a full disk refused.
    pub dropped_records: u64,
    /// Connections to the broker made since the agent started.
    pub connections: u64,
    /// Established connections lost since the agent started.
    pub disconnections: u64,
    /// Telemetry batches sent again because the broker did not acknowledge them in time.
    pub resent_batches: u64,
}

/// Reads the agent's [`LinkStatus`]; cheap to clone and to call from any thread. It does not
/// keep the agent alive (the device holds it, and the agent holds the device): once the agent
/// is gone, the link reads as disconnected and reports nothing.
#[derive(Debug, Clone)]
pub struct Link(std::sync::Weak<Shared>);

impl Link {
    /// The link now.
    pub fn status(&self) -> LinkStatus {
        let Some(shared) = self.0.upgrade() else {
            return LinkStatus::default();
        };
        LinkStatus {
            connected: shared.connected.load(Ordering::Relaxed),
            fleet_online: shared.fleet_online.load(Ordering::Relaxed),
            outbox_records: shared.outbox.pending(),
            outbox_bytes: shared.outbox.bytes(),
            dropped_records: shared.outbox.dropped(),
            connections: shared.connections.load(Ordering::Relaxed),
            disconnections: shared.disconnections.load(Ordering::Relaxed),
            resent_batches: shared.resent_batches.load(Ordering::Relaxed),
        }
    }

    /// Sends an event the device raised by itself (a canary rolled back, say) to the fleet:
    /// it waits in the durable outbox until the broker acknowledges it, like the agent's own.
    pub fn report(&self, event: Event) {
        match self.0.upgrade() {
            Some(shared) => {
                shared.event(event);
                // What the device decided changes what it reports (its active version, its
                // policies).
                shared.reported_changed.notify_one();
            }
            None => tracing::warn!(
                ?event,
                "the fleet agent has stopped; the event stays on the device"
            ),
        }
    }
}

/// A running agent; dropping it does not stop it (the shutdown signal does).
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
    mqtt: tokio::task::JoinHandle<()>,
}

/// What the agent's tasks share.
struct Shared {
    device: Arc<dyn DeviceControl>,
    fleet: FleetConfig,
    topics: Topics,
    store: Store,
    outbox: Outbox,
    last_error: Mutex<Option<String>>,
    /// A transient failure is being retried.
    retrying: AtomicBool,
    /// The MQTT session is connected.
    connected: AtomicBool,
    /// A fleet replica is online (the session's view, for [`Link`]).
    fleet_online: AtomicBool,
    /// Connections made, established connections lost, batches resent (for [`Link`]).
    connections: AtomicU64,
    disconnections: AtomicU64,
    resent_batches: AtomicU64,
    reported_changed: Notify,
    outbox_changed: Notify,
    started: Instant,
    downloads: PathBuf,
    max_bundle_bytes: u64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("device", &self.fleet.device_id)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Opens the agent's store and starts its tasks on the current tokio runtime. They run
    /// until `shutdown` becomes `true`, and then say offline and disconnect.
    pub fn start(
        device: Arc<dyn DeviceControl>,
        fleet: FleetConfig,
        paths: Paths,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        let topics = Topics::new(&fleet.device_id);
        let store = Store::open(&paths.store)?;
        let outbox = store.outbox(fleet.outbox_quota_bytes)?;
        let shared = Arc::new(Shared {
            device,
            // Bounded again: a state written before errors were bounded heals at start.
            last_error: Mutex::new(store.last_error().map(|e| bounded(&e, MAX_ERROR_TEXT))),
            fleet,
            topics,
            store,
            outbox,
            retrying: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            fleet_online: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            disconnections: AtomicU64::new(0),
            resent_batches: AtomicU64::new(0),
            reported_changed: Notify::new(),
            outbox_changed: Notify::new(),
            started: Instant::now(),
            downloads: paths.downloads,
            max_bundle_bytes: paths.max_bundle_bytes,
        });
        // A desired state accepted before a restart and not finished is picked up at once,
        // with or without a broker.
        let pending = shared.store.unfinished();
        let (desired_tx, desired_rx) = watch::channel(pending);
        let mqtt = tokio::spawn(session::run(
            Arc::clone(&shared),
            desired_tx,
            shutdown.clone(),
        ));
        tokio::spawn(reconcile::run(
            Arc::clone(&shared),
            desired_rx,
            shutdown.clone(),
        ));
        tokio::spawn(telemetry::run(Arc::clone(&shared), shutdown));
        tracing::info!(
            device = %shared.fleet.device_id,
            broker = %shared.fleet.broker,
            "fleet agent started"
        );
        Ok(Self { shared, mqtt })
    }

    /// A handle on the fleet link's status, for metrics.
    pub fn link(&self) -> Link {
        Link(Arc::downgrade(&self.shared))
    }

    /// Waits (up to a few seconds) for the MQTT task to say offline after shutdown.
    pub async fn stopped(self) {
        let _ = tokio::time::timeout(Duration::from_secs(3), self.mqtt).await;
        let _ = self.shared.store.flush();
    }
}

impl Shared {
    /// Records (and persists) the last error, bounded to [`MAX_ERROR_TEXT`] bytes.
    ///
    /// [`MAX_ERROR_TEXT`]: outpost_proto::text::MAX_ERROR_TEXT
    fn set_last_error(&self, error: Option<String>) {
        let error = error.map(|e| bounded(&e, MAX_ERROR_TEXT));
        if let Err(e) = self.store.set_last_error(error.as_deref()) {
            tracing::error!(error = %e, "cannot record the last error");
        }
        if let Ok(mut e) = self.last_error.lock() {
            *e = error;
        }
        self.reported_changed.notify_one();
    }

    fn set_retrying(&self, retrying: bool) {
        self.retrying.store(retrying, Ordering::Relaxed);
    }

    fn event(&self, event: Event) {
        let body = match serde_json::to_value(&event) {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode an event");
                return;
            }
        };
        match self.outbox.push(Kind::Event, body) {
            Ok(_) => self.outbox_changed.notify_one(),
            Err(e) => tracing::error!(error = %e, "cannot write an event to the outbox"),
        }
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
