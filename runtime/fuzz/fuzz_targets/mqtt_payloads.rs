//! Fuzzes every MQTT payload a device or the fleet decodes: the desired-state envelope (a
//! device parses and opens it), and the reported state, telemetry and event batches (the fleet
//! parses them), and the topics they come on. Nothing may panic; an envelope the fuzzer did
//! not sign never opens.
//!
//! Input: a selector byte, then the payload. Run with `.ci/fuzz mqtt_payloads SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle::SecretKey;
use outpost_proto::{DeviceId, ReportedState, SignedDesired, TelemetryBatch, Topics};

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(envelope) = SignedDesired::from_slice(payload) {
                let key = SecretKey::from_seed(&[7; 32]).public();
                let device = DeviceId::new("edge-0001").expect("a valid id");
                let opened = envelope.open(&key, &device, 1_700_000_000, Some(3));
                // Without the secret key no input can carry a valid signature.
                assert!(opened.is_err(), "an unsigned envelope opened");
            }
        }
        1 => {
            let _ = serde_json::from_slice::<ReportedState>(payload);
        }
        2 => {
            let _ = serde_json::from_slice::<TelemetryBatch>(payload);
        }
        _ => {
            if let Ok(topic) = std::str::from_utf8(payload) {
                if let Some((device, leaf)) = Topics::parse(topic) {
                    // What parses names itself again.
                    assert_eq!(Topics::new(&device).name(leaf), topic);
                }
                let _ = outpost_proto::parse_fleet_presence(topic);
            }
        }
    }
});
