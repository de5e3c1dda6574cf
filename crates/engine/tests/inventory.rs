//! Inventory, ownership policy and pruning against a real kube-apiserver. Needs `cargo xtask test`.

use std::collections::BTreeSet;

use gitops_engine::{
    ApplyOptions, DryRunStrategy, InventoryOptions, InventoryPolicy, InventoryRef, ManifestFile,
    ObjectKey, SyncReport, apply,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{ObjectMeta, PostParams};
use test_support::cluster::TestNamespace;

fn configmap(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\ndata: {{k: v}}\n---\n"
    )
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: registry.invalid/web:1}]}
---
";

fn files(docs: &[String]) -> Vec<ManifestFile> {
    vec![ManifestFile::new("app.yaml", docs.concat())]
}

fn options(ns: &TestNamespace, policy: InventoryPolicy) -> ApplyOptions {
    ApplyOptions {
        default_namespace: ns.name.clone(),
        inventory: Some(InventoryOptions {
            policy,
            prune_timeout: Some(std::time::Duration::from_secs(30)),
            ..InventoryOptions::new(inventory_ref(ns))
        }),
        ..Default::default()
    }
}

fn inventory_ref(ns: &TestNamespace) -> InventoryRef {
    InventoryRef {
        namespace: ns.name.clone(),
        name: "agentk-inventory-test".into(),
    }
}

fn verbs(report: &SyncReport) -> Vec<String> {
    report.results.iter().map(|r| r.sync_result()).collect()
}

/// Gone, not merely being deleted: pruning waits for that (`prune_timeout`).
async fn is_deleted(ns: &TestNamespace, name: &str) -> anyhow::Result<bool> {
    Ok(ns.api::<ConfigMap>().get_opt(name).await?.is_none())
}

async fn inventory_names(ns: &TestNamespace) -> anyhow::Result<Vec<String>> {
    Ok(inventory_ref(ns)
        .read(&ns.client)
        .await?
        .into_iter()
        .map(|k| k.name)
        .collect())
}

#[tokio::test]
async fn objects_that_leave_git_are_pruned_unless_kept() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-prune").await?;
    let opts = options(&ns, InventoryPolicy::MustMatch);
    let v1 = files(&[
        configmap("stays", ""),
        configmap("goes", ""),
        configmap("kept", "cli-utils.sigs.k8s.io/on-remove: keep"),
        configmap("old-name", ""),
        DEPLOYMENT.to_string(),
    ]);
    let report = apply(&ns.client, &v1, &opts).await?;
    assert!(report.all_succeeded(), "{:#?}", report.results);
    assert_eq!(
        inventory_names(&ns).await?,
        ["goes", "kept", "old-name", "stays", "web"]
    );
    // Wait for the Deployment's pod, so the prune below has dependents to take down.
    let pods = ns.api::<Pod>();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pods.list(&Default::default()).await?.items.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no pod for the Deployment"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // "goes", "kept" and the Deployment leave Git, "old-name" is renamed.
    let v2 = files(&[configmap("stays", ""), configmap("new-name", "")]);
    let report = apply(&ns.client, &v2, &opts).await?;
    assert_eq!(
        verbs(&report),
        [
            "configmap/new-name created",
            "configmap/stays unchanged",
            "deployment.apps/web pruned",
            "configmap/goes pruned",
            "configmap/old-name pruned"
        ]
    );
    // Foreground propagation and prune_timeout: the Deployment is gone, and so are its pods.
    assert!(ns.api::<Deployment>().get_opt("web").await?.is_none());
    assert!(
        pods.list(&Default::default())
            .await?
            .items
            .iter()
            .all(|p| p.metadata.deletion_timestamp.is_some())
    );
    let configmaps = ns.api::<ConfigMap>();
    assert!(is_deleted(&ns, "goes").await?);
    assert!(is_deleted(&ns, "old-name").await?);
    assert!(
        configmaps.get_opt("kept").await?.is_some(),
        "on-remove: keep was deleted"
    );
    assert_eq!(inventory_names(&ns).await?, ["new-name", "stays"]);
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn nothing_is_pruned_when_anything_failed_and_dry_runs_delete_nothing() -> anyhow::Result<()>
{
    let ns = TestNamespace::create("engine-noprune").await?;
    let opts = options(&ns, InventoryPolicy::MustMatch);
    apply(
        &ns.client,
        &files(&[configmap("a", ""), configmap("b", "")]),
        &opts,
    )
    .await?;

    let broken = files(&[
        configmap("a", ""),
        "kind: ConfigMap\nmetadata: {name: no-api-version}\n".into(),
    ]);
    let report = apply(&ns.client, &broken, &opts).await?;
    assert_eq!(report.count("pruned"), 0, "{:#?}", report.results);
    assert!(ns.api::<ConfigMap>().get_opt("b").await?.is_some());
    assert_eq!(inventory_names(&ns).await?, ["a", "b"]);

    let only_a = files(&[configmap("a", "")]);
    let dry = ApplyOptions {
        dry_run: DryRunStrategy::Server,
        ..opts.clone()
    };
    let report = apply(&ns.client, &only_a, &dry).await?;
    assert_eq!(
        verbs(&report),
        [
            "configmap/a unchanged (dry run)",
            "configmap/b pruned (dry run)"
        ]
    );
    assert!(ns.api::<ConfigMap>().get_opt("b").await?.is_some());
    assert_eq!(inventory_names(&ns).await?, ["a", "b"]);

    let report = apply(&ns.client, &only_a, &opts).await?;
    assert_eq!(
        verbs(&report),
        ["configmap/a unchanged", "configmap/b pruned"]
    );
    assert!(is_deleted(&ns, "b").await?);
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn inventory_policy_decides_about_objects_not_ours() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-policy").await?;
    let configmaps = ns.api::<ConfigMap>();
    for (name, owner) in [
        ("unowned", None),
        ("foreign", Some("elsewhere/other-inventory")),
    ] {
        let annotations =
            owner.map(|o| [("config.k8s.io/owning-inventory".to_string(), o.to_string())].into());
        let object = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations,
                ..Default::default()
            },
            ..Default::default()
        };
        configmaps.create(&PostParams::default(), &object).await?;
    }
    let set = files(&[
        configmap("unowned", ""),
        configmap("foreign", ""),
        configmap("new", ""),
    ]);
    let outcomes = |report: &SyncReport| -> Vec<(String, &'static str)> {
        report
            .results
            .iter()
            .map(|r| (r.key.as_ref().unwrap().name.clone(), r.outcome.verb()))
            .collect()
    };

    let must_match = apply(&ns.client, &set, &options(&ns, InventoryPolicy::MustMatch)).await?;
    assert_eq!(
        outcomes(&must_match),
        [
            ("foreign".into(), "failed"),
            ("new".into(), "created"),
            ("unowned".into(), "failed")
        ]
    );
    assert!(
        must_match.results[0]
            .message()
            .unwrap()
            .contains("elsewhere/other-inventory")
    );
    // Only what was applied became ours.
    assert_eq!(inventory_names(&ns).await?, ["new"]);

    let adopt = apply(
        &ns.client,
        &set,
        &options(&ns, InventoryPolicy::AdoptIfNoInventory),
    )
    .await?;
    assert_eq!(
        outcomes(&adopt),
        [
            ("foreign".into(), "failed"),
            ("new".into(), "unchanged"),
            ("unowned".into(), "configured")
        ]
    );

    let adopt_all = apply(&ns.client, &set, &options(&ns, InventoryPolicy::AdoptAll)).await?;
    assert_eq!(
        outcomes(&adopt_all),
        [
            ("foreign".into(), "configured"),
            ("new".into(), "unchanged"),
            ("unowned".into(), "unchanged")
        ]
    );
    let foreign = configmaps.get("foreign").await?;
    let ours = inventory_ref(&ns).id();
    assert_eq!(
        foreign.metadata.annotations.unwrap()["config.k8s.io/owning-inventory"],
        ours
    );
    assert_eq!(inventory_names(&ns).await?, ["foreign", "new", "unowned"]);
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn large_inventories_are_sharded_and_shrink_back() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-shards").await?;
    let location = inventory_ref(&ns);
    let many: BTreeSet<ObjectKey> = (0..30_000)
        .map(|i| ObjectKey {
            group: "apps".into(),
            kind: "Deployment".into(),
            namespace: Some(ns.name.clone()),
            name: format!("deployment-with-a-rather-long-name-{i:05}"),
        })
        .collect();
    location.write(&ns.client, &many, "agentk").await?;
    assert_eq!(location.read(&ns.client).await?, many);
    let shards = ns.api::<ConfigMap>().list(&Default::default()).await?;
    let shard_names: Vec<_> = shards
        .items
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert!(
        shard_names.contains(&format!("{}-1", location.name)),
        "{shard_names:?}"
    );

    let few: BTreeSet<ObjectKey> = many.iter().take(3).cloned().collect();
    location.write(&ns.client, &few, "agentk").await?;
    assert_eq!(location.read(&ns.client).await?, few);
    assert!(
        ns.api::<ConfigMap>()
            .get_opt(&format!("{}-1", location.name))
            .await?
            .is_none()
    );
    ns.delete().await?;
    Ok(())
}

/// A re-sync of an unchanged set writes nothing (not even no-op applies or inventory rewrites) and
/// reads in bulk; drift and manifest changes are written, and only they.
#[tokio::test]
async fn resync_writes_only_what_differs() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-writes").await?;
    let (client, counts) = test_support::cluster::counting_kube_client().await?;
    let mut docs: Vec<String> = (0..40)
        .map(|i| configmap(&format!("cm-{i:02}"), "team: a"))
        .collect();
    docs.push(DEPLOYMENT.to_string());
    let opts = options(&ns, InventoryPolicy::MustMatch);
    let first = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(first.count("created"), 41, "{:#?}", first.results);
    // Health as the apply left each object: a ConfigMap is ready at once, a new Deployment is not yet.
    let health = |report: &SyncReport, key: &str| {
        report
            .get(key)
            .and_then(|r| r.health.as_ref())
            .map(|h| h.status)
    };
    let n = &ns.name;
    assert_eq!(
        health(&first, &format!("/ConfigMap/{n}/cm-00")),
        Some(gitops_kstatus::Status::Current)
    );
    assert_eq!(
        health(&first, &format!("apps/Deployment/{n}/web")),
        Some(gitops_kstatus::Status::InProgress)
    );

    let (reads, writes) = (counts.reads(), counts.writes());
    let again = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(again.count("unchanged"), 41, "{:#?}", again.results);
    assert_eq!(counts.writes() - writes, 0, "an unchanged re-sync wrote");
    // Discovery, the inventory, one LIST for the 40 ConfigMaps and one GET for the Deployment: far fewer
    // than one read per object.
    let resync_reads = counts.reads() - reads;
    assert!(resync_reads < 20, "{resync_reads} reads");

    // Drift: someone else changes a value we set. The next sync puts it back, with one write.
    let configmaps = ns.api::<ConfigMap>();
    let mut edited = configmaps.get("cm-07").await?;
    edited
        .data
        .get_or_insert_default()
        .insert("k".into(), "edited".into());
    configmaps
        .replace("cm-07", &PostParams::default(), &edited)
        .await?;
    let writes = counts.writes();
    let corrected = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(
        corrected
            .get(&format!("/ConfigMap/{}/cm-07", ns.name))
            .map(|r| r.sync_result()),
        Some("configmap/cm-07 configured".to_string())
    );
    assert_eq!(corrected.count("unchanged"), 40);
    assert_eq!(counts.writes() - writes, 1);
    assert_eq!(
        configmaps.get("cm-07").await?.data.unwrap()["k"],
        "v",
        "drift corrected"
    );

    // A field the manifest stops setting is removed, although every value it still sets is live.
    docs[3] =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-03\ndata: {k: v}\n---\n".into();
    let dropped = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(
        dropped
            .get(&format!("/ConfigMap/{}/cm-03", ns.name))
            .map(|r| r.sync_result()),
        Some("configmap/cm-03 configured".to_string())
    );
    let annotations = configmaps
        .get("cm-03")
        .await?
        .metadata
        .annotations
        .unwrap_or_default();
    assert!(!annotations.contains_key("team"), "{annotations:?}");
    ns.delete().await?;
    Ok(())
}

/// In a namespace crowded with other objects of the same kind, the read-ahead stops listing after one
/// page and reads the set's objects one by one; the outcome is the same (no writes for an unchanged set).
#[tokio::test]
async fn crowded_namespaces_are_read_by_get_and_still_write_nothing() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-crowded").await?;
    let others: Vec<String> = (0..600)
        .map(|i| configmap(&format!("other-{i:03}"), "team: b"))
        .collect();
    let plain = ApplyOptions {
        default_namespace: ns.name.clone(),
        ..Default::default()
    };
    let crowd = apply(&ns.client, &files(&others), &plain).await?;
    assert_eq!(crowd.count("created"), 600);

    let (client, counts) = test_support::cluster::counting_kube_client().await?;
    let ours: Vec<String> = (0..10)
        .map(|i| configmap(&format!("ours-{i}"), "team: a"))
        .collect();
    let opts = options(&ns, InventoryPolicy::MustMatch);
    let first = apply(&client, &files(&ours), &opts).await?;
    assert_eq!(first.count("created"), 10, "{:#?}", first.results);
    let (reads, writes) = (counts.reads(), counts.writes());
    let again = apply(&client, &files(&ours), &opts).await?;
    assert_eq!(again.count("unchanged"), 10, "{:#?}", again.results);
    assert_eq!(counts.writes(), writes, "an unchanged re-sync wrote");
    // One LIST page, then a GET for each of ours (they sort after the 600 others): not 2 pages of 500.
    let resync_reads = counts.reads() - reads;
    assert!(
        resync_reads >= 11,
        "{resync_reads} reads: the LIST was not cut short"
    );
    ns.delete().await?;
    Ok(())
}

/// Manifests the apiserver normalises (`cpu: 1` is stored as "1", `cpu: 0.5` as "500m") are written once;
/// with the applied forms kept across syncs, later re-checks write nothing — until someone changes them.
#[tokio::test]
async fn normalised_manifests_are_not_rewritten_on_every_check() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-normalised").await?;
    let (client, counts) = test_support::cluster::counting_kube_client().await?;
    let deployment = DEPLOYMENT.replace(
        "image: registry.invalid/web:1}",
        "image: registry.invalid/web:1, resources: {limits: {cpu: 1, memory: 0.5Gi}, requests: {cpu: 0.5}}}",
    );
    assert_ne!(deployment, DEPLOYMENT);
    let docs = vec![deployment];
    let forms = std::sync::Arc::new(gitops_engine::AppliedForms::default());
    let opts = ApplyOptions {
        applied_forms: Some(forms.clone()),
        ..options(&ns, InventoryPolicy::MustMatch)
    };
    let first = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(first.count("created"), 1, "{:#?}", first.results);

    // Without the forms (a fresh process) the normalised Deployment is applied again (a no-op)…
    let without = ApplyOptions {
        applied_forms: None,
        ..opts.clone()
    };
    let writes = counts.writes();
    let again = apply(&client, &files(&docs), &without).await?;
    assert_eq!(again.count("unchanged"), 1);
    assert_eq!(
        counts.writes() - writes,
        1,
        "the form as written never matches"
    );
    // …with them, not at all.
    let writes = counts.writes();
    let again = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(again.count("unchanged"), 1);
    assert_eq!(
        counts.writes(),
        writes,
        "a normalised manifest was rewritten"
    );

    // Drift in a normalised field is still put back.
    let deployments = ns.api::<Deployment>();
    // A strategic merge patch: no resourceVersion to race the Deployment controller with.
    let drift = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "web", "resources": {"limits": {"cpu": "2"}}}
    ]}}}});
    deployments
        .patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(drift),
        )
        .await?;
    let corrected = apply(&client, &files(&docs), &opts).await?;
    assert_eq!(corrected.count("configured"), 1, "{:#?}", corrected.results);
    let limits = deployments
        .get("web")
        .await?
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0]
        .resources
        .clone()
        .unwrap()
        .limits
        .unwrap();
    assert_eq!(limits["cpu"].0, "1");
    ns.delete().await?;
    Ok(())
}

/// `stringData` never shows in the live Secret, so a remembered form would hide drift in `data`: such
/// Secrets are applied on every check, and drift is put back.
#[tokio::test]
async fn secrets_with_string_data_are_always_checked() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-stringdata").await?;
    let secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {password: hunter2}\n---\n";
    let docs = vec![secret.to_string()];
    let opts = ApplyOptions {
        applied_forms: Some(std::sync::Arc::default()),
        ..options(&ns, InventoryPolicy::MustMatch)
    };
    apply(&ns.client, &files(&docs), &opts).await?;
    apply(&ns.client, &files(&docs), &opts).await?;
    let secrets = ns.api::<k8s_openapi::api::core::v1::Secret>();
    let drift = serde_json::json!({"data": {"password": "ZHJpZnRlZA=="}});
    secrets
        .patch(
            "creds",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(drift),
        )
        .await?;
    apply(&ns.client, &files(&docs), &opts).await?;
    let data = secrets.get("creds").await?.data.unwrap();
    assert_eq!(data["password"].0, b"hunter2");
    ns.delete().await?;
    Ok(())
}
