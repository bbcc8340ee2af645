//! The embedded MQTT broker (rumqttd), so one command gives a working fleet on one machine.
//!
//! Devices and the fleet's own MQTT client connect to it over TCP exactly as they would to an
//! external broker, so the embedded and external set-ups run the same code. They reach it
//! through the [`gate`](crate::gate), which checks each CONNECT before rumqttd sees it; rumqttd
//! itself listens on a loopback port of its own.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};

use crate::acl::LiveLogins;
use crate::error::{FleetError, Result};
use crate::gate::{self, GateLimits, GateStats};

/// Largest MQTT payload the embedded broker accepts.
const MAX_PAYLOAD: usize = 1 << 20;
/// Connections the router accepts; the gate keeps below it (a refusal by the router is one of
/// the paths that broke rumqttd).
const ROUTER_MAX_CONNECTIONS: usize = 20_000;
/// Connections the gate lets in at most.
const GATE_MAX_CONNECTIONS: usize = 16_384;
/// File descriptors one connection costs this process: the client's socket, and the
/// loopback pair between the gate and rumqttd (both ends are in this process).
pub const FDS_PER_CONNECTION: usize = 3;

/// Connections the gate lets in at once: [`GATE_MAX_CONNECTIONS`], or fewer so that they take
/// at most 60% of the file descriptors left after the reserve (the API has 25%).
fn gate_max_connections() -> usize {
    let fds = outpost_http::fd_limit().unwrap_or(1024);
    let usable = fds.saturating_sub(outpost_http::Limits::FD_RESERVE) as f64 * 0.6
        / FDS_PER_CONNECTION as f64;
    (usable as usize).clamp(32, GATE_MAX_CONNECTIONS)
}
/// Time a client has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// What one device's login may publish: 256 KiB/s sustained, 4 MiB at once (a device's outbox
/// of 16 MiB drains in about a minute after an outage).
const DEVICE_RATE: gate::Rate = gate::Rate {
    per_second: 256 << 10,
    burst: 4 << 20,
};

/// The embedded broker, running until [`EmbeddedBroker::stop`] (or drop).
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    inner: SocketAddr,
    tls: bool,
    /// The login [`EmbeddedBroker::prober`] connects with, when the broker has logins.
    probe_login: Option<(String, String)>,
    stats: Arc<GateStats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EmbeddedBroker {
    /// Starts the broker on `listen` (port 0 picks a free port) and waits until it answers.
    /// With `logins`, clients must log in with one of them (as they are at the time: they may
    /// change while it runs), and each is confined to its own topics (see [`acl`](crate::acl)).
    /// The broker adds a login of its own to them, to see that it answers.
    ///
    /// The listener and every connection run on a thread of their own; the router (rumqttd's
    /// message switch) on another.
    pub fn start(listen: SocketAddr, logins: Option<Arc<LiveLogins>>) -> Result<Self> {
        Self::start_tls(listen, logins, None)
    }

    /// [`EmbeddedBroker::start`], with clients speaking TLS to it when `tls` is given (the
    /// gate ends TLS; rumqttd behind it on loopback speaks plain MQTT, and [`Self::inner_addr`]
    /// reaches it without TLS from this machine).
    pub fn start_tls(
        listen: SocketAddr,
        logins: Option<Arc<LiveLogins>>,
        tls: Option<Arc<outpost_tls::rustls::ServerConfig>>,
    ) -> Result<Self> {
        let tls_on = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        // Clients connect to the gate on `listen`; rumqttd binds a loopback port of its own
        // inside its thread and only logs a failure, so that port is picked here first.
        let public = TcpListener::bind(listen)
            .map_err(|e| FleetError::Config(format!("cannot listen on {listen} (MQTT): {e}")))?;
        public.set_nonblocking(true)?;
        let addr = public.local_addr()?;
        let inner = {
            let probe = TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?
        };
        // A login of its own, to see that the broker answers (a fleet's: it may connect with
        // a client id of its choosing).
        let probe_login = match &logins {
            Some(logins) => {
                let mut secret = [0u8; 16];
                getrandom::fill(&mut secret).map_err(|e| FleetError::Config(e.to_string()))?;
                let login = ("fleet/.probe".to_owned(), hex::encode(secret));
                logins.insert(&login.0, &login.1)?;
                Some(login)
            }
            None => None,
        };
        let stats = Arc::new(GateStats::default());
        let limits = GateLimits {
            max_connections: gate_max_connections(),
            connect_timeout: CONNECT_TIMEOUT,
            max_packet_bytes: MAX_PAYLOAD + 64 * 1024,
            device_rate: DEVICE_RATE,
        };
        tracing::info!(
            max_connections = limits.max_connections,
            open_file_limit = ?outpost_http::fd_limit(),
            "embedded broker: devices connected at once at most ({FDS_PER_CONNECTION} open files each; raise LimitNOFILE for more)"
        );

        let mut connections = ConnectionSettings {
            connection_timeout_ms: CONNECT_TIMEOUT.as_millis() as u16,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        };
        // rumqttd checks the login again behind the gate (anything on this machine can reach
        // its loopback port), against the same table.
        if let Some(logins) = &logins {
            let logins = Arc::clone(logins);
            connections.set_auth_handler(move |_client_id, user: String, password: String| {
                let known = logins.check(&user, password.as_bytes()).is_some();
                async move { known }
            });
        }
        let settings = ServerSettings {
            name: "v4".to_owned(),
            listen: inner,
            tls: None,
            next_connection_delay_ms: 1,
            connections,
        };
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: ROUTER_MAX_CONNECTIONS,
                max_outgoing_packet_count: 512,
                max_segment_size: 4 << 20,
                max_segment_count: 16,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let gate_stats = Arc::clone(&stats);
        let gate_logins = logins;
        let thread = std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the embedded MQTT broker");
                        return;
                    }
                };
                let mut server = Server::new(settings, router_tx, V4);
                runtime.block_on(async {
                    let public = match tokio::net::TcpListener::from_std(public) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "the MQTT gate cannot listen");
                            return;
                        }
                    };
                    tokio::select! {
                        () = gate::serve(public, inner, limits, gate_stats, gate_logins, acceptor) => {}
                        result = server.start(LinkType::Remote) => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "embedded MQTT broker stopped");
                            }
                        }
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime closes the listener and every connection.
            })?;
        let broker = Self {
            addr,
            inner,
            tls: tls_on,
            probe_login: probe_login.clone(),
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        // Wait until it answers an MQTT CONNECT, so callers can connect at once.
        for _ in 0..200 {
            // Over TLS, the gate cannot be probed in plain MQTT: rumqttd is, behind it.
            let probed = if tls_on { inner } else { addr };
            if probe_mqtt(probed, probe_login.as_ref()).is_ok() {
                return Ok(broker);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Err(FleetError::Config(format!(
            "the embedded MQTT broker did not start on {addr}"
        )))
    }

    /// A check that rumqttd still answers a CONNECT behind the gate (its router takes part in
    /// every CONNECT): blocking, at most a few seconds. rumqttd's router runs on a thread of
    /// its own that nothing can restart, and it has panics on paths a client can reach; the
    /// fleet watches it with this and stops when it is gone, for its service manager to
    /// start it again, rather than serve an API beside a broker that is not there.
    pub fn prober(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let (inner, login) = (self.inner, self.probe_login.clone());
        move || probe_mqtt(inner, login.as_ref()).is_ok()
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where rumqttd itself listens, on loopback behind the gate, in plain MQTT.
    pub fn inner_addr(&self) -> SocketAddr {
        self.inner
    }

    /// Whether clients speak TLS to it.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// What its gate admitted and refused.
    pub fn gate_stats(&self) -> Arc<GateStats> {
        Arc::clone(&self.stats)
    }

    /// Closes the listener and every connection, and waits until they are closed. (rumqttd's
    /// router thread has no way to stop; it stays behind, idle.)
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.shut();
    }
}

/// Connects, sends an MQTT 3.1.1 CONNECT, expects CONNACK "accepted", disconnects.
fn probe_mqtt(addr: SocketAddr, login: Option<&(String, String)>) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let field = |bytes: &[u8]| -> Vec<u8> {
        let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(bytes);
        v
    };
    let flags: u8 = if login.is_some() {
        0x02 | 0x80 | 0x40
    } else {
        0x02
    };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 10];
    body.extend(field(if login.is_some() {
        b"outpost-fleet-.probe"
    } else {
        b"outpost-broker-probe"
    }));
    if let Some((user, password)) = login {
        body.extend(field(user.as_bytes()));
        body.extend(field(password.as_bytes()));
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    stream.write_all(&packet)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    stream.write_all(&[0xe0, 0])?;
    if connack[0] == 0x20 && connack[3] == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other("unexpected CONNACK"))
    }
}
