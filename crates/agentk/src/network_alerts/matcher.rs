//! Which annotated policies a dropped flow is an alert for, and the alert's key.

use gitops_hubble::flow::{self, Flow, layer4::Protocol};
use gitops_protocol::{
    FlowEndpoint, FlowVerdict, NetworkPolicyKind, NetworkPolicyRef, NetworkProtocol,
    TrafficDirection,
};

use super::policy::{EndpointLabels, WatchedPolicy};

/// The annotated policies agentk watches now.
#[derive(Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<WatchedPolicy>,
}

/// One end of a flow, with what matching needs.
struct Subject<'a> {
    endpoint: Option<&'a flow::Endpoint>,
    labels: EndpointLabels,
}

impl Subject<'_> {
    fn namespace(&self) -> Option<&str> {
        self.endpoint
            .map(|e| e.namespace.as_str())
            .filter(|n| !n.is_empty())
            .or_else(|| self.labels.namespace())
    }
}

/// What one alert is about: the dedupe key's fields plus what people are shown.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AlertKey {
    pub policy: (i32, String, String),
    pub source: String,
    pub destination: String,
    pub port: u32,
    pub protocol: i32,
    pub direction: i32,
}

/// A matched flow: its key, the alert it starts (count and times are the aggregator's) and its time.
#[derive(Debug, Clone)]
pub struct Matched {
    pub key: AlertKey,
    pub alert: gitops_protocol::NetworkAlert,
    pub time_ms: i64,
}

fn kind_of(name: &str) -> NetworkPolicyKind {
    match name {
        "NetworkPolicy" => NetworkPolicyKind::NetworkPolicy,
        "CiliumNetworkPolicy" => NetworkPolicyKind::CiliumNetworkPolicy,
        "CiliumClusterwideNetworkPolicy" => NetworkPolicyKind::CiliumClusterwideNetworkPolicy,
        _ => NetworkPolicyKind::Unspecified,
    }
}

impl PolicySet {
    /// The annotated policies that dropped `flow`. When Hubble names the denying policies (Cilium 1.15+
    /// fills `ingress_denied_by` / `egress_denied_by`), exactly those; else every annotated policy whose
    /// rules isolate the flow's subject: the destination for ingress, the source for egress (a pod selected
    /// for a direction is default-deny for it, so any such policy is a reason the flow was dropped).
    pub fn matching(&self, flow: &Flow) -> Vec<&WatchedPolicy> {
        let direction = flow.traffic_direction();
        let named: Vec<&flow::Policy> = match direction {
            flow::TrafficDirection::Ingress => flow.ingress_denied_by.iter().collect(),
            flow::TrafficDirection::Egress => flow.egress_denied_by.iter().collect(),
            flow::TrafficDirection::Unknown => flow
                .ingress_denied_by
                .iter()
                .chain(&flow.egress_denied_by)
                .collect(),
        };
        if !named.is_empty() {
            return self
                .policies
                .iter()
                .filter(|p| {
                    named.iter().any(|n| {
                        kind_of(&n.kind) == p.kind && n.name == p.name && n.namespace == p.namespace
                    })
                })
                .collect();
        }
        fn subject(e: Option<&flow::Endpoint>) -> Subject<'_> {
            Subject {
                endpoint: e,
                labels: EndpointLabels::parse(e.map(|e| e.labels.as_slice()).unwrap_or_default()),
            }
        }
        let ingress = matches!(
            direction,
            flow::TrafficDirection::Ingress | flow::TrafficDirection::Unknown
        )
        .then(|| subject(flow.destination.as_ref()));
        let egress = matches!(
            direction,
            flow::TrafficDirection::Egress | flow::TrafficDirection::Unknown
        )
        .then(|| subject(flow.source.as_ref()));
        self.policies
            .iter()
            .filter(|p| {
                p.rules.iter().any(|(selector, dirs)| {
                    let applies = |s: &Option<Subject<'_>>, on: bool| {
                        on && s.as_ref().is_some_and(|s| {
                            let in_scope = p.namespace.is_empty()
                                || s.namespace() == Some(p.namespace.as_str());
                            in_scope && selector.matches(&s.labels)
                        })
                    };
                    applies(&ingress, dirs.ingress) || applies(&egress, dirs.egress)
                })
            })
            .collect()
    }
}

fn endpoint(e: Option<&flow::Endpoint>, ip: &str) -> FlowEndpoint {
    let e = e.cloned().unwrap_or_default();
    FlowEndpoint {
        namespace: e.namespace,
        pod_name: e.pod_name,
        ip: ip.to_owned(),
        identity: e.identity,
        workload: e
            .workloads
            .first()
            .map(|w| format!("{}/{}", w.kind, w.name))
            .unwrap_or_default(),
    }
}

/// `namespace/pod` when a pod is known, else the IP (or the identity, for a flow without an IP).
pub fn endpoint_name(e: &FlowEndpoint) -> String {
    if !e.pod_name.is_empty() {
        format!("{}/{}", e.namespace, e.pod_name)
    } else if !e.ip.is_empty() {
        e.ip.clone()
    } else {
        format!("identity {}", e.identity)
    }
}

/// The alert `flow` raises for `policy`.
pub fn alert_for(policy: &WatchedPolicy, flow: &Flow) -> Matched {
    let ip = flow.ip.clone().unwrap_or_default();
    let source = endpoint(flow.source.as_ref(), &ip.source);
    let destination = endpoint(flow.destination.as_ref(), &ip.destination);
    let (protocol, port) = match flow.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(Protocol::Tcp(t)) => (NetworkProtocol::Tcp, t.destination_port),
        Some(Protocol::Udp(u)) => (NetworkProtocol::Udp, u.destination_port),
        Some(Protocol::Sctp(s)) => (NetworkProtocol::Sctp, s.destination_port),
        Some(Protocol::IcmPv4(_)) => (NetworkProtocol::Icmpv4, 0),
        Some(Protocol::IcmPv6(_)) => (NetworkProtocol::Icmpv6, 0),
        None => (NetworkProtocol::Unspecified, 0),
    };
    let direction = match flow.traffic_direction() {
        flow::TrafficDirection::Ingress => TrafficDirection::Ingress,
        flow::TrafficDirection::Egress => TrafficDirection::Egress,
        flow::TrafficDirection::Unknown => TrafficDirection::Unspecified,
    };
    let verdict = match flow.verdict() {
        flow::Verdict::Audit => FlowVerdict::Audit,
        _ => FlowVerdict::Dropped,
    };
    let drop_reason = match (
        flow.drop_reason_desc,
        flow::DropReason::try_from(flow.drop_reason_desc),
    ) {
        (0, _) => String::new(),
        (_, Ok(reason)) => reason.as_str_name().to_owned(),
        (n, Err(_)) => format!("DROP_REASON_{n}"),
    };
    let time_ms = flow
        .time
        .as_ref()
        .map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
        .unwrap_or_default();
    let key = AlertKey {
        policy: (
            policy.kind as i32,
            policy.namespace.clone(),
            policy.name.clone(),
        ),
        source: endpoint_name(&source),
        destination: endpoint_name(&destination),
        port,
        protocol: protocol as i32,
        direction: direction as i32,
    };
    let alert = gitops_protocol::NetworkAlert {
        policy: Some(NetworkPolicyRef {
            kind: policy.kind as i32,
            namespace: policy.namespace.clone(),
            name: policy.name.clone(),
        }),
        source: Some(source),
        destination: Some(destination),
        port,
        protocol: protocol as i32,
        direction: direction as i32,
        count: 0,
        first_seen_unix_ms: time_ms,
        last_seen_unix_ms: time_ms,
        verdict: verdict as i32,
        drop_reason,
    };
    Matched {
        key,
        alert,
        time_ms,
    }
}

/// Whether a flow the server's filter passed is a policy's doing: a drop event must carry a policy drop
/// reason (a drop for a full conntrack table is no policy's); a policy-verdict event always is.
pub fn is_policy_verdict(flow: &Flow) -> bool {
    let event = flow.event_type.as_ref().map_or(0, |e| e.r#type);
    if event == gitops_hubble::event_type::POLICY_VERDICT {
        return true;
    }
    let reason = if flow.drop_reason_desc != 0 {
        flow.drop_reason_desc
    } else {
        flow.drop_reason as i32
    };
    reason == flow::DropReason::PolicyDenied as i32 || reason == flow::DropReason::PolicyDeny as i32
}
