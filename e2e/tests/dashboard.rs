//! The dashboard in a real browser: Debian's Chromium driven by playwright-core (`e2e/dashboard/dashboard.mjs`)
//! against a kas process (with `viewer_token_file`, the push webhook and the Kubernetes API proxy), a real
//! agentk process applying to the test cluster's apiserver, and the test environment's Gitea. The script logs
//! in with the viewer token, sees the agent, asks this test to push to Gitea and watches the page change
//! without a reload, sees a configuration error with its file and line, checks a viewer cannot revoke, and
//! logs in as admin to revoke. It takes a screenshot of each page: into `$DASHBOARD_SCREENSHOT_DIR` when set
//! (`docs/dashboard/` holds the committed ones), else into the test's temporary directory.
//!
//! Prerequisites (`cargo xtask test` installs them): `/usr/bin/chromium` (or `$GITOPS_CHROMIUM`), Node.js,
//! and playwright-core at the version `e2e/dashboard/package.json` pins, in
//! `~/.cache/gitops-tools/playwright-core-<version>` (or `$GITOPS_PLAYWRIGHT_CORE`). A missing one fails the
//! test with what to install.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use e2e::process::{Killed, free_port, sibling_binary};
use serde_json::{Value, json};
use test_support::{
    cluster::{TestNamespace, install_crypto_provider},
    env::test_env,
    gitea::{Checkout, Gitea},
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const ADMIN: &str = "admin-token-for-the-dashboard-test";
const VIEWER: &str = "viewer-token-for-the-dashboard-test";
const AGENT: &str = "dash";
const WEBHOOK_SECRET: &str = "dashboard-hook-secret";

/// The browser, Node.js and playwright-core, found or a message saying how to get them.
struct Browser {
    chromium: PathBuf,
    playwright_core: PathBuf,
}

fn pinned_playwright_version() -> anyhow::Result<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/package.json");
    let package: Value = serde_json::from_str(&std::fs::read_to_string(&manifest)?)?;
    package["dependencies"]["playwright-core"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{} pins no playwright-core", manifest.display()))
}

impl Browser {
    fn find() -> anyhow::Result<Self> {
        let chromium = std::env::var_os("GITOPS_CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        ensure!(
            chromium.exists(),
            "{} is missing: the dashboard test needs Debian's Chromium (`apt-get install -y chromium` as root; \
             `cargo xtask test` does it), or set GITOPS_CHROMIUM",
            chromium.display()
        );
        ensure!(
            Command::new("node").arg("--version").output().is_ok(),
            "`node` is not on PATH: the dashboard test drives Chromium with a Node.js script"
        );
        let version = pinned_playwright_version()?;
        let cache = std::env::var_os("GITOPS_TOOLS_CACHE").map_or_else(
            || {
                let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
                PathBuf::from(home).join(".cache/gitops-tools")
            },
            PathBuf::from,
        );
        let install_dir = cache.join(format!("playwright-core-{version}"));
        let playwright_core = std::env::var_os("GITOPS_PLAYWRIGHT_CORE").map_or_else(
            || install_dir.join("node_modules/playwright-core"),
            PathBuf::from,
        );
        ensure!(
            playwright_core.join("package.json").exists(),
            "playwright-core {version} is missing at {}: `cargo xtask test` installs it, or run \
             `mkdir -p {dir} && cd {dir} && npm install --save-exact playwright-core@{version}` (or set \
             GITOPS_PLAYWRIGHT_CORE to a playwright-core package directory)",
            playwright_core.display(),
            dir = install_dir.display(),
        );
        Ok(Self {
            chromium,
            playwright_core,
        })
    }
}

async fn graphql(api: &str, token: &str, query: &str, variables: Value) -> anyhow::Result<Value> {
    let answer: Value = reqwest::Client::new()
        .post(format!("{api}/api/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await?
        .json()
        .await?;
    ensure!(answer.get("errors").is_none(), "GraphQL: {answer}");
    Ok(answer["data"].clone())
}

fn config_yaml(project: &str, namespace: &str) -> String {
    format!(
        "gitops:\n  manifest_projects:\n  - id: {project}\n    default_namespace: {namespace}\n    paths:\n    - glob: 'manifests/*.yaml'\n\
         ci_access:\n  projects:\n  - id: {project}\n    default_namespace: {namespace}\n    access_as:\n      agent: {{}}\n"
    )
}

fn config_map(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: {value:?}\n"
    )
}

/// Waits until the agent's manifest project reports a sync of `commit` with every object `Current`.
async fn wait_synced(api: &str, agent_gid: &str, commit: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let data = graphql(
            api,
            ADMIN,
            "query($id: ID!) { clusterAgent(id: $id) { connected manifestProjects { lastSync { commitApplied outcome objects { health } } } } }",
            json!({ "id": agent_gid }),
        )
        .await?;
        let sync = &data["clusterAgent"]["manifestProjects"][0]["lastSync"];
        let current = sync["objects"]
            .as_array()
            .is_some_and(|o| !o.is_empty() && o.iter().all(|o| o["health"] == "Current"));
        if sync["commitApplied"] == commit && sync["outcome"] == "synced" && current {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not sync {commit} within 60 s: {data}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Spawns kas with the dashboard's viewer token, the Gitea webhook and the Kubernetes API proxy. Git is
/// polled once an hour, so only the webhook brings a push quickly.
fn spawn_kas(dir: &Path, ports: (u16, u16, u16)) -> anyhow::Result<Killed> {
    let env = test_env();
    let (agent, api, proxy) = ports;
    let d = dir.display();
    std::fs::write(dir.join("admin-token"), ADMIN)?;
    std::fs::write(dir.join("viewer-token"), VIEWER)?;
    std::fs::write(dir.join("git-password"), &env.gitea.admin_password)?;
    std::fs::write(dir.join("webhook-secret"), WEBHOOK_SECRET)?;
    let config = dir.join("kas.yaml");
    std::fs::write(
        &config,
        format!(
            "listen:\n  agent: 127.0.0.1:{agent}\n  api: 127.0.0.1:{api}\n  k8s_proxy: 127.0.0.1:{proxy}\n\
             data_dir: {d}/data\nadmin_token_file: {d}/admin-token\nviewer_token_file: {d}/viewer-token\n\
             git:\n  base_url: {}\n  username: {}\n  password_file: {d}/git-password\n  poll_period: 1h\n\
             webhooks:\n  secret_file: {d}/webhook-secret\nlogging:\n  level: info\n  format: text\n",
            env.gitea.url, env.gitea.admin_user
        ),
    )?;
    let log = std::fs::File::create(dir.join("kas.log"))?;
    let mut command = Command::new(sibling_binary("kas")?);
    command.args(["serve", "--config"]).arg(&config).stderr(log);
    Ok(Killed(command.spawn().context("starting kas")?))
}

async fn wait_healthy(api: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while !reqwest::get(format!("{api}/healthz"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "kas did not start within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn commit_and_push(
    checkout: &Checkout,
    files: Vec<(String, String)>,
    message: &str,
) -> anyhow::Result<String> {
    let borrowed: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_bytes()))
        .collect();
    let (commit, _) = tokio::task::block_in_place(|| checkout.commit_and_push(&borrowed, message))?;
    Ok(commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_push_live_and_only_the_admin_acts() -> anyhow::Result<()> {
    let browser = Browser::find()?;
    install_crypto_provider();
    let gitea = Gitea::from_env();
    let ns = TestNamespace::create("dashboard").await?;
    let repo = gitea.create_repository("dashboard").await?;
    let checkout = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || Checkout::new(&repo, "main")).await??
    };
    let config_path = format!(".gitlab/agents/{AGENT}/config.yaml");
    let first = commit_and_push(
        &checkout,
        vec![
            (config_path.clone(), config_yaml(&repo.full_name, &ns.name)),
            (
                "manifests/one.yaml".into(),
                config_map("dashboard-one", "v1"),
            ),
        ],
        "agent configuration and a first manifest",
    )
    .await?;

    // Kept when the test fails (kas's and agentk's logs are in it); removed at the end when it passes.
    let dir = tempfile::Builder::new()
        .prefix("dashboard-e2e")
        .tempdir()?
        .keep();
    let ports = (free_port()?, free_port()?, free_port()?);
    let api = format!("http://127.0.0.1:{}", ports.1);
    let _kas = spawn_kas(dir.as_path(), ports)?;
    wait_healthy(&api).await?;
    gitea
        .add_push_webhook(&repo, &format!("{api}/api/webhooks/gitea"), WEBHOOK_SECRET)
        .await?;

    let created = graphql(
        &api,
        ADMIN,
        "mutation($p: String!, $n: String!) { createClusterAgent(input: { projectPath: $p, name: $n }) { clusterAgent { id } errors } }",
        json!({ "p": repo.full_name, "n": AGENT }),
    )
    .await?;
    let agent_gid = created["createClusterAgent"]["clusterAgent"]["id"]
        .as_str()
        .with_context(|| format!("no agent: {created}"))?
        .to_owned();
    let agent_id = agent_gid.rsplit('/').next().unwrap_or_default().to_owned();
    let token = graphql(
        &api,
        ADMIN,
        "mutation($id: ID!) { clusterAgentTokenCreate(input: { clusterAgentId: $id, name: \"dash\", description: \"dashboard test\" }) { secret errors } }",
        json!({ "id": agent_gid }),
    )
    .await?;
    let secret = token["clusterAgentTokenCreate"]["secret"]
        .as_str()
        .with_context(|| format!("no token: {token}"))?
        .to_owned();

    let agentk_log = std::fs::File::create(dir.as_path().join("agentk.log"))?;
    let _agentk = Killed(
        Command::new(sibling_binary("agentk")?)
            .arg(format!("--kas-address=grpc://127.0.0.1:{}", ports.0))
            .arg("--log-format=text")
            .env("AGENTK_TOKEN", &secret)
            .env("KUBECONFIG", &test_env().kubernetes.kubeconfig)
            .env("POD_NAMESPACE", &ns.name)
            .env("POD_NAME", "agentk-dashboard-test")
            .stdout(Stdio::null())
            .stderr(agentk_log)
            .spawn()
            .context("starting agentk")?,
    );
    wait_synced(&api, &agent_gid, &first).await?;

    // A CI token and one request through the Kubernetes API proxy, for the audit and CI token pages.
    let ci = graphql(
        &api,
        ADMIN,
        "mutation($p: String!) { ciTokenCreate(input: { project: $p, description: \"deploy job\" }) { token errors } }",
        json!({ "p": repo.full_name }),
    )
    .await?;
    let ci_secret = ci["ciTokenCreate"]["token"]
        .as_str()
        .with_context(|| format!("no CI token: {ci}"))?;
    let proxied = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/api/v1/namespaces/{}/configmaps",
            ports.2, ns.name
        ))
        .bearer_auth(format!("ci:{agent_id}:{ci_secret}"))
        .send()
        .await?;
    ensure!(
        proxied.status().is_success(),
        "the proxy answered {}: {}",
        proxied.status(),
        proxied.text().await?
    );

    let screenshots = std::env::var_os("DASHBOARD_SCREENSHOT_DIR")
        .map_or_else(|| dir.as_path().join("screenshots"), PathBuf::from);
    let mut node = tokio::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/dashboard.mjs"))
        .env("KAS_URL", &api)
        .env("VIEWER_TOKEN", VIEWER)
        .env("ADMIN_TOKEN", ADMIN)
        .env("AGENT_NAME", AGENT)
        .env("PROJECT", &repo.full_name)
        .env("CHROMIUM", &browser.chromium)
        .env("PLAYWRIGHT_CORE", &browser.playwright_core)
        .env("SCREENSHOT_DIR", &screenshots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting node")?;
    let mut to_node = node.stdin.take().context("node stdin")?;
    let mut from_node = BufReader::new(node.stdout.take().context("node stdout")?).lines();
    let mut result = None;
    let driven = tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(line) = from_node.next_line().await? {
            let commit = match line.as_str() {
                "@@push" => {
                    commit_and_push(
                        &checkout,
                        vec![
                            (
                                "manifests/one.yaml".into(),
                                config_map("dashboard-one", "v2"),
                            ),
                            (
                                "manifests/two.yaml".into(),
                                config_map("dashboard-two", "v1"),
                            ),
                        ],
                        "change one, add two",
                    )
                    .await?
                }
                "@@break-config" => {
                    let broken = format!(
                        "{}not_a_field: true\n",
                        config_yaml(&repo.full_name, &ns.name)
                    );
                    commit_and_push(
                        &checkout,
                        vec![(config_path.clone(), broken)],
                        "an invalid config.yaml",
                    )
                    .await?
                }
                other => {
                    if let Some(json) = other.strip_prefix("@@result ") {
                        result = Some(serde_json::from_str::<Value>(json)?);
                    } else {
                        eprintln!("node: {other}");
                    }
                    continue;
                }
            };
            eprintln!("{line}: pushed {commit}");
            to_node
                .write_all(format!("@@done {commit}\n").as_bytes())
                .await?;
        }
        anyhow::Ok(())
    })
    .await;
    let status = node.wait().await?;
    let logs = || {
        format!(
            "kas log: {}\nagentk log: {}",
            dir.as_path().join("kas.log").display(),
            dir.as_path().join("agentk.log").display()
        )
    };
    match driven {
        Ok(outcome) => outcome.with_context(logs)?,
        Err(_) => bail!("the browser script did not finish within 300 s; {}", logs()),
    }
    ensure!(
        status.success(),
        "the browser script failed ({status}); its messages are above; {}",
        logs()
    );
    let result = result.context("the browser script reported no result")?;
    eprintln!(
        "dashboard: {result}; screenshots in {}",
        screenshots.display()
    );
    std::fs::remove_dir_all(&dir)?;
    gitea.delete_repository(&repo).await?;
    Ok(())
}
