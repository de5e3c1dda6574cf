//! What a prune must never destroy, against a real kube-apiserver: an empty set, a Namespace or CRD still
//! in use, an inventory someone deleted. Needs `cargo xtask test`.

use gitops_engine::{
    ApplyOptions, EngineError, InventoryOptions, InventoryRef, ManifestFile, Outcome, SyncReport,
    apply,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use kube::Api;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ObjectMeta, PostParams,
};
use test_support::cluster::{TestNamespace, kube_client};
use test_support::env::unique_name;

fn configmap(name: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata: {{k: v}}\n---\n")
}

fn inventory_ref(ns: &TestNamespace) -> InventoryRef {
    InventoryRef {
        namespace: ns.name.clone(),
        name: "agentk-inventory-safety".into(),
    }
}

fn options(ns: &TestNamespace) -> ApplyOptions {
    ApplyOptions {
        default_namespace: ns.name.clone(),
        inventory: Some(InventoryOptions {
            prune_timeout: Some(std::time::Duration::from_secs(60)),
            ..InventoryOptions::new(inventory_ref(ns))
        }),
        ..Default::default()
    }
}

fn allowing_empty(mut options: ApplyOptions) -> ApplyOptions {
    options
        .inventory
        .as_mut()
        .expect("has an inventory")
        .allow_empty = true;
    options
}

fn verbs(report: &SyncReport) -> Vec<String> {
    report.results.iter().map(|r| r.sync_result()).collect()
}

fn kept_reason<'a>(report: &'a SyncReport, resource_key: &str) -> &'a str {
    let result = report
        .get(resource_key)
        .unwrap_or_else(|| panic!("no result for {resource_key} in {:#?}", report.results));
    match &result.outcome {
        Outcome::Kept(reason) => reason,
        other => panic!("{resource_key}: {other:?}, not kept"),
    }
}

async fn inventory_names(ns: &TestNamespace) -> anyhow::Result<Vec<String>> {
    Ok(inventory_ref(ns)
        .read(&ns.client)
        .await?
        .into_iter()
        .map(|k| k.name)
        .collect())
}

async fn configmaps_left(ns: &TestNamespace, names: &[&str]) -> anyhow::Result<bool> {
    for name in names {
        if ns.api::<ConfigMap>().get_opt(name).await?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// M1–M3: a glob that matches nothing, a repository reduced to a README, every file emptied or
/// commented out: each is a set without objects. It is refused, and nothing is applied, pruned or
/// recorded, until the project allows an empty set.
#[tokio::test]
async fn an_empty_set_is_refused_until_allow_empty() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-empty").await?;
    let opts = options(&ns);
    let set = [ManifestFile::new(
        "app.yaml",
        [configmap("a"), configmap("b")].concat(),
    )];
    apply(&ns.client, &set, &opts).await?;
    let head_before = ns.api::<ConfigMap>().get(&inventory_ref(&ns).name).await?;

    let empty_sets: [&[ManifestFile]; 4] = [
        // A glob that matches nothing.
        &[],
        // A repository reduced to a README (not a manifest file).
        &[ManifestFile::new("README.md", "# moved to another repo\n")],
        // Every manifest file emptied or commented out.
        &[
            ManifestFile::new("app.yaml", ""),
            ManifestFile::new("b.yaml", "# apiVersion: v1\n# kind: ConfigMap\n---\n---\n"),
        ],
        // A List with no items.
        &[ManifestFile::new(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems: []\n",
        )],
    ];
    for files in empty_sets {
        let error = apply(&ns.client, files, &opts).await.unwrap_err();
        assert!(
            matches!(error, EngineError::EmptySet { objects: 2, .. }),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("empty"), "{message}");
        assert!(message.contains(&inventory_ref(&ns).id()), "{message}");
        assert!(message.contains("2 object"), "{message}");
        assert!(message.contains("allow_empty: true"), "{message}");
        assert!(configmaps_left(&ns, &["a", "b"]).await?, "{files:?} pruned");
    }
    // Inventory untouched: not even rewritten.
    let head_after = ns.api::<ConfigMap>().get(&inventory_ref(&ns).name).await?;
    assert_eq!(
        head_before.metadata.resource_version,
        head_after.metadata.resource_version
    );
    assert_eq!(inventory_names(&ns).await?, ["a", "b"]);

    // Every document failing to decode is not an empty set, and prunes nothing either.
    let broken = [ManifestFile::new(
        "app.yaml",
        "kind: ConfigMap\nmetadata: {name: no-api-version}\n---\n: not yaml: [\n",
    )];
    let report = apply(&ns.client, &broken, &opts).await?;
    assert_eq!(report.count("failed"), 2, "{:#?}", report.results);
    assert_eq!(report.count("pruned"), 0);
    assert!(configmaps_left(&ns, &["a", "b"]).await?);
    assert_eq!(inventory_names(&ns).await?, ["a", "b"]);

    // allow_empty: the project is meant to be emptied.
    let report = apply(
        &ns.client,
        &[ManifestFile::new("README.md", "gone")],
        &allowing_empty(opts),
    )
    .await?;
    assert_eq!(verbs(&report), ["configmap/a pruned", "configmap/b pruned"]);
    assert!(ns.api::<ConfigMap>().get_opt("a").await?.is_none());
    assert!(inventory_names(&ns).await?.is_empty());
    ns.delete().await?;
    Ok(())
}

/// K4: the inventory ConfigMap deleted by a human. The next sync rebuilds it from the set and prunes
/// nothing (it cannot know what left), and the objects stay this inventory's.
#[tokio::test]
async fn a_deleted_inventory_is_rebuilt_and_nothing_is_pruned() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-lost-inventory").await?;
    let opts = options(&ns);
    let v1 = [ManifestFile::new(
        "app.yaml",
        [configmap("a"), configmap("b")].concat(),
    )];
    apply(&ns.client, &v1, &opts).await?;
    ns.api::<ConfigMap>()
        .delete(&inventory_ref(&ns).name, &DeleteParams::default())
        .await?;

    let v2 = [ManifestFile::new("app.yaml", configmap("a"))];
    let report = apply(&ns.client, &v2, &opts).await?;
    assert_eq!(verbs(&report), ["configmap/a unchanged"]);
    assert!(configmaps_left(&ns, &["a", "b"]).await?);
    assert_eq!(inventory_names(&ns).await?, ["a"]);
    ns.delete().await?;
    Ok(())
}

fn namespace_yaml(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n---\n")
}

fn deployment_yaml(namespace: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec: {{containers: [{{name: web, image: registry.invalid/web:1}}]}}
---
"
    )
}

/// M9: the Namespace's file is deleted while a Deployment in it stays in Git. The Namespace is kept
/// (deleting it would delete the Deployment) and stays in the inventory; once the Deployment leaves too,
/// both are pruned.
#[tokio::test]
async fn a_namespace_the_set_still_uses_is_kept() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-ns-guard").await?;
    let opts = options(&ns);
    let app = unique_name("engine-app");
    let both = [
        ManifestFile::new("namespace.yaml", namespace_yaml(&app)),
        ManifestFile::new("deploy.yaml", deployment_yaml(&app)),
    ];
    let report = apply(&ns.client, &both, &opts).await?;
    assert!(report.all_succeeded(), "{:#?}", report.results);
    let deployments: Api<Deployment> = Api::namespaced(ns.client.clone(), &app);
    let uid = deployments.get("web").await?.metadata.uid;

    let without_namespace = [ManifestFile::new("deploy.yaml", deployment_yaml(&app))];
    let report = apply(&ns.client, &without_namespace, &opts).await?;
    assert_eq!(
        kept_reason(&report, &format!("/Namespace//{app}")),
        format!("kept: still in use by apps/Deployment/{app}/web")
    );
    let namespace = Api::<Namespace>::all(ns.client.clone()).get(&app).await?;
    assert!(namespace.metadata.deletion_timestamp.is_none());
    assert_eq!(
        deployments.get("web").await?.metadata.uid,
        uid,
        "Deployment replaced"
    );
    assert_eq!(
        report
            .get(&format!("apps/Deployment/{app}/web"))
            .map(|r| &r.outcome),
        Some(&Outcome::Unchanged)
    );
    assert_eq!(inventory_names(&ns).await?, [app.clone(), "web".into()]);

    // Both leave: the Deployment goes first, then the Namespace, which no longer holds anything.
    let report = apply(
        &ns.client,
        &[ManifestFile::new("other.yaml", configmap("other"))],
        &opts,
    )
    .await?;
    assert_eq!(
        verbs(&report),
        [
            "configmap/other created",
            "deployment.apps/web pruned",
            &format!("namespace/{app} pruned")
        ],
        "{:#?}",
        report.results
    );
    assert_eq!(inventory_names(&ns).await?, ["other"]);
    ns.delete().await?;
    Ok(())
}

/// A Namespace that left the set while it holds an object this inventory did not make (someone else's
/// Secret) is kept; the foreign object is untouched. Once it is gone, the Namespace is pruned.
#[tokio::test]
async fn a_namespace_holding_foreign_objects_is_kept() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-ns-foreign").await?;
    let opts = options(&ns);
    let app = unique_name("engine-app");
    let set = [
        ManifestFile::new("namespace.yaml", namespace_yaml(&app)),
        ManifestFile::new("keep.yaml", configmap("stays")),
    ];
    apply(&ns.client, &set, &opts).await?;
    let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), &app);
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("someone-elses".into()),
            ..Default::default()
        },
        string_data: Some([("k".to_string(), "v".to_string())].into()),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &foreign).await?;

    let only_configmap = [ManifestFile::new("keep.yaml", configmap("stays"))];
    let report = apply(&ns.client, &only_configmap, &opts).await?;
    assert_eq!(
        kept_reason(&report, &format!("/Namespace//{app}")),
        format!("kept: still in use by /Secret/{app}/someone-elses")
    );
    assert!(secrets.get_opt("someone-elses").await?.is_some());
    let namespace = Api::<Namespace>::all(ns.client.clone()).get(&app).await?;
    assert!(namespace.metadata.deletion_timestamp.is_none());
    assert_eq!(inventory_names(&ns).await?, ["stays".into(), app.clone()]);

    secrets
        .delete("someone-elses", &DeleteParams::default())
        .await?;
    let report = apply(&ns.client, &only_configmap, &opts).await?;
    assert_eq!(
        verbs(&report),
        [
            "configmap/stays unchanged",
            &format!("namespace/{app} pruned")
        ]
    );
    assert_eq!(inventory_names(&ns).await?, ["stays"]);
    ns.delete().await?;
    Ok(())
}

fn crd_yaml(group: &str) -> String {
    format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget, listKind: WidgetList}}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-preserve-unknown-fields: true
---
"#
    )
}

fn widget_yaml(group: &str, name: &str) -> String {
    format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: {name}\nspec:\n  size: 1\n---\n"
    )
}

fn crd_api(client: &kube::Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    Api::all_with(client.clone(), &resource)
}

fn widgets(client: &kube::Client, namespace: &str, group: &str) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", "Widget"), "widgets");
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// M10: a CRD deleted from Git while a custom resource of it exists outside the set (another team's) is
/// kept: deleting the CRD would delete every Widget in the cluster.
#[tokio::test]
async fn a_crd_with_custom_resources_outside_the_set_is_kept() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-crd-guard").await?;
    let other = TestNamespace::create("engine-crd-other").await?;
    let opts = options(&ns);
    let group = format!("{}.example.com", unique_name("guard"));
    let crd_name = format!("widgets.{group}");
    let set = [
        ManifestFile::new("crd.yaml", crd_yaml(&group)),
        ManifestFile::new("cm.yaml", configmap("stays")),
    ];
    let report = apply(&ns.client, &set, &opts).await?;
    assert!(report.all_succeeded(), "{:#?}", report.results);
    // Someone else's Widget, made without this inventory.
    let foreign: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": format!("{group}/v1"), "kind": "Widget",
        "metadata": {"name": "theirs", "namespace": other.name}, "spec": {"size": 2},
    }))?;
    let theirs = widgets(&other.client, &other.name, &group);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Discovery needs a moment after the CRD is established.
    while let Err(e) = theirs.create(&PostParams::default(), &foreign).await {
        assert!(
            std::time::Instant::now() < deadline,
            "cannot create a Widget: {e}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    let without_crd = [ManifestFile::new("cm.yaml", configmap("stays"))];
    let report = apply(&ns.client, &without_crd, &opts).await?;
    assert_eq!(
        kept_reason(
            &report,
            &format!("apiextensions.k8s.io/CustomResourceDefinition//{crd_name}")
        ),
        format!("kept: still in use by {group}/Widget/{}/theirs", other.name)
    );
    assert!(crd_api(&ns.client).get_opt(&crd_name).await?.is_some());
    assert!(theirs.get_opt("theirs").await?.is_some());
    assert_eq!(
        inventory_names(&ns).await?,
        ["stays".into(), crd_name.clone()]
    );

    crd_api(&ns.client)
        .delete(&crd_name, &DeleteParams::default())
        .await?;
    other.delete().await?;
    ns.delete().await?;
    Ok(())
}

/// A CRD that leaves Git together with all its custom resources is pruned: they go first, then the CRD.
#[tokio::test]
async fn a_crd_leaving_with_all_its_custom_resources_is_pruned() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-crd-prune").await?;
    let mut opts = options(&ns);
    // Foreground deletion of a custom resource waits for the garbage collector, which learns of a CRD
    // this young only at its next discovery resync (up to 30 s later); background does not.
    opts.inventory
        .as_mut()
        .expect("has an inventory")
        .prune_propagation_policy = gitops_engine::PropagationPolicy::Background;
    let group = format!("{}.example.com", unique_name("prune"));
    let crd_name = format!("widgets.{group}");
    let set = [
        ManifestFile::new("crd.yaml", crd_yaml(&group)),
        ManifestFile::new(
            "widgets.yaml",
            [widget_yaml(&group, "w1"), widget_yaml(&group, "w2")].concat(),
        ),
        ManifestFile::new("cm.yaml", configmap("stays")),
    ];
    let report = apply(&ns.client, &set, &opts).await?;
    assert!(report.all_succeeded(), "{:#?}", report.results);

    let report = apply(
        &ns.client,
        &[ManifestFile::new("cm.yaml", configmap("stays"))],
        &opts,
    )
    .await?;
    assert_eq!(
        verbs(&report),
        [
            "configmap/stays unchanged",
            &format!("widget.{group}/w1 pruned"),
            &format!("widget.{group}/w2 pruned"),
            &format!("customresourcedefinition.apiextensions.k8s.io/{crd_name} pruned"),
        ],
        "{:#?}",
        report.results
    );
    assert_eq!(inventory_names(&ns).await?, ["stays"]);
    let client = kube_client().await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while crd_api(&client).get_opt(&crd_name).await?.is_some() {
        assert!(std::time::Instant::now() < deadline, "CRD not deleted");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    ns.delete().await?;
    Ok(())
}
