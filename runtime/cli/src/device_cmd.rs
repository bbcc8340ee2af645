//! `outpost device`: run the device runtime, install bundles offline, print the config.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use outpost_device::{Config, DEFAULT_CONFIG, Device, Listeners};

use crate::util;

/// Device subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DeviceCommand {
    /// Serve the active deployment of every installed model (no network needed).
    Run {
        /// The device configuration (TOML); see `outpost device default-config`.
        #[arg(long)]
        config: PathBuf,
    },
    /// Verify and install a bundle while the device is stopped.
    Install {
        /// The signed bundle.
        bundle: PathBuf,
        /// The device configuration (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Also make it the active version.
        #[arg(long)]
        activate: bool,
    },
    /// Show installed bundles and active versions while the device is stopped.
    Status {
        /// The device configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the default configuration, with a comment on every field.
    DefaultConfig,
    /// Check a configuration as `device run` reads it, without starting anything or writing
    /// the data directory: exit 0 when it is valid, else an error naming the problem.
    CheckConfig {
        /// The device configuration (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

pub(crate) fn run(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        DeviceCommand::CheckConfig { config: path } => {
            let config = Config::load(&path)?;
            println!(
                "{}: valid (serving on {}, state in {}, {})",
                path.display(),
                config.listen,
                config.data_dir.display(),
                match &config.fleet {
                    Some(fleet) => format!("fleet broker {} as {}", fleet.broker, fleet.device_id),
                    None => "no fleet".to_owned(),
                }
            );
            Ok(())
        }
        DeviceCommand::Install {
            bundle,
            config,
            activate,
        } => {
            let config = Config::load(&config)?;
            let device = Device::open(&config)?;
            let bytes = util::read(&bundle)?;
            let record = if activate {
                device.install_and_activate(&bytes)
            } else {
                device.install(&bytes)
            }
            .with_context(|| format!("cannot install `{}`", bundle.display()))?;
            println!(
                "installed {} {} ({}){}",
                record.name,
                record.version,
                record.digest,
                if activate { ", active" } else { "" }
            );
            Ok(())
        }
        DeviceCommand::Status { config } => {
            let config = Config::load(&config)?;
            let device = Device::open(&config)?;
            println!("{}", serde_json::to_string_pretty(&device.status()?)?);
            Ok(())
        }
        DeviceCommand::Run { config } => {
            crate::init_logging();
            let config = Config::load(&config)?;
            let device = Arc::new(Device::open(&config)?);
            serve(device, &config, |_, _| {})
        }
    }
}

/// Runs the device until Ctrl-C or SIGTERM; `on_ready` gets the bound addresses.
pub(crate) fn serve(
    device: Arc<Device>,
    config: &Config,
    on_ready: impl FnOnce(std::net::SocketAddr, Option<std::net::SocketAddr>),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listeners = Listeners::bind(config).await?;
        on_ready(listeners.public_addr()?, listeners.admin_addr()?);
        outpost_device::run(device, config, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
