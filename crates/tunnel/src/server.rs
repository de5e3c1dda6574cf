//! kas's agent listener: one port that accepts gRPC over HTTP/2 (`grpc://`, `grpcs://`) and gRPC-in-WebSocket
//! (`ws://`, `wss://`), authenticates every call with the bearer token, and hands it to tonic services.
//! Anything else that connects (garbage, plain HTTP/1.1, a WebSocket without our subprotocol) gets a clean
//! refusal on its own connection; other agents never notice.
//!
//! Hostile peers are bounded by [`ListenerLimits`]: a connection that has not made one authenticated call
//! within `auth_timeout` is closed, whatever it is stuck in (TLS handshake, protocol detection, which hyper
//! does without a timeout, HTTP/1 headers, or an HTTP/2 connection kept alive by pings alone); connections
//! are capped overall and while unauthenticated; calls in flight are capped per token.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    hash::{BuildHasher, RandomState},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Request, Response, StatusCode, Version, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, service::Routes};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{Error, WEBSOCKET_SUBPROTOCOL, address::Scheme, io::MessageIo};

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No bearer credential on the call.
    Missing,
    /// The token is unknown or revoked.
    Invalid,
    /// The check itself failed (storage error); the caller should retry.
    Unavailable(String),
}

/// kas's token check. The identity it returns is put into each request's extensions for the services.
pub trait Authenticator: Clone + Send + Sync + 'static {
    type Identity: Clone + Send + Sync + 'static;
    fn authenticate(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Self::Identity, AuthError>> + Send;
}

/// The caller's address, in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Timeouts and caps of the agent listener (`listen.*` in `kas.yaml`).
#[derive(Debug, Clone)]
pub struct ListenerLimits {
    /// HTTP/2 keepalive pings to agents.
    pub keepalive: Duration,
    /// A connection that has made no authenticated call by then is closed.
    pub auth_timeout: Duration,
    /// HTTP/1 request headers (WebSocket upgrades) must arrive within this.
    pub header_read_timeout: Duration,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
    /// Connections not yet authenticated; more are closed at once.
    pub max_unauthenticated: usize,
    /// Calls in flight per token; more are refused with `RESOURCE_EXHAUSTED`.
    pub max_calls_per_token: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            keepalive: Duration::from_secs(20),
            auth_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_unauthenticated: 1_000,
            max_calls_per_token: 500,
        }
    }
}

/// Serves agent connections until `shutdown` is cancelled, then drops every connection.
pub struct AgentListener<A> {
    pub routes: Routes,
    pub authenticator: A,
    pub tls: Option<TlsAcceptor>,
    pub limits: ListenerLimits,
    /// Calls in flight per token, keyed by a keyed hash of the token (the token itself is not kept).
    pub calls: CallCounter,
}

/// Calls in flight per token.
#[derive(Debug, Default, Clone)]
pub struct CallCounter {
    hasher: RandomState,
    counts: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One call in flight; dropping it (with the response body) frees its slot.
struct CallGuard {
    counts: Arc<Mutex<HashMap<u64, usize>>>,
    key: u64,
}

impl CallCounter {
    fn acquire(&self, token: &str, limit: usize) -> Option<CallGuard> {
        let key = self.hasher.hash_one(token);
        let mut counts = self.counts.lock().expect("call counter lock");
        let count = counts.entry(key).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(CallGuard {
            counts: self.counts.clone(),
            key,
        })
    }

    /// Calls in flight for `token`.
    pub fn in_flight(&self, token: &str) -> usize {
        let key = self.hasher.hash_one(token);
        let counts = self.counts.lock().expect("call counter lock");
        counts.get(&key).copied().unwrap_or_default()
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("call counter lock");
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// One accepted connection: its peer, its slot, and whether it has authenticated a call yet.
struct Connection {
    peer: SocketAddr,
    authenticated: CancellationToken,
    /// Held until the first authenticated call.
    pending: Mutex<Option<OwnedSemaphorePermit>>,
    /// Held for as long as the connection (or the WebSocket it became) lives.
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    fn authenticated(&self) {
        self.pending.lock().expect("connection lock").take();
        self.authenticated.cancel();
    }
}

/// Logs refused connections at most once per interval, with how many there were (both listeners).
pub(crate) struct Throttled {
    /// Whose connections: `agent`, `API`.
    listener: &'static str,
    what: &'static str,
    count: u64,
    last: Option<Instant>,
}

impl Throttled {
    pub(crate) fn new(listener: &'static str, what: &'static str) -> Self {
        Self {
            listener,
            what,
            count: 0,
            last: None,
        }
    }

    pub(crate) fn hit(&mut self, limit: usize) {
        self.count += 1;
        if self
            .last
            .is_none_or(|last| last.elapsed() > Duration::from_secs(10))
        {
            warn!(
                refused = self.count,
                limit, "closed {} connections at once: {}", self.listener, self.what
            );
            self.last = Some(Instant::now());
            self.count = 0;
        }
    }
}

/// A TLS acceptor for the agent port from PEM files, offering HTTP/2 (gRPC) and HTTP/1.1 (WebSocket).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, Error> {
    acceptor(
        cert_pem,
        key_pem,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    )
}

/// A TLS acceptor offering only HTTP/1.1, for kas's API listener.
pub fn http1_tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, Error> {
    acceptor(cert_pem, key_pem, vec![b"http/1.1".to_vec()])
}

fn acceptor(cert_pem: &[u8], key_pem: &[u8], alpn: Vec<Vec<u8>>) -> Result<TlsAcceptor, Error> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls("no certificate in the certificate file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            Error::Tls("no private key in key file".into())
        }
        e => Error::Tls(format!("private key: {e}")),
    })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = alpn;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl<A: Authenticator> AgentListener<A> {
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.limits.max_connections));
        let pending = Arc::new(Semaphore::new(this.limits.max_unauthenticated));
        let mut full = Throttled::new("agent", "listen.max_agent_connections reached");
        let mut unauthenticated =
            Throttled::new("agent", "listen.max_unauthenticated_connections reached");
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        warn!(error = %e, "accepting an agent connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                // Reap finished connection tasks so the set does not grow without bound.
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            // Over a cap the connection is dropped (closed) at once: it costs nothing while it waits.
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                full.hit(this.limits.max_connections);
                continue;
            };
            let Ok(pending) = pending.clone().try_acquire_owned() else {
                unauthenticated.hit(this.limits.max_unauthenticated);
                continue;
            };
            stream.set_nodelay(true).ok();
            let connection = Arc::new(Connection {
                peer,
                authenticated: CancellationToken::new(),
                pending: Mutex::new(Some(pending)),
                _slot: slot,
            });
            let this = this.clone();
            connections.spawn(async move { this.serve_connection(stream, connection).await });
        }
        connections.abort_all();
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        connection: Arc<Connection>,
    ) {
        let peer = connection.peer;
        let authenticated = connection.authenticated.clone();
        let serve = async {
            let io: Box<dyn crate::client::Io> = match &self.tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(tls) => Box::new(tls),
                    Err(e) => return debug!(%peer, error = %e, "TLS handshake failed"),
                },
                None => Box::new(stream),
            };
            let this = self.clone();
            let service =
                hyper::service::service_fn(move |req| this.clone().route(req, connection.clone()));
            if let Err(e) = self
                .builder()
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await
            {
                debug!(%peer, error = %e, "agent connection ended");
            }
        };
        // Until the first authenticated call, the connection lives on a timer.
        let deadline = async {
            tokio::time::sleep(self.limits.auth_timeout).await;
            if authenticated.is_cancelled() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = serve => {}
            () = deadline => debug!(%peer, timeout = ?self.limits.auth_timeout, "closed an agent connection that made no authenticated call in time"),
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(self.limits.keepalive))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
        connection: Arc<Connection>,
    ) -> Result<Response<Body>, Infallible> {
        let peer = connection.peer;
        if req.version() == Version::HTTP_2 {
            let scheme = if self.tls.is_some() {
                Scheme::Grpcs
            } else {
                Scheme::Grpc
            };
            return Ok(self.grpc(req, &connection, scheme).await);
        }
        if is_websocket_upgrade(&req) {
            return Ok(self.upgrade_websocket(req, connection).await);
        }
        debug!(%peer, method = %req.method(), path = req.uri().path(), "refused a plain HTTP/1 request on the agent port");
        Ok(plain(
            StatusCode::BAD_REQUEST,
            "this port speaks gRPC over HTTP/2, or gRPC inside a WebSocket\n",
        ))
    }

    /// Authenticates one gRPC call and passes it to the services, with the caller's address and the
    /// transport it came by ([`Scheme`]) in the request's extensions.
    async fn grpc<B>(
        &self,
        mut req: Request<B>,
        connection: &Connection,
        scheme: Scheme,
    ) -> Response<Body>
    where
        B: http_body_util::BodyExt<Data = bytes::Bytes> + Send + 'static,
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = connection.peer;
        let (identity, guard) = match self.check(req.headers(), peer).await {
            Ok(admitted) => admitted,
            Err(status) => return status.into_http(),
        };
        connection.authenticated();
        req.extensions_mut().insert(identity);
        req.extensions_mut().insert(PeerAddr(peer));
        req.extensions_mut().insert(scheme);
        let response = match self.routes.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        // The call's slot is freed when its response (a stream, for most calls) is done with.
        response.map(|body| {
            Body::new(body.map_frame(move |frame| {
                let _held = &guard;
                frame
            }))
        })
    }

    /// Authenticates a call and takes one of its token's call slots.
    async fn check(
        &self,
        headers: &http::HeaderMap,
        peer: SocketAddr,
    ) -> Result<(A::Identity, CallGuard), tonic::Status> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let result = match token {
            Some(token) if !token.is_empty() => self
                .authenticator
                .authenticate(token)
                .await
                .map(|identity| (identity, token)),
            _ => Err(AuthError::Missing),
        };
        let (identity, token) = result.map_err(|e| match e {
            AuthError::Missing => {
                info!(%peer, "refused an agent call without a bearer token");
                tonic::Status::unauthenticated("missing agent token")
            }
            AuthError::Invalid => {
                // The token's value is never logged.
                info!(%peer, "refused an agent call with an unknown or revoked token");
                tonic::Status::unauthenticated("unknown or revoked agent token")
            }
            AuthError::Unavailable(reason) => {
                warn!(%peer, %reason, "could not check an agent token");
                tonic::Status::unavailable("agent token check failed, retry")
            }
        })?;
        let limit = self.limits.max_calls_per_token;
        match self.calls.acquire(token, limit) {
            Some(guard) => Ok((identity, guard)),
            None => {
                warn!(%peer, limit, "refused an agent call: too many calls in flight for its token");
                Err(tonic::Status::resource_exhausted(format!(
                    "more than {limit} calls in flight for this agent token (listen.max_calls_per_token)"
                )))
            }
        }
    }

    async fn upgrade_websocket(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        connection: Arc<Connection>,
    ) -> Response<Body> {
        let peer = connection.peer;
        let offers_ours = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == WEBSOCKET_SUBPROTOCOL);
        if !offers_ours {
            debug!(%peer, "refused a WebSocket without the agent subprotocol");
            return plain(
                StatusCode::BAD_REQUEST,
                &format!("WebSocket subprotocol {WEBSOCKET_SUBPROTOCOL} required\n"),
            );
        }
        let Some(key) = req
            .headers()
            .get(header::SEC_WEBSOCKET_KEY)
            .map(|k| derive_accept_key(k.as_bytes()))
        else {
            return plain(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n");
        };
        // Refuse before upgrading, so a bad token costs kas no tunnel. The check's call slot is only
        // for the upgrade: the calls inside the WebSocket take their own.
        match self.check(req.headers(), peer).await {
            Ok(_) => connection.authenticated(),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                return plain(
                    StatusCode::TOO_MANY_REQUESTS,
                    &format!("{}\n", status.message()),
                );
            }
            Err(status) => {
                return plain(StatusCode::UNAUTHORIZED, &format!("{}\n", status.message()));
            }
        }
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => return debug!(%peer, error = %e, "WebSocket upgrade failed"),
            };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            let io = MessageIo::websocket(ws);
            let this = self.clone();
            let inner = connection.clone();
            let scheme = if self.tls.is_some() {
                Scheme::Wss
            } else {
                Scheme::Ws
            };
            let service =
                TowerToHyperService::new(tower::service_fn(move |req: Request<Incoming>| {
                    let (this, connection) = (this.clone(), inner.clone());
                    async move { Ok::<_, Infallible>(this.grpc(req, &connection, scheme).await) }
                }));
            let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http2
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(self.limits.keepalive))
                .keep_alive_timeout(Duration::from_secs(20));
            if let Err(e) = http2.serve_connection(TokioIo::new(io), service).await {
                debug!(%peer, error = %e, "WebSocket agent connection ended");
            }
        });
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, key)
            .header(header::SEC_WEBSOCKET_PROTOCOL, WEBSOCKET_SUBPROTOCOL)
            .body(Body::empty())
            .expect("static response")
    }
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has = |name, value: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(value))
    };
    req.method() == http::Method::GET
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::new(http_body_util::Full::new(bytes::Bytes::from(
            text.to_owned(),
        ))))
        .expect("static response")
}
