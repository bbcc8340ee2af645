//! Broker addresses: `mqtt://HOST[:PORT]`, validated once where they enter.

use std::fmt;
use std::str::FromStr;

/// A broker address: `mqtt://` (TCP) or `mqtts://` (TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    host: String,
    port: u16,
    tls: bool,
}

/// A text that is not a broker URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker `{0}` is not a URL like mqtt://127.0.0.1:1883 or mqtts://broker.example:8883")]
pub struct BadBrokerUrl(pub String);

impl BrokerUrl {
    /// A broker at `host:port`, over TCP.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            tls: false,
        }
    }

    /// The same broker over TLS (or not).
    #[must_use]
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Whether the connection is TLS (`mqtts://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Host name or address (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl FromStr for BrokerUrl {
    type Err = BadBrokerUrl;

    /// Parses `mqtt://HOST:PORT` or `tcp://HOST:PORT` (port 1883 when omitted), or
    /// `mqtts://HOST:PORT` or `ssl://HOST:PORT` for TLS (port 8883 when omitted).
    fn from_str(url: &str) -> Result<Self, BadBrokerUrl> {
        let bad = || BadBrokerUrl(url.to_owned());
        let (rest, tls) = if let Some(rest) = url
            .strip_prefix("mqtts://")
            .or_else(|| url.strip_prefix("ssl://"))
        {
            (rest, true)
        } else {
            let rest = url
                .strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(bad)?;
            (rest, false)
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(bad());
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(Self::new(host, port).with_tls(tls))
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn broker_urls() {
        let parse = |s: &str| s.parse::<BrokerUrl>();
        assert_eq!(
            parse("mqtt://127.0.0.1:1883").unwrap(),
            BrokerUrl::new("127.0.0.1", 1883)
        );
        assert_eq!(
            parse("mqtt://broker").unwrap(),
            BrokerUrl::new("broker", 1883)
        );
        assert_eq!(parse("mqtt://[::1]:9").unwrap(), BrokerUrl::new("::1", 9));
        assert_eq!(
            parse("mqtt://[::1]:9").unwrap().to_string(),
            "mqtt://[::1]:9"
        );
        let tls = parse("mqtts://broker.example").unwrap();
        assert!(tls.tls() && tls.port() == 8883, "{tls:?}");
        assert_eq!(tls.to_string(), "mqtts://broker.example:8883");
        assert_eq!(
            parse("ssl://h:1").unwrap(),
            BrokerUrl::new("h", 1).with_tls(true)
        );
        assert!(!parse("mqtt://h").unwrap().tls());
        for bad in [
            "http://h:1",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h:1",
            "mqtts://",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
