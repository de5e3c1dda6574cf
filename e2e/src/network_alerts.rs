//! The network-policy alerts world, for the end-to-end test and the benchmark: kas and agentk as
//! processes (the real binaries) against the real Gitea and kube-apiserver, agentk following a
//! [`ReplayServer`] (the stand-in for Cilium's datapath, which cannot run here), kas optionally forwarding
//! to a real Alertmanager.

use std::{process::Command, time::Duration};

use anyhow::ensure;
use gitops_hubble::{
    flow::{self, CiliumEventType, Endpoint, Flow, Layer4, Tcp, TrafficDirection, Verdict},
    testing::ReplayServer,
};
use serde_json::{Value, json};
use test_support::{cluster::TestNamespace, env::test_env, gitea::Gitea};

use crate::process::{GitSource, KasProcess, Killed, sibling_binary, spawn_logged};

const WEBHOOK_SECRET: &str = "hook-secret";

/// What the world is made of.
pub struct AlertsOptions<'a> {
    /// Prefix of the namespace and repositories.
    pub name: &'a str,
    /// Lines added under `cilium:` in config.yaml (indented two spaces), e.g. the rate limit.
    pub cilium_extra: &'a str,
    /// Manifests in the manifest project at the start.
    pub manifests: Vec<(String, String)>,
    /// kas.yaml's `alerts:` section body (indented two spaces), if any.
    pub kas_alerts: Option<String>,
    /// agentk's log level until config.yaml sets one.
    pub agentk_log_level: &'a str,
}

pub struct AlertsWorld {
    pub dir: tempfile::TempDir,
    pub ns: TestNamespace,
    pub replay: ReplayServer,
    /// The agent's GraphQL id.
    pub agent_gid: String,
    pub manifests_repo: test_support::gitea::Repository,
    pub config_repo: test_support::gitea::Repository,
    /// config.yaml's `gitops` section, to push variants of the `cilium` one.
    pub gitops_yaml: String,
    pub kas: KasProcess,
    pub agentk: Killed,
}

/// A pod endpoint as Hubble reports it: Cilium's `k8s:` labels, namespace label included.
pub fn pod(namespace: &str, name: &str, app: &str) -> Endpoint {
    Endpoint {
        namespace: namespace.into(),
        pod_name: name.into(),
        labels: vec![
            format!("k8s:app={app}"),
            format!("k8s:io.kubernetes.pod.namespace={namespace}"),
        ],
        identity: 10_000 + app.len() as u32,
        ..Default::default()
    }
}

/// A TCP packet to `port` the datapath dropped for policy, as a Hubble drop event.
pub fn policy_drop(
    source: Endpoint,
    destination: Endpoint,
    direction: TrafficDirection,
    port: u32,
) -> Flow {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Flow {
        time: Some(gitops_hubble::prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
        verdict: Verdict::Dropped as i32,
        drop_reason_desc: flow::DropReason::PolicyDenied as i32,
        event_type: Some(CiliumEventType {
            r#type: gitops_hubble::event_type::DROP,
            sub_type: 0,
        }),
        traffic_direction: direction as i32,
        ip: Some(flow::Ip {
            source: "10.244.0.10".into(),
            destination: "10.244.0.20".into(),
            ..Default::default()
        }),
        l4: Some(Layer4 {
            protocol: Some(flow::layer4::Protocol::Tcp(Tcp {
                source_port: 43210,
                destination_port: port,
                flags: None,
            })),
        }),
        source: Some(source),
        destination: Some(destination),
        node_name: "kind-worker".into(),
        ..Default::default()
    }
}

impl AlertsWorld {
    pub async fn start(options: AlertsOptions<'_>) -> anyhow::Result<Self> {
        let env = test_env();
        let gitea = Gitea::from_env();
        let ns = TestNamespace::create(options.name).await?;
        let replay = ReplayServer::start().await?;
        let config_repo = gitea
            .create_repository(&format!("{}-config", options.name))
            .await?;
        let manifests_repo = gitea
            .create_repository(&format!("{}-manifests", options.name))
            .await?;
        let gitops_yaml = format!(
            "gitops:\n  manifest_projects:\n  - id: {}\n    default_namespace: {}\n    paths:\n    - glob: '/**/*.yaml'\n",
            manifests_repo.full_name, ns.name,
        );
        let config_yaml = format!(
            "{gitops_yaml}cilium:\n  hubble_relay_address: {}\n{}",
            replay.address(),
            options.cilium_extra,
        );
        crate::push_main(
            &config_repo,
            &[(crate::CONFIG_FILE, &config_yaml)],
            "agent config",
        )
        .await?;
        let manifests: Vec<(&str, &str)> = options
            .manifests
            .iter()
            .map(|(p, c)| (p.as_str(), c.as_str()))
            .collect();
        crate::push_main(&manifests_repo, &manifests, "policies").await?;

        let dir = tempfile::tempdir()?;
        let alerts = options
            .kas_alerts
            .map(|body| format!("alerts:\n{body}"))
            .unwrap_or_default();
        // kas polls hourly: every change must come by the push webhooks.
        let git = GitSource {
            base_url: env.gitea.url.clone(),
            username: env.gitea.admin_user.clone(),
            password: env.gitea.admin_password.clone(),
            poll_period: "1h".into(),
            webhook_secret: Some(WEBHOOK_SECRET.into()),
        };
        let kas_log = std::fs::File::create(dir.path().join("kas.log"))?;
        let kas =
            KasProcess::start_with_extra(&git, dir.path(), "info", kas_log.into(), &alerts).await?;
        let api_url = format!("http://127.0.0.1:{}", kas.api_port);
        for repo in [&manifests_repo, &config_repo] {
            gitea
                .add_push_webhook(
                    repo,
                    &format!("{api_url}/api/webhooks/gitea"),
                    WEBHOOK_SECRET,
                )
                .await?;
        }
        let (agent_gid, _, token) =
            crate::register_agent(&kas.admin, &config_repo.full_name).await?;
        let mut agentk = Command::new(sibling_binary("agentk")?);
        agentk
            .arg(format!("--kas-address=grpc://127.0.0.1:{}", kas.agent_port))
            .env("AGENTK_TOKEN", &token)
            .env("KUBECONFIG", &env.kubernetes.kubeconfig)
            .env("POD_NAMESPACE", &ns.name)
            .env("POD_NAME", format!("agentk-{}-0", options.name))
            .arg(format!("--log-level={}", options.agentk_log_level));
        let agentk = spawn_logged(agentk, &dir.path().join("agentk.log"))?;
        Ok(Self {
            dir,
            ns,
            replay,
            agent_gid,
            manifests_repo,
            config_repo,
            gitops_yaml,
            kas,
            agentk,
        })
    }

    /// Pushes config.yaml with `cilium` replaced by `cilium` (the section's body, or none).
    pub async fn push_cilium(&self, cilium: Option<&str>) -> anyhow::Result<()> {
        let yaml = match cilium {
            Some(body) => format!("{}cilium:\n{body}", self.gitops_yaml),
            None => self.gitops_yaml.clone(),
        };
        crate::push_main(
            &self.config_repo,
            &[(crate::CONFIG_FILE, &yaml)],
            "cilium changed",
        )
        .await?;
        Ok(())
    }

    /// `clusterAgent { networkAlertsStatus }`.
    pub async fn status(&self) -> anyhow::Result<Value> {
        let data = self
            .kas
            .admin
            .execute(
                "query($id: ID!) { clusterAgent(id: $id) { networkAlertsStatus { state message since \
                 flowsSeen flowsMatched lostEvents suppressed connects networkPolicies ciliumNetworkPolicies \
                 ciliumClusterwideNetworkPolicies ciliumCrdsAbsent policyWatchError } } }",
                json!({ "id": self.agent_gid }),
            )
            .await?;
        Ok(data["clusterAgent"]["networkAlertsStatus"].clone())
    }

    /// `clusterAgent { networkAlerts(first: 100) }`, newest first.
    pub async fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let data = self
            .kas
            .admin
            .execute(
                "query($id: ID!) { clusterAgent(id: $id) { networkAlerts(first: 100) { id policy policyKind \
                 source destination port protocol direction verdict dropReason count firstSeen lastSeen \
                 resolved sourceEndpoint { namespace podName ip } destinationEndpoint { namespace podName ip } } } }",
                json!({ "id": self.agent_gid }),
            )
            .await?;
        Ok(data["clusterAgent"]["networkAlerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits until the status satisfies `check`; the error shows the last status and agentk's log tail.
    pub async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let status = self.status().await.unwrap_or(Value::Null);
            if check(&status) {
                return Ok(status);
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!(
                    "{what}: not within {within:?}; status {status}\nagentk log tail:\n{}",
                    self.log_tail("agentk.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the alerts satisfy `check`, returning them.
    pub async fn wait_alerts(
        &self,
        within: Duration,
        what: &str,
        check: impl Fn(&[Value]) -> bool,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            let alerts = self.alerts().await.unwrap_or_default();
            if check(&alerts) {
                return Ok(alerts);
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{what}: not within {within:?}; alerts {alerts:#?}\nagentk log tail:\n{}",
                self.log_tail("agentk.log")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log_tail(&self, file: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
