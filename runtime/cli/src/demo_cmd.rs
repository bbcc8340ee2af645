//! `outpost demo`: a device with the example bundles, built, signed and installed, in one
//! command.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use outpost_bundle::{Bundle, SecretKey, TrustStore};
use outpost_examples::Example;
use outpost_host::{Config, Device};

/// Arguments of `outpost demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin API (a token is generated and printed).
    #[arg(long, default_value = "127.0.0.1:8081")]
    admin_listen: SocketAddr,
    /// Keep state here instead of a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

pub(crate) fn run(args: DemoArgs) -> Result<()> {
    crate::init_logging();
    let temporary = args.data_dir.is_none();
    let data_dir = args.data_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id()))
    });
    let result = run_in(&data_dir, args.listen, args.admin_listen);
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn run_in(data_dir: &std::path::Path, listen: SocketAddr, admin_listen: SocketAddr) -> Result<()> {
    let key = SecretKey::generate()?;
    let mut trust = TrustStore::new();
    trust.allow(key.public(), ["digits", "sensor-anomaly"]);
    let token = SecretKey::generate()?.id().to_owned() + SecretKey::generate()?.id();
    let config_text = format!(
        "data_dir = {:?}\nlisten = \"{listen}\"\nadmin_listen = \"{admin_listen}\"\nadmin_token = \"{token}\"\n",
        data_dir.display().to_string()
    );
    let config = Config::from_toml(&config_text, data_dir)?;
    let device = Device::with_trust(&config, trust)?;
    for example in Example::ALL {
        let mut bundle = Bundle::build(example.build_input()?)?;
        bundle.sign(&key);
        let record = device
            .install_and_activate(&bundle.to_bytes())
            .with_context(|| format!("cannot install the {example:?} example"))?;
        eprintln!("installed and activated {} {}", record.name, record.version);
    }
    // Inputs the training scripts recorded, so the printed requests give the recorded answers.
    let digits: serde_json::Value = serde_json::from_str(outpost_examples::DIGITS_EXPECTED)?;
    let sensor: serde_json::Value = serde_json::from_str(outpost_examples::SENSOR_EXPECTED)?;
    let pixels = digits["cases"][0]["pixels"].clone();
    let readings = sensor["cases"][0]["readings"].clone();
    let dir = data_dir.display().to_string();
    let admin_token = token.clone();
    crate::device_cmd::serve(
        Arc::new(device),
        &config,
        Some(token),
        move |listen, admin| {
            let token = admin_token;
            let admin_listen = admin.map_or_else(|| "(admin off)".to_owned(), |a| a.to_string());
            let url = format!("http://{listen}");
            let digits_request = serde_json::json!({
                "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": pixels}]
            });
            println!(
                r#"
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

Ctrl-C stops it."#
            );
        },
    )
}
