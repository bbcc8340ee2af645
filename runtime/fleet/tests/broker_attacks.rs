//! The embedded broker against a hostile MQTT client on its network: raw MQTT 3.1.1 packets over
//! TCP, as an attacker would send them, against the broker the fleet starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_fleet::broker::EmbeddedBroker;

/// An MQTT string: length, then the bytes.
fn field(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// A packet: type and flags, remaining length, body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
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
fn connect_packet(client_id: &[u8], login: Option<(&str, &str)>) -> Vec<u8> {
    let flags: u8 = if login.is_some() { 0xc2 } else { 0x02 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 10];
    body.extend(field(client_id));
    if let Some((user, password)) = login {
        body.extend(field(user.as_bytes()));
        body.extend(field(password.as_bytes()));
    }
    packet(0x10, &body)
}

/// Sends a CONNECT; returns the CONNACK's return code, or `None` when the broker closed the
/// connection or said nothing within 5 s.
fn connack(broker: SocketAddr, client_id: &[u8], login: Option<(&str, &str)>) -> Option<u8> {
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
const ACCEPTED: u8 = 0;
const IDENTIFIER_REJECTED: u8 = 2;

fn assert_serves(broker: SocketAddr, login: Option<(&str, &str)>) {
    for id in ["outpost-dev-1", "outpost-fleet-primary"] {
        assert_eq!(
            connack(broker, id.as_bytes(), login),
            Some(ACCEPTED),
            "{id} cannot connect"
        );
    }
}

#[test]
fn client_ids_the_router_refuses_are_refused_at_the_door_and_the_broker_serves_on() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    // rumqttd's router refuses ids with `+ $ # /`; its connection handler leaves a will handler
    // behind for them, and the next CONNECT with that id used to panic while holding a lock
    // every later CONNECT needs.
    for id in ["a/b", "a+b", "a#", "$SYS", "outpost-dev-1/x"] {
        for attempt in 0..3 {
            assert_eq!(
                connack(broker.addr(), id.as_bytes(), None),
                Some(IDENTIFIER_REJECTED),
                "{id}, attempt {attempt}"
            );
        }
    }
    assert_serves(broker.addr(), None);
    let stats = broker.gate_stats();
    assert_eq!(stats.refused_ids.load(Ordering::Relaxed), 15);
    assert!(stats.admitted.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_refused_id_with_a_valid_login_does_not_stop_the_broker_either() {
    let logins = HashMap::from([("dev-1".to_owned(), "pw-1".to_owned())]);
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), Some(logins)).unwrap();
    let login = Some(("dev-1", "pw-1"));
    for _ in 0..3 {
        assert_eq!(
            connack(broker.addr(), b"a/b", login),
            Some(IDENTIFIER_REJECTED)
        );
    }
    assert_eq!(
        connack(broker.addr(), b"outpost-dev-1", Some(("dev-1", "wrong"))),
        None,
        "a wrong password is refused (rumqttd closes the connection)"
    );
    assert_serves(broker.addr(), login);
}

#[test]
fn a_client_that_resets_right_after_connect_leaves_its_id_usable() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    // CONNECT, then a reset before the broker writes its CONNACK: rumqttd's handler failed on
    // that write after registering the id, with the same poisoned lock on the next CONNECT.
    for _ in 0..50 {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.connect(&broker.addr().into()).unwrap();
        socket.set_linger(Some(Duration::ZERO)).unwrap();
        let mut stream: TcpStream = socket.into();
        stream
            .write_all(&connect_packet(b"outpost-dev-1", None))
            .unwrap();
        drop(stream); // RST, not FIN
        assert_eq!(
            connack(broker.addr(), b"outpost-dev-1", None),
            Some(ACCEPTED)
        );
    }
    assert_serves(broker.addr(), None);
}

#[test]
fn garbage_and_oversized_connects_are_closed_without_harm() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), None).unwrap();
    let attacks: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        packet(0x30, b"\x00\x01apayload"), // PUBLISH before CONNECT
        packet(0x10, &[0, 4, b'M', b'Q']), // truncated CONNECT
        // A client id that is not UTF-8.
        packet(
            0x10,
            &[
                &[0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10, 0, 2][..],
                &[0xff, 0xfe],
            ]
            .concat(),
        ),
        // A remaining length of 256 MiB announced, nothing sent.
        vec![0x10, 0xff, 0xff, 0xff, 0x7f],
    ];
    for attack in &attacks {
        let mut stream = TcpStream::connect(broker.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let _ = stream.write_all(attack);
        let mut reply = Vec::new();
        // Closed (maybe after a refusal), not left hanging.
        if let Err(e) = stream.read_to_end(&mut reply) {
            assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{attack:?} left open: {e}"
            );
        }
        assert!(
            reply.is_empty() || reply[0] == 0x20,
            "{attack:?} got {reply:?}"
        );
    }
    assert_serves(broker.addr(), None);
}
