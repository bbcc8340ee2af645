//! Write Outpost model guests.
//!
//! A guest is the logic around a model — decoding, pre-processing, post-processing,
//! thresholds, labels — compiled to a WebAssembly component (`wasm32-wasip2`) and shipped in a
//! signed bundle with its ONNX models. The host runs the ONNX models natively; the guest calls
//! them with [`infer`].
//!
//! Write one function from [`Request`] to [`Response`] and export it with [`export!`]:
//!
//! ```no_run
//! use outpost_guest::{Error, Request, Response, Tensor};
//!
//! fn handle(request: Request) -> Result<Response, Error> {
//!     let input = request.tensor("input")?;
//!     let pixels = input.to_f32()?;
//!     let scaled: Vec<f32> = pixels.iter().map(|p| p / 16.0).collect();
//!     let outputs = outpost_guest::infer("classifier", vec![Tensor::from_f32("input", [1, 64], &scaled)])?;
//!     let probabilities = outputs[0].to_f32()?;
//!     outpost_guest::observe("mean_pixel", f64::from(scaled.iter().sum::<f32>() / 64.0));
//!     Ok(Response::tensors(vec![Tensor::from_f32("probabilities", [1, 10], &probabilities)]))
//! }
//!
//! outpost_guest::export!(handle);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (crate type `cdylib`) and name
//! the `.wasm` file in a bundle spec. The WIT contract is `wit/outpost.wit` in this crate; the
//! generated bindings stay private.

#![warn(missing_docs)]

use std::fmt;

#[doc(hidden)]
pub mod __private {
    //! Used by [`export!`](crate::export); not part of the API.

    /// The generated bindings.
    pub mod bindings {
        wit_bindgen::generate!({
            path: "wit",
            world: "model",
            pub_export_macro: true,
            export_macro_name: "__export_model",
            default_bindings_module: "::outpost_guest::__private::bindings",
        });
    }

    pub use bindings::exports::outpost::model::handler::Guest as HandlerGuest;
    pub use bindings::outpost::model::types::{Error as WitError, Payload as WitPayload};

    /// Converts the request, calls the user's handler, converts the result.
    pub fn dispatch(
        request: WitPayload,
        handler: fn(crate::Request) -> Result<crate::Response, crate::Error>,
    ) -> Result<WitPayload, WitError> {
        handler(crate::Payload::from_wit(request))
            .map(crate::Payload::into_wit)
            .map_err(crate::Error::into_wit)
    }
}

use __private::bindings::outpost::model::{
    bundle, inference, log as wit_log, telemetry, types as wit,
};

/// Exports `fn(Request) -> Result<Response, Error>` as the guest's request handler.
///
/// Use it once per guest crate, at the crate root.
#[macro_export]
macro_rules! export {
    ($handler:path) => {
        #[doc(hidden)]
        pub struct __OutpostGuest;

        impl $crate::__private::HandlerGuest for __OutpostGuest {
            fn handle(
                request: $crate::__private::WitPayload,
            ) -> ::core::result::Result<$crate::__private::WitPayload, $crate::__private::WitError>
            {
                $crate::__private::dispatch(request, $handler)
            }
        }

        $crate::__private::bindings::__export_model!(__OutpostGuest with_types_in $crate::__private::bindings);
    };
}

/// Element type of a tensor, named as in the Open Inference Protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    /// Variable-length elements: each a little-endian u32 length, then its bytes.
    Bytes,
}

/// A named tensor: element type, shape, and the elements packed little-endian, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name (an input or output name of the model or the endpoint).
    pub name: String,
    /// Element type.
    pub datatype: DataType,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// Packed elements.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A `FP32` tensor from values.
    pub fn from_f32(name: impl Into<String>, shape: impl Into<Vec<u64>>, values: &[f32]) -> Self {
        Self {
            name: name.into(),
            datatype: DataType::F32,
            shape: shape.into(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An `INT64` tensor from values.
    pub fn from_i64(name: impl Into<String>, shape: impl Into<Vec<u64>>, values: &[i64]) -> Self {
        Self {
            name: name.into(),
            datatype: DataType::I64,
            shape: shape.into(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// A `BYTES` tensor of strings, one element per string.
    pub fn from_strings<S: AsRef<str>>(
        name: impl Into<String>,
        shape: impl Into<Vec<u64>>,
        values: &[S],
    ) -> Self {
        let mut data = Vec::new();
        for v in values {
            let b = v.as_ref().as_bytes();
            data.extend_from_slice(&(b.len() as u32).to_le_bytes());
            data.extend_from_slice(b);
        }
        Self {
            name: name.into(),
            datatype: DataType::Bytes,
            shape: shape.into(),
            data,
        }
    }

    /// Number of elements the shape describes.
    pub fn element_count(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The elements as `f32`, converting from any numeric type.
    pub fn to_f32(&self) -> Result<Vec<f32>, Error> {
        let n = usize::try_from(self.element_count())
            .map_err(|_| Error::invalid_input(format!("tensor `{}` is too large", self.name)))?;
        let size = match self.datatype {
            DataType::F32 | DataType::I32 | DataType::U32 => 4,
            DataType::F64 | DataType::I64 | DataType::U64 => 8,
            DataType::U8 | DataType::I8 | DataType::Bool => 1,
            DataType::U16 | DataType::I16 => 2,
            DataType::F16 | DataType::Bytes => {
                return Err(Error::invalid_input(format!(
                    "tensor `{}`: expected a numeric tensor, got {:?}",
                    self.name, self.datatype
                )));
            }
        };
        if self.data.len() != n * size {
            return Err(Error::invalid_input(format!(
                "tensor `{}`: shape {:?} needs {} bytes of {:?}, got {}",
                self.name,
                self.shape,
                n * size,
                self.datatype,
                self.data.len()
            )));
        }
        let c = self.data.chunks_exact(size);
        Ok(match self.datatype {
            DataType::F32 => c
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DataType::F64 => c
                .map(|b| {
                    f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            DataType::I32 => c
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                .collect(),
            DataType::U32 => c
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                .collect(),
            DataType::I64 => c
                .map(|b| {
                    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            DataType::U64 => c
                .map(|b| {
                    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32
                })
                .collect(),
            DataType::U8 | DataType::Bool => c.map(|b| f32::from(b[0])).collect(),
            DataType::I8 => c.map(|b| f32::from(b[0] as i8)).collect(),
            DataType::U16 => c
                .map(|b| f32::from(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            DataType::I16 => c
                .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])))
                .collect(),
            DataType::F16 | DataType::Bytes => Vec::new(),
        })
    }

    /// The elements of a `BYTES` tensor.
    pub fn to_bytes_elements(&self) -> Result<Vec<Vec<u8>>, Error> {
        if self.datatype != DataType::Bytes {
            return Err(Error::invalid_input(format!(
                "tensor `{}`: expected BYTES, got {:?}",
                self.name, self.datatype
            )));
        }
        let mut out = Vec::new();
        let mut rest = &self.data[..];
        while !rest.is_empty() {
            let bad =
                || Error::invalid_input(format!("tensor `{}`: malformed BYTES data", self.name));
            let len = rest.get(..4).ok_or_else(bad)?;
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let item = rest.get(4..4 + len).ok_or_else(bad)?;
            out.push(item.to_vec());
            rest = &rest[4 + len..];
        }
        Ok(out)
    }
}

/// What a request carries and a response returns: named tensors, or a raw payload.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Named tensors (the Open Inference Protocol endpoints).
    Tensors(Vec<Tensor>),
    /// Bytes with a content type (the raw endpoint).
    Raw {
        /// MIME type, e.g. `image/png`.
        content_type: String,
        /// The bytes.
        body: Vec<u8>,
    },
}

/// An inference request.
pub type Request = Payload;
/// An inference response.
pub type Response = Payload;

impl Payload {
    /// A tensor response.
    pub fn tensors(tensors: Vec<Tensor>) -> Self {
        Payload::Tensors(tensors)
    }

    /// A raw response.
    pub fn raw(content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Payload::Raw {
            content_type: content_type.into(),
            body: body.into(),
        }
    }

    /// The tensor called `name`, or an invalid-input error naming what was expected.
    pub fn tensor(&self, name: &str) -> Result<&Tensor, Error> {
        match self {
            Payload::Tensors(ts) => ts
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| Error::invalid_input(format!("missing input tensor `{name}`"))),
            Payload::Raw { .. } => Err(Error::invalid_input(format!(
                "expected tensors with `{name}`, got a raw payload"
            ))),
        }
    }

    fn from_wit(p: wit::Payload) -> Self {
        match p {
            wit::Payload::Tensors(ts) => {
                Payload::Tensors(ts.into_iter().map(tensor_from_wit).collect())
            }
            wit::Payload::Raw(r) => Payload::Raw {
                content_type: r.content_type,
                body: r.body,
            },
        }
    }

    fn into_wit(self) -> wit::Payload {
        match self {
            Payload::Tensors(ts) => {
                wit::Payload::Tensors(ts.into_iter().map(tensor_into_wit).collect())
            }
            Payload::Raw { content_type, body } => {
                wit::Payload::Raw(wit::Raw { content_type, body })
            }
        }
    }
}

/// Why a request failed: the client's fault (HTTP 400) or the model's (HTTP 500).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input cannot be used; the message is shown to the client.
    InvalidInput(String),
    /// The model failed; the message is shown to the client.
    Internal(String),
}

impl Error {
    /// An invalid-input error.
    pub fn invalid_input(msg: impl Into<String>) -> Self {
        Error::InvalidInput(msg.into())
    }

    /// An internal error.
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }

    fn into_wit(self) -> wit::Error {
        match self {
            Error::InvalidInput(m) => wit::Error::InvalidInput(m),
            Error::Internal(m) => wit::Error::Internal(m),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput(m) => write!(f, "invalid input: {m}"),
            Error::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

impl std::error::Error for Error {}

fn tensor_from_wit(t: wit::Tensor) -> Tensor {
    use wit::TensorType as W;
    let datatype = match t.datatype {
        W::Boolean => DataType::Bool,
        W::Uint8 => DataType::U8,
        W::Uint16 => DataType::U16,
        W::Uint32 => DataType::U32,
        W::Uint64 => DataType::U64,
        W::Int8 => DataType::I8,
        W::Int16 => DataType::I16,
        W::Int32 => DataType::I32,
        W::Int64 => DataType::I64,
        W::Fp16 => DataType::F16,
        W::Fp32 => DataType::F32,
        W::Fp64 => DataType::F64,
        W::Bytes => DataType::Bytes,
    };
    Tensor {
        name: t.name,
        datatype,
        shape: t.shape,
        data: t.data,
    }
}

fn tensor_into_wit(t: Tensor) -> wit::Tensor {
    use wit::TensorType as W;
    let datatype = match t.datatype {
        DataType::Bool => W::Boolean,
        DataType::U8 => W::Uint8,
        DataType::U16 => W::Uint16,
        DataType::U32 => W::Uint32,
        DataType::U64 => W::Uint64,
        DataType::I8 => W::Int8,
        DataType::I16 => W::Int16,
        DataType::I32 => W::Int32,
        DataType::I64 => W::Int64,
        DataType::F16 => W::Fp16,
        DataType::F32 => W::Fp32,
        DataType::F64 => W::Fp64,
        DataType::Bytes => W::Bytes,
    };
    wit::Tensor {
        name: t.name,
        datatype,
        shape: t.shape,
        data: t.data,
    }
}

/// Runs the bundle's ONNX model `model` on `inputs` in the host; returns its outputs in order.
///
/// Inputs are matched to the model's inputs by name, or by position when names are empty.
pub fn infer(model: &str, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, Error> {
    let inputs: Vec<wit::Tensor> = inputs.into_iter().map(tensor_into_wit).collect();
    match inference::infer(model, &inputs) {
        Ok(outputs) => Ok(outputs.into_iter().map(tensor_from_wit).collect()),
        Err(wit::Error::InvalidInput(m)) => Err(Error::InvalidInput(m)),
        Err(wit::Error::Internal(m)) => Err(Error::Internal(m)),
    }
}

/// Records one value of a drift feature named in the manifest's baseline (an input feature,
/// or a model output for prediction drift). The host bins it against the baseline; a name the
/// baseline does not list is refused and counted (`outpost_feature_unknown_total`), and a
/// non-finite value is ignored. One call counts at most 1,024 logs and observations together.
pub fn observe(feature: &str, value: f64) {
    telemetry::observe(feature, value);
}

/// The manifest's `metadata` entry `key` as JSON text, if the bundle has it.
pub fn metadata(key: &str) -> Option<String> {
    bundle::metadata(key)
}

/// The manifest's `metadata` entry `key` as a number, if it is one.
pub fn metadata_f64(key: &str) -> Option<f64> {
    metadata(key)?.trim().parse().ok()
}

/// Logging to the device's log, tagged with the model and version.
pub mod log {
    use super::wit_log;

    /// Logs at debug level.
    pub fn debug(message: &str) {
        wit_log::log(wit_log::Level::Debug, message);
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        wit_log::log(wit_log::Level::Info, message);
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        wit_log::log(wit_log::Level::Warn, message);
    }

    /// Logs at error level.
    pub fn error(message: &str) {
        wit_log::log(wit_log::Level::Error, message);
    }
}
