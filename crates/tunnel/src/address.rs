//! `--kas-address`: `grpc://host:port`, `grpcs://host[:port]`, `ws://host[:port][/path]`, `wss://...`.

use std::fmt;

use crate::{Error, WEBSOCKET_PATH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Grpc,
    Grpcs,
    Ws,
    Wss,
}

impl Scheme {
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Grpcs | Self::Wss)
    }
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
    fn default_port(self) -> u16 {
        match self {
            Self::Grpc => 8150,
            Self::Ws => 80,
            Self::Grpcs | Self::Wss => 443,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::Grpcs => "grpcs",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }
}

/// A parsed kas address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KasAddress {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// WebSocket path; `/agentk` unless the address names another (a path-routing proxy may need one).
    pub path: String,
}

impl KasAddress {
    /// Whether the agent token and the manifests would cross a network in clear: a plaintext scheme
    /// (`grpc://`, `ws://`) to a host other than loopback.
    pub fn is_cleartext_over_network(&self) -> bool {
        if self.scheme.is_tls() {
            return false;
        }
        let loopback = self.host.eq_ignore_ascii_case("localhost")
            || self.host.to_ascii_lowercase().ends_with(".localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        !loopback
    }

    pub fn parse(address: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| invalid("expected scheme://host"))?;
        let scheme = match scheme {
            "grpc" => Scheme::Grpc,
            "grpcs" => Scheme::Grpcs,
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            other => {
                return Err(invalid(&format!(
                    "unknown scheme {other:?}; use grpc, grpcs, ws or wss"
                )));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !scheme.is_websocket() && !path.is_empty() && path != "/" {
            return Err(invalid("gRPC addresses have no path"));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| invalid("bad host or port"))?;
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port: port.unwrap_or(scheme.default_port()),
            path: if path.is_empty() || path == "/" {
                WEBSOCKET_PATH.to_owned()
            } else {
                path.to_owned()
            },
        })
    }

    /// `host:port`, with brackets for IPv6.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((authority, None)),
    }
}

impl fmt::Display for KasAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme.as_str(), self.authority())?;
        if self.scheme.is_websocket() {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme() {
        let a = KasAddress::parse("grpc://127.0.0.1:8150").unwrap();
        assert_eq!(
            (a.scheme, a.host.as_str(), a.port),
            (Scheme::Grpc, "127.0.0.1", 8150)
        );
        let a = KasAddress::parse("grpcs://kas.example").unwrap();
        assert_eq!((a.scheme, a.port), (Scheme::Grpcs, 443));
        let a = KasAddress::parse("wss://kas.example").unwrap();
        assert_eq!(
            (a.scheme, a.port, a.path.as_str()),
            (Scheme::Wss, 443, "/agentk")
        );
        let a = KasAddress::parse("ws://[::1]:9000/-/kubernetes-agent/").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.path.as_str()),
            ("::1", 9000, "/-/kubernetes-agent/")
        );
        assert_eq!(a.to_string(), "ws://[::1]:9000/-/kubernetes-agent/");
    }

    #[test]
    fn cleartext_is_flagged_only_off_loopback() {
        for (address, flagged) in [
            ("grpc://kas.example:8150", true),
            ("ws://10.0.0.5:8150", true),
            ("ws://[2001:db8::1]:80", true),
            ("grpc://127.0.0.1:8150", false),
            ("grpc://127.8.9.10:8150", false),
            ("ws://[::1]:9000", false),
            ("grpc://localhost:8150", false),
            ("grpc://LOCALHOST:8150", false),
            ("grpcs://kas.example", false),
            ("wss://10.0.0.5", false),
        ] {
            assert_eq!(
                KasAddress::parse(address)
                    .unwrap()
                    .is_cleartext_over_network(),
                flagged,
                "{address}"
            );
        }
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "kas.example",
            "http://kas",
            "grpc://:80",
            "grpc://kas:notaport",
            "grpc://kas/path",
        ] {
            let err = KasAddress::parse(bad).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
