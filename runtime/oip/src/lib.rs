//! Open Inference Protocol v2 request and response bodies: JSON tensors and the binary tensor
//! data extension (`Inference-Header-Content-Length`). No transport: the device's HTTP API
//! calls it, and so do the fuzz targets.

mod tensor_json;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use outpost_bundle::manifest::DataType;

/// A request the codec refuses, or a response it cannot write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OipError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// A JSON response longer than allowed (400): the client can ask for binary outputs.
    #[error(
        "the JSON response is longer than max_response_bytes ({limit}); ask for the outputs as \
         binary data (parameters.binary_data_output = true) or for fewer outputs"
    )]
    ResponseTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The response could not be written.
    #[error("cannot write the response: {0}")]
    Internal(String),
}
use outpost_inference::Tensor;

/// Header naming the length of the JSON part of a binary-extension body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<InputTensor<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTensor<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// Kept as its text until the datatype is known (see `tensor_json`).
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
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
    /// The request-level parameter `route_key`: which version a traffic split sends it to.
    pub route_key: Option<String>,
    /// The request-level parameter `session`: the streaming session it belongs to.
    pub session: Option<String>,
}

fn bad<E: From<OipError>>(msg: impl Into<String>) -> E {
    OipError::BadRequest(msg.into()).into()
}

/// Parses a datatype name (`FP32`, ...).
pub fn parse_datatype(name: &str) -> Result<DataType, OipError> {
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
) -> Result<Request, OipError> {
    decode_request_within(body, json_len, max_tensor_bytes, |_| Ok::<_, OipError>(()))
        .map(|(r, ())| r)
}

/// An upper bound of the bytes `input`'s tensor decodes to, before it is decoded: binary data
/// is copied as it is; a JSON element takes at least two characters (`0,`) and decodes to at
/// most `cap` bytes.
fn decoded_bound(input: &InputTensor<'_>, datatype: DataType, cap: u64) -> u64 {
    let bound = match (&input.data, binary_size(input)) {
        // Copied as it is, however long (it cannot be longer than the body).
        (_, Some(n)) => return n,
        (Some(raw), None) => {
            let text = raw.get().len() as u64;
            match datatype {
                // A length prefix of 4 bytes per element of at least 3 characters (`"",`), and
                // the characters themselves.
                DataType::Bytes => text * 2 + 4,
                other => text.div_ceil(2) * other.element_size().unwrap_or(8) as u64,
            }
        }
        (None, None) => 0,
    };
    bound.min(cap)
}

fn binary_size(input: &InputTensor<'_>) -> Option<u64> {
    input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
        .and_then(Value::as_u64)
}

/// [`decode_request`], calling `reserve` with an upper bound of the bytes the tensors will
/// take once the request's header has been parsed and before any tensor is decoded (the
/// caller takes them from its budget); returns what `reserve` returned.
pub fn decode_request_within<R, E: From<OipError>>(
    body: &[u8],
    json_len: Option<usize>,
    max_tensor_bytes: u64,
    reserve: impl FnOnce(u64) -> Result<R, E>,
) -> Result<(Request, R), E> {
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
    let mut bound = 0u64;
    for input in &req.inputs {
        let datatype = parse_datatype(&input.datatype)?;
        bound = bound.saturating_add(decoded_bound(input, datatype, max_tensor_bytes));
    }
    let reserved = reserve(bound)?;
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
            (None, Some(raw)) => {
                crate::tensor_json::decode(&input.name, datatype, raw, max_tensor_bytes)?
            }
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
    let route_key = match req.parameters.as_ref().and_then(|p| p.get("route_key")) {
        None => None,
        Some(Value::String(key)) => Some(key.clone()),
        Some(_) => return Err(bad("parameters.route_key must be a string")),
    };
    let session = match req.parameters.as_ref().and_then(|p| p.get("session")) {
        None => None,
        Some(Value::String(key)) => Some(key.clone()),
        Some(_) => return Err(bad("parameters.session must be a string")),
    };
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
        .collect::<Result<_, OipError>>()?;
    Ok((
        Request {
            id: req.id,
            inputs,
            outputs,
            binary_output,
            route_key,
            session,
        },
        reserved,
    ))
}

/// An IEEE half-precision float's value.
pub(crate) fn half_to_f32(h: u16) -> f32 {
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
    data: Option<crate::tensor_json::Data<'a>>,
}

/// An inference response's JSON document, written straight from the output tensors.
#[derive(Serialize)]
struct InferResponse<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    model_name: &'a str,
    model_version: &'a str,
    outputs: Vec<OutputTensor<'a>>,
}

/// A buffer that refuses to grow past `cap` bytes.
struct Capped {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            return Err(std::io::Error::other(
                "the response is longer than its limit",
            ));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How a response is to be written.
#[derive(Debug, Clone, Copy)]
pub struct Encoding<'a> {
    /// Outputs asked for (all when empty).
    pub requested: &'a [Wanted],
    /// Every output as binary data.
    pub binary_output: bool,
    /// The bundle's labels (for classification).
    pub labels: &'a [String],
    /// The longest JSON document allowed.
    pub max_json_bytes: u64,
}

/// Encodes a response: the JSON document and the binary section (empty when none). Before
/// writing, `reserve` is called with an upper bound of both together (the caller takes it
/// from its budget); a JSON document longer than `max_json_bytes` is refused with
/// [`OipError::ResponseTooLarge`].
pub fn encode_response<R, E: From<OipError>>(
    model: &str,
    version: &str,
    req_id: Option<&str>,
    outputs: &[Tensor],
    how: Encoding<'_>,
    reserve: impl FnOnce(u64) -> Result<R, E>,
) -> Result<(Vec<u8>, Vec<u8>, R), E> {
    let Encoding {
        requested,
        binary_output,
        labels,
        max_json_bytes,
    } = how;
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
    // Names, shapes and the document around the tensors: generously.
    let mut json_bound = 256 + model.len() as u64 + version.len() as u64;
    json_bound += req_id.map_or(0, |id| 6 * id.len() as u64);
    let mut binary_len = 0u64;
    for (t, as_binary) in &chosen {
        json_bound += 128 + 6 * t.name.len() as u64 + 21 * t.shape.len() as u64;
        if *as_binary {
            binary_len += t.data.len() as u64;
        } else {
            json_bound += crate::tensor_json::json_bound(t);
        }
    }
    // The bound is pessimistic (16 characters for every FP32): the document is written into a
    // buffer that refuses to grow past the limit, and only that much is reserved.
    let reserved = reserve(json_bound.min(max_json_bytes) + binary_len)?;
    let mut binary = Vec::with_capacity(usize::try_from(binary_len).unwrap_or(0));
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
                data: Some(crate::tensor_json::Data(t)),
            });
        }
    }
    if let Some(missing) = requested
        .iter()
        .find(|w| !outputs.iter().any(|t| t.name == w.name))
    {
        return Err(bad(format!("the model has no output `{}`", missing.name)));
    }
    let doc = InferResponse {
        id: req_id,
        model_name: model,
        model_version: version,
        outputs: list,
    };
    let mut json = Capped {
        buf: Vec::new(),
        cap: usize::try_from(max_json_bytes).unwrap_or(usize::MAX),
    };
    if let Err(e) = serde_json::to_writer(&mut json, &doc) {
        return Err(if e.is_io() {
            OipError::ResponseTooLarge {
                limit: max_json_bytes,
            }
            .into()
        } else {
            OipError::Internal(e.to_string()).into()
        });
    }
    let json = json.buf;
    Ok((json, binary, reserved))
}

/// The classification extension, as Triton answers it: for each row of `t` (its last axis),
/// the `k` largest values, largest first, as BYTES elements `value:index` or
/// `value:index:label` when the bundle has labels; the last dimension becomes `k` (or the row
/// length, if smaller).
fn classify(t: &Tensor, k: u64, labels: &[String]) -> Result<Tensor, OipError> {
    if matches!(t.datatype, DataType::Bytes | DataType::Bool) {
        return Err(bad(format!(
            "output `{}` is {}; classification needs numbers",
            t.name,
            t.datatype.oip_name()
        )));
    }
    let values = crate::tensor_json::as_f64s(t);
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
            crate::tensor_json::as_f64s(&r.inputs[0]),
            vec![1.0, 2.0, 3.0, 4.5]
        );
    }

    #[test]
    fn binary_request() {
        let json = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&7i32.to_le_bytes());
        body.extend_from_slice(&(-1i32).to_le_bytes());
        let r = decode_request(&body, Some(json.len()), 1 << 20).unwrap();
        assert_eq!(crate::tensor_json::as_f64s(&r.inputs[0]), vec![7.0, -1.0]);
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
            assert!(
                matches!(e, OipError::BadRequest(_)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn a_json_response_past_its_limit_is_refused_with_a_hint_and_reserves_its_bound() {
        let t = Tensor {
            name: "y".into(),
            datatype: DataType::F32,
            shape: vec![1000],
            data: vec![0; 4000],
        };
        let outputs = [t];
        let how = Encoding {
            requested: &[],
            binary_output: false,
            labels: &[],
            max_json_bytes: 1000,
        };
        let e =
            encode_response("m", "1", None, &outputs, how, |_| Ok::<_, OipError>(())).unwrap_err();
        assert_eq!(e, OipError::ResponseTooLarge { limit: 1000 });
        assert!(e.to_string().contains("binary_data_output"), "{e}");
        let mut reserved = 0;
        let roomy = Encoding {
            max_json_bytes: 1 << 20,
            ..how
        };
        let (json, binary, ()) = encode_response("m", "1", None, &outputs, roomy, |n| {
            reserved = n;
            Ok::<_, OipError>(())
        })
        .unwrap();
        assert!(
            binary.is_empty() && json.len() as u64 <= reserved,
            "{reserved}"
        );
        // As binary data the same output fits the small limit, and its bytes are reserved.
        let binary_how = Encoding {
            binary_output: true,
            ..how
        };
        let (_, binary, ()) = encode_response("m", "1", None, &outputs, binary_how, |n| {
            reserved = n;
            Ok::<_, OipError>(())
        })
        .unwrap();
        assert_eq!(binary.len(), 4000);
        assert!(reserved >= 4000);
        // A refusal to reserve is the answer.
        let e = encode_response("m", "1", None, &outputs, roomy, |_| {
            Err::<(), _>(OipError::Internal("full".into()))
        })
        .unwrap_err();
        assert_eq!(e, OipError::Internal("full".into()));
    }

    #[test]
    fn decoding_reserves_a_bound_of_the_tensors_before_decoding_them() {
        let body = br#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP64","data":[0,0,0,0]}]}"#;
        let mut reserved = 0;
        let (r, ()) = decode_request_within(body, None, 1 << 20, |n| {
            reserved = n;
            Ok::<_, OipError>(())
        })
        .unwrap();
        assert_eq!(r.inputs[0].data.len(), 32);
        assert!(reserved >= 32, "{reserved}");
        let e = decode_request_within(body, None, 1 << 20, |_| {
            Err::<(), _>(OipError::Internal("full".into()))
        })
        .unwrap_err();
        assert_eq!(e, OipError::Internal("full".into()));
    }

    #[test]
    fn half_floats() {
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
    }
}
