//! The reconciler: brings the device to the accepted desired state — download (resumable,
//! size-capped, hash-checked), verify, install, activate — retrying transient failures.

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::{Deployment, DesiredState, Event};
use tokio::sync::watch;

use crate::Shared;
use crate::download::{self, Artifact, DownloadError};

/// A failed reconcile and whether retrying can help.
#[derive(Debug)]
struct Failure {
    message: String,
    transient: bool,
    /// Not a failure: a newer desired state replaced this one mid-way.
    superseded: bool,
}

impl Failure {
    fn superseded() -> Self {
        Self {
            message: "superseded by a newer desired state".into(),
            transient: true,
            superseded: true,
        }
    }
}

impl Shared {
    /// Brings the device to `state`. Blocking (downloads, installs). `superseded` says whether
    /// a newer desired state has arrived: then it stops between deployments, between pieces of
    /// a download and before an install, and leaves the rest to the newer state.
    fn reconcile(
        &self,
        state: &DesiredState,
        superseded: &dyn Fn() -> bool,
    ) -> Result<(), Failure> {
        let mut first_failure = None;
        for deployment in &state.deployments {
            if superseded() {
                return Err(Failure::superseded());
            }
            match self.apply_one(state.generation, deployment, superseded) {
                Ok(()) => {}
                Err(failure) if failure.superseded => {
                    tracing::info!(
                        model = %deployment.model,
                        version = %deployment.version,
                        generation = state.generation,
                        "a newer desired state arrived; leaving this deployment"
                    );
                    return Err(failure);
                }
                // A failure of a state no longer wanted is not worth reporting: the newer
                // state's own reconcile reports what it finds.
                Err(_) if superseded() => return Err(Failure::superseded()),
                Err(failure) => {
                    tracing::warn!(
                        model = %deployment.model,
                        version = %deployment.version,
                        error = %failure.message,
                        "deployment failed"
                    );
                    self.event(Event::DeploymentFailed {
                        generation: state.generation,
                        model: deployment.model.clone(),
                        version: deployment.version.clone(),
                        error: failure.message.clone(),
                        will_retry: failure.transient,
                    });
                    first_failure.get_or_insert(failure);
                }
            }
        }
        if let Some(failure) = first_failure {
            if superseded() {
                return Err(Failure::superseded());
            }
            self.set_retrying(failure.transient);
            self.set_last_error(Some(failure.message.clone()));
            return Err(failure);
        }
        // Error and retry flag are cleared before the generation is recorded: a reported state
        // is read generation first, so one that shows this generation reconciled never carries
        // the stale error of an earlier attempt.
        self.set_last_error(None);
        self.set_retrying(false);
        if self.store.reconciled() < Some(state.generation) {
            if let Err(e) = self.store.set_reconciled(state.generation) {
                tracing::error!(error = %e, "cannot record the reconciled generation");
            }
            self.event(Event::Reconciled {
                generation: state.generation,
            });
            self.reported_changed.notify_one();
        }
        Ok(())
    }

    /// Puts the deployment's policy in place (or ends a shadow or canary when it has none).
    fn settle_policy(&self, d: &Deployment) -> Result<(), Failure> {
        let changed = self
            .device
            .settle_policy(&d.model, d.policy.as_ref())
            .map_err(|e| Failure {
                message: format!("{} {}: {e}", d.model, d.version),
                transient: false,
                superseded: false,
            })?;
        if changed {
            tracing::info!(model = %d.model, version = %d.version, policy = ?d.policy, "traffic policy settled");
            self.reported_changed.notify_one();
        }
        Ok(())
    }

    fn apply_one(
        &self,
        generation: u64,
        d: &Deployment,
        superseded: &dyn Fn() -> bool,
    ) -> Result<(), Failure> {
        let permanent = |message: String| Failure {
            message,
            transient: false,
            superseded: false,
        };
        let device = |e: crate::DeviceError| permanent(format!("{} {}: {e}", d.model, d.version));
        let active = self.device.active().map_err(device)?.remove(&d.model);
        let installed = self
            .device
            .installed()
            .map_err(device)?
            .into_iter()
            .find(|r| r.name == d.model && r.version == d.version);
        if let Some(record) = installed {
            if record.digest != d.digest {
                return Err(permanent(format!(
                    "{} {} is installed with digest {}, the desired state names {}",
                    d.model, d.version, record.digest, d.digest
                )));
            }
            if active.as_deref() == Some(d.version.as_str()) {
                // In place; a policy the version was promoted out of has nothing left to do.
                if d.policy.is_none() {
                    self.settle_policy(d)?;
                }
                return Ok(());
            }
            if d.policy.is_some() {
                return self.settle_policy(d);
            }
            self.device.activate(&d.model, &d.version).map_err(device)?;
            self.settle_policy(d)?;
        } else {
            tracing::info!(model = %d.model, version = %d.version, url = %d.url, size = d.size, "downloading");
            self.event(Event::Downloading {
                generation,
                model: d.model.clone(),
                version: d.version.clone(),
                size: d.size,
            });
            let artifact = Artifact {
                url: &d.url,
                digest: &d.digest,
                size: d.size,
            };
            let agent = download::agent(&self.fleet.roots);
            let path = download::fetch(
                &agent,
                &artifact,
                self.max_bundle_bytes,
                &self.downloads,
                superseded,
            )
            .map_err(|e: DownloadError| match e {
                DownloadError::Stopped => Failure::superseded(),
                e => Failure {
                    transient: e.is_transient(),
                    message: format!("{} {}: {e}", d.model, d.version),
                    superseded: false,
                },
            })?;
            if superseded() {
                // Downloaded and checked, not installed: kept for a resume costs nothing more.
                return Err(Failure::superseded());
            }
            let bytes = std::fs::read(&path).map_err(|e| Failure {
                message: format!("cannot read the download: {e}"),
                transient: true,
                superseded: false,
            })?;
            let installed = match d.policy {
                Some(_) => self.device.install(&bytes),
                None => self.device.install_and_activate(&bytes),
            };
            let _ = std::fs::remove_file(&path);
            installed.map_err(device)?;
            if d.policy.is_some() {
                return self.settle_policy(d);
            }
            self.settle_policy(d)?;
        }
        tracing::info!(model = %d.model, version = %d.version, generation, "activated");
        self.event(Event::Activated {
            generation,
            model: d.model.clone(),
            version: d.version.clone(),
            digest: d.digest.clone(),
        });
        self.reported_changed.notify_one();
        Ok(())
    }
}

/// Works on the latest desired state until it is reached or fails permanently; a newer one
/// replaces it at once, even mid-backoff.
pub(crate) async fn run(
    shared: Arc<Shared>,
    mut desired: watch::Receiver<Option<DesiredState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    'next: loop {
        let state = desired.borrow_and_update().clone();
        if let Some(state) = state {
            let mut backoff = Duration::from_secs(1);
            loop {
                let worker = Arc::clone(&shared);
                let job = state.clone();
                // Superseded when the latest accepted state wants other deployments. Not by
                // the same state delivered again (after every reconnect), nor by the fleet
                // re-signing it (a new generation, the same deployments): a long download
                // must not start over every time its desired state is re-signed.
                let latest = desired.clone();
                let result = tokio::task::spawn_blocking(move || {
                    worker.reconcile(&job, &|| {
                        latest
                            .borrow()
                            .as_ref()
                            .is_some_and(|s| s.deployments != job.deployments)
                    })
                })
                .await;
                match result {
                    Ok(Ok(())) => break,
                    Ok(Err(failure)) if failure.superseded => continue 'next,
                    Ok(Err(failure)) if failure.transient => {
                        tracing::info!(retry_in = ?backoff, "reconcile will be retried");
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            changed = desired.changed() => {
                                if changed.is_err() { return; }
                                continue 'next;
                            }
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(300));
                    }
                    Ok(Err(_)) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "reconcile task failed");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = desired.changed() => if changed.is_err() { return },
        }
    }
}
