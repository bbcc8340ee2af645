//! The one mapping between the WIT types of the guest boundary and the host's types.

use outpost_bundle::manifest::DataType;
use outpost_inference::Tensor;

use crate::Payload;
use crate::bindings::outpost::model::types;

pub(crate) fn datatype_from_wit(t: types::TensorType) -> DataType {
    use types::TensorType as W;
    match t {
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
    }
}

pub(crate) fn datatype_into_wit(t: DataType) -> types::TensorType {
    use types::TensorType as W;
    match t {
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
    }
}

pub(crate) fn tensor_from_wit(t: types::Tensor) -> Tensor {
    Tensor {
        name: t.name,
        datatype: datatype_from_wit(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}

pub(crate) fn tensor_into_wit(t: Tensor) -> types::Tensor {
    types::Tensor {
        name: t.name,
        datatype: datatype_into_wit(t.datatype),
        shape: t.shape,
        data: t.data,
    }
}

pub(crate) fn payload_into_wit(p: Payload) -> types::Payload {
    match p {
        Payload::Tensors(ts) => {
            types::Payload::Tensors(ts.into_iter().map(tensor_into_wit).collect())
        }
        Payload::Raw { content_type, body } => {
            types::Payload::Raw(types::Raw { content_type, body })
        }
    }
}

pub(crate) fn payload_from_wit(p: types::Payload) -> Payload {
    match p {
        types::Payload::Tensors(ts) => {
            Payload::Tensors(ts.into_iter().map(tensor_from_wit).collect())
        }
        types::Payload::Raw(r) => Payload::Raw {
            content_type: r.content_type,
            body: r.body,
        },
    }
}
