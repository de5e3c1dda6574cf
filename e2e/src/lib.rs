//! Whole-system tests: kas and agentk run in-process on loopback, over real gRPC and WebSocket connections,
//! against a real Git server over smart HTTP. [`Harness`] starts them; the tests are in `tests/`.

pub mod k8s_proxy;
pub mod network_alerts;
pub mod process;
pub mod world;

use std::{path::PathBuf, time::Duration};

use agentk::{AgentOptions, AgentState, RunningAgent};
use anyhow::{Context, bail};
use gitops_config::ServerConfig;
use gitops_tunnel::{KasAddress, client::ClientConfig};
use kas::{RunningKas, cli::AdminClient};
use serde_json::{Value, json};
use test_support::git_http::GitHttpServer;

/// Commits `files` (path, content) on branch `main` of a Gitea repository and pushes it, off the async
/// threads (Git runs blocking); returns the new commit id.
pub async fn push_main(
    repo: &test_support::gitea::Repository,
    files: &[(&str, &str)],
    message: &str,
) -> anyhow::Result<String> {
    let (repo, message) = (repo.clone(), message.to_owned());
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(p, c)| ((*p).to_owned(), (*c).to_owned()))
        .collect();
    Ok(tokio::task::spawn_blocking(move || {
        let borrowed: Vec<(&str, &str)> = files
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        test_support::gitea::push_files(&repo, "main", &borrowed, &message)
    })
    .await??)
}

/// The configuration project every harness creates.
pub const CONFIG_PROJECT: &str = "group/config";
pub const AGENT_NAME: &str = "gitops";
pub const CONFIG_FILE: &str = ".gitlab/agents/gitops/config.yaml";

/// Registers agent [`AGENT_NAME`] for the configuration project `project` through kas's admin API and
/// creates its token; returns (agent gid, token gid, secret).
pub async fn register_agent(
    admin: &AdminClient,
    project: &str,
) -> anyhow::Result<(String, String, String)> {
    let agent = admin.create_agent(project, AGENT_NAME).await?;
    let agent_id = agent["clusterAgent"]["id"]
        .as_str()
        .context("agent id")?
        .to_owned();
    let token = admin.create_token(&agent_id, "test", "e2e").await?;
    let secret = token["secret"].as_str().context("secret")?.to_owned();
    let token_id = token["token"]["id"]
        .as_str()
        .context("token id")?
        .to_owned();
    Ok((agent_id, token_id, secret))
}

/// For tests that start kas themselves: registers an agent for `project` and connects a receiving
/// agentk to `kas` over `grpc://`.
pub async fn connect_new_agent(
    kas: &RunningKas,
    admin: &AdminClient,
    project: &str,
) -> anyhow::Result<RunningAgent> {
    let (_, _, secret) = register_agent(admin, project).await?;
    let address = KasAddress::parse(&format!("grpc://{}", kas.agent_addr))?;
    let client = ClientConfig::new(address, secret);
    Ok(agentk::start(client, AgentOptions::default(), None)?)
}

/// kas (with TLS on its agent port when asked), a Git server with the configuration project, and an admin
/// client. Agents are started per test with [`Harness::agent`].
pub struct Harness {
    pub git: GitHttpServer,
    pub kas: Option<RunningKas>,
    pub admin: AdminClient,
    pub admin_token: String,
    pub dir: tempfile::TempDir,
    pub tls: bool,
    config: ServerConfig,
}

impl Harness {
    pub async fn start(tls: bool) -> anyhow::Result<Self> {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // `E2E_LOG=debug cargo test -p e2e ...` shows kas's and agentk's logs.
        if let Ok(level) = std::env::var("E2E_LOG") {
            let _ = gitops_telemetry::init(gitops_telemetry::Format::Text, &level, "warn");
        }
        let git = GitHttpServer::start().await?;
        // Private: kas must use its Git credentials.
        git.create_repo(CONFIG_PROJECT, true)?;
        git.commit_files(CONFIG_PROJECT, &[("README.md", Some("# config\n"))], "init")?;
        let dir = tempfile::tempdir()?;
        let admin_token = "admin-secret-for-tests".to_owned();
        std::fs::write(dir.path().join("admin-token"), &admin_token)?;
        std::fs::write(dir.path().join("git-password"), git.credentials().1)?;
        let tls_block = if tls {
            let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
            std::fs::write(dir.path().join("tls.crt"), cert.cert.pem())?;
            std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem())?;
            format!(
                "  agent_tls:\n    cert_file: {0}/tls.crt\n    key_file: {0}/tls.key\n",
                dir.path().display()
            )
        } else {
            String::new()
        };
        let yaml = format!(
            "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\n{tls_block}data_dir: {dir}/data\nadmin_token_file: {dir}/admin-token\ngit:\n  base_url: {base}\n  username: {user}\n  password_file: {dir}/git-password\n  poll_period: 1s\nlogging:\n  format: text\n",
            dir = dir.path().display(),
            base = git.base_url(),
            user = git.credentials().0,
        );
        let config = ServerConfig::parse("kas.yaml", &yaml)?;
        let kas = kas::start(config.clone()).await?;
        let admin = AdminClient::new(&format!("http://{}", kas.api_addr), admin_token.clone());
        Ok(Self {
            git,
            kas: Some(kas),
            admin,
            admin_token,
            dir,
            tls,
            config,
        })
    }

    pub fn kas(&self) -> &RunningKas {
        self.kas.as_ref().expect("kas is running")
    }

    /// Stops kas and starts it again on the same ports and data directory.
    pub async fn restart_kas(&mut self) -> anyhow::Result<()> {
        let old = self.kas.take().context("kas is running")?;
        let (agent_addr, api_addr) = (old.agent_addr, old.api_addr);
        old.shutdown().await;
        let mut config = self.config.clone();
        config.listen.agent = agent_addr;
        config.listen.api = api_addr;
        self.kas = Some(kas::start(config).await?);
        Ok(())
    }

    /// The agent address for `scheme` (`grpc`, `grpcs`, `ws`, `wss`).
    pub fn address(&self, scheme: &str) -> KasAddress {
        let host = if self.tls { "localhost" } else { "127.0.0.1" };
        KasAddress::parse(&format!(
            "{scheme}://{host}:{}",
            self.kas().agent_addr.port()
        ))
        .expect("valid address")
    }

    /// Registers the agent and returns (agent gid, token gid, secret).
    pub async fn register_agent(&self) -> anyhow::Result<(String, String, String)> {
        register_agent(&self.admin, CONFIG_PROJECT).await
    }

    /// Client settings for an agent connecting over `scheme` with `token`.
    pub fn client_config(&self, scheme: &str, token: &str) -> ClientConfig {
        let mut client = ClientConfig::new(self.address(scheme), token.to_owned());
        if self.tls {
            client.ca_file = Some(self.dir.path().join("tls.crt"));
        }
        client.keepalive = Duration::from_secs(5);
        client
    }

    pub fn agent(&self, client: ClientConfig) -> anyhow::Result<RunningAgent> {
        self.agent_with(client, None)
    }

    /// An agent that applies snapshots with `apply` (see `agentk::gitops::ApplySettings`).
    pub fn agent_with(
        &self,
        client: ClientConfig,
        apply: Option<agentk::gitops::ApplySettings>,
    ) -> anyhow::Result<RunningAgent> {
        let options = AgentOptions {
            pod_namespace: "gitlab-kubernetes-agent".into(),
            pod_name: "agentk-test".into(),
            reverse_tunnels: 2,
            apply,
            kubernetes_api: None,
            network_alerts: None,
        };
        Ok(agentk::start(client, options, None)?)
    }

    /// POSTs a raw GraphQL document with the admin credential.
    pub async fn graphql(&self, query: &str) -> anyhow::Result<Value> {
        let response = reqwest::Client::new()
            .post(format!("http://{}/api/graphql", self.kas().api_addr))
            .bearer_auth(&self.admin_token)
            .json(&json!({ "query": query }))
            .send()
            .await?;
        Ok(response.json().await?)
    }

    /// The agent as GraphQL shows it.
    pub async fn agent_view(&self, agent_id: &str) -> anyhow::Result<Value> {
        let doc = format!(
            r#"{{ clusterAgent(id: "{agent_id}") {{ id name connected connections {{ connectedAt agentVersion podName }} configStatus {{ commitId error }} tokens {{ id revoked }} }} }}"#
        );
        let data = self.graphql(&doc).await?;
        Ok(data["data"]["clusterAgent"].clone())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

/// Waits until `check` holds for the agent's state.
pub async fn wait_for_state(
    agent: &RunningAgent,
    within: Duration,
    what: &str,
    check: impl Fn(&AgentState) -> bool,
) -> anyhow::Result<AgentState> {
    let mut state = agent.state.clone();
    let result = tokio::time::timeout(within, state.wait_for(|s| check(s))).await;
    match result {
        Ok(Ok(s)) => Ok(s.clone()),
        _ => bail!(
            "agent did not reach {what} within {within:?}; state: {:?}",
            agent.state.borrow()
        ),
    }
}

/// Polls an async condition every 50 ms.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} did not happen within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy that drops connections with no traffic for `idle`, like cloud load balancers do.
/// Returns its address and a counter of accepted connections.
pub async fn idle_dropping_proxy(
    target: std::net::SocketAddr,
    idle: Duration,
) -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let epoch = tokio::time::Instant::now();
        while let Ok((client, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            let pipe = |last: Arc<AtomicU64>| {
                move |mut r: tokio::net::tcp::OwnedReadHalf,
                      mut w: tokio::net::tcp::OwnedWriteHalf| async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        last.store(epoch.elapsed().as_millis() as u64, Ordering::SeqCst);
                    }
                }
            };
            let up = tokio::spawn(pipe(last.clone())(cr, uw));
            let down = tokio::spawn(pipe(last.clone())(ur, cw));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if up.is_finished() || down.is_finished() {
                        break;
                    }
                    let quiet = epoch.elapsed().as_millis() as u64 - last.load(Ordering::SeqCst);
                    if quiet > idle.as_millis() as u64 {
                        break;
                    }
                }
                up.abort();
                down.abort();
            });
        }
    });
    Ok((addr, accepted))
}

/// An HTTP CONNECT proxy (what `HTTPS_PROXY` points at). Returns its address and a counter of tunnels.
pub async fn connect_proxy() -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
)> {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tunnels = Arc::new(AtomicUsize::new(0));
    let counter = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(client);
                let mut line = String::new();
                reader.read_line(&mut line).await.ok()?;
                let target = line
                    .strip_prefix("CONNECT ")?
                    .split_whitespace()
                    .next()?
                    .to_owned();
                loop {
                    let mut header = String::new();
                    reader.read_line(&mut header).await.ok()?;
                    if header == "\r\n" || header.is_empty() {
                        break;
                    }
                }
                let mut upstream = tokio::net::TcpStream::connect(&target).await.ok()?;
                let mut client = reader.into_inner();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .ok()?;
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::io::copy_bidirectional(&mut client, &mut upstream)
                    .await
                    .ok()?;
                Some(())
            });
        }
    });
    Ok((addr, tunnels))
}
