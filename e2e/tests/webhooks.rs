//! Instant sync through push webhooks, against the real Gitea: kas polls only once an hour here, so only the
//! webhook can bring a push to the agent quickly. Forged and unsigned webhooks are refused.

use std::time::{Duration, Instant};

use e2e::push_main as push;
use gitops_config::ServerConfig;
use kas::cli::AdminClient;
use test_support::{env::test_env, gitea::Gitea};

fn snapshot_commit(agent: &agentk::RunningAgent, project: &str) -> Option<String> {
    agent
        .gitops
        .borrow()
        .get(project)?
        .snapshot
        .as_ref()
        .map(|s| s.commit_id.clone())
}

#[tokio::test]
async fn a_gitea_push_webhook_syncs_at_once_and_forged_ones_are_refused() -> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    let env = test_env();
    let gitea = Gitea::from_env();
    let config_repo = gitea.create_repository("config").await?;
    let manifests_repo = gitea.create_repository("manifests").await?;
    let config_yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: {}\n    paths:\n    - glob: '/**/*.yaml'\n",
        manifests_repo.full_name
    );
    push(
        &config_repo,
        &[(".gitlab/agents/gitops/config.yaml", &config_yaml)],
        "agent config",
    )
    .await?;
    let first = push(&manifests_repo, &[("cm.yaml", "kind: ConfigMap\n")], "v1").await?;

    let dir = tempfile::tempdir()?;
    let d = dir.path().display();
    std::fs::write(dir.path().join("admin"), "admin")?;
    std::fs::write(dir.path().join("git-password"), &env.gitea.admin_password)?;
    std::fs::write(dir.path().join("webhook-secret"), "hook-secret")?;
    let yaml = format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\ndata_dir: {d}/data\nadmin_token_file: {d}/admin\ngit:\n  base_url: {}\n  username: {}\n  password_file: {d}/git-password\n  poll_period: 1h\nwebhooks:\n  secret_file: {d}/webhook-secret\n",
        env.gitea.url, env.gitea.admin_user
    );
    let kas = kas::start(ServerConfig::parse("kas.yaml", &yaml)?).await?;
    let api = format!("http://{}", kas.api_addr);
    gitea
        .add_push_webhook(
            &manifests_repo,
            &format!("{api}/api/webhooks/gitea"),
            "hook-secret",
        )
        .await?;

    let admin = AdminClient::new(&api, "admin".into());
    let agent = e2e::connect_new_agent(&kas, &admin, &config_repo.full_name).await?;
    let project = manifests_repo.full_name.as_str();
    let deadline = Instant::now() + Duration::from_secs(20);
    while snapshot_commit(&agent, project).as_deref() != Some(first.as_str()) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "first snapshot never arrived: {:?}",
            agent.gitops.borrow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let pushed = Instant::now();
    let second = push(
        &manifests_repo,
        &[("cm.yaml", "kind: ConfigMap\nmetadata: {name: x}\n")],
        "v2",
    )
    .await?;
    while snapshot_commit(&agent, project).as_deref() != Some(second.as_str()) {
        anyhow::ensure!(
            pushed.elapsed() < Duration::from_secs(15),
            "the push did not reach the agent (poll period is 1h)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("push -> agent has the new snapshot: {:?}", pushed.elapsed());

    let http = reqwest::Client::new();
    let body = format!(r#"{{"repository":{{"full_name":"{project}"}}}}"#);
    let forged = http
        .post(format!("{api}/api/webhooks/gitea"))
        .header("x-gitea-event", "push")
        .header("x-gitea-signature", "00".repeat(32))
        .body(body.clone())
        .send()
        .await?;
    assert_eq!(forged.status(), 401);
    let unsigned = http
        .post(format!("{api}/api/webhooks/github"))
        .header("x-github-event", "push")
        .body(body)
        .send()
        .await?;
    assert_eq!(unsigned.status(), 401);
    assert!(unsigned.text().await?.contains("x-hub-signature-256"));

    agent.shutdown().await;
    kas.shutdown().await;
    gitea.delete_repository(&config_repo).await?;
    gitea.delete_repository(&manifests_repo).await?;
    Ok(())
}
