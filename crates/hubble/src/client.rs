//! Dialling the relay: plaintext (hubble-relay's default) or TLS, optionally mutual.

use std::{path::Path, sync::Arc, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::{
    Error, event_type,
    flow::{EventTypeFilter, FlowFilter, Verdict},
    observer::GetFlowsRequest,
};

/// Where the relay is and how to talk to it.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `host:port`.
    pub address: String,
    pub tls: Option<RelayTls>,
    pub connect_timeout: Duration,
}

/// TLS material, already read (PEM).
#[derive(Clone, Default)]
pub struct RelayTls {
    /// Extra roots; the system's roots are trusted too.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key, for mutual TLS.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to verify; the address's host when absent.
    pub server_name: Option<String>,
}

// Hand-written so a private key never reaches a log line.
impl std::fmt::Debug for RelayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTls")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert", &self.client_pem.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl RelayTls {
    /// Reads the files a configuration names; errors name the file.
    pub fn from_files(
        ca_file: Option<&Path>,
        client: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<Self, Error> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })
        };
        Ok(Self {
            ca_pem: ca_file.map(read).transpose()?,
            client_pem: match client {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
            server_name,
        })
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(pem) = &self.ca_pem {
            let mut found = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Tls(format!("ca_file: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("ca_file: {e}")))?;
                found += 1;
            }
            if found == 0 {
                return Err(Error::Tls("ca_file: no PEM certificate in it".into()));
            }
        }
        if roots.is_empty() {
            return Err(Error::Tls(
                "no trust roots: the system store is empty and no ca_file is configured".into(),
            ));
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match &self.client_pem {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Tls(format!("cert_file: {e}")))?;
                if chain.is_empty() {
                    return Err(Error::Tls("cert_file: no PEM certificate in it".into()));
                }
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| Error::Tls(format!("key_file: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Tls(format!("cert_file/key_file: {e}")))?
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A channel to the relay that dials lazily and redials after a failure. Fails only on configuration
/// mistakes (a bad address, unusable TLS files); an unreachable relay shows as the first call's error.
pub fn channel(config: &RelayConfig) -> Result<Channel, Error> {
    let address = config.address.trim().to_owned();
    let bad = |reason: String| Error::Address {
        address: address.clone(),
        reason,
    };
    let (host, port) = address
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| bad("not host:port".into()))?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(config.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .tcp_nodelay(true);
    let Some(tls) = &config.tls else {
        return Ok(endpoint.connect_lazy());
    };
    let connector = TlsConnector::from(Arc::new(tls.rustls_config()?));
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = tls.server_name.clone().unwrap_or_else(|| host.clone());
    let name = ServerName::try_from(name.clone())
        .map_err(|e| Error::Tls(format!("server name {name:?}: {e}")))?;
    let dial = tower::service_fn(move |_: http::Uri| {
        let (connector, name, host) = (connector.clone(), name.clone(), host.clone());
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true).ok();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(dial))
}

/// Follow new flows that `verdicts` name, filtered by the server: drops (the datapath's drop events) for
/// [`Verdict::Dropped`], policy-verdict events for [`Verdict::Audit`] (audit mode drops nothing, so only the
/// policy verdict reports it). Each dropped packet thus arrives once, not as both a drop and a verdict.
pub fn dropped_flows_request(verdicts: &[Verdict]) -> GetFlowsRequest {
    let filter = |verdict: Verdict, event: i32| FlowFilter {
        verdict: vec![verdict as i32],
        event_type: vec![EventTypeFilter {
            r#type: event,
            ..Default::default()
        }],
        ..Default::default()
    };
    let whitelist = verdicts
        .iter()
        .filter_map(|v| match v {
            Verdict::Dropped => Some(filter(Verdict::Dropped, event_type::DROP)),
            Verdict::Audit => Some(filter(Verdict::Audit, event_type::POLICY_VERDICT)),
            _ => None,
        })
        .collect();
    GetFlowsRequest {
        follow: true,
        whitelist,
        ..Default::default()
    }
}
