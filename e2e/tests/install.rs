//! Installing the halves against the real kube-apiserver: the seed's step 3 (`agentk generate | kubectl
//! apply -f -`) and the Helm charts, whose kas configuration must be one kas accepts.

use std::process::Command;

use anyhow::Context;
use gitops_config::ServerConfig;
use test_support::{cluster::TestNamespace, env::test_env};

fn run(command: Command, stdin: Option<&str>) -> anyhow::Result<String> {
    e2e::process::run_against_cluster(command, &test_env().kubernetes.kubeconfig, stdin)
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.helm);
    command
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts"));
    run(command, None)
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new(&test_env().tools.kubectl);
    command.args(args);
    run(command, stdin)
}

#[tokio::test]
async fn agentk_generate_output_applies_to_a_real_cluster() -> anyhow::Result<()> {
    let ns = TestNamespace::create("install").await?;
    let manifests = agentk::generate::manifests(&agentk::generate::InstallOptions {
        namespace: ns.name.clone(),
        kas_address: "wss://kas.example".into(),
        agent_token: "kasagent_test".into(),
        agent_version: "stable".into(),
        image_repository: "agentk".into(),
        cluster_write: false,
        impersonate: false,
    });
    let applied = kubectl(&["apply", "-f", "-"], Some(&manifests))?;
    let n = &ns.name;
    for object in [
        "serviceaccount/gitlab-agent".to_owned(),
        "secret/gitlab-agent-token".to_owned(),
        "role.rbac.authorization.k8s.io/gitlab-agent-state".to_owned(),
        "rolebinding.rbac.authorization.k8s.io/gitlab-agent-state".to_owned(),
        format!("clusterrolebinding.rbac.authorization.k8s.io/gitops-read-all:{n}"),
        "rolebinding.rbac.authorization.k8s.io/gitops-write-own-namespace".to_owned(),
        "deployment.apps/gitlab-agent".to_owned(),
    ] {
        assert!(
            applied.contains(&format!("{object} created")),
            "{object} missing from:\n{applied}"
        );
    }
    // The cluster roles are the same for every install, so an earlier install may have created them.
    assert!(
        ["created", "unchanged", "configured"]
            .iter()
            .any(|verb| applied.contains(&format!(
                "clusterrole.rbac.authorization.k8s.io/gitops-read-all {verb}"
            ))),
        "{applied}"
    );
    // With cluster-wide write the article's gitops-write-all validates too (server-side dry run, so this test
    // leaves no cluster-wide write grant behind).
    let seed_like = agentk::generate::manifests(&agentk::generate::InstallOptions {
        namespace: ns.name.clone(),
        kas_address: "wss://kas.example".into(),
        agent_token: "kasagent_test".into(),
        agent_version: "stable".into(),
        image_repository: "agentk".into(),
        cluster_write: true,
        impersonate: false,
    });
    let dry = kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&seed_like))?;
    assert!(
        dry.contains(&format!(
            "clusterrolebinding.rbac.authorization.k8s.io/gitops-write-all:{n} created (server dry run)"
        )),
        "{dry}"
    );
    // Only this install's bindings: the cluster roles are shared with any other install in the cluster.
    kubectl(
        &[
            "delete",
            "clusterrolebinding",
            &format!("gitops-read-all:{n}"),
            &format!("gitlab-agent-alert-reader:{n}"),
            &format!("gitlab-agent-events:{n}"),
            "--ignore-not-found",
        ],
        None,
    )?;
    ns.delete().await?;
    Ok(())
}

/// The `kas.yaml` the kas chart renders with `--set values`, parsed by kas's own parser.
fn kas_config_from_chart(values: &str) -> anyhow::Result<ServerConfig> {
    let configmap = helm(&[
        "template",
        "r",
        "kas",
        "--set",
        values,
        "--show-only",
        "templates/configmap.yaml",
    ])?;
    let object: serde_json::Value = serde_saphyr::from_str(&configmap)?;
    let kas_yaml = object["data"]["kas.yaml"]
        .as_str()
        .context("kas.yaml in the ConfigMap")?;
    Ok(ServerConfig::parse("charts/kas ConfigMap", kas_yaml)?)
}

#[tokio::test]
async fn helm_charts_render_valid_objects_and_a_kas_config_kas_accepts() -> anyhow::Result<()> {
    let ns = TestNamespace::create("charts").await?;
    let config = kas_config_from_chart("adminToken=x,git.baseUrl=https://git.example")?;
    assert_eq!(config.git.base_url, "https://git.example");
    assert_eq!(config.listen.agent.port(), 8150);
    assert_eq!(config.webhooks.secret_file, None, "webhooks are opt-in");

    // Webhooks and a private CA for the Git server reach kas's configuration.
    let config = kas_config_from_chart(
        "adminToken=x,webhooks.enabled=true,webhookSecret=s,git.caConfigMap=git-ca",
    )?;
    assert_eq!(
        config.webhooks.secret_file.as_deref(),
        Some(std::path::Path::new("/etc/kas/secrets/webhook-secret"))
    );
    assert_eq!(
        config.git.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/kas/git-ca/ca.crt"))
    );

    let kas = helm(&[
        "template",
        "r",
        "kas",
        "--namespace",
        &ns.name,
        "--set",
        "adminToken=x,webhooks.enabled=true,webhookSecret=s,git.caConfigMap=git-ca",
    ])?;
    let agentk = helm(&[
        "template",
        "r",
        "agentk",
        "--namespace",
        &ns.name,
        "--set",
        "token=t,kasAddress=wss://kas.example",
    ])?;
    for (chart, rendered) in [("kas", &kas), ("agentk", &agentk)] {
        let out = kubectl(
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            Some(rendered),
        )
        .with_context(|| format!("chart {chart}"))?;
        assert!(
            out.contains("deployment.apps/r-") && out.contains("(server dry run)"),
            "{chart}: {out}"
        );
    }
    // Required values are enforced.
    assert!(
        helm(&["template", "r", "agentk"])
            .unwrap_err()
            .to_string()
            .contains("config.token (or config.secretName, a Secret with key `token`) is required")
    );
    ns.delete().await?;
    Ok(())
}
