//! Matching and aggregation, on flows shaped like Hubble's and policies as the apiserver returns them.

use gitops_hubble::flow::{
    self, CiliumEventType, Endpoint, Flow, Layer4, Tcp, TrafficDirection, Verdict, layer4::Protocol,
};
use gitops_protocol::NetworkPolicyKind;
use serde_json::json;

use super::{
    aggregate::{Aggregator, MAX_PENDING},
    matcher::{self, PolicySet},
    policy,
};

fn pod(namespace: &str, name: &str, labels: &[&str]) -> Endpoint {
    let mut all: Vec<String> = labels.iter().map(|l| format!("k8s:{l}")).collect();
    all.push(format!("k8s:io.kubernetes.pod.namespace={namespace}"));
    Endpoint {
        namespace: namespace.into(),
        pod_name: name.into(),
        labels: all,
        identity: 4242,
        ..Default::default()
    }
}

fn drop_flow(
    source: Endpoint,
    destination: Endpoint,
    direction: TrafficDirection,
    port: u32,
) -> Flow {
    Flow {
        verdict: Verdict::Dropped as i32,
        drop_reason_desc: flow::DropReason::PolicyDenied as i32,
        event_type: Some(CiliumEventType {
            r#type: gitops_hubble::event_type::DROP,
            sub_type: 0,
        }),
        traffic_direction: direction as i32,
        source: Some(source),
        destination: Some(destination),
        ip: Some(flow::Ip {
            source: "10.0.0.1".into(),
            destination: "10.0.0.2".into(),
            ..Default::default()
        }),
        l4: Some(Layer4 {
            protocol: Some(Protocol::Tcp(Tcp {
                source_port: 40000,
                destination_port: port,
                flags: None,
            })),
        }),
        time: Some(gitops_hubble::prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn annotated(mut object: serde_json::Value) -> serde_json::Value {
    object["metadata"]["annotations"] = json!({ "app.gitlab.com/alert": "true" });
    object
}

fn set(policies: &[(NetworkPolicyKind, serde_json::Value)]) -> PolicySet {
    PolicySet {
        policies: policies
            .iter()
            .filter(|(_, o)| policy::is_annotated(o))
            .map(|(k, o)| policy::parse(*k, o).unwrap())
            .collect(),
    }
}

fn names(set: &PolicySet, flow: &Flow) -> Vec<String> {
    set.matching(flow)
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

fn db_policy() -> serde_json::Value {
    annotated(json!({
        "metadata": { "name": "db-ingress", "namespace": "shop" },
        "spec": { "podSelector": { "matchLabels": { "app": "db" } }, "ingress": [] }
    }))
}

#[test]
fn kubernetes_policy_matches_the_isolated_destination_on_ingress_only() {
    let set = set(&[(NetworkPolicyKind::NetworkPolicy, db_policy())]);
    let web = pod("shop", "web-1", &["app=web"]);
    let db = pod("shop", "db-0", &["app=db"]);
    assert_eq!(
        names(
            &set,
            &drop_flow(web.clone(), db.clone(), TrafficDirection::Ingress, 5432)
        ),
        ["shop/db-ingress"]
    );
    // Egress from db is not what an Ingress-only policy governs; ingress to web is not db.
    assert!(
        names(
            &set,
            &drop_flow(db.clone(), web.clone(), TrafficDirection::Egress, 80)
        )
        .is_empty()
    );
    assert!(
        names(
            &set,
            &drop_flow(db.clone(), web, TrafficDirection::Ingress, 80)
        )
        .is_empty()
    );
    // Same labels in another namespace: a NetworkPolicy is namespaced.
    let other_db = pod("other", "db-0", &["app=db"]);
    assert!(
        names(
            &set,
            &drop_flow(db, other_db, TrafficDirection::Ingress, 5432)
        )
        .is_empty()
    );
}

#[test]
fn unannotated_or_false_policies_are_not_watched() {
    let mut off = db_policy();
    off["metadata"]["annotations"]["app.gitlab.com/alert"] = json!("false");
    let mut none = db_policy();
    none["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    assert!(!policy::is_annotated(&off));
    assert!(!policy::is_annotated(&none));
    let set = set(&[
        (NetworkPolicyKind::NetworkPolicy, off),
        (NetworkPolicyKind::NetworkPolicy, none),
    ]);
    let flow = drop_flow(
        pod("shop", "web-1", &["app=web"]),
        pod("shop", "db-0", &["app=db"]),
        TrafficDirection::Ingress,
        5432,
    );
    assert!(names(&set, &flow).is_empty());
}

#[test]
fn policy_types_default_and_egress() {
    let egress = annotated(json!({
        "metadata": { "name": "web-egress", "namespace": "shop" },
        "spec": { "podSelector": { "matchExpressions": [
            { "key": "app", "operator": "In", "values": ["web", "api"] },
            { "key": "canary", "operator": "DoesNotExist" }
        ] }, "policyTypes": ["Egress"] }
    }));
    let set = set(&[(NetworkPolicyKind::NetworkPolicy, egress)]);
    let to_world = |source| drop_flow(source, Endpoint::default(), TrafficDirection::Egress, 443);
    assert_eq!(
        names(&set, &to_world(pod("shop", "web-1", &["app=web"]))),
        ["shop/web-egress"]
    );
    assert!(
        names(
            &set,
            &to_world(pod("shop", "web-2", &["app=web", "canary=yes"]))
        )
        .is_empty()
    );
    assert!(names(&set, &to_world(pod("shop", "db-0", &["app=db"]))).is_empty());
}

#[test]
fn cilium_selectors_with_source_prefixes_specs_and_deny_rules() {
    let cnp = annotated(json!({
        "metadata": { "name": "api-guard", "namespace": "shop" },
        "specs": [
            { "endpointSelector": { "matchLabels": { "k8s:app": "api" } }, "ingressDeny": [{}] },
            { "endpointSelector": { "matchLabels": { "any:app": "worker" } }, "egress": [] },
            { "nodeSelector": {}, "ingress": [] }
        ]
    }));
    let ccnp = annotated(json!({
        "metadata": { "name": "no-prod-to-dev" },
        "spec": { "endpointSelector": { "matchLabels": {
            "k8s:io.kubernetes.pod.namespace": "dev" } }, "ingress": [{}] }
    }));
    let set = set(&[
        (NetworkPolicyKind::CiliumNetworkPolicy, cnp),
        (NetworkPolicyKind::CiliumClusterwideNetworkPolicy, ccnp),
    ]);
    let web = pod("shop", "web-1", &["app=web"]);
    assert_eq!(
        names(
            &set,
            &drop_flow(
                web.clone(),
                pod("shop", "api-0", &["app=api"]),
                TrafficDirection::Ingress,
                8080
            )
        ),
        ["shop/api-guard"]
    );
    assert_eq!(
        names(
            &set,
            &drop_flow(
                pod("shop", "worker-0", &["app=worker"]),
                web.clone(),
                TrafficDirection::Egress,
                25
            )
        ),
        ["shop/api-guard"]
    );
    // The clusterwide policy selects by namespace label, in any namespace.
    assert_eq!(
        names(
            &set,
            &drop_flow(
                web,
                pod("dev", "x", &["app=x"]),
                TrafficDirection::Ingress,
                80
            )
        ),
        ["/no-prod-to-dev"]
    );
}

#[test]
fn policies_hubble_names_win_over_selectors() {
    let set = set(&[(NetworkPolicyKind::NetworkPolicy, db_policy())]);
    let mut flow = drop_flow(
        pod("shop", "web-1", &["app=web"]),
        pod("shop", "db-0", &["app=db"]),
        TrafficDirection::Ingress,
        5432,
    );
    // Hubble says another (unannotated) policy denied it: no alert, although db-ingress selects db.
    flow.ingress_denied_by = vec![flow::Policy {
        name: "deny-all".into(),
        namespace: "shop".into(),
        kind: "NetworkPolicy".into(),
        ..Default::default()
    }];
    assert!(names(&set, &flow).is_empty());
    flow.ingress_denied_by[0].name = "db-ingress".into();
    assert_eq!(names(&set, &flow), ["shop/db-ingress"]);
    // Same name, other kind: not it.
    flow.ingress_denied_by[0].kind = "CiliumNetworkPolicy".into();
    assert!(names(&set, &flow).is_empty());
}

#[test]
fn only_policy_drops_count() {
    let mut flow = drop_flow(
        Endpoint::default(),
        Endpoint::default(),
        TrafficDirection::Ingress,
        1,
    );
    assert!(matcher::is_policy_verdict(&flow));
    flow.drop_reason_desc = flow::DropReason::CtNoMapFound as i32;
    assert!(!matcher::is_policy_verdict(&flow));
    // Older relays set only the deprecated number.
    flow.drop_reason_desc = 0;
    flow.drop_reason = 133;
    assert!(matcher::is_policy_verdict(&flow));
}

#[test]
fn bad_selectors_are_refused_with_the_field() {
    let bad = annotated(json!({
        "metadata": { "name": "x", "namespace": "shop" },
        "spec": { "podSelector": { "matchExpressions": [{ "key": "a", "operator": "Gt" }] } }
    }));
    let err = policy::parse(NetworkPolicyKind::NetworkPolicy, &bad).unwrap_err();
    assert!(
        err.contains("spec.podSelector: matchExpressions[0].operator"),
        "{err}"
    );
}

fn alert_flow(i: u32) -> matcher::Matched {
    let set = set(&[(NetworkPolicyKind::NetworkPolicy, db_policy())]);
    let flow = drop_flow(
        pod("shop", &format!("web-{i}"), &["app=web"]),
        pod("shop", "db-0", &["app=db"]),
        TrafficDirection::Ingress,
        5432,
    );
    matcher::alert_for(set.matching(&flow)[0], &flow)
}

#[test]
fn identical_drops_are_one_alert_with_their_count() {
    let mut agg = Aggregator::new(60);
    for _ in 0..1000 {
        agg.add(alert_flow(1));
    }
    let (batch, suppressed) = agg.take_batch(0);
    assert_eq!((batch.len(), suppressed), (1, 0));
    let alert = &batch[0];
    assert_eq!(alert.count, 1000);
    assert_eq!(alert.port, 5432);
    assert_eq!(alert.source.as_ref().unwrap().pod_name, "web-1");
    assert_eq!(alert.destination.as_ref().unwrap().namespace, "shop");
    assert_eq!(alert.drop_reason, "POLICY_DENIED");
    // Counts are deltas: the next batch carries only what came after.
    for _ in 0..5 {
        agg.add(alert_flow(1));
    }
    let (batch, _) = agg.take_batch(1);
    assert_eq!(batch[0].count, 5);
    assert!(agg.take_batch(2).0.is_empty());
}

#[test]
fn new_alerts_are_rate_limited_per_policy_and_wait_counting() {
    let mut agg = Aggregator::new(3);
    for i in 0..5 {
        agg.add(alert_flow(i));
        agg.add(alert_flow(i));
    }
    let (first, _) = agg.take_batch(0);
    // Same first drop time: the tie goes by key, whatever the map's order.
    let sources: Vec<_> = first
        .iter()
        .map(|a| a.source.as_ref().unwrap().pod_name.clone())
        .collect();
    let mut sorted = sources.clone();
    sorted.sort();
    assert_eq!(sorted, ["web-0", "web-1", "web-2"]);
    // Known keys are counts, not new alerts: they pass while the window is full.
    agg.add(alert_flow(0));
    let (second, _) = agg.take_batch(30_000);
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].source.as_ref().unwrap().pod_name, "web-0");
    // The next minute takes the two that waited, with every drop they had meanwhile.
    let (third, _) = agg.take_batch(60_000);
    assert_eq!(third.len(), 2);
    assert!(third.iter().all(|a| a.count == 2));
}

#[test]
fn a_flood_of_distinct_keys_is_bounded_and_counted() {
    let mut agg = Aggregator::new(u32::MAX);
    let template = alert_flow(0);
    for i in 0..(MAX_PENDING as u32 + 7) {
        let mut m = template.clone();
        m.key.source = format!("10.1.{}.{}", i / 256, i % 256);
        agg.add(m);
    }
    assert_eq!(agg.pending(), MAX_PENDING);
    let (batch, suppressed) = agg.take_batch(0);
    assert_eq!((batch.len(), suppressed), (MAX_PENDING, 7));
}
