//! What TLS adds to a binary: this program links a client and a server configuration and a
//! client connection, as the device and the fleet do. Built in release and stripped, its size
//! less that of a std-only "hello" is the TLS stack's share (see docs/decisions.md).
//!
//! `footprint CA.pem CERT.pem KEY.pem` builds the configurations; without arguments it only
//! says hello.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, ca, cert, key] = args.as_slice() {
        let client = outpost_tls::client_config(Some(std::path::Path::new(ca)))?;
        let _server =
            outpost_tls::server_config(std::path::Path::new(cert), std::path::Path::new(key))?;
        let connection =
            outpost_tls::rustls::ClientConnection::new(client, "localhost".try_into()?)?;
        println!("handshaking: {}", connection.is_handshaking());
    }
    println!("hello");
    Ok(())
}
