//! The Kubernetes API proxy end to end: kas (with `listen.k8s_proxy`) and agentk as real processes, the
//! agent's configuration project in the test environment's Gitea, agentk talking to the real apiserver
//! with the cluster-admin kubeconfig (so it may impersonate), and real kubectl and helm with the kubeconfig
//! `kas kubeconfig` prints. Used by `tests/k8s_proxy.rs` and `cargo xtask bench proxy`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kas::cli::AdminClient;
use serde_json::{Value, json};
use test_support::env::test_env;
use test_support::gitea::{Checkout, Gitea, Repository};
use test_support::kubectl::Tool;

use crate::process::{Killed, free_port, sibling_binary};

/// The agent's name in its configuration project.
pub const AGENT: &str = "proxy";
const ADMIN_TOKEN: &str = "admin-secret-for-k8s-proxy";

/// How a kas of a [`ProxyEnv`] listens for agents. The proxy itself always serves `https://` (with the same
/// self-signed certificate for `localhost` and `127.0.0.1`): kubectl sends no bearer token over `http://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// Plain agent port (`grpc://`, `ws://`).
    Off,
    /// TLS on the agent port (`grpcs://`, `wss://`).
    On,
}

/// A CI token as `kas ci-token create` printed it.
#[derive(Debug, Clone)]
pub struct CiToken {
    /// The token's id as the CLI printed it (what `kas ci-token revoke` takes).
    pub id: String,
    pub secret: String,
    /// Everything the CLI printed.
    pub json: Value,
}

/// kas and one registered agent, with its configuration project in Gitea.
pub struct ProxyEnv {
    pub gitea: Gitea,
    pub config_repo: Repository,
    config_checkout: Checkout,
    pub kas: Killed,
    pub admin: AdminClient,
    pub api_url: String,
    pub agent_port: u16,
    pub proxy_port: u16,
    pub tls: Tls,
    /// The agent's id (the number in `gid://kas/Clusters::Agent/<n>`).
    pub agent_id: u64,
    pub agent_gid: String,
    pub agent_token: String,
    pub dir: tempfile::TempDir,
    kas_config: PathBuf,
    /// The last `config.yaml` commit pushed; kas reads it once an agent is connected.
    config_commit: std::sync::Mutex<String>,
}

impl ProxyEnv {
    /// Starts kas against Gitea with a new configuration project holding `config_yaml` as the agent's
    /// `config.yaml`, and registers the agent. No agentk runs yet: see [`Self::agentk`].
    pub async fn start(tls: Tls, config_yaml: &str) -> anyhow::Result<Self> {
        test_support::cluster::install_crypto_provider();
        let env = test_env();
        let gitea = Gitea::from_env();
        let config_repo = gitea.create_private_repository("proxy-config").await?;
        let checkout = {
            let repo = config_repo.clone();
            tokio::task::spawn_blocking(move || Checkout::new(&repo, "main")).await??
        };
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("admin-token"), ADMIN_TOKEN)?;
        std::fs::write(d.join("git-password"), &env.gitea.admin_password)?;
        let (agent_port, api_port, proxy_port) = (free_port()?, free_port()?, free_port()?);
        // The proxy always serves TLS: kubectl (client-go) sends no bearer token over plain http://.
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])?;
        std::fs::write(d.join("tls.crt"), cert.cert.pem())?;
        std::fs::write(d.join("tls.key"), cert.signing_key.serialize_pem())?;
        let files = format!(
            "    cert_file: {0}/tls.crt\n    key_file: {0}/tls.key\n",
            d.display()
        );
        let agent_tls = match tls {
            Tls::Off => String::new(),
            Tls::On => format!("  agent_tls:\n{files}"),
        };
        let tls_listen = format!("{agent_tls}  k8s_proxy_tls:\n{files}");
        let proxy_scheme = "https";
        let kas_config = d.join("kas.yaml");
        std::fs::write(
            &kas_config,
            format!(
                "listen:\n  agent: 127.0.0.1:{agent_port}\n  api: 127.0.0.1:{api_port}\n  k8s_proxy: 127.0.0.1:{proxy_port}\n{tls_listen}k8s_proxy:\n  url: {proxy_scheme}://127.0.0.1:{proxy_port}\ndata_dir: {d}/data\nadmin_token_file: {d}/admin-token\ngit:\n  base_url: {base}\n  username: {user}\n  password_file: {d}/git-password\n  poll_period: 1s\nlogging:\n  level: info\n  format: text\n",
                d = d.display(),
                base = env.gitea.url,
                user = env.gitea.admin_user,
            ),
        )?;
        let kas = spawn_kas(&kas_config, d)?;
        let api_url = format!("http://127.0.0.1:{api_port}");
        let admin = AdminClient::new(&api_url, ADMIN_TOKEN.to_owned());
        wait_for_api(&admin).await?;

        let created = admin.create_agent(&config_repo.full_name, AGENT).await?;
        let agent_gid = created["clusterAgent"]["id"]
            .as_str()
            .context("agent id")?
            .to_owned();
        let agent_id = agent_gid
            .rsplit('/')
            .next()
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("agent id {agent_gid:?} does not end in a number"))?;
        let token = admin.create_token(&agent_gid, "proxy", "e2e").await?;
        let agent_token = token["secret"].as_str().context("secret")?.to_owned();
        let env = Self {
            gitea,
            config_repo,
            config_checkout: checkout,
            kas,
            admin,
            api_url,
            agent_port,
            proxy_port,
            tls,
            agent_id,
            agent_gid,
            agent_token,
            dir,
            kas_config,
            config_commit: std::sync::Mutex::new(String::new()),
        };
        env.set_agent_config(config_yaml).await?;
        Ok(env)
    }

    /// kas's log file (its stderr).
    pub fn kas_log(&self) -> PathBuf {
        self.dir.path().join("kas.log")
    }

    /// Commits `config_yaml` as the agent's `config.yaml`; while an agent is connected, waits until kas has
    /// read that commit (kas reads the configuration of connected agents only).
    pub async fn set_agent_config(&self, config_yaml: &str) -> anyhow::Result<()> {
        let path = format!(".gitlab/agents/{AGENT}/config.yaml");
        let (commit, _) = self
            .config_checkout
            .commit_and_push(&[(path.as_str(), config_yaml.as_bytes())], "agent config")?;
        *self.config_commit.lock().expect("config commit") = commit;
        let agents = self
            .admin
            .list_agents(Some(&self.config_repo.full_name))
            .await?;
        if agents[0]["connected"].as_bool() == Some(true) {
            self.wait_for_config().await?;
        }
        Ok(())
    }

    /// Waits until kas has read the last pushed `config.yaml` commit.
    async fn wait_for_config(&self) -> anyhow::Result<()> {
        let commit = self.config_commit.lock().expect("config commit").clone();
        let started = Instant::now();
        loop {
            let agents = self
                .admin
                .list_agents(Some(&self.config_repo.full_name))
                .await?;
            let seen = agents[0]["configStatus"]["commitId"]
                .as_str()
                .map(str::to_owned);
            if seen.as_deref() == Some(commit.as_str()) {
                if let Some(error) = agents[0]["configStatus"]["error"].as_str() {
                    bail!("kas refused the agent configuration: {error}");
                }
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("kas did not read config commit {commit} within 30 s (last seen {seen:?})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The agent address for `scheme` (`grpc`, `grpcs`, `ws`, `wss`).
    pub fn kas_address(&self, scheme: &str) -> String {
        let host = match self.tls {
            Tls::Off => "127.0.0.1",
            Tls::On => "localhost",
        };
        format!("{scheme}://{host}:{}", self.agent_port)
    }

    /// Starts agentk over `scheme` against the test cluster with the cluster-admin kubeconfig and waits
    /// until kas shows it connected.
    pub async fn agentk(&self, scheme: &str) -> anyhow::Result<Killed> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agentk.log"))?;
        let mut command = Command::new(sibling_binary("agentk")?);
        command
            .arg(format!("--kas-address={}", self.kas_address(scheme)))
            .arg("--log-format=text")
            .arg("--no-apply")
            .env("AGENTK_TOKEN", &self.agent_token)
            .env("KUBECONFIG", &test_env().kubernetes.kubeconfig)
            .env("POD_NAMESPACE", "gitlab-kubernetes-agent")
            .env("POD_NAME", "agentk-proxy-test")
            .stdout(Stdio::null())
            .stderr(log);
        if self.tls == Tls::On {
            command.arg(format!(
                "--ca-cert-file={}",
                self.dir.path().join("tls.crt").display()
            ));
        }
        let agentk = Killed(command.spawn().context("starting agentk")?);
        self.wait_connected(true, Duration::from_secs(30)).await?;
        self.wait_for_config().await?;
        Ok(agentk)
    }

    /// Waits until kas shows the agent connected (or not).
    pub async fn wait_connected(&self, connected: bool, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let agents = self
                .admin
                .list_agents(Some(&self.config_repo.full_name))
                .await?;
            if agents[0]["connected"].as_bool() == Some(connected) {
                return Ok(());
            }
            if started.elapsed() > within {
                bail!(
                    "the agent was not {} within {within:?}; agentk log: {}",
                    if connected {
                        "connected"
                    } else {
                        "disconnected"
                    },
                    std::fs::read_to_string(self.dir.path().join("agentk.log")).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kas <args>` against this kas's admin API; its stdout, or an error with everything it printed.
    pub async fn kas_cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = tokio::process::Command::new(sibling_binary("kas")?)
            .args(args)
            .env("KAS_API_URL", &self.api_url)
            .env("KAS_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .await?;
        anyhow::ensure!(
            output.status.success(),
            "kas {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }

    /// `kas ci-token create --project <project> [--environment <env>] [--expires-in <d>]`.
    pub async fn ci_token(
        &self,
        project: &str,
        environment: Option<&str>,
        expires_in: Option<&str>,
    ) -> anyhow::Result<CiToken> {
        let mut args = vec!["ci-token", "create", "--project", project];
        if let Some(environment) = environment {
            args.extend(["--environment", environment]);
        }
        if let Some(expires_in) = expires_in {
            args.extend(["--expires-in", expires_in]);
        }
        let printed = self.kas_cli(&args).await?;
        let json: Value = serde_json::from_str(printed.trim())
            .with_context(|| format!("kas ci-token create printed {printed:?}"))?;
        let secret =
            find_string(&json, "token").with_context(|| format!("no `token` in {json}"))?;
        let id = find_string(&json, "id").with_context(|| format!("no `id` in {json}"))?;
        Ok(CiToken { id, secret, json })
    }

    /// `kas ci-token revoke <id>`.
    pub async fn revoke_ci_token(&self, token: &CiToken) -> anyhow::Result<()> {
        self.kas_cli(&["ci-token", "revoke", &token.id]).await?;
        Ok(())
    }

    /// Writes the kubeconfig `kas kubeconfig --agent <id> --token <secret>` prints; returns its path.
    pub async fn kubeconfig(&self, secret: &str) -> anyhow::Result<PathBuf> {
        let yaml = self
            .kas_cli(&[
                "kubeconfig",
                "--agent",
                &self.agent_id.to_string(),
                "--token",
                secret,
            ])
            .await?;
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", rand_suffix()));
        std::fs::write(&path, &yaml)?;
        Ok(path)
    }

    /// kubectl through the proxy with `secret` (a CI token or a Gitea PAT).
    pub async fn kubectl(&self, secret: &str) -> anyhow::Result<Tool> {
        Ok(Tool::kubectl(&self.kubeconfig(secret).await?))
    }

    /// The proxy's base URL.
    pub fn proxy_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.proxy_port)
    }

    /// An HTTP client for the proxy (trusting its certificate), for requests kubectl cannot make.
    pub fn http(&self) -> anyhow::Result<reqwest::Client> {
        let pem = std::fs::read(self.dir.path().join("tls.crt"))?;
        Ok(reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .build()?)
    }

    /// `Bearer ci:<agent>:<secret>` (or `pat:` for anything but a `kasci_` token), as kubeconfigs carry it.
    pub fn bearer(&self, secret: &str) -> String {
        let kind = if secret.starts_with("kasci_") {
            "ci"
        } else {
            "pat"
        };
        format!("Bearer {kind}:{}:{secret}", self.agent_id)
    }

    /// SIGKILLs kas and starts it again with the same configuration and data.
    pub async fn restart_kas(&mut self) -> anyhow::Result<()> {
        let _ = self.kas.0.kill();
        let _ = self.kas.0.wait();
        self.kas = spawn_kas(&self.kas_config, self.dir.path())?;
        wait_for_api(&self.admin).await
    }

    /// Deletes the configuration project (call at the end of a passing test).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.gitea.delete_repository(&self.config_repo).await?;
        Ok(())
    }
}

fn rand_suffix() -> String {
    test_support::env::unique_name("k")
}

/// The first string value under `key`, at the top or one level down (the CLI may print the token's fields
/// beside or inside a `token` object).
fn find_string(json: &Value, key: &str) -> Option<String> {
    if let Some(s) = json.get(key).and_then(Value::as_str) {
        return Some(s.to_owned());
    }
    if let Some(n) = json.get(key).and_then(Value::as_u64) {
        return Some(n.to_string());
    }
    json.as_object()?
        .values()
        .filter(|v| v.is_object())
        .find_map(|v| find_string(v, key))
}

fn spawn_kas(config: &Path, dir: &Path) -> anyhow::Result<Killed> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("kas.log"))?;
    let mut command = Command::new(sibling_binary("kas")?);
    command
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log);
    Ok(Killed(command.spawn().context("starting kas")?))
}

async fn wait_for_api(admin: &AdminClient) -> anyhow::Result<()> {
    let started = Instant::now();
    while admin.list_agents(None).await.is_err() {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("kas did not start within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A `ci_access` block allowing `project` with `access_as` (`agent`, `ci_job`, …) and `default_namespace`.
pub fn ci_access(project: &str, namespace: &str, access_as: &str) -> String {
    format!(
        "ci_access:\n  projects:\n  - id: {project}\n    default_namespace: {namespace}\n    access_as:\n      {access_as}: {{}}\n"
    )
}

/// A `user_access` block allowing members of `project` with `access_as`.
pub fn user_access(project: &str, access_as: &str) -> String {
    format!("user_access:\n  access_as:\n    {access_as}: {{}}\n  projects:\n  - id: {project}\n")
}

/// A JSON body for the Kubernetes `Status` a refusal carries.
pub fn status_of(body: &str) -> Option<Value> {
    let value: Value = serde_json::from_str(body).ok()?;
    (value["kind"] == "Status").then_some(value)
}

/// The same as [`json!`] but named for what tests build: a ConfigMap manifest.
pub fn config_map(name: &str, data: &[(&str, &str)]) -> Value {
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name }, "data": data })
}
