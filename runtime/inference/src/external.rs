//! ONNX files that keep their tensors in external data files (`onnx.save(...,
//! save_as_external_data=True)`, MLflow's default for the onnx flavor): the tensors moved into
//! the model, so it loads from its bytes alone, as a bundle carries it.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use prost::Message as _;
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto, tensor_proto::DataLocation};
use tract_onnx::prelude::Framework;

use crate::LoadError;

/// The ONNX model at `path` with every tensor it keeps in external data files (named relative
/// to its directory) read in, and the files read. A model without external data comes back as
/// it is. A data file that is missing, outside the model's directory or shorter than a tensor
/// says so, naming the tensor and the file.
pub fn inline_external_data(path: &Path) -> Result<(Vec<u8>, Vec<PathBuf>), LoadError> {
    let err = |m: String| LoadError(m);
    let bytes =
        std::fs::read(path).map_err(|e| err(format!("cannot read `{}`: {e}", path.display())))?;
    let mut proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| err(format!("`{}` is not an ONNX model: {e:#}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = BTreeMap::new();
    if let Some(graph) = proto.graph.as_mut() {
        inline_graph(graph, dir, &mut files)?;
    }
    if files.is_empty() {
        return Ok((bytes, Vec::new()));
    }
    Ok((
        ModelProto::encode_to_vec(&proto),
        files.into_keys().collect(),
    ))
}

fn inline_graph(
    graph: &mut GraphProto,
    dir: &Path,
    files: &mut BTreeMap<PathBuf, Vec<u8>>,
) -> Result<(), LoadError> {
    for t in &mut graph.initializer {
        inline_tensor(t, dir, files)?;
    }
    for node in &mut graph.node {
        for a in &mut node.attribute {
            if let Some(t) = a.t.as_mut() {
                inline_tensor(t, dir, files)?;
            }
            for t in &mut a.tensors {
                inline_tensor(t, dir, files)?;
            }
            if let Some(g) = a.g.as_mut() {
                inline_graph(g, dir, files)?;
            }
            for g in &mut a.graphs {
                inline_graph(g, dir, files)?;
            }
        }
    }
    Ok(())
}

fn inline_tensor(
    t: &mut TensorProto,
    dir: &Path,
    files: &mut BTreeMap<PathBuf, Vec<u8>>,
) -> Result<(), LoadError> {
    if t.data_location != Some(DataLocation::External as i32) {
        return Ok(());
    }
    let name = t.name.clone();
    let entry = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let location = entry("location").ok_or_else(|| {
        LoadError(format!(
            "tensor `{name}` is external but names no data file"
        ))
    })?;
    let number = |key: &str| -> Result<Option<usize>, LoadError> {
        entry(key)
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    LoadError(format!(
                        "tensor `{name}`: external data {key} `{v}` is not a number"
                    ))
                })
            })
            .transpose()
    };
    let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
    // Only files beside the model, by a plain relative name.
    let relative = Path::new(&location);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(LoadError(format!(
            "tensor `{name}` keeps its data in `{location}`, outside the model's directory"
        )));
    }
    let file = dir.join(relative);
    if !files.contains_key(&file) {
        let data = std::fs::read(&file).map_err(|e| {
            LoadError(format!(
                "tensor `{name}` keeps its data in `{}`, which cannot be read: {e}",
                file.display()
            ))
        })?;
        files.insert(file.clone(), data);
    }
    let data = &files[&file];
    let end = match length {
        Some(n) => offset.checked_add(n),
        None => Some(data.len()),
    };
    let Some(slice) = end.and_then(|end| data.get(offset..end)) else {
        return Err(LoadError(format!(
            "tensor `{name}`: `{}` has {} bytes, fewer than offset {offset} and length {} need",
            file.display(),
            data.len(),
            length.map_or_else(|| "the rest".to_owned(), |n| n.to_string())
        )));
    };
    t.raw_data = slice.to_vec();
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tract_onnx::pb::StringStringEntryProto;

    use crate::Backend as _;

    use super::*;

    /// The digits model with its first initializer moved to external data at `location`.
    fn externalised(dir: &Path, location: &str, cut: usize) -> PathBuf {
        let mut proto = tract_onnx::onnx()
            .proto_model_for_read(&mut &outpost_examples::DIGITS_ONNX[..])
            .unwrap();
        let t = &mut proto.graph.as_mut().unwrap().initializer[0];
        let raw: Vec<u8> = if t.raw_data.is_empty() {
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        } else {
            std::mem::take(&mut t.raw_data)
        };
        t.float_data.clear();
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: key.into(),
            value,
        };
        t.external_data = vec![
            entry("location", location.into()),
            entry("offset", "16".into()),
            entry("length", raw.len().to_string()),
        ];
        t.data_location = Some(DataLocation::External as i32);
        let mut file = vec![0u8; 16];
        file.extend_from_slice(&raw[..raw.len() - cut]);
        std::fs::write(dir.join("weights.bin"), file).unwrap();
        let path = dir.join("model.onnx");
        std::fs::write(&path, ModelProto::encode_to_vec(&proto)).unwrap();
        path
    }

    #[test]
    fn external_data_is_read_in_and_only_from_beside_the_model() {
        let dir = std::env::temp_dir().join(format!("outpost-external-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = externalised(&dir, "weights.bin", 0);
        let (bytes, files) = inline_external_data(&path).unwrap();
        assert_eq!(files, [dir.join("weights.bin")]);
        let model = crate::Tract.load(&bytes, &[]).unwrap();
        let reference = crate::Tract
            .load(outpost_examples::DIGITS_ONNX, &[])
            .unwrap();
        let input = crate::Tensor {
            name: "input".into(),
            datatype: outpost_bundle::manifest::DataType::F32,
            shape: vec![1, 64],
            data: (0..64)
                .flat_map(|i| (i as f32 / 64.0).to_le_bytes())
                .collect(),
        };
        assert_eq!(
            model.run(vec![input.clone()], 1 << 20).unwrap(),
            reference.run(vec![input], 1 << 20).unwrap()
        );
        // A model without external data comes back byte for byte.
        let plain = dir.join("plain.onnx");
        std::fs::write(&plain, outpost_examples::DIGITS_ONNX).unwrap();
        assert_eq!(
            inline_external_data(&plain).unwrap().0,
            outpost_examples::DIGITS_ONNX
        );

        for (location, cut, wanted) in [
            ("../weights.bin", 0, "outside the model's directory"),
            ("/etc/passwd", 0, "outside the model's directory"),
            ("missing.bin", 0, "which cannot be read"),
            ("weights.bin", 4, "fewer than offset 16"),
        ] {
            let path = externalised(&dir, location, cut);
            let err = inline_external_data(&path).unwrap_err().0;
            assert!(err.contains(wanted), "{location}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
