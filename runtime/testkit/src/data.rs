//! Test data with no dependency: a seeded random stream, `.npy` files, and the Python the
//! reference checks run in.

use std::path::Path;

/// splitmix64, with Box–Muller for normal draws: a seeded stream with no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// The next draw, uniform in `[0, 1)`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A normal draw with mean 0 and standard deviation `sd`.
    pub fn normal(&mut self, sd: f64) -> f64 {
        let u = self.next().max(f64::MIN_POSITIVE);
        let v = self.next();
        sd * (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// A `.npy` file (format 1.0, C order) of `descr` elements (`<f4`, `|u1`, …) shaped `shape`,
/// with `body` as its packed elements, as numpy writes it.
pub fn npy_bytes(descr: &str, shape: &[u64], body: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Writes FP32 `values` shaped `shape` as a `.npy` file at `path`.
pub fn write_npy_f32(path: &Path, shape: &[u64], values: impl IntoIterator<Item = f32>) {
    let body: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    std::fs::write(path, npy_bytes("<f4", shape, &body)).unwrap();
}

/// The Python in `OUTPOST_PYTHON` (or `python3`) when it imports every module in `modules`
/// (comma-separated, as `import` takes them); `None` otherwise, after a note on stderr — and
/// a panic instead when `OUTPOST_REQUIRE_PYTHON` is set (`.ci/run` sets it).
pub fn python_with(modules: &str) -> Option<String> {
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var_os("OUTPOST_REQUIRE_PYTHON").is_none(),
        "OUTPOST_REQUIRE_PYTHON is set but `{python}` cannot import {modules}"
    );
    eprintln!("note: no Python with {modules} (set OUTPOST_PYTHON): that cross-check is skipped");
    None
}

/// The `libonnxruntime` shared library tests run the onnxruntime backend with:
/// `ORT_DYLIB_PATH` when set, else the one inside the `onnxruntime` wheel of the Python in
/// `OUTPOST_PYTHON`. `None` (with a note) when there is none, a panic instead when
/// `OUTPOST_REQUIRE_ONNXRUNTIME` is set (`.ci/run` sets it).
pub fn onnxruntime_library() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Some(path.into());
    }
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import glob, os, onnxruntime\n\
                  d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi')\n\
                  print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so.*')))[-1])";
    let found = std::process::Command::new(&python)
        .args(["-c", script])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from);
    if found.is_none() {
        assert!(
            std::env::var_os("OUTPOST_REQUIRE_ONNXRUNTIME").is_none(),
            "OUTPOST_REQUIRE_ONNXRUNTIME is set but neither ORT_DYLIB_PATH nor `{python}`'s \
             onnxruntime wheel gives a libonnxruntime"
        );
        eprintln!(
            "note: no libonnxruntime (set ORT_DYLIB_PATH or OUTPOST_PYTHON): the onnxruntime \
             backend's cases are skipped"
        );
    }
    found
}

/// A PNG of 8-bit samples, `channels` 1 (gray) or 3 (RGB) interleaved row by row, stored
/// without compression: enough for tests to send real images.
pub fn png_bytes(width: u32, height: u32, channels: u8, pixels: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let row = width as usize * usize::from(channels);
    assert_eq!(pixels.len(), row * height as usize);
    let mut raw = Vec::new();
    for line in pixels.chunks(row) {
        raw.push(0); // no filter
        raw.extend_from_slice(line);
    }
    // zlib: a header, stored blocks, Adler-32.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, if channels == 1 { 0 } else { 2 }, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}
