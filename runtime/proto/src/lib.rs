//! The fleet protocol shared by devices and the fleet manager.
//!
//! Topics live under a versioned prefix, one subtree per device ([`Topics`]). The fleet's
//! desired state for a device travels as a [`SignedDesired`] envelope: the exact JSON bytes of a
//! [`DesiredState`] with an ed25519 signature by the fleet key, a generation and an expiry, so a
//! compromised broker cannot make a device install or activate anything the fleet did not sign
//! ([`SignedDesired::open`] decides what a device does with one).

mod broker;

use std::collections::BTreeMap;

use outpost_bundle::{PublicKey, SecretKey};

pub use broker::{BadBrokerUrl, BrokerUrl};
use serde::{Deserialize, Serialize};

/// Version of the topic scheme and of every message type here.
pub const PROTOCOL_VERSION: u32 = 1;

/// The topic prefix of this protocol version.
pub const PREFIX: &str = "outpost/v1";

/// Shared-subscription group prefix the fleet replicas join, so each message reaches one of
/// them. Each leaf gets its own group (`outpost-fleet-telemetry`, ...): some brokers (rumqttd)
/// keep one delivery cursor per group name, so one group over two filters loses messages.
pub const FLEET_GROUP: &str = "outpost-fleet";

/// Signature context of desired-state envelopes.
const DESIRED_CONTEXT: &[u8] = b"outpost desired state v1\n";

/// Whether `id` can name a device: 1–64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
/// (No `/`, `+` or `#`: device ids are MQTT topic levels.)
pub fn is_valid_device_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// The topics of `device`, which must be a valid device id.
    pub fn new(device: &str) -> Result<Self, ProtoError> {
        if !is_valid_device_id(device) {
            return Err(ProtoError::InvalidDeviceId(device.into()));
        }
        Ok(Self {
            base: format!("{PREFIX}/{device}"),
        })
    }

    /// Online/offline (retained; the device's last will says offline).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// The device's reported state (retained).
    pub fn reported(&self) -> String {
        format!("{}/reported", self.base)
    }

    /// The fleet's desired state for the device (retained, signed).
    pub fn desired(&self) -> String {
        format!("{}/desired", self.base)
    }

    /// Telemetry batches (QoS 1).
    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.base)
    }

    /// Events: installs, activations, refusals (QoS 1).
    pub fn events(&self) -> String {
        format!("{}/events", self.base)
    }

    /// The device id in a topic of this protocol, and the leaf (`status`, `telemetry`, ...).
    pub fn parse(topic: &str) -> Option<(&str, &str)> {
        let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let (device, leaf) = rest.split_once('/')?;
        (is_valid_device_id(device) && !leaf.contains('/')).then_some((device, leaf))
    }

    /// What the fleet subscribes to for `leaf` across all devices, as a shared subscription.
    pub fn fleet_subscription(leaf: &str) -> String {
        format!("$share/{FLEET_GROUP}-{leaf}/{PREFIX}/+/{leaf}")
    }
}

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Not a usable device id.
    #[error("`{0}` is not a valid device id (1-64 of A-Z a-z 0-9 . _ -)")]
    InvalidDeviceId(String),
    /// The message is not valid JSON of the expected shape.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A message could not be serialised (it is never sent half-made or empty).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// Which message.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The envelope is signed by a key other than the fleet's.
    #[error("desired state signed by unknown key `{0}`")]
    UnknownKey(String),
    /// The signature does not match.
    #[error("desired state signature does not verify")]
    BadSignature,
    /// The desired state is for another device.
    #[error("desired state is addressed to `{0}`, not to this device")]
    WrongDevice(String),
    /// The desired state has expired.
    #[error("desired state generation {generation} expired at {expires_at} (now {now})")]
    Expired {
        /// Its generation.
        generation: u64,
        /// When it expired (Unix seconds).
        expires_at: u64,
        /// The device's clock (Unix seconds).
        now: u64,
    },
}

/// One model the fleet wants on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Model name.
    pub model: String,
    /// Version to activate.
    pub version: String,
    /// sha256 of the bundle file.
    pub digest: String,
    /// Bundle size in bytes.
    pub size: u64,
    /// Where to download it (the fleet's artifact store).
    pub url: String,
}

/// What the fleet wants a device to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// Protocol version.
    pub v: u32,
    /// The device it is for.
    pub device: String,
    /// Increases with every change; a device ignores anything not newer than what it applied.
    pub generation: u64,
    /// Unix seconds after which the device refuses it.
    pub expires_at: u64,
    /// The deployments, one per model.
    pub deployments: Vec<Deployment>,
}

/// A desired state as it travels: exact payload bytes and the fleet's signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDesired {
    /// The `DesiredState` JSON, exactly as signed.
    pub payload: String,
    /// Id of the fleet key.
    pub key_id: String,
    /// 128 hex digits.
    pub signature: String,
}

/// What a device should do with a received desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Newer than what was applied: apply it.
    Apply(DesiredState),
    /// The generation already applied: nothing to do.
    Duplicate,
    /// Older than what was applied: ignore it.
    Stale {
        /// Its generation.
        generation: u64,
    },
}

impl SignedDesired {
    /// Signs a desired state with the fleet key.
    pub fn seal(state: &DesiredState, key: &SecretKey) -> Result<Self, ProtoError> {
        let payload = serde_json::to_string(state).map_err(|e| ProtoError::Encode {
            what: "desired state",
            reason: e.to_string(),
        })?;
        let signature = key.sign(DESIRED_CONTEXT, payload.as_bytes());
        Ok(Self {
            payload,
            key_id: key.id().to_owned(),
            signature: hex::encode(signature),
        })
    }

    /// Parses an envelope received on the `desired` topic.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, ProtoError> {
        serde_json::from_slice(bytes).map_err(|e| ProtoError::Malformed {
            what: "desired-state envelope",
            reason: e.to_string(),
        })
    }

    /// The envelope as JSON bytes.
    pub fn to_vec(&self) -> Result<Vec<u8>, ProtoError> {
        serde_json::to_vec(self).map_err(|e| ProtoError::Encode {
            what: "desired-state envelope",
            reason: e.to_string(),
        })
    }

    /// Decides, on `device`, what to do with this envelope: the fleet key must have signed it,
    /// it must be addressed to `device` and unexpired at `now` (Unix seconds), and its
    /// generation is compared with `applied`, the last generation the device applied.
    pub fn open(
        &self,
        fleet_key: &PublicKey,
        device: &str,
        now: u64,
        applied: Option<u64>,
    ) -> Result<Verdict, ProtoError> {
        if self.key_id != fleet_key.id() {
            return Err(ProtoError::UnknownKey(self.key_id.clone()));
        }
        let mut sig = [0u8; 64];
        if self.signature.bytes().any(|b| b.is_ascii_uppercase())
            || hex::decode_to_slice(&self.signature, &mut sig).is_err()
            || !fleet_key.verify(DESIRED_CONTEXT, self.payload.as_bytes(), &sig)
        {
            return Err(ProtoError::BadSignature);
        }
        let state: DesiredState =
            serde_json::from_str(&self.payload).map_err(|e| ProtoError::Malformed {
                what: "desired state",
                reason: e.to_string(),
            })?;
        if state.device != device {
            return Err(ProtoError::WrongDevice(state.device));
        }
        if now >= state.expires_at {
            return Err(ProtoError::Expired {
                generation: state.generation,
                expires_at: state.expires_at,
                now,
            });
        }
        Ok(match applied {
            Some(g) if state.generation == g => Verdict::Duplicate,
            Some(g) if state.generation < g => Verdict::Stale {
                generation: state.generation,
            },
            _ => Verdict::Apply(state),
        })
    }
}

/// What a device reports about itself (retained on `reported`).
///
/// Unknown fields are ignored and new fields default, so a fleet and its devices can be upgraded
/// one after the other.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedState {
    /// Protocol version.
    pub v: u32,
    /// The device id.
    pub device: String,
    /// Runtime version (`outpost --version`).
    pub runtime_version: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Last desired-state generation applied completely.
    pub generation: Option<u64>,
    /// Highest desired-state generation accepted (applied or being applied).
    #[serde(default)]
    pub accepted_generation: Option<u64>,
    /// Active version per model.
    pub active: BTreeMap<String, String>,
    /// Installed bundles as `model@version`.
    #[serde(default)]
    pub installed: Vec<String>,
    /// Groups this device belongs to, from its configuration.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The last error, if the last reconcile failed.
    pub last_error: Option<String>,
    /// Whether that failure looked transient and a retry is scheduled.
    #[serde(default)]
    pub retrying: bool,
    /// Records waiting in the telemetry outbox.
    #[serde(default)]
    pub outbox_pending: u64,
    /// Records the outbox quota dropped since the device was set up.
    #[serde(default)]
    pub outbox_dropped: u64,
    /// How often the device sends telemetry (the fleet counts a device silent for several
    /// intervals as offline, even when a broker lost its last will).
    #[serde(default)]
    pub telemetry_interval_ms: Option<u64>,
}

/// Online/offline, retained on `status` (the last will carries the offline one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// Protocol version.
    pub v: u32,
    /// Whether the sender is connected.
    pub online: bool,
}

impl Presence {
    /// The JSON bytes of an online or offline presence message.
    pub fn to_vec(online: bool) -> Vec<u8> {
        serde_json::to_vec(&Presence {
            v: PROTOCOL_VERSION,
            online,
        })
        .unwrap_or_default()
    }

    /// Whether a presence payload says online (anything unreadable counts as offline).
    pub fn is_online(payload: &[u8]) -> bool {
        serde_json::from_slice::<Presence>(payload).is_ok_and(|p| p.online)
    }
}

/// The retained presence topic of one fleet replica. Devices hold telemetry in their outbox
/// until at least one replica says it is online, so nothing is published into a broker that
/// has no fleet subscription yet (a restarted broker without persistence has none).
pub fn fleet_presence_topic(replica: &str) -> String {
    format!("{PREFIX}/_fleet/{replica}/status")
}

/// What devices subscribe to for the presence of every fleet replica.
pub const FLEET_PRESENCE_FILTER: &str = "outpost/v1/_fleet/+/status";

/// The replica id in a fleet presence topic.
pub fn parse_fleet_presence(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(PREFIX)?
        .strip_prefix("/_fleet/")?
        .strip_suffix("/status")
        .filter(|r| !r.is_empty() && !r.contains('/'))
}

/// One record of the store-and-forward telemetry stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRecord {
    /// Per-device sequence number: the fleet de-duplicates on (device, seq).
    pub seq: u64,
    /// Unix seconds when it was taken.
    pub time: u64,
    /// What it measures and its values.
    pub body: serde_json::Value,
}

/// A batch of telemetry records (QoS 1 on `telemetry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Protocol version.
    pub v: u32,
    /// The device id.
    pub device: String,
    /// Records in sequence order.
    pub records: Vec<TelemetryRecord>,
    /// Records the outbox quota has dropped on this device so far (never silent).
    pub dropped: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(generation: u64, expires_at: u64) -> DesiredState {
        DesiredState {
            v: PROTOCOL_VERSION,
            device: "dev-1".into(),
            generation,
            expires_at,
            deployments: vec![Deployment {
                model: "digits".into(),
                version: "1.0.0".into(),
                digest: "ab".repeat(32),
                size: 1234,
                url: "http://127.0.0.1:1/artifacts/abab".into(),
            }],
        }
    }

    #[test]
    fn topics() {
        let t = Topics::new("dev-1").unwrap();
        assert_eq!(t.desired(), "outpost/v1/dev-1/desired");
        assert_eq!(Topics::parse(&t.telemetry()), Some(("dev-1", "telemetry")));
        assert_eq!(Topics::parse("outpost/v1/a/b/c"), None);
        assert_eq!(Topics::parse("other/v1/a/b"), None);
        assert_eq!(
            Topics::fleet_subscription("telemetry"),
            "$share/outpost-fleet-telemetry/outpost/v1/+/telemetry"
        );
        assert_eq!(fleet_presence_topic("r1"), "outpost/v1/_fleet/r1/status");
        assert_eq!(
            parse_fleet_presence("outpost/v1/_fleet/r1/status"),
            Some("r1")
        );
        assert_eq!(parse_fleet_presence("outpost/v1/_fleet/a/b/status"), None);
        assert_eq!(
            Topics::parse("outpost/v1/_fleet/status"),
            None,
            "not a device"
        );
        assert!(Presence::is_online(&Presence::to_vec(true)));
        assert!(!Presence::is_online(&Presence::to_vec(false)));
        assert!(!Presence::is_online(b"garbage"));
        for bad in ["", "a/b", "+", "#", "-x", &"x".repeat(65)] {
            assert!(Topics::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn desired_state_verdicts() {
        let fleet = SecretKey::from_seed(&[8; 32]);
        let env = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        let env = SignedDesired::from_slice(&env.to_vec().unwrap()).unwrap();
        let pk = fleet.public();
        assert!(
            matches!(env.open(&pk, "dev-1", 10, None), Ok(Verdict::Apply(s)) if s.generation == 5)
        );
        assert!(matches!(
            env.open(&pk, "dev-1", 10, Some(4)),
            Ok(Verdict::Apply(_))
        ));
        assert_eq!(env.open(&pk, "dev-1", 10, Some(5)), Ok(Verdict::Duplicate));
        assert_eq!(
            env.open(&pk, "dev-1", 10, Some(6)),
            Ok(Verdict::Stale { generation: 5 })
        );
        assert!(matches!(
            env.open(&pk, "dev-1", 1000, None),
            Err(ProtoError::Expired { .. })
        ));
        assert!(matches!(
            env.open(&pk, "dev-2", 10, None),
            Err(ProtoError::WrongDevice(_))
        ));
    }

    #[test]
    fn forged_envelopes_are_refused() {
        let fleet = SecretKey::from_seed(&[8; 32]);
        let other = SecretKey::from_seed(&[9; 32]);
        let pk = fleet.public();
        let wrong_key = SignedDesired::seal(&state(5, 1000), &other).unwrap();
        assert!(matches!(
            wrong_key.open(&pk, "dev-1", 10, None),
            Err(ProtoError::UnknownKey(_))
        ));
        let mut relabelled = wrong_key.clone();
        relabelled.key_id = fleet.id().into();
        assert_eq!(
            relabelled.open(&pk, "dev-1", 10, None),
            Err(ProtoError::BadSignature)
        );
        let mut edited = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        edited.payload = edited
            .payload
            .replace("\"generation\":5", "\"generation\":9");
        assert_eq!(
            edited.open(&pk, "dev-1", 10, None),
            Err(ProtoError::BadSignature)
        );
        let mut upper = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        upper.signature = upper.signature.to_uppercase();
        assert_eq!(
            upper.open(&pk, "dev-1", 10, None),
            Err(ProtoError::BadSignature)
        );
        assert!(SignedDesired::from_slice(b"{}").is_err());
    }
}
