//! Raw MQTT 3.1.1 packets over TCP, as an attacker (or a test) sends them.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An MQTT string: length, then the bytes.
pub fn field(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// A packet: type and flags, remaining length, body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// A CONNECT with a clean session, a 10 s keep-alive, `client_id` and maybe a login.
pub fn connect_packet(client_id: &[u8], login: Option<(&str, &str)>) -> Vec<u8> {
    let flags: u8 = if login.is_some() { 0xc2 } else { 0x02 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 10];
    body.extend(field(client_id));
    if let Some((user, password)) = login {
        body.extend(field(user.as_bytes()));
        body.extend(field(password.as_bytes()));
    }
    packet(0x10, &body)
}

/// Connects as `client_id` with `login`, expecting to be accepted.
pub fn session(broker: SocketAddr, client_id: &str, login: (&str, &str)) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&broker, Duration::from_secs(2)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(&connect_packet(client_id.as_bytes(), Some(login)))
        .unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, ACCEPTED], "{client_id}");
    stream
}

/// SUBSCRIBE (packet id 1, QoS 1) to `filter`; the broker's first reply packet type, or `None`
/// when it closed the connection.
pub fn subscribe(stream: &mut TcpStream, filter: &str) -> Option<u8> {
    let mut body = vec![0, 1];
    body.extend(field(filter.as_bytes()));
    body.push(1);
    stream.write_all(&packet(0x82, &body)).ok()?;
    reply(stream)
}

/// PUBLISH QoS 1 (packet id 2); the broker's first reply packet type, or `None` when it
/// closed the connection.
pub fn publish(stream: &mut TcpStream, topic: &str, payload: &[u8]) -> Option<u8> {
    let mut body = field(topic.as_bytes());
    body.extend([0, 2]);
    body.extend(payload);
    stream.write_all(&packet(0x32, &body)).ok()?;
    reply(stream)
}

/// The type of the next packet the broker sends (its body skipped), `None` once it closed.
pub fn reply(stream: &mut TcpStream) -> Option<u8> {
    let mut first = [0u8; 2];
    stream.read_exact(&mut first).ok()?;
    let mut rest = vec![0u8; usize::from(first[1])];
    stream.read_exact(&mut rest).ok()?;
    Some(first[0] >> 4)
}

pub const SUBACK: u8 = 9;
pub const PUBACK: u8 = 4;
pub const PUBLISH: u8 = 3;

/// Sends a CONNECT; returns the CONNACK's return code, or `None` when the broker closed the
/// connection or said nothing within 5 s.
pub fn connack(broker: SocketAddr, client_id: &[u8], login: Option<(&str, &str)>) -> Option<u8> {
    let mut stream = TcpStream::connect_timeout(&broker, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(&connect_packet(client_id, login)).ok()?;
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).ok()?;
    assert_eq!(&ack[..2], &[0x20, 2], "not a CONNACK: {ack:?}");
    let _ = stream.write_all(&[0xe0, 0]);
    Some(ack[3])
}

/// MQTT 3.1.1's CONNACK codes.
pub const ACCEPTED: u8 = 0;
pub const IDENTIFIER_REJECTED: u8 = 2;
pub const BAD_LOGIN: u8 = 4;
pub const NOT_AUTHORISED: u8 = 5;

/// Whether the broker closes the connection within the stream's read timeout (whatever it
/// sends before is skipped); false when it stays open.
pub fn closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                );
            }
        }
    }
}

/// Reads one packet whole: its first byte and its body.
pub fn read_packet(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).ok()?;
    let mut len = 0usize;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).ok()?;
        len |= usize::from(byte[0] & 0x7f) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some((first[0], body))
}

/// SUBSCRIBE (QoS 1) to `filter`; the SUBACK's return code (0x80: refused), or `None` when the
/// broker closed the connection.
pub fn suback_code(stream: &mut TcpStream, filter: &str) -> Option<u8> {
    let mut body = vec![0, 1];
    body.extend(field(filter.as_bytes()));
    body.push(1);
    stream.write_all(&packet(0x82, &body)).ok()?;
    let (first, body) = read_packet(stream)?;
    assert_eq!(first >> 4, SUBACK, "not a SUBACK");
    body.get(2).copied()
}

/// The next PUBLISH's topic and payload (acknowledged when QoS 1), other packets skipped.
pub fn next_publish(stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    loop {
        let (first, body) = read_packet(stream)?;
        if first >> 4 != PUBLISH {
            continue;
        }
        let len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        let topic = String::from_utf8_lossy(&body[2..2 + len]).into_owned();
        let mut at = 2 + len;
        if (first >> 1) & 3 > 0 {
            let id = [body[at], body[at + 1]];
            at += 2;
            stream.write_all(&[0x40, 2, id[0], id[1]]).ok()?;
        }
        return Some((topic, body[at..].to_vec()));
    }
}
