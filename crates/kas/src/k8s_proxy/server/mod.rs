//! The proxy's listener (`listen.k8s_proxy`): accepts Kubernetes API requests, has them authorised, and
//! carries them down the agent's connection with `KubernetesApi.MakeRequest`, streaming both ways.
//!
//! One request is one `MakeRequest` call on one of the agent's reverse tunnels. The request body goes up
//! chunk by chunk through a small bounded channel and the answer comes down as hyper pulls it, so both
//! directions move at the pace of the slower side (HTTP/2 flow control on the tunnel does the rest) and
//! nothing is buffered whole. A `101 Switching Protocols` answer turns the call into a byte pipe between the
//! client's upgraded connection and agentk's (exec, attach, port-forward).
//!
//! Every request runs under its credential's `revoked` token, so revoking a CI token ends its watches and
//! exec sessions at once, and counts against `k8s_proxy.max_requests_per_agent` until its response (or
//! pipe) is done. Each leaves one audit record ([`audit`]).

mod audit;
mod forward;
pub mod listener;
pub mod request;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;

pub use self::audit::AuditLog;
use self::audit::AuditTicket;
use super::{ProxyError, auth::ProxyAuthorizer};
use crate::KasState;

/// What a body error is.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer the proxy gives: a stream from the agent, or a `Status` of kas's own.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Requests in flight per agent (owned by this module).
#[derive(Debug, Default)]
pub struct SessionState {
    in_flight: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One request in flight for an agent; dropping it frees the slot.
#[derive(Debug)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<u64, usize>>>,
    agent_id: u64,
}

impl SessionState {
    /// Proxied requests of `agent_id` in flight now (watches and exec sessions included).
    pub fn in_flight(&self, agent_id: u64) -> usize {
        let counts = self.in_flight.lock().expect("in-flight lock");
        counts.get(&agent_id).copied().unwrap_or_default()
    }

    /// Takes a slot, unless `limit` are taken.
    fn acquire(&self, agent_id: u64, limit: usize) -> Option<InFlight> {
        let mut counts = self.in_flight.lock().expect("in-flight lock");
        let count = counts.entry(agent_id).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(InFlight {
            counts: self.in_flight.clone(),
            agent_id,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("in-flight lock");
        if let Some(count) = counts.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.agent_id);
            }
        }
    }
}

/// Answers the proxy's requests; cheap to clone (one per connection).
#[derive(Clone)]
pub struct ProxyServer {
    state: Arc<KasState>,
    authorizer: Arc<dyn ProxyAuthorizer>,
    audit: AuditLog,
}

impl std::fmt::Debug for ProxyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyServer")
    }
}

impl ProxyServer {
    /// Needs a tokio runtime: it starts the audit log's writer.
    pub fn new(state: Arc<KasState>, authorizer: Arc<dyn ProxyAuthorizer>) -> Self {
        let audit = AuditLog::start(
            state.store.clone(),
            state.k8s_proxy.config.audit_entries_per_agent,
            state.metrics.proxy.clone(),
        );
        Self {
            state,
            authorizer,
            audit,
        }
    }

    /// Answers one request from `peer`; never fails: refusals are Kubernetes `Status` objects.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        // HTTP/2 has no `Connection` header; kubectl upgrades over HTTP/1.1.
        let upgrade = req.version() <= http::Version::HTTP_11 && request::is_upgrade(req.headers());
        let path = request::api_path_and_query(req.uri());
        let info = Arc::new(request::request_info(
            req.method(),
            path.as_deref().unwrap_or(req.uri().path()),
            upgrade,
        ));
        let mut ticket = Some(AuditTicket::new(self.audit.clone(), info.clone()));
        let call = forward::Call {
            server: self,
            info,
            upgrade,
            peer,
        };
        let result = match path {
            Ok(path) => call.run(req, path, &mut ticket).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(response) => response,
            Err(e) => {
                let response = status_response(&e);
                if let Some(ticket) = &mut ticket {
                    ticket.status(response.status().as_u16());
                    ticket.ended = "refused";
                }
                if e.status_code().is_server_error() {
                    tracing::info!(error = %e, "k8s proxy request failed");
                }
                response
            }
        }
    }
}

/// A refusal as Kubernetes `Status` JSON, with its code.
pub fn status_response(error: &ProxyError) -> Response<ProxyBody> {
    Response::builder()
        .status(error.status_code())
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(error.to_status_json()))
        .expect("static response")
}

fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> ProxyBody {
    full(Bytes::new())
}

/// `StatusCode` of an agent's answer, which must be a valid HTTP status.
fn status_code(agent_id: u64, status: u32) -> Result<StatusCode, ProxyError> {
    u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| ProxyError::Agent {
            agent_id,
            message: format!("answered with an invalid HTTP status {status}"),
        })
}
