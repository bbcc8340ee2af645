//! The front door over real sockets: slow clients, idle clients, stalled bodies, a full house.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::{get, post};
use outpost_http::{Limits, Stats, serve};

struct Server {
    addr: SocketAddr,
    stats: Arc<Stats>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: std::sync::mpsc::Receiver<()>,
    _rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(limits: Limits, router: Router) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let s = Arc::clone(&stats);
        rt.spawn(async move {
            serve(listener, router, limits, s, async {
                let _ = stopped.await;
            })
            .await;
            let _ = done_tx.send(());
        });
        Self {
            addr,
            stats,
            stop: Some(stop),
            done,
            _rt: rt,
        }
    }

    fn get(&self, path: &str) -> Result<String, ureq::Error> {
        ureq::get(&format!("http://{}{path}", self.addr))
            .call()?
            .body_mut()
            .read_to_string()
    }
}

fn router() -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "slept"
            }),
        )
}

fn limits(max_connections: usize) -> Limits {
    Limits {
        max_connections,
        header_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(1200),
    }
}

/// Opens a connection that sends half a request head and then nothing.
fn slowloris(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    s
}

/// Whether the server has closed `s` (reads EOF or a reset within `within`).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_clients_beyond_the_cap_do_not_lock_out_a_normal_one_and_time_out() {
    let server = Server::start(
        Limits {
            header_timeout: Duration::from_secs(3),
            ..limits(40)
        },
        router(),
    );
    let mut slow: Vec<TcpStream> = (0..200).map(|_| slowloris(server.addr)).collect();
    // Every slot is held by a client that will never finish its head; a normal one still gets in.
    for _ in 0..5 {
        assert_eq!(server.get("/healthz").unwrap(), "ok");
    }
    let s = server.stats.snapshot();
    assert!(s.evicted >= 160, "{s:?}");
    assert!(s.open <= 41, "{s:?}");
    // Those left open are closed once the header timeout passes.
    let last = slow.last_mut().unwrap();
    assert!(closed_within(last, Duration::from_secs(8)));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = Server::start(limits(40), router());
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(6)));
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert!(server.stats.snapshot().idle_closed + server.stats.snapshot().evicted <= 1);
}

#[test]
fn a_body_that_stalls_is_cut_off_with_an_error_answer() {
    let server = Server::start(limits(40), router());
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert_eq!(server.stats.snapshot().body_timeouts, 1);
    // A body that arrives is read as usual.
    let n = ureq::post(&format!("http://{}/echo", server.addr))
        .send(&[7u8; 5000][..])
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert_eq!(n, "5000");
}

#[test]
fn a_body_that_keeps_moving_goes_through_however_long_it_takes() {
    let server = Server::start(limits(40), router());
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    // Ten pieces, each well inside the stall timeout (800 ms), 2 s in all.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(200));
        s.write_all(&[b'x'; 10]).unwrap();
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("100"), "{answer}");
    assert_eq!(server.stats.snapshot().body_timeouts, 0);
}

#[test]
fn when_every_connection_runs_a_request_a_new_one_is_told_to_come_back() {
    let server = Server::start(limits(2), router());
    let addr = server.addr;
    let busy: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                ureq::get(&format!("http://{addr}/slow"))
                    .call()
                    .unwrap()
                    .body_mut()
                    .read_to_string()
                    .unwrap()
            })
        })
        .collect();
    // Wait until both are running.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.stats.snapshot().open < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let err = server.get("/healthz").unwrap_err();
    assert!(matches!(err, ureq::Error::StatusCode(503)), "{err}");
    for b in busy {
        assert_eq!(b.join().unwrap(), "slept");
    }
    assert!(server.stats.snapshot().refused >= 1);
    // Room again once they are done.
    assert_eq!(server.get("/healthz").unwrap(), "ok");
}

#[test]
fn shutdown_finishes_the_request_under_way_and_closes_idle_connections() {
    let mut server = Server::start(limits(40), router());
    let addr = server.addr;
    let mut idle = TcpStream::connect(addr).unwrap();
    let running = std::thread::spawn(move || {
        ureq::get(&format!("http://{addr}/slow"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = server.stop.take().unwrap().send(());
    assert!(closed_within(&mut idle, Duration::from_millis(900)));
    assert_eq!(running.join().unwrap(), "slept");
    server.done.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(TcpStream::connect(addr).is_err() || server.get("/healthz").is_err());
}
