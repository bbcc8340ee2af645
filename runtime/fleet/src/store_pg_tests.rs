//! What only the PostgreSQL store does: migrations, a database that goes away, retention by
//! partitions, two replicas writing at once. (The cases both stores pass are in the store's
//! own tests.)

use super::*;
use outpost_testkit::postgres::Postgres;

fn server(test: &str) -> Option<Postgres> {
    Postgres::start_or_skip(test)
}

fn artifacts(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-pg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn sql(store: &PgStore, text: &str) -> Vec<tokio_postgres::SimpleQueryMessage> {
    store
        .block(async {
            let client = store.client().await?;
            client.simple_query(text).await.map_err(db)
        })
        .unwrap()
}

fn count(store: &PgStore, text: &str) -> i64 {
    sql(store, text)
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .unwrap()
}

fn record(seq: u64, n: u64) -> TelemetryRecord {
    TelemetryRecord {
        seq,
        time: now_secs(),
        body: serde_json::json!({ "n": n }),
    }
}

#[test]
fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let Some(server) = server("migrations") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("migrations");
    let first = PgStore::connect(&url, &dir).unwrap();
    first.set_meta("kept", b"yes").unwrap();
    let second = PgStore::connect(&url, &dir).unwrap();
    assert_eq!(second.meta("kept").unwrap().as_deref(), Some(&b"yes"[..]));
    assert_eq!(
        count(&second, "SELECT count(*) FROM outpost_migrations"),
        MIGRATIONS.len() as i64
    );
    sql(&second, "INSERT INTO outpost_migrations VALUES (999, 0)");
    let refused = PgStore::connect(&url, &dir);
    assert!(
        matches!(&refused, Err(FleetError::Config(m)) if m.contains("schema version 999, from a newer fleet")),
        "{refused:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_database_at_start_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = artifacts("unreachable");
    let started = std::time::Instant::now();
    let refused = PgStore::connect(&format!("postgres://outpost@127.0.0.1:{port}/fleet"), &dir);
    assert!(
        matches!(&refused, Err(FleetError::Config(m))
            if m.contains(&format!("cannot use the postgres at 127.0.0.1:{port}/fleet"))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let bad = PgStore::connect("postgres://[::1", &dir);
    assert!(
        matches!(&bad, Err(FleetError::Config(m)) if m.contains("database URL")),
        "{bad:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_database_that_goes_away_fails_each_call_and_comes_back_by_itself() {
    let Some(server) = server("outage") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("outage");
    let store = PgStore::connect(&url, &dir).unwrap();
    let store: &dyn FleetStore = &store;
    store.update_device("a", |d| d.stored_bytes = 5).unwrap();
    server.kill().unwrap();
    let failed = store.update_device("a", |d| d.stored_bytes = 6);
    assert!(matches!(failed, Err(FleetError::Database(_))), "{failed:?}");
    let failed = store.put_record(Stream::Telemetry, "a", &record(1, 1));
    assert!(matches!(failed, Err(FleetError::Database(_))), "{failed:?}");
    assert!(store.check().is_err());
    server.start_again().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.check().is_err() {
        assert!(std::time::Instant::now() < deadline, "never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        store.device("a").unwrap().unwrap().stored_bytes,
        5,
        "nothing lost"
    );
    assert_eq!(
        store
            .put_record(Stream::Telemetry, "a", &record(1, 1))
            .unwrap(),
        Put::New
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_drops_whole_days_and_gives_the_bytes_back() {
    let Some(server) = server("retention") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("retention");
    let pg = PgStore::connect(&url, &dir).unwrap();
    let today = now_secs() / DAY;
    let partition = format!("telemetry_d{today}");
    let exists = |pg: &PgStore| {
        count(
            pg,
            &format!("SELECT count(*) FROM pg_class WHERE relname = '{partition}'"),
        )
    };
    assert_eq!(exists(&pg), 1, "today's partition is made at start");
    let store: &dyn FleetStore = &pg;
    let mut bytes = 0;
    for seq in 1..=5 {
        let (put, size) = store
            .put_record_sized(Stream::Telemetry, "a", &record(seq, seq))
            .unwrap();
        assert_eq!(put, Put::New);
        bytes += size;
    }
    store
        .put_record(Stream::Events, "a", &record(1, 1))
        .unwrap();
    store
        .update_device("a", |d| d.stored_bytes = bytes + 7)
        .unwrap();
    assert_eq!(
        count(&pg, &format!("SELECT count(*) FROM {partition}")),
        5,
        "the records went to today's partition"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM telemetry_default"), 0);
    // Nothing received before today goes.
    assert_eq!(store.prune(Stream::Telemetry, now_secs(), 100).unwrap(), 0);
    let later = now_secs() + 2 * DAY;
    assert_eq!(store.prune(Stream::Telemetry, later, 100).unwrap(), 5);
    assert_eq!(exists(&pg), 0, "the partition was dropped");
    assert_eq!(store.device("a").unwrap().unwrap().stored_bytes, 7);
    assert!(
        store
            .records(Stream::Telemetry, Some("a"), None, 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .records(Stream::Events, Some("a"), None, 10)
            .unwrap()
            .len(),
        1,
        "events have their own retention"
    );
    // A record received after the drop makes its partition again.
    assert_eq!(
        store
            .put_record(Stream::Telemetry, "a", &record(6, 6))
            .unwrap(),
        Put::New
    );
    assert_eq!(exists(&pg), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_replicas_store_a_record_delivered_to_both_once() {
    let Some(server) = server("replicas") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("replicas");
    let one = PgStore::connect(&url, &dir).unwrap();
    let two = PgStore::connect(&url, &dir).unwrap();
    let news = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for store in [&one, &two, &one, &two] {
            let news = &news;
            s.spawn(move || {
                for seq in 0..50 {
                    let put = FleetStore::put_record_sized(
                        store,
                        Stream::Telemetry,
                        "a",
                        &TelemetryRecord {
                            seq,
                            time: 1,
                            body: serde_json::json!({ "seq": seq }),
                        },
                    )
                    .unwrap()
                    .0;
                    assert!(matches!(put, Put::New | Put::Duplicate), "{put:?}");
                    if put == Put::New {
                        news.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(
        news.into_inner(),
        50,
        "each record stored by exactly one writer"
    );
    assert_eq!(count(&one, "SELECT count(*) FROM telemetry"), 50);
    let _ = std::fs::remove_dir_all(&dir);
}

fn desired_for(device: &str, generation: u64) -> DesiredRecord {
    let key = outpost_bundle::SecretKey::generate().unwrap();
    let id = DeviceId::new(device).unwrap();
    let state = outpost_proto::DesiredState {
        v: outpost_proto::PROTOCOL_VERSION,
        device: id.clone(),
        generation,
        expires_at: 10,
        deployments: vec![],
    };
    DesiredRecord {
        device: id,
        generation,
        deployments: vec![],
        expires_at: 10,
        envelope: outpost_proto::SignedDesired::seal(&state, &key).unwrap(),
    }
}

#[test]
fn one_replica_holds_the_publishing_role_and_a_lost_hold_fences_its_writes() {
    let Some(server) = server("role") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("role");
    let one = PgStore::connect(&url, &dir).unwrap();
    let two = PgStore::connect(&url, &dir).unwrap();
    let (a, b): (&dyn FleetStore, &dyn FleetStore) = (&one, &two);

    // Nobody writes desired states before taking the role.
    let early = a.update_desired("d", |_| Ok(desired_for("d", 1)));
    assert!(
        matches!(early, Err(FleetError::NotPublishing(None))),
        "{early:?}"
    );

    assert!(a.try_lead("replica-1", Some("http://127.0.0.1:1")).unwrap());
    assert!(
        a.try_lead("replica-1", Some("http://127.0.0.1:1")).unwrap(),
        "taking it again keeps it"
    );
    assert!(
        !b.try_lead("replica-2", None).unwrap(),
        "one holder at a time"
    );
    assert_eq!(
        b.leader().unwrap(),
        Some(Leader {
            replica: "replica-1".into(),
            api: Some("http://127.0.0.1:1".into())
        })
    );
    a.update_desired("d", |_| Ok(desired_for("d", 1))).unwrap();
    let refused = b.update_desired("d", |_| Ok(desired_for("d", 2)));
    assert!(
        matches!(&refused, Err(FleetError::NotPublishing(Some(h))) if h == "replica-1"),
        "{refused:?}"
    );
    assert!(a.still_leading());

    // The holder's connection ends (as when its process dies): the role moves, and the old
    // holder's writes are refused even before it notices.
    sql(
        &two,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'outpost-fleet role'",
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !b.try_lead("replica-2", None).unwrap() {
        assert!(std::time::Instant::now() < deadline, "the role never moved");
        std::thread::sleep(Duration::from_millis(50));
    }
    let fenced = a.update_desired("d", |_| Ok(desired_for("d", 3)));
    assert!(
        matches!(&fenced, Err(FleetError::NotPublishing(Some(h))) if h == "replica-2"),
        "{fenced:?}"
    );
    assert!(!a.still_leading(), "the old holder sees it lost the role");
    b.update_desired("d", |previous| {
        assert_eq!(
            previous.map(|p| p.generation),
            Some(1),
            "the fenced write left nothing"
        );
        Ok(desired_for("d", 2))
    })
    .unwrap();
    assert_eq!(a.desired("d").unwrap().unwrap().generation, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_unit_keeps_all_of_a_message_or_none_and_the_flush_makes_it_durable() {
    let Some(server) = server("unit") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("unit");
    let pg = PgStore::connect(&url, &dir).unwrap();
    let store: &dyn FleetStore = &pg;
    let write = |seq: u64| {
        store.update_device("a", |d| d.records += 1).unwrap();
        store
            .put_record(Stream::Telemetry, "a", &record(seq, seq))
            .unwrap();
    };

    // Given up: nothing of it stays.
    let kept = store
        .unit(&mut || {
            write(1);
            false
        })
        .unwrap();
    assert!(!kept);
    assert!(store.device("a").unwrap().is_none());
    assert!(
        store
            .records(Stream::Telemetry, Some("a"), None, 10)
            .unwrap()
            .is_empty()
    );

    // A write in it that fails undoes the rest, though the work says keep.
    let kept = store
        .unit(&mut || {
            write(1);
            let failed = store.update_device("bad\0id", |_| {});
            assert!(matches!(failed, Err(FleetError::Database(_))), "{failed:?}");
            true
        })
        .unwrap();
    assert!(!kept);
    assert!(store.device("a").unwrap().is_none());

    // Kept: seen at once by other connections, and on disk after the flush (the server is
    // then stopped as a crash would stop it).
    assert!(
        store
            .unit(&mut || {
                write(1);
                write(2);
                true
            })
            .unwrap()
    );
    assert_eq!(
        count(
            &pg,
            "SELECT (doc->>'records')::bigint FROM devices WHERE id = 'a'"
        ),
        2
    );
    store.flush().unwrap();
    server.kill().unwrap();
    server.start_again().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while store.check().is_err() {
        assert!(std::time::Instant::now() < deadline, "never came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(store.device("a").unwrap().unwrap().records, 2);
    let seqs: Vec<u64> = store
        .records(Stream::Telemetry, Some("a"), None, 10)
        .unwrap()
        .iter()
        .map(|r| r.record.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);

    // The connections the failed units used went back clean (or not at all): plain writes
    // outside a unit still commit.
    for n in 0..(POOL_SIZE as u64 * 2) {
        store.update_device("b", |d| d.records = n).unwrap();
    }
    assert_eq!(
        store.device("b").unwrap().unwrap().records,
        POOL_SIZE as u64 * 2 - 1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_batch_is_one_unit_and_two_replicas_on_the_same_devices_never_deadlock() {
    let Some(server) = server("batch-unit") else {
        return;
    };
    let url = server.database().unwrap();
    let dir = artifacts("batch-unit");
    let one = PgStore::connect(&url, &dir).unwrap();
    let two = PgStore::connect(&url, &dir).unwrap();
    for store in [&one as &dyn FleetStore, &two] {
        store.update_device("a", |_| {}).unwrap();
        store.update_device("b", |_| {}).unwrap();
    }

    // One message of the batch failing undoes the whole batch.
    let store: &dyn FleetStore = &one;
    let kept = store
        .unit_of_many(&["a", "b"], 3, &mut |i| {
            store.update_device("a", |d| d.records += 1).unwrap();
            i != 2
        })
        .unwrap();
    assert!(!kept);
    assert_eq!(store.device("a").unwrap().unwrap().records, 0);

    // Kept: every message's writes, the record read once and changed by each.
    let kept = store
        .unit_of_many(&["a", "b"], 3, &mut |_| {
            store.update_device("a", |d| d.records += 1).unwrap();
            store
                .update_device("new", |d| d.duplicates += 1)
                .unwrap()
                .duplicates
                >= 1
        })
        .unwrap();
    assert!(kept);
    assert_eq!(store.device("a").unwrap().unwrap().records, 3);
    assert_eq!(store.device("new").unwrap().unwrap().duplicates, 3);

    // Two replicas writing a and b in opposite orders: the rows are locked up front, in one
    // order, so the second waits for the first instead of the two deadlocking (which
    // PostgreSQL would end by failing one of them after a second).
    let barrier = std::sync::Barrier::new(2);
    let run = |store: &PgStore, first: &str, second: &str| {
        let store: &dyn FleetStore = store;
        barrier.wait();
        store.unit_of_many(&["a", "b"], 1, &mut |_| {
            store.update_device(first, |d| d.records += 10).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            store.update_device(second, |d| d.records += 10).unwrap();
            true
        })
    };
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| run(&one, "a", "b"));
        let y = s.spawn(|| run(&two, "b", "a"));
        (x.join().unwrap(), y.join().unwrap())
    });
    assert!(x.unwrap() && y.unwrap(), "both batches kept");
    let store: &dyn FleetStore = &one;
    assert_eq!(store.device("a").unwrap().unwrap().records, 23);
    assert_eq!(store.device("b").unwrap().unwrap().records, 20);
    let _ = std::fs::remove_dir_all(&dir);
}
