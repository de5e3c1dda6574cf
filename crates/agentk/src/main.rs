//! `agentk`: connect to kas and keep the cluster in sync; or `agentk generate` the install manifests.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gitops_tunnel::{KasAddress, client::ClientConfig};

#[derive(Parser)]
#[command(
    name = "agentk",
    version,
    about = "The in-cluster GitOps agent; it only ever dials out to kas"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// grpc://, grpcs://, ws:// or wss:// address of kas.
    #[arg(long, env = "AGENTK_KAS_ADDRESS")]
    kas_address: Option<String>,
    /// File holding the agent token (else AGENTK_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for kas, besides the system's (which honour SSL_CERT_FILE and
    /// SSL_CERT_DIR).
    #[arg(long, visible_alias = "ca-cert-file", env = "AGENTK_KAS_CA_CERT_FILE")]
    kas_ca_cert_file: Option<PathBuf>,
    /// Verify kas's certificate for this name instead of the address's host.
    #[arg(long, visible_alias = "tls-server-name")]
    kas_tls_server_name: Option<String>,
    /// Extra header for every request to kas, `Name: value`; repeatable.
    #[arg(long = "kas-header", visible_alias = "header")]
    kas_headers: Vec<String>,
    /// Kubeconfig file of the cluster to apply to. Without it: KUBECONFIG or ~/.kube/config, else the
    /// in-cluster configuration (kube's inference).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// HTTP/2 keepalive interval; keep it under any load balancer's idle timeout.
    #[arg(long, default_value = "20s", value_parser = humantime_duration)]
    keepalive: Duration,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Starting level, until the configuration from Git sets one.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Receive manifests but never apply them.
    #[arg(long)]
    no_apply: bool,
    /// How often the applied commit is checked against the cluster again, putting back what drifted
    /// (only differing objects are written); `0s` turns it off.
    #[arg(long, default_value = "5m", value_parser = humantime_duration)]
    drift_check_interval: Duration,
    /// Serve `/metrics`, `/livez` and `/readyz` (also `/liveness`, `/readiness`) here, e.g. `:8080`;
    /// off when unset.
    #[arg(
        long,
        visible_alias = "observability-listen-address",
        env = "AGENTK_OBSERVABILITY_LISTEN",
        value_parser = agentk::observability::parse_listen_address
    )]
    observability_listen: Option<std::net::SocketAddr>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Subcommand)]
enum Command {
    /// Print the install manifests; pipe them into `kubectl apply -f -`.
    Generate {
        #[arg(long)]
        agent_token: String,
        #[arg(long)]
        kas_address: String,
        #[arg(long, default_value = agentk::generate::DEFAULT_IMAGE_TAG)]
        agent_version: String,
        #[arg(long, default_value = "gitlab-kubernetes-agent")]
        namespace: String,
        #[arg(long, default_value = agentk::generate::DEFAULT_IMAGE_REPOSITORY)]
        image_repository: String,
        /// Bind the article's `gitops-write-all` (write anywhere); otherwise write only in --namespace.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        cluster_write: bool,
        /// Grant `impersonate` (users, groups, uids, service accounts, user extras), needed only when an
        /// agent's `ci_access`/`user_access` uses `access_as` other than `agent`.
        #[arg(long)]
        impersonate: bool,
    },
}

fn humantime_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS provider for the whole process, before anything can create a TLS config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    if let Some(Command::Generate {
        agent_token,
        kas_address,
        agent_version,
        namespace,
        image_repository,
        cluster_write,
        impersonate,
    }) = cli.command
    {
        KasAddress::parse(&kas_address)?;
        print!(
            "{}",
            agentk::generate::manifests(&agentk::generate::InstallOptions {
                namespace,
                kas_address,
                agent_token,
                agent_version,
                image_repository,
                cluster_write,
                impersonate,
            })
        );
        return Ok(());
    }
    run(cli.run).await
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let format = match args.log_format {
        LogFormat::Json => gitops_telemetry::Format::Json,
        LogFormat::Text => gitops_telemetry::Format::Text,
    };
    let logs = gitops_telemetry::init(format, &args.log_level, "error")?;
    let address = KasAddress::parse(
        args.kas_address
            .as_deref()
            .context("--kas-address is required")?,
    )?;
    let token = match &args.token_file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => std::env::var("AGENTK_TOKEN")
            .context("no agent token: use --token-file or AGENTK_TOKEN")?,
    };
    let mut client = ClientConfig::new(address, token.trim().to_owned());
    client.ca_file = args.kas_ca_cert_file.clone();
    client.tls_server_name = args.kas_tls_server_name.clone();
    client.keepalive = args.keepalive;
    for header in &args.kas_headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--kas-header {header:?}: expected `Name: value`"))?;
        client
            .extra_headers
            .push((name.trim().to_owned(), value.trim().to_owned()));
    }
    client.proxy_from_env();
    let pod_namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
    let pod_name = std::env::var("POD_NAME").unwrap_or_default();
    let metrics = std::sync::Arc::new(agentk::metrics::AgentMetrics::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let kube_config = match kube_config(args.kubeconfig.as_deref(), args.context.clone()).await {
        Ok(config) => Some(config),
        // Asked for by name: a mistake in it must stop agentk, not leave it running without a cluster.
        Err(e) if args.kubeconfig.is_some() || args.context.is_some() => return Err(e),
        Err(e) if args.no_apply => {
            tracing::warn!(error = %format!("{e:#}"), "no Kubernetes configuration: Kubernetes API proxy requests are answered 503");
            None
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "no Kubernetes configuration: manifests will be received but not applied, and Kubernetes API proxy requests are answered 503");
            None
        }
    };
    let kubernetes_api = kube_config.as_ref().and_then(|config| {
        agentk::k8s_proxy::ApiserverClient::new(config)
            .inspect_err(|e| tracing::error!(error = %e, "the Kubernetes API proxy answers 503"))
            .ok()
    });
    let cluster_url = kube_config.as_ref().map(|c| c.cluster_url.to_string());
    let (apply, election, cluster_client) = match kube_config {
        Some(config) if !args.no_apply => {
            let pod = Pod {
                namespace: &pod_namespace,
                name: &pod_name,
            };
            match apply_settings(config, pod, args.drift_check_interval, &metrics) {
                Some((apply, election, client)) => (Some(apply), election, Some(client)),
                None => (None, None, None),
            }
        }
        _ => (None, None, None),
    };
    let leading = apply.as_ref().map(|a| a.leading.clone());
    let network_alerts = cluster_client
        .zip(leading.clone())
        .map(|(client, leading)| agentk::network_alerts::ClusterAccess { client, leading });
    log_start(
        &args,
        &client,
        cluster_url.as_deref(),
        &pod_namespace,
        &pod_name,
    );
    let options = agentk::AgentOptions {
        pod_namespace,
        pod_name,
        reverse_tunnels: 2,
        apply,
        kubernetes_api,
        network_alerts,
    };
    let mut agent = agentk::start_with_metrics(client, options, Some(logs), metrics.clone())?;
    if let Some(leading) = &leading {
        let (namespace, identity, events) = match &election {
            Some(e) => (e.namespace.clone(), e.identity.clone(), e.events.clone()),
            None => Default::default(),
        };
        tokio::spawn(agentk::events::follow_leadership(
            leading.clone(),
            agent.state.clone(),
            namespace,
            identity,
            events,
            metrics.clone(),
        ));
    }
    if let Some(e) = election {
        tokio::spawn(agentk::leader::run_for_agent(
            e.client,
            e.namespace,
            e.identity,
            agent.state.clone(),
            e.leading,
            stop.clone(),
        ));
    }
    if let Some(addr) = args.observability_listen {
        let readiness = agentk::observability::AgentReadiness {
            state: agent.state.clone(),
            gitops: agent.gitops.clone(),
            leading,
            metrics: agent.metrics.clone(),
        };
        let (bound, _) = agentk::observability::serve(addr, readiness, stop.clone())
            .await
            .with_context(|| format!("--observability-listen {addr}"))?;
        tracing::info!(observability_addr = %bound, "serving /metrics, /livez, /readyz");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        _ = agent.wait() => {}
    }
    tracing::info!("shutting down");
    stop.cancel();
    agent.shutdown().await;
    Ok(())
}

/// The cluster to apply to: `--kubeconfig` / `--context` when given (kube's `KubeConfigOptions`), else
/// what kube's `Config::infer` finds (`KUBECONFIG` or `~/.kube/config`, else in-cluster).
async fn kube_config(
    kubeconfig: Option<&std::path::Path>,
    context: Option<String>,
) -> anyhow::Result<kube::Config> {
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))
        }
        None if options.context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .context("--context needs a kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config)"),
        None => Ok(kube::Config::infer().await?),
    }
}

/// Leader election for this pod, started once the agent's state can be watched: the Lease is named by the
/// agent id, which arrives with the configuration.
struct Election {
    client: kube::Client,
    namespace: String,
    identity: String,
    leading: tokio::sync::watch::Sender<bool>,
    /// For the `LeaderElection` Event.
    events: Option<agentk::events::EventRecorder>,
}

/// The Pod agentk runs as (downward API); empty names outside a Pod.
#[derive(Clone, Copy)]
struct Pod<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The one line at start: version, where kas is and how agentk reaches it (never the token), what it
/// applies to, and what it serves.
fn log_start(
    args: &RunArgs,
    client: &ClientConfig,
    cluster_url: Option<&str>,
    pod_namespace: &str,
    pod_name: &str,
) {
    let header_names: Vec<&str> = client
        .extra_headers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    tracing::info!(
        version = agentk::VERSION,
        kas_address = %client.address,
        token_source = if args.token_file.is_some() { "file" } else { "AGENTK_TOKEN" },
        ca_cert_file = client.ca_file.as_ref().map(|p| p.display().to_string()),
        tls_server_name = client.tls_server_name.as_deref(),
        extra_headers = ?header_names,
        keepalive = %humantime::format_duration(args.keepalive),
        log_level = %args.log_level,
        apply = !args.no_apply && cluster_url.is_some(),
        cluster_url,
        drift_check_interval = %humantime::format_duration(args.drift_check_interval),
        pod_namespace,
        pod_name,
        observability_listen = args.observability_listen.map(|a| a.to_string()),
        "agentk is starting"
    );
}

/// For the cluster agentk runs in (`config`: in-cluster, else KUBECONFIG): leader election when it runs as a
/// pod, and the engine. Without a usable cluster agentk still connects and receives, and says why it won't apply.
fn apply_settings(
    config: kube::Config,
    pod: Pod<'_>,
    drift_check_interval: Duration,
    metrics: &std::sync::Arc<agentk::metrics::AgentMetrics>,
) -> Option<(
    agentk::gitops::ApplySettings,
    Option<Election>,
    kube::Client,
)> {
    let Pod {
        namespace,
        name: pod_name,
    } = pod;
    let cluster_url = config.cluster_url.to_string();
    let client = match kube::Client::try_from(config) {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot build a Kubernetes client: manifests will not be applied");
            return None;
        }
    };
    let namespace = if namespace.is_empty() {
        "default".to_owned()
    } else {
        namespace.to_owned()
    };
    let (leading_tx, leading) = tokio::sync::watch::channel(pod_name.is_empty());
    let events =
        agentk::events::EventRecorder::start(client.clone(), &namespace, pod_name, metrics.clone());
    // Replicas of one agent share its lease (`agent-<id>-lock`); each pod is one candidate.
    let election = (!pod_name.is_empty()).then(|| Election {
        client: client.clone(),
        namespace: namespace.clone(),
        identity: pod_name.to_owned(),
        leading: leading_tx,
        events: Some(events.clone()),
    });
    let applier = agentk::apply::EngineApplier::new(client.clone(), namespace, cluster_url)
        .with_events(events);
    Some((
        agentk::gitops::ApplySettings {
            applier: std::sync::Arc::new(applier),
            leading,
            resync: drift_check_interval,
        },
        election,
        client,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlabs_flag_names_and_the_old_ones_both_parse() {
        let new = Cli::try_parse_from([
            "agentk",
            "--kas-ca-cert-file=/ca.pem",
            "--kas-tls-server-name=kas.example",
            "--kas-header=X-A: 1",
            "--kas-header=X-B: 2",
            "--kubeconfig=/kc",
            "--context=prod",
        ])
        .unwrap();
        let old = Cli::try_parse_from([
            "agentk",
            "--ca-cert-file=/ca.pem",
            "--tls-server-name=kas.example",
            "--header=X-A: 1",
            "--header=X-B: 2",
        ])
        .unwrap();
        for cli in [&new, &old] {
            assert_eq!(
                cli.run.kas_ca_cert_file.as_deref(),
                Some(std::path::Path::new("/ca.pem"))
            );
            assert_eq!(cli.run.kas_tls_server_name.as_deref(), Some("kas.example"));
            assert_eq!(cli.run.kas_headers, ["X-A: 1", "X-B: 2"]);
        }
        assert_eq!(
            new.run.kubeconfig.as_deref(),
            Some(std::path::Path::new("/kc"))
        );
        assert_eq!(new.run.context.as_deref(), Some("prod"));
    }
}
