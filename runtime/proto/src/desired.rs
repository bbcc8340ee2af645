//! Desired states: what the fleet wants a device to run, signed by the fleet key so a broker
//! cannot forge one, and what a device decides about each it receives.

use outpost_bundle::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// Signature context of desired-state envelopes.
const DESIRED_CONTEXT: &[u8] = b"outpost desired state v1\n";

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
    /// How the version serves, when not simply activated: a traffic policy for the model (the
    /// device's JSON form, e.g. `{"canary": {"id", "candidate": VERSION, "percent", ...}}`),
    /// under which the device installs the version without activating it and watches it
    /// against the active one (the fallback). Without it the version is activated and a shadow
    /// or canary in place ends. Older fleets never send it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<serde_json::Value>,
}

/// What the fleet wants a device to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// Protocol version.
    pub v: u32,
    /// The device it is for.
    pub device: crate::DeviceId,
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
        device: &crate::DeviceId,
        now: u64,
        applied: Option<u64>,
    ) -> Result<Verdict, ProtoError> {
        if self.key_id != fleet_key.id() {
            return Err(ProtoError::UnknownKey(crate::text::bounded(
                &self.key_id,
                crate::text::MAX_QUOTED,
            )));
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
        if state.device != *device {
            return Err(ProtoError::WrongDevice(state.device.into()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> crate::DeviceId {
        crate::DeviceId::new(s).unwrap()
    }
    use crate::PROTOCOL_VERSION;

    fn state(generation: u64, expires_at: u64) -> DesiredState {
        DesiredState {
            v: PROTOCOL_VERSION,
            device: id("dev-1"),
            generation,
            expires_at,
            deployments: vec![Deployment {
                policy: None,
                model: "digits".into(),
                version: "1.0.0".into(),
                digest: "ab".repeat(32),
                size: 1234,
                url: "http://127.0.0.1:1/artifacts/abab".into(),
            }],
        }
    }

    #[test]
    fn desired_state_verdicts() {
        let fleet = SecretKey::from_seed(&[8; 32]);
        let env = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        let env = SignedDesired::from_slice(&env.to_vec().unwrap()).unwrap();
        let pk = fleet.public();
        assert!(
            matches!(env.open(&pk, &id("dev-1"), 10, None), Ok(Verdict::Apply(s)) if s.generation == 5)
        );
        assert!(matches!(
            env.open(&pk, &id("dev-1"), 10, Some(4)),
            Ok(Verdict::Apply(_))
        ));
        assert_eq!(
            env.open(&pk, &id("dev-1"), 10, Some(5)),
            Ok(Verdict::Duplicate)
        );
        assert_eq!(
            env.open(&pk, &id("dev-1"), 10, Some(6)),
            Ok(Verdict::Stale { generation: 5 })
        );
        assert!(matches!(
            env.open(&pk, &id("dev-1"), 1000, None),
            Err(ProtoError::Expired { .. })
        ));
        assert!(matches!(
            env.open(&pk, &id("dev-2"), 10, None),
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
            wrong_key.open(&pk, &id("dev-1"), 10, None),
            Err(ProtoError::UnknownKey(_))
        ));
        let mut relabelled = wrong_key.clone();
        relabelled.key_id = fleet.id().into();
        assert_eq!(
            relabelled.open(&pk, &id("dev-1"), 10, None),
            Err(ProtoError::BadSignature)
        );
        let mut edited = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        edited.payload = edited
            .payload
            .replace("\"generation\":5", "\"generation\":9");
        assert_eq!(
            edited.open(&pk, &id("dev-1"), 10, None),
            Err(ProtoError::BadSignature)
        );
        let mut upper = SignedDesired::seal(&state(5, 1000), &fleet).unwrap();
        upper.signature = upper.signature.to_uppercase();
        assert_eq!(
            upper.open(&pk, &id("dev-1"), 10, None),
            Err(ProtoError::BadSignature)
        );
        assert!(SignedDesired::from_slice(b"{}").is_err());
    }
}
