//! Small ONNX graphs written in code, for tests of what a model may do at run time, encoded
//! with tract-onnx's own protobuf types.

use pb::tensor_proto::DataType as Pb;
use pb::tensor_shape_proto::dimension::Value as D;
use prost::Message as _;
use tract_onnx::pb;

fn dim(value: pb::tensor_shape_proto::dimension::Value) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension {
        denotation: String::new(),
        value: Some(value),
    }
}

fn value(
    name: &str,
    elem: pb::tensor_proto::DataType,
    dims: Vec<pb::tensor_shape_proto::Dimension>,
) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            denotation: String::new(),
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(pb::TensorShapeProto { dim: dims }),
            })),
        }),
        ..Default::default()
    }
}

/// A model of one node `op(input, constant) -> output`, or `op(constant, input)` when
/// `constant_first`.
fn one_node(
    op: &str,
    input: pb::ValueInfoProto,
    constant: pb::TensorProto,
    output: pb::ValueInfoProto,
    constant_first: bool,
) -> Vec<u8> {
    let mut operands = vec![input.name.clone(), constant.name.clone()];
    if constant_first {
        operands.reverse();
    }
    let graph = pb::GraphProto {
        name: op.into(),
        node: vec![pb::NodeProto {
            input: operands,
            output: vec![output.name.clone()],
            name: op.into(),
            op_type: op.into(),
            ..Default::default()
        }],
        initializer: vec![constant],
        input: vec![input],
        output: vec![output],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `y = Reshape(x, [2, -1])` over a free-sized FP32 vector `x`: tract cannot type it for
/// every length, only for a declared one.
pub fn reshape_onnx() -> Vec<u8> {
    one_node(
        "Reshape",
        value("x", Pb::Float, vec![dim(D::DimParam("n".into()))]),
        pb::TensorProto {
            name: "shape".into(),
            dims: vec![2],
            data_type: Pb::Int64 as i32,
            int64_data: vec![2, -1],
            ..Default::default()
        },
        value(
            "y",
            Pb::Float,
            vec![dim(D::DimValue(2)), dim(D::DimParam("m".into()))],
        ),
        false,
    )
}

/// `y = Gather(table, ids)` (the constant is the data, the input the indices): a lookup
/// that fits any ids and fails on one beyond the table.
pub fn lookup_onnx() -> Vec<u8> {
    // Gather takes (data, indices).
    one_node(
        "Gather",
        value("ids", Pb::Int64, vec![dim(D::DimParam("n".into()))]),
        pb::TensorProto {
            name: "table".into(),
            dims: vec![3],
            data_type: Pb::Float as i32,
            float_data: vec![10.0, 20.0, 30.0],
            ..Default::default()
        },
        value("y", Pb::Float, vec![dim(D::DimParam("n".into()))]),
        true,
    )
}

/// A classifier as converters often write it: `probabilities = Softmax(x * w)` over FP32
/// `x [n, 2]`, both nodes named `node` (some converters reuse a name), then skl2onnx's default
/// `ZipMap` turning the probabilities into a sequence of maps as the output
/// `output_probability`. tract loads it only once the loader repairs both.
pub fn quirky_classifier_onnx() -> Vec<u8> {
    let node = |op: &str, domain: &str, input: Vec<&str>, output: &str| pb::NodeProto {
        input: input.into_iter().map(str::to_owned).collect(),
        output: vec![output.into()],
        name: "node".into(),
        op_type: op.into(),
        domain: domain.into(),
        ..Default::default()
    };
    let mut zipmap = node(
        "ZipMap",
        "ai.onnx.ml",
        vec!["probabilities"],
        "output_probability",
    );
    zipmap.attribute.push(pb::AttributeProto {
        name: "classlabels_int64s".into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: vec![0, 1],
        ..Default::default()
    });
    let graph = pb::GraphProto {
        name: "quirky".into(),
        node: vec![
            node("Mul", "", vec!["x", "w"], "scores"),
            node("Softmax", "", vec!["scores"], "probabilities"),
            zipmap,
        ],
        initializer: vec![pb::TensorProto {
            name: "w".into(),
            dims: vec![2],
            data_type: Pb::Float as i32,
            float_data: vec![2.0, 3.0],
            ..Default::default()
        }],
        input: vec![value(
            "x",
            Pb::Float,
            vec![dim(D::DimParam("n".into())), dim(D::DimValue(2))],
        )],
        output: vec![pb::ValueInfoProto {
            name: "output_probability".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![
            pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            },
            pb::OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 1,
            },
        ],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A scikit-learn pipeline's shape as skl2onnx writes it: `scaled = Scaler(x)` (`ai.onnx.ml`,
/// offset `[1, 2]`, scale `[2, 0.5]`) over FP32 `x [n, 2]`, then `label = Cast(ArgMax(scaled,
/// axis 1), INT64)`. tract has no Scaler and types an INT64 cast as a dimension: it serves
/// once the loader rewrites the one and converts the other.
pub fn scaled_labeler_onnx() -> Vec<u8> {
    let float_list = |name: &str, floats: Vec<f32>| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Floats as i32,
        floats,
        ..Default::default()
    };
    let int = |name: &str, i: i64| pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    };
    let node = |op: &str, domain: &str, input: &str, output: &str, attribute| pb::NodeProto {
        input: vec![input.into()],
        output: vec![output.into()],
        name: op.into(),
        op_type: op.into(),
        domain: domain.into(),
        attribute,
        ..Default::default()
    };
    let n = || dim(D::DimParam("n".into()));
    let graph = pb::GraphProto {
        name: "scaled".into(),
        node: vec![
            node(
                "Scaler",
                "ai.onnx.ml",
                "x",
                "scaled",
                vec![
                    float_list("offset", vec![1.0, 2.0]),
                    float_list("scale", vec![2.0, 0.5]),
                ],
            ),
            node(
                "ArgMax",
                "",
                "scaled",
                "index",
                vec![int("axis", 1), int("keepdims", 0)],
            ),
            node(
                "Cast",
                "",
                "index",
                "label",
                vec![int("to", Pb::Int64 as i64)],
            ),
        ],
        input: vec![value("x", Pb::Float, vec![n(), dim(D::DimValue(2))])],
        output: vec![
            value("scaled", Pb::Float, vec![n(), dim(D::DimValue(2))]),
            value("label", Pb::Int64, vec![n()]),
        ],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![
            pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            },
            pb::OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 1,
            },
        ],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `y = Imputer(x)` (`ai.onnx.ml`, scikit-learn's SimpleImputer as skl2onnx writes it) over
/// FP32 `x [n, 2]`: an operator tract does not implement.
pub fn imputer_onnx() -> Vec<u8> {
    let n = || dim(D::DimParam("n".into()));
    let graph = pb::GraphProto {
        name: "imputer".into(),
        node: vec![pb::NodeProto {
            input: vec!["x".into()],
            output: vec!["y".into()],
            name: "Imputer".into(),
            op_type: "Imputer".into(),
            domain: "ai.onnx.ml".into(),
            attribute: vec![pb::AttributeProto {
                name: "imputed_value_floats".into(),
                r#type: pb::attribute_proto::AttributeType::Floats as i32,
                floats: vec![0.0, 0.0],
                ..Default::default()
            }],
            ..Default::default()
        }],
        input: vec![value("x", Pb::Float, vec![n(), dim(D::DimValue(2))])],
        output: vec![value("y", Pb::Float, vec![n(), dim(D::DimValue(2))])],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: "ai.onnx.ml".into(),
            version: 1,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A tiny image classifier: `probabilities = Softmax(ReduceMean(image, axes 2, 3) · w)` over
/// FP32 `image [n, 3, 8, 8]` (channels first, as vision exports are), four classes decided by
/// the channels' mean brightness.
pub fn image_classifier_onnx() -> Vec<u8> {
    let node = |op: &str, input: Vec<&str>, output: &str| pb::NodeProto {
        input: input.into_iter().map(str::to_owned).collect(),
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        ..Default::default()
    };
    let mut pool = node("ReduceMean", vec!["image"], "pooled");
    pool.attribute = vec![
        pb::AttributeProto {
            name: "axes".into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: vec![2, 3],
            ..Default::default()
        },
        pb::AttributeProto {
            name: "keepdims".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: 0,
            ..Default::default()
        },
    ];
    let n = || dim(D::DimParam("n".into()));
    let graph = pb::GraphProto {
        name: "image".into(),
        node: vec![
            pool,
            node("MatMul", vec!["pooled", "w"], "scores"),
            node("Softmax", vec!["scores"], "probabilities"),
        ],
        initializer: vec![pb::TensorProto {
            name: "w".into(),
            dims: vec![3, 4],
            data_type: Pb::Float as i32,
            float_data: vec![
                8.0, -8.0, 0.0, 0.0, //
                0.0, 0.0, 8.0, -8.0, //
                -4.0, 4.0, -4.0, 4.0,
            ],
            ..Default::default()
        }],
        input: vec![value(
            "image",
            Pb::Float,
            vec![
                n(),
                dim(D::DimValue(3)),
                dim(D::DimValue(8)),
                dim(D::DimValue(8)),
            ],
        )],
        output: vec![value(
            "probabilities",
            Pb::Float,
            vec![n(), dim(D::DimValue(4))],
        )],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}
