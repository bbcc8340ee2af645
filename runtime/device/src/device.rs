//! The device: installed bundles, loaded versions, activation with warm-up and atomic swap,
//! and request execution under a concurrency limit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use outpost_bundle::manifest::{DataType, Dim, Manifest};
use outpost_bundle::{Bundle, ReadLimits, TrustStore, sha256_hex};
use serde::Serialize;
use tokio::sync::Semaphore;

use outpost_bundle::manifest::Serving;
use outpost_engine::{CallError, CallLimits, CallOutput, Engine, Guest, GuestContext, Payload};
use outpost_inference::{BatchConfig, Batched, Tensor};

use crate::config::{Config, GuestCaps, ServingOverride};
use crate::error::{HostError, InferError, Result};
use crate::metrics::Metrics;
use crate::policy::{OnPass, Policy};
use crate::serving::{ResponseCache, Sessions, SlotState};
use crate::state::{InstalledRecord, State, StoredEvent};
use crate::watch::{CanaryWatch, Role, ShadowLane, Verdict};

/// One loaded version of a model: verified, compiled, its ONNX models optimised.
#[derive(Debug)]
pub struct Loaded {
    /// The verified manifest.
    pub manifest: Manifest,
    /// The install record.
    pub record: InstalledRecord,
    guest: Guest,
    context: Arc<GuestContext>,
    /// Batching, caching and sessions as served: the bundle's `[serving]`, overridden by the
    /// device configuration and lowered to its caps.
    pub serving: Serving,
    /// The backend serving each of its ONNX models, by model name.
    pub backends: BTreeMap<String, &'static str>,
    cache: Option<ResponseCache>,
    /// Requests running in this version's guest now: a batching model runs at once when all
    /// of them already wait in its queue, since no other call can join.
    in_flight: Arc<AtomicUsize>,
}

impl Loaded {
    /// The model version as text.
    pub fn version(&self) -> &str {
        &self.record.version
    }
}

/// How one request is routed and served beyond its payload.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestOptions<'a> {
    /// The routing key, for a model with a traffic split.
    pub route_key: Option<&'a str>,
    /// The streaming session the request belongs to; it routes like a routing key when no
    /// key is given, so a session stays on one version.
    pub session: Option<&'a str>,
}

/// A request's answer, and where it came from.
#[derive(Debug)]
pub struct Answer {
    /// The version that answered.
    pub loaded: Arc<Loaded>,
    /// What it answered.
    pub output: CallOutput,
    /// Whether the answer came from the version's response cache (`None`: it has none).
    pub cached: Option<bool>,
}

#[derive(Debug, Default)]
struct Slot {
    active: Option<Arc<Loaded>>,
    resident: BTreeMap<String, Arc<Loaded>>,
    /// How unversioned requests are routed (`primary`: to `active`).
    policy: Policy,
    /// What watches the policy's candidate.
    watch: Watch,
}

/// A canary's window or a shadow's lane, renewed with every policy and every activation.
#[derive(Debug, Clone, Default)]
enum Watch {
    #[default]
    Nothing,
    Canary(Arc<CanaryWatch>),
    Shadow(Arc<ShadowLane>),
}

/// Where one request goes, and what watches it.
struct Route {
    loaded: Arc<Loaded>,
    role: Role,
    watch: Watch,
    /// A shadow's candidate, for an unversioned request under a shadow.
    shadow: Option<Arc<Loaded>>,
}

impl Slot {
    /// A new window or lane for the policy, against the active version.
    fn rewatch(&mut self) {
        let primary = self
            .active
            .as_ref()
            .map(|a| a.version().to_owned())
            .unwrap_or_default();
        self.watch = match &self.policy {
            Policy::Canary(c) => Watch::Canary(Arc::new(CanaryWatch::new(c.clone(), primary))),
            Policy::Shadow(s) => Watch::Shadow(Arc::new(ShadowLane::new(s.clone()))),
            Policy::Primary | Policy::Split(_) => Watch::Nothing,
        };
    }

    /// The role of `version` under the policy.
    fn role_of(&self, version: &str) -> Role {
        let active = self.active.as_ref().is_some_and(|a| a.version() == version);
        if !active && self.policy.versions().any(|v| v == version) {
            Role::Candidate
        } else {
            Role::Primary
        }
    }

    /// The candidate a shadow or canary watches.
    fn candidate(&self) -> Option<&str> {
        match &self.policy {
            Policy::Shadow(s) => Some(&s.candidate),
            Policy::Canary(c) => Some(&c.candidate),
            Policy::Primary | Policy::Split(_) => None,
        }
    }

    /// Whether `version` must stay loaded: active, the previous active (for a fast
    /// rollback), or named by the policy.
    fn keeps(&self, version: &str, previous: Option<&str>) -> bool {
        self.active.as_ref().is_some_and(|a| a.version() == version)
            || previous == Some(version)
            || self.policy.versions().any(|v| v == version)
    }

    /// Unloads every resident version it does not keep.
    fn trim(&mut self, previous: Option<&str>) {
        let keep: Vec<String> = self
            .resident
            .keys()
            .filter(|v| self.keeps(v, previous))
            .cloned()
            .collect();
        self.resident.retain(|v, _| keep.contains(v));
    }
}

/// The device runtime. Share it behind an `Arc`.
#[derive(Debug)]
pub struct Device {
    engine: Engine,
    backends: crate::backends::Backends,
    state: State,
    trust: TrustStore,
    caps: GuestCaps,
    read_limits: ReadLimits,
    slots: RwLock<HashMap<String, Slot>>,
    /// Serialises activations and removals so two never interleave.
    admin: std::sync::Mutex<()>,
    permits: Arc<Semaphore>,
    max_concurrent: usize,
    /// Bytes of requests and responses in flight.
    pub(crate) budget: crate::budget::Budget,
    /// Request metrics.
    pub metrics: Arc<Metrics>,
    /// Canaries rolled back since the device started, by (model, policy id), with the reason:
    /// refused again even when the event could not be written to disk.
    rolled_back: std::sync::Mutex<HashMap<(String, String), String>>,
    /// The device configuration's `[serving.NAME]` overrides.
    serving: BTreeMap<String, ServingOverride>,
    /// Streaming sessions of every model.
    sessions: Sessions,
}

/// One model's status, as the admin API and `outpost device status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// Model name.
    pub name: String,
    /// Active version, if any.
    pub active: Option<String>,
    /// Versions loaded in memory.
    pub resident: Vec<String>,
    /// Installed versions.
    pub installed: Vec<InstalledRecord>,
    /// Highest security counter accepted.
    pub highest_security_counter: Option<u64>,
    /// How unversioned requests are routed.
    pub policy: Policy,
}

impl Device {
    /// Opens the state in `config.data_dir`, reads the trust store, and loads the active
    /// version of every model. A version that fails to load is logged and skipped, so one bad
    /// model never keeps the others from serving.
    pub fn open(config: &Config) -> Result<Self> {
        let trust_text = std::fs::read_to_string(&config.trust_store).map_err(|e| {
            HostError::Config(format!(
                "cannot read trust store `{}`: {e}",
                config.trust_store.display()
            ))
        })?;
        let trust = TrustStore::from_toml_str(&trust_text)?;
        Self::with_trust(config, trust)
    }

    /// Like [`Device::open`] with a trust store given directly.
    pub fn with_trust(config: &Config, trust: TrustStore) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)?;
        let state = State::open(&config.data_dir)?;
        let engine = Engine::new()
            .map_err(|e| HostError::Config(format!("cannot start the engine: {e:#}")))?;
        let metrics = Arc::new(Metrics::default());
        let device = Self {
            engine,
            backends: crate::backends::Backends::new(&config.inference),
            state,
            trust,
            caps: config.guest_caps,
            read_limits: ReadLimits {
                max_file_bytes: config.max_bundle_bytes,
                max_total_bytes: config.max_bundle_bytes,
                ..ReadLimits::default()
            },
            slots: RwLock::new(HashMap::new()),
            admin: std::sync::Mutex::new(()),
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            max_concurrent: config.max_concurrent_requests,
            budget: crate::budget::Budget::new(config.max_inflight_bytes),
            sessions: Sessions::new(
                Arc::clone(&metrics.serving),
                config.guest_caps.session_memory_bytes,
            ),
            metrics,
            rolled_back: std::sync::Mutex::new(HashMap::new()),
            serving: config.serving.clone(),
        };
        for (name, version) in device.state.active()? {
            match device.load(&name, &version) {
                Ok(loaded) => {
                    let mut slots = device.slots.write().map_err(|_| poisoned())?;
                    let slot = slots.entry(name.clone()).or_default();
                    slot.resident.insert(version.clone(), Arc::clone(&loaded));
                    slot.active = Some(loaded);
                    tracing::info!(model = %name, %version, "serving");
                }
                Err(e) => {
                    tracing::error!(model = %name, %version, error = %e, "cannot load the active version")
                }
            }
        }
        // The previous versions stay resident (and addressable) after a restart as before it.
        for (name, version) in device.state.previous()? {
            let serving = device
                .slots
                .read()
                .map_err(|_| poisoned())?
                .get(&name)
                .and_then(|s| s.active.as_ref().map(|a| a.version() != version))
                .unwrap_or(false);
            if !serving {
                continue;
            }
            match device.load(&name, &version) {
                Ok(loaded) => {
                    let mut slots = device.slots.write().map_err(|_| poisoned())?;
                    if let Some(slot) = slots.get_mut(&name) {
                        slot.resident.insert(version.clone(), loaded);
                    }
                }
                Err(e) => {
                    tracing::warn!(model = %name, %version, error = %e, "cannot load the previous version")
                }
            }
        }
        // Versions a traffic policy names are loaded too; a policy whose versions cannot all
        // load falls back to the active version (and says so) rather than keep a model down.
        for (name, policy) in device.state.policies()? {
            if let Err(e) = device.apply_policy(&name, policy) {
                tracing::error!(model = %name, error = %e, "cannot apply the traffic policy; serving the active version");
            }
        }
        Ok(device)
    }

    /// Sets the traffic policy of `name`: every version it names must be installed and not
    /// revoked; each is loaded and answers a warm-up request before any traffic goes to it.
    /// Recorded, so it holds after a restart. `primary` sends everything to the active
    /// version again.
    pub fn set_policy(&self, name: &str, policy: Policy) -> Result<()> {
        let _guard = self.admin.lock().map_err(|_| poisoned())?;
        policy.validate().map_err(HostError::Policy)?;
        let active = self
            .slots
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .is_some_and(|s| s.active.is_some());
        if !active {
            return Err(HostError::UnknownModel(name.into()));
        }
        let slots = self.slots.read().map_err(|_| poisoned())?;
        let active = slots
            .get(name)
            .and_then(|s| s.active.as_ref())
            .map(|a| a.version().to_owned());
        drop(slots);
        if let Policy::Canary(c) = &policy
            && let Some(reason) = self.rolled_back_reason(name, &c.id)?
        {
            return Err(HostError::Policy(format!(
                "canary `{}` was rolled back on this device ({reason}); give it a new id to try again",
                c.id
            )));
        }
        let candidate = match &policy {
            Policy::Shadow(s) => Some(&s.candidate),
            Policy::Canary(c) => Some(&c.candidate),
            Policy::Primary | Policy::Split(_) => None,
        };
        if let Some(candidate) = candidate
            && active.as_ref() == Some(candidate)
        {
            return Err(HostError::Policy(format!(
                "the candidate {candidate} is the active version: name another installed version"
            )));
        }
        self.apply_policy(name, policy.clone())?;
        self.state.set_policy(name, &policy)?;
        tracing::info!(model = %name, ?policy, "traffic policy set");
        Ok(())
    }

    /// Why the canary `id` of `name` was rolled back on this device, if it was.
    fn rolled_back_reason(&self, name: &str, id: &str) -> Result<Option<String>> {
        if let Some(reason) = self
            .rolled_back
            .lock()
            .map_err(|_| poisoned())?
            .get(&(name.to_owned(), id.to_owned()))
        {
            return Ok(Some(reason.clone()));
        }
        Ok(self
            .state
            .events(crate::state::MAX_EVENTS)?
            .into_iter()
            .find_map(|e| match e.event {
                outpost_proto::Event::CanaryRolledBack {
                    model,
                    policy,
                    reason,
                    ..
                } if model == name && policy == id => Some(reason),
                _ => None,
            }))
    }

    /// Puts the policy a desired state names in place: the same policy already in place is
    /// left alone (a canary keeps its window), another is set; without one, a shadow or canary
    /// in place ends (back to `primary`) and a split stays (it may have been set on the
    /// device). Returns whether anything changed.
    pub fn settle_policy(&self, name: &str, policy: Option<Policy>) -> Result<bool> {
        let current = self.policy(name)?;
        match policy {
            Some(p) if p == current => Ok(false),
            Some(p) => self.set_policy(name, p).map(|()| true),
            None if matches!(current, Policy::Shadow(_) | Policy::Canary(_)) => {
                self.set_policy(name, Policy::Primary).map(|()| true)
            }
            None => Ok(false),
        }
    }

    /// The traffic policy of `name`.
    pub fn policy(&self, name: &str) -> Result<Policy> {
        let slots = self.slots.read().map_err(|_| poisoned())?;
        let slot = slots
            .get(name)
            .ok_or_else(|| HostError::UnknownModel(name.into()))?;
        Ok(slot.policy.clone())
    }

    /// Loads what `policy` names and switches the slot to it (unrecorded).
    fn apply_policy(&self, name: &str, policy: Policy) -> Result<()> {
        let mut ready = Vec::new();
        for version in policy.versions() {
            let resident = self
                .slots
                .read()
                .map_err(|_| poisoned())?
                .get(name)
                .and_then(|s| s.resident.get(version).cloned());
            let loaded = match resident {
                Some(l) => {
                    self.check_not_revoked(&l.record)?;
                    l
                }
                None => {
                    let loaded = self.load(name, version)?;
                    self.warm_up(&loaded)?;
                    loaded
                }
            };
            ready.push(loaded);
        }
        let previous = self.previous_of(name)?;
        let mut slots = self.slots.write().map_err(|_| poisoned())?;
        let slot = slots.entry(name.to_owned()).or_default();
        for loaded in ready {
            slot.resident
                .insert(loaded.version().to_owned(), Arc::clone(&loaded));
        }
        slot.policy = policy;
        slot.rewatch();
        slot.trim(previous.as_deref());
        Ok(())
    }

    /// The device's state database.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Verifies a bundle, checks that it would load (its guest compiles as a component that
    /// exports the contract, every model loads with its declared inputs), and records it; does
    /// not activate it. The device is untouched when any of that fails.
    pub fn install(&self, bytes: &[u8]) -> Result<InstalledRecord> {
        self.install_loaded(bytes).map(|l| l.record.clone())
    }

    /// [`Device::install`], keeping what it loaded for an activation that follows.
    fn install_loaded(&self, bytes: &[u8]) -> Result<Arc<Loaded>> {
        let _guard = self.admin.lock().map_err(|_| poisoned())?;
        let opened = Bundle::read(bytes, &self.read_limits)?;
        let name = opened.manifest().name.clone();
        let highest = self.state.highest_counter(&name)?;
        let verified = opened.verify(&self.trust, highest)?;
        let m = verified.manifest();
        let version = m.version.to_string();
        let digest = sha256_hex(bytes);
        let (guest, models, compiled, in_flight) =
            self.prepare(&m.name, &version, &digest, &verified)?;
        let size = bytes.len() + compiled.as_ref().map_or(0, Vec::len);
        self.state
            .ensure_room(size as u64, &format!("installing {name} {version}"))?;
        let record = self.state.install(
            &m.name,
            &version,
            m.security_counter,
            verified.signer(),
            &digest,
            bytes,
        )?;
        // Activation then starts from the compiled guest (a cache: if it cannot be written,
        // activation compiles again).
        if let Some(artifact) = compiled
            && let Err(e) = self.state.put_compiled(&digest, &artifact)
        {
            tracing::warn!(model = %record.name, version = %record.version, error = %e, "cannot keep the compiled guest");
        }
        tracing::info!(model = %record.name, version = %record.version, digest = %record.digest, "installed");
        Ok(self.loaded(record, m.clone(), guest, models, in_flight))
    }

    /// Installs a bundle and activates it (with the guest and models install loaded).
    pub fn install_and_activate(&self, bytes: &[u8]) -> Result<InstalledRecord> {
        let loaded = self.install_loaded(bytes)?;
        let record = loaded.record.clone();
        self.activate_with(&record.name, &record.version, Some(loaded))?;
        Ok(record)
    }

    /// Loads a version (if it is not resident), answers a warm-up request with it, then makes
    /// it the active version in one atomic swap. Requests in flight finish on the version they
    /// started with.
    pub fn activate(&self, name: &str, version: &str) -> Result<()> {
        self.activate_with(name, version, None)
    }

    /// [`Device::activate`], with the version already loaded when `ready` is given.
    fn activate_with(&self, name: &str, version: &str, ready: Option<Arc<Loaded>>) -> Result<()> {
        let _guard = self.admin.lock().map_err(|_| poisoned())?;
        self.activate_locked(name, version, ready)
    }

    /// [`Device::activate_with`] with the admin lock held.
    fn activate_locked(&self, name: &str, version: &str, ready: Option<Arc<Loaded>>) -> Result<()> {
        let resident = self
            .slots
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .and_then(|s| s.resident.get(version).cloned());
        let loaded = match resident.or(ready) {
            Some(l) => {
                self.check_not_revoked(&l.record)?;
                l
            }
            None => self.load(name, version)?,
        };
        self.warm_up(&loaded)?;
        self.state
            .ensure_room(0, &format!("activating {name} {version}"))?;
        self.state.set_active(name, version)?;
        let mut slots = self.slots.write().map_err(|_| poisoned())?;
        let slot = slots.entry(name.to_owned()).or_default();
        slot.resident
            .insert(version.to_owned(), Arc::clone(&loaded));
        // Keep the previous active version resident for a fast rollback, and what the
        // traffic policy names; drop the others.
        let previous = slot
            .active
            .replace(loaded)
            .map(|l| l.record.version.clone());
        // A shadow's or canary's candidate made active has nothing left to be compared with;
        // any other watch starts again against the new active version.
        if slot.candidate() == Some(version) {
            slot.policy = Policy::Primary;
            if let Err(e) = self.state.set_policy(name, &Policy::Primary) {
                tracing::error!(model = %name, error = %e, "cannot record the end of the traffic policy");
            }
        }
        slot.rewatch();
        slot.trim(previous.as_deref());
        let keep: Vec<&str> = std::iter::once(version)
            .chain(slot.policy.versions())
            .collect();
        self.sessions.swapped(name, &keep);
        tracing::info!(model = %name, %version, ?previous, "activated");
        Ok(())
    }

    /// Removes an installed version that is not active.
    pub fn remove(&self, name: &str, version: &str) -> Result<()> {
        let _guard = self.admin.lock().map_err(|_| poisoned())?;
        let routed = self
            .slots
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .is_some_and(|s| s.policy.versions().any(|v| v == version));
        if routed {
            return Err(HostError::RemoveRouted {
                model: name.into(),
                version: version.into(),
            });
        }
        self.state.remove(name, version)?;
        if let Some(slot) = self.slots.write().map_err(|_| poisoned())?.get_mut(name) {
            slot.resident.remove(version);
        }
        tracing::info!(model = %name, %version, "removed");
        Ok(())
    }

    fn load(&self, name: &str, version: &str) -> Result<Arc<Loaded>> {
        let record = self.state.record(name, version)?.ok_or_else(|| {
            if self
                .state
                .active()
                .ok()
                .is_some_and(|a| a.iter().any(|(n, _)| n == name))
                || self
                    .state
                    .installed()
                    .ok()
                    .is_some_and(|i| i.iter().any(|r| r.name == name))
            {
                HostError::UnknownVersion {
                    model: name.into(),
                    version: version.into(),
                }
            } else {
                HostError::UnknownModel(name.into())
            }
        })?;
        let bytes = self
            .state
            .bundle_bytes(&record.digest)?
            .ok_or_else(|| HostError::Corrupt(format!("bytes of {name} {version} are missing")))?;
        self.check_not_revoked(&record)?;
        let highest = self.state.highest_counter(name)?;
        // Verified again on every load: the trust store may have changed since the install.
        let verified = Bundle::read_verified(&bytes[..], &self.read_limits, &self.trust, highest)?;
        let manifest = verified.manifest().clone();
        let (guest, models, compiled, in_flight) =
            self.prepare(name, version, &record.digest, &verified)?;
        // A cache: kept when there is room for it (a full disk must not stop an activation).
        if let Some(artifact) = compiled {
            let kept = self
                .state
                .ensure_room(artifact.len() as u64, "keeping the compiled guest")
                .and_then(|()| self.state.put_compiled(&record.digest, &artifact));
            if let Err(e) = kept {
                tracing::warn!(model = %name, %version, error = %e, "cannot keep the compiled guest");
            }
        }
        Ok(self.loaded(record, manifest, guest, models, in_flight))
    }

    /// A loaded version: its guest and models under the manifest's limits capped by the
    /// device's.
    fn loaded(
        &self,
        record: InstalledRecord,
        manifest: Manifest,
        guest: Guest,
        models: HashMap<String, Arc<dyn outpost_inference::Model>>,
        in_flight: Arc<AtomicUsize>,
    ) -> Arc<Loaded> {
        let (name, version) = (&record.name, &record.version);
        let backends = models
            .iter()
            .map(|(onnx, m)| (onnx.clone(), m.backend()))
            .collect();
        let l = manifest.limits;
        let context = GuestContext {
            label: format!("{name} {version}"),
            models,
            metadata: manifest.metadata.clone(),
            limits: CallLimits {
                memory_bytes: l.memory_bytes.min(self.caps.memory_bytes),
                timeout_ms: l.timeout_ms.min(self.caps.timeout_ms),
                max_tensor_bytes: l.max_tensor_bytes.min(self.caps.max_tensor_bytes),
            },
        };
        let serving = self.serving_of(name, &manifest);
        let cache = serving.cache.map(|c| {
            ResponseCache::new(
                &record.digest,
                c.max_bytes,
                self.metrics.serving.cache(name, version),
            )
        });
        Arc::new(Loaded {
            manifest,
            record,
            guest,
            context: Arc::new(context),
            serving,
            backends,
            cache,
            in_flight,
        })
    }

    /// `/metrics` lines for the inference backends: whether each configured one is usable,
    /// and which one serves each ONNX model of every loaded version.
    pub fn render_backends(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP outpost_backend_available Whether a configured inference backend is usable (1) or not (0)."
        );
        let _ = writeln!(out, "# TYPE outpost_backend_available gauge");
        for (kind, why) in self.backends.availability() {
            let _ = writeln!(
                out,
                "outpost_backend_available{{backend=\"{kind}\"}} {}",
                u8::from(why.is_none())
            );
        }
        let _ = writeln!(
            out,
            "# HELP outpost_model_backend The inference backend serving an ONNX model of a loaded version (always 1)."
        );
        let _ = writeln!(out, "# TYPE outpost_model_backend gauge");
        let Ok(slots) = self.slots.read() else {
            return out;
        };
        let mut lines = Vec::new();
        for (name, slot) in slots.iter() {
            for (version, loaded) in &slot.resident {
                for (onnx, backend) in &loaded.backends {
                    lines.push(format!(
                        "outpost_model_backend{{model=\"{name}\",version=\"{version}\",onnx=\"{onnx}\",backend=\"{backend}\"}} 1"
                    ));
                }
            }
        }
        lines.sort();
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
        out
    }

    /// Ends the streaming sessions idle past their timeout, freeing their instances (the
    /// device's serving loop calls it every few seconds).
    pub fn expire_sessions(&self) {
        self.sessions.expire();
    }

    /// A bundle's `[serving]` as this device serves it: overridden by the configuration,
    /// lowered to the device's caps. Sessions win over a cache the override adds.
    fn serving_of(&self, name: &str, manifest: &Manifest) -> Serving {
        let mut serving = match self.serving.get(name) {
            Some(o) => o.apply(&manifest.serving),
            None => manifest.serving.clone(),
        };
        if let Some(c) = &mut serving.cache {
            c.max_bytes = c.max_bytes.min(self.caps.cache_bytes);
        }
        if serving.cache.is_some_and(|c| c.max_bytes == 0) {
            serving.cache = None;
        }
        if let Some(s) = &mut serving.sessions {
            s.max_sessions = s.max_sessions.min(self.caps.max_sessions);
        }
        if serving.sessions.is_some() && serving.cache.take().is_some() {
            tracing::warn!(model = %name, "a model with sessions is not cached; the cache is off");
        }
        serving
    }

    /// Compiles the guest (or takes it from the compile cache) and loads every model with its
    /// declared inputs: what activation needs, and what install checks before it records
    /// anything. A fresh compile's artifact comes back for the cache, and the count of the
    /// version's requests in its guest, which batching models read.
    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        name: &str,
        version: &str,
        digest: &str,
        verified: &outpost_bundle::VerifiedBundle,
    ) -> Result<(
        Guest,
        HashMap<String, Arc<dyn outpost_inference::Model>>,
        Option<Vec<u8>>,
        Arc<AtomicUsize>,
    )> {
        let manifest = verified.manifest();
        let guest_error = |reason: String| HostError::Guest {
            model: name.into(),
            version: version.into(),
            reason,
        };
        let mut compiled = None;
        let cached = self.state.compiled(digest)?;
        let guest = match cached.map(|artifact| self.engine.load_compiled(&artifact)) {
            Some(Ok(Some(guest))) => guest,
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(model = %name, %version, error = %e, "compiled guest unusable; recompiling");
                }
                let (guest, artifact) = self
                    .engine
                    .compile(verified.guest())
                    .map_err(|e| guest_error(format!("{e:#}")))?;
                compiled = Some(artifact);
                guest
            }
        };
        let batching = self.serving_of(name, manifest).batching;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut models = HashMap::new();
        for entry in &manifest.models {
            let bytes = verified.model(&entry.name).unwrap_or_default();
            let onnx_error = |reason: String| HostError::Onnx {
                model: name.into(),
                version: version.into(),
                onnx: entry.name.clone(),
                reason,
            };
            let model = self.backends.load(entry, bytes).map_err(onnx_error)?;
            // `bundle build` checked the whole declaration against the graph; the inputs are
            // checked again here, for a bundle made by other tools (the outputs of a model
            // loaded with pinned inputs are narrower than the graph's, so not those).
            outpost_inference::check_signature(model.as_ref(), &entry.inputs, &[])
                .map_err(onnx_error)?;
            let model = match &batching {
                Some(b) if Batched::batchable(model.as_ref()) => {
                    let config = BatchConfig {
                        max_batch_size: u64::from(b.max_batch_size),
                        max_queue_delay: Duration::from_micros(b.max_queue_delay_us),
                        preferred_sizes: b.preferred_sizes.iter().map(|n| u64::from(*n)).collect(),
                        callers: Some(Arc::clone(&in_flight)),
                    };
                    let stats = self.metrics.serving.batches(name, version, &entry.name);
                    Arc::new(Batched::new(model, config, stats))
                        as Arc<dyn outpost_inference::Model>
                }
                Some(_) => {
                    tracing::info!(model = %name, %version, onnx = %entry.name, "not batched: its inputs have a fixed first dimension");
                    model
                }
                None => model,
            };
            models.insert(entry.name.clone(), model);
        }
        Ok((guest, models, compiled, in_flight))
    }

    fn check_not_revoked(&self, record: &InstalledRecord) -> Result<()> {
        match self.state.highest_counter(&record.name)? {
            Some(highest) if record.security_counter < highest => Err(HostError::Revoked {
                model: record.name.clone(),
                version: record.version.clone(),
                counter: record.security_counter,
                highest,
            }),
            _ => Ok(()),
        }
    }

    /// Calls the guest once with zero inputs shaped like its API (symbolic dimensions as 1).
    /// Refusing the input counts as an answer; a trap, a deadline or an internal error does not.
    fn warm_up(&self, loaded: &Loaded) -> Result<()> {
        let api = &loaded.manifest.api;
        let payload = if api.inputs.is_empty() && !api.raw_content_types.is_empty() {
            Payload::Raw {
                content_type: api.raw_content_types[0].clone(),
                body: Vec::new(),
            }
        } else {
            Payload::Tensors(
                api.inputs
                    .iter()
                    .map(|spec| {
                        let shape: Vec<u64> = spec
                            .shape
                            .iter()
                            .map(|d| match d {
                                Dim::Fixed(n) => *n,
                                Dim::Symbolic(_) => 1,
                            })
                            .collect();
                        let n: u64 = shape.iter().product();
                        let size = spec.datatype.element_size().unwrap_or(4) as u64;
                        let data = match spec.datatype {
                            DataType::Bytes => (0..n).flat_map(|_| 0u32.to_le_bytes()).collect(),
                            _ => vec![0u8; (n * size).min(1 << 20) as usize],
                        };
                        Tensor {
                            name: spec.name.clone(),
                            datatype: spec.datatype,
                            shape,
                            data,
                        }
                    })
                    .collect(),
            )
        };
        // A size the spec leaves open is taken as 1, which not every model can run (a
        // detector's audio chunk, a text of at least some tokens): its model failing on that
        // input says nothing of the bundle, so only a guest that traps or hangs is refused then.
        let invented = api
            .inputs
            .iter()
            .any(|s| s.shape.iter().any(|d| matches!(d, Dim::Symbolic(_))));
        match self.engine.call(&loaded.guest, &loaded.context, payload) {
            Ok(_) | Err(CallError::InvalidInput(_)) => Ok(()),
            Err(CallError::Internal(reason)) if invented => {
                tracing::warn!(
                    model = %loaded.record.name,
                    version = %loaded.record.version,
                    %reason,
                    "warm-up request with open dimensions taken as 1 failed in the model; \
                     serving anyway"
                );
                Ok(())
            }
            Err(e) => Err(HostError::WarmUp {
                model: loaded.record.name.clone(),
                version: loaded.record.version.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// The loaded version that serves `name` (the active one, or `version` if given).
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<Arc<Loaded>, InferError> {
        self.pick(name, version, None).map(|r| r.loaded)
    }

    /// The version that answers an inference request: the one asked for, or the one the
    /// model's traffic policy picks for `key` (see [`crate::policy`]). Metadata, readiness and
    /// configuration ([`Device::resolve`]) always describe the active version.
    pub fn route(
        &self,
        name: &str,
        version: Option<&str>,
        key: Option<&str>,
    ) -> Result<Arc<Loaded>, InferError> {
        self.pick(name, version, Some(key)).map(|r| r.loaded)
    }

    /// The version asked for; else, with `routing`, the policy's pick; else the active one.
    fn pick(
        &self,
        name: &str,
        version: Option<&str>,
        routing: Option<Option<&str>>,
    ) -> Result<Route, InferError> {
        let slots = self
            .slots
            .read()
            .map_err(|_| InferError::Internal("state lock poisoned".into()))?;
        let slot = slots
            .get(name)
            .filter(|s| s.active.is_some())
            .ok_or_else(|| InferError::UnknownModel(name.into()))?;
        let (routed, watch, shadow) = match (&slot.policy, version, routing) {
            (Policy::Split(split), None, Some(key)) => {
                (Some(split.route(key)), Watch::Nothing, None)
            }
            (Policy::Canary(c), None, Some(key)) => (
                c.to_candidate(key).then_some(c.candidate.as_str()),
                slot.watch.clone(),
                None,
            ),
            (Policy::Shadow(s), None, Some(_)) => (
                None,
                slot.watch.clone(),
                slot.resident.get(&s.candidate).cloned(),
            ),
            _ => (None, Watch::Nothing, None),
        };
        let loaded = match routed.or(version) {
            None => slot
                .active
                .clone()
                .ok_or_else(|| InferError::UnknownModel(name.into()))?,
            Some(v) => slot
                .resident
                .get(v)
                .cloned()
                .ok_or_else(|| InferError::UnknownVersion {
                    model: name.into(),
                    version: v.into(),
                })?,
        };
        Ok(Route {
            role: slot.role_of(loaded.version()),
            loaded,
            watch,
            shadow,
        })
    }

    /// Runs one request on the serving version of `name`. At most `max_concurrent_requests`
    /// run at once; beyond that the request is refused at once with [`InferError::Busy`].
    pub async fn infer(
        self: &Arc<Self>,
        name: &str,
        version: Option<&str>,
        payload: Payload,
    ) -> Result<(Arc<Loaded>, CallOutput), InferError> {
        let answer = self
            .infer_with(name, version, RequestOptions::default(), payload)
            .await?;
        Ok((answer.loaded, answer.output))
    }

    /// [`Device::infer`], routed by the model's traffic policy with the request's routing key
    /// when no version is given, from the version's response cache when it has one, and in
    /// the request's streaming session when it names one.
    ///
    /// Under a canary, the request counts in its window, and a verdict is acted on at once
    /// (a rollback or a promotion, recorded as an event); under a shadow, a sample of the
    /// requests is copied to the candidate after this one is answered. A cached answer is
    /// counted in the request metrics and replays its drift observations, but is not shown
    /// to a canary's window or a shadow (they judge the model, not the cache).
    pub async fn infer_with(
        self: &Arc<Self>,
        name: &str,
        version: Option<&str>,
        options: RequestOptions<'_>,
        payload: Payload,
    ) -> Result<Answer, InferError> {
        let started = Instant::now();
        let key = options.route_key.or(options.session);
        let route = self.pick(name, version, Some(key))?;
        let loaded = Arc::clone(&route.loaded);
        let refuse = |refused: InferError| {
            self.metrics.record(
                name,
                loaded.version(),
                route.role,
                Duration::ZERO,
                Some(refused.kind()),
                &[],
            );
            refused
        };
        // The bundle's API is held here, before the guest runs.
        if let Err(reason) = crate::contract::check(&loaded.manifest.api, &payload) {
            return Err(refuse(InferError::InvalidInput(reason)));
        }
        let session = match (options.session, loaded.serving.sessions) {
            (None, _) => None,
            (Some(key), Some(spec)) => {
                let slot = self
                    .sessions
                    .open(name, loaded.version(), key, spec, version.is_some())
                    .map_err(refuse)?;
                // One call at a time in a session: a second one at once is the client's
                // mistake (which state would it see?), refused rather than queued.
                let guard = Arc::clone(&slot)
                    .try_lock_owned()
                    .map_err(|_| refuse(InferError::SessionBusy(key.to_owned())))?;
                Some((key.to_owned(), slot, guard))
            }
            (Some(_), None) => {
                return Err(refuse(InferError::BadRequest(format!(
                    "version {} of `{name}` keeps no sessions (its bundle has no \
                     [serving.sessions]); send the request without a session",
                    loaded.version()
                ))));
            }
        };
        let cache_key = loaded.cache.as_ref().map(|c| c.key(&payload));
        if let (Some(cache), Some(k)) = (&loaded.cache, &cache_key)
            && let Some(hit) = cache.get(k)
        {
            let elapsed = started.elapsed();
            self.metrics.record(
                name,
                loaded.version(),
                route.role,
                elapsed,
                None,
                &hit.observations,
            );
            self.metrics.drift.observe(
                name,
                loaded.version(),
                loaded.manifest.baseline.as_ref(),
                &hit.observations,
            );
            let output = CallOutput {
                payload: hit.payload.clone(),
                observations: hit.observations.clone(),
            };
            return Ok(Answer {
                loaded,
                output,
                cached: Some(true),
            });
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            self.metrics.record_busy();
            return Err(InferError::Busy(self.max_concurrent));
        };
        let copy = match (&route.watch, &route.shadow) {
            (Watch::Shadow(lane), Some(_)) if lane.shadow.samples() => Some(payload.clone()),
            _ => None,
        };
        let call_started = Instant::now();
        let engine = self.engine.clone();
        let target = Arc::clone(&loaded);
        let device = Arc::clone(self);
        let model = name.to_owned();
        // Everything below runs to its end even when the client goes away, so a session's
        // outcome is always recorded.
        let outcome = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _in_guest = InFlight::enter(&target.in_flight);
            let Some((key, slot, mut guard)) = session else {
                return engine
                    .call(&target.guest, &target.context, payload)
                    .map_err(InferError::from);
            };
            let result = match std::mem::take(&mut *guard) {
                SlotState::Ended(reason) => {
                    *guard = SlotState::Ended(reason.clone());
                    return Err(InferError::SessionEnded(format!(
                        "session `{key}` of `{model}` ended: {reason}; its state is gone"
                    )));
                }
                SlotState::Live(mut s) => {
                    let r = s.call(payload);
                    *guard = SlotState::Live(s);
                    r
                }
                SlotState::Fresh => match engine.session(&target.guest, &target.context) {
                    Ok(mut s) => {
                        let r = s.call(payload);
                        *guard = SlotState::Live(s);
                        r
                    }
                    Err(e) => {
                        *guard = SlotState::Ended(format!("its guest could not start: {e}"));
                        Err(e)
                    }
                },
            };
            let (memory, ended) = match (&*guard, &result) {
                (SlotState::Live(s), Err(e)) if s.is_ended() => {
                    (0, Some(format!("a call failed and ended it ({e})")))
                }
                (SlotState::Live(s), _) => (s.memory_bytes(), None),
                (SlotState::Ended(reason), _) => (0, Some(reason.clone())),
                (SlotState::Fresh, _) => (0, None),
            };
            if let Some(reason) = &ended {
                // The instance goes now; a call that finds the slot later is told why.
                *guard = SlotState::Ended(reason.clone());
            }
            device
                .sessions
                .after_call(&model, &key, &slot, memory, ended);
            result.map_err(InferError::from)
        })
        .await;
        let result =
            outcome.unwrap_or_else(|e| Err(InferError::Trap(format!("request task failed: {e}"))));
        let (error, observations) = match &result {
            Ok(out) => (None, out.observations.as_slice()),
            Err(e) => (Some(e.kind()), &[][..]),
        };
        let elapsed = call_started.elapsed();
        self.metrics.record(
            name,
            loaded.version(),
            route.role,
            elapsed,
            error,
            observations,
        );
        self.metrics.drift.observe(
            name,
            loaded.version(),
            loaded.manifest.baseline.as_ref(),
            observations,
        );
        if let Err(e) = &result {
            tracing::debug!(model = %name, version = %loaded.version(), error = %e, "request failed");
        }
        if let (Some(cache), Some(k), Ok(out)) = (&loaded.cache, cache_key, &result) {
            cache.put(k, out);
        }
        match (&route.watch, route.shadow, copy, &result) {
            (Watch::Canary(watch), ..) => {
                if let Some(verdict) = watch.record(route.role, elapsed, error) {
                    self.conclude(name, watch, verdict);
                }
            }
            (Watch::Shadow(lane), Some(candidate), Some(copy), Ok(out)) => {
                self.shadow(name, lane, candidate, copy, out.payload.clone());
            }
            _ => {}
        }
        let cached = loaded.cache.as_ref().map(|_| false);
        result.map(|output| Answer {
            loaded,
            output,
            cached,
        })
    }

    /// Runs `input` on a shadow's candidate after the primary answered `primary`, in the
    /// lane's turn, and records whether the two agree; drops it (counted) when the lane is
    /// full.
    fn shadow(
        &self,
        name: &str,
        lane: &Arc<ShadowLane>,
        candidate: Arc<Loaded>,
        input: Payload,
        primary: Payload,
    ) {
        // The copy and the primary's answer are held until the shadow ran: they take their
        // share of the byte budget, and only while half of it stays free for the traffic
        // that answers clients.
        let size = payload_bytes(&input) + payload_bytes(&primary);
        let held = (self.budget.available() >= size.saturating_mul(2))
            .then(|| self.budget.take(size, "a shadow's copy").ok())
            .flatten();
        let (Some(held), Ok(place)) = (held, Arc::clone(&lane.places).try_acquire_owned()) else {
            self.metrics.record_shadow(name, candidate.version(), None);
            return;
        };
        let engine = self.engine.clone();
        let metrics = Arc::clone(&self.metrics);
        let lane = Arc::clone(lane);
        let name = name.to_owned();
        tokio::spawn(async move {
            let _place = place;
            let _held = held;
            let _turn = lane.running.lock().await;
            let started = Instant::now();
            let target = Arc::clone(&candidate);
            let result = tokio::task::spawn_blocking(move || {
                engine
                    .call(&target.guest, &target.context, input)
                    .map_err(InferError::from)
            })
            .await
            .unwrap_or_else(|e| Err(InferError::Trap(format!("shadow task failed: {e}"))));
            let version = candidate.version();
            let elapsed = started.elapsed();
            let agreed = match &result {
                Ok(out) => {
                    metrics.record(
                        &name,
                        version,
                        Role::Shadow,
                        elapsed,
                        None,
                        &out.observations,
                    );
                    metrics.drift.observe(
                        &name,
                        version,
                        candidate.manifest.baseline.as_ref(),
                        &out.observations,
                    );
                    crate::watch::agree(lane.shadow.compare, &primary, &out.payload)
                }
                Err(e) => {
                    metrics.record(&name, version, Role::Shadow, elapsed, Some(e.kind()), &[]);
                    false
                }
            };
            metrics.record_shadow(&name, version, Some(agreed));
        });
    }

    /// Acts on a canary's verdict off the request's thread.
    fn conclude(self: &Arc<Self>, name: &str, watch: &Arc<CanaryWatch>, verdict: Verdict) {
        let device = Arc::clone(self);
        let name = name.to_owned();
        let watch = Arc::clone(watch);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = device.settle(&name, &watch, verdict) {
                tracing::error!(model = %name, error = %e, "cannot act on the canary's verdict");
            }
        });
    }

    /// Rolls a failed canary back (no more traffic, then unloaded), or promotes or holds one
    /// that passed; records the event and reports it to the fleet. Nothing happens when the
    /// policy changed since the verdict.
    fn settle(&self, name: &str, watch: &Arc<CanaryWatch>, verdict: Verdict) -> Result<()> {
        let _guard = self.admin.lock().map_err(|_| poisoned())?;
        let current = |slots: &HashMap<String, Slot>| {
            slots
                .get(name)
                .is_some_and(|s| matches!(&s.watch, Watch::Canary(w) if Arc::ptr_eq(w, watch)))
        };
        if !current(&*self.slots.read().map_err(|_| poisoned())?) {
            return Ok(());
        }
        let canary = &watch.canary;
        match verdict {
            Verdict::Watching => return Ok(()),
            Verdict::Fail {
                reason,
                primary,
                candidate,
            } => {
                // Weight 0 first: from here on the primary answers everything.
                {
                    let mut slots = self.slots.write().map_err(|_| poisoned())?;
                    if let Some(slot) = slots.get_mut(name) {
                        slot.policy = Policy::Primary;
                        slot.rewatch();
                    }
                }
                tracing::warn!(model = %name, candidate = %canary.candidate, %reason, "canary rolled back");
                if let Ok(mut done) = self.rolled_back.lock() {
                    done.insert((name.to_owned(), canary.id.clone()), reason.clone());
                }
                let event = outpost_proto::Event::CanaryRolledBack {
                    model: name.to_owned(),
                    policy: canary.id.clone(),
                    candidate: canary.candidate.clone(),
                    primary: watch.primary.clone(),
                    reason,
                    candidate_requests: candidate.requests,
                    primary_requests: primary.requests,
                };
                // The fleet hears of it even when the device's own disk refuses the record
                // (the outbox is the agent's, with its own quota).
                if let Some(link) = self.metrics.link() {
                    link.report(event.clone());
                }
                if let Err(e) = self.state.set_policy_noting(name, &Policy::Primary, &event) {
                    tracing::error!(model = %name, error = %e, "cannot record the canary's rollback; it holds until a restart");
                }
                // Then unloaded (unless it is the version kept for a rollback).
                let previous = self.previous_of(name)?;
                if let Some(slot) = self.slots.write().map_err(|_| poisoned())?.get_mut(name) {
                    slot.trim(previous.as_deref());
                }
                return Ok(());
            }
            Verdict::Pass { primary, candidate } => {
                let promoted = canary.on_pass == OnPass::Promote;
                let event = outpost_proto::Event::CanaryPassed {
                    model: name.to_owned(),
                    policy: canary.id.clone(),
                    candidate: canary.candidate.clone(),
                    primary: watch.primary.clone(),
                    promoted,
                    candidate_requests: candidate.requests,
                    primary_requests: primary.requests,
                };
                let policy = if promoted {
                    self.activate_locked(name, &canary.candidate, None)?;
                    Policy::Primary
                } else {
                    Policy::Canary(canary.clone())
                };
                tracing::info!(model = %name, candidate = %canary.candidate, promoted, "canary passed");
                if let Some(link) = self.metrics.link() {
                    link.report(event.clone());
                }
                self.state.set_policy_noting(name, &policy, &event)?;
            }
        }
        Ok(())
    }

    /// The version `name` had before its active one.
    fn previous_of(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .state
            .previous()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v))
    }

    /// The events the device decided by itself (canary verdicts), oldest first, at most the
    /// last `limit`.
    pub fn events(&self, limit: usize) -> Result<Vec<StoredEvent>> {
        self.state.events(limit)
    }

    /// Every installed bundle.
    pub fn installed(&self) -> Result<Vec<InstalledRecord>> {
        self.state.installed()
    }

    /// Status of every model known to the device.
    pub fn status(&self) -> Result<Vec<ModelStatus>> {
        let installed = self.state.installed()?;
        let slots = self.slots.read().map_err(|_| poisoned())?;
        let mut names: Vec<String> = installed.iter().map(|r| r.name.clone()).collect();
        names.dedup();
        names
            .into_iter()
            .map(|name| {
                let slot = slots.get(&name);
                Ok(ModelStatus {
                    active: slot
                        .and_then(|s| s.active.as_ref())
                        .map(|l| l.record.version.clone()),
                    resident: slot
                        .map(|s| s.resident.keys().cloned().collect())
                        .unwrap_or_default(),
                    installed: installed
                        .iter()
                        .filter(|r| r.name == name)
                        .cloned()
                        .collect(),
                    highest_security_counter: self.state.highest_counter(&name)?,
                    policy: slot.map(|s| s.policy.clone()).unwrap_or_default(),
                    name,
                })
            })
            .collect()
    }
}

/// The bytes a payload holds.
/// One request counted in a version's `in_flight` while it runs in the guest.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn payload_bytes(p: &Payload) -> u64 {
    match p {
        Payload::Tensors(t) => t.iter().map(|t| t.data.len() as u64).sum(),
        Payload::Raw { body, .. } => body.len() as u64,
    }
}

fn poisoned() -> HostError {
    HostError::Corrupt("a lock was poisoned by a panic".into())
}
