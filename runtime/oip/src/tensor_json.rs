//! Tensor data as OIP JSON, both ways, without building a `serde_json::Value` per element (a
//! `Value` tree costs tens of bytes per number: 7 MiB of JSON became hundreds of MB).
//!
//! Requests: the `data` field is kept as the raw JSON text it came in (borrowed from the body)
//! until the tensor's datatype is known, then parsed straight into packed little-endian
//! elements. Responses: elements are written from the packed bytes as the JSON is serialised,
//! and [`json_bound`] says beforehand how long that text can be.

use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::value::RawValue;

use crate::OipError;
use outpost_bundle::manifest::DataType;
use outpost_inference::Tensor;

fn bad(msg: impl Into<String>) -> OipError {
    OipError::BadRequest(msg.into())
}

/// Parses `raw` (a number, string or bool, or nested arrays of them) into packed elements of
/// `datatype`, at most `cap` bytes of them.
pub(crate) fn decode(
    name: &str,
    datatype: DataType,
    raw: &RawValue,
    cap: u64,
) -> Result<Vec<u8>, OipError> {
    if datatype == DataType::F16 {
        return Err(bad(format!("input `{name}`: send FP16 as binary data")));
    }
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let seed = Elements {
        name,
        datatype,
        out: &mut out,
        cap: usize::try_from(cap).unwrap_or(usize::MAX),
    };
    seed.deserialize(&mut de)
        .map_err(|e| bad(format!("input `{name}`: {e}")))?;
    Ok(out)
}

/// Where parsed elements go.
struct Elements<'a> {
    name: &'a str,
    datatype: DataType,
    out: &'a mut Vec<u8>,
    cap: usize,
}

impl Elements<'_> {
    fn again(&mut self) -> Elements<'_> {
        Elements {
            name: self.name,
            datatype: self.datatype,
            out: self.out,
            cap: self.cap,
        }
    }

    fn room<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        if self.out.len() + bytes > self.cap {
            return Err(E::custom(format!(
                "tensor data is larger than the limit of {} bytes",
                self.cap
            )));
        }
        Ok(())
    }

    fn wrong<E: de::Error>(&self, value: impl std::fmt::Display) -> E {
        E::custom(format!(
            "{value} is not a valid {}",
            self.datatype.oip_name()
        ))
    }

    fn int<E: de::Error>(self, v: i128) -> Result<(), E> {
        macro_rules! put {
            ($t:ty) => {{
                let x = <$t>::try_from(v).map_err(|_| self.wrong(v))?;
                self.room(std::mem::size_of::<$t>())?;
                self.out.extend_from_slice(&x.to_le_bytes());
            }};
        }
        match self.datatype {
            DataType::U8 => put!(u8),
            DataType::U16 => put!(u16),
            DataType::U32 => put!(u32),
            DataType::U64 => put!(u64),
            DataType::I8 => put!(i8),
            DataType::I16 => put!(i16),
            DataType::I32 => put!(i32),
            DataType::I64 => put!(i64),
            // Integers are numbers for the float types, as JSON has one kind of number.
            DataType::F32 | DataType::F64 => return self.float(v as f64),
            _ => return Err(self.wrong(v)),
        }
        Ok(())
    }

    fn float<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.datatype {
            DataType::F32 => {
                self.room(4)?;
                self.out.extend_from_slice(&(v as f32).to_le_bytes());
            }
            DataType::F64 => {
                self.room(8)?;
                self.out.extend_from_slice(&v.to_le_bytes());
            }
            _ => return Err(self.wrong(v)),
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} elements, or arrays of them",
            self.datatype.oip_name()
        )
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self.again())?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        if self.datatype != DataType::Bool {
            return Err(self.wrong(v));
        }
        self.room(1)?;
        self.out.push(u8::from(v));
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.int(i128::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.int(i128::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.float(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if self.datatype != DataType::Bytes {
            return Err(self.wrong(format_args!("{v:?}")));
        }
        let len = u32::try_from(v.len()).map_err(|_| E::custom("string too long"))?;
        self.room(4 + v.len())?;
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(v.as_bytes());
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(self.wrong("null"))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong("an object"))
    }
}

/// A tensor's elements as a flat JSON array, written from its packed bytes.
pub(crate) struct Data<'a>(pub(crate) &'a Tensor);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let t = self.0;
        let d = &t.data[..];
        let mut seq = s.serialize_seq(None)?;
        macro_rules! each {
            ($t:ty, $n:expr) => {
                for c in d.chunks_exact($n) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    seq.serialize_element(&<$t>::from_le_bytes(a))?;
                }
            };
        }
        match t.datatype {
            DataType::Bool => {
                for &b in d {
                    seq.serialize_element(&(b != 0))?;
                }
            }
            DataType::U8 => each!(u8, 1),
            DataType::U16 => each!(u16, 2),
            DataType::U32 => each!(u32, 4),
            DataType::U64 => each!(u64, 8),
            DataType::I8 => each!(i8, 1),
            DataType::I16 => each!(i16, 2),
            DataType::I32 => each!(i32, 4),
            DataType::I64 => each!(i64, 8),
            DataType::F32 => each!(f32, 4),
            DataType::F64 => each!(f64, 8),
            DataType::F16 => {
                for c in d.chunks_exact(2) {
                    seq.serialize_element(&crate::half_to_f32(u16::from_le_bytes([c[0], c[1]])))?;
                }
            }
            DataType::Bytes => {
                for item in strings(d) {
                    seq.serialize_element(&*String::from_utf8_lossy(item))?;
                }
            }
        }
        seq.end()
    }
}

/// The elements of packed BYTES data (each a u32 length, then the bytes).
fn strings(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let item = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        Some(item)
    })
}

/// The most bytes [`Data`] can write for `t` (a comma per element included).
pub(crate) fn json_bound(t: &Tensor) -> u64 {
    let n = t.data.len() as u64;
    match t.datatype {
        // "false,"
        DataType::Bool => n * 6,
        // "255," "-128,"
        DataType::U8 | DataType::I8 => n * 5,
        // 5 or 6 digits and a sign, per 2 bytes
        DataType::U16 | DataType::I16 => n.div_ceil(2) * 7,
        DataType::U32 | DataType::I32 => n.div_ceil(4) * 12,
        DataType::U64 | DataType::I64 => n.div_ceil(8) * 21,
        // "-1.1754944e-38," (shortest round-trip form), NaN and Inf as null
        DataType::F32 | DataType::F16 => {
            n.div_ceil(if t.datatype == DataType::F32 { 4 } else { 2 }) * 16
        }
        // "-2.2250738585072014e-308,"
        DataType::F64 => n.div_ceil(8) * 25,
        // every byte escaped as \u00XX at worst, and the quotes and comma
        DataType::Bytes => n * 6 + 3 * (n / 4 + 1),
    }
}

/// A numeric tensor's elements as f64 (NaN for what is not a number).
pub(crate) fn as_f64s(t: &Tensor) -> Vec<f64> {
    let d = &t.data[..];
    macro_rules! each {
        ($t:ty, $n:expr) => {
            d.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a) as f64
                })
                .collect()
        };
    }
    match t.datatype {
        DataType::U8 => each!(u8, 1),
        DataType::U16 => each!(u16, 2),
        DataType::U32 => each!(u32, 4),
        DataType::U64 => each!(u64, 8),
        DataType::I8 => each!(i8, 1),
        DataType::I16 => each!(i16, 2),
        DataType::I32 => each!(i32, 4),
        DataType::I64 => each!(i64, 8),
        DataType::F32 => each!(f32, 4),
        DataType::F64 => each!(f64, 8),
        DataType::F16 => d
            .chunks_exact(2)
            .map(|c| f64::from(crate::half_to_f32(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        DataType::Bool | DataType::Bytes => vec![f64::NAN; d.len()],
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tensor(datatype: DataType, data: Vec<u8>) -> Tensor {
        Tensor {
            name: "t".into(),
            datatype,
            shape: vec![],
            data,
        }
    }

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn every_datatype_round_trips_and_stays_within_its_bound() {
        let cases: &[(DataType, &str)] = &[
            (DataType::Bool, "[true,false,true]"),
            (DataType::U8, "[0,255,7]"),
            (DataType::I8, "[-128,127]"),
            (DataType::U16, "[65535,0]"),
            (DataType::I16, "[-32768,32767]"),
            (DataType::U32, "[4294967295,1]"),
            (DataType::I32, "[-2147483648,2147483647]"),
            (DataType::U64, "[18446744073709551615,0]"),
            (DataType::I64, "[-9223372036854775808,9223372036854775807]"),
            (DataType::F32, "[-1.1754944e-38,0.1,3.4028235e+38]"),
            (DataType::F64, "[-2.2250738585072014e-308,0.1]"),
            (DataType::Bytes, r#"["a","\u0001\"\\",""]"#),
        ];
        for (datatype, text) in cases {
            let data = decode("t", *datatype, &raw(text), 1 << 20).unwrap();
            let t = tensor(*datatype, data);
            let json = serde_json::to_string(&Data(&t)).unwrap();
            assert_eq!(&json, text, "{datatype:?}");
            assert!(json.len() as u64 <= json_bound(&t), "{datatype:?}: {json}");
        }
    }

    #[test]
    fn nested_arrays_flatten_and_integers_are_numbers_for_floats() {
        let data = decode("t", DataType::F32, &raw("[[1,2],[3,4.5]]"), 1 << 20).unwrap();
        assert_eq!(
            as_f64s(&tensor(DataType::F32, data)),
            vec![1.0, 2.0, 3.0, 4.5]
        );
    }

    #[test]
    fn wrong_elements_and_too_much_data_are_refused() {
        for (datatype, text) in [
            (DataType::U8, "[300]"),
            (DataType::I32, "[1.5]"),
            (DataType::F32, r#"["a"]"#),
            (DataType::Bool, "[1]"),
            (DataType::Bytes, "[1]"),
            (DataType::F32, "[null]"),
            (DataType::F32, r#"[{"a":1}]"#),
            (DataType::F16, "[1]"),
        ] {
            let e = decode("x", datatype, &raw(text), 1 << 20).unwrap_err();
            assert!(e.to_string().starts_with("input `x`"), "{e}");
        }
        let e = decode("x", DataType::U8, &raw("[1,2,3,4,5]"), 4).unwrap_err();
        assert!(
            e.to_string().contains("larger than the limit of 4 bytes"),
            "{e}"
        );
    }
}
