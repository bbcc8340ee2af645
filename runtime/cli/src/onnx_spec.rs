//! `outpost bundle build --onnx`: the bundle spec for an ONNX file alone, with the built-in
//! generic guest, its endpoint taking and returning the graph's own tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_bundle::manifest::{Api, Dim, ResourceLimits, TensorSpec};
use outpost_bundle::spec::{BaselineSpec, Spec, SpecModel};

/// What `bundle build --onnx` was given.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct OnnxArgs {
    /// Build from this ONNX file alone, with the built-in generic guest (tensors in, the model,
    /// tensors out); writes the spec it used next to the bundle.
    #[arg(long, conflicts_with = "spec", requires_all = ["name", "version"])]
    pub onnx: Option<PathBuf>,
    /// Build from an MLflow model directory with the `onnx` flavor (`MLmodel`, its ONNX file
    /// and external data files), with the built-in generic guest: the signature pins the
    /// inputs and is checked against the graph; run id, model uuid and MLflow version go in
    /// the manifest's metadata. The name defaults to the directory's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["spec", "onnx"], requires = "version")]
    pub from_mlflow: Option<PathBuf>,
    /// Model name for `--onnx` or `--from-mlflow` (`[a-z0-9][a-z0-9-]*`).
    #[arg(long, requires = "source")]
    pub name: Option<String>,
    /// Model version for `--onnx` or `--from-mlflow` (semver, e.g. 1.0.0).
    #[arg(long, requires = "source")]
    pub version: Option<String>,
    /// Anti-rollback counter for `--onnx` or `--from-mlflow`.
    #[arg(long, requires = "source", default_value_t = 1)]
    pub security_counter: u64,
    /// Pin an input's shape, e.g. `image=1,3,224,224` or `input=batch,64` (a name keeps a
    /// dimension open). Repeat for more inputs.
    #[arg(long = "input-shape", value_name = "INPUT=DIMS", requires = "source")]
    pub input_shapes: Vec<String>,
    /// Class labels, one per line, for the bundle's `labels`.
    #[arg(long, value_name = "FILE", requires = "source")]
    pub labels: Option<PathBuf>,
    /// Map an FP32 input's values to `x * SCALE + OFFSET` before the model sees them.
    #[arg(long, value_name = "INPUT=SCALE[,OFFSET]", requires = "source")]
    pub scale: Vec<String>,
    /// Turn an FP32 output into probabilities (softmax over its last axis).
    #[arg(long, value_name = "OUTPUT", requires = "source")]
    pub softmax: Vec<String>,
    /// Let the raw endpoint take PNG and JPEG images for this FP32 input (rank 4, channels
    /// first or last, 1 or 3 channels, height and width fixed): decoded, resized, scaled to
    /// 0-1 and normalised with --image-mean and --image-std.
    #[arg(long, value_name = "INPUT", requires = "source")]
    pub image: Option<String>,
    /// Per-channel mean subtracted from an --image input's 0-1 pixels (ImageNet:
    /// 0.485,0.456,0.406).
    #[arg(long, value_name = "M,M,M", requires = "image", value_delimiter = ',')]
    pub image_mean: Vec<f32>,
    /// Per-channel divisor after the mean (ImageNet: 0.229,0.224,0.225).
    #[arg(long, value_name = "S,S,S", requires = "image", value_delimiter = ',')]
    pub image_std: Vec<f32>,
    /// The --image input takes its channels in BGR order (models trained with OpenCV).
    #[arg(long, requires = "image")]
    pub image_bgr: bool,
    /// Require this inference backend on the device (`tract` or `onnxruntime`); by default a
    /// device runs the model on the first of its backends that loads it.
    #[arg(long, value_name = "BACKEND", requires = "source")]
    pub backend: Option<outpost_bundle::manifest::BackendKind>,
    /// Where to write the spec (default: next to the bundle, `NAME.bundle.toml`).
    #[arg(long, value_name = "FILE", requires = "source")]
    pub spec_out: Option<PathBuf>,
}

/// Parses `NAME=D1,D2,...`.
fn parse_shape(arg: &str) -> Result<(String, Vec<Dim>)> {
    let (name, dims) = arg
        .split_once('=')
        .with_context(|| format!("--input-shape `{arg}`: expected INPUT=D1,D2,..."))?;
    let dims = dims
        .split(',')
        .map(str::trim)
        .map(|d| match d.parse::<u64>() {
            Ok(n) => Ok(Dim::Fixed(n)),
            Err(_) if !d.is_empty() && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                Ok(Dim::Symbolic(d.to_owned()))
            }
            Err(_) => bail!("--input-shape `{arg}`: `{d}` is neither a size nor a name"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_owned(), dims))
}

/// `inputs` with the shapes `--input-shape` arguments give them.
pub(crate) fn pin(mut inputs: Vec<TensorSpec>, args: &[String]) -> Result<Vec<TensorSpec>> {
    for arg in args {
        let (input, dims) = parse_shape(arg)?;
        let all = || {
            inputs
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let names = all();
        let Some(spec) = inputs.iter_mut().find(|t| t.name == input) else {
            bail!("--input-shape `{arg}`: the model has no input `{input}` (its inputs: {names})");
        };
        if spec.shape.len() != dims.len() {
            bail!(
                "--input-shape `{arg}`: `{input}` has {} dimensions in the model, not {}",
                spec.shape.len(),
                dims.len()
            );
        }
        if let Some((j, (g, _))) = spec
            .shape
            .iter()
            .zip(&dims)
            .enumerate()
            .find(|(_, (g, d))| matches!((g, d), (Dim::Fixed(g), Dim::Fixed(d)) if g != d))
        {
            bail!("--input-shape `{arg}`: dimension {j} of `{input}` is fixed at {g} in the model");
        }
        spec.shape = dims;
    }
    Ok(inputs)
}

/// The spec for `onnx` (whose bytes are `bytes`), to be written at `spec_path`.
pub(crate) fn spec_for(
    args: &OnnxArgs,
    onnx: &Path,
    bytes: &[u8],
    spec_path: &Path,
    monitored: bool,
) -> Result<Spec> {
    let (Some(name), Some(version)) = (&args.name, &args.version) else {
        bail!("--onnx needs --name and --version");
    };
    let version: semver::Version = version
        .parse()
        .with_context(|| format!("--version `{version}` is not a semver version"))?;
    let inputs = outpost_inference::graph_inputs(bytes)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read `{}` as an ONNX model", onnx.display()))?;
    let inputs = pin(inputs, &args.input_shapes)?;
    let (inputs, outputs) = outpost_inference::signature(bytes, &inputs)
        .map_err(anyhow::Error::msg)
        .with_context(|| {
            // An operator tract lacks is not a matter of shapes: say which.
            let lacking = outpost_inference::inspect(bytes, &[])
                .map(|i| i.unsupported)
                .unwrap_or_default();
            if lacking.is_empty() {
                format!(
                    "tract cannot load `{}` with these input shapes (pin open dimensions with \
                     --input-shape INPUT=D1,D2,...; `outpost model inspect` shows the graph)",
                    onnx.display()
                )
            } else {
                format!(
                    "tract cannot load `{}`: it has no {} (export the model without it, e.g. \
                     with another converter option or opset, or do that step in a guest)",
                    onnx.display(),
                    lacking.join(", ")
                )
            }
        })?;
    let mut generic = serde_json::Map::new();
    let mut steps = serde_json::Map::new();
    for arg in &args.scale {
        let (input, rest) = arg
            .split_once('=')
            .with_context(|| format!("--scale `{arg}`: expected INPUT=SCALE[,OFFSET]"))?;
        let fp32 = inputs
            .iter()
            .any(|t| t.name == input && t.datatype.oip_name() == "FP32");
        if !fp32 {
            bail!("--scale `{arg}`: the model has no FP32 input `{input}`");
        }
        let (scale, offset) = rest.split_once(',').unwrap_or((rest, "0"));
        let number = |s: &str| {
            s.trim()
                .parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .with_context(|| format!("--scale `{arg}`: `{s}` is not a number"))
        };
        steps.insert(
            input.to_owned(),
            serde_json::json!({ "scale": number(scale)?, "offset": number(offset)? }),
        );
    }
    if !steps.is_empty() {
        generic.insert("inputs".into(), steps.into());
    }
    let mut steps = serde_json::Map::new();
    for output in &args.softmax {
        if !outputs
            .iter()
            .any(|t| &t.name == output && t.datatype.oip_name() == "FP32")
        {
            bail!("--softmax `{output}`: the model has no FP32 output `{output}`");
        }
        steps.insert(output.clone(), serde_json::json!({ "softmax": true }));
    }
    if !steps.is_empty() {
        generic.insert("outputs".into(), steps.into());
    }
    let image = match &args.image {
        None => None,
        Some(input) => {
            if args
                .scale
                .iter()
                .any(|a| a.split_once('=').is_some_and(|(i, _)| i == input))
            {
                bail!("--image `{input}` and --scale `{input}` together: the image step scales");
            }
            Some(image_step(args, input, &inputs)?)
        }
    };
    if let Some(step) = &image {
        generic.insert("image".into(), step.clone());
    }
    if monitored {
        let monitor = crate::baseline_data::monitor_for(&inputs, &outputs);
        generic.insert("monitor".into(), monitor.into());
    }
    let labels = match &args.labels {
        None => Vec::new(),
        Some(path) => crate::util::read_string(path)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let mut metadata = BTreeMap::new();
    if !generic.is_empty() {
        metadata.insert("generic".to_owned(), serde_json::Value::Object(generic));
    }
    Ok(Spec {
        name: name.clone(),
        version,
        security_counter: args.security_counter,
        guest: None,
        model: vec![SpecModel {
            name: "model".into(),
            path: relative_to(onnx, spec_path),
            inputs: inputs.clone(),
            outputs: outputs.clone(),
            backend: args.backend,
        }],
        // The endpoint's tensors are the graph's.
        api: Api {
            inputs,
            outputs,
            raw_content_types: if image.is_some() {
                vec!["image/png".into(), "image/jpeg".into()]
            } else {
                Vec::new()
            },
        },
        limits: ResourceLimits::default(),
        // Computed from the sample when the bundle is built.
        baseline: monitored.then(|| BaselineSpec::File(format!("{name}.baseline.json").into())),
        labels,
        metadata_file: None,
        metadata,
        serving: Default::default(),
    })
}

/// The generic guest's `image` step for input `name`: its layout, size and channels from the
/// input's shape, its normalisation from the flags.
fn image_step(args: &OnnxArgs, name: &str, inputs: &[TensorSpec]) -> Result<serde_json::Value> {
    let Some(input) = inputs.iter().find(|t| t.name == name) else {
        let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
        bail!(
            "--image `{name}`: the model has no input `{name}` (its inputs: {})",
            names.join(", ")
        );
    };
    let shape: Vec<String> = input.shape.iter().map(ToString::to_string).collect();
    let shape = shape.join(", ");
    if input.datatype.oip_name() != "FP32" || input.shape.len() != 4 {
        bail!(
            "--image `{name}`: an image input is FP32 of rank 4, `{name}` is {} [{shape}]",
            input.datatype.oip_name()
        );
    }
    let fixed = |d: &Dim| match d {
        Dim::Fixed(n) => Some(*n as usize),
        Dim::Symbolic(_) => None,
    };
    let dims: Vec<Option<usize>> = input.shape.iter().map(fixed).collect();
    let channels_ok = |c: Option<usize>| matches!(c, Some(1 | 3));
    let (layout, c, h, w) = if channels_ok(dims[1]) {
        ("NCHW", dims[1], dims[2], dims[3])
    } else if channels_ok(dims[3]) {
        ("NHWC", dims[3], dims[1], dims[2])
    } else {
        bail!("--image `{name}`: [{shape}] has no channel dimension of 1 or 3 second or last");
    };
    let (Some(c), Some(h), Some(w)) = (c, h, w) else {
        bail!(
            "--image `{name}`: its height and width must be fixed to resize to them: pin them \
             with --input-shape {name}=... ([{shape}] now)"
        );
    };
    if matches!(dims[0], Some(n) if n != 1) {
        bail!("--image `{name}`: an image is one item, and [{shape}] fixes the batch above 1");
    }
    for (flag, values) in [
        ("--image-mean", &args.image_mean),
        ("--image-std", &args.image_std),
    ] {
        if !values.is_empty() && values.len() != c {
            bail!("{flag}: {} values for {c} channel(s)", values.len());
        }
        if values.iter().any(|v| !v.is_finite()) {
            bail!("{flag}: every value must be a number");
        }
    }
    if args.image_std.contains(&0.0) {
        bail!("--image-std: a channel's divisor cannot be 0");
    }
    Ok(serde_json::json!({
        "input": name,
        "layout": layout,
        "height": h,
        "width": w,
        "channels": c,
        "bgr": args.image_bgr,
        "mean": args.image_mean,
        "std": args.image_std,
    }))
}

/// `file` as the spec at `spec` should name it: by its name when they share a directory,
/// otherwise by its absolute path.
fn relative_to(file: &Path, spec: &Path) -> PathBuf {
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let file = absolute(file);
    let dir = spec
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| absolute(Path::new(".")), absolute);
    match file.strip_prefix(&dir) {
        Ok(rel) => rel.to_path_buf(),
        Err(_) => file,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn input_shapes_parse_sizes_and_names() {
        let (name, dims) = parse_shape("image=1,3,batch_2,224").unwrap();
        assert_eq!(name, "image");
        assert_eq!(
            dims,
            [
                Dim::Fixed(1),
                Dim::Fixed(3),
                Dim::Symbolic("batch_2".into()),
                Dim::Fixed(224)
            ]
        );
        assert!(parse_shape("image").is_err());
        assert!(parse_shape("image=1,,2").is_err());
        assert!(parse_shape("image=1,a-b").is_err());
    }
}
