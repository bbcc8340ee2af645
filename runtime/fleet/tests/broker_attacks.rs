//! The embedded broker against a hostile MQTT client on its network: raw MQTT 3.1.1 packets over
//! TCP, as an attacker would send them, against the broker the fleet starts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Duration;

use outpost_fleet::broker::EmbeddedBroker;
use outpost_fleet::{LiveLogins, Logins};

mod raw;
use raw::*;

/// Logins for a broker started alone.
fn logins(text: &str) -> Option<std::sync::Arc<LiveLogins>> {
    Some(std::sync::Arc::new(LiveLogins::new(
        Logins::parse(text).unwrap(),
    )))
}

#[test]
fn a_device_login_reaches_its_own_topics_only() {
    let broker = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        logins("dev-1:pw-1\nfleet/ops:pw-ops"),
    )
    .unwrap();
    let device = ("dev-1", "pw-1");
    // A fleet login reads what devices publish, through the gate's checked relay.
    let mut fleet = session(broker.addr(), "outpost-fleet-ops", ("fleet/ops", "pw-ops"));
    assert_eq!(
        subscribe(&mut fleet, "outpost/v1/+/telemetry"),
        Some(SUBACK)
    );

    // Everything a device's login must not do closes its connection before the broker sees it.
    let forbidden: [(&str, &str); 7] = [
        ("subscribe", "#"),
        ("subscribe", "outpost/v1/+/telemetry"),
        (
            "subscribe",
            "$share/outpost-fleet-telemetry/outpost/v1/+/telemetry",
        ),
        ("subscribe", "outpost/v1/dev-2/desired"),
        ("publish", "outpost/v1/dev-2/telemetry"),
        ("publish", "outpost/v1/dev-1/desired"),
        ("publish", "outpost/v1/_fleet/ops/status"),
    ];
    for (what, topic) in forbidden {
        let mut stream = session(broker.addr(), "outpost-dev-1", device);
        let answer = match what {
            "subscribe" => subscribe(&mut stream, topic),
            _ => publish(&mut stream, topic, b"forged"),
        };
        assert_eq!(answer, None, "{what} {topic} was let through");
    }
    // Counted once the connection is closed: wait for the count rather than race it.
    let stats = broker.gate_stats();
    for _ in 0..500 {
        if stats.forbidden.load(Ordering::Relaxed) >= 7 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stats.forbidden.load(Ordering::Relaxed), 7);
    // None of the forged publishes reached the fleet's subscription: the next message it gets
    // is the device's own.
    let mut stream = session(broker.addr(), "outpost-dev-1", device);
    assert_eq!(
        subscribe(&mut stream, "outpost/v1/dev-1/desired"),
        Some(SUBACK)
    );
    assert_eq!(
        subscribe(&mut stream, outpost_proto::FLEET_PRESENCE_FILTER),
        Some(SUBACK)
    );
    assert_eq!(
        publish(&mut stream, "outpost/v1/dev-1/telemetry", b"genuine"),
        Some(PUBACK)
    );
    let mut first = [0u8; 2];
    fleet.read_exact(&mut first).unwrap();
    assert_eq!(first[0] >> 4, PUBLISH);
    let mut body = vec![0u8; usize::from(first[1])];
    fleet.read_exact(&mut body).unwrap();
    assert!(body.starts_with(&field(b"outpost/v1/dev-1/telemetry")));
    assert!(body.ends_with(b"genuine"), "{body:?}");
}

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
    let broker =
        EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), logins("dev-1:pw-1")).unwrap();
    let login = Some(("dev-1", "pw-1"));
    for _ in 0..3 {
        assert_eq!(
            connack(broker.addr(), b"a/b", login),
            Some(IDENTIFIER_REJECTED)
        );
    }
    assert_eq!(
        connack(broker.addr(), b"outpost-dev-1", Some(("dev-1", "wrong"))),
        Some(BAD_LOGIN),
        "a wrong password is refused"
    );
    assert_eq!(
        connack(broker.addr(), b"outpost-fleet-primary", login),
        Some(NOT_AUTHORISED),
        "a device's login cannot take the fleet's client id"
    );
    assert_eq!(
        connack(broker.addr(), b"outpost-dev-1", login),
        Some(ACCEPTED)
    );
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
