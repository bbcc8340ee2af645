//! The store's unit tests (kept beside it, in their own file).

use super::*;

fn temp_store(tag: &str) -> (PathBuf, Store) {
    let dir = std::env::temp_dir().join(format!("fleet-store-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
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
#[test]
fn a_deployment_is_recorded_all_or_nothing() {
    let (dir, store) = temp_store("deploy");
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
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_process_on_the_same_directory_is_refused_by_name() {
    let (dir, store) = temp_store("lock");
    let second = Store::open(&dir);
    assert!(
        matches!(&second, Err(FleetError::Config(m)) if m.contains("in use by another fleet process")),
        "{second:?}"
    );
    drop(store);
    // The lock goes with the process (here: with the store).
    assert!(Store::open(&dir).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn records_are_stored_once_per_device_and_seq() {
    let dir = std::env::temp_dir().join(format!("fleet-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
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
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_conflicting_record_is_kept_beside_the_first_and_bounded() {
    let dir = std::env::temp_dir().join(format!("fleet-conflict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir).unwrap();
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
    // Pruning passes over a device whose records are all young, variants included.
    assert_eq!(store.prune(Stream::Telemetry, 0, 100).unwrap(), 0);
    assert_eq!(store.prune(Stream::Telemetry, 2, 100).unwrap(), 5);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
