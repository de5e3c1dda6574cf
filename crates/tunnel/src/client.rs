//! agentk's side: a tonic [`Channel`] to kas over whichever scheme the address names. The connector does TLS
//! and WebSocket itself, so tonic sees a plain HTTP/2 byte stream in every case, and its own reconnect logic
//! works unchanged.

use std::{
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use hyper_util::{
    client::{legacy::connect::proxy::Tunnel, proxy::matcher::Matcher},
    rt::TokioIo,
};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, protocol::WebSocketConfig};
use tonic::{
    metadata::{AsciiMetadataValue, MetadataKey},
    service::Interceptor,
    transport::{Channel, Endpoint},
};
use tower::ServiceExt;

use crate::{Error, KasAddress, Scheme, WEBSOCKET_SUBPROTOCOL, io::MessageIo};

/// How agentk reaches kas.
#[derive(Clone)]
pub struct ClientConfig {
    pub address: KasAddress,
    /// The agent token; sent as `authorization: Bearer ...` on every call and in the WebSocket handshake.
    pub token: String,
    /// PEM bundle of extra CAs to trust besides the system's roots (`--kas-ca-cert-file`).
    pub ca_file: Option<PathBuf>,
    /// Verify kas's certificate for this name instead of the address's host.
    pub tls_server_name: Option<String>,
    /// Sent on every call and with the WebSocket handshake (e.g. for an authenticating proxy).
    pub extra_headers: Vec<(String, String)>,
    /// HTTP/2 pings on an otherwise idle connection; keep it below any load balancer's idle timeout.
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    /// Which proxy, if any, to reach kas through with HTTP CONNECT, for every scheme: curl's rules, as
    /// [`ClientConfig::proxy_from_env`] reads them (`HTTPS_PROXY` or `ALL_PROXY`, `NO_PROXY` with
    /// domains, IPs and CIDR ranges; lower-case names too). The proxy may be `http://` or `https://`.
    pub proxy: Option<Arc<Matcher>>,
    /// Sent as `x-agentk-version`.
    pub agent_version: String,
}

// Hand-written so the token never reaches a log line.
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("address", &self.address.to_string())
            .field("token", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("tls_server_name", &self.tls_server_name)
            .field(
                "extra_headers",
                &self
                    .extra_headers
                    .iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            )
            .field("keepalive", &self.keepalive)
            .field("proxy", &self.proxy.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    pub fn new(address: KasAddress, token: String) -> Self {
        Self {
            address,
            token,
            ca_file: None,
            tls_server_name: None,
            extra_headers: Vec::new(),
            keepalive: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            proxy: None,
            agent_version: String::new(),
        }
    }

    /// The proxy from the environment, as curl reads it. kas is matched as `https://<host>:<port>`
    /// whatever the scheme (as grpc-go does): the connection always goes through a CONNECT tunnel, so
    /// `HTTP_PROXY`, meant for forwarding plain requests, is not used.
    pub fn proxy_from_env(&mut self) {
        self.proxy = Some(Arc::new(Matcher::from_env()));
    }

    /// Always through `proxy` (`http://[user:password@]host:port` or `https://…`), e.g. for tests.
    pub fn proxy_via(&mut self, proxy: &str) {
        self.proxy = Some(Arc::new(Matcher::builder().all(proxy.to_owned()).build()));
    }

    /// Everything fallible about the configuration, checked once before the first dial.
    pub fn prepare(&self) -> Result<Connector, Error> {
        if self.address.is_cleartext_over_network() {
            tracing::warn!(
                address = %self.address,
                "PLAINTEXT CONNECTION TO KAS: the agent token and every manifest cross the network unencrypted \
                 and can be read or altered in transit; use grpcs:// or wss://"
            );
        }
        let tls = if self.address.scheme.is_tls() {
            Some(self.tls_connector()?)
        } else {
            None
        };
        let server_name = self
            .tls_server_name
            .clone()
            .unwrap_or_else(|| self.address.host.clone());
        let server_name = ServerName::try_from(server_name.clone())
            .map_err(|e| Error::Tls(format!("invalid TLS server name {server_name:?}: {e}")))?;
        let headers: HeaderMap = self.validated_headers()?.into_iter().collect();
        let proxy = self.proxy_route()?;
        Ok(Connector(Arc::new(ConnectorInner {
            address: self.address.clone(),
            tls,
            server_name,
            handshake_headers: headers,
            proxy,
        })))
    }

    /// Whether kas is reached through a proxy, decided once: the address does not change.
    fn proxy_route(&self) -> Result<Option<ProxyRoute>, Error> {
        let Some(matcher) = &self.proxy else {
            return Ok(None);
        };
        let target: Uri = format!("https://{}", self.address.authority())
            .parse()
            .map_err(|e| Error::Proxy {
                proxy: String::new(),
                reason: format!("kas address {} as a URI: {e}", self.address),
            })?;
        let Some(intercept) = matcher.intercept(&target) else {
            return Ok(None);
        };
        let proxy = intercept.uri().clone();
        let shown = redact(&proxy.to_string());
        let tls = match proxy.scheme_str() {
            Some("http") => None,
            // TLS to the proxy itself, verified against the same roots as kas.
            Some("https") => Some(TlsConnector::from(Arc::new(self.rustls_config(false)?))),
            other => {
                return Err(Error::Proxy {
                    proxy: shown,
                    reason: format!(
                        "unsupported proxy scheme {:?}: use http:// or https://",
                        other.unwrap_or("")
                    ),
                });
            }
        };
        Ok(Some(ProxyRoute {
            auth: intercept.basic_auth().cloned(),
            dial: ProxyDialer {
                tls,
                shown: shown.clone(),
            },
            proxy,
            target,
            shown,
        }))
    }

    /// Headers for every call: the credential, the version, the extras.
    fn all_headers(&self) -> Vec<(String, String)> {
        let mut headers = vec![("authorization".to_owned(), format!("Bearer {}", self.token))];
        if !self.agent_version.is_empty() {
            headers.push((
                gitops_protocol::AGENT_VERSION_HEADER.to_owned(),
                self.agent_version.clone(),
            ));
        }
        headers.extend(self.extra_headers.iter().cloned());
        headers
    }

    /// Adds [`Self::all_headers`] to each gRPC call.
    pub fn interceptor(&self) -> Result<HeaderInterceptor, Error> {
        let mut headers = Vec::new();
        for (name, value) in self.validated_headers()? {
            // Valid HTTP names and values are valid ASCII metadata too (names are lowercase already).
            let invalid = |e: &dyn std::fmt::Display| Error::InvalidHeader {
                name: name.to_string(),
                reason: e.to_string(),
            };
            let key = MetadataKey::from_bytes(name.as_str().as_bytes()).map_err(|e| invalid(&e))?;
            let value = AsciiMetadataValue::try_from(value.as_bytes()).map_err(|e| invalid(&e))?;
            headers.push((key, value));
        }
        Ok(HeaderInterceptor(Arc::new(headers)))
    }

    /// The bearer token and extra headers, checked once for both places they go (the WebSocket handshake
    /// and every gRPC call); an invalid one is an error naming it.
    fn validated_headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, Error> {
        self.all_headers()
            .into_iter()
            .map(|(name, value)| {
                let invalid = |e: &dyn std::fmt::Display| Error::InvalidHeader {
                    name: name.clone(),
                    reason: e.to_string(),
                };
                let name_h = HeaderName::try_from(name.as_str()).map_err(|e| invalid(&e))?;
                let value_h = HeaderValue::try_from(value.as_str()).map_err(|e| invalid(&e))?;
                Ok((name_h, value_h))
            })
            .collect()
    }

    fn tls_connector(&self) -> Result<TlsConnector, Error> {
        Ok(TlsConnector::from(Arc::new(self.rustls_config(true)?)))
    }

    /// The trust roots: the system's (as `rustls-native-certs` finds them, honouring `SSL_CERT_FILE` and
    /// `SSL_CERT_DIR`) plus `ca_file`'s. `to_kas`: ALPN for kas (h2, or HTTP/1.1 for a WebSocket), else
    /// HTTP/1.1 for a proxy.
    fn rustls_config(&self, to_kas: bool) -> Result<rustls::ClientConfig, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        for error in &native.errors {
            tracing::warn!(error = %error, "reading the system's trust roots");
        }
        tracing::debug!(added, ignored, "system trust roots");
        if let Some(path) = &self.ca_file {
            let shown = path.display().to_string();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::Tls(format!("{shown}: {e}")))?;
            let mut found = 0;
            for cert in certs {
                let cert = cert.map_err(|e| Error::Tls(format!("{shown}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("{shown}: {e}")))?;
                found += 1;
            }
            if found == 0 {
                return Err(Error::Tls(format!("{shown}: no PEM certificate in it")));
            }
        }
        if roots.is_empty() {
            return Err(Error::Tls(
                "no trust roots: the system store is empty (set SSL_CERT_FILE or SSL_CERT_DIR, or install CA \
                 certificates) and no --kas-ca-cert-file was given"
                    .into(),
            ));
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // gRPC needs HTTP/2 end to end; a WebSocket handshake and a CONNECT are HTTP/1.1.
        config.alpn_protocols = if to_kas && !self.address.scheme.is_websocket() {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(config)
    }

    /// A channel that dials lazily and redials after a failure.
    pub fn channel(&self) -> Result<Channel, Error> {
        let connector = self.prepare()?;
        // The URI only names the authority for HTTP/2; the connector decides where and how to dial.
        let endpoint = Endpoint::from_shared(format!("http://{}", self.address.authority()))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}

/// Adds fixed metadata to each outgoing call.
#[derive(Clone)]
pub struct HeaderInterceptor(Arc<Vec<(MetadataKey<tonic::metadata::Ascii>, AsciiMetadataValue)>>);

impl std::fmt::Debug for HeaderInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credential.
        f.write_str("HeaderInterceptor")
    }
}

impl Interceptor for HeaderInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        for (key, value) in self.0.iter() {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        Ok(request)
    }
}

/// Dials kas and returns an HTTP/2-ready byte stream.
#[derive(Clone)]
pub struct Connector(Arc<ConnectorInner>);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connector({})", self.0.address)
    }
}

struct ConnectorInner {
    address: KasAddress,
    tls: Option<TlsConnector>,
    server_name: ServerName<'static>,
    handshake_headers: HeaderMap,
    proxy: Option<ProxyRoute>,
}

/// The proxy kas is reached through, with what the CONNECT request needs.
struct ProxyRoute {
    proxy: Uri,
    /// `Proxy-Authorization: Basic …` from the proxy URL's user info.
    auth: Option<HeaderValue>,
    /// `https://<kas host>:<port>`: the CONNECT target.
    target: Uri,
    dial: ProxyDialer,
    /// The proxy URL without its password, for errors.
    shown: String,
}

impl ProxyRoute {
    /// A byte stream to kas through the proxy's CONNECT tunnel (hyper-util's `Tunnel`).
    async fn connect(&self) -> Result<BoxIo, Error> {
        let mut tunnel = Tunnel::new(self.proxy.clone(), self.dial.clone());
        if let Some(auth) = &self.auth {
            tunnel = tunnel.with_auth(auth.clone());
        }
        let io = tunnel
            .oneshot(self.target.clone())
            .await
            .map_err(|e| Error::Proxy {
                proxy: self.shown.clone(),
                reason: error_chain(&e),
            })?;
        Ok(io.into_inner())
    }
}

/// `e` and its sources, so "tunnel error: ..." says what failed underneath.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Dials the proxy itself: TCP, then TLS for an `https://` proxy.
#[derive(Clone)]
struct ProxyDialer {
    tls: Option<TlsConnector>,
    shown: String,
}

impl tower::Service<Uri> for ProxyDialer {
    type Response = TokioIo<BoxIo>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, proxy: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let failed = |reason: String| Error::Proxy {
                proxy: this.shown.clone(),
                reason,
            };
            let host = proxy.host().ok_or_else(|| failed("no host".into()))?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = proxy
                .port_u16()
                .unwrap_or(if this.tls.is_some() { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| failed(e.to_string()))?;
            tcp.set_nodelay(true).ok();
            let io: BoxIo = match &this.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let name = ServerName::try_from(host.clone())
                        .map_err(|e| failed(format!("TLS name {host:?}: {e}")))?;
                    Box::new(
                        tls.connect(name, tcp)
                            .await
                            .map_err(|e| failed(format!("TLS to the proxy: {e}")))?,
                    )
                }
            };
            Ok(TokioIo::new(io))
        })
    }
}

/// Any byte stream the connector produced.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<BoxIo>;
    type Error = Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move {
            // tonic reports a failed dial as "transport error" alone: say here what failed.
            inner
                .dial()
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "dialling kas failed"))
                .map(TokioIo::new)
        })
    }
}

impl Connector {
    /// Dials once; for callers that drive HTTP/2 themselves.
    pub async fn dial(&self) -> Result<BoxIo, Error> {
        self.0.dial().await
    }
}

impl ConnectorInner {
    async fn dial(&self) -> Result<BoxIo, Error> {
        let address = self.address.to_string();
        let tcp: BoxIo = match &self.proxy {
            Some(route) => route.connect().await?,
            None => {
                let tcp = TcpStream::connect(self.address.authority())
                    .await
                    .map_err(|source| Error::Connect {
                        address: address.clone(),
                        source,
                    })?;
                tcp.set_nodelay(true).ok();
                Box::new(tcp)
            }
        };
        let stream: BoxIo = match &self.tls {
            Some(tls) => Box::new(tls.connect(self.server_name.clone(), tcp).await.map_err(
                |source| Error::Connect {
                    address: address.clone(),
                    source,
                },
            )?),
            None => Box::new(tcp),
        };
        if !self.address.scheme.is_websocket() {
            return Ok(stream);
        }
        let scheme = if self.address.scheme == Scheme::Wss {
            "wss"
        } else {
            "ws"
        };
        let url = format!(
            "{scheme}://{}{}",
            self.address.authority(),
            self.address.path
        );
        let mut request = url.into_client_request().map_err(|e| Error::WebSocket {
            address: address.clone(),
            reason: e.to_string(),
        })?;
        request.headers_mut().extend(self.handshake_headers.clone());
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(WEBSOCKET_SUBPROTOCOL),
        );
        let (ws, response) = tokio_tungstenite::client_async_with_config(
            request,
            stream,
            Some(WebSocketConfig::default()),
        )
        .await
        .map_err(|e| Error::WebSocket {
            address: address.clone(),
            reason: e.to_string(),
        })?;
        let agreed = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        if agreed != Some(WEBSOCKET_SUBPROTOCOL) {
            return Err(Error::WebSocket {
                address,
                reason: format!("server did not agree to subprotocol {WEBSOCKET_SUBPROTOCOL}"),
            });
        }
        Ok(Box::new(MessageIo::websocket(ws)))
    }
}

/// A proxy URL without its password, for errors.
fn redact(proxy: &str) -> String {
    match (proxy.split_once("://"), proxy.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        _ => proxy.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_passwords_are_redacted() {
        assert_eq!(
            redact("http://user:secret@proxy:3128"),
            "http://***@proxy:3128"
        );
        assert_eq!(redact("http://proxy:3128"), "http://proxy:3128");
    }

    #[test]
    fn interceptor_debug_hides_the_token() {
        let config = ClientConfig::new(
            KasAddress::parse("grpc://kas:8150").unwrap(),
            "kasagent_secret".into(),
        );
        assert!(!format!("{:?}", config.interceptor().unwrap()).contains("secret"));
        assert!(!format!("{config:?}").contains("secret"));
    }
}
