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
//!
//! With [`Logins`], the gate is where identity and authorisation live: it checks the login
//! (CONNACK "bad user name or password" otherwise), binds the client id and the last will to the
//! login's [`Identity`] (CONNACK "not authorised"), and reads every packet a device sends,
//! closing the connection at the first PUBLISH or SUBSCRIBE outside its own topics (see
//! [`acl`](crate::acl)). A fleet's connection is relayed untouched. Logins change while the
//! broker runs (enrolment, revocation): a device connection whose login no longer holds is
//! closed at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use outpost_proto::wire;

use crate::acl::{Identity, LiveLogins};

/// How the gate bounds a connection before its CONNECT is accepted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GateLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send its CONNECT, and the broker to answer it.
    pub connect_timeout: Duration,
    /// Largest packet a client may send (a CONNECT with its will and login included).
    pub max_packet_bytes: usize,
    /// How fast one device's login may publish.
    pub device_rate: Rate,
}

pub(crate) use crate::gate_room::Rate;
use crate::gate_room::{Buckets, Waiting};

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
    /// Connections without a CONNECT yet, closed at the cap to make room for a newcomer.
    pub evicted: AtomicU64,
    /// CONNECTs refused for an unknown login or a wrong password.
    pub refused_logins: AtomicU64,
    /// CONNECTs refused for a client id or a last will not the login's own.
    pub refused_unauthorised: AtomicU64,
    /// Connections closed for a PUBLISH or SUBSCRIBE outside the login's own topics.
    pub forbidden: AtomicU64,
    /// Connections closed because their login was revoked or replaced.
    pub revoked: AtomicU64,
    /// Times a device's publishing was held back for going past its rate.
    pub throttled: AtomicU64,
}

/// Why a connection went no further.
#[derive(Debug)]
enum Refusal {
    /// Answered with CONNACK "identifier rejected".
    Identifier,
    /// Answered with CONNACK "bad user name or password".
    Login,
    /// Answered with CONNACK "not authorised": the client id or the will is not the login's.
    NotAuthorised(&'static str),
    /// Closed: a PUBLISH or SUBSCRIBE outside the login's own topics.
    Forbidden(Identity, String),
    /// Closed: the login was revoked or its password replaced.
    Revoked(Identity),
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

/// CONNACK, MQTT 3.1.1, with its return code.
const fn connack(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
}

/// Accepts connections on `listener` until the task is dropped, passing each to the broker at
/// `broker` once its CONNECT passes; with `logins`, only those, each confined to its topics;
/// with `tls`, each connection is TLS (the gate ends it, the broker behind speaks plain MQTT).
pub(crate) async fn serve(
    listener: TcpListener,
    broker: SocketAddr,
    limits: GateLimits,
    stats: Arc<GateStats>,
    logins: Option<Arc<LiveLogins>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let buckets = Arc::new(Buckets::default());
    let waiting = Arc::new(Waiting::default());
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
        // At the cap, the connection that has waited longest without a CONNECT makes room:
        // slow clients cannot hold the door against devices that connect at once.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) if waiting.evict_oldest() => {
                stats.evicted.fetch_add(1, Ordering::Relaxed);
                tokio::time::timeout(Duration::from_secs(1), Arc::clone(&permits).acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(permit) = permit else {
            stats.over_capacity.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "MQTT gate full; connection closed");
            continue;
        };
        let ticket = waiting.ticket();
        let stats = Arc::clone(&stats);
        let logins = logins.clone();
        let buckets = Arc::clone(&buckets);
        let tls = tls.clone();
        tokio::spawn(async move {
            stats.open.fetch_add(1, Ordering::Relaxed);
            let door = Door {
                limits,
                stats: &stats,
                buckets: &buckets,
                ticket: &ticket,
            };
            let _ = client.set_nodelay(true);
            let evicted = Arc::clone(&ticket.evicted);
            let connection = async move {
                match tls {
                    None => pass(client, broker, door, logins.as_deref()).await,
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.connect_timeout, acceptor.accept(client))
                            .await
                        {
                            Ok(Ok(stream)) => pass(stream, broker, door, logins.as_deref()).await,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                Err(Refusal::Malformed("TLS handshake failed"))
                            }
                            Err(_) => Err(Refusal::Malformed("no TLS handshake in time")),
                        }
                    }
                }
            };
            let passed = tokio::select! {
                passed = connection => passed,
                () = evicted.notified() => Err(Refusal::Malformed("closed to make room: no CONNECT yet")),
            };
            match passed {
                Ok(()) => {}
                Err(Refusal::Io(e)) => tracing::debug!(%peer, error = %e, "MQTT connection ended"),
                Err(Refusal::Identifier) => {
                    stats.refused_ids.fetch_add(1, Ordering::Relaxed);
                }
                Err(Refusal::Login) => {
                    stats.refused_logins.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, "MQTT login refused");
                }
                Err(Refusal::NotAuthorised(why)) => {
                    stats.refused_unauthorised.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, why, "MQTT connection refused");
                }
                Err(Refusal::Forbidden(identity, topic)) => {
                    stats.forbidden.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, %identity, topic, "MQTT client closed: not its topic");
                }
                Err(Refusal::Revoked(identity)) => {
                    stats.revoked.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%peer, %identity, "MQTT client closed: its login was revoked");
                }
                Err(Refusal::Malformed(why)) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, why, "MQTT connection closed");
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            drop((ticket, permit));
        });
    }
}

/// What every connection through the gate shares.
#[derive(Clone, Copy)]
struct Door<'a> {
    limits: GateLimits,
    stats: &'a GateStats,
    buckets: &'a Buckets,
    ticket: &'a crate::gate_room::Ticket,
}

/// Reads and checks the CONNECT, hands it to the broker, relays its CONNACK, then relays both
/// ways until either side closes (reading a device's packets on the way).
async fn pass<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    broker: SocketAddr,
    door: Door<'_>,
    logins: Option<&LiveLogins>,
) -> Result<(), Refusal> {
    let limits = door.limits;
    let stats = door.stats;
    let packet = tokio::time::timeout(
        limits.connect_timeout,
        read_packet(&mut client, limits.max_packet_bytes),
    )
    .await
    .map_err(|_| Refusal::Malformed("no CONNECT in time"))??;
    let admitted = parse_connect(&packet).and_then(|c| {
        let identity = admit(&c, logins)?;
        // What a later change of the logins is checked against.
        let login = (
            String::from_utf8_lossy(c.user.unwrap_or_default()).into_owned(),
            c.password.unwrap_or_default().to_vec(),
        );
        Ok((identity, login))
    });
    let (identity, login) = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let code = match refusal {
                Refusal::Identifier => Some(2),
                Refusal::Login => Some(4),
                Refusal::NotAuthorised(_) => Some(5),
                _ => None,
            };
            if let Some(code) = code {
                let _ = client.write_all(&connack(code)).await;
                let _ = client.shutdown().await;
            }
            return Err(refusal);
        }
    };
    // From here the connection is not evicted: dropping it between its CONNECT and the
    // broker's CONNACK is the path that breaks rumqttd (see the module doc).
    door.ticket.admitted();
    let mut upstream = TcpStream::connect(broker).await?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&packet).await?;
    // The broker's CONNACK is read before anything else, with the broker's side held open, so
    // its write never fails (see the module doc). A broker that closes instead (a refused
    // login, a zero keep-alive) closes the client too.
    let mut ack = [0u8; 4];
    tokio::time::timeout(limits.connect_timeout, upstream.read_exact(&mut ack))
        .await
        .map_err(|_| Refusal::Malformed("no CONNACK from the broker in time"))??;
    client.write_all(&ack).await?;
    if ack[3] != 0 {
        return Ok(());
    }
    stats.admitted.fetch_add(1, Ordering::Relaxed);
    match (identity, logins) {
        (Some(identity @ Identity::Device(_)), Some(logins)) => {
            let held = LoginHeld {
                logins,
                user: &login.0,
                password: &login.1,
                identity: &identity,
            };
            relay_checked(client, upstream, held, door).await
        }
        _ => {
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
            Ok(())
        }
    }
}

/// Who the CONNECT is, when there are logins; refuses an unknown login, and a client id or a
/// last will not the login's own.
fn admit(connect: &Connect<'_>, logins: Option<&LiveLogins>) -> Result<Option<Identity>, Refusal> {
    let Some(logins) = logins else {
        return Ok(None);
    };
    let (Some(user), Some(password)) = (connect.user, connect.password) else {
        return Err(Refusal::Login);
    };
    let user = std::str::from_utf8(user).map_err(|_| Refusal::Login)?;
    let identity = logins.check(user, password).ok_or(Refusal::Login)?;
    if connect.client_id != identity.client_id() {
        return Err(Refusal::NotAuthorised("a client id not the login's own"));
    }
    if let Some(topic) = connect.will_topic
        && !std::str::from_utf8(topic).is_ok_and(|t| identity.may_publish(t))
    {
        return Err(Refusal::NotAuthorised(
            "a last will on a topic not the login's own",
        ));
    }
    Ok(Some(identity))
}

/// A device's login as it connected, checked again whenever the logins change.
#[derive(Clone, Copy)]
struct LoginHeld<'a> {
    logins: &'a LiveLogins,
    user: &'a str,
    password: &'a [u8],
    identity: &'a Identity,
}

impl LoginHeld<'_> {
    fn holds(&self) -> bool {
        self.logins.check(self.user, self.password).as_ref() == Some(self.identity)
    }
}

/// Relays a device's connection, reading each packet it sends: the first PUBLISH or SUBSCRIBE
/// outside its own topics closes the connection before the broker sees it, and so does the
/// login being revoked or replaced.
async fn relay_checked<S: AsyncRead + AsyncWrite + Unpin>(
    client: S,
    upstream: TcpStream,
    login: LoginHeld<'_>,
    door: Door<'_>,
) -> Result<(), Refusal> {
    let identity = login.identity;
    let max = door.limits.max_packet_bytes;
    let mut changes = login.logins.watch();
    // A change between the CONNECT's check and the watch above would go unseen otherwise.
    if !login.holds() {
        return Err(Refusal::Revoked(identity.clone()));
    }
    let revoked = async {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match changes.recv().await {
                // Another login's change: nothing to check (thousands of connections need
                // not hash their passwords for every device enrolled).
                Ok(user) if user != login.user => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                // The logins are gone with the fleet: nothing more to watch.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
            if !login.holds() {
                return Refusal::Revoked(identity.clone());
            }
        }
    };
    let (client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let mut client_read = BufReader::new(client_read);
    let down = tokio::io::copy(&mut upstream_read, &mut client_write);
    let up = async {
        loop {
            let packet = match read_packet(&mut client_read, max).await {
                Ok(packet) => packet,
                Err(Refusal::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if let Some(topic) = forbidden(identity, &packet)? {
                return Err(Refusal::Forbidden(identity.clone(), topic));
            }
            if wire::packet_type(&packet) == Some(wire::kind::PUBLISH) {
                let wait = door
                    .buckets
                    .take(login.user, packet.len(), door.limits.device_rate);
                if !wait.is_zero() {
                    door.stats.throttled.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                }
            }
            upstream_write.write_all(&packet).await?;
        }
    };
    tokio::select! {
        copied = down => copied.map(|_| ()).map_err(Refusal::Io),
        checked = up => checked,
        refusal = revoked => Err(refusal),
    }
}

/// The topic or filter of a PUBLISH or SUBSCRIBE that `identity` may not use, if any; a second
/// CONNECT or a malformed packet is refused.
fn forbidden(identity: &Identity, packet: &[u8]) -> Result<Option<String>, Refusal> {
    let shown = |t: &[u8]| {
        outpost_proto::text::bounded(&String::from_utf8_lossy(t), outpost_proto::text::MAX_QUOTED)
    };
    match wire::names(packet).map_err(|m| Refusal::Malformed(m.0))? {
        wire::Names::Connect => Err(Refusal::Malformed("a second CONNECT")),
        wire::Names::Publish(topic) => Ok((!std::str::from_utf8(topic)
            .is_ok_and(|t| identity.may_publish(t)))
        .then(|| shown(topic))),
        wire::Names::Subscribe(filters) => {
            for filter in filters {
                let filter = filter.map_err(|m| Refusal::Malformed(m.0))?;
                if !std::str::from_utf8(filter).is_ok_and(|f| identity.may_subscribe(f)) {
                    return Ok(Some(shown(filter)));
                }
            }
            Ok(None)
        }
        wire::Names::Other => Ok(None),
    }
}

/// Reads one MQTT packet whole (fixed header, remaining length, body), refusing one larger
/// than `max` before reading its body.
async fn read_packet(
    stream: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Vec<u8>, Refusal> {
    let mut packet = vec![stream.read_u8().await?];
    let length = loop {
        packet.push(stream.read_u8().await?);
        if let Some(length) =
            wire::remaining_length(&packet[1..]).map_err(|m| Refusal::Malformed(m.0))?
        {
            break length;
        }
    };
    if length > max {
        return Err(Refusal::Malformed("packet too large"));
    }
    let start = packet.len();
    packet.resize(start + length, 0);
    stream.read_exact(&mut packet[start..]).await?;
    Ok(packet)
}

/// What the gate reads from a CONNECT.
#[derive(Debug)]
struct Connect<'a> {
    client_id: &'a str,
    will_topic: Option<&'a [u8]>,
    user: Option<&'a [u8]>,
    password: Option<&'a [u8]>,
}

/// Reads a CONNECT; refuses a client id the broker's router would not take: not UTF-8, over
/// [`MAX_CLIENT_ID`] bytes, with `+ $ # /` (the router's rule) or control characters (they
/// reach logs).
fn parse_connect(packet: &[u8]) -> Result<Connect<'_>, Refusal> {
    // The id is judged before the fields after it are read.
    let id = wire::connect_client_id(packet).map_err(|m| Refusal::Malformed(m.0))?;
    let id = std::str::from_utf8(id).map_err(|_| Refusal::Malformed("client id not UTF-8"))?;
    if id.len() > MAX_CLIENT_ID || id.chars().any(|c| "+$#/".contains(c) || c.is_control()) {
        return Err(Refusal::Identifier);
    }
    let connect = wire::parse_connect(packet).map_err(|m| Refusal::Malformed(m.0))?;
    Ok(Connect {
        client_id: id,
        will_topic: connect.will_topic,
        user: connect.user,
        password: connect.password,
    })
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
    fn a_device_past_its_burst_waits_at_its_rate_and_reconnecting_buys_nothing() {
        let rate = Rate {
            per_second: 1000,
            burst: 5000,
        };
        let buckets = Buckets::default();
        assert_eq!(buckets.take("dev-1", 5000, rate), Duration::ZERO);
        let wait = buckets.take("dev-1", 2000, rate);
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        // The same device again (a new connection): still in debt.
        assert!(buckets.take("dev-1", 1, rate) > Duration::from_millis(1900));
        // Another device has its own bucket.
        assert_eq!(buckets.take("dev-2", 5000, rate), Duration::ZERO);
    }

    #[test]
    fn client_ids_the_router_would_refuse_are_refused_here() {
        assert!(parse_connect(&connect(b"outpost-dev-1")).is_ok());
        assert!(parse_connect(&connect(b"")).is_ok(), "rumqttd assigns one");
        for bad in [&b"a/b"[..], b"a+b", b"#", b"$SYS", b"a\nb", &[b'x'; 257]] {
            assert!(
                matches!(parse_connect(&connect(bad)), Err(Refusal::Identifier)),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_connect(&connect(&[0xff])),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            parse_connect(&[0x30, 0]),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            parse_connect(&connect(b"abc")[..8]),
            Err(Refusal::Malformed(_))
        ));
    }
}
