//! How a device reaches its fleet: the `[fleet]` section of the device configuration, raw as
//! TOML gives it and validated into [`FleetConfig`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_bundle::PublicKey;
use outpost_proto::{BrokerUrl, DeviceId};
use serde::Deserialize;

/// The `[fleet]` section as written (see the device's default configuration for each field).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    broker: Option<String>,
    fleet_key: Option<String>,
    fleet_key_file: Option<PathBuf>,
    device_id: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    telemetry_interval_ms: Option<u64>,
    outbox_quota_bytes: Option<u64>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

/// How a device reaches its fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The broker.
    pub broker: BrokerUrl,
    /// The fleet's desired-state signing key.
    pub fleet_key: PublicKey,
    /// This device's id.
    pub device_id: DeviceId,
    /// Groups this device belongs to.
    pub tags: Vec<String>,
    /// Interval between telemetry records.
    pub telemetry_interval: Duration,
    /// Outbox size cap in bytes.
    pub outbox_quota_bytes: u64,
    /// Broker user name and password, if the broker requires them.
    pub credentials: Option<(String, String)>,
    /// The TLS client configuration for an `mqtts://` broker (trusting `ca_file`, or the
    /// system's roots).
    pub tls: Option<std::sync::Arc<outpost_tls::rustls::ClientConfig>>,
    /// What `https://` artifact downloads trust: `ca_file`'s certificates, or the system's
    /// (none when it has none: such downloads then fail with a certificate error).
    pub roots: std::sync::Arc<Vec<outpost_tls::Certificate<'static>>>,
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

impl FleetSection {
    /// Validates the section; `None` when no broker is set (the device runs stand-alone).
    /// Relative paths are taken relative to `base`. The error is the reason, for the
    /// configuration's own error.
    pub fn validate(self, base: &Path) -> Result<Option<FleetConfig>, String> {
        let Some(broker) = self.broker else {
            return Ok(None);
        };
        let broker: BrokerUrl = broker
            .parse()
            .map_err(|e: outpost_proto::BadBrokerUrl| e.to_string())?;
        let key_text = match (self.fleet_key, self.fleet_key_file) {
            (Some(k), None) => k,
            (None, Some(path)) => {
                let path = base.join(path);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read fleet_key_file `{}`: {e}", path.display()))?
            }
            (None, None) => {
                return Err(
                    "[fleet] needs `fleet_key` or `fleet_key_file` with the fleet's public key"
                        .into(),
                );
            }
            (Some(_), Some(_)) => return Err("set fleet_key or fleet_key_file, not both".into()),
        };
        let key_text = key_text.trim();
        let fleet_key = PublicKey::from_hex(key_text)
            .or_else(|_| PublicKey::from_file_str(key_text))
            .map_err(|e| format!("fleet key: {e}"))?;
        let device_id = self
            .device_id
            .or_else(hostname)
            .ok_or("[fleet] device_id is not set and there is no host name")?;
        let device_id = DeviceId::new(device_id).map_err(|e| format!("device_id: {e}"))?;
        if let Some(bad) = self
            .tags
            .iter()
            .find(|t| !outpost_proto::is_valid_device_id(t))
        {
            return Err(format!(
                "tag `{bad}` is not valid (same rules as device ids)"
            ));
        }
        let interval = self.telemetry_interval_ms.unwrap_or(60_000);
        if interval < 10 {
            return Err("telemetry_interval_ms must be at least 10".into());
        }
        let credentials = match (self.username, self.password_file) {
            (None, None) => None,
            (Some(user), Some(path)) => {
                let path = base.join(path);
                let password = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read password_file `{}`: {e}", path.display()))?;
                Some((user, password.trim().to_owned()))
            }
            _ => return Err("[fleet] username and password_file go together".into()),
        };
        // One CA file for the fleet: its broker (mqtts://) and its artifact server (https://).
        let ca_file = self.ca_file.map(|p| base.join(p));
        let roots = match &ca_file {
            Some(path) => outpost_tls::root_certificates(Some(path)).map_err(|e| e.to_string())?,
            None => outpost_tls::root_certificates(None).unwrap_or_default(),
        };
        let tls = if broker.tls() {
            Some(outpost_tls::client_config(ca_file.as_deref()).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Some(FleetConfig {
            credentials,
            tls,
            roots: std::sync::Arc::new(roots),
            broker,
            fleet_key,
            device_id,
            tags: self.tags,
            telemetry_interval: Duration::from_millis(interval),
            outbox_quota_bytes: self.outbox_quota_bytes.unwrap_or(16 << 20),
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn section(text: &str) -> Result<Option<FleetConfig>, String> {
        toml::from_str::<FleetSection>(text)
            .map_err(|e| e.to_string())?
            .validate(Path::new("/"))
    }

    #[test]
    fn fleet_section() {
        let key = outpost_bundle::SecretKey::from_seed(&[7; 32])
            .public()
            .to_hex();
        let text = format!(
            "broker = \"mqtt://127.0.0.1:4000\"\nfleet_key = \"{key}\"\ndevice_id = \"dev-1\"\ntags = [\"lab\"]"
        );
        let fleet = section(&text).unwrap().unwrap();
        assert_eq!(
            (fleet.broker.port(), fleet.device_id.as_str()),
            (4000, "dev-1")
        );
        assert_eq!(fleet.tags, ["lab"]);
        assert!(section(&text.replace("dev-1", "a/b")).is_err());
        assert!(section("broker = \"mqtt://h:1\"").is_err(), "no fleet key");
        assert!(section("").unwrap().is_none(), "no broker: stand-alone");
    }
}
