//! kas's agent listener: one port that accepts gRPC over HTTP/2 (`grpc://`, `grpcs://`) and gRPC-in-WebSocket
//! (`ws://`, `wss://`), authenticates every call with the bearer token, and hands it to tonic services.
//! Anything else that connects (garbage, plain HTTP/1.1, a WebSocket without our subprotocol) gets a clean
//! refusal on its own connection; other agents never notice.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use http::{Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{handshake::derive_accept_key, protocol::Role},
};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, service::Routes};
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::{Error, WEBSOCKET_SUBPROTOCOL, io::MessageIo};

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

/// Serves agent connections until `shutdown` is cancelled, then drops every connection.
pub struct AgentListener<A> {
    pub routes: Routes,
    pub authenticator: A,
    pub tls: Option<TlsAcceptor>,
    pub keepalive: Duration,
}

/// A TLS acceptor for the agent port from PEM files, offering HTTP/2 (gRPC) and HTTP/1.1 (WebSocket).
pub fn tls_acceptor(cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, Error> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("certificate: {e}")))?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| Error::Tls(format!("private key: {e}")))?
        .ok_or_else(|| Error::Tls("no private key in key file".into()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl<A: Authenticator> AgentListener<A> {
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let this = Arc::new(self);
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
            stream.set_nodelay(true).ok();
            let this = this.clone();
            connections.spawn(async move { this.serve_connection(stream, peer).await });
        }
        connections.abort_all();
    }

    async fn serve_connection(self: Arc<Self>, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let io: Box<dyn crate::client::Io> = match &self.tls {
            Some(tls) => {
                match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return debug!(%peer, "TLS handshake timed out"),
                }
            }
            None => Box::new(stream),
        };
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| this.clone().route(req, peer));
        if let Err(e) = self
            .builder()
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await
        {
            debug!(%peer, error = %e, "agent connection ended");
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(self.keepalive))
            .keep_alive_timeout(Duration::from_secs(20));
        builder
    }

    async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        if req.version() == Version::HTTP_2 {
            return Ok(self.grpc(req, peer).await);
        }
        if is_websocket_upgrade(&req) {
            return Ok(self.upgrade_websocket(req, peer).await);
        }
        debug!(%peer, method = %req.method(), path = req.uri().path(), "refused a plain HTTP/1 request on the agent port");
        Ok(plain(
            StatusCode::BAD_REQUEST,
            "this port speaks gRPC over HTTP/2, or gRPC inside a WebSocket\n",
        ))
    }

    /// Authenticates one gRPC call and passes it to the services.
    async fn grpc<B>(&self, mut req: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: http_body_util::BodyExt<Data = bytes::Bytes> + Send + 'static,
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let identity = match self.check(req.headers(), peer).await {
            Ok(identity) => identity,
            Err(status) => return status.into_http(),
        };
        req.extensions_mut().insert(identity);
        req.extensions_mut().insert(PeerAddr(peer));
        match self.routes.clone().oneshot(req).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }

    async fn check(
        &self,
        headers: &http::HeaderMap,
        peer: SocketAddr,
    ) -> Result<A::Identity, tonic::Status> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let result = match token {
            Some(token) if !token.is_empty() => self.authenticator.authenticate(token).await,
            _ => Err(AuthError::Missing),
        };
        result.map_err(|e| match e {
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
        })
    }

    async fn upgrade_websocket(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Body> {
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
        // Refuse before upgrading, so a bad token costs kas no tunnel.
        if let Err(status) = self.check(req.headers(), peer).await {
            return plain(StatusCode::UNAUTHORIZED, &format!("{}\n", status.message()));
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
            let service =
                TowerToHyperService::new(tower::service_fn(move |req: Request<Incoming>| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.grpc(req, peer).await) }
                }));
            let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http2
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(self.keepalive))
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
