//! The impersonation grant of the installs, asked of the real apiserver (`kubectl auth can-i --as` the
//! agent's ServiceAccount): the agentk chart's `rbac.impersonate` and `agentk generate --impersonate` grant
//! exactly what the Kubernetes API proxy sets (user, uid, groups, any extra), and only when asked.
//! Needs the test environment (`cargo xtask cluster up`, then export `GITOPS_TEST_ENV`).

use std::process::{Command, Stdio};

use test_support::{cluster::TestNamespace, env::test_env, env::unique_name};

fn run(mut command: Command, stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tool starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut command = Command::new(&test_env().tools.kubectl);
    command
        .args(args)
        .env("KUBECONFIG", &test_env().kubernetes.kubeconfig);
    run(command, stdin)
}

fn kubectl_ok(args: &[&str], stdin: Option<&str>) -> String {
    let (ok, text) = kubectl(args, stdin);
    assert!(ok, "kubectl {args:?}: {text}");
    text
}

/// What the proxy impersonates, as the apiserver's impersonation filter checks it: (resource, subresource,
/// name) in the core group or `authentication.k8s.io`; an extra is the subresource `<key>` of `userextras`.
const IMPERSONATED: [(&str, &str, &str, &str); 6] = [
    ("", "users", "", "gitlab:ci_job:1"),
    ("", "groups", "", "gitlab:ci_job"),
    ("", "serviceaccounts", "", "default"),
    ("authentication.k8s.io", "uids", "", "ci-token-1"),
    (
        "authentication.k8s.io",
        "userextras",
        "agent.gitlab.com/id",
        "7",
    ),
    (
        "authentication.k8s.io",
        "userextras",
        "a-key-access_as-impersonate-configures",
        "x",
    ),
];

/// Whether the ServiceAccount `namespace/name` may impersonate each of [`IMPERSONATED`], by
/// SubjectAccessReview.
async fn can_impersonate(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Vec<(String, bool)> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let reviews: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let mut answers = Vec::new();
    for (group, resource, subresource, object) in IMPERSONATED {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{namespace}:{name}")),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{namespace}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("impersonate".into()),
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource: Some(subresource.into()),
                    name: Some(object.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&Default::default(), &review)
            .await
            .expect("a SubjectAccessReview");
        answers.push((
            format!("{resource}/{subresource} {object}"),
            answer.status.is_some_and(|s| s.allowed),
        ));
    }
    answers
}

fn chart(release: &str, namespace: &str, impersonate: Option<bool>) -> String {
    let mut set = "token=t,kasAddress=wss://kas.example".to_owned();
    if let Some(impersonate) = impersonate {
        set.push_str(&format!(",rbac.impersonate={impersonate}"));
    }
    let mut command = Command::new(&test_env().tools.helm);
    command
        .args([
            "template",
            release,
            "agentk",
            "--namespace",
            namespace,
            "--set",
            &set,
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts"));
    let (ok, yaml) = run(command, None);
    assert!(ok, "helm template: {yaml}");
    yaml
}

#[tokio::test]
async fn the_chart_grants_impersonation_only_with_rbac_impersonate() {
    let ns = TestNamespace::create("chart-imp").await.unwrap();
    let release = unique_name("r");
    let account = format!("{release}-agentk");
    // Off by default: no such object at all.
    let default = chart(&release, &ns.name, None);
    assert!(!default.contains("impersonate"), "{default}");
    assert_eq!(default, chart(&release, &ns.name, Some(false)));
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&default));
    let answers = can_impersonate(&ns.client, &ns.name, &account).await;
    assert!(answers.iter().all(|(_, yes)| !yes), "{answers:?}");

    let with = chart(&release, &ns.name, Some(true));
    kubectl_ok(&["apply", "-n", &ns.name, "-f", "-"], Some(&with));
    for (resource, yes) in can_impersonate(&ns.client, &ns.name, &account).await {
        assert!(yes, "{account} cannot impersonate {resource}");
    }

    let name = format!("{release}-agentk");
    // write-all exists only with rbac.clusterWrite=true (the chart writes only its namespace by default).
    kubectl_ok(
        &[
            "delete",
            "--ignore-not-found",
            &format!("clusterrole/{name}-impersonate"),
            &format!("clusterrolebinding/{name}-impersonate"),
            &format!("clusterrole/{name}-read-all"),
            &format!("clusterrolebinding/{name}-read-all"),
            &format!("clusterrole/{name}-write-all"),
            &format!("clusterrolebinding/{name}-write-all"),
        ],
        None,
    );
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn generate_grants_impersonation_only_with_impersonate() {
    let ns = TestNamespace::create("gen-imp").await.unwrap();
    let options = |impersonate| agentk::generate::InstallOptions {
        namespace: ns.name.clone(),
        kas_address: "wss://kas.example".into(),
        agent_token: "unused".into(),
        agent_version: "stable".into(),
        image_repository: "agentk".into(),
        cluster_write: false,
        impersonate,
    };
    let account = "gitlab-agent".to_owned();
    // The namespace exists already; apply everything but it.
    let without_namespace = |yaml: String| {
        yaml.split("\n---\n")
            .filter(|d| !d.contains("\nkind: Namespace\n"))
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&without_namespace(agentk::generate::manifests(&options(
            false,
        )))),
    );
    let answers = can_impersonate(&ns.client, &ns.name, &account).await;
    assert!(answers.iter().all(|(_, yes)| !yes), "{answers:?}");
    kubectl_ok(
        &["apply", "-f", "-"],
        Some(&without_namespace(agentk::generate::manifests(&options(
            true,
        )))),
    );
    for (resource, yes) in can_impersonate(&ns.client, &ns.name, &account).await {
        assert!(yes, "{account} cannot impersonate {resource}");
    }
    let n = &ns.name;
    kubectl_ok(
        &[
            "delete",
            &format!("clusterrolebinding/gitlab-agent-impersonate:{n}"),
            &format!("clusterrolebinding/gitops-read-all:{n}"),
            &format!("clusterrolebinding/gitlab-agent-alert-reader:{n}"),
        ],
        None,
    );
    ns.delete().await.unwrap();
}
