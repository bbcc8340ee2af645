//! Staged rollouts: a version deployed to a target stage by stage, each stage gated on the
//! telemetry of the devices it reached, rolled back where it went when a gate fails.
//!
//! The state machine (`progressing stage N` → `paused` → `succeeded` | `aborted` → `rolled
//! back`) is stored after every decision, so a fleet killed at any point carries on from the
//! last one; the driver ([`Fleet::tick_rollouts`], every second on the primary replica) takes
//! at most one decision per rollout per tick. Within a stage: deploy to the stage's new
//! devices, wait until each reports the version active, soak, then check the gates. A gate
//! without enough data waits; a stage that cannot gather it before its deadline pauses the
//! rollout and says why. A device that rolls back a canary of the version, or gives up
//! deploying it, fails the stage at once.

use std::collections::BTreeMap;

use outpost_proto::rest::{
    DeployRequest, Gate, GateMetric, HistoryLine, RolloutRecord, RolloutRequest, RolloutState,
};
use outpost_proto::{DeviceId, ModelSeries, TelemetrySample};

use crate::domain::Fleet;
use crate::error::{FleetError, Result};
use crate::store::{Stream, now_secs};

/// The most stages and gates one rollout may have.
pub const MAX_STAGES: usize = 16;

/// The longest soak, deadline or gate window: 30 days.
pub const MAX_SECONDS: u64 = 30 * 86_400;

/// Error kinds a version causes (a client's bad request or a busy device is not its fault).
pub(crate) const COUNTED_ERRORS: [&str; 4] = ["internal", "deadline", "memory", "trap"];

/// Floors under a relative gate's baseline: an error rate of 0 or a latency in the lowest
/// bucket would make every ratio fail.
const ERROR_RATE_FLOOR: f64 = 0.001;
const LATENCY_FLOOR_S: f64 = 0.0001;

/// What an operator can do to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Stop where it is.
    Pause,
    /// Carry on from where it stopped.
    Resume,
    /// Skip the remaining gates: deploy to the whole target now.
    Promote,
    /// Stop and roll back every device it reached.
    Abort,
}

impl Op {
    /// Parses `pause`, `resume`, `promote` or `abort`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Op::Pause,
            "resume" => Op::Resume,
            "promote" => Op::Promote,
            "abort" => Op::Abort,
            _ => return None,
        })
    }
}

/// A gate's verdict.
enum Verdict {
    Pass(String),
    Fail(String),
    Waiting(String),
}

/// One version's counters over a window, summed over devices.
#[derive(Debug, Default, Clone)]
pub(crate) struct Window {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// Cumulative counts per bucket bound.
    pub(crate) buckets: BTreeMap<u64, u64>,
    pub(crate) devices: u64,
}

impl Window {
    pub(crate) fn value(&self, metric: GateMetric) -> f64 {
        match metric {
            GateMetric::ErrorRate => self.errors as f64 / self.requests.max(1) as f64,
            GateMetric::P95Latency => {
                let want = (self.requests as f64 * 0.95).ceil() as u64;
                self.buckets
                    .iter()
                    .find(|(_, n)| **n >= want)
                    .map_or(10.0, |(bound, _)| f64::from_bits(*bound))
            }
        }
    }
}

/// A series' counters: requests, counted errors, cumulative buckets.
pub(crate) fn counters(series: &ModelSeries) -> (u64, u64, Vec<(f64, u64)>) {
    let errors = series
        .errors
        .iter()
        .filter(|(k, _)| COUNTED_ERRORS.contains(&k.as_str()))
        .map(|(_, n)| n)
        .sum();
    (series.requests, errors, series.latency_buckets.clone())
}

/// `version`'s counters in one telemetry body (its roles summed, a shadow's left out).
fn sample_of(body: &serde_json::Value, model: &str, version: &str) -> (u64, u64, Vec<(f64, u64)>) {
    let Ok(sample) = serde_json::from_value::<TelemetrySample>(body.clone()) else {
        return (0, 0, Vec::new());
    };
    let mut total = (0u64, 0u64, Vec::<(f64, u64)>::new());
    for s in sample
        .models
        .iter()
        .filter(|s| s.model == model && s.version == version && s.role != "shadow")
    {
        let (r, e, b) = counters(s);
        total.0 += r;
        total.1 += e;
        if total.2.is_empty() {
            total.2 = b;
        } else {
            for (acc, (_, n)) in total.2.iter_mut().zip(b) {
                acc.1 += n;
            }
        }
    }
    total
}

/// Seconds the device had been up when it took the record (0 when unknown).
fn uptime_of(body: &serde_json::Value) -> u64 {
    body["uptime_s"].as_u64().unwrap_or(0)
}

fn history(r: &mut RolloutRecord, text: String) {
    tracing::info!(rollout = r.id, "{text}");
    r.history.push(HistoryLine {
        time: now_secs(),
        text,
    });
}

fn validate(request: &RolloutRequest) -> Result<()> {
    let bad = |m: String| Err(FleetError::BadRequest(m));
    if request.stages.is_empty() || request.stages.len() > MAX_STAGES {
        return bad(format!(
            "a rollout has 1 to {MAX_STAGES} stages, not {}",
            request.stages.len()
        ));
    }
    if request.gates.len() > MAX_STAGES {
        return bad(format!("a rollout has at most {MAX_STAGES} gates"));
    }
    for stage in &request.stages {
        match stage.reach {
            outpost_proto::rest::Reach::Count(0) => {
                return bad("a stage reaches at least one device".into());
            }
            outpost_proto::rest::Reach::Percent(p) if !(p > 0.0 && p <= 100.0) => {
                return bad(format!(
                    "a stage's percent is above 0 and at most 100, not {p}"
                ));
            }
            _ => {}
        }
    }
    for gate in &request.gates {
        if !(gate.max.is_finite() && gate.max >= 0.0) {
            return bad(format!(
                "gate {}: max is a finite number of at least 0",
                gate.metric
            ));
        }
        if gate.window_s == 0 || gate.min_requests == 0 || gate.min_devices == 0 {
            return bad(format!(
                "gate {}: window_s, min_requests and min_devices are at least 1 (no data is not a pass)",
                gate.metric
            ));
        }
    }
    if request
        .stages
        .iter()
        .any(|s| s.canary.as_ref().is_some_and(|c| !c.is_object()))
    {
        return bad(
            "a stage's canary is an object: the device's canary policy without id and candidate"
                .into(),
        );
    }
    if request.deadline_s > MAX_SECONDS
        || request.stages.iter().any(|s| s.soak_s > MAX_SECONDS)
        || request.gates.iter().any(|g| g.window_s > MAX_SECONDS)
    {
        return bad(format!(
            "soaks, deadlines and gate windows are at most {MAX_SECONDS} s (30 days)"
        ));
    }
    if request.deadline_s == 0 {
        return bad("deadline_s is at least 1".into());
    }
    Ok(())
}

impl Fleet {
    /// Starts a rollout: checks it, resolves its target (in the order stages take it) and each
    /// device's fallback version, stores it and deploys its first stage.
    pub fn start_rollout(&self, request: RolloutRequest) -> Result<RolloutRecord> {
        self.owns_deployments()?;
        validate(&request)?;
        let _guard = self.rolling.lock().map_err(|_| poisoned())?;
        if self
            .store
            .bundle(&request.model, &request.version)?
            .is_none()
        {
            return Err(FleetError::NotFound(format!(
                "bundle {} {} (push it first)",
                request.model, request.version
            )));
        }
        if let Some(busy) = self
            .store
            .rollouts()?
            .into_iter()
            .find(|r| r.request.model == request.model && !r.state.is_final())
        {
            return Err(FleetError::BadRequest(format!(
                "rollout {} of {} is not finished ({:?}): abort it or wait for it",
                busy.id, request.model, busy.state
            )));
        }
        let mut fallback = BTreeMap::new();
        let mut targets = Vec::new();
        for device in self.targets(&request.devices, request.tag.as_deref(), request.all)? {
            let previous = self
                .store
                .desired(device.as_str())?
                .and_then(|d| d.deployments.into_iter().find(|x| x.model == request.model));
            match previous {
                // Already there: nothing to roll out, nothing to roll back.
                Some(p) if p.version == request.version && p.policy.is_none() => continue,
                Some(p) if p.version != request.version => {
                    fallback.insert(device.to_string(), p.version);
                }
                _ => {}
            }
            targets.push(device);
        }
        if targets.is_empty() {
            return Err(FleetError::BadRequest(format!(
                "every target device runs {} {} already",
                request.model, request.version
            )));
        }
        let mut record = RolloutRecord {
            id: self.store.next_rollout_id()?,
            targets: targets.iter().map(ToString::to_string).collect(),
            fallback,
            state: RolloutState::Progressing { stage: 0 },
            reached: Vec::new(),
            canaried: Vec::new(),
            restored: Vec::new(),
            resumed_at: 0,
            stage_started: 0,
            stage_applied: 0,
            history: Vec::new(),
            created_at: now_secs(),
            request,
        };
        let text = format!(
            "started: {} {} to {} device(s) in {} stage(s), {} gate(s)",
            record.request.model,
            record.request.version,
            record.targets.len(),
            record.request.stages.len(),
            record.request.gates.len()
        );
        history(&mut record, text);
        self.store.put_rollout(&record)?;
        self.step(&mut record)?;
        self.store.put_rollout(&record)?;
        Ok(record)
    }

    /// Refuses a deployment of `model` by hand while a rollout of it is unfinished: the
    /// rollout's later stages and its rollback would undo it.
    pub fn refuse_during_rollout(&self, model: &str) -> Result<()> {
        if let Some(r) = self
            .store
            .rollouts()?
            .into_iter()
            .find(|r| r.request.model == model && !r.state.is_final())
        {
            return Err(FleetError::BadRequest(format!(
                "rollout {} of {model} is not finished: wait for it, or `outpost fleet rollout abort {}` (or promote) first",
                r.id, r.id
            )));
        }
        Ok(())
    }

    /// Whether `model` `version` is the fallback of an unfinished rollout.
    pub(crate) fn is_fallback(&self, model: &str, version: &str) -> Result<Option<u64>> {
        Ok(self
            .store
            .rollouts()?
            .into_iter()
            .find(|r| {
                r.request.model == model
                    && !r.state.is_final()
                    && r.fallback.values().any(|v| v == version)
            })
            .map(|r| r.id))
    }

    /// One rollout.
    pub fn rollout(&self, id: u64) -> Result<RolloutRecord> {
        self.store
            .rollout(id)?
            .ok_or_else(|| FleetError::NotFound(format!("rollout {id}")))
    }

    /// Pauses, resumes, promotes or aborts a rollout.
    pub fn rollout_op(&self, id: u64, op: Op) -> Result<RolloutRecord> {
        self.owns_deployments()?;
        let _guard = self.rolling.lock().map_err(|_| poisoned())?;
        let mut r = self.rollout(id)?;
        let now = now_secs();
        match (op, r.state.clone()) {
            (Op::Pause, RolloutState::Progressing { stage }) => {
                r.state = RolloutState::Paused {
                    stage,
                    reason: "paused by an operator".into(),
                };
                history(
                    &mut r,
                    format!("stage {}: paused by an operator", stage + 1),
                );
            }
            (Op::Resume, RolloutState::Paused { stage, .. }) => {
                r.state = RolloutState::Progressing { stage };
                r.resumed_at = now;
                // The soak and the deadline start again from now.
                if r.stage_applied > 0 {
                    r.stage_applied = now;
                }
                if r.stage_started > 0 {
                    r.stage_started = now;
                }
                history(
                    &mut r,
                    format!("stage {}: resumed by an operator", stage + 1),
                );
            }
            (Op::Promote, RolloutState::Progressing { .. } | RolloutState::Paused { .. }) => {
                let mut rest: Vec<String> = r.targets[r.reached.len()..].to_vec();
                rest.append(&mut r.canaried);
                self.deploy_to(&r, &rest, None)?;
                for d in rest {
                    if !r.reached.contains(&d) {
                        r.reached.push(d);
                    }
                }
                r.state = RolloutState::Succeeded;
                let text = format!(
                    "promoted by an operator, remaining gates skipped: {} on all {} device(s)",
                    r.request.version,
                    r.targets.len()
                );
                history(&mut r, text);
            }
            (Op::Abort, RolloutState::Progressing { .. } | RolloutState::Paused { .. }) => {
                self.abort(&mut r, "aborted by an operator".into());
                // Stored before the rollback: if it cannot finish now, the driver carries on.
                self.store.put_rollout(&r)?;
                if let Err(e) = self.step(&mut r) {
                    tracing::warn!(rollout = id, error = %e, "rollback not finished; the driver tries again");
                }
            }
            // An abort again retries a rollback that could not finish.
            (Op::Abort, RolloutState::Aborted { .. }) => {
                self.step(&mut r)?;
            }
            (op, state) => {
                let what = match state {
                    RolloutState::Progressing { .. } => "progressing",
                    RolloutState::Paused { .. } => "paused",
                    RolloutState::Succeeded => "finished (succeeded)",
                    RolloutState::Aborted { .. } => "aborted, rolling back",
                    RolloutState::RolledBack { .. } => "finished (rolled back)",
                };
                let hint = match op {
                    Op::Resume => "only a paused rollout resumes",
                    Op::Pause => "only a progressing rollout pauses",
                    Op::Promote | Op::Abort => "it is finished; start a new rollout",
                };
                return Err(FleetError::BadRequest(format!(
                    "rollout {id} is {what}: cannot {} it ({hint})",
                    format!("{op:?}").to_lowercase()
                )));
            }
        }
        self.store.put_rollout(&r)?;
        Ok(r)
    }

    /// Takes at most one decision on every unfinished rollout. The driver calls it every second.
    pub fn tick_rollouts(&self) {
        if !self.leads() {
            return;
        }
        let Ok(_guard) = self.rolling.lock() else {
            return;
        };
        let all = match self.store.rollouts() {
            Ok(all) => all,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the rollouts");
                return;
            }
        };
        for mut r in all.into_iter().filter(|r| !r.state.is_final()) {
            let before = r.clone();
            if let Err(e) = self.step(&mut r) {
                tracing::warn!(rollout = r.id, error = %e, "rollout step failed; trying again");
            }
            if r != before
                && let Err(e) = self.store.put_rollout(&r)
            {
                tracing::error!(rollout = r.id, error = %e, "cannot store the rollout");
            }
        }
    }

    fn step(&self, r: &mut RolloutRecord) -> Result<()> {
        match r.state.clone() {
            RolloutState::Progressing { stage } => self.progress(r, stage),
            RolloutState::Aborted { reason } => self.roll_back(r, reason),
            _ => Ok(()),
        }
    }

    fn deploy_to(
        &self,
        r: &RolloutRecord,
        devices: &[String],
        policy: Option<serde_json::Value>,
    ) -> Result<()> {
        if devices.is_empty() {
            return Ok(());
        }
        self.deploy(&DeployRequest {
            model: r.request.model.clone(),
            version: r.request.version.clone(),
            devices: devices.to_vec(),
            tag: None,
            all: false,
            policy,
        })
        .map(|_| ())
    }

    /// Activates the version on the devices running it as a canary.
    fn activate_canaries(&self, r: &mut RolloutRecord, stage: usize) -> Result<()> {
        if r.canaried.is_empty() {
            return Ok(());
        }
        let canaries = r.canaried.clone();
        self.deploy_to(r, &canaries, None)?;
        r.canaried.clear();
        let text = format!(
            "stage {}: activated {} on its canaries ({})",
            stage + 1,
            r.request.version,
            canaries.join(", ")
        );
        history(r, text);
        Ok(())
    }

    /// The device policy of a stage's canary: the stage's canary with the fleet's id and
    /// candidate.
    fn canary_policy(r: &RolloutRecord, stage: usize) -> Option<serde_json::Value> {
        let mut canary = r.request.stages[stage].canary.clone()?;
        let object = canary.as_object_mut()?;
        object.insert(
            "id".into(),
            format!("rollout-{}-{}", r.id, stage + 1).into(),
        );
        object.insert("candidate".into(), r.request.version.clone().into());
        Some(serde_json::json!({ "canary": canary }))
    }

    fn pause(&self, r: &mut RolloutRecord, stage: usize, reason: String) {
        history(r, format!("stage {}: paused: {reason}", stage + 1));
        r.state = RolloutState::Paused { stage, reason };
    }

    /// A failed stage: aborted (and rolled back), or paused when the rollout says so.
    fn fail(&self, r: &mut RolloutRecord, stage: usize, why: String) {
        match r.request.on_failure {
            outpost_proto::rest::OnFailure::Rollback => {
                self.abort(r, format!("stage {}: {why}", stage + 1));
            }
            outpost_proto::rest::OnFailure::Pause => {
                self.pause(r, stage, format!("failed: {why}"));
            }
        }
    }

    fn abort(&self, r: &mut RolloutRecord, reason: String) {
        history(r, format!("aborted: {reason}"));
        r.state = RolloutState::Aborted { reason };
    }

    fn progress(&self, r: &mut RolloutRecord, stage: usize) -> Result<()> {
        let now = now_secs();
        let spec = r.request.stages[stage].clone();
        let want = spec.reach.of(r.targets.len()).max(r.reached.len());
        if r.stage_started == 0 {
            self.activate_canaries(r, stage)?;
            let new: Vec<String> = r.targets[r.reached.len()..want].to_vec();
            let policy = Self::canary_policy(r, stage);
            let how = match &policy {
                Some(p) => format!(
                    " as a canary ({}% of their traffic)",
                    p["canary"]["percent"]
                ),
                None => String::new(),
            };
            // A canary needs a version to compare with: a device without one gets the version
            // activated.
            let (canaries, plain): (Vec<String>, Vec<String>) = match &policy {
                Some(_) => new
                    .iter()
                    .cloned()
                    .partition(|d| r.fallback.contains_key(d)),
                None => (Vec::new(), new.clone()),
            };
            self.deploy_to(r, &canaries, policy.clone())?;
            self.deploy_to(r, &plain, None)?;
            r.canaried = canaries;
            r.reached.extend(new.iter().cloned());
            r.stage_started = now;
            r.stage_applied = 0;
            let text = format!(
                "stage {}: deployed {}{how} to {} ({} of {} devices)",
                stage + 1,
                r.request.version,
                if new.is_empty() {
                    "no new device".to_owned()
                } else {
                    new.join(", ")
                },
                r.reached.len(),
                r.targets.len()
            );
            history(r, text);
            return Ok(());
        }
        if let Some(why) = self.device_failure(r)? {
            self.fail(r, stage, why);
            return Ok(());
        }
        // A canary stage soaks at least its device window, so each device has had the chance
        // to judge its canary before the stage passes.
        let soak = match &spec.canary {
            Some(c) if !r.canaried.is_empty() => spec
                .soak_s
                .max(c["window_s"].as_u64().unwrap_or(600).min(MAX_SECONDS)),
            _ => spec.soak_s,
        };
        let deadline = r.request.deadline_s;
        if r.stage_applied == 0 {
            let mut pending = Vec::new();
            let canary_id = format!("rollout-{}-{}", r.id, stage + 1);
            for d in &r.reached {
                let reported = self.store.device(d)?.and_then(|rec| rec.reported);
                let active = reported
                    .as_ref()
                    .and_then(|rep| rep.active.get(&r.request.model).cloned());
                let canary_on = r.canaried.contains(d)
                    && reported
                        .as_ref()
                        .is_some_and(|rep| rep.policies.get(&r.request.model) == Some(&canary_id));
                if active.as_deref() != Some(r.request.version.as_str()) && !canary_on {
                    pending.push(d.clone());
                }
            }
            if pending.is_empty() {
                r.stage_applied = now;
                history(
                    r,
                    format!(
                        "stage {}: active on every device it reached; soaking {soak} s",
                        stage + 1,
                    ),
                );
            } else if now > r.stage_started.saturating_add(deadline) {
                let reason = format!(
                    "{} of {} device(s) have not activated {} after {deadline} s ({})",
                    pending.len(),
                    r.reached.len(),
                    r.request.version,
                    pending.join(", ")
                );
                self.pause(r, stage, reason);
            }
            return Ok(());
        }
        if now < r.stage_applied.saturating_add(soak) {
            return Ok(());
        }
        let mut passed = Vec::new();
        for gate in &r.request.gates {
            match self.evaluate(r, gate, now)? {
                Verdict::Pass(text) => passed.push(text),
                Verdict::Fail(text) => {
                    self.fail(r, stage, format!("gate {text}"));
                    return Ok(());
                }
                Verdict::Waiting(text) => {
                    if now
                        > r.stage_applied
                            .saturating_add(soak)
                            .saturating_add(deadline)
                    {
                        self.pause(
                            r,
                            stage,
                            format!("gate {text} after {deadline} s: no data is not a pass"),
                        );
                    }
                    return Ok(());
                }
            }
        }
        for text in passed {
            history(r, format!("stage {}: gate passed: {text}", stage + 1));
        }
        if stage + 1 == r.request.stages.len() {
            self.activate_canaries(r, stage)?;
            r.state = RolloutState::Succeeded;
            let text = format!(
                "succeeded: {} on {} of {} device(s)",
                r.request.version,
                r.reached.len(),
                r.targets.len()
            );
            history(r, text);
        } else {
            r.state = RolloutState::Progressing { stage: stage + 1 };
            r.stage_started = 0;
            r.stage_applied = 0;
        }
        Ok(())
    }

    /// A reason to fail the stage that a device reported: it rolled back a canary of the
    /// version, or gave up deploying it.
    fn device_failure(&self, r: &RolloutRecord) -> Result<Option<String>> {
        for d in &r.reached {
            for e in self.store.recent_records(
                Stream::Events,
                d,
                r.created_at.max(r.resumed_at),
                10_000,
            )? {
                let b = &e.record.body;
                let ours = b["model"] == r.request.model.as_str();
                if ours
                    && b["event"] == "canary_rolled_back"
                    && b["candidate"] == r.request.version.as_str()
                {
                    return Ok(Some(format!(
                        "{d} rolled back its canary of {}: {}",
                        r.request.version,
                        b["reason"].as_str().unwrap_or("(no reason)")
                    )));
                }
                if ours
                    && b["event"] == "deployment_failed"
                    && b["version"] == r.request.version.as_str()
                    && b["will_retry"] == false
                {
                    return Ok(Some(format!(
                        "{d} cannot deploy {}: {}",
                        r.request.version,
                        b["error"].as_str().unwrap_or("(no error)")
                    )));
                }
            }
        }
        Ok(None)
    }

    /// `version`'s counters on `devices` (each with its own version when `versions` gives
    /// one) over [`from`, `to`], from the first and last telemetry record each device sent in it.
    fn window(
        &self,
        devices: &[String],
        version_of: impl Fn(&str) -> Option<String>,
        from: u64,
        to: u64,
        model: &str,
    ) -> Result<Window> {
        let mut w = Window::default();
        for d in devices {
            let Some(version) = version_of(d) else {
                continue;
            };
            let records: Vec<_> = self
                .store
                .recent_records(Stream::Telemetry, d, from, 100_000)?
                .into_iter()
                .filter(|r| r.record.time <= to)
                .collect();
            let (Some(first), Some(last)) = (records.first(), records.last()) else {
                continue;
            };
            if records.len() < 2 {
                continue;
            }
            let a = sample_of(&first.record.body, model, &version);
            let b = sample_of(&last.record.body, model, &version);
            // Counters fall back to zero when a device restarts (its uptime goes down): then
            // the last record is all the window can say.
            let restarted =
                uptime_of(&last.record.body) < uptime_of(&first.record.body) || b.0 < a.0;
            let base = if restarted { (0, 0, Vec::new()) } else { a };
            let requests = b.0 - base.0;
            if requests == 0 {
                continue;
            }
            w.devices += 1;
            w.requests += requests;
            w.errors += b.1.saturating_sub(base.1);
            for (i, (bound, n)) in b.2.iter().enumerate() {
                let before = base.2.get(i).map_or(0, |x| x.1);
                *w.buckets.entry(bound.to_bits()).or_default() += n.saturating_sub(before);
            }
        }
        Ok(w)
    }

    fn evaluate(&self, r: &RolloutRecord, gate: &Gate, now: u64) -> Result<Verdict> {
        let model = r.request.model.as_str();
        let version = r.request.version.clone();
        let from = now.saturating_sub(gate.window_s).max(r.stage_applied);
        let w = self.window(&r.reached, |_| Some(version.clone()), from, now, model)?;
        let name = gate.metric;
        if w.requests < gate.min_requests || w.devices < gate.min_devices {
            return Ok(Verdict::Waiting(format!(
                "{name}: {} of {} requests from {} of {} device(s) so far",
                w.requests, gate.min_requests, w.devices, gate.min_devices
            )));
        }
        let value = w.value(name);
        let (limit, against) = if gate.relative {
            // The replaced version on every target (each device its own), over the window
            // before this stage deployed: what the version is measured against.
            let end = r.stage_started;
            let base = self.window(
                &r.targets,
                |d| r.fallback.get(d).cloned(),
                end.saturating_sub(gate.window_s),
                end,
                model,
            )?;
            if base.requests < gate.min_requests {
                return Ok(Verdict::Waiting(format!(
                    "{name}: the replaced version served {} of {} requests on the target in the {} s before the stage",
                    base.requests, gate.min_requests, gate.window_s
                )));
            }
            let floor = match name {
                GateMetric::ErrorRate => ERROR_RATE_FLOOR,
                GateMetric::P95Latency => LATENCY_FLOOR_S,
            };
            let b = base.value(name).max(floor);
            (
                gate.max * b,
                format!(" ({}× the replaced version's {b:.4})", gate.max),
            )
        } else {
            (gate.max, String::new())
        };
        let text = format!(
            "{name} {value:.4} against at most {limit:.4}{against}, over {} requests from {} device(s)",
            w.requests, w.devices
        );
        Ok(if value <= limit {
            Verdict::Pass(text)
        } else {
            Verdict::Fail(text)
        })
    }

    /// Gives every device the rollout reached its fallback version (or, without one, takes
    /// the model out of its desired state), then marks the rollout rolled back.
    fn roll_back(&self, r: &mut RolloutRecord, reason: String) -> Result<()> {
        // Group by fallback version, leaving out the devices an earlier attempt restored: a
        // rollback that fails part-way (a fallback bundle gone, say) carries on from there.
        let mut by_version: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        for d in r.reached.iter().filter(|d| !r.restored.contains(d)) {
            by_version
                .entry(r.fallback.get(d).cloned())
                .or_default()
                .push(d.clone());
        }
        if r.reached.is_empty() {
            history(r, "rolled back: no device was reached".to_owned());
        }
        for (version, devices) in by_version {
            let text = match &version {
                Some(v) => {
                    self.deploy(&DeployRequest {
                        model: r.request.model.clone(),
                        version: v.clone(),
                        devices: devices.clone(),
                        tag: None,
                        all: false,
                        policy: None,
                    })?;
                    format!("rolled back: {} to {v}", devices.join(", "))
                }
                None => {
                    for d in &devices {
                        let id = DeviceId::new(d.as_str())
                            .map_err(|e| FleetError::BadRequest(e.to_string()))?;
                        let model = r.request.model.clone();
                        self.set_desired(&id, move |mut deployments| {
                            deployments.retain(|x| x.model != model);
                            deployments
                        })?;
                    }
                    format!(
                        "rolled back: {}: {} taken out of the desired state (no previous version)",
                        devices.join(", "),
                        r.request.model
                    )
                }
            };
            r.restored.extend(devices);
            history(r, text);
        }
        r.state = RolloutState::RolledBack { reason };
        Ok(())
    }
}

fn poisoned() -> FleetError {
    FleetError::Corrupt("the rollout lock was poisoned".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use outpost_proto::rest::Reach;

    #[test]
    fn stages_reach_at_least_one_device_and_never_more_than_the_target() {
        assert_eq!(Reach::Count(1).of(5), 1);
        assert_eq!(Reach::Percent(40.0).of(5), 2);
        assert_eq!(Reach::Percent(10.0).of(5), 1);
        assert_eq!(Reach::Percent(100.0).of(5), 5);
        assert_eq!(Reach::Count(9).of(5), 5);
        assert_eq!(Reach::Percent(1.0).of(1000), 10);
    }

    #[test]
    fn a_window_counts_the_versions_roles_but_not_its_shadow_and_reads_p95_from_buckets() {
        let series = |role: &str, requests: u64, trap: u64, fast: u64| {
            serde_json::json!({"model": "m", "version": "2", "role": role, "requests": requests,
                "errors": {"trap": trap, "invalid_input": 7},
                "latency_buckets": [[0.001, fast], [0.01, requests], [5.0, requests]],
                "latency_sum": 0.0})
        };
        let body = serde_json::json!({"models": [
            series("primary", 90, 1, 80), series("candidate", 10, 1, 10),
            series("shadow", 1000, 1000, 0),
        ]});
        let (requests, errors, buckets) = sample_of(&body, "m", "2");
        assert_eq!(
            (requests, errors),
            (100, 2),
            "client errors and the shadow do not count"
        );
        assert_eq!(buckets[0], (0.001, 90));
        let mut w = Window {
            requests,
            errors,
            ..Window::default()
        };
        for (bound, n) in buckets {
            w.buckets.insert(bound.to_bits(), n);
        }
        assert_eq!(w.value(GateMetric::ErrorRate), 0.02);
        // 95 of 100 requests are within 10 ms, not within 1 ms.
        assert_eq!(w.value(GateMetric::P95Latency), 0.01);
        // A body from a device before roles: everything is the primary's.
        let old = serde_json::json!({"models": [{"model": "m", "version": "2", "requests": 4}]});
        assert_eq!(sample_of(&old, "m", "2").0, 4);
    }
}
