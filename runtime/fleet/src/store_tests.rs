//! The store's unit tests (kept beside it, in their own file).

use super::*;

fn temp_store(tag: &str) -> (PathBuf, SledStore) {
    let dir = std::env::temp_dir().join(format!("fleet-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = SledStore::open(&dir).unwrap();
    (dir, store)
}

fn desired(device: &DeviceId, generation: u64) -> DesiredRecord {
    let key = outpost_bundle::SecretKey::generate().unwrap();
    let state = outpost_proto::DesiredState {
        v: outpost_proto::PROTOCOL_VERSION,
        device: device.clone(),
        generation,
        expires_at: 10,
        deployments: vec![],
    };
    DesiredRecord {
        device: device.clone(),
        generation,
        deployments: vec![],
        expires_at: 10,
        envelope: SignedDesired::seal(&state, &key).unwrap(),
    }
}

fn deployment() -> DeploymentRecord {
    DeploymentRecord {
        id: 0,
        model: "m".into(),
        version: "1.0.0".into(),
        digest: "0".repeat(64),
        devices: vec!["a".into(), "b".into()],
        created_at: 1,
    }
}

/// Regression: a deployment whose desired state cannot be made for one device leaves
/// every device as it was and records nothing.
fn a_deployment_is_recorded_all_or_nothing(store: &Store) {
    let devices = ["a", "b"].map(|d| DeviceId::new(d).unwrap());
    let failed = store.record_deployment(
        &devices,
        |device, _| match device.as_str() {
            "b" => Err(FleetError::BadRequest("cannot sign for b".into())),
            _ => Ok(desired(device, 1)),
        },
        deployment(),
    );
    assert!(
        matches!(failed, Err(FleetError::BadRequest(_))),
        "{failed:?}"
    );
    assert_eq!(store.desired("a").unwrap(), None);
    assert!(store.deployments().unwrap().is_empty());

    let (records, record) = store
        .record_deployment(
            &devices,
            |device, previous| {
                assert!(previous.is_none());
                Ok(desired(device, 2))
            },
            deployment(),
        )
        .unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(store.desired("b").unwrap().unwrap().generation, 2);
    assert_eq!(store.deployments().unwrap(), vec![record]);
}

#[test]
fn a_second_process_on_the_same_directory_is_refused_by_name() {
    let (dir, store) = temp_store("lock");
    let second = SledStore::open(&dir);
    assert!(
        matches!(&second, Err(FleetError::Config(m)) if m.contains("in use by another fleet process")),
        "{second:?}"
    );
    drop(store);
    // The lock goes with the process (here: with the store).
    assert!(SledStore::open(&dir).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

fn records_are_stored_once_per_device_and_seq(store: &Store) {
    let rec = |seq| TelemetryRecord {
        seq,
        time: 1,
        body: serde_json::json!({ "n": seq }),
    };
    let put = |device, record| {
        store
            .put_record(Stream::Telemetry, device, &record)
            .unwrap()
    };
    assert_eq!(put("a", rec(1)), Put::New);
    assert_eq!(put("a", rec(1)), Put::Duplicate);
    assert_eq!(put("b", rec(1)), Put::New);
    assert_eq!(put("a", rec(2)), Put::New);
    let a = store
        .records(Stream::Telemetry, Some("a"), None, 100)
        .unwrap();
    assert_eq!(a.iter().map(|r| r.record.seq).collect::<Vec<_>>(), [1, 2]);
    let after = store
        .records(Stream::Telemetry, Some("a"), Some(1), 100)
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(
        store
            .records(Stream::Telemetry, None, None, 100)
            .unwrap()
            .len(),
        3
    );
    assert!(
        store
            .records(Stream::Events, Some("a"), None, 100)
            .unwrap()
            .is_empty()
    );
}

fn a_conflicting_record_is_kept_beside_the_first_and_bounded(store: &Store) {
    let rec = |seq, n| TelemetryRecord {
        seq,
        time: 1,
        body: serde_json::json!({ "n": n }),
    };
    let put = |record| store.put_record(Stream::Telemetry, "a", &record).unwrap();
    // A forger's record first, then the genuine one: both kept.
    assert_eq!(put(rec(u64::MAX, 0)), Put::New);
    assert_eq!(put(rec(u64::MAX, 1)), Put::Conflict);
    assert_eq!(put(rec(u64::MAX, 1)), Put::Duplicate);
    assert_eq!(put(rec(u64::MAX, 2)), Put::Conflict);
    assert_eq!(put(rec(u64::MAX, 3)), Put::Conflict);
    assert_eq!(put(rec(u64::MAX, 4)), Put::ConflictDropped);
    assert_eq!(put(rec(5, 5)), Put::New);
    let all = store
        .records(Stream::Telemetry, Some("a"), None, 100)
        .unwrap();
    assert_eq!(all.len(), 5);
}

#[test]
fn sled_prunes_by_the_records_own_time() {
    let (dir, store) = temp_store("prune");
    let store: Store = Box::new(store);
    a_conflicting_record_is_kept_beside_the_first_and_bounded(&store);
    // Pruning passes over a device whose records are all young, variants included.
    assert_eq!(store.prune(Stream::Telemetry, 0, 100).unwrap(), 0);
    assert_eq!(store.prune(Stream::Telemetry, 2, 100).unwrap(), 5);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

fn devices_are_created_updated_listed_and_paged(store: &Store) {
    assert_eq!(store.device("d-0001").unwrap(), None);
    assert!(
        !store
            .update_known_device("d-0001", |d| d.online = true)
            .unwrap()
    );
    assert_eq!(
        store.device("d-0001").unwrap(),
        None,
        "an unknown device stays unknown"
    );
    // More than one page of the PostgreSQL iterator, inserted out of order.
    for i in (0..600).rev() {
        let id = format!("d-{i:04}");
        let record = store.update_device(&id, |d| d.stored_bytes = i).unwrap();
        assert_eq!(record.id, id);
    }
    let record = store
        .update_device("d-0001", |d| d.stored_bytes += 10)
        .unwrap();
    assert_eq!(record.stored_bytes, 11);
    assert!(
        store
            .update_known_device("d-0001", |d| d.online = true)
            .unwrap()
    );
    let stored = store.device("d-0001").unwrap().unwrap();
    assert!(stored.online);
    assert_eq!(stored.stored_bytes, 11);
    let all: Vec<String> = store.devices().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(all.len(), 600);
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "devices come in id order");
    let paged: Vec<String> = store.devices_after(None).map(|d| d.unwrap().id).collect();
    assert_eq!(paged, all);
    let after: Vec<String> = store
        .devices_after(Some("d-0297"))
        .take(3)
        .map(|d| d.unwrap().id)
        .collect();
    assert_eq!(after, ["d-0298", "d-0299", "d-0300"]);
    assert!(store.remove_device("d-0001").unwrap());
    assert!(!store.remove_device("d-0001").unwrap());
    assert_eq!(store.devices().unwrap().len(), 599);
}

fn credentials_register_their_device(store: &Store) {
    let credential = Credential {
        sha256: "ab".repeat(32),
        issued_at: 7,
    };
    assert!(!store.is_enrolled("e1").unwrap());
    store.put_credential("e1", &credential).unwrap();
    store.put_credential("e1", &credential).unwrap();
    assert!(store.is_enrolled("e1").unwrap());
    assert!(store.device("e1").unwrap().is_some());
    assert_eq!(
        store.credentials().unwrap(),
        vec![("e1".to_owned(), credential)]
    );
    assert!(store.remove_credential("e1").unwrap());
    assert!(!store.remove_credential("e1").unwrap());
    assert!(!store.is_enrolled("e1").unwrap());
}

fn bundles_share_their_artifact_until_the_last_goes(store: &Store) {
    let bytes = b"bundle bytes";
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    let record = |version: &str| BundleRecord {
        name: "m".into(),
        version: version.into(),
        digest: digest.clone(),
        size: bytes.len() as u64,
        signer: None,
        security_counter: 0,
        pushed_at: 1,
    };
    store.put_bundle(&record("1.0.0"), bytes).unwrap();
    store.put_bundle(&record("1.0.1"), bytes).unwrap();
    store.put_bundle(&record("1.0.1"), bytes).unwrap();
    assert_eq!(store.bundles().unwrap().len(), 2);
    assert_eq!(store.bundle("m", "1.0.1").unwrap(), Some(record("1.0.1")));
    let path = store.artifact_path(&digest).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(store.artifact_path("../etc/passwd").is_err());
    assert_eq!(
        store.remove_bundle("m", "1.0.0").unwrap(),
        Some(record("1.0.0"))
    );
    assert!(path.exists(), "still used by 1.0.1");
    assert!(store.remove_bundle("m", "1.0.1").unwrap().is_some());
    assert!(!path.exists(), "the last record took its file with it");
    assert_eq!(store.remove_bundle("m", "1.0.1").unwrap(), None);
}

fn desired_states_ids_meta_and_recent_records(store: &Store) {
    let a = DeviceId::new("a").unwrap();
    let first = store.update_desired("a", |previous| {
        assert!(previous.is_none());
        Ok(desired(&a, 1))
    });
    assert_eq!(first.unwrap().generation, 1);
    store
        .update_desired("a", |previous| {
            assert_eq!(previous.map(|p| p.generation), Some(1));
            Ok(desired(&a, 2))
        })
        .unwrap();
    assert_eq!(store.desired("a").unwrap().unwrap().generation, 2);
    assert_eq!(store.all_desired().unwrap().len(), 1);
    let refused = store.update_desired("a", |_| Err(FleetError::BadRequest("no".into())));
    assert!(refused.is_err());
    assert_eq!(
        store.desired("a").unwrap().unwrap().generation,
        2,
        "unchanged"
    );

    let (one, two) = (
        store.next_rollout_id().unwrap(),
        store.next_firing_id().unwrap(),
    );
    assert!(two > one, "ids grow: {one} then {two}");

    assert_eq!(store.meta("k").unwrap(), None);
    store.set_meta("k", b"v1").unwrap();
    store.set_meta("k", b"v2").unwrap();
    assert_eq!(store.meta("k").unwrap().as_deref(), Some(&b"v2"[..]));

    for (seq, time) in [(1, 100), (2, 200), (3, 300), (4, 400)] {
        let record = TelemetryRecord {
            seq,
            time,
            body: serde_json::json!({ "seq": seq }),
        };
        let (put, size) = store
            .put_record_sized(Stream::Events, "a", &record)
            .unwrap();
        assert_eq!(put, Put::New);
        assert!(size > 0);
    }
    let recent = store.recent_records(Stream::Events, "a", 200, 2).unwrap();
    assert_eq!(
        recent.iter().map(|r| r.record.seq).collect::<Vec<_>>(),
        [3, 4],
        "the newest two at or after 200, oldest first"
    );
    assert!(
        store
            .recent_records(Stream::Telemetry, "a", 0, 10)
            .unwrap()
            .is_empty()
    );
}

/// What a page of the device list and the metrics' census read at once: in the order asked,
/// unknown devices included, the same as one lookup at a time.
fn a_page_of_desired_states_and_credentials_in_one_read(store: &Store) {
    let (a, c) = (DeviceId::new("a").unwrap(), DeviceId::new("c").unwrap());
    store.update_desired("a", |_| Ok(desired(&a, 3))).unwrap();
    store.update_desired("c", |_| Ok(desired(&c, 5))).unwrap();
    let credential = Credential {
        sha256: "cd".repeat(32),
        issued_at: 1,
    };
    store.put_credential("b", &credential).unwrap();
    store.put_credential("c", &credential).unwrap();
    let ids = ["c", "nobody", "a", "b"];
    let page = store.desired_and_enrolled(&ids).unwrap();
    let shown: Vec<(Option<u64>, bool)> = page
        .iter()
        .map(|(d, enrolled)| (d.as_ref().map(|d| d.generation), *enrolled))
        .collect();
    assert_eq!(
        shown,
        [
            (Some(5), true),
            (None, false),
            (Some(3), false),
            (None, true)
        ]
    );
    for (id, (desired, enrolled)) in ids.iter().zip(page) {
        assert_eq!(desired, store.desired(id).unwrap(), "{id}");
        assert_eq!(enrolled, store.is_enrolled(id).unwrap(), "{id}");
    }
    assert!(store.desired_and_enrolled(&[]).unwrap().is_empty());
    let generations = store.desired_generations().unwrap();
    assert_eq!(generations.len(), 2);
    assert_eq!((generations["a"], generations["c"]), (3, 5));
}

/// A unit kept is stored like the writes in it one by one, on either store; reads in it see
/// its own writes.
fn a_kept_unit_is_stored(store: &Store) {
    let kept = store
        .unit(&mut || {
            store.update_device("u", |d| d.records = 2).unwrap();
            assert_eq!(store.device("u").unwrap().unwrap().records, 2);
            let record = TelemetryRecord {
                seq: 9,
                time: 1,
                body: serde_json::json!({}),
            };
            store.put_record(Stream::Telemetry, "u", &record).unwrap() == Put::New
        })
        .unwrap();
    assert!(kept);
    store.flush().unwrap();
    assert_eq!(store.device("u").unwrap().unwrap().records, 2);
    assert_eq!(
        store
            .records(Stream::Telemetry, Some("u"), None, 10)
            .unwrap()
            .len(),
        1
    );
}

macro_rules! sled_cases {
    ($($case:ident),* $(,)?) => {
        mod on_sled {
            $(
                #[test]
                fn $case() {
                    let (dir, store) = super::temp_store(stringify!($case));
                    let store: super::Store = Box::new(store);
                    super::$case(&store);
                    drop(store);
                    let _ = std::fs::remove_dir_all(&dir);
                }
            )*
        }

        /// Every case again on PostgreSQL: one server, a fresh database per case.
        #[test]
        fn the_same_cases_on_postgres() {
            let Some(server) = outpost_testkit::postgres::Postgres::start_or_skip("store suite")
            else {
                return;
            };
            $(
                let dir = std::env::temp_dir()
                    .join(format!("fleet-pg-{}-{}", stringify!($case), std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                let url = server.database().unwrap();
                let store: Store =
                    Box::new(crate::store_pg::PgStore::connect(&url, &dir).unwrap());
                // Desired-state writes need the publishing role.
                assert!(store.try_lead("suite", None).unwrap());
                $case(&store);
                drop(store);
                let _ = std::fs::remove_dir_all(&dir);
            )*
        }
    };
}

sled_cases!(
    a_deployment_is_recorded_all_or_nothing,
    records_are_stored_once_per_device_and_seq,
    a_conflicting_record_is_kept_beside_the_first_and_bounded,
    devices_are_created_updated_listed_and_paged,
    credentials_register_their_device,
    bundles_share_their_artifact_until_the_last_goes,
    desired_states_ids_meta_and_recent_records,
    a_page_of_desired_states_and_credentials_in_one_read,
    a_kept_unit_is_stored,
);
