//! The installs, run for real: agentk under the ServiceAccount that `agentk generate` or the agentk chart
//! creates, with a kube client built from that ServiceAccount's own token (TokenRequest API), never the
//! admin kubeconfig, against kas (the [`Harness`]) with manifests from Git. In both RBAC modes it must
//! become leader (its Lease) and apply into its namespace (its inventory ConfigMap too); in the restricted
//! mode a manifest for another namespace fails, that object only, with the apiserver's 403 text, and
//! nothing is pruned while it fails.

use std::{collections::BTreeMap, process::Command, sync::Arc, time::Duration};

use agentk::{
    apply::EngineApplier,
    gitops::ApplySettings,
    leader::{self, LeaseConfig},
};
use anyhow::Context;
use e2e::{CONFIG_FILE, CONFIG_PROJECT, Harness, eventually};
use k8s_openapi::api::{
    authentication::v1::SelfSubjectReview,
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::ConfigMap,
};
use kube::{
    Api, Client, Config,
    api::PostParams,
    config::{AuthInfo, KubeConfigOptions, Kubeconfig},
};
use test_support::{
    cluster::{TestNamespace, install_crypto_provider},
    env::{test_env, unique_name},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn run(command: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    e2e::process::run_against_cluster(command, &test_env().kubernetes.kubeconfig, stdin)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.kubectl);
    command.args(args);
    run(command, stdin)
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.helm);
    command
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts"));
    run(command, None)
}

/// Which installer, in which RBAC mode.
#[derive(Debug, Clone, Copy)]
enum Installer {
    Generate { cluster_write: bool },
    Chart { cluster_write: bool },
}

/// An install applied into its own fresh namespace, and the cluster-scoped objects it created (deleted
/// at the end; the `agentk generate` ClusterRoles are shared by every install and stay).
struct Install {
    ns: TestNamespace,
    service_account: String,
    cluster_scoped: Vec<String>,
}

impl Install {
    async fn apply(installer: Installer) -> anyhow::Result<Self> {
        let ns = TestNamespace::create("restricted").await?;
        let n = ns.name.clone();
        let (service_account, cluster_scoped) = match installer {
            Installer::Generate { cluster_write } => {
                let yaml = agentk::generate::manifests(&agentk::generate::InstallOptions {
                    namespace: n.clone(),
                    kas_address: "wss://kas.example".into(),
                    agent_token: "kasagent_unused".into(),
                    agent_version: "stable".into(),
                    image_repository: "agentk".into(),
                    cluster_write,
                    impersonate: false,
                });
                kubectl(&["apply", "-f", "-"], Some(&yaml))?;
                let mut bindings = vec![
                    format!("clusterrolebinding/gitops-read-all:{n}"),
                    format!("clusterrolebinding/gitlab-agent-alert-reader:{n}"),
                ];
                if cluster_write {
                    bindings.push(format!("clusterrolebinding/gitops-write-all:{n}"));
                }
                ("gitlab-agent".to_owned(), bindings)
            }
            Installer::Chart { cluster_write } => {
                let release = unique_name("r");
                let yaml = helm(&[
                    "template",
                    &release,
                    "agentk",
                    "--namespace",
                    &n,
                    "--set",
                    &format!(
                        "token=t,kasAddress=wss://kas.example,rbac.clusterWrite={cluster_write}"
                    ),
                ])?;
                kubectl(&["apply", "-n", &n, "-f", "-"], Some(&yaml))?;
                let name = format!("{release}-agentk");
                let mut objects = vec![
                    format!("clusterrole/{name}-read-all"),
                    format!("clusterrolebinding/{name}-read-all"),
                ];
                if cluster_write {
                    objects.push(format!("clusterrole/{name}-write-all"));
                    objects.push(format!("clusterrolebinding/{name}-write-all"));
                }
                (name, objects)
            }
        };
        Ok(Self {
            ns,
            service_account,
            cluster_scoped,
        })
    }

    /// A client that authenticates as the install's ServiceAccount with a token from the TokenRequest
    /// API: the admin kubeconfig gives only the server address and its CA.
    async fn client(&self) -> anyhow::Result<Client> {
        install_crypto_provider();
        let token = self.ns.service_account_token(&self.service_account).await?;
        let mut kubeconfig = Kubeconfig::read_from(&test_env().kubernetes.kubeconfig)?;
        let auth: AuthInfo = serde_json::from_value(serde_json::json!({ "token": token }))?;
        for user in &mut kubeconfig.auth_infos {
            user.auth_info = Some(auth.clone());
        }
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        let client = Client::try_from(config)?;
        // Who the apiserver says this is.
        let review = Api::<SelfSubjectReview>::all(client.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await?;
        let username = review
            .status
            .and_then(|s| s.user_info)
            .and_then(|u| u.username);
        assert_eq!(
            username.as_deref(),
            Some(
                format!(
                    "system:serviceaccount:{}:{}",
                    self.ns.name, self.service_account
                )
                .as_str()
            )
        );
        Ok(client)
    }

    async fn delete(self) -> anyhow::Result<()> {
        let mut args = vec!["delete", "--ignore-not-found"];
        args.extend(self.cluster_scoped.iter().map(String::as_str));
        kubectl(&args, None)?;
        self.ns.delete().await?;
        Ok(())
    }
}

/// Whether `client` may `verb` `resource` (core group) in `namespace` (`None`: all namespaces), by a
/// SelfSubjectAccessReview: the apiserver's own answer.
async fn can(
    client: &Client,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
) -> anyhow::Result<bool> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn configmap(name: &str, namespace: Option<&str>) -> String {
    let namespace = namespace.map_or(String::new(), |n| format!("\n  namespace: {n}"));
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}{namespace}\ndata:\n  value: v\n"
    )
}

/// The last sync in GraphQL: (commit, outcome, resourceKey → (result, message)).
async fn last_sync(
    h: &Harness,
    agent_id: &str,
) -> anyhow::Result<(String, String, BTreeMap<String, (String, String)>)> {
    let query = format!(
        r#"{{ clusterAgent(id: "{agent_id}") {{ manifestProjects {{ lastSync {{ commitSeen outcome objects {{ resourceKey result message }} }} }} }} }}"#
    );
    let view = h.graphql(&query).await?;
    let sync = &view["data"]["clusterAgent"]["manifestProjects"][0]["lastSync"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let objects = sync["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            (
                text(&o["resourceKey"]),
                (text(&o["result"]), text(&o["message"])),
            )
        })
        .collect();
    Ok((text(&sync["commitSeen"]), text(&sync["outcome"]), objects))
}

/// Waits (up to a minute) for the last sync of `commit` and returns (outcome, objects).
async fn synced(
    h: &Harness,
    agent_id: &str,
    commit: &str,
) -> anyhow::Result<(String, BTreeMap<String, (String, String)>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (seen, outcome, objects) = last_sync(h, agent_id).await?;
        if seen == commit && !outcome.is_empty() {
            return Ok((outcome, objects));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "commit {commit} not synced within a minute; last sync: {seen} {outcome} {objects:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// agentk as its pod runs it (`main.rs`: Lease leader election, then the engine), with `client`.
fn agent_settings(
    client: Client,
    namespace: &str,
    stop: &CancellationToken,
) -> (ApplySettings, watch::Receiver<bool>) {
    let (leading_tx, leading) = watch::channel(false);
    let lease = LeaseConfig::new(namespace, "agentk-leader", "gitlab-agent-0");
    tokio::spawn(leader::run(client.clone(), lease, leading_tx, stop.clone()));
    let applier = EngineApplier::new(
        client,
        namespace.to_owned(),
        test_env().kubernetes.server.clone(),
    );
    let settings = ApplySettings {
        applier: Arc::new(applier),
        leading: leading.clone(),
        resync: Duration::ZERO,
    };
    (settings, leading)
}

/// The whole scenario for one installer: lead, apply into the own namespace and (by mode) into another,
/// keep what is removed from Git while something fails, prune it once nothing does.
async fn agent_runs_under_its_install(installer: Installer) -> anyhow::Result<()> {
    let cluster_write = match installer {
        Installer::Generate { cluster_write } | Installer::Chart { cluster_write } => cluster_write,
    };
    let install = Install::apply(installer).await?;
    let client = install.client().await?;
    let n = install.ns.name.clone();
    let other = TestNamespace::create("restricted-other").await?;
    let o = other.name.clone();
    // The apiserver's view of the grants, before anything runs.
    assert!(can(&client, "create", "configmaps", Some(&n)).await?);
    assert_eq!(
        can(&client, "patch", "configmaps", Some(&o)).await?,
        cluster_write,
        "{installer:?}: writes to another namespace"
    );

    let h = Harness::start(false).await?;
    h.git.create_repo("group/manifests", true)?;
    h.git.commit_files(
        CONFIG_PROJECT,
        &[(
            CONFIG_FILE,
            Some(&format!(
                "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {n}\n    paths:\n    - glob: '*.yaml'\n"
            )),
        )],
        "config",
    )?;
    let first = h.git.commit_files(
        "group/manifests",
        &[
            ("a.yaml", Some(&configmap("a", None))),
            ("b.yaml", Some(&configmap("b", None))),
            ("elsewhere.yaml", Some(&configmap("x", Some(&o)))),
        ],
        "a, b and one elsewhere",
    )?;
    let (agent_id, _, secret) = h.register_agent().await?;
    let stop = CancellationToken::new();
    let (settings, mut leading) = agent_settings(client, &n, &stop);
    let agent = h.agent_with(h.client_config("grpc", &secret), Some(settings))?;
    tokio::time::timeout(Duration::from_secs(30), async {
        leading.wait_for(|l| *l).await.map(|_| ())
    })
    .await
    .with_context(|| format!("{installer:?}: never became leader"))??;

    let (outcome, objects) = synced(&h, &agent_id, &first).await?;
    let result = |key: &str| objects.get(key).cloned().unwrap_or_default();
    // "unchanged" when a retry of the partial sync (5 s later) was reported before this poll saw the first.
    for name in ["a", "b"] {
        let applied = result(&format!("/ConfigMap/{n}/{name}")).0;
        assert!(
            applied == "created" || applied == "unchanged",
            "{name}: {objects:?}"
        );
    }
    let ours: Api<ConfigMap> = install.ns.api();
    let theirs: Api<ConfigMap> = other.api();
    if cluster_write {
        assert_eq!(outcome, "synced", "{objects:?}");
        assert!(theirs.get_opt("x").await?.is_some());
    } else {
        assert_eq!(outcome, "partial", "{objects:?}");
        let (x, message) = result(&format!("/ConfigMap/{o}/x"));
        assert_eq!(x, "failed", "{objects:?}");
        let sa = &install.service_account;
        assert!(
            message.contains(&format!(
                "is forbidden: User \"system:serviceaccount:{n}:{sa}\" cannot"
            )) && message.contains(&format!("in the namespace \"{o}\"")),
            "the apiserver's reason: {message}"
        );
        assert!(theirs.get_opt("x").await?.is_none());
    }
    for name in ["a", "b"] {
        assert!(ours.get_opt(name).await?.is_some(), "{name}");
    }

    if !cluster_write {
        // b leaves Git while x still fails: nothing is pruned.
        let second = h
            .git
            .commit_files("group/manifests", &[("b.yaml", None)], "drop b")?;
        let (outcome, objects) = synced(&h, &agent_id, &second).await?;
        assert_eq!(outcome, "partial", "{objects:?}");
        assert!(
            ours.get_opt("b").await?.is_some(),
            "b was pruned while x failed"
        );
        // x leaves Git too: now b is pruned, under the same restricted grants.
        let third = h
            .git
            .commit_files("group/manifests", &[("elsewhere.yaml", None)], "drop x")?;
        let (outcome, objects) = synced(&h, &agent_id, &third).await?;
        assert_eq!(outcome, "synced", "{objects:?}");
        assert_eq!(result_of(&objects, &format!("/ConfigMap/{n}/b")), "pruned");
        eventually(Duration::from_secs(30), "b gone", || async {
            Ok(ours.get_opt("b").await?.is_none())
        })
        .await?;
        assert!(ours.get_opt("a").await?.is_some());
    }

    agent.shutdown().await;
    stop.cancel();
    other.delete().await?;
    install.delete().await?;
    Ok(())
}

fn result_of(objects: &BTreeMap<String, (String, String)>, key: &str) -> String {
    objects.get(key).map(|o| o.0.clone()).unwrap_or_default()
}

#[tokio::test]
async fn agentk_runs_under_the_generated_restricted_rbac() -> anyhow::Result<()> {
    agent_runs_under_its_install(Installer::Generate {
        cluster_write: false,
    })
    .await
}

#[tokio::test]
async fn agentk_runs_under_the_generated_cluster_write_rbac() -> anyhow::Result<()> {
    agent_runs_under_its_install(Installer::Generate {
        cluster_write: true,
    })
    .await
}

#[tokio::test]
async fn agentk_runs_under_the_charts_restricted_rbac() -> anyhow::Result<()> {
    agent_runs_under_its_install(Installer::Chart {
        cluster_write: false,
    })
    .await
}

#[tokio::test]
async fn agentk_runs_under_the_charts_cluster_write_rbac() -> anyhow::Result<()> {
    agent_runs_under_its_install(Installer::Chart {
        cluster_write: true,
    })
    .await
}

/// Two agents installed with `agentk generate` into two namespaces of one cluster: the second install
/// must not take the first one's grants away. The cluster role bindings once had fixed names, so the
/// second `kubectl apply` replaced their subject and the first agent could neither read nor write.
#[tokio::test]
async fn a_second_generated_install_leaves_the_first_its_grants() -> anyhow::Result<()> {
    let first = Install::apply(Installer::Generate {
        cluster_write: true,
    })
    .await?;
    let second = Install::apply(Installer::Generate {
        cluster_write: false,
    })
    .await?;
    let third = Install::apply(Installer::Generate {
        cluster_write: true,
    })
    .await?;
    let client = first.client().await?;
    assert!(
        can(&client, "list", "pods", None).await?,
        "the first agent lost gitops-read-all"
    );
    assert!(
        can(&client, "patch", "configmaps", Some(&second.ns.name)).await?,
        "the first agent lost gitops-write-all"
    );
    let restricted = second.client().await?;
    assert!(can(&restricted, "list", "pods", None).await?);
    assert!(!can(&restricted, "patch", "configmaps", Some(&first.ns.name)).await?);
    for install in [first, second, third] {
        install.delete().await?;
    }
    Ok(())
}
