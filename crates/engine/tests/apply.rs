//! The engine against a real kube-apiserver. Needs `cargo xtask test` (or `cargo xtask cluster up` and
//! its exported `GITOPS_TEST_ENV`); fails without it.

use std::time::{Duration, Instant};

use gitops_engine::{ApplyOptions, DryRunStrategy, ManifestFile, Outcome, SyncReport, apply};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::Api;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use test_support::cluster::{TestNamespace, kube_client};
use test_support::env::unique_name;

fn file(path: &str, text: &str) -> ManifestFile {
    ManifestFile::new(path, text)
}

fn options(namespace: &str) -> ApplyOptions {
    ApplyOptions {
        default_namespace: namespace.to_string(),
        ..Default::default()
    }
}

fn deployment_yaml(ns: &str, name: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: web
        image: registry.invalid/web:1
"#
    )
}

/// `(resource_key, sync_result)` of every result, for readable assertions.
fn summary(report: &SyncReport) -> Vec<(String, String)> {
    report
        .results
        .iter()
        .map(|r| (r.resource_key(), r.sync_result()))
        .collect()
}

fn outcome<'a>(report: &'a SyncReport, resource_key: &str) -> &'a Outcome {
    &report
        .get(resource_key)
        .unwrap_or_else(|| panic!("no result for {resource_key} in {:#?}", report.results))
        .outcome
}

#[tokio::test]
async fn create_then_reapply_unchanged_then_update() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-create").await?;
    let n = &ns.name;
    let configmap = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: {n}\ndata:\n  a: b\n"
    );
    let v1 = [
        file(
            "app/deploy.yaml",
            &deployment_yaml(n, "nginx-deployment", 1),
        ),
        file("app/config.yaml", &configmap),
    ];
    let report = apply(&ns.client, &v1, &options(n)).await?;
    // ConfigMaps go before Deployments whatever the file order.
    assert_eq!(
        summary(&report),
        [
            (
                format!("/ConfigMap/{n}/settings"),
                "configmap/settings created".to_string()
            ),
            (
                format!("apps/Deployment/{n}/nginx-deployment"),
                "deployment.apps/nginx-deployment created".to_string()
            ),
        ]
    );
    assert_eq!(
        report.results[1].origin.as_ref().unwrap().path,
        "app/deploy.yaml"
    );

    let again = apply(&ns.client, &v1, &options(n)).await?;
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome == Outcome::Unchanged),
        "{:#?}",
        again.results
    );
    assert_eq!(
        again.results[1].sync_result(),
        "deployment.apps/nginx-deployment unchanged"
    );

    let v2 = [
        file(
            "app/deploy.yaml",
            &deployment_yaml(n, "nginx-deployment", 2),
        ),
        file("app/config.yaml", &configmap),
    ];
    let update = apply(&ns.client, &v2, &options(n)).await?;
    assert_eq!(
        outcome(&update, &format!("apps/Deployment/{n}/nginx-deployment")),
        &Outcome::Configured
    );
    assert_eq!(
        outcome(&update, &format!("/ConfigMap/{n}/settings")),
        &Outcome::Unchanged
    );
    // The field manager is agentk, and the update reaches the pods (kwok runs them).
    let deployments = ns.api::<Deployment>();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let d = deployments.get("nginx-deployment").await?;
        let managers: Vec<_> = d
            .metadata
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert!(managers.contains(&"agentk".to_string()), "{managers:?}");
        if d.status.and_then(|s| s.ready_replicas) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deployment never got 2 ready replicas"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn crd_and_its_custom_resource_in_one_set_whatever_the_file_order() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-crd").await?;
    let group = format!("{}.example.com", unique_name("engine"));
    let crd_name = format!("widgets.{group}");
    let crd = format!(
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {crd_name}
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
"#
    );
    // No namespace: the default namespace comes from the CRD's scope, as the kind is not served yet.
    let widget =
        format!("apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n");
    // The custom resource's file sorts first.
    let files = [file("a-widget.yaml", &widget), file("b-crd.yaml", &crd)];
    let report = apply(&ns.client, &files, &options(&ns.name)).await?;
    assert_eq!(
        summary(&report),
        [
            (
                format!("apiextensions.k8s.io/CustomResourceDefinition//{crd_name}"),
                format!("customresourcedefinition.apiextensions.k8s.io/{crd_name} created")
            ),
            (
                format!("{group}/Widget/{}/w1", ns.name),
                format!("widget.{group}/w1 created")
            ),
        ]
    );
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&group, "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
    assert_eq!(widgets.get("w1").await?.data["spec"]["size"], 3);

    // Reversed file order, now with both known to the cluster: nothing to do.
    let reversed = [file("a-crd.yaml", &crd), file("b-widget.yaml", &widget)];
    let again = apply(&ns.client, &reversed, &options(&ns.name)).await?;
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome == Outcome::Unchanged),
        "{:#?}",
        again.results
    );

    let crds = crd_api(&ns.client);
    crds.delete(&crd_name, &DeleteParams::default()).await?;
    ns.delete().await?;
    Ok(())
}

fn crd_api(client: &kube::Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
    );
    Api::all_with(client.clone(), &resource)
}

#[tokio::test]
async fn namespace_and_its_objects_in_one_set_whatever_the_file_order() -> anyhow::Result<()> {
    let client = kube_client().await?;
    let name = unique_name("engine-ns");
    let objects = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c1, namespace: {name}}}\n---\n{}",
        deployment_yaml(&name, "web", 1)
    );
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
    let files = [
        file("0-objects.yaml", &objects),
        file("1-namespace.yaml", &namespace),
    ];
    let report = apply(&client, &files, &ApplyOptions::default()).await?;
    let keys: Vec<_> = report.results.iter().map(|r| r.resource_key()).collect();
    assert_eq!(
        keys,
        [
            format!("/Namespace//{name}"),
            format!("/ConfigMap/{name}/c1"),
            format!("apps/Deployment/{name}/web")
        ]
    );
    assert!(report.all_succeeded(), "{:#?}", report.results);
    assert!(report.results.iter().all(|r| r.outcome == Outcome::Created));
    Api::<ConfigMap>::namespaced(client.clone(), &name)
        .get("c1")
        .await?;
    Api::<Namespace>::all(client)
        .delete(&name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// A misspelt field fails its object with the field's name instead of being dropped silently — server-side
/// apply refuses fields missing from the schema, of built-in kinds and of custom resources alike (a CRD
/// would otherwise prune them) — and the other objects are applied.
#[tokio::test]
async fn unknown_fields_fail_their_object_by_name() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-strict").await?;
    let n = &ns.name;
    let typo = deployment_yaml(n, "typo", 1).replace("  replicas: 1\n", "  replcas: 2\n");
    // A custom resource whose structural schema would prune an unknown field on create or update.
    let group = format!("{n}.strict.example.com");
    let crd = format!(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: gadgets, singular: gadget, kind: Gadget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            properties:\n              size: {{type: integer}}\n"
    );
    let text = format!(
        "{typo}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: fine}}\ndata: {{a: b}}\n---\n{crd}---\napiVersion: {group}/v1\nkind: Gadget\nmetadata: {{name: g}}\nspec: {{sise: 3}}\n"
    );
    let report = apply(&ns.client, &[file("app.yaml", &text)], &options(n)).await?;
    let gadget = outcome(&report, &format!("{group}/Gadget/{n}/g")).clone();
    Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(ns.client.clone())
        .delete(&format!("gadgets.{group}"), &Default::default())
        .await?;
    assert!(
        matches!(&gadget, Outcome::Failed(m) if m.contains(".spec.sise: field not declared in schema")),
        "{gadget:?}"
    );
    assert!(
        matches!(
            outcome(&report, &format!("apps/Deployment/{n}/typo")),
            Outcome::Failed(m) if m.contains(".spec.replcas: field not declared in schema")
        ),
        "{:?}",
        outcome(&report, &format!("apps/Deployment/{n}/typo"))
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/fine")),
        &Outcome::Created
    );
    assert!(ns.api::<Deployment>().get_opt("typo").await?.is_none());
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn an_invalid_document_does_not_stop_the_valid_ones() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-invalid").await?;
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: good1}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [broken\n---\nkind: ConfigMap\nmetadata: {name: no-api-version}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: good2}\n";
    let unknown = "apiVersion: nothing.example.com/v1\nkind: Gadget\nmetadata: {name: g}\n";
    let duplicate = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: good1, namespace: {}}}\n",
        ns.name
    );
    let files = [
        file("mixed.yaml", text),
        file("unknown.yaml", unknown),
        file("z-duplicate.yaml", &duplicate),
    ];
    let report = apply(&ns.client, &files, &options(&ns.name)).await?;
    let failures: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| {
            r.message().map(|m| {
                let origin = r.origin.as_ref().unwrap();
                (origin.path.clone(), origin.document_index, m.to_string())
            })
        })
        .collect();
    assert_eq!(failures.len(), 4, "{failures:#?}");
    assert_eq!((failures[0].0.as_str(), failures[0].1), ("mixed.yaml", 1));
    assert!(
        failures[0].2.starts_with("mixed.yaml, document 1, line 8"),
        "{}",
        failures[0].2
    );
    assert_eq!((failures[1].0.as_str(), failures[1].1), ("mixed.yaml", 2));
    assert!(
        failures[1].2.contains("missing apiVersion"),
        "{}",
        failures[1].2
    );
    assert_eq!(
        failures[2].2,
        "z-duplicate.yaml, document 0: the same object is also defined in mixed.yaml, document 0"
    );
    assert!(
        failures[3].2.contains("unknown kind Gadget"),
        "{}",
        failures[3].2
    );
    assert_eq!(
        report.results[0].sync_result(),
        "mixed.yaml, document 1 failed"
    );
    // good1 is applied from its first definition; only the duplicate failed.
    let good1: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.resource_key() == format!("/ConfigMap/{}/good1", ns.name))
        .map(|r| (r.origin.as_ref().unwrap().path.as_str(), r.outcome.verb()))
        .collect();
    assert_eq!(
        good1,
        [("z-duplicate.yaml", "failed"), ("mixed.yaml", "created")]
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{}/good2", ns.name)),
        &Outcome::Created
    );
    assert!(!report.all_succeeded());
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn depends_on_orders_and_skips_dependents_of_failures() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-deps").await?;
    let n = &ns.name;
    // The ConfigMap waits for the Deployment (against kind order); "needs-bad" waits for a Service
    // the apiserver refuses, and "needs-needs-bad" for that one.
    let text = format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: after-deploy
  annotations:
    config.kubernetes.io/depends-on: apps/namespaces/{n}/Deployment/web
---
apiVersion: v1
kind: Service
metadata: {{name: bad}}
spec:
  type: NotAType
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: needs-bad
  annotations: {{config.kubernetes.io/depends-on: /namespaces/{n}/Service/bad}}
---
apiVersion: nothing.example.com/v1
kind: Gadget
metadata: {{name: unknown}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: needs-unknown
  annotations: {{config.kubernetes.io/depends-on: nothing.example.com/Gadget/unknown}}
---
apiVersion: v1
kind: Secret
metadata:
  name: needs-needs-bad
  annotations: {{config.kubernetes.io/depends-on: /namespaces/{n}/ConfigMap/needs-bad}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: needs-outside
  annotations: {{config.kubernetes.io/depends-on: /namespaces/{n}/ConfigMap/made-by-someone-else}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: needs-missing
  annotations: {{config.kubernetes.io/depends-on: /namespaces/{n}/ConfigMap/not-there}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: never-bound}}
spec:
  storageClassName: no-such-class
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: needs-claim
  annotations: {{config.kubernetes.io/depends-on: /namespaces/{n}/PersistentVolumeClaim/never-bound}}
---
{}"#,
        deployment_yaml(n, "web", 1)
    );
    // A dependency outside the set, already in the cluster.
    ns.api::<ConfigMap>()
        .create(
            &Default::default(),
            &serde_json::from_value(
                serde_json::json!({"metadata": {"name": "made-by-someone-else"}}),
            )?,
        )
        .await?;
    let options = ApplyOptions {
        dependency_timeout: Duration::from_secs(10),
        ..options(n)
    };
    let report = apply(&ns.client, &[file("deps.yaml", &text)], &options).await?;
    let order: Vec<_> = report
        .results
        .iter()
        .map(|r| r.key.as_ref().unwrap().name.clone())
        .collect();
    let position = |name: &str| order.iter().position(|o| o == name).unwrap();
    assert!(position("web") < position("after-deploy"), "{order:?}");
    assert_eq!(
        outcome(&report, &format!("apps/Deployment/{n}/web")),
        &Outcome::Created
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/after-deploy")),
        &Outcome::Created
    );
    // after-deploy was applied only once web was ready: its pod was running by then.
    let after_deploy = ns.api::<ConfigMap>().get("after-deploy").await?;
    let web = ns.api::<Deployment>().get("web").await?;
    let available = web
        .status
        .and_then(|s| s.conditions)
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "Available" && c.status == "True")
        .and_then(|c| c.last_transition_time)
        .expect("web is available");
    let created = after_deploy.metadata.creation_timestamp.expect("created");
    assert!(
        available.0 <= created.0,
        "after-deploy created at {created:?}, before web was available at {available:?}"
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/needs-outside")),
        &Outcome::Created
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/needs-missing")),
        &Outcome::Skipped(format!(
            "depends on /ConfigMap/{n}/not-there, which is neither in this set nor in the cluster"
        ))
    );
    assert!(
        matches!(
            outcome(&report, &format!("/ConfigMap/{n}/needs-claim")),
            Outcome::Skipped(m) if m.starts_with(&format!(
                "depends on /PersistentVolumeClaim/{n}/never-bound which did not become ready within 10s (InProgress"
            ))
        ),
        "{:?}",
        outcome(&report, &format!("/ConfigMap/{n}/needs-claim"))
    );
    assert!(
        matches!(outcome(&report, &format!("/Service/{n}/bad")), Outcome::Failed(m) if m.contains("NotAType"))
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/needs-bad")),
        &Outcome::Skipped(format!("depends on /Service/{n}/bad which failed"))
    );
    assert_eq!(
        outcome(&report, &format!("/Secret/{n}/needs-needs-bad")),
        &Outcome::Skipped(format!("depends on /ConfigMap/{n}/needs-bad which skipped"))
    );
    assert_eq!(
        outcome(&report, &format!("/ConfigMap/{n}/needs-unknown")),
        &Outcome::Skipped("depends on nothing.example.com/Gadget//unknown which failed".into())
    );
    assert!(ns.api::<ConfigMap>().get_opt("needs-bad").await?.is_none());
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn default_namespace_and_kind_list() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-list").await?;
    let list = r#"apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: from-list}
- apiVersion: v1
  kind: Service
  metadata: {name: svc}
  spec:
    ports: [{port: 80}]
"#;
    let json = r#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "from-json"}}"#;
    let files = [file("list.yml", list), file("cm.json", json)];
    let report = apply(&ns.client, &files, &options(&ns.name)).await?;
    assert!(report.all_succeeded(), "{:#?}", report.results);
    let configmaps = ns.api::<ConfigMap>();
    configmaps.get("from-list").await?;
    configmaps.get("from-json").await?;
    ns.api::<Service>().get("svc").await?;
    let svc = report.get(&format!("/Service/{}/svc", ns.name)).unwrap();
    let origin = svc.origin.as_ref().unwrap();
    assert_eq!(
        (origin.path.as_str(), origin.list_item_index),
        ("list.yml", Some(1))
    );
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn dry_runs_write_nothing() -> anyhow::Result<()> {
    let ns = TestNamespace::create("engine-dry").await?;
    let files = [file("d.yaml", &deployment_yaml(&ns.name, "web", 1))];
    let key = format!("apps/Deployment/{}/web", ns.name);
    for strategy in [DryRunStrategy::Server, DryRunStrategy::Client] {
        let opts = ApplyOptions {
            dry_run: strategy,
            ..options(&ns.name)
        };
        let report = apply(&ns.client, &files, &opts).await?;
        let result = report.get(&key).unwrap();
        assert_eq!(
            (&result.outcome, result.dry_run),
            (&Outcome::Created, true),
            "{strategy:?}"
        );
        assert_eq!(
            result.sync_result(),
            "deployment.apps/web created (dry run)"
        );
        assert!(
            ns.api::<Deployment>().get_opt("web").await?.is_none(),
            "{strategy:?} created it"
        );
    }
    // Once it exists, a server dry run tells a change from no change.
    apply(&ns.client, &files, &options(&ns.name)).await?;
    let server = ApplyOptions {
        dry_run: DryRunStrategy::Server,
        ..options(&ns.name)
    };
    let same = apply(&ns.client, &files, &server).await?;
    assert_eq!(outcome(&same, &key), &Outcome::Unchanged);
    let scaled = [file("d.yaml", &deployment_yaml(&ns.name, "web", 3))];
    let changed = apply(&ns.client, &scaled, &server).await?;
    assert_eq!(outcome(&changed, &key), &Outcome::Configured);
    let stored = ns.api::<Deployment>().get("web").await?;
    assert_eq!(stored.spec.and_then(|s| s.replicas), Some(1));
    ns.delete().await?;
    Ok(())
}

#[tokio::test]
async fn many_objects_are_applied_in_concurrent_batches_and_resync_unchanged() -> anyhow::Result<()>
{
    let ns = TestNamespace::create("engine-many").await?;
    let n = &ns.name;
    let mut text = String::new();
    for i in 0..300 {
        text.push_str(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:03}}}\ndata: {{i: \"{i}\"}}\n---\n"));
    }
    for i in 0..20 {
        text.push_str(&deployment_yaml(n, &format!("web-{i:02}"), 1));
        text.push_str("---\n");
    }
    let files = [file("many.yaml", &text)];
    let started = Instant::now();
    let report = apply(&ns.client, &files, &options(n)).await?;
    let first = started.elapsed();
    assert_eq!(
        report.count("created"),
        320,
        "{:#?}",
        report.results.iter().find(|r| !r.outcome.is_success())
    );
    // Results stay in apply order: all ConfigMaps (sorted by name), then the Deployments.
    let names: Vec<_> = report
        .results
        .iter()
        .map(|r| r.key.as_ref().unwrap().name.clone())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let started = Instant::now();
    let again = apply(&ns.client, &files, &options(n)).await?;
    eprintln!(
        "320 objects: created in {first:?}, unchanged re-sync in {:?}",
        started.elapsed()
    );
    assert_eq!(
        again.count("unchanged"),
        320,
        "{:#?}",
        again
            .results
            .iter()
            .find(|r| r.outcome != Outcome::Unchanged)
    );
    ns.delete().await?;
    Ok(())
}
