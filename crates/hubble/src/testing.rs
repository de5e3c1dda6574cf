//! A Hubble Observer server that replays the flows a test hands it.
//!
//! **A stand-in**, for Cilium's eBPF datapath, which cannot run here: the flows it serves are written by the
//! test, not observed on a network. Everything around it is real: the gRPC API and wire format are Hubble's
//! (`proto/hubble/`), and it applies the request's whitelist and blacklist the way Hubble does for the
//! fields agentk's filters use (verdict, event type, drop reason, traffic direction); a filter setting any
//! other field is refused with `UNIMPLEMENTED` rather than ignored, so a test never passes on a filter this
//! stand-in does not apply. A follower that falls behind gets a `LostEvent` with the count, as from Hubble.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::broadcast,
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Request, Response, Status,
    transport::{Server, server::Connected},
};

use crate::{
    flow::{Flow, FlowFilter, LostEvent, LostEventSource},
    observer::{
        GetFlowsRequest, GetFlowsResponse, ServerStatusRequest, ServerStatusResponse,
        get_flows_response::ResponseTypes,
        observer_server::{Observer, ObserverServer},
    },
};

/// Followers buffer this many flows before they lose some.
const FOLLOW_BUFFER: usize = 64 * 1024;

/// What the server has seen, for assertions.
#[derive(Debug, Default)]
struct Seen {
    requests: Vec<GetFlowsRequest>,
}

#[derive(Clone)]
struct Replay {
    flows: broadcast::Sender<Arc<Flow>>,
    seen: Arc<Mutex<Seen>>,
    /// Ends every open stream (with UNAVAILABLE) when the server stops.
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A running replay server on a loopback port. [`ReplayServer::stop`] takes it down (open streams end, new
/// connections are refused) and [`ReplayServer::start_again`] brings it back on the same port.
pub struct ReplayServer {
    addr: SocketAddr,
    flows: broadcast::Sender<Arc<Flow>>,
    seen: Arc<Mutex<Seen>>,
    running: Option<(tokio::sync::watch::Sender<bool>, JoinHandle<()>)>,
    tls: Option<TlsAcceptor>,
}

impl ReplayServer {
    /// Listens on a free loopback port.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(None).await
    }

    /// Listens on a free loopback port with TLS (`config` decides whether client certificates are required),
    /// as hubble-relay does with `tls.enabled`.
    pub async fn start_tls(config: rustls::ServerConfig) -> std::io::Result<Self> {
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self::start_with(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let (flows, _) = broadcast::channel(FOLLOW_BUFFER);
        let mut server = Self {
            addr: listener.local_addr()?,
            flows,
            seen: Arc::default(),
            running: None,
            tls,
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let replay = Replay {
            flows: self.flows.clone(),
            seen: self.seen.clone(),
            stop: stop_rx.clone(),
        };
        let mut shutdown = stop_rx;
        let tls = self.tls.clone();
        let task = tokio::spawn(async move {
            let stopped = async move {
                let _ = shutdown.wait_for(|stopped| *stopped).await;
            };
            let router = Server::builder().add_service(ObserverServer::new(replay));
            let tcp = TcpListenerStream::new(listener);
            let _ = match tls {
                None => router.serve_with_incoming_shutdown(tcp, stopped).await,
                Some(acceptor) => {
                    // A failed handshake (a client without its certificate, say) drops that connection only.
                    let incoming = tcp
                        .then(move |tcp| {
                            let acceptor = acceptor.clone();
                            async move { acceptor.accept(tcp?).await.map(TlsIo) }
                        })
                        .filter_map(|accepted| async move { accepted.ok() })
                        .map(Ok::<_, std::io::Error>);
                    router.serve_with_incoming_shutdown(incoming, stopped).await
                }
            };
        });
        self.running = Some((stop_tx, task));
    }

    /// `host:port`, as `cilium.hubble_relay_address` takes it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Sends `flows` to every follower whose filters pass them; returns how many followers there are.
    pub fn send(&self, flows: impl IntoIterator<Item = Flow>) -> usize {
        for flow in flows {
            let _ = self.flows.send(Arc::new(flow));
        }
        self.flows.receiver_count()
    }

    /// Open `GetFlows` streams (followers) right now.
    pub fn followers(&self) -> usize {
        self.flows.receiver_count()
    }

    /// Waits until at least `n` followers are connected.
    pub async fn wait_for_followers(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.followers() < n {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Every `GetFlows` request received so far.
    pub fn requests(&self) -> Vec<GetFlowsRequest> {
        self.seen.lock().expect("lock").requests.clone()
    }

    /// Takes the server down: open streams end with UNAVAILABLE and the port stops accepting.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Serves again on the same port.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr).await?;
        self.serve(listener);
        Ok(())
    }

    /// Sends `per_second` flows a second (made by `make`, given a running index) until the returned task is
    /// aborted, in ticks of 1 ms, so the rate is smooth rather than one burst a second.
    pub fn send_at_rate(
        &self,
        per_second: u64,
        make: impl Fn(u64) -> Flow + Send + 'static,
    ) -> JoinHandle<()> {
        let flows = self.flows.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * per_second as f64) as u64;
                while sent < due {
                    let _ = flows.send(Arc::new(make(sent)));
                    sent += 1;
                }
            }
        })
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(true);
            task.abort();
        }
    }
}

/// A server-side TLS connection, as tonic's server takes it.
struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsIo {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Replay {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let request = request.into_inner();
        for filter in request.whitelist.iter().chain(&request.blacklist) {
            check_supported(filter)?;
        }
        if !request.follow {
            return Err(Status::unimplemented(
                "the replay server only follows (it keeps no ring buffer)",
            ));
        }
        self.seen
            .lock()
            .expect("lock")
            .requests
            .push(request.clone());
        let mut flows = self.flows.subscribe();
        let mut stop = self.stop.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let next = tokio::select! {
                    // The client went away (its call was cancelled): stop following, as Hubble does.
                    () = tx.closed() => return,
                    () = stopped(&mut stop) => {
                        let _ = tx.send(Err(Status::unavailable("hubble replay server stopped"))).await;
                        return;
                    }
                    next = flows.recv() => next,
                };
                let response = match next {
                    Ok(flow) => {
                        if !passes(&request, &flow) {
                            continue;
                        }
                        ResponseTypes::Flow((*flow).clone())
                    }
                    Err(broadcast::error::RecvError::Lagged(lost)) => {
                        ResponseTypes::LostEvents(LostEvent {
                            source: LostEventSource::ObserverEventsQueue as i32,
                            num_events_lost: lost,
                            cpu: None,
                        })
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let message = GetFlowsResponse {
                    response_types: Some(response),
                    node_name: "replay".into(),
                    time: None,
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(ServerStatusResponse {
            version: "replay".into(),
            ..Default::default()
        }))
    }
}

/// Returns once the server is told to stop (or is gone).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// A stream fed by a task; ends when the task does.
fn async_stream<F, Fut>(body: F) -> FlowStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<GetFlowsResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Refuses filters on fields this stand-in does not apply.
fn check_supported(filter: &FlowFilter) -> Result<(), Status> {
    let supported = FlowFilter {
        verdict: filter.verdict.clone(),
        event_type: filter.event_type.clone(),
        drop_reason_desc: filter.drop_reason_desc.clone(),
        traffic_direction: filter.traffic_direction.clone(),
        ..Default::default()
    };
    if *filter == supported {
        Ok(())
    } else {
        Err(Status::unimplemented(format!(
            "the replay server applies only verdict, event_type, drop_reason_desc and traffic_direction \
             filters; got {filter:?}"
        )))
    }
}

/// Hubble's rule: a flow passes when it matches one whitelist filter (or the whitelist is empty) and no
/// blacklist filter.
fn passes(request: &GetFlowsRequest, flow: &Flow) -> bool {
    (request.whitelist.is_empty() || request.whitelist.iter().any(|f| matches(f, flow)))
        && !request.blacklist.iter().any(|f| matches(f, flow))
}

/// Every set field matches (fields are ANDed, values within a field ORed).
fn matches(filter: &FlowFilter, flow: &Flow) -> bool {
    let event = flow.event_type.as_ref();
    (filter.verdict.is_empty() || filter.verdict.contains(&flow.verdict))
        && (filter.event_type.is_empty()
            || filter.event_type.iter().any(|e| {
                event.is_some_and(|ev| {
                    ev.r#type == e.r#type && (!e.match_sub_type || ev.sub_type == e.sub_type)
                })
            }))
        && (filter.drop_reason_desc.is_empty()
            || filter.drop_reason_desc.contains(&flow.drop_reason_desc))
        && (filter.traffic_direction.is_empty()
            || filter.traffic_direction.contains(&flow.traffic_direction))
}
