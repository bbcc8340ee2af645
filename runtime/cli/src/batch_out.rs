//! Where `outpost batch` writes: JSON Lines, or `.npy` arrays (one per output of the bundle's
//! `[api]`, one row per input row), each resumable from what it already holds.
//!
//! An array output is written with its final shape in the header (the job knows how many rows
//! it answers), so the rows a file holds are its length past the header; a row cut short by an
//! interruption is dropped and redone. A row that failed is written as NaN (zero for integer
//! and boolean outputs) and its error goes, as a JSON line `{"error", "row"}`, to
//! `OUTPUT.errors.jsonl`.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use outpost_bundle::manifest::{DataType, Dim, TensorSpec};
use outpost_inference::Tensor;

/// One answer to write.
pub(crate) enum Out {
    /// A JSON line (an OIP response).
    Line(String),
    /// One row of every output, each shaped `[1, …]`, for the input row numbered first.
    Row(u64, Vec<Tensor>),
    /// The input failed: its error line (`{"error", "line"|"row"}`).
    Failed(String),
}

/// The NumPy `descr` of a fixed-size element type.
fn descr(t: DataType) -> Option<&'static str> {
    Some(match t {
        DataType::Bool => "|b1",
        DataType::U8 => "|u1",
        DataType::U16 => "<u2",
        DataType::U32 => "<u4",
        DataType::U64 => "<u8",
        DataType::I8 => "|i1",
        DataType::I16 => "<i2",
        DataType::I32 => "<i4",
        DataType::I64 => "<i8",
        DataType::F16 => "<f2",
        DataType::F32 => "<f4",
        DataType::F64 => "<f8",
        DataType::Bytes => return None,
    })
}

/// A `.npy` version 1.0 header for `shape` of `descr`, padded to 64 bytes as NumPy writes it.
pub(crate) fn npy_header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// The bytes of one failed row: NaN for floats, zero otherwise.
fn fill(t: DataType, elements: usize) -> Vec<u8> {
    match t {
        DataType::F32 => f32::NAN.to_le_bytes().repeat(elements),
        DataType::F64 => f64::NAN.to_le_bytes().repeat(elements),
        DataType::F16 => 0x7e00u16.to_le_bytes().repeat(elements),
        other => vec![0; elements * other.element_size().unwrap_or(1)],
    }
}

/// One output's array file.
pub(crate) struct Array {
    name: String,
    datatype: DataType,
    elements: usize,
    row_bytes: usize,
    path: PathBuf,
    file: BufWriter<File>,
}

/// The output of a job.
pub(crate) enum Sink {
    /// JSON Lines.
    Lines {
        path: PathBuf,
        file: BufWriter<File>,
    },
    /// One `.npy` per output, and the failed rows' errors.
    Arrays {
        arrays: Vec<Array>,
        errors: BufWriter<File>,
        errors_path: PathBuf,
    },
}

/// Complete lines of the file at `path` (a line cut short is removed from it).
pub(crate) fn complete_lines(path: &Path) -> Result<u64> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot open `{}`", path.display())),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if keep < bytes.len() {
        file.set_len(keep as u64)?;
        file.seek(SeekFrom::End(0))?;
    }
    Ok(bytes[..keep].iter().filter(|&&b| b == b'\n').count() as u64)
}

fn append(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write `{}`", path.display()))?,
    ))
}

fn too_long(path: &Path, held: u64, total: u64) -> anyhow::Error {
    anyhow::anyhow!(
        "`{}` already holds {held} answers, more than the {total} this job writes: not its \
         output (--overwrite starts it again)",
        path.display()
    )
}

impl Sink {
    /// JSON Lines at `path`, and how many answers it already holds.
    pub(crate) fn lines(path: &Path, total: u64, overwrite: bool) -> Result<(Self, u64)> {
        if overwrite {
            let _ = std::fs::remove_file(path);
        }
        let held = complete_lines(path)?;
        if held > total {
            return Err(too_long(path, held, total));
        }
        let file = append(path)?;
        Ok((
            Self::Lines {
                path: path.to_owned(),
                file,
            },
            held,
        ))
    }

    /// `.npy` arrays for `outputs` at `path` (one output) or `STEM.NAME.npy` beside it
    /// (several), `total` rows each, and how many rows they already hold. `index` maps a
    /// job-local row to its input row, to keep the error lines of rows already written.
    pub(crate) fn arrays(
        path: &Path,
        input: &Path,
        outputs: &[TensorSpec],
        total: u64,
        overwrite: bool,
        local_of: impl Fn(u64) -> u64,
    ) -> Result<(Self, u64)> {
        if outputs.is_empty() {
            bail!(
                "a .npy output holds the bundle's declared outputs, and its [api] declares none: \
                 write JSON Lines (.jsonl)"
            );
        }
        let stem = path.with_extension("");
        let mut plans = Vec::new();
        for o in outputs {
            if o.name.contains(['/', '\\']) || o.name.starts_with('.') {
                bail!(
                    "output `{}` cannot name a file: write JSON Lines (.jsonl)",
                    o.name
                );
            }
            let Some(d) = descr(o.datatype) else {
                bail!(
                    "output `{}` is BYTES, which a .npy array cannot hold: write JSON Lines",
                    o.name
                );
            };
            let mut dims = Vec::new();
            for d in o.shape.iter().skip(1) {
                match d {
                    Dim::Fixed(n) => dims.push(*n),
                    Dim::Symbolic(s) => bail!(
                        "output `{}` has a free dimension `{s}` after the first, so its rows may \
                         differ in size: write JSON Lines",
                        o.name
                    ),
                }
            }
            let elements: u64 = dims.iter().product();
            let elements = usize::try_from(elements).context("an output row is too large")?;
            let file = if outputs.len() == 1 {
                path.to_owned()
            } else {
                PathBuf::from(format!("{}.{}.npy", stem.display(), o.name))
            };
            let mut shape = vec![total];
            shape.extend(&dims);
            plans.push((o, d, elements, file, npy_header(d, &shape)));
        }
        let errors_path = PathBuf::from(format!("{}.errors.jsonl", stem.display()));
        let is_input = |p: &Path| match (std::fs::canonicalize(p), std::fs::canonicalize(input)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if let Some(p) = plans
            .iter()
            .map(|(.., file, _)| file.as_path())
            .chain([errors_path.as_path()])
            .find(|p| is_input(p))
        {
            bail!(
                "the answers would go to `{}`, the input file: give --output another name",
                p.display()
            );
        }
        if overwrite {
            for (.., file, _) in &plans {
                let _ = std::fs::remove_file(file);
            }
            let _ = std::fs::remove_file(&errors_path);
        }
        // Rows held: the fewest whole rows of any output.
        let mut held = u64::MAX;
        for (o, _, elements, file, header) in &plans {
            let row_bytes = (elements * o.datatype.element_size().unwrap_or(1)) as u64;
            let rows = match File::open(file) {
                Ok(mut f) => {
                    // Only the header is read: the rows are the length past it.
                    let mut head = vec![0u8; header.len()];
                    let whole = f.read_exact(&mut head).is_ok();
                    if !whole || &head != header {
                        bail!(
                            "`{}` is not this job's output (another shape or type): \
                             --overwrite starts it again",
                            file.display()
                        );
                    }
                    let body = f.metadata()?.len() - header.len() as u64;
                    body.checked_div(row_bytes).unwrap_or(total)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read `{}`", file.display()));
                }
            };
            held = held.min(rows);
        }
        if held > total {
            return Err(too_long(path, held, total));
        }
        let mut arrays = Vec::new();
        for (o, _, elements, file, header) in plans {
            let row_bytes = elements * o.datatype.element_size().unwrap_or(1);
            let mut f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&file)
                .with_context(|| format!("cannot write `{}`", file.display()))?;
            f.set_len(header.len() as u64 + held * row_bytes as u64)?;
            f.seek(SeekFrom::Start(0))?;
            f.write_all(&header)?;
            f.seek(SeekFrom::End(0))?;
            arrays.push(Array {
                name: o.name.clone(),
                datatype: o.datatype,
                elements,
                row_bytes,
                path: file,
                file: BufWriter::new(f),
            });
        }
        // Keep the errors of rows already written; drop those of rows to be redone.
        let kept: Vec<String> = match File::open(&errors_path) {
            Ok(f) => BufReader::new(f)
                .lines()
                .map_while(std::result::Result::ok)
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["row"].as_u64())
                        .is_some_and(|row| local_of(row) < held)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        // Rewritten aside and renamed over, so a cut here loses no error line.
        let fresh = PathBuf::from(format!("{}.tmp", errors_path.display()));
        {
            let mut f = BufWriter::new(
                File::create(&fresh)
                    .with_context(|| format!("cannot write `{}`", fresh.display()))?,
            );
            for line in kept {
                writeln!(f, "{line}")?;
            }
            f.flush()?;
        }
        std::fs::rename(&fresh, &errors_path)
            .with_context(|| format!("cannot write `{}`", errors_path.display()))?;
        let errors = append(&errors_path)?;
        Ok((
            Self::Arrays {
                arrays,
                errors,
                errors_path,
            },
            held,
        ))
    }

    /// Writes one answer; whether it was an error.
    pub(crate) fn write(&mut self, out: Out) -> Result<bool> {
        match (self, out) {
            (Self::Lines { file, .. }, Out::Line(line)) => {
                writeln!(file, "{line}")?;
                Ok(false)
            }
            (Self::Lines { file, .. }, Out::Failed(line)) => {
                writeln!(file, "{line}")?;
                Ok(true)
            }
            (Self::Arrays { arrays, errors, .. }, out) => {
                // The error reaches the disk before its row does: a row held after a cut has
                // its error line too.
                let failed = |errors: &mut BufWriter<File>, arrays: &mut [Array], line: &str| {
                    writeln!(errors, "{line}")?;
                    errors.flush()?;
                    for a in arrays.iter_mut() {
                        a.file.write_all(&fill(a.datatype, a.elements))?;
                    }
                    Ok::<_, std::io::Error>(true)
                };
                match out {
                    Out::Row(at, tensors) => {
                        let mut rows = Vec::with_capacity(arrays.len());
                        for a in arrays.iter() {
                            match tensors.iter().find(|t| t.name == a.name) {
                                Some(t)
                                    if t.datatype == a.datatype && t.data.len() == a.row_bytes =>
                                {
                                    rows.push(t.data.as_slice());
                                }
                                _ => {
                                    let line = serde_json::json!({
                                        "error": format!(
                                            "the answer's `{}` is not the declared {} row of {} elements",
                                            a.name, a.datatype.oip_name(), a.elements
                                        ),
                                        "row": at,
                                    })
                                    .to_string();
                                    return Ok(failed(errors, arrays, &line)?);
                                }
                            }
                        }
                        for (a, row) in arrays.iter_mut().zip(rows) {
                            a.file.write_all(row)?;
                        }
                        Ok(false)
                    }
                    Out::Failed(line) | Out::Line(line) => Ok(failed(errors, arrays, &line)?),
                }
            }
            (Self::Lines { .. }, Out::Row(..)) => {
                bail!("an array row has no place in a JSON Lines output")
            }
        }
    }

    /// Flushes everything written so far.
    pub(crate) fn flush(&mut self) -> Result<()> {
        match self {
            Self::Lines { path, file } => file
                .flush()
                .with_context(|| format!("cannot write `{}`", path.display())),
            Self::Arrays {
                arrays,
                errors,
                errors_path,
            } => {
                errors
                    .flush()
                    .with_context(|| format!("cannot write `{}`", errors_path.display()))?;
                for a in arrays.iter_mut() {
                    a.file
                        .flush()
                        .with_context(|| format!("cannot write `{}`", a.path.display()))?;
                }
                Ok(())
            }
        }
    }

    /// The files written, for the summary.
    pub(crate) fn files(&self) -> String {
        match self {
            Self::Lines { path, .. } => format!("`{}`", path.display()),
            Self::Arrays {
                arrays,
                errors_path,
                ..
            } => {
                let names: Vec<String> = arrays
                    .iter()
                    .map(|a| format!("`{}`", a.path.display()))
                    .collect();
                format!(
                    "{} (errors in `{}`)",
                    names.join(", "),
                    errors_path.display()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn headers_are_what_numpy_writes() {
        let h = npy_header("<f4", &[3, 2]);
        assert_eq!(h.len() % 64, 0);
        let text = String::from_utf8_lossy(&h[10..]);
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }"));
        assert!(text.ends_with('\n'));
        let npy = crate::samples::Npy::parse(&[h, vec![0; 24]].concat()).unwrap();
        assert_eq!(npy.shape, vec![3, 2]);
        assert!(String::from_utf8_lossy(&npy_header("<i8", &[5])).contains("(5,)"));
    }

    fn row(values: [f32; 2]) -> Out {
        Out::Row(
            0,
            vec![Tensor {
                name: "y".into(),
                datatype: DataType::F32,
                shape: vec![1, 2],
                data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            }],
        )
    }

    #[test]
    fn arrays_hold_failed_rows_as_nan_and_carry_on_after_a_cut() {
        let dir = std::env::temp_dir().join(format!("outpost-batch-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.npy");
        let spec = TensorSpec {
            name: "y".into(),
            datatype: DataType::F32,
            shape: vec![Dim::Symbolic("n".into()), Dim::Fixed(2)],
        };
        let open = |overwrite| {
            Sink::arrays(
                &path,
                Path::new("in.npy"),
                std::slice::from_ref(&spec),
                4,
                overwrite,
                |r| r,
            )
            .unwrap()
        };
        let (mut sink, held) = open(true);
        assert_eq!(held, 0);
        assert!(!sink.write(row([1.0, 2.0])).unwrap());
        assert!(
            sink.write(Out::Failed(r#"{"error":"bad","row":1}"#.into()))
                .unwrap()
        );
        assert!(!sink.write(row([5.0, 6.0])).unwrap());
        // A row of the wrong size is an error row, not a torn file.
        let wrong = Out::Row(
            3,
            vec![Tensor {
                name: "y".into(),
                datatype: DataType::F32,
                shape: vec![1, 3],
                data: vec![0; 12],
            }],
        );
        assert!(sink.write(wrong).unwrap());
        sink.flush().unwrap();
        drop(sink);
        let bytes = std::fs::read(&path).unwrap();
        let npy = crate::samples::Npy::parse(&bytes).unwrap();
        assert_eq!(npy.shape, vec![4, 2]);
        assert_eq!(&npy.values[..2], &[1.0, 2.0]);
        assert!(npy.values[2].is_nan() && npy.values[3].is_nan());
        assert_eq!(&npy.values[4..6], &[5.0, 6.0]);
        let errors = std::fs::read_to_string(dir.join("out.errors.jsonl")).unwrap();
        assert_eq!(errors.lines().count(), 2, "{errors}");
        // Cut in the middle of the third row: two rows are held, the rest is redone, and the
        // error of a redone row goes.
        std::fs::write(&path, &bytes[..bytes.len() - 12]).unwrap();
        let (_, held) = open(false);
        assert_eq!(held, 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            bytes.len() - 16
        );
        let errors = std::fs::read_to_string(dir.join("out.errors.jsonl")).unwrap();
        assert_eq!(
            errors.lines().count(),
            1,
            "row 1's error stays, row 3's goes: {errors}"
        );
        // Another job's array is refused.
        let other = TensorSpec {
            shape: vec![Dim::Symbolic("n".into()), Dim::Fixed(3)],
            ..spec.clone()
        };
        assert!(Sink::arrays(&path, Path::new("in.npy"), &[other], 4, false, |r| r).is_err());
        // Nor may an answer land on the input.
        let input = dir.join("out.y.npy");
        std::fs::write(&input, b"rows").unwrap();
        let two = [
            spec.clone(),
            TensorSpec {
                name: "z".into(),
                ..spec.clone()
            },
        ];
        let Err(err) = Sink::arrays(&path, &input, &two, 4, true, |r| r) else {
            panic!("an output on the input was accepted");
        };
        assert!(err.to_string().contains("the input file"), "{err}");
        assert_eq!(std::fs::read(&input).unwrap(), b"rows");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
