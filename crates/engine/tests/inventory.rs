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
    let shards = inventory_configmaps(&ns).await?;
    assert!(shards.len() > 1, "{shards:?}");
    // cli-utils' inventory label finds the head alone (shards carrying it would look like more
    // inventories with the same id); every part says agentk manages it.
    let labelled = |selector: &str| {
        let api = ns.api::<ConfigMap>();
        let params = kube::api::ListParams::default().labels(selector);
        async move {
            anyhow::Ok(
                api.list(&params)
                    .await?
                    .items
                    .into_iter()
                    .filter_map(|c| c.metadata.name)
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(
        labelled("cli-utils.sigs.k8s.io/inventory-id").await?,
        std::slice::from_ref(&location.name)
    );
    let mut managed = labelled("app.kubernetes.io/managed-by=agentk").await?;
    managed.sort();
    let mut all = shards.clone();
    all.sort();
    assert_eq!(managed, all);

    let few: BTreeSet<ObjectKey> = many.iter().take(3).cloned().collect();
    location.write(&ns.client, &few, "agentk").await?;
    assert_eq!(location.read(&ns.client).await?, few);
    assert_eq!(
        inventory_configmaps(&ns).await?,
        std::slice::from_ref(&location.name)
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

/// A layer over the kube client's service that lets `writes` requests other than GETs through and then
/// interrupts every later one: fails it (an apiserver or network error) or, with `hang`, never answers
/// (the sync is then dropped, as when a newer commit arrives).
#[derive(Clone)]
struct InterruptAfter {
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    hang: bool,
}

impl<S> tower::Layer<S> for InterruptAfter {
    type Service = Interrupting<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Interrupting {
            inner,
            interrupt: self.clone(),
        }
    }
}

#[derive(Clone)]
struct Interrupting<S> {
    inner: S,
    interrupt: InterruptAfter,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> tower::Service<http::Request<kube::client::Body>> for Interrupting<S>
where
    S: tower::Service<http::Request<kube::client::Body>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<kube::client::Body>) -> Self::Future {
        use std::sync::atomic::Ordering::SeqCst;
        let write = request.method() != http::Method::GET;
        if write
            && self
                .interrupt
                .writes
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_err()
        {
            if self.interrupt.hang {
                return Box::pin(futures::future::pending());
            }
            return Box::pin(async { Err("interrupted by the test".into()) });
        }
        let response = self.inner.call(request);
        Box::pin(async move { response.await.map_err(Into::into) })
    }
}

/// A cluster-admin client whose writes after the first `writes` fail (or, with `hang`, never finish).
async fn interrupted_client(writes: usize, hang: bool) -> anyhow::Result<kube::Client> {
    test_support::cluster::install_crypto_provider();
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&test_support::env::test_env().kubernetes.kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let layer = InterruptAfter {
        writes: std::sync::Arc::new(writes.into()),
        hang,
    };
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build())
}

/// Keys of objects that do not exist, long enough that a few thousand fill several 512 KiB shards.
fn padding(ns: &TestNamespace, count: usize) -> BTreeSet<ObjectKey> {
    (0..count)
        .map(|i| ObjectKey {
            group: String::new(),
            kind: "ConfigMap".into(),
            namespace: Some(ns.name.clone()),
            name: format!("padding-{}-{i:05}", "x".repeat(200)),
        })
        .collect()
}

fn key(ns: &TestNamespace, name: &str) -> ObjectKey {
    ObjectKey {
        group: String::new(),
        kind: "ConfigMap".into(),
        namespace: Some(ns.name.clone()),
        name: name.into(),
    }
}

/// The ConfigMaps in the namespace that are not the objects of the set: the inventory's head and shards.
async fn inventory_configmaps(ns: &TestNamespace) -> anyhow::Result<Vec<String>> {
    let names = ns
        .api::<ConfigMap>()
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .filter(|n| n.starts_with("agentk-inventory-test"))
        .collect();
    Ok(names)
}

/// M11, P3: a sharded inventory write interrupted after its first shard (an error, or a dropped sync) leaves
/// the previous inventory whole and readable; the next sync converges with nothing lost (every object of
/// the set there and recorded) and nothing orphaned (what left Git pruned, no stray shards).
#[tokio::test]
async fn an_interrupted_sharded_write_leaves_the_previous_inventory_whole() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-interrupt").await?;
    let location = inventory_ref(&ns);
    let opts = options(&ns, InventoryPolicy::MustMatch);
    apply(
        &ns.client,
        &files(&[configmap("a", ""), configmap("b", "")]),
        &opts,
    )
    .await?;
    // Two shards, then three: the shape that wedged the older layout (head rewritten first, naming a
    // third shard never written).
    let mut before: BTreeSet<ObjectKey> = padding(&ns, 2_500);
    before.extend([key(&ns, "a"), key(&ns, "b")]);
    location.write(&ns.client, &before, "agentk").await?;
    assert_eq!(location.read(&ns.client).await?, before);
    assert!(inventory_configmaps(&ns).await?.len() >= 2, "not sharded");

    let mut bigger = padding(&ns, 4_500);
    bigger.extend([key(&ns, "a"), key(&ns, "b")]);
    let failing = interrupted_client(1, false).await?;
    let error = location.write(&failing, &bigger, "agentk").await;
    assert!(error.is_err(), "the write was not interrupted");
    assert_eq!(
        location.read(&ns.client).await?,
        before,
        "interrupted write"
    );

    // A sync dropped while recording its set (a newer commit arrived) after one shard.
    let hanging = interrupted_client(1, true).await?;
    let with_c = files(&[configmap("a", ""), configmap("b", ""), configmap("c", "")]);
    let dropped = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        apply(&hanging, &with_c, &opts),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the sync was not interrupted: {dropped:?}"
    );
    assert_eq!(location.read(&ns.client).await?, before, "dropped sync");

    // The next sync: b left Git, c is new; the padding (no such objects) is dropped.
    let report = apply(
        &ns.client,
        &files(&[configmap("a", ""), configmap("c", "")]),
        &opts,
    )
    .await?;
    assert_eq!(report.count("failed"), 0, "{:#?}", report.results);
    assert!(report.get(&format!("/ConfigMap/{}/b", ns.name)).is_some());
    assert_eq!(inventory_names(&ns).await?, ["a", "c"]);
    assert!(is_deleted(&ns, "b").await?);
    assert!(!is_deleted(&ns, "a").await? && !is_deleted(&ns, "c").await?);
    assert_eq!(
        inventory_configmaps(&ns).await?,
        std::slice::from_ref(&location.name)
    );
    ns.delete().await?;
    Ok(())
}

/// A shard missing all the same (deleted by hand, or left by the older layout's interrupted write) does
/// not wedge the project: the read takes every shard left, and the next sync rewrites the inventory.
#[tokio::test]
async fn a_missing_shard_does_not_wedge_the_inventory() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-missing-shard").await?;
    let location = inventory_ref(&ns);
    let opts = options(&ns, InventoryPolicy::MustMatch);
    apply(&ns.client, &files(&[configmap("a", "")]), &opts).await?;
    let mut keys = padding(&ns, 4_500);
    keys.insert(key(&ns, "a"));
    location.write(&ns.client, &keys, "agentk").await?;
    let shards = inventory_configmaps(&ns).await?;
    assert!(shards.len() >= 3, "{shards:?}");
    let last = shards.iter().max().expect("shards").clone();
    ns.api::<ConfigMap>()
        .delete(&last, &Default::default())
        .await?;

    // The older layout, interrupted: the head names three shards, the third was never written.
    let head = ns.api::<ConfigMap>().get(&location.name).await?;
    let read = location.read(&ns.client).await?;
    assert!(read.contains(&key(&ns, "a")), "lost a");
    assert!(read.is_subset(&keys));
    let older = ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(location.name.clone()),
            ..Default::default()
        },
        data: Some(
            [
                ("objects".to_string(), format!("{}\n", key(&ns, "a"))),
                ("shards".to_string(), "3".to_string()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    ns.api::<ConfigMap>()
        .replace(
            &location.name,
            &PostParams::default(),
            &ConfigMap {
                metadata: kube::api::ObjectMeta {
                    resource_version: head.metadata.resource_version,
                    ..older.metadata.clone()
                },
                ..older
            },
        )
        .await?;
    assert!(location.read(&ns.client).await?.contains(&key(&ns, "a")));

    let report = apply(&ns.client, &files(&[configmap("a", "")]), &opts).await?;
    assert_eq!(report.count("failed"), 0, "{:#?}", report.results);
    assert_eq!(inventory_names(&ns).await?, ["a"]);
    assert_eq!(
        inventory_configmaps(&ns).await?,
        std::slice::from_ref(&location.name)
    );
    ns.delete().await?;
    Ok(())
}
