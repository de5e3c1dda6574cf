//! `clusterAgent { networkAlerts(first: N) … networkAlertsStatus … }` and `networkAlertsResolve`.

use async_graphql::{ID, InputObject, SimpleObject};

use super::{GID_PREFIX, agent_gid, parse_gid};
use crate::{
    KasState,
    network_alerts::{now_ms, payload::rfc3339_ms},
    store::network_alerts::{Endpoint, NetworkAlertRecord},
};

fn alert_gid(id: u64) -> ID {
    ID(format!("{GID_PREFIX}Clusters::NetworkAlert/{id}"))
}

/// The kind of the policy that dropped the flows.
// The variants are the Kubernetes kinds, which all end in NetworkPolicy.
#[allow(clippy::enum_variant_names)]
#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::network_alerts::PolicyKind")]
pub enum NetworkPolicyKind {
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy,
    /// cilium.io/v2 CiliumNetworkPolicy.
    CiliumNetworkPolicy,
    /// cilium.io/v2 CiliumClusterwideNetworkPolicy.
    CiliumClusterwideNetworkPolicy,
}

#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::network_alerts::Protocol")]
pub enum NetworkProtocol {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
    Unknown,
}

#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::network_alerts::Direction")]
pub enum TrafficDirection {
    Ingress,
    Egress,
    Unknown,
}

#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::network_alerts::Verdict")]
pub enum FlowVerdict {
    /// Dropped by policy.
    Dropped,
    /// A policy in audit mode would have dropped it.
    Audit,
}

#[derive(async_graphql::Enum, Clone, Copy, PartialEq, Eq)]
#[graphql(remote = "crate::store::network_alerts::ModuleState")]
pub enum NetworkModuleState {
    /// `cilium` is not configured in config.yaml.
    Disabled,
    /// Dialling the Hubble relay.
    Connecting,
    /// Following flows.
    Following,
    /// The relay could not be reached or the stream broke; agentk retries.
    RelayUnreachable,
    /// The configuration cannot work; fixed by a new config.yaml.
    Misconfigured,
    /// A state this kas does not know (a newer agentk).
    Unknown,
}

/// One end of the flows, as Hubble saw it last.
#[derive(SimpleObject)]
pub struct FlowEndpoint {
    /// Empty outside the cluster.
    namespace: String,
    pod_name: String,
    ip: String,
    /// e.g. `Deployment/frontend`, when Hubble knows it.
    workload: String,
}

impl From<Endpoint> for FlowEndpoint {
    fn from(e: Endpoint) -> Self {
        Self {
            namespace: e.namespace,
            pod_name: e.pod_name,
            ip: e.ip,
            workload: e.workload,
        }
    }
}

/// Flows a network policy dropped, by (policy, source, destination, port, protocol, direction).
#[derive(SimpleObject)]
pub struct NetworkAlert {
    id: ID,
    /// `namespace/name`; `name` for a CiliumClusterwideNetworkPolicy.
    policy: String,
    policy_kind: NetworkPolicyKind,
    /// `namespace/pod`, else the IP (after Cilium's reserved identity, e.g. `world 203.0.113.7`).
    source: String,
    destination: String,
    /// Destination port; 0 for ICMP.
    port: u32,
    protocol: NetworkProtocol,
    direction: TrafficDirection,
    verdict: FlowVerdict,
    /// Hubble's drop reason, e.g. `POLICY_DENIED`.
    drop_reason: String,
    /// Every matching flow reported, across firing episodes.
    count: u64,
    first_seen: String,
    last_seen: String,
    /// When the current firing episode began (Alertmanager's `startsAt`).
    firing_since: String,
    /// By an admin, or after `alerts.resolve_after` without a new drop.
    resolved: bool,
    resolved_at: Option<String>,
    source_endpoint: FlowEndpoint,
    destination_endpoint: FlowEndpoint,
}

fn alert(record: NetworkAlertRecord, resolve_after_ms: i64, now_ms: i64) -> NetworkAlert {
    let resolved = record.is_resolved(now_ms, resolve_after_ms);
    NetworkAlert {
        id: alert_gid(record.id),
        policy: record.policy.display_name(),
        policy_kind: record.policy.kind.into(),
        source: record.source.display_name(),
        destination: record.destination.display_name(),
        port: record.port,
        protocol: record.protocol.into(),
        direction: record.direction.into(),
        verdict: record.verdict.into(),
        count: record.count,
        first_seen: rfc3339_ms(record.first_seen_ms),
        last_seen: rfc3339_ms(record.last_seen_ms),
        firing_since: rfc3339_ms(record.episode_started_ms),
        resolved,
        resolved_at: resolved.then(|| rfc3339_ms(record.ends_at_ms(resolve_after_ms))),
        drop_reason: record.drop_reason,
        source_endpoint: record.source.into(),
        destination_endpoint: record.destination.into(),
    }
}

/// The agent's newest alerts by last seen, at most `first`.
pub(super) fn network_alerts(
    state: &KasState,
    agent_id: u64,
    first: i32,
) -> async_graphql::Result<Vec<NetworkAlert>> {
    let resolve_after_ms = state.network_alerts.resolve_after_ms();
    let now = now_ms();
    Ok(state
        .store
        .network_alerts(agent_id, first.max(0) as usize)?
        .into_iter()
        .map(|r| alert(r, resolve_after_ms, now))
        .collect())
}

/// How kas's forwarding of this agent's alerts went last.
#[derive(SimpleObject)]
pub struct AlertForwarding {
    /// The last failure, naming the receiver (`alertmanager: HTTP 400 …`); null after a success.
    last_error: Option<String>,
    last_success_at: Option<String>,
}

/// The agent's alerts module as it last reported, and what kas did with its alerts.
#[derive(SimpleObject)]
pub struct NetworkAlertsStatus {
    /// Null until the agent reports its module's status.
    state: Option<NetworkModuleState>,
    message: String,
    /// When `state` last changed.
    since: Option<String>,
    flows_seen: u64,
    flows_matched: u64,
    /// Events Hubble reported lost.
    lost_events: u64,
    /// Flows agentk matched but did not report (rate limits), summed over its batches.
    suppressed: u64,
    /// Times agentk (re)opened the flow stream.
    connects: u64,
    network_policies: u32,
    cilium_network_policies: u32,
    cilium_clusterwide_network_policies: u32,
    cilium_crds_absent: bool,
    /// Why agentk cannot watch a policy kind now (e.g. RBAC forbids it), if it cannot.
    policy_watch_error: Option<String>,
    /// When the status arrived (kas's clock).
    reported_at: Option<String>,
    /// Alerts kept now.
    alerts: u64,
    /// Alerts dropped by `alerts.max_per_agent`.
    evicted: u64,
    /// Batch entries kas refused as invalid, and the last one's reason (naming the field).
    rejected: u64,
    last_rejection: Option<String>,
    forwarding: AlertForwarding,
}

/// Null when the agent never reported anything about network alerts.
pub(super) fn network_alerts_status(
    state: &KasState,
    agent_id: u64,
) -> async_graphql::Result<Option<NetworkAlertsStatus>> {
    let Some(meta) = state.store.network_alerts_meta(agent_id)? else {
        return Ok(None);
    };
    let forwarding = state
        .network_alerts
        .forwarding
        .get(agent_id)
        .unwrap_or_default();
    let status = meta.status;
    let s = status.as_ref();
    Ok(Some(NetworkAlertsStatus {
        state: s.map(|s| s.state.into()),
        message: s.map(|s| s.message.clone()).unwrap_or_default(),
        since: s.map(|s| rfc3339_ms(s.since_ms)),
        flows_seen: s.map_or(0, |s| s.flows_seen),
        flows_matched: s.map_or(0, |s| s.flows_matched),
        lost_events: s.map_or(0, |s| s.lost_events),
        suppressed: meta.suppressed,
        connects: s.map_or(0, |s| s.connects),
        network_policies: s.map_or(0, |s| s.network_policies),
        cilium_network_policies: s.map_or(0, |s| s.cilium_network_policies),
        cilium_clusterwide_network_policies: s.map_or(0, |s| s.cilium_clusterwide_network_policies),
        cilium_crds_absent: s.is_some_and(|s| s.cilium_crds_absent),
        policy_watch_error: s
            .map(|s| s.policy_watch_error.clone())
            .filter(|e| !e.is_empty()),
        reported_at: s.map(|s| rfc3339_ms(s.reported_at_ms)),
        alerts: meta.count,
        evicted: meta.evicted,
        rejected: meta.rejected,
        last_rejection: meta.last_rejection,
        forwarding: AlertForwarding {
            last_error: forwarding.last_error,
            last_success_at: forwarding.last_success_at_ms.map(rfc3339_ms),
        },
    }))
}

#[derive(InputObject)]
pub struct NetworkAlertsResolveInput {
    pub cluster_agent_id: ID,
    /// Absent: every firing alert of the agent.
    pub alert_ids: Option<Vec<ID>>,
}

#[derive(SimpleObject)]
pub struct NetworkAlertsResolvePayload {
    /// How many alerts were resolved (and sent to Alertmanager with `endsAt` now).
    resolved: usize,
    /// Per alert that could not be resolved, why; the others are resolved anyway.
    errors: Vec<String>,
}

pub(super) fn resolve(
    state: &KasState,
    input: NetworkAlertsResolveInput,
) -> async_graphql::Result<NetworkAlertsResolvePayload> {
    let refuse = |e: String| NetworkAlertsResolvePayload {
        resolved: 0,
        errors: vec![e],
    };
    let agent_id = match parse_gid(&input.cluster_agent_id, "Agent") {
        Ok(id) => id,
        Err(e) => return Ok(refuse(e)),
    };
    if state.store.agent(agent_id)?.is_none() {
        return Ok(refuse(format!(
            "agent {} does not exist",
            agent_gid(agent_id).as_str()
        )));
    }
    let mut errors = Vec::new();
    let ids = input.alert_ids.map(|ids| {
        ids.iter()
            .filter_map(|id| match parse_gid(id, "NetworkAlert") {
                Ok(n) => Some(n),
                Err(e) => {
                    errors.push(e);
                    None
                }
            })
            .collect::<Vec<u64>>()
    });
    let (resolved, failures) = state.store.resolve_network_alerts(
        agent_id,
        ids.as_deref(),
        now_ms(),
        state.network_alerts.resolve_after_ms(),
    )?;
    errors.extend(failures);
    state.network_alerts.pending.add(agent_id, &resolved);
    tracing::info!(
        mod_name = "network_alerts",
        agent_id,
        resolved = resolved.len(),
        "network alerts resolved by an admin"
    );
    Ok(NetworkAlertsResolvePayload {
        resolved: resolved.len(),
        errors,
    })
}
