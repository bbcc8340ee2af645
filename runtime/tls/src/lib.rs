//! TLS for Outpost's links (MQTT to the broker, the fleet's API and artifact downloads):
//! rustls configurations built from PEM files, always with the ring provider. ring is Rust and
//! assembly that cross-builds for aarch64 and armv7 with the C cross compiler the build needs
//! anyway; aws-lc-rs, rustls's default, would add cmake and a much longer build.
//!
//! A client trusts the certificates in a CA file when one is given (the usual case for a
//! fleet with its own CA), else the system's roots. A server presents a certificate chain and
//! its private key from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub use rustls;
pub use rustls::pki_types::CertificateDer as Certificate;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// The crypto provider every configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file; an error when there is none.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read `{}`: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("`{}`: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "`{}` holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The certificates a client trusts: those in `ca_file`, or the system's.
pub fn root_certificates(ca_file: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    match ca_file {
        Some(path) => read_certificates(path),
        None => {
            let found = rustls_native_certs::load_native_certs().certs;
            if found.is_empty() {
                return Err(TlsError(
                    "no system CA certificates found; give a CA file".into(),
                ));
            }
            Ok(found)
        }
    }
}

/// The roots a client trusts: the certificates in `ca_file`, or the system's.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let certs = root_certificates(ca_file)?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError("no usable CA certificate".into()));
    }
    Ok(roots)
}

/// A client configuration trusting `ca_file` (or the system's roots).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A server configuration presenting the chain in `cert_file` with the key in `key_file`.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError(format!("no private key in `{}`: {e}", key_file.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            let hint = if format!("{e:?}").contains("UnsupportedCertVersion") {
                " (an X.509 v1 certificate: make it with extensions, e.g. `openssl x509 -req \
                 ... -extfile` naming its subjectAltName)"
            } else {
                ""
            };
            TlsError(format!("`{}`: {e}{hint}", cert_file.display()))
        })?;
    Ok(Arc::new(config))
}

/// ureq's TLS settings: rustls with this provider, trusting `roots`.
#[cfg(feature = "ureq")]
pub fn ureq_tls_config(roots: &[Certificate<'static>]) -> ureq::tls::TlsConfig {
    let roots: Vec<ureq::tls::Certificate<'static>> = roots
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider())
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_clear_errors() {
        let dir = std::env::temp_dir().join(format!("outpost-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = client_config(Some(&empty)).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let err = client_config(Some(&dir.join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
        let err = server_config(&empty, &empty).unwrap_err().to_string();
        assert!(err.contains("no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
