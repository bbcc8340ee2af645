//! `outpost fleet serve`: run a fleet manager (in builds with the `fleet` feature).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use outpost_bundle::TrustStore;
use outpost_fleet::{BrokerChoice, FleetOptions};

use crate::util;

/// Arguments of `outpost fleet serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// State directory: database, artifacts, the fleet key (created on first start).
    #[arg(long, default_value = "fleet-data")]
    data_dir: PathBuf,
    /// Keep the fleet's state in PostgreSQL instead of the data directory's embedded store,
    /// e.g. postgres://outpost@db:5432/outpost (also from OUTPOST_DATABASE_URL). Replicas on
    /// one database (and one broker) each answer the whole API; the schema is made or
    /// migrated at start.
    #[arg(
        long,
        env = "OUTPOST_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database: Option<String>,
    /// Where bundle files are kept (default DATA_DIR/artifacts). Replicas on one database
    /// need storage they all see here (files are named by digest and written once).
    #[arg(long, value_name = "DIR")]
    artifacts_dir: Option<PathBuf>,
    /// Where the other replicas on the database reach this one's API, e.g.
    /// http://10.0.0.7:7878 (also from OUTPOST_ADVERTISE_URL; default: http(s)://LISTEN unless
    /// it is 0.0.0.0). A replica without the publishing role forwards writes to the one with
    /// it there, so any replica takes a push or a deployment.
    #[arg(long, env = "OUTPOST_ADVERTISE_URL", value_name = "URL")]
    advertise_url: Option<String>,
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
    /// For an mqtts:// broker: the CA certificates (PEM) its certificate must chain to
    /// (default: the system's roots).
    #[arg(long, requires = "broker", value_name = "FILE")]
    broker_ca_file: Option<PathBuf>,
    /// The API and artifact server speak HTTPS with this certificate chain (PEM)...
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The embedded broker speaks TLS (mqtts://) with this certificate chain (PEM)...
    #[arg(
        long,
        conflicts_with = "broker",
        requires = "mqtt_tls_key",
        value_name = "FILE"
    )]
    mqtt_tls_cert: Option<PathBuf>,
    /// ...and this private key (PEM).
    #[arg(long, requires = "mqtt_tls_cert", value_name = "FILE")]
    mqtt_tls_key: Option<PathBuf>,
    /// Make the embedded broker require logins: a file of `user:password` lines, each user a
    /// device id (confined to that device's topics) or `fleet/REPLICA`. Enrolled devices
    /// (`outpost fleet enroll`) log in too.
    #[arg(long, conflicts_with = "broker")]
    mqtt_logins: Option<PathBuf>,
    /// Base URL devices use to reach this fleet's artifacts (default: http(s)://LISTEN, with
    /// 127.0.0.1 for 0.0.0.0: give it whenever devices are on other machines).
    #[arg(long)]
    public_url: Option<String>,
    /// A file holding the bearer token the API requires (default: no token; loopback only).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Accept only bundles that verify against this trust store.
    #[arg(long)]
    trust_store: Option<PathBuf>,
    /// How long a signed desired state stays valid: `90s`, `30m`, `12h`, `7d`. It is re-signed
    /// at half-life; a device refuses one replayed after it expires.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_ttl)]
    desired_ttl: Duration,
    /// The same in hours (the older spelling).
    #[arg(long, hide = true, conflicts_with = "desired_ttl")]
    desired_ttl_hours: Option<u64>,
    /// This replica's name (several replicas may share one broker).
    #[arg(long)]
    replica: Option<String>,
    /// Largest bundle accepted, in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_bundle_bytes: u64,
    /// How long telemetry and events are kept, in hours.
    #[arg(long, default_value_t = 168)]
    retention_hours: u64,
    /// MiB of telemetry and events one device may have stored at once; past it, its records
    /// are refused until retention frees room.
    #[arg(long, default_value_t = 64)]
    device_quota_mib: u64,
    /// Run as a secondary replica on a shared broker: store telemetry, events and the
    /// registry; leave pushes, deployments and desired states to the primary.
    #[arg(long, requires = "broker")]
    ingest_only: bool,
    /// Register and hear only enrolled devices (`outpost fleet enroll`). With the embedded
    /// broker, devices then log in with the credentials enrolment issued. Always on when the
    /// embedded broker has --mqtt-logins or listens beyond loopback.
    #[arg(long)]
    require_enrolment: bool,
    /// The shared-subscription group replicas split telemetry in (default `outpost-fleet`). On
    /// an external broker whose ACLs do not check subscriptions (Mosquitto), give every replica
    /// the same secret name, e.g. from `openssl rand -hex 12`: a device that joined the group
    /// would take a share of every device's records.
    #[arg(long, value_name = "NAME")]
    mqtt_share_group: Option<String>,
    /// Retraining triggers and alerts: a TOML file of `[[rule]]` tables (docs/rules.md),
    /// evaluated on the telemetry; each firing runs its webhook or command.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Let the embedded broker listen beyond loopback without logins: anyone who reaches it
    /// can read and write every device's topics.
    #[arg(long, conflicts_with_all = ["mqtt_logins", "require_enrolment"])]
    insecure: bool,
    /// API connections open at once; at the cap the one idle longest is closed to make room
    /// (default: a quarter of the file descriptors the process may open, less 256).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_api_connections: Option<u32>,
    /// Also give `/metrics` one series per device (seconds since last heard, records dropped).
    /// Off by default: two series per device is what a Prometheus server with thousands of
    /// devices should not be asked to hold; the device list API has the same detail.
    #[arg(long)]
    per_device_metrics: bool,
}

pub(crate) fn serve(args: ServeArgs) -> Result<()> {
    crate::init_logging();
    // Before any limit is derived from it (the broker's and the API's connection caps).
    let fds = util::raise_fd_limit();
    tracing::debug!(?fds, "open-file limit");
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
            let tls = match (url.tls(), &args.broker_ca_file) {
                (true, ca) => Some(outpost_tls::client_config(ca.as_deref())?),
                (false, Some(_)) => anyhow::bail!("--broker-ca-file is for an mqtts:// broker"),
                (false, None) => None,
            };
            BrokerChoice::External(host, port, login, tls)
        }
        None => {
            let logins = args
                .mqtt_logins
                .as_ref()
                .map(|p| {
                    outpost_fleet::Logins::parse(&util::read_string(p)?)
                        .map_err(anyhow::Error::from)
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
        desired_ttl: match args.desired_ttl_hours {
            Some(hours) => Duration::from_secs(hours.clamp(1, MAX_TTL_SECS / 3600) * 3600),
            None => args.desired_ttl,
        },
        replica: args.replica,
        max_bundle_bytes: args.max_bundle_bytes,
        retention: Duration::from_secs(args.retention_hours.max(1) * 3600),
        device_quota_bytes: args.device_quota_mib.saturating_mul(1 << 20),
        ingest_only: args.ingest_only,
        insecure: args.insecure,
        require_enrolment: args.require_enrolment,
        share_group: args.mqtt_share_group,
        per_device_metrics: args.per_device_metrics,
        database: args.database.filter(|url| !url.trim().is_empty()),
        artifacts_dir: args.artifacts_dir,
        advertise_url: args.advertise_url.filter(|url| !url.trim().is_empty()),
        rules: match &args.rules {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the rules {}", path.display()))?;
                let dir = path.parent().unwrap_or(std::path::Path::new("."));
                outpost_fleet::rules::RuleFile::load(&text, dir)?
            }
            None => Vec::new(),
        },
        http: {
            let mut limits = outpost_fleet::default_http_limits();
            if let Some(n) = args.max_api_connections {
                limits.max_connections = n as usize;
            }
            limits
        },
        api_tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(outpost_tls::server_config(cert, key)?),
            _ => None,
        },
        mqtt_tls: match (&args.mqtt_tls_cert, &args.mqtt_tls_key) {
            (Some(cert), Some(key)) => Some(outpost_tls::server_config(cert, key)?),
            _ => None,
        },
    };
    let scheme = if options.api_tls.is_some() {
        "https"
    } else {
        "http"
    };
    run_fleet(options, |ready| {
        println!(
            "Outpost fleet: API {scheme}://{}  broker {}\nFleet public key: {} (also in {})",
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
    runtime.block_on(async {
        let listeners = outpost_fleet::Listeners::bind(&options).await?;
        outpost_fleet::serve(
            options,
            listeners,
            crate::device_cmd::shutdown_signal(),
            on_ready,
        )
        .await
    })?;
    Ok(())
}

/// The longest validity accepted: ten years.
const MAX_TTL_SECS: u64 = 3650 * 86_400;

/// A validity period: a whole number with a unit (`s`, `m`, `h`, `d`), at least 2 seconds
/// (re-signing happens at half of it, with one-second clocks) and at most ten years.
fn parse_ttl(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let secs = crate::util::parse_duration(text)?.as_secs();
    if secs < 2 {
        return Err(format!("{text:?} is too short: at least 2s"));
    }
    if secs > MAX_TTL_SECS {
        return Err(format!("{text:?} is too long: at most 3650d"));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_their_units_and_bad_ones_say_why() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_ttl("7").unwrap_err().contains("no unit"));
        assert!(
            parse_ttl("7w")
                .unwrap_err()
                .contains("one of ms, s, m, h, d")
        );
        assert!(parse_ttl("1s").unwrap_err().contains("too short"));
        assert!(parse_ttl("h").unwrap_err().contains("whole number"));
        assert!(parse_ttl("99999999999999999999d").is_err());
        assert!(parse_ttl("3651d").unwrap_err().contains("too long"));
        assert_eq!(parse_ttl("3650d"), Ok(Duration::from_secs(MAX_TTL_SECS)));
    }
}
