//! The example bundles' parts, compiled and embedded: the guests from `examples/` (built for
//! `wasm32-wasip2` by this crate's build script), the ONNX models and expectations from
//! `models/`, and the bundle specs. `outpost demo` builds its bundles from these; the tests use
//! them as fixtures, together with the hostile test guest from `tests/guests/`. Never imports:
//! the device, fleet or agent crates (it is data, not behaviour).

pub mod graphs;

use std::path::Path;

use outpost_bundle::BuildInput;
use outpost_bundle::spec::{Spec, SpecError};

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The digits classifier's ONNX model.
pub const DIGITS_ONNX: &[u8] = include_bytes!("../../../models/digits/digits.onnx");
/// Expected outputs of the digits model (from onnxruntime).
pub const DIGITS_EXPECTED: &str = include_str!("../../../models/digits/expected.json");
/// The digits sample image as PGM.
pub const DIGIT_PGM: &[u8] = include_bytes!("../../../models/digits/samples/digit.pgm");
/// The digits sample image as PNG.
pub const DIGIT_PNG: &[u8] = include_bytes!("../../../models/digits/samples/digit.png");
/// The sensor autoencoder's ONNX model.
pub const SENSOR_ONNX: &[u8] = include_bytes!("../../../models/sensor/sensor.onnx");
/// Expected scores of the sensor model (from onnxruntime).
pub const SENSOR_EXPECTED: &str = include_str!("../../../models/sensor/expected.json");

const DIGITS_SPEC: &str = include_str!("../../../examples/digits/bundle.toml");
const SENSOR_SPEC: &str = include_str!("../../../examples/sensor/bundle.toml");
const SENSOR_STREAM_SPEC: &str = include_str!("../../../examples/sensor/stream.toml");
const DIGITS_BASELINE: &[u8] = include_bytes!("../../../models/digits/baseline.json");
const SENSOR_BASELINE: &[u8] = include_bytes!("../../../models/sensor/baseline.json");
const SENSOR_METADATA: &[u8] = include_bytes!("../../../models/sensor/metadata.json");

/// Which example.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Example {
    /// The handwritten-digit classifier (`digits`).
    Digits,
    /// The sensor anomaly detector (`sensor-anomaly`).
    Sensor,
    /// The sensor anomaly detector in streaming sessions (`sensor-stream`).
    SensorStream,
}

impl Example {
    /// The two example models (the streaming variant is the sensor model again).
    pub const ALL: [Example; 2] = [Example::Digits, Example::Sensor];

    /// The bundle build input, from the example's spec with the embedded files.
    pub fn build_input(self) -> Result<BuildInput, SpecError> {
        let (spec, files): (&str, &[(&str, &[u8])]) = match self {
            Example::Digits => (
                DIGITS_SPEC,
                &[
                    ("digits_guest.wasm", DIGITS_GUEST),
                    ("digits.onnx", DIGITS_ONNX),
                    ("baseline.json", DIGITS_BASELINE),
                ],
            ),
            Example::Sensor | Example::SensorStream => (
                if self == Example::Sensor {
                    SENSOR_SPEC
                } else {
                    SENSOR_STREAM_SPEC
                },
                &[
                    ("sensor_guest.wasm", SENSOR_GUEST),
                    ("sensor.onnx", SENSOR_ONNX),
                    ("baseline.json", SENSOR_BASELINE),
                    ("metadata.json", SENSOR_METADATA),
                ],
            ),
        };
        Spec::parse(spec)?.load(
            Path::new(""),
            |path: &Path| {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default();
                files
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, bytes)| bytes.to_vec())
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, name.to_owned())
                    })
            },
            None,
        )
    }
}
