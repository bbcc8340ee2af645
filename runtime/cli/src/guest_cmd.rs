//! `outpost guest new`: a guest crate of your own from the template in `examples/template`,
//! with its bundle spec, outside any workspace.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_bundle::manifest::{Api, DataType, Dim, TensorSpec};

const CARGO_TOML: &str = include_str!("../../../examples/template/Cargo.toml");
const LIB_RS: &str = include_str!("../../../examples/template/src/lib.rs");
const BUNDLE_TOML: &str = include_str!("../../../examples/template/bundle.toml");
const README: &str = include_str!("../../../examples/template/README.md");

/// The line of the template's manifest that names the SDK.
const SDK_LINE: &str = "outpost-guest = { path = \"../../guest-sdk\" }";

/// Guest subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum GuestCommand {
    /// Write a new guest crate (Rust, for wasm32-wasip2) and its bundle spec, from the
    /// template in `examples/template`.
    New {
        /// The model name (`[a-z0-9][a-z0-9-]*`); the crate is written to a directory of
        /// that name.
        name: String,
        /// Fill the spec's model and API from this ONNX file (copied in as `model.onnx`).
        #[arg(long, value_name = "FILE")]
        onnx: Option<PathBuf>,
        /// Depend on the guest SDK at this path (a checkout's `guest-sdk`) instead of by git.
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
        /// Where to create the crate's directory.
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
}

pub(crate) fn run(cmd: GuestCommand) -> Result<()> {
    match cmd {
        GuestCommand::New {
            name,
            onnx,
            sdk,
            dir,
        } => new(&name, onnx.as_deref(), sdk.as_deref(), &dir),
    }
}

fn new(name: &str, onnx: Option<&Path>, sdk: Option<&Path>, dir: &Path) -> Result<()> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !valid {
        bail!("`{name}` is not a model name: use lowercase letters, digits and `-`");
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("`{}` already exists", root.display());
    }
    let sdk_line = match sdk {
        Some(path) => {
            let path = std::fs::canonicalize(path)
                .with_context(|| format!("no guest SDK at `{}`", path.display()))?;
            if !path.join("Cargo.toml").is_file() {
                bail!("`{}` is not the guest SDK (no Cargo.toml)", path.display());
            }
            format!(
                "outpost-guest = {{ path = {:?} }}",
                path.display().to_string()
            )
        }
        None => format!(
            "outpost-guest = {{ git = \"{}\" }}",
            env!("CARGO_PKG_REPOSITORY")
        ),
    };
    let crate_name = format!("{name}-guest");
    let cargo = CARGO_TOML
        .replace(
            "name = \"template-guest\"",
            &format!("name = \"{crate_name}\""),
        )
        .replace(SDK_LINE, &sdk_line)
        .replace("template.opb", &format!("{name}.opb"));
    let wasm = format!("{}.wasm", crate_name.replace('-', "_"));
    let bundle = match onnx {
        None => BUNDLE_TOML
            .replace("name = \"template\"", &format!("name = \"{name}\""))
            .replace("template_guest.wasm", &wasm),
        Some(file) => spec_for_onnx(name, file, &wasm)?,
    };
    // Everything is made before anything is written.
    let files = [
        ("Cargo.toml", cargo),
        ("src/lib.rs", LIB_RS.to_owned()),
        ("bundle.toml", bundle),
        ("README.md", README.to_owned()),
    ];
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("cannot create `{}`", root.display()))?;
    for (path, text) in &files {
        crate::util::write_atomic(&root.join(path), text.as_bytes(), false)?;
    }
    if let Some(file) = onnx {
        std::fs::copy(file, root.join("model.onnx"))
            .with_context(|| format!("cannot copy `{}`", file.display()))?;
    }
    println!("wrote the guest crate {} ({crate_name})", root.display());
    println!(
        "  cd {} && cargo build --release --target wasm32-wasip2",
        root.display()
    );
    println!("  outpost bundle build bundle.toml --out {name}.opb");
    Ok(())
}

/// The template's spec with the model's own tensors: the API takes the graph's inputs and
/// answers `label` and `scores` (the graph's first FP32 output).
fn spec_for_onnx(name: &str, file: &Path, wasm: &str) -> Result<String> {
    let bytes = crate::util::read(file)?;
    let graph = outpost_inference::graph_inputs(&bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read `{}` as an ONNX model", file.display()))?;
    let (inputs, outputs) = outpost_inference::signature(&bytes, &graph)
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            format!(
                "tract cannot type `{}` (`outpost model inspect` shows why and what to pin)",
                file.display()
            )
        })?;
    let Some(scores) = outputs.iter().find(|t| t.datatype == DataType::F32) else {
        bail!(
            "`{}` has no FP32 output for the template's scores",
            file.display()
        );
    };
    let rows = scores
        .shape
        .first()
        .cloned()
        .unwrap_or(Dim::Symbolic("batch".into()));
    let spec = outpost_bundle::spec::Spec {
        name: name.to_owned(),
        version: semver::Version::new(0, 1, 0),
        security_counter: 1,
        guest: Some(PathBuf::from("target/wasm32-wasip2/release").join(wasm)),
        model: vec![outpost_bundle::spec::SpecModel {
            name: "model".into(),
            path: "model.onnx".into(),
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            backend: None,
        }],
        api: Api {
            inputs,
            outputs: vec![
                TensorSpec {
                    name: "label".into(),
                    datatype: DataType::I64,
                    shape: vec![rows],
                },
                TensorSpec {
                    name: "scores".into(),
                    ..scores.clone()
                },
            ],
            raw_content_types: Vec::new(),
        },
        limits: Default::default(),
        baseline: None,
        labels: Vec::new(),
        metadata_file: None,
        metadata: Default::default(),
        serving: Default::default(),
    };
    Ok(format!(
        "# The bundle spec for this guest (every field: docs/bundle-spec.md), its tensors \
         from {}.\n{}",
        file.file_name()
            .map_or_else(|| "the ONNX file".into(), |n| n.to_string_lossy()),
        spec.to_toml()?
    ))
}
