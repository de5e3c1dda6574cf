//! The seed's scenario, locally (`cargo xtask e2e`): a Git server holding the configuration project, kas and
//! agentk as real processes, and the article's steps 1-4 done the way a user does them, with every answer
//! printed. Exits non-zero if any step does not behave as the article says.

use std::{process::Command, time::Duration};

use anyhow::{Context, bail, ensure};
use e2e::{
    AGENT_NAME, CONFIG_FILE, CONFIG_PROJECT,
    process::{KasProcess, sibling_binary},
};
use serde_json::{Value, json};
use test_support::git_http::GitHttpServer;

const CONFIG: &str = "gitops:\n  manifest_projects:\n  - id: \"group/config\"\n    paths:\n    - glob: '/**/*.yaml'\nobservability:\n  logging:\n    level: debug\n";
const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx-deployment\n  namespace: gitlab-kubernetes-agent\nspec:\n  selector:\n    matchLabels:\n      app: nginx\n  replicas: 1\n  template:\n    metadata:\n      labels:\n        app: nginx\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.14.2\n        ports:\n        - containerPort: 80\n";

fn step(n: &str, what: &str) {
    eprintln!("\n==> step {n}: {what}");
}

async fn graphql(kas: &KasProcess, document: &str) -> anyhow::Result<Value> {
    let answer: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/graphql", kas.api_port))
        .bearer_auth(&kas.admin_token)
        .json(&json!({ "query": document }))
        .send()
        .await?
        .json()
        .await?;
    eprintln!("{}", serde_json::to_string(&answer)?);
    Ok(answer)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let git = GitHttpServer::start().await?;
    git.create_repo(CONFIG_PROJECT, true)?;
    git.commit_files(
        CONFIG_PROJECT,
        &[
            ("README.md", Some("# GitOps demo\n")),
            (CONFIG_FILE, Some(CONFIG)),
            ("deployment/deployment.yaml", Some(DEPLOYMENT)),
        ],
        "the seed's repository layout",
    )?;
    let dir = tempfile::tempdir()?;
    let kas = KasProcess::start(&git, dir.path(), "info", false).await?;
    eprintln!(
        "kas: agents on 127.0.0.1:{}, API on http://127.0.0.1:{}",
        kas.agent_port, kas.api_port
    );

    step("1", "register the agent (createClusterAgent)");
    let answer = graphql(
        &kas,
        &format!(
            r#"mutation createAgent {{
  createClusterAgent(input: {{ projectPath: "{CONFIG_PROJECT}", name: "{AGENT_NAME}" }}) {{
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

    step(
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

    step(
        "3",
        "install agentk: the manifests `agentk generate` prints, then agentk itself",
    );
    let address = format!("ws://127.0.0.1:{}", kas.agent_port);
    let output = Command::new(sibling_binary("agentk")?)
        .args([
            "generate",
            "--agent-token",
            &token,
            "--kas-address",
            &address,
            "--agent-version",
            "stable",
        ])
        .args(["--namespace", "gitlab-kubernetes-agent"])
        .output()?;
    ensure!(output.status.success(), "agentk generate failed");
    let manifests = String::from_utf8(output.stdout)?;
    let objects: Vec<String> = manifests
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
        .collect();
    eprintln!("{}", objects.join(", "));
    // With the cluster (`cargo xtask e2e` starts one), the generated manifests go in with kubectl, as in the
    // article, and agentk applies to that cluster; agentk itself runs here, standing in for the pod.
    let cluster = std::env::var_os("GITOPS_TEST_ENV").map(|_| test_support::env::test_env());
    if let Some(env) = cluster {
        let applied = kubectl(env, &["apply", "-f", "-"], Some(&manifests))?;
        eprint!("{applied}");
    }
    let _agentk = kas.agentk_applying(
        "ws",
        &token,
        false,
        cluster.map(|env| env.kubernetes.kubeconfig.as_path()),
    )?;

    step(
        "4",
        "agentk connects, kas reads .gitlab/agents/gitops/config.yaml from Git and streams it",
    );
    kas.wait_connected(1, Duration::from_secs(30)).await?;
    let check = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ name connected connections {{ connectedAt agentVersion }} configStatus {{ commitId error }} liveInfo {{ configCommitId logLevel }} }} }}"#
    );
    let mut view = Value::Null;
    for _ in 0..40 {
        view = graphql(&kas, &check).await?;
        if view["data"]["clusterAgent"]["liveInfo"]["logLevel"] == "debug" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ensure!(
        view["data"]["clusterAgent"]["liveInfo"]["logLevel"] == "debug",
        "the agent did not apply config.yaml"
    );

    step(
        "4b",
        "change config.yaml in Git; the running agent picks it up by itself",
    );
    let commit = git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some(&CONFIG.replace("level: debug", "level: info")),
        )],
        "quieter logs",
    )?;
    let mut received = false;
    for _ in 0..60 {
        let view = graphql(&kas, &check).await?;
        if view["data"]["clusterAgent"]["liveInfo"]["configCommitId"] == commit.as_str() {
            received = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ensure!(received, "the agent did not receive commit {commit}");
    let Some(env) = cluster else {
        eprintln!(
            "\nSteps 1-4 work. Steps 5-6 need the cluster: run this through `cargo xtask e2e`."
        );
        return Ok(());
    };

    step(
        "5",
        "deployment/deployment.yaml reaches the cluster: nginx-deployment 1/1",
    );
    wait_for_pods(env, 1).await?;
    eprint!(
        "{}",
        kubectl(
            env,
            &["-n", "gitlab-kubernetes-agent", "get", "deploy,pods"],
            None
        )?
    );

    step(
        "6",
        "replicas: 2 in Git; a second nginx pod starts by itself",
    );
    git.commit_files(
        CONFIG_PROJECT,
        &[(
            "deployment/deployment.yaml",
            Some(&DEPLOYMENT.replace("replicas: 1", "replicas: 2")),
        )],
        "two replicas",
    )?;
    wait_for_pods(env, 2).await?;
    eprint!(
        "{}",
        kubectl(
            env,
            &["-n", "gitlab-kubernetes-agent", "get", "deploy,pods"],
            None
        )?
    );
    let sync = graphql(
        &kas,
        &format!(r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ projectId lastSync {{ commitApplied outcome objects {{ resourceKey result }} }} }} }} }}"#),
    )
    .await?;
    ensure!(
        sync.to_string().contains("\"synced\""),
        "kas does not show the sync"
    );
    eprintln!("\nThe seed's workflow, steps 1-6, works.");
    kubectl(
        env,
        &[
            "delete",
            "namespace",
            "gitlab-kubernetes-agent",
            "--wait=false",
        ],
        None,
    )?;
    Ok(())
}

fn kubectl(
    env: &test_support::env::TestEnvState,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<String> {
    let mut command = Command::new(&env.tools.kubectl);
    command.args(args);
    e2e::process::run_against_cluster(command, &env.kubernetes.kubeconfig, stdin)
}

/// Waits until `n` nginx pods are Running (kwok runs them on its fake nodes).
async fn wait_for_pods(env: &test_support::env::TestEnvState, n: usize) -> anyhow::Result<()> {
    for _ in 0..120 {
        let phases = kubectl(
            env,
            &[
                "-n",
                "gitlab-kubernetes-agent",
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
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("{n} nginx pods never became Running")
}
