//! One proxied request: the request body from kas to the apiserver, the response back, and after a
//! `101 Switching Protocols` the upgraded connection's bytes both ways. Every buffer is bounded, so a slow
//! reader on either side slows the writer instead of growing memory.

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use gitops_protocol::{
    HttpBodyEnd, HttpHeader, HttpRequestPart, HttpResponseHeader, HttpResponsePart,
    http_request_part::Part as RequestPart, http_response_part::Part as ResponsePart,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Status, Streaming};
use tower::BoxError;
use tracing::debug;

use super::{
    client::ApiserverClient,
    request::{self, ApiRequest, Refusal},
};

/// Request body chunks waiting for the apiserver to read them.
const REQUEST_BODY_BUFFER: usize = 4;
/// The most bytes of an upgraded connection read before they are sent on as one message.
const UPGRADE_READ_BYTES: usize = 32 * 1024;

/// The response stream to kas.
pub type Reply = mpsc::Sender<Result<HttpResponsePart, Status>>;

/// kas ended the call (it dropped the response stream).
#[derive(Debug)]
struct Closed;

/// Proxies one request and writes the answer to `reply`. Returns when the answer is complete, or as soon as
/// kas drops the response stream: everything in flight is then dropped, which closes the connection to the
/// apiserver and so ends the request there (a watch stops, an exec session's stream closes).
pub async fn run(
    client: ApiserverClient,
    request: ApiRequest,
    incoming: Streaming<HttpRequestPart>,
    reply: Reply,
) {
    let closed = reply.clone();
    let result = tokio::select! {
        result = exchange(client, request, incoming, reply.clone()) => result,
        () = closed.closed() => {
            debug!("kas ended the call; the apiserver request is aborted");
            return;
        }
    };
    if let Err(status) = result {
        debug!(code = ?status.code(), message = status.message(), "proxied request failed");
        let _ = reply.send(Err(status)).await;
    }
}

/// Writes `refusal` as a complete HTTP response.
pub async fn refuse(refusal: Refusal, reply: &Reply) {
    let _ = send_refusal(&refusal, reply).await;
}

async fn send_refusal(refusal: &Refusal, reply: &Reply) -> Result<(), Closed> {
    let header = HttpResponseHeader {
        status: u32::from(refusal.code.as_u16()),
        headers: vec![HttpHeader {
            name: "content-type".into(),
            value: b"application/json".to_vec(),
        }],
    };
    send(reply, ResponsePart::Header(header)).await?;
    send(reply, ResponsePart::Data(refusal.body())).await?;
    send(reply, ResponsePart::End(HttpBodyEnd {})).await
}

async fn send(reply: &Reply, part: ResponsePart) -> Result<(), Closed> {
    reply
        .send(Ok(HttpResponsePart { part: Some(part) }))
        .await
        .map_err(|_| Closed)
}

fn closed(_: Closed) -> Status {
    Status::cancelled("kas ended the call")
}

async fn exchange(
    client: ApiserverClient,
    request: ApiRequest,
    mut incoming: Streaming<HttpRequestPart>,
    reply: Reply,
) -> Result<(), Status> {
    let ApiRequest { parts, upgrade } = request;
    let (body, request_stream) = match next_part(&mut incoming).await? {
        RequestPart::End(_) => (
            Empty::new().map_err(BoxError::from).boxed_unsync(),
            RequestStream::Complete(Box::new(incoming)),
        ),
        RequestPart::Data(first) => {
            let (body_tx, body_rx) = mpsc::channel(REQUEST_BODY_BUFFER);
            let _ = body_tx.send(Ok(Frame::data(Bytes::from(first)))).await;
            let pump = AbortOnDropHandle::new(tokio::spawn(pump_body(incoming, body_tx)));
            (
                StreamBody::new(ReceiverStream::new(body_rx)).boxed_unsync(),
                RequestStream::Pumping(pump),
            )
        }
        RequestPart::Header(_) | RequestPart::UpgradeData(_) => {
            return Err(Status::invalid_argument(
                "a request's header must be followed by its body and `end`",
            ));
        }
    };
    let response = match client.send(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(e) => {
            // A request stream that broke mid-body is why the request failed: the call fails as a whole.
            if let Some(broken) = cause::<BrokenRequestStream>(&*e) {
                return Err(broken.0.clone());
            }
            let refusal = Refusal::unavailable(format!(
                "agentk cannot reach its apiserver at {}: {e}",
                client.cluster_url()
            ));
            return send_refusal(&refusal, &reply).await.map_err(closed);
        }
    };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    send(
        &reply,
        ResponsePart::Header(response_header(&response, switching)),
    )
    .await
    .map_err(closed)?;
    if switching && upgrade {
        let incoming = request_stream.finish().await?;
        pipe_upgraded(response, incoming, reply).await
    } else {
        stream_response_body(response.into_body(), &reply).await
    }
}

/// What is left of the request stream once the request is sent.
enum RequestStream {
    /// The body was empty; the stream is at `end`.
    Complete(Box<Streaming<HttpRequestPart>>),
    /// The body is being streamed by this task, which returns the stream at `end`.
    Pumping(AbortOnDropHandle<Result<Streaming<HttpRequestPart>, Status>>),
}

impl RequestStream {
    /// The request stream after `end`, for the upgraded connection's bytes.
    async fn finish(self) -> Result<Streaming<HttpRequestPart>, Status> {
        match self {
            RequestStream::Complete(incoming) => Ok(*incoming),
            RequestStream::Pumping(pump) => pump
                .await
                .map_err(|_| Status::internal("the request body task failed"))?,
        }
    }
}

/// The next part of a request, failing if the stream ended or broke before `end`.
async fn next_part(incoming: &mut Streaming<HttpRequestPart>) -> Result<RequestPart, Status> {
    match incoming.message().await? {
        Some(HttpRequestPart { part: Some(part) }) => Ok(part),
        Some(HttpRequestPart { part: None }) => {
            Err(Status::invalid_argument("an empty request part"))
        }
        None => Err(Status::cancelled("the request stream ended before `end`")),
    }
}

/// Feeds the request body from kas to the apiserver until `end`. A broken request stream puts an error into
/// the body, which makes the HTTP client abort the request instead of sending a truncated body as complete.
async fn pump_body(
    mut incoming: Streaming<HttpRequestPart>,
    body: mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
) -> Result<Streaming<HttpRequestPart>, Status> {
    loop {
        match next_part(&mut incoming).await {
            Ok(RequestPart::Data(data)) => {
                // The apiserver may answer before reading the whole body; the rest is then dropped.
                let _ = body.send(Ok(Frame::data(Bytes::from(data)))).await;
            }
            Ok(RequestPart::End(_)) => return Ok(incoming),
            Ok(RequestPart::Header(_) | RequestPart::UpgradeData(_)) => {
                let status =
                    Status::invalid_argument("a request body may only hold `data` until `end`");
                let _ = body
                    .send(Err(Box::new(BrokenRequestStream(status.clone()))))
                    .await;
                return Err(status);
            }
            Err(status) => {
                let _ = body
                    .send(Err(Box::new(BrokenRequestStream(status.clone()))))
                    .await;
                return Err(status);
            }
        }
    }
}

/// The error a broken request stream puts into the request body, found again in the HTTP client's error.
#[derive(Debug)]
struct BrokenRequestStream(Status);

impl std::fmt::Display for BrokenRequestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request stream broke: {}", self.0.message())
    }
}

impl std::error::Error for BrokenRequestStream {}

/// The first error of type `E` in `error`'s chain of sources.
fn cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

fn response_header(response: &Response<Incoming>, switching: bool) -> HttpResponseHeader {
    HttpResponseHeader {
        status: u32::from(response.status().as_u16()),
        headers: response
            .headers()
            .iter()
            .filter(|(name, _)| request::response_header_passes(name, switching))
            .map(|(name, value)| HttpHeader {
                name: name.as_str().to_owned(),
                value: value.as_bytes().to_vec(),
            })
            .collect(),
    }
}

/// Largest body message agentk sends: chunks that are already waiting are joined up to this, so a large LIST
/// travels in a few big messages instead of thousands of small ones.
const MAX_BODY_MESSAGE: usize = 256 * 1024;

/// Sends the body as the apiserver writes it, then `end`. A chunk goes out at once unless more are already
/// waiting (a watch event reaches kas when it happens; a LIST's many chunks are joined).
async fn stream_response_body(mut body: Incoming, reply: &Reply) -> Result<(), Status> {
    let read_error =
        |e: hyper::Error| Status::unavailable(format!("reading the apiserver's response: {e}"));
    let mut pending = Vec::new();
    let mut done = false;
    while !done {
        match body.frame().await {
            None => break,
            // Trailers: the apiserver sends none.
            Some(frame) => append_data(&mut pending, frame.map_err(read_error)?),
        }
        // Join what is ready now without waiting for more.
        while pending.len() < MAX_BODY_MESSAGE {
            match body.frame().now_or_never() {
                Some(Some(frame)) => append_data(&mut pending, frame.map_err(read_error)?),
                Some(None) => {
                    done = true;
                    break;
                }
                None => break,
            }
        }
        if !pending.is_empty() {
            send(reply, ResponsePart::Data(std::mem::take(&mut pending)))
                .await
                .map_err(closed)?;
        }
    }
    send(reply, ResponsePart::End(HttpBodyEnd {}))
        .await
        .map_err(closed)
}

fn append_data(pending: &mut Vec<u8>, frame: Frame<Bytes>) {
    if let Ok(data) = frame.into_data() {
        pending.extend_from_slice(&data);
    }
}

/// After `101`: kas's `upgrade_data` to the apiserver and the apiserver's bytes back. kas closing its stream
/// shuts down the write half to the apiserver (the apiserver may still answer); the apiserver closing the
/// connection ends the response stream.
async fn pipe_upgraded(
    response: Response<Incoming>,
    mut incoming: Streaming<HttpRequestPart>,
    reply: Reply,
) -> Result<(), Status> {
    let upgraded = hyper::upgrade::on(response)
        .await
        .map_err(|e| Status::unavailable(format!("the apiserver's upgraded connection: {e}")))?;
    let (mut from_apiserver, mut to_apiserver) = tokio::io::split(TokioIo::new(upgraded));
    let up = async move {
        while let Some(part) = incoming.next().await {
            match part?.part {
                Some(RequestPart::UpgradeData(data)) => to_apiserver
                    .write_all(&data)
                    .await
                    .map_err(|e| Status::unavailable(format!("writing to the apiserver: {e}")))?,
                _ => {
                    return Err(Status::invalid_argument(
                        "after an upgrade a request may only hold `upgrade_data`",
                    ));
                }
            }
        }
        // Half-close: the apiserver sees EOF and may still answer.
        let _ = to_apiserver.shutdown().await;
        Ok::<_, Status>(())
    };
    let down = async move {
        let mut buffer = vec![0; UPGRADE_READ_BYTES];
        loop {
            let read = from_apiserver
                .read(&mut buffer)
                .await
                .map_err(|e| Status::unavailable(format!("reading from the apiserver: {e}")))?;
            if read == 0 {
                return Ok::<_, Status>(());
            }
            send(&reply, ResponsePart::UpgradeData(buffer[..read].to_vec()))
                .await
                .map_err(closed)?;
        }
    };
    tokio::pin!(up, down);
    tokio::select! {
        result = &mut down => result,
        result = &mut up => {
            result?;
            down.await
        }
    }
}
