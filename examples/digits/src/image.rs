//! Decoding small grayscale images (PGM, PNG) into the 8×8 grid the model takes.

use outpost_guest::Error;

/// Largest image side accepted, in pixels.
const MAX_SIDE: usize = 2048;

/// A grayscale image, one byte per pixel, row-major.
pub(crate) struct Gray {
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) pixels: Vec<u8>,
}

/// Decodes by content type, or by the file's magic bytes when the type is generic.
pub(crate) fn decode(content_type: &str, body: &[u8]) -> Result<Gray, Error> {
    let mime = content_type.split(';').next().unwrap_or("").trim();
    let is_png = mime == "image/png" || body.starts_with(b"\x89PNG");
    let is_pgm = matches!(mime, "image/x-portable-graymap" | "image/pgm")
        || body.starts_with(b"P5")
        || body.starts_with(b"P2");
    let gray = if is_png {
        decode_png(body)?
    } else if is_pgm {
        decode_pgm(body)?
    } else {
        return Err(Error::invalid_input(format!(
            "unsupported content type `{content_type}`: send image/png or image/x-portable-graymap"
        )));
    };
    if gray.width == 0 || gray.height == 0 || gray.width > MAX_SIDE || gray.height > MAX_SIDE {
        return Err(Error::invalid_input(format!(
            "image must be between 1×1 and {MAX_SIDE}×{MAX_SIDE} pixels"
        )));
    }
    Ok(gray)
}

fn decode_png(body: &[u8]) -> Result<Gray, Error> {
    let bad = |e: png::DecodingError| Error::invalid_input(format!("invalid PNG: {e}"));
    let mut decoder =
        png::Decoder::new_with_limits(std::io::Cursor::new(body), png::Limits { bytes: 16 << 20 });
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(bad)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::invalid_input("PNG is too large"))?;
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
    let mut pixels = Vec::with_capacity(width * height);
    for row in buf.chunks(info.line_size).take(height) {
        for px in row.chunks(channels).take(width) {
            let luma = if channels >= 3 {
                (u32::from(px[0]) * 299 + u32::from(px[1]) * 587 + u32::from(px[2]) * 114) / 1000
            } else {
                u32::from(px[0])
            };
            pixels.push(luma as u8);
        }
    }
    Ok(Gray {
        width,
        height,
        pixels,
    })
}

/// Parses binary (`P5`) and plain (`P2`) PGM with 8-bit or 16-bit samples.
fn decode_pgm(body: &[u8]) -> Result<Gray, Error> {
    let bad = |m: &str| Error::invalid_input(format!("invalid PGM: {m}"));
    let mut pos = 2;
    let mut field = || -> Result<usize, Error> {
        loop {
            match body.get(pos) {
                Some(b'#') => {
                    while body.get(pos).is_some_and(|&b| b != b'\n') {
                        pos += 1;
                    }
                }
                Some(b) if b.is_ascii_whitespace() => pos += 1,
                Some(_) => break,
                None => return Err(bad("header ends early")),
            }
        }
        let start = pos;
        while body.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        std::str::from_utf8(&body[start..pos])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("expected a number"))
    };
    let width = field()?;
    let height = field()?;
    let max = field()?;
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(bad("unsupported size"));
    }
    if !(1..=65535).contains(&max) {
        return Err(bad("maximum value must be 1..65535"));
    }
    let n = width * height;
    let scale = |v: usize| ((v.min(max) * 255 + max / 2) / max) as u8;
    let pixels = if body.starts_with(b"P5") {
        let data = body.get(pos + 1..).ok_or_else(|| bad("no pixel data"))?;
        if max < 256 {
            let data = data.get(..n).ok_or_else(|| bad("pixel data is short"))?;
            data.iter().map(|&v| scale(usize::from(v))).collect()
        } else {
            let data = data
                .get(..2 * n)
                .ok_or_else(|| bad("pixel data is short"))?;
            data.chunks(2)
                .map(|b| scale(usize::from(u16::from_be_bytes([b[0], b[1]]))))
                .collect()
        }
    } else {
        let mut pixels = Vec::with_capacity(n);
        for _ in 0..n {
            pixels.push(scale(field()?));
        }
        pixels
    };
    Ok(Gray {
        width,
        height,
        pixels,
    })
}

/// Averages the image into 8×8 cells of ink (0 = none, 16 = full), the training data's form.
///
/// Ink is dark-on-light or light-on-dark, whichever makes the border the background.
pub(crate) fn to_digit_grid(img: &Gray) -> Vec<f32> {
    let (w, h) = (img.width, img.height);
    let at = |x: usize, y: usize| f32::from(img.pixels[y * w + x]);
    let border: Vec<f32> = (0..w)
        .flat_map(|x| [at(x, 0), at(x, h - 1)])
        .chain((0..h).flat_map(|y| [at(0, y), at(w - 1, y)]))
        .collect();
    let light_background = border.iter().sum::<f32>() / border.len() as f32 > 127.0;
    let mut grid = Vec::with_capacity(64);
    for cy in 0..8 {
        for cx in 0..8 {
            let (x0, x1) = (cx * w / 8, ((cx + 1) * w / 8).max(cx * w / 8 + 1).min(w));
            let (y0, y1) = (cy * h / 8, ((cy + 1) * h / 8).max(cy * h / 8 + 1).min(h));
            let mut sum = 0.0;
            for y in y0..y1 {
                for x in x0..x1 {
                    let v = at(x, y);
                    sum += if light_background { 255.0 - v } else { v };
                }
            }
            let mean = sum / ((x1 - x0) * (y1 - y0)) as f32;
            grid.push((mean / 255.0 * 16.0).clamp(0.0, 16.0));
        }
    }
    grid
}
