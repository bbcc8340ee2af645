//! `outpost fleet rollout`: staged rollouts with health gates, through the fleet's REST API.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_proto::rest::{
    Gate, GateMetric, Reach, RolloutRecord, RolloutRequest, RolloutState, Stage,
};

use crate::fleet_cmd::Remote;
use crate::util;

/// Rollout subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum RolloutCommand {
    /// Start a staged rollout of MODEL@VERSION.
    Start(Box<StartArgs>),
    /// Show one rollout (or, without an id, every rollout).
    Status {
        /// The rollout's id.
        id: Option<u64>,
        #[command(flatten)]
        remote: Remote,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a rollout where it is.
    Pause(OpArgs),
    /// Carry on with a paused rollout (its soak and deadline start again).
    Resume(OpArgs),
    /// Deploy to the rest of the target now, skipping the remaining gates.
    Promote(OpArgs),
    /// Stop a rollout and give every device it reached its previous version.
    Abort(OpArgs),
}

/// `rollout start`.
#[derive(Debug, clap::Args)]
pub(crate) struct StartArgs {
    /// What to roll out, e.g. `digits@2.0.0` (pushed already).
    target: String,
    /// A device of the target (repeat for several).
    #[arg(long = "device", value_name = "ID")]
    devices: Vec<String>,
    /// Every device reporting this tag.
    #[arg(long)]
    tag: Option<String>,
    /// Every device the fleet knows.
    #[arg(long)]
    all: bool,
    /// How far each stage reaches: device counts or percentages of the target, in order
    /// (`1,40%,100%`).
    #[arg(long, value_name = "LIST", default_value = "1,10%,50%,100%")]
    stages: String,
    /// Run the first stage as a canary on its devices (each routes a share of its traffic to
    /// the version and rolls it back by itself when it crosses a bound): the device's canary
    /// policy without id and candidate, e.g. `{"percent": 20, "min_requests": 50}`.
    #[arg(long, value_name = "JSON")]
    canary: Option<String>,
    /// How long each stage soaks once every device of it runs the version, before its gates.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::util::parse_duration)]
    soak: Duration,
    /// A gate: `error_rate<=0.01`, `p95_latency<=0.050` (seconds), or a multiple of the
    /// replaced version's value with `x`: `p95_latency<=1.5x`. Repeat for several.
    #[arg(long = "gate", value_name = "METRIC<=MAX")]
    gates: Vec<String>,
    /// Telemetry each gate looks at.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = crate::util::parse_duration)]
    window: Duration,
    /// Requests the stage's devices must have served in the window for a gate to decide.
    #[arg(long, default_value_t = 100)]
    min_requests: u64,
    /// Devices of the stage that must have served requests in the window.
    #[arg(long, default_value_t = 1)]
    min_devices: u64,
    /// How long a stage may wait for its devices or its gates' data before the rollout pauses.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::util::parse_duration)]
    deadline: Duration,
    /// Pause instead of rolling back when a stage fails (resume checks again, abort rolls
    /// back).
    #[arg(long)]
    pause_on_failure: bool,
    /// Print each stage and gate as it is decided, until the rollout ends or pauses.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 3600)]
    timeout: u64,
    #[command(flatten)]
    remote: Remote,
    /// Print the rollout as JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of an operation on one rollout.
#[derive(Debug, clap::Args)]
pub(crate) struct OpArgs {
    /// The rollout's id.
    id: u64,
    #[command(flatten)]
    remote: Remote,
    /// Print the rollout as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: RolloutCommand) -> Result<()> {
    match cmd {
        RolloutCommand::Start(args) => start(*args),
        RolloutCommand::Status { id, remote, json } => {
            let client = remote.client()?;
            match id {
                Some(id) => show(&client.rollout(id)?, json),
                None => {
                    let all = client.rollouts()?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&all)?);
                    } else if all.is_empty() {
                        println!("no rollouts");
                    } else {
                        for r in &all {
                            println!(
                                "{:>4}  {}@{}  {}  {}/{} devices",
                                r.id,
                                r.request.model,
                                r.request.version,
                                state_text(&r.state),
                                r.reached.len(),
                                r.targets.len()
                            );
                        }
                    }
                    Ok(())
                }
            }
        }
        RolloutCommand::Pause(a) => op(a, "pause"),
        RolloutCommand::Resume(a) => op(a, "resume"),
        RolloutCommand::Promote(a) => op(a, "promote"),
        RolloutCommand::Abort(a) => op(a, "abort"),
    }
}

fn op(args: OpArgs, op: &str) -> Result<()> {
    let r = args.remote.client()?.rollout_op(args.id, op)?;
    show(&r, args.json)
}

/// Parses `1,40%,100%`.
fn parse_stages(text: &str, soak: Duration) -> Result<Vec<Stage>> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            let reach = match s.strip_suffix('%') {
                Some(p) => Reach::Percent(
                    p.parse()
                        .with_context(|| format!("stage `{s}`: expected a percentage"))?,
                ),
                None => Reach::Count(
                    s.parse()
                        .with_context(|| format!("stage `{s}`: expected a device count or N%"))?,
                ),
            };
            Ok(Stage {
                reach,
                soak_s: soak.as_secs(),
                canary: None,
            })
        })
        .collect()
}

/// Parses `error_rate<=0.01` or `p95_latency<=1.5x`.
fn parse_gate(text: &str, window: Duration, min_requests: u64, min_devices: u64) -> Result<Gate> {
    let (metric, max) = text
        .split_once("<=")
        .with_context(|| format!("gate `{text}`: expected METRIC<=MAX"))?;
    let metric = match metric.trim() {
        "error_rate" => GateMetric::ErrorRate,
        "p95_latency" => GateMetric::P95Latency,
        other => bail!("gate `{text}`: unknown metric `{other}` (error_rate, p95_latency)"),
    };
    let max = max.trim();
    let (number, relative) = match max.strip_suffix('x') {
        Some(n) => (n, true),
        None => (max, false),
    };
    let max: f64 = number
        .parse()
        .with_context(|| format!("gate `{text}`: `{max}` is not a number"))?;
    Ok(Gate {
        metric,
        max,
        relative,
        window_s: window.as_secs(),
        min_requests,
        min_devices,
    })
}

fn start(args: StartArgs) -> Result<()> {
    let (model, version) = args
        .target
        .split_once('@')
        .filter(|(m, v)| !m.is_empty() && !v.is_empty())
        .with_context(|| format!("`{}` is not MODEL@VERSION", args.target))?;
    let mut stages = parse_stages(&args.stages, args.soak)?;
    if let Some(text) = &args.canary {
        let canary: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("--canary `{text}` is not JSON"))?;
        if let Some(first) = stages.first_mut() {
            first.canary = Some(canary);
        }
    }
    let request = RolloutRequest {
        model: model.to_owned(),
        version: version.to_owned(),
        devices: args.devices,
        tag: args.tag,
        all: args.all,
        stages,
        gates: args
            .gates
            .iter()
            .map(|g| parse_gate(g, args.window, args.min_requests, args.min_devices))
            .collect::<Result<_>>()?,
        deadline_s: args.deadline.as_secs(),
        on_failure: if args.pause_on_failure {
            outpost_proto::rest::OnFailure::Pause
        } else {
            outpost_proto::rest::OnFailure::Rollback
        },
    };
    let client = args.remote.client()?;
    let r = client.start_rollout(&request)?;
    if !args.wait {
        return show(&r, args.json);
    }
    let deadline = Instant::now()
        .checked_add(Duration::from_secs(args.timeout))
        .context("--timeout is too long")?;
    let mut printed = 0;
    let mut r = r;
    if !args.json {
        println!("rollout {}", r.id);
    }
    loop {
        if !args.json {
            for line in &r.history[printed.min(r.history.len())..] {
                println!("  {}", line.text);
            }
        }
        printed = r.history.len();
        match &r.state {
            RolloutState::Succeeded => break,
            RolloutState::RolledBack { reason } => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                }
                bail!("rollout {} rolled back: {reason}", r.id);
            }
            RolloutState::Paused { reason, .. } => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                }
                bail!(
                    "rollout {} paused: {reason} (`outpost fleet rollout resume {}` carries on)",
                    r.id,
                    r.id
                );
            }
            RolloutState::Progressing { .. } | RolloutState::Aborted { .. } => {}
        }
        if Instant::now() > deadline {
            bail!(
                "rollout {} is still {} after {} s",
                r.id,
                state_text(&r.state),
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        r = client.rollout(r.id)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}

fn state_text(state: &RolloutState) -> String {
    match state {
        RolloutState::Progressing { stage } => format!("progressing (stage {})", stage + 1),
        RolloutState::Paused { stage, reason } => {
            format!("paused at stage {}: {reason}", stage + 1)
        }
        RolloutState::Succeeded => "succeeded".into(),
        RolloutState::Aborted { reason } => format!("aborted, rolling back: {reason}"),
        RolloutState::RolledBack { reason } => format!("rolled back: {reason}"),
    }
}

fn show(r: &RolloutRecord, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    println!(
        "rollout {}: {}@{}, {}",
        r.id,
        r.request.model,
        r.request.version,
        state_text(&r.state)
    );
    println!(
        "  reached {} of {} device(s): {}",
        r.reached.len(),
        r.targets.len(),
        util::some_of(&r.reached)
    );
    for line in &r.history {
        println!("  {}", line.text);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stages_and_gates_parse_and_bad_ones_say_why() {
        let stages = parse_stages("1, 40%,100%", Duration::from_secs(5)).unwrap();
        assert_eq!(stages[0].reach, Reach::Count(1));
        assert_eq!(stages[1].reach, Reach::Percent(40.0));
        assert_eq!(stages[2].soak_s, 5);
        assert!(parse_stages("1,x", Duration::ZERO).is_err());
        let g = parse_gate("p95_latency<=1.5x", Duration::from_secs(30), 20, 1).unwrap();
        assert_eq!(
            (g.metric, g.max, g.relative, g.window_s),
            (GateMetric::P95Latency, 1.5, true, 30)
        );
        let g = parse_gate("error_rate <= 0.01", Duration::from_secs(30), 20, 1).unwrap();
        assert!(!g.relative);
        let e = parse_gate("accuracy<=1", Duration::ZERO, 1, 1).unwrap_err();
        assert!(e.to_string().contains("unknown metric"), "{e}");
        assert!(parse_gate("error_rate>0.1", Duration::ZERO, 1, 1).is_err());
    }
}
