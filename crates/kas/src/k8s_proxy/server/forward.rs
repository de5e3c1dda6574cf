//! Carrying one authorised request down the agent's connection: `MakeRequest` on a reverse tunnel, the
//! request body streamed up, the answer streamed down, and an upgraded connection piped both ways.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use gitops_protocol::{
    HttpBodyEnd, HttpHeader, HttpRequestHeader, HttpRequestPart, HttpResponseHeader,
    HttpResponsePart, MAX_MESSAGE_BYTES, http_request_part::Part as Up,
    http_response_part::Part as Down, kubernetes_api_client::KubernetesApiClient,
};
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Streaming;
use tracing::debug;

use super::{
    BoxError, InFlight, ProxyBody, ProxyServer,
    audit::{AuditTicket, Subject},
    empty,
    request::{self, RequestInfo},
    status_code,
};
use crate::k8s_proxy::{
    ProxyError,
    auth::{Authorized, parse_authorization},
};

/// How long a request waits for one of the agent's tunnels (agentk may be reconnecting).
const TUNNEL_WAIT: Duration = Duration::from_secs(2);
/// How long the agent may take to answer with a response header. The apiserver ends requests that are not
/// long-running after its own `--request-timeout` (60 s by default); this leaves it room to say so itself.
const RESPONSE_HEADER_TIMEOUT: Duration = Duration::from_secs(70);
/// Request parts in flight to the agent: a chunk being read from the client, a few on the way.
const REQUEST_PARTS: usize = 4;
/// Largest chunk sent as one message, far below the tunnel's message limit.
const MAX_CHUNK: usize = 256 * 1024;
/// After the client closes an upgraded connection, how long the agent's remaining bytes are still passed
/// to it before the pipe is cut.
const UPGRADE_CLOSE_GRACE: Duration = Duration::from_secs(5);

const _: () = assert!(MAX_CHUNK < MAX_MESSAGE_BYTES);

/// One request being answered.
pub(super) struct Call<'a> {
    pub server: &'a ProxyServer,
    pub info: Arc<RequestInfo>,
    pub upgrade: bool,
    pub peer: SocketAddr,
}

/// What must live exactly as long as the request: its audit record, its slot in the agent's cap, and its
/// credential's session (which keeps `revoked` up to date).
struct Held {
    ticket: AuditTicket,
    _in_flight: InFlight,
    authorized: Authorized,
}

impl Call<'_> {
    /// Authorises the request and carries it; the audit ticket moves into the response when there is one.
    pub async fn run(
        self,
        req: Request<Incoming>,
        path_and_query: String,
        ticket: &mut Option<AuditTicket>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (mut req, body) = req.into_parts();
        let (authorized, in_flight) = self.admit(&req.headers, ticket).await?;
        let agent_id = authorized.agent_id;
        let channel = match self.server.state.tunnels.find(&agent_id, TUNNEL_WAIT).await {
            Some(channel) => channel,
            None => return Err(self.not_connected(&authorized)),
        };
        let header = HttpRequestHeader {
            method: req.method.as_str().to_owned(),
            path_and_query,
            headers: request::request_headers(&req.headers, self.upgrade, Some(self.peer.ip())),
            impersonation: authorized.impersonation.clone(),
        };
        let (up, parts) = mpsc::channel(REQUEST_PARTS);
        up.send(part(Up::Header(header))).await.ok();
        // The body pump stops when the call does (the guard lives with the response).
        let call_over = CancellationToken::new();
        let on_upgrade = if self.upgrade {
            // An upgrade request has no body; the stream stays open for the upgraded bytes.
            up.send(part(Up::End(HttpBodyEnd {}))).await.ok();
            req.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            tokio::spawn(pump_body(body, up.clone(), call_over.clone()));
            None
        };
        let (header, stream) = answer(channel, parts, &authorized).await?;
        let status = status_code(agent_id, header.status)?;
        let mut ticket = ticket
            .take()
            .expect("the ticket moves to the response only here");
        ticket.status(status.as_u16());
        let revoked = authorized.revoked.clone();
        let held = Held {
            ticket,
            _in_flight: in_flight,
            authorized,
        };
        let switching = status == StatusCode::SWITCHING_PROTOCOLS;
        let mut response = Response::builder().status(status);
        for (name, value) in response_headers(agent_id, &header.headers, switching)? {
            response = response.header(name, value);
        }
        if switching {
            let Some(on_upgrade) = on_upgrade else {
                return Err(ProxyError::Agent {
                    agent_id,
                    message: "switched protocols on a request that did not ask to upgrade".into(),
                });
            };
            tokio::spawn(pipe_upgraded(on_upgrade, up, stream, held));
            return Ok(response.body(empty()).expect("valid response"));
        }
        drop(up);
        let downstream = Downstream {
            stream,
            revoked,
            ends_cleanly: self.info.streaming,
            held,
            _call_over: call_over.drop_guard(),
            done: false,
        };
        let body = StreamBody::new(futures::stream::unfold(downstream, Downstream::next));
        Ok(response.body(body.boxed_unsync()).expect("valid response"))
    }

    /// Who the request is and whether it may go: the credential decided by the authoriser, the client's own
    /// impersonation refused when kas impersonates, and a slot under the agent's cap.
    async fn admit(
        &self,
        headers: &http::HeaderMap,
        ticket: &mut Option<AuditTicket>,
    ) -> Result<(Authorized, InFlight), ProxyError> {
        let credential = parse_authorization(headers.get(header::AUTHORIZATION))?;
        let authorized = self.server.authorizer.authorize(&credential).await?;
        let agent_id = authorized.agent_id;
        if let Some(ticket) = ticket.as_mut() {
            ticket.subject(Subject {
                agent_id,
                caller: authorized.caller.clone(),
            });
        }
        if authorized.impersonation.is_some() {
            request::refuse_client_impersonation(headers)?;
        }
        let limit = self.server.state.k8s_proxy.config.max_requests_per_agent;
        let in_flight = self
            .server
            .state
            .k8s_proxy
            .sessions
            .acquire(agent_id, limit)
            .ok_or_else(|| {
                ProxyError::TooManyRequests(format!(
                    "agent {:?} (id {agent_id}) already has {limit} proxied requests in flight \
                     (k8s_proxy.max_requests_per_agent); retry later",
                    authorized.agent_name
                ))
            })?;
        Ok((authorized, in_flight))
    }

    fn not_connected(&self, authorized: &Authorized) -> ProxyError {
        let connections = &self.server.state.connections;
        let agent_id = authorized.agent_id;
        let last_seen = if connections.of_agent(agent_id).is_empty() {
            connections.last_seen(agent_id).map(rfc3339)
        } else {
            // Its configuration stream is up but no tunnel is: say so rather than "never".
            Some(format!(
                "{} (its configuration stream is open, but it has no reverse tunnel)",
                rfc3339(crate::store::now())
            ))
        };
        ProxyError::AgentNotConnected {
            agent_id,
            agent_name: authorized.agent_name.clone(),
            last_seen,
        }
    }
}

/// Makes the call and waits for the agent's response header, unless the credential is revoked first or
/// the agent takes longer than [`RESPONSE_HEADER_TIMEOUT`].
async fn answer(
    channel: gitops_tunnel::reverse::TunnelChannel,
    parts: mpsc::Receiver<HttpRequestPart>,
    authorized: &Authorized,
) -> Result<(HttpResponseHeader, Streaming<HttpResponsePart>), ProxyError> {
    let agent_id = authorized.agent_id;
    let mut client = KubernetesApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let answer = async {
        let mut stream = client
            .make_request(ReceiverStream::new(parts))
            .await
            .map_err(|status| agent_error(agent_id, &status))?
            .into_inner();
        match stream.message().await {
            Ok(Some(HttpResponsePart {
                part: Some(Down::Header(header)),
            })) => Ok((header, stream)),
            Ok(_) => Err(ProxyError::Agent {
                agent_id,
                message: "answered without a response header".into(),
            }),
            Err(status) => Err(agent_error(agent_id, &status)),
        }
    };
    tokio::select! {
        answer = tokio::time::timeout(RESPONSE_HEADER_TIMEOUT, answer) => answer.map_err(|_| {
            ProxyError::Timeout(format!(
                "agent {:?} (id {agent_id}) did not answer within {RESPONSE_HEADER_TIMEOUT:?}",
                authorized.agent_name
            ))
        })?,
        () = authorized.revoked.cancelled() => Err(revoked_error()),
    }
}

fn rfc3339(unix: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

fn part(part: Up) -> HttpRequestPart {
    HttpRequestPart { part: Some(part) }
}

fn agent_error(agent_id: u64, status: &tonic::Status) -> ProxyError {
    ProxyError::Agent {
        agent_id,
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

fn revoked_error() -> ProxyError {
    ProxyError::Forbidden(
        "the credential was revoked or is no longer allowed while the request was in progress"
            .into(),
    )
}

/// The agent's response headers as the client gets them: end-to-end ones only, except that a `101` keeps
/// `Connection` and `Upgrade`.
fn response_headers(
    agent_id: u64,
    headers: &[HttpHeader],
    switching: bool,
) -> Result<Vec<(HeaderName, HeaderValue)>, ProxyError> {
    let mut map = http::HeaderMap::new();
    for h in headers {
        let invalid = || ProxyError::Agent {
            agent_id,
            message: format!("answered with an invalid header {:?}", h.name),
        };
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| invalid())?;
        let value = HeaderValue::from_bytes(&h.value).map_err(|_| invalid())?;
        map.append(name, value);
    }
    Ok(request::end_to_end(&map, switching))
}

/// Sends the client's body up as it arrives, then `end`. A client that stops sending mid-body aborts the
/// call (the stream closes without `end`).
async fn pump_body(
    mut body: Incoming,
    up: mpsc::Sender<HttpRequestPart>,
    call_over: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            () = call_over.cancelled() => return,
            frame = body.frame() => frame,
        };
        match frame {
            None => break,
            Some(Err(e)) => return debug!(error = %e, "the client's request body failed"),
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue; // Trailers: not forwarded (hop-by-hop `Trailer` is not either).
                };
                while !data.is_empty() {
                    let chunk = data.split_to(data.len().min(MAX_CHUNK));
                    let sent = tokio::select! {
                        () = call_over.cancelled() => return,
                        sent = up.send(part(Up::Data(chunk.to_vec()))) => sent,
                    };
                    if sent.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = up.send(part(Up::End(HttpBodyEnd {}))).await;
}

/// The answer's body, pulled from the agent only as fast as hyper sends it on.
struct Downstream {
    stream: Streaming<HttpResponsePart>,
    revoked: CancellationToken,
    /// A watch or followed log: when the agent's stream ends early (its tunnel closed), the body ends
    /// cleanly and the client starts again (kubectl re-lists). Any other body fails instead, so a client
    /// never takes a truncated list for a whole one.
    ends_cleanly: bool,
    held: Held,
    _call_over: DropGuard,
    done: bool,
}

type Chunk = Result<Frame<Bytes>, BoxError>;

impl Downstream {
    async fn next(mut self) -> Option<(Chunk, Self)> {
        if self.done {
            return None;
        }
        let message = tokio::select! {
            biased;
            () = self.revoked.cancelled() => {
                self.held.ticket.ended = "revoked";
                return self.fail("the credential was revoked or is no longer allowed");
            }
            message = self.stream.message() => message,
        };
        match message {
            Ok(Some(HttpResponsePart {
                part: Some(Down::Data(data)),
            })) => Some((Ok(Frame::data(Bytes::from(data))), self)),
            Ok(Some(HttpResponsePart {
                part: Some(Down::End(_)),
            })) => None,
            Ok(Some(_)) => {
                self.held.ticket.ended = "agent protocol error";
                self.fail("the agent sent an unexpected message in the response body")
            }
            Ok(None) | Err(_) => {
                self.held.ticket.ended = "agent closed";
                if self.ends_cleanly {
                    None
                } else {
                    self.fail("the agent's connection closed before the response was complete")
                }
            }
        }
    }

    fn fail(mut self, why: &'static str) -> Option<(Chunk, Self)> {
        self.done = true;
        Some((Err(why.into()), self))
    }
}

/// Pipes an upgraded connection: the client's bytes up as `upgrade_data`, the agent's down, until either
/// side closes, the credential is revoked, or (after the client closed) the grace period passes.
async fn pipe_upgraded(
    on_upgrade: hyper::upgrade::OnUpgrade,
    up: mpsc::Sender<HttpRequestPart>,
    mut stream: Streaming<HttpResponsePart>,
    mut held: Held,
) {
    let revoked = held.authorized.revoked.clone();
    let upgraded = tokio::select! {
        upgraded = on_upgrade => match upgraded {
            Ok(upgraded) => upgraded,
            Err(e) => {
                held.ticket.ended = "client upgrade failed";
                return debug!(error = %e, "the client's connection did not upgrade");
            }
        },
        () = revoked.cancelled() => {
            held.ticket.ended = "revoked";
            return;
        }
    };
    let (mut from_client, mut to_client) = tokio::io::split(TokioIo::new(upgraded));
    let client_to_agent = async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if up
                        .send(part(Up::UpgradeData(buf[..n].to_vec())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // Dropping `up` closes the request stream: the agent closes its side of the upgrade.
    };
    let agent_to_client = async move {
        loop {
            match stream.message().await {
                Ok(Some(HttpResponsePart {
                    part: Some(Down::UpgradeData(data) | Down::Data(data)),
                })) => {
                    if to_client.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Ok(Some(HttpResponsePart {
                    part: Some(Down::End(_)) | None,
                })) => {}
                Ok(Some(_)) | Ok(None) | Err(_) => break,
            }
        }
        let _ = to_client.shutdown().await;
    };
    tokio::pin!(client_to_agent, agent_to_client);
    held.ticket.ended = tokio::select! {
        () = revoked.cancelled() => "revoked",
        () = &mut agent_to_client => "agent closed",
        () = &mut client_to_agent => {
            tokio::select! {
                () = revoked.cancelled() => "revoked",
                () = &mut agent_to_client => "client closed",
                () = tokio::time::sleep(UPGRADE_CLOSE_GRACE) => "client closed; agent cut after the grace period",
            }
        }
    };
}
