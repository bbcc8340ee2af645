//! Fuzzes the MQTT packet fields the fleet's gate reads from clients before it trusts them:
//! a CONNECT's client id, will and login, a PUBLISH's topic, a SUBSCRIBE's filters, and the
//! remaining-length bytes. Nothing may panic; a CONNECT that parses, written again from what
//! was read, parses to the same fields.
//!
//! Input: whole packets. Run with `.ci/fuzz mqtt_packets SECONDS`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::wire;

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u16).to_be_bytes());
    out.extend(bytes);
}

/// A CONNECT carrying exactly `c`'s fields.
fn encode(c: &wire::Connect<'_>) -> Vec<u8> {
    let flags = 0x02
        | if c.will_topic.is_some() { 0x04 } else { 0 }
        | if c.user.is_some() { 0x80 } else { 0 }
        | if c.password.is_some() { 0x40 } else { 0 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 30];
    field(&mut body, c.client_id);
    if let Some(topic) = c.will_topic {
        field(&mut body, topic);
        field(&mut body, b"");
    }
    for f in [c.user, c.password].into_iter().flatten() {
        field(&mut body, f);
    }
    let mut packet = vec![wire::kind::CONNECT << 4];
    let mut len = body.len();
    loop {
        let byte = (len % 0x80) as u8;
        len /= 0x80;
        packet.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

fuzz_target!(|data: &[u8]| {
    if let Ok(connect) = wire::parse_connect(data) {
        let again = encode(&connect);
        assert_eq!(
            wire::parse_connect(&again).as_ref(),
            Ok(&connect),
            "a CONNECT written from its fields reads differently"
        );
    }
    if let Ok(wire::Names::Subscribe(filters)) = wire::names(data) {
        let read: usize = filters.map_while(Result::ok).map(|f| f.len() + 3).sum();
        assert!(read <= data.len() + 1, "filters longer than the packet");
    }
    if let Ok(id) = wire::connect_client_id(data) {
        // The whole CONNECT, when it reads, has the same id.
        if let Ok(connect) = wire::parse_connect(data) {
            assert_eq!(connect.client_id, id);
        }
    }
    let _ = wire::remaining_length(data.get(1..).unwrap_or_default());
    let _ = wire::header_len(data);
});
