//! The fleet protocol shared by devices and the fleet manager. Owns: topic names, device ids,
//! the messages and events devices send, signed desired states, the fleet's REST types, and the
//! few MQTT packet fields the fleet's gate reads from untrusted clients ([`wire`]).
//! Never imports: a transport (MQTT, HTTP), a store, the fleet server or the device crates.
//!
//! Topics live under a versioned prefix, one subtree per device ([`Topics`]). The fleet's
//! desired state for a device travels as a [`SignedDesired`] envelope: the exact JSON bytes of a
//! [`DesiredState`] with an ed25519 signature by the fleet key, a generation and an expiry, so a
//! compromised broker cannot make a device install or activate anything the fleet did not sign
//! ([`SignedDesired::open`] decides what a device does with one).

use serde::{Deserialize, Serialize};

mod broker;
mod desired;
mod messages;
pub mod rest;
pub mod text;
pub mod wire;

pub use broker::{BadBrokerUrl, BrokerUrl};
pub use desired::{Deployment, DesiredState, SignedDesired, Verdict};
pub use messages::{
    DriftSeries, Event, ModelSeries, Presence, QualitySeries, ReportedState, ShadowSeries,
    TelemetryBatch, TelemetryRecord, TelemetrySample,
};

/// Version of the topic scheme and of every message type here.
pub const PROTOCOL_VERSION: u32 = 1;

/// The topic prefix of this protocol version.
pub const PREFIX: &str = "outpost/v1";

/// Shared-subscription group prefix the fleet replicas join, so each message reaches one of
/// them. Each leaf gets its own group (`outpost-fleet-telemetry`, ...): some brokers (rumqttd)
/// keep one delivery cursor per group name, so one group over two filters loses messages.
pub const FLEET_GROUP: &str = "outpost-fleet";

/// Whether `id` can name a device or a tag: 1–64 of `[A-Za-z0-9._-]`, starting with a letter
/// or digit. (No `/`, `+` or `#`: device ids are MQTT topic levels.)
pub fn is_valid_device_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A device id, checked once when made (see [`is_valid_device_id`]): every value of this type
/// is a usable MQTT topic level. Serialised as a plain string; deserialising an invalid one
/// fails.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

impl DeviceId {
    /// `id` as a device id, or [`ProtoError::InvalidDeviceId`].
    pub fn new(id: impl Into<String>) -> Result<Self, ProtoError> {
        let id = id.into();
        if is_valid_device_id(&id) {
            Ok(Self(id))
        } else {
            Err(ProtoError::InvalidDeviceId(text::bounded(
                &id,
                text::MAX_QUOTED,
            )))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = ProtoError;

    fn try_from(id: String) -> Result<Self, ProtoError> {
        Self::new(id)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = ProtoError;

    fn from_str(id: &str) -> Result<Self, ProtoError> {
        Self::new(id)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> Self {
        id.0
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One of a device's topics, under `outpost/v1/<device>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Online/offline (retained; the device's last will says offline).
    Status,
    /// The device's reported state (retained).
    Reported,
    /// The fleet's desired state for the device (retained, signed).
    Desired,
    /// Telemetry batches (QoS 1).
    Telemetry,
    /// Events: installs, activations, refusals (QoS 1).
    Events,
}

impl Topic {
    /// Every topic, in a fixed order.
    pub const ALL: [Topic; 5] = [
        Topic::Status,
        Topic::Reported,
        Topic::Desired,
        Topic::Telemetry,
        Topic::Events,
    ];

    /// The topic's last level.
    pub fn leaf(self) -> &'static str {
        match self {
            Topic::Status => "status",
            Topic::Reported => "reported",
            Topic::Desired => "desired",
            Topic::Telemetry => "telemetry",
            Topic::Events => "events",
        }
    }

    fn from_leaf(leaf: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.leaf() == leaf)
    }

    /// What the fleet subscribes to for this topic across all devices, as a shared
    /// subscription.
    pub fn fleet_subscription(self) -> String {
        self.fleet_subscription_in(FLEET_GROUP)
    }

    /// The same, in the shared-subscription group `group` (of which this names one per leaf).
    pub fn fleet_subscription_in(self, group: &str) -> String {
        let leaf = self.leaf();
        format!("$share/{group}-{leaf}/{PREFIX}/+/{leaf}")
    }
}

/// The topics of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// The topics of `device`.
    pub fn new(device: &DeviceId) -> Self {
        Self {
            base: format!("{PREFIX}/{device}"),
        }
    }

    /// The full name of one of the device's topics.
    pub fn name(&self, topic: Topic) -> String {
        format!("{}/{}", self.base, topic.leaf())
    }

    /// The device and the topic a topic name of this protocol stands for.
    pub fn parse(topic: &str) -> Option<(DeviceId, Topic)> {
        let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let (device, leaf) = rest.split_once('/')?;
        Some((DeviceId::new(device).ok()?, Topic::from_leaf(leaf)?))
    }
}

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Not a usable device id.
    #[error(
        "`{0}` is not a valid device id (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)"
    )]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        let dev = DeviceId::new("dev-1").unwrap();
        let t = Topics::new(&dev);
        assert_eq!(t.name(Topic::Desired), "outpost/v1/dev-1/desired");
        for topic in Topic::ALL {
            assert_eq!(Topics::parse(&t.name(topic)), Some((dev.clone(), topic)));
        }
        assert_eq!(Topics::parse("outpost/v1/a/b/c"), None);
        assert_eq!(Topics::parse("outpost/v1/a/other"), None, "unknown leaf");
        assert_eq!(Topics::parse("other/v1/a/status"), None);
        assert_eq!(
            Topic::Telemetry.fleet_subscription(),
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
            assert!(DeviceId::new(bad).is_err(), "{bad}");
            assert!(
                serde_json::from_value::<DeviceId>(bad.into()).is_err(),
                "{bad}"
            );
        }
        let id: DeviceId = serde_json::from_value("edge-7".into()).unwrap();
        assert_eq!(serde_json::to_value(&id).unwrap(), "edge-7");
    }
}
