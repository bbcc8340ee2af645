//! The fleet's state behind one trait, [`FleetStore`], with two implementations: [`SledStore`]
//! (the embedded default: sled trees for devices, bundles, desired states, deployments,
//! telemetry and events) and, for replicas that share their state, `PgStore` in
//! [`crate::store_pg`] (PostgreSQL). Both keep bundle files in a directory of content-addressed
//! artifact files.

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

/// The store the fleet runs on: sled or PostgreSQL.
pub type Store = Box<dyn FleetStore>;

/// Where the fleet keeps its state. Every method is blocking (sled writes to disk, PostgreSQL
/// answers over a socket) and safe to call from any thread, async workers included; the
/// fleet runs the long ones (scans, deployments) on blocking threads.
///
/// The closures some methods take run once, between reading a record and writing it back,
/// with the record locked against every other writer (every replica's, for PostgreSQL).
pub trait FleetStore: Send + Sync + std::fmt::Debug {
    /// What the store is, for logs (`sled at DIR`, `postgres at HOST`).
    fn describe(&self) -> String;
    /// Whether other fleet processes share this store (replicas on one database).
    fn shared(&self) -> bool;
    /// Whether the store answers now (a database that went away does not).
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Takes the publishing role (signing and publishing desired states, deployments,
    /// rollouts, rules) for `replica` unless another process holds it; returns whether this
    /// process holds it now, and records `api`, where this replica answers its API, for the
    /// others to forward writes to. A store no other process shares gives it at once.
    fn try_lead(&self, replica: &str, api: Option<&str>) -> Result<bool> {
        let _ = (replica, api);
        Ok(true)
    }
    /// Whether this process still holds the publishing role it took (false once its hold on
    /// it is gone: it must then stop publishing, and its desired-state writes are refused).
    fn still_leading(&self) -> bool {
        true
    }
    /// The replica that holds the publishing role, as far as the store knows.
    fn leader(&self) -> Result<Option<Leader>> {
        Ok(None)
    }
    /// A value of the meta table.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Sets a value of the meta table.
    fn set_meta(&self, key: &str, value: &[u8]) -> Result<()>;
    /// Applies `change` to a device's record (created on first sight) and stores it.
    fn update_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
    ) -> Result<DeviceRecord>;
    /// Applies `change` to a device's record only if the device is known; returns whether it was.
    fn update_known_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
    ) -> Result<bool>;
    /// Forgets a device: its registry record and desired state (its telemetry stays until
    /// retention removes it). Returns whether it was known.
    fn remove_device(&self, id: &str) -> Result<bool>;
    /// Enrols `device` with `credential` (replacing an earlier one) and registers it.
    fn put_credential(&self, device: &str, credential: &Credential) -> Result<()>;
    /// Ends `device`'s credential; returns whether it had one.
    fn remove_credential(&self, device: &str) -> Result<bool>;
    /// Every enrolled device's credential, by device id.
    fn credentials(&self) -> Result<Vec<(String, Credential)>>;
    /// Whether `device` is enrolled.
    fn is_enrolled(&self, device: &str) -> Result<bool>;
    /// One device.
    fn device(&self, id: &str) -> Result<Option<DeviceRecord>>;
    /// Every device, by id.
    fn devices(&self) -> Result<Vec<DeviceRecord>>;
    /// Devices in id order (bytewise), starting after `after` when given: read a few at a
    /// time, so a page of a large registry costs the page, not the registry.
    fn devices_after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = Result<DeviceRecord>> + 'a>;
    /// Stores a record unless the same record is already there under (device, seq), and
    /// tells the stored size in bytes (what the device's quota counts, and what pruning gives
    /// back).
    ///
    /// A different record under a (device, seq) already taken is a conflict: anyone who can
    /// publish on the broker can send a device's next sequence numbers first, and discarding
    /// what comes after as a duplicate would let them erase the genuine records. So a conflicting
    /// record is kept too, after the first, up to [`MAX_VARIANTS`] per (device, seq).
    fn put_record_sized(
        &self,
        stream: Stream,
        device: &str,
        record: &TelemetryRecord,
    ) -> Result<(Put, u64)>;
    /// Records of one device (or all) after sequence number `after`, at most `limit`, in
    /// (device, seq) order.
    fn records(
        &self,
        stream: Stream,
        device: Option<&str>,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<StoredRecord>>;
    /// Deletes records older than `cutoff` (Unix seconds), at most about `limit` of them;
    /// returns how many, and gives their bytes back to each device's quota.
    fn prune(&self, stream: Stream, cutoff: u64, limit: usize) -> Result<usize>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
    /// Runs `work` (what one device message writes) as one unit where the store has units:
    /// all of it or none (`work` returning false, or a write in it failing, undoes it), and
    /// durable by the next [`Self::flush`] rather than each write on its own. Returns whether
    /// it was kept. The embedded store writes as it goes and makes it durable at the flush.
    fn unit(&self, work: &mut dyn FnMut() -> bool) -> Result<bool> {
        Ok(work())
    }
    /// Runs `work(0)`, `work(1)`, … `work(n - 1)` (the messages of one batch, which write the
    /// records of `devices`) as one unit where the store has units: kept only if every one
    /// returned true and nothing in it failed, else none of it is; returns whether it was
    /// kept. A store without units runs none of them and returns false: the caller then
    /// stores them one at a time. After a unit not kept, so does the caller, running the
    /// work again: what it counts in memory (metrics) counts such a batch twice.
    fn unit_of_many(
        &self,
        devices: &[&str],
        n: usize,
        work: &mut dyn FnMut(usize) -> bool,
    ) -> Result<bool> {
        let _ = (devices, n, work);
        Ok(false)
    }
    /// Adds a bundle file to the artifact store (idempotent) and records it.
    fn put_bundle(&self, record: &BundleRecord, bytes: &[u8]) -> Result<()>;
    /// Removes a bundle record, and its artifact file unless another record has the same
    /// digest. Returns the removed record.
    fn remove_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>>;
    /// Every bundle, by name and version.
    fn bundles(&self) -> Result<Vec<BundleRecord>>;
    /// One bundle.
    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>>;
    /// Where an artifact's bytes are.
    fn artifact_path(&self, digest: &str) -> Result<PathBuf>;
    /// Replaces a device's desired state with `make(previous)` and stores it.
    fn update_desired_with(
        &self,
        device: &str,
        make: &mut dyn FnMut(Option<&DesiredRecord>) -> Result<DesiredRecord>,
    ) -> Result<DesiredRecord>;
    /// One device's desired state.
    fn desired(&self, device: &str) -> Result<Option<DesiredRecord>>;
    /// Every desired state.
    fn all_desired(&self) -> Result<Vec<DesiredRecord>>;
    /// For each of `devices`, in order: its desired state, and whether it holds fleet-issued
    /// credentials. What a page of the device list shows beside each record, in one read.
    fn desired_and_enrolled(&self, devices: &[&str]) -> Result<Vec<(Option<DesiredRecord>, bool)>> {
        devices
            .iter()
            .map(|d| Ok((self.desired(d)?, self.is_enrolled(d)?)))
            .collect()
    }
    /// The generation of every device's desired state, by device: what the metrics' census
    /// compares with each reported state.
    fn desired_generations(&self) -> Result<std::collections::HashMap<String, u64>> {
        Ok(self
            .all_desired()?
            .into_iter()
            .map(|d| (d.device.as_str().to_owned(), d.generation))
            .collect())
    }
    /// Stores a deployment and the desired state it gives each of `devices`, all or nothing:
    /// `make` turns each device's previous desired state into its next one, for every device
    /// before anything is written, and one transaction then writes them all with the record.
    fn record_deployment_with(
        &self,
        devices: &[DeviceId],
        make: &mut dyn FnMut(&DeviceId, Option<&DesiredRecord>) -> Result<DesiredRecord>,
        record: DeploymentRecord,
    ) -> Result<(Vec<DesiredRecord>, DeploymentRecord)>;
    /// Records of `device` taken at or after `since` (Unix seconds), oldest first, at most
    /// `limit` (the newest).
    fn recent_records(
        &self,
        stream: Stream,
        device: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>>;
    /// A new rollout id.
    fn next_rollout_id(&self) -> Result<u64>;
    /// Stores a rollout (durably: its state survives a `kill -9`).
    fn put_rollout(&self, rollout: &outpost_proto::rest::RolloutRecord) -> Result<()>;
    /// One rollout.
    fn rollout(&self, id: u64) -> Result<Option<outpost_proto::rest::RolloutRecord>>;
    /// Every rollout, oldest first.
    fn rollouts(&self) -> Result<Vec<outpost_proto::rest::RolloutRecord>>;
    /// A new firing id.
    fn next_firing_id(&self) -> Result<u64>;
    /// Stores a rule firing (durably: a restarted fleet knows what fired and when).
    fn put_firing(&self, firing: &outpost_proto::rest::FiringRecord) -> Result<()>;
    /// The newest `limit` firings, oldest first.
    fn firings(&self, limit: usize) -> Result<Vec<outpost_proto::rest::FiringRecord>>;
    /// Every deployment, oldest first.
    fn deployments(&self) -> Result<Vec<DeploymentRecord>>;
}

/// The replica holding the publishing role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Its name (`--replica`).
    pub replica: String,
    /// Where it answers its API, when it said (`--advertise-url`).
    pub api: Option<String>,
}

/// The closure-taking methods in their convenient form (a closure by value, called once).
impl dyn FleetStore {
    /// [`FleetStore::update_device_with`].
    pub fn update_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<DeviceRecord> {
        let mut change = Some(change);
        self.update_device_with(id, &mut |d| {
            if let Some(change) = change.take() {
                change(d)
            }
        })
    }

    /// [`FleetStore::update_known_device_with`].
    pub fn update_known_device(
        &self,
        id: &str,
        change: impl FnOnce(&mut DeviceRecord),
    ) -> Result<bool> {
        let mut change = Some(change);
        self.update_known_device_with(id, &mut |d| {
            if let Some(change) = change.take() {
                change(d)
            }
        })
    }

    /// [`FleetStore::update_desired_with`].
    pub fn update_desired(
        &self,
        device: &str,
        make: impl FnOnce(Option<&DesiredRecord>) -> Result<DesiredRecord>,
    ) -> Result<DesiredRecord> {
        let mut make = Some(make);
        self.update_desired_with(device, &mut |previous| match make.take() {
            Some(make) => make(previous),
            None => Err(FleetError::Corrupt("a desired state made twice".into())),
        })
    }

    /// [`FleetStore::record_deployment_with`].
    pub fn record_deployment(
        &self,
        devices: &[DeviceId],
        mut make: impl FnMut(&DeviceId, Option<&DesiredRecord>) -> Result<DesiredRecord>,
        record: DeploymentRecord,
    ) -> Result<(Vec<DesiredRecord>, DeploymentRecord)> {
        self.record_deployment_with(devices, &mut make, record)
    }

    /// [`FleetStore::put_record_sized`], without the size.
    pub fn put_record(
        &self,
        stream: Stream,
        device: &str,
        record: &TelemetryRecord,
    ) -> Result<Put> {
        self.put_record_sized(stream, device, record)
            .map(|(put, _)| put)
    }
}

/// The embedded store: sled trees in the data directory.
#[derive(Debug)]
pub struct SledStore {
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

pub(crate) fn record_key(device: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.len() + 9);
    key.extend_from_slice(device.as_bytes());
    key.push(0);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| FleetError::Corrupt(e.to_string()))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| FleetError::Corrupt(e.to_string()))
}

/// Whether `d` is a lower-case sha256 hex digest.
pub fn is_digest(d: &str) -> bool {
    d.len() == 64
        && d.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Writes an artifact file named by its digest into `dir` unless it is there (under a
/// temporary name first, then renamed: a reader never sees half a file).
pub(crate) fn write_artifact(dir: &Path, digest: &str, bytes: &[u8]) -> Result<()> {
    let path = artifact_path_in(dir, digest)?;
    if !path.exists() {
        let tmp = dir.join(format!(".{digest}.{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Where the artifact `digest` is in `dir`.
pub(crate) fn artifact_path_in(dir: &Path, digest: &str) -> Result<PathBuf> {
    if !is_digest(digest) {
        return Err(FleetError::NotFound(format!("artifact `{digest}`")));
    }
    Ok(dir.join(digest))
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

impl SledStore {
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
}

impl FleetStore for SledStore {
    fn describe(&self) -> String {
        format!(
            "sled at {}",
            self.artifacts.parent().unwrap_or(&self.artifacts).display()
        )
    }

    fn shared(&self) -> bool {
        false
    }

    /// A value of the meta tree.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }

    fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.db.insert(key, value)?;
        self.db.flush()?;
        Ok(())
    }

    fn update_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
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

    fn remove_device(&self, id: &str) -> Result<bool> {
        let _guard = self.lock()?;
        let known = self.devices.remove(id)?.is_some();
        let desired = self.desired.remove(id)?.is_some();
        self.db.flush()?;
        Ok(known || desired)
    }

    fn put_credential(&self, device: &str, credential: &Credential) -> Result<()> {
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

    fn remove_credential(&self, device: &str) -> Result<bool> {
        let removed = self.credentials.remove(device)?.is_some();
        self.db.flush()?;
        Ok(removed)
    }

    fn credentials(&self) -> Result<Vec<(String, Credential)>> {
        self.credentials
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                Ok((String::from_utf8_lossy(&key).into_owned(), decode(&value)?))
            })
            .collect()
    }

    fn is_enrolled(&self, device: &str) -> Result<bool> {
        Ok(self.credentials.contains_key(device)?)
    }

    fn update_known_device_with(
        &self,
        id: &str,
        change: &mut dyn FnMut(&mut DeviceRecord),
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

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>> {
        self.devices.get(id)?.map(|b| decode(&b)).transpose()
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices.iter().values().map(|v| decode(&v?)).collect()
    }

    fn devices_after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = Result<DeviceRecord>> + 'a> {
        use std::ops::Bound;
        let start = match after {
            Some(id) => Bound::Excluded(id.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        Box::new(
            self.devices
                .range::<Vec<u8>, _>((start, Bound::Unbounded))
                .values()
                .map(|v| decode(&v?)),
        )
    }

    fn put_record_sized(
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

    fn records(
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

    fn prune(&self, stream: Stream, cutoff: u64, limit: usize) -> Result<usize> {
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
            self.update_known_device_with(&device, &mut |d| {
                d.stored_bytes = d.stored_bytes.saturating_sub(bytes);
            })?;
        }
        Ok(removed)
    }

    fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn put_bundle(&self, record: &BundleRecord, bytes: &[u8]) -> Result<()> {
        write_artifact(&self.artifacts, &record.digest, bytes)?;
        self.bundles.insert(
            format!("{}@{}", record.name, record.version),
            encode(record)?,
        )?;
        self.db.flush()?;
        Ok(())
    }

    fn remove_bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        let Some(bytes) = self.bundles.remove(format!("{name}@{version}"))? else {
            return Ok(None);
        };
        let record: BundleRecord = decode(&bytes)?;
        let shared = FleetStore::bundles(self)?
            .iter()
            .any(|b| b.digest == record.digest);
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

    fn bundles(&self) -> Result<Vec<BundleRecord>> {
        self.bundles.iter().values().map(|v| decode(&v?)).collect()
    }

    fn bundle(&self, name: &str, version: &str) -> Result<Option<BundleRecord>> {
        self.bundles
            .get(format!("{name}@{version}"))?
            .map(|b| decode(&b))
            .transpose()
    }

    fn artifact_path(&self, digest: &str) -> Result<PathBuf> {
        artifact_path_in(&self.artifacts, digest)
    }

    fn update_desired_with(
        &self,
        device: &str,
        make: &mut dyn FnMut(Option<&DesiredRecord>) -> Result<DesiredRecord>,
    ) -> Result<DesiredRecord> {
        let _guard = self.lock()?;
        let previous: Option<DesiredRecord> =
            self.desired.get(device)?.map(|b| decode(&b)).transpose()?;
        let next = make(previous.as_ref())?;
        self.desired.insert(device, encode(&next)?)?;
        Ok(next)
    }

    fn desired(&self, device: &str) -> Result<Option<DesiredRecord>> {
        self.desired.get(device)?.map(|b| decode(&b)).transpose()
    }

    fn all_desired(&self) -> Result<Vec<DesiredRecord>> {
        self.desired.iter().values().map(|v| decode(&v?)).collect()
    }

    fn record_deployment_with(
        &self,
        devices: &[DeviceId],
        make: &mut dyn FnMut(&DeviceId, Option<&DesiredRecord>) -> Result<DesiredRecord>,
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

    fn recent_records(
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

    fn next_rollout_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    fn put_rollout(&self, rollout: &outpost_proto::rest::RolloutRecord) -> Result<()> {
        self.rollouts
            .insert(rollout.id.to_be_bytes(), encode(rollout)?)?;
        self.db.flush()?;
        Ok(())
    }

    fn rollout(&self, id: u64) -> Result<Option<outpost_proto::rest::RolloutRecord>> {
        self.rollouts
            .get(id.to_be_bytes())?
            .map(|b| decode(&b))
            .transpose()
    }

    fn rollouts(&self) -> Result<Vec<outpost_proto::rest::RolloutRecord>> {
        self.rollouts.iter().values().map(|v| decode(&v?)).collect()
    }

    fn next_firing_id(&self) -> Result<u64> {
        Ok(self.db.generate_id()? + 1)
    }

    fn put_firing(&self, firing: &outpost_proto::rest::FiringRecord) -> Result<()> {
        self.firings
            .insert(firing.id.to_be_bytes(), encode(firing)?)?;
        self.db.flush()?;
        Ok(())
    }

    fn firings(&self, limit: usize) -> Result<Vec<outpost_proto::rest::FiringRecord>> {
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

    fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
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
