//! The fleet protocol shared by devices and the fleet manager.
//!
//! Topics live under a versioned prefix, one subtree per device ([`Topics`]). The fleet's
//! desired state for a device travels as a [`SignedDesired`] envelope: the exact JSON bytes of a
//! [`DesiredState`] with an ed25519 signature by the fleet key, a generation and an expiry, so a
//! compromised broker cannot make a device install or activate anything the fleet did not sign
//! ([`SignedDesired::open`] decides what a device does with one).

mod broker;
mod desired;
mod messages;
pub mod rest;

pub use broker::{BadBrokerUrl, BrokerUrl};
pub use desired::{Deployment, DesiredState, SignedDesired, Verdict};
pub use messages::{
    Event, ModelSeries, Presence, ReportedState, TelemetryBatch, TelemetryRecord, TelemetrySample,
};

/// Version of the topic scheme and of every message type here.
pub const PROTOCOL_VERSION: u32 = 1;

/// The topic prefix of this protocol version.
pub const PREFIX: &str = "outpost/v1";

/// Shared-subscription group prefix the fleet replicas join, so each message reaches one of
/// them. Each leaf gets its own group (`outpost-fleet-telemetry`, ...): some brokers (rumqttd)
/// keep one delivery cursor per group name, so one group over two filters loses messages.
pub const FLEET_GROUP: &str = "outpost-fleet";

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
}
