//! Durable device state in sled: installed bundles (content-addressed), the active version per
//! model, the highest security counter per model, and compiled guests.
//!
//! Every change is one sled transaction followed by a flush, so a `kill -9` at any point
//! leaves either the state before the change or the state after it.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::{HostError, Result};

/// What the device knows about one installed bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledRecord {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: String,
    /// sha256 of the bundle file: the key of its bytes.
    pub digest: String,
    /// The bundle's security counter.
    pub security_counter: u64,
    /// Key id of the signer.
    pub signer: String,
    /// Bundle size in bytes.
    pub size: u64,
    /// When it was installed (seconds since the Unix epoch).
    pub installed_at: u64,
}

/// The most events the device keeps (the oldest go first).
pub const MAX_EVENTS: usize = 1_000;

/// An event the device decided by itself, as it keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Unix seconds.
    pub time: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: outpost_proto::Event,
}

/// The device's state database.
#[derive(Debug, Clone)]
pub struct State {
    /// Held for the life of the process: the database is this process's alone.
    _lock: std::sync::Arc<std::fs::File>,
    db: sled::Db,
    blobs: sled::Tree,
    installed: sled::Tree,
    active: sled::Tree,
    /// The version each model had before its active one (kept loaded for a fast rollback).
    previous: sled::Tree,
    counters: sled::Tree,
    compiled: sled::Tree,
    /// The traffic policy of each model that has one other than `primary` (JSON).
    policies: sled::Tree,
    /// What the device decided by itself, newest last: big-endian sequence number → JSON.
    events: sled::Tree,
    /// Where the database lives (its file system's free space is checked before writes).
    dir: std::path::PathBuf,
}

/// Free space kept beyond what a write itself needs: sled's log segments and snapshots. sled
/// must never meet a full disk: after a failed write its flushes hang.
const DISK_MARGIN: u64 = 4 << 20;

fn key(name: &str, version: &str) -> Vec<u8> {
    format!("{name}/{version}").into_bytes()
}

fn corrupt(what: impl std::fmt::Display) -> HostError {
    HostError::Corrupt(what.to_string())
}

fn abort(e: TransactionError<HostError>) -> HostError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => HostError::Store(e),
    }
}

impl State {
    /// Opens (or creates) the database in `dir`. One process at a time: a second one is
    /// refused with [`HostError::Config`] (by an advisory lock on `dir/outpost.lock`, which the
    /// operating system releases when the process ends, even by `kill -9`).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let lock = std::fs::File::create(dir.join("outpost.lock"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(HostError::Config(format!(
                    "`{}` is in use by another outpost process (stop it, or use its admin API)",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(HostError::Io(e)),
        }
        let db = sled::Config::new().path(dir).open()?;
        Ok(Self {
            _lock: std::sync::Arc::new(lock),
            blobs: db.open_tree("blobs")?,
            installed: db.open_tree("installed")?,
            active: db.open_tree("active")?,
            previous: db.open_tree("previous")?,
            counters: db.open_tree("counters")?,
            compiled: db.open_tree("compiled")?,
            policies: db.open_tree("policies")?,
            events: db.open_tree("events")?,
            db,
            dir: dir.to_owned(),
        })
    }

    /// Bytes free for this process on the file system holding the database.
    pub fn free_bytes(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(&self.dir).ok()?;
        Some(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Refuses `what` with [`HostError::DiskFull`] unless `needed` bytes and a margin for the
    /// database are free.
    pub fn ensure_room(&self, needed: u64, what: &str) -> Result<()> {
        let Some(free) = self.free_bytes() else {
            return Ok(());
        };
        let wanted = needed.saturating_add(DISK_MARGIN);
        if free < wanted {
            return Err(HostError::DiskFull {
                what: what.to_owned(),
                wanted,
                free,
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// The highest security counter accepted for `name`.
    pub fn highest_counter(&self, name: &str) -> Result<Option<u64>> {
        self.counters
            .get(name)?
            .map(|v| {
                <[u8; 8]>::try_from(v.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt(format!("counter of `{name}`")))
            })
            .transpose()
    }

    /// Records a verified bundle: its bytes, its record, and the raised counter, atomically.
    /// Installing the same bytes again is a no-op; other bytes under the same version are
    /// refused.
    pub fn install(
        &self,
        name: &str,
        version: &str,
        security_counter: u64,
        signer: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<InstalledRecord> {
        let record = InstalledRecord {
            name: name.into(),
            version: version.into(),
            digest: digest.into(),
            security_counter,
            signer: signer.into(),
            size: bytes.len() as u64,
            installed_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let encoded = serde_json::to_vec(&record).map_err(corrupt)?;
        let k = key(name, version);
        let result = (&self.blobs, &self.installed, &self.counters).transaction(
            |(blobs, installed, counters)| {
                if let Some(existing) = installed.get(&k)? {
                    let existing: InstalledRecord = serde_json::from_slice(&existing)
                        .map_err(|e| ConflictableTransactionError::Abort(corrupt(e)))?;
                    if existing.digest == digest {
                        return Ok(existing);
                    }
                    return Err(ConflictableTransactionError::Abort(HostError::Corrupt(
                        format!(
                            "{name} {version} is already installed with different contents; \
                         publish a new version instead"
                        ),
                    )));
                }
                blobs.insert(digest.as_bytes(), bytes)?;
                installed.insert(k.as_slice(), encoded.as_slice())?;
                let highest = counters
                    .get(name)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(0, u64::from_be_bytes);
                counters.insert(name, &highest.max(security_counter).to_be_bytes())?;
                Ok(record.clone())
            },
        );
        let record = result.map_err(abort)?;
        self.db.flush()?;
        Ok(record)
    }

    /// One installed bundle's record.
    pub fn record(&self, name: &str, version: &str) -> Result<Option<InstalledRecord>> {
        self.installed
            .get(key(name, version))?
            .map(|v| serde_json::from_slice(&v).map_err(corrupt))
            .transpose()
    }

    /// Every installed bundle, ordered by name and version text.
    pub fn installed(&self) -> Result<Vec<InstalledRecord>> {
        self.installed
            .iter()
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(corrupt)
            })
            .collect()
    }

    /// A bundle's bytes by digest.
    pub fn bundle_bytes(&self, digest: &str) -> Result<Option<sled::IVec>> {
        Ok(self.blobs.get(digest)?)
    }

    /// An installed bundle of `name` (`version`, or the active one) with its record.
    pub fn bundle_of(
        &self,
        name: &str,
        version: Option<&str>,
    ) -> Result<(InstalledRecord, sled::IVec)> {
        let version = match version {
            Some(v) => v.to_owned(),
            None => self
                .active()?
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| HostError::UnknownModel(name.into()))?,
        };
        let record = self
            .record(name, &version)?
            .ok_or_else(|| HostError::UnknownVersion {
                model: name.into(),
                version: version.clone(),
            })?;
        let bytes =
            self.bundle_bytes(&record.digest)?
                .ok_or_else(|| HostError::UnknownVersion {
                    model: name.into(),
                    version,
                })?;
        Ok((record, bytes))
    }

    /// Makes `version` the active version of `name`; the one it replaces becomes the
    /// previous version (kept loaded for a fast rollback, across restarts too).
    pub fn set_active(&self, name: &str, version: &str) -> Result<()> {
        let result: std::result::Result<(), TransactionError<HostError>> =
            (&self.active, &self.previous).transaction(|(active, previous)| {
                let old = active.insert(name, version)?;
                if let Some(old) = old.filter(|o| o.as_ref() != version.as_bytes()) {
                    previous.insert(name, old)?;
                }
                Ok(())
            });
        result.map_err(abort)?;
        self.db.flush()?;
        Ok(())
    }

    /// Records `policy` for `name` (`primary` removes the record).
    pub fn set_policy(&self, name: &str, policy: &crate::policy::Policy) -> Result<()> {
        self.ensure_room(0, &format!("setting the traffic policy of {name}"))?;
        if *policy == crate::policy::Policy::Primary {
            self.policies.remove(name)?;
        } else {
            let bytes = serde_json::to_vec(policy).map_err(corrupt)?;
            self.policies.insert(name, bytes)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Records `policy` for `name` and `event` in one transaction: a canary's rollback or
    /// promotion and the reason for it are on disk together or not at all. The oldest events
    /// beyond [`MAX_EVENTS`] are deleted.
    pub fn set_policy_noting(
        &self,
        name: &str,
        policy: &crate::policy::Policy,
        event: &outpost_proto::Event,
    ) -> Result<u64> {
        self.ensure_room(0, &format!("recording an event of {name}"))?;
        let body = serde_json::to_vec(&StoredEvent {
            time: now(),
            event: event.clone(),
        })
        .map_err(corrupt)?;
        let policy_bytes = match policy {
            crate::policy::Policy::Primary => None,
            p => Some(serde_json::to_vec(p).map_err(corrupt)?),
        };
        let seq = self.db.generate_id()?;
        let result: std::result::Result<(), TransactionError<HostError>> =
            (&self.policies, &self.events).transaction(|(policies, events)| {
                match &policy_bytes {
                    None => {
                        policies.remove(name)?;
                    }
                    Some(b) => {
                        policies.insert(name, b.as_slice())?;
                    }
                }
                events.insert(&seq.to_be_bytes(), body.as_slice())?;
                Ok(())
            });
        result.map_err(abort)?;
        while self.events.len() > MAX_EVENTS {
            if self.events.pop_min()?.is_none() {
                break;
            }
        }
        self.db.flush()?;
        Ok(seq)
    }

    /// The device's own events, oldest first, at most the last `limit`.
    pub fn events(&self, limit: usize) -> Result<Vec<StoredEvent>> {
        let mut out: Vec<StoredEvent> = self
            .events
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (_, v) = kv?;
                serde_json::from_slice(&v).map_err(corrupt)
            })
            .collect::<Result<_>>()?;
        out.reverse();
        Ok(out)
    }

    /// The traffic policy of each model that has one other than `primary`.
    pub fn policies(&self) -> Result<Vec<(String, crate::policy::Policy)>> {
        self.policies
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8(k.to_vec()).map_err(corrupt)?,
                    serde_json::from_slice(&v).map_err(corrupt)?,
                ))
            })
            .collect()
    }

    /// The previous active version of each model that has one.
    pub fn previous(&self) -> Result<Vec<(String, String)>> {
        pairs(&self.previous)
    }

    /// The active version of each model.
    pub fn active(&self) -> Result<Vec<(String, String)>> {
        pairs(&self.active)
    }

    /// Removes an installed version (not the active one), and its bytes and compiled guest when
    /// no other version shares them.
    pub fn remove(&self, name: &str, version: &str) -> Result<()> {
        let record = self
            .record(name, version)?
            .ok_or_else(|| HostError::UnknownVersion {
                model: name.into(),
                version: version.into(),
            })?;
        // sled transactions cannot iterate, so look for other users of the bytes first; an
        // install racing with this removal is excluded by the device's admin lock.
        let shared = self
            .installed()?
            .iter()
            .any(|r| r.digest == record.digest && (r.name != name || r.version != version));
        let k = key(name, version);
        let result = (
            &self.blobs,
            &self.installed,
            &self.active,
            &self.compiled,
            &self.previous,
        )
            .transaction(|(blobs, installed, active, compiled, previous)| {
                if active
                    .get(name)?
                    .is_some_and(|v| v.as_ref() == version.as_bytes())
                {
                    return Err(ConflictableTransactionError::Abort(
                        HostError::RemoveActive {
                            model: name.into(),
                            version: version.into(),
                        },
                    ));
                }
                installed.remove(k.as_slice())?;
                if previous
                    .get(name)?
                    .is_some_and(|v| v.as_ref() == version.as_bytes())
                {
                    previous.remove(name)?;
                }
                if !shared {
                    blobs.remove(record.digest.as_bytes())?;
                    compiled.remove(record.digest.as_bytes())?;
                }
                Ok(())
            });
        result.map_err(abort)?;
        self.db.flush()?;
        Ok(())
    }

    /// The compiled guest cached for a bundle digest (the engine's artifact format).
    pub fn compiled(&self, digest: &str) -> Result<Option<sled::IVec>> {
        Ok(self.compiled.get(digest)?)
    }

    /// Caches a compiled guest.
    pub fn put_compiled(&self, digest: &str, artifact: &[u8]) -> Result<()> {
        self.compiled.insert(digest, artifact)?;
        self.db.flush()?;
        Ok(())
    }
}

/// Every key and value of `tree` as text.
fn pairs(tree: &sled::Tree) -> Result<Vec<(String, String)>> {
    tree.iter()
        .map(|kv| {
            let (k, v) = kv?;
            Ok((
                String::from_utf8(k.to_vec()).map_err(corrupt)?,
                String::from_utf8(v.to_vec()).map_err(corrupt)?,
            ))
        })
        .collect()
}

/// Unix seconds now.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
