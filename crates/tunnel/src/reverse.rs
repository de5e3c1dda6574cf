//! Reverse calls: kas calling gRPC services that agentk serves, over connections agentk dialled.
//!
//! agentk keeps a few `ReverseTunnel.Open` streams open. Each stream's frames carry the bytes of one HTTP/2
//! connection on which kas is the client and agentk the server, so any tonic service agentk registers is
//! callable from kas with an ordinary generated client over a [`TunnelChannel`]. Adding a module (the
//! Kubernetes API proxy, say) means adding a service on agentk and a client call on kas; the transport does
//! not change.

use std::{
    collections::HashMap,
    hash::Hash,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt, future::BoxFuture};
use gitops_protocol::{
    TunnelFrame,
    reverse_tunnel_client::ReverseTunnelClient,
    reverse_tunnel_server::{ReverseTunnel, ReverseTunnelServer},
};
use http::{Request, Response, Uri};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, PollSender};
use tonic::{Status, Streaming, body::Body, service::Routes};
use tracing::{debug, info};

use crate::{backoff::Backoff, io::MessageIo};

/// A callable connection to one agent: use it as the transport of any generated tonic client.
#[derive(Clone)]
pub struct TunnelChannel {
    sender: SendRequest<Body>,
}

impl std::fmt::Debug for TunnelChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelChannel")
    }
}

impl tower::Service<Request<Body>> for TunnelChannel {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<'static, Result<Response<Incoming>, hyper::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // HTTP/2 needs :scheme and :authority; generated clients only set the path.
        if req.uri().scheme().is_none() {
            let path = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_owned();
            *req.uri_mut() = Uri::builder()
                .scheme("http")
                .authority("agentk")
                .path_and_query(path)
                .build()
                .expect("valid uri");
        }
        let fut = self.sender.send_request(req);
        Box::pin(fut)
    }
}

/// One open tunnel: its id in the registry and the HTTP/2 client over it.
type Tunnel = (u64, SendRequest<Body>);

/// kas's record of the tunnels each agent has open, keyed by whatever identifies an agent.
pub struct TunnelRegistry<K> {
    tunnels: Mutex<HashMap<K, Vec<Tunnel>>>,
    next_id: AtomicU64,
    changed: Notify,
}

impl<K> std::fmt::Debug for TunnelRegistry<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelRegistry")
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Default for TunnelRegistry<K> {
    fn default() -> Self {
        Self {
            tunnels: Mutex::default(),
            next_id: AtomicU64::new(1),
            changed: Notify::new(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> TunnelRegistry<K> {
    /// A tunnel to `key`'s agent, waiting up to `wait` for one to appear (agentk may be reconnecting).
    pub async fn find(&self, key: &K, wait: Duration) -> Option<TunnelChannel> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(channel) = self.pick(key) {
                return Some(channel);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn pick(&self, key: &K) -> Option<TunnelChannel> {
        let mut tunnels = self.tunnels.lock().expect("registry lock");
        let list = tunnels.get_mut(key)?;
        list.retain(|(_, sender)| !sender.is_closed());
        // Spread calls: take the first ready one and rotate it to the back.
        let index = list.iter().position(|(_, s)| s.is_ready())?;
        let entry = list.remove(index);
        let channel = TunnelChannel {
            sender: entry.1.clone(),
        };
        list.push(entry);
        Some(channel)
    }

    /// How many tunnels `key`'s agent has open now.
    pub fn count(&self, key: &K) -> usize {
        self.tunnels
            .lock()
            .expect("registry lock")
            .get(key)
            .map_or(0, |l| l.iter().filter(|(_, s)| !s.is_closed()).count())
    }

    fn add(&self, key: K, sender: SendRequest<Body>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.tunnels
            .lock()
            .expect("registry lock")
            .entry(key)
            .or_default()
            .push((id, sender));
        self.changed.notify_waiters();
        id
    }

    fn remove(&self, key: &K, id: u64) {
        let mut tunnels = self.tunnels.lock().expect("registry lock");
        if let Some(list) = tunnels.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                tunnels.remove(key);
            }
        }
    }
}

/// What kas needs to know about the caller of `Open`: which agent it is, and when to cut the tunnel
/// (e.g. when the token it was opened with is revoked).
pub trait TunnelAuthority<K>: Send + Sync + 'static {
    fn admit(&self, extensions: &http::Extensions) -> Result<(K, CancellationToken), Status>;
}

/// kas's `ReverseTunnel` service.
pub struct ReverseTunnelService<K, T> {
    registry: Arc<TunnelRegistry<K>>,
    authority: Arc<T>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static, T: TunnelAuthority<K>>
    ReverseTunnelService<K, T>
{
    pub fn new(registry: Arc<TunnelRegistry<K>>, authority: Arc<T>) -> ReverseTunnelServer<Self> {
        // Frames carry raw HTTP/2 bytes of calls to agentk; the same limit as every other message.
        ReverseTunnelServer::new(Self {
            registry,
            authority,
        })
        .max_decoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
    }
}

type FrameResult = Result<TunnelFrame, Status>;

#[tonic::async_trait]
impl<K: Hash + Eq + Clone + Send + Sync + 'static, T: TunnelAuthority<K>> ReverseTunnel
    for ReverseTunnelService<K, T>
{
    type OpenStream = ReceiverStream<FrameResult>;

    async fn open(
        &self,
        request: tonic::Request<Streaming<TunnelFrame>>,
    ) -> Result<tonic::Response<Self::OpenStream>, Status> {
        let (key, cancel) = self.authority.admit(request.extensions())?;
        let incoming = request.into_inner();
        let (tx, rx) = mpsc::channel::<FrameResult>(16);
        let io = frame_io(incoming, tx.clone());
        let registry = self.registry.clone();
        tokio::spawn(async move {
            let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            builder
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30));
            let (sender, connection) = match builder.handshake::<_, Body>(TokioIo::new(io)).await {
                Ok(pair) => pair,
                Err(e) => return debug!(error = %e, "reverse tunnel handshake failed"),
            };
            let id = registry.add(key.clone(), sender);
            tokio::select! {
                result = connection => if let Err(e) = result { debug!(error = %e, "reverse tunnel ended") },
                _ = cancel.cancelled() => {
                    let _ = tx.send(Err(Status::unauthenticated("agent token revoked"))).await;
                }
            }
            registry.remove(&key, id);
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// A byte stream over a tunnel's incoming frames and an outgoing frame channel.
fn frame_io<E>(
    incoming: Streaming<TunnelFrame>,
    outgoing: mpsc::Sender<Result<TunnelFrame, E>>,
) -> MessageIo
where
    E: Send + 'static,
{
    let incoming = incoming.map(|frame| frame.map(|f| f.data.into()).map_err(io::Error::other));
    let outgoing = PollSender::new(outgoing)
        .sink_map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
        .with(|data: Bytes| {
            std::future::ready(Ok::<_, io::Error>(Ok(TunnelFrame {
                data: data.to_vec(),
            })))
        });
    MessageIo::new(incoming, outgoing)
}

/// agentk's side: keeps `count` tunnels open to kas, serving `routes` on each, until `shutdown`.
pub async fn serve_tunnels<S>(
    client: ReverseTunnelClient<S>,
    routes: Routes,
    count: usize,
    shutdown: CancellationToken,
) where
    S: tonic::client::GrpcService<Body> + Clone + Send + 'static,
    S::Future: Send,
    S::ResponseBody: hyper::body::Body<Data = Bytes> + Send + 'static,
    <S::ResponseBody as hyper::body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let (client, routes, shutdown) = (client.clone(), routes.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut backoff = Backoff::default();
            while !shutdown.is_cancelled() {
                let started = tokio::time::Instant::now();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    result = serve_one_tunnel(client.clone(), routes.clone()) => match result {
                        Ok(()) => debug!("reverse tunnel closed"),
                        // The configuration stream already logs refused tokens once per attempt.
                        Err(status) if status.code() == tonic::Code::Unauthenticated => debug!(message = status.message(), "reverse tunnel refused"),
                        Err(status) => info!(code = ?status.code(), message = status.message(), "reverse tunnel refused"),
                    },
                }
                // A tunnel that lasted a while was healthy; reconnect promptly.
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn serve_one_tunnel<S>(
    mut client: ReverseTunnelClient<S>,
    routes: Routes,
) -> Result<(), Status>
where
    S: tonic::client::GrpcService<Body> + Send + 'static,
    S::Future: Send,
    S::ResponseBody: hyper::body::Body<Data = Bytes> + Send + 'static,
    <S::ResponseBody as hyper::body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let (tx, rx) = mpsc::channel::<TunnelFrame>(16);
    client = client
        .max_decoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES);
    let incoming = client.open(ReceiverStream::new(rx)).await?.into_inner();
    let outgoing = PollSender::new(tx)
        .sink_map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
        .with(|data: Bytes| {
            std::future::ready(Ok::<_, io::Error>(TunnelFrame {
                data: data.to_vec(),
            }))
        });
    let incoming =
        incoming.map(|frame| frame.map(|f| Bytes::from(f.data)).map_err(io::Error::other));
    let io = MessageIo::new(incoming, outgoing);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(routes))
        .await
        .map_err(|e| Status::unavailable(format!("reverse tunnel: {e}")))
}
