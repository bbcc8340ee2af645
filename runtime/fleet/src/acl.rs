//! Who may do what on the embedded broker: the logins it accepts, the identity each one stands
//! for, and the topics each identity may publish and subscribe to. The [`gate`](crate::gate)
//! applies it to every packet a client sends.
//!
//! A device's login is named after its device id; it may connect only as `outpost-{device}`,
//! publish only its own status, reported state, telemetry and events, and subscribe only to its
//! own desired state and the fleets' presence. So one device's login cannot read or write
//! another's topics, take over another client's session, publish desired states or a fleet's
//! presence, or join the fleet's shared subscriptions (where it would take a share of every
//! device's telemetry). A fleet's login (`fleet/{replica}`) connects as
//! `outpost-fleet-{replica}` and may do anything.
//!
//! Logins come from a file (`--mqtt-logins`) and from enrolment (`outpost fleet enroll`),
//! which adds and revokes them while the fleet runs ([`LiveLogins`]); an enrolled password is
//! kept only as its SHA-256 (it is 256 random bits, so no slow hash is needed).

use std::collections::HashMap;
use std::sync::RwLock;

use outpost_proto::{DeviceId, FLEET_PRESENCE_FILTER, Topic, Topics};

use crate::error::{FleetError, Result};

/// The user-name prefix of a fleet replica's login (a `/` is never part of a device id).
pub const FLEET_USER_PREFIX: &str = "fleet/";

/// Who a login is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A fleet replica, by name: may do anything.
    Fleet(String),
    /// One device: only its own topics.
    Device(DeviceId),
}

impl Identity {
    /// The identity a login user name stands for: `fleet/{replica}` or a device id.
    pub fn from_user(user: &str) -> Option<Self> {
        match user.strip_prefix(FLEET_USER_PREFIX) {
            Some(replica) if !replica.is_empty() && !replica.contains(['/', '+', '#']) => {
                Some(Self::Fleet(replica.to_owned()))
            }
            Some(_) => None,
            None => DeviceId::new(user).ok().map(Self::Device),
        }
    }

    /// The only client id this identity may connect with.
    pub fn client_id(&self) -> String {
        match self {
            Self::Fleet(replica) => format!("outpost-fleet-{replica}"),
            Self::Device(device) => format!("outpost-{device}"),
        }
    }

    /// Whether it may publish to `topic` (a last will included).
    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Self::Fleet(_) => true,
            Self::Device(device) => {
                let own = Topics::new(device);
                [
                    Topic::Status,
                    Topic::Reported,
                    Topic::Telemetry,
                    Topic::Events,
                ]
                .into_iter()
                .any(|t| own.name(t) == topic)
            }
        }
    }

    /// Whether it may subscribe to `filter`.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Self::Fleet(_) => true,
            Self::Device(device) => {
                filter == Topics::new(device).name(Topic::Desired)
                    || filter == FLEET_PRESENCE_FILTER
            }
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fleet(replica) => write!(f, "{FLEET_USER_PREFIX}{replica}"),
            Self::Device(device) => write!(f, "{device}"),
        }
    }
}

/// How a login's password is known.
#[derive(Clone)]
enum Secret {
    /// As written in a login file.
    Plain(String),
    /// As its SHA-256 (an enrolled device's).
    Sha256([u8; 32]),
}

impl Secret {
    fn matches(&self, password: &[u8]) -> bool {
        match self {
            Self::Plain(expected) => constant_time_eq(expected.as_bytes(), password),
            Self::Sha256(expected) => constant_time_eq(expected, &sha256(password)),
        }
    }
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut out = [0u8; 32];
    out.copy_from_slice(&sha2::Sha256::digest(bytes));
    out
}

/// The logins the embedded broker accepts, each with the identity it stands for.
#[derive(Clone, Default)]
pub struct Logins {
    by_user: HashMap<String, (Secret, Identity)>,
}

impl std::fmt::Debug for Logins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the passwords.
        f.debug_struct("Logins")
            .field("users", &self.by_user.len())
            .finish()
    }
}

impl Logins {
    /// Reads a login file: `user:password` per line, blank lines and `#` comments skipped. A
    /// user is a device id (that device's login) or `fleet/{replica}` (a fleet replica's).
    pub fn parse(text: &str) -> Result<Self> {
        let mut logins = Self::default();
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
            logins
                .insert(user, password)
                .map_err(|e| FleetError::Config(format!("login file line {}: {e}", n + 1)))?;
        }
        Ok(logins)
    }

    /// Adds (or replaces) a login; refuses a user name that is neither a device id nor
    /// `fleet/{replica}`.
    pub fn insert(&mut self, user: &str, password: &str) -> Result<()> {
        let identity = Identity::from_user(user).ok_or_else(|| {
            FleetError::Config(format!(
                "`{}` is neither a device id nor {FLEET_USER_PREFIX}REPLICA",
                outpost_proto::text::bounded(user, outpost_proto::text::MAX_QUOTED)
            ))
        })?;
        self.by_user.insert(
            user.to_owned(),
            (Secret::Plain(password.to_owned()), identity),
        );
        Ok(())
    }

    /// Adds (or replaces) an enrolled device's login, known by its password's SHA-256.
    pub(crate) fn insert_enrolled(&mut self, device: &DeviceId, sha256: [u8; 32]) {
        self.by_user.insert(
            device.as_str().to_owned(),
            (Secret::Sha256(sha256), Identity::Device(device.clone())),
        );
    }

    /// Who logs in with `user` and `password`, if the pair is known.
    pub fn check(&self, user: &str, password: &[u8]) -> Option<&Identity> {
        let (expected, identity) = self.by_user.get(user)?;
        expected.matches(password).then_some(identity)
    }

    /// Whether `user` has a login.
    pub fn contains(&self, user: &str) -> bool {
        self.by_user.contains_key(user)
    }

    /// How many logins there are.
    pub fn len(&self) -> usize {
        self.by_user.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_user.is_empty()
    }
}

/// The logins in force while the fleet runs, shared by the broker's gate and the fleet:
/// enrolment adds and revokes them, and every change is announced so the gate can close the
/// connections of a login that no longer holds.
#[derive(Debug)]
pub struct LiveLogins {
    logins: RwLock<Logins>,
    /// The user name of each change, so a connection re-checks only its own login's.
    changed: tokio::sync::broadcast::Sender<String>,
}

impl LiveLogins {
    /// Starts from `logins`.
    pub fn new(logins: Logins) -> Self {
        Self {
            logins: RwLock::new(logins),
            changed: tokio::sync::broadcast::Sender::new(CHANGES_QUEUED),
        }
    }

    /// Who logs in with `user` and `password`, if the pair is known now.
    pub fn check(&self, user: &str, password: &[u8]) -> Option<Identity> {
        self.logins
            .read()
            .ok()
            .and_then(|l| l.check(user, password).cloned())
    }

    /// Whether `user` has a login now.
    pub fn contains(&self, user: &str) -> bool {
        self.logins.read().is_ok_and(|l| l.contains(user))
    }

    /// Adds a login from a file line or an internal secret.
    pub(crate) fn insert(&self, user: &str, password: &str) -> Result<()> {
        self.change(user, |l| l.insert(user, password))
    }

    /// Adds or replaces an enrolled device's login; an earlier password stops working at once.
    pub(crate) fn enrol(&self, device: &DeviceId, sha256: [u8; 32]) -> Result<()> {
        self.change(device.as_str(), |l| {
            l.insert_enrolled(device, sha256);
            Ok(())
        })
    }

    /// Removes `user`'s login; returns whether there was one.
    pub(crate) fn revoke(&self, user: &str) -> Result<bool> {
        self.change(user, |l| Ok(l.by_user.remove(user).is_some()))
    }

    /// A receiver told the user name of every change (lagging behind means: any may have
    /// changed).
    pub(crate) fn watch(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.changed.subscribe()
    }

    fn change<T>(&self, user: &str, f: impl FnOnce(&mut Logins) -> Result<T>) -> Result<T> {
        let out = {
            let mut logins = self
                .logins
                .write()
                .map_err(|_| FleetError::Config("the login table is poisoned".into()))?;
            f(&mut logins)?
        };
        // No receiver (no device connected) is not an error.
        let _ = self.changed.send(user.to_owned());
        Ok(out)
    }
}

/// Changes a connection may fall behind on before it re-checks its login whatever they were.
const CHANGES_QUEUED: usize = 256;

/// Compares without stopping at the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Identity {
        Identity::from_user(id).unwrap()
    }

    #[test]
    fn a_device_reaches_its_own_topics_only() {
        let d = device("dev-1");
        assert_eq!(d.client_id(), "outpost-dev-1");
        for leaf in ["status", "reported", "telemetry", "events"] {
            assert!(d.may_publish(&format!("outpost/v1/dev-1/{leaf}")), "{leaf}");
            assert!(
                !d.may_publish(&format!("outpost/v1/dev-2/{leaf}")),
                "{leaf}"
            );
        }
        for forbidden in [
            "outpost/v1/dev-1/desired",
            "outpost/v1/_fleet/primary/status",
            "outpost/v1/dev-1/telemetry/x",
            "outpost/v1/+/telemetry",
            "#",
        ] {
            assert!(!d.may_publish(forbidden), "{forbidden}");
        }
        assert!(d.may_subscribe("outpost/v1/dev-1/desired"));
        assert!(d.may_subscribe(FLEET_PRESENCE_FILTER));
        for forbidden in [
            "#",
            "outpost/v1/#",
            "outpost/v1/+/desired",
            "outpost/v1/dev-2/desired",
            "outpost/v1/dev-1/telemetry",
            "$share/outpost-fleet-telemetry/outpost/v1/+/telemetry",
            "$share/x/outpost/v1/dev-1/desired",
        ] {
            assert!(!d.may_subscribe(forbidden), "{forbidden}");
        }
    }

    #[test]
    fn logins_name_who_they_are_and_check_passwords() {
        let logins = Logins::parse("# comment\n\ndev-1:pw-1\nfleet/b:pw-b\n").unwrap();
        assert_eq!(logins.len(), 2);
        assert_eq!(logins.check("dev-1", b"pw-1"), Some(&device("dev-1")));
        assert_eq!(logins.check("dev-1", b"pw-2"), None);
        assert_eq!(logins.check("dev-1", b"pw-1x"), None);
        assert_eq!(logins.check("dev-2", b"pw-1"), None);
        let fleet = logins.check("fleet/b", b"pw-b").unwrap();
        assert_eq!(fleet.client_id(), "outpost-fleet-b");
        assert!(fleet.may_publish("outpost/v1/dev-1/desired"));
        assert!(fleet.may_subscribe("#"));
        for bad in [
            "a b:pw",
            "fleet/:pw",
            "fleet/a/b:pw",
            "x/y:pw",
            "dev-1",
            ":pw",
            "dev:",
        ] {
            assert!(Logins::parse(bad).is_err(), "{bad}");
        }
        assert!(!format!("{logins:?}").contains("pw-1"));
    }

    #[test]
    fn enrolled_logins_are_checked_by_hash_and_revoked_at_once() {
        let live = LiveLogins::new(Logins::parse("dev-1:pw-1\n").unwrap());
        let mut changes = live.watch();
        let dev2 = DeviceId::new("dev-2").unwrap();
        live.enrol(&dev2, sha256(b"secret-2")).unwrap();
        assert_eq!(changes.try_recv().unwrap(), "dev-2");
        assert_eq!(live.check("dev-2", b"secret-2"), Some(device("dev-2")));
        assert_eq!(live.check("dev-2", b"secret-3"), None);
        // Enrolling again replaces the password.
        live.enrol(&dev2, sha256(b"secret-3")).unwrap();
        assert_eq!(live.check("dev-2", b"secret-2"), None);
        assert_eq!(live.check("dev-2", b"secret-3"), Some(device("dev-2")));
        assert!(live.revoke("dev-2").unwrap());
        assert!(!live.revoke("dev-2").unwrap());
        assert_eq!(changes.try_recv().unwrap(), "dev-2", "the second enrolment");
        assert_eq!(changes.try_recv().unwrap(), "dev-2", "the revocation");
        assert_eq!(live.check("dev-2", b"secret-3"), None);
        assert_eq!(live.check("dev-1", b"pw-1"), Some(device("dev-1")));
        assert!(live.contains("dev-1") && !live.contains("dev-2"));
    }
}
