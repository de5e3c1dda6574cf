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
    /// Extra CA certificates (PEM) to trust for kas.
    #[arg(long)]
    ca_cert_file: Option<PathBuf>,
    /// Verify kas's certificate for this name.
    #[arg(long)]
    tls_server_name: Option<String>,
    /// Extra header for every request, `Name: value`; repeatable.
    #[arg(long = "header")]
    headers: Vec<String>,
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
    client.ca_file = args.ca_cert_file;
    client.tls_server_name = args.tls_server_name;
    client.keepalive = args.keepalive;
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("--header {header:?}: expected `Name: value`"))?;
        client
            .extra_headers
            .push((name.trim().to_owned(), value.trim().to_owned()));
    }
    client.proxy_from_env();
    let pod_namespace = std::env::var("POD_NAMESPACE").unwrap_or_default();
    let pod_name = std::env::var("POD_NAME").unwrap_or_default();
    let stop = tokio_util::sync::CancellationToken::new();
    let kube_config = match kube::Config::infer().await {
        Ok(config) => Some(config),
        Err(e) if args.no_apply => {
            tracing::warn!(error = %e, "no Kubernetes configuration: Kubernetes API proxy requests are answered 503");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "no Kubernetes configuration: manifests will be received but not applied, and Kubernetes API proxy requests are answered 503");
            None
        }
    };
    let kubernetes_api = kube_config.as_ref().and_then(|config| {
        agentk::k8s_proxy::ApiserverClient::new(config)
            .inspect_err(|e| tracing::error!(error = %e, "the Kubernetes API proxy answers 503"))
            .ok()
    });
    let (apply, election) = match kube_config {
        Some(config) if !args.no_apply => {
            match apply_settings(config, &pod_namespace, &pod_name, args.drift_check_interval) {
                Some((apply, election)) => (Some(apply), election),
                None => (None, None),
            }
        }
        _ => (None, None),
    };
    let options = agentk::AgentOptions {
        pod_namespace,
        pod_name,
        reverse_tunnels: 2,
        apply,
        kubernetes_api,
    };
    let mut agent = agentk::start(client, options, Some(logs))?;
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

/// Leader election for this pod, started once the agent's state can be watched: the Lease is named by the
/// agent id, which arrives with the configuration.
struct Election {
    client: kube::Client,
    namespace: String,
    identity: String,
    leading: tokio::sync::watch::Sender<bool>,
}

/// For the cluster agentk runs in (`config`: in-cluster, else KUBECONFIG): leader election when it runs as a
/// pod, and the engine. Without a usable cluster agentk still connects and receives, and says why it won't apply.
fn apply_settings(
    config: kube::Config,
    namespace: &str,
    pod_name: &str,
    drift_check_interval: Duration,
) -> Option<(agentk::gitops::ApplySettings, Option<Election>)> {
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
    // Replicas of one agent share its lease (`agent-<id>-lock`); each pod is one candidate.
    let election = (!pod_name.is_empty()).then(|| Election {
        client: client.clone(),
        namespace: namespace.clone(),
        identity: pod_name.to_owned(),
        leading: leading_tx,
    });
    let applier = agentk::apply::EngineApplier::new(client, namespace, cluster_url);
    Some((
        agentk::gitops::ApplySettings {
            applier: std::sync::Arc::new(applier),
            leading,
            resync: drift_check_interval,
        },
        election,
    ))
}
