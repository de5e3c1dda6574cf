//! `listen.observability`: `/metrics`, `/livez`, `/readyz` (and GitLab's `/liveness`, `/readiness`), on a
//! port of its own so that a scraper or a probe needs no credential and reaches nothing else.

use std::{future::Future, pin::Pin, sync::Arc};

use axum::{Router, extract::Request};
use gitops_telemetry::observability::{NotReady, Observability, ReadinessCheck};
use gitops_tunnel::listener::HttpLimits;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::KasState;

/// Ready while the store answers a real transaction. It is asked only once every listener is bound and
/// serving (this one starts last), so "listeners up" holds whenever it answers at all.
struct KasReadiness(Arc<KasState>);

impl ReadinessCheck for KasReadiness {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + '_>> {
        Box::pin(async move {
            let store = self.0.store.clone();
            match tokio::task::spawn_blocking(move || store.check()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(NotReady(format!("the store does not answer: {e}"))),
                Err(e) => Err(NotReady(format!("the store check panicked: {e}"))),
            }
        })
    }
}

/// The endpoints over kas's registry.
pub fn endpoints(state: Arc<KasState>) -> Observability {
    Observability::new(state.metrics.registry(), Arc::new(KasReadiness(state)))
}

/// Serves the endpoints on `socket` until `stop`, with the API listener's timeouts and connection cap.
pub async fn serve(
    socket: TcpListener,
    state: Arc<KasState>,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    let endpoints = endpoints(state);
    let router = Router::new().fallback(move |request: Request| {
        let endpoints = endpoints.clone();
        async move { endpoints.handle(request).await }
    });
    gitops_tunnel::listener::serve(socket, router, None, limits, stop).await;
}
