//! `outpost bundle`: build, sign, verify and inspect bundles.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use outpost_bundle::manifest::{BackendKind, Dim, TensorSpec};
use outpost_bundle::spec::{BaselineSpec, Spec};
use outpost_bundle::{BuildInput, Bundle, ReadLimits, SecretKey, TrustStore, sha256_hex};
use outpost_engine::Engine;

/// A spec with its files read.
struct Loaded {
    guest_path: std::path::PathBuf,
    build: BuildInput,
}

use crate::util;

/// Bundle subcommands.
// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BundleCommand {
    /// Build an unsigned bundle from a spec file (TOML; see `docs/bundle-spec.md` and
    /// `examples/*/bundle.toml`), or from an ONNX file alone with `--onnx`.
    #[command(
        disable_version_flag = true,
        group(clap::ArgGroup::new("source").args(["onnx", "from_mlflow"]))
    )]
    Build {
        /// The spec file. Paths inside it are relative to its directory.
        #[arg(required_unless_present_any = ["onnx", "from_mlflow"])]
        spec: Option<PathBuf>,
        /// Where to write the bundle.
        #[arg(long, short)]
        out: PathBuf,
        /// Building from an ONNX file.
        #[command(flatten)]
        onnx: crate::onnx_spec::OnnxArgs,
        /// Compute the drift baseline from this sample of training inputs (`.npy` for a
        /// single-input model, or JSON Lines of inference requests), by serving it through the
        /// generic guest; written to the file the spec's `baseline` names. Inputs as clients
        /// send them.
        #[arg(long, value_name = "FILE")]
        baseline_data: Option<PathBuf>,
        /// Bins per continuous feature in a computed baseline.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 10,
            requires = "baseline_data"
        )]
        baseline_bins: usize,
    },
    /// Sign a bundle with a secret key (replaces any previous signature).
    Sign {
        /// The bundle to sign.
        bundle: PathBuf,
        /// The secret key file (NAME.key from `outpost key generate`).
        #[arg(long)]
        key: PathBuf,
        /// Write the signed bundle here instead of replacing the input.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Verify a bundle against a trust store: structure, hashes, signer, signature, counter.
    Verify {
        /// The bundle to verify.
        bundle: PathBuf,
        /// Trust store (TOML) saying which keys may sign which model names.
        #[arg(long)]
        trust: PathBuf,
        /// Highest security counter already accepted for this model (anti-rollback).
        #[arg(long, value_name = "N")]
        min_security_counter: Option<u64>,
    },
    /// Show what a bundle holds. Checks structure and hashes, not the signature.
    Inspect {
        /// The bundle to inspect.
        bundle: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(cmd: BundleCommand) -> Result<()> {
    match cmd {
        BundleCommand::Build {
            spec,
            out,
            onnx,
            baseline_data,
            baseline_bins,
        } => {
            let sample = baseline_data.as_deref().map(|p| (p, baseline_bins));
            match (spec, &onnx.onnx, &onnx.from_mlflow) {
                (Some(spec), _, _) => {
                    let bundle = build_from_spec(&spec, sample)?;
                    write_built(&bundle, &out)
                }
                (None, Some(file), _) => {
                    let bytes = util::read(file)?;
                    build_onnx(&onnx, file, &bytes, &out, sample, None)
                }
                (None, None, Some(dir)) => {
                    let model = crate::mlflow::read(dir)?;
                    let mut args = onnx.clone();
                    let name = args
                        .name
                        .get_or_insert_with(|| crate::mlflow::name_of(dir))
                        .clone();
                    let graph = outpost_inference::graph_inputs(&model.onnx)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| {
                            format!("cannot read the ONNX model of `{}`", dir.display())
                        })?;
                    if let Some(sig) = &model.inputs {
                        let pins = crate::mlflow::pins(sig, &graph, &args.input_shapes)?;
                        args.input_shapes.extend(pins);
                    }
                    // The model with its external data inside, next to the bundle: the spec
                    // written names it, so the build can be repeated from the spec alone.
                    let file = out.with_file_name(format!("{name}.onnx"));
                    let existed = file.exists();
                    util::write_atomic(&file, &model.onnx, false)?;
                    for f in &model.data_files {
                        println!("read external data {}", f.display());
                    }
                    build_onnx(&args, &file, &model.onnx, &out, sample, Some(&model)).inspect_err(
                        |_| {
                            if !existed {
                                let _ = std::fs::remove_file(&file);
                            }
                        },
                    )
                }
                (None, None, None) => {
                    anyhow::bail!("give a spec file, --onnx FILE or --from-mlflow DIR")
                }
            }
        }
        BundleCommand::Sign { bundle, key, out } => {
            let key = SecretKey::from_file_str(&util::read_string(&key)?)
                .with_context(|| format!("cannot load key `{}`", key.display()))?;
            let mut b = read(&bundle)?;
            b.sign(&key);
            let target = out.as_ref().unwrap_or(&bundle);
            util::write_atomic(target, &b.to_bytes(), false)?;
            println!(
                "signed {} {} with key {} -> {}",
                b.manifest().name,
                b.manifest().version,
                key.id(),
                target.display()
            );
            Ok(())
        }
        BundleCommand::Verify {
            bundle,
            trust,
            min_security_counter,
        } => {
            let store = TrustStore::from_toml_str(&util::read_string(&trust)?)
                .with_context(|| format!("cannot load trust store `{}`", trust.display()))?;
            let file = open(&bundle)?;
            let v =
                Bundle::read_verified(file, &ReadLimits::default(), &store, min_security_counter)
                    .with_context(|| format!("`{}` failed verification", bundle.display()))?;
            let m = v.manifest();
            println!(
                "verified {} {} (security counter {}), signed by key {}",
                m.name,
                m.version,
                m.security_counter,
                v.signer()
            );
            Ok(())
        }
        BundleCommand::Inspect { bundle, json } => {
            let bytes = util::read(&bundle)?;
            let b = Bundle::read(&bytes[..], &ReadLimits::default())
                .with_context(|| format!("cannot read bundle `{}`", bundle.display()))?;
            if json {
                let doc = serde_json::json!({
                    "file": { "size": bytes.len(), "sha256": sha256_hex(&bytes) },
                    "signature": b.signature().map(|s| serde_json::json!({
                        "algorithm": s.algorithm, "key_id": s.key_id, "checked": false,
                    })),
                    "manifest": b.manifest(),
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", describe(&b, &bytes));
            }
            Ok(())
        }
    }
}

fn open(path: &Path) -> Result<BufReader<File>> {
    let f = File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    Ok(BufReader::new(f))
}

fn read(path: &Path) -> Result<Bundle> {
    Bundle::read(open(path)?, &ReadLimits::default())
        .with_context(|| format!("cannot read bundle `{}`", path.display()))
}

fn describe(b: &Bundle, bytes: &[u8]) -> String {
    use std::fmt::Write;
    let m = b.manifest();
    let mut s = String::new();
    let tensors = |ts: &[TensorSpec]| -> String {
        ts.iter()
            .map(|t| {
                let dims: Vec<String> = t.shape.iter().map(Dim::to_string).collect();
                format!("{} {}[{}]", t.name, t.datatype.oip_name(), dims.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        s,
        "bundle    {} {} (format {}, security counter {})",
        m.name, m.version, m.format_version, m.security_counter
    );
    let _ = writeln!(
        s,
        "file      {} bytes, sha256 {}",
        bytes.len(),
        sha256_hex(bytes)
    );
    match b.signature() {
        Some(sig) => {
            let _ = writeln!(
                s,
                "signed    by key {} (not checked here; use `outpost bundle verify`)",
                sig.key_id
            );
        }
        None => {
            let _ = writeln!(s, "signed    no");
        }
    }
    let _ = writeln!(
        s,
        "guest     {}  {} bytes  sha256 {}",
        m.guest.path, m.guest.size, m.guest.sha256
    );
    for model in &m.models {
        let _ = writeln!(
            s,
            "model     {}  {}  {} bytes  sha256 {}",
            model.name, model.path, model.size, model.sha256
        );
        let _ = writeln!(s, "            inputs   {}", tensors(&model.inputs));
        let _ = writeln!(s, "            outputs  {}", tensors(&model.outputs));
        for r in &model.repairs {
            let _ = writeln!(s, "            repaired {r}");
        }
    }
    let _ = writeln!(s, "api       inputs   {}", tensors(&m.api.inputs));
    let _ = writeln!(s, "          outputs  {}", tensors(&m.api.outputs));
    if !m.api.raw_content_types.is_empty() {
        let _ = writeln!(
            s,
            "          raw      {}",
            m.api.raw_content_types.join(", ")
        );
    }
    let l = m.limits;
    let _ = writeln!(
        s,
        "limits    memory {} bytes, timeout {} ms, largest tensor {} bytes",
        l.memory_bytes, l.timeout_ms, l.max_tensor_bytes
    );
    if let Some(baseline) = &m.baseline {
        let names: Vec<&str> = baseline.features.iter().map(|f| f.name.as_str()).collect();
        let _ = writeln!(s, "baseline  {}", names.join(", "));
        if !baseline.outputs.is_empty() {
            let names: Vec<&str> = baseline.outputs.iter().map(|f| f.name.as_str()).collect();
            let _ = writeln!(s, "          outputs  {}", names.join(", "));
        }
        if let Some(q) = &baseline.quality {
            let _ = writeln!(s, "          quality  {} ({})", q.output, q.task.as_str());
        }
    }
    if !m.labels.is_empty() {
        let _ = writeln!(s, "labels    {}", m.labels.join(" "));
    }
    for (k, v) in &m.metadata {
        let _ = writeln!(s, "meta      {k} = {v}");
    }
    s
}

/// Builds the bundle `spec_path` describes; with a baseline sample, computes its baseline
/// first and writes it where the spec's `baseline` says.
fn build_from_spec(spec_path: &Path, sample: Option<(&Path, usize)>) -> Result<Bundle> {
    let text = util::read_string(spec_path)?;
    let dir = spec_path.parent().unwrap_or(Path::new("."));
    let mut spec = Spec::parse(&text)
        .with_context(|| format!("cannot build a bundle from `{}`", spec_path.display()))?;
    let guest_path = spec.guest.as_ref().map_or_else(
        || PathBuf::from("(the built-in generic guest)"),
        |g| dir.join(g),
    );
    let spec_guest_is_generic = spec.guest.is_none();
    let baseline_out = match (sample, &spec.baseline) {
        (None, _) => None,
        (Some(_), _) if spec.guest.is_some() => anyhow::bail!(
            "--baseline-data computes baselines for the generic guest; a guest of your own \
             observes features only it knows, so compute its baseline in the training script \
             (models/common.py has the helpers)"
        ),
        (Some(_), Some(BaselineSpec::File(rel))) => Some(dir.join(rel)),
        (Some(_), _) => anyhow::bail!(
            "--baseline-data writes the baseline to the file the spec names: add `baseline = \
             \"{}.baseline.json\"` to `{}`",
            spec.name,
            spec_path.display()
        ),
    };
    if baseline_out.is_some() {
        // Not there yet: computed below from the sample.
        spec.baseline = None;
    }
    let build = spec
        .load(
            dir,
            |p| std::fs::read(p),
            Some(outpost_examples::GENERIC_GUEST),
        )
        .with_context(|| format!("cannot build a bundle from `{}`", spec_path.display()))?;
    let mut input = Loaded { guest_path, build };
    if let (Some((data, bins)), Some(out)) = (sample, &baseline_out) {
        let baseline = crate::baseline_data::compute(&input.build, data, bins)?;
        let mut text = serde_json::to_string_pretty(&baseline)?;
        text.push('\n');
        util::write_atomic(out, text.as_bytes(), false)?;
        let names: Vec<&str> = baseline.all().map(|(f, _)| f.name.as_str()).collect();
        println!(
            "computed the baseline of {} from `{}` -> {}",
            names.join(", "),
            data.display(),
            out.display()
        );
        input.build.baseline = Some(baseline);
    }
    if spec_guest_is_generic {
        check_monitor(&input.build)?;
    }
    // Refuse what a device could not load: a guest wasmtime cannot compile or that does not
    // fit the host contract, an ONNX model tract cannot load.
    let engine = Engine::new().context("cannot start the WebAssembly engine")?;
    engine
        .compile(&input.build.guest)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .with_context(|| {
            format!(
                "the guest module `{}` cannot be loaded",
                input.guest_path.display()
            )
        })?;
    let tract = outpost_inference::default_backend();
    for m in &mut input.build.models {
        if m.backend == Some(BackendKind::Onnxruntime) {
            continue;
        }
        let backend = &tract;
        m.repairs = outpost_inference::repairs(&m.bytes)
            .map_err(anyhow::Error::msg)
            .with_context(|| {
                format!(
                    "ONNX model `{}` cannot be loaded by {}",
                    m.name,
                    backend.name()
                )
            })?;
        for r in &m.repairs {
            println!("model {}: {r}", m.name);
        }
    }
    for m in &input.build.models {
        let backend = match m.backend {
            Some(BackendKind::Onnxruntime) => onnxruntime_for(&m.name)?,
            _ => Arc::clone(&tract),
        };
        let cannot_load = || {
            format!(
                "ONNX model `{}` cannot be loaded by {}",
                m.name,
                backend.name()
            )
        };
        let mismatch = || format!("ONNX model `{}` does not match its declaration", m.name);
        // The declaration is checked against the graph's own facts where the graph types
        // with its dimensions open, else against the graph typed with the declared inputs
        // (many exports type only then); the model must also load as a device loads it, with
        // the declared inputs pinned.
        let open = backend.load(&m.bytes, &[]);
        let pinned = (!m.inputs.is_empty()).then(|| backend.load(&m.bytes, &m.inputs));
        let model = match (open, pinned) {
            (Ok(open), None | Some(Ok(_))) => open,
            (Ok(open), Some(Err(e))) => {
                outpost_inference::check_signature(open.as_ref(), &m.inputs, &m.outputs)
                    .map_err(anyhow::Error::msg)
                    .with_context(mismatch)?;
                return Err(anyhow::Error::msg(e)).with_context(cannot_load);
            }
            (Err(e), None) => return Err(anyhow::Error::msg(e)).with_context(cannot_load),
            (Err(_), Some(Ok(pinned))) => pinned,
            (Err(_), Some(Err(e))) => {
                // A declaration of other inputs than the graph's is the thing to fix first.
                if let Ok(graph) = outpost_inference::graph_inputs(&m.bytes) {
                    let fits = graph.len() == m.inputs.len()
                        && graph.iter().zip(&m.inputs).all(|(g, d)| {
                            g.name == d.name
                                && g.datatype == d.datatype
                                && g.shape.len() == d.shape.len()
                        });
                    if !fits {
                        let list: Vec<String> = graph.iter().map(ToString::to_string).collect();
                        anyhow::bail!(
                            "{}: the spec declares inputs {}, the graph's are {}",
                            mismatch(),
                            m.inputs
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(", "),
                            list.join(", ")
                        );
                    }
                }
                return Err(anyhow::Error::msg(e)).with_context(cannot_load);
            }
        };
        outpost_inference::check_signature(model.as_ref(), &m.inputs, &m.outputs)
            .map_err(anyhow::Error::msg)
            .with_context(mismatch)?;
    }
    let bundle = Bundle::build(input.build)
        .with_context(|| format!("cannot build a bundle from `{}`", spec_path.display()))?;
    Ok(bundle)
}

/// The onnxruntime backend `bundle build` checks a model with when its spec requires it: the
/// library in `ORT_DYLIB_PATH`, as a device would load it.
#[cfg(feature = "onnxruntime")]
fn onnxruntime_for(model: &str) -> Result<Arc<dyn outpost_inference::Backend>> {
    let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) else {
        anyhow::bail!(
            "ONNX model `{model}` requires the onnxruntime backend: set ORT_DYLIB_PATH to a \
             libonnxruntime so that it can be checked as a device will load it"
        );
    };
    let ort = outpost_inference::onnxruntime::Onnxruntime::load(
        std::path::Path::new(&path),
        outpost_inference::onnxruntime::OrtOptions {
            threads: 1,
            sessions: 1,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(ort))
}

#[cfg(not(feature = "onnxruntime"))]
fn onnxruntime_for(model: &str) -> Result<Arc<dyn outpost_inference::Backend>> {
    anyhow::bail!(
        "ONNX model `{model}` requires the onnxruntime backend, which this build of outpost \
         does not have (built without the `onnxruntime` feature)"
    )
}

/// Builds a bundle with the generic guest around the ONNX model `file` (`bytes`): writes the
/// spec it used, then the bundle; a build that fails leaves neither.
fn build_onnx(
    args: &crate::onnx_spec::OnnxArgs,
    file: &Path,
    bytes: &[u8],
    out: &Path,
    sample: Option<(&Path, usize)>,
    mlflow: Option<&crate::mlflow::MlflowModel>,
) -> Result<()> {
    let spec_path = args.spec_out.clone().unwrap_or_else(|| {
        let name = args.name.as_deref().unwrap_or("model");
        out.with_file_name(format!("{name}.bundle.toml"))
    });
    let mut spec = crate::onnx_spec::spec_for(args, file, bytes, &spec_path, sample.is_some())?;
    if let Some(m) = mlflow {
        if let Some(sig) = &m.outputs {
            crate::mlflow::check_outputs(sig, &spec.model[0].outputs)?;
        }
        if !m.metadata.is_empty() {
            spec.metadata.insert(
                "mlflow".to_owned(),
                serde_json::Value::Object(m.metadata.clone()),
            );
        }
    }
    let existed = spec_path.exists();
    util::write_atomic(&spec_path, spec.to_toml()?.as_bytes(), false)?;
    let bundle = build_from_spec(&spec_path, sample).inspect_err(|_| {
        // A build that fails leaves nothing behind, not even its spec.
        if !existed {
            let _ = std::fs::remove_file(&spec_path);
        }
    })?;
    println!(
        "wrote the spec to {} (edit it and build from it)",
        spec_path.display()
    );
    write_built(&bundle, out)
}

/// Writes a built bundle to `out` and says so.
fn write_built(bundle: &Bundle, out: &Path) -> Result<()> {
    util::write_atomic(out, &bundle.to_bytes(), false)?;
    let m = bundle.manifest();
    println!(
        "built {} {} -> {} (unsigned; sign it with `outpost bundle sign`)",
        m.name,
        m.version,
        out.display()
    );
    Ok(())
}

/// The generic guest's `monitor` list declares the features it observes: each must be in the
/// baseline, on the side (input or output) it is observed on, or a device would refuse every
/// observation of it.
fn check_monitor(build: &BuildInput) -> Result<()> {
    let monitor = crate::baseline_data::monitor_of(&build.metadata)?;
    if monitor.is_empty() {
        return Ok(());
    }
    let Some(baseline) = &build.baseline else {
        anyhow::bail!(
            "the generic guest monitors {} but the bundle has no baseline: build with \
             --baseline-data FILE, or remove `monitor` from the `generic` metadata",
            monitor[0].name
        );
    };
    for m in &monitor {
        let (side, list) = if m.output.is_some() {
            ("outputs", &baseline.outputs)
        } else {
            ("features", &baseline.features)
        };
        if !list.iter().any(|f| f.name == m.name) {
            anyhow::bail!(
                "the generic guest monitors `{}` but the baseline's {side} do not name it: \
                 recompute the baseline with --baseline-data FILE, or remove it from `monitor`",
                m.name
            );
        }
    }
    Ok(())
}
