//! A typed, blocking client of the fleet manager's REST API (`outpost_proto::rest`), for the
//! operator commands, the demo, the benches and the tests. Owns: requests, the bearer token,
//! turning error answers into [`ClientError`]. Never imports: the fleet server, the device
//! crates, or an async runtime.

use std::io::Read;
use std::time::Duration;

use outpost_proto::rest::{
    BundleRecord, DeployRequest, DeployResponse, DeploymentRecord, DeviceQuery, DeviceStatus,
    DeviceView, Enrolment, ErrorBody, FleetInfo, Forgotten, MAX_DEVICE_PAGE, NEXT_AFTER_HEADER,
    RecordQuery, Records, Revoked,
};
use serde::de::DeserializeOwned;

/// Largest answer read, in bytes.
const MAX_ANSWER: u64 = 256 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The fleet could not be reached (or the connection broke).
    #[error("cannot reach the fleet at {base}: {reason}")]
    Unreachable {
        /// The fleet's base URL.
        base: String,
        /// The transport's reason.
        reason: String,
    },
    /// The fleet answered with an error status.
    #[error("{what}: {message} (HTTP {status})")]
    Refused {
        /// The call, e.g. `POST /api/v1/deployments`.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The fleet's message.
        message: String,
    },
    /// The client's own TLS set-up failed (a CA file missing or holding no certificate).
    #[error("{0}")]
    Tls(String),
    /// The answer is not what the API promises.
    #[error("{what}: unexpected answer: {reason}")]
    Malformed {
        /// The call.
        what: String,
        /// Why it could not be read.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A fleet manager's API.
#[derive(Debug, Clone)]
pub struct FleetClient {
    base: String,
    token: Option<String>,
    http: ureq::Agent,
}

impl FleetClient {
    /// A client of the fleet at `base` (`http://127.0.0.1:7878`), sending `token` as a bearer
    /// token when given.
    /// An `https://` fleet's certificate is checked against the system's roots; see
    /// [`FleetClient::with_ca_file`] for a fleet with its own CA.
    pub fn new(base: &str, token: Option<String>) -> Self {
        let roots = if base.starts_with("https://") {
            outpost_tls::root_certificates(None).unwrap_or_default()
        } else {
            Vec::new()
        };
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: http_agent(&roots),
        }
    }

    /// The same client trusting `ca_file`'s certificates (or the system's) for an `https://`
    /// fleet.
    pub fn with_ca_file(mut self, ca_file: Option<&std::path::Path>) -> Result<Self> {
        let roots =
            outpost_tls::root_certificates(ca_file).map_err(|e| ClientError::Tls(e.to_string()))?;
        self.http = http_agent(&roots);
        Ok(self)
    }

    /// The fleet's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET /api/v1/fleet`.
    pub fn info(&self) -> Result<FleetInfo> {
        self.get("/api/v1/fleet")
    }

    /// `GET /api/v1/devices`: every device with its desired state, read a page of
    /// [`MAX_DEVICE_PAGE`] at a time (so no single answer holds a large registry).
    pub fn devices(&self) -> Result<Vec<DeviceView>> {
        self.devices_matching(&DeviceQuery::default())
    }

    /// Every device `query` selects (its `limit` and `after` are replaced), page by page.
    pub fn devices_matching(&self, query: &DeviceQuery) -> Result<Vec<DeviceView>> {
        let mut query = DeviceQuery {
            limit: Some(MAX_DEVICE_PAGE),
            after: None,
            ..query.clone()
        };
        let mut all = Vec::new();
        loop {
            let (page, next) = self.devices_page(&query)?;
            all.extend(page);
            match next {
                Some(after) => query.after = Some(after),
                None => return Ok(all),
            }
        }
    }

    /// One page of `GET /api/v1/devices?...`: the devices, and the `after` of the next page
    /// when there is one.
    pub fn devices_page(&self, query: &DeviceQuery) -> Result<(Vec<DeviceView>, Option<String>)> {
        let path = device_path(query);
        let what = format!("GET {path}");
        let response = self
            .authorized(self.http.get(&self.url(&path)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        let next = response
            .headers()
            .get(NEXT_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let page = self.answer(response, &what)?;
        Ok((page, next))
    }

    /// `GET /api/v1/devices/{id}`.
    pub fn device(&self, id: &str) -> Result<DeviceView> {
        self.get(&format!("/api/v1/devices/{id}"))
    }

    /// `DELETE /api/v1/devices/{id}`: forgets a decommissioned device.
    pub fn forget(&self, id: &str) -> Result<Forgotten> {
        self.delete(&format!("/api/v1/devices/{id}"))
    }

    /// `POST /api/v1/devices/{id}/enrolment`: issues the device new broker credentials (the
    /// password is in this answer only; earlier credentials stop working).
    pub fn enroll(&self, id: &str) -> Result<Enrolment> {
        let path = format!("/api/v1/devices/{id}/enrolment");
        let response = self
            .authorized(self.http.post(&self.url(&path)))
            .send_empty()
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, &format!("POST {path}"))
    }

    /// `DELETE /api/v1/devices/{id}/enrolment`: ends the device's credentials.
    pub fn revoke(&self, id: &str) -> Result<Revoked> {
        self.delete(&format!("/api/v1/devices/{id}/enrolment"))
    }

    /// `GET /api/v1/bundles`.
    pub fn bundles(&self) -> Result<Vec<BundleRecord>> {
        self.get("/api/v1/bundles")
    }

    /// `POST /api/v1/bundles`: uploads a signed bundle of `len` bytes read from `body`.
    pub fn push(&self, body: impl Read, len: u64) -> Result<BundleRecord> {
        let what = "POST /api/v1/bundles";
        let request = self
            .authorized(self.http.post(&self.url("/api/v1/bundles")))
            .header("Content-Type", "application/vnd.outpost.bundle")
            .header("Content-Length", &len.to_string());
        let mut body = body;
        let response = request
            .send(ureq::SendBody::from_reader(&mut body))
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, what)
    }

    /// `DELETE /api/v1/bundles/{model}/{version}`.
    pub fn remove_bundle(&self, model: &str, version: &str) -> Result<BundleRecord> {
        self.delete(&format!("/api/v1/bundles/{model}/{version}"))
    }

    /// `POST /api/v1/deployments`.
    pub fn deploy(&self, request: &DeployRequest) -> Result<DeployResponse> {
        let what = "POST /api/v1/deployments";
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Malformed {
            what: what.into(),
            reason: e.to_string(),
        })?;
        let response = self
            .authorized(self.http.post(&self.url("/api/v1/deployments")))
            .header("Content-Type", "application/json")
            .send(body.as_slice())
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, what)
    }

    /// `GET /api/v1/deployments`.
    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.get("/api/v1/deployments")
    }

    /// `POST /api/v1/rollouts`: starts a staged rollout.
    pub fn start_rollout(
        &self,
        request: &outpost_proto::rest::RolloutRequest,
    ) -> Result<outpost_proto::rest::RolloutRecord> {
        self.post_json("/api/v1/rollouts", request)
    }

    /// `GET /api/v1/rollouts`.
    pub fn rollouts(&self) -> Result<Vec<outpost_proto::rest::RolloutRecord>> {
        self.get("/api/v1/rollouts")
    }

    /// `GET /api/v1/rollouts/{id}`.
    pub fn rollout(&self, id: u64) -> Result<outpost_proto::rest::RolloutRecord> {
        self.get(&format!("/api/v1/rollouts/{id}"))
    }

    /// `POST /api/v1/rollouts/{id}/{op}`: `pause`, `resume`, `promote` or `abort`.
    pub fn rollout_op(&self, id: u64, op: &str) -> Result<outpost_proto::rest::RolloutRecord> {
        self.post_json(
            &format!("/api/v1/rollouts/{id}/{op}"),
            &serde_json::json!({}),
        )
    }

    fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T> {
        let what = format!("POST {path}");
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Malformed {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        let response = self
            .authorized(self.http.post(&self.url(path)))
            .header("Content-Type", "application/json")
            .send(body.as_slice())
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, &what)
    }

    /// `GET /api/v1/telemetry`.
    pub fn telemetry(&self, query: &RecordQuery) -> Result<Records> {
        self.get(&format!("/api/v1/telemetry{}", query_string(query)))
    }

    /// `GET /api/v1/events`.
    pub fn events(&self, query: &RecordQuery) -> Result<Records> {
        self.get(&format!("/api/v1/events{}", query_string(query)))
    }

    /// `GET /api/v1/drift`: fleet-wide drift of a model version against its baseline.
    pub fn drift(
        &self,
        query: &outpost_proto::rest::MonitorQuery,
    ) -> Result<outpost_proto::rest::FleetDrift> {
        self.get(&monitor_path("drift", query))
    }

    /// `GET /api/v1/quality`: fleet-wide accuracy or MAE of a model version from feedback.
    pub fn quality(
        &self,
        query: &outpost_proto::rest::MonitorQuery,
    ) -> Result<outpost_proto::rest::FleetQuality> {
        self.get(&monitor_path("quality", query))
    }

    /// `GET /api/v1/compare`: every version of a model its devices served, by role.
    pub fn compare(
        &self,
        query: &outpost_proto::rest::CompareQuery,
    ) -> Result<outpost_proto::rest::FleetComparison> {
        let mut path = format!("/api/v1/compare?model={}", encode(&query.model));
        if let Some(tag) = &query.tag {
            path.push_str(&format!("&tag={}", encode(tag)));
        }
        if let Some(w) = query.window {
            path.push_str(&format!("&window={w}"));
        }
        self.get(&path)
    }

    /// `GET /api/v1/rules`: every rule with its state per model version.
    pub fn rules(&self) -> Result<Vec<outpost_proto::rest::RuleView>> {
        self.get("/api/v1/rules")
    }

    /// `POST /api/v1/rules/{name}/test`: measures a rule now without firing it.
    pub fn test_rule(&self, name: &str) -> Result<Vec<outpost_proto::rest::RuleState>> {
        self.post_json(
            &format!("/api/v1/rules/{}/test", encode(name)),
            &serde_json::json!({}),
        )
    }

    /// `GET /api/v1/firings?limit=N`: the newest rule firings with their delivery attempts.
    pub fn firings(&self, limit: usize) -> Result<Vec<outpost_proto::rest::FiringRecord>> {
        self.get(&format!("/api/v1/firings?limit={limit}"))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("Authorization", &format!("Bearer {t}")),
            None => request,
        }
    }

    fn unreachable(&self, e: ureq::Error) -> ClientError {
        ClientError::Unreachable {
            base: self.base.clone(),
            reason: e.to_string(),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self
            .authorized(self.http.get(&self.url(path)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, &format!("GET {path}"))
    }

    fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self
            .authorized(self.http.delete(&self.url(path)))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.answer(response, &format!("DELETE {path}"))
    }

    fn answer<T: DeserializeOwned>(
        &self,
        response: ureq::http::Response<ureq::Body>,
        what: &str,
    ) -> Result<T> {
        let status = response.status();
        let text = response
            .into_body()
            .into_with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or(text);
            return Err(ClientError::Refused {
                what: what.to_owned(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Malformed {
            what: what.to_owned(),
            reason: e.to_string(),
        })
    }
}

/// The agent every call uses: HTTP errors as statuses, a connect timeout, TLS trusting `roots`.
fn http_agent(roots: &[outpost_tls::Certificate<'static>]) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .tls_config(outpost_tls::ureq_tls_config(roots))
        .build()
        .new_agent()
}

/// `/api/v1/devices[?…]` for `query`.
fn device_path(query: &DeviceQuery) -> String {
    let mut params = Vec::new();
    if let Some(limit) = query.limit {
        params.push(format!("limit={limit}"));
    }
    for (name, value) in [
        ("after", &query.after),
        ("tag", &query.tag),
        ("model", &query.model),
        ("version", &query.version),
    ] {
        if let Some(value) = value {
            params.push(format!("{name}={}", encode(value)));
        }
    }
    if let Some(status) = query.status {
        params.push(format!(
            "status={}",
            match status {
                DeviceStatus::Online => "online",
                DeviceStatus::Offline => "offline",
            }
        ));
    }
    if let Some(in_sync) = query.in_sync {
        params.push(format!("in_sync={in_sync}"));
    }
    if params.is_empty() {
        "/api/v1/devices".to_owned()
    } else {
        format!("/api/v1/devices?{}", params.join("&"))
    }
}

/// `/api/v1/{what}?model=…&version=…[&tag=…][&window=…]`.
fn monitor_path(what: &str, query: &outpost_proto::rest::MonitorQuery) -> String {
    let mut path = format!(
        "/api/v1/{what}?model={}&version={}",
        encode(&query.model),
        encode(&query.version)
    );
    if let Some(tag) = &query.tag {
        path.push_str(&format!("&tag={}", encode(tag)));
    }
    if let Some(w) = query.window {
        path.push_str(&format!("&window={w}"));
    }
    path
}

/// Percent-encodes everything but unreserved characters, for a query value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn query_string(q: &RecordQuery) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &q.device {
        parts.push(format!("device={d}"));
    }
    if let Some(a) = q.after {
        parts.push(format!("after={a}"));
    }
    if let Some(l) = q.limit {
        parts.push(format!("limit={l}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}
