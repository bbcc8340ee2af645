//! One entry point for a serving device: `outpost device run`, the demo, the benches and the
//! tests all start a device through [`run`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use outpost_agent::{Agent, Paths};
use tokio::net::TcpListener;

use crate::api::{self, ApiLimits, Doors};
use crate::config::Config;
use crate::device::Device;
use crate::error::{HostError, Result};

/// The sockets a device serves on. Bind them first (port 0 picks a free port), read their
/// addresses, then hand them to [`run`].
#[derive(Debug)]
pub struct Listeners {
    /// The inference endpoint.
    pub public: TcpListener,
    /// The admin endpoint, served only with a token.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `config.listen`, and `config.admin_listen` when the admin API is enabled.
    pub async fn bind(config: &Config) -> Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|e| HostError::Config(format!("cannot listen on {addr}{what}: {e}")))
        };
        let public = bind(config.listen, "").await?;
        let admin = match (config.admin_listen, &config.admin_token) {
            (Some(addr), Some(_)) => Some(bind(addr, " (admin)").await?),
            _ => None,
        };
        Ok(Self { public, admin })
    }

    /// The inference endpoint's address.
    pub fn public_addr(&self) -> Result<SocketAddr> {
        Ok(self.public.local_addr()?)
    }

    /// The admin endpoint's address, when it is served.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>> {
        Ok(self
            .admin
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?)
    }
}

/// Serves `device` on `listeners` until `shutdown` completes: the HTTP endpoints, and the
/// fleet agent when `config` names a broker. On shutdown the servers finish the requests in
/// flight and the agent tells the fleet it is offline before this returns.
pub async fn run(
    device: Arc<Device>,
    config: &Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let limits = ApiLimits {
        max_request_bytes: config.max_request_bytes,
        max_response_bytes: config.max_response_bytes,
        max_bundle_bytes: config.max_bundle_bytes,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = match &config.fleet {
        Some(fleet) => Some(
            Agent::start(
                Arc::clone(&device) as Arc<dyn outpost_agent::DeviceControl>,
                fleet.clone(),
                Paths {
                    store: config.data_dir.join("agent"),
                    downloads: config.data_dir.join("downloads"),
                    max_bundle_bytes: config.max_bundle_bytes,
                },
                stop_rx,
            )
            .map_err(HostError::Agent)?,
        ),
        None => None,
    };
    if let Some(agent) = &agent {
        device.metrics.set_link(agent.link());
    }
    tracing::info!(addr = %listeners.public_addr()?, "serving");
    let admin = match (listeners.admin, config.admin_token.clone()) {
        (Some(listener), Some(token)) => {
            tracing::info!(addr = %listener.local_addr()?, "admin API listening");
            Some((listener, token))
        }
        _ => None,
    };
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let doors = Doors {
        public: config.http,
        admin: config.admin_http,
    };
    // Idle streaming sessions end on time even when no new session comes to sweep them.
    let weak = Arc::downgrade(&device);
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            match weak.upgrade() {
                Some(device) => device.expire_sessions(),
                None => break,
            }
        }
    });
    api::serve(device, limits, doors, listeners.public, admin, shutdown).await;
    reaper.abort();
    if let Some(agent) = agent {
        agent.stopped().await;
    }
    tracing::info!("stopped");
    Ok(())
}
