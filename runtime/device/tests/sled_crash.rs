//! sled under power loss, as Outpost uses it (insert, then `flush` before anything counts as
//! done): a child process writes records and says which are durable; it is killed with
//! SIGKILL at a random moment; the store is reopened and every record the child called durable
//! must be there, intact. Rounds: 10 here, `OUTPOST_CRASH_ROUNDS` (the soak mode runs 100).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD_ENV: &str = "OUTPOST_SLED_CRASH_CHILD";

/// The value record `seq` holds: its length varies (sled's segments fill unevenly) and its
/// content is checkable.
fn value(seq: u64) -> Vec<u8> {
    let len = 16 + (seq.wrapping_mul(2_654_435_761) % 6000) as usize;
    (0..len)
        .map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8)
        .collect()
}

/// The child: writes from where the store left off, forever, saying `durable N` after each
/// flush. Records go to two trees and a batch, as the device's state does.
fn child(dir: &Path) {
    let db = sled::open(dir).unwrap();
    let records = db.open_tree("records").unwrap();
    let meta = db.open_tree("meta").unwrap();
    let mut seq = meta
        .get("next")
        .unwrap()
        .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
        .unwrap_or(0);
    let out = std::io::stdout();
    loop {
        let mut batch = sled::Batch::default();
        for s in seq..seq + 4 {
            batch.insert(&s.to_be_bytes(), value(s));
        }
        records.apply_batch(batch).unwrap();
        meta.insert("next", &(seq + 4).to_be_bytes()).unwrap();
        // Older records are rewritten now and then, as state is.
        if seq.is_multiple_of(64) && seq > 0 {
            records
                .insert((seq / 2).to_be_bytes(), value(seq / 2))
                .unwrap();
        }
        db.flush().unwrap();
        seq += 4;
        use std::io::Write;
        let mut out = out.lock();
        writeln!(out, "durable {seq}").unwrap();
        out.flush().unwrap();
    }
}

/// A small xorshift, seeded from the clock: the moments of the kills.
fn random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn every_record_flushed_before_a_kill_9_is_there_after_reopening() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let rounds: usize = std::env::var("OUTPOST_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(10);
    let dir = outpost_testkit::TempDir::new("sled-crash");
    let store = dir.join("db");
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    rng ^= u64::from(std::process::id()) << 32;
    let mut total_durable = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "every_record_flushed_before_a_kill_9_is_there_after_reopening",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &store)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("durable ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Wait for the first durable write, then kill at a random moment in the next 20–400 ms.
        let mut durable = rx.recv_timeout(Duration::from_secs(60)).unwrap();
        std::thread::sleep(Duration::from_millis(20 + random(&mut rng) % 380));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            durable = durable.max(n);
        }

        let db = sled::open(&store).unwrap();
        let records = db.open_tree("records").unwrap();
        for seq in 0..durable {
            let got = records.get(seq.to_be_bytes()).unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&value(seq)[..]),
                "round {round}: record {seq} of {durable} durable ones is lost or damaged"
            );
        }
        let next = db
            .open_tree("meta")
            .unwrap()
            .get("next")
            .unwrap()
            .map(|v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
            .unwrap();
        assert!(
            next >= durable,
            "round {round}: next {next} < durable {durable}"
        );
        total_durable = durable;
    }
    eprintln!("{rounds} kills, {total_durable} durable records, none lost");
}
