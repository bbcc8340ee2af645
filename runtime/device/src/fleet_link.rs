//! The device as the fleet agent sees it.

use std::collections::BTreeMap;

use outpost_agent::{DeviceControl, DeviceError, DeviceTelemetry, Installed};

use crate::device::Device;
use crate::state::InstalledRecord;

fn installed(r: InstalledRecord) -> Installed {
    Installed {
        name: r.name,
        version: r.version,
        digest: r.digest,
    }
}

impl DeviceControl for Device {
    fn active(&self) -> Result<BTreeMap<String, String>, DeviceError> {
        Ok(self
            .status()?
            .into_iter()
            .filter_map(|m| m.active.map(|v| (m.name, v)))
            .collect())
    }

    fn installed(&self) -> Result<Vec<Installed>, DeviceError> {
        Ok(Device::installed(self)?
            .into_iter()
            .map(installed)
            .collect())
    }

    fn activate(&self, model: &str, version: &str) -> Result<(), DeviceError> {
        Ok(Device::activate(self, model, version)?)
    }

    fn install_and_activate(&self, bundle: &[u8]) -> Result<Installed, DeviceError> {
        Ok(installed(Device::install_and_activate(self, bundle)?))
    }

    fn install(&self, bundle: &[u8]) -> Result<Installed, DeviceError> {
        Ok(installed(Device::install(self, bundle)?))
    }

    fn settle_policy(
        &self,
        model: &str,
        policy: Option<&serde_json::Value>,
    ) -> Result<bool, DeviceError> {
        let policy = policy
            .map(|p| {
                serde_json::from_value::<crate::policy::Policy>(p.clone())
                    .map_err(|e| format!("the desired state's traffic policy for {model}: {e}"))
            })
            .transpose()?;
        Ok(Device::settle_policy(self, model, policy)?)
    }

    fn policies(&self) -> Result<BTreeMap<String, String>, DeviceError> {
        Ok(self
            .status()?
            .into_iter()
            .filter_map(|m| m.policy.id().map(|id| (m.name, id.to_owned())))
            .collect())
    }

    fn telemetry(&self) -> DeviceTelemetry {
        DeviceTelemetry {
            disk_bytes: self.state().size_on_disk(),
            models: self.metrics.snapshot(),
            shadows: self.metrics.shadow_snapshot(),
            drift: self.metrics.drift.snapshot(),
            quality: self.metrics.feedback.snapshot(),
        }
    }
}
