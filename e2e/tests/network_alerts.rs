//! Network-policy alerts end to end: the real kas and agentk binaries, the real Gitea and kube-apiserver
//! (policies applied through GitOps, Cilium's policy CRDs installed by a later commit), and the real
//! Alertmanager reading back what kas sent.
//!
//! Flows come from `gitops_hubble::testing::ReplayServer`, a Hubble Observer server that replays flows the
//! test writes: **the only stand-in**, for Cilium's eBPF datapath, which cannot run here (no kernel
//! datapath, no pod networking under kwok). agentk talks to it over Hubble's real gRPC API.

use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::network_alerts::{AlertsOptions, AlertsWorld, pod, policy_drop};
use gitops_hubble::flow::{Policy, TrafficDirection};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use serde_json::{Value, json};
use test_support::alertmanager::{AlertQuery, Alertmanager};

const CRDS: &str = include_str!("../fixtures/cilium-policy-crds.yaml");
const WAIT: Duration = Duration::from_secs(60);

fn network_policy(name: &str, annotated: bool, app: &str, types: &str) -> String {
    let annotations = if annotated {
        "  annotations:\n    app.gitlab.com/alert: \"true\"\n"
    } else {
        ""
    };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n{annotations}\
         spec:\n  podSelector:\n    matchLabels:\n      app: {app}\n  policyTypes: [{types}]\n"
    )
}

/// A CiliumNetworkPolicy denying ingress to `app`, and a clusterwide one isolating `namespace`.
fn cilium_policies(namespace: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: api-guard\n  annotations:\n    \
         app.gitlab.com/alert: \"true\"\nspec:\n  endpointSelector:\n    matchLabels:\n      k8s:app: api\n  \
         ingressDeny:\n  - fromEntities: [world]\n---\n\
         apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata:\n  name: {namespace}-lockdown\n  \
         annotations:\n    app.gitlab.com/alert: \"true\"\nspec:\n  endpointSelector:\n    matchLabels:\n      \
         k8s:io.kubernetes.pod.namespace: {namespace}\n      k8s:app: vault\n  ingress:\n  - fromEndpoints:\n    \
         - matchLabels:\n        k8s:app: ops\n"
    )
}

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    &value[name]
}

async fn delete_cilium_crds() -> anyhow::Result<()> {
    let client = test_support::cluster::kube_client().await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for name in [
        "ciliumnetworkpolicies.cilium.io",
        "ciliumclusterwidenetworkpolicies.cilium.io",
    ] {
        let _ = crds.delete(name, &Default::default()).await;
    }
    e2e::eventually(WAIT, "Cilium CRDs gone", || async {
        Ok(crds
            .get_opt("ciliumnetworkpolicies.cilium.io")
            .await?
            .is_none()
            && crds
                .get_opt("ciliumclusterwidenetworkpolicies.cilium.io")
                .await?
                .is_none())
    })
    .await
}

#[tokio::test]
async fn dropped_flows_become_deduplicated_rate_limited_alerts_in_kas_and_alertmanager()
-> anyhow::Result<()> {
    test_support::cluster::install_crypto_provider();
    // A cluster without Cilium first; its CRDs arrive later through GitOps.
    delete_cilium_crds().await?;
    let alertmanager = Alertmanager::start().await?;
    let world = AlertsWorld::start(AlertsOptions {
        name: "netalerts",
        cilium_extra: "  max_alerts_per_policy_per_minute: 4\n",
        manifests: vec![
            (
                "db.yaml".into(),
                network_policy("db-ingress", true, "db", "Ingress"),
            ),
            (
                "web.yaml".into(),
                network_policy("web-egress", true, "web", "Egress"),
            ),
            (
                "cache.yaml".into(),
                network_policy("cache-quiet", false, "cache", "Ingress"),
            ),
        ],
        kas_alerts: Some(format!(
            "  alertmanager_url: {}\n  resend_interval: 1s\n",
            alertmanager.url
        )),
        agentk_log_level: "info",
    })
    .await?;
    let ns = world.ns.name.clone();

    // agentk applies the policies, watches the annotated ones (cluster-wide: other tests' count too), and
    // follows the relay.
    let status = world
        .wait_status(WAIT, "following with both annotated NetworkPolicies", |s| {
            s["state"] == "FOLLOWING" && s["networkPolicies"].as_u64() >= Some(2)
        })
        .await?;
    assert_eq!(status["ciliumCrdsAbsent"], true, "{status}");
    assert_eq!(status["ciliumNetworkPolicies"], 0, "{status}");
    assert_eq!(
        status["policyWatchError"],
        Value::Null,
        "every watch works: {status}"
    );
    ensure!(world.replay.followers() == 1, "one follower: the leader");
    let request = world
        .replay
        .requests()
        .pop()
        .context("a GetFlows request")?;
    assert!(request.follow, "follows new flows");
    assert_eq!(
        request.whitelist.len(),
        1,
        "dropped only by default: {request:?}"
    );

    // 1,000 identical drops: one alert, counted 1,000 times.
    let web = pod(&ns, "web-1", "web");
    let db = pod(&ns, "db-0", "db");
    world.replay.send(
        (0..1000).map(|_| policy_drop(web.clone(), db.clone(), TrafficDirection::Ingress, 5432)),
    );
    let alerts = world
        .wait_alerts(WAIT, "one alert counting 1,000 drops", |a| {
            a.len() == 1 && a[0]["count"] == 1000
        })
        .await?;
    let alert = &alerts[0];
    assert_eq!(field(alert, "policy"), &json!(format!("{ns}/db-ingress")));
    assert_eq!(field(alert, "policyKind"), "NETWORK_POLICY");
    assert_eq!(field(alert, "source"), &json!(format!("{ns}/web-1")));
    assert_eq!(field(alert, "destination"), &json!(format!("{ns}/db-0")));
    assert_eq!(field(alert, "port"), 5432);
    assert_eq!(field(alert, "protocol"), "TCP");
    assert_eq!(field(alert, "direction"), "INGRESS");
    assert_eq!(field(alert, "verdict"), "DROPPED");
    assert_eq!(field(alert, "dropReason"), "POLICY_DENIED");

    // Alertmanager has it once, with the labels, and the count once kas re-posts.
    let query = AlertQuery::filter("alertname=\"NetworkPolicyViolation\"");
    let received = alertmanager
        .wait_for(&query, WAIT, "the alert with count 1000", |a| {
            a.len() == 1 && a[0].annotations.get("count").map(String::as_str) == Some("1000")
        })
        .await?;
    let labels = &received[0].labels;
    assert_eq!(
        labels.get("agent").map(String::as_str),
        Some(e2e::AGENT_NAME)
    );
    assert_eq!(labels.get("namespace"), Some(&ns));
    assert_eq!(labels.get("policy").map(String::as_str), Some("db-ingress"));
    assert_eq!(received[0].status.state, "active");

    // Rate limit: 6 more sources for db-ingress → only 3 more new alerts this minute (4 per policy); a drop
    // the unannotated policy made raises nothing; then a marker on another policy, after all of them in the
    // stream, proves agentk has handled them.
    let sources: Vec<_> = (2..8)
        .map(|i| pod(&ns, &format!("web-{i}"), "web"))
        .collect();
    world.replay.send(
        sources
            .iter()
            .map(|s| policy_drop(s.clone(), db.clone(), TrafficDirection::Ingress, 5432))
            .chain([policy_drop(
                pod(&ns, "web-1", "web"),
                pod(&ns, "cache-0", "cache"),
                TrafficDirection::Ingress,
                6379,
            )])
            .chain([policy_drop(
                web.clone(),
                e2e::network_alerts::pod("", "", "world"),
                TrafficDirection::Egress,
                443,
            )]),
    );
    let alerts = world
        .wait_alerts(WAIT, "the egress marker", |a| {
            a.iter()
                .any(|a| a["policy"] == json!(format!("{ns}/web-egress")))
        })
        .await?;
    let db_alerts = alerts
        .iter()
        .filter(|a| a["policy"] == json!(format!("{ns}/db-ingress")))
        .count();
    assert_eq!(
        db_alerts, 4,
        "4 new alerts per policy per minute: {alerts:#?}"
    );
    assert!(
        !alerts
            .iter()
            .any(|a| a["destination"] == json!(format!("{ns}/cache-0"))),
        "the unannotated policy's drop raised an alert: {alerts:#?}"
    );
    // The counters reach kas within seconds (re-sent every 5 s when they moved).
    world
        .wait_status(WAIT, "flows counted", |s| {
            s["flowsSeen"].as_u64() >= Some(1008) && s["flowsMatched"].as_u64() >= Some(1007)
        })
        .await?;

    // Through GitOps: Cilium's CRDs and two annotated Cilium policies. agentk notices the CRDs appear.
    e2e::push_main(
        &world.manifests_repo,
        &[
            ("crds/cilium.yaml", CRDS),
            ("cilium-policies.yaml", &cilium_policies(&ns)),
        ],
        "Cilium policies",
    )
    .await?;
    world
        .wait_status(
            Duration::from_secs(120),
            "both Cilium policies watched",
            |s| {
                s["ciliumCrdsAbsent"] == false
                    && s["ciliumNetworkPolicies"] == 1
                    && s["ciliumClusterwideNetworkPolicies"] == 1
            },
        )
        .await?;
    // Hubble names the denying policy: that one (the CNP), not by selector.
    let mut named = policy_drop(
        e2e::network_alerts::pod("", "", "world"),
        pod(&ns, "api-0", "api"),
        TrafficDirection::Ingress,
        8443,
    );
    named.ingress_denied_by = vec![Policy {
        name: "api-guard".into(),
        namespace: ns.clone(),
        kind: "CiliumNetworkPolicy".into(),
        ..Default::default()
    }];
    let vault = policy_drop(
        pod(&ns, "web-1", "web"),
        pod(&ns, "vault-0", "vault"),
        TrafficDirection::Ingress,
        8200,
    );
    world.replay.send([named, vault]);
    let alerts = world
        .wait_alerts(WAIT, "the Cilium policies' alerts", |a| {
            a.iter().any(|a| a["policyKind"] == "CILIUM_NETWORK_POLICY")
                && a.iter()
                    .any(|a| a["policyKind"] == "CILIUM_CLUSTERWIDE_NETWORK_POLICY")
        })
        .await?;
    let ccnp = alerts
        .iter()
        .find(|a| a["policyKind"] == "CILIUM_CLUSTERWIDE_NETWORK_POLICY")
        .context("ccnp alert")?;
    assert_eq!(ccnp["policy"], json!(format!("{ns}-lockdown")), "{ccnp}");
    assert_eq!(
        ccnp["destination"],
        json!(format!("{ns}/vault-0")),
        "{ccnp}"
    );
    alertmanager
        .wait_for(
            &AlertQuery::filter(format!("policy=\"{ns}-lockdown\"")),
            WAIT,
            "the clusterwide policy's alert, under the protected namespace",
            |a| a.len() == 1 && a[0].labels.get("namespace") == Some(&ns),
        )
        .await?;

    // The relay goes away and comes back: the status says so, and flows are matched again.
    let mut world = world;
    world.replay.stop().await;
    let down = world
        .wait_status(WAIT, "relay unreachable", |s| {
            s["state"] == "RELAY_UNREACHABLE"
        })
        .await?;
    let message = down["message"].as_str().unwrap_or_default();
    assert!(message.contains(&world.replay.address()), "{down}");
    world.replay.start_again().await?;
    let up = world
        .wait_status(WAIT, "following again", |s| {
            s["state"] == "FOLLOWING" && s["connects"].as_u64() >= Some(2)
        })
        .await?;
    assert!(
        up["message"]
            .as_str()
            .unwrap_or_default()
            .contains("following"),
        "{up}"
    );
    world.replay.send([policy_drop(
        pod(&ns, "web-9", "web"),
        pod(&ns, "api-1", "api"),
        TrafficDirection::Ingress,
        8443,
    )]);
    world
        .wait_alerts(WAIT, "an alert after the relay came back", |a| {
            a.iter()
                .any(|a| a["destination"] == json!(format!("{ns}/api-1")))
        })
        .await?;

    // A TLS file agentk cannot read: the module says so (config.yaml is valid; the file is agentk's own).
    // Then `cilium` removed: disabled, and the relay is no longer followed.
    world
        .push_cilium(Some(&format!(
            "  hubble_relay_address: {}\n  tls:\n    ca_file: /nonexistent/hubble-ca.crt\n",
            world.replay.address()
        )))
        .await?;
    let bad = world
        .wait_status(WAIT, "misconfigured", |s| s["state"] == "MISCONFIGURED")
        .await?;
    assert!(
        bad["message"]
            .as_str()
            .unwrap_or_default()
            .contains("/nonexistent/hubble-ca.crt"),
        "{bad}"
    );
    world.push_cilium(None).await?;
    world
        .wait_status(WAIT, "disabled", |s| s["state"] == "DISABLED")
        .await?;
    e2e::eventually(
        Duration::from_secs(10),
        "agentk stops following the relay",
        || async { Ok(world.replay.followers() == 0) },
    )
    .await?;
    drop(world);
    delete_cilium_crds().await?;
    Ok(())
}
