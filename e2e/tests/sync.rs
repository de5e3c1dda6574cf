//! agentk's sync plumbing with a recording applier standing in for the cluster: only the leader applies,
//! a newer commit cancels the sync in flight, a changed entry is delivered and applied at once, and every
//! sync is reported to kas and shown in GraphQL (also when the report is huge or its date absurd).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use agentk::gitops::{Applier, ApplySettings, BoxFuture, ObjectOutcome, SyncOutcome, SyncRequest};
use e2e::{CONFIG_FILE, CONFIG_PROJECT, Harness, eventually};
use gitops_engine::{ObjectKey, Outcome};
use tokio::sync::watch;

/// Records which commits (and files) it was asked to apply; hangs on `hang_on` as a slow apply would.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<String>>,
    finished: Mutex<Vec<String>>,
    /// The file paths of each apply, in order.
    files: Mutex<Vec<Vec<String>>>,
    hang_on: Mutex<Option<String>>,
}

impl Applier for Recording {
    fn apply<'a>(&'a self, request: SyncRequest<'a>) -> BoxFuture<'a, SyncOutcome> {
        let snapshot = request.snapshot;
        Box::pin(async move {
            self.calls.lock().unwrap().push(snapshot.commit_id.clone());
            self.files
                .lock()
                .unwrap()
                .push(snapshot.files.iter().map(|f| f.path.clone()).collect());
            if self.hang_on.lock().unwrap().as_deref() == Some(snapshot.commit_id.as_str()) {
                std::future::pending::<()>().await;
            }
            self.finished
                .lock()
                .unwrap()
                .push(snapshot.commit_id.clone());
            SyncOutcome {
                objects: snapshot
                    .files
                    .iter()
                    .map(|file| {
                        let resource_key = format!("/ConfigMap/default/{}", file.path);
                        ObjectOutcome {
                            key: ObjectKey::from_resource_key(&resource_key),
                            resource_key,
                            source: format!("{}#0", file.path),
                            result: Outcome::Created,
                            sync_result: format!("configmap/{} created", file.path),
                            health: Some(agentk::gitops::Health::Current),
                            message: String::new(),
                            resource: None,
                        }
                    })
                    .collect(),
                error: None,
            }
        })
    }
}

#[tokio::test]
async fn only_the_leader_applies_newer_commits_cancel_and_syncs_are_reported() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    h.git.create_repo("group/apps", false)?;
    let v1 = h
        .git
        .commit_files("group/apps", &[("a.yaml", Some("kind: ConfigMap\n"))], "v1")?;
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some("gitops:\n  manifest_projects:\n  - id: group/apps\n    paths:\n    - glob: '*.yaml'\n"))],
        "config",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let applier = Arc::new(Recording {
        hang_on: Mutex::new(Some(v1.clone())),
        ..Default::default()
    });
    let (leading_tx, leading) = watch::channel(false);
    let settings = ApplySettings {
        applier: applier.clone(),
        leading,
        resync: Duration::from_secs(3600),
    };
    let agent = h.agent_with(h.client_config("grpc", &secret), Some(settings))?;

    // A follower receives but does not apply.
    eventually(Duration::from_secs(15), "the snapshot", || async {
        Ok(agent
            .gitops
            .borrow()
            .get("group/apps")
            .is_some_and(|p| p.snapshot.is_some()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        applier.calls.lock().unwrap().is_empty(),
        "a follower applied"
    );

    // Leading: v1 starts and hangs; v2 arrives and cancels it.
    leading_tx.send_replace(true);
    eventually(Duration::from_secs(5), "the v1 sync to start", || async {
        Ok(applier.calls.lock().unwrap().len() == 1)
    })
    .await?;
    let v2 = h
        .git
        .commit_files("group/apps", &[("b.yaml", Some("kind: ConfigMap\n"))], "v2")?;
    eventually(Duration::from_secs(10), "the v2 sync", || async {
        Ok(applier.finished.lock().unwrap().contains(&v2))
    })
    .await?;
    assert_eq!(*applier.calls.lock().unwrap(), vec![v1.clone(), v2.clone()]);
    assert!(
        !applier.finished.lock().unwrap().contains(&v1),
        "the v1 sync was not cancelled"
    );

    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ commitSeen commitApplied outcome objects {{ resourceKey result }} }} }} }} }}"#
    );
    eventually(Duration::from_secs(5), "the report in GraphQL", || async {
        let view = h.graphql(&query).await?;
        let sync = &view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"];
        Ok(sync["commitApplied"] == v2.as_str()
            && sync["outcome"] == "synced"
            && sync["objects"].as_array().is_some_and(|o| o.len() == 2))
    })
    .await?;
    agent.shutdown().await;
    Ok(())
}

/// An agent configured with `group/apps` (one ConfigMap file) that has received its snapshot, and a
/// `GitopsStatus` client on the agent's own credential, to report as agentk would.
async fn reporting_agent(
    h: &Harness,
) -> anyhow::Result<(
    String,
    String,
    agentk::RunningAgent,
    gitops_protocol::gitops_status_client::GitopsStatusClient<agentk::KasChannel>,
)> {
    h.git.create_repo("group/apps", false)?;
    let commit =
        h.git
            .commit_files("group/apps", &[("a.yaml", Some("kind: ConfigMap\n"))], "v1")?;
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some("gitops:\n  manifest_projects:\n  - id: group/apps\n    paths:\n    - glob: '*.yaml'\n"))],
        "config",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let agent = h.agent(h.client_config("grpc", &secret))?;
    eventually(Duration::from_secs(15), "the snapshot", || async {
        Ok(agent
            .gitops
            .borrow()
            .get("group/apps")
            .is_some_and(|p| p.snapshot.is_some()))
    })
    .await?;
    let config = h.client_config("grpc", &secret);
    let channel = tonic::service::interceptor::InterceptedService::new(
        config.channel()?,
        config.interceptor()?,
    );
    let client = gitops_protocol::gitops_status_client::GitopsStatusClient::new(channel)
        .max_encoding_message_size(gitops_protocol::MAX_MESSAGE_BYTES);
    Ok((agent_id, commit, agent, client))
}

/// Corpus A15: a report dated at the end of time is stored clamped, and GraphQL still answers.
#[tokio::test]
async fn a_report_from_the_far_future_is_clamped_and_graphql_answers() -> anyhow::Result<()> {
    use gitops_protocol::SyncReport;
    let h = Harness::start(false).await?;
    let (agent_id, commit, agent, mut client) = reporting_agent(&h).await?;
    client
        .report_sync(SyncReport {
            project_id: "group/apps".into(),
            commit_seen: commit.clone(),
            commit_applied: commit.clone(),
            finished_at_unix: i64::MAX,
            outcome: gitops_protocol::SyncOutcome::Synced.into(),
            ..Default::default()
        })
        .await?;
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ finishedAt outcome }} }} }} }}"#
    );
    let view = h.graphql(&query).await?;
    let finished = view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"]["finishedAt"]
        .as_str()
        .map(|s| humantime::parse_rfc3339(s).expect("RFC 3339"))
        .unwrap_or_else(|| panic!("no finishedAt: {view}"));
    let tomorrow = std::time::SystemTime::now() + Duration::from_secs(24 * 3600 + 60);
    assert!(finished <= tomorrow, "not clamped: {view}");
    agent.shutdown().await;
    Ok(())
}

/// Corpus A16: a report of 20,001 objects with 300-byte messages (> 4 MiB) is accepted and kept truncated,
/// with a note.
#[tokio::test]
async fn a_report_of_twenty_thousand_objects_is_accepted_and_truncated() -> anyhow::Result<()> {
    use gitops_protocol::{ObjectStatus, SyncReport};
    let h = Harness::start(false).await?;
    let (agent_id, commit, agent, mut client) = reporting_agent(&h).await?;
    let objects: Vec<ObjectStatus> = (0..20_001)
        .map(|i| ObjectStatus {
            resource_key: format!("/ConfigMap/default/cm-{i}"),
            source: format!("a.yaml#{i}"),
            result: gitops_protocol::ObjectResult::Failed.into(),
            health: gitops_protocol::ObjectHealth::Unspecified.into(),
            message: "x".repeat(300),
        })
        .collect();
    let report = SyncReport {
        project_id: "group/apps".into(),
        commit_seen: commit.clone(),
        commit_applied: String::new(),
        finished_at_unix: 1_700_000_000,
        outcome: gitops_protocol::SyncOutcome::Failed.into(),
        message: "every object failed".into(),
        objects,
    };
    // 20,001 × (300-byte message + key + source) ≈ 7 MiB: above tonic's 4 MiB default.
    client.report_sync(report).await?;
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ message objects {{ resourceKey }} }} }} }} }}"#
    );
    let view = h.graphql(&query).await?;
    let sync = &view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"];
    assert_eq!(sync["objects"].as_array().map(Vec::len), Some(20_000));
    assert!(
        sync["message"]
            .as_str()
            .is_some_and(|m| m.contains("only the first 20000 of 20001 objects")),
        "{sync}"
    );
    agent.shutdown().await;
    Ok(())
}

/// Corpus C8: changing only `paths` (the manifest repository does not move) reaches the agent at once, and
/// the sync loop applies the new selection, never the old one again.
#[tokio::test]
async fn a_changed_selection_is_applied_at_once_when_the_commit_does_not_move() -> anyhow::Result<()>
{
    let h = Harness::start(false).await?;
    h.git.create_repo("group/apps", false)?;
    let commit = h.git.commit_files(
        "group/apps",
        &[
            ("a/one.yaml", Some("kind: ConfigMap\n")),
            ("b/two.yaml", Some("kind: ConfigMap\n")),
        ],
        "v1",
    )?;
    let config = |glob: &str| {
        format!(
            "gitops:\n  manifest_projects:\n  - id: group/apps\n    paths:\n    - glob: '{glob}'\n"
        )
    };
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(&config("a/*.yaml")))],
        "config a",
    )?;
    let (_, _, secret) = h.register_agent().await?;
    let applier = Arc::new(Recording::default());
    let (_leading_tx, leading) = watch::channel(true);
    let settings = ApplySettings {
        applier: applier.clone(),
        leading,
        resync: Duration::from_secs(3600),
    };
    let agent = h.agent_with(h.client_config("grpc", &secret), Some(settings))?;
    eventually(
        Duration::from_secs(15),
        "the a/ selection applied",
        || async {
            Ok(applier.files.lock().unwrap().last() == Some(&vec!["a/one.yaml".to_owned()]))
        },
    )
    .await?;

    h.git.commit_files(
        CONFIG_PROJECT,
        &[(CONFIG_FILE, Some(&config("b/*.yaml")))],
        "config b",
    )?;
    eventually(
        Duration::from_secs(10),
        "the b/ selection applied",
        || async {
            Ok(applier.files.lock().unwrap().last() == Some(&vec!["b/two.yaml".to_owned()]))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = applier.files.lock().unwrap().clone();
    let calls = applier.calls.lock().unwrap().clone();
    assert_eq!(
        files,
        [vec!["a/one.yaml".to_owned()], vec!["b/two.yaml".to_owned()]],
        "after the change, only the new selection is applied"
    );
    assert!(
        calls.iter().all(|c| *c == commit),
        "the commit never moved: {calls:?}"
    );
    let snapshot = agent
        .gitops
        .borrow()
        .get("group/apps")
        .and_then(|p| p.snapshot.clone());
    assert_eq!(snapshot.map(|s| s.files.len()), Some(1));
    agent.shutdown().await;
    Ok(())
}
