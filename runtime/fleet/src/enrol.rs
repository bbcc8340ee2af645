//! Enrolment: a device is registered by being enrolled, not by publishing. `enroll` issues a
//! device its broker credentials (a random password the fleet keeps only as a hash), `revoke`
//! ends them; on the embedded broker both take effect at once, and a revoked device's
//! connection is closed.
//!
//! When enrolment is required (always with logins on the embedded broker, or by
//! `--require-enrolment` with an external one), what a device that is not enrolled publishes
//! neither registers it nor is stored; it is counted in `outpost_fleet_unenrolled_total`.

use std::sync::atomic::Ordering;

use outpost_proto::DeviceId;
use outpost_proto::rest::Enrolment;

use crate::acl::{LiveLogins, sha256};
use crate::domain::Fleet;
use crate::error::{FleetError, Result};
use crate::store::{Credential, Store, now_secs};

impl Fleet {
    /// Whether what `device` publishes may register it and be stored.
    pub(crate) fn admits(&self, device: &DeviceId) -> bool {
        if !self.require_enrolment || self.ingest_only {
            return true;
        }
        if self.is_enrolled(device.as_str()) {
            return true;
        }
        self.metrics.unenrolled.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%device, "a message from a device not enrolled; ignored");
        false
    }

    /// Whether `device` holds credentials: enrolled, or a login in the broker's login file.
    pub fn is_enrolled(&self, device: &str) -> bool {
        self.has_login(device) || self.store.is_enrolled(device).unwrap_or(false)
    }

    /// Whether the embedded broker's login table has `device` (from `--mqtt-logins` or an
    /// enrolment).
    pub(crate) fn has_login(&self, device: &str) -> bool {
        self.logins.as_ref().is_some_and(|l| l.contains(device))
    }

    /// Issues `device` new broker credentials, registering it; earlier ones stop working at
    /// once (a connection that used them is closed). The password is in the answer only.
    pub fn enroll(&self, device: &str) -> Result<Enrolment> {
        self.owns_deployments()?;
        let id = DeviceId::new(device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| FleetError::Config(e.to_string()))?;
        let password = hex::encode(secret);
        let hash = sha256(password.as_bytes());
        let _serial = self.enrolling.lock().map_err(|_| poisoned())?;
        let replaced = self.store.is_enrolled(id.as_str())?;
        self.store.put_credential(
            id.as_str(),
            &Credential {
                sha256: hex::encode(hash),
                issued_at: now_secs(),
            },
        )?;
        if let Some(logins) = &self.logins {
            logins.enrol(&id, hash)?;
        }
        tracing::info!(device = %id, replaced, "device enrolled");
        Ok(Enrolment {
            device: id.as_str().to_owned(),
            username: id.as_str().to_owned(),
            password,
            broker: self.public_broker.to_string(),
            fleet_key: self.public_key(),
            replaced,
        })
    }

    /// Ends `device`'s credentials (its registry record stays; `forget` removes it). Returns
    /// whether it had any.
    pub fn revoke(&self, device: &str) -> Result<bool> {
        self.owns_deployments()?;
        let id = DeviceId::new(device).map_err(|e| FleetError::BadRequest(e.to_string()))?;
        let _serial = self.enrolling.lock().map_err(|_| poisoned())?;
        let stored = self.store.remove_credential(id.as_str())?;
        let live = match &self.logins {
            Some(logins) => logins.revoke(id.as_str())?,
            None => false,
        };
        if stored || live {
            // Its last will, published as its connection is closed, is no longer heard.
            self.store
                .update_known_device(id.as_str(), |d| d.online = false)?;
            tracing::info!(device = %id, "device credentials revoked");
        }
        Ok(stored || live)
    }
}

fn poisoned() -> FleetError {
    FleetError::Corrupt("the enrolment lock is poisoned".into())
}

/// Puts every credential in `store` into `logins` (at start, before the broker listens).
pub(crate) fn load_enrolled(store: &Store, logins: &LiveLogins) -> Result<usize> {
    let mut loaded = 0;
    for (device, credential) in store.credentials()? {
        let id = DeviceId::new(&device).ok();
        let hash = hex::decode(&credential.sha256)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h.as_slice()).ok());
        let (Some(id), Some(hash)) = (id, hash) else {
            tracing::warn!(%device, "a stored credential is malformed; skipped");
            continue;
        };
        logins.enrol(&id, hash)?;
        loaded += 1;
    }
    Ok(loaded)
}
