//! The generic guest's image step: a PNG or JPEG body on the raw endpoint decoded, resized
//! and normalised into the model's image input (`generic.image` in the bundle's metadata).

use outpost_guest::{Error, Tensor};
use serde::Deserialize;

/// The largest image decoded, in pixels on a side (a client cannot make the guest allocate
/// more than its memory limit allows anyway; this says so early and clearly).
const MAX_SIDE: usize = 8192;

/// How the raw endpoint's image becomes the model's input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ImageStep {
    /// The model input it feeds.
    pub input: String,
    /// `NCHW` (channels first) or `NHWC`.
    pub layout: Layout,
    /// The input's height and width: the image is resized to them.
    pub height: usize,
    pub width: usize,
    /// 3 (RGB) or 1 (gray).
    pub channels: usize,
    /// Channel order BGR instead of RGB (OpenCV-trained models).
    #[serde(default)]
    pub bgr: bool,
    /// Per channel: `(pixel / 255 - mean) / std`.
    #[serde(default)]
    pub mean: Vec<f32>,
    #[serde(default)]
    pub std: Vec<f32>,
}

/// Where the channels are.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(crate) enum Layout {
    #[serde(rename = "NCHW")]
    Nchw,
    #[serde(rename = "NHWC")]
    Nhwc,
}

/// Decoded pixels: `channels` interleaved 8-bit samples per pixel, row by row.
struct Pixels {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

/// The tensor `step` makes of an image `body` of type `content_type`.
pub(crate) fn tensor(step: &ImageStep, content_type: &str, body: &[u8]) -> Result<Tensor, Error> {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let pixels = if mime == "image/png" {
        decode_png(body)?
    } else if mime == "image/jpeg" {
        decode_jpeg(body)?
    } else {
        return Err(Error::invalid_input(format!(
            "unsupported content type `{content_type}`: send image/png or image/jpeg"
        )));
    };
    if pixels.width == 0 || pixels.height == 0 {
        return Err(Error::invalid_input("the image is empty"));
    }
    let (h, w, c) = (step.height, step.width, step.channels);
    let value = |channel: usize| {
        let mean = step.mean.get(channel).copied().unwrap_or(0.0);
        let std = step.std.get(channel).copied().unwrap_or(1.0);
        move |p: f32| (p / 255.0 - mean) / std
    };
    let mut out = vec![0f32; h * w * c];
    for y in 0..h {
        for x in 0..w {
            let rgb = sample(&pixels, x, y, w, h);
            let gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
            for ch in 0..c {
                let p = match (c, step.bgr) {
                    (1, _) => gray,
                    (_, false) => rgb[ch.min(2)],
                    (_, true) => rgb[2 - ch.min(2)],
                };
                let i = match step.layout {
                    Layout::Nchw => (ch * h + y) * w + x,
                    Layout::Nhwc => (y * w + x) * c + ch,
                };
                out[i] = value(ch)(p);
            }
        }
    }
    let shape = match step.layout {
        Layout::Nchw => [1, c as u64, h as u64, w as u64],
        Layout::Nhwc => [1, h as u64, w as u64, c as u64],
    };
    Ok(Tensor::from_f32(step.input.clone(), shape, &out))
}

/// The RGB value at output pixel (`x`, `y`) of a `w`×`h` resize, bilinear with pixel centres
/// aligned (OpenCV's `INTER_LINEAR`); exact when the sizes are equal or halve cleanly.
fn sample(p: &Pixels, x: usize, y: usize, w: usize, h: usize) -> [f32; 3] {
    let coord = |dst: usize, out: usize, src: usize| {
        let s = ((dst as f32 + 0.5) * src as f32 / out as f32 - 0.5).max(0.0);
        let i = (s.floor() as usize).min(src - 1);
        (i, (i + 1).min(src - 1), s - i as f32)
    };
    let (x0, x1, fx) = coord(x, w, p.width);
    let (y0, y1, fy) = coord(y, h, p.height);
    let at = |xx: usize, yy: usize| {
        let base = (yy * p.width + xx) * p.channels;
        let px = &p.data[base..base + p.channels];
        match p.channels {
            1 | 2 => [f32::from(px[0]); 3],
            _ => [f32::from(px[0]), f32::from(px[1]), f32::from(px[2])],
        }
    };
    let (a, b, c, d) = (at(x0, y0), at(x1, y0), at(x0, y1), at(x1, y1));
    let mut rgb = [0f32; 3];
    for k in 0..3 {
        let top = a[k] + (b[k] - a[k]) * fx;
        let bottom = c[k] + (d[k] - c[k]) * fx;
        rgb[k] = top + (bottom - top) * fy;
    }
    rgb
}

fn decode_png(body: &[u8]) -> Result<Pixels, Error> {
    let bad = |e: png::DecodingError| Error::invalid_input(format!("invalid PNG: {e}"));
    let mut decoder =
        png::Decoder::new_with_limits(std::io::Cursor::new(body), png::Limits { bytes: 64 << 20 });
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::invalid_input("the PNG is too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => {
            return Err(Error::invalid_input("indexed PNG was not expanded"));
        }
    };
    let (width, height) = (info.width as usize, info.height as usize);
    let mut data = Vec::with_capacity(width * height * channels);
    for row in buf.chunks(info.line_size).take(height) {
        data.extend_from_slice(&row[..width * channels]);
    }
    Ok(Pixels {
        width,
        height,
        channels,
        data,
    })
}

fn decode_jpeg(body: &[u8]) -> Result<Pixels, Error> {
    use zune_jpeg::zune_core::bytestream::ZCursor;
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    use zune_jpeg::zune_core::options::DecoderOptions;
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(body), options);
    decoder
        .decode_headers()
        .map_err(|e| Error::invalid_input(format!("invalid JPEG: {e:?}")))?;
    let info = decoder
        .info()
        .ok_or_else(|| Error::invalid_input("invalid JPEG: no frame header"))?;
    let data = decoder
        .decode()
        .map_err(|e| Error::invalid_input(format!("invalid JPEG: {e:?}")))?;
    let (width, height) = (usize::from(info.width), usize::from(info.height));
    if data.len() != width * height * 3 {
        return Err(Error::invalid_input("invalid JPEG: short image data"));
    }
    Ok(Pixels {
        width,
        height,
        channels: 3,
        data,
    })
}
