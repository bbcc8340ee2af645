//! `outpost batch`: a file of inputs through a bundle, in process, on every core.
//!
//! Input: JSON Lines, one inference request (the OIP JSON body) per line, or a `.npy` array
//! for the bundle's one input, one row (along the first axis) per item. Output: JSON Lines, one
//! line per input line or row, in input order: the OIP response, or `{"error": …, "line": N}`
//! (`"row"` for arrays) when that input failed — the job goes on. Blank input lines are
//! skipped and produce nothing.
//!
//! Resumable: an output file that exists is carried on from its last complete line (a line cut
//! short by an interruption is dropped and redone), so running the same command again after a
//! crash or `kill -9` finishes the job with the same output as one uninterrupted run.
//! `--shard I/N` takes every N-th input (those whose index is I modulo N), so N machines (a
//! Kubernetes Indexed Job, or any scheduler) split one input.
//!
//! `--model NAME[@VERSION] --config DEVICE.toml` runs a model installed on a device: read from
//! its state when the device is stopped, from its admin API when it runs, and verified against
//! its trust store either way. The job runs at a lower CPU priority (`--nice`, 10 by default)
//! so a device serving beside it keeps its latency.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outpost_bundle::manifest::{Dim, Manifest, TensorSpec};
use outpost_bundle::{Bundle, ReadLimits, TrustStore};
use outpost_engine::{Engine, Guest, GuestContext, Payload, Session};
use outpost_inference::Tensor;
use outpost_oip::Encoding;
use serde_json::json;

use crate::batch_out::{Out, Sink};
use crate::samples::{NpyReader, pack};
use crate::util;

/// Work items in flight per thread: enough to keep every core busy between writes.
const ITEMS_PER_THREAD: usize = 8;
/// Rows read from a `.npy` file at a time.
const NPY_BLOCK_ROWS: u64 = 1024;

/// What `outpost batch` was given.
#[derive(Debug, clap::Args)]
pub(crate) struct BatchArgs {
    /// The bundle to run (`*.opb`).
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    bundle: Option<PathBuf>,
    /// A model installed on a device instead: `NAME` (its active version) or `NAME@VERSION`,
    /// from the device `--config` describes (its state when it is stopped, its admin API when
    /// it runs), verified against the device's trust store.
    #[arg(long, value_name = "NAME[@VERSION]", requires = "config")]
    model: Option<String>,
    /// The device's configuration, for `--model`.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How much lower than normal the job's CPU priority is (Unix nice, 0 to 19), so a device
    /// serving on the same machine keeps its latency; 0 keeps the priority the job started with.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    nice: i32,
    /// Keep one guest instance per worker thread instead of a fresh one per call: faster for
    /// small models, and right only for guests that keep no state between calls (always on for
    /// the built-in generic guest of `bundle build --onnx`). The limits still hold per call.
    #[arg(long)]
    reuse_instance: bool,
    /// Verify the bundle's signature against this trust store first (without it, the bundle's
    /// structure and hashes are checked, not who signed it).
    #[arg(long, value_name = "FILE")]
    trust: Option<PathBuf>,
    /// The inputs: `.jsonl` (one inference request per line) or `.npy` (one row per item).
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Where the answers go, in input order: `.jsonl`, one JSON line per input, or `.npy`
    /// (for a `.npy` input), one row per input row of each declared output (`STEM.NAME.npy`
    /// for several; failed rows are NaN and their errors in `STEM.errors.jsonl`). An existing
    /// output is carried on from what it holds.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// Start the output again instead of carrying it on.
    #[arg(long)]
    overwrite: bool,
    /// Worker threads (default: every core). On a device that also serves, leave it a core.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Rows of a `.npy` input per model call (the model's first dimension must be free to take
    /// them; its outputs are split back into one line per row).
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch_size: u64,
    /// Only every N-th input: those whose index (0-based) is I modulo N.
    #[arg(long, value_name = "I/N", value_parser = parse_shard)]
    shard: Option<(u64, u64)>,
}

fn parse_shard(text: &str) -> std::result::Result<(u64, u64), String> {
    let (i, n) = text
        .split_once('/')
        .ok_or_else(|| format!("`{text}` is not I/N (e.g. 0/4)"))?;
    let (i, n) = (i.trim().parse::<u64>(), n.trim().parse::<u64>());
    match (i, n) {
        (Ok(i), Ok(n)) if n > 0 && i < n => Ok((i, n)),
        _ => Err(format!("`{text}`: I/N needs 0 <= I < N")),
    }
}

/// The bundle, ready to call.
struct Runner {
    engine: Engine,
    guest: Guest,
    context: Arc<GuestContext>,
    manifest: Manifest,
    /// One guest instance per worker, kept between calls.
    reuse: bool,
    /// Rows answered as tensors for a `.npy` output, not as JSON lines.
    arrays: bool,
}

/// A worker's guest instance, when instances are reused.
type Slot = std::sync::Mutex<Option<Session>>;

fn load_trust(path: &Path) -> Result<TrustStore> {
    TrustStore::from_toml_str(&util::read_string(path)?)
        .with_context(|| format!("cannot load trust store `{}`", path.display()))
}

/// The bundle of `NAME[@VERSION]` installed on the device `config` describes, and the
/// device's trust store.
fn installed_bundle(config: &Path, model: &str) -> Result<(Vec<u8>, TrustStore)> {
    let config = outpost_device::Config::load(config)?;
    let trust = load_trust(&config.trust_store)?;
    let (name, version) = match model.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (model, None),
    };
    if !config.data_dir.exists() {
        bail!(
            "the device's data_dir `{}` does not exist: nothing is installed there",
            config.data_dir.display()
        );
    }
    match outpost_device::state::State::open(&config.data_dir) {
        Ok(state) => {
            let (_, bytes) = state
                .bundle_of(name, version)
                .with_context(|| format!("cannot read `{model}` from the device's state"))?;
            Ok((bytes.to_vec(), trust))
        }
        Err(locked) => {
            let (Some(addr), Some(token)) = (config.admin_listen, config.admin_token.as_deref())
            else {
                bail!(
                    "{locked}; that device has no admin API (admin_token) to ask instead: pass \
                     the bundle file with --bundle"
                );
            };
            let host = if addr.ip().is_unspecified() {
                std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            let mut url = format!("http://{host}/admin/models/{name}/bundle");
            if let Some(v) = version {
                // Semver build metadata (`+`) would be read as a space.
                url.push_str(&format!("?version={}", v.replace('+', "%2B")));
            }
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut response = agent
                .get(&url)
                .header("authorization", &format!("Bearer {token}"))
                .call()
                .with_context(|| format!("cannot reach the running device's admin API at {url}"))?;
            let body = response
                .body_mut()
                .with_config()
                .limit(config.max_bundle_bytes)
                .read_to_vec()
                .context("cannot read the bundle from the device")?;
            if response.status() != 200 {
                bail!(
                    "the device answered {}: {}",
                    response.status(),
                    String::from_utf8_lossy(&body)
                );
            }
            Ok((body, trust))
        }
    }
}

impl Runner {
    fn load(bytes: &[u8], what: &str, trust: Option<&TrustStore>, reuse: bool) -> Result<Self> {
        let bundle = Bundle::read(bytes, &ReadLimits::default())
            .with_context(|| format!("cannot read bundle {what}"))?;
        if let Some(store) = trust {
            Bundle::read_verified(bytes, &ReadLimits::default(), store, None)
                .with_context(|| format!("{what} failed verification"))?;
        }
        let manifest = bundle.manifest().clone();
        let guest_bytes = bundle
            .file(&manifest.guest.path)
            .context("the bundle has no guest")?;
        let mut models = Vec::new();
        for m in &manifest.models {
            let bytes = bundle
                .file(&m.path)
                .with_context(|| format!("the bundle has no file for model `{}`", m.name))?;
            models.push((m.name.as_str(), bytes, m.inputs.as_slice()));
        }
        let (engine, guest, context) = crate::samples::load_guest(
            format!("{} {} (batch)", manifest.name, manifest.version),
            guest_bytes,
            models,
            manifest.metadata.clone(),
            manifest.limits,
        )?;
        // The generic guest keeps nothing between calls, so one instance per worker is safe.
        let reuse = reuse || guest_bytes == outpost_examples::GENERIC_GUEST;
        Ok(Self {
            engine,
            guest,
            context,
            manifest,
            reuse,
            arrays: false,
        })
    }

    /// The model's outputs for `inputs`, the bundle's `[api]` held first as a device holds it;
    /// in the worker's kept instance when instances are reused.
    fn call(&self, inputs: Vec<Tensor>, slot: &Slot) -> std::result::Result<Vec<Tensor>, String> {
        let payload = Payload::Tensors(inputs);
        outpost_device::contract::check(&self.manifest.api, &payload)?;
        let result = if self.reuse {
            // A worker that panicked leaves its instance behind, not its lock.
            let mut kept = slot.lock().unwrap_or_else(|poisoned| {
                let mut kept = poisoned.into_inner();
                *kept = None;
                kept
            });
            let result = match &mut *kept {
                Some(session) => session.call(payload),
                empty => self
                    .engine
                    .session(&self.guest, &self.context)
                    .and_then(|s| empty.insert(s).call(payload)),
            };
            // An instance a call ended (a trap, a deadline) is replaced on the next call.
            if kept.as_ref().is_some_and(Session::is_ended) {
                *kept = None;
            }
            result
        } else {
            self.engine.call(&self.guest, &self.context, payload)
        };
        match result {
            Ok(out) => match out.payload {
                Payload::Tensors(t) => Ok(t),
                Payload::Raw { content_type, .. } => Err(format!(
                    "the model answered with a raw `{content_type}` payload, not tensors"
                )),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    /// One OIP response line.
    fn encode(
        &self,
        id: Option<&str>,
        outputs: &[Tensor],
        requested: &[outpost_oip::Wanted],
    ) -> std::result::Result<String, String> {
        let how = Encoding {
            requested,
            binary_output: false,
            labels: &self.manifest.labels,
            max_json_bytes: self.manifest.limits.max_tensor_bytes.saturating_mul(4),
        };
        let m = &self.manifest;
        let (json, _, ()) =
            outpost_oip::encode_response(&m.name, &m.version.to_string(), id, outputs, how, |_| {
                Ok::<_, outpost_oip::OipError>(())
            })
            .map_err(|e| e.to_string())?;
        String::from_utf8(json).map_err(|e| e.to_string())
    }
}

/// One piece of work: an input line, or consecutive rows of an array.
enum Work {
    Line {
        number: u64,
        text: String,
    },
    Rows {
        first: u64,
        rows: Vec<(u64, RowData)>,
    },
}

/// One row of a `.npy` input: its bytes as the input tensor holds them when the array's
/// element type is the input's (no conversion at all), else its values.
#[derive(Debug, Clone)]
enum RowData {
    Raw(Vec<u8>),
    Values(Vec<f64>),
}

impl Work {
    fn items(&self) -> usize {
        match self {
            Self::Line { .. } => 1,
            Self::Rows { rows, .. } => rows.len(),
        }
    }
}

fn error_line(key: &str, at: u64, error: &str) -> String {
    json!({ "error": error, key: at }).to_string()
}

impl Runner {
    /// The answers to one piece of work, one per input line or row.
    fn run(&self, work: &Work, input: Option<&TensorSpec>, slot: &Slot) -> Vec<Out> {
        match work {
            Work::Line { number, text } => {
                let cap = self.manifest.limits.max_tensor_bytes;
                let line = match outpost_oip::decode_request(text.as_bytes(), None, cap) {
                    Err(e) => Err(format!("not an inference request: {e}")),
                    Ok(request) => {
                        // Everything goes as JSON in a JSON Lines file.
                        let wanted: Vec<outpost_oip::Wanted> = request
                            .outputs
                            .into_iter()
                            .map(|w| outpost_oip::Wanted { binary: false, ..w })
                            .collect();
                        self.call(request.inputs, slot)
                            .and_then(|out| self.encode(request.id.as_deref(), &out, &wanted))
                    }
                };
                vec![line.map_or_else(|e| Out::Failed(error_line("line", *number, &e)), Out::Line)]
            }
            Work::Rows { rows, .. } => {
                let fail = |e: &str| -> Vec<Out> {
                    rows.iter()
                        .map(|(row, _)| Out::Failed(error_line("row", *row, e)))
                        .collect()
                };
                let Some(input) = input else {
                    return fail("the bundle declares no input for a .npy array");
                };
                match self.run_rows(input, rows, slot) {
                    Ok(lines) => lines,
                    Err(e) => {
                        if rows.len() > 1 {
                            // One bad row must not fail its neighbours: each again alone.
                            return rows
                                .iter()
                                .flat_map(|r| {
                                    self.run(
                                        &Work::Rows {
                                            first: r.0,
                                            rows: vec![r.clone()],
                                        },
                                        Some(input),
                                        slot,
                                    )
                                })
                                .collect();
                        }
                        fail(&e)
                    }
                }
            }
        }
    }

    fn run_rows(
        &self,
        input: &TensorSpec,
        rows: &[(u64, RowData)],
        slot: &Slot,
    ) -> std::result::Result<Vec<Out>, String> {
        let k = rows.len() as u64;
        let mut shape = vec![k];
        shape.extend(row_shape(input));
        let raw: Option<Vec<&[u8]>> = rows
            .iter()
            .map(|(_, r)| match r {
                RowData::Raw(b) => Some(&b[..]),
                RowData::Values(_) => None,
            })
            .collect();
        let tensor = match raw {
            Some(parts) => Tensor {
                name: input.name.clone(),
                datatype: input.datatype,
                shape,
                data: parts.concat(),
            },
            None => {
                let values: Vec<f64> = rows
                    .iter()
                    .flat_map(|(_, r)| match r {
                        RowData::Values(v) => v.clone(),
                        RowData::Raw(_) => Vec::new(),
                    })
                    .collect();
                pack(&input.name, input.datatype, shape, &values).map_err(|e| format!("{e:#}"))?
            }
        };
        let outputs = self.call(vec![tensor], slot)?;
        let mut lines = Vec::with_capacity(rows.len());
        for i in 0..k {
            let row: Vec<Tensor> = outputs
                .iter()
                .map(|t| split_row(t, i, k))
                .collect::<std::result::Result<_, _>>()?;
            lines.push(if self.arrays {
                Out::Row(rows[i as usize].0, row)
            } else {
                Out::Line(self.encode(None, &row, &[])?)
            });
        }
        Ok(lines)
    }
}

/// The dimensions of one row of `input` (all but the first); a free one is taken as 1.
fn row_shape(input: &TensorSpec) -> Vec<u64> {
    input
        .shape
        .iter()
        .skip(1)
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) => 1,
        })
        .collect()
}

/// Row `i` of `k` of an output whose first axis is the batch.
fn split_row(t: &Tensor, i: u64, k: u64) -> std::result::Result<Tensor, String> {
    if k == 1 {
        return Ok(t.clone());
    }
    let size = t.datatype.element_size().ok_or_else(|| {
        format!(
            "output `{}` is {}: rows cannot be split; use --batch-size 1",
            t.name,
            t.datatype.oip_name()
        )
    })?;
    if t.shape.first() != Some(&k) {
        return Err(format!(
            "output `{}` has shape {:?}, not {k} rows first; use --batch-size 1",
            t.name, t.shape
        ));
    }
    let per = t.data.len() / k as usize;
    let at = i as usize * per;
    let data = t
        .data
        .get(at..at + per)
        .filter(|_| per.is_multiple_of(size) && t.data.len() == per * k as usize)
        .ok_or_else(|| format!("output `{}` holds no whole rows", t.name))?;
    let mut shape = t.shape.clone();
    shape[0] = 1;
    Ok(Tensor {
        name: t.name.clone(),
        datatype: t.datatype,
        shape,
        data: data.to_vec(),
    })
}

/// Where the input comes from.
enum Input {
    Lines {
        reader: BufReader<File>,
        number: u64,
    },
    Array {
        reader: NpyReader<BufReader<File>>,
        input: TensorSpec,
        row: u64,
        pending: std::collections::VecDeque<(u64, RowData)>,
    },
}

impl Input {
    fn open(path: &Path, api_inputs: &[TensorSpec]) -> Result<(Self, u64)> {
        let file = || File::open(path).with_context(|| format!("cannot open `{}`", path.display()));
        let is = |ext: &str| path.extension().is_some_and(|e| e == ext);
        if is("npy") {
            let [input] = api_inputs else {
                bail!(
                    "a .npy input fills one tensor and the bundle takes {}: give JSON Lines",
                    api_inputs.len()
                );
            };
            let reader = NpyReader::open(BufReader::new(file()?))
                .with_context(|| format!("`{}`", path.display()))?;
            let fits = reader.shape.len() == input.shape.len()
                && reader.shape[1..]
                    .iter()
                    .zip(&input.shape[1..])
                    .all(|(a, d)| !matches!(d, Dim::Fixed(n) if n != a));
            if !fits {
                let dims: Vec<String> = input.shape.iter().map(Dim::to_string).collect();
                bail!(
                    "`{}` has shape {:?}; input `{}` takes [{}] (rows along the first axis)",
                    path.display(),
                    reader.shape,
                    input.name,
                    dims.join(", ")
                );
            }
            let rows = reader.rows();
            Ok((
                Self::Array {
                    reader,
                    input: input.clone(),
                    row: 0,
                    pending: Default::default(),
                },
                rows,
            ))
        } else if is("jsonl") || is("ndjson") {
            let mut count = 0u64;
            for line in BufReader::new(file()?).lines() {
                let line =
                    line.with_context(|| format!("`{}` is not UTF-8 text", path.display()))?;
                count += u64::from(!line.trim().is_empty());
            }
            Ok((
                Self::Lines {
                    reader: BufReader::new(file()?),
                    number: 0,
                },
                count,
            ))
        } else {
            bail!(
                "`{}`: the input is JSON Lines of inference requests (.jsonl) or a .npy array",
                path.display()
            )
        }
    }

    fn input_spec(&self) -> Option<&TensorSpec> {
        match self {
            Self::Lines { .. } => None,
            Self::Array { input, .. } => Some(input),
        }
    }

    /// The next input item (a line, or a row) whose index `keep` accepts, with its index, or
    /// `None` at the end. Items are numbered from 0 in input order (blank lines not counted).
    fn next(&mut self, keep: &dyn Fn(u64) -> bool) -> Result<Option<(u64, Item)>> {
        match self {
            Self::Lines { reader, number } => loop {
                let mut line = String::new();
                if reader.read_line(&mut line)? == 0 {
                    return Ok(None);
                }
                if line.trim().is_empty() {
                    continue;
                }
                let index = *number;
                *number += 1;
                if keep(index) {
                    return Ok(Some((index, Item::Line(line))));
                }
            },
            Self::Array {
                reader,
                row,
                pending,
                input,
            } => loop {
                if let Some((index, data)) = pending.pop_front() {
                    return Ok(Some((index, Item::Row(data))));
                }
                let Some((n, bytes)) = reader.read_rows_raw(NPY_BLOCK_ROWS)? else {
                    return Ok(None);
                };
                // The array's bytes as they are when its element type is the input's.
                let raw = reader.holds(input.datatype);
                let width = bytes.len() / n.max(1) as usize;
                for (i, chunk) in bytes.chunks(width.max(1)).enumerate() {
                    let index = *row + i as u64;
                    if keep(index) {
                        let data = if raw {
                            RowData::Raw(chunk.to_vec())
                        } else {
                            RowData::Values(reader.decode_values(chunk))
                        };
                        pending.push_back((index, data));
                    }
                }
                *row += n;
            },
        }
    }
}

/// One input item.
enum Item {
    Line(String),
    Row(RowData),
}

/// Progress on stderr: a bar redrawn in place on a terminal, a plain line every few seconds
/// otherwise.
struct Progress {
    total: u64,
    done: u64,
    errors: u64,
    start: Instant,
    last: Instant,
    tty: bool,
}

impl Progress {
    fn show(&mut self, last: bool) {
        let now = Instant::now();
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !last && now.duration_since(self.last) < every {
            return;
        }
        self.last = now;
        let rate = self.done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let share = self.done as f64 / self.total.max(1) as f64;
        if self.tty {
            let width = 30;
            let filled = ((share * width as f64) as usize).min(width);
            eprint!(
                "\r[{}{}] {}/{} ({} errors) {rate:.0}/s ",
                "=".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total,
                self.errors
            );
            if last {
                eprintln!();
            }
        } else {
            eprintln!(
                "batch: {}/{} ({:.0}%), {} errors, {rate:.0}/s",
                self.done,
                self.total,
                share * 100.0,
                self.errors
            );
        }
    }
}

pub(crate) fn run(args: BatchArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size is at least 1");
    }
    // The output must never be the input: --overwrite would delete it before it is read.
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(&args.input, &args.output) {
        bail!(
            "--output `{}` is the input file: give the answers another file",
            args.output.display()
        );
    }
    let trust = args.trust.as_deref().map(load_trust).transpose()?;
    let mut runner = match (&args.bundle, &args.model, &args.config) {
        (Some(path), _, _) => Runner::load(
            &util::read(path)?,
            &format!("`{}`", path.display()),
            trust.as_ref(),
            args.reuse_instance,
        )?,
        (None, Some(model), Some(config)) => {
            let (bytes, device_trust) = installed_bundle(config, model)?;
            Runner::load(
                &bytes,
                &format!("`{model}` from the device"),
                Some(trust.as_ref().unwrap_or(&device_trust)),
                args.reuse_instance,
            )?
        }
        _ => bail!("give --bundle FILE, or --model NAME[@VERSION] with --config"),
    };
    if args.nice > 0 {
        // Threads started from here on inherit it.
        let now = rustix::process::getpriority_process(None).unwrap_or(0);
        if let Err(e) = rustix::process::setpriority_process(None, (now + args.nice).min(19)) {
            eprintln!("batch: cannot lower the job's priority ({e}); running at normal priority");
        }
    }
    let (mut input, total) = Input::open(&args.input, &runner.manifest.api.inputs)?;
    if args.batch_size > 1 {
        if let Some(spec) = input.input_spec()
            && matches!(spec.shape.first(), Some(Dim::Fixed(n)) if *n != args.batch_size)
        {
            bail!(
                "input `{}` takes {} row(s) per call: --batch-size {} does not fit",
                spec.name,
                spec.shape.first().map(Dim::to_string).unwrap_or_default(),
                args.batch_size
            );
        }
        if matches!(input, Input::Lines { .. }) {
            bail!("--batch-size is for .npy inputs; a JSON Lines request sets its own batch");
        }
    }
    let (shard, shards) = args.shard.unwrap_or((0, 1));
    let keep = move |i: u64| i % shards == shard;
    // The items of this shard: indices I, I + N, I + 2N, ...
    let total = total / shards + u64::from(total % shards > shard);
    runner.arrays = args.output.extension().is_some_and(|e| e == "npy");
    let (mut sink, already) = if runner.arrays {
        if matches!(input, Input::Lines { .. }) {
            bail!(
                "a .npy output answers a .npy input row by row; JSON Lines requests are answered \
                 in JSON Lines (.jsonl)"
            );
        }
        // Input row r of shard I/N is the job's row (r - I) / N.
        Sink::arrays(
            &args.output,
            &args.input,
            &runner.manifest.api.outputs,
            total,
            args.overwrite,
            move |row| row.saturating_sub(shard) / shards,
        )?
    } else {
        Sink::lines(&args.output, total, args.overwrite)?
    };
    if already > 0 {
        eprintln!(
            "batch: carrying on {} after the {already} answers it holds",
            sink.files()
        );
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let mut skipped = 0u64;
    if shards == 1
        && let Input::Array { reader, row, .. } = &mut input
    {
        // Rows already answered are skipped without decoding them.
        reader.skip_rows(already)?;
        *row = already;
        skipped = already;
    }
    let mut progress = Progress {
        total,
        done: already,
        errors: 0,
        start: Instant::now(),
        last: Instant::now(),
        tty: std::io::stderr().is_terminal(),
    };
    let input_spec = input.input_spec().cloned();
    let slots: Vec<Slot> = (0..threads).map(|_| Slot::default()).collect();
    let mut written = 0u64;
    loop {
        // A chunk of work, in input order.
        let mut chunk: Vec<Work> = Vec::new();
        let mut items = 0;
        while chunk.len() < threads * ITEMS_PER_THREAD {
            let Some((index, item)) = input.next(&keep)? else {
                break;
            };
            if skipped < already {
                skipped += 1;
                continue;
            }
            items += 1;
            match item {
                Item::Line(text) => chunk.push(Work::Line {
                    number: index + 1,
                    text,
                }),
                Item::Row(values) => match chunk.last_mut() {
                    Some(Work::Rows { rows, .. }) if (rows.len() as u64) < args.batch_size => {
                        rows.push((index, values));
                    }
                    _ => chunk.push(Work::Rows {
                        first: index,
                        rows: vec![(index, values)],
                    }),
                },
            }
        }
        if chunk.is_empty() {
            break;
        }
        let expected: usize = chunk.iter().map(Work::items).sum();
        debug_assert_eq!(expected, items);
        let mut results: Vec<Option<Vec<Out>>> = Vec::new();
        results.resize_with(chunk.len(), || None);
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.min(chunk.len()))
                .map(|w| {
                    let (chunk, runner, spec) = (&chunk, &runner, input_spec.as_ref());
                    let slot = &slots[w];
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .enumerate()
                            .skip(w)
                            .step_by(threads)
                            .map(|(i, work)| (i, runner.run(work, spec, slot)))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for w in workers {
                if let Ok(done) = w.join() {
                    for (i, lines) in done {
                        results[i] = Some(lines);
                    }
                }
            }
        });
        for (work, lines) in chunk.iter().zip(results) {
            let lines = lines.unwrap_or_else(|| {
                let (key, at) = match work {
                    Work::Line { number, .. } => ("line", *number),
                    Work::Rows { first, .. } => ("row", *first),
                };
                (0..work.items())
                    .map(|_| Out::Failed(error_line(key, at, "the worker stopped")))
                    .collect()
            });
            for answer in lines {
                progress.errors += u64::from(sink.write(answer)?);
                written += 1;
            }
        }
        sink.flush()?;
        progress.done = already + written;
        progress.show(false);
    }
    progress.show(true);
    let secs = progress.start.elapsed().as_secs_f64();
    println!(
        "batch: {written} answers written ({} errors) in {secs:.2} s, {:.0} answers/s on \
         {threads} thread(s), {}; {} of {total} in {}",
        progress.errors,
        written as f64 / secs.max(1e-9),
        if runner.reuse {
            "one guest instance per thread"
        } else {
            "a fresh guest instance per call"
        },
        already + written,
        sink.files()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn shards_parse_and_bad_ones_say_why() {
        assert_eq!(parse_shard("1/4"), Ok((1, 4)));
        assert!(parse_shard("4/4").is_err());
        assert!(parse_shard("0/0").is_err());
        assert!(parse_shard("x").is_err());
    }

    #[test]
    fn outputs_split_into_rows_along_the_first_axis() {
        let t = Tensor {
            name: "y".into(),
            datatype: outpost_bundle::manifest::DataType::F32,
            shape: vec![2, 2],
            data: [1f32, 2.0, 3.0, 4.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        };
        let row = split_row(&t, 1, 2).unwrap();
        assert_eq!(row.shape, [1, 2]);
        assert_eq!(
            row.data,
            [3f32, 4.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
        assert!(split_row(&t, 0, 3).unwrap_err().contains("--batch-size 1"));
    }
}
