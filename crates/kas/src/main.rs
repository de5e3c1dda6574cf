//! `kas`: run the server, or administer agents and tokens on a running one.

use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use gitops_config::{ServerConfig, server::LogFormat};
use kas::cli::{
    AdminClient,
    output::{self, Format},
    views,
};

#[derive(Parser)]
#[command(
    name = "kas",
    version,
    about = "Kubernetes agent server: pull-based GitOps for agentk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[arg(long, env = "KAS_CONFIG", default_value = "kas.yaml")]
        config: PathBuf,
    },
    /// Register, list and delete agents on a running kas.
    Agent {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Create and revoke agent tokens on a running kas.
    Token {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Create, list and revoke CI tokens of the Kubernetes API proxy on a running kas.
    CiToken {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: CiTokenCommand,
    },
    /// Show agents, their syncs and objects, like `kubectl get` (a table unless `-o json|yaml`).
    Get {
        #[command(flatten)]
        api: ApiArgs,
        /// table (default), json or yaml.
        #[arg(short, long, value_enum, default_value_t = Format::Table, global = true)]
        output: Format,
        #[command(subcommand)]
        what: GetCommand,
    },
    /// Sync now: kas reads the agent's manifest projects from Git at once and the agent applies them and
    /// puts back drift, even if the commit did not change.
    Reconcile {
        #[command(flatten)]
        api: ApiArgs,
        /// `gid://kas/Clusters::Agent/N` or `N`.
        #[arg(long)]
        agent: String,
        /// Only this manifest project (default: every one the agent syncs).
        #[arg(long)]
        project: Option<String>,
        /// Wait for the agent's report of the sync and print it; fail unless every project synced.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "2m", value_parser = humantime_duration)]
        timeout: std::time::Duration,
    },
    /// Print a shell completion script: `kas completion bash > /etc/bash_completion.d/kas`.
    Completion { shell: clap_complete::Shell },
    /// Print a kubeconfig for the Kubernetes API proxy: one context per agent.
    Kubeconfig {
        #[command(flatten)]
        api: ApiArgs,
        /// `gid://kas/Clusters::Agent/N` or `N`; repeat for more agents.
        #[arg(long = "agent", required = true)]
        agents: Vec<String>,
        /// A kas CI token (`kasci_…`) or a personal access token of the Git server.
        #[arg(long, env = "KAS_PROXY_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[derive(Subcommand)]
enum GetCommand {
    /// Every agent (or those of one configuration project).
    Agents {
        /// Only agents whose configuration lives in this project.
        #[arg(long)]
        project: Option<String>,
    },
    /// One agent, then the last sync of each of its manifest projects.
    Agent {
        /// `gid://kas/Clusters::Agent/N` or `N`.
        id: String,
    },
    /// The last sync of each manifest project, per agent.
    Syncs {
        #[arg(long)]
        agent: Option<String>,
        /// Only this manifest project.
        #[arg(long)]
        project: Option<String>,
    },
    /// Every object of the last syncs, with its result and health.
    Objects {
        #[arg(long)]
        agent: Option<String>,
        /// Only this manifest project.
        #[arg(long)]
        project: Option<String>,
    },
    /// The agent's network-policy alerts, newest last seen first.
    Alerts {
        /// `gid://kas/Clusters::Agent/N` or `N`.
        #[arg(long)]
        agent: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        first: i32,
    },
}

#[derive(Subcommand)]
enum CiTokenCommand {
    /// Prints JSON with the new token's secret (`token`) once.
    Create {
        /// `owner/name` on the Git server.
        #[arg(long)]
        project: String,
        /// Only jobs of this environment.
        #[arg(long)]
        environment: Option<String>,
        /// Lifetime such as `30d` or `12h` (default: k8s_proxy.ci_token_default_ttl).
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Lists CI tokens without their secrets.
    List {
        #[arg(long)]
        project: Option<String>,
    },
    Revoke {
        /// `gid://kas/Clusters::CiToken/N` or `N`.
        id: String,
    },
}

#[derive(clap::Args)]
struct ApiArgs {
    /// kas's API address.
    #[arg(long, env = "KAS_API_URL", default_value = "http://127.0.0.1:8080")]
    api_url: String,
    /// The admin credential (prefer the file or the environment; flags show up in `ps`).
    #[arg(long, env = "KAS_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[arg(long, env = "KAS_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentCommand {
    Create {
        #[arg(long)]
        project: String,
        #[arg(long)]
        name: String,
    },
    List {
        #[arg(long)]
        project: Option<String>,
    },
    Delete {
        /// `gid://kas/Clusters::Agent/N` or `N`.
        id: String,
    },
    /// Let the agent read a project of another owner.
    Grant {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        project: String,
    },
    /// Take a grant back.
    RevokeGrant {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        project: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Prints the new token's secret once, on its own line.
    Create {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Revoke {
        id: String,
    },
    /// Lists agent tokens (never their secrets), of one agent or all.
    List {
        #[arg(long)]
        agent: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS provider for the whole process, before anything can create a TLS config.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match Cli::parse().command {
        Command::Serve { config } => serve(config).await,
        Command::Agent { api, command } => {
            let client = api.client()?;
            let out = match command {
                AgentCommand::Create { project, name } => {
                    client.create_agent(&project, &name).await?
                }
                AgentCommand::List { project } => client.list_agents(project.as_deref()).await?,
                AgentCommand::Delete { id } => client.delete_agent(&id).await?,
                AgentCommand::Grant { agent, project } => {
                    client.grant_project(&agent, &project).await?
                }
                AgentCommand::RevokeGrant { agent, project } => {
                    client.revoke_project(&agent, &project).await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Token { api, command } => {
            let client = api.client()?;
            match command {
                TokenCommand::Create {
                    agent,
                    name,
                    description,
                } => {
                    let out = client.create_token(&agent, &name, &description).await?;
                    eprintln!(
                        "token {} created; the secret below is shown only once",
                        out["token"]["id"]
                    );
                    println!("{}", out["secret"].as_str().unwrap_or_default());
                }
                TokenCommand::Revoke { id } => {
                    client.revoke_token(&id).await?;
                    eprintln!("token {id} revoked");
                }
                TokenCommand::List { agent, output } => {
                    let agents = client.agents_detail(agent.as_deref(), false).await?;
                    let tokens = views::tokens(&agents);
                    print_records(&tokens, output, "No tokens found.", |t| {
                        views::tokens_table(t, std::time::SystemTime::now())
                    })?;
                }
            }
            Ok(())
        }
        Command::Get { api, output, what } => get(api.client()?, output, what).await,
        Command::Reconcile {
            api,
            agent,
            project,
            wait,
            timeout,
        } => {
            let client = api.client()?;
            let wait = wait.then_some(timeout);
            reconcile(&client, &agent, project.as_deref(), wait).await
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "kas", &mut std::io::stdout());
            Ok(())
        }
        Command::CiToken { api, command } => {
            let client = api.client()?;
            let out = match command {
                CiTokenCommand::Create {
                    project,
                    environment,
                    expires_in,
                    description,
                } => {
                    let out = client
                        .create_ci_token(
                            &project,
                            environment.as_deref(),
                            expires_in.as_deref(),
                            description.as_deref(),
                        )
                        .await?;
                    eprintln!("CI token created; its secret (`token`) is shown only once");
                    out
                }
                CiTokenCommand::List { project } => {
                    client.list_ci_tokens(project.as_deref()).await?
                }
                CiTokenCommand::Revoke { id } => {
                    client.revoke_ci_token(&id).await?;
                    eprintln!("CI token {id} revoked");
                    return Ok(());
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Command::Kubeconfig { api, agents, token } => {
            let client = api.client()?;
            print!("{}", client.kubeconfig(&agents, &token).await?);
            Ok(())
        }
    }
}

/// `kas get …`: one GraphQL query for the agents in question, then records and their table.
async fn get(client: AdminClient, format: Format, what: GetCommand) -> anyhow::Result<()> {
    let now = std::time::SystemTime::now();
    match what {
        GetCommand::Agents { project } => {
            let mut agents = client.agents_detail(None, false).await?;
            if let Some(project) = project {
                agents.retain(|a| a["projectPath"] == project.as_str());
            }
            print_records(&agents, format, "No agents found.", |a| {
                views::agents_table(a, now)
            })
        }
        GetCommand::Agent { id } => {
            let agents = client.agents_detail(Some(&id), true).await?;
            if format != Format::Table {
                return print_value(&agents[0], format);
            }
            print!("{}", views::agents_table(&agents, now).render(""));
            println!();
            let syncs = views::syncs(&agents, None);
            print!(
                "{}",
                views::syncs_table(&syncs, now).render("No manifest projects.")
            );
            Ok(())
        }
        GetCommand::Syncs { agent, project } => {
            let agents = client.agents_detail(agent.as_deref(), true).await?;
            let syncs = views::syncs(&agents, project.as_deref());
            print_records(&syncs, format, "No syncs found.", |s| {
                views::syncs_table(s, now)
            })
        }
        GetCommand::Objects { agent, project } => {
            let agents = client.agents_detail(agent.as_deref(), true).await?;
            let objects = views::objects_of(&agents, project.as_deref());
            print_records(&objects, format, "No objects found.", views::objects_table)
        }
        GetCommand::Alerts { agent, first } => {
            let alerts = client.network_alerts(&agent, first).await?;
            print_records(&alerts, format, "No network alerts found.", |a| {
                views::alerts_table(a, now)
            })
        }
    }
}

/// `kas reconcile`: asks, then with `wait` waits until every project's report count grew (a sync finished
/// after the request) and prints those syncs.
async fn reconcile(
    client: &AdminClient,
    agent: &str,
    project: Option<&str>,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let reports = |agents: &[serde_json::Value]| -> std::collections::BTreeMap<String, u64> {
        views::syncs(agents, project)
            .iter()
            .map(|s| {
                let project = s["projectId"].as_str().unwrap_or_default().to_owned();
                (project, s["reportsReceived"].as_u64().unwrap_or(0))
            })
            .collect()
    };
    let before = match wait {
        Some(_) => reports(&client.agents_detail(Some(agent), false).await?),
        None => Default::default(),
    };
    client.reconcile(agent, project).await?;
    let what = project.map_or("its manifest projects".to_owned(), |p| {
        format!("project {p}")
    });
    eprintln!("agent {agent}: {what} read from Git; the agent is syncing now");
    let Some(timeout) = wait else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let agents = loop {
        let agents = client.agents_detail(Some(agent), true).await?;
        let now = reports(&agents);
        if !before.is_empty() && before.iter().all(|(p, n)| now.get(p) > Some(n)) {
            break agents;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "agent {agent}: no sync reported within {}; see `kas get syncs --agent {agent}`",
            humantime::format_duration(timeout)
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    let syncs = views::syncs(&agents, project);
    print!(
        "{}",
        views::syncs_table(&syncs, std::time::SystemTime::now()).render("")
    );
    let unsynced: Vec<String> = syncs
        .iter()
        .filter(|s| s["lastSync"]["outcome"] != "synced")
        .map(|s| {
            format!(
                "{}: {}",
                s["projectId"].as_str().unwrap_or_default(),
                s["lastSync"]["outcome"].as_str().unwrap_or("no sync")
            )
        })
        .collect();
    anyhow::ensure!(
        unsynced.is_empty(),
        "agent {agent}: not synced: {}",
        unsynced.join(", ")
    );
    Ok(())
}

fn humantime_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The records as a table, or as JSON / YAML.
fn print_records(
    records: &[serde_json::Value],
    format: Format,
    empty: &str,
    table: impl FnOnce(&[serde_json::Value]) -> output::Table,
) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            print!("{}", table(records).render(empty));
            Ok(())
        }
        _ => print_value(&serde_json::Value::Array(records.to_vec()), format),
    }
}

fn print_value(value: &serde_json::Value, format: Format) -> anyhow::Result<()> {
    print!(
        "{}",
        output::serialize(value, format).map_err(anyhow::Error::msg)?
    );
    Ok(())
}

impl ApiArgs {
    fn client(self) -> anyhow::Result<AdminClient> {
        let token = match (self.admin_token, self.admin_token_file) {
            (Some(token), _) => token,
            (None, Some(file)) => std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .trim()
                .to_owned(),
            (None, None) => anyhow::bail!(
                "an admin credential is required: --admin-token-file or KAS_ADMIN_TOKEN"
            ),
        };
        Ok(AdminClient::new(&self.api_url, token))
    }
}

async fn serve(config_path: PathBuf) -> anyhow::Result<()> {
    let config = ServerConfig::load(&config_path)?;
    let format = match config.logging.format {
        LogFormat::Json => gitops_telemetry::Format::Json,
        LogFormat::Text => gitops_telemetry::Format::Text,
    };
    let logs = gitops_telemetry::init(format, config.logging.level.as_str(), "error")?;
    let logs = std::sync::Arc::new(kas::log_reload::LogControl::new(logs, config.logging.level));
    let options = kas::StartOptions {
        log_control: Some(logs.clone()),
        ..Default::default()
    };
    let running = kas::start_with(config, options).await?;
    let stop_reload = tokio_util::sync::CancellationToken::new();
    tokio::spawn(kas::log_reload::on_sighup(
        config_path,
        logs,
        stop_reload.clone(),
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    stop_reload.cancel();
    running.shutdown().await;
    Ok(())
}
