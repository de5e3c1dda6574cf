//! The seed's scenario (`cargo xtask e2e`) through the real Gitea and its push webhook: the repository
//! `demo/gitops` with the seed's layout, kas and agentk as real processes, agentk installed with
//! `agentk generate` and running under the installed ServiceAccount's own token, and the article's steps done
//! the way a user does them, every answer printed. Then `replicas: 2`, then the Deployment removed from Git
//! is pruned. The seed's log lines are asserted in agentk's real output. kas polls Git only hourly here, so
//! every change after the first sync can only arrive through the webhook. Exits non-zero when any step
//! does not behave as the article says.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use e2e::world::{
    self, AGENT, CONFIG_PATH, CONFIGMAP, CONFIGMAP_PATH, DEPLOYMENT, DEPLOYMENT_PATH, GiteaAdmin,
    Kas, Managed, NAMESPACE, OWNER, REPO, SyncOf, WorkTree,
};
use serde_json::Value;
use test_support::env::TestEnvState;

/// Times each step and the whole run.
struct Steps {
    started: Instant,
    current: Option<(String, Instant)>,
    done: Vec<(String, Duration)>,
}

impl Steps {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            current: None,
            done: Vec::new(),
        }
    }

    fn step(&mut self, n: &str, what: &str) {
        self.finish();
        eprintln!(
            "\n==> [{:>5.1}s] step {n}: {what}",
            self.started.elapsed().as_secs_f64()
        );
        self.current = Some((format!("step {n}: {what}"), Instant::now()));
    }

    fn finish(&mut self) {
        if let Some((name, started)) = self.current.take() {
            let took = started.elapsed();
            eprintln!("    ({name} took {took:.2?})");
            self.done.push((name, took));
        }
    }

    fn report(mut self) {
        self.finish();
        eprintln!("\nThe seed's workflow through Gitea works:");
        for (name, took) in &self.done {
            eprintln!("  {:>8.2?}  {name}", took);
        }
        eprintln!("  {:>8.2?}  total", self.started.elapsed());
    }
}

/// agentk's JSON log lines from a point on: each push is checked against the lines it caused.
struct LogCursor {
    path: PathBuf,
    seen: usize,
}

impl LogCursor {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            seen: 0,
        }
    }

    /// From now on only new lines count.
    fn skip_to_end(&mut self) {
        self.seen = world::log_lines(&self.path).len();
    }

    /// Waits for a new line for which `matches` holds; prints and returns it.
    async fn expect(
        &mut self,
        what: &str,
        within: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let lines = world::log_lines(&self.path);
            if let Some(at) = lines.iter().skip(self.seen).position(&matches) {
                // The next expectation looks after this line: the seed's lines come in order.
                self.seen += at + 1;
                let found = &lines[self.seen - 1];
                eprintln!("    agentk: {found}");
                return Ok(found.clone());
            }
            if started.elapsed() > within {
                bail!(
                    "agentk's log has no {what} within {within:?}; its end:\n{}",
                    world::tail(&self.path, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The seed's three lines for one object: `Applying resource <kind>/<name> …`, `Synced` with its
    /// `resource_key` and a `sync_result` ending in `verb`, then the sync's summary.
    async fn expect_sync(&mut self, kind: &str, name: &str, verb: &str) -> anyhow::Result<()> {
        let within = Duration::from_secs(60);
        let applying = format!("Applying resource {kind}/{name} in cluster: ");
        self.expect(&format!("`{applying}…`"), within, |l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with(&applying) && m.ends_with(NAMESPACE))
        })
        .await?;
        let synced = self
            .expect(&format!("`Synced` for {kind}/{name}"), within, |l| {
                l["msg"] == "Synced"
                    && l["resource_key"]
                        .as_str()
                        .is_some_and(|k| k.contains(kind) && k.ends_with(name))
                    && l["sync_result"].as_str().is_some_and(|r| r.ends_with(verb))
            })
            .await?;
        ensure!(
            synced["sync_result"]
                .as_str()
                .is_some_and(|r| r.contains(name)),
            "sync_result names the object: {synced}"
        );
        self.expect("the summary `Cluster successfully synced`", within, |l| {
            l["msg"] == "Cluster successfully synced"
        })
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = test_support::env::load().context("`cargo xtask e2e` runs this")?;
    let dir = tempfile::tempdir()?;
    let result = run(&env, dir.path()).await;
    // The namespace holds what the scenario applied; waited for, so that a next run in the same cluster
    // (`cargo xtask cluster up`) starts clean. The cluster itself goes with `cargo xtask e2e`.
    let _ = world::kubectl(
        &env,
        &[
            "delete",
            "namespace",
            NAMESPACE,
            "--ignore-not-found",
            "--timeout=60s",
        ],
        None,
    );
    if result.is_err() {
        eprintln!(
            "\nlogs: {}",
            ["kas", "agentk"]
                .map(|n| dir
                    .path()
                    .join("logs")
                    .join(format!("{n}.log"))
                    .display()
                    .to_string())
                .join(", ")
        );
        // Kept for reading.
        let _ = dir.keep();
    }
    result
}

async fn graphql(kas: &Kas, document: &str) -> anyhow::Result<Value> {
    let answer = kas.graphql(document).await?;
    eprintln!("    {}", serde_json::to_string(&answer)?);
    ensure!(
        answer["errors"].is_null(),
        "GraphQL answered errors: {answer}"
    );
    Ok(answer)
}

async fn run(env: &TestEnvState, dir: &Path) -> anyhow::Result<()> {
    // `demo`, as in the quickstart; the test passes an owner of its own, since a Gitea that outlives one
    // run (`cargo xtask cluster up`) already has `demo`.
    let owner = std::env::var("SEED_OWNER").unwrap_or_else(|_| OWNER.to_owned());
    let project = format!("{owner}/{REPO}");
    let project = project.as_str();
    let mut steps = Steps::new();
    steps.step(
        "0",
        &format!(
            "Gitea: repository {project} with the seed's layout, kas with a push webhook from it"
        ),
    );
    let left = world::kubectl(
        env,
        &[
            "get",
            "namespace",
            NAMESPACE,
            "--ignore-not-found",
            "-o",
            "name",
        ],
        None,
    )?;
    ensure!(
        left.trim().is_empty(),
        "namespace {NAMESPACE} already exists in this cluster (another run or install); the seed installs there"
    );
    let gitea = GiteaAdmin::new(env);
    gitea.create_repository(&owner, REPO).await?;
    let tree = WorkTree::init(&dir.join("clone"), &gitea.clone_url(project))?;
    let first = tree.commit_and_push(
        &[
            ("README.md", Some("# GitOps demo\n")),
            (CONFIG_PATH, Some(&world::config_yaml(project))),
            (DEPLOYMENT_PATH, Some(DEPLOYMENT)),
            (CONFIGMAP_PATH, Some(CONFIGMAP)),
        ],
        "the seed's repository layout",
    )?;
    eprintln!("    pushed {first}: {CONFIG_PATH}, {DEPLOYMENT_PATH}, {CONFIGMAP_PATH}");
    // Hourly polls: a change that arrives within the test came by the webhook.
    let kas = Kas::start(env, dir, "1h", false).await?;
    gitea
        .add_push_webhook(project, &kas.gitea_webhook_url(), &kas.webhook_secret)
        .await?;
    eprintln!(
        "    kas: API {}, agents {}; webhook {}",
        kas.endpoints.api_url(),
        kas.endpoints.agent_url(),
        kas.gitea_webhook_url()
    );

    steps.step("1", "register the agent (createClusterAgent)");
    let answer = graphql(
        &kas,
        &format!(
            r#"mutation createAgent {{
  createClusterAgent(input: {{ projectPath: "{project}", name: "{AGENT}" }}) {{
    clusterAgent {{ id name }}
    errors
  }}
}}"#
        ),
    )
    .await?;
    let agent_id = answer["data"]["createClusterAgent"]["clusterAgent"]["id"]
        .as_str()
        .context("no agent id")?
        .to_owned();

    steps.step(
        "2",
        "create its token (clusterAgentTokenCreate); the secret is shown once",
    );
    let answer = graphql(
        &kas,
        &format!(
            r#"mutation createToken {{
  clusterAgentTokenCreate(input: {{ clusterAgentId: "{agent_id}", description: "GitLab Kubernetes Agent Server Demo", name: "gitops" }}) {{
    secret
    token {{ createdAt id }}
    errors
  }}
}}"#
        ),
    )
    .await?;
    let token = answer["data"]["clusterAgentTokenCreate"]["secret"]
        .as_str()
        .context("no secret")?
        .to_owned();

    steps.step(
        "3",
        "install agentk: `agentk generate | kubectl apply -f -`, then agentk as the installed pod",
    );
    let manifests = world::generate_install(&token, &kas.endpoints.agent_url())?;
    eprintln!("    {}", world::object_names(&manifests).join(", "));
    eprint!(
        "{}",
        world::kubectl(env, &["apply", "-f", "-"], Some(&manifests))?
    );
    let installed = world::installed_agent(env, dir).await?;
    let mut whoami = std::process::Command::new(&env.tools.kubectl);
    whoami
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .env("KUBECONFIG", &installed.kubeconfig);
    let identity = world::run(whoami)?;
    ensure!(
        identity == format!("system:serviceaccount:{NAMESPACE}:gitlab-agent"),
        "agentk's kubeconfig is not the installed ServiceAccount's: {identity}"
    );
    eprintln!(
        "    agentk runs beside the cluster as pod {} (kwok fakes its container), as {identity}, with {}",
        installed.pod_name,
        installed.args.join(" ")
    );
    let mut agentk = world::start_agentk(&installed, dir, false)?;
    let mut log = LogCursor::new(&agentk.log);

    steps.step(
        "4",
        "agentk connects; kas reads .gitlab/agents/gitops/config.yaml from Gitea and streams it",
    );
    let check = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ name connected connections {{ connectedAt agentVersion podName }} configStatus {{ commitId error }} liveInfo {{ configCommitId logLevel }} }} }}"#
    );
    wait_graphql(&kas, &mut agentk, &check, Duration::from_secs(30), |v| {
        v["data"]["clusterAgent"]["liveInfo"]["logLevel"] == "debug"
    })
    .await
    .context("the agent did not apply config.yaml (observability.logging.level: debug)")?;

    steps.step(
        "5",
        "deployment/ reaches the cluster: nginx-deployment 1/1 and demo-settings, the seed's log lines",
    );
    log.expect_sync("Deployment", "nginx-deployment", "created")
        .await?;
    world::wait_synced(
        &kas,
        &mut agentk,
        SyncOf {
            agent_id: &agent_id,
            project,
            commit: &first,
        },
        Duration::from_secs(60),
    )
    .await?;
    wait_for_pods(env, 1).await?;
    eprint!(
        "{}",
        world::kubectl(
            env,
            &["-n", NAMESPACE, "get", "deployments,pods,configmaps"],
            None
        )?
    );

    steps.step(
        "6",
        "replicas: 2 pushed to Gitea; the webhook brings it, a second nginx pod starts",
    );
    log.skip_to_end();
    let two = tree.commit_and_push(
        &[(
            DEPLOYMENT_PATH,
            Some(&DEPLOYMENT.replace("replicas: 1", "replicas: 2")),
        )],
        "two replicas",
    )?;
    let pushed = Instant::now();
    log.expect_sync("Deployment", "nginx-deployment", "configured")
        .await?;
    let sync = world::wait_synced(
        &kas,
        &mut agentk,
        SyncOf {
            agent_id: &agent_id,
            project,
            commit: &two,
        },
        Duration::from_secs(30),
    )
    .await?;
    eprintln!(
        "    commit {two} applied {:.2?} after the push",
        pushed.elapsed()
    );
    eprintln!("    kas: lastSync {sync}");
    wait_for_pods(env, 2).await?;
    eprint!(
        "{}",
        world::kubectl(env, &["-n", NAMESPACE, "get", "deployments,pods"], None)?
    );

    steps.step(
        "7",
        "deployment.yaml removed from Git: agentk prunes nginx-deployment, demo-settings stays",
    );
    log.skip_to_end();
    let removed = tree.commit_and_push(&[(DEPLOYMENT_PATH, None)], "remove the Deployment")?;
    let pushed = Instant::now();
    let pruned = log
        .expect(
            "`Synced` … pruned for nginx-deployment",
            Duration::from_secs(60),
            |l| {
                l["msg"] == "Synced"
                    && l["resource_key"]
                        .as_str()
                        .is_some_and(|k| k.ends_with("nginx-deployment"))
                    && l["sync_result"]
                        .as_str()
                        .is_some_and(|r| r.ends_with("pruned"))
            },
        )
        .await?;
    ensure!(pruned["sync_result"].is_string());
    log.expect(
        "the summary `Cluster successfully synced`",
        Duration::from_secs(30),
        |l| l["msg"] == "Cluster successfully synced" && l["pruned"] == 1,
    )
    .await?;
    world::wait_synced(
        &kas,
        &mut agentk,
        SyncOf {
            agent_id: &agent_id,
            project,
            commit: &removed,
        },
        Duration::from_secs(30),
    )
    .await?;
    eprintln!(
        "    commit {removed} applied {:.2?} after the push",
        pushed.elapsed()
    );
    let left = world::kubectl(
        env,
        &[
            "-n",
            NAMESPACE,
            "get",
            "deployments,configmaps",
            "-o",
            "name",
        ],
        None,
    )?;
    eprint!("{left}");
    ensure!(
        !left.contains("deployment.apps/nginx-deployment"),
        "nginx-deployment is still in the cluster"
    );
    ensure!(
        left.contains("configmap/demo-settings"),
        "demo-settings was pruned too"
    );
    agentk.ensure_alive()?;
    // Each commit is applied once: a re-check of an applied commit waits for the drift-check interval
    // (5 minutes), not for the next lease renewal.
    for commit in [&first, &two, &removed] {
        let summaries = world::log_lines(&agentk.log)
            .iter()
            .filter(|l| {
                l["msg"] == "Cluster successfully synced" && l["commit_id"] == commit.as_str()
            })
            .count();
        ensure!(
            summaries == 1,
            "commit {commit} was synced {summaries} times, expected once"
        );
    }
    steps.report();
    Ok(())
}

/// Polls a GraphQL query (printing the last answer) until `done` holds.
async fn wait_graphql(
    kas: &Kas,
    agentk: &mut Managed,
    document: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let answer = kas.graphql(document).await?;
        if done(&answer) {
            eprintln!("    {answer}");
            return Ok(answer);
        }
        agentk.ensure_alive()?;
        if started.elapsed() > within {
            bail!("not within {within:?}; last answer {answer}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `n` nginx pods are Running (kwok "runs" them on its fake nodes).
async fn wait_for_pods(env: &TestEnvState, n: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let phases = world::kubectl(
            env,
            &[
                "-n",
                NAMESPACE,
                "get",
                "pods",
                "-l",
                "app=nginx",
                "-o",
                "jsonpath={.items[*].status.phase}",
            ],
            None,
        )?;
        if phases
            .split_whitespace()
            .filter(|p| *p == "Running")
            .count()
            == n
        {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("{n} nginx pods never became Running (phases: {phases})");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
