//! `outpost fleet`: run a fleet manager, and the operator's commands against its REST API.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_bundle::TrustStore;
use outpost_fleet::api::DeviceView;
use outpost_fleet::{BrokerChoice, DeployRequest, DeployResponse, FleetOptions};
use serde_json::Value;

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
}

/// Fleet subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum FleetCommand {
    /// Run the fleet manager: MQTT broker (embedded unless --broker), REST API, artifact store.
    Serve(ServeArgs),
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
        #[command(flatten)]
        remote: Remote,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List devices: id, online, tags, architecture, runtime version.
    Devices {
        #[command(flatten)]
        remote: Remote,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Per device: online, last seen, runtime version, architecture, active versions, sync, last error.
    Status {
        #[command(flatten)]
        remote: Remote,
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
    /// Forget a decommissioned device: registry entry, desired state, retained messages.
    Forget {
        /// The device id.
        device: String,
        #[command(flatten)]
        remote: Remote,
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

/// Arguments of `outpost fleet serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// State directory: database, artifacts, the fleet key (created on first start).
    #[arg(long, default_value = "fleet-data")]
    data_dir: PathBuf,
    /// REST API and artifact address.
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// Address of the embedded MQTT broker.
    #[arg(long, default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Use this external broker instead of the embedded one, e.g. mqtt://10.0.0.5:1883.
    #[arg(long)]
    broker: Option<String>,
    /// User name for the external broker.
    #[arg(long, requires = "broker_password_file")]
    broker_username: Option<String>,
    /// A file holding the external broker's password.
    #[arg(long, requires = "broker_username")]
    broker_password_file: Option<PathBuf>,
    /// Make the embedded broker require logins: a file of `user:password` lines.
    #[arg(long, conflicts_with = "broker")]
    mqtt_logins: Option<PathBuf>,
    /// Base URL devices use to reach this fleet's artifacts (default: http://LISTEN).
    #[arg(long)]
    public_url: Option<String>,
    /// A file holding the bearer token the API requires (default: no token; loopback only).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accept only bundles that verify against this trust store.
    #[arg(long)]
    trust_store: Option<PathBuf>,
    /// How long a signed desired state stays valid (it is re-signed at half-life), in hours.
    #[arg(long, default_value_t = 168)]
    desired_ttl_hours: u64,
    /// This replica's name (several replicas may share one broker).
    #[arg(long)]
    replica: Option<String>,
    /// Largest bundle accepted, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_bundle_bytes: u64,
    /// How long telemetry and events are kept, in hours.
    #[arg(long, default_value_t = 168)]
    retention_hours: u64,
    /// Run as a secondary replica on a shared broker: store telemetry, events and the
    /// registry; leave pushes, deployments and desired states to the primary.
    #[arg(long, requires = "broker")]
    ingest_only: bool,
}

pub(crate) fn run(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Serve(args) => serve(args),
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
            remote,
            json,
        } => {
            let (model, version) = split_target(&target)?;
            let request = DeployRequest {
                model: model.to_owned(),
                version: version.to_owned(),
                devices,
                tag,
                all,
            };
            deploy(
                &remote,
                &request,
                wait.then(|| Duration::from_secs(timeout)),
                json,
            )
        }
        FleetCommand::Devices { remote, json } => devices(&remote, json),
        FleetCommand::RemoveBundle { target, remote } => {
            let (model, version) = split_target(&target)?;
            let removed = remote.delete(&format!("/api/v1/bundles/{model}/{version}"))?;
            println!(
                "removed {model} {version} (sha256 {})",
                removed["digest"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        FleetCommand::Forget { device, remote } => {
            let answer = remote.delete(&format!("/api/v1/devices/{device}"))?;
            println!(
                "forgot {device}: {}",
                answer["note"].as_str().unwrap_or_default()
            );
            Ok(())
        }
        FleetCommand::Status { remote, json } => status(&remote, json),
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

fn serve(args: ServeArgs) -> Result<()> {
    crate::init_logging();
    let broker = match &args.broker {
        Some(url) => {
            let url: outpost_proto::BrokerUrl = url.parse()?;
            let (host, port) = (url.host().to_owned(), url.port());
            let login = match (&args.broker_username, &args.broker_password_file) {
                (Some(user), Some(file)) => {
                    Some((user.clone(), util::read_string(file)?.trim().to_owned()))
                }
                _ => None,
            };
            BrokerChoice::External(host, port, login)
        }
        None => {
            let logins = args
                .mqtt_logins
                .as_ref()
                .map(|p| {
                    outpost_fleet::read_logins(&util::read_string(p)?).map_err(anyhow::Error::from)
                })
                .transpose()?;
            BrokerChoice::Embedded(args.mqtt_listen, logins)
        }
    };
    let token = args
        .token_file
        .as_ref()
        .map(|p| util::read_string(p).map(|t| t.trim().to_owned()))
        .transpose()?;
    if token.as_ref().is_some_and(|t| t.len() < 16) {
        bail!("the API token must be at least 16 characters");
    }
    if token.is_none() && !args.listen.ip().is_loopback() {
        bail!(
            "listening on {} without --token-file would let anyone deploy; give a token",
            args.listen
        );
    }
    let trust = args
        .trust_store
        .as_ref()
        .map(|p| -> Result<TrustStore> { Ok(TrustStore::from_toml_str(&util::read_string(p)?)?) })
        .transpose()?;
    let options = FleetOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        broker,
        public_url: args.public_url,
        token,
        trust,
        desired_ttl: Duration::from_secs(args.desired_ttl_hours.max(1) * 3600),
        replica: args.replica,
        max_bundle_bytes: args.max_bundle_bytes,
        retention: Duration::from_secs(args.retention_hours.max(1) * 3600),
        ingest_only: args.ingest_only,
    };
    run_fleet(options, |ready| {
        println!(
            "Outpost fleet: API http://{}  broker {}\nFleet public key: {} (also in {})",
            ready.api,
            ready.broker,
            ready.public_key,
            ready.public_key_file.display()
        );
    })
}

/// Runs a fleet manager on a new async runtime until Ctrl-C or SIGTERM.
pub(crate) fn run_fleet(
    options: FleetOptions,
    on_ready: impl FnOnce(&outpost_fleet::Ready),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(outpost_fleet::serve(
        options,
        crate::device_cmd::shutdown_signal(),
        on_ready,
    ))?;
    Ok(())
}

/// The HTTP client of the operator commands: HTTP errors come back as statuses.
pub(crate) fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .build()
        .new_agent()
}

/// Reads a JSON answer; an HTTP error becomes an error with the server's message.
pub(crate) fn answer(response: ureq::http::Response<ureq::Body>, what: &str) -> Result<Value> {
    let status = response.status();
    let text = response
        .into_body()
        .into_with_config()
        .limit(256 << 20)
        .read_to_string()
        .with_context(|| format!("{what}: cannot read the answer"))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_owned);
        bail!("{what}: {message} (HTTP {})", status.as_u16());
    }
    Ok(value)
}

impl Remote {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.fleet.trim_end_matches('/'))
    }

    /// Sends a bodiless request with the token, and reads the JSON answer.
    fn call(&self, method: &str, path: &str) -> Result<Value> {
        let agent = agent();
        let url = self.url(path);
        let mut request = match method {
            "DELETE" => agent.delete(&url),
            _ => agent.get(&url),
        };
        if let Some(t) = &self.token {
            request = request.header("Authorization", &format!("Bearer {t}"));
        }
        let response = request
            .call()
            .with_context(|| format!("cannot reach the fleet at {}", self.fleet))?;
        answer(response, &format!("{method} {path}"))
    }

    fn get(&self, path: &str) -> Result<Value> {
        self.call("GET", path)
    }

    fn delete(&self, path: &str) -> Result<Value> {
        self.call("DELETE", path)
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
    let mut reader = Progress {
        inner: std::io::Cursor::new(bytes),
        done: 0,
        total,
        shown: u64::MAX,
        tty: std::io::stderr().is_terminal(),
    };
    let mut request = agent()
        .post(&remote.url("/api/v1/bundles"))
        .header("Content-Type", "application/vnd.outpost.bundle")
        .header("Content-Length", &total.to_string());
    if let Some(t) = &remote.token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let response = request
        .send(ureq::SendBody::from_reader(&mut reader))
        .with_context(|| format!("cannot reach the fleet at {}", remote.fleet))?;
    let record = answer(response, "push")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!(
            "pushed {} {} ({} bytes, sha256 {})",
            record["name"].as_str().unwrap_or("?"),
            record["version"].as_str().unwrap_or("?"),
            record["size"],
            record["digest"].as_str().unwrap_or("?")
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
    let mut call = agent().post(&remote.url("/api/v1/deployments"));
    if let Some(t) = &remote.token {
        call = call.header("Authorization", &format!("Bearer {t}"));
    }
    let response = call
        .header("Content-Type", "application/json")
        .send(serde_json::to_vec(request)?.as_slice())
        .with_context(|| format!("cannot reach the fleet at {}", remote.fleet))?;
    let value = answer(response, "deploy")?;
    let deployed: DeployResponse = serde_json::from_value(value.clone())?;
    if !json {
        println!(
            "deployment {}: {} {} to {} device(s): {}",
            deployed.deployment.id,
            deployed.deployment.model,
            deployed.deployment.version,
            deployed.deployment.devices.len(),
            deployed.deployment.devices.join(", ")
        );
    }
    let Some(timeout) = wait else {
        if json {
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        return Ok(());
    };
    let outcome = wait_for(remote, &deployed, timeout, json)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "deployment": value,
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
    remote: &Remote,
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
        let views: Vec<DeviceView> = device_views(remote).unwrap_or_default();
        for (device, generation) in &deployed.generations {
            if outcome.contains_key(device) {
                continue;
            }
            let Some(reported) = views
                .iter()
                .find(|v| &v.record.id == device)
                .and_then(|v| v.record.reported.clone())
            else {
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

fn device_views(remote: &Remote) -> Result<Vec<DeviceView>> {
    Ok(serde_json::from_value(remote.get("/api/v1/devices")?)?)
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

fn devices(remote: &Remote, json: bool) -> Result<()> {
    let views = device_views(remote)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<8} {:<10} {:<10} TAGS",
        "DEVICE", "ONLINE", "ARCH", "RUNTIME"
    );
    for v in &views {
        let r = v.record.reported.clone().unwrap_or_default();
        println!(
            "{:<20} {:<8} {:<10} {:<10} {}",
            v.record.id,
            if v.record.online { "yes" } else { "no" },
            r.arch,
            r.runtime_version,
            r.tags.join(",")
        );
    }
    Ok(())
}

fn status(remote: &Remote, json: bool) -> Result<()> {
    let views = device_views(remote)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<7} {:<10} {:<8} {:<8} {:<6} {:<30} LAST ERROR",
        "DEVICE", "ONLINE", "LAST SEEN", "RUNTIME", "ARCH", "SYNC", "ACTIVE"
    );
    for v in &views {
        let r = v.record.reported.clone().unwrap_or_default();
        let active = r
            .active
            .iter()
            .map(|(m, ver)| format!("{m}@{ver}"))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "{:<16} {:<7} {:<10} {:<8} {:<8} {:<6} {:<30} {}",
            v.record.id,
            if v.record.online { "yes" } else { "no" },
            ago(v.record.last_seen),
            r.runtime_version,
            r.arch,
            if v.in_sync { "yes" } else { "no" },
            if active.is_empty() {
                "-".into()
            } else {
                active
            },
            r.last_error.as_deref().unwrap_or("-")
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
    let mut path = format!(
        "/api/v1/{}?limit={limit}",
        if events { "events" } else { "telemetry" }
    );
    if let Some(d) = device {
        path.push_str(&format!("&device={d}"));
    }
    if let Some(a) = after {
        path.push_str(&format!("&after={a}"));
    }
    let value = remote.get(&path)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    for r in value["records"].as_array().into_iter().flatten() {
        println!(
            "{} #{} t={} {}",
            r["device"].as_str().unwrap_or("?"),
            r["seq"],
            r["time"],
            r["body"]
        );
    }
    Ok(())
}
