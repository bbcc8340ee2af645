//! Device configuration: a raw TOML form with a doc line per field, validated into [`Config`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_agent::{FleetConfig, FleetSection};
use outpost_bundle::manifest::{BackendKind, Batching, CacheSpec, Serving, SessionSpec};
use outpost_http::Limits;
use serde::Deserialize;

use crate::error::{HostError, Result};

/// The default configuration file, printed by `outpost device default-config`.
pub const DEFAULT_CONFIG: &str = r#"# Outpost device configuration (TOML). Every field is optional; these are the defaults.

# Where installed bundles, active versions, security counters and compiled modules live (sled).
data_dir = "/var/lib/outpost"

# The inference endpoint (Open Inference Protocol v2, raw endpoint, /metrics).
listen = "127.0.0.1:8080"

# The admin endpoint (install, activate, remove, status). It is served only when a token is
# configured, and never on the public listener. Clients send `Authorization: Bearer TOKEN`.
admin_listen = "127.0.0.1:8081"
# admin_token_file = "/etc/outpost/admin-token"

# Which keys may sign which model names (see `outpost key trust`).
trust_store = "/etc/outpost/trust.toml"

# Guest calls running at once; further requests are answered 503 at once.
max_concurrent_requests = 8

# Largest inference request body, in bytes (413 above it, before reading the body).
max_request_bytes = 8388608

# Largest JSON inference response, in bytes (an upper bound reckoned before it is written;
# above it the client is told to ask for binary outputs).
max_response_bytes = 33554432

# Bytes of requests (their bodies and the tensors decoded from them) and responses in flight
# at once, over all connections. A request takes its share before its body is read; what does
# not fit now is answered 503, what could never fit 413. See docs/reliability.md for the
# memory bound this gives.
max_inflight_bytes = 67108864

# Largest bundle accepted for install, in bytes.
max_bundle_bytes = 268435456

# The HTTP front door of both endpoints.
[http]
# Connections open at once on the inference endpoint. At the cap a new connection is let in by
# closing the one idle longest (or else the one waiting longest for a request body); only when
# all of them are running requests is it answered 503. Default: 3/4 of the file descriptors
# the process may open, less 256 kept for everything else.
# max_connections = 576
# The same for the admin endpoint.
admin_max_connections = 64
# Time a client has to send a request's head, the longest a request's body may stall (no
# bytes arriving; a slow upload that keeps moving goes through), and how long a connection
# may stay open with no request under way.
header_timeout_ms = 10000
body_timeout_ms = 30000
idle_timeout_ms = 60000

# Device-wide caps: a bundle's own limits are lowered to these, never raised.
[guest_caps]
memory_bytes = 268435456
timeout_ms = 10000
max_tensor_bytes = 67108864
# Bytes of cached responses per model version, whatever its bundle's `[serving.cache]` asks.
cache_bytes = 67108864
# Live streaming sessions per model, whatever its bundle's `[serving.sessions]` asks (each
# holds a guest instance, up to memory_bytes).
max_sessions = 64
# Guest memory all streaming sessions of the device may hold; a new session beyond is refused
# (429) until others end.
session_memory_bytes = 268435456

# Per model, the bundle's `[serving]` overridden: `false` turns a part off, a table replaces it.
# [serving.digits]
# batching = { max_batch_size = 8, max_queue_delay_us = 500 }
# cache = false
# sessions = { max_sessions = 16, idle_timeout_s = 60 }

# Inference backends for the bundles' ONNX models. tract is in every build; onnxruntime is used
# when this build has it (the `onnxruntime` feature, on by default) and a library is given here
# or in ORT_DYLIB_PATH — the one inside the `onnxruntime` wheel on PyPI works. A model whose
# bundle requires a backend runs on that one or not at all; any other on the first here that
# loads it.
[inference]
backends = ["onnxruntime", "tract"]
# onnxruntime_library = "/usr/lib/libonnxruntime.so.1.32.0"
# Threads one run of a model uses on onnxruntime, and the sessions kept per model (each runs
# one request at a time and holds its own copy of the weights; default: cores, at most 4).
onnxruntime_threads = 1
# onnxruntime_sessions = 2

# Fleet sync over MQTT. Without `broker` the device runs stand-alone (admin API and
# `outpost device install` only).
[fleet]
# broker = "mqtt://127.0.0.1:1883"
# The fleet's public key (`outpost fleet serve` prints it): desired states it did not sign are
# refused. Give the hex key or a file holding it.
# fleet_key = "…64 hex digits…"
# fleet_key_file = "/etc/outpost/fleet.pub"
# This device's id on the fleet (default: the host name).
# device_id = "edge-0001"
# Groups this device belongs to; `outpost fleet deploy --tag` targets them.
tags = []
# How often a telemetry record is taken, in milliseconds.
telemetry_interval_ms = 60000
# The telemetry outbox's size on disk; above it the oldest telemetry is dropped and counted.
outbox_quota_bytes = 16777216
# Broker credentials, when the broker requires them (`outpost fleet enroll` issues them; the
# user name is the device id, so the broker can confine each device to its own topics).
# username = "edge-0001"
# password_file = "/etc/outpost/mqtt-password"
# The fleet's CA certificates (PEM), for an mqtts:// broker and https:// artifact downloads
# (default: the system's roots).
# ca_file = "/etc/outpost/fleet-ca.pem"
"#;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    trust_store: Option<PathBuf>,
    max_concurrent_requests: Option<usize>,
    max_request_bytes: Option<u64>,
    max_response_bytes: Option<u64>,
    max_inflight_bytes: Option<u64>,
    max_bundle_bytes: Option<u64>,
    #[serde(default)]
    guest_caps: RawCaps,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    fleet: FleetSection,
    #[serde(default)]
    serving: BTreeMap<String, RawServing>,
    #[serde(default)]
    inference: RawInference,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInference {
    backends: Option<Vec<String>>,
    onnxruntime_library: Option<PathBuf>,
    onnxruntime_threads: Option<usize>,
    onnxruntime_sessions: Option<usize>,
}

/// The `[inference]` section: which backends, in which order, and onnxruntime's library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceConfig {
    /// Backends in order of preference (no repeats, at least one).
    pub backends: Vec<BackendKind>,
    /// The onnxruntime shared library (else `ORT_DYLIB_PATH`).
    pub onnxruntime_library: Option<PathBuf>,
    /// Threads per onnxruntime run (default 1).
    pub onnxruntime_threads: Option<usize>,
    /// onnxruntime sessions per model (default: cores, at most 4).
    pub onnxruntime_sessions: Option<usize>,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            backends: BackendKind::ALL.to_vec(),
            onnxruntime_library: None,
            onnxruntime_threads: None,
            onnxruntime_sessions: None,
        }
    }
}

impl RawInference {
    fn validate(self, base: &Path) -> Result<InferenceConfig> {
        let mut backends = Vec::new();
        for name in self.backends.unwrap_or_else(|| {
            BackendKind::ALL
                .iter()
                .map(|k| k.as_str().to_owned())
                .collect()
        }) {
            let kind: BackendKind = name
                .parse()
                .map_err(|e| HostError::Config(format!("inference.backends: {e}")))?;
            if backends.contains(&kind) {
                return Err(HostError::Config(format!(
                    "inference.backends names `{kind}` twice"
                )));
            }
            backends.push(kind);
        }
        if backends.is_empty() {
            return Err(HostError::Config(
                "inference.backends must name at least one backend".into(),
            ));
        }
        if self.onnxruntime_threads == Some(0) || self.onnxruntime_sessions == Some(0) {
            return Err(HostError::Config(
                "inference.onnxruntime_threads and onnxruntime_sessions must be at least 1".into(),
            ));
        }
        Ok(InferenceConfig {
            backends,
            onnxruntime_library: self.onnxruntime_library.map(|p| base.join(p)),
            onnxruntime_threads: self.onnxruntime_threads,
            onnxruntime_sessions: self.onnxruntime_sessions,
        })
    }
}

/// A part of `[serving.NAME]`: `false` (off) or its settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Toggle<T> {
    Off(bool),
    Set(T),
}

impl<T> Toggle<T> {
    fn validate(self, field: &str) -> Result<Option<T>> {
        match self {
            Toggle::Off(false) => Ok(None),
            Toggle::Off(true) => Err(HostError::Config(format!(
                "{field} is `false` (off) or a table of settings, not `true`"
            ))),
            Toggle::Set(t) => Ok(Some(t)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServing {
    batching: Option<Toggle<Batching>>,
    cache: Option<Toggle<CacheSpec>>,
    sessions: Option<Toggle<SessionSpec>>,
}

/// What the device configuration changes in one model's `[serving]`: for each part, `None`
/// keeps the bundle's, `Some(None)` turns it off, `Some(Some(_))` replaces it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServingOverride {
    /// Dynamic batching.
    pub batching: Option<Option<Batching>>,
    /// The response cache.
    pub cache: Option<Option<CacheSpec>>,
    /// Streaming sessions.
    pub sessions: Option<Option<SessionSpec>>,
}

impl ServingOverride {
    /// The bundle's `[serving]` with this override applied.
    pub fn apply(&self, bundle: &Serving) -> Serving {
        Serving {
            batching: self.batching.clone().unwrap_or(bundle.batching.clone()),
            cache: self.cache.unwrap_or(bundle.cache),
            sessions: self.sessions.unwrap_or(bundle.sessions),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    max_connections: Option<usize>,
    admin_max_connections: Option<usize>,
    header_timeout_ms: Option<u64>,
    body_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
}

impl RawHttp {
    /// The public endpoint's limits and the admin endpoint's.
    fn validate(&self) -> Result<(Limits, Limits)> {
        let defaults = Limits::default();
        let ms = |field: &str, v: Option<u64>, default: Duration| match v {
            Some(0) => Err(HostError::Config(format!("http.{field} must be positive"))),
            Some(v) => Ok(Duration::from_millis(v)),
            None => Ok(default),
        };
        let count = |field: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(HostError::Config(format!(
                "http.{field} must be at least 1"
            ))),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        let public = Limits {
            max_connections: count(
                "max_connections",
                self.max_connections,
                Limits::for_share_of_fds(0.75).max_connections,
            )?,
            header_timeout: ms(
                "header_timeout_ms",
                self.header_timeout_ms,
                defaults.header_timeout,
            )?,
            body_timeout: ms(
                "body_timeout_ms",
                self.body_timeout_ms,
                defaults.body_timeout,
            )?,
            idle_timeout: ms(
                "idle_timeout_ms",
                self.idle_timeout_ms,
                defaults.idle_timeout,
            )?,
        };
        let admin = Limits {
            max_connections: count("admin_max_connections", self.admin_max_connections, 64)?,
            ..public
        };
        Ok((public, admin))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaps {
    memory_bytes: Option<u64>,
    timeout_ms: Option<u64>,
    max_tensor_bytes: Option<u64>,
    cache_bytes: Option<u64>,
    max_sessions: Option<u32>,
    session_memory_bytes: Option<u64>,
}

/// Upper bounds on what any bundle's guest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestCaps {
    /// Largest guest linear memory, in bytes.
    pub memory_bytes: u64,
    /// Longest request deadline, in milliseconds.
    pub timeout_ms: u64,
    /// Largest tensor a guest may pass to or get from the host, in bytes.
    pub max_tensor_bytes: u64,
    /// Largest response cache of one model version, in bytes.
    pub cache_bytes: u64,
    /// Most live streaming sessions of one model.
    pub max_sessions: u32,
    /// Guest memory all streaming sessions of the device may hold.
    pub session_memory_bytes: u64,
}

impl Default for GuestCaps {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            timeout_ms: 10_000,
            max_tensor_bytes: 64 << 20,
            cache_bytes: 64 << 20,
            max_sessions: 64,
            session_memory_bytes: 256 << 20,
        }
    }
}

/// A validated device configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// sled database directory.
    pub data_dir: PathBuf,
    /// Public listener address.
    pub listen: SocketAddr,
    /// Admin listener address, if the admin API is enabled.
    pub admin_listen: Option<SocketAddr>,
    /// Admin bearer token, if the admin API is enabled.
    pub admin_token: Option<String>,
    /// Trust store file.
    pub trust_store: PathBuf,
    /// Guest calls running at once.
    pub max_concurrent_requests: usize,
    /// Largest inference request body.
    pub max_request_bytes: u64,
    /// Largest JSON inference response.
    pub max_response_bytes: u64,
    /// Bytes of requests and responses in flight at once.
    pub max_inflight_bytes: u64,
    /// Largest bundle upload.
    pub max_bundle_bytes: u64,
    /// Device-wide guest caps.
    pub guest_caps: GuestCaps,
    /// The inference endpoint's connection cap and timeouts.
    pub http: Limits,
    /// The admin endpoint's.
    pub admin_http: Limits,
    /// Fleet sync, when a broker is configured.
    pub fleet: Option<FleetConfig>,
    /// Per model, how its bundle's `[serving]` is overridden.
    pub serving: BTreeMap<String, ServingOverride>,
    /// Inference backends.
    pub inference: InferenceConfig,
}

impl Config {
    /// Parses and validates TOML text; relative paths are taken relative to `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Self> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| HostError::Config(e.to_string()))?;
        let addr = |field: &str, value: &str| -> Result<SocketAddr> {
            value.parse().map_err(|_| {
                HostError::Config(format!(
                    "`{field}` = {value:?} is not an address like 127.0.0.1:8080"
                ))
            })
        };
        let defaults = GuestCaps::default();
        let caps = GuestCaps {
            memory_bytes: raw.guest_caps.memory_bytes.unwrap_or(defaults.memory_bytes),
            timeout_ms: raw.guest_caps.timeout_ms.unwrap_or(defaults.timeout_ms),
            max_tensor_bytes: raw
                .guest_caps
                .max_tensor_bytes
                .unwrap_or(defaults.max_tensor_bytes),
            cache_bytes: raw.guest_caps.cache_bytes.unwrap_or(defaults.cache_bytes),
            max_sessions: raw.guest_caps.max_sessions.unwrap_or(defaults.max_sessions),
            session_memory_bytes: raw
                .guest_caps
                .session_memory_bytes
                .unwrap_or(defaults.session_memory_bytes),
        };
        if caps.memory_bytes == 0
            || caps.timeout_ms == 0
            || caps.max_tensor_bytes == 0
            || caps.max_sessions == 0
        {
            return Err(HostError::Config("guest_caps must be positive".into()));
        }
        let mut serving = BTreeMap::new();
        for (model, raw) in raw.serving {
            let field = |part: &str| format!("serving.{model}.{part}");
            let o = ServingOverride {
                batching: raw
                    .batching
                    .map(|t| t.validate(&field("batching")))
                    .transpose()?,
                cache: raw.cache.map(|t| t.validate(&field("cache"))).transpose()?,
                sessions: raw
                    .sessions
                    .map(|t| t.validate(&field("sessions")))
                    .transpose()?,
            };
            // The parts it sets must hold on their own.
            let set = Serving {
                batching: o.batching.clone().flatten(),
                cache: o.cache.flatten(),
                sessions: o.sessions.flatten(),
            };
            set.validate(&format!("serving.{model}"))
                .map_err(HostError::Config)?;
            serving.insert(model, o);
        }
        let admin_token = match (raw.admin_token, &raw.admin_token_file) {
            (Some(t), None) => Some(t),
            (None, Some(path)) => {
                let path = base.join(path);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    HostError::Config(format!(
                        "cannot read admin_token_file `{}`: {e}",
                        path.display()
                    ))
                })?;
                Some(text.trim().to_owned())
            }
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(HostError::Config(
                    "set admin_token or admin_token_file, not both".into(),
                ));
            }
        };
        if admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            return Err(HostError::Config(
                "the admin token must be at least 16 characters".into(),
            ));
        }
        let admin_listen = match raw.admin_listen.as_deref() {
            Some("") => None,
            Some(a) => Some(addr("admin_listen", a)?),
            None => Some(addr("admin_listen", "127.0.0.1:8081")?),
        };
        let max_concurrent_requests = raw.max_concurrent_requests.unwrap_or(8);
        if max_concurrent_requests == 0 {
            return Err(HostError::Config(
                "max_concurrent_requests must be at least 1".into(),
            ));
        }
        let fleet = raw.fleet.validate(base).map_err(HostError::Config)?;
        let inference = raw.inference.validate(base)?;
        let (http, admin_http) = raw.http.validate()?;
        let max_request_bytes = raw.max_request_bytes.unwrap_or(8 << 20);
        let max_response_bytes = raw.max_response_bytes.unwrap_or(32 << 20);
        let max_inflight_bytes = raw.max_inflight_bytes.unwrap_or(64 << 20);
        if max_inflight_bytes < max_request_bytes.max(max_response_bytes) {
            return Err(HostError::Config(format!(
                "max_inflight_bytes ({max_inflight_bytes}) must hold at least one largest request \
                 ({max_request_bytes}) and one largest response ({max_response_bytes})"
            )));
        }
        Ok(Self {
            http,
            admin_http,
            fleet,
            data_dir: base.join(raw.data_dir.unwrap_or_else(|| "/var/lib/outpost".into())),
            listen: addr("listen", raw.listen.as_deref().unwrap_or("127.0.0.1:8080"))?,
            admin_listen: admin_listen.filter(|_| admin_token.is_some()),
            admin_token,
            trust_store: base.join(
                raw.trust_store
                    .unwrap_or_else(|| "/etc/outpost/trust.toml".into()),
            ),
            max_concurrent_requests,
            max_request_bytes,
            max_response_bytes,
            max_inflight_bytes,
            max_bundle_bytes: raw.max_bundle_bytes.unwrap_or(256 << 20),
            guest_caps: caps,
            serving,
            inference,
        })
    }

    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| HostError::Config(format!("cannot read `{}`: {e}", path.display())))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_parses_to_the_defaults() {
        let c = Config::from_toml(DEFAULT_CONFIG, Path::new("/")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen, None, "no token, no admin listener");
        assert_eq!(c.guest_caps, GuestCaps::default());
        assert_eq!(c.max_concurrent_requests, 8);
        assert_eq!(c.admin_http.max_connections, 64);
        assert_eq!(c.http.header_timeout, Limits::default().header_timeout);
        assert!(c.http.max_connections >= 32);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(Config::from_toml("surprise = 1", Path::new("/")).is_err());
        assert!(Config::from_toml("listen = \"nowhere\"", Path::new("/")).is_err());
        assert!(Config::from_toml("admin_token = \"short\"", Path::new("/")).is_err());
        assert!(Config::from_toml("max_concurrent_requests = 0", Path::new("/")).is_err());
        assert!(Config::from_toml("[http]\nidle_timeout_ms = 0", Path::new("/")).is_err());
        assert!(Config::from_toml("max_inflight_bytes = 1024", Path::new("/")).is_err());
        assert!(Config::from_toml("[http]\nmax_connections = 0", Path::new("/")).is_err());
        assert!(Config::from_toml("[fleet]\nbroker = \"mqtt://h:1\"", Path::new("/")).is_err());
        assert!(Config::from_toml("[serving.m]\ncache = true", Path::new("/")).is_err());
        assert!(Config::from_toml("[serving.m]\nrocket = false", Path::new("/")).is_err());
        let zero = "[serving.m]\nbatching = { max_batch_size = 0 }";
        assert!(Config::from_toml(zero, Path::new("/")).is_err());
    }

    #[test]
    fn a_serving_override_turns_parts_off_or_replaces_them() {
        let text = "[serving.m]\ncache = false\nbatching = { max_batch_size = 4 }";
        let c = Config::from_toml(text, Path::new("/")).unwrap();
        let bundle = Serving {
            batching: None,
            cache: Some(CacheSpec { max_bytes: 100 }),
            sessions: None,
        };
        let served = c.serving["m"].apply(&bundle);
        assert_eq!(served.cache, None);
        assert_eq!(served.batching.as_ref().map(|b| b.max_batch_size), Some(4));
        assert_eq!(
            served.batching.as_ref().map(|b| b.max_queue_delay_us),
            Some(1_000),
            "the bundle spec's default"
        );
    }
}
