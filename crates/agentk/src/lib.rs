//! agentk, the in-cluster agent: dials kas (and only dials), receives its configuration from Git through
//! kas, applies `observability.logging` at run time, and serves kas's reverse calls. Kept thin on purpose:
//! logic lives in kas so agents rarely need upgrading. `main.rs` only parses flags and calls [`run`].

pub mod apply;
pub mod config_watcher;
pub mod events;
pub mod generate;
pub mod gitops;
pub mod info;
pub mod k8s_proxy;
pub mod leader;
pub mod metrics;
pub mod network_alerts;
pub mod observability;

use std::sync::Arc;

use gitops_protocol::{
    MAX_MESSAGE_BYTES, agent_info_server::AgentInfoServer,
    kubernetes_api_server::KubernetesApiServer, reverse_tunnel_client::ReverseTunnelClient,
};
use gitops_telemetry::LogHandle;
use gitops_tunnel::client::ClientConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config_watcher::AgentState;

/// agentk's connection to kas, with its credential added to every call.
pub type KasChannel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    gitops_tunnel::client::HeaderInterceptor,
>;

/// The version agentk reports to kas.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why agentk could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Transport(#[from] gitops_tunnel::Error),
    /// The Kubernetes configuration cannot be used for the API proxy's client.
    #[error("{0}")]
    KubernetesConfig(String),
}

/// What the agent needs besides the connection settings.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Where it runs, reported to kas (from the downward API).
    pub pod_namespace: String,
    pub pod_name: String,
    /// How many reverse tunnels to keep open.
    pub reverse_tunnels: usize,
    /// How to apply manifests; `None` only receives them.
    pub apply: Option<gitops::ApplySettings>,
    /// agentk's own client for its apiserver, for the Kubernetes API proxy; `None` answers every proxied
    /// request 503.
    pub kubernetes_api: Option<k8s_proxy::ApiserverClient>,
    /// The cluster access the network-policy alerts need; `None` reports them misconfigured when
    /// `cilium` is set.
    pub network_alerts: Option<network_alerts::ClusterAccess>,
}

/// A running agent, for embedding (tests, benchmarks) as well as for `main`.
#[derive(Debug)]
pub struct RunningAgent {
    pub state: watch::Receiver<AgentState>,
    /// Manifests received per manifest project.
    pub gitops: watch::Receiver<gitops::GitopsState>,
    /// What `/metrics` serves, and the finished syncs `/readyz` asks about.
    pub metrics: Arc<metrics::AgentMetrics>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl RunningAgent {
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Resolves when the agent stops.
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Starts the agent's modules.
pub fn start(
    client: ClientConfig,
    options: AgentOptions,
    logs: Option<LogHandle>,
) -> Result<RunningAgent, AgentError> {
    start_with_metrics(client, options, logs, Arc::default())
}

/// [`start`], counting into `metrics` (which the caller may share, e.g. with an [`events::EventRecorder`]).
pub fn start_with_metrics(
    mut client: ClientConfig,
    options: AgentOptions,
    logs: Option<LogHandle>,
    metrics: Arc<metrics::AgentMetrics>,
) -> Result<RunningAgent, AgentError> {
    if client.agent_version.is_empty() {
        client.agent_version = VERSION.to_owned();
    }
    let channel = client.channel()?;
    let interceptor = client.interceptor()?;
    let (state_tx, state_rx) = watch::channel(AgentState::default());
    let state_tx = Arc::new(state_tx);
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    tasks.spawn(
        config_watcher::run(
            tonic::service::interceptor::InterceptedService::new(
                channel.clone(),
                interceptor.clone(),
            ),
            options.clone(),
            state_tx,
            logs,
            stop.clone(),
        )
        .instrument(tracing::info_span!(
            "config",
            mod_name = "agent_configuration"
        )),
    );

    tasks.spawn(follow_connection(state_rx.clone(), metrics.clone()));
    let (gitops_tx, gitops_rx) = watch::channel(gitops::GitopsState::default());
    tasks.spawn(gitops::run(
        tonic::service::interceptor::InterceptedService::new(channel.clone(), interceptor.clone()),
        state_rx.clone(),
        Arc::new(gitops_tx),
        options.apply.clone(),
        gitops::DEFAULT_MAX_SNAPSHOT_BYTES,
        metrics.clone(),
        stop.clone(),
    ));

    tasks.spawn(network_alerts::run(
        tonic::service::interceptor::InterceptedService::new(channel.clone(), interceptor.clone()),
        state_rx.clone(),
        options.network_alerts.clone(),
        metrics.network.clone(),
        stop.clone(),
    ));

    let routes = tonic::service::Routes::new(
        AgentInfoServer::new(info::AgentInfoService {
            state: state_rx.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        KubernetesApiServer::new(k8s_proxy::KubernetesApiService::new(
            options.kubernetes_api.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let tunnel_client = ReverseTunnelClient::new(
        tonic::service::interceptor::InterceptedService::new(channel, interceptor),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tasks.spawn(
        gitops_tunnel::reverse::serve_tunnels(
            tunnel_client,
            routes,
            options.reverse_tunnels.max(1),
            stop.clone(),
        )
        .instrument(tracing::info_span!("tunnel", mod_name = "reverse_tunnel")),
    );

    Ok(RunningAgent {
        state: state_rx,
        gitops: gitops_rx,
        metrics,
        stop,
        tasks,
    })
}

/// Keeps `agentk_kas_connected` and `agentk_configurations_received_total` current from the agent's state.
async fn follow_connection(
    mut state: watch::Receiver<AgentState>,
    metrics: Arc<metrics::AgentMetrics>,
) {
    let mut commit = String::new();
    loop {
        {
            let now = state.borrow_and_update();
            metrics.connected.set(i64::from(now.connected));
            if now.config.is_some() && now.commit_id != commit {
                commit = now.commit_id.clone();
                metrics.configuration_received();
            }
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}
