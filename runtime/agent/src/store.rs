//! The agent's own database, beside the device's: the accepted desired state, the generations
//! accepted and reconciled, the last error, and the telemetry outbox.
//!
//! It is a separate sled database (`DATA_DIR/agent`), so the device's state never carries the
//! agent's data and the agent never reaches into the device's trees.

use std::path::Path;

use outpost_proto::DesiredState;

use crate::error::{AgentError, Result};
use crate::outbox::Outbox;
use crate::room::{MARGIN, Room};

const ACCEPTED_KEY: &[u8] = b"desired.accepted";
const RECONCILED_KEY: &[u8] = b"desired.reconciled";
const DESIRED_KEY: &[u8] = b"desired.state";
const LAST_ERROR_KEY: &[u8] = b"last_error";

/// The agent's database. Opened once per process (the device's lock on its data directory
/// keeps a second process away).
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    room: Room,
}

/// What one small write of the agent's (a desired state, an error, a generation) may take.
const SMALL_WRITE: u64 = 1 << 20;

fn get_u64(tree: &sled::Tree, key: &[u8]) -> Option<u64> {
    tree.get(key)
        .ok()
        .flatten()
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        // Small: the agent keeps a few keys and a bounded outbox.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 << 20)
            .open()?;
        Ok(Self {
            meta: db.open_tree("agent")?,
            db,
            room: Room {
                dir: dir.to_owned(),
                margin: MARGIN,
            },
        })
    }

    /// The outbox, capped at `quota` bytes.
    pub fn outbox(&self, quota: u64) -> Result<Outbox> {
        Ok(
            Outbox::open(self.db.open_tree("outbox")?, self.meta.clone(), quota)?
                .with_room(self.room.clone()),
        )
    }

    /// The highest generation accepted.
    pub fn accepted(&self) -> Option<u64> {
        get_u64(&self.meta, ACCEPTED_KEY)
    }

    /// The highest generation the device was brought to.
    pub fn reconciled(&self) -> Option<u64> {
        get_u64(&self.meta, RECONCILED_KEY)
    }

    /// The accepted desired state, when the device has not been brought to it yet.
    pub fn unfinished(&self) -> Option<DesiredState> {
        let accepted = self.accepted()?;
        if self.reconciled() >= Some(accepted) {
            return None;
        }
        let bytes = self.meta.get(DESIRED_KEY).ok().flatten()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records an accepted desired state (durably, before anything acts on it).
    pub fn accept(&self, state: &DesiredState) -> Result<()> {
        let bytes = serde_json::to_vec(state).map_err(|e| AgentError::Corrupt(e.to_string()))?;
        self.room.check(bytes.len() as u64)?;
        self.meta.insert(DESIRED_KEY, bytes)?;
        self.meta
            .insert(ACCEPTED_KEY, &state.generation.to_be_bytes())?;
        self.meta.flush()?;
        Ok(())
    }

    /// Records that the device was brought to `generation`.
    pub fn set_reconciled(&self, generation: u64) -> Result<()> {
        self.room.check(SMALL_WRITE)?;
        self.meta
            .insert(RECONCILED_KEY, &generation.to_be_bytes())?;
        self.meta.flush()?;
        Ok(())
    }

    /// The last error reported to the fleet, kept across restarts.
    pub fn last_error(&self) -> Option<String> {
        self.meta
            .get(LAST_ERROR_KEY)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Sets or clears the last error.
    pub fn set_last_error(&self, error: Option<&str>) -> Result<()> {
        self.room.check(SMALL_WRITE)?;
        match error {
            Some(e) => self.meta.insert(LAST_ERROR_KEY, e.as_bytes()).map(|_| ())?,
            None => self.meta.remove(LAST_ERROR_KEY).map(|_| ())?,
        }
        Ok(())
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}
