//! TLS to PostgreSQL, with rustls (the TLS the rest of Outpost speaks).
//!
//! The database URL says it as libpq does: `sslmode=require` (or `prefer`) turns it on, and
//! `sslrootcert=FILE` names the CA the server's certificate must chain to (default: the
//! system's CAs). The certificate is always verified, and its name checked against the host
//! connected to: `require` here is libpq's `verify-full`, since a TLS connection that accepts
//! any certificate protects against nothing an attacker on the path cannot undo. Without
//! `sslmode` in the URL, the connection is plain, as before TLS was supported.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use outpost_tls::rustls::ClientConfig;
use outpost_tls::rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use crate::error::{FleetError, Result};

/// The TLS side of a database URL: the URL without `sslrootcert` (which the driver does not
/// know), whether it asks for TLS, and the CA file it names.
pub(crate) struct DatabaseTls {
    /// The URL to hand to the driver.
    pub(crate) url: String,
    /// Whether `sslmode` was given (TLS is then tried, and required with `require`).
    pub(crate) wanted: bool,
    /// `sslrootcert`, when given.
    pub(crate) ca_file: Option<PathBuf>,
}

impl DatabaseTls {
    /// Reads `sslmode` and `sslrootcert` out of a `postgres://` URL (query parameters) or a
    /// libpq key=value string.
    pub(crate) fn parse(url: &str) -> Self {
        let mut ca_file = None;
        let wanted;
        let url = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => {
                    wanted = false;
                    url.to_owned()
                }
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        match pair.split_once('=') {
                            Some(("sslrootcert", file)) => ca_file = Some(PathBuf::from(file)),
                            _ => kept.push(pair),
                        }
                    }
                    wanted = kept.iter().any(|p| p.starts_with("sslmode="));
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for word in url.split_whitespace() {
                match word.split_once('=') {
                    Some(("sslrootcert", file)) => ca_file = Some(PathBuf::from(file)),
                    _ => kept.push(word),
                }
            }
            wanted = kept.iter().any(|w| w.starts_with("sslmode="));
            kept.join(" ")
        };
        Self {
            url,
            wanted,
            ca_file,
        }
    }

    /// The connector the driver uses: verifying TLS when asked for, else none.
    pub(crate) fn connector(&self) -> Result<RustlsConnect> {
        if !self.wanted {
            return Ok(RustlsConnect(None));
        }
        let config = outpost_tls::client_config(self.ca_file.as_deref()).map_err(|e| {
            FleetError::Config(format!(
                "TLS to the database{}: {e}",
                self.ca_file
                    .as_ref()
                    .map(|f| format!(" (sslrootcert {})", f.display()))
                    .unwrap_or_default()
            ))
        })?;
        Ok(RustlsConnect(Some(config)))
    }
}

/// Makes a TLS connection per database connection (no TLS when it holds no configuration:
/// the driver is then told `sslmode=disable` and never asks).
#[derive(Clone)]
pub(crate) struct RustlsConnect(Option<Arc<ClientConfig>>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = RustlsConnector;
    type Error = io::Error;

    /// Called for every connection, TLS or not: what is wrong shows at the handshake, which
    /// a connection without TLS never makes.
    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnector> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| format!("the database's host `{domain}`: {e}"));
        Ok(RustlsConnector {
            config: self.0.clone(),
            name,
        })
    }
}

/// One connection's TLS handshake.
pub(crate) struct RustlsConnector {
    config: Option<Arc<ClientConfig>>,
    name: std::result::Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| {
                io::Error::other("TLS to the database was not asked for (no sslmode in its URL)")
            })?;
            let name = self.name.map_err(io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(PgTlsStream(stream))
        })
    }
}

/// A TLS stream the driver reads and writes.
pub(crate) struct PgTlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding: the certificate check is what binds the server.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_ca_file_is_taken_out_of_either_form_of_url() {
        let t = DatabaseTls::parse(
            "postgres://u@db:5432/fleet?sslmode=require&sslrootcert=/etc/ca.pem&connect_timeout=5",
        );
        assert_eq!(
            t.url,
            "postgres://u@db:5432/fleet?sslmode=require&connect_timeout=5"
        );
        assert!(t.wanted);
        assert_eq!(t.ca_file, Some(PathBuf::from("/etc/ca.pem")));

        let t = DatabaseTls::parse("host=db user=u sslrootcert=/ca.pem sslmode=prefer");
        assert_eq!(t.url, "host=db user=u sslmode=prefer");
        assert!(t.wanted);
        assert_eq!(t.ca_file, Some(PathBuf::from("/ca.pem")));

        let t = DatabaseTls::parse("postgres://u@db/fleet?sslrootcert=/ca.pem");
        assert_eq!(t.url, "postgres://u@db/fleet");
        assert!(!t.wanted, "no sslmode: plain, as before");

        let t = DatabaseTls::parse("postgres://u@db/fleet");
        assert!(!t.wanted && t.ca_file.is_none());
    }

    #[test]
    fn a_ca_file_that_does_not_exist_is_a_clear_error() {
        let t = DatabaseTls::parse("postgres://u@db/fleet?sslmode=require&sslrootcert=/nope.pem");
        let Err(FleetError::Config(message)) = t.connector() else {
            panic!("a missing CA file was accepted");
        };
        assert!(
            message.contains("TLS to the database (sslrootcert /nope.pem)"),
            "{message}"
        );
    }
}
