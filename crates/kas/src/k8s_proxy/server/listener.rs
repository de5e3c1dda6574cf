//! The proxy's port: HTTP/1.1 and HTTP/2 (h2c in plain text; ALPN `h2`/`http/1.1` over TLS), with
//! connection upgrades. Like kas's other listeners it bounds what a hostile client can hold: headers (and
//! the TLS handshake) within `header_read_timeout`, idle HTTP/1 connections closed after it, HTTP/2
//! connections pinged, and connections over the cap closed at once. Bodies have no deadline here: watches,
//! `logs -f` and exec sessions are long-lived by design, and revocation and the per-agent cap bound them.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ProxyServer;

/// Timeouts and caps of the proxy's listener.
#[derive(Debug, Clone)]
pub struct ProxyListenerLimits {
    /// Request headers (and the TLS handshake) must arrive within this; idle HTTP/1 connections close after it.
    pub header_read_timeout: Duration,
    /// HTTP/2 pings, so dead clients' connections (and their watches) go away.
    pub keepalive: Duration,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
}

impl Default for ProxyListenerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(20),
            max_connections: 10_000,
        }
    }
}

/// Serves the proxy on `listener` until `shutdown`, then drops every connection.
pub async fn serve(
    listener: TcpListener,
    server: ProxyServer,
    tls: Option<TlsAcceptor>,
    limits: ProxyListenerLimits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused: (u64, Option<Instant>) = (0, None);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accepting a k8s proxy connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.0 += 1;
            if refused
                .1
                .is_none_or(|last| last.elapsed() > Duration::from_secs(10))
            {
                warn!(
                    refused = refused.0,
                    limit = limits.max_connections,
                    "closed k8s proxy connections at once: the connection cap (listen.max_agent_connections) is reached"
                );
                refused = (0, Some(Instant::now()));
            }
            continue;
        };
        stream.set_nodelay(true).ok();
        let (server, tls, limits) = (server.clone(), tls.clone(), limits.clone());
        connections.spawn(async move {
            let _slot = slot;
            let io: Box<dyn gitops_tunnel::client::Io> = match tls {
                Some(tls) => {
                    match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await
                    {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(e)) => {
                            return debug!(%peer, error = %e, "k8s proxy TLS handshake failed");
                        }
                        Err(_) => return debug!(%peer, "k8s proxy TLS handshake timed out"),
                    }
                }
                None => Box::new(stream),
            };
            let service = hyper::service::service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(req, peer).await) }
            });
            if let Err(e) = builder(&limits)
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .await
            {
                debug!(%peer, error = %e, "k8s proxy connection ended");
            }
        });
    }
    connections.abort_all();
}

fn builder(limits: &ProxyListenerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.keepalive))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
