//! `outpost demo`: a fleet manager (embedded broker) and a device on this machine, with the
//! example bundles built, signed, pushed to the fleet and deployed through it, in one command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::{Context, Result};
use outpost_bundle::{Bundle, SecretKey, TrustStore};
use outpost_device::{Config, Device};
use outpost_examples::Example;
use outpost_fleet::{BrokerChoice, FleetOptions, Ready};
use outpost_proto::rest::DeployRequest;

/// Arguments of `outpost demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Address to serve on [default: 127.0.0.1:8080, or a free port if taken].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address of the admin API; a token is generated and printed [default: a free port, so
    /// the demo never takes a device's default admin port, 8081].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Address of the fleet manager's API [default: 127.0.0.1:7878, or a free port if taken].
    #[arg(long)]
    fleet_listen: Option<SocketAddr>,
    /// Address of the fleet's embedded MQTT broker [default: 127.0.0.1:1883, or a free port if
    /// taken, e.g. by a system Mosquitto].
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// Keep state here instead of a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    crate::init_logging();
    let temporary = args.data_dir.is_none();
    let data_dir = args.data_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id()))
    });
    let result = run_in(&data_dir, &args);
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

/// The address given, else the default port on loopback when it is free, else any free port.
fn default_or_free(given: Option<SocketAddr>, port: u16) -> SocketAddr {
    given.unwrap_or_else(|| {
        let default = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(default).is_ok() {
            default
        } else {
            eprintln!("port {port} is taken; the demo uses a free one instead");
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
    })
}

/// Starts the fleet manager on its own thread; returns where it listens.
fn start_fleet(
    data_dir: &std::path::Path,
    args: &DemoArgs,
    trust: TrustStore,
) -> Result<(Ready, std::thread::JoinHandle<Result<()>>)> {
    let options = FleetOptions {
        data_dir: data_dir.join("fleet"),
        listen: default_or_free(args.fleet_listen, 7878),
        broker: BrokerChoice::Embedded(default_or_free(args.mqtt_listen, 1883), None),
        public_url: None,
        token: None,
        trust: Some(trust),
        desired_ttl: Duration::from_secs(7 * 24 * 3600),
        replica: Some("demo-fleet".into()),
        max_bundle_bytes: 256 << 20,
        retention: Duration::from_secs(24 * 3600),
        ingest_only: false,
        insecure: false,
        require_enrolment: false,
        share_group: None,
        rules: Vec::new(),
        per_device_metrics: false,
        database: None,
        artifacts_dir: None,
        advertise_url: None,
        http: outpost_fleet::default_http_limits(),
        mqtt_tls: None,
        api_tls: None,
        device_quota_bytes: 64 << 20,
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let thread = std::thread::spawn(move || -> Result<()> {
        crate::serve_cmd::run_fleet(options, move |ready| {
            let _ = ready_tx.send(ready.clone());
        })
    });
    match ready_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(ready) => Ok((ready, thread)),
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e.context("the demo fleet did not start")),
            _ => anyhow::bail!("the demo fleet did not start"),
        },
    }
}

/// Waits until every example answers `ready` on the device.
fn wait_ready(url: &str) -> Result<()> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    for name in ["digits", "sensor-anomaly"] {
        loop {
            let ready = agent
                .get(&format!("{url}/v2/models/{name}/ready"))
                .call()
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("{name} was not deployed to the demo device in time");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn run_in(data_dir: &std::path::Path, args: &DemoArgs) -> Result<()> {
    let listen = default_or_free(args.listen, 8080);
    let admin_listen = args
        .admin_listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let key = SecretKey::generate()?;
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["digits", "sensor-anomaly"]);
    let (fleet, fleet_thread) = start_fleet(data_dir, args, trust.clone())?;
    let api = format!("http://{}", fleet.api);
    let client = outpost_client::FleetClient::new(&api, None);
    let token = SecretKey::generate()?.id().to_owned() + SecretKey::generate()?.id();
    let device_dir = data_dir.join("device");
    let config_text = format!(
        "data_dir = {:?}\nlisten = \"{listen}\"\nadmin_listen = \"{admin_listen}\"\nadmin_token = \"{token}\"\n\
         [fleet]\nbroker = \"{}\"\nfleet_key = \"{}\"\ndevice_id = \"demo-device\"\ntelemetry_interval_ms = 5000\n",
        device_dir.display().to_string(),
        fleet.broker,
        fleet.public_key,
    );
    let config = Config::from_toml(&config_text, data_dir)?;
    let device = Device::with_trust(&config, trust)?;
    // Built and signed here, pushed to the fleet, deployed by it: the device downloads,
    // verifies, installs and activates them over the same path a real fleet uses.
    for example in Example::ALL {
        let mut bundle = Bundle::build(example.build_input()?)?;
        bundle.sign(&key);
        let manifest = bundle.manifest().clone();
        let bytes = bundle.to_bytes();
        client
            .push(&bytes[..], bytes.len() as u64)
            .with_context(|| format!("cannot push the {example:?} example"))?;
        client.deploy(&DeployRequest {
            model: manifest.name.clone(),
            version: manifest.version.to_string(),
            devices: vec!["demo-device".into()],
            ..DeployRequest::default()
        })?;
        eprintln!(
            "pushed {} {} and deployed it to demo-device",
            manifest.name, manifest.version
        );
    }
    // Inputs the training scripts recorded, so the printed requests give the recorded answers.
    let digits: serde_json::Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED)?;
    let sensor: serde_json::Value = serde_json::from_str(outpost_examples::SENSOR_EXPECTED)?;
    let pixels = digits["cases"][0]["pixels"].clone();
    let readings = sensor["cases"][0]["readings"].clone();
    let dir = data_dir.display().to_string();
    let broker = fleet.broker.clone();
    let result = crate::device_cmd::serve(Arc::new(device), &config, move |listen, admin| {
        let api = api.clone();
        let admin_listen = admin.map_or_else(|| "(admin off)".to_owned(), |a| a.to_string());
        let url = format!("http://{listen}");
        let digits_request = serde_json::json!({
            "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]
        });
        // Printed once the fleet's deployments are active, so every line works as shown.
        std::thread::spawn(move || {
            if let Err(e) = wait_ready(&url) {
                eprintln!("error: {e:#}");
                return;
            }
            println!(
                r#"
Outpost demo fleet: API {api} (embedded MQTT broker {broker})
Outpost demo device: serving on {url} (state in {dir})

Try:
  curl {url}/v2/models/digits
  curl -X POST {url}/v2/models/digits/infer -H 'Content-Type: application/json' \
    -d '{digits_request}'
  curl -X POST {url}/v2/models/sensor-anomaly/raw -H 'Content-Type: application/json' \
    -d '{{"readings":{readings}}}'
  curl {url}/metrics
  curl -H 'Authorization: Bearer {token}' http://{admin_listen}/admin/status

A digit image from the repository: curl -X POST {url}/v2/models/digits/raw \
    -H 'Content-Type: image/png' --data-binary @models/digits/samples/digit.png

The fleet that deployed both bundles, and what the device reports to it:
  cargo run -q -p outpost-cli -- fleet status --fleet {api}
  cargo run -q -p outpost-cli -- fleet telemetry --fleet {api} --device demo-device --limit 3
  cargo run -q -p outpost-cli -- fleet drift digits@1.0.0 --fleet {api}

The fleet's dashboard: {api}/   the device's status page: {url}/

Ctrl-C stops it."#
            );
        });
    });
    let fleet_result = fleet_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the demo fleet panicked"))?;
    result.and(fleet_result)
}
