//! Steps 1-4 of the seed, end to end on loopback: registration through GraphQL, agentk connecting over each
//! scheme, tokens, configuration from Git, and bad input.

use std::time::Duration;

use e2e::{AGENT_NAME, CONFIG_FILE, CONFIG_PROJECT, Harness, eventually, wait_for_state};
use gitops_config::agent::LogLevel;

/// The seed README's documents, character for character.
const SEED_CREATE_AGENT: &str = r#"mutation createAgent {
  # agent-name should be the same as specified above in the config.yaml
  createClusterAgent(input: { projectPath: "your-configuration-project-path", name: "agent-name-you-specified-in-config.yaml" }) {
    clusterAgent { id name }
    errors
  }
}"#;

const SEED_CREATE_TOKEN: &str = r#"mutation createToken {
  clusterAgentTokenCreate(input: { clusterAgentId: "gid://gitlab/Clusters::Agent/43", description: "GitLab Kubernetes Agent Server Demo", name: "gitops" }) {
    secret # This is the value you need to use on the next step
    token { createdAt id }
    errors
  }
}"#;

const SEED_CONFIG: &str = "gitops:\n  manifest_projects:\n  - id: \"path/of/the/project/that/holds/the/manifests\"\n    paths:\n    - glob: '/**/*.yaml'\nobservability:\n  logging:\n    level: debug\n";

#[tokio::test]
async fn seed_graphql_documents_register_an_agent_and_mint_a_token() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;

    // Verbatim, the placeholders are user mistakes: answered in `errors`, not as a failed request.
    let answer = h.graphql(SEED_CREATE_AGENT).await?;
    assert!(answer.get("errors").is_none(), "{answer}");
    let payload = &answer["data"]["createClusterAgent"];
    assert!(payload["clusterAgent"].is_null());
    assert!(
        payload["errors"][0].as_str().unwrap().contains("DNS label"),
        "{payload}"
    );
    let answer = h.graphql(SEED_CREATE_TOKEN).await?;
    assert!(
        answer["data"]["clusterAgentTokenCreate"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("agent 43 does not exist"),
        "{answer}"
    );

    // The same documents with real values, as a user fills them in.
    let create = SEED_CREATE_AGENT
        .replace("your-configuration-project-path", CONFIG_PROJECT)
        .replace("agent-name-you-specified-in-config.yaml", AGENT_NAME);
    let answer = h.graphql(&create).await?;
    let agent = &answer["data"]["createClusterAgent"];
    assert_eq!(agent["errors"], serde_json::json!([]), "{answer}");
    assert_eq!(agent["clusterAgent"]["name"], AGENT_NAME);
    let agent_id = agent["clusterAgent"]["id"].as_str().unwrap().to_owned();
    assert!(
        agent_id.starts_with("gid://kas/Clusters::Agent/"),
        "{agent_id}"
    );

    let answer = h
        .graphql(&SEED_CREATE_TOKEN.replace("gid://gitlab/Clusters::Agent/43", &agent_id))
        .await?;
    let token = &answer["data"]["clusterAgentTokenCreate"];
    assert_eq!(token["errors"], serde_json::json!([]), "{answer}");
    let secret = token["secret"].as_str().unwrap();
    assert!(
        secret.starts_with("kasagent_") && secret.len() >= 9 + 43,
        "{secret}"
    );
    assert!(
        token["token"]["id"]
            .as_str()
            .unwrap()
            .starts_with("gid://kas/Clusters::AgentToken/")
    );
    assert!(token["token"]["createdAt"].as_str().unwrap().ends_with('Z'));

    // Same name again, an unknown project: errors, not failures.
    let again = h.graphql(&create).await?;
    assert!(
        again["data"]["createClusterAgent"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("already exists"),
        "{again}"
    );
    let unknown = h
        .graphql(&create.replace(CONFIG_PROJECT, "group/nope"))
        .await?;
    assert!(
        unknown["data"]["createClusterAgent"]["errors"][0]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{unknown}"
    );

    // The secret is never shown again, and never stored: listing shows tokens without it.
    let listing = h
        .graphql("{ clusterAgents { tokens { id name description revoked } } }")
        .await?;
    assert!(!listing.to_string().contains(secret));
    assert_eq!(
        listing["data"]["clusterAgents"][0]["tokens"][0]["description"],
        "GitLab Kubernetes Agent Server Demo"
    );
    let db = std::fs::read(h.data_dir().join("kas.redb"))?;
    assert!(
        !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "secret found in the database file"
    );

    // A third active token is refused (at most two), revoking one frees a slot.
    h.admin.create_token(&agent_id, "second", "").await?;
    let third = h
        .admin
        .create_token(&agent_id, "third", "")
        .await
        .unwrap_err();
    assert!(third.to_string().contains("2 active tokens"), "{third}");
    Ok(())
}

#[tokio::test]
async fn admin_api_needs_the_admin_credential_and_refuses_oversized_documents() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    let url = format!("http://{}/api/graphql", h.kas().api_addr);
    let http = reqwest::Client::new();
    let body = serde_json::json!({ "query": "{ clusterAgents { id } }" });
    let anonymous = http.post(&url).json(&body).send().await?;
    assert_eq!(anonymous.status(), 401);
    let wrong = http
        .post(&url)
        .bearer_auth("nope")
        .json(&body)
        .send()
        .await?;
    assert_eq!(wrong.status(), 401);
    let huge = serde_json::json!({ "query": format!("{{ clusterAgents {{ id }} }} #{}", "x".repeat(100_000)) });
    let oversized = http
        .post(&url)
        .bearer_auth(&h.admin_token)
        .json(&huge)
        .send()
        .await?;
    assert_eq!(oversized.status(), 413);
    // The explorer URL leads to the dashboard (its query page replaced GraphiQL), and kas still answers.
    let explorer = http
        .get(format!("http://{}/-/graphql-explorer", h.kas().api_addr))
        .send()
        .await?;
    assert!(explorer.text().await?.contains("/dashboard/assets/app.js"));
    assert_eq!(
        h.graphql("{ clusterAgents { id } }").await?["data"]["clusterAgents"],
        serde_json::json!([])
    );
    Ok(())
}

/// Connects over `scheme`, receives the configuration from Git, and answers a reverse call.
async fn connect_over(scheme: &str, tls: bool) -> anyhow::Result<()> {
    let h = Harness::start(tls).await?;
    let commit = h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(SEED_CONFIG))],
        "agent config",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config(scheme, &secret))?;
    let state = wait_for_state(
        &agent,
        Duration::from_secs(20),
        "the seed configuration",
        |s| s.commit_id == commit,
    )
    .await?;
    let config = state.config.unwrap();
    assert_eq!(
        config.gitops.manifest_projects[0].id,
        "path/of/the/project/that/holds/the/manifests"
    );
    assert_eq!(config.observability.logging.level, LogLevel::Debug);

    let view = h.agent_view(&agent_id).await?;
    assert_eq!(view["connected"], true, "{view}");
    assert_eq!(view["connections"][0]["agentVersion"], agentk::VERSION);
    assert_eq!(view["connections"][0]["podName"], "agentk-test");
    assert_eq!(view["configStatus"]["commitId"], commit.as_str());

    // kas → agentk through the reverse tunnel.
    let live = h.graphql(&format!(r#"{{ clusterAgent(id: "{agent_id}") {{ liveInfo {{ version configCommitId logLevel }} }} }}"#)).await?;
    let live = &live["data"]["clusterAgent"]["liveInfo"];
    assert_eq!(live["configCommitId"], commit.as_str(), "{live}");
    assert_eq!(live["logLevel"], "debug");
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn connects_over_grpc() -> anyhow::Result<()> {
    connect_over("grpc", false).await
}

#[tokio::test]
async fn connects_over_grpcs() -> anyhow::Result<()> {
    connect_over("grpcs", true).await
}

#[tokio::test]
async fn connects_over_ws() -> anyhow::Result<()> {
    connect_over("ws", false).await
}

#[tokio::test]
async fn connects_over_wss() -> anyhow::Result<()> {
    connect_over("wss", true).await
}

#[tokio::test]
async fn wrong_token_never_connects() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    let (agent_id, _, _) = h.register_agent().await?;
    for scheme in ["grpc", "ws"] {
        let agent = h.agent(h.client_config(
            scheme,
            "kasagent_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ))?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !agent.state.borrow().connected,
            "{scheme}: a wrong token connected"
        );
        assert!(agent.state.borrow().config.is_none());
        agent.shutdown().await;
    }
    assert_eq!(h.agent_view(&agent_id).await?["connected"], false);
    Ok(())
}

#[tokio::test]
async fn revoking_a_token_disconnects_its_agent_within_a_second() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    let (agent_id, token_id, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("ws", &secret))?;
    wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
        s.connected && !s.commit_id.is_empty()
    })
    .await?;
    let numeric: u64 = agent_id.rsplit('/').next().unwrap().parse()?;
    eventually(Duration::from_secs(5), "reverse tunnels", || async {
        Ok(h.kas().state.tunnels.count(&numeric) == 2)
    })
    .await?;

    let started = std::time::Instant::now();
    h.admin.revoke_token(&token_id).await?;
    wait_for_state(&agent, Duration::from_secs(1), "disconnected", |s| {
        !s.connected
    })
    .await?;
    eventually(Duration::from_secs(1), "tunnels closed", || async {
        Ok(h.kas().state.tunnels.count(&numeric) == 0)
    })
    .await?;
    let view = h.agent_view(&agent_id).await?;
    assert_eq!(view["connected"], false, "{view}");
    assert_eq!(view["tokens"][0]["revoked"], true);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    // And it stays out.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!agent.state.borrow().connected);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn kas_restart_keeps_agents_and_tokens_and_the_agent_reconnects() -> anyhow::Result<()> {
    let mut h = Harness::start(false).await?;
    let commit = h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(SEED_CONFIG))],
        "agent config",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    wait_for_state(&agent, Duration::from_secs(20), "configured", |s| {
        s.commit_id == commit
    })
    .await?;

    h.restart_kas().await?;
    wait_for_state(
        &agent,
        Duration::from_secs(5),
        "disconnected by the restart",
        |s| !s.connected,
    )
    .await
    .ok();
    wait_for_state(&agent, Duration::from_secs(20), "reconnected", |s| {
        s.connected
    })
    .await?;
    let view = h.agent_view(&agent_id).await?;
    assert_eq!(view["name"], AGENT_NAME, "the agent survived: {view}");
    assert_eq!(view["connected"], true, "the token survived: {view}");
    assert_eq!(
        view["configStatus"]["commitId"],
        commit.as_str(),
        "the status survived: {view}"
    );
    // Resumed by commit: the agent still runs the same configuration.
    assert_eq!(agent.state.borrow().commit_id, commit);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn configuration_changes_reach_a_connected_agent_and_bad_ones_are_reported()
-> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    // No config file yet: an empty configuration.
    let first = wait_for_state(
        &agent,
        Duration::from_secs(20),
        "the empty configuration",
        |s| s.config.is_some(),
    )
    .await?;
    assert!(first.config.unwrap().gitops.manifest_projects.is_empty());

    let good = h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(SEED_CONFIG))],
        "configure",
    )?;
    let state = wait_for_state(&agent, Duration::from_secs(10), "the new commit", |s| {
        s.commit_id == good
    })
    .await?;
    assert_eq!(
        state.config.unwrap().observability.logging.level,
        LogLevel::Debug
    );

    // A typo: the agent keeps the last good configuration; kas names the key and line.
    let typo = SEED_CONFIG.replace("    paths:", "    pathz:");
    let bad = h
        .git
        .commit_files(CONFIG_PROJECT, &[(CONFIG_FILE, Some(&typo))], "typo")?;
    let state = wait_for_state(&agent, Duration::from_secs(10), "the error report", |s| {
        s.config_error.is_some()
    })
    .await?;
    assert_eq!(state.commit_id, good, "kept the last good configuration");
    assert!(state.config_error.as_deref().unwrap().contains("pathz"));
    let view = h.agent_view(&agent_id).await?;
    let error = view["configStatus"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(CONFIG_FILE) && error.contains("pathz") && error.contains(":4:"),
        "{view}"
    );
    assert_eq!(view["configStatus"]["commitId"], bad.as_str());

    // Fixed again: delivered, error cleared.
    let fixed = h.git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some("observability:\n  logging:\n    level: warn\n"),
        )],
        "fix",
    )?;
    let state = wait_for_state(&agent, Duration::from_secs(10), "the fix", |s| {
        s.commit_id == fixed
    })
    .await?;
    assert!(state.config_error.is_none());
    assert!(h.agent_view(&agent_id).await?["configStatus"]["error"].is_null());
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn garbage_on_the_agent_port_does_not_disturb_connected_agents() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = Harness::start(false).await?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("ws", &secret))?;
    wait_for_state(&agent, Duration::from_secs(20), "connected", |s| {
        s.connected
    })
    .await?;
    let port = h.kas().agent_addr;

    // Random bytes: the connection is closed.
    let mut junk = tokio::net::TcpStream::connect(port).await?;
    junk.write_all(&[
        0x16, 0x03, 0x01, 0xff, 0x00, 0xde, 0xad, 0xbe, 0xef, b'\r', b'\n', b'\r', b'\n',
    ])
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut buf)).await??;

    // Plain HTTP/1.1 and a WebSocket without our subprotocol: a clean 400.
    let http = reqwest::Client::new();
    let plain = http.get(format!("http://{port}/")).send().await?;
    assert_eq!(plain.status(), 400);
    let ws = http
        .get(format!("http://{port}/agentk"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await?;
    assert_eq!(ws.status(), 400);
    assert!(ws.text().await?.contains("subprotocol"));

    // The agent never noticed.
    assert!(agent.state.borrow().connected);
    assert_eq!(h.agent_view(&agent_id).await?["connected"], true);
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_git_outage_is_reported_on_the_agent_and_clears_when_git_is_back() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    let commit = h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(SEED_CONFIG))],
        "configure",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    wait_for_state(&agent, Duration::from_secs(20), "configured", |s| {
        s.commit_id == commit
    })
    .await?;

    let repo = h.git.repo_dir(CONFIG_PROJECT);
    let hidden = repo.with_extension("hidden");
    std::fs::rename(&repo, &hidden)?;
    eventually(
        Duration::from_secs(10),
        "the outage on the agent",
        || async {
            let view = h.agent_view(&agent_id).await?;
            Ok(view["configStatus"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(CONFIG_PROJECT)))
        },
    )
    .await?;
    assert_eq!(
        agent.state.borrow().commit_id,
        commit,
        "the agent keeps running its configuration"
    );

    std::fs::rename(&hidden, &repo)?;
    eventually(Duration::from_secs(10), "the error cleared", || async {
        let view = h.agent_view(&agent_id).await?;
        Ok(view["configStatus"]["error"].is_null()
            && view["configStatus"]["commitId"] == commit.as_str())
    })
    .await?;
    agent.shutdown().await;
    Ok(())
}
