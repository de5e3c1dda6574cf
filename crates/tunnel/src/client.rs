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
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, protocol::WebSocketConfig};
use tonic::{
    metadata::{AsciiMetadataValue, MetadataKey},
    service::Interceptor,
    transport::{Channel, Endpoint},
};

use crate::{Error, KasAddress, Scheme, WEBSOCKET_SUBPROTOCOL, io::MessageIo};

/// How agentk reaches kas.
#[derive(Clone)]
pub struct ClientConfig {
    pub address: KasAddress,
    /// The agent token; sent as `authorization: Bearer ...` on every call and in the WebSocket handshake.
    pub token: String,
    /// PEM bundle of extra CAs to trust besides the public roots.
    pub ca_file: Option<PathBuf>,
    /// Verify kas's certificate for this name instead of the address's host.
    pub tls_server_name: Option<String>,
    /// Sent on every call and with the WebSocket handshake (e.g. for an authenticating proxy).
    pub extra_headers: Vec<(String, String)>,
    /// HTTP/2 pings on an otherwise idle connection; keep it below any load balancer's idle timeout.
    pub keepalive: Duration,
    pub connect_timeout: Duration,
    /// For ws/wss only: an `http://host:port` proxy reached with CONNECT (from `HTTPS_PROXY`).
    pub proxy: Option<String>,
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
            .field("proxy", &self.proxy.as_deref().map(redact))
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

    /// `HTTPS_PROXY` (or `https_proxy`) unless `NO_PROXY` lists the host, for WebSocket addresses.
    pub fn proxy_from_env(&mut self) {
        if !self.address.scheme.is_websocket() {
            return;
        }
        let var = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_lowercase()))
                .ok()
        };
        let proxy = var("HTTPS_PROXY").filter(|p| !p.is_empty());
        let no_proxy = var("NO_PROXY").unwrap_or_default();
        let host = &self.address.host;
        let excluded = no_proxy.split(',').map(str::trim).any(|entry| {
            entry == "*"
                || (!entry.is_empty()
                    && (host == entry
                        || host.ends_with(&format!(".{}", entry.trim_start_matches('.')))))
        });
        self.proxy = if excluded { None } else { proxy };
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
        Ok(Connector(Arc::new(ConnectorInner {
            address: self.address.clone(),
            tls,
            server_name,
            handshake_headers: headers,
            proxy: self.proxy.clone(),
        })))
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
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|source| Error::File {
                path: path.display().to_string(),
                source,
            })?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // gRPC needs HTTP/2 end to end; a WebSocket handshake is HTTP/1.1.
        config.alpn_protocols = if self.address.scheme.is_websocket() {
            vec![b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec()]
        };
        Ok(TlsConnector::from(Arc::new(config)))
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
    proxy: Option<String>,
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
        Box::pin(async move { inner.dial().await.map(TokioIo::new) })
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
        let tcp = match &self.proxy {
            Some(proxy) => connect_via_proxy(proxy, &self.address.authority()).await?,
            None => TcpStream::connect(self.address.authority())
                .await
                .map_err(|source| Error::Connect {
                    address: address.clone(),
                    source,
                })?,
        };
        tcp.set_nodelay(true).ok();
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

/// An HTTP CONNECT tunnel through `proxy` (`http://host:port`, optionally `user:pass@`).
async fn connect_via_proxy(proxy: &str, target: &str) -> Result<TcpStream, Error> {
    let proxy_err = |reason: String| Error::Proxy {
        proxy: redact(proxy),
        reason,
    };
    let uri: Uri = proxy
        .parse()
        .map_err(|e| proxy_err(format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(proxy_err("only http:// proxies are supported".into()));
    }
    let authority = uri.authority().ok_or_else(|| proxy_err("no host".into()))?;
    let host_port = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let mut tcp = TcpStream::connect(&host_port)
        .await
        .map_err(|e| proxy_err(e.to_string()))?;
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some((userinfo, _)) = authority.as_str().rsplit_once('@') {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(userinfo);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| proxy_err(e.to_string()))?;
    let mut reader = BufReader::new(&mut tcp);
    let mut status = String::new();
    reader
        .read_line(&mut status)
        .await
        .map_err(|e| proxy_err(e.to_string()))?;
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return Err(proxy_err(format!("CONNECT refused: {}", status.trim())));
    }
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| proxy_err(e.to_string()))?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    if !reader.buffer().is_empty() {
        return Err(proxy_err(
            "proxy sent data before the tunnel was established".into(),
        ));
    }
    Ok(tcp)
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
