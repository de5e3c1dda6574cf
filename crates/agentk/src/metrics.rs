//! agentk's Prometheus metrics (`agentk_*`) and what its readiness needs to know, served on
//! `--observability-listen` (see [`crate::observability`] and docs/metrics.md). Only one label carries a
//! name, `project`, and its values are the agent's own `gitops.manifest_projects[].id`, bounded by
//! [`gitops_config::agent::MAX_MANIFEST_PROJECTS`]; no label names an object.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use gitops_engine::Outcome;
use gitops_telemetry::prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::gitops::{EntryKey, SyncOutcome, SyncResult};

/// `{project, outcome}` of a finished sync.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub project: String,
    pub outcome: &'static str,
}

/// `{project}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectLabels {
    pub project: String,
}

/// `{result}` of one object in a sync: kubectl's verbs.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub result: &'static str,
}

/// `{reason, result}` of a Kubernetes Event agentk tried to record.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub reason: &'static str,
    pub result: &'static str,
}

/// `{version}` of the running agentk.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

pub fn sync_result_name(result: SyncResult) -> &'static str {
    match result {
        SyncResult::Synced => "synced",
        SyncResult::Partial => "partial",
        SyncResult::Failed => "failed",
    }
}

/// Every object result, for series that exist at zero from the start.
const OBJECT_RESULTS: &[&str] = &[
    "created",
    "configured",
    "unchanged",
    "pruned",
    "kept",
    "failed",
    "skipped",
];

/// What a finished sync tells the metrics.
#[derive(Debug, Clone, Copy)]
pub struct FinishedSync<'a> {
    pub project: &'a str,
    pub outcome: &'a SyncOutcome,
    /// How long the apply (with its prune) took; the readiness wait is not included.
    pub took: Duration,
    /// The commit had been applied successfully before: whatever this sync wrote had drifted.
    pub drift_check: bool,
}

/// agentk's metrics, and per manifest project entry the commit whose sync last finished (for `/readyz`).
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Arc<Registry>,
    pub connected: Gauge,
    pub leader: Gauge,
    configurations: Counter,
    syncs: Family<SyncLabels, Counter>,
    sync_duration: Histogram,
    objects: Family<ObjectLabels, Counter>,
    drift_corrections: Counter,
    inventory: Family<ProjectLabels, Gauge>,
    events: Family<EventLabels, Counter>,
    synced: Mutex<HashMap<EntryKey, String>>,
    /// The network-policy alerts module's counters (its status to kas reads them too).
    pub network: NetworkAlertMetrics,
}

/// `agentk_network_*`: what the network-policy alerts module saw and sent.
#[derive(Debug, Clone, Default)]
pub struct NetworkAlertMetrics {
    pub flows_seen: Counter,
    pub flows_matched: Counter,
    pub lost_events: Counter,
    pub relay_connects: Counter,
    pub alerts_reported: Counter,
    pub following: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("agentk");
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: crate::VERSION,
            })
            .set(1);
        let objects = Family::<ObjectLabels, Counter>::default();
        for result in OBJECT_RESULTS {
            let _ = objects.get_or_create(&ObjectLabels { result });
        }
        let this = Self {
            registry: Arc::default(),
            connected: Gauge::default(),
            leader: Gauge::default(),
            configurations: Counter::default(),
            syncs: Family::default(),
            // 50 ms to about 7 min, doubling: a sync of a few objects to one of thousands.
            sync_duration: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            objects,
            drift_corrections: Counter::default(),
            inventory: Family::default(),
            events: Family::default(),
            synced: Mutex::default(),
            network: NetworkAlertMetrics::default(),
        };
        registry.register(
            "build_info",
            "The running agentk's version (always 1)",
            build_info,
        );
        registry.register(
            "kas_connected",
            "1 while the configuration stream to kas is up, else 0",
            this.connected.clone(),
        );
        registry.register(
            "configurations_received",
            "Valid configurations received from kas (config.yaml commits)",
            this.configurations.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the agent's Lease and applies, else 0",
            this.leader.clone(),
        );
        registry.register(
            "syncs",
            "Syncs that ran to their end, by manifest project and outcome: synced, partial, failed",
            this.syncs.clone(),
        );
        registry.register_with_unit(
            "sync_duration",
            "How long syncs took to apply and prune (the readiness wait is not included)",
            Unit::Seconds,
            this.sync_duration.clone(),
        );
        registry.register(
            "sync_objects",
            "Objects in finished syncs, by result: created, configured, unchanged, pruned, kept, failed, skipped",
            this.objects.clone(),
        );
        registry.register(
            "drift_corrections",
            "Objects written again by a drift check: the commit was applied, and the cluster had changed",
            this.drift_corrections.clone(),
        );
        registry.register(
            "inventory_objects",
            "Objects agentk manages for a manifest project after its last sync (applied or kept)",
            this.inventory.clone(),
        );
        registry.register(
            "events",
            "Kubernetes Events agentk recorded, by reason and result: published, failed, dropped",
            this.events.clone(),
        );
        this.network.register(&mut registry);
        Self {
            registry: Arc::new(registry),
            ..this
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn configuration_received(&self) {
        self.configurations.inc();
    }

    /// Counts a sync that ran to its end.
    pub fn sync_finished(&self, sync: FinishedSync<'_>) {
        let FinishedSync {
            project,
            outcome,
            took,
            drift_check,
        } = sync;
        self.syncs
            .get_or_create(&SyncLabels {
                project: project.to_owned(),
                outcome: sync_result_name(outcome.result()),
            })
            .inc();
        self.sync_duration.observe(took.as_secs_f64());
        let mut managed: i64 = 0;
        for object in &outcome.objects {
            self.objects
                .get_or_create(&ObjectLabels {
                    result: object.result.verb(),
                })
                .inc();
            match object.result {
                Outcome::Created | Outcome::Configured => {
                    managed += 1;
                    if drift_check {
                        self.drift_corrections.inc();
                    }
                }
                Outcome::Unchanged | Outcome::Kept(_) => managed += 1,
                Outcome::Pruned | Outcome::Failed(_) | Outcome::Skipped(_) => {}
            }
        }
        // A sync that failed as a whole says nothing about what is in the cluster: the gauge stays.
        if outcome.error.is_none() {
            self.inventory
                .get_or_create(&ProjectLabels {
                    project: project.to_owned(),
                })
                .set(managed);
        }
    }

    /// A Kubernetes Event was published, failed, or dropped (the queue was full).
    pub fn event(&self, reason: &'static str, result: &'static str) {
        self.events
            .get_or_create(&EventLabels { reason, result })
            .inc();
    }

    /// The sync of `commit` for `entry` finished (whatever its outcome).
    pub fn sync_done(&self, entry: &EntryKey, commit: &str) {
        self.synced
            .lock()
            .expect("synced lock")
            .insert(entry.clone(), commit.to_owned());
    }

    /// The commit whose sync last finished for `entry`.
    pub fn synced_commit(&self, entry: &EntryKey) -> Option<String> {
        self.synced.lock().expect("synced lock").get(entry).cloned()
    }

    /// `entry` is no longer configured: its series and its progress go.
    pub fn forget(&self, entry: &EntryKey) {
        self.synced.lock().expect("synced lock").remove(entry);
        self.inventory.remove(&ProjectLabels {
            project: entry.project_id.clone(),
        });
    }
}

impl NetworkAlertMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "network_flows_seen",
            "Flows the Hubble relay sent the network-policy alerts module (its filter passes dropped ones only)",
            self.flows_seen.clone(),
        );
        registry.register(
            "network_flows_matched",
            "Dropped flows matched to at least one policy annotated app.gitlab.com/alert",
            self.flows_matched.clone(),
        );
        registry.register(
            "network_lost_events",
            "Events Hubble reported lost (its buffers overflowed) while agentk followed it",
            self.lost_events.clone(),
        );
        registry.register(
            "network_relay_connects",
            "Times the flow stream from the Hubble relay was opened (first time and after errors)",
            self.relay_connects.clone(),
        );
        registry.register(
            "network_alerts_reported",
            "Alert updates kas acknowledged (one per alert key per batch)",
            self.alerts_reported.clone(),
        );
        registry.register(
            "network_relay_following",
            "1 while the module follows the Hubble relay's flows, else 0",
            self.following.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use gitops_telemetry::prometheus_client::encoding::prometheus_text::encode;

    use super::*;

    #[test]
    fn docs_list_every_metric_and_no_other() {
        // A family shows in the exposition once it has a series: give every one a sample.
        let metrics = AgentMetrics::new();
        metrics.sync_finished(FinishedSync {
            project: "group/apps",
            outcome: &SyncOutcome::default(),
            took: Duration::from_millis(5),
            drift_check: false,
        });
        metrics.event("Pruned", "published");
        let mut text = String::new();
        encode(&mut text, &metrics.registry()).unwrap();
        let declared: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let documented: BTreeSet<&str> = include_str!("../../../docs/metrics.md")
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|name| name.starts_with("agentk_"))
            .collect();
        assert_eq!(declared, documented, "docs/metrics.md vs agentk");
    }

    #[test]
    fn a_drift_check_counts_what_it_wrote_and_the_inventory_what_is_managed() {
        use crate::gitops::ObjectOutcome;
        let object = |result: Outcome| ObjectOutcome {
            resource_key: "/ConfigMap/ns/a".into(),
            key: None,
            source: String::new(),
            result,
            sync_result: String::new(),
            health: None,
            message: String::new(),
            resource: None,
        };
        let metrics = AgentMetrics::new();
        let outcome = SyncOutcome {
            objects: vec![
                object(Outcome::Configured),
                object(Outcome::Unchanged),
                object(Outcome::Pruned),
                object(Outcome::Kept("in use".into())),
            ],
            error: None,
        };
        for drift_check in [false, true] {
            metrics.sync_finished(FinishedSync {
                project: "group/apps",
                outcome: &outcome,
                took: Duration::from_millis(120),
                drift_check,
            });
        }
        let mut text = String::new();
        encode(&mut text, &metrics.registry()).unwrap();
        for line in [
            "agentk_drift_corrections_total 1\n",
            "agentk_inventory_objects{project=\"group/apps\"} 3\n",
            "agentk_syncs_total{project=\"group/apps\",outcome=\"synced\"} 2\n",
            "agentk_sync_objects_total{result=\"pruned\"} 2\n",
            "agentk_sync_objects_total{result=\"failed\"} 0\n",
            "agentk_sync_duration_seconds_count 2\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
