//! A plain HTTP/1.1 listener with the timeouts and caps an internet-facing port needs, for kas's API (GraphQL,
//! webhooks, health). It lives here, next to the agent listener, because both share the hyper and TLS
//! plumbing; it knows nothing about what it serves.
//!
//! `axum::serve` installs no timer, so it has no header or body read timeout and no connection cap: one
//! client sending a byte every few seconds holds a connection (and a buffered body) forever. Here headers must
//! arrive within `header_read_timeout` (hyper also closes an idle keep-alive connection after it), a body
//! within `body_read_timeout` of its headers, and connections over `max_connections` are closed at once.
//! Only HTTP/1.1 is spoken: HTTP/2 would need its own idle and header limits and no API client needs it.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, time::Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Timeouts and caps of an HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Request headers (and the TLS handshake) must arrive within this; idle connections close after it.
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this, counted from its headers.
    pub body_read_timeout: Duration,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1_000,
        }
    }
}

/// The body a request reached the service with: fails once its deadline passes.
pub struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
}

/// Why a request body stopped.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?} (listen.body_read_timeout)")]
pub struct BodyTimeout(Duration);

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves `service` on `listener` (over TLS when `tls` is set) until `shutdown` is cancelled, then drops
/// every connection.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    tls: Option<TlsAcceptor>,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    S: tower::Service<Request<DeadlineBody>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut full = crate::server::Throttled::new("API", "listen.max_api_connections reached");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            full.hit(limits.max_connections);
            continue;
        };
        let (service, tls, limits) = (service.clone(), tls.clone(), limits.clone());
        connections.spawn(async move {
            let _slot = slot;
            let io: Box<dyn crate::client::Io> = match tls {
                Some(tls) => {
                    match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await
                    {
                        Ok(Ok(tls)) => Box::new(tls),
                        Ok(Err(e)) => return debug!(%peer, error = %e, "API TLS handshake failed"),
                        Err(_) => return debug!(%peer, "API TLS handshake timed out"),
                    }
                }
                None => Box::new(stream),
            };
            let body_timeout = limits.body_read_timeout;
            let service = tower::ServiceExt::map_request(service, move |req: Request<Incoming>| {
                req.map(|inner| DeadlineBody {
                    inner,
                    deadline: Box::pin(tokio::time::sleep(body_timeout)),
                    timeout: body_timeout,
                })
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
                .await
            {
                debug!(%peer, error = %e, "API connection ended");
            }
        });
    }
    connections.abort_all();
}
