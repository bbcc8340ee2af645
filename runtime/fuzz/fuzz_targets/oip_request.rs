//! Fuzzes the OIP request decoder (JSON and the binary tensor extension) and the response
//! encoder: any body gives a request or an `OipError`, never a panic; what a request decodes
//! to never exceeds what was reserved for it before decoding; and echoing its tensors back
//! stays within the response limit.
//!
//! Input: two bytes (little-endian) giving the JSON part's length (`0xffff`: no binary
//! part), then the body. Run with `.ci/fuzz oip_request SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_oip::{Encoding, OipError, decode_request_within, encode_response};

const CAP: u64 = 1 << 16;
const MAX_JSON: u64 = 1 << 18;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let split = u16::from_le_bytes(*head);
    let json_len = (split != u16::MAX).then_some(usize::from(split));
    let mut reserved = 0;
    let decoded = decode_request_within(body, json_len, CAP, |n| {
        reserved = n;
        Ok::<_, OipError>(())
    });
    let Ok((request, ())) = decoded else {
        return;
    };
    let bytes: u64 = request.inputs.iter().map(|t| t.data.len() as u64).sum();
    assert!(
        bytes <= reserved,
        "decoded {bytes} bytes, reserved {reserved}"
    );
    let how = Encoding {
        requested: &request.outputs,
        binary_output: request.binary_output,
        labels: &[],
        max_json_bytes: MAX_JSON,
    };
    let mut reserved_out = 0;
    let encoded = encode_response("m", "1", request.id.as_deref(), &request.inputs, how, |n| {
        reserved_out = n;
        Ok::<_, OipError>(())
    });
    if let Ok((json, binary, ())) = encoded {
        assert!(json.len() as u64 <= MAX_JSON);
        assert!((json.len() + binary.len()) as u64 <= reserved_out);
        let _: serde_json::Value = serde_json::from_slice(&json).expect("the response is JSON");
    }
});
