//! The observability endpoints both binaries serve on their own port: `/metrics` (Prometheus text format
//! 0.0.4, or OpenMetrics when the scraper asks for it), `/livez` and `/readyz`, and GitLab's agent's names for
//! the probes, `/liveness` and `/readiness`. The binaries own the listener (timeouts, connection cap); this
//! module only answers requests, so it knows nothing of sockets.

use std::{fmt::Write as _, future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::{encoding, registry::Registry};

/// Why a process is not ready, for the `/readyz` body and the probe's event in `kubectl describe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotReady(pub String);

/// What `/readyz` asks; each binary says what ready means for it.
pub trait ReadinessCheck: Send + Sync + 'static {
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + '_>>;
}

/// The observability endpoints over one registry. Cheap to clone.
#[derive(Clone)]
pub struct Observability {
    registry: Arc<Registry>,
    readiness: Arc<dyn ReadinessCheck>,
}

impl std::fmt::Debug for Observability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observability").finish_non_exhaustive()
    }
}

/// The OpenMetrics content type, served when the scraper's `Accept` names it.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The paths served, for 404 bodies and docs.
pub const PATHS: &[&str] = &["/metrics", "/livez", "/readyz", "/liveness", "/readiness"];

/// Which exposition format a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4: what `promtool check metrics` and every Prometheus version read.
    PrometheusText,
    /// OpenMetrics 1.0 text, with `# EOF`.
    OpenMetrics,
}

impl Exposition {
    /// OpenMetrics only when the `Accept` header asks for it (Prometheus 2.5+ does, preferring it).
    pub fn negotiate(accept: Option<&HeaderValue>) -> Self {
        match accept.and_then(|v| v.to_str().ok()) {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::PrometheusText,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Self::PrometheusText => encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

impl Observability {
    pub fn new(registry: Arc<Registry>, readiness: Arc<dyn ReadinessCheck>) -> Self {
        Self {
            registry,
            readiness,
        }
    }

    /// The registry's metrics in `format`.
    pub fn encode(&self, format: Exposition) -> String {
        let mut out = String::new();
        let encoded = match format {
            Exposition::PrometheusText => {
                encoding::prometheus_text::encode(&mut out, &self.registry)
            }
            Exposition::OpenMetrics => encoding::text::encode(&mut out, &self.registry),
        };
        if let Err(e) = encoded {
            // Only a metric's own Encode impl can fail; say so where the scraper looks.
            let _ = writeln!(out, "# encoding failed: {e}");
        }
        out
    }

    /// Answers one request. Only GET and HEAD; anything else is 405, an unknown path 404.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET && request.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
        }
        match request.uri().path() {
            "/metrics" => {
                let format = Exposition::negotiate(request.headers().get(header::ACCEPT));
                let mut response = Response::new(Full::new(Bytes::from(self.encode(format))));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(format.content_type()),
                );
                response
            }
            // Alive while the process answers: a restart would not fix anything else.
            "/livez" | "/liveness" => text(StatusCode::OK, "ok\n".into()),
            "/readyz" | "/readiness" => match self.readiness.check().await {
                Ok(()) => text(StatusCode::OK, "ok\n".into()),
                Err(NotReady(reason)) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            other => text(
                StatusCode::NOT_FOUND,
                format!("no {other} here; try {}\n", PATHS.join(", ")),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    struct Flag(AtomicBool);

    impl ReadinessCheck for Flag {
        fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), NotReady>> + Send + '_>> {
            Box::pin(async move {
                if self.0.load(Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err(NotReady("not connected to kas".into()))
                }
            })
        }
    }

    async fn get(
        obs: &Observability,
        path: &str,
        accept: Option<&str>,
    ) -> (StatusCode, String, String) {
        let mut request = Request::get(path);
        if let Some(accept) = accept {
            request = request.header(header::ACCEPT, accept);
        }
        let response = obs.handle(request.body(()).unwrap()).await;
        let status = response.status();
        let content_type = response.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn observability() -> (Observability, Arc<Flag>, Counter) {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("demo_things", "Things done", counter.clone());
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        (
            Observability::new(Arc::new(registry), flag.clone()),
            flag,
            counter,
        )
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_unless_openmetrics_is_asked_for() {
        let (obs, _, counter) = observability();
        counter.inc();
        let (status, content_type, body) = get(&obs, "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        assert!(
            body.contains("# TYPE demo_things_total counter\ndemo_things_total 1\n"),
            "{body}"
        );
        assert!(!body.contains("# EOF"), "{body}");
        let (_, content_type, body) = get(
            &obs,
            "/metrics",
            Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        )
        .await;
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn readiness_follows_the_check_and_liveness_does_not() {
        let (obs, flag, _) = observability();
        for path in ["/readyz", "/readiness"] {
            let (status, _, body) = get(&obs, path, None).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(body, "not ready: not connected to kas\n");
        }
        for path in ["/livez", "/liveness"] {
            assert_eq!(get(&obs, path, None).await.0, StatusCode::OK, "{path}");
        }
        flag.0.store(true, Ordering::Relaxed);
        assert_eq!(get(&obs, "/readyz", None).await.0, StatusCode::OK);
        assert_eq!(get(&obs, "/nope", None).await.0, StatusCode::NOT_FOUND);
    }
}
