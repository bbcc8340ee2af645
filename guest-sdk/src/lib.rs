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

/// An element type a tensor can hold as plain values: every OIP datatype except `FP16` (use
/// [`Tensor::from_f16_bits`] and [`Tensor::to_f16_bits`]) and `BYTES` (use
/// [`Tensor::from_strings`], [`Tensor::from_bytes_elements`], [`Tensor::to_bytes_elements`]).
pub trait Element: Copy + sealed::Sealed {
    /// The tensor datatype of this element type.
    const DATATYPE: DataType;
    /// Bytes per element.
    const SIZE: usize;
    /// Appends the little-endian bytes of `self`.
    fn put(self, out: &mut Vec<u8>);
    /// Reads one element from exactly [`Self::SIZE`] little-endian bytes.
    fn get(bytes: &[u8]) -> Self;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! elements {
    ($($t:ty => $dt:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DATATYPE: DataType = DataType::$dt;
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
        }
    )*};
}

elements!(
    u8 => U8, u16 => U16, u32 => U32, u64 => U64,
    i8 => I8, i16 => I16, i32 => I32, i64 => I64,
    f32 => F32, f64 => F64,
);

impl sealed::Sealed for bool {}
impl Element for bool {
    const DATATYPE: DataType = DataType::Bool;
    const SIZE: usize = 1;
    fn put(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn get(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
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
        Self::from_values(name, shape, values)
    }

    /// An `INT64` tensor from values.
    pub fn from_i64(name: impl Into<String>, shape: impl Into<Vec<u64>>, values: &[i64]) -> Self {
        Self::from_values(name, shape, values)
    }

    /// A tensor of `values`, its datatype that of `T` (`Tensor::from_values::<u8>(...)` is a
    /// `UINT8` tensor, `bool` a `BOOL` one).
    pub fn from_values<T: Element>(
        name: impl Into<String>,
        shape: impl Into<Vec<u64>>,
        values: &[T],
    ) -> Self {
        let mut data = Vec::with_capacity(values.len() * T::SIZE);
        for &v in values {
            v.put(&mut data);
        }
        Self {
            name: name.into(),
            datatype: T::DATATYPE,
            shape: shape.into(),
            data,
        }
    }

    /// The elements as `T`, which must be the tensor's own datatype (no conversion; see
    /// [`Tensor::to_f32`] for one).
    pub fn to_values<T: Element>(&self) -> Result<Vec<T>, Error> {
        if self.datatype != T::DATATYPE {
            return Err(Error::invalid_input(format!(
                "tensor `{}`: expected {:?}, got {:?}",
                self.name,
                T::DATATYPE,
                self.datatype
            )));
        }
        self.check_size(T::SIZE)?;
        Ok(self.data.chunks_exact(T::SIZE).map(T::get).collect())
    }

    /// An `FP16` tensor from the IEEE 754 half-precision bit patterns of its values.
    pub fn from_f16_bits(
        name: impl Into<String>,
        shape: impl Into<Vec<u64>>,
        bits: &[u16],
    ) -> Self {
        Self {
            datatype: DataType::F16,
            ..Self::from_values(name, shape, bits)
        }
    }

    /// The bit patterns of an `FP16` tensor's elements.
    pub fn to_f16_bits(&self) -> Result<Vec<u16>, Error> {
        if self.datatype != DataType::F16 {
            return Err(Error::invalid_input(format!(
                "tensor `{}`: expected F16, got {:?}",
                self.name, self.datatype
            )));
        }
        self.check_size(2)?;
        Ok(self.data.chunks_exact(2).map(u16::get).collect())
    }

    /// A `BYTES` tensor, one element per byte string.
    pub fn from_bytes_elements<B: AsRef<[u8]>>(
        name: impl Into<String>,
        shape: impl Into<Vec<u64>>,
        values: &[B],
    ) -> Self {
        let mut data = Vec::new();
        for v in values {
            let b = v.as_ref();
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

    /// The elements of a `BYTES` tensor as UTF-8 strings.
    pub fn to_strings(&self) -> Result<Vec<String>, Error> {
        self.to_bytes_elements()?
            .into_iter()
            .map(|b| {
                String::from_utf8(b).map_err(|_| {
                    Error::invalid_input(format!("tensor `{}`: an element is not UTF-8", self.name))
                })
            })
            .collect()
    }

    /// Checks that `data` holds exactly the shape's elements of `size` bytes.
    fn check_size(&self, size: usize) -> Result<(), Error> {
        let n = usize::try_from(self.element_count())
            .map_err(|_| Error::invalid_input(format!("tensor `{}` is too large", self.name)))?;
        if self.data.len() != n.saturating_mul(size) {
            return Err(Error::invalid_input(format!(
                "tensor `{}`: shape {:?} needs {} bytes of {:?}, got {}",
                self.name,
                self.shape,
                n.saturating_mul(size),
                self.datatype,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// A `BYTES` tensor of strings, one element per string.
    pub fn from_strings<S: AsRef<str>>(
        name: impl Into<String>,
        shape: impl Into<Vec<u64>>,
        values: &[S],
    ) -> Self {
        let bytes: Vec<&[u8]> = values.iter().map(|v| v.as_ref().as_bytes()).collect();
        Self::from_bytes_elements(name, shape, &bytes)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Element + PartialEq + fmt::Debug>(values: &[T]) {
        let t = Tensor::from_values("t", [values.len() as u64], values);
        assert_eq!(t.datatype, T::DATATYPE);
        assert_eq!(t.data.len(), values.len() * T::SIZE);
        assert_eq!(t.to_values::<T>().unwrap(), values);
    }

    #[test]
    fn every_datatype_has_a_constructor_and_an_accessor() {
        round_trip(&[true, false]);
        round_trip(&[0u8, 255]);
        round_trip(&[1u16, u16::MAX]);
        round_trip(&[1u32, u32::MAX]);
        round_trip(&[1u64, u64::MAX]);
        round_trip(&[-1i8, i8::MAX]);
        round_trip(&[-1i16, i16::MIN]);
        round_trip(&[-1i32, i32::MIN]);
        round_trip(&[-1i64, i64::MIN]);
        round_trip(&[1.5f32, -0.25]);
        round_trip(&[1.5f64, f64::MIN_POSITIVE]);
        let half = Tensor::from_f16_bits("h", [2], &[0x3c00, 0xc000]);
        assert_eq!(half.datatype, DataType::F16);
        assert_eq!(half.to_f16_bits().unwrap(), [0x3c00, 0xc000]);
        let text = Tensor::from_strings("s", [2], &["a", "été"]);
        assert_eq!(text.to_strings().unwrap(), ["a", "été"]);
        let raw = Tensor::from_bytes_elements("b", [1], &[[0xffu8, 0]]);
        assert!(raw.to_strings().is_err());
        assert_eq!(raw.to_bytes_elements().unwrap(), [vec![0xff, 0]]);
    }

    #[test]
    fn an_accessor_refuses_another_datatype_or_a_short_buffer() {
        let t = Tensor::from_values("x", [2], &[1i32, 2]);
        assert!(t.to_values::<i64>().is_err());
        assert!(t.to_f16_bits().is_err());
        assert_eq!(t.to_f32().unwrap(), [1.0, 2.0]);
        let short = Tensor {
            data: vec![0; 7],
            ..t
        };
        assert!(short.to_values::<i32>().is_err());
    }
}
