//! The Kubernetes API proxy, agentk's side: `KubernetesApi.MakeRequest`, served on the reverse tunnels.
//!
//! kas accepts a client's request on its proxy listener, decides who may make it and as whom, and sends it
//! down one of the agent's tunnels as one streaming call. agentk:
//! - checks the request head again ([`request`]): only Kubernetes API paths (404 otherwise), no
//!   `Authorization` or hop-by-hop headers, and when kas set an impersonation no `Impersonate-*` header from
//!   the client (400); then writes the impersonation headers exactly as client-go does;
//! - sends it to its own apiserver with its own credentials ([`client::ApiserverClient`], built from the
//!   same `kube::Config` as the GitOps engine's client: in-cluster ServiceAccount with token rotation, or
//!   `KUBECONFIG`), over HTTP/1.1 so that upgrades work;
//! - streams the bodies both ways through bounded buffers (`forward`): each response chunk becomes one
//!   message as soon as the apiserver writes it, so a watch event is not held back, and HTTP/2 flow control
//!   on the tunnel slows the apiserver's reader when kas reads slowly;
//! - after `101 Switching Protocols` (exec, attach, port-forward, cp over WebSocket or SPDY) pipes the raw
//!   bytes both ways, with half-close.
//!
//! Answers agentk makes itself (refusals, no Kubernetes configuration, apiserver unreachable) are ordinary
//! HTTP responses carrying a Kubernetes `Status`, so kubectl shows their message. gRPC errors mean the call
//! itself broke (kas sent something malformed, or a stream died midway); kas then aborts the client's
//! response. When kas ends the call the apiserver request is dropped, which closes its connection.
//!
//! agentk sends the request once it has the header and the first body part: `end` right away means no body
//! (a GET, an upgrade), so no chunked encoding is announced to the apiserver; kas must therefore send `end`
//! of a bodiless request at once rather than wait for the response.

pub mod client;
mod forward;
pub mod request;

use gitops_protocol::{
    HttpRequestPart, HttpResponsePart, http_request_part::Part,
    kubernetes_api_server::KubernetesApi,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

pub use client::ApiserverClient;
pub use request::Refusal;

/// Response parts waiting for kas to read them.
const RESPONSE_BUFFER: usize = 8;

/// `KubernetesApi`, forwarding to the apiserver with `client`; without one (agentk has no Kubernetes
/// configuration) every call is answered `503 Service Unavailable`.
#[derive(Debug, Clone)]
pub struct KubernetesApiService {
    client: Option<ApiserverClient>,
}

impl KubernetesApiService {
    pub fn new(client: Option<ApiserverClient>) -> Self {
        Self { client }
    }
}

#[tonic::async_trait]
impl KubernetesApi for KubernetesApiService {
    type MakeRequestStream = ReceiverStream<Result<HttpResponsePart, Status>>;

    async fn make_request(
        &self,
        request: Request<Streaming<HttpRequestPart>>,
    ) -> Result<Response<Self::MakeRequestStream>, Status> {
        let mut incoming = request.into_inner();
        let header = match incoming.message().await? {
            Some(HttpRequestPart {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "the first part of a proxied request must be its header",
                ));
            }
        };
        debug!(
            method = header.method,
            path = header.path_and_query,
            impersonated = header.impersonation.is_some(),
            "proxied request"
        );
        let (reply, responses) = mpsc::channel(RESPONSE_BUFFER);
        let checked = request::api_request(&header);
        match (&self.client, checked) {
            (None, _) => {
                let refusal = Refusal::unavailable(
                    "agentk has no Kubernetes configuration (it runs receive-only), so it cannot proxy requests to its cluster",
                );
                tokio::spawn(async move { forward::refuse(refusal, &reply).await });
            }
            (Some(_), Err(refusal)) => {
                tokio::spawn(async move { forward::refuse(refusal, &reply).await });
            }
            (Some(client), Ok(api_request)) => {
                tokio::spawn(forward::run(client.clone(), api_request, incoming, reply));
            }
        }
        Ok(Response::new(ReceiverStream::new(responses)))
    }
}
