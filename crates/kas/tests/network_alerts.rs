//! kas's side of network-policy alerts, against the real kas on loopback and a real Alertmanager: agentk's
//! calls are made here with a real gRPC client over an agent connection (the agentk module that makes them
//! in production is tested with Hubble in e2e). What Alertmanager got is read back through its own API.
//! No Git server is needed: the agent and its token are written to kas's store directly.
//!
//! Needs the test environment's Alertmanager (`cargo xtask cluster up`, `GITOPS_TEST_ENV`); without it the
//! tests fail saying so.

use std::time::Duration;

use gitops_protocol::{
    FlowEndpoint, FlowVerdict, NetworkAlert, NetworkAlertBatch, NetworkModuleState,
    NetworkModuleStatus, NetworkPolicyKind, NetworkPolicyRef, NetworkProtocol, TrafficDirection,
    network_alerts_client::NetworkAlertsClient,
};
use gitops_tunnel::{
    KasAddress,
    client::{ClientConfig, HeaderInterceptor},
};
use kas::RunningKas;
use serde_json::{Value, json};
use test_support::{
    alertmanager::{AlertQuery, Alertmanager},
    webhook::WebhookReceiver,
};
use tonic::{codegen::InterceptedService, transport::Channel};

const ADMIN: &str = "admin-token-for-alert-tests";
const AGENT_SECRET: &str = "kasagent_alerts-test-secret";
const HOOK_SECRET: &str = "hook-secret-for-alert-tests";
/// Alertmanager polls take this long at most.
const WAIT: Duration = Duration::from_secs(20);

type Client = NetworkAlertsClient<InterceptedService<Channel, HeaderInterceptor>>;

struct Kas {
    kas: RunningKas,
    dir: tempfile::TempDir,
    agent_id: u64,
}

/// kas.yaml with `alerts` (lines indented under `alerts:`; `{DIR}` names kas's temporary directory, where
/// the webhook secret is in `hook`).
fn kas_yaml(dir: &std::path::Path, alerts: &str) -> String {
    let d = dir.display();
    let alerts = alerts.replace("{DIR}", &d.to_string());
    format!(
        "listen:\n  agent: 127.0.0.1:0\n  api: 127.0.0.1:0\n  observability: 127.0.0.1:0\ndata_dir: {d}/data\nadmin_token_file: {d}/admin\n\
         git:\n  base_url: http://127.0.0.1:9\nalerts:\n{alerts}"
    )
}

async fn start(alerts: &str) -> anyhow::Result<Kas> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("admin"), ADMIN)?;
    std::fs::write(dir.path().join("hook"), HOOK_SECRET)?;
    let config = gitops_config::ServerConfig::parse("kas.yaml", &kas_yaml(dir.path(), alerts))?;
    let kas = kas::start(config).await?;
    let agent = kas.state.store.create_agent("group/project", "prod")?;
    kas.state
        .store
        .create_token(agent.id, "t", "", &kas::tokens::hash(AGENT_SECRET), 2)?;
    Ok(Kas {
        kas,
        dir,
        agent_id: agent.id,
    })
}

impl Kas {
    /// Stops kas and starts it again on the same data directory and configuration.
    async fn restart(self, alerts: &str) -> anyhow::Result<Self> {
        let Self { kas, dir, agent_id } = self;
        kas.shutdown().await;
        let config = gitops_config::ServerConfig::parse("kas.yaml", &kas_yaml(dir.path(), alerts))?;
        Ok(Self {
            kas: kas::start(config).await?,
            dir,
            agent_id,
        })
    }

    /// A client over an agent connection, as agentk makes it.
    fn client(&self, secret: &str) -> anyhow::Result<Client> {
        let config = ClientConfig::new(
            KasAddress::parse(&format!("grpc://{}", self.kas.agent_addr))?,
            secret.into(),
        );
        Ok(NetworkAlertsClient::with_interceptor(
            config.channel()?,
            config.interceptor()?,
        ))
    }

    async fn graphql(&self, query: &str) -> anyhow::Result<Value> {
        let answer: Value = reqwest::Client::new()
            .post(format!("http://{}/api/graphql", self.kas.api_addr))
            .bearer_auth(ADMIN)
            .json(&json!({ "query": query }))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(answer.get("errors").is_none(), "GraphQL errors: {answer}");
        Ok(answer)
    }

    fn gid(&self) -> String {
        format!("gid://kas/Clusters::Agent/{}", self.agent_id)
    }

    async fn alerts(&self) -> anyhow::Result<Vec<Value>> {
        let answer = self
            .graphql(&format!(
                r#"{{ clusterAgent(id: "{}") {{ networkAlerts(first: 100) {{ id policy policyKind source
                destination port protocol direction verdict dropReason count firstSeen lastSeen firingSince
                resolved resolvedAt sourceEndpoint {{ namespace podName ip workload }}
                destinationEndpoint {{ namespace podName ip workload }} }} }} }}"#,
                self.gid()
            ))
            .await?;
        Ok(answer["data"]["clusterAgent"]["networkAlerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn status(&self) -> anyhow::Result<Value> {
        let answer = self
            .graphql(&format!(
                r#"{{ clusterAgent(id: "{}") {{ networkAlertsStatus {{ state message since flowsSeen
                flowsMatched lostEvents suppressed connects networkPolicies ciliumNetworkPolicies
                ciliumClusterwideNetworkPolicies ciliumCrdsAbsent policyWatchError reportedAt alerts evicted rejected
                lastRejection forwarding {{ lastError lastSuccessAt }} }} }} }}"#,
                self.gid()
            ))
            .await?;
        Ok(answer["data"]["clusterAgent"]["networkAlertsStatus"].clone())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A drop of `shop/<pod>` egress to the world on TCP 5432 by CiliumNetworkPolicy `shop/deny-db`.
fn drop_of(pod: &str, count: u64, at_ms: i64) -> NetworkAlert {
    NetworkAlert {
        policy: Some(NetworkPolicyRef {
            kind: NetworkPolicyKind::CiliumNetworkPolicy.into(),
            namespace: "shop".into(),
            name: "deny-db".into(),
        }),
        source: Some(FlowEndpoint {
            namespace: "shop".into(),
            pod_name: pod.into(),
            ip: "10.0.0.7".into(),
            identity: 4242,
            workload: "Deployment/frontend".into(),
        }),
        destination: Some(FlowEndpoint {
            ip: "203.0.113.7".into(),
            identity: 2,
            ..Default::default()
        }),
        port: 5432,
        protocol: NetworkProtocol::Tcp.into(),
        direction: TrafficDirection::Egress.into(),
        count,
        first_seen_unix_ms: at_ms,
        last_seen_unix_ms: at_ms,
        verdict: FlowVerdict::Dropped.into(),
        drop_reason: "POLICY_DENIED".into(),
    }
}

fn batch(batch_id: u64, alerts: Vec<NetworkAlert>) -> NetworkAlertBatch {
    NetworkAlertBatch {
        batch_id,
        alerts,
        suppressed: 0,
    }
}

fn am_query() -> AlertQuery {
    AlertQuery::filter(r#"agent="prod""#)
}

#[tokio::test]
async fn alerts_reach_alertmanager_once_per_key_with_their_labels() -> anyhow::Result<()> {
    let am = Alertmanager::start().await?;
    let kas = start(&format!(
        "  alertmanager_url: {}\n  resend_interval: 1s\n  dashboard_url: http://kas.example:8080/\n",
        am.url
    ))
    .await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms() - 5_000;
    // 1,000 identical drops in two entries of one batch, and another pod's.
    client
        .report_alerts(batch(
            1,
            vec![
                drop_of("web-1", 600, t),
                drop_of("web-1", 400, t + 10),
                drop_of("web-2", 1, t),
            ],
        ))
        .await?;
    let alerts = am
        .wait_for(&am_query(), WAIT, "two alerts", |a| a.len() == 2)
        .await?;
    let web1 = alerts
        .iter()
        .find(|a| a.labels["source"] == "shop/web-1")
        .expect("web-1's alert");
    let expected: std::collections::BTreeMap<String, String> = [
        ("alertname", "NetworkPolicyViolation"),
        ("agent", "prod"),
        ("agent_project", "group/project"),
        ("namespace", "shop"),
        ("policy", "deny-db"),
        ("policy_kind", "CiliumNetworkPolicy"),
        ("direction", "egress"),
        ("protocol", "TCP"),
        ("port", "5432"),
        ("source", "shop/web-1"),
        ("destination", "world 203.0.113.7"),
        ("severity", "warning"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(web1.labels, expected);
    assert_eq!(web1.annotations["count"], "1000", "{web1:#?}");
    assert_eq!(web1.status.state, "active");
    assert_eq!(
        web1.generator_url,
        format!("http://kas.example:8080/dashboard#/agent/{}", kas.agent_id),
        "the agent's dashboard page"
    );
    assert!(
        web1.annotations["summary"].contains("shop/deny-db"),
        "{web1:#?}"
    );
    assert_eq!(
        chrono_free_ms(&web1.starts_at),
        t,
        "startsAt is the first drop: {web1:#?}"
    );

    // More drops of the same key in the next batch: the same Alertmanager alert, its count moved (re-posted
    // after resend_interval), and re-sending that batch counts it once.
    client
        .report_alerts(batch(2, vec![drop_of("web-1", 5, t + 1_000)]))
        .await?;
    client
        .report_alerts(batch(2, vec![drop_of("web-1", 5, t + 1_000)]))
        .await?;
    let alerts = am
        .wait_for(&am_query(), WAIT, "web-1's count at 1005", |a| {
            a.iter().any(|a| a.annotations["count"] == "1005")
        })
        .await?;
    assert_eq!(alerts.len(), 2, "still one alert per key: {alerts:#?}");
    let graph = kas.alerts().await?;
    assert_eq!(graph.len(), 2);
    assert_eq!(
        graph[0]["source"], "shop/web-1",
        "newest lastSeen first: {graph:?}"
    );
    assert_eq!(graph[0]["count"], 1005);
    assert_eq!(graph[0]["policy"], "shop/deny-db");
    assert_eq!(graph[0]["policyKind"], "CILIUM_NETWORK_POLICY");
    assert_eq!(graph[0]["protocol"], "TCP");
    assert_eq!(graph[0]["direction"], "EGRESS");
    assert_eq!(graph[0]["verdict"], "DROPPED");
    assert_eq!(graph[0]["destination"], "world 203.0.113.7");
    assert_eq!(
        graph[0]["sourceEndpoint"]["workload"],
        "Deployment/frontend"
    );
    assert_eq!(graph[0]["resolved"], false);
    // A few seconds more: nothing else arrives (the re-sent batch was not counted late).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = am.alerts(&am_query()).await?;
    assert!(
        alerts.iter().any(|a| a.annotations["count"] == "1005"),
        "{alerts:#?}"
    );
    let status = kas.status().await?;
    assert_eq!(status["forwarding"]["lastError"], Value::Null, "{status}");
    assert!(
        status["forwarding"]["lastSuccessAt"].is_string(),
        "{status}"
    );
    // The counters moved: two accepted batches, the re-sent one counted as a duplicate, four entries
    // stored; three alerts posted (two new, one count change).
    let metrics = reqwest::get(format!(
        "http://{}/metrics",
        kas.kas.observability_addr.expect("observability listener")
    ))
    .await?
    .text()
    .await?;
    for line in [
        "kas_network_alerts_batches_total{result=\"accepted\"} 2",
        "kas_network_alerts_batches_total{result=\"duplicate\"} 1",
        "kas_network_alerts_received_total{result=\"stored\"} 4",
        "kas_network_alerts_received_total{result=\"rejected\"} 0",
        "kas_network_alerts_forwarded_total{sink=\"alertmanager\",result=\"ok\"} 3",
        "kas_network_alerts_forwarded_total{sink=\"alertmanager\",result=\"error\"} 0",
        "kas_network_alerts_forward_pending 0",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    kas.kas.shutdown().await;
    Ok(())
}

/// `2023-11-14T22:13:20.123Z` → unix ms (Alertmanager writes RFC 3339 with up to nanoseconds).
fn chrono_free_ms(rfc3339: &str) -> i64 {
    let t = humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z'))
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"));
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn resolving_ends_the_alert_in_alertmanager_and_new_drops_fire_it_again() -> anyhow::Result<()>
{
    let am = Alertmanager::start().await?;
    let kas = start(&format!("  alertmanager_url: {}\n", am.url)).await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms() - 60_000;
    client
        .report_alerts(batch(
            1,
            vec![drop_of("web-1", 3, t), drop_of("web-2", 1, t)],
        ))
        .await?;
    am.wait_for(&am_query(), WAIT, "two alerts", |a| a.len() == 2)
        .await?;
    let graph = kas.alerts().await?;
    let web1 = graph.iter().find(|a| a["source"] == "shop/web-1").unwrap();
    let answer = kas
        .graphql(&format!(
            r#"mutation {{ networkAlertsResolve(input: {{ clusterAgentId: "{}", alertIds: ["{}", "gid://kas/Clusters::NetworkAlert/999"] }}) {{ resolved errors }} }}"#,
            kas.gid(),
            web1["id"].as_str().unwrap()
        ))
        .await?;
    let payload = &answer["data"]["networkAlertsResolve"];
    assert_eq!(payload["resolved"], 1, "{answer}");
    assert!(
        payload["errors"][0].as_str().unwrap().contains("999"),
        "the unknown id is named, the known one resolved anyway: {answer}"
    );
    // Alertmanager returns firing alerts only: web-1 ended, web-2 still fires.
    let alerts = am
        .wait_for(&am_query(), WAIT, "web-1 resolved", |a| {
            a.len() == 1 && a[0].labels["source"] == "shop/web-2"
        })
        .await?;
    assert_eq!(alerts[0].status.state, "active");
    let graph = kas.alerts().await?;
    let web1 = graph.iter().find(|a| a["source"] == "shop/web-1").unwrap();
    assert_eq!(web1["resolved"], true, "{web1}");
    assert!(web1["resolvedAt"].is_string(), "{web1}");

    // New drops: a new episode (startsAt is the new drop), the count keeps the total.
    let again = now_ms();
    client
        .report_alerts(batch(2, vec![drop_of("web-1", 2, again)]))
        .await?;
    let alerts = am
        .wait_for(&am_query(), WAIT, "web-1 firing again", |a| a.len() == 2)
        .await?;
    let web1 = alerts
        .iter()
        .find(|a| a.labels["source"] == "shop/web-1")
        .unwrap();
    assert_eq!(web1.annotations["count"], "5");
    assert_eq!(chrono_free_ms(&web1.starts_at), again, "{web1:#?}");
    let graph = kas.alerts().await?;
    assert_eq!(graph[0]["resolved"], false, "{graph:?}");

    // Without ids: every firing alert of the agent.
    let answer = kas
        .graphql(&format!(
            r#"mutation {{ networkAlertsResolve(input: {{ clusterAgentId: "{}" }}) {{ resolved errors }} }}"#,
            kas.gid()
        ))
        .await?;
    assert_eq!(
        answer["data"]["networkAlertsResolve"]["resolved"], 2,
        "{answer}"
    );
    am.wait_for(&am_query(), WAIT, "no alert firing", |a| a.is_empty())
        .await?;
    kas.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_bound_drops_the_oldest_and_alerts_and_batch_ids_survive_a_restart()
-> anyhow::Result<()> {
    let alerts_yaml = "  max_per_agent: 3\n";
    let kas = start(alerts_yaml).await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms() - 10_000;
    client
        .report_alerts(batch(
            1,
            vec![
                drop_of("a", 1, t),
                drop_of("b", 1, t + 1),
                drop_of("c", 1, t + 2),
            ],
        ))
        .await?;
    // `a` seen again: `b` is now the oldest and goes when `d` arrives.
    client
        .report_alerts(batch(2, vec![drop_of("a", 1, t + 3)]))
        .await?;
    client
        .report_alerts(batch(3, vec![drop_of("d", 1, t + 4)]))
        .await?;
    let sources = |alerts: &[Value]| -> Vec<String> {
        alerts
            .iter()
            .map(|a| a["source"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        sources(&kas.alerts().await?),
        ["shop/d", "shop/a", "shop/c"]
    );
    assert_eq!(kas.status().await?["evicted"], 1);

    let kas = kas.restart(alerts_yaml).await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let alerts = kas.alerts().await?;
    assert_eq!(sources(&alerts), ["shop/d", "shop/a", "shop/c"]);
    assert_eq!(alerts[1]["count"], 2);
    // agentk re-sends batch 3 because the ack was lost in the restart: counted once.
    client
        .report_alerts(batch(3, vec![drop_of("d", 1, t + 4)]))
        .await?;
    assert_eq!(kas.alerts().await?[0]["count"], 1);
    client
        .report_alerts(batch(4, vec![drop_of("d", 1, t + 5)]))
        .await?;
    assert_eq!(kas.alerts().await?[0]["count"], 2);
    kas.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn the_webhook_gets_signed_json() -> anyhow::Result<()> {
    let mut hook = WebhookReceiver::start().await?;
    let kas = start(&format!(
        "  webhook:\n    url: {}\n    secret_file: {{DIR}}/hook\n",
        hook.url
    ))
    .await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms();
    client
        .report_alerts(batch(1, vec![drop_of("web-1", 7, t)]))
        .await?;
    let delivery = hook.next_delivery(WAIT).await.expect("a webhook delivery");
    let timestamp = delivery
        .header("x-gitops-timestamp")
        .expect("timestamp")
        .to_owned();
    let signature = delivery
        .header("x-gitops-signature")
        .expect("signature")
        .to_owned();
    let hex = signature.strip_prefix("sha256=").expect("sha256= prefix");
    let mut signed = timestamp.as_bytes().to_vec();
    signed.push(b'.');
    signed.extend_from_slice(&delivery.body);
    assert!(
        test_support::webhook::verify_hmac_sha256(HOOK_SECRET.as_bytes(), &signed, hex),
        "signature {signature} does not verify"
    );
    assert!(
        !test_support::webhook::verify_hmac_sha256(b"other", &signed, hex),
        "a wrong secret must not verify"
    );
    let age = now_ms() / 1000 - timestamp.parse::<i64>()?;
    assert!((0..60).contains(&age), "timestamp {timestamp}");
    let body: Value = serde_json::from_slice(&delivery.body)?;
    assert_eq!(body["version"], 1);
    let alert = &body["alerts"][0];
    assert_eq!(alert["status"], "firing", "{body}");
    assert_eq!(alert["count"], 7);
    assert_eq!(alert["agent"]["name"], "prod");
    assert_eq!(alert["labels"]["alertname"], "NetworkPolicyViolation");
    assert_eq!(alert["labels"]["source"], "shop/web-1");
    assert!(
        alert["startsAt"].is_string() && alert["endsAt"].is_string(),
        "{body}"
    );
    assert!(
        !String::from_utf8_lossy(&delivery.body).contains(HOOK_SECRET),
        "the secret is not in the body"
    );
    kas.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_entry_is_refused_by_name_and_the_rest_of_its_batch_stored() -> anyhow::Result<()> {
    let kas = start("  max_per_agent: 10\n").await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms();
    let mut bad = drop_of("web-2", 1, t);
    bad.policy.as_mut().unwrap().name.clear();
    client
        .report_alerts(NetworkAlertBatch {
            batch_id: 1,
            alerts: vec![bad, drop_of("web-1", 1, t)],
            suppressed: 12,
        })
        .await?;
    let alerts = kas.alerts().await?;
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0]["source"], "shop/web-1");
    let status = kas.status().await?;
    assert_eq!(status["rejected"], 1, "{status}");
    assert!(
        status["lastRejection"]
            .as_str()
            .unwrap()
            .starts_with("alerts[0].policy.name"),
        "{status}"
    );
    assert_eq!(status["suppressed"], 12);
    assert_eq!(
        status["state"],
        Value::Null,
        "no ReportStatus yet: {status}"
    );

    client
        .report_status(NetworkModuleStatus {
            state: NetworkModuleState::RelayUnreachable.into(),
            message: "hubble relay hubble-relay.kube-system.svc:80 unreachable: connection refused"
                .into(),
            since_unix_ms: t,
            flows_seen: 10,
            flows_matched: 4,
            lost_events: 1,
            network_policies: 1,
            cilium_network_policies: 2,
            cilium_clusterwide_network_policies: 3,
            cilium_crds_absent: false,
            connects: 5,
            policy_watch_error: "ciliumnetworkpolicies: no permission to watch them".into(),
        })
        .await?;
    let status = kas.status().await?;
    assert_eq!(status["state"], "RELAY_UNREACHABLE", "{status}");
    assert!(status["message"].as_str().unwrap().contains("unreachable"));
    assert_eq!(
        (
            &status["flowsSeen"],
            &status["connects"],
            &status["ciliumClusterwideNetworkPolicies"]
        ),
        (&json!(10), &json!(5), &json!(3))
    );
    assert!(status["reportedAt"].is_string());
    assert_eq!(
        status["policyWatchError"],
        "ciliumnetworkpolicies: no permission to watch them"
    );

    // A wrong token is refused before the service.
    let mut stranger = kas.client("kasagent_not-a-token")?;
    let refused = stranger
        .report_alerts(batch(2, vec![drop_of("web-1", 1, t)]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(kas.alerts().await?[0]["count"], 1);
    kas.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_alertmanager_shows_in_the_status_the_rpc_does_not_wait_and_retries_deliver()
-> anyhow::Result<()> {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let kas = start(&format!("  alertmanager_url: http://127.0.0.1:{port}\n")).await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let started = std::time::Instant::now();
    for id in 1..=20 {
        client
            .report_alerts(batch(id, vec![drop_of(&format!("p{id}"), 1, now_ms())]))
            .await?;
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(5),
        "20 calls took {elapsed:?}"
    );
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        let status = kas.status().await?;
        if status["forwarding"]["lastError"].is_string() || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let error = status["forwarding"]["lastError"]
        .as_str()
        .unwrap_or_default();
    assert!(error.starts_with("alertmanager: "), "{status}");
    assert_eq!(status["forwarding"]["lastSuccessAt"], Value::Null);

    // Alertmanager comes up at that address: the retries (backoff from 1 s) deliver all 20, and the
    // error clears.
    let am = Alertmanager::start_on(port).await?;
    am.wait_for(&am_query(), Duration::from_secs(40), "the 20 alerts", |a| {
        a.len() == 20
    })
    .await?;
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        let status = kas.status().await?;
        if status["forwarding"]["lastError"].is_null() || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["forwarding"]["lastError"], Value::Null, "{status}");
    assert!(
        status["forwarding"]["lastSuccessAt"].is_string(),
        "{status}"
    );
    kas.kas.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_bad_alerts_section_stops_kas_naming_the_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let err = gitops_config::ServerConfig::parse(
        "kas.yaml",
        &kas_yaml(dir.path(), "  alertmanager_url: alertmanager:9093\n"),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "kas.yaml: alerts.alertmanager_url: must be an http:// or https:// URL"
    );
    let err =
        gitops_config::ServerConfig::parse("kas.yaml", &kas_yaml(dir.path(), "  resend: 1m\n"))
            .unwrap_err();
    assert!(err.to_string().contains("resend"), "{err}");
    // A webhook secret file that is not there is an error at start, naming it.
    std::fs::write(dir.path().join("admin"), ADMIN)?;
    let config = gitops_config::ServerConfig::parse(
        "kas.yaml",
        &kas_yaml(
            dir.path(),
            &format!(
                "  webhook:\n    url: http://127.0.0.1:9/hook\n    secret_file: {}/missing\n",
                dir.path().display()
            ),
        ),
    )?;
    let err = kas::start(config).await.unwrap_err().to_string();
    assert!(err.contains("missing"), "{err}");
    Ok(())
}

#[tokio::test]
async fn after_a_restart_kas_posts_what_still_fires_again() -> anyhow::Result<()> {
    let first = Alertmanager::start().await?;
    let kas = start(&format!("  alertmanager_url: {}\n", first.url)).await?;
    let mut client = kas.client(AGENT_SECRET)?;
    let t = now_ms();
    client
        .report_alerts(batch(
            1,
            vec![drop_of("web-1", 4, t), drop_of("web-2", 1, t)],
        ))
        .await?;
    first
        .wait_for(&am_query(), WAIT, "two alerts", |a| a.len() == 2)
        .await?;
    let graph = kas.alerts().await?;
    let web2 = graph.iter().find(|a| a["source"] == "shop/web-2").unwrap();
    kas.graphql(&format!(
        r#"mutation {{ networkAlertsResolve(input: {{ clusterAgentId: "{}", alertIds: ["{}"] }}) {{ resolved }} }}"#,
        kas.gid(),
        web2["id"].as_str().unwrap()
    ))
    .await?;
    first
        .wait_for(&am_query(), WAIT, "web-2 resolved", |a| a.len() == 1)
        .await?;

    // kas restarts with an Alertmanager that knows nothing (a new one, say): what fires is posted again,
    // what was resolved is not.
    let second = Alertmanager::start().await?;
    let kas = kas
        .restart(&format!("  alertmanager_url: {}\n", second.url))
        .await?;
    let alerts = second
        .wait_for(&am_query(), WAIT, "web-1 posted again", |a| !a.is_empty())
        .await?;
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0].labels["source"], "shop/web-1");
    assert_eq!(alerts[0].annotations["count"], "4");
    kas.kas.shutdown().await;
    Ok(())
}
