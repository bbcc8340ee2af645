//! `outpost fleet`: the operator's commands against a fleet's REST API (every build), and
//! `fleet serve` (builds with the `fleet` feature, in `serve_cmd`).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_client::FleetClient;
use outpost_proto::rest::{
    DeployRequest, DeployResponse, DeviceQuery, DeviceStatus, DeviceView, RecordQuery,
};

use crate::util;

/// Where the fleet's API is and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Remote {
    /// The fleet manager's URL.
    #[arg(long, env = "OUTPOST_FLEET", default_value = "http://127.0.0.1:7878")]
    fleet: String,
    /// Bearer token for the fleet API, if it has one.
    #[arg(long, env = "OUTPOST_FLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// For an https:// fleet: the CA certificates (PEM) its certificate must chain to
    /// (default: the system's roots).
    #[arg(long, env = "OUTPOST_FLEET_CA", value_name = "FILE")]
    fleet_ca_file: Option<PathBuf>,
}

/// What `fleet drift` and `fleet quality` look at.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Monitor {
    /// The model version, e.g. `digits@1.0.0`.
    target: String,
    /// Only devices reporting this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Only the last SECONDS (default: since each device started).
    #[arg(long, value_name = "SECONDS")]
    window: Option<u64>,
    #[command(flatten)]
    remote: Remote,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Monitor {
    /// The API query, from `MODEL@VERSION`.
    fn query(&self) -> Result<outpost_proto::rest::MonitorQuery> {
        let (model, version) = split_target(&self.target)?;
        Ok(outpost_proto::rest::MonitorQuery {
            model: model.to_owned(),
            version: version.to_owned(),
            tag: self.tag.clone(),
            window: self.window,
        })
    }
}

/// Fleet subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum FleetCommand {
    /// Run the fleet manager: MQTT broker (embedded unless --broker), REST API, artifact store.
    #[cfg(feature = "fleet")]
    Serve(Box<crate::serve_cmd::ServeArgs>),
    /// Run N virtual devices against a fleet (each its own MQTT connection, presence,
    /// reported state, telemetry, signed desired states checked and reported applied), for a
    /// load test or a rollout on a fleet of nothing. Prints a JSON summary at the end.
    Simulate(Box<crate::simulate_cmd::SimulateArgs>),
    /// Upload a signed bundle to the fleet's artifact store.
    Push {
        /// The bundle (`*.opb`).
        bundle: PathBuf,
        #[command(flatten)]
        remote: Remote,
        /// Print the stored record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Deploy MODEL@VERSION to devices (by name, by tag, or all) and optionally wait for it.
    Deploy {
        /// What to deploy, e.g. `digits@1.1.0`.
        target: String,
        /// A device to deploy to (repeat for several).
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
        /// Every device reporting this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Every device the fleet knows.
        #[arg(long)]
        all: bool,
        /// Wait until every target has applied it (or failed), showing progress.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Serve the version under this traffic policy (JSON, as the device's admin API takes
        /// it) instead of activating it, e.g. `{"shadow": {"id": "sh-1", "candidate":
        /// "1.1.0", "sample_percent": 50}}`.
        #[arg(long, value_name = "JSON")]
        policy: Option<String>,
        #[command(flatten)]
        remote: Remote,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Staged rollouts with health gates: start, status, pause, resume, promote, abort.
    #[command(subcommand)]
    Rollout(crate::rollout_cmd::RolloutCommand),
    /// List devices: id, online, tags, architecture, runtime version.
    Devices {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        filter: DeviceFilter,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per device: online, last seen, runtime version, architecture, active versions, sync, last error.
    Status {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        filter: DeviceFilter,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete MODEL@VERSION from the artifact store (refused while a device is meant to run it).
    RemoveBundle {
        /// What to delete, e.g. `digits@1.0.0`.
        target: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Issue a device its broker credentials (registering it) and print its `[fleet]`
    /// configuration; enrolling again replaces them.
    Enroll(crate::enrol_cmd::EnrollArgs),
    /// End a device's broker credentials: it is disconnected and no longer heard.
    Revoke {
        /// The device id.
        device: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Forget a decommissioned device: registry entry, desired state, retained messages,
    /// credentials.
    Forget {
        /// The device id.
        device: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Fleet-wide drift of MODEL@VERSION against its bundle's training baseline: the devices'
    /// bin counts added up, PSI per feature.
    Drift(Monitor),
    /// Fleet-wide quality of MODEL@VERSION from ground-truth feedback: accuracy or mean
    /// absolute error over the labels its devices joined.
    Quality(Monitor),
    /// Every version of MODEL its devices served, by role (primary, A/B or canary candidate,
    /// shadow), side by side: requests, error rate, p95 latency, accuracy, shadow agreement.
    Compare {
        /// The model name.
        model: String,
        /// Only devices reporting this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only the last SECONDS (default: since each device started).
        #[arg(long, value_name = "SECONDS")]
        window: Option<u64>,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The fleet's rules (`fleet serve --rules FILE`) and their state; `--test NAME` measures
    /// one now without firing it.
    Rules {
        /// Measure this rule now.
        #[arg(long, value_name = "NAME")]
        test: Option<String>,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The newest rule firings and every delivery attempt of their actions.
    Firings {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Telemetry records the fleet stored (or events with --events).
    Telemetry {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Deployment events instead of periodic telemetry.
        #[arg(long)]
        events: bool,
        /// Only records after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// At most this many records.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: FleetCommand) -> Result<()> {
    match cmd {
        #[cfg(feature = "fleet")]
        FleetCommand::Serve(args) => crate::serve_cmd::serve(*args),
        FleetCommand::Simulate(args) => crate::simulate_cmd::simulate(*args),
        FleetCommand::Push {
            bundle,
            remote,
            json,
        } => push(&remote, &bundle, json),
        FleetCommand::Deploy {
            target,
            devices,
            tag,
            all,
            wait,
            timeout,
            policy,
            remote,
            json,
        } => {
            let (model, version) = split_target(&target)?;
            let policy = policy
                .map(|p| serde_json::from_str::<serde_json::Value>(&p))
                .transpose()
                .context("--policy is not JSON")?;
            let request = DeployRequest {
                model: model.to_owned(),
                version: version.to_owned(),
                devices,
                tag,
                all,
                policy,
            };
            deploy(
                &remote,
                &request,
                wait.then(|| Duration::from_secs(timeout)),
                json,
            )
        }
        FleetCommand::Rollout(cmd) => crate::rollout_cmd::run(cmd),
        FleetCommand::Devices {
            remote,
            filter,
            json,
        } => devices(&remote, &filter.query(), json),
        FleetCommand::RemoveBundle { target, remote } => {
            let (model, version) = split_target(&target)?;
            let removed = remote.client()?.remove_bundle(model, version)?;
            println!("removed {model} {version} (sha256 {})", removed.digest);
            Ok(())
        }
        FleetCommand::Enroll(args) => crate::enrol_cmd::enroll(args),
        FleetCommand::Revoke { device, remote } => crate::enrol_cmd::revoke(&device, &remote),
        FleetCommand::Forget { device, remote } => {
            let answer = remote.client()?.forget(&device)?;
            println!("forgot {device}: {}", answer.note);
            Ok(())
        }
        FleetCommand::Status {
            remote,
            filter,
            json,
        } => status(&remote, &filter.query(), json),
        FleetCommand::Drift(m) => drift(&m),
        FleetCommand::Quality(m) => quality(&m),
        FleetCommand::Compare {
            model,
            tag,
            window,
            remote,
            json,
        } => compare(
            &remote,
            &outpost_proto::rest::CompareQuery { model, tag, window },
            json,
        ),
        FleetCommand::Rules { test, remote, json } => rules(&remote, test.as_deref(), json),
        FleetCommand::Firings {
            limit,
            remote,
            json,
        } => firings(&remote, limit, json),
        FleetCommand::Telemetry {
            device,
            events,
            after,
            limit,
            remote,
            json,
        } => telemetry(&remote, device.as_deref(), events, after, limit, json),
    }
}

/// Splits `MODEL@VERSION`.
fn split_target(target: &str) -> Result<(&str, &str)> {
    target
        .split_once('@')
        .filter(|(m, v)| !m.is_empty() && !v.is_empty())
        .with_context(|| format!("`{target}` is not MODEL@VERSION"))
}

impl Remote {
    /// The fleet's API client.
    pub(crate) fn client(&self) -> Result<FleetClient> {
        let client = FleetClient::new(&self.fleet, self.token.clone());
        Ok(match &self.fleet_ca_file {
            Some(ca) => client.with_ca_file(Some(ca))?,
            None => client,
        })
    }
}

/// Shows upload progress on a terminal.
struct Progress<R> {
    inner: R,
    done: u64,
    total: u64,
    shown: u64,
    tty: bool,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        let percent = self.done * 100 / self.total.max(1);
        if self.tty && percent != self.shown {
            self.shown = percent;
            eprint!("\rpushing: {percent:3}% of {} KiB", self.total / 1024);
            if self.done == self.total {
                eprintln!();
            }
        }
        Ok(n)
    }
}

fn push(remote: &Remote, path: &std::path::Path, json: bool) -> Result<()> {
    let bytes = util::read(path)?;
    let total = bytes.len() as u64;
    let reader = Progress {
        inner: std::io::Cursor::new(bytes),
        done: 0,
        total,
        shown: u64::MAX,
        tty: std::io::stderr().is_terminal(),
    };
    let record = remote.client()?.push(reader, total)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!(
            "pushed {} {} ({} bytes, sha256 {})",
            record.name, record.version, record.size, record.digest
        );
    }
    Ok(())
}

fn deploy(
    remote: &Remote,
    request: &DeployRequest,
    wait: Option<Duration>,
    json: bool,
) -> Result<()> {
    let deployed = remote.client()?.deploy(request)?;
    if !json {
        println!(
            "deployment {}: {} {} to {} device(s): {}",
            deployed.deployment.id,
            deployed.deployment.model,
            deployed.deployment.version,
            deployed.deployment.devices.len(),
            util::some_of(&deployed.deployment.devices)
        );
    }
    let Some(timeout) = wait else {
        if json {
            println!("{}", serde_json::to_string_pretty(&deployed)?);
        }
        return Ok(());
    };
    let outcome = wait_for(&remote.client()?, &deployed, timeout, json)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "deployment": deployed,
                "devices": outcome,
            }))?
        );
    }
    let failed: Vec<&String> = outcome
        .iter()
        .filter(|(_, s)| s.as_str() != "applied")
        .map(|(d, _)| d)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "not applied on: {}",
            failed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Polls the registry until every target applied its generation, failed, or time ran out.
fn wait_for(
    client: &FleetClient,
    deployed: &DeployResponse,
    timeout: Duration,
    quiet: bool,
) -> Result<Vec<(String, String)>> {
    let started = Instant::now();
    let total = deployed.generations.len();
    let mut outcome: std::collections::BTreeMap<String, String> = Default::default();
    let mut retrying = std::collections::BTreeSet::new();
    loop {
        // One request per round for the whole registry, however many targets.
        let views: std::collections::HashMap<String, DeviceView> = client
            .devices()
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.record.id.clone(), v))
            .collect();
        for (device, generation) in &deployed.generations {
            if outcome.contains_key(device) {
                continue;
            }
            let Some(reported) = views.get(device).and_then(|v| v.record.reported.clone()) else {
                continue;
            };
            let accepted = reported
                .accepted_generation
                .is_some_and(|g| g >= *generation);
            let state = if reported.generation.is_some_and(|g| g >= *generation) {
                Some("applied".to_owned())
            } else if accepted && reported.retrying {
                // A transient failure: say so once, and keep waiting.
                if !quiet && retrying.insert(device.clone()) {
                    println!(
                        "      {device}: retrying after: {}",
                        reported.last_error.as_deref().unwrap_or("an error")
                    );
                }
                None
            } else if accepted {
                reported.last_error.clone().map(|e| format!("failed: {e}"))
            } else {
                None
            };
            if let Some(state) = state {
                if !quiet {
                    println!("[{}/{total}] {device}: {state}", outcome.len() + 1);
                }
                outcome.insert(device.clone(), state);
            }
        }
        if outcome.len() == total {
            break;
        }
        if started.elapsed() > timeout {
            for (device, _) in &deployed.generations {
                outcome
                    .entry(device.clone())
                    .or_insert_with(|| "timed out".to_owned());
            }
            if !quiet {
                println!("timed out after {}s", timeout.as_secs());
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(outcome.into_iter().collect())
}

fn ago(seconds: Option<u64>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match seconds {
        None => "never".into(),
        Some(t) => format!("{}s ago", now.saturating_sub(t)),
    }
}

/// Which devices a listing shows (the fleet filters; the list is read a page at a time).
#[derive(Debug, clap::Args)]
pub(crate) struct DeviceFilter {
    /// Only devices reporting this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Only online (or offline) devices.
    #[arg(long, value_parser = ["online", "offline"])]
    status: Option<String>,
    /// Only devices running this model (`NAME` or `NAME@VERSION`).
    #[arg(long, value_name = "NAME[@VERSION]")]
    model: Option<String>,
    /// Only devices that have not applied the fleet's current desired state.
    #[arg(long)]
    pending: bool,
}

impl DeviceFilter {
    fn query(&self) -> DeviceQuery {
        let (model, version) = match self.model.as_deref().map(|m| m.split_once('@')) {
            Some(Some((m, v))) => (Some(m.to_owned()), Some(v.to_owned())),
            Some(None) => (self.model.clone(), None),
            None => (None, None),
        };
        DeviceQuery {
            tag: self.tag.clone(),
            status: self.status.as_deref().map(|s| {
                if s == "online" {
                    DeviceStatus::Online
                } else {
                    DeviceStatus::Offline
                }
            }),
            model,
            version,
            in_sync: self.pending.then_some(false),
            ..DeviceQuery::default()
        }
    }
}

fn devices(remote: &Remote, query: &DeviceQuery, json: bool) -> Result<()> {
    let views = remote.client()?.devices_matching(query)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<10} {:<10} TAGS",
        "DEVICE", "ONLINE", "ARCH", "RUNTIME"
    );
    for v in &views {
        let r = v.record.reported.as_ref();
        println!(
            "{:<20} {:<8} {:<10} {:<10} {}",
            v.record.id,
            if v.record.online { "yes" } else { "no" },
            r.map_or("", |r| &r.arch),
            r.map_or("", |r| &r.runtime_version),
            r.map(|r| r.tags.join(",")).unwrap_or_default()
        );
    }
    Ok(())
}

fn status(remote: &Remote, query: &DeviceQuery, json: bool) -> Result<()> {
    let views = remote.client()?.devices_matching(query)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<7} {:<10} {:<8} {:<8} {:<6} {:<30} LAST ERROR",
        "DEVICE", "ONLINE", "LAST SEEN", "RUNTIME", "ARCH", "SYNC", "ACTIVE"
    );
    for v in &views {
        let r = v.record.reported.as_ref();
        let active = r
            .map(|r| {
                r.active
                    .iter()
                    .map(|(m, ver)| format!("{m}@{ver}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<7} {:<10} {:<8} {:<8} {:<6} {:<30} {}",
            v.record.id,
            if v.record.online { "yes" } else { "no" },
            ago(v.record.last_seen),
            r.map_or("", |r| &r.runtime_version),
            r.map_or("", |r| &r.arch),
            if v.in_sync { "yes" } else { "no" },
            if active.is_empty() {
                "-".into()
            } else {
                active
            },
            r.and_then(|r| r.last_error.as_deref()).unwrap_or("-")
        );
    }
    Ok(())
}

fn telemetry(
    remote: &Remote,
    device: Option<&str>,
    events: bool,
    after: Option<u64>,
    limit: usize,
    json: bool,
) -> Result<()> {
    let query = RecordQuery {
        device: device.map(str::to_owned),
        after,
        limit: Some(limit),
    };
    let client = remote.client()?;
    let page = if events {
        client.events(&query)?
    } else {
        client.telemetry(&query)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(());
    }
    for r in &page.records {
        println!(
            "{} #{} t={} {}",
            r.device, r.record.seq, r.record.time, r.record.body
        );
    }
    Ok(())
}

fn drift(m: &Monitor) -> Result<()> {
    let d = m.remote.client()?.drift(&m.query()?)?;
    if m.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(());
    }
    let scope = match (&d.tag, d.window_s) {
        (Some(t), Some(w)) => format!("devices tagged {t}, last {w} s"),
        (Some(t), None) => format!("devices tagged {t}, since each started"),
        (None, Some(w)) => format!("last {w} s"),
        (None, None) => "since each device started".into(),
    };
    println!(
        "{} {} on {} device(s), {scope}; PSI thresholds {} (moderate), {} (significant)",
        d.model, d.version, d.devices, d.moderate, d.significant
    );
    println!(
        "{:<24} {:<6} {:>9} {:>9} {:<12} {:>12} {:>12}",
        "feature", "kind", "n", "psi", "level", "mean", "std"
    );
    let num = |x: Option<f64>, digits: usize| x.map_or("-".to_owned(), |x| format!("{x:.digits$}"));
    for f in &d.features {
        println!(
            "{:<24} {:<6} {:>9} {:>9} {:<12} {:>12} {:>12}",
            f.feature,
            if f.output { "output" } else { "input" },
            f.n,
            num(f.psi, 4),
            f.level.as_deref().unwrap_or("-"),
            num(f.mean, 4),
            num(f.std, 4)
        );
    }
    Ok(())
}

fn quality(m: &Monitor) -> Result<()> {
    let q = m.remote.client()?.quality(&m.query()?)?;
    if m.json {
        println!("{}", serde_json::to_string_pretty(&q)?);
        return Ok(());
    }
    let value = match (q.accuracy, q.mae) {
        (Some(a), _) => format!("accuracy {a:.4} ({} of {} correct)", q.correct, q.labels),
        (None, Some(m)) => format!("mean absolute error {m:.4} over {} labels", q.labels),
        (None, None) => "no labels yet".to_owned(),
    };
    println!(
        "{} {} on {} device(s): {value}",
        q.model, q.version, q.devices
    );
    for d in &q.per_device {
        let v = d
            .accuracy
            .map(|a| format!("accuracy {a:.4}"))
            .or(d.mae.map(|m| format!("mae {m:.4}")))
            .unwrap_or_default();
        println!("  {:<24} {:>8} labels  {v}", d.device, d.labels);
    }
    Ok(())
}

fn compare(remote: &Remote, q: &outpost_proto::rest::CompareQuery, json: bool) -> Result<()> {
    let c = remote.client()?.compare(q)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    let window = c
        .window_s
        .map_or("since each device started".to_owned(), |w| {
            format!("last {w} s")
        });
    println!("{} ({window})", c.model);
    if c.versions.is_empty() {
        println!("  no device served it");
        return Ok(());
    }
    println!(
        "  {:<12} {:<10} {:>7} {:>9} {:>10} {:>10} {:>18} {:>22}",
        "version", "role", "devices", "requests", "errors", "p95", "accuracy", "agreement"
    );
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    for v in &c.versions {
        let agreement = v.shadow.as_ref().and_then(|s| {
            s.agreement.map(|a| {
                format!(
                    "{a:.4} ({}/{}, {} dropped)",
                    s.agreed,
                    s.agreed + s.disagreed,
                    s.dropped
                )
            })
        });
        println!(
            "  {:<12} {:<10} {:>7} {:>9} {:>10} {:>10} {:>18} {:>22}",
            v.version,
            v.role,
            v.devices,
            v.requests,
            or_dash(v.error_rate.map(|r| format!("{:.2}%", r * 100.0))),
            or_dash(v.p95_latency_s.map(|p| format!("{:.1} ms", p * 1000.0))),
            or_dash(
                v.accuracy
                    .map(|a| format!("{a:.4} ({})", v.labels))
                    .or(v.mae.map(|m| format!("mae {m:.4}")))
            ),
            or_dash(agreement),
        );
    }
    Ok(())
}

fn rules(remote: &Remote, test: Option<&str>, json: bool) -> Result<()> {
    let client = remote.client()?;
    let show = |versions: &[outpost_proto::rest::RuleState]| {
        for v in versions {
            println!(
                "  {:<12} value {:<12} {} streak {} last fired {}  {}",
                v.version,
                v.value.map_or("-".to_owned(), |x| format!("{x:.4}")),
                if v.breaching { "CROSSING" } else { "ok      " },
                v.streak,
                v.fired_at.map_or("never".to_owned(), |t| t.to_string()),
                v.note
            );
        }
    };
    if let Some(name) = test {
        let states = client.test_rule(name)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&states)?);
        } else {
            println!("{name}, measured now:");
            show(&states);
        }
        return Ok(());
    }
    let rules = client.rules()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rules)?);
        return Ok(());
    }
    if rules.is_empty() {
        println!("no rules (fleet serve --rules FILE)");
    }
    for r in &rules {
        let s = &r.spec;
        println!(
            "{}: {} of {}{} {} {} over {} s",
            r.name,
            s["metric"].as_str().unwrap_or("?"),
            s["model"].as_str().unwrap_or("?"),
            s["version"]
                .as_str()
                .map(|v| format!("@{v}"))
                .unwrap_or_default(),
            s["op"].as_str().unwrap_or("?"),
            s["threshold"],
            s["window_s"]
        );
        show(&r.versions);
    }
    Ok(())
}

fn firings(remote: &Remote, limit: usize, json: bool) -> Result<()> {
    let firings = remote.client()?.firings(limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&firings)?);
        return Ok(());
    }
    for f in &firings {
        println!(
            "#{} t={} {}: {} of {}@{} = {:.4} {} {} ({}), devices [{}], features [{}]",
            f.id,
            f.time,
            f.rule,
            f.metric,
            f.model,
            f.version,
            f.value,
            f.op,
            f.threshold,
            if f.delivered {
                "delivered"
            } else {
                "not delivered"
            },
            f.devices.join(", "),
            f.features.join(", ")
        );
        for a in &f.attempts {
            println!(
                "    {} t={} {} {}",
                a.action,
                a.time,
                if a.ok { "ok" } else { "failed" },
                a.outcome
            );
        }
    }
    Ok(())
}
