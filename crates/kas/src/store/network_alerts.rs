//! Network-policy alerts agents report (`NetworkAlerts.ReportAlerts`), per agent and bounded, and the latest
//! health of each agent's alerts module (`ReportStatus`).
//!
//! An alert is one dedupe key (policy, source, destination, port, protocol, direction) with a running count.
//! Batches carry deltas and are idempotent by batch id: the last [`REMEMBERED_BATCHES`] ids of an agent are
//! kept with its alerts, in the same transaction, so a batch re-sent after a lost ack (or a kas restart) is
//! counted once.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{AGENTS, Store, StoreError, decode, encode, next_id};

/// `(agent id, alert id)` → [`NetworkAlertRecord`] as JSON.
const NETWORK_ALERTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("network_alerts");
/// `(agent id, dedupe key)` → alert id.
const NETWORK_ALERT_KEYS: TableDefinition<(u64, &str), u64> =
    TableDefinition::new("network_alert_keys");
/// `(agent id, last seen unix ms, alert id)`: the order GraphQL lists in and the bound drops by.
const NETWORK_ALERTS_BY_LAST_SEEN: TableDefinition<(u64, i64, u64), ()> =
    TableDefinition::new("network_alerts_by_last_seen");
/// agent id → [`AgentAlertsMeta`] as JSON.
const NETWORK_ALERT_AGENTS: TableDefinition<u64, &[u8]> =
    TableDefinition::new("network_alert_agents");

/// Batch ids remembered per agent. agentk re-sends one batch until it is acknowledged and only then builds
/// the next, so a handful would do; more covers several agentk replicas taking over from each other.
pub const REMEMBERED_BATCHES: usize = 64;

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(NETWORK_ALERTS)?;
    txn.open_table(NETWORK_ALERT_KEYS)?;
    txn.open_table(NETWORK_ALERTS_BY_LAST_SEEN)?;
    txn.open_table(NETWORK_ALERT_AGENTS)?;
    Ok(())
}

/// Removes everything of `agent_id` (the agent is being deleted).
pub(super) fn remove_agent(txn: &redb::WriteTransaction, agent_id: u64) -> Result<(), StoreError> {
    txn.open_table(NETWORK_ALERTS)?
        .retain_in((agent_id, 0)..=(agent_id, u64::MAX), |_, _| false)?;
    txn.open_table(NETWORK_ALERTS_BY_LAST_SEEN)?.retain_in(
        (agent_id, i64::MIN, 0)..=(agent_id, i64::MAX, u64::MAX),
        |_, _| false,
    )?;
    let mut keys = txn.open_table(NETWORK_ALERT_KEYS)?;
    let mut mine: Vec<String> = Vec::new();
    for entry in keys.range((agent_id, "")..)? {
        let (key, _) = entry?;
        let (agent, name) = key.value();
        if agent != agent_id {
            break;
        }
        mine.push(name.to_owned());
    }
    for key in mine {
        keys.remove((agent_id, key.as_str()))?;
    }
    txn.open_table(NETWORK_ALERT_AGENTS)?.remove(agent_id)?;
    Ok(())
}

// The variants are the Kubernetes kinds, which all end in NetworkPolicy.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// networking.k8s.io/v1 NetworkPolicy.
    NetworkPolicy,
    /// cilium.io/v2 CiliumNetworkPolicy.
    CiliumNetworkPolicy,
    /// cilium.io/v2 CiliumClusterwideNetworkPolicy (no namespace).
    CiliumClusterwideNetworkPolicy,
}

impl PolicyKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Self::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Icmpv4,
    Icmpv6,
    /// Hubble named none, or one this kas does not know.
    Unknown,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Icmpv4 => "ICMPv4",
            Self::Icmpv6 => "ICMPv6",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Ingress,
    Egress,
    /// Hubble could not tell.
    Unknown,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Dropped by policy.
    Dropped,
    /// A policy in audit mode would have dropped it.
    Audit,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "dropped",
            Self::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRef {
    pub kind: PolicyKind,
    /// Empty for a CiliumClusterwideNetworkPolicy.
    pub namespace: String,
    pub name: String,
}

impl PolicyRef {
    /// `namespace/name`, or `name` for a cluster-wide policy.
    pub fn display_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// One end of a flow as Hubble saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub namespace: String,
    pub pod_name: String,
    pub ip: String,
    /// Cilium's security identity.
    pub identity: u32,
    /// e.g. `Deployment/frontend`.
    pub workload: String,
}

impl Endpoint {
    /// `namespace/pod` when the pod is known, else the IP, after Cilium's reserved identity's name when it
    /// has one (`world 203.0.113.7`).
    pub fn display_name(&self) -> String {
        if !self.pod_name.is_empty() {
            return format!("{}/{}", self.namespace, self.pod_name);
        }
        match reserved_identity(self.identity) {
            Some(name) if self.ip.is_empty() => name.to_owned(),
            Some(name) => format!("{name} {}", self.ip),
            None => self.ip.clone(),
        }
    }
}

/// Cilium's reserved security identities (pkg/identity: numbers below 256 are fixed).
fn reserved_identity(identity: u32) -> Option<&'static str> {
    Some(match identity {
        1 => "host",
        2 | 9 | 10 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        8 => "ingress",
        _ => return None,
    })
}

/// What one entry of a batch says about its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertUpdate {
    pub policy: PolicyRef,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u32,
    pub protocol: Protocol,
    pub direction: Direction,
    pub verdict: Verdict,
    pub drop_reason: String,
    /// Matching flows since the previous batch (at least 1).
    pub count: u64,
    /// Unix milliseconds, `first_seen_ms <= last_seen_ms`.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
}

impl AlertUpdate {
    /// The dedupe key: (policy, source, destination, port, protocol, direction).
    fn key(&self) -> String {
        format!(
            "{:?}\n{}\n{}\n{}\n{}\n{}\n{:?}\n{:?}",
            self.policy.kind,
            self.policy.namespace,
            self.policy.name,
            self.source.display_name(),
            self.destination.display_name(),
            self.port,
            self.protocol,
            self.direction,
        )
    }
}

/// One alert kas keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkAlertRecord {
    /// Unique across agents, never reused.
    pub id: u64,
    pub agent_id: u64,
    pub policy: PolicyRef,
    /// The latest details of each end (the name, part of the key, does not change).
    pub source: Endpoint,
    pub destination: Endpoint,
    pub port: u32,
    pub protocol: Protocol,
    pub direction: Direction,
    pub verdict: Verdict,
    pub drop_reason: String,
    /// Every matching flow reported, across episodes.
    pub count: u64,
    /// Unix milliseconds of the first and last matching flow.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// When the current firing episode began: the first drop, or the first after a resolution.
    pub episode_started_ms: i64,
    /// Set when an admin resolved it (`networkAlertsResolve`), until it gets new drops.
    pub resolved_at_ms: Option<i64>,
}

impl NetworkAlertRecord {
    /// When it is (or will be) resolved: by an admin, or `resolve_after_ms` after its last drop.
    pub fn ends_at_ms(&self, resolve_after_ms: i64) -> i64 {
        self.resolved_at_ms
            .unwrap_or_else(|| self.last_seen_ms.saturating_add(resolve_after_ms))
    }

    /// Whether it is resolved at `now_ms`.
    pub fn is_resolved(&self, now_ms: i64, resolve_after_ms: i64) -> bool {
        self.ends_at_ms(resolve_after_ms) <= now_ms
    }

    /// The namespace Alertmanager routes on: the policy's, or for a cluster-wide policy the namespace of
    /// the endpoint it protects (the destination of ingress, the source of egress).
    pub fn namespace(&self) -> &str {
        if !self.policy.namespace.is_empty() {
            return &self.policy.namespace;
        }
        match self.direction {
            Direction::Egress => &self.source.namespace,
            Direction::Ingress | Direction::Unknown => &self.destination.namespace,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleState {
    Disabled,
    Connecting,
    Following,
    RelayUnreachable,
    Misconfigured,
    /// A state this kas does not know (a newer agent).
    Unknown,
}

/// The latest `ReportStatus` of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatusRecord {
    pub state: ModuleState,
    pub message: String,
    pub since_ms: i64,
    pub flows_seen: u64,
    pub flows_matched: u64,
    pub lost_events: u64,
    pub connects: u64,
    pub network_policies: u32,
    pub cilium_network_policies: u32,
    pub cilium_clusterwide_network_policies: u32,
    pub cilium_crds_absent: bool,
    /// Why agentk cannot watch a policy kind (RBAC, say); empty when it can. Absent in older records.
    #[serde(default)]
    pub policy_watch_error: String,
    /// kas's clock when it arrived, unix milliseconds.
    pub reported_at_ms: i64,
}

/// Per agent: the batch ids seen, counters, and the module's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentAlertsMeta {
    /// Newest last.
    pub recent_batches: Vec<u64>,
    /// Alerts stored now.
    pub count: u64,
    /// Flows agentk matched but did not report (its rate limits), summed over batches.
    pub suppressed: u64,
    /// Batch entries kas refused (each named in the log and in `last_rejection`).
    pub rejected: u64,
    pub last_rejection: Option<String>,
    /// Alerts dropped by `alerts.max_per_agent`.
    pub evicted: u64,
    pub status: Option<ModuleStatusRecord>,
}

/// What storing a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The batch id was seen before: nothing was counted again.
    pub duplicate: bool,
    /// Alerts created or changed (and still stored), to forward.
    pub changed: Vec<u64>,
    /// How many of them are new keys or re-fired after a resolution.
    pub fired: usize,
    /// Alerts dropped to stay within the bound (the forwarder forgets them).
    pub evicted: Vec<u64>,
}

/// How a batch is to be stored.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_per_agent: usize,
    /// A key with no drop for this long has resolved; its next drop starts a new episode.
    pub resolve_after_ms: i64,
}

/// Entries of a batch kas refused, by why; counted and shown with the agent's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejections {
    pub count: u64,
    pub last: Option<String>,
}

impl Store {
    /// Adds a batch's deltas to the agent's alerts, unless its id was stored before. Entries already
    /// refused are only counted (`rejections`), so the batch id is remembered either way.
    pub fn apply_network_alert_batch(
        &self,
        agent_id: u64,
        batch_id: u64,
        updates: &[AlertUpdate],
        suppressed: u64,
        rejections: &Rejections,
        limits: BatchLimits,
    ) -> Result<BatchOutcome, StoreError> {
        let txn = self.db.begin_write()?;
        let outcome = {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Err(StoreError::NoSuchAgent(agent_id));
            }
            let mut agents = txn.open_table(NETWORK_ALERT_AGENTS)?;
            let mut meta: AgentAlertsMeta = agents
                .get(agent_id)?
                .map(|v| decode("network_alert_agents", v.value()))
                .transpose()?
                .unwrap_or_default();
            if meta.recent_batches.contains(&batch_id) {
                return Ok(BatchOutcome {
                    duplicate: true,
                    ..Default::default()
                });
            }
            meta.recent_batches.push(batch_id);
            let excess = meta.recent_batches.len().saturating_sub(REMEMBERED_BATCHES);
            meta.recent_batches.drain(..excess);
            meta.suppressed = meta.suppressed.saturating_add(suppressed);
            meta.rejected = meta.rejected.saturating_add(rejections.count);
            if rejections.last.is_some() {
                meta.last_rejection.clone_from(&rejections.last);
            }

            let mut alerts = txn.open_table(NETWORK_ALERTS)?;
            let mut keys = txn.open_table(NETWORK_ALERT_KEYS)?;
            let mut by_last_seen = txn.open_table(NETWORK_ALERTS_BY_LAST_SEEN)?;
            let mut outcome = BatchOutcome::default();
            for update in updates {
                let key = update.key();
                let existing = match keys.get((agent_id, key.as_str()))? {
                    Some(id) => {
                        let id = id.value();
                        alerts
                            .get((agent_id, id))?
                            .map(|v| decode::<NetworkAlertRecord>("network_alerts", v.value()))
                            .transpose()?
                    }
                    None => None,
                };
                let (record, fired) = match existing {
                    Some(mut record) => {
                        by_last_seen.remove((agent_id, record.last_seen_ms, record.id))?;
                        let fired = merge(&mut record, update, limits.resolve_after_ms);
                        (record, fired)
                    }
                    None => {
                        let id = next_id(&txn, "network_alert")?;
                        keys.insert((agent_id, key.as_str()), id)?;
                        meta.count += 1;
                        (new_record(id, agent_id, update), true)
                    }
                };
                alerts.insert((agent_id, record.id), encode(&record).as_slice())?;
                by_last_seen.insert((agent_id, record.last_seen_ms, record.id), ())?;
                if !outcome.changed.contains(&record.id) {
                    outcome.changed.push(record.id);
                }
                if fired {
                    outcome.fired += 1;
                }
            }
            // The bound: the alerts seen longest ago go first.
            while meta.count > limits.max_per_agent as u64 {
                let Some(oldest) = by_last_seen
                    .range((agent_id, i64::MIN, 0)..=(agent_id, i64::MAX, u64::MAX))?
                    .next()
                    .transpose()?
                    .map(|(k, _)| k.value())
                else {
                    break;
                };
                let (_, last_seen, id) = oldest;
                by_last_seen.remove((agent_id, last_seen, id))?;
                if let Some(record) = alerts
                    .remove((agent_id, id))?
                    .map(|v| decode::<NetworkAlertRecord>("network_alerts", v.value()))
                    .transpose()?
                {
                    keys.remove((agent_id, record_key(&record).as_str()))?;
                }
                meta.count -= 1;
                meta.evicted += 1;
                outcome.evicted.push(id);
                outcome.changed.retain(|changed| *changed != id);
            }
            agents.insert(agent_id, encode(&meta).as_slice())?;
            outcome
        };
        txn.commit()?;
        Ok(outcome)
    }

    /// The agent's newest alerts by last seen, at most `first`.
    pub fn network_alerts(
        &self,
        agent_id: u64,
        first: usize,
    ) -> Result<Vec<NetworkAlertRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(NETWORK_ALERTS_BY_LAST_SEEN)?;
        let alerts = txn.open_table(NETWORK_ALERTS)?;
        let mut out = Vec::new();
        for entry in index
            .range((agent_id, i64::MIN, 0)..=(agent_id, i64::MAX, u64::MAX))?
            .rev()
            .take(first)
        {
            let (_, _, id) = entry?.0.value();
            if let Some(v) = alerts.get((agent_id, id))? {
                out.push(decode("network_alerts", v.value())?);
            }
        }
        Ok(out)
    }

    pub fn network_alert(
        &self,
        agent_id: u64,
        id: u64,
    ) -> Result<Option<NetworkAlertRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let alerts = txn.open_table(NETWORK_ALERTS)?;
        alerts
            .get((agent_id, id))?
            .map(|v| decode("network_alerts", v.value()))
            .transpose()
    }

    /// Every stored alert still firing at `now_ms` (for the forwarder after a restart).
    pub fn firing_network_alerts(
        &self,
        now_ms: i64,
        resolve_after_ms: i64,
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let alerts = txn.open_table(NETWORK_ALERTS)?;
        let mut out = Vec::new();
        for entry in alerts.iter()? {
            let (key, value) = entry?;
            let record: NetworkAlertRecord = decode("network_alerts", value.value())?;
            if !record.is_resolved(now_ms, resolve_after_ms) {
                out.push(key.value());
            }
        }
        Ok(out)
    }

    /// The agent's counters and module status; `None` when it never reported any.
    pub fn network_alerts_meta(
        &self,
        agent_id: u64,
    ) -> Result<Option<AgentAlertsMeta>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(NETWORK_ALERT_AGENTS)?;
        table
            .get(agent_id)?
            .map(|v| decode("network_alert_agents", v.value()))
            .transpose()
    }

    /// Keeps the agent's latest module status.
    pub fn set_network_module_status(
        &self,
        agent_id: u64,
        status: ModuleStatusRecord,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            if txn.open_table(AGENTS)?.get(agent_id)?.is_none() {
                return Err(StoreError::NoSuchAgent(agent_id));
            }
            let mut agents = txn.open_table(NETWORK_ALERT_AGENTS)?;
            let mut meta: AgentAlertsMeta = agents
                .get(agent_id)?
                .map(|v| decode("network_alert_agents", v.value()))
                .transpose()?
                .unwrap_or_default();
            meta.status = Some(status);
            agents.insert(agent_id, encode(&meta).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Resolves the agent's alerts `ids` (all its firing ones when `None`) at `now_ms`. Returns the ids
    /// resolved and, per id that could not be, why (unknown to this agent, or already resolved).
    pub fn resolve_network_alerts(
        &self,
        agent_id: u64,
        ids: Option<&[u64]>,
        now_ms: i64,
        resolve_after_ms: i64,
    ) -> Result<(Vec<u64>, Vec<String>), StoreError> {
        let txn = self.db.begin_write()?;
        let result = {
            let mut alerts = txn.open_table(NETWORK_ALERTS)?;
            let wanted: Vec<u64> = match ids {
                Some(ids) => ids.to_vec(),
                None => alerts
                    .range((agent_id, 0)..=(agent_id, u64::MAX))?
                    .map(|entry| entry.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?,
            };
            let mut resolved = Vec::new();
            let mut errors = Vec::new();
            for id in wanted {
                let Some(mut record) = alerts
                    .get((agent_id, id))?
                    .map(|v| decode::<NetworkAlertRecord>("network_alerts", v.value()))
                    .transpose()?
                else {
                    errors.push(format!("alert {id}: no such alert of agent {agent_id}"));
                    continue;
                };
                if record.is_resolved(now_ms, resolve_after_ms) {
                    if ids.is_some() {
                        errors.push(format!("alert {id}: already resolved"));
                    }
                    continue;
                }
                record.resolved_at_ms = Some(now_ms);
                alerts.insert((agent_id, id), encode(&record).as_slice())?;
                resolved.push(id);
            }
            (resolved, errors)
        };
        txn.commit()?;
        Ok(result)
    }
}

fn record_key(record: &NetworkAlertRecord) -> String {
    AlertUpdate {
        policy: record.policy.clone(),
        source: record.source.clone(),
        destination: record.destination.clone(),
        port: record.port,
        protocol: record.protocol,
        direction: record.direction,
        verdict: record.verdict,
        drop_reason: String::new(),
        count: 0,
        first_seen_ms: 0,
        last_seen_ms: 0,
    }
    .key()
}

fn new_record(id: u64, agent_id: u64, update: &AlertUpdate) -> NetworkAlertRecord {
    NetworkAlertRecord {
        id,
        agent_id,
        policy: update.policy.clone(),
        source: update.source.clone(),
        destination: update.destination.clone(),
        port: update.port,
        protocol: update.protocol,
        direction: update.direction,
        verdict: update.verdict,
        drop_reason: update.drop_reason.clone(),
        count: update.count,
        first_seen_ms: update.first_seen_ms,
        last_seen_ms: update.last_seen_ms,
        episode_started_ms: update.first_seen_ms,
        resolved_at_ms: None,
    }
}

/// Adds `update` to `record`; returns whether that re-fired it (it had been resolved by an admin, or had
/// had no drop for `resolve_after_ms`): a new episode starting at the update's first drop.
fn merge(record: &mut NetworkAlertRecord, update: &AlertUpdate, resolve_after_ms: i64) -> bool {
    let refired = record.resolved_at_ms.is_some()
        || update.first_seen_ms >= record.last_seen_ms.saturating_add(resolve_after_ms);
    if refired {
        record.episode_started_ms = update.first_seen_ms;
        record.resolved_at_ms = None;
    }
    record.count = record.count.saturating_add(update.count);
    record.first_seen_ms = record.first_seen_ms.min(update.first_seen_ms);
    record.last_seen_ms = record.last_seen_ms.max(update.last_seen_ms);
    record.source = update.source.clone();
    record.destination = update.destination.clone();
    record.verdict = update.verdict;
    record.drop_reason.clone_from(&update.drop_reason);
    refired
}

/// A record for other modules' tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn record() -> NetworkAlertRecord {
        new_record(
            9,
            1,
            &super::tests::update("web-1", 1000, 1_700_000_000_000),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_per_agent: 3,
        resolve_after_ms: 60_000,
    };

    pub(crate) fn update(pod: &str, count: u64, at_ms: i64) -> AlertUpdate {
        AlertUpdate {
            policy: PolicyRef {
                kind: PolicyKind::CiliumNetworkPolicy,
                namespace: "shop".into(),
                name: "deny-db".into(),
            },
            source: Endpoint {
                namespace: "shop".into(),
                pod_name: pod.into(),
                ip: "10.0.0.7".into(),
                identity: 4242,
                workload: "Deployment/frontend".into(),
            },
            destination: Endpoint {
                ip: "203.0.113.7".into(),
                identity: 2,
                ..Default::default()
            },
            port: 5432,
            protocol: Protocol::Tcp,
            direction: Direction::Egress,
            verdict: Verdict::Dropped,
            drop_reason: "POLICY_DENIED".into(),
            count,
            first_seen_ms: at_ms,
            last_seen_ms: at_ms,
        }
    }

    fn store() -> (tempfile::TempDir, Store, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let agent = store.create_agent("g/p", "a").unwrap();
        (dir, store, agent.id)
    }

    fn apply(store: &Store, agent: u64, batch: u64, updates: &[AlertUpdate]) -> BatchOutcome {
        store
            .apply_network_alert_batch(agent, batch, updates, 0, &Rejections::default(), LIMITS)
            .unwrap()
    }

    #[test]
    fn endpoints_are_named_by_pod_else_by_ip() {
        let u = update("web-1", 1, 0);
        assert_eq!(u.source.display_name(), "shop/web-1");
        assert_eq!(u.destination.display_name(), "world 203.0.113.7");
        let plain = Endpoint {
            ip: "10.1.2.3".into(),
            identity: 31337,
            ..Default::default()
        };
        assert_eq!(plain.display_name(), "10.1.2.3");
    }

    #[test]
    fn deltas_add_up_per_key_and_a_repeated_batch_counts_once() {
        let (_dir, store, agent) = store();
        let first = apply(
            &store,
            agent,
            7,
            &[update("web-1", 10, 1_000), update("web-1", 5, 2_000)],
        );
        assert_eq!((first.changed.len(), first.fired), (1, 1), "{first:?}");
        let again = apply(&store, agent, 7, &[update("web-1", 10, 1_000)]);
        assert!(again.duplicate && again.changed.is_empty());
        apply(&store, agent, 8, &[update("web-1", 1, 3_000)]);
        let alerts = store.network_alerts(agent, 10).unwrap();
        assert_eq!(alerts.len(), 1);
        let a = &alerts[0];
        assert_eq!(
            (a.count, a.first_seen_ms, a.last_seen_ms),
            (16, 1_000, 3_000)
        );
        assert_eq!(a.episode_started_ms, 1_000);
        assert_eq!(a.namespace(), "shop");
    }

    #[test]
    fn the_bound_drops_the_alert_seen_longest_ago_and_all_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let agent = {
            let store = Store::open(dir.path()).unwrap();
            let agent = store.create_agent("g/p", "a").unwrap().id;
            apply(
                &store,
                agent,
                1,
                &[
                    update("a", 1, 1_000),
                    update("b", 1, 2_000),
                    update("c", 1, 3_000),
                ],
            );
            // `a` is seen again: `b` is now the oldest.
            apply(&store, agent, 2, &[update("a", 1, 4_000)]);
            let outcome = apply(&store, agent, 3, &[update("d", 1, 5_000)]);
            assert_eq!(outcome.evicted.len(), 1);
            agent
        };
        let store = Store::open(dir.path()).unwrap();
        let pods: Vec<String> = store
            .network_alerts(agent, 10)
            .unwrap()
            .into_iter()
            .map(|a| a.source.pod_name)
            .collect();
        assert_eq!(pods, ["d", "a", "c"], "newest first, b dropped");
        let meta = store.network_alerts_meta(agent).unwrap().unwrap();
        assert_eq!((meta.count, meta.evicted), (3, 1));
        // The batch ids survived too.
        assert!(apply(&store, agent, 3, &[update("d", 1, 5_000)]).duplicate);
        // An evicted key comes back as a new alert.
        let back = apply(&store, agent, 4, &[update("b", 2, 6_000)]);
        assert_eq!(back.fired, 1);
        assert_eq!(store.network_alerts(agent, 1).unwrap()[0].count, 2);
    }

    #[test]
    fn resolved_alerts_refire_as_a_new_episode_keeping_the_total() {
        let (_dir, store, agent) = store();
        apply(&store, agent, 1, &[update("a", 3, 1_000)]);
        let id = store.network_alerts(agent, 1).unwrap()[0].id;
        let (resolved, errors) = store
            .resolve_network_alerts(agent, Some(&[id, 999]), 1_500, LIMITS.resolve_after_ms)
            .unwrap();
        assert_eq!(resolved, [id]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("999"));
        let a = store.network_alert(agent, id).unwrap().unwrap();
        assert!(a.is_resolved(1_500, LIMITS.resolve_after_ms));
        let refire = apply(&store, agent, 2, &[update("a", 2, 2_000)]);
        assert_eq!(refire.fired, 1);
        let a = store.network_alert(agent, id).unwrap().unwrap();
        assert_eq!(
            (a.count, a.episode_started_ms, a.resolved_at_ms),
            (5, 2_000, None)
        );
        // Quiet for resolve_after: the next drop is a new episode too.
        let later = 2_000 + LIMITS.resolve_after_ms;
        assert_eq!(apply(&store, agent, 3, &[update("a", 1, later)]).fired, 1);
        // But a drop within it is the same episode.
        assert_eq!(
            apply(&store, agent, 4, &[update("a", 1, later + 1)]).fired,
            0
        );
        assert_eq!(
            store
                .network_alert(agent, id)
                .unwrap()
                .unwrap()
                .episode_started_ms,
            later
        );
    }

    #[test]
    fn deleting_the_agent_removes_its_alerts() {
        let (_dir, store, agent) = store();
        let other = store.create_agent("g/p", "b").unwrap().id;
        apply(&store, agent, 1, &[update("a", 1, 1_000)]);
        apply(&store, other, 1, &[update("a", 1, 1_000)]);
        store.delete_agent(agent).unwrap();
        assert!(store.network_alerts(agent, 10).unwrap().is_empty());
        assert!(store.network_alerts_meta(agent).unwrap().is_none());
        assert_eq!(store.network_alerts(other, 10).unwrap().len(), 1);
        assert!(matches!(
            store.apply_network_alert_batch(agent, 2, &[], 0, &Rejections::default(), LIMITS),
            Err(StoreError::NoSuchAgent(_))
        ));
    }
}
