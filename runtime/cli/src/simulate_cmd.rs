//! `outpost fleet simulate`: many virtual devices in one process, for load tests and for
//! trying a rollout on a fleet of nothing.
//!
//! Each virtual device speaks the device protocol as `outpost device run` does: its own MQTT
//! connection (client id `outpost-{id}`, the offline presence as its last will), presence and
//! the reported state (retained) on every connect, telemetry batches QoS 1 at an interval while
//! a fleet replica is online, and the desired state checked against the fleet key
//! ([`SignedDesired::open`]) and reported applied. It serves nothing and installs nothing: a
//! deployment it accepts is reported as active at once.
//!
//! With `--hostile K`, the first K devices also misbehave on every interval: they publish a
//! batch that does not parse and one that names another device, both on their own topics. The
//! fleet must count and drop both (`outpost_fleet_malformed_messages_total`,
//! `outpost_fleet_foreign_messages_total`) and never store either as any device.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_bundle::PublicKey;
use outpost_mqtt::{Session, SessionEvent, SessionOptions};
use outpost_proto::{
    DeviceId, FLEET_PRESENCE_FILTER, PROTOCOL_VERSION, Presence, ReportedState, SignedDesired,
    TelemetryBatch, TelemetryRecord, Topic, Topics, Verdict,
};
use serde::Serialize;
use tokio::sync::watch;

use crate::fleet_cmd::Remote;
use crate::util;

/// The most virtual devices one process runs.
const MAX_DEVICES: u32 = 100_000;
/// The longest run.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `outpost fleet simulate`.
#[derive(Debug, clap::Args)]
pub(crate) struct SimulateArgs {
    /// How many virtual devices.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=MAX_DEVICES as i64))]
    devices: u32,
    /// The broker (`mqtt://HOST:PORT`); default: the one the fleet's API names.
    #[arg(long)]
    broker: Option<String>,
    /// The fleet key (hex) desired states must be signed with; default: the one the fleet's
    /// API names (trusting the API for it, as a simulator may).
    #[arg(long, value_name = "HEX")]
    fleet_key: Option<String>,
    #[command(flatten)]
    remote: Remote,
    /// Stop after this long (`90s`, `10m`, `2h`; at most a day), saying offline first.
    #[arg(long, default_value = "60s", value_parser = util::parse_duration)]
    duration: Duration,
    /// Telemetry interval of each device.
    #[arg(long, default_value = "10s", value_parser = util::parse_duration)]
    interval: Duration,
    /// Device ids are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// A tag every virtual device reports (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Connections opened per second while starting (a broker takes a burst of thousands
    /// of TLS-less CONNECTs well, a real fleet seldom sees one).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    connect_rate: u32,
    /// Enrol every device through the fleet's API first and log in with its credentials
    /// (for a fleet that requires enrolment; needs the API token).
    #[arg(long)]
    enrol: bool,
    /// The first K devices also publish garbage and batches naming another device.
    #[arg(long, value_name = "K", default_value_t = 0)]
    hostile: u32,
    /// Write the summary (JSON) here as well as to standard output.
    #[arg(long, value_name = "FILE")]
    summary: Option<std::path::PathBuf>,
}

/// What the virtual devices did, all together.
#[derive(Debug, Default)]
struct Stats {
    connected: AtomicU64,
    connections: AtomicU64,
    disconnections: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    refused: AtomicU64,
    batches_sent: AtomicU64,
    batches_acked: AtomicU64,
    hostile_sent: AtomicU64,
}

/// The summary printed at the end (one JSON object).
#[derive(Debug, Serialize)]
struct Summary {
    devices: u32,
    /// Seconds from start until every device was connected at once, if it happened.
    all_connected_after_s: Option<f64>,
    connections: u64,
    disconnections: u64,
    desired_applied: u64,
    desired_duplicates: u64,
    desired_refused: u64,
    telemetry_batches_sent: u64,
    telemetry_batches_acked: u64,
    hostile_messages_sent: u64,
    /// Seconds the run took.
    duration_s: f64,
}

/// What every virtual device shares.
struct Ctx {
    host: String,
    port: u16,
    key: PublicKey,
    interval: Duration,
    tags: Vec<String>,
    stats: Stats,
}

pub(crate) fn simulate(args: SimulateArgs) -> Result<()> {
    crate::init_logging();
    if args.duration > MAX_DURATION {
        bail!("--duration is at most 24h");
    }
    if args.interval < Duration::from_millis(100) {
        bail!("--interval is at least 100ms");
    }
    if args.hostile > args.devices {
        bail!(
            "--hostile {} is more than --devices {}",
            args.hostile,
            args.devices
        );
    }
    let fds = util::raise_fd_limit();
    if let Some(fds) = fds {
        // One socket per device, and a margin for everything else.
        if u64::from(args.devices) + 64 > fds {
            bail!(
                "{} devices need {} open files and this process may open {fds}: raise `ulimit -n` (or LimitNOFILE)",
                args.devices,
                u64::from(args.devices) + 64
            );
        }
    }
    let width = (args.devices - 1).max(1).to_string().len().max(5);
    let ids = (0..args.devices)
        .map(|i| DeviceId::new(format!("{}-{i:0width$}", args.prefix)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("--prefix must make valid device ids")?;

    let needs_api = args.broker.is_none() || args.fleet_key.is_none() || args.enrol;
    let info = if needs_api {
        Some(args.remote.client()?.info().context(
            "asking the fleet for its broker and key (or give --broker and --fleet-key)",
        )?)
    } else {
        None
    };
    let broker: outpost_proto::BrokerUrl = match (&args.broker, &info) {
        (Some(url), _) => url.parse()?,
        (None, Some(info)) => info.broker.parse()?,
        (None, None) => bail!("--broker is needed"),
    };
    if broker.tls() {
        bail!("the simulator speaks plain MQTT; give it the broker's plain listener");
    }
    let key_hex = match (&args.fleet_key, &info) {
        (Some(k), _) => k.clone(),
        (None, Some(info)) => info.public_key.clone(),
        (None, None) => bail!("--fleet-key is needed"),
    };
    let key = PublicKey::from_hex(key_hex.trim()).context("--fleet-key")?;
    let logins = if args.enrol {
        enrol_all(&args.remote, &ids)?
    } else {
        vec![None; ids.len()]
    };

    let ctx = Arc::new(Ctx {
        host: broker.host().to_owned(),
        port: broker.port(),
        key,
        interval: args.interval,
        tags: args.tags.clone(),
        stats: Stats::default(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let all_connected = runtime.block_on(run(
        Arc::clone(&ctx),
        ids,
        logins,
        args.hostile as usize,
        args.connect_rate,
        args.duration,
    ));
    let s = &ctx.stats;
    let summary = Summary {
        devices: args.devices,
        all_connected_after_s: all_connected.map(|d| d.as_secs_f64()),
        connections: s.connections.load(Ordering::Relaxed),
        disconnections: s.disconnections.load(Ordering::Relaxed),
        desired_applied: s.applied.load(Ordering::Relaxed),
        desired_duplicates: s.duplicates.load(Ordering::Relaxed),
        desired_refused: s.refused.load(Ordering::Relaxed),
        telemetry_batches_sent: s.batches_sent.load(Ordering::Relaxed),
        telemetry_batches_acked: s.batches_acked.load(Ordering::Relaxed),
        hostile_messages_sent: s.hostile_sent.load(Ordering::Relaxed),
        duration_s: started.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string(&summary)?;
    println!("{text}");
    if let Some(path) = &args.summary {
        util::write_atomic(path, text.as_bytes(), false)?;
    }
    Ok(())
}

/// A broker login: user name and password.
type Login = Option<(String, String)>;

/// Enrols every device through the API (four at a time), returning each one's login.
fn enrol_all(remote: &Remote, ids: &[DeviceId]) -> Result<Vec<Login>> {
    let client = remote.client()?;
    let chunk = ids.len().div_ceil(4).max(1);
    let started = Instant::now();
    let results: Vec<Result<Vec<Login>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let client = client.clone();
                scope.spawn(move || {
                    part.iter()
                        .map(|id| {
                            let e = client
                                .enroll(id.as_str())
                                .with_context(|| format!("enrolling {id}"))?;
                            Ok(Some((e.username, e.password)))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("an enrolment thread panicked")))
            })
            .collect()
    });
    let mut logins = Vec::with_capacity(ids.len());
    for part in results {
        logins.extend(part?);
    }
    tracing::info!(
        devices = ids.len(),
        seconds = started.elapsed().as_secs_f64(),
        "enrolled"
    );
    Ok(logins)
}

/// Starts the devices at `rate` a second, reports progress, stops them after `duration`;
/// returns when every device was first connected at once.
async fn run(
    ctx: Arc<Ctx>,
    ids: Vec<DeviceId>,
    logins: Vec<Option<(String, String)>>,
    hostile: usize,
    rate: u32,
    duration: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let total = ids.len() as u64;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let spawner = {
        let ctx = Arc::clone(&ctx);
        let stop_rx = stop_rx.clone();
        async move {
            let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let count = ids.len();
            for (i, (id, login)) in ids.into_iter().zip(logins).enumerate() {
                if *stop_rx.borrow() {
                    break;
                }
                pace.tick().await;
                // The device `other` names, for a hostile one to impersonate.
                let other = (i + 1) % count.max(1);
                tasks.spawn(device(
                    Arc::clone(&ctx),
                    id,
                    login,
                    (i < hostile).then_some(other),
                    stop_rx.clone(),
                ));
            }
            tasks
        }
    };
    let spawned = tokio::spawn(spawner);
    let deadline = tokio::time::Instant::now() + duration;
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    let mut watch = tokio::time::interval(Duration::from_millis(50));
    let mut all_connected = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = watch.tick() => {
                if all_connected.is_none() && ctx.stats.connected.load(Ordering::Relaxed) == total {
                    all_connected = Some(started.elapsed());
                    tracing::info!(seconds = started.elapsed().as_secs_f64(), "every virtual device is connected");
                }
            }
            _ = progress.tick() => {
                let s = &ctx.stats;
                eprintln!(
                    "simulate: {:>5.0}s connected {}/{total}, desired applied {} (refused {}), batches acked {}/{}",
                    started.elapsed().as_secs_f64(),
                    s.connected.load(Ordering::Relaxed),
                    s.applied.load(Ordering::Relaxed),
                    s.refused.load(Ordering::Relaxed),
                    s.batches_acked.load(Ordering::Relaxed),
                    s.batches_sent.load(Ordering::Relaxed),
                );
            }
        }
    }
    let _ = stop_tx.send(true);
    if let Ok(mut tasks) = spawned.await {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
    all_connected
}

/// One virtual device, until `stop`.
async fn device(
    ctx: Arc<Ctx>,
    id: DeviceId,
    login: Option<(String, String)>,
    impersonate: Option<usize>,
    mut stop: watch::Receiver<bool>,
) {
    let topics = Topics::new(&id);
    let mut options = SessionOptions::new(
        format!("outpost-{id}"),
        ctx.host.clone(),
        ctx.port,
        (topics.name(Topic::Status), Presence::to_vec(false)),
    );
    options.credentials = login;
    options.subscriptions = vec![
        topics.name(Topic::Desired),
        FLEET_PRESENCE_FILTER.to_owned(),
    ];
    options.queue = 16;
    options.max_backoff = Duration::from_secs(10);
    let mut mqtt: Session<()> = Session::new(options);
    let mut state = DeviceState {
        id: id.clone(),
        generation: None,
        active: BTreeMap::new(),
        seq: 0,
        fleet_online: BTreeMap::new(),
    };
    // Devices started together do not all send in the same instant.
    let phase = Duration::from_millis(
        (id.as_str().bytes().map(u64::from).sum::<u64>() * 7919)
            % ctx.interval.as_millis().max(1) as u64,
    );
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, ctx.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connected = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                if connected {
                    ctx.stats.connected.fetch_sub(1, Ordering::Relaxed);
                }
                mqtt.close(Some((topics.name(Topic::Status), Presence::to_vec(false)))).await;
                return;
            }
            event = mqtt.next() => match event {
                SessionEvent::Connected => {
                    connected = true;
                    ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
                    ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                    state.fleet_online.clear();
                    let _ = mqtt.publish(topics.name(Topic::Status), Presence::to_vec(true), true, None);
                    publish_reported(&ctx, &mut mqtt, &topics, &state);
                }
                SessionEvent::Subscribed => {}
                SessionEvent::Message(p) => {
                    if p.topic == topics.name(Topic::Desired) {
                        if !p.payload.is_empty() && state.on_desired(&ctx, &p.payload) {
                            publish_reported(&ctx, &mut mqtt, &topics, &state);
                        }
                    } else if let Some(replica) = outpost_proto::parse_fleet_presence(&p.topic) {
                        state.fleet_online.insert(replica.to_owned(), Presence::is_online(&p.payload));
                    }
                }
                SessionEvent::Acked(()) => {
                    ctx.stats.batches_acked.fetch_add(1, Ordering::Relaxed);
                }
                SessionEvent::Disconnected { was_connected, .. } => {
                    if was_connected {
                        connected = false;
                        ctx.stats.connected.fetch_sub(1, Ordering::Relaxed);
                        ctx.stats.disconnections.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            _ = tick.tick() => {
                if !mqtt.is_connected() || !state.fleet_online.values().any(|&online| online) {
                    continue;
                }
                state.seq += 1;
                let batch = state.batch(&ctx);
                if let Ok(payload) = serde_json::to_vec(&batch)
                    && mqtt.publish(topics.name(Topic::Telemetry), payload, false, Some(())).is_ok()
                {
                    ctx.stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(other) = impersonate {
                    hostile(&ctx, &mut mqtt, &topics, &state, other);
                }
            }
        }
    }
}

/// What one virtual device keeps.
struct DeviceState {
    id: DeviceId,
    generation: Option<u64>,
    active: BTreeMap<String, String>,
    seq: u64,
    /// Fleet replicas by name: whether each says online.
    fleet_online: BTreeMap<String, bool>,
}

impl DeviceState {
    /// Checks a desired state; true when it changed what the device reports.
    fn on_desired(&mut self, ctx: &Ctx, payload: &[u8]) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let verdict = SignedDesired::from_slice(payload)
            .and_then(|d| d.open(&ctx.key, &self.id, now, self.generation));
        match verdict {
            Ok(Verdict::Apply(state)) => {
                self.generation = Some(state.generation);
                self.active = state
                    .deployments
                    .into_iter()
                    .map(|d| (d.model, d.version))
                    .collect();
                ctx.stats.applied.fetch_add(1, Ordering::Relaxed);
                true
            }
            Ok(Verdict::Duplicate | Verdict::Stale { .. }) => {
                ctx.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(e) => {
                ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(device = %self.id, error = %e, "desired state refused");
                false
            }
        }
    }

    fn reported(&self, ctx: &Ctx) -> ReportedState {
        ReportedState {
            v: PROTOCOL_VERSION,
            device: self.id.clone(),
            runtime_version: format!("{}-sim", env!("CARGO_PKG_VERSION")),
            arch: std::env::consts::ARCH.to_owned(),
            generation: self.generation,
            accepted_generation: self.generation,
            active: self.active.clone(),
            installed: self
                .active
                .iter()
                .map(|(m, v)| format!("{m}@{v}"))
                .collect(),
            policies: BTreeMap::new(),
            tags: ctx.tags.clone(),
            last_error: None,
            retrying: false,
            outbox_pending: 0,
            outbox_dropped: 0,
            telemetry_interval_ms: Some(ctx.interval.as_millis() as u64),
        }
    }

    /// One telemetry record, shaped like a device's sample.
    fn batch(&self, ctx: &Ctx) -> TelemetryBatch {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let models: Vec<serde_json::Value> = self
            .active
            .iter()
            .map(|(model, version)| {
                serde_json::json!({
                    "model": model, "version": version, "requests": self.seq * 10,
                    "errors": {}, "latency_buckets": [[0.001, self.seq * 9], [0.01, self.seq * 10]],
                    "latency_sum": self.seq as f64 * 0.02,
                })
            })
            .collect();
        TelemetryBatch {
            v: PROTOCOL_VERSION,
            device: self.id.clone(),
            records: vec![TelemetryRecord {
                seq: self.seq,
                time: now,
                body: serde_json::json!({
                    "uptime_s": self.seq * ctx.interval.as_secs(),
                    "cpu_seconds": self.seq as f64 * 0.01,
                    "rss_bytes": 24_000_000,
                    "disk_bytes": 2_000_000,
                    "models": models,
                }),
            }],
            dropped: 0,
        }
    }
}

fn publish_reported(ctx: &Ctx, mqtt: &mut Session<()>, topics: &Topics, state: &DeviceState) {
    if let Ok(payload) = serde_json::to_vec(&state.reported(ctx))
        && let Err(e) = mqtt.publish(topics.name(Topic::Reported), payload, true, None)
    {
        tracing::debug!(device = %state.id, error = %e, "reported state deferred");
    }
}

/// A hostile device's extra messages: one batch that does not parse and one that names
/// device number `other`, both on its own telemetry topic.
fn hostile(ctx: &Ctx, mqtt: &mut Session<()>, topics: &Topics, state: &DeviceState, other: usize) {
    let garbage = b"{\"v\":1,\"device\":".to_vec();
    if mqtt
        .publish(topics.name(Topic::Telemetry), garbage, false, None)
        .is_ok()
    {
        ctx.stats.hostile_sent.fetch_add(1, Ordering::Relaxed);
    }
    let prefix = state.id.as_str().rsplit_once('-').map_or("sim", |(p, _)| p);
    let width = state.id.as_str().len() - prefix.len() - 1;
    let Ok(victim) = DeviceId::new(format!("{prefix}-{other:0width$}")) else {
        return;
    };
    let mut forged = state.batch(ctx);
    forged.device = victim;
    if let Ok(payload) = serde_json::to_vec(&forged)
        && mqtt
            .publish(topics.name(Topic::Telemetry), payload, false, None)
            .is_ok()
    {
        ctx.stats.hostile_sent.fetch_add(1, Ordering::Relaxed);
    }
}
