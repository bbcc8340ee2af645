//! The bundle's `[api]`, held by the host before the guest runs: a request whose tensors or
//! content type the bundle does not declare is refused naming what is wrong, so no guest has
//! to check it and none can get it wrong (an FP64 tensor is never read as FP32).

use std::collections::HashMap;

use outpost_bundle::manifest::{Api, Dim};
use outpost_engine::Payload;

/// Whether `payload` fits `api`; the reason (for a 400) when it does not. A bundle that
/// declares no inputs takes any tensors (its guest checks them).
pub fn check(api: &Api, payload: &Payload) -> Result<(), String> {
    match payload {
        Payload::Raw { content_type, .. } => {
            let essence = content_type
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if api.raw_content_types.is_empty() {
                return Err("this model takes tensors, not raw payloads".into());
            }
            if !api
                .raw_content_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&essence))
            {
                return Err(format!(
                    "content type `{}` is not one this model takes ({})",
                    truncate(content_type),
                    api.raw_content_types.join(", ")
                ));
            }
            Ok(())
        }
        Payload::Tensors(tensors) => {
            if api.inputs.is_empty() {
                return Ok(());
            }
            let names = || {
                api.inputs
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut sizes: HashMap<&str, u64> = HashMap::new();
            for (i, t) in tensors.iter().enumerate() {
                if tensors[..i].iter().any(|o| o.name == t.name) {
                    return Err(format!("input `{}` is given twice", truncate(&t.name)));
                }
                let Some(spec) = api.inputs.iter().find(|s| s.name == t.name) else {
                    return Err(format!(
                        "unknown input `{}`; this model takes: {}",
                        truncate(&t.name),
                        names()
                    ));
                };
                if t.datatype != spec.datatype {
                    return Err(format!(
                        "input `{}` is {}; this model takes {}",
                        t.name,
                        t.datatype.oip_name(),
                        spec.datatype.oip_name()
                    ));
                }
                let declared = || {
                    spec.shape
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if t.shape.len() != spec.shape.len() {
                    return Err(format!(
                        "input `{}` has shape {:?}; this model takes [{}]",
                        t.name,
                        t.shape,
                        declared()
                    ));
                }
                for (&got, want) in t.shape.iter().zip(&spec.shape) {
                    let fits = match want {
                        Dim::Fixed(n) => got == *n,
                        Dim::Symbolic(name) => *sizes.entry(name.as_str()).or_insert(got) == got,
                    };
                    if !fits {
                        return Err(format!(
                            "input `{}` has shape {:?}; this model takes [{}] (a name is one \
                             size across inputs)",
                            t.name,
                            t.shape,
                            declared()
                        ));
                    }
                }
            }
            if let Some(missing) = api
                .inputs
                .iter()
                .find(|s| !tensors.iter().any(|t| t.name == s.name))
            {
                return Err(format!(
                    "missing input `{}`; this model takes: {}",
                    missing.name,
                    names()
                ));
            }
            Ok(())
        }
    }
}

/// A client's string, cut for an error message.
fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use outpost_bundle::manifest::{DataType, TensorSpec};
    use outpost_inference::Tensor;

    use super::*;

    fn api() -> Api {
        let spec = |name: &str, shape: Vec<Dim>| TensorSpec {
            name: name.into(),
            datatype: DataType::F32,
            shape,
        };
        let batch = || Dim::Symbolic("batch".into());
        Api {
            inputs: vec![
                spec("a", vec![batch(), Dim::Fixed(2)]),
                spec("b", vec![batch()]),
            ],
            outputs: vec![],
            raw_content_types: vec!["image/png".into()],
        }
    }

    fn t(name: &str, datatype: DataType, shape: &[u64]) -> Tensor {
        let n: u64 = shape.iter().product();
        Tensor {
            name: name.into(),
            datatype,
            shape: shape.to_vec(),
            data: vec![0; (n * 4) as usize],
        }
    }

    fn err(payload: Payload) -> String {
        check(&api(), &payload).unwrap_err()
    }

    #[test]
    fn what_the_api_declares_passes_and_nothing_else() {
        let f = DataType::F32;
        let ok = Payload::Tensors(vec![t("a", f, &[3, 2]), t("b", f, &[3])]);
        assert_eq!(check(&api(), &ok), Ok(()));
        let raw = |ct: &str| Payload::Raw {
            content_type: ct.into(),
            body: vec![],
        };
        assert_eq!(check(&api(), &raw("IMAGE/PNG; q=1")), Ok(()));

        let cases = [
            (vec![t("a", f, &[3, 2])], "missing input `b`"),
            (
                vec![t("a", f, &[3, 2]), t("b", f, &[3]), t("c", f, &[1])],
                "unknown input `c`; this model takes: a, b",
            ),
            (
                vec![t("a", DataType::F64, &[3, 2]), t("b", f, &[3])],
                "`a` is FP64; this model takes FP32",
            ),
            (
                vec![t("a", f, &[3, 3]), t("b", f, &[3])],
                "takes [batch, 2]",
            ),
            (
                vec![t("a", f, &[3, 2]), t("b", f, &[4])],
                "one size across inputs",
            ),
            (vec![t("a", f, &[3]), t("b", f, &[3])], "takes [batch, 2]"),
            (
                vec![t("a", f, &[3, 2]), t("a", f, &[3, 2]), t("b", f, &[3])],
                "given twice",
            ),
        ];
        for (tensors, wanted) in cases {
            let e = err(Payload::Tensors(tensors));
            assert!(e.contains(wanted), "{e} / {wanted}");
        }
        assert!(err(raw("text/plain")).contains("`text/plain` is not one"));
        let mut no_raw = api();
        no_raw.raw_content_types.clear();
        assert!(check(&no_raw, &raw("image/png")).is_err());
        // Declaring no inputs leaves the tensors to the guest.
        no_raw.inputs.clear();
        assert_eq!(
            check(&no_raw, &Payload::Tensors(vec![t("z", f, &[1])])),
            Ok(())
        );
        assert!(err(Payload::Tensors(vec![t(&"x".repeat(500), f, &[1])])).len() < 200);
    }
}
