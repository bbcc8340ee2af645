//! Inputs a command runs through a model: `.npy` arrays (read whole, or streamed row by row)
//! and the tensors made from them.

use std::io::Read;

use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::sync::Arc;

use outpost_bundle::manifest::{DataType, ResourceLimits, TensorSpec};
use outpost_engine::{CallLimits, Engine, Guest, GuestContext};
use outpost_inference::Tensor;

/// A guest and its models loaded in this process as a device loads them (models with their
/// declared inputs pinned, the bundle's limits on every call), for commands that run a bundle
/// locally.
pub(crate) fn load_guest<'a>(
    label: String,
    guest: &[u8],
    models: impl IntoIterator<Item = (&'a str, &'a [u8], &'a [TensorSpec])>,
    metadata: std::collections::BTreeMap<String, serde_json::Value>,
    limits: ResourceLimits,
) -> Result<(Engine, Guest, Arc<GuestContext>)> {
    let engine = Engine::new().context("cannot start the WebAssembly engine")?;
    let (compiled, _) = engine
        .compile(guest)
        .map_err(|e| anyhow::anyhow!("{e:#}"))
        .context("the bundle's guest cannot be loaded")?;
    let backend = outpost_inference::default_backend();
    let mut loaded = HashMap::new();
    for (name, bytes, inputs) in models {
        let model = backend
            .load(bytes, inputs)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("ONNX model `{name}` cannot be loaded"))?;
        loaded.insert(name.to_owned(), model);
    }
    let context = Arc::new(GuestContext {
        label,
        models: loaded,
        metadata,
        limits: CallLimits {
            memory_bytes: limits.memory_bytes,
            timeout_ms: limits.timeout_ms,
            max_tensor_bytes: limits.max_tensor_bytes,
        },
    });
    Ok((engine, compiled, context))
}

/// `values` as a tensor of `datatype`.
pub(crate) fn pack(
    name: &str,
    datatype: DataType,
    shape: Vec<u64>,
    values: &[f64],
) -> Result<Tensor> {
    let integral = || {
        values
            .iter()
            .all(|v| v.fract() == 0.0)
            .then_some(())
            .with_context(|| format!("input `{name}` is {datatype:?}, the sample has fractions"))
    };
    let data: Vec<u8> = match datatype {
        DataType::F32 => values
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect(),
        DataType::F64 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
        DataType::I64 => {
            integral()?;
            values
                .iter()
                .flat_map(|&v| (v as i64).to_le_bytes())
                .collect()
        }
        DataType::I32 => {
            integral()?;
            values
                .iter()
                .flat_map(|&v| (v as i32).to_le_bytes())
                .collect()
        }
        DataType::U8 | DataType::Bool => {
            integral()?;
            values.iter().map(|&v| v as u8).collect()
        }
        other => bail!("a .npy array cannot fill a {other:?} input (`{name}`); use JSON Lines"),
    };
    Ok(Tensor {
        name: name.to_owned(),
        datatype,
        shape,
        data,
    })
}

/// A numeric `.npy` array (format 1 to 3, little-endian, C order), its elements as `f64`.
#[derive(Debug)]
pub(crate) struct Npy {
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Elements, row-major.
    pub values: Vec<f64>,
}

impl Npy {
    /// Reads a whole array.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self> {
        let mut reader = NpyReader::open(bytes)?;
        let shape = reader.shape.clone();
        let rows = reader.rows();
        let values = match reader.read_rows(rows)? {
            Some((_, values)) => values,
            None => Vec::new(),
        };
        if !reader.at_end()? {
            bail!("the file holds more bytes than the array's shape {shape:?} needs");
        }
        Ok(Self { shape, values })
    }
}

/// A `.npy` array read row by row (along its first axis), for inputs larger than memory.
pub(crate) struct NpyReader<R> {
    /// Dimensions.
    pub shape: Vec<u64>,
    descr: String,
    size: usize,
    decode: fn(&[u8]) -> f64,
    row_elems: usize,
    rows_left: u64,
    reader: R,
}

impl<R: Read> NpyReader<R> {
    /// Reads the header.
    pub(crate) fn open(mut reader: R) -> Result<Self> {
        let mut magic = [0u8; 8];
        reader
            .read_exact(&mut magic)
            .context("not a .npy file (too short)")?;
        if &magic[..6] != b"\x93NUMPY" {
            bail!("not a .npy file (no NUMPY magic)");
        }
        let header_len = match magic[6] {
            1 => {
                let mut n = [0u8; 2];
                reader
                    .read_exact(&mut n)
                    .context("the .npy header is cut short")?;
                usize::from(u16::from_le_bytes(n))
            }
            2 | 3 => {
                let mut n = [0u8; 4];
                reader
                    .read_exact(&mut n)
                    .context("the .npy header is cut short")?;
                u32::from_le_bytes(n) as usize
            }
            _ => bail!("unknown .npy format version"),
        };
        if header_len > 1 << 20 {
            bail!("the .npy header is {header_len} bytes long: not a .npy file");
        }
        let mut header = vec![0u8; header_len];
        reader
            .read_exact(&mut header)
            .context("the .npy header is cut short")?;
        let header = String::from_utf8(header).context("the .npy header is not text")?;
        let field = |key: &str| -> Result<&str> {
            let at = header
                .find(&format!("'{key}'"))
                .with_context(|| format!("the .npy header has no `{key}`"))?;
            let after = &header[at + key.len() + 2..];
            Ok(after.trim_start().trim_start_matches(':').trim_start())
        };
        let descr = field("descr")?
            .strip_prefix('\'')
            .and_then(|d| d.split('\'').next())
            .context("the .npy header's `descr` is not a string")?
            .to_owned();
        if field("fortran_order")?.starts_with("True") {
            bail!("the array is in Fortran order; save it in C order (numpy's default)");
        }
        let shape = field("shape")?
            .strip_prefix('(')
            .and_then(|s| s.split(')').next())
            .context("the .npy header's `shape` is not a tuple")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().context("the .npy shape is not numbers"))
            .collect::<Result<Vec<_>>>()?;
        let (order, kind) = descr.split_at(descr.len().min(1));
        if order == ">" {
            bail!("the array is big-endian (`{descr}`); save it little-endian");
        }
        let size: usize = kind.get(1..).and_then(|s| s.parse().ok()).unwrap_or(0);
        let decode: fn(&[u8]) -> f64 = match kind {
            "f4" => |b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "f8" => |b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            "i1" => |b| f64::from(b[0] as i8),
            "u1" | "b1" => |b| f64::from(b[0]),
            "i2" => |b| f64::from(i16::from_le_bytes([b[0], b[1]])),
            "u2" => |b| f64::from(u16::from_le_bytes([b[0], b[1]])),
            "i4" => |b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "u4" => |b| f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "i8" => |b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
            "u8" => |b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64,
            _ => bail!("the array's element type `{descr}` is not a number type"),
        };
        let row_elems = shape
            .get(1..)
            .unwrap_or_default()
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
            .context("the .npy shape is too large")?;
        let rows_left = shape.first().copied().unwrap_or(1);
        Ok(Self {
            shape,
            descr,
            size,
            decode,
            row_elems,
            rows_left,
            reader,
        })
    }

    /// Rows along the first axis (1 for a scalar).
    pub(crate) fn rows(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Skips `n` rows.
    pub(crate) fn skip_rows(&mut self, n: u64) -> Result<()> {
        let n = n.min(self.rows_left);
        let bytes = n * (self.row_elems * self.size) as u64;
        let copied = std::io::copy(&mut (&mut self.reader).take(bytes), &mut std::io::sink())?;
        if copied != bytes {
            bail!("the array is cut short");
        }
        self.rows_left -= n;
        Ok(())
    }

    /// The next at most `n` rows and how many they are; `None` at the end.
    pub(crate) fn read_rows(&mut self, n: u64) -> Result<Option<(u64, Vec<f64>)>> {
        Ok(self
            .read_rows_raw(n)?
            .map(|(n, bytes)| (n, self.decode_values(&bytes))))
    }

    /// The values of elements read by [`Self::read_rows_raw`].
    pub(crate) fn decode_values(&self, bytes: &[u8]) -> Vec<f64> {
        bytes.chunks_exact(self.size).map(self.decode).collect()
    }

    /// Whether the array's elements are exactly those of a `datatype` tensor (same type and
    /// width, little-endian), so its bytes can be used as they are.
    pub(crate) fn holds(&self, datatype: DataType) -> bool {
        let kind = self.descr.get(1..).unwrap_or_default();
        matches!(
            (kind, datatype),
            ("f4", DataType::F32)
                | ("f8", DataType::F64)
                | ("i1", DataType::I8)
                | ("u1", DataType::U8)
                | ("i2", DataType::I16)
                | ("u2", DataType::U16)
                | ("i4", DataType::I32)
                | ("u4", DataType::U32)
                | ("i8", DataType::I64)
                | ("u8", DataType::U64)
        )
    }

    /// The next at most `n` rows as the file's bytes, and how many rows they are; `None` at
    /// the end.
    pub(crate) fn read_rows_raw(&mut self, n: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let n = n.min(self.rows_left);
        if n == 0 {
            return Ok(None);
        }
        let bytes = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(self.row_elems))
            .and_then(|e| e.checked_mul(self.size))
            .context("too many rows at once")?;
        let mut out = vec![0u8; bytes];
        self.reader.read_exact(&mut out).with_context(|| {
            format!(
                "the array's shape {:?} of `{}` needs more bytes than the file holds",
                self.shape, self.descr
            )
        })?;
        self.rows_left -= n;
        Ok(Some((n, out)))
    }

    /// Whether nothing follows the last row.
    pub(crate) fn at_end(&mut self) -> Result<bool> {
        let mut one = [0u8; 1];
        Ok(self.rows_left == 0 && self.reader.read(&mut one)? == 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn npy(descr: &str, shape: &[u64], body: &[u8]) -> Vec<u8> {
        outpost_testkit::npy_bytes(descr, shape, body)
    }

    #[test]
    fn npy_arrays_read_as_numpy_writes_them() {
        let body: Vec<u8> = [1.5f32, -2.0, 3.0, 4.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = Npy::parse(&npy("<f4", &[2, 2], &body)).unwrap();
        assert_eq!(a.shape, [2, 2]);
        assert_eq!(a.values, [1.5, -2.0, 3.0, 4.25]);
        let a = Npy::parse(&npy("|u1", &[3], &[1, 2, 255])).unwrap();
        assert_eq!((a.shape, a.values), (vec![3], vec![1.0, 2.0, 255.0]));
        let short = Npy::parse(&npy("<f4", &[3, 2], &body)).unwrap_err();
        assert!(
            format!("{short:#}").contains("needs more bytes"),
            "{short:#}"
        );
        let big = Npy::parse(&npy(">f4", &[4], &body)).unwrap_err();
        assert!(format!("{big:#}").contains("big-endian"));
        let text = Npy::parse(&npy("<U3", &[4], &body)).unwrap_err();
        assert!(format!("{text:#}").contains("not a number type"));
        assert!(Npy::parse(b"PK\x03\x04").is_err());
    }

    #[test]
    fn npy_rows_stream_in_order_and_can_be_skipped() {
        let body: Vec<u8> = (0..12u8).collect();
        let file = npy("|u1", &[6, 2], &body);
        let mut r = NpyReader::open(&file[..]).unwrap();
        assert_eq!(r.rows(), 6);
        r.skip_rows(2).unwrap();
        let (n, v) = r.read_rows(3).unwrap().unwrap();
        assert_eq!((n, v), (3, vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0]));
        let (n, v) = r.read_rows(3).unwrap().unwrap();
        assert_eq!((n, v), (1, vec![10.0, 11.0]));
        assert!(r.read_rows(3).unwrap().is_none());
        assert!(r.at_end().unwrap());
    }
}
