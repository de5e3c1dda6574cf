//! A fault-injecting TCP proxy for tests: put it between a client and a real server (the Git smart-HTTP
//! server of [`crate::git_http`], Gitea, the kube-apiserver of the test environment) and switch, while
//! connections are open, between passing bytes through and breaking them.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use test_support::fault_proxy::{Fault, FaultProxy};
//!
//! let server = test_support::git_http::GitHttpServer::start().await?;
//! let proxy = FaultProxy::for_url(&server.base_url()).await?;
//! let base_url = proxy.proxied_url(&server.base_url()); // give this to the client
//! // ... the client works through the proxy ...
//! proxy.set(Fault::ResetAfter { bytes: 4096 }); // cut the next pack mid-way
//! // ... the client fails ...
//! proxy.set(Fault::PassThrough); // and recovers
//! assert!(proxy.stats().resets >= 1);
//! # Ok(()) }
//! ```
//!
//! # What each [`Fault`] looks like to a client
//!
//! | fault | new connections | open connections |
//! |---|---|---|
//! | [`Fault::PassThrough`] | forwarded | forwarded (a stalled one resumes) |
//! | [`Fault::Reset`] | accepted, then closed with a TCP RST: "connection reset by peer" on the first read or write | closed with a RST at once, even when idle |
//! | [`Fault::Stall`] | accepted (the client's connect succeeds), nothing is forwarded or answered (no TLS handshake either): the client waits for its own timeout | nothing more is forwarded in either direction; the client's reads block |
//! | [`Fault::Trickle`] | forwarded, but the answer reaches the client `bytes` at a time, every `every` | the same, from the next chunk on |
//! | [`Fault::ResetAfter`] | the first `bytes` bytes of the answer are forwarded, then a RST: a response (e.g. a Git pack) cut in the middle | the same, counting from when the fault was set |
//! | [`Fault::ServiceUnavailable`] | every HTTP/1 request is answered by the proxy with `503 Service Unavailable` (body: a Kubernetes `Status` JSON, `Retry-After: 1`, `Connection: close`); nothing reaches the target | the next request on the connection gets the 503 (see below) |
//!
//! Faults that count or slow down bytes ([`Fault::Trickle`], [`Fault::ResetAfter`]) act on the answer
//! direction (target → client) only; requests pass at full speed. [`Fault::Stall`] and [`Fault::Reset`] act on
//! both directions.
//!
//! # HTTPS targets (the kube-apiserver)
//!
//! [`FaultProxy::start`] forwards bytes as they are, so in front of a TLS server the client still verifies the
//! server's own certificate and authenticates end to end (client certificates, tokens): resets, stalls,
//! trickles and mid-response cuts all work unchanged. A 503 cannot be forged inside a TLS stream, though;
//! with [`Fault::ServiceUnavailable`] a cleartext proxy answers a TLS client's `ClientHello` with a plain-text
//! 503, which the client reports as a TLS error ("corrupt message" / "invalid content type").
//!
//! For real 503s from an HTTPS server, use [`FaultProxy::in_front_of_apiserver`] (or
//! [`FaultProxy::start_terminating_tls`]): the proxy terminates TLS with a certificate of its own test CA
//! ([`FaultProxy::ca_pem`], valid for `127.0.0.1` and `localhost`), speaks HTTP/1.1 only (ALPN), and opens
//! its own TLS connection to the target, presenting the identity it was given (e.g. the admin client
//! certificate of the test kubeconfig) or none, in which case the clients' bearer tokens (a
//! ServiceAccount's) authenticate them. [`FaultProxy::kube_client`] and [`FaultProxy::kubeconfig`] give a
//! client of the cluster through the proxy.
//!
//! # How a 503 finds request boundaries
//!
//! The proxy does not parse HTTP. Under [`Fault::ServiceUnavailable`], a chunk read from the client that
//! starts with an HTTP method (`GET `, `POST `, …) is taken as the start of a request and answered with the
//! 503; anything else (a request body) passes through. HTTP/1 clients send a request only after the previous
//! answer, so requests start at the start of a read in practice.
//!
//! # Counting
//!
//! [`FaultProxy::stats`] counts accepted connections, open ones, resets and 503s sent by the proxy, and bytes
//! forwarded in each direction.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it forwards; switch with [`FaultProxy::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward everything as it comes.
    #[default]
    PassThrough,
    /// Close every connection, open or new, with a TCP RST.
    Reset,
    /// Accept, forward nothing in either direction, and hold the connection open.
    Stall,
    /// Forward answers `bytes` bytes at a time (at least 1), waiting `every` after each piece.
    Trickle { bytes: usize, every: Duration },
    /// Forward `bytes` more bytes of answers per connection (counted from when this fault was set, or from the
    /// connection's start if later), then close it with a RST.
    ResetAfter { bytes: u64 },
    /// Answer every HTTP request with `503 Service Unavailable` instead of forwarding it.
    ServiceUnavailable,
}

/// Counters since the proxy started; see [`FaultProxy::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted from clients.
    pub accepted: u64,
    /// Connections currently open.
    pub open: u64,
    /// Connections the proxy closed with a RST ([`Fault::Reset`], [`Fault::ResetAfter`]).
    pub resets: u64,
    /// Requests the proxy answered with 503 ([`Fault::ServiceUnavailable`]).
    pub unavailable: u64,
    /// Bytes forwarded from clients to the target.
    pub bytes_to_target: u64,
    /// Bytes forwarded from the target to clients.
    pub bytes_to_client: u64,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicU64,
    resets: AtomicU64,
    unavailable: AtomicU64,
    bytes_to_target: AtomicU64,
    bytes_to_client: AtomicU64,
}

/// The fault in force and a number that changes with every [`FaultProxy::set`], so connections can tell
/// "set again" (e.g. a fresh byte budget for [`Fault::ResetAfter`]) from "unchanged".
#[derive(Debug, Clone, Copy)]
struct Setting {
    generation: u64,
    fault: Fault,
}

/// TLS termination: the certificate shown to clients and how to reach the target.
struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    server_name: rustls::pki_types::ServerName<'static>,
    ca_pem: String,
}

struct Shared {
    target: SocketAddr,
    /// Closed when the proxy is dropped, which ends every connection.
    setting: watch::Receiver<Setting>,
    counters: Counters,
    tls: Option<Tls>,
}

/// A proxy on `127.0.0.1`; stops (and drops every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    setting: watch::Sender<Setting>,
    shared: Arc<Shared>,
    accept_loop: JoinHandle<()>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("fault", &self.fault())
            .field("tls", &self.shared.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Who the proxy is towards an HTTPS target when it terminates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamIdentity {
    /// The client certificate of the test kubeconfig (cluster-admin): clients of the proxy need no
    /// credentials of their own.
    KubeconfigClientCertificate,
    /// No client certificate: clients authenticate with their own bearer tokens, e.g. a ServiceAccount's.
    None,
}

impl FaultProxy {
    /// A cleartext proxy to `target`, passing bytes through until told otherwise. Must be called inside a
    /// tokio runtime.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_with(target, None).await
    }

    /// A cleartext proxy to the host and port of `url` (`http://127.0.0.1:PORT`, `https://…`); see
    /// [`Self::proxied_url`] for the URL clients use instead.
    pub async fn for_url(url: &str) -> anyhow::Result<Self> {
        Self::start(socket_addr_of(url)?).await
    }

    /// A proxy that terminates TLS (see the module docs): clients trust [`Self::ca_pem`]; the proxy connects to
    /// `target` with TLS using `upstream` (roots and optional client certificate) and checks the target's
    /// certificate for `server_name`. Both sides speak HTTP/1.1 only.
    pub async fn start_terminating_tls(
        target: SocketAddr,
        mut upstream: rustls::ClientConfig,
        server_name: &str,
    ) -> anyhow::Result<Self> {
        upstream.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (acceptor, ca_pem) = proxy_acceptor()?;
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("TLS server name {server_name:?}"))?;
        let tls = Tls {
            acceptor,
            connector: tokio_rustls::TlsConnector::from(Arc::new(upstream)),
            server_name,
            ca_pem,
        };
        Self::start_with(target, Some(tls)).await
    }

    /// A TLS-terminating proxy in front of the test environment's kube-apiserver (from the state file named
    /// by `GITOPS_TEST_ENV`), trusting the cluster's CA and presenting `identity` to it. Use
    /// [`Self::kube_client`] or [`Self::kubeconfig`] to reach the cluster through it.
    pub async fn in_front_of_apiserver(identity: UpstreamIdentity) -> anyhow::Result<Self> {
        crate::cluster::install_crypto_provider();
        let env = crate::env::test_env();
        let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubernetes.kubeconfig)
            .context("reading the test kubeconfig")?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig.clone(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .context("loading the test kubeconfig")?;
        let mut roots = rustls::RootCertStore::empty();
        for der in config.root_cert.iter().flatten() {
            roots
                .add(rustls::pki_types::CertificateDer::from(der.clone()))
                .context("the cluster CA of the test kubeconfig")?;
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let upstream = match identity {
            UpstreamIdentity::None => builder.with_no_client_auth(),
            UpstreamIdentity::KubeconfigClientCertificate => {
                let (certs, key) = client_identity(&config.auth_info)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .context("the client certificate of the test kubeconfig")?
            }
        };
        let url = &env.kubernetes.server;
        let host = config
            .cluster_url
            .host()
            .with_context(|| format!("apiserver URL {url} has no host"))?
            .trim_matches(['[', ']'])
            .to_owned();
        Self::start_terminating_tls(socket_addr_of(url)?, upstream, &host).await
    }

    async fn start_with(target: SocketAddr, tls: Option<Tls>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let (setting, receiver) = watch::channel(Setting {
            generation: 0,
            fault: Fault::PassThrough,
        });
        let shared = Arc::new(Shared {
            target,
            setting: receiver,
            counters: Counters::default(),
            tls,
        });
        let accept_loop = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Self {
            addr,
            setting,
            shared,
            accept_loop,
        })
    }

    /// Where clients connect: `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` with its host and port replaced by the proxy's (and `https` when the proxy terminates TLS), e.g.
    /// `http://127.0.0.1:PROXY/prefix` for `http://127.0.0.1:SERVER/prefix`.
    pub fn proxied_url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            scheme
        };
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Switches every connection, open and new, to `fault`. Setting the same fault again restarts its count
    /// ([`Fault::ResetAfter`]).
    pub fn set(&self, fault: Fault) {
        self.setting.send_modify(|setting| {
            setting.generation += 1;
            setting.fault = fault;
        });
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.setting.borrow().fault
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::SeqCst);
        ProxyStats {
            accepted: load(&c.accepted),
            open: load(&c.open),
            resets: load(&c.resets),
            unavailable: load(&c.unavailable),
            bytes_to_target: load(&c.bytes_to_target),
            bytes_to_client: load(&c.bytes_to_client),
        }
    }

    /// With TLS termination: the PEM certificate of the CA that signed the proxy's certificate (for
    /// `127.0.0.1` and `localhost`), for clients to trust.
    pub fn ca_pem(&self) -> Option<&str> {
        self.shared.tls.as_ref().map(|tls| tls.ca_pem.as_str())
    }

    /// For [`Self::in_front_of_apiserver`]: a kube client of the test cluster through the proxy. It trusts
    /// the proxy's CA and sends no credentials of its own (the proxy's upstream identity authenticates), and
    /// retries nothing by itself, so faults reach the caller.
    pub async fn kube_client(&self) -> anyhow::Result<kube::Client> {
        let ca_pem = self
            .ca_pem()
            .context("kube_client needs a TLS-terminating proxy (in_front_of_apiserver)")?;
        let url: http::Uri = format!("https://{}", self.addr).parse()?;
        let mut config = kube::Config::new(url);
        config.root_cert = Some(vec![pem_certificate_der(ca_pem)?]);
        config.default_retry = false;
        config.connect_timeout = Some(Duration::from_secs(10));
        Ok(kube::Client::try_from(config)?)
    }

    /// For [`Self::in_front_of_apiserver`]: a kubeconfig (YAML) for processes (e.g. agentk) that reach the
    /// cluster through the proxy, authenticating with `token` if given (with [`UpstreamIdentity::None`]).
    pub fn kubeconfig(&self, token: Option<&str>) -> anyhow::Result<String> {
        use base64::Engine as _;
        let ca_pem = self
            .ca_pem()
            .context("kubeconfig needs a TLS-terminating proxy (in_front_of_apiserver)")?;
        let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        let user = match token {
            Some(token) => format!("{{\"token\": {}}}", serde_json::to_string(token)?),
            None => "{}".to_owned(),
        };
        Ok(format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fault-proxy
  cluster:
    server: https://{addr}
    certificate-authority-data: {ca}
users:
- name: fault-proxy
  user: {user}
contexts:
- name: fault-proxy
  context:
    cluster: fault-proxy
    user: fault-proxy
current-context: fault-proxy
",
            addr = self.addr
        ))
    }
}

/// `host:port` of `url` as a socket address (default ports 80 and 443).
fn socket_addr_of(url: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs as _;
    let uri: http::Uri = url.parse().with_context(|| format!("URL {url:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("URL {url:?} has no host"))?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{url:?} resolves to no address"))
}

/// The client certificate chain and key of a kubeconfig user, from files or inline data.
fn client_identity(
    auth: &kube::config::AuthInfo,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    use base64::Engine as _;
    use rustls::pki_types::pem::PemObject as _;
    // Serializing exposes the key data, which AuthInfo otherwise keeps behind a secret type.
    let fields = serde_json::to_value(auth)?;
    let load = |file: &str, data: &str| -> anyhow::Result<Vec<u8>> {
        if let Some(data) = fields.get(data).and_then(|v| v.as_str()) {
            return Ok(base64::engine::general_purpose::STANDARD.decode(data.trim())?);
        }
        let path = fields
            .get(file)
            .and_then(|v| v.as_str())
            .with_context(|| format!("the test kubeconfig's user has no {file} or {data}"))?;
        std::fs::read(path).with_context(|| format!("reading {path}"))
    };
    let cert_pem = load("client-certificate", "client-certificate-data")?;
    let key_pem = load("client-key", "client-key-data")?;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .context("client certificate PEM")?;
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(&key_pem).context("client key PEM")?;
    Ok((certs, key))
}

fn pem_certificate_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    Ok(rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?.to_vec())
}

/// A CA and a certificate it signed for `127.0.0.1` and `localhost`; the acceptor offers HTTP/1.1 only.
fn proxy_acceptor() -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fault-proxy-test-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fault-proxy");
    let cert = params.signed_by(&key, &issuer)?;
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("proxy key: {e}"))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem()))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // E.g. too many open files: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.counters.accepted.fetch_add(1, Ordering::SeqCst);
        shared.counters.open.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(client, &shared).await;
            shared.counters.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Why a connection ended early.
#[derive(Debug)]
enum End {
    /// Close with a RST.
    Reset,
    /// A 503 was sent; let the client read it.
    Answered,
    /// A peer went away or the proxy was dropped: just close.
    Closed,
}

async fn serve(client: TcpStream, shared: &Shared) {
    // A second handle on the client socket, to close it with a RST whoever holds the stream.
    let Ok(control) = duplicate(&client) else {
        return;
    };
    let mut setting = shared.setting.clone();
    let end = match connect(client, shared, &mut setting).await {
        Ok((client, upstream)) => forward(client, upstream, shared, setting).await,
        Err(end) => end,
    };
    if let End::Reset = end {
        shared.counters.resets.fetch_add(1, Ordering::SeqCst);
        let _ = control.set_zero_linger();
    }
}

fn duplicate(stream: &TcpStream) -> std::io::Result<TcpStream> {
    use std::os::fd::{AsFd as _, OwnedFd};
    let fd: OwnedFd = stream.as_fd().try_clone_to_owned()?;
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true)?;
    TcpStream::from_std(std)
}

type Connected = (Box<dyn Stream>, Box<dyn Stream>);

/// Waits out a stall, then does the TLS handshake (if terminating) and connects to the target.
async fn connect(
    client: TcpStream,
    shared: &Shared,
    setting: &mut watch::Receiver<Setting>,
) -> Result<Connected, End> {
    let ready = setting
        .wait_for(|s| s.fault != Fault::Stall)
        .await
        .map_err(|_| End::Closed)?
        .fault;
    if ready == Fault::Reset {
        return Err(End::Reset);
    }
    let upstream = TcpStream::connect(shared.target)
        .await
        .map_err(|_| End::Closed)?;
    match &shared.tls {
        None => Ok((Box::new(client), Box::new(upstream))),
        Some(tls) => {
            let client = tls.acceptor.accept(client).await.map_err(|_| End::Closed)?;
            let upstream = tls
                .connector
                .connect(tls.server_name.clone(), upstream)
                .await
                .map_err(|_| End::Closed)?;
            Ok((Box::new(client), Box::new(upstream)))
        }
    }
}

async fn forward(
    client: Box<dyn Stream>,
    upstream: Box<dyn Stream>,
    shared: &Shared,
    setting: watch::Receiver<Setting>,
) -> End {
    let (mut client_read, client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let client_write = Mutex::new(client_write);
    let end = {
        let up = requests(
            &mut client_read,
            &mut upstream_write,
            &client_write,
            shared,
            setting.clone(),
        );
        let down = answers(&mut upstream_read, &client_write, shared, setting.clone());
        let pumps = async { tokio::try_join!(up, down).map(|_| ()) };
        tokio::select! {
            result = pumps => result.err().unwrap_or(End::Closed),
            end = watch_for_reset(setting) => end,
        }
    };
    if let End::Answered = end {
        // Let the client read the 503 before the socket closes: unread request bytes at close would turn
        // the close into a RST that can destroy the answer in flight.
        drop(upstream_write);
        let mut client_write = client_write.into_inner();
        let _ = client_write.shutdown().await;
        let mut sink = vec![0u8; 16 * 1024];
        let drain = async { while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
    end
}

/// Ends (with [`End::Reset`]) when the fault becomes [`Fault::Reset`], also on idle connections.
async fn watch_for_reset(mut setting: watch::Receiver<Setting>) -> End {
    match setting.wait_for(|s| s.fault == Fault::Reset).await {
        Ok(_) => End::Reset,
        Err(_) => End::Closed,
    }
}

const CHUNK: usize = 16 * 1024;

/// Client → target.
async fn requests(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    client: &Mutex<impl AsyncWrite + Unpin>,
    shared: &Shared,
    mut setting: watch::Receiver<Setting>,
) -> Result<(), End> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        unstalled(&mut setting).await?;
        let n = from.read(&mut buf).await.map_err(|_| End::Closed)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let fault = unstalled(&mut setting).await?;
        if fault == Fault::ServiceUnavailable && starts_a_request(&buf[..n]) {
            let mut client = client.lock().await;
            let _ = client.write_all(service_unavailable().as_bytes()).await;
            let _ = client.flush().await;
            shared.counters.unavailable.fetch_add(1, Ordering::SeqCst);
            return Err(End::Answered);
        }
        to.write_all(&buf[..n]).await.map_err(|_| End::Closed)?;
        to.flush().await.map_err(|_| End::Closed)?;
        shared
            .counters
            .bytes_to_target
            .fetch_add(n as u64, Ordering::SeqCst);
    }
}

/// Target → client, where trickles and byte budgets apply.
async fn answers(
    from: &mut (impl AsyncRead + Unpin),
    client: &Mutex<impl AsyncWrite + Unpin>,
    shared: &Shared,
    mut setting: watch::Receiver<Setting>,
) -> Result<(), End> {
    let mut buf = vec![0u8; CHUNK];
    // Bytes sent under the current setting, for `ResetAfter`.
    let mut generation = setting.borrow().generation;
    let mut sent: u64 = 0;
    loop {
        unstalled(&mut setting).await?;
        let n = from.read(&mut buf).await.map_err(|_| End::Closed)?;
        if n == 0 {
            let _ = client.lock().await.shutdown().await;
            return Ok(());
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let fault = unstalled(&mut setting).await?;
            let current = setting.borrow().generation;
            if current != generation {
                (generation, sent) = (current, 0);
            }
            let take = match fault {
                Fault::Reset => return Err(End::Reset),
                Fault::Trickle { bytes, .. } => bytes.max(1).min(chunk.len()),
                Fault::ResetAfter { bytes } => {
                    let left = bytes.saturating_sub(sent);
                    if left == 0 {
                        return Err(End::Reset);
                    }
                    chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX))
                }
                Fault::PassThrough | Fault::ServiceUnavailable | Fault::Stall => chunk.len(),
            };
            {
                let mut client = client.lock().await;
                client
                    .write_all(&chunk[..take])
                    .await
                    .map_err(|_| End::Closed)?;
                client.flush().await.map_err(|_| End::Closed)?;
            }
            shared
                .counters
                .bytes_to_client
                .fetch_add(take as u64, Ordering::SeqCst);
            sent += take as u64;
            chunk = &chunk[take..];
            if let Fault::Trickle { every, .. } = fault {
                // A change of fault (e.g. back to pass-through) ends the wait early.
                let _ = tokio::time::timeout(every, setting.changed()).await;
            }
            if let Fault::ResetAfter { bytes } = fault
                && sent >= bytes
            {
                return Err(End::Reset);
            }
        }
    }
}

/// Waits while the fault is [`Fault::Stall`]; returns the fault in force then.
async fn unstalled(setting: &mut watch::Receiver<Setting>) -> Result<Fault, End> {
    let fault = setting
        .wait_for(|s| s.fault != Fault::Stall)
        .await
        .map_err(|_| End::Closed)?
        .fault;
    match fault {
        Fault::Reset => Err(End::Reset),
        fault => Ok(fault),
    }
}

fn starts_a_request(data: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"POST ",
        b"PUT ",
        b"PATCH ",
        b"DELETE ",
        b"HEAD ",
        b"OPTIONS ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|method| data.starts_with(method))
}

/// The proxy's own 503: a Kubernetes `Status`, so kube clients report it as an API error with code 503.
fn service_unavailable() -> String {
    let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"fault proxy: service unavailable","reason":"ServiceUnavailable","code":503}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}
