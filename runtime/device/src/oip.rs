//! Open Inference Protocol v2 request and response bodies: JSON tensors and the binary tensor
//! data extension (`Inference-Header-Content-Length`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use outpost_bundle::manifest::DataType;

use crate::error::InferError;
use outpost_inference::Tensor;

/// Header naming the length of the JSON part of a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTensor {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// An output a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Its name.
    pub name: String,
    /// Whether it goes as binary data.
    pub binary: bool,
    /// The classification extension: the top `k` classes as `value:index[:label]` strings
    /// instead of the tensor.
    pub classification: Option<u64>,
}

/// A decoded inference request.
#[derive(Debug)]
pub struct Request {
    /// The client's request id, echoed back.
    pub id: Option<String>,
    /// Input tensors.
    pub inputs: Vec<Tensor>,
    /// Outputs to return (all when empty).
    pub outputs: Vec<Wanted>,
    /// Whether every output goes as binary data.
    pub binary_output: bool,
}

fn bad(msg: impl Into<String>) -> InferError {
    InferError::BadRequest(msg.into())
}

/// Parses a datatype name (`FP32`, ...).
pub fn parse_datatype(name: &str) -> Result<DataType, InferError> {
    DataType::from_oip_name(name).ok_or_else(|| bad(format!("unknown datatype `{name}`")))
}

fn flag(params: &Option<Map<String, Value>>, key: &str) -> bool {
    params
        .as_ref()
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Decodes a request body. `json_len` is the `Inference-Header-Content-Length` value, if any.
pub fn decode_request(
    body: &[u8],
    json_len: Option<usize>,
    max_tensor_bytes: u64,
) -> Result<Request, InferError> {
    let (json, mut binary) = match json_len {
        Some(n) if n <= body.len() => body.split_at(n),
        Some(n) => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has {} bytes",
                body.len()
            )));
        }
        None => (body, &[][..]),
    };
    let req: InferRequest = serde_json::from_slice(json)
        .map_err(|e| bad(format!("malformed inference request: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let datatype = parse_datatype(&input.datatype)?;
        let shape = input
            .shape
            .iter()
            .map(|&d| {
                u64::try_from(d)
                    .map_err(|_| bad(format!("input `{}`: negative dimension {d}", input.name)))
            })
            .collect::<Result<Vec<u64>, _>>()?;
        let binary_size = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| bad("binary_data_size must be a number"))
            })
            .transpose()?;
        let data = match (binary_size, input.data) {
            (Some(n), None) => {
                let n = usize::try_from(n).map_err(|_| bad("binary_data_size is too large"))?;
                if n > binary.len() {
                    return Err(bad(format!(
                        "input `{}` wants {n} bytes of binary data, {} remain",
                        input.name,
                        binary.len()
                    )));
                }
                let (head, rest) = binary.split_at(n);
                binary = rest;
                head.to_vec()
            }
            (None, Some(value)) => encode_json(&input.name, datatype, &value, max_tensor_bytes)?,
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input `{}` has both data and binary_data_size",
                    input.name
                )));
            }
            (None, None) => return Err(bad(format!("input `{}` has no data", input.name))),
        };
        let tensor = Tensor {
            name: input.name,
            datatype,
            shape,
            data,
        };
        // Shape against data and the bundle's cap: checked once, by the engine, where the
        // tensor enters the guest.
        inputs.push(tensor);
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input",
            binary.len()
        )));
    }
    let binary_output = flag(&req.parameters, "binary_data_output");
    let outputs = req
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let classification = match o.parameters.as_ref().and_then(|p| p.get("classification")) {
                None => None,
                Some(k) => Some(k.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                    bad(format!(
                        "output `{}`: classification must be a positive number of classes",
                        o.name
                    ))
                })?),
            };
            Ok(Wanted {
                binary: flag(&o.parameters, "binary_data"),
                name: o.name,
                classification,
            })
        })
        .collect::<Result<_, InferError>>()?;
    Ok(Request {
        id: req.id,
        inputs,
        outputs,
        binary_output,
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>, limit: usize) -> Result<(), InferError> {
    match value {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, limit)?;
            }
        }
        other => {
            if out.len() >= limit {
                return Err(bad("tensor data is larger than the limit"));
            }
            out.push(other);
        }
    }
    Ok(())
}

fn encode_json(
    name: &str,
    datatype: DataType,
    value: &Value,
    cap: u64,
) -> Result<Vec<u8>, InferError> {
    let mut items = Vec::new();
    flatten(
        value,
        &mut items,
        usize::try_from(cap).unwrap_or(usize::MAX),
    )?;
    let wrong = |v: &Value| {
        bad(format!(
            "input `{name}`: {v} is not a valid {}",
            datatype.oip_name()
        ))
    };
    let mut out = Vec::with_capacity(items.len() * datatype.element_size().unwrap_or(8));
    for v in items {
        let int = || {
            v.as_i64()
                .map(i128::from)
                .or_else(|| v.as_u64().map(i128::from))
        };
        macro_rules! int_as {
            ($t:ty) => {{
                let x = int()
                    .and_then(|i| <$t>::try_from(i).ok())
                    .ok_or_else(|| wrong(v))?;
                out.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match datatype {
            DataType::Bool => out.push(u8::from(v.as_bool().ok_or_else(|| wrong(v))?)),
            DataType::U8 => int_as!(u8),
            DataType::U16 => int_as!(u16),
            DataType::U32 => int_as!(u32),
            DataType::U64 => int_as!(u64),
            DataType::I8 => int_as!(i8),
            DataType::I16 => int_as!(i16),
            DataType::I32 => int_as!(i32),
            DataType::I64 => int_as!(i64),
            DataType::F32 => {
                out.extend_from_slice(&(v.as_f64().ok_or_else(|| wrong(v))? as f32).to_le_bytes())
            }
            DataType::F64 => {
                out.extend_from_slice(&v.as_f64().ok_or_else(|| wrong(v))?.to_le_bytes())
            }
            DataType::F16 => return Err(bad(format!("input `{name}`: send FP16 as binary data"))),
            DataType::Bytes => {
                let s = v.as_str().ok_or_else(|| wrong(v))?;
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }
    Ok(out)
}

/// Decodes packed elements to JSON values.
pub fn tensor_json(t: &Tensor) -> Vec<Value> {
    let d = &t.data;
    macro_rules! num {
        ($t:ty, $n:expr) => {
            d.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    serde_json::json!(<$t>::from_le_bytes(a))
                })
                .collect()
        };
    }
    match t.datatype {
        DataType::Bool => d.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::U8 => num!(u8, 1),
        DataType::U16 => num!(u16, 2),
        DataType::U32 => num!(u32, 4),
        DataType::U64 => num!(u64, 8),
        DataType::I8 => num!(i8, 1),
        DataType::I16 => num!(i16, 2),
        DataType::I32 => num!(i32, 4),
        DataType::I64 => num!(i64, 8),
        DataType::F32 => num!(f32, 4),
        DataType::F64 => num!(f64, 8),
        DataType::F16 => d
            .chunks_exact(2)
            .map(|c| serde_json::json!(half_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        DataType::Bytes => {
            let mut out = Vec::new();
            let mut rest = &d[..];
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let Some(item) = rest.get(4..4 + len) else {
                    break;
                };
                out.push(Value::String(String::from_utf8_lossy(item).into_owned()));
                rest = &rest[4 + len..];
            }
            out
        }
    }
}

fn half_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

#[derive(Serialize)]
struct OutputTensor<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Vec<Value>>,
}

/// Encodes a response: the JSON document and the binary section (empty when none).
pub fn encode_response(
    model: &str,
    version: &str,
    req_id: Option<&str>,
    outputs: &[Tensor],
    requested: &[Wanted],
    binary_output: bool,
    labels: &[String],
) -> Result<(Vec<u8>, Vec<u8>), InferError> {
    let mut chosen: Vec<(std::borrow::Cow<'_, Tensor>, bool)> = Vec::new();
    for t in outputs {
        let wanted = if requested.is_empty() {
            Some((binary_output, None))
        } else {
            requested
                .iter()
                .find(|w| w.name == t.name)
                .map(|w| (w.binary || binary_output, w.classification))
        };
        let Some((as_binary, classification)) = wanted else {
            continue;
        };
        let t = match classification {
            None => std::borrow::Cow::Borrowed(t),
            Some(k) => std::borrow::Cow::Owned(classify(t, k, labels)?),
        };
        chosen.push((t, as_binary));
    }
    let mut binary = Vec::new();
    let mut list = Vec::new();
    for (t, as_binary) in &chosen {
        let (t, as_binary): (&Tensor, bool) = (t, *as_binary);
        if as_binary {
            binary.extend_from_slice(&t.data);
            list.push(OutputTensor {
                name: &t.name,
                datatype: t.datatype.oip_name(),
                shape: &t.shape,
                parameters: Some(serde_json::json!({ "binary_data_size": t.data.len() })),
                data: None,
            });
        } else {
            list.push(OutputTensor {
                name: &t.name,
                datatype: t.datatype.oip_name(),
                shape: &t.shape,
                parameters: None,
                data: Some(tensor_json(t)),
            });
        }
    }
    if let Some(missing) = requested
        .iter()
        .find(|w| !outputs.iter().any(|t| t.name == w.name))
    {
        return Err(bad(format!("the model has no output `{}`", missing.name)));
    }
    let mut doc = serde_json::json!({
        "model_name": model,
        "model_version": version,
        "outputs": list,
    });
    if let Some(id) = req_id {
        doc["id"] = Value::String(id.to_owned());
    }
    let json = serde_json::to_vec(&doc).map_err(|e| InferError::Internal(e.to_string()))?;
    Ok((json, binary))
}

/// The classification extension, as Triton answers it: for each row of `t` (its last axis),
/// the `k` largest values, largest first, as BYTES elements `value:index` or
/// `value:index:label` when the bundle has labels; the last dimension becomes `k` (or the row
/// length, if smaller).
fn classify(t: &Tensor, k: u64, labels: &[String]) -> Result<Tensor, InferError> {
    if matches!(t.datatype, DataType::Bytes | DataType::Bool) {
        return Err(bad(format!(
            "output `{}` is {}; classification needs numbers",
            t.name,
            t.datatype.oip_name()
        )));
    }
    let values: Vec<f64> = tensor_json(t)
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN))
        .collect();
    let width = t.shape.last().copied().unwrap_or(1).max(1) as usize;
    let k = (k as usize).min(width);
    let mut data = Vec::new();
    for row in values.chunks(width) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in order.iter().take(k) {
            let text = match labels.get(i) {
                Some(label) => format!("{}:{i}:{label}", row[i]),
                None => format!("{}:{i}", row[i]),
            };
            let len = u32::try_from(text.len()).map_err(|_| bad("label too long"))?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(text.as_bytes());
        }
    }
    let mut shape = t.shape.clone();
    match shape.last_mut() {
        Some(last) => *last = k as u64,
        None => shape.push(k as u64),
    }
    Ok(Tensor {
        name: t.name.clone(),
        datatype: DataType::Bytes,
        shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_request_round_trip() {
        let body = br#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}]}"#;
        let r = decode_request(body, None, 1 << 20).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        assert_eq!(r.inputs[0].shape, vec![2, 2]);
        assert_eq!(
            tensor_json(&r.inputs[0]),
            vec![
                serde_json::json!(1.0),
                serde_json::json!(2.0),
                serde_json::json!(3.0),
                serde_json::json!(4.5)
            ]
        );
    }

    #[test]
    fn binary_request() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        let r = decode_request(&body, Some(json.len()), 1 << 20).unwrap();
        assert_eq!(
            tensor_json(&r.inputs[0]),
            vec![serde_json::json!(7), serde_json::json!(-1)]
        );
    }

    #[test]
    fn malformed_requests() {
        let cases: &[&[u8]] = &[
            b"{",
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP99","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            br#"{"inputs":[], "surprise": 1}"#,
        ];
        for body in cases {
            let e = decode_request(body, None, 1 << 20).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn half_floats() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
    }
}
