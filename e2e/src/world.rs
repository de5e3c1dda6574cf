//! The seed's world on the test environment's cluster and Gitea, built the way a person builds it: a Gitea
//! repository `demo/gitops` with the seed's layout and a push webhook to kas, kas (its API with GraphQL and
//! the dashboard, the Kubernetes API proxy on TLS), and agentk installed from `agentk generate` and running
//! under the installed ServiceAccount's own token.
//!
//! `cargo xtask up` leaves it running (processes in sessions of their own, pid files and logs in its state
//! directory); `cargo xtask e2e` builds it step by step, asserting as it goes, and ends it.
//!
//! agentk runs as a process beside the cluster, not in the pod: kwok fakes the pods' containers, so the
//! `gitlab-agent` pod the Deployment gets is only a name. The process takes that pod's name, the
//! Deployment's arguments, the token from the installed Secret and a token of the installed ServiceAccount,
//! so it has the pod's identity and permissions and nothing more.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use kas::cli::AdminClient;
use serde_json::{Value, json};
use test_support::env::TestEnvState;

use crate::process::{free_port, run_against_cluster, sibling_binary};

/// The Gitea organisation and repository that hold the agent's configuration and its manifests.
pub const OWNER: &str = "demo";
pub const REPO: &str = "gitops";
pub const PROJECT: &str = "demo/gitops";
pub const AGENT: &str = "gitops";
/// Where `agentk generate` installs the agent, as in the seed.
pub const NAMESPACE: &str = "gitlab-kubernetes-agent";
pub const CONFIG_PATH: &str = ".gitlab/agents/gitops/config.yaml";
pub const DEPLOYMENT_PATH: &str = "deployment/deployment.yaml";
/// The second manifest: it keeps the project non-empty when the Deployment is removed from Git (kas
/// refuses to deliver an empty project, which would prune everything, unless `allow_empty` is set).
pub const CONFIGMAP_PATH: &str = "deployment/configmap.yaml";

/// The seed's `config.yaml`: the repository `project` is its own manifest project.
pub fn config_yaml(project: &str) -> String {
    format!(
        "gitops:\n  manifest_projects:\n  - id: \"{project}\"\n    paths:\n    - glob: '/**/*.yaml'\nobservability:\n  logging:\n    level: debug\n"
    )
}
/// The seed's `deployment.yaml`.
pub const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx-deployment\n  namespace: gitlab-kubernetes-agent\nspec:\n  selector:\n    matchLabels:\n      app: nginx\n  replicas: 1\n  template:\n    metadata:\n      labels:\n        app: nginx\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.14.2\n        ports:\n        - containerPort: 80\n";
pub const CONFIGMAP: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo-settings\n  namespace: gitlab-kubernetes-agent\ndata:\n  greeting: hello from demo/gitops\n";

/// A process of the world with its output in `<dir>/logs/<name>.log`. Detached ones run in a session of
/// their own (`setsid`), outliving the program that started them, and get `<dir>/<name>.pid` at once (for
/// `cargo xtask down`, also when starting fails later); the others are killed when dropped.
pub struct Managed {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Managed {
    /// Starts `program` configured by `configure`.
    pub fn spawn(
        name: &str,
        program: &Path,
        dir: &Path,
        detach: bool,
        configure: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Self> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        // setsid(1) calls setsid(2) and execs the program in the same process (a child of ours is never
        // a process group leader), so the pid is the program's.
        let mut command = if detach {
            let mut command = Command::new("setsid");
            command.arg(program);
            command
        } else {
            Command::new(program)
        };
        configure(&mut command);
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        if detach {
            std::fs::write(dir.join(format!("{name}.pid")), format!("{}\n", child.id()))?;
        }
        Ok(Self {
            name: name.to_owned(),
            pid: child.id(),
            log,
            child: (!detach).then_some(child),
        })
    }

    pub fn is_alive(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            // Not reaped by us: an exited one stays a zombie until we exit; read its state.
            None => std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|stat| {
                !stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            }),
        }
    }

    /// Fails with the end of the log when the process has exited.
    pub fn ensure_alive(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.is_alive(),
            "{} exited; the end of {}:\n{}",
            self.name,
            self.log.display(),
            tail(&self.log, 20)
        );
        Ok(())
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Writes a file only its owner may read (tokens, passwords).
pub fn write_secret(path: &Path, content: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(content.as_bytes())?;
    Ok(())
}

/// 32 random bytes as hex, for credentials of the world (admin token, webhook secret).
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Gitea's REST API as its admin user.
pub struct GiteaAdmin {
    pub url: String,
    pub user: String,
    pub password: String,
    http: reqwest::Client,
}

impl GiteaAdmin {
    pub fn new(env: &TestEnvState) -> Self {
        Self {
            url: env.gitea.url.trim_end_matches('/').to_owned(),
            user: env.gitea.admin_user.clone(),
            password: env.gitea.admin_password.clone(),
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        let response = self
            .http
            .post(format!("{}/api/v1{path}", self.url))
            .basic_auth(&self.user, Some(&self.password))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("Gitea POST {path}"))?;
        let status = response.status();
        let text = response.text().await?;
        ensure!(
            status.is_success(),
            "Gitea answered {status} to POST {path}: {text}"
        );
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates organisation `owner` and its private repository `name` (empty, default branch `main`).
    pub async fn create_repository(&self, owner: &str, name: &str) -> anyhow::Result<()> {
        self.post(
            "/orgs",
            json!({ "username": owner, "visibility": "public" }),
        )
        .await?;
        self.post(
            &format!("/orgs/{owner}/repos"),
            json!({ "name": name, "private": true, "auto_init": false, "default_branch": "main" }),
        )
        .await?;
        Ok(())
    }

    /// A push webhook on `owner/name` to `url`, signed with `secret`.
    pub async fn add_push_webhook(
        &self,
        project: &str,
        url: &str,
        secret: &str,
    ) -> anyhow::Result<()> {
        self.post(
            &format!("/repos/{project}/hooks"),
            json!({
                "type": "gitea",
                "active": true,
                "events": ["push"],
                "config": { "url": url, "content_type": "json", "secret": secret },
            }),
        )
        .await?;
        Ok(())
    }

    /// `http://user:password@host/owner/name.git`: what `git clone` needs for the private repository.
    pub fn clone_url(&self, project: &str) -> String {
        let (scheme, host) = self.url.split_once("://").unwrap_or(("http", &self.url));
        format!(
            "{scheme}://{}:{}@{host}/{project}.git",
            self.user, self.password
        )
    }
}

/// A clone of the repository, committed to and pushed with the `git` command line, as a person does.
pub struct WorkTree {
    pub dir: PathBuf,
}

impl WorkTree {
    /// An empty work tree for a repository that has no commit yet.
    pub fn init(dir: &Path, clone_url: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tree = Self {
            dir: dir.to_owned(),
        };
        tree.git(&["init", "--quiet", "--initial-branch=main"])?;
        tree.git(&["remote", "add", "origin", clone_url])?;
        Ok(tree)
    }

    pub fn git(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new("git")
            .args(args)
            .current_dir(&self.dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .output()
            .context("run git (is it installed?)")?;
        ensure!(
            output.status.success(),
            "git {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Writes (`Some`) or deletes (`None`) `files`, commits them and pushes `main`; returns the commit.
    pub fn commit_and_push(
        &self,
        files: &[(&str, Option<&str>)],
        message: &str,
    ) -> anyhow::Result<String> {
        for (path, content) in files {
            let file = self.dir.join(path);
            match content {
                Some(content) => {
                    if let Some(parent) = file.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&file, content)?;
                }
                None => std::fs::remove_file(&file)
                    .with_context(|| format!("remove {}", file.display()))?,
            }
        }
        self.git(&["add", "--all"])?;
        self.git(&[
            "-c",
            "user.name=demo",
            "-c",
            "user.email=demo@example.invalid",
            "commit",
            "--quiet",
            "-m",
            message,
        ])?;
        self.git(&["push", "--quiet", "origin", "HEAD:refs/heads/main"])?;
        self.git(&["rev-parse", "HEAD"])
    }
}

/// Where kas listens and how to reach it.
pub struct KasEndpoints {
    pub api_port: u16,
    pub agent_port: u16,
    pub proxy_port: u16,
    /// `/metrics`, `/livez`, `/readyz`.
    pub observability_port: u16,
}

impl KasEndpoints {
    pub fn free() -> anyhow::Result<Self> {
        Ok(Self {
            api_port: free_port()?,
            agent_port: free_port()?,
            proxy_port: free_port()?,
            observability_port: free_port()?,
        })
    }

    pub fn observability_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.observability_port)
    }

    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    /// agentk's address: gRPC inside WebSocket, as the seed's `wss://` address but without TLS on loopback.
    pub fn agent_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.agent_port)
    }
}

/// kas as a process with its configuration, data and credentials in `dir`.
pub struct Kas {
    pub process: Managed,
    pub endpoints: KasEndpoints,
    pub admin: AdminClient,
    pub admin_token_file: PathBuf,
    /// The dashboard's read-only token (`viewer_token_file`).
    pub viewer_token_file: PathBuf,
    pub webhook_secret: String,
    pub config_file: PathBuf,
}

impl Kas {
    /// Writes `kas.yaml` (Gitea as its Git server, `poll_period` as a fallback to the webhook, the
    /// Kubernetes API proxy on TLS with a self-signed certificate) and starts kas.
    pub async fn start(
        env: &TestEnvState,
        dir: &Path,
        poll_period: &str,
        detach: bool,
    ) -> anyhow::Result<Self> {
        let endpoints = KasEndpoints::free()?;
        let kas_dir = dir.join("kas");
        std::fs::create_dir_all(&kas_dir)?;
        let admin_token = random_secret();
        let webhook_secret = random_secret();
        let admin_token_file = kas_dir.join("admin-token");
        write_secret(&admin_token_file, &admin_token)?;
        let viewer_token_file = kas_dir.join("viewer-token");
        write_secret(&viewer_token_file, &random_secret())?;
        write_secret(&kas_dir.join("webhook-secret"), &webhook_secret)?;
        write_secret(&kas_dir.join("git-password"), &env.gitea.admin_password)?;
        let cert = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])?;
        std::fs::write(kas_dir.join("proxy.crt"), cert.cert.pem())?;
        write_secret(
            &kas_dir.join("proxy.key"),
            &cert.signing_key.serialize_pem(),
        )?;
        let config_file = kas_dir.join("kas.yaml");
        std::fs::write(
            &config_file,
            format!(
                "listen:\n  agent: 127.0.0.1:{agent}\n  api: 127.0.0.1:{api}\n  k8s_proxy: 127.0.0.1:{proxy}\n  observability: 127.0.0.1:{observability}\n  k8s_proxy_tls:\n    cert_file: {d}/proxy.crt\n    key_file: {d}/proxy.key\ndata_dir: {d}/data\nadmin_token_file: {d}/admin-token\nviewer_token_file: {d}/viewer-token\ngit:\n  base_url: {git}\n  username: {user}\n  password_file: {d}/git-password\n  poll_period: {poll_period}\nwebhooks:\n  secret_file: {d}/webhook-secret\nlogging:\n  level: info\n  format: text\n",
                agent = endpoints.agent_port,
                api = endpoints.api_port,
                proxy = endpoints.proxy_port,
                observability = endpoints.observability_port,
                d = kas_dir.display(),
                git = env.gitea.url,
                user = env.gitea.admin_user,
            ),
        )?;
        let mut process = Managed::spawn("kas", &sibling_binary("kas")?, dir, detach, |command| {
            command.arg("serve").arg("--config").arg(&config_file);
        })?;
        let admin = AdminClient::new(&endpoints.api_url(), admin_token);
        let started = Instant::now();
        while admin.list_agents(None).await.is_err() {
            process.ensure_alive()?;
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "kas did not answer on {} within 30 s; the end of {}:\n{}",
                    endpoints.api_url(),
                    process.log.display(),
                    tail(&process.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            process,
            endpoints,
            admin,
            admin_token_file,
            viewer_token_file,
            webhook_secret,
            config_file,
        })
    }

    pub fn viewer_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.viewer_token_file)?
            .trim()
            .to_owned())
    }

    pub fn admin_token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.admin_token_file)?
            .trim()
            .to_owned())
    }

    /// The webhook URL Gitea posts pushes to.
    pub fn gitea_webhook_url(&self) -> String {
        format!("{}/api/webhooks/gitea", self.endpoints.api_url())
    }

    /// POSTs a raw GraphQL document with the admin token; the whole answer (data and errors).
    pub async fn graphql(&self, document: &str) -> anyhow::Result<Value> {
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/api/graphql", self.endpoints.api_url()))
            .bearer_auth(self.admin_token()?)
            .json(&json!({ "query": document }))
            .send()
            .await?
            .json()
            .await?;
        Ok(answer)
    }

    /// The `kas` command line against this kas, authenticated by the admin token file.
    pub fn cli(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(sibling_binary("kas")?);
        command
            .env("KAS_API_URL", self.endpoints.api_url())
            .env("KAS_ADMIN_TOKEN_FILE", &self.admin_token_file)
            .env_remove("KAS_ADMIN_TOKEN");
        Ok(command)
    }

    /// Issues a CI token for the configuration project `project` (which the agent authorises implicitly,
    /// as itself) and writes the kubeconfig `kas kubeconfig` prints for it: kubectl through kas and the
    /// agent.
    pub fn proxy_kubeconfig(
        &self,
        agent_id: &str,
        project: &str,
        file: &Path,
    ) -> anyhow::Result<()> {
        let mut create = self.cli()?;
        create.args([
            "ci-token",
            "create",
            "--project",
            project,
            "--expires-in",
            "720h",
            "--description",
            "cargo xtask up",
        ]);
        let created: Value = serde_json::from_str(&run(create)?)?;
        let token = created["token"]
            .as_str()
            .context("kas ci-token create printed no token")?;
        let mut kubeconfig = self.cli()?;
        kubeconfig.args(["kubeconfig", "--agent", agent_id]);
        kubeconfig.env("KAS_PROXY_TOKEN", token);
        let yaml = run(kubeconfig)?;
        write_secret(file, &yaml)
    }
}

/// Runs `command`; its stdout, or an error with everything it printed.
pub fn run(mut command: Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {command:?}"))?;
    ensure!(
        output.status.success(),
        "{:?} {:?} failed: {}{}",
        command.get_program(),
        command.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// kubectl with the cluster's admin kubeconfig, as the person installing the agent.
pub fn kubectl(env: &TestEnvState, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new(&env.tools.kubectl);
    command.args(args);
    run_against_cluster(command, &env.kubernetes.kubeconfig, stdin)
}

/// `agentk generate` for `token` and `kas_address`, in the seed's namespace.
pub fn generate_install(token: &str, kas_address: &str) -> anyhow::Result<String> {
    let mut command = Command::new(sibling_binary("agentk")?);
    command.args([
        "generate",
        "--agent-token",
        token,
        "--kas-address",
        kas_address,
        "--agent-version",
        "stable",
        "--namespace",
        NAMESPACE,
    ]);
    run(command)
}

/// `Kind/name` of each document of a multi-document YAML stream.
pub fn object_names(manifests: &str) -> Vec<String> {
    manifests
        .split("\n---\n")
        .map(|doc| {
            let field = |key: &str| {
                doc.lines()
                    .find_map(|l| l.trim().strip_prefix(key))
                    .unwrap_or("?")
                    .trim()
                    .trim_matches('"')
                    .to_owned()
            };
            format!("{}/{}", field("kind:"), field("name:"))
        })
        .collect()
}

/// What the agentk process runs with, taken from what `agentk generate` installed.
pub struct InstalledAgent {
    /// The container's arguments, the token file's path made local and the observability listener moved
    /// to a free loopback port.
    pub args: Vec<String>,
    /// The kubeconfig with a token of the installed ServiceAccount (TokenRequest), never the admin's.
    pub kubeconfig: PathBuf,
    /// The name of the pod kwok runs for the Deployment (or the Deployment's name while there is none).
    pub pod_name: String,
    /// `http://127.0.0.1:<port>` of the observability listener, when the Deployment configures one.
    pub observability: Option<String>,
}

/// Reads the installed Deployment, Secret and ServiceAccount back from the cluster and prepares agentk's
/// process from them in `dir`.
pub async fn installed_agent(env: &TestEnvState, dir: &Path) -> anyhow::Result<InstalledAgent> {
    let agent_dir = dir.join("agentk");
    std::fs::create_dir_all(&agent_dir)?;
    let token_file = agent_dir.join("token");
    let token = kubectl(
        env,
        &[
            "-n",
            NAMESPACE,
            "get",
            "secret",
            "gitlab-agent-token",
            "-o",
            "go-template={{.data.token | base64decode}}",
        ],
        None,
    )?;
    write_secret(&token_file, &token)?;
    let container: Value = serde_json::from_str(&kubectl(
        env,
        &[
            "-n",
            NAMESPACE,
            "get",
            "deployment",
            "gitlab-agent",
            "-o",
            "jsonpath={.spec.template.spec.containers[0]}",
        ],
        None,
    )?)?;
    let container_args: Vec<&str> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|arg| arg.as_str().context("a container argument"))
        .collect::<anyhow::Result<_>>()?;
    let port = free_port()?;
    let (args, observability) = local_args(&container_args, &token_file, port);
    let kubeconfig = agent_dir.join("kubeconfig");
    service_account_kubeconfig(env, &kubeconfig)?;
    let pod_name = wait_for_agent_pod(env).await?;
    Ok(InstalledAgent {
        args,
        kubeconfig,
        pod_name,
        observability,
    })
}

/// The container's arguments for a process on this machine: the token file is the local copy of the
/// Secret, and an observability listener (the pod's `:8080` would collide with other processes here) moves
/// to `127.0.0.1:<port>`, returned as a URL.
pub fn local_args(
    container_args: &[&str],
    token_file: &Path,
    port: u16,
) -> (Vec<String>, Option<String>) {
    let mut observability = None;
    let args = container_args
        .iter()
        .map(|arg| {
            let flag = arg.split_once('=').map_or(*arg, |(flag, _)| flag);
            match flag {
                "--token-file" => format!("--token-file={}", token_file.display()),
                "--observability-listen" | "--observability-listen-address" => {
                    observability = Some(format!("http://127.0.0.1:{port}"));
                    format!("{flag}=127.0.0.1:{port}")
                }
                _ => (*arg).to_owned(),
            }
        })
        .collect();
    (args, observability)
}

/// The name of the `gitlab-agent` pod (kwok schedules and "runs" it), waited for up to 30 s.
async fn wait_for_agent_pod(env: &TestEnvState) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let name = kubectl(
            env,
            &[
                "-n",
                NAMESPACE,
                "get",
                "pods",
                "-l",
                "app=gitlab-agent",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ],
            None,
        )
        .unwrap_or_default();
        if !name.is_empty() {
            return Ok(name);
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the gitlab-agent Deployment got no pod within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A kubeconfig for the `gitlab-agent` ServiceAccount: the admin kubeconfig's server and CA, and a token
/// from `kubectl create token` (the TokenRequest API, valid 7 days; `cargo xtask up` again renews it).
pub fn service_account_kubeconfig(env: &TestEnvState, file: &Path) -> anyhow::Result<()> {
    let token = kubectl(
        env,
        &[
            "-n",
            NAMESPACE,
            "create",
            "token",
            "gitlab-agent",
            "--duration=168h",
        ],
        None,
    )?;
    let admin: Value = serde_json::to_value(kube::config::Kubeconfig::read_from(
        &env.kubernetes.kubeconfig,
    )?)?;
    let cluster = admin["clusters"][0]["cluster"].clone();
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "local", "cluster": cluster }],
        "users": [{ "name": "gitlab-agent", "user": { "token": token.trim() } }],
        "contexts": [{ "name": "gitlab-agent", "context": { "cluster": "local", "user": "gitlab-agent", "namespace": NAMESPACE } }],
        "current-context": "gitlab-agent",
    });
    write_secret(file, &serde_json::to_string_pretty(&kubeconfig)?)
}

/// Starts agentk as the installed agent: its arguments, its pod's name and namespace, its ServiceAccount.
pub fn start_agentk(
    installed: &InstalledAgent,
    dir: &Path,
    detach: bool,
) -> anyhow::Result<Managed> {
    Managed::spawn(
        "agentk",
        &sibling_binary("agentk")?,
        dir,
        detach,
        |command| {
            command
                .args(&installed.args)
                .env("KUBECONFIG", &installed.kubeconfig)
                .env("POD_NAMESPACE", NAMESPACE)
                .env("POD_NAME", &installed.pod_name)
                .env_remove("AGENTK_TOKEN")
                .env_remove("AGENTK_KAS_ADDRESS");
        },
    )
}

/// agentk's JSON log lines so far.
pub fn log_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The agent's last sync of `project` as GraphQL shows it (`null` before the first).
pub async fn last_sync(kas: &Kas, agent_id: &str, project: &str) -> anyhow::Result<Value> {
    let answer = kas
        .graphql(&format!(
            r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ projectId lastSync {{ commitApplied outcome objects {{ resourceKey result }} }} }} }} }}"#
        ))
        .await?;
    let projects = answer["data"]["clusterAgent"]["manifestProjects"]
        .as_array()
        .with_context(|| format!("no manifest projects in {answer}"))?;
    Ok(projects
        .iter()
        .find(|p| p["projectId"].as_str() == Some(project))
        .map_or(Value::Null, |p| p["lastSync"].clone()))
}

/// Which sync [`wait_synced`] waits for: `commit` of `project` by agent `agent_id`.
pub struct SyncOf<'a> {
    pub agent_id: &'a str,
    pub project: &'a str,
    pub commit: &'a str,
}

/// Waits until agentk reports the commit applied and synced; the sync as GraphQL shows it.
pub async fn wait_synced(
    kas: &Kas,
    agentk: &mut Managed,
    of: SyncOf<'_>,
    within: Duration,
) -> anyhow::Result<Value> {
    let SyncOf {
        agent_id,
        project,
        commit,
    } = of;
    let started = Instant::now();
    loop {
        let sync = last_sync(kas, agent_id, project).await?;
        if sync["commitApplied"].as_str() == Some(commit) && sync["outcome"] == "synced" {
            return Ok(sync);
        }
        agentk.ensure_alive()?;
        if started.elapsed() > within {
            bail!(
                "commit {commit} was not synced within {within:?}; last sync: {sync}; the end of {}:\n{}",
                agentk.log.display(),
                tail(&agentk.log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_arguments_point_at_local_files_and_a_loopback_port() {
        let (args, observability) = local_args(
            &[
                "--kas-address=wss://kas.example",
                "--token-file=/etc/agentk/token/token",
                "--observability-listen=:8080",
            ],
            Path::new("/state/agentk/token"),
            41234,
        );
        assert_eq!(
            args,
            [
                "--kas-address=wss://kas.example",
                "--token-file=/state/agentk/token",
                "--observability-listen=127.0.0.1:41234",
            ]
        );
        assert_eq!(observability.as_deref(), Some("http://127.0.0.1:41234"));
        let (args, observability) = local_args(&["--kas-address=ws://x"], Path::new("/t"), 1);
        assert_eq!(args, ["--kas-address=ws://x"]);
        assert_eq!(observability, None);
    }

    #[test]
    fn object_names_lists_kind_and_name_of_each_document() {
        let names = object_names(&format!("{DEPLOYMENT}---\n{CONFIGMAP}"));
        assert!(config_yaml("a/b").contains("- id: \"a/b\"\n"));
        assert_eq!(
            names,
            ["Deployment/nginx-deployment", "ConfigMap/demo-settings"]
        );
    }
}
