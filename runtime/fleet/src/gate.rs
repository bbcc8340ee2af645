//! The door in front of the embedded broker. Every MQTT connection is read up to its CONNECT
//! here, checked, and only then handed to rumqttd on a loopback port of its own; from the
//! CONNACK on, bytes pass both ways untouched.
//!
//! Why: rumqttd 0.20's connection handler registers a client id's will handler before its
//! router has accepted the connection, and leaves it behind when the router refuses the id
//! (one containing `+ $ # /`) or the CONNACK cannot be written (the client reset right after
//! its CONNECT). The next CONNECT with that id panics on the stale handler while holding the
//! lock every CONNECT needs, and from then on no client can connect (upstream: rumqtt pull
//! request 1066, not released). So the gate refuses such ids itself, with CONNACK "identifier
//! rejected", and always reads the broker's CONNACK before it lets go of the broker's side,
//! so that write cannot fail. It also caps open connections below the router's limit (the
//! router refusing one is the same stale-handler path), bounds the time and size of a CONNECT,
//! and counts what it refused for the fleet's `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How the gate bounds a connection before its CONNECT is accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send its CONNECT, and the broker to answer it.
    pub connect_timeout: Duration,
    /// Largest CONNECT (client id, will and login included).
    pub max_connect_bytes: usize,
}

/// Longest client id let through, in bytes.
pub const MAX_CLIENT_ID: usize = 256;

/// What the gate saw, for the fleet's `/metrics`.
#[derive(Debug, Default)]
pub struct GateStats {
    /// Connections handed to the broker.
    pub admitted: AtomicU64,
    /// Connections open now (admitted or still being read).
    pub open: AtomicU64,
    /// CONNECTs refused for their client id.
    pub refused_ids: AtomicU64,
    /// Connections closed for not starting with a well-formed CONNECT in time.
    pub malformed: AtomicU64,
    /// Connections closed because the gate was at its connection cap.
    pub over_capacity: AtomicU64,
}

/// Why a connection went no further.
#[derive(Debug)]
enum Refusal {
    /// Answered with CONNACK "identifier rejected".
    Identifier,
    /// Closed: not a well-formed CONNECT, too large, or too slow.
    Malformed(&'static str),
    /// The broker or the client went away.
    Io(std::io::Error),
}

impl From<std::io::Error> for Refusal {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// CONNACK, MQTT 3.1.1, "identifier rejected".
const CONNACK_IDENTIFIER_REJECTED: [u8; 4] = [0x20, 0x02, 0x00, 0x02];

/// Accepts connections on `listener` until the task is dropped, passing each to the broker at
/// `broker` once its CONNECT passes.
pub(crate) async fn serve(
    listener: TcpListener,
    broker: SocketAddr,
    limits: GateLimits,
    stats: Arc<GateStats>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: let some close before trying again.
                tracing::warn!(error = %e, "MQTT gate cannot accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            stats.over_capacity.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "MQTT gate full; connection closed");
            continue;
        };
        let stats = Arc::clone(&stats);
        tokio::spawn(async move {
            stats.open.fetch_add(1, Ordering::Relaxed);
            match pass(client, broker, limits, &stats).await {
                Ok(()) => {}
                Err(Refusal::Io(e)) => tracing::debug!(%peer, error = %e, "MQTT connection ended"),
                Err(Refusal::Identifier) => {
                    stats.refused_ids.fetch_add(1, Ordering::Relaxed);
                }
                Err(Refusal::Malformed(why)) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, why, "MQTT connection closed");
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Reads and checks the CONNECT, hands it to the broker, relays its CONNACK, then relays both
/// ways until either side closes.
async fn pass(
    mut client: TcpStream,
    broker: SocketAddr,
    limits: GateLimits,
    stats: &GateStats,
) -> Result<(), Refusal> {
    let connect = tokio::time::timeout(
        limits.connect_timeout,
        read_packet(&mut client, limits.max_connect_bytes),
    )
    .await
    .map_err(|_| Refusal::Malformed("no CONNECT in time"))??;
    if let Err(refusal) = check_connect(&connect) {
        if matches!(refusal, Refusal::Identifier) {
            let _ = client.write_all(&CONNACK_IDENTIFIER_REJECTED).await;
            let _ = client.shutdown().await;
        }
        return Err(refusal);
    }
    let mut upstream = TcpStream::connect(broker).await?;
    let _ = upstream.set_nodelay(true);
    let _ = client.set_nodelay(true);
    upstream.write_all(&connect).await?;
    // The broker's CONNACK is read before anything else, with the broker's side held open, so
    // its write never fails (see the module doc). A broker that closes instead (a refused
    // login, a zero keep-alive) closes the client too.
    let mut connack = [0u8; 4];
    tokio::time::timeout(limits.connect_timeout, upstream.read_exact(&mut connack))
        .await
        .map_err(|_| Refusal::Malformed("no CONNACK from the broker in time"))??;
    client.write_all(&connack).await?;
    if connack[3] != 0 {
        return Ok(());
    }
    stats.admitted.fetch_add(1, Ordering::Relaxed);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Reads one MQTT packet whole (fixed header, remaining length, body), refusing one larger
/// than `max` before reading its body.
async fn read_packet(stream: &mut TcpStream, max: usize) -> Result<Vec<u8>, Refusal> {
    let mut packet = vec![stream.read_u8().await?];
    let mut length = 0usize;
    for shift in 0..4 {
        let byte = stream.read_u8().await?;
        packet.push(byte);
        length |= usize::from(byte & 0x7f) << (7 * shift);
        if byte & 0x80 == 0 {
            break;
        }
        if shift == 3 {
            return Err(Refusal::Malformed("remaining length over four bytes"));
        }
    }
    if length > max {
        return Err(Refusal::Malformed("CONNECT too large"));
    }
    let start = packet.len();
    packet.resize(start + length, 0);
    stream.read_exact(&mut packet[start..]).await?;
    Ok(packet)
}

/// A CONNECT whose client id the broker's router accepts: UTF-8, at most [`MAX_CLIENT_ID`]
/// bytes, no `+ $ # /` (the router's rule) and no control characters (they reach logs).
fn check_connect(packet: &[u8]) -> Result<(), Refusal> {
    if packet.first().map(|b| b >> 4) != Some(1) {
        return Err(Refusal::Malformed("the first packet is not a CONNECT"));
    }
    // Skip the fixed header: the type byte and one to four length bytes.
    let header = 1 + packet[1..]
        .iter()
        .position(|b| b & 0x80 == 0)
        .map_or(packet.len(), |i| i + 1);
    let body = packet.get(header..).unwrap_or_default();
    let mut at = 0;
    let string = |at: &mut usize| -> Result<&[u8], Refusal> {
        let len = body
            .get(*at..*at + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or(Refusal::Malformed("truncated CONNECT"))?;
        let s = body
            .get(*at + 2..*at + 2 + len)
            .ok_or(Refusal::Malformed("truncated CONNECT"))?;
        *at += 2 + len;
        Ok(s)
    };
    let _protocol = string(&mut at)?;
    // Level, flags, keep-alive.
    at += 4;
    let id = string(&mut at)?;
    let id = std::str::from_utf8(id).map_err(|_| Refusal::Malformed("client id not UTF-8"))?;
    if id.len() > MAX_CLIENT_ID || id.chars().any(|c| "+$#/".contains(c) || c.is_control()) {
        return Err(Refusal::Identifier);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(id: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 10];
        body.extend((id.len() as u16).to_be_bytes());
        body.extend(id);
        let mut p = vec![0x10];
        let mut len = body.len();
        while len >= 0x80 {
            p.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        p.push(len as u8);
        p.extend(body);
        p
    }

    #[test]
    fn client_ids_the_router_would_refuse_are_refused_here() {
        assert!(check_connect(&connect(b"outpost-dev-1")).is_ok());
        assert!(check_connect(&connect(b"")).is_ok(), "rumqttd assigns one");
        for bad in [&b"a/b"[..], b"a+b", b"#", b"$SYS", b"a\nb", &[b'x'; 257]] {
            assert!(
                matches!(check_connect(&connect(bad)), Err(Refusal::Identifier)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            check_connect(&connect(&[0xff])),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            check_connect(&[0x30, 0]),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            check_connect(&connect(b"abc")[..8]),
            Err(Refusal::Malformed(_))
        ));
    }
}
