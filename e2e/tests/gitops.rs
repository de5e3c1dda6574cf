//! The seed's steps 5 and 6 against the real apiserver: manifests in Git applied by agentk through the engine,
//! a replicas change reaching the cluster by itself, a file deleted from Git pruned, every sync reported.

use std::{sync::Arc, time::Duration};

use agentk::{apply::EngineApplier, gitops::ApplySettings};
use e2e::{CONFIG_FILE, CONFIG_PROJECT, Harness, eventually};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Pod},
};
use kube::api::{Api, ListParams};
use test_support::cluster::{TestNamespace, install_crypto_provider};
use tokio::sync::watch;

fn deployment(ns: &str, replicas: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: nginx-deployment\n  namespace: {ns}\nspec:\n  selector:\n    matchLabels:\n      app: nginx\n  replicas: {replicas}\n  template:\n    metadata:\n      labels:\n        app: nginx\n    spec:\n      containers:\n      - name: nginx\n        image: nginx:1.14.2\n        ports:\n        - containerPort: 80\n"
    )
}

async fn running_pods(pods: &Api<Pod>) -> anyhow::Result<usize> {
    let list = pods
        .list(&ListParams::default().labels("app=nginx"))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count())
}

/// Configures `group/manifests` (all YAML files, `default_namespace` the test's), registers the agent and
/// starts it with the engine, applying into `ns`, re-checking for drift every `drift_check`.
async fn start_agent(
    h: &Harness,
    ns: &TestNamespace,
    drift_check: Duration,
) -> anyhow::Result<(String, agentk::RunningAgent)> {
    let config = format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {}\n    paths:\n    - glob: '/**/*.yaml'\n",
        ns.name
    );
    h.git
        .commit_files(CONFIG_PROJECT, &[(CONFIG_FILE, Some(&config))], "config")?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let applier = EngineApplier::new(
        ns.client.clone(),
        ns.name.clone(),
        test_support::env::test_env().kubernetes.server.clone(),
    );
    // One replica, no election: the sender is gone at once, as in agentk's main (a regression once).
    let leading = watch::channel(true).1;
    let settings = ApplySettings {
        applier: Arc::new(applier),
        leading,
        resync: drift_check,
    };
    let agent = h.agent_with(h.client_config("grpc", &secret), Some(settings))?;
    Ok((agent_id, agent))
}

fn configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  value: {value}\n")
}

/// The objects of the last sync in GraphQL, as `resourceKey → (result, message)`, and its outcome.
async fn last_sync(
    h: &Harness,
    agent_id: &str,
) -> anyhow::Result<(String, std::collections::BTreeMap<String, (String, String)>)> {
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ outcome objects {{ resourceKey result message }} }} }} }} }}"#
    );
    let view = h.graphql(&query).await?;
    let sync = &view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"];
    let objects = sync["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            let text = |k: &str| o[k].as_str().unwrap_or_default().to_owned();
            (text("resourceKey"), (text("result"), text("message")))
        })
        .collect();
    Ok((
        sync["outcome"].as_str().unwrap_or_default().to_owned(),
        objects,
    ))
}

/// An object someone else created is not taken over (`must_match`) and not pruned; a renamed object is
/// created under its new name and the old one pruned; drift is put back by the periodic check.
#[tokio::test]
async fn conflicts_are_refused_renames_prune_the_old_name_and_drift_is_corrected()
-> anyhow::Result<()> {
    install_crypto_provider();
    let ns = TestNamespace::create("gitops-rename").await?;
    let configmaps: Api<ConfigMap> = ns.api();
    // Someone else's object, in the way of one in Git.
    configmaps
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "taken"}, "data": {"value": "theirs"}
            }))?,
        )
        .await?;
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    h.git.commit_files(
        "group/manifests",
        &[
            ("alpha.yaml", Some(&configmap("alpha", "one"))),
            ("taken.yaml", Some(&configmap("taken", "ours"))),
        ],
        "alpha and taken",
    )?;
    let (agent_id, agent) = start_agent(&h, &ns, Duration::from_secs(1)).await?;
    let n = &ns.name;
    eventually(
        Duration::from_secs(30),
        "alpha created, taken refused",
        || async {
            let (outcome, objects) = last_sync(&h, &agent_id).await?;
            let taken = objects.get(&format!("/ConfigMap/{n}/taken"));
            Ok(outcome == "partial"
                && objects
                    .get(&format!("/ConfigMap/{n}/alpha"))
                    .map(|o| o.0.as_str())
                    == Some("created")
                && taken.is_some_and(|(result, message)| {
                    result == "failed" && message.contains("inventory_policy must_match")
                }))
        },
    )
    .await?;
    assert_eq!(
        configmaps.get("taken").await?.data.unwrap()["value"],
        "theirs",
        "not taken over"
    );

    // Rename alpha to beta and give up on taken: beta created, alpha pruned, taken (never ours) kept.
    h.git.commit_files(
        "group/manifests",
        &[
            ("alpha.yaml", None),
            ("beta.yaml", Some(&configmap("beta", "one"))),
            ("taken.yaml", None),
        ],
        "rename alpha to beta",
    )?;
    eventually(
        Duration::from_secs(30),
        "beta created, alpha pruned",
        || async {
            Ok(configmaps.get_opt("beta").await?.is_some()
                && configmaps.get_opt("alpha").await?.is_none())
        },
    )
    .await?;
    // The report follows the apply.
    eventually(Duration::from_secs(10), "the rename reported", || async {
        let (outcome, objects) = last_sync(&h, &agent_id).await?;
        Ok(outcome == "synced"
            && objects
                .get(&format!("/ConfigMap/{n}/alpha"))
                .map(|o| o.0.as_str())
                == Some("pruned"))
    })
    .await?;
    assert!(
        configmaps.get_opt("taken").await?.is_some(),
        "not ours: never pruned"
    );

    // Drift: someone edits beta; the periodic check (every second here) puts it back.
    let mut edited = configmaps.get("beta").await?;
    edited
        .data
        .get_or_insert_default()
        .insert("value".into(), "drifted".into());
    configmaps
        .replace("beta", &Default::default(), &edited)
        .await?;
    eventually(Duration::from_secs(30), "the drift put back", || async {
        Ok(configmaps.get("beta").await?.data.unwrap_or_default()["value"] == "one")
    })
    .await?;
    agent.shutdown().await;
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn manifests_in_git_reach_the_cluster_and_changes_follow_by_themselves() -> anyhow::Result<()>
{
    install_crypto_provider();
    let ns = TestNamespace::create("gitops").await?;
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    h.git.commit_files(
        "group/manifests",
        &[
            ("deployment/deployment.yaml", Some(&deployment(&ns.name, 1))),
            ("config/settings.yaml", Some("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  color: blue\n")),
            ("README.md", Some("# manifests\n")),
        ],
        "the seed's manifest",
    )?;
    let (agent_id, agent) = start_agent(&h, &ns, Duration::from_secs(3600)).await?;

    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    let configmaps: Api<ConfigMap> = ns.api();
    eventually(
        Duration::from_secs(30),
        "nginx-deployment with 1 Running pod",
        || async {
            Ok(deployments.get_opt("nginx-deployment").await?.is_some()
                && running_pods(&pods).await? == 1)
        },
    )
    .await?;
    assert_eq!(
        configmaps.get("settings").await?.data.unwrap()["color"],
        "blue",
        "default_namespace applied"
    );

    // Step 6: replicas 1 → 2 in Git; a second pod comes up by itself.
    h.git.commit_files(
        "group/manifests",
        &[("deployment/deployment.yaml", Some(&deployment(&ns.name, 2)))],
        "scale",
    )?;
    eventually(Duration::from_secs(30), "2 Running pods", || async {
        Ok(running_pods(&pods).await? == 2)
    })
    .await?;

    // A file deleted from Git: its object is pruned.
    let last = h.git.commit_files(
        "group/manifests",
        &[("config/settings.yaml", None)],
        "drop settings",
    )?;
    eventually(Duration::from_secs(30), "the ConfigMap pruned", || async {
        Ok(configmaps.get_opt("settings").await?.is_none())
    })
    .await?;

    // kas shows what happened.
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ commitApplied outcome objects {{ resourceKey result health }} }} }} }} }}"#
    );
    eventually(
        Duration::from_secs(10),
        "the last sync in GraphQL",
        || async {
            let view = h.graphql(&query).await?;
            let sync = &view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"];
            let pruned = sync["objects"].as_array().is_some_and(|objects| {
                objects.iter().any(|o| {
                    o["resourceKey"] == format!("/ConfigMap/{}/settings", ns.name)
                        && o["result"] == "pruned"
                })
            });
            // The Deployment waited for (kstatus): 2 of 2 replicas ready.
            let healthy = sync["objects"].as_array().is_some_and(|objects| {
                objects.iter().any(|o| {
                    o["resourceKey"] == format!("apps/Deployment/{}/nginx-deployment", ns.name)
                        && o["health"] == "Current"
                })
            });
            Ok(sync["commitApplied"] == last.as_str()
                && sync["outcome"] == "synced"
                && pruned
                && healthy)
        },
    )
    .await?;
    agent.shutdown().await;
    ns.delete().await?;
    Ok(())
}

/// One commit with everything at once in the worst file order: a custom resource before its CRD, objects
/// before their Namespace, and a broken document among valid ones. Everything valid is applied; the broken
/// document reaches kas's API with its file, document and line; nothing is pruned until it is fixed.
#[tokio::test]
async fn a_crd_a_namespace_and_a_broken_document_in_one_commit() -> anyhow::Result<()> {
    install_crypto_provider();
    let ns = TestNamespace::create("gitops-mixed").await?;
    let apps = format!("{}-apps", ns.name);
    // CRDs are cluster-wide: a group of this test's own.
    let group = format!("{}.e2e.example.com", ns.name);
    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    h.git.commit_files(
        "group/manifests",
        &[("old.yaml", Some(&configmap("old", "one")))],
        "old",
    )?;
    let (agent_id, agent) = start_agent(&h, &ns, Duration::from_secs(3600)).await?;
    let configmaps: Api<ConfigMap> = ns.api();
    eventually(Duration::from_secs(30), "old applied", || async {
        Ok(configmaps.get_opt("old").await?.is_some())
    })
    .await?;

    let widget = format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: gear\n  namespace: {apps}\nspec:\n  size: 3\n"
    );
    let app = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: app-settings\n  namespace: {apps}\ndata:\n  a: b\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: broken\ndata: {{unclosed: [\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: after-broken\n  namespace: {apps}\n"
    );
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {apps}\n");
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n"
    );
    h.git.commit_files(
        "group/manifests",
        &[
            ("old.yaml", None),
            ("a-widget.yaml", Some(&widget)),
            ("b-app.yaml", Some(&app)),
            ("c-namespace.yaml", Some(&namespace)),
            ("d-crd.yaml", Some(&crd)),
        ],
        "everything at once, one document broken",
    )?;
    let key = |group: &str, kind: &str, ns: &str, name: &str| format!("{group}/{kind}/{ns}/{name}");
    eventually(
        Duration::from_secs(60),
        "the valid objects applied, the broken one reported",
        || async {
            let (outcome, objects) = last_sync(&h, &agent_id).await?;
            let result = |k: &str| objects.get(k).map(|o| o.0.clone()).unwrap_or_default();
            let broken = objects.iter().find(|(_, (result, message))| {
                result == "failed" && message.contains("b-app.yaml, document 1")
            });
            Ok(outcome == "partial"
                && result(&key(&group, "Widget", &apps, "gear")) == "created"
                && result(&key("", "ConfigMap", &apps, "app-settings")) == "created"
                && result(&key("", "ConfigMap", &apps, "after-broken")) == "created"
                && result(&key("", "Namespace", "", &apps)) == "created"
                && result(&key(
                    "apiextensions.k8s.io",
                    "CustomResourceDefinition",
                    "",
                    &format!("widgets.{group}"),
                )) == "created"
                && broken.is_some_and(|(_, (_, message))| message.contains(", line ")))
        },
    )
    .await?;
    assert!(
        configmaps.get_opt("old").await?.is_some(),
        "nothing is pruned while a document is broken"
    );

    // Fixed: now the object that left Git is pruned.
    let fixed = app.replace("data: {unclosed: [\n", "data: {fixed: \"yes\"}\n");
    h.git
        .commit_files("group/manifests", &[("b-app.yaml", Some(&fixed))], "fix")?;
    eventually(
        Duration::from_secs(30),
        "old pruned once the render is whole",
        || async {
            Ok(configmaps.get_opt("old").await?.is_none()
                && configmaps.get_opt("broken").await?.is_some())
        },
    )
    .await?;
    agent.shutdown().await;
    // Cluster-wide leftovers of this test.
    let client = ns.client.clone();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    crds.delete(&format!("widgets.{group}"), &Default::default())
        .await?;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
        .delete(&apps, &Default::default())
        .await?;
    ns.delete().await?;
    Ok(())
}
