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
//! A tensor request is echoed back unchanged.

use outpost_guest::{DataType, Error, Payload, Request, Response, Tensor};

fn handle(request: Request) -> Result<Response, Error> {
    let Payload::Raw { content_type, body } = request else {
        return Ok(request);
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

outpost_guest::export!(handle);
