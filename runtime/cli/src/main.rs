//! `outpost`: keys, signed model bundles, devices and fleets from one binary.

use std::process::ExitCode;

use clap::Parser;

mod baseline_data;
mod batch_cmd;
mod batch_out;
mod bundle_cmd;
#[cfg(feature = "fleet")]
mod demo_cmd;
mod device_cmd;
mod enrol_cmd;
mod fleet_cmd;
mod guest_cmd;
mod key_cmd;
mod mlflow;
mod model_cmd;
mod onnx_spec;
mod release_cmd;
mod rollout_cmd;
mod samples;
#[cfg(feature = "fleet")]
mod serve_cmd;
mod simulate_cmd;
mod util;

/// Outpost: signed ML model bundles served on edge devices.
#[derive(Debug, Parser)]
#[command(name = "outpost", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Generate and manage signing keys.
    #[command(subcommand)]
    Key(key_cmd::KeyCommand),
    /// Build, sign, verify and inspect model bundles (`*.opb`).
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
    /// Look at an ONNX file as tract sees it, before it goes into a bundle.
    #[command(subcommand)]
    Model(model_cmd::ModelCommand),
    /// Start a guest of your own (Rust for wasm32-wasip2) from the template.
    #[command(subcommand)]
    Guest(guest_cmd::GuestCommand),
    /// Run a file of inputs (JSON Lines or .npy) through a bundle on every core, resumably.
    Batch(batch_cmd::BatchArgs),
    /// Run a device: serve installed bundles over HTTP.
    #[command(subcommand)]
    Device(device_cmd::DeviceCommand),
    /// Push bundles to a fleet, deploy them, watch devices and telemetry; `serve` runs a fleet
    /// manager (not in device-only builds).
    #[command(subcommand)]
    Fleet(fleet_cmd::FleetCommand),
    /// Start a local fleet and device with the example bundles deployed through the fleet.
    #[cfg(feature = "fleet")]
    Demo(demo_cmd::DemoArgs),
    /// Sign a directory of release files, or verify one before installing it.
    #[command(subcommand)]
    Release(release_cmd::ReleaseCommand),
    /// Exit 0 when URL answers 2xx in time, 1 otherwise: a container's health check (the
    /// images hold no shell and no curl).
    Health {
        /// What to ask, e.g. `http://127.0.0.1:7878/healthz`.
        #[arg(long)]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = util::parse_duration)]
        timeout: std::time::Duration,
    },
}

/// Logs to stderr; the level comes from `OUTPOST_LOG` (error, warn, info, debug, trace).
fn init_logging() {
    let level = std::env::var("OUTPOST_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The embedded broker logs every connection (and every client that drops its connection,
    // at error level): quiet unless debugging. Its start-up failures are logged by the fleet.
    let broker_level = match level {
        tracing::Level::TRACE => tracing::level_filters::LevelFilter::TRACE,
        tracing::Level::DEBUG => tracing::level_filters::LevelFilter::WARN,
        _ => tracing::level_filters::LevelFilter::OFF,
    };
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(level)
        .with_target("rumqttd", broker_level);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .try_init();
}

/// `outpost health`: one GET, a 2xx answer within `timeout` or an error.
fn health(url: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Key(cmd) => key_cmd::run(cmd),
        Command::Bundle(cmd) => bundle_cmd::run(cmd),
        Command::Model(cmd) => model_cmd::run(cmd),
        Command::Guest(cmd) => guest_cmd::run(cmd),
        Command::Batch(args) => batch_cmd::run(args),
        Command::Device(cmd) => device_cmd::run(cmd),
        Command::Fleet(cmd) => fleet_cmd::run(cmd),
        #[cfg(feature = "fleet")]
        Command::Demo(args) => demo_cmd::run(args),
        Command::Release(cmd) => release_cmd::run(cmd),
        Command::Health { url, timeout } => health(&url, timeout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
