//! What the device tells its fleet: the reported state (retained) and periodic telemetry
//! records (through the outbox).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use outpost_proto::{PROTOCOL_VERSION, ReportedState, TelemetrySample};
use tokio::sync::watch;

use crate::Shared;
use crate::outbox::Kind;

impl Shared {
    pub(crate) fn reported(&self) -> ReportedState {
        let active = self.device.active().unwrap_or_default();
        let installed = self
            .device
            .installed()
            .map(|records| {
                records
                    .into_iter()
                    .map(|r| format!("{}@{}", r.name, r.version))
                    .collect()
            })
            .unwrap_or_default();
        ReportedState {
            v: PROTOCOL_VERSION,
            device: self.fleet.device_id.clone(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            arch: std::env::consts::ARCH.to_owned(),
            generation: self.store.reconciled(),
            accepted_generation: self.store.accepted(),
            active,
            installed,
            policies: self.device.policies().unwrap_or_default(),
            tags: self.fleet.tags.clone(),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            retrying: self.retrying.load(Ordering::Relaxed),
            outbox_pending: self.outbox.pending(),
            outbox_dropped: self.outbox.dropped(),
            telemetry_interval_ms: Some(self.fleet.telemetry_interval.as_millis() as u64),
        }
    }

    fn telemetry_record(&self) -> TelemetrySample {
        let (cpu_seconds, rss_bytes) = process_usage();
        let device = self.device.telemetry();
        TelemetrySample {
            uptime_s: self.started.elapsed().as_secs(),
            runtime_version: env!("CARGO_PKG_VERSION").to_owned(),
            cpu_seconds,
            rss_bytes,
            disk_bytes: device.disk_bytes + self.store.size_on_disk(),
            models: device.models,
            shadows: device.shadows,
            drift: device.drift,
            quality: device.quality,
        }
    }
}

/// CPU seconds used and resident memory of this process, from `/proc` (zeros elsewhere).
fn process_usage() -> (f64, u64) {
    // Field 14 and 15 of /proc/self/stat: user and system time in USER_HZ ticks (100 on Linux).
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

/// Takes a telemetry record every interval and puts it in the outbox.
pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(shared.fleet.telemetry_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Said once when writing starts failing (a full disk fails every record) and once when it
    // works again, not ten times a second.
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {
                let record = match serde_json::to_value(shared.telemetry_record()) {
                    Ok(record) => record,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode telemetry");
                        continue;
                    }
                };
                match shared.outbox.push(Kind::Telemetry, record) {
                    Ok(_) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("telemetry is written to the outbox again");
                        }
                        shared.outbox_changed.notify_one();
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "cannot write telemetry to the outbox; records are dropped and counted until it works again");
                    }
                    Err(e) => tracing::debug!(error = %e, "telemetry record dropped"),
                }
            }
        }
    }
}
