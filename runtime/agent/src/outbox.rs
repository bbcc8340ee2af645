//! The durable telemetry outbox: records are written here first, published in batches, and
//! deleted only when the broker has acknowledged the batch that carried them.

use std::sync::Mutex;
use std::sync::atomic::Ordering;

use outpost_proto::TelemetryRecord;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::{AgentError, Result};

const SEQ_KEY: &[u8] = b"outbox.seq";
const DROPPED_KEY: &[u8] = b"outbox.dropped";

/// What a record is: its priority and the topic it travels on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Periodic measurements; dropped first when the quota is reached.
    Telemetry,
    /// Deployment events and refusals; dropped only when no telemetry is left to drop.
    Event,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    kind: Kind,
    record: TelemetryRecord,
}

/// Records of one kind, consecutive in sequence order, ready to publish together.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Their kind (all the same).
    pub kind: Kind,
    /// The records.
    pub records: Vec<TelemetryRecord>,
}

impl Batch {
    /// Sequence numbers of the records.
    pub fn seqs(&self) -> Vec<u64> {
        self.records.iter().map(|r| r.seq).collect()
    }
}

/// The outbox. Sequence numbers start at 1, increase by one per record and survive restarts.
#[derive(Debug)]
pub struct Outbox {
    records: sled::Tree,
    meta: sled::Tree,
    quota: u64,
    /// Bytes held (keys + values); guarded so quota enforcement is not raced.
    bytes: Mutex<u64>,
    /// Records handed to the broker and not yet acknowledged: the quota does not drop these
    /// (they may already be delivered), so the drop count is exact.
    in_flight: Mutex<std::collections::BTreeSet<u64>>,
    /// The free space a record must leave, when the outbox knows its file system.
    room: Option<crate::room::Room>,
    /// Every record up to this sequence number is on disk (see [`Outbox::make_durable`]).
    durable: std::sync::atomic::AtomicU64,
    /// Records a full disk refused, not yet added to the stored drop count: nothing is
    /// written while the disk is full; the next record that is written carries the count.
    refused: std::sync::atomic::AtomicU64,
}

fn be(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Outbox {
    /// Opens the outbox in `records` (one entry per record) and `meta` (counters).
    pub fn open(records: sled::Tree, meta: sled::Tree, quota: u64) -> Result<Self> {
        let mut bytes = 0u64;
        for item in records.iter() {
            let (k, v) = item?;
            bytes += (k.len() + v.len()) as u64;
        }
        // What was read back from the file is on disk.
        let durable = read_u64(meta.get(SEQ_KEY)?);
        Ok(Self {
            records,
            meta,
            quota,
            bytes: Mutex::new(bytes),
            in_flight: Mutex::new(std::collections::BTreeSet::new()),
            room: None,
            durable: std::sync::atomic::AtomicU64::new(durable),
            refused: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Checks the free space of `room`'s file system before every record: a record that would
    /// fill the disk is refused with [`AgentError::DiskFull`], not written.
    pub(crate) fn with_room(mut self, room: crate::room::Room) -> Self {
        self.room = Some(room);
        self
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, u64>> {
        self.bytes
            .lock()
            .map_err(|_| AgentError::Corrupt("outbox lock poisoned".into()))
    }

    /// Appends a record and returns its sequence number. When the outbox is over its quota
    /// afterwards, the oldest telemetry (then the oldest events) is dropped and counted. On a
    /// full disk the record is refused, and counted as dropped too: the fleet hears of it.
    pub fn push(&self, kind: Kind, body: serde_json::Value) -> Result<u64> {
        // The margin (4 MiB) dwarfs a record: no need to serialise it twice to know its size.
        if let Some(room) = &self.room
            && let Err(full) = room.check(64 << 10)
        {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(full);
        }
        let mut bytes = self.lock()?;
        let time = now_secs();
        // Under the lock: no other push takes the count meanwhile.
        let refused = self.refused.swap(0, Ordering::Relaxed);
        let result = (&self.records, &self.meta).transaction(|(records, meta)| {
            let seq = read_u64(meta.get(SEQ_KEY)?) + 1;
            meta.insert(SEQ_KEY, &be(seq))?;
            if refused > 0 {
                let dropped = read_u64(meta.get(DROPPED_KEY)?) + refused;
                meta.insert(DROPPED_KEY, &be(dropped))?;
            }
            let entry = Entry {
                kind,
                record: TelemetryRecord {
                    seq,
                    time,
                    body: body.clone(),
                },
            };
            let value = serde_json::to_vec(&entry)
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            let len = value.len();
            records.insert(&be(seq), value)?;
            Ok((seq, len))
        });
        let (seq, len) = match result {
            Ok(v) => v,
            Err(e) => {
                self.refused.fetch_add(refused, Ordering::Relaxed);
                return Err(match e {
                    TransactionError::Abort(e) => AgentError::Corrupt(e),
                    TransactionError::Storage(e) => AgentError::Store(e),
                });
            }
        };
        *bytes += (8 + len) as u64;
        while *bytes > self.quota {
            let Some((key, value)) = self.oldest_to_drop()? else {
                break;
            };
            if self.records.remove(&key)?.is_some() {
                *bytes = bytes.saturating_sub((key.len() + value.len()) as u64);
                let dropped = read_u64(self.meta.get(DROPPED_KEY)?) + 1;
                self.meta.insert(DROPPED_KEY, &be(dropped))?;
            }
        }
        Ok(seq)
    }

    /// Makes every record up to `seq` durable before it leaves the device: a record is written
    /// without waiting for the disk (sled writes it out within half a second), so a crash can
    /// take the last records back, and with them their sequence numbers, which the next records
    /// then take again. Had the fleet seen one of those, it would now hold two different records
    /// under one number. Flushes only when `seq` is past what is known to be on disk.
    pub fn make_durable(&self, seq: u64) -> Result<()> {
        if self.durable.load(Ordering::Acquire) >= seq {
            return Ok(());
        }
        // Read before flushing: everything numbered up to here was written before the flush.
        let written = read_u64(self.meta.get(SEQ_KEY)?);
        self.records.flush()?;
        self.durable.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    /// Marks records as sent and awaiting acknowledgement (or, with `false`, no longer).
    pub fn set_in_flight(&self, seqs: &[u64], in_flight: bool) {
        if let Ok(mut set) = self.in_flight.lock() {
            for s in seqs {
                if in_flight {
                    set.insert(*s);
                } else {
                    set.remove(s);
                }
            }
        }
    }

    /// Forgets every in-flight mark (the connection they were sent on is gone).
    pub fn clear_in_flight(&self) {
        if let Ok(mut set) = self.in_flight.lock() {
            set.clear();
        }
    }

    fn oldest_to_drop(&self) -> Result<Option<(sled::IVec, sled::IVec)>> {
        let in_flight = self
            .in_flight
            .lock()
            .map_err(|_| AgentError::Corrupt("outbox lock poisoned".into()))?
            .clone();
        let mut oldest_event = None;
        for item in self.records.iter() {
            let (k, v) = item?;
            if in_flight.contains(&read_u64(Some(k.clone()))) {
                continue;
            }
            match serde_json::from_slice::<Entry>(&v) {
                Ok(e) if e.kind == Kind::Telemetry => return Ok(Some((k, v))),
                Ok(_) => {
                    if oldest_event.is_none() {
                        oldest_event = Some((k, v));
                    }
                }
                // An unreadable record is dropped first: it could never be sent.
                Err(_) => return Ok(Some((k, v))),
            }
        }
        Ok(oldest_event)
    }

    /// The next batch after sequence number `after` (from the start when `None`): records of
    /// one kind, in order, at most `max_records` and about `max_bytes`.
    pub fn batch_after(
        &self,
        after: Option<u64>,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Option<Batch>> {
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut batch: Option<Batch> = None;
        let mut size = 0usize;
        for item in self.records.range(be(start)..) {
            let (k, v) = item?;
            let entry: Entry = match serde_json::from_slice(&v) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "dropping an unreadable outbox record");
                    self.ack(&[read_u64(Some(k))])?;
                    continue;
                }
            };
            match &mut batch {
                None => {
                    batch = Some(Batch {
                        kind: entry.kind,
                        records: vec![entry.record],
                    })
                }
                Some(b) => {
                    if b.kind != entry.kind
                        || b.records.len() >= max_records
                        || size + v.len() > max_bytes
                    {
                        break;
                    }
                    b.records.push(entry.record);
                }
            }
            size += v.len();
        }
        Ok(batch)
    }

    /// Deletes acknowledged records (already-deleted ones are ignored).
    pub fn ack(&self, seqs: &[u64]) -> Result<()> {
        self.set_in_flight(seqs, false);
        let mut bytes = self.lock()?;
        for &seq in seqs {
            if let Some(v) = self.records.remove(be(seq))? {
                *bytes = bytes.saturating_sub((8 + v.len()) as u64);
            }
        }
        Ok(())
    }

    /// Records waiting to be acknowledged.
    pub fn pending(&self) -> u64 {
        self.records.len() as u64
    }

    /// Records the quota has dropped, and records a full disk refused, ever (refusals since
    /// the last record written are counted in memory until then: a restart meanwhile loses
    /// that part of the count, never a record).
    pub fn dropped(&self) -> u64 {
        read_u64(self.meta.get(DROPPED_KEY).ok().flatten()) + self.refused.load(Ordering::Relaxed)
    }

    /// The last sequence number handed out.
    pub fn last_seq(&self) -> u64 {
        read_u64(self.meta.get(SEQ_KEY).ok().flatten())
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.lock().map(|b| *b).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(quota: u64) -> (sled::Db, Outbox) {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let o = Outbox::open(
            db.open_tree("outbox").unwrap(),
            db.open_tree("agent").unwrap(),
            quota,
        )
        .unwrap();
        (db, o)
    }

    #[test]
    fn sequence_batches_and_acks() {
        let (_db, o) = outbox(1 << 20);
        for i in 0..5 {
            assert_eq!(
                o.push(Kind::Telemetry, serde_json::json!({ "i": i }))
                    .unwrap(),
                i + 1
            );
        }
        o.push(Kind::Event, serde_json::json!({ "e": 1 })).unwrap();
        let b = o.batch_after(None, 3, 1 << 20).unwrap().unwrap();
        assert_eq!((b.kind, b.seqs()), (Kind::Telemetry, vec![1, 2, 3]));
        let b = o.batch_after(Some(3), 10, 1 << 20).unwrap().unwrap();
        assert_eq!(b.seqs(), vec![4, 5], "a batch stops where the kind changes");
        let b = o.batch_after(Some(5), 10, 1 << 20).unwrap().unwrap();
        assert_eq!((b.kind, b.seqs()), (Kind::Event, vec![6]));
        o.ack(&[1, 2, 3, 3]).unwrap();
        assert_eq!(o.pending(), 3);
        assert_eq!(
            o.batch_after(None, 10, 1 << 20).unwrap().unwrap().seqs(),
            vec![4, 5]
        );
    }

    #[test]
    fn quota_drops_oldest_telemetry_first_and_counts() {
        let (_db, o) = outbox(600);
        o.push(Kind::Event, serde_json::json!({ "event": "first" }))
            .unwrap();
        for i in 0..20 {
            o.push(Kind::Telemetry, serde_json::json!({ "i": i }))
                .unwrap();
        }
        assert!(o.bytes() <= 600, "{}", o.bytes());
        assert!(o.dropped() > 0);
        assert_eq!(
            o.pending() + o.dropped(),
            21,
            "every record is either held or counted"
        );
        let first = o.batch_after(None, 1, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (first.kind, first.seqs()),
            (Kind::Event, vec![1]),
            "events outlive telemetry"
        );
        assert_eq!(o.last_seq(), 21);
    }

    #[test]
    fn records_in_flight_are_not_dropped() {
        let (_db, o) = outbox(700);
        for i in 0..3 {
            o.push(Kind::Telemetry, serde_json::json!({ "i": i }))
                .unwrap();
        }
        o.set_in_flight(&[1, 2], true);
        for i in 3..20 {
            o.push(Kind::Telemetry, serde_json::json!({ "i": i }))
                .unwrap();
        }
        let held = o.batch_after(None, 100, 1 << 20).unwrap().unwrap().seqs();
        assert_eq!(
            &held[..2],
            &[1, 2],
            "sent records wait for their acknowledgement"
        );
        assert_eq!(o.pending() + o.dropped(), 20);
        o.ack(&[1, 2]).unwrap();
        o.push(Kind::Telemetry, serde_json::json!(0)).unwrap();
        assert_eq!(
            o.pending() + o.dropped() + 2,
            21,
            "held, dropped or acknowledged"
        );
    }

    #[test]
    fn survives_reopen() {
        let dir = std::env::temp_dir().join(format!("outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let db = sled::open(&dir).unwrap();
            let o = Outbox::open(
                db.open_tree("o").unwrap(),
                db.open_tree("m").unwrap(),
                1 << 20,
            )
            .unwrap();
            o.push(Kind::Telemetry, serde_json::json!(1)).unwrap();
            o.push(Kind::Telemetry, serde_json::json!(2)).unwrap();
            o.ack(&[1]).unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(&dir).unwrap();
        let o = Outbox::open(
            db.open_tree("o").unwrap(),
            db.open_tree("m").unwrap(),
            1 << 20,
        )
        .unwrap();
        assert_eq!(o.pending(), 1);
        assert_eq!(o.push(Kind::Telemetry, serde_json::json!(3)).unwrap(), 3);
        drop(o);
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
