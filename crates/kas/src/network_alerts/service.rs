//! `NetworkAlerts`, served on the agent port: agentk's batches of alerts and its module status. An entry
//! kas cannot use is refused by itself (named in the log and the agent's GraphQL status) and the rest of
//! its batch is stored; the call fails only when the store does, so agentk re-sends the batch.

use std::sync::Arc;

use gitops_protocol::{
    FlowEndpoint, FlowVerdict, NetworkAlert, NetworkAlertAck, NetworkAlertBatch,
    NetworkModuleState as WireState, NetworkModuleStatus, NetworkPolicyKind, NetworkProtocol,
    TrafficDirection,
    network_alerts_server::{NetworkAlerts, NetworkAlertsServer},
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::now_ms;
use crate::{
    KasState,
    auth::AgentIdentity,
    store::{
        StoreError,
        network_alerts::{
            AlertUpdate, BatchLimits, Direction, Endpoint, ModuleState, ModuleStatusRecord,
            PolicyKind, PolicyRef, Protocol, Rejections, Verdict,
        },
    },
};

/// Most entries one batch may carry; the rest are refused (agentk aggregates, so far fewer arrive).
pub const MAX_ALERTS_PER_BATCH: usize = 10_000;
/// A flow may be dated at most this far past kas's clock (clock skew); later dates are clamped.
const MAX_FUTURE_MS: i64 = 24 * 3600 * 1000;
/// Longest accepted names: Kubernetes object names (253), IPv6 text with a zone (64), Hubble's reason words.
const MAX_NAME: usize = 253;
const MAX_IP: usize = 64;
const MAX_WORKLOAD: usize = 2 * MAX_NAME + 64;
const MAX_REASON: usize = 128;
const MAX_MESSAGE: usize = 4096;

pub struct NetworkAlertsService {
    state: Arc<KasState>,
}

impl NetworkAlertsService {
    pub fn server(state: Arc<KasState>) -> NetworkAlertsServer<Self> {
        NetworkAlertsServer::new(Self { state })
    }
}

fn identity<T>(request: &Request<T>) -> Result<AgentIdentity, Status> {
    request
        .extensions()
        .get::<AgentIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no agent identity"))
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NoSuchAgent(id) => Status::not_found(format!("agent {id} does not exist")),
        other => Status::unavailable(other.to_string()),
    }
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{field}: {} bytes, at most {max}", value.len()));
    }
    Ok(())
}

fn endpoint(field: &str, wire: Option<FlowEndpoint>) -> Result<Endpoint, String> {
    let wire = wire.ok_or_else(|| format!("{field}: missing"))?;
    check_len(&format!("{field}.namespace"), &wire.namespace, MAX_NAME)?;
    check_len(&format!("{field}.pod_name"), &wire.pod_name, MAX_NAME)?;
    check_len(&format!("{field}.ip"), &wire.ip, MAX_IP)?;
    check_len(&format!("{field}.workload"), &wire.workload, MAX_WORKLOAD)?;
    if wire.pod_name.is_empty() && wire.ip.is_empty() {
        return Err(format!("{field}: neither pod_name nor ip is set"));
    }
    if !wire.pod_name.is_empty() && wire.namespace.is_empty() {
        return Err(format!(
            "{field}.namespace: empty for pod {}",
            wire.pod_name
        ));
    }
    Ok(Endpoint {
        namespace: wire.namespace,
        pod_name: wire.pod_name,
        ip: wire.ip,
        identity: wire.identity,
        workload: wire.workload,
    })
}

/// The store's form of one batch entry (`alerts[index]`), or why it is refused, naming the field.
pub fn alert_update(index: usize, wire: NetworkAlert, now_ms: i64) -> Result<AlertUpdate, String> {
    let at = |field: &str| format!("alerts[{index}].{field}");
    let policy = wire.policy.ok_or_else(|| at("policy: missing"))?;
    let kind = match NetworkPolicyKind::try_from(policy.kind) {
        Ok(NetworkPolicyKind::NetworkPolicy) => PolicyKind::NetworkPolicy,
        Ok(NetworkPolicyKind::CiliumNetworkPolicy) => PolicyKind::CiliumNetworkPolicy,
        Ok(NetworkPolicyKind::CiliumClusterwideNetworkPolicy) => {
            PolicyKind::CiliumClusterwideNetworkPolicy
        }
        Ok(NetworkPolicyKind::Unspecified) | Err(_) => {
            return Err(format!(
                "{}: {} is not a policy kind",
                at("policy.kind"),
                policy.kind
            ));
        }
    };
    if policy.name.is_empty() {
        return Err(format!("{}: empty", at("policy.name")));
    }
    check_len(&at("policy.name"), &policy.name, MAX_NAME)?;
    check_len(&at("policy.namespace"), &policy.namespace, MAX_NAME)?;
    match (kind, policy.namespace.is_empty()) {
        (PolicyKind::CiliumClusterwideNetworkPolicy, false) => {
            return Err(format!(
                "{}: set for a CiliumClusterwideNetworkPolicy, which has none",
                at("policy.namespace")
            ));
        }
        (PolicyKind::NetworkPolicy | PolicyKind::CiliumNetworkPolicy, true) => {
            return Err(format!("{}: empty", at("policy.namespace")));
        }
        _ => {}
    }
    let verdict = match FlowVerdict::try_from(wire.verdict) {
        Ok(FlowVerdict::Dropped) => Verdict::Dropped,
        Ok(FlowVerdict::Audit) => Verdict::Audit,
        Ok(FlowVerdict::Unspecified) | Err(_) => {
            return Err(format!(
                "{}: {} is not a verdict",
                at("verdict"),
                wire.verdict
            ));
        }
    };
    if wire.count == 0 {
        return Err(format!(
            "{}: 0; an entry reports at least one flow",
            at("count")
        ));
    }
    check_len(&at("drop_reason"), &wire.drop_reason, MAX_REASON)?;
    let clamp = |ms: i64| ms.clamp(0, now_ms.saturating_add(MAX_FUTURE_MS));
    let last_seen_ms = match wire.last_seen_unix_ms {
        0 => now_ms,
        ms => clamp(ms),
    };
    let first_seen_ms = match wire.first_seen_unix_ms {
        0 => last_seen_ms,
        ms => clamp(ms),
    };
    if first_seen_ms > last_seen_ms {
        return Err(format!(
            "{}: {} is after last_seen_unix_ms {}",
            at("first_seen_unix_ms"),
            wire.first_seen_unix_ms,
            wire.last_seen_unix_ms
        ));
    }
    Ok(AlertUpdate {
        policy: PolicyRef {
            kind,
            namespace: policy.namespace,
            name: policy.name,
        },
        source: endpoint(&at("source"), wire.source)?,
        destination: endpoint(&at("destination"), wire.destination)?,
        port: wire.port,
        protocol: match NetworkProtocol::try_from(wire.protocol) {
            Ok(NetworkProtocol::Tcp) => Protocol::Tcp,
            Ok(NetworkProtocol::Udp) => Protocol::Udp,
            Ok(NetworkProtocol::Sctp) => Protocol::Sctp,
            Ok(NetworkProtocol::Icmpv4) => Protocol::Icmpv4,
            Ok(NetworkProtocol::Icmpv6) => Protocol::Icmpv6,
            Ok(NetworkProtocol::Unspecified) | Err(_) => Protocol::Unknown,
        },
        direction: match TrafficDirection::try_from(wire.direction) {
            Ok(TrafficDirection::Ingress) => Direction::Ingress,
            Ok(TrafficDirection::Egress) => Direction::Egress,
            Ok(TrafficDirection::Unspecified) | Err(_) => Direction::Unknown,
        },
        verdict,
        drop_reason: wire.drop_reason,
        count: wire.count,
        first_seen_ms,
        last_seen_ms,
    })
}

/// `text` cut to at most `MAX_MESSAGE` bytes, on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The store's form of a status report received at `now_ms`.
pub fn module_status(wire: NetworkModuleStatus, now_ms: i64) -> ModuleStatusRecord {
    let message = bounded(wire.message);
    let policy_watch_error = bounded(wire.policy_watch_error);
    ModuleStatusRecord {
        state: match WireState::try_from(wire.state) {
            Ok(WireState::Disabled) => ModuleState::Disabled,
            Ok(WireState::Connecting) => ModuleState::Connecting,
            Ok(WireState::Following) => ModuleState::Following,
            Ok(WireState::RelayUnreachable) => ModuleState::RelayUnreachable,
            Ok(WireState::Misconfigured) => ModuleState::Misconfigured,
            Ok(WireState::Unspecified) | Err(_) => ModuleState::Unknown,
        },
        message,
        since_ms: wire
            .since_unix_ms
            .clamp(0, now_ms.saturating_add(MAX_FUTURE_MS)),
        flows_seen: wire.flows_seen,
        flows_matched: wire.flows_matched,
        lost_events: wire.lost_events,
        connects: wire.connects,
        network_policies: wire.network_policies,
        cilium_network_policies: wire.cilium_network_policies,
        cilium_clusterwide_network_policies: wire.cilium_clusterwide_network_policies,
        cilium_crds_absent: wire.cilium_crds_absent,
        policy_watch_error,
        reported_at_ms: now_ms,
    }
}

#[tonic::async_trait]
impl NetworkAlerts for NetworkAlertsService {
    async fn report_alerts(
        &self,
        request: Request<NetworkAlertBatch>,
    ) -> Result<Response<NetworkAlertAck>, Status> {
        let identity = identity(&request)?;
        let batch = request.into_inner();
        let now = now_ms();
        let total = batch.alerts.len();
        let mut updates = Vec::with_capacity(total.min(MAX_ALERTS_PER_BATCH));
        let mut rejections = Rejections::default();
        for (index, wire) in batch.alerts.into_iter().enumerate() {
            let result = if index >= MAX_ALERTS_PER_BATCH {
                Err(format!(
                    "alerts[{index}]: over {MAX_ALERTS_PER_BATCH} entries in one batch"
                ))
            } else {
                alert_update(index, wire, now)
            };
            match result {
                Ok(update) => updates.push(update),
                Err(why) => {
                    rejections.count += 1;
                    if rejections.count <= 3 {
                        warn!(
                            mod_name = "network_alerts",
                            agent_id = identity.agent_id,
                            batch_id = batch.batch_id,
                            error = %why,
                            "alert refused"
                        );
                    }
                    rejections.last = Some(why);
                }
            }
        }
        let alerts = &self.state.network_alerts;
        let limits = BatchLimits {
            max_per_agent: alerts.config.max_per_agent,
            resolve_after_ms: alerts.resolve_after_ms(),
        };
        let outcome = self
            .state
            .store
            .apply_network_alert_batch(
                identity.agent_id,
                batch.batch_id,
                &updates,
                batch.suppressed,
                &rejections,
                limits,
            )
            .map_err(store_status)?;
        let metrics = &self.state.metrics.network_alerts;
        if outcome.duplicate {
            metrics.batch(true, 0, 0, 0);
            return Ok(Response::new(NetworkAlertAck {}));
        }
        metrics.batch(
            false,
            updates.len(),
            rejections.count,
            outcome.evicted.len(),
        );
        if outcome.fired > 0 || !outcome.evicted.is_empty() {
            info!(
                mod_name = "network_alerts",
                agent_id = identity.agent_id,
                batch_id = batch.batch_id,
                entries = total,
                firing = outcome.fired,
                evicted = outcome.evicted.len(),
                refused = rejections.count,
                "network alerts reported"
            );
        }
        alerts.pending.add(identity.agent_id, &outcome.changed);
        // Evicted ones too: the forwarder finds them gone and forgets what it posted of them.
        alerts.pending.add(identity.agent_id, &outcome.evicted);
        Ok(Response::new(NetworkAlertAck {}))
    }

    async fn report_status(
        &self,
        request: Request<NetworkModuleStatus>,
    ) -> Result<Response<NetworkAlertAck>, Status> {
        let identity = identity(&request)?;
        let status = module_status(request.into_inner(), now_ms());
        info!(
            mod_name = "network_alerts",
            agent_id = identity.agent_id,
            state = ?status.state,
            message = %status.message,
            "network alerts module status"
        );
        self.state
            .store
            .set_network_module_status(identity.agent_id, status)
            .map_err(store_status)?;
        Ok(Response::new(NetworkAlertAck {}))
    }
}

#[cfg(test)]
mod tests {
    use gitops_protocol::NetworkPolicyRef;

    use super::*;

    fn wire() -> NetworkAlert {
        NetworkAlert {
            policy: Some(NetworkPolicyRef {
                kind: NetworkPolicyKind::NetworkPolicy.into(),
                namespace: "shop".into(),
                name: "deny".into(),
            }),
            source: Some(FlowEndpoint {
                namespace: "shop".into(),
                pod_name: "web".into(),
                ..Default::default()
            }),
            destination: Some(FlowEndpoint {
                ip: "10.0.0.1".into(),
                ..Default::default()
            }),
            port: 80,
            protocol: NetworkProtocol::Tcp.into(),
            direction: TrafficDirection::Ingress.into(),
            count: 2,
            first_seen_unix_ms: 1_000,
            last_seen_unix_ms: 2_000,
            verdict: FlowVerdict::Dropped.into(),
            drop_reason: "POLICY_DENIED".into(),
        }
    }

    /// Spoils one field of an entry.
    type Change = Box<dyn Fn(&mut NetworkAlert)>;

    #[test]
    fn bad_entries_are_refused_naming_the_field() {
        let now = 10_000;
        let ok = alert_update(0, wire(), now).unwrap();
        assert_eq!(
            (ok.count, ok.first_seen_ms, ok.last_seen_ms),
            (2, 1_000, 2_000)
        );
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|a| a.policy = None), "alerts[4].policy"),
            (
                Box::new(|a| a.policy.as_mut().unwrap().kind = 0),
                "alerts[4].policy.kind",
            ),
            (
                Box::new(|a| a.policy.as_mut().unwrap().name.clear()),
                "alerts[4].policy.name",
            ),
            (
                Box::new(|a| a.policy.as_mut().unwrap().namespace.clear()),
                "alerts[4].policy.namespace",
            ),
            (Box::new(|a| a.count = 0), "alerts[4].count"),
            (Box::new(|a| a.verdict = 7), "alerts[4].verdict"),
            (
                Box::new(|a| a.first_seen_unix_ms = 3_000),
                "alerts[4].first_seen_unix_ms",
            ),
            (Box::new(|a| a.source = None), "alerts[4].source"),
            (
                Box::new(|a| a.destination.as_mut().unwrap().ip.clear()),
                "alerts[4].destination",
            ),
            (
                Box::new(|a| a.source.as_mut().unwrap().namespace = "x".repeat(300)),
                "alerts[4].source.namespace",
            ),
        ];
        for (change, field) in cases {
            let mut bad = wire();
            change(&mut bad);
            let err = alert_update(4, bad, now).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        let mut future = wire();
        future.first_seen_unix_ms = 0;
        future.last_seen_unix_ms = i64::MAX;
        let clamped = alert_update(0, future, now).unwrap();
        assert_eq!(clamped.last_seen_ms, now + MAX_FUTURE_MS);
        assert_eq!(clamped.first_seen_ms, clamped.last_seen_ms);
    }
}
