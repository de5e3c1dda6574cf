//! Manifest delivery (the kas half of GitOps): the files an agent's `paths` select, from private projects of
//! its owner or granted ones, at the commit its `ref` names, as complete snapshots.

use std::time::Duration;

use agentk::{RunningAgent, gitops::GitopsState};
use e2e::{CONFIG_FILE, CONFIG_PROJECT, Harness, eventually};

async fn wait_gitops(
    agent: &RunningAgent,
    what: &str,
    check: impl Fn(&GitopsState) -> bool,
) -> anyhow::Result<GitopsState> {
    let mut rx = agent.gitops.clone();
    match tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|s| check(s))).await {
        Ok(Ok(state)) => Ok(state.clone()),
        _ => anyhow::bail!(
            "agent never reached {what}; gitops state: {:?}",
            agent.gitops.borrow()
        ),
    }
}

fn commit_of(state: &GitopsState, project: &str) -> Option<String> {
    state
        .get(project)?
        .snapshot
        .as_ref()
        .map(|s| s.commit_id.clone())
}

fn paths_of(state: &GitopsState, project: &str) -> Vec<String> {
    state
        .get(project)
        .and_then(|p| p.snapshot.as_ref())
        .map(|s| s.files.iter().map(|f| f.path.clone()).collect())
        .unwrap_or_default()
}

/// Points the agent's `config.yaml` at `entries`, registers the agent and starts it over `scheme`.
async fn configured_agent(
    h: &Harness,
    entries: &str,
    scheme: &str,
) -> anyhow::Result<(String, RunningAgent)> {
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(&config(entries)))],
        "config",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    Ok((agent_id, h.agent(h.client_config(scheme, &secret))?))
}

fn config(entries: &str) -> String {
    format!("gitops:\n  manifest_projects:\n{entries}")
}

#[tokio::test]
async fn private_project_of_the_same_owner_is_delivered_and_follows_its_branch()
-> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    let first = h.git.commit_files(
        "group/manifests",
        &[
            ("README.md", Some("# not a manifest\n")),
            ("deployment/deployment.yaml", Some("kind: Deployment\n")),
            ("apps/a.yml", Some("kind: ConfigMap\n")),
            (".gitlab/ci.yaml", Some("not: a manifest\n")),
        ],
        "manifests",
    )?;
    let (agent_id, agent) = configured_agent(
        &h,
        "  - id: group/manifests\n    paths:\n    - glob: '/**/*.{yaml,yml}'\n",
        "ws",
    )
    .await?;
    let state = wait_gitops(&agent, "the first snapshot", |s| {
        commit_of(s, "group/manifests").as_deref() == Some(first.as_str())
    })
    .await?;
    assert_eq!(
        paths_of(&state, "group/manifests"),
        vec!["apps/a.yml", "deployment/deployment.yaml"]
    );

    let second = h.git.commit_files(
        "group/manifests",
        &[
            ("apps/a.yml", None),
            ("apps/b.yaml", Some("kind: Service\n")),
        ],
        "change",
    )?;
    let state = wait_gitops(&agent, "the second snapshot", |s| {
        commit_of(s, "group/manifests").as_deref() == Some(second.as_str())
    })
    .await?;
    assert_eq!(
        paths_of(&state, "group/manifests"),
        vec!["apps/b.yaml", "deployment/deployment.yaml"]
    );

    let view = h.graphql(&format!(r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ projectId commitSeen commitSent error }} }} }}"#)).await?;
    let status = &view["data"]["clusterAgent"]["manifestProjects"][0];
    assert_eq!(status["projectId"], "group/manifests");
    assert_eq!(status["commitSent"], second.as_str(), "{view}");
    assert!(status["error"].is_null());
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_project_of_another_owner_is_refused_until_granted() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("other/manifests", true)?;
    let commit = h.git.commit_files(
        "other/manifests",
        &[("cm.yaml", Some("kind: ConfigMap\n"))],
        "manifests",
    )?;
    let (agent_id, agent) = configured_agent(
        &h,
        "  - id: other/manifests\n    paths:\n    - glob: '*.yaml'\n",
        "grpc",
    )
    .await?;
    let state = wait_gitops(&agent, "the refusal", |s| {
        s.get("other/manifests").is_some_and(|p| p.error.is_some())
    })
    .await?;
    let error = state
        .get("other/manifests")
        .expect("other/manifests")
        .error
        .clone()
        .unwrap();
    assert!(
        error.contains("\"other/manifests\"") && error.contains("may not read"),
        "{error}"
    );
    assert!(
        state
            .get("other/manifests")
            .expect("other/manifests")
            .snapshot
            .is_none()
    );
    let listing = h.admin.list_agents(None).await?;
    assert!(
        listing[0]["manifestProjects"][0]["error"]
            .as_str()
            .unwrap()
            .contains("may not read"),
        "{listing}"
    );

    h.admin.grant_project(&agent_id, "other/manifests").await?;
    wait_gitops(&agent, "delivery after the grant", |s| {
        commit_of(s, "other/manifests").as_deref() == Some(commit.as_str())
    })
    .await?;
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_pinned_commit_is_sent_once_and_never_polled_again() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/pinned", false)?;
    let pinned = h.git.commit_files(
        "group/pinned",
        &[("a.yaml", Some("kind: ConfigMap\n"))],
        "v1",
    )?;
    h.git.commit_files(
        "group/pinned",
        &[("b.yaml", Some("kind: ConfigMap\n"))],
        "v2",
    )?;
    let entry = format!(
        "  - id: group/pinned\n    ref:\n      commit: {pinned}\n    paths:\n    - glob: '*.yaml'\n"
    );
    let (_, agent) = configured_agent(&h, &entry, "grpc").await?;
    let state = wait_gitops(&agent, "the pinned snapshot", |s| {
        commit_of(s, "group/pinned").is_some()
    })
    .await?;
    assert_eq!(
        commit_of(&state, "group/pinned").as_deref(),
        Some(pinned.as_str())
    );
    assert_eq!(paths_of(&state, "group/pinned"), vec!["a.yaml"]);

    h.git.reset_request_count("group/pinned");
    h.git.commit_files(
        "group/pinned",
        &[("c.yaml", Some("kind: ConfigMap\n"))],
        "v3",
    )?;
    tokio::time::sleep(Duration::from_secs(3)).await; // three poll periods
    let counts = h.git.request_count("group/pinned");
    assert_eq!(
        (counts.ls_refs, counts.fetches),
        (0, 0),
        "a pinned commit was polled: {counts:?}"
    );
    assert_eq!(
        commit_of(&agent.gitops.borrow(), "group/pinned").as_deref(),
        Some(pinned.as_str())
    );
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn tags_and_branches_are_followed() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/refs", false)?;
    let tagged =
        h.git
            .commit_files("group/refs", &[("a.yaml", Some("kind: ConfigMap\n"))], "v1")?;
    h.git.create_tag("group/refs", "v1.0.0", &tagged, true)?;
    let staging = h.git.commit_files_to_branch(
        "group/refs",
        "staging",
        &[("s.yaml", Some("kind: ConfigMap\n"))],
        "staging",
    )?;
    h.git.commit_files(
        "group/refs",
        &[("main-only.yaml", Some("kind: ConfigMap\n"))],
        "main moves on",
    )?;
    let entries =
        "  - id: group/refs\n    ref:\n      tag: v1.0.0\n    paths:\n    - glob: '*.yaml'\n";
    let (_, agent) = configured_agent(&h, entries, "grpc").await?;
    let state = wait_gitops(&agent, "the tag", |s| commit_of(s, "group/refs").is_some()).await?;
    assert_eq!(
        commit_of(&state, "group/refs").as_deref(),
        Some(tagged.as_str())
    );

    let entries =
        "  - id: group/refs\n    ref:\n      branch: staging\n    paths:\n    - glob: '*.yaml'\n";
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(&config(entries)))],
        "follow staging",
    )?;
    wait_gitops(&agent, "the branch", |s| {
        commit_of(s, "group/refs").as_deref() == Some(staging.as_str())
    })
    .await?;
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_limit_breach_is_reported_and_the_last_snapshot_is_kept() -> anyhow::Result<()> {
    let h = Harness::start(false).await?;
    h.git.create_repo("group/big", false)?;
    let good = h.git.commit_files(
        "group/big",
        &[("ok.yaml", Some("kind: ConfigMap\n"))],
        "fine",
    )?;
    let (_, agent) = configured_agent(
        &h,
        "  - id: group/big\n    paths:\n    - glob: '*.yaml'\n",
        "grpc",
    )
    .await?;
    wait_gitops(&agent, "the first snapshot", |s| {
        commit_of(s, "group/big").as_deref() == Some(good.as_str())
    })
    .await?;

    let huge = format!(
        "kind: ConfigMap\ndata:\n  x: \"{}\"\n",
        "x".repeat(2 * 1024 * 1024)
    );
    h.git
        .commit_files("group/big", &[("huge.yaml", Some(&huge))], "too big")?;
    let state = wait_gitops(&agent, "the limit error", |s| {
        s.get("group/big").is_some_and(|p| p.error.is_some())
    })
    .await?;
    let error = state
        .get("group/big")
        .expect("group/big")
        .error
        .clone()
        .unwrap();
    assert!(
        error.contains("huge.yaml") && error.contains("max_file_size"),
        "{error}"
    );
    assert_eq!(
        commit_of(&state, "group/big").as_deref(),
        Some(good.as_str()),
        "the last good snapshot stays"
    );
    eventually(Duration::from_secs(5), "the error in GraphQL", || async {
        let listing = h.admin.list_agents(None).await?;
        Ok(listing[0]["manifestProjects"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("max_file_size")))
    })
    .await?;
    agent.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn sync_reports_are_kept_per_project_and_shown_with_their_objects() -> anyhow::Result<()> {
    use gitops_protocol::{ObjectStatus, SyncReport, gitops_status_client::GitopsStatusClient};

    let mut h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    let commit = h.git.commit_files(
        "group/manifests",
        &[("cm.yaml", Some("kind: ConfigMap\n"))],
        "manifests",
    )?;
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some(&config(
                "  - id: group/manifests\n    paths:\n    - glob: '*.yaml'\n",
            )),
        )],
        "config",
    )?;
    // This test also reports over its own connection, so it needs the secret itself.
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    wait_gitops(&agent, "the snapshot", |s| {
        commit_of(s, "group/manifests").is_some()
    })
    .await?;

    // What agentk sends after applying (the engine's job); here sent directly over an agent connection.
    let client_config = h.client_config("grpc", &secret);
    let channel = client_config.channel()?;
    let mut client = GitopsStatusClient::with_interceptor(channel, client_config.interceptor()?);
    let report = SyncReport {
        project_id: "group/manifests".into(),
        commit_seen: commit.clone(),
        commit_applied: commit.clone(),
        finished_at_unix: 1_700_000_000,
        outcome: gitops_protocol::SyncOutcome::Synced.into(),
        message: "1 object applied".into(),
        objects: vec![ObjectStatus {
            resource_key: "/ConfigMap/default/cm".into(),
            source: "cm.yaml#0".into(),
            result: gitops_protocol::ObjectResult::Created.into(),
            health: gitops_protocol::ObjectHealth::Current.into(),
            message: String::new(),
        }],
    };
    client.report_sync(report.clone()).await?;
    let refused = client
        .report_sync(SyncReport {
            project_id: "other/secret".into(),
            ..report
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ projectId lastSync {{ commitApplied outcome objects {{ resourceKey source result health }} }} }} }} }}"#
    );
    let check = |view: serde_json::Value| {
        let sync = view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"].clone();
        assert_eq!(sync["commitApplied"], commit.as_str(), "{view}");
        assert_eq!(sync["outcome"], "synced");
        assert_eq!(sync["objects"][0]["resourceKey"], "/ConfigMap/default/cm");
        assert_eq!(sync["objects"][0]["health"], "Current");
    };
    check(h.graphql(&query).await?);
    agent.shutdown().await;
    // Kept across a restart.
    h.restart_kas().await?;
    check(h.graphql(&query).await?);
    Ok(())
}
