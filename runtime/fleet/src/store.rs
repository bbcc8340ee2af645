//! The fleet's state: sled trees for devices, bundles, desired states, deployments, telemetry
//! and events, and a directory of content-addressed artifact files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use outpost_proto::rest::{BundleRecord, DeploymentRecord, DeviceRecord, StoredRecord};
use outpost_proto::{Deployment, DeviceId, SignedDesired, TelemetryRecord};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionResult, TransactionError};

use crate::error::{FleetError, Result};

/// The fleet's desired state for one device, and the signed envelope last published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRecord {
    /// Device id.
    pub device: DeviceId,
    /// Current generation.
    pub generation: u64,
    /// One deployment per model.
    pub deployments: Vec<Deployment>,
    /// Unix seconds when the envelope expires.
    pub expires_at: u64,
    /// The signed envelope (retained on the device's `desired` topic).
    pub envelope: SignedDesired,
}

/// An enrolled device's credential: its broker password's SHA-256 (hex), never the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Lower-case hex SHA-256 of the password.
    pub sha256: String,
    /// Unix seconds when it was issued.
    pub issued_at: u64,
}

/// Which stream a record came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Periodic telemetry.
    Telemetry,
    /// Events.
    Events,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    /// Held for the life of the process: the store is this process's alone.
    _lock: std::fs::File,
    db: sled::Db,
    devices: sled::Tree,
    bundles: sled::Tree,
    desired: sled::Tree,
    deployments: sled::Tree,
    telemetry: sled::Tree,
    events: sled::Tree,
    credentials: sled::Tree,
    /// Rollouts by id (big-endian): their request, state and history.
    rollouts: sled::Tree,
    /// Rule firings by id (big-endian), with their delivery attempts.
    firings: sled::Tree,
    artifacts: PathBuf,
    /// Serialises read-modify-write of device and desired records.
    write: Mutex<()>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Records kept under one (device, seq): the first and up to three that conflict with it.
pub const MAX_VARIANTS: u8 = 4;

/// What [`Store::put_record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Stored: the first record under its (device, seq).
    New,
    /// The same record was already stored (re-sent after a lost acknowledgement).
    Duplicate,
    /// Stored beside a different record under the same (device, seq).
    Conflict,
    /// A different record, and [`MAX_VARIANTS`] are stored already: not stored.
    ConflictDropped,
}

fn record_key(device: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.len() + 9);
    key.extend_from_slice(device.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| FleetError::Corrupt(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| FleetError::Corrupt(e.to_string()))
}

/// Whether `d` is a lower-case sha256 hex digest.
pub fn is_digest(d: &str) -> bool {
    d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Opens the sled database at `path`. The fleet's own lock is held by now, so a sled lock
/// still taken is an earlier store of this process whose background writes are finishing
/// (sled lets go of its lock only when they are done): wait for it, a few seconds at most.
fn open_db(path: &Path) -> Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::Config::new().path(path).open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return Ok(other?),
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        // An advisory lock the operating system releases when the process ends (even by
        // `kill -9`): a second fleet on the same directory is refused by name.
        let lock = std::fs::File::create(dir.join("fleet.lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(FleetError::Config(format!(
                    "`{}` is in use by another fleet process",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(FleetError::Io(e)),
        }
        let db = open_db(&dir.join("state"))?;
        let artifacts = dir.join("artifacts");
        std::fs::create_dir_all(&artifacts)?;
        Ok(Self {
            devices: db.open_tree("devices")?,
            bundles: db.open_tree("bundles")?,
            desired: db.open_tree("desired")?,
            deployments: db.open_tree("deployments")?,
            telemetry: db.open_tree("telemetry")?,
            events: db.open_tree("events")?,
            credentials: db.open_tree("credentials")?,
            rollouts: db.open_tree("rollouts")?,
            firings: db.open_tree("firings")?,
            artifacts,
            write: Mutex::new(()),
            _lock: lock,
            db,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.write
            .lock()
            .map_err(|_| FleetError::Corrupt("store lock poisoned".into()))
    }

    /// A value of the meta tree.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    /// Sets a value of the meta tree.
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    /// Applies `change` to a device's record (created on first sight) and stores it.
    pub fn update_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord> {
        let _guard = self.lock()?;
        let mut record = match self.devices.get(id)? {
            Some(bytes) => decode(&bytes)?,
            None => DeviceRecord {
                id: id.to_owned(),
                ..DeviceRecord::default()
            },
        };
        change(&mut record);
        self.devices.insert(id, encode(&record)?)?;
        Ok(record)
    }

    /// Forgets a device: its registry record and desired state (its telemetry stays until
    /// retention removes it). Returns whether it was known.
    pub fn remove_device(&self, id: &str) -> Result<bool> {
        let _guard = self.lock()?;
        let known = self.devices.remove(id)?.is_some();
        let desired = self.desired.remove(id)?.is_some();
        self.db.flush()?;
        Ok(known || desired)
    }

    /// Enrols `device` with `credential` (replacing an earlier one) and registers it.
    pub fn put_credential(&self, device: &str, credential: &Credential) -> Result<()> {
        let _guard = self.lock()?;
        self.credentials.insert(device, encode(credential)?)?;
        if self.devices.get(device)?.is_none() {
            let record = DeviceRecord {
                id: device.to_owned(),
                ..DeviceRecord::default()
            };
            self.devices.insert(device, encode(&record)?)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Ends `device`'s credential; returns whether it had one.
    pub fn remove_credential(&self, device: &str) -> Result<bool> {
        let removed = self.credentials.remove(device)?.is_some();
        self.db.flush()?;
        Ok(removed)
    }

    /// Every enrolled device's credential, by device id.
    pub fn credentials(&self) -> Result<Vec<(String, Credential)>> {
        self.credentials
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((String::from_utf8_lossy(&key).into_owned(), decode(&value)?))
            })
            .collect()
    }

    /// Whether `device` is enrolled.
    pub fn is_enrolled(&self, device: &str) -> Result<bool> {
        Ok(self.credentials.contains_key(device)?)
    }

    /// Applies `change` to a device's record only if the device is known; returns whether it was.
    pub fn update_known_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<bool> {
        let _guard = self.lock()?;
        let Some(bytes) = self.devices.get(id)? else {
            return Ok(false);
        };
        let mut record: DeviceRecord = decode(&bytes)?;
        change(&mut record);
        self.devices.insert(id, encode(&record)?)?;
        Ok(true)
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices.get(id)?.map(|b| decode(&b)).transpose()
    }

    /// Every device, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Devices in id order, starting after `after` when given: read one at a time, so a page
    /// of a large registry costs the page, not the registry.
    pub fn devices_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<DeviceRecord>> + '_ {
        use std::ops::Bound;
        let start = match after {
            Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        self.devices
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .values()
            .map(|v| decode(&v?))
    }

    /// Stores a record unless the same record is already there under (device, seq).
    ///
    /// A different record under a (device, seq) already taken is a conflict: anyone who can
    /// publish on the broker can send a device's next sequence numbers first, and discarding
    /// what comes after as a duplicate would let them erase the genuine records. So a conflicting
    /// record is kept too, after the first, up to [`MAX_VARIANTS`] per (device, seq).
    pub fn put_record(
        &self,
        stream: Stream,
        device: &str,
        record: &TelemetryRecord,
    ) -> Result<Put> {
        self.put_record_sized(stream, device, record)
            .map(|(put, _)| put)
    }

    /// [`Store::put_record`], also telling the stored size in bytes (what the device's quota
    /// counts, and what pruning gives back).
    pub fn put_record_sized(
        &self,
        stream: Stream,
        device: &str,
        record: &TelemetryRecord,
    ) -> Result<(Put, u64)> {
        let tree = match stream {
            Stream::Telemetry => &self.telemetry,
            Stream::Events => &self.events,
        };
        let bytes = encode(&StoredRecord {
            device: device.to_owned(),
            record: record.clone(),
        })?;
        let base = record_key(device, record.seq);
        for variant in 0..MAX_VARIANTS {
            let mut key = base.clone();
            if variant > 0 {
                key.push(variant);
            }
            let size = bytes.len() as u64;
            match tree.compare_and_swap(&key, None::<&[u8]>, Some(bytes.as_slice()))? {
                Ok(()) if variant == 0 => return Ok((Put::New, size)),
                Ok(()) => return Ok((Put::Conflict, size)),
                Err(e) if e.current.as_deref() == Some(bytes.as_slice()) => {
                    return Ok((Put::Duplicate, 0));
                }
                Err(_) => {}
            }
        }
        Ok((Put::ConflictDropped, 0))
    }

    /// Records of one device (or all) after sequence number `after`, at most `limit`.
    pub fn records(
        &self,
        stream: Stream,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let tree = match stream {
            Stream::Telemetry => &self.telemetry,
            Stream::Events => &self.events,
        };
        let iter = match device {
            Some(d) => {
                let start = record_key(d, after.map_or(0, |a| a.saturating_add(1)));
                // Past every key of this device, conflicting variants included.
                let mut end = d.as_bytes().to_vec();
                end.push(1);
                tree.range(start..end)
            }
            None => tree.range::<&[u8], _>(..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item?;
            let record: StoredRecord = decode(&v)?;
            if device.is_none() && after.is_some_and(|a| record.record.seq <= a) {
                continue;
            }
            out.push(record);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Deletes records taken before `cutoff` (Unix seconds), at most `limit` of them; returns
    /// how many. Sequence numbers grow with time per device, so each device's scan stops at its
    /// first newer record.
    pub fn prune(&self, stream: Stream, cutoff: u64, limit: usize) -> Result<usize> {
        let tree = match stream {
            Stream::Telemetry => &self.telemetry,
            Stream::Events => &self.events,
        };
        let mut removed = 0;
        let mut freed: std::collections::HashMap<String, u64> = Default::default();
        let mut from: Vec<u8> = Vec::new();
        while removed < limit {
            let Some(item) = tree.range(from.as_slice()..).next() else {
                break;
            };
            let (key, value) = item?;
            let record: StoredRecord = decode(&value)?;
            if record.record.time < cutoff {
                tree.remove(&key)?;
                removed += 1;
                *freed.entry(record.device).or_default() += value.len() as u64;
                from = key.to_vec();
            } else {
                // Skip to the next device: every key of this one starts `device 0x00`, and no
                // device id holds a byte below `-`, so `device 0x01` is past them all.
                from = record.device.as_bytes().to_vec();
                from.push(1);
            }
        }
        for (device, bytes) in freed {
            self.update_known_device(&device, |d| {
                d.stored_bytes = d.stored_bytes.saturating_sub(bytes);
            })?;
        }
        Ok(removed)
    }

    /// Flushes everything written so far to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// Adds a bundle file to the artifact store (idempotent) and records it.
    pub fn put_bundle(&self, record: &BundleRecord, bytes: &[u8]) -> Result<()> {
        let path = self.artifact_path(&record.digest)?;
        if !path.exists() {
            let tmp = self
                .artifacts
                .join(format!(".{}.{}.tmp", record.digest, std::process::id()));
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
        self.bundles.insert(
            format!("{}@{}", record.name, record.version),
            encode(record)?,
        )?;
        self.db.flush()?;
        Ok(())
    }

    /// Removes a bundle record, and its artifact file unless another record has the same
    /// digest. Returns the removed record.
    pub fn remove_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        let Some(bytes) = self.bundles.remove(format!("{name}@{version}"))? else {
            return Ok(None);
        };
        let record: BundleRecord = decode(&bytes)?;
        let shared = self.bundles()?.iter().any(|b| b.digest == record.digest);
        if !shared {
            match std::fs::remove_file(self.artifact_path(&record.digest)?) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.db.flush()?;
        Ok(Some(record))
    }

    /// Every bundle, by name and version.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>> {
        self.bundles.iter().values().map(|v| decode(&v?)).collect()
    }

    /// One bundle.
    pub fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        self.bundles
            .get(format!("{name}@{version}"))?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Where an artifact's bytes are.
    pub fn artifact_path(&self, digest: &str) -> Result<PathBuf> {
        if !is_digest(digest) {
            return Err(FleetError::NotFound(format!("artifact `{digest}`")));
        }
        Ok(self.artifacts.join(digest))
    }

    /// Replaces a device's desired state with `make(previous)` and stores it.
    pub fn update_desired(
        &self,
        device: &str,
        make: impl FnOnce(Option<&DesiredRecord>) -> Result<DesiredRecord>,
    ) -> Result<DesiredRecord> {
        let _guard = self.lock()?;
        let previous: Option<DesiredRecord> =
            self.desired.get(device)?.map(|b| decode(&b)).transpose()?;
        let next = make(previous.as_ref())?;
        self.desired.insert(device, encode(&next)?)?;
        Ok(next)
    }

    /// One device's desired state.
    pub fn desired(&self, device: &str) -> Result<Option<DesiredRecord>> {
        self.desired.get(device)?.map(|b| decode(&b)).transpose()
    }

    /// Every desired state.
    pub fn all_desired(&self) -> Result<Vec<DesiredRecord>> {
        self.desired.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Stores a deployment and the desired state it gives each of `devices`, all or nothing:
    /// `make` turns each device's previous desired state into its next one, for every device
    /// before anything is written, and one transaction then writes them all with the record.
    pub fn record_deployment(
        &self,
        devices: &[DeviceId],
        mut make: impl FnMut(&DeviceId, Option<&DesiredRecord>) -> Result<DesiredRecord>,
        mut record: DeploymentRecord,
    ) -> Result<(Vec<DesiredRecord>, DeploymentRecord)> {
        let _guard = self.lock()?;
        let mut next = Vec::with_capacity(devices.len());
        for device in devices {
            let previous: Option<DesiredRecord> = self
                .desired
                .get(device.as_str())?
                .map(|b| decode(&b))
                .transpose()?;
            next.push(make(device, previous.as_ref())?);
        }
        record.id = self.db.generate_id()? + 1;
        let encoded = next
            .iter()
            .map(|r| Ok((r.device.clone(), encode(r)?)))
            .collect::<Result<Vec<_>>>()?;
        let deployment = encode(&record)?;
        (&self.desired, &self.deployments)
            .transaction(
                |(desired, deployments)| -> ConflictableTransactionResult<(), ()> {
                    for (device, bytes) in &encoded {
                        desired.insert(device.as_str().as_bytes(), bytes.as_slice())?;
                    }
                    deployments.insert(&record.id.to_be_bytes(), deployment.as_slice())?;
                    Ok(())
                },
            )
            .map_err(|e| match e {
                TransactionError::Abort(()) => {
                    FleetError::Corrupt("the deployment transaction was aborted".into())
                }
                TransactionError::Storage(e) => FleetError::Store(e),
            })?;
        self.db.flush()?;
        Ok((next, record))
    }

    /// Records of `device` taken at or after `since` (Unix seconds), oldest first, at most
    /// `limit` (the newest): read from the newest back, so the cost is the window's, not the
    /// device's history.
    pub fn recent_records(
        &self,
        stream: Stream,
        device: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>> {
        let tree = match stream {
            Stream::Telemetry => &self.telemetry,
            Stream::Events => &self.events,
        };
        let start = record_key(device, 0);
        let mut end = device.as_bytes().to_vec();
        end.push(1);
        let mut out = Vec::new();
        for item in tree.range(start..end).rev() {
            let (_, v) = item?;
            let record: StoredRecord = decode(&v)?;
            if record.record.time < since || out.len() >= limit {
                break;
            }
            out.push(record);
        }
        out.reverse();
        Ok(out)
    }

    /// A new rollout id.
    pub fn next_rollout_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    /// Stores a rollout (and flushes: its state survives a `kill -9`).
    pub fn put_rollout(&self, rollout: &outpost_proto::rest::RolloutRecord) -> Result<()> {
        self.rollouts
            .insert(rollout.id.to_be_bytes(), encode(rollout)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// One rollout.
    pub fn rollout(&self, id: u64) -> Result<Option<outpost_proto::rest::RolloutRecord>> {
        self.rollouts
            .get(id.to_be_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<outpost_proto::rest::RolloutRecord>> {
        self.rollouts.iter().values().map(|v| decode(&v?)).collect()
    }

    /// A new firing id.
    pub fn next_firing_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    /// Stores a rule firing (and flushes: a restarted fleet knows what fired and when).
    pub fn put_firing(&self, firing: &outpost_proto::rest::FiringRecord) -> Result<()> {
        self.firings
            .insert(firing.id.to_be_bytes(), encode(firing)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// The newest `limit` firings, oldest first.
    pub fn firings(&self, limit: usize) -> Result<Vec<outpost_proto::rest::FiringRecord>> {
        let mut out: Vec<_> = self
            .firings
            .iter()
            .values()
            .rev()
            .take(limit)
            .map(|v| decode(&v?))
            .collect::<Result<_>>()?;
        out.reverse();
        Ok(out)
    }

    /// Every deployment, oldest first.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.deployments
            .iter()
            .values()
            .map(|v| decode(&v?))
            .collect()
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
