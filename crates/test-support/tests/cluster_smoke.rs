//! The test cluster behaves like a cluster: Deployments get Running pods on the kwok nodes, and the garbage
//! collector removes what a deleted Deployment owned. Needs `cargo xtask test`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, ReplicaSet};
use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use test_support::cluster::TestNamespace;

const TIMEOUT: Duration = Duration::from_secs(120);

fn deployment(name: &str, replicas: i32) -> Deployment {
    let labels = BTreeMap::from([("app".to_owned(), name.to_owned())]);
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "web".to_owned(),
                        image: Some("registry.invalid/web:1".to_owned()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn running(pods: &[Pod]) -> usize {
    pods.iter()
        .filter(|pod| pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .count()
}

/// Polls `check` until it returns true or [`TIMEOUT`] passes; returns the last description for the message.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String)>,
{
    let start = Instant::now();
    loop {
        let (done, state) = check().await;
        if done {
            return;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "timed out after {TIMEOUT:?} waiting for {what}; last seen: {state}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn deployment_with_two_replicas_gets_two_running_pods() {
    let ns = TestNamespace::create("smoke-running")
        .await
        .expect("namespace");
    let deployments: Api<Deployment> = ns.api();
    let pods: Api<Pod> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment("web", 2))
        .await
        .expect("create deployment");

    wait_until("2 Running pods", || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .expect("list pods");
        let phases: Vec<_> = list
            .items
            .iter()
            .map(|p| p.status.as_ref().and_then(|s| s.phase.clone()))
            .collect();
        (
            running(&list.items) == 2 && list.items.len() == 2,
            format!("{phases:?}"),
        )
    })
    .await;

    let list = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list pods");
    for pod in &list.items {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        assert!(
            node.is_some(),
            "pod {:?} is Running but not bound to a node",
            pod.metadata.name
        );
    }
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn deleting_a_deployment_garbage_collects_its_replicaset_and_pods() {
    let ns = TestNamespace::create("smoke-gc").await.expect("namespace");
    let deployments: Api<Deployment> = ns.api();
    let replicasets: Api<ReplicaSet> = ns.api();
    let pods: Api<Pod> = ns.api();
    deployments
        .create(&PostParams::default(), &deployment("web", 2))
        .await
        .expect("create deployment");

    wait_until("a ReplicaSet and 2 Running pods", || async {
        let rs = replicasets
            .list(&ListParams::default())
            .await
            .expect("list replicasets")
            .items
            .len();
        let list = pods.list(&ListParams::default()).await.expect("list pods");
        (
            rs == 1 && running(&list.items) == 2,
            format!("{rs} replicasets, {} running pods", running(&list.items)),
        )
    })
    .await;

    // No propagation policy: the API's default for Deployments is background deletion by the garbage
    // collector, which is what this checks.
    deployments
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete deployment");

    wait_until(
        "the ReplicaSet and pods to be garbage collected",
        || async {
            let rs = replicasets
                .list(&ListParams::default())
                .await
                .expect("list replicasets")
                .items
                .len();
            let pod_count = pods
                .list(&ListParams::default())
                .await
                .expect("list pods")
                .items
                .len();
            (
                rs == 0 && pod_count == 0,
                format!("{rs} replicasets, {pod_count} pods"),
            )
        },
    )
    .await;
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn rbac_denies_a_service_account_what_no_role_grants() {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let ns = TestNamespace::create("smoke-rbac")
        .await
        .expect("namespace");
    let reviews: Api<SubjectAccessReview> = Api::all(ns.client.clone());
    // Asks the API server's authorizer whether `user` in `groups` may list secrets in the namespace.
    let may_list_secrets = |user: &str, groups: &[&str]| {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.to_owned()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.name.clone()),
                    verb: Some("list".to_owned()),
                    resource: Some("secrets".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviews = reviews.clone();
        async move {
            let answer = reviews
                .create(&PostParams::default(), &review)
                .await
                .expect("review");
            answer.status.expect("review status").allowed
        }
    };

    let service_account = format!("system:serviceaccount:{}:default", ns.name);
    let groups = ["system:serviceaccounts", "system:authenticated"];
    assert!(
        !may_list_secrets(&service_account, &groups).await,
        "RBAC lets {service_account} list secrets"
    );
    // The same question for the admin identity the tests use is answered yes: the answer above is RBAC's.
    assert!(
        may_list_secrets("kubernetes-admin", &["system:masters"]).await,
        "system:masters may not list secrets"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn helm_from_the_tools_cache_reaches_the_cluster() {
    let env = test_support::env::test_env();
    let ns = TestNamespace::create("smoke-helm")
        .await
        .expect("namespace");
    let output = tokio::process::Command::new(&env.tools.helm)
        .arg(format!(
            "--kubeconfig={}",
            env.kubernetes.kubeconfig.display()
        ))
        .args(["list", "--namespace", &ns.name, "--output", "json"])
        .output()
        .await
        .expect("run helm");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "helm list failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");
    ns.delete().await.expect("delete namespace");
}
