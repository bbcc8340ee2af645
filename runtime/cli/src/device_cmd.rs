//! `outpost device`: run the device runtime, install bundles offline, print the config.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use outpost_host::agent::Agent;
use outpost_host::api::{self, ApiLimits};
use outpost_host::{Config, DEFAULT_CONFIG, Device};

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
}

pub(crate) fn run(cmd: DeviceCommand) -> Result<()> {
    match cmd {
        DeviceCommand::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
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
            serve(device, &config, config.admin_token.clone(), |_, _| {})
        }
    }
}

/// Runs the HTTP servers until Ctrl-C or SIGTERM; `on_ready` gets the bound addresses.
pub(crate) fn serve(
    device: Arc<Device>,
    config: &Config,
    admin_token: Option<String>,
    on_ready: impl FnOnce(std::net::SocketAddr, Option<std::net::SocketAddr>),
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let public = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let admin = match (config.admin_listen, admin_token) {
            (Some(addr), Some(token)) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} (admin)"))?;
                tracing::info!(addr = %l.local_addr()?, "admin API listening");
                Some((l, token))
            }
            _ => None,
        };
        tracing::info!(addr = %public.local_addr()?, "serving");
        let admin_addr = admin.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
        on_ready(public.local_addr()?, admin_addr);
        let limits = ApiLimits {
            max_request_bytes: config.max_request_bytes,
            max_bundle_bytes: config.max_bundle_bytes,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let agent = match &config.fleet {
            Some(fleet) => Some(Agent::start(
                Arc::clone(&device),
                fleet.clone(),
                config.data_dir.join("downloads"),
                config.max_bundle_bytes,
                stop_rx,
            )?),
            None => None,
        };
        let shutdown = async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        };
        api::serve(device, limits, public, admin, shutdown).await?;
        if let Some(agent) = agent {
            agent.stopped().await;
        }
        tracing::info!("stopped");
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
