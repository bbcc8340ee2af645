//! A hostile guest. The raw request's content type picks what it does:
//!
//! - `attack/spin`: loops forever (the deadline must stop it);
//! - `attack/grow`: allocates without bound (the memory cap must stop it);
//! - `attack/huge-tensor`: asks the host to run a model on a tensor claiming 2^40 elements;
//! - `attack/huge-output`: returns a response far above the tensor cap;
//! - `attack/lookup`: asks the bundle's `lookup` model (a table lookup) for an id beyond its
//!   table, which fits the model's signature and fails inside it;
//! - `attack/file`: tries to read `/etc/passwd` (WASI must deny it);
//! - `attack/socket`: tries to open a TCP connection (WASI must deny it);
//! - `attack/panic`: panics;
//! - anything else: echoes the body back, so a test can check the runtime still serves.
//!
//! A tensor request is echoed back, changed by the bundle's metadata so that two versions of
//! one bundle can differ the way a bad candidate differs from its primary (each entry, when
//! absent, changes nothing). `n` is the first element of the first tensor, as a whole number:
//!
//! - `fail_percent`: a request with `n mod 100` below it fails (as a guest error), except
//!   `n = 0`: the host's warm-up request is all zeros;
//! - `flip_percent`: a request with `n mod 100` below it gets its elements rotated by one
//!   (a different argmax, unless they are all equal);
//! - `work`: the guest busy-loops `work` thousand rounds before it answers (slower, by a
//!   factor a test chooses).

use outpost_guest::{DataType, Error, Payload, Request, Response, Tensor};

fn handle(request: Request) -> Result<Response, Error> {
    let Payload::Raw { content_type, body } = request else {
        return shaped(request);
    };
    match content_type.as_str() {
        "attack/spin" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "attack/grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "attack/huge-tensor" => {
            let claim = Tensor {
                name: String::new(),
                datatype: DataType::F32,
                shape: vec![1 << 20, 1 << 20],
                data: vec![0u8; 16],
            };
            let out = outpost_guest::infer("classifier", vec![claim])?;
            Ok(Response::raw(
                "text/plain",
                format!("host accepted a huge tensor: {} outputs", out.len()),
            ))
        }
        "attack/lookup" => {
            let ids = Tensor {
                name: "ids".into(),
                datatype: DataType::I64,
                shape: vec![1],
                data: 7i64.to_le_bytes().to_vec(),
            };
            let out = outpost_guest::infer("lookup", vec![ids])?;
            Ok(Response::raw(
                "text/plain",
                format!("the lookup answered {} outputs", out.len()),
            ))
        }
        "attack/huge-output" => Ok(Response::raw(
            "application/octet-stream",
            vec![7u8; 4 << 20],
        )),
        "attack/file" => match std::fs::read("/etc/passwd") {
            Ok(bytes) => Ok(Response::raw("text/plain", bytes)),
            Err(e) => Err(Error::internal(format!("file access denied: {e}"))),
        },
        "attack/socket" => match std::net::TcpStream::connect("127.0.0.1:22") {
            Ok(_) => Ok(Response::raw("text/plain", "connected")),
            Err(e) => Err(Error::internal(format!("network access denied: {e}"))),
        },
        "attack/panic" => panic!("the guest panicked on purpose"),
        _ => Ok(Response::raw(content_type, body)),
    }
}

/// A tensor request's echo, as the bundle's metadata shapes it.
fn shaped(request: Request) -> Result<Response, Error> {
    let Payload::Tensors(mut tensors) = request else {
        return Ok(request);
    };
    let n = match tensors.first() {
        Some(t) => t.to_f32()?.first().copied().unwrap_or(0.0) as i64,
        None => 0,
    };
    let below = |key: &str| {
        outpost_guest::metadata_f64(key).is_some_and(|p| ((n.rem_euclid(100)) as f64) < p)
    };
    if let Some(work) = outpost_guest::metadata_f64("work") {
        let mut x: u64 = 1;
        for i in 0..(work.max(0.0) as u64).saturating_mul(1_000) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        std::hint::black_box(x);
    }
    if n != 0 && below("fail_percent") {
        return Err(Error::internal(format!("request {n} fails on purpose")));
    }
    if below("flip_percent") {
        for t in &mut tensors {
            let width = match t.datatype {
                DataType::F32 | DataType::I32 | DataType::U32 => 4,
                DataType::F64 | DataType::I64 | DataType::U64 => 8,
                _ => 1,
            };
            if t.data.len() >= width {
                t.data.rotate_left(width);
            }
        }
    }
    Ok(Response::tensors(tensors))
}

outpost_guest::export!(handle);
