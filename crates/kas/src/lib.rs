//! kas, the Kubernetes agent server: authenticates agentk connections, reads each agent's configuration
//! from Git and streams it down the agent's own connection, calls services on agents through reverse
//! tunnels, and serves the admin API. `main.rs` only parses flags and calls [`start`].

pub mod agent_config;
pub mod api;
pub mod auth;
pub mod cli;
pub mod connections;
pub mod dashboard;
pub mod graphql;
pub mod k8s_proxy;
pub mod log_reload;
pub mod manifests;
pub mod metrics;
pub mod network_alerts;
pub mod observability;
pub mod store;
pub mod tokens;
pub mod watch;
pub mod webhooks;

use std::{net::SocketAddr, sync::Arc};

use gitops_config::{ServerConfig, server::AgentLimits};
use gitops_git::{GitServerConfig, RepoCache};
use gitops_protocol::MAX_MESSAGE_BYTES;
use gitops_tunnel::{
    listener::HttpLimits,
    reverse::{ReverseTunnelService, TunnelRegistry},
    server::{AgentListener, ListenerLimits, http1_tls_acceptor, tls_acceptor},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    agent_config::AgentConfigurationService,
    auth::{AgentTunnelAuthority, TokenAuthenticator},
    connections::Connections,
    k8s_proxy::{
        auth::ProxyAuthorizer,
        server::{ProxyServer, listener::ProxyListenerLimits},
    },
    store::Store,
    watch::ProjectWatchers,
};

/// Why kas could not start.
#[derive(Debug, thiserror::Error)]
pub enum KasError {
    #[error(transparent)]
    Config(#[from] gitops_config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{listener} TLS: {source}")]
    Tls {
        listener: &'static str,
        source: gitops_tunnel::Error,
    },
    #[error("reading {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("git.ca_file {path}: {message}")]
    GitCa { path: String, message: String },
}

/// Everything the modules share. Its `Debug` leaves the secrets out.
pub struct KasState {
    pub store: Store,
    pub connections: Arc<Connections>,
    /// Each connected agent's current configuration, which manifest authorisation reads.
    pub agent_configs: agent_config::AgentConfigs,
    pub tunnels: Arc<TunnelRegistry<u64>>,
    pub watchers: ProjectWatchers,
    /// Reconcile-now requests per (agent, manifest project), which the manifest streams watch.
    pub reconciles: manifests::reconcile::Reconciles,
    pub admin_token: Option<String>,
    /// The dashboard's read-only credential (`viewer_token_file`).
    pub viewer_token: Option<String>,
    pub webhook_secret: Option<String>,
    pub limits: AgentLimits,
    pub manifest_limits: manifests::ManifestLimits,
    /// The Kubernetes API proxy's settings and state.
    pub k8s_proxy: k8s_proxy::ProxyState,
    /// Prometheus metrics, served on `listen.observability`.
    pub metrics: Arc<metrics::KasMetrics>,
    /// The process's logger, for `kasLogLevelSet`; `None` when an embedder installed none.
    pub logs: Option<Arc<log_reload::LogControl>>,
    /// Network-policy alerts: settings, what waits to be forwarded, forwarding outcomes.
    pub network_alerts: network_alerts::NetworkAlerts,
}

impl std::fmt::Debug for KasState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("KasState")
            .field("store", &self.store)
            .field("connections", &self.connections)
            .field("tunnels", &self.tunnels)
            .field("watchers", &self.watchers)
            .field("admin_token", &redacted(&self.admin_token))
            .field("viewer_token", &redacted(&self.viewer_token))
            .field("webhook_secret", &redacted(&self.webhook_secret))
            .field("limits", &self.limits)
            .field("manifest_limits", &self.manifest_limits)
            .finish()
    }
}

/// A started kas. Dropping it does not stop it; call [`RunningKas::shutdown`].
#[derive(Debug)]
pub struct RunningKas {
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The Kubernetes API proxy's address, when `listen.k8s_proxy` is set.
    pub k8s_proxy_addr: Option<SocketAddr>,
    /// `/metrics`, `/livez`, `/readyz`, when `listen.observability` is set.
    pub observability_addr: Option<SocketAddr>,
    pub state: Arc<KasState>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl RunningKas {
    /// Stops accepting, drops every connection, and waits for the listeners to finish.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Resolves when a listener stops (only on shutdown).
    pub async fn wait(&mut self) {
        self.tasks.join_next().await;
    }
}

/// Builds the Kubernetes API proxy's authoriser from kas's state.
pub type AuthorizerFactory = Box<dyn FnOnce(Arc<KasState>) -> Arc<dyn ProxyAuthorizer> + Send>;

/// What an embedder may replace when starting kas.
#[derive(Default)]
pub struct StartOptions {
    /// Decides the proxy's requests instead of kas's own credential checks ([`k8s_proxy::auth::authorizer`]);
    /// for tests of the proxy's forwarding that are not about credentials.
    pub k8s_proxy_authorizer: Option<AuthorizerFactory>,
    /// The installed logger, so the admin API can change its level.
    pub log_control: Option<Arc<log_reload::LogControl>>,
}

impl std::fmt::Debug for StartOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartOptions")
            .field("k8s_proxy_authorizer", &self.k8s_proxy_authorizer.is_some())
            .field("log_control", &self.log_control)
            .finish()
    }
}

/// Opens storage, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<RunningKas, KasError> {
    start_with(config, StartOptions::default()).await
}

/// [`start`], with parts replaced.
pub async fn start_with(
    config: ServerConfig,
    options: StartOptions,
) -> Result<RunningKas, KasError> {
    let store = Store::open(&config.data_dir)?;
    let extra_ca_pem = match &config.git.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| KasError::File {
                path: path.display().to_string(),
                source,
            })?;
            gitops_git::check_ca_certificates(&pem).map_err(|e| KasError::GitCa {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            Some(pem)
        }
        None => None,
    };
    let git = GitServerConfig {
        base_url: config.git.base_url.clone(),
        username: config.git.username.clone(),
        password: config.read_git_password()?,
        extra_ca_pem,
    };
    let credentials = k8s_proxy::auth::CredentialState::new(&config, git.extra_ca_pem.clone());
    let git_url = git.sanitized_base_url();
    let repos = RepoCache::new(git, config.data_dir.join("git-cache"));
    let metrics = Arc::new(metrics::KasMetrics::new());
    repos.set_observer(metrics.clone());
    let mut connections = Connections::default();
    connections.gauges = metrics.connections.clone();
    let state = Arc::new(KasState {
        store: store.clone(),
        connections: Arc::new(connections),
        agent_configs: agent_config::AgentConfigs::default(),
        tunnels: Arc::new(TunnelRegistry::default()),
        watchers: ProjectWatchers::new(repos, config.git.poll_period),
        reconciles: Default::default(),
        admin_token: config.read_admin_token()?,
        viewer_token: config.read_viewer_token()?,
        webhook_secret: config.read_webhook_secret()?,
        limits: config.agent.clone(),
        manifest_limits: config.manifests.clone(),
        k8s_proxy: k8s_proxy::ProxyState {
            config: config.k8s_proxy.clone(),
            credentials,
            ..Default::default()
        },
        metrics,
        logs: options.log_control.clone(),
        network_alerts: network_alerts::NetworkAlerts::new(
            config.alerts.clone(),
            config.read_alerts_webhook_secret()?,
        ),
    });

    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| KasError::File {
            path: p.display().to_string(),
            source,
        })
    };
    let tls = match &config.listen.agent_tls {
        Some(files) => Some(
            tls_acceptor(&read(&files.cert_file)?, &read(&files.key_file)?).map_err(|source| {
                KasError::Tls {
                    listener: "listen.agent_tls",
                    source,
                }
            })?,
        ),
        None => None,
    };
    let k8s_proxy_tls = match &config.listen.k8s_proxy_tls {
        Some(files) => Some(
            tls_acceptor(&read(&files.cert_file)?, &read(&files.key_file)?).map_err(|source| {
                KasError::Tls {
                    listener: "listen.k8s_proxy_tls",
                    source,
                }
            })?,
        ),
        None => None,
    };
    let api_tls = match &config.listen.api_tls {
        Some(files) => Some(
            http1_tls_acceptor(&read(&files.cert_file)?, &read(&files.key_file)?).map_err(
                |source| KasError::Tls {
                    listener: "listen.api_tls",
                    source,
                },
            )?,
        ),
        None => None,
    };
    // tonic's default 4 MiB decode limit is below what kas lets a manifest file or a sync report be.
    let routes = tonic::service::Routes::new(
        AgentConfigurationService::server(state.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        manifests::report::GitopsStatusService::server(state.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        manifests::service::ManifestDeliveryService::server(state.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(network_alerts::service::NetworkAlertsService::server(
        state.clone(),
    ))
    .add_service(ReverseTunnelService::new(
        state.tunnels.clone(),
        Arc::new(AgentTunnelAuthority {
            connections: state.connections.clone(),
            tunnels: state.tunnels.clone(),
        }),
    ));
    let agent_listener = AgentListener {
        routes,
        authenticator: TokenAuthenticator { store },
        tls,
        limits: ListenerLimits {
            keepalive: config.listen.keepalive,
            auth_timeout: config.listen.auth_timeout,
            header_read_timeout: config.listen.header_read_timeout,
            max_connections: config.listen.max_agent_connections,
            max_unauthenticated: config.listen.max_unauthenticated_connections,
            max_calls_per_token: config.listen.max_calls_per_token,
        },
        calls: Default::default(),
    };

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| KasError::Listen { addr, source })
    };
    let agent_socket = bind(config.listen.agent).await?;
    let api_socket = bind(config.listen.api).await?;
    let agent_addr = agent_socket
        .local_addr()
        .map_err(|source| KasError::Listen {
            addr: config.listen.agent,
            source,
        })?;
    let api_addr = api_socket.local_addr().map_err(|source| KasError::Listen {
        addr: config.listen.api,
        source,
    })?;
    // An optional listener: bound with the address it got (port 0 picks one).
    let bind_optional = |addr: Option<SocketAddr>| async move {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let socket = bind(addr).await?;
        let local = socket
            .local_addr()
            .map_err(|source| KasError::Listen { addr, source })?;
        Ok::<_, KasError>(Some((socket, local)))
    };
    let k8s_proxy_socket = bind_optional(config.listen.k8s_proxy).await?;
    let k8s_proxy_addr = k8s_proxy_socket.as_ref().map(|(_, addr)| *addr);
    let observability_socket = bind_optional(config.listen.observability).await?;
    let observability_addr = observability_socket.as_ref().map(|(_, addr)| *addr);

    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(agent_listener.serve(agent_socket, stop.clone()));
    tasks.spawn(network_alerts::forward::run(state.clone(), stop.clone()));
    let api = api::router(state.clone(), graphql::schema(state.clone()));
    let api_limits = HttpLimits {
        header_read_timeout: config.listen.header_read_timeout,
        body_read_timeout: config.listen.body_read_timeout,
        max_connections: config.listen.max_api_connections,
    };
    if api_tls.is_none() && !api_addr.ip().is_loopback() {
        warn!(
            %api_addr,
            "the API listener serves plain HTTP: the admin token and new agent tokens cross the network in \
             clear unless a TLS proxy fronts it; set listen.api_tls"
        );
    }
    tasks.spawn(gitops_tunnel::listener::serve(
        api_socket,
        api,
        api_tls,
        api_limits.clone(),
        stop.clone(),
    ));
    if let Some((socket, addr)) = k8s_proxy_socket {
        // Kubeconfigs name the port actually bound (`listen.k8s_proxy` may say port 0) unless `k8s_proxy.url` is set.
        state.k8s_proxy.credentials.set_listen_addr(addr);
        if k8s_proxy_tls.is_none() && !addr.ip().is_loopback() {
            warn!(
                k8s_proxy_addr = %addr,
                "the Kubernetes API proxy serves plain HTTP: CI tokens and personal access tokens cross the \
                 network in clear unless a TLS proxy fronts it; set listen.k8s_proxy_tls"
            );
        }
        let authorizer = match options.k8s_proxy_authorizer {
            Some(factory) => factory(state.clone()),
            None => k8s_proxy::auth::authorizer(state.clone()),
        };
        let limits = ProxyListenerLimits {
            header_read_timeout: config.listen.header_read_timeout,
            keepalive: config.listen.keepalive,
            max_connections: config.listen.max_agent_connections,
        };
        tasks.spawn(k8s_proxy::server::listener::serve(
            socket,
            ProxyServer::new(state.clone(), authorizer),
            k8s_proxy_tls,
            limits,
            stop.clone(),
        ));
    }
    if let Some((socket, _)) = observability_socket {
        tasks.spawn(observability::serve(
            socket,
            state.clone(),
            api_limits,
            stop.clone(),
        ));
    }
    log_start(
        &config,
        &git_url,
        &Listening {
            agent: agent_addr,
            api: api_addr,
            k8s_proxy: k8s_proxy_addr,
            observability: observability_addr,
        },
    );
    Ok(RunningKas {
        agent_addr,
        api_addr,
        k8s_proxy_addr,
        observability_addr,
        state,
        stop,
        tasks,
    })
}

/// The addresses kas actually bound (a configured port 0 is resolved).
struct Listening {
    agent: SocketAddr,
    api: SocketAddr,
    k8s_proxy: Option<SocketAddr>,
    observability: Option<SocketAddr>,
}

/// The one line at start: version, what the configuration turns on (never a secret, only whether one is
/// configured), and where kas listens.
fn log_start(config: &ServerConfig, git_url: &str, listening: &Listening) {
    let listen = &config.listen;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        agent_addr = %listening.agent,
        api_addr = %listening.api,
        k8s_proxy_addr = listening.k8s_proxy.map(|a| a.to_string()),
        observability_addr = listening.observability.map(|a| a.to_string()),
        agent_tls = listen.agent_tls.is_some(),
        api_tls = listen.api_tls.is_some(),
        k8s_proxy_tls = listen.k8s_proxy_tls.is_some(),
        data_dir = %config.data_dir.display(),
        git_base_url = git_url,
        git_poll_period = %humantime::format_duration(config.git.poll_period),
        admin_api = config.admin_token_file.is_some(),
        webhooks = config.webhooks.secret_file.is_some(),
        alertmanager = config.alerts.alertmanager_url.is_some(),
        alerts_webhook = config.alerts.webhook.is_some(),
        log_level = config.logging.level.as_str(),
        "kas is serving"
    );
}
